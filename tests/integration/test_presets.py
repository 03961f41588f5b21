"""Every shipped training preset starts and takes 2 optimizer steps on CPU: the model and datasets
swapped for the scaffold ones, storage for a local directory, and the settings only a GPU has
mapped to what the engine does without one. A preset whose engine cannot start (ZeRO-Offload
refusing a client optimizer, say) fails here, not on a user's cluster."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from support.jobs import run

from jobs.train.spec import load_training_spec

# Each preset runs a real 2-step job (30-90 s on 2 cores; the first ZeRO-Offload run also compiles
# DeepSpeed's CPU Adam once): `make test-slow`.
pytestmark = [pytest.mark.integration, pytest.mark.slow]
PRESETS = sorted((Path(__file__).resolve().parents[2] / "configs/training").glob("*.yaml"))


def on_cpu(preset: dict, tiny_model: Path, prepared: Path, storage: Path) -> dict:
    """The preset as this machine can run it; everything else as shipped."""
    spec = dict(preset)
    spec["model"] = preset["model"] | {"uri": str(tiny_model), "dtype": "fp32"}
    if spec["model"].get("attn_implementation") == "flash_attention_2":
        spec["model"]["attn_implementation"] = "sdpa"  # the same attention, without the CUDA kernel
    spec["datasets"] = [{"uri": str(prepared), "weight": d.get("weight", 1.0)} for d in preset["datasets"]]
    if preset.get("method") == "qlora":
        spec["method"] = "lora"  # 4-bit base weights need bitsandbytes on CUDA; the adapter trains the same
    spec["scaling"] = preset.get("scaling", {}) | {"use_gpu": False, "cpus_per_worker": 1,
                                                   "num_workers": min(2, preset.get("scaling", {}).get("num_workers", 1))}
    spec["batch"] = preset.get("batch", {}) | {"micro_batch_size": 1, "grad_accum": min(2, preset["batch"]["grad_accum"])}
    spec.pop("epochs", None)
    spec["max_steps"] = 2
    spec["checkpoint"] = preset["checkpoint"] | {"storage": str(storage), "every_steps": 2}
    spec["eval"] = preset.get("eval", {}) | {"every_steps": 2, "max_new_tokens": 4}
    return spec


@pytest.mark.parametrize("path", PRESETS, ids=[p.stem for p in PRESETS])
def test_every_preset_starts_and_steps_on_cpu(path, tiny_model, prepared, tmp_path):
    spec = on_cpu(yaml.safe_load(path.read_text()), tiny_model, prepared, tmp_path)
    load_training_spec(spec)  # still a valid spec
    proc = run("jobs.train", spec)
    assert '"step": 2' in proc.stdout, proc.stdout[-3000:]
    assert (tmp_path / spec["name"] / "export").exists()
