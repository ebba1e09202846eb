"""helip-train's flags: every setting in --help with its meaning, open_clip_train's aliases, strict values."""

from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
import textwrap

import pytest

from helip.trainer.app import cli, config_docs
from helip.trainer.app.config import TrainConfig
from tests.conftest import ROOT


def real_settings(config=None, prefix: str = "") -> dict[str, object]:
    """{dotted key: default} of the imported config classes, nested sections flattened."""
    config = TrainConfig() if config is None else config
    found = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        key = f"{prefix}{field.name}"
        if dataclasses.is_dataclass(value):
            found.update(real_settings(value, key + "."))
        else:
            found[key] = value
    return found


def test_every_config_field_has_a_meaning_and_its_real_default():
    documented = config_docs.settings()
    real = real_settings()
    assert sorted(documented) == sorted(real)
    missing = [key for key, setting in documented.items() if not setting.help]
    assert not missing, f"give these fields a trailing `# one-line meaning` comment: {missing}"
    for key, setting in documented.items():
        try:
            written = ast.literal_eval(setting.default)
        except ValueError:  # a name or a call: shown as written, nothing to compare
            continue
        assert written == real[key], key


def test_help_lists_every_setting_with_its_default_and_meaning(monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # no wrapping inside a meaning
    text = " ".join(cli.build_parser().format_help().partition("options:")[2].split())
    for key, setting in config_docs.settings().items():
        flag_at = text.index(f"--{key} ")
        assert f"{setting.help} (default: {setting.default})" in text[flag_at : flag_at + 800], key
    assert "--steps INT" in text and "--epochs INT" in text and "--csv-separator TEXT" in text


def test_help_does_not_import_torch():
    code = "import sys, helip.trainer.app.cli as c; c.build_parser().format_help(); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert result.stdout.strip() == "False"


def test_meanings_come_from_trailing_comments_blocks_above_and_docstrings(tmp_path, monkeypatch):
    (tmp_path / "docs_probe_config.py").write_text(
        textwrap.dedent(
            '''
            from dataclasses import dataclass, field
            from docs_probe_other import OtherConfig

            @dataclass
            class ExtraConfig:
                """Extra things.

                documented: from the docstring. Not this sentence.
                both_a, both_b: one entry for two
                    fields, continued.
                """

                trailing: int = 3  # from the trailing comment. Not this sentence
                # From the block above,
                # over two lines.
                above: float = 0.5
                documented: str = "x"
                both_a: bool = True
                both_b: bool = False
                bare: int = 1  # noqa: E501

            @dataclass
            class TrainConfig:
                extra: ExtraConfig = field(default_factory=ExtraConfig)
                other: OtherConfig = field(default_factory=OtherConfig)
            '''
        )
    )
    (tmp_path / "docs_probe_other.py").write_text(
        "from dataclasses import dataclass\n\n\n@dataclass\n"
        "class OtherConfig:\n    new_field: str = ''  # added later\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import docs_probe_config

    sections = config_docs.read_section(docs_probe_config.TrainConfig, "")
    found = {s.key: s.help for section in sections for s in section.settings}
    assert found == {
        "extra.trailing": "from the trailing comment",
        "extra.above": "From the block above, over two lines",
        "extra.documented": "from the docstring",
        "extra.both_a": "one entry for two fields, continued",
        "extra.both_b": "one entry for two fields, continued",
        "extra.bare": "",
        "other.new_field": "added later",
    }
    defaults = {s.key: (s.default, s.kind) for section in sections for s in section.settings}
    assert defaults["extra.above"] == ("0.5", "float") and defaults["other.new_field"] == ("''", "str")
    assert [section.help for section in sections] == ["Extra things", ""]


# ---- aliases: parse -> config values --------------------------------------------------------------------------
BASE = ["--train-data", "train.csv"]


@pytest.mark.parametrize(
    ("flags", "key", "value"),
    [
        (["--workers", "0"], "data.workers", 0),
        (["--csv-img-key", "path"], "data.img_key", "path"),
        (["--csv-caption-key", "caption"], "data.caption_key", "caption"),
        (["--csv-separator", ","], "data.separator", ","),
        (["--csv-separator", "\\t"], "data.separator", "\t"),  # as typed in a shell: backslash, t
        (["--csv-separator", "\t"], "data.separator", "\t"),
        (["--warmup", "7"], "optim.warmup_steps", 7),
        (["--wd", "0.2"], "optim.weight_decay", 0.2),
        (["--epochs", "2"], "optim.epochs", 2),
        (["--grad-clip-norm", "0.5"], "optim.grad_clip", 0.5),
        (["--lr", "1e-5"], "optim.lr", 1e-5),
        (["--seed", "3"], "optim.seed", 3),
        (["--batch-size", "32"], "optim.batch_size", 32),
        (["--model", "ViT-B-32"], "model.name", "ViT-B-32"),
        (["--model", "ViT-B-32", "--pretrained", "openai"], "model.pretrained", "openai"),  # a tag: checked only
        (["--precision", "bf16"], "model.precision", "bf16"),
        (["--lock-image"], "model.lock_image", True),
        (["--lock-text", "false"], "model.lock_text", False),
        (["--lock-image", "--lock-image-unlocked-groups", "2"], "model.lock_image_unlocked_groups", 2),
        (["--grad-checkpointing"], "model.grad_checkpointing", True),
        (["--keep-checkpoints", "2"], "run.keep_checkpoints", 2),
        (["--resume", "latest"], "run.resume", "latest"),
        (["--local-loss"], "loss.local_loss", True),
        (["--gather-with-grad", "false"], "loss.gather_with_grad", False),
        (["--siglip"], "loss.kind", "siglip"),  # open_clip_train's switch for SigLIP's loss
        (["--siglip", "--loss.kind", "siglip"], "loss.kind", "siglip"),
        (["--loss.kind", "siglip"], "loss.kind", "siglip"),
        (["--siglip", "--loss-dist-impl", "gather"], "loss.dist_impl", "gather"),
        (["--log-every-n-steps", "5"], "run.log_every", 5),
        (["--report-to", "wandb,tensorboard"], "run.report_to", "wandb,tensorboard"),
        (["--report-to", ""], "run.report_to", ""),
        (["--wandb-project-name", "p"], "run.wandb_project", "p"),
        (["--wandb-notes", "n"], "run.wandb_notes", "n"),
        (["--optim.min_lr_ratio", "0.3"], "optim.min_lr_ratio", 0.3),
        (["--mining.k", "9"], "mining.k", 9),
        (["--run.progress", "false"], "run.progress", False),
    ],
)
def test_flag_sets_its_setting(flags, key, value):
    _, config = cli.parse_config([*BASE, *flags])
    section, name = key.split(".")
    assert getattr(getattr(config, section), name) == value


def test_flags_override_the_file_and_epochs_replace_its_steps(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  steps: 150\n  lr: 0.001\n")
    _, config = cli.parse_config(["--config", str(path), *BASE, "--epochs", "2", "--lr", "0.01"])
    assert (config.optim.epochs, config.optim.lr) == (2, 0.01)
    path.write_text("optim:\n  epochs: 3\n")
    _, config = cli.parse_config(["--config", str(path), *BASE, "--steps", "5"])
    assert (config.optim.steps, config.optim.epochs) == (5, 0)


def fails_naming(capsys, argv: list[str], *names: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_config(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    for name in names:
        assert name in err, err


@pytest.mark.parametrize(
    ("flags", "names"),
    [
        (["--steps", "10", "--epochs", "2"], ("optim.steps", "optim.epochs")),
        (["--lr", "fast"], ("optim.lr",)),
        (["--optim.epochs", "1.5"], ("optim.epochs",)),
        (["--epochs", "-1"], ("optim.epochs",)),
        (["--local-loss", "ture"], ("loss.local_loss",)),
        (["--csv-separator", ";;"], ("data.separator",)),
        (["--report-to", "tensorboard,mlflow"], ("run.report_to", "mlflow")),
        (["--run.log_every", "0"], ("run.log_every",)),
        (["--epoch", "2"], ("--epoch",)),  # no abbreviations
        (["--set", "optim.nope=1"], ("optim.nope",)),
        (["--loss.kind", "softmax"], ("loss.kind", "softmax")),
        (["--siglip", "--loss.kind", "clip"], ("--siglip", "loss.kind clip")),
        (["--siglip", "--set", "loss.kind=clip"], ("--siglip", "loss.kind clip")),
        (["--loss-dist-impl", "ring"], ("loss.dist_impl", "ring")),
    ],
)
def test_bad_values_exit_2_naming_the_setting(capsys, flags, names):
    fails_naming(capsys, [*BASE, *flags], *names)


def test_steps_for_epochs_follows_the_sampler():
    from helip.trainer.app.config import OptimConfig

    # 100 samples, 2 ranks x 8 anchors (batch 16, half hard pairs): 6 micro-steps an epoch.
    optim = OptimConfig(epochs=2, batch_size=16, hard_ratio=0.5)
    assert optim.steps_for(100, world_size=2, accumulation=1) == 12
    assert optim.steps_for(100, world_size=2, accumulation=3) == 4
    assert OptimConfig(steps=7).steps_for(100, world_size=2, accumulation=1) == 7
