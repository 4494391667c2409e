"""Convergence simulation of bounding-box regression (the DIoU paper's Algorithm 1, Fig. 3(b), Fig. 4).

Every anchor box is regressed to every target box by plain gradient steps on its ``(x, y, w, h)``,
and the l1 error to the target is recorded at every iteration. The protocol (docs/simulation.md):

* targets: 7 boxes of area 1 centred at (10, 10) with w:h = 1:4, 1:3, 1:2, 1:1, 2:1, 3:1, 4:1, i.e.
  ``(w, h) = (sqrt(r), 1 / sqrt(r))``;
* anchors: ``points`` centres area-uniform in the disc of radius 3 around (10, 10) (radius
  ``3 sqrt(U)``, angle ``2 pi U``; seeded), at each centre 7 areas (0.5, 0.67, 0.75, 1, 1.33, 1.5, 2)
  x the same 7 aspect ratios; every anchor regresses to every target, so there are
  ``points * 343`` cases (1,715,000 for the paper's 5,000 points);
* ``T`` iterations of ``B_t = B_{t-1} + eta_t (2 - IoU_{t-1}) D_{t-1}`` with D the descent direction
  and ``eta_t = 0.1`` for ``t <= 160``, 0.01 for 161-180 and 0.001 after;
* error: ``|B_t - G|_1`` over ``(x, y, w, h)``; the curve is its total over all cases per iteration,
  and the map (the paper's Fig. 4) is the final error summed over the 343 cases of each centre.

Two direction modes:

``"exact"``
    ``D = -dL/d(x, y, w, h)`` of the true loss, with ``grad`` choosing how it is computed:
    ``"analytic"`` (default, fast): the closed-form gradients on ``(x, y, w, h)`` written out in
    this module; ``"loss"``: autograd through the public losses of :mod:`boxloss.losses` on xyxy boxes
    (so whatever kernels they run on), chained to ``(x, y, w, h)`` by ``dL/dx = g_x1 + g_x2``,
    ``dL/dw = (g_x2 - g_x1) / 2`` (likewise y, h); ``"autograd"``: the same through the plain
    reference formulas (:func:`boxloss.boxes._iou_family`). All three agree to rounding at every
    step. CIoU holds alpha constant and differentiates v exactly (``ciou_grad="exact"``,
    torchvision's gradient). ``l1``, ``l2`` and ``smooth_l1`` (beta = 1) act on ``(x, y, w, h)``
    directly.

    The losses after CIoU (:data:`AUTOGRAD_LOSSES`: EIoU, Focal-EIoU, SIoU, alpha-CIoU, Wise-IoU v1
    and v3, MPDIoU, Inner-CIoU, Focaler-CIoU) have no closed form here: their direction is always
    autograd through the public loss (whatever ``grad`` says), with the options of
    :data:`AUTOGRAD_LOSSES`. Two need a choice the toy does not make by itself: MPDIoU's image is
    the square [0, 20]^2 around the targets (``image_size=(20, 20)``, :data:`MPDIOU_IMAGE_SIZE`),
    and Wise-IoU v3's mean of L_IoU is taken, at every step, over the 343 cases of each anchor centre
    (the cases of one location play the part of one image's positives; a mean over the chunk would
    make results depend on the chunk size).

``"paper"``
    The authors' hand-written directions, with which the published figure was made.
    They are ascent directions of the IoU-family *metric* worked out on the edges
    ``(t, b, l, r) = (y - h/2, y + h/2, x - w/2, x + w/2)`` and mapped back with ``dx = dl + dr``,
    ``dw = dr - dl`` (likewise y, h), so w/h steps are twice the chain rule. GIoU keeps their
    unclamped intersection; DIoU flips the sign of the enclosing-box part of the x/y step and forces
    ``dC_w/dw = -1`` when the prediction encloses the target; CIoU drops the ``1 / (w^2 + h^2)``
    factor of ``dv/d(w, h)``. Their MATLAB also builds ``dC_w`` and ``dC_h`` from the same
    expression (a copy error absent from their darknet code); that error is *not* reproduced here.
    Only for ``iou``, ``giou``, ``diou`` and ``ciou``.

Under both modes the IoU-family dynamics are chaotic for a minority of cases (the steps overshoot
and bounce around the kinks of min/max): a change of one ulp in the start, or a different order of
floating-point operations, grows beyond 1e-9 within 30-90 iterations for those cases. Total-error
curves are robust to this; individual trajectories are not.

The engine works on ``[4, n]`` tensors (rows x, y, w, h), vectorised over cases and chunked: a chunk of
``chunk_points * 343`` cases small enough to stay in cache runs through all ``T`` iterations before the
next chunk starts; on a CPU, ``workers`` chunks can run at once in threads (torch's intra-op threads
stay as the caller set them).

Reference:
    Zheng et al., "Distance-IoU Loss: Faster and Better Learning for Bounding Box Regression",
    AAAI 2020, arXiv:1911.08287 (Algorithm 1, Fig. 3(b), Fig. 4).
"""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ._kernels import KINDS

__all__ = [
    "LOSSES",
    "ANALYTIC_LOSSES",
    "AUTOGRAD_LOSSES",
    "PAPER_LOSSES",
    "MODES",
    "GRADS",
    "TARGET_RATIOS",
    "ANCHOR_AREAS",
    "CASES_PER_POINT",
    "SimulationResult",
    "num_cases",
    "step_size",
    "anchor_centres",
    "make_cases",
    "descent_direction",
    "simulate",
    "iterations_to_fraction",
]

