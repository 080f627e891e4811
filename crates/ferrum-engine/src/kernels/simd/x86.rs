//! x86-64 dot-product kernels over raw GGUF block bytes, one copy per [`Tier`].
//!
//! The kernels are written once, inside the `tier_kernels!` macro, and stamped out per tier with
//! that tier's `#[target_feature]` set and its integer dot-product primitives. A macro rather than
//! generics because a primitive only inlines into a function compiled with the same features, and
//! an un-inlined intrinsic call per block would cost more than the work it does.
//!
//! Every kernel reads blocks through raw pointers with unaligned loads (weight rows start at any
//! multiple of the block size), accumulates the scaled per-block integer sums in `f32` vector
//! registers (two blocks in flight, so that two FMA chains overlap), and sums those horizontally
//! once at the end. Block scales are `f16`; they are widened through a 256 KiB lookup table and
//! used as broadcast memory operands, which costs loads only, where an F16C conversion costs two
//! arithmetic uops plus a broadcast on the shuffle port per scale. Only the few hundred entries
//! that a model's scales hit stay in cache.
//!
//! The 512-bit four-row kernels of the AVX-512 tier are in `super::avx512`.

use std::arch::x86_64::*;
use std::sync::LazyLock;

use candle_core::quantized::GgmlDType;

use super::{Dot4Fn, Tier};
use crate::kernels::DotFn;

/// Bytes per block of each format (ggml's `#[repr(C)]` layouts, little endian, no padding).
pub(super) const Q4_0: usize = 18;
pub(super) const Q4_1: usize = 20;
pub(super) const Q5_0: usize = 22;
pub(super) const Q8_0: usize = 34;
pub(super) const Q8_1: usize = 36;
pub(super) const Q4K: usize = 144;
const Q6K: usize = 210;
pub(super) const Q8K: usize = 292;

/// `f16` bit pattern to `f32`, for all 65536 patterns.
static F16_TABLE: LazyLock<Box<[f32]>> = LazyLock::new(|| {
    (0..=u16::MAX)
        .map(|b| half::f16::from_bits(b).to_f32())
        .collect()
});

pub(super) fn f16_table() -> *const f32 {
    F16_TABLE.as_ptr()
}

/// The `f16` at `p`, widened through the table `t`.
///
/// # Safety
/// `p` must point to two readable bytes and `t` to [`F16_TABLE`].
#[inline(always)]
pub(super) unsafe fn h(t: *const f32, p: *const u8) -> f32 {
    unsafe { *t.add(p.cast::<u16>().read_unaligned() as usize) }
}

/// The `f16` at `p`, widened through the table `t` and broadcast to eight lanes. Used as an
/// operand of `mul`/`fmadd`, it becomes a broadcast memory operand (no shuffle-port work), which
/// is why block scales are applied as `cvt(p) · xd` then `fmadd(·, wd, acc)` and not as
/// `p · (wd · xd)`: LLVM folds a product of two broadcasts into a scalar multiply and a
/// register broadcast.
///
/// # Safety
/// As [`h`].
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn hb(t: *const f32, p: *const u8) -> __m256 {
    _mm256_set1_ps(unsafe { h(t, p) })
}

/// The `f16` at `p` widened through the table `t` into lane 0, the other lanes zero. Scalar
/// sums kept in such vectors are updated with full-width `_mm_fmadd_ps` (the zero lanes stay
/// zero): `_mm_fmadd_ss` makes LLVM add a blend per use to preserve the upper lanes.
///
/// # Safety
/// As [`h`].
#[inline]
#[target_feature(enable = "avx2")]
pub(super) unsafe fn hs(t: *const f32, p: *const u8) -> __m128 {
    unsafe { _mm_load_ss(t.add(p.cast::<u16>().read_unaligned() as usize)) }
}

/// # Safety
/// `p` must point to four readable bytes.
#[inline(always)]
pub(super) unsafe fn rd_u32(p: *const u8) -> u32 {
    unsafe { p.cast::<u32>().read_unaligned() }
}

/// # Safety
/// `p` must point to four readable bytes.
#[inline(always)]
pub(super) unsafe fn rd_f32(p: *const u8) -> f32 {
    unsafe { p.cast::<f32>().read_unaligned() }
}

/// # Safety
/// `p` must point to 32 readable bytes.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn ld(p: *const u8) -> __m256i {
    unsafe { _mm256_loadu_si256(p.cast()) }
}

/// Sums the eight lanes of `v`, in ggml's order (`hsum_float_8`): lane `i` plus lane `i + 4`,
/// then lanes 0 + 2 and 1 + 3 of that, then those two.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// Sums the eight lanes of each of four vectors, each in [`hsum`]'s order: the four-row kernels
/// give every row exactly the single-row kernel's result.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(super) fn hsum4(v: [__m256; 4]) -> [f32; 4] {
    let [t0, t1, t2, t3] =
        v.map(|x| _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps::<1>(x)));
    // Transpose, so that vector `c[j]` holds lane `j` of every row.
    let (lo01, hi01) = (_mm_unpacklo_ps(t0, t1), _mm_unpackhi_ps(t0, t1));
    let (lo23, hi23) = (_mm_unpacklo_ps(t2, t3), _mm_unpackhi_ps(t2, t3));
    let c0 = _mm_movelh_ps(lo01, lo23);
    let c1 = _mm_movehl_ps(lo23, lo01);
    let c2 = _mm_movelh_ps(hi01, hi23);
    let c3 = _mm_movehl_ps(hi23, hi01);
    let s = _mm_add_ps(_mm_add_ps(c0, c2), _mm_add_ps(c1, c3));
    let mut out = [0f32; 4];
    // SAFETY: `out` has room for four floats.
    unsafe { _mm_storeu_ps(out.as_mut_ptr(), s) };
    out
}

/// `acc + (dw · dx) · float(p)`: one block of a 32-weight format added to its row's accumulator
/// the way ggml's x86 `ggml_vec_dot_*` kernels do it (the two f16 scales multiplied first, then
/// one fused multiply-add per lane, blocks in order). Following ggml's order exactly keeps
/// ferrum's logits bit-close to llama.cpp's: a one-ulp difference in a dot product can flip the
/// rounding of the next activation quantization and grow from layer to layer.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(super) fn ggml_fma(dw: __m256, dx: __m256, p: __m256i, acc: __m256) -> __m256 {
    _mm256_fmadd_ps(_mm256_mul_ps(dw, dx), _mm256_cvtepi32_ps(p), acc)
}

/// The sum of the eight `i32` lanes of `v` (exact).
#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn hsum_i32(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    hsum_i32x4(s)
}

/// The sum of the four `i32` lanes of `v` (exact).
#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn hsum_i32x4(s: __m128i) -> i32 {
    let s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01>(s));
    _mm_cvtsi128_si32(s)
}

