//! Evals, their runs and the runs' items, with the claims that let any number of workers grade
//! a run together without grading an item twice.
//!
//! A run is a small state machine: `queued` (its data source not read yet) -> `in_progress`
//! (one row per data source item, written in the same transaction as the status) ->
//! `completed`, or `failed` (the data source could not be read) or `canceled`. Reading the data
//! source is claimed like a batch's validation, and each item like a batch line (see
//! `batches.rs`): an `UPDATE ... WHERE <still claimable>` that sets an owner and a lease, renewed
//! while the worker lives, taken over when it runs out. An item's result (its output item), its
//! usage, its criteria rows and its usage ledger records are one transaction guarded by
//! `owner = <the worker> AND state = 'running'`, so every item is graded and billed once even
//! when a worker dies mid-run.

use sqlx::any::AnyRow;
use sqlx::{Connection, Row};

use crate::page::{listed, new_seq, Sql};
use crate::usage::{insert_usage, to_i64, to_u64};
use crate::{Backend, Listed, Page, Store, StoreError, UsageRecord};

/// One eval; its data source config and testing criteria are JSON as the API shows them.
#[derive(Clone, Debug, PartialEq)]
pub struct EvalRecord {
    pub id: String,
    pub created_at: i64,
    pub name: String,
    /// The metadata object, as JSON.
    pub metadata: Option<String>,
    pub data_source_config: String,
    pub testing_criteria: String,
}

/// A run's status, as the API names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunStatus {
    Queued,
    InProgress,
    Completed,
    Failed,
    Canceled,
}

impl RunStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Queued => "queued",
            RunStatus::InProgress => "in_progress",
            RunStatus::Completed => "completed",
            RunStatus::Failed => "failed",
            RunStatus::Canceled => "canceled",
        }
    }

    pub fn parse(s: &str) -> Option<RunStatus> {
        Some(match s {
            "queued" => RunStatus::Queued,
            "in_progress" => RunStatus::InProgress,
            "completed" => RunStatus::Completed,
            "failed" => RunStatus::Failed,
            "canceled" => RunStatus::Canceled,
            _ => return None,
        })
    }
}

/// One run of an eval (times in Unix seconds; JSON documents as text).
#[derive(Clone, Debug, PartialEq)]
pub struct RunRecord {
    pub id: String,
    pub eval_id: String,
    pub created_at: i64,
    pub name: String,
    pub model: String,
    pub status: RunStatus,
    /// The data source, as JSON.
    pub data_source: String,
    pub metadata: Option<String>,
    /// The error object `{code, message}` of a failed run, as JSON.
    pub error: Option<String>,
}

/// An item of a run's data source, as the worker that read it hands it to the store.
#[derive(Clone, Debug)]
pub struct NewItem {
    /// The item, as JSON.
    pub item: String,
    /// The sample given with it (a JSONL line's `sample`), as JSON.
    pub given: Option<String>,
}

/// An item a worker claimed and must now grade.
#[derive(Clone, Debug, PartialEq)]
pub struct ClaimedItem {
    pub run_id: String,
    /// 0-based index in the data source (the output item's `datasource_item_id`).
    pub index: i64,
    /// The output item's id.
    pub id: String,
    pub item: String,
    pub given: Option<String>,
}

/// What one model's calls for an item cost.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ModelUsage {
    pub model: String,
    pub invocations: u64,
    pub prompt_tokens: u64,
    pub cached_tokens: u64,
    pub completion_tokens: u64,
}

/// How a graded item came out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ItemOutcome {
    /// Every criterion passed.
    Pass,
    /// Some criterion failed.
    Fail,
    /// The item could not be sampled or graded.
    Error,
}

