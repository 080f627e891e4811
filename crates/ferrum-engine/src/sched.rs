//! The step plan of the scheduler: how many tokens each running sequence feeds to the next
//! forward pass. Pure policy (no tensors, no clock: the engine reports each step's measured
//! time), so it is tested by stepping it.
//!
//! Decoding sequences go first, one token each (or a token and its predicted followers), then
//! prompt chunks, shortest prompt first, up to `step_tokens` tokens in all (chunked prefill).
//!
//! A token budget alone does not keep decoding smooth on a CPU: a step's time grows with its
//! prompt tokens (the prompt is compute-bound, decoding reads the weights once for everyone),
//! so a 256-token chunk of a long prompt makes every decoding stream wait ~1 s for its next
//! token, more as the prompt gets deeper (attention). So while some sequences decode, the
//! prompt tokens of a step are also capped by time, as Sarathi-Serve sizes its chunks from a
//! latency target: a step may take at most `max_slowdown` times a decode-only step, and the
//! planner spends the difference on prompt tokens at their measured cost. The two costs are
//! running averages of the steps just taken (the cost of a prompt token grows with its depth,
//! so it is re-measured all along). A prompt keeps moving (at least [`MIN_PROMPT_CHUNK`] tokens
//! per step); with no sequence decoding, the time cap does not apply and prompts read at full
//! speed.

/// The smallest prompt chunk the time cap leaves: one GEMM panel. Deep in a long prompt a
/// token's attention alone costs about a decode step (mini at 16k positions: ~25 ms on 2
/// cores), so there the floor, not the cap, sets the step: measured with 4 mini streams and a
/// 16k-token prompt, a floor of 16 gives ITL p99 4.4x the decode-only one and the prompt 394 s;
/// a floor of 1 (the cap alone) had not finished the prompt after 15 minutes. The floor keeps
/// a long prompt moving at a useful pace.
pub const MIN_PROMPT_CHUNK: usize = 16;

/// Weight of the newest step in the running averages.
const EMA: f64 = 0.25;

/// What a running sequence wants to feed next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Want {
    /// Decoding: its next token (and any predicted ones to verify after it).
    Decode(usize),
    /// Reading its prompt: this many prompt tokens are left.
    Prompt(usize),
}

/// Plans steps and learns what they cost.
#[derive(Clone, Debug)]
pub struct StepPlanner {
    step_tokens: usize,
    /// How much longer than a decode-only step a step with prompt tokens may take while
    /// sequences decode; 0 (or anything not above 1) turns the time cap off.
    max_slowdown: f64,
    /// Seconds of a step with no prompt tokens.
    decode_step_s: Option<f64>,
    /// Seconds each prompt token adds to a step.
    prompt_token_s: Option<f64>,
}

impl StepPlanner {
    pub fn new(step_tokens: usize, max_slowdown: f64) -> Self {
        StepPlanner {
            step_tokens: step_tokens.max(1),
            max_slowdown,
            decode_step_s: None,
            prompt_token_s: None,
        }
    }

    /// Tokens each sequence feeds in the next step (`None`: not in this step).
    pub fn plan(&self, wants: &[Want]) -> Vec<Option<usize>> {
        let mut budget = self.step_tokens;
        let mut plan = vec![None; wants.len()];
        let mut decoding = false;
        for (p, w) in plan.iter_mut().zip(wants) {
            if let Want::Decode(n) = *w {
                *p = Some(n);
                budget = budget.saturating_sub(n);
                decoding = true;
            }
        }
        if decoding {
            budget = budget.min(self.prompt_cap());
        }
        // Shortest prompt first: a short request arriving behind a long prompt is read in a
        // step or two instead of waiting for all of the long one (with the time cap on, that
        // would be minutes), and the long one loses only those tokens.
        let mut prompts: Vec<(usize, usize)> = wants
            .iter()
            .enumerate()
            .filter_map(|(i, w)| match *w {
                Want::Prompt(left) => Some((left, i)),
                Want::Decode(_) => None,
            })
            .collect();
        prompts.sort_by_key(|&(left, _)| left);
        for (left, i) in prompts {
            if budget == 0 {
                break;
            }
            let n = left.min(budget);
            plan[i] = Some(n);
            budget -= n;
        }
        plan
    }

