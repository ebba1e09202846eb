#!/usr/bin/env bash
# The GPU check, for a machine with a CUDA device and a Python that has torch (e.g. a lent H200):
# the gpu-marked tests, then bench/gpu_check.py. Under 5 minutes. Packages the machine lacks (faiss-cpu, grpcio,
# grpcio-tools, grpcio-health-checking, protobuf, redis) can travel as wheels in .whl/ (see docs/BENCHMARKS.md);
# they are installed into /tmp/site first when present. bench/gpu_train_check.sh is the trainer's half.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/gpu_env.sh
"$PY" -m pytest -q -m gpu tests/gpu -p no:cacheprovider 2>&1 | tee "$OUT_DIR/gpu_tests.log"
"$PY" -m bench.gpu_check --json-out "$OUT_DIR/gpu_check.json" "$@" 2>&1 | tee "$OUT_DIR/gpu_check.log"
