"""Margin heads for face recognition: L-Softmax, SphereFace, CosFace, ArcFace, combined margin.

Each head owns the class weights ``.weight`` ``[num_classes, in_features]`` (float32), and has

- ``logits(embeddings, labels)``: the margin-adjusted logits ``[N, num_classes]`` (margin on the
  target column only);
- ``forward(embeddings, labels)``: the scalar softmax cross-entropy of those logits;
- ``cosine(embeddings)``: the plain ``cos θ`` ``[N, num_classes]``, for inference.

The margins are also plain functions of a cosine matrix (``arcface_logits``, ``cosface_logits``,
``combined_margin_logits``, ``angular_margin_psi``) for callers with their own classifier.

Numerics: every head computes in float32 (float64 if its weights or the embeddings are float64)
with autocast switched off, so the class weights stay float32 under AMP and ``acos``/``sqrt`` of a
cosine rounded in half precision never happen. ``cos θ`` is clamped to [−1, 1]; ``sin θ`` is
``sqrt(max(1 − cos², 1e-12))`` and ``acos`` sees ``cos`` clamped to [−1 + 1e-7, 1 − 1e-7], so
values and gradients stay finite at ``|cos θ| = 1`` (the derivatives of ``sqrt`` at 0 and of
``acos`` at ±1 are infinite).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._common import (
    check_device,
    _check_embeddings_labels,
    _check_float_matrix,
    _check_label_range,
    _check_labels,
    _no_autocast,
    _upcast,
)

# sin θ = sqrt(1 − cos²θ) has an infinite derivative at cos = ±1; clamping the radicand keeps
# the value (off by at most 1e-6) and makes the gradient 0 there instead of inf (or NaN = 0·inf).
_SIN_EPS = 1e-12
# acos'(c) = −1/sqrt(1 − c²) is infinite at ±1: clamp to 1e-7 inside (|acos'| <= ~2.3e3).
_ACOS_EPS = 1e-7


# --------------------------------------------------------------------------- functional margins


def _check_cosine_labels(cosine: Tensor, labels: Tensor) -> None:
    _check_float_matrix(cosine, "cosine")
    _check_labels(labels, cosine.shape[0])
    check_device("labels", labels, "cosine", cosine)


def _replace_target(cosine: Tensor, labels: Tensor, target: Tensor) -> Tensor:
    """``cosine`` with column ``labels[i]`` of row i replaced by ``target[i]`` (out of place)."""
    return cosine.scatter(1, labels[:, None], target[:, None])


def _target(cosine: Tensor, labels: Tensor) -> Tensor:
    return cosine.gather(1, labels[:, None])[:, 0]  # [N]


def _cos_plus(cos_t: Tensor, m: float) -> Tensor:
    """``cos(θ + m)`` from ``cos θ`` as ``cos θ·cos m − sin θ·sin m``, with a guarded ``sin θ``.

    Exact for θ in [0, π] (there sin θ >= 0), and ``m = 0`` returns ``cos θ`` bit for bit.
    """
    sin_t = torch.sqrt((1.0 - cos_t * cos_t).clamp(min=_SIN_EPS))
    return cos_t * math.cos(m) - sin_t * math.sin(m)


def cosface_logits(cosine: Tensor, labels: Tensor, *, s: float = 64.0, m: float = 0.35) -> Tensor:
    """CosFace (large margin cosine) logits: ``s·(cos θ_y − m)`` for the target, ``s·cos θ_j`` else.

    Args:
        cosine: ``[N, C]`` cosines between normalised embeddings and class weights.
        labels: ``[N]`` target classes.
        s: scale, ``> 0``.
        m: additive cosine margin, ``>= 0``.

    Returns:
        ``[N, C]`` logits.

    Reference:
        Wang et al., "CosFace: Large Margin Cosine Loss for Deep Face Recognition",
        arXiv:1801.09414, Eq. 4.
    """
    _check_cosine_labels(cosine, labels)
    cosine = _upcast(cosine).clamp(-1.0, 1.0)  # half precision computed in float32
    return s * _replace_target(cosine, labels, _target(cosine, labels) - m)


def arcface_logits(
    cosine: Tensor, labels: Tensor, *, s: float = 64.0, m: float = 0.5, easy_margin: bool = False
) -> Tensor:
    """ArcFace (additive angular margin) logits: ``s·cos(θ_y + m)`` for the target, ``s·cos θ_j`` else.

    ``cos(θ + m)`` is not monotonic past θ = π − m, so, as insightface does:

    - ``easy_margin=False``: where ``θ_y + m > π`` (``cos θ_y <= cos(π − m)``) the target falls
      back to ``cos θ_y − m·sin m``;
    - ``easy_margin=True``: the margin applies only where ``cos θ_y > 0``, else ``cos θ_y``.

    Args:
        cosine: ``[N, C]`` cosines.
        labels: ``[N]`` target classes.
        s: scale, ``> 0``.
        m: additive angular margin in radians, in ``[0, π)``.
        easy_margin: the ``cos θ > 0`` rule instead of the fallback.

    Returns:
        ``[N, C]`` logits.

    Reference:
        Deng, Guo, Xue, Zafeiriou, "ArcFace: Additive Angular Margin Loss for Deep Face
        Recognition", arXiv:1801.07698, Eq. 3.
    """
    _check_cosine_labels(cosine, labels)
    cosine = _upcast(cosine).clamp(-1.0, 1.0)  # half precision computed in float32
    cos_t = _target(cosine, labels)
    phi = _cos_plus(cos_t, m)
    if easy_margin:
        phi = torch.where(cos_t > 0, phi, cos_t)
    else:
        phi = torch.where(cos_t > math.cos(math.pi - m), phi, cos_t - m * math.sin(m))
    return s * _replace_target(cosine, labels, phi)


def combined_margin_logits(
    cosine: Tensor, labels: Tensor, *, s: float = 64.0, m1: float = 1.0, m2: float = 0.0, m3: float = 0.0
) -> Tensor:
    """Combined margin logits: ``s·(cos(m1·θ_y + m2) − m3)`` for the target, ``s·cos θ_j`` else.

    ``(1, m, 0)`` is ArcFace without its fallback, ``(1, 0, m)`` CosFace, ``(m, 0, 0)``
    SphereFace's ``cos(mθ)`` without ψ's monotonic extension. No fallback is applied: the target
    is exactly ``cos(m1·θ + m2) − m3`` for every θ in [0, π].

    Args:
        cosine: ``[N, C]`` cosines.
        labels: ``[N]`` target classes.
        s: scale, ``> 0``.
        m1: multiplicative angular margin, ``> 0``.
        m2: additive angular margin (radians).
        m3: additive cosine margin.

    Returns:
        ``[N, C]`` logits.

    Reference:
        Deng et al., "ArcFace", arXiv:1801.07698, Eq. 4 (combined margin).
    """
    _check_cosine_labels(cosine, labels)
    cosine = _upcast(cosine).clamp(-1.0, 1.0)  # half precision computed in float32
    cos_t = _target(cosine, labels)
    if m1 == 1.0:
        # Same closed form as ArcFace: no acos, and (1, 0, m3) is exactly cos θ − m3.
        phi = _cos_plus(cos_t, m2)
    else:
        theta = torch.acos(cos_t.clamp(-1.0 + _ACOS_EPS, 1.0 - _ACOS_EPS))
        phi = torch.cos(m1 * theta + m2)
    return s * _replace_target(cosine, labels, phi - m3)


def _chebyshev(c: Tensor, m: int) -> Tensor:
    """``T_m(c) = cos(m·acos c)`` by the recurrence ``T_{n+1} = 2c·T_n − T_{n−1}``: a polynomial,
    so its gradient is finite at ``c = ±1`` where ``acos`` is not differentiable."""
    t_prev, t = torch.ones_like(c), c
    if m == 0:
        return t_prev
    for _ in range(m - 1):
        t_prev, t = t, 2 * c * t - t_prev
    return t


def angular_margin_psi(cosine: Tensor, m: int) -> Tensor:
    """L-Softmax/SphereFace target function ψ(θ) of ``cos θ`` (elementwise)::

        ψ(θ) = (−1)^k · cos(mθ) − 2k,   θ ∈ [kπ/m, (k+1)π/m],  k ∈ {0, …, m−1}

    ψ is continuous and decreasing on [0, π] and equals ``cos(mθ)`` on [0, π/m]; ``m = 1`` gives
    ``cos θ``. ``cos(mθ)`` is the Chebyshev polynomial ``T_m(cos θ)`` and k is picked without
    gradient, so the gradient is finite everywhere, ``|cos θ| = 1`` included.

    Args:
        cosine: tensor of cosines (clamped to [−1, 1]).
        m: integer angular margin, ``>= 1``.

    Returns:
        ψ, same shape as ``cosine``.

    Reference:
        Liu, Wen, Yu, Yang, "Large-Margin Softmax Loss for Convolutional Neural Networks",
        arXiv:1612.02295, Eq. 6; Liu et al., "SphereFace", arXiv:1704.08063, Eq. 7.
    """
    _check_int_margin(m)
    c = _upcast(cosine).clamp(-1.0, 1.0)
    with torch.no_grad():
        k = torch.floor(m * torch.acos(c) / math.pi).clamp(0, m - 1)
    sign = 1.0 - 2.0 * torch.remainder(k, 2)  # (−1)^k
    return sign * _chebyshev(c, m) - 2.0 * k


def _check_int_margin(m: int) -> None:
    if not isinstance(m, int) or isinstance(m, bool):
        raise TypeError(f"m must be an int (the multiplicative angular margin), got {type(m).__name__} {m!r}")
    if m < 1:
        raise ValueError(f"m must be >= 1, got {m}")


# --------------------------------------------------------------------------- heads


def _check_number(value: float, name: str, *, low: float | None = None, strict: bool = False) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if low is not None and (value <= low if strict else value < low):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {low}, got {value!r}")


class _MarginHead(nn.Module):
    """Class weights ``[num_classes, in_features]`` plus input checks and the CE; subclasses
    define ``logits``."""

    def __init__(self, in_features: int, num_classes: int, label_smoothing: float) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("num_classes", num_classes)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if in_features < 1:
            raise ValueError(f"in_features must be >= 1, got {in_features}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (a softmax over one class is constant), got {num_classes}")
        _check_number(label_smoothing, "label_smoothing", low=0.0)
        if label_smoothing > 1:
            raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing!r}")
        self.in_features = in_features
        self.num_classes = num_classes
        self.label_smoothing = float(label_smoothing)
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))  # float32
        nn.init.xavier_uniform_(self.weight)

    def _inputs(self, embeddings: Tensor, labels: Tensor | None) -> tuple[Tensor, Tensor]:
        """Checked embeddings and weights in the compute dtype (float32, or float64)."""
        check_device("embeddings", embeddings, f"{type(self).__name__}.weight", self.weight)
        if labels is None:
            _check_float_matrix(embeddings, "embeddings", self.in_features)
        else:
            _check_embeddings_labels(embeddings, labels, self.in_features)
            _check_label_range(labels, self.num_classes)
        dtype = torch.promote_types(torch.promote_types(self.weight.dtype, torch.float32), _upcast(embeddings).dtype)
        return embeddings.to(dtype), self.weight.to(dtype)

    def _cosine(self, x: Tensor, w: Tensor) -> Tensor:
        return (F.normalize(x, dim=1) @ F.normalize(w, dim=1).t()).clamp(-1.0, 1.0)

    def cosine(self, embeddings: Tensor) -> Tensor:
        """``cos θ`` between each embedding and each class weight, ``[N, num_classes]``."""
        with _no_autocast(embeddings.device):
            x, w = self._inputs(embeddings, None)
            return self._cosine(x, w)

    def logits(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """Margin-adjusted logits ``[N, num_classes]`` (float32; float64 for float64 inputs)."""
        with _no_autocast(embeddings.device):
            x, w = self._inputs(embeddings, labels)
            return self._logits(x, w, labels)

    def _logits(self, x: Tensor, w: Tensor, labels: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """Mean softmax cross-entropy of ``logits(embeddings, labels)`` (0 for an empty batch)."""
        logits = self.logits(embeddings, labels)
        if logits.shape[0] == 0:
            return 0 * logits.sum()
        # Same definition as boxloss.cross_entropy (target (1 − ε)·onehot + ε/C), without the
        # [N, C] one-hot, which matters for face-recognition class counts.
        return F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, num_classes={self.num_classes}, {self._margin_repr()}"

    def _margin_repr(self) -> str:
        return ""


class CosFace(_MarginHead):
    """CosFace / AM-Softmax head: normalised weights and embeddings, target logit ``s·(cos θ_y − m)``.

    Args:
        in_features: embedding dimension.
        num_classes: number of classes (>= 2).
        s: scale, ``> 0``.
        m: additive cosine margin, ``>= 0``.
        label_smoothing: ε of the cross-entropy in ``forward``.

    Reference:
        Wang et al., "CosFace: Large Margin Cosine Loss for Deep Face Recognition",
        arXiv:1801.09414.
    """

    def __init__(
        self, in_features: int, num_classes: int, *, s: float = 64.0, m: float = 0.35, label_smoothing: float = 0.0
    ) -> None:
        super().__init__(in_features, num_classes, label_smoothing)
        _check_number(s, "s", low=0.0, strict=True)
        _check_number(m, "m", low=0.0)
        self.s, self.m = float(s), float(m)

    def _logits(self, x: Tensor, w: Tensor, labels: Tensor) -> Tensor:
        return cosface_logits(self._cosine(x, w), labels, s=self.s, m=self.m)

    def _margin_repr(self) -> str:
        return f"s={self.s}, m={self.m}"


class ArcFace(_MarginHead):
    """ArcFace head: normalised weights and embeddings, target logit ``s·cos(θ_y + m)``.

    Past ``θ_y + m > π`` the target falls back to ``cos θ_y − m·sin m`` (insightface), or with
    ``easy_margin`` the margin applies only where ``cos θ_y > 0``; see ``arcface_logits``.

    Args:
        in_features: embedding dimension.
        num_classes: number of classes (>= 2).
        s: scale, ``> 0``.
        m: additive angular margin in radians, in ``[0, π)``.
        easy_margin: use the ``cos θ > 0`` rule instead of the fallback.
        label_smoothing: ε of the cross-entropy in ``forward``.

    Reference:
        Deng, Guo, Xue, Zafeiriou, "ArcFace: Additive Angular Margin Loss for Deep Face
        Recognition", arXiv:1801.07698.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        s: float = 64.0,
        m: float = 0.5,
        easy_margin: bool = False,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(in_features, num_classes, label_smoothing)
        _check_number(s, "s", low=0.0, strict=True)
        _check_number(m, "m", low=0.0)
        if m >= math.pi:
            raise ValueError(f"m must be in [0, pi) radians, got {m!r}")
        self.s, self.m, self.easy_margin = float(s), float(m), bool(easy_margin)

    def _logits(self, x: Tensor, w: Tensor, labels: Tensor) -> Tensor:
        return arcface_logits(self._cosine(x, w), labels, s=self.s, m=self.m, easy_margin=self.easy_margin)

    def _margin_repr(self) -> str:
        return f"s={self.s}, m={self.m}, easy_margin={self.easy_margin}"


