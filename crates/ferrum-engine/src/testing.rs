//! Tiny random-weight GGUF models written on the fly, so unit tests (here and in other crates)
//! exercise the real loading and forward paths without downloading anything.

use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

/// Shape and format of a tiny model.
#[derive(Clone, Debug)]
pub struct TinyModel {
    /// `"llama"` or `"qwen2"` (qwen2 adds Q/K/V biases).
    pub arch: String,
    pub n_layers: usize,
    pub d_model: usize,
    pub d_ff: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub vocab: usize,
    pub context_length: usize,
    /// Block format of the layer matrices.
    pub dtype: GgmlDType,
    /// Whether to write a separate `output.weight` (otherwise embeddings are tied).
    pub separate_output: bool,
    pub seed: u64,
}

impl Default for TinyModel {
    fn default() -> Self {
        TinyModel {
            arch: "llama".into(),
            n_layers: 2,
            d_model: 64,
            d_ff: 128,
            n_heads: 4,
            n_kv_heads: 2,
            vocab: 96,
            context_length: 256,
            dtype: GgmlDType::Q8_0,
            separate_output: false,
            seed: 1,
        }
    }
}

impl TinyModel {
    /// Writes the model to `path` as a GGUF file.
    pub fn write(&self, path: &Path) -> candle_core::Result<()> {
        self.write_with(path, Vec::new())
    }

    /// Writes the model with a vocabulary and a chat template, so that it loads as a
    /// `LoadedModel` a server can template and tokenize with: a byte-level BPE vocabulary of
    /// the 256 bytes (no merges, so one token per byte) plus the control tokens
    /// `<|im_start|>` (256) and `<|im_end|>` (257, end of generation), and a ChatML template.
    /// The vocabulary size is 258 whatever `vocab` says.
    pub fn write_chat(&self, path: &Path) -> candle_core::Result<()> {
        let mut tokens: Vec<Value> = byte_level_alphabet()
            .into_iter()
            .map(|c| Value::String(c.to_string()))
            .collect();
        tokens.push(Value::String("<|im_start|>".into()));
        tokens.push(Value::String("<|im_end|>".into()));
        let mut types = vec![Value::I32(1); 256];
        types.extend([Value::I32(3), Value::I32(3)]);
        let template = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n\
                        {% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
        let metadata = vec![
            ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
            ("tokenizer.ggml.pre".into(), Value::String("qwen2".into())),
            ("tokenizer.ggml.tokens".into(), Value::Array(tokens)),
            ("tokenizer.ggml.token_type".into(), Value::Array(types)),
            ("tokenizer.ggml.merges".into(), Value::Array(Vec::new())),
            ("tokenizer.ggml.eos_token_id".into(), Value::U32(257)),
            ("tokenizer.ggml.bos_token_id".into(), Value::U32(256)),
            (
                "tokenizer.chat_template".into(),
                Value::String(template.into()),
            ),
        ];
        TinyModel {
            vocab: 258,
            ..self.clone()
        }
        .write_with(path, metadata)
    }

    fn write_with(&self, path: &Path, extra: Vec<(String, Value)>) -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let mut rng = self.seed;
        // A small deterministic generator keeps files identical across runs and platforms.
        let mut rand_tensor =
            |rows: usize, cols: usize, scale: f32| -> candle_core::Result<Tensor> {
                let data: Vec<f32> = (0..rows * cols)
                    .map(|_| {
                        rng = rng
                            .wrapping_mul(6_364_136_223_846_793_005)
                            .wrapping_add(1_442_695_040_888_963_407);
                        ((rng >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 * scale
                    })
                    .collect();
                Tensor::from_vec(data, (rows, cols), &dev)
            };
        let (d, ff, hd) = (self.d_model, self.d_ff, self.d_model / self.n_heads);
        let kvd = self.n_kv_heads * hd;
        let mut tensors: Vec<(String, QTensor)> = Vec::new();
        let q = |t: Tensor, dtype| QTensor::quantize(&t, dtype);
        let ones = |n: usize| Tensor::ones(n, candle_core::DType::F32, &dev);
        tensors.push((
            "token_embd.weight".into(),
            q(rand_tensor(self.vocab, d, 1.0)?, GgmlDType::Q8_0)?,
        ));
        for i in 0..self.n_layers {
            let n = |s: &str| format!("blk.{i}.{s}");
            let s = 1.0 / (d as f32).sqrt();
            tensors.push((n("attn_norm.weight"), q(ones(d)?, GgmlDType::F32)?));
            tensors.push((n("ffn_norm.weight"), q(ones(d)?, GgmlDType::F32)?));
            tensors.push((n("attn_q.weight"), q(rand_tensor(d, d, s)?, self.dtype)?));
            tensors.push((n("attn_k.weight"), q(rand_tensor(kvd, d, s)?, self.dtype)?));
            tensors.push((n("attn_v.weight"), q(rand_tensor(kvd, d, s)?, self.dtype)?));
            tensors.push((
                n("attn_output.weight"),
                q(rand_tensor(d, d, s)?, self.dtype)?,
            ));
            tensors.push((n("ffn_gate.weight"), q(rand_tensor(ff, d, s)?, self.dtype)?));
            tensors.push((n("ffn_up.weight"), q(rand_tensor(ff, d, s)?, self.dtype)?));
            let sd = 1.0 / (ff as f32).sqrt();
            tensors.push((
                n("ffn_down.weight"),
                q(rand_tensor(d, ff, sd)?, self.dtype)?,
            ));
            if self.arch == "qwen2" {
                for (name, len) in [
                    ("attn_q.bias", d),
                    ("attn_k.bias", kvd),
                    ("attn_v.bias", kvd),
                ] {
                    let b = rand_tensor(1, len, 0.1)?.flatten_all()?;
                    tensors.push((n(name), q(b, GgmlDType::F32)?));
                }
            }
        }
        tensors.push(("output_norm.weight".into(), q(ones(d)?, GgmlDType::F32)?));
        if self.separate_output {
            tensors.push((
                "output.weight".into(),
                q(rand_tensor(self.vocab, d, 1.0)?, GgmlDType::Q8_0)?,
            ));
        }
        let a = &self.arch;
        let u = |v: usize| Value::U32(v as u32);
        let metadata: Vec<(String, Value)> = vec![
            ("general.architecture".into(), Value::String(a.clone())),
            (format!("{a}.block_count"), u(self.n_layers)),
            (format!("{a}.embedding_length"), u(d)),
            (format!("{a}.feed_forward_length"), u(ff)),
            (format!("{a}.attention.head_count"), u(self.n_heads)),
            (format!("{a}.attention.head_count_kv"), u(self.n_kv_heads)),
            (format!("{a}.context_length"), u(self.context_length)),
            (format!("{a}.rope.freq_base"), Value::F32(10_000.0)),
            (
                format!("{a}.attention.layer_norm_rms_epsilon"),
                Value::F32(1e-5),
            ),
        ];
        let metadata: Vec<(String, Value)> = metadata.into_iter().chain(extra).collect();
        let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let mut file = std::fs::File::create(path)?;
        gguf_file::write(&mut file, &md, &ts)
    }
}

/// GPT-2's byte-level alphabet: the character each byte is written as in a byte-level BPE
/// vocabulary (printable Latin-1 bytes as themselves, the others shifted past U+0100).
fn byte_level_alphabet() -> Vec<char> {
    let printable = |b: u32| (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
    let mut shifted = 0;
    (0u32..256)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).unwrap()
            } else {
                shifted += 1;
                char::from_u32(255 + shifted).unwrap()
            }
        })
        .collect()
}
