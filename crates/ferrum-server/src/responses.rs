//! The Responses API: `POST /v1/responses` (one response object, a typed SSE event stream, or
//! a background job), `GET`/`DELETE /v1/responses/{id}`, `GET /v1/responses/{id}/input_items`
//! and `POST /v1/responses/{id}/cancel`.
//!
//! A response is a chat completion underneath: the conversation (the chain of stored responses
//! named by `previous_response_id`, then this request's `input`, with `instructions` first)
//! becomes chat messages and goes through the chat path (`chat::submit`), so templates, tools,
//! Structured Outputs and the prefix cache work the same. A turn that continues a stored
//! conversation re-renders the earlier turns to the same tokens, so the prefix cache serves
//! them (`usage.input_tokens_details.cached_tokens`).

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use ferrum_engine::{Completion, Event, Priority};
use ferrum_protocol::moderation::{FilterResults, PromptFilterResult};
use ferrum_protocol::response::{ChatCompletion, Usage};
use ferrum_protocol::responses::{
    parse_item, parse_responses_request, to_messages, Item, ResponsesRequest,
};
use ferrum_protocol::{ApiError, ChatRequest};
use ferrum_store::{Order, ResponseRecord};
use futures_util::stream::{self, Stream, StreamExt};
use serde_json::{json, Value};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::callstream::{AutoDelta, CallDelta, ChoiceDecoder};
use crate::chat::{self, Endpoint, Meta};
use crate::frontend::finish_reason;
use crate::moderation::{CompletionGate, LogprobQueue};
use crate::paging::{self, ListOut, Rules};
use crate::tools::ToolMode;
use crate::{now, random_id, App, ServerError};

/// Longest chain of `previous_response_id` followed (a guard, far above real conversations).
const MAX_CHAIN: usize = 10_000;

/// Background responses running in this server, by id, to cancel them.
#[derive(Default)]
pub struct Background(Mutex<HashMap<String, tokio::task::AbortHandle>>);

pub fn routes() -> Router<Arc<App>> {
    Router::new()
        .route("/v1/responses", post(create))
        .route("/v1/responses/{id}", get(retrieve).delete(delete))
        .route("/v1/responses/{id}/input_items", get(input_items))
        .route("/v1/responses/{id}/cancel", post(cancel))
}

/// What the response object repeats of its request.
struct Ctx {
    id: String,
    created_at: i64,
    model: String,
    req: ResponsesRequest,
    /// This request's input items with their ids, as `input_items` lists them.
    input_json: Vec<Value>,
}

impl Ctx {
    /// The response object; `output` and `usage` as far as known.
    fn object(
        &self,
        status: &str,
        output: &[Value],
        usage: Option<&Usage>,
        incomplete: Option<&str>,
    ) -> Value {
        let r = &self.req;
        let mut out = json!({
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "completed_at": (status == "completed").then(now),
            "error": null,
            "incomplete_details": incomplete.map(|reason| json!({"reason": reason})),
            "instructions": r.instructions,
            "max_output_tokens": r.max_output_tokens,
            "max_tool_calls": null,
            "model": self.model,
            "output": output,
            "parallel_tool_calls": r.parallel_tool_calls,
            "previous_response_id": r.previous_response_id,
            "reasoning": {"effort": null, "summary": null},
            "service_tier": r.service_tier.as_str(),
            "store": r.store,
            "background": r.background,
            "temperature": r.temperature,
            "text": r.echo.text,
            "tool_choice": r.echo.tool_choice,
            "tools": r.echo.tools,
            "top_logprobs": r.top_logprobs,
            "top_p": r.top_p,
            "truncation": if r.truncate { "auto" } else { "disabled" },
            "usage": usage.map(usage_json),
            "user": r.user,
            "metadata": r.metadata.clone().unwrap_or_default(),
            "prompt_cache_key": null,
            "safety_identifier": null,
        });
        // Not nullable in the spec: absent until known.
        crate::drop_nulls(&mut out, &["usage", "user"]);
        out
    }

    fn failed(&self, e: &ApiError) -> Value {
        let mut o = self.object("failed", &[], None, None);
        o["error"] = json!({"code": e.code.clone().unwrap_or_else(|| "server_error".into()), "message": e.message});
        o
    }
}

