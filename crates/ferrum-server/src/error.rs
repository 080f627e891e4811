//! The server's one error type: every way a request can fail, mapped in exactly one place (an
//! exhaustive `match`) to the OpenAI error the client sees and to a metrics label.
//!
//! The client's mistakes arrive already worded as OpenAI words them ([`ApiError`], built by the
//! protocol crate's validation and the handlers). Failures on the server's side (the database,
//! the blob store, a panicking task, a corrupt record, an engine that stopped) carry their
//! detail for the log only: the client gets OpenAI's generic 500 and the request id to report,
//! never SQL, paths or connection strings. Turning an error into a response has no side
//! effects: the response carries an [`ErrorReport`] extension, which the request middleware
//! logs under the request's span and counts in `/metrics`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use ferrum_embed::BatchFailed;
use ferrum_engine::EngineError;
use ferrum_protocol::ApiError;
use ferrum_store::StoreError;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The request cannot be served as sent (validation, unknown ids, auth, limits), in
    /// OpenAI's words.
    #[error("{0}")]
    Api(ApiError),
    /// The engine refused or failed the request.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// An embedding forward pass the request was in failed.
    #[error(transparent)]
    Embedding(#[from] BatchFailed),
    /// The database failed (or, for `UnknownCursor`, a list cursor names nothing).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Reading or writing file contents (uploads, batch outputs) failed.
    #[error("{what} failed: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// A stored record no longer parses.
    #[error("stored {id} is corrupt: {detail}")]
    Corrupt { id: String, detail: String },
    /// A step on the server's side failed in a way the request does not explain (a blocking
    /// task panicked, a tokenizer or grammar compiler failed on valid input).
    #[error("{what} failed: {detail}")]
    Internal { what: &'static str, detail: String },
    /// The engine ended a sequence without its final event (it was stopped or unloaded).
    #[error("the engine stopped before the response was complete")]
    EngineStopped,
    /// The database changed under a read-modify-write (a row vanished between two statements).
    #[error("{0}")]
    Conflict(&'static str),
}

/// What a failed response reports to the request middleware: its metrics label, and for
/// failures on the server's side the detail to log.
#[derive(Clone, Debug)]
pub struct ErrorReport {
    pub label: &'static str,
    pub detail: Option<String>,
}

/// The message of every 500 whose detail stays in the log.
const INTERNAL: &str = "The server had an error while processing your request. Sorry about \
                        that! You can retry your request, or report the x-request-id of this \
                        response if the error persists.";

impl ServerError {
    pub fn internal(what: &'static str, e: impl std::fmt::Display) -> Self {
        ServerError::Internal {
            what,
            detail: e.to_string(),
        }
    }

    pub fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> Self {
        move |source| ServerError::Io { what, source }
    }

    pub fn corrupt(id: &str, e: impl std::fmt::Display) -> Self {
        ServerError::Corrupt {
            id: id.to_string(),
            detail: e.to_string(),
        }
    }

    /// Names `param` as the parameter at fault, for errors in the client's words (a lookup
    /// made for a parameter: `input_file_id` naming no file).
    pub fn with_param(self, param: &str) -> Self {
        match self {
            ServerError::Api(e) => ServerError::Api(e.with_param(param)),
            other => other,
        }
    }

    /// The error as the client sees it.
    pub fn to_api(&self) -> ApiError {
        match self {
            ServerError::Api(e) => e.clone(),
            ServerError::Engine(e) => engine_error(e),
            ServerError::Store(StoreError::UnknownCursor(id)) => ApiError::invalid_param(
                "after",
                "invalid_value",
                format!("Invalid 'after': no object with id '{id}' in this list."),
            ),
            ServerError::Store(_)
            | ServerError::Embedding(_)
            | ServerError::Io { .. }
            | ServerError::Corrupt { .. }
            | ServerError::Internal { .. }
            | ServerError::Conflict(_) => ApiError::internal(INTERNAL),
            ServerError::EngineStopped => ApiError::internal(
                "The model stopped before the response was complete (it was unloaded or the \
                 server is shutting down). Retry your request.",
            ),
        }
    }

    /// The `kind` label of `ferrum_errors_total`, and the detail for the log when the failure
    /// is on the server's side (a 5xx, whose message to the client does not explain it).
    fn report(&self, api: &ApiError) -> ErrorReport {
        let label = match self {
            ServerError::Api(e) => api_label(e),
            ServerError::Engine(_) => "engine",
            ServerError::Embedding(_) => "embedding",
            ServerError::Store(StoreError::UnknownCursor(_)) => "invalid_request",
            ServerError::Store(_) => "database",
            ServerError::Io { .. } => "io",
            ServerError::Corrupt { .. } => "corrupt_record",
            ServerError::Internal { .. } => "internal",
            ServerError::EngineStopped => "engine_stopped",
            ServerError::Conflict(_) => "conflict",
        };
        ErrorReport {
            label,
            detail: (api.status >= 500).then(|| self.to_string()),
        }
    }

    /// The error as a JSON body for a stream's error event or a batch's error line, with its
    /// detail logged here (those have no response for the middleware to read).
    pub fn into_api_logged(self) -> ApiError {
        let api = self.to_api();
        let report = self.report(&api);
        if let Some(detail) = &report.detail {
            tracing::error!(kind = report.label, error = %detail, "request failed");
        }
        api
    }
}

/// The label of an error already in OpenAI's words: its code, else its status class.
fn api_label(e: &ApiError) -> &'static str {
    match e.status {
        401 | 403 => "authentication",
        404 => "not_found",
        413 => "too_large",
        429 => "rate_limited",
        503 => "unavailable",
        s if s >= 500 => "server",
        _ => "invalid_request",
    }
}

/// Engine errors as OpenAI errors: the request's faults name their parameter, the engine's own
/// failures are a 500.
fn engine_error(e: &EngineError) -> ApiError {
    match e {
        EngineError::ContextLengthExceeded { requested, max } => {
            ApiError::context_length_exceeded(*max, *requested, None)
        }
        EngineError::EmptyPrompt => {
            ApiError::invalid_param("messages", "invalid_value", "The prompt is empty.")
        }
        EngineError::TokenOutOfRange { id, vocab } => ApiError::invalid_param(
            "messages",
            "invalid_value",
            format!("Token id {id} is outside the vocabulary (size {vocab})."),
        ),
        EngineError::Template(e) => {
            ApiError::invalid_param("messages", "invalid_value", e.to_string())
        }
        EngineError::Tokenizer(e) => ApiError::invalid_request(e.to_string()),
        EngineError::Io { .. }
        | EngineError::CorruptGguf { .. }
        | EngineError::MissingMetadata { .. }
        | EngineError::MissingTensor { .. }
        | EngineError::BadTensorShape { .. }
        | EngineError::UnsupportedArchitecture(_)
        | EngineError::UnsupportedQuantization { .. }
        | EngineError::InvalidOption(_)
        | EngineError::Internal(_) => ApiError::internal(INTERNAL),
    }
}

impl From<ApiError> for ServerError {
    fn from(e: ApiError) -> Self {
        ServerError::Api(e)
    }
}

impl IntoResponse for ServerError {
    fn into_response(self) -> Response {
        let api = self.to_api();
        let status = StatusCode::from_u16(api.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = (status, Json(api.body())).into_response();
        if status == StatusCode::TOO_MANY_REQUESTS {
            // The queue drains as running sequences finish: a short wait is enough (the SDKs
            // honour Retry-After in their retries).
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response.extensions_mut().insert(self.report(&api));
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_side_failures_keep_their_detail_out_of_the_body() {
        let e = ServerError::Io {
            what: "storing the upload",
            source: std::io::Error::other("/var/lib/ferrum/blobs/ab: disk full"),
        };
        let api = e.to_api();
        assert_eq!(api.status, 500);
        assert!(!api.message.contains("/var/lib"), "{}", api.message);
        let report = e.report(&api);
        assert_eq!(report.label, "io");
        assert!(report.detail.unwrap().contains("disk full"));
    }

    #[test]
    fn client_faults_keep_their_words_and_log_nothing() {
        let e = ServerError::from(EngineError::ContextLengthExceeded {
            requested: 9000,
            max: 8192,
        });
        let api = e.to_api();
        assert_eq!(api.status, 400);
        assert_eq!(api.code.as_deref(), Some("context_length_exceeded"));
        assert!(e.report(&api).detail.is_none());
        let e = ServerError::from(StoreError::UnknownCursor("file-x".into()));
        assert_eq!(e.to_api().param.as_deref(), Some("after"));
        assert_eq!(e.report(&e.to_api()).label, "invalid_request");
        let e = ServerError::from(ApiError::queue_full("gpt-4.1", 4));
        assert_eq!(e.report(&e.to_api()).label, "rate_limited");
        let response = e.into_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert!(response.headers().contains_key(header::RETRY_AFTER));
    }
}
