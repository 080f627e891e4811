//! `POST /v1/responses`: the request, validated into [`ResponsesRequest`], and the input items
//! (as sent, or as stored from earlier responses) turned into chat messages.

use serde_json::{json, Map, Value};

use crate::chat::{
    check_tool_choice, image_marker, join_parts, parse_function, parse_json_schema, parse_metadata,
    parse_tool_list, read_tool_choice, unsupported, ImageDetail, ImageInput, ImageSource,
    ResponseFormat, Role, ServiceTier, Tool, ToolChoice, MAX_TOP_LOGPROBS,
};
use crate::error::ApiError;
use crate::reader::{invalid_type, invalid_value, missing, parse_object, Fields, Result};
use crate::Message;

/// Every member of the spec's `CreateResponse`; anything else is refused.
const KNOWN: &[&str] = &[
    "background",
    "context_management",
    "conversation",
    "include",
    "input",
    "instructions",
    "max_output_tokens",
    "max_tool_calls",
    "metadata",
    "model",
    "moderation",
    "parallel_tool_calls",
    "previous_response_id",
    "prompt",
    "prompt_cache_key",
    "prompt_cache_options",
    "prompt_cache_retention",
    "reasoning",
    "safety_identifier",
    "service_tier",
    "store",
    "stream",
    "stream_options",
    "temperature",
    "text",
    "tool_choice",
    "tools",
    "top_logprobs",
    "top_p",
    "truncation",
    "user",
];

/// OpenAI's smallest `max_output_tokens`.
pub const MIN_OUTPUT_TOKENS: u32 = 16;

/// One item of a conversation: what `input` lists, and what earlier responses stored.
#[derive(Clone, Debug, PartialEq)]
pub enum Item {
    Message {
        role: Role,
        text: String,
        /// `input_image` parts, in order (each left an [`image_marker`] in `text`).
        images: Vec<ImageInput>,
    },
    FunctionCall {
        call_id: String,
        name: String,
        arguments: String,
    },
    FunctionCallOutput {
        call_id: String,
        output: String,
    },
}

/// A user message's text and images as `input_text` and `input_image` parts, in order.
fn image_parts(text: &str, images: &[ImageInput]) -> Vec<Value> {
    let mut out = Vec::new();
    let segments: Vec<&str> = text.split(image_marker()).collect();
    let last = segments.len() - 1;
    for (i, seg) in segments.iter().enumerate() {
        if !seg.is_empty() {
            out.push(json!({"type": "input_text", "text": seg}));
        }
        if let Some(img) = images.get(i).filter(|_| i < last) {
            let mut part = json!({"type": "input_image", "detail": img.detail.as_str()});
            match &img.source {
                ImageSource::Url(u) => {
                    part["image_url"] = u.clone().into();
                    part["file_id"] = Value::Null;
                }
                ImageSource::FileId(f) => {
                    part["file_id"] = f.clone().into();
                    part["image_url"] = Value::Null;
                }
            }
            out.push(part);
        }
    }
    out
}

impl Item {
    /// The item as the API shows it (`input_items`, `output`), with its id.
    pub fn to_json(&self, id: &str) -> Value {
        match self {
            Item::Message { role, text, images } => {
                let (role, part) = match role {
                    Role::Assistant => ("assistant", "output_text"),
                    Role::System => ("system", "input_text"),
                    Role::Developer => ("developer", "input_text"),
                    Role::User | Role::Tool => ("user", "input_text"),
                };
                let content = if images.is_empty() {
                    let mut content = json!({"type": part, "text": text});
                    if part == "output_text" {
                        content["annotations"] = json!([]);
                        content["logprobs"] = json!([]);
                    }
                    vec![content]
                } else {
                    image_parts(text, images)
                };
                json!({
                    "id": id,
                    "type": "message",
                    "role": role,
                    "status": "completed",
                    "content": content,
                })
            }
            Item::FunctionCall {
                call_id,
                name,
                arguments,
            } => json!({
                "id": id,
                "type": "function_call",
                "call_id": call_id,
                "name": name,
                "arguments": arguments,
                "status": "completed",
            }),
            Item::FunctionCallOutput { call_id, output } => json!({
                "id": id,
                "type": "function_call_output",
                "call_id": call_id,
                "output": output,
                "status": "completed",
            }),
        }
    }

