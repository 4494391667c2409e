"""Bounding-box regression losses: L1, L2, smooth-L1, IoU, GIoU, DIoU, CIoU, and the IoU losses after
CIoU: EIoU (Focal-EIoU), SIoU, alpha-IoU, Wise-IoU, MPDIoU, with the Inner-IoU and Focaler-IoU modifiers.

Every loss has the same signature::

    loss(pred, target, *, weight=None, reduction="mean", avg_factor=None, eps=1e-7, ...)

``pred`` and ``target`` are matched pairs of shape ``[..., 4]``: xyxy boxes for the IoU family, and
boxes or encoded deltas for the L-norm losses. The per-pair loss (``reduction="none"``) has shape
``[...]``: the L-norm losses sum over the 4 coordinates. ``weight`` is ``[...]`` (per pair) or
``[..., 4]`` (per coordinate; the IoU family averages it over the coordinates, as MMDetection does).
``avg_factor`` replaces the number of elements in the mean: the summed loss is divided by
``avg_factor + finfo(float32).eps``, as MMDetection does, so ``avg_factor = 0`` (a batch without
positives, ``num_pos`` passed unclamped) gives a loss of 0 with zero gradients, not NaN. The mean of
an empty input is 0 and keeps the graph. ``eps`` must be a finite number > 0 (with 0, two identical
empty boxes give 0 / 0). Float16/bfloat16 inputs are computed and returned in float32.

The IoU family runs on :func:`boxloss._kernels.iou_family_loss`: loss and gradient in closed form
in one forward sweep, 6 numbers per pair kept for backward (4 when the target needs no gradient),
the same values and gradients as the plain-autograd formulation ``boxes._iou_family``. On CPU
the compiled loops of ``boxloss._native`` run it (``BOXLOSS_KERNEL=eager`` selects the PyTorch-ops
kernel that GPUs use). These losses are therefore differentiable once (no double backward).

Widths and heights are clamped at 0 (degenerate boxes have zero area), and at exactly 0 their
gradient is the derivative from above, torchvision's (which does not clamp): a box collapsed to
zero height still gets the gradient that grows it back.

EIoU, SIoU, alpha-IoU, Wise-IoU, MPDIoU and the Inner-/Focaler-IoU terms are plain autograd
expressions (:mod:`boxloss.iou_variants`), with the same conventions; they have no kernel yet.
"""

from __future__ import annotations

import functools
import inspect
import math
import warnings
from typing import Callable

import torch
from torch import Tensor, nn

from . import iou_variants as _variants
from ._checks import check_device
from ._kernels import iou_family_loss
from .boxes import _check_box_tensor, _check_eps, _upcast

__all__ = [
    "l1_loss",
    "l2_loss",
    "smooth_l1_loss",
    "iou_loss",
    "giou_loss",
    "diou_loss",
    "ciou_loss",
    "eiou_loss",
    "siou_loss",
    "alpha_iou_loss",
    "wise_iou_loss",
    "mpdiou_loss",
    "L1Loss",
    "L2Loss",
    "SmoothL1Loss",
    "IoULoss",
    "GIoULoss",
    "DIoULoss",
    "CIoULoss",
    "EIoULoss",
    "SIoULoss",
    "AlphaIoULoss",
    "WiseIoULoss",
    "MPDIoULoss",
    "LOSS_NAMES",
    "get_loss",
]

_REDUCTIONS = ("none", "mean", "sum")
# MMDetection's guard of the mean over avg_factor: sum / (avg_factor + eps), 0 (not NaN) for avg_factor = 0
_AVG_EPS = torch.finfo(torch.float32).eps


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")


def _reduce(loss: Tensor, weight: Tensor | None, reduction: str, avg_factor: float | Tensor | None) -> Tensor:
    """Apply an element weight, then reduce: ``"none"``, ``"sum"``, or ``"mean"``.

    ``weight`` has the shape of ``loss`` or one more trailing dimension of 4, which is averaged
    (the per-coordinate weights of a per-box loss). With ``avg_factor`` the mean is
    ``sum / (avg_factor + finfo(float32).eps)`` (MMDetection's rule: 0 for avg_factor = 0).
    """
    if weight is not None:
        if weight.dim() == loss.dim() + 1:
            weight = weight.mean(-1)
        loss = loss * weight
    if reduction == "none":
        return loss
    if reduction == "sum":
        if avg_factor is not None:
            raise ValueError("avg_factor can only be used with reduction='mean' or 'none', got reduction='sum'")
        return loss.sum()
    if avg_factor is not None:
        return loss.sum() / (avg_factor + _AVG_EPS)
    if loss.numel() == 0:
        return 0 * loss.sum()  # not NaN, and keeps the graph
    return loss.mean()


