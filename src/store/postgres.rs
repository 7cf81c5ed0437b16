//! The PostgreSQL store: the same [`Store`] as SQLite, shared by several switchboard instances.
//!
//! # Group commit
//!
//! One writer task per instance takes the first queued write, drains whatever else is queued (up to
//! [`PostgresOptions::max_batch`], capped at [`MAX_SUBTRANSACTIONS`]), runs them in one transaction
//! on one pooled connection and commits once (`synchronous_commit=on`, so a commit is durable when
//! it returns). Each caller's future resolves only after that commit. Each write runs inside the
//! savepoint `request`: a write that fails rolls back to it alone and the rest of the batch still
//! commits. If the connection is lost or the `COMMIT` fails, every caller whose work was in the
//! batch gets [`StoreError::Unavailable`]. A lost connection is never handed out again: the pool
//! checks connections when they come back and opens new ones, so the store recovers by itself.
//!
//! # Several instances on one database
//!
//! - Deduplication is the unique constraint on `messages (channel, provider_message_id)`: of two
//!   instances storing the same message at once, the second insert waits for the first commit and
//!   then does nothing, and that caller gets [`IngestOutcome::Duplicate`].
//! - Contacts: a new customer's identities are inserted with `ON CONFLICT DO NOTHING`; an instance
//!   that finds one of them taken by a concurrent commit withdraws its new contact and matches
//!   again, so two first messages of one customer end up on one contact.
//! - Conversations: matching locks the contact's row (`UPDATE … RETURNING`), so two instances
//!   never both decide that a contact has no open conversation.
//! - Writes waiting on each other across instances can deadlock; PostgreSQL aborts one statement
//!   and that write is rolled back to its savepoint and run again.
//!
//! # Lease and fencing
//!
//! The `leadership` row holds the router's lease (holder, expiry by the database clock) and the
//! fencing epoch. Taking the lease raises the epoch; a routing write locks the row in its own
//! transaction (counting itself in `routing_writes`) and is refused with [`StoreError::Fenced`] if
//! its epoch is older, so a takeover waits for an old leader's in-flight commit and every later
//! write of it is refused.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{Json, ToSql};
use tokio_postgres::{NoTls, Row};
use ulid::Ulid;

use super::IngestRequest;
use super::sqlite::WriterStats;
use super::{
    AttachmentContent, ConversationFilter, ConversationRecord, ConversationStatus, DeliveryOutcome,
    DeliveryRecorded, DeliveryUpdate, Direction, EventCursor, EventsPage, ForwardedCommand,
    IngestOutcome, Lease, Member, NewEvent, NewReply, OutboxEvent, PARKED_STATUS_TTL_NANOS,
    ParkedStatus, Rating, RatingSummary, Recovery, ReplyRoute, RoutingWrite, Signal, Store,
    StoreError, StoredMessage, StoredPush, UnroutedMessage, Wakeup, json_text, lease_duration,
    parked_failure_event, parse_status, parse_ulid, prefix_error, status_rank_sql, to_i64, to_u64,
};
use crate::message::InboundMessage;

/// The schema migrations, applied in order on open. Append only: never edit a released one.
const MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("../../migrations/postgres/0001_init.sql")),
    (
        2,
        include_str!("../../migrations/postgres/0002_queue_state.sql"),
    ),
    (
        3,
        include_str!("../../migrations/postgres/0003_cluster.sql"),
    ),
    (
        4,
        include_str!("../../migrations/postgres/0004_parked_delivery_status.sql"),
    ),
    (
        5,
        include_str!("../../migrations/postgres/0005_ratings.sql"),
    ),
    (
        6,
        include_str!("../../migrations/postgres/0006_outbox_commit_order.sql"),
    ),
    (
        7,
        include_str!("../../migrations/postgres/0007_routing_writes.sql"),
    ),
    (
        8,
        include_str!("../../migrations/postgres/0008_attachments.sql"),
    ),
];

/// The newest schema version this binary knows.
pub const SCHEMA_VERSION: i64 = MIGRATIONS[MIGRATIONS.len() - 1].0;

/// The most writes one transaction carries. Each write's savepoint is a subtransaction; a backend
/// keeps only 64 subtransaction ids in shared memory, and past that every other session's snapshot
/// checks get slower while the transaction is open.
pub const MAX_SUBTRANSACTIONS: usize = 64;

/// How often a write is run again after PostgreSQL aborted it to break a deadlock.
const DEADLOCK_RETRIES: usize = 3;

/// How to reach the database and how to use it.
#[derive(Debug, Clone)]
pub struct PostgresOptions {
    /// Host, port, database, user and password (`Config`'s `Debug` hides the password).
    pub connection: tokio_postgres::Config,
    /// The schema holding switchboard's tables (created on first start).
    pub schema: String,
    /// Connections in the pool: one writes, the others serve reads and the lease.
    pub pool_size: usize,
    /// The most writes one transaction carries (capped at [`MAX_SUBTRANSACTIONS`]).
    pub max_batch: usize,
    /// How long a statement waits for a lock (held by another instance, a migration, an operator)
    /// before the write fails with [`StoreError::Unavailable`].
    pub lock_timeout: Duration,
    /// How long opening a connection may take.
    pub connect_timeout: Duration,
    /// Shown in `pg_stat_activity`.
    pub application_name: String,
}

impl PostgresOptions {
    /// Defaults for everything but where the database is.
    pub fn new(connection: tokio_postgres::Config, schema: &str) -> PostgresOptions {
        PostgresOptions {
            connection,
            schema: schema.to_owned(),
            pool_size: 8,
            max_batch: MAX_SUBTRANSACTIONS,
            lock_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            application_name: "switchboard".into(),
        }
    }

    /// Where the store is, for logs: host, port, database, user and schema (never the password).
    pub fn describe(&self) -> String {
        describe_target(&self.connection, &self.schema)
    }
}

/// `host:port/database as user, schema S`: what the connection is for, without secrets.
fn describe_target(config: &tokio_postgres::Config, schema: &str) -> String {
    let host = config
        .get_hosts()
        .first()
        .map(|host| match host {
            tokio_postgres::config::Host::Tcp(name) => name.clone(),
            tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
        })
        .unwrap_or_else(|| "localhost".into());
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!(
        "postgres://{host}:{port}/{} as {}, schema {schema}",
        config.get_dbname().unwrap_or("(default database)"),
        config.get_user().unwrap_or("(default user)"),
    )
}

/// Is `name` a schema name switchboard can use unquoted? (Lower-case letters, digits, `_`.)
pub fn valid_schema_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|first| first.is_ascii_lowercase() || first == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && name.len() <= 63
}

#[derive(Debug, Default)]
struct Counters {
    commits: AtomicU64,
    requests: AtomicU64,
    failed_batches: AtomicU64,
}

/// The PostgreSQL [`Store`]: a cheap-to-clone handle.
#[derive(Clone)]
pub struct PostgresStore {
    inner: Arc<Inner>,
}

