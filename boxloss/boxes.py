"""Box formats, areas and the IoU family (IoU, GIoU, DIoU, CIoU), pairwise and for matched pairs.

Boxes are ``(x1, y1, x2, y2)`` in absolute units with no "+1" pixel convention, as in torchvision,
detectron2, MMDetection >= 2 and pycocotools. Float16/bfloat16 and integer boxes are computed in
float32; float64 stays float64.

Two shapes of result:

* pairwise ``[N, M]`` for two sets of boxes (``box_iou``, ``generalized_box_iou``, ...), with the same
  names, arguments and values as ``torchvision.ops``;
* matched pairs ``[...]`` for boxes ``[..., 4]`` of the same shape (``matched_box_iou``, ...), the
  form a loss needs.

Both are the same formula (:func:`_iou_family`) applied with broadcasting.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "box_convert",
    "box_area",
    "check_boxes",
    "box_iou",
    "generalized_box_iou",
    "distance_box_iou",
    "complete_box_iou",
    "matched_box_iou",
    "matched_generalized_box_iou",
    "matched_distance_box_iou",
    "matched_complete_box_iou",
]

_FORMATS = ("xyxy", "xywh", "cxcywh")


def _upcast(t: Tensor) -> Tensor:
    """Half precision and integers are computed in float32; float32/float64 are kept."""
    if t.dtype in (torch.float32, torch.float64):
        return t
    return t.float()


def _check_box_tensor(name: str, boxes: object) -> Tensor:
    if not isinstance(boxes, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(boxes).__name__}")
    if boxes.dim() == 0 or boxes.shape[-1] != 4:
        raise ValueError(f"{name} must have shape [..., 4], got {tuple(boxes.shape)}")
    return boxes


def _check_eps(eps: float) -> None:
    # eps = 0 turns the 0 / 0 of two identical empty boxes into NaN
    if not (isinstance(eps, (int, float)) and eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")


def _size(d: Tensor) -> Tensor:
    """A width or height ``hi - lo`` clamped at 0, differentiable at exactly 0 (gradient 1 there).

    The gradient at 0 is the one-sided derivative from above, the one that lets a collapsed box
    grow back (``clamp(min=0)`` passes none at 0, which leaves a zero-height box stuck); it is
    also torchvision's, which does not clamp. Inverted sides (< 0) get zero area and no gradient.
    """
    return torch.where(d < 0, 0.0, d)


def box_convert(boxes: Tensor, in_fmt: str, out_fmt: str) -> Tensor:
    """Convert boxes between ``xyxy``, ``xywh`` (top-left corner, size) and ``cxcywh`` (centre, size).

    Args:
        boxes: ``[..., 4]`` boxes in ``in_fmt``.
        in_fmt: one of ``"xyxy"``, ``"xywh"``, ``"cxcywh"``.
        out_fmt: one of ``"xyxy"``, ``"xywh"``, ``"cxcywh"``.

    Returns:
        ``[..., 4]`` boxes in ``out_fmt`` (same dtype; a new tensor even when the formats agree).
    """
    _check_box_tensor("boxes", boxes)
    for arg, fmt in (("in_fmt", in_fmt), ("out_fmt", out_fmt)):
        if fmt not in _FORMATS:
            raise ValueError(f"{arg} must be one of {_FORMATS}, got {fmt!r}")
    if in_fmt == out_fmt:
        return boxes.clone()
    a, b, c, d = boxes.unbind(-1)
    if in_fmt == "xywh":
        x1, y1, x2, y2 = a, b, a + c, b + d
    elif in_fmt == "cxcywh":
        x1, y1, x2, y2 = a - 0.5 * c, b - 0.5 * d, a + 0.5 * c, b + 0.5 * d
    else:
        x1, y1, x2, y2 = a, b, c, d
    if out_fmt == "xyxy":
        out = (x1, y1, x2, y2)
    elif out_fmt == "xywh":
        out = (x1, y1, x2 - x1, y2 - y1)
    else:
        out = ((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1)
    return torch.stack(out, dim=-1)


def box_area(boxes: Tensor) -> Tensor:
    """Area of ``[..., 4]`` xyxy boxes, ``[...]``; inverted sides (x2 < x1) count as zero width."""
    boxes = _upcast(_check_box_tensor("boxes", boxes))
    wh = _size(boxes[..., 2:] - boxes[..., :2])  # [..., 2]
    return wh[..., 0] * wh[..., 1]


def check_boxes(boxes: Tensor, name: str = "boxes") -> Tensor:
    """Validate xyxy boxes for callers at the point where data enters (not inside losses).

    Raises a ``ValueError`` naming ``name`` when the shape is not ``[..., 4]``, when a coordinate is
    not finite, or when a box has x2 < x1 or y2 < y1 (reporting the first offending box). Returns
    ``boxes`` unchanged. This reads values, so on CUDA it synchronises: keep it out of hot loops.
    """
    _check_box_tensor(name, boxes)
    if boxes.is_floating_point():
        bad = ~torch.isfinite(boxes).all(dim=-1)
        if bad.any():
            idx = tuple(bad.nonzero()[0].tolist())
            raise ValueError(f"{name}{list(idx)} has a non-finite coordinate: {boxes[idx].tolist()}")
    inverted = (boxes[..., 2] < boxes[..., 0]) | (boxes[..., 3] < boxes[..., 1])
    if inverted.any():
        idx = tuple(inverted.nonzero()[0].tolist())
        raise ValueError(
            f"{name}{list(idx)} = {boxes[idx].tolist()} is not (x1, y1, x2, y2) with x2 >= x1 and y2 >= y1"
        )
    return boxes


def _iou_family(
    boxes1: Tensor, boxes2: Tensor, kind: str, eps: float, *, pairwise: bool, ciou_alpha: str = "standard"
) -> tuple[Tensor, Tensor]:
    """The IoU-family metric of ``boxes1`` (prediction) against ``boxes2`` (target), broadcast.

    Returns ``(metric, iou)``. The primitives mirror ``torchvision.ops`` one for one (``torch.max`` /
    ``torch.min`` on columns, so ties split the gradient evenly as there), so values *and* gradients
    agree with torchvision on non-degenerate boxes. Two places differ from torchvision on purpose,
    for degenerate boxes only: widths and heights are clamped at 0 (areas and the CIoU aspect term;
    at exactly 0 with the derivative from above, see :func:`_size`), and the aspect term's angle is
    ``atan2(w, h)``, torchvision's ``atan(w / h)`` where h > 0 and finite (pi/2) at h = 0.

    ``pairwise`` selects torchvision's pairwise eps placement (IoU and GIoU without eps in the
    division, intersection clamped at 0) versus its loss placement (``inter / (union + eps)``,
    ``(C - U) / (C + eps)``, intersection only where both sides are > 0, so touching boxes get a
    zero intersection gradient as in torchvision's losses).
    """
    x1, y1, x2, y2 = boxes1.unbind(-1)
    x1g, y1g, x2g, y2g = boxes2.unbind(-1)
    w1, h1 = _size(x2 - x1), _size(y2 - y1)
    w2, h2 = _size(x2g - x1g), _size(y2g - y1g)

    iw = torch.min(x2, x2g) - torch.max(x1, x1g)
    ih = torch.min(y2, y2g) - torch.max(y1, y1g)
    if pairwise:
        inter = iw.clamp(min=0) * ih.clamp(min=0)
    else:
        # where, not clamp: clamp passes the gradient at exactly 0 (touching boxes)
        inter = torch.where((iw > 0) & (ih > 0), iw * ih, torch.zeros_like(iw))
    union = w1 * h1 + w2 * h2 - inter
    # pairwise: torchvision divides without eps; a clamp at the smallest normal number only acts
    # where union == 0 (two empty boxes), which would otherwise give 0 / 0 = NaN
    tiny = torch.finfo(union.dtype).tiny
    iou = inter / union.clamp(min=tiny) if pairwise else inter / (union + eps)
    if kind == "iou":
        return iou, iou

    # smallest enclosing box C
    cw = torch.max(x2, x2g) - torch.min(x1, x1g)
    ch = torch.max(y2, y2g) - torch.min(y1, y1g)
    if kind == "giou":
        area_c = cw * ch
        area_c_eps = area_c.clamp(min=tiny) if pairwise else area_c + eps
        return iou - (area_c - union) / area_c_eps, iou

    c2 = cw**2 + ch**2 + eps  # squared diagonal of C (eq. 6 of the DIoU paper)
    rho2 = ((x1 + x2 - x1g - x2g) / 2) ** 2 + ((y1 + y2 - y1g - y2g) / 2) ** 2  # squared centre distance
    diou = iou - rho2 / c2
    if kind == "diou":
        return diou, iou

    v = _aspect_v(w1, h1, w2, h2)
    with torch.no_grad():  # alpha is a weight, not differentiated (the paper's implementation)
        alpha = v / (1 - iou + v + eps)
        if ciou_alpha == "gated":  # MMDetection: only for IoU > 0.5
            alpha = alpha * (iou > 0.5).to(alpha.dtype)
    return diou - alpha * v, iou


def _aspect_angle(w: Tensor, h: Tensor) -> Tensor:
    """atan2(w, h) of clamped sizes (w, h >= 0): pi/2 at h = 0, 0 for a point (w = h = 0).

    No eps: atan(w / (h + eps)) moves the angle by about eps / h, 1e-5 of it for the sides of 1e-2
    that image-normalised boxes have. Where h > 0 the value is torchvision's ``atan(w / h)``, the
    very bits of the kernels (``_kernels._angles``); at h = 0 it is pi/2 - atan(h / w), whose
    derivative (0, -1 / w) is atan2's (h, -w) / (w^2 + h^2) there, where atan(w / h) would give
    atan'(inf) * d(w/h)/dh = 0 * inf = NaN. A point gets no gradient (atan2 is 0 / 0 there). The
    ``where`` guards keep the branch not taken finite, so its zero gradient stays zero, not NaN.
    """
    upright = h > 0
    lying = ~upright & (w > 0)  # h = 0 (or -0.0)
    across = torch.atan(w / torch.where(upright, h, 1.0))
    along = math.pi / 2 - torch.atan(h / torch.where(lying, w, 1.0))
    return torch.where(upright, across, torch.where(lying, along, 0.0))


def _aspect_v(w1: Tensor, h1: Tensor, w2: Tensor, h2: Tensor) -> Tensor:
    """CIoU's aspect-ratio consistency v = 4/pi^2 (atan(w2/h2) - atan(w1/h1))^2, angles by atan2."""
    return (4 / math.pi**2) * (_aspect_angle(w2, h2) - _aspect_angle(w1, h1)) ** 2


def _pairwise(kind: str, boxes1: Tensor, boxes2: Tensor, eps: float | None) -> Tensor:
    """``eps`` None: IoU and GIoU, which divide without one (torchvision's pairwise functions)."""
    for name, b in (("boxes1", boxes1), ("boxes2", boxes2)):
        _check_box_tensor(name, b)
        if b.dim() != 2:
            raise ValueError(f"{name} must have shape [N, 4], got {tuple(b.shape)}")
    if eps is None:
        eps = 0.0  # unused by the pairwise IoU and GIoU
    else:
        _check_eps(eps)
    b1, b2 = _upcast(boxes1), _upcast(boxes2)
    if b1.dtype != b2.dtype:
        b1, b2 = b1.to(torch.promote_types(b1.dtype, b2.dtype)), b2.to(torch.promote_types(b1.dtype, b2.dtype))
    return _iou_family(b1[:, None, :], b2[None, :, :], kind, eps, pairwise=True)[0]


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise IoU ``[N, M]`` of xyxy boxes ``[N, 4]`` and ``[M, 4]`` (as ``torchvision.ops.box_iou``)."""
    return _pairwise("iou", boxes1, boxes2, None)


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise GIoU ``[N, M]`` in [-1, 1]: IoU - (|C| - U) / |C|, C the smallest enclosing box.

    Reference: Rezatofighi et al., "Generalized Intersection over Union", CVPR 2019, arXiv:1902.09630.
    """
    return _pairwise("giou", boxes1, boxes2, None)


def distance_box_iou(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-7) -> Tensor:
    """Pairwise DIoU ``[N, M]`` in [-1, 1]: IoU - rho^2 / (c^2 + eps), rho the centre distance and c
    the diagonal of the enclosing box.

    Reference: Zheng et al., "Distance-IoU Loss", AAAI 2020, arXiv:1911.08287.
    """
    return _pairwise("diou", boxes1, boxes2, eps)


def complete_box_iou(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-7) -> Tensor:
    """Pairwise CIoU ``[N, M]``: DIoU - alpha * v, v = 4/pi^2 (atan(w2/h2) - atan(w1/h1))^2,
    alpha = v / (1 - IoU + v + eps) held constant (no gradient), as torchvision. The angles are
    ``atan2(w, h)``: torchvision's values where h > 0, finite at h = 0.

    Reference: Zheng et al., "Distance-IoU Loss", AAAI 2020, arXiv:1911.08287.
    """
    return _pairwise("ciou", boxes1, boxes2, eps)


def _matched(kind: str, boxes1: Tensor, boxes2: Tensor, eps: float) -> Tensor:
    _check_box_tensor("boxes1", boxes1)
    _check_box_tensor("boxes2", boxes2)
    if boxes1.shape != boxes2.shape:
        raise ValueError(
            f"boxes1 and boxes2 must have the same shape, got {tuple(boxes1.shape)} and {tuple(boxes2.shape)}"
        )
    _check_eps(eps)
    b1, b2 = _upcast(boxes1), _upcast(boxes2)
    if b1.dtype != b2.dtype:
        dtype = torch.promote_types(b1.dtype, b2.dtype)
        b1, b2 = b1.to(dtype), b2.to(dtype)
    return _iou_family(b1, b2, kind, eps, pairwise=False)[0]


def matched_box_iou(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-7) -> Tensor:
    """IoU of matched pairs: ``[..., 4]`` x ``[..., 4]`` -> ``[...]``, intersection / (union + eps)."""
    return _matched("iou", boxes1, boxes2, eps)


def matched_generalized_box_iou(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-7) -> Tensor:
    """GIoU of matched pairs ``[...]`` (see :func:`generalized_box_iou`)."""
    return _matched("giou", boxes1, boxes2, eps)


def matched_distance_box_iou(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-7) -> Tensor:
    """DIoU of matched pairs ``[...]`` (see :func:`distance_box_iou`)."""
    return _matched("diou", boxes1, boxes2, eps)


def matched_complete_box_iou(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-7) -> Tensor:
    """CIoU of matched pairs ``[...]`` (see :func:`complete_box_iou`)."""
    return _matched("ciou", boxes1, boxes2, eps)
