//! What can go wrong turning lines into examples, and training.

use thiserror::Error;

/// Why one line of a fine-tune file cannot be trained on. The message is written for the
/// user (the job runner prefixes the line number).
#[derive(Debug, Error)]
pub enum DataError {
    #[error("{0}")]
    Invalid(String),
    #[error("the model has no chat template")]
    NoTemplate,
    #[error("the chat template failed: {0}")]
    Template(String),
    #[error("the example has {tokens} tokens, more than the model's context of {max}")]
    TooLong { tokens: usize, max: usize },
}

/// Why training stopped with an error.
#[derive(Debug, Error)]
pub enum TrainError {
    #[error("tensor error: {0}")]
    Tensor(#[from] candle_core::Error),
    #[error(transparent)]
    Engine(#[from] ferrum_engine::EngineError),
    #[error("the checkpoint cannot be resumed: {0}")]
    BadCheckpoint(String),
    #[error("{0}")]
    Invalid(String),
}
