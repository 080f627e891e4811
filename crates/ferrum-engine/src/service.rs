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
//!
//! Priorities, highest first: priority requests (`service_tier: "priority"`), interactive
//! ones, and background ones (batch lines, flex processing, evals). A waiting request is
//! admitted ahead of every request of a lower level, lower levels' sequences are preempted
//! first, and when the batch is full an arrival preempts the newest sequence of a lower level
//! rather than waiting for it. Background requests have a queue of their own without a capacity
//! limit (their producers, such as the batch runner, bound what they submit), so they never
//! take queue room from clients.

use std::collections::{HashMap, VecDeque};
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use crate::constraint::Constraint;
use crate::draft::{Draft, DraftCache, DraftJob, Drafter};
use crate::embeds::PromptEmbeds;
use crate::engine::LoadedModel;
use crate::error::EngineError;
use crate::generate::{Completion, GenerateParams, Sequence, Session, TokenEvent};
use crate::kv::blocks::{block_hash, BlockAllocator};
use crate::kv::{KvCache, KvStorage, DEFAULT_BLOCK_SIZE};
use crate::model::lora::LoraAdapter;
use crate::model::transformer::{Logits, SeqInput, Workspace};
use crate::model::ModelConfig;
use crate::sched::{StepPlanner, Want};

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
    pub priority: Priority,
    /// The LoRA adapter to run with (a fine-tuned model), or the base model.
    pub adapter: Option<Arc<LoraAdapter>>,
    /// The embedding rows of the prompt's placeholder ids (image tokens), if it has any.
    pub embeds: Option<Arc<PromptEmbeds>>,
    pub sink: Sink,
}

/// The root of a sequence's prefix-cache hash chain: 0 for the base model.
fn cache_root(adapter: Option<&LoraAdapter>) -> u64 {
    adapter.map_or(0, LoraAdapter::cache_root)
}

/// Who waits for a request, in the order the engine serves them: a client who pays for
/// priority processing (OpenAI's `service_tier: "priority"`), a client, or nobody in
/// particular (a batch line, flex processing, an eval). A level's waiting requests are admitted
/// before any of the next level's, and sequences of a higher level preempt lower ones for room.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Priority {
    Priority,
    #[default]
    Interactive,
    Background,
}

impl Priority {
    /// Every level, highest first.
    const ALL: [Priority; 3] = [
        Priority::Priority,
        Priority::Interactive,
        Priority::Background,
    ];

    fn index(self) -> usize {
        self as usize
    }

    /// Whether a client waits for it (what background jobs such as fine-tuning yield to).
    pub fn is_interactive(self) -> bool {
        self != Priority::Background
    }
}

/// The requests waiting for admission, shared by the handles and the engine thread.
struct Queue {
    state: Mutex<Waiting>,
    /// Signalled when a request arrives or the last handle goes away.
    arrived: Condvar,
}

#[derive(Default)]
struct Waiting {
    /// One queue per [`Priority`], highest first.
    queues: [VecDeque<Request>; 3],
    /// No handle is left: no more requests will come.
    closed: bool,
}

impl Queue {
    fn lock(&self) -> std::sync::MutexGuard<'_, Waiting> {
        // A panic while holding this lock leaves the queues consistent (pushes and pops only).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Closes the queue when the last [`ModelHandle`] is dropped.
struct Closer(Arc<Queue>);

impl Drop for Closer {
    fn drop(&mut self) {
        self.0.lock().closed = true;
        self.0.arrived.notify_all();
    }
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
    /// While sequences decode, how much longer than a decode-only step a step that also reads
    /// prompt tokens may take (their inter-token latency while a long prompt is read); 0 or
    /// 1 turns this off, leaving only `step_tokens` (see `sched`).
    pub max_decode_slowdown: f64,
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
            max_decode_slowdown: 2.0,
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
    /// The interactive part of `running` and `waiting` (work that background jobs, such as
    /// fine-tuning, yield to; batch lines are background).
    pub interactive_running: AtomicU64,
    pub interactive_waiting: AtomicU64,
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
    /// Draft-model proposals the target kept and rejected.
    pub draft_accepted: AtomicU64,
    pub draft_rejected: AtomicU64,
}

/// A loaded model and the queue of its engine thread. Cloning shares both; the thread stops
/// once every handle is dropped and the work in hand is done.
#[derive(Clone)]
pub struct ModelHandle {
    model: Arc<LoadedModel>,
    queue: Arc<Queue>,
    _closer: Arc<Closer>,
    capacity: usize,
    stats: Arc<EngineStats>,
}

impl ModelHandle {
    /// Starts the engine thread of `model`.
    pub fn spawn(model: LoadedModel, opts: EngineOptions) -> std::io::Result<ModelHandle> {
        Self::spawn_with_draft(model, opts, None)
    }

