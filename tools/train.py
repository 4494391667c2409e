"""Train a detector with mmengine (MMDetection-style command line).

    python tools/train.py configs/retinanet_r18_shapes.py --box-loss ciou
    python tools/train.py configs/retinanet_r18_shapes.py --box-loss ciou --resume   # continue a killed run
    torchrun --nproc_per_node 8 tools/train.py configs/retinanet_r50_fpn_1x_coco.py \\
        --box-loss ciou --data-root data/coco --launcher pytorch
    srun -p PART -N 2 --ntasks-per-node 8 --gres gpu:8 python tools/train.py CONFIG --launcher slurm

Writes checkpoints, the resolved config and logs to --work-dir (default work_dirs/CONFIG[_LOSS]).
--resume takes the newest readable checkpoint there (or the one given); on a finished run it
trains nothing and prints the final validation again. Mistakes in the command, the config or
the data end with one line, `error: ...`, and exit status 2.
"""

import argparse
import os
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import BOX_LOSSES, NMS_NAMES, load_config, removed_on_failure, run_tool, setup_cpu_distributed  # noqa: E402

from detectors.errors import OptionError  # noqa: E402
from detectors.evaluation import AP_NAMES  # noqa: E402



def parse_args(argv=None):
    from mmengine.config import DictAction

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="mmengine config file")
    p.add_argument("--box-loss", choices=BOX_LOSSES, help="box regression loss (default: the config's)")
    p.add_argument("--nms", choices=NMS_NAMES, help="post-processing NMS (default: the config's)")
    p.add_argument("--work-dir", help="where checkpoints and logs go")
    p.add_argument("--data-root", help="dataset root, e.g. data/coco (sets every dataloader and evaluator); "
                                       "it must exist: tools/make_shapes.py --out DIR makes the shapes data")
    p.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="resume from the newest readable checkpoint in the work dir, or from the given one")
    p.add_argument("--amp", action="store_true", help="mixed precision (needs CUDA)")
    p.add_argument("--tensorboard", action="store_true",
                   help="also log to TensorBoard: losses, lr, COCO metrics and 4 validation images with their "
                        "detections (the config key tensorboard=...; pip install 'boxloss[tensorboard]')")
    p.add_argument("--cfg-options", nargs="+", action=DictAction, help="override config keys: k=v k2.sub=v2")
    p.add_argument("--launcher", choices=("none", "pytorch", "slurm"), default="none", help="job launcher")
    p.add_argument("--local_rank", "--local-rank", type=int, default=0, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import torch

    if args.amp and not torch.cuda.is_available():
        raise OptionError("--amp needs a CUDA device, and torch.cuda.is_available() is False here; "
                          "train without --amp on the CPU")
    os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    options = dict(args.cfg_options or {})
    if args.tensorboard and not options.get("tensorboard"):
        options["tensorboard"] = True
    cfg = load_config(args.config, box_loss=args.box_loss, nms=args.nms, data_root=args.data_root,
                      work_dir=args.work_dir, cfg_options=options)
    cfg.launcher = args.launcher
    if args.amp:
        cfg.optim_wrapper.type = "AmpOptimWrapper"
        cfg.optim_wrapper.setdefault("loss_scale", "dynamic")
    if args.resume == "auto":
        cfg.resume, cfg.load_from = True, None
    elif args.resume is not None:
        cfg.resume, cfg.load_from = True, args.resume
    if args.resume is not None and _report_if_finished(cfg, args.resume):
        return
    setup_cpu_distributed(cfg, args.launcher)

    from detectors.runner import BoxLossRunner

    def has_checkpoint(folder):
        return any(name.endswith(".pth") for name in os.listdir(folder))

    with removed_on_failure(cfg.work_dir, keep_if=has_checkpoint):
        runner = BoxLossRunner.from_cfg(cfg)
        runner.train()
    if runner.rank == 0:
        stats = _last_val_stats(runner)
        if stats:
            _print_table(cfg, stats)
        print(f"work dir: {os.path.abspath(cfg.work_dir)}  (plots: python tools/plot_curves.py {cfg.work_dir})")


def _print_table(cfg, stats) -> None:
    from detectors.evaluation import MARKDOWN_HEADER, markdown_row

    print(f"final validation, COCO box AP (%), box loss {cfg.model.box_loss}, nms {cfg.model.nms}:")
    print(MARKDOWN_HEADER)
    print(markdown_row(stats))


def _report_if_finished(cfg, resume: str) -> bool:
    """On ``--resume`` of a run that has reached ``max_epochs``: say so, print its last validation, True."""
    from detectors.checkpoint import check_training_checkpoint
    from detectors.runner import find_resumable

    if resume == "auto":
        path, checkpoint = find_resumable(cfg.work_dir)
    else:
        path, checkpoint = resume, check_training_checkpoint(resume)
    max_epochs = cfg.get("train_cfg", {}).get("max_epochs")
    if checkpoint is None or max_epochs is None or checkpoint["meta"].get("epoch", 0) < max_epochs:
        return False
    print(f"{path}: this run finished (epoch {checkpoint['meta']['epoch']} of {max_epochs}); nothing to train")
    from plot_curves import read_curves

    try:
        val = read_curves(cfg.work_dir)[1]
    except FileNotFoundError:
        val = {}
    if val:
        _print_table(cfg, [val[max(val)][k] for k in AP_NAMES])
    else:
        print(f"no validation results in {cfg.work_dir}; evaluate it with tools/test.py {shlex.quote(path)}")
    return True


def _last_val_stats(runner) -> list[float] | None:
    """AP, AP50, AP75, APs, APm, APl of the last validation, from mmengine's message hub."""
    scalars = runner.message_hub.log_scalars
    keys = [f"val/coco/bbox_{k}" for k in AP_NAMES]
    if not all(k in scalars for k in keys):
        return None
    return [float(scalars[k].current()) for k in keys]


if __name__ == "__main__":
    command = [os.path.relpath(sys.argv[0]), *sys.argv[1:]] + ([] if "--resume" in sys.argv else ["--resume"])
    run_tool(main, interrupted="interrupted; continue with: python " + shlex.join(command))
