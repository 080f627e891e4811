//! The Evals API (`/v1/evals`, runs, output items) and the worker that grades runs.
//!
//! An eval is a data source config (`custom` with an `item_schema`, or `stored_completions` /
//! `logs` filtered by metadata) and testing criteria (`graders.rs`). A run names a data source:
//! `jsonl` items (inline or a file), or `completions` / `responses`, which first generate a
//! sample per item with a model through the same in-process path as chat completions and the
//! Responses API. Their items may also be stored chat completions or stored responses
//! (selected by metadata, model, time, ...), whose stored answer is the sample unless a model
//! answers again.
//!
//! Every server runs one eval worker, built like the batch worker: it claims a queued run and
//! reads its data source into one row per item (`queued` -> `in_progress`, or `failed` with an
//! error naming the bad line); claims items (up to the batch window) and grades each at
//! background priority, writing the output item, its usage and its criteria results in one
//! transaction guarded by its claim (`ferrum_store::evals`), billed at the batch price; and
//! completes runs whose items are all graded. Claims are leases renewed while the worker lives,
//! so a killed server's items are graded by the next server, each exactly once.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use ferrum_protocol::reader::{invalid_type, invalid_value, missing, parse_object, Fields};
use ferrum_protocol::{parse_chat_request, ApiError};
use ferrum_store::{
    ClaimedItem, CompletionFilter, EvalRecord, ItemOutcome, ItemResult, Listed, ModelUsage,
    NewItem, Order, OutputFilter, OutputItemRecord, Page, RunRecord, RunStatus, UsageRecord,
};
use serde_json::{json, Map, Value};
use tokio::task::JoinSet;

use crate::graders::{self, Criterion, MessageTemplate, Namespace};
use crate::paging::{self, ListOut, Rules};
use crate::{now, random_id, App, ServerError};

/// Items a data source may hold.
const MAX_ITEMS: usize = 50_000;

/// The eval worker's shared state.
#[derive(Default)]
pub struct Evals {
    /// Wakes the worker (a run was created or canceled).
    pub wakeup: tokio::sync::Notify,
}

pub fn routes() -> Router<Arc<App>> {
    Router::new()
        .route("/v1/evals", post(create).get(list))
        .route(
            "/v1/evals/{eval_id}",
            get(retrieve).post(update).delete(delete),
        )
        .route("/v1/evals/{eval_id}/runs", post(create_run).get(list_runs))
        .route(
            "/v1/evals/{eval_id}/runs/{run_id}",
            get(retrieve_run).post(cancel_run).delete(delete_run),
        )
        // The spec's cancel is a POST to the run; the official SDKs post to `.../cancel`.
        .route("/v1/evals/{eval_id}/runs/{run_id}/cancel", post(cancel_run))
        .route(
            "/v1/evals/{eval_id}/runs/{run_id}/output_items",
            get(list_output_items),
        )
        .route(
            "/v1/evals/{eval_id}/runs/{run_id}/output_items/{output_item_id}",
            get(retrieve_output_item),
        )
}

// ---------------------------------------------------------------------------------------------
// Evals

/// The sample's schema, as an eval with `include_sample_schema` shows it.
fn sample_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "model": {"type": "string"},
            "choices": {"type": "array", "items": {"type": "object"}},
            "output_text": {"type": "string"},
            "output_json": {"type": "object"},
            "output_tools": {"type": "array", "items": {"type": "object"}},
            "finish_reason": {"type": "string"},
            "usage": {"type": "object"},
        },
        "required": ["model", "choices"],
    })
}

/// What an eval's data source config allows, read back from its echo.
struct Config {
    /// The item schema of a `custom` config.
    item_schema: Option<Value>,
}

impl Config {
    fn of(echo: &Value) -> Config {
        let item_schema = (echo["type"] == "custom")
            .then(|| echo["schema"]["properties"]["item"].clone())
            .filter(|s| !s.is_null());
        Config { item_schema }
    }

    fn namespace(&self) -> Namespace {
        let item_fields = self.item_schema.as_ref().and_then(|s| {
            s.get("properties")
                .and_then(Value::as_object)
                .map(|p| p.keys().cloned().collect())
        });
        Namespace { item_fields }
    }
}

/// Parses `data_source_config` into the echo the eval shows.
fn parse_config(f: &Fields) -> Result<Value, ApiError> {
    let kind = f.required_str("type")?;
    match kind {
        "custom" => {
            f.deny_unknown(&["type", "item_schema", "include_sample_schema"])?;
            let item_schema = f
                .object("item_schema")?
                .ok_or_else(|| missing(&f.path_of("item_schema")))?;
            let item_schema = Value::Object(item_schema.map.clone());
            let mut properties = json!({"item": item_schema});
            let mut required = vec!["item"];
            if f.bool("include_sample_schema")?.unwrap_or(false) {
                properties["sample"] = sample_schema();
                required.push("sample");
            }
            Ok(json!({
                "type": "custom",
                "schema": {"type": "object", "properties": properties, "required": required},
            }))
        }
        "stored_completions" | "logs" => {
            f.deny_unknown(&["type", "metadata"])?;
            let metadata = match f.object("metadata")? {
                Some(m) => Value::Object(m.map.clone()),
                None => json!({}),
            };
            Ok(json!({
                "type": kind,
                "metadata": metadata,
                "schema": {
                    "type": "object",
                    "properties": {"item": {"type": "object"}, "sample": {"type": "object"}},
                    "required": ["item", "sample"],
                },
            }))
        }
        other => Err(invalid_value(
            &f.path_of("type"),
            other,
            &["custom", "logs", "stored_completions"],
        )),
    }
}

async fn create(
    State(app): State<Arc<App>>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<Value>), ServerError> {
    let map = parse_object(&body)?;
    let f = Fields::new(&map, "");
    f.deny_unknown(&["name", "metadata", "data_source_config", "testing_criteria"])?;
    let config = f
        .object("data_source_config")?
        .ok_or_else(|| missing("data_source_config"))?;
    let config = parse_config(&config)?;
    let list = f
        .array("testing_criteria")?
        .ok_or_else(|| missing("testing_criteria"))?;
    let (criteria, echo) =
        graders::parse_criteria(list, "testing_criteria", &Config::of(&config).namespace())?;
    for (i, c) in criteria.iter().enumerate() {
        if let Some(model) = c.grader.model() {
            crate::fine_tuning::tier(&app, model)
                .await
                .map_err(|e| e.with_param(&format!("testing_criteria[{i}].model")))?;
        }
        if c.grader.needs_embeddings() && app.models.embedding_tier().is_none() {
            return Err(ApiError::invalid_param(
                format!("testing_criteria[{i}].evaluation_metric"),
                "unsupported_value",
                "The evaluation metric 'cosine' needs text embeddings, and this server has no \
                 embedding model configured (a tier with kind = \"embedding\").",
            )
            .into());
        }
    }
    let id = random_id("eval_");
    let record = EvalRecord {
        name: f.str("name")?.map_or_else(|| id.clone(), str::to_string),
        id,
        created_at: now(),
        metadata: ferrum_protocol::chat::parse_metadata(&f)?.map(|m| Value::Object(m).to_string()),
        data_source_config: config.to_string(),
        testing_criteria: Value::Array(echo).to_string(),
    };
    app.store.create_eval(&record).await?;
    tracing::info!(id = %record.id, criteria = criteria.len(), "eval created");
    Ok((StatusCode::CREATED, Json(eval_object(&record))))
}

fn parse_json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or(Value::Null)
}

fn eval_object(e: &EvalRecord) -> Value {
    json!({
        "object": "eval",
        "id": e.id,
        "name": e.name,
        "data_source_config": parse_json(&e.data_source_config),
        "testing_criteria": parse_json(&e.testing_criteria),
        "created_at": e.created_at,
        "metadata": e.metadata.as_deref().map_or(Value::Null, parse_json),
    })
}

