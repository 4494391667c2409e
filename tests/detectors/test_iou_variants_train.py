"""The IoU losses after CIoU in the detectors: EIoU, SIoU, alpha-IoU, Wise-IoU, MPDIoU by --box-loss,
their options through box_loss_cfg, MPDIoU's image sizes, Wise-IoU's running mean in checkpoints."""

import os
import shutil
import subprocess
import sys

import pytest
import torch
from det_helpers import NUM_CLASSES, TINY, decode, overfit_box_ious, tiny_detector, train_steps
from torchvision.models.detection import _utils as det_utils

import boxloss
from detectors import build_detector
from detectors.checkpoint import load_weights
from detectors.data import CocoDetection
from detectors.errors import OptionError
from detectors.losses import box_regression_loss
from detectors.options import BOX_LOSSES, default_box_loss_weight, set_box_loss
from detectors.retinanet import ImageSizeTransform
from detectors.shapes import make_shapes

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN = os.path.join(ROOT, "tools", "train.py")
NEW_LOSSES = ("eiou", "siou", "alpha_iou", "wise_iou", "mpdiou")


@pytest.fixture(scope="module")
def shapes_batch(tmp_path_factory):
    """Four 64 px images of the generated shapes data with their targets (labels 1-4)."""
    root = tmp_path_factory.mktemp("shapes")
    make_shapes(str(root), num_train=4, num_val=0, image_size=64, seed=11)
    data = CocoDetection(str(root / "annotations" / "instances_train.json"), str(root / "train"), train=True)
    images, targets = zip(*(data[i] for i in range(len(data))))
    return list(images), [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets]


def shapes_detector(arch, **options):
    """The tiny detector for the shapes data's 4 classes (+ background)."""
    return build_detector(arch, num_classes=5, **{**TINY[arch], **options})


def test_the_new_names_are_box_losses_with_the_iou_familys_weights():
    assert set(NEW_LOSSES) <= set(BOX_LOSSES)
    for name in NEW_LOSSES:
        assert default_box_loss_weight("retinanet", name) == default_box_loss_weight("retinanet", "giou") == 2.0
        assert default_box_loss_weight("rpn", name) == 2.0
        assert default_box_loss_weight("roi", name) == default_box_loss_weight("roi", "giou") == 10.0


@pytest.mark.parametrize("arch", ["retinanet", "faster_rcnn"])
@pytest.mark.parametrize("box_loss", NEW_LOSSES)
def test_trains_on_shapes_with_finite_losses(arch, box_loss, shapes_batch):
    torch.manual_seed(0)
    options = {"rpn_box_loss": box_loss} if arch == "faster_rcnn" else {}
    model = shapes_detector(arch, box_loss=box_loss, **options)
    history = train_steps(model, *shapes_batch, steps=3)
    for losses in history:
        assert all(torch.isfinite(v) for v in losses.values()), losses
    assert history[-1]["loss_box_reg"] > 0


@pytest.mark.parametrize("box_loss", NEW_LOSSES)
def test_overfits_two_images(box_loss):
    """Each loss regresses boxes: every ground-truth box found by a detection of its class with
    IoU > 0.7 within at most 100 Adam steps, as test_retinanet.py asks of CIoU."""
    ious = overfit_box_ious("retinanet", lr=2e-3, box_loss=box_loss)
    assert min(ious) > 0.7, ious


@pytest.mark.parametrize("arch", ["retinanet", "faster_rcnn"])
def test_modifiers_through_box_loss_cfg(arch, shapes_batch):
    torch.manual_seed(0)
    extra = {"rpn_box_loss": "siou", "rpn_box_loss_cfg": {"focaler": (0.0, 0.95)}} if arch == "faster_rcnn" else {}
    model = shapes_detector(arch, box_loss="ciou", box_loss_cfg={"inner_ratio": 0.8}, **extra)
    head = model.head.regression_head if arch == "retinanet" else model.roi_heads
    assert head.box_loss_cfg == {"inner_ratio": 0.8}
    if arch == "faster_rcnn":
        assert model.rpn.box_loss_cfg == {"focaler": (0.0, 0.95)}
    (losses,) = train_steps(model, *shapes_batch, steps=1)
    assert all(torch.isfinite(v) for v in losses.values())


