//! Files from the Hugging Face Hub (GGUF weights, embedding models), through the `hf-hub`
//! crate and its standard cache.

use std::path::PathBuf;

use hf_hub::api::sync::{ApiBuilder, ApiError};
use hf_hub::{Cache, Repo, RepoType};

use super::local::check_gguf;
use super::FetchOptions;
use crate::error::RegistryError;
use crate::progress::Progress;
use crate::weights::HfWeights;

/// The file from the local HF cache, if it is there.
pub(crate) fn locate(hub: &HfWeights, opts: &FetchOptions) -> Option<PathBuf> {
    Cache::new(opts.hf_cache_dir.clone())
        .repo(repo(hub))
        .get(&hub.file)
}

/// Returns the GGUF file from the HF cache, downloading it first unless offline.
pub(crate) fn ensure(
    hub: &HfWeights,
    opts: &FetchOptions,
    progress: &dyn Progress,
) -> Result<PathBuf, RegistryError> {
    let path = fetch(hub, opts, progress)?;
    check_gguf(&path)?;
    Ok(path)
}

/// Returns the file from the HF cache, downloading it first unless offline.
pub(crate) fn fetch(
    hub: &HfWeights,
    opts: &FetchOptions,
    progress: &dyn Progress,
) -> Result<PathBuf, RegistryError> {
    match locate(hub, opts) {
        Some(path) => Ok(path),
        None if opts.hf_offline => Err(RegistryError::HubOfflineMiss {
            repo: hub.repo.clone(),
            file: hub.file.clone(),
            cache_dir: opts.hf_cache_dir.clone(),
        }),
        None => download(hub, opts, progress),
    }
}

/// Downloads the file into the HF cache and returns its path there.
fn download(
    hub: &HfWeights,
    opts: &FetchOptions,
    progress: &dyn Progress,
) -> Result<PathBuf, RegistryError> {
    let mut builder = ApiBuilder::from_cache(Cache::new(opts.hf_cache_dir.clone()))
        .with_progress(false)
        .with_user_agent("ferrum", env!("CARGO_PKG_VERSION"));
    if let Some(endpoint) = &opts.hf_endpoint {
        builder = builder.with_endpoint(endpoint.trim_end_matches('/').to_string());
    }
    if opts.hf_token.is_some() {
        builder = builder.with_token(opts.hf_token.clone());
    }
    let api = builder.build().map_err(|e| hub_error(hub, e))?;
    api.repo(repo(hub))
        .download_with_progress(&hub.file, HubProgress(progress))
        .map_err(|e| hub_error(hub, e))
}

fn repo(hub: &HfWeights) -> Repo {
    let revision = hub.revision.clone().unwrap_or_else(|| "main".into());
    Repo::with_revision(hub.repo.clone(), RepoType::Model, revision)
}

/// Tells "the Hub said no" (a status code: fix the config) from "could not reach it".
fn hub_error(hub: &HfWeights, error: ApiError) -> RegistryError {
    if let ApiError::RequestError(inner) = &error {
        if let ureq::Error::Status(status, _) = inner.as_ref() {
            return RegistryError::HubRequest {
                repo: hub.repo.clone(),
                file: hub.file.clone(),
                status: *status,
            };
        }
    }
    RegistryError::HubUnavailable {
        repo: hub.repo.clone(),
        file: hub.file.clone(),
        cause: error.to_string(),
    }
}

/// Forwards hf-hub's download progress to ours.
struct HubProgress<'a>(&'a dyn Progress);

impl hf_hub::api::Progress for HubProgress<'_> {
    fn init(&mut self, size: usize, filename: &str) {
        self.0
            .begin(size as u64, &format!("downloading {filename}"));
    }

    fn update(&mut self, size: usize) {
        self.0.advance(size as u64);
    }

    fn finish(&mut self) {
        self.0.finish();
    }
}
