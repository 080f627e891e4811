-- Reserved capacity (provisioned throughput): the tokens a minute of a model a project's
-- requests are served at priority, ahead of other projects' (0: none).
ALTER TABLE project_rate_limits ADD COLUMN reserved_tokens_per_1_minute BIGINT NOT NULL DEFAULT 0;
