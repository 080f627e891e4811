//! Adapters in llama.cpp's LoRA GGUF format (what `convert_lora_to_gguf.py` writes and
//! `llama-server --lora` reads): `general.type = "adapter"`, `adapter.type = "lora"`,
//! `adapter.lora.alpha`, and per adapted matrix `<base tensor>.lora_a` (ggml dims `[in, r]`)
//! and `.lora_b` (`[r, out]`), in f32.

use std::io::Cursor;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use ferrum_engine::ModelConfig;

use crate::model::Adapters;
use crate::TrainError;

impl Adapters {
    /// The adapter as a LoRA GGUF file.
    pub fn gguf(&self, cfg: &ModelConfig, alpha: f32) -> Result<Vec<u8>, TrainError> {
        let mut tensors = Vec::new();
        for (l, proj, a, b) in self.matrices() {
            let base = format!("blk.{l}.{proj}.weight");
            // candle's row-major (r, in) is ggml's [in, r].
            tensors.push((
                format!("{base}.lora_a"),
                QTensor::quantize(a, GgmlDType::F32)?,
            ));
            tensors.push((
                format!("{base}.lora_b"),
                QTensor::quantize(b, GgmlDType::F32)?,
            ));
        }
        adapter_gguf(cfg.arch.name(), alpha, &tensors)
    }
}

/// Writes a LoRA GGUF of `tensors` (named `<base tensor>.lora_a` / `.lora_b`) for a model of
/// architecture `arch`.
pub fn adapter_gguf(
    arch: &str,
    alpha: f32,
    tensors: &[(String, QTensor)],
) -> Result<Vec<u8>, TrainError> {
    let metadata = [
        ("general.architecture", Value::String(arch.to_string())),
        ("general.type", Value::String("adapter".into())),
        ("general.name", Value::String("ferrum LoRA".into())),
        ("adapter.type", Value::String("lora".into())),
        ("adapter.lora.alpha", Value::F32(alpha)),
    ];
    let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut out = Cursor::new(Vec::new());
    gguf_file::write(&mut out, &md, &ts)?;
    Ok(out.into_inner())
}
