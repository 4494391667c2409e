"""Plot the loss and mAP curves of a work dir, across resumed runs.

    python tools/plot_curves.py work_dirs/retinanet_r18_shapes_ciou [--out curves.png]

mmengine writes one WORK_DIR/<timestamp>/vis_data/scalars.json per run; a resumed run starts a new
one. They are merged in time order, a later run replacing the steps it repeats.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import run_tool  # noqa: E402  (also puts the repo root on sys.path)

from detectors.errors import DataNotFoundError  # noqa: E402
from detectors.evaluation import AP_COLUMNS, AP_NAMES  # noqa: E402

METRIC_PREFIX = "coco/bbox_"


def read_curves(work_dir: str) -> tuple[dict[int, dict], dict[int, dict]]:
    """Returns ``(train, val)``: ``{iteration: {key: value}}`` and ``{epoch: {metric: value}}``."""
    files = sorted(glob.glob(os.path.join(work_dir, "*", "vis_data", "scalars.json")))
    if not files:
        raise DataNotFoundError(f"no */vis_data/scalars.json under {work_dir!r}: not an mmengine work dir?")
    train: dict[int, dict] = {}
    val: dict[int, dict] = {}
    for path in files:  # timestamped folder names sort in time order
        with open(path) as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                rec = json.loads(line)
                step = int(rec.get("step", rec.get("iter", 0)))
                metrics = {k[len(METRIC_PREFIX):]: v for k, v in rec.items() if k.startswith(METRIC_PREFIX)}
                if metrics:
                    val[step] = metrics
                elif "loss" in rec:
                    train[step] = {k: v for k, v in rec.items() if k == "loss" or k.startswith("loss_")}
    return dict(sorted(train.items())), dict(sorted(val.items()))


def plot(work_dir: str, out: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from detectors.fileio import atomic_write

    train, val = read_curves(work_dir)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    keys = sorted({k for v in train.values() for k in v})
    for key in keys:
        steps = [s for s in train if key in train[s]]
        ax1.plot(steps, [train[s][key] for s in steps], label=key, lw=1.5 if key == "loss" else 1)
    ax1.set(xlabel="iteration", ylabel="loss", title="training loss")
    ax1.legend(fontsize=8)
    for key, label in zip(AP_NAMES[:3], AP_COLUMNS[:3]):  # AP, AP50, AP75
        epochs = [e for e in val if key in val[e]]
        if epochs:
            ax2.plot(epochs, [val[e][key] for e in epochs], marker="o", label=label)
    ax2.set(xlabel="epoch", ylabel="COCO box AP", title="validation", ylim=(0, 1))
    ax2.legend(fontsize=8)
    fig.suptitle(os.path.basename(os.path.normpath(work_dir)))
    fig.tight_layout()
    atomic_write(out, lambda p: fig.savefig(p, dpi=100, format="png"))
    plt.close(fig)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("work_dir", help="an mmengine work dir (tools/train.py --work-dir)")
    p.add_argument("--out", help="PNG path (default WORK_DIR/curves.png)")
    args = p.parse_args(argv)
    if not os.path.isdir(args.work_dir):
        raise DataNotFoundError(f"work dir {args.work_dir!r} does not exist")
    out = plot(args.work_dir, args.out or os.path.join(args.work_dir, "curves.png"))
    print(f"wrote {out}")


if __name__ == "__main__":
    run_tool(main)
