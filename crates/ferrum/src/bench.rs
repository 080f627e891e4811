//! `ferrum bench`: prefill and decode speed of a model, its memory traffic per token, and
//! optionally llama.cpp's `llama-bench` on the same file in the same run, and both again with a
//! busy neighbour process taking one core.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use ferrum_engine::{Logits, Workspace};
use ferrum_registry::Registry;

use crate::cli::{load_model, ModelArgs};

#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt length of the prefill test (0 skips it).
    #[arg(long, default_value_t = 512)]
    pub prompt_tokens: usize,
    /// Tokens of the decode test (0 skips it).
    #[arg(long, default_value_t = 128)]
    pub gen_tokens: usize,
    /// Tokens already in the context before each test (llama-bench's `-d`): decode and prefill
    /// speed at that depth.
    #[arg(long, default_value_t = 0)]
    pub depth: usize,
    /// Repetitions of each test; the median is reported.
    #[arg(long, default_value_t = 3)]
    pub repetitions: usize,
    /// Path of llama.cpp's `llama-bench` binary, to measure it on the same file in this run.
    #[arg(long)]
    pub llama_bench: Option<PathBuf>,
    /// Extra arguments for llama-bench, e.g. `--llama-arg=-fa --llama-arg=1` for its flash
    /// attention.
    #[arg(long = "llama-arg", allow_hyphen_values = true)]
    pub llama_args: Vec<String>,
    /// Also measure with a busy-looping neighbour process (taking one core).
    #[arg(long)]
    pub contention: bool,
    /// LoRA adapters (repeatable): measure decoding a batch of `--batch` sequences with none,
    /// one and all of them active (assigned round-robin), instead of the single-sequence test.
    #[arg(long)]
    pub lora: Vec<PathBuf>,
    /// Sequences decoding together in the `--lora` test.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
}

struct Figures {
    prefill_tok_s: Option<f64>,
    decode_tok_s: Option<f64>,
}

pub fn bench(registry: &Registry, args: BenchArgs) -> anyhow::Result<()> {
    let model = load_model(registry, &args.model)?;
    let cfg = &model.model.cfg;
    let bytes_per_token = model.model.weight_bytes_per_token();
    println!(
        "model {} ({}, {} layers, d_model {}), {} threads",
        model.path.display(),
        cfg.arch.name(),
        cfg.n_layers,
        cfg.d_model,
        model.pool.n_threads()
    );
    println!(
        "weights read per decoded token: {:.1} MB",
        bytes_per_token as f64 / 1e6
    );
    if !args.lora.is_empty() {
        return lora_bench(&model, &args);
    }
    let idle = measure(&model, &args)?;
    report("ferrum", &idle, bytes_per_token);
    let llama_idle = match &args.llama_bench {
        Some(bin) => Some(llama_bench(
            bin,
            &model.path,
            &args,
            model.pool.n_threads(),
        )?),
        None => None,
    };
    if let Some(l) = &llama_idle {
        report("llama.cpp", l, bytes_per_token);
        ratio("ferrum / llama.cpp", &idle, l);
    }
    if args.contention {
        let _neighbour = BusyNeighbour::start()?;
        let busy = measure(&model, &args)?;
        report("ferrum, busy neighbour", &busy, bytes_per_token);
        ratio("ferrum busy / idle", &busy, &idle);
        if let Some(bin) = &args.llama_bench {
            let l = llama_bench(bin, &model.path, &args, model.pool.n_threads())?;
            report("llama.cpp, busy neighbour", &l, bytes_per_token);
            if let Some(li) = &llama_idle {
                ratio("llama.cpp busy / idle", &l, li);
            }
        }
    }
    println!("peak RSS: {:.1} MB", peak_rss_bytes() as f64 / 1e6);
    Ok(())
}

