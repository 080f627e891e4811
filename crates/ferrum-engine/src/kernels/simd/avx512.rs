//! Four-row kernels on 512-bit vectors for the AVX-512 tier: each register holds one block of
//! two weight rows side by side (`[row a | row b]`) against the activation block broadcast to
//! both halves, so one instruction does the work of two 256-bit ones.
//!
//! This pays off only when the activation side is shared: the single-row kernels are limited by
//! the loads of block scales rather than by arithmetic, and a 512-bit single-row kernel would need
//! as many of those loads. Per activation block, the four rows share its load, its scale and its
//! zero-point correction.
//!
//! The scales of a row pair are blended into one vector, `[wd_a × 8 | wd_b × 8]`, with the two
//! table values as broadcast memory operands. The low and high halves of each 256-bit half are
//! reduced at the end into one sum per row.

use std::arch::x86_64::*;

use candle_core::quantized::GgmlDType;

use super::x86::{
    blocks, blocks4, f16_table, h, hs, hsum4, hsum_i32, hsum_i32x4, k4_scales_mins, prefetch,
    q4k_block, rd_f32, rd_u32, K4_SCALE, Q4K, Q4_0, Q4_1, Q5_0, Q8K, Q8_0, Q8_1,
};
use super::{Dot4Fn, DotFn};

/// Two 16-byte nibble fields, of rows `a` and `b`, as `[a | a | b | b]` 128-bit lanes.
///
/// # Safety
/// The CPU must support the tier; both pointers must point to 16 readable bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn pair128(a: *const u8, b: *const u8) -> __m512i {
    // SAFETY: in bounds by the contract.
    unsafe {
        let a = _mm256_broadcastsi128_si256(_mm_loadu_si128(a.cast()));
        let b = _mm256_broadcastsi128_si256(_mm_loadu_si128(b.cast()));
        _mm512_inserti64x4::<1>(_mm512_castsi256_si512(a), b)
    }
}

/// Two 32-byte fields, of rows `a` and `b`, as `[a | b]`.
///
/// # Safety
/// As [`pair128`], with 32 readable bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn pair256(a: *const u8, b: *const u8) -> __m512i {
    // SAFETY: in bounds by the contract.
    unsafe {
        let a = _mm256_loadu_si256(a.cast());
        _mm512_inserti64x4::<1>(_mm512_castsi256_si512(a), _mm256_loadu_si256(b.cast()))
    }
}

/// The 32 activation quants at `p`, in both 256-bit halves.
///
/// # Safety
/// As [`pair256`].
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn xx(p: *const u8) -> __m512i {
    // SAFETY: in bounds by the contract.
    unsafe { _mm512_broadcast_i64x4(_mm256_loadu_si256(p.cast())) }
}

/// The scales of rows `a` and `b` (the `f16`s at the two pointers) as `[a × 8 | b × 8]`.
///
/// # Safety
/// As [`h`].
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn scales(t: *const f32, a: *const u8, b: *const u8) -> __m512 {
    // SAFETY: in bounds by the contract.
    unsafe { _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(h(t, a)), _mm512_set1_ps(h(t, b))) }
}

/// The sums of the low and high 256-bit halves of `acc[0]` and `acc[1]`, scaled lane-wise by
/// `scale` first: rows 0, 1, 2, 3, each summed in the single-row kernels' order (`hsum4`).
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn finish(acc: [__m512; 2], scale: __m512) -> [f32; 4] {
    let [a, b] = acc.map(|v| _mm512_mul_ps(v, scale));
    // AVX-512 F has the 256-bit extract for doubles only; the bits are the same.
    let high = |v: __m512| _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
    hsum4([
        _mm512_castps512_ps256(a),
        high(a),
        _mm512_castps512_ps256(b),
        high(b),
    ])
}

/// The lane factors of the nibble layout of [`super::x86`]'s `nibbles16`, in both halves: the
/// high nibbles are kept in place, 16 times their value.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn nib_scale() -> __m512 {
    let q = 0.0625;
    _mm512_setr_ps(
        1.0, 1.0, 1.0, 1.0, q, q, q, q, 1.0, 1.0, 1.0, 1.0, q, q, q, q,
    )
}

/// Keeps the low nibbles in 128-bit lanes 0 and 2 and the high ones, in place, in 1 and 3.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn nib_mask() -> __m512i {
    let (lo, hi) = (0x0F0F_0F0F_0F0F_0F0F, -0x0F0F_0F0F_0F0F_0F10);
    _mm512_setr_epi64(lo, lo, hi, hi, lo, lo, hi, hi)
}

