"""detectors/evaluation.py: per-class AP, PR curves and the confusion matrix against COCOeval's own
arrays; the fast backend against pycocotools; optional extras that say which extra to install."""

import contextlib
import csv
import importlib.util
import io
import json
import os
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from detectors import evaluation
from detectors.engine import CocoMetric, check_config
from detectors.errors import OptionError
from detectors.evaluation import (confusion_labels, confusion_matrix, per_class_ap, per_class_csv,
                                  per_class_markdown, pr_curves, run_cocoeval)
from detectors.shapes import make_shapes

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import _common  # noqa: E402
import eval_coco  # noqa: E402

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
try:
    import faster_coco_eval  # noqa: F401

    HAVE_FAST = True
except ImportError:
    HAVE_FAST = False
needs_fast = pytest.mark.skipif(not HAVE_FAST, reason="faster-coco-eval is not installed (pip install '.[fast-eval]')")


def load_coco(path_or_dict) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        if isinstance(path_or_dict, dict):
            coco = COCO()
            coco.dataset = path_or_dict
            coco.createIndex()
            return coco
        return COCO(path_or_dict)


def random_fixture(seed=0, *, num_images=40, num_cats=5, size=(320, 240), crowd=True, dets_per_image=30):
    """Random COCO ground truth (small, medium and large boxes, a few crowd regions, one category
    without boxes) and detections: jittered copies of the boxes, some relabelled, and clutter."""
    rng = np.random.default_rng(seed)
    W, H = size
    gt = {"images": [], "annotations": [], "categories": [{"id": 10 * (c + 1), "name": f"cat{c}"} for c in range(num_cats)]}
    dets = []
    for i in range(1, num_images + 1):
        gt["images"].append({"id": i, "file_name": f"{i}.png", "width": W, "height": H})
        boxes = []
        for _ in range(rng.integers(1, 9)):
            side = np.exp(rng.uniform(np.log(8), np.log(150)))
            w, h = side * np.exp(rng.uniform(-0.4, 0.4)), side * np.exp(rng.uniform(-0.4, 0.4))
            w, h = min(w, W - 1), min(h, H - 1)
            x, y = rng.uniform(0, W - w), rng.uniform(0, H - h)
            cat = 10 * (int(rng.integers(0, num_cats - 1)) + 1)  # the last category has no boxes
            iscrowd = int(crowd and rng.random() < 0.05)
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": i, "category_id": cat,
                                      "bbox": [x, y, w, h], "area": w * h, "iscrowd": iscrowd})
            boxes.append((x, y, w, h, cat))
        for _ in range(dets_per_image):
            if boxes and rng.random() < 0.6:
                x, y, w, h, cat = boxes[rng.integers(len(boxes))]
                j = rng.normal(0, 0.12, 4)
                x, y, w, h = x + j[0] * w, y + j[1] * h, w * np.exp(j[2]), h * np.exp(j[3])
                if rng.random() < 0.15:
                    cat = 10 * (int(rng.integers(0, num_cats)) + 1)
            else:
                w, h = rng.uniform(5, 120, 2)
                x, y, cat = rng.uniform(0, W - w), rng.uniform(0, H - h), 10 * (int(rng.integers(0, num_cats)) + 1)
            dets.append({"image_id": i, "category_id": cat, "bbox": [float(x), float(y), float(w), float(h)],
                         "score": float(rng.random())})
    return gt, dets


