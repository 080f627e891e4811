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

mod json;
mod messages;
mod python;
#[cfg(test)]
mod tests;

use json::*;
use messages::*;
use python::*;

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
