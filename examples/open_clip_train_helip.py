"""open_clip's own training script (`open_clip_train.main`) with HELIP's online hard pairs plugged in.

Runs open_clip_train's real `main()` unchanged, after three small patches (each explained where it is made):

1. `open_clip_train.data.get_csv_dataset` (train split only): the CSV training set becomes a DataLoader fed by
   helip's HardPairSampler: each batch holds this rank's anchors and, next to each, a hard pair the miner found.
   Its batches unpack as `images, texts` like open_clip's; the sample ids and the (anchor, hard pair) couples of
   the batch being trained are kept aside for the loss.
2. `open_clip_train.main.create_loss`: open_clip's ClipLoss (or, with --siglip, its SigLipLoss) becomes helip's
   HelipLoss (the same contrastive loss, plus the margin loss on the batch's couples), which also pushes the batch's
   embeddings to the miner.
3. `DataInfo.set_epoch`: open_clip only forwards the epoch to a DistributedSampler; ours gets it too.

Options of this script start with --helip-; everything else is passed to open_clip_train as is. CSV training
data only (--dataset-type csv, or auto with a .csv/.tsv path); --accum-freq 1; the CLIP or the SigLIP loss
(--siglip; no CoCa or distillation). The run's rows go to their own miner namespace (--helip-namespace; default
open_clip's --name, else the training file's name), which refuses a data set other than the one it holds
(--helip-reset-namespace drops it).
Start a miner first, with --dim = the model's embed_dim (helip-tiny: 64):

    helip-miner serve --dim 64 --port 50051 &
    python examples/open_clip_train_helip.py --helip-miner 127.0.0.1:50051 \\
        --train-data data/train.csv --dataset-type csv --csv-separator $'\\t' \\
        --csv-img-key filepath --csv-caption-key title --model helip-tiny --precision fp32 \\
        --epochs 1 --batch-size 16 --workers 1 --warmup 2 --logs logs --report-to ''
"""

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

import open_clip
import torch

try:
    import open_clip_train.data
    import open_clip_train.main
    from open_clip_train.data import DataInfo
except ImportError as error:  # open_clip_train's data module needs pandas: open_clip_torch[training] brings it
    raise SystemExit(
        f"open_clip_train cannot be imported ({error}): pip install 'open_clip_torch[training]'"
    ) from error

from helip import (
    CsvPairs,
    HardPairSampler,
    HelipLoss,
    LossConfig,
    MiningConfig,
    MiningSession,
    NamespaceMismatch,
    run_namespace,
)

log = logging.getLogger("helip")
MODEL_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "models"  # helip-tiny.json lives here


class HardPairDataInfo(DataInfo):
    def set_epoch(self, epoch):
        # Patch 3: open_clip's DataInfo.set_epoch only reaches a DistributedSampler; the hard-pair sampler draws a
        # new anchor permutation per epoch, so it needs the epoch as well (train_one_epoch calls this first).
        self.sampler.set_epoch(epoch)


class HardPairBatches:
    """What open_clip's train_one_epoch iterates: (images, texts) per batch, plus `num_batches`/`num_samples`.

    While open_clip trains on a batch, `current` holds that batch's ids and layout (couples, hard counts): the
    loop runs the model and the loss on one batch before it asks for the next, so the loss reads them here.
    """

    def __init__(self, loader, sampler: HardPairSampler, log_every: int):
        self.loader, self.sampler, self.log_every = loader, sampler, log_every
        self.num_batches = len(sampler)  # steps per epoch (per rank)
        self.num_samples = self.num_batches * sampler.batch_size * sampler.anchors.config.world_size
        self.current = None

    def __len__(self):
        return self.num_batches

    def __iter__(self):
        hard = slots = n = 0
        for i, batch in enumerate(self.loader):
            layout = batch.layout
            self.current = (batch.ids, layout)
            hard, slots, n = hard + layout.n_hard, slots + layout.n_slots, n + 1
            if i % self.log_every == 0 or i + 1 == self.num_batches:
                log.info(
                    "helip step %d: hard fraction %.3f (%d hard, %d fallback)",
                    layout.step,
                    layout.hard_fraction,
                    layout.n_hard,
                    layout.n_fallback,
                )
            yield batch.images, batch.tokens
        self.current = None
        log.info(
            "helip epoch %d: hard fraction %.3f over %d batches; mining %s",
            self.sampler.epoch,
            hard / max(slots, 1),
            n,
            self.sampler.counters.snapshot(),
        )