    /// The id prefix of this kind of item.
    pub fn id_prefix(&self) -> &'static str {
        match self {
            Item::Message { .. } => "msg_",
            Item::FunctionCall { .. } => "fc_",
            Item::FunctionCallOutput { .. } => "fco_",
        }
    }
}

/// A validated `POST /v1/responses` body. Internal, like [`crate::ChatRequest`].
#[derive(Clone, Debug)]
pub struct ResponsesRequest {
    pub model: String,
    pub input: Vec<Item>,
    pub instructions: Option<String>,
    pub max_output_tokens: Option<u32>,
    pub temperature: f32,
    pub top_p: f32,
    pub tools: Vec<Tool>,
    pub tool_choice: ToolChoice,
    pub parallel_tool_calls: bool,
    pub format: ResponseFormat,
    pub previous_response_id: Option<String>,
    pub store: bool,
    pub metadata: Option<Map<String, Value>>,
    /// `truncation: "auto"`: drop the oldest items when the conversation is too long.
    pub truncate: bool,
    pub background: bool,
    pub stream: bool,
    pub top_logprobs: u8,
    /// `include` has `message.output_text.logprobs`: output text parts carry their tokens'
    /// log-probabilities (with `top_logprobs` alternatives each).
    pub output_logprobs: bool,
    pub user: Option<String>,
    pub service_tier: ServiceTier,
    /// The request's `tools`, `tool_choice` and `text` as the response object echoes them.
    pub echo: Echo,
}

/// Request settings the response object repeats.
#[derive(Clone, Debug)]
pub struct Echo {
    pub tools: Value,
    pub tool_choice: Value,
    pub text: Value,
}

pub fn parse_responses_request(body: &[u8]) -> Result<ResponsesRequest> {
    let map = parse_object(body)?;
    let f = Fields::new(&map, "");
    f.deny_unknown(KNOWN)?;
    let model = f.required_str("model")?.to_string();
    let input = match f.get("input") {
        None => return Err(missing("input")),
        Some(Value::String(s)) => vec![Item::Message {
            role: Role::User,
            text: s.clone(),
            images: Vec::new(),
        }],
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, v)| parse_item(&format!("input[{i}]"), v))
            .collect::<Result<Vec<_>>>()?,
        Some(other) => {
            return Err(invalid_type(
                "input",
                "a string or an array of items",
                other,
            ))
        }
    };
    let max_output_tokens = f
        .integer(
            "max_output_tokens",
            i64::from(MIN_OUTPUT_TOKENS),
            i64::from(crate::chat::MAX_OUTPUT_TOKENS),
        )?
        .map(|n| n as u32);
    let temperature = f.decimal("temperature", 0.0, 2.0)?.unwrap_or(1.0) as f32;
    let top_p = f.decimal("top_p", 0.0, 1.0)?.unwrap_or(1.0) as f32;
    let tools = parse_tools(&f)?;
    let tool_choice = parse_tool_choice(&f, &tools)?;
    let (format, text) = parse_text(&f)?;
    let truncate = matches!(f.choice("truncation", &["auto", "disabled"])?, Some("auto"));
    let store = f.bool("store")?.unwrap_or(true);
    let background = f.bool("background")?.unwrap_or(false);
    if background && !store {
        return Err(ApiError::invalid_param(
            "background",
            "invalid_value",
            "Background responses must be stored: 'background' requires 'store' to be true.",
        ));
    }
    let top_logprobs = f
        .integer("top_logprobs", 0, i64::from(MAX_TOP_LOGPROBS))?
        .unwrap_or(0) as u8;
    let mut output_logprobs = false;
    for (i, v) in f.array("include")?.into_iter().flatten().enumerate() {
        match v.as_str() {
            Some(s) => output_logprobs |= s == "message.output_text.logprobs",
            None => return Err(invalid_type(&format!("include[{i}]"), "a string", v)),
        }
    }
    check_unsupported(&f)?;
    if let Some(id) = f.str("previous_response_id")? {
        if id.is_empty() {
            return Err(ApiError::invalid_param(
                "previous_response_id",
                "invalid_value",
                "Invalid 'previous_response_id': empty string.",
            ));
        }
    }
    Ok(ResponsesRequest {
        model,
        input,
        instructions: f.str("instructions")?.map(str::to_string),
        max_output_tokens,
        temperature,
        top_p,
        echo: Echo {
            tools: Value::Array(tools.iter().map(tool_json).collect()),
            tool_choice: match &tool_choice {
                ToolChoice::None => json!("none"),
                ToolChoice::Auto => json!("auto"),
                ToolChoice::Required => json!("required"),
                ToolChoice::Function(name) => json!({"type": "function", "name": name}),
            },
            text,
        },
        tools,
        tool_choice,
        parallel_tool_calls: f.bool("parallel_tool_calls")?.unwrap_or(true),
        format,
        previous_response_id: f.str("previous_response_id")?.map(str::to_string),
        store,
        metadata: parse_metadata(&f)?,
        truncate,
        background,
        stream: f.bool("stream")?.unwrap_or(false),
        top_logprobs,
        output_logprobs,
        user: f.str("user")?.map(str::to_string),
        service_tier: ServiceTier::parse(&f)?,
    })
}

