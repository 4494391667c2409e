"""Margin heads: identities with softmax CE, closed forms, λ annealing, edge numerics, errors."""

import math

import pytest
import torch
import torch.nn.functional as F

from boxloss.recog import (
    ArcFace,
    CombinedMargin,
    CosFace,
    LargeMarginSoftmax,
    SphereFace,
    angular_margin_psi,
    arcface_logits,
    combined_margin_logits,
    cosface_logits,
    cross_entropy,
)

HEADS = {
    "arcface": lambda d, c: ArcFace(d, c, s=8.0, m=0.5),
    "arcface_easy": lambda d, c: ArcFace(d, c, s=8.0, m=0.5, easy_margin=True),
    "cosface": lambda d, c: CosFace(d, c, s=8.0, m=0.35),
    "combined": lambda d, c: CombinedMargin(d, c, s=8.0, m1=1.2, m2=0.2, m3=0.1),
    "sphereface": lambda d, c: SphereFace(d, c, m=4),
    "lsoftmax": lambda d, c: LargeMarginSoftmax(d, c, m=3),
}


def _batch(n=8, d=5, c=4, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=dtype), torch.randint(0, c, (n,), generator=g)


def _normalised_softmax_ce(head, x, y, s):
    cos = F.normalize(x, dim=1) @ F.normalize(head.weight, dim=1).t()
    return F.cross_entropy(s * cos, y)


# --------------------------------------------------------------------------- identities


@pytest.mark.parametrize("make", [lambda: ArcFace(5, 4, s=30.0, m=0.0), lambda: CosFace(5, 4, s=30.0, m=0.0)])
def test_zero_margin_is_normalised_softmax(make):
    torch.manual_seed(0)
    head = make()
    x, y = _batch()
    assert torch.allclose(head(x, y), _normalised_softmax_ce(head, x, y, 30.0), rtol=1e-6)


def test_combined_margin_reproduces_arcface_and_cosface():
    torch.manual_seed(1)
    arc, cos = ArcFace(5, 4, s=16.0, m=0.5), CosFace(5, 4, s=16.0, m=0.35)
    comb_arc = CombinedMargin(5, 4, s=16.0, m1=1.0, m2=0.5, m3=0.0)
    comb_cos = CombinedMargin(5, 4, s=16.0, m1=1.0, m2=0.0, m3=0.35)
    for head in (cos, comb_arc, comb_cos):
        head.weight.data.copy_(arc.weight.data)
    x, y = _batch(n=16)
    # ArcFace's fallback applies only where θ_y > π − m; keep every target angle below that so
    # the two definitions agree everywhere (checked, not assumed).
    x = x + 2.0 * F.normalize(arc.weight.data, dim=1)[y]
    theta = torch.acos(arc.cosine(x).gather(1, y[:, None]))
    assert (theta < math.pi - 0.5).all()
    assert torch.allclose(comb_arc.logits(x, y), arc.logits(x, y), atol=1e-6)
    assert torch.equal(comb_cos.logits(x, y), cos.logits(x, y))
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    comb_arc(x1, y).backward()
    arc(x2, y).backward()
    assert torch.allclose(x1.grad, x2.grad, atol=1e-6)


def test_lsoftmax_m1_is_softmax_cross_entropy():
    torch.manual_seed(2)
    head = LargeMarginSoftmax(5, 4, m=1).double()
    x, y = _batch(dtype=torch.float64)
    ref = F.cross_entropy(x @ head.weight.t(), y)
    assert torch.allclose(head(x, y), ref, rtol=1e-12)  # with annealing λ (any λ)
    head.base = 0.0
    assert torch.allclose(head(x, y), ref, rtol=1e-12)  # and without


def test_sphereface_m1_is_feature_norm_times_cosine():
    torch.manual_seed(3)
    head = SphereFace(5, 4, m=1, base=0.0, lambda_min=0.0)
    x, y = _batch()
    cos = F.normalize(x, dim=1) @ F.normalize(head.weight, dim=1).t()
    assert torch.allclose(head.logits(x, y), x.norm(dim=1, keepdim=True) * cos, atol=1e-6)


