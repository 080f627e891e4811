//! The Evals API over the `Engine` seam (axum `oneshot`, a scripted engine on a tiny
//! random-weight model, a real SQLite database): eval creation and its validation (unknown
//! grader types, templates naming fields the item schema lacks, unsupported metrics), updates,
//! lists and deletion; runs of every data source (`jsonl` inline and from a file, `completions`
//! sampling a model or reusing stored completions, `responses`) graded by every grader type
//! through the worker; counts, usage and the batch-price ledger; bad files; cancel and delete;
//! and a run whose first worker died mid-run, finished by another with every item graded once.

mod common;

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request as HttpRequest, StatusCode};
use ferrum_engine::testing::TinyModel;
use ferrum_engine::{
    Completion, EngineStats, Event, FinishReason, LoadOptions, LoadedModel, Request, SubmitError,
    TokenEvent,
};
use ferrum_registry::Registry;
use ferrum_server::Engine;
use ferrum_store::{Store, StoredCompletion};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

/// Answers from the prompt it is given: a label grader's prompt gets `{"label": "good"}` when
/// the graded text contains "Paris" (else "bad"), a score grader's `{"result": 0.75}`, and any
/// other prompt its last user line upper-cased (the "model" under evaluation).
struct Scripted {
    model: Arc<LoadedModel>,
    stats: EngineStats,
}

fn answer(prompt: &str) -> String {
    if prompt.contains("{\"label\": L}") {
        let good = prompt.to_lowercase().contains("paris");
        return format!("{{\"label\": \"{}\"}}", if good { "good" } else { "bad" });
    }
    if prompt.contains("{\"result\": S}") {
        return "{\"result\": 0.75}".into();
    }
    let user = prompt.rsplit("<|im_start|>user\n").next().unwrap_or("");
    user.split("<|im_end|>").next().unwrap_or("").to_uppercase()
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
        let model = Arc::clone(&self.model);
        std::thread::spawn(move || {
            let prompt = model.tokenizer.decode(&request.prompt, false).unwrap();
            let text = answer(&prompt);
            let sink = &mut request.sink;
            if sink(Event::Started).is_break() {
                return;
            }
            let tokens = model.tokenizer.encode(&text, false, false).unwrap();
            for &id in &tokens {
                let token = TokenEvent {
                    id,
                    text: model.tokenizer.decode(&[id], true).unwrap(),
                    logprob: None,
                    top: Vec::new(),
                };
                if sink(Event::Token { choice: 0, token }) == ControlFlow::Break(()) {
                    return;
                }
            }
            let completion = Completion {
                text,
                tokens,
                finish_reason: FinishReason::Stop,
                prompt_tokens: request.prompt.len(),
                cached_tokens: 0,
                prefill_time: Duration::from_millis(1),
                decode_time: Duration::from_millis(1),
                accepted_prediction_tokens: 0,
                rejected_prediction_tokens: 0,
            };
            let _ = sink(Event::ChoiceDone {
                choice: 0,
                completion,
            });
        });
        Ok(())
    }
}

struct Server {
    app: Arc<ferrum_server::App>,
    store: Store,
    dir: tempfile::TempDir,
}

async fn server() -> Server {
    let dir = tempfile::tempdir().unwrap();
    server_on(dir).await
}

/// A server on the database and blobs in `dir` (a second server on the same directory is a
/// restart).
async fn server_on(dir: tempfile::TempDir) -> Server {
    let path = dir.path().join("tiny.gguf");
    if !path.exists() {
        let tiny = TinyModel {
            context_length: 1024,
            ..TinyModel::default()
        };
        tiny.write_chat(&path).unwrap();
    }
    let model = LoadedModel::load(&path, &LoadOptions::default()).unwrap();
    let engine = Arc::new(Scripted {
        model: Arc::new(model),
        stats: EngineStats::default(),
    });
    let url = format!("sqlite://{}", dir.path().join("ferrum.db").display());
    let store = Store::connect(&url).await.unwrap();
    let mut config = common::config(dir.path());
    config.batch.lease = Duration::from_millis(600);
    let app = ferrum_server::app(Registry::embedded_default(), store.clone(), config);
    app.models
        .install("gpt-4.1-nano", engine.clone())
        .await
        .unwrap();
    Server { app, store, dir }
}

