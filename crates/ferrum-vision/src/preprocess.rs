//! Image preprocessing exactly as llama.cpp's mtmd does it (`mtmd-image.cpp`): Pillow's
//! separable resampling in fixed point, padding, tiling, and normalisation to the encoder's
//! input. Every step is integer arithmetic on 8-bit pixels until the final normalisation, so
//! the same image gives the same encoder input bit for bit.

/// An 8-bit RGB image, pixels row-major and channels interleaved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

impl RgbImage {
    pub fn new(width: usize, height: usize) -> Self {
        RgbImage {
            width,
            height,
            data: vec![0; width * height * 3],
        }
    }

    fn fill(&mut self, color: [u8; 3]) {
        for px in self.data.chunks_exact_mut(3) {
            px.copy_from_slice(&color);
        }
    }

    /// Draws `src` with its top left corner at (`ox`, `oy`).
    fn composite(&mut self, src: &RgbImage, ox: usize, oy: usize) {
        for y in 0..src.height {
            let dy = y + oy;
            if dy >= self.height {
                break;
            }
            let w = src.width.min(self.width.saturating_sub(ox));
            let s = &src.data[y * src.width * 3..(y * src.width + w) * 3];
            let d0 = (dy * self.width + ox) * 3;
            self.data[d0..d0 + w * 3].copy_from_slice(s);
        }
    }

    /// The `w`x`h` region at (`x`, `y`).
    pub fn crop(&self, x: usize, y: usize, w: usize, h: usize) -> RgbImage {
        assert!(
            x + w <= self.width && y + h <= self.height,
            "crop inside the image"
        );
        let mut out = RgbImage::new(w, h);
        for row in 0..h {
            let s = ((y + row) * self.width + x) * 3;
            out.data[row * w * 3..(row + 1) * w * 3].copy_from_slice(&self.data[s..s + w * 3]);
        }
        out
    }
}

/// Pillow's resampling filters, as mtmd names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResizeAlgo {
    Bilinear,
    Bicubic,
    Lanczos,
}

/// How a resize that keeps the aspect ratio fills the rest of the target (`pad_style`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pad {
    /// Stretch to the target size.
    None,
    /// Keep the aspect ratio (sizes rounded up), centre, pad with a colour.
    Ceil([u8; 3]),
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

impl ResizeAlgo {
    fn support(self) -> f64 {
        match self {
            ResizeAlgo::Bilinear => 1.0,
            ResizeAlgo::Bicubic => 2.0,
            ResizeAlgo::Lanczos => 3.0,
        }
    }

