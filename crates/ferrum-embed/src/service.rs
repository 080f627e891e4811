//! The serving side of one embedding model: a worker thread that batches the inputs of
//! concurrent requests into shared forward passes.
//!
//! Dynamic batching as in Hugging Face's text-embeddings-inference: requests queue their
//! inputs; whenever the worker is free it takes queued inputs in arrival order into one padded
//! batch, up to `max_batch_inputs` inputs and `max_batch_tokens` padded tokens (inputs times the
//! longest one, which bounds the batch's activations and attention scores), runs it, and routes
//! each vector back to its request, which is answered once all of its inputs are done. A large
//! request is split over several batches; requests arriving while a batch runs share the next
//! one. The worker parks on a condition variable when the queue is empty, and a stopped
//! handle's worker finishes what was queued before it exits.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use crate::model::Embedder;

/// Receives a request's embeddings (in input order) or the failure of a batch it was in;
/// called once, on the worker thread.
pub type Reply = Box<dyn FnOnce(Result<Vec<Vec<f32>>, BatchFailed>) + Send>;

/// A forward pass failed (or panicked): every request with an input in it fails with this.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the embedding batch failed: {0}")]
pub struct BatchFailed(pub String);

/// Limits of the batches and the queue.
#[derive(Debug, Clone)]
pub struct BatchOptions {
    /// Padded tokens per forward pass (inputs x the longest input, special tokens included).
    pub max_batch_tokens: usize,
    /// Inputs per forward pass.
    pub max_batch_inputs: usize,
    /// Requests waiting or running; beyond it `submit` refuses.
    pub max_queued_requests: usize,
}

impl Default for BatchOptions {
    fn default() -> Self {
        // 8192 padded tokens: 16 inputs of the full 512 positions (whose attention scores take
        // 200 MB), or 128 sentences of 64 tokens.
        BatchOptions {
            max_batch_tokens: 8192,
            max_batch_inputs: 128,
            max_queued_requests: 1024,
        }
    }
}

/// Why a request was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error("the queue is full ({0} requests)")]
    QueueFull(usize),
    #[error("the embedding worker has stopped")]
    Stopped,
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct EmbedStats {
    /// Requests answered (embedded or failed).
    pub requests: AtomicU64,
    /// Inputs embedded.
    pub inputs: AtomicU64,
    /// Tokens of the inputs embedded, special tokens included.
    pub tokens: AtomicU64,
    /// Forward passes run.
    pub batches: AtomicU64,
    /// Requests waiting or running now.
    pub queued: AtomicU64,
}

/// One request: its inputs (tokens without the special tokens), the vectors done so far, and
/// where the answer goes.
struct Job {
    inputs: Vec<Vec<u32>>,
    /// The first input not yet taken into a batch.
    next: usize,
    vectors: Vec<Option<Vec<f32>>>,
    done: usize,
    reply: Option<Reply>,
}

impl Job {
    fn finish(&mut self, result: Result<Vec<Vec<f32>>, BatchFailed>) {
        if let Some(reply) = self.reply.take() {
            reply(result);
        }
    }
}

#[derive(Default)]
struct Queue {
    incoming: VecDeque<Job>,
    stopped: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
    stats: EmbedStats,
    options: BatchOptions,
}

/// A running embedding model: submit requests, read counters. Dropping the last handle stops
/// the worker once the queued requests are done.
pub struct EmbedHandle {
    shared: Arc<Shared>,
    embedder: Arc<Embedder>,
}

impl EmbedHandle {
    /// Starts the worker thread of `embedder`.
    pub fn spawn(embedder: Embedder, options: BatchOptions) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            queue: Mutex::default(),
            wake: Condvar::new(),
            stats: EmbedStats::default(),
            options,
        });
        let embedder = Arc::new(embedder);
        let worker = Worker {
            shared: Arc::clone(&shared),
            embedder: Arc::clone(&embedder),
            active: VecDeque::new(),
        };
        std::thread::Builder::new()
            .name("ferrum-embed".into())
            .spawn(move || worker.run())?;
        Ok(EmbedHandle { shared, embedder })
    }

    /// The model, to tokenize and check inputs before submitting them.
    pub fn embedder(&self) -> &Embedder {
        &self.embedder
    }

    pub fn stats(&self) -> &EmbedStats {
        &self.shared.stats
    }

    /// Queues a request's inputs (tokens without the special tokens, each checked with
    /// [`Embedder::check`]); `reply` gets their vectors in order.
    pub fn submit(&self, inputs: Vec<Vec<u32>>, reply: Reply) -> Result<(), SubmitError> {
        let mut queue = self.shared.queue.lock().unwrap_or_else(|p| p.into_inner());
        if queue.stopped {
            return Err(SubmitError::Stopped);
        }
        let max = self.shared.options.max_queued_requests;
        if self.shared.stats.queued.load(Ordering::Relaxed) >= max as u64 {
            return Err(SubmitError::QueueFull(max));
        }
        self.shared.stats.queued.fetch_add(1, Ordering::Relaxed);
        queue.incoming.push_back(Job {
            vectors: vec![None; inputs.len()],
            inputs,
            next: 0,
            done: 0,
            reply: Some(reply),
        });
        drop(queue);
        self.shared.wake.notify_one();
        Ok(())
    }
}

