"""Draw ground truth and detections on images: see what the detector does, and where it fails.

    # detections from a COCO results file (tools/test.py --out), the first 16 images in one mosaic
    python tools/visualize.py --gt data/shapes/annotations/instances_val.json --image-dir data/shapes/val \\
        --dets work_dirs/dets.json --out work_dirs/vis --num 16 --mosaic
    # run a checkpoint; mark every error; the 8 images with the most errors
    python tools/visualize.py --gt data/shapes/annotations/instances_val.json --image-dir data/shapes/val \\
        --config configs/retinanet_r18_shapes.py --checkpoint work_dirs/retinanet_r18_shapes/epoch_9.pth \\
        --out work_dirs/vis_worst --errors --worst 8 --mosaic
    # the ground truth alone: check a new annotation file by eye
    python tools/visualize.py --gt data/shapes/annotations/instances_val.json --image-dir data/shapes/val \\
        --dataset --out work_dirs/vis_gt --num 16 --mosaic

Ground truth is dashed, detections (score >= --score-thr) are solid with "class score", one colour
per class. With --errors the colours say what each detection is, matched greedily by score at IoU
>= --iou-thr as COCO matches (detectors/evaluation.py, match_image): a true positive (it takes an
unmatched box of its class), a duplicate (the box of its class was already taken), a wrong class
(it overlaps a box of another class) or background (it overlaps nothing); a ground-truth box no
true positive found is missed. --worst K draws the K images with the most errors (false positives
plus missed boxes). Writes OUT/<image id>_<file name>.png per image, or OUT/mosaic.png.

The checkpoint is unpickled with torch.load(weights_only=False), as tools/test.py does (training
checkpoints hold the optimizer state): load only checkpoints you trust. Its weights must fit the
config's model exactly.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import load_config, removed_on_failure, run_tool  # noqa: E402  (also puts the repo root on sys.path)

from detectors.drawing import ERROR_STYLE, class_colours, dashed_rectangle, font, render, text_size  # noqa: E402
from detectors.errors import DataError, OptionError  # noqa: E402

def _legend_strip(items: dict, width: int, font, *, footer: str, error_mode: bool):
    """Rows of coloured swatches with their text (and counts), wrapped to ``width``, then ``footer``."""
    from PIL import Image, ImageDraw

    if error_mode:  # every kind of error, found or not: the legend says what each colour means
        items = {k: items.get(k, [ERROR_STYLE[k][0], ERROR_STYLE[k][1], k == "missed", 0])
                 for k in ("tp", "duplicate", "wrong_class", "background", "missed", "crowd") if k != "crowd" or k in items}
    keys = list(items) if error_mode else sorted(items, key=lambda k: items[k][1])
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    _, _, _, line_h = text_size(probe, "Ag", font)
    sw, pad = line_h + 2, 8
    entries = []
    for k in keys:
        colour, text, dashed, count = items[k]
        entries.append((colour, f"{text} ({count})" if error_mode else text, dashed))
    rows, row, x = [], [], pad
    for colour, text, dashed in entries:
        w = sw + 4 + text_size(probe, text, font)[2] + 2 * pad
        if row and x + w > width:
            rows.append(row)
            row, x = [], pad
        row.append((colour, text, dashed, x))
        x += w
    if row:
        rows.append(row)
    footer_lines = _wrap(probe, footer, font, width - 2 * pad) if footer else []
    height = pad + (len(rows) + len(footer_lines)) * (line_h + pad) + pad // 2
    strip = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    y = pad
    for row in rows:
        for colour, text, dashed, x in row:
            box = [x, y, x + sw, y + line_h]
            if dashed:
                dashed_rectangle(draw, box, colour, 2, dash=4, gap=3)
            else:
                draw.rectangle(box, fill=colour)
            left, top, _, _ = text_size(draw, text, font)
            draw.text((x + sw + 4 - left, y - top), text, fill=(0, 0, 0), font=font)
        y += line_h + pad
    for line in footer_lines:
        left, top, _, _ = text_size(draw, line, font)
        draw.text((pad - left, y - top), line, fill=(70, 70, 70), font=font)
        y += line_h + pad
    return strip


def _wrap(draw, text: str, font, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split(" "):
        trial = f"{line} {word}" if line else word
        if line and text_size(draw, trial, font)[2] > width:
            lines.append(line)
            line = word
        else:
            line = trial
    return lines + [line]


def _with_caption(image, caption: str, font):
    from PIL import Image, ImageDraw

    probe = ImageDraw.Draw(image)
    left, top, _, h = text_size(probe, caption, font)
    out = Image.new("RGB", (image.width, image.height + h + 8), (255, 255, 255))
    out.paste(image, (0, h + 8))
    ImageDraw.Draw(out).text((4 - left, 4 - top), caption, fill=(0, 0, 0), font=font)
    return out


def _stack(top, bottom):
    from PIL import Image

    out = Image.new("RGB", (max(top.width, bottom.width), top.height + bottom.height), (255, 255, 255))
    out.paste(top, (0, 0))
    out.paste(bottom, (0, top.height))
    return out


def _mosaic(panels: list, cols: int):
    from PIL import Image

    cell_w, cell_h = max(p.width for p in panels), max(p.height for p in panels)
    gap = 6
    rows = math.ceil(len(panels) / cols)
    out = Image.new("RGB", (cols * cell_w + (cols - 1) * gap, rows * cell_h + (rows - 1) * gap), (255, 255, 255))
    for i, panel in enumerate(panels):
        out.paste(panel, ((i % cols) * (cell_w + gap), (i // cols) * (cell_h + gap)))
    return out


def _merge_legends(legends: list[dict]) -> dict:
    merged: dict = {}
    for legend in legends:
        for key, (colour, text, dashed, count) in legend.items():
            merged.setdefault(key, [colour, text, dashed, 0])[3] += count
    return merged


# --------------------------------------------------------------------------- detections


def predict(config: str, checkpoint: str, gt_file: str, image_dir: str, image_ids: list, *, device: str,
            cfg_options=None, batch_size: int = 4) -> list[dict]:
    """Run the checkpoint on the images; COCO result dicts (every score the model returns)."""
    import torch
    from mmengine.registry import MODELS

    from detectors.checkpoint import load_weights, read_checkpoint, state_dict_of
    from detectors.engine import CocoDetectionDataset

    cfg = load_config(config, cfg_options=cfg_options)
    loader = cfg.get("test_dataloader") or cfg.get("val_dataloader") or {}
    transforms = (loader.get("dataset") or {}).get("transforms")  # the evaluation pipeline, if any
    dataset = CocoDetectionDataset(data_root="", ann_file=gt_file, img_dir=image_dir, transforms=transforms)
    model = MODELS.build(cfg.model)
    load_weights(model, state_dict_of(read_checkpoint(checkpoint, trusted=True), checkpoint), checkpoint,
                 hint="not offered here: pass the config the checkpoint was trained with")
    model.to(device).eval()
    position = {image_id: i for i, image_id in enumerate(dataset.ids)}
    detections = []
    with torch.no_grad():
        for start in range(0, len(image_ids), batch_size):
            batch = [dataset[position[i]] for i in image_ids[start:start + batch_size]]
            inputs = [image.to(device) for image, _ in batch]
            for out in model(inputs, [target for _, target in batch], mode="predict"):
                unknown = sorted({int(v) for v in out["labels"]} - set(dataset.label_to_cat_id))
                if unknown:
                    raise DataError(f"the model predicted labels {unknown}, but {gt_file!r} has classes "
                                    f"1..{dataset.num_classes} (is this the config the checkpoint was trained for?)")
                for box, score, label in zip(out["boxes"].tolist(), out["scores"].tolist(), out["labels"].tolist()):
                    detections.append({"image_id": out["image_id"], "category_id": dataset.label_to_cat_id[label],
                                       "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]], "score": score})
            done = min(start + batch_size, len(image_ids))
            if done % 50 < batch_size or done == len(image_ids):
                print(f"predicted {done}/{len(image_ids)} images", flush=True)
    return detections


def _load_detections(dets_file: str, coco_gt) -> list[dict]:
    import json

    from eval_coco import check_detections

    if not os.path.isfile(dets_file):
        from detectors.errors import DataNotFoundError

        raise DataNotFoundError(f"DETS.json file {dets_file!r} does not exist")
    try:
        with open(dets_file) as f:
            dets = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{dets_file}: not valid JSON ({e})") from None
    check_detections(dets, dets_file, coco_gt)
    return dets


# --------------------------------------------------------------------------- main


def _check_args(p, args) -> None:
    if args.config is not None and args.checkpoint is None:
        raise OptionError("--config needs --checkpoint (the weights to run)")
    if args.checkpoint is not None and args.config is None:
        raise OptionError("--checkpoint needs --config (the model the weights belong to)")
    if args.dataset and (args.errors or args.worst):
        raise OptionError("--errors and --worst need detections (--dets or --config/--checkpoint), not --dataset")
    if args.num < 1:
        raise OptionError(f"--num must be at least 1, got {args.num}")
    if args.worst is not None and args.worst < 1:
        raise OptionError(f"--worst must be at least 1, got {args.worst}")
    if not math.isfinite(args.score_thr):
        raise OptionError(f"--score-thr must be a finite number, got {args.score_thr}")
    if not 0 < args.iou_thr <= 1:
        raise OptionError(f"--iou-thr must be in (0, 1], got {args.iou_thr}")
    if args.size < 64:
        raise OptionError(f"--size must be at least 64 pixels, got {args.size}")


def main(argv=None):
    from mmengine.config import DictAction

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gt", required=True, metavar="GT.json", help="COCO instances file (ground truth)")
    p.add_argument("--image-dir", required=True, help="folder the images' file_name is relative to")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--dets", metavar="DETS.json", help="COCO results file (tools/test.py --out)")
    source.add_argument("--config", help="mmengine config of the model (with --checkpoint)")
    source.add_argument("--dataset", action="store_true", help="draw the ground truth alone")
    p.add_argument("--checkpoint", help="checkpoint to run (with --config)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--num", type=int, default=16, help="draw the first N images by id (default 16)")
    # 0.3: what a deployed detector typically keeps; lower shows the low-score clutter AP also counts
    p.add_argument("--score-thr", type=float, default=0.3, help="draw detections scoring at least this (default 0.3)")
    p.add_argument("--errors", action="store_true", help="colour detections as TP / duplicate / wrong class / "
                   "background and mark missed ground truth")
    p.add_argument("--worst", type=int, metavar="K", help="draw the K images with the most errors (implies --errors)")
    p.add_argument("--iou-thr", type=float, default=0.5, help="IoU of a match for --errors (default 0.5, as AP50)")
    p.add_argument("--mosaic", action="store_true", help="one mosaic.png of all the images instead of one PNG each")
    # small images (the 128 px shapes) are enlarged so the tags stay readable; large ones shrunk
    p.add_argument("--size", type=int, default=512, help="longer side of each drawn image in pixels (default 512)")
    p.add_argument("--cols", type=int, help="mosaic columns (default: about the square root of the count)")
    p.add_argument("--device", help="device for --checkpoint (default: cuda if available, else cpu)")
    p.add_argument("--cfg-options", nargs="+", action=DictAction, help="override config keys: k=v")
    args = p.parse_args(argv)
    _check_args(p, args)
    error_mode = args.errors or args.worst is not None

    import numpy as np

    from detectors.data import CocoDetection
    from detectors.evaluation import detection_arrays, image_arrays, match_image
    from detectors.fileio import atomic_write

    dataset = CocoDetection(args.gt, args.image_dir)  # validates the file, and that every image exists
    coco = dataset.coco
    names = {c: coco.cats[c]["name"] for c in dataset.cat_ids}
    colours = class_colours(dataset.cat_ids)
    image_ids = list(dataset.ids)
    if not image_ids:
        raise DataError(f"{args.gt} has no images")
    candidates = image_ids if args.worst is not None else image_ids[:args.num]

    if args.dataset:
        detections = []
    elif args.dets:
        detections = _load_detections(args.dets, coco)
    else:
        import torch

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        detections = predict(args.config, args.checkpoint, args.gt, args.image_dir, candidates, device=device,
                             cfg_options=args.cfg_options)
    by_image = detection_arrays([d for d in detections if d["score"] >= args.score_thr])
    empty = (np.zeros((0, 4)), np.zeros(0), np.zeros(0, np.int64))

    matches = {}
    if error_mode:
        for image_id in candidates:
            gt_boxes, gt_cats, crowd = image_arrays(coco, image_id)
            boxes, scores, cats = by_image.get(image_id, empty)
            matches[image_id] = match_image(gt_boxes, gt_cats, boxes, scores, cats, iou_thr=args.iou_thr,
                                            gt_crowd=crowd)
    if args.worst is not None:
        ranked = sorted(candidates, key=lambda i: (-matches[i].num_errors, i))
        selected = ranked[:args.worst]
    else:
        selected = candidates

    tag_font, small = font(max(11, args.size // 30)), font(max(10, args.size // 36))
    panels, legends, written = [], [], []
    with removed_on_failure(args.out):
        os.makedirs(args.out, exist_ok=True)
        for image_id in selected:
            info = coco.imgs[image_id]
            match = matches.get(image_id)
            image, legend = render(os.path.join(args.image_dir, info["file_name"]), image_arrays(coco, image_id),
                                   by_image.get(image_id, empty), names=names, colours=colours, size=args.size,
                                   match=match)
            caption = f"{info['file_name']} (id {image_id})"
            if match is not None:
                caption += f": {match.num_errors} error{'' if match.num_errors == 1 else 's'}"
            panel = _with_caption(image, caption, small)
            if args.mosaic:
                panels.append(panel)
                legends.append(legend)
                continue
            strip = _legend_strip(legend, panel.width, small, footer=_footer(args, error_mode), error_mode=error_mode)
            stem = os.path.splitext(os.path.basename(info["file_name"]))[0]
            path = os.path.join(args.out, f"{image_id}_{stem}.png")
            out = _stack(panel, strip)
            atomic_write(path, lambda tmp, out=out: out.save(tmp, format="PNG", optimize=True))
            written.append(path)
        if args.mosaic and panels:
            cols = args.cols or math.ceil(math.sqrt(len(panels)))
            grid = _mosaic(panels, max(1, min(cols, len(panels))))
            strip = _legend_strip(_merge_legends(legends), grid.width, tag_font, footer=_footer(args, error_mode),
                                  error_mode=error_mode)
            out = _stack(grid, strip)
            path = os.path.join(args.out, "mosaic.png")
            atomic_write(path, lambda tmp: out.save(tmp, format="PNG", optimize=True))
            written.append(path)
    if args.worst is not None:
        print(f"the {len(selected)} images with the most errors (score >= {args.score_thr:g}, IoU >= {args.iou_thr:g}):")
        for image_id in selected:
            counts = matches[image_id].counts()
            print(f"  {coco.imgs[image_id]['file_name']} (id {image_id}): {matches[image_id].num_errors} errors "
                  + ", ".join(f"{counts[k]} {ERROR_STYLE[k][1]}" for k in ("duplicate", "wrong_class", "background",
                                                                           "missed", "tp")))
    print(f"wrote {written[0] if len(written) == 1 else f'{len(written)} images to {args.out}'}")
    return {"images": selected, "paths": written,
            "counts": {image_id: m.counts() for image_id, m in matches.items() if image_id in selected}}


def _footer(args, error_mode: bool) -> str:
    if args.dataset:
        return "dashed: ground truth"
    what = f"solid: detections with score >= {args.score_thr:g}, dashed: ground truth"
    if error_mode:
        what += f"; matched greedily by score at IoU >= {args.iou_thr:g}"
    return what


if __name__ == "__main__":
    run_tool(main)
