//! `ferrum serve` (the OpenAI API over HTTP) and `ferrum usage` (the ledger's totals).

use std::net::SocketAddr;

use anyhow::Context;
use clap::Args;
use ferrum_engine::EngineOptions;
use ferrum_registry::Registry;
use ferrum_server::{BatchConfig, EngineConfig, ServerConfig};
use ferrum_store::{BlobStore, CompletionFilter, Store};

#[derive(Args)]
pub struct ServeArgs {
    /// Address to listen on (port 0 picks a free port; the chosen address is printed).
    #[arg(long, default_value = "127.0.0.1:8080", env = "FERRUM_ADDR")]
    pub addr: SocketAddr,
    /// Require `Authorization: Bearer <KEY>` on every API request.
    #[arg(long, env = "FERRUM_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// The admin key of the organization API (/v1/organization: projects, their keys and
    /// rate limits, usage and costs), besides the admin keys in the database.
    #[arg(long, env = "FERRUM_ADMIN_KEY", hide_env_values = true)]
    pub admin_key: Option<String>,
    /// Requests that may wait per model before new ones get 429.
    #[arg(long, default_value_t = 64)]
    pub queue_size: usize,
    /// Database URL: sqlite:///path/ferrum.db or postgres://... (default: a SQLite file in
    /// $FERRUM_HOME, else ~/.cache/ferrum).
    #[arg(long, env = "FERRUM_DATABASE_URL")]
    pub database: Option<String>,
    /// Kernel threads per model (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Sequences generated together per model (continuous batching).
    #[arg(long, default_value_t = 16)]
    pub max_running: usize,
    /// Tokens per forward pass: decode tokens plus prompt chunks (bounds a step's latency).
    #[arg(long, default_value_t = 256)]
    pub step_tokens: usize,
    /// While some sequences decode, a step that also reads prompt tokens may take at most
    /// this many times a decode-only step: prompt chunks are sized from measured step times,
    /// so a long prompt does not stall the streams already answering (1 or 0: off).
    #[arg(long, default_value_t = 2.0)]
    pub max_decode_slowdown: f64,
    /// Memory of each model's KV block pool, in MiB: running sequences' caches and the prefix
    /// cache (blocks of finished sequences, reused by later requests that start the same way).
    #[arg(long, default_value_t = 2048)]
    pub kv_budget_mib: usize,
    /// Positions per KV block: the granularity of prefix reuse and of KV allocation.
    #[arg(long, default_value_t = ferrum_engine::DEFAULT_BLOCK_SIZE)]
    pub kv_block_size: usize,
    /// KV cache type of tiers whose config names none: f16, or q8_0 (half the memory, so
    /// twice the context or sequences in the same budget).
    #[arg(long, default_value = "f16", value_parser = crate::cli::parse_kv_type)]
    pub kv_type: ferrum_engine::KvType,
    /// Directory of file contents (uploads, batch outputs); default: `files/` beside the
    /// SQLite database, else in $FERRUM_HOME. Servers sharing a Postgres database must share it.
    #[arg(long, env = "FERRUM_DATA_DIR")]
    pub data_dir: Option<std::path::PathBuf>,
    /// Largest upload to /v1/files, in MiB.
    #[arg(long, default_value_t = 512)]
    pub max_file_mib: u64,
    /// Download images that requests name by `http(s)://` URL (by default only data URLs and
    /// file ids are read, and URLs get a 400 saying so).
    #[arg(long, env = "FERRUM_FETCH_IMAGE_URLS")]
    pub fetch_image_urls: bool,
    /// Seconds a batch line stays claimed by this server without renewal (renewed every third
    /// of it): how long the lines of a killed server wait before another takes them over.
    #[arg(long, default_value_t = 60)]
    pub batch_lease_secs: u64,
    /// Batch lines this server runs at once (the engine batches them with live traffic, which
    /// goes first).
    #[arg(long, default_value_t = 32)]
    pub batch_window: usize,
}

#[derive(Args)]
pub struct ExportArgs {
    /// Database URL (as for `serve`).
    #[arg(long, env = "FERRUM_DATABASE_URL")]
    pub database: Option<String>,
    /// Only completions of this model.
    #[arg(long)]
    pub model: Option<String>,
    /// Only completions with this metadata pair (KEY=VALUE; repeat to require several).
    #[arg(long, value_parser = parse_pair)]
    pub metadata: Vec<(String, String)>,
    /// Write here instead of stdout.
    #[arg(long, short)]
    pub output: Option<std::path::PathBuf>,
}

fn parse_pair(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))
}

#[derive(Args)]
pub struct UsageArgs {
    /// Database URL (as for `serve`).
    #[arg(long, env = "FERRUM_DATABASE_URL")]
    pub database: Option<String>,
    /// Only requests since this Unix time.
    #[arg(long)]
    pub since: Option<i64>,
}

