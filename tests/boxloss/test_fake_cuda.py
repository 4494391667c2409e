"""The CUDA paths of boxloss on fake CUDA tensors (no GPU needed; see the ``fake_cuda`` fixture).

Each public function runs on CUDA inputs end to end: every tensor it makes lands on the inputs'
device (a stray CPU tensor raises ``FakeTensorDeviceMismatchError``), outputs have the documented
device, dtype and shape, and an argument on another device is a ValueError naming both devices.
Values are checked by the CPU tests.

Out of reach of fake tensors, said where it applies: the backward pass (autograd's engine needs a
CUDA driver for a CUDA graph), functions that read data on purpose (the label range checks,
``check_boxes``, the triplet-batch check, ``torch.unique``), and NMS, whose output size depends on
the scores (tests/boxloss/test_nms*.py covers NMS on a GPU).
"""

import pytest
import torch

import boxloss
from boxloss import recog, simulation
from boxloss.recog import centers as recog_centers
from boxloss.recog import heads as recog_heads

CUDA = torch.device("cuda", 0)
HALF = [torch.float32, torch.float16, torch.bfloat16]
DEVICES = r".*(cuda:0.*cpu|cpu.*cuda:0)"  # a device error names both devices
OPTIONS = {"mpdiou": {"image_size": (480.0, 640.0)}}  # the options a loss cannot do without


def _boxes(n, dtype=torch.float32):
    xy = torch.rand(n, 2, device="cuda") * 10
    return torch.cat([xy, xy + 1 + torch.rand(n, 2, device="cuda")], 1).to(dtype)  # valid xyxy


# --------------------------------------------------------------------------- regression losses


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("name", boxloss.LOSS_NAMES)
def test_losses_stay_on_cuda(fake_cuda, name, dtype):
    pred, target = _boxes(6, dtype).requires_grad_(), _boxes(6, dtype)
    fn = boxloss.get_loss(name, **OPTIONS.get(name, {}))
    per_pair = fn(pred, target, reduction="none")
    assert (per_pair.device, per_pair.dtype, per_pair.shape) == (CUDA, torch.float32, (6,))
    weighted = fn(pred, target, weight=torch.rand(6, device="cuda"), avg_factor=3.0)
    per_coord = fn(pred, target, weight=torch.rand(6, 4, device="cuda"), reduction="sum")
    for loss in (weighted, per_coord):
        assert (loss.device, loss.dtype, loss.shape) == (CUDA, torch.float32, ())
    # the backward pass cannot run on fake CUDA tensors (test_backward_needs_a_gpu)


@pytest.mark.xfail(raises=RuntimeError, strict=True,
                   reason="autograd's engine starts a CUDA device thread for a CUDA graph, which needs a driver; "
                          "backward on CUDA is covered by the cuda-marked tests on a GPU")
def test_backward_needs_a_gpu(fake_cuda):
    pred = _boxes(3).requires_grad_()
    torch.autograd.grad(boxloss.ciou_loss(pred, _boxes(3)), pred)


@pytest.mark.parametrize("name", boxloss.LOSS_NAMES)
def test_losses_empty_input_on_cuda(fake_cuda, name):
    pred = torch.zeros(0, 4, device="cuda", requires_grad=True)
    loss = boxloss.get_loss(name, **OPTIONS.get(name, {}))(pred, torch.zeros(0, 4, device="cuda"))
    assert loss.device == CUDA and loss.requires_grad


@pytest.mark.parametrize("argument", ["target", "pred", "weight"])
def test_losses_reject_arguments_on_another_device(fake_cuda, argument):
    for name in boxloss.LOSS_NAMES:
        fn = boxloss.get_loss(name, **OPTIONS.get(name, {}))
        inputs = {"pred": _boxes(4), "target": _boxes(4), "weight": torch.ones(4, device="cuda")}
        inputs[argument] = inputs[argument].cpu()
        other = "target" if argument == "pred" else argument  # named against pred
        with pytest.raises(ValueError, match=other + DEVICES):
            fn(inputs["pred"], inputs["target"], weight=inputs["weight"])


