//! The tiers this server runs: which are loaded, loading them (at start, on first use for lazy
//! tiers, or by the operator), unloading them and pointing them at new weights without a
//! restart. Loading runs on a blocking thread; concurrent requests for a tier that is loading
//! wait for that one load. A tier serves either chat (an engine) or embeddings (an embedding
//! worker), as its `kind` says; asking one for the other is the client's mistake.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use ferrum_engine::{
    Draft, EngineOptions, EngineStats, KvType, LoadOptions, LoadedModel, LoraAdapter, ModelHandle,
    Request, RopeScaling, SubmitError, WeightsMemory,
};
use ferrum_protocol::ApiError;
use ferrum_registry::{
    KvCacheType, LoadPolicy, ModelKind, Registry, RopeScalingConfig, RopeScalingKind, Tier,
    WeightsSource,
};
use tokio::sync::Mutex;

/// How models are loaded and scheduled.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Kernel threads per model (default: all cores).
    pub threads: Option<usize>,
    /// Per model: queue size, sequences batched together, tokens per step, KV memory.
    pub scheduling: EngineOptions,
    /// The KV cache type of tiers whose config does not name one.
    pub kv_type: KvType,
}

/// A tier's RoPE scaling in the engine's terms.
fn rope_scaling(config: &RopeScalingConfig) -> RopeScaling {
    match config.kind {
        RopeScalingKind::Linear => RopeScaling::Linear {
            factor: config.factor,
        },
        RopeScalingKind::Yarn => RopeScaling::Yarn {
            factor: config.factor,
            // 0: the GGUF's context length.
            original_context: config.original_context.unwrap_or(0),
            beta_fast: config.beta_fast.unwrap_or(32.0),
            beta_slow: config.beta_slow.unwrap_or(1.0),
        },
    }
}

/// The seam between the HTTP layer and a model's engine: the loaded model (to template and
/// tokenize requests off the engine thread), a queue taking requests whose `Sink` receives
/// their events (a sink returning `Break` cancels), and counters. `ModelHandle` is the real
/// one; tests drive the routes with a scripted engine behind this trait, without weights.
pub trait Engine: Send + Sync {
    fn model(&self) -> &LoadedModel;
    fn shared_model(&self) -> Arc<LoadedModel>;
    fn stats(&self) -> &EngineStats;
    fn submit(&self, request: Request) -> Result<(), SubmitError>;
    /// Background requests waiting, and the queue capacity flex requests are refused at
    /// (an engine without queues, such as a test's fake, never refuses).
    fn background_backlog(&self) -> (usize, usize) {
        (0, usize::MAX)
    }
}

impl Engine for ModelHandle {
    fn model(&self) -> &LoadedModel {
        ModelHandle::model(self)
    }
    fn shared_model(&self) -> Arc<LoadedModel> {
        ModelHandle::shared_model(self)
    }
    fn stats(&self) -> &EngineStats {
        ModelHandle::stats(self)
    }
    fn submit(&self, request: Request) -> Result<(), SubmitError> {
        ModelHandle::submit(self, request)
    }
    fn background_backlog(&self) -> (usize, usize) {
        (self.background_waiting(), self.queue_capacity())
    }
}

/// A tier that is ready to serve.
#[derive(Clone)]
pub struct Loaded {
    /// The tier, or for a fine-tuned model (`ft:...`) the tier as that model: its id and the
    /// tier's fine-tuned prices.
    pub tier: Tier,
    pub handle: Arc<dyn Engine>,
    /// `system_fingerprint`: names the weights file and the ferrum build that serve it.
    pub fingerprint: String,
    /// The LoRA adapter of a fine-tuned model, which its requests run with.
    pub adapter: Option<Arc<LoraAdapter>>,
    /// The tier's vision encoder, when it reads images (`mmproj`).
    pub vision: Option<Arc<ferrum_vision::VisionModel>>,
}

/// An embedding tier that is ready to serve.
#[derive(Clone)]
pub struct LoadedEmbedder {
    pub tier: Tier,
    pub handle: Arc<ferrum_embed::EmbedHandle>,
}

/// What a loaded tier serves, by its kind.
#[derive(Clone)]
pub enum Served {
    Chat(Loaded),
    Embedding(LoadedEmbedder),
}

impl Served {
    pub fn tier(&self) -> &Tier {
        match self {
            Served::Chat(l) => &l.tier,
            Served::Embedding(e) => &e.tier,
        }
    }

