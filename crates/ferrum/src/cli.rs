//! Command-line interface: argument types and the `pull`, `run`, `chat` and `models` commands.

use std::io::{BufRead, Write};
use std::ops::ControlFlow;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use ferrum_engine::{
    FinishReason, GenerateParams, KvType, LoadOptions, LoadedModel, RopeScaling, SamplingParams,
};
use ferrum_registry::{ModelKind, Registry};

#[derive(Parser)]
#[command(name = "ferrum", version, about = "Self-hosted GPT-4.1 API platform")]
pub struct Cli {
    /// ferrum.toml mapping model ids to weights and prices (default: $FERRUM_CONFIG, else the
    /// embedded default).
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Fetch and verify the weights of the given models (default: every configured tier).
    Pull {
        models: Vec<String>,
        /// Re-hash files that are already cached.
        #[arg(long)]
        verify: bool,
    },
    /// List the configured model tiers.
    Models,
    /// Generate a reply to one prompt, streamed to stdout.
    Run(RunArgs),
    /// Interactive multi-turn chat.
    Chat(ChatArgs),
    /// Measure prefill and decode speed.
    Bench(crate::bench::BenchArgs),
    /// Measure how long an mmproj takes to encode an image.
    BenchVision(crate::bench_vision::BenchVisionArgs),
    /// Serve the OpenAI API over HTTP.
    Serve(crate::serve::ServeArgs),
    /// Token and cost totals per model from the usage ledger.
    Usage(crate::serve::UsageArgs),
    /// Write stored chat completions (`store: true`) as fine-tuning JSONL.
    Export(crate::serve::ExportArgs),
    /// The evals in the database and their runs with their scores.
    Evals(crate::evals::EvalsArgs),
    /// Train a LoRA adapter on a JSONL file of chat examples, locally.
    FineTune(crate::finetune::FineTuneArgs),
    /// The organization's admin keys (`ferrum admin init` creates one).
    #[command(subcommand)]
    Admin(crate::serve::AdminCommand),
}

#[derive(Args, Clone)]
pub struct ModelArgs {
    /// Model id or alias (e.g. gpt-4.1-nano), or a path to a .gguf file.
    #[arg(long, short, default_value = "gpt-4.1-nano")]
    pub model: String,
    /// Kernel threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Context window in tokens (default: the model's, or the scaled one with --rope-scaling).
    #[arg(long)]
    pub context_length: Option<usize>,
    /// RoPE scaling to stretch the context: yarn or linear (with --rope-scale), as llama.cpp's
    /// --rope-scaling.
    #[arg(long, value_parser = ["yarn", "linear"], requires = "rope_scale")]
    pub rope_scaling: Option<String>,
    /// The RoPE scaling factor (e.g. 4 to go from 32k to 128k positions).
    #[arg(long, requires = "rope_scaling")]
    pub rope_scale: Option<f32>,
    /// YaRN's original context (default: the model's).
    #[arg(long)]
    pub yarn_orig_ctx: Option<usize>,
    /// KV cache type: f16 or q8_0 (half the memory).
    #[arg(long, default_value = "f16", value_parser = parse_kv_type)]
    pub kv_type: KvType,
}

/// Parses `--kv-type`.
pub fn parse_kv_type(s: &str) -> Result<KvType, String> {
    KvType::parse(s).ok_or_else(|| format!("expected f16 or q8_0, got {s:?}"))
}

impl ModelArgs {
    /// The RoPE scaling the flags ask for.
    pub fn rope_scaling(&self) -> Option<RopeScaling> {
        let factor = self.rope_scale?;
        Some(match self.rope_scaling.as_deref()? {
            "linear" => RopeScaling::Linear { factor },
            _ => RopeScaling::yarn(factor, self.yarn_orig_ctx.unwrap_or(0)),
        })
    }
}

#[derive(Args, Clone)]
pub struct SamplingArgs {
    #[arg(long, default_value_t = 1024)]
    pub max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.7)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop sequences (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
}

