"""Shared by the tools: repo root on sys.path, config loading with the project's overrides."""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

BOX_LOSSES = ("default", "l1", "l2", "smooth_l1", "iou", "giou", "diou", "ciou")


def load_config(path: str, *, box_loss=None, nms=None, data_root=None, work_dir=None, cfg_options=None):
    """Read an mmengine config and apply the command-line overrides; errors name the bad value."""
    from mmengine.config import Config

    if not os.path.isfile(path):
        raise SystemExit(f"error: config file {path!r} does not exist")
    cfg = Config.fromfile(path)
    if "model" not in cfg:
        raise SystemExit(f"error: config {path!r} has no 'model' key")
    if box_loss is not None:
        if box_loss not in BOX_LOSSES:
            raise SystemExit(f"error: --box-loss must be one of {', '.join(BOX_LOSSES)}, got {box_loss!r}")
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
