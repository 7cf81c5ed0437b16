//! Measures store ingest throughput under concurrency (group commit at work): the SQLite store, and
//! with `--postgres URL` also the PostgreSQL store and a raw loop writing the same rows into the
//! same tables with the same durability, batched like the group commit, all in the same run.
//!
//! `cargo run --release --example store_throughput -- [MESSAGES] [TASKS] [DIR] [--postgres URL]
//! [--postgres-only] [--customers N]` (defaults: 10000 messages from 50 concurrent tasks, 2000
//! customers, in a temporary directory; PostgreSQL runs use a scratch schema each, dropped at the
//! end). `--postgres-only` skips SQLite; `--customers N` sets how many distinct customers write (as
//! many as messages: every message opens its own conversation, as the HTTP load does). With
//! `--postgres` the last line is one JSON line with both PostgreSQL rates (`scripts/bench-cluster`
//! reads it).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use switchboard::message::{Address, InboundMessage};
use switchboard::store::Store;
use switchboard::store::postgres::{PostgresOptions, PostgresStore};
use switchboard::store::sqlite::{SqliteOptions, SqliteStore, WriterStats};
use ulid::Ulid;

/// Distinct customers in the workload by default: each writes several times, so matching finds
/// their conversation.
const CUSTOMERS: usize = 2000;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut positional = Vec::new();
    let mut postgres_url = None;
    let mut postgres_only = false;
    let mut customers = CUSTOMERS;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--postgres" {
            postgres_url = Some(
                args.next()
                    .ok_or_else(|| anyhow::anyhow!("--postgres URL"))?,
            );
        } else if arg == "--postgres-only" {
            postgres_only = true;
        } else if arg == "--customers" {
            customers = args
                .next()
                .ok_or_else(|| anyhow::anyhow!("--customers N"))?
                .parse::<usize>()?
                .max(1);
        } else {
            positional.push(arg);
        }
    }
    let mut positional = positional.into_iter();
    let messages: usize = positional
        .next()
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(10_000);
    let tasks: usize = positional
        .next()
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(50)
        .max(1);
    let dir = match positional.next() {
        Some(dir) => tempfile::tempdir_in(dir)?,
        None => tempfile::tempdir()?,
    };

    let workload = Workload { customers };

    if !postgres_only {
        sqlite_run(&workload, dir.path(), messages, tasks).await?;
    }
    if let Some(url) = postgres_url {
        postgres_run(&workload, &url, messages, tasks).await?;
    }
    Ok(())
}

async fn sqlite_run(
    workload: &Workload,
    dir: &std::path::Path,
    messages: usize,
    tasks: usize,
) -> anyhow::Result<()> {
    let path = dir.join("throughput.sqlite");
    let sqlite = SqliteStore::open(&path, SqliteOptions::default())?;
    let run = ingest_through(Arc::new(sqlite.clone()), workload, messages, tasks).await?;
    let writer_cpu = writer_cpu_seconds();
    sqlite.close().await?;
    report("sqlite store", &run, sqlite.stats());
    if let Some(cpu) = writer_cpu {
        println!(
            "  sqlite writer thread CPU: {:.2}s, {:.0} µs per message (ceiling with a free core and \
             instant fsync: {:.0} msgs/s)",
            cpu,
            cpu * 1e6 / messages as f64,
            messages as f64 / cpu
        );
    }
    Ok(())
}

