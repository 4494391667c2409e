"""Train one config under several box losses and seeds, evaluate each checkpoint with several NMS,
and tabulate COCO box AP with paired differences and 95 % confidence intervals.

    python tools/compare.py configs/retinanet_r18_shapes.py --box-losses default giou diou ciou \\
        --seeds 0 1 2 --eval-nms iou diou --results-dir docs/study/retinanet_shapes

Each run is tools/train.py in WORK_DIR/LOSS_seedS (checkpoints: large, not for committing); when it
has finished, its checkpoint is evaluated once per --eval-nms (no retraining: the "+DIoU-NMS"
column is free) and its figures go to RESULTS_DIR/runs/LOSS_seedS.json (small: final AP per NMS,
AP per validated epoch, the resolved config's hash, machine, date). The tables are computed from
those files alone, so a study can be continued on another machine from the committed files and
`--aggregate-only` rebuilds the tables without training.

A re-run with the same options trains nothing: a run whose result file holds the same resolved
config is reused, an interrupted run resumes, and a run made with other options (schedule, data
root, --cfg-options) is an error naming it rather than a silent reuse.

Statistics, per NMS: for each loss, mean ± sample std over seeds of AP, AP50, AP75, APs, APm, APl;
and the paired difference to the baseline (the first loss listed) on the same seed, mean and 95 %
Student-t interval over seeds, marked * when the interval excludes 0 (at least 2 seeds). Also the
paired difference of each --eval-nms to the first one, per loss. Outputs in RESULTS_DIR:
results.md, results.csv (one row per run and NMS), ap_per_epoch.png, paired_differences.png.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import copy
import glob
import hashlib
import io
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import BOX_LOSSES, NMS_NAMES, cpu_name, load_config, run_tool  # noqa: E402

from detectors.errors import DataError, OptionError  # noqa: E402
from detectors.evaluation import AP_COLUMNS, AP_NAMES  # noqa: E402

TOOLS = os.path.dirname(os.path.abspath(__file__))
RESULT_FORMAT = 1


# --------------------------------------------------------------------------- statistics


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: int) -> float:
    """Student-t distribution function."""
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: int) -> float:
    """Student-t quantile by bisection of :func:`t_cdf` (scipy.stats.t.ppf without scipy)."""
    lo, hi = -1e4, 1e4
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for one value)."""
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else None)


def paired_difference(values: list[float], baseline: list[float], level: float = 0.95):
    """Mean of ``values[i] - baseline[i]`` and its Student-t interval: ``(mean, low, high)``;
    low and high are None with fewer than 2 pairs."""
    diffs = [v - b for v, b in zip(values, baseline)]
    mean = statistics.mean(diffs)
    if len(diffs) < 2:
        return mean, None, None
    half = t_quantile(0.5 + level / 2, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return mean, mean - half, mean + half


# --------------------------------------------------------------------------- result files


def run_name(loss: str, seed: int) -> str:
    return f"{loss}_seed{seed}"


def read_results(results_dir: str) -> list[dict]:
    """Every ``RESULTS_DIR/runs/*.json``; a file that is not a result of this tool is an error."""
    runs = []
    for path in sorted(glob.glob(os.path.join(results_dir, "runs", "*.json"))):
        try:
            with open(path) as f:
                record = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e})") from None
        missing = {"box_loss", "seed", "config_hash", "final"} - set(record) if isinstance(record, dict) else {"all"}
        if missing:
            raise DataError(f"{path}: not a tools/compare.py result file (no {sorted(missing)})")
        record["_path"] = path
        runs.append(record)
    return runs