@pytest.mark.parametrize("name", ["iou", "giou", "diou", "ciou"])
def test_iou_kernel_rejects_a_target_on_another_device(fake_cuda, name):
    fn = boxloss.get_loss(name)
    with pytest.raises(ValueError, match="target" + DEVICES):
        fn(_boxes(4), _boxes(4).cpu())
    with pytest.raises(ValueError, match="target" + DEVICES):
        fn(_boxes(4).cpu(), _boxes(4))


def test_loss_modules_stay_on_cuda(fake_cuda):
    pred, target = _boxes(5), _boxes(5)
    for module in (boxloss.CIoULoss(loss_weight=2.0), boxloss.SmoothL1Loss(beta=1 / 9)):
        assert module(pred, target).device == CUDA


# --------------------------------------------------------------------------- focal losses


@pytest.mark.parametrize("dtype", HALF)
def test_focal_losses_stay_on_cuda(fake_cuda, dtype):
    logits = torch.randn(7, 3, device="cuda", dtype=dtype)
    binary = torch.rand(7, 3, device="cuda").round().to(dtype)
    for loss in (
        boxloss.sigmoid_focal_loss(logits, binary, weight=torch.rand(7, 3, device="cuda"), avg_factor=2.0),
        boxloss.SigmoidFocalLoss(gamma=1.0)(logits, binary),
    ):
        assert (loss.device, loss.dtype) == (CUDA, torch.float32)
    labels = torch.randint(0, 3, (7,), device="cuda")
    alpha = torch.rand(3, device="cuda")
    for loss in (
        boxloss.softmax_focal_loss(logits, labels, alpha=alpha, label_smoothing=0.1,
                                   weight=torch.rand(7, device="cuda"), reduction="none"),
        boxloss.cross_entropy(logits, labels, label_smoothing=0.1, reduction="none"),
    ):
        assert (loss.device, loss.dtype, loss.shape) == (CUDA, torch.float32, (7,))


def test_focal_losses_reject_arguments_on_another_device(fake_cuda):
    logits, binary = torch.randn(7, 3, device="cuda"), torch.rand(7, 3, device="cuda")
    labels = torch.randint(0, 3, (7,), device="cuda")
    with pytest.raises(ValueError, match="targets must be on the device of inputs " + DEVICES):
        boxloss.sigmoid_focal_loss(logits, binary.cpu())
    with pytest.raises(ValueError, match="weight must be on the device of inputs " + DEVICES):
        boxloss.sigmoid_focal_loss(logits, binary, weight=torch.ones(7, 3))
    # a CPU alpha (class weights kept as a constant) failed inside the loss before
    with pytest.raises(ValueError, match=r"alpha must be on the device of logits \(cuda:0\), got cpu"):
        boxloss.softmax_focal_loss(logits, labels, alpha=torch.ones(3))
    with pytest.raises(ValueError, match="targets must be on the device of logits " + DEVICES):
        boxloss.softmax_focal_loss(logits, labels.cpu())
    with pytest.raises(ValueError, match="weight must be on the device of logits " + DEVICES):
        boxloss.cross_entropy(logits, labels, weight=torch.ones(7))


# --------------------------------------------------------------------------- box ops


def test_box_ops_stay_on_cuda(fake_cuda):
    a, b = _boxes(5), _boxes(3)
    for fmt in ("xywh", "cxcywh"):
        out = boxloss.box_convert(boxloss.box_convert(a, "xyxy", fmt), fmt, "xyxy")
        assert (out.device, out.shape) == (CUDA, (5, 4))
    assert boxloss.box_area(a).device == CUDA
    for fn in (boxloss.box_iou, boxloss.generalized_box_iou, boxloss.distance_box_iou, boxloss.complete_box_iou):
        assert (fn(a, b).device, fn(a, b).shape) == (CUDA, (5, 3))
    for fn in (boxloss.matched_box_iou, boxloss.matched_generalized_box_iou, boxloss.matched_distance_box_iou,
               boxloss.matched_complete_box_iou):
        assert (fn(a, a).device, fn(a, a).shape) == (CUDA, (5,))
    # check_boxes reads the data on purpose (a sync, where data enters): fake tensors have none
    with pytest.raises(Exception, match="_local_scalar_dense|data-dependent|DataDependent"):
        boxloss.check_boxes(a)


