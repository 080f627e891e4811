//! Fetches the weights of the named tiers (all tiers when none is named), like `ferrum pull`.
//!
//! `cargo run -p ferrum-registry --example pull -- [--verify] [MODEL...]`; honours
//! FERRUM_CONFIG, FERRUM_HOME, FERRUM_PIP, FERRUM_PIP_EXTRA_ARGS and the HF_* variables.

use std::process::ExitCode;

use ferrum_registry::{default_progress, ensure_weights_with, FetchOptions, Registry};

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    match pull() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn pull() -> Result<(), ferrum_registry::RegistryError> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let registry = Registry::load(None)?;
    let mut opts = FetchOptions::from_env();
    opts.verify = args.iter().any(|a| a == "--verify");
    let names: Vec<&String> = args.iter().filter(|a| !a.starts_with("--")).collect();
    let tiers = match names.is_empty() {
        true => registry.tiers().iter().collect(),
        false => names
            .iter()
            .map(|n| registry.get(n))
            .collect::<Result<Vec<_>, _>>()?,
    };
    let progress = default_progress();
    for tier in tiers {
        eprintln!("{}: {}", tier.id, tier.weights.describe());
        let path = ensure_weights_with(&tier.weights, &opts, progress.as_ref())?;
        println!("{}\t{}", tier.id, path.display());
    }
    Ok(())
}
