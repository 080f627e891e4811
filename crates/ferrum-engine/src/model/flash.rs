//! Tiled causal attention for prompt chunks (flash-attention style), on AVX-512.
//!
//! The per-token path ([`super::ops::attend_f16`]) walks every cached key once per query with a
//! scalar online softmax, in ggml's f16 arithmetic. For a prompt chunk of `T` tokens that is
//! `T²/2` scalar steps per head, and at a few thousand tokens attention, not the matmuls, is
//! the prompt's cost. Here 16 consecutive queries of one head form a tile whose lanes are the
//! queries: scores of 16 keys at a time are 16 registers (`Σ_d q[d] · k_j[d]`, one multiply-add
//! per dimension and key for all 16 queries), the softmax's running maximum, rescaling and sums
//! are lane-wise, and the output accumulates `P · V` in f32. Keys past a query's position are
//! masked (the causal diagonal), so a tile reads the cache up to its last query only.
//!
//! Arithmetic: f32 throughout (the f16 cache widened), a polynomial `exp`. It is not the per-
//! token path's f16 accumulation, so results differ from it by rounding; the tests bound the
//! difference and the reference tests keep their top-1 agreement with llama.cpp (which also
//! switches to a tiled kernel of its own for prompt chunks).

use half::f16;

/// Queries per tile.
pub const TILE: usize = 16;

