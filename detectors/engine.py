"""mmengine glue: the model wrapper, the COCO dataset and metric, the collate, config checks.

Importing this module registers, in mmengine's root registries:

* ``MODELS``: :class:`DetectorModel` (a ``BaseModel`` around :func:`detectors.build_detector`);
* ``DATASETS``: :class:`CocoDetectionDataset` (can generate the built-in shapes data);
* ``METRICS``: :class:`CocoMetric` (pycocotools ``COCOeval``, one result per image);
* ``FUNCTIONS``: ``detection_collate``;
* ``RUNNERS`` / ``HOOKS``: :class:`~detectors.runner.BoxLossRunner` and its checkpoint hook.

Configs reach it with ``custom_imports = dict(imports=["detectors.engine"])``.
:func:`check_config` rejects unknown keys in the model, dataset and evaluator sections before
anything is built.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import os
from typing import Sequence

import numpy as np
import torch
from mmengine.evaluator import BaseMetric
from mmengine.logging import MMLogger
from mmengine.model import BaseModel
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import DATASETS, FUNCTIONS, HOOKS, METRICS, MODELS

from . import runner as _runner  # noqa: F401  (registers BoxLossRunner and BoxLossCheckpointHook)
from .data import CocoDetection, Compose, RandomHorizontalFlip, Resize, detection_collate
from .errors import DataError, DataNotFoundError, OptionError, check_known_keys
from .evaluation import (COCO_STAT_NAMES, CONFUSION_SCORE_THR, check_backend, per_class_ap, per_class_markdown,
                         require_extra, run_cocoeval, write_plots)
from .fileio import atomic_json
from .shapes import make_shapes, shapes_exist

__all__ = ["DetectorModel", "CocoDetectionDataset", "CocoMetric", "DetectionImagesHook", "check_config",
           "apply_tensorboard"]

FUNCTIONS.register_module(name="detection_collate", module=detection_collate, force=True)


# --------------------------------------------------------------------------- model


@MODELS.register_module(force=True)
class DetectorModel(BaseModel):
    """mmengine ``BaseModel`` around a detector from :func:`detectors.build_detector`.

    ``forward(inputs, data_samples, mode)``: ``inputs`` is a list of ``[3, H, W]`` float images in
    [0, 1]; ``data_samples`` the list of target dicts from :mod:`detectors.data`.
    ``mode="loss"`` returns the detector's loss dict (keys start with ``loss_``, which mmengine
    sums); ``mode="predict"`` returns one dict per image with ``image_id``, ``boxes`` (xyxy, in
    the original image's pixels), ``scores`` and ``labels``; ``mode="tensor"`` the raw outputs.

    Args:
        arch, num_classes, backbone, box_loss, box_loss_weight, nms, nms_beta, weights,
        weights_backbone: passed to :func:`detectors.build_detector`.
        data_preprocessor: mmengine preprocessor config (default: move tensors to the device).
        **detector_kwargs: anything else for :func:`detectors.build_detector` / torchvision.
    """

    def __init__(self, arch: str, num_classes: int, *, data_preprocessor=None, **detector_kwargs):
        super().__init__(data_preprocessor=data_preprocessor)
        from . import build_detector

        self.detector = build_detector(arch, num_classes=num_classes, **detector_kwargs)

    def forward(self, inputs: Sequence[torch.Tensor], data_samples: Sequence[dict] | None = None, mode: str = "tensor"):
        if mode == "loss":
            if data_samples is None:
                raise ValueError("mode='loss' needs data_samples with the targets")
            targets = [{"boxes": t["boxes"], "labels": t["labels"]} for t in data_samples]
            return self.detector(list(inputs), targets)
        if mode == "predict":
            outputs = self.detector(list(inputs))
            results = []
            for out, sample in zip(outputs, data_samples or [{}] * len(outputs)):
                scale = float(sample.get("scale", 1.0))
                results.append({
                    "image_id": sample.get("image_id"),
                    "boxes": (out["boxes"] / scale).detach().cpu(),
                    "scores": out["scores"].detach().cpu(),
                    "labels": out["labels"].detach().cpu(),
                })
            return results
        if mode == "tensor":
            return self.detector(list(inputs))
        raise ValueError(f"mode must be 'loss', 'predict' or 'tensor', got {mode!r}")


# --------------------------------------------------------------------------- data


_TRANSFORMS = {"RandomHorizontalFlip": RandomHorizontalFlip, "Resize": Resize}


def _build_transforms(cfgs: Sequence[dict] | None):
    if not cfgs:
        return None
    out = []
    for cfg in cfgs:
        cfg = dict(cfg)
        name = cfg.pop("type", None)
        if name not in _TRANSFORMS:
            raise ValueError(f"unknown transform type {name!r}; valid types: {', '.join(_TRANSFORMS)}")
        out.append(_TRANSFORMS[name](**cfg))
    return Compose(out)


@DATASETS.register_module(force=True)
class CocoDetectionDataset(CocoDetection):
    """:class:`~detectors.data.CocoDetection` built from a config.

    Args:
        data_root: dataset root; ``ann_file`` and ``img_dir`` are relative to it.
        ann_file: COCO instances JSON, e.g. ``annotations/instances_val2017.json``.
        img_dir: image directory, e.g. ``val2017/``.
        train: training split (drops crowd and tiny boxes, images without boxes).
        transforms: list of transform configs, e.g. ``[dict(type="RandomHorizontalFlip", p=0.5)]``.
        invalid_boxes: ``"error"`` or ``"drop"`` (see :func:`~detectors.data.validate_coco_annotations`).
        generate_shapes: ``dict(root=..., **make_shapes options)``: generate the built-in shapes
            dataset if it is missing, but only when ``data_root`` is that ``root``. Any other
            ``data_root`` (``--data-root``, a typo) must already hold the data: a wrong path is an
            error, never a new dataset.
    """

    def __init__(self, data_root: str, ann_file: str, img_dir: str, *, train: bool = False, transforms=None,
                 invalid_boxes: str = "error", generate_shapes: dict | None = None):
        if generate_shapes is not None:
            options = dict(generate_shapes)
            root = options.pop("root", None)
            if root is None:
                raise OptionError("generate_shapes needs root=<the folder it may generate the data in>")
            if os.path.normpath(root) == os.path.normpath(data_root) and not shapes_exist(data_root):
                make_shapes(data_root, **options)
        if not os.path.isfile(os.path.join(data_root, ann_file)):
            raise DataNotFoundError(
                f"annotation file not found: {os.path.join(data_root, ann_file)!r} (is data_root {data_root!r} "
                f"right? the shapes data is generated only in its default folder, elsewhere by "
                f"tools/make_shapes.py --out DIR)")
        super().__init__(os.path.join(data_root, ann_file), os.path.join(data_root, img_dir), train=train,
                         transforms=_build_transforms(transforms), invalid_boxes=invalid_boxes)
        self.metainfo = {"classes": self.classes}


# --------------------------------------------------------------------------- metric

@METRICS.register_module(force=True)
class CocoMetric(BaseMetric):
    """COCO box AP with pycocotools: AP, AP50, AP75, APs, APm, APl (and the ARs), keys ``coco/bbox_*``.

    One result is kept per image (with its detections, possibly none), so the padding a
    distributed sampler adds is dropped by mmengine's ``collect_results`` and every image counts
    exactly once. Labels are mapped back to COCO category ids as :class:`CocoDetection` numbers
    them (sorted category ids -> 1..C).

    Args:
        ann_file: the ground-truth COCO JSON of the evaluated split (relative to ``data_root``).
        data_root: optional folder ``ann_file`` is relative to.
        out_file: also write the detections there as a COCO results JSON (atomically).
        per_class: also log a Markdown table of AP, AP50, AP75, APs/m/l per category.
        plots_dir: also write there ``per_class.csv``, ``pr_curves.png`` (IoU 0.5 and 0.75) and
            ``confusion_matrix.png`` / ``.csv`` (replaced at every evaluation); see
            :func:`detectors.evaluation.write_plots`.
        backend: ``"pycocotools"`` (the reference) or ``"fast"`` (faster-coco-eval, the same stats;
            ``pip install 'boxloss[fast-eval]'``).
        confusion_score_thr: detections below this score are left out of the confusion matrix.
        collect_device, prefix: as mmengine's ``BaseMetric``.
    """

    default_prefix = "coco"

    def __init__(self, ann_file: str, *, data_root: str | None = None, out_file: str | None = None,
                 per_class: bool = False, plots_dir: str | None = None, backend: str = "pycocotools",
                 confusion_score_thr: float = CONFUSION_SCORE_THR, collect_device: str = "cpu",
                 prefix: str | None = None):
        super().__init__(collect_device=collect_device, prefix=prefix)
        check_backend(backend)  # a missing extra fails when the config is built, not after an epoch
        self.out_file = out_file
        self.per_class, self.plots_dir, self.backend = per_class, plots_dir, backend
        self.confusion_score_thr = confusion_score_thr
        from pycocotools.coco import COCO

        # the official ground truth as pycocotools reads it (no boxes dropped or changed)
        path = os.path.join(data_root, ann_file) if data_root else ann_file
        if not os.path.isfile(path):
            raise DataNotFoundError(f"evaluator ann_file {path!r} does not exist")
        self.ann_file = path
        with contextlib.redirect_stdout(io.StringIO()):
            self.coco = COCO(path)
        self.label_to_cat_id = {i + 1: c for i, c in enumerate(sorted(self.coco.getCatIds()))}

    def process(self, data_batch, data_samples: Sequence[dict]) -> None:
        for det in data_samples:
            boxes = det["boxes"].float().numpy().reshape(-1, 4)
            xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
            self.results.append({
                "image_id": int(det["image_id"]),
                "bboxes": xywh,
                "scores": det["scores"].float().numpy(),
                "labels": det["labels"].numpy(),
            })

    def compute_metrics(self, results: list) -> dict:
        detections = []
        for r in results:
            unknown = sorted({int(v) for v in r["labels"]} - set(self.label_to_cat_id))
            if unknown:
                # a bug in a head (background emitted) or a model trained for other classes
                raise DataError(f"the model predicted labels {unknown} in image {r['image_id']}, but {self.ann_file!r} "
                                f"has classes 1..{len(self.label_to_cat_id)} (is num_classes right for this data?)")
            for box, score, label in zip(r["bboxes"], r["scores"], r["labels"]):
                detections.append({
                    "image_id": r["image_id"],
                    "category_id": self.label_to_cat_id[int(label)],
                    "bbox": [float(v) for v in box],
                    "score": float(score),
                })
        if self.out_file:
            atomic_json(self.out_file, detections)
        img_ids = sorted({r["image_id"] for r in results})
        ev, text = run_cocoeval(self.coco, detections, img_ids, backend=self.backend)
        logger = MMLogger.get_current_instance()
        logger.info(f"COCO bbox evaluation on {len(img_ids)} images ({self.backend}):\n{text}")
        if self.per_class:
            logger.info("AP per class:\n" + per_class_markdown(per_class_ap(ev)))
        if self.plots_dir:
            paths = write_plots(ev, self.coco, detections, self.plots_dir, img_ids=img_ids,
                                score_thr=self.confusion_score_thr)
            logger.info(f"evaluation plots written: {', '.join(paths)}")
        return {f"bbox_{name}": float(v) for name, v in zip(COCO_STAT_NAMES, ev.stats[:12])}



# --------------------------------------------------------------------------- config checks


def _parameters(fn, skip=("self",)) -> set:
    return {n for n, p in inspect.signature(fn).parameters.items()
            if n not in skip and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


def check_config(cfg) -> None:
    """Reject unknown keys in the model, dataset and evaluator sections (mmengine passes them on
    as keywords, and torchvision's constructors swallow unknown ones), naming the key and the
    closest valid one. Sections of other types are left to their own classes."""
    from .models import _OWN_OPTIONS, _TORCHVISION_OPTIONS

    model = cfg.get("model")
    if model is not None and model.get("type") == "DetectorModel":
        arch = model.get("arch")
        if arch in _OWN_OPTIONS:
            valid = {"type", "data_preprocessor"} | set(_OWN_OPTIONS[arch]) | set(_TORCHVISION_OPTIONS[arch])
            check_known_keys("model", model.keys(), valid)
    for loader in ("train_dataloader", "val_dataloader", "test_dataloader"):
        dataset = (cfg.get(loader) or {}).get("dataset")
        if dataset is not None and dataset.get("type") == "CocoDetectionDataset":
            check_known_keys(f"{loader}.dataset", dataset.keys(),
                             {"type"} | _parameters(CocoDetectionDataset.__init__))
            shapes = dataset.get("generate_shapes")
            if shapes is not None:
                check_known_keys(f"{loader}.dataset.generate_shapes", shapes.keys(),
                                 {"root"} | _parameters(make_shapes, skip=("root",)))
    for evaluator in ("val_evaluator", "test_evaluator"):
        metric = cfg.get(evaluator)
        if metric is not None and metric.get("type") == "CocoMetric":
            check_known_keys(evaluator, metric.keys(), {"type"} | _parameters(CocoMetric.__init__))


# --------------------------------------------------------------------------- TensorBoard


@HOOKS.register_module(force=True)
class DetectionImagesHook(Hook):
    """After each validation, draws the detections on the first ``num_images`` validation images and
    hands them to the visualizer's backends (TensorBoard's Images tab, ``detections/<image id>``,
    one step per epoch; the local backend writes them as PNGs under ``vis_data/vis_image``).

    Drawn as ``tools/visualize.py`` draws (:func:`detectors.drawing.render`), the longer side scaled to
    ``size`` pixels. Rank 0 only; the model is put back in the mode it was in.
    """

    priority = "LOW"

    def __init__(self, num_images: int = 4, score_thr: float = 0.3, size: int = 512):
        for name, value in (("num_images", num_images), ("size", size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise OptionError(f"DetectionImagesHook {name} must be an integer >= 1, got {value!r}")
        if not 0.0 <= float(score_thr) <= 1.0:
            raise OptionError(f"DetectionImagesHook score_thr must be in [0, 1], got {score_thr!r}")
        self.num_images, self.score_thr, self.size = num_images, float(score_thr), size

    def after_val_epoch(self, runner, metrics=None) -> None:
        if runner.rank != 0:
            return
        dataset = runner.val_dataloader.dataset
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        batch = detection_collate([dataset[i] for i in range(min(self.num_images, len(dataset)))])
        training = model.training
        model.eval()
        try:
            with torch.no_grad():
                results = model.val_step(batch)
        finally:
            model.train(training)
        for target, result in zip(batch["data_samples"], results):
            runner.visualizer.add_image(f"detections/{target['image_id']}",
                                        self.draw(dataset, target["image_id"], result), step=runner.epoch)

    def draw(self, dataset, image_id: int, result: dict) -> np.ndarray:
        """The image, its longer side scaled to ``size``, with ground truth (dashed) and detections
        scoring at least ``score_thr`` (solid, "class score") drawn as ``tools/visualize.py`` draws
        them: ``[H, W, 3]`` uint8 RGB."""
        from .drawing import class_colours, render
        from .evaluation import image_arrays

        keep = (result["scores"] >= self.score_thr).cpu()
        cat_ids = list(dataset.cat_ids)
        dets = (result["boxes"].cpu()[keep].double().numpy(), result["scores"].cpu()[keep].double().numpy(),
                np.asarray([cat_ids[k - 1] for k in result["labels"].cpu()[keep].tolist()], dtype=np.int64))
        names = {c: dataset.coco.cats[c]["name"] for c in cat_ids}
        image, _ = render(os.path.join(dataset.img_dir, dataset.coco.imgs[image_id]["file_name"]),
                          image_arrays(dataset.coco, image_id), dets, names=names, colours=class_colours(cat_ids),
                          size=self.size)
        return np.asarray(image)


def apply_tensorboard(cfg) -> None:
    """The config key ``tensorboard`` (``False``, ``True`` or ``dict(num_images=4, score_thr=0.3)``):
    when set, adds mmengine's TensorBoard backend to the visualizer (losses, learning rate and the
    COCO metrics) and a :class:`DetectionImagesHook`. Needs the ``tensorboard`` extra."""
    option = cfg.get("tensorboard", False)
    if option is False or option is None:
        return
    if option is True:
        option = {}
    if not isinstance(option, dict):
        raise OptionError(f"tensorboard must be False, True or a dict(num_images=..., score_thr=...), got {option!r}")
    check_known_keys("tensorboard", option.keys(), set(_parameters(DetectionImagesHook.__init__)))
    require_extra("tensorboard", extra="tensorboard", what="tensorboard=True (--tensorboard)")
    visualizer = cfg.setdefault("visualizer", dict(type="Visualizer", vis_backends=[dict(type="LocalVisBackend")]))
    backends = visualizer.setdefault("vis_backends", [])
    if not any(b.get("type") == "TensorboardVisBackend" for b in backends):
        backends.append(dict(type="TensorboardVisBackend"))
    hooks = cfg.setdefault("custom_hooks", [])
    if not any(h.get("type") == "DetectionImagesHook" for h in hooks):
        hooks.append(dict(type="DetectionImagesHook", **option))
