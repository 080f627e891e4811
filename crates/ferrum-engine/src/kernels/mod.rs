//! Compute kernels: quantized matrix multiplication over GGUF block formats, and the pool that
//! runs them.
//!
//! This is the hot path of the product, so ferrum owns it (candle's stock CPU kernels run the
//! default tiers at roughly half of llama.cpp's speed). The scheme is llama.cpp's: activations
//! are quantized once per matmul to 8-bit blocks (Q8_0, Q8_1 or Q8_K, whichever the weight type
//! pairs with), then each output row is an integer dot product of a weight row with them.
//! Rows are split over the [`ThreadPool`] in small chunks. The dot product for each pair of
//! block types is chosen at run time ([`simd`] for AVX2/AVX-512, candle's implementation as the
//! portable fallback and as the reference the SIMD kernels are tested against).

pub mod gemm;
pub mod pool;
pub mod simd;

use candle_core::quantized::k_quants::{
    BlockQ2K, BlockQ3K, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ5_1, BlockQ6K,
    BlockQ8K, BlockQ8_0, BlockQ8_1,
};
use candle_core::quantized::{GgmlDType, GgmlType};
use half::{bf16, f16};

pub use pool::ThreadPool;

use crate::gguf::TensorView;

/// A dot product of `n` elements between one weight row and one quantized activation row, both
/// given as raw block bytes.
pub type DotFn = fn(n: usize, w: &[u8], x: &[u8]) -> f32;

/// The activation format a weight type's dot product consumes.
pub fn vec_dot_dtype(w: GgmlDType) -> GgmlDType {
    use GgmlDType::*;
    match w {
        Q4_0 | Q5_0 | Q8_0 => Q8_0,
        Q4_1 | Q5_1 => Q8_1,
        Q2K | Q3K | Q4K | Q5K | Q6K | Q8K => Q8K,
        Q8_1 => Q8_1,
        F32 => F32,
        F16 => F16,
        BF16 => BF16,
    }
}

/// Bytes of one row of `cols` elements of type `dtype`.
pub fn row_bytes(dtype: GgmlDType, cols: usize) -> usize {
    cols / dtype.block_size() * dtype.type_size()
}

/// Reinterprets block bytes as blocks of `T`.
///
/// # Panics
/// If `bytes` is not a whole number of blocks or is misaligned for `T` (GGUF tensor data is
/// 32-byte aligned and ferrum's activation buffers are 64-byte aligned, so neither happens).
fn blocks<T>(bytes: &[u8]) -> &[T] {
    let size = std::mem::size_of::<T>();
    assert_eq!(bytes.len() % size, 0, "not a whole number of blocks");
    assert_eq!(
        bytes.as_ptr() as usize % std::mem::align_of::<T>(),
        0,
        "misaligned blocks"
    );
    // SAFETY: size and alignment checked above; every block type is plain old data.
    unsafe { std::slice::from_raw_parts(bytes.as_ptr() as *const T, bytes.len() / size) }
}

fn blocks_mut<T>(bytes: &mut [u8]) -> &mut [T] {
    let size = std::mem::size_of::<T>();
    assert_eq!(bytes.len() % size, 0, "not a whole number of blocks");
    assert_eq!(
        bytes.as_ptr() as usize % std::mem::align_of::<T>(),
        0,
        "misaligned blocks"
    );
    // SAFETY: as in `blocks`; the exclusive borrow is carried over.
    unsafe { std::slice::from_raw_parts_mut(bytes.as_mut_ptr() as *mut T, bytes.len() / size) }
}

fn candle_dot<T: GgmlType>(n: usize, w: &[u8], x: &[u8]) -> f32 {
    T::vec_dot(n, blocks::<T>(w), blocks::<T::VecDotType>(x))
}

