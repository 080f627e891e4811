//! Fidelity of the engine against llama.cpp's own outputs (tests/reference): greedy
//! continuations of every reference prompt, top-1 agreement and log-probabilities.

mod common;

/// Two candidates closer than this (in nats) are a near tie: kernel rounding may pick either.
///
/// Measured 2026-12-03 (teacher-forced over every reference position, prompts fed in
/// llama-server's 512-token micro-batches): top-1 agreement nano 541/541, mini 395/396 (one
/// near tie), gpt-4.1 397/397; mean |logprob diff| 0.0005 / 0.0006 / 0.0017. ferrum follows
/// llama.cpp's x86 arithmetic bit for bit (summation order of every quantized dot product, in
/// its one-row and batched kernels; activation quantization; RoPE's fused multiply-adds;
/// ggml's vectorised `expf` in SwiGLU; its CPU flash attention: per token with f16 query and
/// f16 value accumulation, and its tiled f32 kernel for prompt chunks of 64 tokens or more),
/// which was checked tensor by tensor against libllama at the reference commit. The remaining
/// differences come from decoding past 512 cached positions (two long prompts), where
/// llama.cpp splits each head's keys over its threads and ferrum takes its grouped f32 kernel.
const NEAR_TIE: f32 = 0.35;

/// llama-server's default physical batch size (`n_ubatch`).
const LLAMA_UBATCH: usize = 512;

use ferrum_engine::kernels::ThreadPool;
use ferrum_engine::{log_sum_exp, top_k, GgufFile, Logits, Transformer, Workspace};

/// One generated position: our greedy choice, llama.cpp's, and where llama.cpp reported top
/// logprobs for it (llama-server merges tokens that end inside a UTF-8 character into the next
/// one, so those positions have no `steps` entry of their own).
struct Position {
    ours: u32,
    theirs: u32,
    /// Our margin between the best and second-best logit (in logprob units).
    our_margin: f32,
    /// (our logprob of llama.cpp's token, llama.cpp's logprob, llama.cpp's top-2 margin).
    reference: Option<(f32, f32, f32)>,
}

/// Feeds llama.cpp's own greedy tokens (teacher forcing), so every position is compared on the
/// same context even after a divergence.
fn positions(
    model: &Transformer,
    pool: &ThreadPool,
    prompt: &[u32],
    greedy: &serde_json::Value,
) -> Vec<Position> {
    let mut ws = Workspace::default();
    let mut kv = model.new_cache(4096);
    let theirs = ids(&greedy["ids"]);
    let mut steps = greedy["steps"].as_array().unwrap().iter().peekable();
    let mut out = Vec::new();
    // llama-server evaluates a prompt in micro-batches of 512 tokens, and the batch size picks
    // llama.cpp's attention kernel (and so its rounding), so the prompt goes in the same chunks.
    let mut logits = Vec::new();
    for (i, chunk) in prompt.chunks(LLAMA_UBATCH).enumerate() {
        let last = (i + 1) * LLAMA_UBATCH >= prompt.len();
        let which = if last { Logits::Last } else { Logits::None };
        logits = model
            .forward(pool, &mut ws, &mut kv, chunk, which)
            .unwrap()
            .to_vec();
    }
    for &id in &theirs {
        let lse = log_sum_exp(&logits);
        let top = top_k(&logits, 2);
        let step = steps.next_if(|s| s["id"].as_u64() == Some(id as u64));
        let reference = step.map(|s| {
            let top = s["top"].as_array().unwrap();
            let lp = |i: usize| {
                top.get(i)
                    .map_or(f64::NEG_INFINITY, |t| t["logprob"].as_f64().unwrap())
            };
            (
                logits[id as usize] - lse,
                s["logprob"].as_f64().unwrap() as f32,
                (lp(0) - lp(1)) as f32,
            )
        });
        out.push(Position {
            ours: top[0].0,
            theirs: id,
            our_margin: top[0].1 - top[1].1,
            reference,
        });
        logits = model
            .forward(pool, &mut ws, &mut kv, &[id], Logits::Last)
            .unwrap()
            .to_vec();
    }
    out
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn check_tier(tier: &str, min_agreement: f64, max_mean_lp_err: f32) {
    let gguf = GgufFile::open(&common::model_path(tier)).unwrap();
    let model = Transformer::load(&gguf).unwrap();
    let pool = ThreadPool::with_default_threads();
    let reference = common::reference(tier);
    let mut cases = Vec::new();
    for c in reference["chat"].as_array().unwrap() {
        cases.push((ids(&c["prompt_ids"]), &c["greedy"]));
    }
    for c in reference["raw"].as_array().unwrap() {
        cases.push((ids(&c["prompt_ids"]), &c["greedy"]));
    }
    let (mut total, mut agree, mut n_lp, mut sum_lp_err, mut max_lp_err) = (0, 0, 0, 0f32, 0f32);
    for (i, (prompt, greedy)) in cases.iter().enumerate() {
        let positions = positions(&model, &pool, prompt, greedy);
        // Free-running greedy output equals llama.cpp's for the first 32 tokens exactly when
        // the teacher-forced top-1 agrees at each of them. A disagreement is accepted only at a
        // near tie (< NEAR_TIE nats between the two best tokens, in llama.cpp's or our numbers),
        // where rounding differences between kernels decide; the test reports each one.
        for (j, p) in positions.iter().enumerate().take(32) {
            if p.ours != p.theirs {
                let their_margin = p.reference.map_or(f32::INFINITY, |r| r.2);
                assert!(
                    their_margin < NEAR_TIE || p.our_margin < NEAR_TIE,
                    "{tier} case {i} position {j}: ours {} vs llama.cpp {} without a near tie \
                     (margins: llama.cpp {their_margin}, ours {})",
                    p.ours,
                    p.theirs,
                    p.our_margin
                );
                eprintln!(
                    "{tier} case {i} position {j}: near-tie divergence ({} vs {}, margins {their_margin:.3}/{:.3})",
                    p.ours, p.theirs, p.our_margin
                );
                break;
            }
        }
        for p in &positions {
            total += 1;
            agree += (p.ours == p.theirs) as usize;
            if let Some((ours, theirs, _)) = p.reference {
                n_lp += 1;
                sum_lp_err += (ours - theirs).abs();
                max_lp_err = max_lp_err.max((ours - theirs).abs());
            }
        }
    }
    let rate = agree as f64 / total as f64;
    let mean_lp_err = sum_lp_err / n_lp as f32;
    eprintln!(
        "{tier}: top-1 agreement {agree}/{total} = {rate:.4}; logprob of llama.cpp's token: \
         mean |diff| {mean_lp_err:.4}, max {max_lp_err:.4} over {n_lp} positions"
    );
    assert!(
        rate >= min_agreement,
        "{tier}: top-1 agreement {rate} < {min_agreement}"
    );
    assert!(
        mean_lp_err < max_mean_lp_err,
        "{tier}: mean logprob error {mean_lp_err} >= {max_mean_lp_err}"
    );
}

#[test]
fn nano_matches_llama_cpp() {
    check_tier("nano", 0.99, 0.005);
}

#[test]
fn mini_matches_llama_cpp() {
    check_tier("mini", 0.99, 0.005);
}

#[test]
fn full_matches_llama_cpp() {
    check_tier("full", 0.99, 0.005);
}
