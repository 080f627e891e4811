//! The usage ledger: every API response's token usage and cost, and totals per model.

use sqlx::any::AnyRow;
use sqlx::Row;

use crate::{Store, StoreError};

/// The usage of one API response, as the server records it.
#[derive(Clone, Debug, PartialEq)]
pub struct UsageRecord {
    /// The response's id (e.g. `chatcmpl-...`); recording the same id again changes nothing.
    pub id: String,
    /// When the response was created, in Unix seconds.
    pub created: i64,
    /// The tier id that served it.
    pub model: String,
    /// The API endpoint, e.g. `chat.completions`.
    pub endpoint: String,
    pub prompt_tokens: u64,
    /// Prompt tokens served from the prefix cache (a subset of `prompt_tokens`).
    pub cached_tokens: u64,
    pub completion_tokens: u64,
    pub cost_usd: f64,
    /// Whether it came from a batch rather than a live request.
    pub batch: bool,
}

/// Who a usage record belongs to: the project and key that made the request (both `None` for
/// requests on an open server or with the single `--api-key`), and the service tier it ran at
/// (`None`: the default tier).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Attribution {
    pub project_id: Option<String>,
    pub api_key_id: Option<String>,
    pub service_tier: Option<String>,
}

/// The sums over a model's records.
#[derive(Clone, Debug, PartialEq)]
pub struct UsageTotal {
    pub model: String,
    pub requests: u64,
    pub prompt_tokens: u64,
    pub cached_tokens: u64,
    pub completion_tokens: u64,
    pub cost_usd: f64,
}

impl Store {
    /// Records one response's usage. Idempotent on `rec.id`, so a retried write never counts
    /// a response twice.
    pub async fn record_usage(&self, rec: &UsageRecord) -> Result<(), StoreError> {
        insert_usage(&self.pool, rec, &Attribution::default()).await
    }

    /// Records one response's usage, attributed to a project and key.
    pub async fn record_usage_as(
        &self,
        rec: &UsageRecord,
        by: &Attribution,
    ) -> Result<(), StoreError> {
        insert_usage(&self.pool, rec, by).await
    }

    /// Totals per model, ordered by model id (byte order, the same on every backend), over
    /// all records or only those created at or after `since` (Unix seconds).
    pub async fn usage_totals(&self, since: Option<i64>) -> Result<Vec<UsageTotal>, StoreError> {
        // Postgres sums BIGINTs into NUMERIC, which `Any` cannot decode: hence the casts.
        let rows = sqlx::query(
            "SELECT model,
                    COUNT(*) AS requests,
                    CAST(SUM(prompt_tokens) AS BIGINT) AS prompt_tokens,
                    CAST(SUM(cached_tokens) AS BIGINT) AS cached_tokens,
                    CAST(SUM(completion_tokens) AS BIGINT) AS completion_tokens,
                    CAST(SUM(cost_usd) AS DOUBLE PRECISION) AS cost_usd
             FROM usage_records
             WHERE created >= $1
             GROUP BY model",
        )
        .bind(since.unwrap_or(i64::MIN))
        .fetch_all(&self.pool)
        .await?;
        let mut totals = rows.iter().map(total).collect::<Result<Vec<_>, _>>()?;
        // Sorted here rather than by ORDER BY, whose order follows the Postgres database's
        // collation and could differ from SQLite's.
        totals.sort_by(|a, b| a.model.cmp(&b.model));
        Ok(totals)
    }
}

fn total(row: &AnyRow) -> Result<UsageTotal, StoreError> {
    let count = |field: &'static str| to_u64(field, row.try_get(field)?);
    Ok(UsageTotal {
        model: row.try_get("model")?,
        requests: count("requests")?,
        prompt_tokens: count("prompt_tokens")?,
        cached_tokens: count("cached_tokens")?,
        completion_tokens: count("completion_tokens")?,
        cost_usd: row.try_get("cost_usd")?,
    })
}

/// Token counts are `u64` in Rust but BIGINT (signed) in SQL, the widest integer both
/// backends and `Any` share.
pub(crate) fn to_i64(field: &'static str, value: u64) -> Result<i64, StoreError> {
    i64::try_from(value).map_err(|_| StoreError::OutOfRange {
        field,
        value: value.to_string(),
    })
}

/// A count read back from a BIGINT column.
pub(crate) fn to_u64(field: &'static str, value: i64) -> Result<u64, StoreError> {
    u64::try_from(value).map_err(|_| StoreError::OutOfRange {
        field,
        value: value.to_string(),
    })
}

pub(crate) async fn insert_usage<'e>(
    exec: impl sqlx::Executor<'e, Database = sqlx::Any>,
    rec: &UsageRecord,
    by: &Attribution,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO usage_records
            (id, created, model, endpoint, prompt_tokens, cached_tokens,
             completion_tokens, cost_usd, batch, project_id, api_key_id, service_tier)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
         ON CONFLICT (id) DO NOTHING",
    )
    .bind(&rec.id)
    .bind(rec.created)
    .bind(&rec.model)
    .bind(&rec.endpoint)
    .bind(to_i64("prompt_tokens", rec.prompt_tokens)?)
    .bind(to_i64("cached_tokens", rec.cached_tokens)?)
    .bind(to_i64("completion_tokens", rec.completion_tokens)?)
    .bind(rec.cost_usd)
    .bind(i64::from(rec.batch))
    .bind(&by.project_id)
    .bind(&by.api_key_id)
    .bind(by.service_tier.as_deref().unwrap_or("default"))
    .execute(exec)
    .await?;
    Ok(())
}
