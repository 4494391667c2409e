"""The IoU losses after CIoU: EIoU / Focal-EIoU, SIoU, alpha-IoU, Wise-IoU, MPDIoU, Inner- and Focaler-IoU.

Four kinds of test per loss: hand-worked values, a naive float64 reference written from each paper's
formula (values and autograd gradients), the special cases that reduce to another loss, gradcheck;
plus SIoU against MMDetection's implementation, the bad options, and Wise-IoU's running mean. The
contract over every loss name (reductions, weights, empty input, half precision, degenerate boxes)
is in test_losses.py and test_numerics.py.
"""

import math

import pytest
import torch

import boxloss
from box_cases import box_pairs, degenerate_pairs, numerical_grad, value_and_grads

EPS = 1e-12  # negligible against the unit areas of the hand-worked cases
F64 = torch.float64


def box(*c):
    return torch.tensor([c], dtype=F64)


def random_pairs(n, seed, dtype=F64):
    """Pairs of general position (no ties, no zero offsets): sides log-uniform in [2, 50], the target
    shifted by N(0, 0.6 size) and rescaled by exp(N(0, 0.3)); about a third of the pairs are disjoint."""
    g = torch.Generator().manual_seed(seed)
    centre = 100 * torch.rand(n, 2, generator=g, dtype=dtype)
    size = torch.exp(math.log(2) + math.log(25) * torch.rand(n, 2, generator=g, dtype=dtype))
    centre_t = centre + 0.6 * size * torch.randn(n, 2, generator=g, dtype=dtype)
    size_t = size * torch.exp(0.3 * torch.randn(n, 2, generator=g, dtype=dtype))
    pred = torch.cat([centre - size / 2, centre + size / 2], 1)
    target = torch.cat([centre_t - size_t / 2, centre_t + size_t / 2], 1)
    return pred, target


def assert_same_value_and_grads(got, want, rtol=1e-9, atol=1e-12):
    torch.testing.assert_close(got[0], want[0], rtol=rtol, atol=atol)
    for a, b in zip(got[1:], want[1:]):
        # per pair (gradients span decades), but not below 1e-4 of the largest: a pair whose terms
        # cancel has a gradient of rounding size
        scale = b.abs().amax(1, keepdim=True).clamp(min=1e-4 * float(b.abs().max()))
        torch.testing.assert_close(a / scale, b / scale, rtol=rtol, atol=atol)


# ---------------------------------------------------------------- 1. hand-worked values


def test_eiou_hand_worked():
    # [0,0,2,2] vs [1,1,3,3]: IoU = 1/7, C = 3x3, rho^2 = 2, equal sizes: 1 - 1/7 + 2/18 (DIoU's value)
    p, t = box(0, 0, 2, 2), box(1, 1, 3, 3)
    assert boxloss.eiou_loss(p, t, eps=EPS).item() == pytest.approx(1 - 1 / 7 + 2 / 18)
    # [0,0,1,1] inside [0,0,2,1]: IoU = 1/2, C = 2x1, rho^2 = 1/4, (w - w_g)^2 = 1 over C_w^2 = 4
    p, t = box(0, 0, 1, 1), box(0, 0, 2, 1)
    assert boxloss.eiou_loss(p, t, eps=EPS).item() == pytest.approx(0.5 + 0.25 / 5 + 1 / 4)
    # Focal-EIoU, gamma = 0.5: times IoU^0.5
    assert boxloss.eiou_loss(p, t, eps=EPS, focal_gamma=0.5).item() == pytest.approx(0.8 * 0.5**0.5)
    # disjoint: IoU = 0, so the focal weight is 0
    assert boxloss.eiou_loss(box(0, 0, 1, 1), box(3, 0, 4, 1), focal_gamma=0.5).item() == 0.0


def test_siou_hand_worked():
    # 10x10 boxes, the target shifted by (40, 40): the angle is 45 deg, Lambda = sin(90 deg) = 1, gamma = 1;
    # rho_x = rho_y = (40 / 50)^2; equal shapes; IoU = 0: 1 + (2 (1 - e^-0.64)) / 2
    p, t = box(0, 0, 10, 10), box(40, 40, 50, 50)
    assert boxloss.siou_loss(p, t, eps=EPS).item() == pytest.approx(2 - math.exp(-0.64))
    # shifted by (40, 0): Lambda = 0, gamma = 2, rho_x = 0.64, rho_y = 0
    p, t = box(0, 0, 10, 10), box(40, 0, 50, 10)
    assert boxloss.siou_loss(p, t, eps=EPS).item() == pytest.approx(1 + (1 - math.exp(-1.28)) / 2)
    # [0,0,1,1] vs [0,0,2,1]: IoU = 1/2; centres 0.5 apart along x: Lambda = 0, rho_x = 0.25 / 4;
    # omega_w = 1/2, omega_h = 0
    p, t = box(0, 0, 1, 1), box(0, 0, 2, 1)
    delta = 1 - math.exp(-2 / 16)
    omega = (1 - math.exp(-0.5)) ** 4
    assert boxloss.siou_loss(p, t, eps=EPS).item() == pytest.approx(0.5 + (delta + omega) / 2)
    assert boxloss.siou_loss(p, t, eps=EPS, theta=2).item() == pytest.approx(
        0.5 + (delta + (1 - math.exp(-0.5)) ** 2) / 2)


