"""Faster R-CNN from detectors.build_detector: torchvision parity, hand-computed box losses in the RoI
head and the RPN, DIoU-NMS, training, weights loading and argument errors."""

import pytest
import torch
import torchvision
from det_helpers import (
    assert_same_backward_and_detections,
    overfit_box_ious,
    CUDA,
    DELTA_LOSSES,
    IOU_LOSSES,
    NUM_CLASSES,
    TINY,
    best_box_ious,
    decode,
    hand_box_loss,
    synthetic_batch,
    tiny_detector,
    torchvision_reference,
    train_steps,
)
from torch import nn
from torchvision.models.detection import roi_heads as tv_roi_heads
from torchvision.models.detection.backbone_utils import _mobilenet_extractor, _resnet_fpn_extractor

from detectors import build_detector
from detectors.errors import CheckpointError
from detectors.faster_rcnn import BoxLossFasterRCNN
from detectors.options import BOX_LOSSES, default_box_loss_weight
from detectors.models import _resolve_weights

ROI_WEIGHTS = (10.0, 10.0, 5.0, 5.0)  # torchvision's RoI box coder


def test_default_losses_and_detections_equal_torchvision():
    torch.manual_seed(0)
    ours = tiny_detector("faster_rcnn")
    reference = torchvision_reference("faster_rcnn")
    reference.load_state_dict(ours.state_dict())
    images, targets = synthetic_batch()
    torch.manual_seed(1)  # the RPN and RoI samplers draw random numbers: the same ones for both
    ours_losses = ours(images, targets)
    torch.manual_seed(1)
    ref_losses = reference(images, targets)
    assert set(ours_losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    for key in ref_losses:
        assert torch.equal(ours_losses[key], ref_losses[key]), key
    detections = assert_same_backward_and_detections(ours, reference, ours_losses, ref_losses, images)
    assert all(len(d["boxes"]) > 10 for d in detections)  # random weights: many low-score detections survive


@pytest.mark.parametrize("backbone, builder", [
    ("resnet50", torchvision.models.detection.fasterrcnn_resnet50_fpn),
    ("mobilenet_v3_large", torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn),
])
def test_seeded_build_equals_torchvision_builder(backbone, builder):
    # same modules in the same order: same weights under a seed, and torchvision's checkpoints fit
    torch.manual_seed(0)
    reference = builder(weights=None, weights_backbone=None)
    torch.manual_seed(0)
    ours = build_detector("faster_rcnn", num_classes=91, backbone=backbone)
    theirs, mine = reference.state_dict(), ours.state_dict()
    assert list(mine) == list(theirs)
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert ours.rpn.score_thresh == reference.rpn.score_thresh
    assert ours.roi_heads.box_coder.weights == reference.roi_heads.box_coder.weights


@pytest.mark.parametrize("backbone, layers", [("resnet18", 0), ("resnet18", 3), ("resnet34", 5),
                                              ("mobilenet_v3_large", 2), ("mobilenet_v3_large", 6)])
def test_trainable_backbone_layers_freeze_as_torchvision(backbone, layers):
    ours = build_detector("faster_rcnn", num_classes=2, backbone=backbone, trainable_backbone_layers=layers)
    body = getattr(torchvision.models, backbone)()
    reference = (_mobilenet_extractor(body, True, layers) if backbone.startswith("mobilenet")
                 else _resnet_fpn_extractor(body, layers))
    assert [p.requires_grad for p in ours.backbone.parameters()] == [p.requires_grad for p in reference.parameters()]


def _roi_case():
    """Two images: 5 and 3 sampled RoIs, labels (0 = background) and matched ground-truth boxes."""
    proposals = [torch.tensor([[0.0, 0, 20, 20], [10, 5, 40, 30], [30, 30, 60, 62], [5, 40, 25, 60], [0, 0, 60, 60]]),
                 torch.tensor([[12.0, 8, 30, 44], [40, 0, 63, 20], [18, 4, 46, 52]])]
    labels = [torch.tensor([1, 2, 0, 1, 0]), torch.tensor([1, 0, 1])]
    gt = [torch.tensor([[2.0, 3, 22, 18], [12, 6, 36, 34], [0, 0, 1, 1], [4, 38, 26, 58], [0, 0, 1, 1]]),
          torch.tensor([[20.0, 6, 44, 54], [0, 0, 1, 1], [20, 6, 44, 54]])]
    g = torch.Generator().manual_seed(3)
    class_logits = torch.randn(8, NUM_CLASSES, generator=g)
    box_regression = 0.5 * torch.randn(8, 4 * NUM_CLASSES, generator=g)
    return class_logits, box_regression, labels, proposals, gt


@pytest.mark.parametrize("name", IOU_LOSSES + DELTA_LOSSES)
def test_roi_box_loss_matches_hand_computation(name):
    roi_heads = tiny_detector("faster_rcnn", box_loss=name).roi_heads
    class_logits, box_regression, labels, proposals, gt = _roi_case()
    loss_cls, loss_box = roi_heads.compute_box_loss(class_logits, box_regression, labels, proposals, gt)

    all_labels, all_props, all_gt = torch.cat(labels), torch.cat(proposals), torch.cat(gt)
    pos = all_labels > 0
    deltas = box_regression.reshape(8, NUM_CLASSES, 4)[pos.nonzero()[:, 0], all_labels[pos]]  # own class
    if name in IOU_LOSSES:
        torch.testing.assert_close(decode(deltas, all_props[pos], ROI_WEIGHTS),
                                   roi_heads.box_coder.decode_single(deltas, all_props[pos]))
    expected = hand_box_loss(name, deltas, all_props[pos], all_gt[pos], ROI_WEIGHTS) / 8  # / sampled RoIs
    torch.testing.assert_close(loss_box, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss_cls, nn.functional.cross_entropy(class_logits, all_labels))
    if name == "smooth_l1":  # the same loss as torchvision's fastrcnn_loss
        targets = [roi_heads.box_coder.encode_single(g, p) for g, p in zip(gt, proposals)]
        _, tv_box = tv_roi_heads.fastrcnn_loss(class_logits, box_regression, labels, targets)
        torch.testing.assert_close(loss_box, tv_box)


def _features(model, images, targets):
    images, targets = model.transform(images, targets)
    return images, targets, model.backbone(images.tensors)


@pytest.mark.parametrize("name", ["giou", "ciou"])
def test_roi_head_loss_uses_the_sampled_proposals_and_their_matched_boxes(name):
    torch.manual_seed(0)
    model = tiny_detector("faster_rcnn", box_loss=name).train()
    with torch.no_grad():
        images, targets, features = _features(model, *synthetic_batch())
        proposals, _ = model.rpn(images, features, targets)
        torch.manual_seed(5)
        _, losses = model.roi_heads(features, proposals, images.image_sizes, targets)
        torch.manual_seed(5)  # replay the sampler
        sampled, matched_idxs, labels, regression_targets = model.roi_heads.select_training_samples(proposals, targets)
        box_features = model.roi_heads.box_head(model.roi_heads.box_roi_pool(features, sampled, images.image_sizes))
        _, box_regression = model.roi_heads.box_predictor(box_features)

    labels, sampled = torch.cat(labels), torch.cat(sampled)
    gt = torch.cat([t["boxes"][m] for t, m in zip(targets, matched_idxs)])
    pos = labels > 0
    assert pos.sum() >= 3  # every ground-truth box is a proposal of its own
    deltas = box_regression.reshape(len(labels), NUM_CLASSES, 4)[pos.nonzero()[:, 0], labels[pos]]
    # the matched boxes are the ones torchvision's regression targets encode
    torch.testing.assert_close(decode(torch.cat(regression_targets)[pos], sampled[pos], ROI_WEIGHTS), gt[pos],
                               rtol=1e-4, atol=1e-3)
    expected = default_box_loss_weight("roi", name) * hand_box_loss(name, deltas, sampled[pos], gt[pos],
                                                                     ROI_WEIGHTS) / len(labels)
    torch.testing.assert_close(losses["loss_box_reg"], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["diou", "l1"])
def test_rpn_box_loss_matches_hand_computation(name):
    rpn = tiny_detector("faster_rcnn", rpn_box_loss=name).rpn
    assert rpn.loss_weight == default_box_loss_weight("rpn", name)
    anchors = [torch.tensor([[0.0, 0, 16, 16], [8, 8, 40, 24], [0, 32, 32, 64], [40, 40, 56, 56]])] * 2
    gt = [torch.tensor([[2.0, 1, 18, 20], [10, 6, 36, 30], [0, 0, 0, 0], [0, 0, 0, 0]]),
          torch.tensor([[0.0, 0, 0, 0], [0, 0, 0, 0], [4, 30, 30, 60], [0, 0, 0, 0]])]
    labels = [torch.tensor([1.0, 1, 0, -1]), torch.tensor([0.0, 0, 1, 0])]  # 3 positives, 4 negatives
    g = torch.Generator().manual_seed(4)
    objectness, deltas = torch.randn(8, 1, generator=g), 0.3 * torch.randn(8, 4, generator=g)
    loss_obj, loss_box = rpn.compute_box_loss(objectness, deltas, labels, anchors, gt)
    # the sampler's budget (64 per image) exceeds the 7 labelled anchors: all of them are sampled
    lab, anc, gts = torch.cat(labels), torch.cat(anchors), torch.cat(gt)
    pos, sampled = lab == 1, lab >= 0
    torch.testing.assert_close(loss_box, hand_box_loss(name, deltas[pos], anc[pos], gts[pos]) / 7)
    torch.testing.assert_close(
        loss_obj, nn.functional.binary_cross_entropy_with_logits(objectness[sampled, 0], lab[sampled]))


def test_diou_nms_in_roi_postprocess_and_rpn_proposals():
    # two long boxes side by side: IoU = 70/130 = 0.54 > 0.5; centres 30 apart: rho^2/c^2 = 0.053
    boxes = torch.tensor([[0.0, 0, 100, 10], [30, 0, 130, 10]])
    class_logits = torch.tensor([[0.0, 5.0, 0.0], [0.0, 4.0, 0.0]])  # both class 1
    kept = {}
    for nms in ("iou", "diou"):
        roi_heads = tiny_detector("faster_rcnn", nms=nms).roi_heads
        (det_boxes,), _, (det_labels,) = roi_heads.postprocess_detections(
            class_logits, torch.zeros(2, 4 * NUM_CLASSES), [boxes], [(64, 200)])
        kept[nms] = det_boxes
        assert (det_labels == 1).all()
    torch.testing.assert_close(kept["iou"], boxes[:1])
    torch.testing.assert_close(kept["diou"], boxes)

    for rpn_nms, expected in (("iou", boxes[:1]), ("diou", boxes)):
        rpn = tiny_detector("faster_rcnn", rpn_nms=rpn_nms, rpn_nms_thresh=0.5).rpn.eval()
        (proposals,), _ = rpn.filter_proposals(boxes[None], torch.tensor([[2.0], [1.0]]), [(64, 200)], [2])
        torch.testing.assert_close(proposals, expected)


@pytest.mark.parametrize("box_loss", BOX_LOSSES)
def test_every_box_loss_trains_with_finite_losses(box_loss):
    # the same loss in the RPN too, so that every RPN path trains as well
    torch.manual_seed(0)
    model = tiny_detector("faster_rcnn", box_loss=box_loss, rpn_box_loss=box_loss, nms="diou", rpn_nms="diou")
    history = train_steps(model, *synthetic_batch(), steps=3)
    for losses in history:
        assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
        assert all(torch.isfinite(v) for v in losses.values())
    assert history[-1]["loss_box_reg"] > 0 and history[-1]["loss_rpn_box_reg"] > 0


@pytest.mark.slow
def test_ciou_overfits_two_images():
    ious = overfit_box_ious("faster_rcnn", lr=1e-3)  # at most 100 Adam steps; 25-50 for seeds 0-2
    assert min(ious) > 0.7, ious


def test_mobilenet_backbone_trains_and_detects():
    torch.manual_seed(0)
    model = tiny_detector("faster_rcnn", backbone="mobilenet_v3_large", anchor_sizes=(16, 32, 64),
                          box_loss="diou", nms="diou")
    (losses,) = train_steps(model, *synthetic_batch(), steps=1)
    assert all(torch.isfinite(v) for v in losses.values())
    model.eval()
    with torch.no_grad():
        assert len(model(synthetic_batch()[0])) == 2


def test_background_only_image_trains():
    torch.manual_seed(0)
    model = tiny_detector("faster_rcnn", box_loss="ciou", rpn_box_loss="giou")
    images, targets = synthetic_batch()
    targets[1] = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    (losses,) = train_steps(model, images, targets, steps=1)
    assert all(torch.isfinite(v) for v in losses.values())


def test_torchvision_faster_rcnn_is_unchanged_after_building_ours():
    fastrcnn_loss = tv_roi_heads.fastrcnn_loss
    build_detector("faster_rcnn", num_classes=NUM_CLASSES, backbone="resnet18", box_loss="ciou",
                   rpn_box_loss="ciou", nms="diou", rpn_nms="diou")
    assert tv_roi_heads.fastrcnn_loss is fastrcnn_loss
    assert fastrcnn_loss.__module__ == "torchvision.models.detection.roi_heads"
    assert tv_roi_heads.RoIHeads.forward.__module__ == "torchvision.models.detection.roi_heads"
    reference = torchvision_reference("faster_rcnn")
    assert type(reference.roi_heads) is tv_roi_heads.RoIHeads and not isinstance(reference, BoxLossFasterRCNN)


# --------------------------------------------------------------------------- weights


def test_local_checkpoint_loads_in_every_format(tmp_path):
    torch.manual_seed(0)
    source = tiny_detector("faster_rcnn")
    state = source.state_dict()
    torch.save(state, tmp_path / "plain.pth")
    torch.save({"state_dict": {"detector." + k: v for k, v in state.items()}, "meta": {"epoch": 3}},
               tmp_path / "wrapped.pth")  # an mmengine-style checkpoint of a wrapper module
    for name in ("plain.pth", "wrapped.pth"):
        torch.manual_seed(1)
        model = tiny_detector("faster_rcnn", weights=str(tmp_path / name), box_loss="ciou")
        loaded = model.state_dict()
        # detector weights imply a pretrained model: frozen batch norm by default, as torchvision,
        # which keeps the running statistics but not the batch counter
        assert isinstance(model.backbone.body.bn1, torchvision.ops.FrozenBatchNorm2d)
        assert set(state) - set(loaded) == {k for k in state if k.endswith("num_batches_tracked")}
        assert all(torch.equal(v, state[k]) for k, v in loaded.items()), name


def test_local_checkpoint_with_other_num_classes_skips_the_class_layers(tmp_path):
    torch.manual_seed(0)
    state = build_detector("faster_rcnn", num_classes=5, **TINY["faster_rcnn"]).state_dict()
    torch.save(state, tmp_path / "five.pth")
    # by default weights that do not fit are an error naming the file and the keys ...
    with pytest.raises(CheckpointError, match=r"five.pth' does not fit this model: 4 keys of another shape "
                                              r"\[roi_heads.box_predictor.cls_score.weight \[5, 1024\] vs model \[3, 1024\]"):
        tiny_detector("faster_rcnn", weights=tmp_path / "five.pth")
    # ... and partial loading is an explicit, loud opt-in
    with pytest.warns(UserWarning, match="box_predictor.cls_score.weight"):
        model = tiny_detector("faster_rcnn", weights=tmp_path / "five.pth", allow_partial_weights=True)
    loaded = model.state_dict()
    assert loaded["roi_heads.box_predictor.cls_score.weight"].shape[0] == NUM_CLASSES
    assert torch.equal(loaded["rpn.head.conv.0.0.weight"], state["rpn.head.conv.0.0.weight"])


def test_local_backbone_checkpoint(tmp_path):
    torch.manual_seed(0)
    body = torchvision.models.resnet18()
    torch.save(body.state_dict(), tmp_path / "resnet18.pth")
    model = tiny_detector("faster_rcnn", weights_backbone=tmp_path / "resnet18.pth", trainable_backbone_layers=None)
    assert torch.equal(model.backbone.body.conv1.weight, body.conv1.weight)
    assert not model.backbone.body.layer1[0].conv1.weight.requires_grad  # pretrained: 3 trainable stages
    assert model.backbone.body.layer2[0].conv1.weight.requires_grad


def test_bad_weights_raise(tmp_path):
    with pytest.raises(ValueError, match="weights='nope.pth' is neither an existing file"):
        tiny_detector("faster_rcnn", weights="nope.pth")
    with pytest.raises(ValueError, match="none for this arch and backbone"):
        tiny_detector("faster_rcnn", weights="DEFAULT")  # no torchvision weights for ResNet-18 Faster R-CNN
    with pytest.raises(ValueError, match="does not fit"):
        tiny_detector("faster_rcnn", weights=torchvision.models.detection.RetinaNet_ResNet50_FPN_Weights.COCO_V1)
    torch.save({"a": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="does not fit this model"):
        tiny_detector("faster_rcnn", weights=tmp_path / "other.pth")
    torch.save({"state_dict": {}, "meta": {"seed": Ellipsis}}, tmp_path / "pickled.pth")  # not plain data
    with pytest.raises(ValueError, match="weights_only=True.*if you trust it"):
        tiny_detector("faster_rcnn", weights=tmp_path / "pickled.pth")


def test_weight_names_resolve_to_torchvision_enums():
    # resolution only: the download itself needs the internet
    enums = (torchvision.models.detection.FasterRCNN_ResNet50_FPN_Weights,)
    assert _resolve_weights("weights", "DEFAULT", enums) is enums[0].COCO_V1
    assert _resolve_weights("weights", "FasterRCNN_ResNet50_FPN_Weights.COCO_V1", enums) is enums[0].COCO_V1
    assert _resolve_weights("weights", enums[0].COCO_V1, enums) is enums[0].COCO_V1
    resnet = (torchvision.models.ResNet18_Weights,)
    assert _resolve_weights("weights_backbone", "IMAGENET1K_V1", resnet) is resnet[0].IMAGENET1K_V1


# --------------------------------------------------------------------------- arguments


@pytest.mark.parametrize("kwargs, match", [
    (dict(arch="yolo"), r"arch must be one of 'retinanet', 'faster_rcnn'; got 'yolo'"),
    (dict(backbone="vgg16"), r"backbone must be one of .*'mobilenet_v3_large'; got 'vgg16'"),
    (dict(box_loss="piou"), r"box_loss must be one of 'default', 'l1'.*'mpdiou'; got 'piou'"),
    (dict(nms="fast"), r"nms must be one of 'iou', 'diou', 'soft', 'soft-diou', 'weighted'; got 'fast'"),
    (dict(rpn_box_loss="L1"), r"rpn_box_loss must be one of .*; got 'L1'"),
    (dict(rpn_nms="greedy"), r"rpn_nms must be one of 'iou', .*'weighted'; got 'greedy'"),
    (dict(soft_nms_sigma=0.0), r"soft_nms_sigma must be a finite number > 0, got 0.0"),
    (dict(nms_beta=0), r"nms_beta must be a finite number > 0, got 0"),
    (dict(box_loss_weight=-1.0), r"box_loss_weight must be a finite number >= 0, got -1.0"),
    (dict(num_classes=1), r"num_classes must be an integer >= 2 for faster_rcnn, got 1"),
    (dict(trainable_backbone_layers=7), r"trainable_backbone_layers must be an integer in \[0, 5\]"),
    (dict(anchor_sizes=(8, 16)), r"anchor_sizes must have one entry per feature level \(5 for faster_rcnn"),
    (dict(anchor_sizes=((8, 16), 32, 64, 128, 256)), r"anchor_sizes must give every level the same number"),
    (dict(arch="retinanet", rpn_box_loss="giou"), r"rpn_box_loss cannot be passed with arch='retinanet'"),
])
def test_bad_arguments_raise_naming_the_argument(kwargs, match):
    args = dict(arch="faster_rcnn", num_classes=NUM_CLASSES, backbone="resnet18")
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        build_detector(args.pop("arch"), **args)


@pytest.mark.cuda
@CUDA
@pytest.mark.parametrize("box_loss", ["default", "ciou"])
def test_one_training_step_on_cuda(box_loss):
    torch.manual_seed(0)
    model = tiny_detector("faster_rcnn", box_loss=box_loss, rpn_box_loss=box_loss, nms="diou").cuda()
    images, targets = synthetic_batch()
    images = [i.cuda() for i in images]
    targets = [{k: v.cuda() for k, v in t.items()} for t in targets]
    (losses,) = train_steps(model, images, targets, steps=1)
    assert all(torch.isfinite(v) for v in losses.values())
    model.eval()
    with torch.no_grad():
        assert model(images)[0]["boxes"].is_cuda
