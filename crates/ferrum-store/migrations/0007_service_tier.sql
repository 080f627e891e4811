-- The service tier a request ran at (`default`, `flex` or `priority`), which the usage API
-- groups by; rows before this migration ran at the default tier.
ALTER TABLE usage_records ADD COLUMN service_tier TEXT NOT NULL DEFAULT 'default';
