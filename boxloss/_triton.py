"""Triton kernels of the IoU-family losses: the GPU backend of :mod:`boxloss._kernels`.

One forward kernel writes each pair's loss and the rows of its gradient that backward needs, one
backward kernel scales them by the incoming gradient and writes the ``[N, 4]`` gradients. The
formulas, their order and the saved layout are those of the compiled CPU loops
(``boxloss/_native_kernel.h``, which follows the eager kernel op for op): the gradient of -L with
respect to q = (-x1, -y1, x2, y2), rows pred lo (x, y), [target lo (x, y),] pred hi (x, y); the
target's hi rows follow in backward from translation invariance (the four x-gradients of a pair
sum to zero, likewise y). The module docstring of ``boxloss._kernels`` derives them.

Where the GPU differs from the other kernels:

* **Angles.** Triton has no ``atan`` that its interpreter can run (libdevice calls are not
  interpreted), so CIoU's atan2(w, h) = atan(w / h) is Cephes' ``atan`` (range reduction by
  tan(3pi/8) and 0.66, a rational P/Q of degree 4/5): below 1 ulp in float64, a few ulp in float32
  (its coefficients rounded), against torch.atan's correctly rounded ones. The CPU kernels share
  their angles bit for bit; this one agrees with them to rounding.
* **Divisions.** A float32 ``/`` in Triton is ``div.full.f32`` (2 ulp, and 0 beyond 2^126); every
  float32 division here is ``div_rn`` (IEEE), as on the CPU and in the interpreter.
* **Constants** (eps, the atan coefficients) come from a small tensor of the computation's dtype:
  a Python float in a Triton kernel is a float32 constant, which would round pi/2 and eps in
  float64 (and make an eps below 1e-38 zero).

Run on CPU tensors through Triton's interpreter with ``TRITON_INTERPRET=1`` (the parity tests do;
``boxloss._kernels`` loads an interpreted copy of this module when the variable is set after the
first import). Float16/bfloat16 never reach these kernels: the losses upcast to float32.
"""

from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from boxloss._kernels import KINDS  # absolute: this module may also be loaded a second time, interpreted

__all__ = ["forward", "backward", "BLOCK"]

# Pairs per program (4 warps: 2 pairs a thread). ptxas for sm_90a, CIoU with 6 rows: 101 registers
# in float32, 186 in float64, no spills; at 512 float64 spills (255 registers, 176 bytes).
BLOCK = 256

# Cephes atan (double): x > tan(3pi/8): pi/2 + atan(-1/x); x > 0.66: pi/4 + atan((x - 1)/(x + 1));
# atan(x) = x + x z P(z)/Q(z), z = x^2, on the reduced range, plus the low bits of pi/2 (MOREBITS)
_T3P8 = 2.41421356237309504880
_MOREBITS = 6.123233995736765886130e-17
_P = (-8.750608600031904122785e-1, -1.615753718733365076637e1, -7.500855792314704667340e1,
      -1.228866684490136173410e2, -6.485021904942025371773e1)
_Q = (2.485846490142306297962e1, 1.650270098316988542046e2, 4.328810604912902668951e2,
      4.853903996359136964868e2, 1.945506571482613964425e2)
_K4 = 4 / math.pi**2  # CIoU's v = 4/pi^2 * delta^2
_KIND_ID = {kind: i for i, kind in enumerate(KINDS)}  # the ids the C loops use too

_consts: dict = {}


def _constants(device: torch.device, dtype: torch.dtype, eps: float) -> Tensor:
    """[eps, k4, tiny, pi/2, pi/4, tan(3pi/8), morebits, P0..P4, Q0..Q4] in ``dtype`` on ``device``."""
    key = (device, dtype, eps)
    c = _consts.get(key)
    if c is None:
        if len(_consts) > 64:  # many distinct eps values: do not grow without bound
            _consts.clear()
        values = [eps, _K4, torch.finfo(dtype).tiny, math.pi / 2, math.pi / 4, _T3P8, _MOREBITS, *_P, *_Q]
        c = _consts[key] = torch.tensor(values, dtype=dtype, device=device)
    return c


@triton.jit
def _div(a, b, F64: tl.constexpr):
    if F64:
        return a / b
    else:
        return tl.math.div_rn(a, b)  # IEEE; a float32 "/" is div.full.f32 (2 ulp)


@triton.jit
def _relu(x):
    return tl.where(x < 0, 0.0, x)  # clamp(min=0) with NaN kept, as torch.clamp


@triton.jit
def _sign(x):
    return (x > 0).to(x.dtype) - (x < 0).to(x.dtype)


@triton.jit
def _lerp(a, b, w):
    # torch.lerp: exact at w = 0 and w = 1
    return tl.where(w < 0.5, a + w * (b - a), b - (b - a) * (1.0 - w))