def _prepare(pred: Tensor, target: Tensor, weight: Tensor | None, reduction: str, eps: float):
    """Argument checks shared by every loss (shapes, devices, reduction, eps), then the float32 upcast."""
    _check_box_tensor("pred", pred)
    _check_box_tensor("target", target)
    if pred.shape != target.shape:
        raise ValueError(
            f"pred and target must have the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}"
        )
    if weight is not None:
        if not isinstance(weight, Tensor):
            raise TypeError(f"weight must be a torch.Tensor or None, got {type(weight).__name__}")
        if weight.shape not in (pred.shape[:-1], pred.shape):
            raise ValueError(
                f"weight must have shape {tuple(pred.shape[:-1])} or {tuple(pred.shape)}, got {tuple(weight.shape)}"
            )
    check_device("target", target, "pred", pred)
    check_device("weight", weight, "pred", pred)
    _check_reduction(reduction)
    _check_eps(eps)
    pred, target = _upcast(pred), _upcast(target)
    if pred.dtype != target.dtype:
        dtype = torch.promote_types(pred.dtype, target.dtype)
        pred, target = pred.to(dtype), target.to(dtype)
    if weight is not None:
        weight = weight.to(pred.dtype)
    return pred, target, weight


# --------------------------------------------------------------------------- L-norm losses


def l1_loss(pred, target, *, weight=None, reduction="mean", avg_factor=None, eps=1e-7):
    """L1 loss summed over the 4 coordinates: sum_k |pred_k - target_k|.

    Args:
        pred, target: ``[..., 4]`` boxes or encoded deltas.
        weight: ``[...]`` or ``[..., 4]`` element weights, or None.
        reduction: ``"none"`` (returns ``[...]``), ``"mean"`` or ``"sum"``.
        avg_factor: divisor of the summed loss for ``"mean"`` (e.g. the number of positives): the
            loss is ``sum / (avg_factor + finfo(float32).eps)`` as in MMDetection, 0 for 0.
        eps: a finite number > 0; unused by this loss, accepted so every loss has the same signature.

    Returns:
        The loss, ``[...]`` for ``"none"``, else a scalar.
    """
    pred, target, weight = _prepare(pred, target, weight, reduction, eps)
    return _reduce_coords((pred - target).abs(), weight, reduction, avg_factor)


def l2_loss(pred, target, *, weight=None, reduction="mean", avg_factor=None, eps=1e-7):
    """Squared L2 loss summed over the 4 coordinates: sum_k (pred_k - target_k)^2 (args as :func:`l1_loss`)."""
    pred, target, weight = _prepare(pred, target, weight, reduction, eps)
    return _reduce_coords((pred - target) ** 2, weight, reduction, avg_factor)


def smooth_l1_loss(pred, target, *, weight=None, reduction="mean", avg_factor=None, eps=1e-7, beta=1.0):
    """Smooth-L1 (Huber divided by beta), summed over the 4 coordinates.

    Per coordinate with d = pred - target: ``0.5 * d**2 / beta`` if ``|d| < beta`` else
    ``|d| - 0.5 * beta``; ``beta = 0`` is exactly L1. This is Fast R-CNN's smooth-L1 (torchvision's
    ``F.smooth_l1_loss``), not Huber (which is ``beta`` times it). Other args as :func:`l1_loss`.

    Reference: Girshick, "Fast R-CNN", ICCV 2015, arXiv:1504.08083.
    """
    if not (isinstance(beta, (int, float)) and beta >= 0 and math.isfinite(beta)):
        raise ValueError(f"beta must be a finite number >= 0, got {beta!r}")
    pred, target, weight = _prepare(pred, target, weight, reduction, eps)
    d = (pred - target).abs()
    if beta == 0:
        loss = d
    else:
        loss = torch.where(d < beta, 0.5 * d**2 / beta, d - 0.5 * beta)
    return _reduce_coords(loss, weight, reduction, avg_factor)


def _reduce_coords(loss: Tensor, weight, reduction, avg_factor) -> Tensor:
    # per-coordinate weights apply before the sum over coordinates
    if weight is not None:
        loss = loss * (weight if weight.dim() == loss.dim() else weight[..., None])
    return _reduce(loss.sum(-1), None, reduction, avg_factor)


# --------------------------------------------------------------------------- IoU family


def _modified(loss: Tensor, pred: Tensor, target: Tensor, eps: float, inner_ratio, focaler) -> Tensor:
    """``loss`` + IoU - IoU_aux when a modifier is set (autograd on top of the kernel's loss)."""
    if _variants.is_neutral(inner_ratio, focaler):  # the base loss exactly, gradient included
        return loss
    return loss + _variants.modifier_term(pred, target, eps, inner_ratio, focaler)