    /// The weights file it runs on.
    pub fn path(&self) -> PathBuf {
        match self {
            Served::Chat(l) => l.handle.model().path.clone(),
            Served::Embedding(e) => e.handle.embedder().path.clone(),
        }
    }

    /// `fp_...` of the weights it runs on.
    pub fn fingerprint(&self) -> String {
        match self {
            Served::Chat(l) => l.fingerprint.clone(),
            Served::Embedding(e) => fingerprint(&e.handle.embedder().path),
        }
    }
}

struct Slot {
    tier: Tier,
    state: Mutex<SlotState>,
}

#[derive(Default)]
struct SlotState {
    loaded: Option<Served>,
    /// Weights an operator pointed this tier at, replacing the config's.
    weights_override: Option<WeightsSource>,
    /// Unloaded by an operator: a startup tier stays unloaded until loaded again.
    held_unloaded: bool,
    path: Option<PathBuf>,
}

/// What `GET /admin/models` reports per tier.
#[derive(serde::Serialize)]
pub struct ModelStatus {
    pub id: String,
    pub aliases: Vec<String>,
    pub loaded: bool,
    pub load: &'static str,
    pub weights: String,
    pub path: Option<String>,
}

/// The tiers of a registry and their loaded models.
pub struct Models {
    registry: RwLock<Registry>,
    slots: RwLock<HashMap<String, Arc<Slot>>>,
    config: EngineConfig,
}

impl Models {
    pub fn new(registry: Registry, config: EngineConfig) -> Models {
        let slots = slots_of(&registry);
        Models {
            registry: RwLock::new(registry),
            slots: RwLock::new(slots),
            config,
        }
    }

    /// The tiers, in config order.
    pub fn tiers(&self) -> Vec<Tier> {
        self.registry.read().unwrap().tiers().to_vec()
    }

    /// The first embedding tier in config order: the one that embeds for other features (an
    /// eval's cosine similarity), `None` when the config has none.
    pub fn embedding_tier(&self) -> Option<Tier> {
        self.tiers()
            .into_iter()
            .find(|t| t.kind == ModelKind::Embedding)
    }

    /// The chat tier that judges texts for `POST /v1/moderations` (`[moderation] judge`), if
    /// the config names one.
    pub fn moderation_judge(&self) -> Option<String> {
        self.registry.read().unwrap().moderation().judge.clone()
    }

    /// The config file the tiers came from (`None` for the embedded default).
    pub fn config_path(&self) -> Option<PathBuf> {
        self.registry
            .read()
            .unwrap()
            .path()
            .map(|p| p.to_path_buf())
    }

    /// The tier a model id or alias names.
    pub fn resolve(&self, model: &str) -> Result<Tier, ApiError> {
        self.registry
            .read()
            .unwrap()
            .resolve(model)
            .cloned()
            .ok_or_else(|| ApiError::model_not_found(model))
    }

    /// The adapter configured as `model` (`[[tier.adapter]]`), with its tier.
    pub fn resolve_adapter(&self, model: &str) -> Option<(Tier, ferrum_registry::AdapterConfig)> {
        self.registry
            .read()
            .unwrap()
            .resolve_adapter(model)
            .map(|(t, a)| (t.clone(), a.clone()))
    }

    fn slot(&self, tier_id: &str) -> Result<Arc<Slot>, ApiError> {
        self.slots
            .read()
            .unwrap()
            .get(tier_id)
            .cloned()
            .ok_or_else(|| ApiError::model_not_found(tier_id))
    }

    /// Loads every `startup` tier that is not loaded yet (and was not unloaded by an operator),
    /// one after another.
    pub async fn load_startup_tiers(&self) -> Result<(), ApiError> {
        for tier in self.tiers() {
            if tier.load != LoadPolicy::Startup {
                continue;
            }
            let slot = self.slot(&tier.id)?;
            let mut state = slot.state.lock().await;
            if state.loaded.is_none() && !state.held_unloaded {
                self.load_into(&slot, &mut state).await?;
            }
        }
        Ok(())
    }

    /// The loaded chat model of a tier, loading it first if it is lazy (or was never loaded).
    pub async fn get(&self, model: &str) -> Result<Loaded, ApiError> {
        if self.resolve(model)?.kind != ModelKind::Chat {
            return Err(not_a_chat_model(model));
        }
        match self.serve(model).await? {
            Served::Chat(loaded) => Ok(loaded),
            Served::Embedding(_) => Err(not_a_chat_model(model)),
        }
    }

