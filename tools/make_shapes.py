"""Generate the built-in shapes detection dataset (COCO format).

    python tools/make_shapes.py --out data/shapes --num-train 800 --num-val 200 --image-size 128

Deterministic for a seed. The default configs call the same generator on first use.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from detectors.shapes import SHAPE_CLASSES, ensure_shapes, make_shapes  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="data/shapes", help="dataset root (train/, val/, annotations/)")
    p.add_argument("--num-train", type=int, default=800, help="training images")
    p.add_argument("--num-val", type=int, default=200, help="validation images")
    p.add_argument("--image-size", type=int, default=128, help="square image side in pixels")
    p.add_argument("--max-objects", type=int, default=4, help="at most this many shapes per image")
    p.add_argument("--seed", type=int, default=0, help="same seed, same bytes")
    p.add_argument("--if-missing", action="store_true", help="do nothing when both annotation files exist")
    args = p.parse_args(argv)
    t0 = time.time()
    files = (ensure_shapes if args.if_missing else make_shapes)(args.out, num_train=args.num_train, num_val=args.num_val, image_size=args.image_size,
                        max_objects=args.max_objects, seed=args.seed)
    print(f"{args.out}: {args.num_train} train + {args.num_val} val images, classes {', '.join(SHAPE_CLASSES)}, "
          f"({time.time() - t0:.1f}s)")
    for split, f in files.items():
        print(f"  {split}: {f}")


if __name__ == "__main__":
    main()
