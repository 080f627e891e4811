//! `POST /v1/chat/completions`: the request, validated into [`ChatRequest`].

use serde_json::{Map, Value};

use crate::error::ApiError;
use crate::reader::{invalid_type, invalid_value, missing, parse_object, Fields, Result};

/// The platform's limit on generated tokens per choice (GPT-4.1's).
pub const MAX_OUTPUT_TOKENS: u32 = 32_768;
/// Most stop sequences a request may give.
pub const MAX_STOP: usize = 4;
/// Most log-probabilities per position.
pub const MAX_TOP_LOGPROBS: u8 = 20;

/// Every member of the spec's `CreateChatCompletionRequest`. Anything else is rejected, as
/// OpenAI does (`Unrecognized request argument supplied`).
const KNOWN: &[&str] = &[
    "audio",
    "frequency_penalty",
    "function_call",
    "functions",
    "logit_bias",
    "logprobs",
    "max_completion_tokens",
    "max_tokens",
    "messages",
    "metadata",
    "modalities",
    "model",
    "moderation",
    "n",
    "parallel_tool_calls",
    "prediction",
    "presence_penalty",
    "prompt_cache_key",
    "prompt_cache_options",
    "prompt_cache_retention",
    "reasoning_effort",
    "response_format",
    "safety_identifier",
    "seed",
    "service_tier",
    "stop",
    "store",
    "stream",
    "stream_options",
    "temperature",
    "tool_choice",
    "tools",
    "top_logprobs",
    "top_p",
    "user",
    "verbosity",
    "web_search_options",
];

const ROLES: &[&str] = &[
    "system",
    "assistant",
    "user",
    "function",
    "tool",
    "developer",
];

/// Who wrote a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    System,
    Developer,
    User,
    Assistant,
    Tool,
}

impl Role {
    /// The role as chat templates know it: `developer` instructions are system instructions
    /// (OpenAI's own mapping for models before the o-series).
    pub fn template_role(self) -> &'static str {
        match self {
            Role::System | Role::Developer => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }
}

/// The text an image part leaves in its message's content, where the image's tokens go. As
/// llama-server's, it is random per process (`<__media_...__>`), so no client text can pass for
/// one.
pub fn image_marker() -> &'static str {
    use std::hash::{BuildHasher, Hasher};
    static MARKER: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    MARKER.get_or_init(|| {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        format!("<__media_{:016x}__>", h.finish())
    })
}

/// Joins a message's parts as llama-server does: text parts separated by newlines, but no
/// newline before or after an image marker.
pub(crate) fn join_parts(parts: &[(bool, String)]) -> String {
    let mut text = String::new();
    let mut after_marker = false;
    for (marker, part) in parts {
        if !marker && !after_marker && !text.is_empty() {
            text.push('\n');
        }
        after_marker = *marker;
        text.push_str(part);
    }
    text
}

/// Where an image comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImageSource {
    /// `https://...` or a `data:` URL.
    Url(String),
    /// A file uploaded to the Files API.
    FileId(String),
}

/// OpenAI's `detail` of an image.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ImageDetail {
    #[default]
    Auto,
    Low,
    High,
    Original,
}

impl ImageDetail {
    pub fn as_str(self) -> &'static str {
        match self {
            ImageDetail::Auto => "auto",
            ImageDetail::Low => "low",
            ImageDetail::High => "high",
            ImageDetail::Original => "original",
        }
    }

    pub(crate) fn parse_field(f: &Fields, key: &str) -> Result<ImageDetail> {
        Ok(match f.str(key)? {
            None | Some("auto") => ImageDetail::Auto,
            Some("low") => ImageDetail::Low,
            Some("high") => ImageDetail::High,
            Some("original") => ImageDetail::Original,
            Some(other) => {
                return Err(invalid_value(
                    &f.path_of(key),
                    other,
                    &["auto", "low", "high", "original"],
                ))
            }
        })
    }
}

/// An image part of a message, in content order (each left an [`image_marker`] in the text).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageInput {
    pub source: ImageSource,
    pub detail: ImageDetail,
    /// The part's place in the request (`messages[0].content[1]`), for errors.
    pub param: String,
}

