"""`helip-train`: fine-tune a CLIP with online hard pairs from a miner (one box by default).

    helip-train --config configs/demo.yaml [--miner HOST:PORT] [--steps N | --epochs N] [--optim.lr 1e-4 ...]

Settings come from their defaults, then the --config file, then flags: every setting has a `--section.field`
flag (listed below by section, as in the YAML file), the common ones a short alias, and `--set section.field=VALUE`
sets any of them too. open_clip_train's flags of the same meaning are accepted (--workers, --csv-img-key,
--csv-caption-key, --csv-separator, --warmup, --wd, --epochs, --grad-clip-norm, --local-loss, --gather-with-grad,
--siglip, --loss-dist-impl, --log-every-n-steps, --report-to, --wandb-project-name, --wandb-notes, --lr, --seed, ...).

Launch several ranks with `torchrun --nproc_per_node=N -m helip.trainer.app.cli ...` or the `deepspeed` launcher.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from helip.miner_service.core.settings_docs import add_setting_flags, given_settings
from helip.trainer.app import config_docs

if TYPE_CHECKING:
    from helip.trainer.app.config import DataConfig

# Short flags, and open_clip_train's flags where helip's setting means the same thing, beside `--section.field`.
ALIASES = {
    "mining.address": ("--miner",),
    "data.train": ("--train-data",),
    "data.eval_dir": ("--eval-dir",),
    "data.zeroshot_dir": ("--zeroshot-dir",),
    "data.zeroshot_classnames": ("--zeroshot-classnames",),
    "data.zeroshot_templates": ("--zeroshot-templates",),
    "data.retrieval_data": ("--retrieval-data",),
    "data.workers": ("--workers",),
    "data.img_key": ("--csv-img-key",),
    "data.caption_key": ("--csv-caption-key",),
    "data.separator": ("--csv-separator",),
    "model.name": ("--model",),
    "model.pretrained": ("--pretrained",),
    "model.precision": ("--precision",),
    "model.lock_image": ("--lock-image",),
    "model.lock_image_unlocked_groups": ("--lock-image-unlocked-groups",),
    "model.lock_image_freeze_bn_stats": ("--lock-image-freeze-bn-stats",),
    "model.lock_text": ("--lock-text",),
    "model.lock_text_unlocked_layers": ("--lock-text-unlocked-layers",),
    "model.lock_text_freeze_layer_norm": ("--lock-text-freeze-layer-norm",),
    "model.grad_checkpointing": ("--grad-checkpointing",),
    "loss.margin": ("--margin",),
    "loss.hnml_weight": ("--hnml-weight",),
    "loss.local_loss": ("--local-loss",),
    "loss.gather_with_grad": ("--gather-with-grad",),
    "loss.dist_impl": ("--loss-dist-impl",),
    "optim.steps": ("--steps",),
    "optim.epochs": ("--epochs",),
    "optim.batch_size": ("--batch-size",),
    "optim.hard_ratio": ("--hard-ratio",),
    "optim.lr": ("--lr",),
    "optim.weight_decay": ("--wd",),
    "optim.warmup_steps": ("--warmup",),
    "optim.grad_clip": ("--grad-clip-norm",),
    "optim.seed": ("--seed",),
    "run.output_dir": ("--output-dir",),
    "run.deepspeed_config": ("--deepspeed-config",),
    "run.resume": ("--resume",),
    "run.checkpoint_every": ("--checkpoint-every",),
    "run.keep_checkpoints": ("--keep-checkpoints",),
    "run.eval_every": ("--eval-every",),
    "run.zeroshot_frequency": ("--zeroshot-frequency",),
    "run.log_every": ("--log-every-n-steps",),
    "run.report_to": ("--report-to",),
    "run.wandb_project": ("--wandb-project-name",),
    "run.wandb_notes": ("--wandb-notes",),
}


def build_parser() -> argparse.ArgumentParser:
    """Every setting as `--section.field VALUE` (grouped by section, with its default and meaning), plus the
    aliases above. Values stay text here: `helip.trainer.app.config.load` reads them strictly, naming the key."""
    parser = argparse.ArgumentParser(
        prog="helip-train",
        usage="%(prog)s [--config FILE] [--section.field VALUE | --alias VALUE ...] [--set KEY=VALUE ...]",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # a misspelt flag is an error: --epoch must not quietly mean --epochs
    )
    parser.add_argument("--config", help="YAML file of TrainConfig sections (data, model, loss, mining, optim, run)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any setting by its dotted name, e.g. --set mining.prefetch=4 (repeatable)",
    )
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR (default: INFO)")
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # deepspeed launcher
    # open_clip_train's switch for the sigmoid loss. Not an alias in ALIASES: an alias passes its value to its
    # setting, and this bool switch stands for a text value (loss.kind siglip).
    parser.add_argument(
        "--siglip", action="store_true", help="open_clip_train's switch for SigLIP's loss: sets loss.kind to siglip"
    )
    add_setting_flags(parser, config_docs.sections(), ALIASES)
    return parser


def parse_config(argv: list[str] | None = None):
    """(args, TrainConfig) from the command line; a bad value exits with status 2 and a message naming it."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from helip.trainer.app import config as train_config  # after --help, which should not wait for torch
    from helip.trainer.app.reporting import check_reporters

    overrides = given_settings(args, config_docs.sections())
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set {item!r}: expected KEY=VALUE")
        overrides[key] = value
    if args.siglip:
        if overrides.get("loss.kind") not in (None, "siglip"):
            parser.error(f"--siglip means loss.kind siglip, but loss.kind {overrides['loss.kind']} is given too")
        overrides["loss.kind"] = "siglip"
    try:
        config = train_config.load(args.config, overrides)
        if not (config.data.train or config.data.synth_dir):
            raise ValueError("data.train (--train-data) or data.synth_dir must be set")
        check_reporters(config.run.reporters)
        from helip.trainer.tools.eval import check_data_sources

        check_data_sources(config.data)  # bad evaluation data fails now, not after training
        from helip.trainer.tools.model import check_model

        check_model(config.model)  # an unknown pretrained tag fails here, not after the data is prepared
        check_synth_dir(config.data)
    except (ValueError, OSError) as error:
        parser.error(str(error))
    return args, config


