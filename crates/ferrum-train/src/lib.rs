//! ferrum-train: supervised LoRA fine-tuning of a GGUF model, in process.
//!
//! - [`data`]: a fine-tune file's chat lines (`{"messages": [...], "tools": [...]}`) rendered
//!   with the model's own chat template and tokenized, with a mask of the tokens the loss is
//!   taken on (the assistant turns' content and their end-of-turn token, as OpenAI trains).
//! - [`trainer`]: the training loop: the base weights frozen (dequantized to f32 once), LoRA
//!   adapters on the attention projections, candle's autograd for the backward pass, AdamW with
//!   warm-up and linear decay, gradient accumulation to the batch size, deterministic for a
//!   seed, and resumable from a checkpoint taken at the end of each epoch.
//! - [`adapter`]: adapters written in llama.cpp's LoRA GGUF format, which ferrum's engine
//!   ([`ferrum_engine::LoraAdapter`]) and llama.cpp (`--lora`) both load.
//!
//! It knows nothing of HTTP or databases: the server's job runner feeds it examples and stores
//! what it reports.

mod adapter;
mod data;
mod error;
mod model;
mod state;
mod trainer;

pub use adapter::adapter_gguf;
pub use data::{chat_example, read_chat_examples, Example, LineError};
pub use error::{DataError, TrainError};
pub use model::MAX_TRAIN_TOKENS;
pub use trainer::{
    train, Control, EpochReport, Hyperparameters, Outcome, Progress, StepReport, TrainSettings,
};