/// One Q4_K super-block of one row added the way llama.cpp's repacked Q4_K kernels
/// (`ggml_gemv_q4_K_8x8_q8_K`, which llama.cpp uses for every Q4_K matrix on AVX2 CPUs) add it:
/// the block's whole integer sum and its whole min correction, each converted once and
/// accumulated with one fused multiply-add, `acc += isum · (d · dx)`, `acc_m += msum · (dmin ·
/// dx)`. The row's result is `acc - acc_m`.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(super) fn q4k_block(acc: [f32; 2], isum: i32, msum: i32, d: f32, dmin: f32) -> [f32; 2] {
    let f = |a: f32, i: i32, s: f32| {
        let r = _mm_fmadd_ss(
            _mm_cvtsi32_ss(_mm_setzero_ps(), i),
            _mm_set_ss(s),
            _mm_set_ss(a),
        );
        _mm_cvtss_f32(r)
    };
    [f(acc[0], isum, d), f(acc[1], msum, dmin)]
}

/// One Q6_K super-block of one row added as llama.cpp's tiled K-quant GEMM adds it (`ggml-cpu/
/// tiled`, used for Q6_K when a micro-batch has 8 rows or more): the block's whole integer sum
/// times the weight scale, then one fused multiply-add with the activation scale.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(super) fn q6k_tiled_block(acc: f32, isum: i32, wd: f32, xd: f32) -> f32 {
    let res = _mm_mul_ss(_mm_cvtsi32_ss(_mm_setzero_ps(), isum), _mm_set_ss(wd));
    _mm_cvtss_f32(_mm_fmadd_ss(res, _mm_set_ss(xd), _mm_set_ss(acc)))
}

/// Unpacks the 16 bytes at `p` into 32 nibbles: the low nibbles in bytes 0..16 and the high ones
/// in bytes 16..32, which is the element order of ggml's 32-weight blocks. A broadcast load and a
/// per-lane variable shift keep this off the shuffle port.
///
/// # Safety
/// `p` must point to 16 readable bytes.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn nibbles(p: *const u8) -> __m256i {
    let b = _mm256_broadcastsi128_si256(unsafe { _mm_loadu_si128(p.cast()) });
    let b = _mm256_srlv_epi64(b, _mm256_set_epi64x(4, 4, 0, 0));
    _mm256_and_si256(b, _mm256_set1_epi8(0x0F))
}

/// Unpacks 16 bytes of nibbles for the VNNI tiers: the low nibbles in bytes 0..16 as with
/// [`nibbles`], but the high ones left in place, i.e. 16 times their value, in bytes 16..32. This
/// saves the shift; `vpdpbusd` cannot saturate, and the accumulator lanes 4..8 that collect the
/// high halves are divided by 16 at the end ([`NIB_SCALE_VNNI`]), which is exact.
///
/// # Safety
/// `p` must point to 16 readable bytes.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn nibbles16(p: *const u8) -> __m256i {
    let b = _mm256_broadcastsi128_si256(unsafe { _mm_loadu_si128(p.cast()) });
    _mm256_and_si256(
        b,
        _mm256_set_epi64x(
            -0x0F0F_0F0F_0F0F_0F10,
            -0x0F0F_0F0F_0F0F_0F10,
            0x0F0F_0F0F_0F0F_0F0F,
            0x0F0F_0F0F_0F0F_0F0F,
        ),
    )
}

/// The factors that undo each tier's nibble layout in the accumulator lanes.
const NIB_SCALE_AVX2: [f32; 8] = [1.0; 8];
const NIB_SCALE_VNNI: [f32; 8] = [1.0, 1.0, 1.0, 1.0, 0.0625, 0.0625, 0.0625, 0.0625];

/// Q4_0's zero point per byte in each tier's nibble layout (8, or 8 · 16 for the high nibbles
/// that [`nibbles16`] leaves in place).
const Q4_0_ZERO_AVX2: [i8; 2] = [8, 8];
const Q4_0_ZERO_VNNI: [i8; 2] = [8, -128];

// The per-tier integer primitives. `dp*` are `acc + Σ u8·i8` over groups of four bytes, `dpw*`
// are `acc + Σ i16·i16` over pairs of words, `dpx*(u, s, xcorr*(c, s))` is `Σ (u - c)·s` over
// groups of four bytes for a constant `c` (the zero point of Q4_0 and Q5_0, whose weights are
// stored as unsigned `q + c`), where the correction depends on the activation alone and so is
// computed once per activation block, and `hibits*` add a 32-bit mask, spread into bytes of
// 0x10, to the nibbles (Q5_0's fifth bits).

/// AVX2 has no 4-way byte dot product: `maddubs` makes 16-bit pair sums (which cannot saturate
/// for the value ranges used here, at most 2 * 128 * 127) and `madd` widens them.
#[inline]
#[target_feature(enable = "avx2")]
fn dp_avx2(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
    let p = _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
    _mm256_add_epi32(acc, p)
}

#[inline]
#[target_feature(enable = "avx2")]
fn dpw_avx2(acc: __m256i, a: __m256i, b: __m256i) -> __m256i {
    _mm256_add_epi32(acc, _mm256_madd_epi16(a, b))
}

/// The zero-point correction `c·s` of an activation block, kept in 16 bits: AVX2 subtracts it
/// before widening, which saves one `madd` per weight block.
#[inline]
#[target_feature(enable = "avx2")]
fn xcorr_avx2(c: __m256i, s: __m256i) -> __m256i {
    _mm256_maddubs_epi16(c, s)
}

#[inline]
#[target_feature(enable = "avx2")]
fn dpx_avx2(u: __m256i, s: __m256i, corr: __m256i) -> __m256i {
    let p = _mm256_sub_epi16(_mm256_maddubs_epi16(u, s), corr);
    _mm256_madd_epi16(p, _mm256_set1_epi16(1))
}

/// Adds Q5_0's fifth bits (`qh`, bit j for byte j) to the nibbles `q`.
#[inline]
#[target_feature(enable = "avx2")]
fn hibits_avx2(q: __m256i, qh: u32) -> __m256i {
    // Byte j of the result looks at byte j / 8 of `qh` and tests bit j % 8.
    let shuf = _mm256_set_epi64x(
        0x0303_0303_0303_0303,
        0x0202_0202_0202_0202,
        0x0101_0101_0101_0101,
        0,
    );
    let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(qh as i32), shuf);
    let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
    let set = _mm256_cmpeq_epi8(_mm256_and_si256(bytes, bit), bit);
    _mm256_or_si256(q, _mm256_and_si256(set, _mm256_set1_epi8(0x10)))
}

#[inline]
#[target_feature(enable = "avx2,avxvnni")]
fn dp_avxvnni(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
    _mm256_dpbusd_avx_epi32(acc, u, s)
}

#[inline]
#[target_feature(enable = "avx2,avxvnni")]
fn dpw_avxvnni(acc: __m256i, a: __m256i, b: __m256i) -> __m256i {
    _mm256_dpwssd_avx_epi32(acc, a, b)
}

/// With VNNI the correction is negated once and then serves as the accumulator's start value,
/// so each weight block costs one instruction.
#[inline]
#[target_feature(enable = "avx2,avxvnni")]
fn xcorr_avxvnni(c: __m256i, s: __m256i) -> __m256i {
    let z = _mm256_setzero_si256();
    _mm256_sub_epi32(z, _mm256_dpbusd_avx_epi32(z, c, s))
}

