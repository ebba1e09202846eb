"""The training loop: DeepSpeed around an open_clip model, online hard pairs from the miner, HELIP's loss.

This module wires the public parts (datasets, HardPairSampler, EmbeddingPusher, HelipLoss) to DeepSpeed, the
same parts any other loop uses (see examples/), and owns nothing else.
"""

from __future__ import annotations

import dataclasses
import functools
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

from trainer.bootstrap import bootstrap_index, miner_rows
from trainer.checkpoints import Checkpointer
from trainer.config import TrainConfig, to_dict
from trainer.data import open_pairs
from trainer.hard_pairs import HardPairSampler, hard_pair_loader
from trainer.launch import dist_env
from trainer.ledger import BadSampleLedger
from trainer.local_miner import LocalMiner
from trainer.losses import HelipLoss
from trainer.metrics import TrainerMetrics
from trainer.mining import MiningCounters, make_client
from trainer.model import build_model, vectorize_scalar_parameters
from trainer.namespace import NamespaceMismatch, claim_namespace, dataset_fingerprint, run_namespace
from trainer.precision import apply_precision, enabled_precision
from trainer.pusher import EmbeddingPusher
from trainer.runlog import RunLog
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


def setup_distributed() -> tuple[int, int, int]:
    """Join the process group the launcher (torchrun, deepspeed, srun) describes, or a group of one."""
    import deepspeed

    env = dist_env(os.environ)
    os.environ.update(env.export())
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    log.info("rank %d of %d (local rank %d, launcher %s)", env.rank, env.world_size, env.local_rank, env.launcher)
    return dist.get_rank(), dist.get_world_size(), env.local_rank


def broadcast(value, src: int = 0):
    """`value` of rank `src`, on every rank."""
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def deepspeed_config(config: TrainConfig) -> dict:
    """The user's DeepSpeed JSON with our values filled in where it says "auto", and model.precision's bf16/fp16
    blocks (trainer.precision; a JSON that disagrees is a ValueError), unless the device lacks that precision."""
    from deepspeed.accelerator import get_accelerator

    source = config.run.deepspeed_config
    ds = apply_precision(json.loads(Path(source).read_text()), config.model.precision, source)
    if ds.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        ds["train_micro_batch_size_per_gpu"] = config.optim.batch_size
    if ds.get("gradient_clipping", "auto") == "auto":
        ds["gradient_clipping"] = config.optim.grad_clip
    if ds.get("train_batch_size") == "auto":
        del ds["train_batch_size"]
    accelerator = get_accelerator()
    for key, supported in (("bf16", accelerator.is_bf16_supported()), ("fp16", accelerator.is_fp16_supported())):
        if ds.get(key, {}).get("enabled") and not supported:
            log.warning("model.precision is %s but %s lacks it: training in fp32", key, accelerator.device_name())
            ds[key]["enabled"] = False
    return ds