async fn find_eval(app: &App, id: &str) -> Result<EvalRecord, ServerError> {
    app.store.get_eval(id).await?.ok_or_else(|| {
        ApiError::not_found(format!("No such Eval object: {id}"))
            .with_param("eval_id")
            .into()
    })
}

async fn retrieve(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ServerError> {
    Ok(Json(eval_object(&find_eval(&app, &id).await?)))
}

async fn list(
    State(app): State<Arc<App>>,
    Query(pairs): Query<Vec<(String, String)>>,
) -> Result<Json<ListOut<Value>>, ServerError> {
    let page = paging::page(&pairs, &Rules::of(Order::Asc))?;
    for (k, v) in &pairs {
        if k == "order_by" && v != "created_at" {
            let e = if v == "updated_at" {
                ApiError::invalid_param(
                    "order_by",
                    "unsupported_value",
                    "Ordering evals by 'updated_at' is not supported by this server; use \
                     'created_at'.",
                )
            } else {
                invalid_value("order_by", v, &["created_at", "updated_at"])
            };
            return Err(e.into());
        }
    }
    let listed = app.store.list_evals(&page).await?.map(|e| eval_object(&e));
    Ok(Json(ListOut::new(listed, |v| {
        v["id"].as_str().unwrap_or("")
    })))
}

async fn update(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ServerError> {
    let map = parse_object(&body)?;
    let f = Fields::new(&map, "");
    f.deny_unknown(&["name", "metadata"])?;
    let name = f.str("name")?;
    let metadata = if map.contains_key("metadata") {
        Some(ferrum_protocol::chat::parse_metadata(&f)?.map(|m| Value::Object(m).to_string()))
    } else {
        None
    };
    find_eval(&app, &id).await?;
    let e = app
        .store
        .update_eval(&id, name, metadata)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("No such Eval object: {id}")))?;
    Ok(Json(eval_object(&e)))
}

async fn delete(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ServerError> {
    if !app.store.delete_eval(&id).await? {
        return Err(ApiError::not_found(format!("No such Eval object: {id}"))
            .with_param("eval_id")
            .into());
    }
    tracing::info!(%id, "eval deleted");
    Ok(Json(
        json!({"object": "eval.deleted", "deleted": true, "eval_id": id}),
    ))
}

// ---------------------------------------------------------------------------------------------
// Run data sources

/// Where a run's items come from.
#[derive(Clone, Debug)]
enum Source {
    /// Inline `{item, sample}` objects.
    Content(Vec<NewItem>),
    /// An uploaded JSONL file.
    File(String),
    /// Stored chat completions matching a filter.
    Stored {
        metadata: Vec<(String, String)>,
        model: Option<String>,
        created_after: Option<i64>,
        created_before: Option<i64>,
        limit: Option<usize>,
    },
    /// Stored responses of the Responses API matching a filter.
    Responses(ResponsesFilter),
}

/// Which stored responses a `responses` source reads (the spec's `EvalResponsesSource`): all
/// given conditions must hold. Responses still running, failed or cancelled are left out.
#[derive(Clone, Debug, Default)]
struct ResponsesFilter {
    metadata: Vec<(String, String)>,
    model: Option<String>,
    /// A substring of the response's `instructions`.
    instructions_search: Option<String>,
    /// Inclusive bounds on `created_at`.
    created_after: Option<i64>,
    created_before: Option<i64>,
    reasoning_effort: Option<String>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    /// The response's `user` is one of these.
    users: Vec<String>,
    /// The response offered every one of these tools (by function name, or type).
    tools: Vec<String>,
}

impl ResponsesFilter {
    /// Whether a stored response (its response object) passes the filter's conditions beyond
    /// the model, which the store applies.
    fn matches(&self, object: &Value) -> bool {
        let created = object["created_at"].as_i64().unwrap_or_default();
        let same = |want: Option<f64>, key: &str| {
            want.is_none_or(|w| object[key].as_f64().is_some_and(|v| (v - w).abs() < 1e-9))
        };
        let offered: Vec<&str> = object["tools"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|t| t["name"].as_str().or(t["type"].as_str()))
            .collect();
        self.metadata
            .iter()
            .all(|(k, v)| object["metadata"][k].as_str() == Some(v))
            && self.instructions_search.as_ref().is_none_or(|q| {
                object["instructions"]
                    .as_str()
                    .is_some_and(|i| i.contains(q.as_str()))
            })
            && self.created_after.is_none_or(|t| created >= t)
            && self.created_before.is_none_or(|t| created <= t)
            && self
                .reasoning_effort
                .as_ref()
                .is_none_or(|e| object["reasoning"]["effort"].as_str() == Some(e.as_str()))
            && same(self.temperature, "temperature")
            && same(self.top_p, "top_p")
            && (self.users.is_empty()
                || object["user"]
                    .as_str()
                    .is_some_and(|u| self.users.iter().any(|w| w == u)))
            && self.tools.iter().all(|t| offered.contains(&t.as_str()))
    }
}

/// How a run's messages to the model are made from an item.
#[derive(Clone, Debug)]
enum InputMessages {
    Template(Vec<MessageTemplate>),
    /// A path (`item.input`) to a list of chat messages in the item.
    ItemReference(String),
}

/// The API a run samples through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Api {
    Chat,
    Responses,
}

/// What a run generates per item, when it samples a model.
#[derive(Clone, Debug)]
struct Sampling {
    api: Api,
    model: String,
    input: InputMessages,
    /// Request members from `sampling_params` (already in the API's own names).
    params: Map<String, Value>,
}

/// A run's data source, parsed.
#[derive(Clone, Debug)]
struct DataSource {
    source: Source,
    sampling: Option<Sampling>,
}

/// Parses a run's `data_source`; items inline are checked against the eval's item schema.
fn parse_data_source(f: &Fields, config: &Config) -> Result<DataSource, ApiError> {
    let kind = f.required_str("type")?;
    let ns = config.namespace();
    match kind {
        "jsonl" => {
            f.deny_unknown(&["type", "source"])?;
            let source = parse_source(f, &["file_content", "file_id"], config)?;
            Ok(DataSource {
                source,
                sampling: None,
            })
        }
        "completions" | "responses" => {
            f.deny_unknown(&[
                "type",
                "source",
                "input_messages",
                "sampling_params",
                "model",
            ])?;
            let (api, kinds): (Api, &[&str]) = if kind == "completions" {
                (
                    Api::Chat,
                    &["file_content", "file_id", "stored_completions"],
                )
            } else {
                (Api::Responses, &["file_content", "file_id", "responses"])
            };
            let source = parse_source(f, kinds, config)?;
            let sampling = match f.str("model")? {
                Some(model) => Some(Sampling {
                    api,
                    model: model.to_string(),
                    input: parse_input_messages(f, &ns)?,
                    params: parse_sampling_params(f, api)?,
                }),
                // Stored completions and responses already hold a sample: their answer.
                None if matches!(source, Source::Stored { .. } | Source::Responses(_)) => None,
                None => return Err(missing(&f.path_of("model"))),
            };
            Ok(DataSource { source, sampling })
        }
        other => Err(invalid_value(
            &f.path_of("type"),
            other,
            &["jsonl", "completions", "responses"],
        )),
    }
}

