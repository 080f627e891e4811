//! The organization admin API (`/v1/organization`, admin keys only; see `auth`): projects,
//! their service accounts and API keys, their rate limits, and admin keys, in the shapes of
//! OpenAI's admin API. Usage and costs are in `org_usage`.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use ferrum_protocol::ApiError;
use ferrum_store::{
    KeyRecord, KeyScope, NewKey, Order, ProjectRecord, RateLimitRecord, ServiceAccountRecord,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::auth::{create_admin_key, hash_key, new_key_value, redacted_value};
use crate::paging::{self, ListOut, Rules};
use crate::ratelimit::{DEFAULT_BATCH_DAY_TOKENS, DEFAULT_LIMITS};
use crate::{now, random_id, App, ServerError};

type Pairs = Query<Vec<(String, String)>>;

pub fn routes() -> Router<Arc<App>> {
    const P: &str = "/v1/organization/projects/{project_id}";
    Router::new()
        .route(
            "/v1/organization/projects",
            get(list_projects).post(create_project),
        )
        .route(P, get(get_project).post(modify_project))
        .route(&format!("{P}/archive"), post(archive_project))
        .route(
            &format!("{P}/service_accounts"),
            get(list_accounts).post(create_account),
        )
        .route(
            &format!("{P}/service_accounts/{{account_id}}"),
            get(get_account).delete(delete_account),
        )
        .route(&format!("{P}/api_keys"), get(list_keys))
        .route(
            &format!("{P}/api_keys/{{key_id}}"),
            get(get_key).delete(delete_key),
        )
        .route(&format!("{P}/rate_limits"), get(list_rate_limits))
        .route(
            &format!("{P}/rate_limits/{{rate_limit_id}}"),
            post(modify_rate_limit),
        )
        .route(
            "/v1/organization/admin_api_keys",
            get(list_admin_keys).post(create_admin),
        )
        .route(
            "/v1/organization/admin_api_keys/{key_id}",
            get(get_admin_key).delete(delete_admin_key),
        )
        .merge(crate::org_usage::routes())
}

/// A JSON body, or the 400 that says what is wrong with it.
fn parse<T: DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid_request(format!("Invalid request body: {e}")))
}

// --- projects -------------------------------------------------------------------------------

#[derive(Serialize)]
struct ProjectOut {
    id: String,
    object: &'static str,
    name: String,
    created_at: i64,
    archived_at: Option<i64>,
    status: &'static str,
    external_key_id: Option<String>,
}

impl From<ProjectRecord> for ProjectOut {
    fn from(p: ProjectRecord) -> Self {
        ProjectOut {
            object: "organization.project",
            status: if p.archived_at.is_some() {
                "archived"
            } else {
                "active"
            },
            id: p.id,
            name: p.name,
            created_at: p.created_at,
            archived_at: p.archived_at,
            external_key_id: p.external_key_id,
        }
    }
}

#[derive(Deserialize)]
struct CreateProject {
    name: String,
    external_key_id: Option<String>,
    /// Accepted for the SDKs' sake; a ferrum deployment has one residency.
    #[allow(dead_code)]
    residency: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ModifyProject {
    name: Option<String>,
    external_key_id: Option<String>,
}

fn check_name(name: &str) -> Result<(), ApiError> {
    if name.trim().is_empty() {
        return Err(ApiError::invalid_param(
            "name",
            "invalid_value",
            "Invalid 'name': must not be empty.",
        ));
    }
    Ok(())
}

async fn create_project(
    State(app): State<Arc<App>>,
    body: Bytes,
) -> Result<Json<ProjectOut>, ServerError> {
    let req: CreateProject = parse(&body)?;
    check_name(&req.name)?;
    let project = ProjectRecord {
        id: random_id("proj_"),
        name: req.name,
        created_at: now(),
        archived_at: None,
        external_key_id: req.external_key_id,
    };
    app.store.create_project(&project).await?;
    tracing::info!(project = %project.id, name = %project.name, "project created");
    Ok(Json(project.into()))
}

async fn list_projects(
    State(app): State<Arc<App>>,
    Query(pairs): Pairs,
) -> Result<Json<ListOut<ProjectOut>>, ServerError> {
    let page = paging::page(&pairs, &Rules::of(Order::Asc))?;
    let archived = pairs
        .iter()
        .any(|(k, v)| k == "include_archived" && v == "true");
    let listed = app.store.list_projects(archived, &page).await?;
    Ok(Json(ListOut::new(listed.map(ProjectOut::from), |p| &p.id)))
}

/// The project `id`, or 404.
async fn project(app: &App, id: &str) -> Result<ProjectRecord, ServerError> {
    app.store
        .get_project(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("No project found with id '{id}'.")).into())
}

