//! The decoder-only transformer shared by `llama` and `qwen2`: weights, then the forward pass.
//!
//! Activations are f32, laid out `[token][feature]`. Each projection is one call to
//! [`kernels::matmul`], with Q/K/V fused and gate/up fused, so a decode step costs five parallel
//! dispatches per layer (QKV, attention, output, gate+up, down).

use std::cell::RefCell;

use super::flash;
use super::lora::{LoraAdapter, Proj};
use super::ops::{self, Rope};
use super::{ModelConfig, ModelOptions};
use crate::embeds::{is_placeholder, PromptEmbeds};
use crate::error::{EngineError, Result};
use crate::gguf::{GgufFile, TensorView};
use crate::kernels::{self, MatmulJob, MatmulScratch, QMatrix, RowKind, ThreadPool};
use crate::kv::{KvCache, KvType};

struct Layer {
    attn_norm: Vec<f32>,
    wq: QMatrix,
    wk: QMatrix,
    wv: QMatrix,
    bq: Option<Vec<f32>>,
    bk: Option<Vec<f32>>,
    bv: Option<Vec<f32>>,
    wo: QMatrix,
    ffn_norm: Vec<f32>,
    w_gate: QMatrix,
    w_up: QMatrix,
    w_down: QMatrix,
}

/// A loaded llama/qwen2 model: configuration plus weights (views into the GGUF mmap).
pub struct Transformer {
    pub cfg: ModelConfig,
    embed: QMatrix,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    output: QMatrix,
    rope: Rope,
    kv_type: KvType,
    /// For a quantized KV cache, the sizes of the Walsh-Hadamard rotations of queries and keys
    /// and of values (see [`kv_rotation`]).
    kv_rot: Option<(usize, usize)>,
}

/// llama.cpp rotates queries and keys, and values and attention outputs, by an orthonormal
/// Walsh-Hadamard transform when the KV cache is quantized (`attn_rot_k/v`): attention is
/// unchanged in exact arithmetic, but the rotation spreads outlier dimensions over a whole
/// block, so q8_0 loses less. Keys use the largest power of two (from 64) dividing the head
/// size; values 64. Heads whose size is not a multiple of 64 are not rotated.
fn kv_rotation(kv_type: KvType, head_dim: usize) -> Option<(usize, usize)> {
    if kv_type == KvType::F16 || !head_dim.is_multiple_of(64) {
        return None;
    }
    let mut k = 64;
    while head_dim.is_multiple_of(2 * k) {
        k *= 2;
    }
    Some((k, 64))
}

/// Which positions of a forward pass need logits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// None (a prefill chunk that is not the prompt's last).
    None,
    /// The last token only (ordinary generation).
    Last,
    /// Every token, each computed exactly as if it were decoded alone (speculative
    /// verification).
    All,
    /// Every token, computed as a prompt chunk (the batched kernels' summation order, as
    /// llama.cpp scores a prompt): for scoring a prompt.
    Prompt,
}

/// One sequence's part of a batched forward pass: its cache, its new tokens (at positions
/// `kv.len()..`), and which of them need logits.
pub struct SeqInput<'a> {
    pub kv: &'a mut KvCache,
    pub tokens: &'a [u32],
    pub logits: Logits,
    /// The LoRA adapter this sequence runs with, if any.
    pub adapter: Option<&'a LoraAdapter>,
    /// The embedding rows of placeholder ids among `tokens` (an image's tokens), if any.
    pub embeds: Option<&'a PromptEmbeds>,
}

/// Scratch buffers of a forward pass, reused across calls so the hot loop never allocates.
#[derive(Default)]
pub struct Workspace {
    x: Vec<f32>,
    h: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    attn: Vec<f32>,
    proj: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    logits: Vec<f32>,
    cos: Vec<f32>,
    sin: Vec<f32>,
    /// (sequence, position) of each token of the batch.
    tok: Vec<(u32, u32)>,
    scratch: MatmulScratch,
}

impl Workspace {
    /// The logits the last [`Transformer::forward`] call produced, for in-place sampling.
    pub fn logits_mut(&mut self) -> &mut [f32] {
        &mut self.logits
    }
}

