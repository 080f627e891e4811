//! Validation of chat completion requests: what is accepted, and for each kind of bad input the
//! OpenAI error (status, `param`, `code`) a client gets.

use ferrum_protocol::chat::Role;
use ferrum_protocol::{parse_chat_request, ApiError};
use serde_json::{json, Value};

fn base() -> Value {
    json!({"model": "gpt-4.1-nano", "messages": [{"role": "user", "content": "hi"}]})
}

/// `base()` with `patch`'s members set (a `null` member removes it).
fn with(patch: Value) -> Vec<u8> {
    let mut body = base();
    for (k, v) in patch.as_object().unwrap() {
        if v.is_null() {
            body.as_object_mut().unwrap().remove(k);
        } else {
            body[k] = v.clone();
        }
    }
    serde_json::to_vec(&body).unwrap()
}

/// Expects a 400 with this `param` and `code`, and a message naming the parameter.
fn check_rejected(body: &[u8], param: Option<&str>, code: Option<&str>) -> ApiError {
    let err = parse_chat_request(body).expect_err("request should be rejected");
    assert_eq!(err.status, 400, "{err:?}");
    assert_eq!(err.param.as_deref(), param, "{err:?}");
    assert_eq!(err.code.as_deref(), code, "{err:?}");
    let shape = err.body();
    for key in ["message", "type", "param", "code"] {
        assert!(
            shape["error"].get(key).is_some(),
            "missing {key} in {shape}"
        );
    }
    assert_eq!(shape["error"]["type"], "invalid_request_error");
    err
}

#[test]
fn accepts_a_full_request() {
    let body = with(json!({
        "messages": [
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "42"},
        ],
        "max_completion_tokens": 10, "temperature": 0.5, "top_p": 0.9, "n": 2,
        "stop": ["x", "y"], "seed": -3, "presence_penalty": 1, "frequency_penalty": -1,
        "logit_bias": {"15": -100, "7": 5.5}, "logprobs": true, "top_logprobs": 3,
        "stream": true, "stream_options": {"include_usage": true}, "user": "u1",
        "metadata": {"k": "v"}, "store": true, "service_tier": "auto", "parallel_tool_calls": true,
        "response_format": {"type": "text"},
        "modalities": ["text"], "tools": [], "prompt_cache_key": "abc",
    }));
    let req = parse_chat_request(&body).unwrap();
    assert_eq!(req.messages.len(), 4);
    assert_eq!(req.messages[0].role, Role::Developer);
    assert_eq!(req.messages[0].to_template()["role"], "system");
    assert_eq!(req.messages[1].content, "a\nb");
    assert!(req.messages[2].tool_calls.is_some());
    assert_eq!(req.messages[3].tool_call_id.as_deref(), Some("c1"));
    assert_eq!(req.max_tokens, Some(10));
    assert_eq!((req.temperature, req.top_p, req.n), (0.5, 0.9, 2));
    assert_eq!(req.stop, vec!["x", "y"]);
    assert_eq!(req.seed, Some(-3));
    let mut bias = req.logit_bias.clone();
    bias.sort_by_key(|b| b.0);
    assert_eq!(bias, vec![(7, 5.5), (15, -100.0)]);
    assert!(req.logprobs && req.top_logprobs == 3 && req.stream && req.include_usage && req.store);
}

#[test]
fn defaults_and_nulls() {
    let body = with(json!({"temperature": Value::Null}));
    let req = parse_chat_request(&body).unwrap();
    assert_eq!((req.temperature, req.top_p, req.n), (1.0, 1.0, 1));
    assert_eq!(req.max_tokens, None);
    // Explicit nulls are the same as absent fields (the spec's fields are nullable).
    let mut v = base();
    v["temperature"] = Value::Null;
    v["stop"] = Value::Null;
    v["max_tokens"] = Value::Null;
    let req = parse_chat_request(&serde_json::to_vec(&v).unwrap()).unwrap();
    assert_eq!(req.temperature, 1.0);
    assert!(req.stop.is_empty());
    // A single stop string, and max_tokens when max_completion_tokens is absent.
    let req = parse_chat_request(&with(json!({"stop": "END", "max_tokens": 7}))).unwrap();
    assert_eq!(req.stop, vec!["END"]);
    assert_eq!(
        (req.max_tokens, req.max_tokens_param),
        (Some(7), "max_tokens")
    );
}

#[test]
fn malformed_bodies() {
    let e = check_rejected(b"{not json", None, None);
    assert!(e.message.contains("parse the JSON body"), "{}", e.message);
    check_rejected(b"[1, 2]", None, None);
    check_rejected(b"", None, None);
}

