//! The Batch API (`/v1/batches`) and the worker that runs batches.
//!
//! Every server runs one worker. It loops: claim a batch to validate; claim lines (up to a
//! window, so the engine sees large batches) and run each through the same chat path as live
//! requests but at background priority, so interactive traffic goes first; claim a finished
//! batch to write its output files. All claims are leases in the store (`ferrum_store::batches`),
//! renewed while the worker lives: a killed server's lines are taken over by whoever runs next,
//! and a result is written only by the line's current owner, so every line appears once in the
//! output. Batch usage is billed at half the tier's price, in the same transaction as the line's
//! result.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use ferrum_protocol::reader::{parse_object, Fields};
use ferrum_protocol::{parse_chat_request, ApiError};
use ferrum_store::{
    BatchRecord, BatchStatus, ClaimedLine, FileRecord, LineCounts, LineResult, NewLine, Order,
    UsageRecord,
};
use serde_json::{json, Value};
use tokio::task::JoinSet;

use crate::paging::{self, ListOut, Rules};
use crate::{now, random_id, App, ServerError};

/// The endpoints batches can run.
const ENDPOINTS: &[&str] = &["/v1/chat/completions", "/v1/responses", "/v1/embeddings"];
/// Endpoints of the spec that ferrum does not serve in batches.
const UNSUPPORTED_ENDPOINTS: &[&str] = &[
    "/v1/completions",
    "/v1/moderations",
    "/v1/images/generations",
    "/v1/images/edits",
    "/v1/videos",
];
const COMPLETION_WINDOW_SECS: i64 = 24 * 3600;
/// Most lines an input file may have, as OpenAI's limit.
const MAX_LINES: usize = 50_000;
/// Validation errors reported per batch at most.
const MAX_ERRORS: usize = 100;

/// How the batch worker runs.
#[derive(Clone, Debug)]
pub struct BatchConfig {
    /// How long a claim lasts without renewal; a dead worker's lines wait this long.
    pub lease: Duration,
    /// Lines in flight per worker.
    pub window: usize,
    /// How often the worker looks for work when nothing wakes it.
    pub poll: Duration,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            lease: Duration::from_secs(60),
            window: 32,
            poll: Duration::from_millis(500),
        }
    }
}

pub fn routes() -> Router<Arc<App>> {
    Router::new()
        .route("/v1/batches", post(create).get(list))
        .route("/v1/batches/{id}", get(retrieve))
        .route("/v1/batches/{id}/cancel", post(cancel))
}

