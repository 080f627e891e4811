-- Fine-tuning: jobs, their events and checkpoints, and the fine-tuned models they made. As in
-- 0002, only BIGINT, TEXT and DOUBLE PRECISION columns; flags are 0/1 integers, JSON documents
-- are TEXT, lists are paged by `seq` (creation time in nanoseconds, the id as tie-break).
-- Adapters and resume states are blobs in the blob directory; rows name them.

CREATE TABLE fine_tuning_jobs (
    id               TEXT PRIMARY KEY,
    seq              BIGINT NOT NULL,
    created_at       BIGINT NOT NULL,
    -- The base model as the job reports it, and the tier it resolved to.
    model            TEXT NOT NULL,
    base_tier        TEXT NOT NULL,
    training_file    TEXT NOT NULL,
    validation_file  TEXT,
    -- validating_files -> queued -> running -> succeeded | failed | cancelled (and paused).
    status           TEXT NOT NULL,
    -- The supervised hyperparameters (JSON object; "auto" until the files are validated) and
    -- the method object.
    hyperparameters  TEXT NOT NULL,
    method           TEXT NOT NULL,
    seed             BIGINT NOT NULL,
    suffix           TEXT,
    metadata         TEXT,
    -- The error object `{code, message, param}` of a failed job.
    error            TEXT,
    fine_tuned_model TEXT,
    -- Tokens trained on so far (all epochs).
    trained_tokens   BIGINT,
    estimated_finish BIGINT,
    finished_at      BIGINT,
    -- JSON array of file ids.
    result_files     TEXT NOT NULL,
    -- The worker validating or training the job, and until when its claim holds (ms).
    owner            TEXT,
    lease_until      BIGINT
);
CREATE INDEX fine_tuning_jobs_seq ON fine_tuning_jobs (seq, id);
CREATE INDEX fine_tuning_jobs_status ON fine_tuning_jobs (status);

-- Job metadata again, one row per key, so that lists filter on it in plain SQL.
CREATE TABLE fine_tuning_job_metadata (
    job_id TEXT NOT NULL,
    key    TEXT NOT NULL,
    value  TEXT NOT NULL,
    PRIMARY KEY (job_id, key)
);

-- A job's events. `dedup` names an event that must be written once per job (a step's
-- metrics, a checkpoint's message): a resumed job that replays a step inserts nothing.
CREATE TABLE fine_tuning_events (
    id         TEXT PRIMARY KEY,
    seq        BIGINT NOT NULL,
    job_id     TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    level      TEXT NOT NULL,
    type       TEXT NOT NULL,
    message    TEXT NOT NULL,
    -- JSON object.
    data       TEXT NOT NULL,
    dedup      TEXT
);
CREATE INDEX fine_tuning_events_job ON fine_tuning_events (job_id, seq, id);
CREATE UNIQUE INDEX fine_tuning_events_dedup ON fine_tuning_events (job_id, dedup);

-- A checkpoint taken at the end of an epoch: the adapter as it stood (servable by its
-- `fine_tuned_model_checkpoint` name) and the state a resumed job starts from.
CREATE TABLE fine_tuning_checkpoints (
    id                          TEXT PRIMARY KEY,
    seq                         BIGINT NOT NULL,
    job_id                      TEXT NOT NULL,
    created_at                  BIGINT NOT NULL,
    step_number                 BIGINT NOT NULL,
    epoch                       BIGINT NOT NULL,
    -- JSON object.
    metrics                     TEXT NOT NULL,
    fine_tuned_model_checkpoint TEXT NOT NULL,
    adapter_blob                TEXT NOT NULL,
    state_blob                  TEXT NOT NULL
);
CREATE UNIQUE INDEX fine_tuning_checkpoints_step ON fine_tuning_checkpoints (job_id, step_number);
CREATE INDEX fine_tuning_checkpoints_job ON fine_tuning_checkpoints (job_id, seq, id);
CREATE INDEX fine_tuning_checkpoints_name ON fine_tuning_checkpoints (fine_tuned_model_checkpoint);

-- A fine-tuned model (`ft:...`): a base tier plus an adapter blob. Deleting one keeps the row
-- (flagged), so its id is never reused and its usage keeps a name.
CREATE TABLE fine_tuned_models (
    id           TEXT PRIMARY KEY,
    seq          BIGINT NOT NULL,
    created      BIGINT NOT NULL,
    base_tier    TEXT NOT NULL,
    job_id       TEXT NOT NULL,
    adapter_blob TEXT NOT NULL,
    deleted      BIGINT NOT NULL CHECK (deleted IN (0, 1))
);
CREATE INDEX fine_tuned_models_seq ON fine_tuned_models (seq, id);