#[inline]
#[target_feature(enable = "avx2,avxvnni")]
fn dpx_avxvnni(u: __m256i, s: __m256i, corr: __m256i) -> __m256i {
    _mm256_dpbusd_avx_epi32(corr, u, s)
}

#[inline]
#[target_feature(enable = "avx2,avx512f,avx512vl,avx512vnni")]
fn dp_avx512(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
    _mm256_dpbusd_epi32(acc, u, s)
}

#[inline]
#[target_feature(enable = "avx2,avx512f,avx512vl,avx512vnni")]
fn dpw_avx512(acc: __m256i, a: __m256i, b: __m256i) -> __m256i {
    _mm256_dpwssd_epi32(acc, a, b)
}

/// With VNNI the correction is negated once and then serves as the accumulator's start value,
/// so each weight block costs one instruction.
#[inline]
#[target_feature(enable = "avx2,avx512f,avx512vl,avx512vnni")]
fn xcorr_avx512(c: __m256i, s: __m256i) -> __m256i {
    let z = _mm256_setzero_si256();
    _mm256_sub_epi32(z, _mm256_dpbusd_epi32(z, c, s))
}

#[inline]
#[target_feature(enable = "avx2,avx512f,avx512vl,avx512vnni")]
fn dpx_avx512(u: __m256i, s: __m256i, corr: __m256i) -> __m256i {
    _mm256_dpbusd_epi32(corr, u, s)
}

/// With AVX-512 the mask register does the spreading: one masked byte add.
#[inline]
#[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl")]
fn hibits_avx512(q: __m256i, qh: u32) -> __m256i {
    _mm256_mask_add_epi8(q, qh, q, _mm256_set1_epi8(0x10))
}

/// A `vpshufb` mask that fills the low 128-bit lane with copies of 16-bit word `lo` of that lane
/// and the high lane with copies of word `hi` of its lane.
const fn word_bcast(lo: u8, hi: u8) -> [u8; 32] {
    let mut m = [0u8; 32];
    let mut i = 0;
    while i < 16 {
        m[i] = 2 * lo + (i as u8 & 1);
        m[16 + i] = 2 * hi + (i as u8 & 1);
        i += 1;
    }
    m
}

/// For Q4_K: mask `j` fills the whole vector with word `j` of a lane holding 8 scales.
pub(super) static K4_SCALE: [[u8; 32]; 8] = [
    word_bcast(0, 0),
    word_bcast(1, 1),
    word_bcast(2, 2),
    word_bcast(3, 3),
    word_bcast(4, 4),
    word_bcast(5, 5),
    word_bcast(6, 6),
    word_bcast(7, 7),
];

/// For Q6_K: mask `k` fills the low lane with word `2k` and the high lane with word `2k + 1`,
/// the scales of the two 16-element halves of 32 consecutive weights.
static K6_SCALE: [[u8; 32]; 4] = [
    word_bcast(0, 1),
    word_bcast(2, 3),
    word_bcast(4, 5),
    word_bcast(6, 7),
];

/// # Safety
/// `i` must be below 8.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn k4_scale(i: usize) -> __m256i {
    unsafe { _mm256_loadu_si256(K4_SCALE.as_ptr().add(i).cast()) }
}

/// # Safety
/// `i` must be below 4.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn k6_scale(i: usize) -> __m256i {
    unsafe { _mm256_loadu_si256(K6_SCALE.as_ptr().add(i).cast()) }
}

/// Unpacks Q4_K's 12 packed bytes of 6-bit scales and mins (ggml's `get_scale_min_k4`) into
/// sixteen 16-bit words: the eight scales, then the eight mins. Byte `j` of the scales and mins
/// for `j < 4` is the low six bits of packed byte `j` (scales) or `j + 4` (mins); for `j >= 4`,
/// a nibble of packed byte `j + 4` (low for scales, high for mins) with the top two bits of
/// packed byte `j - 4` (scales) or `j` (mins) above it. Two byte shuffles gather the sources,
/// which keeps this off the scalar ports and costs two shuffles rather than four inserts.
///
/// # Safety
/// `p` must point to 16 readable bytes (the 12 packed bytes and 4 more, which are ignored).
#[inline]
#[target_feature(enable = "avx2")]
pub(super) unsafe fn k4_scales_mins(p: *const u8) -> __m256i {
    let v = unsafe { _mm_loadu_si128(p.cast()) };
    // The low bits: bytes 0..4, 8..12 (low nibbles), 4..8, 8..12 (high nibbles).
    let lo_src = _mm_shuffle_epi8(
        v,
        _mm_setr_epi8(0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 8, 9, 10, 11),
    );
    let lo_mask = _mm_setr_epi8(63, 63, 63, 63, 15, 15, 15, 15, 63, 63, 63, 63, 0, 0, 0, 0);
    let hi_nib_mask = _mm_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 15, 15, 15, 15);
    let low = _mm_or_si128(
        _mm_and_si128(lo_src, lo_mask),
        _mm_and_si128(_mm_srli_epi16::<4>(lo_src), hi_nib_mask),
    );
    // The top two bits of bytes 0..4 (scales 4..8) and 4..8 (mins 4..8), moved to bits 4 and 5.
    let top_src = _mm_shuffle_epi8(
        v,
        _mm_setr_epi8(-1, -1, -1, -1, 0, 1, 2, 3, -1, -1, -1, -1, 4, 5, 6, 7),
    );
    let top = _mm_and_si128(_mm_srli_epi16::<2>(top_src), _mm_set1_epi8(0x30));
    _mm256_cvtepu8_epi16(_mm_or_si128(low, top))
}

/// Checks a dot product's arguments and returns the number of blocks.
/// How far ahead of the weights being multiplied the kernels prefetch. One core streaming from
/// DRAM is limited by how many cache misses it has in flight, not by the memory bus: on the dev
/// VM (Xeon, 2 cores) a one-row Q4_K kernel read a 246 MiB matrix at 7.3 GB/s without it and
/// 10.8 GB/s with it, and gpt-4.1's decode went from 12.2 to 18-20 tok/s (2048 and 8192 bytes
/// measured within noise of this; `kernel_bench`, `ferrum bench`).
const PREFETCH_BYTES: usize = 4096;

/// Prefetches `lines` cache lines starting [`PREFETCH_BYTES`] after `p` into L1. A prefetch is a
/// hint: an address past the end of the weights is harmless.
#[inline(always)]
pub(super) fn prefetch(p: *const u8, lines: usize) {
    for l in 0..lines {
        // SAFETY: a prefetch never faults; `wrapping_add` keeps the address computation defined.
        unsafe {
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH_BYTES + 64 * l).cast::<i8>())
        };
    }
}

pub(super) fn blocks(
    n: usize,
    block: usize,
    w: &[u8],
    wsize: usize,
    x: &[u8],
    xsize: usize,
) -> usize {
    assert_eq!(
        n % block,
        0,
        "{n} is not a multiple of the block size {block}"
    );
    let nb = n / block;
    assert!(
        w.len() >= nb * wsize,
        "weight row shorter than {n} elements"
    );
    assert!(
        x.len() >= nb * xsize,
        "activation row shorter than {n} elements"
    );
    nb
}

