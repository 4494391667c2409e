# The 1x schedule (12 epochs, steps at 8 and 11) for a total batch of 16 images (8 GPUs x 2),
# SGD with momentum and a linear warm-up over the first 1000 iterations.
train_cfg = dict(type="EpochBasedTrainLoop", max_epochs=12, val_interval=1)
val_cfg = dict(type="ValLoop")
test_cfg = dict(type="TestLoop")
optim_wrapper = dict(
    type="OptimWrapper",
    optimizer=dict(type="SGD", lr=0.02, momentum=0.9, weight_decay=1e-4),
)
param_scheduler = [
    dict(type="LinearLR", start_factor=0.001, by_epoch=False, begin=0, end=1000),
    dict(type="MultiStepLR", begin=0, end=12, by_epoch=True, milestones=[8, 11], gamma=0.1),
]
# with --cfg-options auto_scale_lr.enable=True the lr scales with the real total batch
auto_scale_lr = dict(enable=False, base_batch_size=16)
