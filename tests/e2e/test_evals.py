"""The Evals API on nano with the official SDK: every endpoint (evals: create, retrieve, update,
list, delete; runs: create, retrieve, list, cancel, delete; output items: list, retrieve),
every grader type (string_check with each operation, text_similarity with fuzzy_match, bleu
and rouge_l, label_model and score_model graded by nano under a JSON schema), every data source
(jsonl inline and from a file, completions sampling nano from a template or re-answering stored
completions, stored completions as they are, responses), the bad inputs (an unknown grader type,
a template naming a field the item schema lacks, a file with a bad line, a file gone before the
run starts), billing at the batch price, and a run that survives kill -9 of its server with
every item graded once. Every 2xx body is validated against the spec (spec_check.py).

Kept small for the 2-core CI machine: a few items, short generations."""

from __future__ import annotations

import time
from collections import Counter

import openai
import pytest

from helpers import BAN_EOS, NANO, PRICES, assert_error, upload_jsonl, usage_by_model

TERMINAL = {"completed", "failed", "canceled"}
RUN_TIMEOUT_S = 300

ITEM_SCHEMA = {
    "type": "object",
    "properties": {"question": {"type": "string"}, "answer": {"type": "string"}},
    "required": ["question", "answer"],
}
CUSTOM = {"type": "custom", "item_schema": ITEM_SCHEMA, "include_sample_schema": True}
ITEMS = [
    {"item": {"question": "Capital of France?", "answer": "Paris"},
     "sample": {"output_text": "Paris"}},
    {"item": {"question": "Capital of Italy?", "answer": "Rome"},
     "sample": {"output_text": "the city of rome"}},
    {"item": {"question": "Capital of Spain?", "answer": "Madrid"},
     "sample": {"output_text": "Lisbon"}},
]


def string_check(name: str, operation: str, reference: str = "{{item.answer}}") -> dict:
    return {"type": "string_check", "name": name, "input": "{{sample.output_text}}",
            "reference": reference, "operation": operation}


def similarity(metric: str, threshold: float) -> dict:
    return {"type": "text_similarity", "name": metric, "input": "{{sample.output_text}}",
            "reference": "{{item.answer}}", "evaluation_metric": metric,
            "pass_threshold": threshold}


LABEL = {
    "type": "label_model", "name": "judge", "model": NANO,
    "input": [
        {"role": "system", "content": "You check answers to quiz questions."},
        {"role": "user",
         "content": "Question: {{item.question}}\nAnswer: {{sample.output_text}}\nIs it right?"},
    ],
    "labels": ["right", "wrong"], "passing_labels": ["right"],
}
SCORE = {
    "type": "score_model", "name": "score", "model": NANO,
    "input": [{"role": "user",
               "content": "Rate from 0 to 1 how well '{{sample.output_text}}' answers "
                          "'{{item.question}}'."}],
    "range": [0, 1], "pass_threshold": 0.5,
}


@pytest.fixture(scope="module")
def evals_server(server_factory):
    """A server of its own (runs keep its CPUs busy), with short leases."""
    return server_factory("--batch-lease-secs", "2")


@pytest.fixture(scope="module")
def client(evals_server) -> openai.OpenAI:
    return evals_server.client()


def wait_for_run(client, eval_id: str, run_id: str, statuses=TERMINAL,
                 timeout: float = RUN_TIMEOUT_S):
    deadline = time.monotonic() + timeout
    while True:
        run = client.evals.runs.retrieve(run_id, eval_id=eval_id)
        if run.status in statuses:
            return run
        if time.monotonic() > deadline:
            raise AssertionError(f"run {run_id} still {run.status!r} after {timeout} s: {run}")
        time.sleep(0.2)


def output_items(client, eval_id: str, run_id: str, **kw) -> list:
    return list(client.evals.runs.output_items.list(run_id, eval_id=eval_id, limit=100, **kw))