async fn create(
    State(app): State<Arc<App>>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ServerError> {
    let map = parse_object(&body)?;
    let f = Fields::new(&map, "");
    f.deny_unknown(&[
        "input_file_id",
        "endpoint",
        "completion_window",
        "metadata",
        "output_expires_after",
    ])?;
    let input_file_id = f.required_str("input_file_id")?.to_string();
    let endpoint = f.required_str("endpoint")?.to_string();
    if !ENDPOINTS.contains(&endpoint.as_str()) {
        let message = if UNSUPPORTED_ENDPOINTS.contains(&endpoint.as_str()) {
            format!("Batches of '{endpoint}' are not supported by this server; supported: '/v1/chat/completions', '/v1/responses'.")
        } else {
            format!("Invalid value for 'endpoint': '{endpoint}'. Supported values are: '/v1/chat/completions', '/v1/responses'.")
        };
        return Err(ApiError::invalid_param("endpoint", "invalid_value", message).into());
    }
    let window = f.required_str("completion_window")?;
    if window != "24h" {
        return Err(ApiError::invalid_param(
            "completion_window",
            "invalid_value",
            format!(
                "Invalid value for 'completion_window': '{window}'. Supported values are: '24h'."
            ),
        )
        .into());
    }
    let metadata = ferrum_protocol::chat::parse_metadata(&f)?.map(|m| Value::Object(m).to_string());
    let file = crate::files::find(&app, &input_file_id)
        .await
        .map_err(|e| e.with_param("input_file_id"))?;
    if file.purpose != "batch" {
        return Err(ApiError::invalid_param(
            "input_file_id",
            "invalid_value",
            format!(
                "The file {input_file_id} has purpose '{}'; a batch's input file must have \
                 purpose 'batch'.",
                file.purpose
            ),
        )
        .into());
    }
    // A project's batch input counts against its daily batch limit, and its lines are billed
    // to it.
    let caller = crate::auth::Caller::current();
    if let crate::auth::Principal::Project { project_id, .. } = &caller.principal {
        crate::ratelimit::admit_batch(&app, project_id, &input_file_id).await?;
    }
    let created_at = now();
    let record = BatchRecord {
        id: random_id("batch_"),
        created_at,
        endpoint,
        input_file_id,
        completion_window: "24h".into(),
        status: BatchStatus::Validating,
        metadata,
        model: None,
        errors: None,
        output_file_id: None,
        error_file_id: None,
        in_progress_at: None,
        expires_at: created_at + COMPLETION_WINDOW_SECS,
        finalizing_at: None,
        completed_at: None,
        failed_at: None,
        expired_at: None,
        cancelling_at: None,
        cancelled_at: None,
    };
    app.store.create_batch(&record).await?;
    let owner = caller.attribution();
    if owner.project_id.is_some() {
        // Before the worker is woken; validation then takes far longer than this write.
        app.store.set_batch_owner(&record.id, &owner).await?;
    }
    tracing::info!(id = %record.id, input = %record.input_file_id, "batch created");
    app.batch_wakeup.notify_one();
    Ok(Json(object(record, LineCounts::default())))
}

/// The batch object of the API.
fn object(b: BatchRecord, counts: LineCounts) -> Value {
    let parse = |text: &Option<String>| {
        text.as_deref()
            .and_then(|t| serde_json::from_str::<Value>(t).ok())
            .unwrap_or(Value::Null)
    };
    let errors = match parse(&b.errors) {
        Value::Null => Value::Null,
        data => json!({"object": "list", "data": data}),
    };
    let mut out = json!({
        "id": b.id,
        "object": "batch",
        "endpoint": b.endpoint,
        "model": b.model,
        "errors": errors,
        "input_file_id": b.input_file_id,
        "completion_window": b.completion_window,
        "status": b.status.as_str(),
        "output_file_id": b.output_file_id,
        "error_file_id": b.error_file_id,
        "created_at": b.created_at,
        "in_progress_at": b.in_progress_at,
        "expires_at": b.expires_at,
        "finalizing_at": b.finalizing_at,
        "completed_at": b.completed_at,
        "failed_at": b.failed_at,
        "expired_at": b.expired_at,
        "cancelling_at": b.cancelling_at,
        "cancelled_at": b.cancelled_at,
        "request_counts": {
            "total": counts.total,
            "completed": counts.completed,
            "failed": counts.failed,
        },
        "metadata": parse(&b.metadata),
        "usage": {
            "input_tokens": counts.input_tokens,
            "input_tokens_details": {"cached_tokens": counts.cached_tokens},
            "output_tokens": counts.output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": counts.input_tokens + counts.output_tokens,
        },
    });
    // The spec types these as plain strings, integers or objects: not set yet is absent.
    crate::drop_nulls(
        &mut out,
        &[
            "model",
            "errors",
            "output_file_id",
            "error_file_id",
            "in_progress_at",
            "expires_at",
            "finalizing_at",
            "completed_at",
            "failed_at",
            "expired_at",
            "cancelling_at",
            "cancelled_at",
        ],
    );
    out
}

async fn with_counts(app: &App, b: BatchRecord) -> Result<Value, ServerError> {
    let counts = app.store.batch_counts(&b.id).await?;
    Ok(object(b, counts))
}

async fn find(app: &App, id: &str) -> Result<BatchRecord, ServerError> {
    app.store.get_batch(id).await?.ok_or_else(|| {
        ApiError::not_found(format!("No such Batch object: {id}"))
            .with_param("id")
            .into()
    })
}

async fn retrieve(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ServerError> {
    let b = find(&app, &id).await?;
    Ok(Json(with_counts(&app, b).await?))
}

async fn list(
    State(app): State<Arc<App>>,
    Query(pairs): Query<Vec<(String, String)>>,
) -> Result<Json<ListOut<Value>>, ServerError> {
    let page = paging::page(
        &pairs,
        &Rules {
            default_limit: 20,
            max_limit: 100,
            default_order: Order::Desc,
            has_order: false,
        },
    )?;
    let listed = app.store.list_batches(&page).await?;
    let mut items = Vec::with_capacity(listed.items.len());
    for b in listed.items {
        items.push(with_counts(&app, b).await?);
    }
    let listed = ferrum_store::Listed {
        items,
        has_more: listed.has_more,
    };
    Ok(Json(ListOut::new(listed, |v| {
        v["id"].as_str().unwrap_or("")
    })))
}

async fn cancel(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ServerError> {
    let Some((changed, b)) = app.store.cancel_batch(&id, now()).await? else {
        return Err(find(&app, &id)
            .await
            .err()
            .unwrap_or_else(|| ApiError::not_found(id.clone()).into()));
    };
    if !changed && !matches!(b.status, BatchStatus::Cancelling | BatchStatus::Cancelled) {
        return Err(ApiError::invalid_request(format!(
            "Cannot cancel a batch with status '{}'.",
            b.status.as_str()
        ))
        .with_code("invalid_state")
        .into());
    }
    if changed {
        tracing::info!(id = %b.id, "batch cancelling");
        app.batch_wakeup.notify_one();
    }
    Ok(Json(with_counts(&app, b).await?))
}

/// Milliseconds since the epoch, the unit of leases.
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The batch worker of this server; ends (handing its running lines back) when `stop` fires.
pub async fn run_worker(app: Arc<App>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let config = app.batch.clone();
    let worker = app.worker_id.clone();
    let lease_ms = config.lease.as_millis() as i64;
    tracing::info!(%worker, lease_s = config.lease.as_secs_f64(), window = config.window, "batch worker started");
    let mut running: JoinSet<()> = JoinSet::new();
    // Lines in flight by batch, to stop them when their batch is cancelled.
    let mut in_flight: InFlight = HashMap::new();
    let mut heartbeat = tokio::time::interval(config.lease / 3);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            _ = heartbeat.tick() => {
                if let Err(e) = app.store.renew_leases(&worker, now_ms(), lease_ms).await {
                    tracing::warn!(error = %e, "could not renew the batch leases");
                }
                stop_cancelled(&app, &worker, &mut in_flight).await;
                if let Err(e) = crate::files::reap_expired(&app).await {
                    tracing::warn!(error = %e, "could not delete expired files");
                }
            }
            Some(done) = running.join_next_with_id() => {
                match done {
                    Ok((id, ())) => { in_flight.remove(&id); }
                    Err(e) => { in_flight.remove(&e.id()); }
                }
            }
            _ = app.batch_wakeup.notified() => {}
            _ = tokio::time::sleep(config.poll) => {}
        }
        if let Err(e) = step(&app, &worker, lease_ms, &mut running, &mut in_flight).await {
            tracing::warn!(error = %e, "batch worker step failed; retrying");
            tokio::time::sleep(config.poll).await;
        }
    }
    running.abort_all();
    while running.join_next().await.is_some() {}
    match app.store.release_lines(&worker).await {
        Ok(n) if n > 0 => tracing::info!(lines = n, "batch lines handed back at shutdown"),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "could not hand batch lines back"),
    }
}

