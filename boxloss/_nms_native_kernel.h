/* Greedy (D)IoU-NMS, weighted NMS and Soft-NMS on the boxes of one category: included twice by
 * _nms_native.c, with REAL = float, SUF = f32 and REAL = double, SUF = f64.
 *
 * Values are computed in REAL with the operations of boxloss.nms._value_columns in the same order
 * (compiled with -ffp-contract=off and without -ffast-math), so they equal the torch path's bit for
 * bit, and compared with the threshold as exact real numbers (a float is widened to double exactly).
 */

#define CAT2_(a, b) a##_##b
#define CAT2(a, b) CAT2_(a, b)
#define F(name) CAT2(name, SUF)

/* torch.minimum / torch.maximum: NaN wins (only the dense path of negative thresholds meets NaN) */
static inline REAL F(nan_min)(REAL a, REAL b) { return a != a ? a : (b != b ? b : (a < b ? a : b)); }
static inline REAL F(nan_max)(REAL a, REAL b) { return a != a ? a : (b != b ? b : (a > b ? a : b)); }

/* (x).clamp(min=0), NaN kept */
static inline REAL F(clamp0)(REAL x) { return x < 0 ? (REAL)0 : x; }

static inline REAL F(area)(const REAL *b) { return F(clamp0)(b[2] - b[0]) * F(clamp0)(b[3] - b[1]); }

/* IoU(a, b) - (rho^2 / c^2) ** beta, as _value_columns: torchvision's IoU inter / (area_a + area_b -
 * inter), then the distance penalty. Symmetric in (a, b) bit for bit. nan_safe: NaN-propagating
 * min/max (constant at every call site, so the compiler drops the branch). */
static inline REAL F(value)(const REAL *a, REAL a_area, const REAL *b, REAL b_area, const struct value_params *vp,
                            int nan_safe) {
    REAL iw, ih, inter, iou, cw, ch, c2, dx, dy, r;
    if (nan_safe) {
        iw = F(nan_min)(a[2], b[2]) - F(nan_max)(a[0], b[0]);
        ih = F(nan_min)(a[3], b[3]) - F(nan_max)(a[1], b[1]);
    } else {
        iw = (a[2] < b[2] ? a[2] : b[2]) - (a[0] > b[0] ? a[0] : b[0]);
        ih = (a[3] < b[3] ? a[3] : b[3]) - (a[1] > b[1] ? a[1] : b[1]);
    }
    inter = F(clamp0)(iw) * F(clamp0)(ih);
    iou = inter / (a_area + b_area - inter);
    if (!vp->distance)
        return iou;
    if (nan_safe) {
        cw = F(nan_max)(a[2], b[2]) - F(nan_min)(a[0], b[0]);
        ch = F(nan_max)(a[3], b[3]) - F(nan_min)(a[1], b[1]);
    } else {
        cw = (a[2] > b[2] ? a[2] : b[2]) - (a[0] < b[0] ? a[0] : b[0]);
        ch = (a[3] > b[3] ? a[3] : b[3]) - (a[1] < b[1] ? a[1] : b[1]);
    }
    c2 = cw * cw + ch * ch; /* squared diagonal of the enclosing box */
    dx = (b[0] + b[2]) - (a[0] + a[2]); /* twice the centre offset */
    dy = (b[1] + b[3]) - (a[1] + a[3]);
    r = (dx * dx + dy * dy) * (REAL)0.25 / c2;
    switch (vp->pow_mode) { /* torch's pow(Tensor, Scalar) special cases */
    case POW_SQRT:
        r = (REAL)sqrt(r); /* correctly rounded (torch's CPU sqrt, MKL's, is within 1 ulp) */
        break;
    case POW_SQUARE:
        r = r * r;
        break;
    case POW_CUBE:
        r = r * r * r;
        break;
    case POW_GENERAL:
        r = (REAL)pow((double)r, vp->beta); /* torch's scalar loop: std::pow(base, double exponent) */
        break;
    default:
        break;
    }
    return iou - r;
}

/* The valid boxes of a segment in rank order (l*), and by cell (s*). Boxes are split into size levels
 * (powers of two of max(w, h)), each with a uniform grid over the corners (x1, y1) of its boxes;
 * cells are numbered level by level, row-major, so the cells of one grid row that a query window
 * covers are one contiguous run of positions, whose kept (alive) boxes are the set bits of that
 * run. A level's own widths bound how far left of a box its boxes can start. */
