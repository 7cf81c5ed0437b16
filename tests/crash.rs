//! Crash tests through the real binary: the daemon is killed with SIGKILL at random moments while
//! messages arrive over HTTP, NATS JetStream, RabbitMQ and SMTP and agents accept and resolve, then
//! restarted on the same SQLite store, again and again. Afterwards, from the store and from the
//! events stream: every message acknowledged to its sender is stored exactly once, no conversation
//! had two owners, no agent was above capacity, and every state change's event was published.
//!
//! Rounds: 3 by default; 20 with `SWITCHBOARD_LONG_TESTS=1`. The kill moments come from a seeded
//! RNG; the seed is printed, and `SWITCHBOARD_CRASH_SEED=<seed>` replays a run.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::pull};
use common::{AgentDesk, Daemon, api_message, eventually, unique_name};
use futures_util::StreamExt;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use rand::{Rng, SeedableRng};
use serde_json::Value;
use tokio::sync::watch;

const NATS: &str = "127.0.0.1:4222";
const RABBITMQ: &str = "127.0.0.1:5672";
const MAILBOX: &str = "support@example.com";

fn long_run() -> bool {
    std::env::var("SWITCHBOARD_LONG_TESTS").is_ok_and(|flag| flag == "1")
}

/// Where the daemon answers right now; `None` while it is down.
#[derive(Debug, Clone)]
struct Target {
    base: String,
    smtp: String,
}

impl Target {
    fn of(daemon: &Daemon) -> Target {
        Target {
            base: daemon.base.clone(),
            smtp: daemon.listeners["smtp"].clone(),
        }
    }
}

/// The ids one sender had acknowledged (the dedupe key the store keeps for each).
type Acked = Arc<Mutex<Vec<String>>>;

/// Sends one message at a time, at most one per `every`, until `stop`: `send(n)` returns the
/// message's dedupe key when the sender got its acknowledgement.
fn load<F, Fut>(
    every: Duration,
    mut stop: watch::Receiver<bool>,
    acked: Acked,
    mut send: F,
) -> tokio::task::JoinHandle<u64>
where
    F: FnMut(u64) -> Fut + Send + 'static,
    Fut: Future<Output = Option<String>> + Send + 'static,
{
    tokio::spawn(async move {
        let mut pace = tokio::time::interval(every);
        pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut sent = 0;
        while !*stop.borrow() {
            tokio::select! {
                _ = pace.tick() => {}
                _ = stop.changed() => break,
            }
            if let Some(key) = send(sent).await {
                acked.lock().unwrap().push(key);
            }
            sent += 1;
        }
        sent
    })
}

/// The daemon's address once it is up (a sender holds its message until then, as a retrying
/// client would not: each attempt is a new message).
async fn current(target: &mut watch::Receiver<Option<Target>>) -> Option<Target> {
    let up = tokio::time::timeout(Duration::from_secs(10), target.wait_for(Option::is_some))
        .await
        .ok()?
        .ok()?;
    up.clone()
}

fn daemon_config(nats_name: &str, amqp_prefix: &str) -> String {
    format!(
        "[bus]\nreconnect_initial_ms = 50\nreconnect_max_ms = 500\n\n{}ack_wait_seconds = 2\n\n{}\n\
         [channels.email]\nmailboxes = [\"{MAILBOX}\"]\n\n\
         [channels.email.smtp]\nenabled = true\nlisten = \"127.0.0.1:0\"\nhostname = \"mx.test\"\n",
        common::nats_config(NATS, nats_name),
        common::amqp_config(RABBITMQ, amqp_prefix),
    )
}

/// Starts (or restarts) the daemon in its directory and waits until both buses are connected.
async fn spawn_connected(daemon: &mut Daemon) {
    tokio::task::block_in_place(|| daemon.spawn());
    for bus in ["nats", "amqp"] {
        let connected = format!("switchboard_bus_connected{{bus=\"{bus}\"}}");
        eventually(30, "the buses to connect", || async {
            (daemon.metric(&connected).await == Some(1.0)).then_some(())
        })
        .await;
    }
}

