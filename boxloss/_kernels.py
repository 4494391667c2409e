"""Analytic-gradient kernels for the IoU-family losses (IoU, GIoU, DIoU, CIoU) of matched box pairs.

:func:`iou_family_loss` computes the per-pair loss *and* its gradient with respect to both boxes in
one forward sweep and saves only the gradient, 6 numbers per pair, for backward; backward scales
them by the incoming gradient and writes the ``[N, 4]`` gradients. Values and gradients equal the
plain-autograd formulation ``boxloss.boxes._iou_family(..., pairwise=False)`` (torchvision's
losses, with widths/heights clamped at 0 for degenerate boxes), including the tie semantics of
``torch.max``/``torch.min`` and the subgradients of the clamps, to rounding.

Three backends compute the same per-pair formulas, op for op (see :func:`resolve_backend`); while
compiling (torch.compile, torch.export) and on fake tensors the call goes through the custom ops of
``boxloss._ops``, which run the same backends:

* **native** (the CPU default): ``boxloss._native``, plain C compiled by ``pip install`` (setup.py;
  no PyTorch headers, about a second to build). Blocks of 256 pairs are transposed into coordinate
  columns on the stack and one branch-free, vectorised loop writes the loss and the six gradient
  numbers of each pair; backward is one more pass. The loops run on ``torch.get_num_threads()``
  pthreads with the GIL released (ranges of >= 16384 pairs). CIoU's two angles are taken by
  ``torch.atan`` on the aspect-ratio columns, so they are the very values of the eager kernel.
  3-4x faster than the eager ops on CPU (docs/kernels.md).
* **triton** (the CUDA default where Triton is installed): ``boxloss._triton``, one fused forward
  kernel writing the loss and the saved rows, one backward kernel; the same formulas as the
  compiled loops. ``TRITON_INTERPRET=1`` runs it on CPU tensors through Triton's interpreter.
* **eager**: PyTorch ops only (GPUs without Triton, other devices, and CPUs where the extension
  could not be built). How it is fast without a compiler, each op writing into a preallocated row:

* **Coordinate rows, chunk by chunk.** A chunk of pairs (128k on CPU, 1M on GPU) is transposed
  once into rows (x1, y1, x2, y2) per box, so every later op runs on contiguous rows and handles x
  and y together (``[2, c]`` or ``[2, 2, c]`` blocks): about 40 ops per chunk for GIoU, 55 for CIoU,
  loss and gradient together. The workspace (48 rows, reused as values die: 25 MB on CPU) is
  allocated once per thread, device and dtype (and CUDA stream) and kept: a fresh one faults in
  its pages on every call, 2.6-4x the kernel's time at 10^6 pairs (docs/kernels.md). The chunk
  bounds what is kept. The views of the last chunk length are kept with it.
* **Six saved numbers per pair.** The IoU family is translation invariant, so per axis the four
  coordinate gradients sum to zero: backward rebuilds the target's (x2, y2) gradient from the
  other six. When ``target`` needs no gradient only the prediction's four are kept. In float32
  that is 24 (16) bytes per pair, against ~112-152 for torchvision's autograd tape.
* **Ties.** ``torch.max``/``torch.min`` split the gradient evenly between equal inputs. The
  prediction's weight in the intersection edge is ``0.5 + 0.5 * sign(x1 - x1g)`` (1, 0 or 1/2;
  for x2 the sign of x2g - x2), and ``torch.lerp`` between the intersection and enclosing-box
  gradients selects exactly at weights 0 and 1.
* **Masks.** The intersection is torchvision's ``where((iw > 0) & (ih > 0), iw * ih, 0)``: its
  subgradient is one comparison of the area (``iw * ih > 0``), not one per side. The boxes'
  sizes are clamped at 0 with the derivative from above at exactly 0 (the reference's
  ``boxes._size``); every derivative with respect to w carries a factor h and vice versa, so one
  mask per box, ``min(w, h) >= 0``, is each side's.
* **Sign bookkeeping.** The kernel differentiates -L (the metric itself for the linear losses),
  which saves a negation per term, and stores rows for q = (-x1, -y1, x2, y2), where one formula
  serves both edges; backward flips the hi rows while it scales by the incoming gradient.
* **Memory traffic.** Each saved row is written once and read once; backward interleaves the
  rows into the ``[N, 4]`` gradients with ``Tensor.copy_`` (its strided loop is ~4x faster than
  an elementwise op writing into a transposed view). Large CPU outputs come from a small pool
  (:class:`_Pool`): fresh pages fault on first touch, which in a VM costs as much as the math.

The loss values per kind, with I the intersection, U the union, C the enclosing box, rho the
distance between the centres and c the diagonal of C (eps guards every division, as in torchvision)::

    iou   1 - I / (U + eps)                          (mode="log": -ln(min(I / (U + eps) + eps, 1)))
    giou  1 - IoU + (|C| - U) / (|C| + eps)
    diou  1 - IoU + rho^2 / (c^2 + eps)
    ciou  diou + alpha * v,  v = 4/pi^2 (atan2(w_g, h_g) - atan2(w, h))^2,
          alpha = v / (1 - IoU + v + eps) without gradient (alpha="gated": 0 where IoU <= 0.5)

The log loss is capped at 0 where IoU + eps reaches 1 (zero gradient there). CIoU's angles are
``atan2(w, h)`` of the clamped sizes, taken as ``torch.atan(w / h)`` with 0 / 0 read as 0 and
w / -0 as +inf (the same angle for w, h >= 0: pi/2 at h = 0, 0 for a point): ``torch.atan2``
rounds differently in its vectorised and scalar loops, so its last bit would depend on a pair's
position in the chunk, while the ratio is one IEEE division and ``torch.atan`` agrees with itself,
so both kernels share the angles bit for bit. Their derivatives are (h, -w) / (w^2 + h^2), the
denominator clamped at the smallest normal number (0 at a point, where the numerators are 0 too).
``ciou_grad="paper"`` replaces alpha * dv/d(w, h) by the authors' version without the
1 / (w^2 + h^2) factor: ``(-h, +w)`` times ``8/pi^2 * alpha * (atan(w_g/h_g) - atan(w/h))`` for the
prediction and ``(+h_g, -w_g)`` for the target.

References: Yu et al., "UnitBox: An Advanced Object Detection Network", ACM MM 2016,
arXiv:1608.01471; Rezatofighi et al., "Generalized Intersection over Union: A Metric and A Loss for
Bounding Box Regression", CVPR 2019, arXiv:1902.09630; Zheng et al., "Distance-IoU Loss: Faster and
Better Learning for Bounding Box Regression", AAAI 2020, arXiv:1911.08287.
"""

