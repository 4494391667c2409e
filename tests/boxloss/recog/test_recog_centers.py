"""Center loss (update rule and parameter mode), minimum-margin, range and marginal loss."""

import itertools

import pytest
import torch

from boxloss.recog import CenterLoss, center_loss, center_update, marginal_loss, minimum_margin_loss, range_loss


def _data(n=10, d=3, classes=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    y = (torch.arange(n) % classes)[torch.randperm(n, generator=g)]
    return x, y


# --------------------------------------------------------------------------- center loss


def test_center_loss_hand_worked_and_naive():
    # x = (3, 4) with centre 0: ½·25 = 12.5; x = (1, 0) with centre (1, 1): ½·1 = 0.5. Mean 6.5.
    centers = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    x = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    assert torch.allclose(center_loss(x, torch.tensor([0, 1]), centers), torch.tensor(6.5))
    x, y = _data()
    c = torch.randn(3, 3, dtype=torch.float64)
    naive = torch.stack([0.5 * (x[i] - c[y[i]]).pow(2).sum() for i in range(len(x))])
    assert torch.allclose(center_loss(x, y, c, reduction="none"), naive)
    assert torch.allclose(center_loss(x, y, c, reduction="sum"), naive.sum())
    w = torch.rand(len(x), dtype=torch.float64)
    assert torch.allclose(center_loss(x, y, c, weight=w, avg_factor=4.0), (naive * w).sum() / 4)


def test_center_update_equals_naive_loop():
    x, y = _data(n=11, classes=4, seed=1)
    y[y == 3] = 2  # class 3 absent from the batch: its centre must not move
    c = torch.randn(4, 3, dtype=torch.float64)
    alpha = 0.3
    expected = c.clone()
    for j in range(4):
        members = [i for i in range(len(x)) if y[i] == j]
        delta = sum((c[j] - x[i] for i in members), torch.zeros(3, dtype=torch.float64)) / (1 + len(members))
        expected[j] = c[j] - alpha * delta
    out = center_update(c, x, y, alpha=alpha)
    assert torch.allclose(out, expected, rtol=1e-12)
    assert torch.equal(out[3], c[3])


def test_center_loss_module_update_mode():
    torch.manual_seed(0)
    crit = CenterLoss(3, 2, alpha=0.5)
    assert "centers" in dict(crit.named_buffers()) and not list(crit.parameters())
    x, y = _data(n=9, d=2, dtype=torch.float32)
    x.requires_grad_()
    before = crit.centers.clone()
    loss = crit(x, y)
    loss.backward()
    # gradient w.r.t. x is (x − c_y)/N; centres get none
    assert torch.allclose(x.grad, (x - before[y]).detach() / len(x), atol=1e-6)
    crit.update_centers(x, y)
    assert torch.allclose(crit.centers, center_update(before, x.detach(), y, alpha=0.5))
    # repeated updates on a fixed batch converge to the class means
    for _ in range(200):
        crit.update_centers(x, y)
    means = torch.stack([x.detach()[y == j].mean(0) for j in range(3)])
    assert torch.allclose(crit.centers, means, atol=1e-5)


def test_center_loss_module_parameter_mode():
    crit = CenterLoss(3, 2, learn_centers=True)
    assert isinstance(crit.centers, torch.nn.Parameter)
    x, y = _data(n=9, d=2, dtype=torch.float32)
    crit(x, y).backward()
    expected = torch.zeros(3, 2).index_add_(0, y, (crit.centers[y] - x).detach()) / len(x)
    assert torch.allclose(crit.centers.grad, expected, atol=1e-6)
    with pytest.raises(ValueError, match="learn_centers=True"):
        crit.update_centers(x, y)
    assert "learn_centers=True" in repr(crit)


def test_center_loss_errors_and_gradcheck():
    c = torch.zeros(3, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\] \(num_classes=3\), got 3"):
        center_loss(torch.randn(2, 2), torch.tensor([0, 3]), c.float())
    with pytest.raises(ValueError, match=r"centers must have the embedding dimension 4 .* got shape \(3, 2\)"):
        center_loss(torch.randn(2, 4), torch.tensor([0, 1]), c)
    with pytest.raises(ValueError, match="alpha must be in \\[0, 1\\], got 1.5"):
        CenterLoss(3, 2, alpha=1.5)
    with pytest.raises(ValueError, match="num_classes must be >= 1, got 0"):
        CenterLoss(0, 2)
    x, y = _data()
    x.requires_grad_()
    cc = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: center_loss(a, y, b), (x, cc))


