//! The `ferrum` binary: `serve | pull | run | chat | bench | models | usage | export | evals |
//! fine-tune | admin`.

mod bench;
mod bench_vision;
mod cli;
mod evals;
mod finetune;
mod serve;

use clap::Parser;

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new(
                    "warn,ferrum_server=info,ferrum_engine::service=info",
                )
            }),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = cli::Cli::parse();
    cli::dispatch(args)
}