/// `-Σ c·x` over groups of four bytes: the start value that subtracts a zero point `c` from
/// the unsigned weights.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn neg_corr(c: __m512i, x: __m512i) -> __m512i {
    let z = _mm512_setzero_si512();
    _mm512_sub_epi32(z, _mm512_dpbusd_epi32(z, c, x))
}

/// Q4_0 × Q8_0 for four rows.
///
/// # Safety
/// The CPU must support the tier; every row of `w` and `x` must hold `nb` blocks.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub(super) unsafe fn q4_0_x4(nb: usize, w: [*const u8; 4], x: *const u8) -> [f32; 4] {
    let t = f16_table();
    let mask = nib_mask();
    // The zero point 8, times 16 for the high nibbles that stay in place.
    let zero = _mm512_setr_epi64(
        0x0808_0808_0808_0808,
        0x0808_0808_0808_0808,
        -0x7F7F_7F7F_7F7F_7F80,
        -0x7F7F_7F7F_7F7F_7F80,
        0x0808_0808_0808_0808,
        0x0808_0808_0808_0808,
        -0x7F7F_7F7F_7F7F_7F80,
        -0x7F7F_7F7F_7F7F_7F80,
    );
    let mut acc = [_mm512_setzero_ps(); 2];
    for i in 0..nb {
        // SAFETY: block `i` is in bounds of every row.
        unsafe {
            let xb = x.add(i * Q8_0);
            let xv = xx(xb.add(2));
            let corr = neg_corr(zero, xv);
            let xd = _mm512_set1_ps(h(t, xb));
            for (pair, acc) in acc.iter_mut().enumerate() {
                let (a, b) = (w[2 * pair].add(i * Q4_0), w[2 * pair + 1].add(i * Q4_0));
                if i % 2 == 0 {
                    prefetch(a, 1);
                    prefetch(b, 1);
                }
                let u = _mm512_and_si512(pair128(a.add(2), b.add(2)), mask);
                let p = _mm512_dpbusd_epi32(corr, u, xv);
                // ggml's order: the scales' product, then one fused multiply-add.
                let d = _mm512_mul_ps(scales(t, a, b), xd);
                *acc = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(p), *acc);
            }
        }
    }
    finish(acc, nib_scale())
}

/// Q4_1 × Q8_1 for four rows.
///
/// # Safety
/// As [`q4_0_x4`].
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub(super) unsafe fn q4_1_x4(nb: usize, w: [*const u8; 4], x: *const u8) -> [f32; 4] {
    let t = f16_table();
    let mask = nib_mask();
    let zero = _mm512_setzero_si512();
    let mut acc = [_mm512_setzero_ps(); 2];
    let mut mins = [_mm_setzero_ps(); 4];
    for i in 0..nb {
        // SAFETY: block `i` is in bounds of every row.
        unsafe {
            let xb = x.add(i * Q8_1);
            let xv = xx(xb.add(4));
            let xd = _mm512_set1_ps(h(t, xb));
            let xs = hs(t, xb.add(2));
            for (pair, acc) in acc.iter_mut().enumerate() {
                let (a, b) = (w[2 * pair].add(i * Q4_1), w[2 * pair + 1].add(i * Q4_1));
                if i % 2 == 0 {
                    prefetch(a, 1);
                    prefetch(b, 1);
                }
                let u = _mm512_and_si512(pair128(a.add(4), b.add(4)), mask);
                let p = _mm512_dpbusd_epi32(zero, u, xv);
                // ggml's order: the scales' product, then one fused multiply-add.
                let d = _mm512_mul_ps(scales(t, a, b), xd);
                *acc = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(p), *acc);
                // The min times the activation block's sum, which Q8_1 stores premultiplied.
                mins[2 * pair] = _mm_fmadd_ps(hs(t, a.add(2)), xs, mins[2 * pair]);
                mins[2 * pair + 1] = _mm_fmadd_ps(hs(t, b.add(2)), xs, mins[2 * pair + 1]);
            }
        }
    }
    let s = finish(acc, nib_scale());
    [0, 1, 2, 3].map(|r| s[r] + _mm_cvtss_f32(mins[r]))
}