fn measure(model: &ferrum_engine::LoadedModel, args: &BenchArgs) -> anyhow::Result<Figures> {
    let m = &model.model;
    let vocab = m.cfg.vocab_size as u32;
    // Deterministic pseudo-random tokens, as llama-bench uses random tokens.
    let tokens: Vec<u32> = (0..args.prompt_tokens as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 7) % vocab)
        .collect();
    let mut ws = Workspace::default();
    let ctx = (args.depth + args.prompt_tokens + args.gen_tokens + 1).min(model.context_length);
    // The context of depth `args.depth`, filled before each test and not timed.
    let context: Vec<u32> = (0..args.depth as u32)
        .map(|i| (i.wrapping_mul(2_246_822_519) >> 9) % vocab)
        .collect();
    let fill = |ws: &mut Workspace| -> anyhow::Result<ferrum_engine::KvCache> {
        let mut kv = m.new_cache(ctx);
        for chunk in context.chunks(model.prefill_chunk) {
            m.forward(&model.pool, ws, &mut kv, chunk, Logits::None)?;
        }
        Ok(kv)
    };
    let mut prefill = Vec::new();
    let mut decode = Vec::new();
    for _ in 0..args.repetitions.max(1) {
        if args.prompt_tokens > 0 {
            let mut kv = fill(&mut ws)?;
            let t = Instant::now();
            for chunk in tokens.chunks(model.prefill_chunk) {
                m.forward(&model.pool, &mut ws, &mut kv, chunk, Logits::Last)?;
            }
            prefill.push(args.prompt_tokens as f64 / t.elapsed().as_secs_f64());
        }
        if args.gen_tokens > 0 {
            // Like llama-bench's tg test: decode after `depth` tokens, one token at a time.
            let mut kv = fill(&mut ws)?;
            let mut tok = 1 % vocab;
            let t = Instant::now();
            for _ in 0..args.gen_tokens {
                let logits = m.forward(&model.pool, &mut ws, &mut kv, &[tok], Logits::Last)?;
                tok = ferrum_engine::argmax(logits);
            }
            decode.push(args.gen_tokens as f64 / t.elapsed().as_secs_f64());
        }
    }
    Ok(Figures {
        prefill_tok_s: median(&mut prefill),
        decode_tok_s: median(&mut decode),
    })
}

/// Decode tok/s of `--batch` sequences stepping together (each after a `--prompt-tokens`
/// prompt), with 0, 1 and all of the `--lora` adapters active, alternating the settings each
/// repetition; reports medians and the overhead against the base model.
fn lora_bench(model: &ferrum_engine::LoadedModel, args: &BenchArgs) -> anyhow::Result<()> {
    use ferrum_engine::{LoraAdapter, SeqInput};
    let m = &model.model;
    let adapters = args
        .lora
        .iter()
        .enumerate()
        .map(|(i, p)| LoraAdapter::load(p, &format!("bench-{i}"), m))
        .collect::<Result<Vec<_>, _>>()?;
    let vocab = m.cfg.vocab_size as u32;
    let n = args.batch.max(1);
    let settings: Vec<usize> = if adapters.len() > 1 {
        vec![0, 1, adapters.len()]
    } else {
        vec![0, 1]
    };
    let mut results: Vec<Vec<f64>> = vec![Vec::new(); settings.len()];
    let mut ws = Workspace::default();
    let ctx = args.prompt_tokens + args.gen_tokens + 1;
    for _ in 0..args.repetitions.max(1) {
        for (k, &active) in settings.iter().enumerate() {
            // Sequence i runs adapter i % active (none when active is 0).
            let adapter_of = |i: usize| (active > 0).then(|| &adapters[i % active]);
            let mut caches: Vec<_> = (0..n).map(|_| m.new_cache(ctx)).collect();
            let prompts: Vec<Vec<u32>> = (0..n)
                .map(|s| {
                    (0..args.prompt_tokens.max(1) as u32)
                        .map(|i| {
                            (i.wrapping_mul(2_654_435_761) >> 7).wrapping_add(s as u32) % vocab
                        })
                        .collect()
                })
                .collect();
            let mut batch: Vec<SeqInput> = caches
                .iter_mut()
                .zip(&prompts)
                .enumerate()
                .map(|(i, (kv, p))| SeqInput {
                    kv,
                    tokens: p,
                    logits: Logits::Last,
                    adapter: adapter_of(i),
                    embeds: None,
                })
                .collect();
            let logits = m.forward_batch(&model.pool, &mut ws, &mut batch)?;
            let v = vocab as usize;
            let mut next: Vec<[u32; 1]> = logits
                .chunks_exact(v)
                .map(|row| [ferrum_engine::argmax(row)])
                .collect();
            let t = Instant::now();
            for _ in 0..args.gen_tokens {
                let mut batch: Vec<SeqInput> = caches
                    .iter_mut()
                    .zip(&next)
                    .enumerate()
                    .map(|(i, (kv, tok))| SeqInput {
                        kv,
                        tokens: tok,
                        logits: Logits::Last,
                        adapter: adapter_of(i),
                        embeds: None,
                    })
                    .collect();
                let logits = m.forward_batch(&model.pool, &mut ws, &mut batch)?;
                next = logits
                    .chunks_exact(v)
                    .map(|row| [ferrum_engine::argmax(row)])
                    .collect();
            }
            results[k].push((n * args.gen_tokens) as f64 / t.elapsed().as_secs_f64());
        }
    }
    let base = median(&mut results[0]).unwrap_or(0.0);
    for (k, &active) in settings.iter().enumerate() {
        let tok_s = median(&mut results[k]).unwrap_or(0.0);
        println!(
            "batch of {n}, {active} adapter(s) active: decode {tok_s:>7.1} tok/s ({:+.1}% vs base)",
            (tok_s / base - 1.0) * 100.0
        );
    }
    Ok(())
}

