"""Regression losses: hand-worked values, torchvision parity, gradcheck, and the contract of every loss."""

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision.ops as tv

import boxloss
from box_cases import box_pairs, degenerate_pairs, numerical_grad

ALL = {
    "l1": boxloss.l1_loss,
    "l2": boxloss.l2_loss,
    "smooth_l1": boxloss.smooth_l1_loss,
    "iou": boxloss.iou_loss,
    "giou": boxloss.giou_loss,
    "diou": boxloss.diou_loss,
    "ciou": boxloss.ciou_loss,
    "eiou": boxloss.eiou_loss,
    "siou": boxloss.siou_loss,
    "alpha_iou": boxloss.alpha_iou_loss,
    "wise_iou": boxloss.wise_iou_loss,
    "mpdiou": boxloss.mpdiou_loss,
}
# options a loss cannot do without (MPDIoU normalises by the image's size)
REQUIRED = {"mpdiou": {"image_size": (480.0, 640.0)}}
MODULES = {
    "l1": boxloss.L1Loss, "l2": boxloss.L2Loss, "smooth_l1": boxloss.SmoothL1Loss, "iou": boxloss.IoULoss,
    "giou": boxloss.GIoULoss, "diou": boxloss.DIoULoss, "ciou": boxloss.CIoULoss, "eiou": boxloss.EIoULoss,
    "siou": boxloss.SIoULoss, "alpha_iou": boxloss.AlphaIoULoss, "wise_iou": boxloss.WiseIoULoss,
    "mpdiou": boxloss.MPDIoULoss,
}
TORCHVISION = {
    "giou": tv.generalized_box_iou_loss,
    "diou": tv.distance_box_iou_loss,
    "ciou": tv.complete_box_iou_loss,
}
REDUCTIONS = ("none", "mean", "sum")
EPS = 1e-12  # eps must be > 0; this one is negligible against the unit areas of the hand-worked cases


def box(*c, dtype=torch.float64):
    return torch.tensor([c], dtype=dtype)


# ---------------------------------------------------------------- 1. hand-worked values


def test_hand_worked_values():
    p, t = box(0, 0, 2, 2), box(1, 1, 3, 3)
    # overlap 1x1: I = 1, U = 7, IoU = 1/7; C = 3x3 = 9; centres (1,1),(2,2): rho^2 = 2, c^2 = 18
    assert boxloss.iou_loss(p, t, eps=EPS).item() == pytest.approx(1 - 1 / 7)
    assert boxloss.iou_loss(p, t, eps=EPS, mode="log").item() == pytest.approx(math.log(7))
    assert boxloss.giou_loss(p, t, eps=EPS).item() == pytest.approx(1 - 1 / 7 + 2 / 9)
    assert boxloss.diou_loss(p, t, eps=EPS).item() == pytest.approx(1 - 1 / 7 + 2 / 18)
    # same aspect ratio: v = 0, CIoU = DIoU
    assert boxloss.ciou_loss(p, t, eps=EPS).item() == pytest.approx(1 - 1 / 7 + 2 / 18)
    # disjoint, 2 px gap: [0,0,2,2] vs [4,0,6,2]; C = 6x2 = 12, U = 8: GIoU = -(12-8)/12 = -1/3
    p, t = box(0, 0, 2, 2), box(4, 0, 6, 2)
    assert boxloss.giou_loss(p, t, eps=EPS).item() == pytest.approx(1 + 1 / 3)
    # rho^2 = 16, c^2 = 36 + 4
    assert boxloss.diou_loss(p, t, eps=EPS).item() == pytest.approx(1 + 16 / 40)
    # CIoU with different aspect: [0,0,1,1] inside [0,0,2,1]: IoU = 1/2; rho^2 = 0.25, c^2 = 5
    p, t = box(0, 0, 1, 1), box(0, 0, 2, 1)
    v = 4 / math.pi**2 * (math.atan(2) - math.atan(1)) ** 2
    alpha = v / (1 - 0.5 + v)
    assert boxloss.ciou_loss(p, t, eps=EPS).item() == pytest.approx(0.5 + 0.25 / 5 + alpha * v)
    # L-norms: d = (1, -2, 0.5, 0)
    p, t = box(1, 0, 2.5, 3), box(0, 2, 2, 3)
    assert boxloss.l1_loss(p, t).item() == pytest.approx(3.5)
    assert boxloss.l2_loss(p, t).item() == pytest.approx(5.25)
    # beta = 1: 1 -> 0.5, 2 -> 1.5, 0.5 -> 0.125, 0 -> 0
    assert boxloss.smooth_l1_loss(p, t, beta=1.0).item() == pytest.approx(2.125)
    assert boxloss.smooth_l1_loss(p, t, beta=0.0).item() == pytest.approx(3.5)