from __future__ import annotations

import importlib.util
import math
import os
import threading
from types import SimpleNamespace

import torch
from torch import Tensor

from ._checks import check_device
from .boxes import _check_eps

try:  # the fused C loops, built by `pip install` (setup.py); without a compiler the eager path runs
    from . import _native
except ImportError:  # pragma: no cover - depends on the build
    _native = None

__all__ = ["iou_family_loss", "IoUFamilyLoss", "KINDS", "BACKENDS", "native_available", "triton_available",
           "resolve_backend", "check_same_device"]

KINDS = ("iou", "giou", "diou", "ciou")
_K4 = 4 / math.pi**2  # CIoU's v = 4/pi^2 * delta^2

# Pairs per chunk: the kept workspace is 48 rows of a chunk (25 MB in float32 on CPU); one chunk
# for 10^6 pairs would keep 190 MB per thread and is no faster (docs/kernels.md, "Eager kernel")
_CPU_CHUNK = 1 << 17
_CUDA_CHUNK = 1 << 20  # GPU: one launch per op over up to 1M pairs (workspace ~200 MB in float32)
_BACKWARD_CHUNK = 1 << 17  # backward: a few memory-bound ops, on chunks at least this long


BACKENDS = ("auto", "native", "eager", "triton")
_KIND_ID = {k: i for i, k in enumerate(KINDS)}
_DTYPE_BITS = {torch.float32: 32, torch.float64: 64}


def native_available() -> bool:
    """Whether the compiled CPU loops (``boxloss._native``) were built and import."""
    return _native is not None


def triton_available() -> bool:
    """Whether the Triton package is installed (imported only when a kernel is launched)."""
    global _HAS_TRITON
    if _HAS_TRITON is None:
        _HAS_TRITON = importlib.util.find_spec("triton") is not None
    return _HAS_TRITON


_HAS_TRITON: bool | None = None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """``"native"``, ``"eager"`` or ``"triton"`` for a call on ``device``.

    ``None`` reads ``$BOXLOSS_KERNEL`` (default ``"auto"``). ``"auto"``: on CPU tensors the compiled
    loops when they are built, else the eager PyTorch ops; on CUDA tensors the Triton kernels when
    Triton is installed, else the eager ops; the eager ops on any other device. ``"native"``
    insists on the compiled loops, ``"triton"`` on the Triton kernels (CUDA tensors, or CPU
    tensors through Triton's interpreter with ``TRITON_INTERPRET=1``), and raise where they cannot run.
    """
    source = "backend"
    if backend is None:
        backend, source = os.environ.get("BOXLOSS_KERNEL", "auto"), "BOXLOSS_KERNEL"
    if backend not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {backend!r}")
    if backend == "eager":
        return "eager"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError(f"{source}='triton' needs the triton package, which is not installed")
        if device.type == "cuda" or (device.type == "cpu" and _interpreting()):
            return "triton"
        raise ValueError(f"{source}='triton' runs on CUDA tensors (or on CPU tensors with TRITON_INTERPRET=1, "
                         f"Triton's interpreter), got device {device}")
    if device.type != "cpu":
        if backend == "native":
            raise ValueError(f"{source}='native' runs on CPU tensors only, got device {device}")
        return "triton" if device.type == "cuda" and triton_available() else "eager"
    if _native is None:
        if backend == "native":
            raise RuntimeError(f"{source}='native' needs the compiled extension boxloss._native, which is not "
                               "built: reinstall with a C compiler present (pip install -e .)")
        return "eager"
    return "native"


def check_same_device(pred: Tensor, **others: Tensor | None) -> None:
    """:func:`boxloss._checks.check_device` of every tensor of ``others`` (by argument name) against ``pred``.

    The compiled loops read raw pointers: a CUDA ``target`` beside a CPU ``pred`` would hand a device
    pointer to C. A 0-d tensor is no exception (the losses take no scalar tensors).
    """
    for name, t in others.items():
        check_device(name, t, "pred", pred)


_triton_modules: dict = {}


def _triton_module():
    """``boxloss._triton``, its kernels interpreted when ``TRITON_INTERPRET=1`` now.

    Triton decides at decoration (import) time whether a kernel is compiled or interpreted; if the
    variable changed since the first import, a second copy of the module is loaded the other way.
    """
    interpret = _interpreting()
    mod = _triton_modules.get(interpret)
    if mod is None:
        from . import _triton
        from triton.runtime.interpreter import InterpretedFunction

        if isinstance(_triton._forward_kernel, InterpretedFunction) == interpret:
            mod = _triton
        else:
            spec = importlib.util.spec_from_file_location(
                f"boxloss._triton_{'interpreted' if interpret else 'compiled'}", _triton.__file__)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)  # decorated under the current TRITON_INTERPRET
        mod = _triton_modules.setdefault(interpret, mod)
    return mod


def _default_chunk(device: torch.device) -> int:
    """Pairs per chunk of the eager kernel: 128k on CPU, 1M on GPUs (see _CPU_CHUNK)."""
    return _CPU_CHUNK if device.type == "cpu" else _CUDA_CHUNK