/// The store as the daemon left it, opened read-only.
fn open_store(daemon: &Daemon) -> rusqlite::Connection {
    let store = rusqlite::Connection::open_with_flags(
        daemon.dir.path().join("switchboard.sqlite"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    store.busy_timeout(Duration::from_secs(10)).unwrap();
    store
}

/// The router's stored state as the daemon left it: every conversation's routing document and every
/// agent's, checked by [`common::check_routing_documents`].
fn check_stored_routing(
    store: &rusqlite::Connection,
    capacities: &common::Capacities,
) -> BTreeMap<String, (String, String)> {
    let mut statement = store
        .prepare(
            "SELECT id, channel, routing_state FROM conversations WHERE routing_state IS NOT NULL",
        )
        .unwrap();
    let conversations: Vec<(String, String, String)> = statement
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let mut statement = store
        .prepare("SELECT agent_id, state FROM agent_state")
        .unwrap();
    let agents: Vec<(String, String)> = statement
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    common::check_routing_documents(&conversations, &agents, capacities)
}

/// How many stored messages have `key` as their dedupe key on `channel`.
fn stored_count(store: &rusqlite::Connection, channel: &str, key: &str) -> i64 {
    store
        .query_row(
            "SELECT count(*) FROM messages WHERE channel = ?1 AND provider_message_id = ?2",
            [channel, key],
            |row| row.get(0),
        )
        .unwrap()
}

fn count(store: &rusqlite::Connection, sql: &str) -> i64 {
    store.query_row(sql, [], |row| row.get(0)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_at_random_moments_under_mixed_load_loses_and_duplicates_nothing() {
    let rounds = if long_run() { 20 } else { 3 };
    let seed: u64 = std::env::var("SWITCHBOARD_CRASH_SEED")
        .ok()
        .and_then(|seed| seed.parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    println!("crash test: {rounds} kills, seed {seed} (SWITCHBOARD_CRASH_SEED={seed} replays)");
    let mut rng = rand_pcg::Pcg64::seed_from_u64(seed);
    let started = Instant::now();

    let nats_name = unique_name("crash");
    let amqp_prefix = unique_name("crash");
    let dir = tempfile::tempdir().unwrap();
    common::write_config(dir.path(), "", &daemon_config(&nats_name, &amqp_prefix));
    let mut daemon = Daemon::start_in(dir);
    for bus in ["nats", "amqp"] {
        let connected = format!("switchboard_bus_connected{{bus=\"{bus}\"}}");
        eventually(30, "the buses to connect", || async {
            (daemon.metric(&connected).await == Some(1.0)).then_some(())
        })
        .await;
    }
    let capacities = common::capacities(&daemon).await;
    let (target_tx, target) = watch::channel(Some(Target::of(&daemon)));
    let (bases_tx, bases) = watch::channel(vec![daemon.base.clone()]);
    let (stop_tx, stop) = watch::channel(false);

    // Every event the daemon publishes, as a consumer of its events stream reads them.
    let nats = async_nats::connect(NATS)
        .await
        .expect("NATS on 127.0.0.1:4222");
    let jetstream = jetstream::new(nats);
    let (_, publish_stream) = common::nats_streams(&nats_name);
    let events: Arc<Mutex<Vec<Value>>> = Arc::default();
    let events_reader = {
        let stream = jetstream.get_stream(&publish_stream).await.unwrap();
        let mut messages: pull::Ordered = stream
            .create_consumer(pull::OrderedConfig {
                filter_subject: format!("{nats_name}.events.>"),
                ..Default::default()
            })
            .await
            .unwrap()
            .messages()
            .await
            .unwrap();
        let events = events.clone();
        tokio::spawn(async move {
            while let Some(Ok(message)) = messages.next().await {
                let message: async_nats::Message = message.into();
                let event: Value = serde_json::from_slice(&message.payload).unwrap();
                events.lock().unwrap().push(event);
            }
        })
    };

    // The senders. Each message comes from its own customer, so each is its own conversation.
    let acked_http: Acked = Arc::default();
    let acked_nats: Acked = Arc::default();
    let acked_amqp: Acked = Arc::default();
    let acked_smtp: Acked = Arc::default();
    let http = {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap();
        let target = target.clone();
        load(
            Duration::from_millis(20),
            stop.clone(),
            acked_http.clone(),
            move |n| {
                let (client, mut target) = (client.clone(), target.clone());
                async move {
                    let base = current(&mut target).await?.base;
                    let id = format!("http-{n}");
                    let response = client
                        .post(format!("{base}/v1/messages"))
                        .bearer_auth(common::INGEST)
                        .json(&api_message(
                            &id,
                            &format!("http-customer-{n}"),
                            "where is my order",
                        ))
                        .send()
                        .await
                        .ok()?;
                    response.status().is_success().then_some(id)
                }
            },
        )
    };
    let nats_load = {
        let jetstream = jetstream.clone();
        let subject = format!("{nats_name}.inbound.api");
        load(
            Duration::from_millis(40),
            stop.clone(),
            acked_nats.clone(),
            move |n| {
                let (jetstream, subject) = (jetstream.clone(), subject.clone());
                async move {
                    let id = format!("nats-{n}");
                    let body = api_message(&id, &format!("nats-customer-{n}"), "where is my order");
                    let ack = jetstream
                        .publish(subject, body.to_string().into())
                        .await
                        .ok()?;
                    tokio::time::timeout(Duration::from_secs(5), ack)
                        .await
                        .ok()?
                        .ok()?;
                    Some(id)
                }
            },
        )
    };
    let amqp = Connection::connect(
        &format!("amqp://guest:guest@{RABBITMQ}/%2f"),
        ConnectionProperties::default(),
    )
    .await
    .expect("RabbitMQ on 127.0.0.1:5672");
    let amqp_load = {
        let channel = amqp.create_channel().await.unwrap();
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        let exchange = format!("{amqp_prefix}.inbound");
        load(
            Duration::from_millis(40),
            stop.clone(),
            acked_amqp.clone(),
            move |n| {
                let (channel, exchange) = (channel.clone(), exchange.clone());
                async move {
                    let id = format!("amqp-{n}");
                    let body = api_message(&id, &format!("amqp-customer-{n}"), "where is my order");
                    let confirm = channel
                        .basic_publish(
                            exchange.as_str().into(),
                            "api".into(),
                            BasicPublishOptions {
                                mandatory: true,
                                ..Default::default()
                            },
                            body.to_string().as_bytes(),
                            BasicProperties::default().with_delivery_mode(2),
                        )
                        .await
                        .ok()?
                        .await
                        .ok()?;
                    // Acknowledged and routed to the daemon's durable queue (not returned).
                    (confirm.is_ack() && confirm.take_message().is_none()).then_some(id)
                }
            },
        )
    };
    let smtp_load = {
        let target = target.clone();
        load(
            Duration::from_millis(100),
            stop.clone(),
            acked_smtp.clone(),
            move |n| {
                let mut target = target.clone();
                async move {
                    use lettre::AsyncTransport;
                    let address: std::net::SocketAddr =
                        current(&mut target).await?.smtp.parse().ok()?;
                    let client =
                        lettre::AsyncSmtpTransport::<lettre::Tokio1Executor>::builder_dangerous(
                            address.ip().to_string(),
                        )
                        .port(address.port())
                        .timeout(Some(Duration::from_secs(5)))
                        .build();
                    let id = format!("smtp-{n}@crash.test");
                    let email = lettre::Message::builder()
                        .from(format!("mail-customer-{n}@example.net").parse().unwrap())
                        .to(MAILBOX.parse().unwrap())
                        .subject("where is my order")
                        .message_id(Some(format!("<{id}>")))
                        .body("It has not arrived yet.".to_owned())
                        .unwrap();
                    // Ok only after the server's 250 to the end of DATA.
                    client.send(email).await.ok()?;
                    Some(id)
                }
            },
        )
    };
    let desks: Vec<AgentDesk> = ["alice", "bob", "carol"]
        .into_iter()
        .map(|agent| AgentDesk::start(agent, bases.clone()))
        .collect();

    // Kill at random moments, check what the store holds each time, restart on it.
    for round in 0..rounds {
        let run_for = Duration::from_millis(rng.random_range(200..1500));
        tokio::time::sleep(run_for).await;
        target_tx.send_replace(None);
        daemon.kill();
        println!("round {round}: killed after {run_for:?}");
        let store = open_store(&daemon);
        check_stored_routing(&store, &capacities);
        drop(store);
        spawn_connected(&mut daemon).await;
        bases_tx.send_replace(vec![daemon.base.clone()]);
        target_tx.send_replace(Some(Target::of(&daemon)));
    }

    // Let the last run take load for a moment, then stop the senders and the agents.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop_tx.send_replace(true);
    let mut sent = BTreeMap::new();
    for (name, task) in [
        ("http", http),
        ("nats", nats_load),
        ("amqp", amqp_load),
        ("smtp", smtp_load),
    ] {
        sent.insert(name, task.await.unwrap());
    }
    let mut logs = Vec::new();
    for (agent, desk) in ["alice", "bob", "carol"].into_iter().zip(desks) {
        logs.push((agent, desk.stop().await));
    }

    // Every acknowledged message is stored exactly once (the bus ones once the daemon consumed what
    // waited on the broker), and every inbound message was handed to the router.
    let acknowledged: Vec<(&str, String)> = [
        ("api", &acked_http),
        ("api", &acked_nats),
        ("api", &acked_amqp),
        ("email", &acked_smtp),
    ]
    .into_iter()
    .flat_map(|(channel, acked)| {
        acked
            .lock()
            .unwrap()
            .iter()
            .map(|key| (channel, key.clone()))
            .collect::<Vec<_>>()
    })
    .collect();
    let store = open_store(&daemon);
    eventually(60, "every acknowledged message stored and routed", || {
        let missing = acknowledged
            .iter()
            .filter(|(channel, key)| stored_count(&store, channel, key) == 0)
            .count();
        let unrouted = count(
            &store,
            "SELECT count(*) FROM messages WHERE direction = 'inbound' AND routed = 0",
        );
        async move { (missing == 0 && unrouted == 0).then_some(()) }
    })
    .await;
    for (channel, key) in &acknowledged {
        assert_eq!(stored_count(&store, channel, key), 1, "{channel} {key}");
    }
    // One conversation per customer: no message opened a second one.
    assert_eq!(
        count(
            &store,
            "SELECT count(*) FROM (SELECT conversation_id FROM messages GROUP BY conversation_id HAVING count(*) > 1)"
        ),
        0
    );
    assert_eq!(
        count(&store, "SELECT count(*) FROM messages"),
        count(&store, "SELECT count(*) FROM conversations"),
    );

    // Owners: no conversation was accepted by two agents, and whoever the store says holds it is
    // the agent that accepted it.
    let holders = check_stored_routing(&store, &capacities);
    let accepted_by = common::accepted_by(&logs);
    for (conversation, agent) in &accepted_by {
        let (holder, state) = &holders[conversation];
        assert_eq!(holder, agent, "{conversation} is {state} with {holder}");
        assert!(
            state == "assigned" || state == "resolved",
            "{conversation} accepted by {agent} but {state}"
        );
    }

    // Events: the relay publishes everything in the outbox, and after dedupe by CloudEvents id each
    // conversation's events count 1, 2, 3... up to the sequence the store reached.
    eventually(60, "the outbox to drain", || {
        let unsent = count(
            &store,
            "SELECT count(*) FROM outbox
             WHERE position > (SELECT published_up_to FROM outbox_relay WHERE id = 1)",
        );
        async move { (unsent == 0).then_some(()) }
    })
    .await;
    let outbox: BTreeSet<String> = {
        let mut statement = store.prepare("SELECT event_id FROM outbox").unwrap();
        statement
            .query_map([], |row| row.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    };
    let published = eventually(60, "every outbox event on the events stream", || {
        let ids: BTreeSet<String> = events
            .lock()
            .unwrap()
            .iter()
            .map(|event| event["id"].as_str().unwrap().to_owned())
            .collect();
        let missing = outbox.difference(&ids).count();
        async move { (missing == 0).then_some(ids) }
    })
    .await;
    let received = events.lock().unwrap().clone();
    let mut seen = BTreeSet::new();
    let mut sequences: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut assigned: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for event in &received {
        if !seen.insert(event["id"].as_str().unwrap().to_owned()) {
            continue;
        }
        let Some(conversation) = event["subject"].as_str() else {
            continue;
        };
        let sequence: u64 = event["sequence"].as_str().unwrap().parse().unwrap();
        sequences
            .entry(conversation.to_owned())
            .or_default()
            .push(sequence);
        if event["type"] == "io.switchboard.conversation.assigned" {
            assigned.entry(conversation.to_owned()).or_default().push(
                event["data"]["agent_id"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            );
        }
    }
    let stored_sequences: Vec<(String, u64)> = store
        .prepare("SELECT id, event_seq FROM conversations")
        .unwrap()
        .query_map([], |row| Ok((row.get(0)?, row.get::<_, i64>(1)? as u64)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    for (conversation, last) in &stored_sequences {
        let mut got = sequences.remove(conversation).unwrap_or_default();
        got.sort();
        assert_eq!(
            got,
            (1..=*last).collect::<Vec<_>>(),
            "{conversation}: events after dedupe"
        );
    }
    // Each conversation was assigned once (nobody transfers here), to the agent that accepted it.
    for (conversation, agents) in &assigned {
        assert_eq!(agents.len(), 1, "{conversation} assigned {agents:?}");
        // (An accept whose answer was lost with the killed daemon is not in the desks' logs.)
        if let Some(acceptor) = accepted_by.get(conversation) {
            assert_eq!(acceptor, &agents[0], "{conversation}");
        }
    }
    let duplicates = received.len() - seen.len();
    println!(
        "crash test: {rounds} kills in {:?}; sent {sent:?}; acknowledged {} (http {}, nats {}, amqp {}, smtp {}); \
         {} conversations, {} accepted by agents, {} events ({} published again, deduped by id)",
        started.elapsed(),
        acknowledged.len(),
        acked_http.lock().unwrap().len(),
        acked_nats.lock().unwrap().len(),
        acked_amqp.lock().unwrap().len(),
        acked_smtp.lock().unwrap().len(),
        stored_sequences.len(),
        accepted_by.len(),
        published.len(),
        duplicates,
    );
    assert!(
        !accepted_by.is_empty(),
        "the agents accepted nothing: the test proved nothing about owners"
    );

    drop(store);
    drop(daemon);
    events_reader.abort();
    common::delete_nats_streams(NATS, &nats_name).await;
    common::delete_amqp_topology(&amqp, &amqp_prefix).await;
}
