//! `POST /v1/embeddings`: the inputs tokenized and checked against the model (on a blocking
//! thread), embedded by the tier's batching worker (which shares forward passes between
//! concurrent requests), shortened to `dimensions`, encoded as floats or base64, and billed in
//! the usage ledger like chat completions. Also loading an embedding tier.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use ferrum_embed::{
    pooling, BatchOptions, EmbedHandle, Embedder, EmbedderOptions, InputProblem, ModelFiles,
    SubmitError,
};
use ferrum_protocol::embeddings::{EmbeddingList, MAX_REQUEST_TOKENS};
use ferrum_protocol::response::Usage;
use ferrum_protocol::{parse_embedding_request, ApiError, EmbeddingInput};
use ferrum_registry::{Tier, WeightsSource};

use crate::models::LoadedEmbedder;
use crate::{now, random_id, App, ServerError};

/// The endpoint's name in the usage ledger.
const ENDPOINT: &str = "embeddings";

pub async fn create(State(app): State<Arc<App>>, body: Bytes) -> Result<Response, ServerError> {
    let (json, usage, tier) = run(&app, &body).await?;
    let caller = crate::auth::Caller::current();
    app.record_usage(&caller, &random_id("emb-"), ENDPOINT, &tier, &usage, now())
        .await;
    Ok(([(header::CONTENT_TYPE, "application/json")], json).into_response())
}

/// An embeddings request run for a batch line: the response body and its usage, which the
/// batch worker records at the batch price.
pub(crate) async fn run_for_batch(
    app: &Arc<App>,
    body: &[u8],
) -> Result<(serde_json::Value, Usage), ServerError> {
    let (json, usage, _) = run(app, body).await?;
    let value = serde_json::from_slice(&json)
        .map_err(|e| ServerError::internal("reading back the embeddings", e))?;
    Ok((value, usage))
}

/// Parses, embeds and encodes one request: the JSON body, its usage and the tier that served it.
async fn run(app: &App, body: &[u8]) -> Result<(Vec<u8>, Usage, Tier), ServerError> {
    let req = parse_embedding_request(body)?;
    let loaded = app.models.get_embedder(&req.model).await?;
    let dimensions = check_dimensions(req.dimensions, loaded.handle.embedder().dimensions())?;
    let inputs = {
        let handle = Arc::clone(&loaded.handle);
        let input = req.input;
        tokio::task::spawn_blocking(move || tokenize(handle.embedder(), &input))
            .await
            .map_err(|e| ServerError::internal("tokenizing the input", e))??
    };
    let prompt_tokens = inputs.iter().map(Vec::len).sum::<usize>() as u64;
    let vectors = embed(app, &loaded, inputs).await?;
    tracing::debug!(user = ?req.user, inputs = vectors.len(), "embedded");
    // 2048 vectors make megabytes of JSON: encoded off the async threads too.
    let (model, format) = (loaded.tier.id.clone(), req.encoding_format);
    let json = tokio::task::spawn_blocking(move || {
        let vectors = vectors
            .into_iter()
            .map(|v| pooling::truncate(v, dimensions))
            .collect();
        serde_json::to_vec(&EmbeddingList::new(&model, vectors, format, prompt_tokens))
    })
    .await
    .map_err(|e| ServerError::internal("encoding the embeddings", e))?
    .map_err(|e| ServerError::internal("encoding the embeddings", e))?;
    Ok((json, Usage::new(prompt_tokens, 0, 0), loaded.tier.clone()))
}

/// The dimensions to return: the model's, or fewer as asked.
fn check_dimensions(asked: Option<usize>, model: usize) -> Result<usize, ApiError> {
    match asked {
        None => Ok(model),
        Some(d) if d <= model => Ok(d),
        Some(d) => Err(ApiError::invalid_param(
            "dimensions",
            "invalid_value",
            format!(
                "Invalid 'dimensions': {d}. This model's embeddings have {model} dimensions; \
                 ask for 1 to {model}."
            ),
        )),
    }
}

/// The tokens of each input (without the special tokens), each checked against the model, and
/// all of them together against the per-request limit. Inputs are never truncated.
fn tokenize(embedder: &Embedder, input: &EmbeddingInput) -> Result<Vec<Vec<u32>>, ServerError> {
    let inputs: Vec<Vec<u32>> = match input {
        EmbeddingInput::Text { texts, .. } => texts
            .iter()
            .map(|t| embedder.tokenize(t))
            .collect::<Result<_, _>>()
            .map_err(|e| ServerError::internal("tokenizing the input", e))?,
        EmbeddingInput::Tokens { inputs, .. } => inputs.clone(),
    };
    for (i, tokens) in inputs.iter().enumerate() {
        embedder
            .check(tokens)
            .map_err(|problem| input_error(&input.param(i), problem))?;
    }
    let total: usize = inputs.iter().map(Vec::len).sum();
    if total > MAX_REQUEST_TOKENS {
        return Err(ApiError::invalid_param(
            "input",
            "max_tokens_per_request",
            format!(
                "Invalid 'input': the inputs have {total} tokens together, more than the \
                 {MAX_REQUEST_TOKENS} tokens a request may have."
            ),
        )
        .into());
    }
    Ok(inputs)
}

