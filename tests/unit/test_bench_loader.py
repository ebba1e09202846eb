"""bench.loader's arithmetic: throughput, CPU per sample and workers needed, from hand-made runs."""

from bench.loader import Run, summarize_runs


def test_summarize_runs_pools_repeats_and_sizes_workers():
    runs = [
        Run(
            "hard",
            2,
            samples=1000,
            seconds=2.0,
            cpu_main_s=0.1,
            cpu_workers_s=1.9,
            n_hard=400,
            hard_slots=500,
            counters={"mine_calls": 5, "mine_late": 1},
        ),
        Run(
            "hard",
            2,
            samples=1000,
            seconds=2.0,
            cpu_main_s=0.1,
            cpu_workers_s=1.9,
            n_hard=500,
            hard_slots=500,
            counters={"mine_calls": 5},
        ),
    ]
    s = summarize_runs(runs, target_rate=1000.0)
    assert s["samples_per_s"] == 500.0 and s["samples_per_s_per_worker"] == 250.0
    assert s["samples_per_s_runs"] == [500.0, 500.0] and s["spread"] == 0.0
    assert abs(s["cpu_ms_per_sample"] - 2.0) < 1e-9 and abs(s["cpu_ms_per_sample_workers"] - 1.9) < 1e-9
    assert s["cpu_ms_per_sample_estimate"] == 4.0  # 2 workers x 4 s wall / 2000 samples
    assert s["workers_for_target"] == 4  # 1000 samples/s at 250 per worker
    assert s["workers_for_target_by_cpu"] == 2  # 1000 samples/s x 1.9 ms of worker CPU = 1.9 cores
    assert s["hard_slots_filled"] == 0.9
    assert (s["mine_calls"], s["mine_late"], s["mine_failures"]) == (10, 1, 0)
