"""The shapes generator, COCO dataset validation, transforms and collate."""

import copy
import json
import os

import pytest
import torch

from detectors.data import (
    AnnotationError,
    CocoDetection,
    RandomHorizontalFlip,
    Resize,
    detection_collate,
    validate_coco_annotations,
)
from detectors.shapes import SHAPE_CLASSES, make_shapes


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    make_shapes(str(root), num_train=12, num_val=6, image_size=64, seed=3)
    return root


def test_make_shapes_is_deterministic_and_valid(shapes, tmp_path):
    make_shapes(str(tmp_path), num_train=12, num_val=6, image_size=64, seed=3)
    for rel in ("annotations/instances_train.json", "train/000005.png", "val/000002.png"):
        assert (shapes / rel).read_bytes() == (tmp_path / rel).read_bytes(), rel
    make_shapes(str(tmp_path / "other"), num_train=12, num_val=6, image_size=64, seed=4)
    assert (shapes / "train/000005.png").read_bytes() != (tmp_path / "other/train/000005.png").read_bytes()
    data = json.loads((shapes / "annotations/instances_train.json").read_text())
    assert [c["name"] for c in data["categories"]] == list(SHAPE_CLASSES)
    assert len(data["images"]) == 12
    for ann in data["annotations"]:
        x, y, w, h = ann["bbox"]
        assert 0 <= x and 0 <= y and x + w <= 64 and y + h <= 64 and w >= 6 and h >= 6
    validate_coco_annotations(str(shapes / "annotations/instances_train.json"), str(shapes / "train"))


def test_dataset_items_match_annotations(shapes):
    ds = CocoDetection(str(shapes / "annotations/instances_val.json"), str(shapes / "val"))
    data = json.loads((shapes / "annotations/instances_val.json").read_text())
    assert len(ds) == 6 and ds.num_classes == 4 and ds.classes == SHAPE_CLASSES
    image, target = ds[2]
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32 and 0 <= image.min() and image.max() <= 1
    anns = [a for a in data["annotations"] if a["image_id"] == target["image_id"]]
    expected = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)], dtype=torch.float32)
    torch.testing.assert_close(target["boxes"], expected)
    assert target["labels"].tolist() == [a["category_id"] for a in anns]  # ids 1..4 map to labels 1..4


def test_train_split_drops_crowd_and_tiny_boxes(shapes, tmp_path):
    data = json.loads((shapes / "annotations/instances_train.json").read_text())
    data["annotations"][0]["iscrowd"] = 1
    data["annotations"][1]["bbox"][2] = 0.5  # under a pixel wide
    ann = tmp_path / "a.json"
    ann.write_text(json.dumps(data))
    ds = CocoDetection(str(ann), str(shapes / "train"), train=True)
    total = sum(len(ds[i][1]["boxes"]) for i in range(len(ds)))
    assert total == len(data["annotations"]) - 2
    ds_eval = CocoDetection(str(ann), str(shapes / "train"))
    assert sum(len(ds_eval[i][1]["boxes"]) for i in range(len(ds_eval))) == len(data["annotations"])


def _mutations():
    def dup_image(d):
        d["images"].append(copy.deepcopy(d["images"][0]))

    def dup_ann(d):
        d["annotations"].append(copy.deepcopy(d["annotations"][0]))

    def dup_cat(d):
        d["categories"].append(copy.deepcopy(d["categories"][0]))

    def outside(d):
        d["annotations"][0]["bbox"] = [50, 50, 40, 10]

    def negative(d):
        d["annotations"][0]["bbox"] = [5, 5, 0, 10]

    def unknown_cat(d):
        d["annotations"][0]["category_id"] = 99

    def unknown_img(d):
        d["annotations"][0]["image_id"] = 1234

    def missing_key(d):
        del d["annotations"][0]["bbox"]

    def no_images(d):
        del d["images"]

    return [
        (dup_image, AnnotationError, "duplicate image id 1"),
        (dup_ann, AnnotationError, "duplicate annotation id 1"),
        (dup_cat, AnnotationError, "duplicate category id 1"),
        (outside, AnnotationError, r"annotation 1 bbox \[50, 50, 40, 10\] lies outside its image \(64x64\)"),
        (negative, AnnotationError, r"annotation 1 bbox \[5, 5, 0, 10\] has non-positive size"),
        (unknown_cat, AnnotationError, "annotation 1 has unknown category_id 99"),
        (unknown_img, AnnotationError, "annotation 1 has unknown image_id 1234"),
        (missing_key, AnnotationError, "an annotation is missing key 'bbox'"),
        (no_images, AnnotationError, "missing key 'images'"),
    ]


@pytest.mark.parametrize("mutate,error,match", _mutations(), ids=lambda x: getattr(x, "__name__", None))
def test_annotation_errors_name_the_problem(shapes, tmp_path, mutate, error, match):
    data = json.loads((shapes / "annotations/instances_train.json").read_text())
    mutate(data)
    ann = tmp_path / "bad.json"
    ann.write_text(json.dumps(data))
    with pytest.raises(error, match=match) as info:
        CocoDetection(str(ann), str(shapes / "train"))
    assert "bad.json" in str(info.value)


