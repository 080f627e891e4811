//! Elementwise and row-wise f32 operations of a transformer forward pass (norms, RoPE, softmax,
//! activations). They follow ggml's arithmetic (e.g. f64 accumulation in RMS norm) so logits
//! stay close to llama.cpp's.

/// `out = x / rms(x) * weight`, one row of `weight.len()` elements.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let sum: f64 = x.iter().map(|&v| (v * v) as f64).sum();
    let mean = (sum / x.len() as f64) as f32;
    let scale = 1.0 / (mean + eps).sqrt();
    for ((o, &v), &w) in out.iter_mut().zip(x).zip(weight) {
        *o = v * scale * w;
    }
}

/// How rotary position embeddings pair up the dimensions of a head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeStyle {
    /// Adjacent pairs `(2i, 2i+1)`: llama-family GGUFs (whose Q/K weights the converter permuted).
    Interleaved,
    /// Halves `(i, i + d/2)`: GPT-NeoX style, used by Qwen2 and Gemma.
    Neox,
}

/// Rotary position scaling: stretches the positions a model was trained on over a longer
/// context. Read from the GGUF's `<arch>.rope.scaling.*` keys, or set per tier in the config.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RopeScaling {
    /// Position interpolation: every angle divided by `factor`.
    Linear { factor: f32 },
    /// YaRN (Peng et al. 2023, as llama.cpp computes it): high-frequency dimensions keep their
    /// angles, low-frequency ones are interpolated by `factor`, with a linear ramp between the
    /// dimensions that turn `beta_fast` and `beta_slow` times over `original_context`
    /// positions, and every rotation scaled by `1 + 0.1 ln(factor)` (the attention
    /// temperature).
    Yarn {
        factor: f32,
        original_context: usize,
        beta_fast: f32,
        beta_slow: f32,
    },
}

impl RopeScaling {
    /// YaRN with llama.cpp's default betas (32 and 1).
    pub fn yarn(factor: f32, original_context: usize) -> Self {
        RopeScaling::Yarn {
            factor,
            original_context,
            beta_fast: 32.0,
            beta_slow: 1.0,
        }
    }

    pub fn factor(&self) -> f32 {
        match *self {
            RopeScaling::Linear { factor } | RopeScaling::Yarn { factor, .. } => factor,
        }
    }
}

/// Precomputed inverse frequencies of RoPE, as ggml computes them.
#[derive(Clone, Debug)]
pub struct Rope {
    pub style: RopeStyle,
    /// Rotated dimensions per head (may be less than the head size).
    pub dims: usize,
    theta_scale: f32,
    /// `None` for plain RoPE.
    scaled: Option<ScaledRope>,
}

/// The constants of ggml's `rope_yarn` for a scaled RoPE.
#[derive(Clone, Debug)]
struct ScaledRope {
    freq_scale: f32,
    /// 1 for YaRN (mix interpolated and extrapolated angles), 0 for linear scaling.
    ext_factor: f32,
    /// What cos and sin are multiplied by.
    mscale: f32,
    /// The first and last dimension pair of the YaRN ramp.
    corr: [f32; 2],
}

impl ScaledRope {
    fn new(scaling: RopeScaling, dims: usize, base: f32) -> Self {
        let freq_scale = 1.0 / scaling.factor();
        match scaling {
            RopeScaling::Linear { .. } => ScaledRope {
                freq_scale,
                ext_factor: 0.0,
                mscale: 1.0,
                corr: [0.0, 0.0],
            },
            RopeScaling::Yarn {
                original_context,
                beta_fast,
                beta_slow,
                ..
            } => {
                // llama.cpp's context setup sets the attention factor to the YaRN magnitude
                // scale and then cancels it (llama-context.cpp: `yarn_attn_factor`), in plain
                // f32 arithmetic; `rope_yarn` multiplies the magnitude scale back in, with a
                // fused multiply-add in the -march=native build.
                let factor = 1.0 / freq_scale;
                let ln = factor.ln();
                let mut attn = if factor <= 1.0 {
                    1.0
                } else {
                    0.1f32 * ln + 1.0
                };
                attn *= 1.0 / (1.0 + 0.1f32 * ln);
                let mscale = attn * 0.1f32.mul_add((1.0 / freq_scale).ln(), 1.0);
                // ggml_rope_yarn_corr_dims.
                let corr_dim = |n_rot: f32| {
                    dims as f32
                        * (original_context as f32 / (n_rot * 2.0 * std::f32::consts::PI)).ln()
                        / (2.0 * base.ln())
                };
                let start = corr_dim(beta_fast).floor();
                let end = corr_dim(beta_slow).ceil();
                ScaledRope {
                    freq_scale,
                    ext_factor: 1.0,
                    mscale,
                    corr: [start.max(0.0), end.min(dims as f32 - 1.0)],
                }
            }
        }
    }

