"""The manifest of a preparation run (`jobs.common.contract.Manifest`), its data card and the
one-screen summary the job prints."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from jobs.common import tokenizer_files
from jobs.common.contract import IGNORE_INDEX, SPLITS, TOKEN_COLUMNS, Manifest, Segment
from jobs.prepare.inputs import Inputs
from jobs.prepare.selection import Tally
from jobs.prepare.spec import DatasetSpec, TemplateName

LIBRARIES = ("raysft", "ray", "transformers", "tokenizers", "pyarrow", "jinja2")
# Rejects that are policy, not bad data: they do not count against max_reject_ratio.
POLICY_REASONS = {"duplicate", "downsampled"}
CUSTOM_TEMPLATE = "custom"  # the manifest's template name for a Jinja string in the spec
EOT_SOURCES = {"template": "as the template renders it",
               "spec": "eot_token inserted where the template renders no special token after a reply",
               "eos": "the tokenizer's eos inserted where the template renders no special token after a reply"}


def library_versions() -> dict[str, str]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def percentiles(histogram: np.ndarray) -> dict[str, int]:
    """p50/p90/p99/min/max of the values a histogram counts (`histogram[v]`: how many are v), as
    `np.percentile(..., method="nearest")` gives them over the values themselves."""
    n = int(histogram.sum())
    if not n:
        return {}
    cumulative = np.cumsum(histogram)

    def value_at(rank: int) -> int:  # the rank-th smallest value, from 0
        return int(np.searchsorted(cumulative, rank, side="right"))

    present = np.flatnonzero(histogram)
    return {f"p{q}": value_at(int(np.around(q / 100 * (n - 1)))) for q in (50, 90, 99)} | {
        "min": int(present[0]), "max": int(present[-1])}


def invalid_count(rejected: Counter) -> int:
    return sum(n for reason, n in rejected.items() if reason not in POLICY_REASONS)


def top_reasons(rejected: Counter, n: int = 5) -> str:
    return ", ".join(f"{reason}: {count}" for reason, count in rejected.most_common(n))


def created_at() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def build(spec: DatasetSpec, inputs: Inputs, rows_read: int, skipped: dict[int, int], totals: Tally,
          parts: pa.Table, failed: bool, seconds: float, examples: Sequence[list[Segment]] = (),
          cache_key: str | None = None) -> Manifest:
    """The manifest of a run, from the summed summaries and the files written (`outputs.PARTS_SCHEMA`)."""
    def per_split(column: str) -> dict[str, int]:
        return {s: int(sum(n for split, n in zip(parts.column("split").to_pylist(), parts.column(column).to_pylist(),
                                                 strict=True) if split == s)) for s in SPLITS}

    tokens, trainable, rows = per_split("tokens"), per_split("trainable"), per_split("rows")
    return Manifest(
        status="failed" if failed else "succeeded",
        name=spec.name,
        output=spec.output,
        spec=spec.model_dump(mode="json"),
        spec_hash=spec.spec_hash(),
        tokenizer={"uri": spec.tokenizer, "sha256": tokenizer_files.sha256(inputs.tokenizer_files),
                   "vocab_size": len(inputs.tokenizer), "eos_token": inputs.tokenizer.eos_token,
                   "pad_token": inputs.tokenizer.pad_token},
        template={"name": CUSTOM_TEMPLATE if spec.template_is_custom else TemplateName(spec.template).value,
                  "eot": inputs.template.eot, "eot_source": inputs.template.eot_source,
                  "eot_last": inputs.template.eot_last, "stop_tokens": inputs.template.stop_tokens(),
                  "chat_template": inputs.template.chat_template()},
        counts={
            "rows_read": rows_read,
            "rows_beyond_max_samples": {spec.sources[i].uri: n for i, n in skipped.items()},
            "accepted": totals.accepted,
            "rejected": dict(sorted(totals.rejected.items())),
            "rejected_total": sum(totals.rejected.values()),
            "invalid": invalid_count(totals.rejected),
            "duplicates": totals.rejected.get("duplicate", 0),
            "truncated": totals.truncated,
            "dropped": sum(n for r, n in totals.rejected.items() if r.startswith(("too_long", "no_trainable"))),
            "samples": {s: totals.samples.get(s, 0) for s in SPLITS},
        },
        tokens={"all": sum(tokens.values()), "trainable": sum(trainable.values()),
                "by_split": {s: {"all": tokens[s], "trainable": trainable[s]} for s in SPLITS}},
        zero_trainable_rows=int(sum(parts.column("zero_trainable_rows").to_pylist())),
        sample_length=percentiles(totals.lengths),
        packing={"mode": spec.packing.value, "max_seq_length": spec.max_seq_length, "rows": rows,
                 "efficiency": sum(tokens.values()) / (sum(rows.values()) * spec.max_seq_length) if any(rows.values()) else 0.0},
        files=parts.column("name").to_pylist(),
        columns=list(TOKEN_COLUMNS),
        seconds=round(seconds, 2),
        library_versions=library_versions(),
        created_at=created_at(),
        examples=list(examples),
        cache_key=cache_key,
        split_origins=spec.split_origins(),
    )


def trained_segments(tokenizer: Any, input_ids: np.ndarray, labels: np.ndarray) -> list[Segment]:
    """Decode a sample as runs of tokens that are trained or not, in order."""
    trained = labels != IGNORE_INDEX
    out, start = [], 0
    for i in range(1, len(input_ids) + 1):
        if i == len(input_ids) or trained[i] != trained[start]:
            out.append(Segment(text=tokenizer.decode(input_ids[start:i].tolist()), trained=bool(trained[start])))
            start = i
    return out


def mark_trained(segments: list[Segment]) -> str:
    """A sample as text, each run of trained tokens inside ⟦ ⟧."""
    return "".join(f"⟦{s.text}⟧" if s.trained else s.text for s in segments)


def ends(manifest: Manifest) -> str:
    """What is trained after a reply, and after the last one where that differs."""
    t = manifest.template
    last = f" (after the last reply `{t.eot_last}`)" if t.eot_last and t.eot_last != t.eot else ""
    return f"`{t.eot}`{last}"


def data_card(spec: DatasetSpec, manifest: Manifest) -> str:
    m, c, t, p = manifest, manifest.counts, manifest.tokens, manifest.packing
    examples = [mark_trained(segments) for segments in m.examples]
    rejected = "\n".join(f"| {r} | {n} |" for r, n in sorted(c.rejected.items(), key=lambda x: -x[1])) or "| – | 0 |"
    shown = "\n\n".join(f"### Example {i + 1}\n\n```text\n{e}\n```" for i, e in enumerate(examples))
    origins = "\n".join(f"| {split} | {'; '.join(sources) or 'none'} |" for split, sources in m.split_origins.items())
    return f"""# Dataset card: {m.name}