@pytest.fixture(scope="module")
def shapes_val(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes_evaluation")
    return make_shapes(str(root), num_train=0, num_val=30, image_size=96, seed=11)["val"]


def noisy(gt_file, seed=0):
    """The ground truth jittered, 15% dropped, 10% relabelled, plus clutter: AP strictly between 0 and 1."""
    rng = np.random.default_rng(seed)
    data = json.load(open(gt_file))
    cats = [c["id"] for c in data["categories"]]
    dets = []
    for a in data["annotations"]:
        if rng.random() < 0.15:
            continue
        x, y, w, h = a["bbox"]
        j = rng.normal(0, 0.08, 4)
        cat = a["category_id"] if rng.random() > 0.1 else int(rng.choice(cats))
        dets.append({"image_id": a["image_id"], "category_id": cat,
                     "bbox": [x + j[0] * w, y + j[1] * h, max(1.0, w * (1 + j[2])), max(1.0, h * (1 + j[3]))],
                     "score": float(rng.random())})
    for img in data["images"][::2]:
        dets.append({"image_id": img["id"], "category_id": int(rng.choice(cats)), "bbox": [10, 10, 20, 20],
                     "score": float(rng.random())})
    return dets


def _ev(coco, dets, backend="pycocotools"):
    return run_cocoeval(coco, [dict(d) for d in dets], backend=backend)[0]


# --------------------------------------------------------------------------- per-class AP, PR curves


def test_per_class_ap_is_cocoeval_precision_averaged_as_pycocotools():
    gt, dets = random_fixture(1)
    ev = _ev(load_coco(gt), dets)
    precision = ev.eval["precision"]  # [T, R, K, A, M]
    rows = per_class_ap(ev)
    assert [r["category_id"] for r in rows] == [10, 20, 30, 40, 50]
    for k, row in enumerate(rows):
        block = precision[:, :, k, 0, 2]  # every IoU, every recall, category k, area all, maxDets 100
        expected = block[block > -1].mean() if (block > -1).any() else -1
        assert row["AP"] == pytest.approx(expected, abs=1e-12)
        assert row["AP50"] == pytest.approx(precision[0, :, k, 0, 2].mean() if expected != -1 else -1, abs=1e-12)
        assert row["AP75"] == pytest.approx(precision[5, :, k, 0, 2].mean() if expected != -1 else -1, abs=1e-12)
    assert rows[-1]["AP"] == -1 and rows[-1]["gt"] == 0  # the category without ground truth
    # the mean over categories with ground truth is pycocotools' stat, for every column
    for i, col in enumerate(("AP", "AP50", "AP75", "APs", "APm", "APl")):
        values = [r[col] for r in rows if r[col] > -1]
        assert np.mean(values) == pytest.approx(ev.stats[i], abs=1e-12), col
    # non-crowd boxes per category
    for row in rows:
        assert row["gt"] == sum(1 for a in gt["annotations"] if a["category_id"] == row["category_id"] and not a["iscrowd"])


def test_per_class_ap_hand_built(tmp_path):
    # category 1: two boxes; detections by score TP (0.9), FP (0.8), TP (0.7): precision envelope 1 up
    # to recall 0.5, 2/3 up to recall 1 -> 101-point AP = (51 + 50 * 2/3) / 101, at every IoU (exact boxes).
    # category 2: no ground truth -> n/a; category 3: one box, never detected -> 0.
    gt = {"images": [{"id": 1, "file_name": "a.png", "width": 100, "height": 100}],
          "categories": [{"id": 1, "name": "box"}, {"id": 2, "name": "none"}, {"id": 3, "name": "lost"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 40], "area": 1600, "iscrowd": 0},
                          {"id": 2, "image_id": 1, "category_id": 1, "bbox": [60, 60, 30, 30], "area": 900, "iscrowd": 0},
                          {"id": 3, "image_id": 1, "category_id": 3, "bbox": [5, 70, 20, 20], "area": 400, "iscrowd": 0}]}
    dets = [{"image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 40], "score": 0.9},
            {"image_id": 1, "category_id": 1, "bbox": [0, 60, 20, 20], "score": 0.8},
            {"image_id": 1, "category_id": 1, "bbox": [60, 60, 30, 30], "score": 0.7}]
    rows = per_class_ap(_ev(load_coco(gt), dets))
    ap = (51 + 50 * 2 / 3) / 101
    assert [r["class"] for r in rows] == ["box", "none", "lost"]
    assert rows[0]["AP"] == pytest.approx(ap) and rows[0]["AP50"] == pytest.approx(ap) and rows[0]["AP75"] == pytest.approx(ap)
    # by size: the 40x40 box is medium and found first (APm 1; the small false positive is outside the
    # range, ignored); the 30x30 box is small, found after the small false positive (APs 1/2)
    assert rows[0]["APm"] == pytest.approx(1) and rows[0]["APs"] == pytest.approx(0.5) and rows[0]["APl"] == -1
    assert rows[1]["AP"] == -1 and rows[2]["AP"] == 0
    table = per_class_markdown(rows)
    assert table.splitlines()[0] == "| class | GT boxes | AP | AP50 | AP75 | APs | APm | APl |"
    assert f"| box | 2 | {100 * ap:.1f} | {100 * ap:.1f} | {100 * ap:.1f} | 50.0 | 100.0 | n/a |" in table
    assert "| none | 0 | n/a | n/a | n/a | n/a | n/a | n/a |" in table
    assert f"| all (mean) | 3 | {50 * ap:.1f} |" in table  # mean over "box" and "lost"
    lines = list(csv.reader(io.StringIO(per_class_csv(rows))))
    assert lines[0] == ["category_id", "class", "gt", "AP", "AP50", "AP75", "APs", "APm", "APl"]
    assert lines[1] == ["1", "box", "2"] + [f"{v:.6f}" for v in (ap, ap, ap, 0.5, 1)] + [""]
    assert lines[2][3:] == [""] * 6


def test_pr_curves_are_cocoeval_precision_slices():
    gt, dets = random_fixture(2)
    ev = _ev(load_coco(gt), dets)
    for thr, t, stat in ((0.5, 0, 1), (0.75, 5, 2)):
        recall, precision, overall = pr_curves(ev, thr)
        np.testing.assert_array_equal(recall, ev.params.recThrs)
        np.testing.assert_array_equal(precision, ev.eval["precision"][t, :, :, 0, 2].T)
        valid = precision[:, 0] > -1
        np.testing.assert_allclose(overall, precision[valid].mean(axis=0), rtol=0, atol=1e-12)
        assert overall.mean() == pytest.approx(ev.stats[stat], abs=1e-12)
    np.testing.assert_array_equal(pr_curves(ev, 0.6)[1], ev.eval["precision"][2, :, :, 0, 2].T)
    with pytest.raises(OptionError, match="IoU threshold 0.62 is not one of the evaluated"):
        pr_curves(ev, 0.62)


# --------------------------------------------------------------------------- confusion matrix


def test_confusion_matrix_hand_built():
    # boxes: A (cat 1), B (cat 2), C (cat 1, nobody finds it); detections by score:
    # 0.9 cat 1 on A: TP; 0.8 cat 1 on A: duplicate -> background row; 0.7 cat 1 on B: a cat-2 box seen
    # as cat 1; 0.6 cat 2 on nothing: background; 0.1 cat 2 on C: below the score threshold, left out.
    gt = {"images": [{"id": 1, "file_name": "a.png", "width": 200, "height": 200}],
          "categories": [{"id": 1, "name": "one"}, {"id": 2, "name": "two"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 40], "iscrowd": 0},
                          {"id": 2, "image_id": 1, "category_id": 2, "bbox": [100, 10, 40, 40], "iscrowd": 0},
                          {"id": 3, "image_id": 1, "category_id": 1, "bbox": [10, 120, 40, 40], "iscrowd": 0}]}
    dets = [{"image_id": 1, "category_id": 1, "bbox": [11, 11, 40, 40], "score": 0.9},
            {"image_id": 1, "category_id": 1, "bbox": [12, 10, 38, 40], "score": 0.8},
            {"image_id": 1, "category_id": 1, "bbox": [101, 11, 40, 40], "score": 0.7},
            {"image_id": 1, "category_id": 2, "bbox": [150, 150, 30, 30], "score": 0.6},
            {"image_id": 1, "category_id": 2, "bbox": [10, 120, 40, 40], "score": 0.1}]
    coco = load_coco(gt)
    matrix = confusion_matrix(coco, dets, score_thr=0.3)
    #                         one two missed
    np.testing.assert_array_equal(matrix, [[1, 0, 1],    # one
                                           [1, 0, 0],    # two
                                           [1, 1, 0]])   # background
    assert confusion_labels(coco) == (["one", "two", "background"], ["one", "two", "missed"])
    # at threshold 0 the 0.1 detection is a cat-1 box seen as cat 2, and nothing is missed
    np.testing.assert_array_equal(confusion_matrix(coco, dets, score_thr=0.0), [[1, 1, 0], [1, 0, 0], [1, 1, 0]])