/// The PostgreSQL store, then the raw loop batched like the store's group commit was.
async fn postgres_run(
    workload: &Workload,
    url: &str,
    messages: usize,
    tasks: usize,
) -> anyhow::Result<()> {
    {
        let store_schema = scratch_schema("store");
        let store = PostgresStore::open(PostgresOptions::new(url.parse()?, &store_schema)).await?;
        let run = ingest_through(Arc::new(store.clone()), workload, messages, tasks).await?;
        store.close().await?;
        let stats = store.stats();
        report("postgres store", &run, stats);

        // The raw loop: same tables (created by the same migrations), same rows, batches of the
        // size the store's group commit reached.
        let raw_schema = scratch_schema("raw");
        PostgresStore::open(PostgresOptions::new(url.parse()?, &raw_schema))
            .await?
            .close()
            .await?;
        let batch = stats.average_batch().round().max(1.0) as usize;
        let raw = raw_inserts(workload, url, &raw_schema, messages, batch).await?;
        println!(
            "postgres raw loop: {messages} messages in {:.2}s: {:.0} msgs/s; batches of {batch}",
            raw.as_secs_f64(),
            messages as f64 / raw.as_secs_f64()
        );
        println!(
            "postgres store / raw loop: {:.2}x",
            raw.as_secs_f64() / run.elapsed.as_secs_f64()
        );
        println!(
            "{}",
            serde_json::json!({
                "messages": messages,
                "tasks": tasks,
                "customers": workload.customers,
                "postgres_store_messages_per_second": messages as f64 / run.elapsed.as_secs_f64(),
                "raw_loop_messages_per_second": messages as f64 / raw.as_secs_f64(),
                "raw_loop_batch": batch,
            })
        );
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        client
            .batch_execute(&format!(
                "DROP SCHEMA {store_schema} CASCADE; DROP SCHEMA {raw_schema} CASCADE"
            ))
            .await?;
    }
    Ok(())
}

fn scratch_schema(what: &str) -> String {
    format!("bench_{what}_{}", Ulid::new().to_string().to_lowercase())
}

/// Who writes: message `i` comes from customer `i % customers`.
struct Workload {
    customers: usize,
}

impl Workload {
    /// Message `i` of the workload.
    fn message(&self, i: usize) -> InboundMessage {
        let mut message = InboundMessage::new(
            "sms",
            "twilio",
            &format!("SM{i:08}"),
            &self.customer(i),
            "Hello, my parcel has not arrived yet, can you help?",
        );
        message.to = Some(Address {
            address: "+15555550100".into(),
            name: None,
        });
        message
    }

    fn customer(&self, i: usize) -> String {
        format!("+1555{:07}", i % self.customers)
    }
}

struct Run {
    elapsed: Duration,
    latencies: Vec<Duration>,
}