def test_alpha_iou_hand_worked():
    # [0,0,2,2] vs [1,1,3,3]: IoU = 1/7, (|C| - U) / |C| = 2/9, rho^2 / c^2 = 1/9, v = 0
    p, t = box(0, 0, 2, 2), box(1, 1, 3, 3)
    for a in (0.5, 2.0, 3.0):
        assert boxloss.alpha_iou_loss(p, t, eps=EPS, alpha=a, kind="iou").item() == pytest.approx(1 - (1 / 7) ** a)
        assert boxloss.alpha_iou_loss(p, t, eps=EPS, alpha=a, kind="giou").item() == pytest.approx(
            1 - (1 / 7) ** a + (2 / 9) ** a)
        assert boxloss.alpha_iou_loss(p, t, eps=EPS, alpha=a, kind="diou").item() == pytest.approx(
            1 - (1 / 7) ** a + (1 / 9) ** a)
        assert boxloss.alpha_iou_loss(p, t, eps=EPS, alpha=a, kind="ciou").item() == pytest.approx(
            1 - (1 / 7) ** a + (1 / 9) ** a)
    # [0,0,1,1] inside [0,0,2,1]: IoU = 1/2, rho^2 / c^2 = 0.25 / 5, v from atan(2) - atan(1)
    p, t = box(0, 0, 1, 1), box(0, 0, 2, 1)
    v = 4 / math.pi**2 * (math.atan(2) - math.atan(1)) ** 2
    beta = v / (1 - 0.5 + v)
    want = 1 - 0.5**3 + 0.05**3 + (beta * v) ** 3
    assert boxloss.alpha_iou_loss(p, t, eps=EPS).item() == pytest.approx(want)  # alpha 3, ciou by default


def test_wise_iou_hand_worked():
    # [0,0,2,2] vs [1,1,3,3]: L_IoU = 6/7, rho^2 = 2, C_w^2 + C_h^2 = 18
    p, t = box(0, 0, 2, 2), box(1, 1, 3, 3)
    v1 = math.exp(2 / 18) * 6 / 7
    assert boxloss.wise_iou_loss(p, t, eps=EPS, version=1).item() == pytest.approx(v1)
    beta = (6 / 7) / 0.5
    assert boxloss.wise_iou_loss(p, t, eps=EPS, version=2, iou_mean=0.5).item() == pytest.approx(beta**0.5 * v1)
    r = beta / (3 * 1.9 ** (beta - 3))
    assert boxloss.wise_iou_loss(p, t, eps=EPS, version=3, iou_mean=0.5).item() == pytest.approx(r * v1)
    # beta = delta gives r = 1: v3 = v1
    assert boxloss.wise_iou_loss(p, t, eps=EPS, iou_mean=(6 / 7) / 3).item() == pytest.approx(v1)
    # the batch mean: a single pair has beta = 1, r = 1 / (3 * 1.9^-2)
    assert boxloss.wise_iou_loss(p, t, eps=EPS).item() == pytest.approx(v1 * 1.9**2 / 3)
    # two pairs: the mean of L_IoU is (6/7 + 1/2) / 2
    p2 = torch.cat([p, box(0, 0, 1, 1)])
    t2 = torch.cat([t, box(0, 0, 2, 1)])
    mean = (6 / 7 + 0.5) / 2
    got = boxloss.wise_iou_loss(p2, t2, eps=EPS, reduction="none")
    b = (6 / 7) / mean
    assert got[0].item() == pytest.approx(b / (3 * 1.9 ** (b - 3)) * v1)


def test_mpdiou_hand_worked():
    # [0,0,2,2] vs [1,1,3,3]: d1^2 = d2^2 = 2, image 10 high and 20 wide: 4 / (100 + 400)
    p, t = box(0, 0, 2, 2), box(1, 1, 3, 3)
    assert boxloss.mpdiou_loss(p, t, eps=EPS, image_size=(10, 20)).item() == pytest.approx(1 - 1 / 7 + 4 / 500)
    # per-pair sizes as a tensor
    got = boxloss.mpdiou_loss(torch.cat([p, p]), torch.cat([t, t]), eps=EPS, reduction="none",
                              image_size=torch.tensor([[10.0, 20.0], [3.0, 4.0]]))
    torch.testing.assert_close(got, torch.tensor([1 - 1 / 7 + 4 / 500, 1 - 1 / 7 + 4 / 25], dtype=F64))


def test_inner_and_focaler_hand_worked():
    p, t = box(0, 0, 2, 2), box(1, 1, 3, 3)  # IoU = 1/7
    giou = 1 - 1 / 7 + 2 / 9
    # ratio 0.5: [0.5,0.5,1.5,1.5] and [1.5,1.5,2.5,2.5] touch at a corner, IoU_inner = 0
    assert boxloss.giou_loss(p, t, eps=EPS, inner_ratio=0.5).item() == pytest.approx(giou + 1 / 7)
    # ratio 2: [-1,-1,3,3] and [0,0,4,4]: I = 9, U = 23
    assert boxloss.giou_loss(p, t, eps=EPS, inner_ratio=2.0).item() == pytest.approx(giou + 1 / 7 - 9 / 23)
    # Focaler (0, 0.95): IoU_f = IoU / 0.95; (0.2, 0.95): IoU < d, IoU_f = 0
    assert boxloss.giou_loss(p, t, eps=EPS, focaler=(0.0, 0.95)).item() == pytest.approx(
        giou + 1 / 7 - (1 / 7) / 0.95)
    assert boxloss.giou_loss(p, t, eps=EPS, focaler=(0.2, 0.95)).item() == pytest.approx(giou + 1 / 7)
    # both: Focaler applied to IoU_inner (9/23 at ratio 2)
    assert boxloss.giou_loss(p, t, eps=EPS, inner_ratio=2.0, focaler=(0.1, 0.9)).item() == pytest.approx(
        giou + 1 / 7 - (9 / 23 - 0.1) / 0.8)
    # on the linear IoU loss and on EIoU (equal sizes: EIoU = DIoU here)
    assert boxloss.iou_loss(p, t, eps=EPS, inner_ratio=2.0).item() == pytest.approx(1 - 9 / 23)
    assert boxloss.eiou_loss(p, t, eps=EPS, inner_ratio=2.0).item() == pytest.approx(1 - 9 / 23 + 2 / 18)


