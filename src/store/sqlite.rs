//! The embedded SQLite store (WAL, group commit): the default backend.
