"""Per-pair formulas of the IoU losses after CIoU: EIoU (and Focal-EIoU), SIoU, alpha-IoU, Wise-IoU,
MPDIoU, and the Inner-IoU and Focaler-IoU modifiers.

These are plain PyTorch expressions differentiated by autograd: the public functions with the
common signature (argument checks, float32 upcast, weights, reductions) are in
:mod:`boxloss.losses`, which calls the functions below on checked ``[..., 4]`` xyxy tensors of one
floating dtype. They follow the conventions of :func:`boxloss.boxes._iou_family`: sizes clamped at
0 with the derivative from above at exactly 0 (:func:`boxloss.boxes._size`), the intersection only
where both extents are > 0, ``IoU = I / (U + eps)``, ``torch.max`` / ``torch.min`` for the
intersection and enclosing edges (ties split the gradient evenly, so identical boxes get a zero
gradient), and ``eps`` in every division by a squared extent of the enclosing box. A division by
a quantity that is not an enclosing extent (the SIoU angle, the SIoU shape ratios) is guarded by
:func:`_ratio` instead, which leaves it exact: an eps there would bias image-normalised boxes, whose
sides are ~1e-3.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
from torch import Tensor

from ._kernels import KINDS
from .boxes import _aspect_v, _iou_family, _size

__all__ = []  # private: the public losses are in boxloss.losses

ALPHA_IOU_KINDS = KINDS  # alpha-IoU raises the terms of each IoU-family kind to the power alpha
WISE_IOU_VERSIONS = (1, 2, 3)


# --------------------------------------------------------------------------- checks


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_positive(name: str, value) -> None:
    if not (_is_number(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def check_nonnegative(name: str, value) -> None:
    if not (_is_number(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def check_modifiers(inner_ratio, focaler) -> None:
    """``inner_ratio``: None or a finite number > 0; ``focaler``: None or ``(d, u)``, 0 <= d < u <= 1."""
    if inner_ratio is not None:
        check_positive("inner_ratio", inner_ratio)
    if focaler is not None:
        if (not isinstance(focaler, (tuple, list)) or len(focaler) != 2
                or not all(_is_number(x) for x in focaler)):
            raise ValueError(f"focaler must be None or a pair (d, u) of numbers, got {focaler!r}")
        d, u = focaler
        if not 0 <= d < u <= 1:
            raise ValueError(f"focaler (d, u) must have 0 <= d < u <= 1, got {tuple(focaler)!r}")


# --------------------------------------------------------------------------- shared geometry


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` where ``den`` is large enough for autograd's ``num / den^2``, else 0.

    ``den`` >= 0. Below ``sqrt(tiny)`` (1e-19 in float32, 1e-154 in float64) ``den^2`` underflows
    and the division's backward would give 0 * inf = NaN; such a quotient (a ratio of lengths
    below 1e-19) is taken as 0 with no gradient.
    """
    ok = den > torch.finfo(den.dtype).tiny ** 0.5
    return torch.where(ok, num / torch.where(ok, den, 1.0), 0.0)


def _pow(x: Tensor, exponent: float) -> Tensor:
    """``x ** exponent`` for x >= 0, exactly (no eps), and 0 with zero gradient where x <= 0.

    ``torch.pow``'s gradient at 0 is ``exponent * 0 ** (exponent - 1)``, infinite for exponent < 1.
    """
    if exponent == 1:
        return x
    pos = x > 0
    return torch.where(pos, torch.where(pos, x, 1.0) ** exponent, 0.0)


def geometry(pred: Tensor, target: Tensor, eps: float) -> SimpleNamespace:
    """The quantities every loss below uses, ``[...]`` each, for matched xyxy boxes.

    w, h (wg, hg): clamped sizes of the prediction (target); inter, union (without eps), iou =
    inter / (union + eps); cw, ch: extents of the smallest enclosing box; dx, dy: the target's
    centre minus the prediction's; rho2 = dx^2 + dy^2.
    """
    x1, y1, x2, y2 = pred.unbind(-1)
    x1g, y1g, x2g, y2g = target.unbind(-1)
    w, h = _size(x2 - x1), _size(y2 - y1)
    wg, hg = _size(x2g - x1g), _size(y2g - y1g)
    iw = torch.min(x2, x2g) - torch.max(x1, x1g)
    ih = torch.min(y2, y2g) - torch.max(y1, y1g)
    # where, not clamp: touching boxes get no intersection gradient (torchvision's losses)
    inter = torch.where((iw > 0) & (ih > 0), iw * ih, torch.zeros_like(iw))
    union = w * h + wg * hg - inter
    iou = inter / (union + eps)
    cw = torch.max(x2, x2g) - torch.min(x1, x1g)
    ch = torch.max(y2, y2g) - torch.min(y1, y1g)
    dx = (x1g + x2g - x1 - x2) / 2
    dy = (y1g + y2g - y1 - y2) / 2
    return SimpleNamespace(w=w, h=h, wg=wg, hg=hg, inter=inter, union=union, iou=iou, cw=cw, ch=ch,
                           dx=dx, dy=dy, rho2=dx**2 + dy**2)


