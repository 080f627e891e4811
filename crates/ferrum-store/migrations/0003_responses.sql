-- Responses of the Responses API. `input_items` and `output` are the JSON arrays the API
-- shows; `object` is the whole response object. A conversation is rebuilt by following
-- `previous_response_id` back to its start.
CREATE TABLE responses (
    id                   TEXT PRIMARY KEY,
    seq                  BIGINT NOT NULL,
    created_at           BIGINT NOT NULL,
    model                TEXT NOT NULL,
    status               TEXT NOT NULL,
    previous_response_id TEXT,
    input_items          TEXT NOT NULL,
    output               TEXT NOT NULL,
    object               TEXT NOT NULL
);
