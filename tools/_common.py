"""Shared by the tools: repo root on sys.path, config loading with checks, one-line user errors."""

from __future__ import annotations

import os
import platform
import shutil
import sys
from contextlib import contextmanager

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from detectors.errors import OptionError, UserError  # noqa: E402
from detectors.options import BOX_LOSSES  # noqa: E402,F401  (the tools' choices)
from detectors.nms import NMS_NAMES  # noqa: E402,F401


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo where there is one, else the machine type."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def run_tool(main, *, interrupted: str = "interrupted") -> None:
    """Run a tool's ``main()``: a :class:`UserError` is one line on stderr and exit status 2 (no
    traceback); Ctrl-C prints ``interrupted`` (say how to continue) and exits with 130; anything
    else is a bug and keeps its traceback."""
    try:
        main()
    except UserError as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"\n{interrupted}", file=sys.stderr)
        sys.exit(130)


@contextmanager
def removed_on_failure(folder: str, *, keep_if=lambda folder: False):
    """Remove ``folder`` if the block fails and the folder did not exist before it (and
    ``keep_if(folder)`` is false): a failed tool leaves no half-written output behind."""
    existed = os.path.exists(folder)
    try:
        yield
    except BaseException:
        if not existed and os.path.isdir(folder) and not keep_if(folder):
            shutil.rmtree(folder, ignore_errors=True)
        raise


def load_config(path: str, *, box_loss=None, nms=None, data_root=None, work_dir=None, cfg_options=None):
    """Read an mmengine config, apply the command-line overrides and check its keys.

    Raises :class:`OptionError` naming the file, key or value at fault.
    """
    from mmengine.config import Config

    from detectors.engine import apply_tensorboard, check_config

    if not os.path.isfile(path):
        raise OptionError(f"config file {path!r} does not exist")
    try:
        cfg = Config.fromfile(path)
    except Exception as e:  # mmengine re-raises syntax and lookup errors of the config as various types
        raise OptionError(f"cannot read config {path!r}: {type(e).__name__}: {e}") from e
    if "model" not in cfg:
        raise OptionError(f"config {path!r} has no 'model' key")
    if box_loss is not None:
        cfg.model.box_loss = box_loss
    if nms is not None:
        cfg.model.nms = nms
    if data_root is not None:
        root = data_root if data_root.endswith("/") else data_root + "/"
        for key in ("train_dataloader", "val_dataloader", "test_dataloader"):
            if key in cfg:
                cfg[key].dataset.data_root = root
        for key in ("val_evaluator", "test_evaluator"):
            if key in cfg:
                cfg[key].data_root = root
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    check_config(cfg)
    apply_tensorboard(cfg)
    if work_dir is not None:
        cfg.work_dir = work_dir
    elif cfg.get("work_dir") is None:
        name = os.path.splitext(os.path.basename(path))[0]
        suffix = f"_{cfg.model.box_loss}" if box_loss else ""
        cfg.work_dir = os.path.join("work_dirs", name + suffix)
    return cfg


def setup_cpu_distributed(cfg, launcher: str) -> None:
    """Distributed training without CUDA: a gloo group, and DDP without device_ids.

    mmengine's ``init_dist`` for ``launcher='pytorch'`` calls ``torch.cuda.set_device``, which fails
    on CPU; the Runner skips its own init when a process group already exists.
    """
    import torch
    import torch.distributed as dist

    if launcher == "slurm" and "SLURM_PROCID" not in os.environ:
        raise OptionError("--launcher slurm outside a Slurm job (SLURM_PROCID is not set); start it with srun")
    if launcher == "pytorch" and "RANK" not in os.environ:
        raise OptionError("--launcher pytorch outside torchrun (RANK is not set); start it with torchrun")
    if launcher == "none" or torch.cuda.is_available():
        return
    if not dist.is_initialized():
        if launcher == "slurm":
            os.environ.setdefault("RANK", os.environ["SLURM_PROCID"])
            os.environ.setdefault("WORLD_SIZE", os.environ["SLURM_NTASKS"])
            os.environ.setdefault("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))
        dist.init_process_group(backend="gloo")
    cfg.env_cfg.dist_cfg = dict(backend="gloo")
    cfg.model_wrapper_cfg = dict(type="MMDistributedDataParallel", device_ids=None, broadcast_buffers=False)
