//! Persistence through sqlx: a SQLite file by default, Postgres by URL (see ARCHITECTURE.md).
//!
//! One code path serves both backends: queries go through sqlx's `Any` driver, use `$1, $2`
//! placeholders (which SQLite accepts too) and only the types `Any` carries on both (`i64`,
//! `f64`, `String`; booleans as 0/1 integers). The schema is this crate's own embedded
//! migrations (`src/migrate.rs`), applied by [`Store::connect`].
//!
//! **Architecture invariant:** the store knows nothing of HTTP, the OpenAI wire types or the
//! engine; callers hand it plain records.

mod batches;
mod blobs;
mod completions;
mod connect;
mod error;
mod evals;
mod files;
mod fine_tuning;
mod migrate;
mod page;
mod projects;
mod ratelimits;
mod responses;
mod target;
mod usage;
mod usage_report;

pub use batches::{
    BatchRecord, BatchStatus, ClaimedLine, DoneLine, LineCounts, LineResult, NewLine,
};
pub use blobs::BlobStore;
pub use completions::{CompletionFilter, StoredCompletion};
pub use error::StoreError;
pub use evals::{
    ClaimedItem, CriterionCounts, EvalRecord, ItemOutcome, ItemResult, ModelUsage, NewItem,
    OutputFilter, OutputItemRecord, RunCounts, RunRecord, RunStatus,
};
pub use files::FileRecord;
pub use fine_tuning::{
    CheckpointRecord, EventRecord, FineTunedModel, JobFilter, JobRecord, JobStatus, JobSuccess,
    NewEvent,
};
pub use page::{Listed, Order, Page};
pub use projects::{FoundKey, KeyRecord, KeyScope, NewKey, ProjectRecord, ServiceAccountRecord};
pub use ratelimits::{Admission, DefaultLimits, LimitKind, RateLimitRecord, Window, WindowState};
pub use responses::ResponseRecord;
pub use target::Backend;
pub use usage::{Attribution, UsageRecord, UsageTotal};
pub use usage_report::{UsageGroup, UsageQuery};

use sqlx::AnyPool;

/// A handle on the platform's database; cheap to clone (the pool is shared).
#[derive(Clone, Debug)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
}

impl Store {
    /// Opens the database and brings its schema up to date.
    ///
    /// `url` is `sqlite:///abs/path/ferrum.db` or `sqlite://relative.db` (the file and its
    /// parent directories are created if missing; WAL mode), `sqlite::memory:` (a private
    /// database for tests), or `postgres://user:pass@host/db`.
    pub async fn connect(url: &str) -> Result<Store, StoreError> {
        connect::connect(url).await
    }

    /// The default database URL: a SQLite file at `$FERRUM_HOME/ferrum.db`, else
    /// `~/.cache/ferrum/ferrum.db`.
    pub fn default_url() -> String {
        target::default_url()
    }

    /// Which engine this store talks to.
    pub fn backend(&self) -> Backend {
        self.backend
    }
}
