//! The fast path (Q8_0 weights and activations on the engine's integer kernels) against the
//! exact path (ggml's arithmetic, which the server's parity test holds to llama.cpp), on the
//! tiny fixtures of tests/data/vision.

use std::path::PathBuf;

use ferrum_vision::{decode_image, Detail, ImageLimits, Precision, VisionModel};

/// Per image token: cosine similarity to the exact path's at least this.
const MIN_COSINE: f64 = 0.999;
/// Largest absolute difference relative to the largest exact value. (Measured on these
/// fixtures: cosine 0.99936 and 3.1% at worst; the exact path is 0.07% from llama.cpp.)
const MAX_RELATIVE: f32 = 0.05;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/data/vision")
}

#[test]
fn int8_embeddings_stay_close_to_the_exact_ones() {
    let mut worst_cos = 1f64;
    let mut worst_rel = 0f32;
    for mmproj in ["tiny-idefics3-mmproj.gguf", "tiny-llava-mmproj.gguf"] {
        let exact = VisionModel::load_with(&dir().join(mmproj), Precision::Exact, 2).unwrap();
        let fast = VisionModel::load_with(&dir().join(mmproj), Precision::Int8, 2).unwrap();
        assert_ne!(
            exact.key(&ferrum_vision::RgbImage::new(1, 1), Detail::Auto),
            fast.key(&ferrum_vision::RgbImage::new(1, 1), Detail::Auto),
            "the two paths' encodings are cached apart"
        );
        for img in [
            "img-64x64.png",
            "img-100x37.png",
            "img-200x150.png",
            "img-rgba-50x50.png",
        ] {
            let bytes = std::fs::read(dir().join(img)).unwrap();
            let image = decode_image(&bytes, None, ImageLimits::default()).unwrap();
            let a = exact.encode(&image, Detail::Auto).unwrap();
            let b = fast.encode(&image, Detail::Auto).unwrap();
            assert_eq!(a.pieces, b.pieces);
            for (x, y) in a.inputs.iter().zip(&b.inputs) {
                let scale = x.iter().fold(0f32, |m, v| m.max(v.abs()));
                for (tx, ty) in x.chunks(a.width).zip(y.chunks(a.width)) {
                    let dot: f64 = tx
                        .iter()
                        .zip(ty)
                        .map(|(p, q)| f64::from(*p) * f64::from(*q))
                        .sum();
                    let nx: f64 = tx.iter().map(|p| f64::from(*p).powi(2)).sum::<f64>().sqrt();
                    let ny: f64 = ty.iter().map(|p| f64::from(*p).powi(2)).sum::<f64>().sqrt();
                    let cos = dot / (nx * ny);
                    let rel = tx
                        .iter()
                        .zip(ty)
                        .map(|(p, q)| (p - q).abs())
                        .fold(0f32, f32::max)
                        / scale;
                    worst_cos = worst_cos.min(cos);
                    worst_rel = worst_rel.max(rel);
                    assert!(cos >= MIN_COSINE, "{mmproj} {img}: cosine {cos}");
                    assert!(rel <= MAX_RELATIVE, "{mmproj} {img}: relative error {rel}");
                }
            }
        }
    }
    eprintln!("int8 vs exact: worst token cosine {worst_cos}, worst relative error {worst_rel}");
}
