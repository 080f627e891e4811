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
//! planner spends the difference on prompt tokens at their measured cost.
//!
//! A prompt token's cost is its matmuls, the same at every position, plus its attention, which
//! grows with its depth; so the planner counts a token at depth `d` as `1 + d / D` units of
//! work, where `D` (`depth_scale`, from the model's shape) is the depth at which a token's
//! attention does as many FLOPs as its matmuls. The two costs, seconds per decode-only step and
//! per prompt unit, are running averages of the steps just taken. Counting depth matters: with
//! a cost per token instead, a step of a short new prompt (cheap tokens) made the estimate fall
//! and the next chunk of a long prompt, 16k deep, take several times its share.
//!
//! A prompt keeps moving: at least [`MIN_PROMPT_CHUNK`] tokens per step, and the tokens that
//! fill the step's last GEMM panel when they cost about what the cap allows; with no sequence
//! decoding, the time cap does not apply and prompts read at full speed.

/// The fewest prompt tokens the time cap leaves in a step while sequences decode, so that a
/// long prompt keeps moving: deep in it a token's attention alone costs a good part of a decode
/// step (mini at 16k positions: ~13 ms against a 22 ms step of 4 streams on 2 cores), so there
/// this floor, not the cap, sets the step. Where the cap leaves about a panel's worth anyway
/// (within half again), the step takes the tokens that fill its last GEMM panel (16 rows,
/// [`crate::kernels::gemm::LANES`], see [`prompt_floor`]): the GEMM reads the weights once per
/// panel, so 4 decoding tokens and 12 prompt tokens cost little more than 4 and 8, and half
/// of 4 and 16. Measured with 4 mini streams and a 16k-token prompt in docs/benchmarks.md,
/// "Fairness".
pub const MIN_PROMPT_CHUNK: usize = 4;

/// Rows of one GEMM panel.
const PANEL: usize = crate::kernels::gemm::LANES;

/// Weight of the newest step in the running averages.
const EMA: f64 = 0.25;

/// What a running sequence wants to feed next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Want {
    /// Decoding: its next token (and any predicted ones to verify after it).
    Decode(usize),
    /// Reading its prompt: `left` prompt tokens are left, and the next one goes at position
    /// `depth`.
    Prompt { left: usize, depth: usize },
}

/// Plans steps and learns what they cost.
#[derive(Clone, Debug)]
pub struct StepPlanner {
    step_tokens: usize,
    /// How much longer than a decode-only step a step with prompt tokens may take while
    /// sequences decode; 0 (or anything not above 1) turns the time cap off.
    max_slowdown: f64,
    /// The depth at which a prompt token's attention costs as much as the rest of it.
    depth_scale: f64,
    /// Seconds of a step with no prompt tokens.
    decode_step_s: Option<f64>,
    /// Seconds each unit of prompt work adds to a step.
    prompt_unit_s: Option<f64>,
}

impl StepPlanner {
    pub fn new(step_tokens: usize, max_slowdown: f64, depth_scale: f64) -> Self {
        StepPlanner {
            step_tokens: step_tokens.max(1),
            max_slowdown,
            depth_scale: depth_scale.max(1.0),
            decode_step_s: None,
            prompt_unit_s: None,
        }
    }

    /// Units of work of `n` prompt tokens from position `depth` (see the module doc).
    pub fn units(&self, n: usize, depth: usize) -> f64 {
        let (n, d) = (n as f64, depth as f64);
        n + (n * d + n * (n - 1.0) / 2.0) / self.depth_scale
    }

    /// The most tokens from position `depth` that fit in `room` units.
    fn fitting(&self, room: f64, depth: usize) -> usize {
        // n^2 / 2D + n (1 + (d - 1/2) / D) <= room
        let a = 0.5 / self.depth_scale;
        let b = 1.0 + (depth as f64 - 0.5) / self.depth_scale;
        let n = (-b + (b * b + 4.0 * a * room.max(0.0)).sqrt()) / (2.0 * a);
        n.max(0.0).floor() as usize
    }

