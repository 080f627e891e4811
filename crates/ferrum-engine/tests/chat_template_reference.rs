//! The GGUF chat templates against llama.cpp's `--jinja` renderings (../shared/reference) for
//! the three default models, byte for byte, including the Qwen tools case.

mod common;

use ferrum_engine::chat_template::ChatTemplate;
use ferrum_engine::tokenizer::Tokenizer;

fn template(tier: &str) -> ChatTemplate {
    let metadata = common::gguf_metadata(tier);
    let tokenizer = Tokenizer::from_gguf(metadata).expect("tokenizer builds");
    ChatTemplate::from_gguf(metadata, &tokenizer).expect("template compiles")
}

fn check_renders(tier: &str) {
    let template = template(tier);
    let reference = common::reference(tier);
    let cases = reference["chat"].as_array().unwrap();
    let mut with_tools = 0;
    for (i, case) in cases.iter().enumerate() {
        let messages = case["messages"].as_array().unwrap();
        let tools = case["tools"].as_array().map(Vec::as_slice);
        with_tools += usize::from(tools.is_some());
        let rendered = template
            .render(messages, tools, true)
            .unwrap_or_else(|e| panic!("{tier}: chat case {i} failed to render: {e}"));
        assert_eq!(
            rendered,
            case["rendered"].as_str().unwrap(),
            "{tier}: chat case {i} renders differently"
        );
    }
    eprintln!(
        "{tier}: {} chat renders identical ({with_tools} with tools)",
        cases.len()
    );
}

#[test]
fn nano_renders() {
    check_renders("nano");
}

#[test]
fn mini_renders() {
    check_renders("mini");
}

#[test]
fn full_renders() {
    check_renders("full");
}

/// The probed capabilities of the default templates, as llama.cpp reports them in `/props`.
#[test]
fn capabilities_of_the_default_templates() {
    let smol = template("nano").caps();
    assert!(smol.supports_system_role);
    assert!(!smol.supports_tools && !smol.supports_tool_calls);
    assert!(!smol.supports_thinking);

    for tier in ["mini", "full"] {
        let qwen = template(tier).caps();
        assert!(qwen.supports_system_role, "{tier}");
        assert!(qwen.supports_tools && qwen.supports_tool_calls, "{tier}");
        // Qwen2.5 writes arguments with `tojson`, so they are passed as objects.
        assert!(qwen.supports_object_arguments, "{tier}");
        assert!(
            qwen.supports_string_content && !qwen.supports_typed_content,
            "{tier}"
        );
        assert!(!qwen.supports_thinking, "{tier}");
    }
}

/// A tool-calling round trip renders as Qwen2.5's template writes it: arguments as a JSON
/// object after `tojson`, tool results inside one user turn.
#[test]
fn qwen_tool_round_trip() {
    let template = template("mini");
    let messages = serde_json::json!([
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": null, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\", \"unit\": \"c\"}"}
        }]},
        {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\": 21.5}"},
    ]);
    let out = template
        .render(messages.as_array().unwrap(), None, true)
        .unwrap();
    assert_eq!(
        out,
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nWeather in Paris?<|im_end|>\n\
         <|im_start|>assistant\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"unit\": \"c\"}}\n</tool_call><|im_end|>\n\
         <|im_start|>user\n<tool_response>\n{\"temp\": 21.5}\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    );
}
