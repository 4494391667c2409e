"""DIoU-NMS and weighted NMS: exact equality with a plain greedy reference, torchvision parity,
hand-worked cases, edge cases and argument errors, for both implementations (the C kernel of
``boxloss._nms_native``, the CPU default, and the torch-op path that ``BOXLOSS_KERNEL=eager``
selects).

The reference is the sequential greedy definition written independently of boxloss: Python visits
the boxes by (-score, index) and computes each kept box's row of values with numpy in the boxes'
compute dtype, with the same operations in the same order as the library (so the values are equal
bit for bit), and compares them with the threshold as exact real numbers.
"""

import math
import re

import numpy as np
import pytest
import torch
import torchvision.ops as tv
from hypothesis import given, settings
from hypothesis import strategies as st

import boxloss
import boxloss.nms as nms_mod
from boxloss._kernels import BACKENDS

CUDA = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")]
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]
NATIVE = pytest.mark.skipif(nms_mod._nms_native is None, reason="boxloss._nms_native not built")
KERNELS = [pytest.param("native", marks=NATIVE), "eager"]


@pytest.fixture(params=KERNELS)
def kernel(request, monkeypatch):
    """Runs a test with the C kernel and with the torch path (``BOXLOSS_KERNEL``)."""
    monkeypatch.setenv("BOXLOSS_KERNEL", request.param)
    return request.param


# ---------------------------------------------------------------- reference


def _values(i, b, beta, distance):
    """Suppression value of box ``b[i]`` against every box of ``b`` (numpy, ``b``'s dtype)."""
    x1, y1, x2, y2 = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
    with np.errstate(all="ignore"):  # overflow and 0 / 0 give inf and NaN, as in torch
        area = np.maximum(x2 - x1, 0) * np.maximum(y2 - y1, 0)
        iw = np.maximum(np.minimum(x2[i], x2) - np.maximum(x1[i], x1), 0)
        ih = np.maximum(np.minimum(y2[i], y2) - np.maximum(y1[i], y1), 0)
        inter = iw * ih
        iou = inter / (area[i] + area - inter)  # torchvision's IoU; NaN (0 / 0) never suppresses
        if not distance or beta == math.inf:
            return iou
        cw = np.maximum(x2[i], x2) - np.minimum(x1[i], x1)
        ch = np.maximum(y2[i], y2) - np.minimum(y1[i], y1)
        c2 = cw * cw + ch * ch
        dx = (x1 + x2) - (x1[i] + x2[i])
        dy = (y1 + y2) - (y1[i] + y2[i])
        r = (dx * dx + dy * dy) * b.dtype.type(0.25) / c2
        if beta == 3.0:
            r = r * r * r  # torch's pow special case (two roundings)
        elif beta not in (1.0, 0.5, 2.0):  # (1: r; 0.5, 2: sqrt, square, correctly rounded everywhere)
            r = (r.astype(np.float64) ** beta).astype(b.dtype)  # libm pow of the float64 base, then rounded
        elif beta != 1.0:
            r = r**beta
        return iou - r


def greedy_reference(boxes, scores, iou_threshold, idxs=None, beta=1.0, distance=True):
    """The sequential greedy definition: ranks by (-score, index); a kept box suppresses every later
    box of its category whose value exceeds the threshold (compared as exact reals)."""
    b = boxes.detach().cpu()
    b = (b.double() if b.dtype == torch.float64 else b.float()).numpy()
    s = scores.detach().cpu().double().tolist()
    c = idxs.detach().cpu().tolist() if idxs is not None else [0] * len(s)
    order = sorted(range(len(s)), key=lambda k: (-s[k], k))
    suppressed = [False] * len(s)
    keep = []
    for i in order:
        if suppressed[i]:
            continue
        keep.append(i)
        row = _values(i, b, beta, distance).astype(np.float64)  # exact: widening is exact
        for j in np.nonzero(row > iou_threshold)[0].tolist():
            if c[j] == c[i]:
                suppressed[j] = True
    return torch.tensor(keep, dtype=torch.int64)


# ---------------------------------------------------------------- random cases


