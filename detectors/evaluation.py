"""What COCO's 12 numbers hide: per-class AP, precision-recall curves, a confusion matrix, and the
kind of every error; plus the choice of evaluator.

* Backends (:data:`BACKENDS`): ``"pycocotools"`` (the reference) or ``"fast"``, faster-coco-eval's
  C++ ``COCOeval_faster``, which reports the same stats; it is an optional extra
  (``pip install 'boxloss[fast-eval]'``). :func:`run_cocoeval` runs either and returns the evaluated
  ``COCOeval`` object, whose ``eval["precision"]`` array everything below reads.
* :func:`per_class_ap`: AP, AP50, AP75, APs/m/l of each category, averaged exactly as pycocotools
  averages the 12 stats (mean over the entries > -1 of ``eval["precision"]``, area "all" or the
  size, maxDets 100); :func:`per_class_markdown` / :func:`per_class_csv` format them.
* :func:`pr_curves`: the precision at the 101 recall thresholds of each category and their mean, at
  one IoU threshold (the slices of ``eval["precision"]`` that AP averages).
* :func:`match_image`: each detection of one image as a true positive, a duplicate, a wrong class
  or background, and each ground-truth box as found or missed (``tools/visualize.py --errors``).
* :func:`confusion_matrix`: ground-truth class against predicted class at IoU 0.5 and a score
  threshold, with a "background" row (detections of nothing) and a "missed" column.
* :func:`write_plots`: the per-class CSV, the PR curves PNG, the confusion matrix PNG and CSV.

Boxes are ``(x1, y1, x2, y2)`` in pixels unless a name says ``xywh`` (COCO's files).
"""

from __future__ import annotations

import contextlib
import csv
import importlib
import io
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .errors import OptionError
from .fileio import atomic_text, atomic_write

__all__ = [
    "BACKENDS",
    "DETECTION_KINDS",
    "ERROR_KINDS",
    "require_extra",
    "check_backend",
    "run_cocoeval",
    "coco_summary",
    "markdown_row",
    "COCO_STAT_NAMES",
    "AP_NAMES",
    "AP_COLUMNS",
    "MARKDOWN_HEADER",
    "per_class_ap",
    "per_class_markdown",
    "per_class_csv",
    "pr_curves",
    "box_iou",
    "ImageMatch",
    "match_image",
    "image_arrays",
    "detection_arrays",
    "confusion_matrix",
    "confusion_labels",
    "plot_pr_curves",
    "plot_confusion_matrix",
    "write_plots",
]

BACKENDS = ("pycocotools", "fast")
# What tools/visualize.py --errors calls each detection; "crowd" (inside a crowd region, which COCO
# ignores) is not an error. The missed ground truth is the fifth kind of error.
DETECTION_KINDS = ("tp", "duplicate", "wrong_class", "background", "crowd")
ERROR_KINDS = ("duplicate", "wrong_class", "background", "missed")
# COCOeval.stats in order, by the names the metric logs them under (``coco/bbox_<name>``); the first
# six are box AP, printed under AP_COLUMNS in every table of the tools.
COCO_STAT_NAMES = ("mAP", "mAP_50", "mAP_75", "mAP_s", "mAP_m", "mAP_l",
                   "AR_1", "AR_10", "AR_100", "AR_s", "AR_m", "AR_l")
AP_NAMES = COCO_STAT_NAMES[:6]
AP_COLUMNS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
MARKDOWN_HEADER = "| " + " | ".join(AP_COLUMNS) + " |\n|" + " --- |" * len(AP_COLUMNS)
CONFUSION_SCORE_THR = 0.3  # a typical deployment threshold; below it AP still counts detections


# --------------------------------------------------------------------------- backends


def require_extra(module: str, *, extra: str, what: str):
    """Import an optional dependency, or raise :class:`OptionError` saying which extra installs it.

    ``require_extra("faster_coco_eval", extra="fast-eval", what="--backend fast")``.
    """
    try:
        return importlib.import_module(module)
    except ImportError:
        raise OptionError(f"{what} needs {module.split('.')[0]}, an optional extra: "
                          f"pip install 'boxloss[{extra}]'") from None