def test_the_retinanet_head_applies_the_options_and_the_image_size():
    """compute_loss by hand: the loss of the decoded foreground boxes with the head's options, per image
    divided by its foreground count, averaged over images, times the weight."""
    torch.manual_seed(0)
    anchors = [torch.tensor([[0.0, 0.0, 20.0, 20.0], [10.0, 10.0, 40.0, 30.0], [5.0, 5.0, 15.0, 25.0]])] * 2
    deltas = 0.2 * torch.randn(2, 3, 4)
    targets = [{"boxes": torch.tensor([[2.0, 1.0, 22.0, 18.0], [12.0, 8.0, 44.0, 33.0]]),
                "labels": torch.tensor([1, 2]), "image_size": torch.tensor([48.0, 64.0])},
               {"boxes": torch.tensor([[4.0, 6.0, 16.0, 22.0]]), "labels": torch.tensor([1]),
                "image_size": torch.tensor([100.0, 80.0])}]
    matched = [torch.tensor([0, 1, -1]), torch.tensor([-1, -2, 0])]
    for box_loss, cfg, fn in (
        ("giou", {"inner_ratio": 0.8}, lambda p, t, size: boxloss.giou_loss(p, t, inner_ratio=0.8, reduction="sum")),
        ("alpha_iou", {"alpha": 2.0, "kind": "diou"},
         lambda p, t, size: boxloss.alpha_iou_loss(p, t, alpha=2.0, kind="diou", reduction="sum")),
        ("mpdiou", {}, lambda p, t, size: boxloss.mpdiou_loss(p, t, image_size=tuple(size.tolist()), reduction="sum")),
    ):
        head = tiny_detector("retinanet", box_loss=box_loss, box_loss_cfg=cfg).head.regression_head
        got = head.compute_loss(targets, {"bbox_regression": deltas}, anchors, matched)
        per_image = []
        for d, a, t, m in zip(deltas, anchors, targets, matched):
            fg = m >= 0
            per_image.append(fn(decode(d[fg], a[fg]), t["boxes"][m[fg]], t["image_size"]) / fg.sum())
        torch.testing.assert_close(got, 2.0 * sum(per_image) / 2, msg=box_loss)


def test_retinanet_with_mpdiou_records_each_images_input_size():
    model = tiny_detector("retinanet", box_loss="mpdiou")
    assert isinstance(model.transform, ImageSizeTransform)
    assert not isinstance(tiny_detector("retinanet", box_loss="giou").transform, ImageSizeTransform)
    images = [torch.rand(3, 32, 64), torch.rand(3, 64, 48)]
    targets = [{"boxes": torch.tensor([[1.0, 2.0, 10.0, 12.0]]), "labels": torch.tensor([1])}] * 2
    image_list, out = model.transform(images, targets)
    # min_size = max_size = 64: the longer side becomes 64
    assert [t["image_size"].tolist() for t in out] == [[32.0, 64.0], [64.0, 48.0]]
    assert [list(s) for s in image_list.image_sizes] == [[32, 64], [64, 48]]
    assert "image_size" not in targets[0]  # the caller's dicts are untouched


