# Runtime shared by every config: hooks, logging, checkpoints, environment.
custom_imports = dict(imports=["detectors.engine"], allow_failed_imports=False)

default_hooks = dict(
    timer=dict(type="IterTimerHook"),
    logger=dict(type="LoggerHook", interval=50),  # one progress line every 50 iterations
    param_scheduler=dict(type="ParamSchedulerHook"),
    # mmengine's CheckpointHook with last_checkpoint written atomically (detectors/runner.py)
    checkpoint=dict(type="BoxLossCheckpointHook", interval=1, max_keep_ckpts=3, save_last=True),
    sampler_seed=dict(type="DistSamplerSeedHook"),
)
env_cfg = dict(
    cudnn_benchmark=False,
    mp_cfg=dict(mp_start_method="fork", opencv_num_threads=0),
    dist_cfg=dict(backend="nccl"),  # tools/train.py switches to gloo without CUDA
)
# scalars.json under work_dir/<timestamp>/vis_data/ feeds tools/plot_curves.py
visualizer = dict(type="Visualizer", vis_backends=[dict(type="LocalVisBackend")])
# True or dict(num_images=4, score_thr=0.3) (or tools/train.py --tensorboard): TensorBoard event files
# beside scalars.json, and validation images with their detections drawn (pip install 'boxloss[tensorboard]')
tensorboard = False
log_processor = dict(window_size=50, by_epoch=True)
log_level = "INFO"
load_from = None
resume = False
randomness = dict(seed=0)
