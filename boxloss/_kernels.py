"""Analytic-gradient kernels for the IoU-family losses (IoU, GIoU, DIoU, CIoU) of matched box pairs.

:func:`iou_family_loss` computes the per-pair loss *and* its gradient with respect to both boxes in
one forward sweep and saves only the gradient, 6 numbers per pair, for backward; backward is one
scaled copy of them into the ``[N, 4]`` gradients. Values and gradients equal the plain-autograd
formulation ``boxloss.boxes._iou_family(..., pairwise=False)`` (itself torchvision's losses, with
clamped widths/heights for degenerate boxes), tie semantics of ``torch.max``/``torch.min``
included, to rounding.

How it is fast without a compiler (eager PyTorch ops only; every op writes into a preallocated
buffer):

* **q-form columns.** Each box ``(x1, y1, x2, y2)`` becomes the column ``(-x1, -y1, x2, y2)``.
  In this form the intersection box is the elementwise *min* of the two boxes' columns, the
  enclosing box the elementwise *max*, and every size is ``hi + lo`` -- one op over 4 rows
  instead of four, and bit-identical to ``min(x2, x2g) - max(x1, x1g)``.
* **Chunks that stay in cache.** Pairs are processed ``chunk`` at a time (default 32k float32 pairs
  on CPU: the ~40 rows of workspace fit in L2); the transposition into columns happens per chunk,
  so the inputs are read once from memory and the gradient rows written once.
* **Six saved numbers per pair.** The IoU family is translation invariant, so per axis the four
  coordinate gradients sum to zero: backward reconstructs the target's ``x2, y2`` gradient from the
  other six. When ``target`` needs no gradient, only the prediction's four are kept.
* **Ties.** ``torch.max``/``torch.min`` split the gradient evenly on ties; in q-form the weight of
  the prediction in the intersection is ``heaviside(q_target - q_pred, 0.5)`` (1, 0 or 1/2), and
  ``torch.lerp`` selects between the intersection and enclosing-box gradients exactly at 0 and 1.

The loss values (and gradients) per kind, with I the intersection, U the union, C the enclosing
box, rho the centre distance, c its diagonal and eps guarding every division::

    iou   1 - I / (U + eps)                          (mode="log": -ln(I / (U + eps) + eps))
    giou  1 - IoU + (|C| - U) / (|C| + eps)
    diou  1 - IoU + rho^2 / (c^2 + eps)
    ciou  diou + alpha * v,  v = 4/pi^2 (atan(w_g / (h_g + eps)) - atan(w / (h + eps)))^2,
          alpha = v / (1 - IoU + v + eps) without gradient (alpha="gated": 0 where IoU <= 0.5)

``ciou_grad="paper"`` replaces alpha * dv/d(w, h) by the authors' version without the
1 / (w^2 + h^2) factor: ``(-h, +w)`` times ``8/pi^2 * alpha * (atan(w_g/h_g) - atan(w/h))`` for the
prediction and ``(+h_g, -w_g)`` for the target.

References: Yu et al., "UnitBox", arXiv:1608.01471; Rezatofighi et al., "Generalized Intersection
over Union", arXiv:1902.09630; Zheng et al., "Distance-IoU Loss: Faster and Better Learning for
Bounding Box Regression", arXiv:1911.08287.
"""

from __future__ import annotations

import functools
import math
import threading
from types import SimpleNamespace

import torch
from torch import Tensor

__all__ = ["iou_family_loss", "IoUFamilyLoss", "KINDS", "default_chunk"]

KINDS = ("iou", "giou", "diou", "ciou")
_K4 = 4 / math.pi**2  # CIoU's v = 4/pi^2 * delta^2

