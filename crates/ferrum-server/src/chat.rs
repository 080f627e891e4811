//! `POST /v1/chat/completions`: one response, or a stream of `chat.completion.chunk` events.

use std::ops::ControlFlow;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::State;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use ferrum_engine::{Completion, Event, FinishReason, Priority, Request, Sink, SubmitError};
use ferrum_protocol::moderation::PromptFilterResult;
use ferrum_protocol::response::{
    AssistantMessage, ChatCompletion, ChatCompletionChunk, Choice, ChunkChoice, Delta,
    FunctionDelta, TokenLogprob, ToolCallDelta,
};
use ferrum_protocol::{parse_chat_request, ApiError, ChatRequest, ServiceTier};
use ferrum_registry::ContentFilterConfig;
use futures_util::stream::{self, Stream, StreamExt};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use crate::callstream::{AutoDelta, CallDelta, ChoiceDecoder};
use crate::frontend::{self, finish_reason, logprobs_of, token_logprob};
use crate::models::Loaded;
use crate::moderation::{self, CompletionGate, LogprobQueue};
use crate::tools::{self, ToolMode};
use crate::{now, random_id, App, ServerError};

pub async fn create(State(app): State<Arc<App>>, body: Bytes) -> Result<Response, ServerError> {
    let received = Instant::now();
    let req = parse_chat_request(&body)?;
    let stored_request = if req.store {
        Some(serde_json::from_slice(&body).map_err(|e| ApiError::invalid_request(e.to_string()))?)
    } else {
        None
    };
    let (mut meta, rx) = submit(&app, req, received, Priority::Interactive, Endpoint::CHAT).await?;
    meta.stored_request = stored_request;
    if meta.req.stream {
        Ok(stream_response(meta, rx).into_response())
    } else {
        let (completion, _) = collect(meta, rx).await?;
        Ok(Json(completion).into_response())
    }
}

/// A chat request run for a batch line, at background priority: the response and its usage,
/// which the caller records (in the same transaction as the line's result), or the API error.
pub async fn run_for_batch(
    app: &Arc<App>,
    req: ChatRequest,
) -> Result<(ChatCompletion, ferrum_protocol::response::Usage), ServerError> {
    if req.stream {
        return Err(ApiError::invalid_param(
            "stream",
            "invalid_value",
            "Streaming is not supported in batch requests.",
        )
        .into());
    }
    let (mut meta, rx) = submit(
        app,
        req,
        Instant::now(),
        Priority::Background,
        Endpoint::CHAT,
    )
    .await?;
    meta.record = false;
    collect(meta, rx).await
}

/// Which API a request came through: its ids and its name in the usage ledger.
#[derive(Clone, Copy)]
pub(crate) struct Endpoint {
    pub id_prefix: &'static str,
    pub name: &'static str,
}

impl Endpoint {
    pub const CHAT: Endpoint = Endpoint {
        id_prefix: "chatcmpl-",
        name: "chat.completions",
    };
    pub const RESPONSES: Endpoint = Endpoint {
        id_prefix: "resp_",
        name: "responses",
    };
}

