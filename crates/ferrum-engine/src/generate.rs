//! The generation loop of one sequence: prefill the prompt in chunks, then sample token by token
//! until an end-of-generation token, a stop sequence or the token limit, streaming text deltas
//! that never split a UTF-8 character or leak the start of a stop sequence.

use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use crate::constraint::Constraint;
use crate::error::{EngineError, Result};
use crate::kernels::ThreadPool;
use crate::kv::KvCache;
use crate::model::transformer::{Logits, Transformer, Workspace};
use crate::sampler::{Sampler, SamplingParams};
use crate::speculative::Prediction;
use crate::tokenizer::{StreamDecoder, Tokenizer};

/// Proposals verified per step when a prediction is followed (it adapts: doubled after a step
/// that accepted all, cut back after a rejection). Each proposal is a row of the forward pass:
/// cheap next to reading the weights on a CPU, but not free, so a rejected run costs time.
const FIRST_DRAFT: usize = 8;
const MAX_DRAFT: usize = 16;
const MIN_DRAFT: usize = 2;

/// What to generate.
#[derive(Clone, Debug)]
pub struct GenerateParams {
    pub max_tokens: usize,
    pub stop: Vec<String>,
    pub sampling: SamplingParams,
    /// Keep going past end-of-generation tokens (benchmarks).
    pub ignore_eos: bool,
    /// A grammar the output must match (JSON mode, JSON Schema).
    pub constraint: Option<Constraint>,
    /// Predicted output tokens (OpenAI `prediction`): proposals verified several per step.
    /// They change the speed only, never the output.
    pub prediction: Vec<u32>,
}

impl Default for GenerateParams {
    fn default() -> Self {
        GenerateParams {
            max_tokens: 256,
            stop: Vec::new(),
            sampling: SamplingParams::default(),
            ignore_eos: false,
            constraint: None,
            prediction: Vec::new(),
        }
    }
}

/// Why generation ended (OpenAI `finish_reason`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-generation token or a stop sequence.
    Stop,
    /// `max_tokens` or the context window was reached.
    Length,
    /// The caller asked to stop (e.g. the client went away).
    Cancelled,
}

/// One generated token, as streamed to the caller.
#[derive(Clone, Debug)]
pub struct TokenEvent {
    pub id: u32,
    /// Text that became final with this token (may be empty while a character or a possible
    /// stop sequence is incomplete).
    pub text: String,
    pub logprob: Option<f32>,
    pub top: Vec<(u32, f32)>,
}

/// The result of a generation.
#[derive(Clone, Debug)]
pub struct Completion {
    pub text: String,
    pub tokens: Vec<u32>,
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
    /// Prompt tokens whose keys and values were reused from the session's previous turn.
    pub cached_tokens: usize,
    pub prefill_time: Duration,
    pub decode_time: Duration,
    /// Predicted tokens that were verified and kept.
    pub accepted_prediction_tokens: usize,
    /// Predicted tokens that were verified and rejected (computed, then thrown away).
    pub rejected_prediction_tokens: usize,
}

/// The per-conversation state a model lends itself: KV cache, its tokens, scratch buffers.
pub struct Session {
    pub kv: KvCache,
    tokens: Vec<u32>,
    ws: Workspace,
}

impl Session {
    pub fn new(model: &Transformer, context_length: usize) -> Self {
        Session {
            kv: model.new_cache(context_length),
            tokens: Vec::new(),
            ws: Workspace::default(),
        }
    }

    /// A session over a given cache that holds the keys and values of `tokens`.
    pub fn with_cache(kv: KvCache, tokens: &[u32]) -> Self {
        debug_assert_eq!(kv.len(), tokens.len());
        Session {
            kv,
            tokens: tokens.to_vec(),
            ws: Workspace::default(),
        }
    }

    /// Forgets everything cached.
    pub fn reset(&mut self) {
        self.kv.truncate(0);
        self.tokens.clear();
    }

    /// The tokens whose keys and values are in the cache.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// How many leading tokens of `prompt` this session could reuse (at least one prompt token
    /// must remain to be run, to get logits).
    pub fn common_prefix(&self, prompt: &[u32]) -> usize {
        self.tokens
            .iter()
            .zip(prompt)
            .take_while(|(a, b)| a == b)
            .count()
            .min(prompt.len().saturating_sub(1))
    }

    /// Keeps the longest cached prefix of `prompt` and returns its length.
    fn reuse_prefix(&mut self, prompt: &[u32]) -> usize {
        let common = self.common_prefix(prompt);
        self.kv.truncate(common);
        self.tokens.truncate(common);
        common
    }

