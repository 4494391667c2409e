# Faster R-CNN R50-FPN, COCO 2017, 1x schedule, total batch 16 (8 GPUs x 2).
_base_ = [
    "_base_/models/faster_rcnn_r50_fpn.py",
    "_base_/datasets/coco_detection.py",
    "_base_/schedules/schedule_1x.py",
    "_base_/default_runtime.py",
]
