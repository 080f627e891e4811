//! A model behind a queue, served by continuous batching: one engine thread per loaded model
//! runs a step loop (llama.cpp's `update_slots`, vLLM's scheduler), and the server talks to it
//! only through `ModelHandle::submit(Request)` and the events each request's sink receives, so
//! the server never touches tensors and the engine never sees HTTP or an async runtime.
//!
//! Each step builds one ragged batch: the next token of every running sequence that is decoding,
//! then prompt chunks of sequences still reading their prompt, up to a per-step token budget
//! (chunked prefill, so a long prompt never stalls the others for long). One forward pass runs
//! the whole batch, every weight matrix read once for all of it; then every sequence that got
//! logits samples its next token and reports it.
//!
//! Prefix caching: a finished sequence's KV cache goes to a pool of idle sessions (LRU, bounded
//! by count and by a memory budget). A new sequence takes the idle session sharing the longest
//! prefix with its prompt, so a multi-turn conversation or a shared system prompt is read once;
//! the reused tokens are reported as `cached_tokens`. (A paged, content-addressed block cache is
//! the next step; the seam stays the same.)

use std::collections::{HashMap, VecDeque};
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::Arc;

use crate::engine::LoadedModel;
use crate::error::EngineError;
use crate::generate::{Completion, GenerateParams, Sequence, Session, TokenEvent};
use crate::model::transformer::{Logits, SeqInput, Workspace};

/// What a request reports: `Started` once, then per choice its tokens and a `ChoiceDone`
/// (choices run side by side, so their events interleave); or an `Error`.
#[derive(Debug)]
pub enum Event {
    /// The request left the queue and its prompt is being read.
    Started,
    Token {
        choice: u32,
        token: TokenEvent,
    },
    ChoiceDone {
        choice: u32,
        completion: Completion,
    },
    Error(EngineError),
}

/// Receives a request's events on the engine thread. Returning `Break` cancels the request
/// (its client went away); it must not block.
pub type Sink = Box<dyn FnMut(Event) -> ControlFlow<()> + Send>;

/// One generation request: `choices` completions of the same prompt.
pub struct Request {
    pub prompt: Vec<u32>,
    pub params: GenerateParams,
    /// Number of choices (OpenAI `n`); choice `i` samples with seed `seed + i`.
    pub choices: u32,
    pub sink: Sink,
}

/// Why a request was not queued.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("the queue is full ({0} requests waiting)")]
    QueueFull(usize),
    #[error("the model's engine thread has stopped")]
    Stopped,
}

/// Scheduling limits of one model's engine.
#[derive(Clone, Debug)]
pub struct EngineOptions {
    /// Requests that may wait for admission before `submit` refuses more.
    pub queue_capacity: usize,
    /// Sequences generated together (each choice of a request is one sequence).
    pub max_running: usize,
    /// Tokens per forward pass (decode tokens plus prompt chunks).
    pub step_tokens: usize,
    /// Finished sequences' caches kept for prefix reuse.
    pub idle_sessions: usize,
    /// Memory for all KV caches, running and idle; idle ones are evicted (oldest first) to stay
    /// under it.
    pub kv_budget_bytes: usize,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            queue_capacity: 64,
            max_running: 16,
            step_tokens: 256,
            idle_sessions: 16,
            kv_budget_bytes: 2 << 30,
        }
    }
}

/// Counters of an engine, for metrics.
#[derive(Debug, Default)]
pub struct EngineStats {
    pub running: AtomicU64,
    pub waiting: AtomicU64,
    pub steps: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub cached_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    pub kv_bytes: AtomicU64,
    pub preemptions: AtomicU64,
}

/// A loaded model and the queue of its engine thread. Cloning shares both; the thread stops
/// once every handle is dropped and the work in hand is done.
#[derive(Clone)]
pub struct ModelHandle {
    model: Arc<LoadedModel>,
    queue: SyncSender<Request>,
    capacity: usize,
    stats: Arc<EngineStats>,
}

impl ModelHandle {
    /// Starts the engine thread of `model`.
    pub fn spawn(model: LoadedModel, opts: EngineOptions) -> std::io::Result<ModelHandle> {
        let model = Arc::new(model);
        let (tx, rx) = sync_channel(opts.queue_capacity.max(1));
        let stats = Arc::new(EngineStats::default());
        let (engine_model, engine_stats) = (Arc::clone(&model), Arc::clone(&stats));
        let capacity = opts.queue_capacity.max(1);
        std::thread::Builder::new()
            .name("ferrum-engine".into())
            .spawn(move || Engine::new(&engine_model, opts, engine_stats).run(rx))?;
        Ok(ModelHandle {
            model,
            queue: tx,
            capacity,
            stats,
        })
    }