    /// Records that `tokens` were run into the cache.
    fn extend(&mut self, tokens: &[u32]) {
        self.tokens.extend_from_slice(tokens);
    }

    /// Forgets the positions from `len` on (rejected proposals).
    fn truncate(&mut self, len: usize) {
        self.kv.truncate(len);
        self.tokens.truncate(len);
    }
}

/// One sequence being generated, as a state machine a scheduler steps: feed it the tokens
/// [`next_input`](Self::next_input) asks for, tell it they were run
/// ([`fed`](Self::fed)), and when they produced logits let it [`sample`](Self::sample). Its
/// keys and values live in a [`Session`] the caller keeps beside it.
pub struct Sequence<'m> {
    tokenizer: &'m Tokenizer,
    /// The tokens whose keys and values the session must hold: the prompt, then every
    /// generated token that was fed back.
    context: Vec<u32>,
    prompt_len: usize,
    params: GenerateParams,
    cached: usize,
    /// Leading tokens of `context` whose keys and values are in the session.
    fed: usize,
    sampler: Sampler,
    text: TextStream<'m>,
    tokens: Vec<u32>,
    /// The last sampled token, to be fed next.
    pending: Option<u32>,
    /// With a prediction: the next input, `pending` and then the proposals to verify.
    spec: Vec<u32>,
    prediction: Prediction,
    /// Proposals per step (adaptive).
    draft_len: usize,
    /// Whether the proposals in `spec` come from a draft model (not from the prediction).
    drafted: bool,
    /// Predicted tokens kept and rejected (reported and billed).
    accepted: usize,
    rejected: usize,
    /// Draft-model proposals kept and rejected (internal: neither reported nor billed).
    draft_accepted: usize,
    draft_rejected: usize,
    /// Positions the session's cache can hold.
    capacity: usize,
    started: Instant,
    prefill_time: Option<Duration>,
    finish: Option<FinishReason>,
}

impl<'m> Sequence<'m> {
    /// Starts a sequence on `session`, reusing the longest prefix of `prompt` it has cached.
    pub fn start(
        tokenizer: &'m Tokenizer,
        session: &mut Session,
        prompt: Vec<u32>,
        params: GenerateParams,
    ) -> Result<Self> {
        if prompt.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        let max = session.kv.capacity();
        if prompt.len() + 1 > max {
            return Err(EngineError::ContextLengthExceeded {
                requested: prompt.len() + params.max_tokens,
                max,
            });
        }
        let cached = session.reuse_prefix(&prompt);
        let stop = params.stop.clone();
        let prediction = Prediction::new(params.prediction.clone());
        Ok(Sequence {
            tokenizer,
            sampler: Sampler::new(params.sampling.clone()),
            text: TextStream::new(tokenizer, stop),
            prompt_len: prompt.len(),
            context: prompt,
            params,
            cached,
            fed: cached,
            tokens: Vec::new(),
            pending: None,
            spec: Vec::new(),
            prediction,
            draft_len: FIRST_DRAFT,
            drafted: false,
            accepted: 0,
            rejected: 0,
            draft_accepted: 0,
            draft_rejected: 0,
            capacity: max,
            started: Instant::now(),
            prefill_time: None,
            finish: None,
        })
    }

    /// The tokens to run next (at most `budget` context tokens, or the one sampled token), and
    /// whether that pass must produce logits. Empty once the sequence is finished.
    pub fn next_input(&self, budget: usize) -> (&[u32], Logits) {
        if self.finish.is_some() {
            return (&[], Logits::None);
        }
        if self.fed < self.context.len() {
            let end = (self.fed + budget.max(1)).min(self.context.len());
            // The end of the prompt needs logits to sample from; the end of a context being
            // recomputed after preemption does not (its next token is already chosen).
            let mode = if end == self.context.len() && self.pending.is_none() {
                Logits::Last
            } else {
                Logits::None
            };
            return (&self.context[self.fed..end], mode);
        }
        match &self.pending {
            // The sampled token and the predicted ones after it: logits for every position.
            Some(_) if self.spec.len() > 1 => (&self.spec, Logits::All),
            Some(tok) => (std::slice::from_ref(tok), Logits::Last),
            None => (&[], Logits::None),
        }
    }

    /// Tokens generated so far.
    pub fn generated(&self) -> usize {
        self.tokens.len()
    }

