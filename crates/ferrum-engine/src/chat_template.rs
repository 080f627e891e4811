//! Chat templates: the GGUF's own Jinja `tokenizer.chat_template`, rendered with minijinja so
//! that the prompt equals llama.cpp's `--jinja` rendering byte for byte.
//!
//! The reference is llama.cpp b11312 (commit 0c1e57098), whose own Jinja engine
//! (`common/jinja`) follows Hugging Face: `trim_blocks` and `lstrip_blocks`, Python string
//! methods, `raise_exception`, `strftime_now`, and a `tojson` with `", "`/`": "` separators that
//! keeps non-ASCII text and key order. Around the engine this reproduces what llama-server does
//! (`common/chat.cpp`): OpenAI messages are rebuilt the way it parses them, the template's
//! capabilities are probed by rendering test conversations, and the same workarounds follow
//! from them (`developer` becomes `system`, a system message the template ignores is merged
//! into the next turn, tool-call arguments become objects for templates that read them as
//! objects, content parts are joined or split to suit the template). Templates are untrusted
//! input: rendering is bounded in instructions, recursion depth and output size, and every
//! failure is a typed error.

use std::collections::HashMap;
use std::fmt::Write as _;

use candle_core::quantized::gguf_file::Value as GgufValue;
use minijinja::value::{Kwargs, ValueKind};
use minijinja::{AutoEscape, Environment, Error, ErrorKind, UndefinedBehavior, Value};
use serde_json::{json, Map, Value as Json};

use crate::tokenizer::Tokenizer;

/// Instruction budget of one rendering; real chat templates use a few thousand per message.
const FUEL: u64 = 20_000_000;
/// Nesting limit for macros, includes and nested blocks.
const RECURSION_LIMIT: usize = 100;
/// Largest prompt a template may produce; far beyond any context window.
const MAX_OUTPUT: usize = 32 << 20;
/// Nesting limit of values serialised by `tojson`.
const MAX_JSON_DEPTH: usize = 128;
const TEMPLATE_NAME: &str = "chat_template";

/// llama-server's template for models whose GGUF has none (`CHATML_TEMPLATE_SRC`).
pub const CHATML_SOURCE: &str = "{%- for message in messages -%}\n  {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' -}}\n{%- endfor -%}\n{%- if add_generation_prompt -%}\n  {{- '<|im_start|>assistant\n' -}}\n{%- endif -%}";

/// Errors of loading or rendering a chat template.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("the model has no chat template (GGUF key tokenizer.chat_template)")]
    Missing,
    #[error("GGUF key `{0}` is not a string")]
    NotAString(String),
    #[error("the chat template does not parse: {0}")]
    Syntax(String),
    #[error("the chat template failed to render: {0}")]
    Render(String),
    #[error("the chat template rejected the conversation: {0}")]
    Raised(String),
    #[error("the chat template exceeded its instruction budget")]
    OutOfFuel,
    #[error("the chat template produced more than {0} bytes")]
    OutputTooLarge(usize),
    #[error("message {index}: {reason}")]
    InvalidMessage { index: usize, reason: String },
    #[error("tool {index}: {reason}")]
    InvalidTool { index: usize, reason: String },
}

/// What a template does with its inputs, found by rendering probe conversations as llama.cpp's
/// `jinja::caps_get` does. llama.cpp watches which input values the template touches; here a
/// value counts as used when its marker text reaches the output, which agrees for templates
/// that print what they read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TemplateCaps {
    /// Message content may be a string.
    pub supports_string_content: bool,
    /// Message content may be a list of `{"type": "text", "text": ...}` parts.
    pub supports_typed_content: bool,
    /// A system message's content reaches the output.
    pub supports_system_role: bool,
    /// The `tools` definitions reach the output.
    pub supports_tools: bool,
    /// Assistant tool calls reach the output.
    pub supports_tool_calls: bool,
    /// Tool-call arguments are read as objects (so JSON-text arguments are parsed first).
    pub supports_object_arguments: bool,
    /// `enable_thinking` changes the output; llama-server then passes `enable_thinking = true`.
    pub supports_thinking: bool,
}

/// One compiled template with its probed capabilities.
struct Compiled {
    env: Environment<'static>,
    caps: TemplateCaps,
    /// gpt-oss templates (`<|channel|>`) keep the `developer` role.
    keeps_developer_role: bool,
}

/// A model's chat template (and its `tool_use` variant, used when tools are given).
pub struct ChatTemplate {
    default: Compiled,
    tool_use: Option<Compiled>,
    bos_token: String,
    eos_token: String,
    /// llama.cpp removes a leading BOS / trailing EOS text from the rendered prompt when the
    /// tokenizer adds that token itself, so that it is not there twice.
    strip_bos: bool,
    strip_eos: bool,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .field("caps", &self.default.caps)
            .field("has_tool_use_variant", &self.tool_use.is_some())
            .finish()
    }
}

/// Raised by the template's `raise_exception`, recognised to report it as such.
#[derive(Debug)]
struct RaisedException(String);

impl std::fmt::Display for RaisedException {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RaisedException {}

impl ChatTemplate {
    /// Loads `tokenizer.chat_template` (and `tokenizer.chat_template.tool_use` when present),
    /// with the BOS/EOS texts and BOS/EOS handling of the model's tokenizer.
    pub fn from_gguf(
        metadata: &HashMap<String, GgufValue>,
        tokenizer: &Tokenizer,
    ) -> Result<ChatTemplate, TemplateError> {
        let read = |key: &str| match metadata.get(key) {
            None => Ok(None),
            Some(GgufValue::String(s)) if !s.is_empty() => Ok(Some(s.as_str())),
            Some(GgufValue::String(_)) => Ok(None),
            Some(_) => Err(TemplateError::NotAString(key.to_owned())),
        };
        let tool_use_source = read("tokenizer.chat_template.tool_use")?;
        let source = read("tokenizer.chat_template")?
            .or(tool_use_source)
            .ok_or(TemplateError::Missing)?;
        let mut template = ChatTemplate::for_tokenizer(source, tokenizer)?;
        // llama.cpp ignores a tool-use variant that does not parse.
        if let Some(src) = tool_use_source.filter(|s| *s != source) {
            template.tool_use = Compiled::new(src, &template.bos_token, &template.eos_token).ok();
        }
        Ok(template)
    }

