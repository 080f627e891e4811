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

/// Precomputed inverse frequencies of RoPE, as ggml computes them.
#[derive(Clone, Debug)]
pub struct Rope {
    pub style: RopeStyle,
    /// Rotated dimensions per head (may be less than the head size).
    pub dims: usize,
    theta_scale: f32,
}

impl Rope {
    pub fn new(style: RopeStyle, dims: usize, base: f32) -> Self {
        Rope {
            style,
            dims,
            theta_scale: base.powf(-2.0 / dims as f32),
        }
    }

    /// The `(cos, sin)` table for position `pos`: `dims / 2` entries each.
    pub fn cos_sin(&self, pos: usize, cos: &mut [f32], sin: &mut [f32]) {
        // ggml multiplies the angle by theta_scale step by step in f32; doing the same keeps
        // the rotation bit-close to llama.cpp's.
        let mut theta = pos as f32;
        for i in 0..self.dims / 2 {
            cos[i] = theta.cos();
            sin[i] = theta.sin();
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
                        head[2 * i] = a * cos[i] - b * sin[i];
                        head[2 * i + 1] = a * sin[i] + b * cos[i];
                    }
                }
                RopeStyle::Neox => {
                    for i in 0..half {
                        let (a, b) = (head[i], head[i + half]);
                        head[i] = a * cos[i] - b * sin[i];
                        head[i + half] = a * sin[i] + b * cos[i];
                    }
                }
            }
        }
    }
}

/// In-place softmax of `x`, returning nothing; the maximum is subtracted first for stability.
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f64;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v as f64;
    }
    let inv = (1.0 / sum) as f32;
    x.iter_mut().for_each(|v| *v *= inv);
}

/// `gate = silu(gate) * up`, the SwiGLU activation.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}

/// `x += y`.
pub fn add_assign(x: &mut [f32], y: &[f32]) {
    x.iter_mut().zip(y).for_each(|(a, &b)| *a += b);
}

/// Dot product of two f32 slices, with 8 independent accumulators so the compiler vectorises.
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = a.len() / 8;
    for c in 0..chunks {
        for l in 0..8 {
            acc[l] += a[c * 8 + l] * b[c * 8 + l];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for i in chunks * 8..a.len() {
        s += a[i] * b[i];
    }
    s
}

/// `y += a * x`.
pub fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    y.iter_mut().zip(x).for_each(|(y, &x)| *y += a * x);
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

/// Dot product of an f16 row (a cached key) with an f32 row (a query), in f32.
pub fn dot_f16(k: &[half::f16], q: &[f32]) -> f32 {
    assert_eq!(k.len(), q.len());
    #[cfg(target_arch = "x86_64")]
    if has_f16c() && k.len().is_multiple_of(8) {
        // SAFETY: features checked above; lengths are equal multiples of 8.
        return unsafe { x86::dot_f16(k, q) };
    }
    k.iter().zip(q).map(|(k, q)| k.to_f32() * q).sum()
}

/// `y += a * v` for an f16 row `v` (a cached value).
pub fn axpy_f16(a: f32, v: &[half::f16], y: &mut [f32]) {
    assert_eq!(v.len(), y.len());
    #[cfg(target_arch = "x86_64")]
    if has_f16c() && v.len().is_multiple_of(8) {
        // SAFETY: features checked above; lengths are equal multiples of 8.
        return unsafe { x86::axpy_f16(a, v, y) };
    }
    y.iter_mut().zip(v).for_each(|(y, v)| *y += a * v.to_f32());
}

/// F16C kernels for attention over the f16 KV cache: keys and values are widened in registers,
/// never copied to an f32 buffer.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_f16(k: &[half::f16], q: &[f32]) -> f32 {
        let (kp, qp) = (k.as_ptr() as *const __m128i, q.as_ptr());
        let mut acc0 = _mm256_setzero_ps();
        let mut acc1 = _mm256_setzero_ps();
        let n8 = k.len() / 8;
        let mut i = 0;
        // SAFETY (whole body): indices stay below n8 * 8 == len of both slices.
        unsafe {
            while i + 2 <= n8 {
                let k0 = _mm256_cvtph_ps(_mm_loadu_si128(kp.add(i)));
                let k1 = _mm256_cvtph_ps(_mm_loadu_si128(kp.add(i + 1)));
                acc0 = _mm256_fmadd_ps(k0, _mm256_loadu_ps(qp.add(i * 8)), acc0);
                acc1 = _mm256_fmadd_ps(k1, _mm256_loadu_ps(qp.add(i * 8 + 8)), acc1);
                i += 2;
            }
            if i < n8 {
                let k0 = _mm256_cvtph_ps(_mm_loadu_si128(kp.add(i)));
                acc0 = _mm256_fmadd_ps(k0, _mm256_loadu_ps(qp.add(i * 8)), acc0);
            }
        }
        let acc = _mm256_add_ps(acc0, acc1);
        let lo = _mm256_castps256_ps128(acc);
        let hi = _mm256_extractf128_ps(acc, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn axpy_f16(a: f32, v: &[half::f16], y: &mut [f32]) {
        let (vp, yp) = (v.as_ptr() as *const __m128i, y.as_mut_ptr());
        let av = _mm256_set1_ps(a);
        // SAFETY: indices stay below len / 8 blocks of 8 for both slices.
        unsafe {
            for i in 0..v.len() / 8 {
                let x = _mm256_cvtph_ps(_mm_loadu_si128(vp.add(i)));
                let yv = _mm256_loadu_ps(yp.add(i * 8));
                _mm256_storeu_ps(yp.add(i * 8), _mm256_fmadd_ps(av, x, yv));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_sums_to_one_and_keeps_order() {
        let mut x = vec![1.0, 3.0, 2.0, -100.0];
        softmax(&mut x);
        assert!((x.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(x[1] > x[2] && x[2] > x[0] && x[3] < 1e-30);
    }

    #[test]
    fn rope_at_position_zero_is_identity_and_preserves_norm() {
        for style in [RopeStyle::Interleaved, RopeStyle::Neox] {
            let rope = Rope::new(style, 8, 10000.0);
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

    #[test]
    fn f16_attention_kernels_match_scalar() {
        for n in [8usize, 16, 24, 64, 128, 12] {
            let k: Vec<half::f16> = (0..n)
                .map(|i| half::f16::from_f32((i as f32 * 0.37).sin()))
                .collect();
            let q: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let want: f32 = k.iter().zip(&q).map(|(k, q)| k.to_f32() * q).sum();
            assert!((dot_f16(&k, &q) - want).abs() < 1e-4, "n={n}");
            let mut y = q.clone();
            axpy_f16(0.5, &k, &mut y);
            for i in 0..n {
                assert!((y[i] - (q[i] + 0.5 * k[i].to_f32())).abs() < 1e-6);
            }
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
