//! The AVX-512 VNNI micro-kernels of the prefill GEMM (see `kernels::gemm`): two weight rows of
//! a decoded [`Tile`] against one panel of 16 tokens.
//!
//! A register holds one 4-element group of all 16 tokens (the panel's bytes, `x + 128`), and
//! `vpdpbusd` multiplies it with one group of one weight row broadcast from memory, starting
//! from the row's correction for the `+ 128`, so each lane gets the exact integer sum of its
//! token. Every float operation after that is per lane and in llama.cpp's order for one row and
//! one token, so lane `i` equals what the one-row kernel computes for token `i`, bit for bit.

use std::arch::x86_64::*;

use candle_core::quantized::GgmlDType;

use super::super::gemm::{Panels, Tile, LANES};

/// Two rows' results for the 16 lanes of a panel.
pub(in super::super) type PairOut = [[f32; LANES]; 2];

/// # Safety
/// The CPU must support AVX-512 F/BW/VL/VNNI; `rows` must be rows of `tile`, `p` a panel of
/// `panels`, and both must be built for weight type `w` over the same columns.
pub(in super::super) unsafe fn pair(
    w: GgmlDType,
    tile: &Tile,
    rows: [usize; 2],
    panels: &Panels,
    p: usize,
    out: &mut PairOut,
) {
    assert_eq!(tile.cols, panels.cols);
    assert!(rows[0] < tile.rows && rows[1] < tile.rows && p < panels.n_panels());
    // SAFETY: bounds checked above, the rest by the contract.
    unsafe {
        match w {
            GgmlDType::Q4_0 | GgmlDType::Q5_0 | GgmlDType::Q8_0 => {
                q32::<false>(tile, rows, panels, p, out)
            }
            GgmlDType::Q4_1 => q32::<true>(tile, rows, panels, p, out),
            GgmlDType::Q4K => q4k(tile, rows, panels, p, out),
            GgmlDType::Q6K => q6k(tile, rows, panels, p, out),
            other => unreachable!("no GEMM kernel for {other:?}"),
        }
    }
}

/// The two rows' slices of a tile field that holds `per_row` values a row.
#[inline(always)]
fn at<T>(field: &[T], rows: [usize; 2], per_row: usize) -> [*const T; 2] {
    rows.map(|r| field[r * per_row..(r + 1) * per_row].as_ptr())
}

/// The group `g` of a row's quants, broadcast.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn wq(w: *const i8, g: usize) -> __m512i {
    // SAFETY: the caller passes a group inside the row.
    _mm512_set1_epi32(unsafe { w.add(4 * g).cast::<i32>().read_unaligned() })
}