    /// The ChatML template llama-server falls back to when a GGUF has no chat template.
    pub fn chatml(tokenizer: &Tokenizer) -> ChatTemplate {
        // The built-in source is known to compile.
        ChatTemplate::for_tokenizer(CHATML_SOURCE, tokenizer).expect("the ChatML template compiles")
    }

    /// Compiles `source` with the BOS/EOS texts and BOS/EOS handling of `tokenizer`.
    pub fn for_tokenizer(
        source: &str,
        tokenizer: &Tokenizer,
    ) -> Result<ChatTemplate, TemplateError> {
        let token_text = |id: Option<u32>| {
            id.map(|id| String::from_utf8_lossy(tokenizer.token_bytes(id)).into_owned())
                .unwrap_or_default()
        };
        let mut template = ChatTemplate::new(
            source,
            &token_text(tokenizer.bos_id()),
            &token_text(tokenizer.eos_id()),
        )?;
        template.strip_bos = tokenizer.adds_bos();
        template.strip_eos = tokenizer.adds_eos();
        Ok(template)
    }

    /// Compiles a template with the given `bos_token`/`eos_token` variables.
    pub fn new(
        source: &str,
        bos_token: &str,
        eos_token: &str,
    ) -> Result<ChatTemplate, TemplateError> {
        Ok(ChatTemplate {
            default: Compiled::new(source, bos_token, eos_token)?,
            tool_use: None,
            bos_token: bos_token.to_owned(),
            eos_token: eos_token.to_owned(),
            strip_bos: false,
            strip_eos: false,
        })
    }

    /// The default template's capabilities, as probed when it was compiled.
    pub fn caps(&self) -> TemplateCaps {
        self.default.caps
    }

    /// Renders a conversation. `messages` are OpenAI chat messages (`role`, `content` as a
    /// string, null or text parts, `name`, `tool_calls`, `tool_call_id`, `reasoning_content`);
    /// `tools` are OpenAI tool definitions (`{"type": "function", "function": {...}}`).
    pub fn render(
        &self,
        messages: &[Json],
        tools: Option<&[Json]>,
        add_generation_prompt: bool,
    ) -> Result<String, TemplateError> {
        self.render_with(messages, tools, add_generation_prompt, None)
    }

    /// [`render`](Self::render) with extra template variables (llama-server's
    /// `chat_template_kwargs`, e.g. `{"enable_thinking": false}`), which override the defaults.
    pub fn render_with(
        &self,
        messages: &[Json],
        tools: Option<&[Json]>,
        add_generation_prompt: bool,
        kwargs: Option<&Map<String, Json>>,
    ) -> Result<String, TemplateError> {
        let tools = tools
            .unwrap_or_default()
            .iter()
            .enumerate()
            .map(|(i, t)| normalize_tool(i, t))
            .collect::<Result<Vec<_>, _>>()?;
        let tools = (!tools.is_empty()).then_some(tools);
        let compiled = match (&tools, &self.tool_use) {
            (Some(_), Some(tool_use)) => tool_use,
            _ => &self.default,
        };
        let mut messages = messages
            .iter()
            .enumerate()
            .map(|(i, m)| normalize_message(i, m))
            .collect::<Result<Vec<_>, _>>()?;
        compiled.apply_workarounds(&mut messages)?;

        let mut ctx = Map::new();
        ctx.insert("messages".into(), Json::Array(messages));
        ctx.insert("bos_token".into(), Json::String(self.bos_token.clone()));
        ctx.insert("eos_token".into(), Json::String(self.eos_token.clone()));
        ctx.insert(
            "enable_thinking".into(),
            Json::Bool(compiled.caps.supports_thinking),
        );
        if let Some(tools) = tools {
            ctx.insert("tools".into(), Json::Array(tools));
        }
        // llama-server always offers the date, in the two formats templates use.
        let now = unix_now();
        ctx.insert("datetime".into(), Json::String(strftime("%b %d %Y", now)));
        ctx.insert(
            "date_string".into(),
            Json::String(strftime("%d %b %Y", now)),
        );
        for (key, value) in kwargs.into_iter().flatten() {
            ctx.insert(key.clone(), value.clone());
        }
        // llama.cpp defines `add_generation_prompt` only when it is true.
        if add_generation_prompt {
            ctx.insert("add_generation_prompt".into(), Json::Bool(true));
        }

        let mut output = compiled.render(ctx)?;
        if self.strip_bos && !self.bos_token.is_empty() && output.starts_with(&self.bos_token) {
            output.drain(..self.bos_token.len());
        }
        if self.strip_eos && !self.eos_token.is_empty() && output.ends_with(&self.eos_token) {
            output.truncate(output.len() - self.eos_token.len());
        }
        Ok(output)
    }
}

impl Compiled {
    fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Compiled, TemplateError> {
        let mut env = Environment::new();
        // Hugging Face compiles chat templates with these settings, and llama.cpp follows it.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_auto_escape_callback(|_| AutoEscape::None);
        // Chained lookups on missing attributes give undefined instead of failing, which
        // renders everything Jinja2 renders and does not fail where llama.cpp is lenient.
        env.set_undefined_behavior(UndefinedBehavior::Chainable);
        env.set_fuel(Some(FUEL));
        env.set_recursion_limit(RECURSION_LIMIT);
        env.set_unknown_method_callback(string_method);
        env.set_formatter(format_value);
        env.add_filter("length", length);
        env.add_filter("count", length);
        for name in ["upper", "lower", "title", "capitalize"] {
            env.add_filter(name, move |s: &str| ascii_case(s, name));
        }
        env.add_filter("tojson", tojson);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned(TEMPLATE_NAME, patch_source(source))
            .map_err(|e| TemplateError::Syntax(describe(&e)))?;
        let mut compiled = Compiled {
            env,
            caps: TemplateCaps {
                supports_string_content: true,
                supports_typed_content: false,
                supports_system_role: true,
                supports_tools: true,
                supports_tool_calls: true,
                supports_object_arguments: false,
                supports_thinking: false,
            },
            keeps_developer_role: source.contains("<|channel|>"),
        };
        compiled.caps = compiled.probe_caps(bos_token, eos_token);
        Ok(compiled)
    }