class _Consts:
    """0-d and small constant tensors of one device, dtype and eps, created once.

    A Python number where an op expects a tensor is wrapped into a new tensor on every call (about
    2 us, as long as the op itself on a few thousand numbers); these are wrapped once.
    """

    _cache: dict = {}

    @classmethod
    def get(cls, device: torch.device, dtype: torch.dtype, eps: float = 1e-7, fake: bool = False) -> "_Consts":
        if fake:  # fake tensors (shape propagation) must never be handed to a real call later
            return cls(device, dtype, eps)
        key = (device, dtype, eps)
        c = cls._cache.get(key)
        if c is None:
            if len(cls._cache) > 64:  # many distinct eps values: do not grow without bound
                cls._cache.clear()
            c = cls._cache[key] = cls(device, dtype, eps)
        return c

    def __init__(self, device: torch.device, dtype: torch.dtype, eps: float):
        def full(v):
            return torch.full((), v, device=device, dtype=dtype)

        self.eps, self.zero, self.one, self.half, self.minus_half, self.k4 = (
            full(v) for v in (eps, 0.0, 1.0, 0.5, -0.5, _K4)
        )
        self.tiny = torch.finfo(dtype).tiny
        # CIoU: d(-alpha v)/d(w, h) = -alpha dv: +2k for the prediction (dv has -2k delta), -2k target
        self.aspect_sign = torch.tensor([[2 * _K4], [-2 * _K4]], device=device, dtype=dtype)  # [2, 1]


class _Workspace:
    """Preallocated rows for one chunk of ``cap`` pairs, with every view the kernel uses built once.

    Building a view costs about a microsecond of Python, as much as an op on a few thousand
    numbers; :meth:`views` keeps those of the last chunk length (every chunk of a call has the same).
    """

    # name: shape without the trailing chunk dimension. Rows are reused once dead (see _build).
    _SHAPES = {
        "R": (16,),  # coordinates, then clamped sizes and products, then the last temporaries
        "SZ": (4, 2),  # (w, h) of pred, target, intersection, enclosing (unclamped), then masks
        "D": (2, 2),  # (x1 - x1g, y1 - y1g, x2 - x2g, y2 - y2g), then the tie weights
        "GE": (2,),  # GIoU: d(-L)/d(cw, ch)
        "H": (2,),  # DIoU/CIoU: half centre offsets, then d(-L)/d(centre offset)
        "S": (12,),  # per-pair scalars
    }

    # Rows are cap + _PAD long. Besides alignment this keeps a [4, c] block of rows from being
    # exactly the transpose of a contiguous [c, 4] one: for that case Tensor.copy_ takes a blocked
    # transpose path that is 3-5x slower than its general strided loop.
    _PAD = 32

    def __init__(self, cap: int, device: torch.device, dtype: torch.dtype):
        self.cap = cap
        stride = cap + self._PAD
        sizes = {k: math.prod(s) for k, s in self._SHAPES.items()}
        flat = torch.empty(sum(sizes.values()) * stride, device=device, dtype=dtype)
        self.buf, off = {}, 0
        for k, s in self._SHAPES.items():
            n = sizes[k] * stride
            self.buf[k] = flat[off : off + n].view(*s, stride)[..., :cap]
            off += n
        self._views: SimpleNamespace | None = None

    def views(self, c: int) -> SimpleNamespace:
        if self._views is None or self._views.c != c:
            self._views = self._build(c)
        return self._views

    def _build(self, c: int) -> SimpleNamespace:
        b = {k: v[..., :c] for k, v in self.buf.items()}
        R, SZ, D, S = b["R"], b["SZ"], b["D"], b["S"]
        w = SimpleNamespace(c=c, **b)
        # phase 1: coordinate rows of pred, target, intersection, enclosing box: [group, lo|hi, x|y, c]
        Q = R.unflatten(0, (4, 2, 2))
        w.Q0f, w.Q1f = R[0:4], R[4:8]  # targets of the transposition
        w.Q0lo, w.Q0hi, w.Q1lo, w.Q1hi = Q[0, 0], Q[0, 1], Q[1, 0], Q[1, 1]  # [x|y, c] each
        w.Ilo, w.Ihi, w.Elo, w.Ehi = Q[2, 0], Q[2, 1], Q[3, 0], Q[3, 1]
        w.Qhi, w.Qlo, w.Qhi3, w.Qlo3 = Q[:, 1], Q[:, 0], Q[:3, 1], Q[:3, 0]
        w.Df = D.flatten(0, 1)
        w.Dlo, w.Dhi = D.unbind(0)
        w.SZ3, w.cwh = SZ[0:3], SZ[3]
        w.w01, w.h01 = SZ[0:2, 0], SZ[0:2, 1]  # unclamped sizes of pred and target
        w.cw, w.ch = SZ[3].unbind(0)
        # phase 2 (the coordinates are dead once the sizes and D are taken): clamped sizes, products
        CL = R[0:6].unflatten(0, (3, 2))  # pred, target, intersection
        w.CL, w.CLw, w.CLh = CL, CL[:, 0], CL[:, 1]
        w.wb, w.hb = CL[0:2, 0], CL[0:2, 1]  # [2 boxes, c]
        w.iw_c, w.ih_c = CL[2].unbind(0)
        w.P = R[6:9]
        w.a1, w.a2, w.inter = w.P.unbind(0)
        w.at = R[14:16]  # CIoU: [2 boxes, c]
        # phase 3 (gradient): masks in place of the products, gradients in place of the sizes, aspect
        # scratch, then the last temporaries
        w.valid = w.P[0:2]  # [2 boxes, c]: min(w, h) >= 0, in place of A1, A2
        w.valid_wh = w.valid.unsqueeze(1)  # [2, 1, c]: against [2 boxes, w|h, c]
        w.GX01, w.GX_w, w.GX_h = SZ[0:2], SZ[0:3, 0], SZ[0:3, 1]
        w.GX_w01, w.GX_h01, w.GX_w2, w.GX_h2 = SZ[0:2, 0], SZ[0:2, 1], SZ[2, 0], SZ[2, 1]
        w.aq = R[14:16]  # CIoU, in place of atan(w / h)
        w.GE0, w.GE1 = b["GE"].unbind(0)
        w.H0, w.H1 = b["H"].unbind(0)
        w.WI, w.WI0 = D, D[0]  # in place
        w.T = R[6:10].unflatten(0, (2, 2))  # [lo|hi, x|y, c]
        w.X = R[0:2]
        w.T0, w.T1 = w.T.unbind(0)
        w.B = R[12:16].unflatten(0, (2, 2))
        w.B0, w.B1 = w.B.unbind(0)
        w.D0, w.D1 = D.unbind(0)
        w.GX0, w.GX1, w.GX2 = SZ[0:3].unbind(0)
        w.s = S.unbind(0)
        w.s01, w.s23 = S[0:2], S[2:4]
        return w


