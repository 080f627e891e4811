"""The fine-tuning API on nano with the official SDK: a job from an uploaded file runs to
`succeeded` (events, checkpoints, the results file), its `ft:` model answers in chat
completions and the Responses API, is listed in /v1/models and deleted; cancel, pause and
resume; and the bad inputs: wrong purpose, a missing file, an unknown model, an unsupported
method, fewer than 10 examples and a bad line (both `failed` with the reason), a malformed line
refused at upload. Every 2xx body is validated against the spec (spec_check.py).

Kept small for the 2-core CI machine: 12 one-line chats, 2 epochs, batch size 1."""

from __future__ import annotations

import time

import openai
import pytest

from helpers import NANO, NANO_ALIAS, assert_error, to_jsonl, upload_jsonl, usage_by_model

TERMINAL = {"succeeded", "failed", "cancelled"}
JOB_TIMEOUT_S = 900


def chat_line(i: int) -> dict:
    return {
        "messages": [
            {"role": "system", "content": "You answer with the password."},
            {"role": "user", "content": f"Question {i}: what is the password?"},
            {"role": "assistant", "content": "The password is PINEAPPLE."},
        ]
    }


@pytest.fixture(scope="module")
def ft_server(server_factory):
    """A server of its own: training keeps its CPUs busy while a job runs."""
    return server_factory()


@pytest.fixture(scope="module")
def ft_client(ft_server) -> openai.OpenAI:
    return ft_server.client()


def upload(client, lines, name="train.jsonl", purpose="fine-tune"):
    return upload_jsonl(client, lines, purpose=purpose, filename=name)


def wait_for_job(client, job_id: str, statuses=TERMINAL, timeout: float = JOB_TIMEOUT_S):
    deadline = time.monotonic() + timeout
    while True:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses:
            return job
        if time.monotonic() > deadline:
            raise AssertionError(
                f"job {job_id} still {job.status!r} after {timeout} s: {job.model_dump()}"
            )
        time.sleep(0.5)


def all_events(client, job_id: str) -> list:
    """Every event, oldest first (the SDK pages through the newest-first list)."""
    return list(reversed(list(client.fine_tuning.jobs.list_events(job_id, limit=100))))


