"""The global steps of preparation, over every row at once: `max_samples`, exact
de-duplication, sampling weights and the train/val split.

Every decision walks the rows in (source, file, line) order, so the output does not depend on
how rows were batched or how many CPUs tokenized them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from jobs.common.contract import SPLITS
from jobs.prepare.filters import unit_interval
from jobs.prepare.spec import DatasetSpec, Dedup
from jobs.prepare.stages import OK

Sample = tuple[np.ndarray, np.ndarray]  # (input_ids, labels)


def row_order(rows: pa.Table) -> np.ndarray:
    """Row indices in (source, file, line) order: every global decision walks rows in this order.

    Sorting indices rather than the table avoids moving the token lists around."""
    keys = [("source", "ascending"), ("path", "ascending"), ("line", "ascending")]
    return pc.sort_indices(rows.select(["source", "path", "line"]), sort_keys=keys).to_numpy()


def limit_samples(spec: DatasetSpec, rows: pa.Table, order: np.ndarray) -> tuple[np.ndarray, dict[int, int]]:
    """Keep the first `max_samples` rows of each source (in file and line order)."""
    sources = rows.column("source").to_numpy()[order]
    keep = np.ones(len(order), dtype=bool)
    skipped = {}
    for i, source in enumerate(spec.sources):
        idx = np.flatnonzero(sources == i)
        if source.max_samples is not None and len(idx) > source.max_samples:
            keep[idx[source.max_samples:]] = False
            skipped[i] = int(len(idx) - source.max_samples)
    return order[keep], skipped


@dataclass
class Selection:
    rejects: list[dict[str, Any]]  # {"uid", "reason", "detail"} in row order; uid = index in `rows`
    samples: dict[str, list[Sample]]  # split -> samples, sampling-weight copies included
    accepted: int = 0
    truncated: int = 0


def select_samples(spec: DatasetSpec, rows: pa.Table, order: np.ndarray) -> Selection:
    """Rejects, then de-duplication, sampling weights and the split, in row order (deterministic)."""
    sel = Selection([], {s: [] for s in SPLITS})
    ids_col, labels_col = rows.column("input_ids").combine_chunks(), rows.column("labels").combine_chunks()
    ids_values, offsets = ids_col.values.to_numpy(), ids_col.offsets.to_numpy()
    labels_values = labels_col.values.to_numpy()
    seen: dict[str, int] = {}
    source_, key_, reason_, detail_, truncated_, path_, line_ = (
        rows.column(c).to_pylist() for c in ("source", "key", "reason", "detail", "truncated", "path", "line"))
    for uid in order.tolist():
        src, key, reason, detail = source_[uid], key_[uid], reason_[uid], detail_[uid]
        if reason != OK:
            sel.rejects.append({"uid": uid, "reason": reason, "detail": detail})
            continue
        if spec.dedup is Dedup.EXACT:
            if key in seen:
                sel.rejects.append({"uid": uid, "reason": "duplicate", "detail": f"same as {seen[key]}"})
                continue
            seen[key] = f"{path_[uid]}:{line_[uid]}"
        weight = spec.sources[src].weight
        copies = int(weight) + (unit_interval(spec.seed, "weight", key) < weight - int(weight))
        if copies == 0:
            sel.rejects.append({"uid": uid, "reason": "downsampled", "detail": f"weight {weight}"})
            continue
        # Split by conversation, so copies of a row never straddle train and val.
        split = "val" if unit_interval(spec.seed, "split", key) < spec.val_ratio else "train"
        lo, hi = offsets[uid], offsets[uid + 1]
        sel.samples[split].extend([(ids_values[lo:hi], labels_values[lo:hi])] * copies)
        sel.accepted += 1
        sel.truncated += bool(truncated_[uid])
    return sel