struct F(seg) {
    REAL *lb, *la; /* [V, 4], [V] rank order */
    REAL *sb, *sa; /* [V, 4], [V] by cell */
    int32_t *lp;   /* local -> the caller's position (rank position, or index for Soft-NMS) */
    int32_t *pos_of, *srank; /* local -> position by cell, and back */
    int32_t *level_of; /* local -> size level */
    int32_t *cell_of, *cell_start, *cursor; /* [V], [cells + 1], [cells] */
    uint64_t *bits;
    int32_t *klist;
    struct levels lv;
};

static int F(seg_alloc)(struct F(seg) *s, int64_t n) {
    size_t nn = (size_t)(n > 0 ? n : 1), cells = 2 * nn + MAX_LEVELS * GRID_EXTRA_CELLS + 1;
    memset(s, 0, sizeof *s);
    s->lb = malloc(nn * 4 * sizeof(REAL));
    s->la = malloc(nn * sizeof(REAL));
    s->sb = malloc(nn * 4 * sizeof(REAL));
    s->sa = malloc(nn * sizeof(REAL));
    s->lp = malloc(nn * sizeof(int32_t));
    s->pos_of = malloc(nn * sizeof(int32_t));
    s->srank = malloc(nn * sizeof(int32_t));
    s->level_of = malloc(nn * sizeof(int32_t));
    s->klist = malloc(nn * sizeof(int32_t));
    s->cell_of = malloc(nn * sizeof(int32_t));
    s->cell_start = malloc(cells * sizeof(int32_t));
    s->cursor = malloc(cells * sizeof(int32_t));
    s->bits = malloc(((nn + 63) / 64) * sizeof(uint64_t));
    return s->lb && s->la && s->sb && s->sa && s->lp && s->pos_of && s->srank && s->level_of && s->klist &&
           s->cell_of && s->cell_start && s->cursor && s->bits;
}

static void F(seg_free)(struct F(seg) *s) {
    free(s->lb), free(s->la), free(s->sb), free(s->sa), free(s->lp), free(s->pos_of), free(s->srank);
    free(s->level_of), free(s->klist), free(s->cell_of), free(s->cell_start), free(s->cursor), free(s->bits);
}

/* Levels and grids of the v valid boxes of s (cells of about GRID_FACTOR x the level's mean box size,
 * at most 2 count + GRID_EXTRA_CELLS per level; one level below LEVELS_MIN_BOXES boxes, where the
 * extra windows per query cost more than the candidates they save); counting-sorts the boxes by
 * cell into sb, sa, pos_of, srank; clears the bitset. */
static void F(seg_grid)(struct F(seg) *s, int64_t v) {
    struct levels *L = &s->lv;
    int emin = 0, emax = 0;
    for (int64_t i = 0; v >= LEVELS_MIN_BOXES && i < v; i++) {
        const REAL *b = s->lb + 4 * i;
        int e = size_exponent((double)b[2] - (double)b[0], (double)b[3] - (double)b[1]);
        s->level_of[i] = e;
        emin = i == 0 || e < emin ? e : emin;
        emax = i == 0 || e > emax ? e : emax;
    }
    levels_init(L, emin, emax);
    for (int64_t i = 0; i < v; i++) {
        const REAL *b = s->lb + 4 * i;
        int g = L->n > 1 ? levels_index(L, s->level_of[i]) : 0;
        s->level_of[i] = g;
        level_add(&L->lv[g], b[0], b[1], b[2], b[3]);
    }
    int64_t cells = levels_grids(L);
    memset(s->cell_start, 0, (size_t)(cells + 1) * sizeof(int32_t));
    for (int64_t i = 0; i < v; i++) {
        const struct level *l = &L->lv[s->level_of[i]];
        int64_t c = l->base + grid_cell_y(&l->g, s->lb[4 * i + 1]) * l->g.nx + grid_cell_x(&l->g, s->lb[4 * i]);
        s->cell_of[i] = (int32_t)c;
        s->cell_start[c + 1]++;
    }
    for (int64_t c = 0; c < cells; c++) {
        s->cell_start[c + 1] += s->cell_start[c];
        s->cursor[c] = s->cell_start[c];
    }
    for (int64_t i = 0; i < v; i++) {
        int32_t p = s->cursor[s->cell_of[i]]++;
        s->pos_of[i] = p;
        s->srank[p] = (int32_t)i;
        memcpy(s->sb + 4 * (int64_t)p, s->lb + 4 * i, 4 * sizeof(REAL));
        s->sa[p] = s->la[i];
    }
    memset(s->bits, 0, (size_t)((v + 63) / 64) * sizeof(uint64_t));
}

