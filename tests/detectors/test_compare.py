"""tools/compare.py: statistics against hand-computed values, aggregation from committed result files,
and no silent reuse of a run made with other options."""

import glob
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import compare  # noqa: E402

from detectors.errors import OptionError  # noqa: E402


@pytest.mark.parametrize("df, value", [(1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622), (30, 2.0423)])
def test_t_quantile_matches_the_table(df, value):
    assert compare.t_quantile(0.975, df) == pytest.approx(value, abs=1e-4)


def _record(loss, seed, ap, ap_diou=None):
    final = {"iou": {"mAP": ap, "mAP_50": ap + 0.2, "mAP_75": ap - 0.1, "mAP_s": ap / 2, "mAP_m": ap, "mAP_l": -1.0}}
    if ap_diou is not None:
        final["diou"] = {**final["iou"], "mAP": ap_diou}
    return {"format": 1, "box_loss": loss, "seed": seed, "config_hash": "x", "final": final,
            "per_epoch": {"3": {"mAP": ap / 2}, "6": {"mAP": ap}}}


# AP per seed 0, 1, 2
FIXTURE = {"default": [0.30, 0.32, 0.34], "giou": [0.33, 0.36, 0.35], "ciou": [0.40, 0.43, 0.44]}
DIOU_NMS = {"default": [0.31, 0.33, 0.35], "giou": [0.33, 0.36, 0.35], "ciou": [0.40, 0.43, 0.45]}


@pytest.fixture
def results_dir(tmp_path):
    (tmp_path / "runs").mkdir()
    for loss, aps in FIXTURE.items():
        for seed, ap in enumerate(aps):
            rec = _record(loss, seed, ap, DIOU_NMS[loss][seed])
            (tmp_path / "runs" / f"{loss}_seed{seed}.json").write_text(json.dumps(rec))
    return tmp_path


def _row(md, section, loss):
    block = md.split(f"### {section}")[1].split("###")[0]
    return next(line for line in block.splitlines() if line.startswith(f"| {loss} |"))


def test_aggregate_from_result_files(results_dir, capsys):
    compare.main(["unused.py", "--aggregate-only", "--results-dir", str(results_dir), "--box-losses", "default",
                  "giou", "ciou", "--seeds", "0", "1", "2", "--eval-nms", "iou", "diou"])
    md = (results_dir / "results.md").read_text()
    # mean ± sample std: default 32.0 ± 2.0; giou 34.7 ± 1.5; APl has no ground truth: n/a
    assert _row(md, "iou NMS: mean", "default").startswith("| default | 3 | 32.0 ± 2.0 | 52.0 ± 2.0 | 22.0 ± 2.0 | "
                                                           "16.0 ± 1.0 | 32.0 ± 2.0 | n/a |")
    assert _row(md, "iou NMS: mean", "giou").startswith("| giou | 3 | 34.7 ± 1.5 |")
    # paired differences giou - default: 3, 4, 1 points: mean 2.67, sd 1.528, half width
    # t(0.975, 2) * sd / sqrt(3) = 4.303 * 1.528 / 1.732 = 3.79 -> [-1.1, +6.5], not significant
    assert _row(md, "iou NMS: paired", "giou").startswith("| giou | 3 | +2.7 [-1.1, +6.5] |")
    # ciou - default: 10, 11, 10: mean 10.33, sd 0.577, half 1.43 -> [+8.9, +11.8], significant
    assert _row(md, "iou NMS: paired", "ciou").startswith("| ciou | 3 | +10.3 [+8.9, +11.8]* |")
    # DIoU-NMS minus IoU-NMS on the same checkpoints: default +1, +1, +1 (sd 0: the interval is the point)
    assert _row(md, "diou NMS minus iou NMS", "default").startswith("| default | 3 | +1.0 [+1.0, +1.0]* |")
    assert _row(md, "diou NMS minus iou NMS", "ciou").startswith("| ciou | 3 | +0.3 [-1.1, +1.8] |")
    rows = (results_dir / "results.csv").read_text().splitlines()
    assert rows[0] == "box_loss,seed,nms,AP,AP50,AP75,APs,APm,APl"
    assert "giou,1,diou,0.3600,0.5600,0.2600,0.1800,0.3600,-1.0000" in rows
    assert len(rows) == 1 + 9 * 2
    assert (results_dir / "ap_per_epoch.png").stat().st_size > 0
    assert (results_dir / "paired_differences.png").stat().st_size > 0