def iou_loss(pred, target, *, weight=None, reduction="mean", avg_factor=None, eps=1e-7, mode="linear",
             inner_ratio=None, focaler=None):
    """IoU loss of matched xyxy boxes, with IoU = intersection / (union + eps).

    ``mode="linear"``: 1 - IoU. ``mode="log"``: -ln(min(IoU + eps, 1)) (UnitBox): the eps keeps
    disjoint boxes finite, and the cap at 1 keeps the loss >= 0 where IoU + eps would exceed 1
    (boxes identical to within eps of their area: the loss is 0 there, with zero gradient). Other
    args as :func:`l1_loss`; ``inner_ratio`` and ``focaler`` (``mode="linear"`` only) as
    :func:`giou_loss`. Degenerate boxes (zero or negative width/height) give finite values and
    gradients; the loss has zero gradient while the boxes do not overlap (use GIoU/DIoU/CIoU there).

    Reference: Yu et al., "UnitBox: An Advanced Object Detection Network", ACM MM 2016,
    arXiv:1608.01471.
    """
    if mode not in ("linear", "log"):
        raise ValueError(f"mode must be 'linear' or 'log', got {mode!r}")
    _variants.check_modifiers(inner_ratio, focaler)
    if mode == "log" and (inner_ratio is not None or focaler is not None):
        raise ValueError(f"inner_ratio and focaler modify the linear IoU loss only, got mode={mode!r}")
    pred, target, weight = _prepare(pred, target, weight, reduction, eps)
    loss = iou_family_loss(pred, target, "iou", eps, mode=mode)
    loss = _modified(loss, pred, target, eps, inner_ratio, focaler)
    return _reduce(loss, weight, reduction, avg_factor)


def giou_loss(pred, target, *, weight=None, reduction="mean", avg_factor=None, eps=1e-7, inner_ratio=None,
              focaler=None):
    """GIoU loss of matched xyxy boxes: 1 - IoU + (|C| - U) / (|C| + eps), in [0, 2].

    Equals ``torchvision.ops.generalized_box_iou_loss`` (values and gradients). Other args as
    :func:`l1_loss`.

    Args:
        inner_ratio: Inner-IoU (Zhang et al., "Inner-IoU: More Effective Intersection over Union
            Loss with Auxiliary Bounding Box", arXiv:2311.02877): None, or the scale (> 0) of
            auxiliary boxes about the centres of both boxes; the loss becomes L + IoU - IoU_inner,
            the penalty terms still on the original boxes. 1 gives L.
        focaler: Focaler-IoU (Zhang and Zhang, "Focaler-IoU: More Focused Intersection over
            Union Loss", arXiv:2401.10525): None, or (d, u) with 0 <= d < u <= 1 (the paper's
            default range (0.0, 0.95)); the loss becomes L + IoU - IoU_f with
            IoU_f = clamp((IoU - d) / (u - d), 0, 1). (0, 1) gives L. With ``inner_ratio`` too,
            IoU_f is computed from IoU_inner.

    Reference: Rezatofighi et al., "Generalized Intersection over Union", CVPR 2019, arXiv:1902.09630.
    """
    _variants.check_modifiers(inner_ratio, focaler)
    pred, target, weight = _prepare(pred, target, weight, reduction, eps)
    loss = _modified(iou_family_loss(pred, target, "giou", eps), pred, target, eps, inner_ratio, focaler)
    return _reduce(loss, weight, reduction, avg_factor)


def diou_loss(pred, target, *, weight=None, reduction="mean", avg_factor=None, eps=1e-7, inner_ratio=None,
              focaler=None):
    """DIoU loss of matched xyxy boxes: 1 - IoU + rho^2 / (c^2 + eps), in [0, 2].

    rho is the distance between the box centres and c the diagonal of the smallest enclosing box.
    Equals ``torchvision.ops.distance_box_iou_loss`` (values and gradients). Args as :func:`l1_loss`;
    ``inner_ratio`` and ``focaler`` as :func:`giou_loss`.

    Reference: Zheng et al., "Distance-IoU Loss: Faster and Better Learning for Bounding Box
    Regression", AAAI 2020, arXiv:1911.08287.
    """
    _variants.check_modifiers(inner_ratio, focaler)
    pred, target, weight = _prepare(pred, target, weight, reduction, eps)
    loss = _modified(iou_family_loss(pred, target, "diou", eps), pred, target, eps, inner_ratio, focaler)
    return _reduce(loss, weight, reduction, avg_factor)


_CIOU_GRADS = ("exact", "paper")
_CIOU_ALPHAS = ("standard", "gated")
# ciou_grad="paper" warns once per process on boxes of pixel scale; set once it has (tests reset it)
_paper_grad_warned = False


