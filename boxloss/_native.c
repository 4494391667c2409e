/* boxloss._native: fused CPU loops for the IoU-family losses of matched box pairs.
 *
 * One pass per pair computes the loss and the gradient of both boxes (the same formulas, in the same
 * order, as the eager kernel in _kernels.py); a second pass in backward scales the saved gradient
 * rows by the incoming gradient and writes the [N, 4] gradients. Plain C against the CPython API:
 * no PyTorch headers, so it builds in a second with any C compiler; Python hands over data pointers
 * of contiguous tensors it keeps alive, and the loops run on pthreads with the GIL released.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <float.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#define KIND_IOU 0
#define KIND_GIOU 1
#define KIND_DIOU 2
#define KIND_CIOU 3
#define K4 0.40528473456935108577551785283891 /* 4 / pi^2 */
#define MAX_THREADS 256
#define BLOCK 256 /* pairs per block: its coordinate columns (and CIoU atans) stay in L1 */
#define MIN_PAIRS_PER_THREAD 16384 /* below this a thread costs more than it saves */

struct fwd_args {
    const void *pred, *target;
    void *loss, *grad;
    void *atans; /* CIoU: [2, n] aspect ratios, then (after torch.atan) their angles */
    int64_t n;
    double eps;
    int kind, rows, log, paper, gated;
};

struct bwd_args {
    const void *grad, *grad_out;
    void *grad_pred, *grad_target;
    int64_t n, go_stride;
    int rows;
};

#define REAL float
#define SUF f32
#define LOG logf
#define TINY FLT_MIN
#include "_native_kernel.h"
#undef REAL
#undef SUF
#undef LOG
#undef TINY

#define REAL double
#define SUF f64
#define LOG log
#define TINY DBL_MIN
#include "_native_kernel.h"
#undef REAL
#undef SUF
#undef LOG
#undef TINY

typedef void (*range_fn)(const void *args, int64_t s, int64_t e);

struct job {
    range_fn fn;
    const void *args;
    int64_t s, e;
};

static void *run_job(void *p) {
    struct job *j = (struct job *)p;
    j->fn(j->args, j->s, j->e);
    return NULL;
}

/* fn over [0, n) split into contiguous ranges, one per thread (the caller runs the first). */
static void parallel_run(range_fn fn, const void *args, int64_t n, int threads) {
    int64_t most = n / MIN_PAIRS_PER_THREAD;
    if (threads > most)
        threads = (int)(most > 1 ? most : 1);
    if (threads > MAX_THREADS)
        threads = MAX_THREADS;
    if (threads <= 1) {
        fn(args, 0, n);
        return;
    }
    struct job jobs[MAX_THREADS];
    pthread_t tid[MAX_THREADS];
    int started[MAX_THREADS];
    int64_t step = (n + threads - 1) / threads;
    step = (step + 15) & ~(int64_t)15; /* ranges start on 64-byte boundaries of the rows */
    for (int k = 0; k < threads; k++) {
        int64_t s = k * step, e = s + step < n ? s + step : n;
        jobs[k] = (struct job){fn, args, s < n ? s : n, e};
        started[k] = 0;
    }
    for (int k = 1; k < threads; k++) {
        if (jobs[k].s >= jobs[k].e)
            continue;
        if (pthread_create(&tid[k], NULL, run_job, &jobs[k]) == 0)
            started[k] = 1;
    }
    fn(args, jobs[0].s, jobs[0].e);
    for (int k = 1; k < threads; k++) {
        if (started[k])
            pthread_join(tid[k], NULL);
        else if (jobs[k].s < jobs[k].e)
            run_job(&jobs[k]); /* could not start a thread: run its range here */
    }
}

