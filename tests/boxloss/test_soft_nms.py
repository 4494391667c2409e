"""Soft-NMS: equality with a naive per-box loop of the paper's Algorithm 1, hand-worked decays, edge
cases and argument errors, for the C kernel and the torch path.

The reference selects the highest current score (ties: lower index) among all remaining boxes of all
categories, decays the remaining boxes of its category with overlaps computed by the numpy value
rows of test_nms (the library's operations, bit for bit) and Python floats, and drops scores below
the threshold.
"""

import math

import numpy as np
import pytest
import torch
from test_nms import (  # noqa: F401
    DEVICES, NATIVE, THRESHOLDS, _values, adversarial_case, kernel, random_case, wide_size_case
)

import boxloss


def soft_reference(boxes, scores, method="gaussian", sigma=0.5, iou_threshold=0.3, score_threshold=0.001, idxs=None,
                   distance=False, beta=1.0):
    """Algorithm 1 of Bodla et al. as a plain loop; returns (indices, scores) in selection order."""
    b = boxes.detach().cpu()
    b = (b.double() if b.dtype == torch.float64 else b.float()).numpy()
    s = scores.detach().cpu().double().tolist()
    c = idxs.detach().cpu().tolist() if idxs is not None else [0] * len(s)
    remaining = {i for i in range(len(s)) if s[i] >= score_threshold}
    keep, kept_scores = [], []
    while remaining:
        m = min(remaining, key=lambda k: (-s[k], k))  # highest score, then lower index
        keep.append(m)
        kept_scores.append(s[m])
        remaining.remove(m)
        row = _values(m, b, beta, distance).astype(np.float64)
        for i in sorted(remaining):
            if c[i] != c[m]:
                continue
            o = float(row[i])
            o = min(o, 1.0) if o > 0 else 0.0  # max(DIoU, 0); NaN (two empty boxes) -> 0
            if method == "gaussian":
                s[i] *= math.exp(-(o * o) / sigma)
            elif o >= iou_threshold:
                s[i] *= 1 - o
            if not s[i] >= score_threshold:
                remaining.remove(i)
    return torch.tensor(keep, dtype=torch.int64), torch.tensor(kept_scores, dtype=torch.float64)


def _soft(boxes, scores, idxs=None, **kw):
    if idxs is None:
        return boxloss.soft_nms(boxes, scores, **kw)
    return boxloss.batched_soft_nms(boxes, scores, idxs, **kw)


@pytest.mark.parametrize("method", ["gaussian", "linear"])
@pytest.mark.parametrize("distance", [False, True], ids=["iou", "diou"])
@pytest.mark.parametrize("batched", [False, True], ids=["single", "batched"])
def test_equals_reference(method, distance, batched, kernel):
    """2 kernels x 8 x 60 random and adversarial cases: indices in selection order, scores to 1e-6."""
    g = torch.Generator().manual_seed(7 * (method == "linear") + 3 * distance + batched)
    for case in range(60):
        n = int(torch.randint(0, 40, (1,), generator=g)) if case % 20 else 150
        dtype = torch.float64 if case % 5 == 2 else torch.float32
        if case % 3 == 0:
            boxes, scores, _ = adversarial_case(g, case % 4, n, dtype)
        else:
            boxes, scores = random_case(g, n, dtype)
        kw = {
            "method": method,
            "sigma": (0.5, 0.1, 2.0)[case % 3],
            "iou_threshold": THRESHOLDS[case % len(THRESHOLDS)],
            "score_threshold": (0.001, 0.0, 0.3, -1.0)[case % 4],
            "distance": distance,
            "beta": (1.0, 2.0, 0.5)[case % 3],
        }
        idxs = torch.randint(0, 3, (n,), generator=g) if batched else None
        keep, new_scores = _soft(boxes, scores, idxs, **kw)
        want_keep, want_scores = soft_reference(boxes, scores, idxs=idxs, **kw)
        assert torch.equal(keep, want_keep), f"case {case}: n={n} {kw}"
        assert new_scores.dtype == torch.float32
        torch.testing.assert_close(new_scores.double(), want_scores, rtol=0, atol=1e-6, msg=f"case {case}")
        assert bool(torch.isfinite(new_scores).all())


@pytest.mark.parametrize("batched", [False, True], ids=["single", "batched"])
def test_negative_scores_equal_reference(batched, kernel):
    """Negative scores with a negative score_threshold: a decay raises such a score, so a category's
    selections are not in score order, and the batched order is the one run over all categories
    (the reference's), not a sort by score. 60 cases, both methods."""
    g = torch.Generator().manual_seed(60 + batched)
    for case in range(60):
        n = int(torch.randint(0, 50, (1,), generator=g))
        boxes, scores = random_case(g, n)
        scores = scores - 0.6
        kw = {"method": ("gaussian", "linear")[case % 2], "sigma": (0.5, 0.1)[case % 3 == 0],
              "iou_threshold": 0.3, "score_threshold": (-0.5, -0.7)[case % 5 == 0], "distance": case % 4 == 1}
        idxs = torch.randint(0, 3, (n,), generator=g) if batched else None
        keep, new_scores = _soft(boxes, scores, idxs, **kw)
        want_keep, want_scores = soft_reference(boxes, scores, idxs=idxs, **kw)
        assert torch.equal(keep, want_keep), f"case {case}: n={n} {kw}"
        torch.testing.assert_close(new_scores.double(), want_scores, rtol=0, atol=1e-6, msg=f"case {case}")


