//! A tiny BERT with random weights and a small WordPiece tokenizer, written as a model directory
//! (`model.safetensors`, `tokenizer.json`, `config.json`) for tests that need a real model but
//! not the real weights. Its `tokenizer.json` truncates and pads to 8 tokens, as the real
//! model's does to 128, so tests see that neither happens.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use serde_json::json;

use crate::model::ModelFiles;

/// The tiny model's shape.
pub const HIDDEN: usize = 32;
pub const LAYERS: usize = 2;
pub const HEADS: usize = 4;
pub const INTERMEDIATE: usize = 64;
/// Positions per input: 30 tokens beside `[CLS]` and `[SEP]`.
pub const MAX_POSITIONS: usize = 32;

/// The vocabulary: special tokens, whole words, letters, and letters as word pieces.
pub fn vocabulary() -> Vec<String> {
    let specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"];
    let words = [
        "the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "hello", "world", ".", ",",
        "!", "?",
    ];
    let letters = ('a'..='z').map(String::from);
    let pieces = ('a'..='z').map(|c| format!("##{c}"));
    specials
        .iter()
        .chain(&words)
        .map(|s| s.to_string())
        .chain(letters)
        .chain(pieces)
        .collect()
}

/// Writes the tiny model into `dir` (weights from `seed`) and returns its files.
pub fn write_tiny_model(dir: &Path, seed: u64) -> std::io::Result<ModelFiles> {
    std::fs::create_dir_all(dir)?;
    let files = ModelFiles::in_dir(dir);
    let vocab = vocabulary();
    std::fs::write(&files.config, config(vocab.len()).to_string())?;
    std::fs::write(&files.tokenizer, tokenizer(&vocab).to_string())?;
    candle_core::safetensors::save(&weights(vocab.len(), seed), &files.weights)
        .map_err(std::io::Error::other)?;
    Ok(files)
}

fn config(vocab: usize) -> serde_json::Value {
    json!({
        "architectures": ["BertModel"],
        "attention_probs_dropout_prob": 0.1,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "hidden_size": HIDDEN,
        "initializer_range": 0.02,
        "intermediate_size": INTERMEDIATE,
        "layer_norm_eps": 1e-12,
        "max_position_embeddings": MAX_POSITIONS,
        "model_type": "bert",
        "num_attention_heads": HEADS,
        "num_hidden_layers": LAYERS,
        "pad_token_id": 0,
        "position_embedding_type": "absolute",
        "type_vocab_size": 2,
        "vocab_size": vocab,
    })
}

fn tokenizer(vocab: &[String]) -> serde_json::Value {
    let ids: serde_json::Map<String, serde_json::Value> = vocab
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    let added: Vec<serde_json::Value> = vocab[..5]
        .iter()
        .enumerate()
        .map(|(i, t)| {
            json!({"id": i, "special": true, "content": t, "single_word": false,
                   "lstrip": false, "rstrip": false, "normalized": false})
        })
        .collect();
    let special = |name: &str, id: usize| json!({"id": name, "ids": [id], "tokens": [name]});
    json!({
        "version": "1.0",
        "truncation": {"max_length": 8, "strategy": "LongestFirst", "stride": 0,
                       "direction": "Right"},
        "padding": {"strategy": {"Fixed": 8}, "direction": "Right", "pad_to_multiple_of": null,
                    "pad_id": 0, "pad_type_id": 0, "pad_token": "[PAD]"},
        "added_tokens": added,
        "normalizer": {"type": "BertNormalizer", "clean_text": true,
                       "handle_chinese_chars": true, "strip_accents": null, "lowercase": true},
        "pre_tokenizer": {"type": "BertPreTokenizer"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}},
                       {"SpecialToken": {"id": "[SEP]", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}},
                     {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "[SEP]", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}},
                     {"SpecialToken": {"id": "[SEP]", "type_id": 1}}],
            "special_tokens": {"[CLS]": special("[CLS]", 2), "[SEP]": special("[SEP]", 3)},
        },
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": true},
        "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
                  "max_input_chars_per_word": 100, "vocab": ids},
    })
}

/// Every tensor of a BERT encoder (Hugging Face's names, without the `bert.` prefix).
fn weights(vocab: usize, seed: u64) -> HashMap<String, Tensor> {
    let mut rng = XorShift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut out = HashMap::new();
    let mut add = |name: String, shape: &[usize], center: f32, scale: f32| {
        let n = shape.iter().product();
        let data: Vec<f32> = (0..n).map(|_| center + scale * rng.uniform()).collect();
        let tensor = Tensor::from_vec(data, shape, &Device::Cpu).expect("shape matches data");
        out.insert(name, tensor);
    };
    add(
        "embeddings.word_embeddings.weight".into(),
        &[vocab, HIDDEN],
        0.0,
        0.5,
    );
    add(
        "embeddings.position_embeddings.weight".into(),
        &[MAX_POSITIONS, HIDDEN],
        0.0,
        0.1,
    );
    add(
        "embeddings.token_type_embeddings.weight".into(),
        &[2, HIDDEN],
        0.0,
        0.1,
    );
    add("embeddings.LayerNorm.weight".into(), &[HIDDEN], 1.0, 0.1);
    add("embeddings.LayerNorm.bias".into(), &[HIDDEN], 0.0, 0.1);
    for l in 0..LAYERS {
        let p = format!("encoder.layer.{l}");
        let linears = [
            ("attention.self.query", HIDDEN, HIDDEN),
            ("attention.self.key", HIDDEN, HIDDEN),
            ("attention.self.value", HIDDEN, HIDDEN),
            ("attention.output.dense", HIDDEN, HIDDEN),
            ("intermediate.dense", INTERMEDIATE, HIDDEN),
            ("output.dense", HIDDEN, INTERMEDIATE),
        ];
        for (name, out_dim, in_dim) in linears {
            add(format!("{p}.{name}.weight"), &[out_dim, in_dim], 0.0, 0.3);
            add(format!("{p}.{name}.bias"), &[out_dim], 0.0, 0.1);
        }
        for norm in ["attention.output.LayerNorm", "output.LayerNorm"] {
            add(format!("{p}.{norm}.weight"), &[HIDDEN], 1.0, 0.1);
            add(format!("{p}.{norm}.bias"), &[HIDDEN], 0.0, 0.1);
        }
    }
    out
}

/// A small deterministic generator, so every run writes the same weights.
struct XorShift(u64);

impl XorShift {
    /// Uniform in [-1, 1).
    fn uniform(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}
