"""bench/capacity.py: the devices a run needs, from a measured throughput read from either benchmark's JSON."""

from __future__ import annotations

import json

import pytest

from bench.capacity import Measured, devices_needed, measured_from


def test_devices_scale_with_rows_and_what_the_run_asks():
    measured = Measured(anchors_per_s=50_000, rows=10_000_000, device="gpu")
    assert devices_needed(measured, 10_000_000, 64, 128, 4.0) == (50_000, 1)  # 32,768 asked
    per_device, devices = devices_needed(measured, 100_000_000, 64, 128, 4.0)
    assert per_device == 5_000 and devices == 7  # ten times the rows: a tenth of the anchors/s
    assert devices_needed(measured, 1_000, 1, 1, 0.001)[1] == 1  # never fewer than one


def test_the_batched_figure_is_read_from_either_benchmark(tmp_path):
    load = {
        "benchmark": "load",
        "machine": {"cpus": 2, "gpu": None},
        "config": {"rows": 50_000},
        "batching": {"batched": {"anchors_per_s": 9_000.0}, "unbatched": {"anchors_per_s": 8_000.0}},
    }
    gpu = {
        "benchmark": "gpu_check",
        "machine": {"gpu": "NVIDIA H200"},
        "config": {"rows": 10_000_000},
        "latency": {"callers_batched": {"anchors_per_s": 60_000.0}},
    }
    (tmp_path / "load.json").write_text(json.dumps(load))
    (tmp_path / "gpu.json").write_text(json.dumps(gpu))
    assert measured_from(tmp_path / "load.json") == Measured(9_000.0, 50_000, "CPU, 2 cores")
    assert measured_from(tmp_path / "gpu.json") == Measured(60_000.0, 10_000_000, "NVIDIA H200")
    (tmp_path / "other.json").write_text(json.dumps({"benchmark": "mine"}))
    with pytest.raises(SystemExit, match="neither"):
        measured_from(tmp_path / "other.json")
