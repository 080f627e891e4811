//! Proposals for speculative decoding from a predicted output (OpenAI's `prediction`): the
//! tokens the prediction says come next, found by matching the end of the output against it.
//!
//! The prediction is usually the text the answer will mostly repeat (a file being edited). The
//! cursor follows it while the output agrees; after a divergence (an edit), the last few output
//! tokens are looked up in the prediction again (an n-gram match, longest first, nearest after the
//! cursor first) and proposals resume from there. Proposals only cost a little compute when they
//! are wrong: the engine verifies them with the model and keeps the ones sampling agrees with.
//!
//! Edits repeat (a rename changes every occurrence): when the output re-aligns after a
//! divergence, the short stretch of prediction it replaced and what replaced it are learned as a
//! substitution and applied to the rest of the prediction, so the next occurrence is proposed
//! as the output will write it.

/// The longest n-gram of recent output used to re-align with the prediction.
const MAX_NGRAM: usize = 4;
/// Longest replaced stretch of prediction, and replacement, learned as a substitution.
const MAX_SUBSTITUTION: usize = 8;

/// A tokenized prediction and where the output stands in it.
#[derive(Clone, Debug, Default)]
pub struct Prediction {
    tokens: Vec<u32>,
    /// The index in `tokens` of the token expected next; `None` when not aligned.
    cursor: Option<usize>,
    /// The last aligned position, where re-alignment looks first.
    anchor: usize,
    /// Where the current divergence began: (prediction index expected, output index).
    diverged: Option<(usize, usize)>,
}

impl Prediction {
    pub fn new(tokens: Vec<u32>) -> Prediction {
        let cursor = (!tokens.is_empty()).then_some(0);
        Prediction {
            tokens,
            cursor,
            anchor: 0,
            diverged: None,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Records the token the output just got; `output` is the whole output so far (ending with
    /// it).
    pub fn advance(&mut self, output: &[u32]) {
        let Some(&last) = output.last() else {
            return;
        };
        self.cursor = match self.cursor {
            Some(c) if self.tokens.get(c) == Some(&last) => Some(c + 1),
            Some(c) => {
                self.diverged = Some((c, output.len() - 1));
                self.realign(output)
            }
            None => self.realign(output),
        };
        if let Some(c) = self.cursor {
            self.anchor = c;
        }
    }

    /// Where the prediction continues the end of `output`: after the longest of its last
    /// `MAX_NGRAM` tokens found in the prediction, the match nearest after the old cursor (or
    /// the first) winning among equally long ones.
    fn realign(&mut self, output: &[u32]) -> Option<usize> {
        let end = self.find(output)?;
        self.learn(output, end);
        Some(end)
    }

    /// After re-aligning at `end` (the prediction index after the matched n-gram), learns the
    /// edit of the divergence just closed and applies it to the rest of the prediction.
    fn learn(&mut self, output: &[u32], end: usize) {
        let Some((from, out_start)) = self.diverged.take() else {
            return;
        };
        // The matched n-gram: the output's tail equal to the prediction before `end`.
        let n = (1..=MAX_NGRAM.min(output.len()).min(end))
            .rev()
            .find(|&n| output[output.len() - n..] == self.tokens[end - n..end])
            .unwrap_or(0);
        let (replaced_end, out_end) = (end - n, output.len() - n);
        if replaced_end <= from || out_end <= out_start {
            return;
        }
        let replaced = self.tokens[from..replaced_end].to_vec();
        let by = &output[out_start..out_end];
        if replaced.len() > MAX_SUBSTITUTION || by.len() > MAX_SUBSTITUTION {
            return;
        }
        let rest = &self.tokens[end..];
        let mut rewritten = Vec::with_capacity(rest.len());
        let mut i = 0;
        while i < rest.len() {
            if rest[i..].starts_with(&replaced) {
                rewritten.extend_from_slice(by);
                i += replaced.len();
            } else {
                rewritten.push(rest[i]);
                i += 1;
            }
        }
        self.tokens.truncate(end);
        self.tokens.extend(rewritten);
    }

    fn find(&self, output: &[u32]) -> Option<usize> {
        let from = self.cursor.unwrap_or(self.anchor);
        for n in (1..=MAX_NGRAM.min(output.len())).rev() {
            let gram = &output[output.len() - n..];
            let ends = self
                .tokens
                .windows(n)
                .enumerate()
                .filter(|(_, w)| *w == gram)
                .map(|(i, _)| i + n);
            let best = ends.min_by_key(|&end| (end < from, end.abs_diff(from)));
            if let Some(end) = best {
                // A single token matches too easily to jump far on: only near the cursor.
                if n > 1 || end.abs_diff(from) <= 8 {
                    return Some(end);
                }
            }
        }
        None
    }

    /// Up to `k` tokens the prediction expects next.
    pub fn propose(&self, k: usize) -> &[u32] {
        match self.cursor {
            Some(c) if c < self.tokens.len() => &self.tokens[c..(c + k).min(self.tokens.len())],
            _ => &[],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Prediction;

    fn run(pred: &[u32], output: &[u32], k: usize) -> Vec<Vec<u32>> {
        let mut p = Prediction::new(pred.to_vec());
        let mut proposals = vec![p.propose(k).to_vec()];
        for i in 1..=output.len() {
            p.advance(&output[..i]);
            proposals.push(p.propose(k).to_vec());
        }
        proposals
    }

    #[test]
    fn follows_an_exact_prediction() {
        let props = run(&[1, 2, 3, 4, 5], &[1, 2, 3], 2);
        assert_eq!(props, [vec![1, 2], vec![2, 3], vec![3, 4], vec![4, 5]]);
    }

    #[test]
    fn realigns_after_an_edit() {
        // The output replaces token 3 by 9 9, then goes on with the prediction.
        let pred = [1, 2, 3, 4, 5, 6, 7];
        let out = [1, 2, 9, 9, 4, 5];
        let props = run(&pred, &out, 3);
        // After "9 9" nothing matches; after "4" the cursor is back (single token, near).
        assert_eq!(props[4], Vec::<u32>::new());
        assert_eq!(props[5], vec![5, 6, 7]);
        assert_eq!(props[6], vec![6, 7]);
    }

    #[test]
    fn longer_ngrams_win_and_far_single_tokens_do_not_jump() {
        let pred = [5, 1, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3, 1, 2, 7, 8];
        let mut p = Prediction::new(pred.to_vec());
        p.advance(&[3, 1, 2]);
        assert_eq!(
            p.propose(2),
            [7, 8],
            "the 3-gram 3 1 2 beats the 2-gram 1 2"
        );
        let mut q = Prediction::new(vec![0; 20].into_iter().chain([4, 6]).collect());
        q.advance(&[9, 4]);
        assert!(
            q.propose(1).is_empty(),
            "a lone token far from the cursor does not realign"
        );
    }

    #[test]
    fn a_repeated_edit_is_learned() {
        // "a X b ... a X b": the output writes "a Y Z b" the first time; the second X is then
        // proposed as Y Z.
        let pred = [1, 10, 2, 3, 4, 5, 1, 10, 2, 6];
        let out = [1, 20, 21, 2, 3, 4, 5, 1];
        let mut p = Prediction::new(pred.to_vec());
        for i in 1..=out.len() {
            p.advance(&out[..i]);
        }
        assert_eq!(p.propose(4), [20, 21, 2, 6]);
    }

    #[test]
    fn an_empty_prediction_proposes_nothing() {
        let mut p = Prediction::new(Vec::new());
        p.advance(&[1]);
        assert!(p.is_empty() && p.propose(4).is_empty());
    }
}
