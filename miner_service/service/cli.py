"""`helip-miner`: run the miner service.

Settings come from defaults < `--config FILE` (YAML) < environment (HELIP_MINER_*) < flags.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

# gRPC handler threads each call torch, and each such thread gets its own OpenMP team whose idle workers spin
# after every parallel region by default: on a small box they take the cores from gRPC's I/O threads (upserts
# ran about 3x slower on 2 cores). Sleeping idle workers cost little next to a search's long parallel regions.
# libgomp reads this once, when torch loads it, so it must be set before the first import of torch (below).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from helip.miner_service.service.config import (  # noqa: E402
    DurabilityConfig,
    MinerConfig,
    from_environment,
    load_file,
    with_overrides,
)
from helip.miner_service.wire.security import RedactingFilter, redact_url  # noqa: E402
from helip.miner_service.wire.shards import parse_shard  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="helip-miner", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve the Miner gRPC API and /metrics")
    serve.add_argument("--config", help="YAML file with MinerConfig fields (nested 'search:' and 'search.ivf:')")
    serve.add_argument("--host", help="address to bind gRPC on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="gRPC port (0: pick a free one)")
    serve.add_argument("--metrics-port", type=int, help="Prometheus /metrics port (0: pick a free one, -1: off)")
    serve.add_argument("--metrics-host", help="address to bind /metrics on (default 127.0.0.1)")
    serve.add_argument("--dim", type=int, help="embedding dimension per modality")
    serve.add_argument("--max-rows", type=int, help="refuse upserts past this many rows in a namespace (0: no limit)")
    serve.add_argument(
        "--max-total-rows", type=int, help="refuse upserts past this many rows over all namespaces (0: no limit)"
    )
    serve.add_argument("--max-namespaces", type=int, help="namespaces this miner holds at most (default 64)")
    serve.add_argument(
        "--max-namespace-dim", type=int, help="largest dim a client may create a namespace with (default 4096)"
    )
    serve.add_argument("--workers", type=int, help="gRPC handler threads")
    serve.add_argument("--device", dest="search.device", metavar="DEVICE", help="auto | cpu | cuda | cuda:N")
    serve.add_argument(
        "--storage-dtype", dest="search.storage_dtype", metavar="STORAGE_DTYPE", help="auto | float32 | float16"
    )
    serve.add_argument("--max-k", dest="search.max_k", metavar="MAX_K", type=int, help="largest k a Mine may ask for")
    for flag, metavar, help_text in (
        ("store-block-rows", "ROWS", "rows per storage block (growth and write locking go a block at a time)"),
        ("mine-scratch-bytes", "BYTES", "scratch memory of one Mine: its anchors x rows scored at once"),
        ("scratch-budget-bytes", "BYTES", "scratch memory of all running Mines together"),
        ("mine-queue-limit", "N", "Mines that may wait for scratch memory; more are refused (RESOURCE_EXHAUSTED)"),
        ("topk-segment", "COLUMNS", "GPU top-k: select within segments of this many columns first (0: off)"),
    ):
        serve.add_argument(
            f"--{flag}", dest=f"search.{flag.replace('-', '_')}", metavar=metavar, type=int, help=help_text
        )
    serve.add_argument(
        "--ivf-min-rows",
        dest="search.ivf.min_rows",
        metavar="MIN_ROWS",
        type=int,
        help="use the IVF candidate index from this many rows on (0: exact only)",
    )
    serve.add_argument(
        "--ivf-nprobe", dest="search.ivf.nprobe", metavar="NPROBE", type=int, help="IVF lists probed per query"
    )
    serve.add_argument(
        "--redis-url",
        dest="durability.redis_url",
        metavar="URL",
        help="durable log in this Redis (default: $REDIS_URL if --durable, else none)",
    )
    serve.add_argument("--durable", action="store_true", help="use $REDIS_URL as the durable log")
    serve.add_argument(
        "--key-prefix",
        dest="durability.key_prefix",
        metavar="PREFIX",
        help="Redis key prefix of the log stream (default helip)",
    )
    serve.add_argument(
        "--snapshot-dir",
        dest="durability.snapshot_dir",
        metavar="DIR",
        help="write snapshots here, and restore from the newest on start (required with --redis-url: the log is "
        "trimmed below each snapshot)",
    )
    serve.add_argument(
        "--snapshot-interval-s",
        dest="durability.snapshot_interval_s",
        type=float,
        metavar="SECONDS",
        help="seconds between scheduled snapshots (0: only on shutdown)",
    )
    serve.add_argument(
        "--follow",
        dest="durability.follow",
        action="store_const",
        const=True,
        help="a read-only follower: tail the leader's log, serve Mine, refuse writes",
    )
    serve.add_argument("--shard", metavar="I/S", help="own the ids with shard_of(id) == I among S shards")
    serve.add_argument(
        "--tls-cert-file",
        dest="security.tls_cert_file",
        metavar="PEM",
        help="serve TLS with this certificate chain (needs --tls-key-file)",
    )
    serve.add_argument("--tls-key-file", dest="security.tls_key_file", metavar="PEM", help="TLS private key")
    serve.add_argument(
        "--tls-client-ca-file",
        dest="security.tls_client_ca_file",
        metavar="PEM",
        help="require client certificates signed by this CA (mutual TLS)",
    )
    serve.add_argument(
        "--token-file",
        dest="security.token_file",
        metavar="FILE",
        help="require 'authorization: Bearer <token>' on every RPC (else $HELIP_AUTH_TOKEN)",
    )
    serve.add_argument("--port-file", help="write the bound gRPC and metrics ports here (JSON) once serving")
    serve.add_argument("--log-level", help="DEBUG, INFO, WARNING, ...")
    return parser


def config_from_args(args: argparse.Namespace) -> MinerConfig:
    config = load_file(args.config) if args.config else MinerConfig()
    config = from_environment(config)
    flags = {k: v for k, v in vars(args).items() if k not in {"command", "config", "port_file", "durable", "shard"}}
    if args.durable and not args.__dict__.get("durability.redis_url"):
        flags["durability.redis_url"] = os.environ.get("REDIS_URL") or None
        if not flags["durability.redis_url"]:
            raise ValueError("--durable needs $REDIS_URL (or give --redis-url)")
    if args.shard:
        flags["durability.shard_index"], flags["durability.shard_count"] = parse_shard(args.shard)
    return with_overrides(config, flags)


def check_log_is_bounded(durability: DurabilityConfig) -> None:
    """A leader trims its log only below its snapshots: without a snapshot directory it would keep every write."""
    if durability.redis_url and not durability.follow and not durability.snapshot_dir:
        raise ValueError(
            "--snapshot-dir (durability.snapshot_dir) is required with a Redis log: the log is trimmed below each "
            "snapshot, so without snapshots it grows without bound"
        )


def describe_durability(durability: DurabilityConfig) -> None:
    log = logging.getLogger("helip-miner")
    if not durability.redis_url:
        return
    log.info(
        "durable log %s in %s, snapshots in %s", durability.stream, durability.redis_url, durability.snapshot_dir or "-"
    )
    if durability.snapshot_interval_s == 0 and not durability.follow:
        log.warning("--snapshot-interval-s 0: snapshots only on shutdown, so the log grows until then")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
        if config.dim <= 0:
            raise ValueError(f"--dim must be positive, got {config.dim}")
        for name in ("max_rows", "max_total_rows"):
            if getattr(config, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(config, name)}")
        for name in ("max_namespaces", "max_namespace_dim"):
            if getattr(config, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(config, name)}")
        if config.port < 0 or config.port > 65535:
            raise ValueError(f"--port must be in 0..65535, got {config.port}")
        for name in ("tls_cert_file", "tls_key_file", "tls_client_ca_file", "token_file"):
            path = getattr(config.security, name)
            if path and not os.access(path, os.R_OK):
                raise ValueError(f"--{name.replace('_', '-')} ({name}): cannot read {path}")
        check_log_is_bounded(config.durability)
    except (ValueError, TypeError, OSError) as error:
        parser.error(redact_url(str(error)))  # exit code 2
    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactingFilter())  # no log line carries the password of the Redis URL
    describe_durability(config.durability)
    from helip.miner_service.service.server import MinerServer  # heavy imports (torch, grpc) after argument checks

    try:
        server = MinerServer(config)
    except (OSError, ValueError) as error:
        logging.getLogger("helip-miner").error("cannot start: %s", error)
        return 1
    server.install_signal_handlers()
    server.start()
    if args.port_file:
        import json
        from pathlib import Path

        Path(args.port_file).write_text(json.dumps({"port": server.port, "metrics_port": server.metrics_port}))
    server.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