class HelipOpenClipLoss(torch.nn.Module):
    """Called by train_one_epoch as `loss(**model_out, output_dict=True)`: image_features, text_features,
    logit_scale, and logit_bias when the model has one (open_clip_train builds it for --siglip); returns named terms
    that open_clip sums into the loss it backpropagates (and logs each of)."""

    def __init__(self, batches: HardPairBatches, session: MiningSession, config: LossConfig, rank, world_size):
        super().__init__()
        self.batches, self.session, self.config = batches, session, config
        self.helip = HelipLoss(config, rank=rank, world_size=world_size)

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict=False, **unused):
        ids, layout = self.batches.current
        losses = self.helip(image_features, text_features, logit_scale, layout.couples, logit_bias=logit_bias)
        # The embeddings open_clip computed anyway go to the miner (a background thread sends them).
        self.session.push(ids, image_features, text_features, layout.step)
        terms = {"contrastive_loss": losses["contrastive"], "hnml_loss": self.config.hnml_weight * losses["hnml"]}
        return terms if output_dict else sum(terms.values())


class HelipPlugin:
    def __init__(self, mining: MiningConfig, hard_ratio: float, loss_config: LossConfig):
        self.mining = mining
        self.hard_ratio, self.loss_config = hard_ratio, loss_config
        self.session = self.sampler = self.batches = None

    def install(self) -> None:
        original_csv_dataset = open_clip_train.data.get_csv_dataset

        def get_csv_dataset(args, preprocess_fn, is_train, epoch=0, tokenizer=None):
            # Patch 1: open_clip_train.data.get_data looks this function up by name for a CSV data set; the
            # training split gets the hard-pair loader, a validation split stays open_clip's.
            if not is_train:
                return original_csv_dataset(args, preprocess_fn, is_train, epoch=epoch, tokenizer=tokenizer)
            return self.train_data(args, preprocess_fn, epoch, tokenizer)

        def create_loss(args):
            # Patch 2: main() builds its loss with this name (imported from open_clip); ours reads the couples of
            # the batch in training and pushes its embeddings. Only the configurations it can serve pass.
            if self.batches is None:
                raise SystemExit(
                    "helip example: needs CSV training data (--dataset-type csv, or auto with a .csv/.tsv --train-data)"
                )
            if args.accum_freq != 1 or args.distill or "coca" in args.model.lower():
                raise SystemExit(
                    "helip example: needs --accum-freq 1 and the CLIP or SigLIP loss (no CoCa, distillation): the "
                    "couples and ids belong to one batch"
                )
            # open_clip's own choice of loss: SigLipLoss for --siglip (main() built the model with its logit_bias),
            # reaching other ranks as --loss-dist-impl says.
            config = dataclasses.replace(
                self.loss_config,
                kind="siglip" if args.siglip else "clip",
                dist_impl=getattr(args, "loss_dist_impl", None) or self.loss_config.dist_impl,
            )
            return HelipOpenClipLoss(self.batches, self.session, config, args.rank, args.world_size)

        open_clip_train.data.get_csv_dataset = get_csv_dataset
        open_clip_train.main.create_loss = create_loss

    def train_data(self, args, preprocess_fn, epoch, tokenizer) -> DataInfo:
        # The same CSV open_clip would read (image paths may also be relative to the CSV's directory); a sample is
        # (id, image, tokens), the id being its row, which is what the miner stores.
        dataset = CsvPairs(
            args.train_data,
            preprocess_fn,
            tokenizer,
            img_key=args.csv_img_key,
            caption_key=args.csv_caption_key,
            sep=args.csv_separator,
        )
        self.session = self.start_session(args, dataset)
        loader = self.session.loader(
            dataset,
            args.batch_size,
            hard_ratio=self.hard_ratio,
            rank=args.rank,
            world_size=args.world_size,
            seed=args.seed,
            num_workers=args.workers,
        )
        self.sampler = loader.batch_sampler
        self.sampler.set_epoch(epoch)
        self.batches = HardPairBatches(loader, self.sampler, args.log_every_n_steps)
        log.info(
            "helip: %d training pairs from %s; batches of %d rows, %.0f%% hard pairs",
            len(dataset),
            args.train_data,
            args.batch_size,
            100 * self.hard_ratio,
        )
        return HardPairDataInfo(self.batches, self.sampler)

    def start_session(self, args, dataset) -> MiningSession:
        # The run's rows go to their own namespace, tagged with the data set's fingerprint: a namespace holding
        # another data set's rows is refused (ids would name other samples), as helip-train does. Rank 0 creates
        # or resets it; the others wait for that, then check it.
        dim = (open_clip.get_model_config(args.model) or {}).get("embed_dim", 0)
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        session = MiningSession(self.mining, reset_namespace=self.mining.reset_namespace and args.rank == 0)
        try:
            if args.rank == 0:
                session.start(dim, dataset)
            if distributed:
                torch.distributed.barrier()
            if args.rank != 0:
                session.start(dim, dataset)
        except NamespaceMismatch as error:
            session.close()
            raise SystemExit(f"helip example: {error} (flags: --helip-reset-namespace, --helip-namespace)") from None
        return session

    def close(self) -> None:
        if self.session is not None:
            self.session.close()  # stops mining, waits for the last pushes


