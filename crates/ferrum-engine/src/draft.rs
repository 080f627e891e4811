//! Draft-model speculative decoding: a small model with the same vocabulary (gpt-4.1-mini for
//! gpt-4.1) proposes the next few tokens of every decoding sequence, greedily, and the target
//! verifies them in its ordinary batched step, through the path predicted outputs use
//! ([`Sequence::sample_rows`](crate::generate::Sequence::sample_rows)): a proposal is kept while
//! the target's own sampling agrees with it, so the output is the target's, token for token, at
//! any temperature (a deterministic draft makes this exact rejection sampling).
//!
//! Each sequence has a cache in the draft model ([`DraftCache`]) that follows its context: the
//! draft reads the prompt alongside the target (at most a step's token budget per step), and
//! after a verification it rolls back to what the target kept. One proposal round is `k` small
//! forward passes of the draft, batched over the sequences, and one target pass of `k + 1`
//! rows; on a CPU that pays when the draft is several times cheaper than the target and agrees
//! with it most of the time (code, text the prompt already contains).

use std::sync::Arc;

use crate::engine::LoadedModel;
use crate::error::{EngineError, Result};
use crate::kernels::ThreadPool;
use crate::kv::KvCache;
use crate::model::transformer::{Logits, SeqInput, Workspace};
use crate::sampler::argmax;

/// Most proposals per round a draft may be configured for.
pub const MAX_DRAFT_TOKENS: usize = 16;

/// A draft model for a target, checked to share its vocabulary.
#[derive(Clone)]
pub struct Draft {
    model: Arc<LoadedModel>,
    /// Proposals per round (at most; the sequence adapts it down after rejections).
    tokens: usize,
    /// Ids the draft may propose: the vocabulary both models have logits for.
    vocab: usize,
}

impl std::fmt::Debug for Draft {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Draft")
            .field("path", &self.model.path)
            .field("tokens", &self.tokens)
            .finish()
    }
}

impl Draft {
    /// A draft of `tokens` proposals per round for `target`. The two tokenizers must be the same
    /// vocabulary (every id the same bytes), else proposals would be other tokens' ids.
    pub fn new(target: &LoadedModel, model: Arc<LoadedModel>, tokens: usize) -> Result<Draft> {
        let (a, b) = (&target.tokenizer, &model.tokenizer);
        let mismatch = if a.vocab_size() != b.vocab_size() {
            Some(format!(
                "vocabularies of {} and {} tokens",
                a.vocab_size(),
                b.vocab_size()
            ))
        } else {
            (0..a.vocab_size() as u32)
                .find(|&id| a.token_bytes(id) != b.token_bytes(id) || a.is_eog(id) != b.is_eog(id))
                .map(|id| {
                    format!(
                        "token {id} differs ({:?} vs {:?})",
                        a.token_str(id),
                        b.token_str(id)
                    )
                })
        };
        if let Some(why) = mismatch {
            return Err(EngineError::Internal(format!(
                "{} cannot draft for {}: the tokenizers differ ({why})",
                model.path.display(),
                target.path.display()
            )));
        }
        if tokens == 0 || tokens > MAX_DRAFT_TOKENS {
            return Err(EngineError::Internal(format!(
                "draft tokens must be between 1 and {MAX_DRAFT_TOKENS}, got {tokens}"
            )));
        }
        let vocab = a
            .vocab_size()
            .min(target.model.cfg.vocab_size)
            .min(model.model.cfg.vocab_size);
        Ok(Draft {
            model,
            tokens,
            vocab,
        })
    }

    /// Proposals per round.
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    pub fn model(&self) -> &LoadedModel {
        &self.model
    }
}

/// One sequence's state in the draft model: its cache and the tokens in it.
pub struct DraftCache {
    kv: KvCache,
    tokens: Vec<u32>,
}

impl DraftCache {
    /// An empty cache of the draft model for a sequence of up to `capacity` positions.
    pub fn new(draft: &Draft, capacity: usize) -> DraftCache {
        let capacity = capacity.min(draft.model.context_length);
        DraftCache {
            kv: draft.model.model.new_cache(capacity),
            tokens: Vec::new(),
        }
    }
}

/// What one sequence asks of the draft in a step.
pub struct DraftJob<'a> {
    pub cache: &'a mut DraftCache,
    /// The target's context (prompt and kept output), then the token it feeds next, if it is
    /// decoding.
    pub context: &'a [u32],
    pub pending: Option<u32>,
    /// Proposals wanted after `pending` (0 while the target still reads its prompt).
    pub k: usize,
    /// Filled in: the draft's greedy continuation after `pending`.
    pub proposals: Vec<u32>,
}

