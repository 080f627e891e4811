//! Tiled causal attention for prompt chunks, on AVX-512.
//!
//! The per-token path ([`super::ops::attend_f16`]) walks every cached key once per query: a
//! dot product, one `exp`, and a multiply-add of the value row into an accumulator that is
//! rounded to f16 after every key (ggml's CPU flash attention on a machine without
//! AVX512-FP16). Here 16 consecutive queries of one head form a tile whose lanes are the
//! queries, so each key row is widened once per tile and every step is one 16-lane operation
//! instead of 16 scalar ones; keys past a query's position are masked (the causal diagonal).
//!
//! The lanes replay the per-token arithmetic exactly: the query rounded to f16, the score summed
//! in `ggml_vec_dot_f16`'s order (see [`super::ops::dot_f16_ggml`]) and scaled, the running
//! maximum, `exp` of the same arguments (libm's, per lane), the accumulator rescaled and rounded
//! to f16 when a lane's maximum moves, and the value multiply-add rounded to f16. So a prompt's
//! attention is bit-identical to attending token by token (tested), and a token's result does
//! not depend on how its prompt was cut into chunks.
//!
//! Chunks of [`F32_MIN_TOKENS`] tokens or more take [`attend_tile_f32`] instead: llama.cpp's
//! own tiled attention for large prompt batches (`ggml_compute_forward_flash_attn_ext_tiled`),
//! all in f32: the query as is, each score one fused multiply-add chain over the head, the
//! softmax maximum moved once per block of 64 keys, weights from ggml's vectorised `exp`, and
//! the value sum an f32 multiply-add chain. No f16 rounding per key makes it the faster kernel,
//! and it reproduces llama.cpp's prompt evaluation bit for bit (tested against a scalar port).

use half::f16;

/// Queries per tile.
pub const TILE: usize = 16;

/// Keys per block of the f32 kernel (llama.cpp's `GGML_FA_TILE_KV`): its softmax maximum moves
/// once per block, at absolute positions `0, 64, 128, ...`.
pub const KV_BLOCK: usize = 64;

/// The fewest tokens of a prompt chunk for which llama.cpp evaluates attention with its tiled
/// f32 kernel (`GGML_FA_TILE_Q`), and so does ferrum.
pub const F32_MIN_TOKENS: usize = 64;

/// Whether this CPU runs the tiled kernel.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static ON: OnceLock<bool> = OnceLock::new();
        *ON.get_or_init(|| {
            std::env::var("FERRUM_FLASH").map_or(true, |v| v != "off" && v != "0")
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512dq")
                && is_x86_feature_detected!("f16c")
                && is_x86_feature_detected!("fma")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether this CPU runs the q8_0 tile ([`attend_tile_q8`]): the tiled kernel's features and
/// AVX-512 VNNI for the integer dot products.
pub fn available_q8() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        available()
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vnni")
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
    /// The q8_0 tile's queries: per block and group of four quants, each lane's four bytes
    /// (`[block][group][lane]`), 128 times each group's sum, and each block's scale per lane.
    q8: Vec<i32>,
    q8_sum: Vec<i32>,
    q8_scale: Vec<f32>,
    q8_bytes: Vec<u8>,
    qt: Vec<f32>,
    ot: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    /// One query's result, handed to the caller.
    row: Vec<f32>,
    /// The f32 kernel's scores, then weights, of one key block (`[key][lane]`).
    kq: Vec<f32>,
    /// The f32 kernel's positions per tile and lane, and softmax states per tile.
    lanes: Vec<[i32; TILE]>,
    states: Vec<Softmax>,
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
    let FlashScratch {
        qt, ot, k, v, row, ..
    } = scratch;
    qt.clear();
    qt.resize(hd * TILE, 0.0);
    for i in 0..n_q {
        for (d, &x) in q(i).iter().enumerate() {
            qt[d * TILE + i] = half::f16::from_f32(x).to_f32();
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
            x86::block(hd, nk, kpos, pos0, scale, qt, k, v, ot, &mut state)
        };
        kpos += nk;
    }
    emit(
        hd,
        [n_q],
        ot,
        std::slice::from_ref(&state),
        row,
        |_, i, r| out(i, r),
    );
}

/// Attention over a q8_0 cache (34-byte rows per 32 values: an f16 scale, 32 signed bytes) of
/// `n_q <= 16` consecutive queries at positions `pos0..pos0 + n_q`, bit for bit what
/// [`super::ops::attend_q8_0`] computes query by query, which is llama.cpp's arithmetic for a
/// q8_0 cache (it has no tiled kernel for one): each query quantized to q8_0, each score its
/// integer dot products with the key summed in ggml's order, the online softmax key by key with
/// libm's `exp`, values dequantized and added in f32. The lanes are the queries, so each key and
/// value row is read once per 16 queries instead of once per query, and every step is one
/// 16-lane operation (the dot products with VNNI).
///
/// # Panics
/// If [`available_q8`] is false, `hd` is not a multiple of 32, or `kv` yields fewer than
/// `pos0 + n_q` rows.
#[allow(clippy::too_many_arguments)]
pub fn attend_tile_q8<'a>(
    hd: usize,
    n_q: usize,
    pos0: usize,
    q: impl Fn(usize) -> &'a [f32],
    kv: impl Iterator<Item = (&'a [u8], &'a [u8])>,
    scale: f32,
    scratch: &mut FlashScratch,
    mut out: impl FnMut(usize, &[f32]),
) {
    use candle_core::quantized::GgmlDType;
    assert!(available_q8(), "the q8_0 tile needs AVX-512 VNNI");
    assert!((1..=TILE).contains(&n_q) && hd.is_multiple_of(32));
    let nb = hd / 32;
    let FlashScratch {
        q8,
        q8_sum,
        q8_scale,
        q8_bytes,
        ot,
        v,
        row,
        ..
    } = scratch;
    q8.clear();
    q8.resize(nb * 8 * TILE, 0);
    q8_sum.clear();
    q8_sum.resize(nb * 8 * TILE, 0);
    q8_scale.clear();
    q8_scale.resize(nb * TILE, 0.0);
    q8_bytes.resize(nb * 34, 0);
    for i in 0..n_q {
        crate::kernels::quantize_row(GgmlDType::Q8_0, q(i), q8_bytes);
        for (b, block) in q8_bytes.chunks_exact(34).enumerate() {
            q8_scale[b * TILE + i] = f16::from_le_bytes([block[0], block[1]]).to_f32();
            for (g, four) in block[2..].chunks_exact(4).enumerate() {
                let at = (b * 8 + g) * TILE + i;
                q8[at] = i32::from_le_bytes([four[0], four[1], four[2], four[3]]);
                q8_sum[at] = 128 * four.iter().map(|&x| x as i8 as i32).sum::<i32>();
            }
        }
    }
    ot.clear();
    ot.resize(hd * TILE, 0.0);
    v.resize(hd, 0.0);
    let mut state = Softmax::new();
    for (j, (kr, vr)) in kv.take(pos0 + n_q).enumerate() {
        assert!(kr.len() == nb * 34 && vr.len() == nb * 34);
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `available_q8` checked the features; the buffers have the sizes set above
        // and the rows `nb` blocks (asserted).
        unsafe {
            x86::key_q8(
                hd, j, pos0, scale, q8, q8_sum, q8_scale, kr, vr, v, ot, &mut state,
            )
        };
    }
    emit(
        hd,
        [n_q],
        ot,
        std::slice::from_ref(&state),
        row,
        |_, i, r| out(i, r),
    );
}

