/* boxloss._nms_native: sequential exact greedy (D)IoU-NMS, weighted NMS and Soft-NMS on the CPU.
 *
 * Plain C against the CPython API (no PyTorch headers): Python hands over the data pointers of
 * contiguous tensors it keeps alive and preallocated outputs; the work runs with the GIL released.
 *
 * Greedy NMS, per category, visits the boxes by rank (decreasing score, ties by index) and tests
 * each one only against the kept boxes near it: the category's boxes are counting-sorted by the
 * cell of their corner (x1, y1) in a uniform grid (one grid per size level, powers of two of
 * max(w, h), in categories of LEVELS_MIN_BOXES boxes or more), the kept ones are bits of a bitset
 * over that order, and a box q scans the kept bits of the window that the threshold allows, in the
 * levels whose sizes IoU > t permits (see greedy_segment). The work is O(N + sum of window scans),
 * against torchvision's O(N K) loop over all later boxes of every kept box. Soft-NMS finds the
 * boxes a selected box decays through the same grids, with an indexed heap of current scores.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define PRUNE_SLACK 1e-5  /* the pruning threshold t' = t (1 - slack) of nms.py */
#define SMALL_SEGMENT 24  /* up to this many valid boxes: each against the kept list, no sort */
#define INSERTION_SORT 32 /* radix_sort below this many keys: insertion sort */
#define GRID_FACTOR 0.25     /* grid cells of about this x the mean box size max(w, h) (measured: 0.25-0.5 best) */
#define GRID_EXTRA_CELLS 16  /* a level's grid has at most 2 count + this many cells */
#define MAX_LEVELS 32        /* size levels per category; a wider range of sizes shares levels */
#define LEVELS_MIN_BOXES 2048 /* fewer valid boxes in a category: one level (measured: levels pay from ~5,000) */

enum { POW_NONE, POW_SQRT, POW_SQUARE, POW_CUBE, POW_GENERAL };
enum { SOFT_LINEAR, SOFT_GAUSSIAN };

struct value_params {
    int distance; /* 0: plain IoU */
    int pow_mode; /* how (rho^2 / c^2) ** beta is taken */
    double beta;
};

struct nms_job {
    const void *boxes; /* [n, 4] in the compute dtype, index order */
    int64_t n;
    const int32_t *rank; /* rank position -> index */
    const int32_t *seg_pos; /* rank positions grouped by category, ascending within each */
    const int64_t *seg_start; /* [n_segments + 1] */
    int64_t n_segments, max_segment;
    double t;
    struct value_params vp;
    uint8_t *kept;  /* [n] by rank position */
    int32_t *owner; /* [n] by rank position, or NULL */
};

struct soft_job {
    const void *boxes;
    int64_t n;
    const void *scores;
    int scores_bits;
    const int32_t *seg_pos; /* indices grouped by category, ascending within each */
    const int64_t *seg_start;
    int64_t n_segments, max_segment;
    struct value_params vp;
    int method;
    double sigma, iou_threshold, score_threshold;
};

/* ------------------------------------------------------------------------------ sorting */

/* unsigned keys in the order of the finite floats (-0 before +0, which no comparison tells apart) */
static inline uint64_t sortable_f32(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    return (u >> 31) ? (uint32_t)~u : (u | 0x80000000u);
}

static inline uint64_t sortable_f64(double x) {
    uint64_t u;
    memcpy(&u, &x, 8);
    return (u >> 63) ? ~u : (u | 0x8000000000000000ull);
}

/* Key of torch.sort(scores, descending=True, stable=True) in an ascending sort: NaN first (all NaN
 * equal), -0 == +0; the stable sort keeps equal scores in index order. */
static inline uint64_t rank_key_f32(float x) {
    if (x != x)
        return 0;
    if (x == 0)
        x = 0.0f;
    return (uint32_t)~(uint32_t)sortable_f32(x);
}

static inline uint64_t rank_key_f64(double x) {
    if (x != x)
        return 0;
    if (x == 0)
        x = 0.0;
    return ~sortable_f64(x);
}

