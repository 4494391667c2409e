"""The box regression loss of a head, chosen by name.

``default`` is torchvision's own loss, unchanged (RetinaNet: L1 on the deltas; RPN and RoI head:
smooth-L1 with beta = 1/9), computed by the torchvision head itself; ``l1``, ``l2``, ``smooth_l1``
(beta = 1/9 in every head) compare the predicted deltas with the matched ground truth encoded by
the head's box coder; ``iou``, ``giou``, ``diou``, ``ciou`` compare the boxes decoded from the
predicted deltas against the anchors (RetinaNet, RPN) or the sampled proposals (RoI head) with
the matched ground-truth boxes themselves. Every head normalises the summed loss as torchvision
does.
"""

from __future__ import annotations

from torch import Tensor, nn
from torchvision.models.detection import _utils as det_utils

import boxloss

from .options import DELTA_LOSSES, IMAGE_SIZE_LOSSES

__all__ = ["SMOOTH_L1_BETA", "box_regression_loss"]

# smooth-L1 transition point for box_loss="smooth_l1" in every head: torchvision's RPN and RoI head
# use 1/9 (Detectron's value), and Detectron's RetinaNet used 0.11 too.
SMOOTH_L1_BETA = 1.0 / 9.0


def box_regression_loss(
    box_loss: str, deltas: Tensor, reference_boxes: Tensor, gt_boxes: Tensor, box_coder: det_utils.BoxCoder, *,
    options: dict | None = None, image_size: Tensor | None = None, loss_module: nn.Module | None = None,
) -> Tensor:
    """Summed box loss of predicted deltas against their matched ground-truth boxes.

    L-norm losses compare ``deltas`` with ``box_coder.encode_single(gt_boxes, reference_boxes)``;
    IoU-family losses compare ``box_coder.decode_single(deltas, reference_boxes)`` with ``gt_boxes``
    (decoded in float32: fp16 has a 0.5 px step at 1000 px).

    Args:
        box_loss: a name of :data:`~detectors.options.BOX_LOSSES` other than ``default``
            (``smooth_l1`` with beta = 1/9 unless ``options`` sets it).
        deltas: ``[P, 4]`` predicted deltas of the positive samples.
        reference_boxes: ``[P, 4]`` their anchors or proposals, xyxy.
        gt_boxes: ``[P, 4]`` the matched ground-truth boxes, xyxy.
        box_coder: the head's box coder (its weights scale the deltas).
        options: the loss's options (the head's checked ``box_loss_cfg``).
        image_size: ``[P, 2]`` (height, width) of each sample's input image: ``mpdiou`` only.
        loss_module: the head's :class:`boxloss.WiseIoULoss` for ``wise_iou`` (its running mean).

    Returns:
        The sum over the ``P`` samples (0 with a graph for ``P = 0``); the caller normalises.
    """
    options = dict(options or {})
    if box_loss in DELTA_LOSSES:
        target = box_coder.encode_single(gt_boxes, reference_boxes)
        if box_loss == "smooth_l1":
            options.setdefault("beta", SMOOTH_L1_BETA)
        return boxloss.get_loss(box_loss, **options)(deltas, target, reduction="sum")
    pred_boxes = box_coder.decode_single(deltas.float(), reference_boxes.float())
    if box_loss == "wise_iou":
        return loss_module(pred_boxes, gt_boxes.float())  # reduction="sum", set by the head
    if box_loss in IMAGE_SIZE_LOSSES:
        options["image_size"] = image_size.float()
    return boxloss.get_loss(box_loss, **options)(pred_boxes, gt_boxes.float(), reduction="sum")
