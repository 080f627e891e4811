//! `/metrics` in the Prometheus text format: per model the engine's queue, batch and cache
//! counters (and an embedding model's inputs, tokens and batches), and server-wide latency
//! histograms (time to first token, inter-token latency).

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ferrum_embed::EmbedStats;
use ferrum_engine::EngineStats;

/// Upper bounds of the latency buckets, in seconds.
const BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// A cumulative histogram with fixed buckets, updated lock-free from any thread.
pub struct Histogram {
    counts: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    /// Sum in microseconds (atomics hold integers).
    sum_us: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            count: AtomicU64::new(0),
            sum_us: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        for (bound, count) in BUCKETS.iter().zip(&self.counts) {
            if secs <= *bound {
                count.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (bound, count) in BUCKETS.iter().zip(&self.counts) {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{bound}\"}} {}",
                count.load(Ordering::Relaxed)
            );
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {count}");
    }
}

/// One engine counter: name, Prometheus type, help text, and where to read it.
type EngineMetric = (
    &'static str,
    &'static str,
    &'static str,
    fn(&EngineStats) -> &AtomicU64,
);

/// One embedding model counter, as [`EngineMetric`].
type EmbeddingMetric = (
    &'static str,
    &'static str,
    &'static str,
    fn(&EmbedStats) -> &AtomicU64,
);

/// The counters of an embedding model's worker.
const EMBEDDING_METRICS: [EmbeddingMetric; 5] = [
    (
        "ferrum_embedding_requests_total",
        "counter",
        "Embedding requests answered.",
        |s| &s.requests,
    ),
    (
        "ferrum_embedding_inputs_total",
        "counter",
        "Inputs embedded.",
        |s| &s.inputs,
    ),
    (
        "ferrum_embedding_tokens_total",
        "counter",
        "Tokens of the inputs embedded, special tokens included.",
        |s| &s.tokens,
    ),
    (
        "ferrum_embedding_batches_total",
        "counter",
        "Embedding forward passes (inputs of concurrent requests share them).",
        |s| &s.batches,
    ),
    (
        "ferrum_embedding_queued_requests",
        "gauge",
        "Embedding requests waiting or running.",
        |s| &s.queued,
    ),
];

/// Server-wide measurements.
#[derive(Default)]
pub struct Metrics {
    pub ttft: Histogram,
    pub itl: Histogram,
    pub requests: AtomicU64,
    pub rejected_queue_full: AtomicU64,
    /// Batch lines this server ran whose result it wrote, by outcome.
    pub batch_lines_completed: AtomicU64,
    pub batch_lines_failed: AtomicU64,
    /// Failed responses by kind (`ServerError`'s labels), in label order for the exposition.
    errors: std::sync::Mutex<std::collections::BTreeMap<&'static str, u64>>,
}

impl Metrics {
    /// Counts one failed response of kind `label`.
    pub fn count_error(&self, label: &'static str) {
        let mut errors = self.errors.lock().unwrap_or_else(|p| p.into_inner());
        *errors.entry(label).or_default() += 1;
    }