/// The most query heads that share a key head the engine attends in one call of
/// [`attend_tiles_f32`] (one tile each): the scratch of 16 tiles stays within L2.
pub const MAX_GROUP: usize = 16;

/// The most queries [`attend_tile_f32`] takes at once: four 16-lane tiles share each widened
/// key block, so a long prompt's keys are converted and walked a quarter as often.
pub const F32_QUERIES: usize = 4 * TILE;

/// Attention of up to [`F32_QUERIES`] queries at positions `pos` (non-decreasing) over the
/// keys and values at positions `0..=pos[last]` (`kv`: one `(key, value)` head row per position,
/// in order), in llama.cpp's tiled f32 arithmetic (see the module doc), 16 queries to a tile.
/// `q(i)` is query `i`, `out(i)` receives its result. Each query's result depends only on its
/// own position and values, not on the tile it is in: a prompt's consecutive queries of one
/// head and a decoded token's heads that share a key head (`pos` all equal) get the same
/// arithmetic.
///
/// # Panics
/// If [`available`] is false, or `kv` yields too few rows.
pub fn attend_tile_f32<'a>(
    hd: usize,
    pos: &[usize],
    q: impl Fn(usize) -> &'a [f32],
    kv: impl Iterator<Item = (&'a [f16], &'a [f16])>,
    scale: f32,
    scratch: &mut FlashScratch,
    mut out: impl FnMut(usize, &[f32]),
) {
    assert!((1..=F32_QUERIES).contains(&pos.len()));
    assert!(pos.windows(2).all(|w| w[0] <= w[1]));
    // At most four tiles: an array, not an allocation per call (decoding calls this per key
    // head and layer).
    let mut tiles = [&pos[..0]; F32_QUERIES / TILE];
    for (t, chunk) in tiles.iter_mut().zip(pos.chunks(TILE)) {
        *t = chunk;
    }
    attend_tiles_f32(
        hd,
        &tiles[..pos.len().div_ceil(TILE)],
        |g, i| q(g * TILE + i),
        kv,
        scale,
        scratch,
        |g, i, row| out(g * TILE + i, row),
    );
}

