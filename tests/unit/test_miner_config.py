"""helip-miner's flags are made from MinerConfig, and MinerConfig checks itself, naming the dotted field."""

from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys

import pytest

from helip.miner_service.core.config import IvfConfig, SearchConfig
from helip.miner_service.service import cli
from helip.miner_service.service.config import DurabilityConfig, MinerConfig
from helip.miner_service.wire.security import SecurityConfig
from tests.conftest import ROOT

# Every flag helip-miner has ever had: deploy manifests, docs and users' scripts spell them so.
HISTORIC_FLAGS = (
    "--host --port --metrics-port --metrics-host --dim --max-rows --max-total-rows --max-namespaces "
    "--max-namespace-dim --workers --device --storage-dtype --max-k --store-block-rows --mine-scratch-bytes "
    "--scratch-budget-bytes --mine-queue-limit --topk-segment --ivf-min-rows --ivf-nprobe --redis-url --key-prefix "
    "--snapshot-dir --snapshot-interval-s --tls-cert-file --tls-key-file --tls-client-ca-file --token-file "
    "--log-level"
).split()


def flat_defaults(config, prefix: str = "") -> dict[str, object]:
    found = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(value):
            found.update(flat_defaults(value, f"{prefix}{field.name}."))
        else:
            found[f"{prefix}{field.name}"] = value
    return found


def test_every_setting_is_a_flag_with_its_meaning_and_real_default():
    settings = {s.key: s for section in cli.sections() for s in section.settings}
    real = flat_defaults(MinerConfig())
    assert sorted(settings) == sorted(real)
    assert not [key for key, s in settings.items() if not s.help], "give each field a `# meaning` comment"
    for key, setting in settings.items():
        try:
            assert ast.literal_eval(setting.default) == real[key], key
        except ValueError:  # a name: shown as written
            pass
    short = [cli.short_flag(key) for key in settings]
    assert len(set(short)) == len(short), "two settings share a short flag"


def test_historic_flags_and_dotted_flags_set_the_same_field():
    parser = cli.build_parser()
    for flag in HISTORIC_FLAGS:
        assert parser.parse_args(["serve", flag, "1"]) is not None
    dotted = cli.config_from_args(parser.parse_args(["serve", "--search.max_k", "64", "--search.ivf.nprobe", "4"]))
    short = cli.config_from_args(parser.parse_args(["serve", "--max-k", "64", "--ivf-nprobe", "4"]))
    by_set = cli.config_from_args(
        parser.parse_args(["serve", "--set", "search.max_k=64", "--set", "search.ivf.nprobe=4"])
    )
    assert dotted == short == by_set
    assert (short.search.max_k, short.search.ivf.nprobe) == (64, 4)
    follower = cli.config_from_args(parser.parse_args(["serve", "--follow", "--shard", "1/3"]))
    assert follower.durability.follow and (follower.durability.shard_index, follower.durability.shard_count) == (1, 3)


def test_sources_are_checked_together_not_one_by_one(tmp_path, monkeypatch):
    """A Redis log needs a snapshot directory: given by a file and a flag, the pair is whole, so no source alone is
    judged against the defaults of the others."""
    path = tmp_path / "miner.yaml"
    path.write_text("durability:\n  redis_url: redis://127.0.0.1:6379/0\n")
    monkeypatch.setenv("HELIP_MINER_SEARCH__MAX_K", "8")
    args = cli.build_parser().parse_args(["serve", "--config", str(path), "--snapshot-dir", str(tmp_path)])
    config = cli.config_from_args(args)
    assert config.durability.snapshot_dir == str(tmp_path) and config.search.max_k == 8


@pytest.mark.parametrize(
    "build, field",
    [
        (lambda: MinerConfig(dim=0), "dim"),
        (lambda: MinerConfig(port=65536), "port"),
        (lambda: MinerConfig(metrics_port=-2), "metrics_port"),
        (lambda: MinerConfig(workers=0), "workers"),
        (lambda: MinerConfig(max_rows=-1), "max_rows"),
        (lambda: MinerConfig(log_level="LOUD"), "log_level"),
        (lambda: SearchConfig(storage_dtype="int8"), "search.storage_dtype"),
        (lambda: SearchConfig(topk="fast"), "search.topk"),
        (lambda: SearchConfig(max_k=0), "search.max_k"),
        (lambda: IvfConfig(nprobe=0), "search.ivf.nprobe"),
        (lambda: IvfConfig(rebuild_fraction=0.0), "search.ivf.rebuild_fraction"),
        (lambda: DurabilityConfig(shard_index=3, shard_count=3), "durability.shard_index"),
        (lambda: DurabilityConfig(keep_snapshots=0), "durability.keep_snapshots"),
        (lambda: DurabilityConfig(redis_url="redis://x:1/0"), "durability.snapshot_dir"),
        (lambda: SecurityConfig(tls_cert_file="cert.pem"), "security.tls_cert_file"),
        (lambda: SecurityConfig(tls_client_ca_file="ca.pem"), "security.tls_client_ca_file"),
    ],
)
def test_a_config_built_in_code_is_checked_naming_the_field(build, field):
    with pytest.raises(ValueError) as refused:
        build()
    assert str(refused.value).startswith(f"{field} "), refused.value


def test_a_follower_needs_no_snapshot_directory():
    assert DurabilityConfig(redis_url="redis://x:1/0", follow=True).follow


@pytest.mark.parametrize(
    "args, named",
    [
        (["--max-k", "0"], "--max-k (search.max_k) must be >= 1, got 0"),
        (["--max-k", "many"], "--max-k (search.max_k): cannot read 'many' as int"),
        (["--search.max_k", "0"], "--max-k (search.max_k) must be >= 1"),
        (["--port", "70000"], "--port (port) must be in 0..65535"),
        (["--redis-url", "redis://u:s3cret@127.0.0.1:1/0"], "--snapshot-dir (durability.snapshot_dir) is required"),
        (["--follow", "maybe"], "--follow (durability.follow): expected a boolean"),
        (["--set", "search.nosuch=1"], "flags.search.nosuch: unknown setting"),
        (["--max-row", "1"], "unrecognized arguments: --max-row"),
    ],
)
def test_the_cli_exits_2_naming_the_flag(args, named):
    result = subprocess.run(
        [sys.executable, "-m", "helip.miner_service.service.cli", "serve", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert named in result.stderr
    assert "s3cret" not in result.stderr and "Traceback" not in result.stderr
