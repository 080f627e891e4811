//! Tests of the SIMD kernels against candle's reference implementations, for every tier this CPU
//! supports (so the AVX2 path is covered on AVX-512 machines too).

use candle_core::quantized::k_quants::{
    BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5_0, BlockQ6K, BlockQ8K, BlockQ8_0, BlockQ8_1,
};
use candle_core::quantized::{GgmlDType, GgmlType};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{dot4_fn_for, dot_fn_for, quant, Tier};
use crate::kernels::{dequantize, reference_dot, row_bytes, vec_dot_dtype};

/// The weight types with SIMD kernels.
pub(super) const TYPES: [GgmlDType; 6] = [
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q5_0,
    GgmlDType::Q8_0,
    GgmlDType::Q4K,
    GgmlDType::Q6K,
];

fn as_bytes<T>(blocks: &[T]) -> Vec<u8> {
    // SAFETY: the block types are plain old data without padding.
    unsafe {
        std::slice::from_raw_parts(blocks.as_ptr() as *const u8, std::mem::size_of_val(blocks))
    }
    .to_vec()
}

fn from_float<T: GgmlType>(x: &[f32]) -> Vec<u8> {
    let mut blocks = vec![T::zeros(); x.len() / T::BLCK_SIZE];
    T::from_float(x, &mut blocks);
    as_bytes(&blocks)
}

/// Quantizes `x` with candle's reference quantizer for `dtype`.
pub(super) fn quantize(dtype: GgmlDType, x: &[f32]) -> Vec<u8> {
    match dtype {
        GgmlDType::Q4_0 => from_float::<BlockQ4_0>(x),
        GgmlDType::Q4_1 => from_float::<BlockQ4_1>(x),
        GgmlDType::Q5_0 => from_float::<BlockQ5_0>(x),
        GgmlDType::Q8_0 => from_float::<BlockQ8_0>(x),
        GgmlDType::Q8_1 => from_float::<BlockQ8_1>(x),
        GgmlDType::Q4K => from_float::<BlockQ4K>(x),
        GgmlDType::Q6K => from_float::<BlockQ6K>(x),
        GgmlDType::Q8K => from_float::<BlockQ8K>(x),
        other => unreachable!("no test quantizer for {other:?}"),
    }
}

/// Copies `bytes` into a fresh allocation aligned to 8, the most any block type needs, so that
/// candle's reference can view them as blocks.
fn aligned(bytes: &[u8]) -> Vec<u64> {
    let mut v = vec![0u64; bytes.len().div_ceil(8)];
    // SAFETY: `v` has at least `bytes.len()` bytes.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), v.as_mut_ptr() as *mut u8, bytes.len())
    };
    v
}

fn view(v: &[u64], len: usize) -> &[u8] {
    // SAFETY: `v` holds at least `len` bytes (see `aligned`).
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, len) }
}

fn unopt<T: GgmlType>(n: usize, w: &[u8], x: &[u8]) -> f32 {
    let (wa, xa) = (aligned(w), aligned(x));
    // SAFETY: aligned, whole blocks of plain old data.
    let (wb, xb) = unsafe {
        (
            std::slice::from_raw_parts(wa.as_ptr() as *const T, w.len() / std::mem::size_of::<T>()),
            std::slice::from_raw_parts(
                xa.as_ptr() as *const T::VecDotType,
                x.len() / std::mem::size_of::<T::VecDotType>(),
            ),
        )
    };
    T::vec_dot_unopt(n, wb, xb)
}

/// candle's scalar dot product.
fn reference_unopt(dtype: GgmlDType, n: usize, w: &[u8], x: &[u8]) -> f32 {
    match dtype {
        GgmlDType::Q4_0 => unopt::<BlockQ4_0>(n, w, x),
        GgmlDType::Q4_1 => unopt::<BlockQ4_1>(n, w, x),
        GgmlDType::Q5_0 => unopt::<BlockQ5_0>(n, w, x),
        GgmlDType::Q8_0 => unopt::<BlockQ8_0>(n, w, x),
        GgmlDType::Q4K => unopt::<BlockQ4K>(n, w, x),
        GgmlDType::Q6K => unopt::<BlockQ6K>(n, w, x),
        other => unreachable!("no reference for {other:?}"),
    }
}

