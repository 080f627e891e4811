//! What the server's integration tests share: the server configuration they run with, and one
//! request through the router (axum's `oneshot`, no socket).

#![allow(dead_code)] // each test crate uses its part

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Request as HttpRequest, StatusCode};
use ferrum_server::{BatchConfig, EngineConfig, ServerConfig};
use ferrum_store::BlobStore;
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;

/// The tests' server configuration: one kernel thread, blobs under `dir`, uploads up to 1 MiB,
/// the batch worker polling every 20 ms, and no keys.
pub fn config(dir: &Path) -> ServerConfig {
    ServerConfig {
        engine: EngineConfig {
            threads: Some(1),
            scheduling: Default::default(),
            kv_type: Default::default(),
        },
        api_key: None,
        admin_key: None,
        blobs: BlobStore::open(dir.join("blobs")).unwrap(),
        max_file_bytes: 1 << 20,
        batch: BatchConfig {
            poll: Duration::from_millis(20),
            ..BatchConfig::default()
        },
        fetch_image_urls: false,
    }
}

/// One request through the router, with a JSON body and a bearer key when given: the status,
/// the headers and the body's bytes.
pub async fn send(
    app: &Arc<ferrum_server::App>,
    method: &str,
    uri: &str,
    key: Option<&str>,
    body: Option<Value>,
) -> (StatusCode, HeaderMap, Bytes) {
    let mut req = HttpRequest::builder().method(method).uri(uri);
    if let Some(k) = key {
        req = req.header("authorization", format!("Bearer {k}"));
    }
    let body = match body {
        Some(v) => {
            req = req.header("content-type", "application/json");
            Body::from(v.to_string())
        }
        None => Body::empty(),
    };
    let response = ferrum_server::router(Arc::clone(app))
        .oneshot(req.body(body).unwrap())
        .await
        .unwrap();
    let (parts, body) = response.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    (parts.status, parts.headers, bytes)
}
