//! The base model as candle tensors (frozen, f32) and the LoRA adapters being trained.

use candle_core::{CpuStorage, CustomOp1, Device, Layout, Shape, Tensor, Var, D};
use ferrum_engine::{GgufFile, LoadedModel, ModelConfig, Rope, RopeStyle};
use rand::{Rng, SeedableRng};

use crate::{Example, TrainError, TrainSettings};

/// Longest example trained on: longer ones are cut here (autograd keeps every layer's
/// attention scores, `heads x n x n` floats, until the backward pass).
pub const MAX_TRAIN_TOKENS: usize = 1024;

/// The projections an adapter adapts, in the order of their tensors (and of the serving
/// engine's `Proj`).
pub const PROJS: [&str; 4] = ["attn_q", "attn_k", "attn_v", "attn_output"];

/// A frozen linear map `y = x W^T` whose backward pass computes only the input's gradient.
struct Frozen {
    /// `[out, in]`, contiguous.
    w: Tensor,
}

impl CustomOp1 for Frozen {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("frozen-linear: f32 only");
        };
        let (Some((start, end)), [m, k]) = (layout.contiguous_offsets(), layout.dims()) else {
            candle_core::bail!("frozen-linear: a contiguous matrix is expected");
        };
        let x = Tensor::from_slice(&data[start..end], (*m, *k), &Device::Cpu)?;
        let y = x.matmul(&self.w.t()?)?;
        let out = self.w.dim(0)?;
        Ok((
            CpuStorage::F32(y.flatten_all()?.to_vec1()?),
            Shape::from((*m, out)),
        ))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad.matmul(&self.w)?))
    }
}

fn frozen(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1(Frozen { w: w.clone() })
}

struct Layer {
    attn_norm: Tensor,
    wq: Tensor,
    wk: Tensor,
    wv: Tensor,
    bq: Option<Tensor>,
    bk: Option<Tensor>,
    bv: Option<Tensor>,
    wo: Tensor,
    ffn_norm: Tensor,
    gate: Tensor,
    up: Tensor,
    down: Tensor,
}

/// The frozen base model.
pub struct Base {
    pub cfg: ModelConfig,
    /// Token embeddings, `[vocab][d_model]`, read row by row (no gradient flows into them).
    embed: Vec<f32>,
    layers: Vec<Layer>,
    norm: Tensor,
    output: Tensor,
    rope: Rope,
}

/// One example's summed loss over its targets (a scalar on the autograd tape) and how many
/// targets the model already ranks first.
pub struct LossOut {
    pub loss_sum: Tensor,
    pub correct: usize,
}

impl Base {
    /// Dequantizes the weights of `model`'s GGUF to f32 (once per training run).
    pub fn load(model: &LoadedModel) -> Result<Self, TrainError> {
        let cfg = model.model.cfg.clone();
        if cfg.rope_dims != cfg.head_dim {
            return Err(TrainError::Invalid(
                "models with partial rotary embeddings cannot be fine-tuned yet".into(),
            ));
        }
        let gguf = GgufFile::open(&model.path)?;
        let dev = &Device::Cpu;
        let tensor = |name: &str| -> Result<Tensor, TrainError> {
            let t = gguf.tensor(name)?;
            let shape: Vec<usize> = t.dims.iter().rev().copied().collect();
            Ok(Tensor::from_vec(t.to_f32(), shape, dev)?)
        };
        let optional = |name: &str| -> Result<Option<Tensor>, TrainError> {
            if gguf.has_tensor(name) {
                tensor(name).map(Some)
            } else {
                Ok(None)
            }
        };
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for l in 0..cfg.n_layers {
            let n = |s: &str| format!("blk.{l}.{s}");
            layers.push(Layer {
                attn_norm: tensor(&n("attn_norm.weight"))?,
                wq: tensor(&n("attn_q.weight"))?,
                wk: tensor(&n("attn_k.weight"))?,
                wv: tensor(&n("attn_v.weight"))?,
                bq: optional(&n("attn_q.bias"))?,
                bk: optional(&n("attn_k.bias"))?,
                bv: optional(&n("attn_v.bias"))?,
                wo: tensor(&n("attn_output.weight"))?,
                ffn_norm: tensor(&n("ffn_norm.weight"))?,
                gate: tensor(&n("ffn_gate.weight"))?,
                up: tensor(&n("ffn_up.weight"))?,
                down: tensor(&n("ffn_down.weight"))?,
            });
        }
        let embed_t = tensor("token_embd.weight")?;
        let output = match optional("output.weight")? {
            Some(o) => o,
            None => embed_t.clone(),
        };
        let embed = embed_t.flatten_all()?.to_vec1()?;
        let rope = Rope::new(
            cfg.rope_style,
            cfg.rope_dims,
            cfg.rope_base,
            cfg.rope_scaling,
        );
        Ok(Base {
            norm: tensor("output_norm.weight")?,
            embed,
            layers,
            output,
            rope,
            cfg,
        })
    }

