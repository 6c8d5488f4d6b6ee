# Sourced by demo_vit.sh and demo_imagegpt.sh (PY, DEMO, TRAIN and VAL set): the demo corpus' images at 32 px in
# 24 classes as labelled WebDataset shards, $DEMO/train/{00000..00003}.tar and $DEMO/val/00000.tar.
$PY -m data_tools demo-corpus "$DEMO/corpus" --train "$TRAIN" --val "$VAL" --size 32 --no-serve --port 8000
$PY -m data_tools from-folder "$DEMO/corpus" --csv "$DEMO/corpus/labels.csv" --out "$DEMO/train" \
  --samples-per-shard $(( (TRAIN + 3) / 4 )) --shuffle --force
$PY -m data_tools from-folder "$DEMO/corpus/val" --out "$DEMO/val" --samples-per-shard "$VAL" --force
