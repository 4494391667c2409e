/* The per-pair IoU-family kernels for one floating type; included by _native.c once per type with
 * REAL (float or double), SUF (name suffix), LOG and TINY (the smallest normal number) defined.
 *
 * Every line mirrors an op of the eager kernel (boxloss/_kernels.py, _chunk and _backward), in the
 * same order, so both follow the same tie and subgradient rules and round alike (see the Python
 * module for the derivation). The gradient is that of -L with respect to
 * q = (-x1, -y1, x2, y2), one row per coordinate: pred lo (x, y), [target lo (x, y),] pred hi (x, y).
 */

#define CAT_(a, b) a##_##b
#define CAT(a, b) CAT_(a, b)
#define FN(name) CAT(name, SUF)

static inline REAL FN(lerp)(REAL a, REAL b, REAL w) {
    /* torch.lerp: exact at w = 0 and w = 1 (both sides computed, then selected: no branch) */
    const REAL lo = a + w * (b - a), hi = b - (b - a) * ((REAL)1 - w);
    return w < (REAL)0.5 ? lo : hi;
}

static inline REAL FN(sign)(REAL x) { return (x > 0 ? (REAL)1 : (REAL)0) - (x < 0 ? (REAL)1 : (REAL)0); }

static inline REAL FN(relu)(REAL x) { return x < 0 ? (REAL)0 : x; } /* clamp(min=0), NaN kept */

/* the coordinates of a block of pairs as columns: unit-stride loads for the vectorised loops */
struct FN(cols) {
    REAL x1[BLOCK], y1[BLOCK], x2[BLOCK], y2[BLOCK], X1[BLOCK], Y1[BLOCK], X2[BLOCK], Y2[BLOCK];
    const REAL *atp, *atg; /* CIoU: atan2(w, h) of pred and target */
};

/* one box's [m, 4] rows from s on as four columns */
static inline void FN(load_box)(const REAL *restrict B, int64_t s, int m, REAL *restrict c1, REAL *restrict c2,
                                REAL *restrict c3, REAL *restrict c4) {
    for (int j = 0; j < m; j++) {
        c1[j] = B[4 * (s + j)];
        c2[j] = B[4 * (s + j) + 1];
        c3[j] = B[4 * (s + j) + 2];
        c4[j] = B[4 * (s + j) + 3];
    }
}

static inline void FN(load_cols)(const REAL *P, const REAL *Q, int64_t s, int m, struct FN(cols) *c) {
    FN(load_box)(P, s, m, c->x1, c->y1, c->x2, c->y2);
    FN(load_box)(Q, s, m, c->X1, c->Y1, c->X2, c->Y2);
}

/* the aspect ratio w / h of clamped sizes, read so that atan gives atan2(w, h): torch.nan_to_num(
 * nan=0, posinf=inf, neginf=inf) as the eager kernel, for 0 / 0 (a point: angle 0) and w / -0 */
static inline REAL FN(ratio)(REAL w, REAL h) {
    const REAL r = w / h;
    return r != r ? (REAL)0 : (r == -(REAL)INFINITY ? (REAL)INFINITY : r);
}

/* CIoU's aspect ratios of the clamped sizes, pred into R[i], target into R[n + i]. Python takes
 * their atan with torch.atan (the eager kernel's angles bit for bit, and vectorised), and the
 * forward loop reads them back. */
static void FN(aspect_range)(const void *args, int64_t s, int64_t e) {
    const struct fwd_args *a = (const struct fwd_args *)args;
    const REAL *restrict P = (const REAL *)a->pred, *restrict Q = (const REAL *)a->target;
    REAL *restrict rp = (REAL *)a->atans, *restrict rg = (REAL *)a->atans + a->n;
    for (int64_t i = s; i < e; i++) {
        rp[i] = FN(ratio)(FN(relu)(P[4 * i + 2] - P[4 * i]), FN(relu)(P[4 * i + 3] - P[4 * i + 1]));
        rg[i] = FN(ratio)(FN(relu)(Q[4 * i + 2] - Q[4 * i]), FN(relu)(Q[4 * i + 3] - Q[4 * i + 1]));
    }
}

