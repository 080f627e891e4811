//! Operator endpoints: list tiers and whether they are loaded, load a tier (optionally from new
//! weights) and unload one, without restarting the server. Behind the same API key as `/v1`.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use ferrum_protocol::response::List;
use ferrum_protocol::ApiError;
use ferrum_registry::WeightsSource;
use serde_json::json;

use crate::models::ModelStatus;
use crate::{App, ServerError};

pub fn routes() -> Router<Arc<App>> {
    Router::new()
        .route("/admin/models", get(status))
        .route("/admin/models/{id}/load", post(load))
        .route("/admin/models/{id}/unload", post(unload))
        .route("/admin/reload", post(reload))
}

/// Re-reads the config file the server started with: new tiers appear, removed ones go, and
/// changed ones are unloaded so their next use loads the new definition.
async fn reload(State(app): State<Arc<App>>) -> Result<Json<serde_json::Value>, ServerError> {
    let Some(path) = app.models.config_path() else {
        return Err(ApiError::invalid_request(
            "The server runs on the embedded default config; there is no file to reload.",
        )
        .into());
    };
    let registry = ferrum_registry::Registry::from_file(&path).map_err(|e| {
        ApiError::invalid_request(format!("The config file could not be reloaded: {e}"))
    })?;
    app.models.replace_registry(registry);
    app.models.load_startup_tiers().await?;
    Ok(Json(
        json!({"reloaded": path.display().to_string(), "data": app.models.status().await}),
    ))
}

async fn status(State(app): State<Arc<App>>) -> Json<List<ModelStatus>> {
    Json(List::new(app.models.status().await))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct LoadBody {
    weights: Option<WeightsSource>,
}

async fn load(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ServerError> {
    let weights = if body.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        let b: LoadBody = serde_json::from_slice(&body).map_err(|e| {
            ApiError::invalid_param("weights", "invalid_value", format!("Invalid body: {e}"))
        })?;
        b.weights
    };
    let loaded = app.models.load(&id, weights).await?;
    Ok(Json(json!({
        "id": loaded.tier().id,
        "loaded": true,
        "path": loaded.path().display().to_string(),
        "system_fingerprint": loaded.fingerprint(),
    })))
}

async fn unload(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ServerError> {
    let tier = app.models.resolve(&id)?;
    let was_loaded = app.models.unload(&tier.id).await?;
    Ok(Json(
        json!({"id": tier.id, "loaded": false, "was_loaded": was_loaded}),
    ))
}