/* Greedy NMS of the boxes at rank positions P[0..m) (ascending) of one category, threshold t >= 0.
 * Sets kept[p]; owner[p] (when not NULL) is the rank position of the kept box whose cluster p joins:
 * the best-ranked kept box that suppresses it (itself when kept). */
static void F(greedy_segment)(const struct nms_job *job, struct F(seg) *s, const int32_t *P, int64_t m) {
    const REAL *boxes = (const REAL *)job->boxes;
    const struct value_params *vp = &job->vp;
    const double t = job->t;
    uint8_t *kept = job->kept;
    int32_t *owner = job->owner;
    int64_t v = 0;
    double min_area = INFINITY;
    for (int64_t i = 0; i < m; i++) {
        int32_t p = P[i];
        const REAL *b = boxes + 4 * (int64_t)job->rank[p];
        REAL a = F(area)(b);
        if (a > 0 && a < (REAL)INFINITY) {
            memcpy(s->lb + 4 * v, b, 4 * sizeof(REAL));
            s->la[v] = a;
            s->lp[v] = p;
            if ((double)a < min_area)
                min_area = a;
            v++;
        } else { /* zero or non-finite area: IoU 0 or NaN with every box, never suppresses or is suppressed */
            kept[p] = 1;
            if (owner)
                owner[p] = p;
        }
    }
    if (v <= SMALL_SEGMENT) { /* each box against the kept boxes, in rank order */
        int64_t nk = 0;
        for (int64_t i = 0; i < v; i++) {
            const REAL *q = s->lb + 4 * i;
            int32_t found = -1;
            for (int64_t c = 0; c < nk; c++) {
                int32_t k = s->klist[c];
                const REAL *kb = s->lb + 4 * (int64_t)k;
                if (kb[0] < q[2] && kb[2] > q[0] && kb[1] < q[3] && kb[3] > q[1] &&
                    (double)F(value)(kb, s->la[k], q, s->la[i], vp, 0) > t) {
                    found = k;
                    break;
                }
            }
            int32_t p = s->lp[i];
            if (found < 0) {
                s->klist[nk++] = (int32_t)i;
                kept[p] = 1;
                if (owner)
                    owner[p] = p;
            } else if (owner) {
                owner[p] = s->lp[found];
            }
        }
        return;
    }
    /* Pruning threshold t' < t, as in nms.py: IoU > t' forces the x-ranges to overlap by more than
     * t' max(w_q, w_k), so a kept box k can only suppress q when
     *   x1_q - (1 - t') min(max kept width, w_q / t') < x1_k < x2_q - t' w_q,
     * likewise in y. Tiny thresholds or areas: plain overlap (t' = 0), which holds for any computed
     * IoU > 0. The bounds are computed in double, widened by far more than their rounding. */
    double tp = t * (1 - PRUNE_SLACK);
    if (t < 0x1p-20 || min_area < (sizeof(REAL) == 8 ? 0x1p-900 : 0x1p-100))
        tp = 0;
    F(seg_grid)(s, v);
    const struct levels *L = &s->lv;
    uint64_t *bits = s->bits;
    double kept_w[MAX_LEVELS] = {0}, kept_h[MAX_LEVELS] = {0}; /* widest kept box per level (0: none) */
    for (int64_t i = 0; i < v; i++) {
        int64_t pos = s->pos_of[i];
        const REAL *q = s->sb + 4 * pos;
        REAL qa = s->sa[pos];
        double qx1 = q[0], qy1 = q[1], qx2 = q[2], qy2 = q[3], wq = qx2 - qx1, hq = qy2 - qy1;
        int g0 = 0, g1 = L->n - 1;
        if (tp > 0 && g1 > 0) { /* IoU > t' also bounds the size: t' max(w_q, h_q) < max(w_k, h_k) < max(w_q, h_q) / t' */
            double mq = wq > hq ? wq : hq;
            g0 = levels_of_size(L, tp * mq * (1 - 0x1p-40));
            g1 = levels_of_size(L, mq / tp * (1 + 0x1p-40));
        }
        int32_t found = -1; /* local rank of the suppressing kept box */
        for (int gi = g0; gi <= g1; gi++) {
            if (kept_w[gi] == 0)
                continue;
            const struct level *l = &L->lv[gi];
            double reach_x = kept_w[gi], reach_y = kept_h[gi];
            if (tp > 0 && wq / tp < reach_x)
                reach_x = wq / tp;
            if (tp > 0 && hq / tp < reach_y)
                reach_y = hq / tp;
            double sx = (fabs(qx1) + fabs(qx2) + reach_x) * 0x1p-40, sy = (fabs(qy1) + fabs(qy2) + reach_y) * 0x1p-40;
            int64_t cx0 = grid_cell_x(&l->g, qx1 - (1 - tp) * reach_x - sx);
            int64_t cx1 = grid_cell_x(&l->g, qx2 - tp * wq + sx);
            int64_t cy0 = grid_cell_y(&l->g, qy1 - (1 - tp) * reach_y - sy);
            int64_t cy1 = grid_cell_y(&l->g, qy2 - tp * hq + sy);
            for (int64_t cy = cy0; cy <= cy1; cy++) {
                int64_t row = l->base + cy * l->g.nx;
                int64_t plo = s->cell_start[row + cx0], phi = s->cell_start[row + cx1 + 1];
                for (int64_t w = plo >> 6; plo < phi && w <= (phi - 1) >> 6; w++) {
                    uint64_t word = bits[w];
                    if (w == plo >> 6)
                        word &= ~0ULL << (plo & 63);
                    if (w == (phi - 1) >> 6)
                        word &= ~0ULL >> (63 - ((phi - 1) & 63));
                    while (word) {
                        int64_t k = (w << 6) | __builtin_ctzll(word);
                        word &= word - 1;
                        const REAL *kb = s->sb + 4 * k;
                        if (kb[0] < q[2] && kb[2] > q[0] && kb[1] < q[3] && kb[3] > q[1] &&
                            (found < 0 || s->srank[k] < found) && (double)F(value)(kb, s->sa[k], q, qa, vp, 0) > t) {
                            found = s->srank[k];
                            if (!owner)
                                goto decided; /* any suppressor will do */
                        }
                    }
                }
            }
        }
    decided:;
        int32_t p = s->lp[i];
        if (found < 0) {
            int gi = s->level_of[i];
            bits[pos >> 6] |= 1ULL << (pos & 63);
            kept_w[gi] = wq > kept_w[gi] ? wq : kept_w[gi];
            kept_h[gi] = hq > kept_h[gi] ? hq : kept_h[gi];
            kept[p] = 1;
            if (owner)
                owner[p] = p;
        } else if (owner) {
            owner[p] = s->lp[found];
        }
    }
}

