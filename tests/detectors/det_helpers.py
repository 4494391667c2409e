"""Shared pieces of the detector tests: tiny models, synthetic images, a hand-written box decoder."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.detection import FasterRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

import boxloss
from detectors import build_detector

NUM_CLASSES = 3  # background + 2
ANCHOR_SIZES = (8, 16, 32, 64, 128)  # one size per FPN level: small images, few anchors
ASPECT_RATIOS = (0.5, 1.0, 2.0)

FPN_CHANNELS = 64
# Small enough for 2 CPU cores: 64x64 images, frozen ResNet-18, a 64-channel FPN, few sampled anchors and RoIs.
TINY = {
    "retinanet": dict(backbone="resnet18", min_size=64, max_size=64, trainable_backbone_layers=0,
                      fpn_channels=FPN_CHANNELS, anchor_sizes=ANCHOR_SIZES, aspect_ratios=ASPECT_RATIOS),
    "faster_rcnn": dict(backbone="resnet18", min_size=64, max_size=64, trainable_backbone_layers=0,
                        fpn_channels=FPN_CHANNELS, anchor_sizes=ANCHOR_SIZES, aspect_ratios=ASPECT_RATIOS,
                        rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100,
                        rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_test=100,
                        rpn_batch_size_per_image=64, box_batch_size_per_image=64),
}

IOU_LOSSES = ("iou", "giou", "diou", "ciou")
DELTA_LOSSES = ("l1", "l2", "smooth_l1")
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def tiny_detector(arch: str, **options) -> nn.Module:
    """``build_detector(arch)`` with the tiny settings, overridden by ``options``."""
    return build_detector(arch, num_classes=NUM_CLASSES, **{**TINY[arch], **options})


def synthetic_batch():
    """Two 64x64 images with coloured rectangles on faint noise, and their targets (3 boxes, 2 classes)."""
    g = torch.Generator().manual_seed(0)
    images, targets = [], []
    for boxes, labels in (([[8.0, 10, 40, 30], [36, 34, 58, 60]], [1, 2]), ([[20.0, 6, 44, 54]], [1])):
        image = 0.1 * torch.rand(3, 64, 64, generator=g)
        for (x1, y1, x2, y2), label in zip(boxes, labels):
            image[label - 1, int(y1):int(y2), int(x1):int(x2)] = 0.9  # class 1 red, class 2 green
        images.append(image)
        targets.append({"boxes": torch.tensor(boxes), "labels": torch.tensor(labels)})
    return images, targets


def torchvision_reference(arch: str) -> nn.Module:
    """torchvision's own RetinaNet / FasterRCNN and heads, shaped like ``tiny_detector(arch)``.

    Built from torchvision parts only (``BackboneWithFPN`` at the tiny width); copy our weights in.
    """
    kw = {k: v for k, v in TINY[arch].items()
          if k not in ("backbone", "trainable_backbone_layers", "fpn_channels", "anchor_sizes", "aspect_ratios")}
    anchors = AnchorGenerator(tuple((s,) for s in ANCHOR_SIZES), (ASPECT_RATIOS,) * len(ANCHOR_SIZES))
    body = torchvision.models.resnet18(norm_layer=nn.BatchNorm2d)
    if arch == "retinanet":
        fpn = BackboneWithFPN(body, {"layer2": "0", "layer3": "1", "layer4": "2"}, [128, 256, 512], FPN_CHANNELS,
                              extra_blocks=LastLevelP6P7(FPN_CHANNELS, FPN_CHANNELS))
        return RetinaNet(fpn, NUM_CLASSES, anchor_generator=anchors, **kw)
    fpn = BackboneWithFPN(body, {f"layer{k}": str(k - 1) for k in (1, 2, 3, 4)}, [64, 128, 256, 512], FPN_CHANNELS)
    return FasterRCNN(fpn, NUM_CLASSES, rpn_anchor_generator=anchors, **kw)


def assert_same_backward_and_detections(ours: nn.Module, reference: nn.Module, ours_losses: dict,
                                        ref_losses: dict, images) -> list[dict]:
    """Backward of both loss dicts gives equal gradients, and eval-mode detections are torch.equal;
    returns our detections (the callers check how many there are)."""
    sum(ours_losses.values()).backward()
    sum(ref_losses.values()).backward()
    for (name, p), q in zip(ours.named_parameters(), reference.parameters()):
        if p.requires_grad:
            assert torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-8), name
    ours.eval(), reference.eval()
    with torch.no_grad():
        mine_all, theirs_all = ours(images), reference(images)
    assert len(mine_all) == len(theirs_all) == len(images)
    for mine, theirs in zip(mine_all, theirs_all):
        for key in ("boxes", "scores", "labels"):
            assert torch.equal(mine[key], theirs[key]), key
    return mine_all


def decode(deltas: torch.Tensor, reference: torch.Tensor, weights=(1.0, 1.0, 1.0, 1.0)) -> torch.Tensor:
    """R-CNN box decoding written out: centre + (dx / wx) * size, size * exp(dw / ww)."""
    wx, wy, ww, wh = weights
    clip = math.log(1000.0 / 16)  # torchvision's bbox_xform_clip
    w, h = reference[:, 2] - reference[:, 0], reference[:, 3] - reference[:, 1]
    cx, cy = reference[:, 0] + 0.5 * w, reference[:, 1] + 0.5 * h
    pcx, pcy = cx + deltas[:, 0] / wx * w, cy + deltas[:, 1] / wy * h
    pw = w * torch.exp((deltas[:, 2] / ww).clamp(max=clip))
    ph = h * torch.exp((deltas[:, 3] / wh).clamp(max=clip))
    return torch.stack([pcx - pw / 2, pcy - ph / 2, pcx + pw / 2, pcy + ph / 2], dim=1)


def encode(gt: torch.Tensor, reference: torch.Tensor, weights=(1.0, 1.0, 1.0, 1.0)) -> torch.Tensor:
    """R-CNN box encoding written out (the inverse of :func:`decode`)."""
    wx, wy, ww, wh = weights
    w, h = reference[:, 2] - reference[:, 0], reference[:, 3] - reference[:, 1]
    gw, gh = gt[:, 2] - gt[:, 0], gt[:, 3] - gt[:, 1]
    dx = wx * ((gt[:, 0] + 0.5 * gw) - (reference[:, 0] + 0.5 * w)) / w
    dy = wy * ((gt[:, 1] + 0.5 * gh) - (reference[:, 1] + 0.5 * h)) / h
    return torch.stack([dx, dy, ww * torch.log(gw / w), wh * torch.log(gh / h)], dim=1)


def hand_box_loss(name: str, deltas, reference, gt, weights=(1.0, 1.0, 1.0, 1.0)) -> torch.Tensor:
    """The summed loss by hand: IoU family on decoded boxes, L-norms on encoded deltas."""
    if name in IOU_LOSSES:
        pred = decode(deltas, reference, weights)
        return {"iou": boxloss.iou_loss, "giou": boxloss.giou_loss, "diou": boxloss.diou_loss,
                "ciou": boxloss.ciou_loss}[name](pred, gt, reduction="sum")
    d = deltas - encode(gt, reference, weights)
    if name == "l1":
        return d.abs().sum()
    if name == "l2":
        return (d**2).sum()
    beta = 1 / 9
    return torch.where(d.abs() < beta, 0.5 * d**2 / beta, d.abs() - 0.5 * beta).sum()


def train_steps(model: nn.Module, images, targets, steps: int, lr: float = 1e-3):
    """Adam steps on one batch; returns the list of loss dicts (detached)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    history = []
    model.train()
    for _ in range(steps):
        losses = model(images, targets)
        opt.zero_grad()
        sum(losses.values()).backward()
        for p in params:
            assert p.grad is None or torch.isfinite(p.grad).all()
        opt.step()
        history.append({k: v.detach() for k, v in losses.items()})
    return history


