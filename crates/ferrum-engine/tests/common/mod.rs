//! Shared helpers for the integration tests: where the model files and the llama.cpp reference
//! outputs live, and cached access to GGUF metadata.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::OnceLock;

use candle_core::quantized::gguf_file::{Content, Value};

/// The default model tiers, smallest first.
pub const TIERS: [&str; 3] = ["nano", "mini", "full"];

/// `$FERRUM_HOME`, by default `~/.cache/ferrum`.
pub fn ferrum_home() -> PathBuf {
    if let Some(home) = std::env::var_os("FERRUM_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(home);
    }
    let home = std::env::var_os("HOME").expect("neither FERRUM_HOME nor HOME is set");
    PathBuf::from(home).join(".cache").join("ferrum")
}

/// Where `ferrum pull` stores GGUF files.
pub fn models_dir() -> PathBuf {
    ferrum_home().join("models")
}

/// The GGUF file name of a tier (as in the registry's default.toml).
pub fn model_file(tier: &str) -> &'static str {
    match tier {
        "nano" => "SmolLM2-135M-Instruct.Q4_1.gguf",
        "mini" => "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        "full" => "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        other => panic!("unknown tier `{other}` (expected nano, mini or full)"),
    }
}

/// The path of a tier's GGUF file; panics with instructions when it is not there.
pub fn model_path(tier: &str) -> PathBuf {
    let path = models_dir().join(model_file(tier));
    assert!(
        path.is_file(),
        "model file {} for tier `{tier}` is missing: run `ferrum pull` first",
        path.display()
    );
    path
}

/// The directory of the llama.cpp reference outputs: `$FERRUM_REFERENCE_DIR`, or
/// `tests/reference` of this crate (see its README).
pub fn reference_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("FERRUM_REFERENCE_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("reference")
}

/// The workspace root (two levels above this crate).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("..")
}

/// The reference outputs of a tier (`tokenize`, `chat`, `raw` cases), parsed.
pub fn reference(tier: &str) -> serde_json::Value {
    let path = reference_dir().join(format!("{tier}.json"));
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read reference file {}: {e}", path.display()));
    serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("reference file {} is not valid JSON: {e}", path.display()))
}

/// The GGUF metadata of a tier, read once per test process (only the header is read).
pub fn gguf_metadata(tier: &str) -> &'static HashMap<String, Value> {
    static CACHE: [OnceLock<HashMap<String, Value>>; 3] =
        [OnceLock::new(), OnceLock::new(), OnceLock::new()];
    let index = TIERS
        .iter()
        .position(|t| *t == tier)
        .unwrap_or_else(|| panic!("unknown tier `{tier}` (expected nano, mini or full)"));
    CACHE[index].get_or_init(|| {
        let path = model_path(tier);
        let mut file = std::fs::File::open(&path)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
        Content::read(&mut file)
            .unwrap_or_else(|e| panic!("cannot read GGUF header of {}: {e}", path.display()))
            .metadata
    })
}

/// A conversation rendered with the model's chat template (generation prompt added) and
/// tokenized, as the server does it.
pub fn chat_tokens(m: &ferrum_engine::LoadedModel, msgs: &[serde_json::Value]) -> Vec<u32> {
    let text = m
        .template
        .as_ref()
        .unwrap()
        .render(msgs, None, true)
        .unwrap();
    m.tokenizer.encode(&text, false, true).unwrap()
}

/// One user message as a prompt.
pub fn user_prompt(m: &ferrum_engine::LoadedModel, user: &str) -> Vec<u32> {
    chat_tokens(m, &[serde_json::json!({"role": "user", "content": user})])
}

/// Greedy sampling that never ends on its own: the model's end-of-generation tokens are banned.
pub fn greedy_without_eos(m: &ferrum_engine::LoadedModel) -> ferrum_engine::SamplingParams {
    let mut sampling = ferrum_engine::SamplingParams::greedy();
    sampling.logit_bias = m
        .tokenizer
        .eog_ids()
        .iter()
        .map(|&id| (id, -100.0))
        .collect();
    sampling
}

/// The completion of a one-choice request from its events; panics on an error event.
pub fn completion_of(
    rx: &std::sync::mpsc::Receiver<ferrum_engine::Event>,
) -> ferrum_engine::Completion {
    use ferrum_engine::Event;
    rx.iter()
        .find_map(|e| match e {
            Event::ChoiceDone { completion, .. } => Some(completion),
            Event::Error(e) => panic!("request failed: {e}"),
            _ => None,
        })
        .expect("the request completed")
}