def check_backend(backend: str) -> None:
    """Raise :class:`OptionError` for an unknown backend, or ``"fast"`` without faster-coco-eval."""
    if backend not in BACKENDS:
        raise OptionError(f"backend must be 'pycocotools' or 'fast', got {backend!r}")
    if backend == "fast":
        require_extra("faster_coco_eval", extra="fast-eval", what="--backend fast")


def _empty_results(coco_cls, coco_gt):
    # pycocotools' loadRes([]) raises; an empty result set scores 0 where there is ground truth,
    # -1 where there is none
    coco_dt = coco_cls()
    coco_dt.dataset = {"images": list(coco_gt.dataset["images"]), "annotations": [],
                       "categories": list(coco_gt.dataset["categories"])}
    coco_dt.createIndex()
    return coco_dt


def run_cocoeval(coco_gt, detections: list[dict], img_ids: Sequence[int] | None = None, *,
                 backend: str = "pycocotools"):
    """Run COCO box evaluation (evaluate, accumulate, summarize) with the chosen backend.

    Args:
        coco_gt: the ground truth as a pycocotools ``COCO`` (a faster-coco-eval one is also accepted
            by the fast backend).
        detections: COCO result dicts (``image_id``, ``category_id``, ``bbox`` xywh, ``score``);
            both backends add ``id``, ``area`` and ``iscrowd`` keys to them.
        img_ids: evaluate these images only (default: every image of ``coco_gt``).
        backend: ``"pycocotools"`` or ``"fast"``.

    Returns:
        ``(ev, text)``: the evaluated ``COCOeval`` object (``ev.stats``: the 12 stats;
        ``ev.eval["precision"]``: ``[T=10, R=101, K, A=4, M=3]``) and the 12 summary lines.
    """
    check_backend(backend)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        if backend == "pycocotools":
            from pycocotools.coco import COCO
            from pycocotools.cocoeval import COCOeval

            coco_dt = coco_gt.loadRes(detections) if detections else _empty_results(COCO, coco_gt)
            ev = COCOeval(coco_gt, coco_dt, "bbox")
        else:
            from faster_coco_eval import COCO, COCOeval_faster

            gt = coco_gt if isinstance(coco_gt, COCO) else COCO(coco_gt.dataset)  # a shallow copy, re-indexed
            coco_dt = gt.loadRes(detections) if detections else _empty_results(COCO, gt)
            ev = COCOeval_faster(gt, coco_dt, "bbox", print_function=print)
        if img_ids is not None:
            ev.params.imgIds = sorted(img_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    # faster-coco-eval prints AR@0.5 and AR@0.75 after the 12 lines; keep pycocotools' summary
    lines = [line for line in buf.getvalue().splitlines() if line.startswith(" Average")][:12]
    return ev, "\n".join(lines) + "\n"


def coco_summary(coco_gt, detections: list[dict], img_ids: Sequence[int] | None = None, *,
                 backend: str = "pycocotools") -> tuple[np.ndarray, str]:
    """Run COCO box evaluation; returns the 12 stats (:data:`COCO_STAT_NAMES`) and the summary lines.

    ``detections`` are COCO result dicts (``image_id``, ``category_id``, ``bbox`` xywh, ``score``).
    With no detections every stat is 0, or -1 (pycocotools' "no ground truth of that size").
    """
    ev, text = run_cocoeval(coco_gt, detections, img_ids, backend=backend)
    return np.asarray(ev.stats[:12], dtype=np.float64), text


def markdown_row(stats) -> str:
    """AP, AP50, AP75, APs, APm, APl in percent; pycocotools' -1 (no ground truth of that size) is n/a."""
    return "| " + " | ".join("n/a" if v < 0 else f"{100 * v:.1f}" for v in stats[:6]) + " |"


# --------------------------------------------------------------------------- per-class AP, PR curves


def _mean_valid(precision: np.ndarray) -> float:
    """pycocotools' ``_summarize``: the mean of the entries > -1, or -1 when there are none."""
    valid = precision[precision > -1]
    return float(valid.mean()) if valid.size else -1.0


def _iou_index(params, iou_thr: float) -> int:
    hits = np.where(np.isclose(np.asarray(params.iouThrs), iou_thr))[0]
    if not hits.size:
        raise OptionError(f"IoU threshold {iou_thr} is not one of the evaluated {list(params.iouThrs)}")
    return int(hits[0])


def _category_names(ev) -> list[str]:
    return [ev.cocoGt.cats[c]["name"] for c in ev.params.catIds]


def per_class_ap(ev) -> list[dict]:
    """AP of each category of an evaluated ``COCOeval``, as pycocotools averages its stats.

    AP is the mean over the entries > -1 of ``eval["precision"][:, :, k, area "all", maxDets 100]``
    (AP50 and AP75: that IoU threshold only; APs/m/l: that area range); -1 where the category has
    no ground truth (of that size). The mean of a column over the categories with a value is the
    corresponding stat of ``ev.stats``.

    Returns:
        one dict per category in ``params.catIds`` order: ``category_id``, ``class``, ``gt`` (the
        number of non-crowd ground-truth boxes in the evaluated images), and the
        :data:`AP_COLUMNS` as fractions.
    """
    p = ev.params
    precision = ev.eval["precision"]  # [T, R, K, A, M]
    m = len(p.maxDets) - 1  # maxDets 100, as the AP stats use
    area = {label: i for i, label in enumerate(p.areaRngLbl)}
    t50, t75 = _iou_index(p, 0.5), _iou_index(p, 0.75)
    counts = dict.fromkeys(p.catIds, 0)
    for image_id in p.imgIds:
        for ann in ev.cocoGt.imgToAnns.get(image_id, []):
            if not ann.get("iscrowd", 0) and ann["category_id"] in counts:
                counts[ann["category_id"]] += 1
    rows = []
    for k, (cat_id, name) in enumerate(zip(p.catIds, _category_names(ev))):
        rows.append({
            "category_id": cat_id,
            "class": name,
            "gt": counts[cat_id],
            "AP": _mean_valid(precision[:, :, k, area["all"], m]),
            "AP50": _mean_valid(precision[t50, :, k, area["all"], m]),
            "AP75": _mean_valid(precision[t75, :, k, area["all"], m]),
            "APs": _mean_valid(precision[:, :, k, area["small"], m]),
            "APm": _mean_valid(precision[:, :, k, area["medium"], m]),
            "APl": _mean_valid(precision[:, :, k, area["large"], m]),
        })
    return rows


def _mean_row(rows: list[dict]) -> dict:
    """The mean over categories with a value (-1 where none): pycocotools' overall stats."""
    out = {"category_id": "", "class": "all (mean)", "gt": sum(r["gt"] for r in rows)}
    for col in AP_COLUMNS:
        values = [r[col] for r in rows if r[col] > -1]
        out[col] = float(np.mean(values)) if values else -1.0
    return out


def per_class_markdown(rows: list[dict]) -> str:
    """A Markdown table, AP figures in percent, n/a where a category has no ground truth (of that size)."""
    lines = ["| class | GT boxes | " + " | ".join(AP_COLUMNS) + " |",
             "| --- | ---: | " + " | ".join("---:" for _ in AP_COLUMNS) + " |"]
    for r in list(rows) + [_mean_row(rows)]:
        values = ["n/a" if r[c] < 0 else f"{100 * r[c]:.1f}" for c in AP_COLUMNS]
        lines.append(f"| {r['class']} | {r['gt']} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def per_class_csv(rows: list[dict]) -> str:
    """CSV text: one line per category and a mean line; AP as fractions, empty where n/a."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(("category_id", "class", "gt") + AP_COLUMNS)
    for r in list(rows) + [_mean_row(rows)]:
        writer.writerow([r["category_id"], r["class"], r["gt"]]
                        + ["" if r[c] < 0 else f"{r[c]:.6f}" for c in AP_COLUMNS])
    return buf.getvalue()


def pr_curves(ev, iou_thr: float = 0.5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision-recall curves at one IoU threshold, area "all", maxDets 100.

    Returns:
        ``(recall [R], precision [K, R], overall [R])``: ``recall`` is pycocotools' 101 recall
        thresholds; ``precision[k]`` is ``eval["precision"][t, :, k, 0, -1]`` (interpolated: the
        best precision at a recall of at least that; 0 past the highest recall reached, -1 for a
        category without ground truth); ``overall`` is the mean over the categories with ground
        truth, so ``overall.mean()`` is the AP at that threshold.
    """
    p = ev.params
    t = _iou_index(p, iou_thr)
    precision = np.asarray(ev.eval["precision"][t, :, :, p.areaRngLbl.index("all"), -1]).T  # [K, R]
    valid = precision > -1
    counts = valid.sum(axis=0)
    overall = np.where(counts > 0, np.where(valid, precision, 0).sum(axis=0) / np.maximum(counts, 1), -1.0)
    return np.asarray(p.recThrs, dtype=np.float64), precision, overall


# --------------------------------------------------------------------------- matching one image


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of ``a [N, 4]`` and ``b [M, 4]`` (xyxy, no +1): ``[N, M]``."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)  # [N, M, 2]
    inter = wh[..., 0] * wh[..., 1]
    area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0, None), axis=1)
    area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0, None), axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def _ioa(dets: np.ndarray, regions: np.ndarray) -> np.ndarray:
    """Intersection over the detection's area ``[D, G]``: COCO's overlap with a crowd region."""
    lt = np.maximum(dets[:, None, :2], regions[None, :, :2])
    rb = np.minimum(dets[:, None, 2:], regions[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    area = np.prod(np.clip(dets[:, 2:] - dets[:, :2], 0, None), axis=1)
    return np.where(area[:, None] > 0, wh[..., 0] * wh[..., 1] / np.maximum(area[:, None], 1e-12), 0.0)


@dataclass
class ImageMatch:
    """The outcome of :func:`match_image`.

    Attributes:
        kinds: ``[D]`` one of :data:`DETECTION_KINDS` per detection, in input order.
        det_gt: ``[D]`` the ground-truth index a detection matched (tp), duplicates (duplicate) or
            overlaps most (wrong_class, crowd); -1 for background.
        gt_matched: ``[G]`` True where a true positive found the box (crowd boxes: False).
        gt_crowd: ``[G]`` the crowd flags given.
    """

    kinds: list[str]
    det_gt: np.ndarray
    gt_matched: np.ndarray
    gt_crowd: np.ndarray

    @property
    def missed(self) -> np.ndarray:
        """``[G]`` True for a non-crowd ground-truth box no true positive found."""
        return ~self.gt_matched & ~self.gt_crowd

    def counts(self) -> dict[str, int]:
        """Detections of each kind and the number of missed boxes, keys :data:`DETECTION_KINDS` + ``missed``."""
        out = {kind: self.kinds.count(kind) for kind in DETECTION_KINDS}
        out["missed"] = int(self.missed.sum())
        return out

    @property
    def num_errors(self) -> int:
        """False positives (duplicate, wrong class, background) plus missed boxes."""
        counts = self.counts()
        return sum(counts[kind] for kind in ERROR_KINDS)


def match_image(gt_boxes, gt_labels, det_boxes, det_scores, det_labels, *, iou_thr: float = 0.5,
                gt_crowd=None) -> ImageMatch:
    """Classify the detections of one image, greedily by decreasing score as COCO matches.

    A detection is, in this order:

    * ``tp``: it overlaps (IoU >= ``iou_thr``) a not yet matched ground-truth box of its class; it
      takes the one with the highest IoU;
    * ``duplicate``: it overlaps a box of its class that a higher-scored detection already took;
    * ``wrong_class``: it overlaps a box of another class;
    * ``crowd``: it lies in a crowd region (intersection over its own area >= ``iou_thr``), which
      COCO ignores: not an error;
    * ``background``: it overlaps nothing.

    A non-crowd ground-truth box that no true positive took is missed (a box found only with the
    wrong class is both a ``wrong_class`` detection and a missed box).

    Args:
        gt_boxes ``[G, 4]``, gt_labels ``[G]``, det_boxes ``[D, 4]`` (xyxy), det_scores ``[D]``,
        det_labels ``[D]``: any consistent label numbering (COCO category ids, or 1..C).
        iou_thr: the IoU that counts as a match.
        gt_crowd: ``[G]`` COCO ``iscrowd`` flags (default: none).
    """
    gt_boxes = np.asarray(gt_boxes, np.float64).reshape(-1, 4)
    det_boxes = np.asarray(det_boxes, np.float64).reshape(-1, 4)
    gt_labels, det_labels = np.asarray(gt_labels).reshape(-1), np.asarray(det_labels).reshape(-1)
    det_scores = np.asarray(det_scores, np.float64).reshape(-1)
    crowd = np.zeros(len(gt_boxes), bool) if gt_crowd is None else np.asarray(gt_crowd, bool).reshape(-1)
    iou = box_iou(det_boxes, gt_boxes)  # [D, G]
    ioa = _ioa(det_boxes, gt_boxes)
    taken = np.zeros(len(gt_boxes), bool)
    kinds = [""] * len(det_boxes)
    det_gt = np.full(len(det_boxes), -1, np.int64)
    for d in np.argsort(-det_scores, kind="stable"):  # pycocotools: mergesort on -score
        overlaps = (iou[d] >= iou_thr) & ~crowd
        same = overlaps & (gt_labels == det_labels[d])
        free = same & ~taken
        if free.any():
            g = int(np.argmax(np.where(free, iou[d], -1)))
            taken[g] = True
            kinds[d], det_gt[d] = "tp", g
        elif same.any():
            kinds[d], det_gt[d] = "duplicate", int(np.argmax(np.where(same, iou[d], -1)))
        elif overlaps.any():
            kinds[d], det_gt[d] = "wrong_class", int(np.argmax(np.where(overlaps, iou[d], -1)))
        elif (crowd & (ioa[d] >= iou_thr)).any():
            kinds[d], det_gt[d] = "crowd", int(np.argmax(np.where(crowd, ioa[d], -1)))
        else:
            kinds[d] = "background"
    return ImageMatch(kinds=kinds, det_gt=det_gt, gt_matched=taken, gt_crowd=crowd)


def _xyxy(xywh) -> np.ndarray:
    b = np.asarray(xywh, np.float64).reshape(-1, 4)
    return np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], axis=1)


