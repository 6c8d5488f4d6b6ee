#!/usr/bin/env bash
# `make demo-imagegpt`: ImageGPT end to end on CPU. The demo corpus' images (coloured shapes in 24 classes) become
# labelled WebDataset shards (`data_tools from-folder`), `data_tools palette` fits their 512-colour palette, a tiny
# autoregressive ImageGPT trains on 2 DeepSpeed ZeRO-2 ranks (validation bits/dim and sample grids in
# TensorBoard), then samples and completes held-out images (`pipeline.eval imagegpt-samples`) and probes every
# layer's features with a linear classifier of the 24 classes (`pipeline.eval linear-probe`).
# STEPS, TRAIN and VAL shorten it (the test suite runs a short version).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DEMO=${DEMO:-demo/imagegpt}
RUN=${RUN:-runs/igpt-tiny}
STEPS=${STEPS:-200}
TRAIN=${TRAIN:-4000}
VAL=${VAL:-480}

echo "== 1/5 demo corpus at 32 px, labelled shards (from-folder)"
source scripts/labelled_corpus.sh

echo "== 2/5 the 512-colour palette of the training shards, at the model's 16 px"
$PY -m data_tools palette "$DEMO/train" --image-size 16 --pixels 200000 --out "$DEMO/train/palette/k512.npy" \
  --no-progress

echo "== 3/5 train: 2 ranks, DeepSpeed ZeRO-2, gloo; val bits/dim + samples (TensorBoard: tensorboard --logdir $RUN)"
$PY -m launch local configs/imagegpt/tiny_cpu.yaml --nproc 2 "data.train=$DEMO/train/{00000..00003}.tar" \
  "data.val=$DEMO/val/00000.tar" "model.palette=$DEMO/train/palette/k512.npy" "run.dir=$RUN" \
  "train.steps=$STEPS" "eval.every=$(( STEPS / 3 ))"

echo "== 4/5 samples and completions of held-out images"
$PY -m pipeline.eval imagegpt-samples --checkpoint "$RUN" --images "$DEMO/val/00000.tar" --n 8

echo "== 5/5 linear probe of every layer on the 24 classes"
$PY -m pipeline.eval linear-probe --checkpoint "$RUN" --train "$DEMO/train/{00000..00003}.tar" \
  --test "$DEMO/val/00000.tar" --workers 0 --max-iter 200
