"""RetinaNet from detectors.build_detector: torchvision parity, hand-computed box losses, DIoU-NMS, training."""

import math

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
    best_box_ious,
    decode,
    hand_box_loss,
    synthetic_batch,
    tiny_detector,
    torchvision_reference,
    train_steps,
)
from torchvision.models.detection.retinanet import RetinaNetRegressionHead

import boxloss
from detectors import build_detector
from detectors.options import BOX_LOSSES, default_box_loss_weight
from detectors.retinanet import BoxLossRetinaNet


def test_default_loss_and_detections_equal_torchvision():
    torch.manual_seed(0)
    ours = tiny_detector("retinanet", score_thresh=0.0)  # score 0: random weights still give detections
    # torchvision emits the background label 0 at score 0 (ours never does): a background logit of
    # -1000 (sigmoid exactly 0) keeps it out of both, so the rest must match exactly
    with torch.no_grad():
        ours.head.classification_head.cls_logits.bias[0::NUM_CLASSES] = -1000.0
    reference = torchvision_reference("retinanet")
    reference.score_thresh = 0.0
    ours.detections_per_img = reference.detections_per_img = 200
    reference.load_state_dict(ours.state_dict())
    images, targets = synthetic_batch()

    ours_losses, ref_losses = ours(images, targets), reference(images, targets)
    assert set(ours_losses) == {"loss_classifier", "loss_box_reg"}
    assert torch.equal(ours_losses["loss_classifier"], ref_losses["classification"])
    assert torch.equal(ours_losses["loss_box_reg"], ref_losses["bbox_regression"])
    detections = assert_same_backward_and_detections(ours, reference, ours_losses, ref_losses, images)
    # detections_per_img: the comparison covers the NMS
    assert [len(d["boxes"]) for d in detections] == [200] * len(images)


def test_background_is_never_a_detection():
    """An untrained model at score_thresh=0 scores every label; label 0 (background) must not come out
    (it crashed the COCO metric with KeyError: 0), while every foreground label can."""
    torch.manual_seed(0)
    model = tiny_detector("retinanet", score_thresh=0.0).eval()
    with torch.no_grad():  # make background the most confident label everywhere
        model.head.classification_head.cls_logits.bias[0::NUM_CLASSES] = 10.0
        detections = model(synthetic_batch()[0])
    labels = torch.cat([d["labels"] for d in detections])
    assert len(labels) > 0
    assert labels.min() >= 1 and labels.max() <= NUM_CLASSES - 1
    assert set(labels.tolist()) == set(range(1, NUM_CLASSES))


def test_seeded_build_equals_torchvision_resnet50_builder():
    # same modules in the same order: same weights under a seed, and torchvision's checkpoints fit
    torch.manual_seed(0)
    reference = torchvision.models.detection.retinanet_resnet50_fpn(weights=None, weights_backbone=None)
    torch.manual_seed(0)
    ours = build_detector("retinanet", num_classes=91, backbone="resnet50")
    theirs = reference.state_dict()
    mine = ours.state_dict()
    assert list(mine) == list(theirs)
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)


def _regression_case():
    """Two images with the same 6 anchors, matched to 2 and 1 boxes (-1 background, -2 ignored)."""
    grid = torch.tensor([[0.0, 0, 10, 10], [5, 5, 25, 15], [20, 20, 40, 50], [0, 30, 16, 38], [8, 8, 24, 24],
                         [30, 0, 60, 30]])
    anchors = [grid, grid.clone()]
    matched = [torch.tensor([0, -1, 1, -2, 0, 1]), torch.tensor([-1, 0, -1, -1, -2, -1])]
    targets = [
        {"boxes": torch.tensor([[2.0, 3, 20, 18], [22, 18, 45, 52]]), "labels": torch.tensor([1, 2])},
        {"boxes": torch.tensor([[6.0, 2, 21, 14]]), "labels": torch.tensor([1])},
    ]
    deltas = 0.3 * torch.randn(2, 6, 4, generator=torch.Generator().manual_seed(1))
    return anchors, matched, targets, deltas


