"""Chat templates of 24 model families, copied verbatim from public repositories
(`tests/data/chat_templates/`, each file's repository, path and commit in `families.json`), and
the scaffold tokenizer dressed with each model's real special tokens, eos and bos."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from jobs.common import tokenizer_files

TEMPLATES = Path(__file__).resolve().parents[1] / "data" / "chat_templates"

# What each family must train after a reply another turn follows, and after the last reply: read
# from each model's template and generation config by hand, not from raysft's code. GLM-4.5 ends
# a reply with the next turn's `<|user|>` (a stop token in its generation config) and renders
# nothing after the last one, so its eos is inserted there.
TERMINATORS: dict[str, tuple[str, str]] = {
    "qwen2.5": ("<|im_end|>", "<|im_end|>"), "qwen3": ("<|im_end|>", "<|im_end|>"),
    "llama3": ("<|eot_id|>", "<|eot_id|>"), "llama3.1": ("<|eot_id|>", "<|eot_id|>"),
    "llama3.2": ("<|eot_id|>", "<|eot_id|>"), "mistral-v0.1": ("</s>", "</s>"), "mistral-nemo": ("</s>", "</s>"),
    "gemma2": ("<end_of_turn>", "<end_of_turn>"), "gemma3": ("<end_of_turn>", "<end_of_turn>"),
    "phi3": ("<|end|>", "<|end|>"), "phi3.5": ("<|end|>", "<|end|>"), "phi4": ("<|im_end|>", "<|im_end|>"),
    "deepseek-v3": ("<｜end▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
    "deepseek-r1-distill": ("<｜end▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
    "command-r": ("<|END_OF_TURN_TOKEN|>", "<|END_OF_TURN_TOKEN|>"),
    "command-r7b": ("<|END_RESPONSE|><|END_OF_TURN_TOKEN|>", "<|END_RESPONSE|><|END_OF_TURN_TOKEN|>"),
    "granite3.3": ("<|end_of_text|>", "<|end_of_text|>"), "olmo2": ("<|end_of_text|>", "<|end_of_text|>"),
    "zephyr": ("</s>", "</s>"), "smollm2": ("<|im_end|>", "<|im_end|>"), "lfm2": ("<|im_end|>", "<|im_end|>"),
    "lfm2.5": ("<|im_end|>", "<|im_end|>"), "gpt-oss": ("<|end|>", "<|return|>"), "glm4.5": ("<|user|>", "<|endoftext|>"),
}


@dataclass(frozen=True)
class RealFamily:
    name: str
    template: str
    bos: str | None
    eos: str
    specials: tuple[str, ...]
    added: tuple[str, ...]  # added tokens that are not special (`<think>` in Qwen3)
    system: bool  # whether the template takes a system turn
    source: str  # repository@commit:path

    @property
    def turn_end(self) -> str:
        return TERMINATORS[self.name][0]

    @property
    def last_end(self) -> str:
        return TERMINATORS[self.name][1]


def families() -> list[RealFamily]:
    return [RealFamily(f["name"], (TEMPLATES / f["file"]).read_text(), f["bos"], f["eos"], tuple(f["specials"]),
                       tuple(f.get("added_not_special") or ()), f["system"], f"{f['repo']}@{f['commit']}:{f['path']}")
            for f in json.loads((TEMPLATES / "families.json").read_text())]


def real_tokenizer(family: RealFamily, tiny_model: Path, out: Path):
    """The scaffold tokenizer with the family's special tokens, eos, bos and chat template, saved
    under `out` and loaded back as a spec would load it."""
    from tokenizers import AddedToken

    tokenizer = tokenizer_files.load(tokenizer_files.fetch(str(tiny_model)))
    specials = dict.fromkeys((*family.specials, family.eos, *([family.bos] if family.bos else [])))
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in specials], special_tokens=True)
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in family.added])
    tokenizer.eos_token, tokenizer.bos_token = family.eos, family.bos
    tokenizer.chat_template = family.template
    tokenizer.save_pretrained(out)
    return tokenizer_files.load(tokenizer_files.fetch(str(out)))
