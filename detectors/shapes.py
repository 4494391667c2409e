"""The built-in dataset: coloured shapes on textured backgrounds, written as COCO-format files.

Deterministic for a seed: the same arguments give byte-identical PNGs and JSON. Each split is a
folder of PNGs plus ``annotations/instances_{split}.json`` so every COCO tool works on it.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .errors import OptionError
from .fileio import atomic_json, current_umask

__all__ = ["SHAPE_CLASSES", "make_shapes", "ensure_shapes", "shapes_exist"]

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


def _crowded_image(rng: np.random.RandomState, size: int, max_objects: int, min_frac: float, max_frac: float):
    """Rows of same-class objects side by side, neighbours overlapping with IoU 0.1-0.6 (the case
    DIoU-NMS is for: a plain NMS at 0.5 merges the most overlapping neighbours). Each object has
    its own colour and a dark outline, so overlapping instances stay distinguishable by eye."""
    img = _background(rng, size)
    draw = ImageDraw.Draw(img)
    objects = []
    for _group in range(rng.randint(1, 3)):
        cls = rng.randint(len(SHAPE_CLASSES))
        side = rng.uniform(min_frac, max_frac) * size
        ratio = np.exp(rng.uniform(np.log(1 / 2), np.log(2)))
        w, h = max(8, int(round(side * np.sqrt(ratio)))), max(8, int(round(side / np.sqrt(ratio))))
        count = rng.randint(2, max(3, max_objects // 2) + 1)
        x = rng.randint(0, max(1, size // 4))
        y = rng.randint(0, size - h + 1)
        for _ in range(count):
            if x + w > size or len(objects) >= max_objects:
                break
            box = (x, y, x + w, y + h)
            if all(_iou(box, o[1]) <= 0.6 for o in objects):
                objects.append((cls, box, _colour(rng)))
            iou = rng.uniform(0.1, 0.6)  # with the next neighbour, same size: IoU = (w - dx) / (w + dx)
            x += max(2, int(round(w * (1 - iou) / (1 + iou))))
            y = int(np.clip(y + rng.randint(-h // 8, h // 8 + 1), 0, size - h))
    for cls, box, colour in objects:
        _draw(draw, cls, box, colour)
        x1, y1, x2, y2 = box
        draw.rectangle([x1, y1, x2 - 1, y2 - 1], outline=(10, 10, 10))
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
    crowded: bool = False,
) -> dict[str, str]:
    """Write the shapes dataset under ``root``; returns ``{split: annotation file}``.

    Layout: ``root/{train,val}/*.png`` and ``root/annotations/instances_{train,val}.json``.
    Object sides are drawn from ``sqrt(area)`` in [min_frac, max_frac] x image size with aspect
    ratios 1:3 to 3:1; up to ``max_objects`` per image with pairwise IoU < 0.3. ``crowded=True``
    draws rows of same-class objects side by side instead, neighbours overlapping with IoU up to
    0.6 (use ``max_objects`` of about 12 and ``max_frac`` of about 0.3).

    Everything is written into a temporary folder beside ``root`` and moved into place at the end,
    so a failed or killed run leaves no half-written dataset; the annotation files are moved last.
    """
    for name, value in (("num_train", num_train), ("num_val", num_val), ("image_size", image_size),
                        ("max_objects", max_objects)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name.startswith("num") else 1):
            raise OptionError(f"{name} must be a non-negative integer, got {value!r}")
    if image_size < 32:
        raise OptionError(f"image_size must be >= 32, got {image_size}")
    if not 0 < min_frac <= max_frac < 1:
        raise OptionError(f"need 0 < min_frac <= max_frac < 1, got {min_frac} and {max_frac}")
    draw_image = _crowded_image if crowded else _image
    root = os.path.abspath(root)
    parent = os.path.dirname(root)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(root)}.partial-")
    try:
        os.chmod(staging, 0o777 & ~current_umask())  # mkdtemp makes it 0700
        os.makedirs(os.path.join(staging, "annotations"))
        datasets = {}
        for split, count, split_seed in (("train", num_train, seed), ("val", num_val, seed + 1_000_003)):
            rng = np.random.RandomState(split_seed)
            os.makedirs(os.path.join(staging, split))
            images, annotations = [], []
            for i in range(count):
                img, objects = draw_image(rng, image_size, max_objects, min_frac, max_frac)
                file_name = f"{i:06d}.png"
                img.save(os.path.join(staging, split, file_name), format="PNG")
                images.append({"id": i + 1, "file_name": file_name, "width": image_size, "height": image_size})
                for cls, (x1, y1, x2, y2), _ in objects:
                    annotations.append({
                        "id": len(annotations) + 1, "image_id": i + 1, "category_id": cls + 1,
                        "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0,
                    })
            datasets[split] = {
                "info": {"description": "boxloss shapes" + (" (crowded)" if crowded else ""), "seed": seed,
                         "image_size": image_size},
                "images": images,
                "annotations": annotations,
                "categories": [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(SHAPE_CLASSES)],
            }
        os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
        out = {}
        for split, dataset in datasets.items():
            ann_file = os.path.join(root, "annotations", f"instances_{split}.json")
            if os.path.exists(ann_file):  # the old annotations go first: images and JSON never disagree
                os.remove(ann_file)
        for split, dataset in datasets.items():
            target = os.path.join(root, split)
            if os.path.isdir(target):
                shutil.rmtree(target)
            os.replace(os.path.join(staging, split), target)
        for split, dataset in datasets.items():
            ann_file = os.path.join(root, "annotations", f"instances_{split}.json")
            atomic_json(ann_file, dataset)
            out[split] = ann_file
        return out
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def shapes_exist(root: str) -> bool:
    """Whether both annotation files of a generated shapes dataset are under ``root``."""
    return all(os.path.isfile(os.path.join(root, "annotations", f"instances_{s}.json")) for s in ("train", "val"))


def ensure_shapes(root: str, **kwargs) -> dict[str, str]:
    """Generate the shapes dataset under ``root`` unless both annotation files already exist."""
    if shapes_exist(root):
        return {s: os.path.join(root, "annotations", f"instances_{s}.json") for s in ("train", "val")}
    return make_shapes(root, **kwargs)
