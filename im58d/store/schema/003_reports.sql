-- im58d schema version 3: client log reports (PROTOCOL.md section 3).
-- Each (day, key) row keeps its number of distinct users beside its count,
-- so that GET /v1/stats reads one row per day instead of counting users.
ALTER TABLE report_counts ADD COLUMN users INTEGER NOT NULL DEFAULT 0;
UPDATE report_counts SET users = (
    SELECT count(*) FROM report_users u
    WHERE u.day = report_counts.day AND u.key = report_counts.key);
-- one key over a range of days (stats)
CREATE INDEX report_counts_key ON report_counts (key, day);
-- forgetting batch ids that no client retries any more
CREATE INDEX report_batches_ts ON report_batches (ts);