#[test]
fn missing_and_unknown_fields() {
    check_rejected(
        &with(json!({"model": null})),
        Some("model"),
        Some("missing_required_parameter"),
    );
    check_rejected(
        &with(json!({"messages": null})),
        Some("messages"),
        Some("missing_required_parameter"),
    );
    check_rejected(
        &with(json!({"messages": []})),
        Some("messages"),
        Some("empty_array"),
    );
    let e = check_rejected(&with(json!({"foo": 1})), None, Some("unknown_parameter"));
    assert!(e.message.contains("foo"));
    check_rejected(
        &with(json!({"model": 5})),
        Some("model"),
        Some("invalid_type"),
    );
}

#[test]
fn bad_messages() {
    let msgs = |m: Value| with(json!({ "messages": m }));
    let e = check_rejected(
        &msgs(json!([{"role": "robot", "content": "x"}])),
        Some("messages[0].role"),
        Some("invalid_value"),
    );
    assert!(e.message.contains("'robot'") && e.message.contains("'developer'"));
    check_rejected(
        &msgs(json!([{"content": "x"}])),
        Some("messages[0].role"),
        Some("missing_required_parameter"),
    );
    check_rejected(
        &msgs(json!([{"role": "user"}])),
        Some("messages[0].content"),
        Some("missing_required_parameter"),
    );
    check_rejected(
        &msgs(json!(["hi"])),
        Some("messages[0]"),
        Some("invalid_type"),
    );
    check_rejected(
        &msgs(json!([{"role": "user", "content": 5}])),
        Some("messages[0].content"),
        Some("invalid_type"),
    );
    check_rejected(
        &msgs(json!([{"role": "user", "content": "a"}, {"role": "tool", "content": "r"}])),
        Some("messages[1].tool_call_id"),
        Some("missing_required_parameter"),
    );
    check_rejected(
        &msgs(json!([{"role": "user", "content": [{"type": "video", "url": "x"}]}])),
        Some("messages[0].content[0].type"),
        Some("invalid_value"),
    );
    check_rejected(
        &msgs(json!([{"role": "user", "content": [{"type": "text"}]}])),
        Some("messages[0].content[0].text"),
        Some("missing_required_parameter"),
    );
    check_rejected(
        &msgs(json!([{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}])),
        Some("messages[0].content[0].type"),
        Some("unsupported_value"),
    );
    check_rejected(
        &msgs(
            json!([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x", "detail": "max"}}]}]),
        ),
        Some("messages[0].content[0].image_url.detail"),
        Some("invalid_value"),
    );
    check_rejected(
        &msgs(json!([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}])),
        Some("messages[0].content[0].image_url.url"),
        Some("missing_required_parameter"),
    );
    check_rejected(
        &msgs(
            json!([{"role": "system", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
        ),
        Some("messages[0].content[0].type"),
        Some("invalid_value"),
    );
}

#[test]
fn image_parts_leave_a_marker_where_they_were() {
    let body = with(json!({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA", "detail": "high"}},
    ]}]}));
    let req = ferrum_protocol::parse_chat_request(&body).unwrap();
    let m = &req.messages[0];
    assert_eq!(
        m.content,
        format!("What is this?{}", ferrum_protocol::image_marker())
    );
    assert_eq!(m.images.len(), 1);
    assert_eq!(m.images[0].detail, ferrum_protocol::ImageDetail::High);
    assert_eq!(m.images[0].param, "messages[0].content[1]");
    assert_eq!(
        m.images[0].source,
        ferrum_protocol::ImageSource::Url("data:image/png;base64,AAAA".into())
    );
}

#[test]
fn numbers_out_of_range_or_of_the_wrong_type() {
    let cases: &[(Value, &str, &str)] = &[
        (
            json!({"temperature": 3}),
            "temperature",
            "decimal_above_max_value",
        ),
        (
            json!({"temperature": -1}),
            "temperature",
            "decimal_below_min_value",
        ),
        (json!({"temperature": "hot"}), "temperature", "invalid_type"),
        (json!({"top_p": 1.5}), "top_p", "decimal_above_max_value"),
        (json!({"n": 0}), "n", "integer_below_min_value"),
        (json!({"n": 129}), "n", "integer_above_max_value"),
        (json!({"n": 1.5}), "n", "invalid_type"),
        (
            json!({"presence_penalty": 3}),
            "presence_penalty",
            "decimal_above_max_value",
        ),
        (
            json!({"frequency_penalty": -2.5}),
            "frequency_penalty",
            "decimal_below_min_value",
        ),
        (json!({"max_tokens": 40000}), "max_tokens", "invalid_value"),
        (
            json!({"max_completion_tokens": 40000}),
            "max_completion_tokens",
            "invalid_value",
        ),
        (
            json!({"max_tokens": 0}),
            "max_tokens",
            "integer_below_min_value",
        ),
        (
            json!({"top_logprobs": 21, "logprobs": true}),
            "top_logprobs",
            "integer_above_max_value",
        ),
        (json!({"top_logprobs": 2}), "top_logprobs", "invalid_value"),
        (json!({"seed": "x"}), "seed", "invalid_type"),
        (json!({"logprobs": "yes"}), "logprobs", "invalid_type"),
        (json!({"stream": 1}), "stream", "invalid_type"),
    ];
    for (patch, param, code) in cases {
        let e = check_rejected(&with(patch.clone()), Some(param), Some(code));
        assert!(e.message.contains(param), "{patch}: {}", e.message);
    }
    let e = check_rejected(
        &with(json!({"temperature": 3})),
        Some("temperature"),
        Some("decimal_above_max_value"),
    );
    assert_eq!(
        e.message,
        "Invalid 'temperature': decimal above maximum value. Expected a value <= 2, but got 3 instead."
    );
}

#[test]
fn stop_logit_bias_stream_options_metadata() {
    check_rejected(
        &with(json!({"stop": ["a", "b", "c", "d", "e"]})),
        Some("stop"),
        Some("array_above_max_length"),
    );
    check_rejected(
        &with(json!({"stop": [1]})),
        Some("stop[0]"),
        Some("invalid_type"),
    );
    check_rejected(
        &with(json!({"logit_bias": {"5": 101}})),
        Some("logit_bias"),
        Some("invalid_value"),
    );
    check_rejected(
        &with(json!({"logit_bias": {"abc": 1}})),
        Some("logit_bias"),
        Some("invalid_value"),
    );
    check_rejected(
        &with(json!({"logit_bias": [1]})),
        Some("logit_bias"),
        Some("invalid_type"),
    );
    check_rejected(
        &with(json!({"stream_options": {"include_usage": true}})),
        Some("stream_options"),
        Some("invalid_value"),
    );
    let many: serde_json::Map<String, Value> =
        (0..17).map(|i| (format!("k{i}"), json!("v"))).collect();
    check_rejected(
        &with(json!({ "metadata": many })),
        Some("metadata"),
        Some("object_above_max_properties"),
    );
    check_rejected(
        &with(json!({"metadata": {"k": 1}})),
        Some("metadata.k"),
        Some("invalid_type"),
    );
}

#[test]
fn features_not_supported_yet_say_so() {
    for (patch, param) in [
        (json!({"functions": [{"name": "f"}]}), "functions"),
        (json!({"reasoning_effort": "low"}), "reasoning_effort"),
        (
            json!({"audio": {"voice": "alloy", "format": "mp3"}}),
            "audio",
        ),
    ] {
        check_rejected(&with(patch), Some(param), Some("unsupported_parameter"));
    }
    check_rejected(
        &with(json!({"modalities": ["audio"]})),
        Some("modalities[0]"),
        Some("unsupported_value"),
    );
    check_rejected(
        &with(json!({"service_tier": "gold"})),
        Some("service_tier"),
        Some("invalid_value"),
    );
}

#[test]
fn tools_and_tool_choice() {
    use ferrum_protocol::ToolChoice;
    let tools = json!([
        {"type": "function", "function": {"name": "get_weather", "description": "d",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}, "strict": true}},
        {"type": "function", "function": {"name": "get_time"}},
    ]);
    let req = parse_chat_request(&with(json!({"tools": tools}))).unwrap();
    assert_eq!(req.tools.len(), 2);
    assert_eq!(
        req.tool_choice,
        ToolChoice::Auto,
        "auto is the default with tools"
    );
    assert!(req.parallel_tool_calls);
    assert!(req.tools[0].strict);
    assert_eq!(req.tools[1].parameters["type"], "object");
    let req = parse_chat_request(&with(json!({"tools": tools, "tool_choice": {"type": "function", "function": {"name": "get_time"}}, "parallel_tool_calls": false}))).unwrap();
    assert_eq!(req.tool_choice, ToolChoice::Function("get_time".into()));
    assert!(!req.parallel_tool_calls);
    assert_eq!(
        parse_chat_request(&with(json!({}))).unwrap().tool_choice,
        ToolChoice::None
    );
    check_rejected(
        &with(
            json!({"tools": tools, "tool_choice": {"type": "function", "function": {"name": "nope"}}}),
        ),
        Some("tool_choice"),
        Some("invalid_value"),
    );
    check_rejected(
        &with(json!({"tool_choice": "required"})),
        Some("tool_choice"),
        Some("invalid_value"),
    );
    check_rejected(
        &with(json!({"tools": tools, "tool_choice": "sometimes"})),
        Some("tool_choice"),
        Some("invalid_value"),
    );
    check_rejected(
        &with(json!({"tools": [{"type": "function", "function": {"name": "bad name"}}]})),
        Some("tools[0].function.name"),
        Some("invalid_value"),
    );
    check_rejected(
        &with(
            json!({"tools": [{"type": "function", "function": {"name": "f"}}, {"type": "function", "function": {"name": "f"}}]}),
        ),
        Some("tools[1].function.name"),
        Some("invalid_value"),
    );
    check_rejected(
        &with(json!({"tools": [{"type": "retrieval"}]})),
        Some("tools[0].type"),
        Some("invalid_value"),
    );
    check_rejected(
        &with(json!({"tools": [{"type": "function"}]})),
        Some("tools[0].function"),
        Some("missing_required_parameter"),
    );
}

