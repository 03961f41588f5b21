"""Benchmark of the preparation stage against the raw tokenizer and `datasets.map`.

    python benchmarks/prepare.py [--conversations 100000] [--cpus 2]

One run, one machine, one rendered text. It generates multi-turn conversations from the example
data's sentences, then measures:
  1. raw `tokenizer(batch)` tokens/s on one core (TOKENIZERS_PARALLELISM=false), over the texts
     the chat template renders;
  2. `datasets.map(batched=True, num_proc=N)` running the job's own render + tokenize + mask
     function (`jobs.prepare.stages.RenderTokenize`) over the same conversations;
  3. `jobs.prepare` end to end (read, parse, de-duplicate, render, tokenize, mask, pack, write) on
     a local Ray cluster of N CPUs, counted from the call, after the cluster has started.
It prints tokens/s and the ratios, and the JSON it prints can be pasted into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from jobs import scaffold_model  # noqa: E402
from jobs.common import tokenizer_files  # noqa: E402
from jobs.prepare import records  # noqa: E402
from jobs.prepare.spec import load_spec  # noqa: E402
from jobs.prepare.stages import RenderTokenize  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FILES = 8


def sentences() -> list[str]:
    out = set()
    for path in sorted((REPO / "configs/data").iterdir()):
        for row in records.split_rows(path.name, path.read_bytes()):
            for text in scaffold_model._strings(row.record) if row.record else ():
                out.update(s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if len(s.strip()) > 20)
    return sorted(out)


def generate(n: int, out_dir: Path, seed: int = 0) -> list[str]:
    """n conversations as OpenAI messages JSONL in FILES files; returns their messages as JSON."""
    rng = random.Random(seed)
    pool = sentences()
    convs = []
    for _ in range(n):
        msgs = [{"role": "system", "content": rng.choice(pool)}] if rng.random() < 0.3 else []
        for _ in range(rng.randint(1, 3)):
            msgs.append({"role": "user", "content": " ".join(rng.sample(pool, rng.randint(1, 2)))})
            msgs.append({"role": "assistant", "content": " ".join(rng.sample(pool, rng.randint(2, 6)))})
        convs.append(json.dumps(msgs))
    out_dir.mkdir(parents=True, exist_ok=True)
    per_file = -(-n // FILES)
    for i in range(FILES):
        chunk = convs[i * per_file:(i + 1) * per_file]
        (out_dir / f"part-{i}.jsonl").write_text("".join(f'{{"messages": {c}}}\n' for c in chunk))
    return convs


_STAGE = None


def _map_fn(batch, spec_json, tok_dir):
    global _STAGE
    if _STAGE is None:  # once per worker process, like the job's actors
        from jobs.prepare.spec import DatasetSpec
        _STAGE = RenderTokenize(DatasetSpec.model_validate_json(spec_json), tokenizer_files.load(tokenizer_files.fetch(tok_dir)))
    cols = _STAGE.columns(batch["messages"])
    return {"input_ids": cols["input_ids"], "labels": cols["labels"], "reason": cols["reason"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conversations", type=int, default=100_000)
    parser.add_argument("--cpus", type=int, default=os.cpu_count())
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="raysft-bench-"))
    tok_dir = work / "model"
    scaffold_model.scaffold(tok_dir)
    convs = generate(args.conversations, work / "data")
    spec = load_spec({"name": "bench", "sources": [{"uri": str(work / "data/*.jsonl"), "format": "messages"}],
                      "tokenizer": str(tok_dir), "template": "chatml", "max_seq_length": 4096,
                      "packing": "bfd", "dedup": "exact", "output": str(work / "out")})
    stage = RenderTokenize(spec, tokenizer_files.load(tokenizer_files.fetch(str(tok_dir))))
    texts = [stage.template.render(json.loads(c)).text for c in convs]
    print(f"{len(convs)} conversations, {sum(map(len, texts)) / 1e6:.1f} M characters, {args.cpus} CPUs", flush=True)

    # 1. raw tokenizer, one core
    tok = stage.tokenizer
    t0 = time.perf_counter()
    raw_tokens = sum(len(ids) for i in range(0, len(texts), 1000)
                     for ids in tok(texts[i:i + 1000], add_special_tokens=False)["input_ids"])
    raw_tps = raw_tokens / (time.perf_counter() - t0)
    print(f"raw tokenizer(batch): {raw_tokens} tokens, {raw_tps:,.0f} tokens/s per core", flush=True)

    # 2. datasets.map with the job's own function
    import datasets

    datasets.disable_caching()
    dset = datasets.Dataset.from_dict({"messages": convs})
    t0 = time.perf_counter()
    mapped = dset.map(_map_fn, batched=True, batch_size=256, num_proc=args.cpus, remove_columns=["messages"],
                      fn_kwargs={"spec_json": spec.model_dump_json(), "tok_dir": str(tok_dir)})
    map_s = time.perf_counter() - t0
    map_tokens = sum(len(x) for x in mapped.data.column("input_ids").to_pylist())
    map_tps = map_tokens / map_s
    print(f"datasets.map(num_proc={args.cpus}): {map_tokens} tokens in {map_s:.1f}s, {map_tps:,.0f} tokens/s", flush=True)

    # 3. jobs.prepare end to end on a local Ray cluster
    from jobs.common import ray_runtime
    from jobs.prepare.driver import prepare

    ray_runtime.init(num_cpus=args.cpus)
    t0 = time.perf_counter()
    manifest = prepare(spec)
    prep_s = time.perf_counter() - t0
    prep_tokens = manifest.tokens.all
    prep_tps = prep_tokens / prep_s
    print(f"jobs.prepare end to end: {prep_tokens} tokens in {prep_s:.1f}s, {prep_tps:,.0f} tokens/s "
          f"(packing efficiency {manifest.packing.efficiency:.2%})", flush=True)
    if not (raw_tokens == map_tokens == prep_tokens):
        print(f"note: token totals differ (raw {raw_tokens}, map {map_tokens}, prepare {prep_tokens})")

    result = {
        "conversations": len(convs), "cpus": args.cpus, "tokens": raw_tokens,
        "raw_tokenizer_tokens_per_s_per_core": round(raw_tps),
        "datasets_map_tokens_per_s": round(map_tps), "datasets_map_seconds": round(map_s, 2),
        "prepare_tokens_per_s": round(prep_tps), "prepare_seconds": round(prep_s, 2),
        "prepare_vs_datasets_map": round(prep_tps / map_tps, 3),
        "prepare_vs_raw_x_cores": round(prep_tps / (raw_tps * args.cpus), 3),
    }
    print(json.dumps(result, indent=2))
    print(f"targets: prepare >= 1.5x datasets.map: {'met' if result['prepare_vs_datasets_map'] >= 1.5 else 'NOT met'}; "
          f"prepare >= 0.7x raw x cores: {'met' if result['prepare_vs_raw_x_cores'] >= 0.7 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
