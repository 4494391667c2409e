"""Box formats, areas and the IoU family: torchvision parity, hand-worked cases, properties."""

import pytest
import torch
import torchvision.ops as tv
from hypothesis import given, settings
from hypothesis import strategies as st

import boxloss
from box_cases import box_pairs, degenerate_pairs

PAIRWISE = {
    "iou": (boxloss.box_iou, tv.box_iou, boxloss.matched_box_iou),
    "giou": (boxloss.generalized_box_iou, tv.generalized_box_iou, boxloss.matched_generalized_box_iou),
    "diou": (boxloss.distance_box_iou, tv.distance_box_iou, boxloss.matched_distance_box_iou),
    "ciou": (boxloss.complete_box_iou, tv.complete_box_iou, boxloss.matched_complete_box_iou),
}


def test_box_convert_hand_worked_and_round_trip():
    xyxy = torch.tensor([[1.0, 2.0, 5.0, 10.0]])
    torch.testing.assert_close(boxloss.box_convert(xyxy, "xyxy", "xywh"), torch.tensor([[1.0, 2.0, 4.0, 8.0]]))
    torch.testing.assert_close(boxloss.box_convert(xyxy, "xyxy", "cxcywh"), torch.tensor([[3.0, 6.0, 4.0, 8.0]]))
    pred, _ = box_pairs(200, seed=0, dtype=torch.float64)
    for fmt in ("xywh", "cxcywh"):
        torch.testing.assert_close(boxloss.box_convert(pred, "xyxy", fmt), tv.box_convert(pred, "xyxy", fmt))
        back = boxloss.box_convert(boxloss.box_convert(pred, "xyxy", fmt), fmt, "xyxy")
        torch.testing.assert_close(back, pred)
    torch.testing.assert_close(
        boxloss.box_convert(boxloss.box_convert(pred, "xyxy", "xywh"), "xywh", "cxcywh"),
        tv.box_convert(pred, "xyxy", "cxcywh"),
    )
    with pytest.raises(ValueError, match=r"out_fmt must be one of .*, got 'xyhw'"):
        boxloss.box_convert(xyxy, "xyxy", "xyhw")


def test_box_area():
    boxes = torch.tensor([[0, 0, 2, 3], [1, 1, 1, 5], [4, 4, 2, 6]])  # integers; zero width; inverted
    torch.testing.assert_close(boxloss.box_area(boxes), torch.tensor([6.0, 0.0, 0.0]))


@pytest.mark.parametrize("kind", sorted(PAIRWISE))
def test_pairwise_matches_torchvision(kind):
    ours_fn, ref_fn, matched_fn = PAIRWISE[kind]
    pred, target = box_pairs(10_000, seed=1)
    # pairwise on 100 x 10,000 pairs (a million values), values and gradients
    b1 = pred[::100].clone().requires_grad_()
    b2 = target.clone().requires_grad_()
    ours, ref = ours_fn(b1, b2), ref_fn(b1, b2)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    grad_out = torch.rand(ours.shape, generator=torch.Generator().manual_seed(0))
    for a, b in zip(torch.autograd.grad(ours, (b1, b2), grad_out), torch.autograd.grad(ref, (b1, b2), grad_out)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * b.abs().max().item())
    # the matched form is the diagonal of the pairwise one, on 500 pairs of every kind
    idx = torch.arange(0, 10_000, 20)
    diag = torch.stack([ref_fn(pred[i : i + 1], target[i : i + 1])[0, 0] for i in idx])
    torch.testing.assert_close(matched_fn(pred[idx], target[idx]), diag, rtol=1e-6, atol=1e-6)


def test_hand_worked_pairwise():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [2.0, 0.0, 4.0, 2.0], [0.0, 0.0, 2.0, 2.0], [5.0, 0.0, 7.0, 2.0]])
    # overlap 1/7; touching (0); identical (1); disjoint gap 3: GIoU = 0 - (14 - 8)/14
    torch.testing.assert_close(boxloss.box_iou(a, b), torch.tensor([[1 / 7, 0.0, 1.0, 0.0]]))
    torch.testing.assert_close(boxloss.generalized_box_iou(a, b), torch.tensor([[1 / 7 - 2 / 9, 0.0, 1.0, -6 / 14]]))


