//! The engine's error type: every way loading or running a model can fail, as typed variants.

use std::path::PathBuf;

/// Errors of the model runtime. Each carries enough context for a clear message; the server maps
/// them to OpenAI error shapes in exactly one place.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("model file {path} could not be read: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a valid GGUF file: {message}")]
    CorruptGguf { path: PathBuf, message: String },
    #[error("GGUF metadata key `{key}` is missing or has the wrong type")]
    MissingMetadata { key: String },
    #[error("tensor `{name}` is missing from the GGUF file")]
    MissingTensor { name: String },
    #[error("tensor `{name}` has shape {actual:?}, expected {expected:?}")]
    BadTensorShape {
        name: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },
    #[error("unsupported model architecture `{0}` (supported: llama, qwen2)")]
    UnsupportedArchitecture(String),
    #[error("tensor `{name}` uses quantization type {dtype}, which ferrum does not support")]
    UnsupportedQuantization { name: String, dtype: String },
    #[error(
        "this model's maximum context length is {max} tokens, but the request needs {requested} tokens"
    )]
    ContextLengthExceeded { requested: usize, max: usize },
    #[error("token id {id} is outside the vocabulary (size {vocab})")]
    TokenOutOfRange { id: u32, vocab: usize },
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error(transparent)]
    Tokenizer(#[from] crate::tokenizer::TokenizerError),
    #[error(transparent)]
    Template(#[from] crate::chat_template::TemplateError),
    #[error("invalid model option: {0}")]
    InvalidOption(String),
    #[error("internal engine error: {0}")]
    Internal(String),
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;
