"""Benchmark boxloss's NMS against torchvision's on detector-like boxes, in the same run.

Command (docs/nms.md's table was printed by exactly this):

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python tools/bench_nms.py --repeats 25

Inputs imitate a detector's pre-NMS output on a 1333 x 800 image: one object per 25 boxes
(``--boxes-per-object``), with log-uniform sizes (16-512 px) and aspect ratios (1:3-3:1), each
surrounded by a cluster of ~20 boxes whose corners are jittered by 10 % of the object's size,
scored below the object's confidence, plus 20 % of low-score background boxes anywhere. Class
labels follow the object, with 10 % confusions. Scores are distinct, so torchvision's order is
defined. The last row is the worst case of a sequential greedy: a chain of 20,000 boxes on a line,
each suppressing only the next (IoU 0.6 with the next one, 1/3 with the one after), so half are
kept.

Table 1: for each size and 1 / 20 / 80 classes, ``boxloss.batched_diou_nms`` with the distance
term (DIoU-NMS) and without it (plain NMS) against ``torchvision.ops.batched_nms`` (which computes
plain IoU). Table 2: one class, ``boxloss.diou_nms`` against ``torchvision.ops.nms``. Calls are
interleaved round-robin so that load from other processes hits all of them alike (the order
rotates every round); each time is the median over ``--repeats`` rounds after ``--warmup``
rounds. Ratios are ours / torchvision (< 1 is faster). It also checks that ``distance=False``
returns exactly torchvision's indices. ``--eager`` adds the torch-op path on CPU tensors
(``BOXLOSS_KERNEL=eager``, the path of installs without the C extension) as a column, timed after
the others (median of ``--repeats`` / 5 rounds), and checks that it returns the C kernel's indices.
``--soft`` adds Table 3: ``boxloss.batched_soft_nms`` (gaussian, IoU and DIoU overlaps) on the same
inputs, times only (torchvision has no Soft-NMS). ``--device cuda`` puts the inputs on the GPU:
boxloss's torch path (its device formulation) against torchvision's CUDA kernel, each call timed
until the device is done:

    .venv/bin/python tools/bench_nms.py --device cuda --repeats 25
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read when torch starts its OpenMP threads

import torch  # noqa: E402
import torchvision  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import cpu_name  # noqa: E402  (also puts the repo root on sys.path)

import boxloss  # noqa: E402
import boxloss.nms as nms_mod  # noqa: E402


def detector_like(
    n: int, num_classes: int, seed: int, per_object: int = 25, width: float = 1333.0, height: float = 800.0
):
    """``n`` boxes ``[n, 4]``, scores ``[n]`` and labels ``[n]`` shaped like a detector's raw output:
    ``n // per_object`` objects, 80 % of the boxes jittered around them, 20 % background."""
    g = torch.Generator().manual_seed(seed)
    n_obj = max(1, n // per_object)
    size = torch.exp(torch.empty(n_obj).uniform_(math.log(16.0), math.log(512.0), generator=g))  # 16-512 px
    aspect = torch.exp(torch.empty(n_obj).uniform_(-1.1, 1.1, generator=g))  # w / h in [1/3, 3]
    wh = torch.stack([size * aspect.sqrt(), size / aspect.sqrt()], 1)
    centre = torch.rand(n_obj, 2, generator=g) * torch.tensor([width, height])
    obj = torch.cat([centre - wh / 2, centre + wh / 2], 1)  # [n_obj, 4]
    obj_cls = torch.randint(0, num_classes, (n_obj,), generator=g)
    obj_conf = 0.3 + 0.7 * torch.rand(n_obj, generator=g)

    n_fg = n - n // 5
    which = torch.randint(0, n_obj, (n_fg,), generator=g)
    owh = wh[which].repeat(1, 2)
    fg = obj[which] + 0.1 * owh * torch.randn(n_fg, 4, generator=g)
    fg_score = obj_conf[which] * (0.2 + 0.8 * torch.rand(n_fg, generator=g))
    fg_cls = obj_cls[which]

    n_bg = n - n_fg
    bg_size = torch.exp(torch.empty(n_bg, 2).uniform_(math.log(16.0), math.log(256.0), generator=g))  # 16-256 px
    bg_xy = torch.rand(n_bg, 2, generator=g) * torch.tensor([width, height])
    bg = torch.cat([bg_xy, bg_xy + bg_size], 1)
    bg_score = 0.3 * torch.rand(n_bg, generator=g)
    bg_cls = torch.randint(0, num_classes, (n_bg,), generator=g)

    boxes = torch.cat([fg, bg])
    boxes = torch.cat([torch.minimum(boxes[:, :2], boxes[:, 2:]), torch.maximum(boxes[:, :2], boxes[:, 2:])], 1)
    # NMS only sees the order of the scores: replace them by distinct values in the same order
    # (float32 draws collide at this size, and torchvision's order of equal scores is unspecified)
    raw = torch.cat([fg_score, bg_score]).double() + 1e-12 * torch.rand(n, generator=g, dtype=torch.float64)
    scores = torch.empty(n)
    scores[raw.argsort()] = torch.arange(1, n + 1, dtype=torch.float32) / n
    labels = torch.cat([fg_cls, bg_cls])
    confused = torch.rand(n, generator=g) < 0.1
    labels[confused] = torch.randint(0, num_classes, (int(confused.sum()),), generator=g)
    perm = torch.randperm(n, generator=g)
    return boxes[perm].contiguous(), scores[perm].contiguous(), labels[perm].contiguous()


def chain(n: int):
    """``n`` unit boxes on a line, 0.25 apart, scores decreasing along it: box i suppresses box i + 1
    (IoU 0.75 / 1.25 = 0.6) but not box i + 2 (IoU 0.5 / 1.5 = 1/3), so greedy keeps every other box
    after testing each box against the kept ones: torchvision's loop is O(N^2) here."""
    x = torch.arange(n, dtype=torch.float32) * 0.25
    boxes = torch.stack([x, torch.zeros(n), x + 1, torch.ones(n)], 1)
    scores = 1 - torch.arange(n, dtype=torch.float32) / n
    return boxes, scores, torch.zeros(n, dtype=torch.int64)


def eager(fn):
    """``fn`` on the torch-op path (what BOXLOSS_KERNEL=eager selects)."""

    def run():
        saved = os.environ.get("BOXLOSS_KERNEL")
        os.environ["BOXLOSS_KERNEL"] = "eager"
        try:
            return fn()
        finally:
            if saved is None:
                del os.environ["BOXLOSS_KERNEL"]
            else:
                os.environ["BOXLOSS_KERNEL"] = saved

    return run


def time_round_robin(fns: dict, repeats: int, warmup: int, sync=lambda: None) -> dict:
    """Median seconds per call of each function, calling them in turn each round (the order rotates
    from round to round, so no function always runs first, right after another's work); ``sync``
    waits for the device's queue before the clock stops."""
    names = list(fns)
    times = {k: [] for k in names}
    for r in range(warmup + repeats):
        for k in names[r % len(names) :] + names[: r % len(names)]:
            sync()
            t0 = time.perf_counter()
            fns[k]()
            sync()
            if r >= warmup:
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[100, 300, 1000, 2000, 5000, 10000, 20000])  # boxes
    p.add_argument("--classes", type=int, nargs="+", default=[1, 20, 80])  # categories of batched_nms
    p.add_argument("--chain", type=int, default=20000)  # boxes of the chain row (0: no chain row)
    p.add_argument("--iou-threshold", type=float, default=0.5)  # RetinaNet / DIoU paper value
    p.add_argument("--repeats", type=int, default=15)  # timed rounds (median reported)
    p.add_argument("--warmup", type=int, default=3)  # untimed rounds first
    p.add_argument("--threads", type=int, default=2)  # torch intra-op threads (the 2-core machine's count)
    p.add_argument("--boxes-per-object", type=int, default=25)  # cluster size (80 % of it around the object)
    p.add_argument("--eager", action="store_true")  # also time the torch-op path
    p.add_argument("--soft", action="store_true")  # also time Soft-NMS (Table 3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")  # where the boxes live: cpu, or cuda (the torch path, and
    # torchvision's CUDA kernel); times then wait for the device (torch.cuda.synchronize)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda" and args.eager:
        p.error("--eager times the torch path on CPU tensors; on CUDA it is the only path (leave --eager out)")

    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    where = f"device {torch.cuda.get_device_name(device)}, " if device.type == "cuda" else ""
    print(
        f"torch {torch.__version__}, torchvision {torchvision.__version__}, {where}"
        f"{cpu_name()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, C kernel "
        f"{'built' if nms_mod._nms_native is not None else 'NOT built'}, "
        f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    print(
        f"iou_threshold={args.iou_threshold}, {args.boxes_per_object} boxes per object, "
        f"median of {args.repeats} rounds after {args.warmup} warm-up rounds\n"
    )
    t = args.iou_threshold
    cases = [(f"{n:,}", c, detector_like(n, c, seed=args.seed + n + c, per_object=args.boxes_per_object))
             for n in args.sizes for c in args.classes]
    if args.chain:
        cases.append((f"{args.chain:,} chain", 1, chain(args.chain)))
    cases = [(name, c, tuple(x.to(device) for x in inputs)) for name, c, inputs in cases]
    eager_head = " torch path ms | ratio |" if args.eager else ""
    for table in ("batched", "single"):
        if table == "batched":
            print("Table 1: boxloss.batched_diou_nms / torchvision.ops.batched_nms\n")
            print(f"| boxes | classes | kept DIoU / IoU | torchvision ms | DIoU-NMS ms | ratio | plain NMS ms | ratio |"
                  f"{eager_head} = torchvision |")
        else:
            print("\nTable 2: one class, boxloss.diou_nms / torchvision.ops.nms\n")
            print(f"| boxes | classes | kept DIoU / IoU | torchvision ms | DIoU-NMS ms | ratio | plain NMS ms | ratio |"
                  f"{eager_head} = torchvision |")
        print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |" + (" ---: | ---: |" if args.eager else "")
              + " :---: |")
        worst = 0.0
        for name, c, (boxes, scores, labels) in cases:
            if table == "single" and c != 1:
                continue
            if table == "batched":
                fns = {
                    "tv": lambda: torchvision.ops.batched_nms(boxes, scores, labels, t),
                    "diou": lambda: boxloss.batched_diou_nms(boxes, scores, labels, t),
                    "iou": lambda: boxloss.batched_diou_nms(boxes, scores, labels, t, distance=False),
                }
            else:
                fns = {
                    "tv": lambda: torchvision.ops.nms(boxes, scores, t),
                    "diou": lambda: boxloss.diou_nms(boxes, scores, t),
                    "iou": lambda: boxloss.diou_nms(boxes, scores, t, distance=False),
                }
            out = {k: fn() for k, fn in fns.items()}
            same = torch.equal(out["iou"], out["tv"])
            med = time_round_robin(fns, args.repeats, args.warmup, sync)
            if args.eager:  # timed apart: its multi-threaded ops would evict the others' caches
                slow = eager(fns["diou"])
                same = same and torch.equal(slow(), out["diou"])
                med.update(time_round_robin({"eager": slow}, max(3, args.repeats // 5), 1))
            worst = max(worst, med["diou"] / med["tv"], med["iou"] / med["tv"])
            eager_cols = f" {med['eager'] * 1e3:.2f} | {med['eager'] / med['tv']:.2f} |" if args.eager else ""
            print(
                f"| {name} | {c} | {len(out['diou'])} / {len(out['iou'])} | {med['tv'] * 1e3:.3f} | "
                f"{med['diou'] * 1e3:.3f} | {med['diou'] / med['tv']:.3f} | {med['iou'] * 1e3:.3f} | "
                f"{med['iou'] / med['tv']:.3f} |{eager_cols} {'yes' if same else 'NO'} |",
                flush=True,
            )
        print(f"\nlargest ratio of table {1 if table == 'batched' else 2}: {worst:.3f}")
    if args.soft:
        print("\nTable 3: boxloss.batched_soft_nms, gaussian (sigma 0.5, score_threshold 0.001)\n")
        print("| boxes | classes | selected IoU / DIoU | IoU overlap ms | DIoU overlap ms |")
        print("| ---: | ---: | ---: | ---: | ---: |")
        for name, c, (boxes, scores, labels) in cases:
            fns = {
                "iou": lambda: boxloss.batched_soft_nms(boxes, scores, labels),
                "diou": lambda: boxloss.batched_soft_nms(boxes, scores, labels, distance=True),
            }
            kept = {k: len(fn()[0]) for k, fn in fns.items()}
            med = time_round_robin(fns, max(3, args.repeats // 5), 1, sync)
            print(f"| {name} | {c} | {kept['iou']} / {kept['diou']} | {med['iou'] * 1e3:.3f} | "
                  f"{med['diou'] * 1e3:.3f} |", flush=True)
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"\nload average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
