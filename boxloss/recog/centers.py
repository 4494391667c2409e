"""Centre-based losses: center loss (paper update rule or learned centres), minimum-margin loss on
the centres, range loss and marginal loss.

Embeddings ``[N, D]`` (float16/bfloat16 computed in float32) and integer labels ``[N]`` in; a scalar
out under ``reduction="mean"``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._common import (
    check_device,
    _check_embeddings_labels,
    _check_float_matrix,
    _check_label_range,
    _check_labels,
    _check_nonnegative,
    _check_positive,
    _check_reduction,
    _check_weight,
    _labels_preview,
    _pairwise_sq_distances,
    _reduce,
    _safe_sqrt,
    _upcast,
)


def _check_centers(centers: Tensor, embeddings: Tensor) -> None:
    _check_float_matrix(centers, "centers")
    if centers.shape[1] != embeddings.shape[1]:
        raise ValueError(
            f"centers must have the embedding dimension {embeddings.shape[1]} (shape [C, "
            f"{embeddings.shape[1]}]), got shape {tuple(centers.shape)}"
        )
    check_device("centers", centers, "embeddings", embeddings)


def _class_counts(labels: Tensor, num_classes: int, dtype: torch.dtype) -> Tensor:
    """``[num_classes]`` number of samples of each class, computed on the device without a sync.

    ``torch.bincount`` would read ``labels.max()`` back to size its output (a sync on CUDA) even
    with ``minlength``; ``index_add_`` into a ``[num_classes]`` buffer does not.
    """
    ones = torch.ones(labels.shape, dtype=dtype, device=labels.device)
    return torch.zeros(num_classes, dtype=dtype, device=labels.device).index_add_(0, labels, ones)


def center_loss(
    embeddings: Tensor,
    labels: Tensor,
    centers: Tensor,
    *,
    weight: Tensor | None = None,
    reduction: str = "mean",
    avg_factor: float | None = None,
) -> Tensor:
    """Center loss ``½‖x_i − c_{y_i}‖²`` per sample.

    ``"mean"`` divides the batch sum by N, as the authors' Caffe layer does; multiply by the
    paper's λ outside. Whether the centres receive a gradient depends only on ``centers``: a
    buffer (paper update rule, see ``center_update``) gets none, a parameter is trained by the
    optimizer.

    Args:
        embeddings: ``[N, D]`` float tensor.
        labels: ``[N]`` integer labels in ``[0, C)`` (checked; one device sync).
        centers: ``[C, D]`` class centres.
        weight: optional ``[N]`` per-sample weights.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        avg_factor: divides the sum instead of N under ``"mean"``.

    Returns:
        Scalar, or ``[N]`` for ``reduction="none"``.

    Reference:
        Wen, Zhang, Li, Qiao, "A Discriminative Feature Learning Approach for Deep Face
        Recognition", ECCV 2016 (no arXiv version), Eq. 2.
    """
    _check_embeddings_labels(embeddings, labels)
    _check_centers(centers, embeddings)
    _check_weight(weight, embeddings.shape[0])
    check_device("weight", weight, "embeddings", embeddings)
    _check_reduction(reduction)
    _check_label_range(labels, centers.shape[0])
    x = _upcast(embeddings)
    c = centers.to(x.dtype)
    loss = 0.5 * (x - c[labels]).pow(2).sum(1)
    return _reduce(loss, weight, reduction, avg_factor)


@torch.no_grad()
def center_update(centers: Tensor, embeddings: Tensor, labels: Tensor, *, alpha: float = 0.5) -> Tensor:
    """The center-loss paper's centre update, returned as a new tensor::

        Δc_j = Σ_{i: y_i = j} (c_j − x_i) / (1 + n_j),      c_j ← c_j − α·Δc_j

    with ``n_j`` the number of samples of class j in the batch; classes absent from the batch do
    not move. The step does not depend on the loss weight λ (the paper decouples the two), and
    ``1 + n_j`` keeps a single sample from pulling its centre all the way.

    Args:
        centers: ``[C, D]`` current centres.
        embeddings: ``[N, D]`` batch embeddings (detached).
        labels: ``[N]`` integer labels in ``[0, C)``.
        alpha: centre learning rate α in ``[0, 1]``.

    Returns:
        ``[C, D]`` updated centres, in the dtype of ``centers``.

    Reference:
        Wen et al., "A Discriminative Feature Learning Approach for Deep Face Recognition",
        ECCV 2016, Eq. 4 and Algorithm 1.
    """
    _check_embeddings_labels(embeddings, labels)
    _check_centers(centers, embeddings)
    _check_nonnegative(alpha, "alpha")
    if alpha > 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    _check_label_range(labels, centers.shape[0])
    c = _upcast(centers)
    x = _upcast(embeddings).to(c.dtype)
    counts = _class_counts(labels, c.shape[0], c.dtype)  # n_j
    diff = torch.zeros_like(c).index_add_(0, labels, c[labels] - x)  # Σ_{i: y_i=j} (c_j − x_i)
    delta = diff / (1.0 + counts)[:, None]
    return (c - alpha * delta).to(centers.dtype)


class CenterLoss(nn.Module):
    """Center loss module that owns the class centres ``.centers`` ``[num_classes, dim]`` (float32).

    Two modes:

    - ``learn_centers=False`` (default, the paper): the centres are a buffer, the loss gives them
      no gradient, and ``update_centers(embeddings, labels)`` applies the paper's rule
      ``c_j ← c_j − α·Σ_{i: y_i=j}(c_j − x_i)/(1 + n_j)`` (see ``center_update``). Call it once per
      step, e.g. after ``optimizer.step()``. α is decoupled from the loss weight λ.
    - ``learn_centers=True``: the centres are an ``nn.Parameter`` trained by your optimizer through
      the gradient of ``½‖x − c‖²`` (and of ``minimum_margin_loss`` if you add it).

    ``forward(embeddings, labels)`` returns ``center_loss`` (mean of ``½‖x_i − c_{y_i}‖²``);
    the total objective is ``CE + λ·center``.

    Args:
        num_classes: number of classes C (>= 1).
        dim: embedding dimension D (>= 1).
        alpha: centre learning rate of the update rule, in ``[0, 1]``.
        learn_centers: train the centres by gradient instead of the update rule.

    Reference:
        Wen, Zhang, Li, Qiao, "A Discriminative Feature Learning Approach for Deep Face
        Recognition", ECCV 2016 (no arXiv version).
    """

    def __init__(self, num_classes: int, dim: int, *, alpha: float = 0.5, learn_centers: bool = False) -> None:
        super().__init__()
        for name, value in (("num_classes", num_classes), ("dim", dim)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        _check_nonnegative(alpha, "alpha")
        if alpha > 1:
            raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
        self.num_classes = num_classes
        self.dim = dim
        self.alpha = float(alpha)
        self.learn_centers = bool(learn_centers)
        centers = torch.empty(num_classes, dim)
        # Xavier-uniform, as the authors' Caffe prototxt fills the centres: distinct starting
        # centres also keep minimum_margin_loss away from its 0-distance kink.
        nn.init.xavier_uniform_(centers)
        if self.learn_centers:
            self.centers = nn.Parameter(centers)
        else:
            self.register_buffer("centers", centers)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return center_loss(embeddings, labels, self.centers)

    @torch.no_grad()
    def update_centers(self, embeddings: Tensor, labels: Tensor) -> None:
        """Apply the paper's centre update in place (``learn_centers=False`` only)."""
        if self.learn_centers:
            raise ValueError(
                "update_centers applies the paper's rule to buffer centres; this CenterLoss has "
                "learn_centers=True, so its centres are trained by the optimizer instead"
            )
        self.centers.copy_(center_update(self.centers, embeddings.detach(), labels, alpha=self.alpha))

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, dim={self.dim}, alpha={self.alpha}, "
            f"learn_centers={self.learn_centers}"
        )


