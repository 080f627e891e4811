//! Choosing the next token from logits: logit bias, presence/frequency penalties, temperature,
//! nucleus (top-p) sampling with a seeded RNG, and the log-probabilities reported to clients.

use std::collections::HashMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// How to pick tokens. `temperature == 0` is greedy decoding.
#[derive(Clone, Debug)]
pub struct SamplingParams {
    pub temperature: f32,
    pub top_p: f32,
    pub seed: Option<u64>,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// Added to the logit of each listed token before sampling (OpenAI `logit_bias`).
    pub logit_bias: Vec<(u32, f32)>,
    /// Whether to compute the chosen token's log-probability.
    pub logprobs: bool,
    /// How many alternatives to report per position (needs `logprobs`).
    pub top_logprobs: usize,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            seed: None,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
            logprobs: false,
            top_logprobs: 0,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        SamplingParams {
            temperature: 0.0,
            ..Default::default()
        }
    }
}

/// A chosen token with its log-probability under the model's own distribution (before bias,
/// penalties and temperature), and the `top_logprobs` most likely alternatives.
#[derive(Clone, Debug, PartialEq)]
pub struct Sampled {
    pub id: u32,
    pub logprob: Option<f32>,
    pub top: Vec<(u32, f32)>,
}

/// Per-sequence sampling state: parameters, RNG and the counts penalties need.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    counts: HashMap<u32, u32>,
    probs: Vec<(u32, f32)>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_entropy(),
        };
        Sampler {
            params,
            rng,
            counts: HashMap::new(),
            probs: Vec::new(),
        }
    }

    /// Picks the next token from `logits` (modified in place) and records it for penalties.
    pub fn sample(&mut self, logits: &mut [f32]) -> Sampled {
        // Log-probabilities cost a pass of exp() over the vocabulary: only when asked for.
        let lse = self.params.logprobs.then(|| log_sum_exp(logits));
        let top = match lse {
            Some(lse) if self.params.top_logprobs > 0 => top_k(logits, self.params.top_logprobs)
                .into_iter()
                .map(|(id, l)| (id, l - lse))
                .collect(),
            _ => Vec::new(),
        };
        let originals = self.apply_bias_and_penalties(logits);
        let id = if self.params.temperature <= 0.0 {
            argmax(logits)
        } else {
            self.sample_nucleus(logits)
        };
        *self.counts.entry(id).or_insert(0) += 1;
        let raw = originals
            .iter()
            .find(|(i, _)| *i == id)
            .map_or(logits[id as usize], |&(_, l)| l);
        Sampled {
            id,
            logprob: lse.map(|lse| raw - lse),
            top,
        }
    }

    /// Applies logit bias and penalties; returns the original logits of the entries it changed.
    fn apply_bias_and_penalties(&self, logits: &mut [f32]) -> Vec<(u32, f32)> {
        let mut originals = Vec::new();
        let mut adjust = |id: u32, delta: f32| {
            if let Some(l) = logits.get_mut(id as usize) {
                if !originals.iter().any(|&(i, _)| i == id) {
                    originals.push((id, *l));
                }
                *l += delta;
            }
        };
        for &(id, bias) in &self.params.logit_bias {
            adjust(id, bias);
        }
        let (pp, fp) = (self.params.presence_penalty, self.params.frequency_penalty);
        if pp != 0.0 || fp != 0.0 {
            for (&id, &n) in &self.counts {
                adjust(id, -(pp + fp * n as f32));
            }
        }
        originals
    }

    fn sample_nucleus(&mut self, logits: &[f32]) -> u32 {
        let inv_t = 1.0 / self.params.temperature;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        self.probs.clear();
        let mut total = 0f64;
        for (i, &l) in logits.iter().enumerate() {
            let p = ((l - max) * inv_t).exp();
            if p > 0.0 {
                self.probs.push((i as u32, p));
                total += p as f64;
            }
        }
        let top_p = self.params.top_p.clamp(0.0, 1.0) as f64;
        if top_p < 1.0 {
            // Sort by probability and keep the smallest prefix whose mass reaches top_p.
            self.probs
                .sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            let mut acc = 0f64;
            let mut keep = self.probs.len();
            for (i, &(_, p)) in self.probs.iter().enumerate() {
                acc += p as f64;
                if acc >= top_p * total {
                    keep = i + 1;
                    break;
                }
            }
            self.probs.truncate(keep.max(1));
            total = self.probs.iter().map(|&(_, p)| p as f64).sum();
        }
        let mut r = self.rng.gen::<f64>() * total;
        for &(id, p) in &self.probs {
            r -= p as f64;
            if r <= 0.0 {
                return id;
            }
        }
        self.probs.last().map_or(0, |&(id, _)| id)
    }
}

/// The index of the largest logit (the first one on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// `log(sum(exp(logits)))`, computed stably.
pub fn log_sum_exp(logits: &[f32]) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
    max + sum.ln() as f32
}

/// The `k` largest logits with their ids, best first (ties by lower id).
pub fn top_k(logits: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(k + 1);
    for (i, &l) in logits.iter().enumerate() {
        if best.len() == k && l <= best[k - 1].1 {
            continue;
        }
        let pos = best.partition_point(|&(_, b)| b >= l);
        best.insert(pos, (i as u32, l));
        best.truncate(k);
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_argmax_and_reports_logprobs() {
        let mut s = Sampler::new(SamplingParams {
            logprobs: true,
            top_logprobs: 2,
            ..SamplingParams::greedy()
        });
        let mut logits = vec![0.0, 2.0, 1.0];
        let out = s.sample(&mut logits);
        assert_eq!(out.id, 1);
        let lse = (1f32 + 2f32.exp() + 1f32.exp()).ln();
        assert!((out.logprob.unwrap() - (2.0 - lse)).abs() < 1e-5);
        assert_eq!(out.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 2]);
    }

    #[test]
    fn logit_bias_can_force_a_token() {
        let mut s = Sampler::new(SamplingParams {
            logit_bias: vec![(0, 100.0)],
            ..SamplingParams::greedy()
        });
        assert_eq!(s.sample(&mut [0.0, 2.0, 1.0]).id, 0);
    }

    #[test]
    fn seeded_sampling_is_reproducible_and_top_p_restricts() {
        let logits = vec![3.0, 2.9, 0.0, -1.0, 0.5];
        let run = |seed| {
            let mut s = Sampler::new(SamplingParams {
                temperature: 1.0,
                top_p: 0.6,
                seed: Some(seed),
                ..Default::default()
            });
            (0..50)
                .map(|_| s.sample(&mut logits.clone()).id)
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert!(run(7).iter().all(|&id| id == 0 || id == 1));
    }

    #[test]
    fn frequency_penalty_discourages_repeats() {
        let mut s = Sampler::new(SamplingParams {
            frequency_penalty: 2.0,
            ..SamplingParams::greedy()
        });
        assert_eq!(s.sample(&mut [1.0, 0.5]).id, 0);
        assert_eq!(s.sample(&mut [1.0, 0.5]).id, 1);
    }
}