def test_confusion_matrix_counts_every_box_and_detection_once():
    gt, dets = random_fixture(3)
    coco = load_coco(gt)
    matrix = confusion_matrix(coco, dets, score_thr=0.3)
    C = len(gt["categories"])
    for k, cat in enumerate(sorted(c["id"] for c in gt["categories"])):
        boxes = sum(1 for a in gt["annotations"] if a["category_id"] == cat and not a["iscrowd"])
        assert matrix[k].sum() == boxes
        kept = sum(1 for d in dets if d["category_id"] == cat and d["score"] >= 0.3)
        assert matrix[:, k].sum() <= kept  # detections inside crowd regions are left out
    assert matrix[C, C] == 0 and matrix[:C, :C].trace() > 0 and matrix[:C, :C].sum() > matrix[:C, :C].trace()
    no_crowd, dets2 = random_fixture(3, crowd=False)
    m2 = confusion_matrix(load_coco(no_crowd), dets2, score_thr=0.3)
    for k in range(C):
        assert m2[:, k].sum() == sum(1 for d in dets2 if d["category_id"] == 10 * (k + 1) and d["score"] >= 0.3)


# --------------------------------------------------------------------------- tools and metric


def test_eval_coco_per_class_and_plots(shapes_val, tmp_path, capsys):
    dets = noisy(shapes_val)
    path = tmp_path / "dets.json"
    path.write_text(json.dumps(dets))
    plots = tmp_path / "plots"
    stats = eval_coco.main([shapes_val, str(path), "--per-class", "--plots", str(plots)])
    out = capsys.readouterr().out
    ev = _ev(load_coco(shapes_val), dets)
    np.testing.assert_array_equal(stats, ev.stats)
    assert per_class_markdown(per_class_ap(ev)) in out
    assert sorted(os.listdir(plots)) == ["confusion_matrix.csv", "confusion_matrix.png", "per_class.csv", "pr_curves.png"]
    for name in ("pr_curves.png", "confusion_matrix.png"):
        with Image.open(plots / name) as im:
            assert im.format == "PNG" and im.width > 400 and im.height > 300
    rows = list(csv.reader(open(plots / "confusion_matrix.csv")))
    assert rows[0] == ["ground truth \\ prediction", "rectangle", "ellipse", "triangle", "cross", "missed"]
    assert rows[-1][0] == "background"
    assert (plots / "per_class.csv").read_text() == per_class_csv(per_class_ap(ev))
    assert os.stat(plots / "per_class.csv").st_mode & 0o777 == 0o666 & ~_umask()


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_coco_metric_per_class_and_plots(shapes_val, tmp_path):
    dets = noisy(shapes_val, seed=3)
    metric = CocoMetric(ann_file=shapes_val, per_class=True, plots_dir=str(tmp_path / "plots"), confusion_score_thr=0.5)
    samples = {}
    for d in dets:
        x, y, w, h = d["bbox"]
        samples.setdefault(d["image_id"], []).append(([x, y, x + w, y + h], d["score"], d["category_id"]))
    import torch

    metric.process({}, [{"image_id": i, "boxes": torch.tensor([r[0] for r in rows], dtype=torch.float64),
                         "scores": torch.tensor([r[1] for r in rows]),
                         "labels": torch.tensor([r[2] for r in rows])} for i, rows in sorted(samples.items())])
    result = metric.evaluate(size=len(samples))
    ev_ids = run_cocoeval(load_coco(shapes_val), [dict(d) for d in dets], sorted(samples))[0]
    assert result["coco/bbox_mAP"] == pytest.approx(ev_ids.stats[0], abs=1e-6)
    assert len(os.listdir(tmp_path / "plots")) == 4
    text = (tmp_path / "plots" / "confusion_matrix.csv").read_text()
    matrix = confusion_matrix(load_coco(shapes_val), dets, img_ids=sorted(samples), score_thr=0.5)
    assert text.splitlines()[1] == "rectangle," + ",".join(str(v) for v in matrix[0])


