//! `POST /v1/embeddings` through axum's `oneshot` on a real embedding model: a tiny random BERT
//! written by the test (`ferrum_embed::testing`), loaded through the registry from a local
//! directory like any tier. Input forms, encodings, dimensions, limits and their errors, usage
//! billing, the model list, metrics, and concurrent requests sharing batches.

mod common;

use std::sync::Arc;

use axum::http::StatusCode;
use base64::Engine;
use ferrum_embed::testing::{write_tiny_model, HIDDEN};
use ferrum_registry::Registry;
use ferrum_store::Store;
use serde_json::{json, Value};

/// The tiny vocabulary's ids of "hello" and "world".
const HELLO_WORLD: [u32; 2] = [13, 14];

struct Server {
    app: Arc<ferrum_server::App>,
    _dir: tempfile::TempDir,
}

async fn server() -> Server {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny");
    let files = write_tiny_model(&model, 11).unwrap();
    let toml = format!(
        r#"
        [[tier]]
        id = "chat"
        weights = {{ path = "{missing}" }}
        load = "lazy"
        price = {{ input = 1.0, cached_input = 0.5, output = 2.0 }}

        [[tier]]
        id = "emb"
        aliases = ["emb-alias"]
        kind = "embedding"
        load = "lazy"
        weights = {{ path = "{dir}" }}
        price = {{ input = 0.02, cached_input = 0.02, output = 0.0 }}

        [[tier]]
        id = "emb-short"
        kind = "embedding"
        load = "lazy"
        context_length = 10
        weights = {{ path = "{weights}" }}
        price = {{ input = 1.0, cached_input = 1.0, output = 0.0 }}
        "#,
        missing = dir.path().join("missing.gguf").display(),
        dir = model.display(),
        weights = files.weights.display(),
    );
    let registry = Registry::from_toml_str(&toml, None).unwrap();
    let url = format!("sqlite://{}", dir.path().join("ferrum.db").display());
    let store = Store::connect(&url).await.unwrap();
    let config = common::config(dir.path());
    Server {
        app: ferrum_server::app(registry, store, config),
        _dir: dir,
    }
}

impl Server {
    async fn call(&self, method: &str, uri: &str, body: Option<Value>) -> (StatusCode, Value) {
        let (status, text) = self.raw(method, uri, body).await;
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    async fn raw(&self, method: &str, uri: &str, body: Option<Value>) -> (StatusCode, String) {
        let (status, _, bytes) = common::send(&self.app, method, uri, None, body).await;
        (status, String::from_utf8(bytes.to_vec()).unwrap())
    }

    /// Embeds `input` with `extra` options; expects a 200 and returns the body.
    async fn embed(&self, input: Value, extra: Value) -> Value {
        let mut body = json!({"model": "emb", "input": input});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let (status, v) = self.call("POST", "/v1/embeddings", Some(body)).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        v
    }

    /// Expects the request to fail with `status`, `param` and `code`.
    async fn rejected(&self, body: Value, status: StatusCode, param: Option<&str>, code: &str) {
        let (got, v) = self.call("POST", "/v1/embeddings", Some(body)).await;
        assert_eq!(got, status, "{v}");
        let error = &v["error"];
        assert_eq!(error["param"], json!(param), "{v}");
        assert_eq!(error["code"], code, "{v}");
        assert_eq!(error["type"], "invalid_request_error", "{v}");
        assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
}

/// The float vectors of a response, in `data` order, checking each object's shape.
fn vectors(v: &Value) -> Vec<Vec<f32>> {
    assert_eq!(v["object"], "list");
    let data = v["data"].as_array().unwrap();
    data.iter()
        .enumerate()
        .map(|(i, e)| {
            assert_eq!(e["object"], "embedding");
            assert_eq!(e["index"], i);
            e["embedding"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        })
        .collect()
}

fn assert_unit(v: &[f32]) {
    let norm: f32 = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-5, "norm {norm}");
}

fn assert_close(a: &[f32], b: &[f32]) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        assert!((x - y).abs() < 1e-5, "{x} != {y}");
    }
}