/* KIND and ROWS are compile-time constants at every call (always inlined), so each (kind, rows)
 * pair gets its own loop without the branches of the others; the other options enter as 0/1
 * factors and selects, which keep the loop free of branches (vectorised, nothing to mispredict). */
static inline __attribute__((always_inline)) void FN(forward_block)(
    const struct fwd_args *a, int m, const struct FN(cols) *restrict c, REAL *restrict loss,
    /* one restrict parameter per gradient row: for all the compiler knows of n, rows of one array
     * could overlap, which would keep it from vectorising */
    REAL *restrict plo_x, REAL *restrict plo_y, REAL *restrict phi_x, REAL *restrict phi_y,
    REAL *restrict tlo_x, REAL *restrict tlo_y, const int KIND, const int ROWS) {
    const REAL eps = (REAL)a->eps, one = 1, half = (REAL)0.5, zero = 0;
    const REAL k4 = (REAL)K4, two_k4 = (REAL)(2 * K4);
    const int logmode = a->log, paper = a->paper;
    const REAL ungated = a->gated ? zero : one, tiny = TINY;
    const int box = KIND != KIND_IOU, centre = KIND == KIND_DIOU || KIND == KIND_CIOU, ciou = KIND == KIND_CIOU;

    for (int i = 0; i < m; i++) {
        const REAL x1 = c->x1[i], y1 = c->y1[i], x2 = c->x2[i], y2 = c->y2[i];
        const REAL X1 = c->X1[i], Y1 = c->Y1[i], X2 = c->X2[i], Y2 = c->Y2[i];
        /* phase 1: sizes (unclamped), intersection and enclosing box, edge differences */
        const REAL w = x2 - x1, h = y2 - y1, wg = X2 - X1, hg = Y2 - Y1;
        const REAL iw = (x2 < X2 ? x2 : X2) - (x1 > X1 ? x1 : X1);
        const REAL ih = (y2 < Y2 ? y2 : Y2) - (y1 > Y1 ? y1 : Y1);
        REAL cw = 0, ch = 0;
        if (box) {
            cw = (x2 > X2 ? x2 : X2) - (x1 < X1 ? x1 : X1);
            ch = (y2 > Y2 ? y2 : Y2) - (y1 < Y1 ? y1 : Y1);
        }
        const REAL dx1 = x1 - X1, dy1 = y1 - Y1, dx2 = x2 - X2, dy2 = y2 - Y2;

        /* phase 2: values */
        const REAL wc = FN(relu)(w), hc = FN(relu)(h), wgc = FN(relu)(wg), hgc = FN(relu)(hg);
        const REAL iwc = FN(relu)(iw), ihc = FN(relu)(ih);
        const REAL a1 = wc * hc, a2 = wgc * hgc, inter = iwc * ihc;
        const REAL uni = (a1 + a2) - inter;
        const REAL ue = uni + eps;
        const REAL iou = inter / ue;
        REAL metric = iou, area_c = 0, ace = 0, c2 = 0, hcx = 0, hcy = 0, dterm = 0;
        REAL delta = 0, alpha = 0;
        if (KIND == KIND_GIOU) {
            area_c = cw * ch;
            ace = area_c + eps;
            metric = iou - (area_c - uni) / ace;
        }
        if (centre) {
            c2 = (cw * cw + ch * ch) + eps;
            hcx = (dx1 + dx2) * -half;
            hcy = (dy1 + dy2) * -half;
            dterm = (hcx * hcx + hcy * hcy) / c2;
            metric = iou - dterm;
            if (ciou) {
                delta = c->atg[i] - c->atp[i];
                const REAL v = (delta * delta) * k4;
                alpha = v / (((one - iou) + v) + eps);
                alpha = alpha * (iou > half ? one : ungated);
                metric = metric - alpha * v;
            }
        }
        const REAL lg0 = iou + eps;
        const REAL lg = lg0 > one ? one : lg0; /* torch.clamp(max=1), NaN kept: the log loss is >= 0 */
        const REAL below = lg < one ? one : zero; /* no log-loss gradient where the cap holds */
        loss[i] = logmode ? lg : one - metric; /* log mode: -log(lg) after the loop */
        if (ROWS == 0)
            continue;

        /* phase 3: gradient of -L */
        REAL r, m_u, rc = 0;
        if (KIND == KIND_GIOU) {
            r = one / ue;
            rc = one / ace;
            m_u = rc - iou * r;
        } else {
            r = one / ue;
            r = logmode ? (r / lg) * below : r;
            m_u = zero - iou * r;
        }
        const REAL m_i = r - m_u;
        REAL gex = 0, gey = 0, grx = 0, gry = 0;
        if (KIND == KIND_GIOU) {
            const REAL g_c = zero - (ue * rc) * rc;
            gex = ch * g_c;
            gey = cw * g_c;
        } else if (centre) {
            const REAL r2 = one / c2;
            const REAL g_c = 2 * dterm * r2;
            gex = cw * g_c;
            gey = ch * g_c;
            grx = hcx * r2;
            gry = hcy * r2;
        }
        /* subgradients: the intersection's area mask, and one per box for the clamps of its sizes,
         * which pass the gradient at exactly 0 (min(w, h) >= 0; see the eager kernel) */
        REAL mi = inter > 0 ? one : zero;
        const REAL vp = ((w >= zero) & (h >= zero)) ? one : zero, vg = ((wg >= zero) & (hg >= zero)) ? one : zero;
        REAL gwp, ghp, gwg, ghg, giw, gih;
        if (ciou) {
            const REAL cf = delta * alpha;
            /* d atan2(w, h)/d(w, h) = (h, -w) / (w^2 + h^2), clamped like torch.clamp(min=tiny) */
            REAL dp = hc * hc + wc * wc, dg = hgc * hgc + wgc * wgc;
            dp = dp < tiny ? tiny : dp;
            dg = dg < tiny ? tiny : dg;
            const REAL aqp = paper ? cf * two_k4 : cf / dp * two_k4;
            const REAL aqg = paper ? cf * -two_k4 : cf / dg * -two_k4;
            gwp = (hc * aqp + hc * m_u) * vp;
            gwg = (hgc * aqg + hgc * m_u) * vg;
            ghp = ((m_u - aqp) * wc) * vp;
            ghg = ((m_u - aqg) * wgc) * vg;
            mi = mi * m_i;
            giw = ihc * mi;
            gih = iwc * mi;
        } else {
            const REAL q0 = vp * m_u, q1 = vg * m_u, q2 = mi * m_i;
            gwp = hc * q0;
            ghp = wc * q0;
            gwg = hgc * q1;
            ghg = wgc * q1;
            giw = ihc * q2;
            gih = iwc * q2;
        }
        /* the prediction's weight in the intersection's edges: 1, 0 or 1/2 at a tie */
        const REAL wix = half + half * FN(sign)(dx1), wiy = half + half * FN(sign)(dy1);
        const REAL wjx = half + -half * FN(sign)(dx2), wjy = half + -half * FN(sign)(dy2);
        REAL t0x, t0y, t1x, t1y;
        if (box) {
            t0x = FN(lerp)(gex, giw, wix);
            t0y = FN(lerp)(gey, gih, wiy);
            t1x = FN(lerp)(gex, giw, wjx);
            t1y = FN(lerp)(gey, gih, wjy);
        } else {
            t0x = giw * wix;
            t0y = gih * wiy;
            t1x = giw * wjx;
            t1y = gih * wjy;
        }
        plo_x[i] = t0x + (gwp - grx);
        plo_y[i] = t0y + (ghp - gry);
        phi_x[i] = t1x + (gwp + grx);
        phi_y[i] = t1y + (ghp + gry);
        if (ROWS == 6) { /* the target's lo rows; its hi rows follow in backward */
            REAL ux, uy;
            if (box) {
                ux = FN(lerp)(giw, gex, wix);
                uy = FN(lerp)(gih, gey, wiy);
            } else {
                ux = (one - wix) * giw;
                uy = (one - wiy) * gih;
            }
            tlo_x[i] = (ux + grx) + gwg;
            tlo_y[i] = (uy + gry) + ghg;
        }
    }
}

