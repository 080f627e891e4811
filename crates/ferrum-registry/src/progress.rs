//! Progress reporting for long fetches: a terminal bar, log lines, or nothing.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

/// Receives progress of a fetch. A fetch runs one or more phases, each `begin` .. `finish`.
///
/// Methods take `&self` so that one reporter can be shared, and implementations must tolerate
/// any call order (for example `advance` without `begin`) because a failed fetch stops midway.
pub trait Progress: Send + Sync {
    /// Starts a phase that will process `total_bytes` (0 if unknown), described by `label`.
    fn begin(&self, total_bytes: u64, label: &str);
    /// Reports that `bytes` more bytes of the current phase are done.
    fn advance(&self, bytes: u64);
    /// Reports a step within the phase, such as `chunk 3/22: downloading …`.
    fn message(&self, text: &str);
    /// Ends the current phase.
    fn finish(&self);
}

/// Reports nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn begin(&self, _: u64, _: &str) {}
    fn advance(&self, _: u64) {}
    fn message(&self, _: &str) {}
    fn finish(&self) {}
}

/// Chooses a progress bar when stderr is a terminal and log lines otherwise (services, CI).
pub fn default_progress() -> Box<dyn Progress> {
    if std::io::stderr().is_terminal() {
        Box::new(TerminalProgress::default())
    } else {
        Box::new(LogProgress::default())
    }
}

/// A progress bar on stderr, drawn with `indicatif`.
#[derive(Debug, Default)]
pub struct TerminalProgress {
    bar: Mutex<Option<ProgressBar>>,
}

impl TerminalProgress {
    fn with_bar(&self, f: impl FnOnce(&ProgressBar)) {
        // A poisoned lock only means another thread panicked while drawing; keep drawing.
        let guard = self.bar.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(bar) = guard.as_ref() {
            f(bar);
        }
    }
}

impl Progress for TerminalProgress {
    fn begin(&self, total_bytes: u64, label: &str) {
        let bar = ProgressBar::new(total_bytes);
        // Two lines, so a long step message never pushes the bar off a narrow terminal.
        let template =
            "{prefix}: {wide_msg}\n[{bar:40}] {bytes}/{total_bytes} {bytes_per_sec}, eta {eta}";
        if let Ok(style) = ProgressStyle::with_template(template) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_prefix(label.to_string());
        // Chunks arrive whole from pip, so a steady tick shows the fetch is alive between them.
        bar.enable_steady_tick(Duration::from_millis(200));
        let mut guard = self.bar.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(old) = guard.replace(bar) {
            old.finish();
        }
    }

    fn advance(&self, bytes: u64) {
        self.with_bar(|bar| bar.inc(bytes));
    }

    fn message(&self, text: &str) {
        let mut shown = false;
        self.with_bar(|bar| {
            bar.set_message(text.to_string());
            shown = true;
        });
        if !shown {
            eprintln!("{text}");
        }
    }

    fn finish(&self) {
        let mut guard = self.bar.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(bar) = guard.take() {
            bar.finish_with_message("done");
        }
    }
}

/// Progress as `tracing` events: every message, and one line per tenth of the bytes.
#[derive(Debug, Default)]
pub struct LogProgress {
    label: Mutex<String>,
    total: AtomicU64,
    done: AtomicU64,
}

impl Progress for LogProgress {
    fn begin(&self, total_bytes: u64, label: &str) {
        *self.label.lock().unwrap_or_else(|e| e.into_inner()) = label.to_string();
        self.total.store(total_bytes, Ordering::Relaxed);
        self.done.store(0, Ordering::Relaxed);
        tracing::info!(total_bytes, "{label}");
    }

    fn advance(&self, bytes: u64) {
        let before = self.done.fetch_add(bytes, Ordering::Relaxed);
        let total = self.total.load(Ordering::Relaxed);
        if total == 0 {
            return;
        }
        let (from, to) = (before * 10 / total, (before + bytes) * 10 / total);
        if to > from {
            let label = self.label.lock().unwrap_or_else(|e| e.into_inner());
            tracing::info!("{label}: {}%", (to * 10).min(100));
        }
    }

    fn message(&self, text: &str) {
        tracing::info!("{text}");
    }

    fn finish(&self) {
        let label = self.label.lock().unwrap_or_else(|e| e.into_inner());
        tracing::info!("{label}: done");
    }
}
