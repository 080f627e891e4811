//! The fine-tuning API (`/v1/fine_tuning/jobs`), the job runner every server runs, and the
//! fine-tuned models (`ft:...`) it produces: listed in `/v1/models`, deletable, and served by
//! their base tier's engine with their LoRA adapter.
//!
//! A job goes `validating_files` -> `queued` -> `running` -> `succeeded` | `failed` |
//! `cancelled` (and `paused` <-> `queued`). The runner claims jobs through leases in the store
//! (`ferrum_store::fine_tuning`), as the batch worker claims lines: it validates files (every
//! line rendered and tokenized as training will see it), then trains one job at a time with
//! `ferrum_train::train` on a dedicated thread, on the tier's already-loaded model. Each step's
//! metrics become an event, each epoch a checkpoint (adapter and resume state as blobs, the row
//! and its event in one transaction); a job whose server died is taken over when its lease runs
//! out and resumes from its last checkpoint, with no event or checkpoint written twice. Training
//! yields to interactive traffic: between micro-batches it waits while the engine of its tier
//! has requests running or waiting.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, Query, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use ferrum_engine::LoraAdapter;
use ferrum_protocol::reader::{parse_object, Fields};
use ferrum_protocol::ApiError;
use ferrum_protocol::ErrorType;
use ferrum_registry::Tier;
use ferrum_store::{
    CheckpointRecord, EventRecord, FileRecord, FineTunedModel, JobFilter, JobRecord, JobStatus,
    JobSuccess, NewEvent, Order, UsageRecord,
};
use ferrum_train::{
    Control, EpochReport, Example, Hyperparameters, LineError, Outcome, Progress, StepReport,
    TrainSettings,
};
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};

use crate::models::{Engine, Loaded};
use crate::paging::{self, ListOut, Rules};
use crate::{now, random_id, App, ServerError};

/// The organization fine-tuned model names carry (`ft:<model>:ferrum:<suffix>:<id>`) and that
/// owns them in `/v1/models`.
pub const ORG: &str = "ferrum";
/// The job object's `organization_id`.
const ORGANIZATION_ID: &str = "org-ferrum";
/// Fewest training examples a job accepts, as OpenAI.
const MIN_EXAMPLES: usize = 10;
/// Adapters kept loaded for serving; the least recently used beyond this is dropped.
const ADAPTER_CACHE: usize = 4;
/// Longest a training run waits at one pause point for interactive traffic to drain, so a
/// steady stream of requests slows training down without stopping it.
const MAX_YIELD: Duration = Duration::from_secs(2);

/// What the fine-tuning side of the server keeps in memory.
#[derive(Default)]
pub struct FineTuning {
    /// Wakes the job runner (a job was created or resumed).
    pub wakeup: tokio::sync::Notify,
    /// The stop signal of each job this server is training, by job id.
    running: Mutex<HashMap<String, Arc<JobControl>>>,
    /// Loaded adapters, most recently used last.
    adapters: Mutex<Vec<CachedAdapter>>,
}

struct CachedAdapter {
    id: String,
    /// The base model it was loaded for (a reloaded tier needs it loaded again).
    base: usize,
    adapter: Arc<LoraAdapter>,
}

pub fn routes() -> Router<Arc<App>> {
    Router::new()
        .route("/v1/fine_tuning/jobs", post(create).get(list))
        .route("/v1/fine_tuning/jobs/{id}", get(retrieve))
        .route("/v1/fine_tuning/jobs/{id}/cancel", post(cancel))
        .route("/v1/fine_tuning/jobs/{id}/pause", post(pause))
        .route("/v1/fine_tuning/jobs/{id}/resume", post(resume))
        .route("/v1/fine_tuning/jobs/{id}/events", get(events))
        .route("/v1/fine_tuning/jobs/{id}/checkpoints", get(checkpoints))
}

// ---------------------------------------------------------------------------------------------
// Creating a job.

/// Requested supervised hyperparameters; `None` is "auto".
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Requested {
    n_epochs: Option<u32>,
    batch_size: Option<u32>,
    learning_rate_multiplier: Option<f64>,
}

impl Requested {
    fn json(&self) -> Value {
        let or_auto = |v: Option<Value>| v.unwrap_or_else(|| json!("auto"));
        json!({
            "n_epochs": or_auto(self.n_epochs.map(Value::from)),
            "batch_size": or_auto(self.batch_size.map(Value::from)),
            "learning_rate_multiplier": or_auto(self.learning_rate_multiplier.map(Value::from)),
        })
    }

    /// Reads a stored hyperparameters object (values or "auto").
    fn from_json(v: &Value) -> Requested {
        Requested {
            n_epochs: v["n_epochs"].as_u64().map(|n| n as u32),
            batch_size: v["batch_size"].as_u64().map(|n| n as u32),
            learning_rate_multiplier: v["learning_rate_multiplier"].as_f64(),
        }
    }
}

fn resolved_json(h: &Hyperparameters) -> Value {
    json!({
        "n_epochs": h.n_epochs,
        "batch_size": h.batch_size,
        "learning_rate_multiplier": h.learning_rate_multiplier,
    })
}

fn method_json(hyperparameters: &Value) -> Value {
    json!({"type": "supervised", "supervised": {"hyperparameters": hyperparameters}})
}

/// Reads `n_epochs`, `batch_size` and `learning_rate_multiplier`, each "auto" or a value in
/// the spec's range.
fn parse_hyperparameters(f: &Fields) -> Result<Requested, ApiError> {
    f.deny_unknown(&["n_epochs", "batch_size", "learning_rate_multiplier"])
        .map_err(|_| {
            let k = f
                .map
                .keys()
                .find(|k| {
                    !["n_epochs", "batch_size", "learning_rate_multiplier"].contains(&k.as_str())
                })
                .cloned()
                .unwrap_or_default();
            ApiError::invalid_param(
                f.path_of(&k),
                "unknown_parameter",
                format!("Unknown hyperparameter: '{}'.", f.path_of(&k)),
            )
        })?;
    let auto = |key: &str| matches!(f.get(key), Some(Value::String(s)) if s == "auto");
    let bad_string = |key: &str| -> Option<ApiError> {
        match f.get(key) {
            Some(Value::String(s)) if s != "auto" => Some(ApiError::invalid_param(
                f.path_of(key),
                "invalid_value",
                format!(
                    "Invalid value for '{}': expected \"auto\" or a number, got {s:?}.",
                    f.path_of(key)
                ),
            )),
            _ => None,
        }
    };
    let mut out = Requested::default();
    for key in ["n_epochs", "batch_size", "learning_rate_multiplier"] {
        if let Some(e) = bad_string(key) {
            return Err(e);
        }
    }
    if !auto("n_epochs") {
        out.n_epochs = f.integer("n_epochs", 1, 50)?.map(|n| n as u32);
    }
    if !auto("batch_size") {
        out.batch_size = f.integer("batch_size", 1, 256)?.map(|n| n as u32);
    }
    if !auto("learning_rate_multiplier") {
        let lr = f.decimal("learning_rate_multiplier", 0.0, 1e6)?;
        if lr == Some(0.0) {
            let path = f.path_of("learning_rate_multiplier");
            return Err(ApiError::invalid_param(
                &path,
                "decimal_below_min_value",
                format!("Invalid '{path}': expected a value > 0, but got 0 instead."),
            ));
        }
        out.learning_rate_multiplier = lr;
    }
    Ok(out)
}

