//! The grammar of "auto" tool turns (`ConstraintFactory::text_or_calls`) on the real
//! vocabularies of nano (SmolLM2) and mini (Qwen2.5): what it lets through token by token.

mod common;

use ferrum_engine::{Constraint, ConstraintFactory, Tokenizer};
use serde_json::json;

fn call_schema() -> serde_json::Value {
    let weather = json!({
        "type": "object",
        "properties": {"city": {"type": "string", "enum": ["Paris", "Tokyo"]}},
        "required": ["city"],
        "additionalProperties": false,
    });
    let time = json!({"type": "object", "properties": {}, "additionalProperties": false});
    json!({"anyOf": [
        {"type": "object", "properties": {"name": {"const": "get_weather"}, "arguments": weather},
         "required": ["name", "arguments"], "additionalProperties": false},
        {"type": "object", "properties": {"name": {"const": "get_time"}, "arguments": time},
         "required": ["name", "arguments"], "additionalProperties": false},
    ]})
}

/// Feeds `text`'s tokens through a fresh constraint: `Ok(end allowed)` when every token was
/// allowed, `Err(token index)` at the first refused one.
fn feed(tok: &Tokenizer, c: &Constraint, text: &str) -> Result<bool, usize> {
    let mut c = c.clone();
    let ids = tok.encode(text, false, false).unwrap();
    let mut logits = vec![0f32; tok.vocab_size()];
    for (i, &id) in ids.iter().enumerate() {
        if c.is_stopped() {
            return Err(i); // complete: only the end may follow
        }
        logits.iter_mut().for_each(|l| *l = 0.0);
        c.mask(&mut logits).unwrap();
        if logits[id as usize] == f32::NEG_INFINITY {
            return Err(i);
        }
        c.commit(id).unwrap();
    }
    if c.is_stopped() {
        return Ok(true);
    }
    logits.iter_mut().for_each(|l| *l = 0.0);
    c.mask(&mut logits).unwrap();
    let eos = tok
        .eos_id()
        .or_else(|| tok.eog_ids().first().copied())
        .unwrap();
    Ok(logits[eos as usize] != f32::NEG_INFINITY)
}

fn check(tier: &str) {
    let tok = Tokenizer::from_gguf(common::gguf_metadata(tier)).unwrap();
    let factory = ConstraintFactory::new(&tok).unwrap();
    let c = factory.text_or_calls(&call_schema(), 2).unwrap();
    let call = |city: &str| {
        format!("<tool_call>\n{{\"name\": \"get_weather\", \"arguments\": {{\"city\": \"{city}\"}}}}\n</tool_call>")
    };
    // Text, including text that mentions calls later on, ends when the model likes.
    assert_eq!(feed(&tok, &c, "Hello! How can I help?"), Ok(true), "{tier}");
    assert_eq!(
        feed(&tok, &c, "I will use <tool_call> later"),
        Ok(true),
        "{tier}"
    );
    assert_eq!(feed(&tok, &c, "<b>bold</b> text"), Ok(true), "{tier}");
    // One call, two calls; then only the end.
    assert_eq!(feed(&tok, &c, &call("Paris")), Ok(true), "{tier}");
    let two = format!("{}\n{}", call("Paris"), call("Tokyo"));
    assert_eq!(feed(&tok, &c, &two), Ok(true), "{tier}");
    // A blank line between two blocks is allowed too (models write it), no more than that.
    let spaced = format!("{}\n\n{}", call("Paris"), call("Tokyo"));
    assert_eq!(feed(&tok, &c, &spaced), Ok(true), "{tier}");
    let wide = format!("{}\n\n\n{}", call("Paris"), call("Tokyo"));
    assert!(feed(&tok, &c, &wide).is_err(), "{tier}");
    // A third call is past max_calls (2): refused, as is text after a call.
    let three = format!("{two}\n{}", call("Paris"));
    assert!(feed(&tok, &c, &three).is_err(), "{tier}");
    assert!(
        feed(&tok, &c, &format!("{} and more", call("Paris"))).is_err(),
        "{tier}"
    );
    // Arguments off the schema, an unknown function: refused.
    assert!(feed(&tok, &c, &call("Berlin")).is_err(), "{tier}");
    let unknown = "<tool_call>\n{\"name\": \"get_stock\", \"arguments\": {}}\n</tool_call>";
    assert!(feed(&tok, &c, unknown).is_err(), "{tier}");
    // Bare JSON: a call or an array of calls, valid ones only.
    let bare = r#"{"name": "get_time", "arguments": {}}"#;
    assert_eq!(feed(&tok, &c, bare), Ok(true), "{tier}");
    let array = r#"[{"name": "get_time", "arguments": {}}, {"name": "get_weather", "arguments": {"city": "Tokyo"}}]"#;
    assert_eq!(feed(&tok, &c, array), Ok(true), "{tier}");
    assert!(feed(&tok, &c, r#"{"answer": 42}"#).is_err(), "{tier}");
    // Separators are fixed: no pretty-printing (a small model can wander in whitespace).
    let pretty = "<tool_call>\n{\n  \"name\": \"get_time\", \"arguments\": {}}\n</tool_call>";
    assert!(feed(&tok, &c, pretty).is_err(), "{tier}");
    // Nor a call dressed as text after whitespace.
    assert!(
        feed(&tok, &c, "\n{\"name\": \"get_time\", \"arguments\": {}}").is_err(),
        "{tier}"
    );
    assert!(feed(&tok, &c, " <tool_call>").is_err(), "{tier}");
    // A fenced call (Qwen2.5-Coder's habit) is checked like the others; other fences are text.
    let fenced = "```json\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Tokyo\"}}\n```";
    assert_eq!(feed(&tok, &c, fenced), Ok(true), "{tier}");
    assert_eq!(
        feed(&tok, &c, &format!("{fenced}\n\n{fenced}")),
        Ok(true),
        "{tier}"
    );
    assert!(
        feed(&tok, &c, &fenced.replace("Tokyo", "Rome")).is_err(),
        "{tier}"
    );
    assert_eq!(
        feed(&tok, &c, "```python\nprint(1)\n```"),
        Ok(true),
        "{tier}"
    );
    assert_eq!(feed(&tok, &c, "```js"), Ok(true), "{tier}");
}

#[test]
fn auto_turns_are_text_or_valid_calls_on_nano() {
    check("nano");
}

#[test]
fn auto_turns_are_text_or_valid_calls_on_mini() {
    check("mini");
}
