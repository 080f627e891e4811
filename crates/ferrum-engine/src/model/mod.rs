//! Model architectures. `llama` (SmolLM2) and `qwen2` (Qwen2.5) share one decoder-only
//! transformer ([`transformer::Transformer`]) that differs only in configuration: Q/K/V biases
//! and the RoPE pairing. A model never owns a KV cache or sees a request: the caller lends it a
//! cache and a workspace for each forward pass.

pub mod flash;
pub mod lora;
pub mod ops;
pub mod transformer;

use crate::error::{EngineError, Result};
use crate::gguf::GgufFile;
use ops::{RopeScaling, RopeStyle};

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

/// A deployment's choices for a model, beyond what its GGUF says.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ModelOptions {
    /// RoPE scaling to use instead of the GGUF's (which is usually none).
    pub rope_scaling: Option<RopeScaling>,
    /// How the KV cache stores keys and values.
    pub kv_type: crate::kv::KvType,
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
    /// RoPE scaling from the GGUF (`<arch>.rope.scaling.*`) or the deployment's config.
    pub rope_scaling: Option<RopeScaling>,
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
            rope_scaling: None,
            rms_eps: gguf.get_f32(&key("attention.layer_norm_rms_epsilon"))?,
            context_length: gguf.get_usize(&key("context_length"))?,
            vocab_size,
        };
        let cfg = ModelConfig {
            rope_scaling: rope_scaling_of(gguf, &key, cfg.context_length)?,
            ..cfg
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Replaces the GGUF's RoPE scaling (a deployment's choice, e.g. YaRN to stretch Qwen2.5
    /// from 32k to 128k positions). A YaRN `original_context` of 0 means the GGUF's context
    /// length. The context window becomes the original context times the factor, as llama.cpp
    /// sets it for a custom YaRN scaling.
    pub fn with_rope_scaling(mut self, mut scaling: RopeScaling) -> Result<Self> {
        let factor = scaling.factor();
        if !(factor.is_finite() && factor >= 1.0) {
            return Err(EngineError::InvalidOption(format!(
                "the RoPE scaling factor must be a number >= 1, got {factor}"
            )));
        }
        let original = match &mut scaling {
            RopeScaling::Yarn {
                original_context, ..
            } => {
                if *original_context == 0 {
                    *original_context = self.context_length;
                }
                *original_context
            }
            RopeScaling::Linear { .. } => self.context_length,
        };
        self.context_length = (original as f64 * factor as f64) as usize;
        self.rope_scaling = Some(scaling);
        Ok(self)
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

/// The RoPE scaling a GGUF declares (`<arch>.rope.scaling.type` and its parameters), as llama.cpp
/// reads it: `none` or no key is plain RoPE.
fn rope_scaling_of(
    gguf: &GgufFile,
    key: &dyn Fn(&str) -> String,
    context_length: usize,
) -> Result<Option<RopeScaling>> {
    let Ok(kind) = gguf.get_str(&key("rope.scaling.type")) else {
        return Ok(None);
    };
    let factor = gguf.get_f32(&key("rope.scaling.factor")).unwrap_or(0.0);
    if kind == "none" || factor == 0.0 || factor == 1.0 {
        return Ok(None);
    }
    match kind {
        "linear" => Ok(Some(RopeScaling::Linear { factor })),
        "yarn" => Ok(Some(RopeScaling::Yarn {
            factor,
            original_context: gguf
                .get_usize(&key("rope.scaling.original_context_length"))
                .unwrap_or(context_length),
            beta_fast: gguf
                .get_f32(&key("rope.scaling.yarn_beta_fast"))
                .unwrap_or(32.0),
            beta_slow: gguf
                .get_f32(&key("rope.scaling.yarn_beta_slow"))
                .unwrap_or(1.0),
        })),
        other => Err(EngineError::InvalidOption(format!(
            "unsupported RoPE scaling type `{other}` (supported: none, linear, yarn)"
        ))),
    }
}
