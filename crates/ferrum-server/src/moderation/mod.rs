//! Moderation: `POST /v1/moderations` over two classifiers, the lexical one (`classify`, with
//! its phrase lexicon in `lexicon`) and a model judge (`judge`: a chat tier asked a yes/no
//! question per category), and the content filter of chat completions and responses
//! (`filter`), which is always lexical (it runs on every window of a completion).
//!
//! Which classifier answers: the `omni-moderation-*` models the judge, when ferrum.toml names
//! a judge tier (`[moderation] judge = "gpt-4.1-mini"`), and the lexical classifier otherwise;
//! the `text-moderation-*` models always the lexical classifier (fast, deterministic). Both
//! read text only, so an input with image parts is refused with a 400 naming the part rather
//! than answered as if the image had been checked. Moderation is free, as at OpenAI: each
//! request goes to the usage ledger at a cost of 0 (the judge's questions are not billed).

mod classify;
mod filter;
mod judge;
mod lexicon;

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::Json;
use ferrum_protocol::moderation::{
    parse_moderation_request, Moderation, ModerationInput, ModerationRequest, ModerationResult,
    Part,
};
use ferrum_protocol::ApiError;
use ferrum_store::UsageRecord;
use serde_json::{Map, Value};

pub use classify::{classify, Category, Scores};
pub(crate) use filter::{check_prompt, CompletionGate, LogprobQueue};

use crate::{now, random_id, App, ServerError};

/// `POST /v1/moderations`.
pub async fn create(
    State(app): State<Arc<App>>,
    body: Bytes,
) -> Result<Json<Moderation>, ServerError> {
    let req = parse_moderation_request(&body)?;
    let texts = texts_of(&req)?;
    // The omni models are the judge's when the config names one; the text models are lexical.
    let judge_tier = if req.text_only_model() {
        None
    } else {
        app.models.moderation_judge()
    };
    let results = match judge_tier {
        Some(tier) => judge::judge_all(Arc::clone(&app), tier, texts)
            .await?
            .iter()
            .map(|s| result_of(s, judge::threshold))
            .collect(),
        // Linear in the input, but up to megabytes of it: off the async threads.
        None => tokio::task::spawn_blocking(move || {
            texts
                .iter()
                .map(|t| result_of(&classify(t), Category::threshold))
                .collect::<Vec<_>>()
        })
        .await
        .map_err(|e| ServerError::internal("classifying the input", e))?,
    };
    let moderation = Moderation {
        id: random_id("modr-"),
        model: req.model.to_string(),
        results,
    };
    record(&app, &moderation).await;
    Ok(Json(moderation))
}

/// The texts to classify, one per result: each string, or all text parts together.
fn texts_of(req: &ModerationRequest) -> Result<Vec<String>, ApiError> {
    match &req.input {
        ModerationInput::Texts(texts) => Ok(texts.clone()),
        ModerationInput::Parts(parts) => {
            let mut text = Vec::new();
            for (i, p) in parts.iter().enumerate() {
                match p {
                    Part::Text(t) => text.push(t.as_str()),
                    Part::ImageUrl(_) => return Err(image_refused(req, i)),
                }
            }
            Ok(vec![text.join("\n")])
        }
    }
}

fn image_refused(req: &ModerationRequest, i: usize) -> ApiError {
    let why = if req.text_only_model() {
        format!("The model `{}` accepts text only.", req.model)
    } else {
        "This server's moderation classifier reads text only: image inputs cannot be \
         classified, and are refused rather than reported as safe."
            .to_string()
    };
    ApiError::invalid_param(
        format!("input[{i}]"),
        "unsupported_value",
        format!("Invalid 'input[{i}]': image inputs are not supported. {why}"),
    )
}

/// One input's result in the spec's shape; a category is flagged from its `threshold` (the
/// classifier's own).
fn result_of(scores: &Scores, threshold: fn(Category) -> f32) -> ModerationResult {
    let mut categories = Map::new();
    let mut category_scores = Map::new();
    let mut applied = Map::new();
    let mut flagged = false;
    for c in Category::ALL {
        let flag = scores.get(c) >= threshold(c);
        flagged |= flag;
        categories.insert(c.name().into(), Value::Bool(flag));
        // Rounded to 6 places: the classifiers' arithmetic is f32.
        let score = (f64::from(scores.get(c)) * 1e6).round() / 1e6;
        category_scores.insert(c.name().into(), score.into());
        applied.insert(c.name().into(), Value::Array(vec!["text".into()]));
    }
    ModerationResult {
        flagged,
        categories,
        category_scores,
        category_applied_input_types: applied,
    }
}

/// Records the request in the usage ledger at no cost (a failing database is logged only).
async fn record(app: &App, m: &Moderation) {
    let record = UsageRecord {
        id: m.id.clone(),
        created: now(),
        model: m.model.clone(),
        endpoint: "moderations".into(),
        prompt_tokens: 0,
        cached_tokens: 0,
        completion_tokens: 0,
        cost_usd: 0.0,
        batch: false,
    };
    // Billed to the caller's project and key (the handler's task holds the caller).
    let by = crate::auth::Caller::current().attribution();
    if let Err(e) = app.store.record_usage_as(&record, &by).await {
        tracing::error!(error = %e, id = %m.id, "could not record a moderation request");
    }
    let flagged = m.results.iter().filter(|r| r.flagged).count();
    tracing::info!(id = %m.id, inputs = m.results.len(), flagged, "moderation done");
}
