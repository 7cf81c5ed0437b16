-- switchboard PostgreSQL schema, version 7: routing writes are counted.
--
-- An instance waiting to take over reads the router's stored state while the leader's lease runs
-- out. Once it holds the lease (which fences every later write of the old leader), an unchanged
-- count tells it that nothing it read has changed since, so it routes without reading it again.
ALTER TABLE leadership ADD COLUMN routing_writes BIGINT NOT NULL DEFAULT 0;
