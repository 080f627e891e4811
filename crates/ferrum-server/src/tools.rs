//! Function calling: how tools reach the prompt, the grammar that forces a call
//! (`tool_choice` "required" or a named function), and reading calls back out of the text.
//!
//! Forced calls are generated as JSON under a grammar (one call object, or an array of them when
//! `parallel_tool_calls`), so names and arguments always validate. With "auto" the model decides,
//! under a grammar too (`ConstraintFactory::text_or_calls`): either text, or calls in the Hermes
//! format Qwen2.5's template teaches (`<tool_call>{...}</tool_call>` blocks; the fallback prompt
//! below teaches it to templates without tools) or as bare JSON, each valid against its
//! function's parameters, after which the turn ends; the text is then searched for those calls.

use ferrum_protocol::response::{FunctionCall, ToolCall};
use ferrum_protocol::{ChatRequest, Tool, ToolChoice};
use serde_json::{json, Value};

use crate::callstream::CallScanner;

/// How a request's output relates to tools.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ToolMode {
    /// No tools: the text is the answer.
    Off,
    /// The model may answer or call: calls are parsed out of the text.
    Auto,
    /// The output is calls as JSON (constrained).
    Forced,
}

pub fn mode(req: &ChatRequest) -> ToolMode {
    match (&req.tool_choice, req.tools.is_empty()) {
        (_, true) | (ToolChoice::None, _) => ToolMode::Off,
        (ToolChoice::Auto, _) => ToolMode::Auto,
        (ToolChoice::Required | ToolChoice::Function(_), _) => ToolMode::Forced,
    }
}

/// The tools as the chat template receives them.
pub fn template_tools(req: &ChatRequest) -> Vec<Value> {
    req.tools.iter().map(Tool::to_json).collect()
}

/// A system message teaching the call format, for templates that do not render tools.
pub fn fallback_prompt(tools: &[Value]) -> String {
    let list: Vec<String> = tools.iter().map(|t| t.to_string()).collect();
    format!(
        "You can call these functions:\n{}\nTo call one, reply with <tool_call>{{\"name\": \
         <function name>, \"arguments\": <arguments object>}}</tool_call>.",
        list.join("\n")
    )
}

/// The JSON Schema of one call of the allowed functions: `{"name": <const>, "arguments":
/// <the function's parameters>}`, one branch per function.
pub fn call_schema(req: &ChatRequest) -> Value {
    let allowed: Vec<&Tool> = match &req.tool_choice {
        ToolChoice::Function(name) => req.tools.iter().filter(|t| &t.name == name).collect(),
        _ => req.tools.iter().collect(),
    };
    let calls: Vec<Value> = allowed
        .iter()
        .map(|t| {
            json!({
                "type": "object",
                "properties": {"name": {"const": t.name}, "arguments": t.parameters},
                "required": ["name", "arguments"],
                "additionalProperties": false,
            })
        })
        .collect();
    if calls.len() == 1 {
        calls.into_iter().next().expect("one call schema")
    } else {
        json!({"anyOf": calls})
    }
}

/// The JSON Schema of a forced answer: a call of one of the allowed functions (an array of
/// them when parallel calls are allowed).
pub fn forced_schema(req: &ChatRequest) -> Value {
    let one = call_schema(req);
    if req.parallel_tool_calls {
        json!({"type": "array", "items": one, "minItems": 1})
    } else {
        one
    }
}

/// The most calls an "auto" turn may make: one without `parallel_tool_calls`, else one per
/// tool and at least 8 (a model that keeps repeating a call is stopped there).
pub fn max_auto_calls(req: &ChatRequest) -> usize {
    if req.parallel_tool_calls {
        req.tools.len().max(8)
    } else {
        1
    }
}