    fn render(&self, ctx: Map<String, Json>) -> Result<String, TemplateError> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| TemplateError::Render(describe(&e)))?;
        let mut out = LimitedWriter(Vec::new());
        template
            .render_captured_to(Json::Object(ctx), &mut out)
            .map_err(|e| map_render_error(&e))?;
        String::from_utf8(out.0).map_err(|_| TemplateError::Render("output is not UTF-8".into()))
    }

    /// Renders a probe conversation in the context llama.cpp's `caps_try_execute` uses; a
    /// failure renders as nothing.
    fn probe(&self, messages: Json, tools: Option<Json>) -> Option<String> {
        let mut ctx = Map::new();
        ctx.insert("messages".into(), messages);
        ctx.insert("tools".into(), tools.unwrap_or_else(|| json!([])));
        ctx.insert("bos_token".into(), json!(""));
        ctx.insert("eos_token".into(), json!(""));
        ctx.insert("add_generation_prompt".into(), json!(true));
        self.render(ctx).ok()
    }

    /// llama.cpp's capability probes (`common/jinja/caps.cpp`). llama.cpp records which input
    /// values the template reads; here a value counts as read when changing it changes the
    /// output (or whether rendering fails), which agrees for templates that use what they read.
    fn probe_caps(&self, bos_token: &str, eos_token: &str) -> TemplateCaps {
        let mut caps = self.caps;

        let string_out = self.probe(json!([{"role": "user", "content": "STRING_MARKER"}]), None);
        let typed_out = self.probe(
            json!([{"role": "user", "content": [{"type": "text", "text": "TYPED_MARKER"}]}]),
            None,
        );
        // Typed content counts as supported when the template reads the parts' text rather
        // than printing the whole list (which would show the `type` key).
        caps.supports_typed_content = typed_out.as_deref().is_some_and(|out| {
            let lower = out.to_lowercase();
            out.contains("TYPED_MARKER") && !lower.contains("\"type\"") && !lower.contains("'type'")
        });
        caps.supports_string_content = match &string_out {
            None => false,
            Some(out) => !caps.supports_typed_content || out.contains("STRING_MARKER"),
        };
        if !caps.supports_string_content && !caps.supports_typed_content {
            // llama.cpp only warns in this case and keeps passing strings.
            caps.supports_string_content = true;
        }

        let system = |content: &str| {
            self.probe(
                json!([
                    {"role": "system", "content": content},
                    {"role": "user", "content": "User message"},
                ]),
                None,
            )
        };
        caps.supports_system_role = system("System message") != system("Another system text");

        let tools = |name: &str| {
            json!([{
                "name": "tool",
                "type": "function",
                "function": {
                    "name": name,
                    "description": "Tool description",
                    "parameters": {
                        "type": "object",
                        "properties": {"arg": {"type": "string", "description": "Arg description"}},
                        "required": ["arg"],
                    },
                },
            }])
        };
        // `arguments: None` leaves the tool call out, to see whether the template reads it.
        let conversation = |arguments: Option<Json>| {
            let mut assistant = json!({"role": "assistant", "content": ""});
            if let Some(arguments) = arguments {
                assistant["tool_calls"] = json!([{
                    "id": "call00001",
                    "type": "function",
                    "function": {"name": "tool1", "arguments": arguments},
                }]);
            }
            json!([
                {"role": "user", "content": "User message"},
                assistant,
                {"role": "tool", "content": "Tool response", "tool_call_id": "call00001"},
                {"role": "assistant", "content": "The tool response was 'tool response'"},
                {"role": "user", "content": "User message"},
            ])
        };
        let object = |value: &str| Some(json!({"arg": value}));
        let text = |value: &str| Some(json!(format!(r#"{{"arg": "{value}"}}"#)));
        let tool_probe =
            |args: Option<Json>, name: &str| self.probe(conversation(args), Some(tools(name)));

        if let Some(out) = tool_probe(object("value"), "tool1") {
            let out = Some(out);
            caps.supports_tools = out != tool_probe(object("value"), "tool2");
            caps.supports_tool_calls = out != tool_probe(None, "tool1");
            caps.supports_object_arguments =
                caps.supports_tool_calls && out != tool_probe(object("other value"), "tool1");
        }
        if !caps.supports_object_arguments {
            match tool_probe(text("value"), "tool1") {
                None => {
                    caps.supports_tools = false;
                    caps.supports_tool_calls = false;
                }
                Some(out) => {
                    let out = Some(out);
                    caps.supports_tools = out != tool_probe(text("value"), "tool2");
                    caps.supports_tool_calls = out != tool_probe(None, "tool1");
                }
            }
        }

        // llama-server passes `enable_thinking = true` to templates it finds reasoning in and
        // false otherwise; a template whose output does not depend on it cannot tell.
        let thinking = |enabled: bool| {
            let mut ctx = Map::new();
            ctx.insert(
                "messages".into(),
                json!([{"role": "user", "content": "test"}]),
            );
            ctx.insert("bos_token".into(), json!(bos_token));
            ctx.insert("eos_token".into(), json!(eos_token));
            ctx.insert("enable_thinking".into(), json!(enabled));
            ctx.insert("add_generation_prompt".into(), json!(true));
            self.render(ctx).ok()
        };
        caps.supports_thinking = thinking(true) != thinking(false);
        caps
    }

    /// llama-server's `workaround::*` steps, chosen by the capabilities.
    fn apply_workarounds(&self, messages: &mut Vec<Json>) -> Result<(), TemplateError> {
        let caps = self.caps;
        // Content as the template wants it: strings joined from parts, or parts from strings.
        let only_string = caps.supports_string_content && !caps.supports_typed_content;
        let only_typed = !caps.supports_string_content && caps.supports_typed_content;
        for message in messages.iter_mut() {
            let content = &mut message["content"];
            if only_string {
                if let Some(parts) = content.as_array() {
                    *content = Json::String(join_text_parts(parts));
                }
            } else if only_typed {
                if let Some(text) = content.as_str() {
                    *content = json!([{"type": "text", "text": text}]);
                }
            }
        }
        if !self.keeps_developer_role {
            for message in messages.iter_mut() {
                if message["role"] == "developer" {
                    message["role"] = json!("system");
                }
            }
        }
        if !caps.supports_system_role && messages.first().is_some_and(|m| m["role"] == "system") {
            let system = messages.remove(0);
            if let Some(next) = messages.first_mut() {
                let (Some(first), Some(second)) =
                    (system["content"].as_str(), next["content"].as_str())
                else {
                    return Err(TemplateError::InvalidMessage {
                        index: 0,
                        reason: "this template has no system role, and merging the system message \
                                 into the next one needs text content in both"
                            .into(),
                    });
                };
                next["content"] = Json::String(format!("{first}\n{second}"));
            }
        }
        if caps.supports_object_arguments {
            for (index, message) in messages.iter_mut().enumerate() {
                for call in message
                    .get_mut("tool_calls")
                    .and_then(Json::as_array_mut)
                    .into_iter()
                    .flatten()
                {
                    let arguments = &mut call["function"]["arguments"];
                    if let Some(text) = arguments.as_str() {
                        *arguments = serde_json::from_str(text).map_err(|e| {
                            TemplateError::InvalidMessage {
                                index,
                                reason: format!("tool call arguments are not valid JSON: {e}"),
                            }
                        })?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// Source fixes llama.cpp applies before compiling (`common_chat_templates_init`): newlines
/// normalised to `\n`, and two checks removed that make gpt-oss and Mistral templates reject
/// llama-server's own message shapes.
fn patch_source(source: &str) -> String {
    let mut src = source.replace("\r\n", "\n").replace('\r', "\n");
    if src.contains("<|channel|>") && src.contains("in message.content or") {
        src = src.replace(
            "{%- if \"<|channel|>analysis<|message|>\" in message.content or \"<|channel|>final<|message|>\" in message.content %}",
            "{%- if false %}",
        );
    }
    if src.contains("[TOOL_CALLS]") && src.contains("if (message['content'] is none or") {
        src = src.replace(
            "{%- if (message['content'] is none or message['content'] == '' or message['content']|length == 0) and (message['tool_calls'] is not defined or message['tool_calls'] is none or message['tool_calls']|length == 0) %}",
            "{%- if false %}",
        );
    }
    src
}

/// Joins text content parts with newlines (`concat_content_parts`).
fn join_text_parts(parts: &[Json]) -> String {
    let mut text = String::new();
    for part in parts {
        if part["type"] == "text" {
            if !text.is_empty() {
                text.push('\n');
            }
            text.push_str(part["text"].as_str().unwrap_or_default());
        }
    }
    text
}

/// Rebuilds one OpenAI message in the shape llama-server hands to templates
/// (`common_chat_msgs_parse_oaicompat` then `to_json_oaicompat`): only the known fields, in a
/// fixed order, empty or null content as "", text parts kept as `{"type", "text"}` parts.
fn normalize_message(index: usize, message: &Json) -> Result<Json, TemplateError> {
    let invalid = |reason: &str| TemplateError::InvalidMessage {
        index,
        reason: reason.to_owned(),
    };
    let obj = message
        .as_object()
        .ok_or_else(|| invalid("a message must be an object"))?;
    let role = obj
        .get("role")
        .and_then(Json::as_str)
        .ok_or_else(|| invalid("a message needs a string `role`"))?;
    if !obj.contains_key("content") && !obj.contains_key("tool_calls") {
        return Err(invalid("a message needs `content` or `tool_calls`"));
    }

    let content = match obj.get("content") {
        None | Some(Json::Null) => Json::String(String::new()),
        Some(Json::String(s)) => Json::String(s.clone()),
        Some(Json::Array(parts)) if parts.is_empty() => Json::String(String::new()),
        Some(Json::Array(parts)) => {
            let mut out = Vec::with_capacity(parts.len());
            for part in parts {
                let kind = part.get("type").and_then(Json::as_str).unwrap_or_default();
                if kind != "text" {
                    return Err(invalid(&format!(
                        "content part type `{kind}` is not supported; only `text` is"
                    )));
                }
                let text = part
                    .get("text")
                    .and_then(Json::as_str)
                    .ok_or_else(|| invalid("a text content part needs a string `text`"))?;
                out.push(json!({"type": "text", "text": text}));
            }
            Json::Array(out)
        }
        Some(_) => {
            return Err(invalid(
                "`content` must be a string, an array of parts or null",
            ))
        }
    };

    let mut tool_calls = Vec::new();
    if let Some(calls) = obj.get("tool_calls").filter(|c| !c.is_null()) {
        let calls = calls
            .as_array()
            .ok_or_else(|| invalid("`tool_calls` must be an array"))?;
        for call in calls {
            if call.get("type").and_then(Json::as_str) != Some("function") {
                return Err(invalid("a tool call needs `type: \"function\"`"));
            }
            let function = call
                .get("function")
                .and_then(Json::as_object)
                .ok_or_else(|| invalid("a tool call needs a `function` object"))?;
            let name = function
                .get("name")
                .and_then(Json::as_str)
                .ok_or_else(|| invalid("a tool call needs a string `function.name`"))?;
            // Arguments are JSON text in the OpenAI API; other JSON is taken as its text.
            let arguments = match function.get("arguments") {
                Some(Json::String(s)) => s.clone(),
                Some(other) => serde_json::to_string(other).unwrap_or_default(),
                None => return Err(invalid("a tool call needs `function.arguments`")),
            };
            let mut tc = Map::new();
            tc.insert("type".into(), json!("function"));
            tc.insert(
                "function".into(),
                json!({"name": name, "arguments": arguments}),
            );
            if let Some(id) = call
                .get("id")
                .and_then(Json::as_str)
                .filter(|s| !s.is_empty())
            {
                tc.insert("id".into(), json!(id));
            }
            tool_calls.push(Json::Object(tc));
        }
    }

    let mut out = Map::new();
    out.insert("role".into(), json!(role));
    out.insert("content".into(), content);
    let text_field = |key: &str| {
        obj.get(key)
            .and_then(Json::as_str)
            .filter(|s| !s.is_empty())
            .map(|s| json!(s))
    };
    if let Some(reasoning) = text_field("reasoning_content") {
        out.insert("reasoning_content".into(), reasoning);
    }
    if let Some(name) = text_field("name") {
        out.insert("name".into(), name);
    }
    if let Some(id) = text_field("tool_call_id") {
        out.insert("tool_call_id".into(), id);
    }
    if !tool_calls.is_empty() {
        out.insert("tool_calls".into(), Json::Array(tool_calls));
    }
    Ok(Json::Object(out))
}

/// Rebuilds one OpenAI tool definition as llama-server passes it to templates
/// (`common_chat_tools_to_json_oaicompat`): type, then name, description and parameters.
fn normalize_tool(index: usize, tool: &Json) -> Result<Json, TemplateError> {
    let invalid = |reason: &str| TemplateError::InvalidTool {
        index,
        reason: reason.to_owned(),
    };
    match tool.get("type").and_then(Json::as_str) {
        Some("function") => {}
        Some(other) => return Err(invalid(&format!("tool type `{other}` is not supported"))),
        None => return Err(invalid("a tool needs `type: \"function\"`")),
    }
    let function = tool
        .get("function")
        .and_then(Json::as_object)
        .ok_or_else(|| invalid("a tool needs a `function` object"))?;
    let name = function
        .get("name")
        .and_then(Json::as_str)
        .ok_or_else(|| invalid("a tool needs a string `function.name`"))?;
    let description = function
        .get("description")
        .and_then(Json::as_str)
        .unwrap_or_default();
    let parameters = function
        .get("parameters")
        .cloned()
        .unwrap_or_else(|| json!({}));
    Ok(json!({
        "type": "function",
        "function": {"name": name, "description": description, "parameters": parameters},
    }))
}

/// Python methods on values (`.strip()`, `.startswith()`, `.items()`, ...), with the case
/// methods working on ASCII only as in llama.cpp's engine.
fn string_method(
    state: &minijinja::State,
    value: &Value,
    method: &str,
    args: &[Value],
) -> Result<Value, Error> {
    if let (Some(s), true) = (value.as_str(), args.is_empty()) {
        if matches!(method, "upper" | "lower" | "title" | "capitalize") {
            return Ok(Value::from(ascii_case(s, method)));
        }
    }
    minijinja_contrib::pycompat::unknown_method_callback(state, value, method, args)
}

/// llama.cpp's `upper`, `lower`, `title` and `capitalize`, which change ASCII letters only
/// (C's `toupper` byte by byte); `title` starts a word after whitespace only.
fn ascii_case(s: &str, how: &str) -> String {
    match how {
        "upper" => s.to_ascii_uppercase(),
        "lower" => s.to_ascii_lowercase(),
        "capitalize" => {
            let mut chars = s.chars();
            match chars.next() {
                Some(first) => {
                    let mut out = first.to_ascii_uppercase().to_string();
                    out.push_str(&chars.as_str().to_ascii_lowercase());
                    out
                }
                None => String::new(),
            }
        }
        _ => {
            let mut out = String::with_capacity(s.len());
            let mut start = true;
            for c in s.chars() {
                if c.is_ascii_whitespace() || c == '\u{b}' {
                    start = true;
                    out.push(c);
                } else if start {
                    start = false;
                    out.push(c.to_ascii_uppercase());
                } else {
                    out.push(c.to_ascii_lowercase());
                }
            }
            out
        }
    }
}

/// `length` (and `count`): items of a list or mapping, and bytes of a string, as llama.cpp's
/// engine counts them.
fn length(value: &Value) -> Result<Value, Error> {
    if let Some(s) = value.as_str() {
        return Ok(Value::from(s.len()));
    }
    value.len().map(Value::from).ok_or_else(|| {
        Error::new(
            ErrorKind::InvalidOperation,
            format!("cannot take the length of {}", value.kind()),
        )
    })
}

/// Prints `{{ value }}` as llama.cpp's engine does where minijinja differs: none prints
/// nothing, a list prints its items one after another, a mapping prints nothing, and floats
/// print as C++'s `std::to_string` without trailing zeros (`2.5`, `1.0`).
fn format_value(
    out: &mut minijinja::Output,
    state: &minijinja::State,
    value: &Value,
) -> Result<(), Error> {
    match value.kind() {
        ValueKind::None | ValueKind::Map | ValueKind::Plain => Ok(()),
        ValueKind::Seq | ValueKind::Iterable => {
            for item in value.try_iter()? {
                format_value(out, state, &item)?;
            }
            Ok(())
        }
        ValueKind::Number if !value.is_integer() => {
            let f = f64::try_from(value.clone()).unwrap_or(f64::NAN);
            let mut text = format!("{f:.6}");
            if f.is_finite() {
                text.truncate(text.trim_end_matches('0').len());
                if text.ends_with('.') {
                    text.push('0');
                }
            }
            out.write_str(&text).map_err(Error::from)
        }
        _ => minijinja::escape_formatter(out, state, value),
    }
}

/// Maps a rendering error to the typed error, keeping the template's own message.
fn map_render_error(e: &Error) -> TemplateError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(raised) = err.downcast_ref::<RaisedException>() {
            return TemplateError::Raised(raised.0.clone());
        }
        // The output limit surfaces as an I/O error of the writer, which keeps it inside.
        if let Some(too_large) = err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<OutputTooLarge>())
        {
            return TemplateError::OutputTooLarge(too_large.0);
        }
        source = err.source();
    }
    match e.kind() {
        ErrorKind::OutOfFuel => TemplateError::OutOfFuel,
        _ => TemplateError::Render(describe(e)),
    }
}

/// One line saying what failed and where, e.g. "undefined value (line 3)".
fn describe(e: &Error) -> String {
    let mut text = match e.detail() {
        Some(detail) => format!("{}: {detail}", e.kind()),
        None => e.kind().to_string(),
    };
    if let Some(line) = e.line() {
        let _ = write!(text, " (line {line})");
    }
    let mut source = std::error::Error::source(e);
    while let Some(err) = source {
        let _ = write!(text, ": {err}");
        source = err.source();
    }
    text
}

#[derive(Debug)]
struct OutputTooLarge(usize);

impl std::fmt::Display for OutputTooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "output exceeds {} bytes", self.0)
    }
}

impl std::error::Error for OutputTooLarge {}

/// Collects the output, failing once it grows past [`MAX_OUTPUT`].
struct LimitedWriter(Vec<u8>);

impl std::io::Write for LimitedWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.0.len() + buf.len() > MAX_OUTPUT {
            return Err(std::io::Error::other(OutputTooLarge(MAX_OUTPUT)));
        }
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `raise_exception(message)`: templates call it to reject a conversation.
fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message.clone())
        .with_source(RaisedException(message)))
}