fn parse_source(f: &Fields, kinds: &[&'static str], config: &Config) -> Result<Source, ApiError> {
    let s = f
        .object("source")?
        .ok_or_else(|| missing(&f.path_of("source")))?;
    let kind = s.required_str("type")?;
    if !kinds.contains(&kind) {
        return Err(invalid_value(&s.path_of("type"), kind, kinds));
    }
    match kind {
        "file_content" => {
            s.deny_unknown(&["type", "content"])?;
            let list = s
                .array("content")?
                .ok_or_else(|| missing(&s.path_of("content")))?;
            let mut items = Vec::new();
            for (i, v) in list.iter().enumerate() {
                let p = format!("{}[{i}]", s.path_of("content"));
                let item = content_item(v, config).map_err(|why| {
                    ApiError::invalid_param(&p, "invalid_value", format!("Invalid '{p}': {why}."))
                })?;
                items.push(item);
            }
            if items.is_empty() {
                return Err(ApiError::invalid_param(
                    s.path_of("content"),
                    "empty_array",
                    format!(
                        "Invalid '{}': expected at least one item.",
                        s.path_of("content")
                    ),
                ));
            }
            Ok(Source::Content(items))
        }
        "file_id" => {
            s.deny_unknown(&["type", "id"])?;
            Ok(Source::File(s.required_str("id")?.to_string()))
        }
        "responses" => parse_responses_filter(&s).map(Source::Responses),
        _ => {
            s.deny_unknown(&[
                "type",
                "metadata",
                "model",
                "created_after",
                "created_before",
                "limit",
            ])?;
            Ok(Source::Stored {
                metadata: metadata_filter(&s)?,
                model: s.str("model")?.map(str::to_string),
                created_after: s.integer("created_after", 0, i64::MAX)?,
                created_before: s.integer("created_before", 0, i64::MAX)?,
                limit: s.integer("limit", 1, MAX_ITEMS as i64)?.map(|n| n as usize),
            })
        }
    }
}

/// One `{item, sample}` object (a JSONL line, or an inline content entry); a line without an
/// `item` member is the item itself (so a fine-tuning file can be graded as it is).
fn content_item(v: &Value, config: &Config) -> Result<NewItem, String> {
    let Value::Object(map) = v else {
        return Err("expected a JSON object".into());
    };
    let (item, given) = match map.get("item") {
        Some(Value::Object(_)) => (&map["item"], map.get("sample").filter(|s| !s.is_null())),
        Some(_) => return Err("'item' must be an object".into()),
        None => (v, None),
    };
    if given.is_some_and(|s| !s.is_object()) {
        return Err("'sample' must be an object".into());
    }
    if let Some(schema) = &config.item_schema {
        if let Some(why) = schema_problem(schema, item, "item") {
            return Err(format!(
                "the item does not match data_source_config.item_schema: {why}"
            ));
        }
    }
    Ok(NewItem {
        item: item.to_string(),
        given: given.map(Value::to_string),
    })
}

/// Why `v` does not match `schema` (the common JSON Schema keywords: `type`, `required`,
/// `properties`, `items`, `enum`), or `None`.
fn schema_problem(schema: &Value, v: &Value, path: &str) -> Option<String> {
    let type_ok = |t: &str| match t {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "number" => v.is_number(),
        "integer" => v.as_f64().is_some_and(|x| x.fract() == 0.0),
        "boolean" => v.is_boolean(),
        "null" => v.is_null(),
        _ => true,
    };
    let ok = match &schema["type"] {
        Value::String(t) => type_ok(t),
        Value::Array(ts) => ts.iter().any(|t| t.as_str().is_none_or(type_ok)),
        _ => true,
    };
    if !ok {
        return Some(format!("'{path}' should be of type {}", schema["type"]));
    }
    if let Some(options) = schema["enum"].as_array() {
        if !options.contains(v) {
            return Some(format!("'{path}' is not one of {}", schema["enum"]));
        }
    }
    if let Value::Object(map) = v {
        for r in schema["required"].as_array().into_iter().flatten() {
            if let Some(k) = r.as_str().filter(|k| !map.contains_key(*k)) {
                return Some(format!("'{path}' lacks the required property '{k}'"));
            }
        }
        if let Some(props) = schema["properties"].as_object() {
            for (k, sub) in props {
                if let Some(x) = map.get(k) {
                    if let Some(why) = schema_problem(sub, x, &format!("{path}.{k}")) {
                        return Some(why);
                    }
                }
            }
        }
    }
    if let (Value::Array(list), Some(sub)) = (v, schema.get("items")) {
        for (i, x) in list.iter().enumerate() {
            if let Some(why) = schema_problem(sub, x, &format!("{path}[{i}]")) {
                return Some(why);
            }
        }
    }
    None
}

fn parse_input_messages(f: &Fields, ns: &Namespace) -> Result<InputMessages, ApiError> {
    let m = f
        .object("input_messages")?
        .ok_or_else(|| missing(&f.path_of("input_messages")))?;
    match m.required_str("type")? {
        "template" => {
            m.deny_unknown(&["type", "template"])?;
            let (list, _) = graders::messages(&m, "template", ns)?;
            Ok(InputMessages::Template(list))
        }
        "item_reference" => {
            m.deny_unknown(&["type", "item_reference"])?;
            let path = m.required_str("item_reference")?;
            let path = path
                .trim()
                .trim_start_matches("{{")
                .trim_end_matches("}}")
                .trim();
            ns.check(&format!("{{{{{path}}}}}"), &m.path_of("item_reference"))?;
            if !path.starts_with("item.") {
                return Err(ApiError::invalid_param(
                    m.path_of("item_reference"),
                    "invalid_value",
                    format!("Invalid 'item_reference': expected a path into the item, such as 'item.input', got '{path}'."),
                ));
            }
            Ok(InputMessages::ItemReference(path.to_string()))
        }
        other => Err(invalid_value(
            &m.path_of("type"),
            other,
            &["template", "item_reference"],
        )),
    }
}

/// A source's `metadata` filter: string values only.
fn metadata_filter(s: &Fields) -> Result<Vec<(String, String)>, ApiError> {
    match s.object("metadata")? {
        None => Ok(Vec::new()),
        Some(m) => m
            .map
            .iter()
            .map(|(k, v)| match v {
                Value::String(v) => Ok((k.clone(), v.clone())),
                other => Err(invalid_type(&m.path_of(k), "a string", other)),
            })
            .collect(),
    }
}

/// A `responses` source: the filter over stored responses.
fn parse_responses_filter(s: &Fields) -> Result<ResponsesFilter, ApiError> {
    s.deny_unknown(&[
        "type",
        "metadata",
        "model",
        "instructions_search",
        "created_after",
        "created_before",
        "reasoning_effort",
        "temperature",
        "top_p",
        "users",
        "tools",
    ])?;
    let strings = |key: &str| -> Result<Vec<String>, ApiError> {
        let Some(list) = s.array(key)? else {
            return Ok(Vec::new());
        };
        list.iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(v) => Ok(v.clone()),
                other => Err(invalid_type(
                    &format!("{}[{i}]", s.path_of(key)),
                    "a string",
                    other,
                )),
            })
            .collect()
    };
    Ok(ResponsesFilter {
        metadata: metadata_filter(s)?,
        model: s.str("model")?.map(str::to_string),
        instructions_search: s.str("instructions_search")?.map(str::to_string),
        created_after: s.integer("created_after", 0, i64::MAX)?,
        created_before: s.integer("created_before", 0, i64::MAX)?,
        reasoning_effort: s.str("reasoning_effort")?.map(str::to_string),
        temperature: s.decimal("temperature", 0.0, 2.0)?,
        top_p: s.decimal("top_p", 0.0, 1.0)?,
        users: strings("users")?,
        tools: strings("tools")?,
    })
}