@pytest.mark.parametrize("name", IOU_LOSSES + DELTA_LOSSES)
def test_box_loss_matches_hand_computation(name):
    head = tiny_detector("retinanet", box_loss=name).head.regression_head
    anchors, matched, targets, deltas = _regression_case()
    deltas.requires_grad_(True)
    loss = head.compute_loss(targets, {"bbox_regression": deltas}, anchors, matched)

    per_image = []
    for i in range(2):
        fg = matched[i] >= 0
        gt = targets[i]["boxes"][matched[i][fg]]
        if name in IOU_LOSSES:  # the written-out decoder agrees with the head's box coder
            torch.testing.assert_close(decode(deltas[i][fg], anchors[i][fg]),
                                       head.box_coder.decode_single(deltas[i][fg], anchors[i][fg]))
        per_image.append(hand_box_loss(name, deltas[i][fg], anchors[i][fg], gt) / fg.sum())
    expected = default_box_loss_weight("retinanet", name) * (per_image[0] + per_image[1]) / 2
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    (grad,) = torch.autograd.grad(loss, deltas)
    foreground = torch.stack(matched) >= 0
    assert (grad[foreground] != 0).any() and (grad[~foreground] == 0).all()  # only matched anchors learn


def test_box_loss_weight_scales_the_loss_and_empty_images_give_zero():
    anchors, matched, targets, deltas = _regression_case()
    outputs = {"bbox_regression": deltas}
    unit = tiny_detector("retinanet", box_loss="giou", box_loss_weight=1.0).head.regression_head
    tripled = tiny_detector("retinanet", box_loss="giou", box_loss_weight=3.0).head.regression_head
    torch.testing.assert_close(tripled.compute_loss(targets, outputs, anchors, matched),
                               3 * unit.compute_loss(targets, outputs, anchors, matched))
    no_match = [torch.full_like(m, -1) for m in matched]
    deltas.requires_grad_(True)
    loss = unit.compute_loss(targets, outputs, anchors, no_match)
    assert loss.item() == 0 and loss.requires_grad


def test_classification_loss_is_boxloss_focal_with_torchvision_normalisation():
    head = tiny_detector("retinanet").head.classification_head
    anchors, matched, targets, _ = _regression_case()
    logits = torch.randn(2, 6, NUM_CLASSES, generator=torch.Generator().manual_seed(2))
    loss = head.compute_loss(targets, {"cls_logits": logits}, matched)
    expected = 0
    for i in range(2):
        target = torch.zeros_like(logits[i])
        fg = matched[i] >= 0
        target[fg, targets[i]["labels"][matched[i][fg]]] = 1
        valid = matched[i] != -2
        expected += torchvision.ops.sigmoid_focal_loss(logits[i][valid], target[valid], reduction="sum") / max(1, fg.sum())
    torch.testing.assert_close(loss, expected / 2)


def test_diou_nms_keeps_overlapping_boxes_with_distant_centres():
    # two long boxes side by side: IoU = 70/130 = 0.54 > 0.5, but their centres are 30 apart:
    # rho^2 / c^2 = 900 / (130^2 + 10^2) = 0.053, so IoU - rho^2/c^2 = 0.485 < 0.5
    anchors = torch.tensor([[0.0, 0, 100, 10], [30, 0, 130, 10]])
    logits = torch.full((1, 2, NUM_CLASSES), -10.0)
    logits[0, :, 1] = torch.tensor([3.0, 2.0])  # both class 1
    outputs = {"cls_logits": [logits], "bbox_regression": [torch.zeros(1, 2, 4)]}
    kept = {}
    for nms in ("iou", "diou"):
        model = tiny_detector("retinanet", nms=nms)
        (det,) = model.postprocess_detections(outputs, [[anchors]], [(64, 200)])
        kept[nms] = det["boxes"]
        assert (det["labels"] == 1).all()
    torch.testing.assert_close(kept["iou"], anchors[:1])
    torch.testing.assert_close(kept["diou"], anchors)
    # a huge beta makes the distance term vanish: DIoU-NMS becomes IoU-NMS
    model = tiny_detector("retinanet", nms="diou", nms_beta=1e6)
    (det,) = model.postprocess_detections(outputs, [[anchors]], [(64, 200)])
    torch.testing.assert_close(det["boxes"], anchors[:1])