/// candle's dot products (the dispatched one and the scalar one). candle's Q4_1 and Q5_0 code
/// asserts an even block count in debug builds, so odd counts are padded with an all-zero block
/// on both sides, which adds exactly zero.
fn references(dtype: GgmlDType, n: usize, w: &[u8], x: &[u8]) -> [f32; 2] {
    let (mut n, mut w, mut x) = (n, w.to_vec(), x.to_vec());
    let bs = dtype.block_size();
    if (n / bs) % 2 == 1 {
        n += bs;
        w.resize(w.len() + dtype.type_size(), 0);
        let xd = vec_dot_dtype(dtype);
        x.resize(x.len() + xd.type_size(), 0);
    }
    let (wa, xa) = (aligned(&w), aligned(&x));
    let (wv, xv) = (view(&wa, w.len()), view(&xa, x.len()));
    [
        reference_dot(dtype)(n, wv, xv),
        reference_unopt(dtype, n, &w, &x),
    ]
}

pub(super) fn random_vec(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| rng.gen_range(-1.0f32..1.0) * scale)
        .collect()
}

/// The sum of |w|·|x| over the dequantized rows: the scale the float rounding error is relative
/// to.
fn magnitude(dtype: GgmlDType, n: usize, w: &[u8], x: &[u8]) -> f32 {
    let (wa, xa) = (aligned(w), aligned(x));
    let mut wf = vec![0f32; n];
    let mut xf = vec![0f32; n];
    dequantize(dtype, view(&wa, w.len()), &mut wf);
    dequantize(vec_dot_dtype(dtype), view(&xa, x.len()), &mut xf);
    wf.iter().zip(&xf).map(|(a, b)| (a * b).abs()).sum()
}

pub(super) fn widths(dtype: GgmlDType) -> Vec<usize> {
    if dtype.block_size() == 256 {
        vec![256, 512, 768, 1536, 2304, 4864, 8960]
    } else {
        vec![32, 64, 96, 160, 576, 896, 1536, 4864, 8960]
    }
}

fn assert_close(what: &str, got: f32, want: f32, mag: f32) {
    let tol = 1e-5 * mag + 1e-6;
    assert!(
        (got - want).abs() <= tol,
        "{what}: got {got}, want {want} (difference {}, tolerance {tol})",
        (got - want).abs()
    );
}

#[test]
fn dot_products_match_candle() {
    let tiers = Tier::supported();
    if tiers.is_empty() {
        eprintln!("no SIMD tier on this CPU; nothing to test");
        return;
    }
    let mut rng = StdRng::seed_from_u64(7);
    for dtype in TYPES {
        for n in widths(dtype) {
            for trial in 0..3 {
                // Vary the magnitudes so scales span several binades.
                let w = quantize(dtype, &random_vec(&mut rng, n, 0.1 * (trial + 1) as f32));
                let x = quantize(vec_dot_dtype(dtype), &random_vec(&mut rng, n, 3.0));
                let refs = references(dtype, n, &w, &x);
                let mag = magnitude(dtype, n, &w, &x);
                assert_close(
                    &format!("{dtype:?} n={n} candle vs unopt"),
                    refs[0],
                    refs[1],
                    mag,
                );
                for &tier in &tiers {
                    let f = dot_fn_for(dtype, tier).expect("kernel exists");
                    let got = f(n, &w, &x);
                    assert_close(&format!("{dtype:?} {tier:?} n={n}"), got, refs[1], mag);
                }
            }
        }
    }
}