/* Greedy NMS for a negative threshold (disjoint boxes suppress): every box of the category against
 * every kept box, as the dense torch path; boxes of any area take part. */
static void F(dense_segment)(const struct nms_job *job, struct F(seg) *s, const int32_t *P, int64_t m) {
    const REAL *boxes = (const REAL *)job->boxes;
    int64_t nk = 0;
    for (int64_t i = 0; i < m; i++) {
        int32_t p = P[i];
        const REAL *q = boxes + 4 * (int64_t)job->rank[p];
        REAL qa = F(area)(q);
        int32_t found = -1;
        for (int64_t c = 0; c < nk; c++) {
            int32_t pk = s->klist[c];
            if ((double)F(value)(boxes + 4 * (int64_t)job->rank[pk], s->la[c], q, qa, &job->vp, 1) > job->t) {
                found = pk;
                break;
            }
        }
        if (found < 0) {
            s->la[nk] = qa;
            s->klist[nk++] = p;
            job->kept[p] = 1;
            if (job->owner)
                job->owner[p] = p;
        } else if (job->owner) {
            job->owner[p] = found;
        }
    }
}

/* kept[] and owner[] over all segments; then the merged boxes of weighted NMS. 0, or -1 (no memory). */
static int F(nms_run)(const struct nms_job *job) {
    struct F(seg) s;
    if (!F(seg_alloc)(&s, job->max_segment)) {
        F(seg_free)(&s);
        return -1;
    }
    for (int64_t g = 0; g < job->n_segments; g++) {
        const int32_t *P = job->seg_pos + job->seg_start[g];
        int64_t m = job->seg_start[g + 1] - job->seg_start[g];
        if (job->t < 0)
            F(dense_segment)(job, &s, P, m);
        else
            F(greedy_segment)(job, &s, P, m);
    }
    F(seg_free)(&s);
    return 0;
}