/* Stable LSD radix sort of (key, val) by key, ascending, on the low key_bytes bytes, 8 bits per pass;
 * a byte equal over all keys costs no pass. tk, tv: scratch of m entries. */
static void radix_sort(uint64_t *key, int32_t *val, uint64_t *tk, int32_t *tv, int64_t m, int key_bytes) {
    if (m < INSERTION_SORT) {
        for (int64_t i = 1; i < m; i++) {
            uint64_t k = key[i];
            int32_t v = val[i];
            int64_t j = i - 1;
            for (; j >= 0 && key[j] > k; j--) {
                key[j + 1] = key[j];
                val[j + 1] = val[j];
            }
            key[j + 1] = k;
            val[j + 1] = v;
        }
        return;
    }
    uint32_t count[8][256];
    memset(count, 0, sizeof count);
    for (int64_t i = 0; i < m; i++) {
        uint64_t k = key[i];
        for (int d = 0; d < key_bytes; d++)
            count[d][(k >> (8 * d)) & 255]++;
    }
    uint64_t *sk = key, *dk = tk;
    int32_t *sv = val, *dv = tv;
    for (int d = 0; d < key_bytes; d++) {
        int shift = 8 * d;
        if (count[d][(key[0] >> shift) & 255] == (uint32_t)m)
            continue;
        uint32_t off[256], total = 0;
        for (int b = 0; b < 256; b++) {
            off[b] = total;
            total += count[d][b];
        }
        for (int64_t i = 0; i < m; i++) {
            uint32_t o = off[(sk[i] >> shift) & 255]++;
            dk[o] = sk[i];
            dv[o] = sv[i];
        }
        uint64_t *t1 = sk;
        sk = dk, dk = t1;
        int32_t *t2 = sv;
        sv = dv, dv = t2;
    }
    if (sk != key) {
        memcpy(key, sk, (size_t)m * sizeof(uint64_t));
        memcpy(val, sv, (size_t)m * sizeof(int32_t));
    }
}

/* Groups vals[0..n) (already in the order wanted within a group) by category cls[index[vals[i]]]
 * (index NULL: cls[vals[i]]) with a stable radix sort; seg_start gets the group boundaries.
 * Returns the number of groups, or -1. */
static int64_t group_by_class(const int64_t *cls, const int32_t *index, int32_t *vals, int64_t n, int64_t *seg_start,
                              int64_t *max_seg) {
    uint64_t *key = malloc((size_t)n * sizeof(uint64_t)), *tk = malloc((size_t)n * sizeof(uint64_t));
    int32_t *tv = malloc((size_t)n * sizeof(int32_t));
    if (!key || !tk || !tv) {
        free(key), free(tk), free(tv);
        return -1;
    }
    for (int64_t i = 0; i < n; i++)
        key[i] = (uint64_t)cls[index ? index[vals[i]] : vals[i]] ^ 0x8000000000000000ull;
    radix_sort(key, vals, tk, tv, n, 8);
    int64_t g = 0;
    *max_seg = 0;
    for (int64_t i = 0; i < n; i++) {
        if (i == 0 || key[i] != key[i - 1]) {
            if (g > 0 && i - seg_start[g - 1] > *max_seg)
                *max_seg = i - seg_start[g - 1];
            seg_start[g++] = i;
        }
    }
    if (g > 0 && n - seg_start[g - 1] > *max_seg)
        *max_seg = n - seg_start[g - 1];
    seg_start[g] = n;
    free(key), free(tk), free(tv);
    return g;
}

/* ------------------------------------------------------------------------------ grid */

/* A uniform grid of nx x ny square cells of side 1 / inv from (x0, y0); coordinates outside fall in the
 * border cells. The cell of a coordinate is monotone in it, so the cells of the corners of a window
 * bound the cells of every corner inside it. */
struct grid {
    double x0, y0, inv;
    int64_t nx, ny;
};