ANALYTIC_LOSSES = KINDS + ("l1", "l2", "smooth_l1")  # closed-form exact directions
# name -> (boxloss.get_loss name, options): directions by autograd through the public loss
AUTOGRAD_LOSSES = {
    "eiou": ("eiou", {}),
    "focal_eiou": ("eiou", {"focal_gamma": 0.5}),  # the paper's gamma
    "siou": ("siou", {}),
    "alpha_ciou": ("alpha_iou", {"alpha": 3.0, "kind": "ciou"}),  # the paper's recommended alpha
    "wise_iou_v1": ("wise_iou", {"version": 1}),
    "wise_iou": ("wise_iou", {"version": 3}),  # iou_mean per anchor centre, see _variant_loss
    "mpdiou": ("mpdiou", {}),  # image_size = MPDIOU_IMAGE_SIZE
    "inner_ciou": ("ciou", {"inner_ratio": 0.8}),
    "focaler_ciou": ("ciou", {"focaler": (0.0, 0.95)}),  # the paper's default range
}
LOSSES = ANALYTIC_LOSSES + tuple(AUTOGRAD_LOSSES)
PAPER_LOSSES = KINDS  # the authors gave directions for the IoU family only
MPDIOU_IMAGE_SIZE = (20.0, 20.0)  # the targets are centred at (10, 10), every anchor within 3 + 2 of it
MODES = ("exact", "paper")
GRADS = ("analytic", "loss", "autograd")

# w:h of the targets and of the anchors at every centre: 1:4, 1:3, 1:2, 1:1, 2:1, 3:1, 4:1
TARGET_RATIOS = (1 / 4, 1 / 3, 1 / 2, 1.0, 2.0, 3.0, 4.0)
# anchor areas relative to the target area 1 (the paper's rounded 0.67 and 1.33, as published)
ANCHOR_AREAS = (0.5, 0.67, 0.75, 1.0, 1.33, 1.5, 2.0)
CASES_PER_POINT = len(TARGET_RATIOS) * len(ANCHOR_AREAS) * len(TARGET_RATIOS)  # 343
CENTRE = (10.0, 10.0)
RADIUS = 3.0

_EPS = 1e-7  # the losses' eps (exact mode); the paper's alpha also adds 1e-7
_FOUR_OVER_PI2 = 4 / math.pi**2
_EIGHT_OVER_PI2 = 8 / math.pi**2
_SMOOTH_L1_BETA = 1.0


# --------------------------------------------------------------------------- protocol


def num_cases(points: int) -> int:
    """Number of regression cases for ``points`` anchor centres: ``points * 343``."""
    return points * CASES_PER_POINT


def step_size(t: int) -> float:
    """The step eta_t of iteration ``t`` (1-based): 0.1 for t <= 160, 0.01 for 161-180, 0.001 after."""
    if t <= 160:
        return 0.1
    if t <= 180:
        return 0.01
    return 0.001


def anchor_centres(points: int, seed: int = 0) -> Tensor:
    """``[points, 2]`` float64 anchor centres, area-uniform in the disc of radius 3 around (10, 10).

    Radius ``3 sqrt(U1)`` and angle ``2 pi U2`` with U1, U2 uniform on [0, 1) from a CPU generator
    seeded with ``seed``, so every device and dtype sees the same anchors.
    """
    _check_int("points", points, minimum=1)
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(2, points, generator=gen, dtype=torch.float64)
    r = RADIUS * u[0].sqrt()
    theta = 2 * math.pi * u[1]
    return torch.stack((CENTRE[0] + r * theta.cos(), CENTRE[1] + r * theta.sin()), dim=1)


def _case_sizes() -> tuple[Tensor, Tensor]:
    """The 343 (anchor (w, h), target (w, h)) pairs of one centre, ``[343, 2]`` each, float64.

    Order: target ratio, then anchor area, then anchor ratio (the paper's loop order).
    """
    anchor, target = [], []
    for rg in TARGET_RATIOS:
        wg, hg = math.sqrt(rg), 1 / math.sqrt(rg)
        for area in ANCHOR_AREAS:
            for r in TARGET_RATIOS:
                anchor.append((math.sqrt(area * r), math.sqrt(area / r)))
                target.append((wg, hg))
    return torch.tensor(anchor, dtype=torch.float64), torch.tensor(target, dtype=torch.float64)


def make_cases(centres: Tensor, dtype: torch.dtype = torch.float64, device="cpu") -> tuple[Tensor, Tensor]:
    """Anchor and target boxes for the given centres, as ``(x, y, w, h)`` ``[4, len(centres) * 343]``.

    Case ``i`` belongs to centre ``i // 343``; within a centre the order is target ratio, anchor
    area, anchor ratio. Targets are centred at (10, 10).

    Returns:
        ``(anchors, targets)``, each ``[4, n]`` (rows x, y, w, h) in ``dtype`` on ``device``.
    """
    anchor_wh, target_wh = _case_sizes()
    k = centres.shape[0]
    xy = centres.to(torch.float64).repeat_interleave(CASES_PER_POINT, dim=0)  # [n, 2]
    anchors = torch.cat((xy, anchor_wh.repeat(k, 1)), dim=1)
    targets = torch.cat((torch.tensor(CENTRE, dtype=torch.float64).expand(len(xy), 2), target_wh.repeat(k, 1)), 1)
    return (
        anchors.T.to(device=device, dtype=dtype).contiguous(),
        targets.T.to(device=device, dtype=dtype).contiguous(),
    )


