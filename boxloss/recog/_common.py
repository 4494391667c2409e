"""Helpers shared by the recognition losses: input checks, reduction, distances.

Written once here so every loss validates and reduces the same way. Nothing in this module is public API.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

# One device check for the whole package: a ValueError naming both devices, no data read.
from .._checks import check_device  # noqa: F401

# One reduction for the whole package (boxloss.losses): an empty "mean" is 0 * loss.sum(),
# never NaN, and avg_factor divides the sum (MMDetection semantics).
from ..losses import _check_reduction, _reduce  # noqa: F401


def _check_weight(weight: Tensor | None, n: int, name: str = "weight") -> None:
    if weight is None:
        return
    if not isinstance(weight, Tensor):
        raise TypeError(f"{name} must be a Tensor or None, got {type(weight).__name__}")
    if weight.shape != (n,):
        raise ValueError(f"{name} must have shape [{n}] (one weight per sample), got {tuple(weight.shape)}")


def _check_float_matrix(x: Tensor, name: str, dim: int | None = None) -> None:
    """``x`` must be a floating ``[N, D]`` tensor (with ``D == dim`` when ``dim`` is given)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be a 2-D [N, D] tensor, got shape {tuple(x.shape)}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name} must have {dim} features (shape [N, {dim}]), got shape {tuple(x.shape)}")


def _check_labels(labels: Tensor, n: int | None, name: str = "labels") -> None:
    """``labels`` must be an integer ``[n]`` tensor, any length if ``n`` is None (no device sync)."""
    if not isinstance(labels, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got dtype {labels.dtype}")
    if n is None:
        if labels.dim() != 1:
            raise ValueError(f"{name} must be a 1-D tensor, got shape {tuple(labels.shape)}")
    elif labels.dim() != 1 or labels.shape[0] != n:
        raise ValueError(f"{name} must have shape [{n}] (one label per embedding), got {tuple(labels.shape)}")


def _check_embeddings_labels(embeddings: Tensor, labels: Tensor, dim: int | None = None) -> None:
    _check_float_matrix(embeddings, "embeddings", dim)
    _check_labels(labels, embeddings.shape[0])
    check_device("labels", labels, "embeddings", embeddings)


def _check_label_range(labels: Tensor, num_classes: int, name: str = "labels") -> None:
    """Labels must lie in ``[0, num_classes)``.

    This reads two numbers back from the device in one transfer (one sync). It is done on purpose
    where labels index a class table: an out-of-range label otherwise becomes a CUDA device-side
    assert or a silent out-of-bounds gather, which is far harder to debug than this error.
    """
    if labels.numel() == 0:
        return
    # int(lo), int(hi) would be two transfers, each a sync; one [2] tensor is one.
    lo, hi = torch.stack(torch.aminmax(labels)).tolist()
    if lo < 0 or hi >= num_classes:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{name} must lie in [0, {num_classes - 1}] (num_classes={num_classes}), got {bad}")


def _check_nonnegative(value: float, name: str) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not value >= 0:  # also rejects NaN
        raise ValueError(f"{name} must be >= 0, got {value!r}")


def _check_positive(value: float, name: str) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not value > 0:  # also rejects NaN
        raise ValueError(f"{name} must be > 0, got {value!r}")


def _upcast(x: Tensor) -> Tensor:
    """float16/bfloat16 -> float32 (half inputs are computed and returned in float32, as the box losses do)."""
    if x.dtype in (torch.float16, torch.bfloat16):
        return x.float()
    return x


def _no_autocast(device: torch.device):
    """Autocast switched off on ``device``, so matmuls run in their inputs' dtype (float32) under AMP.

    The losses promise float32: a half-precision Gram matrix loses most of its digits to the
    cancellation in ‖x‖² + ‖y‖² − 2xᵀy (bfloat16 keeps 8 bits), and half-precision logits round
    the margins. Devices without autocast (meta) need no guard.
    """
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _pairwise_sq_distances(x: Tensor, y: Tensor | None = None) -> Tensor:
    """Squared Euclidean distances ``[N, M]`` through the Gram matrix, in the dtype of ``x`` (also under AMP).

    ``‖x‖² + ‖y‖² − 2·x·yᵀ`` needs ``O(N·M)`` memory instead of the ``O(N·M·D)`` of broadcast
    differences. Cancellation can make it slightly negative, hence the clamp; with ``y=None`` the
    diagonal is set to exactly 0.
    """
    same = y is None
    if same:
        y = x
    sq_x = x.pow(2).sum(1)
    sq_y = sq_x if same else y.pow(2).sum(1)
    with _no_autocast(x.device):
        gram = x @ y.t()  # [N, M]
    d2 = (sq_x[:, None] + sq_y[None, :] - 2.0 * gram).clamp(min=0)
    if same:
        eye = torch.eye(x.shape[0], dtype=torch.bool, device=x.device)
        d2 = d2.masked_fill(eye, 0.0)
    return d2


def _safe_sqrt(d2: Tensor) -> Tensor:
    """``sqrt`` whose value and gradient are 0 at 0 (``sqrt'(0)`` is inf and ``0·inf`` is NaN)."""
    zero = d2 <= 0
    return torch.sqrt(d2.masked_fill(zero, 1.0)).masked_fill(zero, 0.0)


def _pairwise_distances(x: Tensor, squared: bool) -> Tensor:
    d2 = _pairwise_sq_distances(x)
    return d2 if squared else _safe_sqrt(d2)


def _labels_preview(labels: Tensor, limit: int = 12) -> str:
    values = labels[:limit].tolist()
    more = ", ..." if labels.numel() > limit else ""
    return "[" + ", ".join(str(v) for v in values) + more + "]"