def test_config_accepts_the_new_metric_keys():
    from mmengine.config import Config

    good = Config(dict(val_evaluator=dict(type="CocoMetric", ann_file="x.json", per_class=True, plots_dir="p",
                                          backend="pycocotools", confusion_score_thr=0.5)))
    check_config(good)
    bad = Config(dict(val_evaluator=dict(type="CocoMetric", ann_file="x.json", per_clas=True)))
    with pytest.raises(OptionError, match="unknown key val_evaluator.per_clas; did you mean 'per_class'"):
        check_config(bad)


def test_unknown_backend_is_an_option_error(shapes_val):
    with pytest.raises(OptionError, match="backend must be 'pycocotools' or 'fast', got 'slow'"):
        evaluation.check_backend("slow")
    with pytest.raises(OptionError, match="backend must be"):
        CocoMetric(ann_file=shapes_val, backend="slow")


# --------------------------------------------------------------------------- optional extras


def test_missing_fast_extra_names_the_extra(shapes_val, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "faster_coco_eval", None)  # import faster_coco_eval -> ImportError
    message = r"--backend fast needs faster_coco_eval, an optional extra: pip install 'boxloss\[fast-eval\]'"
    with pytest.raises(OptionError, match=message):
        evaluation.check_backend("fast")
    with pytest.raises(OptionError, match=message):
        CocoMetric(ann_file=shapes_val, backend="fast")
    path = tmp_path / "dets.json"
    path.write_text(json.dumps(noisy(shapes_val)))
    with pytest.raises(SystemExit) as exit_info:
        _common.run_tool(lambda: eval_coco.main([shapes_val, str(path), "--backend", "fast"]))
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == ("error: --backend fast needs faster_coco_eval, an optional extra: "
                            "pip install 'boxloss[fast-eval]'\n")
    # tools/test.py (loaded by path: "test" is also a standard-library package) refuses before reading anything
    spec = importlib.util.spec_from_file_location("tools_test", os.path.join(ROOT, "tools", "test.py"))
    test_tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(test_tool)
    with pytest.raises(OptionError, match=message):
        test_tool.main(["configs/retinanet_r18_shapes.py", "no_such.pth", "--backend", "fast"])
    # pycocotools stays available
    assert eval_coco.main([shapes_val, str(path)])[0] > 0