def test_missing_files(shapes, tmp_path):
    with pytest.raises(FileNotFoundError, match="annotation file not found: .*nope.json"):
        CocoDetection(str(tmp_path / "nope.json"), str(shapes / "train"))
    data = json.loads((shapes / "annotations/instances_train.json").read_text())
    data["images"][3]["file_name"] = "missing.png"
    ann = tmp_path / "a.json"
    ann.write_text(json.dumps(data))
    with pytest.raises(FileNotFoundError, match=r"image id 4 file .*missing.png' not found"):
        CocoDetection(str(ann), str(shapes / "train"))
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(AnnotationError, match="broken.json: not valid JSON"):
        validate_coco_annotations(str(tmp_path / "broken.json"))


def test_drop_invalid_boxes(shapes, tmp_path):
    data = json.loads((shapes / "annotations/instances_train.json").read_text())
    data["annotations"][0]["bbox"] = [5, 5, 0, 10]
    ann = tmp_path / "a.json"
    ann.write_text(json.dumps(data))
    checked = validate_coco_annotations(str(ann), invalid_boxes="drop")
    assert checked["_dropped"] == 1 and len(checked["annotations"]) == len(data["annotations"]) - 1


def test_flip_and_resize_move_boxes_with_pixels():
    image = torch.zeros(3, 20, 40)
    image[:, 2:6, 4:10] = 1.0  # the object: x 4..10, y 2..6
    target = {"boxes": torch.tensor([[4.0, 2.0, 10.0, 6.0]]), "labels": torch.tensor([1]), "scale": 1.0}
    flipped, t = RandomHorizontalFlip(p=1.0)(image, target)
    torch.testing.assert_close(t["boxes"], torch.tensor([[30.0, 2.0, 36.0, 6.0]]))
    assert flipped[:, 2:6, 30:36].min() == 1 and flipped[:, :, :30].max() == 0
    resized, t = Resize(40, 1000)(image, target)
    assert resized.shape == (3, 40, 80) and t["scale"] == 2.0
    torch.testing.assert_close(t["boxes"], torch.tensor([[8.0, 4.0, 20.0, 12.0]]))
    _, t = Resize(40, 60)(image, target)  # the longer side caps the scale at 60/40
    assert t["scale"] == 1.5
    with pytest.raises(ValueError, match="p must be in"):
        RandomHorizontalFlip(p=2)


def test_collate():
    batch = [(torch.zeros(3, 4, 5), {"image_id": 1}), (torch.zeros(3, 6, 7), {"image_id": 2})]
    out = detection_collate(batch)
    assert [x.shape for x in out["inputs"]] == [(3, 4, 5), (3, 6, 7)]
    assert [t["image_id"] for t in out["data_samples"]] == [1, 2]


def test_crowded_shapes_have_overlapping_same_class_neighbours(tmp_path):
    """The crowded variant: same-class pairs overlapping up to IoU 0.6 (many above 0.3, none above 0.6),
    where the default data keeps every pair under 0.3."""
    import json

    from detectors.shapes import _iou, make_shapes

    files = make_shapes(str(tmp_path / "c"), num_train=40, num_val=0, crowded=True, max_objects=12, max_frac=0.3)
    data = json.load(open(files["train"]))
    per_image = {}
    for a in data["annotations"]:
        x, y, w, h = a["bbox"]
        per_image.setdefault(a["image_id"], []).append((a["category_id"], (x, y, x + w, y + h)))
    ious = [_iou(a[1], b[1]) for objs in per_image.values() for i, a in enumerate(objs) for b in objs[i + 1:]
            if a[0] == b[0]]
    assert max(ious) <= 0.6
    assert sum(v > 0.3 for v in ious) >= 20
    assert len(data["annotations"]) / len(per_image) >= 4


def test_failed_generation_leaves_nothing(tmp_path, monkeypatch):
    import detectors.shapes as shapes_module

    calls = []

    def failing(*args):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk full")
        return real(*args)

    real = shapes_module._image
    monkeypatch.setattr(shapes_module, "_image", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        shapes_module.make_shapes(str(tmp_path / "s"), num_train=5, num_val=0)
    assert os.listdir(tmp_path) == []  # no dataset folder, no staging folder


def test_offline_torchvision_weights_say_where_the_file_goes(monkeypatch, tmp_path):
    """weights="DEFAULT" offline: one error naming torch's hub cache and the local-file alternative."""
    import urllib.error

    import torchvision

    from detectors import build_detector
    from detectors.errors import CheckpointError

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(CheckpointError, match=rf"cannot download the torchvision weights .* put the file "
                                              rf"resnet18-.*\.pth in torch's hub cache {tmp_path}/hub/checkpoints"):
        build_detector("retinanet", num_classes=3, backbone="resnet18", weights_backbone="DEFAULT")