def test_soft_and_weighted_nms_on_the_hand_case():
    """The same two boxes, worked by hand: IoU 70/130, rho^2/c^2 = 900/(130^2 + 10^2)."""
    anchors = torch.tensor([[0.0, 0, 100, 10], [30, 0, 130, 10]])
    logits = torch.full((1, 2, NUM_CLASSES), -10.0)
    logits[0, :, 1] = torch.tensor([3.0, 2.0])
    outputs = {"cls_logits": [logits], "bbox_regression": [torch.zeros(1, 2, 4)]}
    s1, s2 = torch.sigmoid(torch.tensor(3.0)).item(), torch.sigmoid(torch.tensor(2.0)).item()
    iou, penalty = 70 / 130, 900 / (130**2 + 10**2)
    for nms, overlap in (("soft", iou), ("soft-diou", iou - penalty)):
        (det,) = tiny_detector("retinanet", nms=nms).postprocess_detections(outputs, [[anchors]], [(64, 200)])
        torch.testing.assert_close(det["boxes"], anchors)  # both kept, the second one decayed (sigma 0.5)
        torch.testing.assert_close(det["scores"], torch.tensor([s1, s2 * math.exp(-overlap**2 / 0.5)]))
        assert det["labels"].tolist() == [1, 1]
    (det,) = tiny_detector("retinanet", nms="weighted").postprocess_detections(outputs, [[anchors]], [(64, 200)])
    # IoU 0.54 > 0.5: one box, the score-weighted mean of the two, with the kept box's score
    torch.testing.assert_close(det["boxes"], ((s1 * anchors[0] + s2 * anchors[1]) / (s1 + s2))[None])
    torch.testing.assert_close(det["scores"], torch.tensor([s1]))


@pytest.mark.parametrize("arch", ["retinanet", "faster_rcnn"])
def test_every_nms_runs_in_post_processing(arch):
    """Each NMS in both architectures (and the RPN): detections sorted by score, foreground labels;
    weighted NMS keeps what IoU-NMS keeps (same scores and labels, merged boxes); Soft-NMS keeps at
    least as many."""
    from detectors.nms import NMS_NAMES

    torch.manual_seed(0)
    images = synthetic_batch()[0]
    out = {}
    for nms in NMS_NAMES:
        options = dict(nms=nms, rpn_nms=nms) if arch == "faster_rcnn" else dict(nms=nms, score_thresh=0.0)
        torch.manual_seed(0)
        model = tiny_detector(arch, **options).eval()
        with torch.no_grad():
            out[nms] = model(images)
        for det in out[nms]:
            assert (det["scores"][1:] <= det["scores"][:-1]).all()
            assert det["labels"].min() >= 1 and torch.isfinite(det["boxes"]).all()
    for iou, weighted, soft in zip(out["iou"], out["weighted"], out["soft"]):
        if arch == "retinanet":  # the RPN's own NMS differs between the Faster R-CNN variants
            assert len(iou["scores"]) > 1
            torch.testing.assert_close(weighted["scores"], iou["scores"])
            assert torch.equal(weighted["labels"], iou["labels"])
            assert len(soft["scores"]) >= len(iou["scores"])


@pytest.mark.parametrize("box_loss", BOX_LOSSES)
def test_every_box_loss_trains_with_finite_losses(box_loss):
    torch.manual_seed(0)
    model = tiny_detector("retinanet", box_loss=box_loss)
    history = train_steps(model, *synthetic_batch(), steps=3)
    for losses in history:
        assert set(losses) == {"loss_classifier", "loss_box_reg"}
        assert all(torch.isfinite(v) for v in losses.values())
    assert history[-1]["loss_box_reg"] > 0


def test_ciou_overfits_two_images():
    ious = overfit_box_ious("retinanet", lr=2e-3)  # at most 100 Adam steps; 40-55 for seeds 0-2
    assert min(ious) > 0.7, ious


@pytest.mark.parametrize("backbone", ["resnet34", "mobilenet_v3_large"])
def test_other_backbones_train_and_detect(backbone):
    # MobileNetV3 RetinaNet (no torchvision builder): its stride-8/16/32 stages feed P3-P5, then P6-P7
    torch.manual_seed(0)
    model = tiny_detector("retinanet", backbone=backbone, box_loss="giou", nms="diou", score_thresh=0.0)
    assert len(model.anchor_generator.sizes) == 5
    (losses,) = train_steps(model, *synthetic_batch(), steps=1)
    assert all(torch.isfinite(v) for v in losses.values())
    model.eval()
    with torch.no_grad():
        assert len(model(synthetic_batch()[0])[1]["boxes"]) > 0


def test_torchvision_retinanet_is_unchanged_after_building_ours():
    build_detector("retinanet", num_classes=NUM_CLASSES, backbone="resnet18", box_loss="ciou", nms="diou")
    assert RetinaNetRegressionHead.compute_loss.__module__ == "torchvision.models.detection.retinanet"
    assert torchvision.models.detection.RetinaNet.postprocess_detections.__module__ == "torchvision.models.detection.retinanet"
    reference = torchvision_reference("retinanet")
    assert type(reference.head.regression_head) is RetinaNetRegressionHead
    assert reference.head.regression_head._loss_type == "l1"
    # its regression loss is still L1 on the deltas (torchvision's default), here by hand
    anchors, matched, targets, deltas = _regression_case()
    loss = reference.head.regression_head.compute_loss(targets, {"bbox_regression": deltas}, anchors, matched)
    expected = sum(hand_box_loss("l1", deltas[i][m >= 0], anchors[i][m >= 0], targets[i]["boxes"][m[m >= 0]])
                   / (m >= 0).sum() for i, m in enumerate(matched)) / 2
    torch.testing.assert_close(loss, expected)
    assert not isinstance(reference, BoxLossRetinaNet)


