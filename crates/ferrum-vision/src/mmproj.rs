//! An mmproj GGUF file (a vision encoder and its projector, as llama.cpp's converter writes
//! them) and its forward pass: patch embedding, the ViT blocks, then the projector into the
//! language model's embedding space.
//!
//! The arithmetic follows ggml's CPU backend where it is cheap to: layer norms summed in f64,
//! activations rounded to f16 before a product with an f16 weight (ggml's `vec_dot_type` for
//! f16 is f16, and `conv_2d` with an f16 kernel builds its patches in f16), GELU through f16
//! as ggml's lookup table does. Matrix products are candle's (f32 accumulation in its own
//! order), so results agree with llama.cpp to within rounding, not bit for bit; the tests
//! state the tolerance.

use std::fs::File;
use std::path::Path;

use std::sync::{Mutex, OnceLock};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QMatMul};
use candle_core::{Device, Tensor};
use ferrum_engine::kernels::gemm::Ptr;
use ferrum_engine::kernels::{self, MatmulJob, MatmulScratch, QMatrix, ThreadPool};
use ferrum_engine::TensorView;
use half::f16;

use crate::error::{Result, VisionError};

/// The projectors this crate runs (llama.cpp's `clip.projector_type` names).
pub const SUPPORTED_PROJECTORS: &[&str] = &["idefics3", "mlp"];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Projector {
    /// Idefics3 / SmolVLM: a SigLIP encoder, pixel shuffle by `scale_factor`, one linear map;
    /// images are tiled (`mtmd_image_preprocessor_idefics3`).
    Idefics3 { scale_factor: usize },
    /// LLaVA 1.5: a CLIP encoder (class token, pre-norm, the penultimate block's output) and a
    /// two-layer GELU MLP; one fixed-size image, padded.
    Mlp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Act {
    Gelu,
    GeluQuick,
    Silu,
}

/// The encoder's hyperparameters (`clip.vision.*`).
#[derive(Clone, Debug)]
pub struct VisionConfig {
    pub projector: Projector,
    pub image_size: usize,
    pub patch_size: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub n_layer: usize,
    pub eps: f32,
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
    /// Idefics3's `preproc_image_size`: the longer side images are resized to before tiling.
    pub longest_edge: usize,
    /// The width of an image token (the language model's embedding width).
    pub n_out: usize,
    act: Act,
}

impl VisionConfig {
    /// Image tokens one encoder input (a tile or a whole image) becomes.
    pub fn tokens_per_image(&self) -> usize {
        let side = self.image_size / self.patch_size;
        match self.projector {
            Projector::Idefics3 { scale_factor } => {
                let s = side.div_ceil(scale_factor);
                s * s
            }
            Projector::Mlp => side * side,
        }
    }
}

/// How the encoder's linear layers compute.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Precision {
    /// ggml's arithmetic where it matters (f16 weights times f16-rounded activations, summed in
    /// f32): within rounding of llama.cpp's embeddings. The reference the tests hold to
    /// llama.cpp.
    Exact,
    /// Weights quantized to Q8_0 at load time and activations to 8 bits per matmul, on the
    /// engine's integer (VNNI) GEMM: several times faster on CPUs, within a stated tolerance
    /// of `Exact` (tested).
    #[default]
    Int8,
}

/// The engine's thread pool and matmul buffers, shared by an encoder's layers.
struct Kernels {
    pool: ThreadPool,
    scratch: Mutex<MatmulScratch>,
}

enum Weight {
    /// f32 or f16 weights as an f32 `[in, out]` matrix; `f16_in` rounds inputs to f16 first.
    Dense { wt: Tensor, f16_in: bool },
    /// Q8_0 rows for the engine's kernels.
    Int8(QMatrix),
    /// Block-quantized weights (candle quantizes the input as ggml does).
    Quant(QMatMul),
}

struct Linear {
    w: Weight,
    b: Option<Vec<f32>>,
    out: usize,
}

struct Norm {
    w: Vec<f32>,
    b: Option<Vec<f32>>,
}

struct Block {
    ln1: Norm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    ln2: Norm,
    up: Linear,
    gate: Option<Linear>,
    down: Linear,
}

enum ProjWeights {
    Fc(Linear),
    Mlp(Linear, Option<Linear>),
}

