"""Draft-model speculative decoding configured per tier in ferrum.toml: a tier with
`draft = { tier = ..., tokens = ... }` answers exactly as the same weights without a draft
(greedy, seeded sampling, streaming, stop sequences), the draft's proposals show in /metrics,
and they are neither reported nor billed as prediction tokens. nano drafts for a second tier on
the same nano weights (the default config's mini -> gpt-4.1 pairing is benchmarked, see
scripts/bench_draft.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import FerrumServer
from helpers import metric_sum

PRICE = "price = { input = 0.10, cached_input = 0.025, output = 0.40 }"
ASK = [{"role": "user", "content": "Write a short poem about the sea."}]


@pytest.fixture(scope="module")
def draft_server(ferrum_bin: Path, nano_weights: Path, tmp_path_factory: pytest.TempPathFactory):
    workdir = tmp_path_factory.mktemp("draft")
    config = workdir / "ferrum.toml"
    config.write_text(
        f"""
[[tier]]
id = "plain"
weights = {{ path = "{nano_weights}" }}
{PRICE}

[[tier]]
id = "drafted"
weights = {{ path = "{nano_weights}" }}
draft = {{ tier = "drafter", tokens = 4 }}
{PRICE}

[[tier]]
id = "drafter"
weights = {{ path = "{nano_weights}" }}
{PRICE}
"""
    )
    server = FerrumServer(ferrum_bin, config, workdir, [])
    yield server
    server.stop()


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(temperature=0),
        dict(temperature=0.9, seed=7),
        dict(temperature=0, stop=["\n\n"]),
        dict(temperature=0.7, top_p=0.9, seed=3, n=2),
    ],
    ids=["greedy", "seeded", "stop", "n2"],
)
def test_a_draft_never_changes_the_answer(draft_server, kwargs):
    client = draft_server.client()
    plain = client.chat.completions.create(model="plain", messages=ASK, max_tokens=64, **kwargs)
    drafted = client.chat.completions.create(model="drafted", messages=ASK, max_tokens=64, **kwargs)
    assert [c.message.content for c in drafted.choices] == [c.message.content for c in plain.choices]
    assert [c.finish_reason for c in drafted.choices] == [c.finish_reason for c in plain.choices]
    assert drafted.usage.completion_tokens == plain.usage.completion_tokens
    details = drafted.usage.completion_tokens_details
    assert (details.accepted_prediction_tokens, details.rejected_prediction_tokens) == (0, 0)


def test_drafted_streaming_equals_plain_and_proposals_are_counted(draft_server):
    client = draft_server.client()
    with draft_server.http() as http:
        kept_before = metric_sum(http, "ferrum_draft_accepted_tokens_total")
        plain = client.chat.completions.create(model="plain", messages=ASK, max_tokens=64, temperature=0)
        stream = client.chat.completions.create(
            model="drafted", messages=ASK, max_tokens=64, temperature=0, stream=True
        )
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert text == plain.choices[0].message.content
        # nano drafting for itself agrees with every greedy token it proposes.
        kept = metric_sum(http, "ferrum_draft_accepted_tokens_total") - kept_before
        assert kept >= plain.usage.completion_tokens // 2, kept
