"""Checkpoints a user can trust: they must fit the model, they are written crash-safe, and --resume
falls back to the newest readable one. Runs tools/train.py and tools/test.py on tiny shapes data."""

import os
import shutil
import signal
import stat
import subprocess
import sys
import time

import pytest
import torch
from test_train import ROOT, TRAIN, _env, _load, run_tool_main, tiny_config

TEST = os.path.join(ROOT, "tools", "test.py")


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A 3-epoch RetinaNet run on tiny shapes data: (config, work dir)."""
    tmp = tmp_path_factory.mktemp("ckpt")
    cfg = tiny_config(tmp, str(tmp / "shapes"))
    work = tmp / "full"
    run = subprocess.run([sys.executable, TRAIN, cfg, "--box-loss", "giou", "--work-dir", str(work)],
                         env=_env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return cfg, work


def _copy_run(work, dest, epochs):
    """The first ``epochs`` checkpoints of a run, as a run killed after that epoch leaves them."""
    dest.mkdir()
    for e in range(1, epochs + 1):
        shutil.copy(work / f"epoch_{e}.pth", dest / f"epoch_{e}.pth")
    (dest / "last_checkpoint").write_text(str(dest / f"epoch_{epochs}.pth"))
    return dest


def _resume(cfg, work):
    return subprocess.run([sys.executable, TRAIN, cfg, "--box-loss", "giou", "--work-dir", str(work), "--resume"],
                          env=_env(), capture_output=True, text=True, timeout=600)


def _assert_same_weights(a, b):
    sa, sb = _load(a)["state_dict"], _load(b)["state_dict"]
    assert sa.keys() == sb.keys()
    for key, value in sa.items():
        torch.testing.assert_close(sb[key], value, rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_unreadable_newest_checkpoint_resumes_from_the_previous_one(finished, tmp_path, damage):
    cfg, full = finished
    work = _copy_run(full, tmp_path / "run", epochs=2)
    newest = work / "epoch_2.pth"
    if damage == "truncated":  # the machine died while it was written in place
        newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    else:
        newest.write_bytes(os.urandom(4096))
    run = _resume(cfg, work)
    assert run.returncode == 0, run.stderr[-3000:]
    log = run.stdout + run.stderr
    assert f"skipping unreadable checkpoint {newest}" in log
    assert f"resuming from {work / 'epoch_1.pth'}" in log
    _assert_same_weights(full / "epoch_3.pth", work / "epoch_3.pth")


def test_no_readable_checkpoint_is_a_one_line_error(finished, tmp_path):
    cfg, full = finished
    work = _copy_run(full, tmp_path / "run", epochs=2)
    for name in ("epoch_1.pth", "epoch_2.pth"):
        (work / name).write_bytes(b"not a checkpoint")
    run = _resume(cfg, work)
    assert run.returncode == 2
    assert run.stderr.startswith(f"error: no readable checkpoint to resume from in '{work}'; tried "), run.stderr
    assert "epoch_1.pth" in run.stderr and "epoch_2.pth" in run.stderr and "Traceback" not in run.stderr


def test_named_unreadable_checkpoint_is_an_error_not_a_fallback(finished, tmp_path):
    cfg, full = finished
    work = _copy_run(full, tmp_path / "run", epochs=2)
    (work / "epoch_2.pth").write_bytes(b"\0" * 100)
    run = subprocess.run([sys.executable, TRAIN, cfg, "--work-dir", str(work), "--resume", str(work / "epoch_2.pth")],
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 2
    assert run.stderr.startswith(f"error: cannot read checkpoint '{work / 'epoch_2.pth'}'"), run.stderr


SLOW_SAVE_HOOK = '''
import torch
from mmengine.hooks import Hook
from mmengine.registry import HOOKS


@HOOKS.register_module()
class BigCheckpointHook(Hook):
    """Makes the epoch-2 checkpoint large, so a test can kill the process while it is written."""

    def before_save_checkpoint(self, runner, checkpoint):
        if checkpoint["meta"]["epoch"] == 2:
            checkpoint["padding"] = torch.ones(300_000_000, dtype=torch.uint8)
'''


def test_sigkill_while_a_checkpoint_is_written_leaves_the_previous_one(tmp_path):
    (tmp_path / "slow_save_hook.py").write_text(SLOW_SAVE_HOOK)
    cfg = tiny_config(tmp_path, str(tmp_path / "shapes"))
    with open(cfg, "a") as f:
        f.write('custom_imports = dict(imports=["detectors.engine", "slow_save_hook"], allow_failed_imports=False)\n'
                'custom_hooks = [dict(type="BigCheckpointHook")]\n')
    work = tmp_path / "run"
    env = {**_env(), "PYTHONPATH": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, TRAIN, cfg, "--work-dir", str(work)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = work / ".epoch_2.pth.partial"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not partial.exists():
        time.sleep(0.005)
    assert partial.exists(), "the checkpoint write was not caught"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (work / "epoch_2.pth").exists()
    assert (work / "last_checkpoint").read_text() == str(work / "epoch_1.pth")
    assert _load(work / "epoch_1.pth")["meta"]["epoch"] == 1
    run = subprocess.run([sys.executable, TRAIN, cfg, "--work-dir", str(work), "--resume"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert not partial.exists()
    assert _load(work / "epoch_3.pth")["meta"]["epoch"] == 3


def test_checkpoints_of_mmengines_own_hook_still_resume(tmp_path):
    """No format change: a run saved by mmengine's CheckpointHook resumes under ours."""
    cfg = tiny_config(tmp_path, str(tmp_path / "shapes"), epochs=2)
    work = tmp_path / "run"
    first = subprocess.run([sys.executable, TRAIN, cfg, "--work-dir", str(work), "--cfg-options",
                            "default_hooks.checkpoint.type=CheckpointHook", "train_cfg.max_epochs=1"],
                           env=_env(), capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    run = _resume(cfg, work)
    assert run.returncode == 0, run.stderr[-3000:]
    assert _load(work / "epoch_2.pth")["meta"]["epoch"] == 2


def test_resume_of_a_finished_run_says_so(finished, capsys):
    cfg, work = finished
    before = sorted(os.listdir(work))
    code, out, err = run_tool_main("train", [cfg, "--box-loss", "giou", "--work-dir", str(work), "--resume"], capsys)
    assert code == 0, err
    assert f"{work / 'epoch_3.pth'}: this run finished (epoch 3 of 3); nothing to train" in out
    assert "| AP | AP50 | AP75 | APs | APm | APl |" in out
    assert sorted(os.listdir(work)) == before  # no new log folder, nothing trained


def test_checkpoint_of_another_architecture_is_refused(finished, tmp_path, capsys):
    """tools/test.py with a RetinaNet checkpoint and a Faster R-CNN config printed an untrained model's
    AP table and exited 0; now: exit 2, the checkpoint and the first keys named."""
    cfg, work = finished
    other = tmp_path / "frcnn.py"
    other.write_text(open(cfg).read().replace("retinanet_r18_shapes.py", "faster_rcnn_r18_shapes.py")
                     .replace(", trainable_backbone_layers=2", ""))
    ckpt = str(work / "epoch_3.pth")
    code, out, err = run_tool_main("test", [str(other), ckpt, "--work-dir", str(tmp_path / "t")], capsys)
    assert code == 2 and "| AP |" not in out
    assert err.startswith(f"error: checkpoint '{ckpt}' does not fit this model: "), err
    assert "missing keys ['detector.rpn." in err or "missing keys ['detector.backbone" in err
    assert not (tmp_path / "t").exists()
    # a checkpoint of the right model loads, and evaluates as the run's own last validation did
    code, out, err = run_tool_main("test", [cfg, ckpt, "--work-dir", str(tmp_path / "t2")], capsys)
    assert code == 0, err
    assert "| AP | AP50 | AP75 | APs | APm | APl |" in out


def test_garbage_checkpoint_names_the_file(finished, tmp_path, capsys):
    cfg, _ = finished
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"garbage")
    code, _, err = run_tool_main("test", [cfg, str(bad), "--work-dir", str(tmp_path / "t")], capsys)
    assert code == 2 and err.startswith(f"error: cannot read checkpoint '{bad}'") and err.count("\n") == 1


