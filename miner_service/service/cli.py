"""`helip-miner`: run the miner service.

Settings come from defaults < `--config FILE` (YAML) < environment (HELIP_MINER_*) < flags.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from functools import lru_cache

# gRPC handler threads each call torch, and each such thread gets its own OpenMP team whose idle workers spin
# after every parallel region by default: on a small box they take the cores from gRPC's I/O threads (upserts
# ran about 3x slower on 2 cores). Sleeping idle workers cost little next to a search's long parallel regions.
# libgomp reads this once, when torch loads it, so it must be set before the first import of torch (below).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from helip.miner_service.core.settings_docs import (  # noqa: E402
    Section,
    add_setting_flags,
    given_settings,
    read_section,
)
from helip.miner_service.service.config import DurabilityConfig, MinerConfig, load  # noqa: E402
from helip.miner_service.wire.security import RedactingFilter, redact_url  # noqa: E402
from helip.miner_service.wire.shards import parse_shard  # noqa: E402

# The word for a section in the short flags: --max-k is search.max_k, --ivf-nprobe is search.ivf.nprobe.
SHORT_PREFIX = {"search.ivf": "ivf-"}


@lru_cache(maxsize=1)
def sections() -> tuple[Section, ...]:
    """MinerConfig's settings by section (top level, search, search.ivf, durability, security)."""
    return tuple(read_section(MinerConfig, ""))


def short_flag(key: str) -> str:
    """The flag a setting has always had: its field name with dashes (--metrics-port, --max-k, --redis-url), the
    IVF's prefixed (--ivf-min-rows). Unique over MinerConfig (tests/unit/test_miner_config.py checks it)."""
    section, _, name = key.rpartition(".")
    return f"--{SHORT_PREFIX.get(section, '')}{name.replace('_', '-')}"


def build_parser() -> argparse.ArgumentParser:
    """`serve`'s flags are made from MinerConfig, as helip-train's are from TrainConfig: every setting as
    `--section.field` and its short name (`--search.max_k`, `--max-k`), with its default and meaning."""
    parser = argparse.ArgumentParser(
        prog="helip-miner", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="serve the Miner gRPC API and /metrics",
        description="Serve the Miner gRPC API and /metrics. " + __doc__.split("\n\n", 1)[1],
        usage="%(prog)s [--config FILE] [--section.field VALUE | --flag VALUE ...] [--set KEY=VALUE ...]",
        allow_abbrev=False,  # a misspelt flag is an error: --max-row must not quietly mean --max-rows
    )
    serve.add_argument("--config", help="YAML file of MinerConfig fields (nested 'search:', 'search.ivf:', ...)")
    serve.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any setting by its dotted name, e.g. --set search.max_k=64 (repeatable)",
    )
    serve.add_argument("--durable", action="store_true", help="use $REDIS_URL as the durable log")
    serve.add_argument("--shard", metavar="I/S", help="own the ids with shard_of(id) == I among S shards")
    serve.add_argument("--port-file", help="write the bound gRPC and metrics ports here (JSON) once serving")
    aliases = {s.key: (short_flag(s.key),) for section in sections() for s in section.settings}
    add_setting_flags(serve, sections(), aliases)
    return parser


def flag_errors(message: str) -> str:
    """An error that begins with a setting's dotted key ("search.max_k must be >= 1", "flags.port: cannot read")
    names the flag a user types as well: "--max-k (search.max_k) must be >= 1"."""
    match = re.match(r"(?:flags\.)?([a-z_]+(?:\.[a-z_]+)*)", message)
    keys = {s.key for section in sections() for s in section.settings}
    if not match or match.group(1) not in keys:
        return message
    key = match.group(1)
    return f"{short_flag(key)} ({key}){message[match.end() :]}"


def config_from_args(args: argparse.Namespace) -> MinerConfig:
    flags = given_settings(args, sections())
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE")
        flags[key] = value
    if args.durable and not flags.get("durability.redis_url"):
        flags["durability.redis_url"] = os.environ.get("REDIS_URL") or None
        if not flags["durability.redis_url"]:
            raise ValueError("--durable needs $REDIS_URL (or give --redis-url)")
    if args.shard:
        flags["durability.shard_index"], flags["durability.shard_count"] = parse_shard(args.shard)
    return load(args.config, os.environ, flags)


def check_readable(config: MinerConfig) -> None:
    """The security files exist and can be read, before anything starts (the contents are read by the server)."""
    for name in ("tls_cert_file", "tls_key_file", "tls_client_ca_file", "token_file"):
        path = getattr(config.security, name)
        if path and not os.access(path, os.R_OK):
            raise ValueError(f"security.{name}: cannot read {path}")


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
        check_readable(config)
    except (ValueError, TypeError, OSError) as error:
        parser.error(redact_url(flag_errors(str(error))))  # exit code 2
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
