//! ferrum's image input: a tier's mmproj (vision encoder and projector, GGUF as llama.cpp's
//! converter writes it) turns images into rows of the language model's embedding space.
//!
//! The path of an image: bytes ([`decode_image`]: PNG, JPEG, WebP or GIF's first frame, with
//! size limits) -> [`RgbImage`] -> [`VisionModel::encode`]: preprocessing exactly as llama.cpp's
//! mtmd does it for the projector (Pillow-compatible resampling, idefics3 tiles or one padded
//! image), the ViT and projector per encoder input, and the [`Piece`]s that say where the
//! image's tokens and the special tokens around them go in the prompt. The crate knows nothing
//! of tokenizers or the language model: the server turns pieces into token ids and hands the
//! embeddings to the engine.

mod error;
mod layout;
mod mmproj;
pub mod preprocess;

use std::io::Cursor;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

pub use error::{Result, VisionError};
pub use layout::Piece;
pub use mmproj::{Mmproj, Precision, Projector, VisionConfig, SUPPORTED_PROJECTORS};
pub use preprocess::{Preprocessed, RgbImage};

/// OpenAI's `detail` on an image: `low` reads only the overview (idefics3: no tiles), `high`
/// and `auto` the whole tiling.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Detail {
    Low,
    High,
    #[default]
    Auto,
}

impl Detail {
    pub fn parse(s: &str) -> Option<Detail> {
        match s {
            "low" => Some(Detail::Low),
            "high" => Some(Detail::High),
            "auto" => Some(Detail::Auto),
            _ => None,
        }
    }

    fn tiled(self) -> bool {
        self != Detail::Low
    }
}

/// An encoded image: its token layout and the embedding rows of each encoder input.
#[derive(Clone, Debug)]
pub struct EncodedImage {
    /// SHA-256 of the decoded pixels, the detail and the mmproj: equal images share cache
    /// entries (and prefix-cache blocks).
    pub key: [u8; 32],
    pub pieces: Vec<Piece>,
    /// Per encoder input, `rows x width` floats.
    pub inputs: Vec<std::sync::Arc<Vec<f32>>>,
    /// The width of a row (the language model's embedding width).
    pub width: usize,
}

impl EncodedImage {
    /// Image tokens in the prompt (embedding rows; the special tokens around them not counted).
    pub fn image_tokens(&self) -> usize {
        self.inputs.iter().map(|r| r.len() / self.width).sum()
    }
}

/// Limits on images a client may send.
#[derive(Clone, Copy, Debug)]
pub struct ImageLimits {
    /// Encoded bytes of one image.
    pub max_bytes: usize,
    /// Pixels on a side of one decoded image.
    pub max_side: u32,
}

impl Default for ImageLimits {
    fn default() -> Self {
        ImageLimits {
            max_bytes: 20 * 1024 * 1024,
            max_side: 8192,
        }
    }
}

/// The media types images may have (what [`decode_image`] reads).
pub const IMAGE_MEDIA_TYPES: &[&str] = &["image/png", "image/jpeg", "image/webp", "image/gif"];

