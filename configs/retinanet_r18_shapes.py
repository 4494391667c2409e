# RetinaNet R18-FPN on the built-in shapes data, sized for a 2-core CPU (the `make demo` job).
# Trained from scratch (nothing can be downloaded): 128 px images, anchors fitted to 12-110 px
# objects, a 64-channel FPN (256 channels: 2.3x slower steps) with GroupNorm in the head (a plain
# head with SGD does not start learning in a few epochs), AdamW, and an EMA of the weights. The FPN
# reads ResNet-18's layer2 and layer3 only: layer4 holds 8.4M of the 11.2M trunk weights and a sixth
# of each epoch's time, and the model learns faster without it. The measurements behind each choice:
# docs/training.md, "make demo".
_base_ = [
    "_base_/models/retinanet_r50_fpn.py",
    "_base_/datasets/shapes.py",
    "_base_/default_runtime.py",
]
model = dict(
    backbone="resnet18",
    num_classes=5,  # 4 shapes + background index 0
    weights_backbone=None,
    returned_layers=[2, 3],
    fpn_channels=64,
    head_norm_groups=16,
    min_size=128,
    max_size=128,
    anchor_sizes=((12, 16, 20), (24, 32, 40), (48, 64, 80), (96, 128, 160)),  # P3-P6
)
max_epochs = 9  # ~53 s an epoch on an idle 2-core machine: `make demo` takes about 8.5 minutes
train_cfg = dict(type="EpochBasedTrainLoop", max_epochs=max_epochs, val_interval=max_epochs)
val_cfg = dict(type="ValLoop")
test_cfg = dict(type="TestLoop")
optim_wrapper = dict(
    type="OptimWrapper",
    # fused: one kernel for all parameters on CPU (the per-tensor loop cost ~8% of a step)
    optimizer=dict(type="AdamW", lr=0.001, weight_decay=0.05, fused=True),
    clip_grad=dict(max_norm=10, norm_type=2),
)
param_scheduler = [
    dict(type="LinearLR", start_factor=0.01, by_epoch=False, begin=0, end=100),
    dict(type="MultiStepLR", begin=0, end=max_epochs, by_epoch=True, milestones=[max_epochs - 1], gamma=0.1),
]
# EMA of the weights over ~100 steps (mmengine: ema = (1 - m) ema + m w); validation, test and the
# saved state_dict use the averaged weights, --resume restores both
custom_hooks = [
    dict(type="EMAHook", ema_type="ExponentialMovingAverage", momentum=0.01, update_buffers=True, priority=49)
]
default_hooks = dict(logger=dict(interval=20))