/// `strftime_now(format)`: the current time (UTC), formatted like C's `strftime`.
fn strftime_now(format: String) -> Result<Value, Error> {
    Ok(Value::from(strftime(&format, unix_now())))
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Formats a Unix time (UTC) with the common `strftime` conversions; `%-d` style flags drop the
/// padding as glibc does, and unknown conversions are kept literally.
fn strftime(format: &str, unix: i64) -> String {
    const DAYS: [&str; 7] = [
        "Sunday",
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
    ];
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let (hour, minute, second) = (secs / 3600, secs / 60 % 60, secs % 60);
    let weekday = (days + 4).rem_euclid(7) as usize;
    let yday = days - days_from_civil(year, 1, 1) + 1;
    let hour12 = if hour % 12 == 0 { 12 } else { hour % 12 };

    let mut out = String::with_capacity(format.len() + 16);
    let mut chars = format.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let no_pad = chars.next_if_eq(&'-').is_some();
        let num = |v: i64, width: usize| {
            if no_pad {
                v.to_string()
            } else {
                format!("{v:0width$}")
            }
        };
        match chars.next() {
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&num(year.rem_euclid(100), 2)),
            Some('m') => out.push_str(&num(month as i64, 2)),
            Some('d') => out.push_str(&num(day as i64, 2)),
            Some('e') => out.push_str(&format!("{day:>2}")),
            Some('H') => out.push_str(&num(hour, 2)),
            Some('I') => out.push_str(&num(hour12, 2)),
            Some('M') => out.push_str(&num(minute, 2)),
            Some('S') => out.push_str(&num(second, 2)),
            Some('j') => out.push_str(&num(yday, 3)),
            Some('p') => out.push_str(if hour < 12 { "AM" } else { "PM" }),
            Some('A') => out.push_str(DAYS[weekday]),
            Some('a') => out.push_str(&DAYS[weekday][..3]),
            Some('B') => out.push_str(MONTHS[month as usize - 1]),
            Some('b') | Some('h') => out.push_str(&MONTHS[month as usize - 1][..3]),
            Some('F') => out.push_str(&format!("{year}-{month:02}-{day:02}")),
            Some('T') => out.push_str(&format!("{hour:02}:{minute:02}:{second:02}")),
            Some('Z') => out.push_str("UTC"),
            Some('z') => out.push_str("+0000"),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                if no_pad {
                    out.push('-');
                }
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// Days since 1970-01-01 to (year, month, day), Howard Hinnant's algorithm.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// (year, month, day) to days since 1970-01-01, the inverse of [`civil_from_days`].
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// How `tojson` lays out JSON (llama.cpp's `value_to_json`).
struct JsonStyle {
    /// `None` for one line; `Some(n)` puts items on their own lines, indented by `n` spaces.
    indent: Option<usize>,
    item_separator: String,
    key_separator: String,
    sort_keys: bool,
    ensure_ascii: bool,
}

impl JsonStyle {
    /// The defaults: `", "` and `": "` on one line, `","` between indented lines.
    fn new(indent: Option<usize>) -> JsonStyle {
        JsonStyle {
            item_separator: if indent.is_some() { "," } else { ", " }.to_owned(),
            indent,
            key_separator: ": ".to_owned(),
            sort_keys: false,
            ensure_ascii: false,
        }
    }
}

/// The `tojson` filter of llama.cpp's engine, with Hugging Face's signature
/// `tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`: keys in
/// insertion order, non-ASCII kept, no HTML escaping, floats as C++ streams print them.
/// (`sort_keys`, which llama.cpp rejects, is supported.)
fn tojson(
    value: &Value,
    args: minijinja::value::Rest<Value>,
    kwargs: Kwargs,
) -> Result<Value, Error> {
    let arg = |name: &str, position: usize| -> Result<Option<Value>, Error> {
        Ok(kwargs
            .get::<Option<Value>>(name)?
            .or_else(|| args.get(position).cloned())
            .filter(|v| !v.is_none() && !v.is_undefined()))
    };
    let ensure_ascii = arg("ensure_ascii", 0)?.is_some_and(|v| v.is_true());
    // Only an integer indents; llama.cpp ignores anything else.
    let indent = arg("indent", 1)?
        .filter(Value::is_integer)
        .and_then(|v| i64::try_from(v).ok())
        .filter(|&n| n >= 0)
        .map(|n| n as usize);
    let mut style = JsonStyle::new(indent);
    style.ensure_ascii = ensure_ascii;
    if let Some(separators) = arg("separators", 2)? {
        let parts: Vec<Value> = separators.try_iter()?.collect();
        if let Some(item) = parts.first() {
            style.item_separator = item.to_string();
        }
        if let Some(key) = parts.get(1) {
            style.key_separator = key.to_string();
        }
    }
    style.sort_keys = arg("sort_keys", 3)?.is_some_and(|v| v.is_true());
    kwargs.assert_all_used()?;
    if args.len() > 4 {
        return Err(Error::new(
            ErrorKind::TooManyArguments,
            "tojson takes at most 4 arguments",
        ));
    }
    let mut out = String::new();
    write_json(&mut out, value, &style, 0)?;
    Ok(Value::from_safe_string(out))
}

fn write_json(
    out: &mut String,
    value: &Value,
    style: &JsonStyle,
    level: usize,
) -> Result<(), Error> {
    if level > MAX_JSON_DEPTH {
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            "tojson: value is nested too deeply",
        ));
    }
    match value.kind() {
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            if value.is_integer() {
                let _ = write!(out, "{value}");
            } else {
                let f = f64::try_from(value.clone()).unwrap_or(f64::NAN);
                out.push_str(&cpp_float(f));
            }
        }
        ValueKind::String => write_json_string(out, value.as_str().unwrap_or_default(), style),
        ValueKind::Bytes => write_json_string(
            out,
            &String::from_utf8_lossy(value.as_bytes().unwrap_or_default()),
            style,
        ),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            write_container(out, style, level, '[', ']', &items, |out, item| {
                write_json(out, item, style, level + 1)
            })?;
        }
        ValueKind::Map => {
            let mut entries = Vec::new();
            for key in value.try_iter()? {
                let item = value.get_item(&key)?;
                let key = match key.as_str() {
                    Some(s) => s.to_owned(),
                    None => key.to_string(),
                };
                entries.push((key, item));
            }
            if style.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(&b.0));
            }
            write_container(out, style, level, '{', '}', &entries, |out, (key, item)| {
                write_json_string(out, key, style);
                out.push_str(&style.key_separator);
                write_json(out, item, style, level + 1)
            })?;
        }
        // None, undefined and values JSON cannot express (functions, objects) are `null`.
        _ => out.push_str("null"),
    }
    Ok(())
}

