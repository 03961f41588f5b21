"""Chat templates of the model families people fine-tune most, written for the tests by this
project in the layout of each real family (not copied from any model): what each renders
around a reply, what ends a turn, what it does with a system prompt. `family_tokenizer` gives the
scaffold tokenizer with a family's special tokens, eos/bos and template, saved as a tokenizer
directory a dataset spec can name; `trained_runs` what a rendered conversation trains."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from jobs.common import tokenizer_files


@dataclass(frozen=True)
class Family:
    name: str
    template: str
    eot: str  # what ends a reply: the token a trained model must learn to stop at
    eos: str
    bos: str | None = None
    specials: tuple[str, ...] = ()
    system: bool = True  # whether the template takes a system turn
    notes: list[str] = field(default_factory=list)


CHATML_TURNS = r"""{%- for message in messages %}{%- if message['role'] != 'system' %}{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"""


def chatml_with_default_system(default: str) -> str:
    return (r"{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\n' + messages[0]['content'] + "
            r"'<|im_end|>\n' }}{%- else %}{{- '<|im_start|>system\n" + default + r"<|im_end|>\n' }}{%- endif %}"
            + CHATML_TURNS)


FAMILIES = [
    # Qwen2.5 base: ChatML turns, but eos is <|endoftext|>; a default system prompt.
    Family("qwen2.5", chatml_with_default_system("You are Qwen, created by Alibaba Cloud. You are a helpful assistant."),
           eot="<|im_end|>", eos="<|endoftext|>", specials=("<|im_start|>", "<|im_end|>", "<|endoftext|>")),
    # SmolLM2: ChatML, eos <|im_end|>, its own default system prompt.
    Family("smollm2", chatml_with_default_system("You are a helpful AI assistant named SmolLM, trained by Hugging Face"),
           eot="<|im_end|>", eos="<|im_end|>", bos="<|im_start|>", specials=("<|im_start|>", "<|im_end|>")),
    # Llama 3: header ids around the role, <|eot_id|> ends each turn, eos differs (base models).
    Family("llama3", r"""{{- bos_token }}{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}""",
           eot="<|eot_id|>", eos="<|end_of_text|>", bos="<|begin_of_text|>",
           specials=("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
    # Mistral v0.3 / Nemo: [INST] turns, the system prompt folded into the last user turn, replies end with eos.
    Family("mistral-v0.3", r"""{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}{%- set ns = namespace(last_user=-1) %}{%- for m in loop_messages %}{%- if m['role'] == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}{%- endfor %}{{- bos_token }}{%- for message in loop_messages %}{%- if message['role'] == 'user' %}{%- if loop.index0 == ns.last_user and system_message is defined %}{{- '[INST] ' + system_message + '\n\n' + message['content'] + '[/INST]' }}{%- else %}{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token }}{%- else %}{{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}{%- endif %}{%- endfor %}""",
           eot="</s>", eos="</s>", bos="<s>", specials=("<s>", "</s>", "[INST]", "[/INST]")),
    # Gemma: no system role at all, `model` for the assistant, <end_of_turn>.
    Family("gemma", r"""{{- bos_token }}{%- if messages[0]['role'] == 'system' %}{{- raise_exception('System role not supported') }}{%- endif %}{%- for message in messages %}{%- set role = 'model' if message['role'] == 'assistant' else message['role'] %}{{- '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<start_of_turn>model\n' }}{%- endif %}""",
           eot="<end_of_turn>", eos="<eos>", bos="<bos>", specials=("<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"),
           system=False),
    # Qwen3: reasoning stripped from earlier turns, an (empty) think block on the turn after the last user query.
    Family("qwen3", r"""{%- set ns = namespace(last_query=0) %}{%- for m in messages %}{%- if m['role'] == 'user' %}{%- set ns.last_query = loop.index0 %}{%- endif %}{%- endfor %}{%- for message in messages %}{%- if message['role'] == 'assistant' %}{%- set content = message['content'] %}{%- set reasoning = '' %}{%- if '</think>' in content %}{%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\n') %}{%- set content = content.split('</think>')[-1].lstrip('\n') %}{%- endif %}{%- if loop.index0 > ns.last_query %}{{- '<|im_start|>assistant\n<think>\n' + reasoning + '\n</think>\n\n' + content + '<|im_end|>\n' }}{%- else %}{{- '<|im_start|>assistant\n' + content + '<|im_end|>\n' }}{%- endif %}{%- else %}{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n<think>\n\n</think>\n\n' }}{%- endif %}""",
           eot="<|im_end|>", eos="<|im_end|>", specials=("<|im_start|>", "<|im_end|>", "<|endoftext|>")),
    # Phi-3: <|user|> / <|assistant|> tags, <|end|> after each turn, eos at the very end.
    Family("phi3", r"""{%- for message in messages %}{{- '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|assistant|>\n' }}{%- else %}{{- eos_token }}{%- endif %}""",
           eot="<|end|>", eos="<|endoftext|>", specials=("<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>")),
    # A template that marks replies itself with {% generation %} blocks (as TRL's assistant-only loss expects).
    Family("chatml-generation", r"""{%- for message in messages %}{%- if message['role'] == 'assistant' %}{{- '<|im_start|>assistant\n' }}{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}{{- '\n' }}{%- else %}{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}""",
           eot="<|im_end|>", eos="<|endoftext|>", specials=("<|im_start|>", "<|im_end|>", "<|endoftext|>")),
]


def family_tokenizer(family: Family, tiny_model: Path, out: Path):
    """The scaffold tokenizer dressed as the family's, saved under `out`; returns it loaded from there."""
    from tokenizers import AddedToken

    tokenizer = tokenizer_files.load(tokenizer_files.fetch(str(tiny_model)))
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in family.specials], special_tokens=True)
    tokenizer.eos_token, tokenizer.bos_token = family.eos, family.bos
    tokenizer.chat_template = family.template
    tokenizer.save_pretrained(out)
    return tokenizer_files.load(tokenizer_files.fetch(str(out)))


def trained_runs(tokenizer, messages: list[dict], chat) -> list[str]:
    """The text of each run of consecutive trained tokens when `chat` renders `messages`."""
    import numpy as np

    from jobs.common.contract import IGNORE_INDEX
    from jobs.prepare.labels import tokenize_rendered
    from jobs.prepare.spec import Truncation

    rendered = chat.render(messages)
    [tokenized] = tokenize_rendered(tokenizer, [rendered.text], [rendered.spans], 4096, Truncation.TRUNCATE)
    trained = tokenized.labels != IGNORE_INDEX
    edges = np.flatnonzero(np.diff(np.concatenate([[0], trained.astype(np.int8), [0]])))
    return [tokenizer.decode(tokenized.input_ids[a:b].tolist()) for a, b in zip(edges[::2], edges[1::2], strict=True)]
