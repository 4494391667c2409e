# torchvision RetinaNet, ResNet-50 FPN, box loss and NMS chosen by name (tools/train.py --box-loss/--nms).
model = dict(
    type="DetectorModel",
    arch="retinanet",
    num_classes=81,  # 80 COCO categories as labels 1..80, 0 = background
    backbone="resnet50",
    box_loss="default",  # default | l1 | l2 | smooth_l1 | iou | giou | diou | ciou
    box_loss_weight=None,  # None: the documented default for this loss and head
    nms="iou",  # iou | diou | soft | soft-diou | weighted
    nms_beta=1.0,
    weights=None,
    weights_backbone="IMAGENET1K_V1",  # torchvision's ImageNet weights (downloaded by torchvision)
    min_size=800,
    max_size=1333,
    # host-to-device copies overlap compute (the loaders pin their batches)
    data_preprocessor=dict(type="BaseDataPreprocessor", non_blocking=True),
)