/// Prepares the prompt (off the async threads) and queues the request on its model.
pub(crate) async fn submit(
    app: &Arc<App>,
    req: ChatRequest,
    received: Instant,
    priority: Priority,
    endpoint: Endpoint,
) -> Result<(Meta, UnboundedReceiver<Event>), ServerError> {
    let loaded = crate::fine_tuning::loaded(app, &req.model).await?;
    let filter = loaded.tier.content_filter;
    let images = crate::vision::encode_images(app, &loaded, &req).await?;
    let (prompt_req, req) = {
        let loaded = loaded.clone();
        tokio::task::spawn_blocking(move || {
            // The content filter reads the prompt before any work is queued for it.
            let p = moderation::check_prompt(filter.prompt, &req.messages)
                .map_err(ServerError::from)
                .and_then(|checked| {
                    let prepared = frontend::prepare(loaded.handle.model(), &req, &images)?;
                    Ok((checked, prepared))
                });
            (p, req)
        })
        .await
        .map_err(|e| ServerError::internal("preparing the prompt", e))?
    };
    let (prompt_filter, prepared) = prompt_req?;
    let (id, created) = (random_id(endpoint.id_prefix), now());
    let tool_mode = prepared.tool_mode;
    let prompt_len = prepared.prompt.len();
    let image_tokens = prepared.image_tokens as u64;
    let (tx, rx) = unbounded_channel();
    // A batch line interrupted (by a shutdown) runs again later and is billed then: only
    // interactive requests bill what a departed client cost.
    // The caller is read here, in the handler's task: the stream outlives its scope.
    let caller = crate::auth::Caller::current();
    let service_tier = req.service_tier;
    // Flex is refused, unbilled, when the background queue already holds a queue's worth:
    // OpenAI's "resource unavailable" (the client retries later, or at the default tier).
    if service_tier == ServiceTier::Flex && priority == Priority::Interactive {
        let (waiting, capacity) = loaded.handle.background_backlog();
        if waiting >= capacity {
            return Err(ApiError::flex_unavailable(&loaded.tier.id, waiting).into());
        }
    }
    let bill = (priority == Priority::Interactive).then(|| PartialBill {
        service_tier,
        caller: caller.clone(),
        endpoint: endpoint.name,
        app: Arc::clone(app),
        runtime: tokio::runtime::Handle::current(),
        id: id.clone(),
        created,
        tier: loaded.tier.clone(),
        prompt_tokens: prompt_len as u64,
        generated: 0,
        choices_delivered: 0,
        choices: req.n,
        started: false,
        failed: false,
    });
    // A client's service tier sets its place in the engine's queues: priority ahead of everyone,
    // flex behind every client (with batch lines); work already in the background stays there.
    // A default request within its project's reserved capacity runs at priority too (the
    // provisioned throughput other projects' load cannot slow).
    let reserved = caller
        .admission
        .as_ref()
        .is_some_and(|a| a.within_reservation);
    let priority = match (priority, service_tier) {
        (Priority::Background, _) => Priority::Background,
        (_, ServiceTier::Priority) => Priority::Priority,
        (_, ServiceTier::Flex) => Priority::Background,
        (_, ServiceTier::Default) if reserved => Priority::Priority,
        (p, ServiceTier::Default) => p,
    };
    let request = Request {
        prompt: prepared.prompt,
        params: prepared.params,
        choices: req.n,
        priority,
        adapter: loaded.adapter.clone(),
        embeds: prepared.embeds,
        sink: timed_sink(app, received, req.n, bill, move |ev| tx.send(ev).is_ok()),
    };
    loaded.handle.submit(request).map_err(|e| match e {
        SubmitError::QueueFull(n) => {
            app.metrics
                .rejected_queue_full
                .fetch_add(1, Ordering::Relaxed);
            ApiError::queue_full(&loaded.tier.id, n)
        }
        SubmitError::Stopped => {
            ApiError::unavailable(format!("The model `{}` is shutting down.", loaded.tier.id))
        }
    })?;
    app.metrics.requests.fetch_add(1, Ordering::Relaxed);
    let meta = Meta {
        id,
        caller,
        created,
        app: Arc::clone(app),
        loaded,
        req,
        tool_mode,
        endpoint: endpoint.name,
        record: true,
        stored_request: None,
        filter,
        prompt_filter,
        image_tokens,
    };
    Ok((meta, rx))
}

/// The engine's sink for one request: forwards events with `send` (false = the client went
/// away, which cancels the request), measures time to first token and inter-token latency, and
/// bills what was generated if the client leaves before the response is delivered.
fn timed_sink(
    app: &App,
    received: Instant,
    choices: u32,
    mut bill: Option<PartialBill>,
    mut send: impl FnMut(Event) -> bool + Send + 'static,
) -> Sink {
    let metrics = Arc::clone(&app.metrics);
    let mut last: Vec<Option<Instant>> = vec![None; choices as usize];
    Box::new(move |ev| {
        // The whole bill moves into the closure (not copies of its fields): it is dropped, and
        // so settled, with the sink.
        match &ev {
            Event::Token { choice, .. } => {
                if let Some(b) = bill.as_mut() {
                    b.generated += 1;
                }
                let now = Instant::now();
                match last.get_mut(*choice as usize) {
                    Some(slot @ None) => {
                        metrics.ttft.observe(now - received);
                        *slot = Some(now);
                    }
                    Some(Some(prev)) => {
                        metrics.itl.observe(now - *prev);
                        *prev = now;
                    }
                    None => {}
                }
            }
            Event::Error(_) => {
                if let Some(b) = bill.as_mut() {
                    b.failed = true;
                }
            }
            Event::Started => {
                if let Some(b) = bill.as_mut() {
                    b.started = true;
                }
            }
            Event::ChoiceDone { .. } => {}
        }
        let is_done = matches!(ev, Event::ChoiceDone { .. });
        if send(ev) {
            if let (true, Some(b)) = (is_done, bill.as_mut()) {
                b.choices_delivered += 1;
            }
            ControlFlow::Continue(())
        } else {
            ControlFlow::Break(())
        }
    })
}

