//! Single-threaded micro benchmark of the quantized dot-product kernels: a matrix-vector product
//! per weight type and shape, candle's reference against each SIMD tier, in GB/s of weight bytes
//! read. Run with `cargo run --release -p ferrum-engine --example kernel_bench` on an idle
//! machine; `--quick` shortens every measurement, and type names (`Q4_1 Q8_0`) limit it to those
//! types.

use std::hint::black_box;
use std::time::{Duration, Instant};

use candle_core::quantized::k_quants::{
    BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5_0, BlockQ6K, BlockQ8_0,
};
use candle_core::quantized::{GgmlDType, GgmlType};
use ferrum_engine::kernels::simd::{self, Tier};
use ferrum_engine::kernels::{quantize_row, reference_dot, row_bytes, vec_dot_dtype, AlignedBytes};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Distinct random rows; the matrix repeats them, since only the bytes read matter for speed.
const DISTINCT_ROWS: usize = 64;

fn quantize_weights<T: GgmlType>(x: &[f32]) -> Vec<u8> {
    let mut blocks = vec![T::zeros(); x.len() / T::BLCK_SIZE];
    T::from_float(x, &mut blocks);
    // SAFETY: the block types are plain old data without padding.
    unsafe {
        std::slice::from_raw_parts(
            blocks.as_ptr() as *const u8,
            std::mem::size_of_val(&*blocks),
        )
    }
    .to_vec()
}

fn quantize_weight_row(dtype: GgmlDType, x: &[f32]) -> Vec<u8> {
    match dtype {
        GgmlDType::Q4_0 => quantize_weights::<BlockQ4_0>(x),
        GgmlDType::Q4_1 => quantize_weights::<BlockQ4_1>(x),
        GgmlDType::Q5_0 => quantize_weights::<BlockQ5_0>(x),
        GgmlDType::Q8_0 => quantize_weights::<BlockQ8_0>(x),
        GgmlDType::Q4K => quantize_weights::<BlockQ4K>(x),
        GgmlDType::Q6K => quantize_weights::<BlockQ6K>(x),
        other => unreachable!("{other:?}"),
    }
}

struct Matrix {
    dtype: GgmlDType,
    cols: usize,
    bytes: AlignedBytes,
    x: AlignedBytes,
}

impl Matrix {
    fn new(dtype: GgmlDType, rows: usize, cols: usize, rng: &mut StdRng) -> Matrix {
        let rb = row_bytes(dtype, cols);
        let distinct: Vec<Vec<u8>> = (0..DISTINCT_ROWS)
            .map(|_| {
                let v: Vec<f32> = (0..cols).map(|_| rng.gen_range(-0.1f32..0.1)).collect();
                quantize_weight_row(dtype, &v)
            })
            .collect();
        let mut bytes = AlignedBytes::default();
        bytes.resize(rb * rows);
        for (r, row) in bytes.as_mut_slice().chunks_exact_mut(rb).enumerate() {
            row.copy_from_slice(&distinct[r % DISTINCT_ROWS]);
        }
        let xf: Vec<f32> = (0..cols).map(|_| rng.gen_range(-2.0f32..2.0)).collect();
        let xd = vec_dot_dtype(dtype);
        let mut x = AlignedBytes::default();
        x.resize(row_bytes(xd, cols));
        quantize_row(xd, &xf, x.as_mut_slice());
        Matrix {
            dtype,
            cols,
            bytes,
            x,
        }
    }

    fn nbytes(&self) -> usize {
        self.bytes.as_slice().len()
    }

    fn matvec(&self, dot: fn(usize, &[u8], &[u8]) -> f32, out: &mut [f32]) {
        let rb = row_bytes(self.dtype, self.cols);
        let (w, x) = (self.bytes.as_slice(), self.x.as_slice());
        for (r, o) in out.iter_mut().enumerate() {
            *o = dot(self.cols, &w[r * rb..(r + 1) * rb], x);
        }
    }

    fn matvec4(&self, dot4: simd::Dot4Fn, out: &mut [f32]) {
        let rb = row_bytes(self.dtype, self.cols);
        let (w, x) = (self.bytes.as_slice(), self.x.as_slice());
        for (r, o) in out.chunks_exact_mut(4).enumerate() {
            let row = |i: usize| &w[(4 * r + i) * rb..(4 * r + i + 1) * rb];
            o.copy_from_slice(&dot4(self.cols, [row(0), row(1), row(2), row(3)], x));
        }
    }
}

/// The time of one run of `f`: the fastest of repeated samples after one warm-up, each sample
/// timing enough runs to last a couple of milliseconds, for at least `budget` in all. The
/// fastest sample is the one least disturbed by other work on the machine (preemption, or a busy
/// hyper-threading sibling, which slows everything down by half).
fn time(budget: Duration, mut f: impl FnMut()) -> Duration {
    let t = Instant::now();
    f();
    let once = t.elapsed().max(Duration::from_nanos(100));
    let batch = (Duration::from_millis(2).as_nanos() / once.as_nanos()).max(1) as u32;
    let mut best = Duration::MAX;
    let mut samples = 0;
    let start = Instant::now();
    while start.elapsed() < budget || samples < 5 {
        let t = Instant::now();
        for _ in 0..batch {
            f();
        }
        best = best.min(t.elapsed() / batch);
        samples += 1;
    }
    best
}

