-- im58d schema version 4: contract version 2 (PROTOCOL.md section 0).
--
-- A user signs in on several devices, each with a durable session; sends are
-- de-duplicated by (sender, device, cmid); a user's inbox is their timeline,
-- holding the messages they sent as well as those they received.

-- A device of a user, kept after its session ends: its id keys the messages
-- it sent (so a cmid is never taken for another message), and its cursor is
-- where it goes on when it signs in again.
CREATE TABLE devices (
    id INTEGER PRIMARY KEY,            -- messages.device; 0 means "before version 4"
    uid INTEGER NOT NULL,
    device_id BLOB NOT NULL,           -- the 16 bytes the app made for its installation
    name TEXT NOT NULL DEFAULT '',
    acked INTEGER NOT NULL DEFAULT 0,  -- the device's ack cursor in the user's timeline
    UNIQUE (uid, device_id)
);

-- A device's sign-in.  The session key is a secret: the database file is
-- kept private to the daemon's user (mode 0600).
CREATE TABLE sessions (
    id BLOB PRIMARY KEY,               -- session_id, 16 random bytes
    device INTEGER NOT NULL UNIQUE,    -- devices.id: one session per device
    uid INTEGER NOT NULL,
    key BLOB NOT NULL,                 -- session_key, 32 random bytes
    token TEXT NOT NULL UNIQUE,        -- the bearer token for HTTP
    client TEXT,
    nonce BLOB NOT NULL,               -- the last RESUME nonce accepted, 8 bytes big-endian
    created INTEGER NOT NULL,
    last_active INTEGER NOT NULL,      -- sign-in, RESUME, going offline: eviction, expiry
    online INTEGER NOT NULL DEFAULT 0  -- 1 from WELCOME/RESUMED to BYE or linger expiry
) WITHOUT ROWID;
CREATE INDEX sessions_uid ON sessions (uid, last_active);

-- Messages: the de-dup key gains the device.  Messages of version 1 keep
-- device 0 and have no entry in their sender's timeline (sender_seq NULL).
CREATE TABLE messages_v4 (
    id INTEGER PRIMARY KEY,
    sender INTEGER NOT NULL,
    device INTEGER NOT NULL,           -- devices.id of the sending device
    cmid INTEGER NOT NULL,             -- the device's client message id
    kind INTEGER NOT NULL,             -- 0 to a user, 1 to a group
    target INTEGER NOT NULL,           -- receiver uid (kind 0) or gid (kind 1)
    seq INTEGER,                       -- the receiver's timeline seq (kind 0)
    sender_seq INTEGER,                -- the sender's timeline seq
    body NOT NULL,                     -- TEXT or BLOB, as the sender sent it
    ts INTEGER NOT NULL,
    UNIQUE (sender, device, cmid)      -- the de-dup key; also gives a device's last cmid
);
INSERT INTO messages_v4 (id, sender, device, cmid, kind, target, seq, sender_seq, body, ts)
    SELECT id, sender, 0, cmid, kind, target, seq, NULL, body, ts FROM messages;
DROP TABLE messages;
ALTER TABLE messages_v4 RENAME TO messages;

-- inboxes: max_seq is the timeline's head, acked_seq the highest cursor of
-- any of the user's devices (what "received" means for ACK_N and
-- delivered), and acked_device the device that holds it: that device's
-- cursor is acked_seq, not devices.acked, so that the ack of a user's
-- leading device (one device: every ack) writes one row, as in version 1.
-- A device that signs in for the first time starts at base_seq: the
-- version-1 ack cursor, so that nothing is pulled twice after the upgrade;
-- 0 for users made since.
ALTER TABLE inboxes ADD COLUMN base_seq INTEGER NOT NULL DEFAULT 0;
ALTER TABLE inboxes ADD COLUMN acked_device INTEGER NOT NULL DEFAULT 0;
UPDATE inboxes SET base_seq = acked_seq;

-- every device's cursor, wherever it is kept
CREATE VIEW device_cursors AS
    SELECT d.id, d.uid, d.device_id,
           max(d.acked, CASE WHEN h.acked_device = d.id THEN h.acked_seq ELSE 0 END) AS acked
    FROM devices d JOIN inboxes h ON h.uid = d.uid;

-- Two more lists with versions: pending friend requests and devices.
ALTER TABLE list_versions ADD COLUMN request_list INTEGER NOT NULL DEFAULT 1;
ALTER TABLE list_versions ADD COLUMN device_list INTEGER NOT NULL DEFAULT 1;