def refuse_local_miner_across_hosts(hosts: list[str], dim: int) -> None:
    """A local miner listens on 127.0.0.1 of one host: ranks on other hosts could not reach it."""
    distinct = sorted(set(hosts))
    if len(distinct) > 1:
        raise RuntimeError(
            f"these {len(hosts)} ranks run on {len(distinct)} hosts ({', '.join(distinct)}) and no --miner was "
            f"given; a local miner would be reachable from one host only. Start one miner for the run "
            f"(`helip-miner serve --dim {dim} --host 0.0.0.0 --port 50051`, with a token or TLS) and pass "
            f"--miner HOST:50051 to every rank."
        )


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
        config.model.device = device
        # open_clip builds fp32 weights; DeepSpeed casts them to model.precision itself (deepspeed_config).
        self.model, preprocess_train, self.preprocess_val, self.tokenizer = build_model(
            dataclasses.replace(config.model, precision="fp32")
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

        optim = config.optim
        vectorize_scalar_parameters(self.model)  # DeepSpeed cannot broadcast 0-dim parameters
        ds_config = deepspeed_config(config)
        self.accumulation = int(ds_config.get("gradient_accumulation_steps", 1))
        optim.steps = optim.steps_for(len(self.dataset), self.world_size, self.accumulation)
        if optim.epochs:
            log.info("%d epochs of %d samples: %d optimizer steps", optim.epochs, len(self.dataset), optim.steps)
        # Locked towers' parameters stay out of the optimizer: no updates, no weight decay, no optimizer state.
        trainable = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        decay = [p for n, p in trainable if p.ndim >= 2 and "logit_scale" not in n]
        no_decay = [p for n, p in trainable if p.ndim < 2 or "logit_scale" in n]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=optim.lr,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: warmup_cosine(s, optim.warmup_steps, optim.steps, optim.min_lr_ratio)
        )
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
        )
        log.info(
            "training in %s (model.precision, DeepSpeed %s)", enabled_precision(ds_config), config.run.deepspeed_config
        )
        self.input_dtype = (
            torch.bfloat16
            if self.engine.bfloat16_enabled()
            else torch.float16
            if self.engine.fp16_enabled()
            else torch.float32
        )
        self.checkpoints = Checkpointer(
            self.engine,
            self.output_dir,
            config.model,
            keep=config.run.keep_checkpoints,
            accumulation=self.accumulation,
            is_main=self.is_main,
        )
        self.loss = HelipLoss(config.loss, rank=self.rank, world_size=self.world_size)

        self.counters = MiningCounters()
        self.mining_on = optim.hard_ratio > 0
        self.local_miner = None
        self.client = self.pusher = None
        self.mining = config.mining  # with the local miner's address filled in below, when there is one
        if self.mining_on:
            self.mining = dataclasses.replace(
                config.mining,
                address=self._miner_address(),
                namespace=config.mining.namespace or run_namespace(self.output_dir),
            )
            self.client = make_client(self.mining)
            self._claim_namespace()
            self.pusher = EmbeddingPusher(self.client, self.mining, self.counters)
        self.metrics = TrainerMetrics.create(self.rank)
        if config.run.metrics_port:
            port = self.metrics.serve(config.run.metrics_port + self.local_rank, config.run.metrics_host)
            log.info("rank %d metrics on %s:%d/metrics", self.rank, config.run.metrics_host, port)
        self.writer = None  # the run's reporters (run.report_to), main rank only
        if self.is_main:
            from trainer.reporting import create_reporters

            self.writer = create_reporters(
                config.run.reporters,
                self.output_dir,
                wandb_project=config.run.wandb_project,
                wandb_notes=config.run.wandb_notes,
                config=to_dict(config),
            )
            (self.output_dir / "config.json").write_text(json.dumps(to_dict(config), indent=2, default=str))
        self.sampler = None

    def _miner_address(self) -> str:
        """The configured miner, or a local one that global rank 0 starts and every rank is told about."""
        if self.config.mining.address:
            return self.config.mining.address
        hosts = [None] * self.world_size
        dist.all_gather_object(hosts, socket.gethostname())
        refuse_local_miner_across_hosts(hosts, self.embed_dim)
        address = None
        if self.is_main:
            self.local_miner = LocalMiner(self.output_dir, self.embed_dim)
            address = self.local_miner.address
        return broadcast(address)

    def _claim_namespace(self) -> None:
        """Rank 0 claims the run's namespace for this data set; every rank stops on a mismatch."""
        refusal = None
        if self.is_main:
            try:
                claim_namespace(
                    self.client,
                    self.mining.namespace,
                    self.embed_dim,
                    dataset_fingerprint(self.dataset),
                    reset=self.mining.reset_namespace,
                )
            except NamespaceMismatch as error:
                refusal = str(error)
        refusal = broadcast(refusal)
        if refusal is not None:
            self.client.close()
            if self.local_miner is not None:
                self.local_miner.stop()
            raise NamespaceMismatch(refusal)

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
                generate(
                    SynthConfig(
                        out_dir=root,
                        train_size=data.synth_train,
                        test_size=data.synth_test,
                        seed=data.synth_seed,
                    )
                )
            dist.barrier()
            data.train = str(root / "train.csv")
            data.eval_dir = data.eval_dir or str(root)

    # ---- the loop ---------------------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        from tqdm import tqdm

        config = self.config
        total_micro = config.optim.steps * self.accumulation
        start_micro = self.checkpoints.resume(config.run.resume)
        if self._needs_bootstrap(start_micro):
            self._bootstrap()
        self.sampler = HardPairSampler(
            len(self.dataset),
            config.optim.batch_size,
            self.client,
            self.mining,
            hard_ratio=config.optim.hard_ratio,
            rank=self.rank,
            world_size=self.world_size,
            seed=config.optim.seed,
            num_workers=config.data.workers,
            prefetch_factor=config.data.prefetch_factor,
            steps=total_micro,
            start_step=start_micro,
            counters=self.counters,
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
        ckpt_every = config.run.checkpoint_every * self.accumulation
        epoch_micro = self.sampler.anchors.steps_per_epoch  # micro-steps per epoch on every rank
        eval_every = config.run.eval_every * self.accumulation
        # Zero-shot on data.zeroshot_dir counts epochs (open_clip's --zeroshot-frequency); an epoch is the sampler's:
        # every sample once as an anchor, steps_per_epoch micro-steps on each rank.
        zeroshot_every = config.run.zeroshot_frequency * self.sampler.anchors.steps_per_epoch
        last: dict[str, float] = {}
        batches = iter(loader)
        for micro in range(start_micro, total_micro):
            waited = time.perf_counter()
            batch = next(batches)
            waited = time.perf_counter() - waited
            layout = self.sampler.layout(batch.ids)
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
            if ckpt_every and done % ckpt_every == 0 and done != total_micro:
                self.checkpoints.save(done)
            if done % epoch_micro == 0:
                epoch = done // epoch_micro
                self.checkpoints.export(f"epoch_{epoch}", step=done // self.accumulation, epoch=epoch)
            periodic = bool(eval_every) and done % eval_every == 0
            zero_shot = bool(zeroshot_every) and done % zeroshot_every == 0
            if (periodic or zero_shot) and done != total_micro:
                self._evaluate(f"step_{done // self.accumulation}", periodic=periodic, zero_shot=zero_shot)
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

    def _needs_bootstrap(self, start_micro: int) -> bool:
        """Fresh runs bootstrap when asked to; resumed ones whenever the miner lacks rows (a new local miner)."""
        if self.pusher is None:
            return False
        if start_micro == 0:
            return self.config.mining.bootstrap_index
        rows = None
        if self.is_main:
            try:
                rows = miner_rows(self.client)
            except Exception as error:  # noqa: BLE001 - an unreachable miner: training goes on without hard pairs
                log.warning("cannot read the miner's row count (%s): not bootstrapping", error)
        rows = broadcast(rows)
        if rows is None:
            return False
        if rows < len(self.dataset):
            log.info(
                "the miner holds %d rows for %d samples: bootstrapping before the first resumed step",
                rows,
                len(self.dataset),
            )
            return True
        return False

    def _bootstrap(self) -> None:
        bootstrap_index(
            self.engine.module,
            self.dataset,
            self.pusher,
            rank=self.rank,
            world_size=self.world_size,
            batch_size=self.config.optim.batch_size * 4,
            num_workers=self.config.data.workers,
            device=self.device,
            dtype=self.input_dtype,
            step=int(self.engine.global_steps),
            progress=self.is_main and self.config.run.progress,
        )
        dist.barrier()  # every rank's rows are in before anyone mines

    def _step(self, batch, couples: torch.Tensor) -> dict[str, torch.Tensor]:
        images = batch.images.to(self.device, self.input_dtype, non_blocking=True)
        tokens = batch.tokens.to(self.device, non_blocking=True)
        out = self.engine(images, tokens)
        image_features, text_features = out["image_features"], out["text_features"]
        losses = self.loss(image_features.float(), text_features.float(), out["logit_scale"].float(), couples)
        self.engine.backward(losses["total"])
        self.engine.step()
        with torch.no_grad():  # open_clip clamps the learned temperature at 100, as CLIP does
            self.engine.module.logit_scale.clamp_(0, np.log(100))
        if self.pusher is not None and self.config.mining.update_index:
            self.pusher.push(batch.ids, image_features, text_features, self.engine.global_steps)
        return losses

    @functools.cached_property
    def eval_suite(self):
        """The evaluation data, loaded at the first eval: after _prepare_data, which may set data.eval_dir."""
        from trainer.eval import suite_from_data

        return suite_from_data(self.config.data)

    def _evaluate(self, name: str, periodic: bool = True, zero_shot: bool = True) -> Path | None:
        """Evaluate on rank 0 and write eval/NAME.json. `periodic`: the synth layout, the retrieval CSV (every
        run.eval_every steps); `zero_shot`: data.zeroshot_dir (every run.zeroshot_frequency epochs)."""
        if not self.is_main or self.eval_suite is None:
            return None
        from trainer.eval import evaluate_suite

        # Under bf16/fp16 DeepSpeed holds half-precision weights: autocast feeds them matching inputs.
        with torch.autocast(self.device.type, dtype=self.input_dtype, enabled=self.input_dtype != torch.float32):
            metrics = evaluate_suite(
                self.engine.module,
                self.tokenizer,
                self.preprocess_val,
                self.eval_suite,
                device=self.device,
                periodic=periodic,
                folder_zero_shot=zero_shot,
            )
        if not metrics:
            return None
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
        if self.sampler is not None:
            self.sampler.close()
        if self.pusher is not None:
            self.pusher.close(timeout_s=10)
        if self.client is not None:
            self.client.close()
        if self.local_miner is not None:
            self.local_miner.stop()

    def _finish(self, final: Path | None, eval_json: Path | None, last: dict, totals: dict) -> TrainResult:
        if self.pusher is not None:
            self.pusher.flush(30)
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
