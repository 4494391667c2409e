"""The detectors' options: names, validation with one-line messages, and the default loss weights.

One home for the choices a user makes by name (box loss, head kind) and the checks every head
applies to them; :mod:`detectors.nms` holds the NMS names.
"""

from __future__ import annotations

import difflib
import inspect
import math

import torch
from torch import nn

import boxloss

from .errors import OptionError, unknown_key_message
from .nms import check_nms_options

__all__ = ["BOX_LOSSES", "DELTA_LOSSES", "IMAGE_SIZE_LOSSES", "HEAD_KINDS", "check_choice", "check_weight",
           "check_box_loss_cfg", "set_box_loss", "set_nms", "default_box_loss_weight"]

# "default" keeps torchvision's own loss; the rest are boxloss's losses by name
BOX_LOSSES = ("default",) + boxloss.LOSS_NAMES
DELTA_LOSSES = ("l1", "l2", "smooth_l1")  # compared on the encoded deltas; the others on decoded boxes
IMAGE_SIZE_LOSSES = ("mpdiou",)  # normalised by the input size of each image, which the heads pass
HEAD_KINDS = ("retinanet", "rpn", "roi")
# arguments of a loss that the head sets itself, never through box_loss_cfg
_HEAD_ARGUMENTS = ("pred", "target", "weight", "reduction", "avg_factor", "image_size", "iou_mean")


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


def _cfg_keys(box_loss: str) -> tuple:
    """The keys ``box_loss_cfg`` may hold for ``box_loss``: the options of its function (or, for
    ``wise_iou``, of :class:`boxloss.WiseIoULoss`), less what the head sets."""
    if box_loss == "wise_iou":
        params = inspect.signature(boxloss.WiseIoULoss.__init__).parameters
        return tuple(k for k in params if k not in ("self", "reduction", "loss_weight"))
    params = inspect.signature(boxloss.get_loss(box_loss)).parameters
    return tuple(k for k in params if k not in _HEAD_ARGUMENTS)


def check_box_loss_cfg(box_loss: str, cfg, prefix: str = "") -> dict:
    """``cfg`` (None or a dict of options of ``box_loss``, e.g. ``dict(inner_ratio=0.8)``) checked.

    Unknown keys are an :class:`OptionError` naming the key and the closest valid one; a bad value
    is one naming the key's check (the loss is called once on a pair of boxes to run its checks).
    """
    name = f"{prefix}box_loss_cfg"
    if cfg is None:
        return {}
    if not isinstance(cfg, dict):
        raise OptionError(f"{name} must be a dict of options of the box loss, got {cfg!r}")
    cfg = dict(cfg)
    if cfg and box_loss == "default":
        raise OptionError(f"{name} sets options of a boxloss loss; box_loss='default' takes none, got {cfg!r}")
    if box_loss == "default":
        return cfg
    valid = _cfg_keys(box_loss)
    for key in cfg:
        if key not in valid:
            raise OptionError(unknown_key_message(name, key, valid) + f" for box_loss={box_loss!r}")
    box = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    try:
        if box_loss == "wise_iou":
            boxloss.WiseIoULoss(**cfg)
        else:
            extra = {"image_size": (8.0, 8.0)} if box_loss in IMAGE_SIZE_LOSSES else {}
            boxloss.get_loss(box_loss, **cfg)(box, box + 1, **extra)
    except (TypeError, ValueError) as e:
        raise OptionError(f"{name}: {e}") from None
    return cfg


def set_box_loss(module: nn.Module, head: str, box_loss: str, loss_weight, prefix: str = "",
                 box_loss_cfg=None) -> None:
    """Validate and set ``module.box_loss``, ``module.loss_weight`` (None: the head's default) and
    ``module.box_loss_cfg`` (the loss's options).

    ``wise_iou`` also gets ``module.wise_iou``, a :class:`boxloss.WiseIoULoss` submodule whose
    running mean is in the model's state dict (saved in checkpoints, restored on resume).
    ``prefix`` names the arguments in errors as the user passed them (``"rpn_"`` for the RPN).
    """
    check_choice(f"{prefix}box_loss", box_loss, BOX_LOSSES)
    module.box_loss = box_loss
    module.box_loss_cfg = check_box_loss_cfg(box_loss, box_loss_cfg, prefix)
    if loss_weight is None:
        loss_weight = default_box_loss_weight(head, box_loss)
    module.loss_weight = check_weight(f"{prefix}box_loss_weight", loss_weight)
    if box_loss == "wise_iou":
        module.wise_iou = boxloss.WiseIoULoss(reduction="sum", **module.box_loss_cfg)
    elif "wise_iou" in module._modules:  # the loss changed: no stale running mean in the state dict
        del module.wise_iou


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
    eiou, siou, alpha_iou,      2          2      10
    wise_iou, mpdiou
    ==========================  =========  =====  =====

    Why: an IoU-family loss on decoded boxes pulls on the predicted deltas much less than an L-norm
    loss on the deltas does, by a factor the head's box-coder weights set. Measured at zero deltas on
    2,000 random anchors whose ground truth is shifted and rescaled by N(0, 0.15) of their size (loss
    about 0.4 per box), the mean |dL/d(deltas)| summed over the 4 deltas is: coder (1, 1, 1, 1)
    (RetinaNet, RPN): L1 4.0, smooth-L1 2.9, GIoU 2.4, DIoU/CIoU 2.2;
    coder (10, 10, 5, 5) (RoI head): L1 4.0, smooth-L1 3.8, GIoU 0.29, DIoU/CIoU 0.27. Weights of
    about 2 and 10-13 restore the pull of the default loss. They agree with the published
    settings: 2 is MMDetection's GIoU weight for dense anchor heads (ATSS, GFL); 10 is its IoU and
    GIoU weight in the Faster R-CNN RoI head, and 12 the CIoU weight the DIoU authors used in
    Faster R-CNN (MMDetection's ``faster-rcnn_r50_fpn_ciou_1x_coco``). The normalisation (per
    positive anchor, per sampled anchor or RoI) is torchvision's and the same for every loss of a
    head, so it does not change these ratios.

    The losses after CIoU, measured the same way (2,000 anchors of sides 16-256 px, the same
    noise; MPDIoU in a 640 x 640 image), pull within 15 % of GIoU on both coders: (1, 1, 1, 1):
    EIoU 2.4, Focal-EIoU (gamma 0.5) 1.9, SIoU 2.3, alpha-CIoU (alpha 3) 2.5, Wise-IoU v3 2.4
    (v1 2.2), MPDIoU 2.1, Inner-CIoU (0.8) 2.5, Focaler-CIoU 2.3; (10, 10, 5, 5): 0.25-0.32. So they
    take the IoU family's weights, 2 and 10 (the same script gives the figures above for L1,
    smooth-L1, GIoU, DIoU and CIoU; it is in docs/losses.md).

    Raises:
        ValueError: for an unknown ``head`` or ``box_loss``.
    """
    check_choice("head", head, HEAD_KINDS)
    if box_loss == "default" or box_loss in DELTA_LOSSES:
        return 1.0
    elif box_loss in ("iou", "giou", "diou", "eiou", "siou", "alpha_iou", "wise_iou", "mpdiou"):
        return 10.0 if head == "roi" else 2.0
    check_choice("box_loss", box_loss, BOX_LOSSES)
    return 12.0 if head == "roi" else 2.0  # ciou