def best_box_ious(model: nn.Module, images, targets) -> list[float]:
    """For each ground-truth box, the IoU of the top-scoring detection of its class (0 if none)."""
    model.eval()
    with torch.no_grad():
        detections = model(images)
    model.train()
    ious = []
    for det, target in zip(detections, targets):
        for box, label in zip(target["boxes"], target["labels"]):
            same = det["labels"] == label
            if not same.any():
                ious.append(0.0)
                continue
            best = det["boxes"][same][det["scores"][same].argmax()]
            ious.append(torchvision.ops.box_iou(best[None], box[None]).item())
    return ious


def overfit_box_ious(arch: str, *, lr: float, rounds: int = 20, box_loss: str = "ciou") -> list[float]:
    """Train a seeded tiny ``arch`` on :func:`synthetic_batch` in rounds of 5 Adam steps until every
    ground-truth box is found with IoU > 0.7 (or ``rounds`` run out); returns the final best IoUs."""
    torch.manual_seed(0)
    model = tiny_detector(arch, box_loss=box_loss)
    images, targets = synthetic_batch()
    ious = []
    for _ in range(rounds):
        train_steps(model, images, targets, steps=5, lr=lr)
        ious = best_box_ious(model, images, targets)
        if min(ious) > 0.7:
            break
    return ious
