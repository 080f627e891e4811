//! Rate limits per project and model, as OpenAI enforces them: requests and tokens per minute
//! on the model endpoints, batch input tokens per day on batch creation.
//!
//! A request of a project key to a model endpoint is admitted before its handler runs
//! ([`admit`], from the auth middleware): its body is read for the model and the most it may
//! cost, which OpenAI counts as the prompt (estimated from the request's length, 4 characters a
//! token) plus the most output it asked for (`max_tokens`, `max_completion_tokens` or
//! `max_output_tokens`, times `n`). The count is kept in the database (one UPSERT on the
//! project's window row, see `ferrum_store::ratelimits`), so servers sharing a database share
//! the limit. When the response's usage is recorded, [`settle`] replaces the estimate with the
//! real prompt and output tokens. Every admitted response carries the `x-ratelimit-*` headers;
//! a refused one is a 429 `rate_limit_exceeded` naming the limit, with the same headers.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::Request;
use axum::http::{header, HeaderMap, HeaderValue, Method};
use axum::response::{IntoResponse, Response};
use ferrum_protocol::ApiError;
use ferrum_store::{Admission, DefaultLimits, LimitKind, Window, WindowState};

use crate::{App, ServerError, MAX_BODY_BYTES};

/// Limits of a project on a model it has set none for (OpenAI's usage tier 5 for GPT-4.1).
pub const DEFAULT_LIMITS: DefaultLimits = DefaultLimits {
    requests: 10_000,
    tokens: 30_000_000,
};

/// Batch input tokens a project may queue per model and day when it has set no limit.
pub const DEFAULT_BATCH_DAY_TOKENS: u64 = 15_000_000_000;

/// The endpoints whose requests are counted (POST only).
const LIMITED: &[&str] = &[
    "/v1/chat/completions",
    "/v1/responses",
    "/v1/embeddings",
    "/v1/moderations",
];

/// One admitted request: the window it was counted in, its estimate, and its headers.
#[derive(Debug)]
pub struct Admitted {
    window: Window,
    reserved: u64,
    settled: AtomicBool,
    pub headers: Headers,
    /// Whether the request fits the project's reserved capacity on the model (its window's
    /// tokens, this request's estimate included, within the reservation): it is then
    /// scheduled at priority, ahead of other projects' requests.
    pub within_reservation: bool,
}

/// The `x-ratelimit-*` values of a response.
#[derive(Clone, Copy, Debug)]
pub struct Headers {
    pub state: WindowState,
    /// Until the window's counts start again from zero.
    pub reset: Duration,
}

/// The parts of a model request that its admission reads.
#[derive(serde::Deserialize)]
struct Limited {
    model: Option<String>,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    max_output_tokens: Option<u64>,
    n: Option<u64>,
}