/* Score-weighted mean of each kept box's cluster, written to merged [K, 4] in keep order:
 * b_i + sum_j w_j (b_j - b_i) / sum_j w_j over the cluster (itself included), in double: a cluster of
 * one box returns the box exactly, and the mean does not lose the digits of far-from-origin boxes. */
static int F(merge_clusters)(const struct nms_job *job, const double *w, void *merged_out) {
    const REAL *boxes = (const REAL *)job->boxes;
    REAL *merged = (REAL *)merged_out;
    int64_t n = job->n;
    double *acc = calloc((size_t)(n > 0 ? n : 1) * 5, sizeof(double)); /* per rank position: 4 sums, weight */
    int32_t *members = calloc((size_t)(n > 0 ? n : 1), sizeof(int32_t));
    if (!acc || !members) {
        free(acc), free(members);
        return -1;
    }
    for (int64_t p = 0; p < n; p++) {
        int32_t o = job->owner[p];
        if (o == p)
            continue;
        const REAL *b = boxes + 4 * (int64_t)job->rank[p], *bo = boxes + 4 * (int64_t)job->rank[o];
        double wj = w[job->rank[p]];
        for (int c = 0; c < 4; c++)
            acc[5 * (int64_t)o + c] += wj * ((double)b[c] - (double)bo[c]);
        acc[5 * (int64_t)o + 4] += wj;
        members[o]++;
    }
    int64_t k = 0;
    for (int64_t p = 0; p < n; p++) {
        if (!job->kept[p])
            continue;
        const REAL *bo = boxes + 4 * (int64_t)job->rank[p];
        double total = w[job->rank[p]] + acc[5 * p + 4];
        for (int c = 0; c < 4; c++)
            merged[4 * k + c] = members[p] && total != 0 ? (REAL)((double)bo[c] + acc[5 * p + c] / total) : bo[c];
        k++;
    }
    free(acc), free(members);
    return 0;
}

/* Soft-NMS on the boxes at indices P[0..m) (ascending) of one category; appends the selections
 * (index, score at selection) to out_idx / out_score from *n_out on. 0, or -1 (no memory). */
