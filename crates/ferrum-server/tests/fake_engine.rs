//! The routes driven through axum's `oneshot` with a scripted engine behind the `Engine` seam:
//! real protocol parsing, templating, tokenizing, tool-call parsing, SSE, storage and errors,
//! with no weights to download and no forward pass. The model is a tiny random-weight GGUF
//! (`TinyModel::write_chat`) loaded for its byte-level vocabulary and ChatML template; the
//! engine answers each request with the next scripted text, one token per byte.

mod common;

use std::collections::VecDeque;
use std::ops::ControlFlow;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request as HttpRequest, StatusCode};
use ferrum_engine::testing::TinyModel;
use ferrum_engine::{
    Completion, EngineError, EngineStats, Event, FinishReason, LoadOptions, LoadedModel, Request,
    SubmitError, TokenEvent,
};
use ferrum_registry::Registry;
use ferrum_server::Engine;
use ferrum_store::Store;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

/// Answers requests with scripted texts, in order (the last one repeats); a text
/// `!fail:<detail>` fails the request on the engine's side instead.
struct Scripted {
    model: Arc<LoadedModel>,
    stats: EngineStats,
    replies: Mutex<VecDeque<String>>,
    /// `submit` refuses every request as if the queue were full.
    full: bool,
    /// Prompts received, for assertions.
    prompts: Mutex<Vec<Vec<u32>>>,
}

impl Engine for Scripted {
    fn model(&self) -> &LoadedModel {
        &self.model
    }
    fn shared_model(&self) -> Arc<LoadedModel> {
        Arc::clone(&self.model)
    }
    fn stats(&self) -> &EngineStats {
        &self.stats
    }
    fn submit(&self, mut request: Request) -> Result<(), SubmitError> {
        if self.full {
            return Err(SubmitError::QueueFull(0));
        }
        self.prompts.lock().unwrap().push(request.prompt.clone());
        let text = {
            let mut r = self.replies.lock().unwrap();
            if r.len() > 1 {
                r.pop_front().unwrap()
            } else {
                r.front().cloned().unwrap_or_default()
            }
        };
        let model = Arc::clone(&self.model);
        // Events come from another thread, as from the real engine thread.
        std::thread::spawn(move || {
            let sink = &mut request.sink;
            if sink(Event::Started).is_break() {
                return;
            }
            if let Some(detail) = text.strip_prefix("!fail:") {
                let _ = sink(Event::Error(EngineError::Internal(detail.into())));
                return;
            }
            let all = model.tokenizer.encode(&text, false, false).unwrap();
            for choice in 0..request.choices {
                let max = request.params.max_tokens;
                let tokens: Vec<u32> = all.iter().copied().take(max).collect();
                let mut out = Vec::new();
                let mut finish = if tokens.len() < all.len() {
                    FinishReason::Length
                } else {
                    FinishReason::Stop
                };
                for &id in &tokens {
                    out.push(id);
                    let piece = model.tokenizer.decode(&[id], true).unwrap();
                    let token = TokenEvent {
                        id,
                        text: piece,
                        logprob: Some(-0.5),
                        top: vec![(id, -0.5)],
                    };
                    if sink(Event::Token { choice, token }) == ControlFlow::Break(()) {
                        finish = FinishReason::Cancelled;
                        break;
                    }
                }
                let completion = Completion {
                    text: model.tokenizer.decode(&out, true).unwrap(),
                    tokens: out,
                    finish_reason: finish,
                    prompt_tokens: request.prompt.len(),
                    cached_tokens: 0,
                    prefill_time: Duration::from_millis(1),
                    decode_time: Duration::from_millis(1),
                    accepted_prediction_tokens: 0,
                    rejected_prediction_tokens: 0,
                };
                if sink(Event::ChoiceDone { choice, completion }).is_break() {
                    return;
                }
            }
        });
        Ok(())
    }
}

struct Server {
    app: Arc<ferrum_server::App>,
    engine: Arc<Scripted>,
    _dir: tempfile::TempDir,
}

async fn server(replies: &[&str], full: bool) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    // Byte-level tokens make prompts long: room for a tools prompt.
    let tiny = TinyModel {
        context_length: 4096,
        ..TinyModel::default()
    };
    tiny.write_chat(&path).unwrap();
    let model = LoadedModel::load(&path, &LoadOptions::default()).unwrap();
    let engine = Arc::new(Scripted {
        model: Arc::new(model),
        stats: EngineStats::default(),
        replies: Mutex::new(replies.iter().map(|s| s.to_string()).collect()),
        full,
        prompts: Mutex::default(),
    });
    let url = format!("sqlite://{}", dir.path().join("ferrum.db").display());
    let store = Store::connect(&url).await.unwrap();
    let config = common::config(dir.path());
    let app = ferrum_server::app(Registry::embedded_default(), store, config);
    app.models
        .install("gpt-4.1-nano", engine.clone())
        .await
        .unwrap();
    Server {
        app,
        engine,
        _dir: dir,
    }
}

