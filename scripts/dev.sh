#!/usr/bin/env bash
# One entry point for a fresh machine: install into .venv, then run the demo, the tests or a benchmark.
#   bash scripts/dev.sh install | demo | test [pytest args] | bench NAME [args]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${HELIP_VENV:-.venv}
PY="$VENV/bin/python"

install() {
  # Reinstall only when what the install depends on changed (pyproject, setup.py, the .proto contract).
  local stamp="$VENV/.helip-install-stamp"
  local want
  want=$(cat pyproject.toml setup.py protos/helip/miner/v1/*.proto | sha256sum | cut -d' ' -f1)
  if [[ -x "$PY" && -f "$stamp" && "$(cat "$stamp")" == "$want" && -f helip/miner/v1/miner_pb2.py ]]; then
    return 0
  fi
  # Prometheus and promtool (Debian's), for the deploy and Prometheus tests.
  if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
    if [[ $(id -u) -eq 0 ]]; then
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus >/dev/null
    else
      echo "install Debian's prometheus package (prometheus, promtool) for the deploy tests" >&2
    fi
  fi
  # Chromium (Debian's), headless, for the helip-inspect page test.
  if ! command -v chromium >/dev/null; then
    if [[ $(id -u) -eq 0 ]]; then
      # Only one test needs it (and skips without it): a failed install must not stop the rest.
      { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium >/dev/null; } ||
        echo "could not install chromium: the helip-inspect browser test will be skipped" >&2
    else
      echo "install Debian's chromium package for the helip-inspect browser test" >&2
    fi
  fi
  [[ -x "$PY" ]] || python3 -m venv "$VENV"
  "$PY" -m pip install -q --upgrade pip setuptools wheel
  # The CPU/CUDA torch pair served from this machine's disk; nothing below may pull another torch.
  "$PY" -m pip install -q torch==2.14.1 torchvision==0.29.1
  DS_BUILD_OPS=0 "$PY" -m pip install -q -e ".[train,dev]"
  echo "$want" > "$stamp"
}

case "${1:-}" in
  install) install ;;
  demo)
    install
    shift
    exec "$VENV/bin/helip-train" --config configs/demo.yaml "$@" ;;
  test)
    install
    shift
    # Lint and formatting first: they take seconds and fail fast.
    "$VENV/bin/ruff" check .
    "$VENV/bin/ruff" format --check .
    set +e
    "$PY" -m pytest -m "not gpu" "$@"
    rc=$?
    # pytest's 5 means "no tests collected", which must not pass as green.
    exit $rc ;;
  bench)
    install
    shift
    name=$1; shift
    exec "$PY" -m "bench.$name" "$@" ;;
  *)
    echo "usage: bash scripts/dev.sh install | demo | test [pytest args] | bench NAME [args]" >&2
    exit 2 ;;
esac
