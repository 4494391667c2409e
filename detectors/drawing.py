"""Drawing boxes on images, shared by ``tools/visualize.py`` and the TensorBoard hook
(:class:`detectors.engine.DetectionImagesHook`): ground truth dashed, detections solid with
"class score" tags placed so they do not cover each other, colours per class or per kind of error.
Needs Pillow only (a torchvision dependency).
"""

from __future__ import annotations

import math

__all__ = ["PALETTE", "ERROR_STYLE", "class_colours", "font", "text_size", "dashed_rectangle", "draw_image", "render"]

# tab10: distinct, and readable with black or white text
PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))
ERROR_STYLE = {  # kind: (colour, legend text)
    "tp": ((0, 200, 60), "true positive"),
    "duplicate": ((255, 160, 0), "duplicate"),
    "wrong_class": ((230, 0, 230), "wrong class"),
    "background": ((235, 30, 30), "background"),
    "crowd": ((170, 170, 170), "in a crowd region (ignored)"),
    "missed": ((0, 170, 255), "missed ground truth"),
}
SHORT = {"tp": "TP", "duplicate": "dup", "wrong_class": "wrong", "background": "bg", "crowd": "crowd"}


# --------------------------------------------------------------------------- drawing


def font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType: a scalable font
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def _ink(colour) -> tuple[int, int, int]:
    """Black or white, whichever reads better on ``colour``."""
    r, g, b = colour
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 140 else (255, 255, 255)


def dashed_rectangle(draw, box, colour, width: int, dash: float = 9, gap: float = 6) -> None:
    x1, y1, x2, y2 = box
    for ax, ay, bx, by in ((x1, y1, x2, y1), (x2, y1, x2, y2), (x2, y2, x1, y2), (x1, y2, x1, y1)):
        length = math.hypot(bx - ax, by - ay)
        t = 0.0
        while t < length:
            t2 = min(t + dash, length)
            draw.line([(ax + (bx - ax) * t / length, ay + (by - ay) * t / length),
                       (ax + (bx - ax) * t2 / length, ay + (by - ay) * t2 / length)], fill=colour, width=width)
            t += dash + gap


def text_size(draw, text: str, font) -> tuple[int, int, int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return left, top, right - left, bottom - top


def _place_labels(draw, labels: list, font, image_size) -> None:
    """Draw filled tags ``(x, y, text, colour, above)`` at a box corner, in the given order (most
    important first), each moved down past the tags already placed that it would cover."""
    placed = []
    pad = 2
    W, H = image_size
    for x, y, text, colour, above in labels:
        left, top, w, h = text_size(draw, text, font)
        w, h = w + 2 * pad, h + 2 * pad
        x = min(max(0, x), max(0, W - w))
        y = (y - h if y - h >= 0 else y) if above else min(y, H - h)
        for _ in range(12):  # a few tries; past them, overlap rather than wander off
            hit = next((r for r in placed if x < r[2] and r[0] < x + w and y < r[3] and r[1] < y + h), None)
            if hit is None:
                break
            y = hit[3] if hit[3] + h <= H else max(0, hit[1] - h)
        placed.append((x, y, x + w, y + h))
        draw.rectangle([x, y, x + w, y + h], fill=colour)
        draw.text((x + pad - left, y + pad - top), text, fill=_ink(colour), font=font)


def draw_image(image, gt, dets, *, names: dict, colours: dict, scale: float, font, match=None):
    """Draw on ``image`` (already resized by ``scale``): ground truth dashed, detections solid.

    ``gt = (boxes [G, 4] xyxy, category ids [G], crowd [G])`` and ``dets = (boxes, scores, category
    ids)`` in original pixels; ``match`` (a :class:`~detectors.evaluation.ImageMatch` of these
    detections) colours them by kind instead of by class. Returns the legend items used:
    ``{key: [colour, text, dashed, count]}`` (per-image counts of boxes or detections).
    """
    from PIL import ImageDraw

    draw = ImageDraw.Draw(image)
    width = max(2, round(font.size / 6)) if hasattr(font, "size") else 2
    legend: dict = {}
    gt_tags, det_tags = [], []  # drawn after every box, so no box hides a tag
    gt_boxes, gt_cats, gt_crowd = gt
    for g, (box, cat) in enumerate(zip(gt_boxes * scale, gt_cats)):
        if match is None:
            colour, text = colours[cat], names[cat]
            legend.setdefault(("class", cat), [colour, names[cat], False, 0])[3] += 1
        elif gt_crowd[g]:
            colour, text = ERROR_STYLE["crowd"][0], f"crowd: {names[cat]}"
        elif match.gt_matched[g]:
            colour, text = (235, 235, 235), None  # found: a light outline, the detection carries the tag
        else:
            colour, text = ERROR_STYLE["missed"][0], f"missed: {names[cat]}"
            legend.setdefault("missed", [colour, ERROR_STYLE["missed"][1], True, 0])[3] += 1
        dashed_rectangle(draw, box.tolist(), colour, max(1, width - 1) if text is None else width)
        if text is not None:
            gt_tags.append((box[0], box[3], text, colour, False))
    det_boxes, scores, det_cats = dets
    for d in sorted(range(len(scores)), key=lambda i: scores[i]):  # the best detections on top
        box, cat = det_boxes[d] * scale, det_cats[d]
        text = f"{names[cat]} {scores[d]:.2f}"
        if match is None:
            colour = colours[cat]
            legend.setdefault(("class", cat), [colour, names[cat], False, 0])
        else:
            kind = match.kinds[d]
            colour = ERROR_STYLE[kind][0]
            if kind == "wrong_class":
                text += f" (is {names[gt_cats[match.det_gt[d]]]})"
            text = f"{SHORT[kind]}: {text}"
            legend.setdefault(kind, [colour, ERROR_STYLE[kind][1], False, 0])[3] += 1
        draw.rectangle(box.tolist(), outline=colour, width=width)
        det_tags.append((box[0], box[1], text, colour, True))
    # the best detections' tags first, then the lower ones, then the ground truth's
    _place_labels(draw, det_tags[::-1] + gt_tags, font, image.size)
    return legend


def class_colours(cat_ids) -> dict:
    """``{category id: colour}``, in the order of ``cat_ids`` (sorted ids: the same colour everywhere)."""
    return {c: PALETTE[i % len(PALETTE)] for i, c in enumerate(cat_ids)}


def render(image_path: str, gt, dets, *, names: dict, colours: dict, size: int, match=None):
    """Open an image, scale its longer side to ``size`` and :func:`draw_image` on it; returns
    ``(PIL image, legend)``. Enlarged images keep their pixels as blocks (the pixels the model saw,
    and PNGs a fifth the size); shrunk ones are resampled smoothly."""
    from PIL import Image

    with Image.open(image_path) as im:
        image = im.convert("RGB")
    scale = size / max(image.size)
    image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                         Image.NEAREST if scale > 1 else Image.LANCZOS)
    legend = draw_image(image, gt, dets, names=names, colours=colours, scale=scale, font=font(max(11, size // 30)),
                        match=match)
    return image, legend