/// Calls `f` with each sequence's adapter and the batch rows of its tokens.
fn for_adapted_rows(
    seqs: &[SeqInput<'_>],
    mut f: impl FnMut(&LoraAdapter, std::ops::Range<usize>),
) {
    let mut first = 0;
    for seq in seqs {
        let n = seq.tokens.len();
        if let Some(a) = seq.adapter {
            f(a, first..first + n);
        }
        first += n;
    }
}

fn resize(buf: &mut Vec<f32>, n: usize) {
    buf.resize(n, 0.0);
}

fn f32_vector(gguf: &GgufFile, name: &str, len: usize) -> Result<Vec<f32>> {
    let t = gguf.tensor(name)?;
    check_shape(&t, &[len])?;
    let mut out = vec![0f32; len];
    kernels::dequantize(t.dtype, t.bytes(), &mut out);
    Ok(out)
}

fn optional_vector(gguf: &GgufFile, name: &str, len: usize) -> Result<Option<Vec<f32>>> {
    if gguf.has_tensor(name) {
        f32_vector(gguf, name, len).map(Some)
    } else {
        Ok(None)
    }
}

fn check_shape(t: &TensorView, expected: &[usize]) -> Result<()> {
    if t.dims != expected {
        return Err(EngineError::BadTensorShape {
            name: t.name.clone(),
            expected: expected.to_vec(),
            actual: t.dims.clone(),
        });
    }
    Ok(())
}

fn matrix(gguf: &GgufFile, name: &str, rows: usize, cols: usize) -> Result<QMatrix> {
    let t = gguf.tensor(name)?;
    check_shape(&t, &[cols, rows])?;
    use candle_core::quantized::GgmlDType::*;
    if matches!(t.dtype, Q8_1 | Q8K) {
        return Err(EngineError::UnsupportedQuantization {
            name: name.to_string(),
            dtype: format!("{:?}", t.dtype),
        });
    }
    if !cols.is_multiple_of(t.dtype.block_size()) {
        return Err(EngineError::BadTensorShape {
            name: name.to_string(),
            expected: vec![cols.next_multiple_of(t.dtype.block_size()), rows],
            actual: t.dims.clone(),
        });
    }
    Ok(QMatrix::new(t))
}

impl Transformer {
    pub fn load(gguf: &GgufFile) -> Result<Self> {
        Self::load_with(gguf, &ModelOptions::default())
    }

    /// Loads the model with a deployment's options (RoPE scaling, KV cache type).
    pub fn load_with(gguf: &GgufFile, opts: &ModelOptions) -> Result<Self> {
        let mut cfg = ModelConfig::from_gguf(gguf)?;
        if let Some(scaling) = opts.rope_scaling {
            cfg = cfg.with_rope_scaling(scaling)?;
        }
        if opts.kv_type == KvType::Q8_0 && !cfg.head_dim.is_multiple_of(32) {
            return Err(EngineError::InvalidOption(format!(
                "a q8_0 KV cache needs a head size that is a multiple of 32 (this model's is {})",
                cfg.head_dim
            )));
        }
        let (d, qd, kvd, ff) = (cfg.d_model, cfg.q_dim(), cfg.kv_dim(), cfg.d_ff);
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            let n = |s: &str| format!("blk.{i}.{s}");
            layers.push(Layer {
                attn_norm: f32_vector(gguf, &n("attn_norm.weight"), d)?,
                wq: matrix(gguf, &n("attn_q.weight"), qd, d)?,
                wk: matrix(gguf, &n("attn_k.weight"), kvd, d)?,
                wv: matrix(gguf, &n("attn_v.weight"), kvd, d)?,
                bq: optional_vector(gguf, &n("attn_q.bias"), qd)?,
                bk: optional_vector(gguf, &n("attn_k.bias"), kvd)?,
                bv: optional_vector(gguf, &n("attn_v.bias"), kvd)?,
                wo: matrix(gguf, &n("attn_output.weight"), d, qd)?,
                ffn_norm: f32_vector(gguf, &n("ffn_norm.weight"), d)?,
                w_gate: matrix(gguf, &n("ffn_gate.weight"), ff, d)?,
                w_up: matrix(gguf, &n("ffn_up.weight"), ff, d)?,
                w_down: matrix(gguf, &n("ffn_down.weight"), d, ff)?,
            });
        }
        let embed = matrix(gguf, "token_embd.weight", cfg.vocab_size, d)?;
        // Models with tied embeddings (SmolLM2) have no separate output matrix.
        let output = if gguf.has_tensor("output.weight") {
            matrix(gguf, "output.weight", cfg.vocab_size, d)?
        } else {
            embed.clone()
        };
        let rope = Rope::new(
            cfg.rope_style,
            cfg.rope_dims,
            cfg.rope_base,
            cfg.rope_scaling,
        );
        Ok(Transformer {
            norm: f32_vector(gguf, "output_norm.weight", d)?,
            embed,
            layers,
            output,
            rope,
            kv_type: opts.kv_type,
            kv_rot: kv_rotation(opts.kv_type, cfg.head_dim),
            cfg,
        })
    }

    /// How this model's KV caches store keys and values.
    pub fn kv_type(&self) -> KvType {
        self.kv_type
    }

    /// A KV cache sized for this model, holding up to `capacity` positions.
    pub fn new_cache(&self, capacity: usize) -> KvCache {
        KvCache::new(self.cfg.n_layers, self.cfg.kv_dim(), capacity, self.kv_type)
    }

    /// Bytes of weights read for one decode token: every layer matrix plus the output matrix.
    pub fn weight_bytes_per_token(&self) -> usize {
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                [&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down]
                    .iter()
                    .map(|m| m.nbytes())
                    .sum::<usize>()
            })
            .sum();
        layers + self.output.nbytes()
    }

    /// Runs `tokens` (at positions `kv.len()..`) through the model, appending their keys and
    /// values to `kv`, and returns the requested logits (`vocab_size` floats per token).
    pub fn forward<'w>(
        &self,
        pool: &ThreadPool,
        ws: &'w mut Workspace,
        kv: &mut KvCache,
        tokens: &[u32],
        logits: Logits,
    ) -> Result<&'w [f32]> {
        self.forward_batch(
            pool,
            ws,
            &mut [SeqInput {
                kv,
                tokens,
                logits,
                adapter: None,
                embeds: None,
            }],
        )
    }

    /// One forward pass over several sequences at once (a ragged batch): all their new tokens
    /// form one activation matrix, so every weight matrix is read once for the whole batch,
    /// while attention runs per sequence over its own cache. Returns the requested logits, in
    /// sequence order (`Last`: one row, `All`: one row per token, `None`: no rows).
    ///
    /// A token's result does not depend on what else is in the batch: matmul rows and
    /// activation quantization are per token, and the kernel choice depends only on the weight
    /// rows, so batched decoding gives exactly the tokens of decoding alone.
    pub fn forward_batch<'w>(
        &self,
        pool: &ThreadPool,
        ws: &'w mut Workspace,
        seqs: &mut [SeqInput<'_>],
    ) -> Result<&'w [f32]> {
        let cfg = &self.cfg;
        let d = cfg.d_model;
        ws.tok.clear();
        for (s, seq) in seqs.iter_mut().enumerate() {
            if seq.tokens.is_empty() {
                return Err(EngineError::EmptyPrompt);
            }
            let start = seq.kv.len();
            let end = start + seq.tokens.len();
            if end > seq.kv.capacity() {
                return Err(EngineError::ContextLengthExceeded {
                    requested: end,
                    max: seq.kv.capacity(),
                });
            }
            let known = |id: u32| match seq.embeds {
                Some(e) if is_placeholder(id) => e.width() == d && e.row(id).is_some(),
                _ => (id as usize) < cfg.vocab_size,
            };
            if let Some(&id) = seq.tokens.iter().find(|&&id| !known(id)) {
                return Err(EngineError::TokenOutOfRange {
                    id,
                    vocab: cfg.vocab_size,
                });
            }
            if !seq.kv.reserve_to(end) {
                return Err(EngineError::Internal(format!(
                    "KV blocks for positions up to {end} were not reserved"
                )));
            }
            ws.tok
                .extend((start..end).map(|pos| (s as u32, pos as u32)));
        }
        let t_len = ws.tok.len();
        self.prepare(ws, t_len);
        // How llama.cpp would batch a prompt's rows (see `MatmulScratch::set_rows`), taking each
        // sequence's prompt chunk as its micro-batch: groups of four rows from the chunk's
        // start, and chunks of 8 tokens or more. Single-token steps and verification passes (`Logits::All`,
        // which must reproduce decoding exactly) are never batched.
        ws.scratch.set_rows(seqs.iter().flat_map(|seq| {
            let (start, end) = (seq.kv.len(), seq.kv.len() + seq.tokens.len());
            let prompt = seq.tokens.len() > 1 && seq.logits != Logits::All;
            let grouped_end = end - (end - start) % 4;
            (start..end).map(move |pos| RowKind {
                in_group_of_4: prompt && pos < grouped_end,
                in_batch_of_8: prompt && end - start >= 8,
            })
        }));
        let ids = seqs
            .iter()
            .flat_map(|s| s.tokens.iter().map(move |&id| (s.embeds, id)));
        for (t, (embeds, id)) in ids.enumerate() {
            let out = &mut ws.x[t * d..(t + 1) * d];
            // (Text tokens never look in the table: only placeholder ids can be rows.)
            match embeds
                .filter(|_| is_placeholder(id))
                .and_then(|e| e.row(id))
            {
                Some(row) => out.copy_from_slice(row),
                None => self.embed.dequantize_row(id as usize, out),
            }
        }
        // The tokens that need logits.
        let mut rows = Vec::new();
        let mut first = 0;
        for seq in seqs.iter() {
            let n = seq.tokens.len();
            match seq.logits {
                Logits::None => {}
                Logits::Last => rows.push(first + n - 1),
                Logits::All | Logits::Prompt => rows.extend(first..first + n),
            }
            first += n;
        }
        let last = self.layers.len() - 1;
        for (l, layer) in self.layers.iter().enumerate() {
            self.attention_block(pool, ws, seqs, l, layer);
            if l < last || rows.len() == t_len {
                // (When every token needs logits, nothing is packed and the rows keep their
                // kinds, so a scored prompt's last layer and logits are batched as llama.cpp
                // batches them.)
                self.ffn_block(pool, ws, layer, t_len);
            } else if !rows.is_empty() {
                // The other tokens' last feed-forward feeds nothing (their keys and values are
                // cached), so only the rows that need logits go on, packed at the front. This is
                // also what llama.cpp does, and it multiplies those rows one by one.
                for (i, &t) in rows.iter().enumerate() {
                    ws.x.copy_within(t * d..(t + 1) * d, i * d);
                }
                ws.scratch.set_rows([]);
                self.ffn_block(pool, ws, layer, rows.len());
            }
        }
        for seq in seqs.iter_mut() {
            seq.kv.set_len(seq.kv.len() + seq.tokens.len());
        }
        if rows.is_empty() {
            return Ok(&ws.logits[..0]);
        }
        let n = rows.len();
        norm_rows(&ws.x[..n * d], &self.norm, cfg.rms_eps, &mut ws.h[..n * d]);
        resize(&mut ws.logits, n * cfg.vocab_size);
        kernels::matmul(
            pool,
            &mut ws.scratch,
            &ws.h[..n * d],
            n,
            &mut [MatmulJob {
                w: &self.output,
                out: &mut ws.logits,
            }],
        );
        Ok(&ws.logits)
    }

    fn prepare(&self, ws: &mut Workspace, t: usize) {
        let c = &self.cfg;
        resize(&mut ws.x, t * c.d_model);
        resize(&mut ws.h, t * c.d_model);
        resize(&mut ws.q, t * c.q_dim());
        resize(&mut ws.k, t * c.kv_dim());
        resize(&mut ws.v, t * c.kv_dim());
        resize(&mut ws.attn, t * c.q_dim());
        resize(&mut ws.proj, t * c.d_model);
        resize(&mut ws.gate, t * c.d_ff);
        resize(&mut ws.up, t * c.d_ff);
        resize(&mut ws.cos, c.rope_dims / 2);
        resize(&mut ws.sin, c.rope_dims / 2);
    }

    fn attention_block(
        &self,
        pool: &ThreadPool,
        ws: &mut Workspace,
        seqs: &mut [SeqInput<'_>],
        l: usize,
        layer: &Layer,
    ) {
        let c = &self.cfg;
        let t_len = ws.x.len() / c.d_model;
        let (qd, kvd, hd) = (c.q_dim(), c.kv_dim(), c.head_dim);
        norm_rows(&ws.x, &layer.attn_norm, c.rms_eps, &mut ws.h);
        kernels::matmul(
            pool,
            &mut ws.scratch,
            &ws.h,
            t_len,
            &mut [
                MatmulJob {
                    w: &layer.wq,
                    out: &mut ws.q,
                },
                MatmulJob {
                    w: &layer.wk,
                    out: &mut ws.k,
                },
                MatmulJob {
                    w: &layer.wv,
                    out: &mut ws.v,
                },
            ],
        );
        for_adapted_rows(seqs, |adapter, rows| {
            let x = &ws.h[rows.start * c.d_model..rows.end * c.d_model];
            adapter.apply(l, Proj::Q, x, &mut ws.q[rows.start * qd..rows.end * qd]);
            adapter.apply(l, Proj::K, x, &mut ws.k[rows.start * kvd..rows.end * kvd]);
            adapter.apply(l, Proj::V, x, &mut ws.v[rows.start * kvd..rows.end * kvd]);
        });
        for t in 0..t_len {
            let (s, pos) = (ws.tok[t].0 as usize, ws.tok[t].1 as usize);
            let q = &mut ws.q[t * qd..(t + 1) * qd];
            let k = &mut ws.k[t * kvd..(t + 1) * kvd];
            let v = &mut ws.v[t * kvd..(t + 1) * kvd];
            if let Some(b) = &layer.bq {
                ops::add_assign(q, b);
            }
            if let Some(b) = &layer.bk {
                ops::add_assign(k, b);
            }
            if let Some(b) = &layer.bv {
                ops::add_assign(v, b);
            }
            self.rope.cos_sin(pos, &mut ws.cos, &mut ws.sin);
            self.rope.apply(q, hd, &ws.cos, &ws.sin);
            self.rope.apply(k, hd, &ws.cos, &ws.sin);
            if let Some((rk, rv)) = self.kv_rot {
                ops::fwht(q, rk);
                ops::fwht(k, rk);
                ops::fwht(v, rv);
            }
            seqs[s].kv.write(l, pos, k, v);
        }
        self.attend(pool, ws, seqs, l);
        if let Some((_, rv)) = self.kv_rot {
            // The values were rotated, so the outputs are; the transform is its own inverse.
            ops::fwht(&mut ws.attn, rv);
        }
        kernels::matmul(
            pool,
            &mut ws.scratch,
            &ws.attn,
            t_len,
            &mut [MatmulJob {
                w: &layer.wo,
                out: &mut ws.proj,
            }],
        );
        for_adapted_rows(seqs, |adapter, rows| {
            let d = c.d_model;
            let x = &ws.attn[rows.start * qd..rows.end * qd];
            adapter.apply(l, Proj::O, x, &mut ws.proj[rows.start * d..rows.end * d]);
        });
        ops::add_assign(&mut ws.x, &ws.proj);
    }

    /// Causal attention of every new query over its own sequence's cache, cut into work items
    /// ([`AttnItem`]) for the pool:
    /// - a prompt chunk of at least [`FLASH_MIN_TOKENS`] tokens, or any chunk of 2+ tokens
    ///   that starts [`DEEP_CONTEXT`] positions deep, in tiles of 16 consecutive queries per
    ///   head for the tiled kernels (`flash`), where the CPU has them: from
    ///   [`flash::F32_MIN_TOKENS`] tokens, or deep, llama.cpp's tiled f32 arithmetic with the
    ///   tiles of heads that share a key head in one item, else the exact replay of the
    ///   per-token path;
    /// - any other token (decoding, short chunks, verification passes, which must reproduce
    ///   decoding exactly) one by one: with at least [`DEEP_CONTEXT`] positions, all the heads
    ///   that share a key head in one f32 tile (each key row read once for them all), else per
    ///   head on the exact per-token path;
    /// - q8_0 caches per (token, head) (llama.cpp has that kernel only per token), except
    ///   chunks of [`FLASH_MIN_TOKENS`]+ tokens, whose queries take the q8_0 tile 16 at a time:
    ///   the same arithmetic, each key row read once per tile.
    fn attend(&self, pool: &ThreadPool, ws: &mut Workspace, seqs: &[SeqInput<'_>], l: usize) {
        let c = &self.cfg;
        let (hd, nh) = (c.head_dim, c.n_heads);
        let group = nh / c.n_kv_heads;
        let scale = 1.0 / (hd as f32).sqrt();
        let caches: Vec<&KvCache> = seqs.iter().map(|s| &*s.kv).collect();
        let (q, tok) = (&ws.q, &ws.tok);
        let kv_type = self.kv_type;
        let flash = kv_type == KvType::F16 && hd.is_multiple_of(64) && flash::available();
        // The q8_0 tile replays the per-token q8_0 path exactly, so any chunk of a tile's
        // worth of tokens may take it.
        let q8_tile = kv_type == KvType::Q8_0 && hd.is_multiple_of(32) && flash::available_q8();
        let mut items: Vec<AttnItem> = Vec::new();
        let mut t = 0;
        for seq in seqs {
            let n = seq.tokens.len();
            let start = tok[t].1 as usize;
            if q8_tile && n >= FLASH_MIN_TOKENS {
                for t0 in (t..t + n).step_by(flash::TILE) {
                    let len = (t + n - t0).min(flash::TILE);
                    items.extend((0..nh).map(|h| AttnItem::new(Kernel::Tile16, t0, len, h)));
                }
            } else if flash
                && n > 1
                && (start + 1 >= DEEP_CONTEXT || n >= FLASH_MIN_TOKENS && seq.logits != Logits::All)
            {
                // Deep in the context, a short chunk (the scheduler keeps chunks short while
                // others decode) takes the f32 kernel too: what decoding there computes (each
                // query's arithmetic is its own, so a verification pass there reproduces
                // decoding as well), and several times cheaper than the f16 replay over
                // thousands of keys, or than reading them once per token.
                let deep = start + 1 >= DEEP_CONTEXT;
                if n >= flash::F32_MIN_TOKENS || deep {
                    // 16 tokens of several heads that share a key head per item, so each key
                    // row is widened once for all of them; the heads are split only as far as
                    // needed to give every thread work.
                    let blocks = n.div_ceil(flash::TILE);
                    let split = (1..=group)
                        .find(|s| c.n_kv_heads * blocks * s >= 2 * pool.n_threads())
                        .unwrap_or(group);
                    let per_item = group.div_ceil(split).min(flash::MAX_GROUP);
                    for t0 in (t..t + n).step_by(flash::TILE) {
                        let len = (t + n - t0).min(flash::TILE);
                        for h0 in (0..nh).step_by(group) {
                            for h in (h0..h0 + group).step_by(per_item) {
                                let heads = (h0 + group - h).min(per_item);
                                items.push(AttnItem::group(t0, len, h, heads));
                            }
                        }
                    }
                } else {
                    for t0 in (t..t + n).step_by(flash::TILE) {
                        let len = (t + n - t0).min(flash::TILE);
                        items.extend((0..nh).map(|h| AttnItem::new(Kernel::Tile16, t0, len, h)));
                    }
                }
            } else {
                for (i, t0) in (t..t + n).enumerate() {
                    if flash && start + i + 1 >= DEEP_CONTEXT {
                        for h0 in (0..nh).step_by(group) {
                            for h in (h0..h0 + group).step_by(flash::TILE) {
                                let heads = (h0 + group - h).min(flash::TILE);
                                items.push(AttnItem::new(Kernel::Heads32, t0, heads, h));
                            }
                        }
                    } else {
                        items.extend((0..nh).map(|h| AttnItem::new(Kernel::Token, t0, 1, h)));
                    }
                }
            }
            t += n;
        }
        let head_bytes = kv_type.row_bytes(hd);
        let out = SendPtr(ws.attn.as_mut_ptr());
        pool.run(items.len(), &|item| {
            let AttnItem {
                kind,
                t0,
                len,
                h,
                heads,
            } = items[item];
            let (t0, len, h, heads) = (t0 as usize, len as usize, h as usize, heads as usize);
            let (s, pos0) = (tok[t0].0 as usize, tok[t0].1 as usize);
            let cache = caches[s];
            let n_ctx = if kind == Kernel::Heads32 {
                pos0 + 1
            } else {
                pos0 + len
            };
            let head = (h / group) * head_bytes..(h / group + 1) * head_bytes;
            let row = cache.row_bytes();
            let keys = cache.key_blocks(l, n_ctx).flat_map(|b| b.chunks_exact(row));
            let values = cache
                .value_blocks(l, n_ctx)
                .flat_map(|b| b.chunks_exact(row));
            let kv = keys
                .zip(values)
                .map(|(k, v)| (&k[head.clone()], &v[head.clone()]));
            // SAFETY: each (token, head) owns its own `hd` outputs, and each item its own
            // (tokens, heads).
            let dst = |t: usize, h: usize| unsafe {
                std::slice::from_raw_parts_mut(out.get().add((t * nh + h) * hd), hd)
            };
            let qh = |t: usize, h: usize| &q[(t * nh + h) * hd..(t * nh + h + 1) * hd];
            if kv_type == KvType::Q8_0 && kind == Kernel::Tile16 {
                FLASH_SCRATCH.with(|cell| {
                    flash::attend_tile_q8(
                        hd,
                        len,
                        pos0,
                        |i| qh(t0 + i, h),
                        kv,
                        scale,
                        &mut cell.borrow_mut(),
                        |i, o| dst(t0 + i, h).copy_from_slice(o),
                    );
                });
                return;
            }
            if kv_type == KvType::Q8_0 {
                ATTN_SCRATCH.with(|cell| {
                    ops::attend_q8_0(qh(t0, h), kv, scale, &mut cell.borrow_mut(), dst(t0, h));
                });
                return;
            }
            let kv = kv.map(|(k, v)| (f16_row(k), f16_row(v)));
            match kind {
                Kernel::Token => ATTN_SCRATCH.with(|cell| {
                    ops::attend_f16(qh(t0, h), kv, scale, &mut cell.borrow_mut(), dst(t0, h));
                }),
                Kernel::Group => FLASH_SCRATCH.with(|cell| {
                    // Query k is token k / heads of head k % heads: token-major, so positions
                    // never decrease, and a short chunk fills the lanes with its heads.
                    let pos: [usize; flash::TILE * flash::MAX_GROUP] =
                        std::array::from_fn(|k| pos0 + k / heads);
                    let pos = &pos[..len * heads];
                    let mut tiles = [&pos[..0]; flash::MAX_GROUP];
                    for (t, chunk) in tiles.iter_mut().zip(pos.chunks(flash::TILE)) {
                        *t = chunk;
                    }
                    let tiles = &tiles[..pos.len().div_ceil(flash::TILE)];
                    let query = |g: usize, i: usize| (g * flash::TILE + i) / heads;
                    let head = |g: usize, i: usize| h + (g * flash::TILE + i) % heads;
                    flash::attend_tiles_f32(
                        hd,
                        tiles,
                        |g, i| qh(t0 + query(g, i), head(g, i)),
                        kv,
                        scale,
                        &mut cell.borrow_mut(),
                        |g, i, o| dst(t0 + query(g, i), head(g, i)).copy_from_slice(o),
                    );
                }),
                Kernel::Heads32 => FLASH_SCRATCH.with(|cell| {
                    flash::attend_tile_f32(
                        hd,
                        &[pos0; flash::TILE][..len],
                        |i| qh(t0, h + i),
                        kv,
                        scale,
                        &mut cell.borrow_mut(),
                        |i, o| dst(t0, h + i).copy_from_slice(o),
                    );
                }),
                Kernel::Tile16 => FLASH_SCRATCH.with(|cell| {
                    flash::attend_tile(
                        hd,
                        len,
                        pos0,
                        |i| qh(t0 + i, h),
                        kv,
                        scale,
                        &mut cell.borrow_mut(),
                        |i, o| dst(t0 + i, h).copy_from_slice(o),
                    );
                }),
            }
        });
    }

    /// The feed-forward block of `layer` over the first `n` rows of `ws.x`.
    fn ffn_block(&self, pool: &ThreadPool, ws: &mut Workspace, layer: &Layer, n: usize) {
        let c = &self.cfg;
        let (d, ff) = (n * c.d_model, n * c.d_ff);
        norm_rows(&ws.x[..d], &layer.ffn_norm, c.rms_eps, &mut ws.h[..d]);
        kernels::matmul(
            pool,
            &mut ws.scratch,
            &ws.h[..d],
            n,
            &mut [
                MatmulJob {
                    w: &layer.w_gate,
                    out: &mut ws.gate[..ff],
                },
                MatmulJob {
                    w: &layer.w_up,
                    out: &mut ws.up[..ff],
                },
            ],
        );
        ops::silu_mul(&mut ws.gate[..ff], &ws.up[..ff], c.d_ff);
        kernels::matmul(
            pool,
            &mut ws.scratch,
            &ws.gate[..ff],
            n,
            &mut [MatmulJob {
                w: &layer.w_down,
                out: &mut ws.proj[..d],
            }],
        );
        ops::add_assign(&mut ws.x[..d], &ws.proj[..d]);
    }
}

/// The f16 values of a stored f16 cache row (or part of one).
fn f16_row(bytes: &[u8]) -> &[half::f16] {
    debug_assert!((bytes.as_ptr() as usize).is_multiple_of(2) && bytes.len().is_multiple_of(2));
    // SAFETY: cache rows live in `u16` storage and heads start at even byte offsets, so the
    // bytes are aligned for `f16`, a plain 2-byte type.
    unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast(), bytes.len() / 2) }
}