# ---------------------------------------------------------------- 2. naive references from the papers


def ref_parts(p, t):
    """IoU, enclosing box, centre offsets and sizes of float64 pairs, no eps (general position only)."""
    x1, y1, x2, y2 = p.unbind(-1)
    gx1, gy1, gx2, gy2 = t.unbind(-1)
    w, h, wg, hg = x2 - x1, y2 - y1, gx2 - gx1, gy2 - gy1
    iw = (torch.minimum(x2, gx2) - torch.maximum(x1, gx1)).clamp(min=0)
    ih = (torch.minimum(y2, gy2) - torch.maximum(y1, gy1)).clamp(min=0)
    inter = iw * ih
    union = w * h + wg * hg - inter
    cw = torch.maximum(x2, gx2) - torch.minimum(x1, gx1)
    ch = torch.maximum(y2, gy2) - torch.minimum(y1, gy1)
    dx = (gx1 + gx2) / 2 - (x1 + x2) / 2
    dy = (gy1 + gy2) / 2 - (y1 + y2) / 2
    return dict(iou=inter / union, union=union, cw=cw, ch=ch, dx=dx, dy=dy, w=w, h=h, wg=wg, hg=hg)


def ref_base(p, t, kind, at=None):
    """1 - IoU, + (|C| - U)/|C| (GIoU), + rho^2/c^2 (DIoU), + alpha v (CIoU, alpha evaluated at ``at``)."""
    r = ref_parts(p, t)
    loss = 1 - r["iou"]
    if kind == "giou":
        c = r["cw"] * r["ch"]
        return loss + (c - r["union"]) / c
    if kind in ("diou", "ciou"):
        loss = loss + (r["dx"] ** 2 + r["dy"] ** 2) / (r["cw"] ** 2 + r["ch"] ** 2)
    if kind == "ciou":
        r0 = ref_parts(p if at is None else at, t)
        v = ref_v(r)
        v0 = ref_v(r0)
        loss = loss + (v0 / (1 - r0["iou"] + v0)).detach() * v
    return loss


def ref_v(r):
    return 4 / math.pi**2 * (torch.atan(r["wg"] / r["hg"]) - torch.atan(r["w"] / r["h"])) ** 2


# ``at``: the boxes at which the parts without gradient are evaluated (None: the boxes themselves);
# holding them at fixed boxes gives the function whose numerical derivative the gradient must equal.


def ref_eiou(p, t, gamma=0.0, at=None):
    """Zhang et al. 2021, eq. 8: L_EIoU = 1 - IoU + rho^2/c^2 + rho^2(w, w_gt)/C_w^2 + rho^2(h, h_gt)/C_h^2;
    eq. 11: L_Focal-EIoU = IoU^gamma L_EIoU (the weight held constant, as the authors' code)."""
    r = ref_parts(p, t)
    c2 = r["cw"] ** 2 + r["ch"] ** 2
    loss = (1 - r["iou"] + (r["dx"] ** 2 + r["dy"] ** 2) / c2 + (r["w"] - r["wg"]) ** 2 / r["cw"] ** 2
            + (r["h"] - r["hg"]) ** 2 / r["ch"] ** 2)
    return loss * ref_parts(p if at is None else at, t)["iou"].detach() ** gamma


def ref_siou(p, t, theta=4.0):
    """Gevorgyan 2022: Lambda = 1 - 2 sin^2(arcsin(c_h / sigma) - pi/4), gamma = 2 - Lambda,
    Delta = sum 1 - e^(-gamma rho_t), Omega = sum (1 - e^(-omega_t))^theta, L = 1 - IoU + (Delta + Omega)/2."""
    r = ref_parts(p, t)
    sigma = torch.sqrt(r["dx"] ** 2 + r["dy"] ** 2)
    a = torch.asin(r["dy"].abs() / sigma)
    lam = 1 - 2 * torch.sin(a - math.pi / 4) ** 2
    gamma = 2 - lam
    delta = sum(1 - torch.exp(-gamma * (r[d] / r[c]) ** 2) for d, c in (("dx", "cw"), ("dy", "ch")))
    omega = sum((1 - torch.exp(-(r[s] - r[g]).abs() / torch.maximum(r[s], r[g]))) ** theta
                for s, g in (("w", "wg"), ("h", "hg")))
    return 1 - r["iou"] + (delta + omega) / 2


def ref_alpha_iou(p, t, alpha, kind, at=None):
    """He et al. 2021, eqs. 4-7: L = 1 - IoU^a + penalty^a, CIoU's (beta v)^a with beta constant."""
    r = ref_parts(p, t)
    loss = 1 - r["iou"] ** alpha
    if kind == "giou":
        c = r["cw"] * r["ch"]
        loss = loss + ((c - r["union"]) / c).clamp(min=0) ** alpha  # C = U to rounding: not below 0
    if kind in ("diou", "ciou"):
        loss = loss + ((r["dx"] ** 2 + r["dy"] ** 2) / (r["cw"] ** 2 + r["ch"] ** 2)) ** alpha
    if kind == "ciou":
        r0 = ref_parts(p if at is None else at, t)
        v0 = ref_v(r0)
        beta = (v0 / (1 - r0["iou"] + v0)).detach()
        loss = loss + (beta * ref_v(r)) ** alpha
    return loss


