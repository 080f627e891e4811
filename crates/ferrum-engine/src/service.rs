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
//! Memory: the KV cache is one pool of fixed-size blocks (`kv::KvStorage`) sized from a memory
//! budget; each sequence holds a block table. Automatic prefix caching: every full block is
//! registered under the hash of its tokens and of all tokens before it (`kv::blocks`), so a new
//! sequence whose prompt starts with cached blocks takes references to them and prefills only
//! the rest (reported as `cached_tokens`): a shared system prompt or the previous turns of a
//! conversation are read once. Blocks nobody holds stay cached until a fresh block is needed
//! (least recently released first). When no block is left, the newest running sequences are
//! preempted: their blocks are released and their context is recomputed when there is room,
//! which yields the same keys and values, so the same output.

use std::collections::{HashMap, VecDeque};
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::Arc;

use crate::engine::LoadedModel;
use crate::error::EngineError;
use crate::generate::{Completion, GenerateParams, Sequence, Session, TokenEvent};
use crate::kv::blocks::{block_hash, BlockAllocator};
use crate::kv::{KvCache, KvStorage, DEFAULT_BLOCK_SIZE};
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
    /// Memory of the KV block pool (running sequences and the prefix cache).
    pub kv_budget_bytes: usize,
    /// Positions per KV block: the granularity of prefix reuse and of allocation.
    pub block_size: usize,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            queue_capacity: 64,
            max_running: 16,
            step_tokens: 256,
            kv_budget_bytes: 2 << 30,
            block_size: DEFAULT_BLOCK_SIZE,
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
    /// Bytes of the blocks running sequences hold.
    pub kv_bytes: AtomicU64,
    pub kv_blocks_total: AtomicU64,
    pub kv_blocks_used: AtomicU64,
    /// Unreferenced blocks kept for the prefix cache.
    pub kv_blocks_cached: AtomicU64,
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
    /// Leading blocks of the session registered in the prefix cache, and the hash of the last.
    registered: usize,
    parent_hash: u64,
}

/// A sequence whose blocks were taken back to make room; it is recomputed when there is room.
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
    storage: Arc<KvStorage>,
    blocks: BlockAllocator,
    /// In admission order: the last is the newest, the first to be preempted.
    running: Vec<Running<'m>>,
    /// Waiting to be resumed, before any new request is admitted.
    preempted: VecDeque<Preempted<'m>>,
    requests: HashMap<u64, Active>,
    /// A request taken off the queue that did not fit yet.
    next: Option<Request>,
    next_id: u64,
}