    /// Tokens each sequence feeds in the next step (`None`: not in this step).
    pub fn plan(&self, wants: &[Want]) -> Vec<Option<usize>> {
        let mut budget = self.step_tokens;
        let mut plan = vec![None; wants.len()];
        let mut decode_rows = 0;
        for (p, w) in plan.iter_mut().zip(wants) {
            if let Want::Decode(n) = *w {
                *p = Some(n);
                budget = budget.saturating_sub(n);
                decode_rows += n;
            }
        }
        // The time left for prompt work (units), while sequences decode.
        let mut room = match self.prompt_room() {
            Some(room) if decode_rows > 0 => room,
            _ => f64::INFINITY,
        };
        // The step's prompt tokens: at least a few, and those that fill the step's last GEMM
        // panel where they cost about what the cap allows (see [`MIN_PROMPT_CHUNK`]).
        let (mut fill, mut least) = if decode_rows > 0 {
            (prompt_floor(decode_rows), MIN_PROMPT_CHUNK)
        } else {
            (0, 0)
        };
        // Shortest prompt first: a short request arriving behind a long prompt is read in a
        // step or two instead of waiting for all of the long one (with the time cap on, that
        // would be minutes), and the long one loses only those tokens.
        let mut prompts: Vec<(usize, usize, usize)> = wants
            .iter()
            .enumerate()
            .filter_map(|(i, w)| match *w {
                Want::Prompt { left, depth } => Some((left, depth, i)),
                Want::Decode(_) => None,
            })
            .collect();
        prompts.sort_by_key(|&(left, _, _)| left);
        for (left, depth, i) in prompts {
            if budget == 0 {
                break;
            }
            let fits = if room.is_finite() {
                let cap = self.fitting(room, depth);
                if fill <= cap + cap / 2 {
                    cap.max(fill)
                } else {
                    cap.max(least)
                }
            } else {
                usize::MAX
            };
            let n = left.min(budget).min(fits);
            if n == 0 {
                continue;
            }
            plan[i] = Some(n);
            budget -= n;
            fill = fill.saturating_sub(n);
            least = least.saturating_sub(n);
            room -= self.units(n, depth);
        }
        plan
    }

    /// The units of prompt work a step with decoding sequences may add (`None`: no cap).
    fn prompt_room(&self) -> Option<f64> {
        let (Some(decode), Some(per_unit)) = (self.decode_step_s, self.prompt_unit_s) else {
            return None;
        };
        if self.max_slowdown <= 1.0 || per_unit <= 0.0 {
            return None;
        }
        Some((self.max_slowdown - 1.0) * decode / per_unit)
    }

    /// Learns from a finished step: its decode tokens, its units of prompt work (see
    /// [`StepPlanner::units`]) and its wall time.
    pub fn observe(&mut self, decode_tokens: usize, prompt_units: f64, seconds: f64) {
        let ema = |old: Option<f64>, new: f64| Some(old.map_or(new, |o| o + EMA * (new - o)));
        if prompt_units <= 0.0 {
            if decode_tokens > 0 {
                self.decode_step_s = ema(self.decode_step_s, seconds);
            }
            return;
        }
        // What the prompt tokens added to the pass the step would have cost anyway (without a
        // decode-only step measured yet, all of it: an overestimate, so smaller chunks).
        let base = self.decode_step_s.unwrap_or(0.0).min(seconds);
        self.prompt_unit_s = ema(self.prompt_unit_s, (seconds - base) / prompt_units);
    }
}