def ref_wise_iou(p, t, version, mean=None, at=None):
    """Tong et al. 2023, eqs. 3-4 (v1), 9-10 (v2, gamma 0.5), 11-13 (v3, alpha 1.9, delta 3); * = detached.
    ``mean`` None: the mean of L_IoU over the pairs."""
    r, r0 = ref_parts(p, t), ref_parts(p if at is None else at, t)
    l_iou = 1 - r["iou"]
    r_wiou = torch.exp((r["dx"] ** 2 + r["dy"] ** 2) / (r0["cw"] ** 2 + r0["ch"] ** 2).detach())
    v1 = r_wiou * l_iou
    l_star = (1 - r0["iou"]).detach()
    beta = l_star / (l_star.mean() if mean is None else mean)
    if version == 1:
        return v1
    if version == 2:
        return beta**0.5 * v1
    return beta / (3.0 * 1.9 ** (beta - 3.0)) * v1


def ref_mpdiou(p, t, height, width):
    """Ma and Xu 2023, eqs. 8-11: d1^2, d2^2 over w^2 + h^2 of the input image."""
    r = ref_parts(p, t)
    d1 = (p[:, 0] - t[:, 0]) ** 2 + (p[:, 1] - t[:, 1]) ** 2
    d2 = (p[:, 2] - t[:, 2]) ** 2 + (p[:, 3] - t[:, 3]) ** 2
    return 1 - r["iou"] + d1 / (width**2 + height**2) + d2 / (width**2 + height**2)


def ref_inner_iou(p, t, ratio):
    """Zhang et al. 2023, eqs. 7-12: auxiliary boxes about the centres, IoU_inner = inter / union."""
    xc, yc, w, h = (p[:, 0] + p[:, 2]) / 2, (p[:, 1] + p[:, 3]) / 2, p[:, 2] - p[:, 0], p[:, 3] - p[:, 1]
    xg, yg, wg, hg = (t[:, 0] + t[:, 2]) / 2, (t[:, 1] + t[:, 3]) / 2, t[:, 2] - t[:, 0], t[:, 3] - t[:, 1]
    bl, br, bt, bb = xc - w * ratio / 2, xc + w * ratio / 2, yc - h * ratio / 2, yc + h * ratio / 2
    gl, gr, gt, gb = xg - wg * ratio / 2, xg + wg * ratio / 2, yg - hg * ratio / 2, yg + hg * ratio / 2
    inter = (torch.minimum(br, gr) - torch.maximum(bl, gl)).clamp(min=0) * (
        torch.minimum(bb, gb) - torch.maximum(bt, gt)).clamp(min=0)
    union = w * h * ratio**2 + wg * hg * ratio**2 - inter
    return inter / union


def ref_focaler(iou, d, u):
    """Zhang and Zhang 2024, eq. 3: 0 below d, linear between d and u, 1 above u."""
    return torch.where(iou < d, torch.zeros_like(iou), torch.where(iou > u, torch.ones_like(iou), (iou - d) / (u - d)))


def ref_inner(kind, ratio):
    return lambda p, t, at=None: ref_base(p, t, kind, at) + ref_parts(p, t)["iou"] - ref_inner_iou(p, t, ratio)


def ref_focaler_loss(kind, d, u):
    return lambda p, t, at=None: ref_base(p, t, kind, at) + ref_parts(p, t)["iou"] - ref_focaler(
        ref_parts(p, t)["iou"], d, u)


def _ours(fn, **options):
    return lambda p, t: fn(p, t, reduction="none", eps=EPS, **options)


REFERENCES = {
    "eiou": (_ours(boxloss.eiou_loss), ref_eiou),
    "focal_eiou": (_ours(boxloss.eiou_loss, focal_gamma=0.5), lambda p, t, at=None: ref_eiou(p, t, 0.5, at)),
    "siou": (_ours(boxloss.siou_loss), ref_siou),
    "siou_theta2": (_ours(boxloss.siou_loss, theta=2.0), lambda p, t: ref_siou(p, t, 2.0)),
    "mpdiou": (_ours(boxloss.mpdiou_loss, image_size=(480, 640)), lambda p, t: ref_mpdiou(p, t, 480.0, 640.0)),
    **{f"alpha_{kind}_{a}": (_ours(boxloss.alpha_iou_loss, alpha=a, kind=kind),
                             lambda p, t, at=None, a=a, kind=kind: ref_alpha_iou(p, t, a, kind, at))
       for kind in ("iou", "giou", "diou", "ciou") for a in (2.0, 3.0)},
    **{f"wise_v{v}": (_ours(boxloss.wise_iou_loss, version=v, iou_mean=0.7),
                      lambda p, t, at=None, v=v: ref_wise_iou(p, t, v, 0.7, at)) for v in (1, 2, 3)},
    "wise_v3_batch_mean": (_ours(boxloss.wise_iou_loss), lambda p, t, at=None: ref_wise_iou(p, t, 3, None, at)),
    "inner_ciou": (_ours(boxloss.ciou_loss, inner_ratio=0.8), ref_inner("ciou", 0.8)),
    "inner_giou_1.2": (_ours(boxloss.giou_loss, inner_ratio=1.2), ref_inner("giou", 1.2)),
    "inner_iou": (_ours(boxloss.iou_loss, inner_ratio=0.7), ref_inner("iou", 0.7)),
    "focaler_ciou": (_ours(boxloss.ciou_loss, focaler=(0.0, 0.95)), ref_focaler_loss("ciou", 0.0, 0.95)),
    "focaler_diou": (_ours(boxloss.diou_loss, focaler=(0.1, 0.6)), ref_focaler_loss("diou", 0.1, 0.6)),
}
# the cases with parts held constant (no gradient): gradcheck compares with the reference held at the boxes
FROZEN = ("focal_eiou", "alpha_ciou_3.0", "wise_v1", "wise_v2", "wise_v3", "wise_v3_batch_mean", "inner_ciou",
          "focaler_ciou")