/// Decodes PNG, JPEG, WebP or GIF (its first frame) into 8-bit RGB. Alpha is dropped, not
/// composited (as stb_image, which llama.cpp uses, converts 4 channels to 3); grey is copied to
/// the three channels. `media_type`, when given, must match what the bytes are.
pub fn decode_image(
    bytes: &[u8],
    media_type: Option<&str>,
    limits: ImageLimits,
) -> Result<RgbImage> {
    use image::ImageFormat;
    if bytes.len() > limits.max_bytes {
        return Err(VisionError::Image(format!(
            "image of {} bytes is over the limit of {} bytes",
            bytes.len(),
            limits.max_bytes
        )));
    }
    let format = image::guess_format(bytes).map_err(|_| {
        VisionError::ImageFormat(
            "the image is not a PNG, JPEG, WebP or GIF file (its bytes match none of them)".into(),
        )
    })?;
    let name = match format {
        ImageFormat::Png => "image/png",
        ImageFormat::Jpeg => "image/jpeg",
        ImageFormat::WebP => "image/webp",
        ImageFormat::Gif => "image/gif",
        other => {
            return Err(VisionError::ImageFormat(format!(
                "image format {other:?} is not supported; send PNG, JPEG, WebP or GIF"
            )))
        }
    };
    if let Some(mt) = media_type {
        let mt = if mt == "image/jpg" { "image/jpeg" } else { mt };
        if mt != name {
            return Err(VisionError::ImageFormat(format!(
                "the image's media type is '{mt}' but its bytes are {name}"
            )));
        }
    }
    let mut reader = image::ImageReader::with_format(Cursor::new(bytes), format);
    let mut l = image::Limits::default();
    l.max_image_width = Some(limits.max_side);
    l.max_image_height = Some(limits.max_side);
    l.max_alloc = Some(512 * 1024 * 1024);
    reader.limits(l);
    let img = reader.decode().map_err(|e| match e {
        image::ImageError::Limits(_) => VisionError::Image(format!(
            "the image is larger than {0}x{0} pixels",
            limits.max_side
        )),
        other => VisionError::Image(format!("the {name} image could not be decoded: {other}")),
    })?;
    if img.width() == 0 || img.height() == 0 {
        return Err(VisionError::Image("the image has no pixels".into()));
    }
    let rgb = img.to_rgb8();
    Ok(RgbImage {
        width: rgb.width() as usize,
        height: rgb.height() as usize,
        data: rgb.into_raw(),
    })
}

/// A tier's vision encoder, ready to encode images.
pub struct VisionModel {
    mmproj: Mmproj,
    pub path: PathBuf,
    fingerprint: [u8; 32],
}

impl VisionModel {
    /// Loads an mmproj on every core, with the fast path ([`Precision::Int8`]) unless
    /// `FERRUM_VISION_PRECISION=exact` asks for llama.cpp's arithmetic.
    pub fn load(path: &Path) -> Result<Self> {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let precision = match std::env::var("FERRUM_VISION_PRECISION").as_deref() {
            Ok("exact") => Precision::Exact,
            _ => Precision::Int8,
        };
        Self::load_with(path, precision, threads)
    }

    pub fn load_with(path: &Path, precision: Precision, threads: usize) -> Result<Self> {
        let mmproj = Mmproj::load(path, precision, threads)?;
        let meta = std::fs::metadata(path).ok();
        let mut h = Sha256::new();
        h.update(path.display().to_string().as_bytes());
        h.update([precision as u8]);
        if let Some(m) = meta {
            h.update(m.len().to_le_bytes());
        }
        Ok(VisionModel {
            mmproj,
            path: path.to_path_buf(),
            fingerprint: h.finalize().into(),
        })
    }

    pub fn config(&self) -> &VisionConfig {
        &self.mmproj.cfg
    }

    pub fn precision(&self) -> Precision {
        self.mmproj.precision
    }

    /// The language model width this encoder's rows have.
    pub fn width(&self) -> usize {
        self.mmproj.cfg.n_out
    }

    /// The encoder inputs an image becomes, as 8-bit images.
    pub fn preprocess(&self, img: &RgbImage, detail: Detail) -> Preprocessed {
        let c = &self.mmproj.cfg;
        match c.projector {
            Projector::Idefics3 { .. } => {
                preprocess::idefics3(img, c.image_size, c.longest_edge, detail.tiled())
            }
            Projector::Mlp => preprocess::fixed_size(
                img,
                c.image_size,
                preprocess::ResizeAlgo::Bicubic,
                preprocess::Pad::Ceil([122, 116, 104]),
            ),
        }
    }

