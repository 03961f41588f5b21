"""Generated multi-turn conversations from the example data's sentences, for the scale tests and
the preparation benchmark: 30% with a system prompt, 1-3 exchanges, in OpenAI messages JSONL."""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterator
from functools import cache
from pathlib import Path

from jobs import scaffold_model
from jobs.prepare import records

REPO = Path(__file__).resolve().parents[2]


@cache
def sentences() -> tuple[str, ...]:
    out = set()
    for path in sorted((REPO / "configs/data").iterdir()):
        for row in records.split_rows(path.name, path.read_bytes()):
            for text in scaffold_model._strings(row.record) if row.record else ():
                out.update(s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if len(s.strip()) > 20)
    return tuple(sorted(out))


def conversations(n: int, seed: int = 0) -> Iterator[str]:
    """n conversations, each as its messages' JSON; the same n and seed give the same ones."""
    rng, pool = random.Random(seed), sentences()
    for _ in range(n):
        msgs = [{"role": "system", "content": rng.choice(pool)}] if rng.random() < 0.3 else []
        for _ in range(rng.randint(1, 3)):
            msgs.append({"role": "user", "content": " ".join(rng.sample(pool, rng.randint(1, 2)))})
            msgs.append({"role": "assistant", "content": " ".join(rng.sample(pool, rng.randint(2, 6)))})
        yield json.dumps(msgs)


def write_conversations(n: int, out_dir: Path, files: int = 8, seed: int = 0) -> Path:
    """n conversations in `files` JSONL files (streamed: any n fits); returns the directory."""
    out_dir.mkdir(parents=True, exist_ok=True)
    per_file = -(-n // files)
    handles = [(out_dir / f"part-{i}.jsonl").open("w") for i in range(files)]
    try:
        for i, conversation in enumerate(conversations(n, seed)):
            handles[i // per_file].write(f'{{"messages": {conversation}}}\n')
    finally:
        for handle in handles:
            handle.close()
    return out_dir