impl ItemOutcome {
    fn as_str(self) -> &'static str {
        match self {
            ItemOutcome::Pass => "pass",
            ItemOutcome::Fail => "fail",
            ItemOutcome::Error => "error",
        }
    }

    fn parse(s: &str) -> Result<ItemOutcome, StoreError> {
        Ok(match s {
            "pass" => ItemOutcome::Pass,
            "fail" => ItemOutcome::Fail,
            "error" => ItemOutcome::Error,
            other => {
                return Err(StoreError::OutOfRange {
                    field: "eval_run_items.status",
                    value: other.to_string(),
                })
            }
        })
    }
}

/// What grading an item produced.
#[derive(Clone, Debug)]
pub struct ItemResult {
    pub outcome: ItemOutcome,
    pub created_at: i64,
    /// The grader results (a JSON array).
    pub results: String,
    /// The sample graded (a JSON object).
    pub sample: String,
    /// Per model, the calls it made.
    pub usage: Vec<ModelUsage>,
    /// Per testing criterion (by id), whether the item passed it.
    pub criteria: Vec<(String, bool)>,
    /// Its entries in the usage ledger, written in the same transaction.
    pub ledger: Vec<UsageRecord>,
}

/// A graded item: an output item of the API.
#[derive(Clone, Debug, PartialEq)]
pub struct OutputItemRecord {
    pub id: String,
    pub run_id: String,
    pub index: i64,
    pub created_at: i64,
    pub outcome: ItemOutcome,
    pub item: String,
    pub results: String,
    pub sample: String,
}

/// Which output items a list returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputFilter {
    All,
    Passed,
    /// Failed or errored.
    Failed,
}

/// A run's items by outcome (`total` counts the items not graded yet too).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RunCounts {
    pub total: u64,
    pub passed: u64,
    pub failed: u64,
    pub errored: u64,
}

/// A testing criterion's results over a run's graded items.
#[derive(Clone, Debug, PartialEq)]
pub struct CriterionCounts {
    pub criterion: String,
    pub passed: u64,
    pub failed: u64,
}

const EVAL_COLUMNS: &str = "id, created_at, name, metadata, data_source_config, testing_criteria";
const RUN_COLUMNS: &str =
    "id, eval_id, created_at, name, model, status, data_source, metadata, error";
const ITEM_COLUMNS: &str = "id, run_id, item_index, created_at, status, item, results, sample";