    /// Starts the engine thread of `model`, with a draft model proposing tokens for it.
    pub fn spawn_with_draft(
        model: LoadedModel,
        opts: EngineOptions,
        draft: Option<Draft>,
    ) -> std::io::Result<ModelHandle> {
        let mut model = model;
        let (n_blocks, _) = pool_size(&model, &opts);
        let pool_positions = n_blocks * opts.block_size.max(1);
        if model.context_length > pool_positions {
            // One sequence can never hold more than the pool, so the window the API enforces
            // (with `context_length_exceeded`) is what fits.
            tracing::warn!(
                context_length = model.context_length,
                kv_positions = pool_positions,
                "the KV memory budget holds fewer positions than the context window; \
                 requests are limited to what fits (raise --kv-budget-mib or use --kv-type q8_0)"
            );
            model.context_length = pool_positions;
        }
        let model = Arc::new(model);
        let queue = Arc::new(Queue {
            state: Mutex::default(),
            arrived: Condvar::new(),
        });
        let stats = Arc::new(EngineStats::default());
        let (engine_model, engine_stats) = (Arc::clone(&model), Arc::clone(&stats));
        let engine_queue = Arc::clone(&queue);
        let capacity = opts.queue_capacity.max(1);
        std::thread::Builder::new()
            .name("ferrum-engine".into())
            .spawn(move || {
                Engine::new(&engine_model, opts, engine_stats, draft).run(&engine_queue)
            })?;
        Ok(ModelHandle {
            model,
            _closer: Arc::new(Closer(Arc::clone(&queue))),
            queue,
            capacity,
            stats,
        })
    }

    /// The model, for templating and tokenizing off the engine thread.
    pub fn model(&self) -> &LoadedModel {
        &self.model
    }

    /// The model, shared (another tier's engine may use it as its draft model).
    pub fn shared_model(&self) -> Arc<LoadedModel> {
        Arc::clone(&self.model)
    }

    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    /// Requests that may wait per interactive queue (`EngineOptions::queue_capacity`).
    pub fn queue_capacity(&self) -> usize {
        self.capacity
    }

    /// Background requests waiting for admission now (batch lines, flex requests, evals),
    /// the one the engine holds until it fits included.
    pub fn background_waiting(&self) -> usize {
        let waiting = self.stats.waiting.load(Ordering::Relaxed);
        let interactive = self.stats.interactive_waiting.load(Ordering::Relaxed);
        waiting.saturating_sub(interactive) as usize
    }