/// Admits a project's request if it is a limited one (returning the request with its body put
/// back, and what was counted), or answers the 429 that refuses it.
pub async fn admit(
    app: &App,
    project_id: &str,
    req: Request,
) -> Result<(Request, Option<Admitted>), Response> {
    if req.method() != Method::POST || !LIMITED.contains(&req.uri().path()) {
        return Ok((req, None));
    }
    let (parts, body) = req.into_parts();
    let bytes = match axum::body::to_bytes(body, MAX_BODY_BYTES).await {
        Ok(b) => b,
        Err(e) => {
            return Err(ServerError::from(ApiError::invalid_request(format!(
                "The request body could not be read: {e}"
            )))
            .into_response())
        }
    };
    let estimate = serde_json::from_slice::<Limited>(&bytes)
        .ok()
        .and_then(|l| Some((limit_model(app, l.model.as_deref()?)?, estimate(&l, &bytes))));
    let req = Request::from_parts(parts, axum::body::Body::from(bytes));
    // A body without a model (or naming none served) is refused by its handler, uncounted.
    let Some((model, tokens)) = estimate else {
        return Ok((req, None));
    };
    let now = now_ms();
    let window = Window {
        project_id: project_id.to_string(),
        model,
        kind: LimitKind::Minute,
        start: now / 60_000 * 60,
    };
    let reset = Duration::from_millis((window.start * 1000 + 60_000 - now).max(0) as u64);
    prune_now_and_then(app);
    let admission = match app.store.admit(&window, tokens, DEFAULT_LIMITS).await {
        Ok(a) => a,
        Err(e) => return Err(ServerError::from(e).into_response()),
    };
    match admission {
        Admission::Admitted(state) => {
            // Reserved capacity is read per request, like the keys, so a change applies at once.
            let reservation = match app.store.reserved_tokens(project_id, &window.model).await {
                Ok(r) => r,
                Err(e) => return Err(ServerError::from(e).into_response()),
            };
            let within_reservation = reservation > 0 && state.tokens <= reservation;
            tracing::debug!(
                project = project_id,
                model = %window.model,
                tokens,
                within_reservation,
                "admitted"
            );
            Ok((
                req,
                Some(Admitted {
                    window,
                    reserved: tokens,
                    settled: AtomicBool::new(false),
                    headers: Headers { state, reset },
                    within_reservation,
                }),
            ))
        }
        Admission::Refused(state) => Err(refusal(&window, tokens, state, reset)),
    }
}

/// Counts a batch's input against its project's daily batch limit per model (each line's
/// estimate, as for a live request), or refuses the batch with a 429 naming the limit. The
/// day's count is not corrected when lines finish: the limit is on what is queued.
pub async fn admit_batch(app: &App, project_id: &str, file_id: &str) -> Result<(), ServerError> {
    let bytes = tokio::fs::read(app.blobs.path(file_id))
        .await
        .map_err(ServerError::io("reading a batch's input file"))?;
    let mut per_model: std::collections::BTreeMap<String, u64> = Default::default();
    for line in bytes.split(|b| *b == b'\n') {
        #[derive(serde::Deserialize)]
        struct Line {
            body: Limited,
        }
        let Ok(l) = serde_json::from_slice::<Line>(line) else {
            continue; // The batch's validation reports malformed lines.
        };
        let Some(model) = l.body.model.as_deref().and_then(|m| limit_model(app, m)) else {
            continue;
        };
        *per_model.entry(model).or_default() += estimate(&l.body, line);
    }
    let day = now_ms() / 1000 / 86_400 * 86_400;
    let defaults = DefaultLimits {
        requests: i64::MAX as u64,
        tokens: DEFAULT_BATCH_DAY_TOKENS,
    };
    for (model, tokens) in per_model {
        let window = Window {
            project_id: project_id.to_string(),
            model,
            kind: LimitKind::BatchDay,
            start: day,
        };
        if let Admission::Refused(state) = app.store.admit(&window, tokens, defaults).await? {
            tracing::info!(project = project_id, model = %window.model, "batch limit reached");
            return Err(ApiError::rate_limit_exceeded(
                true,
                format!(
                    "Enqueued token limit reached for {} in project {project_id}. Limit: {} \
                     enqueued tokens per day, already enqueued: {}, this batch: {tokens}. \
                     Please try again once some in_progress batches have been completed.",
                    window.model, state.max_tokens, state.tokens
                ),
            )
            .with_param("input_file_id")
            .into());
        }
    }
    Ok(())
}

/// Replaces an admitted request's estimate by the tokens it used (once; later calls do
/// nothing). A failing database is logged: the response is already the client's.
pub async fn settle(app: &App, admitted: &Admitted, used_tokens: u64) {
    if admitted.settled.swap(true, Ordering::Relaxed) {
        return;
    }
    let delta = used_tokens as i64 - admitted.reserved as i64;
    if delta == 0 {
        return;
    }
    if let Err(e) = app.store.correct_window(&admitted.window, delta).await {
        tracing::error!(error = %e, "could not correct a rate-limit window");
    }
}

