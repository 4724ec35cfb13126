-- im58d schema version 2.
-- Row versions (users.version, groups.version) are drawn from one counter
-- that only grows, so the highest row version among a user's friends (or
-- groups) moves whenever one of their details changes: GET /v1/versions
-- tells a client that without it uploading anything.
CREATE TABLE counters (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
INSERT INTO counters (name, value) VALUES ('row_version', max(
    (SELECT coalesce(max(version), 0) FROM users),
    (SELECT coalesce(max(version), 0) FROM groups),
    1));
