"""torch.compile and torch.export through the IoU-family losses' custom ops (boxloss/_ops.py), on CPU.

While compiling, :func:`boxloss._kernels.iou_family_loss` calls ``boxloss::iou_family_forward``
(and autograd ``boxloss::iou_family_backward``): opaque to the tracer, with fake and autograd
registrations, so a training step compiles as one graph. ``aot_eager`` traces exactly what
inductor would (dynamo, then AOTAutograd's joint forward/backward graph) without compiling C++;
the inductor run is in the slow suite.
"""

import pytest
import torch

import boxloss
from boxloss import _kernels
from boxloss import _ops  # noqa: F401  (registers the custom ops)
from box_cases import box_pairs
from test_kernels import assert_close_scaled, reference_loss


def make_step(loss_fn, **options):
    """A tiny training step: a linear layer predicts box deltas from features; the decoded boxes
    go through ``loss_fn`` against their targets."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 4).double()

    def step(features, target):
        d = layer(features)
        pred = torch.cat([target[:, :2] + d[:, :2], target[:, 2:] + d[:, 2:].exp()], 1)
        return loss_fn(pred, target, **options)

    return layer, step


def inputs(n=64):
    _, target = box_pairs(n, seed=3, dtype=torch.float64)
    features = torch.randn(n, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return features, target


@pytest.mark.parametrize("name,options", [("ciou", {"avg_factor": 3.0}), ("giou", {"reduction": "sum"}),
                                          ("iou", {"mode": "log"}), ("diou", {})])
def test_training_step_compiles_as_one_graph(name, options):
    layer, step = make_step(getattr(boxloss, f"{name}_loss"), **options)
    features, target = inputs()
    want = step(features, target)
    (want_grad,) = torch.autograd.grad(want, layer.weight)
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")  # fullgraph: a graph break raises
    got = compiled(features, target)
    (got_grad,) = torch.autograd.grad(got, layer.weight)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-12, atol=1e-12)


def test_compiled_gradients_equal_the_reference_for_both_boxes():
    """Both boxes require grad (6 saved rows) and a non-reduced loss: the backward op's gradients."""
    pred, target = box_pairs(100, seed=5, dtype=torch.float64)
    grad_out = torch.rand(100, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    def loss(p, t):
        return boxloss.ciou_loss(p, t, reduction="none")

    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    p, t = pred.clone().requires_grad_(), target.clone().requires_grad_()
    got = torch.autograd.grad(compiled(p, t), (p, t), grad_out)
    q, u = pred.clone().requires_grad_(), target.clone().requires_grad_()
    want = torch.autograd.grad(reference_loss(q, u, "ciou"), (q, u), grad_out)
    for a, b in zip(got, want):
        assert_close_scaled(a, b, 1e-10)


def test_no_graph_break_is_reported():
    _, step = make_step(boxloss.ciou_loss)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(step)(*inputs())
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_export_of_a_module_with_the_loss():
    class BoxLoss(torch.nn.Module):
        def forward(self, pred, target):
            return boxloss.diou_loss(pred, target, reduction="none")

    pred, target = box_pairs(20, seed=6)
    program = torch.export.export(BoxLoss(), (pred, target))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "boxloss.iou_family_forward.default" in targets, targets
    torch.testing.assert_close(program.module()(pred, target), reference_loss(pred, target, "diou"))


@pytest.mark.parametrize("rows", [0, 4, 6])
def test_opcheck(rows):
    """torch.library.opcheck: schema, fake implementation against the real one, autograd registration."""
    pred, target = box_pairs(40, seed=7, dtype=torch.float64)
    p = pred.clone().requires_grad_(rows > 0)
    t = target.clone().requires_grad_(rows == 6)
    torch.library.opcheck(torch.ops.boxloss.iou_family_forward.default,
                          (p, t, "ciou", 1e-7, False, False, False, rows, None, None))
    if rows:
        g = torch.rand(rows, 40, dtype=torch.float64)
        torch.library.opcheck(torch.ops.boxloss.iou_family_backward.default,
                              (torch.rand(40, dtype=torch.float64), g, rows == 6, None, None))


def test_backend_is_checked_while_tracing():
    def loss(p, t):
        return _kernels.iou_family_loss(p, t, "giou", backend="cuda")

    torch._dynamo.reset()
    with pytest.raises(Exception, match="backend must be one of .* got 'cuda'"):
        torch.compile(loss, fullgraph=True, backend="aot_eager")(*box_pairs(4, seed=1))


@pytest.mark.slow
def test_training_step_with_inductor():
    """The full compiler (C++ code generation on CPU, ~1 minute on 2 cores)."""
    layer, step = make_step(boxloss.ciou_loss)
    features, target = inputs()
    want = step(features, target)
    (want_grad,) = torch.autograd.grad(want, layer.weight)
    torch._dynamo.reset()
    got = torch.compile(step, fullgraph=True)(features, target)
    (got_grad,) = torch.autograd.grad(got, layer.weight)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-10, atol=1e-10)