/// The tier whose limits apply to `model`: a fine-tuned model counts against its base.
fn limit_model(app: &App, model: &str) -> Option<String> {
    let base = match model.strip_prefix("ft:") {
        Some(rest) => rest.split(':').next().unwrap_or(rest),
        None => model,
    };
    if let Ok(tier) = app.models.resolve(base) {
        return Some(tier.id.clone());
    }
    app.models
        .resolve_adapter(base)
        .map(|(tier, _)| tier.id.clone())
}

/// OpenAI's admission count: the prompt estimated from the request's size (4 bytes a token),
/// plus the most output the request may produce. Base64 images count as [`IMAGE_ESTIMATE`]
/// tokens each, not by their bytes (a 100 KB picture is not 25,000 tokens); the count is
/// corrected to the real one when the request completes.
fn estimate(l: &Limited, body: &[u8]) -> u64 {
    let (image_bytes, images) = inline_images(body);
    let prompt = ((body.len() - image_bytes) as u64).div_ceil(4) + images * IMAGE_ESTIMATE;
    let out = l
        .max_completion_tokens
        .or(l.max_tokens)
        .or(l.max_output_tokens)
        .unwrap_or(0);
    prompt + out.saturating_mul(l.n.unwrap_or(1).max(1))
}

/// Admission's guess of one image's tokens (a few tiles of a tiled encoder).
const IMAGE_ESTIMATE: u64 = 1000;

/// The bytes of base64 image data in a request body (`data:image/...;base64,` and the
/// base64 after it) and how many such images there are.
fn inline_images(body: &[u8]) -> (usize, u64) {
    const HEAD: &[u8] = b"data:image/";
    let (mut bytes, mut count, mut at) = (0, 0, 0);
    while let Some(i) = body[at..].windows(HEAD.len()).position(|w| w == HEAD) {
        let start = at + i;
        let rest = &body[start..];
        let Some(comma) = rest.iter().take(64).position(|&b| b == b',') else {
            at = start + HEAD.len();
            continue;
        };
        let data = rest[comma + 1..]
            .iter()
            .take_while(|&&b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=' | b'\\'))
            .count();
        bytes += comma + 1 + data;
        count += 1;
        at = start + comma + 1 + data;
    }
    (bytes, count)
}

/// The 429 of a request over a limit, with the headers of the window it did not fit.
fn refusal(window: &Window, tokens: u64, state: WindowState, reset: Duration) -> Response {
    let wait = fmt_duration(reset);
    let (model, project) = (&window.model, &window.project_id);
    let e = if state.requests + 1 > state.max_requests {
        ApiError::rate_limit_exceeded(
            false,
            format!(
                "Rate limit reached for {model} in project {project} on requests per min (RPM): \
                 Limit {}, Used {}, Requested 1. Please try again in {wait}.",
                state.max_requests, state.requests
            ),
        )
    } else if tokens > state.max_tokens {
        ApiError::rate_limit_exceeded(
            true,
            format!(
                "Request too large for {model} in project {project} on tokens per min (TPM): \
                 Limit {}, Requested {tokens}. The input or output tokens must be reduced in \
                 order to run successfully.",
                state.max_tokens
            ),
        )
    } else {
        ApiError::rate_limit_exceeded(
            true,
            format!(
                "Rate limit reached for {model} in project {project} on tokens per min (TPM): \
                 Limit {}, Used {}, Requested {tokens}. Please try again in {wait}.",
                state.max_tokens, state.tokens
            ),
        )
    };
    tracing::info!(project, model, "rate limit reached");
    let mut response = ServerError::from(e).into_response();
    let headers = response.headers_mut();
    set_headers(headers, &Headers { state, reset });
    let secs = reset.as_secs_f64().ceil().max(1.0) as u64;
    if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
        headers.insert(header::RETRY_AFTER, v);
    }
    response
}

