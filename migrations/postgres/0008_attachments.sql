-- switchboard PostgreSQL schema, version 8: attachment contents, one row per content (named by its
-- SHA-256 in hex), written in the same transaction as the message that brought them, so every
-- instance serves every attachment.
CREATE TABLE attachments (
    sha256      TEXT COLLATE "C" PRIMARY KEY,
    size        BIGINT NOT NULL,
    content     BYTEA NOT NULL,
    created_at  BIGINT NOT NULL
);