/// candle's dot product for a weight type: the portable fallback and the tests' reference.
pub fn reference_dot(w: GgmlDType) -> DotFn {
    use GgmlDType::*;
    match w {
        F32 => candle_dot::<f32>,
        F16 => candle_dot::<f16>,
        BF16 => candle_dot::<bf16>,
        Q4_0 => candle_dot::<BlockQ4_0>,
        Q4_1 => candle_dot::<BlockQ4_1>,
        Q5_0 => candle_dot::<BlockQ5_0>,
        Q5_1 => candle_dot::<BlockQ5_1>,
        Q8_0 => candle_dot::<BlockQ8_0>,
        Q8_1 => candle_dot::<BlockQ8_1>,
        Q2K => candle_dot::<BlockQ2K>,
        Q3K => candle_dot::<BlockQ3K>,
        Q4K => candle_dot::<BlockQ4K>,
        Q5K => candle_dot::<BlockQ5K>,
        Q6K => candle_dot::<BlockQ6K>,
        Q8K => candle_dot::<BlockQ8K>,
    }
}

/// The fastest dot product this CPU has for weight type `w`.
pub fn best_dot(w: GgmlDType) -> DotFn {
    simd::dot_fn(w).unwrap_or_else(|| reference_dot(w))
}

fn candle_quantize<T: GgmlType>(x: &[f32], out: &mut [u8]) {
    T::from_float(x, blocks_mut::<T>(out))
}

/// Quantizes one activation row `x` into `out` in format `dtype` (a vec-dot type).
///
/// The 8-bit formats follow ggml's x86 code bit for bit (`id = 127 / amax`, round half to even),
/// not ggml's reference C code that candle ports (`id = 1 / d`, round half away from zero): the
/// small models are sensitive enough that the difference shows in greedy continuations.
pub fn quantize_row(dtype: GgmlDType, x: &[f32], out: &mut [u8]) {
    use GgmlDType::*;
    match dtype {
        F32 => out.copy_from_slice(f32_bytes(x)),
        F16 => candle_quantize::<f16>(x, out),
        BF16 => candle_quantize::<bf16>(x, out),
        Q8_0 => quantize_q8_0(x, out),
        Q8_1 => quantize_q8_1(x, out),
        Q8K => quantize_q8_k(x, out),
        other => unreachable!("{other:?} is not an activation format"),
    }
}

/// One 32-element block as ggml's AVX code quantizes it: returns (d, sum of quants).
fn quantize_block_32(x: &[f32], qs: &mut [u8]) -> (f32, i32) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    let mut sum = 0;
    for (q, &v) in qs.iter_mut().zip(x) {
        // Round half to even, as `_mm256_round_ps` does; the float trick vectorises.
        let i = nearest_int(v * id);
        sum += i;
        *q = i as i8 as u8;
    }
    (d, sum)
}

