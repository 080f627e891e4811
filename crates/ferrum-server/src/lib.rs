//! The OpenAI HTTP API (axum): routes per resource, SSE streaming, API-key auth, the usage
//! ledger, and the admin endpoints that load and unload tiers. It turns protocol requests into
//! engine requests (through `frontend`) and never touches tensors.

mod admin;
mod auth;
mod batches;
mod callstream;
mod chat;
mod console;
mod embeddings;
mod error;
mod evals;
mod files;
mod fine_tuning;
mod frontend;
mod graders;
mod metrics;
mod models;
mod moderation;
mod org_usage;
mod organization;
mod paging;
mod ratelimit;
mod responses;
mod stored;
mod tools;
mod vision;

use std::future::Future;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, Method, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use ferrum_protocol::response::{List, Usage};
use ferrum_protocol::{ApiError, ServiceTier};
use ferrum_registry::{Registry, Tier};
use ferrum_store::{BlobStore, Store, UsageRecord};
use tokio::net::TcpListener;

pub use auth::{create_admin_key, hash_key};
pub use batches::BatchConfig;
pub use error::ServerError;
pub use models::{Engine, EngineConfig, Loaded, LoadedEmbedder, Models, Served};
pub use stored::{export as export_completions, training_example};

/// Largest request body: long-context prompts are big, but not unbounded.
pub(crate) const MAX_BODY_BYTES: usize = 64 << 20;

/// How to run the server.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub engine: EngineConfig,
    /// Requests must carry `Authorization: Bearer <key>` when set.
    pub api_key: Option<String>,
    /// The admin key of the organization API (`/v1/organization`), besides those in the
    /// database.
    pub admin_key: Option<String>,
    /// Where file contents live.
    pub blobs: BlobStore,
    /// Largest upload, in bytes.
    pub max_file_bytes: u64,
    pub batch: BatchConfig,
    /// Whether image parts may name `http(s)://` URLs, which the server then downloads (off
    /// by default: the server may have no way out, and a URL fetched on a client's word is a
    /// request the server makes for it).
    pub fetch_image_urls: bool,
}

/// Upload rules of the Files API.
pub struct FilesConfig {
    pub max_bytes: u64,
}

/// What every handler shares.
pub struct App {
    pub models: Models,
    pub store: Store,
    pub blobs: BlobStore,
    pub files: FilesConfig,
    pub batch: BatchConfig,
    /// This server's name in batch claims (unique per process).
    pub worker_id: String,
    /// Wakes the batch worker (a batch was created or cancelled).
    pub batch_wakeup: tokio::sync::Notify,
    /// Background responses running here.
    pub background: responses::Background,
    /// The fine-tuning runner's wake-up, its running jobs, and the adapters loaded for serving.
    pub fine_tuning: fine_tuning::FineTuning,
    /// The eval worker's wake-up.
    pub evals: evals::Evals,
    /// The keys this server takes (see `auth`).
    pub auth: auth::Auth,
    pub metrics: Arc<metrics::Metrics>,
    /// Encoded images, by content (see `vision`).
    pub images: vision::ImageCache,
    /// Whether image URLs are downloaded (`ServerConfig::fetch_image_urls`).
    pub fetch_image_urls: bool,
}

impl App {
    /// Prices a response's usage with its tier's price table and records it in the ledger,
    /// billed to the caller's project and key; settles the caller's rate-limit admission with
    /// the real token count. A failing database is logged, never turned into a failed
    /// response the client paid for.
    async fn record_usage(
        &self,
        caller: &auth::Caller,
        id: &str,
        endpoint: &str,
        tier: &Tier,
        usage: &Usage,
        created: i64,
    ) {
        self.record_usage_at(
            caller,
            id,
            endpoint,
            tier,
            usage,
            created,
            ServiceTier::Default,
        )
        .await
    }