class CombinedMargin(_MarginHead):
    """Combined-margin head: target logit ``s·(cos(m1·θ_y + m2) − m3)``, no fallback.

    ``CombinedMargin(m1=1, m2=m)`` equals ``ArcFace(m=m)`` wherever ``θ_y + m <= π``;
    ``CombinedMargin(m3=m)`` equals ``CosFace(m=m)``.

    Args:
        in_features: embedding dimension.
        num_classes: number of classes (>= 2).
        s: scale, ``> 0``.
        m1: multiplicative angular margin, ``> 0``.
        m2: additive angular margin (radians), ``>= 0``.
        m3: additive cosine margin, ``>= 0``.
        label_smoothing: ε of the cross-entropy in ``forward``.

    Reference:
        Deng et al., "ArcFace", arXiv:1801.07698, Eq. 4.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        s: float = 64.0,
        m1: float = 1.0,
        m2: float = 0.0,
        m3: float = 0.0,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(in_features, num_classes, label_smoothing)
        _check_number(s, "s", low=0.0, strict=True)
        _check_number(m1, "m1", low=0.0, strict=True)
        _check_number(m2, "m2", low=0.0)
        _check_number(m3, "m3", low=0.0)
        self.s, self.m1, self.m2, self.m3 = float(s), float(m1), float(m2), float(m3)

    def _logits(self, x: Tensor, w: Tensor, labels: Tensor) -> Tensor:
        return combined_margin_logits(self._cosine(x, w), labels, s=self.s, m1=self.m1, m2=self.m2, m3=self.m3)

    def _margin_repr(self) -> str:
        return f"s={self.s}, m1={self.m1}, m2={self.m2}, m3={self.m3}"


class _AnnealedAngularHead(_MarginHead):
    """ψ(θ) target with the λ annealing of the authors' Caffe layers::

        f_y = ‖x‖·‖W_y‖·(λ·cos θ_y + ψ(θ_y)) / (1 + λ),   λ = max(λ_min, base·(1 + γ·iter)^(−power))

    ``iteration`` is a buffer (saved in the state dict, so a resumed run continues the schedule)
    that ``forward`` increments in training mode before computing λ, as the Caffe layers do; it is
    schedule state like a learning-rate scheduler's step, not per-batch data.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        m: int,
        base: float,
        gamma: float,
        power: float,
        lambda_min: float,
        label_smoothing: float,
    ) -> None:
        super().__init__(in_features, num_classes, label_smoothing)
        _check_int_margin(m)
        for name, value in (("base", base), ("gamma", gamma), ("power", power), ("lambda_min", lambda_min)):
            _check_number(value, name, low=0.0)
        self.m = m
        self.base, self.gamma, self.power, self.lambda_min = float(base), float(gamma), float(power), float(lambda_min)
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long))

    def _lambda(self, dtype: torch.dtype) -> Tensor:
        # Tensor arithmetic on the buffer: no .item(), so no device sync per step.
        it = self.iteration.to(dtype)
        return (self.base * (1.0 + self.gamma * it).pow(-self.power)).clamp(min=self.lambda_min)

    @property
    def lambda_(self) -> float:
        """The current annealing weight λ (reads the device; for logging)."""
        return float(self._lambda(torch.float64))

    def _margin_target(self, cos_t: Tensor) -> Tensor:
        """``(λ·cos θ_y + ψ(θ_y)) / (1 + λ)`` from the target cosines ``[N]``."""
        lam = self._lambda(cos_t.dtype)
        return (lam * cos_t + angular_margin_psi(cos_t, self.m)) / (1.0 + lam)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        if self.training:
            self.iteration += 1
        return super().forward(embeddings, labels)

    def _margin_repr(self) -> str:
        return (
            f"m={self.m}, base={self.base}, gamma={self.gamma}, power={self.power}, "
            f"lambda_min={self.lambda_min}"
        )