/// ggml's `quantize_row_q8_0` (x86): blocks of {f16 d; i8 qs[32]}.
pub fn quantize_q8_0(x: &[f32], out: &mut [u8]) {
    for (xb, ob) in x.chunks_exact(32).zip(out.chunks_exact_mut(34)) {
        let (d, _) = quantize_block_32(xb, &mut ob[2..]);
        ob[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
    }
}

/// ggml's `quantize_row_q8_1` (x86): blocks of {f16 d; f16 s = d * sum(qs); i8 qs[32]}.
pub fn quantize_q8_1(x: &[f32], out: &mut [u8]) {
    for (xb, ob) in x.chunks_exact(32).zip(out.chunks_exact_mut(36)) {
        let (d, sum) = quantize_block_32(xb, &mut ob[4..]);
        ob[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
        ob[2..4].copy_from_slice(&f16::from_f32(d * sum as f32).to_le_bytes());
    }
}

/// ggml's `quantize_row_q8_K_ref` (also its x86 version): blocks of
/// {f32 d; i8 qs[256]; i16 bsums[16]}, scaled by the signed value of largest magnitude.
pub fn quantize_q8_k(x: &[f32], out: &mut [u8]) {
    for (xb, ob) in x.chunks_exact(256).zip(out.chunks_exact_mut(292)) {
        let (mut max, mut amax) = (0f32, 0f32);
        for &v in xb {
            if v.abs() > amax {
                amax = v.abs();
                max = v;
            }
        }
        if amax == 0.0 {
            ob.fill(0);
            continue;
        }
        let iscale = -127.0 / max;
        let (qs, bsums) = ob[4..].split_at_mut(256);
        for (q, &v) in qs.iter_mut().zip(xb) {
            *q = nearest_int(iscale * v).min(127) as i8 as u8;
        }
        for (j, b) in bsums.chunks_exact_mut(2).enumerate() {
            let sum: i32 = qs[j * 16..(j + 1) * 16]
                .iter()
                .map(|&q| q as i8 as i32)
                .sum();
            b.copy_from_slice(&(sum as i16).to_le_bytes());
        }
        ob[..4].copy_from_slice(&(1.0 / iscale).to_le_bytes());
    }
}

/// ggml's `nearest_int`: round half to even through the float-magic trick.
fn nearest_int(v: f32) -> i32 {
    let bits = (v + 12_582_912.0).to_bits() as i32;
    (bits & 0x007f_ffff) - 0x0040_0000
}

fn f32_bytes(x: &[f32]) -> &[u8] {
    // SAFETY: f32 has no invalid bit patterns and u8 has alignment 1.
    unsafe { std::slice::from_raw_parts(x.as_ptr() as *const u8, std::mem::size_of_val(x)) }
}

fn candle_dequantize<T: GgmlType>(w: &[u8], out: &mut [f32]) {
    T::to_float(blocks::<T>(w), out)
}

/// Dequantizes a run of whole blocks of type `dtype` into f32.
pub fn dequantize(dtype: GgmlDType, w: &[u8], out: &mut [f32]) {
    use GgmlDType::*;
    match dtype {
        F32 => out.copy_from_slice(blocks::<f32>(w)),
        F16 => candle_dequantize::<f16>(w, out),
        BF16 => candle_dequantize::<bf16>(w, out),
        Q4_0 => candle_dequantize::<BlockQ4_0>(w, out),
        Q4_1 => candle_dequantize::<BlockQ4_1>(w, out),
        Q5_0 => candle_dequantize::<BlockQ5_0>(w, out),
        Q5_1 => candle_dequantize::<BlockQ5_1>(w, out),
        Q8_0 => candle_dequantize::<BlockQ8_0>(w, out),
        Q8_1 => candle_dequantize::<BlockQ8_1>(w, out),
        Q2K => candle_dequantize::<BlockQ2K>(w, out),
        Q3K => candle_dequantize::<BlockQ3K>(w, out),
        Q4K => candle_dequantize::<BlockQ4K>(w, out),
        Q5K => candle_dequantize::<BlockQ5K>(w, out),
        Q6K => candle_dequantize::<BlockQ6K>(w, out),
        Q8K => candle_dequantize::<BlockQ8K>(w, out),
    }
}

/// A weight matrix of `rows` output features by `cols` input features, in a GGUF block format,
/// with its dot-product kernel chosen once at load time.
#[derive(Clone)]
pub struct QMatrix {
    pub rows: usize,
    pub cols: usize,
    tensor: TensorView,
    dot: DotFn,
    /// Four rows at a time against one activation row, where the CPU has a kernel for it.
    dot4: Option<simd::Dot4Fn>,
    /// The single- and four-row kernels for the activation rows that llama.cpp multiplies in
    /// a batch, where it sums those in another order (see [`MatmulScratch::set_rows`]), and
    /// which rows those are.
    batched: Option<Batched>,
}

/// The kernels in llama.cpp's batched summation order for one weight type, and which
/// activation rows llama.cpp multiplies with them.
#[derive(Clone, Copy)]
struct Batched {
    dot: DotFn,
    dot4: simd::Dot4Fn,
    applies: fn(RowKind) -> bool,
}

/// How llama.cpp would multiply one activation row of a forward pass; see
/// [`MatmulScratch::set_rows`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RowKind {
    /// The row is one of a whole group of four prompt rows (aligned to positions that are
    /// multiples of four): llama.cpp's repacked GEMM takes it (Q4_K).
    pub in_group_of_4: bool,
    /// The row belongs to a prompt micro-batch of at least 8 rows: llama.cpp's tiled GEMM
    /// takes it (Q6_K).
    pub in_batch_of_8: bool,
}

impl std::fmt::Debug for QMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "QMatrix({}x{} {:?})", self.rows, self.cols, self.dtype())
    }
}

