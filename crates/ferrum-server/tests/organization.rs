//! The organization API through axum's `oneshot`, on a SQLite file and a scripted engine (a
//! tiny random-weight GGUF for its tokenizer; every request answers "hello there"): projects,
//! service accounts and their keys, the key lifecycle, the 401/403 shapes, rate limits with
//! their headers and 429s, and usage and costs against the ledger.

mod common;

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use ferrum_engine::testing::TinyModel;
use ferrum_engine::{
    Completion, EngineStats, Event, FinishReason, LoadOptions, LoadedModel, Request, SubmitError,
    TokenEvent,
};
use ferrum_registry::Registry;
use ferrum_server::{Engine, ServerConfig};
use ferrum_store::Store;
use serde_json::{json, Value};

const ADMIN: &str = "sk-admin-test-key";
const REPLY: &str = "hello there";

struct Scripted {
    model: Arc<LoadedModel>,
    stats: EngineStats,
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
            let sink = &mut request.sink;
            if sink(Event::Started).is_break() {
                return;
            }
            let all = model.tokenizer.encode(REPLY, false, false).unwrap();
            let tokens: Vec<u32> = all
                .iter()
                .copied()
                .take(request.params.max_tokens)
                .collect();
            for &id in &tokens {
                let text = model.tokenizer.decode(&[id], true).unwrap();
                let token = TokenEvent {
                    id,
                    text,
                    logprob: None,
                    top: vec![],
                };
                if sink(Event::Token { choice: 0, token }) == ControlFlow::Break(()) {
                    return;
                }
            }
            let completion = Completion {
                text: model.tokenizer.decode(&tokens, true).unwrap(),
                finish_reason: if tokens.len() < all.len() {
                    FinishReason::Length
                } else {
                    FinishReason::Stop
                },
                tokens,
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
    _dir: tempfile::TempDir,
}

async fn server(api_key: Option<&str>, admin_key: Option<&str>) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    TinyModel {
        context_length: 4096,
        ..TinyModel::default()
    }
    .write_chat(&path)
    .unwrap();
    let model = LoadedModel::load(&path, &LoadOptions::default()).unwrap();
    let engine = Arc::new(Scripted {
        model: Arc::new(model),
        stats: EngineStats::default(),
    });
    let url = format!("sqlite://{}", dir.path().join("ferrum.db").display());
    let store = Store::connect(&url).await.unwrap();
    let config = ServerConfig {
        api_key: api_key.map(str::to_string),
        admin_key: admin_key.map(str::to_string),
        ..common::config(dir.path())
    };
    let app = ferrum_server::app(Registry::embedded_default(), store, config);
    app.models.install("gpt-4.1-nano", engine).await.unwrap();
    Server { app, _dir: dir }
}

impl Server {
    async fn raw(
        &self,
        method: &str,
        uri: &str,
        key: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, HeaderMap, Value) {
        let (status, headers, bytes) = common::send(&self.app, method, uri, key, body).await;
        let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        (status, headers, value)
    }

    /// An admin call that must succeed: its body.
    async fn admin(&self, method: &str, uri: &str, body: Option<Value>) -> Value {
        let (status, _, v) = self.raw(method, uri, Some(ADMIN), body).await;
        assert_eq!(status, StatusCode::OK, "{method} {uri}: {v}");
        v
    }

    async fn chat(&self, key: Option<&str>, max_tokens: u64) -> (StatusCode, HeaderMap, Value) {
        let body = json!({
            "model": "gpt-4.1-nano",
            "messages": [{"role": "user", "content": "Say hello"}],
            "max_tokens": max_tokens,
        });
        self.raw("POST", "/v1/chat/completions", key, Some(body))
            .await
    }

    /// A project and a service account's key in it: (project id, key id, key).
    async fn project_with_key(&self, name: &str) -> (String, String, String) {
        let p = self
            .admin(
                "POST",
                "/v1/organization/projects",
                Some(json!({"name": name})),
            )
            .await;
        let id = p["id"].as_str().unwrap().to_string();
        let sa = self
            .admin(
                "POST",
                &format!("/v1/organization/projects/{id}/service_accounts"),
                Some(json!({"name": "bot"})),
            )
            .await;
        let key = &sa["api_key"];
        (
            id,
            key["id"].as_str().unwrap().to_string(),
            key["value"].as_str().unwrap().to_string(),
        )
    }
}

