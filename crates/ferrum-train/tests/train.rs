//! The trainer on tiny random-weight models: its forward pass is the serving engine's, its
//! adapters load into the engine, the loss goes down, and runs are deterministic and resumable.

use std::path::Path;

use ferrum_engine::testing::TinyModel;
use ferrum_engine::{LoadOptions, LoadedModel, Logits, LoraAdapter, Workspace};
use ferrum_train::{
    chat_example, train, Control, EpochReport, Example, Hyperparameters, Outcome, Progress,
    StepReport, TrainSettings,
};
use serde_json::json;

fn tiny(dir: &Path, arch: &str) -> LoadedModel {
    let path = dir.join(format!("{arch}.gguf"));
    TinyModel {
        arch: arch.into(),
        ..TinyModel::default()
    }
    .write_chat(&path)
    .unwrap();
    LoadedModel::load(
        &path,
        &LoadOptions {
            threads: Some(1),
            ..LoadOptions::default()
        },
    )
    .unwrap()
}

fn examples(model: &LoadedModel, n: usize) -> Vec<Example> {
    (0..n)
        .map(|i| {
            let line = json!({"messages": [
                {"role": "system", "content": "Answer in one word."},
                {"role": "user", "content": format!("Colour number {i}?")},
                {"role": "assistant", "content": if i % 2 == 0 { "blue" } else { "green" }},
            ]});
            chat_example(model, &line).unwrap()
        })
        .collect()
}

/// Records reports; stops after `stop_after_epoch` if set.
#[derive(Default)]
struct Recorder {
    steps: Vec<StepReport>,
    epochs: Vec<EpochReport>,
    stop_after_epoch: Option<u32>,
}

impl Progress for Recorder {
    fn step(&mut self, r: &StepReport) -> Control {
        self.steps.push(r.clone());
        Control::Continue
    }
    fn epoch(&mut self, r: &EpochReport) -> Control {
        self.epochs.push(r.clone());
        match self.stop_after_epoch {
            Some(e) if e == r.epoch => Control::Stop,
            _ => Control::Continue,
        }
    }
}

fn settings(epochs: u32, batch: u32) -> TrainSettings {
    let mut s = TrainSettings::new(
        Hyperparameters {
            n_epochs: epochs,
            batch_size: batch,
            learning_rate_multiplier: 1.0,
        },
        7,
    );
    // The tiny model learns fast with a large rate.
    s.base_learning_rate = 2e-2;
    s
}

#[test]
fn the_loss_is_taken_on_the_assistant_turn_only() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny(dir.path(), "llama");
    let ex = &examples(&model, 1)[0];
    let text = |ids: &[u32]| model.tokenizer.decode(ids, false).unwrap();
    let targets: Vec<u32> = ex
        .tokens
        .iter()
        .zip(&ex.targets)
        .filter(|(_, &t)| t)
        .map(|(&id, _)| id)
        .collect();
    // The ChatML assistant turn: its content and the end-of-turn token, then the newline.
    assert_eq!(text(&targets), "blue<|im_end|>\n");
    let line = json!({"messages": [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b", "weight": 0},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d"},
    ]});
    let ex = chat_example(&model, &line).unwrap();
    let targets: Vec<u32> = ex
        .tokens
        .iter()
        .zip(&ex.targets)
        .filter(|(_, &t)| t)
        .map(|(&id, _)| id)
        .collect();
    assert_eq!(text(&targets), "d<|im_end|>\n");
    let none = json!({"messages": [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b", "weight": 0},
    ]});
    assert!(chat_example(&model, &none).is_err());
}

/// The summed NLL of `ex`'s targets under the engine's forward pass (with `adapter`).
fn engine_nll(model: &LoadedModel, adapter: Option<&LoraAdapter>, ex: &Example) -> f64 {
    let mut kv = model.model.new_cache(ex.tokens.len());
    let mut ws = Workspace::default();
    let v = model.model.cfg.vocab_size;
    let logits = model
        .model
        .forward_batch(
            &model.pool,
            &mut ws,
            &mut [ferrum_engine::SeqInput {
                kv: &mut kv,
                tokens: &ex.tokens,
                logits: Logits::All,
                adapter,
                embeds: None,
            }],
        )
        .unwrap()
        .to_vec();
    let mut nll = 0f64;
    for p in 0..ex.tokens.len() - 1 {
        if !ex.targets[p + 1] {
            continue;
        }
        let row = &logits[p * v..(p + 1) * v];
        let lse = ferrum_engine::log_sum_exp(row) as f64;
        nll += lse - row[ex.tokens[p + 1] as usize] as f64;
    }
    nll
}