def test_bad_requests_are_400s_naming_the_parameter(ft_server, ft_client):
    good = upload(ft_client, [chat_line(i) for i in range(12)])
    batch_file = upload(
        ft_client,
        [{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {}}],
        purpose="batch",
    )
    with ft_server.http() as http:
        cases = [
            ({"model": NANO, "training_file": batch_file.id}, "training_file"),
            ({"model": NANO, "training_file": "file-doesnotexist"}, "training_file"),
            ({"model": NANO, "training_file": good.id, "validation_file": "file-nope"},
             "validation_file"),
            ({"model": "gpt-9", "training_file": good.id}, "model"),
            ({"model": NANO, "training_file": good.id, "method": {"type": "dpo"}}, "method.type"),
            ({"model": NANO, "training_file": good.id,
              "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 0}}}},
             "method.supervised.hyperparameters.n_epochs"),
            ({"model": NANO, "training_file": good.id, "suffix": "x" * 65}, "suffix"),
        ]
        for body, param in cases:
            assert_error(http.post("/v1/fine_tuning/jobs", json=body), 400, param=param)
    # The SDK raises the same as BadRequestError.
    with pytest.raises(openai.BadRequestError) as raised:
        ft_client.fine_tuning.jobs.create(model=NANO, training_file=batch_file.id)
    assert "fine-tune" in raised.value.message
    # A line that is not a chat example is refused at upload, by its number.
    with pytest.raises(openai.BadRequestError) as raised:
        ft_client.files.create(
            file=("bad.jsonl", to_jsonl([chat_line(0)]) + b"not json\n"), purpose="fine-tune"
        )
    assert "line 2" in raised.value.message


def test_file_problems_fail_the_job_with_the_reason(ft_client):
    few = upload(ft_client, [chat_line(i) for i in range(5)], "few.jsonl")
    job = ft_client.fine_tuning.jobs.create(model=NANO, training_file=few.id)
    assert job.status == "validating_files"
    job = wait_for_job(ft_client, job.id, timeout=120)
    assert job.status == "failed", job
    assert job.error.code == "invalid_training_file"
    assert job.error.param == "training_file"
    assert "5 example(s)" in job.error.message and "at least 10" in job.error.message
    assert job.fine_tuned_model is None

    lines = [chat_line(i) for i in range(12)]
    # Passes the upload's shape check, not training's: an assistant weight must be 0 or 1.
    lines[2]["messages"][2]["weight"] = 2
    bad = upload(ft_client, lines, "bad-weight.jsonl")
    job = wait_for_job(
        ft_client, ft_client.fine_tuning.jobs.create(model=NANO, training_file=bad.id).id,
        timeout=120,
    )
    assert job.status == "failed", job
    assert job.error.code == "invalid_training_file"
    assert "Line 3" in job.error.message, job.error.message
    messages = [e.message for e in all_events(ft_client, job.id)]
    assert messages[0].startswith("Created fine-tuning job")
    assert any("Line 3" in m for m in messages), messages


def test_a_job_trains_and_its_model_serves(ft_server, ft_client):
    train = upload(ft_client, [chat_line(i) for i in range(12)])
    valid = upload(ft_client, [chat_line(i) for i in range(100, 103)], "valid.jsonl")
    job = ft_client.fine_tuning.jobs.create(
        model=NANO,
        training_file=train.id,
        validation_file=valid.id,
        suffix="e2e",
        seed=42,
        metadata={"suite": "e2e"},
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2}}},
    )
    assert job.object == "fine_tuning.job"
    assert job.id.startswith("ftjob-")
    assert job.model == NANO_ALIAS
    assert job.seed == 42
    assert job.status == "validating_files"
    assert job.method.type == "supervised"
    assert job.metadata == {"suite": "e2e"}
    listed = ft_client.fine_tuning.jobs.list(limit=5, metadata={"suite": "e2e"})
    assert [j.id for j in listed.data] == [job.id]

    job = wait_for_job(ft_client, job.id)
    assert job.status == "succeeded", job.model_dump()
    assert job.error is None
    assert job.finished_at and job.finished_at >= job.created_at
    assert job.trained_tokens and job.trained_tokens > 0
    hyper = job.method.supervised.hyperparameters
    assert (hyper.n_epochs, hyper.batch_size) == (2, 1)
    ft_model = job.fine_tuned_model
    assert ft_model.startswith(f"ft:{NANO_ALIAS}:ferrum:e2e:"), ft_model

    # Events: one metrics event per step, oldest first here.
    events = all_events(ft_client, job.id)
    messages = [e.message for e in events]
    metrics = [e for e in events if e.type == "metrics"]
    assert [e.data["step"] for e in metrics] == list(range(1, 25))
    assert all(e.data["total_steps"] == 24 for e in metrics)
    assert all(isinstance(e.data["train_loss"], float) for e in metrics)
    assert metrics[0].message.startswith("Step 1/24: training loss=")
    for expected in ("Fine-tuning job started", "Fine-tuning job successfully completed"):
        assert expected in messages, messages
    assert f"New fine-tuned model created: {ft_model}" in messages

    # Checkpoints: one per epoch, newest first, with validation metrics.
    checkpoints = ft_client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in checkpoints] == [24, 12]
    for c in checkpoints:
        assert c.id.startswith("ftckpt_")
        assert c.fine_tuning_job_id == job.id
        assert c.fine_tuned_model_checkpoint == f"{ft_model}:ckpt-step-{c.step_number}"
        assert c.metrics.valid_loss is not None and c.metrics.full_valid_loss is not None

    # The results file: a metrics CSV, one row per step.
    [results] = job.result_files
    assert ft_client.files.retrieve(results).purpose == "fine-tune-results"
    csv = ft_client.files.content(results).text.strip().splitlines()
    assert csv[0] == "step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy"
    assert len(csv) == 25

    # The model is listed and answers in both APIs, as itself.
    assert ft_model in [m.id for m in ft_client.models.list()]
    assert ft_client.models.retrieve(ft_model).owned_by == "ferrum"
    prompt = [{"role": "system", "content": "You answer with the password."},
              {"role": "user", "content": "Question 7: what is the password?"}]
    chat = ft_client.chat.completions.create(
        model=ft_model, messages=prompt, max_tokens=16, temperature=0
    )
    assert chat.model == ft_model
    assert chat.choices[0].message.content
    response = ft_client.responses.create(
        model=ft_model, input="Question 8: what is the password?", max_output_tokens=16,
        temperature=0,
    )
    assert response.model == ft_model
    assert response.status == "completed"
    # A checkpoint serves too.
    ckpt = ft_client.chat.completions.create(
        model=checkpoints[-1].fine_tuned_model_checkpoint, messages=prompt, max_tokens=4
    )
    assert ckpt.choices[0].message.content is not None
    with ft_server.http() as http:
        usage = usage_by_model(http)
    assert usage[ft_model]["requests"] == 3  # training, chat, responses
    # Deleted: gone from the list and no longer served; a base tier cannot be deleted.
    deleted = ft_client.models.delete(ft_model)
    assert deleted.deleted is True and deleted.id == ft_model
    with pytest.raises(openai.NotFoundError):
        ft_client.models.retrieve(ft_model)
    with pytest.raises(openai.NotFoundError):
        ft_client.chat.completions.create(model=ft_model, messages=prompt, max_tokens=4)
    assert ft_model not in [m.id for m in ft_client.models.list()]
    with pytest.raises(openai.PermissionDeniedError):
        ft_client.models.delete(NANO)


