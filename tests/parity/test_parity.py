"""Quality parity with a peer: the real SmolLM2-135M-Instruct fine-tuned with LoRA on a mixture of
two datasets with clearly different reply styles, once by raysft (prepare + train, as users run
them) and once by TRL's `SFTTrainer` (TRL is a test dependency only). Same model, data, masking
(assistant replies only), LoRA settings, learning-rate schedule, epochs and tokens per step. Each
held-out set's assistant-token loss is measured by the same code for both. Data order alone moves
these losses by several percent on data this small, so each system runs with two seeds (three
measured the same margins, docs/benchmarks.md; two keep CI within its time): on every held-out set
raysft's mean loss must be at most TRL's mean + 3%, and its worst seed no worse than TRL's worst.
`make test-parity` (needs `make real-model`)."""

from __future__ import annotations

import json
import random
import statistics
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from support import REPO
from support.conversations import sentences
from support.jobs import run

pytestmark = [pytest.mark.integration, pytest.mark.parity]
SEEDS = (1, 2)
STYLES = {  # two reply styles a model can only learn from its own dataset
    "pirate": ("Tell me about this: {q}", "Arr, matey! {a} Yo ho ho!"),
    "formal": ("Please summarise: {q}", "Dear reader, {a} Kind regards, the assistant."),
}
TRAIN, HELD_OUT = 96, 16
MAX_LEN = 256
LORA = {"r": 16, "alpha": 32, "dropout": 0.0}
LR = 2e-3  # cosine from the first step: no warm-up, where raysft's and transformers' ramps differ
MICRO, ACCUM = 2, 2  # raysft: packed rows of MAX_LEN tokens per step = MICRO * ACCUM
REPORT = REPO / ".cache/parity.json"


@pytest.fixture(scope="module")
def real_model() -> Path:
    model = REPO / ".cache/models/smollm2-135m-instruct"
    if not (model / "config.json").is_file():
        pytest.fail(f"no imported model at {model}: run `make real-model` (make test-parity does)")
    return model


