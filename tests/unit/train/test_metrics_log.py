"""The metrics history beside a run: written at once when it matters, and rewritten without the
steps a resumed run repeats."""

from __future__ import annotations

import json

from jobs.train.metrics_log import MetricsLog


def test_metrics_history_drops_the_steps_a_resumed_run_repeats(tmp_path):
    log = MetricsLog(str(tmp_path / "run"), resume_step=0, interval_s=3600)
    for step in range(1, 6):
        log.add({"step": step, "loss": 1.0 / step})
    # The first entry is written at once, the next ones wait for the interval.
    assert len((tmp_path / "run/metrics.jsonl").read_text().splitlines()) == 1
    log.add({"step": 6, "eval_loss": 0.5}, important=True)  # evaluations and checkpoints are written at once
    assert len((tmp_path / "run/metrics.jsonl").read_text().splitlines()) == 6
    resumed = MetricsLog(str(tmp_path / "run"), resume_step=4)
    resumed.add({"step": 5, "loss": 0.2}, important=True)
    steps = [json.loads(line)["step"] for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]


def test_gpu_figures_are_each_workers_with_the_largest_on_top():
    from jobs.train.loop import merged_accelerators

    workers = [{"gpu_peak_allocated_gib": 10.0, "gpu_peak_reserved_gib": 12.0, "gpu_utilization_pct": 90.0},
               {"gpu_peak_allocated_gib": 11.0, "gpu_peak_reserved_gib": 11.5}]  # no NVML on this node
    assert merged_accelerators(workers) == {"gpu_peak_allocated_gib": 11.0, "gpu_peak_reserved_gib": 12.0,
                                            "gpu_utilization_pct": 90.0, "gpu_workers": workers}
