//! Batches and their lines, with the claims that let any number of workers (threads of one
//! server, or servers sharing a Postgres database) run them without running a line twice.
//!
//! Every step that must happen once is a claim: an `UPDATE ... WHERE <still claimable>` that
//! sets an owner and a lease. Both backends re-check the WHERE clause on the row a concurrent
//! writer just changed (SQLite by running one writer at a time, Postgres by re-evaluating it on
//! the new row version), so of two workers racing for a row exactly one gets it. A worker renews
//! its leases while it works; when it dies they run out and another worker takes the row over.
//! Results are written only by a row's current owner, so a worker that lost its lease (it
//! stalled, and another took over) cannot write a second result.

use sqlx::any::AnyRow;
use sqlx::{Connection, Row};

use crate::files::{insert_file, FileRecord};
use crate::page::{listed, new_seq, Sql};
use crate::projects::batch_owner;
use crate::usage::{insert_usage, to_i64, to_u64};
use crate::{Backend, Listed, Page, Store, StoreError, UsageRecord};

/// A batch's status, as the API names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BatchStatus {
    Validating,
    Failed,
    InProgress,
    Finalizing,
    Completed,
    Expired,
    Cancelling,
    Cancelled,
}

impl BatchStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            BatchStatus::Validating => "validating",
            BatchStatus::Failed => "failed",
            BatchStatus::InProgress => "in_progress",
            BatchStatus::Finalizing => "finalizing",
            BatchStatus::Completed => "completed",
            BatchStatus::Expired => "expired",
            BatchStatus::Cancelling => "cancelling",
            BatchStatus::Cancelled => "cancelled",
        }
    }

    fn parse(s: &str) -> Result<BatchStatus, StoreError> {
        Ok(match s {
            "validating" => BatchStatus::Validating,
            "failed" => BatchStatus::Failed,
            "in_progress" => BatchStatus::InProgress,
            "finalizing" => BatchStatus::Finalizing,
            "completed" => BatchStatus::Completed,
            "expired" => BatchStatus::Expired,
            "cancelling" => BatchStatus::Cancelling,
            "cancelled" => BatchStatus::Cancelled,
            other => {
                return Err(StoreError::OutOfRange {
                    field: "batches.status",
                    value: other.to_string(),
                })
            }
        })
    }
}

/// One batch (times in Unix seconds; JSON documents as text).
#[derive(Clone, Debug, PartialEq)]
pub struct BatchRecord {
    pub id: String,
    pub created_at: i64,
    pub endpoint: String,
    pub input_file_id: String,
    pub completion_window: String,
    pub status: BatchStatus,
    /// The metadata object, as JSON.
    pub metadata: Option<String>,
    /// The model of its lines (the first line's), known once validated.
    pub model: Option<String>,
    /// The validation errors, a JSON array of `{code, message, param, line}`.
    pub errors: Option<String>,
    pub output_file_id: Option<String>,
    pub error_file_id: Option<String>,
    pub in_progress_at: Option<i64>,
    pub expires_at: i64,
    pub finalizing_at: Option<i64>,
    pub completed_at: Option<i64>,
    pub failed_at: Option<i64>,
    pub expired_at: Option<i64>,
    pub cancelling_at: Option<i64>,
    pub cancelled_at: Option<i64>,
}

/// Counts and token sums over a batch's lines.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LineCounts {
    pub total: u64,
    pub completed: u64,
    pub failed: u64,
    pub input_tokens: u64,
    pub cached_tokens: u64,
    pub output_tokens: u64,
}

/// A line of a validated input file.
#[derive(Clone, Debug)]
pub struct NewLine {
    pub custom_id: String,
    /// The request body, as JSON.
    pub body: String,
}

/// A line a worker claimed and must now run.
#[derive(Clone, Debug, PartialEq)]
pub struct ClaimedLine {
    pub batch_id: String,
    /// 1-based line number in the input file.
    pub line: i64,
    pub custom_id: String,
    pub body: String,
}

/// What running a line produced.
#[derive(Clone, Debug)]
pub struct LineResult {
    /// The output JSONL line.
    pub result: String,
    /// Whether it goes to the error file.
    pub failed: bool,
    pub input_tokens: u64,
    pub cached_tokens: u64,
    pub output_tokens: u64,
    /// Its entry in the usage ledger, written in the same transaction as the result.
    pub usage: Option<UsageRecord>,
}

/// A finished line, for the output files.
#[derive(Clone, Debug, PartialEq)]
pub struct DoneLine {
    pub line: i64,
    pub custom_id: String,
    pub result: String,
    pub failed: bool,
}