/// Q5_0 × Q8_0 for four rows.
///
/// # Safety
/// As [`q4_0_x4`].
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub(super) unsafe fn q5_0_x4(nb: usize, w: [*const u8; 4], x: *const u8) -> [f32; 4] {
    let t = f16_table();
    let m4 = _mm512_set1_epi8(0x0F);
    let shift = _mm512_setr_epi64(0, 0, 4, 4, 0, 0, 4, 4);
    let (zero, bit) = (_mm512_set1_epi8(16), _mm512_set1_epi8(16));
    let mut acc = [_mm512_setzero_ps(); 2];
    for i in 0..nb {
        // SAFETY: block `i` is in bounds of every row.
        unsafe {
            let xb = x.add(i * Q8_0);
            let xv = xx(xb.add(2));
            let corr = neg_corr(zero, xv);
            let xd = _mm512_set1_ps(h(t, xb));
            for (pair, acc) in acc.iter_mut().enumerate() {
                let (a, b) = (w[2 * pair].add(i * Q5_0), w[2 * pair + 1].add(i * Q5_0));
                if i % 2 == 0 {
                    prefetch(a, 1);
                    prefetch(b, 1);
                }
                let q = _mm512_srlv_epi64(pair128(a.add(6), b.add(6)), shift);
                let q = _mm512_and_si512(q, m4);
                // The fifth bits of both rows, bit j for byte j.
                let qh = (rd_u32(a.add(2)) as u64) | ((rd_u32(b.add(2)) as u64) << 32);
                let q = _mm512_mask_add_epi8(q, qh, q, bit);
                let p = _mm512_dpbusd_epi32(corr, q, xv);
                // ggml's order: the scales' product, then one fused multiply-add.
                let d = _mm512_mul_ps(scales(t, a, b), xd);
                *acc = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(p), *acc);
            }
        }
    }
    finish(acc, _mm512_set1_ps(1.0))
}

/// Q8_0 × Q8_0 for four rows. The signed weights are made unsigned by adding 128 (flipping the
/// top bit), and the 128 times the activation sums comes off through the start value, once per
/// activation block.
///
/// # Safety
/// As [`q4_0_x4`].
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub(super) unsafe fn q8_0_x4(nb: usize, w: [*const u8; 4], x: *const u8) -> [f32; 4] {
    let t = f16_table();
    let flip = _mm512_set1_epi8(-128);
    let mut acc = [_mm512_setzero_ps(); 2];
    for i in 0..nb {
        // SAFETY: block `i` is in bounds of every row.
        unsafe {
            let xb = x.add(i * Q8_0);
            let xv = xx(xb.add(2));
            let corr = neg_corr(flip, xv);
            let xd = _mm512_set1_ps(h(t, xb));
            for (pair, acc) in acc.iter_mut().enumerate() {
                let (a, b) = (w[2 * pair].add(i * Q8_0), w[2 * pair + 1].add(i * Q8_0));
                prefetch(a, 1);
                prefetch(b, 1);
                let u = _mm512_xor_si512(pair256(a.add(2), b.add(2)), flip);
                let p = _mm512_dpbusd_epi32(corr, u, xv);
                // ggml's order: the scales' product, then one fused multiply-add.
                let d = _mm512_mul_ps(scales(t, a, b), xd);
                *acc = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(p), *acc);
            }
        }
    }
    finish(acc, _mm512_set1_ps(1.0))
}

