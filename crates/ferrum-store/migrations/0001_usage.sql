-- The usage ledger: one row per API response (or batch line) with its token usage and cost.
-- Only types that SQLite and Postgres both accept, and that sqlx's Any driver can decode on
-- both, are used: BIGINT, TEXT and DOUBLE PRECISION. `batch` is 0 or 1 because a BOOLEAN
-- column cannot be read back through Any on SQLite.
CREATE TABLE usage_records (
    id                TEXT PRIMARY KEY,
    created           BIGINT NOT NULL,
    model             TEXT NOT NULL,
    endpoint          TEXT NOT NULL,
    prompt_tokens     BIGINT NOT NULL,
    cached_tokens     BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    cost_usd          DOUBLE PRECISION NOT NULL,
    batch             BIGINT NOT NULL CHECK (batch IN (0, 1))
);

-- Totals are asked for "since" a time, so the time is indexed.
CREATE INDEX usage_records_created ON usage_records (created);
