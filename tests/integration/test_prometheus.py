"""A real Prometheus server (Debian's `prometheus`, installed by `bash scripts/dev.sh install`) scrapes a real miner
every second with deploy/prometheus's rules loaded; the test drives Mine calls and reads the results back through
Prometheus' HTTP API, as Grafana and the alert rules will."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import ROOT, free_port

RULES = sorted((ROOT / "deploy" / "prometheus" / "rules").glob("*.yml"))


@dataclass
class PrometheusServer:
    process: subprocess.Popen
    url: str
    log_path: Path

    def query(self, expr: str) -> list[dict]:
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        reply = json.loads(urllib.request.urlopen(url, timeout=10).read())
        assert reply["status"] == "success", reply
        return reply["data"]["result"]

    def wait_for(self, expr: str, accept, timeout_s: float = 60.0) -> list[dict]:
        deadline = time.monotonic() + timeout_s
        while True:
            result = self.query(expr)
            if accept(result):
                return result
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{expr} never satisfied the check; last result {result}\n{self.log_path.read_text()[-3000:]}"
                )
            time.sleep(0.5)


def start_prometheus(workdir: Path, scrape_configs: list[dict]) -> PrometheusServer:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail(
            "`prometheus` is not on PATH: install it with `bash scripts/dev.sh install` (Debian package prometheus)"
        )
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(p) for p in RULES],
        "scrape_configs": scrape_configs,
    }
    config_path = workdir / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    port = free_port()
    log_path = workdir / "prometheus.log"
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--storage.tsdb.retention.time=1h",
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    server = PrometheusServer(process, f"http://127.0.0.1:{port}", log_path)
    deadline = time.monotonic() + 60
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"prometheus exited with {process.returncode}:\n{log_path.read_text()}")
        try:
            if urllib.request.urlopen(f"{server.url}/-/ready", timeout=2).status == 200:
                return server
        except OSError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            raise TimeoutError(f"prometheus not ready in 60 s:\n{log_path.read_text()}")
        time.sleep(0.2)


@pytest.fixture
def prometheus_factory(tmp_path):
    started: list[PrometheusServer] = []

    def factory(scrape_configs: list[dict]) -> PrometheusServer:
        workdir = tmp_path / f"prometheus-{len(started)}"
        workdir.mkdir()
        server = start_prometheus(workdir, scrape_configs)
        started.append(server)
        return server

    yield factory
    for server in started:
        server.process.terminate()
        try:
            server.process.wait(20)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()


def drive_mining(address: str, stop: threading.Event, dim: int = 16, rows: int = 512, max_s: float = 90.0) -> int:
    """Upsert `rows` pairs, then, until `stop` (or max_s), Mine a batch of anchors and overwrite a batch of rows at
    the next step, as training does: bounded local load."""
    from helip.miner.v1 import miner_pb2 as pb
    from helip.miner_service.client.single import ClientConfig, MinerClient

    client = MinerClient(ClientConfig(address=address, wire_dtype=pb.FLOAT32, timeout_s=30))
    rng = np.random.default_rng(0)
    pairs = rng.normal(size=(2, rows, dim)).astype(np.float32)
    client.upsert(np.arange(rows), pairs[0], pairs[1], step=1)
    calls, deadline = 0, time.monotonic() + max_s
    while not stop.is_set() and time.monotonic() < deadline:
        client.mine(k=8, anchor_ids=rng.choice(rows, size=32, replace=False))
        calls += 1
        ids = rng.choice(rows, size=32, replace=False)
        client.upsert(ids, pairs[0][ids], pairs[1][ids], step=1 + calls)
        time.sleep(0.02)
    client.close()
    return calls


@pytest.mark.slow
def test_prometheus_scrapes_a_live_miner_and_sees_mining(miner_factory, prometheus_factory):
    miner = miner_factory("--dim", "16")
    prometheus = prometheus_factory(
        [{"job_name": "helip-miner", "static_configs": [{"targets": [f"127.0.0.1:{miner.metrics_port}"]}]}]
    )
    stop = threading.Event()
    calls: list[int] = []
    load = threading.Thread(target=lambda: calls.append(drive_mining(miner.address, stop)), daemon=True)
    load.start()
    try:
        prometheus.wait_for('up{job="helip-miner"}', lambda r: r and r[0]["value"][1] == "1")
        rate = prometheus.wait_for(
            "rate(helip_miner_mine_seconds_count[30s])", lambda r: r and float(r[0]["value"][1]) > 0
        )
        assert rate[0]["metric"]["job"] == "helip-miner"
        rows = prometheus.wait_for("helip_miner_rows", lambda r: r and float(r[0]["value"][1]) == 512)
        assert rows[0]["metric"]["instance"] == f"127.0.0.1:{miner.metrics_port}"
        # deploy/prometheus's recording rules, evaluated by the server on the scraped histogram.
        p99 = prometheus.wait_for(
            "instance:helip_miner_mine_seconds:p99_rate5m", lambda r: r and 0 < float(r[0]["value"][1]) < 10
        )
        p50 = prometheus.query("instance:helip_miner_mine_seconds:p50_rate5m")
        assert 0 < float(p50[0]["value"][1]) <= float(p99[0]["value"][1])
        prometheus.wait_for("job:helip_miner_upserted_rows:rate5m", lambda r: r and float(r[0]["value"][1]) > 0)
        # The latency alert stays quiet for a miner answering in milliseconds; the down alert too.
        alerts = json.loads(urllib.request.urlopen(f"{prometheus.url}/api/v1/alerts", timeout=10).read())
        firing = {a["labels"]["alertname"] for a in alerts["data"]["alerts"]}
        assert not firing & {"HelipMinerDown", "HelipMineLatencyHigh", "HelipMinerAbsent"}
    finally:
        stop.set()
        load.join(30)
    assert calls and calls[0] > 0


@pytest.mark.slow
def test_prometheus_scrapes_a_miner_and_a_training_rank(miner_factory, prometheus_factory, tmp_path):
    """A real trainer rank with its miner, both scraped: mining latency has a rate, and the rank exports every
    trainer metric the dashboard and rules name."""
    import os
    import sys

    from prometheus_client.parser import text_string_to_metric_families

    from helip.trainer.tools.synth import SynthConfig, generate
    from tests.integration.test_deploy import TRAINER_METRICS

    synth = tmp_path / "synth"
    generate(SynthConfig(out_dir=synth, train_size=256, test_size=40))
    miner = miner_factory("--dim", "64")
    metrics_port = free_port()
    trainer = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "helip.trainer.app.cli",
            "--config",
            str(ROOT / "configs/demo.yaml"),
            "--miner",
            miner.address,
            "--train-data",
            str(synth / "train.csv"),
            "--output-dir",
            str(tmp_path / "run"),
            "--steps",
            "100000",
            "--batch-size",
            "16",
            "--set",
            "data.synth_dir=",
            "--set",
            "run.progress=false",
            "--set",
            f"run.metrics_port={metrics_port}",
            "--set",
            "run.checkpoint_every=0",
        ],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    try:
        prometheus = prometheus_factory(
            [
                {"job_name": "helip-miner", "static_configs": [{"targets": [f"127.0.0.1:{miner.metrics_port}"]}]},
                {"job_name": "helip-trainer", "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]},
            ]
        )
        prometheus.wait_for('up{job="helip-trainer"}', lambda r: r and r[0]["value"][1] == "1", timeout_s=120)
        rate = prometheus.wait_for(
            "rate(helip_miner_mine_seconds_count[30s])", lambda r: r and float(r[0]["value"][1]) > 0, timeout_s=120
        )
        assert rate[0]["metric"]["job"] == "helip-miner"
        samples = prometheus.wait_for(
            'rate(helip_trainer_samples_total{rank="0"}[30s])',
            lambda r: r and float(r[0]["value"][1]) > 0,
            timeout_s=120,
        )
        assert samples[0]["metric"]["job"] == "helip-trainer"
        prometheus.wait_for(
            "helip_trainer_hard_pairs_total", lambda r: r and float(r[0]["value"][1]) > 0, timeout_s=120
        )
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        exported = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
        assert TRAINER_METRICS <= exported
    finally:
        trainer.terminate()
        trainer.wait(60)
