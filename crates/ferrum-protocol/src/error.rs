//! The OpenAI error object (`{"error": {"message", "type", "param", "code"}}`) with its HTTP
//! status, built in one place so every endpoint reports the same shapes and codes.

use serde::Serialize;

/// The `type` of an OpenAI error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorType {
    InvalidRequest,
    Authentication,
    /// What OpenAI reports for rate limits (`"type": "requests"` with code `rate_limit_exceeded`).
    RateLimit,
    /// A rate limit on tokens (`"type": "tokens"`, code `rate_limit_exceeded`).
    RateLimitTokens,
    Server,
}

impl ErrorType {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorType::InvalidRequest => "invalid_request_error",
            ErrorType::Authentication => "invalid_request_error",
            ErrorType::RateLimit => "requests",
            ErrorType::RateLimitTokens => "tokens",
            ErrorType::Server => "server_error",
        }
    }
}

/// An API error: what the client sees, and the status it comes with.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiError {
    pub status: u16,
    pub kind: ErrorType,
    pub message: String,
    pub param: Option<String>,
    pub code: Option<String>,
}

#[derive(Serialize)]
struct Body<'a> {
    error: Inner<'a>,
}

#[derive(Serialize)]
struct Inner<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

impl ApiError {
    fn new(status: u16, kind: ErrorType, message: impl Into<String>) -> Self {
        ApiError {
            status,
            kind,
            message: message.into(),
            param: None,
            code: None,
        }
    }

    pub fn with_param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    pub fn with_code(mut self, code: impl Into<String>) -> Self {
        self.code = Some(code.into());
        self
    }

    /// 400 `invalid_request_error`.
    pub fn invalid_request(message: impl Into<String>) -> Self {
        Self::new(400, ErrorType::InvalidRequest, message)
    }

    /// 400 naming the parameter at fault, with an OpenAI error code.
    pub fn invalid_param(param: impl Into<String>, code: &str, message: impl Into<String>) -> Self {
        Self::invalid_request(message)
            .with_param(param)
            .with_code(code)
    }

    pub fn model_not_found(model: &str) -> Self {
        Self::new(
            404,
            ErrorType::InvalidRequest,
            format!("The model `{model}` does not exist or you do not have access to it."),
        )
        .with_code("model_not_found")
    }

    /// 413: an upload over the size limit.
    pub fn too_large(param: &str, message: impl Into<String>) -> Self {
        Self::new(413, ErrorType::InvalidRequest, message)
            .with_param(param)
            .with_code("file_too_large")
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(404, ErrorType::InvalidRequest, message)
    }

    pub fn missing_api_key() -> Self {
        Self::new(
            401,
            ErrorType::Authentication,
            "You didn't provide an API key. You need to provide your API key in an \
             Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
        )
    }

    pub fn invalid_api_key(shown: &str) -> Self {
        Self::new(
            401,
            ErrorType::Authentication,
            format!("Incorrect API key provided: {shown}."),
        )
        .with_code("invalid_api_key")
    }

    /// 401: a valid key without the scope a route needs (a project key on the admin routes).
    pub fn missing_scope(scope: &str) -> Self {
        Self::new(
            401,
            ErrorType::Authentication,
            format!(
                "You have insufficient permissions for this operation. Missing scopes: {scope}. \
                 Check that you have the correct role in your organization (Owner), and if \
                 you're using a restricted API key, that it has the necessary scopes."
            ),
        )
    }

    /// 403: a valid key that may not be used here.
    pub fn permission_denied(message: impl Into<String>) -> Self {
        Self::new(403, ErrorType::Authentication, message)
    }

    /// 429 `rate_limit_exceeded`: a project's limit on requests (`tokens` false) or tokens.
    pub fn rate_limit_exceeded(tokens: bool, message: impl Into<String>) -> Self {
        let kind = if tokens {
            ErrorType::RateLimitTokens
        } else {
            ErrorType::RateLimit
        };
        Self::new(429, kind, message).with_code("rate_limit_exceeded")
    }

    pub fn queue_full(model: &str, capacity: usize) -> Self {
        Self::new(
            429,
            ErrorType::RateLimit,
            format!(
                "Rate limit reached for {model}: {capacity} requests are already queued. \
                 Please retry after a short wait."
            ),
        )
        .with_code("rate_limit_exceeded")
    }

    /// A flex request refused for want of capacity, before any work (and so unbilled), as
    /// OpenAI's flex processing answers: retry later, or at the default tier.
    pub fn flex_unavailable(model: &str, waiting: usize) -> Self {
        Self::new(
            429,
            ErrorType::RateLimit,
            format!(
                "Resource unavailable: flex processing for {model} has no capacity now \
                 ({waiting} background requests are already waiting). Retry with backoff, or \
                 send the request with service_tier \"default\"."
            ),
        )
        .with_code("resource_unavailable")
    }

    pub fn context_length_exceeded(max: usize, prompt: usize, completion: Option<usize>) -> Self {
        let message = match completion {
            Some(c) => format!(
                "This model's maximum context length is {max} tokens. However, you requested \
                 {} tokens ({prompt} in the messages, {c} in the completion). Please reduce the \
                 length of the messages or completion.",
                prompt + c
            ),
            None => format!(
                "This model's maximum context length is {max} tokens. However, your messages \
                 resulted in {prompt} tokens. Please reduce the length of the messages."
            ),
        };
        Self::invalid_param("messages", "context_length_exceeded", message)
    }

    /// 503: the model cannot take requests right now (loading failed, unloaded, shutting down).
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(503, ErrorType::Server, message).with_code("model_unavailable")
    }

    /// 500: a failure on our side; the message says what failed.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, ErrorType::Server, message)
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        serde_json::to_value(Body {
            error: Inner {
                message: &self.message,
                kind: self.kind.as_str(),
                param: self.param.as_deref(),
                code: self.code.as_deref(),
            },
        })
        .expect("an error object always serializes")
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.status)
    }
}

impl std::error::Error for ApiError {}
