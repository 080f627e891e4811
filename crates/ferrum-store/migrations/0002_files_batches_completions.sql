-- Files, batches and stored chat completions. As in 0001, only BIGINT, TEXT and DOUBLE
-- PRECISION columns; flags are 0/1 integers, JSON documents are TEXT. Lists are paged by
-- `seq`, a creation time in nanoseconds (with the id as tie-break), so that `after` cursors work
-- the same on both backends without an auto-increment column (whose syntax differs).

-- An uploaded file or a batch's output; the bytes live in the blob directory under `id`.
CREATE TABLE files (
    id         TEXT PRIMARY KEY,
    seq        BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    filename   TEXT NOT NULL,
    purpose    TEXT NOT NULL,
    bytes      BIGINT NOT NULL,
    expires_at BIGINT
);
CREATE INDEX files_seq ON files (seq, id);

CREATE TABLE batches (
    id                TEXT PRIMARY KEY,
    seq               BIGINT NOT NULL,
    created_at        BIGINT NOT NULL,
    endpoint          TEXT NOT NULL,
    input_file_id     TEXT NOT NULL,
    completion_window TEXT NOT NULL,
    status            TEXT NOT NULL,
    metadata          TEXT,
    model             TEXT,
    errors            TEXT,
    output_file_id    TEXT,
    error_file_id     TEXT,
    in_progress_at    BIGINT,
    expires_at        BIGINT NOT NULL,
    finalizing_at     BIGINT,
    completed_at      BIGINT,
    failed_at         BIGINT,
    expired_at        BIGINT,
    cancelling_at     BIGINT,
    cancelled_at      BIGINT,
    -- The worker holding a step that must run once (validation, finalization), and until when.
    owner             TEXT,
    lease_until       BIGINT
);
CREATE INDEX batches_seq ON batches (seq, id);
CREATE INDEX batches_status ON batches (status);

-- One request of a batch. `state`: pending -> running (claimed by `owner` until `lease_until`,
-- renewed while it runs) -> done. A line's result is written once, by its owner, in the same
-- transaction as its usage record.
CREATE TABLE batch_lines (
    batch_id      TEXT NOT NULL,
    line          BIGINT NOT NULL,
    custom_id     TEXT NOT NULL,
    body          TEXT NOT NULL,
    state         TEXT NOT NULL,
    owner         TEXT,
    lease_until   BIGINT,
    attempts      BIGINT NOT NULL,
    -- The output JSONL line, and whether it belongs in the error file.
    result        TEXT,
    failed        BIGINT NOT NULL CHECK (failed IN (0, 1)),
    input_tokens  BIGINT NOT NULL,
    cached_tokens BIGINT NOT NULL,
    output_tokens BIGINT NOT NULL,
    PRIMARY KEY (batch_id, line)
);
CREATE INDEX batch_lines_state ON batch_lines (batch_id, state);

-- A chat completion created with `store: true`: the request and the response as JSON.
CREATE TABLE chat_completions (
    id       TEXT PRIMARY KEY,
    seq      BIGINT NOT NULL,
    created  BIGINT NOT NULL,
    model    TEXT NOT NULL,
    metadata TEXT NOT NULL,
    request  TEXT NOT NULL,
    response TEXT NOT NULL
);
CREATE INDEX chat_completions_seq ON chat_completions (seq, id);

-- Metadata again, one row per key, so that lists filter on it with plain SQL on both backends.
CREATE TABLE chat_completion_metadata (
    completion_id TEXT NOT NULL,
    key           TEXT NOT NULL,
    value         TEXT NOT NULL,
    PRIMARY KEY (completion_id, key)
);
