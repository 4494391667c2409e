"""COCO box evaluation of a detections file with pycocotools.

    python tools/eval_coco.py data/shapes/annotations/instances_val.json work_dirs/dets.json

DETS.json is a COCO results list: [{"image_id", "category_id", "bbox": [x, y, w, h], "score"}, ...].
Prints pycocotools' 12 summary lines and a Markdown row (AP, AP50, AP75, APs, APm, APl).
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402,F401  (repo root on sys.path)

MARKDOWN_HEADER = "| AP | AP50 | AP75 | APs | APm | APl |\n| --- | --- | --- | --- | --- | --- |"


def markdown_row(stats) -> str:
    """AP, AP50, AP75, APs, APm, APl in percent; pycocotools' -1 (no ground truth of that size) is n/a."""
    return "| " + " | ".join("n/a" if v < 0 else f"{100 * v:.1f}" for v in stats[:6]) + " |"


def evaluate(gt_file: str, dets_file: str):
    """Returns (12 COCO stats, pycocotools' summary text)."""
    import contextlib
    import io

    from pycocotools.coco import COCO

    from detectors.engine import coco_summary

    for name, path in (("GT.json", gt_file), ("DETS.json", dets_file)):
        if not os.path.isfile(path):
            raise SystemExit(f"error: {name} file {path!r} does not exist")
    with open(dets_file) as f:
        dets = json.load(f)
    if not isinstance(dets, list):
        raise SystemExit(f"error: {dets_file} must hold a JSON list of detections, got {type(dets).__name__}")
    for i, d in enumerate(dets):
        missing = {"image_id", "category_id", "bbox", "score"} - set(d)
        if missing:
            raise SystemExit(f"error: {dets_file}: detection {i} is missing {sorted(missing)}")
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(gt_file)
    unknown = {d["image_id"] for d in dets} - set(gt.getImgIds())
    if unknown:
        raise SystemExit(f"error: {dets_file} has image ids not in {gt_file}: {sorted(unknown)[:10]}")
    return coco_summary(gt, dets)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("gt", metavar="GT.json", help="COCO instances file (ground truth)")
    p.add_argument("dets", metavar="DETS.json", help="COCO results file (detections)")
    args = p.parse_args(argv)
    stats, text = evaluate(args.gt, args.dets)
    print(text.rstrip())
    print()
    print(MARKDOWN_HEADER)
    print(markdown_row(stats))
    return stats


if __name__ == "__main__":
    main()