/// Whether this CPU runs the tiled kernel.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static ON: OnceLock<bool> = OnceLock::new();
        *ON.get_or_init(|| {
            // Opt-in for now: its f32 accumulation lowers top-1 agreement with llama.cpp
            // below the reference tests' bars on nano (see docs/benchmarks.md).
            std::env::var("FERRUM_FLASH").is_ok_and(|v| v == "on" || v == "1")
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("f16c")
                && is_x86_feature_detected!("fma")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Scratch of one thread: the tile's transposed queries, output accumulator and the current
/// keys and values widened to f32.
#[derive(Default)]
pub struct FlashScratch {
    qt: Vec<f32>,
    ot: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
}

/// Attention of `n_q <= 16` consecutive queries at positions `pos0..pos0 + n_q` over the keys
/// and values at positions `0..pos0 + n_q` (`kv`: one `(key, value)` head row per position, in
/// order). `q(i)` is query `i` (`hd` floats), `out(i)` receives its result.
///
/// # Panics
/// If [`available`] is false, or `kv` yields fewer than `pos0 + n_q` rows.
#[allow(clippy::too_many_arguments)]
pub fn attend_tile<'a>(
    hd: usize,
    n_q: usize,
    pos0: usize,
    q: impl Fn(usize) -> &'a [f32],
    kv: impl Iterator<Item = (&'a [f16], &'a [f16])>,
    scale: f32,
    scratch: &mut FlashScratch,
    mut out: impl FnMut(usize, &[f32]),
) {
    assert!(available(), "the tiled attention needs AVX-512");
    assert!((1..=TILE).contains(&n_q));
    let FlashScratch { qt, ot, k, v } = scratch;
    qt.clear();
    qt.resize(hd * TILE, 0.0);
    for i in 0..n_q {
        for (d, &x) in q(i).iter().enumerate() {
            qt[d * TILE + i] = x * scale;
        }
    }
    ot.clear();
    ot.resize(hd * TILE, 0.0);
    k.resize(hd * TILE, 0.0);
    v.resize(hd * TILE, 0.0);
    let n_ctx = pos0 + n_q;
    let mut state = Softmax::new();
    let mut kv = kv.take(n_ctx);
    let mut kpos = 0;
    while kpos < n_ctx {
        let nk = (n_ctx - kpos).min(TILE);
        for j in 0..nk {
            let (kr, vr) = kv.next().expect("a key and value per position");
            widen(kr, &mut k[j * hd..(j + 1) * hd]);
            widen(vr, &mut v[j * hd..(j + 1) * hd]);
        }
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `available` checked the features; the buffers hold `hd × 16` floats.
        unsafe {
            x86::block(hd, nk, kpos, pos0, qt, k, v, ot, &mut state)
        };
        kpos += nk;
    }
    let mut row = vec![0f32; hd];
    for i in 0..n_q {
        let inv = if state.l[i] == 0.0 {
            0.0
        } else {
            1.0 / state.l[i]
        };
        for (d, o) in row.iter_mut().enumerate() {
            *o = ot[d * TILE + i] * inv;
        }
        out(i, &row);
    }
}

fn widen(src: &[f16], dst: &mut [f32]) {
    half::slice::HalfFloatSliceExt::convert_to_f32_slice(src, dst);
}

/// The online softmax's per-query state: running maximum and sum of weights.
pub(crate) struct Softmax {
    pub(crate) m: [f32; TILE],
    pub(crate) l: [f32; TILE],
}

impl Softmax {
    fn new() -> Self {
        Softmax {
            m: [f32::NEG_INFINITY; TILE],
            l: [0.0; TILE],
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{Softmax, TILE};

    /// `exp(x)` for `x <= 0` (and `-inf`), ~1 ulp: `2^n · p(r)` with AVX-512's `scalef`.
    #[inline]
    #[target_feature(enable = "avx512f,fma")]
    fn exp(x: __m512) -> __m512 {
        let x = _mm512_max_ps(x, _mm512_set1_ps(-87.0));
        let n =
            _mm512_roundscale_ps::<0>(_mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)));
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_145_75), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428_606_8e-6), r);
        // exp(r) on |r| <= ln2/2, degree-6 Taylor-like minimax coefficients.
        let c = |v: f32| _mm512_set1_ps(v);
        let mut p = c(1.0 / 720.0);
        p = _mm512_fmadd_ps(p, r, c(1.0 / 120.0));
        p = _mm512_fmadd_ps(p, r, c(1.0 / 24.0));
        p = _mm512_fmadd_ps(p, r, c(1.0 / 6.0));
        p = _mm512_fmadd_ps(p, r, c(0.5));
        p = _mm512_fmadd_ps(p, r, c(1.0));
        p = _mm512_fmadd_ps(p, r, c(1.0));
        _mm512_scalef_ps(p, n)
    }

    /// One block of `nk <= 16` keys at positions `kpos..kpos + nk` against the tile's queries
    /// at `pos0..pos0 + 16`.
    ///
    /// # Safety
    /// The CPU must support AVX-512 F and FMA; `qt`, `k`, `v` and `ot` must hold `hd × 16`
    /// floats.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,fma")]
    pub(super) unsafe fn block(
        hd: usize,
        nk: usize,
        kpos: usize,
        pos0: usize,
        qt: &[f32],
        k: &[f32],
        v: &[f32],
        ot: &mut [f32],
        st: &mut Softmax,
    ) {
        assert!(qt.len() >= hd * TILE && ot.len() >= hd * TILE);
        assert!(k.len() >= hd * nk && v.len() >= hd * nk && nk <= TILE);
        // SAFETY (whole body): indices below `hd × 16` by the assertions.
        unsafe {
            let (qp, kp, vp, op) = (qt.as_ptr(), k.as_ptr(), v.as_ptr(), ot.as_mut_ptr());
            let mut s = [_mm512_setzero_ps(); TILE];
            for d in 0..hd {
                let qd = _mm512_loadu_ps(qp.add(d * TILE));
                for (j, sj) in s.iter_mut().enumerate().take(nk) {
                    *sj = _mm512_fmadd_ps(qd, _mm512_set1_ps(*kp.add(j * hd + d)), *sj);
                }
            }
            // Lane i may see key j when kpos + j <= pos0 + i.
            let lane = _mm512_add_epi32(
                _mm512_set1_epi32(pos0 as i32),
                _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
            );
            let mut masks = [0 as __mmask16; TILE];
            let m_old = _mm512_loadu_ps(st.m.as_ptr());
            let mut m_new = m_old;
            for j in 0..nk {
                masks[j] = _mm512_cmpge_epi32_mask(lane, _mm512_set1_epi32((kpos + j) as i32));
                m_new = _mm512_mask_max_ps(m_new, masks[j], m_new, s[j]);
            }
            // Lanes that saw no key yet keep a -inf maximum: their weights are all zero.
            let alpha = exp(_mm512_sub_ps(m_old, m_new));
            let alpha = _mm512_mask_blend_ps(
                _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(m_old, _mm512_set1_ps(f32::NEG_INFINITY)),
                alpha,
                _mm512_setzero_ps(),
            );
            let mut l = _mm512_mul_ps(_mm512_loadu_ps(st.l.as_ptr()), alpha);
            for j in 0..nk {
                s[j] = _mm512_maskz_mov_ps(masks[j], exp(_mm512_sub_ps(s[j], m_new)));
                l = _mm512_add_ps(l, s[j]);
            }
            _mm512_storeu_ps(st.m.as_mut_ptr(), m_new);
            _mm512_storeu_ps(st.l.as_mut_ptr(), l);
            for d in 0..hd {
                let mut o = _mm512_mul_ps(_mm512_loadu_ps(op.add(d * TILE)), alpha);
                for (j, sj) in s.iter().enumerate().take(nk) {
                    o = _mm512_fmadd_ps(*sj, _mm512_set1_ps(*vp.add(j * hd + d)), o);
                }
                _mm512_storeu_ps(op.add(d * TILE), o);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::{attend_f16, AttnScratch};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// The tile against the per-token path, for chunks that start at and after position 0,
    /// partial tiles, both head sizes.
    #[test]
    fn tiles_match_per_token_attention() {
        if !available() {
            eprintln!("skipped: no AVX-512 on this CPU, the tiled attention is not used");
            return;
        }
        let mut rng = StdRng::seed_from_u64(5);
        for (hd, n_ctx) in [(64, 40), (128, 77), (64, 300)] {
            let keys: Vec<f16> = (0..n_ctx * hd)
                .map(|_| f16::from_f32(rng.gen_range(-2.0..2.0)))
                .collect();
            let vals: Vec<f16> = (0..n_ctx * hd)
                .map(|_| f16::from_f32(rng.gen_range(-1.0..1.0)))
                .collect();
            let qs: Vec<f32> = (0..n_ctx * hd).map(|_| rng.gen_range(-2.0..2.0)).collect();
            let scale = 1.0 / (hd as f32).sqrt();
            let rows = |n: usize| {
                (0..n).map(|p| (&keys[p * hd..(p + 1) * hd], &vals[p * hd..(p + 1) * hd]))
            };
            let mut scratch = FlashScratch::default();
            let mut exact = AttnScratch::default();
            let mut want = vec![0f32; hd];
            for pos0 in (0..n_ctx).step_by(TILE).chain([3, n_ctx - 5]) {
                let n_q = (n_ctx - pos0).min(TILE);
                attend_tile(
                    hd,
                    n_q,
                    pos0,
                    |i| &qs[(pos0 + i) * hd..(pos0 + i + 1) * hd],
                    rows(n_ctx),
                    scale,
                    &mut scratch,
                    |i, got| {
                        let p = pos0 + i;
                        attend_f16(
                            &qs[p * hd..(p + 1) * hd],
                            rows(p + 1),
                            scale,
                            &mut exact,
                            &mut want,
                        );
                        for (d, (&g, &w)) in got.iter().zip(&want).enumerate() {
                            // The per-token path rounds its accumulator to f16 at every key.
                            assert!(
                                (g - w).abs() <= 4e-3 + 4e-3 * w.abs(),
                                "hd={hd} query {p} dim {d}: tiled {g}, per-token {w}"
                            );
                        }
                    },
                );
            }
        }
    }
}
