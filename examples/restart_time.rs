//! Prepares a store with N open conversations for the restart and failover benchmarks
//! (`scripts/bench-restart`, `scripts/bench-cluster`): `restart_time N DIR` (SQLite in DIR) or
//! `restart_time N --postgres URL --schema S` (PostgreSQL, that schema).
//!
//! Stores N messages (N waiting conversations) through the store, then starts the daemon once so
//! every one is routed and its routing state committed, and stops it. The script then times the real
//! `switchboard run` binary from start to ready on that store (or kills its leaders), and reads its
//! peak memory. Prints one JSON line with the preparation times.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use switchboard::config;
use switchboard::daemon::{self, ConfigSource};
use switchboard::message::InboundMessage;
use switchboard::store::Store;
use switchboard::store::postgres::{PostgresOptions, PostgresStore};
use switchboard::store::sqlite::{SqliteOptions, SqliteStore};

/// Concurrent callers filling the store: enough for the group commit's largest batches.
const FILLERS: usize = 200;

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let count: usize = args.get(1).map_or(100_000, |n| n.parse().expect("N"));
    let mut environment = vec![(
        "SWITCHBOARD__SERVER__LISTEN".to_owned(),
        "127.0.0.1:0".to_owned(),
    )];
    let postgres = arg(&args, "--postgres").map(|url| {
        let schema = arg(&args, "--schema").expect("--schema S with --postgres");
        (url, schema)
    });
    let (store, sqlite, postgres_store): (Arc<dyn Store>, _, _) = match &postgres {
        Some((url, schema)) => {
            environment.extend([
                (
                    "SWITCHBOARD__STORE__BACKEND".to_owned(),
                    "postgres".to_owned(),
                ),
                ("SWITCHBOARD__STORE__URL".to_owned(), url.clone()),
                ("SWITCHBOARD__STORE__SCHEMA".to_owned(), schema.clone()),
            ]);
            let store =
                PostgresStore::open(PostgresOptions::new(url.parse().expect("URL"), schema))
                    .await
                    .unwrap();
            (Arc::new(store.clone()), None, Some(store))
        }
        None => {
            let dir = std::path::PathBuf::from(args.get(2).expect("DIR"));
            let path = dir.join("restart.sqlite");
            environment.push((
                "SWITCHBOARD__STORE__PATH".to_owned(),
                path.display().to_string(),
            ));
            let store = SqliteStore::open(&path, SqliteOptions::default()).unwrap();
            (Arc::new(store.clone()), Some(store), None)
        }
    };
    let settings = config::load(None, environment.clone()).unwrap();
    let source = ConfigSource {
        file: None,
        environment,
    };

    let fill = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..FILLERS {
        let store = store.clone();
        tasks.spawn(async move {
            for index in (worker..count).step_by(FILLERS) {
                let message = InboundMessage::new(
                    "api",
                    "load",
                    &format!("m-{index}"),
                    &format!("customer-{index}"),
                    "hello",
                );
                store
                    .ingest(message, Vec::new(), chrono::Utc::now())
                    .await
                    .unwrap();
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    // The daemon opens the SQLite file itself: one writer at a time.
    if let Some(sqlite) = sqlite {
        sqlite.close().await.unwrap();
    }
    let filled = fill.elapsed();

    let first = Instant::now();
    let daemon = daemon::start(settings, source).await.unwrap();
    if let Some(postgres) = &postgres_store {
        // Several-instance mode: the router starts once this instance holds the lease, after
        // `start` returned; wait until it has routed every stored message.
        let deadline = Instant::now() + Duration::from_secs(1800);
        while !postgres.unrouted(1).await.unwrap().is_empty() {
            assert!(Instant::now() < deadline, "messages left unrouted");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    daemon.shutdown().await;
    let first_run = first.elapsed();
    if let Some(postgres) = postgres_store {
        postgres.close().await.unwrap();
    }

    println!(
        "{}",
        serde_json::json!({
            "open_conversations": count,
            "fill_seconds": filled.as_secs_f64(),
            "first_start_routing_all_seconds": first_run.as_secs_f64(),
        })
    );
}