/// Checks a four-row call and returns the number of blocks.
pub(super) fn blocks4(
    n: usize,
    block: usize,
    w: &[&[u8]; 4],
    wsize: usize,
    x: &[u8],
    xsize: usize,
) -> usize {
    let nb = blocks(n, block, w[0], wsize, x, xsize);
    for row in &w[1..] {
        assert!(
            row.len() >= nb * wsize,
            "weight row shorter than {n} elements"
        );
    }
    nb
}

/// Stamps out every kernel for one tier: the module name, its `target_feature` list, and the
/// tier's primitives (see `dp_avx2` and friends).
macro_rules! tier_kernels {
    (
        $tier:ident,
        $feat:tt,
        $dp:ident,
        $dpw:ident,
        $xcorr:ident,
        $dpx:ident,
        $hibits:ident,
        $nib:ident,
        $nib_scale:ident,
        $q4_zero:ident
    ) => {
        pub(super) mod $tier {
            use super::*;

            /// The accumulator lanes' scale factors for this tier's nibble layout (see
            /// [`nibbles16`]).
            #[inline]
            #[target_feature(enable = $feat)]
            fn nib_scale() -> __m256 {
                // SAFETY: the constant holds eight floats.
                unsafe { _mm256_loadu_ps($nib_scale.as_ptr()) }
            }

            /// Q4_0's zero point in this tier's nibble layout.
            #[inline]
            #[target_feature(enable = $feat)]
            fn q4_zero() -> __m256i {
                let [lo, hi] = $q4_zero;
                _mm256_set_m128i(_mm_set1_epi8(hi), _mm_set1_epi8(lo))
            }

            // The 32-weight formats: a step function per block, and kernels that interleave two
            // blocks into separate accumulators (named variables, so that they stay in registers
            // and the two FMA chains overlap).

            /// Adds block `wb` · block `xb` of Q4_0 · Q8_0 to `acc`.
            ///
            /// # Safety
            /// The CPU must support the tier; both pointers must point to whole blocks.
            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn q4_0_step(
                t: *const f32,
                wb: *const u8,
                xb: *const u8,
                acc: __m256,
            ) -> __m256 {
                // SAFETY: whole blocks by the contract.
                unsafe {
                    let xv = ld(xb.add(2));
                    let p = $dpx($nib(wb.add(2)), xv, $xcorr(q4_zero(), xv));
                    ggml_fma(hb(t, wb), hb(t, xb), p, acc)
                }
            }

            /// Adds block `wb` · block `xb` of Q4_1 · Q8_1 to `acc`, and the min times the
            /// activation block's sum (which Q8_1 stores premultiplied by its scale) to `m`.
            ///
            /// # Safety
            /// As [`q4_0_step`].
            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn q4_1_step(
                t: *const f32,
                wb: *const u8,
                xb: *const u8,
                acc: __m256,
                m: __m128,
            ) -> (__m256, __m128) {
                // SAFETY: whole blocks by the contract.
                unsafe {
                    let p = $dp(_mm256_setzero_si256(), $nib(wb.add(4)), ld(xb.add(4)));
                    (
                        ggml_fma(hb(t, wb), hb(t, xb), p, acc),
                        _mm_fmadd_ps(hs(t, wb.add(2)), hs(t, xb.add(2)), m),
                    )
                }
            }

            /// Adds block `wb` · block `xb` of Q5_0 · Q8_0 to `acc`.
            ///
            /// # Safety
            /// As [`q4_0_step`].
            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn q5_0_step(
                t: *const f32,
                wb: *const u8,
                xb: *const u8,
                acc: __m256,
            ) -> __m256 {
                // SAFETY: whole blocks by the contract.
                unsafe {
                    let xv = ld(xb.add(2));
                    let q = $hibits(nibbles(wb.add(6)), rd_u32(wb.add(2)));
                    let p = $dpx(q, xv, $xcorr(_mm256_set1_epi8(16), xv));
                    ggml_fma(hb(t, wb), hb(t, xb), p, acc)
                }
            }

            /// Adds block `wb` · block `xb` of Q8_0 · Q8_0 to `acc`.
            ///
            /// # Safety
            /// As [`q4_0_step`].
            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn q8_0_step(
                t: *const f32,
                wb: *const u8,
                xb: *const u8,
                acc: __m256,
            ) -> __m256 {
                // SAFETY: whole blocks by the contract.
                unsafe {
                    let (qw, qx) = (ld(wb.add(2)), ld(xb.add(2)));
                    // Signed times signed: move the weight's sign onto the activation.
                    let u = _mm256_sign_epi8(qw, qw);
                    let p = $dp(_mm256_setzero_si256(), u, _mm256_sign_epi8(qx, qw));
                    ggml_fma(hb(t, wb), hb(t, xb), p, acc)
                }
            }

            /// # Safety
            /// The CPU must support the tier; `w` and `x` must hold `nb` blocks.
            #[target_feature(enable = $feat)]
            unsafe fn q4_0_k(nb: usize, w: *const u8, x: *const u8) -> f32 {
                let t = f16_table();
                // One accumulator, blocks in order: ggml's summation order (see `ggml_fma`).
                let mut a0 = _mm256_setzero_ps();
                for i in 0..nb {
                    // SAFETY: `i < nb`.
                    if i % 2 == 0 {
                        prefetch(w.wrapping_add(i * Q4_0), 1);
                    }
                    a0 = unsafe { q4_0_step(t, w.add(i * Q4_0), x.add(i * Q8_0), a0) };
                }
                hsum(_mm256_mul_ps(a0, nib_scale()))
            }

            /// # Safety
            /// As [`q4_0_k`].
            #[target_feature(enable = $feat)]
            unsafe fn q4_1_k(nb: usize, w: *const u8, x: *const u8) -> f32 {
                let t = f16_table();
                // As in `q4_0_k`; the min corrections are summed apart and added last, as ggml
                // does.
                let (mut a0, mut m0) = (_mm256_setzero_ps(), _mm_setzero_ps());
                for i in 0..nb {
                    // SAFETY: `i < nb`.
                    if i % 2 == 0 {
                        prefetch(w.wrapping_add(i * Q4_1), 1);
                    }
                    (a0, m0) = unsafe { q4_1_step(t, w.add(i * Q4_1), x.add(i * Q8_1), a0, m0) };
                }
                hsum(_mm256_mul_ps(a0, nib_scale())) + _mm_cvtss_f32(m0)
            }

            /// # Safety
            /// As [`q4_0_k`].
            #[target_feature(enable = $feat)]
            unsafe fn q5_0_k(nb: usize, w: *const u8, x: *const u8) -> f32 {
                let t = f16_table();
                // One accumulator, blocks in order: ggml's summation order (see `ggml_fma`).
                let mut a0 = _mm256_setzero_ps();
                for i in 0..nb {
                    // SAFETY: `i < nb`.
                    if i % 2 == 0 {
                        prefetch(w.wrapping_add(i * Q5_0), 1);
                    }
                    a0 = unsafe { q5_0_step(t, w.add(i * Q5_0), x.add(i * Q8_0), a0) };
                }
                hsum(a0)
            }

            /// # Safety
            /// As [`q4_0_k`].
            #[target_feature(enable = $feat)]
            unsafe fn q8_0_k(nb: usize, w: *const u8, x: *const u8) -> f32 {
                let t = f16_table();
                // One accumulator, blocks in order: ggml's summation order (see `ggml_fma`).
                let mut a0 = _mm256_setzero_ps();
                for i in 0..nb {
                    // SAFETY: `i < nb`.
                    prefetch(w.wrapping_add(i * Q8_0), 1);
                    a0 = unsafe { q8_0_step(t, w.add(i * Q8_0), x.add(i * Q8_0), a0) };
                }
                hsum(a0)
            }

            /// Q4_K · Q8_K in llama.cpp's repacked order: `GROUPED` gives its GEMM's order (one
            /// fused multiply-add per 64 weights, for activation rows in groups of four), else
            /// its GEMV's (one per super-block); see `q4k_block`.
            ///
            /// # Safety
            /// As [`q4_0_k`].
            #[target_feature(enable = $feat)]
            unsafe fn q4k_k<const GROUPED: bool>(nb: usize, w: *const u8, x: *const u8) -> f32 {
                let t = f16_table();
                let m4 = _mm256_set1_epi8(0x0F);
                let mut acc = [0f32; 2];
                for i in 0..nb {
                    // SAFETY: block `i` is in bounds of both rows; the scale masks are indexed
                    // below 8.
                    unsafe {
                        let (wb, xb) = (w.add(i * Q4K), x.add(i * Q8K));
                        prefetch(wb, 3);
                        let yd = rd_f32(xb);
                        let d = yd * h(t, wb);
                        let dmin = yd * h(t, wb.add(2));
                        let sm = k4_scales_mins(wb.add(4));
                        // The mins meet the activation's 16-element sums, added in pairs to match
                        // the 32-element sub-blocks.
                        let bsums = ld(xb.add(260));
                        let bs = _mm_hadd_epi16(
                            _mm256_castsi256_si128(bsums),
                            _mm256_extracti128_si256::<1>(bsums),
                        );
                        let pm = _mm_madd_epi16(_mm256_extracti128_si256::<1>(sm), bs);

                        let sc = _mm256_permute2x128_si256::<0>(sm, sm);
                        // Two integer sums, so that the `vpdpwssd` latency chains overlap.
                        let (mut s0, mut s1) = (_mm256_setzero_si256(), _mm256_setzero_si256());
                        let mut pms = [0i32; 4];
                        _mm_storeu_si128(pms.as_mut_ptr().cast(), pm);
                        for j in 0..4 {
                            let q = ld(wb.add(16 + 32 * j));
                            let lo = _mm256_and_si256(q, m4);
                            let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(q), m4);
                            let pl = _mm256_maddubs_epi16(lo, ld(xb.add(4 + 64 * j)));
                            let ph = _mm256_maddubs_epi16(hi, ld(xb.add(36 + 64 * j)));
                            if GROUPED {
                                let z = _mm256_setzero_si256();
                                let p = $dpw(z, _mm256_shuffle_epi8(sc, k4_scale(2 * j)), pl);
                                let p = $dpw(p, _mm256_shuffle_epi8(sc, k4_scale(2 * j + 1)), ph);
                                acc = q4k_block(acc, hsum_i32(p), pms[j], d, dmin);
                            } else {
                                s0 = $dpw(s0, _mm256_shuffle_epi8(sc, k4_scale(2 * j)), pl);
                                s1 = $dpw(s1, _mm256_shuffle_epi8(sc, k4_scale(2 * j + 1)), ph);
                            }
                        }
                        if !GROUPED {
                            let isum = hsum_i32(_mm256_add_epi32(s0, s1));
                            acc = q4k_block(acc, isum, hsum_i32x4(pm), d, dmin);
                        }
                    }
                }
                acc[0] - acc[1]
            }

            /// Q6_K · Q8_K: `TILED` gives the order of llama.cpp's tiled K-quant GEMM (which it
            /// uses for micro-batches of 8 rows or more, see `q6k_tiled_block`), else that of its
            /// `ggml_vec_dot_q6_K_q8_K`.
            ///
            /// # Safety
            /// As [`q4_0_k`].
            #[target_feature(enable = $feat)]
            unsafe fn q6k_k<const TILED: bool>(nb: usize, w: *const u8, x: *const u8) -> f32 {
                let t = f16_table();
                let m4 = _mm256_set1_epi8(0x0F);
                let m30 = _mm256_set1_epi8(0x30);
                let mut acc = _mm256_setzero_ps();
                let mut tiled = 0f32;
                for i in 0..nb {
                    // SAFETY: block `i` is in bounds of both rows; the scale masks are indexed
                    // below 4.
                    unsafe {
                        let (wb, xb) = (w.add(i * Q6K), x.add(i * Q8K));
                        prefetch(wb, 4);
                        let d = rd_f32(xb) * h(t, wb.add(208));
                        // The weights are stored as q + 32 with q in 0..64; the 32 times the
                        // scaled activation sums is subtracted once per block, from the bsums.
                        let sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(wb.add(192).cast()));
                        let corr = _mm256_madd_epi16(sc16, ld(xb.add(260)));
                        // Two integer sums, so that the `vpdpwssd` latency chains overlap.
                        let mut sumi = [_mm256_setzero_si256(); 2];
                        for half in 0..2 {
                            let ql = wb.add(64 * half);
                            let q8 = xb.add(4 + 128 * half);
                            let sc = _mm256_cvtepi8_epi16(_mm_loadl_epi64(
                                wb.add(192 + 8 * half).cast(),
                            ));
                            let sc = _mm256_permute2x128_si256::<0>(sc, sc);
                            let (l0, l1) = (ld(ql), ld(ql.add(32)));
                            let hb = ld(wb.add(128 + 32 * half));
                            let q = [
                                _mm256_or_si256(
                                    _mm256_and_si256(l0, m4),
                                    _mm256_and_si256(_mm256_slli_epi16::<4>(hb), m30),
                                ),
                                _mm256_or_si256(
                                    _mm256_and_si256(l1, m4),
                                    _mm256_and_si256(_mm256_slli_epi16::<2>(hb), m30),
                                ),
                                _mm256_or_si256(
                                    _mm256_and_si256(_mm256_srli_epi16::<4>(l0), m4),
                                    _mm256_and_si256(hb, m30),
                                ),
                                _mm256_or_si256(
                                    _mm256_and_si256(_mm256_srli_epi16::<4>(l1), m4),
                                    _mm256_and_si256(_mm256_srli_epi16::<2>(hb), m30),
                                ),
                            ];
                            for (k, q) in q.into_iter().enumerate() {
                                let p = _mm256_maddubs_epi16(q, ld(q8.add(32 * k)));
                                let sk = _mm256_shuffle_epi8(sc, k6_scale(k));
                                sumi[k & 1] = $dpw(sumi[k & 1], sk, p);
                            }
                        }
                        let sumi = _mm256_add_epi32(sumi[0], sumi[1]);
                        let sumi = _mm256_sub_epi32(sumi, _mm256_slli_epi32::<5>(corr));
                        if TILED {
                            let (wd, xd) = (h(t, wb.add(208)), rd_f32(xb));
                            tiled = q6k_tiled_block(tiled, hsum_i32(sumi), wd, xd);
                        } else {
                            acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
                        }
                    }
                }
                if TILED {
                    tiled
                } else {
                    hsum(acc)
                }
            }

            // Four weight rows against one activation row: the activation block, its scale and
            // its zero-point correction are loaded once for all four.

            /// # Safety
            /// The CPU must support the tier; every row of `w` and `x` must hold `nb` blocks.
            #[target_feature(enable = $feat)]
            unsafe fn q4_0_x4(nb: usize, w: [*const u8; 4], x: *const u8) -> [f32; 4] {
                let t = f16_table();
                let off = q4_zero();
                let mut acc = [_mm256_setzero_ps(); 4];
                for i in 0..nb {
                    // SAFETY: block `i` is in bounds of every row.
                    unsafe {
                        let xb = x.add(i * Q8_0);
                        let xv = ld(xb.add(2));
                        let corr = $xcorr(off, xv);
                        let xd = hb(t, xb);
                        for r in 0..4 {
                            let wb = w[r].add(i * Q4_0);
                            let p = $dpx($nib(wb.add(2)), xv, corr);
                            acc[r] = ggml_fma(hb(t, wb), xd, p, acc[r]);
                        }
                    }
                }
                hsum4(acc.map(|a| _mm256_mul_ps(a, nib_scale())))
            }

            /// # Safety
            /// As [`q4_0_x4`].
            #[target_feature(enable = $feat)]
            unsafe fn q4_1_x4(nb: usize, w: [*const u8; 4], x: *const u8) -> [f32; 4] {
                let t = f16_table();
                let zero = _mm256_setzero_si256();
                let mut acc = [_mm256_setzero_ps(); 4];
                let mut mins = [_mm_setzero_ps(); 4];
                for i in 0..nb {
                    // SAFETY: block `i` is in bounds of every row.
                    unsafe {
                        let xb = x.add(i * Q8_1);
                        let xv = ld(xb.add(4));
                        let xd = hb(t, xb);
                        let xs = hs(t, xb.add(2));
                        for r in 0..4 {
                            let wb = w[r].add(i * Q4_1);
                            let p = $dp(zero, $nib(wb.add(4)), xv);
                            acc[r] = ggml_fma(hb(t, wb), xd, p, acc[r]);
                            mins[r] = _mm_fmadd_ps(hs(t, wb.add(2)), xs, mins[r]);
                        }
                    }
                }
                let s = hsum4(acc.map(|a| _mm256_mul_ps(a, nib_scale())));
                [0, 1, 2, 3].map(|r| s[r] + _mm_cvtss_f32(mins[r]))
            }

            /// # Safety
            /// As [`q4_0_x4`].
            #[target_feature(enable = $feat)]
            unsafe fn q5_0_x4(nb: usize, w: [*const u8; 4], x: *const u8) -> [f32; 4] {
                let t = f16_table();
                let off = _mm256_set1_epi8(16);
                let mut acc = [_mm256_setzero_ps(); 4];
                for i in 0..nb {
                    // SAFETY: block `i` is in bounds of every row.
                    unsafe {
                        let xb = x.add(i * Q8_0);
                        let xv = ld(xb.add(2));
                        let corr = $xcorr(off, xv);
                        let xd = hb(t, xb);
                        for r in 0..4 {
                            let wb = w[r].add(i * Q5_0);
                            let q = $hibits(nibbles(wb.add(6)), rd_u32(wb.add(2)));
                            let p = $dpx(q, xv, corr);
                            acc[r] = ggml_fma(hb(t, wb), xd, p, acc[r]);
                        }
                    }
                }
                hsum4(acc)
            }

            /// # Safety
            /// As [`q4_0_x4`].
            #[target_feature(enable = $feat)]
            unsafe fn q8_0_x4(nb: usize, w: [*const u8; 4], x: *const u8) -> [f32; 4] {
                let t = f16_table();
                let zero = _mm256_setzero_si256();
                let mut acc = [_mm256_setzero_ps(); 4];
                for i in 0..nb {
                    // SAFETY: block `i` is in bounds of every row.
                    unsafe {
                        let xb = x.add(i * Q8_0);
                        let qx = ld(xb.add(2));
                        let xd = hb(t, xb);
                        for r in 0..4 {
                            let wb = w[r].add(i * Q8_0);
                            let qw = ld(wb.add(2));
                            let u = _mm256_sign_epi8(qw, qw);
                            let p = $dp(zero, u, _mm256_sign_epi8(qx, qw));
                            acc[r] = ggml_fma(hb(t, wb), xd, p, acc[r]);
                        }
                    }
                }
                hsum4(acc)
            }

            /// Q4_K · Q8_K for four rows: the activation block's quants, its scale and its
            /// 32-element sums (which meet the mins) are loaded once for all four.
            ///
            /// # Safety
            /// As [`q4_0_x4`].
            #[target_feature(enable = $feat)]
            unsafe fn q4k_x4<const GROUPED: bool>(
                nb: usize,
                w: [*const u8; 4],
                x: *const u8,
            ) -> [f32; 4] {
                let t = f16_table();
                let m4 = _mm256_set1_epi8(0x0F);
                let mut acc = [[0f32; 2]; 4];
                for i in 0..nb {
                    // SAFETY: block `i` is in bounds of every row; the scale masks are indexed
                    // below 8.
                    unsafe {
                        let xb = x.add(i * Q8K);
                        let yd = rd_f32(xb);
                        let bsums = ld(xb.add(260));
                        let bs = _mm_hadd_epi16(
                            _mm256_castsi256_si128(bsums),
                            _mm256_extracti128_si256::<1>(bsums),
                        );
                        let xq = |k: usize| ld(xb.add(4 + 32 * k));
                        for r in 0..4 {
                            let wb = w[r].add(i * Q4K);
                            let sm = k4_scales_mins(wb.add(4));
                            let pm = _mm_madd_epi16(_mm256_extracti128_si256::<1>(sm), bs);
                            let (d, dmin) = (yd * h(t, wb), yd * h(t, wb.add(2)));
                            let mut pms = [0i32; 4];
                            _mm_storeu_si128(pms.as_mut_ptr().cast(), pm);

                            let sc = _mm256_permute2x128_si256::<0>(sm, sm);
                            let (mut s0, mut s1) = (_mm256_setzero_si256(), _mm256_setzero_si256());
                            for j in 0..4 {
                                let q = ld(wb.add(16 + 32 * j));
                                let lo = _mm256_and_si256(q, m4);
                                let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(q), m4);
                                let pl = _mm256_maddubs_epi16(lo, xq(2 * j));
                                let ph = _mm256_maddubs_epi16(hi, xq(2 * j + 1));
                                if GROUPED {
                                    let z = _mm256_setzero_si256();
                                    let p = $dpw(z, _mm256_shuffle_epi8(sc, k4_scale(2 * j)), pl);
                                    let p =
                                        $dpw(p, _mm256_shuffle_epi8(sc, k4_scale(2 * j + 1)), ph);
                                    acc[r] = q4k_block(acc[r], hsum_i32(p), pms[j], d, dmin);
                                } else {
                                    s0 = $dpw(s0, _mm256_shuffle_epi8(sc, k4_scale(2 * j)), pl);
                                    s1 = $dpw(s1, _mm256_shuffle_epi8(sc, k4_scale(2 * j + 1)), ph);
                                }
                            }
                            if !GROUPED {
                                let isum = hsum_i32(_mm256_add_epi32(s0, s1));
                                acc[r] = q4k_block(acc[r], isum, hsum_i32x4(pm), d, dmin);
                            }
                        }
                    }
                }
                acc.map(|[a, m]| a - m)
            }

            /// Q6_K · Q8_K for four rows: the activation block's quants, its scale and its
            /// 16-element sums (which take off the weights' offset of 32) are loaded once for
            /// all four.
            ///
            /// # Safety
            /// As [`q4_0_x4`].
            #[target_feature(enable = $feat)]
            unsafe fn q6k_x4<const TILED: bool>(
                nb: usize,
                w: [*const u8; 4],
                x: *const u8,
            ) -> [f32; 4] {
                let t = f16_table();
                let m4 = _mm256_set1_epi8(0x0F);
                let m30 = _mm256_set1_epi8(0x30);
                let mut acc = [_mm256_setzero_ps(); 4];
                let mut tiled = [0f32; 4];
                for i in 0..nb {
                    // SAFETY: block `i` is in bounds of every row; the scale masks are indexed
                    // below 4.
                    unsafe {
                        let xb = x.add(i * Q8K);
                        let yd = _mm256_set1_ps(rd_f32(xb));
                        let bsums = ld(xb.add(260));
                        let xq = |k: usize| ld(xb.add(4 + 32 * k));
                        for r in 0..4 {
                            let wb = w[r].add(i * Q6K);
                            let sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(wb.add(192).cast()));
                            let corr = _mm256_madd_epi16(sc16, bsums);
                            let mut sumi = [_mm256_setzero_si256(); 2];
                            for half in 0..2 {
                                let ql = wb.add(64 * half);
                                let sc = _mm256_cvtepi8_epi16(_mm_loadl_epi64(
                                    wb.add(192 + 8 * half).cast(),
                                ));
                                let sc = _mm256_permute2x128_si256::<0>(sc, sc);
                                let (l0, l1) = (ld(ql), ld(ql.add(32)));
                                let qh = ld(wb.add(128 + 32 * half));
                                let q = [
                                    _mm256_or_si256(
                                        _mm256_and_si256(l0, m4),
                                        _mm256_and_si256(_mm256_slli_epi16::<4>(qh), m30),
                                    ),
                                    _mm256_or_si256(
                                        _mm256_and_si256(l1, m4),
                                        _mm256_and_si256(_mm256_slli_epi16::<2>(qh), m30),
                                    ),
                                    _mm256_or_si256(
                                        _mm256_and_si256(_mm256_srli_epi16::<4>(l0), m4),
                                        _mm256_and_si256(qh, m30),
                                    ),
                                    _mm256_or_si256(
                                        _mm256_and_si256(_mm256_srli_epi16::<4>(l1), m4),
                                        _mm256_and_si256(_mm256_srli_epi16::<2>(qh), m30),
                                    ),
                                ];
                                for (k, q) in q.into_iter().enumerate() {
                                    let p = _mm256_maddubs_epi16(q, xq(4 * half + k));
                                    let sk = _mm256_shuffle_epi8(sc, k6_scale(k));
                                    sumi[k & 1] = $dpw(sumi[k & 1], sk, p);
                                }
                            }
                            let sumi = _mm256_add_epi32(sumi[0], sumi[1]);
                            let sumi = _mm256_sub_epi32(sumi, _mm256_slli_epi32::<5>(corr));
                            if TILED {
                                let (wd, xd) = (h(t, wb.add(208)), rd_f32(xb));
                                tiled[r] = q6k_tiled_block(tiled[r], hsum_i32(sumi), wd, xd);
                            } else {
                                // ggml's order, as in `q6k_k`: the scales' product first.
                                let d = _mm256_mul_ps(yd, hb(t, wb.add(208)));
                                acc[r] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sumi), acc[r]);
                            }
                        }
                    }
                }
                if TILED {
                    tiled
                } else {
                    hsum4(acc)
                }
            }

            // The safe entry points. Only `dot_fn` hands them out, after checking that the CPU
            // supports the tier; the lengths are checked here.

            pub(in super::super) fn q4_0(n: usize, w: &[u8], x: &[u8]) -> f32 {
                let nb = blocks(n, 32, w, Q4_0, x, Q8_0);
                // SAFETY: the tier is supported and both rows hold `nb` blocks.
                unsafe { q4_0_k(nb, w.as_ptr(), x.as_ptr()) }
            }

            pub(in super::super) fn q4_1(n: usize, w: &[u8], x: &[u8]) -> f32 {
                let nb = blocks(n, 32, w, Q4_1, x, Q8_1);
                // SAFETY: as in `q4_0`.
                unsafe { q4_1_k(nb, w.as_ptr(), x.as_ptr()) }
            }

            pub(in super::super) fn q5_0(n: usize, w: &[u8], x: &[u8]) -> f32 {
                let nb = blocks(n, 32, w, Q5_0, x, Q8_0);
                // SAFETY: as in `q4_0`.
                unsafe { q5_0_k(nb, w.as_ptr(), x.as_ptr()) }
            }

            pub(in super::super) fn q8_0(n: usize, w: &[u8], x: &[u8]) -> f32 {
                let nb = blocks(n, 32, w, Q8_0, x, Q8_0);
                // SAFETY: as in `q4_0`.
                unsafe { q8_0_k(nb, w.as_ptr(), x.as_ptr()) }
            }

            pub(in super::super) fn q4k(n: usize, w: &[u8], x: &[u8]) -> f32 {
                let nb = blocks(n, 256, w, Q4K, x, Q8K);
                // SAFETY: as in `q4_0`.
                unsafe { q4k_k::<false>(nb, w.as_ptr(), x.as_ptr()) }
            }

            pub(in super::super) fn q4k_grouped(n: usize, w: &[u8], x: &[u8]) -> f32 {
                let nb = blocks(n, 256, w, Q4K, x, Q8K);
                // SAFETY: as in `q4_0`.
                unsafe { q4k_k::<true>(nb, w.as_ptr(), x.as_ptr()) }
            }

            pub(in super::super) fn q6k(n: usize, w: &[u8], x: &[u8]) -> f32 {
                let nb = blocks(n, 256, w, Q6K, x, Q8K);
                // SAFETY: as in `q4_0`.
                unsafe { q6k_k::<false>(nb, w.as_ptr(), x.as_ptr()) }
            }

            pub(in super::super) fn q6k_tiled(n: usize, w: &[u8], x: &[u8]) -> f32 {
                let nb = blocks(n, 256, w, Q6K, x, Q8K);
                // SAFETY: as in `q4_0`.
                unsafe { q6k_k::<true>(nb, w.as_ptr(), x.as_ptr()) }
            }

            pub(in super::super) fn q4_0x4(n: usize, w: [&[u8]; 4], x: &[u8]) -> [f32; 4] {
                let nb = blocks4(n, 32, &w, Q4_0, x, Q8_0);
                // SAFETY: the tier is supported and all rows hold `nb` blocks.
                unsafe { q4_0_x4(nb, w.map(<[u8]>::as_ptr), x.as_ptr()) }
            }

            pub(in super::super) fn q4_1x4(n: usize, w: [&[u8]; 4], x: &[u8]) -> [f32; 4] {
                let nb = blocks4(n, 32, &w, Q4_1, x, Q8_1);
                // SAFETY: as in `q4_0x4`.
                unsafe { q4_1_x4(nb, w.map(<[u8]>::as_ptr), x.as_ptr()) }
            }

            pub(in super::super) fn q5_0x4(n: usize, w: [&[u8]; 4], x: &[u8]) -> [f32; 4] {
                let nb = blocks4(n, 32, &w, Q5_0, x, Q8_0);
                // SAFETY: as in `q4_0x4`.
                unsafe { q5_0_x4(nb, w.map(<[u8]>::as_ptr), x.as_ptr()) }
            }

            pub(in super::super) fn q8_0x4(n: usize, w: [&[u8]; 4], x: &[u8]) -> [f32; 4] {
                let nb = blocks4(n, 32, &w, Q8_0, x, Q8_0);
                // SAFETY: as in `q4_0x4`.
                unsafe { q8_0_x4(nb, w.map(<[u8]>::as_ptr), x.as_ptr()) }
            }

            pub(in super::super) fn q4kx4(n: usize, w: [&[u8]; 4], x: &[u8]) -> [f32; 4] {
                let nb = blocks4(n, 256, &w, Q4K, x, Q8K);
                // SAFETY: as in `q4_0x4`.
                unsafe { q4k_x4::<false>(nb, w.map(<[u8]>::as_ptr), x.as_ptr()) }
            }

            pub(in super::super) fn q4kx4_grouped(n: usize, w: [&[u8]; 4], x: &[u8]) -> [f32; 4] {
                let nb = blocks4(n, 256, &w, Q4K, x, Q8K);
                // SAFETY: as in `q4_0`.
                unsafe { q4k_x4::<true>(nb, w.map(<[u8]>::as_ptr), x.as_ptr()) }
            }

            pub(in super::super) fn q6kx4(n: usize, w: [&[u8]; 4], x: &[u8]) -> [f32; 4] {
                let nb = blocks4(n, 256, &w, Q6K, x, Q8K);
                // SAFETY: as in `q4_0x4`.
                unsafe { q6k_x4::<false>(nb, w.map(<[u8]>::as_ptr), x.as_ptr()) }
            }

            pub(in super::super) fn q6kx4_tiled(n: usize, w: [&[u8]; 4], x: &[u8]) -> [f32; 4] {
                let nb = blocks4(n, 256, &w, Q6K, x, Q8K);
                // SAFETY: as in `q4_0`.
                unsafe { q6k_x4::<true>(nb, w.map(<[u8]>::as_ptr), x.as_ptr()) }
            }

            pub(in super::super) fn dot4_fn(w: GgmlDType) -> Option<Dot4Fn> {
                Some(match w {
                    GgmlDType::Q4_0 => q4_0x4,
                    GgmlDType::Q4_1 => q4_1x4,
                    GgmlDType::Q5_0 => q5_0x4,
                    GgmlDType::Q8_0 => q8_0x4,
                    GgmlDType::Q4K => q4kx4,
                    GgmlDType::Q6K => q6kx4,
                    _ => return None,
                })
            }

            /// The batched-order kernels (see `q4k_k` and `q6k_k`).
            pub(in super::super) fn batched_fns(w: GgmlDType) -> Option<(DotFn, Dot4Fn)> {
                match w {
                    GgmlDType::Q4K => Some((q4k_grouped, q4kx4_grouped)),
                    GgmlDType::Q6K => Some((q6k_tiled, q6kx4_tiled)),
                    _ => None,
                }
            }

            pub(in super::super) fn dot_fn(w: GgmlDType) -> Option<DotFn> {
                Some(match w {
                    GgmlDType::Q4_0 => q4_0,
                    GgmlDType::Q4_1 => q4_1,
                    GgmlDType::Q5_0 => q5_0,
                    GgmlDType::Q8_0 => q8_0,
                    GgmlDType::Q4K => q4k,
                    GgmlDType::Q6K => q6k,
                    _ => return None,
                })
            }
        }
    };
}