/// One round of work: validate, claim lines, finalize.
async fn step(
    app: &Arc<App>,
    worker: &str,
    lease_ms: i64,
    running: &mut JoinSet<()>,
    in_flight: &mut InFlight,
) -> Result<(), ServerError> {
    while let Some(b) = app
        .store
        .claim_validation(worker, now_ms(), lease_ms)
        .await?
    {
        validate(app, worker, b).await?;
    }
    let room = app.batch.window.saturating_sub(running.len());
    if room > 0 {
        let lines = app
            .store
            .claim_lines(worker, now_ms(), lease_ms, room)
            .await?;
        for line in lines {
            let (app2, worker2, line2) = (Arc::clone(app), worker.to_string(), line.clone());
            let handle = running.spawn(async move { run_line(&app2, &worker2, line2).await });
            in_flight.insert(handle.id(), (handle, line));
        }
    }
    while let Some(b) = app
        .store
        .claim_finalization(worker, now_ms(), lease_ms, now())
        .await?
    {
        finalize(app, worker, b).await?;
    }
    Ok(())
}

/// Lines being run by this worker, by task.
type InFlight = HashMap<tokio::task::Id, (tokio::task::AbortHandle, ClaimedLine)>;

/// Stops the lines of batches that are no longer running (cancelled, or expired) and hands
/// them back, so the batch can finalize at once.
async fn stop_cancelled(app: &App, worker: &str, in_flight: &mut InFlight) {
    let mut batches: Vec<String> = in_flight
        .values()
        .map(|(_, l)| l.batch_id.clone())
        .collect();
    batches.sort_unstable();
    batches.dedup();
    for id in batches {
        match app.store.get_batch(&id).await {
            Ok(Some(b)) if b.status != BatchStatus::InProgress => {}
            _ => continue,
        }
        let tasks: Vec<tokio::task::Id> = in_flight
            .iter()
            .filter(|(_, (_, l))| l.batch_id == id)
            .map(|(task, _)| *task)
            .collect();
        for task in tasks {
            let Some((handle, line)) = in_flight.remove(&task) else {
                continue;
            };
            // Aborting the task drops its engine request, which cancels the generation.
            handle.abort();
            if let Err(e) = app.store.release_line(worker, &line).await {
                tracing::warn!(error = %e, batch = %id, "could not hand a stopped line back");
            }
        }
        tracing::info!(batch = %id, "stopped the lines of a batch that is no longer running");
    }
}

