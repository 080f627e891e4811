//! ferrum-engine: the model runtime. GGUF weights, tokenizer, chat templates, model
//! architectures, kernels and the generation loop. It knows nothing of HTTP or databases.
//!
//! The crate's API is what this file re-exports: loading a model ([`LoadedModel`]), running
//! it on its engine thread ([`ModelHandle`], fed [`Request`]s and answering with [`Event`]s),
//! templating and tokenizing ([`ChatTemplate`], [`Tokenizer`]), constraints, and the forward
//! pass for benchmarks ([`Transformer`], [`Workspace`], [`KvCache`]). The modules are private,
//! so their insides can change freely; only `kernels` (its unit tests and the kernel bench
//! reach into the SIMD tiers) and the `testing` helpers stay reachable, hidden from the docs.

mod chat_template;
mod constraint;
mod draft;
mod embeds;
mod engine;
mod error;
mod generate;
mod gguf;
mod kv;
mod model;
mod sampler;
mod sched;
mod service;
mod speculative;
mod tokenizer;

#[doc(hidden)]
pub mod kernels;
#[doc(hidden)]
pub mod testing;

/// ggml's flash-attention arithmetic over f16 keys and values, for other encoders (a vision
/// transformer's full attention is a causal one whose every query sits at the last position).
#[doc(hidden)]
pub mod attention {
    pub use crate::model::flash::{
        attend_tiles_f32, available as tiled_available, FlashScratch, TILE,
    };
    pub use crate::model::ops::{attend_f16, AttnScratch};
}

pub use chat_template::{ChatTemplate, TemplateCaps, TemplateError, CHATML_SOURCE};
pub use constraint::{Constraint, ConstraintError, ConstraintFactory};
pub use draft::Draft;
pub use embeds::{is_placeholder, PromptEmbeds, PLACEHOLDER_BASE};
pub use engine::{LoadOptions, LoadedModel};
pub use error::{EngineError, Result};
pub use generate::{Completion, FinishReason, GenerateParams, Session, TokenEvent};
pub use gguf::{GgufFile, TensorView, WeightsMemory};
pub use kv::{KvCache, KvType, DEFAULT_BLOCK_SIZE};
pub use model::lora::LoraAdapter;
pub use model::ops::{Rope, RopeScaling, RopeStyle};
pub use model::transformer::{Logits, SeqInput, Transformer, Workspace};
pub use model::{Arch, ModelConfig, ModelOptions};
pub use sampler::{argmax, log_sum_exp, top_k, SamplingParams};
pub use service::{
    EngineOptions, EngineStats, Event, ModelHandle, Priority, Request, Sink, SubmitError,
};
pub use tokenizer::{StreamDecoder, Tokenizer, TokenizerError};
