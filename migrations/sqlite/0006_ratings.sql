-- switchboard SQLite schema, version 6: customers' ratings of resolved conversations (one each).
CREATE TABLE ratings (
    conversation_id TEXT PRIMARY KEY REFERENCES conversations (id),
    score           INTEGER NOT NULL CHECK (score BETWEEN 1 AND 5),
    comment         TEXT NOT NULL,
    agent_id        TEXT,
    rated_at        TEXT NOT NULL
);
CREATE INDEX ratings_by_time ON ratings (rated_at);