def test_eval_crud_and_paging(client):
    created = client.evals.create(
        name="capitals", metadata={"team": "geo"}, data_source_config=CUSTOM,
        testing_criteria=[string_check("exact", "eq")],
    )
    assert created.object == "eval" and created.name == "capitals"
    schema = created.data_source_config.schema_
    assert schema["properties"]["item"] == ITEM_SCHEMA
    assert schema["required"] == ["item", "sample"]
    criterion = created.testing_criteria[0]
    assert criterion.type == "string_check" and criterion.operation == "eq"
    assert client.evals.retrieve(created.id).id == created.id

    updated = client.evals.update(created.id, name="renamed", metadata={"team": "x"})
    assert updated.name == "renamed" and updated.metadata == {"team": "x"}
    other = client.evals.create(
        data_source_config={"type": "stored_completions", "metadata": {"usecase": "none"}},
        testing_criteria=[string_check("exact", "eq", reference="x")],
    )
    assert other.data_source_config.type == "stored_completions"

    page = client.evals.list(limit=1, order="desc")
    assert page.data[0].id == other.id and page.has_more
    ids = [e.id for e in client.evals.list(limit=1)]  # the SDK follows `after`
    assert ids.index(created.id) < ids.index(other.id)

    deleted = client.evals.delete(other.id)
    assert deleted.deleted and deleted.eval_id == other.id
    with pytest.raises(openai.NotFoundError):
        client.evals.retrieve(other.id)


def test_bad_evals_are_400s_naming_the_parameter(evals_server):
    with evals_server.http() as http:
        def create(criteria, config=CUSTOM):
            return http.post("/v1/evals", json={"data_source_config": config,
                                                 "testing_criteria": criteria})

        r = create([{"type": "regex_match", "name": "x", "input": "a", "reference": "b"}])
        assert "regex_match" in assert_error(r, 400, param="testing_criteria[0].type")["message"]
        r = create([string_check("ok", "eq"), string_check("bad", "eq", reference="{{item.answr}}")])
        assert "'answr'" in assert_error(r, 400, param="testing_criteria[1].reference")["message"]
        r = create([dict(LABEL, input=[{"role": "user", "content": "{{item.nope}}"}])])
        assert_error(r, 400, param="testing_criteria[0].input[0].content")
        r = create([similarity("cosine", 0.5)])
        assert "embeddings" in assert_error(
            r, 400, param="testing_criteria[0].evaluation_metric")["message"]
        r = create([dict(LABEL, model="no-such-model")])
        assert_error(r, 404, param="testing_criteria[0].model", code="model_not_found")
        r = create([string_check("x", "eq")], config={"type": "custom"})
        assert_error(r, 400, param="data_source_config.item_schema",
                     code="missing_required_parameter")


def test_jsonl_run_with_string_and_similarity_graders(client):
    ev = client.evals.create(
        data_source_config=CUSTOM,
        testing_criteria=[
            string_check("eq", "eq"), string_check("ne", "ne", reference="Lisbon"),
            string_check("like", "like", reference="{{item.answer}}"),
            string_check("ilike", "ilike"),
            similarity("fuzzy_match", 0.8), similarity("bleu", 0.3), similarity("rouge_l", 0.5),
        ],
    )
    run = client.evals.runs.create(
        ev.id, name="given samples",
        data_source={"type": "jsonl", "source": {"type": "file_content", "content": ITEMS}},
    )
    assert run.status == "queued" and run.object == "eval.run"
    assert run.report_url.endswith(f"/v1/evals/{ev.id}/runs/{run.id}")
    run = wait_for_run(client, ev.id, run.id)
    assert run.status == "completed", run
    # Item 0 passes everything; 1 ("the city of rome" for "Rome") only ne and ilike; 2
    # ("Lisbon" for "Madrid") nothing.
    assert run.result_counts.model_dump() == {"total": 3, "passed": 1, "failed": 2, "errored": 0}
    per = {r.testing_criteria.rsplit("-", 5)[0]: (r.passed, r.failed)
           for r in run.per_testing_criteria_results}
    assert per == {
        "eq": (1, 2), "ne": (2, 1), "like": (1, 2), "ilike": (2, 1),
        "fuzzy_match": (1, 2), "bleu": (1, 2), "rouge_l": (1, 2),
    }, per
    assert run.per_model_usage == []

    items = output_items(client, ev.id, run.id)
    assert [i.datasource_item_id for i in items] == [0, 1, 2]
    assert items[0].status == "pass" and items[2].status == "fail"
    assert items[1].datasource_item == ITEMS[1]["item"]
    rouge = next(r for r in items[1].results if r.name.startswith("rouge_l"))
    # The longest common subsequence is 1 of 4 output words and of 1 reference word: F1 0.4.
    assert rouge.score == pytest.approx(0.4) and not rouge.passed, rouge
    assert [i.id for i in output_items(client, ev.id, run.id, status="fail")] == \
        [items[1].id, items[2].id]
    one = client.evals.runs.output_items.retrieve(items[2].id, eval_id=ev.id, run_id=run.id)
    assert one.id == items[2].id and one.sample.output[0].content == "Lisbon"

    assert [r.id for r in client.evals.runs.list(ev.id, status="completed")] == [run.id]
    with pytest.raises(openai.BadRequestError):
        client.evals.runs.cancel(run.id, eval_id=ev.id)
    deleted = client.evals.runs.delete(run.id, eval_id=ev.id)
    assert deleted.deleted and deleted.run_id == run.id
    with pytest.raises(openai.NotFoundError):
        client.evals.runs.retrieve(run.id, eval_id=ev.id)