impl DraftJob<'_> {
    fn len(&self) -> usize {
        self.context.len() + usize::from(self.pending.is_some())
    }

    fn token(&self, i: usize) -> u32 {
        match self.context.get(i) {
            Some(&t) => t,
            None => self.pending.expect("index within len"),
        }
    }
}

/// Runs the draft model for the sequences of a step, with its own scratch buffers.
pub struct Drafter {
    draft: Draft,
    ws: Workspace,
}

impl Drafter {
    pub fn new(draft: Draft) -> Drafter {
        Drafter {
            draft,
            ws: Workspace::default(),
        }
    }

    pub fn draft(&self) -> &Draft {
        &self.draft
    }

    /// Brings each job's draft cache up to its context (reading at most `budget` tokens in all,
    /// earlier jobs first) and, for every job whose cache then holds its whole context and
    /// pending token, proposes up to `k` tokens: `k` batched draft passes of one token each (the
    /// first one also reading what the cache was missing).
    pub fn run(
        &mut self,
        pool: &ThreadPool,
        jobs: &mut [DraftJob<'_>],
        budget: usize,
    ) -> Result<()> {
        // Round 0: roll back to what the target kept, read what is missing.
        let mut budget = budget;
        let mut feeds: Vec<(usize, Vec<u32>, Logits)> = Vec::new();
        for (j, job) in jobs.iter_mut().enumerate() {
            job.proposals.clear();
            let len = job.len();
            let room = job.cache.kv.capacity().saturating_sub(job.k + 1);
            if len > room {
                // The draft's window is full: the sequence goes on without proposals.
                job.k = 0;
                continue;
            }
            // Keep the common prefix, but re-read at least one token when logits are wanted.
            let keep_max = if job.k > 0 { len - 1 } else { len };
            let common = (0..job.cache.tokens.len().min(keep_max))
                .take_while(|&i| job.cache.tokens[i] == job.token(i))
                .count();
            job.cache.tokens.truncate(common);
            job.cache.kv.truncate(common);
            let n = (len - common).min(budget);
            if n == 0 {
                if common < len {
                    job.k = 0;
                }
                continue;
            }
            budget -= n;
            let caught_up = common + n == len;
            if !caught_up {
                job.k = 0;
            }
            let mode = if caught_up && job.k > 0 {
                Logits::Last
            } else {
                Logits::None
            };
            feeds.push((
                j,
                (common..common + n).map(|i| job.token(i)).collect(),
                mode,
            ));
        }
        self.pass(pool, jobs, &feeds)?;
        // Rounds 1..k: feed the last proposal, propose the next.
        let rounds = jobs.iter().map(|j| j.k).max().unwrap_or(0);
        for r in 1..rounds {
            feeds.clear();
            for (j, job) in jobs.iter().enumerate() {
                if job.k > r && job.proposals.len() == r {
                    feeds.push((j, vec![job.proposals[r - 1]], Logits::Last));
                }
            }
            if feeds.is_empty() {
                break;
            }
            self.pass(pool, jobs, &feeds)?;
        }
        Ok(())
    }

    /// One batched draft pass over `feeds` (job index, tokens, logits); each job with logits
    /// gets the argmax as its next proposal.
    fn pass(
        &mut self,
        pool: &ThreadPool,
        jobs: &mut [DraftJob<'_>],
        feeds: &[(usize, Vec<u32>, Logits)],
    ) -> Result<()> {
        if feeds.is_empty() {
            return Ok(());
        }
        let model = &self.draft.model.model;
        let vocab = model.cfg.vocab_size;
        {
            // Borrow each job's cache once, in feed order (job indices are increasing).
            let mut caches: Vec<Option<&mut DraftCache>> =
                jobs.iter_mut().map(|j| Some(&mut *j.cache)).collect();
            let mut batch: Vec<SeqInput<'_>> = feeds
                .iter()
                .map(|(j, tokens, logits)| SeqInput {
                    kv: &mut caches[*j].take().expect("one feed per job").kv,
                    tokens,
                    logits: *logits,
                    // The draft proposes with its base weights; the target verifies with the
                    // sequence's adapter, so the output is the adapted model's.
                    adapter: None,
                    embeds: None,
                })
                .collect();
            model.forward_batch(pool, &mut self.ws, &mut batch)?;
        }
        let logits = self.ws.logits_mut();
        let mut row = 0;
        for (j, tokens, mode) in feeds {
            let job = &mut jobs[*j];
            job.cache.tokens.extend_from_slice(tokens);
            if *mode == Logits::Last {
                let l = &logits[row * vocab..row * vocab + self.draft.vocab];
                job.proposals.push(argmax(l));
                row += 1;
            }
        }
        Ok(())
    }
}