Prepared {m.created_at} by raysft {m.library_versions['raysft']}.
Spec hash `{m.spec_hash[:16]}`, tokenizer SHA-256 `{m.tokenizer.sha256[:16]}`,
template `{m.template.name}` (end of turn {ends(m)}, {EOT_SOURCES[m.template.eot_source]}), train on `{spec.train_on.value}`;
generation stops at {", ".join(f"`{t}`" for t in m.template.stop_tokens)}.

## Rows

| | rows |
|---|---|
| read | {c.rows_read} |
| accepted | {c.accepted} |
| rejected | {c.rejected_total} (invalid: {c.invalid}) |
| duplicates | {c.duplicates} |
| truncated | {c.truncated} |
| samples written (train / val) | {c.samples['train']} / {c.samples['val']} |

| split | from |
|---|---|
{origins}

| reject reason | rows |
|---|---|
{rejected}

## Tokens

{t.all} tokens, {t.trainable} trained ({t.trainable / max(t.all, 1):.1%}).
Sample length percentiles: {m.sample_length}.
Packing `{p.mode}` into rows of {p.max_seq_length}: {p.rows['train']} train and {p.rows['val']} val rows,
{p.efficiency:.1%} of token slots hold real tokens.

## Rendered examples

Trained tokens are inside ⟦ ⟧; everything else has label -100.

{shown}
"""


def summary(manifest: Manifest) -> str:
    m, c, t, p = manifest, manifest.counts, manifest.tokens, manifest.packing
    lines = [
        f"dataset {m.name} -> {m.output}  [{m.status}]",
        f"  rows: read {c.rows_read}, accepted {c.accepted}, rejected {c.rejected_total} "
        f"(invalid {c.invalid}, duplicates {c.duplicates}), truncated {c.truncated}",
    ]
    if c.rejected:
        lines.append(f"  reject reasons: {top_reasons(Counter(c.rejected), 10)}")
    lines += [
        f"  samples: train {c.samples['train']}, val {c.samples['val']}",
        *(f"  {split} from {'; '.join(sources) or 'none'}" for split, sources in m.split_origins.items()),
        f"  tokens: {t.all} all, {t.trainable} trainable; sample length {m.sample_length}",
        f"  packing {p.mode}@{p.max_seq_length}: rows train {p.rows['train']}, val {p.rows['val']}, "
        f"efficiency {p.efficiency:.2%}",
        f"  template {m.template.name}, end of turn {ends(m)} ({EOT_SOURCES[m.template.eot_source]}), "
        f"stop tokens {m.template.stop_tokens}",
        f"  tokenizer sha256 {m.tokenizer.sha256}",
    ]
    return "\n".join(lines)
