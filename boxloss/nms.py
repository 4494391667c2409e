"""DIoU-NMS, weighted NMS and Soft-NMS: greedy non-maximum suppression with the DIoU distance term,
exact and batched by class.

Greedy NMS visits boxes by decreasing score and keeps a box unless an already kept box suppresses
it. DIoU-NMS (Zheng et al., AAAI 2020, Sec. "Non-Maximum Suppression using DIoU") suppresses box j
by a kept box i when

    IoU(i, j) - R(i, j) ** beta > iou_threshold,     R(i, j) = rho^2(i, j) / c^2(i, j),

rho the distance between the box centres and c the diagonal of the smallest box enclosing both.
Two overlapping boxes with far-apart centres (two adjacent objects) are thus kept where plain NMS
drops one; ``beta -> inf`` (or ``distance=False``) is plain IoU NMS.

Two implementations give the same kept indices, in the same order (see :func:`_use_native`):

* **native** (the CPU default): ``boxloss._nms_native``, plain C built by ``pip install``. Per
  category, the boxes are visited by rank and each is tested only against the kept boxes whose
  corner lies in the window the threshold allows (the bounds of step 2 below), found through
  uniform grids over the corners (x1, y1), one per size level (powers of two of max(w, h)) in large
  categories, the kept ones being bits of a bitset over the grid order. The
  values are computed in the same dtype with the same operations in the same order as the torch
  path, so values exactly at the threshold decide alike. No torch op besides the input checks;
  the GIL is released. ``BOXLOSS_KERNEL=eager`` selects the torch path on CPU (the variable and
  values of the loss kernels, ``boxloss._kernels.BACKENDS``).
* **torch** (GPUs, CPUs without the extension, and the test oracle): PyTorch ops only. On CPU
  tensors, the sparse formulation below. Off the CPU, :func:`_nms_masked`: the bit matrix of
  "i would suppress j" computed on the device in blocks of rows, read back in one transfer (the one
  host-device synchronisation of a call, up to ~46,000 boxes) and resolved by the greedy loop on the
  host, as torchvision's CUDA NMS does; the sparse formulation's data-dependent sizes would cost
  tens of synchronisations per call.

While tracing (torch.compile, torch.export) or on fake tensors, :func:`diou_nms` and
:func:`batched_diou_nms` are the custom op ``boxloss::diou_nms``, whose number of kept boxes is a
data-dependent size for the tracer.

How the exact greedy result is reached with PyTorch ops, without a per-box Python loop
--------------------------------------------------------------------------------------
1. **Rank.** A stable sort on decreasing score (equal scores: lower index first).
2. **Sparse candidates.** For ``iou_threshold >= 0`` only pairs with IoU > threshold can suppress
   (DIoU <= IoU), and IoU > t forces the x-ranges to overlap by more than t * max(w_i, w_j) (and
   likewise y). Boxes are sorted by a float64 key (category, x1) and each box gets the run of
   later boxes with x1 < x2 - t w by ``searchsorted`` (categories are offset along the key: the
   coordinate trick of ``torchvision.ops.batched_nms``, applied to the key only, so values use
   the true coordinates).
3. **Tiles.** Windows are contiguous runs of the sorted boxes, so they are cut into rows of K
   slots and tested on ``[rows, K]`` tiles gathered by ``unfold`` (contiguous copies, no
   per-element gathers) with a cheap superset test of IoU > t; the exact value is computed on the
   survivors only, with the same operations as the reference.
4. **Exact resolution.** The edges i -> j (i ranked first, value > t) form a DAG. A box with no
   incoming edge is kept and suppresses its targets; edges touching decided boxes are dropped;
   repeat. This is the Cluster-NMS fixed point b_t = not any(b_{t-1}[i] and A[i, j]) (Zheng et
   al., arXiv:2005.03572) evaluated on the sparse edge list with settled boxes removed; it ends
   after at most (longest edge chain + 1) rounds, 3-7 on detector outputs.
5. **Stages for dense clusters.** Greedy's decision on a box depends only on the kept boxes ranked
   above it. When windows are long, the best-ranked quarter is resolved first, its kept boxes
   remove what they suppress from the rest (windows of kept boxes only, instead of the cluster's
   all-pairs edges), and the survivors go to the next stage. (Size-level groups, tried as well,
   stopped paying for their extra searches once stages were in.)

For ``iou_threshold < 0`` disjoint boxes can suppress (DIoU < 0) and a per-category parallel
greedy loop is used instead (one round per kept box of the largest category, memory O(N)); the C
kernel then compares each box with every kept box of its category.

Numerics: boxes are computed in float32 (float16/bfloat16/integers upcast) or float64, and the
computed value is compared with ``iou_threshold`` as an exact real number (as torchvision's CPU
kernel does). With ``distance=False`` the IoU is computed with the same operations as
``torchvision.ops.nms`` (inter / (area_i + area_j - inter)), so on valid boxes the kept indices
are identical. Boxes with zero or non-finite area can neither suppress nor be suppressed (their
IoU is 0 or NaN). The two implementations agree bit for bit with ``beta`` 1 (the default), 2, 3
and inf; for ``beta = 0.5`` the C kernel takes the correctly rounded ``sqrt`` and for other
``beta`` libm's ``pow`` of the float64 base (torch's scalar loop), while torch's CPU kernels use
MKL's ``sqrt`` and SLEEF's ``pow``, within 1 ulp but not correctly rounded, so a penalty can
differ in its last bit there. No data-dependent asserts.

Weighted NMS (:func:`weighted_nms`) is the same greedy pass, returning for each kept box the
score-weighted mean of the boxes it suppresses. Soft-NMS (:func:`soft_nms`) decays scores instead
of removing boxes (Bodla et al., ICCV 2017, arXiv:1704.04503).
"""

from __future__ import annotations

import ctypes
import math
import numbers
import os
import struct
from typing import Optional

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor

from ._kernels import BACKENDS
from .boxes import _check_box_tensor, _upcast

try:  # the C loops, built by `pip install` (setup.py); without a compiler the torch path runs
    from . import _nms_native
except ImportError:  # pragma: no cover - depends on the build
    _nms_native = None

__all__ = [
    "diou_nms",
    "batched_diou_nms",
    "weighted_nms",
    "batched_weighted_nms",
    "soft_nms",
    "batched_soft_nms",
    "SOFT_NMS_METHODS",
]

SOFT_NMS_METHODS = ("linear", "gaussian")

# Geometric pruning uses a threshold t' this much smaller than t, so float rounding of the computed
# IoU (a few ulp) can never push a true suppression out of the candidate set.
_PRUNE_SLACK = 1e-5
# Below this many edges, the rest of the suppression graph is settled by a Python loop.
_SEQUENTIAL_EDGES = 512
# Plain x1 windows longer than this on average count as "dense": the boxes are then resolved in
# stages by rank (see _greedy).
_DENSE_MEAN_WINDOW = 16.0
# No stage below this many boxes (one more pass of ops would cost more than it saves).
_STAGE_MIN = 1024
# A stage takes this fraction (1 / _STAGE_DIV) of the boxes still alive.
_STAGE_DIV = 4
# Tile rows are processed in chunks of at most this many slots: bounded memory, temporaries in
# cache, and below torch's parallel grain size (32768), so each op runs on one thread without a
# fork/join; measured faster than 2^16-2^17 with 2 threads on the 2-core machine.
_CHUNK_SLOTS = (1 << 15) - 1
_ROW_WIDTHS = (8, 16, 32, 64, 128)
# The C kernel indexes boxes with int32.
_NATIVE_MAX_BOXES = 2**31 - 1
# Off the CPU (see _nms_masked): values per block of rows of the suppression matrix, which bounds the
# device's temporaries (a dozen [rows, N] tensors of 2^24 elements: ~0.8 GB in float32), and bytes of
# suppression bits per host read (each read is one host-device synchronisation; 2^27 bytes hold the
# upper triangle of ~46,000 boxes).
_DEVICE_BLOCK_VALUES = 1 << 24
_HOST_READ_BYTES = 1 << 27
_F32_MAX = 3.4028234663852886e38