def _inner_boxes(boxes: Tensor, ratio: float) -> Tensor:
    """Boxes scaled by ``ratio`` about their centres, as x1 + k (x2 - x1), x2 - k (x2 - x1), k = (1 - ratio) / 2.

    Written from the edges so that ratio = 1 returns the very same numbers (k = 0), not
    centre -/+ half size, which rounds.
    """
    k = (1 - ratio) / 2
    lo, hi = boxes[..., :2], boxes[..., 2:]
    size = hi - lo
    return torch.cat((lo + k * size, hi - k * size), dim=-1)


def modifier_term(pred: Tensor, target: Tensor, eps: float, inner_ratio, focaler, iou: Tensor | None = None) -> Tensor:
    """Inner-IoU / Focaler-IoU: ``IoU - IoU_aux``, added to a loss L_X to give L_X + IoU - IoU_aux.

    IoU_aux is the IoU of the auxiliary boxes scaled by ``inner_ratio`` about their centres
    (Inner-IoU), or the plain IoU; with ``focaler = (d, u)`` it is then mapped by
    ``clamp((IoU_aux - d) / (u - d), 0, 1)`` (Focaler-IoU). Both at once: Focaler applied to the
    inner IoU. ``iou``: the plain IoU if already computed.
    """
    if iou is None:
        iou = _iou_family(pred, target, "iou", eps, pairwise=False)[1]
    aux = iou
    if inner_ratio is not None and inner_ratio != 1:  # 1: the boxes themselves
        aux = _iou_family(_inner_boxes(pred, inner_ratio), _inner_boxes(target, inner_ratio), "iou", eps,
                          pairwise=False)[1]
    if focaler is not None:
        d, u = focaler
        aux = ((aux - d) / (u - d)).clamp(0, 1)
    return iou - aux


def is_neutral(inner_ratio, focaler) -> bool:
    """No modifier, or only the ones that change nothing (ratio 1, Focaler (0, 1))."""
    return inner_ratio in (None, 1) and (focaler is None or tuple(focaler) == (0, 1))


def _with_modifiers(loss: Tensor, pred, target, eps, g, inner_ratio, focaler) -> Tensor:
    if is_neutral(inner_ratio, focaler):
        return loss
    return loss + modifier_term(pred, target, eps, inner_ratio, focaler, iou=g.iou)


# --------------------------------------------------------------------------- the losses


def eiou(pred: Tensor, target: Tensor, eps: float, focal_gamma: float = 0.0, inner_ratio=None, focaler=None) -> Tensor:
    """EIoU: 1 - IoU + rho^2 / (C_w^2 + C_h^2) + (w - w_g)^2 / C_w^2 + (h - h_g)^2 / C_h^2 (eps in each
    denominator); Focal-EIoU multiplies it by IoU^gamma computed without gradient."""
    g = geometry(pred, target, eps)
    cw2, ch2 = g.cw**2, g.ch**2
    loss = 1 - g.iou + g.rho2 / (cw2 + ch2 + eps) + (g.w - g.wg) ** 2 / (cw2 + eps) + (g.h - g.hg) ** 2 / (ch2 + eps)
    loss = _with_modifiers(loss, pred, target, eps, g, inner_ratio, focaler)
    if focal_gamma != 0:
        # a weight, not differentiated: the gradient of IoU^gamma is infinite at IoU = 0 for gamma < 1
        # (NaN for disjoint boxes)
        loss = loss * g.iou.detach() ** focal_gamma
    return loss