impl Drop for EmbedHandle {
    fn drop(&mut self) {
        let mut queue = self.shared.queue.lock().unwrap_or_else(|p| p.into_inner());
        queue.stopped = true;
        drop(queue);
        self.shared.wake.notify_one();
    }
}

/// The worker thread's state: the requests it has taken from the queue, oldest first.
struct Worker {
    shared: Arc<Shared>,
    embedder: Arc<Embedder>,
    active: VecDeque<Job>,
}

/// One input in a batch: which active job, and which of its inputs.
type Slot = (usize, usize);

impl Worker {
    fn run(mut self) {
        while self.take_work() {
            let batch = self.plan();
            if !batch.is_empty() {
                self.run_batch(&batch);
            }
            self.retire();
        }
        tracing::debug!("embedding worker stopped");
    }

    /// Moves queued requests to `active`, parking while there is nothing to do; false once the
    /// handle is gone and everything queued is done.
    fn take_work(&mut self) -> bool {
        let mut queue = self.shared.queue.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            self.active.extend(queue.incoming.drain(..));
            if !self.active.is_empty() {
                return true;
            }
            if queue.stopped {
                return false;
            }
            queue = self
                .shared
                .wake
                .wait(queue)
                .unwrap_or_else(|p| p.into_inner());
        }
    }

    /// The next batch: inputs in arrival order while the padded batch stays within the limits
    /// (always at least one input, so an input longer than the token budget still runs).
    fn plan(&mut self) -> Vec<Slot> {
        let options = &self.shared.options;
        let specials = self.embedder.special_tokens();
        let mut batch = Vec::new();
        let mut width = 0;
        for (j, job) in self.active.iter_mut().enumerate() {
            while job.next < job.inputs.len() {
                let len = job.inputs[job.next].len() + specials;
                let wider = width.max(len);
                let full = batch.len() == options.max_batch_inputs
                    || (batch.len() + 1) * wider > options.max_batch_tokens;
                if full && !batch.is_empty() {
                    return batch;
                }
                batch.push((j, job.next));
                width = wider;
                job.next += 1;
            }
        }
        batch
    }

    /// Runs one forward pass and hands each vector to its job; a failed pass fails every job
    /// with an input in it.
    fn run_batch(&mut self, batch: &[Slot]) {
        let inputs: Vec<&[u32]> = batch
            .iter()
            .map(|&(j, i)| self.active[j].inputs[i].as_slice())
            .collect();
        let embedder = &self.embedder;
        let result = match std::panic::catch_unwind(AssertUnwindSafe(|| embedder.embed(&inputs))) {
            Ok(result) => result.map_err(|e| BatchFailed(e.to_string())),
            Err(panic) => Err(BatchFailed(format!(
                "the forward pass panicked: {}",
                panic_message(panic.as_ref())
            ))),
        };
        let stats = &self.shared.stats;
        stats.batches.fetch_add(1, Ordering::Relaxed);
        match result {
            Ok(vectors) => {
                let specials = embedder.special_tokens();
                let tokens: usize = inputs.iter().map(|t| t.len() + specials).sum();
                stats
                    .inputs
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
                stats.tokens.fetch_add(tokens as u64, Ordering::Relaxed);
                for (&(j, i), v) in batch.iter().zip(vectors) {
                    let job = &mut self.active[j];
                    job.vectors[i] = Some(v);
                    job.done += 1;
                }
            }
            Err(e) => {
                tracing::error!(error = %e, inputs = batch.len(), "embedding batch failed");
                for &(j, _) in batch {
                    // Each failed job gets the error once; later slots find no reply.
                    self.active[j].finish(Err(e.clone()));
                }
            }
        }
    }

    /// Answers the jobs whose inputs are all done and drops them (and failed ones).
    fn retire(&mut self) {
        let stats = &self.shared.stats;
        self.active.retain_mut(|job| {
            if job.reply.is_some() && job.done < job.inputs.len() {
                return true;
            }
            // Counted before the reply, so a client that got its answer sees it counted.
            stats.requests.fetch_add(1, Ordering::Relaxed);
            stats.queued.fetch_sub(1, Ordering::Relaxed);
            if job.reply.is_some() {
                let vectors = job.vectors.drain(..).flatten().collect();
                job.finish(Ok(vectors));
            }
            false
        });
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}