fn median(v: &mut [f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(v[v.len() / 2])
}

fn report(who: &str, f: &Figures, bytes_per_token: usize) {
    let fmt = |x: Option<f64>| x.map_or("-".to_string(), |x| format!("{x:.1}"));
    let bw = f.decode_tok_s.map_or("-".to_string(), |t| {
        format!("{:.1}", t * bytes_per_token as f64 / 1e9)
    });
    println!(
        "{who:<28} prefill {:>8} tok/s   decode {:>7} tok/s   ({bw} GB/s of weights)",
        fmt(f.prefill_tok_s),
        fmt(f.decode_tok_s)
    );
}

fn ratio(label: &str, a: &Figures, b: &Figures) {
    let r = |x: Option<f64>, y: Option<f64>| match (x, y) {
        (Some(x), Some(y)) if y > 0.0 => format!("{:.2}x", x / y),
        _ => "-".to_string(),
    };
    println!(
        "{label:<28} prefill {:>8}         decode {:>7}",
        r(a.prefill_tok_s, b.prefill_tok_s),
        r(a.decode_tok_s, b.decode_tok_s)
    );
}

/// Runs llama.cpp's llama-bench on the same file and threads, returning its median-equivalent
/// (average over repetitions, as llama-bench reports) figures.
fn llama_bench(
    bin: &PathBuf,
    model: &std::path::Path,
    args: &BenchArgs,
    threads: usize,
) -> anyhow::Result<Figures> {
    let out = Command::new(bin)
        .arg("-m")
        .arg(model)
        .args(["-p", &args.prompt_tokens.to_string()])
        .args(["-n", &args.gen_tokens.to_string()])
        .args(["-t", &threads.to_string()])
        .args(["-r", &args.repetitions.max(1).to_string()])
        .args(["-d", &args.depth.to_string()])
        .args(["-o", "json"])
        .args(&args.llama_args)
        .stderr(Stdio::null())
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    anyhow::ensure!(out.status.success(), "llama-bench failed: {}", out.status);
    let rows: Vec<serde_json::Value> =
        serde_json::from_slice(&out.stdout).context("parsing llama-bench's JSON output")?;
    let pick = |pp: bool| {
        rows.iter()
            .find(|r| (r["n_prompt"].as_u64().unwrap_or(0) > 0) == pp)
            .and_then(|r| r["avg_ts"].as_f64())
    };
    Ok(Figures {
        prefill_tok_s: pick(true),
        decode_tok_s: pick(false),
    })
}

/// A process spinning on one core for as long as this value lives.
struct BusyNeighbour(Child);

impl BusyNeighbour {
    fn start() -> anyhow::Result<Self> {
        let child = Command::new("sh")
            .args(["-c", "while :; do :; done"])
            .spawn()
            .context("starting the busy neighbour")?;
        Ok(BusyNeighbour(child))
    }
}

impl Drop for BusyNeighbour {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Peak resident memory of this process (VmHWM), in bytes.
fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}
