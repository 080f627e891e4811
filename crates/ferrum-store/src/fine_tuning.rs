//! Fine-tuning jobs, their events and checkpoints, and the fine-tuned models they produce.
//!
//! Jobs are run by workers exactly as batches are (`crate::batches`): every step that must
//! happen once (validating the files, training) is a claim, an `UPDATE ... WHERE <still
//! claimable>` that sets an owner and a lease; the owner renews its lease while it works, and a
//! dead owner's job is taken over once the lease runs out. Everything a worker writes is
//! guarded by `owner = <worker> AND status = <the status it works in>`, so a worker that lost
//! its job (cancelled, paused, or taken over after a stall) writes nothing more.
//!
//! A resumed job replays the steps after its last checkpoint. Events that must appear once per
//! job carry a `dedup` key (`step-12`, `checkpoint-40`) under a unique index and are inserted
//! with `ON CONFLICT DO NOTHING`, so a replayed step writes no second event. A checkpoint, the
//! job's progress and the checkpoint's event are written in one transaction: a kill between
//! epochs neither loses nor doubles one.

use sqlx::any::AnyRow;
use sqlx::{Any, Connection, Row};

use crate::files::{insert_file, FileRecord};
use crate::page::{listed, new_seq, Sql};
use crate::usage::{insert_usage, to_i64, to_u64};
use crate::{Listed, Page, Store, StoreError, UsageRecord};

/// A job's status, as the API names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobStatus {
    ValidatingFiles,
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
    Paused,
}

impl JobStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::ValidatingFiles => "validating_files",
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
            JobStatus::Paused => "paused",
        }
    }

    /// Whether the job has ended (nothing will change it any more).
    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobStatus::Succeeded | JobStatus::Failed | JobStatus::Cancelled
        )
    }

    fn parse(s: &str) -> Result<JobStatus, StoreError> {
        Ok(match s {
            "validating_files" => JobStatus::ValidatingFiles,
            "queued" => JobStatus::Queued,
            "running" => JobStatus::Running,
            "succeeded" => JobStatus::Succeeded,
            "failed" => JobStatus::Failed,
            "cancelled" => JobStatus::Cancelled,
            "paused" => JobStatus::Paused,
            other => {
                return Err(StoreError::OutOfRange {
                    field: "fine_tuning_jobs.status",
                    value: other.to_string(),
                })
            }
        })
    }
}

/// One fine-tuning job (times in Unix seconds; JSON documents as text).
#[derive(Clone, Debug, PartialEq)]
pub struct JobRecord {
    pub id: String,
    pub created_at: i64,
    /// The base model as the job reports it (a tier id or one of its aliases).
    pub model: String,
    /// The tier it resolved to.
    pub base_tier: String,
    pub training_file: String,
    pub validation_file: Option<String>,
    pub status: JobStatus,
    /// The supervised hyperparameters, a JSON object (values or "auto").
    pub hyperparameters: String,
    /// The method object, as JSON.
    pub method: String,
    pub seed: i64,
    pub suffix: Option<String>,
    /// Metadata pairs in key order; `None` when the job was created without metadata.
    pub metadata: Option<Vec<(String, String)>>,
    /// The error object `{code, message, param}` of a failed job, as JSON.
    pub error: Option<String>,
    pub fine_tuned_model: Option<String>,
    pub trained_tokens: Option<u64>,
    pub estimated_finish: Option<i64>,
    pub finished_at: Option<i64>,
    pub result_files: Vec<String>,
}

/// Which jobs a list returns.
#[derive(Clone, Debug, Default)]
pub struct JobFilter {
    /// Every pair must match.
    pub metadata: Vec<(String, String)>,
}

/// An event to record.
#[derive(Clone, Debug, PartialEq)]
pub struct NewEvent {
    /// `info`, `warn` or `error`.
    pub level: &'static str,
    /// `message` or `metrics`.
    pub kind: &'static str,
    pub message: String,
    /// The `data` object, as JSON.
    pub data: String,
    /// Set for an event that must be recorded at most once per job.
    pub dedup: Option<String>,
}

