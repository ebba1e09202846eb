"""A run's bookkeeping, so the training loop does not carry it: per-step records, windows, metrics, totals.

Every micro-step lands in `losses.jsonl` (main rank) and in Prometheus (every rank); every `log_every` optimizer
steps a window of them goes to TensorBoard and the log. Mining's own counters (kept by threads) are exported as
increases since the last step.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from trainer.hard_pairs import BatchLayout
from trainer.metrics import TrainerMetrics
from trainer.mining import MiningCounters

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
        writer=None,
    ):
        self.rank = rank
        self.world_size = world_size
        self.metrics = metrics
        self.counters = counters
        self.log_every_micro = log_every * accumulation
        self.accumulation = accumulation
        self.writer = writer  # TensorBoard, main rank only
        self.jsonl = open(output_dir / "losses.jsonl", "a") if writer is not None else None
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
            self._flush_window(done // self.accumulation, losses, lr)

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
        m.replica_lag_max_seconds.set(now["max_replica_lag_ms"] / 1000)
        missing = ("mine_failures", "mine_late", "mine_skipped")
        m.mine_failures.inc(sum(now[k] - was[k] for k in missing))
        self._exported = now

    def bad_sample(self, kind: str) -> None:
        self.metrics.bad_samples.labels(str(self.rank), kind).inc()

    def _flush_window(self, opt_step: int, losses: dict[str, float], lr: float) -> None:
        w, elapsed = self.window, time.perf_counter() - self.window_started
        if self.writer is not None:
            slots = max(1, w.slots)
            scalars = {
                "loss/total": losses["total"],
                "loss/contrastive": losses["contrastive"],
                "loss/hnml": losses["hnml"],
                "mining/hard_fraction": w.hard / slots,
                "mining/fallbacks": w.fallback,
                "perf/data_wait_s": w.data_wait_s,
                "perf/samples_per_s": w.samples / max(elapsed, 1e-9),
                "perf/step_compute_s": w.compute_s / max(1, w.steps),
                "lr": lr,
            }
            for name, value in scalars.items():
                self.writer.add_scalar(name, value, opt_step)
            log.info("step %d: %s", opt_step, ", ".join(f"{k}={v:.4g}" for k, v in scalars.items()))
        self.window = Window()
        self.window_started = time.perf_counter()

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
            self.jsonl = None