/* fn over [0, n) on `threads` threads with the GIL released; then None */
static PyObject *run_released(range_fn fn, const void *args, int64_t n, int threads) {
    Py_BEGIN_ALLOW_THREADS
    parallel_run(fn, args, n, threads);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static int check_dtype(int dtype) {
    if (dtype != 32 && dtype != 64) {
        PyErr_Format(PyExc_ValueError, "dtype must be 32 or 64 (float32 or float64), got %d", dtype);
        return 0;
    }
    return 1;
}

static PyObject *py_forward(PyObject *self, PyObject *args) {
    struct fwd_args a;
    unsigned long long p, t, l, g, at;
    long long n;
    int dtype, threads;
    (void)self;
    if (!PyArg_ParseTuple(args, "iiKKKKKLdiiiii", &dtype, &a.kind, &p, &t, &l, &g, &at, &n, &a.eps, &a.rows,
                          &a.log, &a.paper, &a.gated, &threads))
        return NULL;
    if (!check_dtype(dtype))
        return NULL;
    if (a.kind < KIND_IOU || a.kind > KIND_CIOU) {
        PyErr_Format(PyExc_ValueError, "kind must be 0-3 (iou, giou, diou, ciou), got %d", a.kind);
        return NULL;
    }
    if (a.rows != 0 && a.rows != 4 && a.rows != 6) {
        PyErr_Format(PyExc_ValueError, "rows must be 0, 4 or 6, got %d", a.rows);
        return NULL;
    }
    if (n < 0 || !p || !t || !l || (a.rows && !g) || (a.kind == KIND_CIOU && !at)) {
        PyErr_SetString(PyExc_ValueError, "null pointer or negative length");
        return NULL;
    }
    a.atans = (void *)(uintptr_t)at;
    a.pred = (const void *)(uintptr_t)p;
    a.target = (const void *)(uintptr_t)t;
    a.loss = (void *)(uintptr_t)l;
    a.grad = (void *)(uintptr_t)g;
    a.n = n;
    return run_released(dtype == 32 ? forward_range_f32 : forward_range_f64, &a, n, threads);
}

static PyObject *py_aspect(PyObject *self, PyObject *args) {
    struct fwd_args a;
    unsigned long long p, t, at;
    long long n;
    int dtype, threads;
    (void)self;
    memset(&a, 0, sizeof a);
    if (!PyArg_ParseTuple(args, "iKKKLi", &dtype, &p, &t, &at, &n, &threads))
        return NULL;
    if (!check_dtype(dtype))
        return NULL;
    if (n < 0 || !p || !t || !at) {
        PyErr_SetString(PyExc_ValueError, "null pointer or negative length");
        return NULL;
    }
    a.pred = (const void *)(uintptr_t)p;
    a.target = (const void *)(uintptr_t)t;
    a.atans = (void *)(uintptr_t)at;
    a.n = n;
    return run_released(dtype == 32 ? aspect_range_f32 : aspect_range_f64, &a, n, threads);
}

static PyObject *py_backward(PyObject *self, PyObject *args) {
    struct bwd_args a;
    unsigned long long g, go, gp, gt;
    long long n, gs;
    int dtype, threads;
    (void)self;
    if (!PyArg_ParseTuple(args, "iKiKLKKLi", &dtype, &g, &a.rows, &go, &gs, &gp, &gt, &n, &threads))
        return NULL;
    if (!check_dtype(dtype))
        return NULL;
    if (a.rows != 4 && a.rows != 6) {
        PyErr_Format(PyExc_ValueError, "rows must be 4 or 6, got %d", a.rows);
        return NULL;
    }
    if (n < 0 || gs < 0 || !g || !go || !gp || (a.rows == 6 && !gt)) {
        PyErr_SetString(PyExc_ValueError, "null pointer, negative length or stride");
        return NULL;
    }
    a.grad = (const void *)(uintptr_t)g;
    a.grad_out = (const void *)(uintptr_t)go;
    a.grad_pred = (void *)(uintptr_t)gp;
    a.grad_target = a.rows == 6 ? (void *)(uintptr_t)gt : NULL;
    a.n = n;
    a.go_stride = gs;
    return run_released(dtype == 32 ? backward_range_f32 : backward_range_f64, &a, n, threads);
}

static PyMethodDef methods[] = {
    {"aspect", py_aspect, METH_VARARGS,
     "aspect(dtype_bits, pred_ptr, target_ptr, out_ptr, n, threads): CIoU's aspect ratios w / h of both boxes "
     "into out [2, n] (0 / 0 as 0, w / -0 as +inf: their atan is atan2(w, h))"},
    {"forward", py_forward, METH_VARARGS,
     "forward(dtype_bits, kind, pred_ptr, target_ptr, loss_ptr, grad_ptr, atans_ptr, n, eps, rows, log, paper, "
     "gated, threads): loss [n] and gradient rows [rows, n] of contiguous [n, 4] boxes (CIoU: atans "
     "[2, n] from aspect())"},
    {"backward", py_backward, METH_VARARGS,
     "backward(dtype_bits, grad_ptr, rows, grad_out_ptr, grad_out_stride, grad_pred_ptr, grad_target_ptr, n, "
     "threads): [n, 4] gradients from the saved rows"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_native", "Fused CPU loops of the IoU-family losses.", -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&module); }