    /// ggml's `rope_yarn` for dimension pair `i` at angle `theta` (the unscaled one).
    fn cos_sin(&self, theta: f32, i: usize) -> (f32, f32) {
        let interp = self.freq_scale * theta;
        let mut angle = interp;
        if self.ext_factor != 0.0 {
            let [low, high] = self.corr;
            let y = (i as f32 - low) / 0.001f32.max(high - low);
            let ramp = (1.0 - y.clamp(0.0, 1.0)) * self.ext_factor;
            // `interp * (1 - ramp) + theta * ramp`, contracted as GCC does.
            angle = interp.mul_add(1.0 - ramp, theta * ramp);
        }
        (angle.cos() * self.mscale, angle.sin() * self.mscale)
    }
}

impl Rope {
    pub fn new(style: RopeStyle, dims: usize, base: f32, scaling: Option<RopeScaling>) -> Self {
        Rope {
            style,
            dims,
            theta_scale: base.powf(-2.0 / dims as f32),
            scaled: scaling.map(|s| ScaledRope::new(s, dims, base)),
        }
    }

    /// The `(cos, sin)` table for position `pos`: `dims / 2` entries each.
    pub fn cos_sin(&self, pos: usize, cos: &mut [f32], sin: &mut [f32]) {
        // ggml multiplies the angle by theta_scale step by step in f32; doing the same keeps
        // the rotation bit-close to llama.cpp's.
        let mut theta = pos as f32;
        for i in 0..self.dims / 2 {
            (cos[i], sin[i]) = match &self.scaled {
                None => (theta.cos(), theta.sin()),
                Some(s) => s.cos_sin(theta, i),
            };
            theta *= self.theta_scale;
        }
    }

    /// Rotates every head in `x` (`n_heads * head_dim` floats) with a `(cos, sin)` table.
    pub fn apply(&self, x: &mut [f32], head_dim: usize, cos: &[f32], sin: &[f32]) {
        let half = self.dims / 2;
        for head in x.chunks_exact_mut(head_dim) {
            match self.style {
                RopeStyle::Interleaved => {
                    for i in 0..half {
                        let (a, b) = (head[2 * i], head[2 * i + 1]);
                        (head[2 * i], head[2 * i + 1]) = rotate(a, b, cos[i], sin[i]);
                    }
                }
                RopeStyle::Neox => {
                    for i in 0..half {
                        let (a, b) = (head[i], head[i + half]);
                        (head[i], head[i + half]) = rotate(a, b, cos[i], sin[i]);
                    }
                }
            }
        }
    }
}

/// One RoPE rotation of the pair `(a, b)`, rounded as llama.cpp's CPU build computes it: GCC
/// contracts `a*cos - b*sin` and `a*sin + b*cos` into fused multiply-adds on the first product.
#[inline]
fn rotate(a: f32, b: f32, cos: f32, sin: f32) -> (f32, f32) {
    (a.mul_add(cos, -(b * sin)), a.mul_add(sin, b * cos))
}

/// `gate = silu(gate) * up` (SwiGLU) for rows of `width` values, as ggml's
/// `ggml_vec_swiglu_f32` computes it: `x / (1 + exp(-x)) * g` with ggml's vectorised `expf`
/// ([`ggml_expf`]) on whole 16-lane vectors and libm's `expf` on a row's last `width % 16`.
pub fn silu_mul(gate: &mut [f32], up: &[f32], width: usize) {
    let simd = width - width % 16;
    for (g, u) in gate.chunks_exact_mut(width).zip(up.chunks_exact(width)) {
        let (gv, gt) = g.split_at_mut(simd);
        silu_mul_vec(gv, &u[..simd]);
        for (g, &u) in gt.iter_mut().zip(&u[simd..]) {
            *g = *g / (1.0 + (-*g).exp()) * u;
        }
    }
}

/// [`silu_mul`]'s vector part (whole 16-lane vectors).
fn silu_mul_vec(gate: &mut [f32], up: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_f16c() {
        // SAFETY: features checked above; the slices have equal lengths, multiples of 16.
        return unsafe { x86::silu_mul(gate, up) };
    }
    silu_mul_scalar(gate, up);
}

