"""Trained tokens are exactly each assistant reply plus its end-of-turn token."""

import numpy as np
import pytest

from jobs.common.contract import IGNORE_INDEX
from jobs.prepare.formats import RowReject
from jobs.prepare.labels import build_labels, fit_length, tokenize_rendered
from jobs.prepare.spec import TemplateName, TrainOn, Truncation
from jobs.prepare.templates import build_template, select_spans

CONVERSATIONS = [
    [
        {"role": "system", "content": "You are a patient cooking tutor."},
        {"role": "user", "content": "How long should I rest a steak?"},
        {"role": "assistant", "content": "Rest it for about five minutes, loosely covered with foil."},
        {"role": "user", "content": "Why does resting help?"},
        {"role": "assistant", "content": "The juices settle back into the meat instead of running onto the board."},
        {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": "You're welcome. Enjoy your dinner."},
    ],
    [
        {"role": "user", "content": "Give me one tip for studying."},
        {"role": "assistant", "content": "Test yourself instead of rereading your notes."},
        {"role": "user", "content": "And another?"},
        {"role": "assistant", "content": "Space your sessions out over several days."},
    ],
]
CUSTOM = (
    "{% for m in messages %}{{ '## ' + m['role'] + '\\n' + m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '## assistant\\n' }}{% endif %}"
)
TEMPLATES = [*[t for t in TemplateName], CUSTOM]


def trained_runs(tokenizer, ids, labels):
    """Decoded text of each maximal run of trained tokens."""
    runs, current = [], []
    for token, label in zip(ids.tolist(), labels.tolist(), strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(r, skip_special_tokens=False) for r in runs]


def encode(tokenizer, template, conversation, train_on=TrainOn.ASSISTANT):
    chat = build_template(template, tokenizer)
    rendered = chat.render(conversation)
    [result] = tokenize_rendered(tokenizer, [rendered.text], [select_spans(rendered, train_on)], 4096, Truncation.DROP)
    return chat, rendered, result


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda t: str(t)[:12])
@pytest.mark.parametrize("conversation", CONVERSATIONS, ids=["system+3turns", "2turns"])
def test_trained_tokens_are_exactly_replies_plus_eot(tokenizer, template, conversation):
    chat, rendered, result = encode(tokenizer, template, conversation)
    replies = [m["content"] for m in conversation if m["role"] == "assistant"]
    assert trained_runs(tokenizer, result.input_ids, result.labels) == [r + chat.eot for r in replies]
    # The end-of-turn token itself carries loss: a model must learn to stop.
    eot_id = tokenizer.convert_tokens_to_ids(chat.eot)
    assert (result.labels == eot_id).sum() == len(replies)
    # Nothing of the system or user text is trained.
    trained_text = "".join(trained_runs(tokenizer, result.input_ids, result.labels))
    for m in conversation:
        if m["role"] != "assistant":
            assert m["content"] not in trained_text


def test_tokenizer_template_is_the_scaffold_chat_template(tokenizer):
    chat, rendered, result = encode(tokenizer, TemplateName.TOKENIZER, CONVERSATIONS[0])
    assert rendered.text == tokenizer.apply_chat_template(CONVERSATIONS[0], tokenize=False)
    assert chat.eot == "<|im_end|>" == tokenizer.eos_token


def test_last_assistant_and_all(tokenizer):
    conv = CONVERSATIONS[0]
    chat, _, last = encode(tokenizer, TemplateName.CHATML, conv, TrainOn.LAST_ASSISTANT)
    assert trained_runs(tokenizer, last.input_ids, last.labels) == [conv[-1]["content"] + chat.eot]
    _, rendered, everything = encode(tokenizer, TemplateName.CHATML, conv, TrainOn.ALL)
    assert (everything.labels[1:] == everything.input_ids[1:]).all()
    assert everything.labels[0] == IGNORE_INDEX  # nothing predicts the first token


def test_masks_survive_a_merge_across_the_role_boundary(tokenizer):
    """`A: The` tokenizes as `A:` + ` The`: the space of the prompt merges with the reply's first word.

    Tokenizing prompt and reply apart gives other ids than the real text; offsets over the whole
    text keep the mask on the tokens that are really there."""
    template = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ 'Q: ' + m['content'] + '\\n' }}"
                "{% else %}{{ 'A: ' + m['content'] + eos_token + '\\n' }}{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}{{ 'A:' }}{% endif %}")
    conv = [{"role": "user", "content": "Is water wet?"}, {"role": "assistant", "content": "The answer is yes."}]
    chat, rendered, result = encode(tokenizer, template, conv)
    reply_at = rendered.text.index("The answer")
    prompt_part, reply_part = rendered.text[:reply_at], rendered.text[reply_at:]  # "...A: " | "The answer..." 
    whole = tokenizer(rendered.text, add_special_tokens=False)["input_ids"]
    apart = (tokenizer(prompt_part, add_special_tokens=False)["input_ids"]
             + tokenizer(reply_part, add_special_tokens=False)["input_ids"])
    assert whole == result.input_ids.tolist()
    # The shortcut would train on tokens the model never sees (` The` is one token in the real text).
    assert apart != whole
    assert trained_runs(tokenizer, result.input_ids, result.labels) == [" The answer is yes." + chat.eot]