fn usage_json(u: &Usage) -> Value {
    json!({
        "input_tokens": u.prompt_tokens,
        // ferrum's prefix cache is written as a side effect of reading a prompt, at no extra
        // price: no tokens are billed as cache writes.
        "input_tokens_details": {
            "cached_tokens": u.prompt_tokens_details.cached_tokens,
            "cache_write_tokens": 0,
        },
        "output_tokens": u.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    })
}

/// The output items of a finished generation: the text as a message, then the calls; and why
/// the response is incomplete, if it is.
fn output_items(c: &ChatCompletion) -> (Vec<Value>, Option<&'static str>) {
    let choice = &c.choices[0];
    let mut items = Vec::new();
    if let Some(text) = choice
        .message
        .content
        .as_deref()
        .filter(|t| !t.is_empty() || choice.message.tool_calls.is_none())
    {
        // Token log-probabilities belong to the text when the text is the whole output.
        let logprobs: Vec<Value> = match (&choice.logprobs, &choice.message.tool_calls) {
            (Some(lp), None) => lp.content.iter().map(|t| json!(t)).collect(),
            _ => Vec::new(),
        };
        items.push(message_item(
            &random_id("msg_"),
            text,
            "completed",
            &logprobs,
        ));
    }
    for call in choice.message.tool_calls.iter().flatten() {
        items.push(call_item(
            &random_id("fc_"),
            &call.id,
            &call.function.name,
            &call.function.arguments,
            "completed",
        ));
    }
    (items, incomplete_reason(choice.finish_reason))
}

/// The `incomplete_details.reason` of a chat finish reason (`None`: the response completed).
fn incomplete_reason(finish_reason: &str) -> Option<&'static str> {
    match finish_reason {
        "length" => Some("max_output_tokens"),
        "content_filter" => Some("content_filter"),
        _ => None,
    }
}

/// Adds the content filter's annotations to a response object (Azure OpenAI's names, as on
/// chat completions): the prompt's, and the output text's.
fn add_filter_results(
    object: &mut Value,
    prompt: Option<PromptFilterResult>,
    output: Option<FilterResults>,
) {
    if let Some(p) = prompt {
        object["prompt_filter_results"] = json!([p]);
    }
    if let Some(o) = output {
        object["content_filter_results"] = json!(o);
    }
}

fn message_item(id: &str, text: &str, status: &str, logprobs: &[Value]) -> Value {
    json!({
        "id": id,
        "type": "message",
        "role": "assistant",
        "status": status,
        "content": if status == "in_progress" && text.is_empty() { json!([]) } else { json!([text_part(text, logprobs)]) },
    })
}

