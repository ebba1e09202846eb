#!/usr/bin/env bash
# The trainer on a GPU: the demo (generated data, tiny CLIP, local miner) on one CUDA device through helip-train,
# i.e. nccl, pinned DataLoader batches, the pinned non-blocking copy of pushed embeddings, the miner's GPU index.
# Needs the train extra's packages (deepspeed built with DS_BUILD_OPS=0, open_clip_torch, webdataset and their
# needs) as wheels in .whl/ where the machine lacks them. Writes gpu_train.log and gpu_train_summary.json.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/gpu_env.sh
RUN=${GPU_TRAIN_DIR:-/tmp/helip-gpu-train}
rm -rf "$RUN"
"$PY" -m helip.trainer.app.cli --config configs/demo.yaml --set run.output_dir="$RUN/run" --set data.synth_dir="$RUN/synth" \
  --set run.progress=false \
  "$@" 2>&1 | tee "$OUT_DIR/gpu_train.log"
cp "$RUN/run/summary.json" "$OUT_DIR/gpu_train_summary.json"
