#!/usr/bin/env bash
# The GPU check, for a machine with a CUDA device and a Python that has torch (e.g. a lent H100 or H200), within
# 8 minutes: the gpu-marked tests; bench/gpu_check.py (answers, the Mine on the torch path and with the fused
# kernel against one product at 10M rows, 16 callers alone and batched); then ViT-B/32 from random init on 224-px
# JPEGs with online mining against without (bench/train_overhead.py). Packages the machine lacks (faiss-cpu,
# grpcio, grpcio-tools, grpcio-health-checking, protobuf, redis; deepspeed, open_clip_torch and their needs for the
# training part) can travel as wheels in .whl/ (see docs/BENCHMARKS.md); they are installed into /tmp/site first
# when present. bench/gpu_train_check.sh is the demo on the GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/gpu_env.sh
"$PY" -m pytest -q -m gpu tests/gpu -p no:cacheprovider 2>&1 | tee "$OUT_DIR/gpu_tests.log"
"$PY" -m bench.gpu_check --json-out "$OUT_DIR/gpu_check.json" "$@" 2>&1 | tee "$OUT_DIR/gpu_check.log"
JPEGS=${GPU_JPEG_DIR:-/tmp/helip-jpegs}
[[ -f "$JPEGS/train.csv" ]] || "$PY" -m helip.trainer.tools.synth synth --out "$JPEGS" --train 8192 --test 1 \
  --image-size 224 --format jpg > /dev/null
"$PY" -m bench.train_overhead --model ViT-B-32 --train-csv "$JPEGS/train.csv" --batch-size 256 --steps 80 \
  --warmup 20 --repeats 1 --workers "$(( $(nproc) - 2 ))" --json-out "$OUT_DIR/gpu_vit_b32.json" 2>&1 |
  tee "$OUT_DIR/gpu_vit_b32.log"
