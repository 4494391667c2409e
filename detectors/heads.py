"""torchvision detection heads with a box loss chosen by name and DIoU-NMS post-processing.

Each class subclasses the torchvision head it replaces and changes only the loss and the NMS call;
parameters, state-dict keys and everything else stay torchvision's, so checkpoints load both ways.
Nothing in torchvision is patched: a torchvision model built beside these keeps its own losses.

* :class:`FocalClassificationHead`, :class:`BoxLossRegressionHead`, :class:`BoxLossRetinaNetHead`
  and :class:`BoxLossRetinaNet`: RetinaNet with the focal loss from ``boxloss`` and any box loss.
* :class:`BoxLossRegionProposalNetwork`, :class:`BoxLossRoIHeads` and :class:`BoxLossFasterRCNN`:
  Faster R-CNN with any box loss in the RoI box head and (optionally) the RPN.

Box losses (``box_loss``): ``default`` is torchvision's own loss, unchanged (RetinaNet: L1 on the
deltas; RPN and RoI head: smooth-L1 with beta = 1/9); ``l1``, ``l2``, ``smooth_l1`` (beta = 1/9 in
every head) compare the predicted deltas with the matched ground truth encoded by the head's box
coder; ``iou``, ``giou``, ``diou``, ``ciou`` compare the boxes decoded from the predicted deltas
against the anchors (RetinaNet, RPN) or the sampled proposals (RoI head) with the matched
ground-truth boxes themselves. Every head normalises the summed loss as torchvision does.
"""

from __future__ import annotations

import difflib
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.faster_rcnn import FasterRCNN
from torchvision.models.detection.retinanet import (
    RetinaNet,
    RetinaNetClassificationHead,
    RetinaNetHead,
    RetinaNetRegressionHead,
)
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss
from torchvision.models.detection.rpn import RegionProposalNetwork, concat_box_prediction_layers
from torchvision.ops import boxes as box_ops

import boxloss

from .errors import OptionError
from .nms import NMS_NAMES, check_nms_options, select

__all__ = [
    "BOX_LOSSES",
    "NMS_NAMES",
    "default_box_loss_weight",
    "box_regression_loss",
    "FocalClassificationHead",
    "BoxLossRegressionHead",
    "BoxLossRetinaNetHead",
    "BoxLossRetinaNet",
    "BoxLossRegionProposalNetwork",
    "BoxLossRoIHeads",
    "BoxLossFasterRCNN",
]

BOX_LOSSES = ("default", "l1", "l2", "smooth_l1", "iou", "giou", "diou", "ciou")
HEAD_KINDS = ("retinanet", "rpn", "roi")

# smooth-L1 transition point for box_loss="smooth_l1" in every head: torchvision's RPN and RoI head
# use 1/9 (Detectron's value), and Detectron's RetinaNet used 0.11 too.
SMOOTH_L1_BETA = 1.0 / 9.0


def check_choice(name: str, value, valid: tuple) -> None:
    """Raise an :class:`OptionError` naming the argument, the bad value, the closest and the valid names."""
    if not isinstance(value, str) or value not in valid:
        close = difflib.get_close_matches(value, valid, n=1) if isinstance(value, str) else []
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise OptionError(f"{name} must be one of {', '.join(map(repr, valid))}; got {value!r}{hint}")