@triton.jit
def _angle(w, h, c_ptr, F64: tl.constexpr):
    """atan2(w, h) of clamped sizes as atan(w / h), 0 / 0 read as 0 and w / -0 as +inf (as the CPU
    kernels), by Cephes' atan."""
    r = _div(w, h, F64)
    r = tl.where(r != r, 0.0, r)
    r = tl.where(r == float("-inf"), float("inf"), r)
    pio2 = tl.load(c_ptr + 3)
    pio4 = tl.load(c_ptr + 4)
    t3p8 = tl.load(c_ptr + 5)
    more = tl.load(c_ptr + 6)
    big = r > t3p8
    mid = r > 0.66
    x = tl.where(big, _div(tl.full(r.shape, -1.0, r.dtype), r, F64), tl.where(mid, _div(r - 1.0, r + 1.0, F64), r))
    y = tl.where(big, pio2, tl.where(mid, pio4, 0.0))
    lo = tl.where(big, more, tl.where(mid, 0.5 * more, 0.0))
    z = x * x
    p = (((tl.load(c_ptr + 7) * z + tl.load(c_ptr + 8)) * z + tl.load(c_ptr + 9)) * z + tl.load(c_ptr + 10)) * z
    p = p + tl.load(c_ptr + 11)
    q = (((z + tl.load(c_ptr + 12)) * z + tl.load(c_ptr + 13)) * z + tl.load(c_ptr + 14)) * z + tl.load(c_ptr + 15)
    q = q * z + tl.load(c_ptr + 16)
    return y + ((x * _div(z * p, q, F64) + x) + lo)