@NATIVE
@pytest.mark.parametrize("method", ["gaussian", "linear"])
def test_kernel_size_levels_equal_torch_path(method, monkeypatch):
    """One category of 2,500 boxes over a wide range of sizes (the kernel's per-size-level grids; the
    torch path is the reference, itself checked against the loop above), and negative scores, whose
    decay raises them (the kernel's heap moves a box either way)."""
    g = torch.Generator().manual_seed(50 + (method == "linear"))
    for case in range(3):
        boxes, scores = wide_size_case(g, 2500, (torch.float32, torch.float64, torch.float32)[case])
        kw = {"method": method, "distance": case == 1, "iou_threshold": 0.3}
        if case == 2:
            scores, kw["score_threshold"] = scores - 0.5, -0.4  # negative scores
        idxs = torch.randint(0, 2, (2500,), generator=g) if case == 1 else torch.zeros(2500, dtype=torch.int64)
        monkeypatch.setenv("BOXLOSS_KERNEL", "native")
        keep, s = boxloss.batched_soft_nms(boxes, scores, idxs, **kw)
        monkeypatch.setenv("BOXLOSS_KERNEL", "eager")
        want_keep, want_s = boxloss.batched_soft_nms(boxes, scores, idxs, **kw)
        assert torch.equal(keep, want_keep), (case, kw)
        torch.testing.assert_close(s, want_s, rtol=0, atol=1e-6)
        assert keep.numel() > 500


def test_hand_worked_decays(kernel):
    # [0,0,2,1] vs [0,0,1,1]: inter 1, union 2, IoU = 1/2; centres (1, .5), (.5, .5): rho^2 = 1/4,
    # c^2 = 4 + 1 = 5, DIoU = 1/2 - 1/20 = 0.45
    boxes = torch.tensor([[0.0, 0, 2, 1], [0, 0, 1, 1], [5, 5, 6, 6]], dtype=torch.float64)
    scores = torch.tensor([0.9, 0.8, 0.1], dtype=torch.float64)
    keep, s = boxloss.soft_nms(boxes, scores)  # gaussian, sigma 0.5: 0.8 exp(-0.25 / 0.5)
    assert keep.tolist() == [0, 1, 2] and s.dtype == torch.float64
    torch.testing.assert_close(s, torch.tensor([0.9, 0.8 * math.exp(-0.5), 0.1], dtype=torch.float64))
    keep, s = boxloss.soft_nms(boxes, scores, method="linear", iou_threshold=0.3)  # 0.8 (1 - 1/2) = 0.4
    torch.testing.assert_close(s, torch.tensor([0.9, 0.4, 0.1], dtype=torch.float64))
    keep, s = boxloss.soft_nms(boxes, scores, method="linear", iou_threshold=0.5)  # o >= N_t: 1/2 >= 1/2
    torch.testing.assert_close(s, torch.tensor([0.9, 0.4, 0.1], dtype=torch.float64))
    keep, s = boxloss.soft_nms(boxes, scores, method="linear", iou_threshold=0.51)  # o < N_t: no decay
    torch.testing.assert_close(s, torch.tensor([0.9, 0.8, 0.1], dtype=torch.float64))
    keep, s = boxloss.soft_nms(boxes, scores, method="linear", distance=True)  # 0.8 (1 - 0.45) = 0.44
    torch.testing.assert_close(s, torch.tensor([0.9, 0.44, 0.1], dtype=torch.float64))
    # a decayed box can fall behind a lower one: 0.8 exp(-0.25 / 0.1) = 0.066 < 0.1
    keep, s = boxloss.soft_nms(boxes, scores, sigma=0.1)
    assert keep.tolist() == [0, 2, 1]
    torch.testing.assert_close(s, torch.tensor([0.9, 0.1, 0.8 * math.exp(-2.5)], dtype=torch.float64))
    # score_threshold: 0.066 is dropped at 0.07, and 0.1 from the start at 0.2
    assert boxloss.soft_nms(boxes, scores, sigma=0.1, score_threshold=0.07)[0].tolist() == [0, 2]
    assert boxloss.soft_nms(boxes, scores, sigma=0.1, score_threshold=0.2)[0].tolist() == [0]