def write_style(path: Path, style: str, pool: list[str]) -> None:
    ask, answer = STYLES[style]
    rows = [{"messages": [{"role": "user", "content": ask.format(q=q)},
                          {"role": "assistant", "content": answer.format(a=a)}]} for q, a in pool]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Per style: train.jsonl and held-out.jsonl, from disjoint sentences of the example data."""
    short = [s for s in sentences() if len(s) < 110]
    rng = random.Random(0)
    rng.shuffle(short)
    need = 2 * (TRAIN + HELD_OUT)
    assert len(short) >= 2 * need, len(short)
    pairs = list(zip(short[:need], short[need:2 * need], strict=True))
    root = tmp_path_factory.mktemp("parity-data")
    for i, style in enumerate(STYLES):
        mine = pairs[i * (TRAIN + HELD_OUT):(i + 1) * (TRAIN + HELD_OUT)]
        (root / style).mkdir()
        write_style(root / style / "train.jsonl", style, mine[:TRAIN])
        write_style(root / style / "held-out.jsonl", style, mine[TRAIN:])
    return root


def prepare(source: Path, tokenizer: Path, output: Path, packing: str) -> dict:
    spec = {"name": output.name, "sources": [{"uri": str(source), "format": "messages"}], "tokenizer": str(tokenizer),
            "template": "tokenizer", "max_seq_length": MAX_LEN, "packing": packing, "val_ratio": 0,
            "dedup": "none", "output": str(output)}
    run("jobs.prepare", spec)
    return json.loads((output / "manifest.json").read_text())


@pytest.fixture(scope="module")
def prepared(data, real_model, tmp_path_factory) -> dict:
    """raysft's preparation of every set; the held-out sets unpacked, one conversation a row,
    which is what both systems are measured on."""
    root = tmp_path_factory.mktemp("parity-prepared")
    out = {}
    for style in STYLES:
        out[style] = prepare(data / style / "train.jsonl", real_model, root / f"{style}-train", "bfd")
        prepare(data / style / "held-out.jsonl", real_model, root / f"{style}-held-out", "none")
    out["root"] = root
    return out


def held_out_loss(model, rows) -> float:
    """Mean next-token loss over the assistant tokens (labels != -100) of the held-out rows."""
    from jobs.train.packed_batch import token_loss_sum

    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            ids = torch.as_tensor(row["input_ids"], dtype=torch.long)[None]
            labels = torch.as_tensor(row["labels"], dtype=torch.long)[None]
            s, n = token_loss_sum(model(input_ids=ids).logits, labels)
            total, count = total + float(s), count + n
    return total / count


def held_out_losses(base: Path, adapter: Path, prepared: dict) -> dict[str, float]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter).eval()
    losses = {}
    for style in STYLES:
        rows = pq.read_table(prepared["root"] / f"{style}-held-out" / "train").to_pylist()
        losses[style] = held_out_loss(model, rows)
    return losses


def train_raysft(real_model: Path, prepared: dict, seed: int, storage: Path) -> Path:
    spec = {"name": f"parity-{seed}", "model": {"uri": str(real_model), "dtype": "fp32"},
            "datasets": [{"uri": str(prepared["root"] / f"{style}-train")} for style in STYLES],
            "method": "lora", "lora": LORA | {"target_modules": "all-linear"}, "strategy": {"kind": "ddp"},
            "optim": {"lr": LR, "scheduler": "cosine", "warmup_ratio": 0.0},
            "batch": {"micro_batch_size": MICRO, "grad_accum": ACCUM}, "epochs": 1, "seed": seed,
            "scaling": {"num_workers": 1, "cpus_per_worker": 2}, "log_every_steps": 1,
            "checkpoint": {"storage": str(storage), "every_steps": 1000, "keep": 1},
            "eval": {"every_steps": 1000}, "export": {"merge_lora": False}}
    # CI builds the image beside this test: a run that shares its two cores can take several
    # times its 2 minutes alone (the pytest timeout above still bounds the whole test).
    run("jobs.train", spec, timeout=1500)
    return storage / f"parity-{seed}" / "export" / "adapter"


def conversations_per_step(prepared: dict) -> int:
    """TRL's batch (unpacked conversations) holding as many tokens as a raysft step's packed rows."""
    tokens = sum(prepared[s]["tokens"]["all"] for s in STYLES)
    samples = sum(prepared[s]["counts"]["samples"]["train"] for s in STYLES)
    rows = sum(prepared[s]["packing"]["rows"]["train"] for s in STYLES)
    return max(1, round(MICRO * ACCUM * (tokens / rows) / (tokens / samples)))


def train_trl(real_model: Path, data: Path, batch: int, seed: int, out: Path) -> Path:
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    rows = []
    for style in STYLES:
        for line in (data / style / "train.jsonl").read_text().splitlines():
            user, reply = json.loads(line)["messages"]
            rows.append({"prompt": [user], "completion": [reply]})  # loss on the reply alone
    config = SFTConfig(output_dir=str(out), per_device_train_batch_size=batch, gradient_accumulation_steps=1,
                       learning_rate=LR, lr_scheduler_type="cosine", warmup_steps=0, num_train_epochs=1,
                       seed=seed, max_length=MAX_LEN, packing=False, use_cpu=True, save_strategy="no",
                       report_to=[], logging_steps=1, model_init_kwargs={"dtype": torch.float32},
                       weight_decay=0.0, max_grad_norm=1.0,
                       # As raysft trains here: fp32 (bf16 on a CPU without bf16 units is ~20x slower)
                       # and no activation recomputation.
                       bf16=False, fp16=False, gradient_checkpointing=False)
    lora = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                      target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=str(real_model), args=config, train_dataset=Dataset.from_list(rows), peft_config=lora)
    trainer.train()
    trainer.model.save_pretrained(out / "adapter")
    return out / "adapter"


@pytest.mark.timeout(3000)  # four fine-tunes of a 135M model on two cores: about 10 minutes
def test_raysft_learns_a_two_dataset_mixture_as_well_as_trl(real_model, data, prepared, tmp_path, record_property):
    batch = conversations_per_step(prepared)
    results: dict[str, list[dict[str, float]]] = {"raysft": [], "trl": []}
    seconds: dict[str, float] = {"raysft": 0.0, "trl": 0.0}
    for seed in SEEDS:
        started = time.perf_counter()
        adapter = train_raysft(real_model, prepared, seed, tmp_path / "raysft")
        seconds["raysft"] += time.perf_counter() - started
        results["raysft"].append(held_out_losses(real_model, adapter, prepared))
        started = time.perf_counter()
        adapter = train_trl(real_model, data, batch, seed, tmp_path / f"trl-{seed}")
        seconds["trl"] += time.perf_counter() - started
        results["trl"].append(held_out_losses(real_model, adapter, prepared))
    base = {}
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(real_model, dtype=torch.float32).eval()
    for style in STYLES:
        base[style] = held_out_loss(model, pq.read_table(prepared["root"] / f"{style}-held-out" / "train").to_pylist())
    report = {"base": base, "trl_batch": batch, "wall_s": {k: round(v, 1) for k, v in seconds.items()}}
    for system, runs in results.items():
        report[system] = {style: {"mean": round(statistics.mean(r[style] for r in runs), 4),
                                  "worst": round(max(r[style] for r in runs), 4),
                                  "seeds": [round(r[style], 4) for r in runs]} for style in STYLES}
    record_property("parity", json.dumps(report))
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(json.dumps(report, indent=2) + "\n")  # make test-parity prints it
    for style in STYLES:
        ours, theirs = report["raysft"][style], report["trl"][style]
        assert ours["mean"] < base[style] and theirs["mean"] < base[style]  # both learned
        assert ours["mean"] <= theirs["mean"] * 1.03, (style, report)
        assert ours["worst"] <= theirs["worst"], (style, report)
    assert np.isfinite([v for r in results["raysft"] for v in r.values()]).all()