tier_kernels!(
    avx2,
    "avx2,fma,f16c",
    dp_avx2,
    dpw_avx2,
    xcorr_avx2,
    dpx_avx2,
    hibits_avx2,
    nibbles,
    NIB_SCALE_AVX2,
    Q4_0_ZERO_AVX2
);
tier_kernels!(
    avxvnni,
    "avx2,fma,f16c,avxvnni",
    dp_avxvnni,
    dpw_avxvnni,
    xcorr_avxvnni,
    dpx_avxvnni,
    hibits_avx2,
    nibbles16,
    NIB_SCALE_VNNI,
    Q4_0_ZERO_VNNI
);
tier_kernels!(
    avx512,
    "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni",
    dp_avx512,
    dpw_avx512,
    xcorr_avx512,
    dpx_avx512,
    hibits_avx512,
    nibbles16,
    NIB_SCALE_VNNI,
    Q4_0_ZERO_VNNI
);

/// The dot product for weight type `w` in `tier`; the caller has checked the tier is supported.
pub(super) fn dot_fn(w: GgmlDType, tier: Tier) -> Option<DotFn> {
    match tier {
        Tier::Avx2 => avx2::dot_fn(w),
        Tier::AvxVnni => avxvnni::dot_fn(w),
        Tier::Avx512 => super::avx512::dot_fn(w).or_else(|| avx512::dot_fn(w)),
    }
}

/// The single- and four-row dot products in the order llama.cpp uses for batched rows, for
/// weight type `w` in `tier`, where that order differs from its one-row order; as [`dot_fn`].
pub(super) fn batched_fns(w: GgmlDType, tier: Tier) -> Option<(DotFn, Dot4Fn)> {
    match tier {
        Tier::Avx2 => avx2::batched_fns(w),
        Tier::AvxVnni => avxvnni::batched_fns(w),
        Tier::Avx512 => avx512::batched_fns(w),
    }
}

/// The four-row dot product for weight type `w` in `tier`, as [`dot_fn`].
pub(super) fn dot4_fn(w: GgmlDType, tier: Tier) -> Option<Dot4Fn> {
    match tier {
        Tier::Avx2 => avx2::dot4_fn(w),
        Tier::AvxVnni => avxvnni::dot4_fn(w),
        // The 512-bit kernels, where there is one.
        Tier::Avx512 => super::avx512::dot4_fn(w).or_else(|| avx512::dot4_fn(w)),
    }
}