/// [`silu_mul`]'s vector part, lane by lane.
fn silu_mul_scalar(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + ggml_expf(-*g)) * u;
    }
}

// ggml_v_expf's constants (vec.h), as bits: 0x1.8p23, 0x1.715476p+0, 0x1.62e4p-1,
// 0x1.7f7d1cp-20, then the polynomial's 0x1.0e4020p-7, 0x1.573e2ep-5, 0x1.555e66p-3,
// 0x1.fffdb6p-2, 0x1.ffffecp-1.
pub(crate) const EXP_SHIFT: u32 = 0x4b40_0000;
pub(crate) const EXP_LOG2E: u32 = 0x3fb8_aa3b;
pub(crate) const EXP_LN2_HI: u32 = 0x3f31_7200;
pub(crate) const EXP_LN2_LO: u32 = 0x35bf_be8e;
pub(crate) const EXP_POLY: [u32; 5] = [
    0x3c07_2010,
    0x3d2b_9f17,
    0x3e2a_af33,
    0x3eff_fedb,
    0x3f7f_fff6,
];

/// ggml's vectorised `expf` (`ggml_v_expf`, the AVX-512 version llama.cpp's x86 build uses),
/// lane by lane: `2^n · p(b)` with `n = round(x · log2 e)`, `b = x - n · ln 2` and a degree-5
/// polynomial; `|n| > 192` gives 0 or infinity.
pub fn ggml_expf(x: f32) -> f32 {
    let c = |b: u32| f32::from_bits(b);
    let r = c(EXP_SHIFT);
    let n = x.mul_add(c(EXP_LOG2E), r) - r;
    let b = (-n).mul_add(c(EXP_LN2_LO), (-n).mul_add(c(EXP_LN2_HI), x));
    let u = b * b;
    let j = c(EXP_POLY[0])
        .mul_add(b, c(EXP_POLY[1]))
        .mul_add(u, c(EXP_POLY[2]).mul_add(b, c(EXP_POLY[3])))
        .mul_add(u, c(EXP_POLY[4]).mul_add(b, 1.0));
    if n.abs() > 192.0 {
        return if n <= 0.0 { 0.0 } else { f32::INFINITY };
    }
    // `_mm512_scalef_ps(j, n)`: two exact power-of-two factors, so only the last product rounds.
    let ni = n as i32;
    let (n1, n2) = (ni >> 1, ni - (ni >> 1));
    j * pow2(n1) * pow2(n2)
}

/// `2^n` for `-126 <= n <= 127`.
fn pow2(n: i32) -> f32 {
    f32::from_bits(((n + 127) as u32) << 23)
}

/// The orthonormal Walsh-Hadamard transform of every `n`-element chunk of `x` (`n` a power of
/// two), as ggml's CPU `fwht` computes it: each value scaled by `1/sqrt(n)` first, then the
/// butterflies `(u + v, u - v)` at distances 1, 2, 4, ... The transform is its own inverse.
pub fn fwht(x: &mut [f32], n: usize) {
    debug_assert!(n.is_power_of_two() && x.len().is_multiple_of(n));
    let scale = 1.0 / (n as f32).sqrt();
    for row in x.chunks_exact_mut(n) {
        row.iter_mut().for_each(|v| *v *= scale);
        let mut len = 1;
        while len < n {
            for i in (0..n).step_by(2 * len) {
                for j in i..i + len {
                    let (u, v) = (row[j], row[j + len]);
                    row[j] = u + v;
                    row[j + len] = u - v;
                }
            }
            len *= 2;
        }
    }
}

/// `x += y`.
pub fn add_assign(x: &mut [f32], y: &[f32]) {
    x.iter_mut().zip(y).for_each(|(a, &b)| *a += b);
}

/// Scratch of [`attend_f16`] and [`attend_q8_0`], reused across calls.
#[derive(Default)]
pub struct AttnScratch {
    /// The query rounded to f16 (held as f32).
    q: Vec<f32>,
    /// The running weighted sum of values (for f16 values, every element an f16 value).
    acc: Vec<f32>,
    /// The query as q8_0 blocks (`u16` units keep the blocks' f16 scales aligned).
    q8: Vec<u16>,
}