class LargeMarginSoftmax(_AnnealedAngularHead):
    """L-Softmax head: unnormalised weights and embeddings, target ``‖W_y‖‖x‖·ψ(θ_y)``.

    Logits are ``W_j·x`` for the other classes and, for the target (λ annealing as in
    ``_AnnealedAngularHead``), ``‖W_y‖‖x‖·(λ·cos θ_y + ψ(θ_y))/(1 + λ)`` with
    ``ψ(θ) = (−1)^k cos(mθ) − 2k``. No bias. ``m = 1`` is plain softmax cross-entropy on
    ``x·Wᵀ``. Defaults are the authors' published MNIST/CIFAR settings (m = 4, base = 1000,
    γ = 2.5e-5, power = 35, λ_min = 0); ``base = 0`` removes the annealing.

    Args:
        in_features: embedding dimension.
        num_classes: number of classes (>= 2).
        m: integer margin, ``>= 1``.
        base, gamma, power, lambda_min: λ schedule ``max(λ_min, base·(1 + γ·iter)^(−power))``.
        label_smoothing: ε of the cross-entropy in ``forward``.

    Reference:
        Liu, Wen, Yu, Yang, "Large-Margin Softmax Loss for Convolutional Neural Networks",
        arXiv:1612.02295.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        m: int = 4,
        base: float = 1000.0,
        gamma: float = 2.5e-5,
        power: float = 35.0,
        lambda_min: float = 0.0,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(in_features, num_classes, m, base, gamma, power, lambda_min, label_smoothing)

    def _logits(self, x: Tensor, w: Tensor, labels: Tensor) -> Tensor:
        wx = x @ w.t()  # [N, C] plain logits ‖W_j‖‖x‖cos θ_j
        w_y = w[labels]  # [N, D]
        cos_t = (F.normalize(x, dim=1) * F.normalize(w_y, dim=1)).sum(1).clamp(-1.0, 1.0)
        target = x.norm(dim=1) * w_y.norm(dim=1) * self._margin_target(cos_t)  # ‖x‖‖W_y‖·(...)
        return _replace_target(wx, labels, target)


class SphereFace(_AnnealedAngularHead):
    """SphereFace (A-Softmax) head: normalised weights, target ``‖x‖·ψ(θ_y)``.

    Logits are ``‖x‖·cos θ_j`` for the other classes and ``‖x‖·(λ·cos θ_y + ψ(θ_y))/(1 + λ)`` for
    the target, ``ψ(θ) = (−1)^k cos(mθ) − 2k``. Defaults are the authors' Caffe training
    settings (m = 4, base = 1000, γ = 0.12, power = 1, λ_min = 5).

    Args:
        in_features: embedding dimension.
        num_classes: number of classes (>= 2).
        m: integer margin, ``>= 1``.
        base, gamma, power, lambda_min: λ schedule ``max(λ_min, base·(1 + γ·iter)^(−power))``.
        label_smoothing: ε of the cross-entropy in ``forward``.

    Reference:
        Liu, Wen, Yu, Li, Raj, Song, "SphereFace: Deep Hypersphere Embedding for Face
        Recognition", arXiv:1704.08063.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        m: int = 4,
        base: float = 1000.0,
        gamma: float = 0.12,
        power: float = 1.0,
        lambda_min: float = 5.0,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(in_features, num_classes, m, base, gamma, power, lambda_min, label_smoothing)

    def _logits(self, x: Tensor, w: Tensor, labels: Tensor) -> Tensor:
        cosine = self._cosine(x, w)
        x_norm = x.norm(dim=1)  # [N]
        target = x_norm * self._margin_target(_target(cosine, labels))
        return _replace_target(x_norm[:, None] * cosine, labels, target)
