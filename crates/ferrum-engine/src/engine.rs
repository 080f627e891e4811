//! A model ready to serve: GGUF file, weights, tokenizer, chat template and kernel threads.

use std::path::{Path, PathBuf};

use std::sync::OnceLock;

use crate::chat_template::ChatTemplate;
use crate::constraint::{ConstraintError, ConstraintFactory};
use crate::error::Result;
use crate::generate::{Generator, Session};
use crate::gguf::{GgufFile, WeightsMemory};
use crate::kernels::ThreadPool;
use crate::kv::KvType;
use crate::model::ops::RopeScaling;
use crate::model::transformer::Transformer;
use crate::model::ModelOptions;
use crate::tokenizer::Tokenizer;

/// How to load a model.
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// Kernel threads (default: the machine's available parallelism or `FERRUM_THREADS`).
    pub threads: Option<usize>,
    /// Context window; defaults to the model's trained context length.
    pub context_length: Option<usize>,
    /// Longest prefill chunk (default 512).
    pub prefill_chunk: Option<usize>,
    /// Where the weights live (default: huge-page memory; `FERRUM_WEIGHTS_MEMORY=mmap` maps).
    pub weights_memory: WeightsMemory,
    /// RoPE scaling instead of the GGUF's; the default context becomes the scaled one.
    pub rope_scaling: Option<RopeScaling>,
    /// How the KV cache stores keys and values (default f16).
    pub kv_type: KvType,
}

/// A loaded model.
pub struct LoadedModel {
    pub path: PathBuf,
    pub model: Transformer,
    pub tokenizer: Tokenizer,
    /// The GGUF's chat template, if it has one.
    pub template: Option<ChatTemplate>,
    pub pool: ThreadPool,
    pub context_length: usize,
    pub prefill_chunk: usize,
    /// Built on first use (indexing the vocabulary takes a moment).
    constraints: OnceLock<Result<ConstraintFactory, String>>,
}

impl LoadedModel {
    pub fn load(path: &Path, opts: &LoadOptions) -> Result<Self> {
        let gguf = GgufFile::open_with(path, opts.weights_memory)?;
        let model = Transformer::load_with(
            &gguf,
            &ModelOptions {
                rope_scaling: opts.rope_scaling,
                kv_type: opts.kv_type,
            },
        )?;
        let tokenizer = Tokenizer::from_gguf(gguf.metadata())?;
        let template = match gguf.get("tokenizer.chat_template") {
            Some(_) => Some(ChatTemplate::from_gguf(gguf.metadata(), &tokenizer)?),
            None => None,
        };
        let context_length = opts
            .context_length
            .unwrap_or(model.cfg.context_length)
            .max(1);
        let pool = match opts.threads {
            Some(n) => ThreadPool::new(n),
            None => ThreadPool::with_default_threads(),
        };
        tracing::info!(
            path = %path.display(),
            arch = model.cfg.arch.name(),
            layers = model.cfg.n_layers,
            context_length,
            rope_scaling = ?model.cfg.rope_scaling,
            kv_type = model.kv_type().name(),
            threads = pool.n_threads(),
            "model loaded"
        );
        Ok(LoadedModel {
            path: path.to_path_buf(),
            model,
            tokenizer,
            template,
            pool,
            context_length,
            prefill_chunk: opts.prefill_chunk.unwrap_or(512),
            constraints: OnceLock::new(),
        })
    }

    /// A fresh conversation state (KV cache) for this model.
    pub fn new_session(&self) -> Session {
        Session::new(&self.model, self.context_length)
    }

    /// KV cache bytes per position of this model (keys and values of every layer).
    pub fn kv_bytes_per_position(&self) -> usize {
        2 * self.model.cfg.n_layers * self.model.kv_type().row_bytes(self.model.cfg.kv_dim())
    }

    /// The factory of grammar constraints over this model's vocabulary.
    pub fn constraints(&self) -> Result<&ConstraintFactory, ConstraintError> {
        self.constraints
            .get_or_init(|| ConstraintFactory::new(&self.tokenizer).map_err(|e| e.to_string()))
            .as_ref()
            .map_err(|e| ConstraintError::Vocabulary(e.clone()))
    }

    pub fn generator(&self) -> Generator<'_> {
        Generator {
            model: &self.model,
            tokenizer: &self.tokenizer,
            pool: &self.pool,
            prefill_chunk: self.prefill_chunk,
        }
    }
}
