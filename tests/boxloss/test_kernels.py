"""The analytic-gradient kernels of the IoU-family losses against the plain-autograd reference.

The reference is ``boxloss.boxes._iou_family`` differentiated by autograd (plus, for
``ciou_grad="paper"``, the zero-valued surrogate term the losses used before the kernels: its
gradient is the authors' alpha * dv without the 1 / (w^2 + h^2) factor). Values and both gradients
must agree to 1e-6 (float32) / 1e-10 (float64) relative to their scale, on random pairs of every
kind (general, disjoint, contained, identical, touching) and on degenerate boxes.
"""

import math
import os

import pytest
import torch
import torchvision.ops as tv

import boxloss
from boxloss import _kernels
from boxloss.boxes import _aspect_angle, _aspect_v, _iou_family, _size
from box_cases import box_pairs, degenerate_pairs

# the paper gradient on pixel-sized boxes: a parity check, not a use (its warning: test_numerics)
pytestmark = pytest.mark.filterwarnings("ignore:ciou_grad='paper'")

# the cuda marker lets `pytest -m cuda` (tools/gpu_check.py) select every CUDA case
CUDA = pytest.param("cuda", marks=[pytest.mark.cuda,
                                   pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])
DEVICES = ["cpu", CUDA]
TOL = {torch.float32: 1e-6, torch.float64: 1e-10}

# (kind, options) covering every option of the four losses
VARIANTS = [
    ("iou", {}),
    ("iou", {"mode": "log"}),
    ("giou", {}),
    ("diou", {}),
    ("ciou", {}),
    ("ciou", {"ciou_grad": "paper"}),
    ("ciou", {"alpha": "gated"}),
    ("ciou", {"ciou_grad": "paper", "alpha": "gated"}),
]
VARIANT_IDS = [k + "".join(f"-{v}" for v in o.values()) for k, o in VARIANTS]
PUBLIC = {"iou": boxloss.iou_loss, "giou": boxloss.giou_loss, "diou": boxloss.diou_loss, "ciou": boxloss.ciou_loss}


def reference_loss(pred, target, kind, eps=1e-7, mode="linear", ciou_grad="exact", alpha="standard"):
    """Per-pair loss by plain autograd: the formulation the kernels must reproduce."""
    metric, iou = _iou_family(pred, target, kind, eps, pairwise=False, ciou_alpha=alpha)
    if kind == "iou" and mode == "log":
        lg = iou + eps  # capped at 1 (the loss >= 0), without gradient where the cap holds
        return -torch.log(torch.where(lg < 1, lg, torch.ones_like(lg)))
    loss = 1 - metric
    if kind == "ciou" and ciou_grad == "paper":
        # zero-valued term whose gradient turns alpha * dv/d(w, h) into the paper's version:
        # ds/dw1 = -k h1, ds/dh1 = +k w1, ds/dw2 = +k h2, ds/dh2 = -k w2, k = 8/pi^2 delta
        w1, h1 = _size(pred[..., 2] - pred[..., 0]), _size(pred[..., 3] - pred[..., 1])
        w2, h2 = _size(target[..., 2] - target[..., 0]), _size(target[..., 3] - target[..., 1])
        v = _aspect_v(w1, h1, w2, h2)
        with torch.no_grad():
            a = v / (1 - iou + v + eps)
            if alpha == "gated":
                a = a * (iou > 0.5).to(a.dtype)
            k = (8 / math.pi**2) * (_aspect_angle(w2, h2) - _aspect_angle(w1, h1))
        s = k * (w1.detach() * h1 - h1.detach() * w1 + h2.detach() * w2 - w2.detach() * h2)
        surrogate = s - v
        loss = loss + a * (surrogate - surrogate.detach())
    return loss


def kernel_loss(pred, target, kind, **options):
    """The public loss (which runs on the kernel: the compiled loops on CPU), unreduced."""
    return PUBLIC[kind](pred, target, reduction="none", **options)


def native(pred, target, kind, eps=1e-7, **options):
    """The compiled CPU loops (boxloss._native), asked for explicitly."""
    return _kernels.iou_family_loss(pred, target, kind, eps, backend="native", **options)


def eager(pred, target, kind, eps=1e-7, **options):
    """The eager-PyTorch kernel (the GPU path, and the CPU fallback without a compiler)."""
    return _kernels.iou_family_loss(pred, target, kind, eps, backend="eager", **options)


def small_chunks(pred, target, kind, eps=1e-7, **options):
    """The eager kernel with 7-pair chunks: many chunks and an overlapping last one."""
    return _kernels.iou_family_loss(pred, target, kind, eps, chunk=7, backend="eager", **options)


def triton(pred, target, kind, eps=1e-7, **options):
    """The Triton kernels (the CUDA default; on CPU tensors tests/boxloss/test_triton.py runs them
    through Triton's interpreter)."""
    return _kernels.iou_family_loss(pred, target, kind, eps, backend="triton", **options)


IMPLEMENTATIONS = {"reference": reference_loss, "kernel": kernel_loss, "native": native, "eager": eager,
                   "eager-chunk7": small_chunks, "triton": triton}