/// Reads the input file and checks every line; starts the batch or fails it with line-numbered
/// errors.
async fn validate(app: &App, worker: &str, b: BatchRecord) -> Result<(), ServerError> {
    let path = app.blobs.path(&b.input_file_id);
    let endpoint = b.endpoint.clone();
    let checked = tokio::task::spawn_blocking(move || read_lines(&path, &endpoint))
        .await
        .map_err(|e| ServerError::internal("validating a batch", e))?;
    match checked {
        Ok((lines, model)) => {
            let n = lines.len();
            let started = app
                .store
                .start_batch(&b.id, worker, model.as_deref(), &lines, now())
                .await?;
            if started {
                tracing::info!(id = %b.id, lines = n, "batch in progress");
            }
        }
        Err(errors) => {
            tracing::info!(id = %b.id, errors = errors.len(), "batch failed validation");
            let errors = Value::Array(errors).to_string();
            app.store.fail_batch(&b.id, worker, &errors, now()).await?;
        }
    }
    Ok(())
}

fn batch_error(code: &str, message: String, param: Option<&str>, line: Option<usize>) -> Value {
    json!({"code": code, "message": message, "param": param, "line": line})
}

/// The lines of an input file, or the errors (with 1-based line numbers) that fail the batch.
fn read_lines(
    path: &std::path::Path,
    endpoint: &str,
) -> Result<(Vec<NewLine>, Option<String>), Vec<Value>> {
    use std::io::BufRead;
    let file = std::fs::File::open(path).map_err(|e| {
        vec![batch_error(
            "invalid_file",
            format!("The input file cannot be read: {e}"),
            Some("input_file_id"),
            None,
        )]
    })?;
    let mut lines = Vec::new();
    let mut errors = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut model = None;
    for (i, raw) in std::io::BufReader::new(file).split(b'\n').enumerate() {
        let n = i + 1;
        let raw = match raw {
            Ok(r) => r,
            Err(e) => {
                errors.push(batch_error(
                    "invalid_file",
                    format!("Reading failed: {e}"),
                    None,
                    Some(n),
                ));
                break;
            }
        };
        if raw.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let map = match serde_json::from_slice::<Value>(&raw) {
            Ok(Value::Object(map)) => map,
            _ => {
                errors.push(batch_error(
                    "invalid_json_line",
                    "This line is not a JSON object.".into(),
                    None,
                    Some(n),
                ));
                continue;
            }
        };
        if let Some(p) = crate::files::batch_line_problem(&map) {
            errors.push(batch_error(
                "invalid_request",
                format!("Invalid request: {p}."),
                None,
                Some(n),
            ));
            continue;
        }
        let url = map["url"].as_str().unwrap_or_default();
        if url != endpoint {
            errors.push(batch_error(
                "mismatched_endpoint",
                format!("The url '{url}' does not match the batch's endpoint '{endpoint}'."),
                Some("url"),
                Some(n),
            ));
            continue;
        }
        let custom_id = map["custom_id"].as_str().unwrap_or_default().to_string();
        if !seen.insert(custom_id.clone()) {
            errors.push(batch_error(
                "duplicate_custom_id",
                format!("The custom_id '{custom_id}' appears more than once in the file."),
                Some("custom_id"),
                Some(n),
            ));
            continue;
        }
        if model.is_none() {
            model = map["body"]["model"].as_str().map(str::to_string);
        }
        lines.push(NewLine {
            custom_id,
            body: map["body"].to_string(),
        });
        if errors.len() >= MAX_ERRORS {
            break;
        }
    }
    if lines.len() > MAX_LINES {
        errors.push(batch_error(
            "too_many_requests",
            format!(
                "The file has {} requests; a batch may have at most {MAX_LINES}.",
                lines.len()
            ),
            None,
            None,
        ));
    }
    if lines.is_empty() && errors.is_empty() {
        errors.push(batch_error(
            "empty_file",
            "The input file has no requests.".into(),
            None,
            None,
        ));
    }
    if errors.is_empty() {
        Ok((lines, model))
    } else {
        Err(errors)
    }
}

