"""The shipped deployment is secure as configured: Kubernetes and compose run the miner with its bearer token (and
TLS when a certificate is there), Redis with a password, NetworkPolicies that let only the intended pods in, and no
manifest holds a secret.

Static checks read the rendered manifests (kustomize) and the resolved compose file (Docker Compose v2's `config`).
The end-to-end checks start a real Redis and a real miner from the shipped commands, arguments and environment,
with the mounted secrets' paths pointed at files the test makes (a certificate from openssl, laid out as
cert-manager writes it), and call the miner without and with the token.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis
import yaml

from helip.miner_service.client.single import ClientConfig, MinerClient
from helip.miner_service.wire.shards import shard_of
from tests.conftest import ROOT, free_port
from tests.integration.test_deploy import COMPOSE, KUSTOMIZE, compose, find, render

BASE = KUSTOMIZE / "base"
PROBE = BASE / "miner-health.py"
SECRET_NAMES = {"helip-miner-token", "helip-redis", "helip-miner-tls"}
# Who may reach whom, as (pods, port, from): the whole intended reachability of the namespace.
INTENDED_INGRESS = {
    ("helip-miner", "grpc", "pods helip-trainer"),
    ("helip-redis", "redis", "pods helip-miner"),
    ("helip-trainer", "*", "pods helip-trainer"),
    ("helip-miner", "metrics", "namespace monitoring, pods prometheus"),
    ("helip-trainer", "metrics", "namespace monitoring, pods prometheus"),
}


# ---- rendering -------------------------------------------------------------------------------------------------
def with_cert_manager(tmp_path: Path) -> list[dict]:
    """The cpu overlay with the cert-manager component, as an operator adds it."""
    tree = tmp_path / "kubernetes"
    shutil.copytree(KUSTOMIZE, tree)
    overlay = tree / "overlays" / "tls"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "namespace": "helip",
                "resources": ["../cpu"],
                "components": ["../../components/cert-manager"],
            }
        )
    )
    return render(overlay)


def pod_templates(docs) -> dict[str, dict]:
    """app.kubernetes.io/name -> pod template, for every workload."""
    return {
        d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"]: d["spec"]["template"]
        for d in docs
        if d["kind"] in ("StatefulSet", "Job", "Deployment", "DaemonSet")
    }


def selects(selector: dict, labels: dict) -> bool:
    """A Kubernetes LabelSelector (matchLabels and In/NotIn/Exists/DoesNotExist expressions) against labels."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": labels.get(key) not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[operator]
        if not ok:
            return False
    return True


def container_ports(template: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for c in template["spec"]["containers"] for p in c.get("ports", [])}


def container(template: dict) -> dict:
    (only,) = template["spec"]["containers"]
    return only


def volume(template: dict, name: str) -> dict:
    return next(v for v in template["spec"]["volumes"] if v["name"] == name)


def mount_path(template: dict, volume_name: str) -> str:
    return next(m["mountPath"] for m in container(template)["volumeMounts"] if m["name"] == volume_name)


# ---- no secret in any manifest ---------------------------------------------------------------------------------
LITERAL_URL_PASSWORD = re.compile(r"\w+://[^/\s:@]*:(?![$]|\*\*\*)[^@\s]+@")  # redis://:hunter2@ (not :$(VAR)@)
LITERAL_REQUIREPASS = re.compile(r"requirepass\s+(?![$])\S+")
SECRETISH_ENV = re.compile(r"PASSWORD|TOKEN|SECRET|PRIVATE|_KEY$", re.IGNORECASE)


def literal_secrets(text: str) -> list[str]:
    return LITERAL_URL_PASSWORD.findall(text) + LITERAL_REQUIREPASS.findall(text)


def test_the_secret_detector_finds_literal_secrets():
    assert literal_secrets("value: redis://:hunter2@redis:6379/0")
    assert literal_secrets("exec redis-server - <<EOF\nrequirepass hunter2\nEOF")
    assert not literal_secrets("value: redis://:$(REDIS_PASSWORD)@redis:6379/0\nrequirepass ${REDIS_PASSWORD}")


