# RetinaNet R50-FPN, COCO 2017, 1x schedule, total batch 16 (8 GPUs x 2).
_base_ = [
    "_base_/models/retinanet_r50_fpn.py",
    "_base_/datasets/coco_detection.py",
    "_base_/schedules/schedule_1x.py",
    "_base_/default_runtime.py",
]
optim_wrapper = dict(optimizer=dict(lr=0.01), clip_grad=dict(max_norm=35, norm_type=2))