#[test]
fn dot4_products_match_single_row() {
    let mut rng = StdRng::seed_from_u64(11);
    for tier in Tier::supported() {
        for dtype in TYPES {
            let Some(f4) = dot4_fn_for(dtype, tier) else {
                continue;
            };
            let f = dot_fn_for(dtype, tier).unwrap();
            for n in widths(dtype) {
                let mut rows: Vec<Vec<u8>> = (0..4)
                    .map(|r| quantize(dtype, &random_vec(&mut rng, n, 0.05 * (r + 1) as f32)))
                    .collect();
                // One row at the ends of the weight range, where a saturating intermediate or a
                // wrong zero point would show.
                let extreme: Vec<f32> = (0..n)
                    .map(|i| if i % 3 == 0 { -1.0 } else { 1.0 } * (1.0 + (i % 5) as f32))
                    .collect();
                rows[2] = quantize(dtype, &extreme);
                let x = quantize(vec_dot_dtype(dtype), &random_vec(&mut rng, n, 2.0));
                let got = f4(n, [&rows[0], &rows[1], &rows[2], &rows[3]], &x);
                // Bit for bit: a matmul takes either kernel for a row depending on how many
                // tokens it multiplies, and a sequence's output must not depend on that.
                for r in 0..4 {
                    let want = f(n, &rows[r], &x);
                    assert_eq!(
                        got[r].to_bits(),
                        want.to_bits(),
                        "{dtype:?} {tier:?} n={n} row {r}: {} vs {want}",
                        got[r]
                    );
                }
            }
        }
    }
}

#[test]
fn every_tier_gives_the_same_bits() {
    // The tiers differ in instructions, not arithmetic (the 512-bit Q4_K row kernel computes a
    // block's exact integer sums differently and then adds them as the 256-bit one does), so a
    // row's dot product must not depend on the CPU's tier.
    let mut rng = StdRng::seed_from_u64(17);
    for dtype in TYPES {
        for n in widths(dtype) {
            let w = quantize(dtype, &random_vec(&mut rng, n, 0.1));
            let x = quantize(vec_dot_dtype(dtype), &random_vec(&mut rng, n, 2.0));
            let want = dot_fn_for(dtype, Tier::Avx2).map(|f| f(n, &w, &x));
            for tier in Tier::supported() {
                let got = dot_fn_for(dtype, tier).unwrap()(n, &w, &x);
                assert_eq!(
                    Some(got.to_bits()),
                    want.map(f32::to_bits),
                    "{dtype:?} {tier:?} n={n}"
                );
            }
        }
    }
}

#[test]
fn extreme_blocks_are_exact() {
    // Weights at the ends of their ranges against activations of ±127, where a saturating 16-bit
    // intermediate would show; the reference and the kernels must agree to float rounding.
    let mut rng = StdRng::seed_from_u64(3);
    for tier in Tier::supported() {
        for dtype in TYPES {
            let n = 4 * dtype.block_size();
            let wf: Vec<f32> = (0..n)
                .map(|i| if rng.gen_bool(0.5) { 1.0 } else { -1.0 } * (1.0 + (i % 3) as f32))
                .collect();
            let xf: Vec<f32> = (0..n)
                .map(|_| if rng.gen_bool(0.5) { 5.0 } else { -5.0 })
                .collect();
            let w = quantize(dtype, &wf);
            let x = quantize(vec_dot_dtype(dtype), &xf);
            let want = references(dtype, n, &w, &x)[1];
            let got = dot_fn_for(dtype, tier).unwrap()(n, &w, &x);
            assert_close(
                &format!("{dtype:?} {tier:?}"),
                got,
                want,
                magnitude(dtype, n, &w, &x),
            );
        }
    }
}

#[test]
fn quantizers_match_ggml_bytes() {
    // The SIMD quantizers against the scalar ports of ggml's x86 quantizers
    // (`crate::kernels::quantize_row`), byte for byte.
    if !Tier::Avx2.is_supported() {
        return;
    }
    let mut rng = StdRng::seed_from_u64(5);
    for dtype in [GgmlDType::Q8_0, GgmlDType::Q8_1, GgmlDType::Q8K] {
        let f = quant::quantize_fn(dtype).unwrap();
        for n in [768, 1024, 576 * 4, 896 * 2, 1536, 4864, 8960 * 2] {
            let mut cases = vec![
                random_vec(&mut rng, n, 1.0),
                random_vec(&mut rng, n, 1e-3),
                random_vec(&mut rng, n, 300.0),
                // Values on the rounding boundaries: multiples of half a quantization step.
                (0..n)
                    .map(|i| ((i % 255) as f32 - 127.0) * 0.5 * if i % 7 == 0 { -1.0 } else { 1.0 })
                    .collect(),
                // Integers, where the block maximum maps exactly to ±127.
                (0..n).map(|i| (i % 61) as f32 - 30.0).collect(),
                vec![0.0; n],
            ];
            // Blocks with a zero or a duplicated-magnitude maximum. (Subnormal blocks overflow the
            // scale to infinity, where ggml's conversion and this port's differ.)
            let mut special = random_vec(&mut rng, n, 1.0);
            special[..32].fill(0.0);
            special[64] = 2.0;
            special[65] = -2.0;
            special[300] = -7.0;
            special[301] = 7.0;
            cases.push(special);
            for (c, x) in cases.iter().enumerate() {
                let mut want = vec![0u8; row_bytes(dtype, n)];
                crate::kernels::quantize_row(dtype, x, &mut want);
                let mut got = vec![0u8; row_bytes(dtype, n)];
                f(x, &mut got);
                if got != want {
                    let i = got.iter().zip(&want).position(|(a, b)| a != b).unwrap();
                    panic!("{dtype:?} n={n} case {c}: first difference at byte {i}");
                }
            }
        }
    }
}

