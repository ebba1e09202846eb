"""Online hard pairs in a Hugging Face `transformers.Trainer`, for CLIPModel or SiglipModel.

What a Trainer user changes (the optional extra: `pip install 'helip[hf]'`):

    dataset = helip.raw_pairs("train.csv")  # dataset[i] -> (i, PIL image, caption); or .tar shards
    session = helip.MiningSession(address="miner:50051", namespace="my-run").start(dim=512, dataset=dataset)
    trainer = helip.HardPairTrainer(                     # in place of transformers.Trainer
        session=session, model=model, args=training_args, train_dataset=dataset, processing_class=processor
    )
    trainer.train()                                      # resume_from_checkpoint=... as usual
    session.close()

`HardPairTrainer` is a `transformers.Trainer` with three methods of its own:
- `get_train_dataloader`: the session's hard-pair DataLoader (a HardPairSampler in this process, the processor run
  per batch in the DataLoader's workers), sized by the Trainer's arguments: per-device batch size (anchors + hard
  pairs), `dataloader_num_workers`, `seed` (or `data_seed`), `gradient_accumulation_steps` and `max_steps` (a step
  of the sampler is one micro-batch), or `num_train_epochs` when `max_steps` is not set.
- `compute_loss`: HelipLoss from the model's `image_embeds`, `text_embeds`, `logit_scale` (and `logit_bias`):
  CLIP's softmax loss for a model without a bias, SigLIP's sigmoid loss for one with it (`LossConfig.kind` follows
  the model), both across ranks as open_clip's; plus λ x HNML on the batch's (anchor, hard pair) couples
  (`LossConfig.hnml_weight`, 0 by default).
- after each optimizer step (a callback), that step's embeddings go to the miner in the background
  (`session.push`); nothing waits for the miner.

Resume: the Trainer resumes mid-epoch by iterating its DataLoader and dropping the batches already trained
(accelerate's `skip_first_batches`). Here the sampler starts at the checkpoint's step instead (so it neither mines
for nor composes those batches), and hands the Trainer's skip empty placeholders to drop: nothing is skipped twice,
and nothing is loaded for the steps before the checkpoint.

The embeddings pushed under step s are those of the sampler's step s (one micro-batch), as in a plain loop.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, Sampler

from helip.trainer.pairs.data import BadSample, open_pairs
from helip.trainer.pairs.hard_pairs import BatchLayout, HardPairSampler, LayoutCarrier, worker_options
from helip.trainer.pairs.loss_config import LossConfig
from helip.trainer.pairs.losses import HelipLoss
from helip.trainer.pairs.session import MiningSession

try:
    import transformers
except ImportError as error:  # the optional extra
    raise ImportError(
        "helip's Hugging Face Trainer integration needs transformers and accelerate: pip install 'helip[hf]'"
    ) from error

log = logging.getLogger(__name__)

ROWS_KEY = "helip"  # the key of HardPairRows among a batch's model inputs


# ---- data: raw pairs in, the processor's inputs out ------------------------------------------------------------
def keep_image(image):
    """A PairDataset transform that leaves the PIL image to the processor (run per batch by HardPairCollator)."""
    return image


def keep_captions(captions: list[str]) -> list[str]:
    """A PairDataset tokenize that leaves captions as text: `dataset[i]` then holds the caption itself."""
    return captions


def raw_pairs(spec, **csv_options):
    """The pairs of a CSV/TSV or of webdataset shards (see `open_pairs`) as `(id, PIL image, caption)`, for a
    HardPairCollator to process a batch at a time. Bad samples are replaced and listed as with any PairDataset."""
    return open_pairs(spec, keep_image, keep_captions, **csv_options)


@dataclass
class HardPairRows:
    """What helip needs of a batch beside the model's inputs. Not a tensor, so the Trainer's device move leaves it
    on the CPU (pushing ids from the CPU costs no device synchronisation)."""

    ids: torch.Tensor  # [B] int64 sample ids (a substitute's own id where a bad sample was stepped over)
    layout: BatchLayout | None = None  # set for training batches: the (anchor, hard pair) couples and counts
    skipped: list[BadSample] = field(default_factory=list)


class HardPairCollator:
    """`(id, PIL image, caption)` samples (from `raw_pairs`) to the model's inputs: the processor's
    `pixel_values`, `input_ids` (padded to `max_length`: SigLIP's text tower pools the last position) and
    `attention_mask` where its tokenizer gives one, plus `batch["helip"]`, a HardPairRows. Runs in the
    DataLoader's workers, so it must pickle (a transformers processor does)."""

    def __init__(self, processor, max_length: int):
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self.processor = processor
        self.max_length = max_length

    def __call__(self, samples) -> dict:
        if not samples:
            raise ValueError("cannot collate an empty batch")
        captions = [sample[2] for sample in samples]
        if not all(isinstance(caption, str) for caption in captions):
            raise TypeError("HardPairCollator takes captions as text: build the data set with helip.raw_pairs")
        inputs = self.processor(
            images=[sample[1] for sample in samples],
            text=captions,
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        batch = dict(inputs)
        batch[ROWS_KEY] = HardPairRows(
            ids=torch.tensor([sample[0] for sample in samples], dtype=torch.long),
            skipped=[bad for sample in samples for bad in getattr(sample, "skipped", ())],
        )
        return batch


class _WithLayout:
    """The training DataLoader's collate: the user's collator over the samples, then the layout their indices
    carried (LayoutCarrier), for the rows as delivered."""

    def __init__(self, collate):
        self.collate = collate

    def __call__(self, carried) -> dict:
        if not carried:
            raise ValueError(
                "an empty batch reached the DataLoader: a resume placeholder the Trainer did not skip "
                "(HardPairTrainer's resume expects the Trainer to skip the batches of the steps it trained)"
            )
        batch = self.collate([sample for sample, _ in carried])
        rows = batch.get(ROWS_KEY)
        if not isinstance(rows, HardPairRows):
            raise TypeError(f"the data collator must put a HardPairRows under batch[{ROWS_KEY!r}] (HardPairCollator)")
        layout = carried[0][1]
        rows.layout = layout.delivered(rows.ids) if layout is not None else None
        return batch


# ---- resume: the sampler's batches as the Trainer counts them ------------------------------------------------------
class ResumedBatches(Sampler[list[int]]):
    """The batch sampler of the Trainer's DataLoader: the HardPairSampler's batches counted from the start of the
    epoch (or of the run, with `steps`), the steps before its `start_step` as empty placeholders. A resumed Trainer
    drops exactly those (its skip), so it counts batches as it planned while the sampler composes only new ones."""

    def __init__(self, sampler: HardPairSampler):
        self.sampler = sampler

    @property
    def full_length(self) -> int:
        """Batches of a whole epoch (steps=None) or of the whole run (steps=N), whatever start_step says."""
        return self.sampler.steps if self.sampler.steps is not None else self.sampler.anchors.steps_per_epoch

    def __len__(self) -> int:
        return self.full_length

    def __iter__(self):
        for _ in range(self.full_length - len(self.sampler)):
            yield []
        yield from self.sampler

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def resume_at(self, global_step: int, accumulation: int, skip_data: bool = True) -> int:
        """Start the sampler where a Trainer resumed at optimizer step `global_step` picks up; returns that
        sampler step. The Trainer's arithmetic: an epoch is `ceil(batches / accumulation)` optimizer steps, it
        restarts at the epoch `global_step` lies in and, unless `ignore_data_skip` (skip_data False), skips the
        epoch's batches up to that step."""
        per_epoch = self.full_length
        updates_per_epoch = max(math.ceil(per_epoch / accumulation), 1)
        epochs, updates = divmod(global_step, updates_per_epoch)
        start = epochs * per_epoch + (updates * accumulation if skip_data else 0)
        if self.sampler.steps is not None:
            start = min(start, self.sampler.steps)
        self.sampler.start_step = start
        return start


class _HardPairLoader(DataLoader):
    """A DataLoader that passes the Trainer's `set_epoch` on to its sampler (it does so for a DistributedSampler)."""

    def set_epoch(self, epoch: int) -> None:
        self.batch_sampler.set_epoch(epoch)


# ---- the Trainer ----------------------------------------------------------------------------------------------------
@dataclass
class BatchTally:
    """Slots of the training batches seen: mined hard pairs, fallbacks (random), all."""

    slots: int = 0
    hard: int = 0
    fallback: int = 0
    batches: int = 0
    last_step: int = -1  # the sampler step of the latest batch

    def add(self, layout: BatchLayout) -> None:
        self.slots += layout.n_slots
        self.hard += layout.n_hard
        self.fallback += layout.n_fallback
        self.batches += 1
        self.last_step = layout.step

    @property
    def hard_fraction(self) -> float:
        return self.hard / self.slots if self.slots else 0.0


class _HardPairSteps(transformers.TrainerCallback):
    """The Trainer's two moments helip needs: train begin (the state of a resumed run is loaded: start the sampler
    there) and each optimizer step's end (push that step's embeddings)."""

    def __init__(self, trainer: HardPairTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._resume_sampler(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer._push_pending()


def _text_length(model, processor) -> int:
    """Tokens per caption: the text tower's positions (CLIP's 77, SigLIP's 64), or the tokenizer's limit if lower."""
    positions = getattr(getattr(model.config, "text_config", None), "max_position_embeddings", None)
    if positions is None:
        raise ValueError("cannot tell the text length: give data_collator=HardPairCollator(processor, max_length)")
    tokenizer = getattr(processor, "tokenizer", None)
    return min(int(positions), int(getattr(tokenizer, "model_max_length", positions)))


class HardPairTrainer(transformers.Trainer):
    """A transformers.Trainer that trains CLIPModel or SiglipModel on hard-pair batches mined through `session`
    (see the module docstring). Arguments are keyword-only; those not listed here are the Trainer's.

    session: a started MiningSession (`session.start(dim, dataset)`), one per process; the caller closes it.
    processing_class: the model's processor (CLIPProcessor, SiglipProcessor); the collator runs it per batch, and
        the Trainer saves it with each checkpoint. data_collator: instead of a HardPairCollator of it.
    hard_ratio: the share of each batch that is hard pairs. loss: margin, λ (hnml_weight, 0 by default), form,
        SigLIP's dist_impl; its kind is the model's (siglip for a model with a logit_bias).
    """

    def __init__(
        self,
        *,
        session: MiningSession,
        model,
        args: transformers.TrainingArguments,
        train_dataset,
        processing_class=None,
        data_collator=None,
        hard_ratio: float = 0.5,
        loss: LossConfig | None = None,
        **kwargs,
    ):
        if not isinstance(session, MiningSession):
            raise TypeError(f"session must be a helip.MiningSession, got {type(session).__name__}")
        if model is None or not isinstance(getattr(model, "logit_scale", None), torch.Tensor):
            raise TypeError(
                "HardPairTrainer trains a CLIPModel or SiglipModel (a model whose outputs hold image_embeds and "
                f"text_embeds, with a logit_scale parameter), got {type(model).__name__}"
            )
        if data_collator is None:
            if processing_class is None:
                raise ValueError("HardPairTrainer needs processing_class (the model's processor) or a data_collator")
            data_collator = HardPairCollator(processing_class, _text_length(model, processing_class))
        super().__init__(
            model=model,
            args=args,
            train_dataset=train_dataset,
            processing_class=processing_class,
            data_collator=data_collator,
            **kwargs,
        )
        self.session = session
        self.hard_ratio = hard_ratio
        # The loss follows the model: SigLIP's sigmoid loss for one with a learned logit_bias, else CLIP's.
        kind = "siglip" if isinstance(getattr(model, "logit_bias", None), torch.Tensor) else "clip"
        self.helip_loss = HelipLoss(
            dataclasses.replace(loss if loss is not None else LossConfig(), kind=kind),
            rank=self.args.process_index,
            world_size=self.args.world_size,
        )
        # compute_loss returns a per-batch mean: the Trainer divides it by the accumulation steps.
        self.loss_is_scaled_for_ga = False
        self.tally = BatchTally()  # the whole run's (this process's)
        self._since_log = BatchTally()
        self._pending: list[tuple] = []  # (ids, image_embeds, text_embeds, step) of micro-batches not yet pushed
        self._batches: ResumedBatches | None = None
        self.add_callback(_HardPairSteps(self))

    # ---- data ------------------------------------------------------------------------------------------------
    def get_train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            raise ValueError("HardPairTrainer: training requires a train_dataset (helip.raw_pairs)")
        if self.session.max_k is None:
            raise ValueError("start the mining session before training: session.start(dim, dataset)")
        args = self.args
        if self._batches is not None:  # a second call (auto_find_batch_size): the old sampler mines no more
            self._batches.sampler.close()
        prefetch_factor = args.dataloader_prefetch_factor or 2
        sampler = self.session.sampler(
            len(self.train_dataset),
            self._train_batch_size,
            hard_ratio=self.hard_ratio,
            rank=args.process_index,
            world_size=args.world_size,
            seed=args.data_seed if args.data_seed is not None else args.seed,
            num_workers=args.dataloader_num_workers,
            prefetch_factor=prefetch_factor,
            steps=args.max_steps * args.gradient_accumulation_steps if args.max_steps > 0 else None,
        )
        self._batches = ResumedBatches(sampler)
        return _HardPairLoader(
            LayoutCarrier(self.train_dataset),
            batch_sampler=self._batches,
            collate_fn=_WithLayout(self.data_collator),
            pin_memory=args.dataloader_pin_memory and torch.cuda.is_available(),
            **worker_options(args.dataloader_num_workers, prefetch_factor),
        )

    def _resume_sampler(self, global_step: int) -> None:
        if self._batches is None or global_step == 0:
            return
        start = self._batches.resume_at(
            global_step, self.args.gradient_accumulation_steps, skip_data=not self.args.ignore_data_skip
        )
        log.info("resumed at optimizer step %d: the hard-pair sampler starts at its step %d", global_step, start)

    # ---- loss and push ---------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        rows = inputs.pop(ROWS_KEY, None)
        if not isinstance(rows, HardPairRows):
            raise ValueError(f"a batch without batch[{ROWS_KEY!r}]: train on HardPairTrainer's own DataLoader")
        outputs = model(
            pixel_values=inputs["pixel_values"],
            input_ids=inputs["input_ids"],
            attention_mask=inputs.get("attention_mask"),
        )
        core = self.accelerator.unwrap_model(model)
        layout = rows.layout
        losses = self.helip_loss(
            outputs.image_embeds,
            outputs.text_embeds,
            core.logit_scale.exp(),
            layout.couples if layout is not None else None,
            logit_bias=getattr(core, "logit_bias", None),
        )
        loss = losses["total"]
        if model.training and layout is not None:
            self.tally.add(layout)
            self._since_log.add(layout)
            self._pending.append((rows.ids, outputs.image_embeds.detach(), outputs.text_embeds.detach(), layout.step))
        return (loss, outputs) if return_outputs else loss

    def _push_pending(self) -> None:
        """Send the embeddings of the micro-batches of the step that just ended (returns at once)."""
        pending, self._pending = self._pending, []
        for ids, image_embeds, text_embeds, step in pending:
            self.session.push(ids, image_embeds, text_embeds, step)

    def log(self, logs: dict, *args, **kwargs) -> None:
        """The Trainer's log, with the hard-pair share of the batches trained since the last one."""
        if "loss" in logs and self._since_log.batches:
            logs = {
                **logs,
                "helip/hard_fraction": self._since_log.hard_fraction,
                "helip/fallback_fraction": self._since_log.fallback / self._since_log.slots,
                "helip/batch_step": self._since_log.last_step,
            }
            self._since_log = BatchTally()
        super().log(logs, *args, **kwargs)

    def summary(self) -> dict:
        """This process's hard-pair totals and the session's mining counters, for a run's end."""
        tally = {**dataclasses.asdict(self.tally), "hard_fraction": self.tally.hard_fraction}
        return {**tally, **self.session.counters.snapshot()}