/// Splits generated text into its content and the calls it makes. With "auto", besides
/// `<tool_call>` blocks, an answer that is nothing but a call as JSON (optionally in a ```json
/// fence, as coder models like to write it) naming one of `names` counts as that call.
pub fn parse(
    text: &str,
    mode: ToolMode,
    names: &[&str],
    new_id: impl Fn() -> String,
) -> (Option<String>, Vec<ToolCall>) {
    let call = |v: &Value| -> Option<ToolCall> {
        let name = v.get("name")?.as_str()?.to_string();
        let arguments = v.get("arguments").cloned().unwrap_or_else(|| json!({}));
        let arguments = match arguments {
            Value::String(s) => s,
            other => other.to_string(),
        };
        Some(ToolCall {
            id: new_id(),
            kind: "function",
            function: FunctionCall { name, arguments },
        })
    };
    match mode {
        ToolMode::Off => (Some(text.to_string()), Vec::new()),
        // The arguments as generated (not re-serialized), the same text a stream sends.
        ToolMode::Forced => match serde_json::from_str::<Value>(text) {
            Ok(Value::Array(_) | Value::Object(_)) => {
                let mut scanner = CallScanner::new();
                scanner.push(text);
                let calls = scanner
                    .calls()
                    .into_iter()
                    .map(|(name, arguments)| ToolCall {
                        id: new_id(),
                        kind: "function",
                        function: FunctionCall { name, arguments },
                    })
                    .collect();
                (None, calls)
            }
            // Cut off by max_tokens: what was generated is returned as text.
            _ => (Some(text.to_string()), Vec::new()),
        },
        ToolMode::Auto => {
            if let Some(calls) = bare_calls(text, names, &call) {
                return (None, calls);
            }
            let mut calls = Vec::new();
            let mut content = String::new();
            let mut rest = text;
            while let Some(start) = rest.find("<tool_call>") {
                content.push_str(&rest[..start]);
                let body_start = start + "<tool_call>".len();
                let (body, next) = match rest[body_start..].find("</tool_call>") {
                    Some(end) => (
                        &rest[body_start..body_start + end],
                        &rest[body_start + end + "</tool_call>".len()..],
                    ),
                    None => (&rest[body_start..], ""),
                };
                match serde_json::from_str::<Value>(body.trim())
                    .ok()
                    .as_ref()
                    .and_then(call)
                {
                    Some(mut c) => {
                        // Object arguments as generated, the text a stream sends.
                        let mut scanner = CallScanner::new();
                        scanner.push(body);
                        if let Some((_, raw)) = scanner.calls().into_iter().next() {
                            if raw.starts_with(['{', '[']) {
                                c.function.arguments = raw;
                            }
                        }
                        calls.push(c)
                    }
                    None => content.push_str(&rest[start..rest.len() - next.len()]),
                }
                rest = next;
            }
            content.push_str(rest);
            let content = content.trim();
            let content = (!content.is_empty() || calls.is_empty()).then(|| content.to_string());
            (content, calls)
        }
    }
}

/// The calls of an answer that is only JSON naming known functions: one call or an array of
/// them, bare or in ```json fences (one fence after another is a parallel call, as gpt-4.1's
/// weights write it).
fn bare_calls(
    text: &str,
    names: &[&str],
    call: &dyn Fn(&Value) -> Option<ToolCall>,
) -> Option<Vec<ToolCall>> {
    let t = text.trim();
    let mut items = Vec::new();
    for value in json_values(t)? {
        match value {
            Value::Array(calls) => items.extend(calls),
            v @ Value::Object(_) => items.push(v),
            _ => return None,
        }
    }
    let known = |v: &Value| {
        v.get("name")
            .and_then(Value::as_str)
            .is_some_and(|n| names.contains(&n))
            && v.get("arguments").is_some()
    };
    if items.is_empty() || !items.iter().all(known) {
        return None;
    }
    // Object arguments as generated, the text a stream sends.
    let mut scanner = CallScanner::new();
    scanner.push(t);
    let raw = scanner.calls();
    let mut calls: Vec<ToolCall> = items.iter().map(call).collect::<Option<_>>()?;
    if raw.len() == calls.len() {
        for (c, (_, args)) in calls.iter_mut().zip(raw) {
            if args.starts_with(['{', '[']) {
                c.function.arguments = args;
            }
        }
    }
    Some(calls)
}

