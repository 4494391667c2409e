/* boxloss._nms_native: sequential exact greedy (D)IoU-NMS, weighted NMS and Soft-NMS on the CPU.
 *
 * Plain C against the CPython API (no PyTorch headers): Python hands over the data pointers of
 * contiguous tensors it keeps alive and preallocated outputs; the work runs with the GIL released.
 *
 * Greedy NMS, per category, visits the boxes by rank (decreasing score, ties by index) and tests
 * each one only against the kept boxes near it: the category's boxes are sorted by x1 once, the
 * kept ones are bits of a bitset over that order, and a box q scans the kept bits of the x1 window
 * that the threshold allows (see greedy_segment). The work is O(N log N + sum of window scans),
 * against torchvision's O(N K) loop over all later boxes of every kept box.
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
#define GRID_EXTRA_CELLS 64  /* a segment's grid has at most 2 V + this many cells */

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

/* max-heap of candidate scores: higher score first, equal scores by lower index */
struct heap_entry {
    double s;
    int32_t l, version;
};

struct heap {
    struct heap_entry *e;
    int64_t size, cap;
};

static inline int heap_before(const struct heap_entry *a, const struct heap_entry *b) {
    return a->s > b->s || (a->s == b->s && a->l < b->l);
}

static int heap_reserve(struct heap *h, int64_t cap) {
    if (cap <= h->cap)
        return 0;
    if (cap < 16)
        cap = 16;
    struct heap_entry *e = realloc(h->e, (size_t)cap * sizeof *e);
    if (!e)
        return -1;
    h->e = e;
    h->cap = cap;
    return 0;
}

static void heap_sift_down(struct heap *h, int64_t i) {
    struct heap_entry x = h->e[i];
    for (;;) {
        int64_t c = 2 * i + 1;
        if (c >= h->size)
            break;
        if (c + 1 < h->size && heap_before(&h->e[c + 1], &h->e[c]))
            c++;
        if (!heap_before(&h->e[c], &x))
            break;
        h->e[i] = h->e[c];
        i = c;
    }
    h->e[i] = x;
}

static void heap_build(struct heap *h) {
    for (int64_t i = h->size / 2 - 1; i >= 0; i--)
        heap_sift_down(h, i);
}

static struct heap_entry heap_pop(struct heap *h) {
    struct heap_entry top = h->e[0];
    h->e[0] = h->e[--h->size];
    if (h->size > 0)
        heap_sift_down(h, 0);
    return top;
}

static int heap_push(struct heap *h, struct heap_entry x) {
    if (h->size == h->cap && heap_reserve(h, 2 * h->cap) < 0)
        return -1;
    int64_t i = h->size++;
    while (i > 0) {
        int64_t p = (i - 1) / 2;
        if (!heap_before(&x, &h->e[p]))
            break;
        h->e[i] = h->e[p];
        i = p;
    }
    h->e[i] = x;
    return 0;
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

static int by_score_then_index(const void *a, const void *b) {
    const double *x = a, *y = b; /* (score, index) pairs */
    if (x[0] != y[0])
        return x[0] > y[0] ? -1 : 1;
    return x[1] < y[1] ? -1 : (x[1] > y[1]);
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
        /* categories never interact: the order of one run over all of them is the merge of the
         * categories' selections by (score at selection desc, index), each already in that order */
        double *pairs = malloc((size_t)*n_keep * 2 * sizeof(double));
        if (!pairs)
            goto done;
        for (int64_t i = 0; i < *n_keep; i++) {
            pairs[2 * i] = out_scores[i];
            pairs[2 * i + 1] = (double)keep[i]; /* exact: n < 2^31 */
        }
        qsort(pairs, (size_t)*n_keep, 2 * sizeof(double), by_score_then_index);
        for (int64_t i = 0; i < *n_keep; i++) {
            out_scores[i] = pairs[2 * i];
            keep[i] = (int64_t)pairs[2 * i + 1];
        }
        free(pairs);
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
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_nms_native", "Greedy (D)IoU-NMS, weighted NMS and Soft-NMS loops on the CPU.", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__nms_native(void) { return PyModule_Create(&module); }
