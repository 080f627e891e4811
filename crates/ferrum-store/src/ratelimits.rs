//! Per-project rate limits and the windows that count against them, in the database so that
//! every server sharing it enforces one limit.
//!
//! The algorithm is a fixed window per (project, model, window start): a minute for requests
//! and tokens, a day for batch input tokens. Admitting a request is one statement, an UPSERT on
//! the window's row that adds the request and its token estimate only if the sums stay within
//! the limits, reading the limits in the same statement (the project's row, else the server's
//! defaults) and returning the new sums. The database serialises concurrent UPSERTs on a row
//! (a row lock on Postgres, the write lock on SQLite), so two servers can never both take the
//! last unit of a window. No row comes back when the request does not fit; the caller then
//! reads the window to say which limit it hit. When a request completes, its real token count
//! replaces the estimate in the window it was admitted to (one UPDATE).
//!
//! A fixed window lets a client spend a limit at the end of one minute and again at the start
//! of the next: at most twice the limit over any sixty seconds, which is the price of one
//! row per window instead of one per request.

use sqlx::any::AnyRow;
use sqlx::Row;

use crate::usage::{to_i64, to_u64};
use crate::{Store, StoreError};

/// A project's limits on one model.
#[derive(Clone, Debug, PartialEq)]
pub struct RateLimitRecord {
    pub project_id: String,
    pub model: String,
    pub max_requests_per_1_minute: u64,
    pub max_tokens_per_1_minute: u64,
    pub batch_1_day_max_input_tokens: u64,
    /// Reserved capacity: the tokens a minute of this model that are served at priority
    /// (ahead of every other project's requests); 0 for none.
    pub reserved_tokens_per_1_minute: u64,
}

/// Which limits a window counts against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LimitKind {
    /// Requests and tokens per minute.
    Minute,
    /// Batch input tokens per day (requests unlimited).
    BatchDay,
}

/// One window's row: which project, which model (the window's own key, e.g. `batch:<model>`
/// for batch input), and when it starts (Unix seconds).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Window {
    pub project_id: String,
    /// The model whose limits apply (a tier id).
    pub model: String,
    pub kind: LimitKind,
    pub start: i64,
}

/// The limits a window is held to when the project has no row for the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DefaultLimits {
    pub requests: u64,
    pub tokens: u64,
}

/// A window's sums and the limits they were checked against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WindowState {
    pub requests: u64,
    pub tokens: u64,
    pub max_requests: u64,
    pub max_tokens: u64,
}

/// The outcome of an admission.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Counted; the window after it.
    Admitted(WindowState),
    /// Not counted: it would pass a limit. The window as it is, and the limits that apply.
    Refused(WindowState),
}

impl Window {
    /// The key of the window's row: batch windows are kept apart from the minute windows.
    fn row_model(&self) -> String {
        match self.kind {
            LimitKind::Minute => self.model.clone(),
            LimitKind::BatchDay => format!("batch:{}", self.model),
        }
    }

    /// SQL for the two limits (requests, tokens) that apply, the defaults bound at `$5, $6`.
    fn limit_sql(&self) -> (&'static str, &'static str) {
        match self.kind {
            LimitKind::Minute => (
                "COALESCE((SELECT max_requests_per_1_minute FROM project_rate_limits
                           WHERE project_id = $1 AND model = $7), $5)",
                "COALESCE((SELECT max_tokens_per_1_minute FROM project_rate_limits
                           WHERE project_id = $1 AND model = $7), $6)",
            ),
            LimitKind::BatchDay => (
                "$5",
                "COALESCE((SELECT batch_1_day_max_input_tokens FROM project_rate_limits
                           WHERE project_id = $1 AND model = $7), $6)",
            ),
        }
    }
}

