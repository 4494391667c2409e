"""Every config parses (no import lines), and a wrong data root is reported with the missing file."""

import glob
import os
import subprocess
import sys

import pytest
from mmengine.config import Config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.py"), recursive=True))
TOP = [c for c in CONFIGS if "_base_" not in c]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.relpath(p, ROOT))
def test_no_import_lines(path):
    with open(path) as f:
        lines = [ln for ln in f if ln.lstrip().startswith(("import ", "from "))]
    assert not lines, f"{path} has import lines (they break _base_ inheritance in a venv): {lines}"


@pytest.mark.parametrize("path", TOP, ids=os.path.basename)
def test_top_level_configs_are_complete(path):
    cfg = Config.fromfile(path)
    for key in ("model", "train_dataloader", "val_dataloader", "val_evaluator", "train_cfg", "optim_wrapper",
                "param_scheduler", "default_hooks"):
        assert key in cfg, key
    assert cfg.model.arch in ("retinanet", "faster_rcnn")
    assert cfg.val_evaluator.type == "CocoMetric"
    if "coco" in os.path.basename(path):
        # the torchvision recipe: 16 images per step on 8 GPUs, SGD with warm-up and steps at 8 and 11
        assert cfg.train_dataloader.batch_size * 8 == 16 and cfg.optim_wrapper.optimizer.type == "SGD"
        assert cfg.param_scheduler[0].type == "LinearLR" and cfg.param_scheduler[1].milestones == [8, 11]
        # GPU input pipeline: pinned batches copied without blocking the host
        assert cfg.train_dataloader.pin_memory and cfg.val_dataloader.pin_memory
        assert cfg.model.data_preprocessor == dict(type="BaseDataPreprocessor", non_blocking=True)


def test_missing_coco_data_names_the_file(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "tools", "train.py"),
           os.path.join(ROOT, "configs", "retinanet_r50_fpn_1x_coco.py"), "--data-root", str(tmp_path / "coco"),
           "--work-dir", str(tmp_path / "w"),
           "--cfg-options", "model.weights_backbone=None", "model.backbone=resnet18",
           "train_dataloader.num_workers=0", "train_dataloader.persistent_workers=False"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    # one line, no traceback, and the work dir it created is gone (nothing half-written)
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    missing = tmp_path / "coco" / "annotations" / "instances_train2017.json"
    assert out.stderr.startswith(f"error: annotation file not found: '{missing}'")
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("arch, typo, right", [("retinanet", "score_tresh", "score_thresh"),
                                               ("faster_rcnn", "box_score_tresh", "box_score_thresh")])
def test_build_detector_rejects_an_unknown_keyword_naming_the_closest(arch, typo, right):
    # torchvision's constructors swallow unknown keywords: a typo would silently keep the default
    from detectors import build_detector
    from detectors.errors import OptionError

    with pytest.raises(OptionError, match=rf"unknown key {typo}; did you mean '{right}'\?"):
        build_detector(arch, num_classes=3, backbone="resnet18", **{typo: 0.1})
