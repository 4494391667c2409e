"""RetinaNet and Faster R-CNN on fake CUDA tensors, with every box loss (no GPU needed).

The tiny detectors are built on the fake device and run the training path piece by piece: the
transform, backbone, anchors, heads, matching and each head's loss, with every tensor the
detectors' code makes required to be on CUDA (a stray CPU tensor raises
``FakeTensorDeviceMismatchError``). Inside the heads, a spy on ``box_regression_loss`` asserts
that the box loss's inputs and result are on CUDA. RetinaNet runs every name of ``BOX_LOSSES``,
Faster R-CNN a subset (symbolic shapes make each name cost a second or two on 2 cores).

Where fake tensors cannot go (see the ``fake_cuda`` fixture), the test says so:

- torchvision's ``forward`` itself: its target check ``if degenerate_boxes.any()`` and the
  random ``min_size`` choice (``.item()``) read data, so the pieces are called one by one;
- RetinaNet's box-loss normaliser ``max(1, foreground.numel())`` (torchvision's and ours): a
  Python int of a data-dependent size; the test accepts that stop once the box loss has run;
- the random positive/negative samplers of the RPN and RoI head (``min(positive.numel(), n)``):
  replaced by deterministic test doubles that keep every labelled anchor and every RoI;
- the detections, which end in NMS (test_detections_need_a_gpu), and the backward pass (autograd
  needs a CUDA driver for a CUDA graph).
"""

import pytest
import torch
from det_helpers import synthetic_batch, tiny_detector
from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

import detectors.faster_rcnn
import detectors.retinanet
from detectors.options import BOX_LOSSES, set_box_loss

CUDA = torch.device("cuda", 0)


def _on_cuda(*tensors):
    return all(t.device == CUDA for t in tensors)


@pytest.fixture
def box_loss_calls(monkeypatch):
    """The box losses the heads called, with every tensor on CUDA, and those that returned a CUDA loss."""
    calls, results = [], []

    def spy(name, deltas, reference_boxes, gt_boxes, box_coder, real=detectors.retinanet.box_regression_loss,
            **options):
        tensors = [t for t in options.values() if isinstance(t, torch.Tensor)]  # e.g. image sizes
        assert _on_cuda(deltas, reference_boxes, gt_boxes, *tensors), name
        calls.append(name)
        loss = real(name, deltas, reference_boxes, gt_boxes, box_coder, **options)
        assert loss.device == CUDA and loss.dtype == torch.float32, name
        results.append(name)
        return loss

    monkeypatch.setattr(detectors.retinanet, "box_regression_loss", spy)
    monkeypatch.setattr(detectors.faster_rcnn, "box_regression_loss", spy)
    return calls, results


def _keep_every_labelled(labels):
    """RPN sampler double: every positive and every negative anchor, as masks (torchvision's samples
    at random, by a data-dependent count, which fake tensors cannot decide)."""
    return [lab >= 1 for lab in labels], [lab == 0 for lab in labels]


def _keep_every_roi(labels):
    """RoI-head ``subsample`` double: every proposal, in order (a count known without the data)."""
    return [torch.arange(len(lab), device=lab.device) for lab in labels]


def _inputs(model):
    images, targets = synthetic_batch()
    images = [image.to("cuda") for image in images]
    targets = [{k: v.to("cuda") for k, v in t.items()} for t in targets]
    # torchvision draws the training size with .item(); there is one size, so no draw is needed
    model.transform.torch_choice = lambda sizes: sizes[-1]
    return model.transform(images, targets)


def _build(arch, **options):
    # built on the device: Module.to cannot swap fake tensors into parameters
    with torch.device("cuda"):
        model = tiny_detector(arch, **options).train()
    assert all(_on_cuda(t) for t in [*model.parameters(), *model.buffers()])
    return model


def _set_box_loss(head, kind, box_loss, **kw):
    with torch.device("cuda"):  # a loss that owns state (Wise-IoU's running mean) builds it there
        set_box_loss(head, kind, box_loss, None, **kw)


