//! AVX2 activation quantizers (`f32` rows into Q8_0, Q8_1 and Q8_K blocks) that produce the same
//! bytes as candle's `from_float`, i.e. ggml's reference `quantize_row_q8_*`.
//!
//! Bit-exactness needs care in three places: the scale is computed with the same scalar
//! operations in the same order; `f32::round` rounds halves away from zero, which no SSE/AVX
//! rounding mode does, so it is rebuilt from truncation and the exact fractional part; and the
//! `as i8` conversion maps NaN to 0 and saturates, which is done with an explicit mask and clamp
//! (only non-finite inputs or subnormal block maxima ever reach those paths).

use std::arch::x86_64::*;

use candle_core::quantized::GgmlDType;
use half::f16;

use super::QuantizeFn;

/// The quantizer for activation format `dtype`; the caller has checked that AVX2, FMA and F16C
/// are present.
pub(super) fn quantize_fn(dtype: GgmlDType) -> Option<QuantizeFn> {
    Some(match dtype {
        GgmlDType::Q8_0 => q8_0,
        GgmlDType::Q8_1 => q8_1,
        GgmlDType::Q8K => q8k,
        _ => return None,
    })
}

fn check(x: &[f32], out: &[u8], block: usize, size: usize) -> usize {
    assert_eq!(
        x.len() % block,
        0,
        "{} is not a multiple of {block}",
        x.len()
    );
    let nb = x.len() / block;
    assert_eq!(
        out.len(),
        nb * size,
        "output is not {nb} blocks of {size} bytes"
    );
    nb
}

/// Quantizes `x` into Q8_0 blocks (`d` as f16, 32 signed bytes).
pub(super) fn q8_0(x: &[f32], out: &mut [u8]) {
    let nb = check(x, out, 32, 34);
    for b in 0..nb {
        let xs = &x[32 * b..32 * (b + 1)];
        let ys = &mut out[34 * b..34 * (b + 1)];
        // SAFETY: `Tier::best` found AVX2 before handing this function out; the slices hold one
        // block each.
        unsafe { q8_32(xs.as_ptr(), ys.as_mut_ptr()) };
    }
}

/// Quantizes `x` into Q8_1 blocks: Q8_0 plus `s`, `d` times the sum of the quants, computed in
/// f32 and rounded to f16 as ggml's x86 `quantize_row_q8_1` does.
pub(super) fn q8_1(x: &[f32], out: &mut [u8]) {
    let nb = check(x, out, 32, 36);
    for b in 0..nb {
        let xs = &x[32 * b..32 * (b + 1)];
        let ys = &mut out[36 * b..36 * (b + 1)];
        let mut tmp = [0u8; 34];
        // SAFETY: as in `q8_0`; `tmp` is one Q8_0 block.
        let (sum, d) = unsafe { q8_32(xs.as_ptr(), tmp.as_mut_ptr()) };
        let s = f16::from_f32(d * sum as f32);
        ys[..2].copy_from_slice(&tmp[..2]);
        ys[2..4].copy_from_slice(&s.to_le_bytes());
        ys[4..].copy_from_slice(&tmp[2..]);
    }
}

/// Quantizes `x` into Q8_K blocks (`d` as f32, 256 signed bytes, 16 sums of 16 bytes).
pub(super) fn q8k(x: &[f32], out: &mut [u8]) {
    let nb = check(x, out, 256, 292);
    for b in 0..nb {
        let xs = &x[256 * b..256 * (b + 1)];
        let ys = &mut out[292 * b..292 * (b + 1)];
        // SAFETY: as in `q8_0`.
        let amax = unsafe { abs_max(xs.as_ptr(), 256) };
        if amax == 0.0 {
            ys.fill(0);
            continue;
        }
        // ggml scales by the signed value of largest magnitude, the first one on ties.
        let max = xs.iter().copied().find(|v| v.abs() == amax).unwrap_or(amax);
        let iscale = -127f32 / max;
        let (head, rest) = ys.split_at_mut(4);
        let (qs, bsums) = rest.split_at_mut(256);
        for c in 0..8 {
            // SAFETY: as in `q8_0`; chunk `c` covers 32 of the block's 256 values.
            unsafe { quantize_32(xs.as_ptr().add(32 * c), iscale, qs.as_mut_ptr().add(32 * c)) };
        }
        for (j, s) in bsums.chunks_exact_mut(2).enumerate() {
            let sum: i32 = qs[16 * j..16 * (j + 1)]
                .iter()
                .map(|&q| q as i8 as i32)
                .sum();
            s.copy_from_slice(&(sum as i16).to_le_bytes());
        }
        head.copy_from_slice(&(1.0 / iscale).to_le_bytes());
    }
}