/// The model a job records: the name given, or for a tier id its dated alias (OpenAI reports
/// the snapshot a job tuned, e.g. `gpt-4.1-nano-2025-04-14`).
fn snapshot_name(given: &str, tier: &Tier) -> String {
    if given != tier.id {
        return given.to_string();
    }
    let dated = tier.aliases.iter().find(|a| {
        a.strip_prefix(&tier.id)
            .and_then(|rest| rest.strip_prefix('-'))
            .is_some_and(|d| d.len() == 10 && d.chars().all(|c| c.is_ascii_digit() || c == '-'))
    });
    dated.cloned().unwrap_or_else(|| tier.id.clone())
}

/// A fine-tune file named by a job: it must exist and have purpose `fine-tune`.
async fn tuning_file(app: &App, id: &str, param: &str) -> Result<FileRecord, ServerError> {
    let file = crate::files::find(app, id).await.map_err(|e| match e {
        // No such file: the parameter is at fault (a failing database stays a 500).
        ServerError::Api(_) => ApiError::invalid_param(
            param,
            "invalid_value",
            format!("invalid {param}: {id} (no such file; upload it with purpose 'fine-tune')"),
        )
        .into(),
        other => other,
    })?;
    if file.purpose != "fine-tune" {
        return Err(ApiError::invalid_param(
            param,
            "invalid_file_purpose",
            format!(
                "The file {id} has purpose '{}'; a fine-tuning job's {param} must have purpose \
                 'fine-tune'.",
                file.purpose
            ),
        )
        .into());
    }
    Ok(file)
}