/// Runs one line through the chat path and writes its result (and usage) if this worker still
/// owns the line.
async fn run_line(app: &Arc<App>, worker: &str, line: ClaimedLine) {
    let request_id = random_id("req_");
    let endpoint = match app.store.get_batch(&line.batch_id).await {
        Ok(Some(b)) => b.endpoint,
        Ok(None) => return,
        Err(e) => {
            tracing::warn!(error = %e, batch = %line.batch_id, "could not read a line's batch");
            return;
        }
    };
    let outcome = if endpoint == "/v1/responses" {
        crate::responses::run_for_batch(app, line.body.as_bytes()).await
    } else if endpoint == "/v1/embeddings" {
        crate::embeddings::run_for_batch(app, line.body.as_bytes()).await
    } else {
        match parse_chat_request(line.body.as_bytes()) {
            Ok(req) => crate::chat::run_for_batch(app, req)
                .await
                .map(|(completion, usage)| {
                    let body = serde_json::to_value(&completion).expect("responses serialize");
                    (body, usage)
                }),
            Err(e) => Err(e.into()),
        }
    };
    let mut result = LineResult {
        result: String::new(),
        failed: false,
        input_tokens: 0,
        cached_tokens: 0,
        output_tokens: 0,
        usage: None,
    };
    let (status, body) = match outcome {
        Ok((body, usage)) => {
            let cached = usage.prompt_tokens_details.cached_tokens;
            result.input_tokens = usage.prompt_tokens;
            result.cached_tokens = cached;
            result.output_tokens = usage.completion_tokens;
            let model = body["model"].as_str().unwrap_or_default();
            if let Ok(tier) = crate::fine_tuning::tier(app, model).await {
                // Batches cost half the tier's price.
                let cost = 0.5
                    * tier
                        .price
                        .cost_usd(usage.prompt_tokens, cached, usage.completion_tokens);
                result.usage = Some(UsageRecord {
                    id: format!("{}-{}", line.batch_id, line.line),
                    created: now(),
                    model: tier.id.clone(),
                    endpoint: format!(
                        "batch.{}",
                        endpoint.trim_start_matches("/v1/").replace('/', ".")
                    ),
                    prompt_tokens: usage.prompt_tokens,
                    cached_tokens: cached,
                    completion_tokens: usage.completion_tokens,
                    cost_usd: cost,
                    batch: true,
                });
            }
            (200, body)
        }
        Err(e) => {
            result.failed = true;
            let e = e.into_api_logged();
            (e.status, e.body())
        }
    };
    result.result = json!({
        "id": random_id("batch_req_"),
        "custom_id": line.custom_id,
        "response": {"status_code": status, "request_id": request_id, "body": body},
        "error": null,
    })
    .to_string();
    match app.store.finish_line(worker, &line, &result).await {
        Ok(true) => {
            let outcome = if result.failed { "failed" } else { "completed" };
            app.metrics.batch_line(outcome);
            tracing::debug!(batch = %line.batch_id, line = line.line, outcome, "batch line done");
        }
        Ok(false) => tracing::warn!(
            batch = %line.batch_id,
            line = line.line,
            "batch line result dropped: the line's lease was lost to another worker"
        ),
        Err(e) => {
            tracing::error!(error = %e, batch = %line.batch_id, line = line.line, "could not write a batch line's result")
        }
    }
}

