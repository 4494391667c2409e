"""Build torchvision RetinaNet and Faster R-CNN with any box loss and DIoU-NMS.

    model = build_detector("faster_rcnn", num_classes=81, backbone="resnet50", box_loss="ciou", nms="diou")
    losses = model(images, targets)          # train mode: {"loss_classifier": ..., "loss_box_reg": ...}
    detections = model.eval()(images)        # eval mode: [{"boxes", "scores", "labels"}, ...]

The architectures live in :mod:`detectors.retinanet` and :mod:`detectors.faster_rcnn`, the options
in :mod:`detectors.options`; this module chooses backbones, anchors and weights.
"""

from __future__ import annotations

import functools
import inspect
import os
import warnings
from pathlib import Path
from urllib.error import URLError

import torch
import torchvision
from torch import nn
from torchvision.models import detection as tv_detection
from torchvision.models._api import WeightsEnum
from torchvision.models.detection._utils import overwrite_eps
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from .checkpoint import load_weights, read_checkpoint, state_dict_of
from .errors import CheckpointError, OptionError, check_known_keys
from .nms import check_nms_options
from .faster_rcnn import BoxLossFasterRCNN
from .options import BOX_LOSSES, check_choice
from .retinanet import BoxLossRetinaNet, BoxLossRetinaNetHead

__all__ = ["ARCHS", "BACKBONES", "build_detector"]

ARCHS = ("retinanet", "faster_rcnn")
BACKBONES = ("resnet18", "resnet34", "resnet50", "mobilenet_v3_large")

# Options build_detector consumes itself; everything else goes to torchvision's model class.
_RPN_OPTIONS = ("rpn_box_loss", "rpn_box_loss_weight", "rpn_box_loss_cfg", "rpn_nms")
_COMMON_OPTIONS = ("arch", "num_classes", "backbone", "box_loss", "box_loss_weight", "box_loss_cfg", "nms", "nms_beta",
                   "soft_nms_sigma", "weights",
                   "weights_backbone", "allow_partial_weights", "progress", "trainable_backbone_layers",
                   "norm_layer", "fpn_channels", "returned_layers", "anchor_sizes", "aspect_ratios")
_OWN_OPTIONS = {
    "retinanet": _COMMON_OPTIONS + ("head_norm_groups",),
    "faster_rcnn": _COMMON_OPTIONS + _RPN_OPTIONS,
}


def _constructor_options(*classes) -> tuple:
    names = []
    for cls in classes:
        for name, p in inspect.signature(cls.__init__).parameters.items():
            if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and name not in ("self", "backbone", "num_classes"):
                names.append(name)
    return tuple(names) + ("_skip_resize",)  # GeneralizedRCNNTransform reads it from **kwargs


_TORCHVISION_OPTIONS = {
    "retinanet": _constructor_options(tv_detection.RetinaNet, GeneralizedRCNNTransform),
    "faster_rcnn": _constructor_options(tv_detection.FasterRCNN, GeneralizedRCNNTransform),
}