/// Q4_K × Q8_K for four rows. Per activation block, the four rows share its quants (broadcast
/// to both halves), its scale and its 32-element sums, which meet the mins; each row's mins are
/// applied on 128-bit vectors as in the single-row kernel.
///
/// # Safety
/// As [`q4_0_x4`].
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub(super) unsafe fn q4k_x4(nb: usize, w: [*const u8; 4], x: *const u8) -> [f32; 4] {
    let t = f16_table();
    let m4 = _mm512_set1_epi8(0x0F);
    // SAFETY: the table holds eight 32-byte masks.
    let masks: [__m512i; 8] = std::array::from_fn(|j| unsafe {
        _mm512_broadcast_i64x4(_mm256_loadu_si256(K4_SCALE.as_ptr().add(j).cast()))
    });
    let mut acc = [[0f32; 2]; 4];
    for i in 0..nb {
        // SAFETY: block `i` is in bounds of every row.
        unsafe {
            let xb = x.add(i * Q8K);
            let yd = rd_f32(xb);
            let bsums = _mm256_loadu_si256(xb.add(260).cast());
            let bs = _mm_hadd_epi16(
                _mm256_castsi256_si128(bsums),
                _mm256_extracti128_si256::<1>(bsums),
            );
            for pair in 0..2 {
                let (a, b) = (w[2 * pair].add(i * Q4K), w[2 * pair + 1].add(i * Q4K));
                prefetch(a, 3);
                prefetch(b, 3);
                let (sm_a, sm_b) = (k4_scales_mins(a.add(4)), k4_scales_mins(b.add(4)));
                // The scales of both rows as 128-bit lanes [a | a | b | b].
                let sab = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(sm_a), sm_b);
                let sc = _mm512_shuffle_i64x2::<0b10_10_00_00>(sab, sab);
                let (mut s0, mut s1) = (_mm512_setzero_si512(), _mm512_setzero_si512());
                for j in 0..4 {
                    let q = pair256(a.add(16 + 32 * j), b.add(16 + 32 * j));
                    let lo = _mm512_and_si512(q, m4);
                    let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(q), m4);
                    let pl = _mm512_maddubs_epi16(lo, xx(xb.add(4 + 64 * j)));
                    let ph = _mm512_maddubs_epi16(hi, xx(xb.add(36 + 64 * j)));
                    s0 = _mm512_dpwssd_epi32(s0, _mm512_shuffle_epi8(sc, masks[2 * j]), pl);
                    s1 = _mm512_dpwssd_epi32(s1, _mm512_shuffle_epi8(sc, masks[2 * j + 1]), ph);
                }
                let sumi = _mm512_add_epi32(s0, s1);
                let halves = [
                    _mm512_castsi512_si256(sumi),
                    _mm512_extracti64x4_epi64::<1>(sumi),
                ];
                // Each row's block in llama.cpp's repacked order (see `q4k_block`).
                for (r, (wb, sm)) in [(a, sm_a), (b, sm_b)].into_iter().enumerate() {
                    let pm = _mm_madd_epi16(_mm256_extracti128_si256::<1>(sm), bs);
                    let (d, dmin) = (yd * h(t, wb), yd * h(t, wb.add(2)));
                    let acc = &mut acc[2 * pair + r];
                    *acc = q4k_block(*acc, hsum_i32(halves[r]), hsum_i32x4(pm), d, dmin);
                }
            }
        }
    }
    acc.map(|[a, m]| a - m)
}

// The safe entry points. Only `dot4_fn` hands them out, after the caller checked that the CPU
// supports the AVX-512 tier; the lengths are checked here.

fn q4_0(n: usize, w: [&[u8]; 4], x: &[u8]) -> [f32; 4] {
    let nb = blocks4(n, 32, &w, Q4_0, x, Q8_0);
    // SAFETY: the tier is supported and all rows hold `nb` blocks.
    unsafe { q4_0_x4(nb, w.map(<[u8]>::as_ptr), x.as_ptr()) }
}

fn q4_1(n: usize, w: [&[u8]; 4], x: &[u8]) -> [f32; 4] {
    let nb = blocks4(n, 32, &w, Q4_1, x, Q8_1);
    // SAFETY: as in `q4_0`.
    unsafe { q4_1_x4(nb, w.map(<[u8]>::as_ptr), x.as_ptr()) }
}

fn q5_0(n: usize, w: [&[u8]; 4], x: &[u8]) -> [f32; 4] {
    let nb = blocks4(n, 32, &w, Q5_0, x, Q8_0);
    // SAFETY: as in `q4_0`.
    unsafe { q5_0_x4(nb, w.map(<[u8]>::as_ptr), x.as_ptr()) }
}

fn q8_0(n: usize, w: [&[u8]; 4], x: &[u8]) -> [f32; 4] {
    let nb = blocks4(n, 32, &w, Q8_0, x, Q8_0);
    // SAFETY: as in `q4_0`.
    unsafe { q8_0_x4(nb, w.map(<[u8]>::as_ptr), x.as_ptr()) }
}

fn q4k(n: usize, w: [&[u8]; 4], x: &[u8]) -> [f32; 4] {
    let nb = blocks4(n, 256, &w, Q4K, x, Q8K);
    // SAFETY: as in `q4_0`.
    unsafe { q4k_x4(nb, w.map(<[u8]>::as_ptr), x.as_ptr()) }
}