static void grid_init(struct grid *g, double x0, double y0, double ex, double ey, double side, double max_cells) {
    g->x0 = x0, g->y0 = y0, g->nx = 1, g->ny = 1, g->inv = 0;
    if (!(side > 0 && side < INFINITY && ex < INFINITY && ey < INFINITY))
        return; /* one cell */
    double nx = ex / side + 1, ny = ey / side + 1;
    if (!(nx * ny <= max_cells)) { /* coarser: at most max_cells cells */
        side *= sqrt(nx * ny / max_cells);
        do {
            side *= 1.125;
            nx = ex / side + 1, ny = ey / side + 1;
        } while (!(nx * ny <= max_cells) && side < INFINITY);
        if (!(side < INFINITY))
            return;
    }
    g->nx = (int64_t)nx, g->ny = (int64_t)ny, g->inv = 1 / side;
}

static inline int64_t grid_cell(double u, double inv, int64_t n) {
    double d = u * inv;
    if (!(d >= 0)) /* also NaN */
        return 0;
    return d < (double)n ? (int64_t)d : n - 1;
}

static inline int64_t grid_cell_x(const struct grid *g, double x) { return grid_cell(x - g->x0, g->inv, g->nx); }
static inline int64_t grid_cell_y(const struct grid *g, double y) { return grid_cell(y - g->y0, g->inv, g->ny); }

/* Size levels: a box of size M = max(w, h) has exponent ilogb(M) (M in [2^e, 2^(e+1))); levels
 * group `step` consecutive exponents from `lo`, so that there are at most MAX_LEVELS. */
struct level {
    struct grid g;
    int64_t base, count;          /* first cell id; boxes */
    double size_sum, x0, y0, xm, ym; /* sum of M; extent of the corners (x1, y1) */
    double max_w, max_h;          /* widest and highest box */
};

struct levels {
    int lo, step, n;
    struct level lv[MAX_LEVELS];
};

/* ilogb(m) for 0 < m < inf, from the bits (libm's ilogb is a call) */
static inline int exponent_of(double m) {
    uint64_t u;
    memcpy(&u, &m, 8);
    int e = (int)((u >> 52) & 0x7ff);
    return e ? e - 1023 : ilogb(m); /* subnormal: rare */
}

static inline int size_exponent(double w, double h) {
    double m = w > h ? w : h;
    return m > 0 && m < INFINITY ? exponent_of(m) : 0; /* (valid boxes: 0 < m < inf) */
}

static void levels_init(struct levels *L, int emin, int emax) {
    int range = emax - emin + 1;
    L->lo = emin;
    L->step = (range + MAX_LEVELS - 1) / MAX_LEVELS;
    L->n = (range + L->step - 1) / L->step;
    for (int g = 0; g < L->n; g++)
        L->lv[g] = (struct level){{0, 0, 0, 1, 1}, 0, 0, 0, INFINITY, INFINITY, -INFINITY, -INFINITY, 0, 0};
}

static inline int levels_index(const struct levels *L, int e) {
    int d = e - L->lo;
    if (d < 0)
        return 0;
    d /= L->step;
    return d < L->n ? d : L->n - 1;
}

/* the level of a box of size m; monotone in m */
static inline int levels_of_size(const struct levels *L, double m) {
    if (!(m > 0))
        return 0;
    if (!(m < INFINITY))
        return L->n - 1;
    return levels_index(L, exponent_of(m));
}

static inline void level_add(struct level *l, double x1, double y1, double x2, double y2) {
    double w = x2 - x1, h = y2 - y1;
    l->count++;
    l->size_sum += w > h ? w : h;
    l->x0 = x1 < l->x0 ? x1 : l->x0, l->xm = x1 > l->xm ? x1 : l->xm;
    l->y0 = y1 < l->y0 ? y1 : l->y0, l->ym = y1 > l->ym ? y1 : l->ym;
    l->max_w = w > l->max_w ? w : l->max_w;
    l->max_h = h > l->max_h ? h : l->max_h;
}