/// One query's attention over f16 keys and values, computed exactly as llama.cpp's CPU flash
/// attention computes it (`ggml_compute_forward_flash_attn_ext_f16_one_chunk`, x86 AVX2/AVX-512
/// build, which made crates/ferrum-engine/tests/reference): the query rounded to f16; each score
/// an f16 dot product ([`dot_f16_ggml`]) times `scale`; an online softmax over the positions in
/// order, with glibc's `expf`; and the weighted sum of values kept in f16: each step is an f32
/// fused multiply-add rounded to f16. (A build for CPUs with AVX-512 FP16 does that step in f16
/// arithmetic and differs slightly.)
///
/// Matching llama.cpp's rounding bit for bit is what makes ferrum's greedy outputs equal
/// llama.cpp's (issue #2's fidelity target): with f32 attention, ulp-level differences flip
/// near-ties a few times in a hundred tokens.
pub fn attend_f16<'a>(
    q: &[f32],
    kv: impl Iterator<Item = (&'a [half::f16], &'a [half::f16])>,
    scale: f32,
    scratch: &mut AttnScratch,
    out: &mut [f32],
) {
    let d = q.len();
    let AttnScratch { q: q16, acc, .. } = scratch;
    q16.clear();
    q16.extend(q.iter().map(|&x| round_f16(x)));
    acc.clear();
    acc.resize(d, 0.0);
    let (mut m, mut sum) = (f32::NEG_INFINITY, 0f32);
    for (k, v) in kv {
        let s = dot_f16_ggml(k, q16) * scale;
        let (mut ms, mut vs) = (1f32, 1f32);
        if s > m {
            let old = m;
            m = s;
            ms = (old - m).exp();
            scale_f16(acc, ms);
        } else {
            vs = (s - m).exp();
        }
        mad_f16(acc, v, vs);
        sum = sum.mul_add(ms, vs);
    }
    let inv = if sum == 0.0 { 0.0 } else { 1.0 / sum };
    for (o, a) in out.iter_mut().zip(acc.iter()) {
        *o = a * inv;
    }
}

/// One query's attention over q8_0 keys and values (a `--kv-type q8_0` cache), computed as
/// llama.cpp's CPU flash attention computes it for quantized K and V (the same
/// `..._one_chunk`): the query quantized to q8_0 as ggml quantizes activations; each score
/// ggml's `q8_0 x q8_0` dot product times `scale`; the online softmax of [`attend_f16`]; each
/// value row dequantized to f32 and added to an f32 accumulator by fused multiply-add.
///
/// `kv` yields each position's key and value head as q8_0 blocks (`q.len() / 32` of them).
pub fn attend_q8_0<'a>(
    q: &[f32],
    kv: impl Iterator<Item = (&'a [u8], &'a [u8])>,
    scale: f32,
    scratch: &mut AttnScratch,
    out: &mut [f32],
) {
    use crate::kernels;
    use candle_core::quantized::GgmlDType;
    let d = q.len();
    let AttnScratch { acc, q8, .. } = scratch;
    q8.clear();
    q8.resize(d / 32 * 17, 0);
    // SAFETY: the same buffer, as bytes.
    let qb = unsafe { std::slice::from_raw_parts_mut(q8.as_mut_ptr().cast::<u8>(), d / 32 * 34) };
    kernels::quantize_row(GgmlDType::Q8_0, q, qb);
    let dot = kernels::best_dot(GgmlDType::Q8_0);
    acc.clear();
    acc.resize(d, 0.0);
    let (mut m, mut sum) = (f32::NEG_INFINITY, 0f32);
    for (k, v) in kv {
        let s = dot(d, k, qb) * scale;
        let (mut ms, mut vs) = (1f32, 1f32);
        if s > m {
            let old = m;
            m = s;
            ms = (old - m).exp();
            acc.iter_mut().for_each(|a| *a *= ms);
        } else {
            vs = (s - m).exp();
        }
        mad_q8_0(acc, v, vs);
        sum = sum.mul_add(ms, vs);
    }
    let inv = if sum == 0.0 { 0.0 } else { 1.0 / sum };
    for (o, a) in out.iter_mut().zip(acc.iter()) {
        *o = a * inv;
    }
}

