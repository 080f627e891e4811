//! `ferrum fine-tune`: a LoRA fine-tune of a tier from a JSONL file of chat examples, on this
//! machine and without a server, with a progress bar. The server's fine-tuning jobs run the
//! same trainer; this command is also how training speed is measured.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Args;
use ferrum_registry::Registry;
use ferrum_train::{
    Control, EpochReport, Example, Hyperparameters, Outcome, Progress, StepReport, TrainSettings,
};
use indicatif::{ProgressBar, ProgressStyle};

use crate::cli::{load_model, ModelArgs};

#[derive(Args)]
pub struct FineTuneArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Training examples: JSONL, one `{"messages": [...]}` chat per line (OpenAI's format).
    #[arg(long)]
    pub training_file: PathBuf,
    /// Held-out examples, scored at the end of every epoch.
    #[arg(long)]
    pub validation_file: Option<PathBuf>,
    /// Epochs (default: OpenAI's "auto").
    #[arg(long)]
    pub n_epochs: Option<u32>,
    #[arg(long)]
    pub batch_size: Option<u32>,
    #[arg(long)]
    pub learning_rate_multiplier: Option<f64>,
    /// LoRA rank and alpha.
    #[arg(long, default_value_t = 8)]
    pub rank: usize,
    #[arg(long, default_value_t = 16.0)]
    pub alpha: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Where to write the adapter (llama.cpp's LoRA GGUF format).
    #[arg(long, short, default_value = "adapter.gguf")]
    pub output: PathBuf,
}

fn read_examples(
    model: &ferrum_engine::LoadedModel,
    path: &PathBuf,
) -> anyhow::Result<Vec<Example>> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let out = ferrum_train::read_chat_examples(model, std::io::BufReader::new(file)).map_err(
        |(n, e)| {
            let why = match e {
                ferrum_train::LineError::Read(e) => e.to_string(),
                ferrum_train::LineError::Json(e) => format!("not JSON: {e}"),
                ferrum_train::LineError::Data(e) => e.to_string(),
            };
            anyhow::anyhow!("{} line {n}: {why}", path.display())
        },
    )?;
    if out.is_empty() {
        bail!("{} has no examples", path.display());
    }
    Ok(out)
}

struct Bar {
    bar: ProgressBar,
    started: Instant,
}

impl Progress for Bar {
    fn step(&mut self, r: &StepReport) -> Control {
        self.bar.set_length(r.total_steps as u64);
        self.bar.set_position(r.step as u64);
        let secs = self.started.elapsed().as_secs_f64().max(1e-9);
        self.bar.set_message(format!(
            "epoch {} loss {:.3} acc {:.2} {:.0} tok/s",
            r.epoch,
            r.train_loss,
            r.train_mean_token_accuracy,
            r.trained_tokens as f64 / secs
        ));
        Control::Continue
    }

    fn epoch(&mut self, r: &EpochReport) -> Control {
        let valid = r
            .valid_loss
            .map(|v| format!(", validation loss {v:.4}"))
            .unwrap_or_default();
        let line = format!(
            "epoch {}: train loss {:.4}, token accuracy {:.3}{valid}",
            r.epoch, r.train_loss, r.train_mean_token_accuracy
        );
        if self.bar.is_hidden() {
            eprintln!("{line}");
        } else {
            self.bar.println(line);
        }
        Control::Continue
    }
}

pub fn fine_tune(registry: &Registry, args: FineTuneArgs) -> anyhow::Result<()> {
    let model = load_model(registry, &args.model)?;
    let train = read_examples(&model, &args.training_file)?;
    let valid = match &args.validation_file {
        Some(p) => read_examples(&model, p)?,
        None => Vec::new(),
    };
    let hyper = Hyperparameters::resolve(
        train.len(),
        args.n_epochs,
        args.batch_size,
        args.learning_rate_multiplier,
    );
    let mut settings = TrainSettings::new(hyper, args.seed);
    settings.rank = args.rank;
    settings.alpha = args.alpha;
    let tokens: usize = train.iter().map(|e| e.tokens.len()).sum();
    eprintln!(
        "{} examples ({tokens} tokens), {} validation; {} epochs, batch {}, learning rate {:e}",
        train.len(),
        valid.len(),
        hyper.n_epochs,
        hyper.batch_size,
        settings.base_learning_rate * hyper.learning_rate_multiplier
    );
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} steps {elapsed_precise} {msg}")
            .expect("a valid template"),
    );
    let started = Instant::now();
    let mut progress = Bar { bar, started };
    let out = ferrum_train::train(&model, &train, &valid, &settings, None, &mut progress)?;
    progress.bar.finish();
    let Outcome::Finished {
        adapter,
        trained_tokens,
    } = out
    else {
        bail!("training stopped");
    };
    let secs = started.elapsed().as_secs_f64();
    std::fs::write(&args.output, adapter)
        .with_context(|| format!("writing {}", args.output.display()))?;
    println!(
        "{}: {trained_tokens} tokens trained in {secs:.1} s ({:.1} tokens/s)",
        args.output.display(),
        trained_tokens as f64 / secs
    );
    Ok(())
}