def diou_nms(
    boxes: Tensor, scores: Tensor, iou_threshold: float, *, beta: float = 1.0, distance: bool = True
) -> Tensor:
    """Greedy DIoU-NMS: keep boxes by decreasing score, dropping any box that a kept box suppresses.

    Box j is suppressed by a kept box i (higher score) when

    ``IoU(i, j) - (rho^2(i, j) / c^2(i, j)) ** beta > iou_threshold``

    with rho the distance between the centres and c the diagonal of the smallest enclosing box.
    The result is exactly that of the sequential greedy loop, equal scores visited in index order.

    Args:
        boxes: ``[N, 4]`` boxes ``(x1, y1, x2, y2)``; float16/bfloat16/integers are computed in
            float32, float64 in float64.
        scores: ``[N]`` scores (any real dtype).
        iou_threshold: suppress when the (D)IoU is strictly greater than this. Usual values are
            0.5-0.7; a negative threshold lets disjoint boxes suppress (slower, dense path).
        beta: exponent of the distance penalty (> 0); 1 in the paper, ``inf`` gives plain NMS.
        distance: ``False`` drops the distance term: plain IoU NMS, identical to
            ``torchvision.ops.nms`` on valid boxes.

    Returns:
        ``[K]`` int64 indices of the kept boxes, by decreasing score (ties by index). Boxes of zero
        or non-finite area (IoU 0 or NaN with everything) are always kept. Scores must not be NaN
        (a NaN score ranks first, as in ``torch.sort``).

    Reference:
        Zheng et al., "Distance-IoU Loss: Faster and Better Learning for Bounding Box Regression",
        AAAI 2020, arXiv:1911.08287. Exact fast resolution after Zheng et al., "Enhancing Geometric
        Factors in Model Learning and Inference for Object Detection and Instance Segmentation"
        (Cluster-NMS), arXiv:2005.03572.
    """
    boxes, scores, _ = _check_inputs(boxes, scores, None, iou_threshold, beta, distance)
    if _tracing(boxes):
        return _diou_nms_op(boxes, scores, None, float(iou_threshold), float(beta), distance)
    return _greedy_nms(boxes, scores, None, float(iou_threshold), float(beta), distance)


def batched_diou_nms(
    boxes: Tensor,
    scores: Tensor,
    idxs: Tensor,
    iou_threshold: float,
    *,
    beta: float = 1.0,
    distance: bool = True,
) -> Tensor:
    """DIoU-NMS per category: boxes with different ``idxs`` never suppress each other.

    Same rule and arguments as :func:`diou_nms`, applied independently to each value of ``idxs``
    (as ``torchvision.ops.batched_nms``), in one pass over all categories.

    Args:
        boxes: ``[N, 4]`` boxes ``(x1, y1, x2, y2)``.
        scores: ``[N]`` scores.
        idxs: ``[N]`` integer category of each box.
        iou_threshold: suppress when the (D)IoU is strictly greater than this.
        beta: exponent of the distance penalty (> 0).
        distance: ``False`` gives plain IoU NMS, identical to ``torchvision.ops.batched_nms``.

    Returns:
        ``[K]`` int64 indices of the kept boxes over all categories, by decreasing score (ties by
        index).

    Reference:
        Zheng et al., "Distance-IoU Loss", AAAI 2020, arXiv:1911.08287.
    """
    boxes, scores, idxs = _check_inputs(boxes, scores, idxs, iou_threshold, beta, distance)
    if _tracing(boxes):
        return _diou_nms_op(boxes, scores, idxs, float(iou_threshold), float(beta), distance)
    return _greedy_nms(boxes, scores, idxs, float(iou_threshold), float(beta), distance)


def weighted_nms(
    boxes: Tensor, scores: Tensor, iou_threshold: float, *, beta: float = 1.0, distance: bool = True
) -> tuple[Tensor, Tensor]:
    """Weighted (merge) NMS: greedy DIoU-NMS whose kept boxes become the score-weighted mean of the
    boxes they suppress.

    The greedy pass is that of :func:`diou_nms` (same rule, same kept indices). When box i is kept,
    its cluster is i itself and every box j ranked after i, not yet suppressed at that step, with
    ``IoU(i, j) - (rho^2 / c^2) ** beta > iou_threshold``: exactly the boxes i suppresses, so each
    box enters one mean, that of the best-ranked kept box that suppresses it. The merged box is

    ``b_i + sum_j s_j (b_j - b_i) / sum_j s_j``  over the cluster (i included),

    which is ``sum_j s_j b_j / sum_j s_j``, computed in float64 from b_i so that a cluster of one
    box returns it exactly. Peers differ: ultralytics' ``merge`` averages, with the same score
    weights, every box above the threshold, including boxes already suppressed by a better kept
    box; Cluster-NMS weights by score x IoU.

    Args:
        boxes: ``[N, 4]`` boxes ``(x1, y1, x2, y2)`` (computed in float32, or float64).
        scores: ``[N]`` scores, also the weights; should be >= 0 (a cluster whose weights sum to 0
            keeps its box unchanged).
        iou_threshold: suppress when the (D)IoU is strictly greater than this.
        beta: exponent of the distance penalty (> 0).
        distance: ``False`` gives plain IoU NMS with merging.

    Returns:
        ``(keep, merged_boxes)``: ``[K]`` int64 indices of the kept boxes by decreasing score (ties
        by index), those of :func:`diou_nms`, and ``[K, 4]`` merged boxes in the compute dtype
        (float32, or float64 for float64 boxes), without gradient. Boxes of zero or non-finite area
        stay alone.

    Reference:
        Zheng et al., "Enhancing Geometric Factors in Model Learning and Inference for Object
        Detection and Instance Segmentation" (Cluster-NMS, weighted coordinates),
        arXiv:2005.03572; the ``merge`` option of ultralytics' ``non_max_suppression``.
    """
    boxes, scores, _ = _check_inputs(boxes, scores, None, iou_threshold, beta, distance)
    if _use_native(boxes.device, boxes.shape[0]):
        return _native_nms(boxes, scores, None, float(iou_threshold), float(beta), distance, True)
    return _weighted_torch(boxes, scores, None, float(iou_threshold), float(beta), distance)


def batched_weighted_nms(
    boxes: Tensor,
    scores: Tensor,
    idxs: Tensor,
    iou_threshold: float,
    *,
    beta: float = 1.0,
    distance: bool = True,
) -> tuple[Tensor, Tensor]:
    """Weighted NMS per category: boxes with different ``idxs`` never suppress nor merge.

    Same rule, arguments and results as :func:`weighted_nms`, applied to each value of ``idxs``.

    Args:
        boxes: ``[N, 4]`` boxes ``(x1, y1, x2, y2)``.
        scores: ``[N]`` scores (the weights).
        idxs: ``[N]`` integer category of each box.
        iou_threshold: suppress when the (D)IoU is strictly greater than this.
        beta: exponent of the distance penalty (> 0).
        distance: ``False`` gives plain IoU NMS with merging.

    Returns:
        ``(keep, merged_boxes)``: ``[K]`` int64 indices as :func:`batched_diou_nms` and their
        ``[K, 4]`` merged boxes.

    Reference:
        Zheng et al., Cluster-NMS, arXiv:2005.03572.
    """
    boxes, scores, idxs = _check_inputs(boxes, scores, idxs, iou_threshold, beta, distance)
    if _use_native(boxes.device, boxes.shape[0]):
        return _native_nms(boxes, scores, idxs, float(iou_threshold), float(beta), distance, True)
    return _weighted_torch(boxes, scores, idxs, float(iou_threshold), float(beta), distance)


