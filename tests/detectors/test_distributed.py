"""Evaluation in 2 processes (gloo, CPU) gives the same COCO AP as in one process.

The model is an oracle that returns jittered ground truth plus a false positive per image, so the AP
is neither 0 nor 1 and every image counts. 7 images over 2 ranks: the sampler pads rank 1 with a
repeated image, which the metric must drop.
"""

import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from mmengine.model import BaseModel

from detectors.shapes import make_shapes


class OracleModel(BaseModel):
    def forward(self, inputs, data_samples=None, mode="tensor"):
        out = []
        for sample in data_samples:
            g = torch.Generator().manual_seed(int(sample["image_id"]))
            boxes = sample["boxes"]
            wh = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
            jittered = boxes + 0.1 * wh * torch.randn(boxes.shape, generator=g)
            fp = torch.tensor([[5.0, 5.0, 25.0, 25.0]])
            out.append({
                "image_id": sample["image_id"],
                "boxes": torch.cat([jittered, fp]),
                "scores": torch.rand(len(boxes) + 1, generator=g),
                "labels": torch.cat([sample["labels"], torch.tensor([1])]),
            })
        return out


def _val(root: str, work_dir: str) -> dict:
    import detectors.engine  # noqa: F401  (registers dataset, metric, collate)
    from mmengine.runner import Runner

    runner = Runner(
        model=OracleModel(),
        work_dir=work_dir,
        val_dataloader=dict(
            batch_size=2, num_workers=0, sampler=dict(type="DefaultSampler", shuffle=False),
            collate_fn=dict(type="detection_collate"),
            dataset=dict(type="CocoDetectionDataset", data_root=root, ann_file="annotations/instances_val.json",
                         img_dir="val/"),
        ),
        val_cfg=dict(),
        val_evaluator=dict(type="CocoMetric", data_root=root, ann_file="annotations/instances_val.json"),
        launcher="none",
    )
    return runner.val()


def _worker(rank: int, world: int, port: int, root: str, work_dir: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        metrics = _val(root, work_dir)
        if rank == 0:
            with open(os.path.join(work_dir, "metrics.json"), "w") as f:
                json.dump(metrics, f)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_eval_equals_one_process(tmp_path):
    root = str(tmp_path / "shapes")
    make_shapes(root, num_train=0, num_val=7, image_size=64, seed=11)
    single = _val(root, str(tmp_path / "single"))
    assert 0.05 < single["coco/bbox_mAP"] < 0.95
    work_dir = str(tmp_path / "dist")
    os.makedirs(work_dir)
    mp.spawn(_worker, args=(2, _free_port(), root, work_dir), nprocs=2, join=True)
    with open(os.path.join(work_dir, "metrics.json")) as f:
        both = json.load(f)
    for key, value in single.items():
        assert both[key] == pytest.approx(value, abs=1e-12), key
