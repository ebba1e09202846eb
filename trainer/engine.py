"""The training loop: DeepSpeed around an open_clip model, online hard pairs from the miner, HELIP's loss.

This module wires the parts (data, sampler, composer, mining, loss, model) together and owns nothing else.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from trainer.batches import BatchSource
from trainer.config import TrainConfig, to_dict
from trainer.data import open_pairs
from trainer.local_miner import LocalMiner
from trainer.losses import HelipLoss
from trainer.metrics import TrainerMetrics
from trainer.mining import EmbeddingPusher, MiningCounters, MiningPrefetcher, make_client
from trainer.model import build_model, save_checkpoint, vectorize_scalar_parameters
from trainer.sampler import AnchorSampler, SamplerConfig
from trainer.schedule import warmup_cosine

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_distributed() -> tuple[int, int, int]:
    """Join the process group the launcher (torchrun / deepspeed) describes, or a group of one."""
    import deepspeed

    if "RANK" not in os.environ:  # a plain `helip-train`: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))


def deepspeed_config(config: TrainConfig) -> dict:
    """The user's DeepSpeed JSON with our values filled in where it says "auto", and precision the device has."""
    from deepspeed.accelerator import get_accelerator

    ds = json.loads(Path(config.run.deepspeed_config).read_text())
    if ds.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        ds["train_micro_batch_size_per_gpu"] = config.optim.batch_size
    if ds.get("gradient_clipping", "auto") == "auto":
        ds["gradient_clipping"] = config.optim.grad_clip
    if ds.get("train_batch_size") == "auto":
        del ds["train_batch_size"]
    accelerator = get_accelerator()
    for key, supported in (("bf16", accelerator.is_bf16_supported()), ("fp16", accelerator.is_fp16_supported())):
        if ds.get(key, {}).get("enabled") and not supported:
            log.warning("%s asked for by %s but %s lacks it: training in fp32", key, config.run.deepspeed_config,
                        accelerator.device_name())
            ds[key]["enabled"] = False
    return ds