def test_cosine_similarity_grades_by_embeddings(tiers_server):
    """`text_similarity` with `cosine` embeds the sample and the reference with the server's
    embedding tier (MiniLM on the default tiers) and passes above the threshold; the embedding
    calls count in `per_model_usage`. (A server without an embedding tier refuses the metric at
    creation: test_bad_evals_are_400s_naming_the_parameter.)"""
    client = tiers_server.client()
    ev = client.evals.create(data_source_config=CUSTOM,
                             testing_criteria=[similarity("cosine", 0.6)])
    run = client.evals.runs.create(ev.id, data_source={
        "type": "jsonl", "source": {"type": "file_content", "content": ITEMS}})
    run = wait_for_run(client, ev.id, run.id)
    assert run.status == "completed", run
    scores = {i.datasource_item["answer"]: i.results[0]
              for i in output_items(client, ev.id, run.id)}
    assert scores["Paris"].score == pytest.approx(1.0, abs=1e-5), scores
    assert scores["Paris"].passed and scores["Rome"].passed, scores
    assert scores["Madrid"].score < scores["Rome"].score < 1.0, scores  # Lisbon vs Madrid
    assert not scores["Madrid"].passed, scores
    usage = {u.model_name: u for u in run.per_model_usage}
    assert usage["text-embedding-3-small"].invocation_count == 3, run.per_model_usage
    assert usage["text-embedding-3-small"].prompt_tokens > 0, run.per_model_usage