impl SamplingArgs {
    fn params(&self) -> GenerateParams {
        GenerateParams {
            max_tokens: self.max_tokens,
            stop: self.stop.clone(),
            sampling: SamplingParams {
                temperature: self.temperature,
                top_p: self.top_p,
                seed: self.seed,
                ..Default::default()
            },
            ignore_eos: false,
            constraint: None,
            prediction: Vec::new(),
        }
    }
}

#[derive(Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Feed the prompt as plain text, without the chat template.
    #[arg(long)]
    pub raw: bool,
    /// System message.
    #[arg(long)]
    pub system: Option<String>,
    pub prompt: String,
}

#[derive(Args)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[arg(long)]
    pub system: Option<String>,
}

pub fn dispatch(cli: Cli) -> anyhow::Result<()> {
    let registry = Registry::load(cli.config.as_deref())?;
    match cli.command {
        Command::Pull { models, verify } => pull(&registry, &models, verify),
        Command::Models => {
            for tier in registry.tiers() {
                println!(
                    "{:<24} aliases: {:<32} ${}/{}/{} per 1M tokens (in/cached/out)  {}",
                    tier.id,
                    tier.aliases.join(", "),
                    tier.price.input,
                    tier.price.cached_input,
                    tier.price.output,
                    tier.weights.describe()
                );
            }
            Ok(())
        }
        Command::Run(args) => run(&registry, args),
        Command::Chat(args) => chat(&registry, args),
        Command::Bench(args) => crate::bench::bench(&registry, args),
        Command::BenchVision(args) => crate::bench_vision::bench_vision(args),
        Command::Serve(args) => crate::serve::serve(registry, args),
        Command::Usage(args) => crate::serve::usage(args),
        Command::Export(args) => crate::serve::export(args),
        Command::Evals(args) => crate::evals::evals(args),
        Command::FineTune(args) => crate::finetune::fine_tune(&registry, args),
        Command::Admin(command) => crate::serve::admin(command),
    }
}

fn pull(registry: &Registry, models: &[String], verify: bool) -> anyhow::Result<()> {
    let progress = ferrum_registry::default_progress();
    let mut opts = ferrum_registry::FetchOptions::from_env();
    opts.verify = verify;
    let tiers: Vec<_> = if models.is_empty() {
        registry.tiers().iter().collect()
    } else {
        models
            .iter()
            .map(|m| registry.get(m))
            .collect::<Result<_, _>>()?
    };
    for tier in tiers {
        let path = pull_tier(tier, &opts, progress.as_ref())
            .with_context(|| format!("fetching the weights of {}", tier.id))?;
        println!("{}: {}", tier.id, path.display());
        if let Some(mmproj) = &tier.mmproj {
            let path = ferrum_registry::ensure_weights_with(mmproj, &opts, progress.as_ref())
                .with_context(|| format!("fetching the mmproj of {}", tier.id))?;
            println!("{} mmproj: {}", tier.id, path.display());
        }
    }
    Ok(())
}

/// Fetches one tier's weights; returns the GGUF file, or an embedding model's weights file
/// (its tokenizer and config are beside it).
fn pull_tier(
    tier: &ferrum_registry::Tier,
    opts: &ferrum_registry::FetchOptions,
    progress: &dyn ferrum_registry::Progress,
) -> Result<PathBuf, ferrum_registry::RegistryError> {
    match tier.kind {
        ModelKind::Chat => ferrum_registry::ensure_weights_with(&tier.weights, opts, progress),
        ModelKind::Embedding => {
            ferrum_registry::ensure_embedding_weights_with(&tier.weights, opts, progress)
                .map(|files| files.weights)
        }
    }
}