impl NewEvent {
    /// An `info` message event with empty data.
    pub fn info(message: impl Into<String>) -> NewEvent {
        NewEvent {
            level: "info",
            kind: "message",
            message: message.into(),
            data: "{}".into(),
            dedup: None,
        }
    }

    /// The same event, recorded at most once per job under `key`.
    pub fn once(mut self, key: impl Into<String>) -> NewEvent {
        self.dedup = Some(key.into());
        self
    }
}

/// A recorded event.
#[derive(Clone, Debug, PartialEq)]
pub struct EventRecord {
    pub id: String,
    pub job_id: String,
    pub created_at: i64,
    pub level: String,
    pub kind: String,
    pub message: String,
    pub data: String,
}

/// A checkpoint taken at the end of an epoch.
#[derive(Clone, Debug, PartialEq)]
pub struct CheckpointRecord {
    pub id: String,
    pub job_id: String,
    pub created_at: i64,
    pub step_number: u64,
    pub epoch: u64,
    /// The metrics object, as JSON.
    pub metrics: String,
    /// The name under which the checkpoint's adapter can be served.
    pub fine_tuned_model_checkpoint: String,
    /// Blob ids of the adapter (llama.cpp LoRA GGUF) and of the state a resumed job starts from.
    pub adapter_blob: String,
    pub state_blob: String,
}

/// A fine-tuned model: a base tier and an adapter.
#[derive(Clone, Debug, PartialEq)]
pub struct FineTunedModel {
    pub id: String,
    pub created: i64,
    pub base_tier: String,
    pub job_id: String,
    pub adapter_blob: String,
    pub deleted: bool,
}

/// What a job that finished training records, in one transaction.
#[derive(Clone, Debug)]
pub struct JobSuccess {
    pub model: FineTunedModel,
    /// The metrics file (`fine-tune-results`).
    pub result_file: Option<FileRecord>,
    pub trained_tokens: u64,
    /// The training cost in the usage ledger.
    pub usage: Option<UsageRecord>,
    pub events: Vec<NewEvent>,
    pub now: i64,
}

const COLUMNS: &str = "id, created_at, model, base_tier, training_file, validation_file, \
    status, hyperparameters, method, seed, suffix, metadata, error, fine_tuned_model, \
    trained_tokens, estimated_finish, finished_at, result_files";

const CHECKPOINT_COLUMNS: &str = "id, job_id, created_at, step_number, epoch, metrics, \
    fine_tuned_model_checkpoint, adapter_blob, state_blob";

const MODEL_COLUMNS: &str = "id, created, base_tier, job_id, adapter_blob, deleted";

/// Statuses a job can be cancelled in.
const CANCELLABLE: &str = "('validating_files', 'queued', 'running', 'paused')";

