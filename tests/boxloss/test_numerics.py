"""Numerical edge cases of the box losses: avg_factor = 0, zero-length sides, the log IoU loss at
IoU = 1, eps, the scale of CIoU's aspect term and the paper gradient's warning.

Each test pins one rule of the losses' documented conventions, for the public losses, both kernels
(the compiled CPU loops and the eager PyTorch ops) and the plain-autograd reference where it applies.
"""

import math
import warnings

import pytest
import torch
import torchvision.ops as tv

import boxloss
import boxloss.losses as losses_module
from boxloss import _kernels
from boxloss.boxes import _iou_family
from box_cases import box_pairs, degenerate_pairs, value_and_grads

IOU_FAMILY = ("iou", "giou", "diou", "ciou")
AVG_EPS = torch.finfo(torch.float32).eps
NATIVE = pytest.param(
    "native", marks=pytest.mark.skipif(not _kernels.native_available(), reason="boxloss._native is not built")
)
BACKENDS = [NATIVE, "eager"]
# options a loss cannot do without (MPDIoU normalises by the image's size)
REQUIRED = {"mpdiou": {"image_size": (480.0, 640.0)}}


def get_loss(name, **options):
    return boxloss.get_loss(name, **REQUIRED.get(name, {}), **options)


def kernel(backend, kind, **options):
    return lambda p, t: _kernels.iou_family_loss(p, t, kind, backend=backend, **options)


def reference(kind):
    return lambda p, t: 1 - _iou_family(p, t, kind, 1e-7, pairwise=False)[0]


# ---------------------------------------------------------------- avg_factor = 0


@pytest.mark.parametrize("name", boxloss.LOSS_NAMES)
@pytest.mark.parametrize("avg_factor", [0, 0.0, torch.tensor(0.0)], ids=["int", "float", "tensor"])
def test_avg_factor_zero_gives_zero_not_nan(name, avg_factor):
    """No positive anchors and num_pos passed unclamped: the loss is 0 with zero gradients (MMDetection)."""
    fn = get_loss(name)
    # an empty batch
    pred = torch.zeros(0, 4, requires_grad=True)
    loss = fn(pred, torch.zeros(0, 4), avg_factor=avg_factor)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert pred.grad.shape == (0, 4)
    # boxes present but every weight 0 (the positives' mask)
    p, t = box_pairs(10, seed=1)
    p.requires_grad_()
    loss = fn(p, t, weight=torch.zeros(10), avg_factor=avg_factor)
    assert loss.item() == 0.0
    (g,) = torch.autograd.grad(loss, p)
    assert torch.isfinite(g).all() and (g == 0).all()


@pytest.mark.parametrize("name", boxloss.LOSS_NAMES)
def test_avg_factor_divides_by_avg_factor_plus_float32_eps(name):
    """sum / (avg_factor + finfo(float32).eps), as MMDetection: ordinary factors change only by rounding."""
    fn = get_loss(name)
    p, t = box_pairs(50, seed=2, dtype=torch.float64)
    total = fn(p, t, reduction="sum")
    torch.testing.assert_close(fn(p, t, avg_factor=7.0), total / (7.0 + AVG_EPS), rtol=1e-15, atol=0)
    torch.testing.assert_close(fn(p, t, avg_factor=7.0), total / 7.0, rtol=1e-7, atol=0)
    module = {"l1": boxloss.L1Loss, "l2": boxloss.L2Loss, "smooth_l1": boxloss.SmoothL1Loss,
              "iou": boxloss.IoULoss, "giou": boxloss.GIoULoss, "diou": boxloss.DIoULoss,
              "ciou": boxloss.CIoULoss, "eiou": boxloss.EIoULoss, "siou": boxloss.SIoULoss,
              "alpha_iou": boxloss.AlphaIoULoss, "wise_iou": boxloss.WiseIoULoss,
              "mpdiou": boxloss.MPDIoULoss}[name](**REQUIRED.get(name, {}))
    assert module(p[:0], t[:0], avg_factor=0).item() == 0.0


# ---------------------------------------------------------------- zero-length sides: the h -> 0+ gradient