impl QMatrix {
    /// Wraps a 2-D tensor (ggml dims `[cols, rows]`).
    pub fn new(tensor: TensorView) -> Self {
        let (cols, rows) = (tensor.dims[0], tensor.dims.get(1).copied().unwrap_or(1));
        QMatrix {
            rows,
            cols,
            dot: best_dot(tensor.dtype),
            // Q6_K's four-row kernel measured slower than its one-row kernel on gpt-4.1's
            // 8960 x 1536 at 1 to 64 tokens (`kernel_bench`); gpt-4.1's pp512 is no slower
            // without it.
            dot4: simd::dot4_fn(tensor.dtype).filter(|_| tensor.dtype != GgmlDType::Q6K),
            batched: simd::batched_fns(tensor.dtype).map(|(dot, dot4)| Batched {
                dot,
                dot4,
                applies: match tensor.dtype {
                    GgmlDType::Q4K => |k| k.in_group_of_4,
                    _ => |k| k.in_batch_of_8,
                },
            }),
            tensor,
        }
    }

    /// The one-row kernel, and the four-row kernel where [`matmul`] takes one, for an
    /// activation row of `kind` in a call over `n_tokens` rows.
    fn kernels(&self, kind: RowKind, n_tokens: usize) -> (DotFn, Option<simd::Dot4Fn>) {
        let min = match self.dtype() {
            GgmlDType::Q4K => X4_MIN_TOKENS,
            _ => X4_MIN_TOKENS_32,
        };
        let dot4 = self.dot4.filter(|_| n_tokens >= min);
        match self.batched {
            Some(b) if (b.applies)(kind) => (b.dot, dot4.map(|_| b.dot4)),
            _ => (self.dot, dot4),
        }
    }

    pub fn dtype(&self) -> GgmlDType {
        self.tensor.dtype
    }

    pub fn row_bytes(&self) -> usize {
        row_bytes(self.dtype(), self.cols)
    }

    pub fn row(&self, r: usize) -> &[u8] {
        let rb = self.row_bytes();
        &self.tensor.bytes()[r * rb..(r + 1) * rb]
    }

    /// Total bytes of the weights (read once per matmul).
    pub fn nbytes(&self) -> usize {
        self.row_bytes() * self.rows
    }

    /// Dequantizes row `r` into `out` (embedding lookup).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        dequantize(self.dtype(), self.row(r), out)
    }
}

/// A buffer of bytes aligned to 64 (one cache line, and the widest SIMD register).
#[derive(Default)]
pub struct AlignedBytes {
    words: Vec<Align64>,
    len: usize,
}

#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Align64([u8; 64]);

impl AlignedBytes {
    pub fn resize(&mut self, len: usize) {
        let words = len.div_ceil(64);
        if self.words.len() < words {
            self.words.resize(words, Align64([0; 64]));
        }
        self.len = len;
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `words` holds at least `len` initialised bytes.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr() as *const u8, self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, with the exclusive borrow.
        unsafe { std::slice::from_raw_parts_mut(self.words.as_mut_ptr() as *mut u8, self.len) }
    }
}

/// Reusable buffers for [`matmul`]: quantized activations, one per activation format.
#[derive(Default)]
pub struct MatmulScratch {
    quantized: Vec<(GgmlDType, AlignedBytes)>,
    /// The chunk table of the current call: (job, first row, end row); kept to avoid a
    /// per-call allocation on the decode path.
    chunks: Vec<(usize, usize, usize)>,
    /// How llama.cpp would multiply each activation row (empty: each on its own).
    rows: Vec<RowKind>,
    /// Activations packed for the prefill GEMM, reused between calls.
    panels: Vec<gemm::Panels>,
}