#[test]
fn response_formats() {
    use ferrum_protocol::ResponseFormat;
    let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"], "additionalProperties": false});
    let req = parse_chat_request(&with(json!({"response_format": {"type": "json_schema", "json_schema": {"name": "thing_1", "schema": schema, "strict": true}}}))).unwrap();
    assert_eq!(
        req.response_format,
        ResponseFormat::JsonSchema {
            name: "thing_1".into(),
            schema: schema.clone(),
            strict: true
        }
    );
    let req =
        parse_chat_request(&with(json!({"response_format": {"type": "json_object"}}))).unwrap();
    assert_eq!(req.response_format, ResponseFormat::JsonObject);
    check_rejected(
        &with(json!({"response_format": {"type": "json_schema"}})),
        Some("response_format.json_schema"),
        Some("missing_required_parameter"),
    );
    check_rejected(
        &with(
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "bad name!", "schema": schema}}}),
        ),
        Some("response_format.json_schema.name"),
        Some("invalid_value"),
    );
    check_rejected(
        &with(json!({"response_format": {"type": "yaml"}})),
        Some("response_format.type"),
        Some("invalid_value"),
    );
}

#[test]
fn other_errors_have_the_openai_shape() {
    let e = ApiError::model_not_found("gpt-5");
    assert_eq!(e.status, 404);
    assert_eq!(e.body()["error"]["code"], "model_not_found");
    let e = ApiError::context_length_exceeded(8192, 9000, None);
    assert!(e.message.contains("8192") && e.message.contains("9000"));
    assert_eq!(e.code.as_deref(), Some("context_length_exceeded"));
    assert_eq!(ApiError::queue_full("m", 4).status, 429);
    assert_eq!(ApiError::invalid_api_key("sk-****").status, 401);
    assert_eq!(
        ApiError::missing_api_key().body()["error"]["param"],
        Value::Null
    );
}

