-- switchboard SQLite schema, version 7: attachment contents, one row per content (named by its
-- SHA-256 in hex), written in the same transaction as the message that brought them.
CREATE TABLE attachments (
    sha256      TEXT PRIMARY KEY,
    size        INTEGER NOT NULL,
    content     BLOB NOT NULL,
    created_at  TEXT NOT NULL
);
