//! Prefill GEMM: many activation rows (tokens) against a tile of weight rows, with each weight
//! block decoded once per call instead of once per token.
//!
//! The one-row kernels of [`super::simd`] take one token at a time, so a prompt of `T` tokens
//! unpacks every weight block `T` times (nibbles, high bits, scales): at 512 tokens that, not the
//! integer dot products, is most of the work. Here a matmul call first packs the quantized
//! activations of its tokens into *panels* of 16 tokens ([`Panels`]: each 4-element group of
//! every token side by side, as unsigned bytes `x + 128`, so that one 512-bit register holds one
//! group of all 16 tokens), then each chunk of the call decodes a tile of weight rows once into
//! plain signed bytes with their block scales ([`Tile`]), and the AVX-512 VNNI micro-kernels
//! (`simd::gemm512`) multiply that tile with every panel: one `vpdpbusd` per weight group and
//! row does 64 multiply-adds, its weight operand a broadcast from memory.
//!
//! The integer sums are exact whatever the order, so the kernels reproduce llama.cpp's float
//! arithmetic bit for bit wherever it is a chain per (row, token), which the 16 lanes of a
//! register replay independently:
//! - Q4_0, Q4_1, Q5_0, Q8_0: ggml's `ggml_vec_dot_*` keep eight partial sums per row, one per
//!   4-element group of a block; the kernels keep the same eight accumulators per token and sum
//!   them in ggml's order at the end. This costs a conversion and a multiply-add per group (a
//!   block sum would need one per block), the price of results identical to decoding: a token's
//!   logits do not depend on how many tokens shared its matmul.
//! - Q4_K, in llama.cpp's GEMV order (one multiply-add per block) or, for the lanes of rows in
//!   groups of four, its repacked GEMM order (one per 64 weights): both are chains of whole
//!   integer sums, selected per lane with a mask.
//! - Q6_K in llama.cpp's tiled order (one per block), which it uses for micro-batches of 8 rows
//!   or more; other Q6_K rows keep the one-row kernel, whose eight-lane order would cost a
//!   multiply per 4-element group here.
//!
//! So the GEMM gives exactly the numbers of the one-row kernels it replaces (tested bit for bit
//! in `simd::gemm512`'s tests), and `matmul` is free to send any token it covers through it.

use candle_core::quantized::GgmlDType;
use half::f16;

use super::{row_bytes, AlignedBytes, RowKind, ThreadPool};

/// Tokens per panel: one 512-bit register of 32-bit lanes.
pub const LANES: usize = 16;

/// The fewest tokens for which a matmul takes the GEMM: below this, decoding a tile's weights
/// costs more than it saves.
pub const MIN_TOKENS: usize = 6;

/// Weight rows per GEMM chunk: enough that a panel's load is shared by many rows, few enough
/// that a decoded tile (16 rows of up to 8960 columns: ~180 KiB) stays in L2.
pub const TILE_ROWS: usize = 16;

/// Whether the GEMM covers a token of `kind` for weight type `w` (one it does not cover takes
/// the one-row kernels): every token for the 32-weight formats and Q4_K, Q6_K's only in
/// batches of 8 (llama.cpp's tiled order; its one-row order is not a per-lane chain).
pub fn covers(w: GgmlDType, kind: RowKind) -> bool {
    use GgmlDType::*;
    match w {
        Q4_0 | Q4_1 | Q5_0 | Q8_0 | Q4K => true,
        Q6K => kind.in_batch_of_8,
        _ => false,
    }
}

/// Whether this process runs the GEMM at all (AVX-512 VNNI present and not capped away by
/// `FERRUM_SIMD`, and `FERRUM_GEMM` not `off`).
pub fn enabled() -> bool {
    use std::sync::OnceLock;
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        let off = matches!(
            std::env::var("FERRUM_GEMM").ok().as_deref(),
            Some("off") | Some("0") | Some("none")
        );
        !off && super::simd::Tier::best() == Some(super::simd::Tier::Avx512)
    })
}