# --------------------------------------------------------------------------- simulation


BACKWARD = pytest.mark.xfail(raises=RuntimeError, strict=True,
                             reason="autograd's backward on CUDA tensors needs a CUDA driver "
                                    "(see test_backward_needs_a_gpu)")


@pytest.mark.parametrize("mode,grad", [("exact", "analytic"), ("paper", "analytic"),
                                       pytest.param("exact", "loss", marks=BACKWARD),
                                       pytest.param("exact", "autograd", marks=BACKWARD)])
@pytest.mark.parametrize("loss", ["iou", "giou", "diou", "ciou"])
def test_simulation_step_stays_on_cuda(fake_cuda, loss, mode, grad):
    pred = torch.cat([torch.rand(9, 2, device="cuda"), 0.5 + torch.rand(9, 2, device="cuda")], 1)  # (x, y, w, h)
    target = torch.cat([torch.rand(9, 2, device="cuda"), 0.5 + torch.rand(9, 2, device="cuda")], 1)
    d, iou = simulation.descent_direction(pred, target, loss, mode=mode, grad=grad)
    assert (d.device, d.shape, iou.device, iou.shape) == (CUDA, (9, 4), CUDA, (9,))


def test_simulation_run_on_cuda(fake_cuda):
    # the whole engine: cases made on the device, two iterations, results brought back to the host
    result = simulation.simulate("diou", points=2, iterations=2, device="cuda", keep_boxes=True)
    assert result.total_error.shape == (3,) and result.total_error.device.type == "cpu"
    assert result.final_boxes.shape == (2 * simulation.CASES_PER_POINT, 4)


# --------------------------------------------------------------------------- recog


def _embeddings(n=8, d=5):
    return torch.randn(n, d, device="cuda")


def _labels(n=8, classes=3):
    return torch.arange(n, device="cuda") % classes


@pytest.fixture
def no_label_range_check(monkeypatch):
    """The label range check reads the labels back on purpose (one sync): fake tensors have no
    values, so it is replaced by a no-op; everything after it must run without a host read."""
    for module in (recog_centers, recog_heads):
        monkeypatch.setattr(module, "_check_label_range", lambda labels, num_classes, name="labels": None)


@pytest.mark.parametrize("dtype", HALF)
def test_recog_losses_stay_on_cuda(fake_cuda, dtype):
    x, y = _embeddings().to(dtype), _labels()
    losses = [
        recog.contrastive_loss(x, y),
        recog.triplet_margin_loss(x[:3], x[3:6], x[5:8]),
        recog.tuplet_loss(x[:2], x[2:4], x[4:8].reshape(2, 2, 5)),
        recog.npair_loss(x[:4], x[4:]),
        recog.minimum_margin_loss(x, margin=1.0),
        recog.marginal_loss(x, y),
    ]
    for loss in losses:
        assert (loss.device, loss.dtype, loss.shape) == (CUDA, torch.float32, ())
    # triplet_loss, select_triplets, range_loss and the labels= of minimum_margin_loss / npair_loss
    # check their batch or list classes by reading data (nonzero, unique): not runnable on fake tensors


@pytest.mark.parametrize("dtype", HALF)
def test_center_losses_stay_on_cuda(fake_cuda, no_label_range_check, dtype):
    x, y = _embeddings().to(dtype), _labels()
    centers = torch.randn(3, 5, device="cuda")
    loss = recog.center_loss(x, y, centers, weight=torch.rand(8, device="cuda"))
    assert (loss.device, loss.dtype) == (CUDA, torch.float32)
    new = recog.center_update(centers, x, y)  # class counts by index_add_: no host read
    assert (new.device, new.dtype, new.shape) == (CUDA, torch.float32, (3, 5))
    with torch.device("cuda"):
        module = recog.CenterLoss(3, 5)
    assert module(x, y).device == CUDA
    module.update_centers(x, y)
    assert module.centers.device == CUDA


