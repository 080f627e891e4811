//! `POST /v1/responses` bodies: items, tools, text formats, and the chat messages a conversation
//! becomes.

use ferrum_protocol::responses::{parse_responses_request, to_messages, Item};
use ferrum_protocol::{ResponseFormat, Role, ToolChoice};
use serde_json::json;

fn parse(
    body: serde_json::Value,
) -> Result<ferrum_protocol::responses::ResponsesRequest, ferrum_protocol::ApiError> {
    parse_responses_request(body.to_string().as_bytes())
}

#[test]
fn a_string_input_is_one_user_message_and_defaults_follow_the_spec() {
    let r = parse(json!({"model": "m", "input": "Hi"})).unwrap();
    assert_eq!(
        r.input,
        [Item::Message {
            role: Role::User,
            text: "Hi".into(),
            images: vec![],
        }]
    );
    assert!(r.store && r.parallel_tool_calls && !r.truncate && !r.background);
    assert_eq!(r.format, ResponseFormat::Text);
    assert_eq!(
        r.tool_choice,
        ToolChoice::Auto,
        "OpenAI echoes auto even without tools"
    );
    assert_eq!(r.echo.text, json!({"format": {"type": "text"}}));
}

#[test]
fn items_of_every_supported_kind_parse_and_become_chat_messages() {
    let r = parse(json!({
        "model": "m",
        "instructions": "Be brief.",
        "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
            {"type": "function_call", "call_id": "c1", "name": "w", "arguments": "{}"},
            {"type": "function_call", "call_id": "c2", "name": "w", "arguments": "{\"a\":1}"},
            {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Sunny."}]},
        ],
    }))
    .unwrap();
    let m = to_messages(r.instructions.as_deref(), &r.input);
    let roles: Vec<Role> = m.iter().map(|m| m.role).collect();
    assert_eq!(
        roles,
        [
            Role::System,
            Role::User,
            Role::Assistant,
            Role::Tool,
            Role::Assistant
        ]
    );
    // Consecutive calls are one assistant message with two tool calls.
    assert_eq!(
        m[2].tool_calls.as_ref().unwrap().as_array().unwrap().len(),
        2
    );
    assert_eq!(m[3].tool_call_id.as_deref(), Some("c1"));
    assert_eq!(m[4].content, "Sunny.");
}

#[test]
fn stored_items_round_trip_through_their_json() {
    let items = [
        Item::Message {
            role: Role::Assistant,
            text: "x".into(),
            images: vec![],
        },
        Item::Message {
            role: Role::Developer,
            text: "y".into(),
            images: vec![],
        },
        Item::FunctionCall {
            call_id: "c".into(),
            name: "f".into(),
            arguments: "{}".into(),
        },
        Item::FunctionCallOutput {
            call_id: "c".into(),
            output: "o".into(),
        },
    ];
    for item in items {
        let v = item.to_json(&format!("{}1", item.id_prefix()));
        assert_eq!(
            ferrum_protocol::responses::parse_item("x", &v).unwrap(),
            item,
            "{v}"
        );
    }
}

#[test]
fn tools_are_flat_and_strict_by_default_and_formats_carry_their_schema() {
    let r = parse(json!({
        "model": "m", "input": "Hi",
        "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}],
        "tool_choice": {"type": "function", "name": "f"},
        "text": {"format": {"type": "json_schema", "name": "s", "schema": {"type": "object"}}},
    }))
    .unwrap();
    assert!(r.tools[0].strict);
    assert_eq!(r.tool_choice, ToolChoice::Function("f".into()));
    assert!(matches!(r.format, ResponseFormat::JsonSchema { ref name, .. } if name == "s"));
    assert_eq!(r.echo.tool_choice, json!({"type": "function", "name": "f"}));
}

#[test]
fn bad_bodies_name_the_parameter() {
    let cases = [
        (json!({"input": "x"}), "model"),
        (json!({"model": "m"}), "input"),
        (
            json!({"model": "m", "input": [{"type": "reasoning"}]}),
            "input[0].type",
        ),
        (
            json!({"model": "m", "input": [{"role": "user", "content": 3}]}),
            "input[0].content",
        ),
        (
            json!({"model": "m", "input": "x", "max_output_tokens": 15}),
            "max_output_tokens",
        ),
        (
            json!({"model": "m", "input": "x", "tools": [{"type": "file_search"}]}),
            "tools[0].type",
        ),
        (
            json!({"model": "m", "input": "x", "tool_choice": {"type": "function", "name": "g"}}),
            "tool_choice",
        ),
        (
            json!({"model": "m", "input": "x", "conversation": "c"}),
            "conversation",
        ),
        (
            json!({"model": "m", "input": "x", "reasoning": {"effort": "high"}}),
            "reasoning.effort",
        ),
    ];
    for (body, param) in cases {
        let e = parse(body.clone()).unwrap_err();
        assert_eq!(
            (e.status, e.param.as_deref()),
            (400, Some(param)),
            "{body}: {e:?}"
        );
    }
}

#[test]
fn input_images_keep_their_place_and_survive_storage() {
    use ferrum_protocol::{image_marker, ImageDetail, ImageSource};
    let r = parse(json!({"model": "m", "input": [{"role": "user", "content": [
        {"type": "input_text", "text": "Compare"},
        {"type": "input_image", "image_url": "data:image/png;base64,AAAA", "detail": "low"},
        {"type": "input_text", "text": "with"},
        {"type": "input_image", "file_id": "file-abc", "detail": "auto"},
    ]}]}))
    .unwrap();
    let Item::Message { text, images, .. } = &r.input[0] else {
        panic!("a message")
    };
    // Joined as llama-server joins them: newlines between texts, none around an image.
    let m = image_marker();
    assert_eq!(text, &format!("Compare{m}with{m}"));
    assert!(m.starts_with("<__media_") && m.len() > 20 && m != "<__media__>");
    assert_eq!(images.len(), 2);
    assert_eq!(images[0].detail, ImageDetail::Low);
    assert_eq!(images[1].source, ImageSource::FileId("file-abc".into()));
    assert_eq!(images[0].param, "input[0].content[1]");
    // Stored and read back (`previous_response_id`), the same text and images.
    let v = r.input[0].to_json("msg_1");
    let back = ferrum_protocol::responses::parse_item("input[0]", &v).unwrap();
    assert_eq!(back, r.input[0], "{v}");
    // Neither or both sources, or an image in an assistant message, are refused.
    for bad in [
        json!({"type": "input_image", "detail": "auto"}),
        json!({"type": "input_image", "detail": "auto", "file_id": "f", "image_url": "data:x"}),
        json!({"type": "input_image", "detail": "best", "file_id": "f"}),
    ] {
        let e = parse(json!({"model": "m", "input": [{"role": "user", "content": [bad]}]}))
            .unwrap_err();
        assert!(
            e.param
                .as_deref()
                .unwrap()
                .starts_with("input[0].content[0]"),
            "{e:?}"
        );
    }
    let e = parse(
        json!({"model": "m", "input": [{"role": "assistant", "content": [
        {"type": "input_image", "detail": "auto", "file_id": "f"}]}]}),
    )
    .unwrap_err();
    assert_eq!(e.param.as_deref(), Some("input[0].content"));
}
