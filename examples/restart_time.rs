//! Prepares a store with N open conversations for the restart benchmark (`scripts/bench-restart`):
//! `restart_time N DIR`.
//!
//! Stores N messages (N waiting conversations) through the store, then starts the daemon once so
//! every one is routed and its routing state committed, and stops it. The script then times the real
//! `switchboard run` binary from start to ready on that store, and reads its peak memory. Prints one
//! JSON line with the preparation times.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Instant;

use switchboard::config;
use switchboard::daemon::{self, ConfigSource};
use switchboard::message::InboundMessage;
use switchboard::store::Store;
use switchboard::store::sqlite::{SqliteOptions, SqliteStore};

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let count: usize = args.get(1).map_or(100_000, |n| n.parse().expect("N"));
    let dir = std::path::PathBuf::from(args.get(2).expect("DIR"));
    let path = dir.join("restart.sqlite");
    let environment = vec![
        (
            "SWITCHBOARD__STORE__PATH".to_owned(),
            path.display().to_string(),
        ),
        (
            "SWITCHBOARD__SERVER__LISTEN".to_owned(),
            "127.0.0.1:0".to_owned(),
        ),
    ];
    let settings = config::load(None, environment.clone()).unwrap();
    let source = ConfigSource {
        file: None,
        environment,
    };

    let fill = Instant::now();
    let store = SqliteStore::open(&path, SqliteOptions::default()).unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..200 {
        let store = store.clone();
        tasks.spawn(async move {
            for index in (worker..count).step_by(200) {
                let message = InboundMessage::new(
                    "api",
                    "load",
                    &format!("m-{index}"),
                    &format!("customer-{index}"),
                    "hello",
                );
                store.ingest(message, chrono::Utc::now()).await.unwrap();
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    store.close().await.unwrap();
    let filled = fill.elapsed();

    let first = Instant::now();
    let daemon = daemon::start(settings, source).await.unwrap();
    daemon.shutdown().await;
    let first_run = first.elapsed();

    println!(
        "{}",
        serde_json::json!({
            "open_conversations": count,
            "fill_seconds": filled.as_secs_f64(),
            "first_start_routing_all_seconds": first_run.as_secs_f64(),
        })
    );
}