impl Server {
    async fn call(&self, method: &str, uri: &str, body: Option<Value>) -> (StatusCode, Value) {
        let mut req = HttpRequest::builder()
            .method(method)
            .uri(uri)
            .header("host", "ferrum.test");
        let body = match body {
            Some(v) => {
                req = req.header("content-type", "application/json");
                Body::from(v.to_string())
            }
            None => Body::empty(),
        };
        let response = ferrum_server::router(Arc::clone(&self.app))
            .oneshot(req.body(body).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    async fn upload(&self, purpose: &str, content: &str) -> String {
        let boundary = "ferrum-test-boundary";
        let body = format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n{purpose}\r\n\
             --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"f.jsonl\"\r\n\
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
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        v["id"].as_str().expect("uploaded").to_string()
    }

    /// Creates an eval, asserting 201.
    async fn eval(&self, body: Value) -> Value {
        let (status, v) = self.call("POST", "/v1/evals", Some(body)).await;
        assert_eq!(status, StatusCode::CREATED, "{v}");
        v
    }

    /// Creates a run, asserting 201.
    async fn run(&self, eval: &str, data_source: Value) -> Value {
        let (status, v) = self
            .call(
                "POST",
                &format!("/v1/evals/{eval}/runs"),
                Some(json!({"name": "r", "data_source": data_source})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{v}");
        assert_eq!(v["status"], "queued");
        v
    }

    /// Starts the eval worker; it stops when the returned sender is dropped or fires.
    fn worker(&self) -> tokio::sync::watch::Sender<bool> {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        tokio::spawn(ferrum_server::run_eval_worker(
            Arc::clone(&self.app),
            stopped,
        ));
        stop
    }

    /// Polls a run until its status is one of `until` (20 s at most).
    async fn wait(&self, eval: &str, run: &str, until: &[&str]) -> Value {
        for _ in 0..2000 {
            let (_, r) = self
                .call("GET", &format!("/v1/evals/{eval}/runs/{run}"), None)
                .await;
            if until.contains(&r["status"].as_str().unwrap_or("")) {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("run {run} never reached {until:?}");
    }

    async fn items(&self, eval: &str, run: &str, query: &str) -> Value {
        let (status, v) = self
            .call(
                "GET",
                &format!("/v1/evals/{eval}/runs/{run}/output_items?{query}"),
                None,
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{v}");
        v
    }
}

fn qa_schema() -> Value {
    json!({"type": "custom", "item_schema": {
        "type": "object",
        "properties": {"question": {"type": "string"}, "answer": {"type": "string"}},
        "required": ["question", "answer"],
    }, "include_sample_schema": true})
}

fn string_check(input: &str, reference: &str, op: &str) -> Value {
    json!({"type": "string_check", "name": "match", "input": input, "reference": reference,
           "operation": op})
}

fn label_grader() -> Value {
    label_grader_of("Is '{{sample.output_text}}' right for {{item.question}}?")
}

fn label_grader_of(content: &str) -> Value {
    json!({"type": "label_model", "name": "judge", "model": "gpt-4.1-nano",
           "input": [{"role": "user", "content": content}],
           "labels": ["good", "bad"], "passing_labels": ["good"]})
}

fn error_of(v: &Value) -> (&str, &str) {
    (
        v["error"]["param"].as_str().unwrap_or(""),
        v["error"]["message"].as_str().unwrap_or(""),
    )
}

fn content(items: &[(&str, &str, Option<&str>)]) -> Value {
    let list: Vec<Value> = items
        .iter()
        .map(|(q, a, out)| match out {
            Some(o) => json!({"item": {"question": q, "answer": a}, "sample": {"output_text": o}}),
            None => json!({"item": {"question": q, "answer": a}}),
        })
        .collect();
    json!({"type": "file_content", "content": list})
}

#[tokio::test]
async fn eval_objects_validation_update_list_delete() {
    let s = server().await;
    let e = s
        .eval(json!({
            "name": "capitals", "metadata": {"team": "a"},
            "data_source_config": qa_schema(),
            "testing_criteria": [
                string_check("{{sample.output_text}}", "{{item.answer}}", "ilike"),
                {"type": "text_similarity", "name": "close", "input": "{{sample.output_text}}",
                 "reference": "{{item.answer}}", "evaluation_metric": "rouge_l", "pass_threshold": 0.5},
                label_grader(),
                {"type": "score_model", "name": "score", "model": "gpt-4.1-nano",
                 "input": [{"role": "system", "content": "Score {{sample.output_text}}"}],
                 "range": [0, 1], "pass_threshold": 0.5},
            ],
        }))
        .await;
    assert_eq!(e["object"], "eval");
    let schema = &e["data_source_config"]["schema"];
    assert_eq!(schema["required"], json!(["item", "sample"]));
    assert_eq!(
        schema["properties"]["item"]["required"],
        json!(["question", "answer"])
    );
    let criteria = e["testing_criteria"].as_array().unwrap();
    assert_eq!(criteria.len(), 4);
    assert!(criteria[0]["id"].as_str().unwrap().starts_with("match-"));
    assert_eq!(criteria[2]["input"][0]["type"], "message");
    assert_eq!(criteria[2]["input"][0]["content"]["type"], "input_text");
    let id = e["id"].as_str().unwrap();

    // Bad inputs name their parameter.
    let bad =
        |criteria: Value| json!({"data_source_config": qa_schema(), "testing_criteria": criteria});
    for (body, param, words) in [
        (
            bad(json!([{"type": "regex", "name": "x"}])),
            "testing_criteria[0].type",
            "regex",
        ),
        (
            bad(json!([string_check("{{item.nope}}", "x", "eq")])),
            "testing_criteria[0].input",
            "'nope'",
        ),
        (
            bad(
                json!([string_check("x", "{{item.answer}}", "eq"), label_grader(),
                {"type": "label_model", "name": "j", "model": "gpt-4.1-nano",
                 "input": [{"role": "user", "content": "{{item.answr}}"}],
                 "labels": ["a"], "passing_labels": ["a"]}]),
            ),
            "testing_criteria[2].input[0].content",
            "'answr'",
        ),
        (
            bad(
                json!([{"type": "text_similarity", "name": "c", "input": "a", "reference": "b",
                        "evaluation_metric": "meteor", "pass_threshold": 0.5}]),
            ),
            "testing_criteria[0].evaluation_metric",
            "WordNet",
        ),
        (
            bad(json!([{"type": "python", "name": "p", "source": "def grade(): pass"}])),
            "testing_criteria[0].type",
            "Python",
        ),
        (
            bad(json!([string_check("a", "b", "regex")])),
            "testing_criteria[0].operation",
            "regex",
        ),
        (
            bad(
                json!([{"type": "label_model", "name": "j", "model": "gpt-9",
                        "input": [{"role": "user", "content": "x"}],
                        "labels": ["a"], "passing_labels": ["a"]}]),
            ),
            "testing_criteria[0].model",
            "gpt-9",
        ),
        (
            json!({"data_source_config": {"type": "other"}, "testing_criteria": []}),
            "data_source_config.type",
            "other",
        ),
    ] {
        let (status, v) = s.call("POST", "/v1/evals", Some(body)).await;
        assert!(status.is_client_error(), "{v}");
        let (p, message) = error_of(&v);
        assert_eq!(p, param, "{v}");
        assert!(message.contains(words), "{v}");
    }

    // Update, retrieve, list with paging, delete.
    let (status, v) = s
        .call(
            "POST",
            &format!("/v1/evals/{id}"),
            Some(json!({"name": "renamed", "metadata": {"k": "v"}})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["name"], "renamed");
    assert_eq!(v["metadata"], json!({"k": "v"}));
    let second = s
        .eval(json!({"data_source_config": {"type": "stored_completions", "metadata": {"usecase": "x"}},
                     "testing_criteria": [string_check("{{sample.output_text}}", "x", "eq")]}))
        .await;
    assert_eq!(
        second["data_source_config"]["schema"]["required"],
        json!(["item", "sample"])
    );
    let (_, page) = s.call("GET", "/v1/evals?limit=1", None).await;
    assert_eq!(page["data"][0]["id"], id);
    assert_eq!(page["has_more"], true);
    let (_, page) = s
        .call("GET", &format!("/v1/evals?limit=1&after={id}"), None)
        .await;
    assert_eq!(page["data"][0]["id"], second["id"]);
    assert_eq!(page["has_more"], false);
    let (_, page) = s.call("GET", "/v1/evals?order=desc", None).await;
    assert_eq!(page["first_id"], second["id"]);
    let (status, v) = s.call("DELETE", &format!("/v1/evals/{id}"), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        v,
        json!({"object": "eval.deleted", "deleted": true, "eval_id": id})
    );
    let (status, _) = s.call("GET", &format!("/v1/evals/{id}"), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn jsonl_runs_grade_given_samples_and_page_output_items() {
    let s = server().await;
    let e = s
        .eval(json!({"data_source_config": qa_schema(), "testing_criteria": [
            string_check("{{sample.output_text}}", "{{item.answer}}", "ilike"),
            {"type": "text_similarity", "name": "fuzzy", "input": "{{sample.output_text}}",
             "reference": "{{item.answer}}", "evaluation_metric": "fuzzy_match", "pass_threshold": 0.9},
        ]}))
        .await;
    let eval = e["id"].as_str().unwrap();
    let run = s
        .run(
            eval,
            json!({"type": "jsonl", "source": content(&[
                ("France?", "Paris", Some("paris")),
                ("Italy?", "Rome", Some("Rome")),
                ("Spain?", "Madrid", Some("Lisbon")),
            ])}),
        )
        .await;
    assert_eq!(
        run["report_url"],
        format!(
            "http://ferrum.test/v1/evals/{eval}/runs/{}",
            run["id"].as_str().unwrap()
        )
    );
    let run_id = run["id"].as_str().unwrap();
    let _worker = s.worker();
    let done = s.wait(eval, run_id, &["completed"]).await;
    assert_eq!(
        done["result_counts"],
        json!({"total": 3, "errored": 0, "failed": 2, "passed": 1})
    );
    let per = done["per_testing_criteria_results"].as_array().unwrap();
    assert_eq!(
        (per[0]["passed"].clone(), per[0]["failed"].clone()),
        (json!(2), json!(1))
    );
    assert_eq!(
        (per[1]["passed"].clone(), per[1]["failed"].clone()),
        (json!(1), json!(2))
    );
    assert_eq!(done["per_model_usage"], json!([]));

    let all = s.items(eval, run_id, "").await;
    let data = all["data"].as_array().unwrap();
    assert_eq!(data.len(), 3);
    assert_eq!(data[0]["datasource_item_id"], 0);
    assert_eq!(data[0]["datasource_item"]["answer"], "Paris");
    assert_eq!(data[1]["status"], "pass");
    assert_eq!(data[1]["results"][1]["score"], 1.0);
    assert_eq!(data[0]["sample"]["output"][0]["content"], "paris");
    let page = s.items(eval, run_id, "limit=2&order=desc").await;
    assert_eq!(page["data"][0]["datasource_item_id"], 2);
    assert_eq!(page["has_more"], true);
    let failed = s.items(eval, run_id, "status=fail").await;
    assert_eq!(failed["data"].as_array().unwrap().len(), 2);
    let one = data[1]["id"].as_str().unwrap();
    let (status, v) = s
        .call(
            "GET",
            &format!("/v1/evals/{eval}/runs/{run_id}/output_items/{one}"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v, data[1]);

    // The runs list, with a status filter; a finished run cannot be canceled; delete.
    let (_, runs) = s
        .call(
            "GET",
            &format!("/v1/evals/{eval}/runs?status=completed"),
            None,
        )
        .await;
    assert_eq!(runs["data"][0]["id"], run_id);
    let (_, runs) = s
        .call("GET", &format!("/v1/evals/{eval}/runs?status=queued"), None)
        .await;
    assert_eq!(runs["data"], json!([]));
    let (status, v) = s
        .call("POST", &format!("/v1/evals/{eval}/runs/{run_id}"), None)
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    let (status, v) = s
        .call("DELETE", &format!("/v1/evals/{eval}/runs/{run_id}"), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v["object"], "eval.run.deleted");
    let (status, _) = s
        .call("GET", &format!("/v1/evals/{eval}/runs/{run_id}"), None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn completions_runs_sample_and_model_graders_bill_at_batch_price() {
    let s = server().await;
    let e = s
        .eval(json!({"data_source_config": qa_schema(), "testing_criteria": [
            label_grader(),
            {"type": "score_model", "name": "score", "model": "gpt-4.1-nano",
             "input": [{"role": "user", "content": "Rate {{sample.output_text}}"}], "pass_threshold": 0.7},
            string_check("{{sample.output_text}}", "{{item.answer}}", "like"),
        ]}))
        .await;
    let eval = e["id"].as_str().unwrap();
    // The scripted model answers the user line upper-cased: "CAPITAL OF FRANCE? PARIS".
    let run = s
        .run(
            eval,
            json!({"type": "completions", "model": "gpt-4.1-nano",
                   "input_messages": {"type": "template", "template": [
                       {"role": "system", "content": "Answer."},
                       {"role": "user", "content": "capital of {{item.question}} {{item.answer}}"}]},
                   "sampling_params": {"temperature": 0, "max_completion_tokens": 32, "seed": 7},
                   "source": content(&[("France?", "PARIS", None), ("Peru?", "lima", None)])}),
        )
        .await;
    assert_eq!(run["model"], "gpt-4.1-nano");
    let run_id = run["id"].as_str().unwrap();
    let _worker = s.worker();
    let done = s.wait(eval, run_id, &["completed"]).await;
    // Item 0: "CAPITAL OF FRANCE? PARIS" contains PARIS, judged good, scored 0.75: pass.
    // Item 1: "CAPITAL OF PERU? LIMA" lacks "lima" and is judged bad: fail.
    assert_eq!(
        done["result_counts"],
        json!({"total": 2, "errored": 0, "failed": 1, "passed": 1}),
        "{done}"
    );
    let usage = &done["per_model_usage"][0];
    assert_eq!(usage["model_name"], "gpt-4.1-nano");
    // One sample and two model graders per item.
    assert_eq!(usage["invocation_count"], 6);
    let items = s.items(eval, run_id, "").await;
    let first = &items["data"][0];
    assert_eq!(
        first["sample"]["output"][0]["content"],
        "CAPITAL OF FRANCE? PARIS"
    );
    assert_eq!(
        first["sample"]["input"][1]["content"],
        "capital of France? PARIS"
    );
    assert_eq!(first["sample"]["seed"], 7);
    assert_eq!(first["sample"]["max_completion_tokens"], 32);
    assert_eq!(first["results"][0]["passed"], true);
    assert_eq!(first["results"][1]["score"], 0.75);
    assert_eq!(
        first["results"][0]["sample"]["output"][0]["content"],
        "{\"label\": \"good\"}"
    );
    assert_eq!(items["data"][1]["results"][0]["passed"], false);

    // Billed once per call at half the tier's price, under the batch flag.
    let totals = s.store.usage_totals(None).await.unwrap();
    assert_eq!(totals.len(), 1);
    assert_eq!(totals[0].requests, 6);
    let tier = s.app.models.resolve("gpt-4.1-nano").unwrap();
    let full = tier.price.cost_usd(
        totals[0].prompt_tokens,
        totals[0].cached_tokens,
        totals[0].completion_tokens,
    );
    assert!((totals[0].cost_usd - full / 2.0).abs() < 1e-12);
    assert_eq!(usage["prompt_tokens"], totals[0].prompt_tokens);
}

#[tokio::test]
async fn responses_and_stored_completions_sources() {
    let s = server().await;
    for (i, (q, a)) in [("Q1", "Paris"), ("Q2", "Berlin")].iter().enumerate() {
        let request = json!({"model": "gpt-4.1", "messages": [{"role": "user", "content": q}]});
        let response = json!({"model": "gpt-4.1", "choices": [{"index": 0, "finish_reason": "stop",
            "message": {"role": "assistant", "content": a}}], "usage": {"prompt_tokens": 3,
            "completion_tokens": 1, "total_tokens": 4}});
        s.store
            .insert_completion(&StoredCompletion {
                id: format!("chatcmpl-{i}"),
                created: 1000 + i as i64,
                model: "gpt-4.1".into(),
                metadata: vec![("task".into(), "capitals".into())],
                request: request.to_string(),
                response: response.to_string(),
            })
            .await
            .unwrap();
    }
    let e = s
        .eval(json!({"data_source_config": {"type": "stored_completions", "metadata": {"task": "capitals"}},
                     "testing_criteria": [label_grader_of("Is '{{sample.output_text}}' right?")]}))
        .await;
    let eval = e["id"].as_str().unwrap();
    let _worker = s.worker();

    // The stored answers graded as they are.
    let stored = s
        .run(eval, json!({"type": "completions", "source": {"type": "stored_completions", "metadata": {"task": "capitals"}}}))
        .await;
    let done = s
        .wait(eval, stored["id"].as_str().unwrap(), &["completed"])
        .await;
    assert_eq!(
        done["result_counts"],
        json!({"total": 2, "errored": 0, "failed": 1, "passed": 1}),
        "{done}"
    );

    // Nano re-answers the stored prompts (item.input) and is graded against them.
    let again = s
        .run(eval, json!({"type": "completions", "model": "gpt-4.1-nano",
                          "input_messages": {"type": "item_reference", "item_reference": "item.input"},
                          "source": {"type": "stored_completions", "metadata": {"task": "capitals"}, "limit": 1}}))
        .await;
    let done = s
        .wait(eval, again["id"].as_str().unwrap(), &["completed"])
        .await;
    assert_eq!(done["result_counts"]["total"], 1);
    let items = s.items(eval, again["id"].as_str().unwrap(), "").await;
    assert_eq!(items["data"][0]["sample"]["output"][0]["content"], "Q1");

    // The Responses API as the sampler.
    let e2 = s
        .eval(
            json!({"data_source_config": qa_schema(), "testing_criteria": [
            string_check("{{sample.output_text}}", "{{item.answer}}", "eq")]}),
        )
        .await;
    let eval2 = e2["id"].as_str().unwrap();
    let run = s
        .run(
            eval2,
            json!({"type": "responses", "model": "gpt-4.1-nano",
                           "input_messages": {"type": "template", "template": [
                               {"role": "user", "content": "{{item.question}}"}]},
                           "sampling_params": {"max_completion_tokens": 16},
                           "source": content(&[("hi", "HI", None), ("yo", "no", None)])}),
        )
        .await;
    let done = s
        .wait(eval2, run["id"].as_str().unwrap(), &["completed"])
        .await;
    assert_eq!(
        done["result_counts"],
        json!({"total": 2, "errored": 0, "failed": 1, "passed": 1}),
        "{done}"
    );
    assert_eq!(done["per_model_usage"][0]["invocation_count"], 2);
}

#[tokio::test]
async fn bad_files_and_bad_data_sources() {
    let s = server().await;
    let e = s
        .eval(
            json!({"data_source_config": qa_schema(), "testing_criteria": [
            string_check("{{sample.output_text}}", "{{item.answer}}", "eq")]}),
        )
        .await;
    let eval = e["id"].as_str().unwrap();
    let good = json!({"item": {"question": "a", "answer": "b"}}).to_string();
    let bad_file = s
        .upload("evals", &format!("{good}\n{{not json\n{good}\n"))
        .await;
    let wrong_shape = s
        .upload(
            "evals",
            &format!("{good}\n{}\n", json!({"item": {"question": "a"}})),
        )
        .await;
    for (source, param, words) in [
        (
            json!({"type": "file_id", "id": bad_file}),
            "data_source.source.id",
            "Line 2",
        ),
        (
            json!({"type": "file_id", "id": wrong_shape}),
            "data_source.source.id",
            "'answer'",
        ),
        (
            json!({"type": "file_id", "id": "file-nope"}),
            "data_source.source.id",
            "file-nope",
        ),
        (
            json!({"type": "file_content", "content": [{"item": {"question": 1, "answer": "x"}}]}),
            "data_source.source.content[0]",
            "item.question",
        ),
    ] {
        let (status, v) = s
            .call(
                "POST",
                &format!("/v1/evals/{eval}/runs"),
                Some(json!({"data_source": {"type": "jsonl", "source": source}})),
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
        let (p, message) = error_of(&v);
        assert_eq!(p, param, "{v}");
        assert!(message.contains(words), "{v}");
    }
    let (status, v) = s
        .call(
            "POST",
            &format!("/v1/evals/{eval}/runs"),
            Some(json!({"data_source": {"type": "completions", "source": content(&[("a", "b", None)])}})),
        )
        .await;
    assert_eq!(
        (status, error_of(&v).0),
        (StatusCode::BAD_REQUEST, "data_source.model")
    );

    // A file removed after the run was created fails the run, with the reason.
    let file = s.upload("evals", &format!("{good}\n")).await;
    let run = s
        .run(
            eval,
            json!({"type": "jsonl", "source": {"type": "file_id", "id": file}}),
        )
        .await;
    let (status, _) = s.call("DELETE", &format!("/v1/files/{file}"), None).await;
    assert_eq!(status, StatusCode::OK);
    let _worker = s.worker();
    let failed = s.wait(eval, run["id"].as_str().unwrap(), &["failed"]).await;
    assert_eq!(failed["error"]["code"], "file_not_found");
    assert!(failed["error"]["message"].as_str().unwrap().contains(&file));
}

#[tokio::test]
async fn cancel_stops_a_run() {
    let s = server().await;
    let e = s
        .eval(
            json!({"data_source_config": qa_schema(), "testing_criteria": [
            string_check("{{sample.output_text}}", "{{item.answer}}", "eq")]}),
        )
        .await;
    let eval = e["id"].as_str().unwrap();
    let run = s
        .run(
            eval,
            json!({"type": "jsonl", "source": content(&[("a", "b", Some("b"))])}),
        )
        .await;
    let run_id = run["id"].as_str().unwrap();
    let (status, v) = s
        .call("POST", &format!("/v1/evals/{eval}/runs/{run_id}"), None)
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["status"], "canceled");
    let _worker = s.worker();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (_, v) = s
        .call("GET", &format!("/v1/evals/{eval}/runs/{run_id}"), None)
        .await;
    assert_eq!(v["status"], "canceled");
    assert_eq!(v["result_counts"]["total"], 0);
}

#[tokio::test]
async fn a_dead_workers_items_are_graded_once_by_the_next() {
    let s = server().await;
    let e = s
        .eval(json!({"data_source_config": qa_schema(), "testing_criteria": [label_grader()]}))
        .await;
    let eval = e["id"].as_str().unwrap().to_string();
    let items: Vec<(&str, &str, Option<&str>)> = (0..6)
        .map(|_| ("France?", "Paris", Some("Paris")))
        .collect();
    let run = s
        .run(&eval, json!({"type": "jsonl", "source": content(&items)}))
        .await;
    let run_id = run["id"].as_str().unwrap().to_string();
    // A worker that reads the run and claims half its items, then dies (it never writes).
    let dead = "dead-worker";
    let now_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64
    };
    let claimed = s
        .store
        .claim_run(dead, now_ms(), 600)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(claimed.id, run_id);
    let new_items: Vec<ferrum_store::NewItem> = (0..6)
        .map(|_| ferrum_store::NewItem {
            item: json!({"question": "France?", "answer": "Paris"}).to_string(),
            given: Some(json!({"output_text": "Paris"}).to_string()),
        })
        .collect();
    assert!(s.store.start_run(&run_id, dead, &new_items).await.unwrap());
    let taken = s.store.claim_items(dead, now_ms(), 600, 3).await.unwrap();
    assert_eq!(taken.len(), 3);

    // A restarted server on the same database grades the rest at once and the dead worker's
    // items once their lease runs out.
    let dir = s.dir;
    drop(s.app);
    let s = server_on(dir).await;
    let _worker = s.worker();
    let done = s.wait(&eval, &run_id, &["completed"]).await;
    assert_eq!(
        done["result_counts"],
        json!({"total": 6, "errored": 0, "failed": 0, "passed": 6})
    );
    assert_eq!(done["per_model_usage"][0]["invocation_count"], 6);
    let totals = s.store.usage_totals(None).await.unwrap();
    assert_eq!(totals[0].requests, 6);
    // The dead worker's late write is refused.
    let late = ferrum_store::ItemResult {
        outcome: ferrum_store::ItemOutcome::Fail,
        created_at: 0,
        results: "[]".into(),
        sample: "{}".into(),
        usage: vec![],
        criteria: vec![],
        ledger: vec![],
    };
    assert!(!s.store.finish_item(dead, &taken[0], &late).await.unwrap());
    let listed = s.items(&eval, &run_id, "limit=100").await;
    let ids: std::collections::BTreeSet<i64> = listed["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["datasource_item_id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, (0..6).collect());
}
