"""`service_tier` on chat completions and the Responses API, as OpenAI defines it: `priority` is
scheduled ahead of every other request and priced 1.75x, `flex` runs behind every client at
the Batch API's 50%, `auto`/`default` is the standard tier; the tier is echoed in responses and
stream chunks, recorded in the ledger, and the usage API groups by it."""

from __future__ import annotations

import threading
import time

import openai
import pytest

from helpers import BAN_EOS, NANO, PRICES, SHORT_PROMPT, assert_error, usage_by_model
from test_organization import ADMIN_KEY, admin_client, new_project

FACTORS = {"default": 1.0, "flex": 0.5, "priority": 1.75}


def cost(usage, price: dict) -> float:
    cached = usage.prompt_tokens_details.cached_tokens
    return ((usage.prompt_tokens - cached) * price["input"] + cached * price["cached_input"]
            + usage.completion_tokens * price["output"]) / 1e6


def test_tiers_are_echoed_and_priced(fresh_server):
    client = fresh_server.client()
    with fresh_server.http() as http:
        for asked, echoed in [(None, "default"), ("auto", "default"), ("default", "default"),
                              ("flex", "flex"), ("priority", "priority")]:
            before = usage_by_model(http).get(NANO, {"cost_usd": 0.0})["cost_usd"]
            extra = {} if asked is None else {"service_tier": asked}
            completion = client.chat.completions.create(
                model=NANO, messages=SHORT_PROMPT, max_tokens=6, temperature=0, **extra)
            assert completion.service_tier == echoed, completion
            after = usage_by_model(http)[NANO]["cost_usd"]
            want = FACTORS[echoed] * cost(completion.usage, PRICES[NANO])
            assert after - before == pytest.approx(want, rel=1e-9), (asked, after - before, want)

        chunks = list(client.chat.completions.create(
            model=NANO, messages=SHORT_PROMPT, max_tokens=4, stream=True, service_tier="flex"))
        assert {c.service_tier for c in chunks} == {"flex"}, chunks
        response = client.responses.create(model=NANO, input="Hi", max_output_tokens=16,
                                           service_tier="priority")
        assert response.service_tier == "priority", response
        r = http.post("/v1/chat/completions", json={
            "model": NANO, "messages": SHORT_PROMPT, "service_tier": "gold"})
        assert_error(r, 400, param="service_tier")


def test_priority_requests_are_served_first(server_factory):
    """One sequence at a time: while a long default answer runs and another default request
    waits, a priority request sent last finishes first (it is admitted ahead of the waiting one
    and preempts the running one)."""
    server = server_factory("--max-running", "1")
    client = server.client()
    finished: list[str] = []
    lock = threading.Lock()

    def ask(name: str, max_tokens: int, **extra) -> None:
        client.chat.completions.create(
            model=NANO, messages=SHORT_PROMPT, max_tokens=max_tokens, temperature=0,
            logit_bias=BAN_EOS, **extra)
        with lock:
            finished.append(name)

    long = threading.Thread(target=ask, args=("long", 400))
    long.start()
    time.sleep(1.0)  # running
    waiting = threading.Thread(target=ask, args=("waiting", 8))
    waiting.start()
    time.sleep(0.5)  # queued behind it
    urgent = threading.Thread(target=ask, args=("priority", 8), kwargs={"service_tier": "priority"})
    urgent.start()
    for t in (long, waiting, urgent):
        t.join(timeout=300)
    assert finished[0] == "priority", finished
    assert finished.index("waiting") > finished.index("priority"), finished


def test_usage_api_groups_by_service_tier(server_factory):
    server = server_factory("--admin-key", ADMIN_KEY)
    admin = admin_client(server)
    _, _, key = new_project(admin, "tiers")
    project = server.client(api_key=key)
    start = int(time.time()) - 60
    for tier, n in [("flex", 2), ("priority", 1), (None, 1)]:
        for _ in range(n):
            extra = {} if tier is None else {"service_tier": tier}
            project.chat.completions.create(model=NANO, messages=SHORT_PROMPT, max_tokens=4,
                                            temperature=0, **extra)
    usage = admin.admin.organization.usage.completions(
        start_time=start, bucket_width="1h", group_by=["service_tier"])
    counts = {r.service_tier: r.num_model_requests for b in usage.data for r in b.results}
    assert counts == {"flex": 2, "priority": 1, "default": 1}, counts
    with pytest.raises(openai.BadRequestError):
        project.chat.completions.create(model=NANO, messages=SHORT_PROMPT, max_tokens=4,
                                        service_tier="platinum")


