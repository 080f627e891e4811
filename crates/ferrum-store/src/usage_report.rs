//! The ledger summed per time bucket, project, key, model and batch flag: what the
//! organization usage and costs APIs are computed from.

use sqlx::any::AnyRow;
use sqlx::Row;

use crate::page::Sql;
use crate::usage::to_u64;
use crate::{Store, StoreError};

/// Which records to sum, and the bucket width.
#[derive(Clone, Debug, Default)]
pub struct UsageQuery {
    /// Records created at or after this time (Unix seconds)...
    pub start: i64,
    /// ...and before this one.
    pub end: i64,
    /// Bucket width in seconds; buckets start at `start`.
    pub width: i64,
    /// The ledger endpoints to include (`chat.completions`, `batch.chat.completions`, ...);
    /// empty: all.
    pub endpoints: Vec<String>,
    /// Only these projects, keys and models (empty: all).
    pub project_ids: Vec<String>,
    pub api_key_ids: Vec<String>,
    pub models: Vec<String>,
    /// Only batch records, or only the others.
    pub batch: Option<bool>,
}

/// The sums of one bucket's records that share a project, key, model, batch flag and service
/// tier.
#[derive(Clone, Debug, PartialEq)]
pub struct UsageGroup {
    /// The bucket's start (Unix seconds).
    pub bucket_start: i64,
    pub project_id: Option<String>,
    pub api_key_id: Option<String>,
    pub model: String,
    pub batch: bool,
    /// `default`, `flex` or `priority`.
    pub service_tier: String,
    pub requests: u64,
    pub prompt_tokens: u64,
    pub cached_tokens: u64,
    pub completion_tokens: u64,
    pub cost_usd: f64,
}

impl Store {
    /// The ledger's sums per bucket and (project, key, model, batch, service tier), ordered by
    /// bucket. The
    /// caller merges groups further when it groups by fewer fields.
    pub async fn usage_groups(&self, q: &UsageQuery) -> Result<Vec<UsageGroup>, StoreError> {
        let width = q.width.max(1);
        // Postgres sums BIGINTs into NUMERIC, which `Any` cannot decode: hence the casts.
        let mut sql = Sql::new("SELECT (created - ");
        sql.bind(q.start).push(") / ").bind(width).push(
            " AS bucket, project_id, api_key_id, model, batch, service_tier, COUNT(*) AS requests,
                CAST(SUM(prompt_tokens) AS BIGINT) AS prompt_tokens,
                CAST(SUM(cached_tokens) AS BIGINT) AS cached_tokens,
                CAST(SUM(completion_tokens) AS BIGINT) AS completion_tokens,
                CAST(SUM(cost_usd) AS DOUBLE PRECISION) AS cost_usd
             FROM usage_records WHERE created >= ",
        );
        sql.bind(q.start).push(" AND created < ").bind(q.end);
        push_in(&mut sql, "endpoint", &q.endpoints);
        push_in(&mut sql, "project_id", &q.project_ids);
        push_in(&mut sql, "api_key_id", &q.api_key_ids);
        push_in(&mut sql, "model", &q.models);
        if let Some(batch) = q.batch {
            sql.push(" AND batch = ").bind(i64::from(batch));
        }
        sql.push(" GROUP BY bucket, project_id, api_key_id, model, batch, service_tier");
        let rows = sql.query().fetch_all(&self.pool).await?;
        let mut groups = rows
            .iter()
            .map(|r| group(r, q.start, width))
            .collect::<Result<Vec<_>, _>>()?;
        // Sorted here, in byte order, rather than by ORDER BY, whose text order follows the
        // Postgres database's collation.
        groups.sort_by(|a, b| {
            (
                a.bucket_start,
                &a.project_id,
                &a.api_key_id,
                &a.model,
                a.batch,
                &a.service_tier,
            )
                .cmp(&(
                    b.bucket_start,
                    &b.project_id,
                    &b.api_key_id,
                    &b.model,
                    b.batch,
                    &b.service_tier,
                ))
        });
        Ok(groups)
    }
}

/// ` AND column IN ($n, ...)`, unless `values` is empty (no filter).
fn push_in(sql: &mut Sql, column: &str, values: &[String]) {
    if values.is_empty() {
        return;
    }
    sql.push(&format!(" AND {column} IN ("));
    for (i, v) in values.iter().enumerate() {
        if i > 0 {
            sql.push(", ");
        }
        sql.bind(v.clone());
    }
    sql.push(")");
}

fn group(row: &AnyRow, start: i64, width: i64) -> Result<UsageGroup, StoreError> {
    let count = |field: &'static str| to_u64(field, row.try_get(field)?);
    let bucket: i64 = row.try_get("bucket")?;
    Ok(UsageGroup {
        bucket_start: start + bucket * width,
        project_id: row.try_get("project_id")?,
        api_key_id: row.try_get("api_key_id")?,
        model: row.try_get("model")?,
        batch: row.try_get::<i64, _>("batch")? != 0,
        service_tier: row.try_get("service_tier")?,
        requests: count("requests")?,
        prompt_tokens: count("prompt_tokens")?,
        cached_tokens: count("cached_tokens")?,
        completion_tokens: count("completion_tokens")?,
        cost_usd: row.try_get("cost_usd")?,
    })
}