    /// Counts a batch line whose result this server wrote (`completed` or `failed`).
    pub fn batch_line(&self, outcome: &str) {
        let counter = if outcome == "failed" {
            &self.batch_lines_failed
        } else {
            &self.batch_lines_completed
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// The exposition text, with the counters of each loaded chat and embedding model.
    pub fn render(
        &self,
        models: &[(String, &EngineStats)],
        embedders: &[(String, &EmbedStats)],
    ) -> String {
        let mut out = String::new();
        let gauges: [EngineMetric; 13] = [
            (
                "ferrum_running_sequences",
                "gauge",
                "Sequences in the running batch.",
                |s| &s.running,
            ),
            (
                "ferrum_waiting_requests",
                "gauge",
                "Requests queued for admission.",
                |s| &s.waiting,
            ),
            (
                "ferrum_kv_cache_bytes",
                "gauge",
                "Bytes of the KV blocks running sequences hold.",
                |s| &s.kv_bytes,
            ),
            (
                "ferrum_kv_blocks_total",
                "gauge",
                "Blocks in the KV cache pool.",
                |s| &s.kv_blocks_total,
            ),
            (
                "ferrum_kv_blocks_used",
                "gauge",
                "KV blocks held by running sequences.",
                |s| &s.kv_blocks_used,
            ),
            (
                "ferrum_kv_blocks_cached",
                "gauge",
                "Unreferenced KV blocks kept for prefix reuse (evictable).",
                |s| &s.kv_blocks_cached,
            ),
            (
                "ferrum_engine_steps_total",
                "counter",
                "Forward passes run.",
                |s| &s.steps,
            ),
            (
                "ferrum_prompt_tokens_total",
                "counter",
                "Prompt tokens of admitted sequences.",
                |s| &s.prompt_tokens,
            ),
            (
                "ferrum_cached_prompt_tokens_total",
                "counter",
                "Prompt tokens served from the prefix cache.",
                |s| &s.cached_tokens,
            ),
            (
                "ferrum_generated_tokens_total",
                "counter",
                "Tokens generated.",
                |s| &s.generated_tokens,
            ),
            (
                "ferrum_preemptions_total",
                "counter",
                "Sequences preempted (cache dropped, recomputed later) to stay within the KV budget.",
                |s| &s.preemptions,
            ),
            (
                "ferrum_draft_accepted_tokens_total",
                "counter",
                "Draft-model proposals the model verified and kept (speculative decoding).",
                |s| &s.draft_accepted,
            ),
            (
                "ferrum_draft_rejected_tokens_total",
                "counter",
                "Draft-model proposals the model verified and rejected.",
                |s| &s.draft_rejected,
            ),
        ];
        for (name, kind, help, get) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (model, stats) in models {
                let v = get(stats).load(Ordering::Relaxed);
                let _ = writeln!(out, "{name}{{model=\"{model}\"}} {v}");
            }
        }
        let _ = writeln!(
            out,
            "# HELP ferrum_prefix_cache_hit_ratio Cached share of prompt tokens since start.\n\
             # TYPE ferrum_prefix_cache_hit_ratio gauge"
        );
        for (model, stats) in models {
            let prompt = stats.prompt_tokens.load(Ordering::Relaxed);
            let cached = stats.cached_tokens.load(Ordering::Relaxed);
            let ratio = if prompt == 0 {
                0.0
            } else {
                cached as f64 / prompt as f64
            };
            let _ = writeln!(
                out,
                "ferrum_prefix_cache_hit_ratio{{model=\"{model}\"}} {ratio}"
            );
        }
        for (name, kind, help, get) in EMBEDDING_METRICS {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (model, stats) in embedders {
                let v = get(stats).load(Ordering::Relaxed);
                let _ = writeln!(out, "{name}{{model=\"{model}\"}} {v}");
            }
        }
        for (name, help, v) in [
            (
                "ferrum_requests_total",
                "Chat completion requests accepted.",
                &self.requests,
            ),
            (
                "ferrum_rejected_queue_full_total",
                "Requests refused with 429.",
                &self.rejected_queue_full,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                v.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP ferrum_batch_lines_total Batch lines this server ran and wrote a result for.\n\
             # TYPE ferrum_batch_lines_total counter\n\
             ferrum_batch_lines_total{{outcome=\"completed\"}} {}\n\
             ferrum_batch_lines_total{{outcome=\"failed\"}} {}",
            self.batch_lines_completed.load(Ordering::Relaxed),
            self.batch_lines_failed.load(Ordering::Relaxed),
        );
        let _ = writeln!(
            out,
            "# HELP ferrum_errors_total Failed API responses, by kind.\n\
             # TYPE ferrum_errors_total counter"
        );
        for (kind, n) in self.errors.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let _ = writeln!(out, "ferrum_errors_total{{kind=\"{kind}\"}} {n}");
        }
        self.ttft.render(
            &mut out,
            "ferrum_time_to_first_token_seconds",
            "From request receipt to the first generated token.",
        );
        self.itl.render(
            &mut out,
            "ferrum_inter_token_latency_seconds",
            "Between consecutive generated tokens of a choice.",
        );
        out
    }
}
