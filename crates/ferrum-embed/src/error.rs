//! The errors of the embedding runtime: loading a model, and inputs the model cannot take.

use std::path::PathBuf;

/// Why a model could not be loaded or a batch could not be embedded.
#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    #[error("cannot read {}: {source}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `config.json` is not a BERT config this runtime can run.
    #[error("bad model config {}: {message}", .path.display())]
    Config { path: PathBuf, message: String },
    /// `tokenizer.json` could not be read or used.
    #[error("tokenizer {}: {message}", .path.display())]
    Tokenizer { path: PathBuf, message: String },
    /// Text the tokenizer failed on.
    #[error("tokenizing failed: {0}")]
    Tokenize(String),
    /// The weights file is unreadable, or lacks a tensor, or has one of the wrong shape.
    #[error("weights {}: {source}", .path.display())]
    Weights {
        path: PathBuf,
        #[source]
        source: candle_core::Error,
    },
    /// A tensor operation of the forward pass failed.
    #[error("forward pass: {0}")]
    Forward(#[from] candle_core::Error),
    /// An input the model cannot take (callers check inputs with [`crate::Embedder::check`]
    /// first, so this is a guard).
    #[error(transparent)]
    Input(#[from] InputProblem),
}

/// Why the model cannot take an input's tokens.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InputProblem {
    /// More tokens than the model's positions hold once `[CLS]` and `[SEP]` are added.
    #[error("the input has {len} tokens, more than the {max} the model takes")]
    TooLong { len: usize, max: usize },
    /// A token id outside the model's vocabulary.
    #[error("token id {id} is outside the vocabulary (size {vocab})")]
    OutOfVocabulary { id: u32, vocab: usize },
}
