"""From a request body to the spec a job runs: the same pydantic contract as the job CLIs, plus
what the service decides (where outputs go) and what it forbids (URIs outside the tenant's
prefixes, untrusted remote code). Every problem is reported at once, with its field path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from jobs.common.spec import SpecError, validate
from jobs.evaluate.spec import EvaluationSpec
from jobs.prepare.spec import DatasetSpec
from jobs.train.spec import ModelSpec, TrainingSpec
from service.uris import UriPolicy

JOB_REF = "job:"  # a dataset (or a trained model) named by the id of the job that made it
FILE_REF = "file:"  # a dataset source named by the id of an uploaded file (POST /v1/files)


def job_dir(policy: UriPolicy, tenant: str, job_id: str) -> str:
    return f"{policy.tenant_root(tenant)}/jobs/{job_id}"


def resolve_refs(body: dict[str, Any], field: str, prefix: str, resolve: Callable[[str], str]) -> list[str]:
    """Replace, in place, each `body[field][i].uri` that is `<prefix><id>` with `resolve(id)`;
    returns the problems of those `resolve` refused (SpecError), with their field paths."""
    problems: list[str] = []
    if not isinstance(body.get(field), list):
        return problems
    items = []
    for i, item in enumerate(body[field]):
        if isinstance(item, dict) and str(item.get("uri", "")).startswith(prefix):
            try:
                item = {**item, "uri": resolve(item["uri"][len(prefix):])}
            except SpecError as e:
                problems.extend(f"{field}.{i}.uri: {p}" for p in e.problems)
        items.append(item)
    body[field] = items
    return problems


def dataset_spec(body: dict[str, Any], policy: UriPolicy, tenant: str, job_id: str,
                 file_uri: Callable[[str], str]) -> DatasetSpec:
    """`output` defaults to the job's own directory under the tenant's prefix; a source
    `uri: file:<id>` becomes that uploaded file's stored URI (`file_uri` raises SpecError when
    the tenant has no such file)."""
    body = {**body, "output": body.get("output") or f"{job_dir(policy, tenant, job_id)}/dataset"}
    problems = resolve_refs(body, "sources", FILE_REF, file_uri)
    try:
        spec = validate(DatasetSpec, body)
    except SpecError as e:
        raise SpecError(problems + e.problems) from None
    spec = spec.model_copy(update={
        "sources": [s.model_copy(update={"uri": policy.resolve(s.uri)}) for s in spec.sources],
        "tokenizer": policy.resolve(spec.tokenizer), "output": policy.resolve(spec.output)})
    problems += [f"sources.{i}.uri: {p}" for i, s in enumerate(spec.sources)
                 if (p := policy.check(s.uri, tenant, write=False))]
    if p := policy.check(spec.tokenizer, tenant, write=False):
        problems.append(f"tokenizer: {p}")
    if p := policy.check(spec.output, tenant, write=True):
        problems.append(f"output: {p}")
    if problems:
        raise SpecError(problems)
    return spec


def untrusted_code(model: ModelSpec, trusted_models: list[str]) -> list[str]:
    if model.trust_remote_code and model.uri not in trusted_models:
        return ["model.trust_remote_code: this model is not on the operator's allowlist "
                "(RAYSFT_TRUSTED_REMOTE_CODE_MODELS): set it to false"]
    return []


def training_spec(body: dict[str, Any], policy: UriPolicy, tenant: str, job_id: str,
                  dataset_output: Callable[[str], str], trusted_models: list[str]) -> TrainingSpec:
    """`checkpoint.storage` defaults to the job's own directory; a dataset `uri: job:<id>` becomes
    that dataset job's output (`dataset_output` raises SpecError when it is not a succeeded
    dataset job of this tenant)."""
    body = dict(body)
    checkpoint = dict(body.get("checkpoint") or {})
    checkpoint.setdefault("storage", f"{job_dir(policy, tenant, job_id)}/checkpoints")
    body["checkpoint"] = checkpoint
    problems = resolve_refs(body, "datasets", JOB_REF, dataset_output)
    try:
        spec = validate(TrainingSpec, body)
    except SpecError as e:
        raise SpecError(problems + e.problems) from None
    checkpoint_spec = spec.checkpoint.model_copy(update={"storage": policy.resolve(spec.checkpoint.storage)})
    if spec.checkpoint.resume_uri is not None:
        checkpoint_spec = checkpoint_spec.model_copy(update={"resume": policy.resolve(spec.checkpoint.resume_uri)})
    spec = spec.model_copy(update={
        "model": spec.model.model_copy(update={"uri": policy.resolve(spec.model.uri)}),
        "datasets": [d.model_copy(update={"uri": policy.resolve(d.uri)}) for d in spec.datasets],
        "checkpoint": checkpoint_spec})
    problems += [f"datasets.{i}.uri: {p}" for i, d in enumerate(spec.datasets)
                 if (p := policy.check(d.uri, tenant, write=False))]
    if p := policy.check(spec.model.uri, tenant, write=False):
        problems.append(f"model.uri: {p}")
    if p := policy.check(spec.checkpoint.storage, tenant, write=True):
        problems.append(f"checkpoint.storage: {p}")
    if spec.checkpoint.resume_uri is not None and (p := policy.check(spec.checkpoint.resume_uri, tenant, write=False)):
        problems.append(f"checkpoint.resume: {p}")
    problems += untrusted_code(spec.model, trusted_models)
    if problems:
        raise SpecError(problems)
    return spec


def _job_ref(body: dict[str, Any], path: tuple[str, ...], resolve: Callable[[str], str]) -> list[str]:
    """Replace, in place, the `job:<id>` at `body[path...]` with `resolve(id)`; returns the problems."""
    *parents, key = path
    node = body
    for parent in parents:
        node = node.get(parent) if isinstance(node, dict) else None
    if not isinstance(node, dict) or not str(node.get(key, "")).startswith(JOB_REF):
        return []
    try:
        node[key] = resolve(node[key][len(JOB_REF):])
    except SpecError as e:
        return [f"{'.'.join(path)}: {p}" for p in e.problems]
    return []


def evaluated_job(body: dict[str, Any]) -> str | None:
    """The training an evaluation request names by `job:<id>` (its adapter, else its model)."""
    model = body.get("model")
    for value in (body.get("adapter"), model.get("uri") if isinstance(model, dict) else None):
        if isinstance(value, str) and value.startswith(JOB_REF):
            return value[len(JOB_REF):]
    return None


def evaluation_spec(body: dict[str, Any], policy: UriPolicy, tenant: str, job_id: str,
                    dataset_output: Callable[[str], str], training_export: Callable[[str, str], str],
                    trusted_models: list[str]) -> EvaluationSpec:
    """`output` defaults to the job's own directory; `dataset: job:<id>` becomes that dataset job's
    output, `adapter: job:<id>` that training's exported adapter and `model.uri: job:<id>` its
    exported model (the callables raise SpecError for a job that is not this tenant's, or not done)."""
    body = {**body, "output": body.get("output") or f"{job_dir(policy, tenant, job_id)}/evaluation"}
    if isinstance(body.get("model"), dict):
        body["model"] = dict(body["model"])
    problems = (_job_ref(body, ("dataset",), dataset_output)
                + _job_ref(body, ("adapter",), lambda ref: training_export(ref, "adapter"))
                + _job_ref(body, ("model", "uri"), lambda ref: training_export(ref, "model")))
    try:
        spec = validate(EvaluationSpec, body)
    except SpecError as e:
        raise SpecError(problems + e.problems) from None
    resolved = {field: policy.resolve(uri) for field in ("adapter", "dataset", "output") if (uri := getattr(spec, field))}
    spec = spec.model_copy(update={"model": spec.model.model_copy(update={"uri": policy.resolve(spec.model.uri)}),
                                   **resolved})
    for field, uri in (("model.uri", spec.model.uri), ("adapter", spec.adapter), ("dataset", spec.dataset)):
        if uri is not None and (p := policy.check(uri, tenant, write=False)):
            problems.append(f"{field}: {p}")
    if p := policy.check(spec.output, tenant, write=True):
        problems.append(f"output: {p}")
    problems += untrusted_code(spec.model, trusted_models)
    if problems:
        raise SpecError(problems)
    return spec