def minimum_margin_loss(
    centers: Tensor,
    labels: Tensor | None = None,
    *,
    margin: float,
    squared: bool = True,
    reduction: str = "mean",
) -> Tensor:
    """Minimum-margin loss: a hinge on every pair of class centres closer than ``margin``::

        L = mean_{j < k} max(0, M − d(c_j, c_k)),     d = ‖c_j − c_k‖² (or ‖·‖ if not squared)

    Only over-close centre pairs contribute; their centres are pushed apart until they are ``M``
    apart. Meant for the center-loss centres (``CenterLoss(..., learn_centers=True).centers``:
    the gradient then trains them; paper-rule buffer centres receive no gradient). We average over
    pairs by default; ``reduction="sum"`` gives the plain sum.

    Args:
        centers: ``[C, D]`` class centres.
        labels: optional batch labels in ``[0, C)``; if given, only the centres of the classes
            present in the batch are used (one device sync), otherwise all C.
        margin: the minimum margin M, ``> 0``, in the units of ``d``.
        squared: hinge on the squared distance (default) or the plain distance.
        reduction: ``"mean"`` over pairs, ``"sum"``, or ``"none"``.

    Returns:
        Scalar, or ``[P]`` per-pair hinges (``triu_indices`` order of the used centres) for
        ``reduction="none"``.

    Reference:
        Wei, Wang, Scotney, Wan, "Minimum Margin Loss for Deep Face Recognition", arXiv:1805.06741.
    """
    _check_float_matrix(centers, "centers")
    _check_positive(margin, "margin")
    _check_reduction(reduction)
    c = _upcast(centers)
    if labels is not None:
        _check_labels(labels, None)
        check_device("labels", labels, "centers", centers)
        _check_label_range(labels, c.shape[0])
        c = c[torch.unique(labels)]
    k = c.shape[0]
    if k < 2:
        where = "classes in labels" if labels is not None else "centres"
        raise ValueError(f"minimum_margin_loss needs at least 2 {where} to form a pair, got {k}")
    d = _pairwise_sq_distances(c)
    if not squared:
        d = _safe_sqrt(d)
    j, l = torch.triu_indices(k, k, 1, device=c.device)
    return _reduce((margin - d[j, l]).clamp(min=0), None, reduction, None)


