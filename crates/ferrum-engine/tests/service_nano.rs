//! The engine thread behind `ModelHandle` on the nano model: events in order, `n` choices with
//! their own seeds, a full queue refusing work, a cancelled request freeing the thread, and a
//! client gone before its turn costing nothing.

mod common;

use std::ops::ControlFlow;
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use ferrum_engine::DEFAULT_BLOCK_SIZE as BLOCK_SIZE;
use ferrum_engine::{
    Completion, EngineOptions, Event, GenerateParams, LoadOptions, LoadedModel, ModelHandle,
    Priority, Request, SamplingParams, SubmitError,
};

fn handle_with(opts: EngineOptions) -> ModelHandle {
    let load = LoadOptions {
        context_length: Some(1024),
        ..Default::default()
    };
    let model = LoadedModel::load(&common::model_path("nano"), &load).unwrap();
    ModelHandle::spawn(model, opts).unwrap()
}

fn handle(queue: usize) -> ModelHandle {
    handle_with(EngineOptions {
        queue_capacity: queue,
        ..Default::default()
    })
}

/// Runs a request to the end; returns each choice's completion.
fn complete(
    h: &ModelHandle,
    prompt: Vec<u32>,
    params: GenerateParams,
    choices: u32,
) -> Vec<Completion> {
    let (req, rx) = request(prompt, params, choices, None);
    h.submit(req).unwrap();
    collect(rx)
}

fn collect(rx: Receiver<Event>) -> Vec<Completion> {
    let mut done: Vec<(u32, Completion)> = rx
        .iter()
        .filter_map(|e| match e {
            Event::ChoiceDone { choice, completion } => Some((choice, completion)),
            Event::Error(e) => panic!("request failed: {e}"),
            _ => None,
        })
        .collect();
    done.sort_by_key(|d| d.0);
    done.into_iter().map(|d| d.1).collect()
}

fn prompt(h: &ModelHandle, user: &str) -> Vec<u32> {
    common::user_prompt(h.model(), user)
}

/// A request whose events arrive on the returned channel; `stop_after` tokens cancel it.
fn request(
    prompt: Vec<u32>,
    params: GenerateParams,
    choices: u32,
    stop_after: Option<usize>,
) -> (Request, Receiver<Event>) {
    let (tx, rx) = channel();
    let mut tokens = 0;
    let sink = Box::new(move |ev: Event| {
        if matches!(ev, Event::Token { .. }) {
            tokens += 1;
        }
        if tx.send(ev).is_err() {
            return ControlFlow::Break(());
        }
        match stop_after {
            Some(n) if tokens >= n => ControlFlow::Break(()),
            _ => ControlFlow::Continue(()),
        }
    });
    let r = Request {
        prompt,
        params,
        choices,
        priority: Priority::Interactive,
        adapter: None,
        embeds: None,
        sink,
    };
    (r, rx)
}

fn params(max_tokens: usize, sampling: SamplingParams) -> GenerateParams {
    GenerateParams {
        max_tokens,
        sampling,
        ..Default::default()
    }
}

/// Never ends on its own before `max_tokens`: end-of-generation tokens are banned.
fn endless(h: &ModelHandle, max_tokens: usize) -> GenerateParams {
    params(max_tokens, common::greedy_without_eos(h.model()))
}