impl Server {
    /// Uploads `content` as a file of `purpose` (a multipart body, as the SDKs send it).
    async fn upload(&self, purpose: &str, name: &str, content: &str) -> (StatusCode, Value) {
        let boundary = "ferrum-test-boundary";
        let body = format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n{purpose}\r\n\
             --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n\
             Content-Type: application/octet-stream\r\n\r\n{content}\r\n--{boundary}--\r\n"
        );
        let req = HttpRequest::builder()
            .method("POST")
            .uri("/v1/files")
            .header(
                "content-type",
                format!("multipart/form-data; boundary={boundary}"),
            )
            .body(Body::from(body))
            .unwrap();
        let response = ferrum_server::router(Arc::clone(&self.app))
            .oneshot(req)
            .await
            .unwrap();
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    async fn call(&self, method: &str, uri: &str, body: Option<Value>) -> (StatusCode, Value) {
        let (status, _, text) = self.raw(method, uri, body).await;
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    async fn raw(
        &self,
        method: &str,
        uri: &str,
        body: Option<Value>,
    ) -> (StatusCode, axum::http::HeaderMap, String) {
        let (status, headers, bytes) = common::send(&self.app, method, uri, None, body).await;
        (status, headers, String::from_utf8(bytes.to_vec()).unwrap())
    }
}

fn chat(extra: Value) -> Value {
    let mut body = json!({
        "model": "gpt-4.1-nano",
        "messages": [{"role": "user", "content": "Say hello"}],
    });
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    body
}

#[tokio::test]
async fn chat_completion_through_the_seam() {
    let s = server(&["Hello there!"], false).await;
    let (status, headers, text) = s
        .raw("POST", "/v1/chat/completions", Some(chat(json!({}))))
        .await;
    assert_eq!(status, StatusCode::OK, "{text}");
    assert!(headers.get("x-request-id").is_some());
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "gpt-4.1-nano");
    assert_eq!(v["choices"][0]["message"]["content"], "Hello there!");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    // The engine got the ChatML rendering of the conversation, one token per byte.
    let prompt = s.engine.prompts.lock().unwrap()[0].clone();
    let rendered = s.engine.model.tokenizer.decode(&prompt, false).unwrap();
    assert_eq!(
        rendered,
        "<|im_start|>user\nSay hello<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(v["usage"]["prompt_tokens"], prompt.len());
    assert_eq!(v["usage"]["completion_tokens"], 12);
    assert_eq!(v["usage"]["total_tokens"], prompt.len() + 12);
}

#[tokio::test]
async fn max_tokens_ends_with_length_and_n_gives_choices() {
    let s = server(&["Hello there!"], false).await;
    let (status, v) = s
        .call(
            "POST",
            "/v1/chat/completions",
            Some(chat(json!({"max_completion_tokens": 5, "n": 2}))),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    for c in 0..2 {
        assert_eq!(v["choices"][c]["message"]["content"], "Hello");
        assert_eq!(v["choices"][c]["finish_reason"], "length");
        assert_eq!(v["choices"][c]["index"], c);
    }
    assert_eq!(v["usage"]["completion_tokens"], 10);
}

#[tokio::test]
async fn streamed_chunks_add_up_to_the_reply() {
    let s = server(&["Streaming works."], false).await;
    let (status, headers, text) = s
        .raw(
            "POST",
            "/v1/chat/completions",
            Some(chat(
                json!({"stream": true, "stream_options": {"include_usage": true}}),
            )),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let events: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let content: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(content, "Streaming works.");
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    let finish: Vec<&Value> = chunks
        .iter()
        .map(|c| &c["choices"][0]["finish_reason"])
        .filter(|f| !f.is_null())
        .collect();
    assert_eq!(finish, [&json!("stop")]);
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!(usage["completion_tokens"], 16);
    assert_eq!(chunks.last().unwrap()["choices"], json!([]));
}

#[tokio::test]
async fn auto_tool_calls_are_parsed_from_the_text() {
    let call = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>";
    let s = server(&[call], false).await;
    let tools = json!([{
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                           "required": ["city"]}
        }
    }]);
    let (status, v) = s
        .call(
            "POST",
            "/v1/chat/completions",
            Some(chat(json!({"tools": tools}))),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let choice = &v["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    assert!(choice["message"]["content"].is_null());
    let calls = choice["message"]["tool_calls"].as_array().unwrap();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0]["type"], "function");
    assert_eq!(calls[0]["function"]["name"], "get_weather");
    let args: Value =
        serde_json::from_str(calls[0]["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(args, json!({"city": "Paris"}));
    assert!(calls[0]["id"].as_str().unwrap().starts_with("call_"));
}

#[tokio::test]
async fn responses_api_through_the_seam_and_stored() {
    let s = server(&["First answer.", "Second answer."], false).await;
    let (status, v) = s
        .call(
            "POST",
            "/v1/responses",
            Some(json!({"model": "gpt-4.1-nano", "input": "Hi", "store": true})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["object"], "response");
    assert_eq!(v["status"], "completed");
    assert_eq!(v["output"][0]["type"], "message");
    assert_eq!(v["output"][0]["content"][0]["text"], "First answer.");
    let id = v["id"].as_str().unwrap();
    let (status, got) = s.call("GET", &format!("/v1/responses/{id}"), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(got["output"], v["output"]);
    // A continuation renders the earlier turn into the prompt.
    let (status, v2) = s
        .call(
            "POST",
            "/v1/responses",
            Some(json!({"model": "gpt-4.1-nano", "input": "And?", "previous_response_id": id})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v2}");
    assert_eq!(v2["output"][0]["content"][0]["text"], "Second answer.");
    let prompt = s.engine.prompts.lock().unwrap()[1].clone();
    let rendered = s.engine.model.tokenizer.decode(&prompt, false).unwrap();
    assert!(
        rendered.contains("Hi<|im_end|>") && rendered.contains("First answer.<|im_end|>"),
        "{rendered}"
    );
}

#[tokio::test]
async fn errors_have_openai_shapes() {
    let s = server(&["x"], false).await;
    let (status, v) = s
        .call(
            "POST",
            "/v1/chat/completions",
            Some(json!({"model": "gpt-5", "messages": [{"role": "user", "content": "hi"}]})),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(v["error"]["code"], "model_not_found");
    let (status, v) = s
        .call(
            "POST",
            "/v1/chat/completions",
            Some(chat(json!({"temperature": 9}))),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert_eq!(v["error"]["param"], "temperature");
    let (status, v) = s
        .call(
            "POST",
            "/v1/chat/completions",
            Some(chat(json!({"max_completion_tokens": 1_000_000}))),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().len() > 10);
    let (status, v) = s.call("GET", "/v1/nothing-here", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(v["error"]["message"].is_string());
}

/// A failure on the engine's side answers OpenAI's generic 500 without its detail (which goes to
/// the log, under the request id), and `/metrics` counts failures by kind.
#[tokio::test]
async fn server_side_failures_keep_their_detail_out_of_the_body() {
    let s = server(
        &["!fail:mmap of /var/lib/ferrum/models/x.gguf failed"],
        false,
    )
    .await;
    let (status, headers, text) = s
        .raw("POST", "/v1/chat/completions", Some(chat(json!({}))))
        .await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["error"]["type"], "server_error");
    assert!(!text.contains("/var/lib"), "{text}");
    assert!(headers.contains_key("x-request-id"));
    let (_, _, metrics) = s.raw("GET", "/metrics", None).await;
    assert!(
        metrics.contains("ferrum_errors_total{kind=\"engine\"} 1"),
        "{metrics}"
    );
    s.call(
        "POST",
        "/v1/chat/completions",
        Some(chat(json!({"temperature": 9}))),
    )
    .await;
    let (_, _, metrics) = s.raw("GET", "/metrics", None).await;
    assert!(
        metrics.contains("ferrum_errors_total{kind=\"invalid_request\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_full_queue_is_a_429_with_retry_after() {
    let s = server(&["x"], true).await;
    let (status, headers, text) = s
        .raw("POST", "/v1/chat/completions", Some(chat(json!({}))))
        .await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{text}");
    assert_eq!(headers["retry-after"], "1");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert!(v["error"]["message"].is_string());
    assert!(v["error"].get("type").is_some());
}

#[tokio::test]
async fn a_batch_runs_through_the_worker() {
    let s = server(&["Batch answer."], false).await;
    let line = |id: &str| {
        json!({"custom_id": id, "method": "POST", "url": "/v1/chat/completions",
               "body": {"model": "gpt-4.1-nano",
                        "messages": [{"role": "user", "content": "hi"}]}})
        .to_string()
    };
    let jsonl = format!("{}\n{}\n", line("a"), line("b"));
    let (status, file) = s.upload("batch", "in.jsonl", &jsonl).await;
    assert_eq!(status, StatusCode::OK, "{file}");
    assert_eq!(file["purpose"], "batch");
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let worker = tokio::spawn(ferrum_server::run_batch_worker(Arc::clone(&s.app), stopped));
    let (status, batch) = s
        .call(
            "POST",
            "/v1/batches",
            Some(
                json!({"input_file_id": file["id"], "endpoint": "/v1/chat/completions",
                        "completion_window": "24h"}),
            ),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{batch}");
    let id = batch["id"].as_str().unwrap().to_string();
    let mut batch = batch;
    for _ in 0..500 {
        if ["completed", "failed", "expired", "cancelled"]
            .contains(&batch["status"].as_str().unwrap())
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        batch = s.call("GET", &format!("/v1/batches/{id}"), None).await.1;
    }
    let _ = stop.send(true);
    worker.await.unwrap();
    assert_eq!(batch["status"], "completed", "{batch}");
    assert_eq!(
        batch["request_counts"],
        json!({"total": 2, "completed": 2, "failed": 0})
    );
    let out = batch["output_file_id"].as_str().unwrap();
    let (status, _, text) = s
        .raw("GET", &format!("/v1/files/{out}/content"), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    let mut ids = Vec::new();
    for line in text.lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["response"]["status_code"], 200);
        assert_eq!(
            v["response"]["body"]["choices"][0]["message"]["content"],
            "Batch answer."
        );
        ids.push(v["custom_id"].as_str().unwrap().to_string());
    }
    ids.sort();
    assert_eq!(ids, ["a", "b"]);
}

fn weather_tools() -> Value {
    json!([{
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                           "required": ["city"]}
        }
    }])
}

fn sse_data(text: &str) -> Vec<Value> {
    text.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap())
        .collect()
}

#[tokio::test]
async fn forced_parallel_calls_stream_as_tool_call_deltas() {
    let calls = r#"[{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_weather", "arguments": {"city": "Rome"}}]"#;
    let s = server(&[calls], false).await;
    let (status, _, text) = s
        .raw(
            "POST",
            "/v1/chat/completions",
            Some(chat(
                json!({"tools": weather_tools(), "tool_choice": "required", "stream": true}),
            )),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let chunks = sse_data(&text);
    // Reassemble the calls from their deltas, as the SDKs do.
    let mut calls: Vec<(String, String, String)> = Vec::new();
    for c in &chunks {
        for d in c["choices"][0]["delta"]["tool_calls"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let i = d["index"].as_u64().unwrap() as usize;
            if calls.len() <= i {
                calls.push(Default::default());
            }
            if let Some(id) = d["id"].as_str() {
                calls[i].0 = id.into();
            }
            if let Some(n) = d["function"]["name"].as_str() {
                calls[i].1.push_str(n);
            }
            if let Some(a) = d["function"]["arguments"].as_str() {
                calls[i].2.push_str(a);
            }
        }
    }
    assert_eq!(calls.len(), 2, "{text}");
    for (call, city) in calls.iter().zip(["Paris", "Rome"]) {
        assert!(call.0.starts_with("call_"));
        assert_eq!(call.1, "get_weather");
        let args: Value = serde_json::from_str(&call.2).unwrap();
        assert_eq!(args, json!({"city": city}));
    }
    let last = chunks
        .iter()
        .rev()
        .find(|c| !c["choices"][0]["finish_reason"].is_null())
        .unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "tool_calls");
}

#[tokio::test]
async fn responses_stream_an_auto_call_as_a_function_call_item() {
    let reply = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}\n</tool_call>";
    let s = server(&[reply], false).await;
    let tools = json!([{"type": "function", "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}]);
    let (status, _, text) = s
        .raw(
            "POST",
            "/v1/responses",
            Some(
                json!({"model": "gpt-4.1-nano", "input": "Weather in Oslo?", "tools": tools,
                        "stream": true}),
            ),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let events = sse_data(&text);
    let seq: Vec<u64> = events
        .iter()
        .map(|e| e["sequence_number"].as_u64().unwrap())
        .collect();
    assert_eq!(seq, (0..events.len() as u64).collect::<Vec<_>>());
    let done = events.last().unwrap();
    assert_eq!(done["type"], "response.completed", "{text}");
    let output = done["response"]["output"].as_array().unwrap();
    assert_eq!(output.len(), 2, "{output:?}");
    assert_eq!(output[0]["type"], "message");
    assert_eq!(output[0]["content"][0]["text"], "Let me check.");
    assert_eq!(output[1]["type"], "function_call");
    assert_eq!(output[1]["name"], "get_weather");
    let args: Value = serde_json::from_str(output[1]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(args, json!({"city": "Oslo"}));
    let deltas: String = events
        .iter()
        .filter(|e| e["type"] == "response.function_call_arguments.delta")
        .map(|e| e["delta"].as_str().unwrap())
        .collect();
    assert_eq!(deltas, output[1]["arguments"].as_str().unwrap());
}