def test_aggregate_without_results_is_an_error(tmp_path):
    with pytest.raises(Exception, match="no result files"):
        compare.main(["unused.py", "--aggregate-only", "--results-dir", str(tmp_path)])


def _tiny(tmp_path):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from test_train import tiny_config

    return tiny_config(tmp_path, str(tmp_path / "shapes"), epochs=1)


def test_finished_run_is_reused_only_with_the_same_resolved_config(tmp_path, monkeypatch):
    cfg = _tiny(tmp_path)
    argv = [cfg, "--box-losses", "giou", "--seeds", "0", "--work-dir", str(tmp_path / "w"),
            "--results-dir", str(tmp_path / "r")]

    def no_training(*a, **k):
        raise AssertionError("trained")

    monkeypatch.setattr(compare, "_train", no_training)
    args = compare.parse_args(argv)
    config_hash = compare.resolved_hash(compare.load_config(cfg, box_loss="giou", work_dir="x",
                                                            cfg_options={"randomness.seed": 0}))
    (tmp_path / "r" / "runs").mkdir(parents=True)
    result = tmp_path / "r" / "runs" / "giou_seed0.json"
    result.write_text(json.dumps({**_record("giou", 0, 0.3), "config_hash": config_hash}))
    assert compare.run_one(args, "giou", 0)["final"]["iou"]["mAP"] == 0.3  # same options: reused, no training
    # another schedule: the finished run must not stand in for it
    other = compare.parse_args(argv + ["--cfg-options", "train_cfg.max_epochs=2"])
    with pytest.raises(OptionError, match="giou_seed0.json holds run giou_seed0 made with other options"):
        compare.run_one(other, "giou", 0)


def test_hash_ignores_how_a_run_is_carried_out_but_not_what_it_computes(tmp_path, monkeypatch):
    monkeypatch.setattr("detectors.engine.require_extra", lambda *a, **k: None)  # tensorboard need not be installed
    cfg = _tiny(tmp_path)

    def digest(**options):
        loaded = compare.load_config(cfg, box_loss="giou", work_dir="x", cfg_options={"randomness.seed": 0, **options})
        before = loaded.pretty_text
        value = compare.resolved_hash(loaded)
        assert loaded.pretty_text == before  # hashing must not edit the config it is given
        return value

    base = digest()
    assert digest(**{"train_dataloader.pin_memory": True, "train_dataloader.num_workers": 3,
                     "model.data_preprocessor.non_blocking": True, "log_level": "DEBUG", "tensorboard": True}) == base
    assert digest(**{"randomness.seed": 1}) != base
    assert digest(**{"optim_wrapper.optimizer.lr": 0.5}) != base


def test_committed_study_runs_still_match_todays_configs():
    """A config change that alters the resolved hash makes every committed study run look stale, and
    docs/study/run.sh then refuses to continue: such a change must be deliberate (and re-run the study)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    configs = {"retinanet_shapes": "retinanet_r18_shapes.py", "retinanet_crowded": "retinanet_r18_shapes_crowded.py",
               "faster_rcnn_shapes": "faster_rcnn_r18_shapes.py"}
    checked = 0
    for cell, config in configs.items():
        for path in sorted(glob.glob(os.path.join(root, "docs", "study", cell, "runs", "*.json"))):
            with open(path) as f:
                record = json.load(f)
            options = {"train_cfg.val_interval": 3, "randomness.seed": record["seed"]}  # docs/study/run.sh's
            cfg = compare.load_config(os.path.join(root, "configs", config), box_loss=record["box_loss"],
                                      work_dir="x", cfg_options=options)
            assert compare.resolved_hash(cfg) == record["config_hash"], path
            checked += 1
    assert checked >= 12