def finishing_order(clients: list[tuple[str, openai.OpenAI, int]]) -> list[str]:
    """Sends (name, client, max_tokens) requests one after another (a moment apart, so each is
    running or queued before the next), all greedy and without end of text; returns the names
    in the order their responses came back."""
    finished: list[str] = []
    lock = threading.Lock()

    def ask(name: str, client: openai.OpenAI, max_tokens: int) -> None:
        client.chat.completions.create(model=NANO, messages=SHORT_PROMPT, max_tokens=max_tokens,
                                       temperature=0, logit_bias=BAN_EOS)
        with lock:
            finished.append(name)

    threads = []
    for name, client, max_tokens in clients:
        t = threading.Thread(target=ask, args=(name, client, max_tokens))
        t.start()
        threads.append(t)
        time.sleep(0.7)
    for t in threads:
        t.join(timeout=300)
    return finished


def test_reserved_capacity_keeps_a_project_ahead_of_others(server_factory):
    """A project's reserved tokens a minute (`reserved_tokens_per_1_minute` on its rate limit,
    ferrum's provisioned throughput) are served at priority: with one sequence at a time and
    another project's long answer running and its next request waiting, the reserved project's
    request, sent last, finishes first. Past its reservation it waits its turn like the rest."""
    server = server_factory("--admin-key", ADMIN_KEY, "--max-running", "1")
    admin = admin_client(server)
    limits = admin.admin.organization.projects.rate_limits
    reserved_id, _, reserved_key = new_project(admin, "reserved")
    _, _, other_key = new_project(admin, "other")
    updated = limits.update_rate_limit(f"rl-{NANO}", project_id=reserved_id,
                                       extra_body={"reserved_tokens_per_1_minute": 1_000_000})
    assert updated.model_extra["reserved_tokens_per_1_minute"] == 1_000_000, updated
    reserved, other = server.client(api_key=reserved_key), server.client(api_key=other_key)

    order = finishing_order([("other-long", other, 400), ("other", other, 8),
                             ("reserved", reserved, 8)])
    assert order[0] == "reserved", order

    limits.update_rate_limit(f"rl-{NANO}", project_id=reserved_id,
                             extra_body={"reserved_tokens_per_1_minute": 1})
    order = finishing_order([("other-long", other, 200), ("other", other, 8),
                             ("reserved", reserved, 8)])
    assert order.index("reserved") > order.index("other"), order


def test_flex_is_refused_unbilled_when_the_background_queue_is_full(server_factory):
    """Flex requests wait in the background queue; when a queue's worth already waits there
    (`--queue-size 1` here), the next one gets OpenAI's 429 `resource_unavailable` at once, and
    nothing is billed for it. The waiting one still completes, at the flex price."""
    server = server_factory("--max-running", "1", "--queue-size", "1")
    client = server.client(max_retries=0)
    results: dict[str, object] = {}

    def ask(name: str, max_tokens: int, **extra) -> None:
        try:
            results[name] = client.chat.completions.create(
                model=NANO, messages=SHORT_PROMPT, max_tokens=max_tokens, temperature=0,
                logit_bias=BAN_EOS, **extra)
        except openai.APIStatusError as e:
            results[name] = e

    long = threading.Thread(target=ask, args=("long", 300))
    long.start()
    time.sleep(1.0)
    waiting = threading.Thread(target=ask, args=("flex-1", 4), kwargs={"service_tier": "flex"})
    waiting.start()
    time.sleep(0.7)
    with server.http() as http:
        before = usage_by_model(http)[NANO]["requests"] if NANO in usage_by_model(http) else 0
        r = http.post("/v1/chat/completions", json={
            "model": NANO, "messages": SHORT_PROMPT, "max_tokens": 4, "service_tier": "flex"})
        error = assert_error(r, 429, code="resource_unavailable")
        assert "flex" in error["message"], error
        for t in (long, waiting):
            t.join(timeout=300)
        assert results["flex-1"].service_tier == "flex", results
        after = usage_by_model(http)[NANO]["requests"]
    assert after - before == 2, (before, after)  # the long one and flex-1; not the refused one