def test_completions_run_graded_by_model_graders_at_batch_price(evals_server, client):
    ev = client.evals.create(
        data_source_config=CUSTOM,
        testing_criteria=[LABEL, SCORE, string_check("mentions", "ilike")],
    )
    items = [{"item": i["item"]} for i in ITEMS[:2]]
    uploaded = upload_jsonl(client, items, purpose="evals", filename="quiz.jsonl")
    with evals_server.http() as http:
        before = usage_by_model(http).get(NANO, {"requests": 0, "cost_usd": 0.0,
                                                  "prompt_tokens": 0, "cached_tokens": 0,
                                                  "completion_tokens": 0})
    run = client.evals.runs.create(
        ev.id,
        data_source={
            "type": "completions", "model": NANO,
            "input_messages": {"type": "template", "template": [
                {"role": "system", "content": "Answer with the city name only."},
                {"role": "user", "content": "{{item.question}}"}]},
            "sampling_params": {"temperature": 0, "max_completion_tokens": 12, "seed": 1},
            "source": {"type": "file_id", "id": uploaded.id},
        },
    )
    assert run.model == NANO
    run = wait_for_run(client, ev.id, run.id)
    assert run.status == "completed", run
    counts = run.result_counts
    assert counts.total == 2 and counts.errored == 0, counts
    usage = run.per_model_usage[0]
    assert usage.model_name == NANO and usage.invocation_count == 6, usage  # 1 sample + 2 graders
    for item in output_items(client, ev.id, run.id):
        assert item.sample.model and item.sample.output[0].content, item.sample
        assert item.sample.max_completion_tokens == 12 and item.sample.seed == 1
        label, score, _ = item.results
        assert label.score in (0.0, 1.0) and label.passed == (label.score == 1.0), label
        assert 0.0 <= score.score <= 1.0 and score.passed == (score.score >= 0.5), score
        grade = label.sample["output"][0]["content"]
        assert grade.startswith('{') and ('"right"' in grade or '"wrong"' in grade), grade

    with evals_server.http() as http:
        deadline = time.monotonic() + 5
        while True:
            after = usage_by_model(http)[NANO]
            if after["requests"] - before["requests"] >= 6 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    assert after["requests"] - before["requests"] == 6, after
    tokens = {k: after[k] - before[k] for k in ("prompt_tokens", "cached_tokens", "completion_tokens")}
    assert tokens["prompt_tokens"] == usage.prompt_tokens, (tokens, usage)
    price = PRICES[NANO]
    full = ((tokens["prompt_tokens"] - tokens["cached_tokens"]) * price["input"]
            + tokens["cached_tokens"] * price["cached_input"]
            + tokens["completion_tokens"] * price["output"]) / 1e6
    assert after["cost_usd"] - before["cost_usd"] == pytest.approx(full / 2, rel=1e-6)


def test_stored_completions_and_responses_sources(client):
    for i, city in enumerate(["Paris", "Rome"]):
        client.chat.completions.create(
            model=NANO, store=True, metadata={"suite": "evals-e2e"}, max_tokens=4, temperature=0,
            messages=[{"role": "user", "content": f"Say {city}."}],
        )
    ev = client.evals.create(
        data_source_config={"type": "stored_completions", "metadata": {"suite": "evals-e2e"}},
        testing_criteria=[string_check("nonempty", "ne", reference="")],
    )
    stored = client.evals.runs.create(ev.id, data_source={
        "type": "completions",
        "source": {"type": "stored_completions", "metadata": {"suite": "evals-e2e"}},
    })
    stored = wait_for_run(client, ev.id, stored.id)
    assert stored.status == "completed" and stored.result_counts.total == 2, stored
    assert stored.per_model_usage == []
    items = output_items(client, ev.id, stored.id)
    assert items[0].datasource_item["input"] == [{"role": "user", "content": "Say Paris."}]

    again = client.evals.runs.create(ev.id, data_source={
        "type": "completions", "model": NANO,
        "input_messages": {"type": "item_reference", "item_reference": "item.input"},
        "sampling_params": {"temperature": 0, "max_completion_tokens": 4},
        "source": {"type": "stored_completions", "metadata": {"suite": "evals-e2e"}, "limit": 1},
    })
    again = wait_for_run(client, ev.id, again.id)
    assert again.status == "completed" and again.result_counts.total == 1, again
    assert again.per_model_usage[0].invocation_count == 1

    quiz = client.evals.create(data_source_config=CUSTOM,
                               testing_criteria=[string_check("mentions", "ilike")])
    responses_source = {
        "type": "responses", "model": NANO,
        "input_messages": {"type": "template", "template": [
            {"role": "user", "content": "{{item.question}} One word."}]},
        "sampling_params": {"temperature": 0, "max_completion_tokens": 8},
        "source": {"type": "file_content", "content": [{"item": ITEMS[0]["item"]}]},
    }
    with pytest.raises(openai.BadRequestError) as refused:
        client.evals.runs.create(quiz.id, data_source=responses_source)
    assert refused.value.body["param"] == "data_source.sampling_params.max_completion_tokens"
    run = client.evals.runs.create(quiz.id, data_source={
        "type": "responses", "model": NANO,
        "input_messages": {"type": "template", "template": [
            {"role": "user", "content": "{{item.question}} One word."}]},
        "sampling_params": {"temperature": 0, "max_completion_tokens": 16},
        "source": {"type": "file_content", "content": [{"item": ITEMS[0]["item"]}]},
    })
    run = wait_for_run(client, quiz.id, run.id)
    item = output_items(client, quiz.id, run.id)[0]
    assert run.status == "completed" and run.result_counts.errored == 0, (run, item)
    assert item.sample.output[0].content and item.sample.usage.completion_tokens > 0, item