/* The grid of every level with boxes; returns the number of cells of all levels. */
static int64_t levels_grids(struct levels *L) {
    int64_t base = 0;
    for (int g = 0; g < L->n; g++) {
        struct level *l = &L->lv[g];
        l->base = base;
        if (l->count == 0)
            continue;
        grid_init(&l->g, l->x0, l->y0, l->xm - l->x0, l->ym - l->y0, GRID_FACTOR * l->size_sum / (double)l->count,
                  2.0 * (double)l->count + GRID_EXTRA_CELLS);
        base += l->g.nx * l->g.ny;
    }
    return base;
}

/* ------------------------------------------------------------------------------ Soft-NMS helpers */

static inline double score_at(const void *scores, int bits, int64_t i) {
    return bits == 32 ? (double)((const float *)scores)[i] : ((const double *)scores)[i];
}

/* Bodla et al., Eq. 2 (linear) and Eq. 3 (gaussian): the factor of a box overlapping the selected
 * box by o (IoU, or max(DIoU, 0)); o outside [0, 1] (NaN for two empty boxes) is clamped. */
static inline double decay(const struct soft_job *job, double o) {
    o = o > 0 ? (o < 1 ? o : 1.0) : 0.0;
    if (job->method == SOFT_GAUSSIAN)
        return exp(-(o * o) / job->sigma);
    return o >= job->iou_threshold ? 1.0 - o : 1.0;
}

/* Indexed max-heap of the remaining boxes of a category by current score (equal scores: lower
 * index first); a decayed score moves its box down in place, so the heap never holds stale entries. */
struct iheap {
    int32_t *h;      /* heap of category-local indices */
    int32_t *pos;    /* local index -> heap position, -1 when out */
    const double *s; /* current scores */
    int64_t size;
};

static inline int ih_before(const struct iheap *H, int32_t a, int32_t b) {
    return H->s[a] > H->s[b] || (H->s[a] == H->s[b] && a < b);
}

static void ih_sift_down(struct iheap *H, int64_t i) {
    int32_t x = H->h[i];
    for (;;) {
        int64_t c = 2 * i + 1;
        if (c >= H->size)
            break;
        if (c + 1 < H->size && ih_before(H, H->h[c + 1], H->h[c]))
            c++;
        if (!ih_before(H, H->h[c], x))
            break;
        H->h[i] = H->h[c];
        H->pos[H->h[i]] = (int32_t)i;
        i = c;
    }
    H->h[i] = x;
    H->pos[x] = (int32_t)i;
}

static void ih_sift_up(struct iheap *H, int64_t i) {
    int32_t x = H->h[i];
    while (i > 0) {
        int64_t p = (i - 1) / 2;
        if (!ih_before(H, x, H->h[p]))
            break;
        H->h[i] = H->h[p];
        H->pos[H->h[i]] = (int32_t)i;
        i = p;
    }
    H->h[i] = x;
    H->pos[x] = (int32_t)i;
}

static void ih_build(struct iheap *H) {
    for (int64_t i = 0; i < H->size; i++)
        H->pos[H->h[i]] = (int32_t)i;
    for (int64_t i = H->size / 2 - 1; i >= 0; i--)
        ih_sift_down(H, i);
}

/* after the score of l changed, in either direction */
static void ih_update(struct iheap *H, int32_t l) {
    ih_sift_down(H, H->pos[l]);
    ih_sift_up(H, H->pos[l]);
}

static void ih_remove(struct iheap *H, int32_t l) {
    int64_t i = H->pos[l];
    int32_t last = H->h[--H->size];
    H->pos[l] = -1;
    if (i < H->size) {
        H->h[i] = last;
        H->pos[last] = (int32_t)i;
        ih_sift_down(H, i);
        ih_sift_up(H, H->pos[last]);
    }
}

/* ------------------------------------------------------------------------------ the kernels */

#define REAL float
#define SUF f32
#include "_nms_native_kernel.h"
#undef REAL
#undef SUF

#define REAL double
#define SUF f64
#include "_nms_native_kernel.h"
#undef REAL
#undef SUF

static int pow_mode(int distance, double beta) {
    if (!distance)
        return POW_NONE;
    if (beta == 1.0)
        return POW_NONE;
    if (beta == 0.5)
        return POW_SQRT;
    if (beta == 2.0)
        return POW_SQUARE;
    if (beta == 3.0)
        return POW_CUBE;
    return POW_GENERAL;
}

