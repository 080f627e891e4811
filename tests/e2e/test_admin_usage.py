"""ferrum's own endpoints: GET /v1/usage (totals and cost per tier) and /admin/models."""

import os
import time

import pytest

from helpers import (
    BAN_EOS,
    MINI,
    NANO,
    NANO_ALIAS,
    PRICES,
    SHORT_PROMPT,
    assert_error,
    cost_usd,
)

USAGE_KEYS = {"model", "requests", "prompt_tokens", "cached_tokens", "completion_tokens", "cost_usd"}


def usage_by_model(http) -> dict[str, dict]:
    response = http.get("/v1/usage")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "list", body
    totals = {}
    for entry in body["data"]:
        assert set(entry) >= USAGE_KEYS, entry
        assert entry["model"] not in totals, f"two entries for {entry['model']}: {body}"
        totals[entry["model"]] = entry
    return totals


def totals_of(totals: dict[str, dict], model: str) -> tuple[int, int, int, int]:
    entry = totals.get(model)
    if entry is None:
        return (0, 0, 0, 0)
    return (entry["requests"], entry["prompt_tokens"], entry["cached_tokens"], entry["completion_tokens"])


def poll_usage(http, settled, timeout: float = 3.0) -> dict[str, dict]:
    """Usage totals, re-read for up to `timeout` s until `settled(totals)` (records may be
    written just after the response)."""
    deadline = time.monotonic() + timeout
    while True:
        totals = usage_by_model(http)
        if settled(totals) or time.monotonic() > deadline:
            return totals
        time.sleep(0.1)


def admin_models(http) -> dict[str, dict]:
    response = http.get("/admin/models")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "list", body
    models = {}
    for entry in body["data"]:
        assert set(entry) >= {"id", "loaded", "weights"}, entry
        assert isinstance(entry["loaded"], bool), entry
        assert isinstance(entry["weights"], str), entry
        models[entry["id"]] = entry
    return models


def is_loaded(http, model: str) -> bool:
    return admin_models(http)[model]["loaded"]


def chat(client, model: str, **kwargs):
    return client.chat.completions.create(
        model=model, messages=SHORT_PROMPT, max_tokens=kwargs.pop("max_tokens", 4), temperature=0, **kwargs
    )


# --- usage -----------------------------------------------------------------------------------


def test_usage_starts_empty(fresh_server):
    """A server on a new database reports no requests for any tier."""
    with fresh_server.http() as http:
        totals = usage_by_model(http)
    assert all(entry["requests"] == 0 for entry in totals.values()), totals
    assert set(totals) <= set(PRICES), f"usage is keyed by tier id: {totals}"


