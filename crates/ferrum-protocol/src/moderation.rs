//! `POST /v1/moderations`: `CreateModerationRequest` validated into [`ModerationRequest`]; the
//! `CreateModerationResponse` types; and the content filter annotations of chat completions
//! and responses, in Azure OpenAI's shape (`prompt_filter_results`, `content_filter_results`).
//!
//! The input takes the spec's three forms: a string (one result), an array of strings (one
//! result each) and an array of multimodal parts (one result for all of them together, as
//! OpenAI's omni models answer). Which parts a classifier can read is the server's business.

use serde::Serialize;
use serde_json::{Map, Value};

use crate::error::ApiError;
use crate::reader::{invalid_type, invalid_value, missing, parse_object, Fields, Result};

/// The moderation models the spec names; `omni-moderation-latest` is the default.
pub const MODELS: &[&str] = &[
    "omni-moderation-latest",
    "omni-moderation-2024-09-26",
    "text-moderation-latest",
    "text-moderation-stable",
];

/// Most inputs (strings or parts) per request.
pub const MAX_INPUTS: usize = 2048;

/// Most characters of all inputs together per request: a lexical pass is linear, but an
/// unbounded one would still hold a core for seconds.
pub const MAX_CHARS: usize = 2_000_000;

/// Every member of the spec's `CreateModerationRequest`.
const KNOWN: &[&str] = &["input", "model"];

/// A validated moderation request.
#[derive(Debug, Clone, PartialEq)]
pub struct ModerationRequest {
    pub model: &'static str,
    pub input: ModerationInput,
}

/// What to classify.
#[derive(Debug, Clone, PartialEq)]
pub enum ModerationInput {
    /// `"input": "..."` or `["...", ...]`: one result per text.
    Texts(Vec<String>),
    /// `"input": [{"type": "text", ...}, {"type": "image_url", ...}]`: one result for all.
    Parts(Vec<Part>),
}

/// One part of a multimodal input.
#[derive(Debug, Clone, PartialEq)]
pub enum Part {
    Text(String),
    ImageUrl(String),
}

impl ModerationRequest {
    /// Whether the model is one of the text-only `text-moderation-*` models.
    pub fn text_only_model(&self) -> bool {
        self.model.starts_with("text-moderation")
    }
}

pub fn parse_moderation_request(body: &[u8]) -> Result<ModerationRequest> {
    let map = parse_object(body)?;
    ModerationRequest::from_json(&map)
}

impl ModerationRequest {
    pub fn from_json(map: &Map<String, Value>) -> Result<ModerationRequest> {
        let f = Fields::new(map, "");
        f.deny_unknown(KNOWN)?;
        let model = match f.str("model")? {
            None => MODELS[0],
            Some(m) => MODELS
                .iter()
                .copied()
                .find(|k| *k == m)
                .ok_or_else(|| invalid_value("model", m, MODELS))?,
        };
        let input = parse_input(f.get("input").ok_or_else(|| missing("input"))?)?;
        let chars: usize = match &input {
            ModerationInput::Texts(t) => t.iter().map(String::len).sum(),
            ModerationInput::Parts(p) => p
                .iter()
                .map(|p| match p {
                    Part::Text(t) | Part::ImageUrl(t) => t.len(),
                })
                .sum(),
        };
        if chars > MAX_CHARS {
            return Err(ApiError::invalid_param(
                "input",
                "string_above_max_length",
                format!(
                    "Invalid 'input': the inputs hold {chars} bytes of text together; this \
                     server classifies at most {MAX_CHARS} per request."
                ),
            ));
        }
        Ok(ModerationRequest { model, input })
    }
}

const EXPECTED: &str = "a string, an array of strings, or an array of input objects";

fn parse_input(v: &Value) -> Result<ModerationInput> {
    let list = match v {
        Value::String(s) => return Ok(ModerationInput::Texts(vec![s.clone()])),
        Value::Array(list) => list,
        other => return Err(invalid_type("input", EXPECTED, other)),
    };
    if list.is_empty() {
        return Err(ApiError::invalid_param(
            "input",
            "empty_array",
            "Invalid 'input': empty array. Expected an array with minimum length 1, but got an \
             empty array instead.",
        ));
    }
    if list.len() > MAX_INPUTS {
        return Err(ApiError::invalid_param(
            "input",
            "array_above_max_length",
            format!(
                "Invalid 'input': array too long. Expected an array with maximum length \
                 {MAX_INPUTS}, but got an array with length {} instead.",
                list.len()
            ),
        ));
    }
    // The first member decides the form; every other must be of the same form.
    if list[0].is_object() {
        let parts = list
            .iter()
            .enumerate()
            .map(|(i, v)| parse_part(&format!("input[{i}]"), v))
            .collect::<Result<_>>()?;
        return Ok(ModerationInput::Parts(parts));
    }
    let texts = list
        .iter()
        .enumerate()
        .map(|(i, v)| match v {
            Value::String(s) => Ok(s.clone()),
            other => Err(invalid_type(&format!("input[{i}]"), "a string", other)),
        })
        .collect::<Result<_>>()?;
    Ok(ModerationInput::Texts(texts))
}