def default_namespace(open_clip_args: list[str]) -> str:
    """open_clip's --name when given (a run's name), else the stem of its --train-data file."""
    peek = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    peek.add_argument("--name")
    peek.add_argument("--train-data")
    known, _ = peek.parse_known_args(open_clip_args)
    return run_namespace(known.name or Path(known.train_data or "open-clip").stem)


def main(argv=None) -> int:
    # allow_abbrev=False: open_clip's options (--model, ...) must never be taken for abbreviations of ours.
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        allow_abbrev=False,
        epilog="Other options go to open_clip_train: python -m open_clip_train.main -h",
    )
    parser.add_argument(
        "--helip-miner",
        required=True,
        metavar="HOST:PORT",
        help="a running `helip-miner serve --dim <model embed_dim>`",
    )
    parser.add_argument("--helip-hard-ratio", type=float, default=0.5, help="share of each batch that is hard pairs")
    parser.add_argument(
        "--helip-positive-ratio",
        type=float,
        default=0.0,
        help="the miner's false-negative guard: drop a hard pair whose caption fits the anchor's image at this "
        "fraction of the anchor's own pair, e.g. 0.9 (default 0: off)",
    )
    parser.add_argument("--helip-margin", type=float, default=0.2, help="margin of the hard-pair margin loss")
    parser.add_argument(
        "--helip-hnml-weight", type=float, default=0.0, help="weight of the margin loss (default 0: off)"
    )
    parser.add_argument(
        "--helip-model-config",
        default=str(MODEL_CONFIGS),
        metavar="PATH",
        help="a JSON open_clip model config, or a directory of them, to register (then pass "
        "--model <file stem>); default: this repository's configs/models",
    )
    parser.add_argument(
        "--helip-namespace",
        default="",
        metavar="NAME",
        help="miner namespace of this run's rows (default: open_clip's --name, else the training file's name)",
    )
    parser.add_argument(
        "--helip-reset-namespace",
        action="store_true",
        help="drop the namespace's rows first when it holds another data set (else such a run is refused)",
    )
    helip_args, open_clip_args = parser.parse_known_args(argv)
    namespace = helip_args.helip_namespace or default_namespace(open_clip_args)
    try:
        mining = MiningConfig(
            address=helip_args.helip_miner,
            namespace=namespace,
            reset_namespace=helip_args.helip_reset_namespace,
            positive_ratio=helip_args.helip_positive_ratio,
        )
    except ValueError as error:  # it names the setting ("mining.positive_ratio must be ..."): name our flag too
        setting = str(error).split()[0].rstrip(":").removeprefix("mining.")
        parser.error(f"--helip-{setting.replace('_', '-')}: {error}")

    open_clip.add_model_config(helip_args.helip_model_config)
    plugin = HelipPlugin(
        mining,
        helip_args.helip_hard_ratio,
        LossConfig(margin=helip_args.helip_margin, hnml_weight=helip_args.helip_hnml_weight),
    )
    plugin.install()
    try:
        result = open_clip_train.main.main(open_clip_args)
    finally:
        plugin.close()
    return 0 if result is None else 1  # main() returns -1 when it refuses to start (it prints why)


if __name__ == "__main__":  # needed: DataLoader workers start from a forkserver, which imports this file
    sys.exit(main())
