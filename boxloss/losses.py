"""Bounding-box regression losses: L1, L2, smooth-L1, IoU, GIoU, DIoU, CIoU.

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
"""

from __future__ import annotations

import functools
import inspect
import math
import warnings
from typing import Callable

import torch
from torch import Tensor, nn

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
    "L1Loss",
    "L2Loss",
    "SmoothL1Loss",
    "IoULoss",
    "GIoULoss",
    "DIoULoss",
    "CIoULoss",
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
    """Argument checks shared by every loss (shapes, reduction, eps), then the float32 upcast."""
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


def iou_loss(pred, target, *, weight=None, reduction="mean", avg_factor=None, eps=1e-7, mode="linear"):
    """IoU loss of matched xyxy boxes, with IoU = intersection / (union + eps).

    ``mode="linear"``: 1 - IoU. ``mode="log"``: -ln(min(IoU + eps, 1)) (UnitBox): the eps keeps
    disjoint boxes finite, and the cap at 1 keeps the loss >= 0 where IoU + eps would exceed 1
    (boxes identical to within eps of their area: the loss is 0 there, with zero gradient). Other
    args as :func:`l1_loss`. Degenerate boxes (zero or negative width/height) give finite values and
    gradients; the loss has zero gradient while the boxes do not overlap (use GIoU/DIoU/CIoU there).

    Reference: Yu et al., "UnitBox: An Advanced Object Detection Network", ACM MM 2016,
    arXiv:1608.01471.
    """
    if mode not in ("linear", "log"):
        raise ValueError(f"mode must be 'linear' or 'log', got {mode!r}")
    pred, target, weight = _prepare(pred, target, weight, reduction, eps)
    loss = iou_family_loss(pred, target, "iou", eps, mode=mode)
    return _reduce(loss, weight, reduction, avg_factor)


def giou_loss(pred, target, *, weight=None, reduction="mean", avg_factor=None, eps=1e-7):
    """GIoU loss of matched xyxy boxes: 1 - IoU + (|C| - U) / (|C| + eps), in [0, 2].

    Equals ``torchvision.ops.generalized_box_iou_loss`` (values and gradients). Args as :func:`l1_loss`.

    Reference: Rezatofighi et al., "Generalized Intersection over Union", CVPR 2019, arXiv:1902.09630.
    """
    pred, target, weight = _prepare(pred, target, weight, reduction, eps)
    return _reduce(iou_family_loss(pred, target, "giou", eps), weight, reduction, avg_factor)


def diou_loss(pred, target, *, weight=None, reduction="mean", avg_factor=None, eps=1e-7):
    """DIoU loss of matched xyxy boxes: 1 - IoU + rho^2 / (c^2 + eps), in [0, 2].

    rho is the distance between the box centres and c the diagonal of the smallest enclosing box.
    Equals ``torchvision.ops.distance_box_iou_loss`` (values and gradients). Args as :func:`l1_loss`.

    Reference: Zheng et al., "Distance-IoU Loss: Faster and Better Learning for Bounding Box
    Regression", AAAI 2020, arXiv:1911.08287.
    """
    pred, target, weight = _prepare(pred, target, weight, reduction, eps)
    return _reduce(iou_family_loss(pred, target, "diou", eps), weight, reduction, avg_factor)


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

    Other args as :func:`l1_loss`.

    Reference: Zheng et al., "Distance-IoU Loss: Faster and Better Learning for Bounding Box
    Regression", AAAI 2020, arXiv:1911.08287.
    """
    if ciou_grad not in _CIOU_GRADS:
        raise ValueError(f"ciou_grad must be one of {_CIOU_GRADS}, got {ciou_grad!r}")
    if alpha not in _CIOU_ALPHAS:
        raise ValueError(f"alpha must be one of {_CIOU_ALPHAS}, got {alpha!r}")
    pred, target, weight = _prepare(pred, target, weight, reduction, eps)
    if ciou_grad == "paper":
        _warn_paper_grad_scale(pred, target)
    loss = iou_family_loss(pred, target, "ciou", eps, ciou_grad=ciou_grad, alpha=alpha)
    return _reduce(loss, weight, reduction, avg_factor)


# --------------------------------------------------------------------------- modules and names

LOSS_NAMES = ("l1", "l2", "smooth_l1", "iou", "giou", "diou", "ciou")
_FUNCTIONS: dict[str, Callable[..., Tensor]] = {
    "l1": l1_loss,
    "l2": l2_loss,
    "smooth_l1": smooth_l1_loss,
    "iou": iou_loss,
    "giou": giou_loss,
    "diou": diou_loss,
    "ciou": ciou_loss,
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
        name: one of ``l1``, ``l2``, ``smooth_l1``, ``iou``, ``giou``, ``diou``, ``ciou``.
        **options: keyword options of that loss (``reduction``, ``eps``, ``beta``, ``mode``, ...).

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