fn parse_part(path: &str, v: &Value) -> Result<Part> {
    let Value::Object(map) = v else {
        return Err(invalid_type(path, "an object", v));
    };
    let f = Fields::new(map, path);
    match f.choice("type", &["text", "image_url"])? {
        None => Err(missing(&f.path_of("type"))),
        Some("text") => {
            f.deny_unknown(&["type", "text"])?;
            Ok(Part::Text(f.required_str("text")?.to_string()))
        }
        Some(_) => {
            f.deny_unknown(&["type", "image_url"])?;
            let image = f
                .object("image_url")?
                .ok_or_else(|| missing(&f.path_of("image_url")))?;
            image.deny_unknown(&["url", "detail"])?;
            Ok(Part::ImageUrl(image.required_str("url")?.to_string()))
        }
    }
}

/// `CreateModerationResponse`.
#[derive(Clone, Debug, Serialize)]
pub struct Moderation {
    pub id: String,
    pub model: String,
    pub results: Vec<ModerationResult>,
}

/// One input's classification: per category (by its spec name, `harassment/threatening`),
/// whether it is flagged, its score in [0, 1], and the input types the score applies to.
#[derive(Clone, Debug, Serialize)]
pub struct ModerationResult {
    pub flagged: bool,
    pub categories: Map<String, Value>,
    pub category_scores: Map<String, Value>,
    pub category_applied_input_types: Map<String, Value>,
}

/// How much harm a text carries in one content filter category (Azure OpenAI's levels).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Safe,
    Low,
    Medium,
    High,
}

/// One category's annotation: its severity, and whether the text was withheld for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct SeverityResult {
    pub filtered: bool,
    pub severity: Severity,
}

/// `content_filter_results`: Azure OpenAI's four harm categories, plus `illicit` (OpenAI's
/// moderation category that none of Azure's covers).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct FilterResults {
    pub hate: SeverityResult,
    pub self_harm: SeverityResult,
    pub sexual: SeverityResult,
    pub violence: SeverityResult,
    pub illicit: SeverityResult,
}

/// One entry of `prompt_filter_results` (a chat request has one prompt, index 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct PromptFilterResult {
    pub prompt_index: u32,
    pub content_filter_results: FilterResults,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: Value) -> Result<ModerationRequest> {
        parse_moderation_request(v.to_string().as_bytes())
    }

    #[test]
    fn the_three_input_forms() {
        let r = parse(serde_json::json!({"input": "hi"})).unwrap();
        assert_eq!(r.model, "omni-moderation-latest");
        assert_eq!(r.input, ModerationInput::Texts(vec!["hi".into()]));
        let r = parse(serde_json::json!({"input": ["a", "b"], "model": "text-moderation-latest"}))
            .unwrap();
        assert!(r.text_only_model());
        assert_eq!(
            r.input,
            ModerationInput::Texts(vec!["a".into(), "b".into()])
        );
        let r = parse(serde_json::json!({"input": [
            {"type": "text", "text": "a"},
            {"type": "image_url", "image_url": {"url": "https://x/y.png"}},
        ]}))
        .unwrap();
        assert_eq!(
            r.input,
            ModerationInput::Parts(vec![
                Part::Text("a".into()),
                Part::ImageUrl("https://x/y.png".into())
            ])
        );
    }

    #[test]
    fn bad_inputs_name_their_parameter() {
        let cases = [
            (serde_json::json!({}), "input", "missing_required_parameter"),
            (serde_json::json!({"input": 3}), "input", "invalid_type"),
            (serde_json::json!({"input": []}), "input", "empty_array"),
            (
                serde_json::json!({"input": ["a", 1]}),
                "input[1]",
                "invalid_type",
            ),
            (
                serde_json::json!({"input": [{"type": "text", "text": "a"}, "b"]}),
                "input[1]",
                "invalid_type",
            ),
            (
                serde_json::json!({"input": [{"type": "audio"}]}),
                "input[0].type",
                "invalid_value",
            ),
            (
                serde_json::json!({"input": [{"type": "text"}]}),
                "input[0].text",
                "missing_required_parameter",
            ),
            (
                serde_json::json!({"input": "a", "model": "gpt-4.1"}),
                "model",
                "invalid_value",
            ),
        ];
        for (body, param, code) in cases {
            let e = parse(body.clone()).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{body}: {e:?}");
            assert_eq!(e.code.as_deref(), Some(code), "{body}: {e:?}");
        }
        let e = parse(serde_json::json!({"input": "a", "temperature": 1})).unwrap_err();
        assert_eq!(e.code.as_deref(), Some("unknown_parameter"));
    }

    #[test]
    fn annotations_serialize_as_azure_does() {
        let safe = SeverityResult {
            filtered: false,
            severity: Severity::Safe,
        };
        let r = PromptFilterResult {
            prompt_index: 0,
            content_filter_results: FilterResults {
                hate: safe,
                self_harm: safe,
                sexual: safe,
                violence: SeverityResult {
                    filtered: true,
                    severity: Severity::High,
                },
                illicit: safe,
            },
        };
        let v = serde_json::to_value(r).unwrap();
        assert_eq!(
            v["content_filter_results"]["violence"],
            serde_json::json!({"filtered": true, "severity": "high"})
        );
        assert_eq!(v["content_filter_results"]["self_harm"]["severity"], "safe");
    }
}