#[test]
fn training_lowers_the_loss_and_the_engine_serves_the_adapter_as_trained() {
    for arch in ["llama", "qwen2"] {
        let dir = tempfile::tempdir().unwrap();
        let model = tiny(dir.path(), arch);
        let data = examples(&model, 8);
        let mut rec = Recorder::default();
        let out = train(&model, &data, &data[..2], &settings(4, 2), None, &mut rec).unwrap();
        let Outcome::Finished { adapter, .. } = out else {
            panic!("not finished")
        };
        assert_eq!(rec.steps.len(), 16);
        assert_eq!(rec.epochs.len(), 4);
        let (first, last) = (rec.epochs[0].train_loss, rec.epochs[3].train_loss);
        assert!(last < 0.5 * first, "{arch}: loss {first} -> {last}");
        let (v0, v3) = (
            rec.epochs[0].valid_loss.unwrap(),
            rec.epochs[3].valid_loss.unwrap(),
        );
        assert!(v3 < v0, "{arch}: validation loss {v0} -> {v3}");

        // The engine, given the exported adapter, scores the examples as the trainer does.
        let path = dir.path().join("adapter.gguf");
        std::fs::write(&path, &adapter).unwrap();
        let lora = LoraAdapter::load(&path, "ft:test", &model.model).unwrap();
        assert_eq!((lora.rank(), lora.alpha()), (8, 16.0));
        let base: f64 = data.iter().map(|e| engine_nll(&model, None, e)).sum();
        let tuned: f64 = data
            .iter()
            .map(|e| engine_nll(&model, Some(&lora), e))
            .sum();
        let targets: usize = data.iter().map(Example::target_count).sum();
        let trained_mean = rec.epochs[3].valid_loss.unwrap();
        let served_mean = data[..2]
            .iter()
            .map(|e| engine_nll(&model, Some(&lora), e))
            .sum::<f64>()
            / data[..2].iter().map(Example::target_count).sum::<usize>() as f64;
        // The engine quantizes activations to 8 bits; the trainer runs in f32.
        assert!(
            (served_mean - trained_mean).abs() < 0.05 * trained_mean.max(0.1),
            "{arch}: trainer {trained_mean} vs engine {served_mean}"
        );
        assert!(
            tuned < 0.5 * base,
            "{arch}: engine NLL {base} -> {tuned} over {targets}"
        );
    }
}

#[test]
fn runs_are_deterministic_and_resume_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny(dir.path(), "qwen2");
    let data = examples(&model, 5);
    let s = settings(3, 2);
    let run = |resume: Option<&[u8]>, stop: Option<u32>| {
        let mut rec = Recorder {
            stop_after_epoch: stop,
            ..Recorder::default()
        };
        let out = train(&model, &data, &[], &s, resume, &mut rec).unwrap();
        (out, rec)
    };
    let (a, rec_a) = run(None, None);
    let (b, _) = run(None, None);
    assert_eq!(a, b, "same seed, same adapter");
    // Stopped after epoch 1, resumed from its checkpoint: the same steps and adapter.
    let (stopped, rec1) = run(None, Some(1));
    assert_eq!(stopped, Outcome::Stopped);
    let state = rec1.epochs[0].state.clone();
    let (c, rec2) = run(Some(&state), None);
    assert_eq!(a, c);
    let steps: Vec<usize> = rec1
        .steps
        .iter()
        .chain(&rec2.steps)
        .map(|s| s.step)
        .collect();
    assert_eq!(
        steps,
        rec_a.steps.iter().map(|s| s.step).collect::<Vec<_>>()
    );
    let losses = |r: &[StepReport]| r.iter().map(|s| s.train_loss).collect::<Vec<_>>();
    assert_eq!(
        losses(&[rec1.steps.clone(), rec2.steps.clone()].concat()),
        losses(&rec_a.steps)
    );
    // Another seed trains another adapter.
    let mut other = s.clone();
    other.seed = 8;
    let d = train(&model, &data, &[], &other, None, &mut Recorder::default()).unwrap();
    assert_ne!(a, d);
    // A state from another run shape is refused.
    let mut longer = s.clone();
    longer.hyper.n_epochs = 5;
    assert!(train(
        &model,
        &data,
        &[],
        &longer,
        Some(&state),
        &mut Recorder::default()
    )
    .is_err());
}
