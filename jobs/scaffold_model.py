"""Write a tiny random-init causal LM and a BPE tokenizer trained on local text: a model directory
that needs no hub, loadable with `AutoTokenizer` / `AutoModelForCausalLM.from_pretrained`.

    python -m jobs.scaffold_model OUT_DIR [--data configs/data]

The tokenizer is byte-level BPE with ChatML special tokens (`<|im_end|>` is its eos) and a ChatML
`chat_template`; the model is a ~0.4M-parameter Llama saved as safetensors.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from jobs.prepare import records

DEFAULT_DATA = Path(__file__).resolve().parents[1] / "configs" / "data"
PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def corpus(data_dir: Path) -> list[str]:
    """Every string value of every parseable row of the example files."""
    texts = []
    for path in sorted(data_dir.iterdir()):
        if records.file_type(path.name):
            for row in records.split_rows(path.name, path.read_bytes()):
                texts.extend(_strings(row.record) if row.record else ())
    if not texts:
        raise SystemExit(f"no text found under {data_dir}")
    return texts


def build_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # Untrimmed offsets: a token's character range includes its leading space, as masks expect.
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=IM_END, pad_token=PAD,
                                   additional_special_tokens=[IM_START, IM_END])
    fast.chat_template = CHATML_TEMPLATE
    fast.model_max_length = 2048
    return fast


def build_model(tokenizer, seed: int):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=96,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.convert_tokens_to_ids(IM_END),
        pad_token_id=tokenizer.convert_tokens_to_ids(PAD),
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def scaffold(out_dir: Path, data_dir: Path = DEFAULT_DATA, vocab_size: int = 2048, seed: int = 0) -> int:
    """Write tokenizer and model into `out_dir`; returns the model's parameter count."""
    tokenizer = build_tokenizer(corpus(data_dir), vocab_size)
    model = build_model(tokenizer, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    return sum(p.numel() for p in model.parameters())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.scaffold_model", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="directory of example datasets")
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    params = scaffold(args.out_dir, args.data, args.vocab_size, args.seed)
    print(f"wrote {args.out_dir} ({params:,} parameters)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
