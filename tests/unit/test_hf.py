"""helip.HardPairTrainer's parts without a miner: the resume arithmetic against accelerate's own skip, the
collator's inputs, what the Trainer takes from the model; and `import helip` stays free of transformers."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers", reason="the hf extra: pip install 'helip[hf]'")

from accelerate.data_loader import SkipBatchSampler  # noqa: E402  (after the importorskip)
from PIL import Image  # noqa: E402

from helip import (  # noqa: E402
    HardPairCollator,
    HardPairRows,
    HardPairSampler,
    HardPairTrainer,
    LossConfig,
    MiningSession,
)
from helip.trainer.pairs.hf import ResumedBatches, _WithLayout  # noqa: E402
from tests.conftest import ROOT  # noqa: E402


def trainer_skip(global_step: int, batches: int, accumulation: int) -> tuple[int, int]:
    """(epochs trained, batches skipped in the resumed epoch): transformers.Trainer._init_training_state's sums."""
    updates_per_epoch = max(batches // accumulation + int(batches % accumulation > 0), 1)
    return global_step // updates_per_epoch, (global_step % updates_per_epoch) * accumulation


def micro_steps(batches: int, accumulation: int, epochs: int) -> list[int]:
    """The sampler step that starts each optimizer step of an uninterrupted run (the last of an epoch is short)."""
    starts = []
    for epoch in range(epochs):
        starts += [epoch * batches + first for first in range(0, batches, accumulation)]
    return starts


@pytest.mark.parametrize("accumulation", [1, 2, 3])
@pytest.mark.parametrize("steps_mode", [True, False])
def test_a_resumed_sampler_continues_where_the_trainer_does(accumulation, steps_mode):
    # 88 samples, 8 anchors a batch: an epoch is 11 batches, which no accumulation above 1 divides.
    n_samples, batch_size, epochs = 88, 16, 2
    per_epoch = n_samples // (batch_size // 2)
    starts = micro_steps(per_epoch, accumulation, epochs)
    updates = len(starts)
    steps = updates * accumulation if steps_mode else None

    def sampler() -> HardPairSampler:
        return HardPairSampler(n_samples, batch_size, rank=0, world_size=1, seed=3, steps=steps)

    uninterrupted = {}
    for epoch in range(1 if steps_mode else epochs):
        plain = sampler()
        plain.set_epoch(epoch)
        first = 0 if steps_mode else epoch * per_epoch
        uninterrupted.update({first + i: [int(x) for x in batch] for i, batch in enumerate(plain)})

    for global_step in range(1, updates):
        batches = ResumedBatches(sampler())
        full = len(batches)
        assert full == (steps if steps_mode else per_epoch)  # what the Trainer plans with: never the rest alone
        epochs_trained, skip = trainer_skip(global_step, full, accumulation)
        start = batches.resume_at(global_step, accumulation)
        # The first sampler step of the optimizer step the Trainer resumes at, as an uninterrupted run reaches it.
        assert start == (global_step * accumulation if steps_mode else starts[global_step])
        batches.set_epoch(epochs_trained)
        resumed = list(SkipBatchSampler(batches, skip_batches=skip))  # accelerate's skip_first_batches does this
        assert all(resumed), "a placeholder got through the Trainer's skip"
        epoch_end = full if steps_mode else (epochs_trained + 1) * per_epoch
        assert resumed == [uninterrupted[step] for step in range(start, epoch_end)]


def test_ignore_data_skip_restarts_the_epoch():
    batches = ResumedBatches(HardPairSampler(88, 16, rank=0, world_size=1))  # 11 batches an epoch
    assert batches.resume_at(global_step=8, accumulation=2, skip_data=False) == 11  # epoch 1 is 6 updates
    batches.set_epoch(1)
    assert len(list(batches)) == 11 and all(list(batches))


@pytest.fixture(scope="module")
def example():
    """examples/hf_trainer.py as a module: its tiny models and in-memory word-level tokenizer."""
    spec = importlib.util.spec_from_file_location("hf_trainer_example", ROOT / "examples" / "hf_trainer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tokenizer(example):
    return example.word_tokenizer(["a red circle", "a blue circle"])


@pytest.fixture(scope="module")
def processor(example, tokenizer):
    """The example's CLIPProcessor (32-pixel images)."""
    return example.tiny_model("clip", tokenizer)[1]


def test_the_collator_gives_the_models_inputs_and_the_rows(processor):
    samples = [(7, Image.new("RGB", (40, 40), (200, 0, 0)), "a red circle"), (3, Image.new("RGB", (40, 40)), "a")]
    batch = HardPairCollator(processor, max_length=8)(samples)
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    assert batch["input_ids"].shape == (2, 8)  # padded to max_length: SigLIP pools the last position
    # <start> a red circle <end>: the special tokens come first, then the words in sorted order.
    assert batch["input_ids"][0, :5].tolist() == [2, 4, 7, 6, 3]
    assert batch["attention_mask"].sum(dim=1).tolist() == [5, 3]
    rows = batch["helip"]
    assert isinstance(rows, HardPairRows) and rows.ids.tolist() == [7, 3] and rows.layout is None
    with pytest.raises(TypeError, match="raw_pairs"):
        HardPairCollator(processor, max_length=8)([(0, samples[0][1], torch.zeros(8))])


def test_the_training_collate_puts_the_layout_on_the_rows_and_refuses_a_placeholder(processor):
    sampler = HardPairSampler(16, 4, rank=0, world_size=1)
    indices = next(iter(sampler))
    samples = [(int(i), Image.new("RGB", (16, 16)), "a blue circle") for i in indices]
    collate = _WithLayout(HardPairCollator(processor, max_length=8))
    batch = collate([(sample, index.layout) for sample, index in zip(samples, indices)])
    assert batch["helip"].layout.step == 0 and batch["helip"].layout.n_slots == 4
    with pytest.raises(ValueError, match="placeholder"):
        collate([])


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_the_trainer_takes_the_loss_and_the_text_length_from_the_model(kind, example, tokenizer, tmp_path):
    from transformers import TrainingArguments

    model, processor = example.tiny_model(kind, tokenizer)
    session = MiningSession(address="127.0.0.1:1")  # never started: nothing here talks to a miner
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    trainer = HardPairTrainer(
        session=session,
        model=model,
        args=args,
        train_dataset=[],
        processing_class=processor,
        loss=LossConfig(hnml_weight=1.0),
    )
    assert trainer.helip_loss.config.kind == kind and trainer.helip_loss.config.hnml_weight == 1.0
    assert trainer.data_collator.max_length == example.MAX_TEXT  # the text tower's positions
    with pytest.raises(ValueError, match="start the mining session"):
        trainer.get_train_dataloader()
    with pytest.raises(TypeError, match="CLIPModel or SiglipModel"):
        HardPairTrainer(session=session, model=torch.nn.Linear(2, 2), args=args, train_dataset=[])
    with pytest.raises(ValueError, match="processing_class"):
        HardPairTrainer(session=session, model=model, args=args, train_dataset=[])
    session.close()


def test_import_helip_does_not_import_transformers():
    code = "import sys, helip; helip.MiningConfig; assert 'transformers' not in sys.modules, 'transformers loaded'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
