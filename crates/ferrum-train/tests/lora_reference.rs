//! An adapter ferrum trained, served by ferrum and by llama.cpp (`--lora`): the next-token
//! prediction at every position of held-out chats of the training task on nano, against
//! llama.cpp's (`tests/reference/`, see its README).
//!
//! Measured 2026-12-06: 478/481 top-1 agreement, mean |logprob diff| 0.013 (median 0.0002).
//! Without the adapter ferrum matches llama.cpp bit for bit on the same text (481/481, max
//! diff 6e-6); with it, positions in the reviews (where the adapter acts most) differ by up
//! to 0.28 while the template's tokens stay exact. Both add `scale * B(A x)` in f32 after the
//! quantized product (in different summation orders); why that costs this much at some
//! positions is not pinned down yet.

use ferrum_engine::{
    log_sum_exp, top_k, LoadOptions, LoadedModel, Logits, LoraAdapter, SeqInput, Workspace,
};
use std::path::PathBuf;

fn reference_file(file: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/reference")
        .join(file)
}

/// nano's GGUF, where `ferrum pull` puts it.
fn nano() -> PathBuf {
    let home = std::env::var_os("FERRUM_HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache/ferrum"));
    let path = home.join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        path.is_file(),
        "{} is missing: run `ferrum pull gpt-4.1-nano`",
        path.display()
    );
    path
}

/// Top-1 agreement with llama.cpp at every position, in llama.cpp's 512-token micro-batches,
/// and the mean |difference| of the logprob of llama.cpp's top-1 token.
fn agreement(
    model: &LoadedModel,
    adapter: Option<&LoraAdapter>,
    reference: &serde_json::Value,
) -> (usize, usize, f32) {
    let ids: Vec<u32> = reference["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    let top = reference["top"].as_array().unwrap();
    let vocab = model.model.cfg.vocab_size;
    let mut kv = model.model.new_cache(ids.len() + 1);
    let mut ws = Workspace::default();
    let (mut agree, mut sum_err) = (0, 0f32);
    for (c, chunk) in ids.chunks(512).enumerate() {
        let logits = model
            .model
            .forward_batch(
                &model.pool,
                &mut ws,
                &mut [SeqInput {
                    kv: &mut kv,
                    tokens: chunk,
                    logits: Logits::Prompt,
                    adapter,
                    embeds: None,
                }],
            )
            .unwrap();
        for (i, row) in logits.chunks_exact(vocab).enumerate() {
            let theirs = &top[c * 512 + i][0];
            let id = theirs[0].as_u64().unwrap() as usize;
            agree += (top_k(row, 1)[0].0 as usize == id) as usize;
            let err = (row[id] - log_sum_exp(row) - theirs[1].as_f64().unwrap() as f32).abs();
            sum_err += err;
        }
    }
    (agree, ids.len(), sum_err / ids.len() as f32)
}

#[test]
fn a_trained_adapter_predicts_as_llama_cpp_serving_it() {
    let text = std::fs::read_to_string(reference_file("nano_sentiment_lora.json")).unwrap();
    let reference: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(reference["settings"]["lora"], true);
    let model = LoadedModel::load(&nano(), &LoadOptions::default()).unwrap();
    let adapter = LoraAdapter::load(
        &reference_file("nano_sentiment_r4.gguf"),
        "ft:ref",
        &model.model,
    )
    .unwrap();
    let (agree, total, mean_err) = agreement(&model, Some(&adapter), &reference);
    let rate = agree as f64 / total as f64;
    eprintln!(
        "top-1 agreement with llama.cpp --lora: {agree}/{total}, mean |logprob diff| {mean_err}"
    );
    assert!(rate >= 0.99, "top-1 agreement {agree}/{total}");
    assert!(mean_err < 0.03, "mean |logprob diff| {mean_err}");
    // Without the adapter, ferrum is further from llama.cpp-with-the-adapter: the adapter is
    // what makes them agree.
    let (base, _, _) = agreement(&model, None, &reference);
    assert!(
        base < agree,
        "base model agreement {base} vs {agree} with the adapter"
    );
}
