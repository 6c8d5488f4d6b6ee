#!/usr/bin/env bash
# `make demo-vit`: ViT end to end on CPU. The demo corpus' 24 classes (coloured shapes) become labelled WebDataset
# shards (`data_tools from-folder`), a tiny ViT trains on 2 DeepSpeed ZeRO-2 ranks with top-1 on the held-out
# split during training, is evaluated (`pipeline.eval classify`) and drawn (`pipeline.eval vit-figures`: the
# paper's Figure 7). STEPS, TRAIN and VAL shorten it (the test suite runs a short version).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DEMO=${DEMO:-demo/vit}
RUN=${RUN:-runs/vit-tiny}
STEPS=${STEPS:-400}
TRAIN=${TRAIN:-4000}
VAL=${VAL:-480}

echo "== 1/4 demo corpus at 32 px, labelled shards (from-folder)"
source scripts/labelled_corpus.sh

echo "== 2/4 train: 2 ranks, DeepSpeed ZeRO-2, gloo; top-1 on the held-out split (TensorBoard: tensorboard --logdir $RUN)"
$PY -m launch local configs/vit/tiny_cpu.yaml --nproc 2 "data.train=$DEMO/train/{00000..00003}.tar" \
  "data.val=$DEMO/val/00000.tar" "run.dir=$RUN" "train.steps=$STEPS" "eval.every=$(( STEPS / 3 ))"

echo "== 3/4 held-out top-1 / top-5"
$PY -m pipeline.eval classify --checkpoint "$RUN" --dataset "$DEMO/val/00000.tar" --workers 0

echo "== 4/4 the ViT paper's Figure 7: embedding filters, position similarity, attention distance"
$PY -m pipeline.eval vit-figures --checkpoint "$RUN" --images "$DEMO/corpus/val"
