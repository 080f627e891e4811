-- Projects, their service accounts and API keys, admin keys, per-project rate limits and the
-- shared rate-limit windows; the ledger and batches learn which project and key they belong to.
-- As before: BIGINT, TEXT and DOUBLE PRECISION only, lists paged by `seq`.

CREATE TABLE projects (
    id              TEXT PRIMARY KEY,
    seq             BIGINT NOT NULL,
    name            TEXT NOT NULL,
    created_at      BIGINT NOT NULL,
    archived_at     BIGINT,
    external_key_id TEXT
);
CREATE INDEX projects_seq ON projects (seq, id);

CREATE TABLE service_accounts (
    id         TEXT PRIMARY KEY,
    seq        BIGINT NOT NULL,
    project_id TEXT NOT NULL,
    name       TEXT NOT NULL,
    role       TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    deleted_at BIGINT
);
CREATE INDEX service_accounts_project ON service_accounts (project_id, seq, id);

-- Every key, project or admin. Only the SHA-256 of a key is kept (`hash`), never the key; a
-- deleted key keeps its row (`deleted_at`), so it is refused as revoked, and a database that
-- ever had a key never falls back to an open server.
CREATE TABLE api_keys (
    id                 TEXT PRIMARY KEY,
    seq                BIGINT NOT NULL,
    kind               TEXT NOT NULL CHECK (kind IN ('project', 'admin')),
    project_id         TEXT,
    service_account_id TEXT,
    name               TEXT NOT NULL,
    hash               TEXT NOT NULL UNIQUE,
    redacted           TEXT NOT NULL,
    created_at         BIGINT NOT NULL,
    expires_at         BIGINT,
    last_used_at       BIGINT,
    deleted_at         BIGINT
);
CREATE INDEX api_keys_project ON api_keys (project_id, seq, id);

-- A project's limits on one model; a model without a row has the server's defaults.
CREATE TABLE project_rate_limits (
    project_id                   TEXT NOT NULL,
    model                        TEXT NOT NULL,
    max_requests_per_1_minute    BIGINT NOT NULL,
    max_tokens_per_1_minute      BIGINT NOT NULL,
    batch_1_day_max_input_tokens BIGINT NOT NULL,
    PRIMARY KEY (project_id, model)
);

-- What a project used of a model in one window (a minute, or a day for batch input tokens
-- under `model` = 'batch:<model>'), and the limits that applied when it was last admitted.
CREATE TABLE rate_limit_windows (
    project_id   TEXT NOT NULL,
    model        TEXT NOT NULL,
    window_start BIGINT NOT NULL,
    requests     BIGINT NOT NULL,
    tokens       BIGINT NOT NULL,
    max_requests BIGINT NOT NULL,
    max_tokens   BIGINT NOT NULL,
    PRIMARY KEY (project_id, model, window_start)
);
CREATE INDEX rate_limit_windows_start ON rate_limit_windows (window_start);

ALTER TABLE usage_records ADD COLUMN project_id TEXT;
ALTER TABLE usage_records ADD COLUMN api_key_id TEXT;
ALTER TABLE batches ADD COLUMN project_id TEXT;
ALTER TABLE batches ADD COLUMN api_key_id TEXT;