def range_loss(
    embeddings: Tensor,
    labels: Tensor,
    *,
    margin: float,
    k: int = 2,
    alpha: float = 1.0,
    beta: float = 1.0,
) -> Tensor:
    """Range loss: shrink each class's largest intra-class distances, separate the closest centres::

        L_intra = Σ_{classes i} k / Σ_{j=1..k} 1/D_{i,j}        (harmonic mean of the k largest
                                                                  distances D_{i,j} within class i)
        L_inter = max(0, M − min_{Q≠R} ‖x̄_Q − x̄_R‖²)           (x̄ = batch mean of a class)
        L = α·L_intra + β·L_inter

    ``D`` are Euclidean distances between samples of one class; a class with fewer than k pairs
    uses the pairs it has, and a class with a single sample has no intra term. The inter term uses
    the squared distance between batch centres, as the paper writes it.

    Args:
        embeddings: ``[N, D]`` float tensor.
        labels: ``[N]`` integer labels; at least 2 classes and one class with 2 samples
            (checked; one device sync).
        margin: the inter-class margin M on squared centre distances, ``> 0``.
        k: how many of the largest intra-class distances enter the harmonic mean, ``>= 1``.
        alpha: weight of the intra-class term, ``>= 0``.
        beta: weight of the inter-class term, ``>= 0``.

    Returns:
        Scalar.

    Reference:
        Zhang, Fang, Wen, Li, Qiao, "Range Loss for Deep Face Recognition with Long-tail",
        arXiv:1611.08976, Eq. 2-4.
    """
    _check_embeddings_labels(embeddings, labels)
    _check_positive(margin, "margin")
    if not isinstance(k, int) or isinstance(k, bool):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    _check_nonnegative(alpha, "alpha")
    _check_nonnegative(beta, "beta")
    x = _upcast(embeddings)
    n = x.shape[0]
    classes, inv = torch.unique(labels, return_inverse=True)
    num = classes.numel()
    counts = _class_counts(inv, num, x.dtype)
    if num < 2 or int(counts.max()) < 2:
        raise ValueError(
            "range_loss needs at least 2 classes and one class with 2 samples in the batch; got "
            f"{n} embedding(s) with labels {_labels_preview(labels)}"
        )

    # Intra: distances of same-class pairs, the k largest per class.
    d = _safe_sqrt(_pairwise_sq_distances(x))
    i, j = torch.triu_indices(n, n, 1, device=x.device)
    same = inv[i] == inv[j]
    i, j = i[same], j[same]
    dij = d[i, j]  # [P]
    member = inv[i][None, :] == torch.arange(num, device=x.device)[:, None]  # [K, P]
    k_eff = min(k, dij.numel())
    _, idx = dij.detach().masked_fill(~member, -1.0).topk(k_eff, dim=1)  # [K, k_eff]
    valid = member.gather(1, idx)
    # 1/D with D clamped: two identical samples would give 1/0 (value 0 in the limit, NaN in
    # autograd); the clamp keeps the term finite and its gradient zero there.
    inv_d = torch.where(valid, 1.0 / dij[idx].clamp(min=1e-12), torch.zeros_like(dij[idx]))
    n_valid = valid.sum(1)
    has = n_valid > 0
    intra = (n_valid[has].to(x.dtype) / inv_d[has].sum(1)).sum()

    # Inter: the closest pair of batch centres.
    centres = torch.zeros(num, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, inv, x)
    centres = centres / counts[:, None]
    dc = _pairwise_sq_distances(centres)
    q, r = torch.triu_indices(num, num, 1, device=x.device)
    inter = (margin - dc[q, r].min()).clamp(min=0)
    return alpha * intra + beta * inter


