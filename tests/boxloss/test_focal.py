"""Classification losses against torchvision and torch references."""

import pytest
import torch
import torch.nn.functional as F
import torchvision.ops as tv

import boxloss


def _logits(n=10_000, k=1, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, k, generator=g) * 4).to(dtype)
    y = (torch.rand(n, k, generator=g) < 0.3).to(dtype)
    return x, y


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (-1.0, 2.0), (0.5, 0.5)])
def test_sigmoid_focal_matches_torchvision(reduction, alpha, gamma):
    x, y = _logits()
    x.requires_grad_()
    ours = boxloss.sigmoid_focal_loss(x, y, alpha=alpha, gamma=gamma, reduction=reduction)
    ref = tv.sigmoid_focal_loss(x, y, alpha=alpha, gamma=gamma, reduction=reduction)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    go = torch.rand(ours.shape, generator=torch.Generator().manual_seed(1))
    (g1,), (g2,) = torch.autograd.grad(ours, x, go), torch.autograd.grad(ref, x, go)
    torch.testing.assert_close(g1, g2, rtol=1e-6, atol=1e-6 * g2.abs().max().item())


def test_sigmoid_focal_without_alpha_gamma_is_bce():
    x, y = _logits(1000, 3, dtype=torch.float64)
    x.requires_grad_()
    ours = boxloss.sigmoid_focal_loss(x, y, alpha=-1, gamma=0)
    ref = F.binary_cross_entropy_with_logits(x, y)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(torch.autograd.grad(ours, x)[0], torch.autograd.grad(ref, x)[0])


def test_sigmoid_focal_hand_worked_and_avg_factor():
    # logit 0: p = 0.5; positive: 0.25 * 0.5^2 * ln 2; negative: 0.75 * 0.5^2 * ln 2
    x = torch.zeros(2, dtype=torch.float64)
    y = torch.tensor([1.0, 0.0], dtype=torch.float64)
    ln2 = torch.log(torch.tensor(2.0, dtype=torch.float64))
    torch.testing.assert_close(boxloss.sigmoid_focal_loss(x, y, reduction="none"), torch.stack([0.0625 * ln2, 0.1875 * ln2]))
    torch.testing.assert_close(boxloss.sigmoid_focal_loss(x, y, avg_factor=1.0), 0.25 * ln2)


def test_sigmoid_focal_contract():
    x, y = _logits(100, 4)
    with pytest.raises(ValueError, match="reduction must be"):
        boxloss.sigmoid_focal_loss(x, y, reduction="avg")
    with pytest.raises(ValueError, match=r"same shape, got \(100, 4\) and \(100, 3\)"):
        boxloss.sigmoid_focal_loss(x, y[:, :3])
    with pytest.raises(ValueError, match="gamma must be >= 0, got -1"):
        boxloss.sigmoid_focal_loss(x, y, gamma=-1)
    empty = torch.zeros(0, 4, requires_grad=True)
    loss = boxloss.sigmoid_focal_loss(empty, torch.zeros(0, 4))
    assert loss.item() == 0.0 and loss.requires_grad
    for dtype in (torch.float16, torch.bfloat16):
        out = boxloss.sigmoid_focal_loss(x.to(dtype), y.to(dtype), reduction="sum")
        assert out.dtype == torch.float32
        ref = tv.sigmoid_focal_loss(x.to(dtype).float(), y.float(), reduction="sum")
        torch.testing.assert_close(out, ref)
    module = boxloss.SigmoidFocalLoss(gamma=1.0, loss_weight=0.5)
    torch.testing.assert_close(module(x, y), 0.5 * boxloss.sigmoid_focal_loss(x, y, gamma=1.0))


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_matches_torch(smoothing):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(500, 7, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 7, (500,), generator=g)
    ours = boxloss.cross_entropy(logits, labels, label_smoothing=smoothing)
    ref = F.cross_entropy(logits, labels, label_smoothing=smoothing)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(torch.autograd.grad(ours, logits)[0], torch.autograd.grad(ref, logits)[0])
    # gamma = 0 focal is CE
    torch.testing.assert_close(boxloss.softmax_focal_loss(logits, labels, gamma=0.0, label_smoothing=smoothing), ref)


def test_softmax_focal_naive_loop():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(20, 5, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 5, (20,), generator=g)
    alpha = torch.rand(5, generator=g, dtype=torch.float64)
    ours = boxloss.softmax_focal_loss(logits, labels, gamma=2.0, alpha=alpha, reduction="none")
    p = logits.softmax(-1)
    expected = torch.stack([-alpha[y] * (1 - p[i, y]) ** 2 * torch.log(p[i, y]) for i, y in enumerate(labels.tolist())])
    torch.testing.assert_close(ours, expected)
    assert torch.autograd.gradcheck(
        lambda z: boxloss.softmax_focal_loss(z, labels, gamma=2.0, label_smoothing=0.1, reduction="none"),
        (logits.clone().requires_grad_(),),
    )
    with pytest.raises(ValueError, match=r"targets must be an integer tensor of shape \[20\]"):
        boxloss.softmax_focal_loss(logits, labels.float())
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\], got 1.5"):
        boxloss.cross_entropy(logits, labels, label_smoothing=1.5)


CUDA = pytest.param("cuda", marks=[pytest.mark.cuda,
                                   pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])


@pytest.mark.parametrize("device", [CUDA])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_focal_losses_on_cuda_match_cpu(device, dtype):
    x, y = _logits(500, 4, seed=5, dtype=dtype)
    labels = torch.randint(0, 4, (500,), generator=torch.Generator().manual_seed(6))
    alpha, weight = torch.tensor([0.1, 0.2, 0.3, 0.4]), torch.rand(500, generator=torch.Generator().manual_seed(7))
    xd = x.to(device).requires_grad_()
    cases = [
        (lambda z, d: boxloss.sigmoid_focal_loss(z, y.to(d), weight=weight[:, None].expand(500, 4).to(d),
                                                 avg_factor=9.0)),
        (lambda z, d: boxloss.softmax_focal_loss(z, labels.to(d), alpha=alpha.to(d), label_smoothing=0.1,
                                                 weight=weight.to(d))),
    ]
    for fn in cases:
        ref_x = x.clone().requires_grad_()
        ref = fn(ref_x, "cpu")
        out = fn(xd, device)
        assert out.is_cuda and out.dtype == torch.float32
        torch.testing.assert_close(out.cpu(), ref, rtol=1e-5, atol=1e-6)
        (g,), (g_ref,) = torch.autograd.grad(out, xd), torch.autograd.grad(ref, ref_x)
        torch.testing.assert_close(g.cpu().float(), g_ref.float(), rtol=1e-2, atol=1e-5)
    # class weights left on the CPU: an error naming both devices, not a failure inside the loss
    with pytest.raises(ValueError, match=r"alpha must be on the device of logits \(cuda:0\), got cpu"):
        boxloss.softmax_focal_loss(xd, labels.to(device), alpha=alpha)
