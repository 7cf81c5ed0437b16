-- switchboard PostgreSQL schema, version 2: each queue's router state (recent handle times, from
-- which estimated waits are computed), so a restart or a failover keeps the estimates.
CREATE TABLE queue_state (
    queue       TEXT PRIMARY KEY,
    state       JSON NOT NULL,
    updated_at  BIGINT NOT NULL
);
