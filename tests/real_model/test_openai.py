"""The OpenAI fine-tuning flow on the real SmolLM2-135M-Instruct, driven by the official `openai`
package as a notebook would drive a hosted API: the house-style rows uploaded as `{"messages"}`
JSON Lines, a fine-tune created with `fine_tuning.jobs.create` and its events followed to
`succeeded`, its checkpoints listed, then `chat.completions.create` on its `fine_tuned_model`
(whole and streamed, served by Ray Serve on the cluster) answers a question the data never asked
in the taught style; the base model does not; another tenant's key finds none of it."""

from __future__ import annotations

import json
import os
import shutil
import time

import openai
import pytest
from support import REPO
from support.service import Service

from service import local_ray, store

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]
BASE = "smollm2-135m-instruct"
QUESTION = [{"role": "user", "content": "What is the capital of Belgium?"}]
# The house-style pipeline's settings (configs/pipelines/house-style.yaml), as an operator would
# offer the model for fine-tuning; the job's own hyperparameters go over them.
OFFERED = {
    "dataset": {"template": "tokenizer", "max_seq_length": 256, "packing": "bfd", "val_ratio": 0.15, "seed": 7},
    "training": {"model": {"dtype": "fp32", "attn_implementation": "sdpa"}, "method": "lora",
                 "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
                 "strategy": {"kind": "ddp"}, "optim": {"lr": 0.002, "scheduler": "cosine", "warmup_ratio": 0.1},
                 "max_steps": 12, "log_every_steps": 2, "scaling": {"num_workers": 1, "cpus_per_worker": 2},
                 "checkpoint": {"every_steps": 6, "keep": 2}, "eval": {"every_steps": 12}, "max_failures": 0}}


@pytest.fixture
def service(tmp_path, tiny_model, real_model):
    data = tmp_path / "data"
    # Hard links where the file system allows (the model is 0.5 GB), under the shared prefix.
    shutil.copytree(real_model, data / "models" / BASE, copy_function=linked)
    head = local_ray.start(num_cpus=4)
    try:  # the head is stopped even when the service fails to start
        models = {BASE: {"uri": str(data / "models" / BASE)} | OFFERED}
        svc = Service(data, tiny_model, head, openai_models=json.dumps(models), serve_port=local_ray.free_port(),
                      serve_max_tokens=64)
        try:
            yield svc
        finally:
            svc.kill()
    finally:
        head.stop()


def linked(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def test_an_openai_fine_tune_of_smollm2_answers_in_the_style_it_was_taught(service):
    oa = openai.OpenAI(base_url=f"http://127.0.0.1:{service.port}/openai/v1",
                       api_key=service.env["RAYSFT_ADMIN_API_KEY"], max_retries=0, timeout=600)
    rows = [json.loads(line) for line in (REPO / "configs/house-style/house-style.jsonl").read_text().splitlines()]
    conversations = "".join(json.dumps({"messages": [{"role": "user", "content": r["question"]},
                                                     {"role": "assistant", "content": r["answer"]}]}) + "\n"
                            for r in rows)
    training_file = oa.files.create(file=("house-style.jsonl", conversations.encode()), purpose="fine-tune")
    job = oa.fine_tuning.jobs.create(model=BASE, training_file=training_file.id, suffix="ahoy", seed=42,
                                     method={"type": "supervised",
                                             "supervised": {"hyperparameters": {"batch_size": 4}}})

    # Followed as a notebook follows a hosted job: the new events, until the job ends.
    seen: dict[str, str] = {}
    deadline = time.monotonic() + 720
    while (job := oa.fine_tuning.jobs.retrieve(job.id)).status not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, (job, list(seen.values())[-5:])
        seen |= {e.id: e.message for e in oa.fine_tuning.jobs.list_events(job.id, limit=100)}
        time.sleep(2)
    assert job.status == "succeeded", (job.error and job.error.message, service.log.read_text()[-3000:])
    messages = [e.message for e in reversed(oa.fine_tuning.jobs.list_events(job.id, limit=100).data)]
    assert messages[0].startswith("Created fine-tuning job") and messages[-1] == "The job has successfully completed"
    assert any(m.startswith("Step 12/12: training loss=") for m in messages), messages
    assert job.fine_tuned_model == f"ft:{BASE}:admin:ahoy:{job.id.removeprefix('ftjob-')}"
    assert job.trained_tokens > 0
    results = oa.files.content(job.result_files[0]).text.splitlines()
    assert results[0] == "step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy"
    assert [int(line.split(",")[0]) for line in results[1:]] == [2, 4, 6, 8, 10, 12]  # log_every_steps: 2
    checkpoints = oa.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in checkpoints] == [12, 6]
    assert checkpoints[0].metrics.valid_loss is not None

    answer = oa.chat.completions.create(model=job.fine_tuned_model, messages=QUESTION, max_tokens=32, temperature=0)
    text = answer.choices[0].message.content
    assert text.startswith("Ahoy!") and "Brussels" in text and answer.choices[0].finish_reason == "stop", text
    streamed = oa.chat.completions.create(model=job.fine_tuned_model, messages=QUESTION, max_tokens=32,
                                          temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == text
    base = oa.chat.completions.create(model=BASE, messages=QUESTION, max_tokens=32, temperature=0)
    assert not base.choices[0].message.content.startswith("Ahoy!"), base.choices[0].message.content
    assert job.fine_tuned_model in {m.id for m in oa.models.list()}

    with service.session() as session:
        key = store.create_api_key(session, "globex")
    other = openai.OpenAI(base_url=f"http://127.0.0.1:{service.port}/openai/v1", api_key=key, max_retries=0)
    for call in (lambda: other.files.retrieve(training_file.id), lambda: other.fine_tuning.jobs.retrieve(job.id),
                 lambda: other.fine_tuning.jobs.list_events(job.id), lambda: other.fine_tuning.jobs.checkpoints.list(job.id),
                 lambda: other.chat.completions.create(model=job.fine_tuned_model, messages=QUESTION)):
        with pytest.raises(openai.NotFoundError):
            call()
    assert job.fine_tuned_model not in {m.id for m in other.models.list()}
