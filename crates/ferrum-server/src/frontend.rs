//! The frontend: turns a validated chat request into an engine request (chat template, tokens,
//! context check, sampling parameters) and engine events back into OpenAI responses. The HTTP
//! routes use it, and the batch runner will take the same path.

use std::sync::Arc;

use ferrum_engine::{
    ChatTemplate, Completion, Constraint, ConstraintError, FinishReason, GenerateParams,
    LoadedModel, PromptEmbeds, SamplingParams, TokenEvent, Tokenizer,
};
use ferrum_vision::{EncodedImage, Piece};

use crate::tools::{self, ToolMode};
use crate::ServerError;
use ferrum_protocol::chat::MAX_OUTPUT_TOKENS;
use ferrum_protocol::response::{ChoiceLogprobs, TokenLogprob, TopLogprob, Usage};
use ferrum_protocol::{image_marker, ApiError, ChatRequest, ResponseFormat};

/// A chat request ready for the engine.
pub struct Prepared {
    pub prompt: Vec<u32>,
    /// The embedding rows of the prompt's image tokens, when it has images.
    pub embeds: Option<Arc<PromptEmbeds>>,
    /// How many of the prompt's tokens are image tokens.
    pub image_tokens: usize,
    pub params: GenerateParams,
    pub tool_mode: ToolMode,
}

/// Renders the conversation with the model's chat template and tokenizes it, checks the
/// context window and builds the generation parameters. CPU work: run it off the async threads.
pub fn prepare(
    model: &LoadedModel,
    req: &ChatRequest,
    images: &[Arc<EncodedImage>],
) -> Result<Prepared, ServerError> {
    let mut messages: Vec<serde_json::Value> =
        req.messages.iter().map(|m| m.to_template()).collect();
    let tool_mode = tools::mode(req);
    let tool_list = tools::template_tools(req);
    let fallback;
    let template = match &model.template {
        Some(t) => t,
        None => {
            fallback = ChatTemplate::chatml(&model.tokenizer);
            &fallback
        }
    };
    let mut rendered_tools = None;
    if tool_mode != ToolMode::Off {
        if template.caps().supports_tools {
            rendered_tools = Some(&tool_list[..]);
        } else {
            // A template without tools: teach the call format in a system message.
            let prompt = tools::fallback_prompt(&tool_list);
            match messages.first_mut() {
                Some(first) if first["role"] == "system" => {
                    let text = format!("{}\n\n{prompt}", first["content"].as_str().unwrap_or(""));
                    first["content"] = text.into();
                }
                _ => messages.insert(0, serde_json::json!({"role": "system", "content": prompt})),
            }
        }
    }
    let text = template
        .render(&messages, rendered_tools, true)
        .map_err(|e| ApiError::invalid_param("messages", "invalid_value", e.to_string()))?;
    let (prompt, embeds, image_tokens) = if images.is_empty() {
        let prompt = model
            .tokenizer
            .encode(&text, false, true)
            .map_err(|e| ServerError::internal("tokenizing the prompt", e))?;
        (prompt, None, 0)
    } else {
        let (prompt, embeds, n) = splice_images(model, &text, images)?;
        (prompt, Some(Arc::new(embeds)), n)
    };
    let context = model.context_length;
    if prompt.len() >= context {
        return Err(ApiError::context_length_exceeded(context, prompt.len(), None).into());
    }
    let room = context - prompt.len();
    let max_tokens = match req.max_tokens {
        Some(m) if m as usize > room => {
            return Err(
                ApiError::context_length_exceeded(context, prompt.len(), Some(m as usize)).into(),
            )
        }
        Some(m) => m as usize,
        None => room.min(MAX_OUTPUT_TOKENS as usize),
    };
    let vocab = model.tokenizer.vocab_size();
    let logit_bias = req
        .logit_bias
        .iter()
        .map(|&(id, bias)| match u32::try_from(id) {
            Ok(id) if (id as usize) < vocab => Ok((id, bias)),
            _ => Err(ApiError::invalid_param(
                "logit_bias",
                "invalid_value",
                format!(
                    "Invalid key in 'logit_bias': token id {id} is outside this model's \
                     vocabulary (0..{vocab})."
                ),
            )),
        })
        .collect::<Result<Vec<_>, _>>()?;
    // The prediction as the model's tokens (plain text: special-token markup is not parsed).
    let prediction = match &req.prediction {
        Some(text) => model
            .tokenizer
            .encode(text, false, false)
            .map_err(|e| ServerError::internal("tokenizing the prediction", e))?,
        None => Vec::new(),
    };
    // Without a seed, sampling is random; with one it is reproducible, as OpenAI's best effort.
    let seed = req
        .seed
        .map(|s| s as u64)
        .or_else(|| (req.temperature > 0.0).then(rand::random::<u64>));
    Ok(Prepared {
        prompt,
        embeds,
        image_tokens,
        params: GenerateParams {
            max_tokens,
            stop: req.stop.clone(),
            sampling: SamplingParams {
                temperature: req.temperature,
                top_p: req.top_p,
                seed,
                presence_penalty: req.presence_penalty,
                frequency_penalty: req.frequency_penalty,
                logit_bias,
                logprobs: req.logprobs,
                top_logprobs: req.top_logprobs as usize,
            },
            ignore_eos: false,
            constraint: constraint(model, req, tool_mode)?,
            prediction,
        },
        tool_mode,
    })
}

