//! The embedded SQLite store (WAL, group commit): the default backend.
//!
//! # Durability and group commit
//!
//! An acknowledged message must survive power loss, so the database runs with
//! `synchronous=FULL`: every commit waits for an fsync. One fsync per message would cap intake at
//! the disk's flush rate, so writes are *group-committed*: a single writer thread owns the only
//! read-write connection, takes the first queued request, drains whatever else is queued (up to
//! [`SqliteOptions::max_batch`]), runs every request in one transaction and commits once. Each
//! caller's future resolves only after that `COMMIT` returned, so "acknowledged" still means
//! "durable" while the fsync cost is shared by the whole batch. The busier the store, the larger
//! the batches: throughput grows with load instead of collapsing.
//!
//! A request that fails (an unknown conversation, a fenced routing write) rolls back only its own
//! changes and the rest of the batch still commits: the batch first runs without savepoints (the
//! common case, where all succeed), and after a failure runs again with each request inside its
//! own `SAVEPOINT`. If SQLite itself abandons the transaction (disk full, I/O error) or the
//! `COMMIT` fails, every caller whose work was lost gets [`StoreError::Unavailable`] and nothing
//! of the batch is stored.
//!
//! Reads use a small pool of read-only connections on the blocking thread pool; WAL mode lets
//! them run alongside the writer and they see every acknowledged write.
//!
//! Checkpoints (copying the WAL back into the database file) run on their own thread and
//! connection, not inside commits: the writer wakes the checkpointer after each commit, and a
//! passive checkpoint does not block the writer. Only a WAL that outgrew its bound (a long write
//! burst) is checkpointed by the writer itself, so that the WAL can start over.
//!
//! # Fencing
//!
//! In a scale-out deployment exactly one router leads, identified by a leadership epoch that
//! grows with every takeover. A deposed leader that has not noticed yet must not overwrite the new
//! leader's state, so every [`RoutingWrite`] carries its epoch: the store keeps the highest epoch
//! seen and refuses older ones with [`StoreError::Fenced`]. A single node always writes epoch 0.
//!
//! # Contacts
//!
//! A message's identities (its sender address, the external customer id, the links given) find
//! the contact. When they point at several contacts, the oldest contact wins and the message's
//! identities that were not linked yet are linked to it; identities already linked to the other
//! contacts stay where they are (contacts are never merged silently; merging is an admin action).

use std::collections::{BTreeMap, BTreeSet};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, mpsc};
use std::thread::JoinHandle;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, SecondsFormat, Utc};
use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension, params};
use tokio::sync::{broadcast, oneshot};
use ulid::Ulid;

use super::IngestRequest;
use super::{
    AttachmentContent, ConversationFilter, ConversationRecord, ConversationStatus, DeliveryOutcome,
    DeliveryRecorded, DeliveryUpdate, Direction, EventCursor, EventsPage, IngestOutcome, Lease,
    NewEvent, NewReply, OutboxEvent, PARKED_STATUS_TTL_NANOS, ParkedStatus, Rating, RatingSummary,
    Recovery, ReplyRoute, RoutingWrite, Store, StoreError, StoredMessage, UnroutedMessage, Wakeup,
    json_text, lease_duration, parked_failure_event, parse_status, parse_ulid, prefix_error,
    status_rank_sql, to_i64, to_u64,
};
use crate::message::{IdentityLink, InboundMessage};

/// The schema migrations, applied in order on open. Append only: never edit a released one.
const MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("../../migrations/sqlite/0001_init.sql")),
    (2, include_str!("../../migrations/sqlite/0002_lease.sql")),
    (
        3,
        include_str!("../../migrations/sqlite/0003_queue_state.sql"),
    ),
    (
        4,
        include_str!("../../migrations/sqlite/0004_parked_delivery_status.sql"),
    ),
    (
        5,
        include_str!("../../migrations/sqlite/0005_outbox_cursor.sql"),
    ),
    (6, include_str!("../../migrations/sqlite/0006_ratings.sql")),
    (
        7,
        include_str!("../../migrations/sqlite/0007_attachments.sql"),
    ),
];

/// The newest schema version this binary knows.
pub const SCHEMA_VERSION: i64 = MIGRATIONS[MIGRATIONS.len() - 1].0;

/// Tuning for [`SqliteStore::open`].
#[derive(Debug, Clone, Copy)]
pub struct SqliteOptions {
    /// The most requests one transaction (one fsync) carries.
    pub max_batch: usize,
    /// Read-only connections for queries (at least 1).
    pub readers: usize,
    /// How long a statement waits for a lock held by another connection (another process, a
    /// backup) before the operation fails with [`StoreError::Unavailable`].
    pub busy_timeout: Duration,
}

impl Default for SqliteOptions {
    fn default() -> SqliteOptions {
        SqliteOptions {
            max_batch: 512,
            readers: 4,
            busy_timeout: Duration::from_secs(5),
        }
    }
}

/// What the writer thread has done so far (for metrics and tests).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriterStats {
    /// Successful commits.
    pub commits: u64,
    /// Requests those commits carried (successful or refused on their own).
    pub requests: u64,
    /// Batches that could not be committed.
    pub failed_batches: u64,
}

impl WriterStats {
    /// Requests per commit.
    pub fn average_batch(&self) -> f64 {
        if self.commits == 0 {
            0.0
        } else {
            self.requests as f64 / self.commits as f64
        }
    }
}

#[derive(Debug, Default)]
struct Counters {
    commits: AtomicU64,
    requests: AtomicU64,
    failed_batches: AtomicU64,
}

/// The SQLite [`Store`]: a cheap-to-clone handle.
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    /// `None` once closed.
    sender: Mutex<Option<mpsc::Sender<Box<dyn Job>>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    readers: Arc<Readers>,
    counters: Arc<Counters>,
    /// Told [`Wakeup::Events`] after every commit, so followers of the committed events read on.
    committed: broadcast::Sender<Wakeup>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.inner.path)
            .field("readers", &self.inner.readers.conns.len())
            .field("stats", &self.stats())
            .finish()
    }
}