/// The project `id` unless archived (400), or 404.
async fn active_project(app: &App, id: &str) -> Result<ProjectRecord, ServerError> {
    let p = project(app, id).await?;
    if p.archived_at.is_some() {
        return Err(ApiError::invalid_request(format!(
            "Project '{id}' is archived and cannot be changed."
        ))
        .into());
    }
    Ok(p)
}

async fn get_project(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
) -> Result<Json<ProjectOut>, ServerError> {
    Ok(Json(project(&app, &id).await?.into()))
}

async fn modify_project(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<ProjectOut>, ServerError> {
    let req: ModifyProject = parse(&body)?;
    if let Some(name) = &req.name {
        check_name(name)?;
    }
    active_project(&app, &id).await?;
    let p = app
        .store
        .update_project(&id, req.name.as_deref(), req.external_key_id.as_deref())
        .await?
        .ok_or(ServerError::Conflict(
            "the project vanished while being modified",
        ))?;
    Ok(Json(p.into()))
}

async fn archive_project(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
) -> Result<Json<ProjectOut>, ServerError> {
    project(&app, &id).await?;
    let p = app
        .store
        .archive_project(&id, now())
        .await?
        .ok_or(ServerError::Conflict(
            "the project vanished while being archived",
        ))?;
    tracing::info!(project = %id, "project archived: its keys no longer authenticate");
    Ok(Json(p.into()))
}

// --- service accounts and their keys --------------------------------------------------------

#[derive(Serialize)]
struct AccountOut {
    object: &'static str,
    id: String,
    name: String,
    role: String,
    created_at: i64,
}

impl From<ServiceAccountRecord> for AccountOut {
    fn from(a: ServiceAccountRecord) -> Self {
        AccountOut {
            object: "organization.project.service_account",
            id: a.id,
            name: a.name,
            role: a.role,
            created_at: a.created_at,
        }
    }
}

#[derive(Deserialize)]
struct CreateAccount {
    name: String,
    create_service_account_only: Option<bool>,
}

async fn create_account(
    State(app): State<Arc<App>>,
    Path(project_id): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, ServerError> {
    let req: CreateAccount = parse(&body)?;
    check_name(&req.name)?;
    active_project(&app, &project_id).await?;
    let account = ServiceAccountRecord {
        id: random_id("svc_acct_"),
        project_id: project_id.clone(),
        name: req.name,
        role: "member".into(),
        created_at: now(),
    };
    // The key is shown here, once; the database keeps its hash.
    let key = (!req.create_service_account_only.unwrap_or(false)).then(|| {
        let value = new_key_value("sk-proj-");
        let key = NewKey {
            id: random_id("key_"),
            scope: KeyScope::Project {
                project_id: project_id.clone(),
                service_account_id: account.id.clone(),
            },
            name: "Secret Key".into(),
            hash: hash_key(&value),
            redacted: redacted_value(&value),
            created_at: account.created_at,
            expires_at: None,
        };
        (key, value)
    });
    app.store
        .create_service_account(&account, key.as_ref().map(|(k, _)| k))
        .await?;
    app.auth.mark_secured();
    tracing::info!(project = %project_id, account = %account.id, "service account created");
    let api_key = key.map(|(k, value)| {
        json!({
            "object": "organization.project.service_account.api_key",
            "value": value,
            "name": k.name,
            "created_at": k.created_at,
            "id": k.id,
        })
    });
    let mut out = serde_json::to_value(AccountOut::from(account))
        .map_err(|e| ServerError::internal("encoding a service account", e))?;
    out["api_key"] = api_key.unwrap_or(Value::Null);
    Ok(Json(out))
}

async fn list_accounts(
    State(app): State<Arc<App>>,
    Path(project_id): Path<String>,
    Query(pairs): Pairs,
) -> Result<Json<ListOut<AccountOut>>, ServerError> {
    let page = paging::page(&pairs, &Rules::of(Order::Asc))?;
    project(&app, &project_id).await?;
    let listed = app.store.list_service_accounts(&project_id, &page).await?;
    Ok(Json(ListOut::new(listed.map(AccountOut::from), |a| &a.id)))
}

async fn account(app: &App, project_id: &str, id: &str) -> Result<AccountOut, ServerError> {
    project(app, project_id).await?;
    let a = app.store.get_service_account(project_id, id).await?;
    a.map(AccountOut::from).ok_or_else(|| {
        ApiError::not_found(format!("No service account found with id '{id}'.")).into()
    })
}

async fn get_account(
    State(app): State<Arc<App>>,
    Path((project_id, id)): Path<(String, String)>,
) -> Result<Json<AccountOut>, ServerError> {
    Ok(Json(account(&app, &project_id, &id).await?))
}

async fn delete_account(
    State(app): State<Arc<App>>,
    Path((project_id, id)): Path<(String, String)>,
) -> Result<Json<Value>, ServerError> {
    account(&app, &project_id, &id).await?;
    app.store
        .delete_service_account(&project_id, &id, now())
        .await?;
    tracing::info!(project = %project_id, account = %id, "service account deleted, keys revoked");
    Ok(Json(json!({
        "object": "organization.project.service_account.deleted",
        "id": id,
        "deleted": true,
    })))
}

#[derive(Serialize)]
struct ProjectKeyOut {
    object: &'static str,
    redacted_value: String,
    name: String,
    created_at: i64,
    last_used_at: Option<i64>,
    id: String,
    owner_project_access: &'static str,
    owner: Value,
}

async fn project_key_out(app: &App, k: KeyRecord) -> Result<ProjectKeyOut, ServerError> {
    let KeyScope::Project {
        project_id,
        service_account_id,
    } = &k.scope
    else {
        return Err(ServerError::Conflict(
            "an admin key listed as a project key",
        ));
    };
    let account = app
        .store
        .get_service_account(project_id, service_account_id)
        .await?;
    let owner = match account {
        Some(a) => json!({
            "type": "service_account",
            "service_account": {
                "id": a.id, "name": a.name, "created_at": a.created_at, "role": a.role,
            },
        }),
        None => json!({"type": "service_account"}),
    };
    Ok(ProjectKeyOut {
        object: "organization.project.api_key",
        redacted_value: k.redacted,
        name: k.name,
        created_at: k.created_at,
        last_used_at: k.last_used_at,
        id: k.id,
        owner_project_access: "active",
        owner,
    })
}

async fn list_keys(
    State(app): State<Arc<App>>,
    Path(project_id): Path<String>,
    Query(pairs): Pairs,
) -> Result<Json<ListOut<ProjectKeyOut>>, ServerError> {
    let page = paging::page(&pairs, &Rules::of(Order::Asc))?;
    project(&app, &project_id).await?;
    let listed = app.store.list_keys(Some(&project_id), &page).await?;
    let mut items = Vec::with_capacity(listed.items.len());
    for k in listed.items {
        items.push(project_key_out(&app, k).await?);
    }
    let listed = ferrum_store::Listed {
        items,
        has_more: listed.has_more,
    };
    Ok(Json(ListOut::new(listed, |k| &k.id)))
}

/// The live key `id` of `project_id`, or 404.
async fn project_key(app: &App, project_id: &str, id: &str) -> Result<KeyRecord, ServerError> {
    project(app, project_id).await?;
    let k =
        app.store.get_key(id).await?.filter(
            |k| matches!(&k.scope, KeyScope::Project { project_id: p, .. } if p == project_id),
        );
    k.ok_or_else(|| ApiError::not_found(format!("No API key found with id '{id}'.")).into())
}

async fn get_key(
    State(app): State<Arc<App>>,
    Path((project_id, id)): Path<(String, String)>,
) -> Result<Json<ProjectKeyOut>, ServerError> {
    let k = project_key(&app, &project_id, &id).await?;
    Ok(Json(project_key_out(&app, k).await?))
}

async fn delete_key(
    State(app): State<Arc<App>>,
    Path((project_id, id)): Path<(String, String)>,
) -> Result<Json<Value>, ServerError> {
    project_key(&app, &project_id, &id).await?;
    app.store.delete_key(&id, now()).await?;
    tracing::info!(project = %project_id, key = %id, "API key revoked");
    Ok(Json(json!({
        "object": "organization.project.api_key.deleted",
        "id": id,
        "deleted": true,
    })))
}

// --- rate limits ----------------------------------------------------------------------------

#[derive(Serialize)]
struct RateLimitOut {
    object: &'static str,
    id: String,
    model: String,
    max_requests_per_1_minute: u64,
    max_tokens_per_1_minute: u64,
    batch_1_day_max_input_tokens: u64,
    /// ferrum's reserved capacity (provisioned throughput): the tokens a minute of this model
    /// served ahead of other projects' requests. Not in OpenAI's object.
    reserved_tokens_per_1_minute: u64,
}

impl From<RateLimitRecord> for RateLimitOut {
    fn from(r: RateLimitRecord) -> Self {
        RateLimitOut {
            object: "project.rate_limit",
            id: format!("rl-{}", r.model),
            model: r.model,
            max_requests_per_1_minute: r.max_requests_per_1_minute,
            max_tokens_per_1_minute: r.max_tokens_per_1_minute,
            batch_1_day_max_input_tokens: r.batch_1_day_max_input_tokens,
            reserved_tokens_per_1_minute: r.reserved_tokens_per_1_minute,
        }
    }
}

/// A project's limits on every tier: those it set, the defaults elsewhere.
async fn all_limits(app: &App, project_id: &str) -> Result<Vec<RateLimitRecord>, ServerError> {
    let set = app.store.rate_limits(project_id).await?;
    Ok(app
        .models
        .tiers()
        .iter()
        .map(|tier| {
            set.iter()
                .find(|r| r.model == tier.id)
                .cloned()
                .unwrap_or_else(|| RateLimitRecord {
                    project_id: project_id.to_string(),
                    model: tier.id.clone(),
                    max_requests_per_1_minute: DEFAULT_LIMITS.requests,
                    max_tokens_per_1_minute: DEFAULT_LIMITS.tokens,
                    batch_1_day_max_input_tokens: DEFAULT_BATCH_DAY_TOKENS,
                    reserved_tokens_per_1_minute: 0,
                })
        })
        .collect())
}

async fn list_rate_limits(
    State(app): State<Arc<App>>,
    Path(project_id): Path<String>,
    Query(pairs): Pairs,
) -> Result<Json<ListOut<RateLimitOut>>, ServerError> {
    let rules = Rules {
        default_limit: 100,
        max_limit: 100,
        default_order: Order::Asc,
        has_order: false,
    };
    let page = paging::page(&pairs, &rules)?;
    project(&app, &project_id).await?;
    let all = all_limits(&app, &project_id).await?;
    let out = all.into_iter().map(RateLimitOut::from).collect();
    Ok(Json(paging::in_memory(out, &page, |r| &r.id)?))
}

#[derive(Deserialize)]
struct ModifyRateLimit {
    max_requests_per_1_minute: Option<i64>,
    max_tokens_per_1_minute: Option<i64>,
    batch_1_day_max_input_tokens: Option<i64>,
    reserved_tokens_per_1_minute: Option<i64>,
    max_images_per_1_minute: Option<i64>,
    max_audio_megabytes_per_1_minute: Option<i64>,
    max_requests_per_1_day: Option<i64>,
}

/// A limit from a request: a count of zero or more.
fn limit(param: &str, v: Option<i64>, current: u64) -> Result<u64, ApiError> {
    match v {
        None => Ok(current),
        Some(n) => u64::try_from(n).map_err(|_| {
            ApiError::invalid_param(
                param,
                "invalid_value",
                format!("Invalid '{param}': must be zero or more, got {n}."),
            )
        }),
    }
}

async fn modify_rate_limit(
    State(app): State<Arc<App>>,
    Path((project_id, id)): Path<(String, String)>,
    body: Bytes,
) -> Result<Json<RateLimitOut>, ServerError> {
    let req: ModifyRateLimit = parse(&body)?;
    for (param, given) in [
        ("max_images_per_1_minute", req.max_images_per_1_minute),
        (
            "max_audio_megabytes_per_1_minute",
            req.max_audio_megabytes_per_1_minute,
        ),
        ("max_requests_per_1_day", req.max_requests_per_1_day),
    ] {
        if given.is_some() {
            return Err(ApiError::invalid_param(
                param,
                "unsupported_parameter",
                format!("'{param}' is not supported: ferrum serves no such limit."),
            )
            .into());
        }
    }
    active_project(&app, &project_id).await?;
    let all = all_limits(&app, &project_id).await?;
    let current = all
        .into_iter()
        .find(|r| format!("rl-{}", r.model) == id)
        .ok_or_else(|| ApiError::not_found(format!("No rate limit found with id '{id}'.")))?;
    let updated = RateLimitRecord {
        max_requests_per_1_minute: limit(
            "max_requests_per_1_minute",
            req.max_requests_per_1_minute,
            current.max_requests_per_1_minute,
        )?,
        max_tokens_per_1_minute: limit(
            "max_tokens_per_1_minute",
            req.max_tokens_per_1_minute,
            current.max_tokens_per_1_minute,
        )?,
        batch_1_day_max_input_tokens: limit(
            "batch_1_day_max_input_tokens",
            req.batch_1_day_max_input_tokens,
            current.batch_1_day_max_input_tokens,
        )?,
        reserved_tokens_per_1_minute: limit(
            "reserved_tokens_per_1_minute",
            req.reserved_tokens_per_1_minute,
            current.reserved_tokens_per_1_minute,
        )?,
        ..current
    };
    app.store.set_rate_limit(&updated).await?;
    tracing::info!(project = %project_id, model = %updated.model, "rate limit set");
    Ok(Json(updated.into()))
}

// --- admin keys -----------------------------------------------------------------------------

fn admin_key_out(k: KeyRecord) -> Value {
    json!({
        "object": "organization.admin_api_key",
        "id": k.id,
        "name": k.name,
        "redacted_value": k.redacted,
        "created_at": k.created_at,
        "expires_at": k.expires_at,
        "last_used_at": k.last_used_at,
        "owner": {
            "type": "service_account",
            "object": "organization.service_account",
            "id": "svc_acct_ferrum_admin",
            "name": "ferrum admin",
            "created_at": k.created_at,
            "role": "owner",
        },
    })
}

#[derive(Deserialize)]
struct CreateAdminKey {
    name: String,
    expires_in_seconds: Option<i64>,
}

async fn create_admin(
    State(app): State<Arc<App>>,
    body: Bytes,
) -> Result<Json<Value>, ServerError> {
    let req: CreateAdminKey = parse(&body)?;
    check_name(&req.name)?;
    let expires_at = match req.expires_in_seconds {
        None => None,
        Some(s @ 1..=31_536_000) => Some(now() + s),
        Some(s) => {
            return Err(ApiError::invalid_param(
                "expires_in_seconds",
                "invalid_value",
                format!("Invalid 'expires_in_seconds': expected 1 to 31536000, got {s}."),
            )
            .into())
        }
    };
    let (key, value) = create_admin_key(&app.store, &req.name, expires_at).await?;
    app.auth.mark_secured();
    let mut out = admin_key_out(key);
    out["value"] = Value::String(value);
    Ok(Json(out))
}

async fn list_admin_keys(
    State(app): State<Arc<App>>,
    Query(pairs): Pairs,
) -> Result<Json<ListOut<Value>>, ServerError> {
    let page = paging::page(&pairs, &Rules::of(Order::Asc))?;
    let listed = app.store.list_keys(None, &page).await?;
    let out = listed.map(admin_key_out);
    Ok(Json(ListOut::new(out, |v| v["id"].as_str().unwrap_or(""))))
}

async fn admin_key(app: &App, id: &str) -> Result<KeyRecord, ServerError> {
    let k = app
        .store
        .get_key(id)
        .await?
        .filter(|k| k.scope == KeyScope::Admin);
    k.ok_or_else(|| ApiError::not_found(format!("No admin API key found with id '{id}'.")).into())
}

async fn get_admin_key(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ServerError> {
    Ok(Json(admin_key_out(admin_key(&app, &id).await?)))
}

async fn delete_admin_key(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ServerError> {
    admin_key(&app, &id).await?;
    app.store.delete_key(&id, now()).await?;
    tracing::info!(key = %id, "admin key revoked");
    Ok(Json(json!({
        "id": id,
        "object": "organization.admin_api_key.deleted",
        "deleted": true,
    })))
}