KERNELS = ["native", "eager", "eager-chunk7", "triton"]  # every kernel, each by name
# without the extension, test_native_extension_is_built says why; the native tests skip
NEEDS_NATIVE = pytest.mark.skipif(not _kernels.native_available(), reason="boxloss._native is not built")


def skip_native_off_cpu(impl, device):
    if impl == "triton" and device == "cpu":
        pytest.skip("Triton on CPU tensors: the interpreter, in tests/boxloss/test_triton.py")
    if impl == "triton" and not _kernels.triton_available():
        pytest.skip("triton is not installed")
    if impl == "native" and device != "cpu":
        pytest.skip("the compiled loops are CPU-only (GPUs run the eager kernel)")
    if impl == "native" and not _kernels.native_available():
        pytest.skip("boxloss._native is not built (see test_native_extension_is_built)")


def value_and_grads(fn, pred, target, grad_out=None, **kw):
    p = pred.detach().clone().requires_grad_()
    t = target.detach().clone().requires_grad_()
    loss = fn(p, t, **kw)
    if grad_out is None:
        grad_out = torch.rand(loss.shape, generator=torch.Generator().manual_seed(0), dtype=loss.dtype) + 0.5
    gp, gt = torch.autograd.grad(loss, (p, t), grad_out.to(loss.device))
    return loss.detach(), gp, gt


def assert_close_scaled(actual, expected, tol):
    """|actual - expected| <= tol * max|expected| (+ tol * |expected|): relative to the tensor's scale.

    Gradients of identical boxes are differences of O(1/w) terms that cancel to O(eps): both sides
    are rounding noise there, so an elementwise relative test would compare noise with noise.
    """
    scale = expected.abs().max().clamp(min=torch.finfo(expected.dtype).tiny)
    torch.testing.assert_close(actual / scale, expected / scale, rtol=tol, atol=tol)


def assert_same_loss_and_grads(got, want, tol, *, finite=False):
    """``(loss, d/dpred, d/dtarget)`` triples agree: the loss to ``tol``, each gradient to ``tol`` of
    its scale (:func:`assert_close_scaled`); ``finite`` also requires finite gradients."""
    torch.testing.assert_close(got[0], want[0], rtol=tol, atol=tol)
    for name, a, b in zip(("d/dpred", "d/dtarget"), got[1:], want[1:]):
        if finite:
            assert torch.isfinite(a).all(), name
        assert_close_scaled(a, b, tol)


# ---------------------------------------------------------------- parity with the reference