/// RMS-normalises every row of `x` (rows of `weight.len()` floats) into `out`.
fn norm_rows(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let d = weight.len();
    for (x, out) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        ops::rms_norm(x, weight, eps, out);
    }
}

thread_local! {
    /// Per-thread attention scratch (the rounded query and the output accumulator).
    static ATTN_SCRATCH: RefCell<ops::AttnScratch> = RefCell::new(ops::AttnScratch::default());
    /// Per-thread scratch of the tiled attention.
    static FLASH_SCRATCH: RefCell<flash::FlashScratch> =
        RefCell::new(flash::FlashScratch::default());
}

/// The fewest tokens of one sequence in a forward pass for which attention takes the tiled
/// kernel.
const FLASH_MIN_TOKENS: usize = 16;

/// From this many positions of context, a token attended on its own (decoding) takes the f32
/// kernel with its key head's queries as lanes. This is where llama.cpp itself leaves its
/// per-token kernel for a split over threads (`use_split_kv_path`, 512 keys), so below it ferrum
/// decodes exactly as llama.cpp does, and above it neither reproduces the other bit for bit.
const DEEP_CONTEXT: usize = 512;

/// Which kernel an attention work item runs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kernel {
    /// One query on the exact per-token path (`ops::attend_f16` or `ops::attend_q8_0`).
    Token,
    /// Up to 16 consecutive queries of one head, replaying the per-token path exactly.
    Tile16,
    /// Up to 16 consecutive queries of `heads` heads that share a key head, in llama.cpp's
    /// tiled f32 arithmetic, token-major in the lanes (a short chunk fills them with heads).
    Group,
    /// Up to 16 heads of one token that share a key head, in the same f32 arithmetic.
    Heads32,
}

/// One attention work item: `len` tokens from `t0` of head `h` (`Heads32`: `len` heads from
/// `h` of token `t0`; `Group`: of `heads` heads from `h`).
#[derive(Clone, Copy)]
struct AttnItem {
    kind: Kernel,
    t0: u32,
    len: u16,
    h: u16,
    heads: u16,
}

impl AttnItem {
    fn new(kind: Kernel, t0: usize, len: usize, h: usize) -> Self {
        AttnItem {
            kind,
            t0: t0 as u32,
            len: len as u16,
            h: h as u16,
            heads: 1,
        }
    }

    fn group(t0: usize, len: usize, h: usize, heads: usize) -> Self {
        AttnItem {
            heads: heads as u16,
            ..AttnItem::new(Kernel::Group, t0, len, h)
        }
    }
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: attention chunks write disjoint head slices.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// Taking the pointer through a method makes closures capture the whole `Sync` wrapper.
    fn get(self) -> *mut f32 {
        self.0
    }
}
