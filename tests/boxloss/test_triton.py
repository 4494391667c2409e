"""The Triton kernels of the IoU-family losses (boxloss/_triton.py), run on CPU tensors by Triton's
interpreter, against the plain-autograd reference: the GPU arithmetic checked on every commit.

``TRITON_INTERPRET=1`` is set per test (the ``interpret`` fixture): ``boxloss._kernels`` then
loads an interpreted copy of the kernels, whatever was imported before, and the variable is
restored afterwards, so no other test sees it. Inputs are small (the interpreter runs numpy op by
op), but span several programs with a masked tail. The kernels' GPU build is checked too: they
compile for sm_90a (H100) without a GPU.
"""

import os
import subprocess
import sys

import pytest
import torch
import torchvision.ops as tv

import boxloss
from boxloss import _kernels
from box_cases import box_pairs, degenerate_pairs
from test_kernels import (PUBLIC, TOL, VARIANT_IDS, VARIANTS, assert_close_scaled, assert_same_loss_and_grads,
                          reference_loss, value_and_grads)

triton = pytest.importorskip("triton")

pytestmark = pytest.mark.filterwarnings("ignore:ciou_grad='paper'")

N = 2 * 256 + 7  # three programs of BLOCK = 256 pairs, the last one masked


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def tri(pred, target, kind, eps=1e-7, **options):
    return _kernels.iou_family_loss(pred, target, kind, eps, backend="triton", **options)