    /// The loaded embedding model of a tier, loading it first if it is lazy.
    pub async fn get_embedder(&self, model: &str) -> Result<LoadedEmbedder, ApiError> {
        let tier = self.resolve(model)?;
        if tier.kind != ModelKind::Embedding {
            return Err(self.not_an_embedding_model(model));
        }
        match self.serve(model).await? {
            Served::Embedding(loaded) => Ok(loaded),
            Served::Chat(_) => Err(self.not_an_embedding_model(model)),
        }
    }

    /// The chat models' mistake on the embeddings endpoint, naming the models it takes.
    fn not_an_embedding_model(&self, model: &str) -> ApiError {
        let embedding: Vec<String> = self
            .tiers()
            .into_iter()
            .filter(|t| t.kind == ModelKind::Embedding)
            .map(|t| t.id)
            .collect();
        ApiError::invalid_param(
            "model",
            "model_not_supported",
            format!(
                "The model `{model}` is not an embedding model, so it cannot be used with POST \
                 /v1/embeddings. Embedding models: {}.",
                if embedding.is_empty() {
                    "none on this server".to_string()
                } else {
                    embedding.join(", ")
                }
            ),
        )
    }

    /// What a tier serves, loading it first if it is lazy (or was never loaded).
    async fn serve(&self, model: &str) -> Result<Served, ApiError> {
        let tier = self.resolve(model)?;
        let slot = self.slot(&tier.id)?;
        let mut state = slot.state.lock().await;
        if let Some(loaded) = &state.loaded {
            return Ok(loaded.clone());
        }
        if state.held_unloaded && slot.tier.load == LoadPolicy::Startup {
            return Err(ApiError::unavailable(format!(
                "The model `{}` is unloaded; an operator must load it again \
                 (POST /admin/models/{}/load).",
                tier.id, tier.id
            )));
        }
        self.load_into(&slot, &mut state).await
    }

    /// Loads (or reloads) a tier, optionally from new weights.
    pub async fn load(
        &self,
        tier_id: &str,
        weights: Option<WeightsSource>,
    ) -> Result<Served, ApiError> {
        let slot = self.slot(&self.resolve(tier_id)?.id)?;
        let mut state = slot.state.lock().await;
        if weights.is_some() {
            state.weights_override = weights;
        }
        // Requests already queued on the old model finish there; new ones go to the new model.
        state.loaded = None;
        state.held_unloaded = false;
        self.load_into(&slot, &mut state).await
    }

    /// Serves a tier with an engine that is already running (tests, or an embedder that runs
    /// its own engine), in place of loading its weights.
    pub async fn install(&self, tier_id: &str, engine: Arc<dyn Engine>) -> Result<(), ApiError> {
        let slot = self.slot(&self.resolve(tier_id)?.id)?;
        let mut state = slot.state.lock().await;
        state.held_unloaded = false;
        state.path = Some(engine.model().path.clone());
        state.loaded = Some(Served::Chat(Loaded {
            tier: slot.tier.clone(),
            fingerprint: fingerprint(&engine.model().path),
            handle: engine,
            adapter: None,
            vision: None,
        }));
        Ok(())
    }

    /// Unloads a tier; its memory is freed once its queued requests are done.
    pub async fn unload(&self, tier_id: &str) -> Result<bool, ApiError> {
        let slot = self.slot(&self.resolve(tier_id)?.id)?;
        let mut state = slot.state.lock().await;
        state.held_unloaded = true;
        let was = state.loaded.take().is_some();
        tracing::info!(tier = %slot.tier.id, was_loaded = was, "model unloaded");
        Ok(was)
    }

    /// The chat tiers that are loaded now.
    pub async fn loaded(&self) -> Vec<Loaded> {
        let mut out = Vec::new();
        for served in self.all_served().await {
            if let Served::Chat(l) = served {
                out.push(l);
            }
        }
        out.sort_by(|a, b| a.tier.id.cmp(&b.tier.id));
        out
    }

    /// The embedding tiers that are loaded now.
    pub async fn loaded_embedders(&self) -> Vec<LoadedEmbedder> {
        let mut out = Vec::new();
        for served in self.all_served().await {
            if let Served::Embedding(e) = served {
                out.push(e);
            }
        }
        out.sort_by(|a, b| a.tier.id.cmp(&b.tier.id));
        out
    }

