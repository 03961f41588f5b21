"""Where the rows of a preparation live while its steps run over them: `LocalRows` holds them in
this process (small inputs); `ray_pass.RayRows` keeps them as blocks in Ray's object store.
Both run the same pure batch functions (`selection`, `outputs`), so both give the same output,
and the driver's steps read the same whichever it got."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

BatchFn = Callable[..., pa.Table]


class Rows(Protocol):
    def map(self, fn: BatchFn, **kwargs: Any) -> Rows:
        """`fn(batch, **kwargs)` over every batch of rows."""

    def cached(self) -> Rows:
        """The same rows, their steps run once now rather than by every later use."""

    def per_group(self, column: str, fn: BatchFn, schema: pa.Schema, **kwargs: Any) -> pa.Table:
        """`fn(group, **kwargs)` once per distinct value of `column`, given all its rows; returns
        what the calls return (small summaries, of `schema`), in this process."""

    def collect(self, schema: pa.Schema) -> pa.Table:
        """Every row, in this process: only for small summaries."""


class LocalRows:
    """Every row in one Arrow table in this process: each step runs over the whole table."""

    def __init__(self, table: pa.Table):
        self.table = table

    def map(self, fn: BatchFn, **kwargs: Any) -> LocalRows:
        return LocalRows(fn(self.table, **kwargs))

    def cached(self) -> LocalRows:
        return self  # `map` ran its step already

    def per_group(self, column: str, fn: BatchFn, schema: pa.Schema, **kwargs: Any) -> pa.Table:
        table = self.table.take(pc.sort_indices(self.table, sort_keys=[(column, "ascending")]))
        keys = table.column(column).to_numpy()
        starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]]) if len(keys) else []
        bounds = [*starts, len(keys)]
        out = [fn(table.slice(a, b - a), **kwargs) for a, b in zip(bounds, bounds[1:], strict=False)]
        return pa.concat_tables(out) if out else schema.empty_table()

    def collect(self, schema: pa.Schema) -> pa.Table:
        return self.table if self.table.num_columns else schema.empty_table()
