-- switchboard PostgreSQL schema, version 6: every instance follows the committed events.
--
-- Positions come from an identity, and transactions on several instances may commit in another
-- order than they drew their positions, so "the events after position P" could step over one that
-- committed late. Each event therefore records the transaction that wrote it: a reader takes only
-- events of transactions older than every transaction still running (`pg_snapshot_xmin`), in
-- (transaction, position) order, and sees each committed event once.
ALTER TABLE outbox ADD COLUMN txid xid8 NOT NULL DEFAULT pg_current_xact_id();

CREATE INDEX outbox_commit_order ON outbox (txid, position);
