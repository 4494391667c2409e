"""tools/train.py end to end on tiny shapes data: a SIGKILLed run resumes to the same result."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN = os.path.join(ROOT, "tools", "train.py")


def tiny_config(tmp_path, data_root, *, epochs=3) -> str:
    """A RetinaNet-R18 shapes config shrunk to seconds per epoch; no random flip, so runs are repeatable."""
    text = f"""
_base_ = [{os.path.join(ROOT, "configs", "retinanet_r18_shapes.py")!r}]
shapes = dict(root={data_root!r}, num_train=16, num_val=4, image_size=64, seed=5)
train_dataloader = dict(batch_size=4, dataset=dict(data_root={data_root!r}, generate_shapes=shapes, transforms=[]))
val_dataloader = dict(batch_size=4, dataset=dict(data_root={data_root!r}, generate_shapes=shapes))
test_dataloader = val_dataloader
val_evaluator = dict(data_root={data_root!r})
test_evaluator = val_evaluator
model = dict(min_size=64, max_size=64, trainable_backbone_layers=2)
train_cfg = dict(max_epochs={epochs}, val_interval={epochs})
param_scheduler = [
    dict(type="LinearLR", start_factor=0.1, by_epoch=False, begin=0, end=4),
    dict(type="MultiStepLR", begin=0, end={epochs}, by_epoch=True, milestones=[2], gamma=0.1),
]
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval=1, max_keep_ckpts=5))
"""
    path = tmp_path / "tiny.py"
    path.write_text(text)
    return str(path)


def _env():
    return {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}


def _run(args, **kwargs):
    return subprocess.run([sys.executable, TRAIN, *args], env=_env(), capture_output=True, text=True, **kwargs)


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def test_killed_run_resumes_to_the_same_state(tmp_path):
    data_root = str(tmp_path / "shapes")
    cfg = tiny_config(tmp_path, data_root)
    full = _run([cfg, "--box-loss", "ciou", "--work-dir", str(tmp_path / "full")], timeout=600)
    assert full.returncode == 0, full.stderr[-3000:]
    assert "final validation, COCO box AP (%), box loss ciou, nms iou:" in full.stdout
    assert "| AP | AP50 | AP75 | APs | APm | APl |" in full.stdout

    work = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, TRAIN, cfg, "--box-loss", "ciou", "--work-dir", str(work)],
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = work / "last_checkpoint"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if marker.exists() and "epoch_1.pth" in marker.read_text():
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (work / "epoch_3.pth").exists()

    resumed = _run([cfg, "--box-loss", "ciou", "--work-dir", str(work), "--resume"], timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed epoch: " in resumed.stdout + resumed.stderr

    a, b = _load(tmp_path / "full" / "epoch_3.pth"), _load(work / "epoch_3.pth")
    assert a["meta"]["epoch"] == b["meta"]["epoch"] == 3
    assert a["meta"]["iter"] == b["meta"]["iter"] == 12  # 3 epochs x 4 iterations
    # the scheduler's step count and learning rate, and the optimizer's state (AdamW moments), were restored
    steps = [(s["last_step"], s["_global_step"], s["_last_value"]) for s in a["param_schedulers"]]
    assert steps == [(s["last_step"], s["_global_step"], s["_last_value"]) for s in b["param_schedulers"]]
    assert a["param_schedulers"][0]["_global_step"] == 12
    assert a["optimizer"]["param_groups"][0]["lr"] == pytest.approx(b["optimizer"]["param_groups"][0]["lr"])
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    state_a, state_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert state_a.keys() == state_b.keys() and len(state_a) > 0
    for index, slots in state_a.items():
        for name, value in slots.items():  # exp_avg, exp_avg_sq, step
            torch.testing.assert_close(state_b[index][name], value, rtol=1e-4, atol=1e-6, msg=f"{index}.{name}")


def run_tool_main(tool: str, args, capsys) -> tuple[int, str, str]:
    """Run a tool's main() in this process as its command line does: (exit status, stdout, stderr)."""
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    try:
        import importlib

        import _common
        module = importlib.import_module(tool)
    finally:
        sys.path.pop(0)
    capsys.readouterr()
    try:
        _common.run_tool(lambda: module.main(args))
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