def test_retinanet_training_path_on_cuda(fake_cuda, box_loss_calls):
    model = _build("retinanet", box_loss="mpdiou")  # whose transform also gives each image's size
    images, targets = _inputs(model)
    assert _on_cuda(images.tensors, *(t["boxes"] for t in targets))
    features = list(model.backbone(images.tensors).values())
    head_outputs = model.head(features)
    anchors = model.anchor_generator(images, features)
    assert _on_cuda(*head_outputs.values(), *anchors)
    matched = [model.proposal_matcher(detectors.retinanet.box_ops.box_iou(t["boxes"], a))
               for t, a in zip(targets, anchors)]
    loss = model.head.classification_head.compute_loss(targets, head_outputs, matched)  # the focal loss
    assert loss.device == CUDA and loss.shape == ()
    for box_loss in BOX_LOSSES:
        # Wise-IoU updates its running mean only for a non-empty batch: a branch on the number of
        # positives, so fake tensors stop inside it, after its inputs were checked (calls)
        _set_box_loss(model.head.regression_head, "retinanet", box_loss)
        try:
            loss = model.head.regression_head.compute_loss(targets, head_outputs, anchors, matched)
            assert loss.device == CUDA
        except GuardOnDataDependentSymNode:
            # the regression heads (torchvision's and ours) divide by max(1, foreground.numel()), a
            # Python int of a data-dependent size: fake tensors stop there, after the box loss ran
            pass
    calls, results = box_loss_calls
    assert calls == [name for name in BOX_LOSSES if name != "default"], calls
    assert results == [name for name in calls if name != "wise_iou"], results


# the default, one loss of each kind (deltas, decoded boxes), and the two with state or extra
# inputs; each name costs a second or two of symbolic shapes on 2 cores, and RetinaNet runs them all
FASTER_RCNN_LOSSES = ["default", "smooth_l1", "ciou", "wise_iou", "mpdiou"]


def test_faster_rcnn_training_path_on_cuda(fake_cuda, box_loss_calls):
    model = _build("faster_rcnn")
    model.rpn.fg_bg_sampler = _keep_every_labelled
    model.roi_heads.subsample = _keep_every_roi
    images, targets = _inputs(model)
    features = model.backbone(images.tensors)
    assert _on_cuda(*features.values())
    rpn = model.rpn
    objectness, deltas = rpn.head(list(features.values()))
    anchors = rpn.anchor_generator(images, list(features.values()))
    objectness, deltas = detectors.faster_rcnn.concat_box_prediction_layers(objectness, deltas)
    labels, matched_gt_boxes = rpn.assign_targets_to_anchors(anchors, targets)
    # proposals of a fixed count: the RPN's own come out of NMS, whose output size is the data's
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(2, 16, 2, generator=g) * 40
    proposals = list(torch.cat([xy, xy + 4 + 20 * torch.rand(2, 16, 2, generator=g)], -1).to("cuda"))
    for box_loss in FASTER_RCNN_LOSSES:
        _set_box_loss(rpn, "rpn", box_loss, prefix="rpn_")
        _set_box_loss(model.roi_heads, "roi", box_loss)
        try:
            if box_loss == "default":
                regression_targets = rpn.box_coder.encode(matched_gt_boxes, anchors)
                rpn_losses = rpn.compute_loss(objectness, deltas, labels, regression_targets)
            else:
                rpn_losses = rpn.compute_box_loss(objectness, deltas, labels, anchors, matched_gt_boxes,
                                                  images.image_sizes)
            _, roi_losses = model.roi_heads(features, proposals, images.image_sizes, targets)
            assert _on_cuda(*rpn_losses, *roi_losses.values()), box_loss
        except GuardOnDataDependentSymNode:
            assert box_loss == "wise_iou", box_loss  # see the RetinaNet test
    calls, results = box_loss_calls
    assert calls == ["smooth_l1", "smooth_l1", "ciou", "ciou", "wise_iou", "mpdiou", "mpdiou"], calls
    assert results == ["smooth_l1", "smooth_l1", "ciou", "ciou", "mpdiou", "mpdiou"], results


@pytest.mark.parametrize("arch", ["retinanet", "faster_rcnn"])
def test_detectors_reject_a_model_and_images_on_different_devices(fake_cuda, arch):
    # a model left on the CPU with CUDA images: torchvision's first conv raises; no silent copies
    model = tiny_detector(arch).eval()
    images = [torch.rand(3, 64, 64, device="cuda")]
    with pytest.raises(RuntimeError, match="device"):
        model(images)


@pytest.mark.xfail(raises=(GuardOnDataDependentSymNode, DataDependentOutputException, DynamicOutputShapeException),
                   strict=True, reason="detections end in NMS (the RPN's proposals too), whose branches and output "
                                       "size depend on the data, which fake tensors cannot decide")
@pytest.mark.parametrize("arch", ["retinanet", "faster_rcnn"])
def test_detections_need_a_gpu(fake_cuda, arch):
    model = _build(arch).eval()
    model([torch.rand(3, 64, 64, device="cuda")])
