"""Namespace names, data set fingerprints and the trainer's namespace settings (no processes)."""

from __future__ import annotations

import pytest

from helip.miner_service.core.errors import InvalidArgument
from helip.miner_service.service.namespaces import NamespaceRecord
from helip.miner_service.wire.names import validate_name
from helip.trainer.pairs.mining import MiningConfig
from helip.trainer.pairs.namespace import dataset_fingerprint, run_namespace
from helip.trainer.pairs.session import MiningSession


@pytest.mark.parametrize("name", ["a", "run-1", "Run.2_b", "9" * 64])
def test_good_names_pass(name):
    assert validate_name(name) == name


def test_empty_name_is_default():
    assert validate_name("") == "default"


@pytest.mark.parametrize("name", ["-a", ".a", "_a", "a/b", "a:b", "a b", "ü", "9" * 65])
def test_bad_names_name_the_field(name):
    with pytest.raises(InvalidArgument) as info:
        validate_name(name, "mining.namespace")
    assert info.value.field == "mining.namespace"


def test_record_round_trips():
    record = NamespaceRecord(32, "fp", "gen")
    assert NamespaceRecord.decode(record.encode()) == record


class Captions:
    def __init__(self, captions):
        self.captions = captions

    def __len__(self):
        return len(self.captions)

    def caption(self, i):
        return self.captions[i]


def test_fingerprint_changes_with_count_and_captions_and_is_stable():
    base = [f"caption {i}" for i in range(1000)]
    fingerprint = dataset_fingerprint(Captions(base))
    assert fingerprint.startswith("samples=1000;captions=")
    assert dataset_fingerprint(Captions(list(base))) == fingerprint
    assert dataset_fingerprint(Captions(base[:-1])) != fingerprint
    assert dataset_fingerprint(Captions(["other"] + base[1:])) != fingerprint  # the first caption is hashed
    assert dataset_fingerprint(Captions(base[:-1] + ["other"])) != fingerprint  # so is the last
    assert dataset_fingerprint(Captions([])) == dataset_fingerprint(Captions([]))


def test_run_namespace_is_a_valid_name(tmp_path):
    assert run_namespace(tmp_path / "my run#3") == "my-run-3"
    assert run_namespace(tmp_path / "__") == "run"
    validate_name(run_namespace(tmp_path / ("x" * 200)))


def test_mining_namespace_is_validated():
    assert MiningConfig(namespace="ok-1").namespace == "ok-1"
    with pytest.raises(ValueError, match="mining.namespace"):
        MiningConfig(namespace="not/ok")


def test_a_session_takes_its_client_namespace_and_refuses_another():
    class Client:
        namespace = "a"

        def close(self):
            pass

    assert MiningSession(MiningConfig(), Client()).namespace == "a"  # unset: the client decides
    assert MiningSession(MiningConfig(namespace="a"), Client()).namespace == "a"
    with pytest.raises(ValueError, match="'b'"):
        MiningSession(MiningConfig(namespace="b"), Client())


def test_a_session_without_an_address_or_client_says_so():
    with pytest.raises(ValueError, match="mining.address"):
        MiningSession(MiningConfig(address=""))
