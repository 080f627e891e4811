//! `POST /v1/embeddings`: `CreateEmbeddingRequest` validated into [`EmbeddingRequest`], and the
//! `CreateEmbeddingResponse` types.
//!
//! The input takes the spec's four forms (a string, strings, token ids, arrays of token ids);
//! the limits that do not depend on the model (no empty string or array, at most 2048 inputs)
//! are checked here, the model's own (input length, vocabulary, dimensions) by the server.

use base64::Engine;
use serde::Serialize;
use serde_json::{Map, Value};

use crate::error::ApiError;
use crate::reader::{invalid_type, missing, parse_object, Fields, Result};

/// Most inputs per request (the spec's `maxItems`).
pub const MAX_INPUTS: usize = 2048;

/// Most tokens of all inputs together per request (the spec's limit for every model).
pub const MAX_REQUEST_TOKENS: usize = 300_000;

/// Every member of the spec's `CreateEmbeddingRequest`.
const KNOWN: &[&str] = &["dimensions", "encoding_format", "input", "model", "user"];

/// A validated embeddings request.
#[derive(Debug, Clone, PartialEq)]
pub struct EmbeddingRequest {
    pub model: String,
    pub input: EmbeddingInput,
    pub encoding_format: EncodingFormat,
    /// Fewer dimensions than the model's (checked against the model by the server).
    pub dimensions: Option<usize>,
    pub user: Option<String>,
}

/// The inputs to embed, one embedding each.
#[derive(Debug, Clone, PartialEq)]
pub enum EmbeddingInput {
    /// Texts (`"input": "..."` or `["...", ...]`), none empty.
    Text { texts: Vec<String>, single: bool },
    /// Token ids of the model's tokenizer (`[1, 2]` or `[[1, 2], ...]`), no array empty.
    Tokens { inputs: Vec<Vec<u32>>, single: bool },
}

impl EmbeddingInput {
    /// How many embeddings the request asks for.
    pub fn len(&self) -> usize {
        match self {
            EmbeddingInput::Text { texts, .. } => texts.len(),
            EmbeddingInput::Tokens { inputs, .. } => inputs.len(),
        }
    }

    /// Whether there is no input (never, once validated).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The parameter that names input `i` in errors: `input` when the request sent one input
    /// (a string, or one array of token ids), `input[i]` in an array of inputs.
    pub fn param(&self, i: usize) -> String {
        let (EmbeddingInput::Text { single, .. } | EmbeddingInput::Tokens { single, .. }) = self;
        if *single {
            "input".into()
        } else {
            format!("input[{i}]")
        }
    }
}

/// How embeddings are sent back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncodingFormat {
    /// JSON numbers.
    Float,
    /// The little-endian `f32` bytes, base64-encoded (what the official SDKs ask for).
    Base64,
}

pub fn parse_embedding_request(body: &[u8]) -> Result<EmbeddingRequest> {
    let map = parse_object(body)?;
    EmbeddingRequest::from_json(&map)
}

impl EmbeddingRequest {
    pub fn from_json(map: &Map<String, Value>) -> Result<EmbeddingRequest> {
        let f = Fields::new(map, "");
        f.deny_unknown(KNOWN)?;
        let model = f.required_str("model")?.to_string();
        let input = parse_input(f.get("input").ok_or_else(|| missing("input"))?)?;
        let encoding_format = match f.choice("encoding_format", &["float", "base64"])? {
            Some("base64") => EncodingFormat::Base64,
            _ => EncodingFormat::Float,
        };
        let dimensions = f.integer("dimensions", 1, i64::MAX)?.map(|d| d as usize);
        let user = f.str("user")?.map(str::to_string);
        Ok(EmbeddingRequest {
            model,
            input,
            encoding_format,
            dimensions,
            user,
        })
    }
}

const EXPECTED: &str = "a string, an array of strings, an array of integers, or an array of \
                        arrays of integers";

fn parse_input(v: &Value) -> Result<EmbeddingInput> {
    let list = match v {
        Value::String(s) => {
            return Ok(EmbeddingInput::Text {
                texts: vec![nonempty_text("input", s)?],
                single: true,
            })
        }
        Value::Array(list) => list,
        other => return Err(invalid_type("input", EXPECTED, other)),
    };
    check_length("input", list)?;
    match &list[0] {
        Value::String(_) => texts(list),
        Value::Number(_) => Ok(EmbeddingInput::Tokens {
            inputs: vec![token_ids("input", list)?],
            single: true,
        }),
        Value::Array(_) => token_arrays(list),
        other => Err(invalid_type("input[0]", EXPECTED, other)),
    }
}

/// An array of inputs has 1 to [`MAX_INPUTS`] members.
fn check_length(path: &str, list: &[Value]) -> Result<()> {
    if list.is_empty() {
        return Err(ApiError::invalid_param(
            path,
            "empty_array",
            format!(
                "Invalid '{path}': empty array. Expected an array with minimum length 1, but got \
                 an empty array instead."
            ),
        ));
    }
    if list.len() > MAX_INPUTS {
        return Err(ApiError::invalid_param(
            path,
            "array_above_max_length",
            format!(
                "Invalid '{path}': array too long. Expected an array with maximum length \
                 {MAX_INPUTS}, but got an array with length {} instead.",
                list.len()
            ),
        ));
    }
    Ok(())
}

