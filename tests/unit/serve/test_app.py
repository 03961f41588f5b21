"""The serving replica's model handling (jobs/serve/app.py) in process, without Ray Serve: the
base model loaded once, adapters loaded on first use and switched per request with exactly the
answers peft gives, the base model's answer with an adapter loaded, and the least recently used
adapter dropped past the limit. Ray Serve itself: tests/integration/test_serving.py."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from jobs.serve.app import ChatModel
from jobs.serve.generation import Sampling, complete, prompt_ids, stop_ids

QUESTION = [{"role": "user", "content": "How many tablespoons are in a cup?"}]
GREEDY = {"max_tokens": 12, "temperature": 0, "top_p": 1.0, "seed": None, "stop": []}


def adapter(tiny_model, path, seed):
    """A LoRA adapter with weights that change the answers (LoRA's B starts at zero)."""
    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                           LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    for name, weight in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(weight, std=0.5)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(path)
    return str(path)


def reference(tiny_model, adapter_dir=None) -> str:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    if adapter_dir:
        model = PeftModel.from_pretrained(model, adapter_dir).eval()
    return complete(model, tokenizer, prompt_ids(tokenizer, QUESTION), Sampling(max_tokens=12, temperature=0),
                    stop_ids(tokenizer, model, ["<|im_end|>"])).text


def answer(replica, adapter_uri=None) -> tuple[str, dict]:
    lines = [json.loads(line) for line in replica._lines({"messages": QUESTION, "adapter": adapter_uri,
                                                          "stop_tokens": ["<|im_end|>"], "sampling": GREEDY})]
    return "".join(line.get("delta", "") for line in lines), lines[-1]


@pytest.fixture(scope="module")
def adapters(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return [adapter(tiny_model, root / f"a{i}", seed=i) for i in range(3)]


def test_adapters_are_switched_per_request_and_the_base_answers_as_the_base(tiny_model, adapters):
    replica = ChatModel.func_or_class(str(tiny_model), "fp32", max_adapters=2)
    expected = [reference(tiny_model, a) for a in adapters]
    base = reference(tiny_model)
    assert len({base, *expected}) == 4  # the adapters do change the answers
    text, last = answer(replica, adapters[0])
    assert text == expected[0] and last["finish_reason"] in ("stop", "length") and last["usage"]["completion_tokens"]
    assert answer(replica)[0] == base  # an adapter loaded, switched off for a base request
    assert answer(replica, adapters[1])[0] == expected[1] and answer(replica, adapters[0])[0] == expected[0]
    assert answer(replica, adapters[2])[0] == expected[2]  # a third: the least recently used (a1) goes
    assert list(replica.adapters) == [adapters[0], adapters[2]]
    assert answer(replica, adapters[1])[0] == expected[1]  # and comes back when asked for


def test_a_replica_deployed_with_a_token_answers_only_requests_that_carry_it(tiny_model):
    import asyncio

    from starlette.requests import Request

    from service.core.serving import proxy_token

    token = proxy_token("the-ray-token")
    assert token and token != proxy_token("another-ray-token") and "the-ray-token" not in token
    assert proxy_token(None) is None  # Ray without a token: nothing to derive one from
    replica = ChatModel.func_or_class(str(tiny_model), "fp32", token=token)
    body = json.dumps({"messages": QUESTION, "adapter": None, "stop_tokens": ["<|im_end|>"], "sampling": GREEDY})

    async def status(authorization: str | None) -> int:
        headers = [(b"authorization", authorization.encode())] if authorization is not None else []
        sent = False

        async def receive():
            nonlocal sent
            sent = True
            return {"type": "http.request", "body": body.encode(), "more_body": False}

        request = Request({"type": "http", "method": "POST", "path": "/", "headers": headers}, receive)
        response = await replica(request)
        assert sent == (response.status_code == 200)  # a refused request is not even read
        return response.status_code

    assert [asyncio.run(status(a)) for a in (None, "Bearer wrong", token, f"Bearer {token}")] == [401, 401, 401, 200]