def build_detector(
    arch: str,
    *,
    num_classes: int,
    backbone: str = "resnet50",
    box_loss: str = "default",
    box_loss_weight: float | None = None,
    box_loss_cfg: dict | None = None,
    nms: str = "iou",
    nms_beta: float = 1.0,
    soft_nms_sigma: float = 0.5,
    weights=None,
    weights_backbone=None,
    allow_partial_weights: bool = False,
    **kwargs,
) -> nn.Module:
    """A torchvision RetinaNet or Faster R-CNN (FPN) with the box loss and NMS chosen by name.

    The model behaves like torchvision's: ``model(images, targets)`` in train mode returns a dict of
    losses whose keys start with ``loss_`` (RetinaNet: ``loss_classifier``, ``loss_box_reg``;
    Faster R-CNN: also ``loss_objectness``, ``loss_rpn_box_reg``), and ``model(images)`` in eval
    mode returns one ``{"boxes", "scores", "labels"}`` dict per image. Its state-dict keys are
    torchvision's, so torchvision checkpoints load and ours load into torchvision.

    Box losses. ``default`` keeps torchvision's own loss exactly (RetinaNet: L1 on the deltas,
    Faster R-CNN: smooth-L1 with beta = 1/9). ``l1``, ``l2`` and ``smooth_l1`` (beta = 1/9) act on
    the encoded deltas; ``iou``, ``giou``, ``diou`` and ``ciou`` on the boxes decoded from the
    deltas (with the head's box coder) against the anchors (RetinaNet) or the sampled proposals
    (Faster R-CNN RoI head), compared with the matched ground-truth boxes. Each head normalises as
    torchvision does (RetinaNet: per positive anchor; RoI head: per sampled RoI). The RetinaNet
    classification loss is :func:`boxloss.sigmoid_focal_loss` (alpha 0.25, gamma 2).

    Default ``box_loss_weight`` (None), per head (see :func:`detectors.options.default_box_loss_weight`):

    ==========================  =========  =====================  ==================
    box_loss                    RetinaNet  Faster R-CNN RoI head  RPN (rpn_box_loss)
    ==========================  =========  =====================  ==================
    default, l1, l2, smooth_l1  1          1                      1
    iou, giou, diou             2          10                     2
    ciou                        2          12                     2
    eiou, siou, alpha_iou,      2          10                     2
    wise_iou, mpdiou
    ==========================  =========  =====================  ==================

    IoU-family losses pull on the deltas less than L-norm losses, by a factor the box coder sets
    (RetinaNet and RPN (1, 1, 1, 1): about 1.5x; RoI head (10, 10, 5, 5): about 13x); the weights
    restore the default loss's pull and match MMDetection's and the DIoU authors' settings.

    Args:
        arch: ``"retinanet"`` or ``"faster_rcnn"``.
        num_classes: number of classes including the background index 0 (torchvision's
            convention, 91 for COCO's category ids).
        backbone: ``"resnet18"``, ``"resnet34"``, ``"resnet50"`` or ``"mobilenet_v3_large"``, each
            with an FPN as torchvision builds it (RetinaNet: P3-P7; Faster R-CNN: ResNet P2-P6,
            MobileNetV3 two levels + pool).
        box_loss: ``"default"`` or a name of :data:`boxloss.LOSS_NAMES` (``"l1"``, ``"l2"``,
            ``"smooth_l1"``, ``"iou"``, ``"giou"``, ``"diou"``, ``"ciou"``, ``"eiou"``, ``"siou"``,
            ``"alpha_iou"``, ``"wise_iou"``, ``"mpdiou"``): RetinaNet's regression head or Faster
            R-CNN's RoI box head. ``mpdiou`` is normalised by the input size of each image;
            ``wise_iou`` keeps its running mean in the model's state dict.
        box_loss_weight: multiplies that loss; None takes the table above.
        box_loss_cfg: options of that loss as a dict, e.g. ``dict(inner_ratio=0.8)`` (Inner-IoU),
            ``dict(focaler=(0.0, 0.95))``, ``dict(alpha=3.0, kind="ciou")``, ``dict(version=3,
            momentum=0.01)`` (``wise_iou``: :class:`boxloss.WiseIoULoss`); unknown keys and bad
            values are an :class:`~detectors.errors.OptionError` naming them.
        nms: the per-class NMS of the detections, one of :data:`detectors.nms.NMS_NAMES`:
            ``"iou"`` (torchvision's), ``"diou"`` (:func:`boxloss.batched_diou_nms`), ``"soft"``
            and ``"soft-diou"`` (gaussian Soft-NMS with the IoU or DIoU overlap), ``"weighted"``
            (merge NMS); the threshold stays torchvision's ``nms_thresh`` / ``box_nms_thresh`` (0.5).
        nms_beta: DIoU-NMS suppresses when IoU - (rho^2 / c^2)^beta > threshold.
        soft_nms_sigma: gaussian width of Soft-NMS (0.5, the paper's).
        weights: detector weights: a torchvision enum member or its name (``"DEFAULT"``,
            ``"COCO_V1"``; RetinaNet ResNet-50, Faster R-CNN ResNet-50 and MobileNetV3 only), or
            the path of a local checkpoint readable by ``torch.load(weights_only=True)``: a state
            dict, or a dict with a ``"state_dict"`` or ``"model"`` entry; keys may carry one common
            prefix (``module.`` from DDP, a wrapper's attribute such as ``detector.``). Weights that
            do not fit the model exactly (missing, unexpected or mis-shaped keys) raise
            :class:`~detectors.errors.CheckpointError`, unless ``allow_partial_weights``.
        allow_partial_weights: load the tensors of ``weights`` that fit and skip the rest with a
            warning listing them: fine-tuning with another ``num_classes`` (the class layers differ).
        weights_backbone: ImageNet weights of the backbone: an enum member or name of the
            torchvision classification model (``"IMAGENET1K_V1"``), or a local path of its state
            dict. Ignored (as torchvision) when ``weights`` is given.
        **kwargs: these are used here:

            * ``trainable_backbone_layers``: backbone stages left trainable (ResNet 0-5, MobileNet
              0-6); default 3 with pretrained weights, else all. Unlike torchvision it is honoured
              without pretrained weights too (small models freeze for speed).
            * ``norm_layer``: backbone normalisation; default ``FrozenBatchNorm2d`` with pretrained
              weights, else ``nn.BatchNorm2d`` (torchvision's rule).
            * ``fpn_channels``: width of the FPN and so of the heads (default 256, torchvision's);
              narrower for small CPU models.
            * ``returned_layers``: ResNet stages feeding the FPN, e.g. ``[2, 3]`` (default
              torchvision's: ``[2, 3, 4]`` for RetinaNet, whose P6/P7 extra levels then grow from
              the last one, ``[1, 2, 3, 4]`` for Faster R-CNN). Stages after the last one are not
              built into the model: ``[2, 3]`` drops layer4 (on ResNet-18 three quarters of the
              weights and a sixth of an epoch of the shapes recipe, docs/training.md).
            * ``head_norm_groups``: RetinaNet only: GroupNorm with this many groups after every
              head convolution (torchvision's ``retinanet_resnet50_fpn_v2`` uses 32); default
              None, no normalisation as in v1. Normalised heads train much faster from scratch.
            * ``anchor_sizes``: one tuple of sizes per feature level (or one size per level), and
              ``aspect_ratios`` (default ``(0.5, 1.0, 2.0)``) for every level.
            * ``rpn_box_loss`` (default ``"default"``: torchvision's smooth-L1),
              ``rpn_box_loss_weight``, ``rpn_box_loss_cfg``, ``rpn_nms`` (any NMS name, for the
              proposals): Faster R-CNN only.
            * ``progress``: show download progress of torchvision weights.

            Every other keyword goes to torchvision's ``RetinaNet`` / ``FasterRCNN`` (``min_size``,
            ``max_size``, ``score_thresh``, ``nms_thresh``, ``box_batch_size_per_image``, ...).

    Returns:
        A :class:`~detectors.retinanet.BoxLossRetinaNet` or :class:`~detectors.faster_rcnn.BoxLossFasterRCNN`.

    Raises:
        OptionError (a ValueError): an unknown ``arch``, ``backbone``, ``box_loss``, ``nms`` or
            keyword (the message names it and the closest valid one), or a bad number.
        CheckpointError (a ValueError): weights that cannot be read, cannot be downloaded, or do
            not fit the model.

    References:
        Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017, arXiv:1708.02002.
        Ren et al., "Faster R-CNN", NeurIPS 2015, arXiv:1506.01497.
        Zheng et al., "Distance-IoU Loss", AAAI 2020, arXiv:1911.08287 (DIoU/CIoU loss, DIoU-NMS).
    """
    check_choice("arch", arch, ARCHS)
    check_choice("backbone", backbone, BACKBONES)
    check_choice("box_loss", box_loss, BOX_LOSSES)
    check_nms_options(nms, nms_beta, soft_nms_sigma)
    min_classes = 2 if arch == "faster_rcnn" else 1
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < min_classes:
        raise OptionError(f"num_classes must be an integer >= {min_classes} for {arch}, got {num_classes!r}")
    if arch == "retinanet":
        for key in _RPN_OPTIONS + ("head",):
            if key in kwargs:
                raise OptionError(f"{key} cannot be passed with arch='retinanet'"
                                 + (": build_detector builds the head" if key == "head" else ""))
    anchor_key = "anchor_generator" if arch == "retinanet" else "rpn_anchor_generator"
    if anchor_key in kwargs and "anchor_sizes" in kwargs:
        raise OptionError(f"give anchor_sizes or {anchor_key}, not both")
    progress = kwargs.pop("progress", True)
    trainable_layers = kwargs.pop("trainable_backbone_layers", None)
    norm_layer = kwargs.pop("norm_layer", None)
    fpn_channels = kwargs.pop("fpn_channels", 256)
    returned_layers = kwargs.pop("returned_layers", None)
    if returned_layers is not None:
        if backbone == "mobilenet_v3_large":
            raise OptionError("returned_layers is a ResNet option, got it with backbone='mobilenet_v3_large'")
        rl = list(returned_layers) if isinstance(returned_layers, (list, tuple)) else None
        if (not rl or any(isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 4 for k in rl)
                or rl != sorted(set(rl)) or (arch == "retinanet" and len(rl) < 1)):
            raise OptionError(f"returned_layers must be increasing ResNet stages from 1-4, e.g. [2, 3], "
                             f"got {returned_layers!r}")
        returned_layers = rl
    head_norm_groups = kwargs.pop("head_norm_groups", None)
    if arch != "retinanet" and head_norm_groups is not None:
        raise OptionError(f"head_norm_groups is a RetinaNet option, got it with arch={arch!r}")
    if head_norm_groups is not None and (
        isinstance(head_norm_groups, bool) or not isinstance(head_norm_groups, int) or head_norm_groups < 1
        or fpn_channels % head_norm_groups
    ):
        raise OptionError(f"head_norm_groups must be a positive divisor of fpn_channels={fpn_channels}, "
                         f"got {head_norm_groups!r}")
    anchor_sizes = kwargs.pop("anchor_sizes", None)
    aspect_ratios = kwargs.pop("aspect_ratios", (0.5, 1.0, 2.0))
    # torchvision's constructors hand unknown keywords to their transform, which ignores them: a
    # typo ("score_tresh") would silently keep the default, so every remaining key is checked here.
    check_known_keys("", kwargs, _TORCHVISION_OPTIONS[arch] + _OWN_OPTIONS[arch])

    detector_weights = _resolve_weights("weights", weights, _detector_weight_enums(arch, backbone))
    if detector_weights is not None and weights_backbone is not None:
        warnings.warn("weights_backbone is ignored when weights is given (the detector weights include the backbone)")
        weights_backbone = None
    backbone_weights = _resolve_weights("weights_backbone", weights_backbone, (_backbone_weight_enum(backbone),))
    is_trained = detector_weights is not None or backbone_weights is not None
    if norm_layer is None:
        norm_layer = FrozenBatchNorm2d if is_trained else nn.BatchNorm2d

    body = _backbone_body(backbone, backbone_weights, norm_layer, progress)
    fpn = _with_fpn(arch, backbone, body, trainable_layers, is_trained, fpn_channels, returned_layers)
    if returned_layers is not None:  # + P6, P7 (RetinaNet) or + the pooled level (Faster R-CNN)
        num_levels = len(returned_layers) + (2 if arch == "retinanet" else 1)
    else:
        num_levels = 5 if arch == "retinanet" or backbone != "mobilenet_v3_large" else 3
    anchor_generator = _anchor_generator(arch, backbone, anchor_sizes, aspect_ratios, num_levels)

    if arch == "retinanet":
        anchor_generator = kwargs.pop("anchor_generator", anchor_generator)
        head_norm = None if head_norm_groups is None else functools.partial(nn.GroupNorm, head_norm_groups)
        head = BoxLossRetinaNetHead(
            fpn.out_channels, anchor_generator.num_anchors_per_location()[0], num_classes, norm_layer=head_norm,
            box_loss=box_loss, box_loss_weight=box_loss_weight, box_loss_cfg=box_loss_cfg,
        )
        model = BoxLossRetinaNet(
            fpn, num_classes, anchor_generator=anchor_generator, head=head, nms=nms, nms_beta=nms_beta,
            soft_nms_sigma=soft_nms_sigma, **kwargs
        )
    else:
        kwargs.setdefault("rpn_anchor_generator", anchor_generator)
        if backbone == "mobilenet_v3_large":
            kwargs.setdefault("rpn_score_thresh", 0.05)  # as torchvision's fasterrcnn_mobilenet_v3_large_fpn
        model = BoxLossFasterRCNN(
            fpn, num_classes, box_loss=box_loss, box_loss_weight=box_loss_weight, box_loss_cfg=box_loss_cfg,
            nms=nms, nms_beta=nms_beta, soft_nms_sigma=soft_nms_sigma,
            **kwargs,
        )

    if isinstance(detector_weights, WeightsEnum):
        state_dict = _download(lambda: detector_weights.get_state_dict(progress=progress, check_hash=True),
                               detector_weights)
        load_weights(model, state_dict, str(detector_weights), allow_partial=allow_partial_weights)
        if detector_weights in (tv_detection.RetinaNet_ResNet50_FPN_Weights.COCO_V1,
                                tv_detection.FasterRCNN_ResNet50_FPN_Weights.COCO_V1):
            overwrite_eps(model, 0.0)  # these were trained with FrozenBatchNorm2d eps = 0 (as torchvision)
    elif detector_weights is not None:
        load_weights(model, _read_state_dict(detector_weights), str(detector_weights),
                     allow_partial=allow_partial_weights)
    return model


