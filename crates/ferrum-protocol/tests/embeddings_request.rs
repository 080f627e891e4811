//! Validation of embeddings requests: the four input forms, the options, and for each kind of
//! bad input the OpenAI error (`param`, `code`) a client gets.

use ferrum_protocol::embeddings::MAX_INPUTS;
use ferrum_protocol::{parse_embedding_request, EmbeddingInput, EncodingFormat};
use serde_json::{json, Value};

fn body(input: Value, extra: Value) -> Vec<u8> {
    let mut body = json!({"model": "text-embedding-3-small", "input": input});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    serde_json::to_vec(&body).unwrap()
}

/// Parses a request with `input` and no options.
fn input(input: Value) -> EmbeddingInput {
    parse_embedding_request(&body(input, json!({})))
        .unwrap()
        .input
}

/// Expects a 400 with this `param` and `code`.
fn check_rejected(body: &[u8], param: Option<&str>, code: Option<&str>) {
    let err = parse_embedding_request(body).expect_err("request should be rejected");
    assert_eq!(err.status, 400, "{err:?}");
    assert_eq!(
        (err.param.as_deref(), err.code.as_deref()),
        (param, code),
        "{err:?}"
    );
    assert_eq!(err.body()["error"]["type"], "invalid_request_error");
}

#[test]
fn the_four_input_forms_parse() {
    assert_eq!(
        input(json!("hello")),
        EmbeddingInput::Text {
            texts: vec!["hello".into()],
            single: true
        }
    );
    assert_eq!(
        input(json!(["a", "b"])),
        EmbeddingInput::Text {
            texts: vec!["a".into(), "b".into()],
            single: false
        }
    );
    assert_eq!(
        input(json!([1, 2, 3])),
        EmbeddingInput::Tokens {
            inputs: vec![vec![1, 2, 3]],
            single: true
        }
    );
    let nested = input(json!([[1], [2, 3]]));
    assert_eq!(
        nested,
        EmbeddingInput::Tokens {
            inputs: vec![vec![1], vec![2, 3]],
            single: false
        }
    );
    assert_eq!(nested.len(), 2);
    assert_eq!(nested.param(1), "input[1]");
    assert_eq!(input(json!([7])).param(0), "input");
}

#[test]
fn options_parse_with_openai_defaults() {
    let plain = parse_embedding_request(&body(json!("x"), json!({}))).unwrap();
    assert_eq!(plain.encoding_format, EncodingFormat::Float);
    assert_eq!((plain.dimensions, plain.user), (None, None));
    let full = parse_embedding_request(&body(
        json!("x"),
        json!({"encoding_format": "base64", "dimensions": 64, "user": "u-1"}),
    ))
    .unwrap();
    assert_eq!(full.encoding_format, EncodingFormat::Base64);
    assert_eq!(full.dimensions, Some(64));
    assert_eq!(full.user.as_deref(), Some("u-1"));
    // null is absent, as for every optional member of the spec.
    let nulls = body(
        json!("x"),
        json!({"encoding_format": null, "dimensions": null}),
    );
    assert!(parse_embedding_request(&nulls).is_ok());
}

#[test]
fn empty_inputs_are_refused() {
    for (input, param, code) in [
        (json!(""), "input", "empty_string"),
        (json!([]), "input", "empty_array"),
        (json!(["a", ""]), "input[1]", "empty_string"),
        (json!([[1], []]), "input[1]", "empty_array"),
    ] {
        check_rejected(&body(input, json!({})), Some(param), Some(code));
    }
}

#[test]
fn more_than_2048_inputs_are_refused() {
    let ok: Vec<String> = vec!["a".into(); MAX_INPUTS];
    assert_eq!(input(json!(ok)).len(), MAX_INPUTS);
    let too_many: Vec<String> = vec!["a".into(); MAX_INPUTS + 1];
    check_rejected(
        &body(json!(too_many), json!({})),
        Some("input"),
        Some("array_above_max_length"),
    );
    let too_many_ids: Vec<u32> = vec![1; MAX_INPUTS + 1];
    check_rejected(
        &body(json!(too_many_ids), json!({})),
        Some("input"),
        Some("array_above_max_length"),
    );
}

#[test]
fn mixed_or_mistyped_inputs_name_the_member() {
    for (input, param, code) in [
        (json!(5), "input", "invalid_type"),
        (json!({"text": "a"}), "input", "invalid_type"),
        (json!(["a", 1]), "input[1]", "invalid_type"),
        (json!([1, "a"]), "input[1]", "invalid_type"),
        (json!([[1], 2]), "input[1]", "invalid_type"),
        (json!([[1, "x"]]), "input[0][1]", "invalid_type"),
        (json!([1, -1]), "input[1]", "invalid_value"),
        (json!([[4294967296u64]]), "input[0][0]", "invalid_value"),
        (json!([1.5]), "input[0]", "invalid_value"),
        (json!([null]), "input[0]", "invalid_type"),
    ] {
        check_rejected(&body(input, json!({})), Some(param), Some(code));
    }
}

#[test]
fn bad_options_and_unknown_members_are_refused() {
    for (extra, param, code) in [
        (
            json!({"encoding_format": "int8"}),
            Some("encoding_format"),
            "invalid_value",
        ),
        (
            json!({"dimensions": 0}),
            Some("dimensions"),
            "integer_below_min_value",
        ),
        (
            json!({"dimensions": "64"}),
            Some("dimensions"),
            "invalid_type",
        ),
        (json!({"user": 3}), Some("user"), "invalid_type"),
        (json!({"temperature": 1}), None, "unknown_parameter"),
    ] {
        check_rejected(&body(json!("x"), extra), param, Some(code));
    }
    let no_model = serde_json::to_vec(&json!({"input": "x"})).unwrap();
    check_rejected(&no_model, Some("model"), Some("missing_required_parameter"));
    let no_input = serde_json::to_vec(&json!({"model": "m"})).unwrap();
    check_rejected(&no_input, Some("input"), Some("missing_required_parameter"));
}