@triton.jit
def _forward_kernel(pred_ptr, target_ptr, loss_ptr, grad_ptr, c_ptr, n,
                    KIND: tl.constexpr, ROWS: tl.constexpr, LOG: tl.constexpr, PAPER: tl.constexpr,
                    GATED: tl.constexpr, F64: tl.constexpr, BLOCK: tl.constexpr):
    """Loss of pairs [pid * BLOCK, ...) into loss_ptr; ROWS (0, 4, 6) gradient rows of n into grad_ptr."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    x1 = tl.load(pred_ptr + 4 * i, mask=m, other=0.0)
    y1 = tl.load(pred_ptr + 4 * i + 1, mask=m, other=0.0)
    x2 = tl.load(pred_ptr + 4 * i + 2, mask=m, other=0.0)
    y2 = tl.load(pred_ptr + 4 * i + 3, mask=m, other=0.0)
    X1 = tl.load(target_ptr + 4 * i, mask=m, other=0.0)
    Y1 = tl.load(target_ptr + 4 * i + 1, mask=m, other=0.0)
    X2 = tl.load(target_ptr + 4 * i + 2, mask=m, other=0.0)
    Y2 = tl.load(target_ptr + 4 * i + 3, mask=m, other=0.0)
    eps = tl.load(c_ptr)
    zero = tl.full(x1.shape, 0.0, x1.dtype)  # not tl.zeros_like: a jit function of triton.language, which
    # is compiled or interpreted as decided when triton was first imported

    # phase 1: sizes (unclamped), intersection and enclosing box, edge differences
    w = x2 - x1
    h = y2 - y1
    wg = X2 - X1
    hg = Y2 - Y1
    iw = tl.where(x2 < X2, x2, X2) - tl.where(x1 > X1, x1, X1)
    ih = tl.where(y2 < Y2, y2, Y2) - tl.where(y1 > Y1, y1, Y1)
    cw = tl.where(x2 > X2, x2, X2) - tl.where(x1 < X1, x1, X1)
    ch = tl.where(y2 > Y2, y2, Y2) - tl.where(y1 < Y1, y1, Y1)
    dx1 = x1 - X1
    dy1 = y1 - Y1
    dx2 = x2 - X2
    dy2 = y2 - Y2

    # phase 2: values
    wc = _relu(w)
    hc = _relu(h)
    wgc = _relu(wg)
    hgc = _relu(hg)
    iwc = _relu(iw)
    ihc = _relu(ih)
    a1 = wc * hc
    a2 = wgc * hgc
    inter = iwc * ihc
    uni = (a1 + a2) - inter
    ue = uni + eps
    iou = _div(inter, ue, F64)
    metric = iou
    ace = zero
    c2 = zero
    hcx = zero
    hcy = zero
    dterm = zero
    delta = zero
    alpha = zero
    if KIND == 1:  # giou
        area_c = cw * ch
        ace = area_c + eps
        metric = iou - _div(area_c - uni, ace, F64)
    if KIND >= 2:  # diou, ciou
        c2 = (cw * cw + ch * ch) + eps
        hcx = (dx1 + dx2) * -0.5
        hcy = (dy1 + dy2) * -0.5
        dterm = _div(hcx * hcx + hcy * hcy, c2, F64)
        metric = iou - dterm
        if KIND == 3:
            delta = _angle(wgc, hgc, c_ptr, F64) - _angle(wc, hc, c_ptr, F64)
            v = (delta * delta) * tl.load(c_ptr + 1)
            alpha = _div(v, ((1.0 - iou) + v) + eps, F64)
            if GATED:  # MMDetection: alpha only where IoU > 0.5
                alpha = alpha * tl.where(iou > 0.5, 1.0, 0.0)
            metric = metric - alpha * v
    lg = iou + eps
    lg = tl.where(lg > 1.0, 1.0, lg)  # the log loss is >= 0: capped at 1 (NaN kept, as torch.clamp)
    if LOG:
        tl.store(loss_ptr + i, -tl.log(lg), mask=m)
    else:
        tl.store(loss_ptr + i, 1.0 - metric, mask=m)

    if ROWS > 0:
        # phase 3: gradient of -L (m_u = d(-L)/dU, m_i = d(-L)/dI through U too)
        r = _div(1.0 + zero, ue, F64)
        if KIND == 1:
            rc = _div(1.0 + zero, ace, F64)
            m_u = rc - iou * r
        else:
            if LOG:  # no gradient where the cap holds
                r = _div(r, lg, F64) * tl.where(lg < 1.0, 1.0, 0.0)
            m_u = 0.0 - iou * r
        m_i = r - m_u
        gex = zero
        gey = zero
        grx = zero
        gry = zero
        if KIND == 1:
            g_c = 0.0 - (ue * rc) * rc
            gex = ch * g_c
            gey = cw * g_c
        if KIND >= 2:
            r2 = _div(1.0 + zero, c2, F64)
            g_c = 2.0 * dterm * r2
            gex = cw * g_c
            gey = ch * g_c
            grx = hcx * r2
            gry = hcy * r2
        # subgradients: the intersection's area mask, one mask per box for its clamped sizes
        mi = tl.where(inter > 0, 1.0, 0.0) + zero
        vp = tl.where((w >= 0) & (h >= 0), 1.0, 0.0) + zero
        vg = tl.where((wg >= 0) & (hg >= 0), 1.0, 0.0) + zero
        if KIND == 3:
            cf = delta * alpha
            two_k4 = 2.0 * tl.load(c_ptr + 1)
            tiny = tl.load(c_ptr + 2)
            if PAPER:  # the authors' dv: no 1 / (w^2 + h^2)
                aqp = cf * two_k4
                aqg = cf * -two_k4
            else:  # d atan2(w, h)/d(w, h) = (h, -w) / (w^2 + h^2), the denominator clamped at tiny
                dp = hc * hc + wc * wc
                dg = hgc * hgc + wgc * wgc
                dp = tl.where(dp < tiny, tiny, dp)
                dg = tl.where(dg < tiny, tiny, dg)
                aqp = _div(cf, dp, F64) * two_k4
                aqg = _div(cf, dg, F64) * -two_k4
            gwp = (hc * aqp + hc * m_u) * vp
            gwg = (hgc * aqg + hgc * m_u) * vg
            ghp = ((m_u - aqp) * wc) * vp
            ghg = ((m_u - aqg) * wgc) * vg
            mi = mi * m_i
            giw = ihc * mi
            gih = iwc * mi
        else:
            q0 = vp * m_u
            q1 = vg * m_u
            q2 = mi * m_i
            gwp = hc * q0
            ghp = wc * q0
            gwg = hgc * q1
            ghg = wgc * q1
            giw = ihc * q2
            gih = iwc * q2
        # the prediction's weight in the intersection's edges: 1, 0 or 1/2 at a tie (torch.max/min)
        wix = 0.5 + 0.5 * _sign(dx1)
        wiy = 0.5 + 0.5 * _sign(dy1)
        wjx = 0.5 + -0.5 * _sign(dx2)
        wjy = 0.5 + -0.5 * _sign(dy2)
        if KIND == 0:
            t0x = giw * wix
            t0y = gih * wiy
            t1x = giw * wjx
            t1y = gih * wjy
        else:
            t0x = _lerp(gex, giw, wix)
            t0y = _lerp(gey, gih, wiy)
            t1x = _lerp(gex, giw, wjx)
            t1y = _lerp(gey, gih, wjy)
        tl.store(grad_ptr + i, t0x + (gwp - grx), mask=m)
        tl.store(grad_ptr + n + i, t0y + (ghp - gry), mask=m)
        tl.store(grad_ptr + (ROWS - 2) * n + i, t1x + (gwp + grx), mask=m)
        tl.store(grad_ptr + (ROWS - 1) * n + i, t1y + (ghp + gry), mask=m)
        if ROWS == 6:  # the target's lo rows
            if KIND == 0:
                ux = (1.0 - wix) * giw
                uy = (1.0 - wiy) * gih
            else:
                ux = _lerp(giw, gex, wix)
                uy = _lerp(gih, gey, wiy)
            tl.store(grad_ptr + 2 * n + i, (ux + grx) + gwg, mask=m)
            tl.store(grad_ptr + 3 * n + i, (uy + gry) + ghg, mask=m)


@triton.jit
def _backward_kernel(grad_ptr, go_ptr, go_stride, gp_ptr, gt_ptr, n,
                     ROWS: tl.constexpr, NEED_T: tl.constexpr, BLOCK: tl.constexpr):
    """dL/d(pred), dL/d(target) ``[n, 4]`` from the saved rows and dL_total/dL (stride go_stride)."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    o = tl.load(go_ptr + i * go_stride, mask=m, other=0.0)
    p0 = tl.load(grad_ptr + i, mask=m, other=0.0) * o
    p1 = tl.load(grad_ptr + n + i, mask=m, other=0.0) * o
    # the saved rows are d(-L)/dq, q = (-x1, -y1, x2, y2): lo rows are dL/dx1 already, hi rows flip
    p2 = 0.0 - tl.load(grad_ptr + (ROWS - 2) * n + i, mask=m, other=0.0) * o
    p3 = 0.0 - tl.load(grad_ptr + (ROWS - 1) * n + i, mask=m, other=0.0) * o
    tl.store(gp_ptr + 4 * i, p0, mask=m)
    tl.store(gp_ptr + 4 * i + 1, p1, mask=m)
    tl.store(gp_ptr + 4 * i + 2, p2, mask=m)
    tl.store(gp_ptr + 4 * i + 3, p3, mask=m)
    if NEED_T:
        t0 = tl.load(grad_ptr + 2 * n + i, mask=m, other=0.0) * o
        t1 = tl.load(grad_ptr + 3 * n + i, mask=m, other=0.0) * o
        tl.store(gt_ptr + 4 * i, t0, mask=m)
        tl.store(gt_ptr + 4 * i + 1, t1, mask=m)
        tl.store(gt_ptr + 4 * i + 2, -((p0 + p2) + t0), mask=m)  # the four x-gradients of a pair sum to 0
        tl.store(gt_ptr + 4 * i + 3, -((p1 + p3) + t1), mask=m)


