"""Chat completions' wire format, read by the official `openai` package: whole answers and
server-sent event streams (with usage), the request's refusals, the model a name resolves to, and
limits; the models themselves are a stand-in here (tests/integration/test_serving.py serves real
ones on Ray Serve)."""

from __future__ import annotations

import openai
import pytest
from fastapi.testclient import TestClient
from support.service import RecordingRay, service_settings

from service import store
from service.app import create_app
from service.core.errors import TooManyJobs


class AnsweringServing:
    """Answers every chat with "Hello" in two pieces, recording what it was asked."""

    def __init__(self):
        self.asked = []
        self.busy = False

    async def answer(self, tenant, target, messages, sampling):
        self.asked.append({"tenant": tenant, "target": target, "messages": messages, "sampling": sampling})
        if self.busy:
            raise TooManyJobs("tenant acme has 4 chats answering (the limit is 4)", retry_after_s=1)
        for piece in ("Hel", "lo"):
            yield {"delta": piece}
        yield {"finish_reason": "stop", "usage": {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}}


@pytest.fixture
def http(tmp_path, tiny_model):
    data = tmp_path / "data"
    app = create_app(service_settings(data, tiny_model, serve_max_tokens=100,
                                      openai_models={"tiny": {"uri": str(data / "models/tiny")}}),
                     ray=RecordingRay(), reconcile=False)
    with TestClient(app) as c:
        app.state.core.serving = AnsweringServing()
        with app.state.core.sessions() as session:
            c.key = store.create_api_key(session, "acme")
        yield c


def client(http) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver/openai/v1", api_key=http.key, http_client=http, max_retries=0)


QUESTION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]


def test_a_whole_answer_and_a_stream_with_usage_read_by_the_openai_package(http):
    oa = client(http)
    answer = oa.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=20, temperature=0.5, seed=3,
                                        stop="###")
    assert answer.choices[0].message.content == "Hello" and answer.choices[0].finish_reason == "stop"
    assert answer.model == "tiny" and answer.usage.total_tokens == 9 and answer.object == "chat.completion"
    asked = http.app.state.core.serving.asked[-1]
    assert asked["messages"] == QUESTION and asked["tenant"] == "acme"
    assert asked["sampling"] == {"max_tokens": 20, "temperature": 0.5, "top_p": 1.0, "seed": 3, "stop": ["###"]}
    assert asked["target"].adapter is None and asked["target"].base.endswith("models/tiny")

    chunks = list(oa.chat.completions.create(model="tiny", messages=QUESTION, stream=True,
                                             stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 2
    assert http.app.state.core.serving.asked[-1]["sampling"]["max_tokens"] == 100  # the service's limit by default


def test_what_cannot_be_honoured_is_refused_and_limits_hold(http):
    oa = client(http)
    refusals = {
        "n: raysft answers once per request": {"n": 2},
        "max_tokens: 101 is over this service's limit of 100": {"max_tokens": 101},
        "messages.0.content": {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        "stop: at most 4 stop strings": {"stop": ["a", "b", "c", "d", "e"]},
        "temperature": {"temperature": 3},
    }
    for message, fields in refusals.items():
        with pytest.raises(openai.UnprocessableEntityError) as refused:
            oa.chat.completions.create(**{"model": "tiny", "messages": QUESTION} | fields)
        assert message in refused.value.body["message"], (message, refused.value.body)
    for name in ("gpt-4o", "ft:tiny:acme::0123456789abcdef", "ft:tiny:globex:x:0123"):
        with pytest.raises(openai.NotFoundError, match="no model"):
            oa.chat.completions.create(model=name, messages=QUESTION)
    http.app.state.core.serving.busy = True
    with pytest.raises(openai.RateLimitError, match="chats answering"):
        oa.chat.completions.create(model="tiny", messages=QUESTION)


def test_the_native_chat_needs_a_succeeded_training_of_the_tenant(http):
    auth = {"Authorization": f"Bearer {http.key}"}
    assert http.post("/v1/jobs/nope/chat", json={"messages": QUESTION}, headers=auth).status_code == 404
    assert http.post("/v1/jobs/nope/chat", json={"messages": []}, headers=auth).status_code == 422
