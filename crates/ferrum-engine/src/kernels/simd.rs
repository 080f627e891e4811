//! SIMD dot products and activation quantizers for x86-64 (AVX2, AVX-VNNI, AVX-512), chosen at
//! run time.
//!
//! Each kernel computes exactly what candle's reference (`super::reference_dot`) computes, up to
//! float rounding, and is tested against it: the integer part of every block's dot product is
//! exact, only the order in which the scaled block sums are added differs. The quantizers produce
//! the same bytes as candle's `from_float`.
//!
//! Weight types with kernels: Q4_0, Q4_1, Q5_0, Q8_0 (32-weight blocks) and Q4_K, Q6_K (256),
//! each against its vec-dot activation format (Q8_0, Q8_1 or Q8_K). Two shapes: [`dot_fn`], one
//! weight row against one activation row (`super::DotFn`), and [`dot4_fn`], four weight rows
//! against one activation row ([`Dot4Fn`], for every one of these formats), which shares the
//! activation's loads, scales and zero-point corrections (for the k-quants: its block sums, which
//! meet Q4_K's mins and Q6_K's offset of 32) between the rows and is 1.1 to 1.6 times faster per
//! row (more when the weights come from cache, less when memory bandwidth binds). Its main use is
//! prefill, where four weight rows stay in L1 while every token's activations pass over them.
//!
//! The kernels come in three instruction-set tiers, picked once per process by [`Tier::best`]:
//! plain AVX2 + FMA + F16C (Haswell and later, Zen), AVX-VNNI (Alder Lake and later client cores,
//! which lack AVX-512) and AVX-512 VNNI (Cascade Lake and later Xeons, Zen 4). The single-row
//! kernels work on 256-bit vectors in every tier: the VNNI tiers replace the two-instruction
//! `maddubs` + `madd` sequence by one `vpdpbusd` (and `vpdpwssd` for the k-quants' scales), and
//! the AVX-512 tier also uses mask registers to add Q5_0's fifth bits. The AVX-512 tier's
//! four-row kernels use 512-bit vectors, two weight rows per register (all but Q6_K's, which
//! uses the 256-bit one). On other architectures
//! every function here returns `None`, and candle's portable code is used instead.
//!
//! The environment variable `FERRUM_SIMD` overrides the choice: `off` disables these kernels,
//! `avx2`, `avxvnni` or `avx512` caps the tier (a tier the CPU lacks is never used).

use std::sync::OnceLock;

use candle_core::quantized::GgmlDType;

use super::DotFn;

#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "x86_64")]
mod gemm512;
#[cfg(all(test, target_arch = "x86_64"))]
mod gemm_tests;
#[cfg(target_arch = "x86_64")]
mod quant;
#[cfg(all(test, target_arch = "x86_64"))]
mod tests;
#[cfg(target_arch = "x86_64")]
mod x86;

/// Four dot products of `n` elements: four weight rows against one quantized activation row,
/// `[w[0]·x, w[1]·x, w[2]·x, w[3]·x]`. Reading the activation once for four rows saves its loads,
/// scale conversions and zero-point corrections, which are a large part of the work for the 4-
/// and 5-bit formats.
pub type Dot4Fn = fn(n: usize, w: [&[u8]; 4], x: &[u8]) -> [f32; 4];

/// An activation quantizer: `f32` values into blocks of a vec-dot format.
pub type QuantizeFn = fn(x: &[f32], out: &mut [u8]);

/// An instruction-set tier the kernels are compiled for, from the most to the least portable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Tier {
    /// AVX2, FMA and F16C.
    Avx2,
    /// The AVX2 tier plus the VEX-encoded VNNI dot products (`vpdpbusd`, `vpdpwssd`).
    AvxVnni,
    /// The AVX2 tier plus AVX-512 F/BW/VL and VNNI, used on 256-bit vectors.
    Avx512,
}

impl Tier {
    /// Every tier, least capable first.
    pub const ALL: [Tier; 3] = [Tier::Avx2, Tier::AvxVnni, Tier::Avx512];