impl MatmulScratch {
    /// Says how llama.cpp would multiply each activation row of the following [`matmul`]
    /// calls.
    ///
    /// llama.cpp multiplies the rows of a prompt micro-batch with batched kernels where it has
    /// them, and for some weight types those sum in another order than its one-row kernels
    /// (Q4_K: its repacked GEMM, for groups of four rows; Q6_K: its tiled GEMM, for micro-
    /// batches of 8 rows or more), so the same token gets slightly different numbers in a
    /// prompt than when decoded alone. The rows marked here get kernels in the batched order,
    /// and a prompt then evaluates exactly as in llama.cpp. The caller leaves single-token
    /// steps unmarked, so decoding stays independent of what else is in the batch.
    pub fn set_rows(&mut self, rows: impl IntoIterator<Item = RowKind>) {
        self.rows.clear();
        self.rows.extend(rows);
    }

    fn quantize(
        &mut self,
        pool: &ThreadPool,
        dtype: GgmlDType,
        x: &[f32],
        n_tokens: usize,
        cols: usize,
    ) -> usize {
        let idx = match self.quantized.iter().position(|(d, _)| *d == dtype) {
            Some(i) => i,
            None => {
                self.quantized.push((dtype, AlignedBytes::default()));
                self.quantized.len() - 1
            }
        };
        let rb = row_bytes(dtype, cols);
        let buf = &mut self.quantized[idx].1;
        buf.resize(rb * n_tokens);
        let out = gemm::Ptr(buf.as_mut_slice().as_mut_ptr());
        // A prompt's tokens are quantized in parallel, 16 per chunk.
        const PER_CHUNK: usize = 16;
        pool.run(n_tokens.div_ceil(PER_CHUNK), &|c| {
            for t in c * PER_CHUNK..((c + 1) * PER_CHUNK).min(n_tokens) {
                // SAFETY: token t's output row belongs to this chunk alone.
                let o = unsafe { std::slice::from_raw_parts_mut(out.get().add(t * rb), rb) };
                quantize_row(dtype, &x[t * cols..(t + 1) * cols], o);
            }
        });
        idx
    }
}

/// One weight matrix of a [`matmul`] call and where its output goes: `out[t * rows + r]`.
pub struct MatmulJob<'a> {
    pub w: &'a QMatrix,
    pub out: &'a mut [f32],
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: chunks write disjoint rows of the outputs.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// The fewest activation rows for which [`matmul`] takes the four-row kernels. They save
/// activation loads when many tokens pass over the same weight rows, but streaming four weight
/// rows at once from memory is much slower than one: measured on the dev VM (AMD EPYC, AVX-512),
/// mini's 151936 x 896 Q8_0 and Q5_0 output-sized matrices ran 2.5-3.5x slower with them for
/// one token, 2x for two, about even at four, faster from eight (`kernel_bench`); taking them
/// for every decode step had held mini's decode at ~28 tok/s, one-row kernels give ~48. This is
/// the threshold for Q4_K, whose one-row kernel (512-bit on AVX-512) still streams faster than
/// its four-row one on the Xeon VM the project later moved to (10.8 against 9.0 GB/s).
const X4_MIN_TOKENS: usize = 8;

/// The same for the 32-weight formats (Q4_0, Q4_1, Q5_0, Q8_0), whose four-row kernels give the
/// one-row kernels' numbers. With the kernels prefetching their rows, four rows at once stream
/// faster than one on the Xeon dev VM, even for a single token: a 246 MiB Q4_1 matrix at 10.3
/// against 9.7 GB/s on one core, 15 against 10 GB/s from L3, and nano's decode (Q4_1 and Q8_0)
/// went from 113 to 150-160 tok/s with them (`kernel_bench`, `ferrum bench`).
const X4_MIN_TOKENS_32: usize = 1;