@pytest.mark.parametrize("head", ["ArcFace", "CosFace", "CombinedMargin", "SphereFace", "LargeMarginSoftmax"])
def test_margin_heads_stay_on_cuda(fake_cuda, no_label_range_check, head):
    # built on the device: Module.to cannot swap fake tensors into parameters
    with torch.device("cuda"):
        module = getattr(recog, head)(5, 3).train()
    x, y = _embeddings().half(), _labels()
    logits = module.logits(x, y)
    assert (logits.device, logits.dtype, logits.shape) == (CUDA, torch.float32, (8, 3))
    assert module.cosine(x).device == CUDA
    loss = module(x, y)
    assert (loss.device, loss.dtype) == (CUDA, torch.float32)


def test_functional_margins_stay_on_cuda(fake_cuda):
    cosine, y = torch.rand(8, 3, device="cuda").half(), _labels()
    for fn in (recog.arcface_logits, recog.cosface_logits, recog.combined_margin_logits):
        out = fn(cosine, y)
        assert (out.device, out.dtype) == (CUDA, torch.float32)
    assert recog.angular_margin_psi(cosine, 3).device == CUDA


def test_recog_rejects_arguments_on_another_device(fake_cuda):
    x, y = _embeddings(), _labels()
    for call in (
        lambda: recog.contrastive_loss(x, y.cpu()),
        lambda: recog.triplet_loss(x, y.cpu()),
        lambda: recog.select_triplets(x, y.cpu()),
        lambda: recog.marginal_loss(x, y.cpu()),
        lambda: recog.range_loss(x, y.cpu(), margin=1.0),
        lambda: recog.center_loss(x, y.cpu(), torch.zeros(3, 5, device="cuda")),
        lambda: recog.center_update(torch.zeros(3, 5, device="cuda"), x, y.cpu()),
        lambda: recog.select_npair_classes(x, y.cpu(), 2),
    ):
        with pytest.raises(ValueError, match=r"labels must be on the device of embeddings \(cuda:0\), got cpu"):
            call()
    with pytest.raises(ValueError, match=r"centers must be on the device of embeddings \(cuda:0\), got cpu"):
        recog.center_loss(x, y, torch.zeros(3, 5))
    with pytest.raises(ValueError, match=r"centers must be on the device of embeddings \(cuda:0\), got cpu"):
        recog.CenterLoss(3, 5)(x, y)  # a module left on the CPU
    with pytest.raises(ValueError, match="weight must be on the device of embeddings " + DEVICES):
        recog.center_loss(x, y, torch.zeros(3, 5, device="cuda"), weight=torch.ones(8))
    with pytest.raises(ValueError, match="labels must be on the device of centers " + DEVICES):
        recog.minimum_margin_loss(x, y.cpu(), margin=1.0)
    with pytest.raises(ValueError, match="positives must be on the device of anchors " + DEVICES):
        recog.triplet_margin_loss(x, x.cpu(), x)
    with pytest.raises(ValueError, match="negatives must be on the device of anchors " + DEVICES):
        recog.tuplet_loss(x, x, x.cpu()[:, None])
    with pytest.raises(ValueError, match="positives must be on the device of anchors " + DEVICES):
        recog.npair_loss(x, x.cpu())
    with pytest.raises(ValueError, match="labels must be on the device of anchors " + DEVICES):
        recog.npair_loss(x, x, labels=torch.arange(8))
    with pytest.raises(ValueError, match=r"embeddings must be on the device of ArcFace.weight \(cpu\), got cuda:0"):
        recog.ArcFace(5, 3).logits(x, y)
    with torch.device("cuda"):
        head = recog.CosFace(5, 3)
    with pytest.raises(ValueError, match="labels must be on the device of embeddings " + DEVICES):
        head(x, y.cpu())
    with pytest.raises(ValueError, match="labels must be on the device of cosine " + DEVICES):
        recog.arcface_logits(torch.rand(8, 3, device="cuda"), y.cpu())
