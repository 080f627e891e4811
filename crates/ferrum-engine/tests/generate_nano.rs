//! End-to-end generation on the nano model (SmolLM2-135M): chat template -> tokens -> streamed
//! text, stop sequences, limits, seeded sampling, cancellation and prefix reuse.

mod common;

use std::ops::ControlFlow;

use ferrum_engine::{FinishReason, GenerateParams, LoadOptions, LoadedModel, SamplingParams};

fn nano() -> LoadedModel {
    let opts = LoadOptions {
        context_length: Some(2048),
        ..Default::default()
    };
    LoadedModel::load(&common::model_path("nano"), &opts).unwrap()
}

fn prompt(m: &LoadedModel, user: &str) -> Vec<u32> {
    common::user_prompt(m, user)
}

fn greedy(max_tokens: usize) -> GenerateParams {
    GenerateParams {
        max_tokens,
        sampling: SamplingParams::greedy(),
        ..Default::default()
    }
}

/// Generates and returns (completion, concatenated streamed deltas).
fn run(m: &LoadedModel, p: &[u32], params: &GenerateParams) -> (ferrum_engine::Completion, String) {
    let mut session = m.new_session();
    let mut streamed = String::new();
    let c = m
        .generator()
        .generate(&mut session, p, params, &mut |ev| {
            streamed.push_str(&ev.text);
            ControlFlow::Continue(())
        })
        .unwrap();
    (c, streamed)
}

#[test]
fn greedy_chat_matches_the_reference_opening_and_streams_exactly_the_text() {
    let m = nano();
    let p = prompt(&m, "What is the capital of France?");
    let reference = common::reference("nano");
    let ref_ids: Vec<u32> = reference["chat"][0]["prompt_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(
        p, ref_ids,
        "chat template + tokenizer give llama.cpp's prompt"
    );
    let (c, streamed) = run(&m, &p, &greedy(12));
    assert_eq!(c.finish_reason, FinishReason::Length);
    assert_eq!(c.tokens.len(), 12);
    assert_eq!(streamed, c.text);
    let ref_text = reference["chat"][0]["greedy"]["text"].as_str().unwrap();
    assert!(
        ref_text.starts_with(&c.text),
        "{:?} vs {:?}",
        c.text,
        ref_text
    );
}

#[test]
fn stop_sequences_end_generation_and_are_not_emitted() {
    let m = nano();
    let p = prompt(&m, "What is the capital of France?");
    let (full, _) = run(&m, &p, &greedy(12));
    // Stop at the first comma of the greedy answer.
    let cut = full.text.find(',').expect("the greedy answer has a comma");
    let params = GenerateParams {
        stop: vec![",".into(), "never appears".into()],
        ..greedy(12)
    };
    let (c, streamed) = run(&m, &p, &params);
    assert_eq!(c.finish_reason, FinishReason::Stop);
    assert_eq!(c.text, full.text[..cut]);
    assert_eq!(streamed, c.text);
}

#[test]
fn seeded_sampling_is_reproducible_and_differs_across_seeds() {
    let m = nano();
    let p = prompt(&m, "Tell me a story about a dragon.");
    let params = |seed| GenerateParams {
        max_tokens: 24,
        sampling: SamplingParams {
            temperature: 1.0,
            top_p: 0.95,
            seed: Some(seed),
            ..Default::default()
        },
        ..Default::default()
    };
    let a = run(&m, &p, &params(1)).0;
    let b = run(&m, &p, &params(1)).0;
    assert_eq!(a.tokens, b.tokens);
    let others: Vec<_> = (2..6).map(|s| run(&m, &p, &params(s)).0.tokens).collect();
    assert!(
        others.iter().any(|t| *t != a.tokens),
        "different seeds give different samples"
    );
}

#[test]
fn cancellation_and_session_prefix_reuse() {
    let m = nano();
    let p = prompt(&m, "Count from 1 to 10, separated by commas.");
    let mut session = m.new_session();
    let mut n = 0;
    let c = m
        .generator()
        .generate(&mut session, &p, &greedy(50), &mut |_| {
            n += 1;
            if n == 3 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .unwrap();
    assert_eq!(c.finish_reason, FinishReason::Cancelled);
    assert_eq!(c.tokens.len(), 3);
    // The same prompt again reuses every cached prompt token but the last.
    let again = m
        .generator()
        .generate(&mut session, &p, &greedy(3), &mut |_| {
            ControlFlow::Continue(())
        })
        .unwrap();
    assert_eq!(again.cached_tokens, p.len() - 1);
    assert_eq!(
        again.tokens, c.tokens,
        "reused cache gives the same greedy tokens"
    );
}

#[test]
fn prompt_longer_than_the_context_is_a_typed_error() {
    let opts = LoadOptions {
        context_length: Some(16),
        ..Default::default()
    };
    let m = LoadedModel::load(&common::model_path("nano"), &opts).unwrap();
    let p = prompt(
        &m,
        "This prompt is certainly longer than sixteen tokens once templated.",
    );
    let mut session = m.new_session();
    let err = m
        .generator()
        .generate(&mut session, &p, &greedy(4), &mut |_| {
            ControlFlow::Continue(())
        })
        .unwrap_err();
    assert!(
        matches!(
            err,
            ferrum_engine::EngineError::ContextLengthExceeded { max: 16, .. }
        ),
        "{err}"
    );
}