impl Store {
    /// The limits set for a project (models without a row have the server's defaults).
    pub async fn rate_limits(&self, project_id: &str) -> Result<Vec<RateLimitRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT project_id, model, max_requests_per_1_minute, max_tokens_per_1_minute,
                    batch_1_day_max_input_tokens, reserved_tokens_per_1_minute
             FROM project_rate_limits WHERE project_id = $1",
        )
        .bind(project_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(rate_limit).collect()
    }

    /// Sets a project's limits on a model (all three; the caller fills in the current ones).
    pub async fn set_rate_limit(&self, r: &RateLimitRecord) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO project_rate_limits (project_id, model, max_requests_per_1_minute,
                max_tokens_per_1_minute, batch_1_day_max_input_tokens,
                reserved_tokens_per_1_minute)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (project_id, model) DO UPDATE SET
                max_requests_per_1_minute = excluded.max_requests_per_1_minute,
                max_tokens_per_1_minute = excluded.max_tokens_per_1_minute,
                batch_1_day_max_input_tokens = excluded.batch_1_day_max_input_tokens,
                reserved_tokens_per_1_minute = excluded.reserved_tokens_per_1_minute",
        )
        .bind(&r.project_id)
        .bind(&r.model)
        .bind(to_i64(
            "max_requests_per_1_minute",
            r.max_requests_per_1_minute,
        )?)
        .bind(to_i64(
            "max_tokens_per_1_minute",
            r.max_tokens_per_1_minute,
        )?)
        .bind(to_i64(
            "batch_1_day_max_input_tokens",
            r.batch_1_day_max_input_tokens,
        )?)
        .bind(to_i64(
            "reserved_tokens_per_1_minute",
            r.reserved_tokens_per_1_minute,
        )?)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// A project's reserved tokens a minute on a model (0 when it has none).
    pub async fn reserved_tokens(&self, project_id: &str, model: &str) -> Result<u64, StoreError> {
        let reserved: Option<i64> = sqlx::query_scalar(
            "SELECT reserved_tokens_per_1_minute FROM project_rate_limits
             WHERE project_id = $1 AND model = $2",
        )
        .bind(project_id)
        .bind(model)
        .fetch_optional(&self.pool)
        .await?;
        to_u64("reserved_tokens_per_1_minute", reserved.unwrap_or(0))
    }

    /// Counts one request of `tokens` (estimated) in `window` if it fits its limits: one UPSERT
    /// (see the module doc). A refusal reads the window once more, to report it.
    pub async fn admit(
        &self,
        window: &Window,
        tokens: u64,
        defaults: DefaultLimits,
    ) -> Result<Admission, StoreError> {
        let (max_requests, max_tokens) = window.limit_sql();
        let sql = format!(
            "INSERT INTO rate_limit_windows
                (project_id, model, window_start, requests, tokens, max_requests, max_tokens)
             SELECT $1, $2, $3, 1, $4, l.max_requests, l.max_tokens
             FROM (SELECT {max_requests} AS max_requests, {max_tokens} AS max_tokens) l
             WHERE 1 <= l.max_requests AND $4 <= l.max_tokens
             ON CONFLICT (project_id, model, window_start) DO UPDATE SET
                requests = rate_limit_windows.requests + 1,
                tokens = rate_limit_windows.tokens + excluded.tokens,
                max_requests = excluded.max_requests,
                max_tokens = excluded.max_tokens
             WHERE rate_limit_windows.requests + 1 <= excluded.max_requests
               AND rate_limit_windows.tokens + excluded.tokens <= excluded.max_tokens
             RETURNING requests, tokens, max_requests, max_tokens"
        );
        let row = sqlx::query(&sql)
            .bind(&window.project_id)
            .bind(window.row_model())
            .bind(window.start)
            .bind(to_i64("tokens", tokens)?)
            .bind(to_i64("max_requests", defaults.requests)?)
            .bind(to_i64("max_tokens", defaults.tokens)?)
            .bind(&window.model)
            .fetch_optional(&self.pool)
            .await?;
        if let Some(row) = row {
            return Ok(Admission::Admitted(state(&row)?));
        }
        // Refused: the window's sums (zero if it has no row yet) and the limits as they are.
        let sql = format!(
            "SELECT COALESCE((SELECT requests FROM rate_limit_windows
                              WHERE project_id = $1 AND model = $2 AND window_start = $3), 0)
                        AS requests,
                    COALESCE((SELECT tokens FROM rate_limit_windows
                              WHERE project_id = $1 AND model = $2 AND window_start = $3), 0)
                        AS tokens,
                    {max_requests} AS max_requests, {max_tokens} AS max_tokens
             WHERE $4 = $4"
        );
        let row = sqlx::query(&sql)
            .bind(&window.project_id)
            .bind(window.row_model())
            .bind(window.start)
            .bind(to_i64("tokens", tokens)?)
            .bind(to_i64("max_requests", defaults.requests)?)
            .bind(to_i64("max_tokens", defaults.tokens)?)
            .bind(&window.model)
            .fetch_one(&self.pool)
            .await?;
        Ok(Admission::Refused(state(&row)?))
    }

    /// Replaces an admitted request's estimate by what it really used: adds `delta` (real minus
    /// estimated, either sign) to the tokens of the window it was admitted to.
    pub async fn correct_window(&self, window: &Window, delta: i64) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE rate_limit_windows
             SET tokens = CASE WHEN tokens + $1 < 0 THEN 0 ELSE tokens + $1 END
             WHERE project_id = $2 AND model = $3 AND window_start = $4",
        )
        .bind(delta)
        .bind(&window.project_id)
        .bind(window.row_model())
        .bind(window.start)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Deletes the windows that started before `before` (no limit reads them any more).
    pub async fn prune_windows(&self, before: i64) -> Result<u64, StoreError> {
        let done = sqlx::query("DELETE FROM rate_limit_windows WHERE window_start < $1")
            .bind(before)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }
}

fn state(row: &AnyRow) -> Result<WindowState, StoreError> {
    Ok(WindowState {
        requests: to_u64("requests", row.try_get("requests")?)?,
        tokens: to_u64("tokens", row.try_get("tokens")?)?,
        max_requests: to_u64("max_requests", row.try_get("max_requests")?)?,
        max_tokens: to_u64("max_tokens", row.try_get("max_tokens")?)?,
    })
}

fn rate_limit(row: &AnyRow) -> Result<RateLimitRecord, StoreError> {
    Ok(RateLimitRecord {
        project_id: row.try_get("project_id")?,
        model: row.try_get("model")?,
        max_requests_per_1_minute: to_u64(
            "max_requests_per_1_minute",
            row.try_get("max_requests_per_1_minute")?,
        )?,
        max_tokens_per_1_minute: to_u64(
            "max_tokens_per_1_minute",
            row.try_get("max_tokens_per_1_minute")?,
        )?,
        batch_1_day_max_input_tokens: to_u64(
            "batch_1_day_max_input_tokens",
            row.try_get("batch_1_day_max_input_tokens")?,
        )?,
        reserved_tokens_per_1_minute: to_u64(
            "reserved_tokens_per_1_minute",
            row.try_get("reserved_tokens_per_1_minute")?,
        )?,
    })
}
