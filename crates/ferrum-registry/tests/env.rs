//! Everything that reads the process environment, in one test binary and one lock, so that no
//! other test can observe these variables half-set.

use std::path::PathBuf;
use std::sync::Mutex;

use ferrum_registry::{
    ensure_weights, models_dir, FetchOptions, HfWeights, NoProgress, Registry, RegistryError,
    WeightsSource,
};

/// Serialises the tests of this file: the environment is global to the process.
static ENV: Mutex<()> = Mutex::new(());

const VARS: [&str; 9] = [
    "FERRUM_HOME",
    "FERRUM_PIP",
    "FERRUM_PIP_EXTRA_ARGS",
    "FERRUM_CONFIG",
    "HF_HUB_OFFLINE",
    "HF_ENDPOINT",
    "HF_HOME",
    "HF_HUB_CACHE",
    "HF_TOKEN",
];

/// Holds the lock and clears the variables on entry and exit, so tests start from a known state.
struct CleanEnv<'a>(#[allow(dead_code)] std::sync::MutexGuard<'a, ()>);

impl CleanEnv<'_> {
    fn new() -> Self {
        let guard = ENV.lock().unwrap_or_else(|e| e.into_inner());
        VARS.iter().for_each(|v| std::env::remove_var(v));
        CleanEnv(guard)
    }
}

impl Drop for CleanEnv<'_> {
    fn drop(&mut self) {
        VARS.iter().for_each(|v| std::env::remove_var(v));
    }
}

#[test]
fn from_env_reads_every_variable() {
    let _env = CleanEnv::new();
    std::env::set_var("FERRUM_HOME", "/srv/ferrum");
    std::env::set_var("FERRUM_PIP", "uv pip");
    std::env::set_var(
        "FERRUM_PIP_EXTRA_ARGS",
        " --index-url  https://mirror/simple ",
    );
    std::env::set_var("HF_HUB_OFFLINE", "1");
    std::env::set_var("HF_ENDPOINT", "https://hf-mirror");
    std::env::set_var("HF_HOME", "/srv/hf");
    std::env::set_var("HF_TOKEN", "hf_x");
    let opts = FetchOptions::from_env();
    assert_eq!(models_dir(), PathBuf::from("/srv/ferrum/models"));
    assert_eq!(opts.models_dir, PathBuf::from("/srv/ferrum/models"));
    assert_eq!(opts.pip_command, ["uv", "pip"]);
    assert_eq!(
        opts.pip_extra_args,
        ["--index-url", "https://mirror/simple"]
    );
    assert!(opts.hf_offline);
    assert_eq!(opts.hf_endpoint.as_deref(), Some("https://hf-mirror"));
    assert_eq!(opts.hf_cache_dir, PathBuf::from("/srv/hf/hub"));
    assert_eq!(opts.hf_token.as_deref(), Some("hf_x"));
    std::env::set_var("HF_HUB_CACHE", "/cache/hub");
    std::env::set_var("HF_HUB_OFFLINE", "0");
    let opts = FetchOptions::from_env();
    assert_eq!(opts.hf_cache_dir, PathBuf::from("/cache/hub"));
    assert!(!opts.hf_offline);
}

#[test]
fn from_env_defaults() {
    let _env = CleanEnv::new();
    let opts = FetchOptions::from_env();
    assert!(
        opts.models_dir.ends_with(".cache/ferrum/models"),
        "{}",
        opts.models_dir.display()
    );
    assert_eq!(opts.pip_command, ["python3", "-m", "pip"]);
    assert!(opts.pip_extra_args.is_empty());
    assert!(!opts.hf_offline && !opts.verify);
    assert_eq!(opts.hf_endpoint, None);
    assert!(opts.hf_cache_dir.ends_with(".cache/huggingface/hub"));
}

#[test]
fn load_honours_ferrum_config_and_falls_back_to_the_default() {
    let _env = CleanEnv::new();
    let default = Registry::load(None).unwrap();
    assert_eq!(default.tiers().len(), 4);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("ferrum.toml");
    std::fs::write(
        &config,
        "[[tier]]\nid = \"only\"\nweights = { path = \"m.gguf\" }\n\
         price = { input = 0, cached_input = 0, output = 0 }\n",
    )
    .unwrap();
    std::env::set_var("FERRUM_CONFIG", &config);
    let custom = Registry::load(None).unwrap();
    assert_eq!(custom.tiers().len(), 1);
    assert_eq!(custom.path(), Some(config.as_path()));
    // An explicit path wins over the environment.
    let explicit = dir.path().join("other.toml");
    std::fs::write(&explicit, ferrum_registry::DEFAULT_CONFIG).unwrap();
    assert_eq!(Registry::load(Some(&explicit)).unwrap().tiers().len(), 4);
}

#[test]
fn hub_errors_through_the_environment_are_clear_and_fast() {
    let _env = CleanEnv::new();
    let dir = tempfile::tempdir().unwrap();
    std::env::set_var("HF_HOME", dir.path());
    std::env::set_var("HF_ENDPOINT", "http://127.0.0.1:9");
    let source = WeightsSource::HuggingFace(HfWeights {
        repo: "owner/name".into(),
        file: "model.gguf".into(),
        revision: Some("main".into()),
    });
    let start = std::time::Instant::now();
    let err = ensure_weights(&source, &NoProgress).unwrap_err();
    assert!(matches!(err, RegistryError::HubUnavailable { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("(no network? set HF_HUB_OFFLINE=1"),
        "{err}"
    );

    std::env::set_var("HF_HUB_OFFLINE", "1");
    let err = ensure_weights(&source, &NoProgress).unwrap_err();
    assert!(matches!(err, RegistryError::HubOfflineMiss { .. }), "{err}");
    assert!(start.elapsed().as_secs() < 10);
}
