"""Generate the built-in shapes detection dataset (COCO format).

    python tools/make_shapes.py --out data/shapes --num-train 800 --num-val 200 --image-size 128

Deterministic for a seed. The shapes configs call the same generator on first use, in their own
default folder only (data/shapes, data/shapes_crowded); a dataset anywhere else is made here. The
data is written to a temporary folder and moved into place at the end: a failed or interrupted run
leaves nothing half-written.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import run_tool  # noqa: E402

from detectors.shapes import SHAPE_CLASSES, ensure_shapes, make_shapes  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="data/shapes", help="dataset root (train/, val/, annotations/)")
    p.add_argument("--num-train", type=int, default=800, help="training images")
    p.add_argument("--num-val", type=int, default=200, help="validation images")
    p.add_argument("--image-size", type=int, default=128, help="square image side in pixels")
    p.add_argument("--max-objects", type=int, default=None,
                   help="at most this many shapes per image (default 4, with --crowded 12)")
    p.add_argument("--crowded", action="store_true",
                   help="rows of same-class objects side by side, neighbours overlapping up to IoU 0.6 "
                        "(objects 0.12-0.3 of the image side)")
    p.add_argument("--seed", type=int, default=0, help="same seed, same bytes")
    p.add_argument("--if-missing", action="store_true", help="do nothing when both annotation files exist")
    args = p.parse_args(argv)
    t0 = time.time()
    options = dict(num_train=args.num_train, num_val=args.num_val, image_size=args.image_size, seed=args.seed,
                   max_objects=args.max_objects or (12 if args.crowded else 4))
    if args.crowded:
        options.update(crowded=True, min_frac=0.12, max_frac=0.3)
    files = (ensure_shapes if args.if_missing else make_shapes)(args.out, **options)
    print(f"{args.out}: {args.num_train} train + {args.num_val} val images, classes {', '.join(SHAPE_CLASSES)}, "
          f"({time.time() - t0:.1f}s)")
    for split, f in files.items():
        print(f"  {split}: {f}")


if __name__ == "__main__":
    run_tool(main, interrupted="interrupted; nothing was written")