def test_center_loss_empty_batch_is_zero_with_graph():
    x = torch.zeros(0, 2, requires_grad=True)
    out = center_loss(x, torch.zeros(0, dtype=torch.long), torch.zeros(3, 2))
    out.backward()
    assert out.item() == 0.0 and x.grad.shape == (0, 2)


# --------------------------------------------------------------------------- minimum margin


def test_minimum_margin_hand_worked():
    # centres on a line at 0, 1, 3: squared distances 1, 9, 4; with M = 4 only the first pair
    # is over-close: hinge 3, mean over 3 pairs = 1.
    c = torch.tensor([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0]])
    assert torch.allclose(minimum_margin_loss(c, margin=4.0), torch.tensor(1.0))
    assert torch.allclose(minimum_margin_loss(c, margin=4.0, reduction="none"), torch.tensor([3.0, 0.0, 0.0]))
    # plain distances 1, 3, 2 with M = 2.5: hinges 1.5, 0, 0.5
    assert torch.allclose(minimum_margin_loss(c, margin=2.5, squared=False, reduction="sum"), torch.tensor(2.0))
    # labels select the classes present: only centres 1 and 2 (d² = 4) -> hinge 1 with M = 5
    assert torch.allclose(minimum_margin_loss(c, torch.tensor([2, 1, 2]), margin=5.0), torch.tensor(1.0))


def test_minimum_margin_naive_gradcheck_and_errors():
    g = torch.Generator().manual_seed(2)
    c = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    naive = torch.stack([torch.clamp(3.0 - (c[i] - c[j]).pow(2).sum(), min=0) for i, j in itertools.combinations(range(5), 2)])
    assert torch.allclose(minimum_margin_loss(c, margin=3.0), naive.mean())
    assert torch.autograd.gradcheck(lambda t: minimum_margin_loss(t, margin=3.0), (c,))
    assert torch.autograd.gradcheck(lambda t: minimum_margin_loss(t, margin=3.0, squared=False), (c,))
    with pytest.raises(ValueError, match="at least 2 classes in labels to form a pair, got 1"):
        minimum_margin_loss(c, torch.tensor([1, 1]), margin=1.0)
    with pytest.raises(ValueError, match="margin must be > 0, got 0"):
        minimum_margin_loss(c, margin=0)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\] \(num_classes=5\), got -1"):
        minimum_margin_loss(c, torch.tensor([-1, 2]), margin=1.0)


def test_minimum_margin_trains_learned_centres():
    crit = CenterLoss(4, 2, learn_centers=True)
    with torch.no_grad():
        crit.centers.copy_(torch.tensor([[0.0, 0.0], [0.1, 0.0], [0.0, 0.1], [5.0, 5.0]]))
    opt = torch.optim.SGD(crit.parameters(), lr=0.1)
    for _ in range(100):
        opt.zero_grad()
        minimum_margin_loss(crit.centers, margin=1.0).backward()
        opt.step()
    assert minimum_margin_loss(crit.centers, margin=1.0).item() < 1e-6


# --------------------------------------------------------------------------- range loss


def _naive_range(x, y, margin, k, alpha, beta):
    classes = sorted(set(y.tolist()))
    intra = torch.zeros((), dtype=x.dtype)
    for c in classes:
        idx = [i for i in range(len(x)) if y[i] == c]
        d = [(x[i] - x[j]).pow(2).sum().sqrt() for i, j in itertools.combinations(idx, 2)]
        if d:
            top = sorted(d, key=float, reverse=True)[:k]
            intra = intra + len(top) / sum(1 / t for t in top)
    centres = [x[y == c].mean(0) for c in classes]
    dmin = min((centres[a] - centres[b]).pow(2).sum() for a, b in itertools.combinations(range(len(classes)), 2))
    return alpha * intra + beta * torch.clamp(margin - dmin, min=0)


