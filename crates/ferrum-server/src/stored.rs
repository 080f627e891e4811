//! Stored chat completions: `store: true` saves a request and its response; these routes list,
//! read, re-tag and delete them (`GET/POST/DELETE /v1/chat/completions[/{id}[/messages]]`).

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::routing::get;
use axum::{Json, Router};
use ferrum_protocol::response::ChatCompletion;
use ferrum_protocol::{ApiError, ChatRequest};
use ferrum_store::{CompletionFilter, Order, StoredCompletion};
use serde_json::{json, Map, Value};

use crate::paging::{self, ListOut, Rules};
use crate::{App, ServerError};

pub fn routes() -> Router<Arc<App>> {
    Router::new()
        .route(
            "/v1/chat/completions/{id}",
            get(retrieve).post(update).delete(delete),
        )
        .route("/v1/chat/completions/{id}/messages", get(messages))
}

/// Saves a finished completion; a database failure is logged, never turned into a failed
/// response the client already paid for.
pub async fn save(app: &App, request: &Value, completion: &ChatCompletion, req: &ChatRequest) {
    let metadata = req
        .metadata
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
        .collect();
    let record = StoredCompletion {
        id: completion.id.clone(),
        created: completion.created,
        model: completion.model.clone(),
        metadata,
        request: request.to_string(),
        response: serde_json::to_string(completion).expect("responses serialize"),
    };
    if let Err(e) = app.store.insert_completion(&record).await {
        tracing::error!(error = %e, id = %completion.id, "could not store the completion");
    }
}

/// The stored response, with its current metadata and the request's sampling settings.
fn object(c: &StoredCompletion) -> Value {
    let mut out: Value = serde_json::from_str(&c.response).unwrap_or_else(|_| json!({}));
    let request: Value = serde_json::from_str(&c.request).unwrap_or_else(|_| json!({}));
    if let Some(map) = out.as_object_mut() {
        let metadata: Map<String, Value> = c
            .metadata
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        map.insert("metadata".into(), Value::Object(metadata));
        for key in [
            "temperature",
            "top_p",
            "seed",
            "tools",
            "tool_choice",
            "response_format",
        ] {
            map.insert(key.into(), request.get(key).cloned().unwrap_or(Value::Null));
        }
    }
    out
}

pub async fn list(
    State(app): State<Arc<App>>,
    Query(pairs): Query<Vec<(String, String)>>,
) -> Result<Json<ListOut<Value>>, ServerError> {
    let page = paging::page(&pairs, &Rules::of(Order::Asc))?;
    let mut filter = CompletionFilter::default();
    for (k, v) in &pairs {
        if k == "model" {
            filter.model = Some(v.clone());
        } else if let Some(key) = k
            .strip_prefix("metadata[")
            .and_then(|r| r.strip_suffix(']'))
        {
            filter.metadata.push((key.to_string(), v.clone()));
        }
    }
    let listed = app.store.list_completions(&filter, &page).await?;
    let listed = listed.map(|c| object(&c));
    Ok(Json(ListOut::new(listed, |v| {
        v["id"].as_str().unwrap_or("")
    })))
}

async fn find(app: &App, id: &str) -> Result<StoredCompletion, ServerError> {
    app.store.get_completion(id).await?.ok_or_else(|| {
        ApiError::not_found(format!("No chat completion found with id '{id}'."))
            .with_param("completion_id")
            .into()
    })
}