def _warn_paper_grad_scale(pred: Tensor, target: Tensor) -> None:
    """Warn (once per process) when ``ciou_grad="paper"`` meets boxes with a side larger than 1.

    An explicit flag rather than the warnings module's once-per-location default, which fires again
    for every new caller line and again after a filter reset. Reading the sides synchronises on a
    GPU: it is done only until the warning has fired, and only in the paper mode.
    """
    global _paper_grad_warned
    if _paper_grad_warned or pred.numel() == 0:
        return
    with torch.no_grad():
        side = torch.maximum((pred[..., 2:] - pred[..., :2]).amax(), (target[..., 2:] - target[..., :2]).amax())
        side = side.item()
    if side > 1:
        _paper_grad_warned = True
        warnings.warn(
            f"ciou_grad='paper' drops the 1 / (w^2 + h^2) factor of CIoU's aspect gradient, as the authors' "
            f"Darknet and MATLAB code, which is their gradient only for image-normalised boxes (sides <= 1); "
            f"these boxes have a side of {side:.4g}, where it multiplies the aspect gradient by "
            f"w^2 + h^2 instead. The authors' PyTorch code uses the exact gradient: ciou_grad='exact' "
            f"(the default). (Warned once per process.)",
            UserWarning,
            stacklevel=3,
        )


def ciou_loss(
    pred,
    target,
    *,
    weight=None,
    reduction="mean",
    avg_factor=None,
    eps=1e-7,
    ciou_grad="exact",
    alpha="standard",
    inner_ratio=None,
    focaler=None,
):
    """CIoU loss of matched xyxy boxes: DIoU loss + alpha * v.

    v = 4/pi^2 * (atan(w_g / h_g) - atan(w / h))^2 measures aspect-ratio consistency and
    alpha = v / ((1 - IoU) + v + eps) is a trade-off weight.

    Conventions (peers disagree; these are the choices):

    * The angles are ``atan2(w, h)`` of the clamped sizes, without eps: torchvision's
      ``atan(w / h)`` at every scale (an eps under the ratio shifts it by eps / h, which matters for
      image-normalised boxes), and finite at h = 0 (pi/2; a point has angle 0 and no gradient).
    * alpha is computed without gradient, as in the paper's code, torchvision, MMDetection,
      detectron2 and ultralytics.
    * ``ciou_grad="exact"`` (default) differentiates v exactly: dv/dw and dv/dh carry
      1 / (w^2 + h^2); with the other conventions this is torchvision's ``complete_box_iou_loss``
      gradient. ``ciou_grad="paper"`` drops that factor (eq. 12 of the paper: it explodes for small
      image-normalised boxes), as the authors' Darknet and MATLAB code does. That is their
      gradient only for image-normalised boxes (sides <= 1): in pixel coordinates dropping the
      factor multiplies the aspect gradient by w^2 + h^2 (thousands for boxes a few tens of
      pixels wide), so the paper mode warns once per process when it sees a side larger than 1. The
      authors' PyTorch code uses the exact gradient. Values are identical in both modes.
    * ``alpha="standard"`` (default) or ``"gated"``: MMDetection's alpha, zero where IoU <= 0.5.

    Other args as :func:`l1_loss`; ``inner_ratio`` and ``focaler`` as :func:`giou_loss` (Inner-CIoU:
    CIoU's alpha and v from the original boxes, plus IoU - IoU_inner).

    Reference: Zheng et al., "Distance-IoU Loss: Faster and Better Learning for Bounding Box
    Regression", AAAI 2020, arXiv:1911.08287.
    """
    if ciou_grad not in _CIOU_GRADS:
        raise ValueError(f"ciou_grad must be one of {_CIOU_GRADS}, got {ciou_grad!r}")
    if alpha not in _CIOU_ALPHAS:
        raise ValueError(f"alpha must be one of {_CIOU_ALPHAS}, got {alpha!r}")
    _variants.check_modifiers(inner_ratio, focaler)
    pred, target, weight = _prepare(pred, target, weight, reduction, eps)
    if ciou_grad == "paper":
        _warn_paper_grad_scale(pred, target)
    loss = iou_family_loss(pred, target, "ciou", eps, ciou_grad=ciou_grad, alpha=alpha)
    loss = _modified(loss, pred, target, eps, inner_ratio, focaler)
    return _reduce(loss, weight, reduction, avg_factor)


# --------------------------------------------------------------------------- after CIoU


