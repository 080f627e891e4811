//! The LoRA training loop.
//!
//! The forward pass is the serving model's (same RMS norm, RoPE pairing, grouped-query causal
//! attention, SwiGLU), written with candle tensors so that candle's autograd gives the backward
//! pass. The base weights are frozen: each projection is a [`Frozen`] op whose backward returns
//! only the input's gradient (candle's matmul would also compute the weight's, a third of the
//! work for nothing), and the trainable parameters are the adapters' `A` and `B` matrices.

use candle_core::{Device, Tensor, Var};
use ferrum_engine::LoadedModel;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::model::{Adapters, Base};
use crate::state::State;
use crate::{Example, TrainError};

/// OpenAI's supervised hyperparameters, with "auto" resolved.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Hyperparameters {
    pub n_epochs: u32,
    pub batch_size: u32,
    pub learning_rate_multiplier: f64,
}

impl Hyperparameters {
    /// Resolves "auto" (`None`) values for a training set of `n_examples`, as OpenAI picks
    /// them: 3 epochs (more for tiny sets, so they still see ~100 examples), a batch of about
    /// 0.2% of the examples (1 to 16), a learning-rate multiplier of 2 for small sets.
    pub fn resolve(
        n_examples: usize,
        n_epochs: Option<u32>,
        batch_size: Option<u32>,
        learning_rate_multiplier: Option<f64>,
    ) -> Self {
        let n = n_examples.max(1) as u32;
        Hyperparameters {
            n_epochs: n_epochs.unwrap_or_else(|| (100 / n).clamp(3, 10)),
            batch_size: batch_size.unwrap_or_else(|| (n / 500).clamp(1, 16)),
            learning_rate_multiplier: learning_rate_multiplier.unwrap_or(2.0),
        }
    }
}

/// Everything a training run depends on; two runs with equal settings and data give the same
/// adapter.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainSettings {
    pub hyper: Hyperparameters,
    /// LoRA rank and alpha (the update is scaled by alpha / rank).
    pub rank: usize,
    pub alpha: f32,
    /// The learning rate a multiplier of 1 means.
    pub base_learning_rate: f64,
    /// Fraction of the steps spent warming the learning rate up from 0.
    pub warmup: f64,
    pub weight_decay: f64,
    pub seed: u64,
    /// Threads for the tensor work; they run at the lowest CPU priority (nice 19), so serving
    /// threads always go first. The result does not depend on the count.
    pub threads: usize,
}

impl TrainSettings {
    pub fn new(hyper: Hyperparameters, seed: u64) -> Self {
        TrainSettings {
            hyper,
            rank: 8,
            alpha: 16.0,
            base_learning_rate: 1e-4,
            warmup: 0.1,
            weight_decay: 0.0,
            seed,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }
}

/// What the loop reports after each optimizer step.
#[derive(Clone, Debug, PartialEq)]
pub struct StepReport {
    /// 1-based, counted over the whole run.
    pub step: usize,
    pub total_steps: usize,
    /// 1-based.
    pub epoch: u32,
    pub train_loss: f64,
    pub train_mean_token_accuracy: f64,
    /// Tokens of training examples run through the model so far (all epochs).
    pub trained_tokens: u64,
}

/// What the loop reports at the end of each epoch: a checkpoint.
#[derive(Clone, Debug, PartialEq)]
pub struct EpochReport {
    pub epoch: u32,
    pub step: usize,
    pub total_steps: usize,
    pub trained_tokens: u64,
    /// Mean loss and token accuracy over the epoch's training steps.
    pub train_loss: f64,
    pub train_mean_token_accuracy: f64,
    /// Over the whole validation set, if one was given.
    pub valid_loss: Option<f64>,
    pub valid_mean_token_accuracy: Option<f64>,
    /// The adapter as it stands, in llama.cpp's LoRA GGUF format.
    pub adapter: Vec<u8>,
    /// Everything needed to resume after this epoch (adapter, optimizer moments, counters).
    pub state: Vec<u8>,
}

/// The runner's answer to a report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Control {
    Continue,
    /// Stop now (cancelled, paused, or the server is shutting down); nothing more is
    /// reported.
    Stop,
}