    /// [`App::record_usage`] for a request that ran at a service tier: priced at the tier's
    /// factor, and recorded with it (the usage API groups by it).
    #[allow(clippy::too_many_arguments)]
    async fn record_usage_at(
        &self,
        caller: &auth::Caller,
        id: &str,
        endpoint: &str,
        tier: &Tier,
        usage: &Usage,
        created: i64,
        service_tier: ServiceTier,
    ) {
        let cached = usage.prompt_tokens_details.cached_tokens;
        let record = UsageRecord {
            id: id.to_string(),
            created,
            model: tier.id.clone(),
            endpoint: endpoint.into(),
            prompt_tokens: usage.prompt_tokens,
            cached_tokens: cached,
            completion_tokens: usage.completion_tokens,
            cost_usd: service_tier.price_factor()
                * tier
                    .price
                    .cost_usd(usage.prompt_tokens, cached, usage.completion_tokens),
            batch: false,
        };
        let mut attribution = caller.attribution();
        if service_tier != ServiceTier::Default {
            attribution.service_tier = Some(service_tier.as_str().into());
        }
        if let Some(admitted) = &caller.admission {
            let used = usage.prompt_tokens + usage.completion_tokens;
            ratelimit::settle(self, admitted, used).await;
        }
        if let Err(e) = self.store.record_usage_as(&record, &attribution).await {
            tracing::error!(error = %e, id, "could not record usage");
        }
        tracing::info!(
            id,
            model = %tier.id,
            prompt_tokens = usage.prompt_tokens,
            cached_tokens = cached,
            completion_tokens = usage.completion_tokens,
            cost_usd = record.cost_usd,
            "request done"
        );
    }
}

/// The router over a shared [`App`].
pub fn router(app: Arc<App>) -> Router {
    let api = Router::new()
        .route("/v1/models", get(list_models))
        .route(
            "/v1/models/{id}",
            get(get_model).delete(fine_tuning::delete_model),
        )
        .route("/v1/chat/completions", post(chat::create).get(stored::list))
        .route("/v1/embeddings", post(embeddings::create))
        .route("/v1/moderations", post(moderation::create))
        .route("/v1/usage", get(usage_totals))
        .merge(stored::routes())
        .merge(files::routes())
        .merge(batches::routes())
        .merge(fine_tuning::routes())
        .merge(evals::routes())
        .merge(responses::routes())
        .merge(admin::routes())
        .merge(organization::routes())
        .route_layer(middleware::from_fn(json_bodies))
        .route_layer(middleware::from_fn_with_state(Arc::clone(&app), auth::gate));
    api.route("/health", get(|| async { "ok" }))
        .route("/metrics", get(render_metrics))
        .merge(console::routes())
        .fallback(not_found)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn_with_state(
            Arc::clone(&app),
            request_headers,
        ))
        .with_state(app)
}

/// Headers OpenAI puts on every response: `x-request-id` (a fresh `req_...` id, also logged,
/// which the SDKs expose as `_request_id`), `openai-processing-ms` (the time to the response
/// head: for a stream, to its first byte), and `x-client-request-id` echoed when the client
/// sent one. A failed response is logged and counted here, from the [`error::ErrorReport`] its
/// error left on it, inside the request's span.
async fn request_headers(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    let started = std::time::Instant::now();
    let id = random_id("req_");
    let client_id = request.headers().get("x-client-request-id").cloned();
    let span = tracing::info_span!("request", request_id = %id);
    let mut response = tracing::Instrument::instrument(next.run(request), span.clone()).await;
    if let Some(report) = response.extensions().get::<error::ErrorReport>() {
        app.metrics.count_error(report.label);
        if let Some(detail) = &report.detail {
            let _entered = span.enter();
            tracing::error!(kind = report.label, error = %detail, "request failed");
        }
    }
    let headers = response.headers_mut();
    if let Ok(v) = header::HeaderValue::from_str(&id) {
        headers.insert("x-request-id", v);
    }
    let ms = started.elapsed().as_millis().to_string();
    if let Ok(v) = header::HeaderValue::from_str(&ms) {
        headers.insert("openai-processing-ms", v);
    }
    if let Some(v) = client_id {
        headers.insert("x-client-request-id", v);
    }
    response
}

