"""The GPU check: build, test and measure boxloss on one CUDA GPU, and write one Markdown report.

    python tools/gpu_check.py                        # on a machine with one CUDA GPU (make gpu-check)
    python tools/gpu_check.py --dry-run              # the steps, their commands and time budgets; runs nothing
    python tools/gpu_check.py --device cpu --quick   # every step at toy sizes on the CPU (the test's mode)

Needs only the checkout and an installed torch (>= 2.6) with torchvision: no network, no install.
Each step runs in its own process under its own time budget (the defaults add up to under 8
minutes); a step that fails, times out or cannot run (a missing package, a flag a tool lacks) is
recorded in the report with its reason and the next one starts. Steps:

1. ``environment``: Python, torch, Triton, torchvision, mmengine and pycocotools, the GPU.
2. ``build``: the C extensions (``setup.py build_ext --inplace``; without a compiler the losses use
   the eager kernel on CPU, and the GPU uses Triton either way).
3. ``cuda-tests``: ``pytest -m cuda`` (every CUDA-parametrised test).
4. ``bench-losses``: ``tools/bench_losses.py --device cuda`` at 1e4-1e7 pairs: ours vs
   torchvision, forward+backward time, memory saved for backward and peak memory.
5. ``bench-nms``: ``tools/bench_nms.py --device cuda``, if that tool takes the flag (else skipped).
6. ``simulation-paper``, ``simulation-exact``: ``tools/simulate.py`` on the GPU, the full protocol
   (1,715,000 cases, 200 iterations, IoU/GIoU/DIoU/CIoU), seconds per loss.
7. ``amp-epoch``: one epoch of ``tools/train.py configs/retinanet_r18_shapes.py --amp`` (CIoU) on
   the generated shapes data; skipped when mmengine or pycocotools do not import.
8. ``detector-steps``: a training step of RetinaNet and Faster R-CNN R50-FPN (weights=None) at
   800 px, batch 2: default loss vs CIoU, and the box loss's share of a CIoU step (the loss calls
   of one step, counted, then timed alone with their sizes, forward+backward).
9. ``sync-count``: host-device synchronisations of one training step of each architecture with
   DIoU-NMS (``rpn_nms="diou"`` for Faster R-CNN) and CIoU, counted with
   ``torch.cuda.set_sync_debug_mode("warn")``, by the line that caused them.

Writes ``OUT/report.md`` (default ``work_dirs/gpu_check``) and, beside it, each step's full output
(``OUT/<step>.log``). Exit status 0 when every step that ran passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

TOTAL_BUDGET = 470  # seconds for all steps: 8 minutes with start-up and report to spare
# step: seconds (the H100 estimates behind them: tests ~60 Triton compilations of ~1 s each; the
# benchmark ~40 s, dominated by torchvision at 1e7 pairs; the simulation ~10 s a mode with plots)
BUDGETS = {
    "build": 30,
    "cuda-tests": 120,
    "bench-losses": 75,
    "bench-nms": 40,
    "simulation-paper": 35,
    "simulation-exact": 35,
    "amp-epoch": 55,
    "detector-steps": 55,
    "sync-count": 25,
}


def has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def import_error(name: str) -> str | None:
    """None when ``name`` imports, else the one-line reason (a wheel can be present and broken)."""
    try:
        __import__(name)
    except Exception as e:  # noqa: BLE001 - any failure means the step cannot run; say which
        return f"{type(e).__name__}: {e}".splitlines()[0]
    return None


# ------------------------------------------------------------------------------- the steps


def steps(args) -> list[dict]:
    """Each step: name, command (argv, run in ROOT) or a skip reason, budget, what it measures."""
    py = sys.executable
    quick, dev, out = args.quick, args.device, Path(args.out)
    s = []
    s.append(dict(name="build", cmd=[py, "setup.py", "build_ext", "--inplace"]))
    tests = ["tests/boxloss/test_kernels.py"] if quick else ["tests"]
    if err := import_error("pytest"):
        s.append(dict(name="cuda-tests", skip=f"pytest does not import ({err})"))
    else:  # test files whose imports fail (mmengine, hypothesis missing) are reported, the rest run
        s.append(dict(name="cuda-tests", cmd=[py, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
                                             "--continue-on-collection-errors", *tests]
                      + (["--collect-only"] if dev != "cuda" else [])))
    sizes = ["1e3"] if quick else ["1e4", "1e5", "1e6", "1e7"]
    s.append(dict(name="bench-losses", cmd=[py, "tools/bench_losses.py", "--device", dev, "--sizes", *sizes,
                                           "--repeats", "5", "--warmup", "1" if quick else "2"]
                  + (["--losses", "giou", "ciou"] if quick else [])))
    nms_help = subprocess.run([py, "tools/bench_nms.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    if "--device" in nms_help.stdout:
        s.append(dict(name="bench-nms", cmd=[py, "tools/bench_nms.py", "--device", dev, "--repeats", "5"]
                      + (["--sizes", "100", "--classes", "1", "--chain", "0"] if quick else [])))
    else:
        s.append(dict(name="bench-nms", skip="tools/bench_nms.py has no --device flag (its --help lists none): "
                      "the NMS GPU timing is not measured by this check"))
    sim = ["--points", "20", "--iters", "5"] if quick else []
    for mode in ("paper", "exact"):
        s.append(dict(name=f"simulation-{mode}", out=str(out / f"sim_{mode}"),
                      cmd=[py, "tools/simulate.py", "--losses", "iou", "giou", "diou", "ciou", "--mode", mode,
                           "--device", dev, "--out", str(out / f"sim_{mode}"), *sim]))
    missing = [f"{m} ({e})" for m in ("mmengine", "pycocotools") if (e := import_error(m))]
    if missing:
        s.append(dict(name="amp-epoch",
                      skip="needs mmengine and pycocotools; not importable here: " + "; ".join(missing)))
    elif dev != "cuda":
        s.append(dict(name="amp-epoch", skip="--amp needs CUDA (not run with --device cpu)"))
    else:
        s.append(dict(name="amp-epoch", cmd=[  # the config's data root, data/shapes (generated: ~5 s)
            "bash", "-c",
            f"{py} tools/make_shapes.py --out data/shapes --if-missing && "
            f"{py} tools/train.py configs/retinanet_r18_shapes.py --box-loss ciou --amp --work-dir {out / 'amp'} "
            "--cfg-options train_cfg.max_epochs=1 train_cfg.val_interval=1"]))
    s.append(dict(name="detector-steps", json=str(out / "detector_steps.json"),
                  cmd=[py, "tools/gpu_check.py", "--internal-detector-steps", str(out / "detector_steps.json"),
                       "--device", dev] + (["--quick"] if quick else [])))
    if dev == "cuda":
        s.append(dict(name="sync-count", json=str(out / "sync_count.json"),
                      cmd=[py, "tools/gpu_check.py", "--internal-sync-count", str(out / "sync_count.json")]))
    else:
        s.append(dict(name="sync-count", skip="torch.cuda.set_sync_debug_mode needs CUDA (not run with --device cpu)"))
    for step in s:
        step["budget"] = BUDGETS[step["name"]]
    return s


def run_step(step: dict, out: Path, deadline: float) -> dict:
    """Run one step under min(its budget, the time left); never raises."""
    res = dict(name=step["name"], budget=step["budget"])
    if "skip" in step:
        return res | dict(status="skipped", reason=step["skip"], seconds=0.0)
    left = deadline - time.monotonic()
    if left < 10:
        return res | dict(status="skipped", reason=f"the check's total budget ({TOTAL_BUDGET} s) is spent", seconds=0.0)
    budget = min(step["budget"], left)
    log = out / f"{step['name']}.log"
    t0 = time.monotonic()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    try:
        proc = subprocess.run(step["cmd"], cwd=ROOT, capture_output=True, text=True, timeout=budget, env=env)
        output, rc = proc.stdout + proc.stderr, proc.returncode
        status = "passed" if rc == 0 else f"failed (exit status {rc})"
    except subprocess.TimeoutExpired as e:
        output = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        output += (e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        status = f"timed out after {budget:.0f} s"
    except OSError as e:
        output, status = str(e), f"could not start: {e}"
    log.write_text(output)
    return res | dict(status=status, seconds=time.monotonic() - t0, output=output, log=log.name,
                      command=" ".join(map(str, step["cmd"])))


# ------------------------------------------------------------------------------- detector steps


def detector_steps(path: str, device: str, quick: bool, archs=("retinanet", "faster_rcnn")) -> None:
    """Step 8, in its own process: writes the timings to ``path`` as JSON.

    ``quick``: 64 px, ResNet-18, 5 classes, one untimed and one timed step (the script's test)."""
    import torch

    import boxloss
    import boxloss.losses as losses_module
    from detectors import build_detector

    dev = torch.device(device)
    cuda = dev.type == "cuda"
    # 800 px, batch 2 (torchvision's COCO recipe: min_size 800); 3 warm-up steps (cuDNN autotuning,
    # Triton compilation), median of 10
    size, backbone, classes, steps_timed, warmup = (64, "resnet18", 5, 1, 1) if quick else (800, "resnet50", 91, 10, 3)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    g = torch.Generator().manual_seed(0)

    def batch():
        images, targets = [], []
        for _ in range(2):
            images.append(torch.rand(3, size, size * 4 // 3, generator=g).to(dev))
            xy = torch.rand(8, 2, generator=g) * size * 0.7
            wh = size / 16 + torch.rand(8, 2, generator=g) * size * 0.25
            targets.append({"boxes": torch.cat([xy, xy + wh], 1).to(dev),
                            "labels": torch.randint(1, classes, (8,), generator=g).to(dev)})
        return images, targets

    images, targets = batch()
    calls: list[int] = []
    kernel = losses_module.iou_family_loss

    def counting(pred, target, *a, **k):  # the pairs of each IoU-family call of a step
        calls.append(pred.numel() // 4)
        return kernel(pred, target, *a, **k)

    results = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
               "image": f"2 x 3 x {size} x {size * 4 // 3}", "backbone": backbone, "rows": []}
    for arch in archs:
        for loss in ("default", "ciou"):
            torch.manual_seed(0)
            model = build_detector(arch, num_classes=classes, backbone=backbone, box_loss=loss, weights=None,
                                   weights_backbone=None, min_size=size, max_size=size * 2).to(dev).train()
            opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
            times = []
            losses_module.iou_family_loss = counting
            try:
                for i in range(warmup + steps_timed):
                    calls.clear()
                    sync()
                    t0 = time.perf_counter()
                    out = model(images, targets)
                    total = sum(out.values())
                    opt.zero_grad(set_to_none=True)
                    total.backward()
                    opt.step()
                    sync()
                    if i >= warmup:
                        times.append(time.perf_counter() - t0)
            finally:
                losses_module.iou_family_loss = kernel
            row = {"arch": arch, "loss": loss, "step_ms": statistics.median(times) * 1e3,
                   "loss_calls": len(calls), "loss_pairs": sum(calls)}
            if calls:  # the same calls alone: forward and backward of boxloss.ciou_loss at these sizes
                pairs = [torch.rand(n, 4, generator=g).to(dev).mul(100).cumsum(1) for n in calls]
                alone = []
                for i in range(warmup + steps_timed):
                    sync()
                    t0 = time.perf_counter()
                    for p in pairs:
                        q = p.detach().requires_grad_()
                        boxloss.ciou_loss(q, p.flip(0), reduction="sum").backward()
                    sync()
                    if i >= warmup:
                        alone.append(time.perf_counter() - t0)
                row["loss_ms"] = statistics.median(alone) * 1e3
                row["share"] = row["loss_ms"] / row["step_ms"]
            results["rows"].append(row)
            del model, opt
            if cuda:
                torch.cuda.empty_cache()
    Path(path).write_text(json.dumps(results, indent=1))


def sync_count(path: str) -> None:
    """Step 9, in its own process: host syncs of one training step per architecture, as JSON."""
    import collections
    import warnings

    import torch

    from detectors import build_detector

    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 800, 1066, generator=g).to(dev) for _ in range(2)]
    targets = []
    for _ in range(2):
        xy = torch.rand(8, 2, generator=g) * 560
        targets.append({"boxes": torch.cat([xy, xy + 50 + torch.rand(8, 2, generator=g) * 200], 1).to(dev),
                        "labels": torch.randint(1, 91, (8,), generator=g).to(dev)})
    options = {"retinanet": dict(nms="diou"), "faster_rcnn": dict(nms="diou", rpn_nms="diou")}
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    for arch, extra in options.items():
        model = build_detector(arch, num_classes=91, backbone="resnet50", box_loss="ciou", weights=None,
                               weights_backbone=None, min_size=800, max_size=1333, **extra).to(dev).train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-4)
        for counted in (False, True):  # a warm-up step first (allocator, cuDNN, Triton compilation)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn" if counted else "default")
                try:
                    total = sum(model(images, targets).values())
                    opt.zero_grad(set_to_none=True)
                    total.backward()
                    opt.step()
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            torch.cuda.synchronize()
        syncs = [w for w in caught if "synchroniz" in str(w.message)]
        where = collections.Counter(f"{os.path.relpath(w.filename, ROOT)}:{w.lineno}" for w in syncs)
        results["rows"].append({"arch": arch, "options": extra, "syncs": len(syncs),
                                "where": where.most_common(12)})
        del model, opt
        torch.cuda.empty_cache()
    Path(path).write_text(json.dumps(results, indent=1))