def test_pairwise_integer_boxes_and_errors():
    a = torch.tensor([[0, 0, 2, 2]])
    b = torch.tensor([[1, 1, 3, 3]])
    assert boxloss.box_iou(a, b).dtype == torch.float32
    assert boxloss.box_iou(a, b).item() == pytest.approx(1 / 7)
    assert boxloss.box_iou(torch.zeros(0, 4), b).shape == (0, 1)
    with pytest.raises(ValueError, match=r"boxes1 must have shape \[N, 4\], got \(2, 1, 4\)"):
        boxloss.box_iou(torch.zeros(2, 1, 4), b)
    with pytest.raises(ValueError, match=r"boxes2 must have shape \[\.\.\., 4\], got \(1, 5\)"):
        boxloss.box_iou(a, torch.zeros(1, 5))


def test_pairwise_degenerate_is_finite():
    pred, target = degenerate_pairs()
    for ours_fn, _, matched_fn in PAIRWISE.values():
        assert torch.isfinite(ours_fn(pred, target)).all()
        assert torch.isfinite(matched_fn(pred, target)).all()


def test_check_boxes():
    ok = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    assert boxloss.check_boxes(ok) is ok
    with pytest.raises(ValueError, match=r"gt_boxes\[1\] = \[2.0, 0.0, 1.0, 1.0\] is not"):
        boxloss.check_boxes(torch.tensor([[0.0, 0.0, 1.0, 1.0], [2.0, 0.0, 1.0, 1.0]]), "gt_boxes")
    with pytest.raises(ValueError, match="non-finite"):
        boxloss.check_boxes(torch.tensor([[0.0, float("nan"), 1.0, 1.0]]))


# ---------------------------------------------------------------- properties

coord = st.floats(min_value=-100, max_value=100, allow_nan=False)
size = st.floats(min_value=1.0, max_value=50)


@st.composite
def boxes(draw):
    x, y, w, h = draw(coord), draw(coord), draw(size), draw(size)
    return [x, y, x + w, y + h]


@settings(max_examples=200, deadline=None)
@given(boxes(), boxes())
def test_ranges(b1, b2):
    p, t = torch.tensor([b1], dtype=torch.float64), torch.tensor([b2], dtype=torch.float64)
    iou = boxloss.matched_box_iou(p, t).item()
    assert 0.0 <= iou <= 1.0
    assert -1.0 <= boxloss.matched_generalized_box_iou(p, t).item() <= 1.0
    assert -1.0 <= boxloss.matched_distance_box_iou(p, t).item() <= 1.0
    assert boxloss.matched_complete_box_iou(p, t).item() <= 1.0
    # symmetry where it holds: IoU, GIoU, DIoU
    for fn in (boxloss.matched_box_iou, boxloss.matched_generalized_box_iou, boxloss.matched_distance_box_iou):
        assert fn(p, t).item() == pytest.approx(fn(t, p).item(), abs=1e-12)


@settings(max_examples=200, deadline=None)
@given(boxes(), boxes(), coord, coord, st.floats(min_value=0.1, max_value=10))
def test_translation_and_scale_invariance(b1, b2, dx, dy, s):
    p, t = torch.tensor([b1], dtype=torch.float64), torch.tensor([b2], dtype=torch.float64)
    shift = torch.tensor([[dx, dy, dx, dy]], dtype=torch.float64)
    for fn in (boxloss.iou_loss, boxloss.giou_loss, boxloss.diou_loss, boxloss.ciou_loss):
        # exact up to eps (1e-7 against areas >= 0.01 after scaling)
        base = fn(p, t).item()
        assert fn(p + shift, t + shift).item() == pytest.approx(base, abs=1e-5)
        assert fn(p * s, t * s).item() == pytest.approx(base, abs=1e-5)


@settings(max_examples=100, deadline=None)
@given(boxes())
def test_identical_boxes_have_zero_loss(b):
    p = torch.tensor([b], dtype=torch.float64)
    for name in boxloss.LOSS_NAMES:
        options = {"image_size": (480.0, 640.0)} if name == "mpdiou" else {}  # mpdiou needs the image's size
        assert boxloss.get_loss(name, **options)(p, p.clone()).item() == pytest.approx(0.0, abs=1e-6)