    /// Tokens the next decoding step runs: the sampled token and its proposals, if any.
    pub fn decode_len(&self) -> usize {
        self.spec.len().max(1)
    }

    /// Whether context (prompt, or tokens to recompute) is still being read.
    pub fn is_prefilling(&self) -> bool {
        self.finish.is_none() && self.fed < self.context.len()
    }

    /// Context tokens not yet run.
    pub fn prompt_left(&self) -> usize {
        self.context.len() - self.fed
    }

    /// The tokens the session must hold before decoding can go on.
    pub fn context(&self) -> &[u32] {
        &self.context
    }

    /// Records that the first `n` tokens of the last [`next_input`](Self::next_input) were
    /// run into `session`.
    pub fn fed(&mut self, session: &mut Session, n: usize) {
        if self.fed < self.context.len() {
            session.extend(&self.context[self.fed..self.fed + n]);
            self.fed += n;
        } else if let Some(tok) = self.pending.take() {
            // With proposals, all of them are in the cache now; `sample_rows` keeps those
            // sampling agrees with and drops the rest.
            if n > 1 {
                session.extend(&self.spec[..n]);
            } else {
                session.extend(&[tok]);
            }
            self.context.push(tok);
            self.fed += 1;
        }
    }

    /// Preemption: the session was taken away; the context will be recomputed on `session`
    /// (which may hold a prefix of it) before decoding goes on. The output does not change:
    /// recomputed keys and values are the same numbers, and the sampler keeps its state.
    pub fn resume(&mut self, session: &mut Session) {
        self.fed = session.reuse_prefix(&self.context);
    }

    /// Samples from each row of logits of the last input (one row, or one per position when
    /// proposals were run), in order, like one row per step: a proposal is kept while the
    /// token sampled before it equals it; the first sampled token that differs is the next
    /// input. Call [`rollback`](Self::rollback) after it to drop the proposals that were not
    /// kept from the cache. The tokens, and the random draws
    /// that produce them, are exactly those of decoding one token per step (speculative
    /// decoding with a deterministic draft: a proposal is accepted with the probability the
    /// model gives it, and a rejection samples from the model's distribution without it).
    pub fn sample_rows(&mut self, logits: &mut [f32], vocab: usize) -> Vec<TokenEvent> {
        let rows = logits.len() / vocab.max(1);
        if rows <= 1 {
            let events = self.sample_one(self.fed, logits);
            self.prepare_proposals();
            return events;
        }
        let spec = std::mem::take(&mut self.spec);
        let proposals = &spec[1..rows.min(spec.len())];
        let mut events = Vec::new();
        let mut kept = 0;
        for (r, row) in logits.chunks_exact_mut(vocab).enumerate() {
            events.extend(self.sample_one(self.fed, row));
            match self.pending {
                Some(t) if r < proposals.len() && t == proposals[r] => {
                    // Its keys and values are already in the cache: it is context now.
                    self.pending = None;
                    self.context.push(t);
                    self.fed += 1;
                    kept += 1;
                }
                _ => break,
            }
        }
        if self.drafted {
            self.draft_accepted += kept;
            self.draft_rejected += proposals.len() - kept;
        } else {
            self.accepted += kept;
            self.rejected += proposals.len() - kept;
        }
        self.draft_len = if kept == proposals.len() {
            (self.draft_len * 2).min(MAX_DRAFT)
        } else {
            (kept * 2).clamp(MIN_DRAFT, MAX_DRAFT)
        };
        self.prepare_proposals();
        events
    }

    /// Drops the keys and values of rejected proposals from the session (a no-op otherwise).
    pub fn rollback(&self, session: &mut Session) {
        if session.kv.len() > self.fed {
            session.truncate(self.fed);
        }
    }

    /// With a prediction, the next step's input: the pending token and the proposals after it
    /// (no more than the token limit and the cache can still take).
    fn prepare_proposals(&mut self) {
        self.spec.clear();
        self.drafted = false;
        if self.pending.is_none() || self.prediction.is_empty() {
            return;
        }
        let proposals = self.prediction.propose(self.proposal_room());
        if let (Some(p), false) = (self.pending, proposals.is_empty()) {
            self.spec.push(p);
            self.spec.extend_from_slice(proposals);
        }
    }

    /// Proposals the next step may verify: the adaptive draft length, within the token limit
    /// and the cache's room.
    pub fn proposal_room(&self) -> usize {
        self.params
            .max_tokens
            .saturating_sub(self.tokens.len() + 1)
            .min(self.capacity.saturating_sub(self.fed + 2))
            .min(self.draft_len)
    }