static void F(soft_segment)(const struct soft_job *job, struct F(seg) *s, const int32_t *P, int64_t m, double *cur,
                            struct iheap *H, int64_t *out_idx, double *out_score, int64_t *n_out) {
    const REAL *boxes = (const REAL *)job->boxes;
    int64_t v = 0;
    /* local index l: P[l]; candidates have current score >= score_threshold (NaN never) */
    for (int64_t l = 0; l < m; l++) {
        double sc = score_at(job->scores, job->scores_bits, P[l]);
        cur[l] = sc;
        H->pos[l] = -1;
        if (!(sc >= job->score_threshold))
            continue;
        H->h[H->size++] = (int32_t)l;
        const REAL *b = boxes + 4 * (int64_t)P[l];
        REAL a = F(area)(b);
        if (a > 0 && a < (REAL)INFINITY) { /* others have IoU 0 or NaN (o = 0) with every box */
            memcpy(s->lb + 4 * v, b, 4 * sizeof(REAL));
            s->la[v] = a;
            s->lp[v] = (int32_t)l;
            v++;
        }
    }
    if (v > 0)
        F(seg_grid)(s, v);
    for (int64_t l = 0; l < m; l++)
        s->pos_of[l] = -1; /* not in the grid (also: none of this category is) */
    if (v > 0) {
        for (int64_t p = 0; p < v; p++) {
            int32_t l = s->lp[s->srank[p]];
            s->pos_of[l] = (int32_t)p; /* now: category-local index -> position by cell */
            s->srank[p] = l;           /* and back */
            s->bits[p >> 6] |= 1ULL << (p & 63); /* alive */
        }
    }
    ih_build(H);
    while (H->size > 0) {
        int32_t l = H->h[0];
        ih_remove(H, l);
        out_idx[*n_out] = P[l];
        out_score[*n_out] = cur[l];
        (*n_out)++;
        int64_t pos = s->pos_of[l];
        if (pos < 0)
            continue;
        s->bits[pos >> 6] &= ~(1ULL << (pos & 63));
        const REAL *q = s->sb + 4 * pos;
        REAL qa = s->sa[pos];
        /* the boxes overlapping q: per level, x1 in (x1_q - the level's max width, x2_q), likewise y */
        double qx1 = q[0], qy1 = q[1], qx2 = q[2], qy2 = q[3];
        for (int gi = 0; gi < s->lv.n; gi++) {
            const struct level *lv = &s->lv.lv[gi];
            if (lv->count == 0)
                continue;
            double sx = (fabs(qx1) + fabs(qx2) + lv->max_w) * 0x1p-40, sy = (fabs(qy1) + fabs(qy2) + lv->max_h) * 0x1p-40;
            int64_t cx0 = grid_cell_x(&lv->g, qx1 - lv->max_w - sx), cx1 = grid_cell_x(&lv->g, qx2 + sx);
            int64_t cy0 = grid_cell_y(&lv->g, qy1 - lv->max_h - sy), cy1 = grid_cell_y(&lv->g, qy2 + sy);
            for (int64_t cy = cy0; cy <= cy1; cy++) {
                int64_t row = lv->base + cy * lv->g.nx;
                int64_t plo = s->cell_start[row + cx0], phi = s->cell_start[row + cx1 + 1];
                for (int64_t w = plo >> 6; plo < phi && w <= (phi - 1) >> 6; w++) {
                    uint64_t word = s->bits[w];
                    if (w == plo >> 6)
                        word &= ~0ULL << (plo & 63);
                    if (w == (phi - 1) >> 6)
                        word &= ~0ULL >> (63 - ((phi - 1) & 63));
                    while (word) {
                        int64_t k = (w << 6) | __builtin_ctzll(word);
                        word &= word - 1;
                        const REAL *kb = s->sb + 4 * k;
                        if (!(kb[0] < q[2] && kb[2] > q[0] && kb[1] < q[3] && kb[3] > q[1]))
                            continue;
                        double o = (double)F(value)(q, qa, kb, s->sa[k], &job->vp, 0);
                        double f = decay(job, o);
                        if (f == 1.0)
                            continue;
                        int32_t lk = s->srank[k];
                        cur[lk] *= f;
                        if (!(cur[lk] >= job->score_threshold)) {
                            ih_remove(H, lk);
                            s->bits[k >> 6] &= ~(1ULL << (k & 63));
                        } else {
                            ih_update(H, lk); /* f < 1 lowers a positive score, raises a negative one */
                        }
                    }
                }
            }
        }
    }
}

static int F(soft_run)(const struct soft_job *job, int64_t *out_idx, double *out_score, int64_t *n_out) {
    struct F(seg) s;
    int64_t mm = job->max_segment > 0 ? job->max_segment : 1;
    double *cur = malloc((size_t)mm * sizeof(double));
    struct iheap H = {malloc((size_t)mm * sizeof(int32_t)), malloc((size_t)mm * sizeof(int32_t)), cur, 0};
    int rc = 0;
    if (!F(seg_alloc)(&s, job->max_segment) || !cur || !H.h || !H.pos)
        rc = -1;
    for (int64_t g = 0; rc == 0 && g < job->n_segments; g++) {
        const int32_t *P = job->seg_pos + job->seg_start[g];
        int64_t m = job->seg_start[g + 1] - job->seg_start[g];
        H.size = 0;
        F(soft_segment)(job, &s, P, m, cur, &H, out_idx, out_score, n_out);
    }
    F(seg_free)(&s);
    free(cur), free(H.h), free(H.pos);
    return rc;
}

#undef F
#undef CAT2
#undef CAT2_