#[tokio::test]
async fn every_input_form_embeds_and_counts_its_tokens() {
    let s = server().await;
    let one = s.embed(json!("hello world"), json!({})).await;
    assert_eq!(one["model"], "emb");
    assert_eq!(one["usage"], json!({"prompt_tokens": 2, "total_tokens": 2}));
    let text = vectors(&one);
    assert_eq!(text.len(), 1);
    assert_eq!(text[0].len(), HIDDEN);
    assert_unit(&text[0]);

    let many = s
        .embed(
            json!(["hello world", "the quick brown fox", "dog"]),
            json!({}),
        )
        .await;
    assert_eq!(many["usage"]["prompt_tokens"], 7);
    let many = vectors(&many);
    assert_eq!(many.len(), 3);
    assert_close(&many[0], &text[0]);

    // Token ids are the same input as the text they tokenize to.
    let ids = s.embed(json!(HELLO_WORLD), json!({})).await;
    assert_eq!(ids["usage"]["prompt_tokens"], 2);
    assert_close(&vectors(&ids)[0], &text[0]);
    let nested = s
        .embed(json!([HELLO_WORLD, [12], [5, 6, 7, 8]]), json!({}))
        .await;
    assert_eq!(nested["usage"]["prompt_tokens"], 7);
    let nested = vectors(&nested);
    assert_close(&nested[0], &text[0]);
    assert_close(&nested[1], &many[2]);
    // An alias answers as its tier.
    let (status, v) = s
        .call(
            "POST",
            "/v1/embeddings",
            Some(json!({"model": "emb-alias", "input": "dog", "user": "u-1"})),
        )
        .await;
    assert_eq!((status, &v["model"]), (StatusCode::OK, &json!("emb")));
}

#[tokio::test]
async fn base64_carries_the_same_floats() {
    let s = server().await;
    let input = json!(["hello world", "lazy dog"]);
    let floats = vectors(&s.embed(input.clone(), json!({})).await);
    let encoded = s.embed(input, json!({"encoding_format": "base64"})).await;
    for (e, want) in encoded["data"].as_array().unwrap().iter().zip(&floats) {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(e["embedding"].as_str().unwrap())
            .unwrap();
        let got: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        // JSON floats are the shortest text of the same f32, so they agree exactly.
        assert_eq!(&got, want);
    }
}

#[tokio::test]
async fn dimensions_shorten_and_renormalise() {
    let s = server().await;
    let full = vectors(&s.embed(json!("hello world"), json!({})).await)[0].clone();
    let short = vectors(
        &s.embed(json!("hello world"), json!({"dimensions": 8}))
            .await,
    )[0]
    .clone();
    assert_eq!(short.len(), 8);
    assert_unit(&short);
    let norm: f32 = full[..8].iter().map(|x| x * x).sum::<f32>().sqrt();
    let expected: Vec<f32> = full[..8].iter().map(|x| x / norm).collect();
    assert_close(&short, &expected);
    let whole = s
        .embed(json!("hello world"), json!({"dimensions": HIDDEN}))
        .await;
    assert_close(&vectors(&whole)[0], &full);
    for dimensions in [json!(HIDDEN + 1), json!(0)] {
        let body = json!({"model": "emb", "input": "x", "dimensions": dimensions});
        let code = if dimensions == 0 {
            "integer_below_min_value"
        } else {
            "invalid_value"
        };
        s.rejected(body, StatusCode::BAD_REQUEST, Some("dimensions"), code)
            .await;
    }
}