# ------------------------------------------------------------------------------- the report


def environment(device: str) -> list[str]:
    import torch

    lines = [f"- Python {platform.python_version()}, torch {torch.__version__}"
             f" (CUDA {torch.version.cuda}), platform {platform.platform()}"]
    for m in ("triton", "torchvision", "mmengine", "pycocotools"):
        err = import_error(m)
        version = getattr(sys.modules.get(m), "__version__", "") if err is None else ""
        lines.append(f"- {m}: " + (f"{version or 'importable'}" if err is None else f"not importable ({err})"))
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        lines.append(f"- GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB, compute capability {p.major}.{p.minor}"
                     f", {torch.cuda.device_count()} device(s)")
    else:
        lines.append("- GPU: none (torch.cuda.is_available() is False)")
    lines.append(f"- Device of this run: {device}")
    return lines


def tail(text: str, n: int = 25) -> str:
    return "\n".join(text.rstrip().splitlines()[-n:])


def section(res: dict, step: dict) -> list[str]:
    name = res["name"]
    lines = [f"## {name}", "",
             f"Status: **{res['status']}** ({res.get('seconds', 0):.1f} s of a {res['budget']} s budget)"]
    if res["status"] == "skipped":
        return lines + ["", f"Skipped: {res['reason']}", ""]
    lines += ["", f"Command: `{res['command']}` (full output: `{res['log']}`)", ""]
    output = res.get("output", "")
    if name == "bench-losses" or name == "bench-nms":
        table = [ln for ln in output.splitlines() if ln.startswith(("|", "GPU:", "CPU:")) or "kernel:" in ln]
        lines += table or ["```text", tail(output), "```"]
    elif name.startswith("simulation-") and res["status"] == "passed" and "out" in step:
        summary = Path(step["out"]) / "summary.json"
        table = Path(step["out"]) / "table.md"
        if table.exists():
            lines += [table.read_text().rstrip()]
        if summary.exists():
            data = json.loads(summary.read_text())
            secs = {k: v["seconds"] for k, v in data["losses"].items()}
            lines += ["", "Seconds per loss: " + ", ".join(f"{k} {v:.2f}" for k, v in secs.items())
                      + f"; all four: {sum(secs.values()):.2f} s ({data['cases']:,} cases, {data['iterations']} "
                      f"iterations, {data['device']})."]
    elif name == "detector-steps" and Path(step.get("json", "-")).exists():
        data = json.loads(Path(step["json"]).read_text())
        lines += [f"{data['device']}, torch {data['torch']}, {data['backbone']}-FPN, images {data['image']}, "
                  "SGD step; median of the timed steps.", "",
                  "| detector | box loss | step ms | loss calls / step | pairs / step | loss alone ms "
                  "| share of step |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
        for r in data["rows"]:
            share = f"{100 * r['share']:.2f} %" if "share" in r else "-"
            alone = f"{r['loss_ms']:.2f}" if "loss_ms" in r else "-"
            lines.append(f"| {r['arch']} | {r['loss']} | {r['step_ms']:.1f} | {r['loss_calls']} | {r['loss_pairs']} "
                         f"| {alone} | {share} |")
    elif name == "sync-count" and Path(step.get("json", "-")).exists():
        data = json.loads(Path(step["json"]).read_text())
        lines += [f"{data['device']}, torch {data['torch']}; one training step (ResNet-50-FPN, 800 px, batch 2, "
                  "CIoU), syncs reported by torch.cuda.set_sync_debug_mode('warn').", ""]
        for r in data["rows"]:
            lines += [f"- {r['arch']} {r['options']}: **{r['syncs']}** syncs; most frequent: "
                      + ", ".join(f"`{w}` x{c}" for w, c in r["where"])]
    else:
        lines += ["```text", tail(output), "```"]
    return lines + [""]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="work_dirs/gpu_check", help="folder of the report and the step logs")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: for testing the script")
    ap.add_argument("--quick", action="store_true", help="toy sizes (with --device cpu: the test's mode)")
    ap.add_argument("--dry-run", action="store_true", help="print the steps and budgets, run nothing")
    ap.add_argument("--only", nargs="+", metavar="STEP", choices=list(BUDGETS), help="run only these steps")
    ap.add_argument("--internal-detector-steps", metavar="JSON", help=argparse.SUPPRESS)
    ap.add_argument("--internal-sync-count", metavar="JSON", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.internal_detector_steps:
        detector_steps(args.internal_detector_steps, args.device, args.quick)
        return 0
    if args.internal_sync_count:
        sync_count(args.internal_sync_count)
        return 0
    import torch

    if args.device == "cuda" and not torch.cuda.is_available() and not args.dry_run:
        print("error: no CUDA device (torch.cuda.is_available() is False); --device cpu --quick tests the script",
              file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    args.out = str(out)
    plan = [s for s in steps(args) if not args.only or s["name"] in args.only]
    if args.dry_run:
        for s in plan:
            what = " ".join(map(str, s["cmd"])) if "cmd" in s else "skipped: " + s["skip"]
            print(f"{s['name']:<18} {s['budget']:>4} s  {what}")
        print(f"total budget {TOTAL_BUDGET} s")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    deadline = started + TOTAL_BUDGET
    report = ["# boxloss GPU check", "",
              f"`python tools/gpu_check.py {' '.join(argv if argv is not None else sys.argv[1:])}`, "
              f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "", "## environment", "",
              *environment(args.device), ""]
    results = []
    for s in plan:
        print(f"[gpu_check] {s['name']} ...", flush=True)
        res = run_step(s, out, deadline)
        print(f"[gpu_check] {s['name']}: {res['status']} ({res.get('seconds', 0):.1f} s)", flush=True)
        results.append(res)
        report += section(res, s)
    summary = ["## summary", "", "| step | status | seconds |", "| --- | --- | ---: |"]
    summary += [f"| {r['name']} | {r['status']} | {r.get('seconds', 0):.1f} |" for r in results]
    summary += ["", f"Total: {time.monotonic() - started:.0f} s."]
    report[report.index("## environment"):report.index("## environment")] = summary + [""]
    from detectors.fileio import atomic_text

    atomic_text(str(out / "report.md"), "\n".join(report) + "\n")
    print(f"[gpu_check] report: {out / 'report.md'}")
    return 0 if all(r["status"] in ("passed", "skipped") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