fn input_error(param: &str, problem: InputProblem) -> ServerError {
    let error = match problem {
        InputProblem::TooLong { len, max } => ApiError::invalid_param(
            param,
            "context_length_exceeded",
            format!(
                "Invalid '{param}': this model's maximum input length is {max} tokens, but the \
                 input has {len} tokens. Inputs are never truncated: shorten or split it."
            ),
        ),
        InputProblem::OutOfVocabulary { id, vocab } => ApiError::invalid_param(
            param,
            "invalid_value",
            format!(
                "Invalid '{param}': token id {id} is outside the model's vocabulary (token ids \
                 are 0 to {}).",
                vocab - 1
            ),
        ),
    };
    error.into()
}

/// Embeds texts for another feature of the server (an eval's cosine similarity): their
/// vectors and how many tokens they had, unbilled (the caller bills them as it bills).
pub(crate) async fn embed_texts(
    app: &App,
    loaded: &LoadedEmbedder,
    texts: Vec<String>,
) -> Result<(Vec<Vec<f32>>, u64), ServerError> {
    let inputs = {
        let handle = Arc::clone(&loaded.handle);
        tokio::task::spawn_blocking(move || {
            texts
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    let tokens = handle
                        .embedder()
                        .tokenize(t)
                        .map_err(|e| ServerError::internal("tokenizing a text", e))?;
                    handle
                        .embedder()
                        .check(&tokens)
                        .map_err(|problem| input_error(&format!("text {i}"), problem))?;
                    Ok(tokens)
                })
                .collect::<Result<Vec<_>, ServerError>>()
        })
        .await
        .map_err(|e| ServerError::internal("tokenizing a text", e))??
    };
    let tokens = inputs.iter().map(Vec::len).sum::<usize>() as u64;
    Ok((embed(app, loaded, inputs).await?, tokens))
}

/// Queues the inputs on the tier's worker and waits for their vectors without holding a
/// runtime thread.
async fn embed(
    app: &App,
    loaded: &LoadedEmbedder,
    inputs: Vec<Vec<u32>>,
) -> Result<Vec<Vec<f32>>, ServerError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let reply = Box::new(move |result| {
        // A client that went away no longer waits for its vectors.
        let _ = tx.send(result);
    });
    loaded.handle.submit(inputs, reply).map_err(|e| match e {
        SubmitError::QueueFull(n) => {
            app.metrics
                .rejected_queue_full
                .fetch_add(1, Ordering::Relaxed);
            ApiError::queue_full(&loaded.tier.id, n)
        }
        SubmitError::Stopped => {
            ApiError::unavailable(format!("The model `{}` is shutting down.", loaded.tier.id))
        }
    })?;
    Ok(rx.await.map_err(|_| ServerError::EngineStopped)??)
}

/// Fetches an embedding tier's files if needed, loads the model and starts its worker (on a
/// blocking thread).
pub(crate) async fn load(tier: Tier, weights: WeightsSource) -> Result<LoadedEmbedder, ApiError> {
    let id = tier.id.clone();
    let max_positions = tier.context_length;
    let handle = tokio::task::spawn_blocking(move || load_blocking(&weights, max_positions))
        .await
        .map_err(|e| ApiError::internal(format!("loading `{id}` panicked: {e}")))??;
    tracing::info!(
        tier = %tier.id,
        path = %handle.embedder().path.display(),
        dimensions = handle.embedder().dimensions(),
        max_input_tokens = handle.embedder().max_input_tokens(),
        "embedding model ready"
    );
    Ok(LoadedEmbedder {
        tier,
        handle: Arc::new(handle),
    })
}

fn load_blocking(
    weights: &WeightsSource,
    max_positions: Option<usize>,
) -> Result<EmbedHandle, ApiError> {
    let progress = ferrum_registry::default_progress();
    let files =
        ferrum_registry::ensure_embedding_weights(weights, progress.as_ref()).map_err(|e| {
            ApiError::unavailable(format!("The model's weights are not available: {e}"))
        })?;
    let files = ModelFiles {
        weights: files.weights,
        tokenizer: files.tokenizer,
        config: files.config,
    };
    let embedder = Embedder::load(&files, &EmbedderOptions { max_positions })
        .map_err(|e| ApiError::unavailable(format!("The model could not be loaded: {e}")))?;
    EmbedHandle::spawn(embedder, BatchOptions::default())
        .map_err(|e| ApiError::internal(format!("could not start the embedding worker: {e}")))
}

#[cfg(test)]
mod tests {
    use super::check_dimensions;

    #[test]
    fn dimensions_default_to_the_models_and_may_only_shrink() {
        assert_eq!(check_dimensions(None, 384), Ok(384));
        assert_eq!(check_dimensions(Some(1), 384), Ok(1));
        assert_eq!(check_dimensions(Some(384), 384), Ok(384));
        let err = check_dimensions(Some(385), 384).unwrap_err();
        assert_eq!(
            (err.param.as_deref(), err.code.as_deref()),
            (Some("dimensions"), Some("invalid_value"))
        );
    }
}