/// A function tool as the response object shows it.
fn tool_json(t: &Tool) -> Value {
    json!({
        "type": "function",
        "name": t.name,
        "description": t.description,
        "parameters": t.parameters,
        "strict": t.strict,
    })
}

/// One input item: a message (`type: "message"` or just a `role`), a function call the model
/// made earlier, or a function call's output.
pub fn parse_item(path: &str, v: &Value) -> Result<Item> {
    let Value::Object(map) = v else {
        return Err(invalid_type(path, "an object", v));
    };
    let it = Fields::new(map, path);
    let kind = match it.str("type")? {
        Some(k) => k,
        None if it.get("role").is_some() => "message",
        None => return Err(missing(&it.path_of("type"))),
    };
    match kind {
        "message" => {
            let role = match it.required_str("role")? {
                "user" => Role::User,
                "assistant" => Role::Assistant,
                "system" => Role::System,
                "developer" => Role::Developer,
                other => {
                    return Err(invalid_value(
                        &it.path_of("role"),
                        other,
                        &["user", "assistant", "system", "developer"],
                    ))
                }
            };
            let (text, images) = match it.get("content") {
                None => return Err(missing(&it.path_of("content"))),
                Some(Value::String(s)) => (s.clone(), Vec::new()),
                Some(Value::Array(parts)) => parse_parts(&it.path_of("content"), parts)?,
                Some(other) => {
                    return Err(invalid_type(
                        &it.path_of("content"),
                        "a string or an array of content parts",
                        other,
                    ))
                }
            };
            if !images.is_empty() && role != Role::User {
                return Err(ApiError::invalid_param(
                    it.path_of("content"),
                    "invalid_value",
                    "Image inputs are only allowed in messages with role 'user'.",
                ));
            }
            Ok(Item::Message { role, text, images })
        }
        "function_call" => Ok(Item::FunctionCall {
            call_id: it.required_str("call_id")?.to_string(),
            name: it.required_str("name")?.to_string(),
            arguments: it.required_str("arguments")?.to_string(),
        }),
        "function_call_output" => {
            let output = match it.get("output") {
                None => return Err(missing(&it.path_of("output"))),
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => parse_parts(&it.path_of("output"), parts)?.0,
                Some(other) => return Err(invalid_type(&it.path_of("output"), "a string", other)),
            };
            Ok(Item::FunctionCallOutput {
                call_id: it.required_str("call_id")?.to_string(),
                output,
            })
        }
        t @ ("reasoning"
        | "item_reference"
        | "image_generation_call"
        | "file_search_call"
        | "web_search_call"
        | "computer_call"
        | "computer_call_output"
        | "code_interpreter_call"
        | "local_shell_call"
        | "local_shell_call_output"
        | "mcp_call"
        | "mcp_list_tools"
        | "mcp_approval_request"
        | "mcp_approval_response"
        | "custom_tool_call"
        | "custom_tool_call_output") => Err(ApiError::invalid_param(
            it.path_of("type"),
            "unsupported_value",
            format!("Input items of type '{t}' are not supported by this server."),
        )),
        other => Err(invalid_value(
            &it.path_of("type"),
            other,
            &["message", "function_call", "function_call_output"],
        )),
    }
}

