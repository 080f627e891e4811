//! The prefill GEMM against the one-row kernels it stands in for: bit for bit, for every weight
//! format it covers, odd token counts (padded panels), odd row counts (a lone last row), and
//! llama.cpp's batched orders where a format has one.

use candle_core::quantized::GgmlDType;
use rand::rngs::StdRng;
use rand::SeedableRng;

use super::tests::{quantize, random_vec, widths, TYPES};
use super::{batched_fns, dot_fn, Tier};
use crate::kernels::gemm::{self, Panels, Tile};
use crate::kernels::{quantize_row, row_bytes, vec_dot_dtype, RowKind};

/// The one-row kernel `matmul` would otherwise use for a token of `kind`.
fn one_row(w: GgmlDType, kind: RowKind) -> crate::kernels::DotFn {
    match batched_fns(w) {
        Some((dot, _))
            if (w == GgmlDType::Q4K && kind.in_group_of_4)
                || (w == GgmlDType::Q6K && kind.in_batch_of_8) =>
        {
            dot
        }
        _ => dot_fn(w).unwrap(),
    }
}

#[test]
fn gemm_equals_one_row_kernels_bit_for_bit() {
    if !Tier::Avx512.is_supported() {
        eprintln!("skipped: no AVX-512 VNNI on this CPU, the GEMM is not used");
        return;
    }
    let mut rng = StdRng::seed_from_u64(23);
    for w in TYPES {
        for &cols in widths(w).iter().filter(|&&c| c <= 4864) {
            for (n_rows, n_tok) in [(5, 6), (16, 17), (3, 33), (37, 16)] {
                let rows: Vec<Vec<u8>> = (0..n_rows)
                    .map(|r| quantize(w, &random_vec(&mut rng, cols, 0.05 * (r + 1) as f32)))
                    .collect();
                let act = vec_dot_dtype(w);
                let xrb = row_bytes(act, cols);
                let mut xq = vec![0u8; n_tok * xrb];
                for t in 0..n_tok {
                    let scale = if t % 5 == 0 {
                        20.0
                    } else {
                        1.0 + t as f32 / 7.0
                    };
                    quantize_row(
                        act,
                        &random_vec(&mut rng, cols, scale),
                        &mut xq[t * xrb..(t + 1) * xrb],
                    );
                }
                // Mixed kinds: some tokens in groups of four, some not; Q6_K's GEMM covers only
                // tokens in batches of eight.
                let kinds: Vec<RowKind> = (0..n_tok)
                    .map(|t| RowKind {
                        in_group_of_4: t % 3 != 1,
                        in_batch_of_8: t % 4 != 3,
                    })
                    .collect();
                let tokens: Vec<u32> = (0..n_tok as u32)
                    .filter(|&t| gemm::covers(w, kinds[t as usize]))
                    .collect();
                let mut panels = Panels::default();
                panels.pack(
                    &crate::kernels::ThreadPool::new(1),
                    act,
                    cols,
                    &xq,
                    &tokens,
                    &kinds,
                );
                let mut tile = Tile::default();
                let refs: Vec<&[u8]> = rows.iter().map(|r| &r[..]).collect();
                tile.unpack(w, cols, &refs);
                let mut got = vec![f32::NAN; n_tok * n_rows];
                let mut seen = 0;
                gemm::run(w, &tile, &panels, |t, r0, v| {
                    for (r, &v) in v.iter().enumerate() {
                        got[t * n_rows + r0 + r] = v;
                        seen += 1;
                    }
                });
                assert_eq!(
                    seen,
                    tokens.len() * n_rows,
                    "{w:?}: every (token, row) once"
                );
                for &t in &tokens {
                    let t = t as usize;
                    let dot = one_row(w, kinds[t]);
                    for (r, row) in rows.iter().enumerate() {
                        let want = dot(cols, row, &xq[t * xrb..(t + 1) * xrb]);
                        let g = got[t * n_rows + r];
                        assert_eq!(
                            g.to_bits(),
                            want.to_bits(),
                            "{w:?} cols={cols} token {t} ({:?}) row {r}: GEMM {g}, one-row {want}",
                            kinds[t]
                        );
                    }
                }
            }
        }
    }
}
