"""Serving what was trained, end to end through the official `openai` package: the service under
uvicorn and a real local Ray head; a fine-tune of the scaffold model created with
`fine_tuning.jobs.create` runs its real preparation and training, then `chat.completions.create`
on its `fine_tuned_model` is answered by Ray Serve (the base model loaded once, the adapter named
per request), whole and streamed, with exactly the tokens the exported adapter gives in process;
the base model answers as the base model does; another tenant gets 404; and the idle application
scales to zero and answers again (cold start and tokens/s recorded)."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest
import torch
from support import REPO
from support.service import Service
from transformers import AutoModelForCausalLM, AutoTokenizer

from jobs.serve.generation import Sampling, complete, prompt_ids, stop_ids
from service import local_ray, store

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]
QUESTION = [{"role": "user", "content": "How many tablespoons are in a cup?"}]
TRAINING = {"method": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}, "optim": {"lr": 0.05, "warmup_ratio": 0.0},
            "batch": {"micro_batch_size": 2, "grad_accum": 1}, "max_steps": 6, "scaling": {"num_workers": 1},
            "strategy": {"kind": "ddp"}, "model": {"dtype": "fp32"}, "checkpoint": {"every_steps": 3},
            "eval": {"every_steps": 3}}
IDLE_S = 2


@pytest.fixture
def service(tmp_path, tiny_model, head):
    data = tmp_path / "data"
    models = {"tiny": {"uri": str(data / "models/tiny"), "dataset": {"max_seq_length": 1024, "val_ratio": 0.2},
                       "training": TRAINING}}
    svc = Service(data, tiny_model, head, openai_models=json.dumps(models), serve_port=local_ray.free_port(),
                  serve_idle_s=IDLE_S, serve_max_tokens=64)
    yield svc
    svc.kill()


def in_process(model_dir, adapter_dir, stop_tokens) -> str:
    """The answer of the exported model loaded here, as transformers and peft load it."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir).eval()
    stops = stop_ids(tokenizer, model, stop_tokens)
    return complete(model, tokenizer, prompt_ids(tokenizer, QUESTION), Sampling(max_tokens=24, temperature=0), stops).text


def serve_replicas(head) -> int:
    details = httpx.get(f"{head.address}/api/serve/applications/", headers={"Authorization": f"Bearer {head.token}"},
                        timeout=10).json()
    return sum(1 for name, app in details.get("applications", {}).items() if name.startswith("raysft-chat-")
               for deployment in app["deployments"].values() for replica in deployment["replicas"]
               if replica["state"] == "RUNNING")