def test_cross_entropy_label_smoothing_identity():
    logits, y = _batch(n=6, d=4, c=4, dtype=torch.float64)
    eps = 0.2
    q = F.one_hot(y, 4).double() * (1 - eps) + eps / 4
    expected = -(q * F.log_softmax(logits, 1)).sum(1).mean()
    assert torch.allclose(cross_entropy(logits, y, label_smoothing=eps), expected, rtol=1e-12)
    torch.manual_seed(4)
    head = CosFace(4, 4, s=10.0, m=0.2, label_smoothing=eps)
    x, y = _batch(d=4)
    assert torch.allclose(head(x, y), cross_entropy(head.logits(x, y), y, label_smoothing=eps), rtol=1e-6)


# --------------------------------------------------------------------------- closed forms


def test_arcface_logits_against_acos_formula():
    cos = torch.linspace(-1, 1, 201, dtype=torch.float64)[:, None].repeat(1, 3)
    y = torch.zeros(201, dtype=torch.long)
    s, m = 4.0, 0.5
    theta = torch.acos(cos[:, 0])
    target = arcface_logits(cos, y, s=s, m=m)[:, 0]
    expected = torch.where(theta + m <= math.pi, torch.cos(theta + m), cos[:, 0] - m * math.sin(m))
    assert torch.allclose(target, s * expected, atol=1e-5)  # sin θ guard: |error| <= s·1e-6
    easy = arcface_logits(cos, y, s=s, m=m, easy_margin=True)[:, 0]
    assert torch.allclose(easy, s * torch.where(cos[:, 0] > 0, torch.cos(theta + m), cos[:, 0]), atol=1e-5)
    # other columns are s·cos θ untouched
    assert torch.equal(arcface_logits(cos, y, s=s, m=m)[:, 1:], s * cos[:, 1:])


def test_cosface_and_combined_logits_against_formula():
    g = torch.Generator().manual_seed(5)
    cos = torch.rand(6, 4, generator=g, dtype=torch.float64) * 2 - 1
    y = torch.randint(0, 4, (6,), generator=g)
    onehot = F.one_hot(y, 4).bool()
    assert torch.allclose(cosface_logits(cos, y, s=3.0, m=0.2), 3.0 * torch.where(onehot, cos - 0.2, cos))
    theta = torch.acos(cos)
    expected = torch.where(onehot, torch.cos(1.5 * theta + 0.3) - 0.1, cos)
    assert torch.allclose(combined_margin_logits(cos, y, s=3.0, m1=1.5, m2=0.3, m3=0.1), 3.0 * expected, atol=1e-12)


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5])
def test_psi_against_definition(m):
    theta = torch.linspace(0, math.pi, 1001, dtype=torch.float64)
    k = torch.clamp(torch.floor(m * theta / math.pi), max=m - 1)
    expected = (-1) ** k * torch.cos(m * theta) - 2 * k
    psi = angular_margin_psi(torch.cos(theta), m)
    assert torch.allclose(psi, expected, atol=1e-9)
    assert (psi[1:] <= psi[:-1] + 1e-12).all()  # monotonically decreasing on [0, π]
    assert torch.allclose(psi[-1], torch.tensor(1.0 - 2 * m, dtype=torch.float64))  # ψ(π) = 1 − 2m


