"""tools/visualize.py: the error kinds of --errors on hand-built images, --worst, --dataset, --mosaic,
running a checkpoint, and one-line errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from detectors import drawing
from detectors.errors import CheckpointError, DataNotFoundError, OptionError
from detectors.evaluation import match_image
from detectors.fileio import default_file_mode
from detectors.shapes import make_shapes

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import visualize  # noqa: E402

BACKGROUND = (40, 40, 40)
# image 1: box A (class "one") and box B (class "two"); detections by score:
#   0.9 "one" on A: true positive;    0.8 "one" on A again: duplicate;
#   0.7 "one" on B: wrong class;      0.6 "two" on empty ground: background;
#   0.1 "two" on B: below --score-thr 0.3 (at 0.05 it finds B: then 2 TP and nothing missed).
# B has no true positive: missed. Known counts: 1 TP, 1 duplicate, 1 wrong class, 1 background, 1 missed.
GT_BOXES = {"A": [20, 20, 40, 40], "B": [120, 20, 40, 40]}  # xywh
DETS_1 = [("one", [21, 21, 40, 40], 0.9), ("one", [22, 20, 38, 40], 0.8), ("one", [118, 18, 40, 40], 0.7),
          ("two", [20, 130, 40, 40], 0.6), ("two", [120, 20, 40, 40], 0.1)]
CATS = {"one": 1, "two": 2}


def _xyxy(b):
    return [b[0], b[1], b[0] + b[2], b[1] + b[3]]


@pytest.fixture()
def hand_built(tmp_path):
    """Three 200x200 flat images with boxes A and B; image 1 as above, image 2 with 2 errors, image 3 with none."""
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    gt = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "one"}, {"id": 2, "name": "two"}]}
    for i in (1, 2, 3):
        Image.new("RGB", (200, 200), BACKGROUND).save(img_dir / f"{i}.png")
        gt["images"].append({"id": i, "file_name": f"{i}.png", "width": 200, "height": 200})
        for name, cat in (("A", 1), ("B", 2)):
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": i, "category_id": cat,
                                      "bbox": GT_BOXES[name], "area": 1600, "iscrowd": 0})
    dets = [{"image_id": 1, "category_id": CATS[c], "bbox": b, "score": s} for c, b, s in DETS_1]
    dets += [{"image_id": 2, "category_id": 1, "bbox": [21, 21, 40, 40], "score": 0.9},  # A found, B missed,
             {"image_id": 2, "category_id": 1, "bbox": [150, 150, 30, 30], "score": 0.5}]  # one background
    dets += [{"image_id": 3, "category_id": 1, "bbox": GT_BOXES["A"], "score": 0.9},
             {"image_id": 3, "category_id": 2, "bbox": GT_BOXES["B"], "score": 0.8}]
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    return {"gt": str(tmp_path / "gt.json"), "dets": str(tmp_path / "dets.json"), "images": str(img_dir),
            "tmp": tmp_path}


def test_match_image_hand_built():
    gt_boxes = [_xyxy(GT_BOXES["A"]), _xyxy(GT_BOXES["B"])]
    kept = [d for d in DETS_1 if d[2] >= 0.3]
    m = match_image(gt_boxes, [1, 2], [_xyxy(b) for _, b, _ in kept], [s for _, _, s in kept],
                    [CATS[c] for c, _, _ in kept])
    assert m.kinds == ["tp", "duplicate", "wrong_class", "background"]
    assert m.det_gt.tolist() == [0, 0, 1, -1]  # the box each one took, duplicated or overlaps
    assert m.gt_matched.tolist() == [True, False] and m.missed.tolist() == [False, True]
    assert m.counts() == {"tp": 1, "duplicate": 1, "wrong_class": 1, "background": 1, "crowd": 0, "missed": 1}
    assert m.num_errors == 4


def test_match_image_is_greedy_by_score_as_coco():
    # one box [0, 0, 10, 10]: the 0.9 detection (IoU 0.64) takes it although the 0.5 one fits better
    # (IoU 1); the better one becomes the duplicate. Input order does not matter, only scores.
    m = match_image([[0, 0, 10, 10]], [1], [[0, 0, 10, 10], [0, 0, 8, 8]], [0.5, 0.9], [1, 1])
    assert m.kinds == ["duplicate", "tp"]
    # a detection overlapping two free boxes of its class takes the one of higher IoU
    m = match_image([[0, 0, 10, 10], [1, 0, 11, 10]], [1, 1], [[1, 0, 11, 10]], [0.9], [1])
    assert m.kinds == ["tp"] and m.det_gt.tolist() == [1]
    # below the IoU threshold nothing matches: IoU([0,0,10,10], [5,0,15,10]) = 1/3
    m = match_image([[0, 0, 10, 10]], [1], [[5, 0, 15, 10]], [0.9], [1])
    assert m.kinds == ["background"] and m.missed.tolist() == [True]
    assert match_image([[0, 0, 10, 10]], [1], [[5, 0, 15, 10]], [0.9], [1], iou_thr=0.3).kinds == ["tp"]
    # no detections, no boxes
    assert match_image(np.zeros((0, 4)), [], np.zeros((0, 4)), [], []).counts()["missed"] == 0


def test_match_image_crowd_regions_are_not_errors():
    # a crowd region [0, 0, 100, 100]: a detection inside it is ignored, as COCO ignores it; the
    # region itself is never missed
    m = match_image([[0, 0, 100, 100]], [1], [[10, 10, 30, 30]], [0.9], [1], gt_crowd=[True])
    assert m.kinds == ["crowd"] and m.missed.tolist() == [False] and m.num_errors == 0


def test_errors_counts_and_drawing(hand_built):
    out = hand_built["tmp"] / "vis"
    result = visualize.main(["--gt", hand_built["gt"], "--image-dir", hand_built["images"], "--dets", hand_built["dets"],
                             "--out", str(out), "--num", "1", "--errors", "--score-thr", "0.3"])
    assert result["images"] == [1]
    assert result["counts"][1] == {"tp": 1, "duplicate": 1, "wrong_class": 1, "background": 1, "crowd": 0, "missed": 1}
    assert result["paths"] == [str(out / "1_1.png")]
    assert os.stat(out / "1_1.png").st_mode & 0o777 == default_file_mode()
    with Image.open(out / "1_1.png") as im:
        assert im.width == 512 and im.height > 512  # enlarged to --size, a caption and a legend added
    # a lower threshold lets the 0.1 detection find B
    result = visualize.main(["--gt", hand_built["gt"], "--image-dir", hand_built["images"], "--dets", hand_built["dets"],
                             "--out", str(out), "--num", "1", "--errors", "--score-thr", "0.05"])
    assert result["counts"][1] == {"tp": 2, "duplicate": 1, "wrong_class": 1, "background": 1, "crowd": 0, "missed": 0}


def test_draw_image_uses_the_error_colours():
    image = Image.new("RGB", (200, 200), BACKGROUND)
    gt = (np.array([_xyxy(GT_BOXES["A"]), _xyxy(GT_BOXES["B"])], float), np.array([1, 2]), np.array([False, False]))
    kept = [d for d in DETS_1 if d[2] >= 0.3]
    dets = (np.array([_xyxy(b) for _, b, _ in kept], float), np.array([s for _, _, s in kept]),
            np.array([CATS[c] for c, _, _ in kept]))
    m = match_image(gt[0], gt[1], dets[0], dets[1], dets[2])
    legend = drawing.draw_image(image, gt, dets, names={1: "one", 2: "two"}, colours={1: (0, 0, 255), 2: (255, 255, 0)},
                                  scale=1.0, font=drawing.font(12), match=m)
    assert {k: v[3] for k, v in legend.items()} == {"tp": 1, "duplicate": 1, "wrong_class": 1, "background": 1, "missed": 1}
    pixels = np.asarray(image).reshape(-1, 3)
    for kind in ("tp", "duplicate", "wrong_class", "background", "missed"):
        assert (pixels == drawing.ERROR_STYLE[kind][0]).all(axis=1).sum() > 50, kind
    assert not (pixels == drawing.ERROR_STYLE["crowd"][0]).all(axis=1).any()
    # without a match: one colour per class
    image = Image.new("RGB", (200, 200), BACKGROUND)
    legend = drawing.draw_image(image, gt, dets, names={1: "one", 2: "two"}, colours={1: (0, 0, 255), 2: (255, 255, 0)},
                                  scale=1.0, font=drawing.font(12))
    assert sorted(v[1] for v in legend.values()) == ["one", "two"]
    pixels = np.asarray(image).reshape(-1, 3)
    assert (pixels == (0, 0, 255)).all(axis=1).sum() > 100 and (pixels == (255, 255, 0)).all(axis=1).sum() > 50


def test_worst_picks_the_images_with_most_errors(hand_built, capsys):
    out = hand_built["tmp"] / "worst"
    result = visualize.main(["--gt", hand_built["gt"], "--image-dir", hand_built["images"], "--dets", hand_built["dets"],
                             "--out", str(out), "--worst", "2"])
    assert result["images"] == [1, 2]  # 4 errors, 2 errors (image 3 has none)
    assert result["counts"][2] == {"tp": 1, "duplicate": 0, "wrong_class": 0, "background": 1, "crowd": 0, "missed": 1}
    assert sorted(os.listdir(out)) == ["1_1.png", "2_2.png"]
    printed = capsys.readouterr().out
    assert "1.png (id 1): 4 errors" in printed and "2.png (id 2): 2 errors" in printed


def test_dataset_mode_and_mosaic(tmp_path):
    files = make_shapes(str(tmp_path / "shapes"), num_train=0, num_val=5, image_size=64, seed=3)
    img_dir = str(tmp_path / "shapes" / "val")
    result = visualize.main(["--gt", files["val"], "--image-dir", img_dir, "--dataset", "--out", str(tmp_path / "gt"),
                             "--num", "4", "--size", "128"])
    assert len(result["paths"]) == 4 and result["counts"] == {}
    assert sorted(os.listdir(tmp_path / "gt")) == ["1_000000.png", "2_000001.png", "3_000002.png", "4_000003.png"]
    result = visualize.main(["--gt", files["val"], "--image-dir", img_dir, "--dataset", "--out", str(tmp_path / "m"),
                             "--num", "4", "--size", "128", "--mosaic"])
    assert result["paths"] == [str(tmp_path / "m" / "mosaic.png")] and result["images"] == [1, 2, 3, 4]
    with Image.open(result["paths"][0]) as im:
        assert im.width == 2 * 128 + 6 and im.height > 2 * 128  # 2 x 2 tiles, captions and a legend


@pytest.mark.parametrize("args, message", [
    (["--dataset", "--errors"], "--errors and --worst need detections"),
    (["--dataset", "--worst", "3"], "--errors and --worst need detections"),
    (["--config", "configs/retinanet_r18_shapes.py"], "--config needs --checkpoint"),
    (["--dets", "d.json", "--checkpoint", "c.pth"], "--checkpoint needs --config"),
    (["--dataset", "--num", "0"], "--num must be at least 1, got 0"),
    (["--dets", "d.json", "--iou-thr", "0"], r"--iou-thr must be in \(0, 1\], got 0.0"),
])
def test_option_errors(hand_built, args, message):
    with pytest.raises(OptionError, match=message):
        visualize.main(["--gt", hand_built["gt"], "--image-dir", hand_built["images"], "--out", "unused", *args])
    assert not os.path.exists("unused")


def test_missing_files_are_one_line_errors(hand_built, tmp_path):
    with pytest.raises(DataNotFoundError, match="image id 1 file .*nowhere/1.png' not found"):
        visualize.main(["--gt", hand_built["gt"], "--image-dir", str(tmp_path / "nowhere"), "--dataset",
                        "--out", str(tmp_path / "o")])
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "visualize.py"), "--gt", hand_built["gt"],
                          "--image-dir", hand_built["images"], "--dets", str(tmp_path / "nope.json"),
                          "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr == f"error: DETS.json file {str(tmp_path / 'nope.json')!r} does not exist\n"
    assert not (tmp_path / "o").exists()


def test_checkpoint_mode(tmp_path):
    """--config/--checkpoint runs the model (random weights here) and draws what it finds; a
    checkpoint that does not fit the config is refused."""
    from mmengine.registry import MODELS

    import detectors.engine  # noqa: F401  (registers DetectorModel)
    from _common import load_config

    files = make_shapes(str(tmp_path / "shapes"), num_train=0, num_val=2, image_size=128, seed=4)
    cfg = load_config(os.path.join(ROOT, "configs", "retinanet_r18_shapes.py"))
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    state = model.state_dict()
    torch.save({"state_dict": state, "meta": {}}, tmp_path / "ckpt.pth")
    args = ["--gt", files["val"], "--image-dir", str(tmp_path / "shapes" / "val"), "--config",
            os.path.join(ROOT, "configs", "retinanet_r18_shapes.py"), "--checkpoint", str(tmp_path / "ckpt.pth"),
            "--out", str(tmp_path / "vis"), "--errors", "--score-thr", "0", "--device", "cpu"]
    result = visualize.main(args)
    assert result["images"] == [1, 2] and len(result["paths"]) == 2
    n_gt = len(json.load(open(files["val"]))["annotations"])
    assert sum(c["tp"] + c["missed"] for c in result["counts"].values()) == n_gt
    del state[next(iter(state))]
    torch.save({"state_dict": state}, tmp_path / "bad.pth")
    args[args.index(str(tmp_path / "ckpt.pth"))] = str(tmp_path / "bad.pth")
    args[args.index(str(tmp_path / "vis"))] = str(tmp_path / "vis_bad")
    with pytest.raises(CheckpointError, match="bad.pth' does not fit this model: 1 missing keys"):
        visualize.main(args)
    assert not (tmp_path / "vis_bad").exists()
