"""The end of a run: turn its final checkpoint into models ready to serve.

    {storage}/{name}/export/
      adapter/   the LoRA adapter (PEFT format) with the tokenizer         (method lora/qlora)
      model/     full weights as safetensors, config, generation config, tokenizer
                 (LoRA merged into the base when export.merge_lora; the trained weights for full)
      */SHA256SUMS  checksums of every file (`sha256sum -c SHA256SUMS`)

Both load with plain `from_pretrained`. The tokenizer carries the chat template the training data
was rendered with, and the generation config stops at its end-of-turn token, so a plain
`generate` after `apply_chat_template` answers the way the model was trained to.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path

import pyarrow.fs as pafs

from jobs.common import storage
from jobs.common.tokenizer_files import TOKENIZER_FILES
from jobs.train.console import say
from jobs.train.spec import Method, TrainingSpec, torch_dtype

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")


def _copy(names, source: Path, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for name in names:
        if (source / name).exists():
            shutil.copy2(source / name, target / name)


def build_export(checkpoint_dir: Path, base_model_dir: str, spec: TrainingSpec, stop_ids: list[int], pad_id: int,
                 out: Path) -> list[str]:
    """Write the export tree under local `out`; returns the names of the models written."""
    from transformers import AutoModelForCausalLM

    tokenizer_names = [p.name for p in checkpoint_dir.iterdir() if p.name in TOKENIZER_FILES]
    written = []
    if spec.method is Method.FULL:
        model = AutoModelForCausalLM.from_pretrained(checkpoint_dir, dtype=torch_dtype(spec.model.dtype), use_safetensors=True)
    else:
        _copy([*ADAPTER_FILES, *tokenizer_names], checkpoint_dir, out / "adapter")
        written.append("adapter")
        if not spec.export.merge_lora:
            return written
        from peft import PeftModel

        # The adapter config names the base by its path at training time; load the base we know.
        base = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch_dtype(spec.model.dtype), use_safetensors=True)
        model = PeftModel.from_pretrained(base, checkpoint_dir).merge_and_unload()
    model.generation_config.eos_token_id = stop_ids
    model.generation_config.pad_token_id = pad_id
    model.save_pretrained(out / "model", safe_serialization=True)
    _copy(tokenizer_names, checkpoint_dir, out / "model")
    written.append("model")
    return written


def write_checksums(out: Path) -> None:
    """`SHA256SUMS` in each exported model directory (the `sha256sum -c` format), so whoever
    serves the model can check what they downloaded."""
    for model_dir in (d for d in out.iterdir() if d.is_dir()):
        lines = [f"{hashlib.sha256(f.read_bytes()).hexdigest()}  {f.name}\n" for f in sorted(model_dir.iterdir()) if f.is_file()]
        (model_dir / "SHA256SUMS").write_text("".join(lines))


def upload_dir(local: Path, uri: str) -> None:
    """Copy a local directory tree to `uri` (replacing what an earlier export left there)."""
    fs, path = storage.filesystem(uri)
    storage.clear_dir(fs, path)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def export(checkpoint, spec: TrainingSpec, stop_ids: list[int], pad_id: int, base_model_dir: str,
           out_uri: str) -> list[str]:
    """Export a Ray Train checkpoint to `out_uri`; returns the names of the models written."""
    with tempfile.TemporaryDirectory(prefix="raysft-export-") as tmp, checkpoint.as_directory() as directory:
        written = build_export(Path(directory), base_model_dir, spec, stop_ids, pad_id, Path(tmp))
        write_checksums(Path(tmp))
        upload_dir(Path(tmp), out_uri)
    say(f"exported {', '.join(written)} to {out_uri}")
    return written