def test_stored_responses_source(client):
    """A `responses` source reads stored responses by its filter (metadata, model,
    instructions_search, users, created window): each becomes an item (`input`, `output_text`,
    ...) whose stored output is the sample, or which a model answers again by
    `item_reference`."""
    tag = f"resp-{time.monotonic_ns()}"
    start = int(time.time())
    made = []
    for city, user in [("Paris", "ann"), ("Rome", "bob"), ("Oslo", "ann")]:
        made.append(client.responses.create(
            model=NANO, input=f"Say {city}.", instructions="Answer in one word.",
            metadata={"suite": tag}, user=user, max_output_tokens=16, temperature=0))
    client.responses.create(model=NANO, input="Say Lima.", metadata={"suite": tag},
                            store=False, max_output_tokens=16, temperature=0)
    ev = client.evals.create(
        data_source_config={"type": "logs", "metadata": {"suite": tag}},
        testing_criteria=[string_check("same", "eq", reference="{{item.output_text}}"),
                          string_check("mentions", "ilike", reference="{{item.input.0.content}}")],
    )
    source = {"type": "responses", "metadata": {"suite": tag}, "model": NANO,
              "instructions_search": "one word", "users": ["ann"],
              "created_after": start, "created_before": int(time.time()) + 1}
    run = client.evals.runs.create(ev.id, data_source={"type": "responses", "source": source})
    run = wait_for_run(client, ev.id, run.id)
    assert run.status == "completed" and run.result_counts.total == 2, run
    assert run.per_model_usage == []
    items = output_items(client, ev.id, run.id, order="asc")
    by_id = {i.datasource_item["id"]: i for i in items}
    assert set(by_id) == {made[0].id, made[2].id}, by_id.keys()
    first = by_id[made[0].id]
    assert first.datasource_item["input"] == [{"role": "user", "content": "Say Paris."}]
    assert first.datasource_item["output_text"] == made[0].output_text
    assert first.datasource_item["user"] == "ann"
    assert [r.name.split("-")[0] for r in first.results][:1] == ["same"]
    assert first.results[0].passed, first.results

    again = client.evals.runs.create(ev.id, data_source={
        "type": "responses", "model": NANO,
        "input_messages": {"type": "item_reference", "item_reference": "item.input"},
        "sampling_params": {"temperature": 0, "max_completion_tokens": 16},
        "source": {"type": "responses", "metadata": {"suite": tag}, "users": ["bob"]},
    })
    again = wait_for_run(client, ev.id, again.id)
    assert again.status == "completed" and again.result_counts.total == 1, again
    assert again.per_model_usage[0].invocation_count == 1

    none = client.evals.runs.create(ev.id, data_source={
        "type": "responses", "source": {"type": "responses", "metadata": {"suite": "no-such"}}})
    none = wait_for_run(client, ev.id, none.id)
    assert none.status == "failed" and "no items" in none.error.message, none
    with pytest.raises(openai.BadRequestError) as bad:
        client.evals.runs.create(ev.id, data_source={
            "type": "responses", "source": {"type": "responses", "users": "ann"}})
    assert bad.value.body["param"] == "data_source.source.users"