/// Resolves `--model` (a tier id/alias or a .gguf path), fetching weights if needed, and loads it.
pub fn load_model(registry: &Registry, args: &ModelArgs) -> anyhow::Result<LoadedModel> {
    let path = if args.model.ends_with(".gguf") {
        PathBuf::from(&args.model)
    } else {
        let tier = registry.get(&args.model)?;
        if tier.kind == ModelKind::Embedding {
            bail!(
                "`{}` is an embedding model: serve it and call POST /v1/embeddings",
                tier.id
            );
        }
        let progress = ferrum_registry::default_progress();
        ferrum_registry::ensure_weights(&tier.weights, progress.as_ref())?
    };
    let opts = LoadOptions {
        threads: args.threads,
        context_length: args.context_length,
        prefill_chunk: None,
        weights_memory: ferrum_engine::WeightsMemory::from_env(),
        rope_scaling: args.rope_scaling(),
        kv_type: args.kv_type,
    };
    Ok(LoadedModel::load(&path, &opts)?)
}

fn messages(system: Option<&str>, turns: &[(String, String)]) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    if let Some(s) = system {
        out.push(serde_json::json!({"role": "system", "content": s}));
    }
    for (role, content) in turns {
        out.push(serde_json::json!({"role": role, "content": content}));
    }
    out
}

fn chat_prompt(model: &LoadedModel, msgs: &[serde_json::Value]) -> anyhow::Result<Vec<u32>> {
    let Some(template) = &model.template else {
        bail!("this model has no chat template; use --raw");
    };
    let text = template.render(msgs, None, true)?;
    Ok(model.tokenizer.encode(&text, false, true)?)
}

/// Generates and streams one reply to stdout; returns the full text.
fn stream_reply(
    model: &LoadedModel,
    session: &mut ferrum_engine::Session,
    prompt: &[u32],
    params: &GenerateParams,
) -> anyhow::Result<String> {
    let mut stdout = std::io::stdout();
    let completion = model
        .generator()
        .generate(session, prompt, params, &mut |ev| {
            let _ = stdout.write_all(ev.text.as_bytes());
            let _ = stdout.flush();
            ControlFlow::Continue(())
        })?;
    println!();
    if completion.finish_reason == FinishReason::Length {
        eprintln!("[stopped: max tokens]");
    }
    let secs = completion.decode_time.as_secs_f64().max(1e-9);
    tracing::info!(
        prompt_tokens = completion.prompt_tokens,
        cached_tokens = completion.cached_tokens,
        completion_tokens = completion.tokens.len(),
        decode_tok_s = completion.tokens.len() as f64 / secs,
        "generation done"
    );
    Ok(completion.text)
}

fn run(registry: &Registry, args: RunArgs) -> anyhow::Result<()> {
    let model = load_model(registry, &args.model)?;
    let prompt = if args.raw {
        model.tokenizer.encode(&args.prompt, true, false)?
    } else {
        let msgs = messages(
            args.system.as_deref(),
            &[("user".into(), args.prompt.clone())],
        );
        chat_prompt(&model, &msgs)?
    };
    let mut session = model.new_session();
    stream_reply(&model, &mut session, &prompt, &args.sampling.params())?;
    Ok(())
}

fn chat(registry: &Registry, args: ChatArgs) -> anyhow::Result<()> {
    let model = load_model(registry, &args.model)?;
    let mut session = model.new_session();
    let mut turns: Vec<(String, String)> = Vec::new();
    let params = args.sampling.params();
    let stdin = std::io::stdin();
    eprintln!(
        "ferrum chat ({}); an empty line or Ctrl-D quits.",
        args.model.model
    );
    loop {
        eprint!("> ");
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 || line.trim().is_empty() {
            return Ok(());
        }
        turns.push(("user".into(), line.trim_end().to_string()));
        let prompt = chat_prompt(&model, &messages(args.system.as_deref(), &turns))?;
        // The session keeps the previous turns' keys and values, so only the new turn is read.
        let reply = stream_reply(&model, &mut session, &prompt, &params)?;
        turns.push(("assistant".into(), reply));
    }
}