struct Inner {
    target: String,
    /// Notifications carry it first, so instances on other schemas ignore them.
    schema: String,
    pool: Pool,
    /// Notifications from every instance on this schema (the listener task feeds it).
    wakeups: tokio::sync::broadcast::Sender<Wakeup>,
    listener: tokio::task::JoinHandle<()>,
    /// `None` once closed.
    sender: Mutex<Option<mpsc::UnboundedSender<Job>>>,
    writer: tokio::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    counters: Arc<Counters>,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("target", &self.inner.target)
            .field("pool", &self.inner.pool.status())
            .field("stats", &self.stats())
            .finish()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

/// The channel every instance notifies on; the payload starts with the schema, so instances on other
/// schemas of the same database ignore it.
const NOTIFY_CHANNEL: &str = "switchboard";

/// Keeps a dedicated connection listening for other instances' notifications, reconnecting when it
/// is lost. After each (re)connection it announces [`Wakeup::Resync`]: what was sent meanwhile was
/// missed, and readers look at the store again.
async fn listen(
    mut config: tokio_postgres::Config,
    connect_timeout: Duration,
    schema: String,
    wakeups: tokio::sync::broadcast::Sender<Wakeup>,
) {
    config.connect_timeout(connect_timeout);
    let prefix = format!("{schema}|");
    let mut backoff = Duration::from_millis(100);
    loop {
        if let Ok((client, mut connection)) = config.connect(NoTls).await {
            let (lost_tx, mut lost) = oneshot::channel::<()>();
            let forward = wakeups.clone();
            let prefix = prefix.clone();
            let driver = tokio::spawn(async move {
                while let Some(Ok(message)) =
                    std::future::poll_fn(|cx| connection.poll_message(cx)).await
                {
                    if let tokio_postgres::AsyncMessage::Notification(note) = message
                        && let Some(wakeup) = note
                            .payload()
                            .strip_prefix(prefix.as_str())
                            .and_then(parse_wakeup)
                    {
                        let _ = forward.send(wakeup);
                    }
                }
                let _ = lost_tx.send(());
            });
            if client
                .batch_execute(&format!("LISTEN {NOTIFY_CHANNEL}"))
                .await
                .is_ok()
            {
                backoff = Duration::from_millis(100);
                let _ = wakeups.send(Wakeup::Resync);
                let _ = (&mut lost).await;
            }
            driver.abort();
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// `inbound`, `commands`, `pushes`, `events`, `answer|<id>`, `signal|<json>` (after the schema
/// prefix).
fn parse_wakeup(payload: &str) -> Option<Wakeup> {
    match payload {
        "inbound" => Some(Wakeup::Inbound),
        "commands" => Some(Wakeup::Commands),
        "pushes" => Some(Wakeup::Pushes),
        "events" => Some(Wakeup::Events),
        other => {
            if let Some(signal) = other.strip_prefix("signal|") {
                return serde_json::from_str(signal).ok().map(Wakeup::Signal);
            }
            other
                .strip_prefix("answer|")
                .and_then(|id| id.parse().ok())
                .map(Wakeup::Answer)
        }
    }
}

/// The payloads (after the schema prefix) announcing a committed write to the instances that wait
/// for it.
fn wakeup_payloads(write: &Write, written: &Written) -> Vec<String> {
    let mut payloads = Vec::new();
    match (write, written) {
        (Write::Ingest(_), Written::Ingest(IngestOutcome::Stored { .. })) => {
            payloads.push("inbound".into());
        }
        (Write::Routing(routing), _) => {
            if !routing.pushes.is_empty() {
                payloads.push("pushes".into());
            }
            if !routing.events.is_empty() {
                payloads.push("events".into());
            }
        }
        (Write::Reply(_, events), _) if !events.is_empty() => payloads.push("events".into()),
        (Write::Rate(_, events), Written::Rated(true)) if !events.is_empty() => {
            payloads.push("events".into());
        }
        (Write::Delivery(_), Written::Delivery(_)) => payloads.push("events".into()),
        (Write::Command(_), _) => payloads.push("commands".into()),
        (Write::Answer(id, _), Written::Answered(true)) => payloads.push(format!("answer|{id}")),
        _ => {}
    }
    payloads
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn closed() -> StoreError {
    StoreError::Unavailable("the store is closed".into())
}

impl PostgresStore {
    /// Connects, creates the schema and applies pending migrations (one instance at a time), and
    /// starts the writer. Fails with a message naming the database (never the password) when it
    /// cannot connect.
    pub async fn open(options: PostgresOptions) -> Result<PostgresStore, StoreError> {
        if !valid_schema_name(&options.schema) {
            return Err(StoreError::NotFound(format!(
                "schema name `{}` must be lower-case letters, digits and `_`",
                options.schema
            )));
        }
        let target = options.describe();
        let mut connection = options.connection.clone();
        let mut session = format!(
            "-c search_path={} -c synchronous_commit=on -c lock_timeout={}",
            options.schema,
            options.lock_timeout.as_millis().max(1)
        );
        if let Some(extra) = options.connection.get_options() {
            session = format!("{extra} {session}");
        }
        connection
            .options(&session)
            .application_name(&options.application_name)
            .connect_timeout(options.connect_timeout);
        let manager = Manager::from_config(
            connection,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool_size = options.pool_size.max(2);
        let pool = Pool::builder(manager)
            .max_size(pool_size)
            .runtime(Runtime::Tokio1)
            .create_timeout(Some(options.connect_timeout))
            .wait_timeout(Some(options.lock_timeout + options.connect_timeout))
            .build()
            .map_err(|error| StoreError::Unavailable(format!("{target}: {error}")))?;
        {
            let mut client = pool
                .get()
                .await
                .map_err(|error| pool_error(&target, error))?;
            migrate(&mut client, &options.schema)
                .await
                .map_err(|error| error.into_store())
                .map_err(|error| prefix_error(error, &format!("migrating {target}")))?;
        }
        let counters = Arc::new(Counters::default());
        let (sender, receiver) = mpsc::unbounded_channel();
        let max_batch = options.max_batch.clamp(1, MAX_SUBTRANSACTIONS);
        let writer = tokio::spawn(run_writer(
            pool.clone(),
            receiver,
            max_batch,
            Arc::clone(&counters),
            Arc::from(options.schema.as_str()),
        ));
        let (wakeups, _) = tokio::sync::broadcast::channel(1024);
        let listener = tokio::spawn(listen(
            options.connection.clone(),
            options.connect_timeout,
            options.schema.clone(),
            wakeups.clone(),
        ));
        Ok(PostgresStore {
            inner: Arc::new(Inner {
                target,
                schema: options.schema.clone(),
                pool,
                wakeups,
                listener,
                sender: Mutex::new(Some(sender)),
                writer: tokio::sync::Mutex::new(Some(writer)),
                counters,
            }),
        })
    }

    /// Connects once and checks the credentials and the database, without touching the schema
    /// (for `check-config`).
    pub async fn check_connection(options: &PostgresOptions) -> Result<(), StoreError> {
        let target = options.describe();
        let mut connection = options.connection.clone();
        connection.connect_timeout(options.connect_timeout);
        let (client, driver) = connection
            .connect(NoTls)
            .await
            .map_err(|error| connect_error(&target, &error))?;
        let driver = tokio::spawn(driver);
        let result = client
            .simple_query("SELECT 1")
            .await
            .map(|_| ())
            .map_err(|error| connect_error(&target, &error));
        drop(client);
        let _ = driver.await;
        result
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

    /// Where the store is (no password).
    pub fn target(&self) -> &str {
        &self.inner.target
    }

    /// Flushes the store: stops accepting writes, lets the writer commit everything already queued
    /// and waits for it; then closes the pool. Writes from any clone fail from now on.
    pub async fn close(&self) -> Result<(), StoreError> {
        drop(lock(&self.inner.sender).take());
        let writer = self.inner.writer.lock().await.take();
        if let Some(writer) = writer {
            writer
                .await
                .map_err(|error| StoreError::Unavailable(format!("the store writer: {error}")))?;
        }
        self.inner.pool.close();
        Ok(())
    }

    /// Queues a write for the writer's next transaction and waits for its commit.
    async fn write(&self, write: Write) -> Result<Written, StoreError> {
        let (reply, answer) = oneshot::channel();
        {
            let sender = lock(&self.inner.sender);
            let sender = sender.as_ref().ok_or_else(closed)?;
            sender.send(Job { write, reply }).map_err(|_| closed())?;
        }
        answer.await.map_err(|_| {
            StoreError::Unavailable("the store writer stopped before answering".into())
        })?
    }

    async fn write_done(&self, write: Write) -> Result<(), StoreError> {
        match self.write(write).await? {
            Written::Done => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    /// A pooled connection that is still open (a connection the server dropped is discarded and
    /// another one taken).
    async fn client(&self) -> Result<deadpool_postgres::Client, StoreError> {
        live_client(&self.inner.pool, &self.inner.target).await
    }

    /// Runs a read, once more on a fresh connection if the connection was lost meanwhile (reads are
    /// safe to repeat).
    async fn read<T, F>(&self, work: F) -> Result<T, StoreError>
    where
        F: for<'c> Fn(&'c Client) -> BoxFuture<'c, Result<T, Failure>>,
    {
        let mut attempt = 0;
        loop {
            let client = self.client().await?;
            match work(&client).await {
                Ok(value) => return Ok(value),
                Err(failure) if attempt == 0 && failure.connection_lost(&client) => {
                    drop(deadpool_postgres::Object::take(client));
                    attempt += 1;
                }
                Err(failure) => return Err(failure.into_store()),
            }
        }
    }
}

/// A pooled connection: statements are prepared once per connection and cached.
type Client = deadpool_postgres::ClientWrapper;

type BoxFuture<'a, T> = std::pin::Pin<Box<dyn Future<Output = T> + Send + 'a>>;

async fn live_client(pool: &Pool, target: &str) -> Result<deadpool_postgres::Client, StoreError> {
    // Every idle connection may have been cut at once (a database restart): try each.
    for _ in 0..=pool.status().max_size {
        let client = pool
            .get()
            .await
            .map_err(|error| pool_error(target, error))?;
        if !client.is_closed() {
            return Ok(client);
        }
        drop(deadpool_postgres::Object::take(client));
    }
    Err(StoreError::Unavailable(format!(
        "{target}: every connection was closed by the server"
    )))
}

fn unexpected(written: &Written) -> StoreError {
    StoreError::Corrupt(format!("the store writer answered {written:?}"))
}

// ---------------------------------------------------------------------------------------------
// Errors

/// A failure inside the store: either already a [`StoreError`] or a PostgreSQL error to classify.
#[derive(Debug)]
enum Failure {
    Store(StoreError),
    Postgres(tokio_postgres::Error),
}

impl From<StoreError> for Failure {
    fn from(error: StoreError) -> Failure {
        Failure::Store(error)
    }
}

impl From<tokio_postgres::Error> for Failure {
    fn from(error: tokio_postgres::Error) -> Failure {
        Failure::Postgres(error)
    }
}

impl Failure {
    /// The connection is gone (cut by the server, a restart, the network): nothing more can be
    /// done on it, and an operation that had not written anything may be run on another one.
    fn connection_lost(&self, client: &Client) -> bool {
        client.is_closed() || matches!(self, Failure::Postgres(error) if connection_lost(error))
    }

    /// PostgreSQL aborted the statement to break a deadlock or a serialization conflict: running
    /// the write again (after rolling it back) is expected to succeed.
    fn is_retryable(&self) -> bool {
        matches!(self, Failure::Postgres(error) if matches!(
            error.code(),
            Some(code) if *code == SqlState::T_R_DEADLOCK_DETECTED
                || *code == SqlState::T_R_SERIALIZATION_FAILURE
        ))
    }

    fn into_store(self) -> StoreError {
        match self {
            Failure::Store(error) => error,
            Failure::Postgres(error) => postgres_error(&error),
        }
    }
}

/// A PostgreSQL error as a [`StoreError`]: constraint and data errors are the request's fault
/// (`NotFound`, like SQLite), everything else (connection lost, lock timeout, disk full, shutting
/// down) is `Unavailable`.
fn postgres_error(error: &tokio_postgres::Error) -> StoreError {
    let Some(db) = error.as_db_error() else {
        if error.is_closed() {
            return StoreError::Unavailable(format!("connection to PostgreSQL lost: {error}"));
        }
        return StoreError::Unavailable(format!("PostgreSQL client: {error}"));
    };
    let text = format!("{} ({})", db.message(), db.code().code());
    match &db.code().code()[..2] {
        // 23: integrity constraint violation; 22: data exception.
        "23" | "22" => StoreError::NotFound(format!("conflicts with stored data: {text}")),
        // XX: internal error (data corrupted).
        "XX" => StoreError::Corrupt(text),
        _ => StoreError::Unavailable(text),
    }
}

/// Errors that mean the connection is unusable: closed, or the server ending the session
/// (class 57P: shutdown or termination by an administrator; class 08: connection exception).
fn connection_lost(error: &tokio_postgres::Error) -> bool {
    if error.is_closed() {
        return true;
    }
    match error.code() {
        Some(code) => code.code().starts_with("57P") || code.code().starts_with("08"),
        None => false,
    }
}

fn connect_error(target: &str, error: &tokio_postgres::Error) -> StoreError {
    let reason = match error.as_db_error() {
        Some(db) => db.message().to_owned(),
        None => {
            // The I/O cause ("Connection refused") is the useful part.
            let mut reason = error.to_string();
            let mut source = std::error::Error::source(error);
            while let Some(cause) = source {
                reason = format!("{reason}: {cause}");
                source = cause.source();
            }
            reason
        }
    };
    StoreError::Unavailable(format!("cannot connect to {target}: {reason}"))
}

fn pool_error(target: &str, error: deadpool_postgres::PoolError) -> StoreError {
    match error {
        deadpool_postgres::PoolError::Backend(error) => connect_error(target, &error),
        deadpool_postgres::PoolError::Timeout(kind) => {
            StoreError::Unavailable(format!("cannot connect to {target}: timed out ({kind:?})"))
        }
        other => StoreError::Unavailable(format!("cannot connect to {target}: {other}")),
    }
}

// ---------------------------------------------------------------------------------------------
// Migrations

/// Creates the schema and applies the migrations it lacks, each in its own transaction under an
/// advisory lock (per schema), so instances starting together migrate once, one after the other.
/// Refuses a schema written by a newer binary.
async fn migrate(client: &mut deadpool_postgres::Client, schema: &str) -> Result<(), Failure> {
    let lock_key = format!("switchboard migrations {schema}");
    for (version, sql) in MIGRATIONS {
        let tx = client.transaction().await?;
        // Another instance may be migrating: wait for it (much longer than a write would).
        tx.batch_execute("SET LOCAL lock_timeout = '300s'").await?;
        tx.execute("SELECT pg_advisory_xact_lock(hashtext($1))", &[&lock_key])
            .await?;
        tx.batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS {schema};
             CREATE TABLE IF NOT EXISTS {schema}.schema_migrations (
                 version     BIGINT PRIMARY KEY,
                 applied_at  TIMESTAMPTZ NOT NULL DEFAULT now()
             )"
        ))
        .await?;
        let current: i64 = tx
            .query_one(
                &format!("SELECT COALESCE(MAX(version), 0) FROM {schema}.schema_migrations"),
                &[],
            )
            .await?
            .try_get(0)?;
        if current > SCHEMA_VERSION {
            return Err(Failure::Store(StoreError::Unavailable(format!(
                "the database schema is version {current} but this switchboard only knows \
                 versions up to {SCHEMA_VERSION}: it was written by a newer release; upgrade \
                 switchboard or restore a backup"
            ))));
        }
        if *version > current {
            tx.batch_execute(&format!("SET LOCAL search_path = {schema}; {sql}"))
                .await
                .map_err(|error| {
                    Failure::Store(prefix_error(
                        postgres_error(&error),
                        &format!("schema migration {version}"),
                    ))
                })?;
            tx.execute(
                &format!("INSERT INTO {schema}.schema_migrations (version) VALUES ($1)"),
                &[version],
            )
            .await?;
        }
        tx.commit().await?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The writer

/// A write as queued for the writer: owned data, so a write PostgreSQL aborted (deadlock) can run
/// again.
#[derive(Debug)]
enum Write {
    Ingest(Box<EncodedIngest>),
    Routing(Arc<RoutingWrite>),
    Reply(Box<NewReply>, Vec<NewEvent>),
    Delivery(Box<DeliveryUpdate>),
    Park(Box<ParkedStatus>, i64),
    Rate(Box<Rating>, Vec<NewEvent>),
    MarkSent(Vec<i64>),
    /// Every unsent event marked sent (no broker to publish to).
    SkipPending,
    Probe,
    Command(Box<ForwardedCommand>),
    Answer(Ulid, serde_json::Value),
}

#[derive(Debug)]
enum Written {
    Ingest(IngestOutcome),
    Done,
    Delivery(DeliveryRecorded),
    /// Whether a provider status was parked (false: a reply has its id by now).
    Parked(bool),
    /// Whether a forwarded command's answer was stored (false: it had one already).
    Answered(bool),
    /// Whether a rating was stored (false: the conversation had one already).
    Rated(bool),
}

struct Job {
    write: Write,
    reply: oneshot::Sender<Result<Written, StoreError>>,
}

impl Job {
    fn finish(self, outcome: Result<Written, StoreError>) {
        // A caller that stopped waiting does not undo the write: it is committed either way.
        let _ = self.reply.send(outcome);
    }
}

async fn run_writer(
    pool: Pool,
    mut receiver: mpsc::UnboundedReceiver<Job>,
    max_batch: usize,
    counters: Arc<Counters>,
    schema: Arc<str>,
) {
    // Returns when every sender is gone and the queue is empty, so everything queued before
    // close/drop is committed.
    while let Some(first) = receiver.recv().await {
        let mut batch = Vec::with_capacity(max_batch);
        batch.push(first);
        while batch.len() < max_batch {
            match receiver.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        run_batch(&pool, batch, &counters, &schema).await;
    }
}

/// The savepoint each write runs in.
const SAVEPOINT: &str = "request";

/// Runs one batch in one transaction, one savepoint per write, and answers every caller.
async fn run_batch(pool: &Pool, batch: Vec<Job>, counters: &Counters, schema: &str) {
    let fail_all = |batch: Vec<Job>, message: String| {
        counters.failed_batches.fetch_add(1, Ordering::Relaxed);
        for job in batch {
            job.finish(Err(StoreError::Unavailable(message.clone())));
        }
    };
    let client = match begin(pool).await {
        Ok(client) => client,
        Err(error) => return fail_all(batch, error.to_string()),
    };
    let mut done: Vec<(Job, Result<Written, StoreError>)> = Vec::with_capacity(batch.len());
    // Whether the savepoint holds a successful write that must be released before the next one.
    let mut release = false;
    // Notifications to send with the commit (PostgreSQL delivers them only if it commits).
    let mut wake: BTreeSet<String> = BTreeSet::new();
    let mut jobs = batch.into_iter();
    while let Some(job) = jobs.next() {
        let open = if release {
            "RELEASE request; SAVEPOINT request"
        } else {
            "SAVEPOINT request"
        };
        // The savepoint travels in the same round trip as the write's first statement (a
        // connection sends requests in the order they are made). If it failed, the write did not
        // run inside it, and the whole batch is given up.
        let (opened, first) =
            tokio::join!(client.batch_execute(open), run_write(&client, &job.write));
        if let Err(error) = opened {
            let reason = format!("cannot start a savepoint: {}", postgres_error(&error));
            let mut lost: Vec<Job> = vec![job];
            lost.extend(jobs);
            abandon(client, &mut done, &reason).await;
            return fail_all(lost, reason);
        }
        let mut attempt = 0;
        let mut outcome = first;
        let outcome = loop {
            match outcome {
                Err(failure) if failure.is_retryable() && attempt < DEADLOCK_RETRIES => {
                    attempt += 1;
                    if client.batch_execute("ROLLBACK TO request").await.is_err() {
                        break Err(failure);
                    }
                    outcome = run_write(&client, &job.write).await;
                }
                other => break other,
            }
        };
        match outcome {
            Ok(written) => {
                release = true;
                wake.extend(wakeup_payloads(&job.write, &written));
                done.push((job, Ok(written)));
            }
            Err(failure) => {
                // Undo this write alone; the savepoint stays, ready for the next write.
                if let Err(error) = client.batch_execute("ROLLBACK TO request").await {
                    let reason = format!("cannot roll back a request: {}", postgres_error(&error));
                    job.finish(Err(failure.into_store()));
                    let lost: Vec<Job> = jobs.collect();
                    abandon(client, &mut done, &reason).await;
                    return fail_all(lost, reason);
                }
                release = false;
                done.push((job, Err(failure.into_store())));
            }
        }
    }
    if !wake.is_empty() {
        // Payloads are the schema (a plain identifier) and fixed words or ULIDs: nothing to quote.
        let notify: String = wake
            .iter()
            .map(|payload| format!("NOTIFY {NOTIFY_CHANNEL}, '{schema}|{payload}';"))
            .collect();
        if let Err(error) = client.batch_execute(&notify).await {
            let reason = format!("cannot notify: {}", postgres_error(&error));
            abandon(client, &mut done, &reason).await;
            counters.failed_batches.fetch_add(1, Ordering::Relaxed);
            return;
        }
    }
    match client.batch_execute("COMMIT").await {
        Ok(()) => {
            counters.commits.fetch_add(1, Ordering::Relaxed);
            counters
                .requests
                .fetch_add(done.len() as u64, Ordering::Relaxed);
            for (job, outcome) in done {
                job.finish(outcome);
            }
        }
        Err(error) => {
            let reason = format!("commit failed: {}", postgres_error(&error));
            abandon(client, &mut done, &reason).await;
            counters.failed_batches.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A live pooled connection with a transaction begun.
async fn begin(pool: &Pool) -> Result<deadpool_postgres::Client, StoreError> {
    // A connection cut while idle in the pool fails at BEGIN, before anything was written, so
    // another connection may be tried.
    for _ in 0..=pool.status().max_size {
        let client = live_client(pool, "PostgreSQL").await?;
        match client.batch_execute("BEGIN").await {
            Ok(()) => return Ok(client),
            Err(error) if client.is_closed() || connection_lost(&error) => {
                drop(deadpool_postgres::Object::take(client));
            }
            Err(error) => {
                return Err(prefix_error(
                    postgres_error(&error),
                    "cannot start a transaction",
                ));
            }
        }
    }
    Err(StoreError::Unavailable(
        "cannot start a transaction: every connection was closed by the server".into(),
    ))
}

/// Rolls the transaction back and fails every write it held (writes that failed on their own keep
/// their own error). The connection is not reused: its state is unknown.
async fn abandon(
    client: deadpool_postgres::Client,
    done: &mut Vec<(Job, Result<Written, StoreError>)>,
    reason: &str,
) {
    let _ = client.batch_execute("ROLLBACK").await;
    drop(deadpool_postgres::Object::take(client));
    for (job, outcome) in done.drain(..) {
        match outcome {
            Ok(_) => job.finish(Err(StoreError::Unavailable(format!(
                "the batch was rolled back: {reason}"
            )))),
            Err(error) => job.finish(Err(error)),
        }
    }
}

async fn run_write(client: &Client, write: &Write) -> Result<Written, Failure> {
    match write {
        Write::Ingest(request) => ingest_tx(client, request).await.map(Written::Ingest),
        Write::Routing(write) => apply_routing_tx(client, write)
            .await
            .map(|()| Written::Done),
        Write::Reply(reply, events) => store_reply_tx(client, reply, events)
            .await
            .map(|()| Written::Done),
        Write::Delivery(update) => set_delivery_status_tx(client, update)
            .await
            .map(Written::Delivery),
        Write::Park(status, received_at) => park_delivery_status_tx(client, status, *received_at)
            .await
            .map(Written::Parked),
        Write::Rate(rating, events) => rate_tx(client, rating, events).await.map(Written::Rated),
        Write::MarkSent(positions) => {
            let statement = client
                .prepare_cached(
                    "UPDATE outbox SET sent_at = $2 WHERE position = ANY($1) AND sent_at IS NULL",
                )
                .await?;
            client
                .execute(&statement, &[positions, &nanos(&Utc::now())?])
                .await?;
            Ok(Written::Done)
        }
        Write::SkipPending => {
            // Events of transactions still running commit unsent and are skipped next time.
            let statement = client
                .prepare_cached("UPDATE outbox SET sent_at = $1 WHERE sent_at IS NULL")
                .await?;
            client.execute(&statement, &[&nanos(&Utc::now())?]).await?;
            Ok(Written::Done)
        }
        Write::Probe => {
            let statement = client
                .prepare_cached(
                    "INSERT INTO write_probe (id, checked_at) VALUES (1, $1)
                     ON CONFLICT (id) DO UPDATE SET checked_at = excluded.checked_at",
                )
                .await?;
            client.execute(&statement, &[&nanos(&Utc::now())?]).await?;
            Ok(Written::Done)
        }
        Write::Command(command) => {
            let statement = client
                .prepare_cached(
                    "INSERT INTO agent_commands (id, node_id, agent_id, command) VALUES ($1, $2, $3, $4)",
                )
                .await?;
            client
                .execute(
                    &statement,
                    &[
                        &command.id.to_string(),
                        &command.node,
                        &command.agent_id,
                        &Json(&command.command),
                    ],
                )
                .await?;
            Ok(Written::Done)
        }
        Write::Answer(id, answer) => {
            let statement = client
                .prepare_cached(
                    "UPDATE agent_commands SET answer = $2, answered_at = now()
                     WHERE id = $1 AND answer IS NULL",
                )
                .await?;
            let changed = client
                .execute(&statement, &[&id.to_string(), &Json(answer)])
                .await?;
            Ok(Written::Answered(changed == 1))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Encodings

/// Nanoseconds since the Unix epoch: how timestamps are stored (exact round trips).
fn nanos(time: &DateTime<Utc>) -> Result<i64, StoreError> {
    time.timestamp_nanos_opt()
        .ok_or_else(|| StoreError::NotFound(format!("time {time} is out of range (1677..2262)")))
}

/// [`Store::events_after`]: the events of transactions older than every one running now.
async fn read_events_after(
    client: &Client,
    cursor: EventCursor,
    limit: i64,
) -> Result<EventsPage, Failure> {
    let statement = client
        .prepare_cached("SELECT pg_snapshot_xmin(pg_current_snapshot())::text")
        .await?;
    // Every transaction below the horizon has ended, so none of them can add an event later.
    let horizon: String = column(&client.query_one(&statement, &[]).await?, 0)?;
    let transaction = cursor.transaction.to_string();
    let statement = client
        .prepare_cached(
            "SELECT position, event_id, kind, conversation_id, seq, data, time, txid::text
             FROM outbox
             WHERE (txid, position) > ($1::text::xid8, $2) AND txid < $3::text::xid8
             ORDER BY txid, position LIMIT $4",
        )
        .await?;
    let rows = client
        .query(
            &statement,
            &[&transaction, &cursor.position, &horizon, &limit],
        )
        .await?;
    let mut next = cursor;
    let mut events = Vec::with_capacity(rows.len());
    for row in &rows {
        events.push(decode_outbox_event(row)?);
        next = EventCursor {
            transaction: parse_transaction(column(row, 7)?)?,
            position: column(row, 0)?,
        };
    }
    let statement = client
        .prepare_cached(
            "SELECT EXISTS (SELECT 1 FROM outbox
                            WHERE (txid, position) > ($1::text::xid8, $2)
                              AND txid >= $3::text::xid8)",
        )
        .await?;
    let held_back = client
        .query_one(&statement, &[&transaction, &cursor.position, &horizon])
        .await?;
    Ok(EventsPage {
        events,
        next,
        held_back: column(&held_back, 0)?,
    })
}

/// A transaction id as PostgreSQL prints an `xid8`.
fn parse_transaction(text: &str) -> Result<u64, StoreError> {
    text.parse()
        .map_err(|_| StoreError::Corrupt(format!("bad transaction id {text:?}")))
}

/// An outbox row read as `position, event_id, kind, conversation_id, seq, data, time`.
fn decode_outbox_event(row: &Row) -> Result<OutboxEvent, StoreError> {
    Ok(OutboxEvent {
        position: column(row, 0)?,
        event_id: parse_ulid(column(row, 1)?)?,
        kind: column(row, 2)?,
        conversation_id: column::<Option<&str>>(row, 3)?
            .map(parse_ulid)
            .transpose()?,
        seq: to_u64(column(row, 4)?, "seq")?,
        data: column::<Json<serde_json::Value>>(row, 5)?.0,
        time: from_nanos(column(row, 6)?),
    })
}

fn from_nanos(value: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_nanos(value)
}

fn column<'r, T: tokio_postgres::types::FromSql<'r>>(
    row: &'r Row,
    index: usize,
) -> Result<T, StoreError> {
    row.try_get(index)
        .map_err(|error| StoreError::Corrupt(format!("column {index}: {error}")))
}

const MESSAGE_COLUMNS: &str = "id, conversation_id, direction, channel, provider, \
     provider_message_id, from_address, to_address, body, created_at, delivery_status, agent_id";

fn decode_message(row: &Row) -> Result<StoredMessage, StoreError> {
    let direction = match column::<&str>(row, 2)? {
        "inbound" => Direction::Inbound,
        "outbound" => Direction::Outbound,
        other => return Err(StoreError::Corrupt(format!("bad direction {other:?}"))),
    };
    Ok(StoredMessage {
        id: parse_ulid(column(row, 0)?)?,
        conversation_id: parse_ulid(column(row, 1)?)?,
        direction,
        channel: column(row, 3)?,
        provider: column(row, 4)?,
        provider_message_id: column(row, 5)?,
        from_address: column(row, 6)?,
        to_address: column(row, 7)?,
        body: column::<Json<serde_json::Value>>(row, 8)?.0,
        created_at: from_nanos(column(row, 9)?),
        delivery_status: column(row, 10)?,
        agent_id: column(row, 11)?,
    })
}

/// After [`MESSAGE_COLUMNS`] for an unrouted message: its conversation's contact, and whether the
/// conversation was never routed (no routing document yet).
const UNROUTED_COLUMNS: &str = "(SELECT contact_id FROM conversations c WHERE c.id = messages.conversation_id), \
     (SELECT routing_state IS NULL FROM conversations c WHERE c.id = messages.conversation_id)";

fn decode_unrouted(row: &Row) -> Result<UnroutedMessage, StoreError> {
    Ok(UnroutedMessage {
        message: decode_message(row)?,
        contact_id: parse_ulid(column(row, 12)?)?,
        new_conversation: column(row, 13)?,
    })
}

const CONVERSATION_COLUMNS: &str = "id, contact_id, status, channel, reply_channel, \
     reply_provider, reply_customer_address, reply_our_address, reply_thread_key, subject, \
     created_at, updated_at, routing_state, event_seq";

fn decode_conversation(row: &Row) -> Result<ConversationRecord, StoreError> {
    Ok(ConversationRecord {
        id: parse_ulid(column(row, 0)?)?,
        contact_id: parse_ulid(column(row, 1)?)?,
        status: parse_status(column(row, 2)?)?,
        channel: column(row, 3)?,
        reply_route: ReplyRoute {
            channel: column(row, 4)?,
            provider: column(row, 5)?,
            customer_address: column(row, 6)?,
            our_address: column(row, 7)?,
            thread_key: column(row, 8)?,
        },
        subject: column(row, 9)?,
        created_at: from_nanos(column(row, 10)?),
        updated_at: from_nanos(column(row, 11)?),
        routing_state: column::<Option<Json<serde_json::Value>>>(row, 12)?.map(|json| json.0),
        event_seq: to_u64(column(row, 13)?, "event_seq")?,
    })
}

// ---------------------------------------------------------------------------------------------
// Write transactions (run by the writer, inside the savepoint)

/// An inbound message with its PostgreSQL encodings worked out on the caller's task, so the writer
/// only runs SQL.
#[derive(Debug)]
struct EncodedIngest {
    request: IngestRequest,
    message_id: String,
    identity_kinds: Vec<String>,
    identity_values: Vec<String>,
    message_time: i64,
    intake_time: i64,
}

impl EncodedIngest {
    fn new(request: IngestRequest) -> Result<EncodedIngest, StoreError> {
        let (identity_kinds, identity_values) = request
            .identities
            .iter()
            .map(|identity| (identity.kind.clone(), identity.value.clone()))
            .unzip();
        Ok(EncodedIngest {
            message_id: request.message_id.to_string(),
            identity_kinds,
            identity_values,
            message_time: nanos(&request.message_time)?,
            intake_time: nanos(&request.intake_time)?,
            request,
        })
    }
}

/// What one round trip finds about an inbound message: an earlier copy, the contacts owning its
/// identities, and its thread's conversation.
///
/// Each identity is looked up on its own (`LATERAL ... OFFSET 0` keeps the planner from turning it
/// into a join): a cached generic plan made while `identity_links` was small would otherwise hash
/// its whole table for every message, however large it grew.
const INGEST_LOOKUP: &str = "
    SELECT 0 AS found, m.id::text AS a, m.conversation_id::text AS b, NULL::text AS c, 0::bigint AS created
      FROM messages m WHERE m.channel = $1 AND m.provider_message_id = $2
    UNION ALL
    SELECT 1, c.id::text, l.kind, l.value, c.created_at
      FROM unnest($3::text[], $4::text[]) AS i (kind, value)
      CROSS JOIN LATERAL (SELECT kind, value, contact_id FROM identity_links
                           WHERE kind = i.kind AND value = i.value OFFSET 0) AS l
      JOIN contacts c ON c.id = l.contact_id
    UNION ALL
    SELECT 2, c.id::text, c.status, NULL, 0
      FROM conversation_threads t JOIN conversations c ON c.id = t.conversation_id
     WHERE t.channel = $1 AND t.thread_key = $5";

/// Creates a contact and links the given identities to it; returns the identities it got (another
/// instance may have linked some of them meanwhile).
const CREATE_CONTACT: &str = "
    WITH contact AS (
        INSERT INTO contacts (id, name, tier, language, created_at, updated_at)
        VALUES ($1, $2, $3, $4, $5, $5)
    )
    INSERT INTO identity_links (kind, value, contact_id, created_at)
    SELECT kind, value, $1, $5 FROM unnest($6::text[], $7::text[]) AS i (kind, value)
    ON CONFLICT (kind, value) DO NOTHING
    RETURNING kind";

/// Locks an existing contact (serialising conversation matching for it across instances), applies
/// the latest hints and links the identities that were not linked yet.
const UPDATE_CONTACT: &str = "
    WITH linked AS (
        INSERT INTO identity_links (kind, value, contact_id, created_at)
        SELECT kind, value, $1, $5 FROM unnest($6::text[], $7::text[]) AS i (kind, value)
        ON CONFLICT (kind, value) DO NOTHING
    )
    UPDATE contacts SET
        name = COALESCE($2, name), tier = COALESCE($3, tier), language = COALESCE($4, language),
        updated_at = CASE WHEN $2::text IS NULL AND $3::text IS NULL AND $4::text IS NULL
                          THEN updated_at ELSE $5 END
    WHERE id = $1
    RETURNING id";

const CONTACT_CONVERSATION: &str = "
    SELECT id FROM conversations WHERE contact_id = $1 AND status <> 'closed'
    ORDER BY updated_at DESC, id DESC LIMIT 1";

/// The rest of [`JOIN_CONVERSATION`] and [`NEW_CONVERSATION`] after the `conversation` CTE: points
/// the thread at the conversation (if `$9`) and stores the message unless another instance stored
/// it first. Returns (conversations found, messages stored).
macro_rules! thread_and_message {
    () => {
        "
    ), thread AS (
        INSERT INTO conversation_threads (channel, thread_key, conversation_id)
        SELECT $2, $6, id FROM conversation WHERE $9
        ON CONFLICT (channel, thread_key) DO UPDATE SET conversation_id = excluded.conversation_id
    ), message AS (
        INSERT INTO messages (id, conversation_id, direction, channel, provider,
                              provider_message_id, thread_key, from_address, to_address, body,
                              created_at)
        SELECT $10, id, 'inbound', $2, $3, $11, $6, $4, $5, $12::text::json, $13 FROM conversation
        ON CONFLICT (channel, provider_message_id) DO NOTHING
        RETURNING id
    )
    SELECT (SELECT count(*) FROM conversation), (SELECT count(*) FROM message)"
    };
}

/// Joins a live conversation: updates its reply route, points the thread at it (`$9`), stores the
/// message. Returns (conversation still live, message stored).
const JOIN_CONVERSATION: &str = concat!(
    "
    WITH conversation AS (
        UPDATE conversations SET
            reply_channel = $2, reply_provider = $3, reply_customer_address = $4,
            reply_our_address = $5, reply_thread_key = $6, subject = COALESCE(subject, $7),
            updated_at = GREATEST(updated_at, $8)
        WHERE id = $1 AND status <> 'closed'
        RETURNING id
",
    thread_and_message!()
);

/// Starts a conversation: the conversation, its thread, the message. Returns (1, message stored).
const NEW_CONVERSATION: &str = concat!(
    "
    WITH conversation AS (
        INSERT INTO conversations (id, contact_id, status, channel, reply_channel, reply_provider,
                                   reply_customer_address, reply_our_address, reply_thread_key,
                                   subject, created_at, updated_at)
        VALUES ($1, $14, 'open', $2, $2, $3, $4, $5, $6, $7, $8, $8)
        RETURNING id
",
    thread_and_message!()
);

/// What the lookup found.
#[derive(Default)]
struct Lookup {
    duplicate: Option<(String, String)>,
    /// Contacts owning one of the identities: (created_at, id), oldest first.
    owners: BTreeSet<(i64, String)>,
    linked: BTreeSet<(String, String)>,
    /// The thread's conversation, if it is not closed.
    thread_conversation: Option<String>,
}

async fn lookup(client: &Client, request: &EncodedIngest) -> Result<Lookup, Failure> {
    let statement = client.prepare_cached(INGEST_LOOKUP).await?;
    let rows = client
        .query(
            &statement,
            &[
                &request.request.channel,
                &request.request.provider_message_id,
                &request.identity_kinds,
                &request.identity_values,
                &request.request.thread_key,
            ],
        )
        .await?;
    let mut found = Lookup::default();
    for row in &rows {
        let a: String = column(row, 1)?;
        let b: Option<String> = column(row, 2)?;
        match column::<i32>(row, 0)? {
            0 => found.duplicate = Some((a, b.unwrap_or_default())),
            1 => {
                found.owners.insert((column(row, 4)?, a));
                let value: Option<String> = column(row, 3)?;
                found
                    .linked
                    .insert((b.unwrap_or_default(), value.unwrap_or_default()));
            }
            _ => {
                if parse_status(b.as_deref().unwrap_or_default())? != ConversationStatus::Closed {
                    found.thread_conversation = Some(a);
                }
            }
        }
    }
    Ok(found)
}

/// A message that another instance stored while this one was storing it: undo this copy.
async fn concurrent_duplicate(
    client: &Client,
    request: &EncodedIngest,
) -> Result<IngestOutcome, Failure> {
    client
        .batch_execute(&format!("ROLLBACK TO {SAVEPOINT}"))
        .await?;
    let found = lookup(client, request).await?;
    let (message_id, conversation_id) = found.duplicate.ok_or_else(|| {
        StoreError::Unavailable("a concurrent copy of the message vanished".into())
    })?;
    Ok(IngestOutcome::Duplicate {
        message_id: parse_ulid(&message_id)?,
        conversation_id: parse_ulid(&conversation_id)?,
    })
}

async fn ingest_tx(client: &Client, request: &EncodedIngest) -> Result<IngestOutcome, Failure> {
    // Another instance may link this customer's identities between our lookup and our insert; then
    // our new contact is withdrawn and the lookup repeated (it sees their commit).
    for _ in 0..3 {
        let found = lookup(client, request).await?;
        if let Some((message_id, conversation_id)) = found.duplicate {
            return Ok(IngestOutcome::Duplicate {
                message_id: parse_ulid(&message_id)?,
                conversation_id: parse_ulid(&conversation_id)?,
            });
        }
        let unlinked: (Vec<&String>, Vec<&String>) = request
            .identity_kinds
            .iter()
            .zip(&request.identity_values)
            .filter(|(kind, value)| !found.linked.contains(&((*kind).clone(), (*value).clone())))
            .unzip();
        let hints: [&(dyn ToSql + Sync); 4] = [
            &request.request.name,
            &request.request.tier,
            &request.request.language,
            &request.intake_time,
        ];
        let (contact_id, new_contact) = match found.owners.first() {
            Some((_, oldest)) => {
                let statement = client.prepare_cached(UPDATE_CONTACT).await?;
                let rows = client
                    .query(
                        &statement,
                        &[
                            oldest,
                            hints[0],
                            hints[1],
                            hints[2],
                            hints[3],
                            &unlinked.0,
                            &unlinked.1,
                        ],
                    )
                    .await?;
                if rows.is_empty() {
                    return Err(StoreError::Corrupt(format!("contact {oldest} vanished")).into());
                }
                (oldest.clone(), false)
            }
            None => {
                let id = Ulid::new().to_string();
                let statement = client.prepare_cached(CREATE_CONTACT).await?;
                let rows = client
                    .query(
                        &statement,
                        &[
                            &id,
                            hints[0],
                            hints[1],
                            hints[2],
                            hints[3],
                            &unlinked.0,
                            &unlinked.1,
                        ],
                    )
                    .await?;
                if rows.len() < unlinked.0.len() {
                    let statement = client
                        .prepare_cached(
                            "WITH links AS (DELETE FROM identity_links WHERE contact_id = $1)
                             DELETE FROM contacts WHERE id = $1",
                        )
                        .await?;
                    client.execute(&statement, &[&id]).await?;
                    continue;
                }
                (id, true)
            }
        };
        let outcome =
            store_in_conversation(client, request, &found, &contact_id, new_contact).await?;
        if matches!(outcome, IngestOutcome::Stored { .. }) {
            store_attachments(client, request).await?;
        }
        return Ok(outcome);
    }
    Err(StoreError::Unavailable(
        "the customer's identities kept changing under concurrent writes; retry".into(),
    )
    .into())
}

/// The message's attachments' contents, once per content, in the message's transaction.
async fn store_attachments(client: &Client, request: &EncodedIngest) -> Result<(), Failure> {
    let attachments = &request.request.attachments;
    if attachments.is_empty() {
        return Ok(());
    }
    let names: Vec<&str> = attachments.iter().map(AttachmentContent::sha256).collect();
    let contents: Vec<&[u8]> = attachments.iter().map(AttachmentContent::content).collect();
    let statement = client
        .prepare_cached(
            "INSERT INTO attachments (sha256, size, content, created_at)
             SELECT name, octet_length(content), content, $3
             FROM unnest($1::text[], $2::bytea[]) AS a (name, content)
             ON CONFLICT (sha256) DO NOTHING",
        )
        .await?;
    client
        .execute(&statement, &[&names, &contents, &request.intake_time])
        .await?;
    Ok(())
}

async fn store_in_conversation(
    client: &Client,
    request: &EncodedIngest,
    found: &Lookup,
    contact_id: &str,
    new_contact: bool,
) -> Result<IngestOutcome, Failure> {
    let mut thread_conversation = found.thread_conversation.clone();
    loop {
        let thread_matched = thread_conversation.is_some();
        let existing = match thread_conversation.take() {
            Some(id) => Some(id),
            None if new_contact => None,
            None => {
                let statement = client.prepare_cached(CONTACT_CONVERSATION).await?;
                client
                    .query_opt(&statement, &[&contact_id])
                    .await?
                    .map(|row| column::<String>(&row, 0))
                    .transpose()?
            }
        };
        let new_id = Ulid::new().to_string();
        let (sql, conversation_id) = match &existing {
            Some(id) => (JOIN_CONVERSATION, id.as_str()),
            None => (NEW_CONVERSATION, new_id.as_str()),
        };
        let point_thread = !thread_matched;
        let mut params: Vec<&(dyn ToSql + Sync)> = vec![
            &conversation_id,
            &request.request.channel,
            &request.request.provider,
            &request.request.from_address,
            &request.request.to_address,
            &request.request.thread_key,
            &request.request.subject,
            &request.intake_time,
            &point_thread,
            &request.message_id,
            &request.request.provider_message_id,
            &request.request.body,
            &request.message_time,
        ];
        if existing.is_none() {
            params.push(&contact_id);
        }
        let statement = client.prepare_cached(sql).await?;
        let row = client.query_one(&statement, &params).await?;
        let (conversations, messages): (i64, i64) = (column(&row, 0)?, column(&row, 1)?);
        if conversations == 0 {
            // Closed by the router since the lookup: match again without it.
            continue;
        }
        if messages == 0 {
            return concurrent_duplicate(client, request).await;
        }
        return Ok(IngestOutcome::Stored {
            message_id: parse_ulid(&request.message_id)?,
            conversation_id: parse_ulid(conversation_id)?,
            contact_id: parse_ulid(contact_id)?,
            new_conversation: existing.is_none(),
        });
    }
}

/// Appends events to the outbox, numbering each conversation's events 1, 2, 3... in order: two
/// statements however many events.
async fn append_events(client: &Client, events: &[NewEvent]) -> Result<(), Failure> {
    if events.is_empty() {
        return Ok(());
    }
    // How many events each conversation gets, in first-seen order.
    let mut counts: BTreeMap<Ulid, i64> = BTreeMap::new();
    for event in events {
        if let Some(id) = event.conversation_id {
            *counts.entry(id).or_default() += 1;
        }
    }
    let mut next_seq: HashMap<Ulid, i64> = HashMap::new();
    if !counts.is_empty() {
        let ids: Vec<String> = counts.keys().map(Ulid::to_string).collect();
        let added: Vec<i64> = counts.values().copied().collect();
        let statement = client
            .prepare_cached(
                "UPDATE conversations c SET event_seq = c.event_seq + u.added
                 FROM unnest($1::text[], $2::bigint[]) AS u (id, added)
                 WHERE c.id = u.id
                 RETURNING c.id::text, c.event_seq",
            )
            .await?;
        for row in client.query(&statement, &[&ids, &added]).await? {
            let id = parse_ulid(column(&row, 0)?)?;
            let last: i64 = column(&row, 1)?;
            next_seq.insert(id, last - counts.get(&id).copied().unwrap_or(0) + 1);
        }
        if let Some(event) = events.iter().find(|event| {
            event
                .conversation_id
                .is_some_and(|id| !next_seq.contains_key(&id))
        }) {
            return Err(StoreError::NotFound(format!(
                "event {} names unknown conversation {}",
                event.event_id,
                event
                    .conversation_id
                    .map(|id| id.to_string())
                    .unwrap_or_default()
            ))
            .into());
        }
    }
    let mut event_ids = Vec::with_capacity(events.len());
    let mut kinds = Vec::with_capacity(events.len());
    let mut conversations = Vec::with_capacity(events.len());
    let mut seqs = Vec::with_capacity(events.len());
    let mut data = Vec::with_capacity(events.len());
    let mut times = Vec::with_capacity(events.len());
    for event in events {
        let seq = match event.conversation_id.and_then(|id| next_seq.get_mut(&id)) {
            Some(next) => {
                *next += 1;
                *next - 1
            }
            None => 0,
        };
        event_ids.push(event.event_id.to_string());
        kinds.push(event.kind.as_str());
        conversations.push(event.conversation_id.map(|id| id.to_string()));
        seqs.push(seq);
        data.push(json_text(&event.data)?);
        times.push(nanos(&event.time)?);
    }
    let statement = client
        .prepare_cached(
            "INSERT INTO outbox (event_id, kind, conversation_id, seq, data, time)
             SELECT event_id, kind, conversation_id, seq, data::json, time
             FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::text[], $6::bigint[])
                  WITH ORDINALITY AS e (event_id, kind, conversation_id, seq, data, time, n)
             ORDER BY n",
        )
        .await?;
    client
        .execute(
            &statement,
            &[&event_ids, &kinds, &conversations, &seqs, &data, &times],
        )
        .await?;
    Ok(())
}

/// Refuses a write from a stale leader; records a newer epoch; counts the write (see
/// [`Store::routing_writes`]). The lease row stays locked until the commit, so a takeover waits
/// for this transaction, and the count it reads then includes every write of the old term.
async fn check_epoch(client: &Client, epoch: u64) -> Result<(), Failure> {
    let statement = client
        .prepare_cached(
            "UPDATE leadership SET routing_writes = routing_writes + 1 WHERE id = 1 RETURNING epoch",
        )
        .await?;
    let current: i64 = client
        .query_opt(&statement, &[])
        .await?
        .map(|row| column(&row, 0))
        .transpose()?
        .unwrap_or(0);
    let wanted = to_i64(epoch, "epoch")?;
    if wanted < current {
        return Err(StoreError::Fenced { epoch }.into());
    }
    if wanted > current {
        let statement = client
            .prepare_cached("UPDATE leadership SET epoch = $1, updated_at = now() WHERE id = 1")
            .await?;
        client.execute(&statement, &[&wanted]).await?;
    }
    Ok(())
}

/// Writes keyed state documents (agents', queues') with one statement `upsert` taking
/// `$1` keys, `$2` JSON texts and `$3` the time; the last document for a key wins.
async fn upsert_documents(
    client: &Client,
    upsert: &str,
    documents: &[(String, serde_json::Value)],
    now: i64,
) -> Result<(), Failure> {
    if documents.is_empty() {
        return Ok(());
    }
    let mut latest: BTreeMap<&str, String> = BTreeMap::new();
    for (key, state) in documents {
        latest.insert(key.as_str(), json_text(state)?);
    }
    let keys: Vec<&str> = latest.keys().copied().collect();
    let states: Vec<&String> = latest.values().collect();
    let statement = client.prepare_cached(upsert).await?;
    client.execute(&statement, &[&keys, &states, &now]).await?;
    Ok(())
}

async fn apply_routing_tx(client: &Client, write: &RoutingWrite) -> Result<(), Failure> {
    check_epoch(client, write.epoch).await?;
    let now = nanos(&Utc::now())?;
    let epoch = to_i64(write.epoch, "epoch")?;
    if !write.conversations.is_empty() {
        // One row per conversation, its last state winning (as if applied one after another).
        let mut latest: BTreeMap<String, (&'static str, String)> = BTreeMap::new();
        for (id, status, state) in &write.conversations {
            latest.insert(id.to_string(), (status.as_str(), json_text(state)?));
        }
        let ids: Vec<&String> = latest.keys().collect();
        let statuses: Vec<&str> = latest.values().map(|(status, _)| *status).collect();
        let states: Vec<&String> = latest.values().map(|(_, state)| state).collect();
        let statement = client
            .prepare_cached(
                "WITH input AS (
                     SELECT * FROM unnest($1::text[], $2::text[], $3::text[]) AS i (id, status, state)
                 ), changed AS (
                     UPDATE conversations c SET
                         status = i.status,
                         routing_state = i.state::json,
                         epoch = $4,
                         updated_at = GREATEST(c.updated_at, $5),
                         resolved_at = CASE WHEN i.status = 'resolved' AND c.status <> 'resolved'
                                            THEN $5 ELSE c.resolved_at END,
                         closed_at = CASE WHEN i.status = 'closed' AND c.status <> 'closed'
                                          THEN $5 ELSE c.closed_at END
                     FROM input i WHERE c.id = i.id
                     RETURNING c.id
                 ), unthreaded AS (
                     DELETE FROM conversation_threads t USING input i
                     WHERE t.conversation_id = i.id AND i.status = 'closed'
                 )
                 SELECT id FROM input WHERE id NOT IN (SELECT id FROM changed) ORDER BY id LIMIT 1",
            )
            .await?;
        if let Some(row) = client
            .query_opt(&statement, &[&ids, &statuses, &states, &epoch, &now])
            .await?
        {
            let id: String = column(&row, 0)?;
            return Err(StoreError::NotFound(format!("conversation {id}")).into());
        }
    }
    upsert_documents(
        client,
        "INSERT INTO agent_state (agent_id, state, updated_at)
         SELECT key, state::json, $3 FROM unnest($1::text[], $2::text[]) AS d (key, state)
         ON CONFLICT (agent_id) DO UPDATE SET state = excluded.state,
             updated_at = excluded.updated_at",
        &write.agents,
        now,
    )
    .await?;
    upsert_documents(
        client,
        "INSERT INTO queue_state (queue, state, updated_at)
         SELECT key, state::json, $3 FROM unnest($1::text[], $2::text[]) AS d (key, state)
         ON CONFLICT (queue) DO UPDATE SET state = excluded.state,
             updated_at = excluded.updated_at",
        &write.queues,
        now,
    )
    .await?;
    if !write.routed_messages.is_empty() {
        let ids: BTreeSet<String> = write.routed_messages.iter().map(Ulid::to_string).collect();
        let ids: Vec<String> = ids.into_iter().collect();
        let statement = client
            .prepare_cached(
                "WITH marked AS (
                     UPDATE messages SET routed = true
                     WHERE id = ANY($1) AND direction = 'inbound'
                     RETURNING id
                 )
                 SELECT id FROM unnest($1::text[]) AS i (id)
                 WHERE id NOT IN (SELECT id FROM marked) ORDER BY id LIMIT 1",
            )
            .await?;
        if let Some(row) = client.query_opt(&statement, &[&ids]).await? {
            let id: String = column(&row, 0)?;
            return Err(StoreError::NotFound(format!("inbound message {id}")).into());
        }
    }
    if !write.pushes.is_empty() {
        let agents: Vec<&str> = write
            .pushes
            .iter()
            .map(|push| push.agent_id.as_str())
            .collect();
        let documents = write
            .pushes
            .iter()
            .map(|push| json_text(&push.document))
            .collect::<Result<Vec<String>, StoreError>>()?;
        let statement = client
            .prepare_cached(
                "INSERT INTO agent_pushes (origin, agent_id, document)
                 SELECT $1, p.agent, p.document::json
                 FROM unnest($2::text[], $3::text[]) WITH ORDINALITY AS p (agent, document, n)
                 ORDER BY p.n",
            )
            .await?;
        client
            .execute(&statement, &[&write.node, &agents, &documents])
            .await?;
    }
    append_events(client, &write.events).await
}

async fn rate_tx(client: &Client, rating: &Rating, events: &[NewEvent]) -> Result<bool, Failure> {
    let statement = client
        .prepare_cached(
            "INSERT INTO ratings (conversation_id, score, comment, agent_id, rated_at)
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (conversation_id) DO NOTHING",
        )
        .await?;
    let inserted = client
        .execute(
            &statement,
            &[
                &rating.conversation_id.to_string(),
                &i16::from(rating.score),
                &rating.comment,
                &rating.agent_id,
                &nanos(&rating.rated_at)?,
            ],
        )
        .await?;
    if inserted == 0 {
        return Ok(false);
    }
    append_events(client, events).await?;
    Ok(true)
}

async fn store_reply_tx(
    client: &Client,
    reply: &NewReply,
    events: &[NewEvent],
) -> Result<(), Failure> {
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
    let statement = client
        .prepare_cached(
            "WITH conversation AS (
                 UPDATE conversations SET updated_at = GREATEST(updated_at, $9) WHERE id = $2
                 RETURNING id
             ), message AS (
                 INSERT INTO messages (
                     id, conversation_id, direction, channel, provider, provider_message_id,
                     thread_key, from_address, to_address, body, created_at, routed,
                     delivery_status, agent_id)
                 SELECT $1, id, 'outbound', $3, $4, NULL, $5, $6, $7, $8::text::json, $9, true,
                        'pending', $10
                 FROM conversation
                 RETURNING id
             )
             SELECT count(*) FROM message",
        )
        .await?;
    let row = client
        .query_one(
            &statement,
            &[
                &reply.id.to_string(),
                &reply.conversation_id.to_string(),
                &reply.route.channel,
                &reply.route.provider,
                &reply.route.thread_key,
                &reply.route.our_address,
                &reply.route.customer_address,
                &json_text(&body)?,
                &nanos(&reply.created_at)?,
                &reply.agent_id,
            ],
        )
        .await?;
    if column::<i64>(&row, 0)? == 0 {
        return Err(StoreError::NotFound(format!("conversation {}", reply.conversation_id)).into());
    }
    append_events(client, events).await
}

async fn set_delivery_status_tx(
    client: &Client,
    update: &DeliveryUpdate,
) -> Result<DeliveryRecorded, Failure> {
    let id = update.message_id.to_string();
    // A superseded status still brings the provider's id: later callbacks are found by it.
    let row = client
        .query_opt(
            "UPDATE messages SET provider_message_id = COALESCE(provider_message_id, $2)
             WHERE id = $1 AND direction = 'outbound' RETURNING channel",
            &[&id, &update.provider_message_id],
        )
        .await?;
    let Some(row) = row else {
        return Err(StoreError::NotFound(format!("outbound message {}", update.message_id)).into());
    };
    let channel: String = column(&row, 0)?;
    let outcome = if advance_status(client, &id, &update.status).await? {
        append_events(client, &update.events).await?;
        DeliveryOutcome::Applied
    } else {
        DeliveryOutcome::Superseded
    };
    let mut parked = None;
    if let Some(provider_id) = &update.provider_message_id {
        lock_provider_id(client, &channel, provider_id).await?;
        let waiting = client
            .query_opt(
                "DELETE FROM parked_delivery_statuses
                 WHERE channel = $1 AND provider_message_id = $2 RETURNING status, error",
                &[&channel, provider_id],
            )
            .await?;
        if let Some(waiting) = waiting {
            let (status, error): (String, Option<String>) =
                (column(&waiting, 0)?, column(&waiting, 1)?);
            if advance_status(client, &id, &status).await? {
                if status == "failed"
                    && let Some(event) = &update.parked_failure_event
                {
                    append_events(
                        client,
                        &[parked_failure_event(event.clone(), error.as_deref())],
                    )
                    .await?;
                }
                parked = Some(ParkedStatus {
                    channel,
                    provider_message_id: provider_id.clone(),
                    status,
                    error,
                });
            }
        }
    }
    Ok(DeliveryRecorded { outcome, parked })
}

/// Moves an outbound message's status to `status` if that is forward; true if it did.
async fn advance_status(client: &Client, id: &str, status: &str) -> Result<bool, Failure> {
    let statement = client
        .prepare_cached(&format!(
            "UPDATE messages SET delivery_status = $2
             WHERE id = $1 AND direction = 'outbound' AND {} < {}",
            status_rank_sql("COALESCE(delivery_status, 'pending')"),
            status_rank_sql("$2::text"),
        ))
        .await?;
    Ok(client.execute(&statement, &[&id, &status]).await? > 0)
}

/// Serialises, until commit, the writes that store a provider id and those that park a status
/// for it, across instances: under READ COMMITTED each would otherwise miss the other's
/// uncommitted row and the status would be lost.
async fn lock_provider_id(
    client: &Client,
    channel: &str,
    provider_id: &str,
) -> Result<(), Failure> {
    client
        .execute(
            "SELECT pg_advisory_xact_lock(hashtextextended($1 || E'\\n' || $2, 0))",
            &[&channel, &provider_id],
        )
        .await?;
    Ok(())
}

async fn park_delivery_status_tx(
    client: &Client,
    status: &ParkedStatus,
    received_at: i64,
) -> Result<bool, Failure> {
    lock_provider_id(client, &status.channel, &status.provider_message_id).await?;
    let known = client
        .query_opt(
            "SELECT 1 FROM messages
             WHERE channel = $1 AND provider_message_id = $2 AND direction = 'outbound'",
            &[&status.channel, &status.provider_message_id],
        )
        .await?
        .is_some();
    if known {
        return Ok(false);
    }
    client
        .execute(
            "DELETE FROM parked_delivery_statuses WHERE received_at < $1",
            &[&received_at.saturating_sub(PARKED_STATUS_TTL_NANOS)],
        )
        .await?;
    client
        .execute(
            &format!(
                "INSERT INTO parked_delivery_statuses
                     (channel, provider_message_id, status, error, received_at)
                 VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (channel, provider_message_id) DO UPDATE
                     SET status = excluded.status, error = excluded.error,
                         received_at = excluded.received_at
                     WHERE {} > {}",
                status_rank_sql("excluded.status"),
                status_rank_sql("parked_delivery_statuses.status"),
            ),
            &[
                &status.channel,
                &status.provider_message_id,
                &status.status,
                &status.error,
                &received_at,
            ],
        )
        .await?;
    Ok(true)
}

// ---------------------------------------------------------------------------------------------
// Reads

async fn list_conversations(
    client: &Client,
    filter: &ConversationFilter,
) -> Result<Vec<ConversationRecord>, Failure> {
    let mut sql = format!("SELECT {CONVERSATION_COLUMNS} FROM conversations WHERE true");
    let status = filter.status.map(ConversationStatus::as_str);
    let contact = filter.contact_id.map(|id| id.to_string());
    let before = filter.updated_before.as_ref().map(nanos).transpose()?;
    let limit = i64::try_from(filter.limit).unwrap_or(i64::MAX);
    let mut params: Vec<&(dyn ToSql + Sync)> = Vec::new();
    if let Some(status) = &status {
        params.push(status);
        sql.push_str(&format!(" AND status = ${}", params.len()));
    }
    if let Some(channel) = &filter.channel {
        params.push(channel);
        sql.push_str(&format!(" AND channel = ${}", params.len()));
    }
    if let Some(contact) = &contact {
        params.push(contact);
        sql.push_str(&format!(" AND contact_id = ${}", params.len()));
    }
    if let Some(before) = &before {
        params.push(before);
        sql.push_str(&format!(" AND updated_at < ${}", params.len()));
    }
    sql.push_str(" ORDER BY updated_at DESC, id DESC");
    // A limit of 0 means no limit (the admin API caps its pages itself).
    if filter.limit > 0 {
        params.push(&limit);
        sql.push_str(&format!(" LIMIT ${}", params.len()));
    }
    let statement = client.prepare_cached(&sql).await?;
    let rows = client.query(&statement, &params).await?;
    Ok(rows
        .iter()
        .map(decode_conversation)
        .collect::<Result<_, _>>()?)
}

/// The count of committed routing writes ([`Store::routing_writes`]); read once per takeover, so
/// not worth a cached statement (which would tie it to one of the pool's client types).
async fn read_routing_writes(client: &impl tokio_postgres::GenericClient) -> Result<u64, Failure> {
    let sql = "SELECT routing_writes FROM leadership WHERE id = 1";
    Ok(match client.query_opt(sql, &[]).await? {
        Some(row) => to_u64(column(&row, 0)?, "routing_writes")?,
        None => 0,
    })
}

async fn recovery_read(client: &mut deadpool_postgres::Client) -> Result<Recovery, Failure> {
    // One snapshot for all three reads, so they agree with each other.
    let tx = client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?;
    // Documents as the JSON text stored (`json` keeps it verbatim), parsed once by the caller.
    let statement = tx
        .prepare_cached(
            "SELECT id, routing_state::text FROM conversations
             WHERE status <> 'closed' AND routing_state IS NOT NULL ORDER BY id",
        )
        .await?;
    let conversations = tx
        .query(&statement, &[])
        .await?
        .iter()
        .map(|row| Ok((parse_ulid(column(row, 0)?)?, column(row, 1)?)))
        .collect::<Result<Vec<_>, StoreError>>()?;
    let mut documents = Vec::with_capacity(2);
    for sql in [
        "SELECT agent_id, state::text FROM agent_state ORDER BY agent_id",
        "SELECT queue, state::text FROM queue_state ORDER BY queue",
    ] {
        let statement = tx.prepare_cached(sql).await?;
        documents.push(
            tx.query(&statement, &[])
                .await?
                .iter()
                .map(|row| Ok((column(row, 0)?, column(row, 1)?)))
                .collect::<Result<Vec<(String, String)>, StoreError>>()?,
        );
    }
    let queues = documents.pop().unwrap_or_default();
    let agents = documents.pop().unwrap_or_default();
    // Storage order: the order in which the messages were acknowledged.
    let statement = tx
        .prepare_cached(&format!(
            "SELECT {MESSAGE_COLUMNS}, {UNROUTED_COLUMNS} FROM messages
             WHERE NOT routed AND direction = 'inbound' ORDER BY position"
        ))
        .await?;
    let unrouted = tx
        .query(&statement, &[])
        .await?
        .iter()
        .map(decode_unrouted)
        .collect::<Result<Vec<_>, StoreError>>()?;
    let routing_writes = read_routing_writes(&*tx).await?;
    tx.commit().await?;
    Ok(Recovery {
        conversations,
        agents,
        queues,
        unrouted,
        routing_writes: Some(routing_writes),
    })
}

// ---------------------------------------------------------------------------------------------
// The trait

#[async_trait]
impl Store for PostgresStore {
    async fn ingest(
        &self,
        message: InboundMessage,
        attachments: Vec<AttachmentContent>,
        received_at: DateTime<Utc>,
    ) -> Result<IngestOutcome, StoreError> {
        let request = EncodedIngest::new(IngestRequest::new(message, attachments, received_at)?)?;
        match self.write(Write::Ingest(Box::new(request))).await? {
            Written::Ingest(outcome) => Ok(outcome),
            other => Err(unexpected(&other)),
        }
    }

    async fn apply_routing(&self, write: Arc<RoutingWrite>) -> Result<(), StoreError> {
        self.write_done(Write::Routing(write)).await
    }

    async fn store_reply(&self, reply: NewReply, events: Vec<NewEvent>) -> Result<(), StoreError> {
        self.write_done(Write::Reply(Box::new(reply), events)).await
    }

    async fn set_delivery_status(
        &self,
        update: DeliveryUpdate,
    ) -> Result<DeliveryRecorded, StoreError> {
        match self.write(Write::Delivery(Box::new(update))).await? {
            Written::Delivery(recorded) => Ok(recorded),
            other => Err(unexpected(&other)),
        }
    }

    async fn park_delivery_status(
        &self,
        status: ParkedStatus,
        received_at: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let received_at = nanos(&received_at)?;
        match self
            .write(Write::Park(Box::new(status), received_at))
            .await?
        {
            Written::Parked(parked) => Ok(parked),
            other => Err(unexpected(&other)),
        }
    }

    async fn recovery(&self) -> Result<Recovery, StoreError> {
        let mut attempt = 0;
        loop {
            let mut client = self.client().await?;
            match recovery_read(&mut client).await {
                Ok(recovery) => return Ok(recovery),
                Err(failure) if attempt == 0 && failure.connection_lost(&client) => {
                    drop(deadpool_postgres::Object::take(client));
                    attempt += 1;
                }
                Err(failure) => return Err(failure.into_store()),
            }
        }
    }

    async fn pending_replies(&self) -> Result<Vec<Ulid>, StoreError> {
        self.read(|client| {
            Box::pin(async move {
                let statement = client
                    .prepare_cached(
                        "SELECT id FROM messages
                         WHERE direction = 'outbound' AND delivery_status = 'pending' ORDER BY id",
                    )
                    .await?;
                let rows = client.query(&statement, &[]).await?;
                Ok(rows
                    .iter()
                    .map(|row| parse_ulid(column(row, 0)?))
                    .collect::<Result<_, _>>()?)
            })
        })
        .await
    }

    async fn attachment(&self, sha256: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let sha256 = sha256.to_owned();
        self.read(|client| {
            let sha256 = sha256.clone();
            Box::pin(async move {
                let statement = client
                    .prepare_cached("SELECT content FROM attachments WHERE sha256 = $1")
                    .await?;
                let row = client.query_opt(&statement, &[&sha256]).await?;
                Ok(row.as_ref().map(|row| column(row, 0)).transpose()?)
            })
        })
        .await
    }

    async fn conversation(&self, id: Ulid) -> Result<Option<ConversationRecord>, StoreError> {
        let id = id.to_string();
        self.read(|client| {
            let id = id.clone();
            Box::pin(async move {
                let statement = client
                    .prepare_cached(&format!(
                        "SELECT {CONVERSATION_COLUMNS} FROM conversations WHERE id = $1"
                    ))
                    .await?;
                let row = client.query_opt(&statement, &[&id]).await?;
                Ok(row.as_ref().map(decode_conversation).transpose()?)
            })
        })
        .await
    }

    async fn conversations(
        &self,
        filter: ConversationFilter,
    ) -> Result<Vec<ConversationRecord>, StoreError> {
        self.read(|client| {
            let filter = filter.clone();
            Box::pin(async move { list_conversations(client, &filter).await })
        })
        .await
    }

    async fn messages(&self, conversation_id: Ulid) -> Result<Vec<StoredMessage>, StoreError> {
        let id = conversation_id.to_string();
        self.read(|client| {
            let id = id.clone();
            Box::pin(async move {
                let statement = client
                    .prepare_cached(&format!(
                        "SELECT {MESSAGE_COLUMNS} FROM messages WHERE conversation_id = $1
                         ORDER BY created_at, position"
                    ))
                    .await?;
                let rows = client.query(&statement, &[&id]).await?;
                Ok(rows.iter().map(decode_message).collect::<Result<_, _>>()?)
            })
        })
        .await
    }

    async fn message(&self, id: Ulid) -> Result<Option<StoredMessage>, StoreError> {
        let id = id.to_string();
        self.read(|client| {
            let id = id.clone();
            Box::pin(async move {
                let statement = client
                    .prepare_cached(&format!(
                        "SELECT {MESSAGE_COLUMNS} FROM messages WHERE id = $1"
                    ))
                    .await?;
                let row = client.query_opt(&statement, &[&id]).await?;
                Ok(row.as_ref().map(decode_message).transpose()?)
            })
        })
        .await
    }

    async fn outbound_by_provider_id(
        &self,
        channel: &str,
        provider_message_id: &str,
    ) -> Result<Option<StoredMessage>, StoreError> {
        let (channel, provider_message_id) = (channel.to_owned(), provider_message_id.to_owned());
        self.read(|client| {
            let (channel, provider_message_id) = (channel.clone(), provider_message_id.clone());
            Box::pin(async move {
                let statement = client
                    .prepare_cached(&format!(
                        "SELECT {MESSAGE_COLUMNS} FROM messages
                         WHERE channel = $1 AND provider_message_id = $2 AND direction = 'outbound'"
                    ))
                    .await?;
                let row = client
                    .query_opt(&statement, &[&channel, &provider_message_id])
                    .await?;
                Ok(row.as_ref().map(decode_message).transpose()?)
            })
        })
        .await
    }

    async fn outbox_pending(&self, limit: usize) -> Result<Vec<OutboxEvent>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(|client| {
            Box::pin(async move {
                let statement = client
                    .prepare_cached(
                        "SELECT position, event_id, kind, conversation_id, seq, data, time
                         FROM outbox WHERE sent_at IS NULL ORDER BY position LIMIT $1",
                    )
                    .await?;
                let rows = client.query(&statement, &[&limit]).await?;
                Ok(rows
                    .iter()
                    .map(decode_outbox_event)
                    .collect::<Result<_, StoreError>>()?)
            })
        })
        .await
    }

    async fn rate(&self, rating: Rating, events: Vec<NewEvent>) -> Result<bool, StoreError> {
        match self.write(Write::Rate(Box::new(rating), events)).await? {
            Written::Rated(stored) => Ok(stored),
            other => Err(unexpected(&other)),
        }
    }

    async fn ratings(&self, recent: usize) -> Result<RatingSummary, StoreError> {
        let limit = i64::try_from(recent).unwrap_or(i64::MAX);
        self.read(|client| {
            Box::pin(async move {
                let totals = client
                    .prepare_cached("SELECT count(*), avg(score)::float8 FROM ratings")
                    .await?;
                let totals = client.query_one(&totals, &[]).await?;
                let statement = client
                    .prepare_cached(
                        "SELECT conversation_id, score, comment, agent_id, rated_at FROM ratings
                         ORDER BY rated_at DESC LIMIT $1",
                    )
                    .await?;
                let rows = client.query(&statement, &[&limit]).await?;
                let recent = rows
                    .iter()
                    .map(|row| {
                        Ok(Rating {
                            conversation_id: parse_ulid(column(row, 0)?)?,
                            score: u8::try_from(column::<i16>(row, 1)?).map_err(|_| {
                                StoreError::Corrupt("a rating's score is out of range".into())
                            })?,
                            comment: column(row, 2)?,
                            agent_id: column(row, 3)?,
                            rated_at: from_nanos(column(row, 4)?),
                        })
                    })
                    .collect::<Result<_, StoreError>>()?;
                Ok(RatingSummary {
                    recent,
                    count: to_u64(column(&totals, 0)?, "rating count")?,
                    average: column(&totals, 1)?,
                })
            })
        })
        .await
    }

    async fn outbox_mark_sent(&self, positions: &[i64]) -> Result<(), StoreError> {
        self.write_done(Write::MarkSent(positions.to_vec())).await
    }

    async fn outbox_skip_pending(&self) -> Result<(), StoreError> {
        self.write_done(Write::SkipPending).await
    }

    async fn outbox_backlog(&self) -> Result<u64, StoreError> {
        self.read(|client| {
            Box::pin(async move {
                let statement = client
                    .prepare_cached("SELECT count(*) FROM outbox WHERE sent_at IS NULL")
                    .await?;
                let row = client.query_one(&statement, &[]).await?;
                Ok(to_u64(column(&row, 0)?, "backlog")?)
            })
        })
        .await
    }

    async fn check_writable(&self) -> Result<(), StoreError> {
        // A real (tiny) commit through the writer: proves the connection, the locks and the writer.
        self.write_done(Write::Probe).await
    }

    async fn try_acquire_lease(
        &self,
        node: &str,
        ttl: Duration,
    ) -> Result<Option<u64>, StoreError> {
        let micros = lease_micros(ttl)?;
        let node = node.to_owned();
        self.read(|client| {
            let node = node.clone();
            Box::pin(async move {
                let statement = client
                    .prepare_cached(
                        "UPDATE leadership SET holder = $1, epoch = epoch + 1,
                             expires_at = now() + $2::bigint * interval '1 microsecond', updated_at = now()
                         WHERE id = 1 AND (holder IS NULL OR holder = $1 OR expires_at IS NULL
                                           OR expires_at <= now())
                         RETURNING epoch",
                    )
                    .await?;
                let row = client.query_opt(&statement, &[&node, &micros]).await?;
                Ok(row
                    .map(|row| to_u64(column(&row, 0)?, "epoch"))
                    .transpose()?)
            })
        })
        .await
    }

    async fn renew_lease(&self, node: &str, epoch: u64, ttl: Duration) -> Result<bool, StoreError> {
        let micros = lease_micros(ttl)?;
        let epoch = to_i64(epoch, "epoch")?;
        let node = node.to_owned();
        self.read(|client| {
            let node = node.clone();
            Box::pin(async move {
                let statement = client
                    .prepare_cached(
                        "UPDATE leadership SET expires_at = now() + $3::bigint * interval '1 microsecond',
                             updated_at = now()
                         WHERE id = 1 AND holder = $1 AND epoch = $2",
                    )
                    .await?;
                Ok(client.execute(&statement, &[&node, &epoch, &micros]).await? == 1)
            })
        })
        .await
    }

    async fn release_lease(&self, node: &str, epoch: u64) -> Result<bool, StoreError> {
        let epoch = to_i64(epoch, "epoch")?;
        let node = node.to_owned();
        self.read(|client| {
            let node = node.clone();
            Box::pin(async move {
                let statement = client
                    .prepare_cached(
                        "UPDATE leadership SET holder = NULL, expires_at = NULL, updated_at = now()
                         WHERE id = 1 AND holder = $1 AND epoch = $2",
                    )
                    .await?;
                Ok(client.execute(&statement, &[&node, &epoch]).await? == 1)
            })
        })
        .await
    }

    async fn unrouted(&self, limit: usize) -> Result<Vec<UnroutedMessage>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(|client| {
            Box::pin(async move {
                let statement = client
                    .prepare_cached(&format!(
                        "SELECT {MESSAGE_COLUMNS}, {UNROUTED_COLUMNS} FROM messages
                         WHERE NOT routed AND direction = 'inbound' ORDER BY position LIMIT $1"
                    ))
                    .await?;
                let rows = client.query(&statement, &[&limit]).await?;
                Ok(rows.iter().map(decode_unrouted).collect::<Result<_, _>>()?)
            })
        })
        .await
    }

    fn wakeups(&self) -> Option<tokio::sync::broadcast::Receiver<Wakeup>> {
        Some(self.inner.wakeups.subscribe())
    }

    async fn heartbeat(
        &self,
        node: &str,
        address: &str,
        started_at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let (node, address) = (node.to_owned(), address.to_owned());
        self.read(|client| {
            let (node, address) = (node.clone(), address.clone());
            Box::pin(async move {
                let statement = client
                    .prepare_cached(
                        "INSERT INTO cluster_members (node_id, address, started_at, heartbeat_at)
                         VALUES ($1, $2, $3, now())
                         ON CONFLICT (node_id) DO UPDATE SET address = excluded.address,
                             started_at = excluded.started_at, heartbeat_at = now()",
                    )
                    .await?;
                client
                    .execute(&statement, &[&node, &address, &started_at])
                    .await?;
                Ok(())
            })
        })
        .await
    }

    async fn members(&self) -> Result<Vec<Member>, StoreError> {
        self.read(|client| {
            Box::pin(async move {
                let statement = client
                    .prepare_cached(
                        "SELECT node_id, address, started_at, heartbeat_at FROM cluster_members
                         ORDER BY node_id",
                    )
                    .await?;
                let rows = client.query(&statement, &[]).await?;
                Ok(rows
                    .iter()
                    .map(|row| {
                        Ok(Member {
                            node: column(row, 0)?,
                            address: column(row, 1)?,
                            started_at: column(row, 2)?,
                            heartbeat_at: column(row, 3)?,
                        })
                    })
                    .collect::<Result<_, StoreError>>()?)
            })
        })
        .await
    }

    async fn forward_command(&self, command: ForwardedCommand) -> Result<(), StoreError> {
        self.write_done(Write::Command(Box::new(command))).await
    }

    async fn open_commands(&self, limit: usize) -> Result<Vec<ForwardedCommand>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(|client| {
            Box::pin(async move {
                let statement = client
                    .prepare_cached(
                        "SELECT id, node_id, agent_id, command, created_at FROM agent_commands
                         WHERE answer IS NULL ORDER BY position LIMIT $1",
                    )
                    .await?;
                let rows = client.query(&statement, &[&limit]).await?;
                Ok(rows
                    .iter()
                    .map(|row| {
                        Ok(ForwardedCommand {
                            id: parse_ulid(column(row, 0)?)?,
                            node: column(row, 1)?,
                            agent_id: column(row, 2)?,
                            command: column::<Json<serde_json::Value>>(row, 3)?.0,
                            created_at: column(row, 4)?,
                        })
                    })
                    .collect::<Result<_, StoreError>>()?)
            })
        })
        .await
    }

    async fn answer_command(
        &self,
        id: Ulid,
        answer: serde_json::Value,
    ) -> Result<bool, StoreError> {
        match self.write(Write::Answer(id, answer)).await? {
            Written::Answered(answered) => Ok(answered),
            other => Err(unexpected(&other)),
        }
    }

    async fn command_answer(&self, id: Ulid) -> Result<Option<serde_json::Value>, StoreError> {
        let id = id.to_string();
        self.read(|client| {
            let id = id.clone();
            Box::pin(async move {
                let statement = client
                    .prepare_cached("SELECT answer FROM agent_commands WHERE id = $1")
                    .await?;
                let row = client.query_opt(&statement, &[&id]).await?;
                Ok(match row {
                    Some(row) => {
                        column::<Option<Json<serde_json::Value>>>(&row, 0)?.map(|answer| answer.0)
                    }
                    None => None,
                })
            })
        })
        .await
    }

    async fn pushes_after(
        &self,
        position: i64,
        limit: usize,
    ) -> Result<Vec<StoredPush>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(|client| {
            Box::pin(async move {
                let statement = client
                    .prepare_cached(
                        "SELECT position, origin, agent_id, document FROM agent_pushes
                         WHERE position > $1 ORDER BY position LIMIT $2",
                    )
                    .await?;
                let rows = client.query(&statement, &[&position, &limit]).await?;
                Ok(rows
                    .iter()
                    .map(|row| {
                        Ok(StoredPush {
                            position: column(row, 0)?,
                            origin: column(row, 1)?,
                            agent_id: column(row, 2)?,
                            document: column::<Json<serde_json::Value>>(row, 3)?.0,
                        })
                    })
                    .collect::<Result<_, StoreError>>()?)
            })
        })
        .await
    }

    async fn latest_push(&self) -> Result<i64, StoreError> {
        self.read(|client| {
            Box::pin(async move {
                let statement = client
                    .prepare_cached("SELECT coalesce(max(position), 0) FROM agent_pushes")
                    .await?;
                let row = client.query_one(&statement, &[]).await?;
                Ok(column(&row, 0)?)
            })
        })
        .await
    }

    async fn signal(&self, signal: &Signal) -> Result<(), StoreError> {
        let signal = serde_json::to_string(signal)
            .map_err(|error| StoreError::Corrupt(format!("cannot encode a signal: {error}")))?;
        let payload = format!("{}|signal|{signal}", self.inner.schema);
        self.read(|client| {
            let payload = payload.clone();
            Box::pin(async move {
                let statement = client.prepare_cached("SELECT pg_notify($1, $2)").await?;
                client
                    .execute(&statement, &[&NOTIFY_CHANNEL, &payload])
                    .await?;
                Ok(())
            })
        })
        .await
    }

    async fn routing_writes(&self) -> Result<Option<u64>, StoreError> {
        self.read(|client| Box::pin(async move { Ok(Some(read_routing_writes(&**client).await?)) }))
            .await
    }

    async fn events_end(&self) -> Result<EventCursor, StoreError> {
        self.read(|client| {
            Box::pin(async move {
                // Transactions from the oldest one still running on are yet to be followed.
                let statement = client
                    .prepare_cached("SELECT pg_snapshot_xmin(pg_current_snapshot())::text")
                    .await?;
                let row = client.query_one(&statement, &[]).await?;
                let oldest_running = parse_transaction(column(&row, 0)?)?;
                Ok(EventCursor {
                    transaction: oldest_running.saturating_sub(1),
                    position: i64::MAX,
                })
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
        self.read(|client| Box::pin(read_events_after(client, cursor, limit)))
            .await
    }

    async fn forwarding_backlog(&self) -> Result<u64, StoreError> {
        self.read(|client| {
            Box::pin(async move {
                let statement = client
                    .prepare_cached(
                        "SELECT (SELECT count(*) FROM messages WHERE NOT routed AND direction = 'inbound')
                              + (SELECT count(*) FROM agent_commands WHERE answer IS NULL)",
                    )
                    .await?;
                let row = client.query_one(&statement, &[]).await?;
                Ok(to_u64(column(&row, 0)?, "backlog")?)
            })
        })
        .await
    }

    async fn prune_cluster(&self, age: Duration) -> Result<(), StoreError> {
        let micros = lease_micros(age)?;
        self.read(|client| {
            Box::pin(async move {
                for sql in [
                    "DELETE FROM agent_commands WHERE answer IS NOT NULL
                     AND answered_at < now() - $1::bigint * interval '1 microsecond'",
                    "DELETE FROM agent_pushes
                     WHERE created_at < now() - $1::bigint * interval '1 microsecond'",
                    "DELETE FROM cluster_members
                     WHERE heartbeat_at < now() - $1::bigint * interval '1 microsecond'",
                ] {
                    let statement = client.prepare_cached(sql).await?;
                    client.execute(&statement, &[&micros]).await?;
                }
                Ok(())
            })
        })
        .await
    }

    async fn lease(&self) -> Result<Lease, StoreError> {
        self.read(|client| {
            Box::pin(async move {
                let statement = client
                    .prepare_cached(
                        "SELECT holder, epoch, expires_at,
                                holder IS NOT NULL AND expires_at IS NOT NULL AND expires_at > now(),
                                (EXTRACT(EPOCH FROM expires_at - now()) * 1000000)::bigint
                         FROM leadership WHERE id = 1",
                    )
                    .await?;
                let row = client.query_one(&statement, &[]).await?;
                let live: bool = column(&row, 3)?;
                let remaining: Option<i64> = column(&row, 4)?;
                Ok(Lease {
                    holder: column(&row, 0)?,
                    epoch: to_u64(column(&row, 1)?, "epoch")?,
                    expires_at: column(&row, 2)?,
                    live,
                    remaining: remaining
                        .filter(|_| live)
                        .and_then(|micros| u64::try_from(micros).ok())
                        .map(Duration::from_micros),
                })
            })
        })
        .await
    }
}

/// A lease's time to live in microseconds (PostgreSQL's interval resolution).
fn lease_micros(ttl: Duration) -> Result<i64, StoreError> {
    let ttl = lease_duration(ttl)?;
    ttl.num_microseconds()
        .ok_or_else(|| StoreError::NotFound(format!("lease time to live {ttl} is out of range")))
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

    #[test]
    fn schema_names_are_plain_identifiers() {
        for good in ["public", "switchboard", "t_01", "_x"] {
            assert!(valid_schema_name(good), "{good}");
        }
        for bad in [
            "",
            "Public",
            "1abc",
            "a-b",
            "a;drop",
            "a b",
            &"x".repeat(64),
        ] {
            assert!(!valid_schema_name(bad), "{bad}");
        }
    }

    #[test]
    fn timestamps_round_trip_to_the_nanosecond() {
        let now = Utc::now();
        assert_eq!(nanos(&now).ok().map(from_nanos), Some(now));
    }
}
