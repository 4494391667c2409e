# Faster R-CNN R18-FPN on the built-in shapes data, sized for a 2-core CPU with the same budget as
# retinanet_r18_shapes.py: the same trunk (ResNet-18 C3-C4, 64-channel FPN, from scratch), AdamW,
# weight EMA and 9 epochs. The FPN gives P3, P4 and a pooled P5; the RPN has 2 anchor sizes x 3
# ratios per level, fitted to the 12-110 px objects of the 128 px images.
_base_ = [
    "_base_/models/faster_rcnn_r50_fpn.py",
    "_base_/datasets/shapes.py",
    "_base_/default_runtime.py",
]
model = dict(
    backbone="resnet18",
    num_classes=5,  # 4 shapes + background index 0
    weights_backbone=None,
    returned_layers=[2, 3],
    fpn_channels=64,
    min_size=128,
    max_size=128,
    anchor_sizes=((12, 20), (32, 48), (80, 120)),  # P3, P4, pooled P5
    rpn_pre_nms_top_n_train=1000,
    rpn_post_nms_top_n_train=500,
    rpn_pre_nms_top_n_test=500,
    rpn_post_nms_top_n_test=300,
    rpn_batch_size_per_image=128,
    box_batch_size_per_image=128,
)
max_epochs = 9
train_cfg = dict(type="EpochBasedTrainLoop", max_epochs=max_epochs, val_interval=max_epochs)
val_cfg = dict(type="ValLoop")
test_cfg = dict(type="TestLoop")
optim_wrapper = dict(
    type="OptimWrapper",
    optimizer=dict(type="AdamW", lr=0.001, weight_decay=0.05, fused=True),
    clip_grad=dict(max_norm=10, norm_type=2),
)
param_scheduler = [
    dict(type="LinearLR", start_factor=0.01, by_epoch=False, begin=0, end=100),
    dict(type="MultiStepLR", begin=0, end=max_epochs, by_epoch=True, milestones=[max_epochs - 1], gamma=0.1),
]
custom_hooks = [
    dict(type="EMAHook", ema_type="ExponentialMovingAverage", momentum=0.01, update_buffers=True, priority=49)
]
default_hooks = dict(logger=dict(interval=20))