/// The quantized activations of some tokens of a matmul call, packed for the micro-kernels.
///
/// Panel `p` holds tokens `tokens[16p..16p + 16]` (the last panel padded with copies of its first
/// token, whose results are not stored).
#[derive(Default)]
pub struct Panels {
    pub dtype: Option<GgmlDType>,
    pub cols: usize,
    /// The token index (row of the activation matrix) of each lane; padded lanes repeat a token.
    pub tokens: Vec<u32>,
    /// How many of `tokens` are real.
    pub n_real: usize,
    /// `[panel][group = cols / 4][lane][4]`: the quants plus 128, as unsigned bytes.
    pub x: AlignedBytes,
    /// `[panel][block][lane]`: the activation block scale.
    pub d: Vec<f32>,
    /// Q8_1: `[panel][block][lane]`, the block's scaled sum. Q8_K: unused.
    pub s: Vec<f32>,
    /// Q8_K: `[panel][64-element pair][lane]`, the sums of the pair's two 32-element sub-blocks
    /// as two `i16` (low, high), for `vpmaddwd` with Q4_K's mins.
    pub bp: Vec<i32>,
    /// Q8_K: per panel, the lanes whose tokens llama.cpp multiplies in groups of four (Q4_K's
    /// repacked GEMM order).
    pub grouped: Vec<u16>,
}

impl Panels {
    pub fn n_panels(&self) -> usize {
        self.tokens.len() / LANES
    }

    /// Packs `tokens` of the quantized activation matrix `xq` (rows of `row_bytes(dtype,
    /// cols)`), marking those of `kinds` in groups of four.
    pub fn pack(
        &mut self,
        pool: &ThreadPool,
        dtype: GgmlDType,
        cols: usize,
        xq: &[u8],
        tokens: &[u32],
        kinds: &[RowKind],
    ) {
        assert!(!tokens.is_empty());
        self.dtype = Some(dtype);
        self.cols = cols;
        self.n_real = tokens.len();
        let np = tokens.len().div_ceil(LANES);
        self.tokens.clear();
        self.tokens.extend_from_slice(tokens);
        self.tokens.resize(np * LANES, tokens[0]);
        let (block, bsize) = match dtype {
            GgmlDType::Q8_0 => (32, 34),
            GgmlDType::Q8_1 => (32, 36),
            GgmlDType::Q8K => (256, 292),
            other => unreachable!("{other:?} is not a GEMM activation format"),
        };
        let nb = cols / block;
        let groups = cols / 4;
        let xrb = row_bytes(dtype, cols);
        assert_eq!(xrb, nb * bsize);
        self.x.resize(np * groups * LANES * 4);
        self.d.clear();
        self.d.resize(np * nb * LANES, 0.0);
        self.s.clear();
        self.bp.clear();
        self.grouped.clear();
        if dtype == GgmlDType::Q8_1 {
            self.s.resize(np * nb * LANES, 0.0);
        }
        if dtype == GgmlDType::Q8K {
            self.bp.resize(np * (cols / 64) * LANES, 0);
            self.grouped.resize(np, 0);
        }
        let tokens = &self.tokens;
        let (xp, dp, sp, bpp, gp) = (
            Ptr(self.x.as_mut_slice().as_mut_ptr()),
            Ptr(self.d.as_mut_ptr()),
            Ptr(self.s.as_mut_ptr()),
            Ptr(self.bp.as_mut_ptr()),
            Ptr(self.grouped.as_mut_ptr()),
        );
        let qoff = if dtype == GgmlDType::Q8_0 { 2 } else { 4 };
        // Panels are independent: one chunk each.
        pool.run(np, &|p| {
            // SAFETY: chunk `p` writes only panel `p`'s parts of each buffer, all sized above.
            let (x, d, s, bp) = unsafe {
                (
                    std::slice::from_raw_parts_mut(
                        xp.get().add(p * groups * LANES * 4),
                        groups * LANES * 4,
                    ),
                    std::slice::from_raw_parts_mut(dp.get().add(p * nb * LANES), nb * LANES),
                    if dtype == GgmlDType::Q8_1 {
                        std::slice::from_raw_parts_mut(sp.get().add(p * nb * LANES), nb * LANES)
                    } else {
                        &mut [][..]
                    },
                    if dtype == GgmlDType::Q8K {
                        std::slice::from_raw_parts_mut(
                            bpp.get().add(p * (cols / 64) * LANES),
                            (cols / 64) * LANES,
                        )
                    } else {
                        &mut [][..]
                    },
                )
            };
            for lane in 0..LANES {
                let t = tokens[p * LANES + lane] as usize;
                let row = &xq[t * xrb..(t + 1) * xrb];
                for b in 0..nb {
                    let blk = &row[b * bsize..(b + 1) * bsize];
                    let qs = &blk[qoff..qoff + block];
                    for (gi, q4) in qs.chunks_exact(4).enumerate() {
                        let g = b * block / 4 + gi;
                        let v = u32::from_le_bytes([q4[0], q4[1], q4[2], q4[3]]) ^ 0x8080_8080;
                        x[(g * LANES + lane) * 4..(g * LANES + lane) * 4 + 4]
                            .copy_from_slice(&v.to_le_bytes());
                    }
                    let di = b * LANES + lane;
                    match dtype {
                        GgmlDType::Q8_0 => d[di] = f16::from_le_bytes([blk[0], blk[1]]).to_f32(),
                        GgmlDType::Q8_1 => {
                            d[di] = f16::from_le_bytes([blk[0], blk[1]]).to_f32();
                            s[di] = f16::from_le_bytes([blk[2], blk[3]]).to_f32();
                        }
                        _ => {
                            d[di] = f32::from_le_bytes([blk[0], blk[1], blk[2], blk[3]]);
                            let bs = |i: usize| {
                                i16::from_le_bytes([blk[260 + 2 * i], blk[261 + 2 * i]]) as i32
                            };
                            for pair in 0..4 {
                                let lo = bs(4 * pair) + bs(4 * pair + 1);
                                let hi = bs(4 * pair + 2) + bs(4 * pair + 3);
                                let v = (lo as u16 as u32) | ((hi as u16 as u32) << 16);
                                bp[(b * 4 + pair) * LANES + lane] = v as i32;
                            }
                        }
                    }
                }
            }
            if dtype == GgmlDType::Q8K {
                let mut m = 0u16;
                for lane in 0..LANES {
                    let t = tokens[p * LANES + lane] as usize;
                    if kinds.get(t).is_some_and(|k| k.in_group_of_4) {
                        m |= 1 << lane;
                    }
                }
                // SAFETY: as above, panel `p`'s entry.
                unsafe { *gp.get().add(p) = m };
            }
        });
    }
}

