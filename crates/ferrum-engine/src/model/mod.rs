//! Model architectures. `llama` (SmolLM2) and `qwen2` (Qwen2.5) share one decoder-only
//! transformer ([`transformer::Transformer`]) that differs only in configuration: Q/K/V biases
//! and the RoPE pairing. A model never owns a KV cache or sees a request: the caller lends it a
//! cache and a workspace for each forward pass.

pub mod flash;
pub mod ops;
pub mod transformer;

use crate::error::{EngineError, Result};
use crate::gguf::GgufFile;
use ops::RopeStyle;

/// Architectures ferrum runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Qwen2,
}

impl Arch {
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "llama" => Ok(Arch::Llama),
            "qwen2" => Ok(Arch::Qwen2),
            other => Err(EngineError::UnsupportedArchitecture(other.to_string())),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
        }
    }

    fn rope_style(self) -> RopeStyle {
        match self {
            Arch::Llama => RopeStyle::Interleaved,
            Arch::Qwen2 => RopeStyle::Neox,
        }
    }
}

/// Hyper-parameters of a decoder-only transformer, read from GGUF metadata.
#[derive(Clone, Debug)]
pub struct ModelConfig {
    pub arch: Arch,
    pub n_layers: usize,
    pub d_model: usize,
    pub d_ff: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub rope_dims: usize,
    pub rope_base: f32,
    pub rope_style: RopeStyle,
    pub rms_eps: f32,
    pub context_length: usize,
    pub vocab_size: usize,
}

impl ModelConfig {
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self> {
        let arch = Arch::from_name(gguf.get_str("general.architecture")?)?;
        let key = |k: &str| format!("{}.{k}", arch.name());
        let d_model = gguf.get_usize(&key("embedding_length"))?;
        let n_heads = gguf.get_usize(&key("attention.head_count"))?;
        let n_kv_heads = gguf
            .get_usize(&key("attention.head_count_kv"))
            .unwrap_or(n_heads);
        let head_dim = gguf
            .get_usize(&key("attention.key_length"))
            .unwrap_or(d_model / n_heads.max(1));
        let vocab_size = gguf.tensor("token_embd.weight")?.dims[1];
        let cfg = ModelConfig {
            arch,
            n_layers: gguf.get_usize(&key("block_count"))?,
            d_model,
            d_ff: gguf.get_usize(&key("feed_forward_length"))?,
            n_heads,
            n_kv_heads,
            head_dim,
            rope_dims: gguf
                .get_usize(&key("rope.dimension_count"))
                .unwrap_or(head_dim),
            rope_base: gguf.get_f32(&key("rope.freq_base")).unwrap_or(10_000.0),
            rope_style: arch.rope_style(),
            rms_eps: gguf.get_f32(&key("attention.layer_norm_rms_epsilon"))?,
            context_length: gguf.get_usize(&key("context_length"))?,
            vocab_size,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<()> {
        let bad = |what: &str| EngineError::MissingMetadata {
            key: format!("{}.{what} (inconsistent value)", self.arch.name()),
        };
        if self.n_heads == 0
            || self.n_kv_heads == 0
            || !self.n_heads.is_multiple_of(self.n_kv_heads)
        {
            return Err(bad("attention.head_count_kv"));
        }
        if self.rope_dims > self.head_dim || !self.rope_dims.is_multiple_of(2) {
            return Err(bad("rope.dimension_count"));
        }
        if self.n_layers == 0 || self.d_model == 0 || self.d_ff == 0 {
            return Err(bad("block_count"));
        }
        Ok(())
    }

    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }
}