def test_annealing_schedule_and_iteration_buffer():
    head = SphereFace(3, 2)  # base 1000, γ 0.12, power 1, λ_min 5
    assert head.lambda_ == pytest.approx(1000.0)
    x, y = _batch(n=4, d=3, c=2)
    head(x, y)
    assert int(head.iteration) == 1 and head.lambda_ == pytest.approx(1000 / 1.12)
    head.eval()
    head(x, y)
    assert int(head.iteration) == 1  # eval does not advance the schedule
    head.iteration.fill_(100_000)
    assert head.lambda_ == pytest.approx(5.0)  # floor λ_min
    assert "iteration" in head.state_dict()
    # λ weights cos θ against ψ: target = ‖x‖(λ cos + ψ)/(1 + λ)
    head.iteration.fill_(10)
    lam = 1000 / (1 + 0.12 * 10)
    cos_t = head.cosine(x).gather(1, y[:, None])[:, 0]
    expected = x.norm(dim=1) * (lam * cos_t + angular_margin_psi(cos_t, 4)) / (1 + lam)
    assert torch.allclose(head.logits(x, y).gather(1, y[:, None])[:, 0], expected, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("name", list(HEADS))
def test_gradcheck_float64(name):
    torch.manual_seed(6)
    head = HEADS[name](4, 3).double()
    if isinstance(head, (SphereFace, LargeMarginSoftmax)):
        head.iteration.fill_(5000)  # λ small enough that ψ matters
    x, y = _batch(n=5, d=4, c=3, dtype=torch.float64)
    x.requires_grad_()
    head.eval()  # keep λ fixed during gradcheck's repeated calls
    assert torch.autograd.gradcheck(lambda t, w: _with_weight(head, w)(t, y), (x, head.weight.detach().clone().requires_grad_()))


def _with_weight(head, w):
    def run(x, y):
        saved = head.weight
        del head.weight
        head.weight = w  # plain tensor attribute so gradcheck can perturb it
        try:
            return head(x, y)
        finally:
            del head.weight
            head.weight = saved

    return run


@pytest.mark.parametrize("name", list(HEADS))
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_finite_gradients_at_cos_plus_minus_one(name, sign):
    torch.manual_seed(7)
    head = HEADS[name](4, 3)
    y = torch.tensor([0, 1, 2])
    x = (sign * 2.0 * head.weight.detach()[y]).requires_grad_()  # cos θ_y = ±1 (up to rounding)
    loss = head(x, y)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all() and torch.isfinite(head.weight.grad).all()


@pytest.mark.parametrize(
    "fn",
    [
        lambda c, y: arcface_logits(c, y, s=8.0, m=0.5),
        lambda c, y: arcface_logits(c, y, s=8.0, m=0.5, easy_margin=True),
        lambda c, y: cosface_logits(c, y, s=8.0, m=0.35),
        lambda c, y: combined_margin_logits(c, y, s=8.0, m1=1.0, m2=0.5, m3=0.1),
        lambda c, y: combined_margin_logits(c, y, s=8.0, m1=2.0, m2=0.1, m3=0.1),
        lambda c, y: angular_margin_psi(c, 4),
    ],
)
def test_functional_margins_finite_gradient_at_exact_unit_cosine(fn):
    cos = torch.tensor([[1.0, 0.0], [-1.0, 0.5], [1.0, -1.0]], requires_grad=True)
    y = torch.tensor([0, 0, 1])
    out = fn(cos, y)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(cos.grad).all()


def test_guards_hold_without_the_outer_clamp():
    # torch's clamp passes no gradient at its bounds, which already hides sqrt'(0) and acos'(±1)
    # at cos = ±1 exactly; the guards must hold on their own (other torch versions, other callers).
    from boxloss.recog.heads import _chebyshev, _cos_plus

    c = torch.tensor([1.0, -1.0, 0.25], dtype=torch.float64, requires_grad=True)
    out = _cos_plus(c, 0.5)
    out.sum().backward()
    assert torch.isfinite(c.grad).all()
    assert torch.allclose(out.detach(), torch.cos(torch.acos(c.detach()) + 0.5), atol=1e-6)
    c.grad = None
    _chebyshev(c, 4).sum().backward()  # T_4 = 8c⁴ − 8c² + 1, T_4' = 32c³ − 16c
    assert torch.allclose(c.grad, torch.tensor([16.0, -16.0, 32 * 0.25**3 - 16 * 0.25], dtype=torch.float64))


@pytest.mark.parametrize("name", list(HEADS))
def test_float16_autocast_keeps_float32_weights_and_finite_gradients(name):
    torch.manual_seed(8)
    head = HEADS[name](8, 5)
    x, y = _batch(n=6, d=8, c=5)
    x[0] = head.weight.detach()[y[0]]  # one sample at cos θ = 1
    x.requires_grad_()
    with torch.autocast("cpu", dtype=torch.float16):
        feats = torch.nn.functional.linear(x, torch.eye(8))  # a float16 activation, as in a net under AMP
        assert feats.dtype == torch.float16
        logits = head.logits(feats, y)
    assert logits.dtype == torch.float32 and head.weight.dtype == torch.float32
    # same values as float32 inputs outside autocast (the half activation is only upcast)
    assert torch.allclose(logits, head.logits(feats.detach().float(), y))
    with torch.autocast("cpu", dtype=torch.float16):
        loss = head(feats, y)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all() and torch.isfinite(head.weight.grad).all()


@pytest.mark.parametrize("name", list(HEADS))
def test_empty_batch_is_zero_with_graph(name):
    head = HEADS[name](4, 3)
    x = torch.zeros(0, 4, requires_grad=True)
    loss = head(x, torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0 and x.grad.shape == (0, 4)


# --------------------------------------------------------------------------- errors


def test_head_errors():
    head = ArcFace(4, 3)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\] \(num_classes=3\), got 3"):
        head(torch.randn(2, 4), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"embeddings must have 4 features .* got shape \(2, 5\)"):
        head(torch.randn(2, 5), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"labels must have shape \[2\] .* got \(3,\)"):
        head(torch.randn(2, 4), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="num_classes must be >= 2 .* got 1"):
        CosFace(4, 1)
    with pytest.raises(TypeError, match="m must be an int .* got float 1.5"):
        SphereFace(4, 3, m=1.5)
    with pytest.raises(ValueError, match="m must be >= 1, got 0"):
        LargeMarginSoftmax(4, 3, m=0)
    with pytest.raises(ValueError, match="s must be > 0.0, got -1"):
        CosFace(4, 3, s=-1)
    with pytest.raises(ValueError, match="m must be in \\[0, pi\\) radians, got 4"):
        ArcFace(4, 3, m=4)
    with pytest.raises(ValueError, match="m1 must be > 0.0, got 0"):
        CombinedMargin(4, 3, m1=0)
    with pytest.raises(ValueError, match="label_smoothing must be in \\[0, 1\\], got 2"):
        CosFace(4, 3, label_smoothing=2)
    assert "s=64.0, m=0.5, easy_margin=False" in repr(head)


def test_functional_margins_compute_half_inputs_in_float32():
    cos = torch.tensor([[0.3, -0.2], [0.9, 0.1]])
    y = torch.tensor([0, 1])
    for fn in (arcface_logits, cosface_logits, combined_margin_logits):
        out = fn(cos.half(), y, s=2.0)
        assert out.dtype == torch.float32
        assert torch.allclose(out, fn(cos.half().float(), y, s=2.0))
    assert angular_margin_psi(cos.bfloat16(), 2).dtype == torch.float32


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", list(HEADS))
def test_cuda_autocast_matches_cpu(name):
    torch.manual_seed(9)
    head = HEADS[name](8, 5).eval()
    x, y = _batch(n=6, d=8, c=5)
    ref = head.logits(x, y)
    head_cuda = head.cuda()
    xc = x.cuda().requires_grad_()
    with torch.autocast("cuda", dtype=torch.float16):
        logits = head_cuda.logits(xc.half(), y.cuda())
        loss = head_cuda(xc.half(), y.cuda())
    loss.backward()
    assert logits.dtype == torch.float32 and head_cuda.weight.dtype == torch.float32
    assert torch.isfinite(xc.grad).all()
    # the only half-precision step is the embedding itself
    assert torch.allclose(logits.cpu(), head.cpu().logits(x.half().float(), y), rtol=1e-4, atol=1e-4)
    assert torch.allclose(ref, head.logits(x, y))