/// `sampling_params` as members of the chat or Responses request.
fn parse_sampling_params(f: &Fields, api: Api) -> Result<Map<String, Value>, ApiError> {
    let mut out = Map::new();
    let Some(s) = f.object("sampling_params")? else {
        return Ok(out);
    };
    s.deny_unknown(&[
        "temperature",
        "max_completion_tokens",
        "max_completions_tokens",
        "top_p",
        "seed",
        "response_format",
        "tools",
        "text",
        "reasoning_effort",
    ])?;
    if let Some(t) = s.decimal("temperature", 0.0, 2.0)? {
        out.insert("temperature".into(), json!(t));
    }
    if let Some(p) = s.decimal("top_p", 0.0, 1.0)? {
        out.insert("top_p".into(), json!(p));
    }
    let max_key = match api {
        Api::Chat => "max_completion_tokens",
        Api::Responses => "max_output_tokens",
    };
    // The Responses API's `max_output_tokens` starts at 16: refused now, not per item later.
    let min_tokens = if api == Api::Responses { 16 } else { 1 };
    for key in ["max_completion_tokens", "max_completions_tokens"] {
        if let Some(n) = s.integer(key, min_tokens, 32_768)? {
            out.insert(max_key.into(), json!(n));
        }
    }
    if let Some(seed) = s.integer("seed", i64::MIN, i64::MAX)? {
        if api == Api::Responses {
            return Err(ApiError::invalid_param(
                s.path_of("seed"),
                "unsupported_parameter",
                "The Responses API takes no 'seed'; leave it out of a 'responses' run's sampling_params.",
            ));
        }
        out.insert("seed".into(), json!(seed));
    }
    let members: &[&str] = match api {
        Api::Chat => &["response_format", "tools"],
        Api::Responses => &["text", "tools"],
    };
    for key in ["response_format", "tools", "text"] {
        if let Some(v) = s.get(key) {
            if !members.contains(&key) {
                return Err(ApiError::invalid_param(
                    s.path_of(key),
                    "unknown_parameter",
                    format!("'{key}' is not a sampling parameter of this data source type."),
                ));
            }
            out.insert(key.into(), v.clone());
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Runs

async fn create_run(
    State(app): State<Arc<App>>,
    Path(eval_id): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<Value>), ServerError> {
    let eval = find_eval(&app, &eval_id).await?;
    let map = parse_object(&body)?;
    let f = Fields::new(&map, "");
    f.deny_unknown(&["name", "metadata", "data_source"])?;
    let metadata = ferrum_protocol::chat::parse_metadata(&f)?;
    let ds_fields = f
        .object("data_source")?
        .ok_or_else(|| missing("data_source"))?;
    let config = Config::of(&parse_json(&eval.data_source_config));
    let ds = parse_data_source(&ds_fields, &config)?;
    if let Some(s) = &ds.sampling {
        crate::fine_tuning::tier(&app, &s.model)
            .await
            .map_err(|e| e.with_param("data_source.model"))?;
    }
    if let Source::File(file_id) = &ds.source {
        // A bad line is known now: a 400 naming it, rather than a run that fails later.
        let items = read_file(&app, file_id, &config).await.map_err(|e| {
            ServerError::from(ApiError::invalid_param(
                "data_source.source.id",
                e.code,
                e.message,
            ))
        })?;
        check_count(items.len()).map_err(|e| e.with_param("data_source.source.id"))?;
    }
    let id = random_id("evalrun_");
    let model = ds
        .sampling
        .as_ref()
        .map(|s| s.model.clone())
        .or(match &ds.source {
            Source::Stored { model, .. } => model.clone(),
            Source::Responses(filter) => filter.model.clone(),
            _ => None,
        });
    let record = RunRecord {
        name: f
            .str("name")?
            .map(str::to_string)
            .or_else(|| model.clone())
            .unwrap_or_else(|| id.clone()),
        id,
        eval_id: eval.id.clone(),
        created_at: now(),
        model: model.unwrap_or_default(),
        status: RunStatus::Queued,
        data_source: Value::Object(ds_fields.map.clone()).to_string(),
        metadata: metadata.map(|m| Value::Object(m).to_string()),
        error: None,
    };
    app.store.create_run(&record).await?;
    tracing::info!(id = %record.id, eval = %eval.id, "eval run created");
    app.evals.wakeup.notify_one();
    let out = run_object(&app, &eval, &record, &host(&headers)).await?;
    Ok((StatusCode::CREATED, Json(out)))
}

fn check_count(n: usize) -> Result<(), ServerError> {
    if n > MAX_ITEMS {
        return Err(ApiError::invalid_request(format!(
            "The data source has {n} items; a run may have at most {MAX_ITEMS}."
        ))
        .into());
    }
    Ok(())
}

/// Why a data source could not be read: the run's `error`.
#[derive(Debug)]
struct SourceError {
    code: &'static str,
    message: String,
}

/// Reads a JSONL file of items; an error names the first bad line.
async fn read_file(app: &App, file_id: &str, config: &Config) -> Result<Vec<NewItem>, SourceError> {
    let file = crate::files::find(app, file_id)
        .await
        .map_err(|_| SourceError {
            code: "file_not_found",
            message: format!("No such File object: {file_id}"),
        })?;
    if !matches!(file.purpose.as_str(), "evals" | "fine-tune") {
        return Err(SourceError {
            code: "invalid_file",
            message: format!(
                "The file {file_id} has purpose '{}'; an eval run's file must have purpose \
                 'evals' (or 'fine-tune').",
                file.purpose
            ),
        });
    }
    let text = tokio::fs::read(app.blobs.path(file_id))
        .await
        .map_err(|e| SourceError {
            code: "invalid_file",
            message: format!("The file {file_id} cannot be read: {e}"),
        })?;
    let mut items = Vec::new();
    for (i, raw) in text.split(|&b| b == b'\n').enumerate() {
        if raw.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let bad = |why: String| SourceError {
            code: "invalid_file_line",
            message: format!("Line {} of file {file_id}: {why}.", i + 1),
        };
        let v: Value =
            serde_json::from_slice(raw).map_err(|e| bad(format!("not valid JSON ({e})")))?;
        items.push(content_item(&v, config).map_err(bad)?);
    }
    if items.is_empty() {
        return Err(SourceError {
            code: "empty_file",
            message: format!("The file {file_id} has no items."),
        });
    }
    Ok(items)
}

/// The URL the run's report is at: the run itself, on this server.
fn host(headers: &HeaderMap) -> String {
    headers
        .get(axum::http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("localhost")
        .to_string()
}

async fn run_object(
    app: &App,
    eval: &EvalRecord,
    r: &RunRecord,
    host: &str,
) -> Result<Value, ServerError> {
    let counts = app.store.run_counts(&r.id).await?;
    let usage = app.store.run_usage(&r.id).await?;
    let per_criterion = app.store.run_criteria(&r.id).await?;
    let criteria: Vec<Value> = parse_json(&eval.testing_criteria)
        .as_array()
        .cloned()
        .unwrap_or_default();
    let per_criterion: Vec<Value> = criteria
        .iter()
        .filter_map(|c| c["id"].as_str())
        .map(|id| {
            let found = per_criterion.iter().find(|p| p.criterion == id);
            json!({
                "testing_criteria": id,
                "passed": found.map_or(0, |p| p.passed),
                "failed": found.map_or(0, |p| p.failed),
            })
        })
        .collect();
    Ok(json!({
        "object": "eval.run",
        "id": r.id,
        "eval_id": r.eval_id,
        "status": r.status.as_str(),
        "model": r.model,
        "name": r.name,
        "created_at": r.created_at,
        "report_url": format!("http://{host}/v1/evals/{}/runs/{}", r.eval_id, r.id),
        "result_counts": {
            "total": counts.total,
            "errored": counts.errored,
            "failed": counts.failed,
            "passed": counts.passed,
        },
        "per_model_usage": usage.iter().map(|u| json!({
            "model_name": u.model,
            "invocation_count": u.invocations,
            "prompt_tokens": u.prompt_tokens,
            "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens,
            "cached_tokens": u.cached_tokens,
        })).collect::<Vec<_>>(),
        "per_testing_criteria_results": per_criterion,
        "data_source": parse_json(&r.data_source),
        "metadata": r.metadata.as_deref().map_or(Value::Null, parse_json),
        "error": r.error.as_deref().map_or(Value::Null, parse_json),
    }))
}

async fn find_run(app: &App, eval_id: &str, run_id: &str) -> Result<RunRecord, ServerError> {
    app.store.get_run(eval_id, run_id).await?.ok_or_else(|| {
        ApiError::not_found(format!("No such EvalRun object: {run_id}"))
            .with_param("run_id")
            .into()
    })
}

async fn retrieve_run(
    State(app): State<Arc<App>>,
    Path((eval_id, run_id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Json<Value>, ServerError> {
    let eval = find_eval(&app, &eval_id).await?;
    let run = find_run(&app, &eval_id, &run_id).await?;
    Ok(Json(run_object(&app, &eval, &run, &host(&headers)).await?))
}

async fn list_runs(
    State(app): State<Arc<App>>,
    Path(eval_id): Path<String>,
    headers: HeaderMap,
    Query(pairs): Query<Vec<(String, String)>>,
) -> Result<Json<ListOut<Value>>, ServerError> {
    let eval = find_eval(&app, &eval_id).await?;
    let page = paging::page(&pairs, &Rules::of(Order::Asc))?;
    let mut status = None;
    for (k, v) in &pairs {
        if k == "status" {
            status = Some(RunStatus::parse(v).ok_or_else(|| {
                invalid_value(
                    "status",
                    v,
                    &["queued", "in_progress", "completed", "canceled", "failed"],
                )
            })?);
        }
    }
    let listed = app.store.list_runs(&eval_id, status, &page).await?;
    let host = host(&headers);
    let mut items = Vec::with_capacity(listed.items.len());
    for r in &listed.items {
        items.push(run_object(&app, &eval, r, &host).await?);
    }
    let listed = Listed {
        items,
        has_more: listed.has_more,
    };
    Ok(Json(ListOut::new(listed, |v| {
        v["id"].as_str().unwrap_or("")
    })))
}

async fn cancel_run(
    State(app): State<Arc<App>>,
    Path((eval_id, run_id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Json<Value>, ServerError> {
    let eval = find_eval(&app, &eval_id).await?;
    let Some((changed, run)) = app.store.cancel_run(&eval_id, &run_id).await? else {
        return Err(find_run(&app, &eval_id, &run_id)
            .await
            .err()
            .unwrap_or_else(|| {
                ApiError::not_found(format!("No such EvalRun object: {run_id}")).into()
            }));
    };
    if !changed && run.status != RunStatus::Canceled {
        return Err(ApiError::invalid_request(format!(
            "Cannot cancel a run with status '{}'.",
            run.status.as_str()
        ))
        .with_code("invalid_state")
        .into());
    }
    if changed {
        tracing::info!(id = %run.id, "eval run canceled");
        app.evals.wakeup.notify_one();
    }
    Ok(Json(run_object(&app, &eval, &run, &host(&headers)).await?))
}

async fn delete_run(
    State(app): State<Arc<App>>,
    Path((eval_id, run_id)): Path<(String, String)>,
) -> Result<Json<Value>, ServerError> {
    find_eval(&app, &eval_id).await?;
    if !app.store.delete_run(&eval_id, &run_id).await? {
        return Err(
            ApiError::not_found(format!("No such EvalRun object: {run_id}"))
                .with_param("run_id")
                .into(),
        );
    }
    tracing::info!(id = %run_id, "eval run deleted");
    Ok(Json(
        json!({"object": "eval.run.deleted", "deleted": true, "run_id": run_id}),
    ))
}

// ---------------------------------------------------------------------------------------------
// Output items

fn output_item_object(eval_id: &str, o: &OutputItemRecord) -> Value {
    json!({
        "object": "eval.run.output_item",
        "id": o.id,
        "run_id": o.run_id,
        "eval_id": eval_id,
        "created_at": o.created_at,
        // Errored items are failures to the API (their sample carries the error).
        "status": if o.outcome == ItemOutcome::Pass { "pass" } else { "fail" },
        "datasource_item_id": o.index,
        "datasource_item": parse_json(&o.item),
        "results": parse_json(&o.results),
        "sample": parse_json(&o.sample),
    })
}

async fn list_output_items(
    State(app): State<Arc<App>>,
    Path((eval_id, run_id)): Path<(String, String)>,
    Query(pairs): Query<Vec<(String, String)>>,
) -> Result<Json<ListOut<Value>>, ServerError> {
    find_run(&app, &eval_id, &run_id).await?;
    let page = paging::page(&pairs, &Rules::of(Order::Asc))?;
    let mut filter = OutputFilter::All;
    for (k, v) in &pairs {
        if k == "status" {
            filter = match v.as_str() {
                "pass" => OutputFilter::Passed,
                "fail" => OutputFilter::Failed,
                other => return Err(invalid_value("status", other, &["fail", "pass"]).into()),
            };
        }
    }
    let listed = app
        .store
        .list_output_items(&run_id, filter, &page)
        .await?
        .map(|o| output_item_object(&eval_id, &o));
    Ok(Json(ListOut::new(listed, |v| {
        v["id"].as_str().unwrap_or("")
    })))
}

async fn retrieve_output_item(
    State(app): State<Arc<App>>,
    Path((eval_id, run_id, item_id)): Path<(String, String, String)>,
) -> Result<Json<Value>, ServerError> {
    find_run(&app, &eval_id, &run_id).await?;
    let o = app
        .store
        .get_output_item(&run_id, &item_id)
        .await?
        .ok_or_else(|| {
            ApiError::not_found(format!("No such EvalRunOutputItem object: {item_id}"))
                .with_param("output_item_id")
        })?;
    Ok(Json(output_item_object(&eval_id, &o)))
}

// ---------------------------------------------------------------------------------------------
// The worker

/// Milliseconds since the epoch, the unit of leases.
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Items being graded by this worker, by task.
type InFlight = HashMap<tokio::task::Id, (tokio::task::AbortHandle, ClaimedItem)>;

/// The eval worker of this server; ends (handing its running items back) when `stop` fires.
pub async fn run_worker(app: Arc<App>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let config = app.batch.clone();
    let worker = app.worker_id.clone();
    let lease_ms = config.lease.as_millis() as i64;
    let mut running: JoinSet<()> = JoinSet::new();
    let mut in_flight: InFlight = HashMap::new();
    let mut heartbeat = tokio::time::interval(config.lease / 3);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            _ = heartbeat.tick() => {
                if let Err(e) = app.store.renew_eval_leases(&worker, now_ms(), lease_ms).await {
                    tracing::warn!(error = %e, "could not renew the eval leases");
                }
                stop_ended(&app, &worker, &mut in_flight).await;
            }
            Some(done) = running.join_next_with_id() => {
                match done {
                    Ok((id, ())) => { in_flight.remove(&id); }
                    Err(e) => { in_flight.remove(&e.id()); }
                }
            }
            _ = app.evals.wakeup.notified() => {}
            _ = tokio::time::sleep(config.poll) => {}
        }
        if let Err(e) = step(&app, &worker, lease_ms, &mut running, &mut in_flight).await {
            tracing::warn!(error = %e, "eval worker step failed; retrying");
            tokio::time::sleep(config.poll).await;
        }
    }
    running.abort_all();
    while running.join_next().await.is_some() {}
    match app.store.release_items(&worker).await {
        Ok(n) if n > 0 => tracing::info!(items = n, "eval items handed back at shutdown"),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "could not hand eval items back"),
    }
}

/// One round of work: read queued runs' data sources, claim items, complete finished runs.
async fn step(
    app: &Arc<App>,
    worker: &str,
    lease_ms: i64,
    running: &mut JoinSet<()>,
    in_flight: &mut InFlight,
) -> Result<(), ServerError> {
    while let Some(run) = app.store.claim_run(worker, now_ms(), lease_ms).await? {
        start(app, worker, run).await?;
    }
    let room = app.batch.window.saturating_sub(running.len());
    if room > 0 {
        for item in app
            .store
            .claim_items(worker, now_ms(), lease_ms, room)
            .await?
        {
            let (app2, worker2, item2) = (Arc::clone(app), worker.to_string(), item.clone());
            let handle =
                running.spawn(async move { grade_and_write(&app2, &worker2, item2).await });
            in_flight.insert(handle.id(), (handle, item));
        }
    }
    for id in app.store.complete_runs().await? {
        tracing::info!(%id, "eval run completed");
    }
    Ok(())
}

/// Stops the items of runs no longer in progress (canceled or deleted).
async fn stop_ended(app: &App, worker: &str, in_flight: &mut InFlight) {
    let mut runs: Vec<String> = in_flight.values().map(|(_, i)| i.run_id.clone()).collect();
    runs.sort_unstable();
    runs.dedup();
    for id in runs {
        match app.store.find_run(&id).await {
            Ok(Some(r)) if r.status == RunStatus::InProgress => continue,
            Err(_) => continue,
            _ => {}
        }
        let tasks: Vec<tokio::task::Id> = in_flight
            .iter()
            .filter(|(_, (_, i))| i.run_id == id)
            .map(|(task, _)| *task)
            .collect();
        for task in tasks {
            if let Some((handle, item)) = in_flight.remove(&task) {
                handle.abort();
                let _ = app.store.release_item(worker, &item).await;
            }
        }
        tracing::info!(run = %id, "stopped the items of a run no longer in progress");
    }
}

/// Reads a claimed run's data source into its items and starts it, or fails it.
async fn start(app: &App, worker: &str, run: RunRecord) -> Result<(), ServerError> {
    let Some(eval) = app.store.get_eval(&run.eval_id).await? else {
        app.store.release_run(&run.id, worker).await?;
        return Ok(());
    };
    let config = Config::of(&parse_json(&eval.data_source_config));
    let items = match data_source(&run, &config) {
        Ok(ds) => items(app, &ds.source, &config).await,
        Err(e) => Err(SourceError {
            code: "invalid_data_source",
            message: e.message,
        }),
    };
    let items = items.and_then(|items| match items.len() {
        0 => Err(SourceError {
            code: "empty_data_source",
            message: "The data source has no items (no stored completion or response matches \
                      its filter)."
                .into(),
        }),
        n if n > MAX_ITEMS => Err(SourceError {
            code: "too_many_items",
            message: format!("The data source has {n} items; a run may have at most {MAX_ITEMS}."),
        }),
        _ => Ok(items),
    });
    match items {
        Ok(items) => {
            let n = items.len();
            if app.store.start_run(&run.id, worker, &items).await? {
                tracing::info!(id = %run.id, items = n, "eval run in progress");
            }
        }
        Err(e) => {
            tracing::info!(id = %run.id, code = e.code, "eval run failed");
            let error = json!({"code": e.code, "message": e.message}).to_string();
            app.store.fail_run(&run.id, worker, &error).await?;
        }
    }
    Ok(())
}

fn data_source(run: &RunRecord, config: &Config) -> Result<DataSource, ApiError> {
    let v = parse_json(&run.data_source);
    let Value::Object(map) = &v else {
        return Err(ApiError::invalid_request(
            "the run's data source is not an object",
        ));
    };
    parse_data_source(&Fields::new(map, "data_source"), config)
}

/// The items of a source.
async fn items(app: &App, source: &Source, config: &Config) -> Result<Vec<NewItem>, SourceError> {
    match source {
        Source::Content(items) => Ok(items.clone()),
        Source::File(id) => read_file(app, id, config).await,
        Source::Stored {
            metadata,
            model,
            created_after,
            created_before,
            limit,
        } => {
            let filter = CompletionFilter {
                model: model.clone(),
                metadata: metadata.clone(),
            };
            let limit = limit.unwrap_or(MAX_ITEMS);
            let mut page = Page {
                after: None,
                limit: 100,
                order: Order::Asc,
            };
            let mut out = Vec::new();
            loop {
                let listed = app
                    .store
                    .list_completions(&filter, &page)
                    .await
                    .map_err(|e| SourceError {
                        code: "server_error",
                        message: format!("The stored completions could not be read: {e}"),
                    })?;
                page.after = listed.items.last().map(|c| c.id.clone());
                for c in &listed.items {
                    let in_window = created_after.is_none_or(|t| c.created >= t)
                        && created_before.is_none_or(|t| c.created < t);
                    if in_window && out.len() < limit {
                        out.push(stored_item(c));
                    }
                }
                if !listed.has_more || out.len() >= limit {
                    break;
                }
            }
            Ok(out)
        }
        Source::Responses(filter) => stored_responses(app, filter).await,
    }
}

/// The items of a `responses` source: finished stored responses that pass its filter, oldest
/// first, at most [`MAX_ITEMS`] + 1 (so that too many is reported, not cut).
async fn stored_responses(
    app: &App,
    filter: &ResponsesFilter,
) -> Result<Vec<NewItem>, SourceError> {
    let mut page = Page {
        after: None,
        limit: 100,
        order: Order::Asc,
    };
    let mut out = Vec::new();
    loop {
        let listed = app
            .store
            .list_finished_responses(filter.model.as_deref(), &page)
            .await
            .map_err(|e| SourceError {
                code: "server_error",
                message: format!("The stored responses could not be read: {e}"),
            })?;
        page.after = listed.items.last().map(|r| r.id.clone());
        for r in &listed.items {
            let object = parse_json(&r.object);
            if filter.matches(&object) && out.len() <= MAX_ITEMS {
                out.push(response_item(r, &object));
            }
        }
        if !listed.has_more || out.len() > MAX_ITEMS {
            return Ok(out);
        }
    }
}

/// A stored response as an item (`input`: its own input items as messages; `output_text`: its
/// answer; also `instructions`, `metadata`, `user`) with its output as the sample.
fn response_item(r: &ferrum_store::ResponseRecord, object: &Value) -> NewItem {
    let input: Vec<Value> = parse_json(&r.input_items)
        .as_array()
        .into_iter()
        .flatten()
        .filter(|i| i["type"].as_str().is_none_or(|t| t == "message"))
        .map(|i| json!({"role": i["role"], "content": message_text(&i["content"])}))
        .collect();
    let (text, tools) = response_output(object);
    let item = json!({
        "id": r.id,
        "model": r.model,
        "created_at": r.created_at,
        "metadata": object["metadata"],
        "instructions": object["instructions"],
        "user": object["user"],
        "input": input,
        "output_text": text,
    });
    let mut sample = json!({
        "model": object["model"],
        "output_text": text,
        "finish_reason": match (tools.is_null(), object["status"].as_str()) {
            (false, _) => "tool_calls",
            (true, Some("incomplete")) => "length",
            (true, _) => "stop",
        },
        "usage": {
            "prompt_tokens": object["usage"]["input_tokens"],
            "completion_tokens": object["usage"]["output_tokens"],
            "total_tokens": object["usage"]["total_tokens"],
        },
    });
    if !tools.is_null() {
        sample["output_tools"] = tools;
    }
    NewItem {
        item: item.to_string(),
        given: Some(with_output_json(sample).to_string()),
    }
}

/// A sample context with `output_json` set when its `output_text` is a JSON object or array.
fn with_output_json(mut sample: Value) -> Value {
    let text = sample["output_text"].as_str().unwrap_or_default();
    if let Ok(parsed @ (Value::Object(_) | Value::Array(_))) = serde_json::from_str::<Value>(text) {
        sample["output_json"] = parsed;
    }
    sample
}

/// A stored completion as an item (`input`: its request's messages; `output_text`: its
/// answer) with its answer as the sample.
fn stored_item(c: &ferrum_store::StoredCompletion) -> NewItem {
    let request = parse_json(&c.request);
    let response = parse_json(&c.response);
    let answer = response["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let metadata: Map<String, Value> = c
        .metadata
        .iter()
        .map(|(k, v)| (k.clone(), json!(v)))
        .collect();
    let item = json!({
        "id": c.id,
        "model": c.model,
        "created": c.created,
        "metadata": metadata,
        "input": request["messages"],
        "output_text": answer,
    });
    let sample = json!({
        "model": response["model"],
        "choices": response["choices"],
        "output_text": answer,
        "finish_reason": response["choices"][0]["finish_reason"],
        "usage": response["usage"],
    });
    NewItem {
        item: item.to_string(),
        given: Some(with_output_json(sample).to_string()),
    }
}

/// Grades a claimed item and writes its result if this worker still owns it.
async fn grade_and_write(app: &Arc<App>, worker: &str, item: ClaimedItem) {
    let result = match grade(app, &item).await {
        Ok(r) => r,
        Err(e) => {
            // The run or eval is gone or unreadable: nothing to grade against.
            tracing::warn!(error = %e, run = %item.run_id, "cannot grade an eval item");
            let _ = app.store.release_item(worker, &item).await;
            return;
        }
    };
    match app.store.finish_item(worker, &item, &result).await {
        Ok(true) => tracing::debug!(run = %item.run_id, index = item.index, "eval item graded"),
        Ok(false) => tracing::warn!(
            run = %item.run_id,
            index = item.index,
            "eval item result dropped: its claim was lost"
        ),
        Err(e) => tracing::error!(error = %e, run = %item.run_id, "could not write an eval item"),
    }
}

/// The model calls an item made, and their ledger records.
#[derive(Default)]
struct Calls {
    usage: Vec<ModelUsage>,
    ledger: Vec<UsageRecord>,
}

impl Calls {
    /// Calls a model through the chat path at background priority: the completion as JSON.
    async fn chat(
        &mut self,
        app: &Arc<App>,
        item: &ClaimedItem,
        body: &Value,
    ) -> Result<Value, ApiError> {
        let req = parse_chat_request(body.to_string().as_bytes())?;
        let model = req.model.clone();
        let (completion, usage) = crate::chat::run_for_batch(app, req)
            .await
            .map_err(ServerError::into_api_logged)?;
        self.add(app, item, &model, &usage).await;
        Ok(serde_json::to_value(&completion).unwrap_or(Value::Null))
    }

    /// Calls a model through the Responses path: the response object.
    async fn responses(
        &mut self,
        app: &Arc<App>,
        item: &ClaimedItem,
        body: &Value,
    ) -> Result<Value, ApiError> {
        let model = body["model"].as_str().unwrap_or_default().to_string();
        let (object, usage) = crate::responses::run_for_batch(app, body.to_string().as_bytes())
            .await
            .map_err(ServerError::into_api_logged)?;
        self.add(app, item, &model, &usage).await;
        Ok(object)
    }

    /// The cosine similarity of two texts' embeddings by the server's embedding tier, billed
    /// like the other calls of the item.
    async fn cosine(
        &mut self,
        app: &Arc<App>,
        item: &ClaimedItem,
        a: String,
        b: String,
    ) -> Result<f64, graders::GradeError> {
        let failed = |message: String| graders::GradeError {
            code: "grader_error",
            message,
        };
        let tier = app
            .models
            .embedding_tier()
            .ok_or_else(|| failed("no embedding model is configured".into()))?;
        let loaded = app
            .models
            .get_embedder(&tier.id)
            .await
            .map_err(|e| failed(e.message))?;
        let (vectors, tokens) = crate::embeddings::embed_texts(app, &loaded, vec![a, b])
            .await
            .map_err(|e| failed(e.into_api_logged().message))?;
        let usage = ferrum_protocol::response::Usage::new(tokens, 0, 0);
        self.add(app, item, &tier.id, &usage).await;
        Ok(graders::cosine(&vectors[0], &vectors[1]))
    }

    async fn add(
        &mut self,
        app: &App,
        item: &ClaimedItem,
        model: &str,
        usage: &ferrum_protocol::response::Usage,
    ) {
        let cached = usage.prompt_tokens_details.cached_tokens;
        match self.usage.iter_mut().find(|u| u.model == model) {
            Some(u) => {
                u.invocations += 1;
                u.prompt_tokens += usage.prompt_tokens;
                u.cached_tokens += cached;
                u.completion_tokens += usage.completion_tokens;
            }
            None => self.usage.push(ModelUsage {
                model: model.to_string(),
                invocations: 1,
                prompt_tokens: usage.prompt_tokens,
                cached_tokens: cached,
                completion_tokens: usage.completion_tokens,
            }),
        }
        if let Ok(tier) = crate::fine_tuning::tier(app, model).await {
            // Eval calls are billed as batch lines: half the tier's price.
            let cost = 0.5
                * tier
                    .price
                    .cost_usd(usage.prompt_tokens, cached, usage.completion_tokens);
            self.ledger.push(UsageRecord {
                // Derived from the item and the call: a retried write never bills twice.
                id: format!("{}-{}-{}", item.run_id, item.index, self.ledger.len()),
                created: now(),
                model: tier.id.clone(),
                endpoint: "batch.evals".into(),
                prompt_tokens: usage.prompt_tokens,
                cached_tokens: cached,
                completion_tokens: usage.completion_tokens,
                cost_usd: cost,
                batch: true,
            });
        }
    }
}

/// Samples (when the run does) and grades one item.
async fn grade(app: &Arc<App>, item: &ClaimedItem) -> Result<ItemResult, ServerError> {
    let run = app
        .store
        .find_run(&item.run_id)
        .await?
        .ok_or_else(|| ServerError::internal("grading an item", "its run is gone"))?;
    let eval = app
        .store
        .get_eval(&run.eval_id)
        .await?
        .ok_or_else(|| ServerError::internal("grading an item", "its eval is gone"))?;
    let config = Config::of(&parse_json(&eval.data_source_config));
    let ds = data_source(&run, &config)?;
    let criteria = criteria(&eval)?;
    let item_json = parse_json(&item.item);
    let given = item.given.as_deref().map_or(json!({}), parse_json);
    let mut calls = Calls::default();
    let (sample_ctx, sample) = match &ds.sampling {
        Some(s) => generate(app, item, s, &item_json, &mut calls).await,
        None => (given.clone(), recorded_sample(&given)),
    };
    let mut outcome = if sample["error"].is_null() {
        ItemOutcome::Pass
    } else {
        ItemOutcome::Error
    };
    let ctx = json!({"item": item_json, "sample": sample_ctx});
    let mut results = Vec::new();
    let mut passed_by = Vec::new();
    for c in &criteria {
        if outcome == ItemOutcome::Error {
            break;
        }
        match grade_one(app, item, c, &ctx, &mut calls).await {
            Ok((grade, grader_sample)) => {
                if !grade.passed {
                    outcome = ItemOutcome::Fail;
                }
                passed_by.push((c.id.clone(), grade.passed));
                results.push(json!({
                    "name": c.id, "type": c.grader_type(), "score": grade.score,
                    "passed": grade.passed, "sample": grader_sample,
                }));
            }
            Err(e) => {
                outcome = ItemOutcome::Error;
                results.push(json!({
                    "name": c.id, "type": c.grader_type(), "score": 0.0, "passed": false,
                    "sample": null, "error": {"code": e.code, "message": e.message},
                }));
            }
        }
    }
    if outcome == ItemOutcome::Error {
        // An errored item counts for no criterion.
        passed_by.clear();
    }
    Ok(ItemResult {
        outcome,
        created_at: now(),
        results: Value::Array(results).to_string(),
        sample: sample.to_string(),
        usage: calls.usage,
        criteria: passed_by,
        ledger: calls.ledger,
    })
}

fn criteria(eval: &EvalRecord) -> Result<Vec<Criterion>, ServerError> {
    let list = parse_json(&eval.testing_criteria);
    let list = list.as_array().cloned().unwrap_or_default();
    let ns = Namespace { item_fields: None };
    let (criteria, _) = graders::parse_criteria(&list, "testing_criteria", &ns)
        .map_err(|e| ServerError::corrupt(&eval.id, e.message))?;
    Ok(criteria)
}

impl Criterion {
    fn grader_type(&self) -> &'static str {
        match self.grader {
            graders::Grader::StringCheck { .. } => "string_check",
            graders::Grader::TextSimilarity { .. } => "text_similarity",
            graders::Grader::LabelModel { .. } => "label_model",
            graders::Grader::ScoreModel { .. } => "score_model",
        }
    }
}

/// Grades one criterion: the grade and, for a model grader, its call as a sample.
async fn grade_one(
    app: &Arc<App>,
    item: &ClaimedItem,
    c: &Criterion,
    ctx: &Value,
    calls: &mut Calls,
) -> Result<(graders::Grade, Value), graders::GradeError> {
    if let Some((a, b, threshold)) = c.grader.cosine_texts(ctx)? {
        let score = calls.cosine(app, item, a, b).await?;
        let grade = graders::Grade {
            score,
            passed: score >= threshold,
        };
        return Ok((grade, Value::Null));
    }
    if c.grader.model().is_none() {
        return Ok((c.grader.grade_local(ctx)?, Value::Null));
    }
    let body = c.grader.model_request(ctx)?;
    let completion = calls
        .chat(app, item, &body)
        .await
        .map_err(|e| graders::GradeError {
            code: "grader_error",
            message: e.message,
        })?;
    let answer = completion["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default();
    let grade = c.grader.model_grade(answer)?;
    let sample = chat_sample(&body, &completion, None);
    Ok((grade, sample))
}

/// An output item's `sample` for a chat call (`body` -> `completion`).
fn chat_sample(body: &Value, completion: &Value, error: Option<&ApiError>) -> Value {
    let choice = &completion["choices"][0];
    let usage = &completion["usage"];
    let output = match choice["message"]["content"].as_str() {
        Some(text) => json!([{"role": "assistant", "content": text}]),
        None => json!([]),
    };
    json!({
        "input": body["messages"].as_array().map(|ms| ms.iter().map(|m| json!({
            "role": m["role"],
            "content": message_text(&m["content"]),
        })).collect::<Vec<_>>()).unwrap_or_default(),
        "output": output,
        "finish_reason": choice["finish_reason"].as_str().unwrap_or(""),
        "model": completion["model"].as_str().or(body["model"].as_str()).unwrap_or(""),
        "usage": {
            "total_tokens": usage["total_tokens"].as_u64().unwrap_or(0),
            "completion_tokens": usage["completion_tokens"].as_u64().unwrap_or(0),
            "prompt_tokens": usage["prompt_tokens"].as_u64().unwrap_or(0),
            "cached_tokens": usage["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap_or(0),
        },
        "error": error.map_or(Value::Null, |e| json!({
            "code": e.code.clone().unwrap_or_else(|| "error".into()),
            "message": e.message,
        })),
        "temperature": body["temperature"].as_f64().unwrap_or(1.0),
        "max_completion_tokens": body["max_completion_tokens"]
            .as_u64()
            .or(body["max_output_tokens"].as_u64())
            .unwrap_or(0),
        "top_p": body["top_p"].as_f64().unwrap_or(1.0),
        "seed": body["seed"].as_i64().unwrap_or(0),
    })
}

/// A message's content as text (a string, or its text parts joined).
fn message_text(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p["text"].as_str())
            .collect::<Vec<_>>()
            .join(""),
        Value::Object(_) => content["text"].as_str().unwrap_or_default().to_string(),
        _ => String::new(),
    }
}

/// The output item's `sample` for an item whose sample was given (a JSONL `sample`, a stored
/// completion's answer) rather than generated.
fn recorded_sample(given: &Value) -> Value {
    let completion = json!({
        "choices": [{"message": {"content": given["output_text"]}, "finish_reason": given["finish_reason"]}],
        "model": given["model"],
        "usage": given["usage"],
    });
    chat_sample(&json!({}), &completion, None)
}

/// Generates an item's sample: the template context (`output_text`, `output_json`, ...) and
/// the output item's `sample` (with `error` set if the call failed).
async fn generate(
    app: &Arc<App>,
    item: &ClaimedItem,
    s: &Sampling,
    item_json: &Value,
    calls: &mut Calls,
) -> (Value, Value) {
    let ctx = json!({"item": item_json});
    let messages = match input_messages(&s.input, &ctx) {
        Ok(m) => m,
        Err(e) => {
            let err = ApiError::invalid_request(e.message).with_code(e.code);
            let body = json!({"model": s.model, "messages": []});
            return (json!({}), chat_sample(&body, &json!({}), Some(&err)));
        }
    };
    let mut body = json!({"model": s.model});
    for (k, v) in &s.params {
        body[k] = v.clone();
    }
    let (completion, text, tools) = match s.api {
        Api::Chat => {
            body["messages"] = json!(messages);
            match calls.chat(app, item, &body).await {
                Ok(c) => {
                    let text = c["choices"][0]["message"]["content"]
                        .as_str()
                        .unwrap_or("")
                        .to_string();
                    let tools = c["choices"][0]["message"]["tool_calls"].clone();
                    (c, text, tools)
                }
                Err(e) => return (json!({}), chat_sample(&body, &json!({}), Some(&e))),
            }
        }
        Api::Responses => {
            body["input"] = json!(messages);
            body["store"] = json!(false);
            match calls.responses(app, item, &body).await {
                Ok(r) => {
                    let (text, tools) = response_output(&r);
                    // The response as a chat completion, so samples have one shape.
                    let c = json!({
                        "model": r["model"],
                        "choices": [{"message": {"role": "assistant", "content": text}, "finish_reason":
                            if r["status"] == "incomplete" { "length" } else { "stop" }}],
                        "usage": {
                            "prompt_tokens": r["usage"]["input_tokens"],
                            "completion_tokens": r["usage"]["output_tokens"],
                            "total_tokens": r["usage"]["total_tokens"],
                            "prompt_tokens_details": r["usage"]["input_tokens_details"],
                        },
                    });
                    body["messages"] = json!(messages);
                    (c, text, tools)
                }
                Err(e) => {
                    body["messages"] = json!(messages);
                    return (json!({}), chat_sample(&body, &json!({}), Some(&e)));
                }
            }
        }
    };
    let mut sample_ctx = json!({
        "model": completion["model"],
        "choices": completion["choices"],
        "output_text": text,
        "finish_reason": completion["choices"][0]["finish_reason"],
        "usage": completion["usage"],
    });
    if !tools.is_null() {
        sample_ctx["output_tools"] = tools;
    }
    (
        with_output_json(sample_ctx),
        chat_sample(&body, &completion, None),
    )
}

/// The text and function calls of a Responses API response object.
fn response_output(r: &Value) -> (String, Value) {
    let mut text = String::new();
    let mut tools = Vec::new();
    for item in r["output"].as_array().into_iter().flatten() {
        match item["type"].as_str() {
            Some("message") => {
                for part in item["content"].as_array().into_iter().flatten() {
                    text.push_str(part["text"].as_str().unwrap_or_default());
                }
            }
            Some("function_call") => tools.push(item.clone()),
            _ => {}
        }
    }
    (
        text,
        if tools.is_empty() {
            Value::Null
        } else {
            Value::Array(tools)
        },
    )
}

/// The chat messages of an item.
fn input_messages(input: &InputMessages, ctx: &Value) -> Result<Vec<Value>, graders::GradeError> {
    match input {
        InputMessages::Template(list) => list.iter().map(|m| m.render(ctx)).collect(),
        InputMessages::ItemReference(path) => match graders::lookup(ctx, path) {
            Some(Value::Array(list)) => Ok(list.clone()),
            _ => Err(graders::GradeError {
                code: "invalid_item",
                message: format!(
                    "The item reference '{path}' is not a list of messages in this item."
                ),
            }),
        },
    }
}
