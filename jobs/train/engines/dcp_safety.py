"""Loading a `torch.distributed.checkpoint` without running code. DCP unpickles its `.metadata`
file with plain `pickle` and any non-tensor entry with `weights_only=False`, and a resume URI
can point at any checkpoint its tenant could write: here the metadata may name DCP's own record
classes and torch's sizes and dtypes only, and entries that are not tensors are refused (raysft writes tensors only)."""

from __future__ import annotations

import io
import pickle

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

METADATA_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem",
                    "torch.distributed.checkpoint.planner")

# A container, the checkpoint's path as DCP records it, and torch's lookup of a layout by its name
# (how tensor properties pickle it): none does more than build a value.
HARMLESS = {("collections", "OrderedDict"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
            ("torch.serialization", "_get_layout")}


class MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        found = super().find_class(module, name)
        if module in METADATA_MODULES and isinstance(found, type):
            return found  # DCP's dataclasses and enums: constructing them runs no code of the file's choosing
        if module == "torch" and (found is torch.Size or isinstance(found, torch.dtype | torch.layout | torch.memory_format)):
            return found
        if (module, name) in HARMLESS:
            return found
        raise pickle.UnpicklingError(f"refused {module}.{name} in checkpoint metadata: only DCP's records load")


class SafeReader(FileSystemReader):
    def read_metadata(self, *args, **kwargs) -> Metadata:
        with self.fs.create_stream(self._get_metadata_path(kwargs.get("rank")), "rb") as file:
            metadata = MetadataUnpickler(file).load()
        if not isinstance(metadata, Metadata):
            raise pickle.UnpicklingError(f"checkpoint metadata is a {type(metadata).__name__}, not DCP metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        raise pickle.UnpicklingError(f"refused {read_item.dest_index.fqn}: raysft checkpoints hold tensors only")