def test_faster_rcnn_heads_pass_each_boxs_image_size():
    """RoI head: each positive RoI is normalised by the input size of its own image."""
    model = tiny_detector("faster_rcnn", box_loss="mpdiou")
    roi = model.roi_heads
    torch.manual_seed(0)
    proposals = [torch.tensor([[0.0, 0.0, 20.0, 20.0], [10.0, 10.0, 40.0, 30.0]]),
                 torch.tensor([[5.0, 5.0, 15.0, 25.0]])]
    gt = [torch.tensor([[2.0, 1.0, 22.0, 18.0], [12.0, 8.0, 44.0, 33.0]]), torch.tensor([[4.0, 6.0, 16.0, 22.0]])]
    labels = [torch.tensor([1, 2]), torch.tensor([1])]
    logits, regression = torch.randn(3, NUM_CLASSES), 0.1 * torch.randn(3, 4 * NUM_CLASSES)
    _, got = roi.compute_box_loss(logits, regression, labels, proposals, gt, [(48, 64), (100, 80)])
    deltas = regression.reshape(3, -1, 4)[torch.arange(3), torch.cat(labels)]
    boxes = decode(deltas, torch.cat(proposals), (10.0, 10.0, 5.0, 5.0))
    sizes = torch.tensor([[48.0, 64.0], [48.0, 64.0], [100.0, 80.0]])
    want = boxloss.mpdiou_loss(boxes, torch.cat(gt), image_size=sizes, reduction="sum") / 3
    torch.testing.assert_close(got, want)
    # the same through box_regression_loss, and the size matters
    coder = det_utils.BoxCoder((10.0, 10.0, 5.0, 5.0))
    small = box_regression_loss("mpdiou", deltas, torch.cat(proposals), torch.cat(gt), coder,
                                image_size=torch.full((3, 2), 8.0))
    assert small > got * 3


@pytest.mark.parametrize("kwargs, message", [
    (dict(box_loss="ciou", box_loss_cfg={"inner_ratoi": 0.8}),
     r"unknown key box_loss_cfg.inner_ratoi; did you mean 'inner_ratio'\?"),
    (dict(box_loss="ciou", box_loss_cfg={"inner_ratio": -1}), r"box_loss_cfg: inner_ratio must be .* got -1"),
    (dict(box_loss="eiou", box_loss_cfg={"focal_gamma": -0.5}), r"box_loss_cfg: focal_gamma must be .* got -0.5"),
    (dict(box_loss="siou", box_loss_cfg={"focaler": (0.9, 0.1)}), r"box_loss_cfg: .*got \(0.9, 0.1\)"),
    (dict(box_loss="alpha_iou", box_loss_cfg={"kind": "eiou"}), r"kind must be one of .* got 'eiou'"),
    (dict(box_loss="wise_iou", box_loss_cfg={"version": 5}), r"version must be one of .* got 5"),
    (dict(box_loss="wise_iou", box_loss_cfg={"iou_mean": 0.5}), r"unknown key box_loss_cfg.iou_mean"),
    (dict(box_loss="mpdiou", box_loss_cfg={"image_size": (64, 64)}), r"unknown key box_loss_cfg.image_size"),
    (dict(box_loss="default", box_loss_cfg={"inner_ratio": 0.8}), r"box_loss='default' takes none"),
    (dict(box_loss="giou", box_loss_cfg=0.8), r"box_loss_cfg must be a dict .* got 0.8"),
])
def test_bad_box_loss_cfg_is_an_option_error(kwargs, message):
    with pytest.raises(OptionError, match=message):
        build_detector("retinanet", num_classes=NUM_CLASSES, backbone="resnet18", **kwargs)


def test_rpn_box_loss_cfg_is_checked_and_faster_rcnn_only():
    with pytest.raises(OptionError, match=r"unknown key rpn_box_loss_cfg.ratio"):
        build_detector("faster_rcnn", num_classes=NUM_CLASSES, backbone="resnet18", rpn_box_loss="giou",
                       rpn_box_loss_cfg={"ratio": 0.8})
    with pytest.raises(OptionError, match="rpn_box_loss_cfg cannot be passed with arch='retinanet'"):
        build_detector("retinanet", num_classes=NUM_CLASSES, backbone="resnet18", rpn_box_loss_cfg={})


def test_config_checks_accept_box_loss_cfg():
    from mmengine.config import Config

    from detectors.engine import check_config

    cfg = Config(dict(model=dict(type="DetectorModel", arch="faster_rcnn", num_classes=3, box_loss="ciou",
                                 box_loss_cfg=dict(inner_ratio=0.8), rpn_box_loss_cfg=dict(focaler=(0.0, 0.95)))))
    check_config(cfg)
    cfg.model["box_loss_cgf"] = {}
    with pytest.raises(OptionError, match=r"unknown key model.box_loss_cgf; did you mean 'box_loss_cfg'\?"):
        check_config(cfg)


