"""Container health check of the local miner: exit 0 when its grpc.health.v1 service answers SERVING.

Kubernetes' native gRPC probes and Docker's health checks speak plain text, so a miner serving TLS needs this one:
with a certificate in TLS_DIR (tls.crt, as the miner's start script decides), it connects over TLS, trusting
TLS_DIR/ca.crt (else the system roots) and expecting SERVER_NAME in the certificate; otherwise in plain text. The
health service needs no token.

    python miner-health.py [--address 127.0.0.1:50051] [--tls-dir /etc/helip/tls] [--server-name miner]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def channel(address: str, tls_dir: Path, server_name: str) -> grpc.Channel:
    if not (tls_dir / "tls.crt").is_file():
        return grpc.insecure_channel(address)
    ca_file = tls_dir / "ca.crt"
    credentials = grpc.ssl_channel_credentials(ca_file.read_bytes() if ca_file.is_file() else None)
    return grpc.secure_channel(address, credentials, options=[("grpc.ssl_target_name_override", server_name)])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", default="127.0.0.1:50051")
    parser.add_argument("--tls-dir", type=Path, default=Path("/etc/helip/tls"))
    parser.add_argument("--server-name", default="miner", help="a name the miner's certificate holds")
    parser.add_argument("--timeout-s", type=float, default=3.0)
    args = parser.parse_args()
    with channel(args.address, args.tls_dir, args.server_name) as connection:
        try:
            reply = health_pb2_grpc.HealthStub(connection).Check(
                health_pb2.HealthCheckRequest(), timeout=args.timeout_s
            )
        except grpc.RpcError as error:
            print(f"miner health: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    print(f"miner health: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