def test_a_fine_tune_is_served_to_its_tenant_whole_and_streamed_and_scales_to_zero(service, head, record_property):
    oa = openai.OpenAI(base_url=f"http://127.0.0.1:{service.port}/openai/v1", api_key=service.env["RAYSFT_ADMIN_API_KEY"],
                       max_retries=0, timeout=300)
    training = oa.files.create(file=("train.jsonl", (REPO / "configs/data/messages.jsonl").read_bytes()),
                               purpose="fine-tune")
    job = oa.fine_tuning.jobs.create(model="tiny", training_file=training.id, suffix="chat")
    deadline = time.monotonic() + 600
    while (job := oa.fine_tuning.jobs.retrieve(job.id)).status not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, job
        time.sleep(1)
    assert job.status == "succeeded", (job.error and job.error.message, service.log.read_text()[-2000:])
    assert [c.step_number for c in oa.fine_tuning.jobs.checkpoints.list(job.id)] == [6, 3]
    assert any(e.type == "metrics" for e in oa.fine_tuning.jobs.list_events(job.id, limit=50))

    pipeline = service.http.get(f"/v1/jobs/{job.id.removeprefix('ftjob-')}").json()
    trained = service.http.get(f"/v1/jobs/{pipeline['children'][1]}").json()
    manifest = service.http.get(f"/v1/jobs/{pipeline['id']}/dataset").json()["manifest"]
    base_dir = service.env["RAYSFT_DATA_DIR"] + "/models/tiny"
    expected = in_process(base_dir, trained["artifacts"]["export_adapter"], manifest["template"]["stop_tokens"])
    expected_base = in_process(base_dir, None, manifest["template"]["stop_tokens"])

    started = time.perf_counter()
    answer = oa.chat.completions.create(model=job.fine_tuned_model, messages=QUESTION, max_tokens=24, temperature=0)
    first_s = time.perf_counter() - started
    assert answer.choices[0].message.content == expected and answer.model == job.fine_tuned_model
    assert answer.usage.completion_tokens >= 1 and answer.choices[0].finish_reason in ("stop", "length")
    chunks = list(oa.chat.completions.create(model=job.fine_tuned_model, messages=QUESTION, max_tokens=24,
                                             temperature=0, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].usage.completion_tokens == answer.usage.completion_tokens
    base = oa.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=24, temperature=0)
    assert base.choices[0].message.content == expected_base
    native = service.http.post(f"/v1/jobs/{pipeline['id']}/chat", params={"base": True},
                               json={"messages": QUESTION, "max_tokens": 24, "temperature": 0})
    assert native.status_code == 200 and native.json()["choices"][0]["message"]["content"] == expected_base

    with service.session() as session:
        other = store.create_api_key(session, "globex")
    with pytest.raises(openai.NotFoundError):
        openai.OpenAI(base_url=f"http://127.0.0.1:{service.port}/openai/v1", api_key=other,
                      max_retries=0).chat.completions.create(model=job.fine_tuned_model, messages=QUESTION)
    with pytest.raises(openai.UnprocessableEntityError, match="serve_max_tokens"):
        oa.chat.completions.create(model=job.fine_tuned_model, messages=QUESTION, max_tokens=65)
    # Serve's proxy has no authentication: the replicas answer the control plane's requests only.
    details = httpx.get(f"{head.address}/api/serve/applications/", headers={"Authorization": f"Bearer {head.token}"},
                        timeout=10).json()
    [app] = [name for name in details["applications"] if name.startswith("raysft-chat-")]
    direct = {"messages": QUESTION, "adapter": None, "stop_tokens": [], "sampling": {"max_tokens": 4}}
    for headers in ({}, {"Authorization": f"Bearer {head.token}"}):  # not even the Ray token opens it
        refused = httpx.post(f"http://127.0.0.1:{service.env['RAYSFT_SERVE_PORT']}/{app}", json=direct,
                             headers=headers, timeout=30)
        assert refused.status_code == 401, refused.text

    # An application an earlier raysft deployed without a token answers whoever reaches the proxy;
    # the service deploys it again with its token before its next chat.
    config = details["applications"][app]["deployed_app_config"]
    unguarded = config | {"args": {k: v for k, v in config["args"].items() if k != "token"}}
    put = httpx.put(f"{head.address}/api/serve/applications/", headers={"Authorization": f"Bearer {head.token}"},
                    json={"http_options": {k: details["http_options"][k] for k in ("host", "port")},
                          "applications": [unguarded]}, timeout=30)
    assert put.status_code == 200, put.text
    proxy = f"http://127.0.0.1:{service.env['RAYSFT_SERVE_PORT']}/{app}"
    deadline = time.monotonic() + 120
    while httpx.post(proxy, json=direct, timeout=60).status_code != 200:
        assert time.monotonic() < deadline, "the application deployed without a token never answered"
        time.sleep(1)
    service.kill()  # a new service, as after an upgrade: it has seen no application yet
    service.start()
    assert oa.chat.completions.create(model=job.fine_tuned_model, messages=QUESTION, max_tokens=24,
                                      temperature=0).choices[0].message.content == expected
    assert httpx.post(proxy, json=direct, timeout=60).status_code == 401

    # Idle, the application's replicas go; the next chat starts one again (a cold start).
    deadline = time.monotonic() + 180
    while serve_replicas(head) > 0:
        assert time.monotonic() < deadline, "the idle model was not scaled to zero"
        time.sleep(2)
    started = time.perf_counter()
    again = oa.chat.completions.create(model=job.fine_tuned_model, messages=QUESTION, max_tokens=24, temperature=0)
    cold_s = time.perf_counter() - started
    assert again.choices[0].message.content == expected
    started = time.perf_counter()
    warm = oa.chat.completions.create(model=job.fine_tuned_model, messages=QUESTION, max_tokens=64, temperature=0,
                                      stop=None)
    warm_s = time.perf_counter() - started
    figures = {"first_answer_s": round(first_s, 1), "cold_start_s": round(cold_s, 1),
               "warm_tokens_per_s": round(warm.usage.completion_tokens / warm_s, 1)}
    record_property("serving", figures)
    print(f"serving on CPU: {figures}", flush=True)
