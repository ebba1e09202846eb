#!/usr/bin/env bash
# The GPU check, for a machine with a CUDA device and a Python that has torch (e.g. a lent H200):
# the gpu-marked tests, then bench/gpu_check.py. Under 5 minutes. Packages the machine lacks (faiss-cpu, grpcio,
# grpcio-tools, grpcio-health-checking, protobuf, prometheus-client, pyyaml, tqdm, pytest) can travel as wheels in
# .whl/ (see docs/BENCHMARKS.md); they are installed into /tmp/site first when present.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
# Generate the gRPC stubs from the .proto, as the package build does.
"$PY" -c "import runpy, sys; sys.argv=['setup.py','--version']; runpy.run_path('setup.py', run_name='__main__')" >/dev/null
export PYTHONPATH=$PWD:${PYTHONPATH:-}
OUT_DIR=${OUT:-.}
"$PY" -m pytest -q -m gpu tests/gpu -p no:cacheprovider 2>&1 | tee "$OUT_DIR/gpu_tests.log"
"$PY" -m bench.gpu_check --json-out "$OUT_DIR/gpu_check.json" "$@" 2>&1 | tee "$OUT_DIR/gpu_check.log"