def siou(pred: Tensor, target: Tensor, eps: float, theta: float = 4.0, inner_ratio=None, focaler=None) -> Tensor:
    """SIoU: 1 - IoU + (Delta + Omega) / 2 with the paper's sign.

    Lambda = sin 2a (a the angle of the centre offset to the x axis; 1 - 2 sin^2(a - pi/4) of the
    paper) = 2 |dx| |dy| / (dx^2 + dy^2), 0 for equal centres; gamma = 2 - Lambda;
    Delta = sum_{x,y} 1 - exp(-gamma rho_t), rho_x = dx^2 / (C_w^2 + eps), rho_y = dy^2 / (C_h^2 + eps);
    Omega = sum_{w,h} (1 - exp(-omega_t))^theta, omega_w = |w - w_g| / max(w, w_g).
    """
    g = geometry(pred, target, eps)
    adx, ady = g.dx.abs(), g.dy.abs()
    lam = _ratio(2 * adx * ady, g.rho2)  # sin 2a without asin, and the same for a and pi/2 - a
    gamma = 2 - lam
    rho_x = g.dx**2 / (g.cw**2 + eps)
    rho_y = g.dy**2 / (g.ch**2 + eps)
    delta = (1 - torch.exp(-gamma * rho_x)) + (1 - torch.exp(-gamma * rho_y))
    omega_w = _ratio((g.w - g.wg).abs(), torch.max(g.w, g.wg))
    omega_h = _ratio((g.h - g.hg).abs(), torch.max(g.h, g.hg))
    omega = _pow(1 - torch.exp(-omega_w), theta) + _pow(1 - torch.exp(-omega_h), theta)
    loss = 1 - g.iou + (delta + omega) / 2
    return _with_modifiers(loss, pred, target, eps, g, inner_ratio, focaler)


def alpha_iou(pred: Tensor, target: Tensor, eps: float, alpha: float, kind: str) -> Tensor:
    """alpha-IoU: 1 - IoU^a, plus ((|C| - U) / |C|)^a (giou), (rho^2 / c^2)^a (diou), and
    (beta v)^a (ciou, beta = v / (1 - IoU + v + eps) without gradient), every power exact."""
    g = geometry(pred, target, eps)
    loss = 1 - _pow(g.iou, alpha)
    if kind == "iou":
        return loss
    if kind == "giou":
        area_c = g.cw * g.ch
        return loss + _pow((area_c - g.union) / (area_c + eps), alpha)
    loss = loss + _pow(g.rho2 / (g.cw**2 + g.ch**2 + eps), alpha)
    if kind == "diou":
        return loss
    v = _aspect_v(g.w, g.h, g.wg, g.hg)
    with torch.no_grad():  # CIoU's trade-off weight, from the plain IoU
        beta = v / (1 - g.iou + v + eps)
    return loss + _pow(beta * v, alpha)


def iou_loss_mean(pred: Tensor, target: Tensor, eps: float) -> Tensor:
    """The mean of 1 - IoU over all pairs, without gradient (Wise-IoU's batch statistic)."""
    with torch.no_grad():
        return (1 - _iou_family(pred, target, "iou", eps, pairwise=False)[1]).mean()


def wise_iou(pred: Tensor, target: Tensor, eps: float, version: int, iou_mean, alpha: float, delta: float,
             gamma: float) -> Tensor:
    """Wise-IoU v1 = exp(rho^2 / (C_w^2 + C_h^2)*) (1 - IoU), * = no gradient (the denominator only);
    v2 = (L_IoU* / mean)^gamma v1; v3 = r v1 with r = beta / (delta alpha^(beta - delta)),
    beta = L_IoU* / mean. ``iou_mean`` None: the mean of L_IoU over the pairs given."""
    g = geometry(pred, target, eps)
    l_iou = 1 - g.iou
    loss = torch.exp(g.rho2 / (g.cw**2 + g.ch**2 + eps).detach()) * l_iou
    if version == 1:
        return loss
    l_star = l_iou.detach()
    mean = l_star.mean() if iou_mean is None else torch.as_tensor(iou_mean, dtype=l_star.dtype, device=l_star.device)
    beta = l_star / mean.clamp(min=eps)  # all pairs identical: mean 0, beta 0 (not 0 / 0)
    if version == 2:
        return beta**gamma * loss
    return beta / (delta * alpha ** (beta - delta)) * loss


def mpdiou(pred: Tensor, target: Tensor, eps: float, image_size: Tensor) -> Tensor:
    """MPDIoU: 1 - IoU + (d1^2 + d2^2) / (H^2 + W^2 + eps), d1 and d2 the distances of the top-left and
    of the bottom-right corners; ``image_size`` ``[..., 2]`` (height, width), broadcast."""
    g = geometry(pred, target, eps)
    d = pred - target
    d1 = d[..., 0] ** 2 + d[..., 1] ** 2
    d2 = d[..., 2] ** 2 + d[..., 3] ** 2
    norm = image_size[..., 0] ** 2 + image_size[..., 1] ** 2
    return 1 - g.iou + (d1 + d2) / (norm + eps)