def _quiet():
    """The interpreter runs the kernel as numpy ops on every lane, masked or not selected too: no
    warnings for the 0 / 0 that tl.where then discards."""
    if isinstance(_forward_kernel, triton.runtime.jit.JITFunction):
        return contextlib.nullcontext()
    import numpy as np

    return np.errstate(all="ignore")


def _on(device: torch.device):
    """Triton launches on the current CUDA device: make it the tensors' (cuda:1 beside a current 0)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def forward(kind: str, pred: Tensor, target: Tensor, eps: float, log: bool, paper: bool, gated: bool,
            rows: int) -> tuple[Tensor, Tensor | None]:
    """Loss ``[N]`` and the gradient rows ``[rows, N]`` (None for ``rows == 0``) of ``[N, 4]`` pairs."""
    p, t = pred.detach().reshape(-1, 4).contiguous(), target.detach().reshape(-1, 4).contiguous()
    n, device, dtype = p.shape[0], p.device, p.dtype
    loss = torch.empty(n, device=device, dtype=dtype)
    grad = torch.empty((rows, n), device=device, dtype=dtype) if rows else None
    if n:
        c = _constants(device, dtype, eps)
        with _quiet(), _on(device):
            _forward_kernel[(triton.cdiv(n, BLOCK),)](
                p, t, loss, grad if grad is not None else loss, c, n,
                KIND=_KIND_ID[kind], ROWS=rows, LOG=log, PAPER=paper, GATED=gated, F64=dtype == torch.float64,
                BLOCK=BLOCK)
    return loss, grad


def backward(grad_out: Tensor, g: Tensor, need_target: bool) -> tuple[Tensor, Tensor | None]:
    """``[N, 4]`` gradients of pred and target from the saved rows ``g`` ``[rows, N]``."""
    rows, n = g.shape
    gp = torch.empty((n, 4), device=g.device, dtype=g.dtype)
    gt = torch.empty((n, 4), device=g.device, dtype=g.dtype) if need_target else None
    if n:
        go = grad_out.reshape(-1)  # "sum"/"mean" give an expanded (stride-0) gradient: read as is
        with _on(g.device):
            _backward_kernel[(triton.cdiv(n, BLOCK),)](
                g, go, go.stride(0), gp, gt if gt is not None else gp, n,
                ROWS=rows, NEED_T=need_target, BLOCK=BLOCK)
    return gp, gt
