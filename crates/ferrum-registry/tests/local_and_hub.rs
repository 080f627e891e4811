//! Local GGUF paths and the Hugging Face source, without network: errors must be clear and fast.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use ferrum_registry::{
    ensure_weights_with, locate_weights, FetchOptions, HfWeights, NoProgress, RegistryError,
    WeightsSource,
};

fn options(dir: &Path) -> FetchOptions {
    let mut opts = FetchOptions::new(dir.join("models"));
    opts.hf_cache_dir = dir.join("hf");
    opts
}

fn hub_source() -> WeightsSource {
    WeightsSource::HuggingFace(HfWeights {
        repo: "owner/name".into(),
        file: "model.gguf".into(),
        revision: None,
    })
}

#[test]
fn a_local_gguf_is_returned_as_is() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    fs::write(&path, b"GGUF\x03\x00\x00\x00rest").unwrap();
    let source = WeightsSource::Path(path.clone());
    let found = ensure_weights_with(&source, &options(dir.path()), &NoProgress).unwrap();
    assert_eq!(found, path);
    assert_eq!(locate_weights(&source, &options(dir.path())), Some(path));
}

#[test]
fn a_missing_local_file_is_a_not_found_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("absent.gguf");
    let source = WeightsSource::Path(path.clone());
    let err = ensure_weights_with(&source, &options(dir.path()), &NoProgress).unwrap_err();
    assert!(
        matches!(&err, RegistryError::WeightsNotFound { path: p } if p == &path),
        "{err}"
    );
    assert!(err.to_string().contains("absent.gguf"));
    assert_eq!(locate_weights(&source, &options(dir.path())), None);
}

#[test]
fn a_file_without_the_gguf_magic_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&str, &[u8]); 3] = [
        ("text.gguf", b"hello world"),
        ("short.gguf", b"GG"),
        ("empty.gguf", b""),
    ];
    for (name, bytes) in cases {
        let path = dir.path().join(name);
        fs::write(&path, bytes).unwrap();
        let err = ensure_weights_with(
            &WeightsSource::Path(path.clone()),
            &options(dir.path()),
            &NoProgress,
        )
        .unwrap_err();
        assert!(
            matches!(&err, RegistryError::NotGguf { path: p } if p == &path),
            "{name}: {err}"
        );
        assert!(err.to_string().contains("not a GGUF file"));
    }
    let err = ensure_weights_with(
        &WeightsSource::Path(dir.path().to_path_buf()),
        &options(dir.path()),
        &NoProgress,
    )
    .unwrap_err();
    assert!(
        matches!(err, RegistryError::NotGguf { .. }),
        "a directory: {err}"
    );
}

#[test]
fn an_unreachable_hub_fails_fast_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = options(dir.path());
    // Port 9 (discard) on loopback refuses connections at once: no network is needed.
    opts.hf_endpoint = Some("http://127.0.0.1:9".into());
    let start = Instant::now();
    let err = ensure_weights_with(&hub_source(), &opts, &NoProgress).unwrap_err();
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "took {:?}",
        start.elapsed()
    );
    assert!(matches!(err, RegistryError::HubUnavailable { .. }), "{err}");
    let message = err.to_string();
    assert!(
        message.starts_with("could not fetch owner/name/model.gguf from Hugging Face: "),
        "{message}"
    );
    assert!(
        message.contains("set HF_HUB_OFFLINE=1 to use the local HF cache"),
        "{message}"
    );
}

#[test]
fn offline_mode_with_an_empty_cache_says_so_without_network() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = options(dir.path());
    opts.hf_offline = true;
    // An endpoint that would hang if contacted proves offline mode makes no request.
    opts.hf_endpoint = Some("http://10.255.255.1:81".into());
    let start = Instant::now();
    let err = ensure_weights_with(&hub_source(), &opts, &NoProgress).unwrap_err();
    assert!(start.elapsed() < Duration::from_secs(2));
    assert!(matches!(err, RegistryError::HubOfflineMiss { .. }), "{err}");
    assert!(err.to_string().contains("HF_HUB_OFFLINE is set"), "{err}");
}

#[test]
fn offline_mode_uses_a_file_in_the_hf_cache() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = options(dir.path());
    opts.hf_offline = true;
    // The standard HF cache layout: refs/<revision> names a snapshot holding the file.
    let repo_dir = opts.hf_cache_dir.join("models--owner--name");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    fs::create_dir_all(repo_dir.join("refs")).unwrap();
    fs::write(repo_dir.join("refs/main"), commit).unwrap();
    let snapshot = repo_dir.join("snapshots").join(commit);
    fs::create_dir_all(&snapshot).unwrap();
    fs::write(snapshot.join("model.gguf"), b"GGUF....").unwrap();

    let path = ensure_weights_with(&hub_source(), &opts, &NoProgress).unwrap();
    assert_eq!(path, snapshot.join("model.gguf"));
    assert_eq!(locate_weights(&hub_source(), &opts), Some(path));

    fs::write(snapshot.join("model.gguf"), b"<html>").unwrap();
    let err = ensure_weights_with(&hub_source(), &opts, &NoProgress).unwrap_err();
    assert!(matches!(err, RegistryError::NotGguf { .. }), "{err}");
}
