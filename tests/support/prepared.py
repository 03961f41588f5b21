"""A preparation's manifest built from hand-made samples through the job's own steps (tally,
packing, row assembly), for tests of what reads manifests."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa

from jobs.common.contract import SPLITS, Manifest
from jobs.prepare import manifest as mf
from jobs.prepare.inputs import Inputs
from jobs.prepare.outputs import PARTS_SCHEMA, part_summary
from jobs.prepare.packing import assemble_rows, layout
from jobs.prepare.selection import Tally
from jobs.prepare.spec import DatasetSpec, Packing
from jobs.prepare.stages import list_array

Sample = tuple[np.ndarray, np.ndarray]


def build_manifest(spec: DatasetSpec, inputs: Inputs, samples: dict[str, list[Sample]], rejected: Counter,
                   rows_read: int, skipped: dict[int, int] | None = None, truncated: int = 0, **kwargs) -> Manifest:
    pairs = {split: samples.get(split, []) for split in SPLITS}
    lengths = {split: np.array([len(ids) for ids, _ in pairs[split]], np.int64) for split in SPLITS}
    totals = Tally(rejected, sum(map(len, pairs.values())), truncated,
                   {split: len(pairs[split]) for split in SPLITS}, {split: int(lengths[split].sum()) for split in SPLITS},
                   np.bincount(np.concatenate(list(lengths.values())), minlength=spec.max_seq_length + 1))
    parts = []
    for split in SPLITS:
        if pairs[split]:
            row, slot = layout(lengths[split], spec.packing is Packing.BFD, spec.max_seq_length)
            rows = assemble_rows(pa.table({"row": row, "slot": slot, "input_ids": list_array([i for i, _ in pairs[split]]),
                                           "labels": list_array([labels for _, labels in pairs[split]])}))
            parts.append(part_summary(split, f"{split}/part-00000.parquet", rows))
    table = pa.concat_tables(parts) if parts else PARTS_SCHEMA.empty_table()
    return mf.build(spec, inputs, rows_read, skipped or {}, totals, table, failed=False, **kwargs)
