"""Pair, triplet and tuplet losses on embeddings, with online miners and an offline selector.

All functions take embeddings ``[N, D]`` (any float dtype; float16/bfloat16 are computed in float32)
and integer labels ``[N]``, or explicit anchor/positive/negative tensors, and return a scalar under
``reduction="mean"`` (default) or ``"sum"``, or the per-element losses under ``"none"``.

Distances are Euclidean, computed through the Gram matrix (``‖x‖² + ‖y‖² − 2xᵀy``, clamped at 0)
so memory stays ``O(N²)``; the square root, where used, has value and gradient 0 at 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import (
    check_device,
    _check_embeddings_labels,
    _check_float_matrix,
    _check_labels,
    _check_nonnegative,
    _check_positive,
    _check_reduction,
    _labels_preview,
    _pairwise_distances,
    _no_autocast,
    _pairwise_sq_distances,
    _reduce,
    _safe_sqrt,
    _upcast,
)

_MININGS = ("batch_all", "batch_hard", "semi_hard")


def contrastive_loss(
    embeddings: Tensor,
    labels: Tensor,
    *,
    margin: float = 1.0,
    reduction: str = "mean",
) -> Tensor:
    """Contrastive loss over every pair ``i < j`` of a batch.

    With ``d = ‖x_i − x_j‖₂`` and ``y = 1`` when the labels match::

        L_ij = y · ½·d²  +  (1 − y) · ½·max(0, margin − d)²

    Similar pairs are pulled together; dissimilar pairs are pushed apart until they are
    ``margin`` away, after which they contribute nothing.

    Args:
        embeddings: ``[N, D]`` float tensor, ``N >= 2``.
        labels: ``[N]`` integer class labels.
        margin: distance beyond which dissimilar pairs cost nothing; ``> 0``.
        reduction: ``"mean"`` over the ``N(N−1)/2`` pairs, ``"sum"``, or ``"none"``.

    Returns:
        Scalar, or ``[N(N−1)/2]`` per-pair losses in ``torch.triu_indices(N, N, 1)`` order
        for ``reduction="none"``.

    Reference:
        Hadsell, Chopra, LeCun, "Dimensionality Reduction by Learning an Invariant Mapping",
        CVPR 2006 (no arXiv version), Eq. 4.
    """
    _check_embeddings_labels(embeddings, labels)
    _check_positive(margin, "margin")
    _check_reduction(reduction)
    n = embeddings.shape[0]
    if n < 2:
        raise ValueError(f"contrastive_loss needs at least 2 embeddings to form a pair, got {n}")
    x = _upcast(embeddings)
    d2 = _pairwise_sq_distances(x)
    i, j = torch.triu_indices(n, n, 1, device=x.device)
    d2 = d2[i, j]  # [P]
    same = labels[i] == labels[j]
    # The similar term uses d² directly (smooth); only the hinge needs d = sqrt(d²).
    loss = torch.where(same, 0.5 * d2, 0.5 * (margin - _safe_sqrt(d2)).clamp(min=0).pow(2))
    return _reduce(loss, None, reduction, None)


def _check_mining(mining: str) -> None:
    if mining not in _MININGS:
        raise ValueError(f"mining must be 'batch_all', 'batch_hard' or 'semi_hard', got {mining!r}")


def _masks(labels: Tensor) -> tuple[Tensor, Tensor]:
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(labels.shape[0], dtype=torch.bool, device=labels.device)
    return same & ~eye, ~same  # positive mask (a != p), negative mask


def _check_triplet_batch(pos_mask: Tensor, neg_mask: Tensor, labels: Tensor, fn: str) -> None:
    # One device sync, on purpose: a batch without any valid triplet is a sampling bug the
    # caller must hear about (a silent 0 loss trains nothing).
    if not bool((pos_mask.any(1) & neg_mask.any(1)).any()):
        raise ValueError(
            f"{fn} needs a batch with at least two distinct labels and one label that appears at "
            f"least twice (an anchor with a positive and a negative); got {labels.shape[0]} "
            f"embedding(s) with labels {_labels_preview(labels)}"
        )


def _mine(dist: Tensor, pos_mask: Tensor, neg_mask: Tensor, mining: str) -> tuple[Tensor, Tensor, Tensor]:
    """Indices ``(a, p, n)`` of the triplets a miner selects, from a detached distance matrix."""
    if mining == "batch_all":
        # (a, p, n) in lexicographic order, listed per positive pair: O(P·N), not O(N³), memory.
        a, p = pos_mask.nonzero(as_tuple=True)
        k, n = neg_mask[a].nonzero(as_tuple=True)
        return a[k], p[k], n
    if mining == "batch_hard":
        a = (pos_mask.any(1) & neg_mask.any(1)).nonzero(as_tuple=True)[0]
        d = dist[a]  # [A, N]
        p = d.masked_fill(~pos_mask[a], float("-inf")).argmax(1)  # hardest (farthest) positive
        n = d.masked_fill(~neg_mask[a], float("inf")).argmin(1)  # hardest (closest) negative
        return a, p, n
    # semi_hard: every positive pair (a, p) with the closest negative farther than p; if every
    # negative is closer than p, fall back to the farthest negative (FaceNet's rule as in
    # TensorFlow's triplet_semihard_loss).
    a, p = pos_mask.nonzero(as_tuple=True)
    keep = neg_mask[a].any(1)
    a, p = a[keep], p[keep]
    d_ap = dist[a, p]  # [P]
    d_an = dist[a]  # [P, N]
    negs = neg_mask[a]
    outside = negs & (d_an > d_ap[:, None])
    n_out = d_an.masked_fill(~outside, float("inf")).argmin(1)
    n_in = d_an.masked_fill(~negs, float("-inf")).argmax(1)
    n = torch.where(outside.any(1), n_out, n_in)
    return a, p, n


def triplet_loss(
    embeddings: Tensor,
    labels: Tensor,
    *,
    margin: float = 0.2,
    mining: str = "batch_all",
    squared: bool = True,
    reduction: str = "mean",
) -> Tensor:
    """Triplet loss with online mining inside the batch.

    For a triplet (anchor a, positive p of a's class, negative n of another class), with
    ``d = ‖·‖²`` when ``squared`` else ``‖·‖``::

        L(a, p, n) = max(0, d(a, p) − d(a, n) + margin)

    Miners (which triplets are averaged under ``reduction="mean"``):

    - ``"batch_all"``: every valid triplet ``(a, p ≠ a, n)`` of the batch, averaged over all of
      them, zero-loss triplets included (Hermans et al.'s "BA"). For their "BA≠0" variant, take
      ``reduction="none"`` and average the positive entries.
    - ``"batch_hard"``: per anchor, the farthest positive and the closest negative; averaged over
      the anchors that have both.
    - ``"semi_hard"``: per positive pair ``(a, p)``, the closest negative with
      ``d(a, n) > d(a, p)``; when there is none, the farthest negative (the fallback of FaceNet's
      TensorFlow implementation); averaged over the positive pairs.

    Mining is done on detached distances; the gradient flows through the selected distances.
    ``select_triplets`` returns the same triplets as indices.

    Args:
        embeddings: ``[N, D]`` float tensor.
        labels: ``[N]`` integer labels; the batch needs two distinct labels and one label that
            appears at least twice.
        margin: ``>= 0``.
        mining: ``"batch_all"``, ``"batch_hard"`` or ``"semi_hard"``.
        squared: squared Euclidean distance (FaceNet) if True, plain Euclidean (Hermans) if False.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
        Scalar, or ``[T]`` per-triplet losses for ``reduction="none"`` (order of
        ``select_triplets``). Memory is ``O(P·N)`` for ``"batch_all"`` and ``"semi_hard"``, with
        P the number of positive pairs in the batch.

    Reference:
        Schroff, Kalenichenko, Philbin, "FaceNet: A Unified Embedding for Face Recognition and
        Clustering", arXiv:1503.03832. Hermans, Beyer, Leibe, "In Defense of the Triplet Loss for
        Person Re-Identification", arXiv:1703.07737.
    """
    _check_embeddings_labels(embeddings, labels)
    _check_nonnegative(margin, "margin")
    _check_mining(mining)
    _check_reduction(reduction)
    x = _upcast(embeddings)
    dist = _pairwise_distances(x, squared)  # [N, N]
    pos_mask, neg_mask = _masks(labels)
    _check_triplet_batch(pos_mask, neg_mask, labels, "triplet_loss")
    if mining == "batch_all":
        # Same triplets, same order as _mine, without listing O(N³) index triples: one row of
        # negatives per positive pair, [P, N] instead of [N, N, N] (3-10x faster on CPU).
        a, p = pos_mask.nonzero(as_tuple=True)
        rows = (dist[a, p][:, None] - dist[a] + margin).clamp(min=0)  # [P, N]
        return _reduce(rows[neg_mask[a]], None, reduction, None)
    a, p, n = _mine(dist.detach(), pos_mask, neg_mask, mining)
    loss = (dist[a, p] - dist[a, n] + margin).clamp(min=0)
    return _reduce(loss, None, reduction, None)


@torch.no_grad()
def select_triplets(
    embeddings: Tensor,
    labels: Tensor,
    *,
    mining: str = "semi_hard",
    squared: bool = True,
) -> Tensor:
    """Offline triplet selection: indices of the triplets a miner picks from a set of embeddings.

    FaceNet's offline mode: every few steps, embed a larger subset of the data with the current
    network, select triplets here (no gradient), then train on ``triplet_margin_loss`` of those
    triplets. The miners are those of ``triplet_loss``; on the same embeddings
    ``triplet_loss(x, y, mining=m)`` equals ``triplet_margin_loss`` on ``select_triplets(x, y,
    mining=m)``.

    Args:
        embeddings: ``[N, D]`` float tensor (detached; no gradient is recorded).
        labels: ``[N]`` integer labels with two distinct labels and one repeated label.
        mining: ``"batch_all"``, ``"batch_hard"`` or ``"semi_hard"``.
        squared: distance used for the selection, as in ``triplet_loss``.

    Returns:
        ``[T, 3]`` int64 tensor of ``(anchor, positive, negative)`` row indices.

    Reference:
        Schroff et al., "FaceNet", arXiv:1503.03832, Sec. 3.2 (triplet selection).
    """
    _check_embeddings_labels(embeddings, labels)
    _check_mining(mining)
    x = _upcast(embeddings)
    dist = _pairwise_distances(x, squared)
    pos_mask, neg_mask = _masks(labels)
    _check_triplet_batch(pos_mask, neg_mask, labels, "select_triplets")
    return torch.stack(_mine(dist, pos_mask, neg_mask, mining), dim=1)


def triplet_margin_loss(
    anchors: Tensor,
    positives: Tensor,
    negatives: Tensor,
    *,
    margin: float = 0.2,
    squared: bool = True,
    reduction: str = "mean",
) -> Tensor:
    """Triplet loss on explicit triplets: ``max(0, d(a, p) − d(a, n) + margin)`` per row.

    ``d`` is the squared Euclidean distance if ``squared`` else the Euclidean distance (with
    value and gradient 0 at 0). With ``squared=False`` this is ``torch.nn.functional.
    triplet_margin_loss`` with ``eps=0``.

    Args:
        anchors, positives, negatives: ``[T, D]`` float tensors, row t forming triplet t.
        margin: ``>= 0``.
        squared: squared (FaceNet) or plain Euclidean distance.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
        Scalar, or ``[T]`` for ``reduction="none"``.

    Reference:
        Schroff et al., "FaceNet", arXiv:1503.03832, Eq. 1.
    """
    _check_float_matrix(anchors, "anchors")
    _check_float_matrix(positives, "positives")
    _check_float_matrix(negatives, "negatives")
    if positives.shape != anchors.shape or negatives.shape != anchors.shape:
        raise ValueError(
            "anchors, positives and negatives must have the same shape, got "
            f"{tuple(anchors.shape)}, {tuple(positives.shape)} and {tuple(negatives.shape)}"
        )
    check_device("positives", positives, "anchors", anchors)
    check_device("negatives", negatives, "anchors", anchors)
    _check_nonnegative(margin, "margin")
    _check_reduction(reduction)
    a, p, n = _upcast(anchors), _upcast(positives), _upcast(negatives)
    d_ap = (a - p).pow(2).sum(1)
    d_an = (a - n).pow(2).sum(1)
    if not squared:
        d_ap, d_an = _safe_sqrt(d_ap), _safe_sqrt(d_an)
    return _reduce((d_ap - d_an + margin).clamp(min=0), None, reduction, None)


def tuplet_loss(
    anchors: Tensor,
    positives: Tensor,
    negatives: Tensor,
    *,
    reduction: str = "mean",
) -> Tensor:
    """(N+1)-tuplet loss: one positive against N−1 negatives per anchor, on inner products.

    For anchor f, positive f⁺ and negatives f_1 … f_{N−1}::

        L = log(1 + Σ_k exp(fᵀf_k − fᵀf⁺))

    i.e. softmax cross-entropy over the logits ``[fᵀf⁺, fᵀf_1, …]`` with target 0. With one
    negative it is the soft-plus triplet loss on inner products.

    Args:
        anchors: ``[B, D]`` float tensor.
        positives: ``[B, D]``, row b the positive of anchor b.
        negatives: ``[B, K, D]``, the K = N−1 negatives of anchor b, ``K >= 1``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
        Scalar, or ``[B]`` for ``reduction="none"``.

    Reference:
        Sohn, "Improved Deep Metric Learning with Multi-class N-pair Loss Objective", NeurIPS 2016
        (no arXiv version), Eq. 4.
    """
    _check_float_matrix(anchors, "anchors")
    _check_float_matrix(positives, "positives")
    if positives.shape != anchors.shape:
        raise ValueError(
            f"positives must have the shape of anchors {tuple(anchors.shape)}, got {tuple(positives.shape)}"
        )
    if not isinstance(negatives, Tensor):
        raise TypeError(f"negatives must be a Tensor, got {type(negatives).__name__}")
    if (
        negatives.dim() != 3
        or negatives.shape[0] != anchors.shape[0]
        or negatives.shape[2] != anchors.shape[1]
        or negatives.shape[1] < 1
    ):
        b, d = anchors.shape
        raise ValueError(f"negatives must have shape [{b}, K, {d}] with K >= 1, got {tuple(negatives.shape)}")
    check_device("positives", positives, "anchors", anchors)
    check_device("negatives", negatives, "anchors", anchors)
    _check_reduction(reduction)
    f, fp, fn = _upcast(anchors), _upcast(positives), _upcast(negatives)
    with _no_autocast(f.device):  # float32 logits under AMP, as documented
        pos = (f * fp).sum(1, keepdim=True)  # [B, 1]
        neg = torch.einsum("bd,bkd->bk", f, fn)  # [B, K]
        logits = torch.cat([pos, neg], dim=1)
        target = torch.zeros(f.shape[0], dtype=torch.long, device=f.device)
        ce = F.cross_entropy(logits, target, reduction="none")
    return _reduce(ce, None, reduction, None)


def npair_loss(
    anchors: Tensor,
    positives: Tensor,
    *,
    l2_reg: float = 0.002,
    labels: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Multi-class N-pair loss (N-pair-mc) with the L2 penalty on unnormalised embeddings.

    Row i of ``positives`` is the positive of row i of ``anchors``; every row is a different
    class, so the positives of the other rows are the negatives of row i::

        L = mean_i log(1 + Σ_{j≠i} exp(f_iᵀf⁺_j − f_iᵀf⁺_i))          = CE(F·F⁺ᵀ, target i)
            + 0.25 · l2_reg · (mean_i ‖f_i‖² + mean_i ‖f⁺_i‖²)

    The penalty scaling is that of TensorFlow's reference ``npairs_loss``. The embeddings must
    not be L2-normalised (the paper's point: the penalty keeps their norm in check instead).

    Args:
        anchors: ``[N, D]`` float tensor, ``N >= 2``.
        positives: ``[N, D]`` float tensor.
        l2_reg: weight λ of the norm penalty, ``>= 0``.
        labels: optional ``[N]`` class labels of the pairs, checked to be all distinct
            (one device sync).
        reduction: ``"mean"``, ``"sum"`` or ``"none"``; ``"none"`` returns per-pair
            ``CE_i + 0.25·l2_reg·(‖f_i‖² + ‖f⁺_i‖²)``, whose mean is the ``"mean"`` value.

    Returns:
        Scalar, or ``[N]`` for ``reduction="none"``.

    Reference:
        Sohn, "Improved Deep Metric Learning with Multi-class N-pair Loss Objective", NeurIPS 2016
        (no arXiv version), Eq. 6 and Sec. 3.2.
    """
    _check_float_matrix(anchors, "anchors")
    _check_float_matrix(positives, "positives")
    if positives.shape != anchors.shape:
        raise ValueError(
            f"positives must have the shape of anchors {tuple(anchors.shape)}, got {tuple(positives.shape)}"
        )
    check_device("positives", positives, "anchors", anchors)
    _check_nonnegative(l2_reg, "l2_reg")
    _check_reduction(reduction)
    n = anchors.shape[0]
    if n < 2:
        raise ValueError(f"npair_loss needs at least 2 pairs (one per class), got {n}")
    if labels is not None:
        _check_labels(labels, n)
        check_device("labels", labels, "anchors", anchors)
        if torch.unique(labels).numel() != n:
            raise ValueError(
                f"npair_loss needs one pair per class (all labels distinct), got labels {_labels_preview(labels)}"
            )
    f, fp = _upcast(anchors), _upcast(positives)
    with _no_autocast(f.device):  # float32 logits under AMP, as documented
        logits = f @ fp.t()  # [N, N]; logits[i, j] = f_iᵀ f⁺_j
        target = torch.arange(n, device=f.device)
        ce = F.cross_entropy(logits, target, reduction="none")
    penalty = 0.25 * l2_reg * (f.pow(2).sum(1) + fp.pow(2).sum(1))
    return _reduce(ce + penalty, None, reduction, None)


@torch.no_grad()
def select_npair_classes(
    embeddings: Tensor,
    labels: Tensor,
    num_classes: int,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Hard negative class mining for N-pair batches (Sohn, Sec. 3.3).

    From embeddings of a few examples of many classes: start from one random class, then
    repeatedly add the class whose mean embedding has the largest inner product with the mean of
    any class already chosen (the class that violates the constraint the most), until
    ``num_classes`` are chosen. Ties go to the lowest label. Draw two examples of each returned
    class to build the N-pair batch.

    Args:
        embeddings: ``[M, D]`` float tensor (no gradient is recorded).
        labels: ``[M]`` integer labels.
        num_classes: how many classes to select, ``2 <= num_classes <= #distinct labels``.
        generator: optional ``torch.Generator`` (CPU or of any device) for the random first class;
            the draw is made on its device.

    Returns:
        ``[num_classes]`` tensor of the selected labels, in selection order.

    Reference:
        Sohn, "Improved Deep Metric Learning with Multi-class N-pair Loss Objective", NeurIPS 2016,
        Sec. 3.3 (hard negative class mining).
    """
    _check_embeddings_labels(embeddings, labels)
    if not isinstance(num_classes, int) or isinstance(num_classes, bool):
        raise TypeError(f"num_classes must be an int, got {type(num_classes).__name__}")
    classes, inv = torch.unique(labels, return_inverse=True)
    k = classes.numel()
    if num_classes < 2 or num_classes > k:
        raise ValueError(f"num_classes must be between 2 and the {k} distinct labels given, got {num_classes}")
    x = _upcast(embeddings)
    counts = torch.zeros(k, dtype=x.dtype, device=x.device).index_add_(0, inv, torch.ones_like(inv, dtype=x.dtype))
    means = torch.zeros(k, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, inv, x) / counts[:, None]
    with _no_autocast(x.device):
        sim = means @ means.t()  # [K, K]
    # randint draws on its generator's device: a CUDA generator with device="cpu" is an error
    draw_on = generator.device if generator is not None else "cpu"
    first = int(torch.randint(k, (1,), generator=generator, device=draw_on))
    chosen = [first]
    taken = torch.zeros(k, dtype=torch.bool, device=x.device)
    taken[first] = True
    closest = sim[first].clone()  # largest similarity of each class to the chosen set
    for _ in range(num_classes - 1):
        nxt = int(closest.masked_fill(taken, float("-inf")).argmax())
        chosen.append(nxt)
        taken[nxt] = True
        closest = torch.maximum(closest, sim[nxt])
    return classes[torch.tensor(chosen, device=classes.device)]
