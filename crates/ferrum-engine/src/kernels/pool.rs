//! A small thread pool for data-parallel kernels whose workers park instead of spinning.
//!
//! Why not rayon: a decode step dispatches ~150 small parallel loops, so dispatch latency
//! matters, and the machine may be shared. Peers that spin at barriers collapse to ~1 token/s
//! when a neighbour takes a core, because every step waits for the descheduled thread. Here:
//!
//! - Work is split into many small chunks claimed from one atomic counter. The calling thread
//!   takes part, so if a worker is descheduled the caller (or any awake worker) simply claims
//!   the remaining chunks; nobody waits for a thread that has not started.
//! - A worker spins for a short, bounded time after a job (the next job of a forward pass comes
//!   within microseconds) and then parks; the caller unparks only sleeping workers.
//! - The caller waits only for chunks that were actually claimed, spinning briefly, then parking.
//!
//! The job state is one `AtomicU64` packing (generation, chunk count, next chunk index), so a
//! late worker can never claim a chunk of a finished job: a claim is valid only if the index it
//! got is below the count packed in the same word, and the caller does not return before every
//! valid claim has completed.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle, Thread};
use std::time::{Duration, Instant};

const IDX_BITS: u32 = 24;
const CNT_BITS: u32 = 24;
const IDX_MASK: u64 = (1 << IDX_BITS) - 1;
const CNT_MASK: u64 = (1 << CNT_BITS) - 1;
/// The most chunks one job may have.
pub const MAX_CHUNKS: usize = (1 << (IDX_BITS - 1)) - 1;

/// How long an idle worker keeps polling for the next job before it parks.
const WORKER_SPIN: Duration = Duration::from_micros(50);
/// How long the caller polls for stragglers before it parks.
const CALLER_SPIN: Duration = Duration::from_micros(20);

type JobFn = dyn Fn(usize) + Sync;

struct Shared {
    /// generation (16 bits) | chunk count (24 bits) | next index (24 bits).
    state: AtomicU64,
    /// Completed chunks of the current job.
    done: AtomicUsize,
    /// The current job's closure, valid while the job runs. Written only by the caller between
    /// jobs, read by workers only after a valid claim (which the caller waits for).
    job: UnsafeCell<Option<*const JobFn>>,
    caller: Mutex<Option<Thread>>,
    caller_waiting: AtomicBool,
    sleeping: Vec<AtomicBool>,
    shutdown: AtomicBool,
}

// SAFETY: `job` is only written while no valid claim can exist (see the module docs), and the
// pointee is `Sync`.
unsafe impl Sync for Shared {}
unsafe impl Send for Shared {}

/// A fixed set of worker threads plus the calling thread.
pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: Vec<(Thread, JoinHandle<()>)>,
    /// Serialises `run` calls from different threads: one job at a time.
    run_lock: Mutex<()>,
}

impl ThreadPool {
    /// A pool with `n_threads` participants in total (the caller counts as one).
    pub fn new(n_threads: usize) -> Self {
        let n_workers = n_threads.max(1) - 1;
        let shared = Arc::new(Shared {
            state: AtomicU64::new(0),
            done: AtomicUsize::new(0),
            job: UnsafeCell::new(None),
            caller: Mutex::new(None),
            caller_waiting: AtomicBool::new(false),
            sleeping: (0..n_workers).map(|_| AtomicBool::new(false)).collect(),
            shutdown: AtomicBool::new(false),
        });
        let workers = (0..n_workers)
            .map(|i| {
                let shared = shared.clone();
                let handle = thread::Builder::new()
                    .name(format!("ferrum-kernel-{i}"))
                    .spawn(move || worker_loop(&shared, i))
                    .expect("failed to spawn a kernel worker thread");
                (handle.thread().clone(), handle)
            })
            .collect();
        ThreadPool {
            shared,
            workers,
            run_lock: Mutex::new(()),
        }
    }

    /// A pool sized to the machine's available parallelism (or `FERRUM_THREADS`).
    pub fn with_default_threads() -> Self {
        Self::new(default_threads())
    }