def test_outputs_keep_the_users_umask(finished):
    """Checkpoints, the generated data and atomic writes get 0644 under umask 022 (mkstemp gave 0600)."""
    from detectors.fileio import atomic_json

    cfg, work = finished
    old = os.umask(0o022)
    try:
        path = os.path.join(os.path.dirname(cfg), "x.json")
        atomic_json(path, [1])
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    finally:
        os.umask(old)
    # the run above (and the data it generated) was made under the test process's umask
    mask = os.umask(0)
    os.umask(mask)
    data = os.path.join(os.path.dirname(cfg), "shapes")
    for path in (work / "epoch_3.pth", work / "last_checkpoint", os.path.join(data, "annotations", "instances_val.json"),
                 os.path.join(data, "val", "000000.png")):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~mask, path
    assert stat.S_IMODE(os.stat(data).st_mode) == 0o777 & ~mask


def test_ctrl_c_says_how_to_resume(tmp_path):
    cfg = tiny_config(tmp_path, str(tmp_path / "shapes"), epochs=50)
    work = tmp_path / "run"
    # a job started in the background of a non-interactive shell (CI) inherits SIGINT ignored, and
    # Python then installs no KeyboardInterrupt handler: give the child the default disposition
    proc = subprocess.Popen([sys.executable, TRAIN, cfg, "--work-dir", str(work)], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    # any checkpoint: epoch_1.pth is pruned after epoch 6 (max_keep_ckpts=5), and a loaded machine
    # can let a poller miss its few seconds
    while time.time() < deadline and not any(work.glob("epoch_*.pth")):
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert err.strip().splitlines()[-1] == (f"interrupted; continue with: python tools/train.py {cfg} "
                                            f"--work-dir {work} --resume")


@pytest.mark.parametrize("nms", ["soft", "weighted"])
def test_test_tool_evaluates_a_checkpoint_with_another_nms(finished, tmp_path, capsys, nms):
    cfg, work = finished
    code, out, err = run_tool_main("test", [cfg, str(work / "epoch_3.pth"), "--nms", nms,
                                            "--work-dir", str(tmp_path / nms)], capsys)
    assert code == 0, err
    assert "| AP | AP50 | AP75 | APs | APm | APl |" in out