    fn filter(self, x: f64) -> f64 {
        match self {
            ResizeAlgo::Lanczos => {
                if (-3.0..3.0).contains(&x) {
                    let sinc = |v: f64| {
                        if v == 0.0 {
                            1.0
                        } else {
                            let p = v * std::f64::consts::PI;
                            p.sin() / p
                        }
                    };
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
            ResizeAlgo::Bilinear => {
                let x = x.abs();
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
            ResizeAlgo::Bicubic => {
                let x = x.abs();
                let a = -0.5;
                if x < 1.0 {
                    ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * a
                } else {
                    0.0
                }
            }
        }
    }
}

/// Per output pixel: the first input pixel, how many, and fixed-point weights (`ksize` each).
struct Coeffs {
    ksize: usize,
    bounds: Vec<(usize, usize)>,
    weights: Vec<i32>,
}

fn precompute(algo: ResizeAlgo, in_size: usize, out_size: usize) -> Coeffs {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = algo.support() * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut pre = vec![0f64; out_size * ksize];
    let mut bounds = Vec::with_capacity(out_size);
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C's int conversion truncates toward zero; the values here are > -1 so `as i64` matches.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize - xmin;
        let row = &mut pre[xx * ksize..(xx + 1) * ksize];
        let mut ww = 0.0;
        for (x, w) in row.iter_mut().enumerate().take(xmax) {
            *w = algo.filter((x as f64 + xmin as f64 - center + 0.5) * ss);
            ww += *w;
        }
        if ww != 0.0 {
            for w in row.iter_mut().take(xmax) {
                *w /= ww;
            }
        }
        bounds.push((xmin, xmax));
    }
    let fxp = (1u64 << PRECISION_BITS) as f64;
    let weights = pre
        .iter()
        .map(|&w| (w * fxp + if w < 0.0 { -0.5 } else { 0.5 }) as i32)
        .collect();
    Coeffs {
        ksize,
        bounds,
        weights,
    }
}

fn clip8(v: i32) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

fn horizontal(src: &RgbImage, out_w: usize, c: &Coeffs) -> RgbImage {
    let mut out = RgbImage::new(out_w, src.height);
    for y in 0..src.height {
        let row = &src.data[y * src.width * 3..(y + 1) * src.width * 3];
        for xx in 0..out_w {
            let (xmin, xcnt) = c.bounds[xx];
            let k = &c.weights[xx * c.ksize..];
            let mut ss = [1i32 << (PRECISION_BITS - 1); 3];
            for x in 0..xcnt {
                let p = &row[(xmin + x) * 3..(xmin + x) * 3 + 3];
                for (s, &v) in ss.iter_mut().zip(p) {
                    *s = s.wrapping_add(i32::from(v).wrapping_mul(k[x]));
                }
            }
            let o = (y * out_w + xx) * 3;
            for (d, &s) in out.data[o..o + 3].iter_mut().zip(&ss) {
                *d = clip8(s);
            }
        }
    }
    out
}

fn vertical(src: &RgbImage, out_h: usize, c: &Coeffs) -> RgbImage {
    let elems = src.width * 3;
    let mut out = RgbImage::new(src.width, out_h);
    let mut acc = vec![0i32; elems];
    for yy in 0..out_h {
        let (ymin, ycnt) = c.bounds[yy];
        let k = &c.weights[yy * c.ksize..];
        acc.fill(1 << (PRECISION_BITS - 1));
        for (y, &w) in k[..ycnt].iter().enumerate() {
            let row = &src.data[(ymin + y) * elems..(ymin + y + 1) * elems];
            for (a, &p) in acc.iter_mut().zip(row) {
                *a = a.wrapping_add(i32::from(p).wrapping_mul(w));
            }
        }
        for (o, &a) in out.data[yy * elems..(yy + 1) * elems].iter_mut().zip(&acc) {
            *o = clip8(a);
        }
    }
    out
}

/// Pillow's resize (`resize_pillow` in mtmd): horizontal pass, then vertical.
pub fn resize_pillow(img: &RgbImage, w: usize, h: usize, algo: ResizeAlgo) -> RgbImage {
    let horiz = w != img.width;
    let vert = h != img.height;
    match (horiz, vert) {
        (false, false) => img.clone(),
        (true, false) => horizontal(img, w, &precompute(algo, img.width, w)),
        (false, true) => vertical(img, h, &precompute(algo, img.height, h)),
        (true, true) => {
            let t = horizontal(img, w, &precompute(algo, img.width, w));
            vertical(&t, h, &precompute(algo, img.height, h))
        }
    }
}

/// mtmd's `img_tool::resize`: stretch, or fit inside and pad.
pub fn resize(img: &RgbImage, w: usize, h: usize, algo: ResizeAlgo, pad: Pad) -> RgbImage {
    if img.width == w && img.height == h {
        return img.clone();
    }
    match pad {
        Pad::None => resize_pillow(img, w, h, algo),
        Pad::Ceil(color) => {
            let sw = w as f32 / img.width as f32;
            let sh = h as f32 / img.height as f32;
            let s = sw.min(sh);
            let nw = ((img.width as f32 * s).ceil() as usize).min(w);
            let nh = ((img.height as f32 * s).ceil() as usize).min(h);
            let resized = resize_pillow(img, nw, nh, algo);
            let mut out = RgbImage::new(w, h);
            out.fill(color);
            out.composite(&resized, (w - nw) / 2, (h - nh) / 2);
            out
        }
    }
}

/// An encoder input: one image (a tile, an overview or a whole image), normalised, planar
/// (`[channel][y][x]`).
#[derive(Clone, Debug)]
pub struct Tile {
    pub width: usize,
    pub height: usize,
    pub pixels: Vec<f32>,
}

/// `clip_image_f32::from_u8` then `normalize`: `(v / 255 - mean) / std`, made planar as
/// `clip_image_batch_encode` lays the input out.
pub fn normalize(img: &RgbImage, mean: [f32; 3], std: [f32; 3]) -> Tile {
    let n = img.width * img.height;
    let mut pixels = vec![0f32; 3 * n];
    for (i, px) in img.data.chunks_exact(3).enumerate() {
        for c in 0..3 {
            pixels[c * n + i] = (f32::from(px[c]) / 255.0 - mean[c]) / std[c];
        }
    }
    Tile {
        width: img.width,
        height: img.height,
        pixels,
    }
}

/// What an image becomes before encoding: tiles in row-major grid order and an overview
/// (idefics3), or a single image.
#[derive(Clone, Debug)]
pub struct Preprocessed {
    /// The tiles, `grid.0` columns by `grid.1` rows (empty for a single image).
    pub tiles: Vec<RgbImage>,
    pub grid: (usize, usize),
    /// The whole image at the encoder's size (idefics3's overview, or the single image).
    pub overview: RgbImage,
}

/// `mtmd_image_preprocessor_fixed_size`: one `size`x`size` image.
pub fn fixed_size(img: &RgbImage, size: usize, algo: ResizeAlgo, pad: Pad) -> Preprocessed {
    Preprocessed {
        tiles: Vec::new(),
        grid: (0, 0),
        overview: resize(img, size, size, algo, pad),
    }
}

/// The size idefics3 resizes an image to before tiling: the longer side `longest_edge`, the
/// other in proportion, truncated, then made even.
fn longest_edge_size(width: usize, height: usize, longest_edge: usize) -> (usize, usize) {
    let aspect = width as f64 / height as f64;
    if width >= height {
        let h = (longest_edge as f64 / aspect) as usize;
        // (llama.cpp fails on a zero side; a sliver of an image keeps one row here.)
        (longest_edge, (h + h % 2).max(1))
    } else {
        let w = (longest_edge as f64 * aspect) as usize;
        ((w + w % 2).max(1), longest_edge)
    }
}

/// The old slicer's grid: each side rounded to whole tiles, at least one.
fn rounded_grid(width: usize, height: usize, tile: usize) -> (usize, usize) {
    let round = |v: usize| ((v as f32 / tile as f32).round() as usize).max(1);
    (round(width), round(height))
}

/// `mtmd_image_preprocessor_idefics3`: tiles of `tile` pixels covering the image resized so
/// its longer side is `longest_edge`, and an overview. `tiled: false` (OpenAI's `detail:
/// "low"`) keeps only the overview.
pub fn idefics3(img: &RgbImage, tile: usize, longest_edge: usize, tiled: bool) -> Preprocessed {
    let (grid, overview, refined) = if longest_edge > 0 {
        let algo = ResizeAlgo::Lanczos;
        let (rw, rh) = longest_edge_size(img.width, img.height, longest_edge);
        let grid = (rw.div_ceil(tile), rh.div_ceil(tile));
        let resized = resize(img, rw, rh, algo, Pad::None);
        let refined = resize(&resized, grid.0 * tile, grid.1 * tile, algo, Pad::None);
        let overview = resize(&refined, tile, tile, algo, Pad::None);
        (grid, overview, Some(refined))
    } else {
        // Older mmproj files without `preproc_image_size`: the llava-uhd slicer, the refined
        // size the image's own rounded to whole tiles.
        let grid = rounded_grid(img.width, img.height, tile);
        let overview = resize(img, tile, tile, ResizeAlgo::Bicubic, Pad::None);
        let (w, h) = (grid.0 * tile, grid.1 * tile);
        let refined = tiled.then(|| resize(img, w, h, ResizeAlgo::Bicubic, Pad::Ceil([0, 0, 0])));
        (grid, overview, refined)
    };
    match refined.filter(|_| tiled) {
        None => Preprocessed {
            tiles: Vec::new(),
            grid: (0, 0),
            overview,
        },
        Some(refined) => Preprocessed {
            tiles: (0..grid.1)
                .flat_map(|y| (0..grid.0).map(move |x| (x, y)))
                .map(|(x, y)| refined.crop(x * tile, y * tile, tile, tile))
                .collect(),
            grid,
            overview,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gradient(w: usize, h: usize) -> RgbImage {
        let mut img = RgbImage::new(w, h);
        for y in 0..h {
            for x in 0..w {
                let o = (y * w + x) * 3;
                img.data[o] = (x * 255 / w.max(1)) as u8;
                img.data[o + 1] = (y * 255 / h.max(1)) as u8;
                img.data[o + 2] = ((x * 7 + y * 13) % 256) as u8;
            }
        }
        img
    }

    #[test]
    fn same_size_is_a_copy_and_flat_images_stay_flat() {
        let img = gradient(17, 9);
        assert_eq!(resize_pillow(&img, 17, 9, ResizeAlgo::Lanczos), img);
        let mut flat = RgbImage::new(40, 30);
        flat.fill([200, 10, 99]);
        for algo in [
            ResizeAlgo::Bilinear,
            ResizeAlgo::Bicubic,
            ResizeAlgo::Lanczos,
        ] {
            for (w, h) in [(13, 7), (80, 61), (40, 5)] {
                let out = resize_pillow(&flat, w, h, algo);
                assert!(
                    out.data.chunks(3).all(|p| p == [200, 10, 99]),
                    "{algo:?} {w}x{h}"
                );
            }
        }
    }

    #[test]
    fn padding_centres_the_image() {
        let mut img = RgbImage::new(20, 10);
        img.fill([255, 255, 255]);
        let out = resize(&img, 16, 16, ResizeAlgo::Bicubic, Pad::Ceil([1, 2, 3]));
        // 20x10 -> 16x8, placed at y = 4.
        assert_eq!(&out.data[..3], &[1, 2, 3]);
        let row = |y: usize| &out.data[y * 48..(y + 1) * 48];
        assert!(row(3).chunks(3).all(|p| p == [1, 2, 3]));
        assert!(row(4).chunks(3).all(|p| p == [255, 255, 255]));
        assert!(row(11).chunks(3).all(|p| p == [255, 255, 255]));
        assert!(row(12).chunks(3).all(|p| p == [1, 2, 3]));
    }

    #[test]
    fn idefics3_grids_follow_the_longest_edge() {
        let p = idefics3(&gradient(100, 37), 64, 128, true);
        // 100x37 -> 128x47 (+1 to even: 48) -> grid 2x1.
        assert_eq!(p.grid, (2, 1));
        assert_eq!(p.tiles.len(), 2);
        assert!(p.tiles.iter().all(|t| t.width == 64 && t.height == 64));
        assert_eq!((p.overview.width, p.overview.height), (64, 64));
        let p = idefics3(&gradient(30, 90), 64, 128, true);
        assert_eq!(p.grid, (1, 2));
        let low = idefics3(&gradient(30, 90), 64, 128, false);
        assert!(low.tiles.is_empty());
        assert_eq!(low.overview, p.overview);
    }

    #[test]
    fn normalisation_is_planar() {
        let mut img = RgbImage::new(2, 1);
        img.data = vec![0, 255, 51, 255, 0, 102];
        let t = normalize(&img, [0.5; 3], [0.5; 3]);
        let want = [-1.0, 1.0, 1.0, -1.0, -0.6, -0.2];
        for (got, want) in t.pixels.iter().zip(want) {
            assert!((got - want).abs() < 1e-6, "{:?}", t.pixels);
        }
    }
}