def test_smooth_l1_matches_torch():
    g = torch.Generator().manual_seed(1)
    p, t = torch.randn(500, 4, generator=g, dtype=torch.float64), torch.randn(500, 4, generator=g, dtype=torch.float64)
    for beta in (0.0, 1 / 9, 1.0):
        ref = F.smooth_l1_loss(p, t, beta=beta, reduction="none").sum(-1)
        torch.testing.assert_close(boxloss.smooth_l1_loss(p, t, beta=beta, reduction="none"), ref)
    torch.testing.assert_close(boxloss.l1_loss(p, t, reduction="sum"), F.l1_loss(p, t, reduction="sum"))
    torch.testing.assert_close(boxloss.l2_loss(p, t, reduction="sum"), F.mse_loss(p, t, reduction="sum"))


# ---------------------------------------------------------------- 2. torchvision parity


@pytest.mark.parametrize("name", sorted(TORCHVISION))
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_matches_torchvision(name, reduction):
    pred, target = box_pairs(10_000, seed=3)
    pred.requires_grad_()
    target.requires_grad_()
    ours = ALL[name](pred, target, reduction=reduction)
    ref = TORCHVISION[name](pred, target, reduction=reduction)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    grad_out = torch.rand(ours.shape, generator=torch.Generator().manual_seed(0)) + 0.5
    g_ours = torch.autograd.grad(ours, (pred, target), grad_out)
    g_ref = torch.autograd.grad(ref, (pred, target), grad_out)
    for a, b in zip(g_ours, g_ref):
        # gradients of "mean" are 1e-4 in size: compare relative to their scale
        scale = b.abs().max()
        torch.testing.assert_close(a / scale, b / scale, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- 3. gradcheck


@pytest.mark.parametrize("name", ["l1", "l2", "smooth_l1", "iou", "giou", "diou"])
def test_gradcheck(name):
    pred, target = box_pairs(40, seed=5, dtype=torch.float64)
    # away from the kinks of min/max/abs: jitter every coordinate
    g = torch.Generator().manual_seed(6)
    pred = (pred + 0.01 * torch.rand(pred.shape, generator=g, dtype=torch.float64)).requires_grad_()
    target = (target + 0.01 * torch.rand(target.shape, generator=g, dtype=torch.float64)).requires_grad_()
    fn = ALL[name]
    assert torch.autograd.gradcheck(lambda p, t: fn(p, t, reduction="none"), (pred, target))
    if name == "iou":
        assert torch.autograd.gradcheck(lambda p, t: fn(p, t, reduction="none", mode="log"), (pred, target))


def test_gradcheck_ciou_alpha_held_constant():
    """CIoU's alpha has no gradient by convention, so the check is against diou + alpha0 * v."""
    pred, target = box_pairs(20, seed=7, dtype=torch.float64)
    pred = pred + 0.01 * torch.rand(pred.shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64)

    def v_of(p):
        w, h = p[:, 2] - p[:, 0], p[:, 3] - p[:, 1]
        wg, hg = target[:, 2] - target[:, 0], target[:, 3] - target[:, 1]
        return 4 / math.pi**2 * (torch.atan(wg / hg) - torch.atan(w / h)) ** 2  # no eps: atan2's angles

    iou0 = boxloss.matched_box_iou(pred, target)
    alpha0 = v_of(pred) / (1 - iou0 + v_of(pred) + 1e-7)

    def frozen(p):
        return boxloss.diou_loss(p, target, reduction="none") + alpha0 * v_of(p)

    x = pred.clone().requires_grad_()
    analytic = torch.autograd.grad(boxloss.ciou_loss(x, target, reduction="sum"), x)[0]
    torch.testing.assert_close(analytic, numerical_grad(frozen, pred), rtol=1e-6, atol=1e-7)


@pytest.mark.filterwarnings("ignore:ciou_grad='paper'")  # pixel-sized boxes on purpose (see test_numerics)
def test_ciou_paper_gradient_drops_the_factor():
    pred = box(0.0, 0.0, 3.0, 1.0).requires_grad_()
    target = box(0.0, 0.0, 1.0, 2.0)
    exact = torch.autograd.grad(boxloss.ciou_loss(pred, target, eps=EPS), pred)[0]
    paper = torch.autograd.grad(boxloss.ciou_loss(pred, target, eps=EPS, ciou_grad="paper"), pred)[0]
    assert boxloss.ciou_loss(pred, target, ciou_grad="paper").item() == boxloss.ciou_loss(pred, target).item()
    # the difference is only alpha * dv: exact dv/dw = -k h/(w^2+h^2), paper -k h with w=3, h=1
    w, h = 3.0, 1.0
    delta = math.atan(0.5) - math.atan(3.0)
    iou = 1 / 4  # I = 1x1, U = 3 + 2 - 1
    v = 4 / math.pi**2 * delta**2
    alpha = v / (1 - iou + v)
    k = 8 / math.pi**2 * delta
    dw_exact, dw_paper = -k * h / (w**2 + h**2), -k * h
    dh_exact, dh_paper = k * w / (w**2 + h**2), k * w
    # x2 moves w by +1, y2 moves h by +1 (x1, y1 by -1)
    diff = (paper - exact)[0]
    expected = torch.tensor(
        [-(dw_paper - dw_exact), -(dh_paper - dh_exact), dw_paper - dw_exact, dh_paper - dh_exact], dtype=torch.float64
    ) * alpha
    torch.testing.assert_close(diff, expected)


def test_ciou_gated_alpha():
    p, t = box(0, 0, 1, 1), box(0, 0, 3, 1)  # IoU = 1/3 <= 0.5: gated alpha = 0, CIoU = DIoU
    assert boxloss.ciou_loss(p, t, alpha="gated").item() == pytest.approx(boxloss.diou_loss(p, t).item())
    assert boxloss.ciou_loss(p, t).item() > boxloss.diou_loss(p, t).item()
    p, t = box(0, 0, 2, 1), box(0, 0, 2, 1.5)  # IoU = 2/3 > 0.5: same as standard
    assert boxloss.ciou_loss(p, t, alpha="gated").item() == pytest.approx(boxloss.ciou_loss(p, t).item())


# ---------------------------------------------------------------- 4. contract over every loss


def loss_fn(name):
    """The loss ``name`` with the options it requires bound."""
    return boxloss.get_loss(name, **REQUIRED.get(name, {}))


def test_every_name_is_covered():
    assert set(ALL) == set(MODULES) == set(boxloss.LOSS_NAMES)


@pytest.mark.parametrize("name", list(ALL))
class TestContract:
    def test_reductions_and_weights(self, name):
        fn = loss_fn(name)
        pred, target = box_pairs(50, seed=11, dtype=torch.float64)
        none = fn(pred, target, reduction="none")
        assert none.shape == (50,)
        torch.testing.assert_close(fn(pred, target, reduction="sum"), none.sum())
        torch.testing.assert_close(fn(pred, target), none.mean())
        # MMDetection's sum / (avg_factor + finfo(float32).eps): 1.7e-8 from sum / 7, within tolerance
        torch.testing.assert_close(fn(pred, target, avg_factor=7.0), none.sum() / 7.0)
        w = torch.rand(50, dtype=torch.float64)
        torch.testing.assert_close(fn(pred, target, weight=w, reduction="sum"), (none * w).sum())
        w4 = torch.rand(50, 4, dtype=torch.float64)
        if name in ("l1", "l2", "smooth_l1"):  # per-coordinate weights apply before the coordinate sum
            per_coord = {
                "l1": (pred - target).abs(),
                "l2": (pred - target) ** 2,
                "smooth_l1": F.smooth_l1_loss(pred, target, beta=1.0, reduction="none"),
            }[name]
            torch.testing.assert_close(fn(pred, target, weight=w4, reduction="none"), (per_coord * w4).sum(-1))
        else:
            torch.testing.assert_close(fn(pred, target, weight=w4, reduction="none"), none * w4.mean(-1))

    def test_bad_arguments(self, name):
        fn = loss_fn(name)
        pred, target = box_pairs(5, seed=0)
        with pytest.raises(ValueError, match=r"reduction must be 'none', 'mean' or 'sum', got 'avg'"):
            fn(pred, target, reduction="avg")
        with pytest.raises(ValueError, match=r"pred must have shape \[\.\.\., 4\], got \(5, 3\)"):
            fn(pred[:, :3], target[:, :3])
        with pytest.raises(ValueError, match=r"same shape, got \(5, 4\) and \(4, 4\)"):
            fn(pred, target[:4])
        with pytest.raises(ValueError, match=r"eps must be a finite number > 0, got -1"):
            fn(pred, target, eps=-1)
        with pytest.raises(ValueError, match=r"weight must have shape \(5,\) or \(5, 4\), got \(3,\)"):
            fn(pred, target, weight=torch.ones(3))
        with pytest.raises(ValueError, match="avg_factor"):
            fn(pred, target, reduction="sum", avg_factor=2.0)
        with pytest.raises(TypeError, match="pred must be a torch.Tensor, got list"):
            fn([[0, 0, 1, 1]], target)

    def test_empty_input(self, name):
        fn = loss_fn(name)
        pred = torch.zeros(0, 4, requires_grad=True)
        loss = fn(pred, torch.zeros(0, 4))
        assert loss.item() == 0.0 and loss.requires_grad
        loss.backward()
        assert pred.grad.shape == (0, 4)
        assert fn(pred, torch.zeros(0, 4), reduction="sum").item() == 0.0
        assert fn(pred, torch.zeros(0, 4), reduction="none").shape == (0,)

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
    def test_half_precision(self, name, dtype):
        fn = loss_fn(name)
        pred, target = box_pairs(100, seed=2)
        ref = fn(pred, target, reduction="none")
        pred_h = pred.to(dtype).requires_grad_()
        out = fn(pred_h, target.to(dtype), reduction="none")
        assert out.dtype == torch.float32
        # the only error is the rounding of the inputs to half precision
        ref_h = fn(pred.to(dtype).float(), target.to(dtype).float(), reduction="none")
        torch.testing.assert_close(out, ref_h)
        assert (out - ref).abs().max() < 0.1 * ref.abs().max() + 0.05
        out.sum().backward()
        assert pred_h.grad.dtype == dtype and torch.isfinite(pred_h.grad.float()).all()

    def test_degenerate_boxes_are_finite(self, name):
        fn = loss_fn(name)
        pred, target = degenerate_pairs()
        pred.requires_grad_()
        target.requires_grad_()
        loss = fn(pred, target, reduction="none")
        assert torch.isfinite(loss).all(), loss
        gp, gt = torch.autograd.grad(loss.sum(), (pred, target))
        assert torch.isfinite(gp).all() and torch.isfinite(gt).all()

    def test_identical_boxes_give_zero(self, name):
        pred, _ = box_pairs(20, seed=4, dtype=torch.float64)
        assert loss_fn(name)(pred, pred.clone(), reduction="none").abs().max() < 1e-6

    def test_get_loss_and_module(self, name):
        pred, target = box_pairs(20, seed=9)
        required = REQUIRED.get(name, {})
        fn = boxloss.get_loss(name, reduction="sum", **required)
        torch.testing.assert_close(fn(pred, target), ALL[name](pred, target, reduction="sum", **required))
        module = MODULES[name](reduction="sum", loss_weight=2.0, **required)
        got = module(pred, target)
        # Wise-IoU's module is relative to its running mean (updated by the call), not the batch mean
        options = {"iou_mean": module.iou_mean} if name == "wise_iou" else {}
        torch.testing.assert_close(got, 2.0 * ALL[name](pred, target, reduction="sum", **required, **options))
        assert "loss_weight=2.0" in repr(module)


def test_get_loss_errors():
    with pytest.raises(ValueError, match="unknown loss name 'ciuo'; valid names: l1, l2, smooth_l1, iou, giou, diou, "
                                         "ciou, eiou, siou, alpha_iou, wise_iou, mpdiou"):
        boxloss.get_loss("ciuo")
    with pytest.raises(TypeError, match="unexpected option 'beta'"):
        boxloss.get_loss("giou", beta=1.0)
    with pytest.raises(TypeError, match="unexpected option 'mode'"):
        boxloss.GIoULoss(mode="log")
    smooth = boxloss.get_loss("smooth_l1", beta=0.5)
    p, t = torch.zeros(1, 4), torch.tensor([[0.25, 0.0, 0.0, 1.0]])
    assert smooth(p, t).item() == pytest.approx(0.5 * 0.25**2 / 0.5 + 1.0 - 0.25)
    with pytest.raises(ValueError, match="beta must be a finite number >= 0, got -0.5"):
        boxloss.smooth_l1_loss(p, t, beta=-0.5)
    with pytest.raises(ValueError, match="mode must be 'linear' or 'log', got 'exp'"):
        boxloss.iou_loss(p, t, mode="exp")
    with pytest.raises(ValueError, match="ciou_grad must be one of"):
        boxloss.ciou_loss(p, t, ciou_grad="approx")
