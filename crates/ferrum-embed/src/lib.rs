//! ferrum's text embeddings: a BERT sentence encoder (sentence-transformers' layout: a
//! `model.safetensors`, its `tokenizer.json` and `config.json`) run natively with candle, mean
//! pooling over the attention mask and L2 normalisation as sentence-transformers computes them,
//! and a worker thread that batches concurrent requests into one forward pass.
//!
//! ```no_run
//! use ferrum_embed::{BatchOptions, EmbedHandle, Embedder, EmbedderOptions, ModelFiles};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let files = ModelFiles::in_dir("all-MiniLM-L6-v2".as_ref());
//! let embedder = Embedder::load(&files, &EmbedderOptions::default())?;
//! let tokens = embedder.tokenize("The quick brown fox")?;
//! let vectors = embedder.embed(&[tokens.as_slice()])?; // one unit vector of 384 floats
//! let handle = EmbedHandle::spawn(embedder, BatchOptions::default())?;
//! # Ok(()) }
//! ```
//!
//! Architecture invariant: this crate knows nothing of HTTP, JSON wire types, the registry or
//! tokio; the server hands it files and token ids and gets vectors back through a callback.

mod error;
mod model;
pub mod pooling;
mod service;
#[doc(hidden)]
pub mod testing;
mod tokenize;

pub use error::{EmbedError, InputProblem};
pub use model::{Embedder, EmbedderOptions, ModelFiles};
pub use service::{BatchFailed, BatchOptions, EmbedHandle, EmbedStats, Reply, SubmitError};
