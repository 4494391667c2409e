"""torchvision's Faster R-CNN with any box loss in the RoI head and the RPN, and any NMS.

:class:`BoxLossRegionProposalNetwork`, :class:`BoxLossRoIHeads` and :class:`BoxLossFasterRCNN`
subclass the torchvision classes they replace and change only the box losses and the NMS calls:
parameters, state-dict keys and everything else stay torchvision's, so checkpoints load both ways.
Nothing in torchvision is patched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.models.detection.faster_rcnn import FasterRCNN
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss
from torchvision.models.detection.rpn import RegionProposalNetwork, concat_box_prediction_layers
from torchvision.ops import boxes as box_ops

from .losses import box_regression_loss
from .nms import select
from .options import IMAGE_SIZE_LOSSES, set_box_loss, set_nms

__all__ = ["BoxLossRegionProposalNetwork", "BoxLossRoIHeads", "BoxLossFasterRCNN"]


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
        box_loss_cfg: options of the box loss (``rpn_box_loss_cfg`` of :func:`build_detector`).
    """

    def __init__(self, anchor_generator, head, fg_iou_thresh, bg_iou_thresh, batch_size_per_image,
                 positive_fraction, pre_nms_top_n, post_nms_top_n, nms_thresh, score_thresh=0.0, *,
                 box_loss: str = "default", loss_weight=None, nms: str = "iou", nms_beta: float = 1.0,
                 soft_nms_sigma: float = 0.5, box_loss_cfg=None):
        super().__init__(anchor_generator, head, fg_iou_thresh, bg_iou_thresh, batch_size_per_image,
                         positive_fraction, pre_nms_top_n, post_nms_top_n, nms_thresh, score_thresh)
        set_box_loss(self, "rpn", box_loss, loss_weight, prefix="rpn_", box_loss_cfg=box_loss_cfg)
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

    # adapted from torchvision 0.29, RegionProposalNetwork.filter_proposals (the NMS by name)
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

    # adapted from torchvision 0.29, RegionProposalNetwork.forward (compute_box_loss split out)
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
                    objectness, pred_bbox_deltas, labels, anchors, matched_gt_boxes, images.image_sizes
                )
            losses = {"loss_objectness": loss_objectness, "loss_rpn_box_reg": self.loss_weight * loss_box}
        return boxes, losses

    def compute_box_loss(self, objectness, pred_bbox_deltas, labels, anchors, matched_gt_boxes, image_sizes=None):
        """Objectness and box loss of the sampled anchors, with the anchors the box loss needs.

        Args:
            objectness: ``[sum(HWA), 1]`` logits; pred_bbox_deltas: ``[sum(HWA), 4]``.
            labels: per image ``[HWA]`` 1 / 0 / -1 (positive, negative, ignored).
            anchors, matched_gt_boxes: per image ``[HWA, 4]``.
            image_sizes: per image its input (height, width): needed by ``mpdiou`` only.

        Returns:
            (objectness loss, unweighted box loss): BCE mean over the sampled anchors, and the box
            loss summed over the sampled positives divided by the number of sampled anchors.
        """
        sampled_pos, sampled_neg = self.fg_bg_sampler(labels)
        sampled_pos = torch.where(torch.cat(sampled_pos))[0]
        sampled = torch.cat([sampled_pos, torch.where(torch.cat(sampled_neg))[0]])
        labels = torch.cat(labels)
        objectness_loss = F.binary_cross_entropy_with_logits(objectness.flatten()[sampled], labels[sampled])
        image_size = None
        if self.box_loss in IMAGE_SIZE_LOSSES:
            image_size = _per_box_sizes(image_sizes, anchors)[sampled_pos]
        box_loss = box_regression_loss(
            self.box_loss,
            pred_bbox_deltas[sampled_pos],
            torch.cat(anchors)[sampled_pos],
            torch.cat(matched_gt_boxes)[sampled_pos],
            self.box_coder,
            options=self.box_loss_cfg,
            image_size=image_size,
            loss_module=getattr(self, "wise_iou", None),
        )
        return objectness_loss, box_loss / sampled.numel()