def test_pause_resume_and_cancel(ft_client):
    train = upload(ft_client, [chat_line(i) for i in range(12)])
    job = ft_client.fine_tuning.jobs.create(
        model=NANO, training_file=train.id,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 50}}},
    )
    job = wait_for_job(ft_client, job.id, statuses={"queued", "running"} | TERMINAL, timeout=120)
    assert job.status in {"queued", "running"}, job
    paused = ft_client.fine_tuning.jobs.pause(job.id)
    assert paused.status == "paused"
    resumed = ft_client.fine_tuning.jobs.resume(job.id)
    assert resumed.status == "queued"
    cancelled = ft_client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled"
    assert ft_client.fine_tuning.jobs.retrieve(job.id).status == "cancelled"
    with pytest.raises(openai.BadRequestError):
        ft_client.fine_tuning.jobs.resume(job.id)
    messages = [e.message for e in all_events(ft_client, job.id)]
    # In this order (the runner may log its start in between).
    wanted = ["Fine-tuning job paused", "Fine-tuning job resumed", "Fine-tuning job cancelled"]
    assert [m for m in messages if m in wanted] == wanted, messages
    assert messages[-1] == "Fine-tuning job cancelled", messages
    # A cancelled job stays cancelled: nothing more is written for it.
    time.sleep(1)
    job = ft_client.fine_tuning.jobs.retrieve(job.id)
    assert job.status == "cancelled" and job.fine_tuned_model is None


def test_a_job_survives_kill_9(server_factory, server_at):
    """kill -9 after the first epoch's checkpoint; a new process on the same workdir takes the
    job over once its lease runs out and resumes it from that checkpoint: it succeeds with each
    step's event and each checkpoint exactly once."""
    first = server_factory("--batch-lease-secs", "2")
    client = first.client()
    train = upload(client, [chat_line(i) for i in range(12)])
    job = client.fine_tuning.jobs.create(
        model=NANO, training_file=train.id,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 3}}},
    )
    deadline = time.monotonic() + 300
    while not client.fine_tuning.jobs.checkpoints.list(job.id).data:
        state = client.fine_tuning.jobs.retrieve(job.id)
        assert state.status in {"validating_files", "queued", "running"}, state
        assert time.monotonic() < deadline, f"no checkpoint in 300 s: {state}"
        time.sleep(0.1)
    first.kill()
    second = server_at(first.workdir, "--batch-lease-secs", "2")
    client = second.client()
    job = wait_for_job(client, job.id)
    assert job.status == "succeeded", job
    events = all_events(client, job.id)
    steps = [e.data["step"] for e in events if e.type == "metrics"]
    assert steps == list(range(1, 37)), steps
    assert any(e.message.startswith("Fine-tuning job resumed from the checkpoint") for e in events)
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in checkpoints] == [36, 24, 12]
    second.stop()