def test_overlap_rule_on_char_to_token():
    ids = [10, 11, 12, 13]
    owner = {0: 0, 1: 0, 2: 0, 3: 1, 4: 1, 5: 1, 6: 2, 7: 2, 8: 2, 10: 3}  # char 9 belongs to no token
    _, labels = build_labels(ids, owner.get, [(4, 9)])  # token 1 straddles the span start
    assert labels.tolist() == [IGNORE_INDEX, 11, 12, IGNORE_INDEX]
    _, labels = build_labels(ids, owner.get, [(9, 11)])  # first covered character of the span is 10
    assert labels.tolist() == [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 13]
    _, labels = build_labels(ids, owner.get, [(0, 11)])
    assert labels.tolist() == [IGNORE_INDEX, 11, 12, 13]
    _, labels = build_labels(ids, owner.get, [(9, 10)])  # a span with no token trains nothing
    assert (labels == IGNORE_INDEX).all()


def test_truncation_policies():
    ids = np.arange(10, dtype=np.int32)
    labels = np.where(ids >= 5, ids, IGNORE_INDEX).astype(np.int32)
    with pytest.raises(RowReject, match="too_long"):
        fit_length(ids, labels, 8, Truncation.DROP)
    kept = fit_length(ids, labels, 8, Truncation.TRUNCATE)
    assert kept.truncated and len(kept.input_ids) == 8 and kept.trainable == 3
    with pytest.raises(RowReject) as info:
        fit_length(ids, labels, 4, Truncation.TRUNCATE)
    assert info.value.reason == "no_trainable_tokens_after_truncation"


def test_template_problems_fail_early_with_the_fix(tokenizer):
    build_template(TemplateName.CHATML, tokenizer, None)
    with pytest.raises(ValueError, match="is not what this template renders after a reply .'<|im_end|>'.: set eot_token"):
        build_template(CUSTOM, tokenizer, "</eot>")
    plain_eot = CUSTOM.replace("{{ eos_token }}", "{{ '</eot>' }}")  # a reply ends in text the tokenizer splits
    with pytest.raises(ValueError, match="'</eot>' is [0-9]+ tokens in this tokenizer, not one"):
        build_template(plain_eot, tokenizer, "</eot>")
    no_reply = "{% for m in messages %}{{ m['role'] }}{% endfor %}"
    with pytest.raises(ValueError, match="cannot be used for masking"):
        build_template(no_reply, tokenizer)



@pytest.mark.parametrize("template", [t for t in TemplateName if t is not TemplateName.TOKENIZER])
@pytest.mark.parametrize("conversation", CONVERSATIONS, ids=["system+3turns", "2turns"])
def test_builtin_template_as_jinja_renders_the_same_text(tokenizer, template, conversation):
    """The exported model is served with the template it was trained on: the Jinja form of a
    built-in layout renders byte for byte what training rendered, generation prompt included."""
    chat = build_template(template, tokenizer)
    rendered = chat.render(conversation)
    assert tokenizer.apply_chat_template(conversation, chat_template=chat.chat_template(), tokenize=False) == rendered.text
    prompt = tokenizer.apply_chat_template(conversation[:-1], chat_template=chat.chat_template(), tokenize=False,
                                           add_generation_prompt=True)
    assert prompt == rendered.text[:rendered.spans[-1][0]]


# Runs in a fresh interpreter: what a preparation's driver imports to load the tokenizer.
LOAD_PLAIN_AND_AUTO = """
import json, sys
from jobs.common import tokenizer_files
files = tokenizer_files.fetch(sys.argv[1])
plain = tokenizer_files.load(files)
torch_before_auto = "torch" in sys.modules
named_elsewhere = dict(files, **{"tokenizer_config.json": json.dumps(
    dict(json.loads(files["tokenizer_config.json"]), tokenizer_class="GPT2TokenizerFast")).encode()})
auto = tokenizer_files.load(named_elsewhere)
text = "<|im_start|>user\\nHow long should I rest a steak?<|im_end|>\\n"
print(json.dumps({"torch_before_auto": torch_before_auto, "plain": type(plain).__name__, "auto": type(auto).__name__,
                  "same_ids": plain(text)["input_ids"] == auto(text)["input_ids"],
                  "same_template": plain.chat_template == auto.chat_template,
                  "same_specials": [plain.eos_token_id, plain.pad_token_id] == [auto.eos_token_id, auto.pad_token_id]}))
"""


def test_a_plain_fast_tokenizer_loads_without_torch_and_as_autotokenizer_would(tiny_model):
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", LOAD_PLAIN_AND_AUTO, str(tiny_model)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["torch_before_auto"] is False  # two seconds of every small preparation
    assert result["auto"].startswith("GPT2Tokenizer")  # another class goes through AutoTokenizer
    assert result["same_ids"] and result["same_template"] and result["same_specials"], result