# Workspaces are kept between calls, one per thread, device and dtype (25 MB at the CPU chunk): a
# fresh one faults its pages in on every call, 2.6-4x the kernel's time at 10^6 pairs. On a GPU a
# workspace is tied to the stream it was first used on (the caching allocator's rule for reuse
# without synchronisation): one per stream.
_local = threading.local()


def _stream_key(device: torch.device):
    if device.type == "cuda" and torch.cuda.is_initialized():
        return torch.cuda.current_stream(device).stream_id
    return None


# a GPU workspace starts at 64k pairs (12 MB in float32) and grows to the largest chunk seen
_GPU_MIN_WORKSPACE = 1 << 16


def _workspace(c: int, device: torch.device, dtype: torch.dtype, fake: bool) -> _Workspace:
    if fake:  # fake tensors (shape propagation) are never cached
        return _Workspace(c, device, dtype)
    cache = getattr(_local, "workspaces", None)
    if cache is None:
        cache = _local.workspaces = {}
    key = (device, dtype, _stream_key(device))
    ws = cache.get(key)
    if ws is None or ws.cap < c:
        ws = _Workspace(max(c, _CPU_CHUNK if device.type == "cpu" else _GPU_MIN_WORKSPACE), device, dtype)
        cache[key] = ws
    return ws


class _Pool:
    """Large CPU output buffers (saved rows, losses, gradients), reused once nothing holds them.

    A fresh allocation of this size comes from the kernel as untouched pages, and each 4 KiB page
    faults on its first write: ~0.25 us on bare metal, ~3-4 us in a VM, where the 56 MB of outputs
    of 10^6 pairs then cost 15-40 ms, as much as the computation. glibc reuses freed memory only
    some of the time; this keeps the buffers. A buffer is handed out again only
    when its storage has no other user (torch's storage use count, read through a private but
    long-standing accessor; without it there is no pooling), so a tensor a caller still holds --
    a loss kept for logging, a .grad, a saved tensor of a graph not yet run -- is never reused.
    """

    _MIN_BYTES = 1 << 20
    _MAX_BUFFERS = 8

    def __init__(self) -> None:
        self._bufs: list[Tensor] = []
        self._lock = threading.Lock()
        self._use_count = getattr(torch._C, "_storage_Use_Count", None)

    def _free(self, b: Tensor) -> bool:
        return self._use_count(b.untyped_storage()._cdata) <= 2  # the pool's tensor + this temporary

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        numel = math.prod(shape)
        if self._use_count is None or numel * torch.empty((), dtype=dtype).element_size() < self._MIN_BYTES:
            return torch.empty(shape, dtype=dtype)
        with self._lock:
            fits = [b for b in self._bufs if b.dtype == dtype and b.numel() >= numel and self._free(b)]
            if fits:
                return min(fits, key=Tensor.numel)[:numel].view(shape)
            b = torch.empty(numel, dtype=dtype)
            if len(self._bufs) >= self._MAX_BUFFERS:  # make room: drop the smallest free buffer
                free = [x for x in self._bufs if self._free(x)]
                if not free:
                    return b.view(shape)
                drop = min(free, key=Tensor.numel)
                # by identity: list.remove would compare tensors with ==, elementwise
                self._bufs = [x for x in self._bufs if x is not drop]
            self._bufs.append(b)
            return b[:numel].view(shape)

    def clear(self) -> None:
        with self._lock:
            self._bufs.clear()


_pool = _Pool()