/// Usage of a request whose client went away: the engine drops the sink when the request ends,
/// and unless every choice reached the client (whose response then records the exact usage),
/// the prompt and the tokens generated so far are billed. The prompt is billed at the full input
/// price: which part of it was cached is known only to complete responses.
struct PartialBill {
    caller: crate::auth::Caller,
    service_tier: ServiceTier,
    endpoint: &'static str,
    app: Arc<App>,
    runtime: tokio::runtime::Handle,
    id: String,
    created: i64,
    tier: ferrum_registry::Tier,
    prompt_tokens: u64,
    /// Token events the engine produced (a finished choice's final flush can add one).
    generated: u64,
    choices_delivered: u32,
    choices: u32,
    /// Whether the engine started it: a request refused at submission (a full queue) or whose
    /// client left before its turn cost nothing.
    started: bool,
    failed: bool,
}

impl Drop for PartialBill {
    fn drop(&mut self) {
        if !self.started || self.failed || self.choices_delivered == self.choices {
            return;
        }
        let usage = ferrum_protocol::response::Usage::new(self.prompt_tokens, 0, self.generated);
        let (caller, app, id, tier, created, endpoint, service_tier) = (
            std::mem::take(&mut self.caller),
            Arc::clone(&self.app),
            std::mem::take(&mut self.id),
            self.tier.clone(),
            self.created,
            self.endpoint,
            self.service_tier,
        );
        // The sink is dropped on the engine thread; the ledger is written on the runtime.
        self.runtime.spawn(async move {
            app.record_usage_at(&caller, &id, endpoint, &tier, &usage, created, service_tier)
                .await;
        });
    }
}

/// What every part of one response shares.
pub(crate) struct Meta {
    pub(crate) id: String,
    /// Who the response is billed to.
    pub(crate) caller: crate::auth::Caller,
    pub(crate) created: i64,
    pub(crate) app: Arc<App>,
    pub(crate) loaded: Loaded,
    pub(crate) req: ChatRequest,
    pub(crate) tool_mode: ToolMode,
    /// The ledger's name of the endpoint (`chat.completions`, `responses`).
    pub(crate) endpoint: &'static str,
    /// Whether the response's usage goes to the ledger here (batch lines record their own).
    pub(crate) record: bool,
    /// The request body as sent, when it asked to be stored (`store: true`).
    pub(crate) stored_request: Option<serde_json::Value>,
    /// The tier's content filter, and its annotation of the prompt (when it reads prompts).
    pub(crate) filter: ContentFilterConfig,
    pub(crate) prompt_filter: Option<PromptFilterResult>,
    /// The prompt's image tokens (reported in `usage.prompt_tokens_details`).
    pub(crate) image_tokens: u64,
}

impl Meta {
    pub(crate) fn tool_names(&self) -> Vec<&str> {
        self.req.tools.iter().map(|t| t.name.as_str()).collect()
    }

    pub(crate) fn logprob(&self, ev: &ferrum_engine::TokenEvent) -> Option<TokenLogprob> {
        if !self.req.logprobs {
            return None;
        }
        token_logprob(&self.loaded.handle.model().tokenizer, ev)
    }

    pub(crate) async fn record_usage(
        &self,
        completions: &[Completion],
    ) -> ferrum_protocol::response::Usage {
        let usage = frontend::usage_of(completions).with_image_tokens(self.image_tokens);
        if self.record {
            self.app
                .record_usage_at(
                    &self.caller,
                    &self.id,
                    self.endpoint,
                    &self.loaded.tier,
                    &usage,
                    self.created,
                    self.req.service_tier,
                )
                .await;
        }
        usage
    }