# Pairs per chunk on CPU, by element size. 32k float32 pairs keep every op below PyTorch's
# intra-op grain size (32768 elements for the [C] rows; the [4, C] rows are split by TensorIterator
# only when worth it) and the ~40 workspace rows inside a 1 MiB L2.
_CPU_CHUNK_BYTES = 128 * 1024
_CUDA_CHUNK = 1 << 22  # GPU: one launch per op over up to 4M pairs caps the workspace at ~700 MB


def default_chunk(device: torch.device, dtype: torch.dtype) -> int:
    """Pairs processed per chunk: cache-sized on CPU, large on GPUs (memory cap only)."""
    if device.type == "cpu":
        return _CPU_CHUNK_BYTES // torch.empty((), dtype=dtype).element_size()
    return _CUDA_CHUNK


@functools.cache
def _clamp_grad_at_zero() -> float:
    """The subgradient autograd gives ``x.clamp(min=0)`` at x = 0 (1 in older PyTorch, 0 now).

    The reference formulation clamps widths and heights with ``clamp(min=0)``; asking autograd once
    keeps zero-width boxes bit-compatible with it on every supported PyTorch version.
    """
    with torch.enable_grad():
        x = torch.zeros((), requires_grad=True)
        (g,) = torch.autograd.grad(x.clamp(min=0), x)
    return float(g)


class _Consts:
    """Small constant tensors of one device and dtype (created once; no host-device copies later)."""

    _cache: dict = {}

    @classmethod
    def get(cls, device: torch.device, dtype: torch.dtype) -> "_Consts":
        key = (device, dtype)
        c = cls._cache.get(key)
        if c is None:
            c = cls._cache[key] = cls(device, dtype)
        return c

    def __init__(self, device: torch.device, dtype: torch.dtype):
        kw = dict(device=device, dtype=dtype)
        # x1, y1 negated: q-form columns
        self.q_sign = torch.tensor([[-1.0], [-1.0], [1.0], [1.0]], **kw)  # [4, 1]
        self.one = torch.full((), 1.0, **kw)  # 1 - x with out= (torch.rsub has no out)
        self.zero = torch.zeros((), **kw)
        # the gradient of a width/height clamped at 0, at exactly 0: what autograd's clamp does
        # (0 in current PyTorch)
        self.clamp_grad_at_zero = _clamp_grad_at_zero() != 0
        # CIoU aspect gradient: -2k for the prediction's v-derivative sign, +2k for the target's
        self.aspect_sign = torch.tensor([-2 * _K4, 2 * _K4], **kw).view(2, 1)