# --------------------------------------------------------------------------- directions
#
# A chunk's state is its predictions B, [4, n] (rows x, y, w, h). Per axis (row 0: x and w, row 1:
# y and h) the prediction's edges are lo = x - w/2 and hi = x + w/2 (l, r; t, b for y), computed
# exactly as the losses compute x1, x2, so exact-mode branch decisions (min/max, sign) see the same
# numbers as autograd through the losses. The intersection and enclosing extents are
#     I_e = min(hi, hi_g) - max(lo, lo_g)   (unclamped: negative when the boxes are apart),
#     C_e = max(hi, hi_g) - min(lo, lo_g).
# Quantities of both axes are [2, n] tensors, so one op serves x and y (or w and h). A derivative
# on one axis scales with the other axis' extent (dI/dl = -I_h): I_o and C_o are I_e and C_e with
# their rows swapped (_Chunk.other), S_o is h on the w row and w on the h row. Indicators come from
# torch.sign and clamp: bool tensors are slow on a CPU.
#
# Each quantity is written into its own buffer of the chunk, named like the variable that holds
# it (``inter = torch.mul(..., out=buf.inter)``), and the buffers are reused at every step; ``tmp``
# only holds a value used within the same statement. With fresh tensors at every step, glibc hands
# the freed top of its heap back to the kernel after each step and the next step page-faults it in
# again: about three times the run time at the default chunk size (docs/simulation.md).


class _Buffers:
    """One output tensor per quantity, by attribute name, created empty on first use.

    ``torch.mul(a, b, out=buf.inter)`` sizes ``buf.inter`` at the first step and reuses its memory
    at every later one. A name holds one quantity only: that of the variable of the same name.
    """

    def __init__(self, like: Tensor):
        self._like = like

    def __getattr__(self, name: str) -> Tensor:  # only called for names not set yet
        if name.startswith("_"):
            raise AttributeError(name)
        t = self._like.new_empty(0)
        setattr(self, name, t)
        return t


class _Chunk:
    """The cases of one chunk: the predictions ``boxes`` ``[4, n]`` (the state, stepped in place),
    the target constants, the direction ``d`` ``[4, n]`` and the buffers of the quantities."""

    def __init__(self, boxes: Tensor, targets: Tensor):
        self.boxes, self.targets = boxes, targets  # [4, n] each, rows x, y, w, h
        # views, made once (each indexing op costs a dispatch): they follow the steps
        self.pos, self.size = boxes[:2], boxes[2:]
        self.w, self.h = boxes[2], boxes[3]
        self.pos_g, self.size_g = targets[:2], targets[2:]
        half_g = 0.5 * self.size_g
        self.lo_g, self.hi_g = self.pos_g - half_g, self.pos_g + half_g  # (l_g, t_g), (r_g, b_g)
        self.area_g = self.size_g[0] * self.size_g[1]
        self.atan_g = torch.atan(self.size_g[0] / self.size_g[1])  # the authors' atan(w_g / h_g)
        self.d = torch.empty_like(boxes)  # the direction, rows x, y, w, h
        self.d_pos, self.d_size, self.d_w, self.d_h = self.d[:2], self.d[2:], self.d[2], self.d[3]
        self.buf = _Buffers(boxes)
        self._swap = torch.tensor([1, 0], device=boxes.device)

    def other(self, t: Tensor, out: Tensor) -> Tensor:
        """``t`` ``[2, n]`` with its rows swapped: each axis gets the other axis' value."""
        return torch.index_select(t, 0, self._swap, out=out)


def _geometry(c: _Chunk) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(lo, hi, sign(lo - lo_g), sign(hi - hi_g), C_e)`` of the chunk's predictions, each ``[2, n]``."""
    buf = c.buf
    # x -/+ w/2 in one rounding, as the losses' x1, x2 (w/2 is exact)
    lo = torch.add(c.pos, c.size, alpha=-0.5, out=buf.lo)  # (l, t) = (x1, y1)
    hi = torch.add(c.pos, c.size, alpha=0.5, out=buf.hi)  # (r, b) = (x2, y2)
    # +1: the prediction's low edge lies inside the target's / its high edge lies outside
    s_lo = torch.sub(lo, c.lo_g, out=buf.s_lo).sign_()
    s_hi = torch.sub(hi, c.hi_g, out=buf.s_hi).sign_()
    c_ext = torch.maximum(hi, c.hi_g, out=buf.c_ext).sub_(torch.minimum(lo, c.lo_g, out=buf.tmp))
    return lo, hi, s_lo, s_hi, c_ext


def _intersection(c: _Chunk, lo: Tensor, hi: Tensor, out: Tensor) -> Tensor:
    """I_e ``[2, n]`` of the prediction with edges ``lo``, ``hi``, unclamped, into ``out``."""
    return torch.minimum(hi, c.hi_g, out=out).sub_(torch.maximum(lo, c.lo_g, out=c.buf.tmp))


