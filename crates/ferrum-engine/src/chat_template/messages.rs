//! OpenAI messages and tools rebuilt in the shape llama-server hands to chat templates
//! (`common_chat_msgs_parse_oaicompat`, then `to_json_oaicompat`).

use super::*;

/// Joins text content parts with newlines (`concat_content_parts`).
pub(super) fn join_text_parts(parts: &[Json]) -> String {
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
pub(super) fn normalize_message(index: usize, message: &Json) -> Result<Json, TemplateError> {
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
pub(super) fn normalize_tool(index: usize, tool: &Json) -> Result<Json, TemplateError> {
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
