"""The export of a finished run, from a real checkpoint directory of the scaffold model: the adapter
as PEFT wrote it, the merged model computing what base + adapter compute, a generation config
that stops at the training's end of turn, and checksums that verify."""

import hashlib

import pytest
import torch

from jobs.common.tokenizer_files import TOKENIZER_FILES
from jobs.train.export import build_export, write_checksums
from jobs.train.spec import load_training_spec


def spec(method: str, merge: bool = True):
    return load_training_spec({"name": "r", "model": {"uri": "m", "dtype": "fp32"}, "datasets": [{"uri": "d"}],
                               "checkpoint": {"storage": "c"}, "method": method, "lora": {"r": 4, "alpha": 8},
                               "export": {"merge_lora": merge}})


@pytest.fixture(scope="module")
def lora_checkpoint(tiny_model, tokenizer, tmp_path_factory):
    """A checkpoint as the loop writes one: a LoRA adapter with non-zero weights, and the tokenizer."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    with torch.no_grad():  # a fresh adapter's B is zero, which would make any merge look right
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    directory = tmp_path_factory.mktemp("checkpoint")
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory, model.eval()


def test_lora_export_writes_the_adapter_and_a_merged_model_that_computes_the_same(lora_checkpoint, tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    directory, trained = lora_checkpoint
    written = build_export(directory, str(tiny_model), spec("lora"), stop_ids=[3, 2], pad_id=0, out=tmp_path)
    assert written == ["adapter", "model"]
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json"} <= {p.name for p in (tmp_path / "adapter").iterdir()}
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32).eval()
    ids = torch.tensor([[5, 9, 12, 40, 41, 42]])
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, trained(input_ids=ids).logits, atol=1e-4)
    assert merged.generation_config.eos_token_id == [3, 2] and merged.generation_config.pad_token_id == 0
    assert not list((tmp_path / "model").glob("adapter_*"))  # merged: no adapter left to load
    assert {p.name for p in (tmp_path / "model").iterdir()} & TOKENIZER_FILES


def test_without_merge_only_the_adapter_is_exported(lora_checkpoint, tiny_model, tmp_path):
    directory, _ = lora_checkpoint
    assert build_export(directory, str(tiny_model), spec("lora", merge=False), [3], 0, tmp_path) == ["adapter"]
    assert not (tmp_path / "model").exists()


def test_full_fine_tuning_exports_the_trained_weights(tiny_model, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)  # "trained"
    model.save_pretrained(tmp_path / "checkpoint")
    tokenizer.save_pretrained(tmp_path / "checkpoint")
    out = tmp_path / "export"
    assert build_export(tmp_path / "checkpoint", str(tiny_model), spec("full"), [3], 0, out) == ["model"]
    exported = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32)
    assert torch.equal(exported.lm_head.weight, model.lm_head.weight)


def test_checksums_cover_every_file_and_verify(lora_checkpoint, tiny_model, tmp_path):
    directory, _ = lora_checkpoint
    build_export(directory, str(tiny_model), spec("lora"), [3], 0, tmp_path)
    write_checksums(tmp_path)
    for model_dir in (tmp_path / "adapter", tmp_path / "model"):
        lines = (model_dir / "SHA256SUMS").read_text().splitlines()
        files = {p.name for p in model_dir.iterdir() if p.name != "SHA256SUMS"}
        assert {line.split("  ", 1)[1] for line in lines} == files
        for line in lines:
            digest, name = line.split("  ", 1)
            assert hashlib.sha256((model_dir / name).read_bytes()).hexdigest() == digest