    async fn all_served(&self) -> Vec<Served> {
        let slots: Vec<Arc<Slot>> = self.slots.read().unwrap().values().cloned().collect();
        let mut out = Vec::new();
        for slot in slots {
            out.extend(slot.state.lock().await.loaded.clone());
        }
        out
    }

    pub async fn status(&self) -> Vec<ModelStatus> {
        let slots: Vec<Arc<Slot>> = self
            .tiers()
            .iter()
            .filter_map(|t| self.slots.read().unwrap().get(&t.id).cloned())
            .collect();
        let mut out = Vec::with_capacity(slots.len());
        for slot in slots {
            let state = slot.state.lock().await;
            let weights = state
                .weights_override
                .as_ref()
                .unwrap_or(&slot.tier.weights);
            out.push(ModelStatus {
                id: slot.tier.id.clone(),
                aliases: slot.tier.aliases.clone(),
                loaded: state.loaded.is_some(),
                load: match slot.tier.load {
                    LoadPolicy::Startup => "startup",
                    LoadPolicy::Lazy => "lazy",
                },
                weights: weights.describe(),
                path: state.path.as_ref().map(|p| p.display().to_string()),
            });
        }
        out
    }

    /// Replaces the registry (a config reload): new tiers appear, removed ones are unloaded,
    /// tiers whose definition changed are unloaded so that their next use loads the new one.
    pub fn replace_registry(&self, registry: Registry) {
        let mut slots = self.slots.write().unwrap();
        let mut next = slots_of(&registry);
        for (id, slot) in next.iter_mut() {
            if let Some(old) = slots.get(id) {
                if old.tier == slot.tier {
                    *slot = Arc::clone(old);
                }
            }
        }
        *slots = next;
        *self.registry.write().unwrap() = registry;
    }

    async fn load_into(&self, slot: &Slot, state: &mut SlotState) -> Result<Served, ApiError> {
        let tier = slot.tier.clone();
        let weights = state
            .weights_override
            .clone()
            .unwrap_or_else(|| tier.weights.clone());
        let served = match tier.kind {
            ModelKind::Chat => Served::Chat(self.load_chat(tier, weights).await?),
            ModelKind::Embedding => {
                Served::Embedding(crate::embeddings::load(tier, weights).await?)
            }
        };
        state.loaded = Some(served.clone());
        state.path = Some(served.path());
        Ok(served)
    }

    async fn load_chat(&self, tier: Tier, weights: WeightsSource) -> Result<Loaded, ApiError> {
        let opts = LoadOptions {
            threads: self.config.threads,
            context_length: tier.context_length,
            prefill_chunk: None,
            weights_memory: WeightsMemory::from_env(),
            rope_scaling: tier.rope_scaling.as_ref().map(rope_scaling),
            kv_type: match tier.kv_type {
                Some(KvCacheType::F16) => KvType::F16,
                Some(KvCacheType::Q8_0) => KvType::Q8_0,
                None => self.config.kv_type,
            },
        };
        let scheduling = self.config.scheduling.clone();
        let id = tier.id.clone();
        // The draft tier is loaded (or shared, when it is loaded already) first; it cannot
        // have a draft of its own (the registry checks), so this recursion is one level deep.
        let draft = match &tier.draft {
            Some(d) => {
                let loaded = Box::pin(self.get(&d.tier)).await?;
                Some((loaded.handle.shared_model(), d.tokens))
            }
            None => None,
        };
        let mmproj = tier.mmproj.clone();
        let (handle, path, vision) = tokio::task::spawn_blocking(move || {
            let (handle, path) = load_model(&weights, &opts, scheduling, draft)?;
            let vision = match &mmproj {
                Some(m) => Some(Arc::new(load_vision(m, handle.model())?)),
                None => None,
            };
            Ok::<_, ApiError>((handle, path, vision))
        })
        .await
        .map_err(|e| ApiError::internal(format!("loading `{id}` panicked: {e}")))??;
        let fingerprint = fingerprint(&path);
        tracing::info!(tier = %tier.id, path = %path.display(), %fingerprint, "model ready");
        Ok(Loaded {
            tier,
            handle: Arc::new(handle),
            fingerprint,
            adapter: None,
            vision,
        })
    }
}

