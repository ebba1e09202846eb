# Sourced by the GPU scripts: packages the device machine lacks (wheels in .whl/, see docs/BENCHMARKS.md) go into
# /tmp/site once, the gRPC stubs are generated from the .proto as the package build does, and PYTHONPATH points at
# both. PY is the Python that has torch with CUDA.
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
  wheels=$(ls .whl/*.whl | sha256sum)
  if [[ "$(cat /tmp/site/.helip-wheels 2>/dev/null)" != "$wheels" ]]; then  # again when the wheels changed
    "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
    echo "$wheels" > /tmp/site/.helip-wheels
  fi
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
"$PY" -c "import runpy, sys; sys.argv=['setup.py','--version']; runpy.run_path('setup.py', run_name='__main__')" >/dev/null
export PYTHONPATH=$PWD:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1
OUT_DIR=${OUT:-.}
