# RetinaNet R18-FPN (the `make demo` recipe) on the crowded variant of the shapes data: rows of
# same-class objects side by side, neighbours overlapping with IoU up to 0.6, the case DIoU-NMS was
# designed for. Generated under data/shapes_crowded/ on first use.
_base_ = ["./retinanet_r18_shapes.py"]
data_root = "data/shapes_crowded/"
shapes = dict(root=data_root, num_train=800, num_val=200, image_size=128, seed=0, crowded=True, max_objects=12,
              min_frac=0.12, max_frac=0.3)
train_dataloader = dict(dataset=dict(data_root=data_root, generate_shapes=shapes))
val_dataloader = dict(dataset=dict(data_root=data_root, generate_shapes=shapes))
test_dataloader = val_dataloader
val_evaluator = dict(data_root=data_root)
test_evaluator = val_evaluator
