"""Which URIs a tenant's spec may name (service/uris.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.uris import UriPolicy

DATA = Path("/srv/raysft")


@pytest.fixture
def local():
    return UriPolicy(str(DATA / "artifacts"), DATA, ("s3://models/",))


@pytest.fixture
def s3():
    return UriPolicy("s3://sft/prod", DATA, ("s3://models/",))


@pytest.mark.parametrize("uri", ["s3://sft/prod/tenants/acme/data/x.jsonl", "s3://sft/prod/tenants/acme/*.jsonl",
                                 "s3://models/llama", "s3://models/llama/tokenizer.json"])
def test_reads_own_prefix_and_shared_prefixes(s3, uri):
    assert s3.check(uri, "acme", write=False) is None


@pytest.mark.parametrize("uri, problem", [
    ("s3://sft/prod/tenants/other/x.jsonl", "not readable by this tenant"),
    ("s3://sft/prod/tenants/acme-evil/x", "not readable by this tenant"),  # a prefix, not a path prefix
    ("s3://sft/prod/tenants/acme/../other/x", "'..'"),
    ("http://169.254.169.254/latest/meta-data", "scheme http:// is not allowed"),
    ("https://10.0.0.1/model", "scheme https:// is not allowed"),
    ("ftp://host/x", "scheme ftp:// is not allowed"),
    ("/etc/passwd", "inside the data directory"),
    ("file:///etc/shadow", "inside the data directory"),
    ("s3://models\x00/x", "NUL"),
])
def test_refuses_other_tenants_schemes_traversal_and_local_files(s3, uri, problem):
    assert problem in s3.check(uri, "acme", write=False)


def test_writes_only_under_the_tenants_own_prefix(s3):
    assert s3.check("s3://sft/prod/tenants/acme/jobs/1/out", "acme", write=True) is None
    assert "outputs must be under" in s3.check("s3://models/llama", "acme", write=True)


def test_local_paths_stay_inside_the_data_directory(local):
    assert local.check(str(DATA / "artifacts/tenants/acme/in.jsonl"), "acme", write=False) is None
    assert local.check(f"file://{DATA}/artifacts/tenants/acme/in.jsonl", "acme", write=True) is None
    assert "inside the data directory" in local.check("/tmp/x", "acme", write=False)
    assert "'..'" in local.check(str(DATA / "artifacts/tenants/acme/../../../../etc/passwd"), "acme", write=False)


def test_relative_local_paths_are_inside_the_data_directory(local):
    assert local.check("artifacts/tenants/acme/in.jsonl", "acme", write=False) is None
    assert local.resolve("artifacts/tenants/acme/in.jsonl") == str(DATA / "artifacts/tenants/acme/in.jsonl")
    assert local.resolve("s3://b/k") == "s3://b/k"