    /// Whether this CPU can run the tier's kernels.
    pub fn is_supported(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c");
            match self {
                Tier::Avx2 => avx2,
                Tier::AvxVnni => avx2 && is_x86_feature_detected!("avxvnni"),
                Tier::Avx512 => {
                    avx2 && is_x86_feature_detected!("avx512f")
                        && is_x86_feature_detected!("avx512bw")
                        && is_x86_feature_detected!("avx512vl")
                        && is_x86_feature_detected!("avx512vnni")
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    /// The tiers this CPU supports, least capable first (tests and benchmarks run them all).
    pub fn supported() -> Vec<Tier> {
        Tier::ALL.into_iter().filter(|t| t.is_supported()).collect()
    }

    /// The best supported tier, capped by `FERRUM_SIMD`; detected once per process.
    pub fn best() -> Option<Tier> {
        static BEST: OnceLock<Option<Tier>> = OnceLock::new();
        *BEST.get_or_init(|| {
            let cap = match std::env::var("FERRUM_SIMD").ok().as_deref() {
                Some("off") | Some("none") | Some("0") => return None,
                Some("avx2") => Tier::Avx2,
                Some("avxvnni") => Tier::AvxVnni,
                _ => Tier::Avx512,
            };
            Tier::ALL
                .into_iter()
                .rev()
                .find(|t| *t <= cap && t.is_supported())
        })
    }
}

/// The SIMD dot product for weight type `w`, if this CPU has one.
pub fn dot_fn(w: GgmlDType) -> Option<DotFn> {
    dot_fn_for(w, Tier::best()?)
}

/// The dot product for weight type `w` compiled for `tier`, if there is one and this CPU supports
/// the tier. Benchmarks and tests use it to compare tiers on one machine.
pub fn dot_fn_for(w: GgmlDType, tier: Tier) -> Option<DotFn> {
    if !tier.is_supported() {
        return None;
    }
    #[cfg(target_arch = "x86_64")]
    {
        x86::dot_fn(w, tier)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = w;
        None
    }
}

/// The four-row dot product for weight type `w`, if this CPU has one (see [`Dot4Fn`]).
pub fn dot4_fn(w: GgmlDType) -> Option<Dot4Fn> {
    dot4_fn_for(w, Tier::best()?)
}

/// The four-row dot product for weight type `w` compiled for `tier`, as [`dot_fn_for`].
pub fn dot4_fn_for(w: GgmlDType, tier: Tier) -> Option<Dot4Fn> {
    if !tier.is_supported() {
        return None;
    }
    #[cfg(target_arch = "x86_64")]
    {
        x86::dot4_fn(w, tier)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = w;
        None
    }
}

/// For weight types whose products llama.cpp sums in another order when it multiplies a
/// batch of activation rows (Q4_K: its repacked GEMM, for rows in groups of four; Q6_K: its
/// tiled GEMM, for micro-batches of 8 rows or more), the single- and four-row kernels in that
/// order. The matmul uses them for the rows llama.cpp would batch, so that prompts are
/// evaluated exactly as llama.cpp evaluates them.
pub fn batched_fns(w: GgmlDType) -> Option<(DotFn, Dot4Fn)> {
    let tier = Tier::best()?;
    #[cfg(target_arch = "x86_64")]
    {
        x86::batched_fns(w, tier)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (w, tier);
        None
    }
}

/// The SIMD quantizer for activation format `dtype`, if this CPU has one.
pub fn quantize_fn(dtype: GgmlDType) -> Option<QuantizeFn> {
    // The quantizers need only AVX2 and gain nothing from the wider tiers.
    Tier::best()?;
    #[cfg(target_arch = "x86_64")]
    {
        quant::quantize_fn(dtype)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = dtype;
        None
    }
}

/// The prefill GEMM's micro-kernel (see `super::gemm`): rows `rows` of `tile` against panel `p`
/// of `panels`, for weight type `w`, into `out[row][lane]`.
///
/// # Panics
/// If the GEMM is not enabled on this CPU (`super::gemm::enabled`), or the tile and panels
/// disagree on their columns.
pub fn gemm_pair(
    w: GgmlDType,
    tile: &super::gemm::Tile,
    rows: [usize; 2],
    panels: &super::gemm::Panels,
    p: usize,
    out: &mut [[f32; super::gemm::LANES]; 2],
) {
    static SUPPORTED: OnceLock<bool> = OnceLock::new();
    assert!(
        *SUPPORTED.get_or_init(|| Tier::Avx512.is_supported()),
        "the GEMM needs AVX-512 VNNI"
    );
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the CPU supports the kernels (asserted); `pair` checks the shapes.
    unsafe {
        gemm512::pair(w, tile, rows, panels, p, out)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (w, tile, rows, panels, p, out);
        unreachable!()
    }
}

/// See `gemm512::corrections4`.
///
/// # Safety
/// The CPU must support AVX-512 F/BW/VL/VNNI.
#[cfg(target_arch = "x86_64")]
pub(super) unsafe fn gemm_corrections4(q: &[i8], out: &mut [i32]) {
    // SAFETY: by the contract.
    unsafe { gemm512::corrections4(q, out) }
}