@pytest.mark.parametrize("impl", ["public", NATIVE, "eager", "reference"])
def test_zero_height_box_gets_the_gradient_that_grows_it_giou(impl):
    """GIoU of the collapsed box [0, 1, 2, 1] (h = 0) against [0, 0, 2, 2]: I = 0, U = |C| = 4.

    dL/dU = -1/|C| = -1/4 and dU/dh = w = 2 (the derivative from h > 0): dL/dy1 = +1/2, dL/dy2 = -1/2.
    dL/d|C| = U / |C|^2 = 1/4, d|C|/dcw = ch = 2, and both boxes own the x edges (a tie: half each):
    dL/dx1 = -1/4, dL/dx2 = +1/4. torchvision, which does not clamp sizes, gives the same.
    """
    pred = torch.tensor([[0.0, 1.0, 2.0, 1.0]], dtype=torch.float64)
    target = torch.tensor([[0.0, 0.0, 2.0, 2.0]], dtype=torch.float64)
    fn = {"public": lambda p, t: boxloss.giou_loss(p, t, reduction="none"),
          "reference": reference("giou")}.get(impl) or kernel(impl, "giou")
    loss, gp, _ = value_and_grads(fn, pred, target)
    want = torch.tensor([[-0.25, 0.5, 0.25, -0.5]], dtype=torch.float64)
    torch.testing.assert_close(gp, want, rtol=1e-6, atol=1e-9)
    tv_loss, tv_gp, tv_gt = value_and_grads(lambda p, t: tv.generalized_box_iou_loss(p, t), pred, target)
    torch.testing.assert_close(loss, tv_loss)
    torch.testing.assert_close(gp, tv_gp, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("impl", ["public", NATIVE, "eager", "reference"])
def test_zero_height_box_gets_the_gradient_that_grows_it_ciou(impl):
    """CIoU of [0, 1, 2, 1] (h = 0) against [0, 0, 2, 2]: I = 0, equal centres (rho = 0), so only the
    aspect term moves it. v = 4/pi^2 (atan2(2, 2) - atan2(2, 0))^2 = 1/4, alpha = v / (1 + v) = 1/5,
    loss 1 + alpha v = 1.05. dv/dh = -2 * 4/pi^2 * delta * d atan2(w, h)/dh with delta = -pi/4 and
    d atan2(w, h)/dh = -w / (w^2 + h^2) = -1/2: dv/dh = -1/pi, so dL/dy2 = -alpha/pi = -dL/dy1;
    d atan2(w, h)/dw = h / (w^2 + h^2) = 0. (torchvision's atan(w / h) gives NaN here.)
    """
    pred = torch.tensor([[0.0, 1.0, 2.0, 1.0]], dtype=torch.float64)
    target = torch.tensor([[0.0, 0.0, 2.0, 2.0]], dtype=torch.float64)
    fn = {"public": lambda p, t: boxloss.ciou_loss(p, t, reduction="none"),
          "reference": reference("ciou")}.get(impl) or kernel(impl, "ciou")
    loss, gp, gt = value_and_grads(fn, pred, target)
    alpha = 0.25 / (1.25 + 1e-7)
    torch.testing.assert_close(loss, torch.tensor([1 + alpha * 0.25], dtype=torch.float64))
    want = torch.tensor([[0.0, alpha / math.pi, 0.0, -alpha / math.pi]], dtype=torch.float64)
    torch.testing.assert_close(gp, want, rtol=1e-9, atol=1e-12)
    assert torch.isfinite(gt).all()


def _zero_side_pairs():
    """Pairs with a zero-width or zero-height prediction (torchvision's CIoU is NaN at h = 0)."""
    pred = torch.tensor([
        [0.0, 1.0, 2.0, 1.0],  # h = 0 inside the target
        [1.0, 0.0, 1.0, 2.0],  # w = 0 inside the target
        [3.0, 0.5, 5.0, 0.5],  # h = 0, disjoint
        [0.5, 3.0, 0.5, 4.0],  # w = 0, disjoint
        [-1.0, 1.0, 3.0, 1.0],  # h = 0, wider than the target
    ], dtype=torch.float64)
    target = torch.tensor([[0.0, 0.0, 2.0, 2.5]] * 5, dtype=torch.float64)
    return pred, target


@pytest.mark.parametrize("kind", ["giou", "diou", "ciou"])
@pytest.mark.parametrize("impl", ["public", NATIVE, "eager", "reference"])
def test_zero_side_gradients_match_torchvision(kind, impl):
    """torchvision does not clamp sizes, so its gradient at a zero side is the one from the side's
    positive values: equal wherever it is finite (CIoU: zero width only; at h = 0 its atan(w / h) is NaN)."""
    peer = {"giou": tv.generalized_box_iou_loss, "diou": tv.distance_box_iou_loss, "ciou": tv.complete_box_iou_loss}
    public = {"giou": boxloss.giou_loss, "diou": boxloss.diou_loss, "ciou": boxloss.ciou_loss}
    pred, target = _zero_side_pairs()
    fn = {"public": lambda p, t: public[kind](p, t, reduction="none"),
          "reference": reference(kind)}.get(impl) or kernel(impl, kind)
    got = value_and_grads(fn, pred, target)
    want = value_and_grads(lambda p, t: peer[kind](p, t, reduction="none"), pred, target)
    finite = torch.isfinite(want[1]).all(1) & torch.isfinite(want[2]).all(1)
    if kind == "ciou":
        assert finite.tolist() == [False, True, False, True, False]
    else:
        assert finite.all()
    torch.testing.assert_close(got[0], want[0], rtol=1e-9, atol=1e-12)
    for a, b in zip(got[1:], want[1:]):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a[finite], b[finite], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", IOU_FAMILY)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_degenerate_boxes_stay_finite(kind, backend, dtype):
    """Zero-area boxes, points, identical empty boxes, signed zeros, tiny sides: finite values and gradients."""
    pred, target = degenerate_pairs(dtype)
    extra_p = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, -0.0, -0.0], [0.0, 0.0, 1e-30, 1e-30],
                            [0.0, 0.0, 1e-20, 0.0], [0.0, 0.0, 1.0, 0.0]], dtype=dtype)
    extra_t = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0],
                            [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, -0.0, 1.0]], dtype=dtype)
    pred, target = torch.cat([pred, extra_p]), torch.cat([target, extra_t])
    for options in ({}, {"mode": "log"}) if kind == "iou" else ({}, {"ciou_grad": "paper"}) if kind == "ciou" else ({},):
        got = value_and_grads(kernel(backend, kind, **options), pred, target)
        assert all(torch.isfinite(x).all() for x in got), (options, got)
    # two identical points (one of them of sides -0.0): IoU = 0 / eps = 0, and no aspect penalty
    loss = boxloss.get_loss(kind)(extra_p[:2], extra_t[:2], reduction="none")
    torch.testing.assert_close(loss, torch.ones(2, dtype=dtype))


