"""COCO-format detection data: a validated pycocotools dataset, joint transforms and the collate.

Images come out as float tensors ``[3, H, W]`` in [0, 1] (the detectors normalise and resize
themselves), targets as dicts with ``boxes`` (``[K, 4]`` xyxy float32, absolute pixels),
``labels`` (``[K]`` int64, contiguous 1..C; 0 is background as in torchvision), ``image_id`` (the
COCO id), ``orig_size`` (H, W) and ``scale`` (the resize factor applied by the transforms, so
detections can be mapped back to the original image).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import random
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .errors import DataError, DataNotFoundError

__all__ = [
    "CocoDetection",
    "Compose",
    "RandomHorizontalFlip",
    "Resize",
    "detection_collate",
    "validate_coco_annotations",
    "AnnotationError",
]


class AnnotationError(DataError):
    """An annotation file that cannot be used; the message names the file and the offending key."""


def _load_json(ann_file: str) -> dict:
    if not os.path.isfile(ann_file):
        raise DataNotFoundError(f"annotation file not found: {ann_file!r}")
    try:
        with open(ann_file) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise AnnotationError(f"{ann_file}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise AnnotationError(f"{ann_file}: top level must be a JSON object, got {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise AnnotationError(f"{ann_file}: missing key {key!r}")
        if not isinstance(data[key], list):
            raise AnnotationError(f"{ann_file}: {key!r} must be a list, got {type(data[key]).__name__}")
    return data


def _require(ann_file: str, where: str, record: dict, keys: Sequence[str]) -> None:
    for key in keys:
        if key not in record:
            raise AnnotationError(f"{ann_file}: {where} is missing key {key!r}: {record}")


def validate_coco_annotations(ann_file: str, img_dir: str | None = None, *, invalid_boxes: str = "error") -> dict:
    """Read and check a COCO instances file; returns the parsed JSON (invalid boxes dropped if asked).

    Checks: the file exists and parses; ``images``/``annotations``/``categories`` lists with their
    required keys; unique image, annotation and category ids; every annotation refers to a known
    image and category; bboxes ``[x, y, w, h]`` are finite, have positive size and lie inside their
    image (1 px tolerance); with ``img_dir``, every image file exists.

    Args:
        ann_file: path of the JSON file.
        img_dir: directory of the images, or None to skip the file check.
        invalid_boxes: ``"error"`` (default) raises on a bad bbox; ``"drop"`` removes such
            annotations (real COCO has a few boxes under a pixel wide) and counts them in
            ``data["_dropped"]``.

    Raises:
        FileNotFoundError: the annotation file or an image file is missing.
        AnnotationError: anything else, naming the file, the key and the record.
    """
    if invalid_boxes not in ("error", "drop"):
        raise ValueError(f"invalid_boxes must be 'error' or 'drop', got {invalid_boxes!r}")
    data = _load_json(ann_file)
    images, cats = {}, set()
    for img in data["images"]:
        _require(ann_file, "an image", img, ("id", "file_name", "width", "height"))
        if img["id"] in images:
            raise AnnotationError(f"{ann_file}: duplicate image id {img['id']!r}")
        images[img["id"]] = img
        if img_dir is not None and not os.path.isfile(os.path.join(img_dir, img["file_name"])):
            raise DataNotFoundError(
                f"{ann_file}: image id {img['id']} file {os.path.join(img_dir, img['file_name'])!r} not found"
            )
    for cat in data["categories"]:
        _require(ann_file, "a category", cat, ("id", "name"))
        if cat["id"] in cats:
            raise AnnotationError(f"{ann_file}: duplicate category id {cat['id']!r}")
        cats.add(cat["id"])
    ann_ids, kept, dropped = set(), [], 0
    for ann in data["annotations"]:
        _require(ann_file, "an annotation", ann, ("id", "image_id", "category_id", "bbox"))
        if ann["id"] in ann_ids:
            raise AnnotationError(f"{ann_file}: duplicate annotation id {ann['id']!r}")
        ann_ids.add(ann["id"])
        if ann["image_id"] not in images:
            raise AnnotationError(f"{ann_file}: annotation {ann['id']} has unknown image_id {ann['image_id']!r}")
        if ann["category_id"] not in cats:
            raise AnnotationError(
                f"{ann_file}: annotation {ann['id']} has unknown category_id {ann['category_id']!r}"
            )
        problem = _bbox_problem(ann["bbox"], images[ann["image_id"]])
        if problem:
            if invalid_boxes == "error":
                raise AnnotationError(f"{ann_file}: annotation {ann['id']} bbox {ann['bbox']} {problem}")
            dropped += 1
            continue
        kept.append(ann)
    data["annotations"] = kept
    data["_dropped"] = dropped
    return data


def _bbox_problem(bbox, img: dict) -> str | None:
    if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4):
        return "must be [x, y, w, h]"
    x, y, w, h = bbox
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox):
        return "has a non-finite value"
    if w <= 0 or h <= 0:
        return "has non-positive size"
    tol = 1.0
    if x < -tol or y < -tol or x + w > img["width"] + tol or y + h > img["height"] + tol:
        return f"lies outside its image ({img['width']}x{img['height']})"
    return None


class CocoDetection(torch.utils.data.Dataset):
    """A COCO-format detection dataset on pycocotools, validated when it is built.

    Args:
        ann_file: COCO instances JSON.
        img_dir: directory the ``file_name`` of each image is relative to.
        train: drop crowd boxes and boxes under ``min_box_size`` pixels, and skip images without a
            box (as torchvision's references do); in evaluation every image is kept.
        transforms: a joint transform ``(image, target) -> (image, target)``.
        invalid_boxes: see :func:`validate_coco_annotations`.
        min_box_size: training boxes with a side below this are dropped.
    """

    def __init__(
        self,
        ann_file: str,
        img_dir: str,
        *,
        train: bool = False,
        transforms: Callable | None = None,
        invalid_boxes: str = "error",
        min_box_size: float = 1.0,
    ):
        from pycocotools.coco import COCO

        data = validate_coco_annotations(ann_file, img_dir, invalid_boxes=invalid_boxes)
        data.pop("_dropped")
        self.ann_file, self.img_dir, self.train, self.transforms = ann_file, img_dir, train, transforms
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            self.coco = COCO()
            self.coco.dataset = data
            self.coco.createIndex()
        self.cat_ids = sorted(self.coco.getCatIds())
        self.cat_id_to_label = {c: i + 1 for i, c in enumerate(self.cat_ids)}
        self.label_to_cat_id = {i + 1: c for i, c in enumerate(self.cat_ids)}
        self.classes = tuple(self.coco.cats[c]["name"] for c in self.cat_ids)
        self.min_box_size = min_box_size
        ids = sorted(self.coco.imgs)
        if train:
            ids = [i for i in ids if len(self._annotations(i)[0])]
        self.ids = ids

    @property
    def num_classes(self) -> int:
        """Number of foreground classes (the detectors add the background class themselves)."""
        return len(self.cat_ids)

    def _annotations(self, image_id: int) -> tuple[np.ndarray, np.ndarray]:
        boxes, labels = [], []
        for ann in self.coco.imgToAnns.get(image_id, []):
            x, y, w, h = ann["bbox"]
            if self.train and (ann.get("iscrowd", 0) or w < self.min_box_size or h < self.min_box_size):
                continue
            boxes.append([x, y, x + w, y + h])
            labels.append(self.cat_id_to_label[ann["category_id"]])
        return np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(labels, np.int64)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[Tensor, dict]:
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        path = os.path.join(self.img_dir, info["file_name"])
        try:
            with Image.open(path) as im:
                image = torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.uint8).copy())
        except OSError as e:  # PIL's UnidentifiedImageError and truncated files are OSErrors
            raise DataError(f"cannot read image {path!r} (image id {image_id}): {e}") from None
        image = image.permute(2, 0, 1).float().div_(255)  # [3, H, W]
        boxes, labels = self._annotations(image_id)
        h, w = image.shape[-2:]
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, h)
        target = {
            "boxes": torch.from_numpy(boxes),
            "labels": torch.from_numpy(labels),
            "image_id": image_id,
            "orig_size": (h, w),
            "scale": 1.0,
        }
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


class Compose:
    """Apply joint transforms in order."""

    def __init__(self, transforms: Sequence[Callable]):
        self.transforms = list(transforms)

    def __call__(self, image: Tensor, target: dict):
        for t in self.transforms:
            image, target = t(image, target)
        return image, target


class RandomHorizontalFlip:
    """Flip image and boxes left-right with probability ``p``."""

    def __init__(self, p: float = 0.5):
        if not 0 <= p <= 1:
            raise ValueError(f"p must be in [0, 1], got {p!r}")
        self.p = p

    def __call__(self, image: Tensor, target: dict):
        if random.random() < self.p:
            image = image.flip(-1)
            w = image.shape[-1]
            boxes = target["boxes"].clone()
            boxes[:, [0, 2]] = w - target["boxes"][:, [2, 0]]
            target = {**target, "boxes": boxes}
        return image, target


class Resize:
    """Resize so the shorter side is ``min_size`` (a tuple: one chosen at random) and the longer at
    most ``max_size``; boxes follow, and ``target["scale"]`` records the factor."""

    def __init__(self, min_size: int | Sequence[int], max_size: int):
        self.min_sizes = (min_size,) if isinstance(min_size, int) else tuple(min_size)
        if not self.min_sizes or min(self.min_sizes) <= 0 or max_size <= 0:
            raise ValueError(f"min_size and max_size must be positive, got {min_size!r} and {max_size!r}")
        self.max_size = max_size

    def __call__(self, image: Tensor, target: dict):
        h, w = image.shape[-2:]
        size = random.choice(self.min_sizes)
        scale = min(size / min(h, w), self.max_size / max(h, w))
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        image = torch.nn.functional.interpolate(image[None], size=(nh, nw), mode="bilinear", align_corners=False)[0]
        sx, sy = nw / w, nh / h
        boxes = target["boxes"] * torch.tensor([sx, sy, sx, sy])
        return image, {**target, "boxes": boxes, "scale": target["scale"] * scale}


def detection_collate(batch: Sequence[tuple[Tensor, dict]]) -> dict:
    """Collate ``(image, target)`` pairs into ``{"inputs": [images], "data_samples": [targets]}``
    (lists: detection images have different sizes; the detectors batch them themselves)."""
    images, targets = zip(*batch)
    return {"inputs": list(images), "data_samples": list(targets)}