async fn retrieve(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ServerError> {
    Ok(Json(object(&find(&app, &id).await?)))
}

/// `POST /v1/chat/completions/{id}`: replaces the metadata (the only field that may change).
async fn update(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ServerError> {
    let map = ferrum_protocol::reader::parse_object(&body)?;
    let fields = ferrum_protocol::reader::Fields::new(&map, "");
    fields.deny_unknown(&["metadata"])?;
    let metadata = ferrum_protocol::chat::parse_metadata(&fields)?
        .map(|m| {
            m.into_iter()
                .map(|(k, v)| (k, v.as_str().unwrap_or_default().to_string()))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    let found = app.store.update_completion_metadata(&id, &metadata).await?;
    if !found {
        return Err(find(&app, &id).await.err().unwrap_or(ServerError::Conflict(
            "the completion vanished while it was updated",
        )));
    }
    Ok(Json(object(&find(&app, &id).await?)))
}

async fn delete(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ServerError> {
    if !app.store.delete_completion(&id).await? {
        return Err(find(&app, &id).await.err().unwrap_or(ServerError::Conflict(
            "the completion reappeared while it was deleted",
        )));
    }
    Ok(Json(
        json!({"object": "chat.completion.deleted", "id": id, "deleted": true}),
    ))
}

/// `GET /v1/chat/completions/{id}/messages`: the request's messages, paged.
async fn messages(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    Query(pairs): Query<Vec<(String, String)>>,
) -> Result<Json<ListOut<Value>>, ServerError> {
    let page = paging::page(&pairs, &Rules::of(Order::Asc))?;
    let c = find(&app, &id).await?;
    let request: Value = serde_json::from_str(&c.request).unwrap_or_else(|_| json!({}));
    let all: Vec<Value> = request["messages"]
        .as_array()
        .map(|ms| {
            ms.iter()
                .enumerate()
                .map(|(i, m)| message(&format!("{id}-{i}"), m))
                .collect()
        })
        .unwrap_or_default();
    Ok(Json(paging::in_memory(all, &page, |v| {
        v["id"].as_str().unwrap_or("")
    })?))
}

/// One request message as the messages list shows it: text content, and the parts when the
/// content was sent as parts.
fn message(id: &str, m: &Value) -> Value {
    let (content, parts) = match &m["content"] {
        Value::String(s) => (Value::String(s.clone()), Value::Null),
        Value::Array(parts) => {
            let text: Vec<&str> = parts.iter().filter_map(|p| p["text"].as_str()).collect();
            (Value::String(text.join("\n")), Value::Array(parts.clone()))
        }
        _ => (Value::Null, Value::Null),
    };
    let mut out = json!({
        "id": id,
        "role": m["role"],
        "content": content,
        "name": m.get("name").cloned().unwrap_or(Value::Null),
        "content_parts": parts,
        "refusal": null,
    });
    if let Some(calls) = m.get("tool_calls") {
        out["tool_calls"] = calls.clone();
    }
    if let Some(call_id) = m.get("tool_call_id") {
        out["tool_call_id"] = call_id.clone();
    }
    out
}

/// A stored completion as a fine-tuning example (chat format): the request's messages, the
/// response's first choice as the assistant turn, and the request's tools. This is what
/// distillation trains on: a larger tier's answers teach a smaller one.
pub fn training_example(c: &StoredCompletion) -> Option<Value> {
    let request: Value = serde_json::from_str(&c.request).ok()?;
    let response: Value = serde_json::from_str(&c.response).ok()?;
    let mut messages = request["messages"].as_array()?.clone();
    let reply = &response["choices"][0]["message"];
    let mut assistant = json!({"role": "assistant", "content": reply["content"]});
    if let Some(calls) = reply.get("tool_calls").filter(|v| !v.is_null()) {
        assistant["tool_calls"] = calls.clone();
    }
    messages.push(assistant);
    let mut example = json!({ "messages": messages });
    for key in ["tools", "parallel_tool_calls"] {
        if let Some(v) = request.get(key).filter(|v| !v.is_null()) {
            example[key] = v.clone();
        }
    }
    Some(example)
}

/// Every stored completion matching `filter`, oldest first, as fine-tuning JSONL lines.
pub async fn export(
    store: &ferrum_store::Store,
    filter: &CompletionFilter,
    mut out: impl std::io::Write,
) -> Result<usize, Box<dyn std::error::Error + Send + Sync>> {
    let mut page = ferrum_store::Page {
        after: None,
        limit: 100,
        order: Order::Asc,
    };
    let mut written = 0;
    loop {
        let listed = store.list_completions(filter, &page).await?;
        for c in &listed.items {
            match training_example(c) {
                Some(example) => {
                    writeln!(out, "{example}")?;
                    written += 1;
                }
                None => tracing::warn!(id = %c.id, "stored completion without messages skipped"),
            }
        }
        match (listed.has_more, listed.items.last()) {
            (true, Some(last)) => page.after = Some(last.id.clone()),
            _ => break,
        }
    }
    out.flush()?;
    Ok(written)
}