def test_missing_tensorboard_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(OptionError, match=r"--tensorboard needs tensorboard, an optional extra: "
                                          r"pip install 'boxloss\[tensorboard\]'"):
        evaluation.require_extra("tensorboard", extra="tensorboard", what="--tensorboard")


def test_tensorboard_vis_backend_writes_events(tmp_path):
    """The docs' config snippet: mmengine's TensorboardVisBackend beside the local one."""
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install '.[tensorboard]')")
    from mmengine.visualization import Visualizer

    cfg = dict(type="Visualizer", vis_backends=[dict(type="LocalVisBackend"), dict(type="TensorboardVisBackend")])
    vis = Visualizer.get_instance("test_tensorboard_evaluation", vis_backends=cfg["vis_backends"], save_dir=str(tmp_path))
    vis.add_scalars({"coco/bbox_mAP": 0.25}, step=1)
    vis.close()
    events = [f for _, _, files in os.walk(tmp_path) for f in files if f.startswith("events.out.tfevents")]
    assert events, "no TensorBoard event file written"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder = next(root for root, _, files in os.walk(tmp_path) if any(f.startswith("events.out") for f in files))
    acc = EventAccumulator(folder)
    acc.Reload()
    assert [e.value for e in acc.Scalars("coco/bbox_mAP")] == [pytest.approx(0.25)]


def test_tensorboard_option_checks_its_keys_and_names_the_extra(monkeypatch):
    from mmengine.config import Config

    from detectors.engine import apply_tensorboard

    cfg = Config(dict(tensorboard=dict(num_imgs=2)))
    with pytest.raises(OptionError, match=r"tensorboard.*num_imgs.*did you mean 'num_images'"):
        apply_tensorboard(cfg)
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(OptionError, match=r"needs tensorboard, an optional extra: pip install 'boxloss\[tensorboard\]'"):
        apply_tensorboard(Config(dict(tensorboard=True)))
    off = Config(dict(tensorboard=False))
    apply_tensorboard(off)  # off: no extra needed, nothing added
    assert "custom_hooks" not in off