/// One validated input message.
#[derive(Clone, Debug, PartialEq)]
pub struct Message {
    pub role: Role,
    /// The text content (text parts joined by newlines; an image part is an [`image_marker`]).
    pub content: String,
    /// The message's images, in order.
    pub images: Vec<ImageInput>,
    pub name: Option<String>,
    /// For `tool` messages: the call this message answers.
    pub tool_call_id: Option<String>,
    /// For `assistant` messages: the tool calls it made, as sent.
    pub tool_calls: Option<Value>,
}

impl Message {
    /// The message as the chat template sees it.
    pub fn to_template(&self) -> Value {
        let mut m = Map::new();
        m.insert("role".into(), self.role.template_role().into());
        m.insert("content".into(), self.content.clone().into());
        if let Some(n) = &self.name {
            m.insert("name".into(), n.clone().into());
        }
        if let Some(id) = &self.tool_call_id {
            m.insert("tool_call_id".into(), id.clone().into());
        }
        if let Some(calls) = &self.tool_calls {
            m.insert("tool_calls".into(), calls.clone());
        }
        Value::Object(m)
    }
}

/// A function the model may call (`tools[i].function`).
#[derive(Clone, Debug, PartialEq)]
pub struct Tool {
    pub name: String,
    pub description: Option<String>,
    /// JSON Schema of the arguments (an empty object schema when absent).
    pub parameters: Value,
    pub strict: bool,
}

impl Tool {
    /// The tool as chat templates and the OpenAI wire format show it.
    pub fn to_json(&self) -> Value {
        let mut function = Map::new();
        function.insert("name".into(), self.name.clone().into());
        if let Some(d) = &self.description {
            function.insert("description".into(), d.clone().into());
        }
        function.insert("parameters".into(), self.parameters.clone());
        serde_json::json!({"type": "function", "function": function})
    }
}

/// Whether and which tools the model must call (`tool_choice`).
#[derive(Clone, Debug, PartialEq)]
pub enum ToolChoice {
    None,
    Auto,
    Required,
    Function(String),
}

/// What the output must look like (`response_format`).
#[derive(Clone, Debug, PartialEq)]
pub enum ResponseFormat {
    Text,
    /// Any JSON object (JSON mode).
    JsonObject,
    /// JSON valid against a schema (Structured Outputs).
    JsonSchema {
        name: String,
        schema: Value,
        strict: bool,
    },
}

/// A validated chat completion request. Internal: not serializable on purpose; the wire types
/// stop at this crate.
#[derive(Clone, Debug, PartialEq)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<Message>,
    /// `max_completion_tokens`, else `max_tokens`; `None` = up to the context window (and
    /// [`MAX_OUTPUT_TOKENS`]).
    pub max_tokens: Option<u32>,
    /// Which field set `max_tokens`, for error messages.
    pub max_tokens_param: &'static str,
    pub temperature: f32,
    pub top_p: f32,
    pub n: u32,
    pub stop: Vec<String>,
    pub seed: Option<i64>,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// Token id (as sent, not yet checked against a vocabulary) and bias.
    pub logit_bias: Vec<(i64, f32)>,
    pub logprobs: bool,
    pub top_logprobs: u8,
    pub stream: bool,
    pub include_usage: bool,
    pub user: Option<String>,
    pub metadata: Option<Map<String, Value>>,
    pub store: bool,
    pub response_format: ResponseFormat,
    pub tools: Vec<Tool>,
    /// `none` when there are no tools; else as given (default `auto`).
    pub tool_choice: ToolChoice,
    pub parallel_tool_calls: bool,
    /// Predicted output (`prediction.content`, text parts joined): speeds up answers that
    /// repeat it, never changes them.
    pub prediction: Option<String>,
    pub service_tier: ServiceTier,
}

/// OpenAI's `service_tier`: how a request is scheduled and priced.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ServiceTier {
    /// `auto` or `default` (or absent): standard processing at the tier's price. `scale` and
    /// `fast` also land here: no scale-tier contract exists on this server.
    #[default]
    Default,
    /// Flex processing: the background queue, behind every client request, at the Batch API's
    /// price (half).
    Flex,
    /// Priority processing: admitted before every other request, at OpenAI's priority premium.
    Priority,
}