#[test]
fn quantizers_round_trip_through_kernels() {
    // The SIMD quantizer feeding the SIMD dot must give what candle's pair gives.
    let Some(tier) = Tier::best() else { return };
    let mut rng = StdRng::seed_from_u64(9);
    for dtype in TYPES {
        let n = 1536;
        let w = quantize(dtype, &random_vec(&mut rng, n, 0.2));
        let xf = random_vec(&mut rng, n, 1.5);
        let xd = vec_dot_dtype(dtype);
        let mut x = vec![0u8; row_bytes(xd, n)];
        quant::quantize_fn(xd).unwrap()(&xf, &mut x);
        let want = references(dtype, n, &w, &quantize(xd, &xf))[1];
        let got = dot_fn_for(dtype, tier).unwrap()(n, &w, &x);
        assert_close(
            &format!("{dtype:?}"),
            got,
            want,
            magnitude(dtype, n, &w, &x),
        );
    }
}

#[test]
fn kquant_dot4_products_match_candle() {
    // The k-quant four-row kernels against four calls of candle's dot product, with random rows
    // of different magnitudes and rows at the ends of the weight and activation ranges.
    let mut rng = StdRng::seed_from_u64(13);
    for tier in Tier::supported() {
        for dtype in [GgmlDType::Q4K, GgmlDType::Q6K] {
            let f4 = dot4_fn_for(dtype, tier).expect("four-row kernel exists");
            for n in [256, 512, 1536, 4864, 8960] {
                for trial in 0..3 {
                    let mut rows: Vec<Vec<u8>> = (0..4)
                        .map(|r| {
                            let scale = 0.02 * (r + 1) as f32 * (trial + 1) as f32;
                            quantize(dtype, &random_vec(&mut rng, n, scale))
                        })
                        .collect();
                    // Extreme weights: a large magnitude with alternating signs (all quants at
                    // the ends of their range), and a row of one sign (the mins at their ends).
                    let extreme: Vec<f32> = (0..n)
                        .map(|i| if i % 3 == 0 { -1.0 } else { 1.0 } * (1.0 + (i % 5) as f32))
                        .collect();
                    rows[1] = quantize(dtype, &extreme);
                    let positive: Vec<f32> = (0..n).map(|i| 1.0 + (i % 7) as f32).collect();
                    rows[3] = quantize(dtype, &positive);
                    let xf = if trial == 2 {
                        // Activations of ±127 after quantization.
                        (0..n)
                            .map(|_| if rng.gen_bool(0.5) { 5.0 } else { -5.0 })
                            .collect()
                    } else {
                        random_vec(&mut rng, n, 2.0)
                    };
                    let x = quantize(vec_dot_dtype(dtype), &xf);
                    let got = f4(n, [&rows[0], &rows[1], &rows[2], &rows[3]], &x);
                    for r in 0..4 {
                        let want = references(dtype, n, &rows[r], &x)[0];
                        assert_close(
                            &format!("{dtype:?} {tier:?} n={n} trial {trial} row {r}"),
                            got[r],
                            want,
                            magnitude(dtype, n, &rows[r], &x),
                        );
                    }
                }
            }
        }
    }
}