    /// Whether a draft model should follow this sequence: it has no prediction of its own
    /// (the prediction's proposals are free; a draft's are not) and it is not finished.
    pub fn wants_draft(&self) -> bool {
        self.finish.is_none() && self.prediction.is_empty()
    }

    /// The sampled token the next step feeds, once the context is all read.
    pub fn pending_token(&self) -> Option<u32> {
        self.pending.filter(|_| !self.is_prefilling())
    }

    /// Sets a draft model's proposals for the next step, to follow the pending token.
    pub fn set_draft(&mut self, proposals: &[u32]) {
        self.spec.clear();
        self.drafted = true;
        let proposals = &proposals[..proposals.len().min(self.proposal_room())];
        if let (Some(p), false) = (self.pending_token(), proposals.is_empty()) {
            self.spec.push(p);
            self.spec.extend_from_slice(proposals);
        }
    }

    /// Takes the grammar constraint out (to prepare its mask on another thread while the
    /// sequence's tokens are in the forward pass); [`put_constraint`](Self::put_constraint)
    /// gives it back before sampling.
    pub fn take_constraint(&mut self) -> Option<Constraint> {
        self.params.constraint.take()
    }

    pub fn put_constraint(&mut self, c: Constraint) {
        self.params.constraint = Some(c);
    }

    /// Draft-model proposals kept and rejected so far.
    pub fn draft_counts(&self) -> (usize, usize) {
        (self.draft_accepted, self.draft_rejected)
    }

    /// One token from one row of logits, the cache holding `kv_len` positions before it.
    fn sample_one(&mut self, kv_len: usize, logits: &mut [f32]) -> Vec<TokenEvent> {
        if self.prefill_time.is_none() {
            self.prefill_time = Some(self.started.elapsed());
        }
        if let Some(c) = &mut self.params.constraint {
            if let Err(e) = c.mask(logits) {
                tracing::error!(error = %e, "constraint failed; the sequence ends");
                self.finish = Some(FinishReason::Stop);
                return vec![TokenEvent {
                    id: self.tokenizer.eos_id().unwrap_or(0),
                    text: self.text.finish(),
                    logprob: None,
                    top: Vec::new(),
                }];
            }
        }
        let s = self.sampler.sample(logits);
        self.tokens.push(s.id);
        if !self.prediction.is_empty() {
            self.prediction.advance(&self.tokens);
        }
        let grammar_done = match &mut self.params.constraint {
            Some(c) => {
                if let Err(e) = c.commit(s.id) {
                    tracing::error!(error = %e, "constraint rejected a sampled token");
                }
                c.is_stopped()
            }
            None => false,
        };
        let eog = !self.params.ignore_eos && self.tokenizer.eog_ids().contains(&s.id);
        let (delta, hit_stop) = if eog {
            (self.text.finish(), false)
        } else {
            self.text.push(s.id)
        };
        let mut events = vec![TokenEvent {
            id: s.id,
            text: delta,
            logprob: s.logprob,
            top: s.top,
        }];
        if eog || hit_stop || grammar_done {
            if grammar_done && !eog {
                self.flush_into(s.id, &mut events);
            }
            self.finish = Some(FinishReason::Stop);
        } else if self.tokens.len() >= self.params.max_tokens || kv_len + 1 > self.capacity {
            self.flush_into(s.id, &mut events);
            self.finish = Some(FinishReason::Length);
        } else {
            self.pending = Some(s.id);
        }
        events
    }

    /// Releases the text held back (for a possible stop sequence or an incomplete character) as
    /// one more event, when the sequence ends on something other than an end-of-generation
    /// token.
    fn flush_into(&mut self, id: u32, events: &mut Vec<TokenEvent>) {
        let rest = self.text.finish();
        if !rest.is_empty() {
            events.push(TokenEvent {
                id,
                text: rest,
                logprob: None,
                top: Vec::new(),
            });
        }
    }

    /// Stops the sequence at once (its client went away).
    pub fn cancel(&mut self) {
        self.finish = Some(FinishReason::Cancelled);
        self.pending = None;
        self.spec.clear();
    }

    pub fn finish_reason(&self) -> Option<FinishReason> {
        self.finish
    }