    pub fn n_threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// Runs `f(i)` for every `i in 0..n_chunks`, spread over the pool; returns when all are done.
    pub fn run(&self, n_chunks: usize, f: &(dyn Fn(usize) + Sync)) {
        if n_chunks == 0 {
            return;
        }
        if self.workers.is_empty() || n_chunks == 1 {
            (0..n_chunks).for_each(f);
            return;
        }
        assert!(n_chunks <= MAX_CHUNKS, "too many chunks for one job");
        let _guard = self.run_lock.lock().unwrap_or_else(|e| e.into_inner());
        let sh = &*self.shared;
        // SAFETY: no valid claim of the previous job can exist: we waited for all of them.
        // The lifetime of `f` is erased; it outlives the job because we wait for completion.
        unsafe {
            let ptr = std::mem::transmute::<*const (dyn Fn(usize) + Sync + '_), *const JobFn>(f);
            *sh.job.get() = Some(ptr);
        }
        sh.done.store(0, Ordering::Relaxed);
        *sh.caller.lock().unwrap_or_else(|e| e.into_inner()) = Some(thread::current());
        let gen = (sh.state.load(Ordering::Relaxed) >> (IDX_BITS + CNT_BITS)) + 1;
        let state = ((gen & 0xffff) << (IDX_BITS + CNT_BITS)) | ((n_chunks as u64) << IDX_BITS);
        sh.state.store(state, Ordering::Release);
        for (i, (thread, _)) in self.workers.iter().enumerate() {
            if sh.sleeping[i].swap(false, Ordering::AcqRel) {
                thread.unpark();
            }
        }
        claim_and_run(sh);
        wait_done(sh, n_chunks);
        // SAFETY: all claims completed; drop the dangling pointer.
        unsafe { *sh.job.get() = None };
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::Release);
        for (thread, _) in &self.workers {
            thread.unpark();
        }
        for (_, handle) in self.workers.drain(..) {
            let _ = handle.join();
        }
    }
}

pub fn default_threads() -> usize {
    std::env::var("FERRUM_THREADS")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|&n: &usize| n > 0)
        .unwrap_or_else(|| thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Claims chunks of the current job until none are left; returns how many it ran.
fn claim_and_run(sh: &Shared) -> usize {
    let mut ran = 0;
    loop {
        let prev = sh.state.fetch_add(1, Ordering::AcqRel);
        let idx = (prev & IDX_MASK) as usize;
        let cnt = ((prev >> IDX_BITS) & CNT_MASK) as usize;
        if idx >= cnt {
            return ran;
        }
        // SAFETY: a valid claim; the caller keeps the job alive until `done` reaches `cnt`.
        let f = unsafe { &*(*sh.job.get()).expect("job published before its state") };
        f(idx);
        ran += 1;
        if sh.done.fetch_add(1, Ordering::SeqCst) + 1 == cnt
            && sh.caller_waiting.load(Ordering::SeqCst)
        {
            if let Some(t) = sh.caller.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
                t.unpark();
            }
        }
    }
}

fn wait_done(sh: &Shared, n_chunks: usize) {
    let start = Instant::now();
    while sh.done.load(Ordering::Acquire) < n_chunks {
        if start.elapsed() < CALLER_SPIN {
            std::hint::spin_loop();
            continue;
        }
        sh.caller_waiting.store(true, Ordering::SeqCst);
        if sh.done.load(Ordering::SeqCst) < n_chunks {
            thread::park_timeout(Duration::from_millis(1));
        }
        sh.caller_waiting.store(false, Ordering::SeqCst);
    }
}

fn has_work(sh: &Shared) -> bool {
    let s = sh.state.load(Ordering::Acquire);
    (s & IDX_MASK) < ((s >> IDX_BITS) & CNT_MASK)
}

fn worker_loop(sh: &Shared, i: usize) {
    loop {
        if sh.shutdown.load(Ordering::Acquire) {
            return;
        }
        if has_work(sh) {
            claim_and_run(sh);
            continue;
        }
        let start = Instant::now();
        while !has_work(sh) && start.elapsed() < WORKER_SPIN {
            std::hint::spin_loop();
        }
        if has_work(sh) {
            continue;
        }
        sh.sleeping[i].store(true, Ordering::SeqCst);
        // Re-check after announcing sleep, so a job published in between is not missed; an
        // unpark that raced with this check leaves a token and `park` returns at once.
        if !has_work(sh) && !sh.shutdown.load(Ordering::Acquire) {
            thread::park();
        }
        sh.sleeping[i].store(false, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_every_chunk_exactly_once() {
        let pool = ThreadPool::new(3);
        for n in [1usize, 2, 7, 64, 1000] {
            let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
            pool.run(n, &|i| {
                hits[i].fetch_add(1, Ordering::Relaxed);
            });
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1), "n={n}");
        }
    }

    #[test]
    fn many_back_to_back_jobs_and_parked_workers() {
        let pool = ThreadPool::new(2);
        let total = AtomicUsize::new(0);
        for round in 0..2000 {
            pool.run(5, &|_| {
                total.fetch_add(1, Ordering::Relaxed);
            });
            if round % 500 == 0 {
                // Let workers fall asleep so the unpark path is exercised too.
                thread::sleep(Duration::from_millis(2));
            }
        }
        assert_eq!(total.load(Ordering::Relaxed), 10_000);
    }
}
