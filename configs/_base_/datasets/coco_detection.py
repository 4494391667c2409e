# COCO 2017 detection. Point data_root at a folder with train2017/, val2017/ and annotations/
# (tools/train.py --data-root DIR sets it everywhere).
data_root = "data/coco/"
train_dataloader = dict(
    batch_size=2,  # per GPU: 8 GPUs x 2 = the recipe's 16
    num_workers=4,
    persistent_workers=True,
    pin_memory=True,  # page-locked batches: the non_blocking copies of the data preprocessor
    sampler=dict(type="DefaultSampler", shuffle=True),
    collate_fn=dict(type="detection_collate"),
    dataset=dict(
        type="CocoDetectionDataset",
        data_root=data_root,
        ann_file="annotations/instances_train2017.json",
        img_dir="train2017/",
        train=True,
        transforms=[dict(type="RandomHorizontalFlip", p=0.5)],
        invalid_boxes="drop",  # COCO has a few boxes under a pixel wide
    ),
)
val_dataloader = dict(
    batch_size=2,
    num_workers=4,
    persistent_workers=True,
    pin_memory=True,
    drop_last=False,
    sampler=dict(type="DefaultSampler", shuffle=False),
    collate_fn=dict(type="detection_collate"),
    dataset=dict(
        type="CocoDetectionDataset",
        data_root=data_root,
        ann_file="annotations/instances_val2017.json",
        img_dir="val2017/",
        invalid_boxes="drop",
    ),
)
test_dataloader = val_dataloader
val_evaluator = dict(type="CocoMetric", data_root=data_root, ann_file="annotations/instances_val2017.json")
test_evaluator = val_evaluator