/// Attention of several tiles of queries over one key head, in llama.cpp's tiled f32
/// arithmetic (see the module doc): tile `g` holds `pos[g].len() <= 16` queries at the
/// (non-decreasing) positions `pos[g]`, query `i` of it is `q(g, i)` and its result goes to
/// `out(g, i, row)`. Each key block of `kv` (one `(key, value)` head row per position, in order,
/// up to the largest position) is widened to f32 once for all the tiles. The queries of a
/// prompt chunk's heads that share a key head (see [`attend_tile_f32`]: a query's result does
/// not depend on its tile or lane) so read and widen each key row once for the whole group
/// instead of once per head, and a chunk of 4 tokens fills the lanes with its heads instead of
/// leaving 12 of 16 idle.
///
/// # Panics
/// If [`available`] is false, a tile is empty, longer than 16 or not sorted, `hd` is not a
/// multiple of 16, or `kv` yields too few rows.
pub fn attend_tiles_f32<'a>(
    hd: usize,
    pos: &[&[usize]],
    q: impl Fn(usize, usize) -> &'a [f32],
    kv: impl Iterator<Item = (&'a [f16], &'a [f16])>,
    scale: f32,
    scratch: &mut FlashScratch,
    mut out: impl FnMut(usize, usize, &[f32]),
) {
    assert!(available(), "the tiled attention needs AVX-512");
    assert!(hd.is_multiple_of(16));
    assert!(pos
        .iter()
        .all(|t| (1..=TILE).contains(&t.len()) && t.windows(2).all(|w| w[0] <= w[1])));
    let tiles = pos.len();
    let FlashScratch {
        qt,
        ot,
        k,
        v,
        row,
        kq,
        lanes,
        states,
        ..
    } = scratch;
    // Lane i of tile g is query i of it; unused lanes repeat the tile's last position (on a
    // zero query), so every lane sees key 0 and lane 15 holds the tile's largest position.
    lanes.clear();
    lanes.extend(
        pos.iter()
            .map(|t| std::array::from_fn(|i| t[i.min(t.len() - 1)] as i32)),
    );
    let tile_len = hd * TILE;
    qt.clear();
    qt.resize(tiles * tile_len, 0.0);
    for (g, t) in pos.iter().enumerate() {
        let qg = &mut qt[g * tile_len..(g + 1) * tile_len];
        for i in 0..t.len() {
            for (d, &x) in q(g, i).iter().enumerate() {
                qg[d * TILE + i] = x;
            }
        }
    }
    ot.clear();
    ot.resize(tiles * tile_len, 0.0);
    k.resize(hd * KV_BLOCK, 0.0);
    v.resize(hd * KV_BLOCK, 0.0);
    kq.resize(KV_BLOCK * TILE, 0.0);
    states.clear();
    states.resize(tiles, Softmax::new());
    let n_ctx = lanes.iter().map(|l| l[TILE - 1]).max().unwrap_or(-1) + 1;
    let n_ctx = n_ctx as usize;
    let mut kv = kv.take(n_ctx);
    let mut kpos = 0;
    while kpos < n_ctx {
        let nk = (n_ctx - kpos).min(KV_BLOCK);
        for j in 0..nk {
            let (kr, vr) = kv.next().expect("a key and value per position");
            widen(kr, &mut k[j * hd..(j + 1) * hd]);
            widen(vr, &mut v[j * hd..(j + 1) * hd]);
        }
        for g in 0..tiles {
            // A tile whose queries all precede the block sees none of it.
            if kpos as i32 > lanes[g][TILE - 1] {
                continue;
            }
            let (qg, og) = (
                &qt[g * tile_len..(g + 1) * tile_len],
                &mut ot[g * tile_len..(g + 1) * tile_len],
            );
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `available` checked the features; the buffers have the sizes set above.
            unsafe {
                x86::block_f32(
                    hd,
                    nk,
                    kpos,
                    &lanes[g],
                    scale,
                    qg,
                    k,
                    v,
                    kq,
                    og,
                    &mut states[g],
                )
            };
        }
        kpos += nk;
    }
    emit(
        hd,
        pos.iter().map(|t| t.len()),
        ot,
        states,
        row,
        |g, i, r| out(g, i, r),
    );
}

/// Hands each tile's queries' results to `out(tile, query, row)`: tile `g` has the `g`th of
/// `counts` queries, query `i`'s result is lane `i` of the tile's output accumulator (tiles
/// `hd × 16` floats apart in `ot`) divided by its softmax sum.
fn emit(
    hd: usize,
    counts: impl IntoIterator<Item = usize>,
    ot: &[f32],
    states: &[Softmax],
    row: &mut Vec<f32>,
    mut out: impl FnMut(usize, usize, &[f32]),
) {
    row.resize(hd, 0.0);
    for (g, n) in counts.into_iter().enumerate() {
        for lane in 0..n {
            let l = states[g].l[lane];
            let inv = if l == 0.0 { 0.0 } else { 1.0 / l };
            for (d, o) in row.iter_mut().enumerate() {
                *o = ot[g * hd * TILE + d * TILE + lane] * inv;
            }
            out(g, lane, row);
        }
    }
}

fn widen(src: &[f16], dst: &mut [f32]) {
    half::slice::HalfFloatSliceExt::convert_to_f32_slice(src, dst);
}