/// Rows per chunk: small enough that a descheduled thread holds up little work, large enough
/// that dispatch overhead stays small.
fn rows_per_chunk(rows: usize, n_threads: usize) -> usize {
    let target_chunks = n_threads * 8;
    rows.div_ceil(target_chunks)
        .next_multiple_of(4)
        .clamp(4, 256)
}

thread_local! {
    /// Each thread's decoded weight tile for the GEMM.
    static TILE: std::cell::RefCell<gemm::Tile> = std::cell::RefCell::new(gemm::Tile::default());
}

/// Computes `job.out = x · job.wᵀ` for every job, all sharing the input `x` (`n_tokens` rows of
/// `cols` floats), in one parallel dispatch. Fusing e.g. the Q, K and V projections into one
/// call saves two dispatches and two activation quantizations per layer.
///
/// With enough tokens (a prompt chunk, or many sequences decoding together), the tokens a
/// weight format's GEMM covers (`gemm::covers`) are multiplied by the prefill GEMM, which gives
/// the same numbers as the one-row kernels; the others take the one-row kernels.
pub fn matmul(
    pool: &ThreadPool,
    scratch: &mut MatmulScratch,
    x: &[f32],
    n_tokens: usize,
    jobs: &mut [MatmulJob<'_>],
) {
    let cols = jobs[0].w.cols;
    assert_eq!(x.len(), n_tokens * cols);
    let mut quant_idx: Vec<(GgmlDType, usize)> = Vec::with_capacity(jobs.len());
    for job in jobs.iter() {
        assert_eq!(job.w.cols, cols, "fused matmuls must share the input width");
        assert_eq!(job.out.len(), n_tokens * job.w.rows);
        // Fused jobs often share an activation format (Q/K/V, gate/up): quantize it once.
        let dtype = vec_dot_dtype(job.w.dtype());
        if !quant_idx.iter().any(|&(d, _)| d == dtype) {
            quant_idx.push((dtype, scratch.quantize(pool, dtype, x, n_tokens, cols)));
        }
    }
    let quant_idx: Vec<usize> = jobs
        .iter()
        .map(|job| {
            let dtype = vec_dot_dtype(job.w.dtype());
            quant_idx
                .iter()
                .find(|&&(d, _)| d == dtype)
                .map(|&(_, i)| i)
                .unwrap()
        })
        .collect();
    let kinds = std::mem::take(&mut scratch.rows);
    assert!(kinds.is_empty() || kinds.len() == n_tokens);
    let kind = |t: usize| kinds.get(t).copied().unwrap_or_default();
    // Which jobs send tokens through the GEMM (an index into `scratch.panels`); panels are
    // packed once per activation format and token set. Decode steps (few tokens) skip all this.
    let mut n_panels = 0;
    let gemm_on = n_tokens >= gemm::MIN_TOKENS && gemm::enabled();
    let panel_of: Vec<Option<usize>> = jobs
        .iter()
        .enumerate()
        .map(|(j, job)| {
            if !gemm_on {
                return None;
            }
            let dtype = job.w.dtype();
            let tokens: Vec<u32> = (0..n_tokens as u32)
                .filter(|&t| gemm::covers(dtype, kind(t as usize)))
                .collect();
            if tokens.len() < gemm::MIN_TOKENS {
                return None;
            }
            let act = vec_dot_dtype(dtype);
            let existing = scratch.panels[..n_panels]
                .iter()
                .position(|p| p.dtype == Some(act) && p.tokens[..p.n_real] == tokens[..]);
            Some(existing.unwrap_or_else(|| {
                if scratch.panels.len() == n_panels {
                    scratch.panels.push(gemm::Panels::default());
                }
                let (_, buf) = &scratch.quantized[quant_idx[j]];
                scratch.panels[n_panels].pack(pool, act, cols, buf.as_slice(), &tokens, &kinds);
                n_panels += 1;
                n_panels - 1
            }))
        })
        .collect();
    let mut chunks = std::mem::take(&mut scratch.chunks);
    chunks.clear();
    for (j, job) in jobs.iter().enumerate() {
        let rpc = if panel_of[j].is_some() {
            gemm::TILE_ROWS
        } else {
            rows_per_chunk(job.w.rows, pool.n_threads())
        };
        let mut r = 0;
        while r < job.w.rows {
            let end = (r + rpc).min(job.w.rows);
            chunks.push((j, r, end));
            r = end;
        }
    }
    let outs: Vec<SendPtr> = jobs
        .iter_mut()
        .map(|j| SendPtr(j.out.as_mut_ptr()))
        .collect();
    let ws: Vec<&QMatrix> = jobs.iter().map(|j| j.w).collect();
    let quantized = &scratch.quantized;
    let panels = &scratch.panels;
    // Each job's one-row kernels for each token the GEMM does not take, chosen once per call:
    // job j's are `kernels[ranges[j]..ranges[j + 1]]`.
    let mut kernels: Vec<(usize, DotFn, Option<simd::Dot4Fn>)> = Vec::new();
    let mut ranges = vec![0];
    for (w, panel) in ws.iter().zip(&panel_of) {
        let rest = |t: &usize| panel.is_none() || !gemm::covers(w.dtype(), kind(*t));
        let n_rest = (0..n_tokens).filter(rest).count();
        kernels.extend((0..n_tokens).filter(rest).map(|t| {
            let (dot, dot4) = w.kernels(kind(t), n_rest);
            (t, dot, dot4)
        }));
        ranges.push(kernels.len());
    }
    pool.run(chunks.len(), &|c| {
        let (j, r0, r1) = chunks[c];
        let w = ws[j];
        let out = outs[j];
        if let Some(pi) = panel_of[j] {
            TILE.with(|tile| {
                let mut tile = tile.borrow_mut();
                let rows: Vec<&[u8]> = (r0..r1).map(|r| w.row(r)).collect();
                tile.unpack(w.dtype(), cols, &rows);
                gemm::run(w.dtype(), &tile, &panels[pi], |t, r, v| {
                    // SAFETY: rows r0 + r.. of token t belong to this chunk alone; in bounds by
                    // the length assertion above.
                    unsafe {
                        let dst = out.0.add(t * w.rows + r0 + r);
                        std::ptr::copy_nonoverlapping(v.as_ptr(), dst, v.len());
                    }
                });
            });
        }
        let ks = &kernels[ranges[j]..ranges[j + 1]];
        if ks.is_empty() {
            return;
        }
        let (dtype, buf) = &quantized[quant_idx[j]];
        let xrb = row_bytes(*dtype, cols);
        let xq = buf.as_slice();
        let mut r = r0;
        // Four-row kernels are chosen for all of a job's tokens or for none.
        if ks.first().is_some_and(|k| k.2.is_some()) {
            // Four weight rows stay in L1 while every token's activations pass over them.
            while r + 4 <= r1 {
                let rows = [w.row(r), w.row(r + 1), w.row(r + 2), w.row(r + 3)];
                for &(t, _, dot4) in ks.iter() {
                    let Some(dot4) = dot4 else { continue };
                    let v = dot4(cols, rows, &xq[t * xrb..(t + 1) * xrb]);
                    for (k, v) in v.into_iter().enumerate() {
                        // SAFETY: as below; rows r..r+4 belong to this chunk.
                        unsafe { *out.0.add(t * w.rows + r + k) = v };
                    }
                }
                r += 4;
            }
        }
        for r in r..r1 {
            let wrow = w.row(r);
            for &(t, dot, _) in ks.iter() {
                let v = dot(cols, wrow, &xq[t * xrb..(t + 1) * xrb]);
                // SAFETY: row r of token t belongs to this chunk alone; in bounds by the
                // length assertion above.
                unsafe { *out.0.add(t * w.rows + r) = v };
            }
        }
    });
    scratch.chunks = chunks;
    scratch.rows = kinds;
}