fn texts(list: &[Value]) -> Result<EmbeddingInput> {
    let texts = list
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let path = format!("input[{i}]");
            match v {
                Value::String(s) => nonempty_text(&path, s),
                other => Err(invalid_type(&path, "a string", other)),
            }
        })
        .collect::<Result<_>>()?;
    Ok(EmbeddingInput::Text {
        texts,
        single: false,
    })
}

fn nonempty_text(path: &str, s: &str) -> Result<String> {
    if s.is_empty() {
        return Err(ApiError::invalid_param(
            path,
            "empty_string",
            format!("Invalid '{path}': empty string. Expected a string with at least 1 character."),
        ));
    }
    Ok(s.to_string())
}

fn token_arrays(list: &[Value]) -> Result<EmbeddingInput> {
    let inputs = list
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let path = format!("input[{i}]");
            match v {
                Value::Array(ids) if ids.is_empty() => Err(ApiError::invalid_param(
                    &path,
                    "empty_array",
                    format!(
                        "Invalid '{path}': empty array. Expected an array with minimum length 1, \
                         but got an empty array instead."
                    ),
                )),
                Value::Array(ids) => token_ids(&path, ids),
                other => Err(invalid_type(&path, "an array of integers", other)),
            }
        })
        .collect::<Result<_>>()?;
    Ok(EmbeddingInput::Tokens {
        inputs,
        single: false,
    })
}

/// Token ids: integers from 0 to `u32::MAX` (whether the model's vocabulary has them is the
/// server's check).
fn token_ids(path: &str, ids: &[Value]) -> Result<Vec<u32>> {
    ids.iter()
        .enumerate()
        .map(|(j, v)| {
            let at = format!("{path}[{j}]");
            match v.as_u64() {
                Some(id) if id <= u32::MAX as u64 => Ok(id as u32),
                _ if v.is_number() => Err(ApiError::invalid_param(
                    &at,
                    "invalid_value",
                    format!("Invalid '{at}': {v} is not a token id (a non-negative integer)."),
                )),
                _ => Err(invalid_type(&at, "an integer", v)),
            }
        })
        .collect()
}

/// `CreateEmbeddingResponse`.
#[derive(Clone, Debug, Serialize)]
pub struct EmbeddingList {
    pub object: &'static str,
    pub data: Vec<Embedding>,
    pub model: String,
    pub usage: EmbeddingUsage,
}

/// One embedding of the response.
#[derive(Clone, Debug, Serialize)]
pub struct Embedding {
    pub object: &'static str,
    pub index: u32,
    pub embedding: EmbeddingVector,
}

/// An embedding as the request's `encoding_format` asked for it.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum EmbeddingVector {
    Float(Vec<f32>),
    Base64(String),
}

impl EmbeddingVector {
    /// `v` as JSON numbers, or as its little-endian `f32` bytes in base64 (as OpenAI sends it).
    pub fn encode(v: Vec<f32>, format: EncodingFormat) -> Self {
        match format {
            EncodingFormat::Float => EmbeddingVector::Float(v),
            EncodingFormat::Base64 => {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                EmbeddingVector::Base64(base64::engine::general_purpose::STANDARD.encode(bytes))
            }
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct EmbeddingUsage {
    pub prompt_tokens: u64,
    pub total_tokens: u64,
}

impl EmbeddingList {
    /// The response for `vectors` (in input order), billed `prompt_tokens`.
    pub fn new(
        model: &str,
        vectors: Vec<Vec<f32>>,
        format: EncodingFormat,
        prompt_tokens: u64,
    ) -> Self {
        let data = vectors
            .into_iter()
            .enumerate()
            .map(|(i, v)| Embedding {
                object: "embedding",
                index: i as u32,
                embedding: EmbeddingVector::encode(v, format),
            })
            .collect();
        EmbeddingList {
            object: "list",
            data,
            model: model.to_string(),
            usage: EmbeddingUsage {
                prompt_tokens,
                total_tokens: prompt_tokens,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_is_the_little_endian_f32_bytes() {
        let encoded = EmbeddingVector::encode(vec![1.0, -2.5, 0.1], EncodingFormat::Base64);
        let EmbeddingVector::Base64(text) = encoded else {
            panic!("not base64")
        };
        // struct.pack('<3f', 1.0, -2.5, 0.1) in base64.
        assert_eq!(text, "AACAPwAAIMDNzMw9");
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text)
            .unwrap();
        let back: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        assert_eq!(back, [1.0, -2.5, 0.1]);
        let float = EmbeddingVector::encode(vec![0.5], EncodingFormat::Float);
        assert_eq!(serde_json::to_string(&float).unwrap(), "[0.5]");
    }
}
