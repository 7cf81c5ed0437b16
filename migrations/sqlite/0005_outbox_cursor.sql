-- switchboard SQLite schema, version 5: the relay's progress is one cursor row instead of a
-- `sent_at` update per event. SQLite has one writer, so outbox positions commit in order and the
-- relay always publishes a prefix of what is pending: "everything up to this position is
-- published" says the same as a flag per row, for one small write per relay round instead of one
-- row and one index update per event.
CREATE TABLE outbox_relay (
    id               INTEGER PRIMARY KEY CHECK (id = 1),
    published_up_to  INTEGER NOT NULL
);

-- Everything before the oldest unpublished event is published (0 for an empty outbox).
INSERT INTO outbox_relay (id, published_up_to)
VALUES (1, COALESCE((SELECT MIN(position) - 1 FROM outbox WHERE sent_at IS NULL),
                    (SELECT MAX(position) FROM outbox),
                    0));

DROP INDEX outbox_unsent;
ALTER TABLE outbox DROP COLUMN sent_at;