def aggregate(runs: list[dict], losses: list[str], nms_names: list[str], title: str) -> tuple[str, str]:
    """The Markdown tables and the CSV rows of a study (see the module docstring)."""
    by_key = {(r["box_loss"], r["seed"]): r for r in runs}
    baseline = losses[0]
    md = io.StringIO()
    md.write(f"{title}\n\nCOCO box AP (%) on the validation split at the final epoch.\n")
    for nms in nms_names:
        md.write(f"\n### {nms} NMS: mean ± std over seeds\n\n")
        md.write("| box loss | seeds | " + " | ".join(AP_COLUMNS) + " |\n|" + " --- |" * (len(AP_COLUMNS) + 2) + "\n")
        for loss in losses:
            finals = [by_key[k]["final"][nms] for k in sorted(by_key) if k[0] == loss and nms in by_key[k]["final"]]
            if not finals:
                continue
            cells = []
            for m in AP_NAMES:
                values = [f[m] for f in finals]
                if any(v < 0 for v in values):  # pycocotools' -1: no ground truth of that size
                    cells.append("n/a")
                    continue
                mean, std = mean_std(values)
                cells.append(f"{100 * mean:.1f}" + ("" if std is None else f" ± {100 * std:.1f}"))
            md.write(f"| {loss} | {len(finals)} | " + " | ".join(cells) + " |\n")
        md.write(f"\n### {nms} NMS: paired difference to {baseline} (same seed), mean [95 % CI]\n\n")
        md.write("| box loss | pairs | " + " | ".join(AP_COLUMNS[:5]) + " |\n|" + " --- |" * 7 + "\n")
        for loss in losses[1:]:
            md.write(_diff_row(loss, [(by_key.get((loss, s)), by_key.get((baseline, s))) for s in _seeds(by_key)],
                               nms, nms))
    if len(nms_names) > 1:
        first = nms_names[0]
        for nms in nms_names[1:]:
            md.write(f"\n### {nms} NMS minus {first} NMS (same checkpoint), mean [95 % CI]\n\n")
            md.write("| box loss | pairs | " + " | ".join(AP_COLUMNS[:5]) + " |\n|" + " --- |" * 7 + "\n")
            for loss in losses:
                pairs = [(by_key.get((loss, s)), by_key.get((loss, s))) for s in _seeds(by_key)]
                md.write(_diff_row(loss, pairs, nms, first))
    md.write("\n`*`: the 95 % interval excludes 0. Intervals are Student-t over the paired seeds; with 3 seeds "
             "t = 4.30, so only differences several times the seed-to-seed spread are marked.\n")
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["box_loss", "seed", "nms", *AP_COLUMNS])
    for (loss, seed), r in sorted(by_key.items(), key=lambda kv: (losses.index(kv[0][0]) if kv[0][0] in losses
                                                                   else len(losses), kv[0][1])):
        for nms in nms_names:
            if nms in r["final"]:
                writer.writerow([loss, seed, nms, *(f"{r['final'][nms][m]:.4f}" for m in AP_NAMES)])
    return md.getvalue(), buf.getvalue()


def _seeds(by_key) -> list[int]:
    return sorted({s for _, s in by_key})


def _diff_row(loss, pairs, nms, base_nms) -> str:
    pairs = [(a, b) for a, b in pairs if a is not None and b is not None and nms in a["final"]
             and base_nms in b["final"]]
    if not pairs:
        return f"| {loss} | 0 |" + " |" * 5 + "\n"
    cells = []
    for m in AP_NAMES[:5]:
        values = [a["final"][nms][m] for a, _ in pairs]
        base = [b["final"][base_nms][m] for _, b in pairs]
        if any(v < 0 for v in values + base):
            cells.append("n/a")
            continue
        mean, low, high = paired_difference(values, base)
        if low is None:
            cells.append(f"{100 * mean:+.1f}")
        else:
            star = "*" if low > 0 or high < 0 else ""
            cells.append(f"{100 * mean:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}]{star}")
    return f"| {loss} | {len(pairs)} | " + " | ".join(cells) + " |\n"


# --------------------------------------------------------------------------- running


# Keys that change how a run is carried out or logged, not what it computes: they stay out of the hash,
# so that (say) turning on pinned memory does not make every finished run of a study look stale.
_UNHASHED = ("work_dir", "visualizer", "tensorboard", "log_processor", "log_level", "env_cfg", "default_hooks.logger",
             "model.data_preprocessor.non_blocking", "train_dataloader.pin_memory",
             "train_dataloader.num_workers", "train_dataloader.persistent_workers", "val_dataloader.pin_memory",
             "val_dataloader.num_workers", "val_dataloader.persistent_workers", "test_dataloader.pin_memory",
             "test_dataloader.num_workers", "test_dataloader.persistent_workers")


def resolved_hash(cfg) -> str:
    """A hash of everything that decides a run's result: the resolved config without the keys that only
    say where it runs, how fast, and how it logs (``_UNHASHED``)."""
    text = copy.deepcopy(cfg)  # Config.copy is shallow: popping nested keys would edit the caller's
    for key in _UNHASHED:
        *parents, last = key.split(".")
        node = text  # a Config at the top (not a dict), ConfigDicts below
        for part in parents:
            node = node.get(part) if node is not None else None
        if node is not None and last in node:
            node.pop(last)
    if text.get("custom_hooks"):  # tensorboard=True adds this one; it only draws
        text.custom_hooks = [h for h in text.custom_hooks if h.get("type") != "DetectionImagesHook"]
    return hashlib.sha256(text.pretty_text.encode()).hexdigest()[:16]


def _train(args, loss, seed, work_dir) -> None:
    cmd = [sys.executable, os.path.join(TOOLS, "train.py"), args.config, "--box-loss", loss, "--work-dir", work_dir,
           "--resume", "--cfg-options", f"randomness.seed={seed}", *args.cfg_options]
    if args.data_root:
        cmd[4:4] = ["--data-root", args.data_root]
    print(f"[compare] {run_name(loss, seed)}: {' '.join(cmd)}", flush=True)
    if subprocess.run(cmd).returncode != 0:
        raise OptionError(f"training {run_name(loss, seed)} failed (its log is in {work_dir}); fix it and run "
                          f"the same command again to continue")