#[tokio::test]
async fn limits_are_clear_400s_and_nothing_is_truncated() {
    let s = server().await;
    let bad = StatusCode::BAD_REQUEST;
    let body = |input: Value| json!({"model": "emb", "input": input});
    // 30 tokens fit the tiny model's 32 positions with [CLS] and [SEP]; 31 do not.
    s.embed(json!([vec![5; 30]]), json!({})).await;
    let long_text = "dog ".repeat(31);
    s.rejected(
        body(json!(["hello", long_text])),
        bad,
        Some("input[1]"),
        "context_length_exceeded",
    )
    .await;
    s.rejected(
        body(json!(vec![5; 31])),
        bad,
        Some("input"),
        "context_length_exceeded",
    )
    .await;
    s.rejected(
        body(json!([[5], [5, 71]])),
        bad,
        Some("input[1]"),
        "invalid_value",
    )
    .await;
    s.rejected(body(json!("")), bad, Some("input"), "empty_string")
        .await;
    s.rejected(body(json!([])), bad, Some("input"), "empty_array")
        .await;
    let too_many = vec!["dog"; 2049];
    s.rejected(
        body(json!(too_many)),
        bad,
        Some("input"),
        "array_above_max_length",
    )
    .await;
    // A tier's context_length caps its inputs (10 positions: 8 tokens), here on a tier whose
    // weights are given as the safetensors file.
    let short = |input: Value| json!({"model": "emb-short", "input": input});
    let (status, _) = s
        .call("POST", "/v1/embeddings", Some(short(json!(vec![5; 8]))))
        .await;
    assert_eq!(status, StatusCode::OK);
    s.rejected(
        short(json!(vec![5; 9])),
        bad,
        Some("input"),
        "context_length_exceeded",
    )
    .await;
}

#[tokio::test]
async fn models_of_the_wrong_kind_or_unknown_are_refused() {
    let s = server().await;
    s.rejected(
        json!({"model": "nope", "input": "x"}),
        StatusCode::NOT_FOUND,
        None,
        "model_not_found",
    )
    .await;
    s.rejected(
        json!({"model": "chat", "input": "x"}),
        StatusCode::BAD_REQUEST,
        Some("model"),
        "model_not_supported",
    )
    .await;
    let chat = json!({"model": "emb", "messages": [{"role": "user", "content": "hi"}]});
    let (status, v) = s.call("POST", "/v1/chat/completions", Some(chat)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["error"]["param"], "model");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("/v1/embeddings"),
        "{v}"
    );
}

#[tokio::test]
async fn usage_models_and_metrics_show_the_embedding_tier() {
    let s = server().await;
    s.embed(json!(["hello world", "dog"]), json!({})).await;
    s.embed(json!([5, 6, 7]), json!({})).await;
    let (_, usage) = s.call("GET", "/v1/usage", None).await;
    let entry = usage["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["model"] == "emb")
        .cloned()
        .unwrap();
    assert_eq!(entry["requests"], 2);
    assert_eq!(entry["prompt_tokens"], 6);
    assert_eq!(entry["completion_tokens"], 0);
    let cost = entry["cost_usd"].as_f64().unwrap();
    assert!((cost - 6.0 * 0.02 / 1e6).abs() < 1e-15, "{cost}");

    let (_, models) = s.call("GET", "/v1/models", None).await;
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["chat", "emb", "emb-alias", "emb-short"]);
    let (status, model) = s.call("GET", "/v1/models/emb-alias", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(model["owned_by"], "ferrum");

    let (_, metrics) = s.raw("GET", "/metrics", None).await;
    // Three inputs, of 2 + 1 + 3 tokens and two special tokens each.
    assert!(
        metrics.contains("ferrum_embedding_inputs_total{model=\"emb\"} 3"),
        "{metrics}"
    );
    assert!(
        metrics.contains("ferrum_embedding_tokens_total{model=\"emb\"} 12"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_get_the_vectors_of_sequential_ones() {
    let s = Arc::new(server().await);
    let texts: Vec<String> = (0..16)
        .map(|i| {
            let words = [
                "the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog",
            ];
            (0..=i % 7)
                .map(|j| words[(i + j) % 8])
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    let mut sequential = Vec::new();
    for t in &texts {
        sequential.push(vectors(&s.embed(json!([t, "hello"]), json!({})).await));
    }
    let tasks: Vec<_> = texts
        .iter()
        .map(|t| {
            let s = Arc::clone(&s);
            let t = t.clone();
            tokio::spawn(async move { vectors(&s.embed(json!([t, "hello"]), json!({})).await) })
        })
        .collect();
    for (task, want) in tasks.into_iter().zip(&sequential) {
        let got = task.await.unwrap();
        assert_close(&got[0], &want[0]);
        assert_close(&got[1], &want[1]);
    }
}