/// A raw pointer that chunks of one pool job share, each writing its own part.
#[derive(Clone, Copy)]
pub struct Ptr<T>(pub *mut T);
// SAFETY: the chunks using it write disjoint parts (see the call sites).
unsafe impl<T> Send for Ptr<T> {}
unsafe impl<T> Sync for Ptr<T> {}

impl<T> Ptr<T> {
    /// Taking the pointer through a method makes closures capture the whole wrapper.
    pub fn get(self) -> *mut T {
        self.0
    }
}

/// A tile of weight rows decoded once for the micro-kernels: plain signed quants in element
/// order, and per row the scales of their blocks and sub-blocks.
#[derive(Default)]
pub struct Tile {
    pub rows: usize,
    pub cols: usize,
    /// `[row][cols]`: the quants as signed bytes (zero point removed where it is a constant).
    pub w: Vec<i8>,
    /// `[row][group]`: `-128 ×` the sum of each group's quants (a group is 4 elements for the
    /// 32-weight formats, a sub-block for the k-quants), the integer sums' starting value that
    /// cancels the activations' `+ 128`.
    pub corr: Vec<i32>,
    /// `[row][block]`: the block scale (`d`).
    pub d: Vec<f32>,
    /// `[row][block]`: Q4_1's min, Q4_K's `dmin`.
    pub m: Vec<f32>,
    /// `[row][sub-block]`: the k-quants' integer sub-block scales.
    pub sc: Vec<i32>,
    /// `sc` as floats (Q4_K).
    pub scf: Vec<f32>,
    /// `[row][64-element pair]`: Q4_K's two 6-bit mins as two `i16`.
    pub mp: Vec<i32>,
    /// One row's corrections per 4 elements, on the way to `corr`.
    sums4: Vec<i32>,
}

impl Tile {
    /// Number of correction groups per row for weight type `w`.
    pub fn groups(w: GgmlDType, cols: usize) -> usize {
        match w {
            GgmlDType::Q4K => cols / 32,
            GgmlDType::Q6K => cols / 16,
            _ => cols / 4,
        }
    }

    /// Decodes `rows` (raw block bytes, each `row_bytes(w, cols)`) into this tile.
    pub fn unpack(&mut self, w: GgmlDType, cols: usize, rows: &[&[u8]]) {
        #[cfg(target_arch = "x86_64")]
        if enabled() {
            // SAFETY: `enabled` means the CPU has AVX-512 F/BW/VL.
            return unsafe { self.unpack_avx512(w, cols, rows) };
        }
        self.unpack_portable(w, cols, rows)
    }

    /// [`Tile::unpack`] compiled for AVX-512, so that the byte loops vectorise 64 wide.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl")]
    unsafe fn unpack_avx512(&mut self, w: GgmlDType, cols: usize, rows: &[&[u8]]) {
        self.unpack_portable(w, cols, rows)
    }