/// Text parts (`input_text`, `output_text`, `text`) and images (`input_image`, by URL or
/// `file_id`, left as an [`image_marker`] in the text); files and audio are refused clearly.
fn parse_parts(path: &str, parts: &[Value]) -> Result<(String, Vec<ImageInput>)> {
    let mut texts = Vec::with_capacity(parts.len());
    let mut images = Vec::new();
    for (i, part) in parts.iter().enumerate() {
        let p_path = format!("{path}[{i}]");
        let Value::Object(map) = part else {
            return Err(invalid_type(&p_path, "an object", part));
        };
        let p = Fields::new(map, p_path.as_str());
        match p.required_str("type")? {
            "input_text" | "output_text" | "text" => {
                texts.push((false, p.required_str("text")?.to_string()))
            }
            "refusal" => texts.push((false, p.required_str("refusal")?.to_string())),
            "input_image" => {
                let url = p.str("image_url")?.filter(|u| !u.is_empty());
                let file = p.str("file_id")?.filter(|u| !u.is_empty());
                let source = match (url, file) {
                    (Some(u), None) => ImageSource::Url(u.to_string()),
                    (None, Some(f)) => ImageSource::FileId(f.to_string()),
                    (Some(_), Some(_)) => {
                        return Err(ApiError::invalid_param(
                            p.path_of("file_id"),
                            "invalid_value",
                            "An input_image takes either 'image_url' or 'file_id', not both.",
                        ))
                    }
                    (None, None) => {
                        return Err(ApiError::invalid_param(
                            p.path_of("image_url"),
                            "missing_required_parameter",
                            "An input_image needs an 'image_url' or a 'file_id'.",
                        ))
                    }
                };
                images.push(ImageInput {
                    source,
                    detail: ImageDetail::parse_field(&p, "detail")?,
                    param: p_path.clone(),
                });
                texts.push((true, image_marker().to_string()));
            }
            t @ ("input_file" | "input_audio") => {
                return Err(ApiError::invalid_param(
                    p.path_of("type"),
                    "unsupported_value",
                    format!("Content parts of type '{t}' are not supported by this model."),
                ))
            }
            other => {
                return Err(invalid_value(
                    &p.path_of("type"),
                    other,
                    &["input_text", "output_text", "input_image", "input_file"],
                ))
            }
        }
    }
    Ok((join_parts(&texts), images))
}

fn parse_tools(f: &Fields) -> Result<Vec<Tool>> {
    let Some(list) = f.array("tools")? else {
        return Ok(Vec::new());
    };
    parse_tool_list(list, |t, tools| match t.required_str("type")? {
        "function" => parse_function(t, tools, true),
        other => Err(ApiError::invalid_param(
            t.path_of("type"),
            "unsupported_value",
            format!("Tools of type '{other}' are not supported by this server; use 'function'."),
        )),
    })
}

/// `tool_choice`, by default `auto` (which calls nothing when there are no tools).
fn parse_tool_choice(f: &Fields, tools: &[Tool]) -> Result<ToolChoice> {
    let choice = read_tool_choice(f, true)?.unwrap_or(ToolChoice::Auto);
    check_tool_choice(choice, tools)
}