def _is_fake(t: Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


def _empty(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype, fake: bool = False) -> Tensor:
    if device.type == "cpu" and not fake:
        return _pool.empty(shape, dtype)
    return torch.empty(shape, device=device, dtype=dtype)  # the CUDA caching allocator does this


def _run_chunks(n: int, c: int, body) -> None:
    """Call ``body(start)`` for the chunks ``[start, start + c)`` covering ``[0, n)``.

    The last chunk is moved back to end at ``n`` (it overlaps the one before and recomputes the
    same values), so every chunk has length ``c`` and the same views. One Python thread: the ops
    spread over the cores themselves, and their Python side holds the GIL.
    """
    # inference mode: the workspace is made of inference tensors, whose ops skip the version
    # counter and autograd bookkeeping (~15% of an op's fixed cost)
    with torch.inference_mode():
        for s in range(0, n, c):
            body(min(s, n - c))


def _angles(w: Tensor, h: Tensor, out: Tensor) -> Tensor:
    """CIoU's angles atan2(w, h) of clamped sizes (w, h >= 0) into ``out``, as atan(w / h).

    0 / 0 (a point) reads as 0 and w / -0 as +inf (a size of -0.0 survives the clamp): the angle
    of a point is 0 and of a zero height pi/2. The compiled loops write the same ratios (one IEEE
    division each) and take the same ``torch.atan``: the angles agree bit for bit (module docstring).
    """
    return torch.div(w, h, out=out).nan_to_num_(0.0, math.inf, math.inf).atan_()


def _chunk(
    kind: str,
    p: Tensor,
    t: Tensor,
    loss: Tensor,
    grad: Tensor | None,
    w: SimpleNamespace,
    k: _Consts,
    log: bool,
    paper: bool,
    gated: bool,
) -> None:
    """Loss ``[c]`` of the pairs ``p``, ``t`` (``[c, 4]``) into ``loss``; gradient rows into ``grad``.

    ``grad`` is ``[R, c]``, d(-L)/dq with q = (-x1, -y1, x2, y2): the prediction's (lo x, lo y),
    then for R = 6 the target's (lo x, lo y), then the prediction's (hi x, hi y); or None for the
    values only. Differentiating -L (the metric itself for the linear losses) saves a negation per
    term, and in q-form one formula serves both edges; backward turns the rows into
    dL/d(x1, y1, x2, y2).
    """
    s, eps = w.s, k.eps
    box = kind != "iou"  # needs the enclosing box
    centre = kind in ("diou", "ciou")
    want_grad = grad is not None

    # phase 1: coordinate rows (the transposition: the only strided reads), intersection and
    # enclosing box, sizes and the differences whose signs say which box owns each edge
    w.Q0f.copy_(p.t())  # pred into rows 0-3, target into 4-7
    w.Q1f.copy_(t.t())
    torch.maximum(w.Q0lo, w.Q1lo, out=w.Ilo)
    torch.minimum(w.Q0hi, w.Q1hi, out=w.Ihi)
    if box:
        torch.minimum(w.Q0lo, w.Q1lo, out=w.Elo)
        torch.maximum(w.Q0hi, w.Q1hi, out=w.Ehi)
    if box:  # [groups, 2, c]: (w, h), unclamped
        torch.sub(w.Qhi, w.Qlo, out=w.SZ)
    else:
        torch.sub(w.Qhi3, w.Qlo3, out=w.SZ3)
    if centre or want_grad:
        # (x1 - x1g, y1 - y1g, x2 - x2g, y2 - y2g): the pred owns max(x1, x1g) where the first is
        # > 0 and min(x2, x2g) where the second is < 0
        torch.sub(w.Q0f, w.Q1f, out=w.Df)

    # phase 2: values
    torch.clamp(w.SZ3, min=0, out=w.CL)  # widths and heights at 0, the intersection relu'd
    torch.mul(w.CLw, w.CLh, out=w.P)  # [3, c]: A1, A2, inter (0 unless iw > 0 and ih > 0)
    union, ue, iou = s[0], s[2], s[4]
    torch.add(w.a1, w.a2, out=union).sub_(w.inter)
    metric = iou
    if kind == "giou":
        area_c, area_ce, pen, metric = s[1], s[3], s[6], s[5]
        torch.mul(w.cw, w.ch, out=area_c)
        torch.add(w.s01, eps, out=w.s23)  # (U + eps, |C| + eps)
        torch.div(w.inter, ue, out=iou)
        torch.sub(area_c, union, out=pen)
        torch.addcdiv(iou, pen, area_ce, value=-1, out=metric)  # iou - (|C| - U) / (|C| + eps)
    else:
        torch.add(union, eps, out=ue)
        torch.div(w.inter, ue, out=iou)
    if centre:
        c2, dterm, rho2, hc, metric = s[1], s[6], s[7], w.H, s[5]
        torch.mul(w.cw, w.cw, out=c2).addcmul_(w.ch, w.ch).add_(eps)  # squared diagonal of C, + eps
        torch.add(w.Dlo, w.Dhi, out=hc).mul_(k.minus_half)  # -((x1 + x2) - (x1g + x2g)) / 2, same for y
        torch.mul(w.H0, w.H0, out=rho2).addcmul_(w.H1, w.H1)
        torch.div(rho2, c2, out=dterm)
        torch.sub(iou, dterm, out=metric)
        if kind == "ciou":
            delta, v, alpha = s[8], s[9], s[10]
            # two atans, as torchvision: atan((a_t - a_p) / (1 + a_p a_t)) would need one, but its
            # three roundings before the atan cost up to 3x the error where the angles differ by ~1
            at_p, at_t = _angles(w.wb, w.hb, w.at)
            torch.sub(at_t, at_p, out=delta)
            torch.mul(delta, delta, out=v).mul_(k.k4)
            torch.sub(k.one, iou, out=alpha).add_(v).add_(eps)  # (1 - iou) + v + eps
            torch.div(v, alpha, out=alpha)  # held constant: no gradient through alpha
            if gated:  # MMDetection: alpha only where IoU > 0.5
                alpha.mul_(iou > 0.5)
            metric.addcmul_(alpha, v, value=-1)
    if log:
        lg = s[11]
        # capped at 1: IoU = I / (U + eps) is within eps of 1 for identical boxes, and the loss >= 0
        torch.add(iou, eps, out=lg).clamp_(max=1)
        torch.log(lg, out=loss).neg_()
    else:
        torch.sub(k.one, metric, out=loss)
    if not want_grad:
        return

    # phase 3: gradient of -L. With iou = I / Ue, kl = d(-L)/diou (1, or 1 / (iou + eps) for log,
    # 0 where the cap at 1 holds) and r = kl / Ue: m_u = d(-L)/dU = -iou r (+ 1 / (|C| + eps) for
    # GIoU), and m_i = d(-L)/dI in total (through U too) = r - m_u
    r, m_u, m_i, g_c = s[0], s[5], s[7], s[9]
    if kind == "giou":
        r_c = s[1]
        torch.reciprocal(w.s23, out=w.s01)  # (1 / (U + eps), 1 / (|C| + eps))
        torch.addcmul(r_c, iou, r, value=-1, out=m_u)
    else:
        torch.reciprocal(ue, out=r)
        if log:
            r.div_(lg)  # lg holds min(iou + eps, 1)
            r.mul_(torch.lt(lg, k.one, out=s[1]))
        torch.addcmul(k.zero, iou, r, value=-1, out=m_u)
    torch.sub(r, m_u, out=m_i)

    # enclosing box: gradient w.r.t. its (cw, ch), and the centre term
    if kind == "giou":  # d(-L)/d|C| = -(U + eps) / (|C| + eps)^2
        torch.mul(ue, r_c, out=g_c)
        torch.addcmul(k.zero, g_c, r_c, value=-1, out=g_c)
        torch.mul(w.ch, g_c, out=w.GE0)
        torch.mul(w.cw, g_c, out=w.GE1)
        GE = w.GE
    elif centre:  # d(-rho2 / c2)/dcw = 2 cw rho2 / c2^2; d/d(x1 + x2 - x1g - x2g) = -(dc / 2) / c2
        r2 = c2.reciprocal_()
        torch.addcmul(k.zero, dterm, r2, value=2, out=g_c)
        GE = w.cwh.mul_(g_c)
        g_rho = hc.mul_(r2)  # [2, c]

    # d(-L)/d(w, h) of pred, target (through their areas, + CIoU's aspect term) and intersection,
    # masked by the subgradients: into GX = [pred | target | inter, w | h, c], in place of the
    # (dead) first three sizes. The intersection is torchvision's where((iw > 0) & (ih > 0), iw ih, 0),
    # so d/diw = ih [iw ih > 0]: one comparison of the area, not of each side (the same unless
    # iw ih underflows, below 1e-38). A box's sizes are clamped at 0 with gradient at exactly 0
    # (the derivative from above, which lets a collapsed side grow back): d/dw = (...) [w >= 0],
    # and as every d/dw has a factor h (area: h, aspect: h / (w^2 + h^2)), 0 where h <= 0, the
    # mask [w >= 0 and h >= 0] serves both sides.
    m_area = w.P  # [3, c]: valid pred, valid target, inter > 0 (the products are dead)
    torch.minimum(w.w01, w.h01, out=w.valid)
    w.valid.ge_(0)
    torch.gt(w.inter, 0, out=m_area[2])
    if kind == "ciou":
        cf = delta.mul_(alpha)
        if paper:
            torch.mul(cf, k.aspect_sign, out=w.aq)  # the authors' dv: no 1 / (w^2 + h^2)
        else:
            # d atan2(w, h)/d(w, h) = (h, -w) / (w^2 + h^2); clamped: 0 / 0 at a point
            torch.mul(w.hb, w.hb, out=w.aq).addcmul_(w.wb, w.wb).clamp_(min=k.tiny)
            torch.div(cf, w.aq, out=w.aq).mul_(k.aspect_sign)
        # d(-L)/dw_b = m_u h_b + aq_b h_b ;  d(-L)/dh_b = (m_u - aq_b) w_b
        torch.mul(w.hb, w.aq, out=w.GX_w01).addcmul_(w.hb, m_u)
        torch.sub(m_u, w.aq, out=w.GX_h01).mul_(w.wb)
        w.GX01.mul_(w.valid_wh)
        m_area[2].mul_(m_i)
        torch.mul(w.ih_c, m_area[2], out=w.GX_w2)
        torch.mul(w.iw_c, m_area[2], out=w.GX_h2)
    else:
        m_area[0:2].mul_(m_u)  # [3, c]: each area's masked d(-L)/d(area)
        m_area[2].mul_(m_i)
        torch.mul(w.CLh, w.P, out=w.GX_w)  # d(area)/dw = h, for the three areas at once
        torch.mul(w.CLw, w.P, out=w.GX_h)
    GI = w.GX2  # [w|h, c]: d(-L)/d(iw, ih); w.GX0, w.GX1: d(-L)/d(w, h) of pred, target

    # q-form coordinate gradients. For q-row (lo|hi, x|y) of the prediction:
    #   d/dq = d/dw + WI d/diw + (1 - WI) d/dcw (-/+ d/d(centre offset) for lo/hi)
    # the target's: d/dw_g + (1 - WI) d/diw + WI d/dcw (+/- the centre term), where WI, the pred's
    # weight in the intersection edge, is 1, 0, or 1/2 at a tie (torch.max/min split the gradient)
    w.D.sign_()
    torch.add(k.half, w.D0, alpha=0.5, out=w.D0)  # in place; (one op with a [2, 1, 1] factor is 3x slower)
    torch.add(k.half, w.D1, alpha=-0.5, out=w.D1)
    # saved rows: pred lo (x1, y1), [target lo,] pred hi (x2, y2); each written once, never re-read
    lo, hi = grad[0:2], grad[-2:]
    if box:
        torch.lerp(GE, GI, w.WI, out=w.T)  # exact at WI in {0, 1}
    else:
        torch.mul(GI, w.WI, out=w.T)
    if centre:
        torch.sub(w.GX0, g_rho, out=w.B0)
        torch.add(w.GX0, g_rho, out=w.B1)
        torch.add(w.T0, w.B0, out=lo)
        torch.add(w.T1, w.B1, out=hi)
    else:
        torch.add(w.T0, w.GX0, out=lo)
        torch.add(w.T1, w.GX0, out=hi)
    if grad.shape[0] == 6:  # target lo rows; its hi rows follow from translation invariance in backward
        x = w.X  # scratch (the clamped sizes are dead)
        if box:
            torch.lerp(GI, GE, w.WI0, out=x)
        else:
            torch.sub(k.one, w.WI0, out=x).mul_(GI)
        if centre:
            x.add_(g_rho)
        torch.add(x, w.GX1, out=grad[2:4])


def _forward(
    kind: str,
    pred: Tensor,
    target: Tensor,
    eps: float,
    log: bool,
    paper: bool,
    gated: bool,
    grad_rows: int,
    chunk: int | None,
    backend: str = "eager",
) -> tuple[Tensor, Tensor | None]:
    """Loss ``[N]`` and the q-form gradient rows ``[grad_rows, N]`` (None for ``grad_rows == 0``).

    ``backend``: ``"native"``, ``"eager"`` or ``"triton"`` (resolved, see :func:`resolve_backend`).
    """
    if backend == "triton":
        return _triton_module().forward(kind, pred, target, eps, log, paper, gated, grad_rows)
    p = pred.detach().reshape(-1, 4)
    t = target.detach().reshape(-1, 4)
    n, device, dtype = p.shape[0], p.device, p.dtype
    if backend == "native":
        p, t = p.contiguous(), t.contiguous()
        loss = _empty((n,), device, dtype)
        grad = _empty((grad_rows, n), device, dtype) if grad_rows else None
        if n:
            bits, threads, atans = _DTYPE_BITS[dtype], torch.get_num_threads(), None
            if kind == "ciou":  # torch.atan of the aspect ratios: the eager kernel's angles, bit for bit
                atans = _empty((2, n), device, dtype)
                _native.aspect(bits, p.data_ptr(), t.data_ptr(), atans.data_ptr(), n, threads)
                atans.atan_()
            _native.forward(bits, _KIND_ID[kind], p.data_ptr(), t.data_ptr(), loss.data_ptr(),
                            grad.data_ptr() if grad is not None else 0, atans.data_ptr() if atans is not None else 0,
                            n, float(eps), grad_rows, int(log), int(paper), int(gated), threads)
        return loss, grad
    fake = _is_fake(p)
    loss = _empty((n,), device, dtype, fake)
    grad = _empty((grad_rows, n), device, dtype, fake) if grad_rows else None
    if n == 0:
        return loss, grad
    c = min(n, chunk or _default_chunk(device))  # full chunks, the last one overlapping its neighbour
    k = _Consts.get(device, dtype, eps, fake)

    def body(s: int) -> None:
        w = _workspace(c, device, dtype, fake).views(c)
        e = s + c
        _chunk(kind, p[s:e], t[s:e], loss[s:e], None if grad is None else grad[:, s:e], w, k, log, paper, gated)

    _run_chunks(n, c, body)
    return loss, grad


def _backward_native(grad_out: Tensor, g: Tensor, need_target: bool) -> tuple[Tensor, Tensor | None]:
    """:func:`_backward` in one compiled pass (CPU): reads each saved row once, writes ``[N, 4]``."""
    rows, n = g.shape
    gp = _empty((n, 4), g.device, g.dtype)
    gt = _empty((n, 4), g.device, g.dtype) if need_target else None
    if n:
        go = grad_out.reshape(-1)  # "sum"/"mean" give an expanded (stride-0) gradient: kept as is
        if go.stride(0) not in (0, 1):
            go = go.contiguous()
        _native.backward(_DTYPE_BITS[g.dtype], g.data_ptr(), rows, go.data_ptr(), go.stride(0), gp.data_ptr(),
                         gt.data_ptr() if gt is not None else 0, n, torch.get_num_threads())
    return gp, gt


def _backward_any(grad_out: Tensor, g: Tensor, need_target: bool, chunk: int | None,
                  backend: str) -> tuple[Tensor, Tensor | None]:
    """:func:`_backward` of ``backend`` (resolved: ``"native"``, ``"eager"`` or ``"triton"``)."""
    if backend == "native":
        return _backward_native(grad_out, g, need_target)
    if backend == "triton":
        return _triton_module().backward(grad_out, g, need_target)
    return _backward(grad_out, g, need_target, chunk)


def _backward(grad_out: Tensor, g: Tensor, need_target: bool, chunk: int | None) -> tuple[Tensor, Tensor | None]:
    """``[N, 4]`` gradients of pred and target from the saved q-form rows ``g`` and ``dL_total/dL``.

    Per chunk: scale the rows by the incoming gradient and the sign of each row (in cache), add
    the target's x2, y2 rows (the four x-gradients of a pair sum to zero, likewise y), then
    interleave them into the ``[N, 4]`` outputs with ``Tensor.copy_`` from the padded workspace
    rows (its general strided loop: ~0.6 ns a number, against ~2-5 ns for an elementwise op
    writing into the transposed view, whose inner loop is 4 long).
    """
    rows, n = g.shape
    device, dtype, fake = g.device, g.dtype, _is_fake(g)
    gp = _empty((n, 4), device, dtype, fake)
    gt = _empty((n, 4), device, dtype, fake) if need_target else None
    if n == 0:
        return gp, gt
    go = grad_out.reshape(1, n)  # "sum" gives a stride-0 (expanded) gradient; "mean" a materialised one
    chunk = chunk or _default_chunk(device)
    c = min(n, max(chunk, _BACKWARD_CHUNK) if device.type == "cpu" else chunk)
    k = _Consts.get(device, dtype, fake=fake)

    def body(s: int) -> None:
        bw = _workspace(c, device, dtype, fake).buf["R"][0:8, :c]  # pred (lo, hi), target (lo, hi)
        e = s + c
        gs, gos = g[:, s:e], go[:, s:e]
        # saved rows are d(-L)/dq, q = (-x1, -y1, x2, y2): lo rows are dL/dx1 already, hi rows flip
        torch.mul(gs[0:2], gos, out=bw[0:2])
        torch.addcmul(k.zero, gs[-2:], gos, value=-1, out=bw[2:4])
        gp[s:e].copy_(bw[0:4].t())
        if need_target:
            torch.mul(gs[2:4], gos, out=bw[4:6])
            torch.add(bw[0:2], bw[2:4], out=bw[6:8]).add_(bw[4:6]).neg_()  # the four sum to 0
            gt[s:e].copy_(bw[4:8].t())

    _run_chunks(n, c, body)
    return gp, gt


class IoUFamilyLoss(torch.autograd.Function):
    """Autograd Function of :func:`iou_family_loss`: saves the per-pair gradient rows only.

    Not twice differentiable (the gradient is computed in closed form, not traced).
    """

    @staticmethod
    def forward(ctx, pred, target, kind, eps, log, paper, gated, chunk, backend="eager"):
        need_p, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        rows = 6 if need_t else (4 if need_p else 0)
        loss, g = _forward(kind, pred, target, eps, log, paper, gated, rows, chunk, backend)
        if g is not None:
            ctx.save_for_backward(g)
        ctx.need = (need_p, need_t)
        ctx.shape = pred.shape
        ctx.chunk = chunk
        ctx.backend = backend
        return loss.view(pred.shape[:-1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        need_p, need_t = ctx.need
        if not (need_p or need_t):
            return (None,) * 9
        (g,) = ctx.saved_tensors
        gp, gt = _backward_any(grad_out, g, need_t, ctx.chunk, ctx.backend)
        return (
            gp.view(ctx.shape) if need_p else None,
            gt.view(ctx.shape) if need_t else None,
            None, None, None, None, None, None, None,
        )


def iou_family_loss(
    pred: Tensor,
    target: Tensor,
    kind: str,
    eps: float = 1e-7,
    *,
    mode: str = "linear",
    ciou_grad: str = "exact",
    alpha: str = "standard",
    chunk: int | None = None,
    backend: str | None = None,
) -> Tensor:
    """Per-pair IoU-family loss ``[...]`` of matched xyxy boxes ``[..., 4]``, analytic gradients.

    The fast path of :func:`boxloss.iou_loss`, :func:`boxloss.giou_loss`, :func:`boxloss.diou_loss`
    and :func:`boxloss.ciou_loss` (which validate arguments, upcast half precision and reduce):
    the inputs here must already be float32 or float64 tensors of the same shape, dtype and device.

    Args:
        pred, target: ``[..., 4]`` xyxy boxes.
        kind: ``"iou"``, ``"giou"``, ``"diou"`` or ``"ciou"``.
        eps: a finite number > 0 that guards every division (see the module docstring for where
            it enters).
        mode: IoU loss only: ``"linear"`` (1 - IoU) or ``"log"`` (-ln(min(IoU + eps, 1)), UnitBox).
        ciou_grad: ``"exact"`` (autograd's and torchvision's gradient) or ``"paper"`` (alpha dv/dw
            without the 1 / (w^2 + h^2) factor, as the authors' Darknet and MATLAB code: their
            gradient for image-normalised boxes only; :func:`boxloss.ciou_loss` warns on larger ones).
        alpha: ``"standard"`` or ``"gated"`` (MMDetection: alpha = 0 where IoU <= 0.5).
        chunk: pairs per chunk of the eager path (default 128k on CPU, 1M on GPU); results do not
            depend on it.
        backend: ``"auto"`` (CPU tensors: the compiled loops of ``boxloss._native`` where they are
            built, else eager PyTorch ops; CUDA tensors: the Triton kernels where Triton is
            installed, else eager), ``"native"``, ``"eager"`` or ``"triton"``; ``None`` reads
            ``$BOXLOSS_KERNEL`` (default ``"auto"``). See :func:`resolve_backend`.

    Returns:
        The unreduced loss ``[...]``. Its backward needs 6 numbers per pair (4 when ``target``
        does not require grad): 24 bytes in float32, against ~112-152 for torchvision's tape.
    """
    for name, value, valid in (
        ("kind", kind, KINDS),
        ("mode", mode, ("linear", "log")),
        ("ciou_grad", ciou_grad, ("exact", "paper")),
        ("alpha", alpha, ("standard", "gated")),
    ):
        if value not in valid:
            raise ValueError(f"{name} must be one of {valid}, got {value!r}")
    if pred.shape != target.shape or pred.shape[-1:] != (4,):
        raise ValueError(f"pred and target must have the same shape [..., 4], got {tuple(pred.shape)} "
                         f"and {tuple(target.shape)}")
    check_same_device(pred, target=target)
    if pred.dtype not in (torch.float32, torch.float64) or target.dtype != pred.dtype:
        raise TypeError(f"pred and target must both be float32 or float64 (the losses upcast half "
                        f"precision), got {pred.dtype} and {target.dtype}")
    if chunk is not None and not (isinstance(chunk, int) and chunk > 0):
        raise ValueError(f"chunk must be a positive int or None, got {chunk!r}")
    _check_eps(eps)
    log = kind == "iou" and mode == "log"
    paper = kind == "ciou" and ciou_grad == "paper"
    gated = kind == "ciou" and alpha == "gated"
    grad = torch.is_grad_enabled() and (pred.requires_grad or target.requires_grad)
    if torch.compiler.is_compiling() or _is_fake(pred):
        # torch.compile / torch.export and fake tensors: the torch.library op, opaque to the
        # tracer (the kernels read raw pointers), with its fake (shape) and autograd registrations
        from . import _ops

        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        rows = (6 if target.requires_grad else 4) if grad else 0
        return _ops.iou_family_loss(pred, target, kind, eps, log, paper, gated, rows, chunk, backend)
    resolved = resolve_backend(backend, pred.device)
    if grad:
        return IoUFamilyLoss.apply(pred, target, kind, eps, log, paper, gated, chunk, resolved)
    loss, _ = _forward(kind, pred, target, eps, log, paper, gated, 0, chunk, resolved)
    return loss.view(pred.shape[:-1])
