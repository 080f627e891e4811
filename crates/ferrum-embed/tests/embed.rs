//! The embedding runtime on a tiny random BERT written by the test: tokenizing, input checks,
//! the forward pass (unit vectors, batch-invariant, text and token ids alike), and the batching
//! worker.

use std::sync::mpsc;
use std::sync::Arc;

use ferrum_embed::testing::{write_tiny_model, HIDDEN, MAX_POSITIONS};
use ferrum_embed::{
    BatchOptions, EmbedError, EmbedHandle, Embedder, EmbedderOptions, InputProblem, ModelFiles,
};

fn tiny(dir: &tempfile::TempDir) -> Embedder {
    let files = write_tiny_model(dir.path(), 7).unwrap();
    Embedder::load(&files, &EmbedderOptions::default()).unwrap()
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn assert_close(a: &[f32], b: &[f32]) {
    assert_eq!(a.len(), b.len());
    let worst = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1e-5, "vectors differ by {worst}");
}

#[test]
fn text_is_tokenized_whole_without_special_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny(&dir);
    // The tokenizer.json truncates and pads to 8 tokens; neither may happen here.
    let tokens = model
        .tokenize("The quick brown fox jumps over the lazy dog!")
        .unwrap();
    assert_eq!(tokens.len(), 10);
    assert_eq!(model.tokenize("hello").unwrap(), [13]);
    assert_eq!(model.tokenize("   ").unwrap(), Vec::<u32>::new());
    assert_eq!(model.special_tokens(), 2);
    assert_eq!(model.max_input_tokens(), MAX_POSITIONS - 2);
    assert_eq!(model.dimensions(), HIDDEN);
}

#[test]
fn inputs_the_model_cannot_take_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny(&dir);
    let vocab = model.vocab_size() as u32;
    assert_eq!(model.check(&[5; 30]), Ok(()));
    assert_eq!(
        model.check(&[5; 31]),
        Err(InputProblem::TooLong { len: 31, max: 30 })
    );
    assert_eq!(
        model.check(&[5, vocab]),
        Err(InputProblem::OutOfVocabulary {
            id: vocab,
            vocab: vocab as usize
        })
    );
    let err = model.embed(&[&[5; 31]]).unwrap_err();
    assert!(matches!(err, EmbedError::Input(_)), "{err}");
}

#[test]
fn a_context_length_cap_shortens_the_inputs_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let files = write_tiny_model(dir.path(), 7).unwrap();
    let capped = EmbedderOptions {
        max_positions: Some(10),
    };
    assert_eq!(
        Embedder::load(&files, &capped).unwrap().max_input_tokens(),
        8
    );
    let none_left = EmbedderOptions {
        max_positions: Some(2),
    };
    let err = Embedder::load(&files, &none_left).err().unwrap();
    assert!(matches!(err, EmbedError::Config { .. }), "{err}");
}

#[test]
fn embeddings_are_unit_vectors_independent_of_their_batch() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny(&dir);
    let texts = [
        "hello world",
        "the quick brown fox",
        "dog",
        "   ",
        "lazy dog jumps over",
    ];
    let tokens: Vec<Vec<u32>> = texts.iter().map(|t| model.tokenize(t).unwrap()).collect();
    let refs: Vec<&[u32]> = tokens.iter().map(Vec::as_slice).collect();
    let batched = model.embed(&refs).unwrap();
    assert_eq!(batched.len(), texts.len());
    for (tokens, v) in refs.iter().zip(&batched) {
        assert_eq!(v.len(), HIDDEN);
        assert!((cosine(v, v) - 1.0).abs() < 1e-5);
        assert_close(v, &model.embed(&[tokens]).unwrap()[0]);
    }
    // Different inputs, different vectors; the same input twice, the same vector.
    assert!(cosine(&batched[0], &batched[1]) < 0.999);
    let twice = model.embed(&[refs[1], refs[1]]).unwrap();
    assert_close(&twice[0], &twice[1]);
}

#[test]
fn a_model_directory_missing_a_file_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let files = write_tiny_model(dir.path(), 7).unwrap();
    std::fs::write(&files.config, "{\"hidden_size\": 32}").unwrap();
    let err = Embedder::load(&files, &EmbedderOptions::default())
        .err()
        .unwrap();
    assert!(matches!(err, EmbedError::Config { .. }), "{err}");
    let gone = ModelFiles {
        weights: dir.path().join("absent.safetensors"),
        ..write_tiny_model(dir.path(), 7).unwrap()
    };
    let err = Embedder::load(&gone, &EmbedderOptions::default())
        .err()
        .unwrap();
    assert!(err.to_string().contains("absent.safetensors"), "{err}");
}