def eiou_loss(pred, target, *, weight=None, reduction="mean", avg_factor=None, eps=1e-7, focal_gamma=0.0,
              inner_ratio=None, focaler=None):
    """Efficient-IoU (EIoU) loss of matched xyxy boxes, and Focal-EIoU.

    ``1 - IoU + rho^2 / (C_w^2 + C_h^2 + eps) + (w - w_g)^2 / (C_w^2 + eps) + (h - h_g)^2 / (C_h^2 + eps)``
    with C_w, C_h the extents of the smallest enclosing box: DIoU's distance term plus the width and
    height differences in place of CIoU's aspect term. Focal-EIoU (``focal_gamma`` > 0) multiplies
    the loss by IoU^gamma computed **without gradient**, a weight (with its gradient, IoU^gamma is
    not differentiable at IoU = 0 for gamma < 1: NaN for disjoint boxes at the paper's 0.5); it is
    0 for disjoint boxes. This is not MMDetection's ``EIoULoss``, which is Extended-IoU (another
    paper). Other args as :func:`l1_loss`; ``inner_ratio`` and ``focaler`` as :func:`giou_loss`
    (the focal weight multiplies the modified loss).

    Args:
        focal_gamma: Focal-EIoU's exponent, a finite number >= 0 (0: plain EIoU; the paper uses 0.5).

    Reference: Zhang et al., "Focal and Efficient IOU Loss for Accurate Bounding Box Regression",
    Neurocomputing 2022, arXiv:2101.08158.
    """
    _variants.check_nonnegative("focal_gamma", focal_gamma)
    _variants.check_modifiers(inner_ratio, focaler)
    pred, target, weight = _prepare(pred, target, weight, reduction, eps)
    loss = _variants.eiou(pred, target, eps, focal_gamma, inner_ratio, focaler)
    return _reduce(loss, weight, reduction, avg_factor)


def siou_loss(pred, target, *, weight=None, reduction="mean", avg_factor=None, eps=1e-7, theta=4.0,
              inner_ratio=None, focaler=None):
    """SIoU loss of matched xyxy boxes: 1 - IoU + (Delta + Omega) / 2.

    * angle cost Lambda = sin 2a, a the angle between the line of the centres and the x axis
      (the paper's 1 - 2 sin^2(a - pi/4), the same for a and pi/2 - a); 0 for equal centres;
    * distance cost Delta = sum over x, y of 1 - exp(-(2 - Lambda) rho_t), rho_x = (dx / C_w)^2,
      rho_y = (dy / C_h)^2 (dx, dy the centre offsets, C_w, C_h the enclosing box's extents; eps
      added to C_w^2, C_h^2);
    * shape cost Omega = sum over w, h of (1 - exp(-omega_t))^theta, omega_w = |w - w_g| / max(w, w_g).

    The sign is the paper's (as YOLOv6 and MMDetection's ``neg_gamma=True``): Delta grows from 0 as
    the centres move apart. MMDetection's default ``neg_gamma=False`` computes
    exp(+(2 - Lambda) rho), a Delta that goes negative and a loss that falls to 0 as the boxes move
    apart; that sign is not offered. Unlike MMDetection the loss is not clamped at 2 (far-apart boxes
    of very different sizes pass 2 slightly).
    Other args as :func:`l1_loss`; ``inner_ratio`` and ``focaler`` as :func:`giou_loss`.

    Args:
        theta: exponent of the shape cost, a finite number >= 1 (the paper: 2 to 6, default 4;
            below 1 its gradient is infinite where the sides match).

    Reference: Gevorgyan, "SIoU Loss: More Powerful Learning for Bounding Box Regression",
    arXiv:2205.12740.
    """
    if not (_variants._is_number(theta) and theta >= 1):
        raise ValueError(f"theta must be a finite number >= 1, got {theta!r}")
    _variants.check_modifiers(inner_ratio, focaler)
    pred, target, weight = _prepare(pred, target, weight, reduction, eps)
    loss = _variants.siou(pred, target, eps, theta, inner_ratio, focaler)
    return _reduce(loss, weight, reduction, avg_factor)


def alpha_iou_loss(pred, target, *, weight=None, reduction="mean", avg_factor=None, eps=1e-7, alpha=3.0,
                   kind="ciou"):
    """alpha-IoU loss of matched xyxy boxes: the IoU-family loss ``kind`` with every term to the power alpha.

    * ``kind="iou"``: 1 - IoU^a;
    * ``"giou"``: 1 - IoU^a + ((|C| - U) / (|C| + eps))^a;
    * ``"diou"``: 1 - IoU^a + (rho^2 / (c^2 + eps))^a;
    * ``"ciou"``: 1 - IoU^a + (rho^2 / (c^2 + eps))^a + (beta v)^a, v CIoU's aspect term and
      beta = v / (1 - IoU + v + eps) from the plain IoU, without gradient (as CIoU's alpha).

    The powers are exact: the authors' code adds eps inside every power (at alpha = 3 a loss of
    -3e-7 for identical boxes, at alpha = 0.5 a floor of 3e-4 on every term); here a term that is 0
    stays 0, with zero gradient. alpha = 1 is the existing loss of that kind, computed by it.
    Other args as :func:`l1_loss`.

    Args:
        alpha: the power, a finite number > 0 (the paper recommends 3).
        kind: ``"iou"``, ``"giou"``, ``"diou"`` or ``"ciou"``.

    Reference: He et al., "Alpha-IoU: A Family of Power Intersection over Union Losses for Bounding
    Box Regression", NeurIPS 2021, arXiv:2110.13675.
    """
    _variants.check_positive("alpha", alpha)
    if kind not in _variants.ALPHA_IOU_KINDS:
        raise ValueError(f"kind must be one of {_variants.ALPHA_IOU_KINDS}, got {kind!r}")
    if alpha == 1:  # the existing loss itself, bit for bit
        return _FUNCTIONS[kind](pred, target, weight=weight, reduction=reduction, avg_factor=avg_factor, eps=eps)
    pred, target, weight = _prepare(pred, target, weight, reduction, eps)
    return _reduce(_variants.alpha_iou(pred, target, eps, alpha, kind), weight, reduction, avg_factor)