# ---------------------------------------------------------------- the log IoU loss at IoU = 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", BACKENDS)
def test_iou_loss_is_nonnegative_for_identical_boxes(dtype, backend, monkeypatch):
    """IoU = A / (A + eps) > 1 - eps for A > 1, so -ln(IoU + eps) was negative: every mode is >= 0."""
    monkeypatch.setenv("BOXLOSS_KERNEL", backend)
    pred, _ = box_pairs(500, seed=3, dtype=dtype)
    big = pred * 100  # areas up to ~1.6e7
    small = pred * 1e-3
    for p in (pred, big, small):
        for kind in IOU_FAMILY:
            for options in ({"mode": "linear"}, {"mode": "log"}) if kind == "iou" else ({},):
                q = p.clone().requires_grad_()
                loss = boxloss.get_loss(kind, **options)(q, p.clone(), reduction="none")
                assert (loss >= 0).all(), (kind, options, loss.min().item())
                (g,) = torch.autograd.grad(loss.sum(), q)
                assert torch.isfinite(g).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_log_iou_loss_values_and_gradient_unchanged_below_one(backend):
    """Away from IoU = 1 the log loss is still -ln(IoU + eps), gradient included."""
    pred, target = box_pairs(2000, seed=4, dtype=torch.float64)
    got = value_and_grads(kernel(backend, "iou", mode="log"), pred, target)

    def plain(p, t):
        iou = _iou_family(p, t, "iou", 1e-7, pairwise=False)[1]
        return -torch.log(iou + 1e-7)

    want = value_and_grads(plain, pred, target)
    below = (want[0] > 1e-6)  # IoU + eps < 1 by a margin: not identical boxes
    assert below.sum() > 1000
    torch.testing.assert_close(got[0], want[0].clamp(min=0), rtol=1e-12, atol=0)
    for a, b in zip(got[1:], want[1:]):
        torch.testing.assert_close(a[below], b[below], rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- eps > 0


@pytest.mark.parametrize("name", boxloss.LOSS_NAMES)
@pytest.mark.parametrize("eps", [0, 0.0, -1e-7, float("nan"), float("inf")])
def test_eps_must_be_positive(name, eps):
    p, t = box_pairs(5, seed=5)
    with pytest.raises(ValueError, match=rf"eps must be a finite number > 0, got {eps!r}"):
        get_loss(name)(p, t, eps=eps)


@pytest.mark.parametrize(
    "fn",
    [boxloss.matched_box_iou, boxloss.matched_generalized_box_iou, boxloss.matched_distance_box_iou,
     boxloss.matched_complete_box_iou, boxloss.distance_box_iou, boxloss.complete_box_iou,
     lambda p, t, eps: _kernels.iou_family_loss(p, t, "giou", eps)],
    ids=["matched_iou", "matched_giou", "matched_diou", "matched_ciou", "distance_box_iou", "complete_box_iou",
         "iou_family_loss"],
)
def test_eps_must_be_positive_in_metrics_and_kernel(fn):
    p, t = box_pairs(5, seed=5)
    with pytest.raises(ValueError, match=r"eps must be a finite number > 0, got 0"):
        fn(p, t, eps=0)
    # the pairwise IoU and GIoU take no eps (torchvision's): two identical empty boxes are finite
    empty = torch.zeros(1, 4)
    assert torch.isfinite(boxloss.box_iou(empty, empty)).all()
    assert torch.isfinite(boxloss.generalized_box_iou(empty, empty)).all()


@pytest.mark.parametrize("name", boxloss.LOSS_NAMES)
def test_identical_empty_boxes_are_finite_at_the_smallest_eps(name):
    empty = torch.tensor([[1.0, 1.0, 1.0, 1.0]], requires_grad=True)
    loss = get_loss(name)(empty, empty.detach().clone(), eps=1e-38)
    (g,) = torch.autograd.grad(loss, empty)
    assert torch.isfinite(loss) and torch.isfinite(g).all()


# ---------------------------------------------------------------- CIoU's aspect term at any scale


def _boxes_of_scale(n, lo, hi, seed, dtype=torch.float64):
    """``n`` pairs of boxes with sides log-uniform in [lo, hi] (the targets' within a factor 2 of it):
    three quarters of the targets near their prediction (mostly overlapping), the rest anywhere."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.rand(*shape, generator=g, dtype=dtype)

    size = torch.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * rand(n, 2))
    centre = 2 * hi * rand(n, 2)
    size_t = size * torch.exp(1.4 * rand(n, 2) - 0.7)
    centre_t = centre + (rand(n, 2) - 0.5) * size
    far = torch.arange(n) >= 3 * n // 4
    centre_t[far] = 2 * hi * rand(int(far.sum()), 2)
    pred = torch.cat([centre - size / 2, centre + size / 2], 1)
    target = torch.cat([centre_t - size_t / 2, centre_t + size_t / 2], 1)
    return pred, target


@pytest.mark.parametrize("scale", [(1e-4, 1e-2), (1.0, 300.0)], ids=["normalised", "pixels"])
@pytest.mark.parametrize("impl", ["public", NATIVE, "eager", "reference"])
def test_ciou_matches_torchvision_at_any_scale(scale, impl):
    """YOLO-style heads regress boxes of sides 1e-4..1e-2: on these pairs atan(w / (h + eps)) moved
    CIoU by up to 2.9e-5 (value) and 1.2e-3 of a pair's largest gradient component (4e-9 and 1.5e-7
    on the pixel-sized ones); atan2(w, h) is torchvision's atan(w / h) at every scale."""
    pred, target = _boxes_of_scale(4000, *scale, seed=6)
    fn = {"public": lambda p, t: boxloss.ciou_loss(p, t, reduction="none"),
          "reference": reference("ciou")}.get(impl) or kernel(impl, "ciou")
    got = value_and_grads(fn, pred, target)
    want = value_and_grads(lambda p, t: tv.complete_box_iou_loss(p, t, reduction="none"), pred, target)
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=0)
    for a, b in zip(got[1:], want[1:]):
        scale_ = b.abs().amax(1, keepdim=True)  # per pair: the gradients span 1e0..1e5 across pairs
        torch.testing.assert_close(a / scale_, b / scale_, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ciou_angles_are_shared_by_both_kernels(dtype):
    """The compiled loops' aspect ratios and the eager kernel's, each through torch.atan: the same
    bits whatever the layout and length of the rows (torch.atan2 would differ in the last bit
    between its vectorised and scalar loops); atan2's values to rounding, signed zeros included."""
    if not _kernels.native_available():
        pytest.skip("boxloss._native is not built")
    from boxloss import _native

    pred, target = _boxes_of_scale(5003, 1e-3, 10.0, seed=7, dtype=dtype)
    pred[:4] = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, -0.0, -0.0], [0.0, 0.0, 1.0, -0.0],
                             [0.0, 0.0, -0.0, 1.0]], dtype=dtype)
    n = pred.shape[0]
    native = torch.empty(2, n, dtype=dtype)
    _native.aspect(64 if dtype == torch.float64 else 32, pred.data_ptr(), target.data_ptr(), native.data_ptr(), n, 2)
    native.atan_()
    w = torch.stack([pred[:, 2] - pred[:, 0], target[:, 2] - target[:, 0]]).clamp(min=0)  # [2 boxes, n]
    h = torch.stack([pred[:, 3] - pred[:, 1], target[:, 3] - target[:, 1]]).clamp(min=0)
    for c in (7, 1000, n):  # rows of a chunk, with a padded stride as in the workspace
        for s in range(0, n, c):
            e = min(s + c, n)
            out = torch.empty(2, c + 32, dtype=dtype)[:, : e - s]
            assert torch.equal(_kernels._angles(w[:, s:e], h[:, s:e], out), native[:, s:e]), (c, s)
    assert native[0, :4].tolist() == [0.0, 0.0, float(torch.tensor(math.pi / 2, dtype=dtype)), 0.0]
    torch.testing.assert_close(native[:, 4:], torch.atan2(w, h)[:, 4:], rtol=2 * torch.finfo(dtype).eps, atol=0)


