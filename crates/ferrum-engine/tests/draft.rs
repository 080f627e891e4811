//! Draft-model speculative decoding through the engine: with a draft, every output is token for
//! token the output without one (greedy and seeded sampling, in a batch under preemption), the
//! draft's proposals are verified and mostly kept when the draft agrees, and they are never
//! reported as predicted tokens.

mod common;

use std::ops::ControlFlow;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{channel, Receiver};
use std::sync::Arc;

use ferrum_engine::{
    Completion, Draft, EngineOptions, Event, GenerateParams, LoadOptions, LoadedModel, ModelHandle,
    Priority, Request, SamplingParams,
};

fn load(tier: &str) -> LoadedModel {
    let opts = LoadOptions {
        context_length: Some(1024),
        ..Default::default()
    };
    LoadedModel::load(&common::model_path(tier), &opts).unwrap()
}

/// `target` served with `draft` (tier name, proposals per round) and without.
fn handles(
    target: &str,
    draft: &str,
    tokens: usize,
    opts: EngineOptions,
) -> (ModelHandle, ModelHandle) {
    let plain = ModelHandle::spawn(load(target), EngineOptions::default()).unwrap();
    let model = load(target);
    let draft = Draft::new(&model, Arc::new(load(draft)), tokens).unwrap();
    let drafted = ModelHandle::spawn_with_draft(model, opts, Some(draft)).unwrap();
    (plain, drafted)
}

fn submit(h: &ModelHandle, prompt: Vec<u32>, params: GenerateParams) -> Receiver<Event> {
    let (tx, rx) = channel();
    let sink = Box::new(move |ev: Event| {
        if tx.send(ev).is_err() {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    });
    h.submit(Request {
        prompt,
        params,
        choices: 1,
        priority: Priority::Interactive,
        adapter: None,
        embeds: None,
        sink,
    })
    .unwrap();
    rx
}

fn finish(rx: Receiver<Event>) -> Completion {
    common::completion_of(&rx)
}

fn complete(h: &ModelHandle, prompt: &[u32], params: &GenerateParams) -> Completion {
    finish(submit(h, prompt.to_vec(), params.clone()))
}

fn params(max_tokens: usize, sampling: SamplingParams) -> GenerateParams {
    GenerateParams {
        max_tokens,
        sampling,
        ..Default::default()
    }
}

fn drafted(h: &ModelHandle) -> (u64, u64) {
    let s = h.stats();
    (
        s.draft_accepted.load(Ordering::Relaxed),
        s.draft_rejected.load(Ordering::Relaxed),
    )
}

#[test]
fn a_draft_changes_the_speed_never_the_output() {
    // nano drafting for itself: the draft agrees with every greedy choice, and sampling at
    // temperature 0.9 rejects some proposals.
    let (plain, h) = handles("nano", "nano", 4, EngineOptions::default());
    let p = common::user_prompt(h.model(), "Write a short poem about the sea.");
    let greedy = params(48, SamplingParams::greedy());
    let want = complete(&plain, &p, &greedy);
    let got = complete(&h, &p, &greedy);
    assert_eq!(got.tokens, want.tokens);
    assert_eq!(got.text, want.text);
    assert_eq!(got.finish_reason, want.finish_reason);
    // Internal proposals are neither reported nor billed as predicted tokens.
    assert_eq!(
        (
            got.accepted_prediction_tokens,
            got.rejected_prediction_tokens
        ),
        (0, 0)
    );
    let (kept, rejected) = drafted(&h);
    assert!(
        kept as usize * 10 >= want.tokens.len() * 6,
        "greedy self-draft: only {kept} of {} tokens were proposals kept ({rejected} rejected)",
        want.tokens.len()
    );
    for seed in [3, 11] {
        let sampled = params(
            48,
            SamplingParams {
                temperature: 0.9,
                seed: Some(seed),
                ..Default::default()
            },
        );
        let want = complete(&plain, &p, &sampled);
        let got = complete(&h, &p, &sampled);
        assert_eq!(got.tokens, want.tokens, "seed {seed}");
    }
    // A prediction takes precedence over the draft and is reported as usual.
    let mut predicted = greedy.clone();
    predicted.prediction = want.tokens.clone();
    let before = drafted(&h);
    let got = complete(&h, &p, &predicted);
    assert_eq!(got.tokens, want.tokens);
    assert!(got.accepted_prediction_tokens > 0);
    assert_eq!(
        drafted(&h),
        before,
        "the draft stays idle for a predicted request"
    );
}

#[test]
fn drafted_sequences_in_a_batch_with_preemption_keep_every_output() {
    // Room for about two of these sequences' caches, so sequences are preempted (and their
    // draft caches dropped and rebuilt) while others verify proposals.
    let opts = EngineOptions {
        kv_budget_bytes: 3 << 20,
        step_tokens: 32,
        ..Default::default()
    };
    let (plain, h) = handles("nano", "nano", 6, opts);
    let params = params(40, common::greedy_without_eos(h.model()));
    let prompts: Vec<Vec<u32>> = [
        "Tell me about the moon.",
        "Write a short poem about autumn leaves.",
        "Why is the sky blue?",
        "Explain recursion to a child.",
    ]
    .iter()
    .map(|q| common::user_prompt(h.model(), q))
    .collect();
    let want: Vec<Completion> = prompts
        .iter()
        .map(|p| complete(&plain, p, &params))
        .collect();
    let rxs: Vec<_> = prompts
        .iter()
        .map(|p| submit(&h, p.clone(), params.clone()))
        .collect();
    for (rx, want) in rxs.into_iter().zip(&want) {
        assert_eq!(finish(rx).tokens, want.tokens);
    }
    assert!(h.stats().preemptions.load(Ordering::Relaxed) > 0);
    assert!(drafted(&h).0 > 0);
}

#[test]
fn mini_drafts_for_gpt_4_1_without_changing_its_output() {
    let (plain, h) = handles("full", "mini", 4, EngineOptions::default());
    let p = common::user_prompt(
        h.model(),
        "Write a Python function that returns the n-th Fibonacci number.",
    );
    let greedy = params(32, SamplingParams::greedy());
    let want = complete(&plain, &p, &greedy);
    let got = complete(&h, &p, &greedy);
    assert_eq!(got.tokens, want.tokens);
    let (kept, rejected) = drafted(&h);
    assert!(
        kept > 0,
        "mini's proposals: {kept} kept, {rejected} rejected"
    );
}

#[test]
fn a_draft_with_another_vocabulary_is_refused() {
    let target = load("nano");
    let err = Draft::new(&target, Arc::new(load("mini")), 4).unwrap_err();
    assert!(err.to_string().contains("tokenizers differ"), "{err}");
    let err = Draft::new(&target, Arc::new(load("nano")), 0).unwrap_err();
    assert!(err.to_string().contains("between 1 and"), "{err}");
}