/// Writes a finished batch's output and error files and sets its final status.
async fn finalize(app: &App, worker: &str, b: BatchRecord) -> Result<(), ServerError> {
    let final_status = if b.status == BatchStatus::Cancelling {
        BatchStatus::Cancelled
    } else if now() >= b.expires_at {
        BatchStatus::Expired
    } else {
        BatchStatus::Completed
    };
    if final_status == BatchStatus::Expired {
        for (line, custom_id) in app.store.unfinished_lines(&b.id).await? {
            let result = json!({
                "id": random_id("batch_req_"),
                "custom_id": custom_id,
                "response": null,
                "error": {
                    "code": "batch_expired",
                    "message": "This request could not be executed before the completion window expired.",
                },
            });
            app.store.end_line(&b.id, line, &result.to_string()).await?;
        }
    }
    let done = app.store.done_lines(&b.id).await?;
    let suffix = b.id.trim_start_matches("batch_");
    let write = |failed: bool| -> Result<Option<FileRecord>, ServerError> {
        let mut text = String::new();
        for l in done.iter().filter(|l| l.failed == failed) {
            text.push_str(&l.result);
            text.push('\n');
        }
        if text.is_empty() {
            return Ok(None);
        }
        // Ids derived from the batch: a finalization retried after a crash rewrites the same
        // files instead of leaving orphans.
        let (kind, id) = if failed {
            ("error", format!("file-{suffix}err"))
        } else {
            ("output", format!("file-{suffix}out"))
        };
        app.blobs
            .write(&id, text.as_bytes())
            .map_err(ServerError::io("writing a batch result file"))?;
        Ok(Some(FileRecord {
            id,
            created_at: now(),
            filename: format!("{}_{kind}.jsonl", b.id),
            purpose: "batch_output".into(),
            bytes: text.len() as u64,
            expires_at: None,
        }))
    };
    let output = write(false)?;
    let errors = write(true)?;
    let done = app
        .store
        .complete_batch(
            &b.id,
            worker,
            final_status,
            output.as_ref(),
            errors.as_ref(),
            now(),
        )
        .await?;
    if done {
        tracing::info!(id = %b.id, status = final_status.as_str(), "batch finished");
    }
    Ok(())
}