SHAPES_CFG = os.path.join(ROOT, "configs", "retinanet_r18_shapes.py")


@pytest.mark.parametrize("args, message", [
    (["{tmp}/nope.py"], "error: config file '{tmp}/nope.py' does not exist"),
    ([SHAPES_CFG, "--cfg-options", "model.box_los=ciou"],
     "error: unknown key model.box_los; did you mean 'box_loss'?"),
    ([SHAPES_CFG, "--cfg-options", "model.score_tresh=0.1"],
     "error: unknown key model.score_tresh; did you mean 'score_thresh'?"),
    ([SHAPES_CFG, "--cfg-options", "train_dataloader.dataset.img_dri=x"],
     "error: unknown key train_dataloader.dataset.img_dri; did you mean 'img_dir'?"),
    ([SHAPES_CFG, "--cfg-options", "val_evaluator.ann_fle=x"],
     "error: unknown key val_evaluator.ann_fle; did you mean 'ann_file'?"),
    ([SHAPES_CFG, "--cfg-options", "train_dataloader.dataset.generate_shapes.num_trian=3"],
     "error: unknown key train_dataloader.dataset.generate_shapes.num_trian; did you mean 'num_train'?"),
    ([SHAPES_CFG, "--launcher", "slurm"], "error: --launcher slurm outside a Slurm job"),
])
def test_train_user_errors_are_one_line(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.delenv("SLURM_PROCID", raising=False)
    args = [a.replace("{tmp}", str(tmp_path)) for a in args] + ["--work-dir", str(tmp_path / "w")]
    code, out, err = run_tool_main("train", args, capsys)
    assert code == 2
    assert err.startswith(message.replace("{tmp}", str(tmp_path))) and err.count("\n") == 1, err
    assert not (tmp_path / "w").exists()


def test_train_errors(tmp_path, capsys):
    if not torch.cuda.is_available():
        code, _, err = run_tool_main("train", [SHAPES_CFG, "--amp"], capsys)
        assert code == 2 and err.startswith("error: --amp needs a CUDA device")
    code, _, err = run_tool_main("train", [SHAPES_CFG, "--box-loss", "ciuo"], capsys)
    assert code == 2 and "invalid choice: 'ciuo'" in err  # argparse's usage line and error
    bad = tmp_path / "bad.py"
    bad.write_text(f"_base_ = [{SHAPES_CFG!r}]\nmodel = dict(box_loss='huber')\n")
    shapes = tmp_path / "shapes"
    code, _, err = run_tool_main("train", [str(bad), "--work-dir", str(tmp_path / "w"), "--data-root", str(shapes)],
                                 capsys)
    # the model is built first: the bad loss name is reported before any data is looked for
    assert code == 2 and "box_loss must be one of" in err and "got 'huber' (did you mean" not in err, err
    assert not (tmp_path / "w").exists()


def test_typo_data_root_is_an_error_not_a_new_dataset(tmp_path, capsys):
    """A --data-root that does not exist used to generate a fresh dataset there and train on it."""
    typo = tmp_path / "shapez"
    code, _, err = run_tool_main("train", [SHAPES_CFG, "--data-root", str(typo), "--work-dir", str(tmp_path / "w")],
                                 capsys)
    assert code == 2
    assert err.startswith(f"error: annotation file not found: '{typo}/annotations/instances_train.json'"), err
    assert not typo.exists() and not (tmp_path / "w").exists()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_amp_training_runs_on_cuda(tmp_path):
    """tools/train.py --amp on a GPU: a few mixed-precision iterations (AmpOptimWrapper, fp16 autocast),
    finite losses, a checkpoint with finite weights and a final validation."""
    data_root = str(tmp_path / "shapes")
    cfg = tiny_config(tmp_path, data_root, epochs=1)
    work = tmp_path / "amp"
    run = _run([cfg, "--box-loss", "ciou", "--amp", "--work-dir", str(work)], timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "AmpOptimWrapper" in (work / "tiny.py").read_text()  # the resolved config mmengine saved
    assert "final validation, COCO box AP (%)" in run.stdout
    state = _load(work / "epoch_1.pth")["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
