"""Benchmark the IoU-family losses against torchvision.ops: time and memory kept for backward.

Command (the figures in the README were printed by it; 2 threads as on the CI machine)::

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python tools/bench_losses.py --sizes 1e4 1e5 1e6 --repeats 9
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python tools/bench_losses.py --backend eager   # the PyTorch-ops kernel
    .venv/bin/python tools/bench_losses.py --device cuda --sizes 1e4 1e5 1e6 1e7       # a GPU (Triton kernels)

For each device, number of pairs N and loss it times, in the same run and interleaved repeat by
repeat (so both see the same machine load), ``boxloss``'s loss and ``torchvision.ops``' counterpart
with ``reduction="mean"``:

* ``fwd+bwd``: forward and ``backward()`` (the acceptance figure);
* ``fwd``: the forward with inputs that require grad (the training forward: ours computes the
  gradient here, so this is most of its fwd+bwd time);
* ``no-grad``: the forward under ``torch.no_grad()`` (evaluation), as a ratio only;

and reports medians over ``--repeats`` after ``--warmup`` runs, the ratio ours / torchvision (and,
in parentheses, the ratio of the fastest runs, which a busy machine disturbs least), and
the bytes of the tensors autograd saves for backward (counted with
``torch.autograd.graph.saved_tensors_hooks``: the sum of ``numel * element_size`` of every saved
tensor). Both boxes require grad (``--pred-only``: only the prediction, the training case).
torchvision has no plain IoU loss: its counterpart here is
``1 - I / (U + eps)`` built from ``torchvision.ops._utils._loss_inter_union`` (the helper its losses
use), marked "tv-style".

Timings on a shared machine are noisy: read the ratios, note the load average printed above the
table, and re-run. CUDA rows appear when a GPU is present (``torch.cuda.synchronize`` around each
timing); their kernel is ``--cuda-backend`` (``--backend`` is the CPU rows' kernel), and their
memory columns add the peak of ``torch.cuda.max_memory_allocated`` over one forward+backward,
above the inputs.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
import boxloss  # noqa: E402
from boxloss._kernels import BACKENDS, resolve_backend  # noqa: E402

try:
    import torchvision.ops as tvops
except ImportError:  # the benchmark needs the peer; say so instead of a traceback
    sys.exit("tools/bench_losses.py needs torchvision (pip install torchvision)")


def tv_iou_loss(boxes1, boxes2, reduction="mean", eps=1e-7):
    """torchvision-style IoU loss: 1 - I / (U + eps) from torchvision's own loss helper."""
    from torchvision.ops._utils import _loss_inter_union

    inter, union = _loss_inter_union(boxes1, boxes2)
    loss = 1 - inter / (union + eps)
    return loss.mean() if reduction == "mean" else loss.sum() if reduction == "sum" else loss


OURS = {
    "iou": boxloss.iou_loss,
    "giou": boxloss.giou_loss,
    "diou": boxloss.diou_loss,
    "ciou": boxloss.ciou_loss,
}
PEERS = {
    "iou": ("tv-style", tv_iou_loss),
    "giou": ("generalized_box_iou_loss", tvops.generalized_box_iou_loss),
    "diou": ("distance_box_iou_loss", tvops.distance_box_iou_loss),
    "ciou": ("complete_box_iou_loss", tvops.complete_box_iou_loss),
}