    /// Queues a request without waiting. Interactive requests (priority ones included) are
    /// refused when their queue is full; background ones always queue.
    pub fn submit(&self, request: Request) -> Result<(), SubmitError> {
        let interactive = request.priority.is_interactive();
        {
            let mut w = self.queue.lock();
            let q = &mut w.queues[request.priority.index()];
            if interactive && q.len() >= self.capacity {
                return Err(SubmitError::QueueFull(self.capacity));
            }
            q.push_back(request);
        }
        if interactive {
            self.stats
                .interactive_waiting
                .fetch_add(1, Ordering::Relaxed);
        }
        self.queue.arrived.notify_one();
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
    priority: Priority,
    seq: Sequence<'m>,
    session: Session,
    adapter: Option<Arc<LoraAdapter>>,
    embeds: Option<Arc<PromptEmbeds>>,
    /// Leading blocks of the session registered in the prefix cache, and the hash of the last.
    registered: usize,
    parent_hash: u64,
    /// The sequence's cache in the draft model, if the engine has one.
    draft: Option<DraftCache>,
}

/// A sequence whose blocks were taken back to make room; it is recomputed when there is room.
struct Preempted<'m> {
    req: u64,
    choice: u32,
    priority: Priority,
    seq: Sequence<'m>,
    adapter: Option<Arc<LoraAdapter>>,
    embeds: Option<Arc<PromptEmbeds>>,
}

struct Engine<'m> {
    model: &'m LoadedModel,
    opts: EngineOptions,
    stats: Arc<EngineStats>,
    ws: Workspace,
    storage: Arc<KvStorage>,
    blocks: BlockAllocator,
    /// Sequences by priority, highest first, each level in admission order: the last is the
    /// first to be preempted.
    running: Vec<Running<'m>>,
    /// Waiting to be resumed, before any new request of their priority is admitted.
    preempted: VecDeque<Preempted<'m>>,
    requests: HashMap<u64, Active>,
    /// A request taken off a queue that did not fit yet, one per priority.
    next: [Option<Request>; 3],
    next_id: u64,
    /// Proposes tokens for decoding sequences (draft-model speculative decoding).
    drafter: Option<Drafter>,
    planner: StepPlanner,
}

/// The depth at which a prompt token's attention does as many FLOPs as its matmuls (the
/// planner's `depth_scale`): per layer, the projections and the feed-forward block against a
/// score and a weighted value per key and head (mini: ~8,300 positions).
fn flop_equal_depth(c: &ModelConfig) -> f64 {
    let (q, kv) = (c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim);
    let matmul = c.d_model * (q + 2 * kv) + q * c.d_model + 3 * c.d_model * c.d_ff;
    let per_key = 2 * c.n_heads * c.head_dim;
    matmul as f64 / per_key as f64
}

/// Blocks of a model's KV pool under `opts`' memory budget, and the bytes of one block.
fn pool_size(model: &LoadedModel, opts: &EngineOptions) -> (usize, usize) {
    let cfg = &model.model.cfg;
    let per_block = KvStorage::bytes_per_block(
        cfg.n_layers,
        cfg.kv_dim(),
        opts.block_size.max(1),
        model.model.kv_type(),
    );
    ((opts.kv_budget_bytes / per_block).max(1), per_block)
}

impl<'m> Engine<'m> {
    fn new(
        model: &'m LoadedModel,
        opts: EngineOptions,
        stats: Arc<EngineStats>,
        draft: Option<Draft>,
    ) -> Self {
        let cfg = &model.model.cfg;
        let block_size = opts.block_size.max(1);
        let kv_type = model.model.kv_type();
        let (n_blocks, per_block) = pool_size(model, &opts);
        stats
            .kv_blocks_total
            .store(n_blocks as u64, Ordering::Relaxed);
        tracing::info!(
            blocks = n_blocks,
            block_size,
            kv_type = kv_type.name(),
            mib = (n_blocks * per_block) >> 20,
            "KV block pool"
        );
        Engine {
            model,
            planner: StepPlanner::new(
                opts.step_tokens,
                opts.max_decode_slowdown,
                flop_equal_depth(cfg),
            ),
            opts,
            stats,
            ws: Workspace::default(),
            storage: KvStorage::new(cfg.n_layers, cfg.kv_dim(), n_blocks, block_size, kv_type),
            blocks: BlockAllocator::new(n_blocks),
            running: Vec::new(),
            preempted: VecDeque::new(),
            requests: HashMap::new(),
            next: [None, None, None],
            next_id: 0,
            drafter: draft.map(Drafter::new),
        }
    }

