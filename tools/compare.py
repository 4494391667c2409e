"""Train one config under several box losses (and seeds) and tabulate COCO box AP.

    python tools/compare.py configs/retinanet_r18_shapes.py --box-losses smooth_l1 giou diou ciou --seeds 0 1 2

Each run is tools/train.py in its own work dir (WORK_DIR/LOSS_seedS); a finished run is skipped and
an interrupted one resumes, so the command can simply be started again. Writes WORK_DIR/results.md,
WORK_DIR/results.csv (final-epoch AP figures, mean ± std over seeds) and WORK_DIR/map_per_epoch.png.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import BOX_LOSSES  # noqa: E402
from plot_curves import read_curves  # noqa: E402

METRICS = ("mAP", "mAP_50", "mAP_75", "mAP_s", "mAP_m", "mAP_l")
HEADER = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def run_one(config: str, loss: str, seed: int, work_dir: str, extra: list[str]) -> dict[int, dict]:
    done = os.path.join(work_dir, "done")
    if not os.path.exists(done):
        cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py"), config,
               "--box-loss", loss, "--work-dir", work_dir, "--resume",
               "--cfg-options", f"randomness.seed={seed}", *extra]
        print(f"[compare] {loss} seed {seed}: {' '.join(cmd)}", flush=True)
        subprocess.run(cmd, check=True)
        open(done, "w").close()
    return read_curves(work_dir)[1]


def mean_std(values: list[float]) -> str:
    if any(v < 0 for v in values):  # pycocotools' -1: no ground truth of that size
        return "n/a"
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="mmengine config file")
    p.add_argument("--box-losses", nargs="+", default=["smooth_l1", "giou", "diou", "ciou"], choices=BOX_LOSSES,
                   help="losses to compare")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="one run per seed and loss")
    p.add_argument("--work-dir", help="default work_dirs/compare_CONFIG")
    p.add_argument("--cfg-options", nargs="+", default=[], help="passed to every tools/train.py run")
    args = p.parse_args(argv)
    if not os.path.isfile(args.config):
        raise SystemExit(f"error: config file {args.config!r} does not exist")
    name = os.path.splitext(os.path.basename(args.config))[0]
    work_dir = args.work_dir or os.path.join("work_dirs", f"compare_{name}")
    extra = ["--cfg-options", *args.cfg_options] if args.cfg_options else []

    curves: dict[str, list[dict[int, dict]]] = {}
    for loss in args.box_losses:
        for seed in args.seeds:
            curves.setdefault(loss, []).append(
                run_one(args.config, loss, seed, os.path.join(work_dir, f"{loss}_seed{seed}"), extra))

    rows = []
    for loss, runs in curves.items():
        finals = [r[max(r)] for r in runs if r]
        rows.append((loss, [[f[m] for f in finals] for m in METRICS]))
    md = io.StringIO()
    md.write(f"COCO box AP (%) on the validation split, {name}, final epoch, "
             f"mean ± std over seeds {args.seeds}\n\n")
    md.write("| box loss | " + " | ".join(HEADER) + " |\n|" + " --- |" * (len(HEADER) + 1) + "\n")
    for loss, cols in rows:
        md.write(f"| {loss} | " + " | ".join(mean_std(c) for c in cols) + " |\n")
    csv_buf = io.StringIO()
    writer = csv.writer(csv_buf)
    writer.writerow(["box_loss", "seed", *HEADER])
    for loss, runs in curves.items():
        for seed, r in zip(args.seeds, runs):
            final = r[max(r)]
            writer.writerow([loss, seed, *(f"{final[m]:.4f}" for m in METRICS)])

    from detectors.fileio import atomic_write

    def write_text(path, text):
        atomic_write(path, lambda p: open(p, "w").write(text))

    write_text(os.path.join(work_dir, "results.md"), md.getvalue())
    write_text(os.path.join(work_dir, "results.csv"), csv_buf.getvalue())
    png = os.path.join(work_dir, "map_per_epoch.png")
    _plot(curves, png, name)
    print(md.getvalue())
    print(f"wrote {work_dir}/results.md, results.csv, map_per_epoch.png")


def _plot(curves, out: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from detectors.fileio import atomic_write

    fig, ax = plt.subplots(figsize=(6, 4))
    for loss, runs in curves.items():
        epochs = sorted(set.intersection(*(set(r) for r in runs)))
        ax.plot(epochs, [statistics.mean(r[e]["mAP"] for r in runs) for e in epochs], marker="o", label=loss)
    ax.set(xlabel="epoch", ylabel="COCO box AP (mean over seeds)", title=title)
    ax.legend()
    fig.tight_layout()
    atomic_write(out, lambda p: fig.savefig(p, dpi=100, format="png"))
    plt.close(fig)


if __name__ == "__main__":
    main()
