//! ferrum-engine: the model runtime. GGUF weights, tokenizer, chat templates, model
//! architectures, kernels and the generation loop. It knows nothing of HTTP or databases.

pub mod chat_template;
pub mod constraint;
pub mod draft;
pub mod error;
pub mod gguf;
pub mod kernels;
pub mod tokenizer;

pub use error::{EngineError, Result};
pub mod engine;
pub mod generate;
pub mod kv;
pub mod model;
pub mod sampler;
pub mod sched;
pub mod service;
pub mod speculative;
#[doc(hidden)]
pub mod testing;
