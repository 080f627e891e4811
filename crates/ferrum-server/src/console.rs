//! The web console at `/`: a sign-in with an API key, a playground that streams a chat
//! completion, usage and cost charts, and the admin's projects, keys and rate limits. Plain
//! HTML, CSS and JavaScript compiled into the binary (no build step, no CDN): the page only
//! calls the server's own OpenAI-shaped API with the key it was given, so it needs no
//! privileges of its own, and its routes sit outside the API's auth gate.

use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Map, Value};

use crate::App;

const INDEX: &str = include_str!("../console/index.html");
const SCRIPT: &str = include_str!("../console/app.js");
const STYLE: &str = include_str!("../console/style.css");

pub fn routes() -> Router<Arc<App>> {
    Router::new()
        .route("/", get(|| asset("text/html; charset=utf-8", INDEX)))
        .route(
            "/console/app.js",
            get(|| asset("text/javascript; charset=utf-8", SCRIPT)),
        )
        .route(
            "/console/style.css",
            get(|| asset("text/css; charset=utf-8", STYLE)),
        )
        .route("/console/prices.json", get(prices))
}

async fn asset(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
}

/// Each model id (tiers and their aliases) with its kind and price per 1M tokens, so the
/// playground can show what a request cost. Prices are the operator's published list, not a
/// secret; the OpenAI API has no endpoint for them.
async fn prices(State(app): State<Arc<App>>) -> Json<Value> {
    let mut models = Map::new();
    for tier in app.models.tiers() {
        let kind = match tier.kind {
            ferrum_registry::ModelKind::Chat => "chat",
            ferrum_registry::ModelKind::Embedding => "embedding",
        };
        let entry = json!({
            "kind": kind,
            "input": tier.price.input,
            "cached_input": tier.price.cached_input,
            "output": tier.price.output,
        });
        for id in std::iter::once(&tier.id).chain(&tier.aliases) {
            models.insert(id.clone(), entry.clone());
        }
    }
    Json(json!({ "models": models }))
}
