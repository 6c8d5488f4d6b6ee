#!/usr/bin/env bash
# `make demo`: the README's four commands, chained on an embedded default. Every step is the real thing:
# a corpus served over HTTP on 127.0.0.1, img2dataset downloading it into WebDataset shards, 2 DeepSpeed ZeRO-2
# ranks training the tiny CLIP on CPU, zero-shot evaluation on the held-out split.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DEMO=${DEMO:-demo}
RUN=${RUN:-clip-tiny}  # run.name in configs/clip/tiny_cpu.yaml

echo "== 1/4 demo corpus, served on 127.0.0.1"
rm -f "$DEMO/corpus/server.json"
$PY -m data_tools demo-corpus "$DEMO/corpus" --train 4000 --val 640 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 600); do
  [ -f "$DEMO/corpus/server.json" ] && break
  kill -0 $server 2>/dev/null || { echo "demo-corpus exited early" >&2; exit 1; }
  sleep 0.2
done

echo "== 2/4 download with img2dataset"
$PY -m data_tools download "$DEMO/corpus/urls.parquet" --out "$DEMO/shards" --image-size 64
kill $server; wait $server 2>/dev/null || true
shards=$($PY -c "
import json, sys
names = [s['name'].removesuffix('.tar') for s in json.load(open(sys.argv[1]))['shards'] if s['samples']]
print(names[0] if len(names) == 1 else '{' + ','.join(names) + '}')" "$DEMO/shards/manifest.json")

echo "== 3/4 train: 2 ranks, DeepSpeed ZeRO-2, gloo (TensorBoard: tensorboard --logdir runs/)"
$PY -m launch local configs/clip/tiny_cpu.yaml --nproc 2 "data.train=$DEMO/shards/$shards.tar" \
  "eval.zeroshot=$DEMO/corpus/val"

echo "== 4/4 zero-shot on the held-out split"
$PY -m pipeline.eval zeroshot --checkpoint "runs/$RUN" --dataset "$DEMO/corpus/val"