def _paper_direction(kind: str, c: _Chunk) -> tuple[Tensor, Tensor]:
    """The authors' direction ``[4, n]`` (an ascent direction of the metric) and their IoU ``[n]``.

    Indicators are strict, as their if/else (0 at ties): a_lo = [lo > lo_g] (the prediction owns
    the intersection's low edge), a_hi = [hi < hi_g], b_lo = [lo < lo_g] (it owns the enclosing
    box's low edge), b_hi = [hi > hi_g]. Worked out on the edges and mapped by dx = dlo + dhi,
    dw = dhi - dlo (likewise y, h):

    * IoU: ``(U dI - I dU) / U^2`` with dI/dlo = -I_o a_lo, dI/dhi = +I_o a_hi (I_o: the
      intersection's extent on the other axis), dX/dlo = -S_o, dX/dhi = +S_o (X the prediction's
      area, S_o its extent on the other axis), dU = dX - dI; zero where the boxes do not overlap.
      Mapped: ``(U + I) I_o (a_hi - a_lo) / U^2`` on x and ``((U + I) I_o (a_hi + a_lo) - 2 I S_o) / U^2``
      on w.
    * GIoU: the IoU direction plus ``(C dU - U dC) / C^2`` with dC/dlo = -C_o b_lo, dC/dhi = +C_o b_hi,
      where I, U and dI come from the *unclamped* intersection (negative extents when the boxes are
      apart), as in the authors' code.
    * DIoU: the IoU direction plus, per axis, ``[2 (x_g - x) c^2 - 2 C_w dC_w/dx rho^2] / c^4`` on the
      centre (the enclosing-box part has the opposite sign of the true gradient) and
      ``+2 C_w dC_w/dw rho^2 / c^4`` on the size, with c^2 = C_w^2 + C_h^2, rho^2 the squared centre
      distance, dC_w/dx = b_hi - b_lo and dC_w/dw = (b_hi + b_lo) / 2, forced to -1 when the
      prediction encloses the target on that axis (b_lo b_hi = 1).
    * CIoU: the DIoU direction plus ``alpha 8/pi^2 (atan(w_g/h_g) - atan(w/h)) (h, -w)`` on (w, h) with
      alpha = v / (1 - IoU + v + 1e-7) held constant (the 1 / (w^2 + h^2) of dv/dw dropped).

    The IoU is I / U where the boxes overlap and 0 elsewhere, without eps (the authors' ``iou.m``).
    """
    buf, d_pos, d_size = c.buf, c.d_pos, c.d_size
    lo, hi, s_lo, s_hi, c_ext = _geometry(c)  # [2, n] each
    i_ext = _intersection(c, lo, hi, out=buf.i_ext)
    a_lo = torch.clamp(s_lo, min=0, out=buf.a_lo)  # [lo > lo_g]
    b_lo = torch.sub(a_lo, s_lo, out=buf.b_lo)  # [lo < lo_g] = relu(s) - s
    b_hi = torch.clamp(s_hi, min=0, out=buf.b_hi)  # [hi > hi_g]
    a_hi = torch.sub(b_hi, s_hi, out=buf.a_hi)  # [hi < hi_g]
    # dI_e on the edges, mapped: a_hi - a_lo on x, a_hi + a_lo on w
    a_diff = torch.sub(a_hi, a_lo, out=buf.a_diff)
    a_sum = torch.add(a_lo, a_hi, out=buf.a_sum)
    area = torch.mul(c.w, c.h, out=buf.area)  # X

    # IoU part, from the clamped intersection: the unclamped one where the boxes overlap, and it
    # keeps U > 0 elsewhere, where the part is masked to 0
    ic = torch.clamp(i_ext, min=0, out=buf.ic)
    ic_o = c.other(ic, out=buf.ic_o)  # I_o
    inter = torch.mul(ic[0], ic[1], out=buf.inter)
    union = torch.add(area, c.area_g, out=buf.union).sub_(inter).clamp_(min=torch.finfo(area.dtype).tiny)
    iou = torch.div(inter, union, out=buf.iou)
    g = torch.sign(inter, out=buf.g).div_(union).div_(union)  # 1 / U^2 where they overlap, else 0
    w_i = torch.add(union, inter, out=buf.w_i).mul_(g)  # (U + I) / U^2
    i_u2 = torch.mul(g, inter, out=buf.i_u2)  # I / U^2
    # (U + I) dI / U^2 with dI/dx = I_o (a_hi - a_lo), dI/dw = I_o (a_hi + a_lo), likewise y, h
    torch.mul(ic_o, a_diff, out=d_pos).mul_(w_i)
    torch.mul(ic_o, a_sum, out=d_size).mul_(w_i)
    c.d_w.addcmul_(c.h, i_u2, value=-2)  # - 2 I S_o / U^2, S_o = h on w
    c.d_h.addcmul_(c.w, i_u2, value=-2)
    if kind == "iou":
        return c.d, iou

    if kind == "giou":
        # dU / C - (U / C^2) dC with the unclamped I, U, dI; on the edges dU = dX - dI, dX = (-S_o, S_o)
        # dC_e on the edges, mapped: b_hi - b_lo on x, b_hi + b_lo on w
        b_diff = torch.sub(b_hi, b_lo, out=buf.b_diff)
        b_sum = torch.add(b_lo, b_hi, out=buf.b_sum)
        i_ext_o = c.other(i_ext, out=buf.i_ext_o)
        c_ext_o = c.other(c_ext, out=buf.c_ext_o)  # C_o
        inter_u = torch.mul(i_ext[0], i_ext[1], out=buf.inter_u)
        union_u = torch.add(area, c.area_g, out=buf.union_u).sub_(inter_u)
        inv_c = torch.mul(c_ext[0], c_ext[1], out=buf.inv_c).reciprocal_()  # 1 / C
        u_c2 = torch.mul(union_u, inv_c, out=buf.u_c2).mul_(inv_c)  # U / C^2
        tmp = buf.tmp
        d_pos.addcmul_(torch.mul(i_ext_o, a_diff, out=tmp), inv_c, value=-1)  # dI/dx, the unclamped I
        d_pos.addcmul_(torch.mul(c_ext_o, b_diff, out=tmp), u_c2, value=-1)  # dC/dx
        d_size.addcmul_(torch.mul(i_ext_o, a_sum, out=tmp), inv_c, value=-1)  # dI/dw
        c.d_w.addcmul_(c.h, inv_c, value=2)  # dX/dw = S_o, doubled by the edges' map
        c.d_h.addcmul_(c.w, inv_c, value=2)
        d_size.addcmul_(torch.mul(c_ext_o, b_sum, out=tmp), u_c2, value=-1)  # dC/dw
        return c.d, iou

    # DIoU: the distance part, with the authors' sign of the enclosing-box term on the centre
    u = torch.sub(c.pos, c.pos_g, out=buf.u)  # (x - x_g, y - y_g)
    c_w, c_h = c_ext
    inv_c2 = torch.mul(c_w, c_w, out=buf.inv_c2).addcmul_(c_h, c_h).reciprocal_()  # 1 / c^2
    u_x, u_y = u
    rho2_c4 = torch.mul(u_x, u_x, out=buf.rho2_c4).addcmul_(u_y, u_y).mul_(inv_c2).mul_(inv_c2)  # rho^2 / c^4
    d_pos.addcmul_(u, inv_c2, value=-2)  # 2 (x_g - x) c^2 / c^4
    c_rho2_c4 = torch.mul(c_ext, rho2_c4, out=buf.c_rho2_c4)  # C_e rho^2 / c^4
    dce_dx = torch.sub(b_hi, b_lo, out=buf.dce_dx)  # dC_e/dx
    d_pos.addcmul_(dce_dx, c_rho2_c4, value=-2)
    # dC_e/dw (chain rule, as the authors' Cr.dw - Cl.dw): 1/2 per owned enclosing edge, forced to -1
    # when both are owned; with s = b_lo + b_hi in {0, 1, 2} that is s (3/2 - s)
    b_sum = torch.add(b_lo, b_hi, out=buf.b_sum)
    dce_dw = torch.sub(1.5, b_sum, out=buf.dce_dw).mul_(b_sum)
    d_size.addcmul_(dce_dw, c_rho2_c4, value=2)
    if kind == "diou":
        return c.d, iou

    # CIoU: alpha 8/pi^2 (atan(w_g/h_g) - atan(w/h)) (h, -w) on (w, h)
    dtheta = torch.div(c.w, c.h, out=buf.dtheta).atan_().neg_().add_(c.atan_g)  # atan(w_g/h_g) - atan(w/h)
    v = torch.mul(dtheta, dtheta, out=buf.v).mul_(_FOUR_OVER_PI2)
    # k = alpha 8/pi^2 dtheta with alpha = v / (1 - IoU + v + 1e-7), held constant
    k = torch.div(v, torch.sub(v, iou, out=buf.k).add_(1 + 1e-7), out=buf.k).mul_(dtheta).mul_(_EIGHT_OVER_PI2)
    c.d_w.addcmul_(k, c.h)
    c.d_h.addcmul_(k, c.w, value=-1)
    return c.d, iou