impl Store {
    /// Records a new job with its metadata and its first event, in one transaction.
    pub async fn create_fine_tuning_job(
        &self,
        job: &JobRecord,
        event: &NewEvent,
    ) -> Result<(), StoreError> {
        let mut conn = self.pool.acquire().await?;
        let mut tx = conn.begin().await?;
        sqlx::query(&format!(
            "INSERT INTO fine_tuning_jobs (seq, {COLUMNS})
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17,
                $18, $19)"
        ))
        .bind(new_seq())
        .bind(&job.id)
        .bind(job.created_at)
        .bind(&job.model)
        .bind(&job.base_tier)
        .bind(&job.training_file)
        .bind(job.validation_file.clone())
        .bind(job.status.as_str())
        .bind(&job.hyperparameters)
        .bind(&job.method)
        .bind(job.seed)
        .bind(job.suffix.clone())
        .bind(job.metadata.as_deref().map(metadata_json))
        .bind(job.error.clone())
        .bind(job.fine_tuned_model.clone())
        .bind(
            job.trained_tokens
                .map(|t| to_i64("trained_tokens", t))
                .transpose()?,
        )
        .bind(job.estimated_finish)
        .bind(job.finished_at)
        .bind(serde_json::Value::from(job.result_files.clone()).to_string())
        .execute(&mut *tx)
        .await?;
        for (k, v) in job.metadata.iter().flatten() {
            sqlx::query(
                "INSERT INTO fine_tuning_job_metadata (job_id, key, value) VALUES ($1, $2, $3)",
            )
            .bind(&job.id)
            .bind(k)
            .bind(v)
            .execute(&mut *tx)
            .await?;
        }
        insert_event(&mut tx, &job.id, event, job.created_at).await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn get_fine_tuning_job(&self, id: &str) -> Result<Option<JobRecord>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM fine_tuning_jobs WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(job).transpose()
    }

    pub async fn list_fine_tuning_jobs(
        &self,
        filter: &JobFilter,
        page: &Page,
    ) -> Result<Listed<JobRecord>, StoreError> {
        let mut q = Sql::new(&format!(
            "SELECT {COLUMNS} FROM fine_tuning_jobs WHERE 1 = 1"
        ));
        for (k, v) in &filter.metadata {
            q.push(
                " AND EXISTS (SELECT 1 FROM fine_tuning_job_metadata m
                   WHERE m.job_id = fine_tuning_jobs.id AND m.key = ",
            )
            .bind(k.clone())
            .push(" AND m.value = ")
            .bind(v.clone())
            .push(")");
        }
        self.push_page(&mut q, "fine_tuning_jobs", page).await?;
        let rows = q.query().fetch_all(&self.pool).await?;
        let items = rows.iter().map(job).collect::<Result<Vec<_>, _>>()?;
        Ok(listed(items, page.limit))
    }

    /// Records an event; one with a `dedup` key already recorded for the job is skipped.
    /// Returns whether it was recorded.
    pub async fn add_fine_tuning_event(
        &self,
        job_id: &str,
        event: &NewEvent,
        now: i64,
    ) -> Result<bool, StoreError> {
        let mut conn = self.pool.acquire().await?;
        let mut tx = conn.begin().await?;
        let added = insert_event(&mut tx, job_id, event, now).await?;
        tx.commit().await?;
        Ok(added)
    }

    /// Records an event of a job the worker validates or trains, if it still does (a job
    /// cancelled meanwhile gets no event after its cancellation; a once-only event already
    /// recorded is skipped). Returns whether the worker still holds the job.
    pub async fn add_owned_fine_tuning_event(
        &self,
        job_id: &str,
        worker: &str,
        event: &NewEvent,
        now: i64,
    ) -> Result<bool, StoreError> {
        let mut conn = self.pool.acquire().await?;
        let mut tx = conn.begin().await?;
        // A no-op update: it locks the row (both backends) and says whether the claim holds.
        let owned = sqlx::query(
            "UPDATE fine_tuning_jobs SET lease_until = lease_until
             WHERE id = $1 AND owner = $2 AND status IN ('validating_files', 'running')",
        )
        .bind(job_id)
        .bind(worker)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if owned {
            insert_event(&mut tx, job_id, event, now).await?;
        }
        tx.commit().await?;
        Ok(owned)
    }

    /// A job's events, one page at a time (newest first for `Order::Desc`, as the API lists).
    pub async fn list_fine_tuning_events(
        &self,
        job_id: &str,
        page: &Page,
    ) -> Result<Listed<EventRecord>, StoreError> {
        let mut q = Sql::new(
            "SELECT id, job_id, created_at, level, type, message, data FROM fine_tuning_events
             WHERE job_id = ",
        );
        q.bind(job_id.to_string());
        self.push_page(&mut q, "fine_tuning_events", page).await?;
        let rows = q.query().fetch_all(&self.pool).await?;
        let items = rows.iter().map(event).collect::<Result<Vec<_>, _>>()?;
        Ok(listed(items, page.limit))
    }

    /// A job's `metrics` events, oldest first (for its results file).
    pub async fn fine_tuning_metrics(&self, job_id: &str) -> Result<Vec<EventRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, job_id, created_at, level, type, message, data FROM fine_tuning_events
             WHERE job_id = $1 AND type = 'metrics' ORDER BY seq, id",
        )
        .bind(job_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(event).collect()
    }

    /// A job's checkpoints, one page at a time.
    pub async fn list_fine_tuning_checkpoints(
        &self,
        job_id: &str,
        page: &Page,
    ) -> Result<Listed<CheckpointRecord>, StoreError> {
        let mut q = Sql::new(&format!(
            "SELECT {CHECKPOINT_COLUMNS} FROM fine_tuning_checkpoints WHERE job_id = "
        ));
        q.bind(job_id.to_string());
        self.push_page(&mut q, "fine_tuning_checkpoints", page)
            .await?;
        let rows = q.query().fetch_all(&self.pool).await?;
        let items = rows.iter().map(checkpoint).collect::<Result<Vec<_>, _>>()?;
        Ok(listed(items, page.limit))
    }

    /// Every checkpoint of a job, oldest first.
    pub async fn fine_tuning_checkpoints(
        &self,
        job_id: &str,
    ) -> Result<Vec<CheckpointRecord>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {CHECKPOINT_COLUMNS} FROM fine_tuning_checkpoints WHERE job_id = $1
             ORDER BY step_number"
        ))
        .bind(job_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(checkpoint).collect()
    }

    /// The checkpoint a resumed job starts from: its latest.
    pub async fn last_fine_tuning_checkpoint(
        &self,
        job_id: &str,
    ) -> Result<Option<CheckpointRecord>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {CHECKPOINT_COLUMNS} FROM fine_tuning_checkpoints WHERE job_id = $1
             ORDER BY step_number DESC LIMIT 1"
        ))
        .bind(job_id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(checkpoint).transpose()
    }

    /// The checkpoint served under `name` (its `fine_tuned_model_checkpoint`).
    pub async fn fine_tuning_checkpoint_by_name(
        &self,
        name: &str,
    ) -> Result<Option<CheckpointRecord>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {CHECKPOINT_COLUMNS} FROM fine_tuning_checkpoints
             WHERE fine_tuned_model_checkpoint = $1 LIMIT 1"
        ))
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(checkpoint).transpose()
    }

    /// Cancels a job that has not ended, with its event. Returns the job as it now is and
    /// whether this call changed it, or `None` if unknown.
    pub async fn cancel_fine_tuning_job(
        &self,
        id: &str,
        now: i64,
    ) -> Result<Option<(bool, JobRecord)>, StoreError> {
        let changed = self
            .set_job_status(
                id,
                CANCELLABLE,
                "status = 'cancelled', estimated_finish = NULL",
                true,
                now,
                &NewEvent::info("Fine-tuning job cancelled").once("cancelled"),
            )
            .await?;
        Ok(self.get_fine_tuning_job(id).await?.map(|j| (changed, j)))
    }

    /// Pauses a queued or running job (its worker stops at its next write and a resume starts
    /// from the last checkpoint).
    pub async fn pause_fine_tuning_job(
        &self,
        id: &str,
        now: i64,
    ) -> Result<Option<(bool, JobRecord)>, StoreError> {
        let changed = self
            .set_job_status(
                id,
                "('queued', 'running')",
                "status = 'paused', estimated_finish = NULL",
                false,
                now,
                &NewEvent::info("Fine-tuning job paused"),
            )
            .await?;
        Ok(self.get_fine_tuning_job(id).await?.map(|j| (changed, j)))
    }

    /// Puts a paused job back in the queue.
    pub async fn resume_fine_tuning_job(
        &self,
        id: &str,
        now: i64,
    ) -> Result<Option<(bool, JobRecord)>, StoreError> {
        let changed = self
            .set_job_status(
                id,
                "('paused')",
                "status = 'queued'",
                false,
                now,
                &NewEvent::info("Fine-tuning job resumed"),
            )
            .await?;
        Ok(self.get_fine_tuning_job(id).await?.map(|j| (changed, j)))
    }

    /// Moves a job whose status is one of `from` (an SQL list) with `set` (and `finished_at`
    /// when `finish`), dropping any claim, and records `event`, in one transaction.
    async fn set_job_status(
        &self,
        id: &str,
        from: &str,
        set: &str,
        finish: bool,
        now: i64,
        event: &NewEvent,
    ) -> Result<bool, StoreError> {
        let mut q = Sql::new("UPDATE fine_tuning_jobs SET ");
        q.push(set);
        if finish {
            q.push(", finished_at = ").bind(now);
        }
        q.push(", owner = NULL, lease_until = NULL WHERE id = ")
            .bind(id.to_string())
            .push(&format!(" AND status IN {from}"));
        let mut conn = self.pool.acquire().await?;
        let mut tx = conn.begin().await?;
        let changed = q.query().execute(&mut *tx).await?.rows_affected() == 1;
        if changed {
            insert_event(&mut tx, id, event, now).await?;
        }
        tx.commit().await?;
        Ok(changed)
    }

    /// Claims the oldest job whose files wait to be validated, if any.
    pub async fn claim_fine_tuning_validation(
        &self,
        worker: &str,
        now_ms: i64,
        lease_ms: i64,
    ) -> Result<Option<JobRecord>, StoreError> {
        self.claim_job(worker, now_ms, lease_ms, "('validating_files')", "")
            .await
    }

    /// Claims the oldest job to train: a queued one (which becomes `running`), or a running one
    /// whose worker's lease ran out (it died: the job resumes from its last checkpoint).
    pub async fn claim_fine_tuning_run(
        &self,
        worker: &str,
        now_ms: i64,
        lease_ms: i64,
    ) -> Result<Option<JobRecord>, StoreError> {
        self.claim_job(
            worker,
            now_ms,
            lease_ms,
            "('queued', 'running')",
            ", status = 'running'",
        )
        .await
    }

    async fn claim_job(
        &self,
        worker: &str,
        now_ms: i64,
        lease_ms: i64,
        statuses: &str,
        set: &str,
    ) -> Result<Option<JobRecord>, StoreError> {
        let id: Option<String> = sqlx::query_scalar(&format!(
            "UPDATE fine_tuning_jobs SET owner = $1, lease_until = $2{set}
             WHERE id = (SELECT id FROM fine_tuning_jobs
                         WHERE status IN {statuses} AND (owner IS NULL OR lease_until < $3)
                         ORDER BY seq LIMIT 1)
               AND status IN {statuses} AND (owner IS NULL OR lease_until < $4)
             RETURNING id"
        ))
        .bind(worker)
        .bind(now_ms + lease_ms)
        .bind(now_ms)
        .bind(now_ms)
        .fetch_optional(&self.pool)
        .await?;
        match id {
            Some(id) => self.get_fine_tuning_job(&id).await,
            None => Ok(None),
        }
    }

    /// Extends the worker's lease on a job it validates or trains. Returns false when the job is
    /// no longer the worker's to work on (cancelled, paused, failed, or taken over).
    pub async fn renew_fine_tuning_lease(
        &self,
        id: &str,
        worker: &str,
        now_ms: i64,
        lease_ms: i64,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE fine_tuning_jobs SET lease_until = $1
             WHERE id = $2 AND owner = $3 AND status IN ('validating_files', 'running')",
        )
        .bind(now_ms + lease_ms)
        .bind(id)
        .bind(worker)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Gives up a worker's claim on a job (a clean shutdown: another server may take it over at
    /// once; it resumes from its last checkpoint).
    pub async fn release_fine_tuning_job(&self, id: &str, worker: &str) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE fine_tuning_jobs SET owner = NULL, lease_until = NULL
             WHERE id = $1 AND owner = $2",
        )
        .bind(id)
        .bind(worker)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Ends the validation of a job the worker owns: it becomes `queued` (claim given up) with
    /// its resolved hyperparameters and method, and `event` is recorded. Returns false (writing
    /// nothing) if the job was cancelled meanwhile or the claim was lost.
    pub async fn queue_fine_tuning_job(
        &self,
        id: &str,
        worker: &str,
        hyperparameters: &str,
        method: &str,
        event: &NewEvent,
        now: i64,
    ) -> Result<bool, StoreError> {
        let mut conn = self.pool.acquire().await?;
        let mut tx = conn.begin().await?;
        let done = sqlx::query(
            "UPDATE fine_tuning_jobs SET status = 'queued', hyperparameters = $1, method = $2,
                owner = NULL, lease_until = NULL
             WHERE id = $3 AND owner = $4 AND status = 'validating_files'",
        )
        .bind(hyperparameters)
        .bind(method)
        .bind(id)
        .bind(worker)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if done {
            insert_event(&mut tx, id, event, now).await?;
        }
        tx.commit().await?;
        Ok(done)
    }

    /// Fails a job the worker validates or trains, with its error object (JSON) and an event.
    pub async fn fail_fine_tuning_job(
        &self,
        id: &str,
        worker: &str,
        error: &str,
        event: &NewEvent,
        now: i64,
    ) -> Result<bool, StoreError> {
        let mut conn = self.pool.acquire().await?;
        let mut tx = conn.begin().await?;
        let done = sqlx::query(
            "UPDATE fine_tuning_jobs SET status = 'failed', error = $1, finished_at = $2,
                estimated_finish = NULL, owner = NULL, lease_until = NULL
             WHERE id = $3 AND owner = $4 AND status IN ('validating_files', 'running')",
        )
        .bind(error)
        .bind(now)
        .bind(id)
        .bind(worker)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if done {
            insert_event(&mut tx, id, event, now).await?;
        }
        tx.commit().await?;
        Ok(done)
    }

    /// Records a training step: the job's progress and the step's metrics event (skipped when a
    /// resumed job replays a step already recorded). Returns false (writing nothing) when the
    /// job is no longer the worker's to train.
    pub async fn record_fine_tuning_step(
        &self,
        id: &str,
        worker: &str,
        trained_tokens: u64,
        estimated_finish: Option<i64>,
        event: &NewEvent,
        now: i64,
    ) -> Result<bool, StoreError> {
        let mut conn = self.pool.acquire().await?;
        let mut tx = conn.begin().await?;
        if !progress(&mut tx, id, worker, trained_tokens, estimated_finish).await? {
            tx.rollback().await?;
            return Ok(false);
        }
        insert_event(&mut tx, id, event, now).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Records a checkpoint (whose blobs are already written), the job's progress and the
    /// checkpoint's event in one transaction. A checkpoint of a step already recorded (a
    /// resumed job) changes nothing. Returns false (writing nothing) when the job is no longer
    /// the worker's to train.
    pub async fn record_fine_tuning_checkpoint(
        &self,
        worker: &str,
        ckpt: &CheckpointRecord,
        trained_tokens: u64,
        event: &NewEvent,
    ) -> Result<bool, StoreError> {
        let mut conn = self.pool.acquire().await?;
        let mut tx = conn.begin().await?;
        if !progress(&mut tx, &ckpt.job_id, worker, trained_tokens, None).await? {
            tx.rollback().await?;
            return Ok(false);
        }
        sqlx::query(&format!(
            "INSERT INTO fine_tuning_checkpoints (seq, {CHECKPOINT_COLUMNS})
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
             ON CONFLICT (job_id, step_number) DO NOTHING"
        ))
        .bind(new_seq())
        .bind(&ckpt.id)
        .bind(&ckpt.job_id)
        .bind(ckpt.created_at)
        .bind(to_i64("step_number", ckpt.step_number)?)
        .bind(to_i64("epoch", ckpt.epoch)?)
        .bind(&ckpt.metrics)
        .bind(&ckpt.fine_tuned_model_checkpoint)
        .bind(&ckpt.adapter_blob)
        .bind(&ckpt.state_blob)
        .execute(&mut *tx)
        .await?;
        insert_event(&mut tx, &ckpt.job_id, event, ckpt.created_at).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Ends a job the worker trained: `succeeded`, its fine-tuned model registered, its results
    /// file, its training cost and its final events, all in one transaction.
    pub async fn succeed_fine_tuning_job(
        &self,
        id: &str,
        worker: &str,
        success: &JobSuccess,
    ) -> Result<bool, StoreError> {
        let mut conn = self.pool.acquire().await?;
        let mut tx = conn.begin().await?;
        let files: Vec<String> = success.result_file.iter().map(|f| f.id.clone()).collect();
        let done = sqlx::query(
            "UPDATE fine_tuning_jobs SET status = 'succeeded', finished_at = $1,
                fine_tuned_model = $2, trained_tokens = $3, result_files = $4,
                estimated_finish = NULL, owner = NULL, lease_until = NULL
             WHERE id = $5 AND owner = $6 AND status = 'running'",
        )
        .bind(success.now)
        .bind(&success.model.id)
        .bind(to_i64("trained_tokens", success.trained_tokens)?)
        .bind(serde_json::Value::from(files).to_string())
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
        let m = &success.model;
        sqlx::query(&format!(
            "INSERT INTO fine_tuned_models (seq, {MODEL_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7)"
        ))
        .bind(new_seq())
        .bind(&m.id)
        .bind(m.created)
        .bind(&m.base_tier)
        .bind(&m.job_id)
        .bind(&m.adapter_blob)
        .bind(i64::from(m.deleted))
        .execute(&mut *tx)
        .await?;
        if let Some(f) = &success.result_file {
            insert_file(&mut *tx, f).await?;
        }
        if let Some(u) = &success.usage {
            insert_usage(&mut *tx, u, &Default::default()).await?;
        }
        for e in &success.events {
            insert_event(&mut tx, id, e, success.now).await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    /// A fine-tuned model, deleted or not.
    pub async fn get_fine_tuned_model(
        &self,
        id: &str,
    ) -> Result<Option<FineTunedModel>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {MODEL_COLUMNS} FROM fine_tuned_models WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(model).transpose()
    }

    /// The fine-tuned models not deleted, oldest first.
    pub async fn list_fine_tuned_models(&self) -> Result<Vec<FineTunedModel>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {MODEL_COLUMNS} FROM fine_tuned_models WHERE deleted = 0 ORDER BY seq, id"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(model).collect()
    }

    /// Deletes a fine-tuned model (it is no longer listed or served); returns whether it
    /// existed and was not deleted yet.
    pub async fn delete_fine_tuned_model(&self, id: &str) -> Result<bool, StoreError> {
        let done =
            sqlx::query("UPDATE fine_tuned_models SET deleted = 1 WHERE id = $1 AND deleted = 0")
                .bind(id)
                .execute(&self.pool)
                .await?;
        Ok(done.rows_affected() == 1)
    }
}

/// Updates a running job's progress if the worker still owns it.
async fn progress(
    tx: &mut sqlx::Transaction<'_, Any>,
    id: &str,
    worker: &str,
    trained_tokens: u64,
    estimated_finish: Option<i64>,
) -> Result<bool, StoreError> {
    let done = sqlx::query(
        "UPDATE fine_tuning_jobs SET trained_tokens = $1,
            estimated_finish = COALESCE($2, estimated_finish)
         WHERE id = $3 AND owner = $4 AND status = 'running'",
    )
    .bind(to_i64("trained_tokens", trained_tokens)?)
    .bind(estimated_finish)
    .bind(id)
    .bind(worker)
    .execute(&mut **tx)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Inserts an event (an `ftevent-` id derived from its sequence number); returns false when
/// its dedup key is already recorded for the job.
async fn insert_event(
    tx: &mut sqlx::Transaction<'_, Any>,
    job_id: &str,
    e: &NewEvent,
    now: i64,
) -> Result<bool, StoreError> {
    let seq = new_seq();
    let done = sqlx::query(
        "INSERT INTO fine_tuning_events
            (id, seq, job_id, created_at, level, type, message, data, dedup)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
         ON CONFLICT (job_id, dedup) DO NOTHING",
    )
    .bind(event_id(seq))
    .bind(seq)
    .bind(job_id)
    .bind(now)
    .bind(e.level)
    .bind(e.kind)
    .bind(&e.message)
    .bind(&e.data)
    .bind(e.dedup.clone())
    .execute(&mut **tx)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// `ftevent-` and 24 letters and digits: the sequence number and a random tail, so ids are
/// unique across servers sharing a database.
fn event_id(seq: i64) -> String {
    use std::hash::{BuildHasher, Hasher};
    const DIGITS: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_i64(seq);
    let mut tail = h.finish();
    let mut head = seq as u64;
    let mut out = String::from("ftevent-");
    for i in 0..24 {
        let n = if i < 12 { &mut head } else { &mut tail };
        out.push(DIGITS[(*n % 62) as usize] as char);
        *n /= 62;
    }
    out
}

/// Metadata as a JSON object, keys in order.
fn metadata_json(metadata: &[(String, String)]) -> String {
    let map: serde_json::Map<String, serde_json::Value> = metadata
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
        .collect();
    serde_json::Value::Object(map).to_string()
}

fn job(row: &AnyRow) -> Result<JobRecord, StoreError> {
    let metadata = match row.try_get::<Option<String>, _>("metadata")? {
        None => None,
        Some(text) => match serde_json::from_str::<serde_json::Value>(&text) {
            Ok(serde_json::Value::Object(map)) => {
                let mut pairs: Vec<(String, String)> = map
                    .into_iter()
                    .map(|(k, v)| (k, v.as_str().unwrap_or_default().to_string()))
                    .collect();
                pairs.sort();
                Some(pairs)
            }
            _ => {
                return Err(StoreError::OutOfRange {
                    field: "fine_tuning_jobs.metadata",
                    value: text,
                })
            }
        },
    };
    let files: String = row.try_get("result_files")?;
    let result_files =
        serde_json::from_str::<Vec<String>>(&files).map_err(|_| StoreError::OutOfRange {
            field: "fine_tuning_jobs.result_files",
            value: files.clone(),
        })?;
    Ok(JobRecord {
        id: row.try_get("id")?,
        created_at: row.try_get("created_at")?,
        model: row.try_get("model")?,
        base_tier: row.try_get("base_tier")?,
        training_file: row.try_get("training_file")?,
        validation_file: row.try_get("validation_file")?,
        status: JobStatus::parse(&row.try_get::<String, _>("status")?)?,
        hyperparameters: row.try_get("hyperparameters")?,
        method: row.try_get("method")?,
        seed: row.try_get("seed")?,
        suffix: row.try_get("suffix")?,
        metadata,
        error: row.try_get("error")?,
        fine_tuned_model: row.try_get("fine_tuned_model")?,
        trained_tokens: row
            .try_get::<Option<i64>, _>("trained_tokens")?
            .map(|t| to_u64("trained_tokens", t))
            .transpose()?,
        estimated_finish: row.try_get("estimated_finish")?,
        finished_at: row.try_get("finished_at")?,
        result_files,
    })
}

fn event(row: &AnyRow) -> Result<EventRecord, StoreError> {
    Ok(EventRecord {
        id: row.try_get("id")?,
        job_id: row.try_get("job_id")?,
        created_at: row.try_get("created_at")?,
        level: row.try_get("level")?,
        kind: row.try_get("type")?,
        message: row.try_get("message")?,
        data: row.try_get("data")?,
    })
}

fn checkpoint(row: &AnyRow) -> Result<CheckpointRecord, StoreError> {
    Ok(CheckpointRecord {
        id: row.try_get("id")?,
        job_id: row.try_get("job_id")?,
        created_at: row.try_get("created_at")?,
        step_number: to_u64("step_number", row.try_get("step_number")?)?,
        epoch: to_u64("epoch", row.try_get("epoch")?)?,
        metrics: row.try_get("metrics")?,
        fine_tuned_model_checkpoint: row.try_get("fine_tuned_model_checkpoint")?,
        adapter_blob: row.try_get("adapter_blob")?,
        state_blob: row.try_get("state_blob")?,
    })
}

fn model(row: &AnyRow) -> Result<FineTunedModel, StoreError> {
    Ok(FineTunedModel {
        id: row.try_get("id")?,
        created: row.try_get("created")?,
        base_tier: row.try_get("base_tier")?,
        job_id: row.try_get("job_id")?,
        adapter_blob: row.try_get("adapter_blob")?,
        deleted: row.try_get::<i64, _>("deleted")? == 1,
    })
}