/// The largest `|x|` of `n` (a multiple of 8) values, ignoring NaNs as `f32::max` does.
///
/// # Safety
/// AVX2 must be present and `x` must point to `n` readable values.
#[target_feature(enable = "avx2,fma")]
unsafe fn abs_max(x: *const f32, n: usize) -> f32 {
    let sign = _mm256_set1_ps(-0.0);
    let mut m = _mm256_setzero_ps();
    for i in (0..n).step_by(8) {
        // SAFETY: in bounds by the contract.
        let v = _mm256_andnot_ps(sign, unsafe { _mm256_loadu_ps(x.add(i)) });
        // `max_ps` returns its second operand when either is NaN, so a NaN input is skipped.
        m = _mm256_max_ps(v, m);
    }
    let s = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
    let s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_max_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// `v * scale` rounded to the nearest integer, ties to even, clamped to `i8`, NaN to 0: ggml's
/// x86 quantizers (`_mm256_round_ps` with `_MM_ROUND_NEAREST`, and `nearest_int` for Q8_K).
#[inline]
#[target_feature(enable = "avx2,fma")]
fn round_i8(v: __m256, scale: __m256) -> __m256i {
    let v = _mm256_mul_ps(v, scale);
    let r = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v);
    let r = _mm256_and_ps(r, _mm256_cmp_ps::<_CMP_ORD_Q>(v, v));
    let r = _mm256_min_ps(
        _mm256_max_ps(r, _mm256_set1_ps(-128.0)),
        _mm256_set1_ps(127.0),
    );
    _mm256_cvttps_epi32(r)
}

/// Quantizes 32 values at `x` with `scale` into 32 bytes at `q`; returns the sum of the quants.
///
/// # Safety
/// AVX2 must be present; `x` must point to 32 readable values and `q` to 32 writable bytes.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_32(x: *const f32, scale: f32, q: *mut u8) -> i32 {
    let s = _mm256_set1_ps(scale);
    // SAFETY: in bounds by the contract.
    let i = unsafe { [0, 8, 16, 24].map(|o| round_i8(_mm256_loadu_ps(x.add(o)), s)) };
    let sum = _mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3]));
    // The packs interleave 128-bit lanes; the permutation restores element order. The values
    // are already in -128..=127, so the saturating packs change nothing.
    let p = _mm256_packs_epi16(
        _mm256_packs_epi32(i[0], i[1]),
        _mm256_packs_epi32(i[2], i[3]),
    );
    let p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    // SAFETY: in bounds by the contract.
    unsafe { _mm256_storeu_si256(q.cast(), p) };
    let s = _mm_add_epi32(
        _mm256_castsi256_si128(sum),
        _mm256_extracti128_si256::<1>(sum),
    );
    let s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01>(s));
    _mm_cvtsi128_si32(s)
}

/// Quantizes one 32-value block into Q8_0 bytes at `y` (`d`, then the quants) as ggml's x86
/// `quantize_row_q8_0` does (scaled by `127 / amax`); returns the sum of the quants and the f32
/// scale, for Q8_1.
///
/// # Safety
/// AVX2 must be present; `x` must point to 32 readable values and `y` to 34 writable bytes.
#[target_feature(enable = "avx2,fma")]
unsafe fn q8_32(x: *const f32, y: *mut u8) -> (i32, f32) {
    // SAFETY: in bounds by the contract.
    let amax = unsafe { abs_max(x, 32) };
    let d = amax / 127.0;
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    // SAFETY: in bounds by the contract.
    unsafe {
        y.cast::<[u8; 2]>()
            .write_unaligned(f16::from_f32(d).to_le_bytes());
        (quantize_32(x, id, y.add(2)), d)
    }
}