/// `acc[i] = fma(dequantize(v)[i], w, acc[i])` for a row of q8_0 blocks, where a value
/// dequantizes as ggml's `dequantize_row_q8_0` does it (`q * d`, rounded).
fn mad_q8_0(acc: &mut [f32], v: &[u8], w: f32) {
    assert_eq!(v.len(), acc.len() / 32 * 34);
    #[cfg(target_arch = "x86_64")]
    if has_f16c() {
        // SAFETY: features checked above; the lengths agree (asserted).
        return unsafe { x86::mad_q8_0(acc, v, w) };
    }
    for (a, b) in acc.chunks_exact_mut(32).zip(v.chunks_exact(34)) {
        let d = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
        for (a, &q) in a.iter_mut().zip(&b[2..]) {
            *a = (q as i8 as f32 * d).mul_add(w, *a);
        }
    }
}

/// `x` rounded to the nearest f16 (ties to even), as f32.
fn round_f16(x: f32) -> f32 {
    half::f16::from_f32(x).to_f32()
}

/// `acc[i] = round_f16(acc[i] · s)`.
fn scale_f16(acc: &mut [f32], s: f32) {
    #[cfg(target_arch = "x86_64")]
    if has_f16c() {
        // SAFETY: features checked above.
        return unsafe { x86::scale_f16(acc, s) };
    }
    acc.iter_mut().for_each(|a| *a = round_f16(*a * s));
}

/// `acc[i] = round_f16(fma_f32(v[i], w, acc[i]))`: ggml's `ggml_vec_mad_f16`.
fn mad_f16(acc: &mut [f32], v: &[half::f16], w: f32) {
    #[cfg(target_arch = "x86_64")]
    if has_f16c() {
        // SAFETY: features checked above.
        return unsafe { x86::mad_f16(acc, v, w) };
    }
    for (a, v) in acc.iter_mut().zip(v) {
        *a = round_f16(v.to_f32().mul_add(w, *a));
    }
}

/// `ggml_vec_dot_f16` of an f16 key and an f16 query (held as f32), as llama.cpp's AVX-512
/// build computes it: four 16-lane f32 accumulators over each 64 elements, added as (0 + 2) +
/// (1 + 3), then reduced by `_mm512_reduce_add_ps`; a tail of `n % 64` is added in f64.
pub fn dot_f16_ggml(k: &[half::f16], q: &[f32]) -> f32 {
    assert_eq!(k.len(), q.len());
    let n = k.len();
    let np = n - n % 64;
    #[cfg(target_arch = "x86_64")]
    let head = if has_f16c() {
        // SAFETY: features checked above; `np` is a multiple of 64 within both slices.
        unsafe { x86::dot_f16_64(&k[..np], &q[..np]) }
    } else {
        dot_f16_64_scalar(&k[..np], &q[..np])
    };
    #[cfg(not(target_arch = "x86_64"))]
    let head = dot_f16_64_scalar(&k[..np], &q[..np]);
    let mut sum = head as f64;
    for i in np..n {
        sum += (k[i].to_f32() * q[i]) as f64;
    }
    sum as f32
}

/// [`dot_f16_ggml`] over whole 64-element groups, lane by lane.
fn dot_f16_64_scalar(k: &[half::f16], q: &[f32]) -> f32 {
    let mut acc = [[0f32; 16]; 4];
    for i in (0..k.len()).step_by(64) {
        for (j, acc) in acc.iter_mut().enumerate() {
            for (e, a) in acc.iter_mut().enumerate() {
                let idx = i + 16 * j + e;
                *a = k[idx].to_f32().mul_add(q[idx], *a);
            }
        }
    }
    let v: [f32; 16] = std::array::from_fn(|e| (acc[0][e] + acc[2][e]) + (acc[1][e] + acc[3][e]));
    let t: [f32; 8] = std::array::from_fn(|i| v[i] + v[i + 8]);
    let t: [f32; 4] = std::array::from_fn(|i| t[i] + t[i + 4]);
    (t[0] + t[2]) + (t[1] + t[3])
}