# ---------------------------------------------------------------- ciou_grad="paper" on pixel boxes


def test_paper_gradient_warns_once_for_pixel_boxes(monkeypatch):
    monkeypatch.setattr(losses_module, "_paper_grad_warned", False)
    pixel_p, pixel_t = box_pairs(20, seed=8)  # sides 1..40 px
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            boxloss.ciou_loss(pixel_p, pixel_t, ciou_grad="paper")
        boxloss.CIoULoss(ciou_grad="paper")(pixel_p, pixel_t)
    paper = [w for w in caught if "ciou_grad='paper'" in str(w.message)]
    assert len(paper) == 1, [str(w.message) for w in caught]
    message = str(paper[0].message)
    assert "w^2 + h^2" in message and "exact" in message
    assert paper[0].filename == __file__  # stacklevel: the caller's line
    # the exact gradient never warns
    monkeypatch.setattr(losses_module, "_paper_grad_warned", False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        boxloss.ciou_loss(pixel_p, pixel_t)


def test_paper_gradient_does_not_warn_for_normalised_boxes(monkeypatch):
    monkeypatch.setattr(losses_module, "_paper_grad_warned", False)
    norm_p, norm_t = box_pairs(20, seed=9)
    norm_p, norm_t = norm_p / 200, norm_t / 200  # image-normalised: sides < 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        boxloss.ciou_loss(norm_p, norm_t, ciou_grad="paper")
        boxloss.ciou_loss(norm_p[:0], norm_t[:0], ciou_grad="paper")  # empty input: nothing to inspect
    assert losses_module._paper_grad_warned is False
