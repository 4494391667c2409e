"""The DIoU paper's convergence simulation (docs/simulation.md): 1,715,000 regression cases per loss.

    python tools/simulate.py --losses iou giou diou ciou --mode paper --out docs/sim/paper
    python tools/simulate.py --losses iou giou diou ciou l1 l2 smooth_l1 --mode exact --out docs/sim/exact
    python tools/simulate.py --mode exact --losses all --out docs/sim/exact_family

The defaults are the paper's protocol: 5,000 anchor centres x 343 anchor/target pairs = 1,715,000
cases, 200 iterations of B_t = B_{t-1} + eta (2 - IoU) D with eta = 0.1 / 0.01 / 0.001. ``--mode
paper`` uses the authors' hand-written directions (the published Fig. 3(b)); ``--mode exact`` the
true gradients of our losses (``--grad loss`` runs them through boxloss's public loss functions,
``--grad autograd`` through the plain reference formulas, the default ``analytic`` through the
closed form in boxloss/simulation.py; the losses after CIoU, boxloss.simulation.AUTOGRAD_LOSSES,
always run autograd through the public losses). ``--losses all`` is every loss of the mode.
Writes, each atomically (temp file, then os.replace):

    OUT/summary.json          {"cases", "points", "iterations", "mode", "losses": {name: {"total_error":
                              [T+1 floats], "final_error", "seconds", ...}}, ...}
    OUT/curves.png            total error vs iteration, one line per loss, log y
    OUT/final_error_map.png   one panel per loss: the anchor centres coloured by their final error
                              summed over their 343 cases (the paper's Fig. 4)
    OUT/table.md              final error, error at t = 20/50/100/160, iterations to 1 % of the
                              initial error, seconds
    OUT/config.json           the resolved configuration

Reference: Zheng et al., "Distance-IoU Loss: Faster and Better Learning for Bounding Box Regression",
AAAI 2020, arXiv:1911.08287.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from contextlib import contextmanager

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import cpu_name, run_tool  # noqa: E402  (also puts the repo root on sys.path)

import torch  # noqa: E402

from detectors.fileio import atomic_text as write_text  # noqa: E402
from detectors.fileio import atomic_write  # noqa: E402

from boxloss import simulation as sim  # noqa: E402

TABLE_ITERATIONS = (20, 50, 100, 160)
DIRECTIONS = {
    "paper": {
        "iou": "authors' direction: d(I/U) on the edges, zero when apart",
        "giou": "authors' direction: IoU part + (C dU - U dC)/C^2 with their unclamped intersection",
        "diou": "authors' direction: IoU part + distance part with the enclosing-box sign flipped and dC/dw = -1 "
        "when the prediction encloses the target (their MATLAB's dC_w = dC_h copy error left out)",
        "ciou": "authors' direction: DIoU direction + alpha 8/pi^2 dtheta (h, -w), alpha constant, "
        "no 1/(w^2 + h^2)",
    },
    "exact": {
        "iou": "-dL/d(x,y,w,h) of 1 - IoU",
        "giou": "-dL/d(x,y,w,h) of the GIoU loss",
        "diou": "-dL/d(x,y,w,h) of the DIoU loss",
        "ciou": "-dL/d(x,y,w,h) of the CIoU loss: alpha constant, ciou_grad='exact' (torchvision's gradient)",
        "l1": "-dL/d(x,y,w,h) of sum |B - G|",
        "l2": "-dL/d(x,y,w,h) of sum (B - G)^2",
        "smooth_l1": "-dL/d(x,y,w,h) of smooth-L1 with beta = 1",
        "eiou": "-dL/d(x,y,w,h) of the EIoU loss (autograd)",
        "focal_eiou": "-dL/d(x,y,w,h) of Focal-EIoU, gamma = 0.5, IoU^gamma held constant (autograd)",
        "siou": "-dL/d(x,y,w,h) of the SIoU loss, the paper's sign, theta = 4 (autograd)",
        "alpha_ciou": "-dL/d(x,y,w,h) of alpha-CIoU, alpha = 3, beta held constant (autograd)",
        "wise_iou_v1": "-dL/d(x,y,w,h) of Wise-IoU v1, the denominator held constant (autograd)",
        "wise_iou": "-dL/d(x,y,w,h) of Wise-IoU v3 (alpha 1.9, delta 3), the mean of L_IoU over each "
        "centre's 343 cases at every step (autograd)",
        "mpdiou": "-dL/d(x,y,w,h) of MPDIoU with image_size (20, 20) (autograd)",
        "inner_ciou": "-dL/d(x,y,w,h) of Inner-CIoU, ratio 0.8 (autograd)",
        "focaler_ciou": "-dL/d(x,y,w,h) of Focaler-CIoU, (d, u) = (0, 0.95) (autograd)",
    },
}


def save_png(fig, path: str, dpi: int) -> None:
    """Save ``fig`` atomically as a 256-colour PNG (a scatter of 5,000 points compresses badly in RGBA)."""
    import io

    from PIL import Image  # matplotlib's own dependency

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    image = Image.open(buf).convert("RGB").quantize(colors=256)
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG", optimize=True))


@contextmanager
def intra_op_threads(n: int | None):
    """torch's intra-op threads set to ``n`` in this process for the block (None: left as they are).

    Restored afterwards: :func:`main` also runs inside other processes (the tests).
    """
    threads = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n is not None:
            torch.set_num_threads(threads)


def fmt(value: float) -> str:
    return f"{value:.4g}"


def markdown_table(summary: dict) -> str:
    """The Markdown table of one run: errors at fixed iterations, iterations to 1 %, seconds."""
    T = summary["iterations"]
    cols = [t for t in TABLE_ITERATIONS if t <= T]
    head = ["loss", f"final error (t={T})", *[f"t={t}" for t in cols], "iters to 1 %", "seconds"]
    lines = [
        f"Mode `{summary['mode']}`" + (f" (gradients: `{summary['grad']}`)" if summary["mode"] == "exact" else "")
        + f", {summary['cases']:,} cases ({summary['points']:,} centres x 343), {T} iterations, "
        f"{summary['dtype']} on {summary['device']}; total l1 error over all cases "
        f"(initial {fmt(next(iter(summary['losses'].values()))['total_error'][0])}).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join([" --- "] + [" ---: "] * (len(head) - 1)) + "|",
    ]
    for name, r in summary["losses"].items():
        curve = r["total_error"]
        hit = r["iterations_to_1pct"]
        label = f"`{name}`" + (" (autograd)" if summary["mode"] == "exact" and r.get("grad") != summary["grad"] else "")
        row = [label, fmt(r["final_error"]), *[fmt(curve[t]) for t in cols], "never" if hit is None else str(hit),
               f"{r['seconds']:.1f}"]
        lines.append("| " + " | ".join(row) + " |")
    load = summary.get("load_average")
    if load:
        lines += ["", f"Seconds: wall time per loss on {summary['machine']}, {summary['workers']} worker thread(s), "
                  f"torch {summary['torch']}; load average {load['start']:.1f} at the start, {load['end']:.1f} at the end."]
    return "\n".join(lines) + "\n"


def plot_curves(path: str, summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.4, 4.4))
    many = len(summary["losses"]) > 10  # past the 10 colours of the default cycle: tab20's, in pairs
    for i, (name, r) in enumerate(summary["losses"].items()):
        color = plt.cm.tab20((2 * i) % 20 + (2 * i) // 20) if many else None
        dashed = r.get("grad") not in (None, summary.get("grad"))  # autograd where the others are closed-form
        ax.plot(range(len(r["total_error"])), r["total_error"], label=name, lw=1.6, color=color,
                ls="--" if dashed else "-")
    for t in (160, 180):  # the step size drops
        if t < summary["iterations"]:
            ax.axvline(t, color="0.7", ls=":", lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("iteration t")
    ax.set_ylabel(f"total error over {summary['cases']:,} cases")
    ax.set_title(f"{summary['mode']} directions ({summary['points']:,} centres)")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    save_png(fig, path, dpi=110)
    plt.close(fig)


def plot_map(path: str, summary: dict, centres: torch.Tensor, point_errors: dict[str, torch.Tensor]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    names = list(point_errors)
    cols = min(len(names), 4)
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols + 1.2, 3.4 * rows), squeeze=False, layout="constrained")
    # one log colour scale for every panel, so the panels compare
    vmax = max(float(e.max()) for e in point_errors.values())
    vmin = max(min(float(e.min()) for e in point_errors.values()), vmax * 1e-5, 1e-12)
    norm = LogNorm(vmin=vmin, vmax=vmax)
    x, y = centres[:, 0].numpy(), centres[:, 1].numpy()
    for ax, name in zip(axes.flat, names):
        err = point_errors[name].clamp(min=vmin).numpy()
        im = ax.scatter(x, y, c=err, s=2.5, norm=norm, cmap="viridis", linewidths=0)
        ax.set_title(f"{name}: {fmt(summary['losses'][name]['final_error'])}")
        ax.set_aspect("equal")
        ax.set_xticks([7, 10, 13])
        ax.set_yticks([7, 10, 13])
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.85, label="final error summed over 343 cases")
    fig.suptitle(f"final error per anchor centre, {summary['mode']} directions, t = {summary['iterations']}")
    save_png(fig, path, dpi=90)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--losses", nargs="+", default=list(sim.PAPER_LOSSES), choices=sim.LOSSES + ("all",),
                   help="losses to simulate, one run each (paper mode: iou giou diou ciou only); "
                   "all: every loss of the mode")
    p.add_argument("--mode", default="paper", choices=sim.MODES,
                   help="paper: the authors' directions (the published figure); exact: true gradients")
    p.add_argument("--points", type=int, default=5000, help="anchor centres; cases = 343 x points (the paper: 5000)")
    p.add_argument("--iters", type=int, default=200, help="iterations T (the paper: 200)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--seed", type=int, default=0, help="seed of the anchor centres")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"), help="float64 for cross-checks")
    p.add_argument("--grad", default="analytic", choices=sim.GRADS,
                   help="exact mode's gradients: closed form, autograd through boxloss's losses, or the reference")
    p.add_argument("--chunk-points", type=int, default=None,
                   help="centres per chunk (default: 128 on a CPU, all on a GPU)")
    p.add_argument("--workers", type=int, default=None,
                   help="CPU threads running chunks (default: torch's threads); with more than one, torch's "
                   "intra-op threads are set to 1 in this process while the simulations run")
    p.add_argument("--out", default=None, help="output directory (default: work_dirs/simulate_MODE)")
    args = p.parse_args(argv)
    if "all" in args.losses:
        args.losses = list(sim.PAPER_LOSSES if args.mode == "paper" else sim.LOSSES)

    if args.mode == "paper":
        bad = [name for name in args.losses if name not in sim.PAPER_LOSSES]
        if bad:
            p.error(f"--mode paper has the authors' directions for {', '.join(sim.PAPER_LOSSES)} only, got {bad}")
    if args.points < 1:
        p.error(f"--points must be >= 1, got {args.points}")
    if args.iters < 0:
        p.error(f"--iters must be >= 0, got {args.iters}")
    for flag, value in (("--chunk-points", args.chunk_points), ("--workers", args.workers)):
        if value is not None and value < 1:
            p.error(f"{flag} must be >= 1, got {value}")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        p.error(f"--device must be a torch device such as cpu or cuda, got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device} asked for, but CUDA is not available")
    out = args.out or os.path.join("work_dirs", f"simulate_{args.mode}")
    os.makedirs(out, exist_ok=True)
    dtype = getattr(torch, args.dtype)
    losses = list(dict.fromkeys(args.losses))
    cpu = device.type == "cpu"
    chunk_points = args.chunk_points or (128 if cpu else args.points)
    # worker threads that actually run: no more than there are chunks
    workers = min(args.workers or torch.get_num_threads(), -(-args.points // chunk_points)) if cpu else 1

    load_start = os.getloadavg()
    config = {
        **vars(args),
        "losses": losses,
        "out": out,
        "cases": sim.num_cases(args.points),
        "chunk_points": chunk_points,
        "workers": workers,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": f"{cpu_name()}, {os.cpu_count()} CPUs"
        + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""),
        "load_average_start": [round(v, 2) for v in load_start],
    }
    write_text(os.path.join(out, "config.json"), json.dumps(config, indent=2) + "\n")
    print(f"[simulate] mode={args.mode} losses={' '.join(losses)} cases={config['cases']:,} iters={args.iters} "
          f"device={device} dtype={args.dtype} workers={config['workers']} load={load_start[0]:.2f}", flush=True)

    summary = {
        "cases": config["cases"],
        "points": args.points,
        "iterations": args.iters,
        "mode": args.mode,
        "grad": args.grad if args.mode == "exact" else None,
        "dtype": args.dtype,
        "device": str(device),
        "seed": args.seed,
        "machine": config["machine"],
        "workers": config["workers"],
        "torch": torch.__version__,
        "losses": {},
    }
    point_errors, centres = {}, None
    start = time.perf_counter()
    # the chunks are the parallelism: one intra-op thread per worker thread, no oversubscription
    with intra_op_threads(1 if workers > 1 else None):
        for name in losses:
            shown = [0]

            def progress(done, total, seconds, name=name, shown=shown):
                # a line per tenth of the cases
                if done * 10 // total > shown[0] or done == total:
                    shown[0] = done * 10 // total
                    print(f"[{args.mode} {name}] {done:,}/{total:,} cases ({100 * done / total:.0f}%) {seconds:.1f} s",
                          flush=True)

            r = sim.simulate(name, mode=args.mode, points=args.points, iterations=args.iters, seed=args.seed,
                             dtype=dtype, device=device, grad=args.grad, chunk_points=chunk_points,
                             workers=workers, progress=progress)
            curve = r.total_error.tolist()
            summary["losses"][name] = {
                "total_error": curve,
                "final_error": r.final_error,
                "seconds": round(r.seconds, 3),
                "iterations_to_1pct": sim.iterations_to_fraction(r.total_error, 0.01),
                "direction": DIRECTIONS[args.mode][name],
                "grad": r.grad,
            }
            point_errors[name], centres = r.point_error, r.centres
            print(f"[{args.mode} {name}] total error {fmt(curve[0])} -> {fmt(r.final_error)} at t={args.iters}, "
                  f"{r.seconds:.1f} s", flush=True)
    summary["seconds"] = round(time.perf_counter() - start, 3)
    summary["load_average"] = {"start": round(load_start[0], 2), "end": round(os.getloadavg()[0], 2)}

    write_text(os.path.join(out, "summary.json"), json.dumps(summary) + "\n")
    table = markdown_table(summary)
    write_text(os.path.join(out, "table.md"), table)
    plot_curves(os.path.join(out, "curves.png"), summary)
    plot_map(os.path.join(out, "final_error_map.png"), summary, centres, point_errors)
    print(table, end="")
    print(f"[simulate] {summary['seconds']:.1f} s in all, load {summary['load_average']['end']:.2f}; wrote "
          f"{out}/summary.json, table.md, curves.png, final_error_map.png, config.json", flush=True)
    return summary


if __name__ == "__main__":
    run_tool(main)
