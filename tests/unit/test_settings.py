import pytest

from helip.miner_service.service import config as miner_config
from helip.miner_service.service.config import MinerConfig
from helip.trainer.app import config as train_config
from helip.trainer.pairs.mining_config import MiningConfig


def test_miner_config_layers_file_environment_flags(tmp_path):
    path = tmp_path / "miner.yaml"
    path.write_text("dim: 64\nsearch:\n  max_k: 32\n  ivf:\n    nprobe: 8\n")
    environ = {
        "HELIP_MINER_PORT": "7000",
        "HELIP_MINER_SEARCH__DEVICE": "cpu",
        "HELIP_MINER_DURABILITY__FOLLOW": "true",
        "OTHER": "x",
    }
    config = miner_config.load(path, environ, {"port": 7001, "search.ivf.min_rows": "5", "host": None})
    assert (config.dim, config.port, config.host) == (64, 7001, "127.0.0.1")
    assert (config.search.max_k, config.search.device, config.search.ivf.nprobe, config.search.ivf.min_rows) == (
        32,
        "cpu",
        8,
        5,
    )
    assert config.durability.follow is True
    assert MinerConfig().port == 50051  # defaults untouched (frozen copies)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"search.nosuch": 1}, "flags.search.nosuch: unknown setting"),
        ({"port": "eighty"}, "flags.port: cannot read 'eighty' as int"),
        ({"search": 3}, "flags.search: expected a mapping"),
    ],
)
def test_miner_config_errors_name_the_key(overrides, message):
    with pytest.raises(ValueError, match=message):
        miner_config.load(None, {}, overrides)


def test_trainer_config_file_and_overrides(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("optim:\n  lr: 1\n  steps: 5\nmodel:\n  pretrained: null\n")
    config = train_config.load(
        str(path),
        {"optim.hard_ratio": "0.25", "mining.update_index": "false", "model.pretrained": "ckpt.pt", "run.resume": None},
    )
    assert config.optim.lr == 1.0 and isinstance(config.optim.lr, float)
    assert (config.optim.steps, config.optim.hard_ratio, config.mining.update_index) == (5, 0.25, False)
    assert config.model.pretrained == "ckpt.pt" and config.run.resume == ""
    with pytest.raises(ValueError, match="flags.optim.nosuch: unknown setting"):
        train_config.load(None, {"optim.nosuch": 1})


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"run.progress": "ture"}, r"flags.run.progress: expected a boolean .* got 'ture'"),
        ({"run.progress": 2}, "flags.run.progress: expected a boolean"),
        ({"optim.steps": 1.5}, "flags.optim.steps: expected int, got float 1.5"),
        ({"optim.steps": True}, "flags.optim.steps: expected int, got bool"),
        ({"optim.lr": "fast"}, "flags.optim.lr: cannot read 'fast' as float"),
        ({"model.name": 7}, "flags.model.name: expected text, got int 7"),
    ],
)
def test_settings_of_the_wrong_type_are_refused_by_name(overrides, message):
    with pytest.raises(ValueError, match=message):
        train_config.load(None, overrides)


def test_a_yaml_value_of_the_wrong_type_names_its_key(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("optim:\n  steps: 2.5\n")
    with pytest.raises(ValueError, match="train.yaml.optim.steps: expected int, got float 2.5"):
        train_config.load(str(path), {})
    path.write_text("run:\n  progress: maybe\n")
    with pytest.raises(ValueError, match="train.yaml.run.progress: expected a boolean"):
        train_config.load(str(path), {})
    for word, expected in (("yes", True), ("No", False), ("1", True), ("off", False)):
        assert train_config.load(None, {"run.progress": word}).run.progress is expected


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"max_similarity": -0.1}, r"mining.max_similarity must be a finite value >= 0 .* got -0.1"),
        ({"max_similarity": float("nan")}, "mining.max_similarity must be a finite value >= 0"),
        ({"max_similarity": float("inf")}, "mining.max_similarity must be a finite value >= 0"),
        ({"positive_ratio": 1.5}, "mining.positive_ratio must be in"),
        ({"prefetch": -1}, "mining.prefetch must be >= 0"),
        ({"k": 0}, "mining.k must be >= 1"),
    ],
)
def test_mining_settings_out_of_range_are_refused_by_name(settings, message):
    with pytest.raises(ValueError, match=message):
        MiningConfig(**settings)


def test_a_cut_of_one_or_more_is_no_cut_and_is_taken():
    assert MiningConfig(max_similarity=1.0).max_similarity == 1.0
