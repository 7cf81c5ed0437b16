-- switchboard PostgreSQL schema, version 1: the same tables and constraints as the SQLite schema.
--
-- Ids are ULIDs as 26-character text in the "C" collation (byte order = creation order).
-- Timestamps are nanoseconds since the Unix epoch (UTC) as BIGINT: the store returns exactly the
-- instants it was given, and timestamptz keeps only microseconds. The lease's expiry is the one
-- exception: it is compared with the database's own clock, so every instance agrees on it.
-- JSON documents are `json` (kept exactly as written, validated on the way in).

-- A customer, whatever channels they use.
CREATE TABLE contacts (
    id          TEXT COLLATE "C" PRIMARY KEY,
    name        TEXT,
    tier        TEXT,
    language    TEXT,
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL
);

-- One identity (an email address, an E.164 number, an external customer id, a social id) belongs
-- to exactly one contact. The primary key is what keeps two instances that see a new customer at
-- once from creating two contacts: the second insert waits for the first and then finds it.
CREATE TABLE identity_links (
    kind        TEXT NOT NULL,
    value       TEXT NOT NULL,
    contact_id  TEXT COLLATE "C" NOT NULL REFERENCES contacts (id),
    created_at  BIGINT NOT NULL,
    PRIMARY KEY (kind, value)
);

CREATE INDEX identity_links_contact ON identity_links (contact_id);

CREATE TABLE conversations (
    id                      TEXT COLLATE "C" PRIMARY KEY,
    contact_id              TEXT COLLATE "C" NOT NULL REFERENCES contacts (id),
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
    created_at              BIGINT NOT NULL,
    updated_at              BIGINT NOT NULL,
    resolved_at             BIGINT,
    closed_at               BIGINT,
    -- The router's state document, NULL until the router first saves it.
    routing_state           JSON,
    -- The sequence number of this conversation's latest event.
    event_seq               BIGINT NOT NULL DEFAULT 0,
    -- The leadership epoch of the routing write that last changed it.
    epoch                   BIGINT NOT NULL DEFAULT 0
);

-- Matching: the contact's most recently updated conversation that is not closed.
CREATE INDEX conversations_contact ON conversations (contact_id, updated_at);
-- Admin listing, newest first.
CREATE INDEX conversations_updated ON conversations (updated_at);
-- Recovery: only live conversations.
CREATE INDEX conversations_live ON conversations (status) WHERE status <> 'closed';

-- Thread keys of conversations that are not closed, scoped by channel.
CREATE TABLE conversation_threads (
    channel          TEXT NOT NULL,
    thread_key       TEXT NOT NULL,
    conversation_id  TEXT COLLATE "C" NOT NULL REFERENCES conversations (id),
    PRIMARY KEY (channel, thread_key)
);

CREATE INDEX conversation_threads_conversation ON conversation_threads (conversation_id);

CREATE TABLE messages (
    -- Storage order (recovery replays unrouted messages in the order they were acknowledged).
    position             BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE,
    id                   TEXT COLLATE "C" PRIMARY KEY,
    conversation_id      TEXT COLLATE "C" NOT NULL REFERENCES conversations (id),
    direction            TEXT NOT NULL CHECK (direction IN ('inbound', 'outbound')),
    channel              TEXT NOT NULL,
    provider             TEXT NOT NULL,
    provider_message_id  TEXT,
    thread_key           TEXT NOT NULL,
    from_address         TEXT NOT NULL,
    to_address           TEXT NOT NULL,
    -- Inbound: the full switchboard.message.v1 document. Outbound: the reply as sent.
    body                 JSON NOT NULL,
    created_at           BIGINT NOT NULL,
    -- Inbound: true once handed to the router; recovery replays the others.
    routed               BOOLEAN NOT NULL DEFAULT false,
    -- Outbound: pending, sent, delivered, failed.
    delivery_status      TEXT,
    agent_id             TEXT,
    -- Deduplication across every instance: a provider delivering the same message twice.
    UNIQUE (channel, provider_message_id)
);

CREATE INDEX messages_conversation ON messages (conversation_id, created_at);
CREATE INDEX messages_unrouted ON messages (position) WHERE NOT routed AND direction = 'inbound';
CREATE INDEX messages_pending ON messages (id) WHERE direction = 'outbound' AND delivery_status = 'pending';

CREATE TABLE agent_state (
    agent_id    TEXT PRIMARY KEY,
    state       JSON NOT NULL,
    updated_at  BIGINT NOT NULL
);

-- Transactional outbox: events are written in the same commit as the change that caused them
-- and published afterwards in position order.
CREATE TABLE outbox (
    position         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id         TEXT COLLATE "C" NOT NULL UNIQUE,
    kind             TEXT NOT NULL,
    conversation_id  TEXT COLLATE "C" REFERENCES conversations (id),
    seq              BIGINT NOT NULL,
    data             JSON NOT NULL,
    time             BIGINT NOT NULL,
    sent_at          BIGINT
);

CREATE INDEX outbox_unsent ON outbox (position) WHERE sent_at IS NULL;

-- The router's lease and fencing epoch: one row. `epoch` grows at every takeover (and is raised by
-- a routing write from a newer epoch); a routing write from an older epoch is refused. `holder`
-- leads until `expires_at` (the database's clock) unless it renews.
CREATE TABLE leadership (
    id          SMALLINT PRIMARY KEY CHECK (id = 1),
    epoch       BIGINT NOT NULL,
    holder      TEXT,
    expires_at  TIMESTAMPTZ,
    updated_at  TIMESTAMPTZ NOT NULL
);

INSERT INTO leadership (id, epoch, updated_at) VALUES (1, 0, now());

-- One row rewritten by the readiness check, so that it proves a real commit.
CREATE TABLE write_probe (
    id          SMALLINT PRIMARY KEY CHECK (id = 1),
    checked_at  BIGINT NOT NULL
);