/// An `output_text` part; `logprobs` are its tokens' (with `include:
/// ["message.output_text.logprobs"]`), in the chat completions' shape, which the spec shares.
fn text_part(text: &str, logprobs: &[Value]) -> Value {
    json!({"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs})
}

fn call_item(id: &str, call_id: &str, name: &str, arguments: &str, status: &str) -> Value {
    json!({
        "id": id,
        "type": "function_call",
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    })
}

/// The items of a stored conversation, oldest first: each response's input, then its output.
async fn history(app: &App, previous: &str) -> Result<Vec<Item>, ServerError> {
    let mut chain = Vec::new();
    let mut next = Some(previous.to_string());
    while let Some(id) = next {
        let Some(r) = app.store.get_response(&id).await? else {
            return Err(ApiError::not_found(format!(
                "Previous response with id '{id}' not found."
            ))
            .with_param("previous_response_id")
            .into());
        };
        if matches!(r.status.as_str(), "queued" | "in_progress") {
            return Err(ApiError::invalid_param(
                "previous_response_id",
                "invalid_value",
                format!(
                    "The previous response '{id}' is still {}; wait for it to finish.",
                    r.status
                ),
            )
            .into());
        }
        next = r.previous_response_id.clone();
        chain.push(r);
        if chain.len() > MAX_CHAIN {
            return Err(ApiError::invalid_param(
                "previous_response_id",
                "invalid_value",
                "The conversation is too long.",
            )
            .into());
        }
    }
    let mut items = Vec::new();
    for r in chain.iter().rev() {
        for text in [&r.input_items, &r.output] {
            let list: Vec<Value> =
                serde_json::from_str(text).map_err(|e| ServerError::corrupt(&r.id, e))?;
            for v in &list {
                items.push(parse_item("previous_response_id", v)?);
            }
        }
    }
    Ok(items)
}

/// The whole conversation of a request (the stored history, then its input), and its own input
/// items with fresh ids as `input_items` lists them.
async fn conversation(
    app: &App,
    req: &ResponsesRequest,
) -> Result<(Vec<Item>, Vec<Value>), ServerError> {
    let mut items = match &req.previous_response_id {
        Some(prev) => history(app, prev).await?,
        None => Vec::new(),
    };
    let input_json = req
        .input
        .iter()
        .map(|item| item.to_json(&random_id(item.id_prefix())))
        .collect();
    items.extend(req.input.iter().cloned());
    Ok((items, input_json))
}

/// The chat request a response runs as.
fn chat_request(req: &ResponsesRequest, items: &[Item], stream: bool) -> ChatRequest {
    ChatRequest {
        model: req.model.clone(),
        messages: to_messages(req.instructions.as_deref(), items),
        max_tokens: req.max_output_tokens,
        max_tokens_param: "max_output_tokens",
        temperature: req.temperature,
        top_p: req.top_p,
        n: 1,
        stop: Vec::new(),
        seed: None,
        presence_penalty: 0.0,
        frequency_penalty: 0.0,
        logit_bias: Vec::new(),
        logprobs: req.output_logprobs,
        top_logprobs: if req.output_logprobs {
            req.top_logprobs
        } else {
            0
        },
        stream,
        include_usage: false,
        user: req.user.clone(),
        metadata: None,
        store: false,
        response_format: req.format.clone(),
        tools: req.tools.clone(),
        tool_choice: req.tool_choice.clone(),
        parallel_tool_calls: req.parallel_tool_calls,
        prediction: None,
        service_tier: req.service_tier,
    }
}

/// Submits the conversation; with `truncation: "auto"` the oldest items are dropped (one at a
/// time, never the instructions) until it fits the context window.
async fn submit(
    app: &Arc<App>,
    req: &ResponsesRequest,
    mut items: Vec<Item>,
    received: Instant,
    priority: Priority,
) -> Result<(Meta, UnboundedReceiver<Event>), ServerError> {
    loop {
        let chat = chat_request(req, &items, req.stream && !req.background);
        match chat::submit(app, chat, received, priority, Endpoint::RESPONSES).await {
            Err(ServerError::Api(e))
                if req.truncate
                    && items.len() > 1
                    && e.code.as_deref() == Some("context_length_exceeded") =>
            {
                items.remove(0);
            }
            Err(ServerError::Api(e)) if e.code.as_deref() == Some("context_length_exceeded") => {
                return Err(ApiError {
                    param: Some("input".into()),
                    ..e
                }
                .into())
            }
            other => return other,
        }
    }
}

async fn create(State(app): State<Arc<App>>, body: Bytes) -> Result<Response, ServerError> {
    let received = Instant::now();
    let req = parse_responses_request(&body)?;
    if req.background && req.stream {
        return Err(ApiError::invalid_param(
            "background",
            "unsupported_value",
            "Streaming a background response is not supported by this server; poll it instead.",
        )
        .into());
    }
    let tier = crate::fine_tuning::tier(&app, &req.model).await?;
    let (items, input_json) = conversation(&app, &req).await?;
    let (meta, rx) = submit(&app, &req, items, received, Priority::Interactive).await?;
    let ctx = Ctx {
        id: meta.id.clone(),
        created_at: meta.created,
        model: tier.id.clone(),
        req,
        input_json,
    };
    if ctx.req.background {
        let queued = ctx.object("queued", &[], None, None);
        save(&app, &ctx, "queued", &[], &queued).await?;
        let app2 = Arc::clone(&app);
        let id = ctx.id.clone();
        let task = tokio::spawn(async move {
            let (status, output, object) = finish(meta, rx, &ctx).await;
            match app2
                .store
                .finish_response(&ctx.id, status, &output, &object.to_string())
                .await
            {
                Ok(true) => {}
                Ok(false) => {
                    tracing::info!(id = %ctx.id, "background response finished after it was cancelled")
                }
                Err(e) => {
                    tracing::error!(error = %e, id = %ctx.id, "could not store a background response")
                }
            }
            app2.background.0.lock().expect("lock").remove(&ctx.id);
        });
        app.background
            .0
            .lock()
            .expect("lock")
            .insert(id, task.abort_handle());
        return Ok(Json(queued).into_response());
    }
    if ctx.req.stream {
        return Ok(stream_response(app, meta, rx, ctx).into_response());
    }
    // A failed generation answers with its error, as a chat completion would.
    let done = complete(meta, rx, &ctx).await?;
    if ctx.req.store {
        save(&app, &ctx, done.status, &done.output, &done.object).await?;
    }
    Ok(Json(done.object).into_response())
}

/// A response run for a batch line, at background priority: the response object and its
/// usage (which the caller records with the line's result), or the API error.
pub async fn run_for_batch(app: &Arc<App>, body: &[u8]) -> Result<(Value, Usage), ServerError> {
    let req = parse_responses_request(body)?;
    if req.stream || req.background {
        let param = if req.stream { "stream" } else { "background" };
        return Err(ApiError::invalid_param(
            param,
            "invalid_value",
            format!("'{param}' is not supported in batch requests."),
        )
        .into());
    }
    let tier = crate::fine_tuning::tier(app, &req.model).await?;
    let (items, input_json) = conversation(app, &req).await?;
    let (mut meta, rx) = submit(app, &req, items, Instant::now(), Priority::Background).await?;
    meta.record = false;
    let ctx = Ctx {
        id: meta.id.clone(),
        created_at: meta.created,
        model: tier.id.clone(),
        req,
        input_json,
    };
    let done = complete(meta, rx, &ctx).await?;
    save(app, &ctx, done.status, &done.output, &done.object).await?;
    Ok((done.object, done.usage))
}

/// A finished response: its status, output items, response object and usage.
struct Done {
    status: &'static str,
    output: Vec<Value>,
    object: Value,
    usage: Usage,
}

/// Runs a response to its end.
async fn complete(
    meta: Meta,
    rx: UnboundedReceiver<Event>,
    ctx: &Ctx,
) -> Result<Done, ServerError> {
    let (completion, usage) = chat::collect(meta, rx).await?;
    let (output, incomplete) = output_items(&completion);
    let status = if incomplete.is_some() {
        "incomplete"
    } else {
        "completed"
    };
    let mut object = ctx.object(status, &output, Some(&usage), incomplete);
    let prompt = completion.prompt_filter_results.as_ref().map(|p| p[0]);
    add_filter_results(
        &mut object,
        prompt,
        completion.choices[0].content_filter_results,
    );
    Ok(Done {
        status,
        output,
        object,
        usage,
    })
}

/// Runs a response to its end: (status, output items as JSON, response object), a failure
/// being a `failed` response.
async fn finish(
    meta: Meta,
    rx: UnboundedReceiver<Event>,
    ctx: &Ctx,
) -> (&'static str, String, Value) {
    match complete(meta, rx, ctx).await {
        Ok(d) => (d.status, Value::Array(d.output).to_string(), d.object),
        Err(e) => ("failed", "[]".into(), ctx.failed(&e.into_api_logged())),
    }
}

/// Stores a response (when the request asked for it, the default).
async fn save(
    app: &App,
    ctx: &Ctx,
    status: &str,
    output: &[Value],
    object: &Value,
) -> Result<(), ServerError> {
    if !ctx.req.store {
        return Ok(());
    }
    let record = ResponseRecord {
        id: ctx.id.clone(),
        created_at: ctx.created_at,
        model: ctx.model.clone(),
        status: status.to_string(),
        previous_response_id: ctx.req.previous_response_id.clone(),
        input_items: Value::Array(ctx.input_json.clone()).to_string(),
        output: Value::Array(output.to_vec()).to_string(),
        object: object.to_string(),
    };
    app.store.insert_response(&record).await?;
    Ok(())
}

/// The typed event stream of a response (`response.created` ... `response.completed`), each
/// event with its `sequence_number`.
struct Streamer {
    app: Arc<App>,
    meta: Option<Meta>,
    rx: UnboundedReceiver<Event>,
    ctx: Ctx,
    seq: u64,
    /// The message item being streamed: its id and text so far, at output index
    /// `message_index`.
    message: Option<(String, String)>,
    message_index: usize,
    /// With tools: what turns the generated text into content and call deltas, the calls
    /// streamed (output index, item id, call id, name, arguments so far) and the output items
    /// opened.
    decoder: ChoiceDecoder,
    /// The request's tool mode (kept here: `meta` is taken by `end`, which still decodes).
    tool_mode: ToolMode,
    /// The content filter's hold on the text, and on the log-probabilities of its tokens.
    gate: CompletionGate,
    held_logprobs: LogprobQueue<Value>,
    auto_calls: Vec<(usize, String, String, String, String)>,
    opened: usize,
    /// Token log-probabilities of the text (when asked for): all so far, and those not sent
    /// with a delta yet.
    logprobs: Vec<Value>,
    delta_logprobs: Vec<Value>,
    done: Option<Completion>,
    finished: bool,
}

impl Streamer {
    fn event(&mut self, mut data: Value) -> SseEvent {
        data["sequence_number"] = json!(self.seq);
        self.seq += 1;
        let kind = data["type"].as_str().unwrap_or("message").to_string();
        SseEvent::default().event(kind).data(data.to_string())
    }

    fn start(&mut self) -> Vec<SseEvent> {
        let response = self.ctx.object("in_progress", &[], None, None);
        vec![
            self.event(json!({"type": "response.created", "response": response})),
            self.event(json!({"type": "response.in_progress", "response": response})),
        ]
    }

    fn tools_on(&self) -> bool {
        self.tool_mode != ToolMode::Off
    }

    /// Opens the message item (output 0) and its text part.
    fn open_message(&mut self, out: &mut Vec<SseEvent>, index: usize) -> String {
        let id = random_id("msg_");
        let item = message_item(&id, "", "in_progress", &[]);
        out.push(self.event(
            json!({"type": "response.output_item.added", "output_index": index, "item": item}),
        ));
        out.push(self.event(json!({
            "type": "response.content_part.added", "item_id": id, "output_index": index,
            "content_index": 0, "part": text_part("", &[]),
        })));
        id
    }

    /// Closes a message item with its whole text.
    fn close_message(
        &mut self,
        out: &mut Vec<SseEvent>,
        index: usize,
        id: &str,
        text: &str,
    ) -> Value {
        let logprobs = std::mem::take(&mut self.logprobs);
        out.push(self.event(json!({
            "type": "response.output_text.done", "item_id": id, "output_index": index,
            "content_index": 0, "text": text, "logprobs": logprobs,
        })));
        out.push(self.event(json!({
            "type": "response.content_part.done", "item_id": id, "output_index": index,
            "content_index": 0, "part": text_part(text, &logprobs),
        })));
        let item = message_item(id, text, "completed", &logprobs);
        out.push(self.event(
            json!({"type": "response.output_item.done", "output_index": index, "item": item}),
        ));
        item
    }

    fn delta(&mut self, index: usize, id: &str, text: &str) -> SseEvent {
        let logprobs = std::mem::take(&mut self.delta_logprobs);
        self.event(json!({
            "type": "response.output_text.delta", "item_id": id, "output_index": index,
            "content_index": 0, "delta": text, "logprobs": logprobs,
        }))
    }

    /// The events of an "auto" answer's deltas: a message item opened with the first text,
    /// a function_call item per call, in the order they appear.
    fn auto_events(&mut self, deltas: Vec<AutoDelta>, out: &mut Vec<SseEvent>) {
        for d in deltas {
            match d {
                AutoDelta::Content(t) => {
                    if self.message.is_none() {
                        self.message_index = self.opened;
                        self.opened += 1;
                        let id = self.open_message(out, self.message_index);
                        self.message = Some((id, String::new()));
                    }
                    let (id, text) = self.message.as_mut().expect("opened above");
                    text.push_str(&t);
                    let id = id.clone();
                    out.push(self.delta(self.message_index, &id, &t));
                }
                AutoDelta::Call(CallDelta::Start { name, .. }) => {
                    let (index, id, call_id) = (self.opened, random_id("fc_"), random_id("call_"));
                    self.opened += 1;
                    let added = call_item(&id, &call_id, &name, "", "in_progress");
                    out.push(self.event(json!({
                        "type": "response.output_item.added", "output_index": index, "item": added,
                    })));
                    self.auto_calls
                        .push((index, id, call_id, name, String::new()));
                }
                AutoDelta::Call(CallDelta::Args { index, fragment }) => {
                    let Some(call) = self.auto_calls.get_mut(index) else {
                        continue;
                    };
                    call.4.push_str(&fragment);
                    let (output_index, id) = (call.0, call.1.clone());
                    out.push(self.event(json!({
                        "type": "response.function_call_arguments.delta",
                        "item_id": id, "output_index": output_index, "delta": fragment,
                    })));
                }
            }
        }
    }

    /// The events of generated text the content filter let through. With tools, a forced
    /// call streams as it is generated; with "auto", text streams as soon as it cannot be the
    /// start of a call, and calls as they are written.
    fn text_events(&mut self, text: &str, out: &mut Vec<SseEvent>) {
        if self.tools_on() {
            let deltas = self.decoder.push(text);
            self.auto_events(deltas, out);
            return;
        }
        if self.message.is_none() {
            let id = self.open_message(out, 0);
            self.message = Some((id, String::new()));
        }
        if !text.is_empty() {
            let (id, all) = self.message.as_mut().expect("opened above");
            all.push_str(text);
            let id = id.clone();
            out.push(self.delta(0, &id, text));
        }
    }

    async fn next_events(&mut self) -> Vec<SseEvent> {
        let Some(ev) = self.rx.recv().await else {
            self.finished = true;
            return self.end().await;
        };
        match ev {
            Event::Started => Vec::new(),
            Event::Token { token, .. } => {
                if let Some(lp) = self.meta.as_ref().and_then(|m| m.logprob(&token)) {
                    self.held_logprobs.push(lp.bytes.len(), json!(lp));
                }
                // The content filter holds text back until its window is checked (and the
                // log-probabilities of its tokens with it).
                let text = self.gate.push(&token.text);
                // A token that completes no text yet goes with the next delta.
                let lps = self.held_logprobs.release(text.len());
                self.delta_logprobs.extend(lps.iter().cloned());
                self.logprobs.extend(lps);
                let mut out = Vec::new();
                self.text_events(&text, &mut out);
                out
            }
            Event::ChoiceDone { completion, .. } => {
                self.done = Some(completion);
                Vec::new()
            }
            Event::Error(e) => {
                self.finished = true;
                let e = ServerError::from(e).into_api_logged();
                let failed = self.ctx.failed(&e);
                vec![
                    self.event(json!({"type": "error", "code": e.code, "message": e.message, "param": e.param})),
                    self.event(json!({"type": "response.failed", "response": failed})),
                ]
            }
        }
    }

    /// After the engine's last event: the output items' closing events and `response.completed`
    /// (or `response.incomplete`); the usage is recorded and the response stored.
    async fn end(&mut self) -> Vec<SseEvent> {
        let (Some(meta), Some(done)) = (self.meta.take(), self.done.take()) else {
            let e = ServerError::EngineStopped.into_api_logged();
            let failed = self.ctx.failed(&e);
            return vec![self.event(json!({"type": "response.failed", "response": failed}))];
        };
        let usage = meta.record_usage(std::slice::from_ref(&done)).await;
        let mut out = Vec::new();
        let rest = self.gate.finish();
        let lps = self.held_logprobs.release(rest.len());
        self.delta_logprobs.extend(lps.iter().cloned());
        self.logprobs.extend(lps);
        self.text_events(&rest, &mut out);
        let withheld = self.gate.withheld();
        let incomplete = if withheld {
            Some("content_filter")
        } else {
            incomplete_reason(finish_reason(done.finish_reason))
        };
        let mut items = Vec::new();
        if meta.tool_mode == ToolMode::Off {
            let (id, text) = match self.message.take() {
                Some(m) => m,
                None => (self.open_message(&mut out, 0), String::new()),
            };
            items.push(self.close_message(&mut out, 0, &id, &text));
        } else {
            // Tools: what is left of the answer (unless the filter withheld it), then close
            // what was opened, in output order.
            if !withheld {
                let cut = incomplete.is_some();
                let (rest, _) = self.decoder.finish(&done.text, cut);
                self.auto_events(rest, &mut out);
            }
            if self.message.is_none() && self.auto_calls.is_empty() {
                self.message = Some((self.open_message(&mut out, 0), String::new()));
            }
            let mut closing: Vec<(usize, Value)> = Vec::new();
            if let Some((id, text)) = self.message.take() {
                let index = self.message_index;
                closing.push((index, self.close_message(&mut out, index, &id, &text)));
            }
            for (index, id, call_id, name, args) in std::mem::take(&mut self.auto_calls) {
                out.push(self.event(json!({
                    "type": "response.function_call_arguments.done", "item_id": id,
                    "output_index": index, "name": name, "arguments": args,
                })));
                let item = call_item(&id, &call_id, &name, &args, "completed");
                out.push(self.event(json!({"type": "response.output_item.done", "output_index": index, "item": item})));
                closing.push((index, item));
            }
            closing.sort_by_key(|c| c.0);
            items.extend(closing.into_iter().map(|c| c.1));
        }
        let status = if incomplete.is_some() {
            "incomplete"
        } else {
            "completed"
        };
        let mut object = self.ctx.object(status, &items, Some(&usage), incomplete);
        add_filter_results(&mut object, meta.prompt_filter, self.gate.results());
        if let Err(e) = save(&self.app, &self.ctx, status, &items, &object).await {
            tracing::error!(error = %e, id = %self.ctx.id, "could not store a streamed response");
        }
        let kind = if incomplete.is_some() {
            "response.incomplete"
        } else {
            "response.completed"
        };
        out.push(self.event(json!({"type": kind, "response": object})));
        out
    }
}

fn stream_response(
    app: Arc<App>,
    meta: Meta,
    rx: UnboundedReceiver<Event>,
    ctx: Ctx,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let names = meta.tool_names().into_iter().map(String::from).collect();
    let decoder = ChoiceDecoder::new(meta.tool_mode, names);
    let gate = CompletionGate::new(&meta.filter);
    let held_logprobs = LogprobQueue::new(&meta.filter);
    let tool_mode = meta.tool_mode;
    let mut st = Streamer {
        app,
        meta: Some(meta),
        rx,
        ctx,
        seq: 0,
        message: None,
        message_index: 0,
        decoder,
        held_logprobs,
        tool_mode,
        gate,
        auto_calls: Vec::new(),
        opened: 0,
        logprobs: Vec::new(),
        delta_logprobs: Vec::new(),
        done: None,
        finished: false,
    };
    let first = st.start();
    let rest = stream::unfold(st, |mut st| async move {
        if st.finished {
            return None;
        }
        let batch = st.next_events().await;
        Some((stream::iter(batch), st))
    })
    .flatten();
    Sse::new(stream::iter(first).chain(rest).map(Ok)).keep_alive(KeepAlive::default())
}

async fn find(app: &App, id: &str) -> Result<ResponseRecord, ServerError> {
    app.store.get_response(id).await?.ok_or_else(|| {
        ApiError::not_found(format!("Response with id '{id}' not found."))
            .with_param("response_id")
            .into()
    })
}

async fn retrieve(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ServerError> {
    let r = find(&app, &id).await?;
    let object: Value =
        serde_json::from_str(&r.object).map_err(|e| ServerError::corrupt(&id, e))?;
    Ok(Json(object))
}

async fn delete(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ServerError> {
    if let Some(task) = app.background.0.lock().expect("lock").remove(&id) {
        task.abort();
    }
    if !app.store.delete_response(&id).await? {
        return Err(
            ApiError::not_found(format!("Response with id '{id}' not found."))
                .with_param("response_id")
                .into(),
        );
    }
    Ok(Json(
        json!({"id": id, "object": "response.deleted", "deleted": true}),
    ))
}

/// `POST /v1/responses/{id}/cancel`: stops a background response (others cannot be cancelled).
async fn cancel(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ServerError> {
    let r = find(&app, &id).await?;
    let mut object: Value =
        serde_json::from_str(&r.object).map_err(|e| ServerError::corrupt(&id, e))?;
    if object["background"] != json!(true) {
        return Err(
            ApiError::invalid_request("Only background responses can be cancelled.")
                .with_param("response_id")
                .into(),
        );
    }
    if let Some(task) = app.background.0.lock().expect("lock").remove(&id) {
        task.abort();
    }
    object["status"] = json!("cancelled");
    if app
        .store
        .finish_response(&id, "cancelled", "[]", &object.to_string())
        .await?
    {
        tracing::info!(%id, "background response cancelled");
        return Ok(Json(object));
    }
    // Already finished: cancelling changes nothing (as OpenAI, which returns it as it is).
    let r = find(&app, &id).await?;
    Ok(Json(serde_json::from_str(&r.object).unwrap_or(Value::Null)))
}

async fn input_items(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    Query(pairs): Query<Vec<(String, String)>>,
) -> Result<Json<ListOut<Value>>, ServerError> {
    let page = paging::page(&pairs, &Rules::of(Order::Desc))?;
    let r = find(&app, &id).await?;
    let items: Vec<Value> =
        serde_json::from_str(&r.input_items).map_err(|e| ServerError::corrupt(&id, e))?;
    Ok(Json(paging::in_memory(items, &page, |v| {
        v["id"].as_str().unwrap_or("")
    })?))
}
