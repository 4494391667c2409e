"""COCO evaluation: tools/eval_coco.py and CocoMetric against pycocotools run directly."""

import contextlib
import io
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detectors.engine import CocoMetric
from detectors.errors import DataError, DataNotFoundError
from detectors.shapes import make_shapes

TOOLS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tools")
sys.path.insert(0, TOOLS)
import eval_coco  # noqa: E402


@pytest.fixture(scope="module")
def gt_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes_eval")
    return make_shapes(str(root), num_train=0, num_val=30, image_size=96, seed=7)["val"]


def noisy_detections(gt_file, seed=0):
    """Ground truth jittered, some boxes dropped, false positives added: AP strictly between 0 and 1."""
    rng = random.Random(seed)
    data = json.load(open(gt_file))
    dets = []
    for a in data["annotations"]:
        if rng.random() < 0.15:
            continue
        x, y, w, h = a["bbox"]
        j = [rng.gauss(0, 0.08 * w), rng.gauss(0, 0.08 * h), rng.gauss(0, 0.08 * w), rng.gauss(0, 0.08 * h)]
        dets.append({"image_id": a["image_id"], "category_id": a["category_id"],
                     "bbox": [x + j[0], y + j[1], max(1.0, w + j[2]), max(1.0, h + j[3])], "score": rng.random()})
    for img in data["images"][::3]:
        dets.append({"image_id": img["id"], "category_id": rng.randint(1, 4), "bbox": [10, 10, 20, 20],
                     "score": rng.random()})
    return dets


def pycocotools_stats(gt_file, dets):
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(gt_file)
        ev = COCOeval(gt, gt.loadRes(dets), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return np.asarray(ev.stats)


def test_eval_coco_equals_pycocotools(gt_file, tmp_path, capsys):
    dets = noisy_detections(gt_file)
    path = tmp_path / "dets.json"
    path.write_text(json.dumps(dets))
    stats = eval_coco.main([gt_file, str(path)])
    ref = pycocotools_stats(gt_file, dets)
    np.testing.assert_array_equal(stats, ref)
    assert 0.2 < ref[0] < 0.95
    out = capsys.readouterr().out
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all" in out
    assert eval_coco.markdown_row(ref) in out


def test_perfect_detections_give_ap_one(gt_file, tmp_path):
    data = json.load(open(gt_file))
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
            for a in data["annotations"]]
    path = tmp_path / "dets.json"
    path.write_text(json.dumps(dets))
    stats, _ = eval_coco.evaluate(gt_file, str(path))
    assert stats[0] == pytest.approx(1.0) and stats[1] == pytest.approx(1.0)


