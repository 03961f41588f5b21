"""The manifest of a preparation run (`jobs.common.contract.Manifest`), its data card and the
one-screen summary the job prints."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from jobs.common import tokenizer_files
from jobs.common.contract import IGNORE_INDEX, SPLITS, TOKEN_COLUMNS, Manifest, Segment
from jobs.prepare.inputs import Inputs
from jobs.prepare.packing import fill_ratio
from jobs.prepare.selection import Selection
from jobs.prepare.spec import DatasetSpec, TemplateName

LIBRARIES = ("raysft", "ray", "transformers", "tokenizers", "pyarrow", "jinja2")
# Rejects that are policy, not bad data: they do not count against max_reject_ratio.
POLICY_REASONS = {"duplicate", "downsampled"}
CUSTOM_TEMPLATE = "custom"  # the manifest's template name for a Jinja string in the spec
EOT_SOURCES = {"template": "as the template renders it", "spec": "set by eot_token",
               "eos": "the tokenizer's eos: the template renders no special token after a reply"}


def library_versions() -> dict[str, str]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def percentiles(lengths: list[int]) -> dict[str, int]:
    if not lengths:
        return {}
    arr = np.asarray(lengths)
    return {f"p{q}": int(np.percentile(arr, q, method="nearest")) for q in (50, 90, 99)} | {
        "min": int(arr.min()), "max": int(arr.max())}


def invalid_count(rejected: Counter) -> int:
    return sum(n for reason, n in rejected.items() if reason not in POLICY_REASONS)


def top_reasons(rejected: Counter, n: int = 5) -> str:
    return ", ".join(f"{reason}: {count}" for reason, count in rejected.most_common(n))


def created_at() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def build(spec: DatasetSpec, inputs: Inputs, rows_read: int, skipped: dict[int, int], sel: Selection,
          rejected: Counter, packed: dict[str, list[dict[str, np.ndarray]]], files: list[str], failed: bool,
          seconds: float, examples: Sequence[list[Segment]] = ()) -> Manifest:
    """The manifest of a run, from what each step produced."""
    all_tokens = {s: int(sum(len(r["input_ids"]) for r in packed[s])) for s in SPLITS}
    trainable = {s: int(sum(int((r["labels"] != IGNORE_INDEX).sum()) for r in packed[s])) for s in SPLITS}
    zero_rows = sum(1 for s in SPLITS for r in packed[s] if not (r["labels"] != IGNORE_INDEX).any())
    row_lengths = [len(r["input_ids"]) for s in SPLITS for r in packed[s]]
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
                  "chat_template": inputs.template.chat_template()},
        counts={
            "rows_read": rows_read,
            "rows_beyond_max_samples": {spec.sources[i].uri: n for i, n in skipped.items()},
            "accepted": sel.accepted,
            "rejected": dict(sorted(rejected.items())),
            "rejected_total": sum(rejected.values()),
            "invalid": invalid_count(rejected),
            "duplicates": rejected.get("duplicate", 0),
            "truncated": sel.truncated,
            "dropped": sum(n for r, n in rejected.items() if r.startswith(("too_long", "no_trainable"))),
            "samples": {s: len(sel.samples[s]) for s in SPLITS},
        },
        tokens={"all": sum(all_tokens.values()), "trainable": sum(trainable.values()),
                "by_split": {s: {"all": all_tokens[s], "trainable": trainable[s]} for s in SPLITS}},
        zero_trainable_rows=zero_rows,
        sample_length=percentiles([len(ids) for s in SPLITS for ids, _ in sel.samples[s]]),
        packing={"mode": spec.packing.value, "max_seq_length": spec.max_seq_length,
                 "rows": {s: len(packed[s]) for s in SPLITS},
                 "efficiency": fill_ratio(row_lengths, spec.max_seq_length)},
        files=files,
        columns=list(TOKEN_COLUMNS),
        seconds=round(seconds, 2),
        library_versions=library_versions(),
        created_at=created_at(),
        examples=list(examples),
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


def data_card(spec: DatasetSpec, manifest: Manifest) -> str:
    m, c, t, p = manifest, manifest.counts, manifest.tokens, manifest.packing
    examples = [mark_trained(segments) for segments in m.examples]
    rejected = "\n".join(f"| {r} | {n} |" for r, n in sorted(c.rejected.items(), key=lambda x: -x[1])) or "| – | 0 |"
    shown = "\n\n".join(f"### Example {i + 1}\n\n```text\n{e}\n```" for i, e in enumerate(examples))
    return f"""# Dataset card: {m.name}

Prepared {m.created_at} by raysft {m.library_versions['raysft']}.
Spec hash `{m.spec_hash[:16]}`, tokenizer SHA-256 `{m.tokenizer.sha256[:16]}`,
template `{m.template.name}` (end of turn `{m.template.eot}`, {EOT_SOURCES[m.template.eot_source]}), train on `{spec.train_on.value}`.

## Rows

| | rows |
|---|---|
| read | {c.rows_read} |
| accepted | {c.accepted} |
| rejected | {c.rejected_total} (invalid: {c.invalid}) |
| duplicates | {c.duplicates} |
| truncated | {c.truncated} |
| samples written (train / val) | {c.samples['train']} / {c.samples['val']} |

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
        f"  tokens: {t.all} all, {t.trainable} trainable; sample length {m.sample_length}",
        f"  packing {p.mode}@{p.max_seq_length}: rows train {p.rows['train']}, val {p.rows['val']}, "
        f"efficiency {p.efficiency:.2%}",
        f"  template {m.template.name}, end of turn {m.template.eot!r} ({EOT_SOURCES[m.template.eot_source]})",
        f"  tokenizer sha256 {m.tokenizer.sha256}",
    ]
    return "\n".join(lines)