impl Inner {
    /// Stops accepting writes and hands back the writer thread, which exits once it has committed
    /// everything already queued (the channel closes when the last sender is gone).
    fn stop_writer(&self) -> Option<JoinHandle<()>> {
        drop(lock(&self.sender).take());
        lock(&self.writer).take()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(handle) = self.stop_writer() {
            // The writer never waits on anything but its queue and the disk, so this is bounded by
            // one batch.
            let _ = handle.join();
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn closed() -> StoreError {
    StoreError::Unavailable("the store is closed".into())
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path`, applies pending migrations and starts the
    /// writer thread.
    pub fn open(path: &Path, options: SqliteOptions) -> Result<SqliteStore, StoreError> {
        let context = |error: rusqlite::Error| {
            let error = StoreError::from(error);
            prefix_error(error, &format!("opening {}", path.display()))
        };
        let mut writer = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(context)?;
        writer.busy_timeout(options.busy_timeout).map_err(context)?;
        let mode: String = writer
            .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
            .map_err(context)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Unavailable(format!(
                "cannot enable WAL journaling on {} (SQLite kept journal_mode={mode}); \
                 the file system may not support shared memory (e.g. a network file system)",
                path.display()
            )));
        }
        writer
            .pragma_update(None, "synchronous", "FULL")
            .map_err(context)?;
        writer
            .pragma_update(None, "foreign_keys", "ON")
            .map_err(context)?;
        // Savepoint journals (one per request) stay in memory instead of a temporary file.
        writer
            .pragma_update(None, "temp_store", "MEMORY")
            .map_err(context)?;
        // The writer touches the hot index pages of every table on every request: keep them cached.
        writer
            .pragma_update(None, "cache_size", -32_768)
            .map_err(context)?;
        writer.set_prepared_statement_cache_capacity(64);
        migrate(&mut writer)
            .map_err(|error| prefix_error(error, &format!("migrating {}", path.display())))?;
        // The checkpoint thread keeps the WAL copied back. Under a steady write load its WAL is
        // never completely copied at the moment a transaction starts, so the WAL could only grow;
        // past this size (32 MiB of 4 KiB pages) the writer checkpoints itself after a commit,
        // which lets the next transaction start the WAL over.
        writer
            .pragma_update(None, "wal_autocheckpoint", 8192)
            .map_err(context)?;
        let checkpointer = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(context)?;
        checkpointer
            .busy_timeout(options.busy_timeout)
            .map_err(context)?;
        let (checkpoint_due, checkpoint_wakeups) = mpsc::sync_channel::<()>(1);
        std::thread::Builder::new()
            .name("sqlite-checkpoint".into())
            .spawn(move || run_checkpointer(&checkpointer, &checkpoint_wakeups))
            .map_err(|error| {
                StoreError::Unavailable(format!("cannot start the checkpoint thread: {error}"))
            })?;

        let readers = (0..options.readers.max(1))
            .map(|_| open_reader(path, &options).map_err(context))
            .collect::<Result<Vec<_>, _>>()?;

        let counters = Arc::new(Counters::default());
        let (sender, receiver) = mpsc::channel::<Box<dyn Job>>();
        let max_batch = options.max_batch.max(1);
        let thread_counters = Arc::clone(&counters);
        // Followers only need to know that something was committed since they last read: a
        // follower that lags behind the notifications reads on all the same.
        let committed = broadcast::channel(16).0;
        let writer_committed = committed.clone();
        let handle = std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || {
                run_writer(
                    &writer,
                    &receiver,
                    max_batch,
                    &thread_counters,
                    &checkpoint_due,
                    &writer_committed,
                );
            })
            .map_err(|error| {
                StoreError::Unavailable(format!("cannot start the store writer thread: {error}"))
            })?;

        Ok(SqliteStore {
            inner: Arc::new(Inner {
                path: path.to_owned(),
                sender: Mutex::new(Some(sender)),
                writer: Mutex::new(Some(handle)),
                readers: Arc::new(Readers {
                    conns: readers.into_iter().map(Mutex::new).collect(),
                    next: AtomicUsize::new(0),
                }),
                counters,
                committed,
            }),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Commits and batch sizes so far.
    pub fn stats(&self) -> WriterStats {
        let counters = &self.inner.counters;
        WriterStats {
            commits: counters.commits.load(Ordering::Relaxed),
            requests: counters.requests.load(Ordering::Relaxed),
            failed_batches: counters.failed_batches.load(Ordering::Relaxed),
        }
    }

    /// How many transactions the writer has committed.
    pub fn commit_count(&self) -> u64 {
        self.stats().commits
    }

    /// Flushes the store: stops accepting writes, lets the writer commit everything already
    /// queued and waits for its thread to exit. Reads keep working; writes (from any clone of this
    /// handle) fail with [`StoreError::Unavailable`] from now on.
    pub async fn close(&self) -> Result<(), StoreError> {
        let Some(handle) = self.inner.stop_writer() else {
            return Ok(());
        };
        tokio::task::spawn_blocking(move || handle.join())
            .await
            .map_err(|error| StoreError::Unavailable(format!("closing the store: {error}")))?
            .map_err(|_| StoreError::Unavailable("the store writer thread panicked".into()))
    }

    /// Runs `work` in the writer's current transaction and resolves after the commit. `work` may
    /// run twice (see [`run_batch`]): it acts on the transaction only.
    async fn write<T, F>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: Fn(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let job: Box<dyn Job> = Box::new(Pending {
            work,
            value: None,
            reply,
        });
        {
            let sender = lock(&self.inner.sender);
            let sender = sender.as_ref().ok_or_else(closed)?;
            sender.send(job).map_err(|_| closed())?;
        }
        answer.await.map_err(|_| {
            StoreError::Unavailable("the store writer stopped before answering".into())
        })?
    }

    /// Runs `work` on a read-only connection on the blocking thread pool.
    async fn read<T, F>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let readers = Arc::clone(&self.inner.readers);
        tokio::task::spawn_blocking(move || readers.with(work))
            .await
            .map_err(|error| StoreError::Unavailable(format!("read task failed: {error}")))?
    }
}

fn open_reader(path: &Path, options: &SqliteOptions) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(options.busy_timeout)?;
    conn.set_prepared_statement_cache_capacity(32);
    Ok(conn)
}

/// Applies the migrations this database lacks, in one transaction, and refuses a database written
/// by a newer binary (its schema may mean things this one does not know).
fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    tx.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
             version     INTEGER PRIMARY KEY,
             applied_at  TEXT NOT NULL
         )",
    )?;
    let current: i64 = tx.query_row(
        "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
        [],
        |row| row.get(0),
    )?;
    if current > SCHEMA_VERSION {
        return Err(StoreError::Unavailable(format!(
            "the database schema is version {current} but this switchboard only knows versions up \
             to {SCHEMA_VERSION}: it was written by a newer release; upgrade switchboard or restore \
             a backup"
        )));
    }
    for (version, sql) in MIGRATIONS {
        if *version <= current {
            continue;
        }
        tx.execute_batch(sql)
            .map_err(|error| prefix_error(error.into(), &format!("schema migration {version}")))?;
        tx.execute(
            "INSERT INTO schema_migrations (version, applied_at) VALUES (?1, ?2)",
            params![version, ts(&Utc::now())],
        )?;
    }
    tx.commit()?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The writer thread

/// One caller's request as the writer sees it.
trait Job: Send {
    /// Does the work against the open transaction. It may run twice (the first run rolled back),
    /// so it must not act outside the transaction.
    fn run(&mut self, conn: &Connection) -> Result<(), StoreError>;
    /// Answers the caller: `Ok` only once the work is committed.
    fn finish(self: Box<Self>, outcome: Result<(), StoreError>);
}

struct Pending<T, F> {
    work: F,
    value: Option<T>,
    reply: oneshot::Sender<Result<T, StoreError>>,
}

impl<T, F> Job for Pending<T, F>
where
    T: Send,
    F: Fn(&Connection) -> Result<T, StoreError> + Send,
{
    fn run(&mut self, conn: &Connection) -> Result<(), StoreError> {
        self.value = Some((self.work)(conn)?);
        Ok(())
    }

    fn finish(self: Box<Self>, outcome: Result<(), StoreError>) {
        let this = *self;
        let result = match (outcome, this.value) {
            (Ok(()), Some(value)) => Ok(value),
            (Ok(()), None) => Err(StoreError::Unavailable(
                "a store request produced no result".into(),
            )),
            (Err(error), _) => Err(error),
        };
        // A caller that stopped waiting does not undo the write: it is committed either way.
        let _ = this.reply.send(result);
    }
}

fn run_writer(
    conn: &Connection,
    receiver: &mpsc::Receiver<Box<dyn Job>>,
    max_batch: usize,
    counters: &Counters,
    checkpoint_due: &mpsc::SyncSender<()>,
    committed: &broadcast::Sender<Wakeup>,
) {
    // Blocks for the first request; returns when every sender is gone and the queue is empty, so
    // everything queued before close/drop is committed.
    while let Ok(first) = receiver.recv() {
        let mut batch = Vec::with_capacity(max_batch.min(64));
        batch.push(first);
        while batch.len() < max_batch {
            match receiver.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let commits = counters.commits.load(Ordering::Relaxed);
        run_batch(conn, batch, counters);
        if counters.commits.load(Ordering::Relaxed) != commits {
            // No follower listening is not an error.
            let _ = committed.send(Wakeup::Events);
        }
        // Full means a wake-up is already pending: one checkpoint covers both.
        let _ = checkpoint_due.try_send(());
    }
}

/// The shortest time between two checkpoints: under load, one pass copies many commits' pages.
const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(100);

/// Copies committed WAL frames into the database file after commits, at most every
/// [`CHECKPOINT_INTERVAL`]; ends when the writer does (its sender is dropped).
fn run_checkpointer(conn: &Connection, due: &mpsc::Receiver<()>) {
    while due.recv().is_ok() {
        // PASSIVE copies what no reader still needs and never waits for the writer or readers.
        if let Err(error) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            tracing::warn!(%error, "WAL checkpoint failed; retrying after the next commit");
        }
        std::thread::sleep(CHECKPOINT_INTERVAL);
    }
}

fn exec(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([]).map(|_| ())
}

/// Jobs run in the current transaction so far, each with its own outcome.
type Ran = Vec<(Box<dyn Job>, Result<(), StoreError>)>;

/// Runs one batch in one transaction and answers every job.
///
/// The jobs first run one after another with nothing between them: the common case, where every
/// job succeeds, pays for no savepoint (each copies every page it touches into a savepoint journal
/// first). If a job fails, that transaction is rolled back and the batch runs again with a savepoint
/// per job ([`run_batch_guarded`]), so the failure undoes only its own work and the rest commits.
fn run_batch(conn: &Connection, mut batch: Vec<Box<dyn Job>>, counters: &Counters) {
    if let Err(error) = exec(conn, "BEGIN IMMEDIATE") {
        // Typically the lock is held elsewhere and the busy timeout ran out: the batch would only
        // wait out the same timeout again, so it fails now.
        counters.failed_batches.fetch_add(1, Ordering::Relaxed);
        let message = format!("cannot start a transaction: {error}");
        for job in batch {
            job.finish(Err(StoreError::Unavailable(message.clone())));
        }
        return;
    }
    let mut failure = None;
    for job in &mut batch {
        match catch_unwind(AssertUnwindSafe(|| job.run(conn))) {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                failure = Some(error);
                break;
            }
            Err(_) => {
                failure = Some(StoreError::Unavailable(
                    "internal error while writing (the request was rolled back)".into(),
                ));
                break;
            }
        }
    }
    let Some(error) = failure else {
        commit(
            conn,
            batch.into_iter().map(|job| (job, Ok(()))).collect(),
            false,
            counters,
        );
        return;
    };
    if !conn.is_autocommit() {
        let _ = exec(conn, "ROLLBACK");
    }
    if let [_] = batch.as_slice() {
        // The rollback undid only this job's work.
        if let Some(job) = batch.pop() {
            job.finish(Err(error));
        }
        return;
    }
    run_batch_guarded(conn, batch, counters);
}

/// [`run_batch`] with one savepoint per job: a job that fails rolls back only its own changes.
fn run_batch_guarded(conn: &Connection, batch: Vec<Box<dyn Job>>, counters: &Counters) {
    let size = batch.len();
    let mut done: Ran = Vec::with_capacity(size);
    let mut in_transaction = false;
    let mut failed = false;
    let mut jobs = batch.into_iter();
    while let Some(mut job) = jobs.next() {
        if !in_transaction {
            if let Err(error) = exec(conn, "BEGIN IMMEDIATE") {
                // Typically the lock is held elsewhere and the busy timeout ran out: the rest of
                // the batch would only wait out the same timeout one by one, so it fails now.
                failed = true;
                let message = format!("cannot start a transaction: {error}");
                job.finish(Err(StoreError::Unavailable(message.clone())));
                for job in jobs.by_ref() {
                    job.finish(Err(StoreError::Unavailable(message.clone())));
                }
                break;
            }
            in_transaction = true;
        }
        if let Err(error) = exec(conn, "SAVEPOINT request") {
            job.finish(Err(unavailable("cannot start a savepoint", &error)));
            abandon(conn, &mut done, "the transaction failed");
            failed = true;
            in_transaction = false;
            continue;
        }
        let outcome = match catch_unwind(AssertUnwindSafe(|| job.run(conn))) {
            Ok(outcome) => outcome,
            Err(_) => Err(StoreError::Unavailable(
                "internal error while writing (the request was rolled back)".into(),
            )),
        };
        match outcome {
            Ok(()) => match exec(conn, "RELEASE request") {
                Ok(()) => done.push((job, Ok(()))),
                Err(error) => {
                    job.finish(Err(unavailable("cannot release a savepoint", &error)));
                    abandon(conn, &mut done, "the transaction failed");
                    failed = true;
                    in_transaction = false;
                }
            },
            Err(error) if conn.is_autocommit() => {
                // SQLite rolled the whole transaction back by itself (disk full, I/O error...):
                // every earlier job of the batch is lost too.
                let reason = error.to_string();
                job.finish(Err(error));
                abandon(conn, &mut done, &reason);
                failed = true;
                in_transaction = false;
            }
            Err(error) => {
                let rolled_back =
                    exec(conn, "ROLLBACK TO request").and_then(|()| exec(conn, "RELEASE request"));
                match rolled_back {
                    Ok(()) => done.push((job, Err(error))),
                    Err(rollback_error) => {
                        job.finish(Err(error));
                        let reason = format!("cannot roll back a request: {rollback_error}");
                        abandon(conn, &mut done, &reason);
                        failed = true;
                        in_transaction = false;
                    }
                }
            }
        }
    }
    if !in_transaction {
        if failed {
            counters.failed_batches.fetch_add(1, Ordering::Relaxed);
        }
        return;
    }
    commit(conn, done, failed, counters);
}

/// Commits the open transaction and answers its jobs: each with its own outcome once committed,
/// every one unavailable if the commit failed. `failed`: part of the batch failed before this.
fn commit(conn: &Connection, done: Ran, failed: bool, counters: &Counters) {
    match exec(conn, "COMMIT") {
        Ok(()) => {
            counters.commits.fetch_add(1, Ordering::Relaxed);
            counters
                .requests
                .fetch_add(done.len() as u64, Ordering::Relaxed);
            if failed {
                counters.failed_batches.fetch_add(1, Ordering::Relaxed);
            }
            for (job, outcome) in done {
                job.finish(outcome);
            }
        }
        Err(error) => {
            counters.failed_batches.fetch_add(1, Ordering::Relaxed);
            if !conn.is_autocommit() {
                let _ = exec(conn, "ROLLBACK");
            }
            let message = format!("commit failed: {error}");
            for (job, _) in done {
                job.finish(Err(StoreError::Unavailable(message.clone())));
            }
        }
    }
}

/// Rolls back the current transaction (if SQLite has not already) and fails every job whose work
/// it held. Jobs that had failed on their own keep their own error.
fn abandon(conn: &Connection, done: &mut Ran, reason: &str) {
    if !conn.is_autocommit() {
        let _ = exec(conn, "ROLLBACK");
    }
    for (job, outcome) in done.drain(..) {
        match outcome {
            Ok(()) => job.finish(Err(StoreError::Unavailable(format!(
                "the batch was rolled back: {reason}"
            )))),
            Err(error) => job.finish(Err(error)),
        }
    }
}

fn unavailable(context: &str, error: &rusqlite::Error) -> StoreError {
    StoreError::Unavailable(format!("{context}: {error}"))
}

// ---------------------------------------------------------------------------------------------
// Readers

struct Readers {
    conns: Vec<Mutex<Connection>>,
    next: AtomicUsize,
}

impl Readers {
    /// Runs `work` on a free reader, or waits for one.
    fn with<T>(
        &self,
        work: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let count = self.conns.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) % count.max(1);
        for offset in 0..count {
            if let Some(Ok(conn)) = self
                .conns
                .get((start + offset) % count)
                .map(Mutex::try_lock)
            {
                return read_on(&conn, work);
            }
        }
        let conn = self
            .conns
            .get(start)
            .ok_or_else(|| StoreError::Unavailable("no read connection".into()))?;
        read_on(&lock(conn), work)
    }
}

fn read_on<T>(
    conn: &Connection,
    work: impl FnOnce(&Connection) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    if !conn.is_autocommit() {
        // A read that failed half-way (or panicked) left its snapshot open; drop it so this read
        // sees the latest commits.
        let _ = conn.execute_batch("ROLLBACK");
    }
    work(conn)
}

// ---------------------------------------------------------------------------------------------
// Errors and encodings

impl From<rusqlite::Error> for StoreError {
    fn from(error: rusqlite::Error) -> StoreError {
        match &error {
            rusqlite::Error::SqliteFailure(failure, _) => match failure.code {
                // The disk is full, the file or directory is read-only, another connection holds
                // the lock, the disk failed, or the file cannot be opened: retry later.
                ErrorCode::DiskFull
                | ErrorCode::ReadOnly
                | ErrorCode::DatabaseBusy
                | ErrorCode::DatabaseLocked
                | ErrorCode::SystemIoFailure
                | ErrorCode::CannotOpen => StoreError::Unavailable(error.to_string()),
                ErrorCode::ConstraintViolation => {
                    StoreError::NotFound(format!("conflicts with stored data: {error}"))
                }
                ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase => {
                    StoreError::Corrupt(error.to_string())
                }
                _ => StoreError::Unavailable(error.to_string()),
            },
            rusqlite::Error::FromSqlConversionFailure(..)
            | rusqlite::Error::InvalidColumnType(..)
            | rusqlite::Error::IntegralValueOutOfRange(..) => {
                StoreError::Corrupt(error.to_string())
            }
            _ => StoreError::Unavailable(error.to_string()),
        }
    }
}

/// Timestamps are stored as RFC 3339 UTC with nine fraction digits: fixed width, so text order is
/// time order.
fn ts(time: &DateTime<Utc>) -> String {
    time.to_rfc3339_opts(SecondsFormat::Nanos, true)
}

fn parse_ts(text: &str) -> Result<DateTime<Utc>, StoreError> {
    DateTime::parse_from_rfc3339(text)
        .map(|time| time.with_timezone(&Utc))
        .map_err(|error| StoreError::Corrupt(format!("bad timestamp {text:?}: {error}")))
}

fn parse_json(text: &str) -> Result<serde_json::Value, StoreError> {
    serde_json::from_str(text)
        .map_err(|error| StoreError::Corrupt(format!("bad JSON document: {error}")))
}

// ---------------------------------------------------------------------------------------------
// Row decoding

const MESSAGE_COLUMNS: &str = "id, conversation_id, direction, channel, provider, \
     provider_message_id, from_address, to_address, body, created_at, delivery_status, agent_id";

/// A `messages` row as stored, decoded outside the rusqlite callback so that bad data becomes
/// [`StoreError::Corrupt`].
struct MessageRow {
    id: String,
    conversation_id: String,
    direction: String,
    channel: String,
    provider: String,
    provider_message_id: Option<String>,
    from_address: String,
    to_address: String,
    body: String,
    created_at: String,
    delivery_status: Option<String>,
    agent_id: Option<String>,
}

impl MessageRow {
    fn read(row: &rusqlite::Row<'_>) -> rusqlite::Result<MessageRow> {
        Ok(MessageRow {
            id: row.get(0)?,
            conversation_id: row.get(1)?,
            direction: row.get(2)?,
            channel: row.get(3)?,
            provider: row.get(4)?,
            provider_message_id: row.get(5)?,
            from_address: row.get(6)?,
            to_address: row.get(7)?,
            body: row.get(8)?,
            created_at: row.get(9)?,
            delivery_status: row.get(10)?,
            agent_id: row.get(11)?,
        })
    }

    fn decode(self) -> Result<StoredMessage, StoreError> {
        let direction = match self.direction.as_str() {
            "inbound" => Direction::Inbound,
            "outbound" => Direction::Outbound,
            other => return Err(StoreError::Corrupt(format!("bad direction {other:?}"))),
        };
        Ok(StoredMessage {
            id: parse_ulid(&self.id)?,
            conversation_id: parse_ulid(&self.conversation_id)?,
            direction,
            channel: self.channel,
            provider: self.provider,
            provider_message_id: self.provider_message_id,
            from_address: self.from_address,
            to_address: self.to_address,
            body: parse_json(&self.body)?,
            created_at: parse_ts(&self.created_at)?,
            delivery_status: self.delivery_status,
            agent_id: self.agent_id,
        })
    }
}

/// After [`MESSAGE_COLUMNS`] for an unrouted message: its conversation's contact, and whether the
/// conversation was never routed (no routing document yet).
const UNROUTED_COLUMNS: &str = "(SELECT contact_id FROM conversations c WHERE c.id = messages.conversation_id), \
     (SELECT routing_state IS NULL FROM conversations c WHERE c.id = messages.conversation_id)";

const CONVERSATION_COLUMNS: &str = "id, contact_id, status, channel, reply_channel, \
     reply_provider, reply_customer_address, reply_our_address, reply_thread_key, subject, \
     created_at, updated_at, routing_state, event_seq";

struct ConversationRow {
    id: String,
    contact_id: String,
    status: String,
    channel: String,
    reply_route: ReplyRoute,
    subject: Option<String>,
    created_at: String,
    updated_at: String,
    routing_state: Option<String>,
    event_seq: i64,
}

impl ConversationRow {
    fn read(row: &rusqlite::Row<'_>) -> rusqlite::Result<ConversationRow> {
        Ok(ConversationRow {
            id: row.get(0)?,
            contact_id: row.get(1)?,
            status: row.get(2)?,
            channel: row.get(3)?,
            reply_route: ReplyRoute {
                channel: row.get(4)?,
                provider: row.get(5)?,
                customer_address: row.get(6)?,
                our_address: row.get(7)?,
                thread_key: row.get(8)?,
            },
            subject: row.get(9)?,
            created_at: row.get(10)?,
            updated_at: row.get(11)?,
            routing_state: row.get(12)?,
            event_seq: row.get(13)?,
        })
    }

    fn decode(self) -> Result<ConversationRecord, StoreError> {
        Ok(ConversationRecord {
            id: parse_ulid(&self.id)?,
            contact_id: parse_ulid(&self.contact_id)?,
            status: parse_status(&self.status)?,
            channel: self.channel,
            reply_route: self.reply_route,
            subject: self.subject,
            created_at: parse_ts(&self.created_at)?,
            updated_at: parse_ts(&self.updated_at)?,
            routing_state: self.routing_state.as_deref().map(parse_json).transpose()?,
            event_seq: to_u64(self.event_seq, "event_seq")?,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Write transactions (run on the writer thread, in the batch's transaction)

fn ingest_tx(conn: &Connection, request: &IngestRequest) -> Result<IngestOutcome, StoreError> {
    // 1. Deduplicate by (channel, provider_message_id).
    let existing: Option<(String, String)> = conn
        .prepare_cached(
            "SELECT id, conversation_id FROM messages WHERE channel = ?1 AND provider_message_id = ?2",
        )?
        .query_row(
            params![request.channel, request.provider_message_id],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
        .optional()?;
    if let Some((message_id, conversation_id)) = existing {
        return Ok(IngestOutcome::Duplicate {
            message_id: parse_ulid(&message_id)?,
            conversation_id: parse_ulid(&conversation_id)?,
        });
    }

    // 2. The contact: whoever owns one of the message's identities (the oldest if several).
    let (contact_id, new_contact) = find_or_create_contact(conn, request)?;

    // 3. The conversation: the thread's if not closed, else the contact's latest live one.
    let mut thread_match: Option<String> = None;
    {
        let mut stmt = conn.prepare_cached(
            "SELECT c.id, c.status FROM conversation_threads t
             JOIN conversations c ON c.id = t.conversation_id
             WHERE t.channel = ?1 AND t.thread_key = ?2",
        )?;
        let found: Option<(String, String)> = stmt
            .query_row(params![request.channel, request.thread_key], |row| {
                Ok((row.get(0)?, row.get(1)?))
            })
            .optional()?;
        if let Some((id, status)) = found
            && parse_status(&status)? != ConversationStatus::Closed
        {
            thread_match = Some(id);
        }
    }
    let thread_matched = thread_match.is_some();
    let conversation = match thread_match {
        Some(id) => Some(id),
        // A contact created just now has no conversation yet.
        None if new_contact => None,
        None => conn
            .prepare_cached(
                "SELECT id FROM conversations
                 WHERE contact_id = ?1 AND status <> 'closed'
                 ORDER BY updated_at DESC, id DESC LIMIT 1",
            )?
            .query_row(params![contact_id], |row| row.get::<_, String>(0))
            .optional()?,
    };
    let (conversation_id, new_conversation) = match conversation {
        Some(id) => {
            // The customer's latest channel is where replies go.
            conn.prepare_cached(
                "UPDATE conversations SET
                     reply_channel = ?2, reply_provider = ?3, reply_customer_address = ?4,
                     reply_our_address = ?5, reply_thread_key = ?6,
                     subject = COALESCE(subject, ?7),
                     updated_at = MAX(updated_at, ?8)
                 WHERE id = ?1",
            )?
            .execute(params![
                id,
                request.channel,
                request.provider,
                request.from_address,
                request.to_address,
                request.thread_key,
                request.subject,
                ts(&request.intake_time),
            ])?;
            (id, false)
        }
        None => {
            let id = Ulid::new().to_string();
            conn.prepare_cached(
                "INSERT INTO conversations (
                     id, contact_id, status, channel, reply_channel, reply_provider,
                     reply_customer_address, reply_our_address, reply_thread_key, subject,
                     created_at, updated_at)
                 VALUES (?1, ?2, 'open', ?3, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?9)",
            )?
            .execute(params![
                id,
                contact_id,
                request.channel,
                request.provider,
                request.from_address,
                request.to_address,
                request.thread_key,
                request.subject,
                ts(&request.intake_time),
            ])?;
            (id, true)
        }
    };
    if !thread_matched {
        // The thread now leads here (replacing a mapping to a closed conversation, if any).
        conn.prepare_cached(
            "INSERT INTO conversation_threads (channel, thread_key, conversation_id)
             VALUES (?1, ?2, ?3)
             ON CONFLICT (channel, thread_key)
             DO UPDATE SET conversation_id = excluded.conversation_id",
        )?
        .execute(params![
            request.channel,
            request.thread_key,
            conversation_id
        ])?;
    }

    // 4. The message itself, not yet routed.
    conn.prepare_cached(
        "INSERT INTO messages (
             id, conversation_id, direction, channel, provider, provider_message_id, thread_key,
             from_address, to_address, body, created_at, routed)
         VALUES (?1, ?2, 'inbound', ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, 0)",
    )?
    .execute(params![
        request.message_id.to_string(),
        conversation_id,
        request.channel,
        request.provider,
        request.provider_message_id,
        request.thread_key,
        request.from_address,
        request.to_address,
        request.body,
        ts(&request.message_time),
    ])?;

    // 5. The attachments' contents, once per content.
    for attachment in &request.attachments {
        conn.prepare_cached(
            "INSERT INTO attachments (sha256, size, content, created_at) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (sha256) DO NOTHING",
        )?
        .execute(params![
            attachment.sha256(),
            to_i64(attachment.content().len() as u64, "attachment size")?,
            attachment.content(),
            ts(&request.intake_time),
        ])?;
    }

    Ok(IngestOutcome::Stored {
        message_id: request.message_id,
        conversation_id: parse_ulid(&conversation_id)?,
        contact_id: parse_ulid(&contact_id)?,
        new_conversation,
    })
}

/// The contact's id, and whether it was created now.
fn find_or_create_contact(
    conn: &Connection,
    request: &IngestRequest,
) -> Result<(String, bool), StoreError> {
    let mut owners: BTreeSet<String> = BTreeSet::new();
    let mut unlinked: Vec<&IdentityLink> = Vec::new();
    {
        let mut stmt = conn.prepare_cached(
            "SELECT contact_id FROM identity_links WHERE kind = ?1 AND value = ?2",
        )?;
        for identity in &request.identities {
            let owner: Option<String> = stmt
                .query_row(params![identity.kind, identity.value], |row| row.get(0))
                .optional()?;
            match owner {
                Some(owner) => {
                    owners.insert(owner);
                }
                None => unlinked.push(identity),
            }
        }
    }
    let existing = if owners.len() > 1 {
        Some(oldest_contact(conn, owners)?)
    } else {
        owners.pop_first()
    };
    let new_contact = existing.is_none();
    let contact_id = match existing {
        None => {
            let id = Ulid::new().to_string();
            conn.prepare_cached(
                "INSERT INTO contacts (id, name, tier, language, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?5)",
            )?
            .execute(params![
                id,
                request.name,
                request.tier,
                request.language,
                ts(&request.intake_time)
            ])?;
            id
        }
        Some(id) => {
            if request.name.is_some() || request.tier.is_some() || request.language.is_some() {
                // The latest hints win: a customer upgraded to `vip` is routed as one from now on.
                conn.prepare_cached(
                    "UPDATE contacts SET
                         name = COALESCE(?2, name), tier = COALESCE(?3, tier),
                         language = COALESCE(?4, language), updated_at = ?5
                     WHERE id = ?1",
                )?
                .execute(params![
                    id,
                    request.name,
                    request.tier,
                    request.language,
                    ts(&request.intake_time)
                ])?;
            }
            id
        }
    };
    if !unlinked.is_empty() {
        let mut stmt = conn.prepare_cached(
            "INSERT INTO identity_links (kind, value, contact_id, created_at)
             VALUES (?1, ?2, ?3, ?4) ON CONFLICT (kind, value) DO NOTHING",
        )?;
        for identity in unlinked {
            stmt.execute(params![
                identity.kind,
                identity.value,
                contact_id,
                ts(&request.intake_time)
            ])?;
        }
    }
    Ok((contact_id, new_contact))
}

/// The oldest of several contacts (by creation time, then id).
fn oldest_contact(conn: &Connection, candidates: BTreeSet<String>) -> Result<String, StoreError> {
    let mut stmt = conn.prepare_cached("SELECT created_at FROM contacts WHERE id = ?1")?;
    let mut best: Option<(String, String)> = None;
    for id in candidates {
        let created: String = stmt.query_row(params![id], |row| row.get(0))?;
        let candidate = (created, id);
        if best.as_ref().is_none_or(|best| candidate < *best) {
            best = Some(candidate);
        }
    }
    best.map(|(_, id)| id)
        .ok_or_else(|| StoreError::NotFound("no contact".into()))
}

/// How many of `events` each conversation has.
fn events_per_conversation(events: &[NewEvent]) -> BTreeMap<Ulid, i64> {
    let mut counts: BTreeMap<Ulid, i64> = BTreeMap::new();
    for id in events.iter().filter_map(|event| event.conversation_id) {
        *counts.entry(id).or_default() += 1;
    }
    counts
}

/// Appends events to the outbox, numbering each conversation's events 1, 2, 3... in order.
fn append_events(conn: &Connection, events: &[NewEvent]) -> Result<(), StoreError> {
    append_numbered_events(conn, events, BTreeMap::new())
}

/// [`append_events`] where `next_seq` already holds the first sequence number of some
/// conversations (whose counter the caller moved in its own update of the row).
/// Each conversation's counter moves once per write, not once per event: the row holds the routing
/// state document, and rewriting it per event was the largest cost of a routing commit.
fn append_numbered_events(
    conn: &Connection,
    events: &[NewEvent],
    mut next_seq: BTreeMap<Ulid, i64>,
) -> Result<(), StoreError> {
    for (conversation_id, count) in events_per_conversation(events) {
        if next_seq.contains_key(&conversation_id) {
            continue;
        }
        let last: i64 = conn
            .prepare_cached(
                "UPDATE conversations SET event_seq = event_seq + ?2 WHERE id = ?1
                 RETURNING event_seq",
            )?
            .query_row(params![conversation_id.to_string(), count], |row| {
                row.get(0)
            })
            .optional()?
            .ok_or_else(|| {
                StoreError::NotFound(format!(
                    "an event names unknown conversation {conversation_id}"
                ))
            })?;
        next_seq.insert(conversation_id, last - count + 1);
    }
    let mut insert = conn.prepare_cached(
        "INSERT INTO outbox (event_id, kind, conversation_id, seq, data, time)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?;
    for event in events {
        let seq = match event.conversation_id.and_then(|id| next_seq.get_mut(&id)) {
            Some(next) => {
                *next += 1;
                *next - 1
            }
            None => 0,
        };
        insert.execute(params![
            event.event_id.to_string(),
            event.kind,
            event.conversation_id.map(|id| id.to_string()),
            seq,
            json_text(&event.data)?,
            ts(&event.time),
        ])?;
    }
    Ok(())
}

/// Refuses a write from a stale leader; records a newer epoch.
fn check_epoch(conn: &Connection, epoch: u64) -> Result<(), StoreError> {
    let current: i64 = conn
        .prepare_cached("SELECT epoch FROM leadership WHERE id = 1")?
        .query_row([], |row| row.get(0))
        .optional()?
        .unwrap_or(0);
    let wanted = to_i64(epoch, "epoch")?;
    if wanted < current {
        return Err(StoreError::Fenced { epoch });
    }
    if wanted > current {
        conn.prepare_cached(
            "INSERT INTO leadership (id, epoch, updated_at) VALUES (1, ?1, ?2)
             ON CONFLICT (id) DO UPDATE SET epoch = excluded.epoch, updated_at = excluded.updated_at",
        )?
        .execute(params![wanted, ts(&Utc::now())])?;
    }
    Ok(())
}

fn apply_routing_tx(conn: &Connection, write: &RoutingWrite) -> Result<(), StoreError> {
    check_epoch(conn, write.epoch)?;
    let now = ts(&Utc::now());
    let epoch = to_i64(write.epoch, "epoch")?;
    let events = events_per_conversation(&write.events);
    // The conversations' event counters move with their state, in the same update of the row.
    let mut next_seq = BTreeMap::new();
    for (ulid, status, state) in &write.conversations {
        let id = ulid.to_string();
        let count = events.get(ulid).copied().unwrap_or(0);
        let last: i64 = conn
            .prepare_cached(
                "UPDATE conversations SET
                     status = ?2,
                     routing_state = ?3,
                     epoch = ?4,
                     updated_at = MAX(updated_at, ?5),
                     resolved_at = CASE WHEN ?2 = 'resolved' AND status <> 'resolved' THEN ?5
                                        ELSE resolved_at END,
                     closed_at = CASE WHEN ?2 = 'closed' AND status <> 'closed' THEN ?5
                                      ELSE closed_at END,
                     event_seq = event_seq + ?6
                 WHERE id = ?1
                 RETURNING event_seq",
            )?
            .query_row(
                params![id, status.as_str(), json_text(state)?, epoch, now, count],
                |row| row.get(0),
            )
            .optional()?
            .ok_or_else(|| StoreError::NotFound(format!("conversation {id}")))?;
        if count > 0 {
            next_seq.insert(*ulid, last - count + 1);
        }
        if *status == ConversationStatus::Closed {
            conn.prepare_cached("DELETE FROM conversation_threads WHERE conversation_id = ?1")?
                .execute(params![id])?;
        }
    }
    // Keyed state documents: agents', then queues'.
    for (upsert, documents) in [
        (
            "INSERT INTO agent_state (agent_id, state, updated_at) VALUES (?1, ?2, ?3)
             ON CONFLICT (agent_id) DO UPDATE SET state = excluded.state,
                 updated_at = excluded.updated_at",
            &write.agents,
        ),
        (
            "INSERT INTO queue_state (queue, state, updated_at) VALUES (?1, ?2, ?3)
             ON CONFLICT (queue) DO UPDATE SET state = excluded.state,
                 updated_at = excluded.updated_at",
            &write.queues,
        ),
    ] {
        for (key, state) in documents {
            conn.prepare_cached(upsert)?
                .execute(params![key, json_text(state)?, now])?;
        }
    }
    for message_id in &write.routed_messages {
        let changed = conn
            .prepare_cached(
                "UPDATE messages SET routed = 1 WHERE id = ?1 AND direction = 'inbound'",
            )?
            .execute(params![message_id.to_string()])?;
        if changed == 0 {
            return Err(StoreError::NotFound(format!(
                "inbound message {message_id}"
            )));
        }
    }
    append_numbered_events(conn, &write.events, next_seq)
}

fn rate_tx(conn: &Connection, rating: &Rating, events: &[NewEvent]) -> Result<bool, StoreError> {
    let inserted = conn
        .prepare_cached(
            "INSERT INTO ratings (conversation_id, score, comment, agent_id, rated_at)
             VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (conversation_id) DO NOTHING",
        )?
        .execute(params![
            rating.conversation_id.to_string(),
            rating.score,
            rating.comment,
            rating.agent_id,
            ts(&rating.rated_at),
        ])?;
    if inserted == 0 {
        return Ok(false);
    }
    append_events(conn, events)?;
    Ok(true)
}

fn ratings_read(conn: &Connection, recent: usize) -> Result<RatingSummary, StoreError> {
    let (count, average): (i64, Option<f64>) = conn
        .prepare_cached("SELECT COUNT(*), AVG(score) FROM ratings")?
        .query_row([], |row| Ok((row.get(0)?, row.get(1)?)))?;
    let mut statement = conn.prepare_cached(
        "SELECT conversation_id, score, comment, agent_id, rated_at FROM ratings
         ORDER BY rated_at DESC LIMIT ?1",
    )?;
    let rows = statement.query_map(params![to_i64(recent as u64, "limit")?], |row| {
        Ok((
            row.get::<_, String>(0)?,
            row.get::<_, u8>(1)?,
            row.get::<_, String>(2)?,
            row.get::<_, Option<String>>(3)?,
            row.get::<_, String>(4)?,
        ))
    })?;
    let mut list = Vec::new();
    for row in rows {
        let (conversation_id, score, comment, agent_id, rated_at) = row?;
        list.push(Rating {
            conversation_id: parse_ulid(&conversation_id)?,
            score,
            comment,
            agent_id,
            rated_at: parse_ts(&rated_at)?,
        });
    }
    Ok(RatingSummary {
        recent: list,
        count: to_u64(count, "rating count")?,
        average,
    })
}

fn store_reply_tx(
    conn: &Connection,
    reply: &NewReply,
    events: &[NewEvent],
) -> Result<(), StoreError> {
    let conversation_id = reply.conversation_id.to_string();
    let created_at = ts(&reply.created_at);
    let touched = conn
        .prepare_cached("UPDATE conversations SET updated_at = MAX(updated_at, ?2) WHERE id = ?1")?
        .execute(params![conversation_id, created_at])?;
    if touched == 0 {
        return Err(StoreError::NotFound(format!(
            "conversation {conversation_id}"
        )));
    }
    let mut body = serde_json::json!({
        "text": reply.text,
        "agent_id": reply.agent_id,
        "channel": reply.route.channel,
        "provider": reply.route.provider,
        "to": reply.route.customer_address,
        "from": reply.route.our_address,
        "thread_key": reply.route.thread_key,
    });
    if let (Some(html), Some(object)) = (&reply.html, body.as_object_mut()) {
        object.insert("html".into(), serde_json::Value::String(html.clone()));
    }
    conn.prepare_cached(
        "INSERT INTO messages (
             id, conversation_id, direction, channel, provider, provider_message_id, thread_key,
             from_address, to_address, body, created_at, routed, delivery_status, agent_id)
         VALUES (?1, ?2, 'outbound', ?3, ?4, NULL, ?5, ?6, ?7, ?8, ?9, 1, 'pending', ?10)",
    )?
    .execute(params![
        reply.id.to_string(),
        conversation_id,
        reply.route.channel,
        reply.route.provider,
        reply.route.thread_key,
        reply.route.our_address,
        reply.route.customer_address,
        json_text(&body)?,
        created_at,
        reply.agent_id,
    ])?;
    append_events(conn, events)
}

fn set_delivery_status_tx(
    conn: &Connection,
    update: &DeliveryUpdate,
) -> Result<DeliveryRecorded, StoreError> {
    let id = update.message_id.to_string();
    let Some(channel) = conn
        .prepare_cached("SELECT channel FROM messages WHERE id = ?1 AND direction = 'outbound'")?
        .query_row(params![id], |row| row.get::<_, String>(0))
        .optional()?
    else {
        return Err(StoreError::NotFound(format!(
            "outbound message {}",
            update.message_id
        )));
    };
    // A superseded status still brings the provider's id: later callbacks are found by it.
    if let Some(provider_id) = &update.provider_message_id {
        conn.prepare_cached(
            "UPDATE messages SET provider_message_id = ?2
             WHERE id = ?1 AND provider_message_id IS NULL",
        )?
        .execute(params![id, provider_id])?;
    }
    let outcome = if advance_status(conn, &id, &update.status)? {
        append_events(conn, &update.events)?;
        DeliveryOutcome::Applied
    } else {
        DeliveryOutcome::Superseded
    };
    let mut parked = None;
    if let Some(provider_id) = &update.provider_message_id {
        let waiting = conn
            .prepare_cached(
                "DELETE FROM parked_delivery_statuses
                 WHERE channel = ?1 AND provider_message_id = ?2 RETURNING status, error",
            )?
            .query_row(params![channel, provider_id], |row| {
                Ok((row.get::<_, String>(0)?, row.get::<_, Option<String>>(1)?))
            })
            .optional()?;
        if let Some((status, error)) = waiting
            && advance_status(conn, &id, &status)?
        {
            if status == "failed"
                && let Some(event) = &update.parked_failure_event
            {
                append_events(
                    conn,
                    &[parked_failure_event(event.clone(), error.as_deref())],
                )?;
            }
            parked = Some(ParkedStatus {
                channel,
                provider_message_id: provider_id.clone(),
                status,
                error,
            });
        }
    }
    Ok(DeliveryRecorded { outcome, parked })
}

/// Moves an outbound message's status to `status` if that is forward; true if it did.
fn advance_status(conn: &Connection, id: &str, status: &str) -> Result<bool, StoreError> {
    let changed = conn
        .prepare_cached(&format!(
            "UPDATE messages SET delivery_status = ?2
             WHERE id = ?1 AND direction = 'outbound' AND {} < {}",
            status_rank_sql("COALESCE(delivery_status, 'pending')"),
            status_rank_sql("?2"),
        ))?
        .execute(params![id, status])?;
    Ok(changed > 0)
}

fn park_delivery_status_tx(
    conn: &Connection,
    status: &ParkedStatus,
    received_at: i64,
) -> Result<bool, StoreError> {
    let known = conn
        .prepare_cached(
            "SELECT 1 FROM messages
             WHERE channel = ?1 AND provider_message_id = ?2 AND direction = 'outbound'",
        )?
        .exists(params![status.channel, status.provider_message_id])?;
    if known {
        return Ok(false);
    }
    conn.prepare_cached("DELETE FROM parked_delivery_statuses WHERE received_at < ?1")?
        .execute(params![received_at.saturating_sub(PARKED_STATUS_TTL_NANOS)])?;
    conn.prepare_cached(&format!(
        "INSERT INTO parked_delivery_statuses
             (channel, provider_message_id, status, error, received_at)
         VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (channel, provider_message_id) DO UPDATE
             SET status = excluded.status, error = excluded.error,
                 received_at = excluded.received_at
             WHERE {} > {}",
        status_rank_sql("excluded.status"),
        status_rank_sql("parked_delivery_statuses.status"),
    ))?
    .execute(params![
        status.channel,
        status.provider_message_id,
        status.status,
        status.error,
        received_at
    ])?;
    Ok(true)
}

// ---------------------------------------------------------------------------------------------
// Reads (on a read-only connection)

fn conversation_by_id(
    conn: &Connection,
    id: Ulid,
) -> Result<Option<ConversationRecord>, StoreError> {
    let sql = format!("SELECT {CONVERSATION_COLUMNS} FROM conversations WHERE id = ?1");
    conn.prepare_cached(&sql)?
        .query_row(params![id.to_string()], ConversationRow::read)
        .optional()?
        .map(ConversationRow::decode)
        .transpose()
}

fn list_conversations(
    conn: &Connection,
    filter: &ConversationFilter,
) -> Result<Vec<ConversationRecord>, StoreError> {
    // One of a few fixed statements (by which filters are set), so each is prepared once and
    // can use its index.
    let mut sql = format!("SELECT {CONVERSATION_COLUMNS} FROM conversations WHERE 1 = 1");
    let mut values: Vec<String> = Vec::new();
    if let Some(status) = filter.status {
        values.push(status.as_str().to_owned());
        sql.push_str(&format!(" AND status = ?{}", values.len()));
    }
    if let Some(channel) = &filter.channel {
        values.push(channel.clone());
        sql.push_str(&format!(" AND channel = ?{}", values.len()));
    }
    if let Some(contact_id) = filter.contact_id {
        values.push(contact_id.to_string());
        sql.push_str(&format!(" AND contact_id = ?{}", values.len()));
    }
    if let Some(before) = filter.updated_before {
        values.push(ts(&before));
        sql.push_str(&format!(" AND updated_at < ?{}", values.len()));
    }
    // A limit of 0 means no limit (the admin API caps its pages itself).
    let limit = if filter.limit == 0 {
        -1
    } else {
        i64::try_from(filter.limit).unwrap_or(i64::MAX)
    };
    sql.push_str(&format!(
        " ORDER BY updated_at DESC, id DESC LIMIT {}",
        if limit < 0 {
            "-1".to_owned()
        } else {
            format!("?{}", values.len() + 1)
        }
    ));
    let mut stmt = conn.prepare_cached(&sql)?;
    let mut bound: Vec<&dyn rusqlite::ToSql> =
        values.iter().map(|v| v as &dyn rusqlite::ToSql).collect();
    if limit >= 0 {
        bound.push(&limit);
    }
    let rows = stmt
        .query_map(bound.as_slice(), ConversationRow::read)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    rows.into_iter().map(ConversationRow::decode).collect()
}

fn messages_of(conn: &Connection, conversation_id: Ulid) -> Result<Vec<StoredMessage>, StoreError> {
    let sql = format!(
        "SELECT {MESSAGE_COLUMNS} FROM messages WHERE conversation_id = ?1 ORDER BY created_at, rowid"
    );
    let rows = conn
        .prepare_cached(&sql)?
        .query_map(params![conversation_id.to_string()], MessageRow::read)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    rows.into_iter().map(MessageRow::decode).collect()
}

fn message_by_id(conn: &Connection, id: Ulid) -> Result<Option<StoredMessage>, StoreError> {
    let sql = format!("SELECT {MESSAGE_COLUMNS} FROM messages WHERE id = ?1");
    conn.prepare_cached(&sql)?
        .query_row(params![id.to_string()], MessageRow::read)
        .optional()?
        .map(MessageRow::decode)
        .transpose()
}

fn outbound_by_provider_id_read(
    conn: &Connection,
    channel: &str,
    provider_message_id: &str,
) -> Result<Option<StoredMessage>, StoreError> {
    let sql = format!(
        "SELECT {MESSAGE_COLUMNS} FROM messages
         WHERE channel = ?1 AND provider_message_id = ?2 AND direction = 'outbound'"
    );
    conn.prepare_cached(&sql)?
        .query_row(params![channel, provider_message_id], MessageRow::read)
        .optional()?
        .map(MessageRow::decode)
        .transpose()
}

fn pending_replies_read(conn: &Connection) -> Result<Vec<Ulid>, StoreError> {
    let ids = conn
        .prepare_cached(
            "SELECT id FROM messages WHERE direction = 'outbound' AND delivery_status = 'pending' ORDER BY id",
        )?
        .query_map([], |row| row.get::<_, String>(0))?
        .collect::<rusqlite::Result<Vec<String>>>()?;
    ids.iter()
        .map(|id| {
            id.parse::<Ulid>()
                .map_err(|error| StoreError::Corrupt(format!("message id {id}: {error}")))
        })
        .collect()
}

fn recovery_read(conn: &Connection) -> Result<Recovery, StoreError> {
    // One snapshot for all three reads, so they agree with each other.
    let tx = conn.unchecked_transaction()?;
    let conversations = tx
        .prepare_cached(
            "SELECT id, routing_state FROM conversations
             WHERE status <> 'closed' AND routing_state IS NOT NULL
             ORDER BY id",
        )?
        .query_map([], |row| {
            Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?
        .into_iter()
        .map(|(id, state)| Ok((parse_ulid(&id)?, state)))
        .collect::<Result<Vec<_>, StoreError>>()?;
    let documents = |sql: &str| -> Result<Vec<(String, String)>, StoreError> {
        Ok(tx
            .prepare_cached(sql)?
            .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?
            .collect::<rusqlite::Result<Vec<_>>>()?)
    };
    let agents = documents("SELECT agent_id, state FROM agent_state ORDER BY agent_id")?;
    let queues = documents("SELECT queue, state FROM queue_state ORDER BY queue")?;
    // Storage order: the order in which the messages were acknowledged.
    let sql = format!(
        "SELECT {MESSAGE_COLUMNS}, {UNROUTED_COLUMNS} FROM messages
         WHERE routed = 0 AND direction = 'inbound' ORDER BY rowid"
    );
    let unrouted = tx
        .prepare_cached(&sql)?
        .query_map([], |row| {
            Ok((
                MessageRow::read(row)?,
                row.get::<_, String>(12)?,
                row.get::<_, bool>(13)?,
            ))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?
        .into_iter()
        .map(|(row, contact_id, new_conversation)| {
            Ok(UnroutedMessage {
                message: row.decode()?,
                contact_id: parse_ulid(&contact_id)?,
                new_conversation,
            })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    tx.finish()?;
    Ok(Recovery {
        conversations,
        agents,
        queues,
        unrouted,
        // One instance: nobody reads ahead to take over from it.
        routing_writes: None,
    })
}

/// Outbox events in position order after `after` (`None`: after what the relay published).
///
/// One writer commits in position order, so a position is a complete cursor here: nothing
/// committed later can take a position below one already read.
fn outbox_read(
    conn: &Connection,
    after: Option<i64>,
    limit: i64,
) -> Result<Vec<OutboxEvent>, StoreError> {
    type Raw = (i64, String, String, Option<String>, i64, String, String);
    let rows: Vec<Raw> = conn
        .prepare_cached(
            "SELECT position, event_id, kind, conversation_id, seq, data, time FROM outbox
             WHERE position > COALESCE(?1, (SELECT published_up_to FROM outbox_relay WHERE id = 1))
             ORDER BY position LIMIT ?2",
        )?
        .query_map(params![after, limit], |row| {
            Ok((
                row.get(0)?,
                row.get(1)?,
                row.get(2)?,
                row.get(3)?,
                row.get(4)?,
                row.get(5)?,
                row.get(6)?,
            ))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    rows.into_iter()
        .map(
            |(position, event_id, kind, conversation_id, seq, data, time)| {
                Ok(OutboxEvent {
                    position,
                    event_id: parse_ulid(&event_id)?,
                    kind,
                    conversation_id: conversation_id.as_deref().map(parse_ulid).transpose()?,
                    seq: to_u64(seq, "seq")?,
                    data: parse_json(&data)?,
                    time: parse_ts(&time)?,
                })
            },
        )
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The router's lease (on the leadership row that fencing checks)

fn try_acquire_lease_tx(
    conn: &Connection,
    node: &str,
    ttl: chrono::Duration,
) -> Result<Option<u64>, StoreError> {
    let now = Utc::now();
    let epoch: Option<i64> = conn
        .prepare_cached(
            "UPDATE leadership SET holder = ?1, epoch = epoch + 1, expires_at = ?2, updated_at = ?3
             WHERE id = 1 AND (holder IS NULL OR holder = ?1 OR expires_at IS NULL
                               OR expires_at <= ?3)
             RETURNING epoch",
        )?
        .query_row(params![node, ts(&(now + ttl)), ts(&now)], |row| row.get(0))
        .optional()?;
    epoch.map(|epoch| to_u64(epoch, "epoch")).transpose()
}

fn renew_lease_tx(
    conn: &Connection,
    node: &str,
    epoch: u64,
    ttl: chrono::Duration,
) -> Result<bool, StoreError> {
    let now = Utc::now();
    let changed = conn
        .prepare_cached(
            "UPDATE leadership SET expires_at = ?3, updated_at = ?4
             WHERE id = 1 AND holder = ?1 AND epoch = ?2",
        )?
        .execute(params![
            node,
            to_i64(epoch, "epoch")?,
            ts(&(now + ttl)),
            ts(&now)
        ])?;
    Ok(changed == 1)
}

fn release_lease_tx(conn: &Connection, node: &str, epoch: u64) -> Result<bool, StoreError> {
    let changed = conn
        .prepare_cached(
            "UPDATE leadership SET holder = NULL, expires_at = NULL, updated_at = ?3
             WHERE id = 1 AND holder = ?1 AND epoch = ?2",
        )?
        .execute(params![node, to_i64(epoch, "epoch")?, ts(&Utc::now())])?;
    Ok(changed == 1)
}

fn lease_read(conn: &Connection) -> Result<Lease, StoreError> {
    let (holder, epoch, expires_at): (Option<String>, i64, Option<String>) = conn
        .prepare_cached("SELECT holder, epoch, expires_at FROM leadership WHERE id = 1")?
        .query_row([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?;
    let expires_at = expires_at.as_deref().map(parse_ts).transpose()?;
    let now = Utc::now();
    let live = holder.is_some() && expires_at.is_some_and(|at| at > now);
    Ok(Lease {
        live,
        remaining: expires_at
            .filter(|_| live)
            .and_then(|at| (at - now).to_std().ok()),
        holder,
        epoch: to_u64(epoch, "epoch")?,
        expires_at,
    })
}

// ---------------------------------------------------------------------------------------------
// The trait

#[async_trait]
impl Store for SqliteStore {
    async fn ingest(
        &self,
        message: InboundMessage,
        attachments: Vec<AttachmentContent>,
        received_at: DateTime<Utc>,
    ) -> Result<IngestOutcome, StoreError> {
        let request = IngestRequest::new(message, attachments, received_at)?;
        self.write(move |conn| ingest_tx(conn, &request)).await
    }

    async fn attachment(&self, sha256: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let sha256 = sha256.to_owned();
        self.read(move |conn| {
            Ok(conn
                .prepare_cached("SELECT content FROM attachments WHERE sha256 = ?1")?
                .query_row(params![sha256], |row| row.get(0))
                .optional()?)
        })
        .await
    }

    async fn apply_routing(&self, write: Arc<RoutingWrite>) -> Result<(), StoreError> {
        self.write(move |conn| apply_routing_tx(conn, &write)).await
    }

    async fn store_reply(&self, reply: NewReply, events: Vec<NewEvent>) -> Result<(), StoreError> {
        self.write(move |conn| store_reply_tx(conn, &reply, &events))
            .await
    }

    async fn rate(&self, rating: Rating, events: Vec<NewEvent>) -> Result<bool, StoreError> {
        self.write(move |conn| rate_tx(conn, &rating, &events))
            .await
    }

    async fn ratings(&self, recent: usize) -> Result<RatingSummary, StoreError> {
        self.read(move |conn| ratings_read(conn, recent)).await
    }

    async fn set_delivery_status(
        &self,
        update: DeliveryUpdate,
    ) -> Result<DeliveryRecorded, StoreError> {
        self.write(move |conn| set_delivery_status_tx(conn, &update))
            .await
    }

    async fn park_delivery_status(
        &self,
        status: ParkedStatus,
        received_at: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let received_at = received_at.timestamp_nanos_opt().unwrap_or(i64::MAX);
        self.write(move |conn| park_delivery_status_tx(conn, &status, received_at))
            .await
    }

    async fn recovery(&self) -> Result<Recovery, StoreError> {
        self.read(recovery_read).await
    }

    async fn pending_replies(&self) -> Result<Vec<Ulid>, StoreError> {
        self.read(pending_replies_read).await
    }

    async fn conversation(&self, id: Ulid) -> Result<Option<ConversationRecord>, StoreError> {
        self.read(move |conn| conversation_by_id(conn, id)).await
    }

    async fn conversations(
        &self,
        filter: ConversationFilter,
    ) -> Result<Vec<ConversationRecord>, StoreError> {
        self.read(move |conn| list_conversations(conn, &filter))
            .await
    }

    async fn messages(&self, conversation_id: Ulid) -> Result<Vec<StoredMessage>, StoreError> {
        self.read(move |conn| messages_of(conn, conversation_id))
            .await
    }

    async fn message(&self, id: Ulid) -> Result<Option<StoredMessage>, StoreError> {
        self.read(move |conn| message_by_id(conn, id)).await
    }

    async fn outbound_by_provider_id(
        &self,
        channel: &str,
        provider_message_id: &str,
    ) -> Result<Option<StoredMessage>, StoreError> {
        let (channel, provider_message_id) = (channel.to_owned(), provider_message_id.to_owned());
        self.read(move |conn| outbound_by_provider_id_read(conn, &channel, &provider_message_id))
            .await
    }

    async fn outbox_pending(&self, limit: usize) -> Result<Vec<OutboxEvent>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(move |conn| outbox_read(conn, None, limit)).await
    }

    async fn outbox_mark_sent(&self, positions: &[i64]) -> Result<(), StoreError> {
        let positions = positions.to_vec();
        self.write(move |conn| {
            // The relay marks a prefix of the pending events (see the migration that made this a
            // cursor): the cursor moves over the pending events given, up to the first one that
            // was not (so an unknown or out-of-order position marks nothing it did not name).
            let mut given = positions.clone();
            given.sort_unstable();
            let cursor: i64 = conn
                .prepare_cached("SELECT published_up_to FROM outbox_relay WHERE id = 1")?
                .query_row([], |row| row.get(0))?;
            let pending: Vec<i64> = conn
                .prepare_cached(
                    "SELECT position FROM outbox WHERE position > ?1 ORDER BY position LIMIT ?2",
                )?
                .query_map(params![cursor, given.len() as i64], |row| row.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            let published_up_to = pending
                .into_iter()
                .take_while(|position| given.binary_search(position).is_ok())
                .last();
            if let Some(published_up_to) = published_up_to {
                conn.prepare_cached("UPDATE outbox_relay SET published_up_to = ?1 WHERE id = 1")?
                    .execute(params![published_up_to])?;
            }
            Ok(())
        })
        .await
    }

    async fn outbox_skip_pending(&self) -> Result<(), StoreError> {
        self.write(|conn| {
            // One writer commits positions in order: everything up to the highest is committed.
            conn.prepare_cached(
                "UPDATE outbox_relay SET published_up_to =
                     (SELECT COALESCE(MAX(position), 0) FROM outbox)
                 WHERE id = 1 AND published_up_to < (SELECT COALESCE(MAX(position), 0) FROM outbox)",
            )?
            .execute([])?;
            Ok(())
        })
        .await
    }

    fn wakeups(&self) -> Option<broadcast::Receiver<Wakeup>> {
        Some(self.inner.committed.subscribe())
    }

    async fn events_end(&self) -> Result<EventCursor, StoreError> {
        self.read(|conn| {
            let end: i64 = conn
                .prepare_cached("SELECT COALESCE(MAX(position), 0) FROM outbox")?
                .query_row([], |row| row.get(0))?;
            Ok(EventCursor {
                transaction: 0,
                position: end,
            })
        })
        .await
    }

    async fn events_after(
        &self,
        cursor: EventCursor,
        limit: usize,
    ) -> Result<EventsPage, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let events = self
            .read(move |conn| outbox_read(conn, Some(cursor.position), limit))
            .await?;
        let next = EventCursor {
            transaction: 0,
            position: events
                .last()
                .map_or(cursor.position, |event| event.position),
        };
        Ok(EventsPage {
            events,
            next,
            // One writer: whatever is committed is readable in position order at once.
            held_back: false,
        })
    }

    async fn outbox_backlog(&self) -> Result<u64, StoreError> {
        self.read(|conn| {
            let count: i64 = conn
                .prepare_cached(
                    "SELECT COUNT(*) FROM outbox
                     WHERE position > (SELECT published_up_to FROM outbox_relay WHERE id = 1)",
                )?
                .query_row([], |row| row.get(0))?;
            to_u64(count, "backlog")
        })
        .await
    }

    async fn check_writable(&self) -> Result<(), StoreError> {
        // A real (tiny) commit through the writer: proves the lock, the disk and the writer thread.
        self.write(|conn| {
            conn.prepare_cached(
                "INSERT INTO write_probe (id, checked_at) VALUES (1, ?1)
                 ON CONFLICT (id) DO UPDATE SET checked_at = excluded.checked_at",
            )?
            .execute(params![ts(&Utc::now())])?;
            Ok(())
        })
        .await
    }

    async fn try_acquire_lease(
        &self,
        node: &str,
        ttl: Duration,
    ) -> Result<Option<u64>, StoreError> {
        let (node, ttl) = (node.to_owned(), lease_duration(ttl)?);
        self.write(move |conn| try_acquire_lease_tx(conn, &node, ttl))
            .await
    }

    async fn renew_lease(&self, node: &str, epoch: u64, ttl: Duration) -> Result<bool, StoreError> {
        let (node, ttl) = (node.to_owned(), lease_duration(ttl)?);
        self.write(move |conn| renew_lease_tx(conn, &node, epoch, ttl))
            .await
    }

    async fn release_lease(&self, node: &str, epoch: u64) -> Result<bool, StoreError> {
        let node = node.to_owned();
        self.write(move |conn| release_lease_tx(conn, &node, epoch))
            .await
    }

    async fn lease(&self) -> Result<Lease, StoreError> {
        self.read(lease_read).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_numbered_from_one_without_gaps() {
        for (index, (version, sql)) in MIGRATIONS.iter().enumerate() {
            assert_eq!(*version, index as i64 + 1);
            assert!(!sql.trim().is_empty());
        }
        assert_eq!(SCHEMA_VERSION, MIGRATIONS.len() as i64);
    }

    /// A database at schema 4 with `sent` of its `total` events flagged sent, migrated to the
    /// newest schema: the relay cursor. Returns the positions still pending.
    fn pending_after_cursor_migration(total: usize, sent: usize) -> Vec<i64> {
        let Ok(mut conn) = Connection::open_in_memory() else {
            panic!("in-memory database");
        };
        let Ok(tx) = conn.transaction() else {
            panic!("transaction");
        };
        let old_schema = tx.execute_batch(
            "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)",
        );
        assert!(old_schema.is_ok());
        for (version, sql) in &MIGRATIONS[..4] {
            assert!(tx.execute_batch(sql).is_ok());
            let recorded = tx.execute(
                "INSERT INTO schema_migrations (version, applied_at) VALUES (?1, 'then')",
                params![version],
            );
            assert!(recorded.is_ok());
        }
        for index in 0..total {
            let sent_at = (index < sent).then_some("2026-01-01T00:00:00.000000Z");
            let inserted = tx.execute(
                "INSERT INTO outbox (event_id, kind, seq, data, time, sent_at)
                 VALUES (?1, 'agent.presence', 0, '{}', '2026-01-01T00:00:00.000000Z', ?2)",
                params![Ulid::new().to_string(), sent_at],
            );
            assert!(inserted.is_ok());
        }
        assert!(tx.commit().is_ok());
        assert!(migrate(&mut conn).is_ok());
        let Ok(pending) = outbox_read(&conn, None, 100) else {
            panic!("pending events unreadable after the migration");
        };
        pending.iter().map(|event| event.position).collect()
    }

    #[test]
    fn the_relay_cursor_starts_after_the_events_already_sent() {
        assert_eq!(pending_after_cursor_migration(3, 2), vec![3]);
        assert_eq!(pending_after_cursor_migration(3, 0), vec![1, 2, 3]);
        assert_eq!(pending_after_cursor_migration(3, 3), Vec::<i64>::new());
        assert_eq!(pending_after_cursor_migration(0, 0), Vec::<i64>::new());
    }

    #[test]
    fn timestamps_sort_as_text() {
        let parse = |text: &str| parse_ts(text).ok();
        // Variable-width fractions would put "…:00Z" after "…:00.1Z"; fixed width does not.
        let (Some(whole), Some(later)) = (
            parse("2024-01-01T00:00:00Z"),
            parse("2024-01-01T00:00:00.1Z"),
        ) else {
            panic!("bad test timestamps");
        };
        assert!(ts(&whole) < ts(&later));
        assert_eq!(parse(&ts(&later)), Some(later));
    }
}