def check_weight(name: str, value) -> float:
    """A loss weight as a float: a finite number >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value >= 0):
        raise OptionError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def set_box_loss(module: nn.Module, head: str, box_loss: str, loss_weight, prefix: str = "") -> None:
    """Validate and set ``module.box_loss`` and ``module.loss_weight`` (None: the head's default).

    ``prefix`` names the arguments in errors as the user passed them (``"rpn_"`` for the RPN).
    """
    check_choice(f"{prefix}box_loss", box_loss, BOX_LOSSES)
    module.box_loss = box_loss
    if loss_weight is None:
        loss_weight = default_box_loss_weight(head, box_loss)
    module.loss_weight = check_weight(f"{prefix}box_loss_weight", loss_weight)


def set_nms(module: nn.Module, nms: str, nms_beta, soft_nms_sigma=0.5, prefix: str = "") -> None:
    """Validate and set ``module.nms``, ``module.nms_beta`` and ``module.soft_nms_sigma``."""
    module.nms, module.nms_beta, module.soft_nms_sigma = check_nms_options(nms, nms_beta, soft_nms_sigma, prefix)


def default_box_loss_weight(head: str, box_loss: str) -> float:
    """The default weight of ``box_loss`` in a head (``"retinanet"``, ``"rpn"`` or ``"roi"``).

    ==========================  =========  =====  =====
    box_loss                    retinanet  rpn    roi
    ==========================  =========  =====  =====
    default, l1, l2, smooth_l1  1          1      1
    iou, giou, diou             2          2      10
    ciou                        2          2      12
    ==========================  =========  =====  =====

    Why: an IoU-family loss on decoded boxes pulls on the predicted deltas much less than an L-norm
    loss on the deltas does, by a factor the head's box-coder weights set. Measured at zero deltas on
    2,000 random anchors whose ground truth is shifted and rescaled by N(0, 0.15) of their size (loss
    about 0.4 per box), the mean |dL/d(deltas)| summed over the 4 deltas is: coder (1, 1, 1, 1) (RetinaNet, RPN): L1 4.0, smooth-L1 2.9, GIoU 2.4, DIoU/CIoU 2.2;
    coder (10, 10, 5, 5) (RoI head): L1 4.0, smooth-L1 3.8, GIoU 0.29, DIoU/CIoU 0.27. Weights of
    about 2 and 10-13 restore the pull of the default loss. They agree with the published
    settings: 2 is MMDetection's GIoU weight for dense anchor heads (ATSS, GFL); 10 is its IoU and
    GIoU weight in the Faster R-CNN RoI head, and 12 the CIoU weight the DIoU authors used in
    Faster R-CNN (MMDetection's ``faster-rcnn_r50_fpn_ciou_1x_coco``). The normalisation (per
    positive anchor, per sampled anchor or RoI) is torchvision's and the same for every loss of a
    head, so it does not change these ratios.

    Raises:
        ValueError: for an unknown ``head`` or ``box_loss``.
    """
    check_choice("head", head, HEAD_KINDS)
    if box_loss in ("default", "l1", "l2", "smooth_l1"):
        return 1.0
    elif box_loss in ("iou", "giou", "diou"):
        return 10.0 if head == "roi" else 2.0
    check_choice("box_loss", box_loss, BOX_LOSSES)
    return 12.0 if head == "roi" else 2.0  # ciou


def box_regression_loss(
    box_loss: str, deltas: Tensor, reference_boxes: Tensor, gt_boxes: Tensor, box_coder: det_utils.BoxCoder
) -> Tensor:
    """Summed box loss of predicted deltas against their matched ground-truth boxes.

    L-norm losses compare ``deltas`` with ``box_coder.encode_single(gt_boxes, reference_boxes)``;
    IoU-family losses compare ``box_coder.decode_single(deltas, reference_boxes)`` with ``gt_boxes``
    (decoded in float32: fp16 has a 0.5 px step at 1000 px).

    Args:
        box_loss: ``l1``, ``l2``, ``smooth_l1`` (beta = 1/9), ``iou``, ``giou``, ``diou`` or ``ciou``.
        deltas: ``[P, 4]`` predicted deltas of the positive samples.
        reference_boxes: ``[P, 4]`` their anchors or proposals, xyxy.
        gt_boxes: ``[P, 4]`` the matched ground-truth boxes, xyxy.
        box_coder: the head's box coder (its weights scale the deltas).

    Returns:
        The sum over the ``P`` samples (0 with a graph for ``P = 0``); the caller normalises.
    """
    if box_loss in ("l1", "l2", "smooth_l1"):
        target = box_coder.encode_single(gt_boxes, reference_boxes)
        options = {"beta": SMOOTH_L1_BETA} if box_loss == "smooth_l1" else {}
        return boxloss.get_loss(box_loss, **options)(deltas, target, reduction="sum")
    pred_boxes = box_coder.decode_single(deltas.float(), reference_boxes.float())
    return boxloss.get_loss(box_loss)(pred_boxes, gt_boxes.float(), reduction="sum")


# --------------------------------------------------------------------------- RetinaNet


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
    """

    def __init__(self, in_channels, num_anchors, norm_layer=None, *, box_loss: str = "default", loss_weight=None):
        super().__init__(in_channels, num_anchors, norm_layer=norm_layer)
        set_box_loss(self, "retinanet", box_loss, loss_weight)

    def compute_loss(self, targets, head_outputs, anchors, matched_idxs):
        if self.box_loss == "default":
            return self.loss_weight * super().compute_loss(targets, head_outputs, anchors, matched_idxs)
        losses = []
        for targets_per_image, deltas, anchors_per_image, matched in zip(
            targets, head_outputs["bbox_regression"], anchors, matched_idxs
        ):
            foreground = torch.where(matched >= 0)[0]
            loss = box_regression_loss(
                self.box_loss,
                deltas[foreground],
                anchors_per_image[foreground],
                targets_per_image["boxes"][matched[foreground]],
                self.box_coder,
            )
            losses.append(loss / max(1, foreground.numel()))
        return self.loss_weight * sum(losses) / max(1, len(targets))


class BoxLossRetinaNetHead(RetinaNetHead):
    """RetinaNet head made of :class:`FocalClassificationHead` and :class:`BoxLossRegressionHead`.

    Builds the two sub-heads in torchvision's order, so a seeded build initialises them as
    torchvision's ``RetinaNetHead`` does. Args as that class, plus ``box_loss`` and
    ``box_loss_weight`` for the regression head.
    """

    def __init__(self, in_channels, num_anchors, num_classes, norm_layer=None, *,
                 box_loss: str = "default", box_loss_weight=None):
        # RetinaNetHead.__init__ would build torchvision's sub-heads only for us to replace them
        nn.Module.__init__(self)
        self.classification_head = FocalClassificationHead(in_channels, num_anchors, num_classes, norm_layer=norm_layer)
        self.regression_head = BoxLossRegressionHead(
            in_channels, num_anchors, norm_layer=norm_layer, box_loss=box_loss, loss_weight=box_loss_weight
        )


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

    def compute_loss(self, targets, head_outputs, anchors):
        losses = super().compute_loss(targets, head_outputs, anchors)
        return {"loss_classifier": losses["classification"], "loss_box_reg": losses["bbox_regression"]}

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


# --------------------------------------------------------------------------- Faster R-CNN


class BoxLossRegionProposalNetwork(RegionProposalNetwork):
    """torchvision's RPN with the box loss chosen by name and a choice of proposal NMS.

    The box loss is summed over the sampled positive anchors and divided by the number of sampled
    anchors, as torchvision; ``"default"`` is torchvision's smooth-L1 (beta = 1/9) on the deltas.
    IoU-family losses decode the deltas against the anchors. The objectness loss is unchanged.

    Args:
        anchor_generator ... score_thresh: as torchvision's ``RegionProposalNetwork``.
        box_loss: a name of :data:`BOX_LOSSES`.
        loss_weight: multiplies the box loss; None takes :func:`default_box_loss_weight`.
        nms: ``"iou"`` or ``"diou"``: the per-level NMS that filters the proposals.
        nms_beta: DIoU-NMS exponent.
    """

    def __init__(self, anchor_generator, head, fg_iou_thresh, bg_iou_thresh, batch_size_per_image,
                 positive_fraction, pre_nms_top_n, post_nms_top_n, nms_thresh, score_thresh=0.0, *,
                 box_loss: str = "default", loss_weight=None, nms: str = "iou", nms_beta: float = 1.0,
                 soft_nms_sigma: float = 0.5):
        super().__init__(anchor_generator, head, fg_iou_thresh, bg_iou_thresh, batch_size_per_image,
                         positive_fraction, pre_nms_top_n, post_nms_top_n, nms_thresh, score_thresh)
        set_box_loss(self, "rpn", box_loss, loss_weight, prefix="rpn_")
        set_nms(self, nms, nms_beta, soft_nms_sigma, prefix="rpn_")

    @classmethod
    def from_torchvision(cls, rpn: RegionProposalNetwork, **options) -> "BoxLossRegionProposalNetwork":
        """The same RPN (same modules and settings) with the options of this class."""
        matcher, sampler = rpn.proposal_matcher, rpn.fg_bg_sampler
        return cls(
            rpn.anchor_generator, rpn.head, matcher.high_threshold, matcher.low_threshold,
            sampler.batch_size_per_image, sampler.positive_fraction, dict(rpn._pre_nms_top_n),
            dict(rpn._post_nms_top_n), rpn.nms_thresh, rpn.score_thresh, **options,
        )

    def filter_proposals(self, proposals, objectness, image_shapes, num_anchors_per_level):
        """torchvision's proposal filter with the per-level NMS chosen by ``self.nms``."""
        num_images = proposals.shape[0]
        device = proposals.device
        objectness = objectness.detach().reshape(num_images, -1)  # no backprop through the proposals
        levels = torch.cat(
            [torch.full((n,), idx, dtype=torch.int64, device=device) for idx, n in enumerate(num_anchors_per_level)]
        )
        levels = levels.reshape(1, -1).expand_as(objectness)
        top_n_idx = self._get_top_n_idx(objectness, num_anchors_per_level)  # per level, before NMS
        batch_idx = torch.arange(num_images, device=device)[:, None]
        objectness_prob = torch.sigmoid(objectness[batch_idx, top_n_idx])
        levels = levels[batch_idx, top_n_idx]
        proposals = proposals[batch_idx, top_n_idx]

        final_boxes, final_scores = [], []
        for boxes, scores, lvl, img_shape in zip(proposals, objectness_prob, levels, image_shapes):
            boxes = box_ops.clip_boxes_to_image(boxes, img_shape)
            keep = box_ops.remove_small_boxes(boxes, self.min_size)
            boxes, scores, lvl = boxes[keep], scores[keep], lvl[keep]
            keep = torch.where(scores >= self.score_thresh)[0]  # >= as torchvision
            boxes, scores, lvl = boxes[keep], scores[keep], lvl[keep]
            _, boxes, scores = select(boxes, scores, lvl, self.nms_thresh, self.nms, beta=self.nms_beta,
                                      sigma=self.soft_nms_sigma)
            final_boxes.append(boxes[: self.post_nms_top_n()])
            final_scores.append(scores[: self.post_nms_top_n()])
        return final_boxes, final_scores

    def forward(self, images, features, targets=None):
        """Proposals per image and, in training, ``loss_objectness`` and ``loss_rpn_box_reg``."""
        features = list(features.values())
        objectness, pred_bbox_deltas = self.head(features)
        anchors = self.anchor_generator(images, features)
        num_images = len(anchors)
        num_anchors_per_level = [o[0].numel() for o in objectness]  # A * H * W per level
        objectness, pred_bbox_deltas = concat_box_prediction_layers(objectness, pred_bbox_deltas)
        # Faster R-CNN does not backprop through the proposals
        proposals = self.box_coder.decode(pred_bbox_deltas.detach(), anchors).view(num_images, -1, 4)
        boxes, scores = self.filter_proposals(proposals, objectness, images.image_sizes, num_anchors_per_level)

        losses = {}
        if self.training:
            if targets is None:
                raise ValueError("targets should not be None in training mode")
            labels, matched_gt_boxes = self.assign_targets_to_anchors(anchors, targets)
            if self.box_loss == "default":
                regression_targets = self.box_coder.encode(matched_gt_boxes, anchors)
                loss_objectness, loss_box = self.compute_loss(objectness, pred_bbox_deltas, labels, regression_targets)
            else:
                loss_objectness, loss_box = self.compute_box_loss(
                    objectness, pred_bbox_deltas, labels, anchors, matched_gt_boxes
                )
            losses = {"loss_objectness": loss_objectness, "loss_rpn_box_reg": self.loss_weight * loss_box}
        return boxes, losses

    def compute_box_loss(self, objectness, pred_bbox_deltas, labels, anchors, matched_gt_boxes):
        """Objectness and box loss of the sampled anchors, with the anchors the box loss needs.

        Args:
            objectness: ``[sum(HWA), 1]`` logits; pred_bbox_deltas: ``[sum(HWA), 4]``.
            labels: per image ``[HWA]`` 1 / 0 / -1 (positive, negative, ignored).
            anchors, matched_gt_boxes: per image ``[HWA, 4]``.

        Returns:
            (objectness loss, unweighted box loss): BCE mean over the sampled anchors, and the box
            loss summed over the sampled positives divided by the number of sampled anchors.
        """
        sampled_pos, sampled_neg = self.fg_bg_sampler(labels)
        sampled_pos = torch.where(torch.cat(sampled_pos))[0]
        sampled = torch.cat([sampled_pos, torch.where(torch.cat(sampled_neg))[0]])
        labels = torch.cat(labels)
        objectness_loss = F.binary_cross_entropy_with_logits(objectness.flatten()[sampled], labels[sampled])
        box_loss = box_regression_loss(
            self.box_loss,
            pred_bbox_deltas[sampled_pos],
            torch.cat(anchors)[sampled_pos],
            torch.cat(matched_gt_boxes)[sampled_pos],
            self.box_coder,
        )
        return objectness_loss, box_loss / sampled.numel()


class BoxLossRoIHeads(RoIHeads):
    """torchvision's Faster R-CNN RoI heads with the box loss chosen by name and a choice of NMS.

    Training keeps the sampled proposals and their matched ground-truth boxes, which torchvision's
    ``fastrcnn_loss`` never sees: IoU-family losses decode the class-specific deltas of each positive
    RoI against its proposal and compare with the matched box. The box loss is summed over the
    positive RoIs and divided by the number of sampled RoIs, as torchvision; ``"default"`` calls
    torchvision's ``fastrcnn_loss`` (smooth-L1, beta = 1/9). Only the box branch is supported
    (no mask or keypoint heads).

    Args:
        box_roi_pool ... detections_per_img: as torchvision's ``RoIHeads``.
        box_loss: a name of :data:`BOX_LOSSES`.
        loss_weight: multiplies the box loss; None takes :func:`default_box_loss_weight`.
        nms: ``"iou"`` or ``"diou"``: the per-class NMS of the detections.
        nms_beta: DIoU-NMS exponent.
    """

    def __init__(self, box_roi_pool, box_head, box_predictor, fg_iou_thresh, bg_iou_thresh,
                 batch_size_per_image, positive_fraction, bbox_reg_weights, score_thresh, nms_thresh,
                 detections_per_img, *, box_loss: str = "default", loss_weight=None, nms: str = "iou",
                 nms_beta: float = 1.0, soft_nms_sigma: float = 0.5):
        super().__init__(box_roi_pool, box_head, box_predictor, fg_iou_thresh, bg_iou_thresh,
                         batch_size_per_image, positive_fraction, bbox_reg_weights, score_thresh,
                         nms_thresh, detections_per_img)
        set_box_loss(self, "roi", box_loss, loss_weight)
        set_nms(self, nms, nms_beta, soft_nms_sigma)

    @classmethod
    def from_torchvision(cls, roi_heads: RoIHeads, **options) -> "BoxLossRoIHeads":
        """The same box head (same modules and settings) with the options of this class."""
        if roi_heads.has_mask() or roi_heads.has_keypoint():
            raise ValueError("BoxLossRoIHeads supports the box branch only, got mask or keypoint heads")
        matcher, sampler = roi_heads.proposal_matcher, roi_heads.fg_bg_sampler
        return cls(
            roi_heads.box_roi_pool, roi_heads.box_head, roi_heads.box_predictor, matcher.high_threshold,
            matcher.low_threshold, sampler.batch_size_per_image, sampler.positive_fraction,
            roi_heads.box_coder.weights, roi_heads.score_thresh, roi_heads.nms_thresh,
            roi_heads.detections_per_img, **options,
        )

    def forward(self, features, proposals, image_shapes, targets=None):
        """Detections (eval) or ``{"loss_classifier", "loss_box_reg"}`` (training)."""
        if not self.training:
            return super().forward(features, proposals, image_shapes, targets)  # our postprocess_detections
        if targets is None:
            raise ValueError("targets should not be None in training mode")
        for t in targets:
            if t["boxes"].dtype not in (torch.float, torch.double, torch.half):
                raise TypeError(f"target boxes must be of float type, got {t['boxes'].dtype}")
            if t["labels"].dtype != torch.int64:
                raise TypeError(f"target labels must be of int64 type, got {t['labels'].dtype}")
        proposals, matched_idxs, labels, regression_targets = self.select_training_samples(proposals, targets)
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)
        if self.box_loss == "default":
            loss_classifier, loss_box = fastrcnn_loss(class_logits, box_regression, labels, regression_targets)
        else:
            matched_gt_boxes = []
            for t, matched in zip(targets, matched_idxs):
                gt = t["boxes"].to(proposals[0].dtype)
                if gt.numel() == 0:  # background image: no positives, any box will do (as torchvision)
                    gt = gt.new_zeros((1, 4))
                matched_gt_boxes.append(gt[matched])
            loss_classifier, loss_box = self.compute_box_loss(
                class_logits, box_regression, labels, proposals, matched_gt_boxes
            )
        return [], {"loss_classifier": loss_classifier, "loss_box_reg": self.loss_weight * loss_box}

    def compute_box_loss(self, class_logits, box_regression, labels, proposals, matched_gt_boxes):
        """Classification and box loss of the sampled RoIs.

        Args:
            class_logits: ``[R, K]``; box_regression: ``[R, 4K]`` class-specific deltas.
            labels: per image ``[R_i]`` class of each sampled RoI (0 = background).
            proposals, matched_gt_boxes: per image ``[R_i, 4]``: the sampled proposals and the
                ground-truth box each is matched to.

        Returns:
            (cross entropy over the sampled RoIs, unweighted box loss): the box loss of the deltas
            of each positive RoI's ground-truth class, summed and divided by R.
        """
        labels = torch.cat(labels)
        classification_loss = F.cross_entropy(class_logits, labels)
        positive = torch.where(labels > 0)[0]
        deltas = box_regression.reshape(labels.numel(), -1, 4)[positive, labels[positive]]  # [P, 4]
        box_loss = box_regression_loss(
            self.box_loss, deltas, torch.cat(proposals)[positive], torch.cat(matched_gt_boxes)[positive],
            self.box_coder,
        )
        return classification_loss, box_loss / labels.numel()

    def postprocess_detections(self, class_logits, box_regression, proposals, image_shapes):
        """torchvision's Faster R-CNN post-processing with the NMS chosen by ``self.nms``.

        Softmax scores; each class of each RoI is a candidate (background dropped); scores above
        ``score_thresh``, boxes wider and taller than 0.01; per-class NMS; the
        ``detections_per_img`` best.
        """
        num_classes = class_logits.shape[-1]
        boxes_per_image = [len(p) for p in proposals]
        pred_boxes = self.box_coder.decode(box_regression, proposals).split(boxes_per_image)  # [R_i, K, 4]
        pred_scores = F.softmax(class_logits, -1).split(boxes_per_image)
        all_boxes, all_scores, all_labels = [], [], []
        for boxes, scores, image_shape in zip(pred_boxes, pred_scores, image_shapes):
            boxes = box_ops.clip_boxes_to_image(boxes, image_shape)
            labels = torch.arange(num_classes, device=class_logits.device).view(1, -1).expand_as(scores)
            # drop the background class, then one candidate per (RoI, class)
            boxes, scores, labels = boxes[:, 1:].reshape(-1, 4), scores[:, 1:].reshape(-1), labels[:, 1:].reshape(-1)
            keep = torch.where(scores > self.score_thresh)[0]
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            keep = box_ops.remove_small_boxes(boxes, min_size=1e-2)
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            keep, boxes, scores = select(boxes, scores, labels, self.nms_thresh, self.nms, beta=self.nms_beta,
                                         sigma=self.soft_nms_sigma)
            n = self.detections_per_img
            all_boxes.append(boxes[:n])
            all_scores.append(scores[:n])
            all_labels.append(labels[keep[:n]])
        return all_boxes, all_scores, all_labels