def _exact_direction(loss: str, c: _Chunk) -> tuple[Tensor, Tensor]:
    """``-dL/d(x, y, w, h)`` ``[4, n]`` in closed form, and the IoU ``[n]`` = I / (U + eps).

    The same values as autograd through the losses (eps = 1e-7, torchvision's conventions): the
    intersection counts where both extents are > 0, and ``torch.min``/``torch.max`` split the
    gradient evenly at ties, so per axis, with s_lo = sign(lo - lo_g) and s_hi = sign(hi - hi_g),
    dI_e/dx = -(s_lo + s_hi) / 2, dI_e/dw = (2 + s_lo - s_hi) / 4, dC_e/dx = -dI_e/dx and
    dC_e/dw = 1 - dI_e/dw. With
    U = X + G - I, U~ = U + eps, C~ = C + eps and c^2 = C_w^2 + C_h^2 + eps:

    * iou, L = 1 - I / U~: -dL = (dI (U~ + I) - I dX) / U~^2;
    * giou, + (C - U) / C~: -dL gains (dU C~ - dC U~) / C~^2 with dU = dX - dI;
    * diou, + rho^2 / c^2: -dL gains (-2 (x - x_g) c^2 + rho^2 2 C_w dC_w) / c^4;
    * ciou, + alpha v with alpha held constant: -alpha dv/dw = alpha 8/pi^2 dtheta h / (w^2 + h^2),
      -alpha dv/dh = -alpha 8/pi^2 dtheta w / (w^2 + h^2) with dtheta = atan(w_g / h_g) - atan(w / h)
      (``ciou_grad="exact"``, torchvision's; the losses' atan2 angles, equal for positive sizes);
    * l1, l2, smooth_l1 (beta = 1) on e = (x, y, w, h) - (x_g, y_g, w_g, h_g): -sign(e), -2 e,
      -clamp(e / beta, -1, 1).
    """
    buf, d, d_pos, d_size = c.buf, c.d, c.d_pos, c.d_size
    lo, hi, s_lo, s_hi, c_ext = _geometry(c)  # [2, n] each
    ic = _intersection(c, lo, hi, out=buf.ic).clamp_(min=0)  # the losses' clamped I_e
    inter = torch.mul(ic[0], ic[1], out=buf.inter)
    area = torch.mul(c.w, c.h, out=buf.area)  # X
    union_eps = torch.add(area, c.area_g, out=buf.union_eps).sub_(inter).add_(_EPS)  # U~
    iou = torch.div(inter, union_eps, out=buf.iou)
    if loss not in PAPER_LOSSES:
        torch.sub(c.targets, c.boxes, out=d)  # G - B = -e
        if loss == "l1":
            d.sign_()
        elif loss == "l2":
            d.mul_(2)
        else:
            d.div_(_SMOOTH_L1_BETA).clamp_(-1, 1)
        return d, iou

    ic_o = c.other(ic, out=buf.ic_o)  # I_o
    die_dx = torch.add(s_lo, s_hi, out=buf.die_dx).mul_(-0.5)  # dI_e/dx
    die_dw = torch.sub(s_lo, s_hi, out=buf.die_dw).add_(2).mul_(0.25)  # dI_e/dw
    # 1 / U~^2 where both extents are > 0 (the intersection has no gradient elsewhere), else 0
    g = torch.sign(inter, out=buf.g).div_(union_eps).div_(union_eps)
    w_i = torch.add(union_eps, inter, out=buf.w_i).mul_(g)  # (U~ + I) / U~^2
    i_u2 = torch.mul(inter, g, out=buf.i_u2)  # I / U~^2
    # (U~ + I) dI / U~^2 with dI/dx = I_o dI_e/dx, dI/dw = I_o dI_e/dw, likewise y, h
    torch.mul(ic_o, die_dx, out=d_pos).mul_(w_i)
    torch.mul(ic_o, die_dw, out=d_size).mul_(w_i)
    c.d_w.addcmul_(c.h, i_u2, value=-1)  # - I dX / U~^2 with dX/dw = h, dX/dh = w
    c.d_h.addcmul_(c.w, i_u2, value=-1)
    if loss == "iou":
        return d, iou

    dce_dw = torch.sub(1, die_dw, out=buf.dce_dw)  # dC_e/dw = 1 - dI_e/dw
    if loss == "giou":
        # dU / C~ - (U~ / C~^2) dC with dU = dX - dI (dI masked where the boxes do not overlap)
        c_ext_o = c.other(c_ext, out=buf.c_ext_o)  # C_o
        inv_c = torch.mul(c_ext[0], c_ext[1], out=buf.inv_c).add_(_EPS).reciprocal_()  # 1 / C~
        u_c2 = torch.mul(union_eps, inv_c, out=buf.u_c2).mul_(inv_c)  # U~ / C~^2
        ov_c = torch.sign(inter, out=buf.ov_c).mul_(inv_c)  # 1 / C~ where the boxes overlap
        tmp = buf.tmp
        d_pos.addcmul_(torch.mul(ic_o, die_dx, out=tmp), ov_c, value=-1)  # dI/dx
        d_pos.addcmul_(torch.mul(c_ext_o, die_dx, out=tmp), u_c2)  # -dC/dx = C_o dI_e/dx
        d_size.addcmul_(torch.mul(ic_o, die_dw, out=tmp), ov_c, value=-1)  # dI/dw
        c.d_w.addcmul_(c.h, inv_c, value=1)  # dX/dw / C~
        c.d_h.addcmul_(c.w, inv_c, value=1)
        d_size.addcmul_(torch.mul(c_ext_o, dce_dw, out=tmp), u_c2, value=-1)  # dC/dw = C_o dC_e/dw
        return d, iou

    u = torch.sub(c.pos, c.pos_g, out=buf.u)  # (x - x_g, y - y_g)
    c_w, c_h = c_ext
    inv_c2 = torch.mul(c_w, c_w, out=buf.inv_c2).addcmul_(c_h, c_h).add_(_EPS).reciprocal_()  # 1 / c^2
    u_x, u_y = u
    rho2_c4 = torch.mul(u_x, u_x, out=buf.rho2_c4).addcmul_(u_y, u_y).mul_(inv_c2).mul_(inv_c2)  # rho^2 / c^4
    d_pos.addcmul_(u, inv_c2, value=-2)
    # + 2 rho^2 C_e dC_e / c^4 with dC_e/dx = -dI_e/dx
    d_pos.addcmul_(torch.mul(die_dx, c_ext, out=buf.tmp), rho2_c4, value=-2)
    d_size.addcmul_(torch.mul(dce_dw, c_ext, out=buf.tmp), rho2_c4, value=2)
    if loss == "diou":
        return d, iou

    # CIoU, boxes of positive size (the losses clamp w, h at 0 first)
    dtheta = torch.div(c.w, c.h, out=buf.dtheta).atan_().neg_().add_(c.atan_g)  # atan(w_g/h_g) - atan(w/h)
    v = torch.mul(dtheta, dtheta, out=buf.v).mul_(_FOUR_OVER_PI2)
    norm = torch.mul(c.w, c.w, out=buf.norm).addcmul_(c.h, c.h)  # w^2 + h^2
    # k = alpha 8/pi^2 dtheta / (w^2 + h^2) with alpha = v / (1 - IoU + v + eps), held constant
    k = (
        torch.div(v, torch.sub(v, iou, out=buf.k).add_(1 + _EPS), out=buf.k)  # alpha
        .mul_(dtheta)
        .mul_(_EIGHT_OVER_PI2)
        .div_(norm)
    )
    c.d_w.addcmul_(k, c.h)
    c.d_h.addcmul_(k, c.w, value=-1)
    return d, iou