/// The job runner's side of a training run.
pub trait Progress {
    /// After every optimizer step.
    fn step(&mut self, report: &StepReport) -> Control;
    /// At the end of every epoch, after [`step`](Self::step): the checkpoint to store. The run
    /// resumes from the last stored one.
    fn epoch(&mut self, report: &EpochReport) -> Control;
    /// Between micro-batches: a runner at background priority blocks here while interactive
    /// traffic needs the CPU.
    fn pause_point(&mut self) -> Control {
        Control::Continue
    }
}

/// How a run ended.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// All epochs ran; the final adapter (also the last epoch's checkpoint).
    Finished {
        adapter: Vec<u8>,
        trained_tokens: u64,
    },
    /// [`Progress`] said stop.
    Stopped,
}

/// Trains a LoRA adapter for `model` on `train` (shuffled each epoch with the seed), reporting
/// validation loss on `valid` at each epoch's end. `resume` is the `state` of an
/// [`EpochReport`] of an earlier run with the same settings and data: the run goes on from the
/// epoch after it, exactly as if it had not stopped.
pub fn train(
    model: &LoadedModel,
    train: &[Example],
    valid: &[Example],
    settings: &TrainSettings,
    resume: Option<&[u8]>,
    progress: &mut (dyn Progress + Send),
) -> Result<Outcome, TrainError> {
    // candle's matmuls split their work over rayon's current pool, and candle decides from
    // the environment (RAYON_NUM_THREADS, else the physical cores) whether to split at all;
    // either way the work runs on this pool's threads, which lower their own priority first.
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(settings.threads.max(1))
        .thread_name(|i| format!("ferrum-train-{i}"))
        .start_handler(|_| lower_priority())
        .build()
        .map_err(|e| TrainError::Invalid(format!("starting the training threads: {e}")))?;
    pool.install(|| train_on_pool(model, train, valid, settings, resume, progress))
}

/// Lowers the calling thread's CPU priority to nice 19 (Linux: priorities are per thread).
fn lower_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: setpriority on the calling thread's id; no memory is passed.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, 19);
    }
}