@pytest.mark.parametrize("case", list(REFERENCES))
def test_matches_the_papers_formula(case):
    ours, ref = REFERENCES[case]
    pred, target = random_pairs(600, seed=1)
    got, want = value_and_grads(ours, pred, target), value_and_grads(ref, pred, target)
    iou = ref_parts(pred, target)["iou"]
    assert (iou == 0).sum() > 100 and (iou > 0.5).sum() > 20  # disjoint and well-overlapping pairs
    assert_same_value_and_grads(got, want, rtol=1e-8, atol=1e-10)


def test_alpha_below_one_matches_where_terms_are_positive():
    """alpha < 1: the reference's x^a has an infinite gradient at x = 0 (disjoint pairs); ours is 0 there."""
    pred, target = random_pairs(600, seed=2)
    overlap = ref_parts(pred, target)["iou"] > 0
    for kind in ("iou", "giou", "diou", "ciou"):
        got = value_and_grads(_ours(boxloss.alpha_iou_loss, alpha=0.5, kind=kind), pred[overlap], target[overlap])
        want = value_and_grads(lambda p, t: ref_alpha_iou(p, t, 0.5, kind), pred[overlap], target[overlap])
        assert_same_value_and_grads(got, want, rtol=1e-7, atol=1e-10)  # x^0.5 near 0 amplifies rounding
        gp = value_and_grads(_ours(boxloss.alpha_iou_loss, alpha=0.5, kind=kind), pred, target)[1]
        assert torch.isfinite(gp).all()


# ---------------------------------------------------------------- 3. special cases


@pytest.mark.parametrize("kind", ["iou", "giou", "diou", "ciou"])
def test_alpha_one_is_the_existing_loss_exactly(kind):
    pred, target = box_pairs(200, seed=3)
    base = boxloss.get_loss(kind)
    got = value_and_grads(lambda p, t: boxloss.alpha_iou_loss(p, t, alpha=1.0, kind=kind, reduction="none"), pred,
                          target)
    want = value_and_grads(lambda p, t: base(p, t, reduction="none"), pred, target)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["iou", "giou", "diou", "ciou", "eiou", "siou"])
@pytest.mark.parametrize("modifier", [{"inner_ratio": 1.0}, {"focaler": (0.0, 1.0)},
                                      {"inner_ratio": 1.0, "focaler": (0.0, 1.0)}], ids=["inner", "focaler", "both"])
def test_neutral_modifiers_give_the_base_loss(name, modifier):
    pred, target = box_pairs(200, seed=4, dtype=F64)
    base = boxloss.get_loss(name)
    got = value_and_grads(lambda p, t: base(p, t, reduction="none", **modifier), pred, target)
    want = value_and_grads(lambda p, t: base(p, t, reduction="none"), pred, target)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_focal_eiou_gamma_zero_is_eiou_and_wise_v2_gamma_zero_is_v1():
    pred, target = box_pairs(200, seed=5, dtype=F64)
    for a, b in zip(value_and_grads(_ours(boxloss.eiou_loss, focal_gamma=0.0), pred, target),
                    value_and_grads(_ours(boxloss.eiou_loss), pred, target)):
        assert torch.equal(a, b)
    torch.testing.assert_close(boxloss.wise_iou_loss(pred, target, version=2, gamma=0.0, reduction="none"),
                               boxloss.wise_iou_loss(pred, target, version=1, reduction="none"), rtol=0, atol=0)


def test_focal_eiou_weight_has_no_gradient():
    """With IoU^gamma differentiated, disjoint boxes would get 0 * inf = NaN at gamma = 0.5; the gradient
    is gamma-times-weighted EIoU's (the weight a constant)."""
    pred, target = random_pairs(300, seed=6)
    got = value_and_grads(_ours(boxloss.eiou_loss, focal_gamma=0.5), pred, target)
    weight = ref_parts(pred, target)["iou"] ** 0.5
    plain = value_and_grads(_ours(boxloss.eiou_loss), pred, target)
    torch.testing.assert_close(got[1], plain[1] * weight[:, None], rtol=1e-9, atol=1e-12)
    assert torch.isfinite(got[1]).all()


# ---------------------------------------------------------------- 4. gradcheck


GRADCHECK = {
    "eiou": dict(fn=boxloss.eiou_loss),
    "siou": dict(fn=boxloss.siou_loss),
    "alpha_iou": dict(fn=boxloss.alpha_iou_loss, kind="iou"),
    "alpha_iou_half": dict(fn=boxloss.alpha_iou_loss, alpha=0.5, kind="iou"),
    "alpha_giou": dict(fn=boxloss.alpha_iou_loss, alpha=2.0, kind="giou"),
    "alpha_diou": dict(fn=boxloss.alpha_iou_loss, kind="diou"),
    "mpdiou": dict(fn=boxloss.mpdiou_loss, image_size=(64, 96)),
    "inner_giou": dict(fn=boxloss.giou_loss, inner_ratio=0.7),
    "inner_siou": dict(fn=boxloss.siou_loss, inner_ratio=1.3),
    "focaler_giou": dict(fn=boxloss.giou_loss, focaler=(0.05, 0.9)),
    "focaler_inner_eiou": dict(fn=boxloss.eiou_loss, inner_ratio=0.9, focaler=(0.0, 0.95)),
    "focaler_iou": dict(fn=boxloss.iou_loss, focaler=(0.0, 0.95)),
}


