"""Evaluate a trained checkpoint on the config's test split (COCO box AP).

    python tools/test.py configs/retinanet_r18_shapes.py work_dirs/retinanet_r18_shapes/epoch_12.pth
    python tools/test.py CONFIG CKPT --out dets.json --nms diou     # also write the detections
    python tools/test.py CONFIG CKPT --per-class --plots work_dirs/eval --backend fast

Prints pycocotools' summary and a Markdown row of AP figures. The checkpoint's weights must fit
the config's model exactly (a checkpoint of another architecture or class count is an error);
`--cfg-options allow_partial_load=True` loads what fits, on purpose.

--per-class logs AP, AP50, AP75, APs/m/l per class; --plots DIR writes per_class.csv, pr_curves.png
and confusion_matrix.png/.csv there; --backend fast evaluates with faster-coco-eval (the same stats,
`pip install 'boxloss[fast-eval]'`). They set the test evaluator's per_class, plots_dir and backend.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import NMS_NAMES, load_config, removed_on_failure, run_tool, setup_cpu_distributed  # noqa: E402

from detectors.errors import CheckpointError  # noqa: E402
from detectors.evaluation import BACKENDS, check_backend  # noqa: E402


def main(argv=None):
    from mmengine.config import DictAction

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="mmengine config file")
    p.add_argument("checkpoint", help="checkpoint file (.pth)")
    p.add_argument("--out", help="write the detections as a COCO results JSON")
    p.add_argument("--nms", choices=NMS_NAMES, help="post-processing NMS (default: the config's)")
    p.add_argument("--work-dir", help="where logs go (default: a test/ folder next to the checkpoint)")
    p.add_argument("--data-root", help="dataset root (sets every dataloader and evaluator)")
    p.add_argument("--cfg-options", nargs="+", action=DictAction, help="override config keys: k=v")
    p.add_argument("--launcher", choices=("none", "pytorch", "slurm"), default="none", help="job launcher")
    p.add_argument("--per-class", action="store_true", help="log AP, AP50, AP75, APs/m/l per class (Markdown)")
    p.add_argument("--plots", metavar="DIR", help="write per_class.csv, pr_curves.png, confusion_matrix.png/.csv there")
    p.add_argument("--backend", choices=BACKENDS, help="COCO evaluator (default: the config's, else pycocotools)")
    args = p.parse_args(argv)
    if args.backend:
        check_backend(args.backend)  # a missing extra is said before the model is built
    if not os.path.isfile(args.checkpoint):
        raise CheckpointError(f"checkpoint file not found: {args.checkpoint!r}")
    work_dir = args.work_dir or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "test")
    cfg = load_config(args.config, nms=args.nms, data_root=args.data_root, work_dir=work_dir,
                      cfg_options=args.cfg_options)
    cfg.launcher = args.launcher
    cfg.load_from = args.checkpoint
    cfg.resume = False
    if args.out:
        cfg.test_evaluator.out_file = args.out
    if args.per_class:
        cfg.test_evaluator.per_class = True
    if args.plots:
        cfg.test_evaluator.plots_dir = args.plots
    if args.backend:
        cfg.test_evaluator.backend = args.backend
    setup_cpu_distributed(cfg, args.launcher)

    from detectors.runner import BoxLossRunner

    from detectors.evaluation import AP_NAMES, MARKDOWN_HEADER, markdown_row

    with removed_on_failure(work_dir):
        runner = BoxLossRunner.from_cfg(cfg)
        metrics = runner.test()
    if runner.rank == 0:
        stats = [metrics[f"coco/bbox_{k}"] for k in AP_NAMES]
        print(MARKDOWN_HEADER)
        print(markdown_row(stats))
        if args.out:
            print(f"detections written to {args.out}")
    return metrics


if __name__ == "__main__":
    run_tool(main, interrupted="interrupted; nothing was written")