def _reference_loss(name: str) -> Callable[[Tensor, Tensor], Tensor]:
    """The plain-autograd per-case loss ``[n]`` of ``[n, 4]`` boxes (the cross-check)."""
    from .boxes import _iou_family

    if name in PAPER_LOSSES:
        return lambda p, t: 1 - _iou_family(p, t, name, _EPS, pairwise=False)[0]
    if name == "l1":
        return lambda p, t: (p - t).abs().sum(-1)
    if name == "l2":
        return lambda p, t: (p - t).square().sum(-1)
    beta = _SMOOTH_L1_BETA
    return lambda p, t: torch.where((p - t).abs() < beta, 0.5 * (p - t) ** 2 / beta, (p - t).abs() - 0.5 * beta).sum(-1)


def _variant_loss(name: str, pred: Tensor, target: Tensor) -> Tensor:
    """The summed loss of an :data:`AUTOGRAD_LOSSES` entry on ``[n, 4]`` xyxy boxes."""
    from .boxes import matched_box_iou
    from .losses import get_loss

    fn_name, options = AUTOGRAD_LOSSES[name]
    if fn_name == "mpdiou":
        options = {**options, "image_size": MPDIOU_IMAGE_SIZE}
    if fn_name == "wise_iou" and options.get("version", 3) != 1:
        with torch.no_grad():  # the mean of L_IoU over each centre's 343 cases (all cases if they do not split)
            l_iou = 1 - matched_box_iou(pred, target, eps=_EPS)
            n = l_iou.numel()
            groups = l_iou.view(-1, CASES_PER_POINT) if n % CASES_PER_POINT == 0 else l_iou.view(1, -1)
            mean = groups.mean(1, keepdim=True).expand_as(groups).reshape(-1)
        options = {**options, "iou_mean": mean}
    return get_loss(fn_name, **options)(pred, target, reduction="sum", eps=_EPS)


