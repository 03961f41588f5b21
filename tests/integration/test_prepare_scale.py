"""Preparation at scale on a real local Ray cluster of 2 CPUs (`make test-slow`): the driver
runs with its address space capped far below what the dataset's tokens need in one process,
and a killed tokenize task changes nothing in the output."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path

import pyarrow.dataset as pads
import pytest
from support import driver
from support.conversations import write_conversations

from jobs.common import ray_runtime
from jobs.common.contract import TOKEN_COLUMNS
from jobs.prepare.driver import prepare
from jobs.prepare.inputs import Options
from jobs.prepare.spec import load_spec

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# The driver's address space may grow by this much once it has started (imports, Ray connected,
# tokenizer loaded): ids and labels alone of the capped test's 29 M tokens take 236 MB as int32,
# and the driver before this design held about 40 bytes a token (1.2 GB).
DRIVER_GROWTH_CAP = 128 << 20


@pytest.fixture(scope="module")
def cluster():
    """A 2-CPU local cluster that drivers in other processes join (with its token, which Ray
    keeps in ~/.ray/auth_token or RAY_AUTH_TOKEN, both inherited)."""
    import ray

    ray_runtime.init(num_cpus=2)
    yield {"RAY_ADDRESS": ray.get_runtime_context().gcs_address, "RAY_AUTH_MODE": "token"}
    ray.shutdown()


def spec_for(data: Path, output: Path, tiny_model: Path, rows_per_input_file: int) -> dict:
    """Every global step at work: duplicates (two files read twice, as a second source), weights,
    max_samples across files (all of the first, half the second), the split and BFD packing."""
    return {"name": "scale", "tokenizer": str(tiny_model), "max_seq_length": 2048, "val_ratio": 0.05,
            "dedup": "exact", "output": str(output),
            "sources": [{"uri": str(data / "*.jsonl"), "format": "messages"},
                        {"uri": str(data / "part-[34].jsonl"), "format": "messages", "weight": 1.5,
                         "max_samples": 3 * rows_per_input_file // 2}]}


def test_the_driver_stays_within_a_capped_address_space(cluster, tiny_model, tmp_path, record_property):
    data = write_conversations(100_000, tmp_path / "data")
    proc = driver.start(spec_for(data, tmp_path / "out", tiny_model, 12_500), cluster, cap_growth=DRIVER_GROWTH_CAP)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-4000:]
    measured = driver.measured(out)
    manifest = json.loads((tmp_path / "out/manifest.json").read_text())
    c = manifest["counts"]
    assert c["accepted"] + c["rejected_total"] == c["rows_read"] == 100_000 + 18_750
    assert c["rows_beyond_max_samples"] == {str(data / "part-[34].jsonl"): 6_250}
    assert c["duplicates"] >= 18_750 and manifest["tokens"]["all"] > 25_000_000
    assert measured["address_space_growth"] <= DRIVER_GROWTH_CAP < manifest["tokens"]["all"] * 8
    record_property("tokens", manifest["tokens"]["all"])
    record_property("driver_address_space_growth_mib", round(measured["address_space_growth"] / 2**20, 1))
    record_property("driver_rss_peak_mib", round(measured["rss_peak"] / 2**20, 1))


def read_output(output: Path) -> tuple[str, dict]:
    rejects = "".join(p.read_text() for p in sorted((output / "rejects").glob("part-*.jsonl")))
    tokens = {(split, col): pads.dataset(output / split, format="parquet").to_table().column(col).combine_chunks()
              for split in ("train", "val") for col in TOKEN_COLUMNS}
    return rejects, tokens


def kill_one_tokenize_task(proc: subprocess.Popen, killed: list[int]) -> None:
    """SIGKILL the first Ray worker seen tokenizing, while the job runs."""
    import psutil

    while proc.poll() is None and not killed:
        for worker in psutil.process_iter(["pid", "cmdline"]):
            if "_tokenize_part" in " ".join(worker.info["cmdline"] or ()):
                worker.kill()
                killed.append(worker.info["pid"])
                return
        time.sleep(0.05)


def test_the_same_output_in_process_and_on_ray_with_a_tokenize_task_killed(cluster, tiny_model, tmp_path):
    data = write_conversations(20_000, tmp_path / "data")
    in_process = prepare(load_spec(spec_for(data, tmp_path / "local", tiny_model, 2_500)), Options(in_process_max_bytes=1 << 40))
    killed: list[int] = []
    proc = driver.start(spec_for(data, tmp_path / "ray", tiny_model, 2_500), cluster, "--batch-size", "64")
    killer = threading.Thread(target=kill_one_tokenize_task, args=(proc, killed))
    killer.start()
    out, err = proc.communicate(timeout=600)
    killer.join()
    assert proc.returncode == 0, err[-4000:]
    assert killed, "no tokenize task was seen running"
    on_ray = json.loads((tmp_path / "ray/manifest.json").read_text())
    assert on_ray["counts"] == in_process.counts.model_dump() and on_ray["tokens"] == in_process.tokens.model_dump()
    (local_rejects, local_tokens), (ray_rejects, ray_tokens) = read_output(tmp_path / "local"), read_output(tmp_path / "ray")
    assert local_rejects == ray_rejects and local_rejects.count("\n") == on_ray["counts"]["rejected_total"]
    for key, column in local_tokens.items():
        assert column.equals(ray_tokens[key]), key
