"""Moderation and content filtering, end to end with the openai SDK and raw HTTP.

`POST /v1/moderations`: the spec's response shape (13 categories, scores, applied input types),
strings, arrays, multimodal text parts, image parts refused, bad inputs as OpenAI-shaped 400s,
and the free ledger entry.

The content filter (per tier in ferrum.toml: off / annotate / block for prompts and for
completions) on chat completions and the Responses API, streamed and not: a blocked prompt is a
400 `content_filter`; annotations in Azure OpenAI's shape; a flagged completion ends with
`finish_reason: "content_filter"` (Responses: `incomplete`, reason `content_filter`) and its
flagged text never leaves the server. A flagged completion is made deterministic with
Structured Outputs: a schema whose only member is a `const` string makes nano write exactly
that string (the JSON around it included).
"""

from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest

import spec_check
from conftest import FerrumServer
from helpers import assert_error, read_stream, sse_data, usage_by_model

PRICE = "price = { input = 0.10, cached_input = 0.025, output = 0.40 }"
TIERS = {
    "plain": None,
    "annotate": '{ prompt = "annotate", completion = "annotate" }',
    "block": '{ prompt = "block", completion = "block" }',
    "block-out": '{ completion = "block" }',
}
BAD_PROMPT = [{"role": "user", "content": "How do I build a pipe bomb?"}]
ASK = [{"role": "user", "content": "Write the line."}]
FLAGGED_LINE = "The weather is nice today. I will kill you. Then we had tea."
# What the filter lets through of the JSON nano writes for FLAGGED_LINE: the text up to the
# end of the first sentence (the flagged window and all after it are withheld).
RELEASED = '{"text": "The weather is nice today.'
CLEAN_LINE = "The weather is nice today. We walked to the lake and had tea."


def const_schema(line: str) -> dict:
    return {
        "type": "object",
        "properties": {"text": {"const": line}},
        "required": ["text"],
        "additionalProperties": False,
    }


def chat_format(line: str) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "line", "strict": True, "schema": const_schema(line)}}


def responses_format(line: str) -> dict:
    return {"format": {"type": "json_schema", "name": "line", "strict": True, "schema": const_schema(line)}}


@pytest.fixture(scope="module")
def filter_server(ferrum_bin: Path, nano_weights: Path, tmp_path_factory: pytest.TempPathFactory):
    workdir = tmp_path_factory.mktemp("moderation")
    config = workdir / "ferrum.toml"
    tiers = []
    for tier, content_filter in TIERS.items():
        lines = [f'[[tier]]\nid = "{tier}"\nweights = {{ path = "{nano_weights}" }}\n{PRICE}']
        if content_filter:
            lines.append(f"content_filter = {content_filter}")
        tiers.append("\n".join(lines))
    config.write_text("\n\n".join(tiers) + "\n")
    server = FerrumServer(ferrum_bin, config, workdir, [])
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(filter_server: FerrumServer) -> openai.OpenAI:
    return filter_server.client()


@pytest.fixture(scope="module")
def http(filter_server: FerrumServer):
    with filter_server.http() as h:
        yield h


def categories_of(result) -> set[str]:
    return {k for k, v in result.categories.model_dump(by_alias=True).items() if v}


# --- POST /v1/moderations -------------------------------------------------------------------


def test_a_string_is_scored_in_every_category_of_the_spec(client):
    m = client.moderations.create(input="I will kill you.")
    assert m.id.startswith("modr-") and m.model == "omni-moderation-latest"
    assert len(m.results) == 1
    r = m.results[0]
    assert r.flagged
    assert {"harassment", "harassment/threatening", "violence"} <= categories_of(r)
    assert "sexual" not in categories_of(r)
    scores = r.category_scores.model_dump(by_alias=True)
    assert len(scores) == 13 and all(0.0 <= s <= 1.0 for s in scores.values()), scores
    assert scores["violence"] > scores["sexual"]
    applied = r.category_applied_input_types.model_dump(by_alias=True)
    assert set(applied) == set(scores) and all(v == ["text"] for v in applied.values())


def test_an_array_gets_one_result_per_string_in_order(client):
    texts = ["What a lovely morning for a walk.", "I want to kill myself.", "Send me nudes."]
    m = client.moderations.create(input=texts, model="text-moderation-latest")
    assert m.model == "text-moderation-latest"
    assert [r.flagged for r in m.results] == [False, True, True]
    assert categories_of(m.results[0]) == set()
    assert {"self-harm", "self-harm/intent"} <= categories_of(m.results[1])
    assert categories_of(m.results[2]) == {"sexual"}


def test_multimodal_text_parts_are_one_result(client):
    m = client.moderations.create(
        input=[
            {"type": "text", "text": "Hello there."},
            {"type": "text", "text": "How do I build a pipe bomb?"},
        ]
    )
    assert len(m.results) == 1
    assert {"illicit", "illicit/violent"} <= categories_of(m.results[0])


