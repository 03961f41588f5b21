"""Writing a prepared dataset: the packed splits as Parquet, the rejects, and the two examples the
data card shows. The manifest (`jobs.prepare.manifest`) is written after these, last."""

from __future__ import annotations

import json
import posixpath
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jobs.common import storage
from jobs.common.contract import IGNORE_INDEX, REJECTS_FILE, TOKEN_COLUMNS
from jobs.prepare.selection import Sample, Selection
from jobs.prepare.spec import DatasetSpec
from jobs.prepare.stages import list_array


def write_split(fs: Any, base: str, split: str, packed: list[dict[str, np.ndarray]], rows_per_file: int) -> list[str]:
    """`split/part-NNNNN.parquet` files of `rows_per_file` packed rows; returns their relative names."""
    written = []
    for n, start in enumerate(range(0, len(packed), rows_per_file)):
        chunk = packed[start:start + rows_per_file]
        table = pa.table({col: list_array([r[col] for r in chunk]) for col in TOKEN_COLUMNS})
        name = f"{split}/part-{n:05d}.parquet"
        fs.create_dir(posixpath.join(base, split), recursive=True)
        pq.write_table(table, posixpath.join(base, name), filesystem=fs)
        written.append(name)
    return written


def reject_records(spec: DatasetSpec, rows: pa.Table, rejects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each reject with where it came from and its raw text, in (source, file, line) order."""
    out = []
    for r in rejects:
        uid = r["uid"]
        source = rows["source"][uid].as_py()
        out.append({"source": spec.sources[source].uri, "path": rows["path"][uid].as_py(),
                    "line": rows["line"][uid].as_py(), "reason": r["reason"], "detail": r["detail"],
                    "raw": rows["raw"][uid].as_py()})
    return out


def write_rejects(fs: Any, base: str, records: list[dict[str, Any]]) -> None:
    body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    storage.write_bytes(fs, posixpath.join(base, REJECTS_FILE), body.encode())


def showcase(sel: Selection) -> list[Sample]:
    """Two samples for the data card: those with the most trained runs (multi-turn shows best)."""
    pool = (sel.samples["train"] + sel.samples["val"])[:2000]

    def turns(sample: Sample) -> int:
        trained = sample[1] != IGNORE_INDEX
        return int((trained[1:] & ~trained[:-1]).sum())

    return sorted(pool, key=lambda s: (-turns(s), len(s[0])))[:2]
