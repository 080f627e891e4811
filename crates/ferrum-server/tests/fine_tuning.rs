//! The fine-tuning API over the `Engine` seam (axum `oneshot`, no weights): request
//! validation, the job object, listing and paging with metadata filters, events and
//! checkpoints, cancel / pause / resume, the runner's file validation (a bad line named by its
//! number, too few examples), fine-tuned models in `/v1/models` and their deletion, and a job
//! trained end to end on a tiny random-weight model whose `ft:` model then answers in chat
//! with its adapter.

mod common;

use std::ops::ControlFlow;
use std::sync::{Arc, Mutex};
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
use ferrum_store::{FineTunedModel, NewEvent, Store};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

/// Answers every request with "ok", and records the adapter each ran with.
struct Echo {
    model: Arc<LoadedModel>,
    stats: EngineStats,
    adapters: Mutex<Vec<Option<String>>>,
}

impl Engine for Echo {
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
        self.adapters
            .lock()
            .unwrap()
            .push(request.adapter.as_ref().map(|a| a.name().to_string()));
        let model = Arc::clone(&self.model);
        std::thread::spawn(move || {
            let sink = &mut request.sink;
            if sink(Event::Started).is_break() {
                return;
            }
            let tokens = model.tokenizer.encode("ok", false, false).unwrap();
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
                text: "ok".into(),
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
    engine: Arc<Echo>,
    _dir: tempfile::TempDir,
}

async fn server() -> Server {
    server_with(|_| Registry::embedded_default()).await
}

/// A server whose registry `registry` makes, given the directory holding the tiny model.
async fn server_with(registry: impl FnOnce(&std::path::Path) -> Registry) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    let tiny = TinyModel {
        context_length: 512,
        ..TinyModel::default()
    };
    tiny.write_chat(&path).unwrap();
    let model = LoadedModel::load(&path, &LoadOptions::default()).unwrap();
    let engine = Arc::new(Echo {
        model: Arc::new(model),
        stats: EngineStats::default(),
        adapters: Mutex::default(),
    });
    let url = format!("sqlite://{}", dir.path().join("ferrum.db").display());
    let store = Store::connect(&url).await.unwrap();
    let config = common::config(dir.path());
    let app = ferrum_server::app(registry(dir.path()), store, config);
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
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(status, StatusCode::OK, "{v}");
        v["id"].as_str().unwrap().to_string()
    }

