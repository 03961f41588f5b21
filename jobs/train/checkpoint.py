"""What a training checkpoint holds, and how a worker writes and restores one.

    {run}/<checkpoint directory>/   (named by jobs.common.run_layout)
      state/, ddp_state.pt or fsdp_state/ + fsdp_groups.pt
                               engine state: weights, optimizer, scheduler (every rank's shards)
      adapter_model.safetensors, adapter_config.json   LoRA, in PEFT format
      model.safetensors, config.json                   or the full weights (method: full)
      tokenizer files          with the chat template the data was rendered with
      training_state.json      global step, epoch, data cursor, failures, every rank's RNG states, metrics
      spec.json                the training spec

Ray Train registers a checkpoint only after every worker has uploaded its part, and resumes
only from registered ones, so a checkpoint cut short by a crash is never picked up by
`resume: latest`. A checkpoint named by URI must hold `training_state.json`.
"""

from __future__ import annotations

import base64
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from jobs.train.console import say

STATE_FILE = "training_state.json"


@dataclass
class Position:
    """Where training stands: optimizer steps done, the epoch, micro-batches consumed in it, and
    the tokens trained on so far (summed over workers, up to the last logged step)."""

    global_step: int = 0
    epoch: int = 0
    cursor: int = 0
    failures: int = 0  # failures this run recovered from (worker-group restarts, resubmissions)
    tokens_seen: int = 0  # every token of the samples stepped on (padding excluded)
    trainable_tokens_seen: int = 0  # those that carried loss


# ---------------------------------------------------------------- RNG states


def _b64(tensor: torch.Tensor) -> str:
    return base64.b64encode(tensor.numpy().tobytes()).decode()


def _tensor(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def rng_state() -> dict[str, Any]:
    """This process's random generators (Python, NumPy, torch CPU and CUDA) as JSON."""
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(words), gauss], "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
             "torch": _b64(torch.get_rng_state())}
    if torch.cuda.is_available():
        state["cuda"] = _b64(torch.cuda.get_rng_state())
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, words, gauss = state["python"]
    random.setstate((version, tuple(words), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(_tensor(state["cuda"]))


def all_rng_states() -> list[dict[str, Any]]:
    """Every rank's RNG state, in rank order (a collective: all ranks call it)."""
    if not dist.is_initialized():
        return [rng_state()]
    states: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, rng_state())
    return states


# ---------------------------------------------------------------- writing


def save_weights(engine, directory: Path, rank: int) -> None:
    """Rank 0 writes the weights in their serving format: the LoRA adapter (PEFT) or the full model
    (safetensors). Where parameters are sharded (ZeRO-3, FSDP) all ranks gather them one at a
    time, so no other rank ever holds more than one full tensor beyond its shard."""
    from peft import PeftModel

    module = engine.module
    lora = isinstance(module, PeftModel)
    state = {}
    for name, param in module.named_parameters():
        if lora and not param.requires_grad:
            continue
        with engine.gathered(param) as whole:
            if rank == 0:
                state[name] = whole.detach().to("cpu", copy=True)
    if rank == 0:
        module.save_pretrained(directory, state_dict=state, safe_serialization=True)


def write_checkpoint(engine, directory: Path, rank: int, position: Position, metrics: dict[str, Any],
                     tokenizer: Any, spec_json: str) -> bool:
    """Write this rank's part of a checkpoint (a collective); returns whether this rank wrote files."""
    wrote = engine.save(directory)
    save_weights(engine, directory, rank)
    rng = all_rng_states()
    if rank == 0:
        tokenizer.save_pretrained(directory)
        state = asdict(position) | {"world_size": len(rng), "rng": rng, "metrics": metrics}
        (directory / STATE_FILE).write_text(json.dumps(state))
        (directory / "spec.json").write_text(spec_json)
    return wrote or rank == 0


# ---------------------------------------------------------------- restoring


def restore(engine, directory: Path, rank: int, world_size: int) -> Position:
    """Load the engine state, the position and this rank's RNG state from a checkpoint directory."""
    state_file = directory / STATE_FILE
    if not state_file.exists():
        raise FileNotFoundError(f"{directory} has no {STATE_FILE}: not a complete raysft checkpoint")
    state = json.loads(state_file.read_text())
    engine.load(directory)
    if state["world_size"] == world_size:
        set_rng_state(state["rng"][rank])
    else:  # the data split differs too: the run continues, but not bit for bit
        say(f"resume: checkpoint written by {state['world_size']} workers, now {world_size}: "
            "random streams restart")
    # Checkpoints written before the running token totals existed resume with them from zero.
    return Position(state["global_step"], state["epoch"], state["cursor"], state.get("failures", 0),
                    state.get("tokens_seen", 0), state.get("trainable_tokens_seen", 0))
