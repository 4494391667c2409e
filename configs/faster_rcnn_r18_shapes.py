# Faster R-CNN R18-FPN on the built-in shapes data, sized for a 2-core CPU.
_base_ = [
    "_base_/models/faster_rcnn_r50_fpn.py",
    "_base_/datasets/shapes.py",
    "_base_/default_runtime.py",
]
model = dict(
    backbone="resnet18",
    num_classes=5,  # 4 shapes + background index 0
    weights_backbone=None,
    min_size=128,
    max_size=128,
    anchor_sizes=((8,), (16,), (32,), (64,), (128,)),
    rpn_batch_size_per_image=128,
    box_batch_size_per_image=128,
)
train_cfg = dict(type="EpochBasedTrainLoop", max_epochs=12, val_interval=4)
val_cfg = dict(type="ValLoop")
test_cfg = dict(type="TestLoop")
optim_wrapper = dict(
    type="OptimWrapper",
    optimizer=dict(type="SGD", lr=0.02, momentum=0.9, weight_decay=1e-4),
    clip_grad=dict(max_norm=10, norm_type=2),
)
param_scheduler = [
    dict(type="LinearLR", start_factor=0.01, by_epoch=False, begin=0, end=100),
    dict(type="MultiStepLR", begin=0, end=12, by_epoch=True, milestones=[9, 11], gamma=0.1),
]
default_hooks = dict(logger=dict(interval=20))