def _check_wise_options(version, alpha, delta, gamma) -> None:
    if isinstance(version, bool) or version not in _variants.WISE_IOU_VERSIONS:
        raise ValueError(f"version must be one of {_variants.WISE_IOU_VERSIONS}, got {version!r}")
    _variants.check_positive("alpha", alpha)
    _variants.check_positive("delta", delta)
    _variants.check_nonnegative("gamma", gamma)


def wise_iou_loss(pred, target, *, weight=None, reduction="mean", avg_factor=None, eps=1e-7, version=3,
                  iou_mean=None, alpha=1.9, delta=3.0, gamma=0.5):
    """Wise-IoU (WIoU) loss of matched xyxy boxes, v1, v2 or v3.

    * v1: ``R * L_IoU`` with L_IoU = 1 - IoU and R = exp(rho^2 / (C_w^2 + C_h^2 + eps)*), where * marks
      a value without gradient: only the denominator (C_w, C_h: the enclosing box's extents);
      the distance rho^2 keeps its gradient.
    * v2: ``(L_IoU* / mean)^gamma * v1`` (monotonic focusing).
    * v3: ``r * v1`` with the outlier degree beta = L_IoU* / mean and the non-monotonic focusing
      coefficient r = beta / (delta * alpha^(beta - delta)), without gradient.

    ``mean`` is ``iou_mean``: None for the mean of L_IoU over the pairs given (unweighted), or a
    number or tensor (broadcast to the pairs) such as the running mean :class:`WiseIoULoss` keeps.
    It is clamped at ``eps`` (a batch of identical boxes has mean 0). The defaults are the
    constants of the authors' code (alpha 1.9, delta 3; v2's square root, gamma 0.5). Other args
    as :func:`l1_loss`.

    Args:
        version: 1, 2 or 3.
        iou_mean: None, a number > 0, or a tensor: the mean of L_IoU that beta is relative to.
        alpha, delta: v3's constants (finite numbers > 0).
        gamma: v2's exponent (a finite number >= 0).

    Reference: Tong et al., "Wise-IoU: Bounding Box Regression Loss with Dynamic Focusing Mechanism",
    arXiv:2301.10051.
    """
    _check_wise_options(version, alpha, delta, gamma)
    if iou_mean is not None and not isinstance(iou_mean, Tensor):
        _variants.check_positive("iou_mean", iou_mean)
    pred, target, weight = _prepare(pred, target, weight, reduction, eps)
    loss = _variants.wise_iou(pred, target, eps, version, iou_mean, alpha, delta, gamma)
    return _reduce(loss, weight, reduction, avg_factor)


def _image_size_tensor(image_size, pred: Tensor) -> Tensor:
    """``image_size`` as a ``[..., 2]`` tensor of pred's dtype and device, checked."""
    if image_size is None:
        raise ValueError("image_size is required: (height, width) of the input image, or a tensor broadcastable "
                         "to [..., 2]; got None")
    if isinstance(image_size, Tensor):
        if image_size.dim() == 0 or image_size.shape[-1] != 2:
            raise ValueError(f"image_size must be (height, width) or a tensor of shape [..., 2], got a tensor of "
                             f"shape {tuple(image_size.shape)}")
        try:
            torch.broadcast_shapes(image_size.shape[:-1], pred.shape[:-1])
        except RuntimeError:
            raise ValueError(f"image_size of shape {tuple(image_size.shape)} does not broadcast to the pairs' "
                             f"shape {tuple(pred.shape[:-1])} + (2,)") from None
        return image_size.to(device=pred.device, dtype=pred.dtype)
    if (not isinstance(image_size, (tuple, list)) or len(image_size) != 2
            or not all(_variants._is_number(x) and x > 0 for x in image_size)):
        raise ValueError(f"image_size must be (height, width), two finite numbers > 0, or a tensor, got {image_size!r}")
    return torch.tensor(image_size, dtype=pred.dtype, device=pred.device)