def soft_nms(
    boxes: Tensor,
    scores: Tensor,
    *,
    method: str = "gaussian",
    sigma: float = 0.5,
    iou_threshold: float = 0.3,
    score_threshold: float = 0.001,
    distance: bool = False,
    beta: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Soft-NMS: decay the scores of the boxes overlapping each selected box instead of removing them.

    Algorithm 1 of the paper: repeatedly select the box of highest current score (equal scores:
    lower index), then multiply the score of every remaining box by f(o), o the overlap with the
    selected box, and drop the boxes whose score is below ``score_threshold`` (boxes starting below
    it, or with a NaN score, are never selected):

    * ``"linear"`` (Eq. 2): f = 1 - o where o >= ``iou_threshold``, else 1;
    * ``"gaussian"`` (Eq. 3): f = exp(-o^2 / ``sigma``) for every box.

    o is the IoU, or with ``distance=True`` max(IoU - (rho^2 / c^2) ** beta, 0) (the DIoU
    criterion); it is computed as in :func:`diou_nms` and clamped to [0, 1] (0 for the NaN of two
    empty boxes); the scores are decayed in float64.

    Args:
        boxes: ``[N, 4]`` boxes ``(x1, y1, x2, y2)`` (computed in float32, or float64).
        scores: ``[N]`` scores.
        method: ``"gaussian"`` (the paper's choice) or ``"linear"``.
        sigma: width of the gaussian (> 0); 0.5 in the paper.
        iou_threshold: N_t of the linear method (ignored by the gaussian one); 0.3 in the paper.
        score_threshold: boxes whose current score falls below this are dropped.
        distance: use max(DIoU, 0) as the overlap instead of the IoU.
        beta: exponent of the distance penalty (> 0), with ``distance=True``.

    Returns:
        ``(keep, new_scores)``: ``[K]`` int64 indices of the selected boxes in selection order
        (which is decreasing decayed score, ties by index) and their ``[K]`` scores at selection,
        in float32 (float64 for float64 scores).

    Reference:
        Bodla et al., "Soft-NMS -- Improving Object Detection With One Line of Code", ICCV 2017,
        arXiv:1704.04503; DIoU as the overlap: Zheng et al., arXiv:1911.08287.
    """
    boxes, scores, _ = _check_inputs(boxes, scores, None, iou_threshold, beta, distance)
    _check_soft_args(method, sigma, score_threshold)
    args = (method, float(sigma), float(iou_threshold), float(score_threshold), distance, float(beta))
    if _use_native(boxes.device, boxes.shape[0]):
        return _native_soft_nms(boxes, scores, None, *args)
    return _soft_torch(boxes, scores, None, *args)


def batched_soft_nms(
    boxes: Tensor,
    scores: Tensor,
    idxs: Tensor,
    *,
    method: str = "gaussian",
    sigma: float = 0.5,
    iou_threshold: float = 0.3,
    score_threshold: float = 0.001,
    distance: bool = False,
    beta: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Soft-NMS per category: boxes with different ``idxs`` never decay each other's scores.

    Same rule and arguments as :func:`soft_nms`. The selection order is that of one run over all
    categories at once (each step selects the highest current score of any category), which is
    decreasing decayed score, ties by index.

    Args:
        boxes: ``[N, 4]`` boxes ``(x1, y1, x2, y2)``.
        scores: ``[N]`` scores.
        idxs: ``[N]`` integer category of each box.
        method: ``"gaussian"`` or ``"linear"``.
        sigma: width of the gaussian (> 0).
        iou_threshold: N_t of the linear method.
        score_threshold: boxes whose current score falls below this are dropped.
        distance: use max(DIoU, 0) as the overlap.
        beta: exponent of the distance penalty (> 0).

    Returns:
        ``(keep, new_scores)``: ``[K]`` int64 indices and their ``[K]`` decayed scores.

    Reference:
        Bodla et al., "Soft-NMS", ICCV 2017, arXiv:1704.04503.
    """
    boxes, scores, idxs = _check_inputs(boxes, scores, idxs, iou_threshold, beta, distance)
    _check_soft_args(method, sigma, score_threshold)
    args = (method, float(sigma), float(iou_threshold), float(score_threshold), distance, float(beta))
    if _use_native(boxes.device, boxes.shape[0]):
        return _native_soft_nms(boxes, scores, idxs, *args)
    return _soft_torch(boxes, scores, idxs, *args)


# ------------------------------------------------------------------ torch.compile / torch.export


def _greedy_nms(boxes: Tensor, scores: Tensor, idxs: Tensor | None, t: float, beta: float, distance: bool) -> Tensor:
    """Kept indices by the C kernel or the torch path (checked arguments)."""
    if _use_native(boxes.device, boxes.shape[0]):
        return _native_nms(boxes, scores, idxs, t, beta, distance, False)[0]
    return _nms(boxes, scores, idxs, t, beta, distance)


def _tracing(boxes: Tensor) -> bool:
    """Whether a tracer (torch.compile, torch.export) or fake tensors run the call: then NMS is the
    opaque op ``boxloss::diou_nms`` (the C kernel reads raw pointers and the torch path has
    data-dependent sizes; neither can be traced). Eager calls skip the dispatcher's overhead."""
    return torch.compiler.is_compiling() or isinstance(boxes, FakeTensor)


@torch.library.custom_op("boxloss::diou_nms", mutates_args=())
def _diou_nms_op(boxes: Tensor, scores: Tensor, idxs: Optional[Tensor], iou_threshold: float, beta: float,
                 distance: bool) -> Tensor:
    """``boxloss::diou_nms``: :func:`batched_diou_nms` (``idxs`` given) or :func:`diou_nms` as one op,
    whose number of kept boxes is a data-dependent size for tracers."""
    return _greedy_nms(boxes, scores, idxs, iou_threshold, beta, distance)


@_diou_nms_op.register_fake
def _(boxes, scores, idxs, iou_threshold, beta, distance):
    k = torch.library.get_ctx().new_dynamic_size()  # 0 <= K <= N kept boxes, known only when run
    return boxes.new_empty((k,), dtype=torch.int64)


# ---------------------------------------------------------------------------------------- checks


def _check_inputs(boxes, scores, idxs, iou_threshold, beta, distance):
    _check_box_tensor("boxes", boxes)
    if boxes.dim() != 2:
        raise ValueError(f"boxes must have shape [N, 4], got {tuple(boxes.shape)}")
    if boxes.is_complex() or boxes.dtype == torch.bool:
        raise TypeError(f"boxes must be real numbers, got dtype {boxes.dtype}")
    n = boxes.shape[0]
    if not isinstance(scores, Tensor):
        raise TypeError(f"scores must be a torch.Tensor, got {type(scores).__name__}")
    if scores.shape != (n,):
        raise ValueError(f"scores must have shape [N] = [{n}] to match boxes, got {tuple(scores.shape)}")
    if scores.is_complex():
        raise TypeError(f"scores must be real numbers, got dtype {scores.dtype}")
    if scores.device != boxes.device:
        raise ValueError(f"scores is on {scores.device} but boxes is on {boxes.device}")
    if idxs is not None:
        if not isinstance(idxs, Tensor):
            raise TypeError(f"idxs must be a torch.Tensor, got {type(idxs).__name__}")
        if idxs.shape != (n,):
            raise ValueError(f"idxs must have shape [N] = [{n}] to match boxes, got {tuple(idxs.shape)}")
        if idxs.is_floating_point() or idxs.is_complex() or idxs.dtype == torch.bool:
            raise TypeError(f"idxs must be an integer tensor of category ids, got dtype {idxs.dtype}")
        if idxs.device != boxes.device:
            raise ValueError(f"idxs is on {idxs.device} but boxes is on {boxes.device}")
    # x != x for NaN: also on torch.compile's symbolic floats, where math.isnan breaks the graph
    if isinstance(iou_threshold, bool) or not isinstance(iou_threshold, numbers.Real) or iou_threshold != iou_threshold:
        raise ValueError(f"iou_threshold must be a real number, got {iou_threshold!r}")
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not beta > 0:
        raise ValueError(f"beta must be a number > 0 (inf allowed), got {beta!r}")
    if not isinstance(distance, bool):
        raise TypeError(f"distance must be True or False, got {distance!r}")
    return boxes, scores, idxs


def _check_soft_args(method, sigma, score_threshold):
    if method not in SOFT_NMS_METHODS:
        raise ValueError(f"method must be one of {SOFT_NMS_METHODS}, got {method!r}")
    if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real) or not 0 < sigma < math.inf:
        raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")
    if (
        isinstance(score_threshold, bool)
        or not isinstance(score_threshold, numbers.Real)
        or score_threshold != score_threshold
    ):
        raise ValueError(f"score_threshold must be a real number, got {score_threshold!r}")


def _use_native(device: torch.device, n: int) -> bool:
    """Whether the C kernel runs on ``n`` boxes: ``$BOXLOSS_KERNEL`` as for the losses
    (``boxloss._kernels``): ``"auto"`` (default) for CPU tensors when the extension is built,
    ``"eager"`` never (the torch path), ``"native"`` always, raising where it cannot run;
    ``"triton"`` selects the losses' Triton kernels and, NMS having none, acts as ``"auto"`` here."""
    backend = os.environ.get("BOXLOSS_KERNEL", "auto")
    if backend in ("auto", "triton"):
        return device.type == "cpu" and _nms_native is not None and n < _NATIVE_MAX_BOXES
    if backend == "eager":
        return False
    if backend != "native":
        raise ValueError(f"BOXLOSS_KERNEL must be one of {BACKENDS}, got {backend!r}")
    if device.type != "cpu":
        raise ValueError(f"BOXLOSS_KERNEL='native' runs on CPU tensors only, got device {device}")
    if n >= _NATIVE_MAX_BOXES:
        raise ValueError(f"BOXLOSS_KERNEL='native' takes fewer than 2^31 boxes, got {n}")
    if _nms_native is None:
        raise RuntimeError("BOXLOSS_KERNEL='native' needs the compiled extension boxloss._nms_native, which is "
                           "not built: reinstall with a C compiler present (pip install -e .)")
    return True


# ------------------------------------------------------------------------------- the value


def _iou(ax1, ay1, ax2, ay2, a_area, bx1, by1, bx2, by2, b_area):
    """torchvision's IoU, ``inter / (area_a + area_b - inter)`` (NaN for two empty boxes, which then
    never suppress), broadcast; every operation is symmetric in (a, b)."""
    iw = (torch.minimum(ax2, bx2) - torch.maximum(ax1, bx1)).clamp_(min=0)
    ih = (torch.minimum(ay2, by2) - torch.maximum(ay1, by1)).clamp_(min=0)
    inter = iw * ih
    return inter / (a_area + b_area - inter)


def _distance_penalty(ax1, ay1, ax2, ay2, bx1, by1, bx2, by2, beta: float):
    """(rho^2 / c^2) ** beta, rho the centre distance and c the enclosing diagonal; in [0, 1].

    No eps: c = 0 only for two identical points, whose IoU is NaN (never suppresses) anyway.
    Symmetric in (a, b) bit for bit (the centre offset only changes sign).
    """
    cw = torch.maximum(ax2, bx2) - torch.minimum(ax1, bx1)
    ch = torch.maximum(ay2, by2) - torch.minimum(ay1, by1)
    c2 = cw * cw + ch * ch  # squared diagonal of the enclosing box
    dx = (bx1 + bx2) - (ax1 + ax2)  # twice the centre offset
    dy = (by1 + by2) - (ay1 + ay2)
    r = (dx * dx + dy * dy) * 0.25 / c2
    return r if beta == 1.0 else r.pow(beta)


def _suppression_value(a: Tensor, b: Tensor, beta: float, distance: bool) -> Tensor:
    """IoU(a, b) - (rho^2 / c^2) ** beta for boxes ``a``, ``b`` (``[..., 4]``, broadcast)."""
    return _value_columns(a.unbind(-1), b.unbind(-1), beta, distance)


def _value_columns(a, b, beta: float, distance: bool) -> Tensor:
    """:func:`_suppression_value` on coordinate columns ``(x1, y1, x2, y2)`` (contiguous columns
    are faster than the strided columns of ``[N, 4]`` rows)."""
    ax1, ay1, ax2, ay2 = a
    bx1, by1, bx2, by2 = b
    a_area = (ax2 - ax1).clamp(min=0) * (ay2 - ay1).clamp(min=0)
    b_area = (bx2 - bx1).clamp(min=0) * (by2 - by1).clamp(min=0)
    iou = _iou(ax1, ay1, ax2, ay2, a_area, bx1, by1, bx2, by2, b_area)
    if not distance or beta == math.inf:
        return iou
    return iou - _distance_penalty(ax1, ay1, ax2, ay2, bx1, by1, bx2, by2, beta)


def _exclusive_threshold(t: float, dtype: torch.dtype) -> float:
    """Largest value of ``dtype`` that is <= ``t``, so that ``v > result`` iff ``v > t`` exactly.

    Comparing a float32 tensor with a Python float rounds the float to float32 first, which flips
    the answer for a value equal to float32(t) when float32(t) > t (t = 0.3, for example). Computed
    in Python (no tensor, so no host read of a device value).
    """
    if dtype == torch.float64 or math.isinf(t):
        return t
    if t >= _F32_MAX:
        return _F32_MAX
    if t < -_F32_MAX:
        return -math.inf
    low = struct.unpack("<f", struct.pack("<f", t))[0]  # rounded to nearest
    if low > t:  # one float32 step down
        bits = struct.unpack("<I", struct.pack("<f", low))[0]
        if low > 0:
            bits -= 1
        elif low == 0:
            bits = 0x80000001  # the negative number closest to 0
        else:
            bits += 1
        low = struct.unpack("<f", struct.pack("<I", bits))[0]
    return low


# --------------------------------------------------------------------------------- driver


def _nms(boxes: Tensor, scores: Tensor, idxs: Tensor | None, t: float, beta: float, distance: bool) -> Tensor:
    n = boxes.shape[0]
    device = boxes.device
    if n == 0:
        return torch.empty(0, dtype=torch.int64, device=device)
    b = _upcast(boxes.detach())  # indices only: no autograd graph (and no warning on reading values)
    order = torch.sort(scores.detach(), descending=True, stable=True)[1]  # ties: lower index first
    if n == 1 or t >= 1:  # computed IoU <= 1 and value <= IoU: nothing can be suppressed
        return order
    if _masked_path(device):
        return _nms_masked(b, order, idxs, t, beta, distance)
    if t < 0:
        return _nms_dense(b, order, idxs, t, beta, distance)

    b = b.index_select(0, order)  # rank order from here on
    c = idxs.index_select(0, order) if idxs is not None else None
    x1, y1, x2, y2 = b.unbind(1)
    area = (x2 - x1).clamp(min=0) * (y2 - y1).clamp(min=0)
    # zero or non-finite area: IoU is 0 or NaN with every box, so such a box neither suppresses nor
    # is suppressed (value <= IoU <= 0 <= t); only the others take part
    valid = (area > 0) & (area < math.inf)
    all_valid = bool(valid.all())
    vpos = None if all_valid else valid.nonzero().squeeze(1)  # [V] ranks of the valid boxes
    if vpos is not None:
        b, area = b.index_select(0, vpos), area.index_select(0, vpos)
        c = c.index_select(0, vpos) if c is not None else None
    if b.shape[0] == 0:
        return order
    if b.dtype == torch.float64 and float(b.abs().max()) > 2.0**900:
        return _nms_dense(boxes.detach(), order, idxs, t, beta, distance)  # the float64 sort keys would overflow
    # Pruning threshold t' < t: the geometric bounds hold for the real IoU, and the computed IoU is
    # within a few ulp of it while areas are normal numbers; for tiny areas or thresholds, prune by
    # plain intersection (t' = 0), which holds for any computed IoU > 0.
    tp = t * (1 - _PRUNE_SLACK)
    if t < 2.0**-20 or float(area.min()) < (2.0**-900 if b.dtype == torch.float64 else 2.0**-100):
        tp = 0.0
    kept = _greedy(b, area, _compact_classes(c, b.shape[0], device), t, tp, beta, distance)
    if vpos is None:
        return order.index_select(0, kept)
    keep = (~valid).index_fill_(0, vpos.index_select(0, kept), True)  # invalid boxes are always kept
    return order.index_select(0, keep.nonzero().squeeze(1))


def _masked_path(device: torch.device) -> bool:
    """Whether greedy NMS runs as :func:`_nms_masked` (off the CPU) rather than the sparse path below."""
    return device.type != "cpu"


def _nms_masked(b: Tensor, order: Tensor, idxs: Tensor | None, t: float, beta: float, distance: bool) -> Tensor:
    """Greedy NMS for GPUs: the suppression bits are computed on the device, read once, resolved on the host.

    The upper triangle of the ``[N, N]`` matrix "kept box i (rank) would suppress box j" (value > t,
    same category, j ranked after i) is computed in blocks of rows with the operations of the torch
    path, packed 8 to a byte on the device and copied to the host in one transfer (one more per
    ``_HOST_READ_BYTES``), where the greedy loop ORs the rows of the kept boxes into a bitset (in C
    with ``boxloss._nms_native``, else into a Python int).
    That transfer is the only host-device synchronisation (torchvision's CUDA NMS reads a bit matrix
    back likewise); the sparse path's data-dependent sizes cost tens per call. Any threshold,
    degenerate and huge boxes need no special case: every pair is compared. Work and memory
    O(N^2 / 2) on the device, N^2 / 16 bytes on the host.
    """
    n, dev = b.shape[0], b.device
    cols = b.index_select(0, order).t().contiguous()  # [4, N] x1, y1, x2, y2 in rank order
    cls = idxs.index_select(0, order) if idxs is not None else None
    thr = _exclusive_threshold(t, b.dtype)
    if _nms_native is not None:  # the host loop in C: ~100x faster than Python's
        removed_c = torch.zeros((n + 7) // 8, dtype=torch.uint8)
        kept_c, n_kept = torch.empty(n, dtype=torch.int64), 0
    removed, kept = 0, []  # (without the extension) bit j of removed: rank j is suppressed
    pending, pending_bytes, r0 = [], 0, 0
    while r0 < n:
        c0 = r0 - r0 % 8  # columns from a byte boundary; those <= the row are masked off
        r1 = min(n, r0 + max(1, _DEVICE_BLOCK_VALUES // (n - c0)))
        bits = _suppression_bits(cols, cls, r0, r1, c0, thr, beta, distance)  # [R, W] uint8, on the device
        pending.append((r0, r1, c0, bits))
        pending_bytes += bits.numel()
        r0 = r1
        if pending_bytes < _HOST_READ_BYTES and r0 < n:
            continue
        host = torch.cat([p[3].reshape(-1) for p in pending]).cpu()  # the host read
        if _nms_native is not None:
            blocks = torch.tensor([[a0, a1, ac0, block.shape[1]] for a0, a1, ac0, block in pending], dtype=torch.int64)
            n_kept = _nms_native.resolve_bits(host.data_ptr(), host.numel(), blocks.data_ptr(), len(pending), n,
                                              removed_c.data_ptr(), kept_c.data_ptr(), n_kept)
        else:
            data = ctypes.string_at(host.data_ptr(), host.numel())
            at = 0
            for a0, a1, ac0, block in pending:
                width = block.shape[1]
                for i in range(a0, a1):
                    if not (removed >> i) & 1:
                        kept.append(i)
                        row = int.from_bytes(data[at + (i - a0) * width : at + (i - a0 + 1) * width], "little")
                        removed |= row << ac0
                at += (a1 - a0) * width
        pending, pending_bytes = [], 0
    keep = kept_c[:n_kept].clone() if _nms_native is not None else torch.tensor(kept, dtype=torch.int64)
    if dev.type == "cuda":
        keep = keep.pin_memory()  # a pageable copy would wait for the device's queue (a sync)
    return order.index_select(0, keep.to(dev, non_blocking=True))


def _suppression_bits(cols: Tensor, cls: Tensor | None, r0: int, r1: int, c0: int, thr: float, beta: float,
                      distance: bool) -> Tensor:
    """``[r1 - r0, ceil((N - c0) / 8)]`` uint8: bit k of byte w of row i is set when box r0 + i (rank
    order, ``cols`` ``[4, N]``) suppresses box c0 + 8 w + k, ranked after it and of its category
    (``cls``). Device ops only, no host read."""
    n, dev = cols.shape[1], cols.device
    value = _value_columns([x[r0:r1, None] for x in cols], [x[None, c0:] for x in cols], beta, distance)
    hit = value > thr  # [R, W]; NaN never suppresses
    hit &= torch.arange(c0, n, device=dev)[None] > torch.arange(r0, r1, device=dev)[:, None]
    if cls is not None:
        hit &= cls[r0:r1, None] == cls[None, c0:]
    pad = -(n - c0) % 8
    if pad:
        hit = torch.cat([hit, hit.new_zeros(r1 - r0, pad)], 1)
    shifts = torch.arange(8, dtype=torch.uint8, device=dev)
    return (hit.view(r1 - r0, -1, 8).to(torch.uint8) << shifts).sum(2, dtype=torch.uint8)


def _compact_classes(c: Tensor | None, n: int, device) -> Tensor:
    """Category ids as small non-negative integers with the same partition (zeros when None)."""
    if c is None or n == 0:
        return torch.zeros(n, dtype=torch.int64, device=device)
    c = c.long()
    lo, hi = torch.aminmax(c)
    if int(hi) - int(lo) <= 4 * n + 1024:  # Python ints: no int64 overflow for far-apart ids
        return c - lo
    return torch.unique(c, return_inverse=True)[1]


def _greedy(b: Tensor, area: Tensor, cls: Tensor, t: float, tp: float, beta: float, distance: bool) -> Tensor:
    """Greedy NMS of boxes ``b`` ``[V, 4]`` already in rank order, positive finite ``area``, pruned with t'.

    Returns the sorted positions of the kept boxes. Greedy's decision on a box depends only on the
    kept boxes ranked above it, so the boxes can be resolved in stages: take the best-ranked
    ``block`` of the boxes still alive, resolve it exactly on its own (edges within the block,
    :func:`_resolve`), then drop from the rest every box that one of the block's kept boxes
    suppresses (:func:`_suppressed_by`); repeat on the survivors. One stage is the whole problem
    unless the candidate windows are long (dense clusters): there the best-ranked quarter (itself
    resolved the same way) first settles each cluster's best boxes, which then remove most of the
    cluster through the windows of the kept boxes only, instead of the cluster's all-pairs edges.
    """
    pos = None  # positions of the boxes still alive (None: all of them, in order)
    kept = []
    while True:
        v = b.shape[0]
        windows = _windows_self(b.double(), cls, tp)  # their total length tells how dense the boxes are
        dense = v >= 2 * _STAGE_MIN and int(windows[3].sum()) > _DENSE_MEAN_WINDOW * v
        m = max(_STAGE_MIN, v // _STAGE_DIV) if dense else v
        bb, ab, cb = b[:m], area[:m], cls[:m]  # the best-ranked block (views)
        if dense:
            kb = _greedy(bb, ab, cb, t, tp, beta, distance)  # the block may be dense too: recurse
        else:
            ia, ib = _self_edges(bb, ab, cb, t, tp, beta, distance, windows)  # positions = ranks
            kb = (~_resolve(torch.minimum(ia, ib), torch.maximum(ia, ib), m)).nonzero().squeeze(1)
        kept.append(kb if pos is None else pos.index_select(0, kb))
        if m == v:
            break
        kept_boxes = (bb.index_select(0, kb), ab.index_select(0, kb), cb.index_select(0, kb))
        hit = _suppressed_by(*kept_boxes, b[m:], area[m:], cls[m:], t, tp, beta, distance)
        live = (~hit).nonzero().squeeze(1)
        pos = (torch.arange(m, v, device=b.device) if pos is None else pos[m:]).index_select(0, live)
        b, area, cls = (x[m:].index_select(0, live) for x in (b, area, cls))
        if pos.numel() == 0:
            break
    return torch.cat(kept)


def _resolve(src: Tensor, dst: Tensor, n: int) -> Tensor:
    """Exact greedy outcome of the suppression DAG ``src -> dst`` (src ranked first) on n nodes.

    Returns the ``[n]`` bool mask of suppressed nodes. Round: a node with no incoming edge is kept
    (every box ranked before it that could suppress it is already suppressed), so the targets of
    its edges are suppressed; edges out of suppressed nodes or into decided nodes can no longer
    change anything and are dropped. At least one node per remaining chain is settled per round.
    The last few edges are settled by the sequential loop itself (cheaper than a round of ops).
    """
    suppressed = torch.zeros(n, dtype=torch.bool, device=src.device)
    has_in = torch.zeros(n, dtype=torch.bool, device=src.device)
    edges = torch.stack([src, dst])  # [2, E]
    while edges.shape[1] > _SEQUENTIAL_EDGES:  # one host sync per round
        src, dst = edges
        has_in.zero_().index_fill_(0, dst, True)
        root_edge = ~has_in.index_select(0, src)  # [E] the edge leaves a kept box
        suppressed.index_fill_(0, dst.index_select(0, root_edge.nonzero().squeeze(1)), True)
        dead = root_edge.logical_or_(suppressed.index_select(0, src)).logical_or_(suppressed.index_select(0, dst))
        edges = edges.index_select(1, (~dead).nonzero().squeeze(1))
    if edges.shape[1] > 0:
        # both ends of every edge left are undecided: run greedy on them, sources by rank
        late = set()
        for i, j in sorted(zip(*edges.tolist())):
            if i not in late:
                late.add(j)
        suppressed[torch.tensor(sorted(late), dtype=torch.int64, device=src.device)] = True
    return suppressed


# ------------------------------------------------------------------------------ candidates
#
# Necessary conditions for IoU > t' (real arithmetic; t' = t (1 - slack) < t leaves room for the
# rounding of the computed IoU): inter > t' * union >= t' * w_i * h_i and inter <= iw * h_i, so
# the x-ranges overlap by iw > t' * max(w_i, w_j), likewise in y. Hence
#   (a) x1_i - (1 - t') * w_j < x1_j < x2_i - t' * w_i   (one-sided: x1_i <= x1_j < x2_i - t' w_i)
#   (b) t' * w_i < w_j < w_i / t'  and  t' * h_i < h_j < h_i / t'.
# Boxes are sorted by a float64 key (category, x1): categories are offset along the key, as the
# coordinate trick of torchvision's batched_nms offsets the boxes, but only in the key, so values
# use the true coordinates. Keys are exact for float32 boxes and any
# rounding is monotone, so every window stays a superset of the pairs it must hold.


def _self_edges(b, area, cls, t: float, tp: float, beta: float, distance: bool, windows=None):
    """All pairs (i, j) of boxes ``b`` ``[V, 4]`` whose value exceeds ``t >= 0``, each once, same category.

    ``windows``: the result of :func:`_windows_self` for these boxes, when already computed."""
    empty = torch.empty(0, dtype=torch.int64, device=b.device)
    if b.shape[0] < 2:
        return empty, empty
    perm, win_a, win_start, win_len = windows if windows is not None else _windows_self(b.double(), cls, tp)
    feats = _tile_features(b.index_select(0, perm), area.index_select(0, perm), tp)  # [5, V] sorted
    pa, pb = _tile_candidates(feats, feats, win_a, win_start, win_len, one_sided=True)
    value = _value_columns(feats[:4].index_select(1, pa), feats[:4].index_select(1, pb), beta, distance)
    keep = (value > _exclusive_threshold(t, b.dtype)).nonzero().squeeze(1)
    return perm.index_select(0, pa.index_select(0, keep)), perm.index_select(0, pb.index_select(0, keep))


def _suppressed_by(bk, ak, ck, bq, aq, cq, t: float, tp: float, beta: float, distance: bool) -> Tensor:
    """``[Q]`` bool: which of the boxes ``bq`` some box of ``bk`` (same category) suppresses."""
    hit = torch.zeros(bq.shape[0], dtype=torch.bool, device=bq.device)
    if bk.shape[0] == 0:
        return hit
    perm, win_q, win_start, win_len = _windows_cross(bq.double(), cq, bk.double(), ck, tp)
    fq, fk = _tile_features(bq, aq, tp), _tile_features(bk.index_select(0, perm), ak.index_select(0, perm), tp)
    pq, pk = _tile_candidates(fq, fk, win_q, win_start, win_len, one_sided=False)
    value = _value_columns(fk[:4].index_select(1, pk), fq[:4].index_select(1, pq), beta, distance)
    suppressed = (value > _exclusive_threshold(t, bq.dtype)).nonzero().squeeze(1)
    return hit.index_fill_(0, pq.index_select(0, suppressed), True)


def _key_frame(*boxes: Tensor) -> tuple[float, float]:
    """Origin and spacing X (a power of two > 4 x span) of the sort key over all ``boxes``."""
    lo = min(float(b[:, 0].min()) for b in boxes)
    span = max(float(b[:, 2].max()) for b in boxes) - lo
    return lo, 2.0 ** (math.ceil(math.log2(span + 1)) + 2)


def _windows_self(bd: Tensor, cls: Tensor, tp: float):
    """Sort the boxes ``bd`` (float64) by (category, x1) and give each the run of later sorted boxes
    it must be paired with, by (a) one-sided: x1 < x2 - t' w.

    Returns ``perm`` and, per window, the querying box ``win_a`` (sorted position), ``win_start``
    and ``win_len``. Every pair with IoU > t' appears in exactly one window (the one of the box
    sorted first); windows never cross categories.
    """
    v = bd.shape[0]
    x1, x2 = bd[:, 0], bd[:, 2]
    lo, X = _key_frame(bd)
    u1 = x1 - lo  # [V] in [0, span]
    u_hi = torch.maximum(u1 + (1 - tp) * (x2 - x1), u1)  # x2 - t' w, never left of x1
    off = cls.double() * X
    key_s, perm = torch.sort(off + u1)
    end = torch.searchsorted(key_s, (off + u_hi).index_select(0, perm), right=True)
    start = torch.arange(1, v + 1, device=bd.device)
    return perm, start - 1, start, (end - start).clamp_(min=0)  # sorted box p: p+1 .. end-1


def _windows_cross(qd: Tensor, cq: Tensor, kd: Tensor, ck: Tensor, tp: float):
    """Sort the boxes ``kd`` by (category, x1) and give each query box of ``qd`` its two-sided window
    of (a): x1_q - (1 - t') w_k < x1_k < x2_q - t' w_q, with w_k below both max(w_k) and w_q / t'.
    Returns ``perm`` (of ``kd``), and per window the query ``win_q``, ``win_start``, ``win_len``."""
    lo, X = _key_frame(qd, kd)
    wk_max = (kd[:, 2] - kd[:, 0]).max()
    qx1, qx2 = qd[:, 0], qd[:, 2]
    wq = qx2 - qx1
    reach = (1 - tp) * wk_max  # how far left of x1_q a partner's x1 can be
    if tp > 0:
        reach = torch.minimum(reach, (1 - tp) * wq / tp)
    key_s, perm = torch.sort(ck.double() * X + (kd[:, 0] - lo))
    off = cq.double() * X
    uq = qx1 - lo
    start = torch.searchsorted(key_s, off + (uq - reach).clamp_(min=-X / 4), right=False)
    end = torch.searchsorted(key_s, off + torch.maximum(uq + (1 - tp) * wq, uq), right=True)
    return perm, torch.arange(qd.shape[0], device=qd.device), start, (end - start).clamp_(min=0)


def _tile_features(b: Tensor, area: Tensor, tp: float) -> Tensor:
    """``[5, N]``: x1, y1, x2, y2 and tau * area with tau = t' / (1 + t'), since
    IoU > t'  <=>  inter * (1 + t') > t' * (area_a + area_b)  <=>  inter > tau * area_a + tau * area_b."""
    return torch.cat([b, (tp / (1 + tp) * area)[:, None]], 1).t().contiguous()


def _tile_candidates(fa: Tensor, fb: Tensor, win_a: Tensor, win_start: Tensor, win_len: Tensor, one_sided: bool):
    """Pairs (a, b) from the windows (a, b in win_start[w] .. + win_len[w]) that pass a superset test of
    IoU > t': ``fa`` ``[5, Na]`` and ``fb`` ``[5, Nb]`` are :func:`_tile_features` columns.

    Windows are contiguous runs of ``fb``, so they are cut into rows of a fixed width K and tested on
    ``[rows, K]`` tiles gathered with ``unfold`` (contiguous copies, not per-element gathers). A
    negative y-overlap makes inter negative, which fails; in one-sided windows x1_a <= x1_b < x2_a,
    so the x-overlap min(x2_a, x2_b) - x1_b is positive without max and clamp. Slots past a
    window's end are dropped after the test (they may hold other categories or groups).
    """
    dev = fb.device
    empty = torch.empty(0, dtype=torch.int64, device=dev)
    # K minimises rows * (row overhead + K); widths are powers of two
    log_k = torch.tensor([k.bit_length() - 1 for k in _ROW_WIDTHS], device=dev)  # small copy
    rows_k = ((win_len[:, None] + (1 << log_k) - 1) >> log_k).sum(0)  # [len(widths)] rows needed
    k_i = int((rows_k * ((1 << log_k) + 16)).argmin())
    K, n_rows = _ROW_WIDTHS[k_i], int(rows_k[k_i])
    if n_rows == 0:
        return empty, empty
    shift = K.bit_length() - 1
    per_win = (win_len + K - 1) >> shift
    w_of_row = torch.repeat_interleave(torch.arange(win_len.numel(), device=dev), per_win, output_size=n_rows)
    j = torch.arange(n_rows, device=dev) - (per_win.cumsum(0) - per_win).index_select(0, w_of_row)
    row_a = win_a.index_select(0, w_of_row)  # [R] querying box
    row_start = win_start.index_select(0, w_of_row) + K * j  # [R] first candidate
    row_len = torch.clamp(win_len.index_select(0, w_of_row) - K * j, max=K)  # [R] valid slots

    fb = torch.cat([fb, fb.new_zeros(5, K)], 1)  # K empty boxes of padding: every row has K slots
    tiles = [f.unfold(0, K, 1) for f in fb]  # [Nb + 1, K] views: row p = boxes p .. p+K-1
    pa, pb = [], []
    step = max(1, _CHUNK_SLOTS // K)
    for r0 in range(0, n_rows, step):
        ra, rs, rl = row_a[r0 : r0 + step], row_start[r0 : r0 + step], row_len[r0 : r0 + step]
        ax1, ay1, ax2, ay2, a_sa = (f.index_select(0, ra)[:, None] for f in fa)  # [R, 1]
        bx1, by1, bx2, by2, b_sa = (u.index_select(0, rs) for u in tiles)  # [R, K]
        if one_sided:
            inter = torch.minimum(ax2, bx2).sub_(bx1)
        else:
            inter = torch.minimum(ax2, bx2).sub_(torch.maximum(ax1, bx1)).clamp_(min=0)
        inter.mul_(torch.minimum(ay2, by2).sub_(torch.maximum(ay1, by1)))
        hit = (inter > b_sa.add_(a_sa)).view(-1).nonzero().squeeze(1)
        r, k = hit >> shift, hit & (K - 1)
        inside = (k < rl.index_select(0, r)).nonzero().squeeze(1)
        r, k = r.index_select(0, inside), k.index_select(0, inside)
        pa.append(ra.index_select(0, r))
        pb.append(rs.index_select(0, r) + k)
    return torch.cat(pa), torch.cat(pb)


# ------------------------------------------------------------------------ dense (t < 0)


def _nms_dense(b: Tensor, order: Tensor, idxs: Tensor | None, t: float, beta: float, distance: bool) -> Tensor:
    """Greedy for a negative threshold, where disjoint boxes can suppress (or coordinates beyond
    2^900): all categories advance together, one kept box per category per round, each compared
    with the rest of its category. Exact for any threshold; one round per kept box of the largest
    category, memory O(N)."""
    n = b.shape[0]
    dev = b.device
    feat = b.index_select(0, order)  # [N, 4] in rank order
    if idxs is None:
        cls, nc = torch.zeros(n, dtype=torch.int64, device=dev), 1
    else:
        uniq, inv = torch.unique(idxs, return_inverse=True)
        cls, nc = inv.index_select(0, order), uniq.numel()
    thr = _exclusive_threshold(t, b.dtype)
    remaining = torch.ones(n, dtype=torch.bool, device=dev)
    kept = torch.zeros(n, dtype=torch.bool, device=dev)
    pos = torch.arange(n, device=dev)
    while True:
        rem = remaining.nonzero().squeeze(1)
        if rem.numel() == 0:
            break
        c = cls.index_select(0, rem)
        first = torch.full((nc,), n, dtype=torch.int64, device=dev).scatter_reduce_(0, c, pos[rem], "amin")
        pick = first.index_select(0, c)  # [R] the box each remaining box is compared with
        kept[first[first < n]] = True
        value = _suppression_value(feat.index_select(0, pick), feat.index_select(0, rem), beta, distance)
        remaining[rem[(value > thr) | (pick == rem)]] = False
    return order[kept]


# ------------------------------------------------------------------------------ C kernel

_BITS = {torch.float32: 32, torch.float64: 64}


def _native_nms(boxes: Tensor, scores: Tensor, idxs: Tensor | None, t: float, beta: float, distance: bool,
                weighted: bool):
    """Greedy (D)IoU-NMS by ``boxloss._nms_native`` on CPU tensors: ``(keep, merged boxes or None)``.

    float32/float64 scores are ranked in C (the order of ``torch.sort(descending=True,
    stable=True)``: NaN first, -0 == +0); other dtypes are ranked by ``torch.sort`` here."""
    b = _upcast(boxes).contiguous()
    n = b.shape[0]
    keep = torch.empty(n, dtype=torch.int64)
    s_bits = _BITS.get(scores.dtype, 0)
    if s_bits:
        s = scores.contiguous()
        s_ptr, order_ptr = s.data_ptr(), 0
    else:
        order = torch.sort(scores, descending=True, stable=True)[1]
        s_ptr, order_ptr = 0, order.data_ptr()
    c_ptr = 0
    if idxs is not None:
        c = idxs.contiguous() if idxs.dtype == torch.int64 else idxs.long()
        c_ptr = c.data_ptr()
    merged, w_bits, w_ptr, m_ptr = None, 0, 0, 0
    if weighted:
        w = s if s_bits else scores.double()
        merged = torch.empty(n, 4, dtype=b.dtype)
        w_bits, w_ptr, m_ptr = _BITS[w.dtype], w.data_ptr(), merged.data_ptr()
    k = _nms_native.nms(_BITS[b.dtype], b.data_ptr(), n, s_bits, s_ptr, order_ptr, c_ptr, t, beta, int(distance),
                        keep.data_ptr(), w_bits, w_ptr, m_ptr)
    return keep.resize_(k), (merged.resize_(k, 4) if weighted else None)


def _native_soft_nms(boxes, scores, idxs, method, sigma, iou_threshold, score_threshold, distance, beta):
    """Soft-NMS by ``boxloss._nms_native`` (a heap of current scores per category, and each selected
    box decays only the remaining boxes that overlap it, found as in greedy NMS)."""
    b = _upcast(boxes).contiguous()
    n = b.shape[0]
    s = scores.contiguous() if scores.dtype in _BITS else scores.double()
    c_ptr = 0
    if idxs is not None:
        c = idxs.contiguous() if idxs.dtype == torch.int64 else idxs.long()
        c_ptr = c.data_ptr()
    keep = torch.empty(n, dtype=torch.int64)
    new_scores = torch.empty(n, dtype=torch.float64)
    k = _nms_native.soft_nms(_BITS[b.dtype], b.data_ptr(), n, _BITS[s.dtype], s.data_ptr(), c_ptr,
                             SOFT_NMS_METHODS.index(method), sigma, iou_threshold, score_threshold, int(distance),
                             beta, keep.data_ptr(), new_scores.data_ptr())
    return keep.resize_(k), new_scores.resize_(k).to(_soft_score_dtype(scores.dtype))


def _soft_score_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------- torch weighted / Soft-NMS


def _weighted_torch(boxes: Tensor, scores: Tensor, idxs: Tensor | None, t: float, beta: float, distance: bool):
    """Weighted NMS with torch ops: the kept boxes of :func:`_nms`, then each suppressed box joins the
    best-ranked kept box of its category, ranked before it, whose value exceeds t (the box that
    suppressed it in the greedy pass), and the clusters are averaged in float64."""
    keep = _nms(boxes, scores, idxs, t, beta, distance)
    b = _upcast(boxes.detach())  # no gradient through the means, as in the C kernel
    n, k, dev = b.shape[0], keep.numel(), b.device
    if k == 0:
        return keep, b.new_empty(0, 4)
    rank = torch.empty(n, dtype=torch.int64, device=dev)
    rank[torch.sort(scores, descending=True, stable=True)[1]] = torch.arange(n, device=dev)
    kb, kr = b.index_select(0, keep), rank.index_select(0, keep)  # keep is in rank order
    kc = idxs.index_select(0, keep) if idxs is not None else None
    thr = _exclusive_threshold(t, b.dtype)
    owner = torch.empty(n, dtype=torch.int64, device=dev)  # position in keep of each box's cluster
    step = max(1, (1 << 22) // k)  # [K, step] value blocks
    for j0 in range(0, n, step):
        bj = b[j0 : j0 + step]
        hit = _suppression_value(kb[:, None], bj[None], beta, distance) > thr  # [K, J]
        hit &= kr[:, None] < rank[None, j0 : j0 + step]
        if kc is not None:
            hit &= kc[:, None] == idxs[None, j0 : j0 + step]
        owner[j0 : j0 + step] = hit.byte().argmax(0)  # first True: the best-ranked suppressor
    owner[keep] = torch.arange(k, device=dev)
    member = torch.ones(n, dtype=torch.bool, device=dev)
    member[keep] = False
    m = member.nonzero().squeeze(1)
    w = scores.detach().double()
    bd = b.double()
    om = owner.index_select(0, m)
    wm = w.index_select(0, m)
    acc = torch.zeros(k, 4, dtype=torch.float64, device=dev).index_add_(
        0, om, wm[:, None] * (bd.index_select(0, m) - bd.index_select(0, keep.index_select(0, om)))
    )
    total = w.index_select(0, keep).index_add(0, om, wm)
    count = torch.zeros(k, dtype=torch.int64, device=dev).index_add_(0, om, torch.ones_like(om))
    mean = (bd.index_select(0, keep) + acc / total[:, None]).to(b.dtype)
    return keep, torch.where(((count > 0) & (total != 0))[:, None], mean, kb)


def _soft_torch(boxes, scores, idxs, method, sigma, iou_threshold, score_threshold, distance, beta):
    """Soft-NMS with torch ops: all categories advance together, one selection per category per round
    (highest current score, ties by index), each decaying the rest of its category; one host sync per
    round. The selections are then ordered by (score at selection desc, index)."""
    b = _upcast(boxes.detach())
    n, dev = b.shape[0], b.device
    out_dtype = _soft_score_dtype(scores.dtype)
    cls = _compact_classes(idxs, n, dev)
    nc = int(cls.max()) + 1 if n else 0
    cur = scores.detach().double().clone()  # no gradient, as in the C kernel
    alive = cur >= score_threshold  # NaN: never selected
    picked, picked_score = [], []
    pos = torch.arange(n, device=dev)
    while True:
        rem = alive.nonzero().squeeze(1)
        if rem.numel() == 0:
            break
        c, s = cls.index_select(0, rem), cur.index_select(0, rem)
        best = torch.full((nc,), -math.inf, dtype=torch.float64, device=dev).scatter_reduce_(
            0, c, s, "amax", include_self=False
        )
        top = s == best.index_select(0, c)
        first = torch.full((nc,), n, dtype=torch.int64, device=dev).scatter_reduce_(
            0, c[top], pos.index_select(0, rem)[top], "amin"
        )
        sel = first[first < n]
        picked.append(sel)
        picked_score.append(cur.index_select(0, sel))
        alive[sel] = False
        rem = alive.nonzero().squeeze(1)
        if rem.numel() == 0:
            break
        pick = first.index_select(0, cls.index_select(0, rem))  # the selected box of each one's category
        o = _suppression_value(b.index_select(0, pick), b.index_select(0, rem), beta, distance).double()
        o = torch.where(o > 0, o.clamp(max=1), 0.0)  # NaN (two empty boxes) -> 0
        if method == "gaussian":
            f = torch.exp(-(o * o) / sigma)
        else:
            f = torch.where(o >= iou_threshold, 1 - o, 1.0)
        s = cur.index_select(0, rem) * f
        cur.index_copy_(0, rem, s)
        alive.index_copy_(0, rem, s >= score_threshold)
    if not picked:
        return torch.empty(0, dtype=torch.int64, device=dev), torch.empty(0, dtype=out_dtype, device=dev)
    keep, kept_scores = torch.cat(picked), torch.cat(picked_score)  # by round
    return _merge_runs(keep, kept_scores, cls.index_select(0, keep), out_dtype)


def _merge_runs(keep: Tensor, kept_scores: Tensor, kc: Tensor, out_dtype: torch.dtype):
    """Order the categories' Soft-NMS runs (``keep`` by round, category ``kc``) as one run over all
    categories, which at each step takes the best next selection of any category.

    A run's keys (score at selection desc, index) decrease, except where a decay raised a negative
    score; such a box is taken right after the box of its run with the lowest key so far, so the
    order is by that running minimum, then by position in the run."""
    m = keep.numel()
    by_index = torch.sort(keep)[1]
    by_key = by_index.index_select(0, torch.sort(kept_scores.index_select(0, by_index), descending=True,
                                                 stable=True)[1])
    key_rank = torch.empty(m, dtype=torch.int64, device=keep.device)
    key_rank[by_key] = torch.arange(m, device=keep.device)  # 0: the best key
    by_run = torch.sort(kc, stable=True)[1]  # category-major, each run in round order
    c = kc.index_select(0, by_run)
    # running maximum of the rank within each category: offsets by category make it reset per run
    worst = torch.cummax(key_rank.index_select(0, by_run) + c * m, 0)[0] - c * m
    order = by_run.index_select(0, torch.sort(worst, stable=True)[1])
    return keep.index_select(0, order), kept_scores.index_select(0, order).to(out_dtype)