def make_pairs(n: int, device: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random overlapping-or-not pairs of valid xyxy boxes (sizes 1-40 in a 100x100 field)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(2):
        xy = torch.rand(n, 2, generator=g) * 100
        wh = 1 + torch.rand(n, 2, generator=g) * 39
        out.append(torch.cat([xy, xy + wh], 1).to(device))
    return out[0], out[1]


def saved_bytes(fn, pred, target, target_grad: bool) -> int:
    """Bytes of the tensors autograd saves for backward during ``fn(pred, target)``."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    p, t = pred.detach().requires_grad_(), target.detach().requires_grad_(target_grad)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(p, t)
    return total


def time_pair(fns: dict, pred, target, mode: str, repeats: int, warmup: int, cuda: bool, target_grad: bool) -> dict:
    """Median seconds of each function, interleaved run by run so all see the same machine load.

    ``mode``: ``"fwd"`` (inputs require grad), ``"fwd+bwd"``, or ``"no-grad"`` (under torch.no_grad).
    """
    times = {k: [] for k in fns}
    p = pred.detach().clone().requires_grad_(mode != "no-grad")
    t = target.detach().clone().requires_grad_(mode != "no-grad" and target_grad)
    for i in range(warmup + repeats):
        for name, fn in fns.items():
            p.grad = t.grad = None
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.set_grad_enabled(mode != "no-grad"):
                loss = fn(p, t)
            if mode == "fwd+bwd":
                loss.backward()
            if cuda:
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            del loss
            if i >= warmup:
                times[name].append(dt)
    return {k: statistics.median(v) for k, v in times.items()} | {k + "_min": min(v) for k, v in times.items()}


def peak_bytes(fn, pred, target, target_grad: bool) -> int:
    """CUDA: peak allocated bytes above the inputs during one forward+backward of ``fn``."""
    p, t = pred.detach().clone().requires_grad_(), target.detach().clone().requires_grad_(target_grad)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn(p, t).backward()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def backend_for(device: str, cpu_backend: str, cuda_backend: str) -> str:
    """The BOXLOSS_KERNEL value of one device's rows: ``--backend`` names the CPU kernel (native is
    CPU-only), ``--cuda-backend`` the GPU one."""
    return cpu_backend if device == "cpu" else cuda_backend


def machine_line(device: str) -> str:
    if device == "cuda":
        return f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = ", load average %.2f %.2f %.2f" % os.getloadavg() if hasattr(os, "getloadavg") else ""
    return (
        f"CPU: {cpu}, {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} "
        f"threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}{load}"
    )


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=float, nargs="+", default=[1e4, 1e5, 1e6],
                    help="numbers of box pairs")  # 1e6 is the acceptance size
    ap.add_argument("--repeats", type=int, default=9, help="timed runs per measurement (>= 5), median reported")
    ap.add_argument("--warmup", type=int, default=2, help="untimed runs before the timed ones")
    ap.add_argument("--device", nargs="+", choices=["cpu", "cuda"], default=None,
                    help="devices to run on (default: cpu, and cuda when available)")
    ap.add_argument("--losses", nargs="+", choices=list(OURS), default=list(OURS), help="losses to time")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads on CPU (2: the CI machine)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random box pairs")
    ap.add_argument("--backend", choices=BACKENDS, default="auto",
                    help="boxloss kernel of the CPU rows: auto (the compiled loops when built), native, eager "
                         "(PyTorch ops) or triton (needs TRITON_INTERPRET=1 on CPU)")
    ap.add_argument("--cuda-backend", choices=[b for b in BACKENDS if b != "native"], default="auto",
                    help="boxloss kernel of the CUDA rows: auto (Triton when installed), eager or triton")
    ap.add_argument("--pred-only", action="store_true",
                    help="only the prediction requires grad (the training case); default: both boxes")
    args = ap.parse_args(argv)
    if args.repeats < 5:
        ap.error(f"--repeats must be >= 5, got {args.repeats}")
    devices = args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    if "cuda" in devices and not torch.cuda.is_available():
        ap.error("--device cuda given but torch.cuda.is_available() is False")
    torch.set_num_threads(args.threads)
    target_grad = not args.pred_only
    saved_env = os.environ.get("BOXLOSS_KERNEL")
    try:
        for device in devices:
            backend = backend_for(device, args.backend, args.cuda_backend)
            os.environ["BOXLOSS_KERNEL"] = backend  # read by every boxloss IoU-family call
            run_device(device, resolve_backend(backend, torch.device(device)), args, target_grad)
    finally:  # main() is also called in-process (tests, tools/gpu_check.py)
        if saved_env is None:
            os.environ.pop("BOXLOSS_KERNEL", None)
        else:
            os.environ["BOXLOSS_KERNEL"] = saved_env


def run_device(device: str, kernel: str, args, target_grad: bool) -> None:
    """Print the table of one device."""
    print(f"\n{machine_line(device)}; boxloss kernel: {kernel}; median of {args.repeats} after {args.warmup} "
          f"warm-up runs, reduction='mean', "
          f"{'both boxes require' if target_grad else 'only the prediction requires'} grad\n")
    cuda = device == "cuda"
    print("| device | pairs | loss | torchvision peer | fwd+bwd ours ms | fwd+bwd tv ms | fwd+bwd ratio "
          "| (best-run ratio) | fwd ours ms | fwd tv ms | fwd ratio | no-grad ratio | saved ours MB "
          "| saved tv MB | saved ratio |" + (" peak ours MB | peak tv MB |" if cuda else ""))
    print("|" + " --- |" * (17 if cuda else 15))
    for size in args.sizes:
        n = int(size)
        pred, target = make_pairs(n, device, args.seed)
        for name in args.losses:
            peer_name, peer = PEERS[name]
            fns = {
                "ours": lambda p, t, f=OURS[name]: f(p, t, reduction="mean"),
                "tv": lambda p, t, f=peer: f(p, t, reduction="mean"),
            }
            timed = {
                mode: time_pair(fns, pred, target, mode, args.repeats, args.warmup, device == "cuda", target_grad)
                for mode in ("fwd+bwd", "fwd", "no-grad")
            }
            both, fwd, nog = timed["fwd+bwd"], timed["fwd"], timed["no-grad"]
            mem = {k: saved_bytes(f, pred, target, target_grad) for k, f in fns.items()}
            peak = ""
            if cuda:
                pk = {k: peak_bytes(f, pred, target, target_grad) for k, f in fns.items()}
                peak = f" {pk['ours'] / 1e6:.2f} | {pk['tv'] / 1e6:.2f} |"
            print(
                f"| {device} | {n:.0e} | {name} | {peer_name} "
                f"| {both['ours'] * 1e3:.2f} | {both['tv'] * 1e3:.2f} | **{both['ours'] / both['tv']:.3f}** "
                f"| ({both['ours_min'] / both['tv_min']:.3f}) "
                f"| {fwd['ours'] * 1e3:.2f} | {fwd['tv'] * 1e3:.2f} | {fwd['ours'] / fwd['tv']:.3f} "
                f"| {nog['ours'] / nog['tv']:.3f} "
                f"| {mem['ours'] / 1e6:.2f} | {mem['tv'] / 1e6:.2f} | {mem['ours'] / mem['tv']:.3f} |" + peak,
                flush=True,
            )
    if hasattr(os, "getloadavg"):
        print("\nload average after: %.2f %.2f %.2f" % os.getloadavg())


if __name__ == "__main__":
    main()
