-- switchboard PostgreSQL schema, version 5: customers' ratings of resolved conversations (one each).
CREATE TABLE ratings (
    conversation_id TEXT COLLATE "C" PRIMARY KEY REFERENCES conversations (id),
    score           SMALLINT NOT NULL CHECK (score BETWEEN 1 AND 5),
    comment         TEXT NOT NULL,
    agent_id        TEXT,
    rated_at        BIGINT NOT NULL
);
CREATE INDEX ratings_by_time ON ratings (rated_at);