async fn create(
    State(app): State<Arc<App>>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ServerError> {
    let map = parse_object(&body)?;
    let f = Fields::new(&map, "");
    f.deny_unknown(&[
        "model",
        "training_file",
        "validation_file",
        "hyperparameters",
        "method",
        "suffix",
        "seed",
        "metadata",
        "integrations",
    ])?;
    let model = f.required_str("model")?;
    let not_tunable = |why: String| -> ServerError {
        ApiError::invalid_param("model", "model_not_available", why).into()
    };
    if model.starts_with("ft:") {
        return Err(not_tunable(format!(
            "Model {model} cannot be fine-tuned: this server fine-tunes base models only, not \
             fine-tuned ones."
        )));
    }
    let tier = app.models.resolve(model).map_err(|_| {
        not_tunable(format!(
            "Model {model} is not available for fine-tuning or does not exist. Available: {}.",
            app.models
                .tiers()
                .iter()
                .filter(|t| t.kind == ferrum_registry::ModelKind::Chat)
                .map(|t| t.id.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))
    })?;
    if tier.kind != ferrum_registry::ModelKind::Chat {
        return Err(not_tunable(format!(
            "Model {model} is an embedding model; only chat models can be fine-tuned."
        )));
    }
    let training_file = f.required_str("training_file")?.to_string();
    let validation_file = f.str("validation_file")?.map(str::to_string);
    let suffix = match f.str("suffix")? {
        None => None,
        Some(s) => {
            let n = s.chars().count();
            if n == 0 || n > 64 {
                return Err(ApiError::invalid_param(
                    "suffix",
                    "invalid_value",
                    format!("Invalid 'suffix': expected 1 to 64 characters, got {n}."),
                )
                .into());
            }
            if !s
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
            {
                return Err(ApiError::invalid_param(
                    "suffix",
                    "invalid_value",
                    "Invalid 'suffix': only letters, digits, '-', '_' and '.' are allowed (it \
                     becomes part of the model name).",
                )
                .into());
            }
            Some(s.to_string())
        }
    };
    let seed = match f.integer("seed", 0, 2_147_483_647)? {
        Some(s) => s,
        None => {
            use rand::Rng;
            rand::thread_rng().gen_range(0..=2_147_483_647)
        }
    };
    let metadata = ferrum_protocol::chat::parse_metadata(&f)?.map(|m| {
        let mut pairs: Vec<(String, String)> = m
            .into_iter()
            .map(|(k, v)| (k, v.as_str().unwrap_or_default().to_string()))
            .collect();
        pairs.sort();
        pairs
    });
    match f.array("integrations")? {
        Some(list) if !list.is_empty() => {
            return Err(ApiError::invalid_param(
                "integrations",
                "unsupported_parameter",
                "Integrations (Weights & Biases) are not supported by this server; follow a \
                 job through its events and checkpoints instead.",
            )
            .into())
        }
        _ => {}
    }
    let legacy = match f.object("hyperparameters")? {
        Some(h) => Some(parse_hyperparameters(&h)?),
        None => None,
    };
    let from_method = match f.object("method")? {
        None => None,
        Some(m) => {
            m.deny_unknown(&["type", "supervised", "dpo", "reinforcement"])?;
            let kind = m
                .choice("type", &["supervised", "dpo", "reinforcement"])?
                .ok_or_else(|| ferrum_protocol::reader::missing("method.type"))?;
            if kind != "supervised" {
                return Err(ApiError::invalid_param(
                    "method.type",
                    "unsupported_value",
                    format!(
                        "The '{kind}' fine-tuning method is not supported by this server; \
                         supported: 'supervised'."
                    ),
                )
                .into());
            }
            let h = match m.object("supervised")? {
                Some(s) => {
                    s.deny_unknown(&["hyperparameters"])?;
                    match s.object("hyperparameters")? {
                        Some(h) => Some(parse_hyperparameters(&h)?),
                        None => None,
                    }
                }
                None => None,
            };
            Some(h.unwrap_or_default())
        }
    };
    let requested = match (legacy, from_method) {
        (Some(l), Some(m)) if l != Requested::default() && m != Requested::default() => {
            return Err(ApiError::invalid_param(
                "hyperparameters",
                "invalid_value",
                "Give the hyperparameters once: in 'method.supervised.hyperparameters' (the \
                 deprecated 'hyperparameters' is accepted alone).",
            )
            .into())
        }
        (l, m) => match (l, m) {
            (Some(l), Some(m)) if l == Requested::default() => m,
            (Some(l), _) => l,
            (None, Some(m)) => m,
            (None, None) => Requested::default(),
        },
    };
    tuning_file(&app, &training_file, "training_file").await?;
    if let Some(v) = &validation_file {
        tuning_file(&app, v, "validation_file").await?;
    }
    let hyper = requested.json();
    let job = JobRecord {
        id: random_id("ftjob-"),
        created_at: now(),
        model: snapshot_name(model, &tier),
        base_tier: tier.id.clone(),
        training_file,
        validation_file,
        status: JobStatus::ValidatingFiles,
        hyperparameters: hyper.to_string(),
        method: method_json(&hyper).to_string(),
        seed,
        suffix,
        metadata,
        error: None,
        fine_tuned_model: None,
        trained_tokens: None,
        estimated_finish: None,
        finished_at: None,
        result_files: Vec::new(),
    };
    let created = NewEvent::info(format!("Created fine-tuning job: {}", job.id)).once("created");
    app.store.create_fine_tuning_job(&job, &created).await?;
    tracing::info!(id = %job.id, model = %job.model, training_file = %job.training_file, "fine-tuning job created");
    app.fine_tuning.wakeup.notify_one();
    Ok(Json(object(&job)))
}

// ---------------------------------------------------------------------------------------------
// Reading jobs, events and checkpoints.

/// The `fine_tuning.job` object.
fn object(j: &JobRecord) -> Value {
    let parse = |text: &str| serde_json::from_str::<Value>(text).unwrap_or(Value::Null);
    let metadata = j.metadata.as_ref().map(|pairs| {
        Value::Object(
            pairs
                .iter()
                .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                .collect(),
        )
    });
    json!({
        "object": "fine_tuning.job",
        "id": j.id,
        "model": j.model,
        "created_at": j.created_at,
        "finished_at": j.finished_at,
        "fine_tuned_model": j.fine_tuned_model,
        "organization_id": ORGANIZATION_ID,
        "result_files": j.result_files,
        "status": j.status.as_str(),
        "validation_file": j.validation_file,
        "training_file": j.training_file,
        "hyperparameters": parse(&j.hyperparameters),
        // Known once the job has ended, as OpenAI reports it.
        "trained_tokens": if j.status.is_final() { j.trained_tokens } else { None },
        "error": j.error.as_deref().map(parse),
        "integrations": [],
        "seed": j.seed,
        "estimated_finish": if j.status == JobStatus::Running { j.estimated_finish } else { None },
        "method": parse(&j.method),
        "metadata": metadata,
        "user_provided_suffix": j.suffix,
    })
}

fn event_object(e: EventRecord) -> Value {
    json!({
        "object": "fine_tuning.job.event",
        "id": e.id,
        "created_at": e.created_at,
        "level": e.level,
        "message": e.message,
        "data": serde_json::from_str::<Value>(&e.data).unwrap_or_else(|_| json!({})),
        "type": e.kind,
    })
}

fn checkpoint_object(c: CheckpointRecord) -> Value {
    json!({
        "object": "fine_tuning.job.checkpoint",
        "id": c.id,
        "created_at": c.created_at,
        "fine_tuned_model_checkpoint": c.fine_tuned_model_checkpoint,
        "step_number": c.step_number,
        "metrics": serde_json::from_str::<Value>(&c.metrics).unwrap_or_else(|_| json!({})),
        "fine_tuning_job_id": c.job_id,
    })
}

async fn find(app: &App, id: &str) -> Result<JobRecord, ServerError> {
    app.store.get_fine_tuning_job(id).await?.ok_or_else(|| {
        ApiError::not_found(format!("No such fine-tuning job: {id}"))
            .with_param("fine_tuning_job_id")
            .with_code("fine_tune_not_found")
            .into()
    })
}

async fn retrieve(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ServerError> {
    Ok(Json(object(&find(&app, &id).await?)))
}

const NO_ORDER: Rules = Rules {
    default_limit: 20,
    max_limit: 100,
    default_order: Order::Desc,
    has_order: false,
};

async fn list(
    State(app): State<Arc<App>>,
    Query(pairs): Query<Vec<(String, String)>>,
) -> Result<Json<ListOut<Value>>, ServerError> {
    let page = paging::page(&pairs, &NO_ORDER)?;
    let mut filter = JobFilter::default();
    for (k, v) in &pairs {
        if let Some(key) = k
            .strip_prefix("metadata[")
            .and_then(|r| r.strip_suffix(']'))
        {
            filter.metadata.push((key.to_string(), v.clone()));
        }
    }
    let listed = app.store.list_fine_tuning_jobs(&filter, &page).await?;
    Ok(Json(ListOut::new(listed.map(|j| object(&j)), |v| {
        v["id"].as_str().unwrap_or("")
    })))
}

async fn events(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    Query(pairs): Query<Vec<(String, String)>>,
) -> Result<Json<ListOut<Value>>, ServerError> {
    let page = paging::page(&pairs, &NO_ORDER)?;
    find(&app, &id).await?;
    let listed = app.store.list_fine_tuning_events(&id, &page).await?;
    Ok(Json(ListOut::new(listed.map(event_object), |v| {
        v["id"].as_str().unwrap_or("")
    })))
}

async fn checkpoints(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    Query(pairs): Query<Vec<(String, String)>>,
) -> Result<Json<ListOut<Value>>, ServerError> {
    let page = paging::page(
        &pairs,
        &Rules {
            default_limit: 10,
            ..NO_ORDER
        },
    )?;
    find(&app, &id).await?;
    let listed = app.store.list_fine_tuning_checkpoints(&id, &page).await?;
    Ok(Json(ListOut::new(listed.map(checkpoint_object), |v| {
        v["id"].as_str().unwrap_or("")
    })))
}

// ---------------------------------------------------------------------------------------------
// Cancel, pause, resume.

fn invalid_state(message: String) -> ServerError {
    ApiError::invalid_request(message)
        .with_code("invalid_state")
        .into()
}

async fn cancel(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ServerError> {
    let Some((changed, job)) = app.store.cancel_fine_tuning_job(&id, now()).await? else {
        return Err(find(&app, &id).await.err().unwrap_or_else(|| {
            ApiError::not_found(format!("No such fine-tuning job: {id}")).into()
        }));
    };
    if !changed && job.status != JobStatus::Cancelled {
        return Err(invalid_state(format!(
            "Cannot cancel a job with status '{}': it has already ended.",
            job.status.as_str()
        )));
    }
    if changed {
        app.fine_tuning.signal(&id, STOP_CANCELLED);
        tracing::info!(%id, "fine-tuning job cancelled");
    }
    Ok(Json(object(&job)))
}

async fn pause(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ServerError> {
    let Some((changed, job)) = app.store.pause_fine_tuning_job(&id, now()).await? else {
        return Err(find(&app, &id).await.err().unwrap_or_else(|| {
            ApiError::not_found(format!("No such fine-tuning job: {id}")).into()
        }));
    };
    if !changed && job.status != JobStatus::Paused {
        return Err(invalid_state(format!(
            "Cannot pause a job with status '{}'; only queued and running jobs can be paused.",
            job.status.as_str()
        )));
    }
    if changed {
        app.fine_tuning.signal(&id, STOP_PAUSED);
        tracing::info!(%id, "fine-tuning job paused");
    }
    Ok(Json(object(&job)))
}

async fn resume(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ServerError> {
    let Some((changed, job)) = app.store.resume_fine_tuning_job(&id, now()).await? else {
        return Err(find(&app, &id).await.err().unwrap_or_else(|| {
            ApiError::not_found(format!("No such fine-tuning job: {id}")).into()
        }));
    };
    if !changed {
        return Err(invalid_state(format!(
            "Cannot resume a job with status '{}'; only paused jobs can be resumed.",
            job.status.as_str()
        )));
    }
    tracing::info!(%id, "fine-tuning job resumed");
    app.fine_tuning.wakeup.notify_one();
    Ok(Json(object(&job)))
}

// ---------------------------------------------------------------------------------------------
// Fine-tuned models: listing, deleting, serving.

/// `ft:<model>:<org>:<suffix>:<id>`, the name of a job's model (the id: 8 characters of the
/// job's id), as OpenAI names them.
fn model_name(job: &JobRecord) -> String {
    let short: String = job
        .id
        .trim_start_matches("ftjob-")
        .chars()
        .take(8)
        .collect();
    format!(
        "ft:{}:{ORG}:{}:{short}",
        job.model,
        job.suffix.as_deref().unwrap_or("")
    )
}

/// The fine-tuned models for `/v1/models`.
pub(crate) async fn list_models(
    app: &App,
) -> Result<Vec<ferrum_protocol::response::Model>, ServerError> {
    Ok(app
        .store
        .list_fine_tuned_models()
        .await?
        .into_iter()
        .map(|m| model_object(&m))
        .collect())
}

fn model_object(m: &FineTunedModel) -> ferrum_protocol::response::Model {
    ferrum_protocol::response::Model {
        id: m.id.clone(),
        object: "model",
        created: m.created,
        owned_by: ORG.into(),
    }
}

/// `GET /v1/models/{id}` for an `ft:` id.
pub(crate) async fn get_model(
    app: &App,
    id: &str,
) -> Result<ferrum_protocol::response::Model, ServerError> {
    match app.store.get_fine_tuned_model(id).await? {
        Some(m) if !m.deleted => Ok(model_object(&m)),
        _ => Err(ApiError::model_not_found(id).into()),
    }
}

/// `DELETE /v1/models/{id}`: deletes a fine-tuned model; base tiers cannot be deleted.
pub(crate) async fn delete_model(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ServerError> {
    if !id.starts_with("ft:") {
        if app.models.resolve_adapter(&id).is_none() {
            app.models.resolve(&id)?;
        }
        return Err(ApiError {
            status: 403,
            kind: ErrorType::InvalidRequest,
            message: format!(
                "You cannot delete the model `{id}`: only models made by fine-tuning jobs can \
                 be deleted."
            ),
            param: Some("model".into()),
            code: Some("model_not_deletable".into()),
        }
        .into());
    }
    if !app.store.delete_fine_tuned_model(&id).await? {
        return Err(ApiError::model_not_found(&id).into());
    }
    app.fine_tuning
        .adapters
        .lock()
        .expect("lock")
        .retain(|a| a.id != id);
    tracing::info!(%id, "fine-tuned model deleted");
    Ok(Json(json!({"id": id, "object": "model", "deleted": true})))
}

/// A fine-tuned model (or a job's checkpoint) to serve: its base tier and adapter blob.
async fn find_tuned(app: &App, id: &str) -> Result<(String, String), ServerError> {
    if let Some(m) = app.store.get_fine_tuned_model(id).await? {
        if !m.deleted {
            return Ok((m.base_tier, m.adapter_blob));
        }
        return Err(ApiError::model_not_found(id).into());
    }
    if let Some(c) = app.store.fine_tuning_checkpoint_by_name(id).await? {
        if let Some(job) = app.store.get_fine_tuning_job(&c.job_id).await? {
            return Ok((job.base_tier, c.adapter_blob));
        }
    }
    Err(ApiError::model_not_found(id).into())
}

/// Where a served adapter's GGUF file is.
enum AdapterFile {
    /// A fine-tuning job's adapter, in the blob store.
    Blob(String),
    /// An external adapter named in `ferrum.toml` (`[[tier.adapter]]`).
    Config(ferrum_registry::WeightsSource),
}

/// For a model that is a base tier plus an adapter (an `ft:` model, a checkpoint, or an
/// adapter of the config), its base tier's id and its adapter; `None` for a tier.
async fn find_adapter(
    app: &App,
    model: &str,
) -> Result<Option<(String, AdapterFile)>, ServerError> {
    if model.starts_with("ft:") {
        let (base, blob) = find_tuned(app, model).await?;
        return Ok(Some((base, AdapterFile::Blob(blob))));
    }
    Ok(app
        .models
        .resolve_adapter(model)
        .map(|(tier, a)| (tier.id, AdapterFile::Config(a.weights))))
}

/// The tier a request's model names, as the response and the bill see it: for an `ft:` model
/// (or a configured adapter), its base tier renamed to it and priced with the tier's
/// fine-tuned prices.
pub(crate) async fn tier(app: &App, model: &str) -> Result<Tier, ServerError> {
    match find_adapter(app, model).await? {
        None => Ok(app.models.resolve(model)?),
        Some((base, _)) => Ok(tuned_tier(app.models.resolve(&base)?, model)),
    }
}

fn tuned_tier(mut tier: Tier, id: &str) -> Tier {
    tier.price = tier.fine_tuned_price().price();
    tier.id = id.to_string();
    tier.aliases.clear();
    tier
}

/// The loaded model a request runs on: a tier, or for an `ft:` model (or a configured
/// adapter) its base tier with the model's adapter (loaded on first use, kept in a small LRU
/// cache).
pub(crate) async fn loaded(app: &App, model: &str) -> Result<Loaded, ServerError> {
    let Some((base, file)) = find_adapter(app, model).await? else {
        return Ok(app.models.get(model).await?);
    };
    let mut loaded = app.models.get(&base).await?;
    let base_key = Arc::as_ptr(&loaded.handle.shared_model()) as usize;
    let cached = {
        let mut cache = app.fine_tuning.adapters.lock().expect("lock");
        match cache
            .iter()
            .position(|a| a.id == model && a.base == base_key)
        {
            Some(i) => {
                let hit = cache.remove(i);
                let adapter = Arc::clone(&hit.adapter);
                cache.push(hit);
                Some(adapter)
            }
            None => None,
        }
    };
    let adapter = match cached {
        Some(a) => a,
        None => {
            let blob_path = match &file {
                AdapterFile::Blob(blob) => Some(app.blobs.path(blob)),
                AdapterFile::Config(_) => None,
            };
            let shared = loaded.handle.shared_model();
            let name = model.to_string();
            let adapter = tokio::task::spawn_blocking(move || {
                let path = match (blob_path, file) {
                    (Some(p), _) => p,
                    // A path is checked, a Hugging Face file fetched (or found in its cache).
                    (None, AdapterFile::Config(w)) => {
                        let progress = ferrum_registry::default_progress();
                        ferrum_registry::ensure_weights(&w, progress.as_ref())
                            .map_err(|e| ServerError::internal("fetching an adapter", e))?
                    }
                    (None, AdapterFile::Blob(_)) => unreachable!("a blob has its path"),
                };
                LoraAdapter::load(&path, &name, &shared.model)
                    .map_err(|e| ServerError::internal("loading an adapter", e))
            })
            .await
            .map_err(|e| ServerError::internal("loading an adapter", e))??;
            let adapter = Arc::new(adapter);
            let mut cache = app.fine_tuning.adapters.lock().expect("lock");
            cache.retain(|a| a.id != model);
            cache.push(CachedAdapter {
                id: model.to_string(),
                base: base_key,
                adapter: Arc::clone(&adapter),
            });
            if cache.len() > ADAPTER_CACHE {
                let evicted = cache.remove(0);
                tracing::debug!(model = %evicted.id, "adapter evicted");
            }
            tracing::info!(%model, "adapter loaded");
            adapter
        }
    };
    loaded.tier = tuned_tier(loaded.tier, model);
    loaded.adapter = Some(adapter);
    Ok(loaded)
}

// ---------------------------------------------------------------------------------------------
// The job runner.

const RUN: u8 = 0;
const STOP_CANCELLED: u8 = 1;
const STOP_PAUSED: u8 = 2;
const STOP_SHUTDOWN: u8 = 3;
/// The job is no longer this server's (its lease was lost, or it changed status elsewhere).
const STOP_LOST: u8 = 4;

/// A running job's stop signal, read by the training thread at every report and pause point.
#[derive(Default)]
struct JobControl(AtomicU8);

impl JobControl {
    fn stop(&self, why: u8) {
        let _ = self
            .0
            .compare_exchange(RUN, why, Ordering::SeqCst, Ordering::SeqCst);
    }

    fn reason(&self) -> u8 {
        self.0.load(Ordering::SeqCst)
    }

    fn control(&self) -> Control {
        if self.reason() == RUN {
            Control::Continue
        } else {
            Control::Stop
        }
    }
}

impl FineTuning {
    fn signal(&self, job: &str, why: u8) {
        if let Some(c) = self.running.lock().expect("lock").get(job) {
            c.stop(why);
        }
    }
}

/// Milliseconds since the epoch, the unit of leases.
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The fine-tuning job runner of this server: validates jobs' files and trains one job at a
/// time. Ends when `stop` fires, stopping the job it trains at its next pause point and
/// handing it back (another server, or this one restarted, resumes it from its last
/// checkpoint).
pub async fn run_worker(app: Arc<App>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let worker = app.worker_id.clone();
    let poll = app.batch.poll;
    let lease_ms = app.batch.lease.as_millis() as i64;
    tracing::info!(%worker, "fine-tuning runner started");
    let mut training: Option<(String, tokio::task::JoinHandle<()>)> = None;
    loop {
        let mut finished = false;
        {
            let done = async {
                match training.as_mut() {
                    Some((_, task)) => {
                        let _ = task.await;
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = stop.changed() => break,
                _ = done => finished = true,
                _ = app.fine_tuning.wakeup.notified() => {}
                _ = tokio::time::sleep(poll) => {}
            }
        }
        if finished {
            training = None;
        }
        if let Err(e) = step(&app, &worker, lease_ms, &mut training).await {
            tracing::warn!(error = %e, "fine-tuning runner step failed; retrying");
            tokio::time::sleep(poll).await;
        }
    }
    if let Some((id, task)) = training {
        tracing::info!(job = %id, "stopping fine-tuning for shutdown");
        app.fine_tuning.signal(&id, STOP_SHUTDOWN);
        // Training stops at its next pause point; a job that does not stop in time is left to
        // its lease, which runs out.
        if tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .is_err()
        {
            tracing::warn!(job = %id, "fine-tuning did not stop in time; its lease will expire");
        }
    }
}

async fn step(
    app: &Arc<App>,
    worker: &str,
    lease_ms: i64,
    training: &mut Option<(String, tokio::task::JoinHandle<()>)>,
) -> Result<(), ServerError> {
    while let Some(job) = app
        .store
        .claim_fine_tuning_validation(worker, now_ms(), lease_ms)
        .await?
    {
        validate(app, worker, job).await?;
    }
    if training.is_none() {
        if let Some(job) = app
            .store
            .claim_fine_tuning_run(worker, now_ms(), lease_ms)
            .await?
        {
            let id = job.id.clone();
            let control = Arc::new(JobControl::default());
            app.fine_tuning
                .running
                .lock()
                .expect("lock")
                .insert(id.clone(), Arc::clone(&control));
            let (app2, worker2) = (Arc::clone(app), worker.to_string());
            let task = tokio::spawn(async move {
                let id = job.id.clone();
                if let Err(e) = run_job(&app2, &worker2, job, &control, lease_ms).await {
                    tracing::error!(job = %id, error = %e, "fine-tuning job runner failed");
                    // The training thread (if any) stops at its next report.
                    control.stop(STOP_LOST);
                    // Handed back: the job resumes from its last checkpoint.
                    let _ = app2.store.release_fine_tuning_job(&id, &worker2).await;
                }
                app2.fine_tuning.running.lock().expect("lock").remove(&id);
            });
            *training = Some((id, task));
        }
    }
    Ok(())
}

/// Why a file fails a job, in OpenAI's words.
struct FileProblem {
    code: &'static str,
    param: &'static str,
    message: String,
}

fn error_json(p: &FileProblem) -> String {
    json!({"code": p.code, "message": p.message, "param": p.param}).to_string()
}

/// Reads a fine-tune file into examples as training will see them; the first bad line names
/// its 1-based number.
fn read_examples(
    model: &ferrum_engine::LoadedModel,
    path: &std::path::Path,
    validation: bool,
) -> Result<Vec<Example>, FileProblem> {
    let (code, param, what) = if validation {
        ("invalid_validation_file", "validation_file", "validation")
    } else {
        ("invalid_training_file", "training_file", "training")
    };
    let problem = |message: String| FileProblem {
        code,
        param,
        message: format!("The job failed due to an invalid {what} file. {message}"),
    };
    let file = std::fs::File::open(path)
        .map_err(|e| problem(format!("The {what} file cannot be read: {e}.")))?;
    let examples = ferrum_train::read_chat_examples(model, std::io::BufReader::new(file)).map_err(
        |(n, e)| {
            problem(match e {
                LineError::Read(e) => format!("Reading line {n} failed: {e}."),
                LineError::Json(e) => format!("Line {n}: invalid JSON ({e})."),
                LineError::Data(e) => format!("Line {n}: {e}."),
            })
        },
    )?;
    if !validation && examples.len() < MIN_EXAMPLES {
        return Err(problem(format!(
            "Training file has {} example(s), but must have at least {MIN_EXAMPLES} examples.",
            examples.len()
        )));
    }
    if validation && examples.is_empty() {
        return Err(problem("The validation file has no examples.".into()));
    }
    Ok(examples)
}

/// Loads a job's training and validation examples on a blocking thread.
async fn load_examples(
    app: &App,
    job: &JobRecord,
    loaded: &Loaded,
) -> Result<Result<(Vec<Example>, Vec<Example>), FileProblem>, ServerError> {
    let mut paths = Vec::new();
    for (id, validation) in std::iter::once((&job.training_file, false))
        .chain(job.validation_file.iter().map(|v| (v, true)))
    {
        if app.store.get_file(id).await?.is_none() {
            let (code, param) = if validation {
                ("invalid_validation_file", "validation_file")
            } else {
                ("invalid_training_file", "training_file")
            };
            return Ok(Err(FileProblem {
                code,
                param,
                message: format!("The file {id} no longer exists."),
            }));
        }
        paths.push((app.blobs.path(id), validation));
    }
    let model = loaded.handle.shared_model();
    tokio::task::spawn_blocking(move || {
        let mut train = Vec::new();
        let mut valid = Vec::new();
        for (path, validation) in paths {
            let examples = read_examples(&model, &path, validation)?;
            if validation {
                valid = examples;
            } else {
                train = examples;
            }
        }
        Ok((train, valid))
    })
    .await
    .map_err(|e| ServerError::internal("reading fine-tuning files", e))
}

/// What a job trains on: its tier's model, its examples, its hyperparameters resolved.
struct JobInputs {
    loaded: Loaded,
    train: Vec<Example>,
    valid: Vec<Example>,
    hyper: Hyperparameters,
}

/// Loads a claimed job's base model and reads its files; `None` when that failed the job
/// (the model cannot be loaded, a file is missing or has a bad line).
async fn job_inputs(
    app: &App,
    worker: &str,
    job: &JobRecord,
) -> Result<Option<JobInputs>, ServerError> {
    let loaded = match app.models.get(&job.base_tier).await {
        Ok(l) => l,
        Err(e) => {
            let p = FileProblem {
                code: "model_unavailable",
                param: "model",
                message: format!("The base model cannot be loaded: {}", e.message),
            };
            fail(app, worker, job, &p).await?;
            return Ok(None);
        }
    };
    let (train, valid) = match load_examples(app, job, &loaded).await? {
        Ok(x) => x,
        Err(p) => {
            fail(app, worker, job, &p).await?;
            return Ok(None);
        }
    };
    let requested = Requested::from_json(
        &serde_json::from_str::<Value>(&job.hyperparameters).unwrap_or(Value::Null),
    );
    let hyper = Hyperparameters::resolve(
        train.len(),
        requested.n_epochs,
        requested.batch_size,
        requested.learning_rate_multiplier,
    );
    Ok(Some(JobInputs {
        loaded,
        train,
        valid,
        hyper,
    }))
}

/// Validates a claimed job's files: queues it with its hyperparameters resolved, or fails it
/// naming the file and line at fault.
async fn validate(app: &App, worker: &str, job: JobRecord) -> Result<(), ServerError> {
    let mut message = format!("Validating training file: {}", job.training_file);
    if let Some(v) = &job.validation_file {
        message.push_str(&format!(" and validation file: {v}"));
    }
    let event = NewEvent::info(message).once("validating");
    if !app
        .store
        .add_owned_fine_tuning_event(&job.id, worker, &event, now())
        .await?
    {
        return Ok(());
    }
    let Some(JobInputs { train, hyper, .. }) = job_inputs(app, worker, &job).await? else {
        return Ok(());
    };
    let resolved = resolved_json(&hyper);
    let queued = app
        .store
        .queue_fine_tuning_job(
            &job.id,
            worker,
            &resolved.to_string(),
            &method_json(&resolved).to_string(),
            &NewEvent::info("Files validated, moving job to queued state").once("validated"),
            now(),
        )
        .await?;
    if queued {
        tracing::info!(id = %job.id, examples = train.len(), ?hyper, "fine-tuning job queued");
        app.fine_tuning.wakeup.notify_one();
    }
    Ok(())
}

async fn fail(
    app: &App,
    worker: &str,
    job: &JobRecord,
    p: &FileProblem,
) -> Result<(), ServerError> {
    tracing::info!(id = %job.id, code = p.code, message = %p.message, "fine-tuning job failed");
    let mut event = NewEvent::info(format!("Fine-tuning job failed: {}", p.message)).once("failed");
    event.level = "error";
    app.store
        .fail_fine_tuning_job(&job.id, worker, &error_json(p), &event, now())
        .await?;
    Ok(())
}

/// What the training thread reports to the job's task.
enum Report {
    Step(StepReport),
    /// A checkpoint; the thread waits for the answer (stored or not) before going on.
    Epoch(Box<EpochReport>, oneshot::Sender<bool>),
}

/// The runner's side of `ferrum_train::train`, on the training thread.
struct Runner {
    tx: mpsc::UnboundedSender<Report>,
    control: Arc<JobControl>,
    engine: Arc<dyn Engine>,
}

impl Progress for Runner {
    fn step(&mut self, report: &StepReport) -> Control {
        if self.tx.send(Report::Step(report.clone())).is_err() {
            return Control::Stop;
        }
        self.control.control()
    }

    fn epoch(&mut self, report: &EpochReport) -> Control {
        let (tx, rx) = oneshot::channel();
        if self
            .tx
            .send(Report::Epoch(Box::new(report.clone()), tx))
            .is_err()
        {
            return Control::Stop;
        }
        match rx.blocking_recv() {
            Ok(true) => self.control.control(),
            _ => Control::Stop,
        }
    }

    /// Yields to the tier's interactive requests: while its engine has interactive sequences
    /// running or waiting, waits (up to [`MAX_YIELD`] at a time, so a steady stream slows
    /// training without stopping it). Batch lines are background work, as training is: the
    /// two share the CPU.
    fn pause_point(&mut self) -> Control {
        let started = Instant::now();
        loop {
            if self.control.reason() != RUN {
                return Control::Stop;
            }
            let stats = self.engine.stats();
            let busy = stats.interactive_running.load(Ordering::Relaxed)
                + stats.interactive_waiting.load(Ordering::Relaxed);
            if busy == 0 || started.elapsed() >= MAX_YIELD {
                return Control::Continue;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Trains a claimed job to its end (or until stopped), recording its steps, checkpoints and
/// outcome.
async fn run_job(
    app: &Arc<App>,
    worker: &str,
    job: JobRecord,
    control: &Arc<JobControl>,
    lease_ms: i64,
) -> Result<(), ServerError> {
    let resume_from = app.store.last_fine_tuning_checkpoint(&job.id).await?;
    let started = match &resume_from {
        Some(c) => NewEvent::info(format!(
            "Fine-tuning job resumed from the checkpoint at step {}",
            c.step_number
        )),
        None => NewEvent::info("Fine-tuning job started").once("started"),
    };
    if !app
        .store
        .add_owned_fine_tuning_event(&job.id, worker, &started, now())
        .await?
    {
        return Ok(());
    }
    let Some(JobInputs {
        loaded,
        train,
        valid,
        hyper,
    }) = job_inputs(app, worker, &job).await?
    else {
        return Ok(());
    };
    let settings = TrainSettings::new(hyper, job.seed as u64);
    let resume = match &resume_from {
        Some(c) => Some(
            tokio::fs::read(app.blobs.path(&c.state_blob))
                .await
                .map_err(ServerError::io("reading a checkpoint's state"))?,
        ),
        None => None,
    };
    tracing::info!(
        id = %job.id,
        examples = train.len(),
        validation = valid.len(),
        ?hyper,
        resume_step = resume_from.as_ref().map(|c| c.step_number),
        "fine-tuning job running"
    );

    let (tx, mut rx) = mpsc::unbounded_channel();
    let (done_tx, done_rx) = oneshot::channel();
    let model = loaded.handle.shared_model();
    let mut runner = Runner {
        tx,
        control: Arc::clone(control),
        engine: Arc::clone(&loaded.handle),
    };
    std::thread::Builder::new()
        .name(format!("train-{}", job.id))
        .spawn(move || {
            let out = ferrum_train::train(
                &model,
                &train,
                &valid,
                &settings,
                resume.as_deref(),
                &mut runner,
            );
            drop(runner);
            let _ = done_tx.send(out);
        })
        .map_err(ServerError::io("starting the training thread"))?;

    let name = model_name(&job);
    let mut heartbeat = tokio::time::interval(Duration::from_millis((lease_ms / 3).max(1) as u64));
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let run_started = Instant::now();
    let mut first_step: Option<usize> = None;
    let mut last_tokens = 0u64;
    let mut done_rx = done_rx;
    let outcome = loop {
        tokio::select! {
            report = rx.recv() => match report {
                Some(Report::Step(r)) => {
                    last_tokens = r.trained_tokens;
                    let first = *first_step.get_or_insert(r.step);
                    let done_here = (r.step + 1 - first) as f64;
                    let per_step = run_started.elapsed().as_secs_f64() / done_here;
                    let eta = now() + (per_step * (r.total_steps - r.step) as f64).ceil() as i64;
                    if !app
                        .store
                        .record_fine_tuning_step(&job.id, worker, r.trained_tokens, Some(eta), &step_event(&r), now())
                        .await?
                    {
                        control.stop(STOP_LOST);
                    }
                }
                Some(Report::Epoch(r, reply)) => {
                    let stored = checkpoint(app, worker, &job, &name, &r).await;
                    let ok = match stored {
                        Ok(ok) => ok,
                        Err(e) => {
                            let _ = reply.send(false);
                            return Err(e);
                        }
                    };
                    if !ok {
                        control.stop(STOP_LOST);
                    }
                    let _ = reply.send(ok);
                }
                // The thread is done; its result follows.
                None => break (&mut done_rx).await,
            },
            _ = heartbeat.tick() => {
                if !app.store.renew_fine_tuning_lease(&job.id, worker, now_ms(), lease_ms).await? {
                    control.stop(STOP_LOST);
                }
            }
        }
    };
    // A training thread that panicked fails the job (rather than handing it back to be retried
    // forever).
    let outcome = outcome.unwrap_or_else(|_| {
        Err(ferrum_train::TrainError::Invalid(
            "the training thread panicked".into(),
        ))
    });
    match outcome {
        Ok(Outcome::Finished {
            adapter,
            trained_tokens,
        }) => {
            finish(app, worker, &job, &loaded, &name, adapter, trained_tokens).await?;
        }
        Ok(Outcome::Stopped) => {
            let why = match control.reason() {
                STOP_CANCELLED => "cancelled",
                STOP_PAUSED => "paused",
                STOP_SHUTDOWN => "server shutting down",
                _ => "no longer this server's",
            };
            tracing::info!(id = %job.id, why, trained_tokens = last_tokens, "fine-tuning stopped");
            app.store.release_fine_tuning_job(&job.id, worker).await?;
        }
        Err(e) => {
            let p = FileProblem {
                code: "training_failed",
                param: "",
                message: format!("Training failed: {e}"),
            };
            tracing::warn!(id = %job.id, error = %e, "fine-tuning failed");
            let event = {
                let mut ev =
                    NewEvent::info(format!("Fine-tuning job failed: {}", p.message)).once("failed");
                ev.level = "error";
                ev
            };
            let error = json!({"code": p.code, "message": p.message, "param": null}).to_string();
            app.store
                .fail_fine_tuning_job(&job.id, worker, &error, &event, now())
                .await?;
        }
    }
    Ok(())
}

fn step_event(r: &StepReport) -> NewEvent {
    NewEvent {
        level: "info",
        kind: "metrics",
        message: format!(
            "Step {}/{}: training loss={:.4}",
            r.step, r.total_steps, r.train_loss
        ),
        data: json!({
            "step": r.step,
            "train_loss": r.train_loss,
            "train_mean_token_accuracy": r.train_mean_token_accuracy,
            "total_steps": r.total_steps,
        })
        .to_string(),
        dedup: Some(format!("step-{}", r.step)),
    }
}

/// Stores an epoch's checkpoint: blobs first (named after the job and step, so a retry
/// rewrites the same ones), then the row, the job's progress and the event in one transaction.
async fn checkpoint(
    app: &App,
    worker: &str,
    job: &JobRecord,
    name: &str,
    r: &EpochReport,
) -> Result<bool, ServerError> {
    let adapter_blob = format!("{}-ckpt{}-adapter", job.id, r.step);
    let state_blob = format!("{}-ckpt{}-state", job.id, r.step);
    {
        let blobs = app.blobs.clone();
        let (a, s) = (adapter_blob.clone(), state_blob.clone());
        let (adapter, state) = (r.adapter.clone(), r.state.clone());
        tokio::task::spawn_blocking(move || {
            blobs.write(&a, &adapter)?;
            blobs.write(&s, &state)
        })
        .await
        .map_err(|e| ServerError::internal("writing a checkpoint", e))?
        .map_err(ServerError::io("writing a checkpoint"))?;
    }
    let mut metrics = serde_json::Map::new();
    metrics.insert("step".into(), json!(r.step));
    metrics.insert("train_loss".into(), json!(r.train_loss));
    metrics.insert(
        "train_mean_token_accuracy".into(),
        json!(r.train_mean_token_accuracy),
    );
    if let (Some(loss), Some(acc)) = (r.valid_loss, r.valid_mean_token_accuracy) {
        // The whole validation set is scored at each checkpoint: the batch figures OpenAI
        // reports as valid_* and the full ones are the same numbers here.
        metrics.insert("valid_loss".into(), json!(loss));
        metrics.insert("valid_mean_token_accuracy".into(), json!(acc));
        metrics.insert("full_valid_loss".into(), json!(loss));
        metrics.insert("full_valid_mean_token_accuracy".into(), json!(acc));
    }
    let record = CheckpointRecord {
        id: random_id("ftckpt_"),
        job_id: job.id.clone(),
        created_at: now(),
        step_number: r.step as u64,
        epoch: u64::from(r.epoch),
        metrics: Value::Object(metrics).to_string(),
        fine_tuned_model_checkpoint: format!("{name}:ckpt-step-{}", r.step),
        adapter_blob,
        state_blob,
    };
    let mut message = format!("Checkpoint created at step {} (epoch {})", r.step, r.epoch);
    if let Some(loss) = r.valid_loss {
        message.push_str(&format!(": validation loss={loss:.4}"));
    }
    let event = NewEvent::info(message).once(format!("checkpoint-{}", r.step));
    let stored = app
        .store
        .record_fine_tuning_checkpoint(worker, &record, r.trained_tokens, &event)
        .await?;
    if stored {
        tracing::info!(id = %job.id, step = r.step, epoch = r.epoch, "fine-tuning checkpoint stored");
    }
    Ok(stored)
}

/// Ends a job whose training finished: the adapter stored, the model registered, the metrics
/// file written and the training billed, in one transaction.
async fn finish(
    app: &App,
    worker: &str,
    job: &JobRecord,
    loaded: &Loaded,
    name: &str,
    adapter: Vec<u8>,
    trained_tokens: u64,
) -> Result<(), ServerError> {
    let adapter_blob = format!("{}-model", job.id);
    let csv = results_csv(app, &job.id).await?;
    let results_id = format!("file-{}results", job.id.trim_start_matches("ftjob-"));
    {
        let blobs = app.blobs.clone();
        let (a, r) = (adapter_blob.clone(), results_id.clone());
        let csv = csv.clone();
        tokio::task::spawn_blocking(move || {
            blobs.write(&a, &adapter)?;
            blobs.write(&r, csv.as_bytes())
        })
        .await
        .map_err(|e| ServerError::internal("writing a fine-tuned model", e))?
        .map_err(ServerError::io("writing a fine-tuned model"))?;
    }
    let at = now();
    let cost = loaded
        .tier
        .fine_tuned_price()
        .training_cost_usd(trained_tokens);
    let success = JobSuccess {
        model: FineTunedModel {
            id: name.to_string(),
            created: at,
            base_tier: job.base_tier.clone(),
            job_id: job.id.clone(),
            adapter_blob,
            deleted: false,
        },
        result_file: Some(FileRecord {
            id: results_id,
            created_at: at,
            filename: "step_metrics.csv".into(),
            purpose: "fine-tune-results".into(),
            bytes: csv.len() as u64,
            expires_at: None,
        }),
        trained_tokens,
        usage: Some(UsageRecord {
            id: job.id.clone(),
            created: at,
            model: name.to_string(),
            endpoint: "fine_tuning.jobs".into(),
            prompt_tokens: trained_tokens,
            cached_tokens: 0,
            completion_tokens: 0,
            cost_usd: cost,
            batch: false,
        }),
        events: vec![
            NewEvent::info(format!("New fine-tuned model created: {name}")).once("model"),
            NewEvent::info("Fine-tuning job successfully completed").once("succeeded"),
        ],
        now: at,
    };
    if app
        .store
        .succeed_fine_tuning_job(&job.id, worker, &success)
        .await?
    {
        tracing::info!(id = %job.id, model = %name, trained_tokens, cost_usd = cost, "fine-tuning job succeeded");
    }
    Ok(())
}

/// The results file: one row per step (`step,train_loss,train_accuracy,valid_loss,
/// valid_mean_token_accuracy`), validation figures on the steps that ended an epoch.
async fn results_csv(app: &App, job_id: &str) -> Result<String, ServerError> {
    let steps = app.store.fine_tuning_metrics(job_id).await?;
    let valid: HashMap<u64, Value> = app
        .store
        .fine_tuning_checkpoints(job_id)
        .await?
        .into_iter()
        .filter_map(|c| Some((c.step_number, serde_json::from_str(&c.metrics).ok()?)))
        .collect();
    let num = |v: &Value| v.as_f64().map(|x| format!("{x:.6}")).unwrap_or_default();
    let mut out =
        String::from("step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy\n");
    for e in steps {
        let d: Value = serde_json::from_str(&e.data).unwrap_or(Value::Null);
        let Some(step) = d["step"].as_u64() else {
            continue;
        };
        let v = valid.get(&step).cloned().unwrap_or(Value::Null);
        out.push_str(&format!(
            "{step},{},{},{},{}\n",
            num(&d["train_loss"]),
            num(&d["train_mean_token_accuracy"]),
            num(&v["valid_loss"]),
            num(&v["valid_mean_token_accuracy"]),
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_names_follow_openais_shape() {
        let tier = ferrum_registry::Registry::embedded_default()
            .resolve("gpt-4.1-nano")
            .unwrap()
            .clone();
        assert_eq!(
            snapshot_name("gpt-4.1-nano", &tier),
            "gpt-4.1-nano-2025-04-14"
        );
        assert_eq!(
            snapshot_name("gpt-4.1-nano-2025-04-14", &tier),
            "gpt-4.1-nano-2025-04-14"
        );
        let mut job = JobRecord {
            id: "ftjob-AbC123xyzQWE".into(),
            created_at: 0,
            model: "gpt-4.1-nano-2025-04-14".into(),
            base_tier: tier.id.clone(),
            training_file: "file-x".into(),
            validation_file: None,
            status: JobStatus::Queued,
            hyperparameters: "{}".into(),
            method: "{}".into(),
            seed: 0,
            suffix: Some("my-suffix".into()),
            metadata: None,
            error: None,
            fine_tuned_model: None,
            trained_tokens: None,
            estimated_finish: None,
            finished_at: None,
            result_files: Vec::new(),
        };
        assert_eq!(
            model_name(&job),
            "ft:gpt-4.1-nano-2025-04-14:ferrum:my-suffix:AbC123xy"
        );
        job.suffix = None;
        assert_eq!(
            model_name(&job),
            "ft:gpt-4.1-nano-2025-04-14:ferrum::AbC123xy"
        );
        let tuned = tuned_tier(tier, "ft:x");
        assert_eq!(tuned.id, "ft:x");
        assert_eq!(tuned.price.input, 0.20);
    }
}