/* Positions 0..n-1 grouped by category, cls[index[p]] (index NULL: cls[p]), or all in one group.
 * -1: no memory. */
static int64_t make_segments(const int64_t *cls, const int32_t *index, int32_t *seg_pos, int64_t n, int64_t *seg_start,
                             int64_t *max_seg) {
    for (int64_t p = 0; p < n; p++)
        seg_pos[p] = (int32_t)p;
    if (!cls || n == 0) {
        seg_start[0] = 0;
        seg_start[1] = n;
        *max_seg = n;
        return 1;
    }
    return group_by_class(cls, index, seg_pos, n, seg_start, max_seg);
}

/* The whole NMS call without the GIL: 0, or -1 (out of memory). */
static int nms_call(int dtype, const void *boxes, int64_t n, int scores_bits, const void *scores,
                    const int64_t *order, const int64_t *cls, double t, double beta, int distance, int64_t *keep,
                    int64_t *n_keep, const void *weights, int weights_bits, void *merged) {
    int rc = -1;
    int32_t *rank = malloc((size_t)n * sizeof(int32_t)), *seg_pos = malloc((size_t)n * sizeof(int32_t));
    int64_t *seg_start = malloc((size_t)(n + 2) * sizeof(int64_t));
    uint8_t *kept = calloc((size_t)n, 1);
    int32_t *owner = merged ? malloc((size_t)n * sizeof(int32_t)) : NULL;
    double *w = merged ? malloc((size_t)n * sizeof(double)) : NULL;
    uint64_t *key = NULL, *tk = NULL;
    int32_t *tv = NULL;
    if (!rank || !seg_pos || !seg_start || !kept || (merged && (!owner || !w)))
        goto done;
    if (scores_bits) { /* the rank order, as torch.sort(scores, descending=True, stable=True) */
        key = malloc((size_t)n * sizeof(uint64_t));
        tk = malloc((size_t)n * sizeof(uint64_t));
        tv = malloc((size_t)n * sizeof(int32_t));
        if (!key || !tk || !tv)
            goto done;
        for (int64_t i = 0; i < n; i++) {
            key[i] = scores_bits == 32 ? rank_key_f32(((const float *)scores)[i]) : rank_key_f64(((const double *)scores)[i]);
            rank[i] = (int32_t)i;
        }
        radix_sort(key, rank, tk, tv, n, scores_bits / 8);
    } else {
        for (int64_t i = 0; i < n; i++)
            rank[i] = (int32_t)order[i];
    }
    struct nms_job job = {boxes, n, rank, seg_pos, seg_start, 0, 0, t, {0, 0, beta}, kept, owner};
    job.vp.distance = distance && !isinf(beta);
    job.vp.pow_mode = pow_mode(job.vp.distance, beta);
    if (t >= 1 || n == 1) { /* a computed value is <= 1: nothing can be suppressed */
        memset(kept, 1, (size_t)n);
        for (int64_t p = 0; owner && p < n; p++)
            owner[p] = (int32_t)p;
    } else {
        job.n_segments = make_segments(cls, rank, seg_pos, n, seg_start, &job.max_segment);
        if (job.n_segments < 0)
            goto done;
        if ((dtype == 32 ? nms_run_f32(&job) : nms_run_f64(&job)) < 0)
            goto done;
    }
    int64_t k = 0;
    for (int64_t p = 0; p < n; p++)
        if (kept[p])
            keep[k++] = rank[p];
    *n_keep = k;
    if (merged) {
        for (int64_t i = 0; i < n; i++)
            w[i] = score_at(weights, weights_bits, i);
        if ((dtype == 32 ? merge_clusters_f32(&job, w, merged) : merge_clusters_f64(&job, w, merged)) < 0)
            goto done;
    }
    rc = 0;
done:
    free(rank), free(seg_pos), free(seg_start), free(kept), free(owner), free(w), free(key), free(tk), free(tv);
    return rc;
}

