//! Chat template rendering: syntax, Python behaviour, message shapes, limits and errors.

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
