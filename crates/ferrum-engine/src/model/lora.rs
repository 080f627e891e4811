//! LoRA adapters applied in the forward pass: `y = W x + (alpha / r) B (A x)` on the
//! attention projections, per sequence, so requests for different adapters and for the base
//! model share one batch (each projection's weight matrix is still read once for all of them;
//! the adapters' small products are added to each sequence's rows after it).
//!
//! Adapters are read from llama.cpp's LoRA GGUF format: `general.type = "adapter"`,
//! `adapter.type = "lora"`, `adapter.lora.alpha`, and per adapted matrix `<name>.lora_a`
//! (ggml dims `[in, r]`: r rows of `in` values) and `<name>.lora_b` (`[r, out]`), with
//! `<name>` the base tensor's name (`blk.N.attn_q.weight`).

use std::path::Path;

use super::transformer::Transformer;
use crate::error::{EngineError, Result};
use crate::gguf::GgufFile;
use crate::kernels;

/// The projections an adapter can adapt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Proj {
    Q,
    K,
    V,
    O,
}

const PROJS: [(Proj, &str); 4] = [
    (Proj::Q, "attn_q"),
    (Proj::K, "attn_k"),
    (Proj::V, "attn_v"),
    (Proj::O, "attn_output"),
];

/// One adapted matrix: `a` is `rank x cols`, `b` is `rows x rank`, both row-major.
#[derive(Clone, Debug)]
struct Pair {
    a: Vec<f32>,
    b: Vec<f32>,
    rank: usize,
    cols: usize,
    rows: usize,
}

/// A LoRA adapter for one base model.
#[derive(Debug)]
pub struct LoraAdapter {
    name: String,
    /// Distinguishes this adapter's keys and values in the prefix cache (never 0, the base's).
    id: u64,
    alpha: f32,
    rank: usize,
    /// `[layer][proj]`.
    layers: Vec<[Option<Pair>; 4]>,
}

impl LoraAdapter {
    /// Loads the adapter at `path` for `model`, checking its architecture and every shape.
    /// `name` identifies it (the served model id).
    pub fn load(path: &Path, name: &str, model: &Transformer) -> Result<Self> {
        let gguf = GgufFile::open(path)?;
        Self::from_gguf(&gguf, name, model)
    }

    pub fn from_gguf(gguf: &GgufFile, name: &str, model: &Transformer) -> Result<Self> {
        let bad = |message: String| EngineError::CorruptGguf {
            path: gguf.path().to_path_buf(),
            message,
        };
        if gguf.get_str("general.type").ok() != Some("adapter")
            || gguf.get_str("adapter.type").ok() != Some("lora")
        {
            return Err(bad(
                "not a LoRA adapter (general.type must be \"adapter\" and adapter.type \"lora\")"
                    .into(),
            ));
        }
        let arch = gguf.get_str("general.architecture")?;
        if arch != model.cfg.arch.name() {
            return Err(bad(format!(
                "the adapter is for a `{arch}` model, the base model is `{}`",
                model.cfg.arch.name()
            )));
        }
        let alpha = gguf.get_f32("adapter.lora.alpha")?;
        let cfg = &model.cfg;
        let mut rank = 0;
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for l in 0..cfg.n_layers {
            let mut layer: [Option<Pair>; 4] = Default::default();
            for (i, (proj, tname)) in PROJS.iter().enumerate() {
                let (rows, cols) = match proj {
                    Proj::Q => (cfg.q_dim(), cfg.d_model),
                    Proj::K | Proj::V => (cfg.kv_dim(), cfg.d_model),
                    Proj::O => (cfg.d_model, cfg.q_dim()),
                };
                let base = format!("blk.{l}.{tname}.weight");
                let (an, bn) = (format!("{base}.lora_a"), format!("{base}.lora_b"));
                match (gguf.has_tensor(&an), gguf.has_tensor(&bn)) {
                    (false, false) => continue,
                    (true, true) => {}
                    _ => return Err(bad(format!("`{base}` has only one of lora_a and lora_b"))),
                }
                let (a, b) = (gguf.tensor(&an)?, gguf.tensor(&bn)?);
                let r = a.dims.get(1).copied().unwrap_or(0);
                if a.dims != [cols, r] || b.dims != [r, rows] || r == 0 {
                    return Err(bad(format!(
                        "`{base}`: lora_a is {:?} and lora_b {:?}, expected [{cols}, r] and [r, {rows}]",
                        a.dims, b.dims
                    )));
                }
                if rank != 0 && r != rank {
                    return Err(bad(format!("`{base}` has rank {r}, others {rank}")));
                }
                rank = r;
                let mut pair = Pair {
                    a: vec![0.0; r * cols],
                    b: vec![0.0; rows * r],
                    rank: r,
                    cols,
                    rows,
                };
                kernels::dequantize(a.dtype, a.bytes(), &mut pair.a);
                kernels::dequantize(b.dtype, b.bytes(), &mut pair.b);
                layer[i] = Some(pair);
            }
            layers.push(layer);
        }
        if let Some(other) = gguf.tensor_names().find(|n| {
            n.ends_with(".lora_a")
                && !PROJS
                    .iter()
                    .any(|(_, t)| n.contains(&format!(".{t}.weight.")))
        }) {
            return Err(EngineError::InvalidOption(format!(
                "the adapter adapts `{other}`; ferrum applies adapters to the attention \
                 projections (q, k, v, output) only"
            )));
        }
        if rank == 0 {
            return Err(bad("the adapter has no tensors".into()));
        }
        Ok(LoraAdapter {
            id: name_id(name),
            name: name.to_string(),
            alpha,
            rank,
            layers,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn alpha(&self) -> f32 {
        self.alpha
    }

    /// The root of this adapter's prefix-cache hash chain.
    pub(crate) fn cache_root(&self) -> u64 {
        self.id
    }

    /// Adds the adapter's update of projection `proj` of layer `layer` to `out` (`n` rows of
    /// the projection's outputs) for the inputs `x` (`n` rows).
    pub(crate) fn apply(&self, layer: usize, proj: Proj, x: &[f32], out: &mut [f32]) {
        let Some(p) = &self.layers[layer][proj as usize] else {
            return;
        };
        let scale = self.alpha / p.rank as f32;
        let mut t = vec![0f32; p.rank];
        for (xr, yr) in x.chunks_exact(p.cols).zip(out.chunks_exact_mut(p.rows)) {
            for (ti, ar) in t.iter_mut().zip(p.a.chunks_exact(p.cols)) {
                *ti = scale * dot(ar, xr);
            }
            for (y, br) in yr.iter_mut().zip(p.b.chunks_exact(p.rank)) {
                *y += dot(br, &t);
            }
        }
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight partial sums, so the compiler vectorises it.
    let mut acc = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

fn name_id(name: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    "lora".hash(&mut h);
    name.hash(&mut h);
    h.finish() | 1
}