    /// The model, for templating and tokenizing off the engine thread.
    pub fn model(&self) -> &LoadedModel {
        &self.model
    }

    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    /// Queues a request without waiting.
    pub fn submit(&self, request: Request) -> Result<(), SubmitError> {
        self.queue.try_send(request).map_err(|e| match e {
            TrySendError::Full(_) => SubmitError::QueueFull(self.capacity),
            TrySendError::Disconnected(_) => SubmitError::Stopped,
        })?;
        self.stats.waiting.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// A request being served.
struct Active {
    sink: Sink,
    /// Choices not finished yet.
    live: u32,
    cancelled: bool,
}

/// One running sequence: a choice of a request, its generation state and its cache.
struct Running<'m> {
    req: u64,
    choice: u32,
    seq: Sequence<'m>,
    session: Session,
}

/// A sequence whose cache was taken back to make room; it is recomputed when there is room.
struct Preempted<'m> {
    req: u64,
    choice: u32,
    seq: Sequence<'m>,
}

struct Engine<'m> {
    model: &'m LoadedModel,
    opts: EngineOptions,
    stats: Arc<EngineStats>,
    ws: Workspace,
    /// In admission order: the last is the newest, the first to be preempted.
    running: Vec<Running<'m>>,
    /// Waiting to be resumed, before any new request is admitted.
    preempted: VecDeque<Preempted<'m>>,
    requests: HashMap<u64, Active>,
    /// Caches of finished sequences, oldest first.
    idle: VecDeque<Session>,
    /// A request taken off the queue that did not fit yet.
    next: Option<Request>,
    next_id: u64,
}

impl<'m> Engine<'m> {
    fn new(model: &'m LoadedModel, opts: EngineOptions, stats: Arc<EngineStats>) -> Self {
        Engine {
            model,
            opts,
            stats,
            ws: Workspace::default(),
            running: Vec::new(),
            preempted: VecDeque::new(),
            requests: HashMap::new(),
            idle: VecDeque::new(),
            next: None,
            next_id: 0,
        }
    }

