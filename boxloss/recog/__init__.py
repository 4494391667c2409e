"""boxloss.recog: embedding and face-recognition losses, miners and margin heads.

Embeddings ``[N, D]`` and integer labels ``[N]`` in, a scalar out; margin heads own their class
weights and return margin-adjusted logits (``.logits``) or the cross-entropy (``forward``).
Importing this package needs torch only.
"""

from ..focal import cross_entropy
from .centers import CenterLoss, center_loss, center_update, marginal_loss, minimum_margin_loss, range_loss
from .heads import (
    ArcFace,
    CombinedMargin,
    CosFace,
    LargeMarginSoftmax,
    SphereFace,
    angular_margin_psi,
    arcface_logits,
    combined_margin_logits,
    cosface_logits,
)
from .pairs import (
    contrastive_loss,
    npair_loss,
    select_npair_classes,
    select_triplets,
    triplet_loss,
    triplet_margin_loss,
    tuplet_loss,
)

__all__ = [
    # pairs, triplets, tuplets
    "contrastive_loss",
    "triplet_loss",
    "select_triplets",
    "triplet_margin_loss",
    "tuplet_loss",
    "npair_loss",
    "select_npair_classes",
    # centres
    "CenterLoss",
    "center_loss",
    "center_update",
    "minimum_margin_loss",
    "range_loss",
    "marginal_loss",
    # margin heads
    "LargeMarginSoftmax",
    "SphereFace",
    "CosFace",
    "ArcFace",
    "CombinedMargin",
    "angular_margin_psi",
    "cosface_logits",
    "arcface_logits",
    "combined_margin_logits",
    # softmax cross-entropy with label smoothing (the package's single implementation)
    "cross_entropy",
]
