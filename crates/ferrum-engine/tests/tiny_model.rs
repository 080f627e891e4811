//! The engine on tiny random-weight GGUF files written by the test itself: loading, batched vs
//! token-by-token equivalence, and typed errors for bad input.

use candle_core::quantized::GgmlDType;
use ferrum_engine::kernels::ThreadPool;
use ferrum_engine::testing::TinyModel;
use ferrum_engine::{EngineError, GgufFile, Logits, Transformer, Workspace};

fn write(model: &TinyModel) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    model.write(&path).unwrap();
    (dir, path)
}

fn load(model: &TinyModel) -> Transformer {
    let (_dir, path) = write(model);
    Transformer::load(&GgufFile::open(&path).unwrap()).unwrap()
}

/// A prompt run in one batch gives the same logits as the same prompt fed token by token.
fn check_batched_equals_sequential(model: &TinyModel) {
    let m = load(model);
    let pool = ThreadPool::new(2);
    let prompt: Vec<u32> = (0..23).map(|i| (i * 7 + 3) % model.vocab as u32).collect();
    let mut ws = Workspace::default();
    let mut kv = m.new_cache(64);
    let batched = m
        .forward(&pool, &mut ws, &mut kv, &prompt, Logits::All)
        .unwrap()
        .to_vec();
    let mut kv = m.new_cache(64);
    let vocab = model.vocab;
    for (t, &tok) in prompt.iter().enumerate() {
        let one = m
            .forward(&pool, &mut ws, &mut kv, &[tok], Logits::Last)
            .unwrap();
        let want = &batched[t * vocab..(t + 1) * vocab];
        for (a, b) in one.iter().zip(want) {
            assert!(
                (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                "{model:?} token {t}: {a} vs {b}"
            );
        }
    }
    assert!(batched.iter().all(|v| v.is_finite()));
}

#[test]
fn llama_q8_0_batched_equals_sequential() {
    check_batched_equals_sequential(&TinyModel::default());
}

#[test]
fn qwen2_with_biases_and_k_quants() {
    check_batched_equals_sequential(&TinyModel {
        arch: "qwen2".into(),
        d_model: 256,
        d_ff: 512,
        n_heads: 4,
        n_kv_heads: 1,
        dtype: GgmlDType::Q4K,
        separate_output: true,
        ..Default::default()
    });
}

#[test]
fn every_layer_format_runs() {
    for dtype in [
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q5_0,
        GgmlDType::Q8_0,
        GgmlDType::Q6K,
        GgmlDType::F16,
        GgmlDType::F32,
    ] {
        let d = if matches!(dtype, GgmlDType::Q6K) {
            256
        } else {
            64
        };
        check_batched_equals_sequential(&TinyModel {
            dtype,
            d_model: d,
            d_ff: 2 * d,
            ..Default::default()
        });
    }
}

#[test]
fn typed_errors_for_bad_input() {
    let model = TinyModel::default();
    let m = load(&model);
    let pool = ThreadPool::new(1);
    let mut ws = Workspace::default();
    let mut kv = m.new_cache(8);
    let err = m
        .forward(&pool, &mut ws, &mut kv, &[], Logits::Last)
        .unwrap_err();
    assert!(matches!(err, EngineError::EmptyPrompt), "{err}");
    let err = m
        .forward(&pool, &mut ws, &mut kv, &[1000], Logits::Last)
        .unwrap_err();
    assert!(
        matches!(err, EngineError::TokenOutOfRange { id: 1000, .. }),
        "{err}"
    );
    let err = m
        .forward(&pool, &mut ws, &mut kv, &[1; 9], Logits::Last)
        .unwrap_err();
    assert!(
        matches!(
            err,
            EngineError::ContextLengthExceeded {
                requested: 9,
                max: 8
            }
        ),
        "{err}"
    );
    assert!(err
        .to_string()
        .contains("maximum context length is 8 tokens"));
}

#[test]
fn unsupported_architecture_and_corrupt_files_are_errors() {
    let (_dir, path) = write(&TinyModel {
        arch: "mamba".into(),
        ..Default::default()
    });
    let err = Transformer::load(&GgufFile::open(&path).unwrap())
        .err()
        .unwrap();
    assert!(
        matches!(err, EngineError::UnsupportedArchitecture(ref a) if a == "mamba"),
        "{err}"
    );

    let (dir, path) = write(&TinyModel::default());
    let bytes = std::fs::read(&path).unwrap();
    let truncated = dir.path().join("truncated.gguf");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let err = GgufFile::open(&truncated).err().unwrap();
    assert!(matches!(err, EngineError::CorruptGguf { .. }), "{err}");

    let garbage = dir.path().join("garbage.gguf");
    std::fs::write(&garbage, b"definitely not a gguf file").unwrap();
    assert!(matches!(
        GgufFile::open(&garbage),
        Err(EngineError::CorruptGguf { .. })
    ));

    let missing = dir.path().join("missing.gguf");
    assert!(matches!(
        GgufFile::open(&missing),
        Err(EngineError::Io { .. })
    ));
}

/// Past 512 positions of context every path to a token's attention takes the same f32
/// arithmetic (a prompt chunk's tiles, a decoded token's grouped heads, a verification pass), so
/// with Q8_0 layers (whose batched and one-row kernels agree bit for bit) a token's logits do
/// not depend on how it was evaluated.
#[test]
fn deep_context_logits_do_not_depend_on_the_path() {
    let model = TinyModel {
        d_model: 256,
        d_ff: 256,
        n_heads: 4,
        n_kv_heads: 2,
        context_length: 1024,
        ..Default::default()
    };
    let m = load(&model);
    let pool = ThreadPool::new(2);
    let vocab = model.vocab;
    let tokens: Vec<u32> = (0..680u32).map(|i| (i * 37 + 11) % vocab as u32).collect();
    let (context, new) = tokens.split_at(600);
    let mut ws = Workspace::default();
    let prefilled = |ws: &mut Workspace| {
        let mut kv = m.new_cache(1024);
        for chunk in context.chunks(256) {
            m.forward(&pool, ws, &mut kv, chunk, Logits::None).unwrap();
        }
        kv
    };
    let mut kv = prefilled(&mut ws);
    let decoded: Vec<f32> = new
        .iter()
        .flat_map(|&t| {
            m.forward(&pool, &mut ws, &mut kv, &[t], Logits::Last)
                .unwrap()
                .to_vec()
        })
        .collect();
    for mode in [Logits::Prompt, Logits::All] {
        let mut kv = prefilled(&mut ws);
        let got = m.forward(&pool, &mut ws, &mut kv, new, mode).unwrap();
        assert_eq!(got.len(), new.len() * vocab);
        for (t, (a, b)) in got.chunks(vocab).zip(decoded.chunks(vocab)).enumerate() {
            assert_eq!(a, b, "{mode:?}: token {t} differs from decoding it");
        }
    }
    // Short chunks deep in the context (the scheduler caps chunks while others decode): 20
    // tokens take the f32 tile, 5 the per-token path; both give what decoding gives.
    for size in [20, 5] {
        let mut kv = prefilled(&mut ws);
        let mut got = Vec::new();
        for chunk in new.chunks(size) {
            let rows = m
                .forward(&pool, &mut ws, &mut kv, chunk, Logits::Prompt)
                .unwrap();
            got.extend_from_slice(rows);
        }
        for (t, (a, b)) in got.chunks(vocab).zip(decoded.chunks(vocab)).enumerate() {
            assert_eq!(a, b, "chunks of {size}: token {t} differs from decoding it");
        }
    }
}