@pytest.mark.parametrize("overlay", ["cpu", "gpu", "cert-manager"])
def test_no_manifest_carries_a_token_or_password(overlay, tmp_path):
    docs = with_cert_manager(tmp_path) if overlay == "cert-manager" else render(KUSTOMIZE / "overlays" / overlay)
    assert not [d for d in docs if d["kind"] == "Secret"], "Secrets are created by the operator or cert-manager"
    assert not literal_secrets(yaml.safe_dump_all(docs))
    for name, template in pod_templates(docs).items():
        for env in container(template).get("env", []):
            if SECRETISH_ENV.search(env["name"]):
                assert "secretKeyRef" in env.get("valueFrom", {}), f"{name}: {env['name']} is not from a Secret"
        used = {v["secret"]["secretName"] for v in template["spec"].get("volumes", []) if "secret" in v}
        used |= {
            e["valueFrom"]["secretKeyRef"]["name"]
            for e in container(template).get("env", [])
            if "secretKeyRef" in e.get("valueFrom", {})
        }
        assert used <= SECRET_NAMES, f"{name} reads an undocumented Secret: {used - SECRET_NAMES}"
        assert "--redis-url" not in " ".join(container(template).get("args", []))  # argv is visible to `ps`


def test_compose_files_carry_no_secret_and_git_holds_none():
    for path in COMPOSE.glob("compose*.yaml"):
        assert not literal_secrets(path.read_text()), path.name
    config = json.loads(compose("config", "--format", "json").stdout)
    for name, spec in config["secrets"].items():
        assert Path(spec["file"]).parent == COMPOSE / "secrets", name
    tracked = subprocess.run(
        ["git", "ls-files", "deploy/compose/secrets"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    assert tracked == ["deploy/compose/secrets/.gitignore"]


# ---- labels, selectors, ports ----------------------------------------------------------------------------------
@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_services_and_network_policies_select_existing_pods_and_declared_ports(overlay):
    docs = render(KUSTOMIZE / "overlays" / overlay)
    pods = pod_templates(docs)
    assert set(pods) == {"helip-miner", "helip-redis", "helip-trainer"}
    for service in (d for d in docs if d["kind"] == "Service"):
        selected = [
            n for n, t in pods.items() if selects({"matchLabels": service["spec"]["selector"]}, t["metadata"]["labels"])
        ]
        assert len(selected) == 1, service["metadata"]["name"]
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in container_ports(pods[selected[0]]), (service["metadata"]["name"], port)

    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    default_deny = [p for p in policies if p["spec"]["podSelector"] == {} and not p["spec"].get("ingress")]
    assert default_deny and "Ingress" in default_deny[0]["spec"]["policyTypes"]
    allowed = set()
    for policy in policies:
        if policy in default_deny:
            continue
        name = policy["metadata"]["name"]
        targets = [n for n, t in pods.items() if selects(policy["spec"]["podSelector"], t["metadata"]["labels"])]
        assert targets, f"{name} selects no pod"
        for rule in policy["spec"]["ingress"]:
            sources = []
            for peer in rule["from"]:
                if "namespaceSelector" in peer:
                    namespace = peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
                    pod = peer["podSelector"]["matchLabels"]["app.kubernetes.io/name"]
                    sources.append(f"namespace {namespace}, pods {pod}")
                else:
                    chosen = [n for n, t in pods.items() if selects(peer["podSelector"], t["metadata"]["labels"])]
                    assert chosen, f"{name}: a source selects no pod"
                    sources += [f"pods {n}" for n in chosen]
            ports = rule.get("ports") or [{"port": "*"}]
            for target in targets:
                declared = container_ports(pods[target])
                for port in ports:
                    if port["port"] != "*":
                        # Named ports must be declared by every selected pod; numbers must be one it listens on.
                        assert port["port"] in declared or port["port"] in declared.values(), (name, target, port)
                        assert port.get("protocol", "TCP") == "TCP"
                    allowed |= {(target, port["port"], source) for source in sources}
    assert allowed == INTENDED_INGRESS


def test_a_policy_selecting_no_pod_is_caught():
    """The selector check above is not vacuous: a mistyped label selects nothing."""
    docs = render(KUSTOMIZE / "overlays" / "cpu")
    policy = copy.deepcopy(find(docs, "NetworkPolicy", "redis-from-miners"))
    policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/name"] = "redis"
    assert not [
        t for t in pod_templates(docs).values() if selects(policy["spec"]["podSelector"], t["metadata"]["labels"])
    ]


# ---- cert-manager ----------------------------------------------------------------------------------------------
def test_cert_manager_component_issues_the_secret_the_miner_mounts(tmp_path):
    import kubernetes_validate

    docs = with_cert_manager(tmp_path)
    issuers = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Issuer"}
    certificates = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Certificate"}
    for resource in [*issuers.values(), *certificates.values()]:  # CRDs: no schema offline, so check by hand
        assert resource["apiVersion"] == "cert-manager.io/v1" and resource["metadata"]["namespace"] == "helip"
    for issuer in issuers.values():
        assert len({"selfSigned", "ca", "acme", "vault", "venafi"} & set(issuer["spec"])) == 1
    for certificate in certificates.values():
        spec = certificate["spec"]
        assert spec["secretName"] and spec["issuerRef"]["name"] in issuers and spec["issuerRef"]["kind"] == "Issuer"
    # The chain: self-signed -> CA certificate -> CA Issuer -> the miners' certificate.
    miner_cert = certificates["helip-miner-tls"]["spec"]
    ca_issuer = issuers[miner_cert["issuerRef"]["name"]]["spec"]["ca"]
    ca_cert = next(c["spec"] for c in certificates.values() if c["spec"]["secretName"] == ca_issuer["secretName"])
    assert ca_cert["isCA"] is True and "selfSigned" in issuers[ca_cert["issuerRef"]["name"]]["spec"]
    assert "server auth" in miner_cert["usages"]

    pods = pod_templates(docs)
    miner, trainer = pods["helip-miner"], pods["helip-trainer"]
    # The miner mounts that Secret where its script looks, required; the trainer gets its ca.crt only.
    tls = volume(miner, "tls")["secret"]
    assert tls["secretName"] == miner_cert["secretName"] and tls["optional"] is False
    assert f"if [ -f {mount_path(miner, 'tls')}/tls.crt ]" in container(miner)["args"][0]
    ca = volume(trainer, "miner-ca")["secret"]
    assert ca["secretName"] == miner_cert["secretName"] and ca["optional"] is False
    assert ca["items"] == [{"key": "ca.crt", "path": "ca.crt"}]
    assert f"mining.tls_ca_file={mount_path(trainer, 'miner-ca')}/ca.crt" in container(trainer)["args"][0]
    # Every shard address the trainer dials, and the probe's name, are names of the certificate.
    shard_count = int(next(e["value"] for e in container(trainer)["env"] if e["name"] == "MINER_SHARDS"))
    for host in [f"miner-{i}.miner" for i in range(shard_count)] + ["miner"]:
        assert any(
            fnmatch.fnmatch(host, pattern) and pattern.count(".") == host.count(".")
            for pattern in miner_cert["dnsNames"]
        )
    for doc in docs:
        if doc["apiVersion"] != "cert-manager.io/v1":
            kubernetes_validate.validate(doc, "1.29.0", strict=True)


# ---- end to end: the shipped settings refuse an unauthenticated call ------------------------------------------
class FakeRoot:
    """The container's mount points, under a directory of the test: files placed at their in-container paths, and
    the shipped scripts' absolute paths rewritten to point there."""

    def __init__(self, root: Path, mount_points: list[str]):
        self.root = root
        self.mount_points = sorted(set(mount_points), key=len, reverse=True)
        self._pattern = re.compile("|".join(re.escape(m) for m in self.mount_points))

    def place(self, in_container: str, content: bytes) -> Path:
        path = self.root / in_container.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        return path

    def path(self, in_container: str) -> Path:
        return self.root / in_container.lstrip("/")

    def localise(self, text: str) -> str:
        return self._pattern.sub(lambda m: str(self.root) + m.group(0), text)


def substitute(text: str, replacements: dict[str, str]) -> str:
    """Each `old` must occur: a shipped file that changed shape fails here instead of running unchanged."""
    for old, new in replacements.items():
        assert old in text, f"{old!r} not in {text!r}"
        text = text.replace(old, new)
    return text


def issue_certificate(directory: Path, dns_names: list[str]) -> dict[str, bytes]:
    """tls.crt, tls.key and ca.crt for `dns_names`, signed by a fresh CA: what cert-manager's CA Issuer writes."""

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    directory.mkdir(parents=True, exist_ok=True)
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=test-ca")
    openssl("req", *ec, "-keyout", "tls.key", "-out", "tls.csr", "-subj", f"/CN={dns_names[0]}")
    (directory / "san.ext").write_text("subjectAltName=" + ",".join(f"DNS:{n}" for n in dns_names) + "\n")
    openssl(
        "x509", "-req", "-in", "tls.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "tls.crt", "-days", "2", "-extfile", "san.ext",
    )  # fmt: skip
    return {name: (directory / name).read_bytes() for name in ("tls.crt", "tls.key", "ca.crt")}


def kubelet_env(spec: dict, secret_values: dict[tuple[str, str], str], base: dict[str, str]) -> dict[str, str]:
    """A container's environment as the kubelet builds it: values, Secret references, $(VAR) expansion."""
    env = dict(base)
    for variable in spec.get("env", []):
        if "value" in variable:
            env[variable["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), variable["value"])
        else:
            ref = variable["valueFrom"]["secretKeyRef"]
            env[variable["name"]] = secret_values[(ref["name"], ref["key"])]
    return env


def base_env() -> dict[str, str]:
    return {
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",  # helip-miner of this checkout
        "HOME": os.environ.get("HOME", "/tmp"),
        "OMP_NUM_THREADS": "1",
    }


class Started:
    """A process started from a shipped shell script (which `exec`s its server), logging to a file."""

    def __init__(self, argv: list[str], env: dict[str, str], log_path: Path):
        self.log_path = log_path
        with open(log_path, "w") as log:
            self.process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=log_path.parent)

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_until(self, check, what: str, timeout_s: float = 90.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not check():
            assert self.process.poll() is None, f"{what}: exited with {self.process.returncode}:\n{self.log()}"
            assert time.monotonic() < deadline, f"{what}: not up in {timeout_s} s:\n{self.log()}"
            time.sleep(0.2)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def succeeds(argv: list[str], env: dict[str, str] | None = None) -> bool:
    return subprocess.run(argv, env=env, capture_output=True, timeout=30).returncode == 0


def mining_config_from(sets: dict[str, str], address: str, server_name: str):
    """The trainer's MiningConfig from its `--set mining.*` settings (and train.yaml's), at our address."""
    from helip.trainer.pairs.mining import MiningConfig

    truthy = {"true": True, "false": False}
    fields = {k.removeprefix("mining."): truthy.get(v, v) for k, v in sets.items() if k.startswith("mining.")}
    return MiningConfig(address=address, tls_server_name=server_name, **fields)


def check_the_miner_refuses_without_the_token(port: int, server_name: str, ca_file: Path, mining, token: str):
    from helip.trainer.pairs.mining import make_client

    address = f"127.0.0.1:{port}"
    tls = dict(address=address, tls=True, tls_ca_file=str(ca_file), tls_server_name=server_name)
    for wrong in ("", "not-the-token"):
        with pytest.raises(grpc.RpcError) as refused:
            MinerClient(ClientConfig(**tls, token=wrong, retries=0, timeout_s=10)).stats()
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as plain:  # TLS is on: a plain-text client, even with the token, fails
        MinerClient(ClientConfig(address=address, token=token, retries=0, timeout_s=5)).stats()
    assert plain.value.code() == grpc.StatusCode.UNAVAILABLE
    # The trainer's own client, built from the shipped trainer settings: accepted over TLS with the token.
    trainer_client = make_client(mining)
    rng = np.random.default_rng(0)
    ids = np.array([i for i in range(64) if shard_of([i], 2)[0] == 0][:4])  # owned by shard 0 of 2 (pod miner-0)
    rows = rng.normal(size=(len(ids), 64)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    assert trainer_client.upsert(ids, rows, rows, step=1).accepted == len(ids)
    assert trainer_client.stats().size == len(ids)
    trainer_client.close()


@pytest.mark.slow
def test_the_kubernetes_manifests_run_a_miner_that_refuses_unauthenticated_calls(tmp_path):
    docs = with_cert_manager(tmp_path)
    pods = pod_templates(docs)
    certificate = find(docs, "Certificate", "helip-miner-tls")["spec"]
    token, password = secrets.token_hex(16), secrets.token_hex(16)
    secret_values = {("helip-redis", "password"): password, ("helip-miner-token", "token"): token}
    tls_files = issue_certificate(tmp_path / "pki", certificate["dnsNames"])
    redis_port, grpc_port, metrics_port = free_port(), free_port(), free_port()

    # Redis, from its shipped script and probe.
    redis_spec = container(pods["helip-redis"])
    redis_root = FakeRoot(tmp_path / "redis-root", [m["mountPath"] for m in redis_spec["volumeMounts"]])
    redis_root.path("/data").mkdir(parents=True)
    script = substitute(
        redis_root.localise(redis_spec["args"][0]),
        {"redis-server -": f"redis-server - --port {redis_port} --bind 127.0.0.1"},
    )
    redis_env = kubelet_env(redis_spec, secret_values, base_env())
    redis_server = Started([*redis_spec["command"], script], redis_env, tmp_path / "redis.log")
    miner = None
    try:
        probe = [*redis_spec["readinessProbe"]["exec"]["command"]]
        probe[-1] = substitute(probe[-1], {"redis-cli": f"redis-cli -p {redis_port}"})
        redis_server.wait_until(lambda: succeeds(probe, redis_env), "redis")
        assert not succeeds(probe, {**redis_env, "REDIS_PASSWORD": "wrong"})  # the probe needs the password
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=redis_port).ping()

        # The miner, from its shipped script, environment and mounts (the Secrets as the kubelet mounts them).
        miner_template = pods["helip-miner"]
        miner_spec = container(miner_template)
        mounts = {m["name"]: m["mountPath"] for m in miner_spec["volumeMounts"]}
        root = FakeRoot(tmp_path / "miner-root", list(mounts.values()))
        root.place(f"{mounts['token']}/token", token.encode() + b"\n")
        for name, content in tls_files.items():
            root.place(f"{mounts['tls']}/{name}", content)
        probe_source = find(docs, "ConfigMap", volume(miner_template, "probe")["configMap"]["name"])["data"]
        for name, content in probe_source.items():
            root.place(f"{mounts['probe']}/{name}", content.encode())
        root.path(mounts["snapshots"]).mkdir(parents=True)
        script = substitute(
            root.localise(miner_spec["args"][0]),
            {
                "0.0.0.0": "127.0.0.1",
                "--port 50051": f"--port {grpc_port}",
                "--metrics-port 9464": f"--metrics-port {metrics_port}",
            },
        )
        env = kubelet_env(miner_spec, secret_values, {**base_env(), "HOSTNAME": "miner-0"})
        env = {
            k: substitute(v, {"@redis:6379": f"@127.0.0.1:{redis_port}"}) if "REDIS_URL" in k else v
            for k, v in env.items()
        }
        miner = Started([*miner_spec["command"], script], env, tmp_path / "miner.log")
        readiness = [
            sys.executable if a == "python" else root.localise(a)
            for a in miner_spec["readinessProbe"]["exec"]["command"]
        ]
        miner.wait_until(
            lambda: succeeds([*readiness, "--address", f"127.0.0.1:{grpc_port}"]), "miner (readiness probe)"
        )

        # The trainer's settings: train.yaml (token_file) and what its script adds when the CA is mounted.
        trainer_template = pods["helip-trainer"]
        trainer_spec = container(trainer_template)
        trainer_mounts = {m["name"]: m["mountPath"] for m in trainer_spec["volumeMounts"]}
        trainer_root = FakeRoot(tmp_path / "trainer-root", [trainer_mounts["token"], trainer_mounts["miner-ca"]])
        trainer_root.place(f"{trainer_mounts['token']}/token", token.encode())
        trainer_root.place(f"{trainer_mounts['miner-ca']}/ca.crt", tls_files["ca.crt"])
        train_yaml = yaml.safe_load(
            find(docs, "ConfigMap", volume(trainer_template, "config")["configMap"]["name"])["data"]["train.yaml"]
        )
        sets = {f"mining.{k}": trainer_root.localise(str(v)) for k, v in train_yaml["mining"].items()}
        prefix = trainer_root.localise(trainer_spec["args"][0].split("exec torchrun")[0])
        added = subprocess.run(
            ["sh", "-c", prefix + 'printf "%s\\n" "$@"'],
            env={**trainer_env(trainer_spec), "PATH": "/usr/bin:/bin"},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        assert added and all(a == "--set" for a in added[::2])
        sets.update(dict(pair.split("=", 1) for pair in added[1::2]))
        mining = mining_config_from(
            {k: v for k, v in sets.items() if k in ("mining.token_file", "mining.tls", "mining.tls_ca_file")},
            f"127.0.0.1:{grpc_port}",
            "miner-0.miner",
        )

        check_the_miner_refuses_without_the_token(
            grpc_port, "miner-0.miner", root.path(f"{mounts['tls']}/ca.crt"), mining, token
        )
        log = miner.log()
        assert "tls=on, token=on" in log and "redis://:***@127.0.0.1" in log
        assert password not in log and token not in log
    finally:
        if miner is not None:
            miner.stop()
        redis_server.stop()


def trainer_env(spec: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in spec.get("env", []) if "value" in e}


@pytest.mark.slow
def test_the_compose_file_runs_a_miner_that_refuses_unauthenticated_calls(tmp_path):
    # The shipped make-secrets.sh, run in a copy of the compose directory (the checkout's secrets/ stays as it is).
    workdir = tmp_path / "compose"
    workdir.mkdir()
    shutil.copy(COMPOSE / "make-secrets.sh", workdir)
    subprocess.run(["sh", str(workdir / "make-secrets.sh")], check=True, capture_output=True)
    made = workdir / "secrets"
    assert (made.stat().st_mode & 0o777) == 0o700
    config = json.loads(compose("config", "--format", "json").stdout)
    services = config["services"]
    secret_file = {name: made / Path(spec["file"]).name for name, spec in config["secrets"].items()}
    token = (made / "miner-token").read_text().strip()
    password = (made / "redis-password").read_text().strip()
    redis_port, grpc_port, metrics_port = free_port(), free_port(), free_port()

    def mounted(service: dict, root: Path) -> FakeRoot:
        """The service's secrets at their targets and its bind mounts, under `root`."""
        targets = {}
        for secret in service.get("secrets", []):
            target = secret["target"] if secret["target"].startswith("/") else f"/run/secrets/{secret['target']}"
            targets[target] = secret_file[secret["source"]].read_bytes()
        for mount in service.get("volumes", []):
            if mount["type"] == "bind":
                targets[mount["target"]] = Path(mount["source"]).read_bytes()
        directories = [str(Path(target).parent) for target in targets]  # the scripts name some by directory
        fake = FakeRoot(root, [*targets, *directories, *(m["target"] for m in service.get("volumes", []))])
        for target, content in targets.items():
            fake.place(target, content)
        return fake

    def shell(text: str) -> str:
        return text.replace("$$", "$")  # compose's escape for a literal $, which the container's shell expands

    redis_service = services["redis"]
    redis_root = mounted(redis_service, tmp_path / "redis-root")
    redis_root.path("/data").mkdir(parents=True)
    *shell_argv, script = redis_service["command"]
    script = substitute(
        shell(redis_root.localise(script)),
        {"redis-server -": f"redis-server - --port {redis_port} --bind 127.0.0.1 --dir {redis_root.path('/data')}"},
    )
    redis_server = Started([*shell_argv, script], base_env(), tmp_path / "redis.log")
    miner = None
    try:
        kind, health = redis_service["healthcheck"]["test"]
        assert kind == "CMD-SHELL"
        health = substitute(shell(redis_root.localise(health)), {"redis-cli": f"redis-cli -p {redis_port}"})
        redis_server.wait_until(lambda: succeeds(["sh", "-c", health]), "redis (health check)")
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=redis_port).ping()

        miner_service = services["miner"]
        root = mounted(miner_service, tmp_path / "miner-root")
        root.path("/snapshots").mkdir(parents=True)
        (script,) = miner_service["command"]
        script = substitute(
            shell(root.localise(script)),
            {
                "0.0.0.0": "127.0.0.1",
                "--port=50051": f"--port={grpc_port}",
                "--metrics-port=9464": f"--metrics-port={metrics_port}",
                "@redis:6379": f"@127.0.0.1:{redis_port}",
            },
        )
        miner = Started([*miner_service["entrypoint"], script], base_env(), tmp_path / "miner.log")
        kind, *health = miner_service["healthcheck"]["test"]
        assert kind == "CMD"
        health = [sys.executable if a == "python" else root.localise(a) for a in health]
        miner.wait_until(lambda: succeeds([*health, "--address", f"127.0.0.1:{grpc_port}"]), "miner (health check)")

        trainer = services["trainer-0"]
        trainer_root = mounted(trainer, tmp_path / "trainer-root")
        sets = dict(a.removeprefix("--set=").split("=", 1) for a in trainer["command"] if a.startswith("--set=mining."))
        sets = {k: trainer_root.localise(v) for k, v in sets.items()}
        server_name = next(a for a in trainer["command"] if a.startswith("--miner=")).split("=", 1)[1].split(":")[0]
        mining = mining_config_from(sets, f"127.0.0.1:{grpc_port}", server_name)
        assert mining.tls and mining.token_file

        # The miner's shard is 0 of 1 here: any id is its own.
        ca_file = root.path("/etc/helip/tls/ca.crt")
        check_the_miner_refuses_without_the_token(grpc_port, server_name, ca_file, mining, token)
        log = miner.log()
        assert "tls=on, token=on" in log and "redis://:***@127.0.0.1" in log
        assert password not in log and token not in log
    finally:
        if miner is not None:
            miner.stop()
        redis_server.stop()