def _per_box_sizes(image_sizes, boxes_per_image) -> torch.Tensor:
    """``[sum N_i, 2]``: each image's (height, width) repeated for its boxes (MPDIoU's normaliser)."""
    device = boxes_per_image[0].device
    return torch.cat([torch.tensor(size, dtype=torch.float32, device=device).expand(len(boxes), 2)
                      for size, boxes in zip(image_sizes, boxes_per_image)])


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
        box_loss_cfg: options of the box loss (e.g. ``dict(inner_ratio=0.8)``).
    """

    def __init__(self, box_roi_pool, box_head, box_predictor, fg_iou_thresh, bg_iou_thresh,
                 batch_size_per_image, positive_fraction, bbox_reg_weights, score_thresh, nms_thresh,
                 detections_per_img, *, box_loss: str = "default", loss_weight=None, nms: str = "iou",
                 nms_beta: float = 1.0, soft_nms_sigma: float = 0.5, box_loss_cfg=None):
        super().__init__(box_roi_pool, box_head, box_predictor, fg_iou_thresh, bg_iou_thresh,
                         batch_size_per_image, positive_fraction, bbox_reg_weights, score_thresh,
                         nms_thresh, detections_per_img)
        set_box_loss(self, "roi", box_loss, loss_weight, box_loss_cfg=box_loss_cfg)
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

    # adapted from torchvision 0.29, RoIHeads.forward, box branch (compute_box_loss split out)
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
                class_logits, box_regression, labels, proposals, matched_gt_boxes, image_shapes
            )
        return [], {"loss_classifier": loss_classifier, "loss_box_reg": self.loss_weight * loss_box}

    def compute_box_loss(self, class_logits, box_regression, labels, proposals, matched_gt_boxes, image_shapes=None):
        """Classification and box loss of the sampled RoIs.

        Args:
            class_logits: ``[R, K]``; box_regression: ``[R, 4K]`` class-specific deltas.
            labels: per image ``[R_i]`` class of each sampled RoI (0 = background).
            proposals, matched_gt_boxes: per image ``[R_i, 4]``: the sampled proposals and the
                ground-truth box each is matched to.
            image_shapes: per image its input (height, width): needed by ``mpdiou`` only.

        Returns:
            (cross entropy over the sampled RoIs, unweighted box loss): the box loss of the deltas
            of each positive RoI's ground-truth class, summed and divided by R.
        """
        labels = torch.cat(labels)
        classification_loss = F.cross_entropy(class_logits, labels)
        positive = torch.where(labels > 0)[0]
        deltas = box_regression.reshape(labels.numel(), -1, 4)[positive, labels[positive]]  # [P, 4]
        image_size = None
        if self.box_loss in IMAGE_SIZE_LOSSES:
            image_size = _per_box_sizes(image_shapes, proposals)[positive]
        box_loss = box_regression_loss(
            self.box_loss, deltas, torch.cat(proposals)[positive], torch.cat(matched_gt_boxes)[positive],
            self.box_coder, options=self.box_loss_cfg, image_size=image_size,
            loss_module=getattr(self, "wise_iou", None),
        )
        return classification_loss, box_loss / labels.numel()

    # adapted from torchvision 0.29, RoIHeads.postprocess_detections (the NMS by name)
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
        box_loss, box_loss_weight, box_loss_cfg: the RoI head's box loss, its weight (None: the
            default) and its options.
        rpn_box_loss, rpn_box_loss_weight, rpn_box_loss_cfg: the RPN's (``"default"``: torchvision's
            smooth-L1).
        nms: per-class NMS of the detections, ``"iou"`` or ``"diou"``.
        rpn_nms: per-level NMS of the proposals, ``"iou"`` or ``"diou"``.
        nms_beta: DIoU-NMS exponent for both; soft_nms_sigma: Soft-NMS gaussian width for both.
    """

    def __init__(self, backbone, num_classes=None, *, box_loss: str = "default", box_loss_weight=None,
                 rpn_box_loss: str = "default", rpn_box_loss_weight=None, nms: str = "iou",
                 rpn_nms: str = "iou", nms_beta: float = 1.0, soft_nms_sigma: float = 0.5, box_loss_cfg=None,
                 rpn_box_loss_cfg=None, **kwargs):
        super().__init__(backbone, num_classes, **kwargs)
        self.rpn = BoxLossRegionProposalNetwork.from_torchvision(
            self.rpn, box_loss=rpn_box_loss, loss_weight=rpn_box_loss_weight, nms=rpn_nms, nms_beta=nms_beta,
            soft_nms_sigma=soft_nms_sigma, box_loss_cfg=rpn_box_loss_cfg,
        )
        self.roi_heads = BoxLossRoIHeads.from_torchvision(
            self.roi_heads, box_loss=box_loss, loss_weight=box_loss_weight, nms=nms, nms_beta=nms_beta,
            soft_nms_sigma=soft_nms_sigma, box_loss_cfg=box_loss_cfg,
        )
