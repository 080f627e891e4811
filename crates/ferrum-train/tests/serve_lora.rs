//! Multi-LoRA serving: requests for the base model and for two adapters decoding in the same
//! batches each get exactly the tokens they get alone, and an adapter's prompt never reuses the
//! base model's cached keys and values.

use std::ops::ControlFlow;
use std::sync::mpsc::{channel, Receiver};
use std::sync::Arc;

use ferrum_engine::testing::TinyModel;
use ferrum_engine::{
    EngineOptions, Event, GenerateParams, LoadOptions, LoadedModel, LoraAdapter, ModelHandle,
    Priority, Request, SamplingParams,
};

fn load(path: &std::path::Path) -> LoadedModel {
    let opts = LoadOptions {
        threads: Some(2),
        ..LoadOptions::default()
    };
    LoadedModel::load(path, &opts).unwrap()
}

/// An adapter of random matrices on every attention projection, large enough to change
/// what the model writes.
fn adapter(model: &LoadedModel, dir: &std::path::Path, name: &str, seed: u64) -> Arc<LoraAdapter> {
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};
    let cfg = &model.model.cfg;
    let r = 4;
    let mut tensors = Vec::new();
    for l in 0..cfg.n_layers {
        for (i, (proj, rows, cols)) in [
            ("attn_q", cfg.q_dim(), cfg.d_model),
            ("attn_k", cfg.kv_dim(), cfg.d_model),
            ("attn_v", cfg.kv_dim(), cfg.d_model),
            ("attn_output", cfg.d_model, cfg.q_dim()),
        ]
        .into_iter()
        .enumerate()
        {
            let s = seed * 1000 + (l * 4 + i) as u64;
            let a = Tensor::randn(0f32, 0.5, (r, cols), &Device::Cpu).unwrap();
            let b = Tensor::randn(0f32, 0.5, (rows, r), &Device::Cpu).unwrap();
            // candle's randn is not seeded; mix in the seed so the two adapters surely differ.
            let b = (b + s as f64 * 1e-3).unwrap();
            let base = format!("blk.{l}.{proj}.weight");
            tensors.push((
                format!("{base}.lora_a"),
                QTensor::quantize(&a, GgmlDType::F32).unwrap(),
            ));
            tensors.push((
                format!("{base}.lora_b"),
                QTensor::quantize(&b, GgmlDType::F32).unwrap(),
            ));
        }
    }
    let bytes = ferrum_train::adapter_gguf(cfg.arch.name(), 8.0, &tensors).unwrap();
    let path = dir.join(format!("{name}.gguf"));
    std::fs::write(&path, bytes).unwrap();
    Arc::new(LoraAdapter::load(&path, &format!("ft:{name}"), &model.model).unwrap())
}

fn request(prompt: &[u32], adapter: Option<Arc<LoraAdapter>>) -> (Request, Receiver<Event>) {
    let (tx, rx) = channel();
    let sink = Box::new(move |ev: Event| match tx.send(ev) {
        Ok(()) => ControlFlow::Continue(()),
        Err(_) => ControlFlow::Break(()),
    });
    let params = GenerateParams {
        max_tokens: 24,
        ignore_eos: true,
        sampling: SamplingParams {
            temperature: 0.0,
            ..SamplingParams::default()
        },
        ..GenerateParams::default()
    };
    let r = Request {
        prompt: prompt.to_vec(),
        params,
        choices: 1,
        priority: Priority::Interactive,
        adapter,
        embeds: None,
        sink,
    };
    (r, rx)
}

/// The generated tokens and the cached prompt tokens.
fn tokens(rx: Receiver<Event>) -> (Vec<u32>, usize) {
    for ev in rx.iter() {
        match ev {
            Event::ChoiceDone { completion, .. } => {
                return (completion.tokens, completion.cached_tokens)
            }
            Event::Error(e) => panic!("request failed: {e}"),
            _ => {}
        }
    }
    panic!("no completion")
}

#[test]
fn base_and_two_adapters_in_one_batch_give_what_each_gives_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    TinyModel {
        arch: "qwen2".into(),
        ..TinyModel::default()
    }
    .write_chat(&path)
    .unwrap();
    let model = load(&path);
    let a = adapter(&model, dir.path(), "a", 1);
    let b = adapter(&model, dir.path(), "b", 2);
    let handle = ModelHandle::spawn(load(&path), EngineOptions::default()).unwrap();
    let text = "<|im_start|>user\nquestion 9 with a prompt long enough to fill two blocks of the cache<|im_end|>\n<|im_start|>assistant\n";
    let prompt = handle.model().tokenizer.encode(text, false, true).unwrap();
    let adapters = [None, Some(a), Some(b)];
    let alone: Vec<(Vec<u32>, usize)> = adapters
        .iter()
        .map(|ad| {
            let (r, rx) = request(&prompt, ad.clone());
            handle.submit(r).unwrap();
            tokens(rx)
        })
        .collect();
    let outputs: Vec<&Vec<u32>> = alone.iter().map(|a| &a.0).collect();
    assert_ne!(
        outputs[0], outputs[1],
        "the first adapter changes the output"
    );
    assert_ne!(outputs[1], outputs[2], "the adapters differ");
    // Each ran after the others with the same prompt: the adapters' runs did not start from
    // the base model's cached blocks (nor from each other's).
    assert_eq!(alone[1].1, 0);
    assert_eq!(alone[2].1, 0);
    // Now all three at once, twice over (six sequences decoding together), each with its prompt
    // cached under its own adapter.
    let rxs: Vec<_> = adapters
        .iter()
        .chain(&adapters)
        .map(|ad| {
            let (r, rx) = request(&prompt, ad.clone());
            handle.submit(r).unwrap();
            rx
        })
        .collect();
    for (i, rx) in rxs.into_iter().enumerate() {
        let (got, cached) = tokens(rx);
        assert_eq!(&got, outputs[i % 3], "request {i} in the mixed batch");
        assert!(cached > 0, "request {i} reused its own cached prompt");
    }
}
