"""Running `jobs.prepare` / `jobs.train` as real subprocesses, as users and Ray jobs do."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from jobs.common.contract import TOKEN_COLUMNS, Manifest
from support import REPO


def job_env(env: dict | None = None) -> dict:
    """This environment without RAY_ADDRESS (each job starts its own local cluster), plus `env`."""
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | (env or {})


def run(module: str, spec: dict, env: dict | None = None, args: tuple[str, ...] = (),
        timeout: float = 500) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", module, "--spec", json.dumps(spec), *args], cwd=REPO, env=job_env(env),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    return proc


@dataclass
class Watched:
    """A finished job: its exit code, each output line with the `time.monotonic()` it was read at,
    and the time it ended."""

    code: int
    lines: list[tuple[float, str]]
    ended: float

    @property
    def output(self) -> str:
        return "".join(line for _, line in self.lines)

    def first(self, text: str, after: float = 0.0) -> float:
        """When the first line holding `text` was read, after `after`."""
        return next(t for t, line in self.lines if t > after and text in line)


def run_watching(spec: dict, on_line: Callable[[str, subprocess.Popen], bool] = lambda line, proc: True,
                 timeout: float = 500, args: tuple[str, ...] = ()) -> Watched:
    """Run `jobs.train` (with command-line `args`) in its own process group, calling
    `on_line(line, proc)` on each output line until it returns True."""
    proc = subprocess.Popen([sys.executable, "-m", "jobs.train", "--spec", json.dumps(spec), *args], cwd=REPO, env=job_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline, lines, done = time.monotonic() + timeout, [], False
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append((time.monotonic(), line))
        if not done:
            done = on_line(line, proc)
        if time.monotonic() > deadline:
            kill_tree(proc)
            raise TimeoutError("".join(line for _, line in lines)[-5000:])
    code = proc.wait(timeout=60)
    return Watched(code, lines, time.monotonic())


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the job and every process it started: its local Ray cluster runs in sessions of
    its own, so killing the job's process group alone leaves the cluster training on."""
    import psutil

    parent = psutil.Process(proc.pid)
    for process in [*parent.children(recursive=True), parent]:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


def train_workers(proc: subprocess.Popen) -> list:
    """The RayTrainWorker processes under a job. Ray starts and ends processes all the time: one
    may be gone, or a zombie, between the listing and the look at its command line."""
    import psutil

    workers = []
    for process in psutil.Process(proc.pid).children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(process.cmdline()):
                workers.append(process)
        except psutil.Error:
            pass
    return workers


def max_difference(a: dict, b: dict) -> float:
    """The largest element-wise difference between two state dicts with the same keys."""
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def latest_registered_step(run_dir: Path) -> int | None:
    """The step of the latest checkpoint Ray Train has registered for a run, if any."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    if not snapshot.exists():
        return None
    try:
        latest = json.loads(snapshot.read_text())["latest_checkpoint_result"]
    except ValueError:  # being rewritten
        return None
    return latest["metrics"]["step"] if latest else None


def step_metrics(output: str) -> dict[int, dict]:
    """Rank 0 prints one JSON object of metrics per report."""
    metrics = {}
    for line in output.splitlines():
        if '{"step"' in line:
            m = json.loads(line[line.index('{"step"'):])
            metrics[m["step"]] = m
    return metrics


def training_spec(tiny_model, prepared, storage, **overrides) -> dict:
    """A short LoRA run of the scaffold model on the demo data, reporting every step."""
    spec = {"name": "t", "model": {"uri": str(tiny_model), "dtype": "fp32"},
            "datasets": [{"uri": str(prepared)}], "method": "lora",
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0}, "optim": {"lr": 0.01, "warmup_ratio": 0.0},
            "batch": {"micro_batch_size": 2, "grad_accum": 2}, "max_steps": 10, "log_every_steps": 1,
            "scaling": {"num_workers": 2}, "eval": {"every_steps": 10},
            "checkpoint": {"storage": str(storage), "every_steps": 5, "keep": 2}}
    return spec | overrides


REFERENCE_STEPS = 20


def reference_spec(tiny_model, prepared, storage, name: str, **overrides) -> dict:
    """20 LoRA steps with dropout on (so the random streams matter), two epochs of 11 steps,
    checkpoints every 5: the run the resume and engine tests kill, resume and compare."""
    return training_spec(tiny_model, prepared, storage, name=name, max_steps=REFERENCE_STEPS,
                         lora={"r": 8, "alpha": 16, "dropout": 0.1}, eval={"every_steps": REFERENCE_STEPS},
                         checkpoint={"storage": str(storage), "every_steps": 5, "keep": 2}) | overrides


@dataclass(frozen=True)
class Finished:
    """A finished reference run: where it lives, what it printed, its final LoRA adapter."""

    run_dir: Path
    output: str
    adapter: dict


def finished(storage: Path, name: str, output: str) -> Finished:
    from safetensors.torch import load_file

    from jobs.common import run_layout

    final = storage / name / run_layout.checkpoint_dir_name(REFERENCE_STEPS) / "adapter_model.safetensors"
    return Finished(storage / name, output, load_file(final))


def stub_manifest(tokenizer_sha256: str, status: str = "succeeded", train_rows: int = 8) -> Manifest:
    """A complete manifest of a small prepared dataset, for tests of its readers."""
    splits = {"train": train_rows, "val": 0}
    return Manifest(
        status=status, name="stub", output="stub", spec={}, spec_hash="0" * 64,
        tokenizer={"uri": "m", "sha256": tokenizer_sha256, "vocab_size": 512, "eos_token": "<|im_end|>",
                   "pad_token": None},
        template={"name": "chatml", "eot": "<|im_end|>", "eot_source": "template", "chat_template": None},
        counts={"rows_read": train_rows, "rows_beyond_max_samples": {}, "accepted": train_rows, "rejected": {},
                "rejected_total": 0, "invalid": 0, "duplicates": 0, "truncated": 0, "dropped": 0, "samples": splits},
        tokens={"all": 64 * train_rows, "trainable": 32 * train_rows,
                "by_split": {"train": {"all": 64 * train_rows, "trainable": 32 * train_rows},
                             "val": {"all": 0, "trainable": 0}}},
        zero_trainable_rows=0, sample_length={}, packing={"mode": "bfd", "max_seq_length": 64, "rows": splits,
                                                          "efficiency": 1.0},
        files=[], columns=list(TOKEN_COLUMNS), seconds=0.0, library_versions={}, created_at="2026-01-01T00:00:00+00:00")