class _Workspace:
    """Preallocated rows for one chunk of ``cap`` pairs, with every view the kernel uses built once.

    Building a view costs about a microsecond of Python, as much as an op on a few thousand
    numbers; :meth:`views` builds them once per chunk length and keeps them.
    """

    # name: shape without the trailing chunk dimension
    _SHAPES = {
        "Q": (4, 2, 2),  # groups: pred, target (q-form), intersection (min), enclosing (max)
        "SZ": (4, 2),  # (w, h) of pred, target, intersection, enclosing, unclamped
        "CL": (3, 2),  # clamped at 0: pred, target, intersection
        "P": (3,),  # products of CL: A1, A2, inter
        "D": (2, 2),  # q_target - q_pred
        "WI": (2, 2),  # weight of the prediction in the intersection min: 1, 0 or 1/2 at ties
        "MK": (3, 2),  # clamp / intersection masks
        "F": (3, 2),  # d(area)/d(size): flipped clamped sizes times masks
        "GWH": (2, 2),  # dL/d(w, h) of pred and target (unclamped)
        "GI": (2,),  # dL/d(iw, ih)
        "GE": (2,),  # dL/d(cw, ch)
        "H": (2,),  # DIoU/CIoU: half centre offsets, then dL/d(centre offset)
        "T": (2, 2),  # lerp of GI / GE by the tie weights
        "B": (2, 2),  # GWH[0] -/+ Grx
        "A": (2, 2),  # CIoU: h + eps, then atan(w / (h + eps))
        "X": (2, 2),  # CIoU: aspect-gradient scratch
        "S": (16,),  # per-pair scalars
    }

    def __init__(self, cap: int, device: torch.device, dtype: torch.dtype):
        self.cap = cap
        sizes = {k: math.prod(s) for k, s in self._SHAPES.items()}
        flat = torch.empty(sum(sizes.values()) * cap, device=device, dtype=dtype)
        self.buf, off = {}, 0
        for k, s in self._SHAPES.items():
            n = sizes[k] * cap
            self.buf[k] = flat[off : off + n].view(*s, cap)
            off += n
        self._views: dict = {}

    def views(self, c: int) -> SimpleNamespace:
        w = self._views.get(c)
        if w is None:
            w = self._build(c)
            if c == self.cap:  # other lengths occur once per call (a short input)
                self._views[c] = w
        return w

    def _build(self, c: int) -> SimpleNamespace:
        b = {k: v[..., :c] for k, v in self.buf.items()}
        Q, SZ, CL, P, MK, F, GWH, S = (b[k] for k in ("Q", "SZ", "CL", "P", "MK", "F", "GWH", "S"))
        w = SimpleNamespace(**b)
        w.Q0f, w.Q1f = Q[0].flatten(0, 1), Q[1].flatten(0, 1)  # [4, c] targets of the transposition
        w.Q0, w.Q1, w.Q2, w.Q3 = Q.unbind(0)
        w.Qhi3, w.Qlo3, w.Qhi4, w.Qlo4 = Q[:3, 1], Q[:3, 0], Q[:, 1], Q[:, 0]
        w.SZ3, w.SZ01, w.cwh = SZ[:3], SZ[0:2], SZ[3]
        w.cw, w.ch = SZ[3].unbind(0)
        w.CLw, w.CLh = CL[:, 0], CL[:, 1]
        w.wb, w.hb = CL[0:2, 0], CL[0:2, 1]  # [2 boxes, c]
        w.iw_c, w.ih_c = CL[2].unbind(0)
        w.a1, w.a2, w.inter = P.unbind(0)
        w.D0, w.D1 = b["D"].unbind(0)
        w.WI0 = b["WI"][0]
        w.MK01, w.MKw, w.MKh = MK[0:2], MK[0:2, 0], MK[0:2, 1]
        w.MK2_0, w.MK2_1 = MK[2].unbind(0)
        w.F2, w.F01, w.F01_0, w.F01_1 = F[2], F[0:2], F[0:2, 0], F[0:2, 1]
        w.F2_0, w.F2_1 = F[2].unbind(0)
        w.GWH0, w.GWH1, w.GWH_w, w.GWH_h = GWH[0], GWH[1], GWH[:, 0], GWH[:, 1]
        w.GE0, w.GE1 = b["GE"].unbind(0)
        w.H0, w.H1 = b["H"].unbind(0)
        w.B0, w.B1 = b["B"].unbind(0)
        w.he, w.at = b["A"].unbind(0)
        w.at0, w.at1 = b["A"][1].unbind(0)
        w.aq, w.den = b["X"].unbind(0)
        w.s = S.unbind(0)
        return w


# CPU workspaces are kept between calls (one per thread, device and dtype: ~7 MB for float32):
# allocating and viewing them again costs more than a small input's whole loss.
_local = threading.local()


def _workspace(cap: int, device: torch.device, dtype: torch.dtype) -> _Workspace:
    if device.type != "cpu":
        return _Workspace(cap, device, dtype)  # the caching allocator makes this cheap on GPUs
    cache = getattr(_local, "workspaces", None)
    if cache is None:
        cache = _local.workspaces = {}
    ws = cache.get(dtype)
    if ws is None or ws.cap < cap:
        ws = cache[dtype] = _Workspace(cap, device, dtype)
    return ws


