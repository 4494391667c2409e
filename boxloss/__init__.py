"""boxloss: bounding-box regression losses, DIoU-NMS (greedy, weighted, soft) and tools to compare them.

Boxes are (x1, y1, x2, y2) in absolute units. Every regression loss has the signature
``loss(pred, target, *, weight=None, reduction="mean", avg_factor=None, eps=1e-7, ...)``.
Importing boxloss needs torch only.
"""

from .boxes import (
    box_area,
    box_convert,
    box_iou,
    check_boxes,
    complete_box_iou,
    distance_box_iou,
    generalized_box_iou,
    matched_box_iou,
    matched_complete_box_iou,
    matched_distance_box_iou,
    matched_generalized_box_iou,
)
from .focal import SigmoidFocalLoss, cross_entropy, sigmoid_focal_loss, softmax_focal_loss
from .losses import (
    LOSS_NAMES,
    CIoULoss,
    DIoULoss,
    GIoULoss,
    IoULoss,
    L1Loss,
    L2Loss,
    SmoothL1Loss,
    ciou_loss,
    diou_loss,
    get_loss,
    giou_loss,
    iou_loss,
    l1_loss,
    l2_loss,
    smooth_l1_loss,
)
from .nms import (
    SOFT_NMS_METHODS,
    batched_diou_nms,
    batched_soft_nms,
    batched_weighted_nms,
    diou_nms,
    soft_nms,
    weighted_nms,
)

__version__ = "0.1.0"

__all__ = [
    "box_area",
    "box_convert",
    "box_iou",
    "check_boxes",
    "complete_box_iou",
    "distance_box_iou",
    "generalized_box_iou",
    "matched_box_iou",
    "matched_complete_box_iou",
    "matched_distance_box_iou",
    "matched_generalized_box_iou",
    "SigmoidFocalLoss",
    "cross_entropy",
    "sigmoid_focal_loss",
    "softmax_focal_loss",
    "LOSS_NAMES",
    "CIoULoss",
    "DIoULoss",
    "GIoULoss",
    "IoULoss",
    "L1Loss",
    "L2Loss",
    "SmoothL1Loss",
    "ciou_loss",
    "diou_loss",
    "get_loss",
    "giou_loss",
    "iou_loss",
    "l1_loss",
    "l2_loss",
    "smooth_l1_loss",
    "batched_diou_nms",
    "diou_nms",
    "batched_weighted_nms",
    "weighted_nms",
    "batched_soft_nms",
    "soft_nms",
    "SOFT_NMS_METHODS",
]
