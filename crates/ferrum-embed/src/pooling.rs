//! From the encoder's token vectors to a sentence embedding, as sentence-transformers computes
//! it: the mean over the input's tokens (`Pooling` with `pooling_mode_mean_tokens`), then L2
//! normalisation (`Normalize`); and OpenAI's `dimensions`: the first dimensions, normalised
//! again.

/// The mean of the first `len` rows of `hidden` (rows of `dim` floats): the tokens the
/// attention mask covers, which come first in a right-padded batch.
///
/// sentence-transformers divides by the mask's sum clamped to 1e-9, so an empty mask gives
/// zeros rather than NaN; so does this.
pub fn mean_pool(hidden: &[f32], dim: usize, len: usize) -> Vec<f32> {
    let mut sum = vec![0f32; dim];
    for row in hidden.chunks_exact(dim).take(len) {
        for (s, x) in sum.iter_mut().zip(row) {
            *s += x;
        }
    }
    let count = (len as f32).max(1e-9);
    sum.iter_mut().for_each(|s| *s /= count);
    sum
}

/// Scales `v` to unit length, as `torch.nn.functional.normalize` does (the norm clamped to
/// 1e-12, so a zero vector stays zero).
pub fn normalize(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    v.iter_mut().for_each(|x| *x /= norm);
}

/// The first `dimensions` of an embedding, normalised again: how OpenAI shortens the
/// text-embedding-3 vectors. `dimensions` at or above the vector's length keeps it whole.
pub fn truncate(mut v: Vec<f32>, dimensions: usize) -> Vec<f32> {
    if dimensions < v.len() {
        v.truncate(dimensions);
        normalize(&mut v);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &[f32], b: &[f32]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-6)
    }

    #[test]
    fn the_mean_covers_the_masked_rows_only() {
        // Three rows of two; the third is padding.
        let hidden = [1.0, 2.0, 3.0, 6.0, 100.0, 100.0];
        assert!(close(&mean_pool(&hidden, 2, 2), &[2.0, 4.0]));
        assert!(close(&mean_pool(&hidden, 2, 1), &[1.0, 2.0]));
        assert!(close(&mean_pool(&hidden, 2, 0), &[0.0, 0.0]));
    }

    #[test]
    fn normalising_gives_unit_length_and_keeps_zero() {
        let mut v = [3.0, 4.0];
        normalize(&mut v);
        assert!(close(&v, &[0.6, 0.8]));
        let mut zero = [0.0, 0.0];
        normalize(&mut zero);
        assert_eq!(zero, [0.0, 0.0]);
    }

    #[test]
    fn truncating_keeps_the_leading_dimensions_renormalised() {
        let v = vec![0.6, 0.0, 0.8 * 0.6, 0.8 * 0.8];
        let short = truncate(v.clone(), 2);
        assert!(close(&short, &[1.0, 0.0]));
        assert!(close(&truncate(v.clone(), 4), &v));
        assert!(close(&truncate(v.clone(), 9), &v));
        let norm: f32 = truncate(v, 3).iter().map(|x| x * x).sum();
        assert!((norm - 1.0).abs() < 1e-6);
    }
}
