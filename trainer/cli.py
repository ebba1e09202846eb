"""`helip-train`: fine-tune a CLIP with online hard pairs from a miner (one box by default).

    helip-train --config configs/demo.yaml [--miner HOST:PORT] [--steps N] [--set optim.lr=1e-4 ...]

Launch several ranks with `torchrun --nproc_per_node=N -m trainer.cli ...` or the `deepspeed` launcher.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

FLAGS = {  # flag -> dotted config key
    "--miner": "mining.address",
    "--train-data": "data.train",
    "--eval-dir": "data.eval_dir",
    "--model": "model.name",
    "--pretrained": "model.pretrained",
    "--precision": "model.precision",
    "--lock-image": "model.lock_image",
    "--lock-image-unlocked-groups": "model.lock_image_unlocked_groups",
    "--lock-image-freeze-bn-stats": "model.lock_image_freeze_bn_stats",
    "--lock-text": "model.lock_text",
    "--lock-text-unlocked-layers": "model.lock_text_unlocked_layers",
    "--lock-text-freeze-layer-norm": "model.lock_text_freeze_layer_norm",
    "--grad-checkpointing": "model.grad_checkpointing",
    "--steps": "optim.steps",
    "--batch-size": "optim.batch_size",
    "--hard-ratio": "optim.hard_ratio",
    "--lr": "optim.lr",
    "--seed": "optim.seed",
    "--margin": "loss.margin",
    "--hnml-weight": "loss.hnml_weight",
    "--output-dir": "run.output_dir",
    "--deepspeed-config": "run.deepspeed_config",
    "--resume": "run.resume",
    "--checkpoint-every": "run.checkpoint_every",
    "--keep-checkpoints": "run.keep_checkpoints",
    "--eval-every": "run.eval_every",
}
# Boolean flags that alone mean true (`--lock-image`); they still take a value (`--lock-image false`).
SWITCHES = {
    "--lock-image",
    "--lock-image-freeze-bn-stats",
    "--lock-text",
    "--lock-text-freeze-layer-norm",
    "--grad-checkpointing",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="helip-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", help="YAML file of TrainConfig sections (data, model, loss, mining, optim, run)")
    for flag, key in FLAGS.items():
        switch = {"nargs": "?", "const": "true"} if flag in SWITCHES else {}
        parser.add_argument(flag, dest=key, metavar=key.split(".")[-1].upper(), help=f"sets {key}", **switch)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any setting by its dotted name, e.g. --set mining.prefetch=4 (repeatable)",
    )
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # deepspeed launcher
    parser.add_argument("--log-level", default="INFO")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from trainer import config as train_config  # after --help, which should not wait for torch

    overrides = {key: getattr(args, key) for key in FLAGS.values()}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set {item!r}: expected KEY=VALUE")
        overrides[key] = value
    try:
        config = train_config.load(args.config, overrides)
        # Constructing these validates values early, with messages naming the field.
        from trainer.sampler import SamplerConfig  # noqa: F401

        if config.optim.steps < 1 or config.optim.batch_size < 2:
            raise ValueError("optim.steps must be >= 1 and optim.batch_size >= 2")
        if not 0 <= config.optim.hard_ratio < 1:
            raise ValueError(f"optim.hard_ratio must be in [0, 1), got {config.optim.hard_ratio}")
        if not (config.data.train or config.data.synth_dir):
            raise ValueError("data.train (--train-data) or data.synth_dir must be set")
        from trainer.model import check_model

        check_model(config.model)  # an unknown pretrained tag fails here, not after the data is prepared
    except (ValueError, OSError) as error:
        parser.error(str(error))
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from trainer.engine import Trainer
    from trainer.ledger import TooManyBadSamples

    # SIGTERM (an orchestrator stopping the pod) unwinds like Ctrl-C, so the local miner is stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    trainer = Trainer(config)
    try:
        result = trainer.train()
    except TooManyBadSamples as error:  # the data's fault, not the program's: no traceback
        logging.getLogger("helip-train").error("%s", error)
        return 1
    finally:
        trainer.close()
    if result.summary_json and result.final_checkpoint:
        print(f"checkpoint:  {result.final_checkpoint}")
        print(f"tensorboard: {result.tensorboard_dir}")
        print(f"eval:        {result.eval_json}")
        print(f"summary:     {result.summary_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