    #[inline(always)]
    fn unpack_portable(&mut self, w: GgmlDType, cols: usize, rows: &[&[u8]]) {
        let n = rows.len();
        self.rows = n;
        self.cols = cols;
        let block = w.block_size();
        let nb = cols / block;
        let ng = Self::groups(w, cols);
        resize(&mut self.w, n * cols);
        resize(&mut self.corr, n * ng);
        resize(&mut self.d, n * nb);
        resize(&mut self.m, n * nb);
        match w {
            GgmlDType::Q4K => {
                resize(&mut self.sc, n * cols / 32);
                resize(&mut self.scf, n * cols / 32);
                resize(&mut self.mp, n * cols / 64);
            }
            GgmlDType::Q6K => resize(&mut self.sc, n * cols / 16),
            _ => {}
        }
        for (r, row) in rows.iter().enumerate() {
            let q = &mut self.w[r * cols..(r + 1) * cols];
            let d = &mut self.d[r * nb..(r + 1) * nb];
            let m = &mut self.m[r * nb..(r + 1) * nb];
            match w {
                GgmlDType::Q4_0 => unpack_q4_0(row, q, d),
                GgmlDType::Q4_1 => unpack_q4_1(row, q, d, m),
                GgmlDType::Q5_0 => unpack_q5_0(row, q, d),
                GgmlDType::Q8_0 => unpack_q8_0(row, q, d),
                GgmlDType::Q4K => unpack_q4k(
                    row,
                    q,
                    d,
                    m,
                    &mut self.sc[r * cols / 32..(r + 1) * cols / 32],
                    &mut self.mp[r * cols / 64..(r + 1) * cols / 64],
                ),
                GgmlDType::Q6K => {
                    unpack_q6k(row, q, d, &mut self.sc[r * cols / 16..(r + 1) * cols / 16])
                }
                other => unreachable!("no GEMM for {other:?}"),
            }
            if w == GgmlDType::Q4K {
                let (sc, scf) = (
                    &self.sc[r * ng..(r + 1) * ng],
                    &mut self.scf[r * ng..(r + 1) * ng],
                );
                for (f, &i) in scf.iter_mut().zip(sc) {
                    *f = i as f32;
                }
            }
            let corr = &mut self.corr[r * ng..(r + 1) * ng];
            #[cfg(target_arch = "x86_64")]
            if cols.is_multiple_of(64) && enabled() {
                resize(&mut self.sums4, cols / 4);
                // SAFETY: `enabled` means the CPU has AVX-512 VNNI.
                unsafe { super::simd::gemm_corrections4(q, &mut self.sums4) };
                let per = cols / 4 / ng;
                for (c, s) in corr.iter_mut().zip(self.sums4.chunks_exact(per)) {
                    *c = s.iter().sum();
                }
                continue;
            }
            let gsize = cols / ng;
            for (c, g) in corr.iter_mut().zip(q.chunks_exact(gsize)) {
                *c = -128 * g.iter().map(|&v| v as i32).sum::<i32>();
            }
        }
    }
}

fn resize<T: Default + Clone>(v: &mut Vec<T>, n: usize) {
    if v.len() < n {
        v.resize(n, T::default());
    }
}

#[inline(always)]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

#[inline(always)]
fn unpack_q4_0(row: &[u8], q: &mut [i8], d: &mut [f32]) {
    for ((blk, q), d) in row.chunks_exact(18).zip(q.chunks_exact_mut(32)).zip(d) {
        *d = f16_at(blk, 0);
        for i in 0..16 {
            q[i] = (blk[2 + i] & 15) as i8 - 8;
            q[i + 16] = (blk[2 + i] >> 4) as i8 - 8;
        }
    }
}

#[inline(always)]
fn unpack_q4_1(row: &[u8], q: &mut [i8], d: &mut [f32], m: &mut [f32]) {
    for (((blk, q), d), m) in row
        .chunks_exact(20)
        .zip(q.chunks_exact_mut(32))
        .zip(d)
        .zip(m)
    {
        *d = f16_at(blk, 0);
        *m = f16_at(blk, 2);
        for i in 0..16 {
            q[i] = (blk[4 + i] & 15) as i8;
            q[i + 16] = (blk[4 + i] >> 4) as i8;
        }
    }
}

#[inline(always)]
fn unpack_q5_0(row: &[u8], q: &mut [i8], d: &mut [f32]) {
    for ((blk, q), d) in row.chunks_exact(22).zip(q.chunks_exact_mut(32)).zip(d) {
        *d = f16_at(blk, 0);
        let qh = u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
        for i in 0..16 {
            let lo = (blk[6 + i] & 15) | ((((qh >> i) & 1) as u8) << 4);
            let hi = (blk[6 + i] >> 4) | ((((qh >> (i + 16)) & 1) as u8) << 4);
            q[i] = lo as i8 - 16;
            q[i + 16] = hi as i8 - 16;
        }
    }
}

