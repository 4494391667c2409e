# The built-in shapes dataset (COCO format), generated under data/shapes/ on first use. Another
# data_root (--data-root) must already hold the data: tools/make_shapes.py --out DIR makes it.
data_root = "data/shapes/"
shapes = dict(root=data_root, num_train=800, num_val=200, image_size=128, seed=0)
train_dataloader = dict(
    batch_size=8,
    num_workers=0,  # 2-core machines: workers would compete with the training process
    sampler=dict(type="DefaultSampler", shuffle=True),
    collate_fn=dict(type="detection_collate"),
    dataset=dict(
        type="CocoDetectionDataset",
        data_root=data_root,
        ann_file="annotations/instances_train.json",
        img_dir="train/",
        train=True,
        transforms=[dict(type="RandomHorizontalFlip", p=0.5)],
        generate_shapes=shapes,
    ),
)
val_dataloader = dict(
    batch_size=8,
    num_workers=0,
    drop_last=False,
    sampler=dict(type="DefaultSampler", shuffle=False),
    collate_fn=dict(type="detection_collate"),
    dataset=dict(
        type="CocoDetectionDataset",
        data_root=data_root,
        ann_file="annotations/instances_val.json",
        img_dir="val/",
        generate_shapes=shapes,
    ),
)
test_dataloader = val_dataloader
val_evaluator = dict(type="CocoMetric", data_root=data_root, ann_file="annotations/instances_val.json")
test_evaluator = val_evaluator