#[test]
fn choices_run_side_by_side_with_their_own_seeds() {
    let h = handle(4);
    let sampling = SamplingParams {
        temperature: 1.0,
        seed: Some(7),
        ..Default::default()
    };
    let (req, rx) = request(prompt(&h, "Name a color."), params(12, sampling), 3, None);
    h.submit(req).unwrap();
    let events: Vec<Event> = rx.iter().collect();
    assert!(matches!(events[0], Event::Started));
    let mut texts = vec![String::new(); 3];
    let mut done = vec![None; 3];
    for ev in &events[1..] {
        match ev {
            Event::Token { choice, token } => {
                assert!(
                    done[*choice as usize].is_none(),
                    "token after its choice ended"
                );
                texts[*choice as usize].push_str(&token.text);
            }
            Event::ChoiceDone { choice, completion } => {
                assert!(done[*choice as usize].is_none(), "choice ended twice");
                assert_eq!(completion.text, texts[*choice as usize]);
                done[*choice as usize] = Some(completion.clone());
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(done.iter().all(Option::is_some));
    // Seeds 7, 8, 9: the choices are different samples (with overwhelming probability).
    assert!(texts[0] != texts[1] || texts[1] != texts[2], "{texts:?}");
    // The same request again gives the same three choices (seeded), now from cached prompts.
    let again = complete(
        &h,
        prompt(&h, "Name a color."),
        params(
            12,
            SamplingParams {
                temperature: 1.0,
                seed: Some(7),
                ..Default::default()
            },
        ),
        3,
    );
    for (a, b) in again.iter().zip(&done) {
        assert_eq!(a.text, b.as_ref().unwrap().text);
        // Every whole block of the prompt but the one holding its last token is reused.
        assert_eq!(
            a.cached_tokens,
            (a.prompt_tokens - 1) / BLOCK_SIZE * BLOCK_SIZE
        );
    }
}

/// Greedy generation of prompts of different lengths, each alone and then all in one batch,
/// gives exactly the same tokens: a sequence's result does not depend on its batch.
#[test]
fn a_batch_of_mixed_lengths_gives_each_request_its_tokens_alone() {
    let users = [
        "Hi",
        "Write a haiku about the sea.",
        "List three prime numbers and explain why each of them is prime, in detail.",
        "What is the capital of France? Answer in one word, then tell me a fact about it.",
        "Count from one to ten in French.",
    ];
    let alone: Vec<Vec<u32>> = {
        // A fresh engine per prompt: no cached prefix, no batch.
        users
            .iter()
            .map(|u| {
                let h = handle_with(EngineOptions {
                    max_running: 1,
                    ..Default::default()
                });
                let p = prompt(&h, u);
                complete(&h, p, endless(&h, 24), 1).remove(0).tokens
            })
            .collect()
    };
    // Small step budget: prompts are read in chunks interleaved with others' decoding.
    let h = handle_with(EngineOptions {
        step_tokens: 16,
        ..Default::default()
    });
    let receivers: Vec<_> = users
        .iter()
        .map(|u| {
            let (req, rx) = request(prompt(&h, u), endless(&h, 24), 1, None);
            h.submit(req).unwrap();
            rx
        })
        .collect();
    for (i, rx) in receivers.into_iter().enumerate() {
        let batched = collect(rx).remove(0).tokens;
        assert_eq!(batched, alone[i], "prompt {i} differs when batched");
    }
}

/// A conversation's second turn reuses the first turn's cache, also while other requests ran
/// in between.
#[test]
fn prefix_reuse_across_requests_and_turns() {
    let h = handle(8);
    let m = h.model();
    let render = |msgs: &[serde_json::Value]| common::chat_tokens(m, msgs);
    let turn1 = vec![serde_json::json!({"role": "user", "content": "My name is Ada. Say hello."})];
    let p1 = render(&turn1);
    let first = complete(&h, p1.clone(), params(16, SamplingParams::greedy()), 1).remove(0);
    assert_eq!(first.cached_tokens, 0);
    // Another conversation in between.
    complete(
        &h,
        prompt(&h, "Unrelated question?"),
        params(8, SamplingParams::greedy()),
        1,
    );
    let mut turn2 = turn1.clone();
    turn2.push(serde_json::json!({"role": "assistant", "content": first.text}));
    turn2.push(serde_json::json!({"role": "user", "content": "What is my name?"}));
    let p2 = render(&turn2);
    let second = complete(&h, p2.clone(), params(16, SamplingParams::greedy()), 1).remove(0);
    assert!(
        second.cached_tokens >= p1.len() / BLOCK_SIZE * BLOCK_SIZE && second.cached_tokens > 0,
        "cached {} of {} (first turn {})",
        second.cached_tokens,
        p2.len(),
        p1.len()
    );
    // The same output as without any cache.
    let fresh = handle(1);
    let want = complete(&fresh, p2, params(16, SamplingParams::greedy()), 1).remove(0);
    assert_eq!(second.tokens, want.tokens);
}

#[test]
fn a_full_queue_refuses_and_a_cancelled_request_frees_the_thread() {
    let h = handle_with(EngineOptions {
        queue_capacity: 1,
        max_running: 1,
        ..Default::default()
    });
    let p = prompt(&h, "Tell me a long story.");
    // The first request runs (cancelled after 3 tokens), the second waits, the third is refused
    // unless the first already left the queue: fill until refused.
    let (first, first_rx) = request(p.clone(), endless(&h, 2000), 1, Some(3));
    h.submit(first).unwrap();
    let mut waiting = Vec::new();
    let refused = loop {
        let (r, rx) = request(p.clone(), endless(&h, 4), 1, None);
        match h.submit(r) {
            Ok(()) => waiting.push(rx),
            Err(e) => break e,
        }
        assert!(
            waiting.len() <= 3,
            "a queue of 1 accepted too many requests"
        );
    };
    assert!(matches!(refused, SubmitError::QueueFull(1)), "{refused:?}");
    // The cancelled request stopped after its 3 tokens, without a ChoiceDone.
    let first_events: Vec<Event> = first_rx.iter().collect();
    let tokens = first_events
        .iter()
        .filter(|e| matches!(e, Event::Token { .. }))
        .count();
    assert_eq!(tokens, 3);
    assert!(!first_events
        .iter()
        .any(|e| matches!(e, Event::ChoiceDone { .. })));
    // The waiting requests then run to completion promptly.
    let t0 = Instant::now();
    for rx in waiting {
        let done = rx.iter().any(|e| matches!(e, Event::ChoiceDone { .. }));
        assert!(done);
    }
    assert!(t0.elapsed() < Duration::from_secs(60));
}

#[test]
fn a_client_gone_before_its_turn_costs_nothing() {
    let h = handle(4);
    let p = prompt(&h, "Hello");
    let (req, rx) = request(p, params(8, SamplingParams::greedy()), 1, None);
    drop(rx);
    h.submit(req).unwrap();
    // The sink's first send fails, the request is skipped, and the thread takes the next one.
    let (req, rx) = request(
        prompt(&h, "Hi"),
        params(4, SamplingParams::greedy()),
        1,
        None,
    );
    h.submit(req).unwrap();
    assert!(rx.iter().any(|e| matches!(e, Event::ChoiceDone { .. })));
}

/// Under a KV budget too small for all requests at once, sequences are preempted (their caches
/// dropped) and recomputed later, and every request still gets exactly its tokens.
#[test]
fn preemption_under_a_tiny_kv_budget_keeps_every_output() {
    let users = [
        "Tell me about the moon.",
        "Write a short poem about autumn leaves.",
        "Why is the sky blue?",
        "Explain recursion to a child.",
        "What do cats eat?",
    ];
    let reference = handle(8);
    let alone: Vec<Vec<u32>> = users
        .iter()
        .map(|u| {
            let p = prompt(&reference, u);
            complete(&reference, p, endless(&reference, 40), 1)
                .remove(0)
                .tokens
        })
        .collect();
    // Room for about two of these sequences' caches (64 positions of nano = 1.4 MiB each).
    let h = handle_with(EngineOptions {
        kv_budget_bytes: 4 << 20,
        step_tokens: 32,
        ..Default::default()
    });
    let receivers: Vec<_> = users
        .iter()
        .map(|u| {
            let (req, rx) = request(prompt(&h, u), endless(&h, 40), 1, None);
            h.submit(req).unwrap();
            rx
        })
        .collect();
    for (i, rx) in receivers.into_iter().enumerate() {
        assert_eq!(collect(rx).remove(0).tokens, alone[i], "prompt {i} differs");
    }
    let stats = h.stats();
    use std::sync::atomic::Ordering::Relaxed;
    assert!(
        stats.preemptions.load(Relaxed) > 0,
        "the budget never forced a preemption"
    );
    assert!(stats.kv_bytes.load(Relaxed) <= 4 << 20);
}

/// The context window the engine enforces is no larger than its KV pool: one sequence can
/// never hold more, so a longer prompt is refused up front (`context_length_exceeded`) rather
/// than failing after its prefill. A q8_0 cache holds about twice the positions.
#[test]
fn the_context_window_is_capped_by_the_kv_pool() {
    let h = handle_with(EngineOptions {
        kv_budget_bytes: 3 << 20,
        ..Default::default()
    });
    let cfg = &h.model().model.cfg;
    let per_block = 2 * cfg.n_layers * cfg.kv_dim() * 2 * 16;
    let positions = (3 << 20) / per_block * 16;
    assert!(positions < 1024);
    assert_eq!(h.model().context_length, positions);
    let load = LoadOptions {
        context_length: Some(1024),
        kv_type: ferrum_engine::KvType::Q8_0,
        ..Default::default()
    };
    let model = LoadedModel::load(&common::model_path("nano"), &load).unwrap();
    let opts = EngineOptions {
        kv_budget_bytes: 3 << 20,
        ..Default::default()
    };
    let q8 = ModelHandle::spawn(model, opts).unwrap();
    let q8_positions = q8.model().context_length;
    assert!(
        q8_positions >= positions * 15 / 8,
        "{q8_positions} vs f16 {positions}"
    );
}

/// A request cancelled while some of its choices were preempted ends cleanly, and the engine
/// goes on serving.
#[test]
fn cancelling_a_request_with_preempted_choices_frees_everything() {
    let h = handle_with(EngineOptions {
        kv_budget_bytes: 3 << 20,
        ..Default::default()
    });
    let p = prompt(&h, "Tell me a long story.");
    let (req, rx) = request(p.clone(), endless(&h, 200), 4, Some(10));
    h.submit(req).unwrap();
    let events: Vec<Event> = rx.iter().collect();
    assert!(!events.iter().any(|e| matches!(e, Event::ChoiceDone { .. })));
    let done = complete(&h, p, params(4, SamplingParams::greedy()), 1);
    assert_eq!(done[0].tokens.len(), 4);
    // The stats are published after the step that finished the request.
    use std::sync::atomic::Ordering::Relaxed;
    let t0 = Instant::now();
    while h.stats().running.load(Relaxed) != 0 && t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(h.stats().running.load(Relaxed), 0);
    // Every block is back in the pool: free, or cached for a later prefix.
    assert_eq!(h.stats().kv_blocks_used.load(Relaxed), 0);
    assert!(h.stats().kv_blocks_cached.load(Relaxed) > 0);
}

/// The block size is configurable: prefix reuse follows its granularity and outputs do not
/// change.
#[test]
fn an_odd_block_size_reuses_prefixes_at_its_granularity() {
    let h = handle_with(EngineOptions {
        block_size: 5,
        ..Default::default()
    });
    let p = prompt(&h, "Describe a sunset over the ocean.");
    let first = complete(&h, p.clone(), endless(&h, 12), 1).remove(0);
    let second = complete(&h, p.clone(), endless(&h, 12), 1).remove(0);
    assert_eq!(first.cached_tokens, 0);
    assert_eq!(second.cached_tokens, (p.len() - 1) / 5 * 5);
    assert_eq!(first.tokens, second.tokens);
}

#[test]
fn interactive_requests_preempt_background_ones_without_changing_any_output() {
    higher_priority_preempts_lower(Priority::Background, Priority::Interactive);
}

#[test]
fn priority_requests_preempt_interactive_ones_without_changing_any_output() {
    higher_priority_preempts_lower(Priority::Interactive, Priority::Priority);
}

/// Two `low` requests fill the batch; a `high` one arrives while they run, finishes first, and
/// nobody's tokens change.
fn higher_priority_preempts_lower(low: Priority, high: Priority) {
    let h = handle_with(EngineOptions {
        max_running: 2,
        ..Default::default()
    });
    let (p1, p2) = (
        prompt(&h, "Tell me a story."),
        prompt(&h, "Count to fifty."),
    );
    let quick = prompt(&h, "Say hi.");
    let alone: Vec<Vec<u32>> = [&p1, &p2]
        .iter()
        .map(|p| {
            complete(&h, (*p).clone(), endless(&h, 60), 1)[0]
                .tokens
                .clone()
        })
        .collect();
    let quick_alone = complete(&h, quick.clone(), endless(&h, 6), 1)[0]
        .tokens
        .clone();

    let mut background = Vec::new();
    for p in [&p1, &p2] {
        let (mut r, rx) = request(p.clone(), endless(&h, 60), 1, None);
        r.priority = low;
        h.submit(r).unwrap();
        background.push(rx);
    }
    let first = background[0].recv().unwrap();
    assert!(matches!(first, Event::Started));
    let (mut r, quick_rx) = request(quick, endless(&h, 6), 1, None);
    r.priority = high;
    h.submit(r).unwrap();
    let quick_done = collect(quick_rx);
    // It finished while the background requests were still generating.
    let left: usize = background.iter().map(|rx| rx.try_iter().count()).sum();
    let still_running = background.iter().map(collect_rest).collect::<Vec<_>>();
    assert!(
        left < 2 * 60,
        "the {high:?} request waited for the {low:?} ones to finish"
    );
    assert_eq!(quick_done[0].tokens, quick_alone);
    for (got, want) in still_running.iter().zip(&alone) {
        assert_eq!(
            &got.tokens, want,
            "a preempted {low:?} request changed its output"
        );
    }
    assert!(
        h.stats()
            .preemptions
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    );
}

/// The completion of a single-choice request whose channel may already be partly read.
fn collect_rest(rx: &Receiver<Event>) -> Completion {
    common::completion_of(rx)
}

/// A request with a predicted output (`GenerateParams::prediction`).
fn predicted(
    h: &ModelHandle,
    p: &[u32],
    max_tokens: usize,
    sampling: SamplingParams,
    prediction: Vec<u32>,
) -> Completion {
    let mut params = params(max_tokens, sampling);
    params.prediction = prediction;
    complete(h, p.to_vec(), params, 1).remove(0)
}

#[test]
fn a_prediction_changes_the_speed_never_the_output() {
    let h = handle(8);
    let p = prompt(&h, "Write a short poem about the sea.");
    for sampling in [
        SamplingParams::greedy(),
        SamplingParams {
            temperature: 0.9,
            seed: Some(11),
            ..Default::default()
        },
    ] {
        let plain = predicted(&h, &p, 48, sampling.clone(), Vec::new());
        let exact = plain.tokens.clone();
        let mut edited = exact.clone();
        for t in edited.iter_mut().skip(10).take(5) {
            *t = 42;
        }
        edited.splice(25..25, [7, 8, 9]);
        let unrelated = prompt(&h, "An entirely different text about mountains and goats.");
        for (name, prediction) in [
            ("exact", exact.clone()),
            ("edited", edited),
            ("unrelated", unrelated),
            ("empty", Vec::new()),
        ] {
            let got = predicted(&h, &p, 48, sampling.clone(), prediction.clone());
            assert_eq!(got.tokens, plain.tokens, "{name} prediction, {sampling:?}");
            assert_eq!(got.text, plain.text, "{name}");
            assert_eq!(got.finish_reason, plain.finish_reason, "{name}");
            // Every verified proposal is either kept or rejected, and kept ones are output.
            assert!(got.accepted_prediction_tokens <= got.tokens.len(), "{name}");
            if prediction.is_empty() {
                assert_eq!(
                    (
                        got.accepted_prediction_tokens,
                        got.rejected_prediction_tokens
                    ),
                    (0, 0)
                );
            }
            if name == "exact" {
                // Each verification step keeps its proposals and samples one more token
                // itself (and the first token has no output before it): with proposals growing
                // 8, 16, 32 per step, nearly all tokens are accepted ones.
                assert!(
                    got.accepted_prediction_tokens * 10 >= got.tokens.len() * 8,
                    "exact prediction: only {} of {} accepted",
                    got.accepted_prediction_tokens,
                    got.tokens.len()
                );
                assert_eq!(got.rejected_prediction_tokens, 0, "{got:?}");
            }
        }
    }
}

#[test]
fn predictions_in_a_batch_with_preemption_keep_every_output() {
    let reference = handle(8);
    // Room for about two of these sequences' caches (64 positions of nano = 1.4 MiB each), so
    // sequences are preempted, also between a verification and the next.
    let h = handle_with(EngineOptions {
        kv_budget_bytes: 3 << 20,
        step_tokens: 32,
        ..Default::default()
    });
    let prompts: Vec<Vec<u32>> = [
        "Tell me about the moon.",
        "Write a short poem about autumn leaves.",
        "Why is the sky blue?",
        "Explain recursion to a child.",
    ]
    .iter()
    .map(|q| prompt(&h, q))
    .collect();
    let plain: Vec<Completion> = prompts
        .iter()
        .map(|p| complete(&reference, p.clone(), endless(&reference, 40), 1).remove(0))
        .collect();
    let mut rxs = Vec::new();
    for (p, c) in prompts.iter().zip(&plain) {
        let mut params = endless(&h, 40);
        // Right for the first half, then unrelated: acceptances and rejections.
        params.prediction = c.tokens[..20].iter().copied().chain(5..25).collect();
        let (r, rx) = request(p.clone(), params, 1, None);
        h.submit(r).unwrap();
        rxs.push(rx);
    }
    for (rx, want) in rxs.into_iter().zip(&plain) {
        let got = collect(rx).remove(0);
        assert_eq!(got.tokens, want.tokens);
        assert!(got.accepted_prediction_tokens >= 10, "{got:?}");
    }
    assert!(
        h.stats()
            .preemptions
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    );
}

/// Waits for `n` tokens of a request.
fn tokens_of(rx: &Receiver<Event>, n: usize) {
    let mut seen = 0;
    while seen < n {
        match rx.recv().unwrap() {
            Event::Token { .. } => seen += 1,
            Event::Error(e) => panic!("request failed: {e}"),
            _ => {}
        }
    }
}

#[test]
fn the_interactive_counters_count_interactive_work_only() {
    use std::sync::atomic::Ordering::Relaxed;
    let h = handle(8);
    let p = prompt(&h, "Count to fifty.");
    let (mut r, background) = request(p.clone(), endless(&h, 40), 1, None);
    r.priority = Priority::Background;
    h.submit(r).unwrap();
    // Stats are published after every step: after three tokens the sequence is counted.
    tokens_of(&background, 3);
    let s = h.stats();
    assert_eq!(s.running.load(Relaxed), 1);
    assert_eq!(
        (
            s.interactive_running.load(Relaxed),
            s.interactive_waiting.load(Relaxed)
        ),
        (0, 0),
        "a background request is not interactive work"
    );
    let (r, interactive) = request(p, endless(&h, 40), 1, None);
    h.submit(r).unwrap();
    tokens_of(&interactive, 3);
    assert_eq!(s.interactive_running.load(Relaxed), 1);
    assert_eq!(s.interactive_waiting.load(Relaxed), 0);
    collect(interactive);
    collect(background);
    let deadline = Instant::now() + Duration::from_secs(5);
    while s.interactive_running.load(Relaxed) != 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(s.interactive_running.load(Relaxed), 0);
}