def test_hand_built_ap(tmp_path):
    # one image, two ground-truth boxes; detections by score: TP (0.9), FP (0.8), TP (0.7).
    # precision envelope: 1 up to recall 0.5, 2/3 up to recall 1 -> 101-point AP = (51 + 50 * 2/3) / 101
    gt = {"images": [{"id": 1, "file_name": "a.png", "width": 100, "height": 100}],
          "categories": [{"id": 1, "name": "box"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 40], "area": 1600, "iscrowd": 0},
                          {"id": 2, "image_id": 1, "category_id": 1, "bbox": [60, 60, 30, 30], "area": 900, "iscrowd": 0}]}
    dets = [{"image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 40], "score": 0.9},
            {"image_id": 1, "category_id": 1, "bbox": [0, 60, 20, 20], "score": 0.8},
            {"image_id": 1, "category_id": 1, "bbox": [60, 60, 30, 30], "score": 0.7}]
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    stats, _ = eval_coco.evaluate(str(tmp_path / "gt.json"), str(tmp_path / "dets.json"))
    assert stats[0] == pytest.approx((51 + 50 * 2 / 3) / 101)
    assert stats[1] == pytest.approx((51 + 50 * 2 / 3) / 101)


def _write(tmp_path, name, obj):
    path = tmp_path / name
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return str(path)


def test_eval_coco_errors(gt_file, tmp_path):
    with pytest.raises(DataNotFoundError, match="DETS.json file .*nope.json' does not exist"):
        eval_coco.evaluate(gt_file, str(tmp_path / "nope.json"))
    with pytest.raises(DataError, match=r"d.json: detection 0 is missing \['category_id'\]"):
        eval_coco.evaluate(gt_file, _write(tmp_path, "d.json", [{"image_id": 1, "bbox": [0, 0, 1, 1], "score": 1}]))
    with pytest.raises(DataError, match=r"bad.json: not valid JSON"):
        eval_coco.evaluate(gt_file, _write(tmp_path, "bad.json", "[{"))


@pytest.mark.parametrize("field, value, message", [
    ("score", float("nan"), "has score nan; it must be a finite number"),
    ("score", float("inf"), "has score inf; it must be a finite number"),
    ("category_id", 99, "has category_id 99; the ground truth has \\[1, 2, 3, 4\\]"),
    ("image_id", 12345, "has image_id 12345, not an image of the ground truth"),
    ("bbox", [10, 10, -3, 5], "with a negative width or height"),
    ("bbox", [10, 10, 5, float("nan")], "must be \\[x, y, w, h\\] of finite numbers"),
    ("bbox", [10, 10, 5], "must be \\[x, y, w, h\\] of finite numbers"),
])
def test_eval_coco_rejects_records_pycocotools_would_score(gt_file, tmp_path, field, value, message):
    """A NaN score gave AP 100 and an unknown category was ignored, exit 0; each record is an error now,
    naming the file and the record's index."""
    dets = noisy_detections(gt_file)[:5]
    dets[3][field] = value
    path = tmp_path / "dets.json"
    path.write_text(json.dumps(dets))  # json writes NaN / Infinity, as numpy-based exporters do
    with pytest.raises(DataError, match=f"dets.json: detection 3 .*{message}"):
        eval_coco.evaluate(gt_file, str(path))


def test_eval_coco_cli_error_is_one_line(gt_file, tmp_path):
    path = _write(tmp_path, "dets.json", [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1], "score": float("nan")}])
    out = subprocess.run([sys.executable, os.path.join(TOOLS, "eval_coco.py"), gt_file, path],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr == f"error: {path}: detection 0 has score nan; it must be a finite number\n"


def test_no_detections_score_zero_and_empty_areas_na(tmp_path):
    """No detections: 0 where there is ground truth, pycocotools' -1 (printed n/a) where there is none
    (here no large object); before, every stat was 0.0."""
    gt = {"images": [{"id": 1, "file_name": "a.png", "width": 100, "height": 100}],
          "categories": [{"id": 1, "name": "box"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 40], "area": 1600, "iscrowd": 0},
                          {"id": 2, "image_id": 1, "category_id": 1, "bbox": [50, 50, 5, 5], "area": 25, "iscrowd": 0}]}
    stats, _ = eval_coco.evaluate(_write(tmp_path, "gt.json", gt), _write(tmp_path, "e.json", []))
    # AP, AP50, AP75, APs, APm: 0; APl: no large ground truth; ARs likewise
    np.testing.assert_array_equal(stats, [0, 0, 0, 0, 0, -1, 0, 0, 0, 0, 0, -1])
    assert eval_coco.markdown_row(stats) == "| 0.0 | 0.0 | 0.0 | 0.0 | 0.0 | n/a |"


def _metric_samples(dets, with_empty_image=None):
    """CocoMetric input: one dict per image, xyxy boxes, labels 1..C (category ids are 1..4 here)."""
    per_image = {}
    for d in dets:
        x, y, w, h = d["bbox"]
        per_image.setdefault(d["image_id"], []).append(([x, y, x + w, y + h], d["score"], d["category_id"]))
    if with_empty_image is not None:
        per_image.setdefault(with_empty_image, [])
    samples = []
    for image_id, rows in sorted(per_image.items()):
        samples.append({
            "image_id": image_id,
            "boxes": torch.tensor([r[0] for r in rows], dtype=torch.float64).reshape(-1, 4),
            "scores": torch.tensor([r[1] for r in rows]),
            "labels": torch.tensor([r[2] for r in rows], dtype=torch.int64),
        })
    return samples


def test_coco_metric_equals_pycocotools(gt_file, tmp_path):
    dets = noisy_detections(gt_file, seed=1)
    metric = CocoMetric(ann_file=gt_file, out_file=str(tmp_path / "out.json"))
    data = json.load(open(gt_file))
    samples = _metric_samples(dets)
    for img in data["images"]:  # every image gets a result, detections or not
        if img["id"] not in {s["image_id"] for s in samples}:
            samples.append(_metric_samples([], with_empty_image=img["id"])[0])
    metric.process({}, samples)
    result = metric.evaluate(size=len(samples))
    ref = pycocotools_stats(gt_file, json.load(open(tmp_path / "out.json")))
    assert result["coco/bbox_mAP"] == pytest.approx(ref[0])
    assert result["coco/bbox_mAP_50"] == pytest.approx(ref[1])
    assert result["coco/bbox_mAP_l"] == pytest.approx(ref[5])
    assert result["coco/bbox_mAP"] == pytest.approx(pycocotools_stats(gt_file, dets)[0], abs=1e-6)


def test_coco_metric_without_detections(gt_file):
    metric = CocoMetric(ann_file=gt_file)
    metric.process({}, _metric_samples([], with_empty_image=1))
    assert metric.evaluate(size=1)["coco/bbox_mAP"] == 0.0
    with pytest.raises(FileNotFoundError, match="evaluator ann_file 'nope.json' does not exist"):
        CocoMetric(ann_file="nope.json")
