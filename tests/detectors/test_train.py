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
shapes = dict(num_train=16, num_val=4, image_size=64, seed=5)
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


def _train_main(args):
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    try:
        import train
    finally:
        sys.path.pop(0)
    return train.main(args)


def test_train_errors(tmp_path, capsys):
    with pytest.raises(SystemExit, match="config file .*nope.py' does not exist"):
        _train_main([str(tmp_path / "nope.py")])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="--amp needs a CUDA device"):
            _train_main([os.path.join(ROOT, "configs", "retinanet_r18_shapes.py"), "--amp"])
    with pytest.raises(SystemExit):
        _train_main([os.path.join(ROOT, "configs", "retinanet_r18_shapes.py"), "--box-loss", "ciuo"])
    assert "invalid choice: 'ciuo'" in capsys.readouterr().err
    bad = tmp_path / "bad.py"
    bad.write_text(f"_base_ = [{os.path.join(ROOT, 'configs', 'retinanet_r18_shapes.py')!r}]\n"
                   f"model = dict(box_loss='huber')\n")
    with pytest.raises(ValueError, match="box_loss must be one of .*'huber'"):
        _train_main([str(bad), "--work-dir", str(tmp_path / "w")])


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