    /// The cache key of an image under this encoder.
    pub fn key(&self, img: &RgbImage, detail: Detail) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(self.fingerprint);
        h.update((img.width as u64).to_le_bytes());
        h.update((img.height as u64).to_le_bytes());
        h.update([detail as u8]);
        h.update(&img.data);
        h.finalize().into()
    }

    /// Preprocesses and encodes an image.
    pub fn encode(&self, img: &RgbImage, detail: Detail) -> Result<EncodedImage> {
        let c = &self.mmproj.cfg;
        let pre = self.preprocess(img, detail);
        let pieces = layout::pieces(c.projector, &pre);
        let mut inputs = Vec::with_capacity(pre.tiles.len() + 1);
        for t in pre.tiles.iter().chain(std::iter::once(&pre.overview)) {
            let n = preprocess::normalize(t, c.image_mean, c.image_std);
            let rows = self.mmproj.encode(&n.pixels, n.width, n.height)?;
            inputs.push(std::sync::Arc::new(rows));
        }
        Ok(EncodedImage {
            key: self.key(img, detail),
            pieces,
            inputs,
            width: c.n_out,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(img: &image::DynamicImage, format: image::ImageFormat) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, format).unwrap();
        out.into_inner()
    }

    fn picture() -> image::RgbaImage {
        image::RgbaImage::from_fn(9, 5, |x, y| {
            image::Rgba([
                (x * 28) as u8,
                (y * 50) as u8,
                ((x + y) * 9) as u8,
                (x * 20 + 5) as u8,
            ])
        })
    }

    #[test]
    fn every_format_decodes_to_rgb_with_alpha_dropped() {
        let rgba = picture();
        let rgb: Vec<u8> = rgba.pixels().flat_map(|p| [p[0], p[1], p[2]]).collect();
        let dynamic = image::DynamicImage::ImageRgba8(rgba.clone());
        let limits = ImageLimits::default();
        // Lossless formats keep every pixel; alpha is dropped, not blended.
        for (format, media) in [
            (image::ImageFormat::Png, "image/png"),
            (image::ImageFormat::WebP, "image/webp"),
        ] {
            let bytes = encoded(&dynamic, format);
            let img = decode_image(&bytes, Some(media), limits).unwrap();
            assert_eq!((img.width, img.height), (9, 5));
            assert_eq!(img.data, rgb, "{media}");
        }
        // JPEG is lossy; GIF has a palette: sizes and rough colours.
        let rgb8 = image::DynamicImage::ImageRgb8(dynamic.to_rgb8());
        for (format, media) in [
            (image::ImageFormat::Jpeg, "image/jpeg"),
            (image::ImageFormat::Gif, "image/gif"),
        ] {
            let bytes = encoded(&rgb8, format);
            let img = decode_image(&bytes, Some(media), limits).unwrap();
            assert_eq!((img.width, img.height), (9, 5), "{media}");
            let err: f64 = img
                .data
                .iter()
                .zip(&rgb)
                .map(|(a, b)| (f64::from(*a) - f64::from(*b)).abs())
                .sum::<f64>()
                / rgb.len() as f64;
            assert!(err < 24.0, "{media}: mean error {err}");
        }
        // "image/jpg" is read as JPEG's alias.
        let jpeg = encoded(&rgb8, image::ImageFormat::Jpeg);
        assert!(decode_image(&jpeg, Some("image/jpg"), limits).is_ok());
    }

    #[test]
    fn bad_bytes_types_and_sizes_are_refused_with_reasons() {
        let png = encoded(
            &image::DynamicImage::ImageRgba8(picture()),
            image::ImageFormat::Png,
        );
        let limits = ImageLimits::default();
        let msg = |r: Result<RgbImage>| match r {
            Err(VisionError::Image(m) | VisionError::ImageFormat(m)) => m,
            other => panic!("expected an image error, got {:?}", other.map(|i| i.width)),
        };
        assert!(msg(decode_image(&png, Some("image/gif"), limits)).contains("media type"));
        let m = msg(decode_image(
            b"GIF89a\x02\x00\x02\x00not-really",
            None,
            limits,
        ));
        assert!(m.contains("decoded"), "{m}");
        assert!(msg(decode_image(&png[..png.len() / 2], None, limits)).contains("decoded"));
        assert!(msg(decode_image(b"hello", None, limits)).contains("not a PNG"));
        // What the server answers `invalid_image_format` against `invalid_image`.
        assert!(matches!(
            decode_image(b"hello", None, limits),
            Err(VisionError::ImageFormat(_))
        ));
        assert!(matches!(
            decode_image(&png, Some("image/webp"), limits),
            Err(VisionError::ImageFormat(_))
        ));
        assert!(matches!(
            decode_image(&png[..png.len() / 2], None, limits),
            Err(VisionError::Image(_))
        ));
        let tight = ImageLimits {
            max_bytes: 100,
            ..limits
        };
        assert!(msg(decode_image(&png, None, tight)).contains("over the limit"));
        let small = ImageLimits {
            max_side: 8,
            ..limits
        };
        assert!(msg(decode_image(&png, None, small)).contains("8x8"));
    }
}
