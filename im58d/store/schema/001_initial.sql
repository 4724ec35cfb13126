-- im58d schema version 1.
-- Versions (row "version" columns and list_versions) start at 1 when a row
-- or list comes into being and grow by one with each change; 0 means "none"
-- to a client.

-- Accounts and their profile; version is the row version for /v1/users/sync.
CREATE TABLE users (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    password TEXT NOT NULL,            -- "scrypt$n$r$p$salt$hash", never plain
    disabled INTEGER NOT NULL DEFAULT 0,
    nick TEXT NOT NULL DEFAULT '',
    gender INTEGER NOT NULL DEFAULT 0, -- 0 unknown, 1 male, 2 female, 3 other
    birthday TEXT,
    version INTEGER NOT NULL DEFAULT 1,
    created INTEGER NOT NULL
);

-- A message is stored once, whatever the number of its receivers.
CREATE TABLE messages (
    id INTEGER PRIMARY KEY,
    sender INTEGER NOT NULL,
    cmid INTEGER NOT NULL,             -- the sender's client message id
    kind INTEGER NOT NULL,             -- 0 to a user, 1 to a group
    target INTEGER NOT NULL,           -- receiver uid (kind 0) or gid (kind 1)
    seq INTEGER,                       -- the receiver's inbox seq (kind 0)
    body NOT NULL,                     -- TEXT or BLOB, as the sender sent it
    ts INTEGER NOT NULL,
    UNIQUE (sender, cmid)              -- the sender de-dup key
);

-- One row per user: the inbox head (last seq given out) and the ack cursor
-- (every entry up to acked_seq was received).
CREATE TABLE inboxes (
    uid INTEGER PRIMARY KEY,
    max_seq INTEGER NOT NULL DEFAULT 0,
    acked_seq INTEGER NOT NULL DEFAULT 0
);

CREATE TABLE inbox (
    uid INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    msg_id INTEGER NOT NULL,
    PRIMARY KEY (uid, seq)
) WITHOUT ROWID;

-- The versions of a user's lists.
CREATE TABLE list_versions (
    uid INTEGER PRIMARY KEY,
    friend_list INTEGER NOT NULL DEFAULT 1,
    group_list INTEGER NOT NULL DEFAULT 1,
    category_list INTEGER NOT NULL DEFAULT 1
);

-- A user's friend categories; category 0 is "no category".
CREATE TABLE categories (
    id INTEGER PRIMARY KEY,
    uid INTEGER NOT NULL,
    name TEXT NOT NULL,
    UNIQUE (uid, name)
);

-- Friendship is stored both ways, each side with its own category.
CREATE TABLE friends (
    uid INTEGER NOT NULL,
    friend INTEGER NOT NULL,
    category INTEGER NOT NULL DEFAULT 0,
    since INTEGER NOT NULL,
    PRIMARY KEY (uid, friend)
) WITHOUT ROWID;

CREATE TABLE friend_requests (
    sender INTEGER NOT NULL,
    receiver INTEGER NOT NULL,
    category INTEGER NOT NULL DEFAULT 0, -- the sender's category for the receiver
    ts INTEGER NOT NULL,
    PRIMARY KEY (sender, receiver)
) WITHOUT ROWID;
CREATE INDEX friend_requests_receiver ON friend_requests (receiver);

CREATE TABLE groups (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    intro TEXT NOT NULL DEFAULT '',
    owner INTEGER NOT NULL,
    version INTEGER NOT NULL DEFAULT 1,         -- row version (name, intro, owner)
    members_version INTEGER NOT NULL DEFAULT 1, -- member list version
    created INTEGER NOT NULL
);

CREATE TABLE group_members (
    gid INTEGER NOT NULL,
    uid INTEGER NOT NULL,
    joined INTEGER NOT NULL,
    PRIMARY KEY (gid, uid)
) WITHOUT ROWID;
CREATE INDEX group_members_uid ON group_members (uid, gid);

-- Client log reports: counts per day and key, distinct users per day and
-- key, and the batch ids already counted.
CREATE TABLE report_counts (
    day TEXT NOT NULL,                 -- YYYY-MM-DD, UTC
    key TEXT NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (day, key)
) WITHOUT ROWID;

CREATE TABLE report_users (
    day TEXT NOT NULL,
    key TEXT NOT NULL,
    uid INTEGER NOT NULL,
    PRIMARY KEY (day, key, uid)
) WITHOUT ROWID;

CREATE TABLE report_batches (
    uid INTEGER NOT NULL,
    batch TEXT NOT NULL,
    ts INTEGER NOT NULL,
    PRIMARY KEY (uid, batch)
) WITHOUT ROWID;