# --------------------------------------------------------------------------- backbones and anchors


def _backbone_body(backbone: str, weights, norm_layer, progress: bool) -> nn.Module:
    """The classification network, with ImageNet weights from an enum or a local state dict."""
    enum = weights if isinstance(weights, WeightsEnum) else None
    if backbone in ("resnet18", "resnet34", "resnet50"):
        body = _download(lambda: getattr(torchvision.models, backbone)(weights=enum, progress=progress,
                                                                       norm_layer=norm_layer), enum)
    else:
        body = _download(lambda: torchvision.models.mobilenet_v3_large(weights=enum, progress=progress,
                                                                       norm_layer=norm_layer), enum)
    if isinstance(weights, Path):
        state_dict = _read_state_dict(weights)
        try:
            body.load_state_dict(state_dict)
        except RuntimeError as e:
            raise CheckpointError(f"weights_backbone {str(weights)!r} does not fit {backbone}: {e}") from e
    return body


def _with_fpn(arch: str, backbone: str, body: nn.Module, trainable_layers, is_trained: bool,
              fpn_channels: int, returned_layers: list | None = None) -> BackboneWithFPN:
    """An FPN over ``body`` with the levels and extra blocks of torchvision's RetinaNet / Faster R-CNN."""
    max_layers = 6 if backbone == "mobilenet_v3_large" else 5
    if trainable_layers is None:
        trainable_layers = 3 if is_trained else max_layers
    if isinstance(trainable_layers, bool) or not isinstance(trainable_layers, int) or not 0 <= trainable_layers <= max_layers:
        raise OptionError(
            f"trainable_backbone_layers must be an integer in [0, {max_layers}] for {backbone}, got {trainable_layers!r}"
        )
    if isinstance(fpn_channels, bool) or not isinstance(fpn_channels, int) or fpn_channels < 1:
        raise OptionError(f"fpn_channels must be a positive integer, got {fpn_channels!r}")
    if arch == "retinanet":
        # P3-P5 from the backbone, P6 and P7 from P5 (torchvision's retinanet_resnet50_fpn)
        extra_blocks = LastLevelP6P7(fpn_channels, fpn_channels)
        if backbone == "mobilenet_v3_large":
            return _mobilenet_fpn(body, trainable_layers, [3, 4, 5], extra_blocks, fpn_channels)
        return _resnet_fpn(body, trainable_layers, returned_layers or [2, 3, 4], extra_blocks, fpn_channels)
    if backbone == "mobilenet_v3_large":  # as fasterrcnn_mobilenet_v3_large_fpn: 2 levels + pool
        return _mobilenet_fpn(body, trainable_layers, [4, 5], None, fpn_channels)
    return _resnet_fpn(body, trainable_layers, returned_layers or [1, 2, 3, 4], None, fpn_channels)  # P2-P5 + pool


