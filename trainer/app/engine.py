"""The training loop: DeepSpeed around an open_clip model, online hard pairs from the miner, HELIP's loss.

This module wires the public parts (datasets, HardPairSampler, EmbeddingPusher, HelipLoss) to DeepSpeed, the
same parts any other loop uses (see examples/), and owns nothing else.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from helip.trainer.app.cadence import Cadence
from helip.trainer.app.checkpoints import Checkpointer
from helip.trainer.app.config import TrainConfig, to_dict
from helip.trainer.app.ds_engine import build_engine
from helip.trainer.app.launch import dist_env
from helip.trainer.app.metrics import TrainerMetrics
from helip.trainer.app.run_eval import RunEvaluator
from helip.trainer.app.run_mining import RunMining
from helip.trainer.app.runlog import RunLog
from helip.trainer.pairs.data import open_pairs
from helip.trainer.pairs.hard_pairs import HardPairSampler, hard_pair_loader
from helip.trainer.pairs.ledger import BadSampleLedger
from helip.trainer.pairs.losses import HelipLoss
from helip.trainer.pairs.mining import MiningCounters
from helip.trainer.tools.model import build_model, vectorize_scalar_parameters

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    output_dir: Path
    final_checkpoint: Path | None
    eval_json: Path | None
    tensorboard_dir: Path
    summary_json: Path
    last_losses: dict[str, float]
    steps: int
    counters: dict[str, float]


def setup_distributed() -> tuple[int, int, int]:
    """Join the process group the launcher (torchrun, deepspeed, srun) describes, or a group of one (once)."""
    import deepspeed

    env = dist_env(os.environ)
    if dist.is_initialized():  # the CLI joined already, to prepare the data set
        return dist.get_rank(), dist.get_world_size(), env.local_rank
    os.environ.update(env.export())
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    log.info("rank %d of %d (local rank %d, launcher %s)", env.rank, env.world_size, env.local_rank, env.launcher)
    return dist.get_rank(), dist.get_world_size(), env.local_rank


class Trainer:
    """One rank of a `helip-train` run: the open_clip model under DeepSpeed, the hard-pair DataLoader of the
    run's MiningSession (through RunMining, its distributed wrapper), the loss, checkpoints, evaluation and the
    reporters, all from one TrainConfig.

        result = Trainer(config).train()   # each rank; the launcher (torchrun, deepspeed) sets the ranks

    Building it joins the process group, builds the model and engine and, when optim.hard_ratio > 0, starts
    mining (a local miner when mining.address is empty). Raises NamespaceMismatch or MinerRefused when the
    miner cannot serve this run (another data set or dim in the namespace, k above max_k, a refused token)."""

    def __init__(self, config: TrainConfig):
        self.config = config
        self.rank, self.world_size, self.local_rank = setup_distributed()
        self.output_dir = Path(config.run.output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.is_main = self.rank == 0
        torch.manual_seed(config.optim.seed)
        device = f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if device.startswith("cuda"):
            torch.cuda.set_device(self.device)

        if not config.data.train:  # the CLI generates the synthetic set and points data.train at it
            raise ValueError("data.train is empty: a Trainer trains on a prepared data set")
        config.model.device = device
        # open_clip builds fp32 weights; DeepSpeed casts them to model.precision itself (deepspeed_config).
        self.model, preprocess_train, self.preprocess_val, self.tokenizer = build_model(
            dataclasses.replace(config.model, precision="fp32"), siglip=config.loss.kind == "siglip"
        )
        # open_clip's training augmentation for real data; the synthetic set's captions name positions and
        # sizes, so its config turns augmentation off (data.augment).
        self.dataset = open_pairs(
            config.data.train,
            preprocess_train if config.data.augment else self.preprocess_val,
            self.tokenizer,
            img_key=config.data.img_key,
            caption_key=config.data.caption_key,
            sep=config.data.separator,
        )
        self.embed_dim = self._probe_dim()  # the miner's dim: whatever the model's towers project to

        vectorize_scalar_parameters(self.model)  # DeepSpeed cannot broadcast 0-dim parameters
        parts = build_engine(config, self.model, len(self.dataset), self.world_size)
        self.engine, self.optimizer, self.scheduler = parts.engine, parts.optimizer, parts.scheduler
        self.accumulation, self.input_dtype = parts.accumulation, parts.input_dtype
        self.checkpoints = Checkpointer(
            self.engine,
            self.output_dir,
            config.model,
            keep=config.run.keep_checkpoints,
            accumulation=self.accumulation,
            is_main=self.is_main,
        )
        self.loss = HelipLoss(config.loss, rank=self.rank, world_size=self.world_size)

        # Online mining (None for plain CLIP batches): the miner, the run's namespace and its session.
        self.mining: RunMining | None = None
        if config.optim.hard_ratio > 0:
            self.mining = RunMining(
                config.mining, self.output_dir, self.dataset, self.embed_dim, self.rank, self.world_size
            )
        self.counters = self.mining.session.counters if self.mining is not None else MiningCounters()
        self.metrics = TrainerMetrics.create(self.rank)
        if config.run.metrics_port:
            port = self.metrics.serve(config.run.metrics_port + self.local_rank, config.run.metrics_host)
            log.info("rank %d metrics on %s:%d/metrics", self.rank, config.run.metrics_host, port)
        self.writer = None  # the run's reporters (run.report_to), main rank only
        if self.is_main:
            from helip.trainer.app.reporting import create_reporters

            self.writer = create_reporters(
                config.run.reporters,
                self.output_dir,
                wandb_project=config.run.wandb_project,
                wandb_notes=config.run.wandb_notes,
                config=to_dict(config),
            )
            (self.output_dir / "config.json").write_text(json.dumps(to_dict(config), indent=2, default=str))
        # Rank 0 evaluates; the others wait at the next collective.
        self.evaluator = (
            RunEvaluator(
                config.data,
                self.tokenizer,
                self.preprocess_val,
                self.output_dir,
                self.writer,
                self.device,
                self.input_dtype,
            )
            if self.is_main
            else None
        )
        self.sampler = None

    def _probe_dim(self) -> int:
        with torch.no_grad():
            return int(self.model.encode_text(self.tokenizer(["probe"]).to(self.device)).shape[-1])

    # ---- the loop ---------------------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        """Train optim.steps steps (resuming from run.resume when set), checkpointing and evaluating on the run's
        cadence; returns where the results went. Mining never blocks a step: a batch whose Mine answer is not in
        gets random samples in its hard slots. Raises MinerRefused when the miner refuses the run mid-way."""
        from tqdm import tqdm

        config = self.config
        total_micro = config.optim.steps * self.accumulation
        start_micro = self.checkpoints.resume(config.run.resume)
        if self.mining is not None and self.mining.needs_bootstrap(start_micro):
            self.mining.bootstrap(
                self.engine.module,
                batch_size=config.optim.batch_size * 4,
                num_workers=config.data.workers,
                device=self.device,
                dtype=self.input_dtype,
                step=int(self.engine.global_steps),
                progress=self.is_main and config.run.progress,
            )
        self.sampler = HardPairSampler(
            len(self.dataset),
            config.optim.batch_size,
            self.mining.session if self.mining else None,
            hard_ratio=config.optim.hard_ratio,
            rank=self.rank,
            world_size=self.world_size,
            seed=config.optim.seed,
            num_workers=config.data.workers,
            prefetch_factor=config.data.prefetch_factor,
            steps=total_micro,
            start_step=start_micro,
        )
        loader = hard_pair_loader(self.dataset, self.sampler, pin_memory=self.device.type == "cuda")
        ledger = BadSampleLedger(config.data.max_bad_fraction, config.data.bad_min_samples)
        runlog = RunLog(
            self.output_dir,
            self.rank,
            self.world_size,
            self.metrics,
            self.counters,
            config.run.log_every,
            self.accumulation,
            self.writer,
            device=self.device,
        )
        ledger.on_bad = lambda bad: runlog.bad_sample(bad.kind)
        progress = tqdm(
            total=total_micro,
            initial=start_micro,
            desc="train",
            unit="step",
            disable=not (self.is_main and config.run.progress),
        )
        seen: set[int] = set()
        cadence = Cadence.of_run(
            total_micro,
            self.accumulation,
            epoch=self.sampler.anchors.steps_per_epoch,
            checkpoint_every=config.run.checkpoint_every,
            eval_every=config.run.eval_every,
            zeroshot_epochs=config.run.zeroshot_frequency,
        )
        last: dict[str, float] = {}
        batches = iter(loader)
        for micro in range(start_micro, total_micro):
            waited = time.perf_counter()
            batch = next(batches)
            waited = time.perf_counter() - waited
            layout = batch.layout
            ledger.record(batch)
            started = time.perf_counter()
            losses = self._step(batch, layout.couples)
            compute_s = time.perf_counter() - started
            last = {k: float(v.detach()) for k, v in losses.items()}
            done = micro + 1
            runlog.step(micro, last, layout, compute_s, waited, self._lr(), last=done == total_micro)
            if config.run.record_ids:
                seen.update(batch.ids.tolist())
            progress.update(1)
            progress.set_postfix(loss=f"{last['total']:.3f}", hard=f"{layout.hard_fraction:.2f}")
            due = cadence.due(done)
            if due.checkpoint:
                self.checkpoints.save(done)
            if due.epoch:
                self.checkpoints.export(f"epoch_{due.epoch}", step=done // self.accumulation, epoch=due.epoch)
            if due.evaluate:
                step_name = f"step_{done // self.accumulation}"
                self._evaluate(step_name, periodic=due.periodic_eval, zero_shot=due.zero_shot_eval)
        progress.close()
        runlog.close()
        del batches, loader  # stops the loader's workers
        if config.run.record_ids:
            np.save(self.output_dir / f"seen-ids-rank{self.rank}.npy", np.array(sorted(seen), dtype=np.int64))
        self.checkpoints.save(total_micro)
        final = self.checkpoints.export("final", step=config.optim.steps)
        eval_json = self._evaluate("final")
        totals = {**runlog.totals, "bad_samples": ledger.bad, "bad_by_kind": dict(ledger.by_kind)}
        return self._finish(final, eval_json, last, totals)

    def _lr(self) -> float:
        return self.scheduler.get_last_lr()[0] if self.scheduler else self.config.optim.lr

    def _step(self, batch, couples: torch.Tensor) -> dict[str, torch.Tensor]:
        images = batch.images.to(self.device, self.input_dtype, non_blocking=True)
        tokens = batch.tokens.to(self.device, non_blocking=True)
        out = self.engine(images, tokens)
        image_features, text_features = out["image_features"], out["text_features"]
        bias = out.get("logit_bias")  # SigLIP's learned bias (open_clip outputs it when the model has one)
        losses = self.loss(
            image_features.float(),
            text_features.float(),
            out["logit_scale"].float(),
            couples,
            logit_bias=bias.float() if bias is not None else None,
        )
        self.engine.backward(losses["total"])
        self.engine.step()
        with torch.no_grad():  # open_clip clamps the learned temperature at 100, as CLIP does
            self.engine.module.logit_scale.clamp_(0, np.log(100))
        if self.mining is not None and self.config.mining.update_index:
            self.mining.pusher.push(batch.ids, image_features, text_features, self.engine.global_steps)
        return losses

    def _evaluate(self, name: str, periodic: bool = True, zero_shot: bool = True) -> Path | None:
        if self.evaluator is None:
            return None
        step = self.engine.global_steps
        return self.evaluator.evaluate(self.engine.module, name, step, periodic=periodic, zero_shot=zero_shot)

    def close(self) -> None:
        """Stop background work and the local miner (idempotent; also runs when training is interrupted)."""
        if getattr(self, "_closed", False):
            return
        self._closed = True
        if self.sampler is not None:
            self.sampler.close()
        if self.mining is not None:
            self.mining.close()

    def _finish(self, final: Path | None, eval_json: Path | None, last: dict, totals: dict) -> TrainResult:
        if self.mining is not None:
            self.mining.pusher.flush(30)
        counters = self.counters.snapshot()
        (self.output_dir / f"rank{self.rank}.json").write_text(json.dumps({**totals, "mining": counters}))
        summary = self.output_dir / "summary.json"
        if self.is_main:
            summary.write_text(
                json.dumps(
                    {
                        "steps": self.config.optim.steps,
                        "world_size": self.world_size,
                        "last_losses": last,
                        "data": self.dataset.describe(),  # img2dataset shards: what failed to download, too
                        "mining": counters,
                        "final_checkpoint": str(final) if final else None,
                        "eval": str(eval_json) if eval_json else None,
                    },
                    indent=2,
                )
            )
            self.writer.close()
        dist.barrier()
        self.close()
        return TrainResult(
            self.output_dir,
            final,
            eval_json,
            self.output_dir / "tensorboard",
            summary,
            last,
            self.config.optim.steps,
            counters,
        )