def _autograd_direction(loss: str, grad: str, c: _Chunk) -> tuple[Tensor, Tensor]:
    """``-dL/d(x, y, w, h)`` by autograd through the public loss (``"loss"``) or the reference formula."""
    if loss in AUTOGRAD_LOSSES:
        value = lambda p, t: _variant_loss(loss, p, t)  # noqa: E731
    elif grad == "loss":
        from .losses import get_loss

        fn = get_loss(loss)
        value = lambda p, t: fn(p, t, reduction="sum")  # noqa: E731
    else:
        ref = _reference_loss(loss)
        value = lambda p, t: ref(p, t).sum()  # noqa: E731
    boxes = c.boxes.clone()
    with torch.enable_grad():
        if loss not in ("l1", "l2", "smooth_l1"):  # box losses: on xyxy boxes
            half = 0.5 * boxes[2:]
            xyxy = torch.cat((boxes[:2] - half, boxes[:2] + half)).requires_grad_()  # [4, n] x1 y1 x2 y2
            target = torch.cat((c.lo_g, c.hi_g))
            (g,) = torch.autograd.grad(value(xyxy.T, target.T), xyxy)
            # chain rule: x1 = x - w/2, x2 = x + w/2  =>  dL/dx = g_x1 + g_x2, dL/dw = (g_x2 - g_x1) / 2
            d = torch.cat((-(g[:2] + g[2:]), 0.5 * (g[:2] - g[2:])))
        else:
            leaf = boxes.requires_grad_()
            (g,) = torch.autograd.grad(value(leaf.T, c.targets.T), leaf)
            d = g.neg_()
    lo, hi = _geometry(c)[:2]
    ic = _intersection(c, lo, hi, out=c.buf.ic).clamp_(min=0)
    inter = ic[0] * ic[1]
    return d, inter / (c.w * c.h + c.area_g - inter + _EPS)


def _direction(loss: str, mode: str, grad: str, c: _Chunk) -> tuple[Tensor, Tensor]:
    """(D ``[4, n]``, IoU ``[n]``) at the chunk's offsets; D points downhill (or the authors' way)."""
    if mode == "paper":
        return _paper_direction(loss, c)
    if grad == "analytic" and loss in ANALYTIC_LOSSES:
        return _exact_direction(loss, c)
    return _autograd_direction(loss, grad, c)


def descent_direction(
    pred: Tensor, target: Tensor, loss: str, *, mode: str = "exact", grad: str = "analytic"
) -> tuple[Tensor, Tensor]:
    """The simulation's direction D and IoU for matched ``(x, y, w, h)`` boxes (one step of Algorithm 1).

    The update is ``B + eta (2 - IoU) D``. In ``"exact"`` mode ``D = -dL/d(x, y, w, h)`` (L as in
    :mod:`boxloss.losses` with eps = 1e-7, smooth-L1 with beta = 1) and IoU = I / (U + 1e-7); in
    ``"paper"`` mode D is the authors' direction (module docstring) and IoU = I / U where the boxes
    overlap, else 0.

    Args:
        pred: ``[N, 4]`` predicted boxes ``(x, y, w, h)`` (centre and size; sizes > 0).
        target: ``[N, 4]`` target boxes ``(x, y, w, h)``, floating point.
        loss: one of :data:`LOSSES` (:data:`PAPER_LOSSES` in ``"paper"`` mode).
        mode: ``"exact"`` or ``"paper"``.
        grad: exact mode's gradient source: ``"analytic"`` (closed form), ``"loss"`` (autograd
            through :func:`boxloss.get_loss`) or ``"autograd"`` (the plain reference formulas);
            :data:`AUTOGRAD_LOSSES` always use autograd through the public loss.

    Returns:
        ``(D [N, 4], IoU [N])`` in ``target``'s dtype.
    """
    _check_options(loss, mode, grad)
    for name, t in (("pred", pred), ("target", target)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2 or t.shape[-1] != 4:
            raise ValueError(f"{name} must have shape [N, 4], got {tuple(t.shape)}")
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}")
    if not target.is_floating_point():
        raise TypeError(f"target must be a floating-point tensor, got {target.dtype}")
    with torch.no_grad():
        targets = target.T.contiguous()
        d, iou = _direction(loss, mode, grad, _Chunk(pred.T.to(target.dtype).contiguous(), targets))
    return d.T.clone(), iou.clone()


# --------------------------------------------------------------------------- engine