class Trainer:
    def __init__(self, config: TrainConfig):
        import deepspeed

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

        self._prepare_data()
        model_config = config.model
        model_config.device = device
        self.model, _, self.preprocess_val, self.tokenizer = build_model(model_config)
        # Deterministic preprocessing for training too: the synthetic captions name positions and sizes.
        self.dataset = open_pairs(config.data.train, self.preprocess_val, self.tokenizer,
                                  img_key=config.data.img_key, caption_key=config.data.caption_key,
                                  sep=config.data.separator)
        self.embed_dim = self._probe_dim()  # the miner's dim: whatever the model's towers project to

        optim = config.optim
        self.sampler = AnchorSampler(SamplerConfig(n_samples=len(self.dataset), batch_size=optim.batch_size,
                                                   hard_ratio=optim.hard_ratio, world_size=self.world_size,
                                                   rank=self.rank, seed=optim.seed))
        vectorize_scalar_parameters(self.model)  # DeepSpeed cannot broadcast 0-dim parameters
        ds_config = deepspeed_config(config)
        self.accumulation = int(ds_config.get("gradient_accumulation_steps", 1))
        decay = [p for n, p in self.model.named_parameters() if p.ndim >= 2 and "logit_scale" not in n]
        no_decay = [p for n, p in self.model.named_parameters() if p.ndim < 2 or "logit_scale" in n]
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": optim.weight_decay},
                                       {"params": no_decay, "weight_decay": 0.0}], lr=optim.lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: warmup_cosine(s, optim.warmup_steps, optim.steps, optim.min_lr_ratio))
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
        self.input_dtype = (torch.bfloat16 if self.engine.bfloat16_enabled()
                            else torch.float16 if self.engine.fp16_enabled() else torch.float32)
        self.loss = HelipLoss(config.loss, rank=self.rank, world_size=self.world_size)

        self.counters = MiningCounters()
        self.mining_on = optim.hard_ratio > 0
        self.local_miner = None
        self.prefetcher = self.pusher = None
        if self.mining_on:
            address = config.mining.address
            if not address:
                self.local_miner = LocalMiner(self.output_dir, self.embed_dim, self.local_rank)
                address = self.local_miner.address
            mining = dataclasses.replace(config.mining, address=address)
            self.prefetcher = MiningPrefetcher(make_client(mining), mining, self.counters)
            self.pusher = EmbeddingPusher(make_client(mining), mining, self.counters)
        self.batches = BatchSource(self.dataset, self.sampler, self.prefetcher, optim.batch_size, optim.seed,
                                   self.rank, top=config.mining.k, prefetch=config.mining.prefetch,
                                   threads=config.data.loader_threads)
        self.metrics = TrainerMetrics.create(self.rank)
        self._counted = {"pushed_rows": 0, "dropped_pushes": 0, "failures": 0}
        if config.run.metrics_port:
            port = self.metrics.serve(config.run.metrics_port + self.local_rank, config.run.metrics_host)
            log.info("rank %d metrics on %s:%d/metrics", self.rank, config.run.metrics_host, port)
        self.writer = None
        if self.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.output_dir / "tensorboard"))
            (self.output_dir / "config.json").write_text(json.dumps(to_dict(config), indent=2, default=str))

    def _probe_dim(self) -> int:
        with torch.no_grad():
            return int(self.model.encode_text(self.tokenizer(["probe"]).to(self.device)).shape[-1])

    def _prepare_data(self) -> None:
        data = self.config.data
        if data.synth_dir and not data.train:
            from trainer.synth import SynthConfig, generate

            root = Path(data.synth_dir)
            if self.local_rank == 0 and not (root / "train.csv").exists():
                log.info("generating the synthetic set in %s", root)
                generate(SynthConfig(out_dir=root, train_size=data.synth_train, test_size=data.synth_test,
                                     seed=self.config.optim.seed))
            dist.barrier()
            data.train = str(root / "train.csv")
            data.eval_dir = data.eval_dir or str(root)

    # ---- the loop ---------------------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        from tqdm import tqdm

        config = self.config
        total_micro = config.optim.steps * self.accumulation
        start_micro = self._resume()
        ckpt_every = config.run.checkpoint_every * self.accumulation
        eval_every = config.run.eval_every * self.accumulation
        progress = tqdm(total=total_micro, initial=start_micro, desc="train", unit="step",
                        disable=not (self.is_main and config.run.progress))
        if self.pusher is not None and config.mining.bootstrap_index and start_micro == 0:
            self._bootstrap_index()
        window = {"samples": 0, "steps": 0, "compute_s": 0.0, "hard": 0, "fallback": 0, "slots": 0, "wait_s": 0.0}
        losses_log = open(self.output_dir / "losses.jsonl", "a") if self.is_main else None
        seen: set[int] = set()
        totals = {"hard": 0, "fallback": 0, "samples": 0}
        window_started = time.perf_counter()
        last: dict[str, float] = {}
        eval_json = None
        for micro in range(start_micro, total_micro):
            batch = self.batches.take(micro)
            started = time.perf_counter()
            losses = self._step(batch)
            step_s = time.perf_counter() - started
            window["compute_s"] += step_s
            self._export(batch, step_s)
            window["samples"] += len(batch.ids) * self.world_size
            window["hard"] += batch.composed.n_hard
            window["fallback"] += batch.composed.n_fallback
            window["slots"] += len(batch.ids)
            window["wait_s"] += batch.mining_wait_s
            window["steps"] += 1
            totals["hard"] += batch.composed.n_hard
            totals["fallback"] += batch.composed.n_fallback
            totals["samples"] += len(batch.ids)
            last = {k: float(v.detach()) for k, v in losses.items()}
            if losses_log is not None:
                losses_log.write(json.dumps({"micro_step": micro, **last, "n_hard": batch.composed.n_hard,
                                             "n_fallback": batch.composed.n_fallback,
                                             "time": time.time()}) + "\n")
                losses_log.flush()
            if config.run.record_ids:
                seen.update(batch.composed.ids.tolist())
            progress.update(1)
            progress.set_postfix(loss=f"{last['total']:.3f}", hard=f"{batch.composed.hard_fraction:.2f}")
            done = micro + 1
            if done % (config.run.log_every * self.accumulation) == 0 or done == total_micro:
                elapsed = time.perf_counter() - window_started
                self._log(done // self.accumulation, last, window, elapsed)
                window = {key: 0 for key in window}
                window_started = time.perf_counter()
            if ckpt_every and done % ckpt_every == 0 and done != total_micro:
                self._save(done)
            if eval_every and done % eval_every == 0 and done != total_micro:
                self._evaluate(f"step_{done // self.accumulation}")
        progress.close()
        if losses_log is not None:
            losses_log.close()
        if config.run.record_ids:
            np.save(self.output_dir / f"seen-ids-rank{self.rank}.npy", np.array(sorted(seen), dtype=np.int64))
        self._save(total_micro)
        final = None
        if self.is_main:
            final = self.output_dir / "final.pt"
            save_checkpoint(self.engine.module, final, extra={"step": config.optim.steps}, config=config.model)
        eval_json = self._evaluate("final")
        return self._finish(final, eval_json, last, totals)

    def _bootstrap_index(self) -> None:
        """Embed this rank's share of the training set once and push it (see MiningConfig.bootstrap_index)."""
        from tqdm import tqdm

        from trainer.data import collate

        started = time.perf_counter()
        ids = np.arange(self.rank, len(self.dataset), self.world_size)
        batch_size = self.config.optim.batch_size * 4
        self.engine.module.eval()
        with torch.no_grad():
            for first in tqdm(range(0, len(ids), batch_size), desc="bootstrap index", unit="batch",
                              disable=not (self.is_main and self.config.run.progress)):
                chunk = ids[first:first + batch_size].tolist()
                _, images, tokens = collate([self.dataset[i] for i in chunk])
                out = self.engine.module(images.to(self.device, self.input_dtype), tokens.to(self.device))
                self.pusher.push(np.asarray(chunk, dtype=np.uint64),
                                 out["image_features"].to(torch.float16).cpu().numpy(),
                                 out["text_features"].to(torch.float16).cpu().numpy(), 0)
        self.engine.module.train()
        self.pusher.flush(120)
        dist.barrier()  # every rank's rows are in before anyone mines
        log.info("bootstrapped the index with %d rows in %.1f s", len(ids), time.perf_counter() - started)

    def _step(self, batch) -> dict[str, torch.Tensor]:
        images = batch.images.to(self.device, self.input_dtype, non_blocking=True)
        tokens = batch.tokens.to(self.device, non_blocking=True)
        out = self.engine(images, tokens)
        image_features, text_features = out["image_features"], out["text_features"]
        couples = torch.from_numpy(batch.composed.couples)
        losses = self.loss(image_features.float(), text_features.float(), out["logit_scale"].float(), couples)
        self.engine.backward(losses["total"])
        self.engine.step()
        with torch.no_grad():  # open_clip clamps the learned temperature at 100, as CLIP does
            self.engine.module.logit_scale.clamp_(0, np.log(100))
        if self.pusher is not None and self.config.mining.update_index:
            self.pusher.push(batch.composed.ids.astype(np.uint64),
                             image_features.detach().to(torch.float16).cpu().numpy(),
                             text_features.detach().to(torch.float16).cpu().numpy(),
                             self.engine.global_steps)
        return losses

    def _export(self, batch, step_s: float) -> None:
        m = self.metrics
        m.step_seconds.observe(step_s)
        m.mining_wait_seconds.observe(batch.mining_wait_s)
        m.fallbacks.inc(batch.composed.n_fallback)
        m.hard_pairs.inc(batch.composed.n_hard)
        m.samples.inc(len(batch.ids))
        m.hard_pair_fraction.set(batch.composed.hard_fraction)
        c = self.counters
        for name, counter, now in (("pushed_rows", m.pushed_rows, c.pushed_rows),
                                   ("dropped_pushes", m.dropped_pushes, c.dropped_pushes),
                                   ("failures", m.mine_failures, c.mine_failures + c.mine_late)):
            counter.inc(now - self._counted[name])  # the mining threads count; export the increase
            self._counted[name] = now

    def _log(self, opt_step: int, losses: dict, window: dict, elapsed: float) -> None:
        if not self.is_main:
            return
        slots = max(1, window["slots"])
        scalars = {
            "loss/total": losses["total"], "loss/contrastive": losses["contrastive"], "loss/hnml": losses["hnml"],
            "mining/hard_fraction": window["hard"] / slots,
            "mining/fallbacks": window["fallback"],
            "mining/wait_s": window["wait_s"],
            "perf/samples_per_s": window["samples"] / max(elapsed, 1e-9),
            "perf/step_compute_s": window["compute_s"] / max(1, window["steps"]),
            "lr": self.scheduler.get_last_lr()[0] if self.scheduler else self.config.optim.lr,
        }
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, opt_step)
        log.info("step %d: %s", opt_step, ", ".join(f"{k}={v:.4g}" for k, v in scalars.items()))

    def _save(self, micro: int) -> None:
        tag = f"step_{micro // self.accumulation}"
        self.engine.save_checkpoint(str(self.output_dir / "checkpoints"), tag=tag,
                                    client_state={"micro_step": micro})

    def _resume(self) -> int:
        resume = self.config.run.resume
        if not resume:
            return 0
        directory = self.output_dir / "checkpoints"
        if not (directory / "latest").exists() and resume == "latest":
            log.info("no checkpoint in %s yet: starting from step 0", directory)
            return 0
        path, client_state = self.engine.load_checkpoint(str(directory), tag=None if resume == "latest" else resume)
        if path is None:
            raise FileNotFoundError(f"--resume {resume}: no checkpoint in {directory}")
        micro = int(client_state["micro_step"])
        log.info("resumed from %s at step %d", path, micro // self.accumulation)
        return micro

    def _evaluate(self, name: str) -> Path | None:
        eval_dir = self.config.data.eval_dir
        if not (self.is_main and eval_dir):
            return None
        from trainer.eval import evaluate

        # Under bf16/fp16 DeepSpeed holds half-precision weights: autocast feeds them matching inputs.
        with torch.autocast(self.device.type, dtype=self.input_dtype, enabled=self.input_dtype != torch.float32):
            metrics = evaluate(self.engine.module, self.tokenizer, self.preprocess_val, eval_dir, device=self.device)
        path = self.output_dir / "eval" / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(metrics, indent=2))
        step = self.engine.global_steps
        for key, value in metrics.items():
            self.writer.add_scalar(f"eval/{key}", value, step)
        log.info("eval %s: %s", name, ", ".join(f"{k}={v:.3f}" for k, v in metrics.items()))
        return path

    def close(self) -> None:
        """Stop background work and the local miner (idempotent; also runs when training is interrupted)."""
        if getattr(self, "_closed", False):
            return
        self._closed = True
        self.batches.close()
        if self.pusher is not None:
            self.pusher.close(timeout_s=10)
        if self.prefetcher is not None:
            self.prefetcher.close()
        if self.local_miner is not None:
            self.local_miner.stop()

    def _finish(self, final: Path | None, eval_json: Path | None, last: dict, totals: dict) -> TrainResult:
        if self.pusher is not None:
            self.pusher.flush(30)
        counters = {k: v for k, v in vars(self.counters).items() if k != "lock"}
        (self.output_dir / f"rank{self.rank}.json").write_text(json.dumps({**totals, "mining": counters}))
        summary = self.output_dir / "summary.json"
        if self.is_main:
            summary.write_text(json.dumps({"steps": self.config.optim.steps, "world_size": self.world_size,
                                           "last_losses": last, "mining": counters,
                                           "final_checkpoint": str(final) if final else None,
                                           "eval": str(eval_json) if eval_json else None}, indent=2))
            self.writer.close()
        dist.barrier()
        self.close()
        return TrainResult(self.output_dir, final, eval_json, self.output_dir / "tensorboard", summary, last,
                           self.config.optim.steps, counters)