fn write_container<T>(
    out: &mut String,
    style: &JsonStyle,
    level: usize,
    open: char,
    close: char,
    items: &[T],
    mut write_item: impl FnMut(&mut String, &T) -> Result<(), Error>,
) -> Result<(), Error> {
    out.push(open);
    if !items.is_empty() {
        if style.indent.is_some() {
            out.push('\n');
        }
        let indent = style.indent.unwrap_or(0);
        for (i, item) in items.iter().enumerate() {
            out.push_str(&" ".repeat((level + 1) * indent));
            write_item(out, item)?;
            if i + 1 < items.len() {
                out.push_str(&style.item_separator);
            }
            if style.indent.is_some() {
                out.push('\n');
            }
        }
        out.push_str(&" ".repeat(level * indent));
    }
    out.push(close);
    Ok(())
}

fn write_json_string(out: &mut String, s: &str, style: &JsonStyle) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c if style.ensure_ascii && !c.is_ascii() => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// A float as C++'s `std::ostream << double` writes it (`%g`, six significant digits):
/// `1.0` is `1`, `0.1` is `0.1`, `1e20` is `1e+20`, `1234567.0` is `1.23457e+06`.
fn cpp_float(f: f64) -> String {
    if f.is_nan() {
        return if f.is_sign_negative() { "-nan" } else { "nan" }.to_owned();
    }
    if f.is_infinite() {
        return if f > 0.0 { "inf" } else { "-inf" }.to_owned();
    }
    if f == 0.0 {
        return if f.is_sign_negative() { "-0" } else { "0" }.to_owned();
    }
    const PRECISION: i32 = 6;
    // The exponent after rounding to six significant digits decides the notation.
    let sci = format!("{:.*e}", (PRECISION - 1) as usize, f);
    let (mantissa, exponent) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exponent: i32 = exponent.parse().unwrap_or(0);
    let trim = |s: &str| -> String {
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_owned()
        } else {
            s.to_owned()
        }
    };
    if (-4..PRECISION).contains(&exponent) {
        trim(&format!("{:.*}", (PRECISION - 1 - exponent) as usize, f))
    } else {
        let sign = if exponent < 0 { '-' } else { '+' };
        format!("{}e{sign}{:02}", trim(mantissa), exponent.abs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(source: &str, messages: Json) -> Result<String, TemplateError> {
        let template = ChatTemplate::new(source, "<s>", "</s>")?;
        template.render(messages.as_array().unwrap(), None, true)
    }

    fn json_of(value: Json, indent: Option<usize>) -> String {
        let mut out = String::new();
        write_json(
            &mut out,
            &Value::from_serialize(value),
            &JsonStyle::new(indent),
            0,
        )
        .unwrap();
        out
    }

    #[test]
    fn renders_a_chatml_template_with_trim_blocks() {
        // trim_blocks drops the newline after a block tag and lstrip_blocks the indentation
        // before one; text around expressions is kept, as in Jinja2 and llama.cpp.
        let source = "{% for message in messages %}\n    {{ message['role'] }}:{{ message['content'] }}\n    {% if loop.last %}.{% endif %}\n{% endfor %}\n{% if add_generation_prompt %}\n  assistant:\n{% endif %}\n";
        let out = render(
            source,
            json!([{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}]),
        )
        .unwrap();
        assert_eq!(out, "    system:Be brief.\n    user:Hi\n.  assistant:\n");
    }

    #[test]
    fn python_string_methods_and_namespace_work() {
        let source = "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{{ m.content.strip().upper() }}{% if not loop.last %}|{% endif %}{% endfor %}{{ ns.n }}{{ messages[0].content.startswith('  a') }}";
        let out = render(
            source,
            json!([{"role": "user", "content": "  ab "}, {"role": "user", "content": "c"}]),
        )
        .unwrap();
        assert_eq!(out, "AB|C2True");
    }

    #[test]
    fn tojson_matches_llama_cpp() {
        let template = ChatTemplate::new("{{ messages[0].content | tojson }}", "", "").unwrap();
        let out = template
            .render(
                &[json!({"role": "user", "content": "é \"q\" <b>\n\u{1}"})],
                None,
                false,
            )
            .unwrap();
        assert_eq!(out, r#""é \"q\" <b>\n\u0001""#);

        let value = json!({"b": [1, 2.5, 1.0, 1e20, 0.0001, 1234567.0, true, null], "a": {}});
        assert_eq!(
            json_of(value.clone(), None),
            r#"{"b": [1, 2.5, 1, 1e+20, 0.0001, 1.23457e+06, true, null], "a": {}}"#
        );
        assert_eq!(
            json_of(json!({"b": [1, {"c": []}], "a": {}}), Some(2)),
            "{\n  \"b\": [\n    1,\n    {\n      \"c\": []\n    }\n  ],\n  \"a\": {}\n}"
        );

        // Hugging Face's signature: ensure_ascii, indent, separators, sort_keys.
        let template = ChatTemplate::new(
            "{{ tools | tojson(separators=[',', ':'], sort_keys=true) }}|{{ 'é' | tojson(true) }}",
            "",
            "",
        )
        .unwrap();
        let tool =
            json!({"type": "function", "function": {"name": "f", "parameters": {"z": 1, "a": 2}}});
        let out = template.render(&[], Some(&[tool]), false).unwrap();
        assert_eq!(
            out,
            r#"[{"function":{"description":"","name":"f","parameters":{"a":2,"z":1}},"type":"function"}]|"\u00e9""#
        );
    }

    #[test]
    fn floats_print_like_cpp_streams() {
        for (f, s) in [
            (1.0, "1"),
            (0.1, "0.1"),
            (-2.5, "-2.5"),
            (1e16, "1e+16"),
            (123456.0, "123456"),
            (1234567.0, "1.23457e+06"),
            (1.5e-5, "1.5e-05"),
            (0.0001, "0.0001"),
            (1.23456789, "1.23457"),
            (0.0, "0"),
        ] {
            assert_eq!(cpp_float(f), s);
        }
    }

    #[test]
    fn bad_templates_are_errors_not_panics() {
        assert!(matches!(
            ChatTemplate::new("{% for x in %}", "", ""),
            Err(TemplateError::Syntax(_))
        ));
        let err = render(
            "{{ raise_exception('System role not supported') }}",
            json!([{"role": "user", "content": "x"}]),
        )
        .unwrap_err();
        assert!(matches!(err, TemplateError::Raised(ref m) if m == "System role not supported"));
        let err = render("{{ 1 / 'a' }}", json!([])).unwrap_err();
        assert!(matches!(err, TemplateError::Render(_)));
        // An endless computation is cut off by the instruction budget.
        let err = render(
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
            json!([]),
        )
        .unwrap_err();
        assert!(matches!(err, TemplateError::OutOfFuel));
        let err = render(
            "{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}",
            json!([]),
        )
        .unwrap_err();
        assert!(matches!(err, TemplateError::OutputTooLarge(_)));
        let err = render("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", json!([])).unwrap_err();
        assert!(matches!(err, TemplateError::Render(_)));
    }

    #[test]
    fn messages_and_tools_are_validated() {
        let err = render("x", json!([{"content": "no role"}])).unwrap_err();
        assert!(matches!(
            err,
            TemplateError::InvalidMessage { index: 0, .. }
        ));
        let err = render("x", json!([{"role": "user"}])).unwrap_err();
        assert!(matches!(err, TemplateError::InvalidMessage { .. }));
        let err = render(
            "x",
            json!([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
        )
        .unwrap_err();
        assert!(matches!(err, TemplateError::InvalidMessage { .. }));
        let template = ChatTemplate::new("x", "", "").unwrap();
        let err = template
            .render(&[], Some(&[json!({"type": "retrieval"})]), false)
            .unwrap_err();
        assert!(matches!(err, TemplateError::InvalidTool { index: 0, .. }));
    }

    #[test]
    fn content_parts_are_joined_for_string_templates() {
        let out = render(
            "{% for m in messages %}[{{ m.content }}]{% endfor %}",
            json!([
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                {"role": "assistant", "content": null, "tool_calls": []},
            ]),
        )
        .unwrap();
        assert_eq!(out, "[a\nb][]");
    }

    #[test]
    fn system_message_merges_into_the_next_turn_when_unsupported() {
        let source = "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}[{{ m.role }}]{{ m.content }}{% endfor %}";
        let template = ChatTemplate::new(source, "", "").unwrap();
        assert!(!template.caps().supports_system_role);
        let out = template
            .render(
                &[
                    json!({"role": "system", "content": "S"}),
                    json!({"role": "user", "content": "U"}),
                ],
                None,
                false,
            )
            .unwrap();
        assert_eq!(out, "[user]S\nU");
    }

    #[test]
    fn tool_call_arguments_become_objects_when_read_as_objects() {
        let source = "{% for m in messages %}{% for tc in m.tool_calls %}{{ tc.function.arguments | tojson }}{% endfor %}{% endfor %}";
        let template = ChatTemplate::new(source, "", "").unwrap();
        assert!(template.caps().supports_object_arguments);
        let call = |arguments: &str| {
            json!({"role": "assistant", "content": null, "tool_calls": [
                {"id": "1", "type": "function", "function": {"name": "f", "arguments": arguments}}
            ]})
        };
        let out = template
            .render(&[call("{\"city\":\"Paris\"}")], None, false)
            .unwrap();
        assert_eq!(out, r#"{"city": "Paris"}"#);
        let err = template
            .render(&[call("{not json")], None, false)
            .unwrap_err();
        assert!(matches!(
            err,
            TemplateError::InvalidMessage { index: 0, .. }
        ));
    }

    #[test]
    fn context_matches_llama_server() {
        let source = "{{ add_generation_prompt is defined }}|{{ enable_thinking }}|{{ tools is defined }}|{{ date_string | length > 0 }}|{{ bos_token }}";
        let template = ChatTemplate::new(source, "<s>", "</s>").unwrap();
        let msg = [json!({"role": "user", "content": "x"})];
        assert_eq!(
            template.render(&msg, None, false).unwrap(),
            "False|False|False|True|<s>"
        );
        assert_eq!(
            template.render(&msg, Some(&[]), true).unwrap(),
            "True|False|False|True|<s>"
        );
        let mut kwargs = Map::new();
        kwargs.insert("enable_thinking".into(), json!(true));
        assert_eq!(
            template
                .render_with(&msg, None, true, Some(&kwargs))
                .unwrap(),
            "True|True|False|True|<s>"
        );
        // A template whose output depends on `enable_thinking` gets it set.
        let thinking = ChatTemplate::new(
            "{% if add_generation_prompt %}<think>{% if not enable_thinking %}</think>{% endif %}{% endif %}",
            "",
            "",
        )
        .unwrap();
        assert!(thinking.caps().supports_thinking);
        assert_eq!(thinking.render(&msg, None, true).unwrap(), "<think>");
    }

    #[test]
    fn values_print_like_llama_cpp() {
        let out = render(
            "{{ none }}|{{ 2.5 }}|{{ 1.0 }}|{{ 3 }}|{{ true }}|{{ undefined_name }}|{{ 'a' }}|{{ [1, 'x', [2]] }}|{{ {'a': 1} }}",
            json!([]),
        )
        .unwrap();
        assert_eq!(out, "|2.5|1.0|3|True||a|1x2|");
    }

    #[test]
    fn strftime_formats_known_dates() {
        // 2024-02-29 13:05:09 UTC, a Thursday.
        let t = 1_709_211_909;
        assert_eq!(strftime("%d %b %Y", t), "29 Feb 2024");
        assert_eq!(
            strftime("%A %B %-d, %H:%M:%S %p %j", t),
            "Thursday February 29, 13:05:09 PM 060"
        );
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(days_from_civil(2024, 2, 29), 19_782);
    }
}