@dataclass
class SimulationResult:
    """The outcome of :func:`simulate` for one loss.

    Attributes:
        loss, mode, grad: what was run (``grad`` is exact mode's gradient source, ``"loss"`` for
            :data:`AUTOGRAD_LOSSES`, ``None`` in paper mode).
        points, cases, iterations: the protocol's size.
        total_error: ``[T + 1]`` float64, the l1 error summed over all cases after 0..T iterations.
        point_error: ``[points]`` float64, the final error summed over the 343 cases of each centre.
        centres: ``[points, 2]`` float64 anchor centres.
        seconds: wall time of the run.
        final_boxes: ``[cases, 4]`` final ``(x, y, w, h)`` when ``keep_boxes`` was set, else None.
    """

    loss: str
    mode: str
    grad: str | None
    points: int
    cases: int
    iterations: int
    total_error: Tensor
    point_error: Tensor
    centres: Tensor
    seconds: float
    final_boxes: Tensor | None = None

    @property
    def final_error(self) -> float:
        """Total error after the last iteration."""
        return float(self.total_error[-1])


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_options(loss: str, mode: str, grad: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if mode == "paper" and loss not in PAPER_LOSSES:
        raise ValueError(f"mode='paper' has the authors' directions for {PAPER_LOSSES} only, got loss={loss!r}")
    if grad not in GRADS:
        raise ValueError(f"grad must be one of {GRADS}, got {grad!r}")


@torch.no_grad()  # worker threads do not inherit the caller's grad mode
def _run_chunk(
    loss: str, mode: str, grad: str, centres: Tensor, iterations: int, dtype, device, keep_boxes: bool
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Run the cases of ``centres`` through all iterations: (total error [T+1], point error, boxes)."""
    anchors, targets = make_cases(centres, dtype, device)
    c = _Chunk(anchors, targets)
    boxes, buf = c.boxes, c.buf
    errors = torch.empty(iterations + 1, dtype=dtype, device=device)
    error = torch.sub(boxes, targets, out=buf.error).abs_()  # [4, n] |B_t - G| per coordinate
    errors[0] = error.sum()
    for t in range(1, iterations + 1):
        d, iou = _direction(loss, mode, grad, c)
        # B_t = B_{t-1} + eta (2 - IoU_{t-1}) D_{t-1}
        eta = step_size(t)
        boxes.addcmul_(d, torch.mul(iou, -eta, out=buf.step).add_(2 * eta))
        error = torch.sub(boxes, targets, out=buf.error).abs_()
        errors[t] = error.sum()
    final = error.sum(0).view(-1, CASES_PER_POINT).sum(1)  # [k] final error summed per centre
    boxes = boxes.T.cpu() if keep_boxes else None
    return errors.double().cpu(), final.double().cpu(), boxes


def simulate(
    loss: str,
    *,
    mode: str = "exact",
    points: int = 5000,
    iterations: int = 200,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    grad: str = "analytic",
    chunk_points: int | None = None,
    workers: int = 1,
    keep_boxes: bool = False,
    progress: Callable[[int, int, float], None] | None = None,
) -> SimulationResult:
    """Run the DIoU paper's convergence simulation (Algorithm 1) for one loss.

    ``points * 343`` regression cases (module docstring) each take ``iterations`` steps
    ``B_t = B_{t-1} + eta_t (2 - IoU_{t-1}) D_{t-1}``; the total l1 error ``sum |B_t - G|_1`` over
    ``(x, y, w, h)`` is recorded at every iteration.

    Args:
        loss: one of :data:`LOSSES`; ``"paper"`` mode takes :data:`PAPER_LOSSES` only.
        mode: ``"exact"`` (D = -dL/d(x, y, w, h)) or ``"paper"`` (the authors' directions).
        points: anchor centres in the disc (5,000 in the paper: 1,715,000 cases).
        iterations: T (200 in the paper).
        seed: seed of the anchor centres.
        dtype: ``torch.float32`` (default) or ``torch.float64`` (cross-checks).
        device: ``"cpu"``, ``"cuda"``, ...
        grad: exact mode's gradient source: ``"analytic"`` (closed form, fast), ``"loss"`` (autograd
            through the public losses of :mod:`boxloss.losses`, i.e. their kernels) or ``"autograd"``
            (the plain reference formulas). Ignored in paper mode.
        chunk_points: centres per chunk (a chunk runs all iterations before the next). Default: 128
            on a CPU (43,904 cases: its working set stays in the last-level cache, and ops are long
            enough to amortise their dispatch), all points on other devices.
        workers: CPU threads running chunks at once (default 1; always 1 on other devices). Each
            op still runs on torch's intra-op threads, which this function leaves as the caller
            set them: with several workers, set those to 1 (``OMP_NUM_THREADS=1`` or
            ``torch.set_num_threads(1)``, as ``tools/simulate.py`` does) so that the two kinds of
            thread do not oversubscribe the cores.
        keep_boxes: also return the final boxes ``[cases, 4]``.
        progress: called as ``progress(cases_done, cases_total, seconds)`` after every chunk.

    Returns:
        A :class:`SimulationResult`.
    """
    _check_options(loss, mode, grad)
    grad = grad if mode == "exact" else "analytic"  # paper mode has its own directions
    _check_int("points", points, minimum=1)
    _check_int("iterations", iterations, minimum=0)
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype!r}")
    device = torch.device(device)
    cpu = device.type == "cpu"
    if chunk_points is None:
        chunk_points = 128 if cpu else points
    _check_int("chunk_points", chunk_points, minimum=1)
    _check_int("workers", workers, minimum=1)

    centres = anchor_centres(points, seed)
    chunks = [centres[i : i + chunk_points] for i in range(0, points, chunk_points)]
    total = torch.zeros(iterations + 1, dtype=torch.float64)
    point_error, boxes = [], []
    start = time.perf_counter()
    done = 0

    def run(c: Tensor):
        return _run_chunk(loss, mode, grad, c, iterations, dtype, device, keep_boxes)

    workers = min(workers, len(chunks)) if cpu else 1
    # chunks in parallel threads: torch's ops release the GIL
    pool = ThreadPoolExecutor(workers) if workers > 1 else None
    try:
        results = map(run, chunks) if pool is None else pool.map(run, chunks)
        for c, (err, per_point, final) in zip(chunks, results):
            total += err
            point_error.append(per_point)
            if final is not None:
                boxes.append(final)
            done += len(c) * CASES_PER_POINT
            if progress is not None:
                progress(done, num_cases(points), time.perf_counter() - start)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return SimulationResult(
        loss=loss,
        mode=mode,
        grad=None if mode == "paper" else "loss" if loss in AUTOGRAD_LOSSES else grad,
        points=points,
        cases=num_cases(points),
        iterations=iterations,
        total_error=total,
        point_error=torch.cat(point_error),
        centres=centres,
        seconds=time.perf_counter() - start,
        final_boxes=torch.cat(boxes) if keep_boxes else None,
    )


def iterations_to_fraction(total_error: Tensor, fraction: float = 0.01) -> int | None:
    """First iteration t at which ``total_error[t] <= fraction * total_error[0]``, or None if never."""
    hit = (total_error <= fraction * total_error[0]).nonzero()
    return int(hit[0]) if len(hit) else None