def mpdiou_loss(pred, target, *, weight=None, reduction="mean", avg_factor=None, eps=1e-7, image_size=None):
    """MPDIoU loss of matched xyxy boxes: 1 - IoU + (d1^2 + d2^2) / (H^2 + W^2 + eps).

    d1 and d2 are the distances between the top-left corners and between the bottom-right corners
    of the two boxes, H and W the height and width of the input image. Other args as :func:`l1_loss`.

    Args:
        image_size: required: ``(height, width)`` for every pair, or a tensor broadcastable to
            ``[..., 2]`` (e.g. ``[N, 2]``, one row per pair, for a batch of images of different sizes).

    Reference: Ma and Xu, "MPDIoU: A Loss for Efficient and Accurate Bounding Box Regression",
    arXiv:2307.07662.
    """
    _check_box_tensor("pred", pred)
    size = _image_size_tensor(image_size, pred)
    pred, target, weight = _prepare(pred, target, weight, reduction, eps)
    return _reduce(_variants.mpdiou(pred, target, eps, size.to(pred.dtype)), weight, reduction, avg_factor)


# --------------------------------------------------------------------------- modules and names

LOSS_NAMES = ("l1", "l2", "smooth_l1", "iou", "giou", "diou", "ciou", "eiou", "siou", "alpha_iou", "wise_iou", "mpdiou")
_FUNCTIONS: dict[str, Callable[..., Tensor]] = {
    "l1": l1_loss,
    "l2": l2_loss,
    "smooth_l1": smooth_l1_loss,
    "iou": iou_loss,
    "giou": giou_loss,
    "diou": diou_loss,
    "ciou": ciou_loss,
    "eiou": eiou_loss,
    "siou": siou_loss,
    "alpha_iou": alpha_iou_loss,
    "wise_iou": wise_iou_loss,
    "mpdiou": mpdiou_loss,
}


def _bind_options(fn: Callable[..., Tensor], options: dict) -> None:
    """Raise a TypeError naming an option ``fn`` does not take (before any data is seen)."""
    params = inspect.signature(fn).parameters
    for key in options:
        if key in ("pred", "target") or key not in params:
            valid = [p for p in params if p not in ("pred", "target")]
            raise TypeError(f"{fn.__name__}() got an unexpected option {key!r}; valid options: {valid}")


def get_loss(name: str, **options) -> Callable[..., Tensor]:
    """The loss function called ``name`` with ``options`` bound, e.g. ``get_loss("smooth_l1", beta=1/9)``.

    Args:
        name: one of :data:`LOSS_NAMES`: ``l1``, ``l2``, ``smooth_l1``, ``iou``, ``giou``, ``diou``,
            ``ciou``, ``eiou``, ``siou``, ``alpha_iou``, ``wise_iou``, ``mpdiou``.
        **options: keyword options of that loss (``reduction``, ``eps``, ``beta``, ``mode``,
            ``inner_ratio``, ``image_size``, ...).

    Returns:
        A callable ``f(pred, target, **more_options)``.

    Raises:
        ValueError: for an unknown name, listing the valid ones.
        TypeError: for an option the loss does not take.
    """
    if name not in _FUNCTIONS:
        raise ValueError(f"unknown loss name {name!r}; valid names: {', '.join(LOSS_NAMES)}")
    fn = _FUNCTIONS[name]
    _bind_options(fn, options)
    return functools.partial(fn, **options) if options else fn


class _BoxLoss(nn.Module):
    """A loss function as a module: stores the options, ``forward`` calls the function."""

    _fn: Callable[..., Tensor]

    def __init__(self, *, reduction: str = "mean", loss_weight: float = 1.0, **options):
        super().__init__()
        _check_reduction(reduction)
        _bind_options(type(self)._fn, options)
        self.reduction = reduction
        self.loss_weight = loss_weight
        self.options = options

    def forward(self, pred: Tensor, target: Tensor, weight: Tensor | None = None, avg_factor=None) -> Tensor:
        loss = type(self)._fn(
            pred, target, weight=weight, reduction=self.reduction, avg_factor=avg_factor, **self.options
        )
        return self.loss_weight * loss

    def extra_repr(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in self.options.items())
        return f"reduction={self.reduction!r}, loss_weight={self.loss_weight}{opts}"


class L1Loss(_BoxLoss):
    """Module form of :func:`l1_loss`."""

    _fn = staticmethod(l1_loss)


class L2Loss(_BoxLoss):
    """Module form of :func:`l2_loss`."""

    _fn = staticmethod(l2_loss)


class SmoothL1Loss(_BoxLoss):
    """Module form of :func:`smooth_l1_loss` (option ``beta``)."""

    _fn = staticmethod(smooth_l1_loss)


class IoULoss(_BoxLoss):
    """Module form of :func:`iou_loss` (option ``mode``)."""

    _fn = staticmethod(iou_loss)


class GIoULoss(_BoxLoss):
    """Module form of :func:`giou_loss`."""

    _fn = staticmethod(giou_loss)