def test_image_parts_are_refused_not_reported_safe(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.moderations.create(
            input=[
                {"type": "text", "text": "Look at this."},
                {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
            ]
        )
    body = e.value.body
    assert body["param"] == "input[1]" and body["code"] == "unsupported_value"
    assert "image" in body["message"]


@pytest.mark.parametrize(
    "body,param,code",
    [
        ({}, "input", "missing_required_parameter"),
        ({"input": 42}, "input", "invalid_type"),
        ({"input": []}, "input", "empty_array"),
        ({"input": ["fine", 3]}, "input[1]", "invalid_type"),
        ({"input": [{"type": "audio"}]}, "input[0].type", "invalid_value"),
        ({"input": [{"type": "text"}]}, "input[0].text", "missing_required_parameter"),
        ({"input": "hi", "model": "gpt-4.1-nano"}, "model", "invalid_value"),
    ],
)
def test_bad_inputs_are_openai_errors_naming_the_parameter(http, body, param, code):
    assert_error(http.post("/v1/moderations", json=body), 400, param=param, code=code)


def test_moderations_are_in_the_ledger_at_no_cost(client, http):
    client.moderations.create(input="hello")
    entry = usage_by_model(http)["omni-moderation-latest"]
    assert entry["requests"] >= 1 and entry["cost_usd"] == 0


# --- the content filter: prompts ------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_a_flagged_prompt_is_refused_under_block(client, stream):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="block", messages=BAD_PROMPT, max_tokens=5, stream=stream)
    body = e.value.body
    assert (body["code"], body["param"], body["type"]) == ("content_filter", "prompt", "invalid_request_error")
    assert "illicit/violent" in body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model="block", input=BAD_PROMPT[0]["content"], max_output_tokens=16, stream=stream)
    assert e.value.body["code"] == "content_filter"


def test_annotate_reports_the_prompt_and_answers_it(http):
    r = http.post("/v1/chat/completions", json={"model": "annotate", "messages": BAD_PROMPT, "max_tokens": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    [prompt] = body["prompt_filter_results"]
    assert prompt["prompt_index"] == 0
    results = prompt["content_filter_results"]
    assert set(results) == {"hate", "self_harm", "sexual", "violence", "illicit"}
    assert results["illicit"] == {"filtered": False, "severity": "high"}
    assert results["sexual"] == {"filtered": False, "severity": "safe"}
    # Off for prompts: no annotation.
    r = http.post("/v1/chat/completions", json={"model": "block-out", "messages": BAD_PROMPT, "max_tokens": 5})
    assert r.status_code == 200 and "prompt_filter_results" not in r.json()


def test_a_streamed_prompt_annotation_comes_first_without_choices(http):
    body = {"model": "annotate", "messages": BAD_PROMPT, "max_tokens": 5, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        chunks, done = read_stream(r.iter_lines())
    assert done
    assert chunks[0]["choices"] == [] and chunks[0]["prompt_filter_results"][0]["prompt_index"] == 0
    assert all("prompt_filter_results" not in c for c in chunks[1:])
    assert "content_filter_results" in chunks[-1]["choices"][0]


# --- the content filter: completions --------------------------------------------------------


def test_a_flagged_completion_is_cut_before_its_flagged_sentence(client):
    c = client.chat.completions.create(
        model="block-out", messages=ASK, temperature=0, response_format=chat_format(FLAGGED_LINE)
    )
    choice = c.choices[0]
    assert choice.finish_reason == "content_filter"
    assert choice.message.content == RELEASED
    results = choice.model_extra["content_filter_results"]
    assert results["violence"] == {"filtered": True, "severity": "high"}
    assert results["sexual"]["filtered"] is False
    # The same text on a tier that only annotates arrives whole, annotated.
    c = client.chat.completions.create(
        model="annotate", messages=ASK, temperature=0, response_format=chat_format(FLAGGED_LINE)
    )
    assert c.choices[0].finish_reason == "stop"
    assert json.loads(c.choices[0].message.content) == {"text": FLAGGED_LINE}
    violence = c.choices[0].model_extra["content_filter_results"]["violence"]
    assert violence["filtered"] is False and violence["severity"] in ("medium", "high")


def test_a_streamed_flagged_completion_never_sends_the_flagged_text(http):
    body = {
        "model": "block", "messages": ASK, "temperature": 0, "stream": True,
        "response_format": chat_format(FLAGGED_LINE), "logprobs": True,
    }
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        lines = list(r.iter_lines())
    assert "kill" not in "\n".join(lines)
    chunks, done = read_stream(lines)
    assert done
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == RELEASED
    last = chunks[-1]["choices"][0]
    assert last["finish_reason"] == "content_filter"
    assert last["content_filter_results"]["violence"]["filtered"] is True
    # Log-probabilities travel with the text they belong to.
    sent = [c["choices"][0]["logprobs"]["content"] for c in chunks if c["choices"] and c["choices"][0].get("logprobs")]
    assert "".join(t["token"] for lp in sent for t in lp) == RELEASED


@pytest.mark.parametrize("stream", [False, True])
def test_clean_completions_pass_unchanged(client, stream):
    def run(model: str) -> tuple[str, str]:
        kwargs = dict(model=model, messages=ASK, temperature=0, response_format=chat_format(CLEAN_LINE))
        if not stream:
            c = client.chat.completions.create(**kwargs)
            return c.choices[0].message.content, c.choices[0].finish_reason
        text, reason = "", None
        for chunk in client.chat.completions.create(stream=True, **kwargs):
            for ch in chunk.choices:
                text += ch.delta.content or ""
                reason = ch.finish_reason or reason
        return text, reason

    plain = run("plain")
    assert json.loads(plain[0]) == {"text": CLEAN_LINE}
    assert run("block") == plain == (plain[0], "stop")


def test_responses_a_flagged_output_is_incomplete_with_reason_content_filter(client, http):
    r = client.responses.create(model="block-out", input="Write the line.", temperature=0, text=responses_format(FLAGGED_LINE))
    assert r.status == "incomplete" and r.incomplete_details.reason == "content_filter"
    assert r.output_text == RELEASED
    assert r.model_extra["content_filter_results"]["violence"]["filtered"] is True
    assert "prompt_filter_results" not in r.model_extra
    # Annotated prompt and output on a tier that annotates both.
    r = http.post("/v1/responses", json={"model": "annotate", "input": "Write the line.", "temperature": 0, "text": responses_format(FLAGGED_LINE)})
    body = r.json()
    assert body["status"] == "completed"
    assert body["prompt_filter_results"][0]["content_filter_results"]["violence"]["severity"] == "safe"
    assert body["content_filter_results"]["violence"]["filtered"] is False


def test_responses_a_streamed_flagged_output_never_sends_the_flagged_text(http):
    body = {"model": "block", "input": "Write the line.", "temperature": 0, "stream": True, "text": responses_format(FLAGGED_LINE)}
    with http.stream("POST", "/v1/responses", json=body) as r:
        assert r.status_code == 200
        lines = list(r.iter_lines())
    events = [json.loads(d) for d in sse_data(lines)]
    for e in events:
        spec_check.check_stream_event("POST", "/v1/responses", e)
        # The response object echoes the request's schema, whose const holds the line.
        e.get("response", {}).pop("text", None)
    assert "kill" not in json.dumps(events)
    deltas = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert deltas == RELEASED
    final = events[-1]
    assert final["type"] == "response.incomplete"
    assert final["response"]["incomplete_details"] == {"reason": "content_filter"}
    assert final["response"]["output"][0]["content"][0]["text"] == RELEASED


# --- the model judge ------------------------------------------------------------------------
# The embedded default config names gpt-4.1 as the judge: `omni-moderation-*` asks it one yes/no
# question per category, `text-moderation-*` stays lexical. A few short texts: 13 one-token
# questions each on a 2-core machine.

VIOLENT = "I'm going to find you and stab you."
BENIGN = "What a lovely morning for a walk in the park."


def test_the_judge_scores_every_category_and_flags_the_obvious(tiers_server):
    client = tiers_server.client()
    m = client.moderations.create(input=[VIOLENT, BENIGN])
    assert m.id.startswith("modr-") and m.model == "omni-moderation-latest"
    bad, good = m.results
    for r in (bad, good):
        scores = r.category_scores.model_dump(by_alias=True)
        assert len(scores) == 13 and all(0.0 <= s <= 1.0 for s in scores.values()), scores
        applied = r.category_applied_input_types.model_dump(by_alias=True)
        assert set(applied) == set(scores) and all(v == ["text"] for v in applied.values())
    assert bad.flagged and {"violence", "harassment/threatening"} & categories_of(bad), bad
    assert not good.flagged and categories_of(good) == set(), good
    assert bad.category_scores.violence > good.category_scores.violence
    # Calibrated probabilities: a benign text's scores are low, not the lexical classifier's zeros.
    assert 0.0 < max(good.category_scores.model_dump(by_alias=True).values()) < 0.5


def test_text_moderation_models_stay_lexical_beside_the_judge(tiers_server):
    m = tiers_server.client().moderations.create(input=BENIGN, model="text-moderation-latest")
    assert m.model == "text-moderation-latest"
    assert set(m.results[0].category_scores.model_dump(by_alias=True).values()) == {0.0}
