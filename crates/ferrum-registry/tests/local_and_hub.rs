//! Local paths and the Hugging Face source (GGUF weights and embedding models), without
//! network: errors must be clear and fast.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use ferrum_registry::{
    ensure_embedding_weights_with, ensure_weights_with, locate_embedding_weights, locate_weights,
    EmbeddingFiles, FetchOptions, HfWeights, NoProgress, RegistryError, WeightsSource,
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

/// Writes the three files of an embedding model into `dir` (their contents do not matter here).
fn model_dir(dir: &Path) {
    fs::create_dir_all(dir).unwrap();
    for name in ["model.safetensors", "tokenizer.json", "config.json"] {
        fs::write(dir.join(name), name).unwrap();
    }
}

#[test]
fn a_local_embedding_model_is_a_directory_or_its_weights_file() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("minilm");
    model_dir(&model);
    let opts = options(dir.path());
    let expected = EmbeddingFiles {
        weights: model.join("model.safetensors"),
        tokenizer: model.join("tokenizer.json"),
        config: model.join("config.json"),
    };
    let by_dir = WeightsSource::Path(model.clone());
    assert_eq!(
        ensure_embedding_weights_with(&by_dir, &opts, &NoProgress).unwrap(),
        expected
    );
    // The weights file may have another name; the tokenizer and config sit beside it.
    fs::rename(
        model.join("model.safetensors"),
        model.join("minilm.safetensors"),
    )
    .unwrap();
    let by_file = WeightsSource::Path(model.join("minilm.safetensors"));
    let found = ensure_embedding_weights_with(&by_file, &opts, &NoProgress).unwrap();
    assert_eq!(found.weights, model.join("minilm.safetensors"));
    assert_eq!(locate_embedding_weights(&by_file, &opts), Some(found));
    // A directory without its tokenizer names the missing file.
    fs::remove_file(model.join("tokenizer.json")).unwrap();
    let err = ensure_embedding_weights_with(&by_file, &opts, &NoProgress).unwrap_err();
    let missing = model.join("tokenizer.json");
    assert!(
        matches!(&err, RegistryError::WeightsNotFound { path } if path == &missing),
        "{err}"
    );
    assert_eq!(locate_embedding_weights(&by_file, &opts), None);
    let absent = WeightsSource::Path(dir.path().join("absent"));
    let err = ensure_embedding_weights_with(&absent, &opts, &NoProgress).unwrap_err();
    assert!(
        matches!(err, RegistryError::WeightsNotFound { .. }),
        "{err}"
    );
}

#[test]
fn a_hub_embedding_model_takes_its_tokenizer_and_config_from_the_same_directory() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = options(dir.path());
    opts.hf_offline = true;
    let repo_dir = opts.hf_cache_dir.join("models--owner--name");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    fs::create_dir_all(repo_dir.join("refs")).unwrap();
    fs::write(repo_dir.join("refs/main"), commit).unwrap();
    let snapshot = repo_dir.join("snapshots").join(commit);
    model_dir(&snapshot.join("onnx"));
    let source = WeightsSource::HuggingFace(HfWeights {
        repo: "owner/name".into(),
        file: "onnx/model.safetensors".into(),
        revision: None,
    });
    let found = ensure_embedding_weights_with(&source, &opts, &NoProgress).unwrap();
    assert_eq!(found.weights, snapshot.join("onnx/model.safetensors"));
    assert_eq!(found.tokenizer, snapshot.join("onnx/tokenizer.json"));
    assert_eq!(found.config, snapshot.join("onnx/config.json"));
    assert_eq!(locate_embedding_weights(&source, &opts), Some(found));
    // Offline, a sibling missing from the cache is a clear miss.
    fs::remove_file(snapshot.join("onnx/config.json")).unwrap();
    let err = ensure_embedding_weights_with(&source, &opts, &NoProgress).unwrap_err();
    assert!(
        matches!(&err, RegistryError::HubOfflineMiss { file, .. } if file == "onnx/config.json"),
        "{err}"
    );
}