/// The JSON values of `t`: one bare value, or the contents of one or more fences (```json or
/// ```), separated by whitespace only; `None` when anything else is there.
fn json_values(t: &str) -> Option<Vec<Value>> {
    if !t.starts_with("```") {
        return serde_json::from_str(t).ok().map(|v| vec![v]);
    }
    let mut values = Vec::new();
    let mut rest = t;
    while !rest.is_empty() {
        let body = rest
            .strip_prefix("```json")
            .or_else(|| rest.strip_prefix("```"))?
            .trim_start();
        let mut stream = serde_json::Deserializer::from_str(body).into_iter::<Value>();
        values.push(stream.next()?.ok()?);
        let end = stream.byte_offset();
        rest = body[end..].trim_start().strip_prefix("```")?.trim_start();
    }
    Some(values)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> String {
        "call_x".into()
    }

    #[test]
    fn forced_calls_single_and_parallel() {
        let (c, calls) = parse(
            r#"{"name": "f", "arguments": {"a": 1}}"#,
            ToolMode::Forced,
            &["f", "g"],
            id,
        );
        assert_eq!(c, None);
        assert_eq!(calls[0].function.name, "f");
        assert_eq!(calls[0].function.arguments, r#"{"a": 1}"#, "as generated");
        let (_, calls) = parse(
            r#"[{"name": "f", "arguments": {}}, {"name": "g", "arguments": {"b": "x"}}]"#,
            ToolMode::Forced,
            &["f", "g"],
            id,
        );
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[1].function.name, "g");
        let (c, calls) = parse(r#"{"name": "f", "argu"#, ToolMode::Forced, &["f"], id);
        assert!(calls.is_empty() && c.is_some());
    }

    #[test]
    fn auto_finds_hermes_blocks_and_keeps_the_rest() {
        let text = "Let me check.\n<tool_call>\n{\"name\": \"weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>{\"name\": \"time\", \"arguments\": {}}</tool_call>";
        let (c, calls) = parse(text, ToolMode::Auto, &["weather", "time"], id);
        assert_eq!(c.as_deref(), Some("Let me check."));
        assert_eq!(calls.len(), 2);
        // Arguments as generated (the text a stream sends), not re-serialized.
        assert_eq!(calls[0].function.arguments, r#"{"city": "Paris"}"#);
        let (c, calls) = parse(
            "Just text <tool_call>not json</tool_call>",
            ToolMode::Auto,
            &["weather"],
            id,
        );
        assert!(calls.is_empty());
        assert_eq!(
            c.as_deref(),
            Some("Just text <tool_call>not json</tool_call>")
        );
        // A fenced JSON call of a known function counts; unknown names stay text.
        let fenced = "```json\n{\"name\": \"weather\", \"arguments\": {\"city\": \"Paris\"}}\n```";
        let (c, calls) = parse(fenced, ToolMode::Auto, &["weather"], id);
        assert_eq!((c, calls.len()), (None, 1));
        assert_eq!(calls[0].function.arguments, r#"{"city": "Paris"}"#);
        let (c, calls) = parse(fenced, ToolMode::Auto, &["other"], id);
        assert!(calls.is_empty() && c.is_some());
        // One fence after another: parallel calls (gpt-4.1 asked about three cities).
        let fences = "```json\n{\"name\": \"weather\", \"arguments\": {\"city\": \"Paris\"}}\n```\n```json\n[{\"name\": \"time\", \"arguments\": {}}]\n```\n```\n{\"name\": \"weather\", \"arguments\": {\"city\": \"Rome\"}}\n```";
        let (c, calls) = parse(fences, ToolMode::Auto, &["weather", "time"], id);
        assert_eq!(c, None);
        let found: Vec<_> = calls
            .iter()
            .map(|c| (c.function.name.as_str(), c.function.arguments.as_str()))
            .collect();
        assert_eq!(
            found,
            [
                ("weather", r#"{"city": "Paris"}"#),
                ("time", "{}"),
                ("weather", r#"{"city": "Rome"}"#)
            ]
        );
        // Text after the fences, or a fence left open, keeps the answer text.
        for text in [
            format!("{fences}\nDone."),
            fences[..fences.len() - 3].to_string(),
        ] {
            let (c, calls) = parse(&text, ToolMode::Auto, &["weather", "time"], id);
            assert!(
                calls.is_empty() && c.as_deref() == Some(text.trim()),
                "{text}"
            );
        }
    }
}
