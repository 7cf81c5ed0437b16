-- switchboard SQLite schema, version 2: the router's lease on the leadership row.
--
-- `holder` leads until `expires_at` (RFC 3339 UTC text, fixed width) unless it renews; taking the
-- lease raises `epoch`, which fences every routing write of the previous holder.
ALTER TABLE leadership ADD COLUMN holder TEXT;
ALTER TABLE leadership ADD COLUMN expires_at TEXT;