/// The shared state of a server over `registry` and `store`, with no tier loaded yet.
pub fn app(registry: Registry, store: Store, config: ServerConfig) -> Arc<App> {
    Arc::new(App {
        models: Models::new(registry, config.engine),
        store,
        blobs: config.blobs,
        files: FilesConfig {
            max_bytes: config.max_file_bytes,
        },
        batch: config.batch,
        worker_id: format!("{}-{}", std::process::id(), random_id("w")),
        batch_wakeup: tokio::sync::Notify::new(),
        background: Default::default(),
        fine_tuning: Default::default(),
        evals: Default::default(),
        auth: auth::Auth::new(config.api_key, config.admin_key),
        metrics: Arc::default(),
        images: Default::default(),
        fetch_image_urls: config.fetch_image_urls,
    })
}

/// Runs the batch worker of `app` until `stop` turns true (what [`serve`] runs beside the
/// routes).
pub async fn run_batch_worker(app: Arc<App>, stop: tokio::sync::watch::Receiver<bool>) {
    batches::run_worker(app, stop).await
}

/// Runs the fine-tuning job runner of `app` until `stop` turns true (what [`serve`] runs
/// beside the routes and the batch worker).
pub async fn run_fine_tuning_worker(app: Arc<App>, stop: tokio::sync::watch::Receiver<bool>) {
    fine_tuning::run_worker(app, stop).await
}

/// Runs the eval worker of `app` until `stop` turns true (what [`serve`] runs beside the
/// routes and the other workers).
pub async fn run_eval_worker(app: Arc<App>, stop: tokio::sync::watch::Receiver<bool>) {
    evals::run_worker(app, stop).await
}

/// Loads the startup tiers, then serves until `shutdown` resolves; requests in flight (streams
/// included) finish before this returns.
pub async fn serve(
    listener: TcpListener,
    registry: Registry,
    store: Store,
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let app = app(registry, store, config);
    app.models
        .load_startup_tiers()
        .await
        .map_err(|e| ServeError::Load(e.message))?;
    let (stop_worker, worker_stopped) = tokio::sync::watch::channel(false);
    let worker = tokio::spawn(batches::run_worker(
        Arc::clone(&app),
        worker_stopped.clone(),
    ));
    let evaluator = tokio::spawn(evals::run_worker(Arc::clone(&app), worker_stopped.clone()));
    let tuner = tokio::spawn(fine_tuning::run_worker(Arc::clone(&app), worker_stopped));
    let addr = listener.local_addr().map_err(ServeError::Io)?;
    // The one line scripts wait for: the server takes requests from now on.
    println!("ferrum listening on http://{addr}");
    use std::io::Write;
    let _ = std::io::stdout().flush();
    tracing::info!(%addr, "listening");
    let served = axum::serve(listener, router(app))
        .with_graceful_shutdown(shutdown)
        .await;
    // The batch worker stops with the server: lines it was running go back to the queue; the
    // fine-tuning job being trained stops at its next pause point and is handed back.
    let _ = stop_worker.send(true);
    let _ = worker.await;
    let _ = tuner.await;
    let _ = evaluator.await;
    served.map_err(ServeError::Io)?;
    tracing::info!("server stopped");
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("loading a startup tier failed: {0}")]
    Load(String),
    #[error(transparent)]
    Io(std::io::Error),
}

/// A request body declared as something other than JSON (a form, plain text) is refused
/// before any handler reads it, as OpenAI does, rather than parsed as JSON regardless: a
/// client that sends a form by mistake gets a clear error, never a generation. Multipart
/// bodies (file uploads) and bodies without a `Content-Type` go on to their handlers.
async fn json_bodies(req: Request, next: Next) -> Response {
    let kind = req
        .headers()
        .get(header::CONTENT_TYPE)
        .filter(|_| req.method() == Method::POST)
        .map(|v| v.to_str().unwrap_or("").to_ascii_lowercase());
    if let Some(kind) = kind {
        let essence = kind.split(';').next().unwrap_or("").trim();
        let json = essence == "application/json" || essence.ends_with("+json");
        if !json && !essence.starts_with("multipart/") {
            return ServerError::from(ApiError::invalid_request(format!(
                "We could not parse the JSON body of your request. The OpenAI API expects a JSON \
                 payload (Content-Type: application/json), but this request's Content-Type is \
                 `{essence}`."
            )))
            .into_response();
        }
    }
    next.run(req).await
}