def test_detection_images_hook_draws_ground_truth_and_detections_where_they_are(tmp_path):
    """A black 128x128 image, one ground-truth box and two detections: the detection above score_thr
    is a solid rectangle in its class colour, the ground truth a dashed one in its class colour, the
    detection below score_thr is not drawn."""
    import torch
    from PIL import Image

    from detectors.drawing import PALETTE
    from detectors.engine import DetectionImagesHook

    Image.fromarray(np.zeros((128, 128, 3), np.uint8)).save(tmp_path / "a.png")
    coco = SimpleNamespace(imgs={7: {"file_name": "a.png"}}, cats={3: {"name": "circle"}, 9: {"name": "square"}},
                           imgToAnns={7: [{"bbox": [10, 20, 40, 60], "category_id": 3, "iscrowd": 0}]})
    dataset = SimpleNamespace(coco=coco, img_dir=str(tmp_path), cat_ids=[3, 9])
    result = {"boxes": torch.tensor([[70.0, 60.0, 120.0, 110.0], [5.0, 100.0, 40.0, 125.0]]),
              "scores": torch.tensor([0.9, 0.1]), "labels": torch.tensor([2, 1])}
    image = DetectionImagesHook(num_images=1, score_thr=0.3, size=128).draw(dataset, 7, result)
    assert image.shape == (128, 128, 3) and image.dtype == np.uint8
    square, circle = PALETTE[1], PALETTE[0]  # labels 1, 2 are the sorted category ids 3, 9
    bottom = image[110, 72:118]  # the detection's bottom edge, away from its tag (above its top edge)
    assert all(tuple(p) == square for p in bottom)
    left = [tuple(p) for p in image[22:78, 10]]  # the ground truth's left edge (xywh 10, 20, 40, 60)
    assert left.count(circle) > len(left) // 3 and left.count((0, 0, 0)) > 5  # dashed
    assert not image[104:124, 8:38].any()  # the 0.1 detection is not drawn