    /// The response object of finished choices (with their log-probabilities when asked),
    /// each through the content filter.
    fn completion(
        &self,
        done: Vec<Completion>,
        logprobs: Vec<Vec<TokenLogprob>>,
        usage: ferrum_protocol::response::Usage,
    ) -> ChatCompletion {
        let names = self.tool_names();
        let choices = done
            .into_iter()
            .zip(logprobs)
            .enumerate()
            .map(|(i, (c, mut lp))| {
                let mut gate = CompletionGate::new(&self.filter);
                let text = gate.filter_whole(&c.text);
                if gate.withheld() {
                    keep_logprobs_of(&mut lp, text.len());
                }
                let (content, calls) =
                    tools::parse(&text, self.tool_mode, &names, || random_id("call_"));
                let reason = if gate.withheld() {
                    "content_filter"
                } else if calls.is_empty() {
                    finish_reason(c.finish_reason)
                } else {
                    "tool_calls"
                };
                Choice {
                    index: i as u32,
                    message: AssistantMessage {
                        role: "assistant",
                        content,
                        refusal: None,
                        tool_calls: (!calls.is_empty()).then_some(calls),
                        annotations: Vec::new(),
                    },
                    logprobs: self.req.logprobs.then(|| logprobs_of(lp)),
                    finish_reason: reason,
                    content_filter_results: gate.results(),
                }
            })
            .collect();
        ChatCompletion {
            id: self.id.clone(),
            object: "chat.completion",
            created: self.created,
            model: self.loaded.tier.id.clone(),
            choices,
            usage,
            service_tier: self.req.service_tier.as_str(),
            system_fingerprint: self.loaded.fingerprint.clone(),
            metadata: self.req.store.then(|| self.req.metadata.clone()).flatten(),
            prompt_filter_results: self.prompt_filter.map(|p| vec![p]),
        }
    }

    /// Saves the request and its response when the request asked for it (`store: true`).
    async fn store(&self, completion: &ChatCompletion) {
        let Some(request) = &self.stored_request else {
            return;
        };
        crate::stored::save(&self.app, request, completion, &self.req).await;
    }
}

pub(crate) async fn collect(
    meta: Meta,
    mut rx: UnboundedReceiver<Event>,
) -> Result<(ChatCompletion, ferrum_protocol::response::Usage), ServerError> {
    let n = meta.req.n as usize;
    let mut logprobs: Vec<Vec<TokenLogprob>> = vec![Vec::new(); n];
    // Choices run side by side: their completions arrive in any order.
    let mut finished: Vec<Option<Completion>> = vec![None; n];
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Started => {}
            Event::Token { choice, token } => {
                if let Some(lp) = meta.logprob(&token) {
                    logprobs[choice as usize].push(lp);
                }
            }
            Event::ChoiceDone { choice, completion } => {
                finished[choice as usize] = Some(completion)
            }
            Event::Error(e) => return Err(e.into()),
        }
    }
    let Some(done) = finished.into_iter().collect::<Option<Vec<Completion>>>() else {
        return Err(ServerError::EngineStopped);
    };
    let usage = meta.record_usage(&done).await;
    let completion = meta.completion(done, logprobs, usage.clone());
    meta.store(&completion).await;
    Ok((completion, usage))
}

/// The state of a stream between engine events.
struct StreamState {
    meta: Meta,
    rx: UnboundedReceiver<Event>,
    /// Completions by choice index.
    done: Vec<Option<Completion>>,
    /// With tools: per choice, what turns the generated text into content and call deltas.
    decoders: Vec<ChoiceDecoder>,
    /// Per choice, the content filter's hold on the text, and the log-probabilities of
    /// tokens whose text it holds.
    gates: Vec<CompletionGate>,
    pending: Vec<LogprobQueue<TokenLogprob>>,
    finished: bool,
}

fn stream_response(
    meta: Meta,
    rx: UnboundedReceiver<Event>,
) -> Sse<impl Stream<Item = Result<SseEvent, std::convert::Infallible>>> {
    let state = StreamState {
        done: vec![None; meta.req.n as usize],
        decoders: (0..meta.req.n)
            .map(|_| {
                let names = meta.tool_names().into_iter().map(String::from).collect();
                ChoiceDecoder::new(meta.tool_mode, names)
            })
            .collect(),
        gates: (0..meta.req.n)
            .map(|_| CompletionGate::new(&meta.filter))
            .collect(),
        pending: (0..meta.req.n)
            .map(|_| LogprobQueue::new(&meta.filter))
            .collect(),
        meta,
        rx,
        finished: false,
    };
    let events = stream::unfold(state, |mut st| async move {
        if st.finished {
            return None;
        }
        let batch = st.next_events().await;
        Some((stream::iter(batch.into_iter().map(Ok)), st))
    })
    .flatten();
    Sse::new(events).keep_alive(KeepAlive::default())
}