def _chunk(
    kind: str,
    p: Tensor,
    t: Tensor,
    loss: Tensor,
    grad: Tensor | None,
    w: SimpleNamespace,
    k: _Consts,
    eps: float,
    log: bool,
    paper: bool,
    gated: bool,
) -> None:
    """Loss ``[c]`` of the pairs ``p``, ``t`` (``[c, 4]``) into ``loss``; q-form gradients into ``grad``.

    ``grad`` is ``[R, c]`` with R = 6 (dL/dq of the prediction's 4 rows, then of the target's x1, y1
    rows) or 4 (prediction only), or None for values only. q = (-x1, -y1, x2, y2).
    """
    s = w.s
    box = kind != "iou"  # needs the enclosing box
    centre = kind in ("diou", "ciou")

    # q-form columns (the transposition: the only strided reads), intersection (min) and enclosing (max)
    torch.mul(p.t(), k.q_sign, out=w.Q0f)
    torch.mul(t.t(), k.q_sign, out=w.Q1f)
    torch.minimum(w.Q0, w.Q1, out=w.Q2)
    if box:
        torch.maximum(w.Q0, w.Q1, out=w.Q3)
        torch.add(w.Qhi4, w.Qlo4, out=w.SZ)  # [4, 2, c]: hi + lo = (w, h), unclamped
    else:
        torch.add(w.Qhi3, w.Qlo3, out=w.SZ3)
    torch.clamp(w.SZ3, min=0, out=w.CL)  # widths/heights at 0; the intersection relu'd
    torch.mul(w.CLw, w.CLh, out=w.P)  # [3, c]: A1, A2, inter (0 unless iw > 0 and ih > 0)
    union, ue, iou, metric = s[0], s[1], s[2], s[3]
    torch.add(w.a1, w.a2, out=union).sub_(w.inter)
    torch.add(union, eps, out=ue)
    torch.div(w.inter, ue, out=iou)

    if kind == "giou":
        area_c, area_ce, pen = s[4], s[5], s[6]
        torch.mul(w.cw, w.ch, out=area_c)
        torch.add(area_c, eps, out=area_ce)
        torch.sub(area_c, union, out=pen).div_(area_ce)
        torch.sub(iou, pen, out=metric)
    elif centre:
        c2, rho2, dterm, hc = s[4], s[5], s[6], w.H
        torch.sub(w.Q1, w.Q0, out=w.D)
        torch.mul(w.cw, w.cw, out=c2).addcmul_(w.ch, w.ch).add_(eps)  # squared diagonal of C, + eps
        torch.sub(w.D0, w.D1, out=hc).mul_(0.5)  # ((x1 + x2) - (x1g + x2g)) / 2, same for y
        torch.mul(w.H0, w.H0, out=rho2).addcmul_(w.H1, w.H1)
        torch.div(rho2, c2, out=dterm)
        torch.sub(iou, dterm, out=metric)
        if kind == "ciou":
            delta, v, alpha = s[7], s[8], s[9]
            torch.add(w.hb, eps, out=w.he)  # atan'(w/h) * d(w/h)/dh is NaN at h = 0 without the eps
            torch.div(w.wb, w.he, out=w.at).atan_()
            torch.sub(w.at1, w.at0, out=delta)
            torch.mul(delta, delta, out=v).mul_(_K4)
            torch.sub(k.one, iou, out=alpha).add_(v).add_(eps)  # (1 - iou) + v + eps
            torch.div(v, alpha, out=alpha)  # held constant: no gradient through alpha
            if gated:  # MMDetection: alpha only where IoU > 0.5
                alpha.mul_(iou > 0.5)
            metric.addcmul_(alpha, v, value=-1)
    else:
        metric = iou

    if log:
        torch.add(iou, eps, out=s[4])
        torch.log(s[4], out=loss).neg_()
    else:
        torch.sub(k.one, metric, out=loss)
    if grad is None:
        return

    # ---------------------------------------------------------------- gradient
    # with iou = I / Ue and dL/diou = -kl (1, or 1 / (iou + eps) for log):
    # dL/dI|U = -kl / Ue, dL/dU = kl iou / Ue (+ dpenalty/dU), total dL/dI = dL/dI|U - dL/dU
    r, g_u, g_i = s[10], s[11], s[12]
    torch.reciprocal(ue, out=r)
    torch.mul(iou, r, out=g_u)
    if log:
        kl = s[4].reciprocal_()  # s[4] held iou + eps
        g_u.mul_(kl)
        r.mul_(kl)
    if kind == "giou":  # penalty (|C| - U) / (|C| + eps): d/dU = -1 / (|C| + eps)
        r_c = s[13]
        torch.reciprocal(area_ce, out=r_c)
        g_u.sub_(r_c)
    torch.add(r, g_u, out=g_i).neg_()

    # clamp masks (torch.heaviside would do it in one op, but is ~30x slower than a comparison)
    if k.clamp_grad_at_zero:  # older PyTorch: clamp(min=0) passes the gradient at exactly 0
        torch.ge(w.SZ01, 0, out=w.MK01)
        torch.gt(w.SZ[2], 0, out=w.MK[2])  # the intersection mask is strict (torchvision's)
    else:
        torch.gt(w.SZ3, 0, out=w.MK)
    # d(inter)/d(iw) = ih * [iw > 0] * [ih > 0] = relu(ih) * [iw > 0] (torchvision's strict mask)
    torch.mul(w.ih_c, w.MK2_0, out=w.F2_0)
    torch.mul(w.iw_c, w.MK2_1, out=w.F2_1)
    torch.mul(w.F2, g_i, out=w.GI)  # [2, c]: dL/d(iw, ih)

    # enclosing box: gradient w.r.t. its (cw, ch), and the centre term
    if kind == "giou":  # dL/d|C| = (U + eps) / (|C| + eps)^2
        g_c = s[14]
        torch.mul(ue, r_c, out=g_c).mul_(r_c)
        torch.mul(w.ch, g_c, out=w.GE0)
        torch.mul(w.cw, g_c, out=w.GE1)
    elif centre:  # d(rho2 / c2)/dcw = -2 cw rho2 / c2^2; d/d(dc) = dc / (2 c2)
        r2, g_c = s[13], s[14]
        torch.reciprocal(c2, out=r2)
        torch.mul(dterm, r2, out=g_c).mul_(-2)
        torch.mul(w.cwh, g_c, out=w.GE)
        g_rho = hc.mul_(r2)  # [2, c]: dL/d(x1 + x2 - x1g - x2g) per axis

    # pred and target sizes: dL/d(w, h) = dL/dU * (h, w) [+ alpha dv/d(w, h)], masked by the clamp
    if kind == "ciou":
        cf = s[15]
        torch.mul(alpha, delta, out=cf)
        if paper:
            torch.mul(cf, k.aspect_sign, out=w.aq)
            hv = w.hb  # the authors' dv: no eps and no 1 / (w^2 + h^2)
        else:
            torch.mul(w.he, w.he, out=w.den).addcmul_(w.wb, w.wb)
            torch.div(cf, w.den, out=w.aq).mul_(k.aspect_sign)
            hv = w.he
        # dL/dw_b = g_u h_b + aq_b hv_b ;  dL/dh_b = g_u w_b - aq_b w_b
        torch.mul(hv, w.aq, out=w.GWH_w).addcmul_(w.hb, g_u)
        torch.sub(g_u, w.aq, out=w.GWH_h).mul_(w.wb)
        w.GWH.mul_(w.MK01)
    else:
        torch.mul(w.hb, w.MKw, out=w.F01_0)
        torch.mul(w.wb, w.MKh, out=w.F01_1)
        torch.mul(w.F01, g_u, out=w.GWH)

    # q-form coordinate gradients. For q-row (lo|hi, x|y) of the prediction:
    #   dL/dq = dL/dw + WI dL/diw + (1 - WI) dL/dcw (-/+ dL/d(centre) for lo/hi)
    # the target's: dL/dw_g + (1 - WI) dL/diw + WI dL/dcw (+/- the centre term)
    if not centre:
        torch.sub(w.Q1, w.Q0, out=w.D)
    # pred's weight in the intersection min: 1, 0, or 1/2 at a tie (torch.min splits the gradient)
    torch.sign(w.D, out=w.WI).mul_(0.5).add_(0.5)
    g1 = grad[0:4].unflatten(0, (2, 2))  # [lo|hi, x|y, c]
    if box:
        torch.lerp(w.GE, w.GI, w.WI, out=w.T)  # exact at WI in {0, 1}
    else:
        torch.mul(w.GI, w.WI, out=w.T)
    if centre:
        torch.sub(w.GWH0, g_rho, out=w.B0)
        torch.add(w.GWH0, g_rho, out=w.B1)
        torch.add(w.T, w.B, out=g1)
    else:
        torch.add(w.T, w.GWH0, out=g1)
    if grad.shape[0] == 6:  # target lo rows; its hi rows follow from translation invariance in backward
        g2 = grad[4:6]
        if box:
            torch.lerp(w.GI, w.GE, w.WI0, out=g2)
        else:
            torch.sub(k.one, w.WI0, out=g2).mul_(w.GI)
        g2.add_(w.GWH1)
        if centre:
            g2.add_(g_rho)


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
) -> tuple[Tensor, Tensor | None]:
    """Loss ``[N]`` and the q-form gradient rows ``[grad_rows, N]`` (None for ``grad_rows == 0``)."""
    p = pred.reshape(-1, 4)
    t = target.reshape(-1, 4)
    n = p.shape[0]
    loss = torch.empty(n, device=p.device, dtype=p.dtype)
    grad = torch.empty(grad_rows, n, device=p.device, dtype=p.dtype) if grad_rows else None
    if n == 0:
        return loss, grad
    cap = chunk or default_chunk(p.device, p.dtype)
    c = min(n, cap)
    w = _workspace(c, p.device, p.dtype).views(c)
    consts = _Consts.get(p.device, p.dtype)
    for s in range(0, n, c):
        s = min(s, n - c)  # the last chunk overlaps the one before: every chunk has length c
        e = s + c
        g = None if grad is None else grad[:, s:e]
        _chunk(kind, p[s:e], t[s:e], loss[s:e], g, w, consts, eps, log, paper, gated)
    return loss, grad