/// `GET /metrics` (Prometheus text format; not behind the API key, like a health check).
async fn render_metrics(State(app): State<Arc<App>>) -> Response {
    let loaded = app.models.loaded().await;
    let stats: Vec<(String, &ferrum_engine::EngineStats)> = loaded
        .iter()
        .map(|l| (l.tier.id.clone(), l.handle.stats()))
        .collect();
    let embedders = app.models.loaded_embedders().await;
    let embedding_stats: Vec<(String, &ferrum_embed::EmbedStats)> = embedders
        .iter()
        .map(|e| (e.tier.id.clone(), e.handle.stats()))
        .collect();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.metrics.render(&stats, &embedding_stats),
    )
        .into_response()
}

async fn not_found(method: Method, uri: Uri) -> ServerError {
    ApiError::not_found(format!("Invalid URL ({method} {})", uri.path())).into()
}

fn model_object(id: &str, tier: &Tier) -> ferrum_protocol::response::Model {
    // The release of the OpenAI models the tiers stand in for: GPT-4.1 (2025-04-14) and
    // text-embedding-3 (2024-01-25).
    let created = match tier.kind {
        ferrum_registry::ModelKind::Chat => 1_744_588_800,
        ferrum_registry::ModelKind::Embedding => 1_706_140_800,
    };
    ferrum_protocol::response::Model {
        id: id.to_string(),
        object: "model",
        created,
        owned_by: "ferrum".into(),
    }
}

async fn list_models(
    State(app): State<Arc<App>>,
) -> Result<Json<List<ferrum_protocol::response::Model>>, ServerError> {
    let mut data = Vec::new();
    for tier in app.models.tiers() {
        data.push(model_object(&tier.id, &tier));
        for alias in &tier.aliases {
            data.push(model_object(alias, &tier));
        }
        for adapter in &tier.adapters {
            data.push(model_object(&adapter.id, &tier));
        }
    }
    data.extend(fine_tuning::list_models(&app).await?);
    Ok(Json(List::new(data)))
}

async fn get_model(
    State(app): State<Arc<App>>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Json<ferrum_protocol::response::Model>, ServerError> {
    if id.starts_with("ft:") {
        return Ok(Json(fine_tuning::get_model(&app, &id).await?));
    }
    if let Some((tier, _)) = app.models.resolve_adapter(&id) {
        return Ok(Json(model_object(&id, &tier)));
    }
    let tier = app.models.resolve(&id)?;
    Ok(Json(model_object(&id, &tier)))
}

#[derive(serde::Serialize)]
struct UsageTotalOut {
    object: &'static str,
    model: String,
    requests: u64,
    prompt_tokens: u64,
    cached_tokens: u64,
    completion_tokens: u64,
    cost_usd: f64,
}

#[derive(serde::Deserialize)]
struct UsageQuery {
    since: Option<i64>,
}

/// `GET /v1/usage[?since=UNIX]`: token and cost totals per tier from the ledger.
async fn usage_totals(
    State(app): State<Arc<App>>,
    axum::extract::Query(q): axum::extract::Query<UsageQuery>,
) -> Result<Json<List<UsageTotalOut>>, ServerError> {
    let totals = app.store.usage_totals(q.since).await?;
    Ok(Json(List::new(
        totals
            .into_iter()
            .map(|t| UsageTotalOut {
                object: "usage.total",
                model: t.model,
                requests: t.requests,
                prompt_tokens: t.prompt_tokens,
                cached_tokens: t.cached_tokens,
                completion_tokens: t.completion_tokens,
                cost_usd: t.cost_usd,
            })
            .collect(),
    )))
}

pub(crate) fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Removes the members of `object` named in `keys` whose value is null (fields the spec types
/// as non-nullable, absent until they are known).
pub(crate) fn drop_nulls(object: &mut serde_json::Value, keys: &[&str]) {
    if let Some(map) = object.as_object_mut() {
        for k in keys {
            if map.get(*k).is_some_and(serde_json::Value::is_null) {
                map.remove(*k);
            }
        }
    }
}

/// `prefix` + 24 random letters and digits.
pub(crate) fn random_id(prefix: &str) -> String {
    use rand::distributions::Alphanumeric;
    use rand::Rng;
    let tail: String = rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .take(24)
        .map(char::from)
        .collect();
    format!("{prefix}{tail}")
}