def _evaluate(args, loss, seed, work_dir, checkpoint) -> dict:
    """Final AP figures of ``checkpoint`` with each --eval-nms: ``{nms: {metric: value}}``."""
    from detectors.runner import BoxLossRunner

    finals = {}
    for nms in args.eval_nms:
        cfg = load_config(args.config, box_loss=loss, nms=nms, data_root=args.data_root,
                          work_dir=os.path.join(work_dir, f"test_{nms}"),
                          cfg_options=_options(args, seed))
        cfg.load_from, cfg.resume = checkpoint, False
        metrics = BoxLossRunner.from_cfg(cfg).test()
        finals[nms] = {m: float(metrics[f"coco/bbox_{m}"]) for m in AP_NAMES}
    return finals


def _options(args, seed) -> dict:
    from mmengine.config import DictAction

    options = {}
    for item in args.cfg_options:
        key, value = item.split("=", 1)
        options[key] = DictAction._parse_iterable(value)
    options["randomness.seed"] = seed
    return options


def run_one(args, loss: str, seed: int) -> dict:
    """Train (or resume, or reuse) one run and write its result file; returns the record."""
    from detectors.fileio import atomic_json
    from detectors.runner import find_resumable
    from plot_curves import read_curves

    name = run_name(loss, seed)
    work_dir = os.path.join(args.work_dir, name)
    result_path = os.path.join(args.results_dir, "runs", f"{name}.json")
    cfg = load_config(args.config, box_loss=loss, data_root=args.data_root, work_dir=work_dir,
                      cfg_options=_options(args, seed))
    config_hash = resolved_hash(cfg)
    if os.path.isfile(result_path):
        with open(result_path) as f:
            record = json.load(f)
        if record.get("config_hash") != config_hash:
            raise OptionError(f"{result_path} holds run {name} made with other options (config hash "
                              f"{record.get('config_hash')} vs {config_hash}); use another --results-dir and "
                              f"--work-dir, or delete it to run again")
        if all(nms in record["final"] for nms in args.eval_nms):
            print(f"[compare] {name}: reused {result_path}", flush=True)
            return record
    marker = os.path.join(work_dir, "compare_config_hash")
    if os.path.isfile(marker) and open(marker).read().strip() != config_hash:
        raise OptionError(f"work dir {work_dir} holds run {name} started with other options; use another "
                          f"--work-dir, or delete it to start again")
    os.makedirs(work_dir, exist_ok=True)
    with open(marker, "w") as f:
        f.write(config_hash + "\n")
    started = time.time()
    _train(args, loss, seed, work_dir)
    train_seconds = time.time() - started
    checkpoint, _ = find_resumable(work_dir)
    record = {
        "format": RESULT_FORMAT,
        "config": args.config,
        "box_loss": loss,
        "seed": seed,
        "cfg_options": args.cfg_options,
        "data_root": args.data_root,
        "config_hash": config_hash,
        "final": _evaluate(args, loss, seed, work_dir, checkpoint),
        "per_epoch": {str(e): {m: v[m] for m in AP_NAMES if m in v} for e, v in read_curves(work_dir)[1].items()},
        "train_seconds": round(train_seconds, 1),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads "
                   f"{__import__('torch').get_num_threads()}",
        "cpu": cpu_name(),
        "date": datetime.date.today().isoformat(),
    }
    atomic_json(result_path, record, indent=1)
    print(f"[compare] {name}: wrote {result_path}", flush=True)
    return record


# --------------------------------------------------------------------------- plots