/// The panel's group `g` (16 tokens × 4 bytes).
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn xg(x: *const u8, g: usize) -> __m512i {
    // SAFETY: the caller passes a group inside the panel.
    unsafe { _mm512_loadu_si512(x.add(64 * g).cast()) }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn ld(p: *const f32) -> __m512 {
    // SAFETY: the caller passes 16 readable floats.
    unsafe { _mm512_loadu_ps(p) }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn store(out: &mut [f32; LANES], v: __m512) {
    // SAFETY: `out` holds 16 floats.
    unsafe { _mm512_storeu_ps(out.as_mut_ptr(), v) }
}

/// The 32-weight formats in ggml's `ggml_vec_dot_*` order: eight accumulators per row, one per
/// 4-element group of a block, each `acc += (dw · dx) · float(group sum)` block after block,
/// summed at the end as ggml's `hsum_float_8` does; `MIN` adds Q4_1's `min · sum(x)` chain.
///
/// # Safety
/// As [`pair`].
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn q32<const MIN: bool>(
    tile: &Tile,
    rows: [usize; 2],
    panels: &Panels,
    p: usize,
    out: &mut PairOut,
) {
    let cols = tile.cols;
    let (nb, ng) = (cols / 32, cols / 4);
    // SAFETY: every offset below stays inside the tile's rows and the panel, whose sizes
    // follow from `cols` (checked by the caller).
    unsafe {
        let x = panels.x.as_slice().as_ptr().add(p * ng * 64);
        let dx = panels.d.as_ptr().add(p * nb * LANES);
        let sx = if MIN {
            panels.s.as_ptr().add(p * nb * LANES)
        } else {
            dx
        };
        let w = at(&tile.w, rows, cols);
        let c = at(&tile.corr, rows, ng);
        let d = at(&tile.d, rows, nb);
        let m = at(&tile.m, rows, nb);
        let mut a0 = [_mm512_setzero_ps(); 8];
        let mut a1 = [_mm512_setzero_ps(); 8];
        let (mut m0, mut m1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        for b in 0..nb {
            let dxv = ld(dx.add(b * LANES));
            let d0 = _mm512_mul_ps(_mm512_set1_ps(*d[0].add(b)), dxv);
            let d1 = _mm512_mul_ps(_mm512_set1_ps(*d[1].add(b)), dxv);
            for i in 0..8 {
                let g = b * 8 + i;
                let xv = xg(x, g);
                let t0 = _mm512_dpbusd_epi32(_mm512_set1_epi32(*c[0].add(g)), xv, wq(w[0], g));
                let t1 = _mm512_dpbusd_epi32(_mm512_set1_epi32(*c[1].add(g)), xv, wq(w[1], g));
                a0[i] = _mm512_fmadd_ps(d0, _mm512_cvtepi32_ps(t0), a0[i]);
                a1[i] = _mm512_fmadd_ps(d1, _mm512_cvtepi32_ps(t1), a1[i]);
            }
            if MIN {
                let sv = ld(sx.add(b * LANES));
                m0 = _mm512_fmadd_ps(_mm512_set1_ps(*m[0].add(b)), sv, m0);
                m1 = _mm512_fmadd_ps(_mm512_set1_ps(*m[1].add(b)), sv, m1);
            }
        }
        let hsum8 = |a: [__m512; 8]| {
            let s0 = _mm512_add_ps(a[0], a[4]);
            let s1 = _mm512_add_ps(a[1], a[5]);
            let s2 = _mm512_add_ps(a[2], a[6]);
            let s3 = _mm512_add_ps(a[3], a[7]);
            _mm512_add_ps(_mm512_add_ps(s0, s2), _mm512_add_ps(s1, s3))
        };
        let (mut r0, mut r1) = (hsum8(a0), hsum8(a1));
        if MIN {
            r0 = _mm512_add_ps(r0, m0);
            r1 = _mm512_add_ps(r1, m1);
        }
        store(&mut out[0], r0);
        store(&mut out[1], r1);
    }
}

/// Q4_K · Q8_K. Per 64-element pair of sub-blocks: the exact `sc · Σ q·x` of both and the
/// `min · bsum` of both; lanes marked grouped (llama.cpp's repacked GEMM order) add each pair
/// with one multiply-add, the others (its GEMV order) add the block's whole sums once.
///
/// # Safety
/// As [`pair`].
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn q4k(tile: &Tile, rows: [usize; 2], panels: &Panels, p: usize, out: &mut PairOut) {
    let cols = tile.cols;
    let (nb, ng, nsub, npair) = (cols / 256, cols / 4, cols / 32, cols / 64);
    // SAFETY: as in `q32`.
    unsafe {
        let x = panels.x.as_slice().as_ptr().add(p * ng * 64);
        let dx = panels.d.as_ptr().add(p * nb * LANES);
        let bp = panels.bp.as_ptr().add(p * npair * LANES);
        let grouped: __mmask16 = panels.grouped[p];
        let other: __mmask16 = !grouped;
        let w = at(&tile.w, rows, cols);
        let c = at(&tile.corr, rows, nsub);
        let sc = at(&tile.sc, rows, nsub);
        let scf = at(&tile.scf, rows, nsub);
        let mp = at(&tile.mp, rows, npair);
        let d = at(&tile.d, rows, nb);
        let dm = at(&tile.m, rows, nb);
        let mut f = [_mm512_setzero_ps(); 2];
        let mut fm = [_mm512_setzero_ps(); 2];
        for b in 0..nb {
            let dxv = ld(dx.add(b * LANES));
            let dd = [0, 1].map(|k| _mm512_mul_ps(dxv, _mm512_set1_ps(*d[k].add(b))));
            let ddm = [0, 1].map(|k| _mm512_mul_ps(dxv, _mm512_set1_ps(*dm[k].add(b))));
            let mut ib = [_mm512_setzero_si512(); 2];
            let mut mb = [_mm512_setzero_si512(); 2];
            for j in 0..4 {
                let s = b * 8 + 2 * j;
                let mut sa = [0, 1].map(|k| _mm512_set1_epi32(*c[k].add(s)));
                let mut sb = [0, 1].map(|k| _mm512_set1_epi32(*c[k].add(s + 1)));
                let g0 = b * 64 + 16 * j;
                for i in 0..8 {
                    let xa = xg(x, g0 + i);
                    sa[0] = _mm512_dpbusd_epi32(sa[0], xa, wq(w[0], g0 + i));
                    sa[1] = _mm512_dpbusd_epi32(sa[1], xa, wq(w[1], g0 + i));
                    let xb = xg(x, g0 + 8 + i);
                    sb[0] = _mm512_dpbusd_epi32(sb[0], xb, wq(w[0], g0 + 8 + i));
                    sb[1] = _mm512_dpbusd_epi32(sb[1], xb, wq(w[1], g0 + 8 + i));
                }
                let bpv = _mm512_loadu_si512(bp.add((b * 4 + j) * LANES).cast());
                for k in 0..2 {
                    let ms = _mm512_madd_epi16(_mm512_set1_epi32(*mp[k].add(b * 4 + j)), bpv);
                    if grouped != 0 {
                        // `sc_a · S_a + sc_b · S_b` in floats: every term and partial sum is an
                        // integer below 2^23 (|S| <= 32 · 15 · 127, sc < 64), so this is exact
                        // and equals the integer sum's conversion, without two `vpmulld`s.
                        let is = _mm512_fmadd_ps(
                            _mm512_cvtepi32_ps(sa[k]),
                            _mm512_set1_ps(*scf[k].add(s)),
                            _mm512_mul_ps(
                                _mm512_cvtepi32_ps(sb[k]),
                                _mm512_set1_ps(*scf[k].add(s + 1)),
                            ),
                        );
                        f[k] = _mm512_mask3_fmadd_ps(is, dd[k], f[k], grouped);
                        fm[k] =
                            _mm512_mask3_fmadd_ps(_mm512_cvtepi32_ps(ms), ddm[k], fm[k], grouped);
                    }
                    if other != 0 {
                        // The block's whole sum can pass 2^24: integers.
                        let is = _mm512_add_epi32(
                            _mm512_mullo_epi32(sa[k], _mm512_set1_epi32(*sc[k].add(s))),
                            _mm512_mullo_epi32(sb[k], _mm512_set1_epi32(*sc[k].add(s + 1))),
                        );
                        ib[k] = _mm512_add_epi32(ib[k], is);
                        mb[k] = _mm512_add_epi32(mb[k], ms);
                    }
                }
            }
            if other != 0 {
                for k in 0..2 {
                    f[k] = _mm512_mask3_fmadd_ps(_mm512_cvtepi32_ps(ib[k]), dd[k], f[k], other);
                    fm[k] = _mm512_mask3_fmadd_ps(_mm512_cvtepi32_ps(mb[k]), ddm[k], fm[k], other);
                }
            }
        }
        store(&mut out[0], _mm512_sub_ps(f[0], fm[0]));
        store(&mut out[1], _mm512_sub_ps(f[1], fm[1]));
    }
}

/// Q6_K · Q8_K in llama.cpp's tiled order: per block, `float(Σ sc · Σ (q - 32)·x) · wd`, then one
/// multiply-add with the activation scale.
///
/// # Safety
/// As [`pair`].
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn q6k(tile: &Tile, rows: [usize; 2], panels: &Panels, p: usize, out: &mut PairOut) {
    let cols = tile.cols;
    let (nb, ng, nsub) = (cols / 256, cols / 4, cols / 16);
    // SAFETY: as in `q32`.
    unsafe {
        let x = panels.x.as_slice().as_ptr().add(p * ng * 64);
        let dx = panels.d.as_ptr().add(p * nb * LANES);
        let w = at(&tile.w, rows, cols);
        let c = at(&tile.corr, rows, nsub);
        let sc = at(&tile.sc, rows, nsub);
        let d = at(&tile.d, rows, nb);
        let mut f = [_mm512_setzero_ps(); 2];
        for b in 0..nb {
            let mut is = [_mm512_setzero_si512(); 2];
            for s in 0..16 {
                let sub = b * 16 + s;
                let mut acc = [0, 1].map(|k| _mm512_set1_epi32(*c[k].add(sub)));
                for i in 0..4 {
                    let g = b * 64 + 4 * s + i;
                    let xv = xg(x, g);
                    acc[0] = _mm512_dpbusd_epi32(acc[0], xv, wq(w[0], g));
                    acc[1] = _mm512_dpbusd_epi32(acc[1], xv, wq(w[1], g));
                }
                for k in 0..2 {
                    is[k] = _mm512_add_epi32(
                        is[k],
                        _mm512_mullo_epi32(acc[k], _mm512_set1_epi32(*sc[k].add(sub))),
                    );
                }
            }
            let dxv = ld(dx.add(b * LANES));
            for k in 0..2 {
                let res = _mm512_mul_ps(_mm512_cvtepi32_ps(is[k]), _mm512_set1_ps(*d[k].add(b)));
                f[k] = _mm512_fmadd_ps(res, dxv, f[k]);
            }
        }
        store(&mut out[0], f[0]);
        store(&mut out[1], f[1]);
    }
}

/// `out[g] = -128 · Σ q[4g..4g + 4]` for every group of 4 (`q.len()` a multiple of 64): the
/// corrections of [`Tile::corr`] at 4-element granularity, 16 groups per `vpdpbusd`.
///
/// # Safety
/// The CPU must support AVX-512 F/BW/VL/VNNI.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub(in super::super) unsafe fn corrections4(q: &[i8], out: &mut [i32]) {
    assert_eq!(q.len() % 64, 0);
    assert!(out.len() >= q.len() / 4);
    let ones = _mm512_set1_epi8(1);
    let m128 = _mm512_set1_epi32(-128);
    for (i, c) in q.chunks_exact(64).enumerate() {
        // SAFETY: 64 bytes in, 16 i32 out, in bounds by the assertions.
        unsafe {
            let v = _mm512_loadu_si512(c.as_ptr().cast());
            let s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, v);
            _mm512_storeu_si512(
                out.as_mut_ptr().add(16 * i).cast(),
                _mm512_mullo_epi32(s, m128),
            );
        }
    }
}
