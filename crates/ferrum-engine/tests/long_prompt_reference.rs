//! Long prompts against llama.cpp: the next-token prediction at every position of a 2,048-token
//! prompt on gpt-4.1-mini (Qwen2.5-Coder-0.5B), plain, with YaRN RoPE scaling and with a q8_0
//! KV cache, compared with llama.cpp run with the same settings (`tests/reference/tools/
//! llama_positions.cpp`, see tests/reference/README.md).
//!
//! Measured 2026-12-03: 2048/2048 top-1 agreement and mean |logprob diff| below 0.00005 in all
//! three: ferrum evaluates a prompt as llama.cpp does bit for bit (its batched matmul orders,
//! its tiled f32 attention for chunks of 64+ tokens, YaRN's angles, the q8_0 cache with its
//! Hadamard rotation). The bars leave room for kernels that trade exactness for speed.

mod common;

use ferrum_engine::kernels::ThreadPool;
use ferrum_engine::{
    log_sum_exp, top_k, GgufFile, KvType, Logits, ModelOptions, RopeScaling, Transformer, Workspace,
};

/// Positions per forward pass: llama.cpp's micro-batch (`n_ubatch`), which picks its kernels
/// (and so their rounding). Every position's logits are scored, as llama.cpp computed them.
const CHUNK: usize = 512;

/// Runs the reference prompt through the model and compares every position's top-1 token and
/// the logprob of llama.cpp's top-1 token.
fn check(file: &str, opts: ModelOptions, min_agreement: f64, max_mean_lp_err: f32) {
    let path = common::reference_dir().join(file);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let reference: serde_json::Value = serde_json::from_str(&text).unwrap();
    let ids: Vec<u32> = reference["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    let top = reference["top"].as_array().unwrap();
    assert_eq!(top.len(), ids.len());
    let gguf = GgufFile::open(&common::model_path("mini")).unwrap();
    let model = Transformer::load_with(&gguf, &opts).unwrap();
    let pool = ThreadPool::with_default_threads();
    let mut ws = Workspace::default();
    let mut kv = model.new_cache(ids.len() + 1);
    assert_eq!(kv.kv_type(), opts.kv_type);
    let vocab = model.cfg.vocab_size;
    let (mut agree, mut sum_err, mut max_err) = (0usize, 0f32, 0f32);
    for (c, chunk) in ids.chunks(CHUNK).enumerate() {
        let logits = model
            .forward(&pool, &mut ws, &mut kv, chunk, Logits::Prompt)
            .unwrap();
        for (i, row) in logits.chunks_exact(vocab).enumerate() {
            let theirs = &top[c * CHUNK + i][0];
            let (id, lp) = (
                theirs[0].as_u64().unwrap() as usize,
                theirs[1].as_f64().unwrap(),
            );
            agree += (top_k(row, 1)[0].0 as usize == id) as usize;
            let err = (row[id] - log_sum_exp(row) - lp as f32).abs();
            sum_err += err;
            max_err = max_err.max(err);
        }
    }
    let rate = agree as f64 / ids.len() as f64;
    let mean_err = sum_err / ids.len() as f32;
    eprintln!(
        "{file}: top-1 agreement {agree}/{} = {rate:.4}; logprob of llama.cpp's token: mean \
         |diff| {mean_err:.4}, max {max_err:.4}",
        ids.len()
    );
    assert!(
        rate >= min_agreement,
        "{file}: top-1 agreement {rate} < {min_agreement}"
    );
    assert!(
        mean_err < max_mean_lp_err,
        "{file}: mean logprob error {mean_err} >= {max_mean_lp_err}"
    );
}

/// The plain model: long prompts take the tiled f32 attention, as in llama.cpp with `-fa on`.
#[test]
fn mini_long_prompt_matches_llama_cpp() {
    check("mini_f16_2k.json", ModelOptions::default(), 0.99, 0.02);
}

/// YaRN with factor 4 over Qwen2.5's 32,768 trained positions (Qwen's recommendation for 128k),
/// against `llama.cpp --rope-scaling yarn --rope-scale 4 --yarn-orig-ctx 32768 -fa on`.
/// (Without the scaling, llama.cpp's own predictions agree with these at only 83% of the
/// positions, so the bar tests the scaling.)
#[test]
fn mini_yarn_matches_llama_cpp() {
    let opts = ModelOptions {
        rope_scaling: Some(RopeScaling::yarn(4.0, 32768)),
        ..ModelOptions::default()
    };
    check("mini_yarn4.json", opts, 0.99, 0.02);
}

/// A q8_0 KV cache, against `llama.cpp -ctk q8_0 -ctv q8_0 -fa on`. (With an f16 cache,
/// llama.cpp's predictions agree with these at 95% of the positions.)
#[test]
fn mini_q8_0_kv_cache_matches_llama_cpp() {
    let opts = ModelOptions {
        kv_type: KvType::Q8_0,
        ..ModelOptions::default()
    };
    check("mini_kv_q8_0.json", opts, 0.99, 0.02);
}
