"""tools/plot_curves.py: the curves of a work dir merged across resumed runs."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                "tools"))
import plot_curves  # noqa: E402

from detectors.errors import DataNotFoundError  # noqa: E402


def _run(work_dir, stamp, records):
    folder = work_dir / stamp / "vis_data"
    folder.mkdir(parents=True)
    (folder / "scalars.json").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_resumed_run_replaces_the_steps_it_repeats(tmp_path):
    # the first run got to iteration 30 and validated epoch 1; the resumed one restarted at 20
    _run(tmp_path, "20261206_100000", [
        {"loss": 2.0, "loss_box_reg": 1.0, "lr": 0.1, "step": 10},
        {"loss": 1.8, "loss_box_reg": 0.9, "step": 20},
        {"loss": 1.7, "loss_box_reg": 0.8, "step": 30},
        {"coco/bbox_mAP": 0.1, "coco/bbox_mAP_50": 0.3, "step": 1},
    ])
    _run(tmp_path, "20261206_110000", [
        {"loss": 1.6, "loss_box_reg": 0.7, "step": 30},
        {"loss": 1.5, "loss_box_reg": 0.6, "step": 40},
        {"coco/bbox_mAP": 0.2, "coco/bbox_mAP_50": 0.4, "step": 2},
    ])
    train, val = plot_curves.read_curves(str(tmp_path))
    assert train == {10: {"loss": 2.0, "loss_box_reg": 1.0}, 20: {"loss": 1.8, "loss_box_reg": 0.9},
                     30: {"loss": 1.6, "loss_box_reg": 0.7}, 40: {"loss": 1.5, "loss_box_reg": 0.6}}
    assert val == {1: {"mAP": 0.1, "mAP_50": 0.3}, 2: {"mAP": 0.2, "mAP_50": 0.4}}
    plot_curves.main([str(tmp_path)])
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_not_a_work_dir_is_an_error(tmp_path):
    with pytest.raises(DataNotFoundError, match="no \\*/vis_data/scalars.json under"):
        plot_curves.read_curves(str(tmp_path))
    with pytest.raises(DataNotFoundError, match="does not exist"):
        plot_curves.main([str(tmp_path / "missing")])
