//! Measures SQLite store ingest throughput under concurrency (group commit at work).
//!
//! `cargo run --release --example store_throughput -- [MESSAGES] [TASKS] [DIR]`
//! (defaults: 10000 messages from 50 concurrent tasks, in a temporary directory).

use std::sync::Arc;
use std::time::Instant;

use chrono::Utc;
use switchboard::message::{Address, InboundMessage};
use switchboard::store::Store;
use switchboard::store::sqlite::{SqliteOptions, SqliteStore};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let messages: usize = args
        .next()
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(10_000);
    let tasks: usize = args
        .next()
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(50)
        .max(1);
    let dir = match args.next() {
        Some(dir) => tempfile::tempdir_in(dir)?,
        None => tempfile::tempdir()?,
    };
    let path = dir.path().join("throughput.sqlite");
    let store = Arc::new(SqliteStore::open(&path, SqliteOptions::default())?);

    let started = Instant::now();
    let mut handles = Vec::new();
    for task in 0..tasks {
        let store = Arc::clone(&store);
        handles.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut i = task;
            while i < messages {
                // 2000 customers, each writing several times: matching finds their conversation.
                let from = format!("+1555{:07}", i % 2000);
                let mut message = InboundMessage::new(
                    "sms",
                    "twilio",
                    &format!("SM{i:08}"),
                    &from,
                    "Hello, my parcel has not arrived yet, can you help?",
                );
                message.to = Some(Address {
                    address: "+15555550100".into(),
                    name: None,
                });
                let sent = Instant::now();
                store.ingest(message, Utc::now()).await?;
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
    let writer_cpu = writer_cpu_seconds();
    store.close().await?;
    latencies.sort();
    let percentile = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    let stats = store.stats();
    println!(
        "{messages} ingests from {tasks} tasks in {:.2}s: {:.0} msgs/s; {} commits, average batch {:.1}; \
         latency p50 {:?} p99 {:?}",
        elapsed.as_secs_f64(),
        messages as f64 / elapsed.as_secs_f64(),
        stats.commits,
        stats.average_batch(),
        percentile(0.5),
        percentile(0.99),
    );
    if let Some(cpu) = writer_cpu {
        println!(
            "writer thread CPU: {:.2}s, {:.0} µs per message (ceiling with a free core and instant \
             fsync: {:.0} msgs/s)",
            cpu,
            cpu * 1e6 / messages as f64,
            messages as f64 / cpu
        );
    }
    Ok(())
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