    async fn call(&self, method: &str, uri: &str, body: Option<Value>) -> (StatusCode, Value) {
        let (status, _, bytes) = common::send(&self.app, method, uri, None, body).await;
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    async fn create(&self, body: Value) -> (StatusCode, Value) {
        self.call("POST", "/v1/fine_tuning/jobs", Some(body)).await
    }

    /// Polls a job until its status is one of `until` (10 s at most).
    async fn wait(&self, id: &str, until: &[&str]) -> Value {
        for _ in 0..1000 {
            let (_, job) = self
                .call("GET", &format!("/v1/fine_tuning/jobs/{id}"), None)
                .await;
            if until.contains(&job["status"].as_str().unwrap_or("")) {
                return job;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("job {id} never reached {until:?}");
    }

    /// Starts the fine-tuning runner; it stops when the returned sender is dropped or fires.
    fn runner(&self) -> tokio::sync::watch::Sender<bool> {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        tokio::spawn(ferrum_server::run_fine_tuning_worker(
            Arc::clone(&self.app),
            stopped,
        ));
        stop
    }

    /// Every event message of a job, oldest first (paging through the list).
    async fn messages(&self, id: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut after = String::new();
        loop {
            let (status, list) = self
                .call(
                    "GET",
                    &format!("/v1/fine_tuning/jobs/{id}/events?limit=100&after={after}"),
                    None,
                )
                .await;
            assert_eq!(status, StatusCode::OK, "{list}");
            for e in list["data"].as_array().unwrap() {
                out.push(e["message"].as_str().unwrap().to_string());
                after = e["id"].as_str().unwrap().to_string();
            }
            if list["has_more"] != true {
                break;
            }
        }
        out.reverse();
        out
    }
}

/// A chat example the tiny model's ChatML template renders.
fn example(i: usize) -> Value {
    json!({"messages": [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": format!("Q{i}?")},
        {"role": "assistant", "content": format!("A{i}")},
    ]})
}

fn jsonl(lines: impl IntoIterator<Item = Value>) -> String {
    lines
        .into_iter()
        .map(|l| l.to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

fn error_of(v: &Value) -> (&str, &str, &str) {
    let e = &v["error"];
    (
        e["param"].as_str().unwrap_or(""),
        e["code"].as_str().unwrap_or(""),
        e["message"].as_str().unwrap_or(""),
    )
}

#[tokio::test]
async fn bad_requests_name_the_parameter_at_fault() {
    let s = server().await;
    let train = s.upload("fine-tune", &jsonl((0..12).map(example))).await;
    let batch_file = s
        .upload(
            "batch",
            r#"{"custom_id":"a","method":"POST","url":"/v1/chat/completions","body":{}}"#,
        )
        .await;
    let cases: Vec<(Value, &str, &str)> = vec![
        (
            json!({"training_file": train}),
            "model",
            "missing_required_parameter",
        ),
        (
            json!({"model": "gpt-4.1-nano"}),
            "training_file",
            "missing_required_parameter",
        ),
        (
            json!({"model": "gpt-9", "training_file": train}),
            "model",
            "model_not_available",
        ),
        (
            json!({"model": "ft:gpt-4.1-nano:ferrum::abc", "training_file": train}),
            "model",
            "model_not_available",
        ),
        (
            json!({"model": "gpt-4.1-nano", "training_file": "file-nope"}),
            "training_file",
            "invalid_value",
        ),
        (
            json!({"model": "gpt-4.1-nano", "training_file": batch_file}),
            "training_file",
            "invalid_file_purpose",
        ),
        (
            json!({"model": "gpt-4.1-nano", "training_file": train, "validation_file": "file-nope"}),
            "validation_file",
            "invalid_value",
        ),
        (
            json!({"model": "gpt-4.1-nano", "training_file": train,
                   "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 0}}}}),
            "method.supervised.hyperparameters.n_epochs",
            "integer_below_min_value",
        ),
        (
            json!({"model": "gpt-4.1-nano", "training_file": train, "hyperparameters": {"n_epochs": 51}}),
            "hyperparameters.n_epochs",
            "integer_above_max_value",
        ),
        (
            json!({"model": "gpt-4.1-nano", "training_file": train, "hyperparameters": {"batch_size": "big"}}),
            "hyperparameters.batch_size",
            "invalid_value",
        ),
        (
            json!({"model": "gpt-4.1-nano", "training_file": train, "hyperparameters": {"learning_rate_multiplier": 0}}),
            "hyperparameters.learning_rate_multiplier",
            "decimal_below_min_value",
        ),
        (
            json!({"model": "gpt-4.1-nano", "training_file": train, "method": {"type": "dpo"}}),
            "method.type",
            "unsupported_value",
        ),
        (
            json!({"model": "gpt-4.1-nano", "training_file": train, "method": {"type": "sft"}}),
            "method.type",
            "invalid_value",
        ),
        (
            json!({"model": "gpt-4.1-nano", "training_file": train, "suffix": "x".repeat(65)}),
            "suffix",
            "invalid_value",
        ),
        (
            json!({"model": "gpt-4.1-nano", "training_file": train, "suffix": "a:b"}),
            "suffix",
            "invalid_value",
        ),
        (
            json!({"model": "gpt-4.1-nano", "training_file": train, "seed": -1}),
            "seed",
            "integer_below_min_value",
        ),
        (
            json!({"model": "gpt-4.1-nano", "training_file": train,
                   "integrations": [{"type": "wandb", "wandb": {"project": "p"}}]}),
            "integrations",
            "unsupported_parameter",
        ),
    ];
    for (body, param, code) in cases {
        let (status, v) = s.create(body.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {v}");
        let (p, c, m) = error_of(&v);
        assert_eq!((p, c), (param, code), "{body}: {m}");
    }
    let (status, v) = s
        .create(json!({"model": "gpt-4.1-nano", "training_file": train, "epochs": 3}))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(v["error"]["code"], "unknown_parameter");
    // Nothing was created.
    let (_, list) = s.call("GET", "/v1/fine_tuning/jobs", None).await;
    assert_eq!(list["data"], json!([]));
}

#[tokio::test]
async fn jobs_are_created_listed_paged_filtered_and_cancelled() {
    let s = server().await;
    let train = s.upload("fine-tune", &jsonl((0..12).map(example))).await;
    let (status, job) = s
        .create(json!({
            "model": "gpt-4.1-nano",
            "training_file": train,
            "suffix": "my-suffix",
            "seed": 7,
            "metadata": {"team": "a"},
            "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2}}},
        }))
        .await;
    assert_eq!(status, StatusCode::OK, "{job}");
    let id = job["id"].as_str().unwrap().to_string();
    assert!(id.starts_with("ftjob-"));
    assert_eq!(job["object"], "fine_tuning.job");
    assert_eq!(job["status"], "validating_files");
    assert_eq!(job["model"], "gpt-4.1-nano-2025-04-14");
    assert_eq!(job["seed"], 7);
    assert_eq!(job["training_file"], train);
    assert_eq!(job["validation_file"], Value::Null);
    assert_eq!(job["fine_tuned_model"], Value::Null);
    assert_eq!(job["finished_at"], Value::Null);
    assert_eq!(job["trained_tokens"], Value::Null);
    assert_eq!(job["error"], Value::Null);
    assert_eq!(job["result_files"], json!([]));
    assert_eq!(job["metadata"], json!({"team": "a"}));
    assert_eq!(job["organization_id"], "org-ferrum");
    let hyper = json!({"n_epochs": 2, "batch_size": "auto", "learning_rate_multiplier": "auto"});
    assert_eq!(job["hyperparameters"], hyper);
    assert_eq!(
        job["method"],
        json!({"type": "supervised", "supervised": {"hyperparameters": hyper}})
    );
    // A seed is chosen when none is given; the legacy `hyperparameters` are accepted too.
    let mut ids = vec![id.clone()];
    for team in ["b", "a"] {
        let (status, j) = s
            .create(
                json!({"model": "gpt-4.1-nano-2025-04-14", "training_file": train,
                           "hyperparameters": {"n_epochs": "auto", "batch_size": 2},
                           "metadata": {"team": team}}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{j}");
        assert!(j["seed"].as_i64().unwrap() >= 0);
        assert_eq!(j["hyperparameters"]["batch_size"], 2);
        ids.push(j["id"].as_str().unwrap().to_string());
    }
    // Newest first, two at a time.
    let (_, page1) = s.call("GET", "/v1/fine_tuning/jobs?limit=2", None).await;
    let got: Vec<&str> = page1["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap())
        .collect();
    assert_eq!(got, [ids[2].as_str(), ids[1].as_str()]);
    assert_eq!(page1["has_more"], true);
    let (_, page2) = s
        .call(
            "GET",
            &format!("/v1/fine_tuning/jobs?limit=2&after={}", ids[1]),
            None,
        )
        .await;
    assert_eq!(page2["data"][0]["id"], ids[0].as_str());
    assert_eq!(page2["has_more"], false);
    let (_, team_a) = s
        .call("GET", "/v1/fine_tuning/jobs?metadata[team]=a", None)
        .await;
    let got: Vec<&str> = team_a["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap())
        .collect();
    assert_eq!(got, [ids[2].as_str(), ids[0].as_str()]);
    let (status, v) = s
        .call("GET", "/v1/fine_tuning/jobs?after=ftjob-nope", None)
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");

    let (status, got) = s
        .call("GET", &format!("/v1/fine_tuning/jobs/{id}"), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(got, job);
    let (status, v) = s.call("GET", "/v1/fine_tuning/jobs/ftjob-nope", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{v}");
    for op in ["cancel", "pause", "resume"] {
        let (status, _) = s
            .call(
                "POST",
                &format!("/v1/fine_tuning/jobs/ftjob-nope/{op}"),
                None,
            )
            .await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{op}");
    }
    let (status, _) = s
        .call("GET", "/v1/fine_tuning/jobs/ftjob-nope/events", None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // A job waiting for validation (no runner here) is cancelled at once; a cancelled job
    // cancels again as it is, and cannot be paused or resumed.
    let (status, cancelled) = s
        .call("POST", &format!("/v1/fine_tuning/jobs/{id}/cancel"), None)
        .await;
    assert_eq!(status, StatusCode::OK, "{cancelled}");
    assert_eq!(cancelled["status"], "cancelled");
    assert!(cancelled["finished_at"].is_i64());
    let (status, again) = s
        .call("POST", &format!("/v1/fine_tuning/jobs/{id}/cancel"), None)
        .await;
    assert_eq!(
        (status, &again["status"]),
        (StatusCode::OK, &json!("cancelled"))
    );
    for op in ["pause", "resume"] {
        let (status, v) = s
            .call("POST", &format!("/v1/fine_tuning/jobs/{id}/{op}"), None)
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{op}: {v}");
        assert_eq!(v["error"]["code"], "invalid_state");
    }
    assert_eq!(
        s.messages(&id).await,
        [
            format!("Created fine-tuning job: {id}"),
            "Fine-tuning job cancelled".to_string()
        ]
    );
}

#[tokio::test]
async fn a_queued_job_pauses_resumes_and_cancels() {
    let s = server().await;
    let train = s.upload("fine-tune", &jsonl((0..12).map(example))).await;
    let (_, job) = s
        .create(json!({"model": "gpt-4.1-nano", "training_file": train}))
        .await;
    let id = job["id"].as_str().unwrap();
    // Validated by hand (no runner, so it stays queued).
    let store = &s.app.store;
    store
        .claim_fine_tuning_validation("w", 0, 60_000)
        .await
        .unwrap()
        .unwrap();
    assert!(store
        .queue_fine_tuning_job(id, "w", "{}", "{}", &NewEvent::info("validated"), 0)
        .await
        .unwrap());
    let (status, paused) = s
        .call("POST", &format!("/v1/fine_tuning/jobs/{id}/pause"), None)
        .await;
    assert_eq!(
        (status, &paused["status"]),
        (StatusCode::OK, &json!("paused"))
    );
    let (status, resumed) = s
        .call("POST", &format!("/v1/fine_tuning/jobs/{id}/resume"), None)
        .await;
    assert_eq!(
        (status, &resumed["status"]),
        (StatusCode::OK, &json!("queued"))
    );
    let (status, v) = s
        .call("POST", &format!("/v1/fine_tuning/jobs/{id}/resume"), None)
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    let (status, cancelled) = s
        .call("POST", &format!("/v1/fine_tuning/jobs/{id}/cancel"), None)
        .await;
    assert_eq!(
        (status, &cancelled["status"]),
        (StatusCode::OK, &json!("cancelled"))
    );
    assert_eq!(
        s.messages(id).await[2..],
        [
            "Fine-tuning job paused",
            "Fine-tuning job resumed",
            "Fine-tuning job cancelled"
        ]
    );
}

#[tokio::test]
async fn events_and_checkpoints_page_newest_first() {
    let s = server().await;
    let train = s.upload("fine-tune", &jsonl((0..12).map(example))).await;
    let (_, job) = s
        .create(json!({"model": "gpt-4.1-nano", "training_file": train}))
        .await;
    let id = job["id"].as_str().unwrap();
    let store = &s.app.store;
    for i in 0..4 {
        store
            .add_fine_tuning_event(id, &NewEvent::info(format!("e{i}")), 0)
            .await
            .unwrap();
    }
    let (status, page) = s
        .call(
            "GET",
            &format!("/v1/fine_tuning/jobs/{id}/events?limit=2"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert_eq!(page["object"], "list");
    assert_eq!(page["has_more"], true);
    let e = &page["data"][0];
    assert_eq!(e["object"], "fine_tuning.job.event");
    assert!(e["id"].as_str().unwrap().starts_with("ftevent-"));
    assert_eq!(
        (&e["message"], &e["level"], &e["type"]),
        (&json!("e3"), &json!("info"), &json!("message"))
    );
    assert_eq!(e["data"], json!({}));
    let after = page["data"][1]["id"].as_str().unwrap();
    let (_, rest) = s
        .call(
            "GET",
            &format!("/v1/fine_tuning/jobs/{id}/events?after={after}"),
            None,
        )
        .await;
    let msgs: Vec<&str> = rest["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["message"].as_str().unwrap())
        .collect();
    assert_eq!(
        msgs,
        ["e1", "e0", &format!("Created fine-tuning job: {id}")]
    );
    assert_eq!(rest["has_more"], false);

    // Checkpoints, written as the runner writes them.
    let (_, empty) = s
        .call(
            "GET",
            &format!("/v1/fine_tuning/jobs/{id}/checkpoints"),
            None,
        )
        .await;
    assert_eq!(
        (&empty["data"], &empty["has_more"]),
        (&json!([]), &json!(false))
    );
    store
        .claim_fine_tuning_validation("w", 0, 60_000)
        .await
        .unwrap();
    store
        .queue_fine_tuning_job(id, "w", "{}", "{}", &NewEvent::info("validated"), 0)
        .await
        .unwrap();
    store.claim_fine_tuning_run("w", 0, 60_000).await.unwrap();
    for step in [3u64, 6] {
        let ckpt = ferrum_store::CheckpointRecord {
            id: format!("ftckpt_{step}"),
            job_id: id.to_string(),
            created_at: 1,
            step_number: step,
            epoch: step / 3,
            metrics: json!({"step": step, "train_loss": 0.5, "train_mean_token_accuracy": 0.9})
                .to_string(),
            fine_tuned_model_checkpoint: format!("ft:x:ferrum::y:ckpt-step-{step}"),
            adapter_blob: "a".into(),
            state_blob: "s".into(),
        };
        assert!(store
            .record_fine_tuning_checkpoint("w", &ckpt, step, &NewEvent::info("ckpt"))
            .await
            .unwrap());
    }
    let (status, page) = s
        .call(
            "GET",
            &format!("/v1/fine_tuning/jobs/{id}/checkpoints?limit=1"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{page}");
    let c = &page["data"][0];
    assert_eq!(c["object"], "fine_tuning.job.checkpoint");
    assert_eq!(c["step_number"], 6);
    assert_eq!(c["fine_tuning_job_id"], id);
    assert_eq!(c["metrics"]["train_loss"], 0.5);
    assert_eq!(page["first_id"], "ftckpt_6");
    assert_eq!(page["has_more"], true);
    let (_, rest) = s
        .call(
            "GET",
            &format!("/v1/fine_tuning/jobs/{id}/checkpoints?after=ftckpt_6"),
            None,
        )
        .await;
    assert_eq!(rest["data"][0]["step_number"], 3);
    assert_eq!(rest["has_more"], false);
}

#[tokio::test]
async fn the_runner_fails_jobs_on_bad_files_naming_the_line() {
    let s = server().await;
    let _runner = s.runner();
    let few = s.upload("fine-tune", &jsonl((0..5).map(example))).await;
    // Line 3 passes the upload's shape check but not training's: weights are 0 or 1.
    let mut lines: Vec<Value> = (0..12).map(example).collect();
    lines[2]["messages"][2]["weight"] = json!(2);
    let bad_line = s.upload("fine-tune", &jsonl(lines)).await;
    let long = s
        .upload(
            "fine-tune",
            &jsonl((0..12).map(|i| {
                if i == 4 {
                    json!({"messages": [{"role": "user", "content": "x".repeat(600)},
                                        {"role": "assistant", "content": "y"}]})
                } else {
                    example(i)
                }
            })),
        )
        .await;
    let good = s.upload("fine-tune", &jsonl((0..12).map(example))).await;
    let cases = [
        (
            few.clone(),
            None,
            "training_file",
            "invalid_training_file",
            "has 5 example(s), but must have at least 10",
        ),
        (
            bad_line.clone(),
            None,
            "training_file",
            "invalid_training_file",
            "Line 3: messages[2].weight must be 0 or 1",
        ),
        (
            long,
            None,
            "training_file",
            "invalid_training_file",
            "Line 5: the example has",
        ),
        (
            good,
            Some(bad_line),
            "validation_file",
            "invalid_validation_file",
            "Line 3: messages[2]",
        ),
    ];
    for (train, valid, param, code, says) in cases {
        let mut body = json!({"model": "gpt-4.1-nano", "training_file": train});
        if let Some(v) = valid {
            body["validation_file"] = json!(v);
        }
        let (status, job) = s.create(body).await;
        assert_eq!(status, StatusCode::OK, "{job}");
        let id = job["id"].as_str().unwrap();
        let job = s
            .wait(id, &["failed", "queued", "running", "succeeded"])
            .await;
        assert_eq!(job["status"], "failed", "{job}");
        assert_eq!(job["error"]["code"], code, "{job}");
        assert_eq!(job["error"]["param"], param, "{job}");
        let message = job["error"]["message"].as_str().unwrap();
        assert!(message.contains(says), "{message}");
        assert!(job["finished_at"].is_i64());
        let messages = s.messages(id).await;
        assert!(
            messages[1].starts_with("Validating training file"),
            "{messages:?}"
        );
        assert!(messages.last().unwrap().contains(says), "{messages:?}");
    }
}

#[tokio::test]
async fn fine_tuned_models_are_listed_retrieved_and_deleted() {
    let s = server().await;
    let id = "ft:gpt-4.1-nano-2025-04-14:ferrum:x:abcdefgh";
    s.app
        .store
        .create_fine_tuning_job(
            &ferrum_store::JobRecord {
                id: "ftjob-abcdefgh".into(),
                created_at: 1,
                model: "gpt-4.1-nano-2025-04-14".into(),
                base_tier: "gpt-4.1-nano".into(),
                training_file: "file-x".into(),
                validation_file: None,
                status: ferrum_store::JobStatus::Running,
                hyperparameters: "{}".into(),
                method: "{}".into(),
                seed: 0,
                suffix: Some("x".into()),
                metadata: None,
                error: None,
                fine_tuned_model: None,
                trained_tokens: None,
                estimated_finish: None,
                finished_at: None,
                result_files: Vec::new(),
            },
            &NewEvent::info("created"),
        )
        .await
        .unwrap();
    // Registered as a finished job registers it.
    s.app.store.claim_fine_tuning_run("w", 0, 1).await.unwrap();
    let success = ferrum_store::JobSuccess {
        model: FineTunedModel {
            id: id.into(),
            created: 1_750_000_000,
            base_tier: "gpt-4.1-nano".into(),
            job_id: "ftjob-abcdefgh".into(),
            adapter_blob: "ftjob-abcdefgh-model".into(),
            deleted: false,
        },
        result_file: None,
        trained_tokens: 10,
        usage: None,
        events: Vec::new(),
        now: 2,
    };
    assert!(s
        .app
        .store
        .succeed_fine_tuning_job("ftjob-abcdefgh", "w", &success)
        .await
        .unwrap());
    let (_, list) = s.call("GET", "/v1/models", None).await;
    let found: Vec<&Value> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["id"] == id)
        .collect();
    assert_eq!(
        found,
        [&json!({"id": id, "object": "model", "created": 1_750_000_000, "owned_by": "ferrum"})]
    );
    let uri = format!("/v1/models/{id}");
    let (status, m) = s.call("GET", &uri, None).await;
    assert_eq!((status, &m["id"]), (StatusCode::OK, &json!(id)));
    let (status, deleted) = s.call("DELETE", &uri, None).await;
    assert_eq!(status, StatusCode::OK, "{deleted}");
    assert_eq!(
        deleted,
        json!({"id": id, "object": "model", "deleted": true})
    );
    let (status, v) = s.call("GET", &uri, None).await;
    assert_eq!(
        (status, &v["error"]["code"]),
        (StatusCode::NOT_FOUND, &json!("model_not_found"))
    );
    let (status, _) = s.call("DELETE", &uri, None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (_, list) = s.call("GET", "/v1/models", None).await;
    assert!(!list["data"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["id"] == id));
    // A deleted model no longer answers.
    let (status, v) = s
        .call(
            "POST",
            "/v1/chat/completions",
            Some(json!({"model": id, "messages": [{"role": "user", "content": "hi"}]})),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{v}");
    // Base tiers are not deletable; unknown ids are not found.
    let (status, v) = s.call("DELETE", "/v1/models/gpt-4.1-nano", None).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{v}");
    assert_eq!(v["error"]["code"], "model_not_deletable");
    let (status, _) = s.call("DELETE", "/v1/models/gpt-9", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = s.call("DELETE", "/v1/models/ft:nope", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

/// The whole path on the tiny random-weight model: validation, training with metrics events and
/// a checkpoint per epoch, the results file, the model registered and billed, then the `ft:`
/// model answering in chat with its adapter, at the fine-tuned price.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_trains_and_its_model_answers_with_the_adapter() {
    let s = server().await;
    let _runner = s.runner();
    let train = s.upload("fine-tune", &jsonl((0..10).map(example))).await;
    let valid = s.upload("fine-tune", &jsonl((10..12).map(example))).await;
    let (status, job) = s
        .create(json!({
            "model": "gpt-4.1-nano",
            "training_file": train,
            "validation_file": valid,
            "suffix": "tiny",
            "method": {"type": "supervised", "supervised": {"hyperparameters":
                {"n_epochs": 2, "batch_size": 5}}},
        }))
        .await;
    assert_eq!(status, StatusCode::OK, "{job}");
    let id = job["id"].as_str().unwrap();
    let job = s.wait(id, &["succeeded", "failed", "cancelled"]).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let model = job["fine_tuned_model"].as_str().unwrap();
    assert!(
        model.starts_with("ft:gpt-4.1-nano-2025-04-14:ferrum:tiny:"),
        "{model}"
    );
    assert!(job["trained_tokens"].as_u64().unwrap() > 0);
    assert_eq!(job["hyperparameters"]["n_epochs"], 2);
    assert_eq!(job["hyperparameters"]["learning_rate_multiplier"], 2.0);
    let messages = s.messages(id).await;
    let steps = messages.iter().filter(|m| m.starts_with("Step ")).count();
    assert_eq!(steps, 4, "{messages:?}");
    assert_eq!(
        messages.last().unwrap(),
        "Fine-tuning job successfully completed"
    );
    let (_, ckpts) = s
        .call(
            "GET",
            &format!("/v1/fine_tuning/jobs/{id}/checkpoints"),
            None,
        )
        .await;
    let ckpts = ckpts["data"].as_array().unwrap();
    assert_eq!(ckpts.len(), 2);
    assert_eq!(ckpts[0]["step_number"], 4);
    assert!(ckpts[0]["metrics"]["valid_loss"].is_f64());
    // The results file.
    let results = job["result_files"][0].as_str().unwrap();
    let (status, f) = s.call("GET", &format!("/v1/files/{results}"), None).await;
    assert_eq!(
        (status, &f["purpose"]),
        (StatusCode::OK, &json!("fine-tune-results"))
    );
    // Listed, and answering with the adapter.
    let (_, list) = s.call("GET", "/v1/models", None).await;
    assert!(list["data"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["id"] == model));
    let (status, reply) = s
        .call(
            "POST",
            "/v1/chat/completions",
            Some(json!({"model": model, "messages": [{"role": "user", "content": "Q1?"}]})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{reply}");
    assert_eq!(reply["model"], model);
    assert_eq!(
        s.engine
            .adapters
            .lock()
            .unwrap()
            .last()
            .cloned()
            .flatten()
            .as_deref(),
        Some(model)
    );
    let usage = s.app.store.usage_totals(None).await.unwrap();
    assert!(
        usage.iter().any(|u| u.model == model && u.requests == 2),
        "{usage:?}"
    );
}

/// A server shutting down mid-job hands the job back; the next runner resumes it from its last
/// checkpoint, and no step's event or checkpoint is written twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_handed_back_at_shutdown_resumes_from_its_checkpoint() {
    let s = server().await;
    let train = s.upload("fine-tune", &jsonl((0..10).map(example))).await;
    let (_, job) = s
        .create(json!({
            "model": "gpt-4.1-nano",
            "training_file": train,
            "hyperparameters": {"n_epochs": 50, "batch_size": 1},
        }))
        .await;
    let id = job["id"].as_str().unwrap();
    let runner = s.runner();
    // Stop once a checkpoint or two exist.
    let uri = format!("/v1/fine_tuning/jobs/{id}/checkpoints");
    for _ in 0..2000 {
        let (_, c) = s.call("GET", &uri, None).await;
        if c["data"].as_array().unwrap().len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let running = s.wait(id, &["running", "succeeded"]).await;
    assert_eq!(
        running["status"], "running",
        "the job ended before the test stopped it"
    );
    assert!(running["estimated_finish"].is_i64(), "{running}");
    runner.send(true).unwrap();
    // Handed back: still running, but claimable at once.
    let mut released = false;
    for _ in 0..1000 {
        if let Some(j) = s
            .app
            .store
            .claim_fine_tuning_run("probe", i64::MAX / 4, 1)
            .await
            .unwrap()
        {
            assert_eq!(j.id, id);
            s.app
                .store
                .release_fine_tuning_job(id, "probe")
                .await
                .unwrap();
            released = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(released, "the job was not handed back");
    let _runner = s.runner();
    let job = s.wait(id, &["succeeded", "failed"]).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let messages = s.messages(id).await;
    let mut steps: Vec<&String> = messages.iter().filter(|m| m.starts_with("Step ")).collect();
    assert_eq!(steps.len(), 500);
    steps.dedup();
    assert_eq!(steps.len(), 500, "a step was recorded twice");
    assert!(
        messages
            .iter()
            .any(|m| m.starts_with("Fine-tuning job resumed from the checkpoint")),
        "{:?}",
        &messages[..5]
    );
    let (_, ckpts) = s.call("GET", &format!("{uri}?limit=100"), None).await;
    let mut numbers: Vec<u64> = ckpts["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["step_number"].as_u64().unwrap())
        .collect();
    numbers.reverse();
    assert_eq!(numbers, (1..=50).map(|e| e * 10).collect::<Vec<u64>>());
}

/// A LoRA adapter named in `ferrum.toml` (`[[tier.adapter]]`) is served on its tier's engine
/// as a model of its own, listed, priced at the tier's fine-tuned prices, and not deletable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_adapter_is_served_on_its_tier() {
    let s = server_with(|dir| {
        // An adapter trained on the tiny model, as an operator would bring one.
        let model = LoadedModel::load(&dir.join("tiny.gguf"), &LoadOptions::default()).unwrap();
        let data: Vec<_> = (0..3)
            .map(|i| ferrum_train::chat_example(&model, &example(i)).unwrap())
            .collect();
        let hyper = ferrum_train::Hyperparameters::resolve(data.len(), Some(1), None, None);
        let settings = ferrum_train::TrainSettings::new(hyper, 1);
        struct Quiet;
        impl ferrum_train::Progress for Quiet {
            fn step(&mut self, _: &ferrum_train::StepReport) -> ferrum_train::Control {
                ferrum_train::Control::Continue
            }
            fn epoch(&mut self, _: &ferrum_train::EpochReport) -> ferrum_train::Control {
                ferrum_train::Control::Continue
            }
        }
        let out = ferrum_train::train(&model, &data, &[], &settings, None, &mut Quiet).unwrap();
        let ferrum_train::Outcome::Finished { adapter, .. } = out else {
            panic!("training stopped")
        };
        std::fs::write(dir.join("support.gguf"), adapter).unwrap();
        // The adapter table attaches to the tier above it: nano, the last chat tier.
        let embedding = "[[tier]]\nid = \"text-embedding-3-small\"";
        let text = ferrum_registry::DEFAULT_CONFIG.replace(
            embedding,
            &format!(
                "[[tier.adapter]]\nid = \"nano-support\"\nweights = {{ path = \"support.gguf\" }}\n\n\
                 {embedding}"
            ),
        );
        Registry::from_toml_str(&text, Some(dir)).unwrap()
    })
    .await;
    let (_, list) = s.call("GET", "/v1/models", None).await;
    assert!(list["data"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["id"] == "nano-support"));
    let (status, m) = s.call("GET", "/v1/models/nano-support", None).await;
    assert_eq!(
        (status, m["id"].as_str()),
        (StatusCode::OK, Some("nano-support"))
    );
    let (status, reply) = s
        .call(
            "POST",
            "/v1/chat/completions",
            Some(
                json!({"model": "nano-support", "messages": [{"role": "user", "content": "Q1?"}]}),
            ),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{reply}");
    assert_eq!(reply["model"], "nano-support");
    let ran_with = s.engine.adapters.lock().unwrap().last().cloned().flatten();
    assert_eq!(ran_with.as_deref(), Some("nano-support"));
    // The base tier still runs without it.
    let (status, _) = s
        .call(
            "POST",
            "/v1/chat/completions",
            Some(
                json!({"model": "gpt-4.1-nano", "messages": [{"role": "user", "content": "Q1?"}]}),
            ),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        s.engine.adapters.lock().unwrap().last().cloned().flatten(),
        None
    );
    let (status, err) = s.call("DELETE", "/v1/models/nano-support", None).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{err}");
    // Billed under its own id at nano's fine-tuned prices.
    let usage = s.app.store.usage_totals(None).await.unwrap();
    let row = usage
        .iter()
        .find(|u| u.model == "nano-support")
        .expect("a usage row");
    let ft = Registry::embedded_default()
        .get("gpt-4.1-nano")
        .unwrap()
        .fine_tuned_price();
    let expected = ft
        .price()
        .cost_usd(row.prompt_tokens, row.cached_tokens, row.completion_tokens);
    assert!(
        (row.cost_usd - expected).abs() < 1e-12,
        "{row:?} vs {expected}"
    );
}
