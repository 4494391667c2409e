"""DIoU-NMS under torch.export and torch.compile: the ``boxloss::diou_nms`` custom op, whose fake
implementation gives the number of kept boxes as a data-dependent size.

The exported (or compiled) detector post-processing must return what eager returns, at the traced
size and at others, for both kernels (the op runs the C kernel or the torch path when executed).
"""

import pytest
import torch
from test_nms import KERNELS, greedy_reference, random_case
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv

import boxloss


class PostProcess(torch.nn.Module):
    """A detector's last step: per-class DIoU-NMS, then the kept boxes, scores and labels."""

    def __init__(self, iou_threshold: float = 0.5, batched: bool = True):
        super().__init__()
        self.iou_threshold = iou_threshold
        self.batched = batched

    def forward(self, boxes, scores, labels):
        if self.batched:
            keep = boxloss.batched_diou_nms(boxes, scores, labels, self.iou_threshold)
        else:
            keep = boxloss.diou_nms(boxes, scores, self.iou_threshold, beta=2.0)
        return boxes[keep], scores[keep], labels[keep]


def _inputs(seed: int, n: int):
    g = torch.Generator().manual_seed(seed)
    boxes, scores = random_case(g, n)
    return boxes, scores, torch.randint(0, 3, (n,), generator=g)


@pytest.fixture(params=KERNELS)
def kernel(request, monkeypatch):
    monkeypatch.setenv("BOXLOSS_KERNEL", request.param)
    return request.param


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "single"])
def test_export_equals_eager(batched, kernel):
    module = PostProcess(batched=batched)
    n = torch.export.Dim("n", min=2)
    example = _inputs(0, 200)
    ep = torch.export.export(module, example, dynamic_shapes=({0: n}, {0: n}, {0: n}))
    targets = {str(node.target) for node in ep.graph.nodes if node.op == "call_function"}
    assert "boxloss.diou_nms.default" in targets
    for seed, size in ((0, 200), (1, 57), (2, 600)):  # the traced size and others
        inputs = _inputs(seed, size)
        got, want = ep.module()(*inputs), module(*inputs)
        for a, b in zip(got, want):
            assert torch.equal(a, b), (seed, size)
        labels = inputs[2] if batched else None
        beta = 1.0 if batched else 2.0
        assert torch.equal(got[0], inputs[0][greedy_reference(inputs[0], inputs[1], 0.5, labels, beta)])


def test_compile_fullgraph_equals_eager():
    # the aot_eager backend: no C++ toolchain needed, and fullgraph=True fails on any graph break
    module = PostProcess()
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager", dynamic=True)
    for seed, size in ((3, 100), (4, 300)):
        inputs = _inputs(seed, size)
        for a, b in zip(compiled(*inputs), module(*inputs)):
            assert torch.equal(a, b)


def test_fake_tensors_get_a_data_dependent_size():
    with FakeTensorMode(shape_env=ShapeEnv()):
        keep = boxloss.batched_diou_nms(torch.empty(50, 4), torch.empty(50), torch.zeros(50, dtype=torch.int64), 0.5)
        assert keep.dtype == torch.int64 and keep.dim() == 1
        assert isinstance(keep.shape[0], torch.SymInt)  # unbacked: known only when the op runs