    fn rms_norm(&self, x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
        let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
        let inv = (ms + self.cfg.rms_eps as f64)?.sqrt()?.recip()?;
        x.broadcast_mul(&inv)?.broadcast_mul(w)
    }

    /// RoPE on `x` (`[n, heads, head_dim]`) with the serving engine's angles and pairing.
    fn rope(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
        let (n, h, hd) = x.dims3()?;
        let half = hd / 2;
        let rot = |a: &Tensor, b: &Tensor, cos: &Tensor, sin: &Tensor| {
            let ra = (a.broadcast_mul(cos)? - b.broadcast_mul(sin)?)?;
            let rb = (a.broadcast_mul(sin)? + b.broadcast_mul(cos)?)?;
            Ok::<_, candle_core::Error>((ra, rb))
        };
        match self.cfg.rope_style {
            RopeStyle::Interleaved => {
                let x = x.reshape((n, h, half, 2))?;
                let (a, b) = (x.narrow(3, 0, 1)?, x.narrow(3, 1, 1)?);
                let (cos, sin) = (cos.reshape((n, 1, half, 1))?, sin.reshape((n, 1, half, 1))?);
                let (ra, rb) = rot(&a, &b, &cos, &sin)?;
                Tensor::cat(&[ra, rb], 3)?.reshape((n, h, hd))
            }
            RopeStyle::Neox => {
                let (a, b) = (x.narrow(2, 0, half)?, x.narrow(2, half, half)?);
                let (cos, sin) = (cos.reshape((n, 1, half))?, sin.reshape((n, 1, half))?);
                let (ra, rb) = rot(&a, &b, &cos, &sin)?;
                Tensor::cat(&[ra, rb], 2)
            }
        }
    }