@pytest.mark.parametrize("impl", KERNELS)
@pytest.mark.parametrize("kind,options", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("device", DEVICES)
def test_parity_random_pairs(impl, kind, options, dtype, device):
    skip_native_off_cpu(impl, device)
    pred, target = box_pairs(2000, seed=21, dtype=dtype)
    pred, target = pred.to(device), target.to(device)
    got = value_and_grads(IMPLEMENTATIONS[impl], pred, target, kind=kind, **options)
    want = value_and_grads(reference_loss, pred, target, kind=kind, **options)
    assert_same_loss_and_grads(got, want, TOL[dtype], finite=True)


@pytest.mark.parametrize("kind,options", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("device", DEVICES)
def test_parity_degenerate_boxes(kind, options, dtype, device):
    """Zero width/height, inverted sides, points: finite, and the reference's values and gradients."""
    pred, target = degenerate_pairs(dtype)
    pred, target = pred.to(device), target.to(device)
    cpu_kernels = KERNELS[:3] if _kernels.native_available() else KERNELS[1:3]
    for impl in cpu_kernels if device == "cpu" else KERNELS[1:] if _kernels.triton_available() else KERNELS[1:3]:
        got = value_and_grads(IMPLEMENTATIONS[impl], pred, target, kind=kind, **options)
        want = value_and_grads(reference_loss, pred, target, kind=kind, **options)
        assert all(torch.isfinite(x).all() for x in got), got
        assert_same_loss_and_grads(got, want, TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_parity_per_pair(dtype):
    """Each pair against its own scale, so no case can hide behind another's larger gradients.

    The scale of a pair is its largest reference gradient component, or 1 / (its smallest side)
    where that is larger: the size of the terms that cancel for identical boxes (whose exact
    gradient is O(eps), so any float implementation returns rounding noise of that size there).
    In float32 both are compared with the float64 reference: the kernel may not be further from
    it than the float32 reference is, plus 1e-6 of the scale (in float32 the reference's own
    rounding reaches ~1e-6 of a pair's scale, e.g. CIoU's paper gradient multiplies the rounding
    of atan(w_g/h_g) - atan(w/h) by h).
    """
    pred, target = box_pairs(1000, seed=4, dtype=dtype)
    sides = torch.cat([pred[:, 2:] - pred[:, :2], target[:, 2:] - target[:, :2]], 1)
    term = (1 / sides.min(1).values)[:, None]
    tol = TOL[dtype]
    for kind, options in VARIANTS:
        got = value_and_grads(kernel_loss, pred, target, kind=kind, **options)
        want = value_and_grads(reference_loss, pred, target, kind=kind, **options)
        exact = value_and_grads(reference_loss, pred.double(), target.double(), kind=kind, **options)
        scale = torch.maximum(torch.cat(exact[1:], 1).abs().amax(1, keepdim=True), term.double())
        for a, b, x in zip(got[1:], want[1:], exact[1:]):
            ours = (a.double() - x).abs()
            theirs = (b.double() - x).abs() if dtype == torch.float32 else 0
            excess = ((ours - theirs) / scale).max().item()
            assert excess <= tol, (kind, options, excess)


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("kind", ["giou", "diou", "ciou"])
def test_matches_torchvision(impl, kind):
    """The reference and the kernels against torchvision.ops (values and gradients, float32)."""
    skip_native_off_cpu(impl, "cpu")
    peer = {"giou": tv.generalized_box_iou_loss, "diou": tv.distance_box_iou_loss, "ciou": tv.complete_box_iou_loss}
    pred, target = box_pairs(3000, seed=8)
    got = value_and_grads(IMPLEMENTATIONS[impl], pred, target, kind=kind)
    want = value_and_grads(lambda p, t, kind: peer[kind](p, t, reduction="none"), pred, target, kind=kind)
    assert_same_loss_and_grads(got, want, 1e-6)


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
def test_hand_worked_gradient(impl):
    """IoU loss of [0,0,2,2] vs [1,1,3,3] (I = 1, U = 7, eps negligible), derivatives by hand.

    pred x2 (owns the intersection's right edge, ih = 1, h = 2): I +d, U +2d-d: dIoU = (7-1)/49.
    pred x1 (outside the intersection): area -2d: dIoU = (0 + 2)/49.
    target x1 (owns the intersection's left edge): I -d, U -2d+d: dIoU = (-7 + 1)/49.
    target x2 (outside the intersection): area +2d: dIoU = -2/49. Same in y; the loss is 1 - IoU.
    """
    skip_native_off_cpu(impl, "cpu")
    p = torch.tensor([[0.0, 0.0, 2.0, 2.0]], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([[1.0, 1.0, 3.0, 3.0]], dtype=torch.float64, requires_grad=True)
    loss = IMPLEMENTATIONS[impl](p, t, kind="iou", eps=1e-300)
    torch.testing.assert_close(loss, torch.tensor([6 / 7], dtype=torch.float64))
    gp, gt = torch.autograd.grad(loss.sum(), (p, t))
    torch.testing.assert_close(gp[0], -torch.tensor([2, 2, 6, 6], dtype=torch.float64) / 49)
    torch.testing.assert_close(gt[0], -torch.tensor([-6, -6, -2, -2], dtype=torch.float64) / 49)


# ---------------------------------------------------------------- how the kernel is called


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("kind", list(PUBLIC))
def test_reductions_weights_and_grad_outputs(kind, reduction):
    """'sum' hands backward a stride-0 gradient, 'mean' a materialised one, 'none' a random one."""
    pred, target = box_pairs(500, seed=12, dtype=torch.float64)
    weight = torch.rand(500, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for w in (None, weight):
        for avg_factor in ((None, 37.0) if reduction == "mean" else (None,)):
            kw = dict(weight=w, reduction=reduction, avg_factor=avg_factor)
            got = value_and_grads(lambda p, t, kind: PUBLIC[kind](p, t, **kw), pred, target,
                                  grad_out=torch.ones(()) if reduction != "none" else None, kind=kind)

            def ref(p, t, kind):
                loss = reference_loss(p, t, kind)
                loss = loss * w if w is not None else loss
                if reduction == "none":
                    return loss
                if reduction == "sum":
                    return loss.sum()
                # the mean over avg_factor is MMDetection's sum / (avg_factor + float32 eps)
                return loss.sum() / (avg_factor + torch.finfo(torch.float32).eps) if avg_factor else loss.mean()

            want = value_and_grads(ref, pred, target, grad_out=got[0].new_ones(()) if reduction != "none" else None,
                                   kind=kind)
            assert_same_loss_and_grads(got, want, 1e-10)


def test_batch_shapes_and_non_contiguous_inputs():
    pred, target = box_pairs(60, seed=13, dtype=torch.float64)
    # [2, 5, 6, 4] batch, and columns taken from a wider tensor (row stride 8)
    wide = torch.cat([pred, torch.zeros(60, 4, dtype=torch.float64)], 1)[:, :4]
    assert not wide.is_contiguous()
    for p, t in ((pred.view(2, 5, 6, 4), target.view(2, 5, 6, 4)), (wide, target)):
        got = value_and_grads(kernel_loss, p, t, kind="ciou")
        want = value_and_grads(reference_loss, p, t, kind="ciou")
        assert got[0].shape == p.shape[:-1] and got[1].shape == p.shape
        assert_same_loss_and_grads(got, want, 1e-10)
    # a single box [4] gives a scalar loss
    loss = kernel_loss(pred[0].requires_grad_(), target[0], kind="giou")
    assert loss.shape == ()
    torch.testing.assert_close(loss, reference_loss(pred[0], target[0], "giou"))


@pytest.mark.parametrize("kind", list(PUBLIC))
@pytest.mark.parametrize("device", DEVICES)
def test_empty_input(kind, device):
    pred = torch.zeros(0, 4, device=device, requires_grad=True)
    target = torch.zeros(0, 4, device=device, requires_grad=True)
    loss = _kernels.iou_family_loss(pred, target, kind)
    assert loss.shape == (0,)
    gp, gt = torch.autograd.grad(loss.sum(), (pred, target))
    assert gp.shape == (0, 4) and gt.shape == (0, 4)
    mean = PUBLIC[kind](pred, target)  # "mean" of nothing is 0 and keeps the graph
    assert mean.item() == 0.0 and mean.requires_grad
    mean.backward()
    assert pred.grad.shape == (0, 4)


def test_only_pred_requires_grad_and_no_grad_mode():
    pred, target = box_pairs(300, seed=14, dtype=torch.float64)
    for kind, options in VARIANTS:
        p = pred.clone().requires_grad_()
        loss = kernel_loss(p, target, kind=kind, **options)
        (gp,) = torch.autograd.grad(loss.sum(), p)
        p2, t2 = pred.clone().requires_grad_(), target.clone().requires_grad_()
        ref = reference_loss(p2, t2, kind, **options)
        (gp_ref,) = torch.autograd.grad(ref.sum(), p2)
        assert_close_scaled(gp, gp_ref, 1e-10)
        with torch.no_grad():
            value = kernel_loss(pred.requires_grad_(), target, kind=kind, **options)
        pred.requires_grad_(False)
        assert not value.requires_grad
        torch.testing.assert_close(value, ref.detach(), rtol=1e-10, atol=1e-10)


def test_results_do_not_depend_on_the_chunk_size():
    """Elementwise ops in the same order per pair: bit-identical whatever the chunking."""
    pred, target = box_pairs(1000, seed=15)
    base = value_and_grads(lambda p, t: _kernels.iou_family_loss(p, t, "ciou", backend="eager"), pred, target)
    for chunk in (1, 7, 128, 999, 4096):
        got = value_and_grads(lambda p, t: _kernels.iou_family_loss(p, t, "ciou", chunk=chunk, backend="eager"),
                              pred, target)
        for a, b in zip(got, base):
            assert torch.equal(a, b), chunk


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_runs_in_float32(dtype):
    pred, target = box_pairs(200, seed=16)
    p = pred.to(dtype).requires_grad_()
    loss = boxloss.ciou_loss(p, target.to(dtype), reduction="sum")
    assert loss.dtype == torch.float32
    loss.backward()
    assert p.grad.dtype == dtype
    want = value_and_grads(reference_loss, pred.to(dtype).float(), target.to(dtype).float(), kind="ciou",
                           grad_out=torch.ones(200))
    torch.testing.assert_close(loss, want[0].sum(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(p.grad.float(), want[1].to(dtype).float(), rtol=0.02, atol=1e-3)


def test_not_twice_differentiable():
    """The gradient is closed-form, not traced: double backward must fail loudly, not silently."""
    pred, target = box_pairs(10, seed=17, dtype=torch.float64)
    p = pred.requires_grad_()
    w = torch.rand(10, dtype=torch.float64, requires_grad=True)  # gives the incoming gradient a history
    (g,) = torch.autograd.grad(boxloss.giou_loss(p, target, weight=w), p, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        g.sum().backward()


# ---------------------------------------------------------------- memory kept for backward


def saved_bytes(fn, pred, target) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(pred, target)
    return total


@pytest.mark.parametrize("kind", ["giou", "diou", "ciou"])
def test_saved_for_backward_is_at_most_a_quarter_of_torchvision(kind):
    peer = {"giou": tv.generalized_box_iou_loss, "diou": tv.distance_box_iou_loss, "ciou": tv.complete_box_iou_loss}
    n = 4096
    pred, target = box_pairs(n, seed=18)
    p, t = pred.requires_grad_(), target.requires_grad_()
    ours = saved_bytes(lambda a, b: PUBLIC[kind](a, b, reduction="mean"), p, t)
    theirs = saved_bytes(lambda a, b: peer[kind](a, b, reduction="mean"), p, t)
    assert ours == 6 * 4 * n  # six float32 numbers per pair, nothing else
    assert ours <= theirs / 4, (ours, theirs)
    # a target without gradient: only the prediction's four
    assert saved_bytes(lambda a, b: PUBLIC[kind](a, b), p, target.detach()) == 4 * 4 * n


def test_kernel_argument_errors():
    pred, target = box_pairs(5, seed=20)
    with pytest.raises(ValueError, match="kind must be one of .* got 'ious'"):
        _kernels.iou_family_loss(pred, target, "ious")
    with pytest.raises(ValueError, match="ciou_grad must be one of .* got 'approx'"):
        _kernels.iou_family_loss(pred, target, "ciou", ciou_grad="approx")
    with pytest.raises(ValueError, match=r"same shape \[\.\.\., 4\], got \(5, 4\) and \(4, 4\)"):
        _kernels.iou_family_loss(pred, target[:4], "giou")
    with pytest.raises(TypeError, match="float32 or float64 .* got torch.float16"):
        _kernels.iou_family_loss(pred.half(), target.half(), "giou")
    with pytest.raises(ValueError, match="chunk must be a positive int or None, got 0"):
        _kernels.iou_family_loss(pred, target, "giou", chunk=0)


def test_pooled_outputs_are_never_reused_while_held():
    """Large CPU outputs come from a pool; one still referenced (a kept loss, a .grad, a view of
    it, the saved rows of a graph not yet run backward) must not be overwritten by later calls."""
    n = 70_000  # the saved rows (6 n floats) and the gradients (4 n) are above the pool's 1 MiB
    pred, target = box_pairs(n, seed=23)
    other_p, other_t = box_pairs(n, seed=24)
    p = pred.clone().requires_grad_()
    first = boxloss.diou_loss(p, target, reduction="sum")  # graph 1: saved rows held by autograd
    kept_grad = torch.autograd.grad(boxloss.giou_loss(p, target, reduction="sum"), p)[0]
    grad_view = kept_grad[::2]  # only a view survives
    grad_copy = grad_view.clone()
    del kept_grad
    for _ in range(3):  # churn the pool with other calls of the same size
        q = other_p.clone().requires_grad_()
        boxloss.diou_loss(q, other_t, reduction="sum").backward()
    torch.testing.assert_close(grad_view, grad_copy, rtol=0, atol=0)
    (g1,) = torch.autograd.grad(first, p)  # graph 1 still gives its own gradient
    (want,) = torch.autograd.grad(reference_loss(p, target, "diou").sum(), p)
    assert_close_scaled(g1, want, 1e-6)


def test_kept_cpu_workspace_is_one_chunk():
    """A large input runs in 128k-pair chunks: the workspace kept per thread stays one chunk long
    (25 MB in float32), not the input's length; the last chunk overlaps its neighbour, same bits."""
    n = _kernels._CPU_CHUNK + 5000
    pred, target = box_pairs(n, seed=25)
    got = value_and_grads(lambda p, t: eager(p, t, "giou"), pred, target)
    assert _kernels._local.workspaces[(torch.device("cpu"), torch.float32, None)].cap == _kernels._CPU_CHUNK
    want = value_and_grads(lambda p, t: _kernels.iou_family_loss(p, t, "giou", chunk=n, backend="eager"),
                           pred, target)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- the compiled loops


def _c_compiler() -> str | None:
    """The C compiler setuptools would use (sysconfig's CC, else cc/gcc/clang on PATH)."""
    import shutil
    import sysconfig

    cc = (sysconfig.get_config_var("CC") or "").split()
    return next((shutil.which(c) for c in cc[:1] + ["cc", "gcc", "clang"] if shutil.which(c)), None)


def test_native_extension_is_built():
    """`pip install -e .` (make test, make demo) compiles boxloss._native; the CPU default uses it.

    Without it the losses still work (eager kernel), but 3-4x slower: where a C compiler exists, an
    install that lost the extension must not pass as a complete one. (On a machine with no compiler
    at all, the eager kernel is the expected outcome, and the parity tests cover it.)
    """
    if not _kernels.native_available() and _c_compiler() is None:
        pytest.skip("no C compiler on this machine: the install falls back to the eager kernel")
    assert _kernels.native_available(), "boxloss._native is not built: reinstall (pip install -e .)"
    assert _kernels.resolve_backend(None, torch.device("cpu")) == "native"


def test_backend_selection_and_errors(monkeypatch):
    cpu, meta = torch.device("cpu"), torch.device("meta")
    assert _kernels.resolve_backend("eager", cpu) == "eager"
    assert _kernels.resolve_backend("auto", meta) == "eager"  # off the CPU: the eager kernel
    monkeypatch.setenv("BOXLOSS_KERNEL", "eager")
    assert _kernels.resolve_backend(None, cpu) == "eager"
    monkeypatch.setenv("BOXLOSS_KERNEL", "fast")
    with pytest.raises(ValueError, match=r"BOXLOSS_KERNEL must be one of \('auto', 'native', 'eager', 'triton'\), "
                                         r"got 'fast'"):
        _kernels.resolve_backend(None, cpu)
    with pytest.raises(ValueError, match="backend must be one of .* got 'c'"):
        _kernels.iou_family_loss(torch.zeros(1, 4), torch.zeros(1, 4), "giou", backend="c")
    with pytest.raises(ValueError, match="backend='native' runs on CPU tensors only, got device meta"):
        _kernels.resolve_backend("native", meta)
    monkeypatch.setattr(_kernels, "_native", None)
    assert _kernels.resolve_backend("auto", cpu) == "eager"
    with pytest.raises(RuntimeError, match="needs the compiled extension boxloss._native"):
        _kernels.resolve_backend("native", cpu)


@NEEDS_NATIVE
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", list(PUBLIC))
def test_native_threads_and_grad_layouts(kind, dtype, monkeypatch):
    """200k pairs: the loops split over threads (ranges of >= 16384 pairs); against the eager kernel
    (same formulas: equal to rounding) with an expanded ("sum"), a contiguous and a strided incoming
    gradient, with 1, 2 and 3 threads."""
    n = 200_000
    pred, target = box_pairs(n, seed=31, dtype=dtype)
    strided = torch.rand(2 * n, dtype=dtype, generator=torch.Generator().manual_seed(4))[::2]
    for grad_out in (torch.ones((), dtype=dtype).expand(n), strided.contiguous(), strided):
        want = value_and_grads(eager, pred, target, grad_out=grad_out, kind=kind)
        for threads in (1, 2, 3):
            monkeypatch.setattr(torch, "get_num_threads", lambda t=threads: t)
            got = value_and_grads(native, pred, target, grad_out=grad_out, kind=kind)
            for a, b in zip(got, want):
                assert_close_scaled(a, b, TOL[dtype])


@NEEDS_NATIVE
def test_native_only_pred_requires_grad_and_batch_shapes():
    """4 saved rows when only the prediction needs a gradient; [B, M, 4] and non-contiguous inputs."""
    pred, target = box_pairs(600, seed=33, dtype=torch.float64)
    p = pred.view(20, 30, 4).transpose(0, 1).clone().transpose(0, 1).requires_grad_()  # non-contiguous
    t = target.view(20, 30, 4)
    loss = native(p, t, "ciou")
    assert loss.shape == (20, 30)
    (gp,) = torch.autograd.grad(loss.sum(), p)
    q = pred.view(20, 30, 4).clone().requires_grad_()
    (want,) = torch.autograd.grad(reference_loss(q, t, "ciou").sum(), q)
    assert_close_scaled(gp, want, 1e-10)


def test_pool_evicts_by_identity():
    """More large outputs than the pool keeps: it drops a free buffer (by identity, not ==)."""
    pool = _kernels._Pool()
    held = [pool.empty((300_000 + 1000 * i,), torch.float32) for i in range(pool._MAX_BUFFERS)]
    extra = pool.empty((400_000,), torch.float32)  # pool full, all held: a fresh, unpooled tensor
    assert all(extra.data_ptr() != h.data_ptr() for h in held)
    del held[0]
    again = pool.empty((500_000,), torch.float32)  # evicts the freed buffer, keeps the held ones
    assert len(pool._bufs) == pool._MAX_BUFFERS
    assert all(again.data_ptr() != h.data_ptr() for h in held)


# ---------------------------------------------------------------- devices (fake CUDA: no driver needed)


def fake_cuda_mode():
    """This torch build creates fake CUDA tensors without a driver; mixing them with CPU tensors in
    an op raises FakeTensorDeviceMismatchError, so a forward that runs through is device-clean."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(allow_non_fake_inputs=False)


@pytest.mark.parametrize("kind", list(PUBLIC))
def test_target_on_another_device_is_a_value_error(kind):
    """CPU pred + CUDA target used to hand a device pointer to the C loops (a crash); CUDA pred +
    CPU target copied the target host-to-device chunk by chunk."""
    with fake_cuda_mode():
        cpu, cuda = torch.zeros(8, 4), torch.zeros(8, 4, device="cuda")
        for pred, target, (a, b) in ((cpu, cuda, ("cpu", "cuda:0")), (cuda, cpu, ("cuda:0", "cpu"))):
            msg = rf"target must be on the device of pred \({a}\), got {b}"
            with pytest.raises(ValueError, match=msg):
                PUBLIC[kind](pred, target)
            with pytest.raises(ValueError, match=msg):
                _kernels.iou_family_loss(pred, target, kind, backend="eager")


def test_check_same_device_names_both_devices():
    """The check for every tensor argument of a loss (weight included: losses.py's entry)."""
    with fake_cuda_mode():
        pred, weight = torch.zeros(8, 4), torch.zeros(8, device="cuda")
        msg = r"weight must be on the device of pred \(cpu\), got cuda:0"
        with pytest.raises(ValueError, match=msg):
            _kernels.check_same_device(pred, target=torch.zeros(8, 4), weight=weight)
        _kernels.check_same_device(pred, target=torch.zeros(8, 4), weight=None)  # None is skipped


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind,options", VARIANTS, ids=VARIANT_IDS)
def test_losses_on_fake_cuda_tensors(kind, options, dtype):
    """Every loss and option on (fake) CUDA tensors, with per-pair and per-coordinate weights and
    each reduction: no device mismatch anywhere, float32 results on the GPU. (Backward cannot run
    on fake CUDA tensors: the autograd engine asks the driver for a context; the backward op's
    shapes are checked in test_eager_kernel_on_fake_cuda_tensors and tests/boxloss/test_compile.py.)"""
    with fake_cuda_mode():
        pred = torch.zeros(6, 5, 4, device="cuda", dtype=dtype, requires_grad=True)
        target = torch.zeros(6, 5, 4, device="cuda", dtype=dtype)
        for weight in (None, torch.zeros(6, 5, device="cuda"), torch.zeros(6, 5, 4, device="cuda", dtype=dtype)):
            for reduction in ("none", "mean", "sum"):
                loss = PUBLIC[kind](pred, target, weight=weight, reduction=reduction, **options)
                assert loss.device.type == "cuda" and loss.dtype == torch.float32
                assert loss.shape == ((6, 5) if reduction == "none" else ())
                assert loss.requires_grad


@pytest.mark.parametrize("kind", list(PUBLIC))
def test_eager_kernel_on_fake_cuda_tensors(kind):
    """The eager kernel's own constants, workspace and outputs are made on the input's device, and
    fake tensors are never cached (a later real call must not get them)."""
    with fake_cuda_mode():
        p = torch.zeros(3000, 4, device="cuda")
        t = torch.zeros(3000, 4, device="cuda")
        loss, g = _kernels._forward(kind, p, t, 1e-7, False, False, False, 6, 1024, "eager")
        assert loss.device.type == "cuda" and g.shape == (6, 3000) and g.device.type == "cuda"
        gp, gt = _kernels._backward(torch.zeros(3000, device="cuda"), g, True, 1024)
        assert gp.device.type == "cuda" and gt.shape == (3000, 4)
        gp, gt = torch.ops.boxloss.iou_family_backward(torch.zeros(3000, device="cuda"), g, False, None, "eager")
        assert gp.shape == (3000, 4) and gt.shape == (0, 4)
    assert all(k[0].type != "cuda" for k in _kernels._Consts._cache)
    assert all(k[0].type != "cuda" for k in getattr(_kernels._local, "workspaces", {}))
    got = value_and_grads(eager, *box_pairs(50, seed=40), kind=kind)  # real tensors after the fake ones
    want = value_and_grads(reference_loss, *box_pairs(50, seed=40), kind=kind)
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-6)


def test_gpu_workspace_and_views_are_kept():
    """Off the CPU the workspace is built once per (device, dtype) and kept, and so are its views
    for the same chunk length (~170 us of Python a call otherwise); a new length builds new views."""
    meta = torch.device("meta")  # a non-CPU device that runs the eager ops without data
    p = torch.empty(5000, 4, device=meta)
    _kernels._forward("ciou", p, p, 1e-7, False, False, False, 6, None, "eager")
    ws = _kernels._local.workspaces[(meta, torch.float32, None)]
    views = ws._views
    _kernels._forward("ciou", p, p, 1e-7, False, False, False, 6, None, "eager")
    assert _kernels._local.workspaces[(meta, torch.float32, None)] is ws
    assert ws._views is views
    q = torch.empty(3000, 4, device=meta)
    _kernels._forward("ciou", q, q, 1e-7, False, False, False, 6, None, "eager")
    assert ws._views is not views and ws._views.c == 3000


def test_first_loss_of_a_process_under_inference_mode():
    """The first IoU-family call of a process may come under torch.inference_mode() (an evaluation
    script): every kind, option and CPU kernel, in a fresh interpreter, equals the same call after."""
    import subprocess
    import sys

    code = (
        "import torch, boxloss\n"
        "from boxloss import _kernels\n"
        "g = torch.Generator().manual_seed(0)\n"
        "p = torch.rand(64, 4, generator=g, dtype=torch.float64) * 10; p[:, 2:] += p[:, :2]\n"
        "t = torch.rand(64, 4, generator=g, dtype=torch.float64) * 10; t[:, 2:] += t[:, :2]\n"
        f"variants = {VARIANTS!r}\n"
        "backends = ['eager'] + (['native'] if _kernels.native_available() else [])\n"
        "with torch.inference_mode():\n"
        "    first = [_kernels.iou_family_loss(p, t, k, backend=b, **o) for b in backends for k, o in variants]\n"
        "    public = boxloss.ciou_loss(p, t)\n"
        "again = [_kernels.iou_family_loss(p, t, k, backend=b, **o) for b in backends for k, o in variants]\n"
        "assert all(torch.equal(a, b) for a, b in zip(first, again))\n"
        "assert torch.equal(public, boxloss.ciou_loss(p, t))\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_bench_native_backend_leaves_cuda_rows_on_a_gpu_kernel(monkeypatch, capsys):
    """tools/bench_losses.py --backend native set BOXLOSS_KERNEL=native for every row, and the CUDA
    rows then raised: the CPU and CUDA rows have their own kernel, and the variable is restored."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "tools" / "bench_losses.py"
    spec = importlib.util.spec_from_file_location("bench_losses", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    cuda = torch.device("cuda")
    for cuda_backend in ("auto", "eager", "triton"):
        backend = bench.backend_for("cuda", "native", cuda_backend)
        assert backend == cuda_backend
        if backend != "triton" or _kernels.triton_available():
            assert _kernels.resolve_backend(backend, cuda) in ("eager", "triton")
    assert bench.backend_for("cpu", "native", "auto") == "native"
    monkeypatch.setenv("BOXLOSS_KERNEL", "eager")
    bench.main(["--device", "cpu", "--sizes", "200", "--repeats", "5", "--warmup", "0", "--losses", "giou",
                "--backend", "native" if _kernels.native_available() else "eager"])
    assert os.environ["BOXLOSS_KERNEL"] == "eager"
    assert "| cpu | 2e+02 | giou |" in capsys.readouterr().out


# ---------------------------------------------------------------- tools/gpu_check.py (its CPU-testable parts)


def load_gpu_check():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "tools" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_plan_fits_eight_minutes(capsys, tmp_path):
    check = load_gpu_check()
    assert sum(check.BUDGETS.values()) <= check.TOTAL_BUDGET <= 8 * 60 - 10
    assert check.main(["--dry-run", "--out", str(tmp_path)]) == 0  # the GPU plan, printed without a GPU
    printed = capsys.readouterr().out
    for name in check.BUDGETS:
        assert name in printed, name
    assert "-m cuda" in printed and "--device cuda" in printed and "--sizes 1e4 1e5 1e6 1e7" in printed
    assert "--mode paper" in printed and "--mode exact" in printed
    assert not (tmp_path / "report.md").exists()


def test_gpu_check_records_each_failure_and_goes_on(monkeypatch, tmp_path):
    """A failing, a timed-out and a skipped step are recorded in the report; the others still run."""
    import sys

    check = load_gpu_check()
    py = sys.executable
    plan = [
        dict(name="build", budget=30, cmd=[py, "-c", "print('built')"]),
        dict(name="cuda-tests", budget=30, cmd=[py, "-c", "import sys; print('3 failed'); sys.exit(3)"]),
        dict(name="bench-losses", budget=1, cmd=[py, "-c", "import time; time.sleep(30)"]),
        dict(name="bench-nms", budget=40, skip="tools/bench_nms.py has no --device flag"),
        dict(name="simulation-paper", budget=30, cmd=[py, "-c", "print('after the failures')"]),
    ]
    monkeypatch.setattr(check, "steps", lambda args: plan)
    assert check.main(["--device", "cpu", "--out", str(tmp_path)]) == 1
    report = (tmp_path / "report.md").read_text()
    assert "| build | passed |" in report
    assert "| cuda-tests | failed (exit status 3) |" in report and "3 failed" in report
    assert "| bench-losses | timed out after 1 s |" in report
    assert "Skipped: tools/bench_nms.py has no --device flag" in report
    assert "| simulation-paper | passed |" in report and "after the failures" in report
    assert (tmp_path / "cuda-tests.log").read_text().strip() == "3 failed"


def test_gpu_check_detector_step_counts_the_box_loss(tmp_path):
    """The training-step timing (toy size on CPU): the default head makes no boxloss call, the CIoU
    head makes some, whose standalone time gives the loss's share of a step."""
    import json

    check = load_gpu_check()
    check.detector_steps(str(tmp_path / "steps.json"), "cpu", quick=True, archs=("retinanet",))
    rows = json.loads((tmp_path / "steps.json").read_text())["rows"]
    assert [(r["arch"], r["loss"]) for r in rows] == [("retinanet", "default"), ("retinanet", "ciou")]
    assert rows[0]["loss_calls"] == 0 and "share" not in rows[0]
    assert rows[1]["loss_calls"] >= 1 and rows[1]["loss_pairs"] > 0
    assert 0 < rows[1]["share"] == rows[1]["loss_ms"] / rows[1]["step_ms"]


def test_gpu_check_report_sections(tmp_path):
    """The GPU-only steps' JSON (written on a GPU) rendered into the report: tables and counts."""
    import json

    check = load_gpu_check()
    det = {"device": "NVIDIA H100", "torch": "2.x", "image": "2 x 3 x 800 x 1066", "backbone": "resnet50",
           "rows": [{"arch": "retinanet", "loss": "default", "step_ms": 80.0, "loss_calls": 0, "loss_pairs": 0},
                    {"arch": "retinanet", "loss": "ciou", "step_ms": 81.0, "loss_calls": 2, "loss_pairs": 300,
                     "loss_ms": 0.4, "share": 0.4 / 81.0}]}
    sync = {"device": "NVIDIA H100", "torch": "2.x",
            "rows": [{"arch": "faster_rcnn", "options": {"rpn_nms": "diou"}, "syncs": 7,
                      "where": [["boxloss/nms.py:266", 4], ["torchvision/x.py:1", 3]]}]}
    (tmp_path / "d.json").write_text(json.dumps(det))
    (tmp_path / "s.json").write_text(json.dumps(sync))
    res = dict(status="passed", seconds=1.0, budget=55, command="c", log="l", output="")
    text = "\n".join(check.section(res | {"name": "detector-steps"}, {"json": str(tmp_path / "d.json")}))
    assert "| retinanet | ciou | 81.0 | 2 | 300 | 0.40 | 0.49 % |" in text
    assert "| retinanet | default | 80.0 | 0 | 0 | - | - |" in text
    text = "\n".join(check.section(res | {"name": "sync-count"}, {"json": str(tmp_path / "s.json")}))
    assert "**7** syncs" in text and "`boxloss/nms.py:266` x4" in text