impl StreamState {
    fn chunk(&self, choices: Vec<ChunkChoice>) -> ChatCompletionChunk {
        let m = &self.meta;
        ChatCompletionChunk {
            id: m.id.clone(),
            object: "chat.completion.chunk",
            created: m.created,
            model: m.loaded.tier.id.clone(),
            system_fingerprint: m.loaded.fingerprint.clone(),
            service_tier: m.req.service_tier.as_str(),
            choices,
            usage: m.req.include_usage.then_some(None),
            prompt_filter_results: None,
        }
    }

    /// Content and tool-call deltas of one choice as chunks: runs of content as one chunk
    /// each, runs of call deltas as one chunk each (a call's first delta carries its id, type
    /// and name).
    fn auto_chunks(&self, choice: u32, deltas: Vec<AutoDelta>) -> Vec<SseEvent> {
        let mut out = Vec::new();
        let mut content = String::new();
        let mut calls: Vec<ToolCallDelta> = Vec::new();
        let flush =
            |content: &mut String, calls: &mut Vec<ToolCallDelta>, out: &mut Vec<SseEvent>| {
                let delta = if !content.is_empty() {
                    Delta {
                        content: Some(std::mem::take(content)),
                        ..Delta::default()
                    }
                } else if !calls.is_empty() {
                    Delta {
                        tool_calls: Some(std::mem::take(calls)),
                        ..Delta::default()
                    }
                } else {
                    return;
                };
                out.push(Self::data(&self.chunk(vec![ChunkChoice {
                    index: choice,
                    delta,
                    logprobs: None,
                    finish_reason: None,
                    content_filter_results: None,
                }])));
            };
        for d in deltas {
            match d {
                AutoDelta::Content(t) => {
                    flush(&mut String::new(), &mut calls, &mut out);
                    content.push_str(&t);
                }
                AutoDelta::Call(c) => {
                    flush(&mut content, &mut Vec::new(), &mut out);
                    let c = call_delta(c);
                    // One entry per call in a chunk: more arguments join the call's entry.
                    match calls.last_mut() {
                        Some(last) if last.index == c.index && c.id.is_none() => {
                            last.function.arguments.push_str(&c.function.arguments)
                        }
                        _ => calls.push(c),
                    }
                }
            }
        }
        flush(&mut content, &mut calls, &mut out);
        out
    }

    fn data(chunk: &impl serde::Serialize) -> SseEvent {
        SseEvent::default().data(serde_json::to_string(chunk).expect("chunks serialize"))
    }

    /// The SSE events that the next engine event turns into (none for some).
    async fn next_events(&mut self) -> Vec<SseEvent> {
        let Some(ev) = self.rx.recv().await else {
            self.finished = true;
            return self.end().await;
        };
        match ev {
            Event::Started => self.opening(),
            Event::Token { choice, token } => {
                if let Some(lp) = self.meta.logprob(&token) {
                    self.pending[choice as usize].push(lp.bytes.len(), lp);
                }
                // The content filter holds text back until its window is checked.
                let text = self.gates[choice as usize].push(&token.text);
                self.text_chunks(choice, text.into_owned())
            }
            Event::ChoiceDone { choice, completion } => self.choice_done(choice, completion),
            Event::Error(e) => {
                self.finished = true;
                vec![Self::data(&ServerError::from(e).into_api_logged().body())]
            }
        }
    }

    /// Each choice opens with the assistant role, as OpenAI's streams do; with a prompt
    /// filter, a chunk without choices carrying its annotation comes first (as Azure's).
    fn opening(&self) -> Vec<SseEvent> {
        let mut out = Vec::new();
        if let Some(p) = self.meta.prompt_filter {
            let mut chunk = self.chunk(Vec::new());
            chunk.prompt_filter_results = Some(vec![p]);
            out.push(Self::data(&chunk));
        }
        out.extend((0..self.meta.req.n).map(|index| {
            Self::data(&self.chunk(vec![ChunkChoice {
                index,
                delta: Delta {
                    role: Some("assistant"),
                    content: Some(String::new()),
                    ..Delta::default()
                },
                logprobs: None,
                finish_reason: None,
                content_filter_results: None,
            }]))
        }));
        out
    }