fn slots_of(registry: &Registry) -> HashMap<String, Arc<Slot>> {
    registry
        .tiers()
        .iter()
        .map(|t| {
            let slot = Slot {
                tier: t.clone(),
                state: Mutex::new(SlotState::default()),
            };
            (t.id.clone(), Arc::new(slot))
        })
        .collect()
}

fn load_model(
    weights: &WeightsSource,
    opts: &LoadOptions,
    scheduling: EngineOptions,
    draft: Option<(Arc<LoadedModel>, usize)>,
) -> Result<(ModelHandle, PathBuf), ApiError> {
    let progress = ferrum_registry::default_progress();
    let path = ferrum_registry::ensure_weights(weights, progress.as_ref()).map_err(|e| {
        ApiError::unavailable(format!("The model's weights are not available: {e}"))
    })?;
    let model = LoadedModel::load(&path, opts)
        .map_err(|e| ApiError::unavailable(format!("The model could not be loaded: {e}")))?;
    let draft = match draft {
        Some((draft, tokens)) => Some(
            Draft::new(&model, draft, tokens)
                .map_err(|e| ApiError::unavailable(format!("The draft model is unusable: {e}")))?,
        ),
        None => None,
    };
    let handle = ModelHandle::spawn_with_draft(model, scheduling, draft)
        .map_err(|e| ApiError::internal(format!("could not start the engine thread: {e}")))?;
    Ok((handle, path))
}

/// A tier's vision encoder, checked against its language model.
fn load_vision(
    source: &WeightsSource,
    model: &LoadedModel,
) -> Result<ferrum_vision::VisionModel, ApiError> {
    let progress = ferrum_registry::default_progress();
    let path = ferrum_registry::ensure_weights(source, progress.as_ref()).map_err(|e| {
        ApiError::unavailable(format!("The model's mmproj file is not available: {e}"))
    })?;
    let vision = ferrum_vision::VisionModel::load(&path)
        .map_err(|e| ApiError::unavailable(format!("The model's mmproj is unusable: {e}")))?;
    let d = model.model.cfg.d_model;
    if vision.width() != d {
        return Err(ApiError::unavailable(format!(
            "The model's mmproj projects to {} dimensions but its language model embeds in {d}: \
             the mmproj belongs to another model.",
            vision.width()
        )));
    }
    tracing::info!(path = %path.display(), projector = ?vision.config().projector, "vision encoder ready");
    Ok(vision)
}

/// A chat endpoint asked for an embedding model.
fn not_a_chat_model(model: &str) -> ApiError {
    ApiError::invalid_param(
        "model",
        "model_not_supported",
        format!(
            "The model `{model}` is an embedding model: it serves POST /v1/embeddings, not this \
             endpoint."
        ),
    )
}

/// `fp_` + 10 hex digits of a hash of the weights file (name and size) and ferrum's version, so
/// clients can tell when the backend changed, as OpenAI's fingerprint does.
fn fingerprint(path: &std::path::Path) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    path.file_name().hash(&mut h);
    std::fs::metadata(path)
        .map(|m| m.len())
        .unwrap_or(0)
        .hash(&mut h);
    env!("CARGO_PKG_VERSION").hash(&mut h);
    format!("fp_{:010x}", h.finish() & 0xff_ffff_ffff)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tiers_rope_scaling_becomes_the_engines() {
        let yarn = RopeScalingConfig {
            kind: RopeScalingKind::Yarn,
            factor: 4.0,
            original_context: Some(32768),
            beta_fast: None,
            beta_slow: Some(2.0),
        };
        assert_eq!(
            rope_scaling(&yarn),
            RopeScaling::Yarn {
                factor: 4.0,
                original_context: 32768,
                beta_fast: 32.0,
                beta_slow: 2.0,
            }
        );
        let unset = RopeScalingConfig {
            original_context: None,
            ..yarn
        };
        // 0: the engine takes the GGUF's context length.
        assert!(matches!(
            rope_scaling(&unset),
            RopeScaling::Yarn {
                original_context: 0,
                ..
            }
        ));
        let linear = RopeScalingConfig {
            kind: RopeScalingKind::Linear,
            factor: 2.0,
            original_context: None,
            beta_fast: None,
            beta_slow: None,
        };
        assert_eq!(rope_scaling(&linear), RopeScaling::Linear { factor: 2.0 });
    }
}
