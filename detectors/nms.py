"""The detectors' NMS, chosen by name: one call for the three places a detector runs NMS
(RetinaNet's detections, the RPN's proposals, the RoI head's detections).

=============  ==========================================================================
``"iou"``      ``torchvision.ops.batched_nms`` (torchvision's own post-processing)
``"diou"``     :func:`boxloss.batched_diou_nms`: suppress when IoU - (rho^2/c^2)^beta > t
``"soft"``     :func:`boxloss.batched_soft_nms`, gaussian, IoU overlap: scores decay
``"soft-diou"`` the same with the DIoU overlap max(IoU - (rho^2/c^2)^beta, 0)
``"weighted"`` :func:`boxloss.batched_weighted_nms`, IoU: kept boxes become the score-weighted
               mean of the boxes they suppress
=============  ==========================================================================

Soft-NMS keeps a box until its decayed score falls below ``SOFT_SCORE_THRESHOLD`` (0.001, the
paper's); its gaussian width is ``soft_nms_sigma`` (0.5, the paper's), and the detector's NMS
threshold is not used (the gaussian method has none).
"""

from __future__ import annotations

import math

from torch import Tensor
from torchvision.ops import boxes as box_ops

import boxloss

from .errors import OptionError

__all__ = ["NMS_NAMES", "SOFT_SCORE_THRESHOLD", "check_nms_options", "select"]

NMS_NAMES = ("iou", "diou", "soft", "soft-diou", "weighted")
SOFT_SCORE_THRESHOLD = 0.001


def check_nms_options(nms: str, beta, sigma, prefix: str = "") -> tuple[str, float, float]:
    """Validate an NMS name, its DIoU exponent ``beta`` and Soft-NMS ``sigma``; returns them as floats."""
    from .options import check_choice  # options imports this module: a late import

    check_choice(f"{prefix}nms", nms, NMS_NAMES)
    for name, value in (("nms_beta", beta), ("soft_nms_sigma", sigma)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
            raise OptionError(f"{name} must be a finite number > 0, got {value!r}")
    return nms, float(beta), float(sigma)


def select(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float, nms: str, *, beta: float = 1.0,
           sigma: float = 0.5) -> tuple[Tensor, Tensor, Tensor]:
    """Per-category NMS by name; boxes of different ``idxs`` never interact.

    Returns ``(keep, boxes, scores)``: indices into the input of the kept detections, by decreasing
    (final) score, their boxes (merged for ``"weighted"``) and scores (decayed for Soft-NMS).
    """
    if nms == "iou":
        keep = box_ops.batched_nms(boxes, scores, idxs, iou_threshold)
    elif nms == "diou":
        keep = boxloss.batched_diou_nms(boxes, scores, idxs, iou_threshold, beta=beta)
    elif nms in ("soft", "soft-diou"):
        keep, new_scores = boxloss.batched_soft_nms(
            boxes, scores, idxs, method="gaussian", sigma=sigma, score_threshold=SOFT_SCORE_THRESHOLD,
            distance=nms == "soft-diou", beta=beta,
        )
        return keep, boxes[keep], new_scores.to(scores.dtype)
    elif nms == "weighted":
        keep, merged = boxloss.batched_weighted_nms(boxes, scores, idxs, iou_threshold, distance=False)
        return keep, merged.to(boxes.dtype), scores[keep]
    else:
        raise OptionError(f"nms must be one of {', '.join(map(repr, NMS_NAMES))}; got {nms!r}")
    return keep, boxes[keep], scores[keep]