def test_range_loss_hand_worked():
    # class 0: points 0, 1, 3 (1-D): distances 1, 3, 2 -> top-2 {3, 2}: harmonic 2/(1/3+1/2) = 2.4
    # class 1: single point at 10 -> no intra term. Centres 4/3 and 10: d² = (26/3)² ≈ 75.1 > M.
    x = torch.tensor([[0.0], [1.0], [3.0], [10.0]])
    y = torch.tensor([0, 0, 0, 1])
    assert torch.allclose(range_loss(x, y, margin=50.0), torch.tensor(2.4))
    # with M = 100 the inter term is 100 − 75.11
    expected = 2.4 + 100 - (26 / 3) ** 2
    assert torch.allclose(range_loss(x, y, margin=100.0), torch.tensor(expected))


@pytest.mark.parametrize("k", [1, 2, 4])
def test_range_loss_matches_naive_loop(k):
    x, y = _data(n=11, classes=3, seed=3)
    y[0] = 7  # a singleton class
    out = range_loss(x, y, margin=3.0, k=k, alpha=0.7, beta=1.3)
    assert torch.allclose(out, _naive_range(x, y, 3.0, k, 0.7, 1.3), rtol=1e-12)


def test_range_loss_gradcheck_errors_and_duplicates():
    x, y = _data(n=8, classes=2, seed=4)
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda t: range_loss(t, y, margin=5.0), (x,))
    dup = torch.tensor([[1.0, 1.0], [1.0, 1.0], [0.0, 0.0]], requires_grad=True)
    range_loss(dup, torch.tensor([0, 0, 1]), margin=1.0).backward()  # zero intra-class distance
    assert torch.isfinite(dup.grad).all()
    with pytest.raises(ValueError, match="at least 2 classes and one class with 2 samples .* labels \\[0, 0, 0\\]"):
        range_loss(torch.randn(3, 2), torch.tensor([0, 0, 0]), margin=1.0)
    with pytest.raises(ValueError, match="k must be >= 1, got 0"):
        range_loss(torch.randn(3, 2), torch.tensor([0, 0, 1]), margin=1.0, k=0)


# --------------------------------------------------------------------------- marginal loss


def test_marginal_loss_matches_paper_normalisation():
    x, y = _data(n=7, d=4, classes=3, seed=5)
    n = len(x)
    u = x / x.norm(dim=1, keepdim=True)
    total = 0
    for i, j in itertools.permutations(range(n), 2):
        yij = 1.0 if y[i] == y[j] else -1.0
        total = total + torch.clamp(0.3 - yij * (1.2 - (u[i] - u[j]).pow(2).sum()), min=0)
    assert torch.allclose(marginal_loss(x, y), total / (n * n - n), rtol=1e-12)
    assert torch.allclose(marginal_loss(x, y, reduction="sum"), total / 2, rtol=1e-12)


def test_marginal_loss_hand_worked_and_gradcheck():
    # same class, orthogonal unit vectors: d² = 2, loss = max(0, .3 − (1.2 − 2)) = 1.1
    # different class, identical direction: d² = 0, loss = max(0, .3 + (1.2 − 0)) = 1.5
    x = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    assert torch.allclose(marginal_loss(x, torch.tensor([0, 0])), torch.tensor(1.1))
    assert torch.allclose(marginal_loss(torch.tensor([[1.0, 0.0], [2.0, 0.0]]), torch.tensor([0, 1])), torch.tensor(1.5))
    x, y = _data(n=6, seed=6)
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda t: marginal_loss(t, y), (x,))
    with pytest.raises(ValueError, match="at least 2 embeddings to form a pair, got 1"):
        marginal_loss(torch.randn(1, 2), torch.tensor([0]))