def marginal_loss(
    embeddings: Tensor,
    labels: Tensor,
    *,
    threshold: float = 1.2,
    margin: float = 0.3,
    reduction: str = "mean",
) -> Tensor:
    """Marginal loss on L2-normalised embeddings, over all pairs::

        L = 1/(N² − N) Σ_{i≠j} max(0, ξ − y_ij·(θ − ‖x̂_i − x̂_j‖²)),   y_ij = +1 same class, −1 else

    Same-class pairs are pulled below ``θ − ξ`` and different-class pairs pushed above ``θ + ξ``
    (squared distances between unit vectors lie in [0, 4]).

    Args:
        embeddings: ``[N, D]`` float tensor, ``N >= 2`` (normalised inside).
        labels: ``[N]`` integer labels.
        threshold: θ, the squared-distance threshold between same and different (paper: 1.2).
        margin: ξ, the error margin around θ (paper: 0.3), ``>= 0``.
        reduction: ``"mean"`` (equals the paper's ``1/(N²−N)`` average), ``"sum"`` over the
            unordered pairs (half the paper's double sum), or ``"none"``.

    Returns:
        Scalar, or ``[N(N−1)/2]`` per-pair losses (``triu_indices`` order) for ``"none"``.

    Reference:
        Deng, Zhou, Zafeiriou, "Marginal Loss for Deep Face Recognition", CVPR Workshops 2017
        (no arXiv version), Eq. 1.
    """
    _check_embeddings_labels(embeddings, labels)
    _check_nonnegative(threshold, "threshold")
    _check_nonnegative(margin, "margin")
    _check_reduction(reduction)
    n = embeddings.shape[0]
    if n < 2:
        raise ValueError(f"marginal_loss needs at least 2 embeddings to form a pair, got {n}")
    x = F.normalize(_upcast(embeddings), dim=1)
    d2 = _pairwise_sq_distances(x)
    i, j = torch.triu_indices(n, n, 1, device=x.device)
    y = (labels[i] == labels[j]).to(x.dtype) * 2 - 1
    loss = (margin - y * (threshold - d2[i, j])).clamp(min=0)
    return _reduce(loss, None, reduction, None)