/// The grammar `response_format` asks for, compiled for this model (here, off the engine
/// thread, so a schema's compile time never stalls the batch).
fn constraint(
    model: &LoadedModel,
    req: &ChatRequest,
    tool_mode: ToolMode,
) -> Result<Option<Constraint>, ServerError> {
    let factory = || {
        model
            .constraints()
            .map_err(|e| ServerError::internal("building the grammar compiler", e))
    };
    let tools_error = |e: ConstraintError| {
        ApiError::invalid_param(
            "tools",
            "invalid_function_parameters",
            format!("Invalid schema in 'tools': {e}"),
        )
    };
    if tool_mode == ToolMode::Forced {
        // A forced call: the output is the call, its arguments valid against the schema.
        let c = factory()?
            .json_schema(&tools::forced_schema(req))
            .map_err(tools_error)?;
        return Ok(Some(c));
    }
    match &req.response_format {
        // "auto" with tools: text, or calls that parse with valid arguments.
        ResponseFormat::Text if tool_mode == ToolMode::Auto => {
            let c = factory()?
                .text_or_calls(&tools::call_schema(req), tools::max_auto_calls(req))
                .map_err(tools_error)?;
            Ok(Some(c))
        }
        ResponseFormat::Text => Ok(None),
        ResponseFormat::JsonObject => {
            let mentions_json = req
                .messages
                .iter()
                .any(|m| m.content.to_ascii_lowercase().contains("json"));
            if !mentions_json {
                return Err(ApiError::invalid_param(
                    "messages",
                    "invalid_value",
                    "'messages' must contain the word 'json' in some form, to use \
                     'response_format' of type 'json_object'.",
                )
                .into());
            }
            let c = factory()?
                .json_object()
                .map_err(|e| ServerError::internal("compiling the JSON grammar", e))?;
            Ok(Some(c))
        }
        ResponseFormat::JsonSchema { name, schema, .. } => {
            let c = factory()?.json_schema(schema).map_err(|e| {
                ApiError::invalid_param(
                    "response_format.json_schema.schema",
                    "invalid_json_schema",
                    format!("Invalid schema for response_format '{name}': {e}"),
                )
            })?;
            Ok(Some(c))
        }
    }
}

/// The log-probability entry of one generated token, or `None` for events that carry no token
/// of the output (the end-of-generation token, the flush of held-back text).
pub fn token_logprob(tokenizer: &Tokenizer, ev: &TokenEvent) -> Option<TokenLogprob> {
    let logprob = ev.logprob?;
    if tokenizer.is_eog(ev.id) {
        return None;
    }
    let entry = |id: u32| (tokenizer.token_str(id), tokenizer.token_bytes(id).to_vec());
    let (token, bytes) = entry(ev.id);
    Some(TokenLogprob {
        token,
        logprob,
        bytes,
        top_logprobs: ev
            .top
            .iter()
            .map(|&(id, lp)| {
                let (token, bytes) = entry(id);
                TopLogprob {
                    token,
                    logprob: lp,
                    bytes,
                }
            })
            .collect(),
    })
}