#[test]
fn tool_messages_answer_the_calls_before_them() {
    let msgs = |m: Value| with(json!({ "messages": m }));
    let call = |id: &str| json!({"id": id, "type": "function", "function": {"name": "f", "arguments": "{}"}});
    let user = json!({"role": "user", "content": "hi"});
    let asst = |ids: &[&str]| {
        json!({"role": "assistant", "content": null,
        "tool_calls": ids.iter().map(|i| call(i)).collect::<Vec<_>>()})
    };
    let tool = |id: &str| json!({"role": "tool", "tool_call_id": id, "content": "42"});
    // Parallel calls answered in any order, then more conversation: fine.
    let ok =
        json!([user, asst(&["a", "b"]), tool("b"), tool("a"), {"role": "user", "content": "ok"}]);
    assert!(parse_chat_request(&msgs(ok)).is_ok());
    // A tool message after a plain message.
    let err = check_rejected(
        &msgs(json!([user, tool("a")])),
        Some("messages.[1].role"),
        None,
    );
    assert!(
        err.message.contains("preceeding message with 'tool_calls'"),
        "{err:?}"
    );
    // Answering a call that was not made.
    let err = check_rejected(
        &msgs(json!([user, asst(&["a"]), tool("zz")])),
        Some("messages.[2].tool_call_id"),
        None,
    );
    assert!(err.message.contains("'zz'"), "{err:?}");
    // A call left unanswered (also when the assistant message is the last one).
    for list in [
        json!([user, asst(&["a", "b"]), tool("a"), user]),
        json!([user, asst(&["a"])]),
    ] {
        let err = check_rejected(&msgs(list), Some("messages.[1].role"), None);
        assert!(
            err.message.contains("did not have response messages"),
            "{err:?}"
        );
    }
}

#[test]
fn predicted_outputs_take_one_choice() {
    let body = with(json!({"n": 2, "prediction": {"type": "content", "content": "x"}}));
    check_rejected(&body, Some("n"), Some("invalid_value"));
    let body = with(json!({"n": 1, "prediction": {"type": "content", "content": "x"}}));
    assert_eq!(
        parse_chat_request(&body).unwrap().prediction.as_deref(),
        Some("x")
    );
}
