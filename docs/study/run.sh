#!/usr/bin/env bash
# The loss study: every command that produced docs/study/*/runs/*.json, in the order they ran.
# Cell by cell, seed-major inside a cell (compare.py runs every loss at seed 0, then at seed 1, ...), so
# an interrupted study leaves complete cells with paired seeds; run it again to continue (finished runs
# are reused, an interrupted one resumes). About 8 minutes per RetinaNet run and 15 per Faster R-CNN
# run on 2 CPU cores (Intel Xeon, 2026-12).
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_WAIT_POLICY=PASSIVE
OUT=${STUDY_RESULTS:-docs/study}
COMMON=(--box-losses default giou diou ciou --eval-nms iou diou --cfg-options train_cfg.val_interval=3)
python tools/compare.py configs/retinanet_r18_shapes.py "${COMMON[@]}" --seeds 0 1 2 \
  --work-dir work_dirs/study/retinanet_shapes --results-dir "$OUT/retinanet_shapes" --title "RetinaNet R18, shapes"
python tools/compare.py configs/retinanet_r18_shapes_crowded.py "${COMMON[@]}" --seeds 0 1 2 \
  --work-dir work_dirs/study/retinanet_crowded --results-dir "$OUT/retinanet_crowded" --title "RetinaNet R18, crowded shapes"
python tools/compare.py configs/faster_rcnn_r18_shapes.py "${COMMON[@]}" --seeds 0 1 2 \
  --work-dir work_dirs/study/faster_rcnn_shapes --results-dir "$OUT/faster_rcnn_shapes" --title "Faster R-CNN R18, shapes"
# the tables over all seeds, from the result files alone
for cell in retinanet_shapes faster_rcnn_shapes retinanet_crowded; do
  python tools/compare.py unused --aggregate-only "${COMMON[@]:0:8}" --seeds 0 1 2 --results-dir "$OUT/$cell" \
    --title "$cell"
done