fn gbps(bytes: usize, t: Duration) -> f64 {
    bytes as f64 / t.as_secs_f64() / 1e9
}

/// The speed of simply reading the bytes, as a ceiling for the kernels.
fn read_sweep(bytes: &[u8]) -> u64 {
    let mut acc = [0u64; 8];
    for chunk in bytes.chunks_exact(64) {
        for (a, c) in acc.iter_mut().zip(chunk.chunks_exact(8)) {
            *a = a.wrapping_add(u64::from_le_bytes(c.try_into().unwrap()));
        }
    }
    acc.iter().fold(0, |s, a| s.wrapping_add(*a))
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let budget = Duration::from_millis(if quick { 100 } else { 600 });
    let tiers = Tier::supported();
    println!("tiers supported: {tiers:?}; best: {:?}", Tier::best());
    let mut rng = StdRng::seed_from_u64(1);

    print!(
        "{:<5} {:>11} {:>7} {:>7} {:>7}",
        "type", "shape", "MiB", "read", "candle"
    );
    for t in &tiers {
        print!(" {:>8}", format!("{t:?}"));
    }
    println!(" {:>8} {:>8}", "x4 rows", "speed-up");

    let types = [
        GgmlDType::Q4_1,
        GgmlDType::Q8_0,
        GgmlDType::Q5_0,
        GgmlDType::Q4K,
        GgmlDType::Q6K,
        GgmlDType::Q4_0,
    ];
    let only: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    for dtype in types {
        if !only.is_empty()
            && !only
                .iter()
                .any(|o| o.eq_ignore_ascii_case(&format!("{dtype:?}")))
        {
            continue;
        }
        // The k-quants need a multiple of 256 columns; their shapes round 896 and 576 up.
        // The first shape fits in L2 and shows the kernels' compute ceiling; the other two
        // stream from L3 or memory, as real weights do.
        // The last two are long rows (gpt-4.1's ffn_down is 1536 x 8960), in L2 and from
        // memory (256 MiB, beyond the L3 of most machines).
        let shapes: [(usize, usize); 5] = if dtype.block_size() == 256 {
            [
                (256, 1024),
                (4864, 1024),
                (49152, 768),
                (48, 8960),
                (51200, 8960),
            ]
        } else {
            [
                (256, 896),
                (4864, 896),
                (49152, 576),
                (48, 8960),
                (51200, 8960),
            ]
        };
        for (rows, cols) in shapes {
            let m = Matrix::new(dtype, rows, cols, &mut rng);
            let mut out = vec![0f32; rows];
            let mut want = vec![0f32; rows];
            let read = gbps(
                m.nbytes(),
                time(budget, || {
                    black_box(read_sweep(black_box(m.bytes.as_slice())));
                }),
            );
            let reference = reference_dot(dtype);
            let candle = gbps(
                m.nbytes(),
                time(budget, || m.matvec(reference, black_box(&mut want))),
            );
            print!(
                "{:<5} {:>11} {:>7.1} {:>7.1} {:>7.2}",
                format!("{dtype:?}"),
                format!("{rows}x{cols}"),
                m.nbytes() as f64 / (1 << 20) as f64,
                read,
                candle
            );
            let mut best = candle;
            for &tier in &tiers {
                match simd::dot_fn_for(dtype, tier) {
                    Some(dot) => {
                        let g = gbps(
                            m.nbytes(),
                            time(budget, || m.matvec(dot, black_box(&mut out))),
                        );
                        check(&out, &want);
                        best = best.max(g);
                        print!(" {g:>8.2}");
                    }
                    None => print!(" {:>8}", "-"),
                }
            }
            match Tier::best().and_then(|t| simd::dot4_fn_for(dtype, t)) {
                Some(dot4) => {
                    let g = gbps(
                        m.nbytes(),
                        time(budget, || m.matvec4(dot4, black_box(&mut out))),
                    );
                    check(&out, &want);
                    best = best.max(g);
                    print!(" {g:>8.2}");
                }
                None => print!(" {:>8}", "-"),
            }
            println!(" {:>7.1}x", best / candle);
        }
    }

    prefill(&only, budget, &mut rng);

    // The activation quantizers, once per matmul input row.
    println!();
    println!(
        "{:<5} {:>6} {:>12} {:>12}",
        "quant", "n", "candle ns", "simd ns"
    );
    for dtype in [GgmlDType::Q8_0, GgmlDType::Q8_1, GgmlDType::Q8K] {
        let n = 4864;
        let xf: Vec<f32> = (0..n).map(|_| rng.gen_range(-2.0f32..2.0)).collect();
        let mut out = AlignedBytes::default();
        out.resize(row_bytes(dtype, n));
        let Some(simd_q) = simd::quantize_fn(dtype) else {
            continue;
        };
        let t_simd = time(budget / 4, || simd_q(&xf, black_box(out.as_mut_slice())));
        let t_ref = time(budget / 4, || reference_quantize(dtype, &xf, &mut out));
        println!(
            "{:<5} {n:>6} {:>12} {:>12}",
            format!("{dtype:?}"),
            t_ref.as_nanos(),
            t_simd.as_nanos()
        );
    }
}