pub fn logprobs_of(entries: Vec<TokenLogprob>) -> ChoiceLogprobs {
    ChoiceLogprobs {
        content: entries,
        refusal: None,
    }
}

pub fn finish_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Stop => "stop",
        FinishReason::Length | FinishReason::Cancelled => "length",
    }
}

/// The tokens of a rendered prompt with images: the text between image markers tokenized
/// piece by piece (as mtmd tokenizes around its media markers), each image's pieces in its
/// place (special tokens, and placeholder ids for its embedding rows). Returns the tokens, the
/// rows, and the number of image tokens.
pub(crate) fn splice_images(
    model: &LoadedModel,
    text: &str,
    images: &[Arc<EncodedImage>],
) -> Result<(Vec<u32>, PromptEmbeds, usize), ServerError> {
    let tok = &model.tokenizer;
    let encode = |s: &str| {
        tok.encode(s, false, true)
            .map_err(|e| ServerError::internal("tokenizing the prompt", e))
    };
    let segments: Vec<&str> = text.split(image_marker()).collect();
    if segments.len() != images.len() + 1 {
        return Err(ApiError::invalid_param(
            "messages",
            "invalid_value",
            format!(
                "The model's chat template placed {} of the request's {} images; it drops \
                 some messages' content.",
                segments.len() - 1,
                images.len()
            ),
        )
        .into());
    }
    let mut embeds = PromptEmbeds::new(model.model.cfg.d_model);
    let mut prompt = Vec::new();
    let mut image_tokens = 0;
    for (seg, img) in segments.iter().zip(images.iter().map(Some).chain([None])) {
        prompt.extend(encode(seg)?);
        let Some(img) = img else { break };
        for piece in &img.pieces {
            match piece {
                Piece::Text(t) => prompt.extend(encode(t)?),
                Piece::Token(t) => prompt.push(lookup_token(tok, t).ok_or_else(|| {
                    ServerError::internal(
                        "laying out an image",
                        format!(
                            "the vocabulary has no token {t:?}, which this vision projector needs"
                        ),
                    )
                })?),
                Piece::Image(i) => {
                    let mut key = img.key.to_vec();
                    key.extend((*i as u64).to_le_bytes());
                    let ids = embeds.push(&key, Arc::clone(&img.inputs[*i]));
                    image_tokens += ids.len();
                    prompt.extend(ids);
                }
            }
        }
    }
    Ok((prompt, embeds, image_tokens))
}

/// The first token whose text is exactly `text` (mtmd's `lookup_token`).
fn lookup_token(tok: &Tokenizer, text: &str) -> Option<u32> {
    (0..tok.vocab_size() as u32).find(|&id| tok.token_bytes(id) == text.as_bytes())
}

/// Usage of a whole request: the prompt counted once (as OpenAI does for `n` > 1), the cached
/// part as the first choice saw it, and every choice's generated tokens.
///
/// With a prediction, rejected predicted tokens are output tokens too (they were computed), as
/// OpenAI bills them: `completion_tokens` includes them and the details count both kinds.
pub fn usage_of<'a>(completions: impl IntoIterator<Item = &'a Completion>) -> Usage {
    let mut prompt = 0;
    let mut cached = 0;
    let mut generated = 0;
    let (mut accepted, mut rejected) = (0, 0);
    for (i, c) in completions.into_iter().enumerate() {
        if i == 0 {
            prompt = c.prompt_tokens as u64;
            cached = c.cached_tokens as u64;
        }
        generated += c.tokens.len() as u64;
        accepted += c.accepted_prediction_tokens as u64;
        rejected += c.rejected_prediction_tokens as u64;
    }
    let mut usage = Usage::new(prompt, cached, generated + rejected);
    usage.completion_tokens_details.accepted_prediction_tokens = accepted;
    usage.completion_tokens_details.rejected_prediction_tokens = rejected;
    usage
}
