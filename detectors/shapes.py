"""The built-in dataset: coloured shapes on textured backgrounds, written as COCO-format files.

Deterministic for a seed: the same arguments give byte-identical PNGs and JSON. Each split is a
folder of PNGs plus ``annotations/instances_{split}.json`` so every COCO tool works on it.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .fileio import atomic_json, atomic_write

__all__ = ["SHAPE_CLASSES", "make_shapes", "ensure_shapes"]

SHAPE_CLASSES = ("rectangle", "ellipse", "triangle", "cross")


def _background(rng: np.random.RandomState, size: int) -> Image.Image:
    """Low-frequency colour noise + a gradient + fine grain: texture, not a flat colour."""
    coarse = rng.uniform(40, 150, (4, 4, 3)).astype(np.uint8)
    img = Image.fromarray(coarse).resize((size, size), Image.BICUBIC)
    arr = np.asarray(img, np.float32)
    ramp = np.linspace(-25, 25, size, dtype=np.float32)
    arr += ramp[None, :, None] if rng.rand() < 0.5 else ramp[:, None, None]
    arr += rng.normal(0, 10, arr.shape).astype(np.float32)
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def _colour(rng: np.random.RandomState) -> tuple[int, int, int]:
    """A saturated colour that stands out from the mid-grey backgrounds."""
    c = rng.uniform(0, 1, 3)
    c = (c - c.min()) / max(c.max() - c.min(), 1e-6)  # stretch to full saturation
    bright = rng.rand() < 0.75
    c = 150 + 105 * c if bright else 20 * c
    return tuple(int(v) for v in c)


def _iou(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _draw(draw: ImageDraw.ImageDraw, cls: int, box, colour) -> None:
    x1, y1, x2, y2 = box
    if cls == 0:
        draw.rectangle([x1, y1, x2 - 1, y2 - 1], fill=colour)
    elif cls == 1:
        draw.ellipse([x1, y1, x2 - 1, y2 - 1], fill=colour)
    elif cls == 2:
        draw.polygon([((x1 + x2) / 2, y1), (x2 - 1, y2 - 1), (x1, y2 - 1)], fill=colour)
    else:
        tw, th = max(2, (x2 - x1) // 3), max(2, (y2 - y1) // 3)
        cx, cy = (x1 + x2) // 2, (y1 + y2) // 2
        draw.rectangle([cx - tw // 2, y1, cx + (tw - tw // 2) - 1, y2 - 1], fill=colour)
        draw.rectangle([x1, cy - th // 2, x2 - 1, cy + (th - th // 2) - 1], fill=colour)


def _image(rng: np.random.RandomState, size: int, max_objects: int, min_frac: float, max_frac: float):
    img = _background(rng, size)
    draw = ImageDraw.Draw(img)
    objects = []
    for _ in range(rng.randint(1, max_objects + 1)):
        for _attempt in range(20):
            area = (rng.uniform(min_frac, max_frac) * size) ** 2
            ratio = np.exp(rng.uniform(np.log(1 / 3), np.log(3)))  # w / h
            w = int(round(min(size * 0.9, np.sqrt(area * ratio))))
            h = int(round(min(size * 0.9, np.sqrt(area / ratio))))
            if w < 6 or h < 6:
                continue
            x1, y1 = rng.randint(0, size - w + 1), rng.randint(0, size - h + 1)
            box = (x1, y1, x1 + w, y1 + h)
            # overlaps allowed, but each object stays mostly visible
            if all(_iou(box, o[1]) < 0.3 for o in objects):
                objects.append((rng.randint(len(SHAPE_CLASSES)), box, _colour(rng)))
                break
    for cls, box, colour in objects:
        _draw(draw, cls, box, colour)
    if rng.rand() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(0.6))
    return img, objects


def make_shapes(
    root: str,
    *,
    num_train: int = 800,
    num_val: int = 200,
    image_size: int = 128,
    max_objects: int = 4,
    min_frac: float = 0.12,
    max_frac: float = 0.5,
    seed: int = 0,
) -> dict[str, str]:
    """Write the shapes dataset under ``root``; returns ``{split: annotation file}``.

    Layout: ``root/{train,val}/*.png`` and ``root/annotations/instances_{train,val}.json``.
    Object sides are drawn from ``sqrt(area)`` in [min_frac, max_frac] x image size with aspect
    ratios 1:3 to 3:1; up to ``max_objects`` per image with pairwise IoU < 0.3. The JSON is written
    last and atomically, so its presence means the split is complete.
    """
    for name, value in (("num_train", num_train), ("num_val", num_val), ("image_size", image_size),
                        ("max_objects", max_objects)):
        if not isinstance(value, int) or value < (0 if name.startswith("num") else 1):
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32, got {image_size}")
    if not 0 < min_frac <= max_frac < 1:
        raise ValueError(f"need 0 < min_frac <= max_frac < 1, got {min_frac} and {max_frac}")
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    out = {}
    for split, count, split_seed in (("train", num_train, seed), ("val", num_val, seed + 1_000_003)):
        rng = np.random.RandomState(split_seed)
        os.makedirs(os.path.join(root, split), exist_ok=True)
        images, annotations = [], []
        for i in range(count):
            img, objects = _image(rng, image_size, max_objects, min_frac, max_frac)
            file_name = f"{i:06d}.png"
            atomic_write(os.path.join(root, split, file_name), lambda p, im=img: im.save(p, format="PNG"))
            images.append({"id": i + 1, "file_name": file_name, "width": image_size, "height": image_size})
            for cls, (x1, y1, x2, y2), _ in objects:
                annotations.append({
                    "id": len(annotations) + 1, "image_id": i + 1, "category_id": cls + 1,
                    "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0,
                })
        dataset = {
            "info": {"description": "boxloss shapes", "seed": seed, "image_size": image_size},
            "images": images,
            "annotations": annotations,
            "categories": [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(SHAPE_CLASSES)],
        }
        ann_file = os.path.join(root, "annotations", f"instances_{split}.json")

        atomic_json(ann_file, dataset)
        out[split] = ann_file
    return out


def ensure_shapes(root: str, **kwargs) -> dict[str, str]:
    """Generate the shapes dataset under ``root`` unless both annotation files already exist."""
    files = {s: os.path.join(root, "annotations", f"instances_{s}.json") for s in ("train", "val")}
    if all(os.path.isfile(f) for f in files.values()):
        return files
    return make_shapes(root, **kwargs)