static inline __attribute__((always_inline)) void FN(forward_loop)(const struct fwd_args *a, int64_t s, int64_t e,
                                                                    const int KIND, const int ROWS) {
    struct FN(cols) c;
    REAL *loss = (REAL *)a->loss;
    for (int64_t b = s; b < e; b += BLOCK) {
        const int m = (int)(b + BLOCK < e ? BLOCK : e - b);
        FN(load_cols)((const REAL *)a->pred, (const REAL *)a->target, b, m, &c);
        if (KIND == KIND_CIOU) {
            c.atp = (const REAL *)a->atans + b;
            c.atg = (const REAL *)a->atans + a->n + b;
        }
        REAL *g = (REAL *)a->grad + b;
        const int64_t n = a->n;
        if (ROWS)
            FN(forward_block)(a, m, &c, loss + b, g, g + n, g + (ROWS - 2) * n, g + (ROWS - 1) * n,
                              ROWS == 6 ? g + 2 * n : NULL, ROWS == 6 ? g + 3 * n : NULL, KIND, ROWS);
        else
            FN(forward_block)(a, m, &c, loss + b, NULL, NULL, NULL, NULL, NULL, NULL, KIND, ROWS);
        if (KIND == KIND_IOU && a->log)
            for (int64_t i = b; i < b + m; i++)
                loss[i] = -LOG(loss[i]);
    }
}

