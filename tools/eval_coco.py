"""COCO box evaluation of a detections file, with pycocotools or faster-coco-eval.

    python tools/eval_coco.py data/shapes/annotations/instances_val.json work_dirs/dets.json
    python tools/eval_coco.py GT.json DETS.json --per-class --plots work_dirs/eval   # what fails, and where
    python tools/eval_coco.py GT.json DETS.json --backend fast   # pip install 'boxloss[fast-eval]'

DETS.json is a COCO results list: [{"image_id", "category_id", "bbox": [x, y, w, h], "score"}, ...];
a record with an unknown image or category, a NaN or infinite score or a negative size is an error
naming the file and the record (pycocotools would score it silently). Prints pycocotools' 12 summary
lines and a Markdown row (AP, AP50, AP75, APs, APm, APl).

--per-class prints AP, AP50, AP75, APs/m/l of each class as a Markdown table. --plots DIR writes
DIR/per_class.csv (the same table), DIR/pr_curves.png (precision-recall per class and their mean at
IoU 0.5 and 0.75), DIR/confusion_matrix.png and .csv (ground-truth class against predicted class at
IoU 0.5 for detections scoring at least --confusion-score-thr; a "background" row for detections of
nothing, a "missed" column for boxes nobody found). --backend fast gives the same 12 stats sooner.
"""

import argparse
import json
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402,F401  (repo root on sys.path)

from detectors.evaluation import MARKDOWN_HEADER, markdown_row  # noqa: E402  (re-exported for the tools)


def check_detections(dets, dets_file: str, gt) -> None:
    """Reject a results list pycocotools would score silently wrong: each record needs a known
    image and category, a finite score and a bbox of 4 finite numbers with non-negative size."""
    from detectors.errors import DataError

    if not isinstance(dets, list):
        raise DataError(f"{dets_file} must hold a JSON list of detections, got {type(dets).__name__}")
    images, cats = set(gt.getImgIds()), set(gt.getCatIds())
    for i, d in enumerate(dets):
        where = f"{dets_file}: detection {i}"
        if not isinstance(d, dict):
            raise DataError(f"{where} is not an object: {d!r}")
        missing = {"image_id", "category_id", "bbox", "score"} - set(d)
        if missing:
            raise DataError(f"{where} is missing {sorted(missing)}")
        if d["image_id"] not in images:
            raise DataError(f"{where} has image_id {d['image_id']!r}, not an image of the ground truth")
        if d["category_id"] not in cats:
            raise DataError(f"{where} has category_id {d['category_id']!r}; the ground truth has {sorted(cats)}")
        score, box = d["score"], d["bbox"]
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
            raise DataError(f"{where} has score {score!r}; it must be a finite number")
        if (not isinstance(box, list) or len(box) != 4
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box)):
            raise DataError(f"{where} has bbox {box!r}; it must be [x, y, w, h] of finite numbers")
        if box[2] < 0 or box[3] < 0:
            raise DataError(f"{where} has bbox {box!r} with a negative width or height")


def load(gt_file: str, dets_file: str):
    """Read and check both files; returns (pycocotools COCO of the ground truth, detections list)."""
    import contextlib
    import io

    from pycocotools.coco import COCO

    from detectors.data import validate_coco_annotations
    from detectors.errors import DataError, DataNotFoundError

    for name, path in (("GT.json", gt_file), ("DETS.json", dets_file)):
        if not os.path.isfile(path):
            raise DataNotFoundError(f"{name} file {path!r} does not exist")
    validate_coco_annotations(gt_file)
    try:
        with open(dets_file) as f:
            dets = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{dets_file}: not valid JSON ({e})") from None
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(gt_file)
    check_detections(dets, dets_file, gt)
    return gt, dets


def evaluate(gt_file: str, dets_file: str, *, backend: str = "pycocotools"):
    """Returns (12 COCO stats, pycocotools' summary text)."""
    from detectors.evaluation import coco_summary

    return coco_summary(*load(gt_file, dets_file), backend=backend)


def main(argv=None):
    from detectors.evaluation import BACKENDS, CONFUSION_SCORE_THR

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("gt", metavar="GT.json", help="COCO instances file (ground truth)")
    p.add_argument("dets", metavar="DETS.json", help="COCO results file (detections)")
    p.add_argument("--per-class", action="store_true", help="print AP, AP50, AP75, APs/m/l per class (Markdown)")
    p.add_argument("--plots", metavar="DIR", help="write per_class.csv, pr_curves.png, confusion_matrix.png/.csv there")
    # pycocotools is the reference; fast is faster-coco-eval's C++ COCOeval (an optional extra)
    p.add_argument("--backend", choices=BACKENDS, default="pycocotools", help="COCO evaluator (default: pycocotools)")
    # a typical deployment threshold: the matrix shows what a user of the detector would see
    p.add_argument("--confusion-score-thr", type=float, default=CONFUSION_SCORE_THR, metavar="T",
                   help=f"confusion matrix: detections scoring at least T (default {CONFUSION_SCORE_THR})")
    args = p.parse_args(argv)
    from detectors.evaluation import check_backend, per_class_ap, per_class_markdown, run_cocoeval, write_plots

    check_backend(args.backend)  # before reading the files: a missing extra is said at once
    gt, dets = load(args.gt, args.dets)
    ev, text = run_cocoeval(gt, dets, backend=args.backend)
    stats = np.asarray(ev.stats[:12], dtype=np.float64)
    print(text.rstrip())
    print()
    print(MARKDOWN_HEADER)
    print(markdown_row(stats))
    if args.per_class:
        print()
        print(per_class_markdown(per_class_ap(ev)))
    if args.plots:
        title = os.path.splitext(os.path.basename(args.dets))[0]
        for path in write_plots(ev, gt, dets, args.plots, score_thr=args.confusion_score_thr, title=title):
            print(f"wrote {path}")
    return stats


if __name__ == "__main__":
    _common.run_tool(main)
