//! The Files API: `POST /v1/files` (multipart upload, streamed to the blob directory and checked
//! line by line for batch and fine-tune files), list, retrieve, content, delete.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Multipart, Path, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use ferrum_protocol::ApiError;
use ferrum_store::{FileRecord, Order};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

use crate::paging::{self, ListOut, Rules};
use crate::{now, random_id, App, ServerError};

/// Purposes a client may upload for (outputs get `batch_output`).
const PURPOSES: &[&str] = &[
    "batch",
    "fine-tune",
    "user_data",
    "vision",
    "assistants",
    "evals",
];

/// Line-numbered problems reported per upload at most: enough to fix a file, not a flood.
const MAX_REPORTED: usize = 20;

pub fn routes() -> Router<Arc<App>> {
    Router::new()
        .route(
            "/v1/files",
            // The upload enforces its own limit while streaming (`--max-file-mib`).
            get(list).post(upload).layer(DefaultBodyLimit::disable()),
        )
        .route("/v1/files/{id}", get(retrieve).delete(delete))
        .route("/v1/files/{id}/content", get(content))
}

/// The file object of the API.
#[derive(Serialize)]
pub struct FileObject {
    id: String,
    object: &'static str,
    bytes: u64,
    created_at: i64,
    /// Absent (not null) for a file that does not expire: the spec types it as an integer.
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_at: Option<i64>,
    filename: String,
    purpose: String,
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    status_details: Option<String>,
}

pub fn object(f: FileRecord) -> FileObject {
    FileObject {
        id: f.id,
        object: "file",
        bytes: f.bytes,
        created_at: f.created_at,
        expires_at: f.expires_at,
        filename: f.filename,
        purpose: f.purpose,
        status: "processed",
        status_details: None,
    }
}

fn multipart_error(e: axum::extract::multipart::MultipartError) -> ApiError {
    ApiError::invalid_request(format!(
        "Invalid multipart/form-data body: {}",
        e.body_text()
    ))
}