/// Writes the six `x-ratelimit-*` headers. Requests and tokens share one window, so they
/// reset together.
pub fn set_headers(headers: &mut HeaderMap, h: &Headers) {
    let s = h.state;
    let reset = fmt_duration(h.reset);
    let values = [
        ("x-ratelimit-limit-requests", s.max_requests.to_string()),
        ("x-ratelimit-limit-tokens", s.max_tokens.to_string()),
        (
            "x-ratelimit-remaining-requests",
            s.max_requests.saturating_sub(s.requests).to_string(),
        ),
        (
            "x-ratelimit-remaining-tokens",
            s.max_tokens.saturating_sub(s.tokens).to_string(),
        ),
        ("x-ratelimit-reset-requests", reset.clone()),
        ("x-ratelimit-reset-tokens", reset),
    ];
    for (name, value) in values {
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert(name, v);
        }
    }
}

/// A duration as OpenAI writes resets (Go's format): `250ms`, `12.5s`, `1m0s`.
pub fn fmt_duration(d: Duration) -> String {
    let ms = d.as_millis() as u64;
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let (m, rest_ms) = (ms / 60_000, ms % 60_000);
    let secs = format!("{}.{:03}", rest_ms / 1000, rest_ms % 1000);
    let secs = secs.trim_end_matches('0').trim_end_matches('.');
    if m > 0 {
        format!("{m}m{secs}s")
    } else {
        format!("{secs}s")
    }
}

/// Now and then (one admission in 256), deletes windows no limit reads any more (older than
/// two days, past the batch day windows too), off the request's path.
fn prune_now_and_then(app: &App) {
    if rand::random::<u8>() != 0 {
        return;
    }
    let store = app.store.clone();
    let before = now_ms() / 1000 - 2 * 86_400;
    tokio::spawn(async move {
        match store.prune_windows(before).await {
            Ok(n) => tracing::debug!(deleted = n, "pruned rate-limit windows"),
            Err(e) => tracing::warn!(error = %e, "could not prune rate-limit windows"),
        }
    });
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resets_read_like_openai_s() {
        let check = |ms: u64, expect: &str| {
            assert_eq!(fmt_duration(Duration::from_millis(ms)), expect, "{ms} ms")
        };
        check(0, "0ms");
        check(250, "250ms");
        check(1000, "1s");
        check(12_500, "12.5s");
        check(59_999, "59.999s");
        check(60_000, "1m0s");
        check(86_400_000, "1440m0s");
    }

    #[test]
    fn the_estimate_is_the_prompt_plus_the_most_output() {
        let l = |max_tokens, max_completion_tokens, n| Limited {
            model: None,
            max_tokens,
            max_completion_tokens,
            max_output_tokens: None,
            n,
        };
        let body = |n: usize| vec![b' '; n];
        assert_eq!(estimate(&l(None, None, None), &body(401)), 101);
        assert_eq!(estimate(&l(Some(50), None, Some(3)), &body(400)), 250);
        assert_eq!(estimate(&l(Some(50), Some(20), None), &body(400)), 120);
        // Two inline images of 40,000 base64 bytes each: 1000 tokens apiece, not 20,000.
        let data = "A".repeat(40_000);
        let body = format!(
            r#"{{"messages":[{{"content":[{{"image_url":{{"url":"data:image/png;base64,{data}"}}}},
            {{"image_url":{{"url":"data:image/jpeg;base64,{data}=="}}}}]}}],"model":"m"}}"#
        );
        let (bytes, images) = inline_images(body.as_bytes());
        assert_eq!(images, 2);
        assert_eq!(bytes, 2 * ("data:image/png;base64,".len() + 40_000) + 3);
        let e = estimate(&l(None, None, None), body.as_bytes());
        assert!((2000..2100).contains(&e), "{e}");
    }
}
