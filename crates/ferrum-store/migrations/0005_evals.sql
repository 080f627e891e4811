-- Evals: evals, their runs, each run's items (one row per data source item, which is also its
-- output item once graded) and what grading them cost and scored. As in 0002, only BIGINT, TEXT
-- and DOUBLE PRECISION columns; flags are 0/1 integers, JSON documents are TEXT, lists are paged
-- by `seq` (creation time in nanoseconds, the id as tie-break).

CREATE TABLE evals (
    id                 TEXT PRIMARY KEY,
    seq                BIGINT NOT NULL,
    created_at         BIGINT NOT NULL,
    name               TEXT NOT NULL,
    -- JSON object, or NULL.
    metadata           TEXT,
    -- The data source config and the testing criteria as the API shows them (JSON).
    data_source_config TEXT NOT NULL,
    testing_criteria   TEXT NOT NULL
);
CREATE INDEX evals_seq ON evals (seq, id);

-- A run: queued -> in_progress (its items written) -> completed | failed | canceled.
CREATE TABLE eval_runs (
    id          TEXT PRIMARY KEY,
    seq         BIGINT NOT NULL,
    eval_id     TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    name        TEXT NOT NULL,
    model       TEXT NOT NULL,
    status      TEXT NOT NULL,
    -- The run's data source as the API shows it (JSON).
    data_source TEXT NOT NULL,
    metadata    TEXT,
    -- The error object `{code, message}` of a failed run.
    error       TEXT,
    -- The worker reading the run's data source, and until when its claim holds (ms).
    owner       TEXT,
    lease_until BIGINT
);
CREATE INDEX eval_runs_eval ON eval_runs (eval_id, seq, id);
CREATE INDEX eval_runs_status ON eval_runs (status);

-- One item of a run's data source. `state`: pending -> running (claimed by `owner` until
-- `lease_until`, renewed while it runs) -> done. The primary key makes each item exist once per
-- run; its result (the output item) is written once, by its owner, in the same transaction as
-- its usage and criteria rows and its usage ledger records.
CREATE TABLE eval_run_items (
    run_id      TEXT NOT NULL,
    item_index  BIGINT NOT NULL,
    -- The output item's id, and its place in lists (the items' order in the data source).
    id          TEXT NOT NULL,
    seq         BIGINT NOT NULL,
    -- JSON: the item, and the sample given with it (or NULL).
    item        TEXT NOT NULL,
    given       TEXT,
    state       TEXT NOT NULL,
    owner       TEXT,
    lease_until BIGINT,
    attempts    BIGINT NOT NULL,
    -- Once done: pass | fail | error, when, the grader results and the sample (JSON).
    status      TEXT,
    created_at  BIGINT,
    results     TEXT,
    sample      TEXT,
    PRIMARY KEY (run_id, item_index)
);
CREATE UNIQUE INDEX eval_run_items_id ON eval_run_items (id);
CREATE INDEX eval_run_items_state ON eval_run_items (run_id, state);

-- The model calls an item made (sampling and model graders), per model.
CREATE TABLE eval_run_usage (
    run_id            TEXT NOT NULL,
    item_index        BIGINT NOT NULL,
    model             TEXT NOT NULL,
    invocations       BIGINT NOT NULL,
    prompt_tokens     BIGINT NOT NULL,
    cached_tokens     BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    PRIMARY KEY (run_id, item_index, model)
);

-- Whether an item passed each testing criterion (by the criterion's id).
CREATE TABLE eval_run_criteria (
    run_id     TEXT NOT NULL,
    item_index BIGINT NOT NULL,
    criterion  TEXT NOT NULL,
    passed     BIGINT NOT NULL CHECK (passed IN (0, 1)),
    PRIMARY KEY (run_id, item_index, criterion)
);