    fn run(mut self, queue: &Queue) {
        loop {
            if !self.admit(queue) {
                break;
            }
            if self.running.is_empty() {
                continue;
            }
            let started = std::time::Instant::now();
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.step()));
            match outcome {
                Ok(Some((decode, prompt))) => {
                    let seconds = started.elapsed().as_secs_f64();
                    tracing::trace!(decode, prompt_units = prompt, ms = seconds * 1e3, "step");
                    self.planner.observe(decode, prompt, seconds)
                }
                Ok(None) => {}
                Err(_) => {
                    tracing::error!("an engine step panicked; its requests fail");
                    self.fail_all(|| EngineError::Internal("generation panicked".into()));
                }
            }
            self.publish_stats();
        }
        tracing::info!(path = %self.model.path.display(), "engine thread stopped");
    }

    /// Admits work while there is room, highest priority first; parks the thread (no spinning)
    /// when there is nothing to do. Returns false once every handle is gone and all work is
    /// done.
    fn admit(&mut self, queue: &Queue) -> bool {
        loop {
            for priority in Priority::ALL {
                if !self.admit_priority(queue, priority) {
                    // This level waits for room: the levels below wait behind it.
                    return true;
                }
            }
            if !self.running.is_empty() {
                return true;
            }
            // Idle: sleep until a request arrives.
            let mut w = queue.lock();
            while w.queues.iter().all(VecDeque::is_empty) {
                if w.closed {
                    return false;
                }
                w = queue.arrived.wait(w).unwrap_or_else(|e| e.into_inner());
            }
        }
    }

    /// Resumes preempted sequences, then starts queued requests, of one priority, while there is
    /// room. Returns whether everything of that priority is running (nothing left waiting).
    fn admit_priority(&mut self, queue: &Queue, priority: Priority) -> bool {
        if !self.resume_preempted(priority) {
            return false;
        }
        loop {
            let request = match self.next[priority.index()].take() {
                Some(r) => r,
                None => match queue.lock().queues[priority.index()].pop_front() {
                    Some(r) => r,
                    None => return true,
                },
            };
            let n = request.choices.max(1) as usize;
            // Room for a request is made by preempting sequences of lower priority.
            while self.running.len() + n > self.opts.max_running
                && self.running.last().is_some_and(|r| r.priority > priority)
            {
                self.preempt_last();
            }
            if !self.running.is_empty() && self.running.len() + n > self.opts.max_running {
                self.next[priority.index()] = Some(request);
                return false;
            }
            self.stats.waiting.fetch_sub(1, Ordering::Relaxed);
            if priority.is_interactive() {
                self.stats
                    .interactive_waiting
                    .fetch_sub(1, Ordering::Relaxed);
            }
            self.start(request);
        }
    }

    /// Resumes preempted sequences of one priority, oldest first, while the batch has room and
    /// the pool has blocks for their context (with a block of headroom per running sequence).
    /// Returns whether none of that priority is left preempted.
    fn resume_preempted(&mut self, priority: Priority) -> bool {
        while let Some(i) = self.preempted.iter().position(|p| p.priority == priority) {
            let p = &self.preempted[i];
            if self.requests.get(&p.req).is_none_or(|a| a.cancelled) {
                let p = self.preempted.remove(i).expect("index found");
                self.finish_choice(p.req);
                continue;
            }
            let bs = self.storage.block_size();
            let need = p.seq.context().len().div_ceil(bs) + 1 + self.running.len();
            if !self.running.is_empty()
                && (self.running.len() >= self.opts.max_running || need > self.blocks.available())
            {
                return false;
            }
            let mut p = self.preempted.remove(i).expect("index found");
            let root = cache_root(p.adapter.as_deref());
            let (mut session, registered, parent_hash) = self.session_for(p.seq.context(), root);
            p.seq.resume(&mut session);
            self.push_running(Running {
                req: p.req,
                choice: p.choice,
                priority: p.priority,
                seq: p.seq,
                session,
                adapter: p.adapter,
                embeds: p.embeds,
                registered,
                parent_hash,
                draft: None,
            });
        }
        true
    }

    /// Adds a sequence after the others of its priority (and before those of lower ones).
    fn push_running(&mut self, r: Running<'m>) {
        let at = self
            .running
            .iter()
            .position(|x| x.priority > r.priority)
            .unwrap_or(self.running.len());
        self.running.insert(at, r);
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
            let root = cache_root(request.adapter.as_deref());
            let (mut session, registered, parent_hash) = self.session_for(&request.prompt, root);
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
                        priority: request.priority,
                        seq,
                        session,
                        adapter: request.adapter.clone(),
                        embeds: request.embeds.clone(),
                        registered,
                        parent_hash,
                        draft: None,
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
        for r in started {
            self.push_running(r);
        }
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
    /// leaving at least one token to run), with the count and hash of those blocks. `root`
    /// starts the hash chain: each adapter's keys and values are cached apart from the base's.
    fn session_for(&mut self, context: &[u32], root: u64) -> (Session, usize, u64) {
        let mut kv = KvCache::pooled(Arc::clone(&self.storage), self.model.context_length);
        let bs = self.storage.block_size();
        let usable = context.len().saturating_sub(1) / bs;
        let mut parent = root;
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

    /// One forward pass over the batch, then sampling and events. Returns the decode tokens
    /// and the units of prompt work ([`StepPlanner::units`]) the pass read (`None` when
    /// nothing ran).
    fn step(&mut self) -> Option<(usize, f64)> {
        self.draft_proposals();
        let wants: Vec<Want> = self
            .running
            .iter()
            .map(|r| match r.seq.is_prefilling() {
                true => Want::Prompt {
                    left: r.seq.prompt_left(),
                    depth: r.session.kv.len(),
                },
                // One token, or the token and the predicted ones to verify after it.
                false => Want::Decode(r.seq.decode_len()),
            })
            .collect();
        let mut plan = self.planner.plan(&wants);
        self.reserve_blocks(&mut plan);
        if self.running.is_empty() {
            return None;
        }
        let (mut decode_tokens, mut prompt_units) = (0, 0.0);
        for (r, p) in self.running.iter().zip(&plan) {
            match (r.seq.is_prefilling(), p) {
                (true, Some(n)) => prompt_units += self.planner.units(*n, r.session.kv.len()),
                (false, Some(n)) => decode_tokens += n,
                _ => {}
            }
        }
        // Grammar masks are computed on a helper thread while the forward pass runs, so
        // constrained sequences do not hold up the others (llguidance's matcher state is known
        // before the logits are).
        let mut constrained: Vec<(usize, Constraint)> = Vec::new();
        for (i, (r, p)) in self.running.iter_mut().zip(&plan).enumerate() {
            if p.is_some() && !r.seq.is_prefilling() {
                if let Some(c) = r.seq.take_constraint() {
                    constrained.push((i, c));
                }
            }
        }
        let mut fed: Vec<(usize, usize, Logits)> = Vec::with_capacity(plan.len());
        let result = std::thread::scope(|scope| {
            if !constrained.is_empty() {
                scope.spawn(|| {
                    for (_, c) in constrained.iter_mut() {
                        c.prepare();
                    }
                });
            }
            let mut batch = Vec::with_capacity(plan.len());
            for (i, (r, p)) in self.running.iter_mut().zip(&plan).enumerate() {
                if let Some(n) = *p {
                    let (tokens, logits) = r.seq.next_input(n);
                    fed.push((i, tokens.len(), logits));
                    batch.push(SeqInput {
                        kv: &mut r.session.kv,
                        tokens,
                        logits,
                        adapter: r.adapter.as_deref(),
                        embeds: r.embeds.as_deref(),
                    });
                }
            }
            self.model
                .model
                .forward_batch(&self.model.pool, &mut self.ws, &mut batch)
                .map(|_| ())
        });
        for (i, c) in constrained {
            self.running[i].seq.put_constraint(c);
        }
        self.stats.steps.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = result {
            let message = e.to_string();
            self.fail_all(|| EngineError::Internal(message.clone()));
            return None;
        }
        let vocab = self.model.model.cfg.vocab_size;
        let bs = self.storage.block_size();
        let logits = self.ws.logits_mut();
        let mut row = 0;
        for &(i, n, mode) in &fed {
            let r = &mut self.running[i];
            r.seq.fed(&mut r.session, n);
            if mode == Logits::None {
                register_full_blocks(&mut self.blocks, r, bs);
                continue;
            }
            let rows = if mode == Logits::All { n } else { 1 };
            let before = r.seq.generated();
            let drafted_before = r.seq.draft_counts();
            let events = r
                .seq
                .sample_rows(&mut logits[row * vocab..(row + rows) * vocab], vocab);
            row += rows;
            // Rejected proposals leave the cache before any block is registered: a block in
            // the prefix cache never changes.
            r.seq.rollback(&mut r.session);
            register_full_blocks(&mut self.blocks, r, bs);
            self.stats
                .generated_tokens
                .fetch_add((r.seq.generated() - before) as u64, Ordering::Relaxed);
            let drafted = r.seq.draft_counts();
            self.stats
                .draft_accepted
                .fetch_add((drafted.0 - drafted_before.0) as u64, Ordering::Relaxed);
            self.stats
                .draft_rejected
                .fetch_add((drafted.1 - drafted_before.1) as u64, Ordering::Relaxed);
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
        Some((decode_tokens, prompt_units))
    }

    /// With a draft model: the draft reads along with every sequence that wants one and
    /// proposes the next tokens of those decoding, for this step to verify. A draft failure
    /// only costs the proposals: the sequences decode one token at a time.
    fn draft_proposals(&mut self) {
        let Some(drafter) = &mut self.drafter else {
            return;
        };
        let k_max = drafter.draft().tokens();
        let mut jobs: Vec<(usize, DraftJob<'_>)> = Vec::new();
        for (i, r) in self.running.iter_mut().enumerate() {
            // (A draft model reads token ids only: a prompt with image rows is not drafted.)
            if !r.seq.wants_draft() || r.embeds.is_some() {
                r.draft = None;
                continue;
            }
            let capacity = r.session.kv.capacity();
            let cache = r
                .draft
                .get_or_insert_with(|| DraftCache::new(drafter.draft(), capacity));
            let pending = r.seq.pending_token();
            jobs.push((
                i,
                DraftJob {
                    cache,
                    context: r.seq.context(),
                    pending,
                    k: pending.map_or(0, |_| r.seq.proposal_room().min(k_max)),
                    proposals: Vec::new(),
                },
            ));
        }
        // Decoding sequences first: they need a token or two read, the others their prompt.
        jobs.sort_by_key(|(_, j)| j.pending.is_none());
        let (index, mut jobs): (Vec<usize>, Vec<DraftJob<'_>>) = jobs.into_iter().unzip();
        let result = drafter.run(&self.model.pool, &mut jobs, self.opts.step_tokens.max(1));
        let proposals: Vec<Vec<u32>> = jobs.into_iter().map(|j| j.proposals).collect();
        if let Err(e) = result {
            tracing::warn!(error = %e, "the draft model failed; decoding without proposals");
            for r in &mut self.running {
                r.draft = None;
            }
            return;
        }
        for (i, p) in index.into_iter().zip(proposals) {
            let seq = &mut self.running[i].seq;
            if seq.pending_token().is_some() {
                seq.set_draft(&p);
            }
        }
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
                plan.pop();
                self.preempt_last();
            }
            i += 1;
        }
    }

    /// Releases the last running sequence's blocks (the newest background one if any, else the
    /// newest); it is resumed later by recomputation.
    fn preempt_last(&mut self) {
        let mut r = self.running.pop().expect("a running sequence");
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
            priority: r.priority,
            seq: r.seq,
            adapter: r.adapter,
            embeds: r.embeds,
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
        let per_block = KvStorage::bytes_per_block(
            cfg.n_layers,
            cfg.kv_dim(),
            self.storage.block_size(),
            self.storage.kind(),
        );
        s.running
            .store(self.running.len() as u64, Ordering::Relaxed);
        let interactive = self
            .running
            .iter()
            .filter(|r| r.priority.is_interactive())
            .count();
        s.interactive_running
            .store(interactive as u64, Ordering::Relaxed);
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