@pytest.mark.cuda
@CUDA
@pytest.mark.parametrize("box_loss", ["default", "ciou"])
def test_one_training_step_on_cuda(box_loss):
    torch.manual_seed(0)
    model = tiny_detector("retinanet", box_loss=box_loss, nms="diou").cuda()
    images, targets = synthetic_batch()
    images = [i.cuda() for i in images]
    targets = [{k: v.cuda() for k, v in t.items()} for t in targets]
    (losses,) = train_steps(model, images, targets, steps=1)
    assert all(torch.isfinite(v) for v in losses.values())
    model.eval()
    with torch.no_grad():
        assert model(images)[0]["boxes"].is_cuda


def test_head_norm_groups_puts_group_norm_after_every_head_conv():
    plain = build_detector("retinanet", num_classes=3, backbone="resnet18", fpn_channels=32)
    normed = build_detector("retinanet", num_classes=3, backbone="resnet18", fpn_channels=32, head_norm_groups=8)
    for head in (normed.head.classification_head, normed.head.regression_head):
        norms = [m for m in head.conv.modules() if isinstance(m, torch.nn.GroupNorm)]
        assert len(norms) == 4 and all(n.num_groups == 8 and n.num_channels == 32 for n in norms)
    assert not any(isinstance(m, torch.nn.GroupNorm) for m in plain.head.modules())
    normed.train()
    images, targets = [torch.rand(3, 64, 64)], [{"boxes": torch.tensor([[8.0, 8, 40, 30]]), "labels": torch.tensor([1])}]
    assert all(torch.isfinite(v) for v in normed(images, targets).values())
    with pytest.raises(ValueError, match="head_norm_groups must be a positive divisor of fpn_channels=32, got 5"):
        build_detector("retinanet", num_classes=3, backbone="resnet18", fpn_channels=32, head_norm_groups=5)
    with pytest.raises(ValueError, match="head_norm_groups is a RetinaNet option"):
        build_detector("faster_rcnn", num_classes=3, backbone="resnet18", head_norm_groups=8)


@pytest.mark.parametrize("arch,extra", [("retinanet", 2), ("faster_rcnn", 1)])
def test_returned_layers_choose_the_fpn_inputs_and_drop_later_stages(arch, extra):
    """returned_layers=[2, 3]: the FPN reads layer2/layer3, layer4 is not in the model at all, and
    the levels (+ P6/P7 or the pooled one) match the anchors; torch.manual_seed'ed trunks agree."""
    sizes = ((16,), (32,), (64,), (128,))[: 2 + extra]
    torch.manual_seed(0)
    model = build_detector(arch, num_classes=3, backbone="resnet18", fpn_channels=32, returned_layers=[2, 3],
                           anchor_sizes=sizes, min_size=96, max_size=96)
    names = [n for n, _ in model.named_parameters()]
    assert not any(".layer4." in n for n in names) and any(".layer3." in n for n in names)
    torch.manual_seed(0)
    full = build_detector(arch, num_classes=3, backbone="resnet18", fpn_channels=32, min_size=96, max_size=96)
    for name in ("conv1.weight", "layer3.1.conv2.weight"):  # same seeded trunk, up to layer3
        assert torch.equal(model.backbone.body.get_submodule(name.rsplit(".", 1)[0]).weight,
                           full.backbone.body.get_submodule(name.rsplit(".", 1)[0]).weight)
    x = torch.rand(1, 3, 96, 96)
    feats = model.backbone(x)
    assert [f.shape[-1] for f in feats.values()] == [12, 6, 3, 2][: 2 + extra]  # strides 8, 16, 32, 64
    model.eval()
    with torch.no_grad():
        (out,) = model([x[0]])
    assert out["boxes"].shape[1] == 4
    with pytest.raises(ValueError, match=r"returned_layers must be increasing ResNet stages from 1-4, e.g. \[2, 3\], got \[3, 2\]"):
        build_detector(arch, num_classes=3, backbone="resnet18", returned_layers=[3, 2])
    with pytest.raises(ValueError, match="anchor_sizes must have one entry per feature level"):
        build_detector(arch, num_classes=3, backbone="resnet18", returned_layers=[2, 3], anchor_sizes=sizes + ((256,),))