#[inline(always)]
fn unpack_q8_0(row: &[u8], q: &mut [i8], d: &mut [f32]) {
    for ((blk, q), d) in row.chunks_exact(34).zip(q.chunks_exact_mut(32)).zip(d) {
        *d = f16_at(blk, 0);
        for (o, &b) in q.iter_mut().zip(&blk[2..34]) {
            *o = b as i8;
        }
    }
}

/// ggml's `get_scale_min_k4`: sub-block `j`'s 6-bit scale and min.
#[inline(always)]
fn scale_min_k4(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

#[inline(always)]
fn unpack_q4k(
    row: &[u8],
    q: &mut [i8],
    d: &mut [f32],
    dmin: &mut [f32],
    sc: &mut [i32],
    mp: &mut [i32],
) {
    for (b, blk) in row.chunks_exact(144).enumerate() {
        d[b] = f16_at(blk, 0);
        dmin[b] = f16_at(blk, 2);
        let scales = &blk[4..16];
        let mut mins = [0u8; 8];
        for j in 0..8 {
            let (s, m) = scale_min_k4(j, scales);
            sc[b * 8 + j] = s as i32;
            mins[j] = m;
        }
        for pair in 0..4 {
            mp[b * 4 + pair] = (mins[2 * pair] as i32) | ((mins[2 * pair + 1] as i32) << 16);
        }
        let qb = &mut q[b * 256..(b + 1) * 256];
        for j in 0..4 {
            let src = &blk[16 + 32 * j..16 + 32 * (j + 1)];
            for l in 0..32 {
                qb[64 * j + l] = (src[l] & 15) as i8;
                qb[64 * j + 32 + l] = (src[l] >> 4) as i8;
            }
        }
    }
}

#[inline(always)]
fn unpack_q6k(row: &[u8], q: &mut [i8], d: &mut [f32], sc: &mut [i32]) {
    for (b, blk) in row.chunks_exact(210).enumerate() {
        d[b] = f16_at(blk, 208);
        for j in 0..16 {
            sc[b * 16 + j] = blk[192 + j] as i8 as i32;
        }
        let qb = &mut q[b * 256..(b + 1) * 256];
        for n in 0..2 {
            let ql = &blk[64 * n..64 * n + 64];
            let qh = &blk[128 + 32 * n..128 + 32 * n + 32];
            let o = &mut qb[128 * n..128 * n + 128];
            for l in 0..32 {
                let h = qh[l];
                o[l] = ((ql[l] & 15) | ((h & 3) << 4)) as i8 - 32;
                o[l + 32] = ((ql[l + 32] & 15) | (((h >> 2) & 3) << 4)) as i8 - 32;
                o[l + 64] = ((ql[l] >> 4) | (((h >> 4) & 3) << 4)) as i8 - 32;
                o[l + 96] = ((ql[l + 32] >> 4) | (((h >> 6) & 3) << 4)) as i8 - 32;
            }
        }
    }
}

/// Multiplies every row of `tile` with every panel. For each real token `t` of the panels and
/// each run of up to 16 rows starting at `r0`, `out(t, r0, values)` receives the results of
/// rows `r0..r0 + values.len()`.
pub fn run(w: GgmlDType, tile: &Tile, panels: &Panels, mut out: impl FnMut(usize, usize, &[f32])) {
    const ROWS: usize = 16;
    let mut res = [[0f32; LANES]; ROWS];
    let mut pair = [[0f32; LANES]; 2];
    let mut col = [0f32; ROWS];
    for p in 0..panels.n_panels() {
        let n_lanes = (panels.n_real - p * LANES).min(LANES);
        for r0 in (0..tile.rows).step_by(ROWS) {
            let n = (tile.rows - r0).min(ROWS);
            for r in (0..n).step_by(2) {
                let rows = [r0 + r, r0 + (r + 1).min(n - 1)];
                super::simd::gemm_pair(w, tile, rows, panels, p, &mut pair);
                res[r] = pair[0];
                if r + 1 < n {
                    res[r + 1] = pair[1];
                }
            }
            for lane in 0..n_lanes {
                for (c, r) in col.iter_mut().zip(&res[..n]) {
                    *c = r[lane];
                }
                out(panels.tokens[p * LANES + lane] as usize, r0, &col[..n]);
            }
        }
    }
}