fn train_on_pool(
    model: &LoadedModel,
    train: &[Example],
    valid: &[Example],
    settings: &TrainSettings,
    resume: Option<&[u8]>,
    progress: &mut (dyn Progress + Send),
) -> Result<Outcome, TrainError> {
    if train.is_empty() {
        return Err(TrainError::Invalid("no training examples".into()));
    }
    let hp = settings.hyper;
    if hp.n_epochs == 0
        || hp.batch_size == 0
        || hp.learning_rate_multiplier.is_nan()
        || hp.learning_rate_multiplier <= 0.0
    {
        return Err(TrainError::Invalid(format!(
            "invalid hyperparameters {hp:?}"
        )));
    }
    let base = Base::load(model)?;
    let adapters = Adapters::new(&base.cfg, settings)?;
    let steps_per_epoch = train.len().div_ceil(hp.batch_size as usize);
    let total_steps = steps_per_epoch * hp.n_epochs as usize;
    let mut opt = AdamW::new(adapters.vars(), settings.weight_decay)?;
    let (mut epoch0, mut step, mut trained_tokens) = (0u32, 0usize, 0u64);
    if let Some(bytes) = resume {
        let st = State::decode(bytes)?;
        if st.total_steps != total_steps {
            return Err(TrainError::BadCheckpoint(format!(
                "it is from a run of {} steps, this one has {total_steps}",
                st.total_steps
            )));
        }
        adapters.restore(&st.params)?;
        opt.restore(&st.m, &st.v, st.step)?;
        (epoch0, step, trained_tokens) = (st.epoch, st.step, st.trained_tokens);
    }
    let lr_max = settings.base_learning_rate * hp.learning_rate_multiplier;
    let warmup = ((total_steps as f64) * settings.warmup).round() as usize;
    for epoch in epoch0 + 1..=hp.n_epochs {
        // Each epoch's order depends only on the seed and the epoch, so a resumed run sees
        // the same batches.
        let mut order: Vec<usize> = (0..train.len()).collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(settings.seed ^ (u64::from(epoch) << 32));
        order.shuffle(&mut rng);
        let (mut epoch_loss, mut epoch_acc, mut epoch_targets) = (0f64, 0f64, 0f64);
        for batch in order.chunks(hp.batch_size as usize) {
            let targets: usize = batch.iter().map(|&i| train[i].target_count()).sum();
            let mut grads: Option<Vec<Tensor>> = None;
            let (mut loss_sum, mut correct) = (0f64, 0f64);
            for &i in batch {
                if progress.pause_point() == Control::Stop {
                    return Ok(Outcome::Stopped);
                }
                let ex = &train[i];
                trained_tokens += ex.tokens.len() as u64;
                if ex.target_count() == 0 {
                    continue;
                }
                let out = base.loss(&adapters, ex)?;
                loss_sum += out.loss_sum.to_scalar::<f32>()? as f64;
                correct += out.correct as f64;
                // The batch's loss is the mean over all its target tokens.
                let scaled = out.loss_sum.affine(1.0 / targets as f64, 0.0)?;
                let g = scaled.backward()?;
                let these = adapters
                    .vars()
                    .iter()
                    .map(|v| {
                        g.get(v.as_tensor())
                            .cloned()
                            .map_or_else(|| v.as_tensor().zeros_like(), Ok)
                    })
                    .collect::<candle_core::Result<Vec<_>>>()?;
                grads = Some(match grads {
                    None => these,
                    Some(acc) => acc
                        .iter()
                        .zip(&these)
                        .map(|(a, b)| a.add(b))
                        .collect::<candle_core::Result<_>>()?,
                });
            }
            step += 1;
            let lr = schedule(step, warmup, total_steps, lr_max);
            if let Some(grads) = grads {
                opt.step(&grads, lr)?;
            }
            let n = targets.max(1) as f64;
            let report = StepReport {
                step,
                total_steps,
                epoch,
                train_loss: loss_sum / n,
                train_mean_token_accuracy: correct / n,
                trained_tokens,
            };
            tracing::debug!(step, total_steps, loss = report.train_loss, "training step");
            (epoch_loss, epoch_acc, epoch_targets) = (
                epoch_loss + loss_sum,
                epoch_acc + correct,
                epoch_targets + targets as f64,
            );
            if progress.step(&report) == Control::Stop {
                return Ok(Outcome::Stopped);
            }
        }
        let (valid_loss, valid_acc) = if valid.is_empty() {
            (None, None)
        } else {
            let (mut l, mut c, mut n) = (0f64, 0f64, 0f64);
            for ex in valid {
                if progress.pause_point() == Control::Stop {
                    return Ok(Outcome::Stopped);
                }
                if ex.target_count() == 0 {
                    continue;
                }
                let out = base.loss(&adapters, ex)?;
                l += out.loss_sum.to_scalar::<f32>()? as f64;
                c += out.correct as f64;
                n += ex.target_count() as f64;
            }
            (Some(l / n.max(1.0)), Some(c / n.max(1.0)))
        };
        let adapter = adapters.gguf(&base.cfg, settings.alpha)?;
        let [m, v] = opt.moments()?;
        let state = State {
            total_steps,
            epoch,
            step,
            trained_tokens,
            params: adapters.values()?,
            m,
            v,
        }
        .encode();
        let e = epoch_targets.max(1.0);
        let report = EpochReport {
            epoch,
            step,
            total_steps,
            trained_tokens,
            train_loss: epoch_loss / e,
            train_mean_token_accuracy: epoch_acc / e,
            valid_loss,
            valid_mean_token_accuracy: valid_acc,
            adapter,
            state,
        };
        if progress.epoch(&report) == Control::Stop {
            return Ok(Outcome::Stopped);
        }
        if epoch == hp.n_epochs {
            return Ok(Outcome::Finished {
                adapter: report.adapter,
                trained_tokens,
            });
        }
    }
    // Resumed after the last epoch's checkpoint: the run was already complete.
    Ok(Outcome::Finished {
        adapter: adapters.gguf(&base.cfg, settings.alpha)?,
        trained_tokens,
    })
}