def test_bad_files(evals_server, client):
    ev = client.evals.create(data_source_config=CUSTOM,
                             testing_criteria=[string_check("eq", "eq")])
    good = ITEMS[0]
    with evals_server.http() as http:
        bad = upload_jsonl(client, [good], purpose="evals")
        broken = client.files.create(
            file=("broken.jsonl", b'{"item": {"question": "q", "answer": "a"}}\n{"item": \n'),
            purpose="evals")
        r = http.post(f"/v1/evals/{ev.id}/runs", json={
            "data_source": {"type": "jsonl", "source": {"type": "file_id", "id": broken.id}}})
        error = assert_error(r, 400, param="data_source.source.id", code="invalid_file_line")
        assert "Line 2" in error["message"], error
        missing = upload_jsonl(client, [{"item": {"question": "q"}}], purpose="evals")
        r = http.post(f"/v1/evals/{ev.id}/runs", json={
            "data_source": {"type": "jsonl", "source": {"type": "file_id", "id": missing.id}}})
        assert "'answer'" in assert_error(r, 400, param="data_source.source.id")["message"]

    # A file deleted before the run starts fails the run, with the reason.
    run = client.evals.runs.create(ev.id, data_source={
        "type": "jsonl", "source": {"type": "file_id", "id": bad.id}})
    client.files.delete(bad.id)
    run = wait_for_run(client, ev.id, run.id)
    if run.status == "failed":
        assert run.error.code == "file_not_found" and bad.id in run.error.message, run
    else:  # the worker read the file before it was deleted
        assert run.status == "completed" and run.result_counts.total == 1, run


def test_cancel_a_run(client):
    ev = client.evals.create(data_source_config=CUSTOM,
                             testing_criteria=[string_check("eq", "eq")])
    run = client.evals.runs.create(ev.id, data_source={
        "type": "completions", "model": NANO,
        "input_messages": {"type": "template", "template": [
            {"role": "user", "content": "Write a long story about {{item.question}}"}]},
        "sampling_params": {"max_completion_tokens": 400},
        "source": {"type": "file_content", "content": [{"item": i["item"]} for i in ITEMS] * 3},
    })
    canceled = client.evals.runs.cancel(run.id, eval_id=ev.id)
    assert canceled.status == "canceled"
    time.sleep(1)
    run = client.evals.runs.retrieve(run.id, eval_id=ev.id)
    assert run.status == "canceled", run


def test_a_run_survives_kill_9(server_factory, server_at):
    """kill -9 while a run is in progress; a new process on the same workdir takes the dead
    worker's items over once their lease runs out: the run completes with every item graded
    once, and each sample billed once."""
    n = 16
    first = server_factory("--batch-lease-secs", "2", "--max-running", "2")
    client = first.client()
    ev = client.evals.create(data_source_config=CUSTOM,
                             testing_criteria=[string_check("nonempty", "ne", reference="")])
    items = [{"item": {"question": f"Count from {i} to {i + 30}.", "answer": "x"}}
             for i in range(n)]
    run = client.evals.runs.create(ev.id, data_source={
        "type": "completions", "model": NANO,
        "input_messages": {"type": "template", "template": [
            {"role": "user", "content": "{{item.question}} One number per line."}]},
        "sampling_params": {"temperature": 0, "max_completion_tokens": 32},
        "source": {"type": "file_content", "content": items},
    })
    deadline = time.monotonic() + 180
    while True:
        state = client.evals.runs.retrieve(run.id, eval_id=ev.id)
        c = state.result_counts
        done = c.passed + c.failed + c.errored
        if state.status == "in_progress" and done >= 2:
            first.kill()
            break
        assert state.status in ("queued", "in_progress"), state
        assert time.monotonic() < deadline, f"no 2 items graded in 180 s: {state}"
        time.sleep(0.05)
    assert done < n, f"the whole run was done before the kill: {state}"

    second = server_at(first.workdir, "--batch-lease-secs", "2", "--max-running", "2")
    client = second.client()
    final = wait_for_run(client, ev.id, run.id)
    assert final.status == "completed", final
    assert final.result_counts.total == n, final
    assert final.result_counts.passed + final.result_counts.failed == n, final
    graded = Counter(i.datasource_item_id for i in output_items(client, ev.id, run.id))
    assert sorted(graded) == list(range(n)) and set(graded.values()) == {1}, graded
    assert final.per_model_usage[0].invocation_count == n, final.per_model_usage
    with second.http() as http:
        assert usage_by_model(http)[NANO]["requests"] == n, "each sample billed once"
    second.stop()