/// `text.format`: text, JSON mode or a JSON Schema (whose fields sit on the format itself).
/// Returns the format and the `text` object the response echoes.
fn parse_text(f: &Fields) -> Result<(ResponseFormat, Value)> {
    let Some(text) = f.object("text")? else {
        return Ok((ResponseFormat::Text, json!({"format": {"type": "text"}})));
    };
    text.choice("verbosity", &["low", "medium", "high"])?;
    let Some(format) = text.object("format")? else {
        return Ok((ResponseFormat::Text, json!({"format": {"type": "text"}})));
    };
    let parsed = match format.required_str("type")? {
        "text" => ResponseFormat::Text,
        "json_object" => ResponseFormat::JsonObject,
        "json_schema" => parse_json_schema(&format)?,
        other => {
            return Err(invalid_value(
                &format.path_of("type"),
                other,
                &["text", "json_object", "json_schema"],
            ))
        }
    };
    let mut echo = Value::Object(format.map.clone());
    if let ResponseFormat::JsonSchema { strict, .. } = &parsed {
        echo["strict"] = Value::Bool(*strict);
    }
    Ok((parsed, json!({"format": echo})))
}

fn check_unsupported(f: &Fields) -> Result<()> {
    f.str("prompt_cache_key")?;
    f.str("safety_identifier")?;
    f.integer("max_tool_calls", 1, i64::MAX)?;
    if f.get("conversation").is_some_and(|v| !v.is_null()) {
        return Err(unsupported(
            "conversation",
            "Conversations are not supported by this server; chain responses with \
             'previous_response_id'.",
        ));
    }
    if f.get("prompt").is_some_and(|v| !v.is_null()) {
        return Err(unsupported(
            "prompt",
            "Prompt templates are not supported by this server.",
        ));
    }
    if let Some(r) = f.object("reasoning")? {
        if r.get("effort").is_some_and(|v| !v.is_null()) {
            return Err(unsupported(
                "reasoning.effort",
                "Unsupported parameter: 'reasoning.effort' is not supported with this model.",
            ));
        }
    }
    Ok(())
}

/// The chat messages of a conversation: `instructions` first (as a system message), then the
/// items in order. Consecutive function calls become one assistant message with several tool
/// calls, as chat templates expect.
pub fn to_messages(instructions: Option<&str>, items: &[Item]) -> Vec<Message> {
    let mut out = Vec::with_capacity(items.len() + 1);
    if let Some(text) = instructions {
        out.push(Message {
            role: Role::System,
            content: text.to_string(),
            images: Vec::new(),
            name: None,
            tool_call_id: None,
            tool_calls: None,
        });
    }
    for item in items {
        match item {
            Item::Message { role, text, images } => out.push(Message {
                role: *role,
                content: text.clone(),
                images: images.clone(),
                name: None,
                tool_call_id: None,
                tool_calls: None,
            }),
            Item::FunctionCall {
                call_id,
                name,
                arguments,
            } => {
                let call = json!({
                    "id": call_id,
                    "type": "function",
                    "function": {"name": name, "arguments": arguments},
                });
                match out.last_mut() {
                    Some(Message {
                        role: Role::Assistant,
                        tool_calls: Some(Value::Array(calls)),
                        ..
                    }) => calls.push(call),
                    _ => out.push(Message {
                        role: Role::Assistant,
                        content: String::new(),
                        images: Vec::new(),
                        name: None,
                        tool_call_id: None,
                        tool_calls: Some(Value::Array(vec![call])),
                    }),
                }
            }
            Item::FunctionCallOutput { call_id, output } => out.push(Message {
                role: Role::Tool,
                content: output.clone(),
                images: Vec::new(),
                name: None,
                tool_call_id: Some(call_id.clone()),
                tool_calls: None,
            }),
        }
    }
    out
}
