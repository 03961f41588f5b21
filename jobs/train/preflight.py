"""Before any worker starts: the spec against this cluster, and the datasets against the model.

Each check reports every problem at once, with what to change. `check_environment` refuses
GPU-only features where there is no GPU, and trackers the image or the nodes cannot serve; `check_datasets` refuses a dataset that did not
succeed or was tokenized by another tokenizer than the model's (SHA-256 over its files);
`preflight` runs both and refuses `resume: none` for a name that already has checkpoints.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Mapping

from jobs.common import model_source, run_layout, storage, tokenizer_files
from jobs.common.contract import Manifest, ManifestError, read_manifest
from jobs.common.spec import SpecError
from jobs.train.spec import RESUME_NONE, Attention, DType, Method, Tracker, TrainingSpec


def module_installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def check_environment(spec: TrainingSpec, cluster_gpus: float,
                      installed: Callable[[str], bool] = module_installed) -> None:
    """GPU-only features fail here, before any worker starts, with what to change. `cluster_gpus`
    is what the Ray cluster has; the GPU libraries are looked up here, since every node runs the
    same image."""
    problems = []
    gpu = spec.scaling.use_gpu and cluster_gpus > 0
    wanted = spec.scaling.num_workers * spec.scaling.gpus_per_worker
    if spec.scaling.use_gpu and cluster_gpus == 0:
        problems.append("scaling.use_gpu: the cluster has no GPU: set use_gpu: false (and model.dtype: fp32)")
    elif gpu and wanted > cluster_gpus:
        problems.append(f"scaling: {wanted:g} GPUs wanted (num_workers x gpus_per_worker) but the cluster has "
                        f"{cluster_gpus:g}: lower num_workers")
    if not gpu:
        if spec.method is Method.QLORA:
            problems.append("method: qlora needs a GPU (4-bit kernels): use method: lora on CPU")
        if spec.model.attn_implementation is Attention.FLASH_ATTENTION_2:
            problems.append("model.attn_implementation: flash_attention_2 needs a GPU: use sdpa")
        if spec.model.attn_implementation is Attention.FLEX_ATTENTION:
            problems.append("model.attn_implementation: flex_attention trains only on a GPU (torch has no flex "
                            "attention backward on CPU): use sdpa")
        if spec.model.dtype is not DType.FP32:
            problems.append(f"model.dtype: {spec.model.dtype.value} needs a GPU here: use fp32 on CPU")
        if spec.strategy.kind == "fsdp" and spec.strategy.offload_params:
            problems.append("strategy.offload_params: moves FSDP shards off the GPU; CPU workers hold them in host "
                            "memory already: set offload_params: false")
    else:
        if spec.method is Method.QLORA and not installed("bitsandbytes"):
            problems.append("method: qlora needs bitsandbytes: install raysft[gpu] in the image")
        if spec.model.attn_implementation is Attention.FLASH_ATTENTION_2 and not installed("flash_attn"):
            problems.append("model.attn_implementation: flash_attention_2 needs the flash-attn package "
                            "in the image (see the Dockerfile's GPU notes), or use sdpa")
    problems += tracking_problems(spec, installed, os.environ)
    if problems:
        raise SpecError(problems)


def tracking_problems(spec: TrainingSpec, installed: Callable[[str], bool], env: Mapping[str, str]) -> list[str]:
    """Trackers this image or the nodes' environment cannot serve, found before any step runs."""
    problems = []
    wanted = set(spec.tracking.report_to)
    if Tracker.MLFLOW in wanted:
        if not installed("mlflow"):
            problems.append("tracking.report_to: mlflow needs mlflow-skinny in the image (pip install mlflow-skinny)")
        if not env.get("MLFLOW_TRACKING_URI") and storage.is_remote(spec.run_uri):
            problems.append("tracking.report_to: mlflow with no MLFLOW_TRACKING_URI on the nodes writes a SQLite store "
                            "beside the run, which needs a local checkpoint.storage: ask the operator for an MLflow server")
    if Tracker.WANDB in wanted:
        if not installed("wandb"):
            problems.append("tracking.report_to: wandb needs the wandb package in the image (pip install raysft[wandb])")
        if not env.get("WANDB_API_KEY") and env.get("WANDB_MODE") not in ("offline", "disabled"):
            problems.append("tracking.report_to: wandb needs WANDB_API_KEY on the nodes (the operator's secret: the "
                            "chart's ray.jobSecrets), or WANDB_MODE=offline")
    return problems