/// Ingests the workload from `tasks` concurrent callers.
async fn ingest_through(
    store: Arc<dyn Store>,
    workload: &Workload,
    messages: usize,
    tasks: usize,
) -> anyhow::Result<Run> {
    let started = Instant::now();
    let mut handles = Vec::new();
    for task in 0..tasks {
        let store = Arc::clone(&store);
        let workload = Workload {
            customers: workload.customers,
        };
        handles.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut i = task;
            while i < messages {
                let sent = Instant::now();
                store
                    .ingest(workload.message(i), Vec::new(), Utc::now())
                    .await?;
                latencies.push(sent.elapsed());
                i += tasks;
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut latencies = Vec::with_capacity(messages);
    for handle in handles {
        latencies.extend(handle.await??);
    }
    let elapsed = started.elapsed();
    latencies.sort();
    Ok(Run { elapsed, latencies })
}

fn report(name: &str, run: &Run, stats: WriterStats) {
    let percentile = |p: f64| {
        run.latencies
            .get(
                ((run.latencies.len() as f64 * p) as usize)
                    .min(run.latencies.len().saturating_sub(1)),
            )
            .copied()
            .unwrap_or_default()
    };
    let messages = run.latencies.len();
    println!(
        "{name}: {messages} ingests in {:.2}s: {:.0} msgs/s; {} commits, average batch {:.1}; \
         latency p50 {:?} p99 {:?}",
        run.elapsed.as_secs_f64(),
        messages as f64 / run.elapsed.as_secs_f64(),
        stats.commits,
        stats.average_batch(),
        percentile(0.5),
        percentile(0.99),
    );
}

/// The same rows as the store writes for the workload, with no lookups and no savepoints: a new
/// customer gets a contact, an identity link, a conversation and its thread; every message is
/// inserted and its conversation's reply route updated. `synchronous_commit=on`, one commit per
/// `batch` messages, one connection.
async fn raw_inserts(
    workload: &Workload,
    url: &str,
    schema: &str,
    messages: usize,
    batch: usize,
) -> anyhow::Result<Duration> {
    let mut config: tokio_postgres::Config = url.parse()?;
    config.options(format!("-c search_path={schema} -c synchronous_commit=on"));
    let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    let insert_contact = client
        .prepare(
            "INSERT INTO contacts (id, name, tier, language, created_at, updated_at)
             VALUES ($1, NULL, NULL, NULL, $2, $2)",
        )
        .await?;
    let insert_link = client
        .prepare(
            "INSERT INTO identity_links (kind, value, contact_id, created_at) VALUES ('phone', $1, $2, $3)",
        )
        .await?;
    let insert_conversation = client
        .prepare(
            "INSERT INTO conversations (id, contact_id, status, channel, reply_channel, reply_provider,
                 reply_customer_address, reply_our_address, reply_thread_key, subject, created_at,
                 updated_at)
             VALUES ($1, $2, 'open', 'sms', 'sms', 'twilio', $3, '+15555550100', $4, NULL, $5, $5)",
        )
        .await?;
    let insert_thread = client
        .prepare(
            "INSERT INTO conversation_threads (channel, thread_key, conversation_id) VALUES ('sms', $1, $2)",
        )
        .await?;
    let update_conversation = client
        .prepare(
            "UPDATE conversations SET reply_channel = 'sms', reply_provider = 'twilio',
                 reply_customer_address = $2, reply_our_address = '+15555550100',
                 reply_thread_key = $3, updated_at = GREATEST(updated_at, $4)
             WHERE id = $1",
        )
        .await?;
    let insert_message = client
        .prepare(
            "INSERT INTO messages (id, conversation_id, direction, channel, provider,
                 provider_message_id, thread_key, from_address, to_address, body, created_at)
             VALUES ($1, $2, 'inbound', 'sms', 'twilio', $3, $4, $5, '+15555550100', $6::text::json, $7)",
        )
        .await?;
    let mut conversations: Vec<Option<String>> = vec![None; workload.customers];
    let mut seen: HashSet<usize> = HashSet::new();
    let started = Instant::now();
    for chunk in (0..messages).collect::<Vec<_>>().chunks(batch) {
        client.batch_execute("BEGIN").await?;
        for &i in chunk {
            let message = workload.message(i);
            let body = serde_json::to_string(&message)?;
            let now = Utc::now().timestamp_nanos_opt().unwrap_or_default();
            let from = workload.customer(i);
            let thread = message.effective_thread_key();
            let slot = i % workload.customers;
            let conversation = match (seen.insert(slot), &conversations[slot]) {
                (false, Some(id)) => {
                    client
                        .execute(&update_conversation, &[id, &from, &thread, &now])
                        .await?;
                    id.clone()
                }
                _ => {
                    let contact = Ulid::new().to_string();
                    let id = Ulid::new().to_string();
                    client.execute(&insert_contact, &[&contact, &now]).await?;
                    client
                        .execute(&insert_link, &[&from, &contact, &now])
                        .await?;
                    client
                        .execute(&insert_conversation, &[&id, &contact, &from, &thread, &now])
                        .await?;
                    client.execute(&insert_thread, &[&thread, &id]).await?;
                    conversations[slot] = Some(id.clone());
                    id
                }
            };
            client
                .execute(
                    &insert_message,
                    &[
                        &Ulid::new().to_string(),
                        &conversation,
                        &message.provider_message_id,
                        &thread,
                        &from,
                        &body,
                        &now,
                    ],
                )
                .await?;
        }
        client.batch_execute("COMMIT").await?;
    }
    Ok(started.elapsed())
}

/// The CPU time (user + system) of the `sqlite-writer` thread so far, on Linux.
fn writer_cpu_seconds() -> Option<f64> {
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let task = task.ok()?.path();
        let comm = std::fs::read_to_string(task.join("comm")).unwrap_or_default();
        if comm.trim() != "sqlite-writer" {
            continue;
        }
        let stat = std::fs::read_to_string(task.join("stat")).ok()?;
        // Fields after the command name (which is in parentheses): utime and stime are 14 and 15.
        let rest = stat.rsplit_once(')')?.1;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let utime: f64 = fields.get(11)?.parse().ok()?;
        let stime: f64 = fields.get(12)?.parse().ok()?;
        // Clock ticks: 100 per second on Linux.
        return Some((utime + stime) / 100.0);
    }
    None
}
