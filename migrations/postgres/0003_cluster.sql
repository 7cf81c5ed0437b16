-- switchboard PostgreSQL schema, version 3: several instances on one database.
--
-- The store is the truth for everything that crosses instances; NOTIFY only wakes the reader, so a
-- missed notification delays and loses nothing.

-- Every instance's heartbeat (for `GET /v1/admin/cluster`); the lease says who leads.
CREATE TABLE cluster_members (
    node_id       TEXT PRIMARY KEY,
    address       TEXT NOT NULL,
    started_at    TIMESTAMPTZ NOT NULL,
    heartbeat_at  TIMESTAMPTZ NOT NULL
);

-- Agent commands taken by a follower, run by the leader; the answer is written back to the row.
CREATE TABLE agent_commands (
    position     BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id           TEXT COLLATE "C" NOT NULL UNIQUE,
    node_id      TEXT NOT NULL,
    agent_id     TEXT NOT NULL,
    command      JSON NOT NULL,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    answer       JSON,
    answered_at  TIMESTAMPTZ
);

CREATE INDEX agent_commands_open ON agent_commands (position) WHERE answer IS NULL;

-- What the leader pushes to agents' desktops, committed with the routing write that decided it, so
-- the instance holding an agent's WebSocket pushes it too. Only the leader writes here, one commit
-- after another (fenced), so positions become visible in order.
CREATE TABLE agent_pushes (
    position    BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    origin      TEXT NOT NULL,
    agent_id    TEXT NOT NULL,
    document    JSON NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