/// Removes a temporary upload when dropped (a refused or interrupted upload leaves nothing).
struct TempFile(std::path::PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

async fn upload(State(app): State<Arc<App>>, mut form: Multipart) -> Result<Response, ServerError> {
    let limit = app.files.max_bytes;
    let mut purpose: Option<String> = None;
    let mut upload: Option<(String, TempFile, u64)> = None;
    let mut expires_after: Option<i64> = None;
    let mut too_large = false;
    while let Some(mut field) = form.next_field().await.map_err(multipart_error)? {
        let name = field.name().unwrap_or_default().to_string();
        match name.as_str() {
            "file" => {
                let filename = field.file_name().unwrap_or("upload").to_string();
                let temp = TempFile(app.blobs.temp_path());
                let mut out = tokio::fs::File::create(&temp.0)
                    .await
                    .map_err(ServerError::io("storing the upload"))?;
                let mut bytes = 0u64;
                while let Some(chunk) = field.chunk().await.map_err(multipart_error)? {
                    bytes += chunk.len() as u64;
                    if bytes > limit {
                        // Read (and drop) the rest, so the client gets the answer rather than
                        // a connection reset in the middle of its upload.
                        too_large = true;
                        continue;
                    }
                    out.write_all(&chunk)
                        .await
                        .map_err(ServerError::io("storing the upload"))?;
                }
                out.sync_all()
                    .await
                    .map_err(ServerError::io("storing the upload"))?;
                upload = Some((filename, temp, bytes));
            }
            "purpose" => purpose = Some(field.text().await.map_err(multipart_error)?),
            "expires_after[seconds]" => {
                let text = field.text().await.map_err(multipart_error)?;
                let secs = text
                    .trim()
                    .parse::<i64>()
                    .ok()
                    .filter(|s| (3600..=2_592_000).contains(s));
                expires_after = Some(secs.ok_or_else(|| {
                    ApiError::invalid_param(
                        "expires_after.seconds",
                        "invalid_value",
                        "Invalid 'expires_after.seconds': expected an integer from 3600 to 2592000.",
                    )
                })?);
            }
            _ => {
                // Other form fields (`expires_after[anchor]`, ...) are read and ignored.
                let _ = field.bytes().await.map_err(multipart_error)?;
            }
        }
    }
    if too_large {
        return Err(ApiError::too_large(
            "file",
            format!(
                "File is too large: the limit is {} MiB (`ferrum serve --max-file-mib`).",
                limit >> 20
            ),
        )
        .into());
    }
    let purpose = purpose.ok_or_else(|| {
        ApiError::invalid_param(
            "purpose",
            "missing_required_parameter",
            "Missing required parameter: 'purpose'.",
        )
    })?;
    if !PURPOSES.contains(&purpose.as_str()) {
        return Err(ApiError::invalid_param(
            "purpose",
            "invalid_value",
            format!(
                "Invalid value for 'purpose': '{purpose}'. Supported values are: {}.",
                PURPOSES
                    .iter()
                    .map(|p| format!("'{p}'"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )
        .into());
    }
    let (filename, temp, bytes) = upload.ok_or_else(|| {
        ApiError::invalid_param(
            "file",
            "missing_required_parameter",
            "Missing required parameter: 'file'.",
        )
    })?;
    if bytes == 0 {
        return Err(ApiError::invalid_param("file", "invalid_file", "The file is empty.").into());
    }
    // A batch file is stored as it is, as OpenAI does: its lines are checked when a batch is
    // created on it (a batch with bad lines goes `validating` -> `failed`, naming each line).
    if purpose == "fine-tune" {
        let path = temp.0.clone();
        tokio::task::spawn_blocking(move || check_fine_tune_file(&path))
            .await
            .map_err(|e| ServerError::internal("checking the file", e))??;
    }
    let created_at = now();
    let record = FileRecord {
        id: random_id("file-"),
        created_at,
        filename,
        purpose,
        bytes,
        expires_at: expires_after.map(|s| created_at + s),
    };
    app.blobs
        .commit(&temp.0, &record.id)
        .map_err(ServerError::io("storing the upload"))?;
    if let Err(e) = app.store.insert_file(&record).await {
        let _ = app.blobs.remove(&record.id);
        return Err(e.into());
    }
    tracing::info!(id = %record.id, purpose = %record.purpose, bytes, "file uploaded");
    Ok(Json(object(record)).into_response())
}

/// Checks that every line of a fine-tune file is a JSON object of the right shape; errors name
/// the line (1-based).
fn check_fine_tune_file(path: &std::path::Path) -> Result<(), ServerError> {
    use std::io::BufRead;
    let file = std::fs::File::open(path).map_err(ServerError::io("reading the upload"))?;
    let mut problems = Vec::new();
    let mut lines = 0usize;
    for (i, line) in std::io::BufReader::new(file).split(b'\n').enumerate() {
        let line = line.map_err(ServerError::io("reading the upload"))?;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        lines += 1;
        let checked = match serde_json::from_slice::<Value>(&line) {
            Ok(Value::Object(map)) => fine_tune_problem(&map),
            Ok(_) => Some("expected a JSON object".to_string()),
            Err(e) => Some(format!("invalid JSON ({e})")),
        };
        if let Some(p) = checked {
            problems.push(format!("line {}: {p}", i + 1));
            if problems.len() >= MAX_REPORTED {
                break;
            }
        }
    }
    if lines == 0 {
        return Err(
            ApiError::invalid_param("file", "invalid_file", "The file has no lines.").into(),
        );
    }
    if problems.is_empty() {
        return Ok(());
    }
    Err(ApiError::invalid_param(
        "file",
        "invalid_file",
        format!("The fine-tune file is invalid: {}", problems.join("; ")),
    )
    .into())
}

/// What is wrong with a batch input line, if anything.
pub fn batch_line_problem(map: &serde_json::Map<String, Value>) -> Option<String> {
    match map.get("custom_id") {
        Some(Value::String(s)) if !s.is_empty() => {}
        Some(_) => return Some("'custom_id' must be a non-empty string".into()),
        None => return Some("missing 'custom_id'".into()),
    }
    match map.get("method") {
        Some(Value::String(m)) if m == "POST" => {}
        Some(_) => return Some("'method' must be \"POST\"".into()),
        None => return Some("missing 'method'".into()),
    }
    match map.get("url") {
        Some(Value::String(_)) => {}
        Some(_) => return Some("'url' must be a string".into()),
        None => return Some("missing 'url'".into()),
    }
    match map.get("body") {
        Some(Value::Object(_)) => None,
        Some(_) => Some("'body' must be an object".into()),
        None => Some("missing 'body'".into()),
    }
}

fn fine_tune_problem(map: &serde_json::Map<String, Value>) -> Option<String> {
    // Chat examples (`messages`) or preference pairs (`input` with the preferred and the
    // non-preferred output).
    if let Some(m) = map.get("messages") {
        let Value::Array(messages) = m else {
            return Some("'messages' must be an array".into());
        };
        if messages.is_empty() {
            return Some("'messages' is empty".into());
        }
        for (j, msg) in messages.iter().enumerate() {
            match msg.get("role").and_then(Value::as_str) {
                Some("system" | "developer" | "user" | "assistant" | "tool") => {}
                _ => return Some(format!("messages[{j}] has no valid 'role'")),
            }
        }
        if !messages.iter().any(|m| m["role"] == "assistant") {
            return Some("no assistant message to learn from".into());
        }
        return None;
    }
    if map.contains_key("input") && map.contains_key("preferred_output") {
        return None;
    }
    Some("expected 'messages' (a chat example)".into())
}

async fn list(
    State(app): State<Arc<App>>,
    Query(pairs): Query<Vec<(String, String)>>,
) -> Result<Json<ListOut<FileObject>>, ServerError> {
    let page = paging::page(
        &pairs,
        &Rules {
            default_limit: 10_000,
            max_limit: 10_000,
            default_order: Order::Desc,
            has_order: true,
        },
    )?;
    let purpose = pairs
        .iter()
        .find(|(k, v)| k == "purpose" && !v.is_empty())
        .map(|(_, v)| v.as_str());
    let listed = app.store.list_files(purpose, &page, crate::now()).await?;
    Ok(Json(ListOut::new(listed.map(object), |f| &f.id)))
}

/// A file that exists and has not expired (an expired one is gone for clients at once, and
/// deleted by [`reap_expired`] soon after).
pub async fn find(app: &App, id: &str) -> Result<FileRecord, ServerError> {
    app.store
        .get_file(id)
        .await?
        .filter(|f| f.expires_at.is_none_or(|at| at > crate::now()))
        .ok_or_else(|| {
            ApiError::not_found(format!("No such File object: {id}"))
                .with_param("id")
                .into()
        })
}

/// Deletes files whose `expires_after` has passed: the record first (so no client sees a file
/// without content), then the content. Idempotent, so several servers may reap together.
pub async fn reap_expired(app: &App) -> Result<usize, ServerError> {
    let ids = app.store.expired_files(crate::now(), 100).await?;
    let mut deleted = 0;
    for id in ids {
        if app.store.delete_file(&id).await? {
            deleted += 1;
            if let Err(e) = app.blobs.remove(&id) {
                tracing::warn!(%id, error = %e, "could not remove an expired file's content");
            }
        }
    }
    if deleted > 0 {
        tracing::info!(files = deleted, "expired files deleted");
    }
    Ok(deleted)
}

async fn retrieve(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
) -> Result<Json<FileObject>, ServerError> {
    Ok(Json(object(find(&app, &id).await?)))
}

async fn content(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
) -> Result<Response, ServerError> {
    let f = find(&app, &id).await?;
    let file = tokio::fs::File::open(app.blobs.path(&f.id))
        .await
        .map_err(ServerError::io("opening a file's content"))?;
    let body = Body::from_stream(tokio_util::io::ReaderStream::new(file));
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_LENGTH, f.bytes.to_string()),
        ],
        body,
    )
        .into_response())
}

async fn delete(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ServerError> {
    let f = find(&app, &id).await?;
    if app.store.delete_file(&f.id).await? {
        if let Err(e) = app.blobs.remove(&f.id) {
            tracing::warn!(id = %f.id, error = %e, "could not remove a deleted file's content");
        }
    }
    Ok(Json(json!({"id": f.id, "object": "file", "deleted": true})))
}
