"""torchvision's RetinaNet with the focal loss from boxloss, any box loss, and any NMS.

:class:`FocalClassificationHead`, :class:`BoxLossRegressionHead`, :class:`BoxLossRetinaNetHead`
and :class:`BoxLossRetinaNet` subclass the torchvision classes they replace and change only the
losses and the NMS call: parameters, state-dict keys and everything else stay torchvision's, so
checkpoints load both ways. Nothing in torchvision is patched.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.models.detection.retinanet import (
    RetinaNet,
    RetinaNetClassificationHead,
    RetinaNetHead,
    RetinaNetRegressionHead,
)
from torchvision.ops import boxes as box_ops

import boxloss

from .losses import box_regression_loss
from .nms import select
from .options import IMAGE_SIZE_LOSSES, set_box_loss, set_nms

__all__ = ["FocalClassificationHead", "BoxLossRegressionHead", "BoxLossRetinaNetHead", "BoxLossRetinaNet",
           "ImageSizeTransform"]


class FocalClassificationHead(RetinaNetClassificationHead):
    """RetinaNet classification head whose loss is :func:`boxloss.sigmoid_focal_loss`.

    Same normalisation as torchvision: per image, the focal loss summed over the anchors that are
    not ignored, divided by max(1, number of foreground anchors); then the mean over images.

    Args:
        in_channels, num_anchors, num_classes, prior_probability, norm_layer: as torchvision's
            ``RetinaNetClassificationHead``.
        alpha: focal-loss weight of the positives (0.25 as the paper; < 0 disables it).
        gamma: focal-loss focusing exponent (2 as the paper).
    """

    def __init__(
        self, in_channels, num_anchors, num_classes, prior_probability=0.01, norm_layer=None, *,
        alpha: float = 0.25, gamma: float = 2.0,
    ):
        super().__init__(in_channels, num_anchors, num_classes, prior_probability, norm_layer=norm_layer)
        self.alpha = alpha
        self.gamma = gamma

    # adapted from torchvision 0.29, RetinaNetClassificationHead.compute_loss (the focal loss call replaced)
    def compute_loss(self, targets, head_outputs, matched_idxs):
        losses = []
        for targets_per_image, logits, matched in zip(targets, head_outputs["cls_logits"], matched_idxs):
            foreground = matched >= 0
            num_foreground = foreground.sum()
            gt_classes = torch.zeros_like(logits)  # [HWA, K]
            gt_classes[foreground, targets_per_image["labels"][matched[foreground]]] = 1.0
            valid = matched != self.BETWEEN_THRESHOLDS  # anchors between the IoU thresholds are ignored
            loss = boxloss.sigmoid_focal_loss(
                logits[valid], gt_classes[valid], alpha=self.alpha, gamma=self.gamma, reduction="sum"
            )
            losses.append(loss / num_foreground.clamp(min=1))  # torchvision: / max(1, num_foreground)
        return sum(losses) / len(targets)


class BoxLossRegressionHead(RetinaNetRegressionHead):
    """RetinaNet regression head with the box loss chosen by name.

    Per image, the loss summed over the foreground anchors is divided by max(1, their number); the
    result is averaged over images and multiplied by ``loss_weight`` (torchvision's normalisation).

    Args:
        in_channels, num_anchors, norm_layer: as torchvision's ``RetinaNetRegressionHead``.
        box_loss: a name of :data:`BOX_LOSSES`; ``"default"`` is torchvision's L1 on the deltas.
        loss_weight: multiplies the loss; None takes :func:`default_box_loss_weight`.
        box_loss_cfg: options of the loss (e.g. ``dict(inner_ratio=0.8)``), checked by
            :func:`~detectors.options.check_box_loss_cfg`. ``mpdiou`` reads each image's input size
            from its target's ``"image_size"`` (set by :class:`BoxLossRetinaNet`'s transform).
    """

    def __init__(self, in_channels, num_anchors, norm_layer=None, *, box_loss: str = "default", loss_weight=None,
                 box_loss_cfg=None):
        super().__init__(in_channels, num_anchors, norm_layer=norm_layer)
        set_box_loss(self, "retinanet", box_loss, loss_weight, box_loss_cfg=box_loss_cfg)

    # adapted from torchvision 0.29, RetinaNetRegressionHead.compute_loss (the loss by name)
    def compute_loss(self, targets, head_outputs, anchors, matched_idxs):
        if self.box_loss == "default":
            return self.loss_weight * super().compute_loss(targets, head_outputs, anchors, matched_idxs)
        losses = []
        for targets_per_image, deltas, anchors_per_image, matched in zip(
            targets, head_outputs["bbox_regression"], anchors, matched_idxs
        ):
            foreground = torch.where(matched >= 0)[0]
            image_size = None
            if self.box_loss in IMAGE_SIZE_LOSSES:
                image_size = targets_per_image["image_size"].expand(foreground.numel(), 2)
            loss = box_regression_loss(
                self.box_loss,
                deltas[foreground],
                anchors_per_image[foreground],
                targets_per_image["boxes"][matched[foreground]],
                self.box_coder,
                options=self.box_loss_cfg,
                image_size=image_size,
                loss_module=getattr(self, "wise_iou", None),
            )
            losses.append(loss / max(1, foreground.numel()))
        return self.loss_weight * sum(losses) / max(1, len(targets))


class BoxLossRetinaNetHead(RetinaNetHead):
    """RetinaNet head made of :class:`FocalClassificationHead` and :class:`BoxLossRegressionHead`.

    Builds the two sub-heads in torchvision's order, so a seeded build initialises them as
    torchvision's ``RetinaNetHead`` does. Args as that class, plus ``box_loss``, ``box_loss_weight``
    and ``box_loss_cfg`` for the regression head.
    """

    def __init__(self, in_channels, num_anchors, num_classes, norm_layer=None, *,
                 box_loss: str = "default", box_loss_weight=None, box_loss_cfg=None):
        # RetinaNetHead.__init__ would build torchvision's sub-heads only for us to replace them
        nn.Module.__init__(self)
        self.classification_head = FocalClassificationHead(in_channels, num_anchors, num_classes, norm_layer=norm_layer)
        self.regression_head = BoxLossRegressionHead(
            in_channels, num_anchors, norm_layer=norm_layer, box_loss=box_loss, loss_weight=box_loss_weight,
            box_loss_cfg=box_loss_cfg,
        )


class ImageSizeTransform(GeneralizedRCNNTransform):
    """torchvision's transform that also puts each image's input size (after resizing, before
    padding) into its target as ``"image_size"``, ``[2]`` (height, width): MPDIoU's normaliser, which
    RetinaNet's loss would not see otherwise. Images, boxes and everything else are unchanged (the
    targets are torchvision's copies, never the caller's dicts)."""

    @classmethod
    def from_transform(cls, t: GeneralizedRCNNTransform) -> "ImageSizeTransform":
        return cls(t.min_size, t.max_size, t.image_mean, t.image_std, size_divisible=t.size_divisible,
                   fixed_size=t.fixed_size, _skip_resize=t._skip_resize)

    def forward(self, images, targets=None):
        image_list, targets = super().forward(images, targets)
        if targets is not None:
            for target, (height, width) in zip(targets, image_list.image_sizes):
                target["image_size"] = torch.tensor([height, width], dtype=torch.float32,
                                                    device=target["boxes"].device)
        return image_list, targets


class BoxLossRetinaNet(RetinaNet):
    """torchvision's RetinaNet with ``loss_``-prefixed loss keys and a choice of NMS.

    Training returns ``{"loss_classifier": ..., "loss_box_reg": ...}`` (torchvision's
    ``classification`` and ``bbox_regression``); the losses themselves come from ``head``
    (pass a :class:`BoxLossRetinaNetHead`).

    Args:
        backbone, num_classes, **kwargs: as torchvision's ``RetinaNet``.
        nms: ``"iou"`` (torchvision's) or ``"diou"`` for the per-class NMS of the detections.
        nms_beta: DIoU-NMS exponent of the distance term.
        soft_nms_sigma: width of the gaussian decay of Soft-NMS.
    """

    def __init__(self, backbone, num_classes, *, nms: str = "iou", nms_beta: float = 1.0, soft_nms_sigma: float = 0.5,
                 **kwargs):
        super().__init__(backbone, num_classes, **kwargs)
        set_nms(self, nms, nms_beta, soft_nms_sigma)
        if getattr(self.head.regression_head, "box_loss", None) in IMAGE_SIZE_LOSSES:
            self.transform = ImageSizeTransform.from_transform(self.transform)

    def compute_loss(self, targets, head_outputs, anchors):
        losses = super().compute_loss(targets, head_outputs, anchors)
        return {"loss_classifier": losses["classification"], "loss_box_reg": losses["bbox_regression"]}

    # adapted from torchvision 0.29, RetinaNet.postprocess_detections (no background label, the NMS by name)
    def postprocess_detections(self, head_outputs, anchors, image_shapes):
        """torchvision's RetinaNet post-processing with the NMS chosen by ``self.nms``.

        Per level: sigmoid scores of the foreground labels (1..K-1) above ``score_thresh``, the
        ``topk_candidates`` best, decoded and clipped; then per-class NMS over all levels and the
        ``detections_per_img`` best. Unlike torchvision, label 0 (background) is never emitted.
        """
        detections = []
        for index, image_shape in enumerate(image_shapes):
            image_boxes, image_scores, image_labels = [], [], []
            for deltas, logits, level_anchors in zip(
                head_outputs["bbox_regression"], head_outputs["cls_logits"], anchors[index]
            ):
                # [HWA, 4], [HWA, K]; column 0 is the background label (labels are 1..K-1, as
                # torchvision's COCO models), never a detection, whatever score_thresh is
                deltas = deltas[index]
                scores = torch.sigmoid(logits[index])[:, 1:]  # sigmoid first: the same floats as torchvision
                num_classes = scores.shape[-1]
                scores = scores.flatten()
                candidates = torch.where(scores > self.score_thresh)[0]
                num_topk = det_utils._topk_min(candidates, self.topk_candidates, 0)
                scores, order = scores[candidates].topk(num_topk)
                candidates = candidates[order]
                anchor_idxs = torch.div(candidates, num_classes, rounding_mode="floor")
                boxes = self.box_coder.decode_single(deltas[anchor_idxs], level_anchors[anchor_idxs])
                image_boxes.append(box_ops.clip_boxes_to_image(boxes, image_shape))
                image_scores.append(scores)
                image_labels.append(candidates % num_classes + 1)
            boxes, scores, labels = torch.cat(image_boxes), torch.cat(image_scores), torch.cat(image_labels)
            keep, boxes, scores = select(boxes, scores, labels, self.nms_thresh, self.nms, beta=self.nms_beta,
                                         sigma=self.soft_nms_sigma)
            n = self.detections_per_img
            detections.append({"boxes": boxes[:n], "scores": scores[:n], "labels": labels[keep[:n]]})
        return detections