def jittered_pairs(n=40):
    pred, target = box_pairs(n, seed=5, dtype=F64)
    # away from the kinks of min/max/abs: jitter every coordinate
    g = torch.Generator().manual_seed(6)
    pred = pred + 0.01 * torch.rand(pred.shape, generator=g, dtype=F64)
    target = target + 0.01 * torch.rand(target.shape, generator=g, dtype=F64)
    return pred, target


@pytest.mark.parametrize("case", list(GRADCHECK))
def test_gradcheck(case):
    options = dict(GRADCHECK[case])
    fn = options.pop("fn")
    pred, target = (x.requires_grad_() for x in jittered_pairs())
    assert torch.autograd.gradcheck(lambda p, t: fn(p, t, reduction="none", **options), (pred, target))


@pytest.mark.parametrize("case", FROZEN)
def test_gradient_with_the_constant_parts_held(case):
    """Where a part has no gradient by definition (Focal-EIoU's weight, CIoU's alpha and beta, Wise-IoU's
    denominator and focusing), the gradient is the derivative of the loss with that part held at its
    value: numerically, of the reference with those parts evaluated at the unmoved boxes."""
    ours, ref = REFERENCES[case]
    pred, target = jittered_pairs(30)
    p0 = pred.clone()
    analytic = value_and_grads(ours, pred, target)[1]
    numeric = numerical_grad(lambda p: ref(p, target, at=p0), pred)
    torch.testing.assert_close(analytic, numeric, rtol=1e-5, atol=1e-8)


# ---------------------------------------------------------------- SIoU against MMDetection


def mmdet_siou_loss(pred, target, eps=1e-7, neg_gamma=False):
    """MMDetection 3.3's ``siou_loss`` (mmdet/models/losses/iou_loss.py, "modified from YOLOv6"), ported
    term by term: its eps placements, its arcsin angle, and the clamp of SIoU to [-1, 1]."""
    lt = torch.max(pred[:, :2], target[:, :2])
    rb = torch.min(pred[:, 2:], target[:, 2:])
    wh = (rb - lt).clamp(min=0)
    overlap = wh[:, 0] * wh[:, 1]
    ap = (pred[:, 2] - pred[:, 0]) * (pred[:, 3] - pred[:, 1])
    ag = (target[:, 2] - target[:, 0]) * (target[:, 3] - target[:, 1])
    ious = overlap / (ap + ag - overlap + eps)
    enclose_wh = (torch.max(pred[:, 2:], target[:, 2:]) - torch.min(pred[:, :2], target[:, :2])).clamp(min=eps)
    cw, ch = enclose_wh[:, 0], enclose_wh[:, 1]
    w1, h1 = pred[:, 2] - pred[:, 0], pred[:, 3] - pred[:, 1] + eps
    w2, h2 = target[:, 2] - target[:, 0], target[:, 3] - target[:, 1] + eps
    s_cw = (target[:, 0] + target[:, 2] - pred[:, 0] - pred[:, 2]) * 0.5 + eps
    s_ch = (target[:, 1] + target[:, 3] - pred[:, 1] - pred[:, 3]) * 0.5 + eps
    sigma = torch.pow(s_cw**2 + s_ch**2, 0.5)
    sin_alpha_1, sin_alpha_2 = torch.abs(s_cw) / sigma, torch.abs(s_ch) / sigma
    sin_alpha = torch.where(sin_alpha_1 > math.sqrt(2) / 2, sin_alpha_2, sin_alpha_1)
    angle_cost = torch.cos(torch.asin(sin_alpha) * 2 - math.pi / 2)
    rho_x, rho_y = (s_cw / cw) ** 2, (s_ch / ch) ** 2
    gamma = angle_cost - 2 if neg_gamma else 2 - angle_cost
    distance_cost = 2 - torch.exp(gamma * rho_x) - torch.exp(gamma * rho_y)
    omiga_w = torch.abs(w1 - w2) / torch.max(w1, w2)
    omiga_h = torch.abs(h1 - h2) / torch.max(h1, h2)
    shape_cost = torch.pow(1 - torch.exp(-omiga_w), 4) + torch.pow(1 - torch.exp(-omiga_h), 4)
    sious = ious - 0.5 * (distance_cost + shape_cost)
    return 1 - sious.clamp(min=-1.0, max=1.0)