def check_datasets(spec: TrainingSpec) -> list[Manifest]:
    """Every dataset is a succeeded preparation tokenized by the model's tokenizer; returns the manifests."""
    problems, manifests = [], []
    model_sha = model_tokenizer_sha256(spec.model.uri)
    for i, ref in enumerate(spec.datasets):
        try:
            manifest = read_manifest(ref.uri)
        except (OSError, ManifestError) as e:
            problems.append(f"datasets.{i}.uri: no readable manifest.json under {ref.uri!r} ({e}): run jobs.prepare first")
            continue
        if not manifest.succeeded:
            problems.append(f"datasets.{i}.uri: preparation of {ref.uri!r} did not succeed (status {manifest.status!r})")
        if manifest.tokenizer.sha256 != model_sha:
            problems.append(f"datasets.{i}.uri: tokenized with tokenizer {manifest.tokenizer.sha256}, but the model's "
                            f"tokenizer is {model_sha}: prepare the dataset again with tokenizer: {spec.model.uri}")
        manifests.append(manifest)
    if problems:
        raise SpecError(problems)
    return manifests


def model_tokenizer_sha256(uri: str) -> str:
    """The fingerprint of the model's tokenizer, which every dataset it reads must carry; a model
    that cannot be found is a spec problem saying how to provide it."""
    try:
        return tokenizer_files.sha256(tokenizer_files.fetch(uri))
    except model_source.ModelNotFound as e:
        raise SpecError([f"model.uri: {e}"]) from None
    except OSError as e:
        raise SpecError([missing_model(uri, e)]) from None


def missing_model(uri: str, error: Exception) -> str:
    return (f"model.uri: no model with a tokenizer at {uri!r} ({error}). Point it at a Hugging Face model "
            "directory (config.json, *.safetensors, tokenizer files), local or on s3://: download one ahead of "
            f"time, or for the demo's scaffold model run `python -m jobs.scaffold_model {uri}`")


def with_absolute_paths(spec: TrainingSpec) -> TrainingSpec:
    """Local paths made absolute: Ray workers do not run in the driver's directory."""
    data = spec.model_dump(mode="json")
    if model_source.hf_id(spec.model.uri) is None:  # a Hugging Face id stays one: each node resolves it
        data["model"]["uri"] = storage.absolute(spec.model.uri)
    data["checkpoint"]["storage"] = storage.absolute(data["checkpoint"]["storage"])
    if spec.checkpoint.resume_uri is not None:
        data["checkpoint"]["resume"] = storage.absolute(spec.checkpoint.resume_uri)
    for ref in data["datasets"]:
        ref["uri"] = storage.absolute(ref["uri"])
    return TrainingSpec.model_validate(data)


def preflight(spec: TrainingSpec, cluster_gpus: float) -> tuple[TrainingSpec, list[Manifest]]:
    """Every check before training; returns the spec with absolute paths and the datasets' manifests."""
    spec = with_absolute_paths(spec)
    check_environment(spec, cluster_gpus)
    manifests = check_datasets(spec)
    if spec.checkpoint.resume == RESUME_NONE and run_layout.checkpoints(spec.run_uri):
        raise SpecError([f"checkpoint.resume: none, but run {spec.name!r} already has checkpoints under "
                         f"{spec.run_uri}: choose a new name, or resume: latest to continue it"])
    return spec, manifests