/* A selection of one category's run, ordered for the merge of all categories' runs. */
struct merge_key {
    double s;        /* the key's score ... */
    int64_t i;       /* ... and index: the lowest (score desc, index asc) key of the run so far */
    int64_t pos;     /* position in the category's run (and in the output) */
};

static int by_merge_key(const void *a, const void *b) {
    const struct merge_key *x = a, *y = b;
    if (x->s != y->s)
        return x->s > y->s ? -1 : 1;
    if (x->i != y->i)
        return x->i < y->i ? -1 : 1;
    return x->pos < y->pos ? -1 : (x->pos > y->pos);
}

static int soft_call(struct soft_job *job, int dtype, const int64_t *cls, int64_t *keep, double *out_scores,
                     int64_t *n_keep) {
    int64_t n = job->n;
    int rc = -1;
    int32_t *seg_pos = malloc((size_t)n * sizeof(int32_t));
    int64_t *seg_start = malloc((size_t)(n + 2) * sizeof(int64_t));
    if (!seg_pos || !seg_start)
        goto done;
    job->seg_pos = seg_pos;
    job->seg_start = seg_start;
    job->n_segments = make_segments(cls, NULL, seg_pos, n, seg_start, &job->max_segment);
    if (job->n_segments < 0)
        goto done;
    *n_keep = 0;
    if ((dtype == 32 ? soft_run_f32(job, keep, out_scores, n_keep) : soft_run_f64(job, keep, out_scores, n_keep)) < 0)
        goto done;
    if (job->n_segments > 1 && *n_keep > 1) {
        /* Categories never interact, so one run over all of them selects, at each step, the best
         * next selection of any category: the merge of the categories' runs that always takes the
         * best head. A run's keys (score at selection desc, index) decrease, except where a decay
         * raised a negative score; the merge then takes an element with the lowest key of its run
         * so far, so ordering by that running minimum (then by position) is the merge. */
        struct merge_key *mk = malloc((size_t)*n_keep * sizeof *mk);
        double *sc = malloc((size_t)*n_keep * sizeof(double));
        int64_t *ix = malloc((size_t)*n_keep * sizeof(int64_t));
        if (!mk || !sc || !ix) {
            free(mk), free(sc), free(ix);
            goto done;
        }
        for (int64_t i = 0; i < *n_keep; i++) {
            double si = out_scores[i];
            int64_t ii = keep[i];
            int new_run = i == 0 || cls[ii] != cls[keep[i - 1]]; /* each category's run is contiguous */
            if (new_run || si < mk[i - 1].s || (si == mk[i - 1].s && ii > mk[i - 1].i))
                mk[i] = (struct merge_key){si, ii, i};
            else
                mk[i] = (struct merge_key){mk[i - 1].s, mk[i - 1].i, i};
            sc[i] = si, ix[i] = ii;
        }
        qsort(mk, (size_t)*n_keep, sizeof *mk, by_merge_key);
        for (int64_t i = 0; i < *n_keep; i++) {
            out_scores[i] = sc[mk[i].pos];
            keep[i] = ix[mk[i].pos];
        }
        free(mk), free(sc), free(ix);
    }
    rc = 0;
done:
    free(seg_pos), free(seg_start);
    return rc;
}

/* ------------------------------------------------------------------------------ Python bindings */

static void *ptr(unsigned long long p) { return (void *)(uintptr_t)p; }