const COLUMNS: &str = "id, created_at, endpoint, input_file_id, completion_window, status, \
    metadata, model, errors, output_file_id, error_file_id, in_progress_at, expires_at, \
    finalizing_at, completed_at, failed_at, expired_at, cancelling_at, cancelled_at";

impl Store {
    /// Records a new batch (status `validating`).
    pub async fn create_batch(&self, b: &BatchRecord) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO batches (id, seq, created_at, endpoint, input_file_id,
                completion_window, status, metadata, expires_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(&b.id)
        .bind(new_seq())
        .bind(b.created_at)
        .bind(&b.endpoint)
        .bind(&b.input_file_id)
        .bind(&b.completion_window)
        .bind(b.status.as_str())
        .bind(b.metadata.clone())
        .bind(b.expires_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn get_batch(&self, id: &str) -> Result<Option<BatchRecord>, StoreError> {
        let row = sqlx::query(&format!("SELECT {COLUMNS} FROM batches WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(batch).transpose()
    }

    pub async fn list_batches(&self, page: &Page) -> Result<Listed<BatchRecord>, StoreError> {
        let mut q = Sql::new(&format!("SELECT {COLUMNS} FROM batches WHERE 1 = 1"));
        self.push_page(&mut q, "batches", page).await?;
        let rows = q.query().fetch_all(&self.pool).await?;
        let items = rows.iter().map(batch).collect::<Result<Vec<_>, _>>()?;
        Ok(listed(items, page.limit))
    }

    /// Counts and token sums of a batch's finished lines.
    pub async fn batch_counts(&self, id: &str) -> Result<LineCounts, StoreError> {
        // Postgres sums BIGINTs into NUMERIC, which `Any` cannot decode: hence the casts.
        let row = sqlx::query(
            "SELECT COUNT(*) AS total,
                CAST(COALESCE(SUM(CASE WHEN state = 'done' AND failed = 0 THEN 1 ELSE 0 END), 0)
                    AS BIGINT) AS completed,
                CAST(COALESCE(SUM(CASE WHEN state = 'done' AND failed = 1 THEN 1 ELSE 0 END), 0)
                    AS BIGINT) AS failed,
                CAST(COALESCE(SUM(input_tokens), 0) AS BIGINT) AS input_tokens,
                CAST(COALESCE(SUM(cached_tokens), 0) AS BIGINT) AS cached_tokens,
                CAST(COALESCE(SUM(output_tokens), 0) AS BIGINT) AS output_tokens
             FROM batch_lines WHERE batch_id = $1",
        )
        .bind(id)
        .fetch_one(&self.pool)
        .await?;
        let get = |f: &'static str| -> Result<u64, StoreError> { to_u64(f, row.try_get(f)?) };
        Ok(LineCounts {
            total: get("total")?,
            completed: get("completed")?,
            failed: get("failed")?,
            input_tokens: get("input_tokens")?,
            cached_tokens: get("cached_tokens")?,
            output_tokens: get("output_tokens")?,
        })
    }

    /// Asks for a batch to stop: `validating` and `in_progress` batches become `cancelling`.
    /// Returns the batch as it now is and whether this call changed it, or `None` if unknown.
    pub async fn cancel_batch(
        &self,
        id: &str,
        now: i64,
    ) -> Result<Option<(bool, BatchRecord)>, StoreError> {
        let changed = sqlx::query(
            "UPDATE batches SET status = 'cancelling', cancelling_at = $1
             WHERE id = $2 AND status IN ('validating', 'in_progress')",
        )
        .bind(now)
        .bind(id)
        .execute(&self.pool)
        .await?
        .rows_affected()
            > 0;
        Ok(self.get_batch(id).await?.map(|b| (changed, b)))
    }

    /// Claims the oldest batch waiting for validation, if any.
    pub async fn claim_validation(
        &self,
        worker: &str,
        now_ms: i64,
        lease_ms: i64,
    ) -> Result<Option<BatchRecord>, StoreError> {
        let id: Option<String> = sqlx::query_scalar(
            "UPDATE batches SET owner = $1, lease_until = $2
             WHERE id = (SELECT id FROM batches
                         WHERE status = 'validating' AND (owner IS NULL OR lease_until < $3)
                         ORDER BY seq LIMIT 1)
               AND status = 'validating' AND (owner IS NULL OR lease_until < $4)
             RETURNING id",
        )
        .bind(worker)
        .bind(now_ms + lease_ms)
        .bind(now_ms)
        .bind(now_ms)
        .fetch_optional(&self.pool)
        .await?;
        match id {
            Some(id) => self.get_batch(&id).await,
            None => Ok(None),
        }
    }

    /// Moves a validated batch the worker owns to `in_progress` with its lines, in one
    /// transaction. Returns false (writing nothing) if the batch was cancelled meanwhile or the
    /// claim was lost; the claim is then given up.
    pub async fn start_batch(
        &self,
        id: &str,
        worker: &str,
        model: Option<&str>,
        lines: &[NewLine],
        now: i64,
    ) -> Result<bool, StoreError> {
        let mut conn = self.pool.acquire().await?;
        let mut tx = conn.begin().await?;
        let started = sqlx::query(
            "UPDATE batches SET status = 'in_progress', in_progress_at = $1, model = $2,
                owner = NULL, lease_until = NULL
             WHERE id = $3 AND status = 'validating' AND owner = $4",
        )
        .bind(now)
        .bind(model.map(str::to_string))
        .bind(id)
        .bind(worker)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if !started {
            tx.rollback().await?;
            // Back to the pool first: an in-memory database has only one connection.
            drop(conn);
            self.release_batch(id, worker).await?;
            return Ok(false);
        }
        for (i, l) in lines.iter().enumerate() {
            sqlx::query(
                "INSERT INTO batch_lines (batch_id, line, custom_id, body, state, attempts,
                    failed, input_tokens, cached_tokens, output_tokens)
                 VALUES ($1, $2, $3, $4, 'pending', 0, 0, 0, 0, 0)",
            )
            .bind(id)
            .bind(i as i64 + 1)
            .bind(&l.custom_id)
            .bind(&l.body)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    /// Fails a batch the worker owns (validation errors, as a JSON array).
    pub async fn fail_batch(
        &self,
        id: &str,
        worker: &str,
        errors: &str,
        now: i64,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE batches SET status = 'failed', failed_at = $1, errors = $2, owner = NULL,
                lease_until = NULL
             WHERE id = $3 AND status = 'validating' AND owner = $4",
        )
        .bind(now)
        .bind(errors)
        .bind(id)
        .bind(worker)
        .execute(&self.pool)
        .await?;
        if done.rows_affected() == 0 {
            self.release_batch(id, worker).await?;
        }
        Ok(done.rows_affected() == 1)
    }

    /// Gives up a worker's claim on a batch.
    pub async fn release_batch(&self, id: &str, worker: &str) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE batches SET owner = NULL, lease_until = NULL WHERE id = $1 AND owner = $2",
        )
        .bind(id)
        .bind(worker)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Claims up to `limit` lines to run, oldest batch first: pending lines, and lines whose
    /// worker's lease ran out (it died). Only `in_progress` batches give out lines.
    pub async fn claim_lines(
        &self,
        worker: &str,
        now_ms: i64,
        lease_ms: i64,
        limit: usize,
    ) -> Result<Vec<ClaimedLine>, StoreError> {
        // On Postgres, rows another worker is claiming right now are skipped rather than
        // waited for (the re-check of the outer WHERE already prevents a double claim).
        let skip_locked = match self.backend {
            Backend::Postgres => " FOR UPDATE OF l SKIP LOCKED",
            Backend::Sqlite => "",
        };
        let rows = sqlx::query(&format!(
            "UPDATE batch_lines
             SET state = 'running', owner = $1, lease_until = $2, attempts = attempts + 1
             WHERE (batch_id, line) IN (
                 SELECT l.batch_id, l.line FROM batch_lines l JOIN batches b ON b.id = l.batch_id
                 WHERE b.status = 'in_progress'
                   AND (l.state = 'pending' OR (l.state = 'running' AND l.lease_until < $3))
                 ORDER BY b.seq, l.line LIMIT $4{skip_locked})
               AND (state = 'pending' OR (state = 'running' AND lease_until < $5))
             RETURNING batch_id, line, custom_id, body"
        ))
        .bind(worker)
        .bind(now_ms + lease_ms)
        .bind(now_ms)
        .bind(limit as i64)
        .bind(now_ms)
        .fetch_all(&self.pool)
        .await?;
        let mut lines = rows
            .iter()
            .map(|r| {
                Ok(ClaimedLine {
                    batch_id: r.try_get("batch_id")?,
                    line: r.try_get("line")?,
                    custom_id: r.try_get("custom_id")?,
                    body: r.try_get("body")?,
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()?;
        lines.sort_by(|a, b| (&a.batch_id, a.line).cmp(&(&b.batch_id, b.line)));
        Ok(lines)
    }

    /// Extends every lease the worker holds (lines and batches) to `now + lease`.
    pub async fn renew_leases(
        &self,
        worker: &str,
        now_ms: i64,
        lease_ms: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE batch_lines SET lease_until = $1 WHERE owner = $2 AND state = 'running'",
        )
        .bind(now_ms + lease_ms)
        .bind(worker)
        .execute(&self.pool)
        .await?;
        sqlx::query("UPDATE batches SET lease_until = $1 WHERE owner = $2")
            .bind(now_ms + lease_ms)
            .bind(worker)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Hands the worker's running lines back (a clean shutdown), so others need not wait for
    /// the leases to run out.
    pub async fn release_lines(&self, worker: &str) -> Result<u64, StoreError> {
        let done = sqlx::query(
            "UPDATE batch_lines SET state = 'pending', owner = NULL, lease_until = NULL
             WHERE owner = $1 AND state = 'running'",
        )
        .bind(worker)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    /// Hands one running line back (its batch stopped while it ran).
    pub async fn release_line(&self, worker: &str, line: &ClaimedLine) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE batch_lines SET state = 'pending', owner = NULL, lease_until = NULL
             WHERE batch_id = $1 AND line = $2 AND owner = $3 AND state = 'running'",
        )
        .bind(&line.batch_id)
        .bind(line.line)
        .bind(worker)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Writes a line's result and its usage record in one transaction, if the worker still
    /// owns the line. Returns false (writing nothing) if it does not.
    pub async fn finish_line(
        &self,
        worker: &str,
        line: &ClaimedLine,
        result: &LineResult,
    ) -> Result<bool, StoreError> {
        let mut conn = self.pool.acquire().await?;
        let mut tx = conn.begin().await?;
        let written = sqlx::query(
            "UPDATE batch_lines SET state = 'done', owner = NULL, lease_until = NULL,
                result = $1, failed = $2, input_tokens = $3, cached_tokens = $4,
                output_tokens = $5
             WHERE batch_id = $6 AND line = $7 AND owner = $8 AND state = 'running'",
        )
        .bind(&result.result)
        .bind(i64::from(result.failed))
        .bind(to_i64("input_tokens", result.input_tokens)?)
        .bind(to_i64("cached_tokens", result.cached_tokens)?)
        .bind(to_i64("output_tokens", result.output_tokens)?)
        .bind(&line.batch_id)
        .bind(line.line)
        .bind(worker)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if !written {
            tx.rollback().await?;
            return Ok(false);
        }
        if let Some(usage) = &result.usage {
            // Billed to the project and key that created the batch.
            let owner = batch_owner(&mut *tx, &line.batch_id).await?;
            insert_usage(&mut *tx, usage, &owner).await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    /// Claims a batch ready to finalize: `in_progress` with every line done or past its
    /// expiry, `cancelling` with no line running under a live lease, or `finalizing` whose
    /// finalizer died. An `in_progress` batch becomes `finalizing`.
    pub async fn claim_finalization(
        &self,
        worker: &str,
        now_ms: i64,
        lease_ms: i64,
        now: i64,
    ) -> Result<Option<BatchRecord>, StoreError> {
        let id: Option<String> = sqlx::query_scalar(
            "UPDATE batches SET owner = $1, lease_until = $2,
                finalizing_at = CASE WHEN status = 'in_progress' THEN $3 ELSE finalizing_at END,
                status = CASE WHEN status = 'in_progress' THEN 'finalizing' ELSE status END
             WHERE id = (
                 SELECT b.id FROM batches b
                 WHERE (b.owner IS NULL OR b.lease_until < $4)
                   AND ((b.status = 'in_progress'
                         AND (b.expires_at < $5 OR NOT EXISTS (
                             SELECT 1 FROM batch_lines l
                             WHERE l.batch_id = b.id AND l.state <> 'done')))
                        OR b.status = 'finalizing'
                        OR (b.status = 'cancelling' AND NOT EXISTS (
                             SELECT 1 FROM batch_lines l
                             WHERE l.batch_id = b.id AND l.state = 'running'
                               AND l.lease_until >= $6)))
                 ORDER BY b.seq LIMIT 1)
               AND (owner IS NULL OR lease_until < $7)
               AND status IN ('in_progress', 'finalizing', 'cancelling')
             RETURNING id",
        )
        .bind(worker)
        .bind(now_ms + lease_ms)
        .bind(now)
        .bind(now_ms)
        .bind(now)
        .bind(now_ms)
        .bind(now_ms)
        .fetch_optional(&self.pool)
        .await?;
        match id {
            Some(id) => self.get_batch(&id).await,
            None => Ok(None),
        }
    }

    /// Lines of a batch not done yet (when it expires, the finalizer ends them).
    pub async fn unfinished_lines(&self, batch_id: &str) -> Result<Vec<(i64, String)>, StoreError> {
        let rows = sqlx::query(
            "SELECT line, custom_id FROM batch_lines WHERE batch_id = $1 AND state <> 'done'
             ORDER BY line",
        )
        .bind(batch_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| Ok((r.try_get("line")?, r.try_get("custom_id")?)))
            .collect::<Result<Vec<_>, sqlx::Error>>()?)
    }

    /// Ends a line that will not run (its batch expired) with an error result.
    pub async fn end_line(
        &self,
        batch_id: &str,
        line: i64,
        result: &str,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE batch_lines SET state = 'done', owner = NULL, lease_until = NULL,
                result = $1, failed = 1
             WHERE batch_id = $2 AND line = $3 AND state <> 'done'",
        )
        .bind(result)
        .bind(batch_id)
        .bind(line)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// A batch's finished lines in input order.
    pub async fn done_lines(&self, batch_id: &str) -> Result<Vec<DoneLine>, StoreError> {
        let rows = sqlx::query(
            "SELECT line, custom_id, result, failed FROM batch_lines
             WHERE batch_id = $1 AND state = 'done' ORDER BY line",
        )
        .bind(batch_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(DoneLine {
                    line: r.try_get("line")?,
                    custom_id: r.try_get("custom_id")?,
                    result: r
                        .try_get::<Option<String>, _>("result")?
                        .unwrap_or_default(),
                    failed: r.try_get::<i64, _>("failed")? == 1,
                })
            })
            .collect()
    }

    /// Ends a batch the worker is finalizing: records its output files and its final status
    /// (`completed`, `expired` or `cancelled`) in one transaction.
    pub async fn complete_batch(
        &self,
        id: &str,
        worker: &str,
        status: BatchStatus,
        output: Option<&FileRecord>,
        errors: Option<&FileRecord>,
        now: i64,
    ) -> Result<bool, StoreError> {
        let column = match status {
            BatchStatus::Completed => "completed_at",
            BatchStatus::Expired => "expired_at",
            BatchStatus::Cancelled => "cancelled_at",
            other => {
                return Err(StoreError::OutOfRange {
                    field: "final batch status",
                    value: other.as_str().into(),
                })
            }
        };
        let mut conn = self.pool.acquire().await?;
        let mut tx = conn.begin().await?;
        let done = sqlx::query(&format!(
            "UPDATE batches SET status = $1, {column} = $2, output_file_id = $3,
                error_file_id = $4, owner = NULL, lease_until = NULL
             WHERE id = $5 AND owner = $6 AND status IN ('finalizing', 'cancelling')"
        ))
        .bind(status.as_str())
        .bind(now)
        .bind(output.map(|f| f.id.clone()))
        .bind(errors.map(|f| f.id.clone()))
        .bind(id)
        .bind(worker)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if !done {
            tx.rollback().await?;
            return Ok(false);
        }
        for f in output.into_iter().chain(errors) {
            insert_file(&mut *tx, f).await?;
        }
        tx.commit().await?;
        Ok(true)
    }
}

fn batch(row: &AnyRow) -> Result<BatchRecord, StoreError> {
    Ok(BatchRecord {
        id: row.try_get("id")?,
        created_at: row.try_get("created_at")?,
        endpoint: row.try_get("endpoint")?,
        input_file_id: row.try_get("input_file_id")?,
        completion_window: row.try_get("completion_window")?,
        status: BatchStatus::parse(&row.try_get::<String, _>("status")?)?,
        metadata: row.try_get("metadata")?,
        model: row.try_get("model")?,
        errors: row.try_get("errors")?,
        output_file_id: row.try_get("output_file_id")?,
        error_file_id: row.try_get("error_file_id")?,
        in_progress_at: row.try_get("in_progress_at")?,
        expires_at: row.try_get("expires_at")?,
        finalizing_at: row.try_get("finalizing_at")?,
        completed_at: row.try_get("completed_at")?,
        failed_at: row.try_get("failed_at")?,
        expired_at: row.try_get("expired_at")?,
        cancelling_at: row.try_get("cancelling_at")?,
        cancelled_at: row.try_get("cancelled_at")?,
    })
}