def random_case(g: torch.Generator, n: int, dtype=torch.float32):
    """Boxes on a grid of 1/4 (so many IoU and DIoU values are exact dyadic numbers that can sit
    exactly at a threshold), in clusters, with tied scores and duplicates, or on a random scale."""
    kind = int(torch.randint(0, 4, (1,), generator=g))
    if kind == 0:  # small integer grid: many exact ties of geometry
        xy = torch.randint(0, 6, (n, 2), generator=g).float()
        wh = torch.randint(1, 5, (n, 2), generator=g).float()
    elif kind == 1:  # quarter grid, clustered around a few centres
        k = max(1, n // 8)
        centre = torch.randint(0, 160, (k, 2), generator=g).float() / 4
        which = torch.randint(0, k, (n,), generator=g)
        wh = torch.randint(4, 40, (n, 2), generator=g).float() / 4
        xy = centre[which] - wh / 2 + torch.randint(-4, 5, (n, 2), generator=g).float() / 4
    elif kind == 2:  # nested boxes sharing a centre (rho = 0: DIoU = IoU exactly, e.g. 1/4, 1/2)
        centre = torch.randint(0, 20, (n, 2), generator=g).float() * 2
        half = torch.randint(1, 5, (n, 2), generator=g).float()
        xy, wh = centre - half, 2 * half
    else:  # continuous
        xy = torch.rand(n, 2, generator=g) * 50
        wh = torch.rand(n, 2, generator=g) * 20 + 0.5
    boxes = torch.cat([xy, xy + wh], 1)
    if n > 1 and bool(torch.rand(1, generator=g) < 0.3):  # exact duplicates
        dup = torch.randint(0, n, (n // 3,), generator=g)
        boxes[torch.randint(0, n, (n // 3,), generator=g)] = boxes[dup]
    if bool(torch.rand(1, generator=g) < 0.4):
        scores = torch.randint(0, 4, (n,), generator=g).float() / 4  # many ties
    else:
        scores = torch.rand(n, generator=g)
    return boxes.to(dtype), scores


THRESHOLDS = (0.0, 0.25, 0.3, 1 / 3, 0.5, 0.6, 0.7, 0.75, 0.9)
PATHS = {
    # the C kernel, then every code path of the torch ops on small inputs: one stage, staged greedy,
    # tile chunks, resolution
    "native": None,
    "torch default": {},
    "torch one stage": {"_DENSE_MEAN_WINDOW": math.inf},
    "torch stages, chunks": {"_DENSE_MEAN_WINDOW": -1.0, "_STAGE_MIN": 8, "_CHUNK_SLOTS": 64, "_SEQUENTIAL_EDGES": 0},
    "torch stages, python finish": {"_DENSE_MEAN_WINDOW": -1.0, "_STAGE_MIN": 4, "_SEQUENTIAL_EDGES": 10**9},
    # the formulation of GPUs (suppression bits read back once), forced on CPU tensors; small blocks
    # and host reads exercise its multi-block, multi-read loop; its host loop in C, or in Python
    # without the extension
    "torch device": {"_masked_path": lambda device: True},
    "torch device, small blocks": {"_masked_path": lambda device: True, "_DEVICE_BLOCK_VALUES": 50,
                                   "_HOST_READ_BYTES": 8},
    "torch device, Python host loop": {"_masked_path": lambda device: True, "_nms_native": None,
                                       "_DEVICE_BLOCK_VALUES": 200, "_HOST_READ_BYTES": 64},
}


def _select_path(path, monkeypatch):
    if PATHS[path] is None:
        if nms_mod._nms_native is None:
            pytest.skip("boxloss._nms_native not built")
        monkeypatch.setenv("BOXLOSS_KERNEL", "native")
        return
    monkeypatch.setenv("BOXLOSS_KERNEL", "eager")
    for name, value in PATHS[path].items():
        monkeypatch.setattr(nms_mod, name, value)


def _nms(boxes, scores, t, idxs=None, **kw):
    if idxs is None:
        return boxloss.diou_nms(boxes, scores, t, **kw)
    return boxloss.batched_diou_nms(boxes, scores, idxs, t, **kw)


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("batched", [False, True], ids=["single", "batched"])
def test_equals_greedy_reference_random(path, batched, monkeypatch):
    """2 x 300 random cases for the C kernel and 7 x 2 x 130 = 1,820 for the torch paths (CPU and
    device formulations), exactly equal to the reference (indices and order)."""
    _select_path(path, monkeypatch)
    g = torch.Generator().manual_seed(2 * list(PATHS).index(path) + batched)
    for case in range(300 if path == "native" else 130):
        n = int(torch.randint(0, 70, (1,), generator=g)) if case % 20 or "stages" in path else 300
        dtype = torch.float64 if case % 7 == 3 else torch.float32
        boxes, scores = random_case(g, n, dtype)
        t = THRESHOLDS[case % len(THRESHOLDS)]
        beta = (1.0, 1.0, 1.0, 0.5, 2.0, math.inf)[case % 6]
        distance = case % 5 != 4
        idxs = torch.randint(0, 3, (n,), generator=g) if batched else None
        got = _nms(boxes, scores, t, idxs, beta=beta, distance=distance)
        want = greedy_reference(boxes, scores, t, idxs, beta, distance)
        assert got.dtype == torch.int64
        assert torch.equal(got, want), f"case {case}: n={n} t={t} beta={beta} distance={distance} {dtype}"


def adversarial_case(g: torch.Generator, kind: int, n: int, dtype=torch.float32):
    """Boxes, scores and a threshold built to break shortcuts: chains where each box suppresses only
    the next, thresholds equal to a value that occurs in the input, zero-area and non-finite boxes,
    tied and signed-zero scores. Returns (boxes, scores, t)."""
    if kind == 0:  # chain on a line, random direction and spacing: IoU to the next above t, to the next but one below
        step = float(torch.randint(1, 4, (1,), generator=g)) / 8  # 1/8, 1/4, 3/8
        x = torch.arange(n, dtype=torch.float64) * step * (1 if bool(torch.rand(1, generator=g) < 0.5) else -1)
        boxes = torch.stack([x, torch.zeros(n, dtype=torch.float64), x + 1, torch.ones(n, dtype=torch.float64)], 1)
        scores = 1 - torch.arange(n, dtype=torch.float32) / max(n, 1)
        if bool(torch.rand(1, generator=g) < 0.3):
            scores = scores[torch.randperm(n, generator=g)]
        t = (1 - 1.5 * step) / (1 + 1.5 * step)  # between the IoU with the next and the next but one
    else:
        boxes, scores = random_case(g, n, torch.float64)
        t = 0.5
    if kind == 1 and n >= 2:  # t equal to a value of two input boxes: "> t" decides on bit-equal values
        i, j = torch.randint(0, n, (2,), generator=g).tolist()
        b = boxes.to(dtype)
        v = nms_mod._suppression_value(b[i], b[j], 1.0, True).item()
        t = v if math.isfinite(v) and -1 <= v < 1 else 0.5
    if kind == 2 and n > 0:  # degenerate boxes: zero width / height, points, inverted, inf and NaN coordinates
        k = max(1, n // 3)
        which = torch.randint(0, n, (k,), generator=g)
        bad = boxes[which].clone()
        col = torch.randint(0, 6, (k,), generator=g)
        bad[col == 0, 2] = bad[col == 0, 0]
        bad[col == 1, 3] = bad[col == 1, 1]
        bad[col == 2, 2:] = bad[col == 2, :2]
        bad[col == 3] = bad[col == 3][:, [2, 3, 0, 1]]
        bad[col == 4, 2] = math.inf
        bad[col == 5, 0] = math.nan
        boxes[which] = bad
    if kind == 3:  # ties: few distinct scores, +0.0 and -0.0 among them
        scores = torch.tensor([0.0, -0.0, 0.5, 1.0])[torch.randint(0, 4, (n,), generator=g)]
    return boxes.to(dtype), scores, t


@pytest.mark.parametrize("path", ["native", "torch default", "torch stages, chunks", "torch device, small blocks"])
def test_equals_greedy_reference_adversarial(path, monkeypatch):
    """500 adversarial cases for the C kernel, 3 x 400 for the torch paths (chains, thresholds equal to
    input values, degenerate boxes, ties), 1 and many classes, float32 and float64, positive and
    negative thresholds."""
    _select_path(path, monkeypatch)
    g = torch.Generator().manual_seed(100 + list(PATHS).index(path))
    for case in range(500 if path == "native" else 400):
        kind = case % 4
        n = int(torch.randint(0, 40, (1,), generator=g)) if case % 50 else 250
        dtype = torch.float64 if case % 3 == 1 else torch.float32
        boxes, scores, t = adversarial_case(g, kind, n, dtype)
        if case % 11 == 5:
            t = -t if t > 0 else t  # negative: disjoint boxes suppress
        n_cls = (1, 1, 3, n + 1)[case % 4]
        idxs = torch.randint(0, n_cls, (n,), generator=g) * (2**40 if case % 8 == 7 else 1) if case % 2 else None
        beta = (1.0, 3.0, 1.7, math.inf)[(case // 4) % 4]
        distance = case % 9 != 8
        got = _nms(boxes, scores, t, idxs, beta=beta, distance=distance)
        want = greedy_reference(boxes, scores, t, idxs, beta, distance)
        if path != "native" and beta == 1.7:  # torch's vectorised pow (SLEEF) may differ in the last bit
            continue
        assert torch.equal(got, want), f"case {case}: kind={kind} n={n} t={t} beta={beta} distance={distance} {dtype}"


@NATIVE
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernel_values_equal_torch_values_bit_for_bit(dtype, monkeypatch):
    """For random pairs, the C kernel decides "value > t" at t = the torch path's value (kept) and at
    the next double below it (suppressed): its value is that value, bit for bit. Exceptions, checked
    against the numpy reference instead: beta = 0.5 and beta = 1.7, where torch's CPU sqrt (MKL)
    and pow (SLEEF) are within 1 ulp but not correctly rounded, unlike libm's."""
    monkeypatch.setenv("BOXLOSS_KERNEL", "native")
    g = torch.Generator().manual_seed(21)
    scores = torch.tensor([1.0, 0.5])
    checked = 0
    for case in range(300):
        boxes, _ = random_case(g, 2, dtype)
        b = boxes.numpy()
        for beta, distance in ((1.0, True), (1.0, False), (2.0, True), (3.0, True), (0.5, True), (1.7, True)):
            v = _values(0, b, beta, distance)[1].item()
            if beta not in (0.5, 1.7):
                assert v == nms_mod._suppression_value(boxes[0], boxes[1], beta, distance).item()
            if not (0 <= v < 1):
                continue
            below = math.nextafter(v, -math.inf)
            assert boxloss.diou_nms(boxes, scores, v, beta=beta, distance=distance).tolist() == [0, 1], (case, beta)
            assert boxloss.diou_nms(boxes, scores, below, beta=beta, distance=distance).tolist() == [0], (case, beta)
            checked += 1
    assert checked > 500


@NATIVE
def test_kernel_equals_torch_path_on_large_inputs(monkeypatch):
    """A few large detector-like inputs (grid with many cells, stages on the torch side)."""
    g = torch.Generator().manual_seed(8)
    for n, n_cls in ((2000, 1), (3000, 7), (1500, 400)):
        n_obj = n // 20
        centre = torch.rand(n_obj, 2, generator=g) * 1000
        size = torch.exp(torch.empty(n_obj, 2).uniform_(2.5, 6, generator=g))
        obj = torch.cat([centre - size / 2, centre + size / 2], 1).repeat_interleave(20, 0)
        boxes = obj + 0.1 * size.repeat_interleave(20, 0).repeat(1, 2) * torch.randn(n, 4, generator=g)
        scores = torch.rand(n, generator=g)
        idxs = torch.randint(0, n_cls, (n,), generator=g)
        for t, beta in ((0.5, 1.0), (0.7, 2.0), (0.3, math.inf)):
            monkeypatch.setenv("BOXLOSS_KERNEL", "native")
            got = boxloss.batched_diou_nms(boxes, scores, idxs, t, beta=beta)
            monkeypatch.setenv("BOXLOSS_KERNEL", "eager")
            assert torch.equal(got, boxloss.batched_diou_nms(boxes, scores, idxs, t, beta=beta))
        assert torch.equal(got, greedy_reference(boxes, scores, 0.3, idxs, math.inf))


def wide_size_case(g: torch.Generator, n: int, dtype=torch.float32):
    """Detector-like clusters whose sizes span 2^2 to 2^9 (several size levels of the C kernel's grids,
    which it builds from 2,048 valid boxes of one category on), some boxes tiny or huge."""
    n_obj = max(1, -(-n // 20))
    centre = torch.rand(n_obj, 2, generator=g) * 1000
    size = torch.exp(torch.empty(n_obj, 2).uniform_(math.log(4.0), math.log(512.0), generator=g))
    obj = torch.cat([centre - size / 2, centre + size / 2], 1).repeat_interleave(20, 0)[:n]
    jitter = 0.1 * size.repeat_interleave(20, 0)[:n].repeat(1, 2) * torch.randn(n, 4, generator=g)
    boxes = obj + jitter
    boxes = torch.cat([torch.minimum(boxes[:, :2], boxes[:, 2:]), torch.maximum(boxes[:, :2], boxes[:, 2:])], 1)
    boxes[: n // 50, 2:] = boxes[: n // 50, :2] + 2.0**-6  # tiny
    boxes[n // 50 : n // 40, 2:] = boxes[n // 50 : n // 40, :2] + 2000  # huge
    boxes = boxes[torch.randperm(n, generator=g)]
    scores = torch.rand(n, generator=g)
    return boxes.to(dtype), scores


@NATIVE
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernel_size_levels_equal_torch_path(dtype, monkeypatch):
    """One category of 2,500-5,000 boxes over a wide range of sizes (the kernel's per-size-level grids),
    greedy and weighted, at thresholds from 0 (pruning by plain intersection) to 0.9."""
    g = torch.Generator().manual_seed(40 + (dtype == torch.float64))
    for n, n_cls in ((2500, 1), (5000, 2)):
        boxes, scores = wide_size_case(g, n, dtype)
        idxs = torch.randint(0, n_cls, (n,), generator=g)
        for t, beta, distance in ((0.5, 1.0, True), (0.0, 1.0, True), (0.1, 2.0, True), (0.7, 1.0, False),
                                  (0.9, math.inf, True)):
            out = {}
            for k in ("native", "eager"):
                monkeypatch.setenv("BOXLOSS_KERNEL", k)
                out[k] = (boxloss.batched_diou_nms(boxes, scores, idxs, t, beta=beta, distance=distance),
                          boxloss.batched_weighted_nms(boxes, scores, idxs, t, beta=beta, distance=distance))
            assert torch.equal(out["native"][0], out["eager"][0]), (n, t, beta, distance)
            assert torch.equal(out["native"][1][0], out["eager"][0])
            assert torch.equal(out["eager"][1][0], out["eager"][0])
            torch.testing.assert_close(out["native"][1][1], out["eager"][1][1], rtol=1e-6, atol=1e-4)
    assert torch.equal(out["native"][0], greedy_reference(boxes, scores, t, idxs, beta, distance))


@NATIVE
def test_kernel_ranks_scores_as_torch_sort(monkeypatch):
    """NaN scores rank first, -0.0 == +0.0, ties by index, in every score dtype, as the torch path."""
    g = torch.Generator().manual_seed(6)
    for case in range(60):
        boxes, scores = random_case(g, 40)
        scores = torch.tensor([math.nan, -0.0, 0.0, 0.5, -math.inf, math.inf])[torch.randint(0, 6, (40,), generator=g)]
        for s in (scores, scores.double(), scores.half(), scores.nan_to_num(0, 9, -9).to(torch.int32),
                  scores > 0):
            monkeypatch.setenv("BOXLOSS_KERNEL", "native")
            got = boxloss.diou_nms(boxes, s, 0.5)
            monkeypatch.setenv("BOXLOSS_KERNEL", "eager")
            assert torch.equal(got, boxloss.diou_nms(boxes, s, 0.5)), (case, s.dtype)


def test_exactly_at_threshold(kernel):
    # [0,0,2,1] vs [0,0,1,1]: inter 1, union 2, IoU = 1/2 exactly; centres (1, .5), (.5, .5):
    # rho^2 = 1/4, c^2 = 2^2 + 1^2 = 5, DIoU = 1/2 - 1/20 = 0.45
    boxes = torch.tensor([[0.0, 0, 2, 1], [0, 0, 1, 1]])
    scores = torch.tensor([0.9, 0.8])
    assert boxloss.diou_nms(boxes, scores, 0.5, distance=False).tolist() == [0, 1]  # 1/2 is not > 1/2
    assert boxloss.diou_nms(boxes, scores, 0.4999, distance=False).tolist() == [0]
    # in float32 the DIoU is 0.5 - 0.05 -> 0.449999988 < 0.45 (the double): kept
    assert boxloss.diou_nms(boxes, scores, 0.45).tolist() == [0, 1]
    assert boxloss.diou_nms(boxes, scores, 0.449).tolist() == [0]
    # nested, same centre: [0,0,4,4] and [1,1,3,3], IoU = 4/16, rho = 0: DIoU = 1/4 exactly
    boxes = torch.tensor([[0.0, 0, 4, 4], [1, 1, 3, 3]])
    assert boxloss.diou_nms(boxes, scores, 0.25).tolist() == [0, 1]
    assert boxloss.diou_nms(boxes, scores, 0.2499999).tolist() == [0]


def test_threshold_compared_as_a_real_number(kernel):
    # IoU = 1/3 is computed in float32 as 0.3333333433 > 1/3 (the double 0.333...): suppressed, as
    # torchvision's CPU kernel does; comparing in float32 (float32(1/3) == value) would keep it
    boxes = torch.tensor([[0.0, 0, 2, 1], [1, 0, 3, 1]])  # inter 1, union 3
    scores = torch.tensor([0.9, 0.8])
    assert boxloss.diou_nms(boxes, scores, 1 / 3, distance=False).tolist() == [0]
    assert tv.nms(boxes, scores, 1 / 3).tolist() == [0]


# ---------------------------------------------------------------- torchvision parity


@pytest.mark.parametrize("n", [0, 1, 2, 10, 100, 1000, 3000])
def test_plain_mode_equals_torchvision(n, kernel):
    g = torch.Generator().manual_seed(n)
    for t in (0.0, 0.3, 0.5, 0.7, 0.9):
        xy = torch.rand(n, 2, generator=g) * 300
        wh = torch.rand(n, 2, generator=g) * torch.tensor([80.0, 60.0]) + 1
        jitter = torch.randn(n, 4, generator=g)
        boxes = torch.cat([xy, xy + wh], 1)
        boxes = torch.cat([boxes[: n // 2], boxes[: n - n // 2] + jitter[: n - n // 2]])  # clusters
        boxes = torch.cat([torch.minimum(boxes[:, :2], boxes[:, 2:]), torch.maximum(boxes[:, :2], boxes[:, 2:])], 1)
        scores = torch.randperm(n, generator=g).float() / max(n, 1)  # distinct: torchvision's order is defined
        idxs = torch.randint(0, 5, (n,), generator=g)
        assert torch.equal(boxloss.diou_nms(boxes, scores, t, distance=False), tv.nms(boxes, scores, t))
        assert torch.equal(
            boxloss.batched_diou_nms(boxes, scores, idxs, t, distance=False), tv.batched_nms(boxes, scores, idxs, t)
        )


def test_dense_detector_like_inputs_equal_reference_and_torchvision(kernel):
    # large clusters, 4,000 boxes: exercises the staged greedy by default
    g = torch.Generator().manual_seed(7)
    n_obj, per = 40, 100
    centre = torch.rand(n_obj, 2, generator=g) * 800
    size = torch.exp(torch.empty(n_obj, 2).uniform_(3, 5.5, generator=g))
    obj = torch.cat([centre - size / 2, centre + size / 2], 1).repeat_interleave(per, 0)
    boxes = obj + 0.1 * size.repeat_interleave(per, 0).repeat(1, 2) * torch.randn(n_obj * per, 4, generator=g)
    boxes = torch.cat([torch.minimum(boxes[:, :2], boxes[:, 2:]), torch.maximum(boxes[:, :2], boxes[:, 2:])], 1)
    scores = torch.randperm(n_obj * per, generator=g).float()
    for t in (0.5, 0.7):
        assert torch.equal(boxloss.diou_nms(boxes, scores, t, distance=False), tv.nms(boxes, scores, t))
        assert torch.equal(boxloss.diou_nms(boxes, scores, t), greedy_reference(boxes, scores, t))
    idxs = torch.randint(0, 3, (n_obj * per,), generator=g)
    assert torch.equal(boxloss.batched_diou_nms(boxes, scores, idxs, 0.5), greedy_reference(boxes, scores, 0.5, idxs))


# ---------------------------------------------------------------- semantics


def test_hand_worked_adjacent_objects(kernel):
    # two wide boxes side by side, [0,0,10,1] and [3,0,13,1]: inter 7, union 13, IoU = 7/13 = 0.538;
    # centres 5 and 8: rho^2 = 9; enclosing [0,0,13,1]: c^2 = 169 + 1 = 170; DIoU = 0.538 - 0.053 = 0.485
    boxes = torch.tensor([[0.0, 0, 10, 1], [3, 0, 13, 1]])
    scores = torch.tensor([0.8, 0.9])
    assert boxloss.diou_nms(boxes, scores, 0.5).tolist() == [1, 0]  # DIoU <= 0.5: both kept
    assert boxloss.diou_nms(boxes, scores, 0.5, distance=False).tolist() == [1]  # IoU > 0.5: one removed
    assert tv.nms(boxes, scores, 0.5).tolist() == [1]
    assert boxloss.diou_nms(boxes, scores, 0.48).tolist() == [1]  # 0.485 > 0.48
    # beta = 2: penalty (9/170)^2 = 0.0028, DIoU = 0.536 > 0.5: removed again
    assert boxloss.diou_nms(boxes, scores, 0.5, beta=2.0).tolist() == [1]


def test_large_beta_is_plain_nms(kernel):
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        boxes, scores = random_case(g, 60)
        plain = boxloss.diou_nms(boxes, scores, 0.5, distance=False)
        assert torch.equal(boxloss.diou_nms(boxes, scores, 0.5, beta=1e6), plain)
        assert torch.equal(boxloss.diou_nms(boxes, scores, 0.5, beta=math.inf), plain)


def test_batched_never_suppresses_across_categories(kernel):
    boxes = torch.tensor([[0.0, 0, 10, 10]] * 4 + [[1, 1, 11, 11]] * 2)
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    idxs = torch.tensor([0, 1, 2, 0, 1, 2])
    # identical boxes in different categories all survive; within a category the best one wins
    assert boxloss.batched_diou_nms(boxes, scores, idxs, 0.5).tolist() == [0, 1, 2]
    # equals per-category NMS merged by score, on random data with far-apart category ids
    g = torch.Generator().manual_seed(5)
    for _ in range(30):
        boxes, scores = random_case(g, 80)
        scores = scores + torch.arange(80) * 1e-4  # distinct, to merge by score
        idxs = torch.randint(0, 4, (80,), generator=g) * 2**40 - 2**41
        got = boxloss.batched_diou_nms(boxes, scores, idxs, 0.5)
        per = [m.nonzero().squeeze(1) for m in (idxs[:, None] == idxs.unique()[None]).t()]
        want = torch.cat([p[boxloss.diou_nms(boxes[p], scores[p], 0.5)] for p in per])
        assert torch.equal(got, want[scores[want].argsort(descending=True)])


@settings(max_examples=40, deadline=None)
@given(
    st.integers(0, 2**16),
    st.integers(-3, 3),
    st.sampled_from([-8.0, 0.0, 0.25, 100.0]),
    st.sampled_from([0.3, 0.5, 0.7]),
)
def test_invariant_to_exact_rescaling_and_translation(seed, log_scale, shift, t):
    # scaling by a power of two and shifting by a small dyadic number are exact in float64 here,
    # and DIoU is scale- and translation-invariant: the kept indices must not change
    g = torch.Generator().manual_seed(seed)
    boxes, scores = random_case(g, 40, torch.float64)
    idxs = torch.randint(0, 2, (40,), generator=g)
    moved = boxes * 2.0**log_scale + shift
    assert torch.equal(
        boxloss.batched_diou_nms(moved, scores, idxs, t), boxloss.batched_diou_nms(boxes, scores, idxs, t)
    )


# ---------------------------------------------------------------- edge cases


@pytest.mark.parametrize("device", DEVICES)
def test_empty_one_box_and_all_equal_scores(device, kernel):
    if device != "cpu" and kernel == "native":
        pytest.skip("the C kernel runs on CPU tensors")
    empty, no_scores = torch.zeros(0, 4, device=device), torch.zeros(0, device=device)
    for out in (
        boxloss.diou_nms(empty, no_scores, 0.5),
        boxloss.batched_diou_nms(empty, no_scores, torch.zeros(0, dtype=torch.int64, device=device), 0.5),
    ):
        assert out.shape == (0,) and out.dtype == torch.int64 and out.device.type == device
    one = torch.tensor([[1.0, 2, 3, 4]], device=device)
    assert boxloss.diou_nms(one, torch.tensor([0.3], device=device), 0.5).tolist() == [0]
    # all-equal scores: visited by index; box 1 overlaps box 0 (IoU 0.81) and is dropped
    boxes = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 9], [20, 20, 30, 30], [20, 20, 30, 29]], device=device)
    scores = torch.ones(4, device=device)
    assert boxloss.diou_nms(boxes, scores, 0.5).tolist() == [0, 2]


@pytest.mark.parametrize("device", DEVICES)
def test_random_cases_on_device(device, kernel):
    if device != "cpu" and kernel == "native":
        pytest.skip("the C kernel runs on CPU tensors")
    g = torch.Generator().manual_seed(11)
    for case in range(40):
        boxes, scores = random_case(g, 50)
        idxs = torch.randint(0, 3, (50,), generator=g)
        t = THRESHOLDS[case % len(THRESHOLDS)]
        got = boxloss.batched_diou_nms(boxes.to(device), scores.to(device), idxs.to(device), t)
        assert got.device.type == device
        assert torch.equal(got.cpu(), greedy_reference(boxes, scores, t, idxs))


@pytest.mark.parametrize(
    "formulation, small_blocks",
    [("masked", False), ("masked", True), ("sparse", False), ("sparse", True)],
    ids=["masked", "masked, small blocks", "sparse", "sparse, stages and chunks"],
)
@pytest.mark.parametrize("device", DEVICES)
def test_large_inputs_on_device(device, formulation, small_blocks, monkeypatch):
    """3,000-5,000 detector-like boxes (a quarter on CPU), 1 and 80 classes, positive and negative
    thresholds, greedy and weighted, equal to the reference: the bit-matrix formulation GPUs take
    (one host read; with small blocks, many blocks and reads) and the sparse one (stages and tile
    chunks when forced small), on each device."""
    monkeypatch.setenv("BOXLOSS_KERNEL", "eager")
    monkeypatch.setattr(nms_mod, "_masked_path", lambda d: formulation == "masked")
    if small_blocks:
        for name, value in {"_DEVICE_BLOCK_VALUES": 1 << 16, "_HOST_READ_BYTES": 1 << 14, "_STAGE_MIN": 256,
                            "_CHUNK_SLOTS": 4095, "_DENSE_MEAN_WINDOW": 4.0}.items():
            monkeypatch.setattr(nms_mod, name, value)
    g = torch.Generator().manual_seed(70)
    for n, n_cls, t in ((5000, 80, 0.5), (3000, 1, 0.6), (3000, 3, -0.1)):
        if device == "cpu":
            n //= 4  # keeps the default suite fast; small blocks still make stages, chunks and reads
        boxes, scores = wide_size_case(g, n)
        idxs = torch.randint(0, n_cls, (n,), generator=g)
        want = greedy_reference(boxes, scores, t, idxs)
        got = boxloss.batched_diou_nms(boxes.to(device), scores.to(device), idxs.to(device), t)
        assert got.device.type == device and torch.equal(got.cpu(), want), (n, n_cls, t)
        keep, merged = boxloss.batched_weighted_nms(boxes.to(device), scores.to(device), idxs.to(device), t)
        assert torch.equal(keep.cpu(), want) and merged.device.type == device


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.int32])
def test_low_precision_and_integer_boxes_computed_in_float32(dtype, kernel):
    g = torch.Generator().manual_seed(2)
    boxes, scores = random_case(g, 200)
    low = (boxes * 4).round().to(dtype)  # representable in every dtype here
    want = boxloss.diou_nms(low.float(), scores, 0.5)
    assert torch.equal(boxloss.diou_nms(low, scores, 0.5), want)
    assert torch.equal(want, greedy_reference(low.float(), scores, 0.5))
    assert torch.equal(boxloss.diou_nms(low.float(), scores.to(torch.float16), 0.5),
                       greedy_reference(low.float(), scores.to(torch.float16), 0.5))


def test_degenerate_boxes_neither_suppress_nor_get_suppressed(kernel):
    boxes = torch.tensor(
        [
            [0.0, 0, 10, 10],
            [0, 0, 10, 0],  # zero height inside box 0
            [5, 5, 5, 5],  # a point
            [5, 5, 5, 5],  # the same point (IoU 0 / 0)
            [9, 9, 1, 1],  # inverted: zero area
            [0, 0, 10, 10],  # duplicate of box 0: suppressed
        ]
    )
    scores = torch.tensor([0.5, 0.9, 0.8, 0.7, 0.6, 0.4])
    assert boxloss.diou_nms(boxes, scores, 0.5).tolist() == [1, 2, 3, 4, 0]
    assert torch.equal(boxloss.diou_nms(boxes, scores, 0.5), greedy_reference(boxes, scores, 0.5))


def test_threshold_extremes(kernel):
    g = torch.Generator().manual_seed(4)
    boxes, scores = random_case(g, 100)
    idxs = torch.randint(0, 3, (100,), generator=g)
    order = sorted(range(100), key=lambda k: (-scores[k].item(), k))
    assert boxloss.diou_nms(boxes, scores, 1.0).tolist() == order  # IoU <= 1 is never > 1
    # negative thresholds: disjoint boxes suppress too (dense path)
    for t in (-0.05, -0.3, -1.5):
        for distance in (True, False):
            assert torch.equal(
                boxloss.batched_diou_nms(boxes, scores, idxs, t, distance=distance),
                greedy_reference(boxes, scores, t, idxs, distance=distance),
            )


def test_extreme_scales_and_tiny_thresholds_equal_reference(kernel):
    # tiny areas (subnormal products) and tiny thresholds prune by plain intersection; float64
    # coordinates beyond 2^900 (finite areas) take the dense loop; huge float32 areas overflow
    g = torch.Generator().manual_seed(12)
    aniso = torch.tensor([2.0**950, 2.0**-950, 2.0**950, 2.0**-950], dtype=torch.float64)
    for _ in range(8):
        boxes, scores = random_case(g, 60)
        idxs = torch.randint(0, 2, (60,), generator=g)
        for scaled, t in (
            (boxes * 2.0**-70, 0.5),
            (boxes, 1e-9),
            (boxes * 2.0**50, 0.5),
            (boxes * 2.0**62, 0.5),
            (boxes.double() * aniso, 0.5),
        ):
            got = boxloss.batched_diou_nms(scaled, scores, idxs, t)
            assert torch.equal(got, greedy_reference(scaled, scores, t, idxs))


def test_non_contiguous_inputs(kernel):
    g = torch.Generator().manual_seed(9)
    boxes, scores = random_case(g, 64)
    wide = torch.cat([boxes, boxes], 1)[:, :4]  # non-contiguous view
    assert not wide.is_contiguous()
    assert torch.equal(boxloss.diou_nms(wide, scores[::1], 0.5), boxloss.diou_nms(boxes.contiguous(), scores, 0.5))


# ---------------------------------------------------------------- weighted NMS


def weighted_reference(boxes, scores, iou_threshold, idxs=None, beta=1.0, distance=True):
    """Greedy push loop: a kept box takes every not yet suppressed box ranked after it, of its category,
    whose value exceeds the threshold; its merged box is the score-weighted mean of them and itself."""
    b = boxes.detach().cpu()
    b = (b.double() if b.dtype == torch.float64 else b.float()).numpy()
    bd = b.astype(np.float64)
    s = scores.detach().cpu().double().tolist()
    c = idxs.detach().cpu().tolist() if idxs is not None else [0] * len(s)
    order = sorted(range(len(s)), key=lambda k: (-s[k], k))
    suppressed = [False] * len(s)
    keep, merged = [], []
    for r, i in enumerate(order):
        if suppressed[i]:
            continue
        row = _values(i, b, beta, distance).astype(np.float64)
        cluster = [i] + [j for j in order[r + 1 :] if not suppressed[j] and c[j] == c[i] and row[j] > iou_threshold]
        for j in cluster:
            suppressed[j] = True
        total = sum(s[j] for j in cluster)
        mean = bd[i] if len(cluster) == 1 or total == 0 else sum(s[j] * bd[j] for j in cluster) / total
        keep.append(i)
        merged.append(mean)
    return torch.tensor(keep, dtype=torch.int64), torch.from_numpy(np.array(merged).reshape(-1, 4).astype(b.dtype))


@pytest.mark.parametrize("batched", [False, True], ids=["single", "batched"])
def test_weighted_equals_reference(batched, kernel):
    """2 x 2 x 150 random and adversarial cases: the kept indices of diou_nms, and the merged boxes of
    the naive loop (to rounding: the mean is summed in another order)."""
    g = torch.Generator().manual_seed(30 + batched)
    for case in range(150):
        n = int(torch.randint(0, 50, (1,), generator=g)) if case % 25 else 200
        dtype = torch.float64 if case % 5 == 2 else torch.float32
        if case % 3 == 0:
            boxes, scores, t = adversarial_case(g, case % 4, n, dtype)
            boxes = boxes.nan_to_num(0.0, 1e6, -1e6)  # finite: the means of negative-threshold clusters stay finite
        else:
            boxes, scores = random_case(g, n, dtype)
            t = THRESHOLDS[case % len(THRESHOLDS)]
        t = -0.2 if case % 17 == 3 else t
        beta, distance = (1.0, True) if case % 4 else (math.inf, False)
        idxs = torch.randint(0, 3, (n,), generator=g) if batched else None
        if idxs is None:
            keep, merged = boxloss.weighted_nms(boxes, scores, t, beta=beta, distance=distance)
        else:
            keep, merged = boxloss.batched_weighted_nms(boxes, scores, idxs, t, beta=beta, distance=distance)
        want_keep, want_merged = weighted_reference(boxes, scores, t, idxs, beta, distance)
        assert torch.equal(keep, want_keep), f"case {case}"
        assert torch.equal(keep, _nms(boxes, scores, t, idxs, beta=beta, distance=distance))
        assert merged.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        torch.testing.assert_close(merged, want_merged, rtol=1e-6, atol=1e-6, msg=f"case {case}")


def test_weighted_hand_worked(kernel):
    # A = [0,0,10,10] (0.6) and B = [1,0,11,10] (0.3): IoU 90 / 110 > 0.5, so B joins A:
    # A + 0.3 / 0.9 * (B - A) = [1/3, 0, 31/3, 10]; C far away stays as it is
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 0, 11, 10], [20, 20, 30, 30]], dtype=torch.float64)
    keep, merged = boxloss.weighted_nms(boxes, torch.tensor([0.6, 0.3, 0.5]), 0.5)
    assert keep.tolist() == [0, 2]
    torch.testing.assert_close(merged, torch.tensor([[1 / 3, 0, 31 / 3, 10], [20, 20, 30, 30]], dtype=torch.float64))
    # X = [6,0,16,10] overlaps A (0.9) and D = [12,0,22,10] (0.8) by IoU 4/16 each: at threshold 0.2
    # (plain IoU) A suppresses X first, so X enters A's mean only (ultralytics' merge would add it to D's too):
    # A + 0.7 / 1.6 * (6, 0, 6, 0) = [2.625, 0, 12.625, 10]
    boxes = torch.tensor([[0.0, 0, 10, 10], [12, 0, 22, 10], [6, 0, 16, 10]])
    keep, merged = boxloss.weighted_nms(boxes, torch.tensor([0.9, 0.8, 0.7]), 0.2, distance=False)
    assert keep.tolist() == [0, 1]
    assert merged.tolist() == [[2.625, 0, 12.625, 10], [12, 0, 22, 10]]


@pytest.mark.parametrize("device", DEVICES)
def test_weighted_edge_cases(device, kernel):
    if device != "cpu" and kernel == "native":
        pytest.skip("the C kernel runs on CPU tensors")
    keep, merged = boxloss.weighted_nms(torch.zeros(0, 4, device=device), torch.zeros(0, device=device), 0.5)
    assert keep.shape == (0,) and merged.shape == (0, 4) and merged.device.type == device
    one = torch.tensor([[1.1, 2.3, 3.7, 4.9]], device=device)
    keep, merged = boxloss.weighted_nms(one, torch.tensor([0.3], device=device), 0.5)
    assert keep.tolist() == [0] and torch.equal(merged, one)  # a cluster of one: the box itself, exactly
    # all suppressed by the first: identical boxes merge into themselves; zero-area boxes stay alone,
    # NaN-free; a zero-weight cluster keeps its box
    boxes = torch.tensor(
        [[0.1, 0.2, 5.3, 7.7]] * 4 + [[3, 3, 3, 9], [2, 2, 2, 2], [2, 2, 2, 2], [40, 40, 50, 50], [41, 40, 51, 50]],
        device=device,
    )
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.0, 0.0], device=device)
    keep, merged = boxloss.weighted_nms(boxes, scores, 0.5)
    assert keep.tolist() == [0, 4, 5, 6, 7]
    assert torch.equal(merged, boxes[[0, 4, 5, 6, 7]])
    idxs = torch.tensor([0, 1, 0, 1, 0, 0, 0, 0, 0], device=device)
    keep, merged = boxloss.batched_weighted_nms(boxes, scores, idxs, 0.5)
    assert keep.tolist() == [0, 1, 4, 5, 6, 7] and torch.equal(merged, boxes[[0, 1, 4, 5, 6, 7]])


# ---------------------------------------------------------------- errors


def test_bad_arguments_raise_with_the_value():
    b, s, i = torch.zeros(3, 4), torch.zeros(3), torch.zeros(3, dtype=torch.int64)
    with pytest.raises(TypeError, match="boxes must be a torch.Tensor"):
        boxloss.diou_nms([[0, 0, 1, 1]], s, 0.5)
    with pytest.raises(ValueError, match=r"boxes must have shape \[\.\.\., 4\], got \(3, 5\)"):
        boxloss.diou_nms(torch.zeros(3, 5), s, 0.5)
    with pytest.raises(ValueError, match=r"boxes must have shape \[N, 4\], got \(2, 3, 4\)"):
        boxloss.diou_nms(torch.zeros(2, 3, 4), s, 0.5)
    with pytest.raises(ValueError, match=r"scores must have shape \[N\] = \[3\].*got \(2,\)"):
        boxloss.diou_nms(b, torch.zeros(2), 0.5)
    with pytest.raises(ValueError, match=r"scores must have shape \[N\] = \[3\].*got \(3, 1\)"):
        boxloss.diou_nms(b, torch.zeros(3, 1), 0.5)
    with pytest.raises(TypeError, match="scores must be a torch.Tensor, got list"):
        boxloss.diou_nms(b, [0.1, 0.2, 0.3], 0.5)
    with pytest.raises(ValueError, match=r"idxs must have shape \[N\] = \[3\].*got \(4,\)"):
        boxloss.batched_diou_nms(b, s, torch.zeros(4, dtype=torch.int64), 0.5)
    with pytest.raises(TypeError, match="idxs must be an integer tensor.*torch.float32"):
        boxloss.batched_diou_nms(b, s, torch.zeros(3), 0.5)
    for bad in (float("nan"), "0.5", None, True):
        with pytest.raises(ValueError, match=f"iou_threshold must be a real number, got {bad!r}"):
            boxloss.diou_nms(b, s, bad)
    for bad in (0.0, -1.0, float("nan"), "1"):
        with pytest.raises(ValueError, match="beta must be a number > 0"):
            boxloss.diou_nms(b, s, 0.5, beta=bad)
    with pytest.raises(TypeError, match="distance must be True or False, got 1"):
        boxloss.diou_nms(b, s, 0.5, distance=1)
    assert boxloss.batched_diou_nms(b, s, i, 0.5).tolist() == [0, 1, 2]  # zero-area boxes: all kept


def test_kernel_selection(monkeypatch):
    """BOXLOSS_KERNEL as for the losses: auto / native / eager, errors naming the value."""
    cpu, meta = torch.device("cpu"), torch.device("meta")
    monkeypatch.delenv("BOXLOSS_KERNEL", raising=False)
    assert nms_mod._use_native(cpu, 10) == (nms_mod._nms_native is not None)
    assert not nms_mod._use_native(meta, 10)  # off the CPU: the torch path
    assert not nms_mod._use_native(cpu, 2**31)  # beyond the kernel's int32 indices
    monkeypatch.setenv("BOXLOSS_KERNEL", "eager")
    assert not nms_mod._use_native(cpu, 10)
    monkeypatch.setenv("BOXLOSS_KERNEL", "triton")  # the losses' Triton kernels; NMS has none: as auto
    assert nms_mod._use_native(cpu, 10) == (nms_mod._nms_native is not None)
    assert not nms_mod._use_native(meta, 10)
    monkeypatch.setenv("BOXLOSS_KERNEL", "fast")
    with pytest.raises(ValueError, match=re.escape(f"BOXLOSS_KERNEL must be one of {BACKENDS}, got 'fast'")):
        boxloss.diou_nms(torch.zeros(2, 4), torch.zeros(2), 0.5)
    monkeypatch.setenv("BOXLOSS_KERNEL", "native")
    with pytest.raises(ValueError, match="BOXLOSS_KERNEL='native' runs on CPU tensors only, got device meta"):
        nms_mod._use_native(meta, 10)
    monkeypatch.setattr(nms_mod, "_nms_native", None)  # an install without a C compiler
    with pytest.raises(RuntimeError, match="needs the compiled extension boxloss._nms_native"):
        boxloss.soft_nms(torch.zeros(2, 4), torch.zeros(2))
    monkeypatch.setenv("BOXLOSS_KERNEL", "auto")
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 1, 11, 11]])
    assert boxloss.diou_nms(boxes, torch.tensor([0.5, 0.9]), 0.5).tolist() == [1]  # the torch path


def test_no_gradient_through_outputs(kernel):
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30]], requires_grad=True)
    scores = torch.tensor([0.9, 0.8, 0.7], requires_grad=True)
    keep, merged = boxloss.weighted_nms(boxes, scores, 0.5)
    assert keep.tolist() == [0, 2] and not merged.requires_grad
    keep, s = boxloss.soft_nms(boxes, scores)
    assert keep.tolist() == [0, 2, 1] and not s.requires_grad


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_device_mismatch_raises():
    with pytest.raises(ValueError, match="scores is on cpu but boxes is on cuda"):
        boxloss.diou_nms(torch.zeros(3, 4, device="cuda"), torch.zeros(3), 0.5)
