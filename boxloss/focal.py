"""Classification losses for detectors: sigmoid focal loss, softmax focal loss, label-smoothed CE."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import check_device
from .losses import _check_reduction, _reduce

__all__ = ["sigmoid_focal_loss", "softmax_focal_loss", "cross_entropy", "SigmoidFocalLoss"]


def _float(t: Tensor) -> Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _check_weight(weight, shape: torch.Size, allowed: tuple) -> None:
    if weight is not None and tuple(weight.shape) not in allowed:
        raise ValueError(f"weight must have shape {' or '.join(map(str, allowed))} for inputs {tuple(shape)}, "
                         f"got {tuple(weight.shape)}")


def sigmoid_focal_loss(
    inputs: Tensor,
    targets: Tensor,
    *,
    alpha: float = 0.25,
    gamma: float = 2.0,
    weight: Tensor | None = None,
    reduction: str = "mean",
    avg_factor=None,
) -> Tensor:
    """Sigmoid focal loss FL = -alpha_t (1 - p_t)^gamma log(p_t), elementwise.

    Computed through ``binary_cross_entropy_with_logits`` for stability; equals
    ``torchvision.ops.sigmoid_focal_loss`` in values and gradients. With ``alpha < 0`` the alpha
    weighting is off, and with ``alpha = -1, gamma = 0`` this is plain BCE with logits.

    Args:
        inputs: logits of any shape.
        targets: same shape, binary (or soft) labels in [0, 1], on the device of ``inputs``.
        alpha: weight of the positives in (0, 1); a negative value disables it.
        gamma: focusing exponent >= 0.
        weight: element weights of the shape of ``inputs`` (on its device), or None.
        reduction: ``"none"`` (same shape as ``inputs``), ``"mean"`` or ``"sum"``.
        avg_factor: divisor of the summed loss for ``"mean"`` (RetinaNet: the number of positives).

    Returns:
        The loss; float16/bfloat16 inputs are computed and returned in float32.

    Reference: Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017, arXiv:1708.02002.
    """
    if not isinstance(inputs, Tensor) or not isinstance(targets, Tensor):
        raise TypeError(f"inputs and targets must be tensors, got {type(inputs).__name__} and {type(targets).__name__}")
    if inputs.shape != targets.shape:
        raise ValueError(f"inputs and targets must have the same shape, got {tuple(inputs.shape)} and {tuple(targets.shape)}")
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma!r}")
    _check_reduction(reduction)
    _check_weight(weight, inputs.shape, (tuple(inputs.shape),))
    check_device("targets", targets, "inputs", inputs)
    check_device("weight", weight, "inputs", inputs)
    inputs = _float(inputs)
    targets = targets.to(inputs.dtype)
    p = torch.sigmoid(inputs)
    ce = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * ((1 - p_t) ** gamma)
    if alpha >= 0:
        alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
        loss = alpha_t * loss
    return _reduce(loss, weight, reduction, avg_factor)


def softmax_focal_loss(
    logits: Tensor,
    targets: Tensor,
    *,
    gamma: float = 2.0,
    alpha: Tensor | None = None,
    label_smoothing: float = 0.0,
    weight: Tensor | None = None,
    reduction: str = "mean",
    avg_factor=None,
) -> Tensor:
    """Softmax focal loss, -sum_k q_k alpha_k (1 - p_k)^gamma log p_k, per sample.

    q is the (label-smoothed) target: (1 - eps) * onehot(y) + eps / K, as in ``F.cross_entropy``.
    With ``gamma = 0`` this is cross entropy.

    Args:
        logits: ``[N, K]`` class scores.
        targets: ``[N]`` integer labels in [0, K).
        gamma: focusing exponent >= 0.
        alpha: ``[K]`` class weights, or None.
        label_smoothing: eps in [0, 1].
        weight: ``[N]`` sample weights, or None.

    ``targets``, ``alpha`` and ``weight`` must be on the device of ``logits`` (a ValueError
    otherwise: a CPU ``alpha`` would be copied to the GPU on every call).
        reduction, avg_factor: as :func:`sigmoid_focal_loss`; ``"none"`` returns ``[N]``.

    Reference: Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017, arXiv:1708.02002.
    """
    if not isinstance(logits, Tensor) or logits.dim() != 2:
        raise ValueError(f"logits must be a [N, K] tensor, got {getattr(logits, 'shape', type(logits).__name__)}")
    if not isinstance(targets, Tensor) or targets.shape != logits.shape[:1] or targets.is_floating_point():
        raise ValueError(
            f"targets must be an integer tensor of shape [{logits.shape[0]}], got "
            f"{getattr(targets, 'dtype', type(targets).__name__)} {tuple(getattr(targets, 'shape', ()))}"
        )
    num_classes = logits.shape[1]
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing!r}")
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma!r}")
    if alpha is not None and tuple(alpha.shape) != (num_classes,):
        raise ValueError(f"alpha must have shape ({num_classes},), got {tuple(alpha.shape)}")
    _check_reduction(reduction)
    _check_weight(weight, logits.shape, ((logits.shape[0],),))
    for name, tensor in (("targets", targets), ("alpha", alpha), ("weight", weight)):
        check_device(name, tensor, "logits", logits)
    logits = _float(logits)
    log_p = F.log_softmax(logits, dim=-1)  # [N, K]
    q = F.one_hot(targets.long(), num_classes).to(logits.dtype)
    if label_smoothing > 0:
        q = q * (1 - label_smoothing) + label_smoothing / num_classes
    per_class = -q * log_p
    if gamma != 0:
        per_class = per_class * (1 - log_p.exp()) ** gamma
    if alpha is not None:
        per_class = per_class * alpha.to(logits.dtype)
    return _reduce(per_class.sum(-1), weight, reduction, avg_factor)


def cross_entropy(
    logits: Tensor,
    targets: Tensor,
    *,
    label_smoothing: float = 0.0,
    weight: Tensor | None = None,
    reduction: str = "mean",
    avg_factor=None,
) -> Tensor:
    """Softmax cross entropy with label smoothing (target (1 - eps) onehot + eps / K).

    Equals ``F.cross_entropy(logits, targets, label_smoothing=eps)``; ``weight`` is per sample
    (not per class) and ``avg_factor`` as in the other losses. Args as :func:`softmax_focal_loss`.
    """
    return softmax_focal_loss(
        logits, targets, gamma=0.0, label_smoothing=label_smoothing, weight=weight,
        reduction=reduction, avg_factor=avg_factor,
    )


class SigmoidFocalLoss(nn.Module):
    """Module form of :func:`sigmoid_focal_loss`."""

    def __init__(self, *, alpha: float = 0.25, gamma: float = 2.0, reduction: str = "mean", loss_weight: float = 1.0):
        super().__init__()
        _check_reduction(reduction)
        self.alpha, self.gamma, self.reduction, self.loss_weight = alpha, gamma, reduction, loss_weight

    def forward(self, inputs: Tensor, targets: Tensor, weight: Tensor | None = None, avg_factor=None) -> Tensor:
        return self.loss_weight * sigmoid_focal_loss(
            inputs, targets, alpha=self.alpha, gamma=self.gamma, weight=weight,
            reduction=self.reduction, avg_factor=avg_factor,
        )

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, gamma={self.gamma}, reduction={self.reduction!r}, loss_weight={self.loss_weight}"