impl Store {
    pub async fn create_eval(&self, e: &EvalRecord) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO evals (id, seq, created_at, name, metadata, data_source_config,
                testing_criteria)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&e.id)
        .bind(new_seq())
        .bind(e.created_at)
        .bind(&e.name)
        .bind(e.metadata.clone())
        .bind(&e.data_source_config)
        .bind(&e.testing_criteria)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn get_eval(&self, id: &str) -> Result<Option<EvalRecord>, StoreError> {
        let row = sqlx::query(&format!("SELECT {EVAL_COLUMNS} FROM evals WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(eval).transpose()
    }

    pub async fn list_evals(&self, page: &Page) -> Result<Listed<EvalRecord>, StoreError> {
        let mut q = Sql::new(&format!("SELECT {EVAL_COLUMNS} FROM evals WHERE 1 = 1"));
        self.push_page(&mut q, "evals", page).await?;
        let rows = q.query().fetch_all(&self.pool).await?;
        let items = rows.iter().map(eval).collect::<Result<Vec<_>, _>>()?;
        Ok(listed(items, page.limit))
    }

    /// Renames an eval and/or replaces its metadata (`Some(None)` clears it). Returns the eval
    /// as it now is, or `None` if unknown.
    pub async fn update_eval(
        &self,
        id: &str,
        name: Option<&str>,
        metadata: Option<Option<String>>,
    ) -> Result<Option<EvalRecord>, StoreError> {
        if let Some(name) = name {
            sqlx::query("UPDATE evals SET name = $1 WHERE id = $2")
                .bind(name)
                .bind(id)
                .execute(&self.pool)
                .await?;
        }
        if let Some(metadata) = metadata {
            sqlx::query("UPDATE evals SET metadata = $1 WHERE id = $2")
                .bind(metadata)
                .bind(id)
                .execute(&self.pool)
                .await?;
        }
        self.get_eval(id).await
    }

    /// Deletes an eval with its runs and their items; returns whether it existed. A worker
    /// grading one of its items finds its claim gone and writes nothing.
    pub async fn delete_eval(&self, id: &str) -> Result<bool, StoreError> {
        let mut conn = self.pool.acquire().await?;
        let mut tx = conn.begin().await?;
        for table in ["eval_run_items", "eval_run_usage", "eval_run_criteria"] {
            sqlx::query(&format!(
                "DELETE FROM {table} WHERE run_id IN (SELECT id FROM eval_runs WHERE eval_id = $1)"
            ))
            .bind(id)
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query("DELETE FROM eval_runs WHERE eval_id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        let found = sqlx::query("DELETE FROM evals WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?
            .rows_affected()
            > 0;
        tx.commit().await?;
        Ok(found)
    }

    /// Records a new run (status `queued`).
    pub async fn create_run(&self, r: &RunRecord) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO eval_runs (id, seq, eval_id, created_at, name, model, status,
                data_source, metadata, error)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        )
        .bind(&r.id)
        .bind(new_seq())
        .bind(&r.eval_id)
        .bind(r.created_at)
        .bind(&r.name)
        .bind(&r.model)
        .bind(r.status.as_str())
        .bind(&r.data_source)
        .bind(r.metadata.clone())
        .bind(r.error.clone())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// A run of an eval (`None` if either is unknown or the run belongs to another eval).
    pub async fn get_run(&self, eval_id: &str, id: &str) -> Result<Option<RunRecord>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {RUN_COLUMNS} FROM eval_runs WHERE id = $1 AND eval_id = $2"
        ))
        .bind(id)
        .bind(eval_id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(run).transpose()
    }

    /// A run by its id alone (the worker's view: an item knows its run, not its eval).
    pub async fn find_run(&self, id: &str) -> Result<Option<RunRecord>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {RUN_COLUMNS} FROM eval_runs WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(run).transpose()
    }

    /// An eval's runs, optionally of one status, one page at a time.
    pub async fn list_runs(
        &self,
        eval_id: &str,
        status: Option<RunStatus>,
        page: &Page,
    ) -> Result<Listed<RunRecord>, StoreError> {
        let mut q = Sql::new(&format!(
            "SELECT {RUN_COLUMNS} FROM eval_runs WHERE eval_id = "
        ));
        q.bind(eval_id.to_string());
        if let Some(s) = status {
            q.push(" AND status = ").bind(s.as_str().to_string());
        }
        self.push_page(&mut q, "eval_runs", page).await?;
        let rows = q.query().fetch_all(&self.pool).await?;
        let items = rows.iter().map(run).collect::<Result<Vec<_>, _>>()?;
        Ok(listed(items, page.limit))
    }

    /// Cancels a `queued` or `in_progress` run. Returns the run as it now is and whether this
    /// call changed it, or `None` if unknown.
    pub async fn cancel_run(
        &self,
        eval_id: &str,
        id: &str,
    ) -> Result<Option<(bool, RunRecord)>, StoreError> {
        let changed = sqlx::query(
            "UPDATE eval_runs SET status = 'canceled', owner = NULL, lease_until = NULL
             WHERE id = $1 AND eval_id = $2 AND status IN ('queued', 'in_progress')",
        )
        .bind(id)
        .bind(eval_id)
        .execute(&self.pool)
        .await?
        .rows_affected()
            > 0;
        Ok(self.get_run(eval_id, id).await?.map(|r| (changed, r)))
    }

    /// Deletes a run and its items; returns whether it existed.
    pub async fn delete_run(&self, eval_id: &str, id: &str) -> Result<bool, StoreError> {
        let mut conn = self.pool.acquire().await?;
        let mut tx = conn.begin().await?;
        let found = sqlx::query("DELETE FROM eval_runs WHERE id = $1 AND eval_id = $2")
            .bind(id)
            .bind(eval_id)
            .execute(&mut *tx)
            .await?
            .rows_affected()
            > 0;
        if found {
            for table in ["eval_run_items", "eval_run_usage", "eval_run_criteria"] {
                sqlx::query(&format!("DELETE FROM {table} WHERE run_id = $1"))
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        tx.commit().await?;
        Ok(found)
    }

    /// Claims the oldest queued run whose data source nobody is reading (or whose reader's
    /// lease ran out).
    pub async fn claim_run(
        &self,
        worker: &str,
        now_ms: i64,
        lease_ms: i64,
    ) -> Result<Option<RunRecord>, StoreError> {
        let row = sqlx::query(
            "UPDATE eval_runs SET owner = $1, lease_until = $2
             WHERE id = (SELECT id FROM eval_runs
                         WHERE status = 'queued' AND (owner IS NULL OR lease_until < $3)
                         ORDER BY seq LIMIT 1)
               AND status = 'queued' AND (owner IS NULL OR lease_until < $4)
             RETURNING id, eval_id",
        )
        .bind(worker)
        .bind(now_ms + lease_ms)
        .bind(now_ms)
        .bind(now_ms)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(r) => {
                let (id, eval_id): (String, String) = (r.try_get("id")?, r.try_get("eval_id")?);
                self.get_run(&eval_id, &id).await
            }
            None => Ok(None),
        }
    }

    /// Moves a claimed run to `in_progress` with its items, in one transaction. Returns false
    /// (writing nothing) if the run was canceled or deleted meanwhile, or the claim was lost.
    pub async fn start_run(
        &self,
        id: &str,
        worker: &str,
        items: &[NewItem],
    ) -> Result<bool, StoreError> {
        let mut conn = self.pool.acquire().await?;
        let mut tx = conn.begin().await?;
        let started = sqlx::query(
            "UPDATE eval_runs SET status = 'in_progress', owner = NULL, lease_until = NULL
             WHERE id = $1 AND status = 'queued' AND owner = $2",
        )
        .bind(id)
        .bind(worker)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if !started {
            tx.rollback().await?;
            return Ok(false);
        }
        let suffix = id.trim_start_matches("evalrun_");
        for (i, item) in items.iter().enumerate() {
            sqlx::query(
                "INSERT INTO eval_run_items (run_id, item_index, id, seq, item, given, state,
                    attempts)
                 VALUES ($1, $2, $3, $4, $5, $6, 'pending', 0)",
            )
            .bind(id)
            .bind(i as i64)
            // Derived from the run and the index: one id per item, whoever grades it.
            .bind(format!("outputitem_{suffix}{i:06}"))
            .bind(new_seq())
            .bind(&item.item)
            .bind(item.given.clone())
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    /// Fails a claimed run (its data source could not be read; `error` is `{code, message}`).
    pub async fn fail_run(&self, id: &str, worker: &str, error: &str) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE eval_runs SET status = 'failed', error = $1, owner = NULL, lease_until = NULL
             WHERE id = $2 AND status = 'queued' AND owner = $3",
        )
        .bind(error)
        .bind(id)
        .bind(worker)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Gives up a worker's claim on a queued run.
    pub async fn release_run(&self, id: &str, worker: &str) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE eval_runs SET owner = NULL, lease_until = NULL WHERE id = $1 AND owner = $2",
        )
        .bind(id)
        .bind(worker)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Claims up to `limit` items to grade, oldest run first: pending items, and items whose
    /// worker's lease ran out. Only `in_progress` runs give out items.
    pub async fn claim_items(
        &self,
        worker: &str,
        now_ms: i64,
        lease_ms: i64,
        limit: usize,
    ) -> Result<Vec<ClaimedItem>, StoreError> {
        let skip_locked = match self.backend {
            Backend::Postgres => " FOR UPDATE OF i SKIP LOCKED",
            Backend::Sqlite => "",
        };
        let rows = sqlx::query(&format!(
            "UPDATE eval_run_items
             SET state = 'running', owner = $1, lease_until = $2, attempts = attempts + 1
             WHERE (run_id, item_index) IN (
                 SELECT i.run_id, i.item_index FROM eval_run_items i
                 JOIN eval_runs r ON r.id = i.run_id
                 WHERE r.status = 'in_progress'
                   AND (i.state = 'pending' OR (i.state = 'running' AND i.lease_until < $3))
                 ORDER BY r.seq, i.item_index LIMIT $4{skip_locked})
               AND (state = 'pending' OR (state = 'running' AND lease_until < $5))
             RETURNING run_id, item_index, id, item, given"
        ))
        .bind(worker)
        .bind(now_ms + lease_ms)
        .bind(now_ms)
        .bind(limit as i64)
        .bind(now_ms)
        .fetch_all(&self.pool)
        .await?;
        let mut items = rows
            .iter()
            .map(|r| {
                Ok(ClaimedItem {
                    run_id: r.try_get("run_id")?,
                    index: r.try_get("item_index")?,
                    id: r.try_get("id")?,
                    item: r.try_get("item")?,
                    given: r.try_get("given")?,
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()?;
        items.sort_by(|a, b| (&a.run_id, a.index).cmp(&(&b.run_id, b.index)));
        Ok(items)
    }

    /// Extends every eval lease the worker holds (items and runs) to `now + lease`.
    pub async fn renew_eval_leases(
        &self,
        worker: &str,
        now_ms: i64,
        lease_ms: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE eval_run_items SET lease_until = $1 WHERE owner = $2 AND state = 'running'",
        )
        .bind(now_ms + lease_ms)
        .bind(worker)
        .execute(&self.pool)
        .await?;
        sqlx::query("UPDATE eval_runs SET lease_until = $1 WHERE owner = $2")
            .bind(now_ms + lease_ms)
            .bind(worker)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Hands the worker's running items back (a clean shutdown, or their run stopped).
    pub async fn release_items(&self, worker: &str) -> Result<u64, StoreError> {
        let done = sqlx::query(
            "UPDATE eval_run_items SET state = 'pending', owner = NULL, lease_until = NULL
             WHERE owner = $1 AND state = 'running'",
        )
        .bind(worker)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    /// Hands one running item back.
    pub async fn release_item(&self, worker: &str, item: &ClaimedItem) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE eval_run_items SET state = 'pending', owner = NULL, lease_until = NULL
             WHERE run_id = $1 AND item_index = $2 AND owner = $3 AND state = 'running'",
        )
        .bind(&item.run_id)
        .bind(item.index)
        .bind(worker)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Writes an item's result with its usage, criteria and ledger records in one
    /// transaction, if the worker still owns the item. Returns false (writing nothing) if not.
    pub async fn finish_item(
        &self,
        worker: &str,
        item: &ClaimedItem,
        result: &ItemResult,
    ) -> Result<bool, StoreError> {
        let mut conn = self.pool.acquire().await?;
        let mut tx = conn.begin().await?;
        let written = sqlx::query(
            "UPDATE eval_run_items SET state = 'done', owner = NULL, lease_until = NULL,
                status = $1, created_at = $2, results = $3, sample = $4
             WHERE run_id = $5 AND item_index = $6 AND owner = $7 AND state = 'running'",
        )
        .bind(result.outcome.as_str())
        .bind(result.created_at)
        .bind(&result.results)
        .bind(&result.sample)
        .bind(&item.run_id)
        .bind(item.index)
        .bind(worker)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if !written {
            tx.rollback().await?;
            return Ok(false);
        }
        for u in &result.usage {
            sqlx::query(
                "INSERT INTO eval_run_usage (run_id, item_index, model, invocations,
                    prompt_tokens, cached_tokens, completion_tokens)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .bind(&item.run_id)
            .bind(item.index)
            .bind(&u.model)
            .bind(to_i64("invocations", u.invocations)?)
            .bind(to_i64("prompt_tokens", u.prompt_tokens)?)
            .bind(to_i64("cached_tokens", u.cached_tokens)?)
            .bind(to_i64("completion_tokens", u.completion_tokens)?)
            .execute(&mut *tx)
            .await?;
        }
        for (criterion, passed) in &result.criteria {
            sqlx::query(
                "INSERT INTO eval_run_criteria (run_id, item_index, criterion, passed)
                 VALUES ($1, $2, $3, $4)",
            )
            .bind(&item.run_id)
            .bind(item.index)
            .bind(criterion)
            .bind(i64::from(*passed))
            .execute(&mut *tx)
            .await?;
        }
        for rec in &result.ledger {
            insert_usage(&mut *tx, rec, &Default::default()).await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    /// Completes the `in_progress` runs whose items are all graded; returns their ids.
    pub async fn complete_runs(&self) -> Result<Vec<String>, StoreError> {
        let ids: Vec<String> = sqlx::query_scalar(
            "UPDATE eval_runs SET status = 'completed'
             WHERE status = 'in_progress' AND NOT EXISTS (
                 SELECT 1 FROM eval_run_items i WHERE i.run_id = eval_runs.id
                   AND i.state <> 'done')
             RETURNING id",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(ids)
    }

    /// A run's items by outcome.
    pub async fn run_counts(&self, run_id: &str) -> Result<RunCounts, StoreError> {
        // Postgres sums BIGINTs into NUMERIC, which `Any` cannot decode: hence the casts.
        let row = sqlx::query(
            "SELECT COUNT(*) AS total,
                CAST(COALESCE(SUM(CASE WHEN status = 'pass' THEN 1 ELSE 0 END), 0) AS BIGINT)
                    AS passed,
                CAST(COALESCE(SUM(CASE WHEN status = 'fail' THEN 1 ELSE 0 END), 0) AS BIGINT)
                    AS failed,
                CAST(COALESCE(SUM(CASE WHEN status = 'error' THEN 1 ELSE 0 END), 0) AS BIGINT)
                    AS errored
             FROM eval_run_items WHERE run_id = $1",
        )
        .bind(run_id)
        .fetch_one(&self.pool)
        .await?;
        let get = |f: &'static str| -> Result<u64, StoreError> { to_u64(f, row.try_get(f)?) };
        Ok(RunCounts {
            total: get("total")?,
            passed: get("passed")?,
            failed: get("failed")?,
            errored: get("errored")?,
        })
    }

    /// A run's model calls so far, per model (sorted by model id).
    pub async fn run_usage(&self, run_id: &str) -> Result<Vec<ModelUsage>, StoreError> {
        let rows = sqlx::query(
            "SELECT model,
                CAST(SUM(invocations) AS BIGINT) AS invocations,
                CAST(SUM(prompt_tokens) AS BIGINT) AS prompt_tokens,
                CAST(SUM(cached_tokens) AS BIGINT) AS cached_tokens,
                CAST(SUM(completion_tokens) AS BIGINT) AS completion_tokens
             FROM eval_run_usage WHERE run_id = $1 GROUP BY model",
        )
        .bind(run_id)
        .fetch_all(&self.pool)
        .await?;
        let mut usage = rows
            .iter()
            .map(|r| {
                let get = |f: &'static str| -> Result<u64, StoreError> { to_u64(f, r.try_get(f)?) };
                Ok(ModelUsage {
                    model: r.try_get("model")?,
                    invocations: get("invocations")?,
                    prompt_tokens: get("prompt_tokens")?,
                    cached_tokens: get("cached_tokens")?,
                    completion_tokens: get("completion_tokens")?,
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        usage.sort_by(|a, b| a.model.cmp(&b.model));
        Ok(usage)
    }

    /// Passed and failed counts per testing criterion id over a run's graded items.
    pub async fn run_criteria(&self, run_id: &str) -> Result<Vec<CriterionCounts>, StoreError> {
        let rows = sqlx::query(
            "SELECT criterion,
                CAST(SUM(passed) AS BIGINT) AS passed,
                CAST(SUM(1 - passed) AS BIGINT) AS failed
             FROM eval_run_criteria WHERE run_id = $1 GROUP BY criterion",
        )
        .bind(run_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(CriterionCounts {
                    criterion: r.try_get("criterion")?,
                    passed: to_u64("passed", r.try_get("passed")?)?,
                    failed: to_u64("failed", r.try_get("failed")?)?,
                })
            })
            .collect()
    }

    /// A run's graded items, in data source order for `asc`.
    pub async fn list_output_items(
        &self,
        run_id: &str,
        filter: OutputFilter,
        page: &Page,
    ) -> Result<Listed<OutputItemRecord>, StoreError> {
        let mut q = Sql::new(&format!(
            "SELECT {ITEM_COLUMNS} FROM eval_run_items WHERE state = 'done' AND run_id = "
        ));
        q.bind(run_id.to_string());
        match filter {
            OutputFilter::All => {}
            OutputFilter::Passed => {
                q.push(" AND status = 'pass'");
            }
            OutputFilter::Failed => {
                q.push(" AND status IN ('fail', 'error')");
            }
        }
        self.push_page(&mut q, "eval_run_items", page).await?;
        let rows = q.query().fetch_all(&self.pool).await?;
        let items = rows
            .iter()
            .map(output_item)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(listed(items, page.limit))
    }

    /// One graded item of a run.
    pub async fn get_output_item(
        &self,
        run_id: &str,
        id: &str,
    ) -> Result<Option<OutputItemRecord>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {ITEM_COLUMNS} FROM eval_run_items
             WHERE id = $1 AND run_id = $2 AND state = 'done'"
        ))
        .bind(id)
        .bind(run_id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(output_item).transpose()
    }
}

fn eval(row: &AnyRow) -> Result<EvalRecord, StoreError> {
    Ok(EvalRecord {
        id: row.try_get("id")?,
        created_at: row.try_get("created_at")?,
        name: row.try_get("name")?,
        metadata: row.try_get("metadata")?,
        data_source_config: row.try_get("data_source_config")?,
        testing_criteria: row.try_get("testing_criteria")?,
    })
}

fn run(row: &AnyRow) -> Result<RunRecord, StoreError> {
    let status: String = row.try_get("status")?;
    Ok(RunRecord {
        id: row.try_get("id")?,
        eval_id: row.try_get("eval_id")?,
        created_at: row.try_get("created_at")?,
        name: row.try_get("name")?,
        model: row.try_get("model")?,
        status: RunStatus::parse(&status).ok_or(StoreError::OutOfRange {
            field: "eval_runs.status",
            value: status,
        })?,
        data_source: row.try_get("data_source")?,
        metadata: row.try_get("metadata")?,
        error: row.try_get("error")?,
    })
}

fn output_item(row: &AnyRow) -> Result<OutputItemRecord, StoreError> {
    Ok(OutputItemRecord {
        id: row.try_get("id")?,
        run_id: row.try_get("run_id")?,
        index: row.try_get("item_index")?,
        created_at: row
            .try_get::<Option<i64>, _>("created_at")?
            .unwrap_or_default(),
        outcome: ItemOutcome::parse(
            &row.try_get::<Option<String>, _>("status")?
                .unwrap_or_default(),
        )?,
        item: row.try_get("item")?,
        results: row
            .try_get::<Option<String>, _>("results")?
            .unwrap_or_else(|| "[]".into()),
        sample: row
            .try_get::<Option<String>, _>("sample")?
            .unwrap_or_else(|| "{}".into()),
    })
}
