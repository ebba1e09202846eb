"""A run's bookkeeping, so the training loop does not carry it: per-step records, windows, metrics, totals.

Every micro-step lands in `losses.jsonl` (the main rank's own losses) and in Prometheus (every rank); every
`log_every` optimizer steps a window of them goes to the reporters (TensorBoard, wandb) and the log. A window's
losses are the mean over its steps and over all ranks: one all_reduce of a few numbers per window, so the step's
path gains no synchronisation. Mining's own counters (kept by threads) are exported as increases since the last
step.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from helip.trainer.app.metrics import TrainerMetrics
from helip.trainer.pairs.hard_pairs import BatchLayout
from helip.trainer.pairs.mining import MiningCounters

log = logging.getLogger(__name__)


@dataclass
class Window:
    steps: int = 0
    samples: int = 0
    slots: int = 0
    hard: int = 0
    fallback: int = 0
    compute_s: float = 0.0
    data_wait_s: float = 0.0
    loss_sums: dict[str, float] = field(default_factory=dict)


class RunLog:
    def __init__(
        self,
        output_dir: Path,
        rank: int,
        world_size: int,
        metrics: TrainerMetrics,
        counters: MiningCounters,
        log_every: int,
        accumulation: int,
        reporter=None,
        device: torch.device | str = "cpu",
    ):
        """reporter: where windows go, on the main rank only (None elsewhere). device: where the window's losses
        are all-reduced (the process group's device: CUDA under NCCL)."""
        self.rank = rank
        self.world_size = world_size
        self.metrics = metrics
        self.counters = counters
        self.log_every_micro = log_every * accumulation
        self.accumulation = accumulation
        self.reporter = reporter
        self.device = torch.device(device)
        self.jsonl = open(output_dir / "losses.jsonl", "a") if reporter is not None else None
        self.window = Window()
        self.window_started = time.perf_counter()
        self.totals = {"hard": 0, "fallback": 0, "samples": 0}
        self._exported = counters.snapshot()

    def step(
        self,
        micro: int,
        losses: dict[str, float],
        layout: BatchLayout,
        compute_s: float,
        data_wait_s: float,
        lr: float,
        last: bool,
    ) -> None:
        w = self.window
        w.steps += 1
        w.samples += layout.n_slots * self.world_size
        w.slots += layout.n_slots
        w.hard += layout.n_hard
        w.fallback += layout.n_fallback
        w.compute_s += compute_s
        w.data_wait_s += data_wait_s
        for name, value in losses.items():
            w.loss_sums[name] = w.loss_sums.get(name, 0.0) + value
        self.totals["hard"] += layout.n_hard
        self.totals["fallback"] += layout.n_fallback
        self.totals["samples"] += layout.n_slots
        self._export(layout, compute_s, data_wait_s)
        if self.jsonl is not None:
            self.jsonl.write(
                json.dumps(
                    {
                        "micro_step": micro,
                        **losses,
                        "n_hard": layout.n_hard,
                        "n_fallback": layout.n_fallback,
                        "step_s": round(compute_s, 5),
                        "data_wait_s": round(data_wait_s, 5),
                        "time": time.time(),
                    }
                )
                + "\n"
            )
            self.jsonl.flush()
        done = micro + 1
        if done % self.log_every_micro == 0 or last:
            self._flush_window(done // self.accumulation, lr)

    def _export(self, layout: BatchLayout, compute_s: float, data_wait_s: float) -> None:
        m = self.metrics
        m.step_seconds.observe(compute_s)
        m.data_wait_seconds.observe(data_wait_s)
        m.fallbacks.inc(layout.n_fallback)
        m.hard_pairs.inc(layout.n_hard)
        m.samples.inc(layout.n_slots)
        m.hard_pair_fraction.set(layout.hard_fraction)
        now = self.counters.snapshot()
        was = self._exported
        m.pushed_rows.inc(now["pushed_rows"] - was["pushed_rows"])
        m.dropped_pushes.inc(now["dropped_pushes"] - was["dropped_pushes"])
        m.foreign_ids.inc(now["foreign_ids"] - was["foreign_ids"])
        m.follower_mines.inc(now["mine_by_follower"] - was["mine_by_follower"])
        m.degraded_mines.inc(now["mine_degraded"] - was["mine_degraded"])
        m.guard_dropped.inc(now["guard_dropped"] - was["guard_dropped"])
        m.empty_mines.inc(now["mine_empty"] - was["mine_empty"])
        m.replica_lag_max_seconds.set(now["max_replica_lag_ms"] / 1000)
        missing = ("mine_failures", "mine_late", "mine_skipped")
        m.mine_failures.inc(sum(now[k] - was[k] for k in missing))
        self._exported = now

    def bad_sample(self, kind: str) -> None:
        self.metrics.bad_samples.labels(str(self.rank), kind).inc()

    def window_losses(self) -> dict[str, float]:
        """The current window's mean losses over its steps and every rank (collective: all ranks call it)."""
        names = sorted(self.window.loss_sums)
        sums = torch.tensor([self.window.loss_sums[n] for n in names] + [self.window.steps], dtype=torch.float64)
        if self.world_size > 1 and dist.is_available() and dist.is_initialized():
            sums = sums.to(self.device)
            dist.all_reduce(sums)
            sums = sums.cpu()
        steps = max(1.0, float(sums[-1]))
        return {name: float(total) / steps for name, total in zip(names, sums[:-1])}

    def _flush_window(self, opt_step: int, lr: float) -> None:
        w, elapsed = self.window, time.perf_counter() - self.window_started
        losses = self.window_losses()
        if self.reporter is not None:
            slots = max(1, w.slots)
            scalars = {
                **{f"loss/{name}": value for name, value in losses.items()},
                "mining/hard_fraction": w.hard / slots,
                "mining/fallbacks": w.fallback,
                "perf/data_wait_s": w.data_wait_s,
                "perf/samples_per_s": w.samples / max(elapsed, 1e-9),
                "perf/step_compute_s": w.compute_s / max(1, w.steps),
                "lr": lr,
            }
            self.reporter.log(scalars, opt_step)
            log.info("step %d: %s", opt_step, ", ".join(f"{k}={v:.4g}" for k, v in scalars.items()))
        self.window = Window()
        self.window_started = time.perf_counter()

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
            self.jsonl = None