    /// The summed negative log-likelihood of `ex`'s targets under the base plus `adapters`.
    pub fn loss(&self, adapters: &Adapters, ex: &Example) -> Result<LossOut, TrainError> {
        let c = &self.cfg;
        let dev = &Device::Cpu;
        let len = ex.tokens.len().min(MAX_TRAIN_TOKENS);
        // Position p predicts token p + 1; the last position needed is the last target's.
        let Some(last) = (1..len).rev().find(|&j| ex.targets[j]) else {
            return Ok(LossOut {
                loss_sum: Tensor::new(0f32, dev)?,
                correct: 0,
            });
        };
        let n = last;
        let (d, hd, nh, nkv) = (c.d_model, c.head_dim, c.n_heads, c.n_kv_heads);
        let mut rows = Vec::with_capacity(n * d);
        for &id in &ex.tokens[..n] {
            let id = id as usize;
            if id >= c.vocab_size {
                return Err(TrainError::Invalid(format!(
                    "token {id} is outside the vocabulary"
                )));
            }
            rows.extend_from_slice(&self.embed[id * d..(id + 1) * d]);
        }
        let mut x = Tensor::from_vec(rows, (n, d), dev)?;
        let half = hd / 2;
        let (mut cos, mut sin) = (vec![0f32; n * half], vec![0f32; n * half]);
        for p in 0..n {
            self.rope.cos_sin(
                p,
                &mut cos[p * half..(p + 1) * half],
                &mut sin[p * half..(p + 1) * half],
            );
        }
        let cos = Tensor::from_vec(cos, (n, half), dev)?;
        let sin = Tensor::from_vec(sin, (n, half), dev)?;
        let mask: Vec<f32> = (0..n * n)
            .map(|i| {
                if i % n > i / n {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        let mask = Tensor::from_vec(mask, (n, n), dev)?;
        let group = nh / nkv;
        let scale = 1.0 / (hd as f64).sqrt();
        for (l, layer) in self.layers.iter().enumerate() {
            let h = self.rms_norm(&x, &layer.attn_norm)?;
            let proj = |w: &Tensor, b: &Option<Tensor>, p: usize| -> candle_core::Result<Tensor> {
                let mut y = frozen(&h, w)?;
                if let Some(b) = b {
                    y = y.broadcast_add(b)?;
                }
                adapters.add(l, p, &h, y)
            };
            let q = proj(&layer.wq, &layer.bq, 0)?.reshape((n, nh, hd))?;
            let k = proj(&layer.wk, &layer.bk, 1)?.reshape((n, nkv, hd))?;
            let v = proj(&layer.wv, &layer.bv, 2)?.reshape((n, nkv, hd))?;
            let q = self.rope(&q, &cos, &sin)?.transpose(0, 1)?.contiguous()?;
            let k = self.rope(&k, &cos, &sin)?.transpose(0, 1)?;
            let v = v.transpose(0, 1)?;
            // Each key head serves `group` query heads.
            let expand = |t: Tensor| -> candle_core::Result<Tensor> {
                t.unsqueeze(1)?
                    .broadcast_as((nkv, group, n, hd))?
                    .contiguous()?
                    .reshape((nh, n, hd))
            };
            let (k, v) = (expand(k)?, expand(v)?);
            let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(&mask)?;
            let max = scores.max_keepdim(D::Minus1)?.detach();
            let e = scores.broadcast_sub(&max)?.exp()?;
            let probs = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
            let att = probs
                .matmul(&v)?
                .transpose(0, 1)?
                .contiguous()?
                .reshape((n, nh * hd))?;
            let o = adapters.add(l, 3, &att, frozen(&att, &layer.wo)?)?;
            x = (x + o)?;
            let h = self.rms_norm(&x, &layer.ffn_norm)?;
            let m = (frozen(&h, &layer.gate)?.silu()? * frozen(&h, &layer.up)?)?;
            x = (x + frozen(&m, &layer.down)?)?;
        }
        let picked: Vec<u32> = (0..n)
            .filter(|&p| ex.targets[p + 1])
            .map(|p| p as u32)
            .collect();
        let wanted: Vec<u32> = picked.iter().map(|&p| ex.tokens[p as usize + 1]).collect();
        let k = picked.len();
        let idx = Tensor::from_vec(picked, k, dev)?;
        let h = self.rms_norm(&x.index_select(&idx, 0)?, &self.norm)?;
        let logits = frozen(&h, &self.output)?;
        let tgt = Tensor::from_vec(wanted.clone(), (k, 1), dev)?;
        let lse = logits.log_sum_exp(1)?;
        let at = logits.gather(&tgt, 1)?.squeeze(1)?;
        let loss_sum = (lse - at)?.sum_all()?;
        let best = logits.argmax_keepdim(1)?.flatten_all()?.to_vec1::<u32>()?;
        let correct = best.iter().zip(&wanted).filter(|(a, b)| a == b).count();
        Ok(LossOut { loss_sum, correct })
    }
}

/// The trainable LoRA matrices: per layer and projection, `A` (`rank x in`) and `B`
/// (`out x rank`, zero at the start, so training starts from the base model).
pub struct Adapters {
    /// `[layer * 4 + proj]`: (A, B).
    pairs: Vec<(Var, Var)>,
    vars: Vec<Var>,
    scale: f64,
}

impl Adapters {
    pub fn new(cfg: &ModelConfig, settings: &TrainSettings) -> Result<Self, TrainError> {
        let r = settings.rank;
        if r == 0 {
            return Err(TrainError::Invalid(
                "the LoRA rank must be at least 1".into(),
            ));
        }
        // A as PEFT initialises it (Kaiming-uniform: U(-1/sqrt(in), 1/sqrt(in))), from the seed.
        let mut rng = rand::rngs::StdRng::seed_from_u64(settings.seed.wrapping_add(0x10ba));
        let mut pairs = Vec::with_capacity(cfg.n_layers * 4);
        for _ in 0..cfg.n_layers {
            for p in 0..4 {
                let (rows, cols) = proj_shape(cfg, p);
                let bound = 1.0 / (cols as f32).sqrt();
                let a: Vec<f32> = (0..r * cols)
                    .map(|_| rng.gen_range(-bound..bound))
                    .collect();
                let a = Var::from_tensor(&Tensor::from_vec(a, (r, cols), &Device::Cpu)?)?;
                let b = Var::zeros((rows, r), candle_core::DType::F32, &Device::Cpu)?;
                pairs.push((a, b));
            }
        }
        let vars = pairs
            .iter()
            .flat_map(|(a, b)| [a.clone(), b.clone()])
            .collect();
        Ok(Adapters {
            pairs,
            vars,
            scale: settings.alpha as f64 / r as f64,
        })
    }

    pub fn vars(&self) -> &[Var] {
        &self.vars
    }

    /// `y + scale * (x A^T) B^T` for projection `p` of layer `l`.
    fn add(&self, l: usize, p: usize, x: &Tensor, y: Tensor) -> candle_core::Result<Tensor> {
        let (a, b) = &self.pairs[l * 4 + p];
        let delta = x.matmul(&a.as_tensor().t()?)?.matmul(&b.as_tensor().t()?)?;
        y + (delta * self.scale)?
    }

    /// Every parameter's values, in [`vars`](Self::vars) order.
    pub fn values(&self) -> candle_core::Result<Vec<Vec<f32>>> {
        self.vars
            .iter()
            .map(|v| v.as_tensor().flatten_all()?.to_vec1())
            .collect()
    }

    pub fn restore(&self, values: &[Vec<f32>]) -> Result<(), TrainError> {
        if values.len() != self.vars.len() {
            return Err(TrainError::BadCheckpoint(
                "adapters of another shape".into(),
            ));
        }
        for (v, x) in self.vars.iter().zip(values) {
            let shape = v.as_tensor().shape().clone();
            if x.len() != shape.elem_count() {
                return Err(TrainError::BadCheckpoint(
                    "adapters of another shape".into(),
                ));
            }
            v.set(&Tensor::from_slice(x, shape, &Device::Cpu)?)?;
        }
        Ok(())
    }

    /// `(layer, projection name, A, B)` for every adapted matrix.
    pub fn matrices(&self) -> impl Iterator<Item = (usize, &'static str, &Tensor, &Tensor)> {
        self.pairs
            .iter()
            .enumerate()
            .map(|(i, (a, b))| (i / 4, PROJS[i % 4], a.as_tensor(), b.as_tensor()))
    }
}

/// `(out, in)` of projection `p`.
fn proj_shape(cfg: &ModelConfig, p: usize) -> (usize, usize) {
    let (d, qd, kvd) = (cfg.d_model, cfg.q_dim(), cfg.kv_dim());
    match p {
        0 => (qd, d),
        1 | 2 => (kvd, d),
        _ => (d, qd),
    }
}