def test_batched_categories_never_interact(kernel):
    boxes = torch.tensor([[0.0, 0, 10, 10]] * 4)
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    keep, s = boxloss.batched_soft_nms(boxes, scores, torch.tensor([0, 1, 0, 1]), method="linear")
    # identical boxes: o = 1, f = 0 within a category; the other category is untouched
    assert keep.tolist() == [0, 1] and s.tolist() == pytest.approx([0.9, 0.8])
    # equals per-category runs merged by score
    g = torch.Generator().manual_seed(5)
    for _ in range(20):
        boxes, scores = random_case(g, 60)
        idxs = torch.randint(0, 4, (60,), generator=g) * 2**40 - 2**41
        keep, s = boxloss.batched_soft_nms(boxes, scores, idxs, distance=True)
        parts = []
        for c in idxs.unique():
            p = (idxs == c).nonzero().squeeze(1)
            k, sc = boxloss.soft_nms(boxes[p], scores[p], distance=True)
            parts += list(zip((-sc).tolist(), p[k].tolist()))
        want = sorted(parts)
        assert keep.tolist() == [i for _, i in want]
        assert (-s).tolist() == [v for v, _ in want]


@pytest.mark.parametrize("device", DEVICES)
def test_edge_cases(device, kernel):
    if device != "cpu" and kernel == "native":
        pytest.skip("the C kernel runs on CPU tensors")
    keep, s = boxloss.soft_nms(torch.zeros(0, 4, device=device), torch.zeros(0, device=device))
    assert keep.shape == (0,) and s.shape == (0,) and keep.dtype == torch.int64 and s.device.type == device
    keep, s = boxloss.soft_nms(torch.tensor([[1.0, 2, 3, 4]], device=device), torch.tensor([0.3], device=device))
    assert keep.tolist() == [0] and s.tolist() == pytest.approx([0.3])
    # all boxes identical: linear decays them to 0, below the threshold: only the first survives
    boxes = torch.tensor([[0.0, 0, 4, 4]] * 5, device=device)
    scores = torch.tensor([0.5, 0.9, 0.7, 0.9, 0.1], device=device)
    assert boxloss.soft_nms(boxes, scores, method="linear")[0].tolist() == [1]
    # all below the threshold from the start, or NaN: nothing selected
    assert boxloss.soft_nms(boxes, scores, score_threshold=0.95)[0].numel() == 0
    keep, _ = boxloss.soft_nms(boxes, torch.tensor([math.nan, 0.2, math.nan, 0.1, 0.3], device=device))
    assert keep.tolist() == [4, 1, 3]
    # zero-area boxes (points, lines, inverted, also NaN coordinates) decay nothing and are not decayed
    boxes = torch.tensor([[2.0, 2, 2, 2], [2, 2, 2, 2], [0, 0, 4, 0], [4, 4, 0, 0], [0, 0, 4, 4], [math.nan, 0, 4, 4]],
                         device=device)
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4], device=device)
    for distance in (False, True):
        keep, s = boxloss.soft_nms(boxes, scores, distance=distance)
        assert keep.tolist() == [0, 1, 2, 3, 4, 5]
        assert torch.equal(s.cpu(), scores.cpu())


def test_dtypes(kernel):
    g = torch.Generator().manual_seed(3)
    boxes, scores = random_case(g, 50)
    want = boxloss.soft_nms(boxes, scores)
    for low in (boxes.half(), boxes.bfloat16()):
        b = low.float()
        assert torch.equal(boxloss.soft_nms(low, scores)[0], boxloss.soft_nms(b, scores)[0])
    keep, s = boxloss.soft_nms(boxes.double(), scores.double())
    assert s.dtype == torch.float64 and torch.equal(keep, soft_reference(boxes.double(), scores.double())[0])
    keep, s = boxloss.soft_nms(boxes, scores.half())
    assert s.dtype == torch.float32 and torch.equal(keep, soft_reference(boxes, scores.half())[0])
    assert torch.equal(want[0], soft_reference(boxes, scores)[0])


def test_bad_arguments_raise_with_the_value():
    b, s = torch.zeros(3, 4), torch.zeros(3)
    with pytest.raises(ValueError, match=r"method must be one of \('linear', 'gaussian'\), got 'hard'"):
        boxloss.soft_nms(b, s, method="hard")
    for bad in (0.0, -1.0, math.inf, math.nan, "1", True):
        with pytest.raises(ValueError, match=f"sigma must be a finite number > 0, got {bad!r}"):
            boxloss.soft_nms(b, s, sigma=bad)
    for bad in (math.nan, None, "0.1"):
        with pytest.raises(ValueError, match=f"score_threshold must be a real number, got {bad!r}"):
            boxloss.soft_nms(b, s, score_threshold=bad)
    with pytest.raises(ValueError, match="iou_threshold must be a real number, got nan"):
        boxloss.soft_nms(b, s, method="linear", iou_threshold=math.nan)
    with pytest.raises(ValueError, match=r"scores must have shape \[N\] = \[3\].*got \(2,\)"):
        boxloss.batched_soft_nms(b, torch.zeros(2), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(TypeError, match="idxs must be an integer tensor.*torch.float32"):
        boxloss.batched_soft_nms(b, s, torch.zeros(3))
    with pytest.raises(ValueError, match="beta must be a number > 0"):
        boxloss.soft_nms(b, s, distance=True, beta=0.0)