    /// The result; call once the sequence is finished.
    pub fn into_completion(self) -> Completion {
        let prefill_time = self.prefill_time.unwrap_or_else(|| self.started.elapsed());
        Completion {
            finish_reason: self.finish.unwrap_or(FinishReason::Cancelled),
            prompt_tokens: self.prompt_len,
            cached_tokens: self.cached,
            decode_time: self.started.elapsed().saturating_sub(prefill_time),
            prefill_time,
            tokens: self.tokens,
            text: self.text.into_text(),
            accepted_prediction_tokens: self.accepted,
            rejected_prediction_tokens: self.rejected,
        }
    }
}

/// Runs one sequence through a model.
pub struct Generator<'a> {
    pub model: &'a Transformer,
    pub tokenizer: &'a Tokenizer,
    pub pool: &'a ThreadPool,
    /// Longest prefill chunk, bounding the workspace memory.
    pub prefill_chunk: usize,
}

impl Generator<'_> {
    /// Generates a continuation of `prompt`, calling `on_token` for every token; returning
    /// `ControlFlow::Break` from it cancels the generation.
    pub fn generate(
        &self,
        session: &mut Session,
        prompt: &[u32],
        params: &GenerateParams,
        on_token: &mut dyn FnMut(&TokenEvent) -> ControlFlow<()>,
    ) -> Result<Completion> {
        let mut seq = Sequence::start(self.tokenizer, session, prompt.to_vec(), params.clone())?;
        while seq.finish_reason().is_none() {
            let (input, mode) = seq.next_input(self.prefill_chunk);
            let n = input.len();
            self.model
                .forward(self.pool, &mut session.ws, &mut session.kv, input, mode)?;
            seq.fed(session, n);
            if mode == Logits::None {
                continue;
            }
            let vocab = self.model.cfg.vocab_size;
            let rows = if mode == Logits::All { n } else { 1 };
            let logits = &mut session.ws.logits_mut()[..rows * vocab];
            let events = seq.sample_rows(logits, vocab);
            seq.rollback(session);
            for ev in &events {
                if on_token(ev).is_break() {
                    seq.cancel();
                    break;
                }
            }
        }
        Ok(seq.into_completion())
    }
}

/// Detokenized text of a generation, released only once it can no longer be the start of a stop
/// sequence.
struct TextStream<'a> {
    decoder: StreamDecoder<'a>,
    stop: Vec<String>,
    text: String,
    emitted: usize,
    stopped: bool,
}

impl<'a> TextStream<'a> {
    fn new(tokenizer: &'a Tokenizer, stop: Vec<String>) -> Self {
        TextStream {
            decoder: StreamDecoder::new(tokenizer),
            stop,
            text: String::new(),
            emitted: 0,
            stopped: false,
        }
    }

    /// Adds a token; returns the newly final text and whether a stop sequence was hit.
    fn push(&mut self, id: u32) -> (String, bool) {
        if let Some(piece) = self.decoder.push(id) {
            self.text.push_str(&piece);
        }
        // A stop sequence may start in already-emitted text only if it overlaps the new part.
        let search_from = self
            .emitted
            .saturating_sub(self.stop.iter().map(String::len).max().unwrap_or(0));
        let search_from = floor_char_boundary(&self.text, search_from);
        if let Some(pos) = self
            .stop
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| {
                self.text[search_from..]
                    .find(s.as_str())
                    .map(|p| p + search_from)
            })
            .min()
        {
            self.text.truncate(pos.max(self.emitted));
            self.stopped = true;
            return (self.release(self.text.len()), true);
        }
        let hold = self.longest_stop_prefix_suffix();
        (self.release(self.text.len() - hold), false)
    }

    /// Flushes everything (end of generation).
    fn finish(&mut self) -> String {
        if !self.stopped {
            self.text.push_str(&self.decoder.flush());
        }
        self.release(self.text.len())
    }

    fn release(&mut self, upto: usize) -> String {
        let upto = floor_char_boundary(&self.text, upto.max(self.emitted));
        let out = self.text[self.emitted..upto].to_string();
        self.emitted = upto;
        out
    }

    /// Length of the longest suffix of the text that is a proper prefix of a stop sequence.
    fn longest_stop_prefix_suffix(&self) -> usize {
        let tail = &self.text[self.emitted..];
        let mut best = 0;
        for s in &self.stop {
            for len in (1..s.len().min(tail.len() + 1)).rev() {
                if len > best
                    && tail.is_char_boundary(tail.len() - len)
                    && s.is_char_boundary(len)
                    && tail.ends_with(&s[..len])
                {
                    best = len;
                    break;
                }
            }
        }
        best
    }

    fn into_text(self) -> String {
        self.text
    }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}