static PyObject *py_nms(PyObject *self, PyObject *args) {
    int dtype, scores_bits, distance, weights_bits;
    unsigned long long boxes, scores, order, cls, keep, weights, merged;
    long long n;
    double t, beta;
    (void)self;
    if (!PyArg_ParseTuple(args, "iKLiKKKddiKiKK", &dtype, &boxes, &n, &scores_bits, &scores, &order, &cls, &t, &beta,
                          &distance, &keep, &weights_bits, &weights, &merged))
        return NULL;
    if (dtype != 32 && dtype != 64) {
        PyErr_Format(PyExc_ValueError, "dtype must be 32 or 64 (float32 or float64), got %d", dtype);
        return NULL;
    }
    if (scores_bits != 0 && scores_bits != 32 && scores_bits != 64) {
        PyErr_Format(PyExc_ValueError, "scores_bits must be 0 (order given), 32 or 64, got %d", scores_bits);
        return NULL;
    }
    if (n < 0 || n > INT32_MAX || (n > 0 && (!boxes || !keep || (scores_bits ? !scores : !order))) ||
        (merged && !weights) || (merged && weights_bits != 32 && weights_bits != 64) || t != t) {
        PyErr_SetString(PyExc_ValueError, "null pointer, bad length (0 <= n < 2^31), weights or threshold");
        return NULL;
    }
    int64_t n_keep = 0;
    int rc = 0;
    if (n > 0) {
        Py_BEGIN_ALLOW_THREADS
        rc = nms_call(dtype, ptr(boxes), n, scores_bits, ptr(scores), ptr(order), ptr(cls), t, beta, distance,
                      ptr(keep), &n_keep, ptr(weights), weights_bits, ptr(merged));
        Py_END_ALLOW_THREADS
    }
    if (rc < 0)
        return PyErr_NoMemory();
    return PyLong_FromLongLong(n_keep);
}

static PyObject *py_soft_nms(PyObject *self, PyObject *args) {
    struct soft_job job;
    int dtype, distance;
    unsigned long long boxes, scores, cls, keep, out_scores;
    long long n;
    double beta;
    (void)self;
    memset(&job, 0, sizeof job);
    if (!PyArg_ParseTuple(args, "iKLiKKidddidKK", &dtype, &boxes, &n, &job.scores_bits, &scores, &cls, &job.method,
                          &job.sigma, &job.iou_threshold, &job.score_threshold, &distance, &beta, &keep, &out_scores))
        return NULL;
    if (dtype != 32 && dtype != 64) {
        PyErr_Format(PyExc_ValueError, "dtype must be 32 or 64 (float32 or float64), got %d", dtype);
        return NULL;
    }
    if (job.scores_bits != 32 && job.scores_bits != 64) {
        PyErr_Format(PyExc_ValueError, "scores_bits must be 32 or 64, got %d", job.scores_bits);
        return NULL;
    }
    if (job.method != SOFT_LINEAR && job.method != SOFT_GAUSSIAN) {
        PyErr_Format(PyExc_ValueError, "method must be 0 (linear) or 1 (gaussian), got %d", job.method);
        return NULL;
    }
    if (n < 0 || n > INT32_MAX || (n > 0 && (!boxes || !scores || !keep || !out_scores)) || !(job.sigma > 0)) {
        PyErr_SetString(PyExc_ValueError, "null pointer, bad length (0 <= n < 2^31) or sigma");
        return NULL;
    }
    job.boxes = ptr(boxes);
    job.n = n;
    job.scores = ptr(scores);
    job.vp.distance = distance && !isinf(beta);
    job.vp.pow_mode = pow_mode(job.vp.distance, beta);
    job.vp.beta = beta;
    int64_t n_keep = 0;
    int rc = 0;
    if (n > 0) {
        Py_BEGIN_ALLOW_THREADS
        rc = soft_call(&job, dtype, ptr(cls), ptr(keep), ptr(out_scores), &n_keep);
        Py_END_ALLOW_THREADS
    }
    if (rc < 0)
        return PyErr_NoMemory();
    return PyLong_FromLongLong(n_keep);
}

/* Greedy over a bit matrix read back from a device (nms.py's _nms_masked): blocks [n_blocks, 4] int64
 * (r0, r1, c0, width) in the order of the buffer; row i of a block is `width` bytes whose bit k of
 * byte w says that rank i suppresses rank c0 + 8 w + k (c0 a multiple of 8). `removed` ([n / 8]
 * bytes, bit i: rank i suppressed) carries over between calls; kept ranks are appended to keep. */