/// The fewest prompt tokens a step with `decode_rows` decoding tokens takes: those that fill its
/// last GEMM panel, at least [`MIN_PROMPT_CHUNK`].
pub fn prompt_floor(decode_rows: usize) -> usize {
    let fill = PANEL - decode_rows % PANEL;
    if fill < MIN_PROMPT_CHUNK {
        fill + PANEL
    } else {
        fill
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Want::*;

    fn prompt(left: usize) -> Want {
        Prompt { left, depth: 0 }
    }

    #[test]
    fn decoding_goes_first_then_the_shortest_prompts_within_the_budget() {
        let p = StepPlanner::new(256, 0.0, 1e4);
        let plan = p.plan(&[prompt(200), Decode(1), prompt(100), Decode(3)]);
        assert_eq!(plan, vec![Some(152), Some(1), Some(100), Some(3)]);
        // A short prompt behind a long one is read first; budget spent, the rest waits.
        let plan = p.plan(&[prompt(1000), prompt(5)]);
        assert_eq!(plan, vec![Some(251), Some(5)]);
        let plan = p.plan(&[prompt(300), prompt(1000)]);
        assert_eq!(plan, vec![Some(256), None]);
    }

    #[test]
    fn a_token_costs_more_the_deeper_it_is() {
        let p = StepPlanner::new(256, 2.0, 1000.0);
        assert_eq!(p.units(1, 0), 1.0);
        assert_eq!(p.units(1, 1000), 2.0);
        // 10 tokens from 2000: 10 + (2000 + ... + 2009) / 1000.
        assert!((p.units(10, 2000) - (10.0 + 20.045)).abs() < 1e-9);
        for (room, depth) in [(0.0, 0), (1.0, 0), (7.5, 0), (30.0, 2000), (100.0, 50_000)] {
            let n = p.fitting(room, depth);
            assert!(
                p.units(n, depth) <= room + 1e-9,
                "{n} tokens at {depth} exceed {room}"
            );
            assert!(
                p.units(n + 1, depth) > room,
                "{} tokens at {depth} fit {room}",
                n + 1
            );
        }
    }

    #[test]
    fn the_time_cap_keeps_decode_steps_within_the_slowdown() {
        // A decode-only step takes 50 ms, a unit of prompt work 2 ms: with 2x, 25 units fit
        // (24 tokens at the start of a prompt, with their own depths; 12 at depth D), and the
        // floor fills the panel.
        let mut p = StepPlanner::new(256, 2.0, 1000.0);
        p.observe(4, 0.0, 0.050);
        let long = |depth| Prompt {
            left: 100_000,
            depth,
        };
        assert_eq!(
            p.plan(&[Decode(1), long(0)]),
            vec![Some(1), Some(256 - 1)],
            "no prompt cost measured yet"
        );
        p.observe(4, 256.0, 0.050 + 256.0 * 0.002);
        assert_eq!(p.plan(&[Decode(1), long(0)]), vec![Some(1), Some(24)]);
        assert_eq!(p.plan(&[Decode(1), long(1000)]), vec![Some(1), Some(15)]);
        assert_eq!(p.plan(&[Decode(4), long(1000)]), vec![Some(4), Some(12)]);
        // Deep, where not a token fits, the floor; filling the panel would cost 12 tokens
        // of 51 units each.
        assert_eq!(
            p.plan(&[Decode(4), long(50_000)]),
            vec![Some(4), Some(MIN_PROMPT_CHUNK)]
        );
        // A short prompt first; the floor is for the step, so here the long one waits.
        assert_eq!(
            p.plan(&[Decode(4), long(50_000), Prompt { left: 5, depth: 0 }]),
            vec![Some(4), None, Some(5)]
        );
        // Where the cap leaves 10 tokens, filling the panel takes 12; where it leaves 7, not.
        assert_eq!(p.plan(&[Decode(4), long(1500)]), vec![Some(4), Some(12)]);
        assert_eq!(p.plan(&[Decode(4), long(2500)]), vec![Some(4), Some(7)]);
        // With nothing decoding, a prompt reads at full speed.
        assert_eq!(p.plan(&[long(50_000)]), vec![Some(256)]);
    }

    #[test]
    fn a_cheap_step_does_not_make_a_deep_chunk_dear() {
        // Measured in units, a step of a short new prompt (shallow, cheap tokens) and a step
        // of a long prompt's deep chunk give the same estimate, so the next deep chunk keeps
        // its size.
        let mut p = StepPlanner::new(256, 2.0, 1000.0);
        p.observe(4, 0.0, 0.050);
        let unit = 0.001;
        p.observe(4, p.units(12, 16_000), 0.050 + p.units(12, 16_000) * unit);
        let deep = p.plan(&[
            Decode(4),
            Prompt {
                left: 9000,
                depth: 16_000,
            },
        ]);
        p.observe(4, p.units(12, 0), 0.050 + p.units(12, 0) * unit);
        assert_eq!(
            p.plan(&[
                Decode(4),
                Prompt {
                    left: 9000,
                    depth: 16_000
                }
            ]),
            deep
        );
    }

    #[test]
    fn the_prompt_cost_follows_the_steps() {
        // Stepping a long prompt next to a decoding stream whose per-token cost grows with
        // depth faster than the planner's model (attention, with a depth scale off by 2x):
        // the chunks shrink as the tokens get dearer, and every step stays within about the
        // slowdown.
        let mut p = StepPlanner::new(256, 2.0, 15_000.0);
        let decode = 0.040;
        p.observe(1, 0.0, decode);
        let mut left = 16_000usize;
        let mut worst: f64 = 0.0;
        let mut steps = 0;
        while left > 0 {
            let depth = 16_000 - left;
            let plan = p.plan(&[Decode(1), Prompt { left, depth }]);
            let n = plan[1].unwrap();
            let per_token = 0.0010 + (depth as f64 + n as f64 / 2.0) * 1.5e-7;
            let t = decode + n as f64 * per_token;
            if steps > 2 {
                worst = worst.max(t / decode);
            }
            p.observe(1, p.units(n, depth), t);
            left -= n;
            steps += 1;
        }
        assert!(worst <= 2.0 + 0.5, "worst step {worst:.2}x a decode step");
        assert!(steps < 16_000 / 8, "{steps} steps: the chunks stayed tiny");
    }

    #[test]
    fn the_floor_fills_the_last_panel() {
        assert_eq!(prompt_floor(0), 16);
        assert_eq!(prompt_floor(4), 12);
        assert_eq!(prompt_floor(12), 4);
        assert_eq!(prompt_floor(13), 19);
        assert_eq!(prompt_floor(16), 16);
        assert_eq!(prompt_floor(20), 12);
        for d in 0..64 {
            let f = prompt_floor(d);
            assert!(
                f >= MIN_PROMPT_CHUNK && (d + f).is_multiple_of(PANEL),
                "{d} + {f}"
            );
        }
    }

    #[test]
    fn a_slowdown_of_one_or_less_is_off() {
        let mut p = StepPlanner::new(64, 1.0, 1e4);
        p.observe(1, 0.0, 0.05);
        p.observe(1, 64.0, 1.0);
        assert_eq!(p.plan(&[Decode(1), prompt(1000)]), vec![Some(1), Some(63)]);
    }
}
