"""Benchmark of the preparation stage: throughput against the raw tokenizer and `datasets.map`,
the driver's memory at two data sizes, and the cache.

    python benchmarks/prepare.py [--conversations 100000] [--scale 10] [--cpus 2]

One run, one machine, one rendered text. Conversations are generated from the example data's
sentences (`tests/support/conversations.py`: 30% with a system prompt, 1-3 exchanges, ~295 tokens
each with the scaffold tokenizer). It measures:
  1. raw `tokenizer(batch)` tokens/s on one core (TOKENIZERS_PARALLELISM=false), over the texts
     the chat template renders;
  2. `datasets.map(batched=True, num_proc=N)` running the job's own render + tokenize + mask
     function (`jobs.prepare.stages.RenderTokenize`) over the same conversations;
  3. `jobs.prepare` end to end on a local Ray cluster of N CPUs, as `ray job submit` runs it: a
     driver process joining the cluster (`tests/support/driver.py`), Ray path; tokens/s over
     the job's own clock (from the inputs resolved to the manifest written), and the driver's
     peak RSS;
  4. the same preparation again: a cache hit, the whole CLI's wall time;
  5. `--scale` times the conversations (300 M tokens by default), prepared the same way: the
     driver's peak RSS again, which must not grow with the data.
It prints what it measured as JSON, for docs/benchmarks.md, and which targets were met.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the generated conversations and the measured driver

from support import driver  # noqa: E402
from support.conversations import conversations, write_conversations  # noqa: E402

from jobs import scaffold_model  # noqa: E402
from jobs.common import tokenizer_files  # noqa: E402
from jobs.prepare.spec import DatasetSpec  # noqa: E402
from jobs.prepare.stages import RenderTokenize  # noqa: E402

_STAGE = None


def _map_fn(batch, spec_json, tok_dir):
    global _STAGE
    if _STAGE is None:  # once per worker process, as the job caches it per Ray worker
        _STAGE = RenderTokenize(DatasetSpec.model_validate_json(spec_json), tokenizer_files.load(tokenizer_files.fetch(tok_dir)))
    cols = _STAGE.columns([json.loads(m) for m in batch["messages"]])  # as parsed rows reach the job's stage
    return {"input_ids": cols["input_ids"], "labels": cols["labels"], "reason": cols["reason"]}


def spec_for(data: Path, output: Path, tok_dir: Path) -> dict:
    return {"name": "bench", "sources": [{"uri": str(data / "*.jsonl"), "format": "messages"}],
            "tokenizer": str(tok_dir), "template": "tokenizer", "max_seq_length": 4096, "packing": "bfd",
            "dedup": "exact", "output": str(output)}


def run_job(spec: dict, cluster: dict, *args: str) -> tuple[dict, dict, float]:
    """The job as a driver joining the cluster: its manifest, its memory, and the CLI's wall time."""
    started = time.perf_counter()
    proc = driver.start(spec, cluster, *args)
    out, err = proc.communicate()
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"jobs.prepare failed:\n{err[-4000:]}")
    for line in err.splitlines():  # where the job's time went: its steps, as it logs them
        if " INFO prepare: " in line and " in " in line and "rows/s" not in line:
            print("   ", line.split(" INFO ", 1)[1], flush=True)
    return json.loads((Path(spec["output"]) / "manifest.json").read_text()), driver.measured(out), wall


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conversations", type=int, default=100_000)
    parser.add_argument("--scale", type=int, default=10,
                        help="the memory run's size, in times --conversations (0: no memory run)")
    parser.add_argument("--cpus", type=int, default=os.cpu_count())
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="raysft-bench-"))
    tok_dir = work / "model"
    scaffold_model.scaffold(tok_dir)
    convs = list(conversations(args.conversations))
    data = write_conversations(args.conversations, work / "data")
    spec = spec_for(data, work / "out", tok_dir)
    stage = RenderTokenize(DatasetSpec.model_validate(spec), tokenizer_files.load(tokenizer_files.fetch(str(tok_dir))))
    texts = [stage.template.render(json.loads(c)).text for c in convs]
    print(f"{len(convs)} conversations, {sum(map(len, texts)) / 1e6:.1f} M characters, {args.cpus} CPUs", flush=True)

    # 1. raw tokenizer, one core
    t0 = time.perf_counter()
    raw_tokens = sum(len(ids) for i in range(0, len(texts), 1000)
                     for ids in stage.tokenizer(texts[i:i + 1000], add_special_tokens=False)["input_ids"])
    raw_tps = raw_tokens / (time.perf_counter() - t0)
    print(f"raw tokenizer(batch): {raw_tokens} tokens, {raw_tps:,.0f} tokens/s per core", flush=True)

    # 2. datasets.map with the job's own function
    import datasets

    datasets.disable_caching()
    datasets.disable_progress_bars()
    dset = datasets.Dataset.from_dict({"messages": convs})
    t0 = time.perf_counter()
    mapped = dset.map(_map_fn, batched=True, batch_size=256, num_proc=args.cpus, remove_columns=["messages"],
                      fn_kwargs={"spec_json": json.dumps(spec), "tok_dir": str(tok_dir)})
    map_s = time.perf_counter() - t0
    map_tokens = sum(len(x) for x in mapped.data.column("input_ids").to_pylist())
    map_tps = map_tokens / map_s
    print(f"datasets.map(num_proc={args.cpus}): {map_tokens} tokens in {map_s:.1f}s, {map_tps:,.0f} tokens/s", flush=True)
    del convs, texts, dset, mapped

    # 3. jobs.prepare end to end, a driver joining a local cluster
    import ray

    from jobs.common import ray_runtime

    ray_runtime.init(num_cpus=args.cpus)
    cluster = {"RAY_ADDRESS": ray.get_runtime_context().gcs_address, "RAY_AUTH_MODE": "token"}
    manifest, memory, _ = run_job(spec, cluster)
    prep_tokens, prep_s = manifest["tokens"]["all"], manifest["seconds"]
    prep_tps = prep_tokens / prep_s
    print(f"jobs.prepare end to end: {prep_tokens} tokens in {prep_s:.1f}s, {prep_tps:,.0f} tokens/s, driver peak RSS "
          f"{memory['rss_peak'] / 2**20:.0f} MiB (packing fill {manifest['packing']['efficiency']:.2%})", flush=True)
    if not (raw_tokens == map_tokens == prep_tokens):
        print(f"note: token totals differ (raw {raw_tokens}, map {map_tokens}, prepare {prep_tokens})")

    # 4. the same preparation again, as the plain CLI: reused
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "jobs.prepare", "--spec", json.dumps(spec)], cwd=REPO,
                          env=os.environ | cluster, capture_output=True, text=True)
    cli_wall = time.perf_counter() - started
    reused = proc.returncode == 0 and "reusing" in proc.stderr
    print(f"cache hit: reused {reused}, CLI wall time {cli_wall:.2f}s (Python start-up and imports included)", flush=True)

    # 5. the driver's memory at --scale times the data
    big = big_memory = None
    if args.scale:
        big_data = write_conversations(args.conversations * args.scale, work / "big-data")
        big, big_memory, _ = run_job(spec_for(big_data, work / "big-out", tok_dir), cluster)
        growth = big_memory["rss_peak"] / memory["rss_peak"] - 1
        print(f"x{args.scale}: {big['tokens']['all']} tokens in {big['seconds']:.1f}s, driver peak RSS "
              f"{big_memory['rss_peak'] / 2**20:.0f} MiB ({growth:+.1%})", flush=True)
    ray.shutdown()
    shutil.rmtree(work, ignore_errors=True)

    result = {
        "conversations": args.conversations, "cpus": args.cpus, "tokens": raw_tokens,
        "raw_tokenizer_tokens_per_s_per_core": round(raw_tps),
        "datasets_map_tokens_per_s": round(map_tps), "datasets_map_seconds": round(map_s, 2),
        "prepare_tokens_per_s": round(prep_tps), "prepare_seconds": prep_s,
        "prepare_vs_datasets_map": round(prep_tps / map_tps, 3),
        "prepare_vs_raw_x_cores": round(prep_tps / (raw_tps * args.cpus), 3),
        "driver_rss_peak_mib": round(memory["rss_peak"] / 2**20, 1),
        "cache_hit": reused, "cache_hit_cli_wall_s": round(cli_wall, 2),
    }
    if big is not None:
        result |= {"scale_tokens": big["tokens"]["all"], "scale_seconds": big["seconds"],
                   "scale_driver_rss_peak_mib": round(big_memory["rss_peak"] / 2**20, 1),
                   "driver_rss_growth": round(growth, 3)}
    print(json.dumps(result, indent=2))
    targets = {
        "prepare >= 0.85x raw x cores": result["prepare_vs_raw_x_cores"] >= 0.85,
        "prepare >= 1.15x datasets.map": result["prepare_vs_datasets_map"] >= 1.15,
        "cache hit < 2 s": reused and cli_wall < 2,
    }
    if big is not None:
        targets |= {"driver RSS grows < 20% over 10x the tokens": growth < 0.2,
                    "driver RSS < 1.5 GiB": big_memory["rss_peak"] < 1.5 * 2**30}
    for name, met in targets.items():
        print(f"target {name}: {'met' if met else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