/// Linear warm-up from 0 over `warmup` steps, then linear decay to 0 at `total`.
fn schedule(step: usize, warmup: usize, total: usize, lr_max: f64) -> f64 {
    if step <= warmup && warmup > 0 {
        lr_max * step as f64 / warmup as f64
    } else {
        let left = total.saturating_sub(step) as f64;
        let span = total.saturating_sub(warmup).max(1) as f64;
        // The last step still moves a little (OpenAI's curves end above 0).
        lr_max * ((left + 1.0) / (span + 1.0))
    }
}

/// AdamW over the adapters' parameters (decoupled weight decay, bias-corrected moments).
struct AdamW {
    vars: Vec<Var>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    t: usize,
    weight_decay: f64,
}

const BETA1: f64 = 0.9;
const BETA2: f64 = 0.999;
const EPS: f64 = 1e-8;

impl AdamW {
    fn new(vars: &[Var], weight_decay: f64) -> candle_core::Result<Self> {
        let zeros = |v: &Var| v.as_tensor().zeros_like();
        Ok(AdamW {
            m: vars.iter().map(zeros).collect::<candle_core::Result<_>>()?,
            v: vars.iter().map(zeros).collect::<candle_core::Result<_>>()?,
            vars: vars.to_vec(),
            t: 0,
            weight_decay,
        })
    }

    fn step(&mut self, grads: &[Tensor], lr: f64) -> candle_core::Result<()> {
        self.t += 1;
        let c1 = 1.0 - BETA1.powi(self.t as i32);
        let c2 = 1.0 - BETA2.powi(self.t as i32);
        for (i, var) in self.vars.iter().enumerate() {
            let g = &grads[i];
            self.m[i] = ((&self.m[i] * BETA1)? + (g * (1.0 - BETA1))?)?;
            self.v[i] = ((&self.v[i] * BETA2)? + (g.sqr()? * (1.0 - BETA2))?)?;
            let m_hat = (&self.m[i] / c1)?;
            let v_hat = (&self.v[i] / c2)?;
            let update = (m_hat / (v_hat.sqrt()? + EPS)?)?;
            let theta = var.as_tensor();
            let decayed = (theta * (1.0 - lr * self.weight_decay))?;
            var.set(&(decayed - (update * lr)?)?)?;
        }
        Ok(())
    }

    /// The first and second moments, flattened, in parameter order.
    fn moments(&self) -> candle_core::Result<[Vec<Vec<f32>>; 2]> {
        let flat = |ts: &[Tensor]| {
            ts.iter()
                .map(|t| t.flatten_all()?.to_vec1::<f32>())
                .collect::<candle_core::Result<Vec<_>>>()
        };
        Ok([flat(&self.m)?, flat(&self.v)?])
    }

    fn restore(&mut self, m: &[Vec<f32>], v: &[Vec<f32>], t: usize) -> Result<(), TrainError> {
        if m.len() != self.vars.len() || v.len() != self.vars.len() {
            return Err(TrainError::BadCheckpoint(
                "optimizer state of another shape".into(),
            ));
        }
        for i in 0..self.vars.len() {
            let shape = self.vars[i].as_tensor().shape().clone();
            if m[i].len() != shape.elem_count() || v[i].len() != shape.elem_count() {
                return Err(TrainError::BadCheckpoint(
                    "optimizer state of another shape".into(),
                ));
            }
            self.m[i] = Tensor::from_slice(&m[i], shape.clone(), &Device::Cpu)?;
            self.v[i] = Tensor::from_slice(&v[i], shape, &Device::Cpu)?;
        }
        self.t = t;
        Ok(())
    }
}