def test_siou_equals_mmdetection_with_neg_gamma():
    pred, target = random_pairs(2000, seed=7)
    # a quarter: small boxes of very different sizes, far apart along one axis and a few px along the
    # other (rho ~ 1 on both, Lambda ~ 0): there the loss passes 2 and MMDetection's clamp acts
    g = torch.Generator().manual_seed(8)
    far = torch.arange(2000) % 4 == 0
    k = int(far.sum())

    def uniform(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(*shape, generator=g, dtype=F64)

    size = uniform(1e-4, 1e-3, k, 2)
    centre = pred[far, :2]
    offset = torch.stack([uniform(2, 5, k), uniform(300, 1000, k)], 1) * torch.sign(uniform(-1, 1, k, 2))
    offset[: k // 2] = offset[: k // 2].flip(1)
    size_t = size * torch.exp(uniform(3, 5, k, 2))
    pred[far] = torch.cat([centre - size / 2, centre + size / 2], 1)
    target[far] = torch.cat([centre + offset - size_t / 2, centre + offset + size_t / 2], 1)
    ref = mmdet_siou_loss(pred, target, neg_gamma=True)
    ours = boxloss.siou_loss(pred, target, reduction="none")
    clamped = ref >= 2.0  # MMDetection clamps SIoU at -1, the loss at 2; the paper's loss goes on
    assert clamped.sum() > 10
    assert (ours[clamped] > 2.0).all()
    # its eps of 1e-7 on the heights is 1e-3 of these sides: a looser comparison on the small boxes
    torch.testing.assert_close(ours[far & ~clamped], ref[far & ~clamped], rtol=1e-3, atol=0)
    keep = ~far
    got = value_and_grads(lambda p, t: boxloss.siou_loss(p, t, reduction="none"), pred[keep], target[keep])
    want = value_and_grads(lambda p, t: mmdet_siou_loss(p, t, neg_gamma=True), pred[keep], target[keep])
    # MMDetection adds eps = 1e-7 to the centre offsets and the heights: 1e-8 of the values here, up to
    # 3e-6 of a pair's gradient where the centres are nearly aligned on one axis (an offset of 0.03 px)
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-8)
    for a, b in zip(got[1:], want[1:]):
        scale = b.abs().amax(1, keepdim=True)
        torch.testing.assert_close(a / scale, b / scale, rtol=1e-5, atol=1e-5)


def test_mmdetection_default_sign_falls_to_zero_as_boxes_move_apart():
    # neg_gamma=False: exp(+(2 - Lambda) rho), Delta < 0. Shifted by (40, 0): 2 - e^1.28 - 1 = -2.6,
    # SIoU = 0 + 1.3 clamped to 1, loss 0; the paper's 1 + (1 - e^-1.28) / 2 = 1.36
    p, t = box(0, 0, 10, 10), box(40, 0, 50, 10)
    assert mmdet_siou_loss(p, t).item() == 0.0
    assert mmdet_siou_loss(p, t, neg_gamma=True).item() == pytest.approx(1 + (1 - math.exp(-1.28)) / 2)
    assert boxloss.siou_loss(p, t).item() == pytest.approx(1 + (1 - math.exp(-1.28)) / 2)
    # shifted by (40, 40): 2 - 2 e^0.64 = -1.79, loss 1 - 0.90 = 0.10; the paper's 2 - e^-0.64 = 1.47
    t = box(40, 40, 50, 50)
    assert mmdet_siou_loss(p, t).item() == pytest.approx(1 - (math.exp(0.64) - 1))
    assert boxloss.siou_loss(p, t).item() == pytest.approx(2 - math.exp(-0.64))
    # and the paper's loss grows with the distance
    assert boxloss.siou_loss(p, box(90, 90, 100, 100)).item() > boxloss.siou_loss(p, t).item()


# ---------------------------------------------------------------- edges: identical, degenerate


VARIANTS = {
    "eiou": dict(name="eiou"),
    "focal_eiou": dict(name="eiou", focal_gamma=0.5),
    "siou": dict(name="siou"),
    "alpha_iou_half": dict(name="alpha_iou", alpha=0.5),
    "alpha_iou": dict(name="alpha_iou"),
    "wise_v1": dict(name="wise_iou", version=1),
    "wise_v2": dict(name="wise_iou", version=2),
    "wise_v3": dict(name="wise_iou"),
    "mpdiou": dict(name="mpdiou", image_size=(64, 64)),
    "inner_ciou": dict(name="ciou", inner_ratio=0.7),
    "inner_iou_large": dict(name="iou", inner_ratio=1.5),
    "focaler_siou": dict(name="siou", focaler=(0.0, 0.95)),
    "inner_focaler_giou": dict(name="giou", inner_ratio=0.8, focaler=(0.1, 0.9)),
}


def _variant(case):
    options = dict(VARIANTS[case])
    return boxloss.get_loss(options.pop("name"), **options)


@pytest.mark.parametrize("case", list(VARIANTS))
def test_identical_boxes_give_zero_loss_and_gradient(case):
    pred, _ = box_pairs(50, seed=8, dtype=F64)
    loss, gp, gt = value_and_grads(lambda p, t: _variant(case)(p, t, reduction="none"), pred, pred.clone())
    assert loss.abs().max() < 1e-6
    assert gp.abs().max() < 1e-6 and gt.abs().max() < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("case", list(VARIANTS))
def test_degenerate_boxes_are_finite(case, dtype):
    pred, target = degenerate_pairs(dtype)
    extra_p = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, -0.0, -0.0], [0.0, 0.0, 1e-30, 1e-30],
                            [0.0, 0.0, 1e-20, 0.0], [0.0, 0.0, 1.0, 0.0], [1e-20, 0, 1, 1]], dtype=dtype)
    extra_t = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0],
                            [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, -0.0, 1.0], [0, 1e-20, 1, 1]], dtype=dtype)
    pred, target = torch.cat([pred, extra_p]), torch.cat([target, extra_t])
    got = value_and_grads(lambda p, t: _variant(case)(p, t, reduction="none"), pred, target)
    assert all(torch.isfinite(x).all() for x in got), got