#[derive(clap::Subcommand)]
pub enum AdminCommand {
    /// Create an admin key in the database and print it (once: only its hash is kept).
    Init {
        /// Database URL (as for `serve`).
        #[arg(long, env = "FERRUM_DATABASE_URL")]
        database: Option<String>,
        /// The key's name in the admin key list.
        #[arg(long, default_value = "ferrum admin init")]
        name: String,
    },
}

pub fn admin(command: AdminCommand) -> anyhow::Result<()> {
    let AdminCommand::Init { database, name } = command;
    runtime()?.block_on(async move {
        let url = database.unwrap_or_else(Store::default_url);
        let store = Store::connect(&url)
            .await
            .with_context(|| format!("opening the database {url}"))?;
        let (key, value) = ferrum_server::create_admin_key(&store, &name, None)
            .await
            .map_err(|e| anyhow::anyhow!("creating the admin key: {e}"))?;
        eprintln!(
            "Created admin key {} ({name}). It is shown once: store it now. Use it as \
             `Authorization: Bearer <key>` on /v1/organization (OPENAI_ADMIN_KEY for the SDKs).",
            key.id
        );
        println!("{value}");
        Ok(())
    })
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

pub fn serve(registry: Registry, args: ServeArgs) -> anyhow::Result<()> {
    runtime()?.block_on(async move {
        let url = args.database.unwrap_or_else(Store::default_url);
        let store = Store::connect(&url)
            .await
            .with_context(|| format!("opening the database {url}"))?;
        let data_dir = args
            .data_dir
            .unwrap_or_else(|| BlobStore::default_dir(&url));
        let blobs = BlobStore::open(&data_dir)
            .with_context(|| format!("opening the data directory {}", data_dir.display()))?;
        let listener = tokio::net::TcpListener::bind(args.addr)
            .await
            .with_context(|| format!("listening on {}", args.addr))?;
        let config = ServerConfig {
            engine: EngineConfig {
                threads: args.threads,
                scheduling: EngineOptions {
                    queue_capacity: args.queue_size.max(1),
                    max_running: args.max_running.max(1),
                    step_tokens: args.step_tokens.max(1),
                    max_decode_slowdown: args.max_decode_slowdown,
                    kv_budget_bytes: args.kv_budget_mib << 20,
                    block_size: args.kv_block_size.max(1),
                },
                kv_type: args.kv_type,
            },
            api_key: args.api_key.filter(|k| !k.is_empty()),
            admin_key: args.admin_key.filter(|k| !k.is_empty()),
            blobs,
            max_file_bytes: args.max_file_mib.max(1) << 20,
            batch: BatchConfig {
                lease: std::time::Duration::from_secs(args.batch_lease_secs.max(1)),
                window: args.batch_window.max(1),
                ..BatchConfig::default()
            },
            fetch_image_urls: args.fetch_image_urls,
        };
        ferrum_server::serve(listener, registry, store, config, shutdown_signal()).await?;
        Ok(())
    })
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutting down: finishing requests in flight");
}

pub fn usage(args: UsageArgs) -> anyhow::Result<()> {
    runtime()?.block_on(async move {
        let url = args.database.unwrap_or_else(Store::default_url);
        let store = Store::connect(&url)
            .await
            .with_context(|| format!("opening the database {url}"))?;
        let totals = store.usage_totals(args.since).await?;
        println!(
            "{:<24} {:>9} {:>14} {:>14} {:>14} {:>12}",
            "model", "requests", "prompt", "cached", "completion", "cost (USD)"
        );
        let mut cost = 0.0;
        for t in &totals {
            cost += t.cost_usd;
            // Eight decimals: embeddings cost $0.00000002 a token.
            println!(
                "{:<24} {:>9} {:>14} {:>14} {:>14} {:>12.8}",
                t.model,
                t.requests,
                t.prompt_tokens,
                t.cached_tokens,
                t.completion_tokens,
                t.cost_usd
            );
        }
        println!("{:<24} {:>68.8}", "total", cost);
        Ok(())
    })
}

/// `ferrum export`: stored completions as fine-tuning JSONL (the distillation source).
pub fn export(args: ExportArgs) -> anyhow::Result<()> {
    runtime()?.block_on(async move {
        let url = args.database.unwrap_or_else(Store::default_url);
        let store = Store::connect(&url)
            .await
            .with_context(|| format!("opening the database {url}"))?;
        let filter = CompletionFilter {
            model: args.model,
            metadata: args.metadata,
        };
        let written = match &args.output {
            Some(path) => {
                let file = std::fs::File::create(path)
                    .with_context(|| format!("creating {}", path.display()))?;
                ferrum_server::export_completions(&store, &filter, std::io::BufWriter::new(file))
                    .await
            }
            None => {
                ferrum_server::export_completions(&store, &filter, std::io::stdout().lock()).await
            }
        }
        .map_err(|e| anyhow::anyhow!(e))?;
        eprintln!("exported {written} stored completions");
        Ok(())
    })
}