def plot(runs: list[dict], losses: list[str], nms_names: list[str], results_dir: str, title: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from detectors.fileio import atomic_write

    written = []
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for loss in losses:
        curves = [r["per_epoch"] for r in runs if r["box_loss"] == loss and r.get("per_epoch")]
        if not curves:
            continue
        epochs = sorted(set.intersection(*(set(map(int, c)) for c in curves)))
        values = [[100 * c[str(e)]["mAP"] for c in curves] for e in epochs]
        mean = [statistics.mean(v) for v in values]
        line, = ax.plot(epochs, mean, marker="o", label=f"{loss} ({len(curves)} seeds)")
        if len(curves) > 1:
            ax.fill_between(epochs, [min(v) for v in values], [max(v) for v in values], color=line.get_color(),
                            alpha=0.2, lw=0)
    ax.set(xlabel="epoch", ylabel="COCO box AP (%)", title=f"{title}: validation AP\n(band: min-max over seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(results_dir, "ap_per_epoch.png")
    atomic_write(path, lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)
    written.append(path)

    by_key = {(r["box_loss"], r["seed"]): r for r in runs}
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    width = 0.8 / max(1, len(nms_names))
    for j, nms in enumerate(nms_names):
        xs, means, errs = [], [], []
        for i, loss in enumerate(losses[1:]):
            pairs = [(by_key[(loss, s)], by_key[(losses[0], s)]) for s in _seeds(by_key)
                     if (loss, s) in by_key and (losses[0], s) in by_key]
            pairs = [(a, b) for a, b in pairs if nms in a["final"] and nms in b["final"]]
            if not pairs:
                continue
            mean, low, high = paired_difference([a["final"][nms]["mAP"] for a, _ in pairs],
                                                [b["final"][nms]["mAP"] for _, b in pairs])
            xs.append(i + (j - (len(nms_names) - 1) / 2) * width)
            means.append(100 * mean)
            errs.append((0.0, 0.0) if low is None else (100 * (mean - low), 100 * (high - mean)))
        if xs:
            ax.errorbar(xs, means, yerr=list(zip(*errs)), fmt="o", capsize=4, label=f"{nms} NMS")
    ax.axhline(0, color="grey", lw=1)
    ax.set_xticks(range(len(losses) - 1), losses[1:])
    ax.set(ylabel=f"AP − AP({losses[0]}) (points)", title=f"{title}: paired difference, 95 % CI over seeds")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(results_dir, "paired_differences.png")
    atomic_write(path, lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)
    written.append(path)
    return written


# --------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="mmengine config file")
    p.add_argument("--box-losses", nargs="+", default=["default", "giou", "diou", "ciou"], choices=BOX_LOSSES,
                   help="losses to compare; the first is the baseline of the paired differences "
                        "(default: default giou diou ciou)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2],
                   help="one run per seed and loss (default: 0 1 2); intervals need at least 2")
    p.add_argument("--eval-nms", nargs="+", default=["iou"], choices=NMS_NAMES,
                   help="evaluate every finished checkpoint with each of these NMS (no retraining); the first "
                        "is the reference of the NMS differences (default: iou)")
    p.add_argument("--work-dir", help="training runs go to WORK_DIR/LOSS_seedS (default work_dirs/compare_CONFIG)")
    p.add_argument("--results-dir", help="result files and tables (default: the work dir); commit this folder")
    p.add_argument("--data-root", help="dataset root, passed to every run (must exist)")
    p.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE",
                   help="config overrides for every run, as tools/train.py --cfg-options")
    p.add_argument("--aggregate-only", action="store_true",
                   help="train nothing: rebuild the tables and plots from RESULTS_DIR/runs/*.json")
    p.add_argument("--title", help="title of the tables and plots (default: the config's name)")
    args = p.parse_args(argv)
    for item in args.cfg_options:
        if "=" not in item:
            raise OptionError(f"--cfg-options takes KEY=VALUE items, got {item!r}")
        if item.split("=", 1)[0] in ("randomness.seed", "model.box_loss", "work_dir"):
            raise OptionError(f"--cfg-options {item!r}: compare.py sets this itself (--seeds, --box-losses, --work-dir)")
    if len(set(args.box_losses)) != len(args.box_losses) or len(set(args.seeds)) != len(args.seeds):
        raise OptionError("--box-losses and --seeds must not repeat a value")
    name = os.path.splitext(os.path.basename(args.config))[0]
    args.work_dir = args.work_dir or os.path.join("work_dirs", f"compare_{name}")
    args.results_dir = args.results_dir or args.work_dir
    args.title = args.title or name
    return args


def main(argv=None):
    from detectors.fileio import atomic_text

    args = parse_args(argv)
    if not args.aggregate_only:
        if not os.path.isfile(args.config):
            raise OptionError(f"config file {args.config!r} does not exist")
        # seed-major order: every loss gets its first seed before any gets a second one
        for seed in args.seeds:
            for loss in args.box_losses:
                run_one(args, loss, seed)
    runs = [r for r in read_results(args.results_dir) if r["box_loss"] in args.box_losses and r["seed"] in args.seeds]
    if not runs:
        raise DataError(f"no result files for these losses and seeds in {os.path.join(args.results_dir, 'runs')}")
    md, table = aggregate(runs, args.box_losses, args.eval_nms, args.title)
    atomic_text(os.path.join(args.results_dir, "results.md"), md)
    atomic_text(os.path.join(args.results_dir, "results.csv"), table)
    pngs = plot(runs, args.box_losses, args.eval_nms, args.results_dir, args.title)
    print(md)
    print(f"wrote {args.results_dir}/results.md, results.csv, " + ", ".join(os.path.basename(p) for p in pngs))


if __name__ == "__main__":
    run_tool(main, interrupted="interrupted; run the same command again to continue (finished runs are kept)")