@pytest.mark.parametrize("name", ["eiou", "siou", "alpha_iou", "wise_iou"])
def test_scale_and_translation_invariance(name):
    pred, target = random_pairs(200, seed=9)
    fn = boxloss.get_loss(name, reduction="none")
    base = fn(pred, target)
    shift = torch.tensor([13.0, -7.0, 13.0, -7.0], dtype=F64)
    torch.testing.assert_close(fn(pred + shift, target + shift), base, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(fn(pred * 3.5, target * 3.5), base, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- bad options


@pytest.mark.parametrize("call, error, match", [
    (lambda p, t: boxloss.eiou_loss(p, t, focal_gamma=-0.5), ValueError, r"focal_gamma must be .* got -0.5"),
    (lambda p, t: boxloss.alpha_iou_loss(p, t, kind="eiou"), ValueError, r"kind must be one of .* got 'eiou'"),
    (lambda p, t: boxloss.alpha_iou_loss(p, t, alpha=0), ValueError, r"alpha must be a finite number > 0, got 0"),
    (lambda p, t: boxloss.alpha_iou_loss(p, t, alpha=-1.0), ValueError, r"alpha must be .* got -1.0"),
    (lambda p, t: boxloss.wise_iou_loss(p, t, version=4), ValueError, r"version must be one of \(1, 2, 3\), got 4"),
    (lambda p, t: boxloss.wise_iou_loss(p, t, version="3"), ValueError, r"version must be .* got '3'"),
    (lambda p, t: boxloss.wise_iou_loss(p, t, iou_mean=0.0), ValueError, r"iou_mean must be .* got 0.0"),
    (lambda p, t: boxloss.wise_iou_loss(p, t, delta=0.0), ValueError, r"delta must be .* got 0.0"),
    (lambda p, t: boxloss.siou_loss(p, t, theta=0.5), ValueError, r"theta must be a finite number >= 1, got 0.5"),
    (lambda p, t: boxloss.giou_loss(p, t, inner_ratio=0), ValueError, r"inner_ratio must be .* > 0, got 0"),
    (lambda p, t: boxloss.siou_loss(p, t, inner_ratio=-0.8), ValueError, r"inner_ratio must be .* got -0.8"),
    (lambda p, t: boxloss.ciou_loss(p, t, focaler=(0.5, 0.5)), ValueError, r"0 <= d < u <= 1, got \(0.5, 0.5\)"),
    (lambda p, t: boxloss.diou_loss(p, t, focaler=(0.9, 0.1)), ValueError, r"got \(0.9, 0.1\)"),
    (lambda p, t: boxloss.eiou_loss(p, t, focaler=0.5), ValueError, r"focaler must be None or a pair .* got 0.5"),
    (lambda p, t: boxloss.iou_loss(p, t, mode="log", inner_ratio=0.8), ValueError, r"linear .* got mode='log'"),
    (lambda p, t: boxloss.mpdiou_loss(p, t), ValueError, r"image_size is required.*got None"),
    (lambda p, t: boxloss.mpdiou_loss(p, t, image_size=(640,)), ValueError, r"image_size must be .* got \(640,\)"),
    (lambda p, t: boxloss.mpdiou_loss(p, t, image_size=(0, 640)), ValueError, r"got \(0, 640\)"),
    (lambda p, t: boxloss.mpdiou_loss(p, t, image_size=torch.ones(5, 3)), ValueError, r"shape \(5, 3\)"),
    (lambda p, t: boxloss.mpdiou_loss(p, t, image_size=torch.ones(4, 2)), ValueError, r"\(4, 2\) does not broadcast"),
    (lambda p, t: boxloss.get_loss("eiou", theta=4), TypeError, r"eiou_loss\(\) got an unexpected option 'theta'"),
    (lambda p, t: boxloss.WiseIoULoss(momentum=0), ValueError, r"momentum must be .* got 0"),
    (lambda p, t: boxloss.WiseIoULoss(version=0), ValueError, r"version must be .* got 0"),
])
def test_bad_options_name_the_value(call, error, match):
    p, t = box_pairs(5, seed=0)
    with pytest.raises(error, match=match):
        call(p, t)


# ---------------------------------------------------------------- Wise-IoU's running mean


def test_wise_iou_module_keeps_a_running_mean():
    pred, target = random_pairs(64, seed=10)
    module = boxloss.WiseIoULoss(momentum=0.1)
    assert module.state_dict()["iou_mean"].item() == 1.0
    batch_mean = (1 - ref_parts(pred, target)["iou"]).mean().item()
    loss = module(pred, target)
    expected_mean = 0.9 * 1.0 + 0.1 * batch_mean  # updated before use
    assert module.iou_mean.item() == pytest.approx(expected_mean, rel=1e-6)
    torch.testing.assert_close(loss, boxloss.wise_iou_loss(pred, target, iou_mean=expected_mean), rtol=1e-6, atol=0)
    module(pred, target)
    assert module.iou_mean.item() == pytest.approx(0.9 * expected_mean + 0.1 * batch_mean, rel=1e-6)
    # eval: frozen
    module.eval()
    frozen = module.iou_mean.item()
    module(pred, target)
    assert module.iou_mean.item() == frozen
    # an empty call leaves it unchanged
    module.train()
    module(pred[:0], target[:0])
    assert module.iou_mean.item() == frozen


def test_wise_iou_running_mean_is_saved_and_restored():
    pred, target = random_pairs(64, seed=11)
    trained = boxloss.WiseIoULoss()
    for _ in range(3):
        trained(pred, target)
    state = trained.state_dict()
    restored = boxloss.WiseIoULoss()
    restored.load_state_dict(state)
    assert restored.iou_mean.item() == trained.iou_mean.item() != 1.0
    # inside a model; a state dict without the buffer (saved before the loss was chosen) keeps 1.0
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), boxloss.WiseIoULoss())
    model[1].iou_mean.fill_(0.25)
    fresh = torch.nn.Sequential(torch.nn.Linear(2, 2), boxloss.WiseIoULoss())
    fresh.load_state_dict(model.state_dict())
    assert fresh[1].iou_mean.item() == 0.25
    without = {k: v for k, v in model.state_dict().items() if not k.endswith("iou_mean")}
    result = fresh[1:].load_state_dict({}, strict=True)
    assert not result.missing_keys
    fresh.load_state_dict(without, strict=True)
    assert fresh[1].iou_mean.item() == 0.25
    with pytest.raises(RuntimeError, match="Missing key"):
        fresh.load_state_dict({k: v for k, v in without.items() if not k.endswith("bias")})
