-- switchboard SQLite schema, version 1.
--
-- Ids are ULIDs as 26-character text (they sort by creation time). Timestamps are RFC 3339 UTC
-- text with a fixed nine-digit fraction, so they sort as text. JSON documents are text.

-- A customer, whatever channels they use.
CREATE TABLE contacts (
    id          TEXT PRIMARY KEY,
    name        TEXT,
    tier        TEXT,
    language    TEXT,
    created_at  TEXT NOT NULL,
    updated_at  TEXT NOT NULL
);

-- One identity (an email address, an E.164 number, an external customer id, a social id) belongs
-- to exactly one contact: this is how a second channel finds the customer's open conversation.
CREATE TABLE identity_links (
    kind        TEXT NOT NULL,
    value       TEXT NOT NULL,
    contact_id  TEXT NOT NULL REFERENCES contacts (id),
    created_at  TEXT NOT NULL,
    PRIMARY KEY (kind, value)
) WITHOUT ROWID;

CREATE INDEX identity_links_contact ON identity_links (contact_id);

CREATE TABLE conversations (
    id                      TEXT PRIMARY KEY,
    contact_id              TEXT NOT NULL REFERENCES contacts (id),
    status                  TEXT NOT NULL CHECK (status IN ('open', 'resolved', 'closed')),
    -- The channel of the first message.
    channel                 TEXT NOT NULL,
    -- Where replies go: the customer's latest message.
    reply_channel           TEXT NOT NULL,
    reply_provider          TEXT NOT NULL,
    reply_customer_address  TEXT NOT NULL,
    reply_our_address       TEXT NOT NULL,
    reply_thread_key        TEXT NOT NULL,
    subject                 TEXT,
    created_at              TEXT NOT NULL,
    updated_at              TEXT NOT NULL,
    resolved_at             TEXT,
    closed_at               TEXT,
    -- The router's state document (JSON), NULL until the router first saves it.
    routing_state           TEXT,
    -- The sequence number of this conversation's latest event.
    event_seq               INTEGER NOT NULL DEFAULT 0,
    -- The leadership epoch of the routing write that last changed it.
    epoch                   INTEGER NOT NULL DEFAULT 0
);

-- Matching: the contact's most recently updated conversation that is not closed.
CREATE INDEX conversations_contact ON conversations (contact_id, updated_at);
-- Admin listing, newest first.
CREATE INDEX conversations_updated ON conversations (updated_at);
-- Recovery: only live conversations.
CREATE INDEX conversations_live ON conversations (status) WHERE status <> 'closed';

-- Thread keys of conversations that are not closed (closing a conversation removes its keys, so
-- the next message on the thread starts a new conversation). Scoped by channel so that keys from
-- different channels never collide.
CREATE TABLE conversation_threads (
    channel          TEXT NOT NULL,
    thread_key       TEXT NOT NULL,
    conversation_id  TEXT NOT NULL REFERENCES conversations (id),
    PRIMARY KEY (channel, thread_key)
) WITHOUT ROWID;

CREATE INDEX conversation_threads_conversation ON conversation_threads (conversation_id);

CREATE TABLE messages (
    id                   TEXT PRIMARY KEY,
    conversation_id      TEXT NOT NULL REFERENCES conversations (id),
    direction            TEXT NOT NULL CHECK (direction IN ('inbound', 'outbound')),
    channel              TEXT NOT NULL,
    provider             TEXT NOT NULL,
    provider_message_id  TEXT,
    thread_key           TEXT NOT NULL,
    from_address         TEXT NOT NULL,
    to_address           TEXT NOT NULL,
    -- Inbound: the full switchboard.message.v1 document. Outbound: the reply as sent.
    body                 TEXT NOT NULL,
    created_at           TEXT NOT NULL,
    -- Inbound: 1 once handed to the router; recovery replays the others.
    routed               INTEGER NOT NULL DEFAULT 0,
    -- Outbound: pending, sent, delivered, failed.
    delivery_status      TEXT,
    agent_id             TEXT,
    -- Deduplication: a provider delivering the same message twice.
    UNIQUE (channel, provider_message_id)
);

CREATE INDEX messages_conversation ON messages (conversation_id, created_at);
CREATE INDEX messages_unrouted ON messages (routed) WHERE routed = 0 AND direction = 'inbound';

CREATE TABLE agent_state (
    agent_id    TEXT PRIMARY KEY,
    state       TEXT NOT NULL,
    updated_at  TEXT NOT NULL
);

-- Transactional outbox: events are written in the same commit as the change that caused them
-- and published afterwards in position order.
CREATE TABLE outbox (
    position         INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id         TEXT NOT NULL UNIQUE,
    kind             TEXT NOT NULL,
    conversation_id  TEXT REFERENCES conversations (id),
    seq              INTEGER NOT NULL,
    data             TEXT NOT NULL,
    time             TEXT NOT NULL,
    sent_at          TEXT
);

CREATE INDEX outbox_unsent ON outbox (position) WHERE sent_at IS NULL;

-- The highest leadership epoch that has written routing state. A routing write from a lower
-- epoch (a deposed leader) is refused. A single node always writes epoch 0.
CREATE TABLE leadership (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    epoch       INTEGER NOT NULL,
    updated_at  TEXT NOT NULL
);

INSERT INTO leadership (id, epoch, updated_at) VALUES (1, 0, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'));

-- One row rewritten by the readiness check, so that it proves a real commit reaches the disk.
CREATE TABLE write_probe (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    checked_at  TEXT NOT NULL
);