/// Q4_K · Q8_K for one row on 512-bit vectors, the decode kernel: the same numbers as the
/// 256-bit `q4k` (the GEMV order of llama.cpp's repacked Q4_K kernels), since only the exact
/// integer sums of a block are computed differently: each register holds the low and the high
/// nibbles of 32 weight bytes (sub-blocks `2j` and `2j + 1`, one merge-masked shift) against the
/// 64 activation bytes they meet, and one `vpdpwssd` applies both sub-blocks' scales. Half the
/// instructions of the 256-bit kernel per block; decode streams Q4_K rows faster than one core
/// reads memory only with it (`kernel_bench`).
///
/// # Safety
/// The CPU must support the tier; `w` and `x` must hold `nb` blocks.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn q4k_row_k(nb: usize, w: *const u8, x: *const u8) -> f32 {
    let t = f16_table();
    let m4 = _mm512_set1_epi8(0x0F);
    // SAFETY: the masks are 8 entries of 32 bytes.
    let scale_mask: [__m512i; 4] = std::array::from_fn(|j| unsafe {
        let lo = _mm256_loadu_si256(K4_SCALE[2 * j].as_ptr().cast());
        let hi = _mm256_loadu_si256(K4_SCALE[2 * j + 1].as_ptr().cast());
        _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi)
    });
    let mut acc = [0f32; 2];
    for i in 0..nb {
        // SAFETY: block `i` is in bounds of both rows.
        unsafe {
            let (wb, xb) = (w.add(i * Q4K), x.add(i * Q8K));
            prefetch(wb, 3);
            let yd = rd_f32(xb);
            let d = yd * h(t, wb);
            let dmin = yd * h(t, wb.add(2));
            let sm = k4_scales_mins(wb.add(4));
            let bsums = _mm256_loadu_si256(xb.add(260).cast());
            let bs = _mm_hadd_epi16(
                _mm256_castsi256_si128(bsums),
                _mm256_extracti128_si256::<1>(bsums),
            );
            let msum = hsum_i32x4(_mm_madd_epi16(_mm256_extracti128_si256::<1>(sm), bs));
            let sc = _mm512_broadcast_i32x4(_mm256_castsi256_si128(sm));
            let (mut s0, mut s1) = (_mm512_setzero_si512(), _mm512_setzero_si512());
            for (j, mask) in scale_mask.iter().enumerate() {
                let q = _mm512_broadcast_i64x4(_mm256_loadu_si256(wb.add(16 + 32 * j).cast()));
                // Low nibbles in the low half, high nibbles in the high half.
                let q = _mm512_and_si512(_mm512_mask_srli_epi16(q, 0xFFFF_0000, q, 4), m4);
                let p = _mm512_maddubs_epi16(q, _mm512_loadu_si512(xb.add(4 + 64 * j).cast()));
                let s = _mm512_dpwssd_epi32(
                    if j & 1 == 0 { s0 } else { s1 },
                    _mm512_shuffle_epi8(sc, *mask),
                    p,
                );
                if j & 1 == 0 {
                    s0 = s;
                } else {
                    s1 = s;
                }
            }
            let isum = _mm512_reduce_add_epi32(_mm512_add_epi32(s0, s1));
            acc = q4k_block(acc, isum, msum, d, dmin);
        }
    }
    acc[0] - acc[1]
}

fn q4k_row(n: usize, w: &[u8], x: &[u8]) -> f32 {
    let nb = blocks(n, 256, w, Q4K, x, Q8K);
    // SAFETY: the caller checked the tier; `blocks` checked the lengths.
    unsafe { q4k_row_k(nb, w.as_ptr(), x.as_ptr()) }
}

/// The 512-bit one-row kernel for weight type `w`, if there is one; as [`dot4_fn`].
pub(super) fn dot_fn(w: GgmlDType) -> Option<DotFn> {
    Some(match w {
        GgmlDType::Q4K => q4k_row,
        _ => return None,
    })
}

/// The 512-bit four-row kernel for weight type `w`, if there is one; the caller has checked that
/// the CPU supports the AVX-512 tier.
pub(super) fn dot4_fn(w: GgmlDType) -> Option<Dot4Fn> {
    Some(match w {
        GgmlDType::Q4_0 => q4_0,
        GgmlDType::Q4_1 => q4_1,
        GgmlDType::Q5_0 => q5_0,
        GgmlDType::Q8_0 => q8_0,
        GgmlDType::Q4K => q4k,
        _ => return None,
    })
}