impl ServiceTier {
    /// The `service_tier` member of a request (chat completions or Responses).
    pub fn parse(f: &Fields) -> Result<ServiceTier> {
        let tier = f.choice(
            "service_tier",
            &["auto", "default", "flex", "scale", "priority", "fast"],
        )?;
        Ok(match tier {
            Some("flex") => ServiceTier::Flex,
            Some("priority") => ServiceTier::Priority,
            _ => ServiceTier::Default,
        })
    }

    /// What the response echoes: the tier the request actually ran at.
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceTier::Default => "default",
            ServiceTier::Flex => "flex",
            ServiceTier::Priority => "priority",
        }
    }

    /// The factor on the tier's token prices: flex at the Batch API's 50%, priority at
    /// OpenAI's GPT-4.1 priority prices (1.75x: $3.50 / $0.875 / $14.00 for gpt-4.1).
    pub fn price_factor(self) -> f64 {
        match self {
            ServiceTier::Default => 1.0,
            ServiceTier::Flex => 0.5,
            ServiceTier::Priority => 1.75,
        }
    }
}

/// Parses and validates a request body.
pub fn parse_chat_request(body: &[u8]) -> Result<ChatRequest> {
    let map = parse_object(body)?;
    ChatRequest::from_json(&map)
}

impl ChatRequest {
    pub fn from_json(map: &Map<String, Value>) -> Result<ChatRequest> {
        let f = Fields::new(map, "");
        f.deny_unknown(KNOWN)?;
        let model = f.required_str("model")?.to_string();
        let messages = parse_messages(&f)?;

        let (max_tokens, max_tokens_param) = max_tokens(&f)?;
        let temperature = f.decimal("temperature", 0.0, 2.0)?.unwrap_or(1.0) as f32;
        let top_p = f.decimal("top_p", 0.0, 1.0)?.unwrap_or(1.0) as f32;
        let n = f.integer("n", 1, 128)?.unwrap_or(1) as u32;
        let presence_penalty = f.decimal("presence_penalty", -2.0, 2.0)?.unwrap_or(0.0) as f32;
        let frequency_penalty = f.decimal("frequency_penalty", -2.0, 2.0)?.unwrap_or(0.0) as f32;
        let seed = f.integer("seed", i64::MIN, i64::MAX)?;
        let logprobs = f.bool("logprobs")?.unwrap_or(false);
        let top_logprobs = f.integer("top_logprobs", 0, MAX_TOP_LOGPROBS as i64)?;
        if top_logprobs.is_some_and(|k| k > 0) && !logprobs {
            return Err(ApiError::invalid_param(
                "top_logprobs",
                "invalid_value",
                "Invalid value for 'top_logprobs': 'logprobs' must be set to true when \
                 'top_logprobs' is used.",
            ));
        }
        let stream = f.bool("stream")?.unwrap_or(false);
        let include_usage = match f.object("stream_options")? {
            None => false,
            Some(_) if !stream => {
                return Err(ApiError::invalid_param(
                    "stream_options",
                    "invalid_value",
                    "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                ))
            }
            Some(o) => {
                o.bool("include_obfuscation")?;
                o.bool("include_usage")?.unwrap_or(false)
            }
        };
        let metadata = parse_metadata(&f)?;
        let tools = parse_tools(&f)?;
        let req = ChatRequest {
            model,
            messages,
            max_tokens,
            max_tokens_param,
            temperature,
            top_p,
            n,
            stop: parse_stop(&f)?,
            seed,
            presence_penalty,
            frequency_penalty,
            logit_bias: parse_logit_bias(&f)?,
            logprobs,
            top_logprobs: top_logprobs.unwrap_or(0) as u8,
            stream,
            include_usage,
            user: f.str("user")?.map(str::to_string),
            service_tier: ServiceTier::parse(&f)?,
            metadata,
            store: f.bool("store")?.unwrap_or(false),
            response_format: parse_response_format(&f)?,
            tool_choice: parse_tool_choice(&f, &tools)?,
            tools,
            parallel_tool_calls: f.bool("parallel_tool_calls")?.unwrap_or(true),
            prediction: parse_prediction(&f)?,
        };
        check_accepted_fields(&f)?;
        check_tool_messages(&req.messages)?;
        if req.prediction.is_some() && req.n > 1 {
            return Err(ApiError::invalid_param(
                "n",
                "invalid_value",
                "Predicted outputs do not support 'n' greater than 1.",
            ));
        }
        Ok(req)
    }
}

fn max_tokens(f: &Fields) -> Result<(Option<u32>, &'static str)> {
    for param in ["max_completion_tokens", "max_tokens"] {
        if let Some(v) = f.integer(param, 1, i64::MAX)? {
            if v > MAX_OUTPUT_TOKENS as i64 {
                return Err(ApiError::invalid_param(
                    param,
                    "invalid_value",
                    format!(
                        "{param} is too large: {v}. This model supports at most \
                         {MAX_OUTPUT_TOKENS} completion tokens, whereas you provided {v}."
                    ),
                ));
            }
            return Ok((Some(v as u32), param));
        }
    }
    Ok((None, "max_completion_tokens"))
}

/// Tool results answer the calls just before them, as OpenAI checks: a `tool` message follows
/// an assistant message with `tool_calls` (or another tool message) and names one of its call
/// ids, and every call of an assistant message is answered by the tool messages after it.
fn check_tool_messages(messages: &[Message]) -> Result<()> {
    let ids = |m: &Message| -> Vec<String> {
        m.tool_calls
            .as_ref()
            .and_then(Value::as_array)
            .map(|calls| {
                calls
                    .iter()
                    .filter_map(|c| c.get("id").and_then(Value::as_str).map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    // Each tool message first (a wrong id is named as such), then the unanswered calls.
    for (i, m) in messages.iter().enumerate() {
        if m.role != Role::Tool {
            continue;
        }
        let caller = messages[..i].iter().rev().find(|p| p.role != Role::Tool);
        let calls = caller
            .filter(|p| p.role == Role::Assistant)
            .map(ids)
            .unwrap_or_default();
        if calls.is_empty() {
            return Err(ApiError::invalid_request(
                "Invalid parameter: messages with role 'tool' must be a response to a \
                 preceeding message with 'tool_calls'.",
            )
            .with_param(format!("messages.[{i}].role")));
        }
        let id = m.tool_call_id.as_deref().unwrap_or_default();
        if !calls.iter().any(|c| c == id) {
            return Err(ApiError::invalid_request(format!(
                "Invalid parameter: 'tool_call_id' of '{id}' not found in 'tool_calls' of \
                 previous message."
            ))
            .with_param(format!("messages.[{i}].tool_call_id")));
        }
    }
    for (i, m) in messages.iter().enumerate() {
        if m.role != Role::Assistant {
            continue;
        }
        let answered: Vec<&str> = messages[i + 1..]
            .iter()
            .take_while(|n| n.role == Role::Tool)
            .filter_map(|n| n.tool_call_id.as_deref())
            .collect();
        let missing: Vec<String> = ids(m)
            .into_iter()
            .filter(|c| !answered.contains(&c.as_str()))
            .collect();
        if !missing.is_empty() {
            return Err(ApiError::invalid_request(format!(
                "An assistant message with 'tool_calls' must be followed by tool messages \
                 responding to each 'tool_call_id'. The following tool_call_ids did not have \
                 response messages: {}",
                missing.join(", ")
            ))
            .with_param(format!("messages.[{i}].role")));
        }
    }
    Ok(())
}

fn parse_messages(f: &Fields) -> Result<Vec<Message>> {
    let list = f.array("messages")?.ok_or_else(|| missing("messages"))?;
    if list.is_empty() {
        return Err(ApiError::invalid_param(
            "messages",
            "empty_array",
            "Invalid 'messages': empty array. Expected an array with minimum length 1, but got \
             an empty array instead.",
        ));
    }
    list.iter()
        .enumerate()
        .map(|(i, v)| parse_message(&format!("messages[{i}]"), v))
        .collect()
}

fn parse_message(path: &str, v: &Value) -> Result<Message> {
    let Value::Object(map) = v else {
        return Err(invalid_type(path, "an object", v));
    };
    let m = Fields::new(map, path);
    let role = match m.required_str("role")? {
        "system" => Role::System,
        "developer" => Role::Developer,
        "user" => Role::User,
        "assistant" => Role::Assistant,
        "tool" => Role::Tool,
        "function" => {
            return Err(ApiError::invalid_param(
                m.path_of("role"),
                "invalid_value",
                "The 'function' role is deprecated and not supported; use 'tool' messages.",
            ))
        }
        other => return Err(invalid_value(&m.path_of("role"), other, ROLES)),
    };
    let tool_calls = match m.get("tool_calls") {
        None => None,
        Some(Value::Array(a)) if role == Role::Assistant => Some(Value::Array(a.clone())),
        Some(Value::Array(_)) => {
            return Err(ApiError::invalid_param(
                m.path_of("tool_calls"),
                "invalid_value",
                "Only 'assistant' messages may have 'tool_calls'.",
            ))
        }
        Some(other) => return Err(invalid_type(&m.path_of("tool_calls"), "an array", other)),
    };
    let (content, images) = match m.get("content") {
        // An assistant message may carry only tool calls (or a refusal).
        None if role == Role::Assistant => (String::new(), Vec::new()),
        None => return Err(missing(&m.path_of("content"))),
        Some(Value::String(s)) => (s.clone(), Vec::new()),
        Some(Value::Array(parts)) => parse_parts(&m.path_of("content"), parts, role)?,
        Some(other) => {
            return Err(invalid_type(
                &m.path_of("content"),
                "a string or an array of content parts",
                other,
            ))
        }
    };
    let tool_call_id = m.str("tool_call_id")?.map(str::to_string);
    if role == Role::Tool && tool_call_id.is_none() {
        return Err(ApiError::invalid_param(
            m.path_of("tool_call_id"),
            "missing_required_parameter",
            format!(
                "Missing required parameter: '{}'. Messages with role 'tool' must answer a tool \
                 call.",
                m.path_of("tool_call_id")
            ),
        ));
    }
    Ok(Message {
        role,
        content,
        images,
        name: m.str("name")?.map(str::to_string),
        tool_call_id,
        tool_calls,
    })
}

/// Content parts: text, and images in user messages (left as an [`image_marker`] in the text,
/// whether the model reads images is the server's to say); audio and files are refused.
pub(crate) fn parse_parts(
    path: &str,
    parts: &[Value],
    role: Role,
) -> Result<(String, Vec<ImageInput>)> {
    let mut texts = Vec::with_capacity(parts.len());
    let mut images = Vec::new();
    for (i, part) in parts.iter().enumerate() {
        let p_path = format!("{path}[{i}]");
        let Value::Object(map) = part else {
            return Err(invalid_type(&p_path, "an object", part));
        };
        let p = Fields::new(map, p_path.as_str());
        let supported: &[&str] = match role {
            Role::User => &["text", "image_url", "input_audio", "file"],
            Role::Assistant => &["text", "refusal"],
            _ => &["text"],
        };
        match p.required_str("type")? {
            "text" => texts.push((false, p.required_str("text")?.to_string())),
            "refusal" if role == Role::Assistant => {
                p.required_str("refusal")?;
            }
            "image_url" if role == Role::User => {
                let image = p
                    .object("image_url")?
                    .ok_or_else(|| missing(&p.path_of("image_url")))?;
                let url = image.required_str("url")?;
                if url.is_empty() {
                    return Err(ApiError::invalid_param(
                        image.path_of("url"),
                        "invalid_value",
                        "Invalid image URL: the URL is empty.",
                    ));
                }
                images.push(ImageInput {
                    source: ImageSource::Url(url.to_string()),
                    detail: ImageDetail::parse_field(&image, "detail")?,
                    param: p_path.clone(),
                });
                texts.push((true, image_marker().to_string()));
            }
            t @ ("input_audio" | "file") if role == Role::User => {
                return Err(ApiError::invalid_param(
                    p.path_of("type"),
                    "unsupported_value",
                    format!("Content parts of type '{t}' are not supported by this model."),
                ))
            }
            other => return Err(invalid_value(&p.path_of("type"), other, supported)),
        }
    }
    Ok((join_parts(&texts), images))
}

fn parse_stop(f: &Fields) -> Result<Vec<String>> {
    let stops = match f.get("stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(list)) => {
            if list.len() > MAX_STOP {
                return Err(ApiError::invalid_param(
                    "stop",
                    "array_above_max_length",
                    format!(
                        "Invalid 'stop': array too long. Expected an array with maximum length \
                         {MAX_STOP}, but got an array with length {} instead.",
                        list.len()
                    ),
                ));
            }
            list.iter()
                .enumerate()
                .map(|(i, v)| match v {
                    Value::String(s) => Ok(s.clone()),
                    other => Err(invalid_type(&format!("stop[{i}]"), "a string", other)),
                })
                .collect::<Result<_>>()?
        }
        Some(other) => return Err(invalid_type("stop", "a string or an array", other)),
    };
    // An empty stop string would match everywhere; OpenAI ignores it.
    Ok(stops.into_iter().filter(|s| !s.is_empty()).collect())
}

fn parse_logit_bias(f: &Fields) -> Result<Vec<(i64, f32)>> {
    let Some(bias) = f.object("logit_bias")? else {
        return Ok(Vec::new());
    };
    let mut out = Vec::with_capacity(bias.map.len());
    for (key, value) in bias.map {
        let id: i64 = key.trim().parse().map_err(|_| {
            ApiError::invalid_param(
                "logit_bias",
                "invalid_value",
                format!(
                    "Invalid key in 'logit_bias': {key:?} is not a token id (keys must be \
                     integer token ids as strings)."
                ),
            )
        })?;
        let b = match value.as_f64() {
            Some(b) => b,
            None => {
                return Err(invalid_type(
                    &format!("logit_bias.{key}"),
                    "a number",
                    value,
                ))
            }
        };
        if !(-100.0..=100.0).contains(&b) {
            return Err(ApiError::invalid_param(
                "logit_bias",
                "invalid_value",
                format!(
                    "Invalid 'logit_bias' for token {key}: {b}. Bias values must be between \
                     -100 and 100."
                ),
            ));
        }
        out.push((id, b as f32));
    }
    Ok(out)
}

/// `[a-zA-Z0-9_-]{1,64}`, the rule for function and schema names.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

fn parse_tools(f: &Fields) -> Result<Vec<Tool>> {
    let Some(list) = f.array("tools")? else {
        return Ok(Vec::new());
    };
    if list.len() > 128 {
        return Err(ApiError::invalid_param(
            "tools",
            "array_above_max_length",
            format!(
                "Invalid 'tools': array too long. Expected an array with maximum length 128, but \
                 got an array with length {} instead.",
                list.len()
            ),
        ));
    }
    parse_tool_list(list, |t, tools| {
        match t.required_str("type")? {
            "function" => {}
            other => return Err(invalid_value(&t.path_of("type"), other, &["function"])),
        }
        let func = t
            .object("function")?
            .ok_or_else(|| missing(&t.path_of("function")))?;
        parse_function(&func, tools, false)
    })
}

/// The tools of a `tools` array, each read by `one` (given its object and the tools before it).
pub(crate) fn parse_tool_list(
    list: &[Value],
    mut one: impl FnMut(&Fields, &[Tool]) -> Result<Tool>,
) -> Result<Vec<Tool>> {
    let mut tools: Vec<Tool> = Vec::with_capacity(list.len());
    for (i, v) in list.iter().enumerate() {
        let path = format!("tools[{i}]");
        let Value::Object(map) = v else {
            return Err(invalid_type(&path, "an object", v));
        };
        let tool = one(&Fields::new(map, path.as_str()), &tools)?;
        tools.push(tool);
    }
    Ok(tools)
}

/// One function definition: `tools[i].function` here, the tool object itself in the Responses
/// API (where `strict` defaults to true). `tools` are those defined before it.
pub(crate) fn parse_function(func: &Fields, tools: &[Tool], strict_default: bool) -> Result<Tool> {
    let name = func.required_str("name")?;
    if !valid_name(name) {
        return Err(ApiError::invalid_param(
            func.path_of("name"),
            "invalid_value",
            format!(
                "Invalid '{}': {name:?}. Function names contain only a-z, A-Z, 0-9, \
                 underscores and dashes, at most 64 characters.",
                func.path_of("name")
            ),
        ));
    }
    if tools.iter().any(|other| other.name == name) {
        return Err(ApiError::invalid_param(
            func.path_of("name"),
            "invalid_value",
            format!("Duplicate function name {name:?} in 'tools'."),
        ));
    }
    let parameters = match func.object("parameters")? {
        Some(p) => Value::Object(p.map.clone()),
        None => serde_json::json!({"type": "object", "properties": {}}),
    };
    Ok(Tool {
        name: name.to_string(),
        description: func.str("description")?.map(str::to_string),
        parameters,
        strict: func.bool("strict")?.unwrap_or(strict_default),
    })
}

fn parse_tool_choice(f: &Fields, tools: &[Tool]) -> Result<ToolChoice> {
    let default = if tools.is_empty() {
        ToolChoice::None
    } else {
        ToolChoice::Auto
    };
    let choice = read_tool_choice(f, false)?.unwrap_or(default);
    check_tool_choice(choice, tools)
}

/// `tool_choice` as given (`None` when absent): a mode, or a named function
/// (`{"type": "function", "function": {"name"}}` here, `{"type": "function", "name"}` flat in
/// the Responses API).
pub(crate) fn read_tool_choice(f: &Fields, flat: bool) -> Result<Option<ToolChoice>> {
    Ok(Some(match f.get("tool_choice") {
        None => return Ok(None),
        Some(Value::String(s)) => match s.as_str() {
            "none" => ToolChoice::None,
            "auto" => ToolChoice::Auto,
            "required" => ToolChoice::Required,
            other => {
                return Err(invalid_value(
                    "tool_choice",
                    other,
                    &["none", "auto", "required"],
                ))
            }
        },
        Some(Value::Object(map)) => {
            let c = Fields::new(map, "tool_choice");
            match c.required_str("type")? {
                "function" => {}
                other => return Err(invalid_value(&c.path_of("type"), other, &["function"])),
            }
            let name = if flat {
                c.required_str("name")?
            } else {
                c.object("function")?
                    .ok_or_else(|| missing(&c.path_of("function")))?
                    .required_str("name")?
            };
            ToolChoice::Function(name.to_string())
        }
        Some(other) => return Err(invalid_type("tool_choice", "a string or an object", other)),
    }))
}

/// A tool choice must name a defined function, and needs tools unless it is `none`/`auto`.
pub(crate) fn check_tool_choice(choice: ToolChoice, tools: &[Tool]) -> Result<ToolChoice> {
    match &choice {
        ToolChoice::Required | ToolChoice::Function(_) if tools.is_empty() => {
            Err(ApiError::invalid_param(
                "tool_choice",
                "invalid_value",
                "Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' are \
                 specified.",
            ))
        }
        ToolChoice::Function(name) if !tools.iter().any(|t| &t.name == name) => {
            Err(ApiError::invalid_param(
                "tool_choice",
                "invalid_value",
                format!("Invalid 'tool_choice': no function named {name:?} in 'tools'."),
            ))
        }
        _ => Ok(choice),
    }
}

fn parse_response_format(f: &Fields) -> Result<ResponseFormat> {
    let Some(rf) = f.object("response_format")? else {
        return Ok(ResponseFormat::Text);
    };
    match rf.required_str("type")? {
        "text" => Ok(ResponseFormat::Text),
        "json_object" => Ok(ResponseFormat::JsonObject),
        "json_schema" => {
            let js = rf
                .object("json_schema")?
                .ok_or_else(|| missing(&rf.path_of("json_schema")))?;
            parse_json_schema(&js)
        }
        other => Err(invalid_value(
            &rf.path_of("type"),
            other,
            &["text", "json_object", "json_schema"],
        )),
    }
}

/// A JSON Schema output format: `response_format.json_schema` here, `text.format` itself in
/// the Responses API.
pub(crate) fn parse_json_schema(js: &Fields) -> Result<ResponseFormat> {
    let name = js.required_str("name")?;
    if !valid_name(name) {
        return Err(ApiError::invalid_param(
            js.path_of("name"),
            "invalid_value",
            format!(
                "Invalid '{}': {name:?}. Names contain only a-z, A-Z, 0-9, underscores \
                 and dashes, at most 64 characters.",
                js.path_of("name")
            ),
        ));
    }
    js.str("description")?;
    let schema = match js.object("schema")? {
        Some(o) => Value::Object(o.map.clone()),
        // OpenAI's default: an empty schema (any JSON).
        None => Value::Object(Map::new()),
    };
    Ok(ResponseFormat::JsonSchema {
        name: name.to_string(),
        schema,
        strict: js.bool("strict")?.unwrap_or(false),
    })
}

/// `prediction`: `{"type": "content", "content": string or text parts}`.
fn parse_prediction(f: &Fields) -> Result<Option<String>> {
    let Some(p) = f.object("prediction")? else {
        return Ok(None);
    };
    match p.required_str("type")? {
        "content" => {}
        other => return Err(invalid_value(&p.path_of("type"), other, &["content"])),
    }
    match p.required("content")? {
        Value::String(s) => Ok(Some(s.clone())),
        Value::Array(parts) => {
            parse_parts(&p.path_of("content"), parts, Role::Assistant).map(|(t, _)| Some(t))
        }
        other => Err(invalid_type(
            &p.path_of("content"),
            "a string or an array of text parts",
            other,
        )),
    }
}

pub fn parse_metadata(f: &Fields) -> Result<Option<Map<String, Value>>> {
    let Some(m) = f.object("metadata")? else {
        return Ok(None);
    };
    if m.map.len() > 16 {
        return Err(ApiError::invalid_param(
            "metadata",
            "object_above_max_properties",
            format!(
                "Invalid 'metadata': too many properties. Expected an object with at most 16 \
                 properties, but got an object with {} properties instead.",
                m.map.len()
            ),
        ));
    }
    for (k, v) in m.map {
        if k.chars().count() > 64 {
            return Err(ApiError::invalid_param(
                "metadata",
                "invalid_value",
                format!("Invalid 'metadata': key {k:?} is longer than 64 characters."),
            ));
        }
        match v {
            Value::String(s) if s.chars().count() <= 512 => {}
            Value::String(_) => {
                return Err(ApiError::invalid_param(
                    format!("metadata.{k}"),
                    "string_above_max_length",
                    format!("Invalid 'metadata.{k}': string longer than 512 characters."),
                ))
            }
            other => return Err(invalid_type(&format!("metadata.{k}"), "a string", other)),
        }
    }
    Ok(Some(m.map.clone()))
}

/// Fields of the spec that are read for their type only, or refused because this platform does
/// not do what they ask (yet); the message says which, so nothing is silently ignored that would
/// change the output.
fn check_accepted_fields(f: &Fields) -> Result<()> {
    f.choice("verbosity", &["low", "medium", "high"])?;
    f.bool("parallel_tool_calls")?;
    f.str("prompt_cache_key")?;
    f.str("safety_identifier")?;
    f.choice("prompt_cache_retention", &["in_memory", "in-memory", "24h"])?;
    if let Some(modalities) = f.array("modalities")? {
        for (i, m) in modalities.iter().enumerate() {
            match m.as_str() {
                Some("text") => {}
                Some(other) => {
                    return Err(ApiError::invalid_param(
                        format!("modalities[{i}]"),
                        "unsupported_value",
                        format!("This model does not support the '{other}' output modality."),
                    ))
                }
                None => return Err(invalid_type(&format!("modalities[{i}]"), "a string", m)),
            }
        }
    }
    // The deprecated `functions` API: tools replaced it; only "none" (nothing to call) passes.
    let calls_allowed = f.get("function_call").and_then(Value::as_str) != Some("none");
    if f.get("functions").is_some_and(|v| !is_empty_list(v)) && calls_allowed {
        return Err(unsupported(
            "functions",
            "The deprecated 'functions' parameter is not supported; use 'tools'.",
        ));
    }
    for (param, what) in [
        ("audio", "Audio output"),
        ("web_search_options", "Web search"),
    ] {
        if f.get(param).is_some() {
            return Err(unsupported(
                param,
                &format!("{what} is not supported by this model."),
            ));
        }
    }
    if f.get("reasoning_effort").is_some() {
        return Err(unsupported(
            "reasoning_effort",
            "Unsupported parameter: 'reasoning_effort' is not supported with this model.",
        ));
    }
    Ok(())
}

fn is_empty_list(v: &Value) -> bool {
    v.as_array().is_some_and(|a| a.is_empty())
}

pub(crate) fn unsupported(param: &str, message: &str) -> ApiError {
    ApiError::invalid_param(param, "unsupported_parameter", message)
}