class DIoULoss(_BoxLoss):
    """Module form of :func:`diou_loss`."""

    _fn = staticmethod(diou_loss)


class CIoULoss(_BoxLoss):
    """Module form of :func:`ciou_loss` (options ``ciou_grad``, ``alpha``)."""

    _fn = staticmethod(ciou_loss)


class EIoULoss(_BoxLoss):
    """Module form of :func:`eiou_loss` (Efficient-IoU; options ``focal_gamma``, ``inner_ratio``,
    ``focaler``). Not MMDetection's ``EIoULoss`` (Extended-IoU)."""

    _fn = staticmethod(eiou_loss)


class SIoULoss(_BoxLoss):
    """Module form of :func:`siou_loss` (options ``theta``, ``inner_ratio``, ``focaler``)."""

    _fn = staticmethod(siou_loss)


class AlphaIoULoss(_BoxLoss):
    """Module form of :func:`alpha_iou_loss` (options ``alpha``, ``kind``)."""

    _fn = staticmethod(alpha_iou_loss)


class MPDIoULoss(_BoxLoss):
    """Module form of :func:`mpdiou_loss`: pass ``image_size`` to the constructor (one size for
    every call) or to ``forward`` (per call, e.g. ``[N, 2]``)."""

    _fn = staticmethod(mpdiou_loss)

    def forward(self, pred: Tensor, target: Tensor, weight: Tensor | None = None, avg_factor=None,
                image_size=None) -> Tensor:
        options = self.options if image_size is None else {**self.options, "image_size": image_size}
        loss = mpdiou_loss(pred, target, weight=weight, reduction=self.reduction, avg_factor=avg_factor, **options)
        return self.loss_weight * loss


class WiseIoULoss(nn.Module):
    """Wise-IoU as a module that keeps the running mean of L_IoU = 1 - IoU (:func:`wise_iou_loss`).

    The mean is the buffer ``iou_mean`` (in the state dict, so checkpoints save and restore it),
    1.0 at the start. In training mode each call first updates it with the mean of L_IoU over the
    pairs of the call, ``iou_mean <- (1 - momentum) iou_mean + momentum * mean``, then computes the
    loss relative to it; in eval mode it is frozen. A call without pairs leaves it unchanged.
    Loading a state dict without the buffer (a model saved before this loss was chosen, or
    torchvision's weights) keeps the current value instead of failing.

    Args:
        momentum: weight of each call's mean, in (0, 1] (0.01 by default; the authors' code uses
            1 - 0.5^(1/7000), a half-life of 7,000 calls).
        version, alpha, delta, gamma, eps: as :func:`wise_iou_loss`.
        reduction: ``"none"``, ``"mean"`` or ``"sum"``.
        loss_weight: multiplies the loss.
    """

    def __init__(self, *, momentum: float = 0.01, version: int = 3, alpha: float = 1.9, delta: float = 3.0,
                 gamma: float = 0.5, eps: float = 1e-7, reduction: str = "mean", loss_weight: float = 1.0):
        super().__init__()
        if not (_variants._is_number(momentum) and 0 < momentum <= 1):
            raise ValueError(f"momentum must be a number in (0, 1], got {momentum!r}")
        _check_wise_options(version, alpha, delta, gamma)
        _check_eps(eps)
        _check_reduction(reduction)
        self.momentum, self.version, self.alpha, self.delta, self.gamma, self.eps = (
            momentum, version, alpha, delta, gamma, eps)
        self.reduction = reduction
        self.loss_weight = loss_weight
        self.register_buffer("iou_mean", torch.tensor(1.0))

    def forward(self, pred: Tensor, target: Tensor, weight: Tensor | None = None, avg_factor=None) -> Tensor:
        if self.training and pred.shape[:-1].numel() > 0:
            p, t, _ = _prepare(pred, target, None, self.reduction, self.eps)
            batch = _variants.iou_loss_mean(p, t, self.eps)
            self.iou_mean.mul_(1 - self.momentum).add_(self.momentum * batch.to(self.iou_mean.dtype))
        loss = wise_iou_loss(pred, target, weight=weight, reduction=self.reduction, avg_factor=avg_factor,
                             eps=self.eps, version=self.version, iou_mean=self.iou_mean, alpha=self.alpha,
                             delta=self.delta, gamma=self.gamma)
        return self.loss_weight * loss

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        missing = len(missing_keys)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        # an absent running mean is not an error: keep the current one
        missing_keys[missing:] = [k for k in missing_keys[missing:] if k != prefix + "iou_mean"]

    def extra_repr(self) -> str:
        return (f"version={self.version}, momentum={self.momentum}, alpha={self.alpha}, delta={self.delta}, "
                f"gamma={self.gamma}, reduction={self.reduction!r}, loss_weight={self.loss_weight}")