class BoxLossFasterRCNN(FasterRCNN):
    """torchvision's Faster R-CNN with :class:`BoxLossRegionProposalNetwork` and :class:`BoxLossRoIHeads`.

    torchvision builds the model (so every torchvision argument and default applies, and a seeded
    build initialises the same weights); the RPN and RoI heads are then rebuilt as the subclasses
    around the same modules. Loss keys: ``loss_objectness``, ``loss_rpn_box_reg``,
    ``loss_classifier``, ``loss_box_reg``.

    Args:
        backbone, num_classes, **kwargs: as torchvision's ``FasterRCNN``.
        box_loss, box_loss_weight: the RoI head's box loss and its weight (None: the default).
        rpn_box_loss, rpn_box_loss_weight: the RPN's (``"default"``: torchvision's smooth-L1).
        nms: per-class NMS of the detections, ``"iou"`` or ``"diou"``.
        rpn_nms: per-level NMS of the proposals, ``"iou"`` or ``"diou"``.
        nms_beta: DIoU-NMS exponent for both; soft_nms_sigma: Soft-NMS gaussian width for both.
    """

    def __init__(self, backbone, num_classes=None, *, box_loss: str = "default", box_loss_weight=None,
                 rpn_box_loss: str = "default", rpn_box_loss_weight=None, nms: str = "iou",
                 rpn_nms: str = "iou", nms_beta: float = 1.0, soft_nms_sigma: float = 0.5, **kwargs):
        super().__init__(backbone, num_classes, **kwargs)
        self.rpn = BoxLossRegionProposalNetwork.from_torchvision(
            self.rpn, box_loss=rpn_box_loss, loss_weight=rpn_box_loss_weight, nms=rpn_nms, nms_beta=nms_beta,
            soft_nms_sigma=soft_nms_sigma,
        )
        self.roi_heads = BoxLossRoIHeads.from_torchvision(
            self.roi_heads, box_loss=box_loss, loss_weight=box_loss_weight, nms=nms, nms_beta=nms_beta,
            soft_nms_sigma=soft_nms_sigma,
        )