def test_wise_iou_running_mean_is_in_the_state_dict():
    torch.manual_seed(0)
    model = tiny_detector("faster_rcnn", box_loss="wise_iou", rpn_box_loss="wise_iou",
                          box_loss_cfg={"momentum": 0.5})
    keys = [k for k in model.state_dict() if k.endswith("wise_iou.iou_mean")]
    assert keys == ["rpn.wise_iou.iou_mean", "roi_heads.wise_iou.iou_mean"]
    assert model.roi_heads.wise_iou.momentum == 0.5
    train_steps(model, *_batch(), steps=2)
    state = model.state_dict()
    assert all(state[k].item() != 1.0 for k in keys)
    # restored by loading (a resume), and absent from a model trained with another loss: its weights still load
    fresh = tiny_detector("faster_rcnn", box_loss="wise_iou", rpn_box_loss="wise_iou")
    load_weights(fresh, state, "trained")
    assert all(fresh.state_dict()[k].item() == state[k].item() for k in keys)
    other = tiny_detector("faster_rcnn", box_loss="giou").state_dict()
    load_weights(fresh, other, "giou model")
    assert fresh.roi_heads.wise_iou.iou_mean.item() == state["roi_heads.wise_iou.iou_mean"].item()
    # and the default loss's model has no such buffer (torchvision's keys), nor a head switched away
    assert not [k for k in other if "wise_iou" in k]
    set_box_loss(fresh.roi_heads, "roi", "giou", None)
    assert [k for k in fresh.state_dict() if "wise_iou" in k] == ["rpn.wise_iou.iou_mean"]


def _batch():
    from det_helpers import synthetic_batch

    return synthetic_batch()


def _tiny_config(tmp_path, data_root, epochs: int) -> str:
    text = f"""
_base_ = [{os.path.join(ROOT, "configs", "retinanet_r18_shapes.py")!r}]
shapes = dict(root={data_root!r}, num_train=8, num_val=4, image_size=64, seed=5)
train_dataloader = dict(batch_size=4, dataset=dict(data_root={data_root!r}, generate_shapes=shapes, transforms=[]))
val_dataloader = dict(batch_size=4, dataset=dict(data_root={data_root!r}, generate_shapes=shapes))
test_dataloader = val_dataloader
val_evaluator = dict(data_root={data_root!r})
test_evaluator = val_evaluator
model = dict(min_size=64, max_size=64, trainable_backbone_layers=2, box_loss_cfg=dict(momentum=0.2))
train_cfg = dict(max_epochs={epochs}, val_interval={epochs})
param_scheduler = [dict(type="LinearLR", start_factor=0.1, by_epoch=False, begin=0, end=2)]
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval=1, max_keep_ckpts=5))
"""
    path = tmp_path / "tiny_wise.py"
    path.write_text(text)
    return str(path)


@pytest.mark.slow  # two tools/train.py runs: about 80 s on 2 busy cores
def test_wise_iou_running_mean_is_restored_on_resume(tmp_path):
    """tools/train.py: the running mean is in every checkpoint, and a run resumed from epoch 1 ends
    with the same mean as the uninterrupted run (it would restart from 1.0 if resume dropped it)."""
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}
    cfg = _tiny_config(tmp_path, str(tmp_path / "shapes"), epochs=2)
    full = tmp_path / "full"
    run = subprocess.run([sys.executable, TRAIN, cfg, "--box-loss", "wise_iou", "--work-dir", str(full)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    key = "detector.head.regression_head.wise_iou.iou_mean"

    def mean(path):
        return torch.load(path, map_location="cpu", weights_only=False)["state_dict"][key].item()

    first, last = mean(full / "epoch_1.pth"), mean(full / "epoch_2.pth")
    assert first != 1.0 and last != first
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copy(full / "epoch_1.pth", resumed / "epoch_1.pth")
    (resumed / "last_checkpoint").write_text(str(resumed / "epoch_1.pth"))
    run = subprocess.run([sys.executable, TRAIN, cfg, "--box-loss", "wise_iou", "--work-dir", str(resumed),
                          "--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert mean(resumed / "epoch_2.pth") == pytest.approx(last, rel=1e-5)