def _backward(grad_out: Tensor, g: Tensor, k: _Consts, need_target: bool) -> tuple[Tensor, Tensor | None]:
    """``[N, 4]`` gradients of pred and target from the saved q-form rows ``g`` and ``dL_total/dL``.

    Memory-bound: reads the saved rows once and writes each ``[N, 4]`` gradient once (strided
    writes into its transpose, as torch's elementwise kernels do well in this direction).
    """
    n = g.shape[1]
    gp = torch.empty(n, 4, device=g.device, dtype=g.dtype)
    gt = torch.empty(n, 4, device=g.device, dtype=g.dtype) if need_target else None
    gpt = gp.t()  # [4, N] view: rows x1, y1, x2, y2
    if grad_out.dim() == 0 or all(st == 0 for st in grad_out.stride()):
        # "sum" or avg_factor: one number broadcast (stride 0); scale the 4x1 q-sign by it. ("mean"
        # arrives materialised: MeanBackward divides the expanded gradient, so it takes the path below.)
        coef = k.q_sign * grad_out.reshape(-1)[:1]  # [4, 1] on the device: no host sync
        torch.mul(g[0:4], coef, out=gpt)
        if need_target:
            gtt = gt.t()
            torch.mul(g[4:6], coef[0:2], out=gtt[0:2])
            hi = torch.sub(g[0:2], g[2:4]).add_(g[4:6])  # per axis the four gradients sum to zero
            torch.mul(hi, coef[2:4], out=gtt[2:4])
        return gp, gt
    go = grad_out.reshape(1, n)
    # q = (-x1, -y1, x2, y2): the lo rows change sign; addcmul(0, g, go, value=-+1) folds both in
    torch.addcmul(k.zero, g[0:2], go, value=-1, out=gpt[0:2])
    torch.addcmul(k.zero, g[2:4], go, out=gpt[2:4])
    if need_target:
        gtt = gt.t()
        torch.addcmul(k.zero, g[4:6], go, value=-1, out=gtt[0:2])
        hi = torch.sub(g[0:2], g[2:4]).add_(g[4:6])
        torch.mul(hi, go, out=gtt[2:4])
    return gp, gt


