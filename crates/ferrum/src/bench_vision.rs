//! `ferrum bench-vision`: time to encode one image with an mmproj (preprocessing, every tile and
//! the overview through the ViT and projector), and optionally llama.cpp's mtmd on the same files
//! in the same run (`mtmd_ref --time`, scripts/vision_fixtures/mtmd_ref.cpp).

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use ferrum_vision::{decode_image, Detail, ImageLimits, Precision, VisionModel};

#[derive(Args)]
pub struct BenchVisionArgs {
    /// The mmproj GGUF file.
    #[arg(long)]
    pub mmproj: PathBuf,
    /// The image to encode (PNG, JPEG, WebP or GIF).
    #[arg(long)]
    pub image: PathBuf,
    /// `high` (tiles and overview) or `low` (the overview only).
    #[arg(long, default_value = "high")]
    pub detail: String,
    /// `int8` (the default path) or `exact` (llama.cpp's arithmetic, the tests' reference).
    #[arg(long, default_value = "int8")]
    pub precision: String,
    /// Timed encodes (after one untimed); the median is reported.
    #[arg(long, default_value_t = 3)]
    pub repetitions: usize,
    /// llama.cpp's reference tool (`scripts/vision_fixtures/build_ref.sh` builds it), to time
    /// mtmd on the same mmproj and image in this run.
    #[arg(long)]
    pub mtmd_ref: Option<PathBuf>,
    /// The language model mtmd_ref loads beside the mmproj (its width must match).
    #[arg(long)]
    pub lm: Option<PathBuf>,
    /// Threads for llama.cpp (ferrum's encoder uses candle's pool: every core).
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub fn bench_vision(args: BenchVisionArgs) -> anyhow::Result<()> {
    let detail = Detail::parse(&args.detail).context("--detail: high, low or auto")?;
    let precision = match args.precision.as_str() {
        "int8" => Precision::Int8,
        "exact" => Precision::Exact,
        other => anyhow::bail!("--precision {other}: int8 or exact"),
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let vision = VisionModel::load_with(&args.mmproj, precision, threads)?;
    let bytes = std::fs::read(&args.image).with_context(|| args.image.display().to_string())?;
    let img = decode_image(&bytes, None, ImageLimits::default())?;
    let c = vision.config();
    println!(
        "mmproj {} ({:?}, {precision:?}): ViT {} blocks x {} wide, {}px inputs of {}px patches -> {} tokens each",
        args.mmproj.display(),
        c.projector,
        c.n_layer,
        c.n_embd,
        c.image_size,
        c.patch_size,
        c.tokens_per_image()
    );
    let started = Instant::now();
    let first = vision.encode(&img, detail)?;
    let cold = started.elapsed().as_secs_f64() * 1e3;
    let inputs = first.inputs.len();
    let mut times = Vec::with_capacity(args.repetitions);
    for _ in 0..args.repetitions.max(1) {
        let t = Instant::now();
        std::hint::black_box(vision.encode(&img, detail)?);
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let ours = median(times);
    println!(
        "image {} ({}x{}): {inputs} encoder inputs, {} image tokens",
        args.image.display(),
        img.width,
        img.height,
        first.image_tokens()
    );
    println!(
        "ferrum:    {ours:9.1} ms per image (median of {}), {:7.1} ms per input; first run {cold:.1} ms",
        args.repetitions.max(1),
        ours / inputs as f64
    );
    if let Some(bin) = &args.mtmd_ref {
        let lm = args.lm.as_ref().context("--mtmd-ref needs --lm")?;
        let out = Command::new(bin)
            .arg("-m")
            .arg(lm)
            .arg("--mmproj")
            .arg(&args.mmproj)
            .args(["-p", "<__media__>.", "--image"])
            .arg(&args.image)
            .args(["--no-decode", "--time"])
            .arg(args.repetitions.max(1).to_string())
            .args(["--threads", &args.threads.to_string()])
            .output()
            .with_context(|| format!("running {}", bin.display()))?;
        anyhow::ensure!(
            out.status.success(),
            "mtmd_ref failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "mtmd_ref's output: {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })?;
        let t = &v["timing"];
        let theirs = t["image_median_ms"]
            .as_f64()
            .context("no image_median_ms")?;
        let n = t["n_image_chunks"].as_f64().unwrap_or(1.0);
        println!(
            "llama.cpp: {theirs:9.1} ms per image (median of {}), {:7.1} ms per input, {} threads, flash attention {}",
            t["n"],
            theirs / n,
            args.threads,
            t["fa"]
        );
        println!("ferrum / llama.cpp time: {:.2}", ours / theirs);
    }
    Ok(())
}
