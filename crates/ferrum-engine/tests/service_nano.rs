//! The engine thread behind `ModelHandle` on the nano model: events in order, `n` choices with
//! their own seeds, a full queue refusing work, a cancelled request freeing the thread, and a
//! client gone before its turn costing nothing.

mod common;

use std::ops::ControlFlow;
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use ferrum_engine::engine::{LoadOptions, LoadedModel};
use ferrum_engine::generate::GenerateParams;
use ferrum_engine::sampler::SamplingParams;
use ferrum_engine::service::{Event, ModelHandle, Request, SubmitError};

fn handle(queue: usize) -> ModelHandle {
    let opts = LoadOptions {
        context_length: Some(1024),
        ..Default::default()
    };
    let model = LoadedModel::load(&common::model_path("nano"), &opts).unwrap();
    ModelHandle::spawn(model, queue).unwrap()
}

fn prompt(h: &ModelHandle, user: &str) -> Vec<u32> {
    let m = h.model();
    let msgs = [serde_json::json!({"role": "user", "content": user})];
    let text = m
        .template
        .as_ref()
        .unwrap()
        .render(&msgs, None, true)
        .unwrap();
    m.tokenizer.encode(&text, false, true).unwrap()
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
    let mut sampling = SamplingParams::greedy();
    sampling.logit_bias = h
        .model()
        .tokenizer
        .eog_ids()
        .iter()
        .map(|&id| (id, -100.0))
        .collect();
    params(max_tokens, sampling)
}

#[test]
fn choices_arrive_in_order_with_their_own_seeds() {
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
    let mut done = Vec::new();
    let mut current = 0;
    for ev in &events[1..] {
        match ev {
            Event::Token { choice, token } => {
                assert_eq!(*choice, current, "choices run one after another");
                texts[*choice as usize].push_str(&token.text);
            }
            Event::ChoiceDone { choice, completion } => {
                assert_eq!(*choice, current);
                assert_eq!(completion.text, texts[current as usize]);
                done.push(completion.clone());
                current += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(done.len(), 3);
    // Same prompt: later choices reuse all of it but the last token.
    assert_eq!(done[1].cached_tokens, done[1].prompt_tokens - 1);
    // Seeds 7, 8, 9: the choices are different samples (with overwhelming probability).
    assert!(texts[0] != texts[1] || texts[1] != texts[2], "{texts:?}");
}

#[test]
fn a_full_queue_refuses_and_a_cancelled_request_frees_the_thread() {
    let h = handle(1);
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