class IoUFamilyLoss(torch.autograd.Function):
    """Autograd Function of :func:`iou_family_loss`: saves the per-pair gradient rows only.

    Not twice differentiable (the gradient is computed in closed form, not traced).
    """

    @staticmethod
    def forward(ctx, pred, target, kind, eps, log, paper, gated, chunk):
        need_p, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        rows = 6 if need_t else (4 if need_p else 0)
        loss, g = _forward(kind, pred, target, eps, log, paper, gated, rows, chunk)
        if g is not None:
            ctx.save_for_backward(g)
        ctx.need = (need_p, need_t)
        ctx.shape = pred.shape
        return loss.view(pred.shape[:-1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        need_p, need_t = ctx.need
        if not (need_p or need_t):
            return (None,) * 8
        (g,) = ctx.saved_tensors
        gp, gt = _backward(grad_out, g, _Consts.get(g.device, g.dtype), need_t)
        return (
            gp.view(ctx.shape) if need_p else None,
            gt.view(ctx.shape) if need_t else None,
            None, None, None, None, None, None,
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
) -> Tensor:
    """Per-pair IoU-family loss ``[...]`` of matched xyxy boxes ``[..., 4]``, analytic gradients.

    The fast path of :func:`boxloss.iou_loss`, :func:`boxloss.giou_loss`, :func:`boxloss.diou_loss`
    and :func:`boxloss.ciou_loss` (which validate arguments, upcast half precision and reduce):
    the inputs here must already be float32 or float64 tensors of the same shape, dtype and device.

    Args:
        pred, target: ``[..., 4]`` xyxy boxes.
        kind: ``"iou"``, ``"giou"``, ``"diou"`` or ``"ciou"``.
        eps: guards every division (see the module docstring for where it enters).
        mode: IoU loss only: ``"linear"`` (1 - IoU) or ``"log"`` (-ln(IoU + eps), UnitBox).
        ciou_grad: ``"exact"`` (autograd's and torchvision's gradient) or ``"paper"`` (alpha dv/dw
            without the 1 / (w^2 + h^2) factor, as the authors' implementation).
        alpha: ``"standard"`` or ``"gated"`` (MMDetection: alpha = 0 where IoU <= 0.5).
        chunk: pairs per chunk (default :func:`default_chunk`); results do not depend on it.

    Returns:
        The unreduced loss ``[...]``. Its backward needs 6 numbers per pair (4 when ``target``
        does not require grad): 24 bytes in float32, against ~112-152 for torchvision's tape.
    """
    log = kind == "iou" and mode == "log"
    paper = kind == "ciou" and ciou_grad == "paper"
    gated = kind == "ciou" and alpha == "gated"
    if torch.is_grad_enabled() and (pred.requires_grad or target.requires_grad):
        return IoUFamilyLoss.apply(pred, target, kind, eps, log, paper, gated, chunk)
    loss, _ = _forward(kind, pred.detach(), target.detach(), eps, log, paper, gated, 0, chunk)
    return loss.view(pred.shape[:-1])