    /// The chunks of text the content filter let through. With tools, a forced call streams
    /// as it is generated (its name once complete, then its arguments fragment by fragment);
    /// with "auto", text streams as soon as it cannot be the start of a call, and the calls of
    /// `<tool_call>` blocks as written.
    fn text_chunks(&mut self, choice: u32, text: String) -> Vec<SseEvent> {
        let c = choice as usize;
        let lp = self.pending[c].release(text.len());
        if self.meta.tool_mode != ToolMode::Off {
            let deltas = self.decoders[c].push(&text);
            return self.auto_chunks(choice, deltas);
        }
        // A token with no text yet still sends its log-probability (unless the filter holds
        // it back with its text).
        if text.is_empty() && lp.is_empty() {
            return Vec::new();
        }
        vec![Self::data(&self.chunk(vec![ChunkChoice {
            index: choice,
            delta: Delta {
                content: Some(text),
                ..Delta::default()
            },
            logprobs: (!lp.is_empty()).then(|| logprobs_of(lp)),
            finish_reason: None,
            content_filter_results: None,
        }]))]
    }

    /// A choice's end: the text the filter still held (unless it withheld the rest), what the
    /// tool decoder still holds, and the chunk with its finish reason (`content_filter` when
    /// text was withheld) and its filter annotation.
    fn choice_done(&mut self, choice: u32, completion: Completion) -> Vec<SseEvent> {
        let c = choice as usize;
        let mut reason = finish_reason(completion.finish_reason);
        let rest = self.gates[c].finish();
        let mut out = self.text_chunks(choice, rest);
        if self.gates[c].withheld() {
            reason = "content_filter";
        } else if self.meta.tool_mode != ToolMode::Off {
            let cut = completion.finish_reason == FinishReason::Length;
            let (rest, calls) = self.decoders[c].finish(&completion.text, cut);
            out.extend(self.auto_chunks(choice, rest));
            if calls {
                reason = "tool_calls";
            }
        }
        self.done[c] = Some(completion);
        out.push(Self::data(&self.chunk(vec![ChunkChoice {
            index: choice,
            delta: Delta::default(),
            logprobs: None,
            finish_reason: Some(reason),
            content_filter_results: self.gates[c].results(),
        }])));
        out
    }

    /// After the last engine event: the usage chunk (when asked for) and `[DONE]`.
    async fn end(&mut self) -> Vec<SseEvent> {
        let Some(done) = self
            .done
            .iter()
            .cloned()
            .collect::<Option<Vec<Completion>>>()
        else {
            let err = ServerError::EngineStopped.into_api_logged();
            return vec![Self::data(&err.body())];
        };
        let usage = self.meta.record_usage(&done).await;
        if self.meta.stored_request.is_some() {
            let n = done.len();
            let completion = self
                .meta
                .completion(done, vec![Vec::new(); n], usage.clone());
            self.meta.store(&completion).await;
        }
        let mut out = Vec::new();
        if self.meta.req.include_usage {
            let mut chunk = self.chunk(Vec::new());
            chunk.usage = Some(Some(usage));
            out.push(Self::data(&chunk));
        }
        out.push(SseEvent::default().data("[DONE]"));
        out
    }
}

/// Keeps the log-probabilities of the tokens that make up the first `bytes` bytes of the text
/// (what the content filter let through).
fn keep_logprobs_of(lp: &mut Vec<TokenLogprob>, bytes: usize) {
    let mut seen = 0;
    lp.retain(|t| {
        seen += t.bytes.len();
        seen <= bytes
    });
}

/// A scanned call delta in OpenAI's chunk shape: a new call with a fresh id, or more arguments.
fn call_delta(d: CallDelta) -> ToolCallDelta {
    match d {
        CallDelta::Start { index, name } => ToolCallDelta {
            index: index as u32,
            id: Some(random_id("call_")),
            kind: Some("function"),
            function: FunctionDelta {
                name: Some(name),
                arguments: String::new(),
            },
        },
        CallDelta::Args { index, fragment } => ToolCallDelta {
            index: index as u32,
            id: None,
            kind: None,
            function: FunctionDelta {
                name: None,
                arguments: fragment,
            },
        },
    }
}