def check_synth_dir(data: DataConfig) -> None:
    """A synth_dir that already holds another family's set fails now: the run would train on the wrong data."""
    if data.synth_dir and not data.train:
        from helip.trainer.tools.synth import check_family

        try:
            check_family(data.synth_dir, data.synth_family)
        except ValueError as error:
            raise ValueError(f"data.synth_dir, data.synth_family: {error}") from None


def prepare_synth_data(data: DataConfig, local_rank: int) -> None:
    """data.synth_dir without data.train: generate the synthetic set there (once per host) and train on it."""
    if data.synth_dir and not data.train:
        import torch.distributed as dist

        from helip.trainer.tools.synth import SynthConfig, ensure_generated

        root = Path(data.synth_dir)
        if local_rank == 0:
            ensure_generated(
                SynthConfig(
                    out_dir=root,
                    train_size=data.synth_train,
                    test_size=data.synth_test,
                    seed=data.synth_seed,
                    family=data.synth_family,
                )
            )
        dist.barrier()
        data.train = str(root / "train.csv")
        data.eval_dir = data.eval_dir or str(root)


def main(argv: list[str] | None = None) -> int:
    args, config = parse_config(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from helip.trainer.app.engine import Trainer, setup_distributed
    from helip.trainer.pairs.ledger import TooManyBadSamples
    from helip.trainer.pairs.namespace import NamespaceMismatch
    from helip.trainer.pairs.refusals import MinerRefused

    # SIGTERM (an orchestrator stopping the pod) unwinds like Ctrl-C, so the local miner is stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    _, _, local_rank = setup_distributed()
    prepare_synth_data(config.data, local_rank)
    try:
        trainer = Trainer(config)
    except (NamespaceMismatch, MinerRefused) as error:  # a setting the user must change: no traceback
        logging.getLogger("helip-train").error("%s", error)
        return 1
    try:
        result = trainer.train()
    except (TooManyBadSamples, MinerRefused) as error:  # the data's or a setting's fault: no traceback
        logging.getLogger("helip-train").error("%s", error)
        return 1
    finally:
        trainer.close()
    if result.summary_json and result.final_checkpoint:
        print(f"checkpoint:  {result.final_checkpoint}")
        if "tensorboard" in config.run.reporters:
            print(f"tensorboard: {result.tensorboard_dir}")
        print(f"eval:        {result.eval_json}")
        print(f"summary:     {result.summary_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
