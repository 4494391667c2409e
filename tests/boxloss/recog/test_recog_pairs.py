"""Pair, triplet and tuplet losses against hand-worked values, naive loops and identities."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from boxloss.recog import (
    contrastive_loss,
    npair_loss,
    select_npair_classes,
    select_triplets,
    triplet_loss,
    triplet_margin_loss,
    tuplet_loss,
)


def _data(n=10, d=4, classes=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    y = torch.arange(n) % classes  # every class appears at least twice for n >= 2 * classes
    y = y[torch.randperm(n, generator=g)]
    return x, y


def _dist(xi, xj, squared):
    d2 = (xi - xj).pow(2).sum()
    return d2 if squared else d2.sqrt()


# --------------------------------------------------------------------------- contrastive


def test_contrastive_hand_worked():
    # 1-D points 0, 0.6, 3: pairs (0, 0.6) similar d=0.6 -> ½·0.36 = 0.18;
    # (0, 3) dissimilar d=3 > margin 1 -> 0; (0.6, 3) dissimilar d=2.4 -> 0. Mean = 0.06.
    x = torch.tensor([[0.0], [0.6], [3.0]])
    y = torch.tensor([0, 0, 1])
    assert torch.allclose(contrastive_loss(x, y, margin=1.0), torch.tensor(0.06))
    # make the (0, 0.6) pair dissimilar: ½·(1 − 0.6)² = 0.08 for it.
    out = contrastive_loss(x, torch.tensor([0, 1, 2]), margin=1.0, reduction="none")
    assert torch.allclose(out, torch.tensor([0.08, 0.0, 0.0]))


def test_contrastive_matches_naive_loop():
    x, y = _data()
    margin = 2.5
    naive = []
    for i, j in itertools.combinations(range(len(x)), 2):
        d = _dist(x[i], x[j], squared=False)
        naive.append(0.5 * d**2 if y[i] == y[j] else 0.5 * torch.clamp(margin - d, min=0) ** 2)
    naive = torch.stack(naive)
    assert torch.allclose(contrastive_loss(x, y, margin=margin, reduction="none"), naive, atol=1e-12)
    assert torch.allclose(contrastive_loss(x, y, margin=margin), naive.mean(), atol=1e-12)


def test_contrastive_coincident_points_finite_gradient():
    x = torch.tensor([[1.0, 2.0], [1.0, 2.0], [0.0, 0.0]], requires_grad=True)
    contrastive_loss(x, torch.tensor([0, 1, 1])).backward()  # the dissimilar pair sits at d = 0
    assert torch.isfinite(x.grad).all()


# --------------------------------------------------------------------------- triplet


def _naive_batch_all(x, y, margin, squared):
    losses = []
    for a, p, n in itertools.product(range(len(x)), repeat=3):
        if a != p and y[a] == y[p] and y[n] != y[a]:
            losses.append(torch.clamp(_dist(x[a], x[p], squared) - _dist(x[a], x[n], squared) + margin, min=0))
    return torch.stack(losses)


def _naive_batch_hard(x, y, margin, squared):
    losses = []
    for a in range(len(x)):
        pos = [_dist(x[a], x[p], squared) for p in range(len(x)) if p != a and y[p] == y[a]]
        neg = [_dist(x[a], x[n], squared) for n in range(len(x)) if y[n] != y[a]]
        if pos and neg:
            losses.append(torch.clamp(torch.stack(pos).max() - torch.stack(neg).min() + margin, min=0))
    return torch.stack(losses)


def _naive_semi_hard(x, y, margin, squared):
    losses = []
    for a, p in itertools.permutations(range(len(x)), 2):
        if y[a] != y[p]:
            continue
        d_ap = _dist(x[a], x[p], squared)
        neg = [_dist(x[a], x[n], squared) for n in range(len(x)) if y[n] != y[a]]
        outside = [d for d in neg if d > d_ap]
        d_an = torch.stack(outside).min() if outside else torch.stack(neg).max()
        losses.append(torch.clamp(d_ap - d_an + margin, min=0))
    return torch.stack(losses)


_NAIVE = {"batch_all": _naive_batch_all, "batch_hard": _naive_batch_hard, "semi_hard": _naive_semi_hard}


@pytest.mark.parametrize("mining", list(_NAIVE))
@pytest.mark.parametrize("squared", [True, False])
def test_triplet_matches_naive_loop_values_and_gradients(mining, squared):
    x, y = _data(n=9, d=3, classes=3, seed=1)
    margin = 1.0
    x1 = x.clone().requires_grad_()
    x2 = x.clone().requires_grad_()
    ours = triplet_loss(x1, y, margin=margin, mining=mining, squared=squared)
    naive = _NAIVE[mining](x2, y, margin, squared).mean()
    assert ours.item() > 0  # the comparison is not 0 == 0
    assert torch.allclose(ours, naive, rtol=1e-10, atol=1e-12)
    ours.backward()
    naive.backward()
    assert torch.allclose(x1.grad, x2.grad, rtol=1e-8, atol=1e-10)


def test_triplet_hand_worked_batch_hard():
    # 1-D: class 0 at 0 and 1, class 1 at 1.5. Anchor 0: hardest pos d²=1, neg d²=2.25 -> max(0, 1-2.25+2)=0.75.
    # Anchor 1: pos d²=1, neg d²=0.25 -> 2.75. Anchor 2 has no positive. Mean = 1.75.
    x = torch.tensor([[0.0], [1.0], [1.5]])
    y = torch.tensor([0, 0, 1])
    assert torch.allclose(triplet_loss(x, y, margin=2.0, mining="batch_hard"), torch.tensor(1.75))
    # batch-all has exactly the same two triplets here.
    assert torch.allclose(triplet_loss(x, y, margin=2.0, mining="batch_all"), torch.tensor(1.75))


def test_semi_hard_prefers_semi_hard_negative_then_falls_back():
    # Anchor 0 at 0, positive at 1 (d²=1). Negatives at 0.5 (d²=.25, hard) and 1.2 (d²=1.44,
    # semi-hard): the semi-hard one is used. For anchor 1 (at 1), positive 0 (d²=1): negatives
    # d²=.25 and .04, both closer, so the farthest (.25) is the fallback.
    x = torch.tensor([[0.0], [1.0], [0.5], [1.2]])
    y = torch.tensor([0, 0, 1, 1])
    trip = select_triplets(x, y, mining="semi_hard")
    chosen = {(int(a), int(p)): int(n) for a, p, n in trip}
    assert chosen[(0, 1)] == 3
    assert chosen[(1, 0)] == 2


@pytest.mark.parametrize("mining", list(_NAIVE))
@pytest.mark.parametrize("squared", [True, False])
def test_offline_selector_matches_online_loss(mining, squared):
    x, y = _data(n=12, d=5, classes=4, seed=2)
    idx = select_triplets(x, y, mining=mining, squared=squared)
    assert idx.dtype == torch.long and idx.shape[1] == 3
    a, p, n = idx.unbind(1)
    assert (y[a] == y[p]).all() and (a != p).all() and (y[a] != y[n]).all()
    offline = triplet_margin_loss(x[a], x[p], x[n], margin=0.7, squared=squared)
    online = triplet_loss(x, y, margin=0.7, mining=mining, squared=squared)
    assert torch.allclose(offline, online, rtol=1e-10)


def test_triplet_margin_loss_equals_torch_for_plain_distance():
    g = torch.Generator().manual_seed(3)
    a, p, n = (torch.randn(7, 4, generator=g, dtype=torch.float64) for _ in range(3))
    ref = F.triplet_margin_loss(a, p, n, margin=0.5, eps=0.0)
    assert torch.allclose(triplet_margin_loss(a, p, n, margin=0.5, squared=False), ref)


@pytest.mark.parametrize("mining", list(_NAIVE))
def test_triplet_gradcheck(mining):
    x, y = _data(n=8, d=3, classes=3, seed=4)
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda t: triplet_loss(t, y, margin=0.5, mining=mining, squared=False), (x,))
    assert torch.autograd.gradcheck(lambda t: triplet_loss(t, y, margin=0.5, mining=mining), (x,))


def test_triplet_errors():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="mining must be .* got 'hardest'"):
        triplet_loss(x, torch.tensor([0, 0, 1, 1]), mining="hardest")
    with pytest.raises(ValueError, match="at least two distinct labels .* labels \\[0, 0, 0, 0\\]"):
        triplet_loss(x, torch.tensor([0, 0, 0, 0]))
    with pytest.raises(ValueError, match="appears at\\s+least twice"):
        triplet_loss(x, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="margin must be >= 0, got -0.1"):
        triplet_loss(x, torch.tensor([0, 0, 1, 1]), margin=-0.1)
    with pytest.raises(ValueError, match=r"labels must have shape \[4\] .* got \(3,\)"):
        triplet_loss(x, torch.tensor([0, 0, 1]))
    with pytest.raises(TypeError, match="labels must be an integer tensor, got dtype torch.float32"):
        triplet_loss(x, torch.tensor([0.0, 0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match=r"embeddings must be a 2-D \[N, D\] tensor, got shape \(4,\)"):
        triplet_loss(torch.randn(4), torch.tensor([0, 0, 1, 1]))
    with pytest.raises(ValueError, match="same shape"):
        triplet_margin_loss(torch.randn(3, 2), torch.randn(3, 2), torch.randn(2, 2))


# --------------------------------------------------------------------------- tuplet and N-pair


def test_npair_matches_naive_definition_plus_penalty():
    g = torch.Generator().manual_seed(5)
    f = torch.randn(6, 4, generator=g, dtype=torch.float64)
    fp = torch.randn(6, 4, generator=g, dtype=torch.float64)
    l2 = 0.01
    naive = []
    for i in range(6):
        s = sum(torch.exp(f[i] @ fp[j] - f[i] @ fp[i]) for j in range(6) if j != i)
        naive.append(torch.log1p(s))
    penalty = 0.25 * l2 * (f.pow(2).sum(1).mean() + fp.pow(2).sum(1).mean())
    expected = torch.stack(naive).mean() + penalty
    assert torch.allclose(npair_loss(f, fp, l2_reg=l2), expected, rtol=1e-12)
    # ... and the same as cross-entropy over F·F⁺ᵀ with target i.
    ce = F.cross_entropy(f @ fp.t(), torch.arange(6))
    assert torch.allclose(npair_loss(f, fp, l2_reg=0.0), ce, rtol=1e-12)
    # "none" per pair averages to "mean"
    assert torch.allclose(npair_loss(f, fp, l2_reg=l2, reduction="none").mean(), expected, rtol=1e-12)


def test_npair_equals_tuplet_with_other_positives_as_negatives():
    g = torch.Generator().manual_seed(6)
    f = torch.randn(5, 3, generator=g, dtype=torch.float64)
    fp = torch.randn(5, 3, generator=g, dtype=torch.float64)
    negatives = torch.stack([fp[[j for j in range(5) if j != i]] for i in range(5)])  # [5, 4, 3]
    assert torch.allclose(tuplet_loss(f, fp, negatives), npair_loss(f, fp, l2_reg=0.0), rtol=1e-12)


def test_tuplet_with_one_negative_is_softplus_triplet():
    g = torch.Generator().manual_seed(7)
    a, p, n = (torch.randn(4, 3, generator=g, dtype=torch.float64) for _ in range(3))
    expected = F.softplus((a * n).sum(1) - (a * p).sum(1))
    assert torch.allclose(tuplet_loss(a, p, n[:, None], reduction="none"), expected, rtol=1e-12)


def test_npair_and_tuplet_gradcheck():
    g = torch.Generator().manual_seed(8)
    f = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    fp = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    neg = torch.randn(4, 2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: npair_loss(a, b, l2_reg=0.1), (f, fp))
    assert torch.autograd.gradcheck(lambda a, b, c: tuplet_loss(a, b, c), (f, fp, neg))


def test_npair_errors():
    with pytest.raises(ValueError, match="all labels distinct.*labels \\[0, 1, 1\\]"):
        npair_loss(torch.randn(3, 2), torch.randn(3, 2), labels=torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="at least 2 pairs .* got 1"):
        npair_loss(torch.randn(1, 2), torch.randn(1, 2))
    with pytest.raises(ValueError, match=r"positives must have the shape of anchors \(3, 2\), got \(3, 4\)"):
        npair_loss(torch.randn(3, 2), torch.randn(3, 4))
    with pytest.raises(ValueError, match="l2_reg must be >= 0, got -1"):
        npair_loss(torch.randn(3, 2), torch.randn(3, 2), l2_reg=-1)
    with pytest.raises(ValueError, match=r"negatives must have shape \[3, K, 2\] with K >= 1, got \(3, 2\)"):
        tuplet_loss(torch.randn(3, 2), torch.randn(3, 2), torch.randn(3, 2))


def test_select_npair_classes_greedy_rule():
    g = torch.Generator().manual_seed(9)
    x = torch.randn(40, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (40,), generator=g)
    chosen = select_npair_classes(x, y, 5, generator=torch.Generator().manual_seed(0))
    assert len(set(chosen.tolist())) == 5
    # naive greedy from the same first class
    classes = sorted(set(y.tolist()))
    means = {c: x[y == c].mean(0) for c in classes}
    picked = [int(chosen[0])]
    while len(picked) < 5:
        rest = [c for c in classes if c not in picked]
        picked.append(max(rest, key=lambda c: max(float(means[c] @ means[s]) for s in picked)))
    assert chosen.tolist() == picked
    with pytest.raises(ValueError, match="num_classes must be between 2 and the 10 distinct labels given, got 11"):
        select_npair_classes(x, y, 11)


# --------------------------------------------------------------------------- numerics


def test_pair_losses_half_inputs_are_computed_in_float32():
    x, y = _data(n=8, dtype=torch.float32)
    for fn in (contrastive_loss, triplet_loss):
        out = fn(x.half(), y)
        assert out.dtype == torch.float32
        assert math.isclose(out.item(), fn(x.half().float(), y).item(), rel_tol=1e-6)