/// Submits `inputs` and waits for the answer.
fn embed_via(handle: &EmbedHandle, inputs: Vec<Vec<u32>>) -> Vec<Vec<f32>> {
    let (tx, rx) = mpsc::channel();
    handle
        .submit(inputs, Box::new(move |r| tx.send(r).unwrap()))
        .unwrap();
    rx.recv().unwrap().unwrap()
}

#[test]
fn a_large_request_is_split_within_the_batch_limits() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny(&dir);
    let inputs: Vec<Vec<u32>> = (0..300).map(|i| vec![5 + (i % 40) as u32; 6]).collect();
    let refs: Vec<&[u32]> = inputs.iter().map(Vec::as_slice).collect();
    let direct = model.embed(&refs).unwrap();
    // 8 positions per input: 10 fit the token budget, so 30 batches.
    let options = BatchOptions {
        max_batch_tokens: 80,
        max_batch_inputs: 128,
        max_queued_requests: 4,
    };
    let handle = EmbedHandle::spawn(model, options).unwrap();
    let vectors = embed_via(&handle, inputs);
    assert_eq!(vectors.len(), 300);
    for (a, b) in vectors.iter().zip(&direct) {
        assert_close(a, b);
    }
    let stats = handle.stats();
    assert_eq!(stats.batches.load(std::sync::atomic::Ordering::Relaxed), 30);
    assert_eq!(stats.inputs.load(std::sync::atomic::Ordering::Relaxed), 300);
    assert_eq!(
        stats.tokens.load(std::sync::atomic::Ordering::Relaxed),
        2400
    );
}

#[test]
fn concurrent_requests_share_batches_and_get_their_own_vectors() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny(&dir);
    let requests: Vec<Vec<Vec<u32>>> = (0..16u32)
        .map(|r| {
            (0..=r % 3)
                .map(|i| vec![5 + r + i; 1 + (r % 5) as usize])
                .collect()
        })
        .collect();
    let expected: Vec<Vec<Vec<f32>>> = requests
        .iter()
        .map(|inputs| {
            let refs: Vec<&[u32]> = inputs.iter().map(Vec::as_slice).collect();
            model.embed(&refs).unwrap()
        })
        .collect();
    let handle = Arc::new(EmbedHandle::spawn(model, BatchOptions::default()).unwrap());
    let receivers: Vec<_> = requests
        .iter()
        .map(|inputs| {
            let (tx, rx) = mpsc::channel();
            handle
                .submit(inputs.clone(), Box::new(move |r| tx.send(r).unwrap()))
                .unwrap();
            rx
        })
        .collect();
    for (rx, want) in receivers.into_iter().zip(&expected) {
        let got = rx.recv().unwrap().unwrap();
        assert_eq!(got.len(), want.len());
        for (a, b) in got.iter().zip(want) {
            assert_close(a, b);
        }
    }
    let stats = handle.stats();
    let batches = stats.batches.load(std::sync::atomic::Ordering::Relaxed);
    assert!(batches < 16, "16 queued requests ran in {batches} batches");
    assert_eq!(
        stats.requests.load(std::sync::atomic::Ordering::Relaxed),
        16
    );
    assert_eq!(stats.queued.load(std::sync::atomic::Ordering::Relaxed), 0);
}

#[test]
fn a_full_queue_refuses_and_a_dropped_handle_finishes_its_queue() {
    let dir = tempfile::tempdir().unwrap();
    let options = BatchOptions {
        max_queued_requests: 2,
        ..BatchOptions::default()
    };
    let handle = EmbedHandle::spawn(tiny(&dir), options).unwrap();
    let (tx, rx) = mpsc::channel();
    let mut refused = 0;
    for _ in 0..50 {
        let tx = tx.clone();
        let reply = Box::new(move |r| tx.send(r).unwrap());
        match handle.submit(vec![vec![5; 20]; 64], reply) {
            Ok(()) => {}
            Err(ferrum_embed::SubmitError::QueueFull(2)) => refused += 1,
            Err(e) => panic!("{e}"),
        }
    }
    drop(tx);
    assert!(
        refused > 0,
        "50 requests of 64 inputs never filled a queue of 2"
    );
    drop(handle);
    let answered: Vec<_> = rx.iter().collect();
    assert_eq!(answered.len(), 50 - refused);
    assert!(answered
        .iter()
        .all(|r| r.as_ref().is_ok_and(|v| v.len() == 64)));
}
