//! The GGUF chat templates against llama.cpp's `--jinja` renderings (tests/reference) for
//! the three default models, byte for byte, including the Qwen tools case.

mod common;

use ferrum_engine::{ChatTemplate, Tokenizer};

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

/// Optional: compares with prompts rendered by llama.cpp's own chat code (as llama-server
/// does for /v1/chat/completions). Set `FERRUM_TEMPLATE_ORACLE_DIR` to a directory holding
/// `chat_cases.json` (a list of `{messages, tools?, add_generation_prompt?}`) and, per model,
/// `tmpl_<name>.json` (a list of `{prompt}` or `{error}`); `<name>` is a tier, or any name with
/// a `<name>.path` file holding the GGUF path, plus optionally `<name>.template` holding a
/// template source to use instead of the GGUF's. Ignored (counted as skipped) unless run with
/// `FERRUM_TEMPLATE_ORACLE_DIR=DIR cargo test -p ferrum-engine --test chat_template_reference -- --ignored`.
#[test]
#[ignore = "needs FERRUM_TEMPLATE_ORACLE_DIR (a llama.cpp dump)"]
fn llama_cpp_template_oracle() {
    let dir = std::env::var_os("FERRUM_TEMPLATE_ORACLE_DIR")
        .expect("FERRUM_TEMPLATE_ORACLE_DIR names the directory of the llama.cpp dump");
    let dir = std::path::PathBuf::from(dir);
    let read = |path: &std::path::Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    };
    let cases = read(&dir.join("chat_cases.json"));
    let cases = cases.as_array().unwrap();
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            Some(
                name.strip_prefix("tmpl_")?
                    .strip_suffix(".json")?
                    .to_owned(),
            )
        })
        .collect();
    names.sort();
    for name in names {
        let custom = dir.join(format!("{name}.template"));
        let template = if custom.exists() {
            let gguf = std::fs::read_to_string(dir.join(format!("{name}.path"))).unwrap();
            let mut file = std::fs::File::open(gguf.trim()).unwrap();
            let content = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
            let tokenizer = Tokenizer::from_gguf(&content.metadata).unwrap();
            let source = std::fs::read_to_string(&custom).unwrap();
            ChatTemplate::for_tokenizer(&source, &tokenizer).unwrap()
        } else if common::TIERS.contains(&name.as_str()) {
            template(&name)
        } else {
            let gguf = std::fs::read_to_string(dir.join(format!("{name}.path"))).unwrap();
            let mut file = std::fs::File::open(gguf.trim()).unwrap();
            let content = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
            let tokenizer = Tokenizer::from_gguf(&content.metadata).unwrap();
            ChatTemplate::from_gguf(&content.metadata, &tokenizer)
                .unwrap_or_else(|_| ChatTemplate::chatml(&tokenizer))
        };
        let expected = read(&dir.join(format!("tmpl_{name}.json")));
        let mut failures = Vec::new();
        for (i, (case, want)) in cases.iter().zip(expected.as_array().unwrap()).enumerate() {
            let messages = case["messages"].as_array().unwrap();
            let tools = case["tools"].as_array().map(Vec::as_slice);
            let add = case["add_generation_prompt"].as_bool().unwrap_or(true);
            let got = template.render(messages, tools, add);
            match (&got, want["prompt"].as_str()) {
                (Ok(ours), Some(theirs)) if ours == theirs => {}
                (Err(_), None) => {}
                _ => failures.push(format!(
                    "case {i}: ours {got:?}\n  llama.cpp {}",
                    serde_json::to_string(want).unwrap()
                )),
            }
        }
        assert!(
            failures.is_empty(),
            "{name}: {} of {} cases differ:\n{}",
            failures.len(),
            cases.len(),
            failures.join("\n")
        );
        eprintln!("{name}: {} oracle renders identical", cases.len());
    }
}