fn error_of(v: &Value) -> (&str, Option<&str>, &str) {
    let e = &v["error"];
    (
        e["type"].as_str().unwrap_or(""),
        e["code"].as_str(),
        e["message"].as_str().unwrap_or(""),
    )
}

#[tokio::test]
async fn projects_and_service_accounts_follow_the_admin_api() {
    let s = server(None, Some(ADMIN)).await;
    let p = s
        .admin(
            "POST",
            "/v1/organization/projects",
            Some(json!({"name": "alpha"})),
        )
        .await;
    assert_eq!(p["object"], "organization.project");
    assert_eq!(
        (p["status"].as_str(), &p["archived_at"]),
        (Some("active"), &Value::Null)
    );
    let id = p["id"].as_str().unwrap();
    assert!(id.starts_with("proj_"), "{id}");
    s.admin(
        "POST",
        "/v1/organization/projects",
        Some(json!({"name": "beta"})),
    )
    .await;
    let got = s
        .admin("GET", &format!("/v1/organization/projects/{id}"), None)
        .await;
    assert_eq!(got, p);
    let renamed = s
        .admin(
            "POST",
            &format!("/v1/organization/projects/{id}"),
            Some(json!({"name": "alpha 2"})),
        )
        .await;
    assert_eq!(renamed["name"], "alpha 2");
    let list = s
        .admin("GET", "/v1/organization/projects?limit=1", None)
        .await;
    assert_eq!(
        (list["data"].as_array().unwrap().len(), &list["has_more"]),
        (1, &json!(true))
    );
    assert_eq!(list["data"][0]["id"], id);

    let sa = s
        .admin(
            "POST",
            &format!("/v1/organization/projects/{id}/service_accounts"),
            Some(json!({"name": "ci"})),
        )
        .await;
    assert_eq!(sa["object"], "organization.project.service_account");
    assert_eq!(sa["role"], "member");
    let key = sa["api_key"]["value"].as_str().unwrap();
    assert!(key.starts_with("sk-proj-") && key.len() > 60, "{key}");
    let sa_id = sa["id"].as_str().unwrap();
    let accounts = s
        .admin(
            "GET",
            &format!("/v1/organization/projects/{id}/service_accounts"),
            None,
        )
        .await;
    assert_eq!(accounts["data"][0]["id"], sa_id);
    assert!(
        accounts["data"][0].get("api_key").is_none(),
        "the key is shown once"
    );
    let keys = s
        .admin(
            "GET",
            &format!("/v1/organization/projects/{id}/api_keys"),
            None,
        )
        .await;
    let listed = &keys["data"][0];
    assert_eq!(listed["id"], sa["api_key"]["id"]);
    assert_eq!(listed["owner"]["service_account"]["id"], sa_id);
    assert!(
        !listed.to_string().contains(key),
        "keys are never listed in clear"
    );
    assert!(listed["redacted_value"]
        .as_str()
        .unwrap()
        .ends_with(&key[key.len() - 4..]));
    assert_eq!(listed["last_used_at"], Value::Null);

    // Deleting the service account revokes its key.
    let (status, _, _) = s.chat(Some(key), 4).await;
    assert_eq!(status, StatusCode::OK);
    s.admin(
        "DELETE",
        &format!("/v1/organization/projects/{id}/service_accounts/{sa_id}"),
        None,
    )
    .await;
    let (status, _, body) = s.chat(Some(key), 4).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");

    // Archived projects are listed only when asked.
    s.admin(
        "POST",
        &format!("/v1/organization/projects/{id}/archive"),
        None,
    )
    .await;
    let list = s.admin("GET", "/v1/organization/projects", None).await;
    assert_eq!(list["data"].as_array().unwrap().len(), 1);
    let list = s
        .admin(
            "GET",
            "/v1/organization/projects?include_archived=true",
            None,
        )
        .await;
    assert_eq!(list["data"].as_array().unwrap().len(), 2);
    let (status, _, body) = s
        .raw(
            "GET",
            "/v1/organization/projects/proj_nope",
            Some(ADMIN),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
}

#[tokio::test]
async fn a_key_works_until_revoked_and_is_refused_at_once() {
    let s = server(None, Some(ADMIN)).await;
    let (project, key_id, key) = s.project_with_key("p").await;
    let (status, headers, body) = s.chat(Some(&key), 4).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(headers.contains_key("x-ratelimit-limit-requests"));
    let k = s
        .admin(
            "GET",
            &format!("/v1/organization/projects/{project}/api_keys/{key_id}"),
            None,
        )
        .await;
    assert!(k["last_used_at"].as_i64().unwrap() > 1_700_000_000, "{k}");
    // The ledger knows the project and key.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let start = ferrum_now() - 60;
    let usage = s
        .admin(
            "GET",
            &format!(
                "/v1/organization/usage/completions?start_time={start}&bucket_width=1h\
                 &group_by[]=project_id&group_by[]=api_key_id"
            ),
            None,
        )
        .await;
    let r = &usage["data"][0]["results"][0];
    assert_eq!(
        (&r["project_id"], &r["api_key_id"]),
        (&json!(project), &json!(key_id))
    );
    assert_eq!(r["num_model_requests"], 1);

    s.admin(
        "DELETE",
        &format!("/v1/organization/projects/{project}/api_keys/{key_id}"),
        None,
    )
    .await;
    let (status, _, body) = s.chat(Some(&key), 4).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(error_of(&body).1, Some("invalid_api_key"), "{body}");
    assert!(
        !body.to_string().contains(&key),
        "the key is redacted in the error"
    );
    let (status, _, _) = s
        .raw(
            "GET",
            &format!("/v1/organization/projects/{project}/api_keys/{key_id}"),
            Some(ADMIN),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Archiving a project stops its keys too.
    let (project, _, key) = s.project_with_key("q").await;
    assert_eq!(s.chat(Some(&key), 4).await.0, StatusCode::OK);
    s.admin(
        "POST",
        &format!("/v1/organization/projects/{project}/archive"),
        None,
    )
    .await;
    assert_eq!(s.chat(Some(&key), 4).await.0, StatusCode::UNAUTHORIZED);
}

fn ferrum_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[tokio::test]
async fn keys_get_openai_s_401_and_403_shapes() {
    let s = server(Some("sk-legacy"), Some(ADMIN)).await;
    let (_, _, key) = s.project_with_key("p").await;
    // No key, a wrong key: 401.
    let (status, _, body) = s.chat(None, 4).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(
        error_of(&body)
            .2
            .starts_with("You didn't provide an API key"),
        "{body}"
    );
    let (status, _, body) = s.chat(Some("sk-proj-wrong-key-0000"), 4).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(error_of(&body).1, Some("invalid_api_key"));
    // A project key on the admin routes: 401, missing scopes.
    for (method, scope) in [
        ("GET", "api.management.read"),
        ("POST", "api.management.write"),
    ] {
        let (status, _, body) = s
            .raw(
                method,
                "/v1/organization/projects",
                Some(&key),
                Some(json!({"name": "x"})),
            )
            .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{method}: {body}");
        let (kind, code, message) = error_of(&body);
        assert_eq!((kind, code), ("invalid_request_error", None));
        assert!(
            message.contains(&format!("Missing scopes: {scope}")),
            "{message}"
        );
    }
    // The admin key on the model API: 403.
    let (status, _, body) = s.chat(Some(ADMIN), 4).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(error_of(&body).0, "invalid_request_error");
    // The old single key keeps working on the API (unlimited, unattributed), not on admin.
    let (status, headers, _) = s.chat(Some("sk-legacy"), 4).await;
    assert_eq!(status, StatusCode::OK);
    assert!(!headers.contains_key("x-ratelimit-limit-requests"));
    let (status, _, _) = s
        .raw("GET", "/v1/organization/projects", Some("sk-legacy"), None)
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // Operator routes take the admin key or the old key, not a project key.
    for (k, expect) in [
        (ADMIN, StatusCode::OK),
        ("sk-legacy", StatusCode::OK),
        (key.as_str(), StatusCode::UNAUTHORIZED),
    ] {
        let (status, _, body) = s.raw("GET", "/admin/models", Some(k), None).await;
        assert_eq!(status, expect, "{k}: {body}");
    }
}

#[tokio::test]
async fn a_server_without_keys_stays_open_until_one_exists() {
    let s = server(None, None).await;
    assert_eq!(s.chat(None, 4).await.0, StatusCode::OK);
    assert_eq!(s.chat(Some("sk-anything"), 4).await.0, StatusCode::OK);
    let (status, _, body) = s.raw("GET", "/v1/organization/projects", None, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert!(error_of(&body).2.contains("ferrum admin init"), "{body}");
    // An admin key created in the database (`ferrum admin init`) secures the server.
    let (_, value) = ferrum_server::create_admin_key(&s.app.store, "init", None)
        .await
        .unwrap();
    let (status, _, _) = s
        .raw("GET", "/v1/organization/projects", Some(&value), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(s.chat(None, 4).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(
        s.chat(Some("sk-anything"), 4).await.0,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn rate_limits_answer_429_with_openai_s_headers() {
    let s = server(None, Some(ADMIN)).await;
    let (project, _, key) = s.project_with_key("p").await;
    let limits = s
        .admin(
            "GET",
            &format!("/v1/organization/projects/{project}/rate_limits"),
            None,
        )
        .await;
    let nano = limits["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["model"] == "gpt-4.1-nano")
        .unwrap();
    assert_eq!(nano["id"], "rl-gpt-4.1-nano");
    assert_eq!(nano["object"], "project.rate_limit");
    let set = s
        .admin(
            "POST",
            &format!("/v1/organization/projects/{project}/rate_limits/rl-gpt-4.1-nano"),
            Some(json!({"max_requests_per_1_minute": 2, "max_tokens_per_1_minute": 400})),
        )
        .await;
    assert_eq!(set["max_requests_per_1_minute"], 2);
    assert_eq!(set["max_tokens_per_1_minute"], 400);

    // Each window is a minute: keep the test's requests in one.
    while ferrum_now() % 60 > 50 {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (status, h, body) = s.chat(Some(&key), 100).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let header = |h: &HeaderMap, n: &str| h.get(n).unwrap().to_str().unwrap().to_string();
    assert_eq!(header(&h, "x-ratelimit-limit-requests"), "2");
    assert_eq!(header(&h, "x-ratelimit-limit-tokens"), "400");
    assert_eq!(header(&h, "x-ratelimit-remaining-requests"), "1");
    // Admitted as the body's length / 4 plus max_tokens (100).
    let remaining: u64 = header(&h, "x-ratelimit-remaining-tokens").parse().unwrap();
    assert!(remaining < 300, "{remaining}");
    assert!(header(&h, "x-ratelimit-reset-requests").ends_with('s'));
    assert!(h.contains_key("x-ratelimit-reset-tokens"));
    // The completion corrected the estimate to its real usage: the next admission sees it.
    let used = body["usage"]["total_tokens"].as_u64().unwrap();
    let (status, h2, body2) = s.chat(Some(&key), 100).await;
    assert_eq!(status, StatusCode::OK, "{body2}");
    let estimate = 400 - remaining;
    let remaining2: u64 = header(&h2, "x-ratelimit-remaining-tokens").parse().unwrap();
    assert_eq!(
        remaining2,
        400 - used - estimate,
        "real {used}, estimate {estimate}"
    );
    // The third request in the minute: 429 naming the request limit.
    let (status, h3, body3) = s.chat(Some(&key), 1).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body3}");
    let (kind, code, message) = error_of(&body3);
    assert_eq!((kind, code), ("requests", Some("rate_limit_exceeded")));
    assert!(
        message.contains("requests per min (RPM): Limit 2"),
        "{message}"
    );
    assert_eq!(header(&h3, "x-ratelimit-remaining-requests"), "0");
    assert!(h3.contains_key("retry-after"));

    // A token limit: a request asking for more output than the limit is refused alone.
    s.admin(
        "POST",
        &format!("/v1/organization/projects/{project}/rate_limits/rl-gpt-4.1-nano"),
        Some(json!({"max_requests_per_1_minute": 100})),
    )
    .await;
    let (status, _, body) = s.chat(Some(&key), 1000).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    let (kind, _, message) = error_of(&body);
    assert_eq!(kind, "tokens");
    assert!(
        message.contains("tokens per min (TPM): Limit 400"),
        "{message}"
    );
    // Another project is not affected.
    let (_, _, other) = s.project_with_key("q").await;
    assert_eq!(s.chat(Some(&other), 1000).await.0, StatusCode::OK);
    let (status, _, body) = s
        .raw(
            "POST",
            &format!("/v1/organization/projects/{project}/rate_limits/rl-gpt-4.1-nano"),
            Some(ADMIN),
            Some(json!({"max_requests_per_1_minute": -1})),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
}

#[tokio::test]
async fn usage_and_costs_equal_the_ledger() {
    let s = server(None, Some(ADMIN)).await;
    let (pa, ka, key_a) = s.project_with_key("a").await;
    let (pb, _, key_b) = s.project_with_key("b").await;
    for (key, n) in [(&key_a, 3), (&key_b, 2)] {
        for _ in 0..n {
            assert_eq!(s.chat(Some(key), 8).await.0, StatusCode::OK);
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The ledger's totals (GET /v1/usage, as the old single key or nobody sees them).
    let (_, _, totals) = s.raw("GET", "/v1/usage", Some(&key_a), None).await;
    let nano = totals["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["model"] == "gpt-4.1-nano")
        .unwrap()
        .clone();
    let start = ferrum_now() - 600;
    let usage = s
        .admin(
            "GET",
            &format!(
                "/v1/organization/usage/completions?start_time={start}&bucket_width=1d\
                 &group_by=project_id,model"
            ),
            None,
        )
        .await;
    assert_eq!(usage["object"], "page");
    assert_eq!(usage["has_more"], false);
    let results = usage["data"][0]["results"].as_array().unwrap();
    assert_eq!(results.len(), 2, "{usage}");
    let sum = |f: &str| results.iter().map(|r| r[f].as_u64().unwrap()).sum::<u64>();
    assert_eq!(
        sum("num_model_requests"),
        nano["requests"].as_u64().unwrap()
    );
    assert_eq!(sum("input_tokens"), nano["prompt_tokens"].as_u64().unwrap());
    assert_eq!(
        sum("output_tokens"),
        nano["completion_tokens"].as_u64().unwrap()
    );
    assert_eq!(
        sum("input_cached_tokens"),
        nano["cached_tokens"].as_u64().unwrap()
    );
    let of = |p: &str| results.iter().find(|r| r["project_id"] == p).unwrap();
    assert_eq!(of(&pa)["num_model_requests"], 3);
    assert_eq!(of(&pb)["num_model_requests"], 2);
    assert_eq!(of(&pa)["model"], "gpt-4.1-nano");
    assert_eq!(of(&pa)["api_key_id"], Value::Null, "not grouped by key");

    let costs = s
        .admin(
            "GET",
            &format!("/v1/organization/costs?start_time={start}&group_by[]=line_item"),
            None,
        )
        .await;
    let items = costs["data"][0]["results"].as_array().unwrap();
    let total: f64 = items
        .iter()
        .map(|r| r["amount"]["value"].as_f64().unwrap())
        .sum();
    let ledger = nano["cost_usd"].as_f64().unwrap();
    assert!(ledger > 0.0);
    assert!((total - ledger).abs() < 1e-12, "{total} vs {ledger}");
    let names: Vec<_> = items
        .iter()
        .map(|r| r["line_item"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["gpt-4.1-nano, input", "gpt-4.1-nano, output"]);
    let by_key = s
        .admin(
            "GET",
            &format!("/v1/organization/costs?start_time={start}&api_key_ids[]={ka}"),
            None,
        )
        .await;
    let a_cost = by_key["data"][0]["results"][0]["amount"]["value"]
        .as_f64()
        .unwrap();
    assert!(a_cost > 0.0 && a_cost < ledger, "{a_cost} of {ledger}");

    // Minute buckets page through the range.
    let start = ferrum_now() - 600;
    let page = s
        .admin(
            "GET",
            &format!(
                "/v1/organization/usage/completions?start_time={start}&bucket_width=1m&limit=5"
            ),
            None,
        )
        .await;
    assert_eq!(page["data"].as_array().unwrap().len(), 5);
    assert_eq!(page["has_more"], true);
    let next = page["next_page"].as_str().unwrap();
    let rest = s
        .admin(
            "GET",
            &format!(
                "/v1/organization/usage/completions?start_time={start}&bucket_width=1m\
                 &limit=10&page={next}"
            ),
            None,
        )
        .await;
    let requests: u64 = rest["data"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|b| b["results"].as_array().unwrap().clone())
        .map(|r| r["num_model_requests"].as_u64().unwrap())
        .sum();
    assert_eq!(requests, 5, "{rest}");
}
