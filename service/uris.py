"""Which URIs a tenant's spec may name. Pure: no I/O.

Jobs read and write local paths, s3:// and gs:// only, so nothing else is accepted (no http(s):
no request to an internal address can be smuggled in through a spec). A tenant writes only under
its own prefix, `<artifact_root>/tenants/<tenant>/`, and reads from there or from the operator's
shared prefixes (base models, tokenizers). Local paths must stay inside the data directory;
relative ones are relative to it.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from pathlib import Path

REMOTE_SCHEMES = ("s3://", "gs://")


def _normalise(uri: str, data_dir: Path) -> tuple[str | None, str | None]:
    """(comparable form, problem). Local paths become absolute paths; remote URIs stay as written."""
    if "\x00" in uri:
        return None, "contains a NUL byte"
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    scheme = uri.split("://", 1)[0] + "://" if "://" in uri else None
    if scheme is not None and scheme not in REMOTE_SCHEMES:
        return None, f"scheme {scheme} is not allowed: use s3://, gs:// or a path in the data directory"
    path = uri[len(scheme):] if scheme else uri
    if ".." in path.split("/"):
        return None, "contains '..': name the location directly"
    if scheme:
        return scheme + posixpath.normpath(path), None
    absolute = (data_dir / path).resolve() if not path.startswith("/") else Path(posixpath.normpath(path))
    if not absolute.is_relative_to(data_dir.resolve()):
        return None, f"local paths must be inside the data directory {data_dir.resolve()}"
    return str(absolute), None


def _under(uri: str, prefix: str) -> bool:
    prefix = prefix.rstrip("/")
    return uri == prefix or uri.startswith(prefix + "/")


@dataclass(frozen=True)
class UriPolicy:
    artifact_root: str
    data_dir: Path
    shared_read_prefixes: tuple[str, ...] = ()

    def tenant_root(self, tenant: str) -> str:
        root = self.artifact_root.rstrip("/")
        return f"{root}/tenants/{tenant}"

    def _prefix(self, prefix: str) -> str:
        normal, problem = _normalise(prefix, self.data_dir)
        if problem is not None:
            raise ValueError(f"configured prefix {prefix!r}: {problem}")
        return normal

    def resolve(self, uri: str) -> str:
        """The form a job gets: local paths absolute (relative ones are inside the data directory)."""
        normal, problem = _normalise(uri, self.data_dir)
        return normal if problem is None and "://" not in uri else uri

    def check(self, uri: str, tenant: str, write: bool) -> str | None:
        """The problem with `uri` for this tenant, or None when it may be used."""
        normal, problem = _normalise(uri, self.data_dir)
        if problem is not None:
            return problem
        own = self._prefix(self.tenant_root(tenant))
        if _under(normal, own):
            return None
        if write:
            return f"outputs must be under this tenant's prefix {own}/"
        if any(_under(normal, self._prefix(p)) for p in self.shared_read_prefixes):
            return None
        return f"not readable by this tenant: use a location under {own}/ or a shared prefix"