impl<'m> Engine<'m> {
    fn new(model: &'m LoadedModel, opts: EngineOptions, stats: Arc<EngineStats>) -> Self {
        let cfg = &model.model.cfg;
        let block_size = opts.block_size.max(1);
        let per_block = KvStorage::bytes_per_block(cfg.n_layers, cfg.kv_dim(), block_size);
        let n_blocks = (opts.kv_budget_bytes / per_block).max(1);
        stats
            .kv_blocks_total
            .store(n_blocks as u64, Ordering::Relaxed);
        tracing::info!(
            blocks = n_blocks,
            block_size,
            mib = (n_blocks * per_block) >> 20,
            "KV block pool"
        );
        Engine {
            model,
            opts,
            stats,
            ws: Workspace::default(),
            storage: KvStorage::new(cfg.n_layers, cfg.kv_dim(), n_blocks, block_size),
            blocks: BlockAllocator::new(n_blocks),
            running: Vec::new(),
            preempted: VecDeque::new(),
            requests: HashMap::new(),
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
                tracing::error!("an engine step panicked; its requests fail");
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

    /// Resumes preempted sequences, oldest first, while the batch has room and the pool has
    /// blocks for their context (with a block of headroom per running sequence).
    fn resume_preempted(&mut self) {
        while let Some(p) = self.preempted.front() {
            if self.requests.get(&p.req).is_none_or(|a| a.cancelled) {
                let p = self.preempted.pop_front().expect("front exists");
                self.finish_choice(p.req);
                continue;
            }
            let bs = self.storage.block_size();
            let need = p.seq.context().len().div_ceil(bs) + 1 + self.running.len();
            if !self.running.is_empty()
                && (self.running.len() >= self.opts.max_running || need > self.blocks.available())
            {
                return;
            }
            let mut p = self.preempted.pop_front().expect("front exists");
            let (mut session, registered, parent_hash) = self.session_for(p.seq.context());
            p.seq.resume(&mut session);
            self.running.push(Running {
                req: p.req,
                choice: p.choice,
                seq: p.seq,
                session,
                registered,
                parent_hash,
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
        let mut started: Vec<Running<'m>> = Vec::with_capacity(choices as usize);
        for choice in 0..choices {
            let mut params = request.params.clone();
            params.sampling.seed = params
                .sampling
                .seed
                .map(|s| s.wrapping_add(u64::from(choice)));
            let (mut session, registered, parent_hash) = self.session_for(&request.prompt);
            let tokenizer = &self.model.tokenizer;
            match Sequence::start(tokenizer, &mut session, request.prompt.clone(), params) {
                Ok(seq) => {
                    let cached = request.prompt.len() - seq.prompt_left();
                    self.stats
                        .prompt_tokens
                        .fetch_add(request.prompt.len() as u64, Ordering::Relaxed);
                    self.stats
                        .cached_tokens
                        .fetch_add(cached as u64, Ordering::Relaxed);
                    started.push(Running {
                        req: id,
                        choice,
                        seq,
                        session,
                        registered,
                        parent_hash,
                    });
                }
                Err(e) => {
                    self.release(&mut session);
                    for mut r in started {
                        self.release(&mut r.session);
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

    /// A session over the pool holding the cached blocks that start `context` (whole blocks,
    /// leaving at least one token to run), with the count and hash of those blocks.
    fn session_for(&mut self, context: &[u32]) -> (Session, usize, u64) {
        let mut kv = KvCache::pooled(Arc::clone(&self.storage), self.model.context_length);
        let bs = self.storage.block_size();
        let usable = context.len().saturating_sub(1) / bs;
        let mut parent = 0;
        let mut matched = 0;
        while matched < usable {
            let tokens = &context[matched * bs..(matched + 1) * bs];
            let hash = block_hash(parent, tokens);
            let Some(block) = self.blocks.lookup(hash, tokens) else {
                break;
            };
            kv.push_block(block);
            parent = hash;
            matched += 1;
        }
        let n = matched * bs;
        kv.set_len(n);
        (Session::with_cache(kv, &context[..n]), matched, parent)
    }

    /// Returns a session's blocks to the pool (registered ones stay cached).
    fn release(&mut self, session: &mut Session) {
        for b in session.kv.take_blocks() {
            self.blocks.release(b);
        }
        session.reset();
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
        self.reserve_blocks(&mut plan);
        if self.running.is_empty() {
            return;
        }
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
        let bs = self.storage.block_size();
        let logits = self.ws.logits_mut();
        let mut row = 0;
        for &(i, n, mode) in &fed {
            let r = &mut self.running[i];
            r.seq.fed(&mut r.session, n);
            register_full_blocks(&mut self.blocks, r, bs);
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

    /// Gives every planned sequence the blocks its new tokens need. When the pool is out of
    /// blocks, the newest sequences are preempted; a sequence alone that still does not fit
    /// fails with a clear error.
    fn reserve_blocks(&mut self, plan: &mut Vec<Option<usize>>) {
        let mut i = 0;
        while i < self.running.len() {
            let Some(n) = plan[i] else {
                i += 1;
                continue;
            };
            let need = self.running[i].session.kv.len() + n;
            while self
                .running
                .get(i)
                .is_some_and(|r| r.session.kv.reserved() < need)
            {
                if let Some(b) = self.blocks.allocate() {
                    self.running[i].session.kv.push_block(b);
                    continue;
                }
                if self.running.len() == 1 {
                    let mut r = self.running.pop().expect("one running");
                    plan.pop();
                    self.release(&mut r.session);
                    self.fail_request(r.req, EngineError::Internal(format!(
                        "the KV cache ({} blocks of {} tokens) is too small for this request; raise the \
                         KV memory budget",
                        self.blocks.n_blocks(),
                        self.storage.block_size()
                    )));
                    return;
                }
                self.preempt_newest(plan);
            }
            i += 1;
        }
    }

    /// Releases the newest running sequence's blocks; it is resumed later by recomputation.
    fn preempt_newest(&mut self, plan: &mut Vec<Option<usize>>) {
        let mut r = self.running.pop().expect("a running sequence");
        plan.pop();
        self.release(&mut r.session);
        self.stats.preemptions.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(
            request = r.req,
            choice = r.choice,
            "preempted: KV blocks exhausted"
        );
        self.preempted.push_front(Preempted {
            req: r.req,
            choice: r.choice,
            seq: r.seq,
        });
    }

    /// Ends a whole request with an error; its other choices stop too.
    fn fail_request(&mut self, req: u64, error: EngineError) {
        if let Some(mut active) = self.requests.remove(&req) {
            let _ = (active.sink)(Event::Error(error));
        }
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].req == req {
                let mut r = self.running.remove(i);
                self.release(&mut r.session);
            } else {
                i += 1;
            }
        }
        self.preempted.retain(|p| p.req != req);
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

    /// Moves finished and cancelled sequences out: their completions are reported and their
    /// blocks released (full blocks stay in the prefix cache).
    fn retire(&mut self) {
        let mut i = 0;
        while i < self.running.len() {
            let r = &self.running[i];
            let cancelled = self.requests.get(&r.req).is_none_or(|a| a.cancelled);
            if r.seq.finish_reason().is_none() && !cancelled {
                i += 1;
                continue;
            }
            let mut r = self.running.remove(i);
            self.release(&mut r.session);
            if !cancelled {
                let active = self.requests.get_mut(&r.req).expect("checked above");
                let event = Event::ChoiceDone {
                    choice: r.choice,
                    completion: r.seq.into_completion(),
                };
                if (active.sink)(event).is_break() {
                    active.cancelled = true;
                }
            }
            // Dropping the sink with the last choice ends the request's event stream.
            self.finish_choice(r.req);
        }
        // Preempted choices of cancelled requests end too.
        let mut i = 0;
        while i < self.preempted.len() {
            let req = self.preempted[i].req;
            if self.requests.get(&req).is_none_or(|a| a.cancelled) {
                self.preempted.remove(i);
                self.finish_choice(req);
            } else {
                i += 1;
            }
        }
    }

    /// Ends every running request with an error (a failed or panicked step).
    fn fail_all(&mut self, error: impl Fn() -> EngineError) {
        let mut running = std::mem::take(&mut self.running);
        for r in &mut running {
            self.release(&mut r.session);
        }
        self.preempted.clear();
        for (_, mut active) in self.requests.drain() {
            let _ = (active.sink)(Event::Error(error()));
        }
    }

    fn publish_stats(&self) {
        let s = &self.stats;
        let cfg = &self.model.model.cfg;
        let per_block =
            KvStorage::bytes_per_block(cfg.n_layers, cfg.kv_dim(), self.storage.block_size());
        s.running
            .store(self.running.len() as u64, Ordering::Relaxed);
        s.kv_bytes
            .store((self.blocks.used() * per_block) as u64, Ordering::Relaxed);
        s.kv_blocks_used
            .store(self.blocks.used() as u64, Ordering::Relaxed);
        s.kv_blocks_cached
            .store(self.blocks.cached() as u64, Ordering::Relaxed);
    }
}

/// Registers the sequence's newly completed blocks in the prefix cache, so later sequences
/// (the next turn of this conversation, or another request with the same start) reuse them.
fn register_full_blocks(blocks: &mut BlockAllocator, r: &mut Running<'_>, bs: usize) {
    let tokens = r.session.tokens();
    let table = r.session.kv.blocks();
    while (r.registered + 1) * bs <= tokens.len() {
        let i = r.registered;
        let chunk = &tokens[i * bs..(i + 1) * bs];
        let hash = block_hash(r.parent_hash, chunk);
        blocks.register(table[i], hash, chunk);
        r.parent_hash = hash;
        r.registered += 1;
    }
}
