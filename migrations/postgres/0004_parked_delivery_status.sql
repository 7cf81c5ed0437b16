-- switchboard PostgreSQL schema, version 4: provider statuses that arrive before their reply's
-- provider id is stored (a status callback can beat the sender's own write). Kept here, the
-- furthest-forward one per id, and applied in the transaction that stores the id; both writes take
-- one transaction-scoped advisory lock per (channel, provider id), so neither misses the other.
CREATE TABLE parked_delivery_statuses (
    channel              TEXT NOT NULL,
    provider_message_id  TEXT NOT NULL,
    status               TEXT NOT NULL CHECK (status IN ('delivered', 'failed')),
    error                TEXT,
    -- Nanoseconds since the epoch; statuses of ids that never become ours are pruned after a day.
    received_at          BIGINT NOT NULL,
    PRIMARY KEY (channel, provider_message_id)
);