@pytest.mark.parametrize("kind,options", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_parity_random_pairs(interpret, kind, options, dtype):
    pred, target = box_pairs(N, seed=21, dtype=dtype)
    got = value_and_grads(tri, pred, target, kind=kind, **options)
    want = value_and_grads(reference_loss, pred, target, kind=kind, **options)
    assert_same_loss_and_grads(got, want, TOL[dtype], finite=True)


@pytest.mark.parametrize("kind,options", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_parity_degenerate_boxes(interpret, kind, options, dtype):
    """Zero width/height, inverted sides, points, ties: finite, and the reference's subgradients."""
    pred, target = degenerate_pairs(dtype)
    got = value_and_grads(tri, pred, target, kind=kind, **options)
    want = value_and_grads(reference_loss, pred, target, kind=kind, **options)
    assert all(torch.isfinite(x).all() for x in got)
    assert_same_loss_and_grads(got, want, TOL[dtype])


@pytest.mark.parametrize("kind", ["giou", "diou", "ciou"])
def test_matches_torchvision(interpret, kind):
    peer = {"giou": tv.generalized_box_iou_loss, "diou": tv.distance_box_iou_loss, "ciou": tv.complete_box_iou_loss}
    pred, target = box_pairs(300, seed=8)
    got = value_and_grads(tri, pred, target, kind=kind)
    want = value_and_grads(lambda p, t, kind: peer[kind](p, t, reduction="none"), pred, target, kind=kind)
    assert_same_loss_and_grads(got, want, 1e-6)


def test_saved_rows_grad_layouts_and_no_grad(interpret):
    """4 saved rows when only the prediction needs a gradient, none without grad; an expanded
    ("sum"), a contiguous and a strided incoming gradient; [B, M, 4] non-contiguous inputs."""
    pred, target = box_pairs(300, seed=33, dtype=torch.float64)
    p = pred.view(10, 30, 4).transpose(0, 1).clone().transpose(0, 1).requires_grad_()  # non-contiguous
    t = target.view(10, 30, 4)
    strided = torch.rand(10, 60, dtype=torch.float64, generator=torch.Generator().manual_seed(4))[:, ::2]
    q = pred.view(10, 30, 4).clone().requires_grad_()
    ref = reference_loss(q, t, "ciou")
    for grad_out in (torch.ones((), dtype=torch.float64).expand(10, 30), strided.contiguous(), strided):
        loss = tri(p, t, "ciou")
        assert loss.shape == (10, 30)
        (gp,) = torch.autograd.grad(loss, p, grad_out)
        (want,) = torch.autograd.grad(ref, q, grad_out, retain_graph=True)
        assert_close_scaled(gp, want, 1e-10)
    with torch.no_grad():
        torch.testing.assert_close(tri(p, t, "ciou"), ref.detach(), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_public_losses_select_triton_from_the_environment(interpret, monkeypatch, dtype):
    """BOXLOSS_KERNEL=triton through the public losses: weights and reductions as for the other
    kernels (the losses reduce), half precision computed in float32."""
    monkeypatch.setenv("BOXLOSS_KERNEL", "triton")
    pred, target = box_pairs(200, seed=16)
    pred, target = pred.to(dtype), target.to(dtype)
    weight = torch.rand(200, 4, generator=torch.Generator().manual_seed(5)).to(dtype)
    for kind, fn in PUBLIC.items():
        p = pred.detach().clone().requires_grad_()
        loss = fn(p, target, weight=weight, avg_factor=50.0)
        assert loss.dtype == torch.float32
        loss.backward()
        assert p.grad.dtype == dtype
        q = pred.detach().float().clone().requires_grad_()
        want = (reference_loss(q, target.float(), kind) * weight.float().mean(-1)).sum() / (
            50.0 + torch.finfo(torch.float32).eps)
        want.backward()
        torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-6)
        tol = 1e-6 if dtype == torch.float32 else 1e-2  # the gradient is rounded to dtype
        assert_close_scaled(p.grad.float(), q.grad, tol)


def test_empty_input(interpret):
    pred = torch.zeros(0, 4, requires_grad=True)
    loss = tri(pred, torch.zeros(0, 4), "giou")
    assert loss.shape == (0,)
    (gp,) = torch.autograd.grad(loss.sum(), pred)
    assert gp.shape == (0, 4)


def test_backend_selection_and_errors(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert _kernels.resolve_backend("auto", cuda) == "triton"  # the CUDA default where Triton is installed
    assert _kernels.resolve_backend("triton", cuda) == "triton"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="backend='triton' runs on CUDA tensors .*TRITON_INTERPRET=1.*got device cpu"):
        _kernels.resolve_backend("triton", cpu)
    monkeypatch.setenv("BOXLOSS_KERNEL", "triton")
    with pytest.raises(ValueError, match="BOXLOSS_KERNEL='triton' runs on CUDA tensors"):
        boxloss.giou_loss(*box_pairs(4, seed=1))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _kernels.resolve_backend("triton", cpu) == "triton"
    monkeypatch.setattr(_kernels, "_HAS_TRITON", False)
    assert _kernels.resolve_backend("auto", cuda) == "eager"  # without Triton: the eager ops
    with pytest.raises(RuntimeError, match="BOXLOSS_KERNEL='triton' needs the triton package"):
        _kernels.resolve_backend(None, cuda)


def test_interpreter_from_the_command_line():
    """The documented use: both variables set before Python starts (Triton reads TRITON_INTERPRET
    when the kernels are decorated)."""
    code = (
        "import torch, boxloss\n"
        "from boxloss import _kernels, _triton\n"
        "from triton.runtime.interpreter import InterpretedFunction\n"
        "assert isinstance(_triton._forward_kernel, InterpretedFunction)\n"
        "p = torch.tensor([[0., 0., 2., 2.]], requires_grad=True); t = torch.tensor([[1., 1., 3., 3.]])\n"
        "loss = boxloss.iou_loss(p, t, eps=1e-30); loss.backward()\n"
        "assert abs(loss.item() - 6 / 7) < 1e-6, loss\n"
        "assert torch.allclose(p.grad, -torch.tensor([[2., 2., 6., 6.]]) / 49), p.grad\n"  # test_kernels' hand case
        "print(_kernels.resolve_backend(None, p.device))\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="1", BOXLOSS_KERNEL="triton")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "triton"


def test_kernels_compile_for_an_h100_without_a_gpu(monkeypatch):
    """The compiled (not interpreted) kernels lower to sm_90a machine code: Triton's front end,
    LLVM and ptxas run on the CPU. What the interpreter cannot see (types, constexpr branches,
    float64 support of every op) fails here."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    mod = _kernels._triton_module()
    target = GPUTarget("cuda", 90, 32)
    for ty in ("*fp32", "*fp64"):
        for kind, rows, log, paper, gated in ((3, 6, False, False, False), (3, 4, False, True, True),
                                              (0, 6, True, False, False)):
            cons = dict(KIND=kind, ROWS=rows, LOG=log, PAPER=paper, GATED=gated, F64=ty == "*fp64", BLOCK=mod.BLOCK)
            sig = {k: ty for k in ("pred_ptr", "target_ptr", "loss_ptr", "grad_ptr", "c_ptr")}
            sig |= {"n": "i32"} | {k: "constexpr" for k in cons}
            try:
                compiled = triton.compile(ASTSource(fn=mod._forward_kernel, signature=sig, constexprs=cons),
                                          target=target)
            except RuntimeError as e:  # pragma: no cover - a Triton wheel without its bundled ptxas
                if "ptxas" in str(e):
                    pytest.skip(f"no ptxas for sm_90a: {e}")
                raise
            assert compiled.asm["cubin"]
        cons = dict(ROWS=6, NEED_T=True, BLOCK=mod.BLOCK)
        sig = {"grad_ptr": ty, "go_ptr": ty, "go_stride": "i32", "gp_ptr": ty, "gt_ptr": ty, "n": "i32"}
        sig |= {k: "constexpr" for k in cons}
        assert triton.compile(ASTSource(fn=mod._backward_kernel, signature=sig, constexprs=cons), target=target)