/// The prefill loop of `kernels::matmul` on one thread: each weight row (or group of four) stays
/// in cache while every token's activation row passes over it. Single-row kernels against the
/// four-row ones, in ns per token for the whole matrix, for each supported tier.
fn prefill(only: &[String], budget: Duration, rng: &mut StdRng) {
    const TOKENS: usize = 64;
    println!();
    println!("prefill, {TOKENS} tokens: ns per token (single-row / four-row kernels)");
    print!("{:<5} {:>11}", "type", "shape");
    for t in Tier::supported() {
        print!(" {:>19}", format!("{t:?}"));
    }
    println!();
    // Qwen2.5-1.5B's MLP: gate/up (8960 x 1536) and down (1536 x 8960).
    let types = [
        GgmlDType::Q4K,
        GgmlDType::Q6K,
        GgmlDType::Q4_0,
        GgmlDType::Q8_0,
    ];
    for dtype in types {
        if !only.is_empty()
            && !only
                .iter()
                .any(|o| o.eq_ignore_ascii_case(&format!("{dtype:?}")))
        {
            continue;
        }
        for (rows, cols) in [(8960, 1536), (1536, 8960)] {
            let m = Matrix::new(dtype, rows, cols, rng);
            let xd = vec_dot_dtype(dtype);
            let xrb = row_bytes(xd, cols);
            let mut xs = AlignedBytes::default();
            xs.resize(xrb * TOKENS);
            for x in xs.as_mut_slice().chunks_exact_mut(xrb) {
                let xf: Vec<f32> = (0..cols).map(|_| rng.gen_range(-2.0f32..2.0)).collect();
                quantize_row(xd, &xf, x);
            }
            let rb = row_bytes(dtype, cols);
            let (w, xs) = (m.bytes.as_slice(), xs.as_slice());
            let row = |r: usize| &w[r * rb..(r + 1) * rb];
            let tok = |t: usize| &xs[t * xrb..(t + 1) * xrb];
            let mut out = vec![0f32; rows * TOKENS];
            let per_token = |d: Duration| d.as_nanos() as f64 / TOKENS as f64;
            print!(
                "{:<5} {:>11}",
                format!("{dtype:?}"),
                format!("{rows}x{cols}")
            );
            for tier in Tier::supported() {
                let Some(dot) = simd::dot_fn_for(dtype, tier) else {
                    print!(" {:>19}", "-");
                    continue;
                };
                let t1 = time(budget, || {
                    for r in 0..rows {
                        for t in 0..TOKENS {
                            out[t * rows + r] = dot(cols, row(r), tok(t));
                        }
                    }
                    black_box(&mut out);
                });
                let t4 = simd::dot4_fn_for(dtype, tier).map(|dot4| {
                    time(budget, || {
                        for r in (0..rows).step_by(4) {
                            let w4 = [row(r), row(r + 1), row(r + 2), row(r + 3)];
                            for t in 0..TOKENS {
                                let v = dot4(cols, w4, tok(t));
                                out[t * rows + r..t * rows + r + 4].copy_from_slice(&v);
                            }
                        }
                        black_box(&mut out);
                    })
                });
                let t4 = t4.map_or("-".to_string(), |t4| format!("{:.0}", per_token(t4)));
                print!(" {:>19}", format!("{:.0} / {t4}", per_token(t1)));
            }
            println!();
        }
    }
}

fn reference_quantize(dtype: GgmlDType, x: &[f32], out: &mut AlignedBytes) {
    use candle_core::quantized::k_quants::{BlockQ8K, BlockQ8_1};
    fn q<T: GgmlType>(x: &[f32], out: &mut [u8]) {
        // SAFETY: `out` is 64-byte aligned and holds whole blocks of plain old data.
        let blocks = unsafe {
            std::slice::from_raw_parts_mut(
                out.as_mut_ptr() as *mut T,
                out.len() / std::mem::size_of::<T>(),
            )
        };
        T::from_float(x, black_box(blocks));
    }
    match dtype {
        GgmlDType::Q8_0 => q::<BlockQ8_0>(x, out.as_mut_slice()),
        GgmlDType::Q8_1 => q::<BlockQ8_1>(x, out.as_mut_slice()),
        GgmlDType::Q8K => q::<BlockQ8K>(x, out.as_mut_slice()),
        other => unreachable!("{other:?}"),
    }
}

/// Guards against a benchmark of a broken kernel: the results must match candle's.
fn check(got: &[f32], want: &[f32]) {
    for (g, w) in got.iter().zip(want) {
        assert!(
            (g - w).abs() <= 1e-3 * w.abs().max(1.0),
            "kernel disagrees with candle: {g} vs {w}"
        );
    }
}
