# torchvision Faster R-CNN, ResNet-50 FPN; the RoI box head's loss is chosen by name, the RPN keeps smooth-L1.
model = dict(
    type="DetectorModel",
    arch="faster_rcnn",
    num_classes=81,  # 80 COCO categories as labels 1..80, 0 = background
    backbone="resnet50",
    box_loss="default",
    box_loss_weight=None,
    nms="iou",
    nms_beta=1.0,
    weights=None,
    weights_backbone="IMAGENET1K_V1",
    min_size=800,
    max_size=1333,
    # host-to-device copies overlap compute (the loaders pin their batches)
    data_preprocessor=dict(type="BaseDataPreprocessor", non_blocking=True),
)
