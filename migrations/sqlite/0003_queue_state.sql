-- switchboard SQLite schema, version 3: each queue's router state (recent handle times, from which
-- estimated waits are computed), so a restart keeps the estimates where they were.
CREATE TABLE queue_state (
    queue       TEXT PRIMARY KEY,
    state       TEXT NOT NULL,
    updated_at  TEXT NOT NULL
);