def image_arrays(coco_gt, image_id) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ground truth of one image: ``boxes [G, 4]`` xyxy, ``category ids [G]``, ``crowd [G]``."""
    anns = coco_gt.imgToAnns.get(image_id, [])
    return (_xyxy([a["bbox"] for a in anns]), np.asarray([a["category_id"] for a in anns], np.int64),
            np.asarray([bool(a.get("iscrowd", 0)) for a in anns], bool))


def detection_arrays(detections: list[dict]) -> dict:
    """COCO results grouped by image: ``{image_id: (boxes [D, 4] xyxy, scores [D], category ids [D])}``."""
    grouped: dict = {}
    for d in detections:
        grouped.setdefault(d["image_id"], []).append(d)
    return {image_id: (_xyxy([d["bbox"] for d in ds]), np.asarray([d["score"] for d in ds], np.float64),
                       np.asarray([d["category_id"] for d in ds], np.int64))
            for image_id, ds in grouped.items()}


# --------------------------------------------------------------------------- confusion matrix


def confusion_matrix(coco_gt, detections: list[dict], *, img_ids: Sequence[int] | None = None,
                     score_thr: float = CONFUSION_SCORE_THR, iou_thr: float = 0.5) -> np.ndarray:
    """Counts of ground-truth class against predicted class, detections of score >= ``score_thr``.

    Per image, the true positives are matched as in :func:`match_image`; then the remaining
    detections, by decreasing score, each take the remaining box of another class they overlap most
    (IoU >= ``iou_thr``): a confusion. What is left counts as missed (a box) or background (a
    detection: duplicates included). Each box is counted once in its row, each detection once in its
    column; detections in crowd regions and crowd boxes are left out.

    Returns:
        ``[C + 1, C + 1]`` integers, categories in sorted id order: ``M[i, j]`` boxes of class i
        detected as class j; last row "background" (detections of no box), last column "missed"
        (boxes without a detection); ``M[C, C]`` is 0. See :func:`confusion_labels`.
    """
    cat_ids = sorted(coco_gt.getCatIds())
    index = {c: i for i, c in enumerate(cat_ids)}
    C = len(cat_ids)
    matrix = np.zeros((C + 1, C + 1), np.int64)
    by_image = detection_arrays([d for d in detections if d["score"] >= score_thr])
    for image_id in (sorted(coco_gt.getImgIds()) if img_ids is None else img_ids):
        gt_boxes, gt_cats, crowd = image_arrays(coco_gt, image_id)
        det_boxes, scores, det_cats = by_image.get(image_id, (np.zeros((0, 4)), np.zeros(0), np.zeros(0, np.int64)))
        m = match_image(gt_boxes, gt_cats, det_boxes, scores, det_cats, iou_thr=iou_thr, gt_crowd=crowd)
        taken = m.gt_matched | crowd
        iou = box_iou(det_boxes, gt_boxes)
        for d in np.argsort(-scores, kind="stable"):
            kind = m.kinds[d]
            if kind == "tp":
                matrix[index[det_cats[d]], index[det_cats[d]]] += 1
                continue
            if kind == "crowd":
                continue
            # only boxes of other classes can remain here: a free box of its own class would have made it a tp
            free = ~taken & (iou[d] >= iou_thr)
            if free.any():
                g = int(np.argmax(np.where(free, iou[d], -1)))
                taken[g] = True
                matrix[index[gt_cats[g]], index[det_cats[d]]] += 1
            else:
                matrix[C, index[det_cats[d]]] += 1
        for g in np.flatnonzero(~taken):
            matrix[index[gt_cats[g]], C] += 1
    return matrix


def confusion_labels(coco_gt) -> tuple[list[str], list[str]]:
    """Row and column names of :func:`confusion_matrix`: classes + "background", classes + "missed"."""
    names = [coco_gt.cats[c]["name"] for c in sorted(coco_gt.getCatIds())]
    return names + ["background"], names + ["missed"]


def _confusion_csv(matrix: np.ndarray, rows: list[str], cols: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["ground truth \\ prediction"] + cols)
    for name, values in zip(rows, matrix):
        writer.writerow([name] + [int(v) for v in values])
    return buf.getvalue()


# --------------------------------------------------------------------------- plots


def _save(fig, path: str) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))


def plot_pr_curves(ev, path: str, *, iou_thrs: Sequence[float] = (0.5, 0.75), title: str = "") -> None:
    """One panel per IoU threshold: the PR curve of each category and their mean (bold), as PNG.

    Up to 10 categories are named in the legend with their AP; with more, they are thin grey lines.
    """
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    names = _category_names(ev)
    fig = Figure(figsize=(5.2 * len(iou_thrs), 4.6))
    axes = fig.subplots(1, len(iou_thrs), squeeze=False)[0]
    colours = [f"C{k % 10}" for k in range(len(names))]
    for ax, thr in zip(axes, iou_thrs):
        recall, precision, overall = pr_curves(ev, thr)
        label = f"AP{int(round(thr * 100))}"
        named = len(names) <= 10
        for k, name in enumerate(names):
            if precision[k, 0] < 0:  # no ground truth
                continue
            ap = 100 * precision[k].mean()
            if named:
                ax.plot(recall, precision[k], color=colours[k], lw=1.4, label=f"{name} ({label} {ap:.1f})")
            else:
                ax.plot(recall, precision[k], color="0.7", lw=0.6)
        if (overall > -1).any():
            ax.plot(recall, overall, color="black", lw=2.4,
                    label=f"mean of {int((precision[:, 0] > -1).sum())} classes ({label} {100 * overall.mean():.1f})")
        ax.set(xlabel="recall", ylabel="precision (interpolated)", xlim=(0, 1), ylim=(0, 1.02),
               title=f"IoU {thr:.2f} (area all, maxDets 100)")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left", fontsize=8)
    heading = "precision-recall per class (pycocotools' 101 recall points)"
    fig.suptitle(f"{title}: {heading}" if title else heading)
    fig.tight_layout()
    _save(fig, path)


def plot_confusion_matrix(matrix: np.ndarray, rows: list[str], cols: list[str], path: str, *,
                          score_thr: float = CONFUSION_SCORE_THR, iou_thr: float = 0.5, title: str = "") -> None:
    """Heat map of :func:`confusion_matrix`, coloured by the fraction of each row, counts written in;
    ``title`` (e.g. the model) goes above the standard heading."""
    from matplotlib.figure import Figure

    n = len(rows)
    side = min(max(4.5, 0.6 * n + 2.5), 24)
    fig = Figure(figsize=(side + 1.2, side))
    ax = fig.subplots()
    totals = matrix.sum(axis=1, keepdims=True)
    frac = matrix / np.maximum(totals, 1)
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the row")
    ax.set_xticks(range(len(cols)), cols, rotation=45 if n > 3 else 0, ha="right" if n > 3 else "center",
                  fontsize=9 if n <= 20 else 6)
    ax.set_yticks(range(n), rows, fontsize=9 if n <= 20 else 6)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    if n <= 25:
        for i in range(n):
            for j in range(len(cols)):
                if matrix[i, j]:
                    ax.text(j, i, str(int(matrix[i, j])), ha="center", va="center", fontsize=10 if n <= 8 else 8 if n <= 12 else 6,
                            color="white" if frac[i, j] > 0.5 else "black")
    heading = f"confusion matrix: IoU >= {iou_thr:g}, score >= {score_thr:g}"
    ax.set_title(f"{title}\n{heading}" if title else heading, fontsize=10)
    fig.tight_layout()
    _save(fig, path)


def write_plots(ev, coco_gt, detections: list[dict], out_dir: str, *, img_ids: Sequence[int] | None = None,
                score_thr: float = CONFUSION_SCORE_THR, title: str = "") -> list[str]:
    """Write ``per_class.csv``, ``pr_curves.png``, ``confusion_matrix.png`` and ``confusion_matrix.csv``
    into ``out_dir`` (each atomically); returns their paths.

    ``ev`` is the evaluated ``COCOeval`` of :func:`run_cocoeval` on ``coco_gt`` and ``detections``.
    """
    paths = {name: os.path.join(out_dir, name)
             for name in ("per_class.csv", "pr_curves.png", "confusion_matrix.png", "confusion_matrix.csv")}
    atomic_text(paths["per_class.csv"], per_class_csv(per_class_ap(ev)))
    plot_pr_curves(ev, paths["pr_curves.png"], title=title)
    matrix = confusion_matrix(coco_gt, detections, img_ids=ev.params.imgIds if img_ids is None else img_ids,
                              score_thr=score_thr)
    rows, cols = confusion_labels(coco_gt)
    atomic_text(paths["confusion_matrix.csv"], _confusion_csv(matrix, rows, cols))
    plot_confusion_matrix(matrix, rows, cols, paths["confusion_matrix.png"], score_thr=score_thr, title=title)
    return list(paths.values())
