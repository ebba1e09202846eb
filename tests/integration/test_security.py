"""TLS (plain and mutual) and the bearer token, against a real miner process with real certificates."""

from __future__ import annotations

import subprocess
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from helip.miner_service.client.single import ClientConfig, MinerClient

TOKEN = "s3cret-token-value"


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """A CA, a server certificate for localhost / 127.0.0.1 and a client certificate, made with openssl."""
    d = tmp_path_factory.mktemp("pki")
    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=helip-test-ca",
        cwd=d,
    )
    (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name in ("server", "client"):
        openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            f"/CN={name}",
            cwd=d,
        )
        openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.pem",
            "-days",
            "2",
            "-extfile",
            "san.ext",
            cwd=d,
        )
    (d / "token").write_text(TOKEN + "\n")
    return d


def tls_client(miner, pki: Path, token: str = "", client_cert: bool = False) -> MinerClient:
    return MinerClient(
        ClientConfig(
            address=miner.address,
            tls=True,
            tls_ca_file=str(pki / "ca.pem"),
            token=token,
            retries=0,
            timeout_s=10,
            tls_cert_file=str(pki / "client.pem") if client_cert else "",
            tls_key_file=str(pki / "client.key") if client_cert else "",
        )
    )


def upsert_one(client: MinerClient) -> None:
    image = np.ones((1, 8), dtype=np.float32) / np.sqrt(8)
    client.upsert([1], image, image)


def test_tls_and_token(miner_factory, pki):
    miner = miner_factory(
        "--dim",
        "8",
        "--tls-cert-file",
        str(pki / "server.pem"),
        "--tls-key-file",
        str(pki / "server.key"),
        "--token-file",
        str(pki / "token"),
    )
    good = tls_client(miner, pki, token=TOKEN)
    upsert_one(good)
    assert good.stats().size == 1
    for token in ("", "wrong-token"):
        with pytest.raises(grpc.RpcError) as caught:
            tls_client(miner, pki, token=token).stats()
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as caught:  # streams are guarded too
        tls_client(miner, pki, token="wrong").upsert_stream(
            [MinerClient(ClientConfig()).upsert_request([2], np.ones((1, 8)), np.ones((1, 8)))]
        )
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    plain = MinerClient(ClientConfig(address=miner.address, token=TOKEN, retries=0, timeout_s=5))
    with pytest.raises(grpc.RpcError) as caught:  # a plain-text client cannot talk to a TLS server
        plain.stats()
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    # Health stays open (orchestrator probes carry no token), over TLS.
    health = health_pb2_grpc.HealthStub(tls_client(miner, pki).channel)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
    assert good.stats().size == 1
    assert TOKEN not in miner.log()
    assert "token=on" in miner.log()


def test_mutual_tls_needs_a_client_certificate(miner_factory, pki):
    miner = miner_factory(
        "--dim",
        "8",
        "--tls-cert-file",
        str(pki / "server.pem"),
        "--tls-key-file",
        str(pki / "server.key"),
        "--tls-client-ca-file",
        str(pki / "ca.pem"),
    )
    upsert_one(tls_client(miner, pki, client_cert=True))
    with pytest.raises(grpc.RpcError) as caught:
        tls_client(miner, pki).stats()
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert tls_client(miner, pki, client_cert=True).stats().size == 1


def test_token_from_environment_without_tls(miner_factory):
    miner = miner_factory("--dim", "8", env={"HELIP_AUTH_TOKEN": TOKEN})
    with pytest.raises(grpc.RpcError) as caught:
        MinerClient(ClientConfig(address=miner.address, retries=0)).stats()
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    client = MinerClient(ClientConfig(address=miner.address, token=TOKEN))
    upsert_one(client)
    assert client.stats().size == 1


def test_bad_tls_settings_exit_2(tmp_path):
    import sys

    from tests.conftest import ROOT

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "helip.miner_service.service.cli",
            "serve",
            "--dim",
            "8",
            "--tls-cert-file",
            str(tmp_path / "missing.pem"),
            "--tls-key-file",
            "x",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode in (1, 2) and "tls_cert_file" in result.stderr