    fn run(mut self, queue: Receiver<Request>) {
        loop {
            if !self.admit(&queue) {
                break;
            }
            if self.running.is_empty() {
                continue;
            }
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.step()));
            if outcome.is_err() {
                tracing::error!("an engine step panicked; its requests fail and caches are reset");
                self.fail_all(|| EngineError::Internal("generation panicked".into()));
            }
            self.publish_stats();
        }
        tracing::info!(path = %self.model.path.display(), "engine thread stopped");
    }

    /// Takes requests off the queue while there is room; blocks when there is nothing to do.
    /// Returns false once the queue is closed and all work is done.
    fn admit(&mut self, queue: &Receiver<Request>) -> bool {
        self.resume_preempted();
        if !self.preempted.is_empty() {
            // Preempted sequences go first; new requests wait (in the queue) behind them.
            return true;
        }
        loop {
            let request = match self.next.take() {
                Some(r) => r,
                None if self.running.is_empty() => match queue.recv() {
                    Ok(r) => r,
                    Err(_) => return false,
                },
                None => match queue.try_recv() {
                    Ok(r) => r,
                    Err(TryRecvError::Empty) | Err(TryRecvError::Disconnected) => return true,
                },
            };
            let n = request.choices.max(1) as usize;
            if !self.running.is_empty() && self.running.len() + n > self.opts.max_running {
                self.next = Some(request);
                return true;
            }
            self.stats.waiting.fetch_sub(1, Ordering::Relaxed);
            self.start(request);
        }
    }

    /// Resumes preempted sequences, oldest first, while the batch and the memory budget have
    /// room for their context.
    fn resume_preempted(&mut self) {
        while let Some(p) = self.preempted.front() {
            if self.requests.get(&p.req).is_none_or(|a| a.cancelled) {
                let p = self.preempted.pop_front().expect("front exists");
                self.finish_choice(p.req);
                continue;
            }
            let per_position = self.model.kv_bytes_per_position();
            let need = p.seq.context().len() * per_position;
            let running: usize = self
                .running
                .iter()
                .map(|r| r.session.kv.memory_bytes())
                .sum();
            let fits = running + need <= self.opts.kv_budget_bytes;
            if !self.running.is_empty() && (self.running.len() >= self.opts.max_running || !fits) {
                return;
            }
            let mut p = self.preempted.pop_front().expect("front exists");
            let mut session = self.take_session(p.seq.context());
            p.seq.resume(&mut session);
            self.running.push(Running {
                req: p.req,
                choice: p.choice,
                seq: p.seq,
                session,
            });
        }
    }

    /// Starts every choice of a request as a running sequence.
    fn start(&mut self, mut request: Request) {
        // A client that left while its request waited costs nothing.
        if (request.sink)(Event::Started).is_break() {
            return;
        }
        let id = self.next_id;
        self.next_id += 1;
        let choices = request.choices.max(1);
        let mut started = Vec::with_capacity(choices as usize);
        for choice in 0..choices {
            let mut params = request.params.clone();
            params.sampling.seed = params
                .sampling
                .seed
                .map(|s| s.wrapping_add(u64::from(choice)));
            let mut session = self.take_session(&request.prompt);
            let tokenizer = &self.model.tokenizer;
            match Sequence::start(tokenizer, &mut session, request.prompt.clone(), params) {
                Ok(seq) => {
                    self.stats
                        .prompt_tokens
                        .fetch_add(request.prompt.len() as u64, Ordering::Relaxed);
                    let cached = request.prompt.len() - seq.prompt_left();
                    self.stats
                        .cached_tokens
                        .fetch_add(cached as u64, Ordering::Relaxed);
                    started.push(Running {
                        req: id,
                        choice,
                        seq,
                        session,
                    });
                }
                Err(e) => {
                    self.idle.push_back(session);
                    for r in started {
                        self.idle.push_back(r.session);
                    }
                    let _ = (request.sink)(Event::Error(e));
                    return;
                }
            }
        }
        self.running.extend(started);
        self.requests.insert(
            id,
            Active {
                sink: request.sink,
                live: choices,
                cancelled: false,
            },
        );
    }

    /// A session for `prompt` holding the longest prefix of it that any idle session has.
    /// An idle session whose whole content is that prefix (the previous turn of the same
    /// conversation) is taken as it is; a shorter shared prefix (a common system prompt) is
    /// copied, so the idle session keeps serving its own conversation.
    fn take_session(&mut self, prompt: &[u32]) -> Session {
        let best = self
            .idle
            .iter()
            .enumerate()
            .map(|(i, s)| (s.common_prefix(prompt), i))
            .max();
        if let Some((common, i)) = best {
            if common > 0 && common == self.idle[i].tokens().len() {
                return self.idle.remove(i).expect("index in range");
            }
        }
        let (common, mut src) = best.unwrap_or((0, 0));
        let tight = self.kv_bytes() >= self.opts.kv_budget_bytes
            || self.idle.len() >= self.opts.idle_sessions;
        // Reuse the memory of the oldest idle session (not the one to copy from) when tight.
        let victim = (0..self.idle.len()).find(|&i| common == 0 || i != src);
        let mut fresh = match victim {
            Some(v) if tight => {
                if v < src {
                    src -= 1;
                }
                let mut s = self.idle.remove(v).expect("index in range");
                s.reset();
                s
            }
            _ => self.model.new_session(),
        };
        if common > 0 {
            fresh.copy_prefix_from(&self.idle[src], common);
        }
        fresh
    }

    fn kv_bytes(&self) -> usize {
        let running = self.running.iter().map(|r| r.session.kv.memory_bytes());
        let idle = self.idle.iter().map(|s| s.kv.memory_bytes());
        running.chain(idle).sum()
    }

    /// One forward pass over the batch, then sampling and events.
    fn step(&mut self) {
        // Decoding sequences first (one token each), then prompt chunks in arrival order.
        let mut budget = self.opts.step_tokens.max(1);
        let mut plan: Vec<Option<usize>> = vec![None; self.running.len()];
        for (i, r) in self.running.iter().enumerate() {
            if !r.seq.is_prefilling() {
                plan[i] = Some(1);
                budget = budget.saturating_sub(1);
            }
        }
        for (i, r) in self.running.iter().enumerate() {
            if r.seq.is_prefilling() && budget > 0 {
                let n = r.seq.prompt_left().min(budget);
                plan[i] = Some(n);
                budget -= n;
            }
        }
        self.make_room(&mut plan);
        let mut fed: Vec<(usize, usize, Logits)> = Vec::with_capacity(plan.len());
        let result = {
            let mut batch = Vec::with_capacity(plan.len());
            for (i, (r, p)) in self.running.iter_mut().zip(&plan).enumerate() {
                if let Some(n) = *p {
                    let (tokens, logits) = r.seq.next_input(n);
                    fed.push((i, tokens.len(), logits));
                    batch.push(SeqInput {
                        kv: &mut r.session.kv,
                        tokens,
                        logits,
                    });
                }
            }
            self.model
                .model
                .forward_batch(&self.model.pool, &mut self.ws, &mut batch)
                .map(|_| ())
        };
        self.stats.steps.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = result {
            let message = e.to_string();
            self.fail_all(|| EngineError::Internal(message.clone()));
            return;
        }
        let vocab = self.model.model.cfg.vocab_size;
        let logits = self.ws.logits_mut();
        let mut row = 0;
        for &(i, n, mode) in &fed {
            let r = &mut self.running[i];
            r.seq.fed(&mut r.session, n);
            if mode == Logits::None {
                continue;
            }
            let events = r
                .seq
                .sample(&r.session.kv, &mut logits[row * vocab..(row + 1) * vocab]);
            row += 1;
            self.stats.generated_tokens.fetch_add(1, Ordering::Relaxed);
            let active = self
                .requests
                .get_mut(&r.req)
                .expect("a running request is active");
            for token in events {
                let flow = (active.sink)(Event::Token {
                    choice: r.choice,
                    token,
                });
                if flow.is_break() {
                    active.cancelled = true;
                    break;
                }
            }
        }
        self.retire();
    }

    /// Keeps the KV memory of the coming step within the budget: drops idle caches (oldest
    /// first), then preempts running sequences (newest first; they are recomputed later). A
    /// single sequence is never preempted, whatever its size.
    fn make_room(&mut self, plan: &mut Vec<Option<usize>>) {
        loop {
            let running: usize = self
                .running
                .iter()
                .zip(plan.iter())
                .map(|(r, p)| match p {
                    Some(n) => r
                        .session
                        .kv
                        .memory_bytes_after_reserve(r.session.kv.len() + n),
                    None => r.session.kv.memory_bytes(),
                })
                .sum();
            let idle: usize = self.idle.iter().map(|s| s.kv.memory_bytes()).sum();
            if running + idle <= self.opts.kv_budget_bytes {
                return;
            }
            if self.idle.pop_front().is_some() {
                continue;
            }
            if self.running.len() <= 1 {
                return;
            }
            let r = self.running.pop().expect("more than one running");
            plan.pop();
            self.stats.preemptions.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(
                request = r.req,
                choice = r.choice,
                "preempted: KV budget full"
            );
            self.preempted.push_front(Preempted {
                req: r.req,
                choice: r.choice,
                seq: r.seq,
            });
        }
    }

    /// One choice of a request is over; the request ends (its sink is dropped) with its last.
    fn finish_choice(&mut self, req: u64) {
        if let Some(active) = self.requests.get_mut(&req) {
            active.live -= 1;
            if active.live == 0 {
                self.requests.remove(&req);
            }
        }
    }

    /// Moves finished and cancelled sequences out: their completions are reported, their
    /// caches kept for prefix reuse.
    fn retire(&mut self) {
        let mut i = 0;
        while i < self.running.len() {
            let r = &self.running[i];
            let cancelled = self.requests[&r.req].cancelled;
            if r.seq.finish_reason().is_none() && !cancelled {
                i += 1;
                continue;
            }
            let r = self.running.remove(i);
            let active = self
                .requests
                .get_mut(&r.req)
                .expect("a running request is active");
            if !cancelled {
                let completion = r.seq.into_completion();
                let event = Event::ChoiceDone {
                    choice: r.choice,
                    completion,
                };
                if (active.sink)(event).is_break() {
                    active.cancelled = true;
                }
            }
            // Dropping the sink with the last choice ends the request's event stream.
            self.finish_choice(r.req);
            self.park(r.session);
        }
        // Preempted choices of cancelled requests end too.
        let mut i = 0;
        while i < self.preempted.len() {
            let req = self.preempted[i].req;
            if self.requests.get(&req).is_some_and(|a| a.cancelled) {
                self.preempted.remove(i);
                self.finish_choice(req);
            } else {
                i += 1;
            }
        }
    }

    /// Keeps a finished sequence's cache for prefix reuse, within the count and memory bounds.
    fn park(&mut self, session: Session) {
        self.idle.push_back(session);
        while self.idle.len() > self.opts.idle_sessions
            || (self.kv_bytes() > self.opts.kv_budget_bytes && !self.idle.is_empty())
        {
            self.idle.pop_front();
        }
    }

    /// Ends every running request with an error (a failed or panicked step) and drops their
    /// caches, whose contents may be inconsistent.
    fn fail_all(&mut self, error: impl Fn() -> EngineError) {
        self.running.clear();
        self.preempted.clear();
        for (_, mut active) in self.requests.drain() {
            let _ = (active.sink)(Event::Error(error()));
        }
    }

    fn publish_stats(&self) {
        let s = &self.stats;
        s.running
            .store(self.running.len() as u64, Ordering::Relaxed);
        s.kv_bytes.store(self.kv_bytes() as u64, Ordering::Relaxed);
    }
}