static int64_t resolve_bits(const uint8_t *bits, const int64_t *blocks, int64_t n_blocks, uint8_t *removed,
                            int64_t *keep, int64_t n_keep) {
    int64_t at = 0;
    for (int64_t b = 0; b < n_blocks; b++) {
        int64_t r0 = blocks[4 * b], r1 = blocks[4 * b + 1], c0 = blocks[4 * b + 2], width = blocks[4 * b + 3];
        for (int64_t i = r0; i < r1; i++) {
            if ((removed[i >> 3] >> (i & 7)) & 1)
                continue;
            keep[n_keep++] = i;
            const uint8_t *row = bits + at + (i - r0) * width;
            uint8_t *dst = removed + (c0 >> 3);
            for (int64_t w = 0; w < width; w++)
                dst[w] |= row[w];
        }
        at += (r1 - r0) * width;
    }
    return n_keep;
}

static PyObject *py_resolve_bits(PyObject *self, PyObject *args) {
    unsigned long long bits, blocks, removed, keep;
    long long n_bytes, n_blocks, n, n_keep;
    (void)self;
    if (!PyArg_ParseTuple(args, "KLKLLKKL", &bits, &n_bytes, &blocks, &n_blocks, &n, &removed, &keep, &n_keep))
        return NULL;
    /* the blocks must lie inside the buffer, their rows and columns inside [0, n) */
    const int64_t *bl = ptr(blocks);
    int64_t total = 0;
    for (int64_t b = 0; b < n_blocks; b++) {
        int64_t r0 = bl[4 * b], r1 = bl[4 * b + 1], c0 = bl[4 * b + 2], width = bl[4 * b + 3];
        if (r0 < 0 || r1 < r0 || r1 > n || c0 < 0 || c0 % 8 || width < 0 || c0 / 8 + width > (n + 7) / 8) {
            PyErr_SetString(PyExc_ValueError, "bad block");
            return NULL;
        }
        total += (r1 - r0) * width;
    }
    if (n < 0 || n_keep < 0 || n_keep > n || total > n_bytes || (n_blocks > 0 && (!bits || !removed || !keep))) {
        PyErr_SetString(PyExc_ValueError, "null pointer or bad length");
        return NULL;
    }
    int64_t k;
    Py_BEGIN_ALLOW_THREADS
    k = resolve_bits(ptr(bits), bl, n_blocks, ptr(removed), ptr(keep), n_keep);
    Py_END_ALLOW_THREADS
    return PyLong_FromLongLong(k);
}

static PyMethodDef methods[] = {
    {"nms", py_nms, METH_VARARGS,
     "nms(dtype_bits, boxes_ptr, n, scores_bits, scores_ptr, order_ptr, classes_ptr, iou_threshold, beta, distance, "
     "keep_ptr, weights_bits, weights_ptr, merged_ptr) -> K: greedy (D)IoU-NMS of contiguous [n, 4] boxes; the "
     "kept indices go to keep [n] (first K), by rank. Rank from float32/float64 scores (scores_bits 32/64) or "
     "an int64 order (scores_bits 0); classes: int64 [n] or 0. merged_ptr != 0: weighted NMS, the [K, 4] "
     "score-weighted means of the clusters (weights float32/float64 [n])"},
    {"soft_nms", py_soft_nms, METH_VARARGS,
     "soft_nms(dtype_bits, boxes_ptr, n, scores_bits, scores_ptr, classes_ptr, method, sigma, iou_threshold, "
     "score_threshold, distance, beta, keep_ptr, out_scores_ptr) -> K: Soft-NMS (method 0 linear, 1 gaussian); "
     "the selected indices to keep int64 [n] and their scores to out_scores float64 [n] (first K)"},
    {"resolve_bits", py_resolve_bits, METH_VARARGS,
     "resolve_bits(bits_ptr, n_bytes, blocks_ptr, n_blocks, n, removed_ptr, keep_ptr, n_keep) -> K: greedy over "
     "the suppression bits of nms.py's device formulation; blocks int64 [n_blocks, 4] (r0, r1, c0, width), removed "
     "uint8 [(n + 7) / 8] carried between calls, kept ranks appended to keep int64 [n] from n_keep on"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_nms_native", "Greedy (D)IoU-NMS, weighted NMS and Soft-NMS loops on the CPU.", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__nms_native(void) { return PyModule_Create(&module); }
