"""Contract tests looped over every recog loss: reductions, bad reduction, half inputs,
degenerate inputs, and invariances (hypothesis)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from boxloss.recog import (
    ArcFace,
    CosFace,
    center_loss,
    contrastive_loss,
    marginal_loss,
    minimum_margin_loss,
    npair_loss,
    range_loss,
    triplet_loss,
    triplet_margin_loss,
    tuplet_loss,
)

LABELS = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
CENTERS = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.5, 0.0]])

# name -> loss(x [8, 3], **kw); every one takes reduction=
LOSSES = {
    "contrastive": lambda x, **kw: contrastive_loss(x, LABELS, margin=2.0, **kw),
    "triplet_batch_all": lambda x, **kw: triplet_loss(x, LABELS, mining="batch_all", **kw),
    "triplet_batch_hard": lambda x, **kw: triplet_loss(x, LABELS, mining="batch_hard", squared=False, **kw),
    "triplet_semi_hard": lambda x, **kw: triplet_loss(x, LABELS, mining="semi_hard", **kw),
    "triplet_margin": lambda x, **kw: triplet_margin_loss(x[:2], x[2:4], x[4:6], **kw),
    "tuplet": lambda x, **kw: tuplet_loss(x[:2], x[2:4], x[4:8].reshape(2, 2, 3), **kw),
    "npair": lambda x, **kw: npair_loss(x[:4], x[4:], **kw),
    "center": lambda x, **kw: center_loss(x, LABELS, CENTERS, **kw),
    "minimum_margin": lambda x, **kw: minimum_margin_loss(x[:4], margin=1.0, **kw),
    "marginal": lambda x, **kw: marginal_loss(x, LABELS, **kw),
}


def _x(seed=0, dtype=torch.float32):
    return torch.randn(8, 3, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("name", list(LOSSES))
def test_reductions_agree(name):
    fn = LOSSES[name]
    x = _x()
    none = fn(x, reduction="none")
    assert none.dim() == 1 and none.numel() > 0
    assert torch.allclose(fn(x, reduction="sum"), none.sum())
    assert torch.allclose(fn(x), none.mean())


@pytest.mark.parametrize("name", list(LOSSES))
def test_bad_reduction_raises(name):
    with pytest.raises(ValueError, match="reduction must be 'none', 'mean' or 'sum', got 'avg'"):
        LOSSES[name](_x(), reduction="avg")


@pytest.mark.parametrize("name", list(LOSSES) + ["range"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_computed_in_float32(name, dtype):
    fn = LOSSES.get(name, lambda x, **kw: range_loss(x, LABELS, margin=2.0))
    x = _x().to(dtype)
    out = fn(x)
    assert out.dtype == torch.float32
    assert torch.allclose(out, fn(x.float()), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(LOSSES) + ["range"])
@pytest.mark.parametrize("fill", [0.0, 1.0])
def test_degenerate_inputs_finite_values_and_gradients(name, fill):
    # every embedding identical (zero distances, zero vectors for fill=0): no NaN anywhere
    fn = LOSSES.get(name, lambda x, **kw: range_loss(x, LABELS, margin=2.0))
    x = torch.full((8, 3), fill, requires_grad=True)
    out = fn(x)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(x.grad).all()


# --------------------------------------------------------------------------- invariances

_vec = st.floats(-3, 3, allow_nan=False, width=64)


@settings(max_examples=25, deadline=None)
@given(shift=st.lists(_vec, min_size=3, max_size=3), seed=st.integers(0, 1000))
def test_distance_losses_are_translation_invariant(shift, seed):
    x = _x(seed, torch.float64)
    t = torch.tensor(shift, dtype=torch.float64)
    for fn in (LOSSES["contrastive"], LOSSES["triplet_batch_all"], LOSSES["triplet_semi_hard"]):
        assert torch.allclose(fn(x + t), fn(x), rtol=1e-9, atol=1e-9)
    assert torch.allclose(range_loss(x + t, LABELS, margin=2.0), range_loss(x, LABELS, margin=2.0), rtol=1e-9)


@settings(max_examples=25, deadline=None)
@given(scale=st.lists(st.floats(0.1, 10, width=64), min_size=8, max_size=8), seed=st.integers(0, 1000))
def test_normalised_losses_ignore_embedding_norms(scale, seed):
    x = _x(seed, torch.float64)
    s = torch.tensor(scale, dtype=torch.float64)[:, None]
    assert torch.allclose(marginal_loss(x * s, LABELS), marginal_loss(x, LABELS), rtol=1e-9, atol=1e-12)
    torch.manual_seed(seed)
    for head in (ArcFace(3, 3, s=10.0, m=0.3).double(), CosFace(3, 3, s=10.0, m=0.2).double()):
        assert torch.allclose(head(x * s, LABELS), head(x, LABELS), rtol=1e-9)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 1000), margin=st.floats(0, 3, width=64))
def test_batch_hard_is_the_worst_batch_all_triplet(seed, margin):
    # Per anchor, batch-hard takes max_p d(a,p) − min_n d(a,n): the anchor's worst triplet, so the
    # largest batch-hard loss is the largest batch-all loss, and batch-all never exceeds it.
    x = _x(seed, torch.float64)
    ba = triplet_loss(x, LABELS, margin=margin, reduction="none")
    bh = triplet_loss(x, LABELS, margin=margin, mining="batch_hard", reduction="none")
    assert (ba >= 0).all() and (bh >= 0).all()
    assert torch.isclose(bh.max(), ba.max(), rtol=1e-12)