/// The online softmax's per-query state: running maximum and sum of weights.
#[derive(Clone)]
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

    /// `exp` of every lane, with libm's `expf` as the per-token path computes it.
    #[inline]
    #[target_feature(enable = "avx512f,fma")]
    fn exp(x: __m512) -> __m512 {
        let mut v = [0f32; TILE];
        // SAFETY: `v` holds 16 floats.
        unsafe { _mm512_storeu_ps(v.as_mut_ptr(), x) };
        for e in v.iter_mut() {
            *e = e.exp();
        }
        // SAFETY: as above.
        unsafe { _mm512_loadu_ps(v.as_ptr()) }
    }

    /// Every lane rounded to the nearest f16 (ties to even), as f32.
    #[inline]
    #[target_feature(enable = "avx512f,fma,f16c")]
    fn round16(x: __m512) -> __m512 {
        _mm512_cvtph_ps(_mm512_cvtps_ph::<
            { _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC },
        >(x))
    }

    /// `ggml_v_expf`, the AVX-512 version (see `ops::ggml_expf`).
    #[inline]
    #[target_feature(enable = "avx512f,avx512dq,fma")]
    fn ggml_expf(x: __m512) -> __m512 {
        use crate::model::ops::{EXP_LN2_HI, EXP_LN2_LO, EXP_LOG2E, EXP_POLY, EXP_SHIFT};
        let c = |b: u32| _mm512_set1_ps(f32::from_bits(b));
        let r = c(EXP_SHIFT);
        let n = _mm512_sub_ps(_mm512_fmadd_ps(x, c(EXP_LOG2E), r), r);
        let b = _mm512_fnmadd_ps(n, c(EXP_LN2_LO), _mm512_fnmadd_ps(n, c(EXP_LN2_HI), x));
        let d = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(_mm512_abs_ps(n), _mm512_set1_ps(192.0));
        let u = _mm512_mul_ps(b, b);
        let p = EXP_POLY;
        let j = _mm512_fmadd_ps(
            _mm512_fmadd_ps(
                _mm512_fmadd_ps(c(p[0]), b, c(p[1])),
                u,
                _mm512_fmadd_ps(c(p[2]), b, c(p[3])),
            ),
            u,
            _mm512_fmadd_ps(c(p[4]), b, _mm512_set1_ps(1.0)),
        );
        let res = _mm512_scalef_ps(j, n);
        if d == 0 {
            return res;
        }
        let zero = _mm512_setzero_ps();
        let le = _mm512_cmp_ps_mask::<_CMP_LE_OQ>(n, zero);
        let alt = _mm512_mask_blend_ps(le, _mm512_set1_ps(f32::INFINITY), zero);
        _mm512_mask_blend_ps(d, res, alt)
    }

    /// One block of `nk <= 64` keys at positions `kpos..kpos + nk` (`kpos` a multiple of 64)
    /// against the tile's queries at positions `lanes`, as one iteration of llama.cpp's tiled
    /// kernel: scores, the block maximum, rescaling, weights and their sum, values.
    ///
    /// # Safety
    /// The CPU must support AVX-512 F/DQ and FMA; `qt` and `ot` must hold `hd × 16` floats,
    /// `k` and `v` `hd × 64`, `kq` `64 × 16`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512dq,fma")]
    pub(super) unsafe fn block_f32(
        hd: usize,
        nk: usize,
        kpos: usize,
        lanes: &[i32; TILE],
        scale: f32,
        qt: &[f32],
        k: &[f32],
        v: &[f32],
        kq: &mut [f32],
        ot: &mut [f32],
        st: &mut Softmax,
    ) {
        const KEYS: usize = 8;
        assert!(qt.len() >= hd * TILE && ot.len() >= hd * TILE && hd.is_multiple_of(16));
        assert!(k.len() >= hd * 64 && v.len() >= hd * 64 && kq.len() >= 64 * TILE && nk <= 64);
        // SAFETY (whole body): indices stay below the asserted sizes (key rows below 64).
        unsafe {
            let (qp, kp, vp, op, sp) = (
                qt.as_ptr(),
                k.as_ptr(),
                v.as_ptr(),
                ot.as_mut_ptr(),
                kq.as_mut_ptr(),
            );
            let lane = _mm512_loadu_si512(lanes.as_ptr().cast());
            let ninf = _mm512_set1_ps(f32::NEG_INFINITY);
            // Scores: a multiply-add chain over the head per (query, key), eight keys at a time
            // so the chains overlap; keys past a lane's position are -inf.
            for j0 in (0..nk).step_by(KEYS) {
                let mut acc = [_mm512_setzero_ps(); KEYS];
                for d in 0..hd {
                    let qv = _mm512_loadu_ps(qp.add(d * TILE));
                    for (b, a) in acc.iter_mut().enumerate() {
                        let kd = *kp.add((j0 + b).min(63) * hd + d);
                        *a = _mm512_fmadd_ps(qv, _mm512_set1_ps(kd), *a);
                    }
                }
                for (b, a) in acc.iter().enumerate().take(nk - j0) {
                    let j = j0 + b;
                    let valid = _mm512_cmpge_epi32_mask(lane, _mm512_set1_epi32((kpos + j) as i32));
                    let s =
                        _mm512_mask_blend_ps(valid, ninf, _mm512_mul_ps(*a, _mm512_set1_ps(scale)));
                    _mm512_storeu_ps(sp.add(j * TILE), s);
                }
            }
            // The block maximum; where it raises a lane's maximum, that lane's sum and values
            // are rescaled by libm's exp(old - new).
            let mut tmax = ninf;
            for j in 0..nk {
                tmax = _mm512_max_ps(tmax, _mm512_loadu_ps(sp.add(j * TILE)));
            }
            let m_old = _mm512_loadu_ps(st.m.as_ptr());
            let m_new = _mm512_max_ps(m_old, tmax);
            let raised = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(m_new, m_old);
            if raised != 0 {
                let mut ms = [1f32; TILE];
                let (mut mo, mut mn) = ([0f32; TILE], [0f32; TILE]);
                _mm512_storeu_ps(mo.as_mut_ptr(), m_old);
                _mm512_storeu_ps(mn.as_mut_ptr(), m_new);
                for i in 0..TILE {
                    if raised & (1 << i) != 0 {
                        ms[i] = (mo[i] - mn[i]).exp();
                        st.l[i] *= ms[i];
                    }
                }
                let msv = _mm512_loadu_ps(ms.as_ptr());
                for d in 0..hd {
                    let o = op.add(d * TILE);
                    _mm512_storeu_ps(o, _mm512_mul_ps(_mm512_loadu_ps(o), msv));
                }
            }
            _mm512_storeu_ps(st.m.as_mut_ptr(), m_new);
            // Weights exp(s - max) (masked keys: 0), summed per 16 keys in
            // `_mm512_reduce_add_ps`'s order and over the block in f64, as
            // `ggml_vec_soft_max_f32` does with keys in its lanes.
            let mut sums = [0f64; TILE];
            for g in (0..nk).step_by(16) {
                let mut p = [_mm512_setzero_ps(); 16];
                for (i, pi) in p.iter_mut().enumerate().take(nk - g) {
                    let at = sp.add((g + i) * TILE);
                    *pi = ggml_expf(_mm512_sub_ps(_mm512_loadu_ps(at), m_new));
                    _mm512_storeu_ps(at, *pi);
                }
                let t: [__m512; 8] = std::array::from_fn(|i| _mm512_add_ps(p[i], p[i + 8]));
                let t: [__m512; 4] = std::array::from_fn(|i| _mm512_add_ps(t[i], t[i + 4]));
                let r = _mm512_add_ps(_mm512_add_ps(t[0], t[2]), _mm512_add_ps(t[1], t[3]));
                let mut rs = [0f32; TILE];
                _mm512_storeu_ps(rs.as_mut_ptr(), r);
                for (s, r) in sums.iter_mut().zip(rs) {
                    *s += r as f64;
                }
            }
            for (l, s) in st.l.iter_mut().zip(sums) {
                *l = (*l as f64 + s) as f32;
            }
            // Values: per output element, a multiply-add chain over the keys in order; 16
            // output rows stay in registers while the keys stream.
            for d0 in (0..hd).step_by(16) {
                let mut acc: [__m512; 16] =
                    std::array::from_fn(|e| _mm512_loadu_ps(op.add((d0 + e) * TILE)));
                for j in 0..nk {
                    let w = _mm512_loadu_ps(sp.add(j * TILE));
                    let vr = vp.add(j * hd + d0);
                    for (e, a) in acc.iter_mut().enumerate() {
                        *a = _mm512_fmadd_ps(w, _mm512_set1_ps(*vr.add(e)), *a);
                    }
                }
                for (e, a) in acc.iter().enumerate() {
                    _mm512_storeu_ps(op.add((d0 + e) * TILE), *a);
                }
            }
        }
    }

    /// Key `kpos` (q8_0 row `k`, value row `vr`) against the q8_0 tile's 16 queries at
    /// positions `pos0..pos0 + 16`, as [`crate::model::ops::attend_q8_0`] takes it for each.
    ///
    /// # Safety
    /// The CPU must support AVX-512 F, BW, VNNI, FMA and F16C; `q8` and `q8_sum` must hold
    /// `hd / 32 × 8 × 16` values, `q8_scale` `hd / 32 × 16`, `k` and `vr` `hd / 32` blocks,
    /// `v` `hd` floats and `ot` `hd × 16`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,fma,f16c")]
    pub(super) unsafe fn key_q8(
        hd: usize,
        kpos: usize,
        pos0: usize,
        scale: f32,
        q8: &[i32],
        q8_sum: &[i32],
        q8_scale: &[f32],
        k: &[u8],
        vr: &[u8],
        v: &mut [f32],
        ot: &mut [f32],
        st: &mut Softmax,
    ) {
        let lane = _mm512_add_epi32(
            _mm512_set1_epi32(pos0 as i32),
            _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        );
        let valid = _mm512_cmpge_epi32_mask(lane, _mm512_set1_epi32(kpos as i32));
        if valid == 0 {
            // No query sees this key (per token it is never visited): nothing changes.
            return;
        }
        let scale16 = |b: &[u8]| half::f16::from_le_bytes([b[0], b[1]]).to_f32();
        // SAFETY (whole body): indices within the sizes of the contract.
        unsafe {
            // The score: per block, eight lanes of integer sums over four quants each (the
            // key's bytes offset by 128 so VNNI multiplies them unsigned; the offset taken
            // back with the query's sums), each added to its accumulator as `ggml_fma` does,
            // blocks in order, then the eight accumulators reduced in `hsum`'s order.
            let mut acc = [_mm512_setzero_ps(); 8];
            for (b, block) in k.chunks_exact(34).enumerate() {
                let d = _mm512_mul_ps(
                    _mm512_set1_ps(scale16(block)),
                    _mm512_loadu_ps(q8_scale.as_ptr().add(b * TILE)),
                );
                for (g, a) in acc.iter_mut().enumerate() {
                    let four = block.as_ptr().add(2 + 4 * g).cast::<u32>().read_unaligned();
                    let at = (b * 8 + g) * TILE;
                    let p = _mm512_dpbusd_epi32(
                        _mm512_setzero_si512(),
                        _mm512_set1_epi32((four ^ 0x8080_8080) as i32),
                        _mm512_loadu_si512(q8.as_ptr().add(at).cast()),
                    );
                    let p = _mm512_sub_epi32(p, _mm512_loadu_si512(q8_sum.as_ptr().add(at).cast()));
                    *a = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(p), *a);
                }
            }
            let t: [__m512; 4] = std::array::from_fn(|i| _mm512_add_ps(acc[i], acc[i + 4]));
            let s = _mm512_add_ps(_mm512_add_ps(t[0], t[2]), _mm512_add_ps(t[1], t[3]));
            let s = _mm512_mul_ps(s, _mm512_set1_ps(scale));
            // The online softmax step of `attend_q8_0`, per lane (see `block`).
            let mut m = _mm512_loadu_ps(st.m.as_ptr());
            let mut sum = _mm512_loadu_ps(st.l.as_ptr());
            let one = _mm512_set1_ps(1.0);
            let gt = _mm512_mask_cmp_ps_mask::<_CMP_GT_OQ>(valid, s, m);
            let e = exp(_mm512_mask_blend_ps(
                gt,
                _mm512_sub_ps(s, m),
                _mm512_sub_ps(m, s),
            ));
            let ms = _mm512_mask_blend_ps(gt, one, e);
            let vs = _mm512_maskz_mov_ps(valid, _mm512_mask_blend_ps(gt, e, one));
            m = _mm512_mask_blend_ps(gt, m, s);
            let op = ot.as_mut_ptr();
            if gt != 0 {
                for d in 0..hd {
                    let a = _mm512_loadu_ps(op.add(d * TILE));
                    _mm512_storeu_ps(op.add(d * TILE), _mm512_mul_ps(a, ms));
                }
            }
            // The value row dequantized as `mad_q8_0` does it (`q · d`), then one fused
            // multiply-add per element and lane.
            for (block, vb) in vr.chunks_exact(34).zip(v.chunks_exact_mut(32)) {
                let dv = scale16(block);
                for (x, &q) in vb.iter_mut().zip(&block[2..]) {
                    *x = q as i8 as f32 * dv;
                }
            }
            for (d, &x) in v.iter().enumerate() {
                let a = _mm512_loadu_ps(op.add(d * TILE));
                _mm512_storeu_ps(op.add(d * TILE), _mm512_fmadd_ps(_mm512_set1_ps(x), vs, a));
            }
            sum = _mm512_fmadd_ps(sum, ms, vs);
            _mm512_storeu_ps(st.m.as_mut_ptr(), m);
            _mm512_storeu_ps(st.l.as_mut_ptr(), sum);
        }
    }

    /// The 16 queries' scores against key `k` (`hd` floats, a multiple of 64), in
    /// `ggml_vec_dot_f16`'s order: per 64 elements, four 16-lane accumulators (`fma` per
    /// element), added as (0 + 2) + (1 + 3), then reduced as `_mm512_reduce_add_ps` does.
    ///
    /// # Safety
    /// `qt` must hold `hd × 16` floats and `k` `hd`.
    #[inline]
    #[target_feature(enable = "avx512f,fma")]
    unsafe fn score(hd: usize, qt: *const f32, k: *const f32) -> __m512 {
        // SAFETY: indices below `hd` (keys) and `hd × 16` (queries).
        unsafe {
            let mut v = [_mm512_setzero_ps(); 16];
            for (e, ve) in v.iter_mut().enumerate() {
                let mut acc = [_mm512_setzero_ps(); 4];
                for g in (0..hd).step_by(64) {
                    for (c, a) in acc.iter_mut().enumerate() {
                        let d = g + 16 * c + e;
                        *a = _mm512_fmadd_ps(
                            _mm512_set1_ps(*k.add(d)),
                            _mm512_loadu_ps(qt.add(d * TILE)),
                            *a,
                        );
                    }
                }
                *ve = _mm512_add_ps(_mm512_add_ps(acc[0], acc[2]), _mm512_add_ps(acc[1], acc[3]));
            }
            // _mm512_reduce_add_ps: lanes (i, i + 8), then (i, i + 4), then (0, 2) and (1, 3),
            // then those two.
            let t: [__m512; 8] = std::array::from_fn(|i| _mm512_add_ps(v[i], v[i + 8]));
            let t: [__m512; 4] = std::array::from_fn(|i| _mm512_add_ps(t[i], t[i + 4]));
            _mm512_add_ps(_mm512_add_ps(t[0], t[2]), _mm512_add_ps(t[1], t[3]))
        }
    }

    /// One block of `nk <= 16` keys at positions `kpos..kpos + nk` against the tile's queries
    /// at `pos0..pos0 + 16`, key after key as the per-token path takes them.
    ///
    /// # Safety
    /// The CPU must support AVX-512 F, FMA and F16C; `qt`, `k`, `v` and `ot` must hold
    /// `hd × 16` floats.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,fma,f16c")]
    pub(super) unsafe fn block(
        hd: usize,
        nk: usize,
        kpos: usize,
        pos0: usize,
        scale: f32,
        qt: &[f32],
        k: &[f32],
        v: &[f32],
        ot: &mut [f32],
        st: &mut Softmax,
    ) {
        assert!(qt.len() >= hd * TILE && ot.len() >= hd * TILE && hd.is_multiple_of(64));
        assert!(k.len() >= hd * nk && v.len() >= hd * nk && nk <= TILE);
        // SAFETY (whole body): indices below `hd × 16` by the assertions.
        unsafe {
            let (qp, kp, vp, op) = (qt.as_ptr(), k.as_ptr(), v.as_ptr(), ot.as_mut_ptr());
            // Lane i may see key j when kpos + j <= pos0 + i.
            let lane = _mm512_add_epi32(
                _mm512_set1_epi32(pos0 as i32),
                _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
            );
            let mut m = _mm512_loadu_ps(st.m.as_ptr());
            let mut sum = _mm512_loadu_ps(st.l.as_ptr());
            let one = _mm512_set1_ps(1.0);
            for j in 0..nk {
                let valid = _mm512_cmpge_epi32_mask(lane, _mm512_set1_epi32((kpos + j) as i32));
                let s = _mm512_mul_ps(score(hd, qp, kp.add(j * hd)), _mm512_set1_ps(scale));
                // Where the score is a new maximum: ms = exp(old - new), vs = 1; elsewhere
                // ms = 1, vs = exp(s - m); masked lanes: ms = 1, vs = 0.
                let gt = _mm512_mask_cmp_ps_mask::<_CMP_GT_OQ>(valid, s, m);
                let e = exp(_mm512_mask_blend_ps(
                    gt,
                    _mm512_sub_ps(s, m),
                    _mm512_sub_ps(m, s),
                ));
                let ms = _mm512_mask_blend_ps(gt, one, e);
                let vs = _mm512_maskz_mov_ps(valid, _mm512_mask_blend_ps(gt, e, one));
                m = _mm512_mask_blend_ps(gt, m, s);
                if gt != 0 {
                    for d in 0..hd {
                        let a = _mm512_loadu_ps(op.add(d * TILE));
                        _mm512_storeu_ps(op.add(d * TILE), round16(_mm512_mul_ps(a, ms)));
                    }
                }
                let vr = vp.add(j * hd);
                for d in 0..hd {
                    let a = _mm512_loadu_ps(op.add(d * TILE));
                    let a = _mm512_fmadd_ps(_mm512_set1_ps(*vr.add(d)), vs, a);
                    _mm512_storeu_ps(op.add(d * TILE), round16(a));
                }
                sum = _mm512_fmadd_ps(sum, ms, vs);
            }
            _mm512_storeu_ps(st.m.as_mut_ptr(), m);
            _mm512_storeu_ps(st.l.as_mut_ptr(), sum);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::{attend_f16, AttnScratch};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// `n` random keys (within ±`key_range`), values and queries.
    fn random_rows(rng: &mut StdRng, n: usize, key_range: f32) -> (Vec<f16>, Vec<f16>, Vec<f32>) {
        let keys = (0..n)
            .map(|_| f16::from_f32(rng.gen_range(-key_range..key_range)))
            .collect();
        let vals = (0..n)
            .map(|_| f16::from_f32(rng.gen_range(-1.0..1.0)))
            .collect();
        let qs = (0..n).map(|_| rng.gen_range(-2.0..2.0)).collect();
        (keys, vals, qs)
    }

    /// llama.cpp's tiled f32 attention for one query at `pos`, ported line by line from
    /// `ggml_compute_forward_flash_attn_ext_tiled` (scalar; the test oracle of
    /// `attend_tile_f32`).
    fn llama_tiled(q: &[f32], keys: &[f16], vals: &[f16], pos: usize, scale: f32) -> Vec<f32> {
        use crate::model::ops::ggml_expf;
        let hd = q.len();
        let (mut m, mut s) = (f32::NEG_INFINITY, 0f32);
        let mut acc = vec![0f32; hd];
        for c in (0..=pos).step_by(KV_BLOCK) {
            let n = KV_BLOCK.min(pos + 1 - c);
            let sc: Vec<f32> = (c..c + n)
                .map(|j| {
                    let mut a = 0f32;
                    for d in 0..hd {
                        a = q[d].mul_add(keys[j * hd + d].to_f32(), a);
                    }
                    a * scale
                })
                .collect();
            let m_new = m.max(sc.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)));
            if m_new > m {
                let ms = (m - m_new).exp();
                acc.iter_mut().for_each(|a| *a *= ms);
                s *= ms;
            }
            m = m_new;
            let p: Vec<f32> = (0..KV_BLOCK)
                .map(|i| if i < n { ggml_expf(sc[i] - m_new) } else { 0.0 })
                .collect();
            let mut sum = 0f64;
            for g in p.chunks(16) {
                let t: Vec<f32> = (0..8).map(|i| g[i] + g[i + 8]).collect();
                let t: Vec<f32> = (0..4).map(|i| t[i] + t[i + 4]).collect();
                sum += ((t[0] + t[2]) + (t[1] + t[3])) as f64;
            }
            s = (s as f64 + sum) as f32;
            for (j, &w) in p.iter().enumerate().take(n) {
                for d in 0..hd {
                    acc[d] = w.mul_add(vals[(c + j) * hd + d].to_f32(), acc[d]);
                }
            }
        }
        let inv = if s == 0.0 { 0.0 } else { 1.0 / s };
        acc.iter().map(|a| a * inv).collect()
    }

    /// The f32 tile against the scalar port of llama.cpp's kernel, bit for bit: first and
    /// later tiles, partial tiles, key blocks cut across a tile, both head sizes.
    #[test]
    fn f32_tiles_match_llama_cpp_tiled_attention() {
        if !available() {
            eprintln!("skipped: no AVX-512 on this CPU, the tiled attention is not used");
            return;
        }
        let mut rng = StdRng::seed_from_u64(9);
        for (hd, n_ctx) in [(64, 40), (128, 150), (64, 300)] {
            let (keys, vals, qs) = random_rows(&mut rng, n_ctx * hd, 3.0);
            let scale = 1.0 / (hd as f32).sqrt();
            let rows =
                (0..n_ctx).map(|p| (&keys[p * hd..(p + 1) * hd], &vals[p * hd..(p + 1) * hd]));
            let mut scratch = FlashScratch::default();
            for pos0 in (0..n_ctx)
                .step_by(TILE)
                .chain([3, 57, n_ctx - 5])
                .filter(|&p| p < n_ctx)
            {
                let n_q = (n_ctx - pos0).min(if pos0 % 32 == 0 { F32_QUERIES } else { TILE });
                let pos: Vec<usize> = (pos0..pos0 + n_q).collect();
                attend_tile_f32(
                    hd,
                    &pos,
                    |i| &qs[(pos0 + i) * hd..(pos0 + i + 1) * hd],
                    rows.clone(),
                    scale,
                    &mut scratch,
                    |i, got| {
                        let p = pos0 + i;
                        let want = llama_tiled(&qs[p * hd..(p + 1) * hd], &keys, &vals, p, scale);
                        for (d, (&g, &w)) in got.iter().zip(&want).enumerate() {
                            assert_eq!(
                                g.to_bits(),
                                w.to_bits(),
                                "hd={hd} query {p} dim {d}: tile {g}, llama.cpp {w}"
                            );
                        }
                    },
                );
            }
            // A decoded token's heads that share a key head: several queries at one position.
            for p in [0, 63, 64, n_ctx - 1].into_iter().filter(|&p| p < n_ctx) {
                let query = |i: usize| &qs[(i * 13 % n_ctx) * hd..(i * 13 % n_ctx + 1) * hd];
                attend_tile_f32(
                    hd,
                    &[p; 7],
                    query,
                    rows.clone(),
                    scale,
                    &mut scratch,
                    |i, got| {
                        let want = llama_tiled(query(i), &keys, &vals, p, scale);
                        assert_eq!(got, &want[..], "hd={hd} position {p} lane {i}");
                    },
                );
            }
        }
    }

    /// Tiles of several heads over one key head (a prompt chunk's group of heads in one call)
    /// against the scalar port of llama.cpp's kernel, bit for bit: chunks shorter than a tile,
    /// chunks deep in the context, 1 to 7 heads.
    #[test]
    fn grouped_f32_tiles_match_llama_cpp_tiled_attention() {
        if !available() {
            eprintln!("skipped: no AVX-512 on this CPU, the tiled attention is not used");
            return;
        }
        let mut rng = StdRng::seed_from_u64(23);
        let (hd, n_ctx) = (64, 700);
        let (keys, vals, _) = random_rows(&mut rng, n_ctx * hd, 3.0);
        let heads = 7;
        let qs: Vec<f32> = (0..n_ctx * heads * hd)
            .map(|_| rng.gen_range(-2.0..2.0))
            .collect();
        let query = |p: usize, h: usize| &qs[(p * heads + h) * hd..(p * heads + h + 1) * hd];
        let rows = (0..n_ctx).map(|p| (&keys[p * hd..(p + 1) * hd], &vals[p * hd..(p + 1) * hd]));
        let scale = 1.0 / (hd as f32).sqrt();
        let mut scratch = FlashScratch::default();
        for (pos0, len, n_heads) in [
            (0, 16, 7),
            (3, 5, 2),
            (520, 16, 4),
            (640, 9, 1),
            (690, 10, 7),
        ] {
            let pos: Vec<usize> = (pos0..pos0 + len).collect();
            let tiles = vec![&pos[..]; n_heads];
            let mut seen = 0;
            attend_tiles_f32(
                hd,
                &tiles,
                |g, i| query(pos0 + i, g),
                rows.clone(),
                scale,
                &mut scratch,
                |g, i, got| {
                    let p = pos0 + i;
                    let want = llama_tiled(query(p, g), &keys, &vals, p, scale);
                    assert_eq!(got, &want[..], "position {p} head {g}");
                    seen += 1;
                },
            );
            assert_eq!(seen, len * n_heads);
        }
    }

    /// The q8_0 tile against the per-token q8_0 path, bit for bit: first and later tiles,
    /// partial tiles, keys large enough that the maximum moves often, two head sizes.
    #[test]
    fn q8_0_tiles_match_per_token_attention() {
        if !available_q8() {
            eprintln!("skipped: no AVX-512 VNNI on this CPU, the q8_0 tile is not used");
            return;
        }
        use crate::model::ops::attend_q8_0;
        use candle_core::quantized::GgmlDType;
        let mut rng = StdRng::seed_from_u64(17);
        for (hd, n_ctx, key_range) in [(64, 150, 3.0f32), (128, 70, 12.0), (64, 40, 0.5)] {
            let rows = |range: f32, rng: &mut StdRng| -> Vec<u8> {
                let x: Vec<f32> = (0..n_ctx * hd)
                    .map(|_| rng.gen_range(-range..range))
                    .collect();
                let mut out = vec![0u8; n_ctx * hd / 32 * 34];
                crate::kernels::quantize_row(GgmlDType::Q8_0, &x, &mut out);
                out
            };
            let (keys, vals) = (rows(key_range, &mut rng), rows(1.0, &mut rng));
            let qs: Vec<f32> = (0..n_ctx * hd).map(|_| rng.gen_range(-2.0..2.0)).collect();
            let row = hd / 32 * 34;
            let kv = || {
                (0..n_ctx).map(|p| (&keys[p * row..(p + 1) * row], &vals[p * row..(p + 1) * row]))
            };
            let scale = 1.0 / (hd as f32).sqrt();
            let (mut scratch, mut per_token) = (FlashScratch::default(), AttnScratch::default());
            for pos0 in (0..n_ctx).step_by(TILE).chain([5, n_ctx - 3]) {
                let n_q = (n_ctx - pos0).min(TILE);
                let query = |i: usize| &qs[(pos0 + i) * hd..(pos0 + i + 1) * hd];
                attend_tile_q8(hd, n_q, pos0, query, kv(), scale, &mut scratch, |i, got| {
                    let mut want = vec![0f32; hd];
                    attend_q8_0(
                        query(i),
                        kv().take(pos0 + i + 1),
                        scale,
                        &mut per_token,
                        &mut want,
                    );
                    assert_eq!(got, &want[..], "hd={hd} query {}", pos0 + i);
                });
            }
        }
    }

    /// The tile against the per-token path, bit for bit, for chunks that start at and after position 0,
    /// partial tiles, both head sizes.
    #[test]
    fn tiles_match_per_token_attention() {
        if !available() {
            eprintln!("skipped: no AVX-512 on this CPU, the tiled attention is not used");
            return;
        }
        let mut rng = StdRng::seed_from_u64(5);
        for (hd, n_ctx) in [(64, 40), (128, 77), (64, 300)] {
            let (keys, vals, qs) = random_rows(&mut rng, n_ctx * hd, 2.0);
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
                            assert_eq!(
                                g.to_bits(),
                                w.to_bits(),
                                "hd={hd} query {p} dim {d}: tiled {g}, per-token {w}"
                            );
                        }
                    },
                );
            }
        }
    }
}