    /// The most prompt tokens a step with decoding sequences takes.
    pub fn prompt_cap(&self) -> usize {
        let (Some(decode), Some(per_token)) = (self.decode_step_s, self.prompt_token_s) else {
            return self.step_tokens;
        };
        if self.max_slowdown <= 1.0 || per_token <= 0.0 {
            return self.step_tokens;
        }
        let room = (self.max_slowdown - 1.0) * decode / per_token;
        (room as usize).clamp(MIN_PROMPT_CHUNK, self.step_tokens.max(MIN_PROMPT_CHUNK))
    }

    /// Learns from a finished step: its decode and prompt tokens, and its wall time.
    pub fn observe(&mut self, decode_tokens: usize, prompt_tokens: usize, seconds: f64) {
        let ema = |old: Option<f64>, new: f64| Some(old.map_or(new, |o| o + EMA * (new - o)));
        if prompt_tokens == 0 {
            if decode_tokens > 0 {
                self.decode_step_s = ema(self.decode_step_s, seconds);
            }
            return;
        }
        // What the prompt tokens added to the pass the step would have cost anyway (without a
        // decode-only step measured yet, all of it: an overestimate, so smaller chunks).
        let base = self.decode_step_s.unwrap_or(0.0).min(seconds);
        self.prompt_token_s = ema(self.prompt_token_s, (seconds - base) / prompt_tokens as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Want::*;

    #[test]
    fn decoding_goes_first_then_the_shortest_prompts_within_the_budget() {
        let p = StepPlanner::new(256, 0.0);
        let plan = p.plan(&[Prompt(200), Decode(1), Prompt(100), Decode(3)]);
        assert_eq!(plan, vec![Some(152), Some(1), Some(100), Some(3)]);
        // A short prompt behind a long one is read first; budget spent, the rest waits.
        let plan = p.plan(&[Prompt(1000), Prompt(5)]);
        assert_eq!(plan, vec![Some(251), Some(5)]);
        let plan = p.plan(&[Prompt(300), Prompt(1000)]);
        assert_eq!(plan, vec![Some(256), None]);
    }

    #[test]
    fn the_time_cap_keeps_decode_steps_within_the_slowdown() {
        // A decode-only step takes 50 ms, a prompt token 4 ms: with 2x, 12 tokens fit, but
        // a chunk is at least one panel.
        let mut p = StepPlanner::new(256, 2.0);
        p.observe(4, 0, 0.050);
        assert_eq!(p.prompt_cap(), 256, "no prompt cost measured yet");
        p.observe(4, 256, 0.050 + 256.0 * 0.004);
        assert_eq!(p.prompt_cap(), MIN_PROMPT_CHUNK);
        // At 3x, 25 tokens.
        let mut q = StepPlanner::new(256, 3.0);
        q.observe(4, 0, 0.050);
        q.observe(4, 100, 0.050 + 100.0 * 0.004);
        assert_eq!(q.prompt_cap(), 25);
        assert_eq!(q.plan(&[Decode(1), Prompt(1000)]), vec![Some(1), Some(25)]);
        // With nothing decoding, a prompt reads at full speed.
        assert_eq!(q.plan(&[Prompt(1000)]), vec![Some(256)]);
    }

    #[test]
    fn the_prompt_cost_follows_the_steps() {
        // Stepping a long prompt next to a decoding stream whose per-token cost grows with
        // depth (attention): the chunks shrink as the tokens get dearer, and every step stays
        // within about the slowdown.
        let mut p = StepPlanner::new(256, 2.0);
        let decode = 0.040;
        p.observe(1, 0, decode);
        let mut left = 16_000usize;
        let mut worst: f64 = 0.0;
        let mut steps = 0;
        while left > 0 {
            let plan = p.plan(&[Decode(1), Prompt(left)]);
            let n = plan[1].unwrap();
            let depth = 16_000 - left;
            let per_token = 0.0010 + depth as f64 * 1.5e-7;
            let t = decode + n as f64 * per_token;
            if steps > 2 {
                worst = worst.max(t / decode);
            }
            p.observe(1, n, t);
            left -= n;
            steps += 1;
        }
        assert!(worst <= 2.0 + 0.5, "worst step {worst:.2}x a decode step");
        assert!(steps < 16_000 / 8, "{steps} steps: the chunks stayed tiny");
    }

    #[test]
    fn a_slowdown_of_one_or_less_is_off() {
        let mut p = StepPlanner::new(64, 1.0);
        p.observe(1, 0, 0.05);
        p.observe(1, 64, 1.0);
        assert_eq!(p.prompt_cap(), 64);
    }
}