@pytest.mark.slow
def test_tensorboard_flag_logs_metrics_and_detection_images(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install '.[tensorboard]')")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from test_train import _run, tiny_config

    cfg = tiny_config(tmp_path, str(tmp_path / "shapes"), epochs=1)
    run = _run([cfg, "--work-dir", str(tmp_path / "w"), "--tensorboard"], timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    folder = next(root for root, _, files in os.walk(tmp_path / "w") if any(f.startswith("events.out") for f in files))
    acc = EventAccumulator(folder, size_guidance={"images": 0})
    acc.Reload()
    assert "coco/bbox_mAP" in acc.Tags()["scalars"] and "loss" in acc.Tags()["scalars"]
    images = [t for t in acc.Tags()["images"] if t.startswith("detections/")]
    assert len(images) == 4  # the tiny config's 4 validation images
    assert all(acc.Images(t)[0].width == 512 for t in images)  # 64-px images drawn at the default size


# --------------------------------------------------------------------------- the fast backend


def _assert_same_stats(fast, ref):
    diff = np.abs(np.asarray(fast) - np.asarray(ref))
    differing = [f"{n}: fast {f:.9f} vs pycocotools {r:.9f}" for n, f, r, d in zip(STAT_NAMES, fast, ref, diff) if d > 1e-6]
    assert not differing, "faster-coco-eval differs from pycocotools: " + "; ".join(differing)


@needs_fast
def test_fast_backend_equals_pycocotools_on_shapes(shapes_val, tmp_path):
    dets = noisy(shapes_val, seed=5)
    coco = load_coco(shapes_val)
    ref, fast = _ev(coco, dets), _ev(coco, dets, backend="fast")
    _assert_same_stats(fast.stats, ref.stats)
    np.testing.assert_allclose(fast.eval["precision"], ref.eval["precision"], rtol=0, atol=1e-12)
    rows_fast, rows_ref = per_class_ap(fast), per_class_ap(ref)
    assert [r["class"] for r in rows_fast] == [r["class"] for r in rows_ref]
    np.testing.assert_allclose([r["AP"] for r in rows_fast], [r["AP"] for r in rows_ref], atol=1e-12)
    path = tmp_path / "dets.json"
    path.write_text(json.dumps(dets))
    stats_ref, text_ref = eval_coco.evaluate(shapes_val, str(path))
    stats_fast, text_fast = eval_coco.evaluate(shapes_val, str(path), backend="fast")
    _assert_same_stats(stats_fast, stats_ref)
    assert text_fast == text_ref  # the same 12 summary lines


@needs_fast
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fast_backend_equals_pycocotools_on_random_fixture(seed):
    gt, dets = random_fixture(seed, num_images=60)
    coco = load_coco(gt)
    ref, fast = _ev(coco, dets), _ev(coco, dets, backend="fast")
    _assert_same_stats(fast.stats, ref.stats)
    np.testing.assert_allclose(fast.eval["precision"], ref.eval["precision"], rtol=0, atol=1e-12)
    # no detections at all: zeros, and -1 where a size has no ground truth
    _assert_same_stats(_ev(coco, [], backend="fast").stats, _ev(coco, []).stats)


@needs_fast
def test_fast_backend_in_coco_metric(shapes_val):
    import torch

    dets = noisy(shapes_val, seed=6)
    results = {}
    for backend in ("pycocotools", "fast"):
        metric = CocoMetric(ann_file=shapes_val, backend=backend)
        per_image = {}
        for d in dets:
            x, y, w, h = d["bbox"]
            per_image.setdefault(d["image_id"], []).append(([x, y, x + w, y + h], d["score"], d["category_id"]))
        metric.process({}, [{"image_id": i, "boxes": torch.tensor([r[0] for r in rows], dtype=torch.float64),
                             "scores": torch.tensor([r[1] for r in rows]), "labels": torch.tensor([r[2] for r in rows])}
                            for i, rows in sorted(per_image.items())])
        results[backend] = metric.evaluate(size=len(per_image))
    assert results["fast"] == pytest.approx(results["pycocotools"], abs=1e-6)


# --------------------------------------------------------------------------- benchmark


def coco_val_sized(seed=0, num_images=5000, num_cats=80, dets_per_image=100):
    """COCO-val-sized synthetic set: 5,000 640x480 images, ~7.3 boxes each (~36k), 100 detections each."""
    rng = np.random.default_rng(seed)
    W, H = 640, 480
    gt = {"images": [], "annotations": [], "categories": [{"id": c + 1, "name": f"c{c}"} for c in range(num_cats)]}
    dets = []
    for i in range(1, num_images + 1):
        gt["images"].append({"id": i, "file_name": f"{i}.jpg", "width": W, "height": H})
        n = int(rng.integers(1, 14))  # mean 7.3
        side = np.exp(rng.uniform(np.log(6), np.log(300), n))
        w = np.minimum(side * np.exp(rng.uniform(-0.5, 0.5, n)), W - 1)
        h = np.minimum(side * np.exp(rng.uniform(-0.5, 0.5, n)), H - 1)
        x, y = rng.uniform(0, W - w), rng.uniform(0, H - h)
        cats = rng.integers(1, num_cats + 1, n)
        for k in range(n):
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": i, "category_id": int(cats[k]),
                                      "bbox": [float(x[k]), float(y[k]), float(w[k]), float(h[k])],
                                      "area": float(w[k] * h[k]), "iscrowd": 0})
        src = rng.integers(0, n, dets_per_image)
        near = rng.random(dets_per_image) < 0.5
        j = rng.normal(0, 0.15, (dets_per_image, 4))
        dw, dh = rng.uniform(5, 200, dets_per_image), rng.uniform(5, 200, dets_per_image)
        for d in range(dets_per_image):
            if near[d]:
                k = src[d]
                bw, bh = w[k] * np.exp(j[d, 2]), h[k] * np.exp(j[d, 3])
                box = [x[k] + j[d, 0] * w[k], y[k] + j[d, 1] * h[k], bw, bh]
                cat = int(cats[k]) if rng.random() > 0.1 else int(rng.integers(1, num_cats + 1))
            else:
                box = [rng.uniform(0, W - dw[d]), rng.uniform(0, H - dh[d]), dw[d], dh[d]]
                cat = int(rng.integers(1, num_cats + 1))
            dets.append({"image_id": i, "category_id": cat, "bbox": [float(v) for v in box], "score": float(rng.random())})
    return gt, dets


@pytest.mark.slow
@needs_fast
def test_benchmark_fast_backend_on_coco_val_sized_set(capsys):
    """Prints the time of each backend (loadRes + evaluate + accumulate + summarize, as the tools run
    them) on a COCO-val-sized set, and checks the stats agree. docs/evaluation.md has the figures."""
    gt, dets = coco_val_sized()
    coco = load_coco(gt)
    timings, stats = {}, {}
    for backend in ("pycocotools", "fast"):
        start = time.perf_counter()
        ev = _ev(coco, dets, backend=backend)
        timings[backend] = time.perf_counter() - start
        stats[backend] = ev.stats
    _assert_same_stats(stats["fast"], stats["pycocotools"])
    with capsys.disabled():
        print(f"\n{len(gt['images'])} images, {len(gt['annotations'])} boxes, {len(dets)} detections: "
              f"pycocotools {timings['pycocotools']:.1f} s, faster-coco-eval {timings['fast']:.1f} s, "
              f"ratio {timings['pycocotools'] / timings['fast']:.1f}x")