/// A loaded mmproj: configuration and weights.
pub struct Mmproj {
    pub cfg: VisionConfig,
    pub precision: Precision,
    kernels: Kernels,
    patch: Linear,
    pos: Vec<f32>,
    n_pos: usize,
    class: Option<Vec<f32>>,
    pre_ln: Option<Norm>,
    post_ln: Option<Norm>,
    blocks: Vec<Block>,
    proj: ProjWeights,
}

struct Reader<'a> {
    path: &'a Path,
    content: Content,
    file: File,
    precision: Precision,
}

impl Reader<'_> {
    fn err(&self, message: impl Into<String>) -> VisionError {
        VisionError::Load {
            path: self.path.display().to_string(),
            message: message.into(),
        }
    }

    fn meta(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    fn u32(&self, key: &str) -> Result<Option<usize>> {
        self.meta(key)
            .map(|v| {
                v.to_u32()
                    .map(|x| x as usize)
                    .or_else(|_| v.to_i32().map(|x| x.max(0) as usize))
                    .map_err(|_| self.err(format!("{key} is not an integer")))
            })
            .transpose()
    }

    fn req_u32(&self, key: &str) -> Result<usize> {
        self.u32(key)?
            .ok_or_else(|| self.err(format!("missing metadata {key}")))
    }

    fn f32s(&self, key: &str) -> Result<Option<Vec<f32>>> {
        let Some(v) = self.meta(key) else {
            return Ok(None);
        };
        let list = v
            .to_vec()
            .map_err(|_| self.err(format!("{key} is not an array")))?;
        list.iter()
            .map(|x| {
                x.to_f32()
                    .map_err(|_| self.err(format!("{key}: not floats")))
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    fn has(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    fn floats(&mut self, name: &str) -> Result<Option<Vec<f32>>> {
        if !self.has(name) {
            return Ok(None);
        }
        let t = self
            .content
            .tensor(&mut self.file, name, &Device::Cpu)
            .map_err(|e| self.err(format!("{name}: {e}")))?;
        let t = t.dequantize(&Device::Cpu)?.flatten_all()?;
        Ok(Some(t.to_vec1::<f32>()?))
    }

    fn req_floats(&mut self, name: &str) -> Result<Vec<f32>> {
        self.floats(name)?
            .ok_or_else(|| self.err(format!("missing tensor {name}")))
    }

    fn linear(&mut self, prefix: &str) -> Result<Option<Linear>> {
        let name = format!("{prefix}.weight");
        if !self.has(&name) {
            return Ok(None);
        }
        let q = self
            .content
            .tensor(&mut self.file, &name, &Device::Cpu)
            .map_err(|e| self.err(format!("{name}: {e}")))?;
        let dims = q.shape().dims().to_vec();
        let out = dims[0];
        let inner: usize = dims[1..].iter().product();
        let w = match q.dtype() {
            _ if self.precision == Precision::Int8 && inner.is_multiple_of(32) => {
                let w = q
                    .dequantize(&Device::Cpu)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                let rb = kernels::row_bytes(GgmlDType::Q8_0, inner);
                let mut bytes = vec![0u8; rb * out];
                for (row, o) in w.chunks_exact(inner).zip(bytes.chunks_exact_mut(rb)) {
                    kernels::quantize_row(GgmlDType::Q8_0, row, o);
                }
                let view = TensorView::from_bytes(&name, GgmlDType::Q8_0, vec![inner, out], &bytes)
                    .map_err(|e| self.err(format!("{name}: {e}")))?;
                Weight::Int8(QMatrix::new(view))
            }
            dt @ (GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16) => {
                let wt = q
                    .dequantize(&Device::Cpu)?
                    .reshape((out, inner))?
                    .t()?
                    .contiguous()?;
                Weight::Dense {
                    wt,
                    f16_in: dt == GgmlDType::F16,
                }
            }
            _ => Weight::Quant(QMatMul::from_qtensor(q)?),
        };
        let b = self.floats(&format!("{prefix}.bias"))?;
        Ok(Some(Linear { w, b, out }))
    }

    fn req_linear(&mut self, prefix: &str) -> Result<Linear> {
        self.linear(prefix)?
            .ok_or_else(|| self.err(format!("missing tensor {prefix}.weight")))
    }

    fn norm(&mut self, prefix: &str) -> Result<Option<Norm>> {
        let Some(w) = self.floats(&format!("{prefix}.weight"))? else {
            return Ok(None);
        };
        let b = self.floats(&format!("{prefix}.bias"))?;
        Ok(Some(Norm { w, b }))
    }

    fn req_norm(&mut self, prefix: &str) -> Result<Norm> {
        self.norm(prefix)?
            .ok_or_else(|| self.err(format!("missing tensor {prefix}.weight")))
    }
}

fn round_f16(x: &mut [f32]) {
    for v in x {
        *v = f16::from_f32(*v).to_f32();
    }
}

impl Linear {
    /// `x` is `n` rows of the input width; returns `n` rows of `self.out`.
    fn forward(&self, k: &Kernels, x: &[f32], n: usize) -> Result<Vec<f32>> {
        let inner = x.len() / n;
        let mut y = match &self.w {
            Weight::Int8(m) => {
                let mut y = vec![0f32; n * self.out];
                let mut scratch = k.scratch.lock().expect("matmul scratch");
                kernels::matmul(
                    &k.pool,
                    &mut scratch,
                    x,
                    n,
                    &mut [MatmulJob { w: m, out: &mut y }],
                );
                y
            }
            Weight::Dense { wt, f16_in } => {
                let t = if *f16_in {
                    let mut r = x.to_vec();
                    round_f16(&mut r);
                    Tensor::from_vec(r, (n, inner), &Device::Cpu)?
                } else {
                    Tensor::from_slice(x, (n, inner), &Device::Cpu)?
                };
                t.matmul(wt)?.flatten_all()?.to_vec1::<f32>()?
            }
            Weight::Quant(m) => {
                use candle_core::Module;
                let t = Tensor::from_slice(x, (n, inner), &Device::Cpu)?;
                m.forward(&t)?.flatten_all()?.to_vec1::<f32>()?
            }
        };
        if let Some(b) = &self.b {
            for row in y.chunks_exact_mut(self.out) {
                for (v, b) in row.iter_mut().zip(b) {
                    *v += b;
                }
            }
        }
        Ok(y)
    }
}

impl Norm {
    /// ggml's `norm` (mean and variance summed in f64) then the affine part, rows in
    /// parallel.
    fn forward(&self, pool: &ThreadPool, x: &[f32], eps: f32) -> Vec<f32> {
        let d = self.w.len();
        let mut y = x.to_vec();
        par_chunks(pool, &mut y, d * 16, |part| self.rows(part, eps));
        y
    }

    fn rows(&self, y: &mut [f32], eps: f32) {
        let d = self.w.len();
        for out in y.chunks_exact_mut(d) {
            let mean = (out.iter().map(|&v| f64::from(v)).sum::<f64>() / d as f64) as f32;
            let mut sum2 = 0f64;
            for o in out.iter_mut() {
                *o -= mean;
                sum2 += f64::from(*o * *o);
            }
            let var = (sum2 / d as f64) as f32;
            let scale = 1.0 / (var + eps).sqrt();
            for (i, o) in out.iter_mut().enumerate() {
                *o = *o * scale * self.w[i] + self.b.as_ref().map_or(0.0, |b| b[i]);
            }
        }
    }
}

fn gelu_f32(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * x * (1.0 + 0.044715 * x * x)).tanh())
}

fn gelu_quick_f32(x: f32) -> f32 {
    x * (1.0 / (1.0 + (-1.702 * x).exp()))
}

/// ggml's tables: the f16 result of `f` for every f16 input (`ggml_table_gelu_f16`).
fn table(f: fn(f32) -> f32) -> Box<[f16]> {
    (0..=u16::MAX)
        .map(|bits| f16::from_f32(f(f16::from_bits(bits).to_f32())))
        .collect()
}

fn gelu(x: f32) -> f32 {
    // ggml's GELU looks up the f16 input in a table of f16 outputs, outside [-10, 10] exact.
    static T: OnceLock<Box<[f16]>> = OnceLock::new();
    if x <= -10.0 {
        return 0.0;
    }
    if x >= 10.0 {
        return x;
    }
    T.get_or_init(|| table(gelu_f32))[f16::from_f32(x).to_bits() as usize].to_f32()
}

fn gelu_quick(x: f32) -> f32 {
    static T: OnceLock<Box<[f16]>> = OnceLock::new();
    T.get_or_init(|| table(gelu_quick_f32))[f16::from_f32(x).to_bits() as usize].to_f32()
}

fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// Applies `f` to chunks of `x` in parallel on the pool.
fn par_chunks(pool: &ThreadPool, x: &mut [f32], chunk: usize, f: impl Fn(&mut [f32]) + Sync) {
    let n = x.len().div_ceil(chunk);
    let (ptr, len) = (Ptr(x.as_mut_ptr()), x.len());
    pool.run(n, &|c| {
        let start = c * chunk;
        let end = (start + chunk).min(len);
        // SAFETY: chunk c is this task's alone, inside `x`.
        f(unsafe { std::slice::from_raw_parts_mut(ptr.get().add(start), end - start) })
    });
}

impl Act {
    fn apply(self, pool: &ThreadPool, x: &mut [f32]) {
        let f = match self {
            Act::Gelu => gelu,
            Act::GeluQuick => gelu_quick,
            Act::Silu => silu,
        };
        par_chunks(pool, x, 1 << 14, |part| {
            for v in part {
                *v = f(*v);
            }
        });
    }
}

impl Mmproj {
    /// Reads an mmproj GGUF file; refuses projector types this crate does not run. Linear
    /// layers compute at `precision`, on `threads` threads (the engine's parking pool).
    pub fn load(path: &Path, precision: Precision, threads: usize) -> Result<Self> {
        let load_err = |m: String| VisionError::Load {
            path: path.display().to_string(),
            message: m,
        };
        let mut file = File::open(path).map_err(|e| load_err(e.to_string()))?;
        let content = Content::read(&mut file).map_err(|e| load_err(format!("not GGUF: {e}")))?;
        let mut r = Reader {
            path,
            content,
            file,
            precision,
        };
        let projector = ["clip.vision.projector_type", "clip.projector_type"]
            .iter()
            .find_map(|k| r.meta(k).and_then(|v| v.to_string().ok().cloned()))
            .ok_or_else(|| r.err("missing clip.projector_type: not an mmproj file"))?;
        let has_vision = r
            .meta("clip.has_vision_encoder")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(false);
        if !has_vision {
            return Err(r.err("this mmproj has no vision encoder (clip.has_vision_encoder)"));
        }
        let projector = match projector.as_str() {
            "idefics3" => Projector::Idefics3 {
                scale_factor: r
                    .u32("clip.vision.projector.scale_factor")?
                    .unwrap_or(1)
                    .max(1),
            },
            "mlp" => Projector::Mlp,
            other => {
                return Err(VisionError::UnsupportedProjector {
                    path: path.display().to_string(),
                    projector: other.to_string(),
                })
            }
        };
        let flag = |r: &Reader, k: &str| r.meta(k).and_then(|v| v.to_bool().ok()) == Some(true);
        let act = match (flag(&r, "clip.use_gelu"), flag(&r, "clip.use_silu")) {
            (true, true) => return Err(r.err("both clip.use_gelu and clip.use_silu are set")),
            (true, false) => Act::Gelu,
            (false, true) => Act::Silu,
            (false, false) => Act::GeluQuick,
        };
        let three = |v: Option<Vec<f32>>, key: &str| -> Result<[f32; 3]> {
            match v {
                Some(v) if v.len() >= 3 => Ok([v[0], v[1], v[2]]),
                _ => Err(VisionError::Load {
                    path: path.display().to_string(),
                    message: format!("{key} needs 3 values"),
                }),
            }
        };
        let n_embd = r.req_u32("clip.vision.embedding_length")?;
        let n_head = r.req_u32("clip.vision.attention.head_count")?;
        let n_layer = r.req_u32("clip.vision.block_count")?;
        let image_size = r.req_u32("clip.vision.image_size")?;
        let patch_size = r.req_u32("clip.vision.patch_size")?;
        if patch_size == 0 || image_size % patch_size != 0 || n_head == 0 || n_embd % n_head != 0 {
            return Err(r.err("inconsistent image, patch or head sizes"));
        }
        let eps = r
            .meta("clip.vision.attention.layer_norm_epsilon")
            .and_then(|v| v.to_f32().ok())
            .unwrap_or(1e-6);
        let image_mean = three(r.f32s("clip.vision.image_mean")?, "clip.vision.image_mean")?;
        let image_std = three(r.f32s("clip.vision.image_std")?, "clip.vision.image_std")?;
        let longest_edge = r.u32("clip.vision.preproc_image_size")?.unwrap_or(0);

        let patch = r.req_linear("v.patch_embd")?;
        let pos = r.req_floats("v.position_embd.weight")?;
        let n_pos = pos.len() / n_embd;
        let class = r.floats("v.class_embd")?;
        let pre_ln = r.norm("v.pre_ln")?;
        let post_ln = r.norm("v.post_ln")?;
        let mut blocks = Vec::with_capacity(n_layer);
        for il in 0..n_layer {
            let p = |s: &str| format!("v.blk.{il}.{s}");
            if r.has(&p("attn_qkv.weight")) {
                return Err(r.err("fused attn_qkv weights are not supported"));
            }
            let mut up = r.req_linear(&p("ffn_up"))?;
            let mut down = r.req_linear(&p("ffn_down"))?;
            // Old conversions swapped up and down (clip.cpp's `is_ffn_swapped`).
            if down.out != n_embd {
                std::mem::swap(&mut up, &mut down);
            }
            blocks.push(Block {
                ln1: r.req_norm(&p("ln1"))?,
                q: r.req_linear(&p("attn_q"))?,
                k: r.req_linear(&p("attn_k"))?,
                v: r.req_linear(&p("attn_v"))?,
                o: r.req_linear(&p("attn_out"))?,
                ln2: r.req_norm(&p("ln2"))?,
                up,
                gate: r.linear(&p("ffn_gate"))?,
                down,
            });
        }
        let (proj, n_out) = match projector {
            Projector::Idefics3 { .. } => {
                let fc = r.req_linear("mm.model.fc")?;
                let out = fc.out;
                (ProjWeights::Fc(fc), out)
            }
            Projector::Mlp => {
                let m0 = r.req_linear("mm.0")?;
                let m2 = r.linear("mm.2")?;
                let out = m2.as_ref().map_or(m0.out, |m| m.out);
                (ProjWeights::Mlp(m0, m2), out)
            }
        };
        let cfg = VisionConfig {
            projector,
            image_size,
            patch_size,
            n_embd,
            n_head,
            n_layer,
            eps,
            image_mean,
            image_std,
            longest_edge,
            n_out,
            act,
        };
        let side = image_size / patch_size;
        let need = side * side + usize::from(class.is_some());
        if n_pos < need {
            return Err(r.err(format!("{n_pos} position embeddings for {need} positions")));
        }
        Ok(Mmproj {
            cfg,
            precision,
            kernels: Kernels {
                pool: ThreadPool::new(threads.max(1)),
                scratch: Mutex::new(MatmulScratch::default()),
            },
            patch,
            pos,
            n_pos,
            class,
            pre_ln,
            post_ln,
            blocks,
            proj,
        })
    }

    /// Encodes one preprocessed image of the encoder's size (planar, normalised) into image
    /// tokens: `tokens_per_image()` rows of `n_out` floats.
    pub fn encode(&self, pixels: &[f32], width: usize, height: usize) -> Result<Vec<f32>> {
        let c = &self.cfg;
        let ps = c.patch_size;
        let (px, py) = (width / ps, height / ps);
        let n_patches = px * py;
        if pixels.len() != 3 * width * height || n_patches == 0 {
            return Err(VisionError::Compute(format!(
                "encoder input of {} floats for {width}x{height}",
                pixels.len()
            )));
        }
        let e = c.n_embd;
        // im2col: one row per patch (row-major over the patch grid), (channel, y, x) inside.
        let k = 3 * ps * ps;
        let mut cols = vec![0f32; n_patches * k];
        let plane = width * height;
        for y in 0..py {
            for x in 0..px {
                let row = &mut cols[(y * px + x) * k..(y * px + x + 1) * k];
                for ch in 0..3 {
                    for ky in 0..ps {
                        let src = ch * plane + (y * ps + ky) * width + x * ps;
                        let dst = ch * ps * ps + ky * ps;
                        row[dst..dst + ps].copy_from_slice(&pixels[src..src + ps]);
                    }
                }
            }
        }
        // ggml's conv_2d builds its patches (im2col) in f16 whatever the kernel's type.
        round_f16(&mut cols);
        let mut h = self.patch.forward(&self.kernels, &cols, n_patches)?;
        // CLIP's class token goes after the patches in llama.cpp's graph (`ggml_concat`).
        let n = n_patches + usize::from(self.class.is_some());
        if let Some(class) = &self.class {
            h.extend_from_slice(class);
        }
        if n > self.n_pos {
            return Err(VisionError::Compute(format!(
                "{n} positions, the encoder has {}",
                self.n_pos
            )));
        }
        for (v, p) in h.iter_mut().zip(&self.pos[..n * e]) {
            *v += p;
        }
        if let Some(ln) = &self.pre_ln {
            h = ln.forward(&self.kernels.pool, &h, c.eps);
        }
        // LLaVA takes the penultimate block's output (clip.cpp's default feature layer).
        let layers = match c.projector {
            Projector::Mlp => c.n_layer.saturating_sub(1),
            Projector::Idefics3 { .. } => c.n_layer,
        };
        for b in &self.blocks[..layers] {
            self.block(b, &mut h, n)?;
        }
        if let Some(ln) = &self.post_ln {
            h = ln.forward(&self.kernels.pool, &h, c.eps);
        }
        match &self.proj {
            ProjWeights::Fc(fc) => {
                let Projector::Idefics3 { scale_factor } = c.projector else {
                    unreachable!("fc projector is idefics3's")
                };
                let shuffled = pixel_shuffle(&h, e, px, py, scale_factor);
                let rows = shuffled.len() / (e * scale_factor * scale_factor);
                fc.forward(&self.kernels, &shuffled, rows)
            }
            ProjWeights::Mlp(m0, m2) => {
                // Rows 1..=n_patches (llama.cpp's `patches` input skips row 0 when there is
                // a class embedding, which its graph placed last).
                let skip = usize::from(self.class.is_some());
                let rows = &h[skip * e..(skip + n_patches) * e];
                let mut y = m0.forward(&self.kernels, rows, n_patches)?;
                Act::Gelu.apply(&self.kernels.pool, &mut y);
                match m2 {
                    Some(m2) => m2.forward(&self.kernels, &y, n_patches),
                    None => Ok(y),
                }
            }
        }
    }

    fn block(&self, b: &Block, h: &mut [f32], n: usize) -> Result<()> {
        let c = &self.cfg;
        let kn = &self.kernels;
        let e = c.n_embd;
        let x = b.ln1.forward(&kn.pool, h, c.eps);
        let q = b.q.forward(kn, &x, n)?;
        let k = b.k.forward(kn, &x, n)?;
        let v = b.v.forward(kn, &x, n)?;
        let attn = attention(&kn.pool, &q, &k, &v, n, c.n_head, e / c.n_head)?;
        let o = b.o.forward(kn, &attn, n)?;
        for (hv, ov) in h.iter_mut().zip(&o) {
            *hv += ov;
        }
        let x = b.ln2.forward(&kn.pool, h, c.eps);
        let mut up = b.up.forward(kn, &x, n)?;
        match &b.gate {
            Some(g) => {
                let mut gate = g.forward(kn, &x, n)?;
                c.act.apply(&kn.pool, &mut gate);
                for (u, g) in up.iter_mut().zip(&gate) {
                    *u *= g;
                }
            }
            None => c.act.apply(&kn.pool, &mut up),
        }
        let down = b.down.forward(kn, &up, n)?;
        for (hv, dv) in h.iter_mut().zip(&down) {
            *hv += dv;
        }
        Ok(())
    }
}

/// Full (bidirectional) multi-head attention over `n` positions; `q`, `k`, `v` are `[n][heads
/// * dh]`, the result likewise.
///
/// This is ggml's CPU flash attention, which mtmd runs by default, on the engine's kernels:
/// keys and values in f16; from 64 positions llama.cpp's tiled f32 kernel (the engine's
/// `attend_tiles_f32`, every query placed at the last position so it sees every key), below
/// that its one-chunk kernel (`attend_f16`: f16 query and accumulator). Heads and blocks of 64
/// queries run in parallel on the pool.
fn attention(
    pool: &ThreadPool,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    n: usize,
    heads: usize,
    dh: usize,
) -> Result<Vec<f32>> {
    use ferrum_engine::attention::{
        attend_f16, attend_tiles_f32, tiled_available, AttnScratch, FlashScratch, TILE,
    };
    let e = heads * dh;
    let scale = 1.0 / (dh as f32).sqrt();
    let k16: Vec<f16> = k.iter().map(|&x| f16::from_f32(x)).collect();
    let v16: Vec<f16> = v.iter().map(|&x| f16::from_f32(x)).collect();
    let (k16, v16) = (&k16[..], &v16[..]);
    let kv = move |h: usize| {
        (0..n).map(move |p| {
            let r = p * e + h * dh;
            (&k16[r..r + dh], &v16[r..r + dh])
        })
    };
    let mut out = vec![0f32; n * e];
    let ptr = Ptr(out.as_mut_ptr());
    let write = move |p: usize, h: usize, row: &[f32]| {
        // SAFETY: (p, h) is written by one task only; the slice is inside `out`.
        unsafe {
            std::slice::from_raw_parts_mut(ptr.get().add(p * e + h * dh), dh).copy_from_slice(row)
        }
    };
    let tiled = n >= 64 && tiled_available() && dh.is_multiple_of(16);
    const QUERIES: usize = 4 * TILE;
    let per_head = n.div_ceil(QUERIES);
    pool.run(heads * per_head, &|c| {
        let (h, first) = (c / per_head, (c % per_head) * QUERIES);
        let last = (first + QUERIES).min(n);
        if tiled {
            let at_end = [n - 1; TILE];
            let tiles: Vec<&[usize]> = (first..last)
                .step_by(TILE)
                .map(|t| &at_end[..TILE.min(last - t)])
                .collect();
            let mut scratch = FlashScratch::default();
            attend_tiles_f32(
                dh,
                &tiles,
                |g, i| {
                    let p = first + g * TILE + i;
                    &q[p * e + h * dh..p * e + (h + 1) * dh]
                },
                kv(h),
                scale,
                &mut scratch,
                |g, i, row| write(first + g * TILE + i, h, row),
            );
        } else {
            let mut scratch = AttnScratch::default();
            let mut row = vec![0f32; dh];
            for p in first..last {
                attend_f16(
                    &q[p * e + h * dh..p * e + (h + 1) * dh],
                    kv(h),
                    scale,
                    &mut scratch,
                    &mut row,
                );
                write(p, h, &row);
            }
        }
    });
    Ok(out)
}

/// Idefics3's pixel shuffle as llama.cpp's `build_patch_merge_permute` computes it: the grid
/// padded to a multiple of `s`, then each `s`x`s` block of patch vectors concatenated (row by
/// row) into one token, tokens in row-major block order.
fn pixel_shuffle(x: &[f32], e: usize, w: usize, h: usize, s: usize) -> Vec<f32> {
    let (wp, hp) = (w.div_ceil(s) * s, h.div_ceil(s) * s);
    let (bw, bh) = (wp / s, hp / s);
    let mut out = vec![0f32; bw * bh * s * s * e];
    for by in 0..bh {
        for bx in 0..bw {
            let tok = by * bw + bx;
            for dy in 0..s {
                for dx in 0..s {
                    let (yy, xx) = (by * s + dy, bx * s + dx);
                    if yy >= h || xx >= w {
                        continue;
                    }
                    let dst = (tok * s * s + dy * s + dx) * e;
                    let src = (yy * w + xx) * e;
                    out[dst..dst + e].copy_from_slice(&x[src..src + e]);
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pixel_shuffle_matches_ggml_reshapes() {
        // 4x2 patches of width 1, values = their index; s = 2.
        let x: Vec<f32> = (0..8).map(|i| i as f32).collect();
        let out = pixel_shuffle(&x, 1, 4, 2, 2);
        // Block (0,0): patches (0,0),(0,1),(1,0),(1,1) = 0,1,4,5; block (0,1): 2,3,6,7.
        assert_eq!(out, vec![0., 1., 4., 5., 2., 3., 6., 7.]);
    }

    #[test]
    fn gelu_goes_through_f16_like_ggml() {
        assert_eq!(gelu(0.0), 0.0);
        assert_eq!(gelu(-11.0), 0.0);
        assert_eq!(gelu(12.5), 12.5);
        let y = gelu(1.0);
        assert!((y - 0.8412).abs() < 1e-3);
        assert_eq!(y, f16::from_f32(y).to_f32());
    }
}