# torchvision's private _resnet_fpn_extractor / _mobilenet_extractor fix the FPN width at 256; these
# two build the same modules in the same order (a seeded build equals torchvision's builders, see the
# tests) with the width as a parameter, so that small CPU models can use a narrower FPN and heads.


def _resnet_fpn(body, trainable_layers: int, returned_layers: list, extra_blocks, out_channels: int):
    trainable = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
    if trainable_layers == 5:
        trainable.append("bn1")
    for name, parameter in body.named_parameters():
        if not name.startswith(tuple(trainable)):
            parameter.requires_grad_(False)
    return_layers = {f"layer{k}": str(i) for i, k in enumerate(returned_layers)}
    in_channels = [body.inplanes // 8 * 2 ** (k - 1) for k in returned_layers]  # 64 * 2^k (x4 for Bottleneck)
    return BackboneWithFPN(body, return_layers, in_channels, out_channels, extra_blocks=extra_blocks)


def _mobilenet_fpn(body, trainable_layers: int, returned_stages: list, extra_blocks, out_channels: int):
    features = body.features
    # stage boundaries: the first block, every strided block, the last block
    stages = [0] + [i for i, b in enumerate(features) if getattr(b, "_is_cn", False)] + [len(features) - 1]
    freeze_before = len(features) if trainable_layers == 0 else stages[len(stages) - trainable_layers]
    for block in features[:freeze_before]:
        for parameter in block.parameters():
            parameter.requires_grad_(False)
    return_layers = {str(stages[k]): str(i) for i, k in enumerate(returned_stages)}
    in_channels = [features[stages[k]].out_channels for k in returned_stages]
    return BackboneWithFPN(features, return_layers, in_channels, out_channels, extra_blocks=extra_blocks)


def _anchor_generator(arch: str, backbone: str, anchor_sizes, aspect_ratios, num_levels: int) -> AnchorGenerator:
    """torchvision's anchors for the architecture, or the sizes and ratios given (one entry per level)."""
    if anchor_sizes is None:
        if arch == "retinanet":
            # 3 scales per octave, as torchvision's RetinaNet
            anchor_sizes = tuple((x, int(x * 2 ** (1.0 / 3)), int(x * 2 ** (2.0 / 3))) for x in (32, 64, 128, 256, 512))
        elif backbone == "mobilenet_v3_large":
            anchor_sizes = ((32, 64, 128, 256, 512),) * 3
        else:
            anchor_sizes = ((32,), (64,), (128,), (256,), (512,))
    else:
        try:
            anchor_sizes = tuple((s,) if isinstance(s, (int, float)) else tuple(s) for s in anchor_sizes)
        except TypeError:
            raise OptionError(f"anchor_sizes must be a sequence with one entry per feature level, got {anchor_sizes!r}") from None
        if len(anchor_sizes) != num_levels:
            raise OptionError(
                f"anchor_sizes must have one entry per feature level ({num_levels} for {arch} with {backbone}), "
                f"got {len(anchor_sizes)}: {anchor_sizes!r}"
            )
        if len({len(s) for s in anchor_sizes}) != 1:  # the heads predict one fixed anchor count per location
            raise OptionError(f"anchor_sizes must give every level the same number of sizes, got {anchor_sizes!r}")
    return AnchorGenerator(anchor_sizes, (tuple(aspect_ratios),) * len(anchor_sizes))


# --------------------------------------------------------------------------- weights


def _detector_weight_enums(arch: str, backbone: str) -> tuple:
    """torchvision's detector weight enums whose architecture this (arch, backbone) rebuilds."""
    if arch == "retinanet" and backbone == "resnet50":
        return (tv_detection.RetinaNet_ResNet50_FPN_Weights,)
    elif arch == "faster_rcnn" and backbone == "resnet50":
        return (tv_detection.FasterRCNN_ResNet50_FPN_Weights,)
    elif arch == "faster_rcnn" and backbone == "mobilenet_v3_large":
        return (tv_detection.FasterRCNN_MobileNet_V3_Large_FPN_Weights,
                tv_detection.FasterRCNN_MobileNet_V3_Large_320_FPN_Weights)
    return ()


def _backbone_weight_enum(backbone: str) -> type:
    if backbone == "resnet18":
        return torchvision.models.ResNet18_Weights
    elif backbone == "resnet34":
        return torchvision.models.ResNet34_Weights
    elif backbone == "resnet50":
        return torchvision.models.ResNet50_Weights
    return torchvision.models.MobileNet_V3_Large_Weights


def _resolve_weights(name: str, value, enums: tuple):
    """None, a member of one of ``enums``, or the Path of an existing local file."""
    if value is None:
        return None
    valid = ", ".join(f"{e.__name__}.{m}" for e in enums for m in e.__members__) or "none for this arch and backbone"
    if isinstance(value, WeightsEnum):
        if not isinstance(value, enums):
            raise OptionError(f"{name}={value} does not fit this architecture; valid enums: {valid}, or a local path")
        return value
    if isinstance(value, (str, os.PathLike)):
        path = Path(value).expanduser()
        if path.is_file():
            return path
        if isinstance(value, str):
            for enum in enums:
                try:
                    return enum.verify(value)
                except KeyError:
                    pass
        raise OptionError(f"{name}={value!r} is neither an existing file nor a weights name; valid names: {valid}")
    raise TypeError(f"{name} must be None, a torchvision weights enum, a name or a path, got {type(value).__name__}")


def _read_state_dict(path: Path) -> dict:
    """A state dict from a local weights file, read with ``weights_only=True`` (never runs pickled code)."""
    return state_dict_of(read_checkpoint(path, trusted=False), str(path))


def _download(build, weights):
    """Run ``build`` (which may download ``weights``); offline, say where the file must go instead."""
    try:
        return build()
    except (URLError, OSError) as e:
        if weights is None or isinstance(e, FileNotFoundError):
            raise
        raise CheckpointError(
            f"cannot download the torchvision weights {weights} ({type(e).__name__}: {e}); offline, put the file "
            f"{os.path.basename(weights.url)} in torch's hub cache {os.path.join(torch.hub.get_dir(), 'checkpoints')} "
            f"(TORCH_HOME moves it), or pass the path of a local state dict instead of the name"
        ) from e