/// Whether the CPU has AVX2, FMA and F16C (checked once).
fn has_f16c() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| {
            is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// AVX2 + FMA + F16C versions of the attention and activation kernels above, with the same
/// results lane for lane.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// Rounds every lane to f16 and back.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn r16(v: __m256) -> __m256 {
        _mm256_cvtph_ps(_mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v))
    }

    /// Eight f16 values at `p`, widened.
    ///
    /// # Safety
    /// `p` must point to eight readable f16 values.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn ld16(p: *const half::f16) -> __m256 {
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p.cast())) }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_f16_64(k: &[half::f16], q: &[f32]) -> f32 {
        let (kp, qp) = (k.as_ptr(), q.as_ptr());
        // acc[2j] and acc[2j + 1]: lanes 0..8 and 8..16 of ggml's accumulator j.
        let mut acc = [_mm256_setzero_ps(); 8];
        // SAFETY (whole body): indices stay below k.len() == q.len(), a multiple of 64.
        unsafe {
            for i in (0..k.len()).step_by(64) {
                for (h, a) in acc.iter_mut().enumerate() {
                    let o = i + 8 * h;
                    *a = _mm256_fmadd_ps(ld16(kp.add(o)), _mm256_loadu_ps(qp.add(o)), *a);
                }
            }
        }
        let half = |h: usize| {
            _mm256_add_ps(
                _mm256_add_ps(acc[h], acc[4 + h]),
                _mm256_add_ps(acc[2 + h], acc[6 + h]),
            )
        };
        // _mm512_reduce_add_ps: lanes (i, i + 8), then (i, i + 4), (0, 2) and (1, 3), (0, 1).
        let t = _mm256_add_ps(half(0), half(1));
        let s = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps::<1>(t));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn scale_f16(acc: &mut [f32], s: f32) {
        let sv = _mm256_set1_ps(s);
        let mut chunks = acc.chunks_exact_mut(8);
        for c in &mut chunks {
            // SAFETY: `c` holds eight floats.
            unsafe {
                let v = _mm256_loadu_ps(c.as_ptr());
                _mm256_storeu_ps(c.as_mut_ptr(), r16(_mm256_mul_ps(v, sv)));
            }
        }
        for a in chunks.into_remainder() {
            *a = super::round_f16(*a * s);
        }
    }

    /// `acc = round_f16(fma_f32(v, w, acc))`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn mad_f16(acc: &mut [f32], v: &[half::f16], w: f32) {
        assert_eq!(acc.len(), v.len());
        let wv = _mm256_set1_ps(w);
        let n8 = acc.len() - acc.len() % 8;
        for i in (0..n8).step_by(8) {
            // SAFETY: `i + 8 <= n8 <= len` of both slices.
            unsafe {
                let a = _mm256_loadu_ps(acc.as_ptr().add(i));
                let x = ld16(v.as_ptr().add(i));
                _mm256_storeu_ps(acc.as_mut_ptr().add(i), r16(_mm256_fmadd_ps(x, wv, a)));
            }
        }
        for i in n8..acc.len() {
            let x = v[i].to_f32();
            acc[i] = super::round_f16(x.mul_add(w, acc[i]));
        }
    }

    /// See `super::mad_q8_0`.
    ///
    /// # Safety
    /// `v` holds `acc.len() / 32` q8_0 blocks and `acc.len()` is a multiple of 32.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn mad_q8_0(acc: &mut [f32], v: &[u8], w: f32) {
        let wv = _mm256_set1_ps(w);
        for (a, b) in acc.chunks_exact_mut(32).zip(v.chunks_exact(34)) {
            let d = _mm256_set1_ps(half::f16::from_le_bytes([b[0], b[1]]).to_f32());
            for j in (0..32).step_by(8) {
                // SAFETY: `j + 8 <= 32` within the block's quants and the accumulator chunk.
                unsafe {
                    let q = _mm_loadl_epi64(b.as_ptr().add(2 + j).cast());
                    let x = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), d);
                    let p = a.as_mut_ptr().add(j);
                    _mm256_storeu_ps(p, _mm256_fmadd_ps(x, wv, _mm256_loadu_ps(p)));
                }
            }
        }
    }

    /// `ggml_v_expf` (see `super::ggml_expf`) on eight lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn expf(x: __m256) -> __m256 {
        let c = |b: u32| _mm256_set1_ps(f32::from_bits(b));
        let r = c(super::EXP_SHIFT);
        let n = _mm256_sub_ps(_mm256_fmadd_ps(x, c(super::EXP_LOG2E), r), r);
        let b = _mm256_fnmadd_ps(
            n,
            c(super::EXP_LN2_LO),
            _mm256_fnmadd_ps(n, c(super::EXP_LN2_HI), x),
        );
        let u = _mm256_mul_ps(b, b);
        let p = super::EXP_POLY;
        let j = _mm256_fmadd_ps(
            _mm256_fmadd_ps(
                _mm256_fmadd_ps(c(p[0]), b, c(p[1])),
                u,
                _mm256_fmadd_ps(c(p[2]), b, c(p[3])),
            ),
            u,
            _mm256_fmadd_ps(c(p[4]), b, _mm256_set1_ps(1.0)),
        );
        // scalef(j, n) for |n| <= 192: two exact power-of-two factors.
        let ni = _mm256_cvtps_epi32(n);
        let n1 = _mm256_srai_epi32::<1>(ni);
        let n2 = _mm256_sub_epi32(ni, n1);
        let pow2 = |e: __m256i| {
            _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
                e,
                _mm256_set1_epi32(127),
            )))
        };
        let res = _mm256_mul_ps(_mm256_mul_ps(j, pow2(n1)), pow2(n2));
        let abs_n = _mm256_andnot_ps(_mm256_set1_ps(-0.0), n);
        let big = _mm256_cmp_ps::<_CMP_GT_OQ>(abs_n, _mm256_set1_ps(192.0));
        if _mm256_movemask_ps(big) == 0 {
            return res;
        }
        let neg = _mm256_cmp_ps::<_CMP_LE_OQ>(n, _mm256_setzero_ps());
        let alt = _mm256_andnot_ps(neg, _mm256_set1_ps(f32::INFINITY));
        _mm256_blendv_ps(res, alt, big)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn silu_mul(gate: &mut [f32], up: &[f32]) {
        assert_eq!(gate.len(), up.len());
        assert!(gate.len().is_multiple_of(8));
        let one = _mm256_set1_ps(1.0);
        for i in (0..gate.len()).step_by(8) {
            // SAFETY: `i + 8 <= len` of both slices.
            unsafe {
                let x = _mm256_loadu_ps(gate.as_ptr().add(i));
                let e = expf(_mm256_sub_ps(_mm256_setzero_ps(), x));
                let s = _mm256_div_ps(x, _mm256_add_ps(one, e));
                let y = _mm256_mul_ps(s, _mm256_loadu_ps(up.as_ptr().add(i)));
                _mm256_storeu_ps(gate.as_mut_ptr().add(i), y);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rope_at_position_zero_is_identity_and_preserves_norm() {
        for style in [RopeStyle::Interleaved, RopeStyle::Neox] {
            let rope = Rope::new(style, 8, 10000.0, None);
            let (mut c, mut s) = (vec![0.0; 4], vec![0.0; 4]);
            let orig: Vec<f32> = (0..8).map(|i| i as f32 - 3.5).collect();
            rope.cos_sin(0, &mut c, &mut s);
            let mut x = orig.clone();
            rope.apply(&mut x, 8, &c, &s);
            assert_eq!(x, orig);
            rope.cos_sin(17, &mut c, &mut s);
            rope.apply(&mut x, 8, &c, &s);
            let n0: f32 = orig.iter().map(|v| v * v).sum();
            let n1: f32 = x.iter().map(|v| v * v).sum();
            assert!((n0 - n1).abs() < 1e-3, "{style:?}");
        }
    }

    /// Deterministic test values of widely varying magnitude.
    fn values(n: usize, seed: u32) -> Vec<f32> {
        let mut x = seed.wrapping_mul(2654435761) | 1;
        (0..n)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                let unit = (x >> 8) as f32 / (1u32 << 24) as f32 - 0.5;
                unit * [0.01f32, 1.0, 30.0][i % 3]
            })
            .collect()
    }

    fn f16s(x: &[f32]) -> Vec<half::f16> {
        x.iter().map(|&v| half::f16::from_f32(v)).collect()
    }

    #[test]
    fn f16_dot_is_exact_and_simd_matches_scalar() {
        for n in [64usize, 128, 192, 80, 8] {
            let k = f16s(&values(n, 1));
            let q: Vec<f32> = f16s(&values(n, 2)).iter().map(|v| v.to_f32()).collect();
            let exact: f64 = k.iter().zip(&q).map(|(k, q)| k.to_f64() * *q as f64).sum();
            let got = dot_f16_ggml(&k, &q);
            let mag: f64 = k
                .iter()
                .zip(&q)
                .map(|(k, q)| (k.to_f64() * *q as f64).abs())
                .sum();
            assert!(
                (got as f64 - exact).abs() <= mag * 1e-6,
                "n={n}: {got} vs {exact}"
            );
            let np = n - n % 64;
            assert_eq!(
                dot_f16_64_scalar(&k[..np], &q[..np]).to_bits(),
                dot_f16_ggml(&k[..np], &q[..np]).to_bits(),
                "n={n}"
            );
        }
    }

    #[test]
    fn f16_accumulation_kernels_match_scalar() {
        let v = f16s(&values(203, 6));
        for w in [0.731f32, 1.0, 3.5e-3, 17.0] {
            let mut acc: Vec<f32> = f16s(&values(203, 7)).iter().map(|v| v.to_f32()).collect();
            let mut want = acc.clone();
            for (a, v) in want.iter_mut().zip(&v) {
                *a = round_f16(v.to_f32().mul_add(w, *a));
            }
            mad_f16(&mut acc, &v, w);
            assert_eq!(acc, want, "w={w}");
            let mut scaled = acc.clone();
            scale_f16(&mut scaled, w);
            let want: Vec<f32> = acc.iter().map(|a| round_f16(a * w)).collect();
            assert_eq!(scaled, want);
        }
    }

    #[test]
    fn ggml_expf_is_accurate_and_simd_silu_matches_scalar() {
        let mut xs = values(4096, 8);
        xs.extend([
            0.0, -0.0, 88.0, -87.0, 100.0, -104.0, 150.0, -150.0, 300.0, -300.0,
        ]);
        for &x in &xs {
            let want = (x as f64).exp();
            let got = ggml_expf(x) as f64;
            if want < 1e30 && want > 1e-30 {
                assert!(
                    (got - want).abs() <= want * 4e-7,
                    "exp({x}) = {got}, want {want}"
                );
            }
        }
        let n = xs.len() - xs.len() % 16;
        let up = values(n, 9);
        let mut simd = xs[..n].to_vec();
        silu_mul(&mut simd, &up, n);
        let mut scalar = xs[..n].to_vec();
        silu_mul_scalar(&mut scalar, &up);
        for i in 0..n {
            assert_eq!(simd[i].to_bits(), scalar[i].to_bits(), "x={}", xs[i]);
        }
    }

    #[test]
    fn attention_matches_exact_softmax_within_f16_rounding() {
        for d in [64usize, 128, 96] {
            let n = 37;
            let q = values(d, 10);
            let ks: Vec<Vec<half::f16>> =
                (0..n).map(|i| f16s(&values(d, 100 + i as u32))).collect();
            let vs: Vec<Vec<half::f16>> =
                (0..n).map(|i| f16s(&values(d, 200 + i as u32))).collect();
            let scale = 1.0 / (d as f32).sqrt();
            let mut out = vec![0f32; d];
            let kv = ks.iter().zip(&vs).map(|(k, v)| (&k[..], &v[..]));
            attend_f16(&q, kv, scale, &mut AttnScratch::default(), &mut out);
            let s: Vec<f64> = ks
                .iter()
                .map(|k| {
                    k.iter()
                        .zip(&q)
                        .map(|(k, q)| k.to_f64() * *q as f64)
                        .sum::<f64>()
                        * scale as f64
                })
                .collect();
            let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let w: Vec<f64> = s.iter().map(|s| (s - m).exp()).collect();
            let total: f64 = w.iter().sum();
            for e in 0..d {
                let want: f64 = w
                    .iter()
                    .zip(&vs)
                    .map(|(w, v)| w * v[e].to_f64())
                    .sum::<f64>()
                    / total;
                assert!(
                    (out[e] as f64 - want).abs() < 0.02 + want.abs() * 0.01,
                    "d={d} e={e}: {} vs {want}",
                    out[e]
                );
            }
        }
    }

    #[test]
    fn fwht_is_orthonormal_and_its_own_inverse() {
        let x = values(128, 3);
        let mut y = x.clone();
        fwht(&mut y, 64);
        // The first output of each chunk is the chunk's sum over sqrt(64).
        let sum: f32 = x[64..].iter().sum();
        assert!((y[64] - sum / 8.0).abs() < 1e-3 * sum.abs().max(1.0));
        let norm = |v: &[f32]| v.iter().map(|a| a * a).sum::<f32>();
        assert!((norm(&x) - norm(&y)).abs() < 1e-3 * norm(&x));
        fwht(&mut y, 64);
        for (a, b) in x.iter().zip(&y) {
            assert!((a - b).abs() <= 1e-5 * a.abs().max(1.0), "{a} vs {b}");
        }
    }

    #[test]
    fn rms_norm_of_constant_row_is_weight() {
        let x = vec![2.0f32; 16];
        let w: Vec<f32> = (0..16).map(|i| i as f32).collect();
        let mut out = vec![0.0; 16];
        rms_norm(&x, &w, 0.0, &mut out);
        for (o, w) in out.iter().zip(&w) {
            assert!((o - w).abs() < 1e-6);
        }
    }
}