static void FN(forward_range)(const void *args, int64_t s, int64_t e) {
    const struct fwd_args *a = (const struct fwd_args *)args;
#define CASE(K)                                                                                   \
    case K:                                                                                       \
        if (a->rows == 0)                                                                         \
            FN(forward_loop)(a, s, e, K, 0);                                                      \
        else if (a->rows == 4)                                                                    \
            FN(forward_loop)(a, s, e, K, 4);                                                      \
        else                                                                                      \
            FN(forward_loop)(a, s, e, K, 6);                                                      \
        break;
    switch (a->kind) {
        CASE(KIND_IOU)
        CASE(KIND_GIOU)
        CASE(KIND_DIOU)
        CASE(KIND_CIOU)
    }
#undef CASE
}

/* dL/d(pred), dL/d(target) as [n, 4] from the saved rows and the incoming gradient (stride gs) */
static void FN(backward_range)(const void *args, int64_t s, int64_t e) {
    const struct bwd_args *a = (const struct bwd_args *)args;
    const REAL *restrict G = (const REAL *)a->grad, *restrict go = (const REAL *)a->grad_out;
    REAL *restrict gp = (REAL *)a->grad_pred, *restrict gt = (REAL *)a->grad_target;
    const int64_t n = a->n, gs = a->go_stride;
    const int rows = a->rows;
    const REAL *restrict g0 = G, *restrict g1 = G + n, *restrict g2 = G + 2 * n, *restrict g3 = G + 3 * n;
    const REAL *restrict ghx = G + (rows - 2) * n, *restrict ghy = G + (rows - 1) * n;
    for (int64_t i = s; i < e; i++) {
        const REAL o = go[i * gs];
        const REAL p0 = g0[i] * o, p1 = g1[i] * o;
        const REAL p2 = (REAL)0 + -(ghx[i] * o), p3 = (REAL)0 + -(ghy[i] * o);
        gp[4 * i] = p0;
        gp[4 * i + 1] = p1;
        gp[4 * i + 2] = p2;
        gp[4 * i + 3] = p3;
        if (gt) {
            const REAL t0 = g2[i] * o, t1 = g3[i] * o;
            gt[4 * i] = t0;
            gt[4 * i + 1] = t1;
            gt[4 * i + 2] = -((p0 + p2) + t0); /* the four x-gradients of a pair sum to 0 */
            gt[4 * i + 3] = -((p1 + p3) + t1);
        }
    }
}

#undef FN
#undef CAT
#undef CAT_
