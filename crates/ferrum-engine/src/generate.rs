//! The generation loop of one sequence: prefill the prompt in chunks, then sample token by token
//! until an end-of-generation token, a stop sequence or the token limit, streaming text deltas
//! that never split a UTF-8 character or leak the start of a stop sequence.

use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use crate::error::{EngineError, Result};
use crate::kernels::ThreadPool;
use crate::kv::KvCache;
use crate::model::transformer::{Logits, Transformer, Workspace};
use crate::sampler::{Sampler, SamplingParams};
use crate::tokenizer::{StreamDecoder, Tokenizer};

/// What to generate.
#[derive(Clone, Debug)]
pub struct GenerateParams {
    pub max_tokens: usize,
    pub stop: Vec<String>,
    pub sampling: SamplingParams,
    /// Keep going past end-of-generation tokens (benchmarks).
    pub ignore_eos: bool,
}

impl Default for GenerateParams {
    fn default() -> Self {
        GenerateParams {
            max_tokens: 256,
            stop: Vec::new(),
            sampling: SamplingParams::default(),
            ignore_eos: false,
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

    /// Forgets everything cached.
    pub fn reset(&mut self) {
        self.kv.truncate(0);
        self.tokens.clear();
    }

    /// Keeps the longest cached prefix of `prompt` (at least one prompt token must remain to be
    /// run, to get logits) and returns its length.
    fn reuse_prefix(&mut self, prompt: &[u32]) -> usize {
        let common = self
            .tokens
            .iter()
            .zip(prompt)
            .take_while(|(a, b)| a == b)
            .count()
            .min(prompt.len().saturating_sub(1));
        self.kv.truncate(common);
        self.tokens.truncate(common);
        common
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
        let t0 = Instant::now();
        let cached = session.reuse_prefix(prompt);
        self.prefill(session, &prompt[cached..])?;
        let prefill_time = t0.elapsed();
        let t1 = Instant::now();
        let mut sampler = Sampler::new(params.sampling.clone());
        let mut text = TextStream::new(self.tokenizer, &params.stop);
        let mut tokens = Vec::new();
        let finish = loop {
            // Sampling works in place on the workspace's logits: no copy of the vocabulary.
            let s = sampler.sample(session.ws.logits_mut());
            tokens.push(s.id);
            let eog = !params.ignore_eos && self.tokenizer.eog_ids().contains(&s.id);
            let (delta, hit_stop) = if eog {
                (text.finish(), false)
            } else {
                text.push(s.id)
            };
            let event = TokenEvent {
                id: s.id,
                text: delta,
                logprob: s.logprob,
                top: s.top,
            };
            if on_token(&event).is_break() {
                break FinishReason::Cancelled;
            }
            if eog || hit_stop {
                break FinishReason::Stop;
            }
            if tokens.len() >= params.max_tokens || session.kv.len() + 1 > max {
                let rest = text.finish();
                if !rest.is_empty() {
                    let _ = on_token(&TokenEvent {
                        id: s.id,
                        text: rest,
                        logprob: None,
                        top: Vec::new(),
                    });
                }
                break FinishReason::Length;
            }
            self.step(session, s.id)?;
        };
        Ok(Completion {
            text: text.into_text(),
            tokens,
            finish_reason: finish,
            prompt_tokens: prompt.len(),
            cached_tokens: cached,
            prefill_time,
            decode_time: t1.elapsed(),
        })
    }

    /// Runs the uncached part of a prompt in chunks; the last token's logits are left in the
    /// session's workspace.
    fn prefill(&self, session: &mut Session, tokens: &[u32]) -> Result<()> {
        let chunk = self.prefill_chunk.max(1);
        let n_chunks = tokens.len().div_ceil(chunk);
        for (i, part) in tokens.chunks(chunk).enumerate() {
            let mode = if i + 1 == n_chunks {
                Logits::Last
            } else {
                Logits::None
            };
            self.model
                .forward(self.pool, &mut session.ws, &mut session.kv, part, mode)?;
            session.tokens.extend_from_slice(part);
        }
        Ok(())
    }

    fn step(&self, session: &mut Session, id: u32) -> Result<()> {
        self.model.forward(
            self.pool,
            &mut session.ws,
            &mut session.kv,
            &[id],
            Logits::Last,
        )?;
        session.tokens.push(id);
        Ok(())
    }
}

/// Detokenized text of a generation, released only once it can no longer be the start of a stop
/// sequence.
struct TextStream<'a> {
    decoder: StreamDecoder<'a>,
    stop: &'a [String],
    text: String,
    emitted: usize,
    stopped: bool,
}

impl<'a> TextStream<'a> {
    fn new(tokenizer: &'a Tokenizer, stop: &'a [String]) -> Self {
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
        for s in self.stop {
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