def test_usage_totals_and_cost(fresh_server):
    """Requests (by id, alias, streamed, on two tiers) add up per tier id with the configured prices."""
    client = fresh_server.client()
    expected = {NANO: [0, 0, 0, 0], MINI: [0, 0, 0, 0]}

    def record(model: str, usage) -> None:
        cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
        for i, value in enumerate((1, usage.prompt_tokens, cached, usage.completion_tokens)):
            expected[model][i] += value

    record(NANO, chat(client, NANO).usage)
    record(NANO, chat(client, NANO_ALIAS, max_tokens=6).usage)
    record(MINI, chat(client, MINI).usage)
    stream = client.chat.completions.create(
        model=NANO,
        messages=[{"role": "user", "content": "Count to five."}],
        max_tokens=5,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    record(NANO, list(stream)[-1].usage)

    with fresh_server.http() as http:
        totals = poll_usage(
            http, lambda t: all(totals_of(t, m)[0] == e[0] for m, e in expected.items())
        )
    for model, (requests, prompt, cached, completion) in expected.items():
        assert totals_of(totals, model) == (requests, prompt, cached, completion), (model, totals)
        assert totals[model]["cost_usd"] == pytest.approx(
            cost_usd(model, prompt, cached, completion), abs=1e-9
        ), (model, totals[model])


def test_usage_of_a_request_appears_in_totals(http, client):
    """On the shared server a new request's usage is added to its tier's totals."""
    before = totals_of(usage_by_model(http), NANO)
    usage = chat(client, NANO, max_tokens=3).usage
    after = totals_of(poll_usage(http, lambda t: totals_of(t, NANO)[0] > before[0]), NANO)
    cached = usage.prompt_tokens_details.cached_tokens
    delta = tuple(a - b for a, b in zip(after, before))
    assert delta == (1, usage.prompt_tokens, cached, usage.completion_tokens), (before, after, usage)


def test_usage_cost_matches_prices(http):
    """Every tier's cost_usd equals its token totals priced per the configuration."""
    totals = usage_by_model(http)
    assert totals, "the shared server has served requests by now"
    for model, entry in totals.items():
        assert entry["cached_tokens"] <= entry["prompt_tokens"], entry
        assert entry["cost_usd"] == pytest.approx(
            cost_usd(model, entry["prompt_tokens"], entry["cached_tokens"], entry["completion_tokens"]),
            abs=1e-9,
        ), entry


# --- admin -----------------------------------------------------------------------------------


def test_admin_models_lists_tiers(fresh_server, nano_weights):
    """/admin/models lists each tier with its load state and weights; lazy tiers start unloaded."""
    with fresh_server.http() as http:
        models = admin_models(http)
    assert set(models) == {NANO, MINI}, models
    assert models[NANO]["loaded"] is True, models
    assert models[MINI]["loaded"] is False, models
    for entry in models.values():
        assert os.path.basename(nano_weights) in entry["weights"], entry


def test_lazy_tier_loads_on_first_request(fresh_server):
    """The lazy tier is unloaded until its first request and loaded after it."""
    with fresh_server.http() as http:
        assert is_loaded(http, MINI) is False
        assert chat(fresh_server.client(), MINI).model == MINI
        assert is_loaded(http, MINI) is True


def test_unload_then_lazy_reload(fresh_server):
    """Unloading the lazy tier marks it unloaded; the next request loads it again."""
    client = fresh_server.client()
    with fresh_server.http() as http:
        chat(client, MINI)
        assert is_loaded(http, MINI) is True
        response = http.post(f"/admin/models/{MINI}/unload")
        assert response.is_success, response.text
        assert is_loaded(http, MINI) is False
        assert chat(client, MINI).choices[0].message.content
        assert is_loaded(http, MINI) is True


def test_load_with_new_weights(fresh_server, nano_weights):
    """POST /admin/models/{id}/load with a weights path loads the tier from that file."""
    with fresh_server.http() as http:
        response = http.post(
            f"/admin/models/{MINI}/load", json={"weights": {"path": str(nano_weights)}}
        )
        assert response.is_success, response.text
        assert response.json()["loaded"] is True, response.text
        entry = admin_models(http)[MINI]
        assert entry["loaded"] is True, entry
        assert str(nano_weights) in entry["weights"], entry
    assert chat(fresh_server.client(), MINI).choices[0].message.content


def test_load_without_body(fresh_server):
    """POST /admin/models/{id}/load without a body loads the tier from its configured weights."""
    with fresh_server.http() as http:
        response = http.post(f"/admin/models/{MINI}/load")
        assert response.is_success, response.text
        assert is_loaded(http, MINI) is True


def test_unloaded_startup_tier_returns_503_until_loaded(fresh_server):
    """A startup tier that was unloaded answers 503 (error shape) until it is loaded again."""
    client = fresh_server.client()
    with fresh_server.http() as http:
        response = http.post(f"/admin/models/{NANO}/unload")
        assert response.is_success, response.text
        assert is_loaded(http, NANO) is False
        response = http.post(
            "/v1/chat/completions",
            json={"model": NANO, "messages": SHORT_PROMPT, "max_tokens": 2},
        )
        assert_error(response, 503)
        response = http.post(f"/admin/models/{NANO}/load")
        assert response.is_success, response.text
        assert is_loaded(http, NANO) is True
    assert chat(client, NANO).choices[0].message.content


@pytest.mark.parametrize("action", ["load", "unload"])
def test_admin_unknown_model(http, action):
    """Loading or unloading an unknown model is a 404 model_not_found."""
    assert_error(http.post(f"/admin/models/gpt-9000/{action}"), 404, code="model_not_found")


def test_load_with_missing_weights_file_fails(fresh_server, tmp_path):
    """Loading a tier from a weights path that does not exist is an error and keeps the server up."""
    with fresh_server.http() as http:
        response = http.post(
            f"/admin/models/{MINI}/load",
            json={"weights": {"path": str(tmp_path / "missing.gguf")}},
        )
        assert 400 <= response.status_code < 600, response.text
        assert_error(response, response.status_code)
        assert is_loaded(http, NANO) is True
    assert chat(fresh_server.client(), NANO, logit_bias=BAN_EOS).choices[0].message.content


def metric_values(http, name: str) -> dict[str, float]:
    """The samples of one metric in GET /metrics, by their label text."""
    response = http.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for line in response.text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            key, value = line.rsplit(" ", 1)
            samples[key[len(name):]] = float(value)
    return samples


def test_metrics_count_tokens_cache_hits_and_latencies(fresh_server):
    """/metrics (Prometheus text) counts generated and cached tokens and records TTFT/ITL."""
    http = fresh_server.http()
    client = fresh_server.client()
    for _ in range(2):  # the second request reuses the first one's prompt
        chat(client, NANO, max_tokens=6, logit_bias=BAN_EOS)
    label = f'{{model="{NANO}"}}'
    assert metric_values(http, "ferrum_generated_tokens_total")[label] >= 12
    assert metric_values(http, "ferrum_cached_prompt_tokens_total")[label] > 0
    assert 0 < metric_values(http, "ferrum_prefix_cache_hit_ratio")[label] < 1
    assert metric_values(http, "ferrum_running_sequences")[label] == 0
    assert metric_values(http, "ferrum_time_to_first_token_seconds_count")[""] == 2
    assert metric_values(http, "ferrum_inter_token_latency_seconds_count")[""] >= 10
    assert metric_values(http, "ferrum_requests_total")[""] == 2


def test_a_client_that_disconnects_is_billed_for_what_was_generated(fresh_server):
    """A stream abandoned mid-way still records its prompt and the tokens generated so far."""
    http = fresh_server.http()
    body = {
        "model": NANO,
        "messages": SHORT_PROMPT,
        "max_tokens": 4000,
        "temperature": 0,
        "logit_bias": BAN_EOS,
        "stream": True,
    }
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        chunks = 0
        for line in response.iter_lines():
            if line.startswith("data: "):
                chunks += 1
            if chunks >= 4:
                break
    totals = poll_usage(http, lambda t: totals_of(t, NANO)[0] == 1, timeout=30.0)
    requests, prompt, cached, completion = totals_of(totals, NANO)
    assert requests == 1 and prompt > 0 and cached == 0, totals
    assert 3 <= completion < 4000, totals
    expected = cost_usd(NANO, prompt, 0, completion)
    assert abs(totals[NANO]["cost_usd"] - expected) < 1e-9, totals
