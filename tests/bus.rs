//! The message buses against the real NATS JetStream (127.0.0.1:4222) and RabbitMQ (127.0.0.1:5672):
//! inbound messages routed and offered, events in order with CloudEvents fields, dead letters with
//! the reason, agent commands with a reply, redelivery after a crash creating nothing twice, a
//! broker outage that delays events without losing any (customer chats carry on meanwhile), and a
//! locked store that makes the daemon hand a message back to the broker until it can store it. Each test uses its own subject prefix,
//! streams, exchanges and queues, and removes them at the end, so tests run in parallel.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull};
use common::{ADMIN, Daemon, Proxy, api_message, eventually, unique_name};
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties, ExchangeKind};
use serde_json::{Value, json};

const NATS: &str = "127.0.0.1:4222";
const RABBITMQ: &str = "127.0.0.1:5672";

/// What each test needs of a bus, done with that broker's own client.
trait TestBus: Sized {
    /// The host:port the daemon would use without a proxy.
    const BROKER: &'static str;
    /// The metric label of this bus.
    const NAME: &'static str;
    /// The daemon's `[bus.*]` section, connecting to `address` (host:port).
    fn daemon_config(&self, address: &str) -> String;
    async fn publish_inbound(&self, channel: &str, payload: &[u8]);
    /// The next event published (CloudEvent document), failing after 20 s.
    async fn next_event(&mut self) -> Value;
    /// Sends a command with this `Authorization` header (none if `None`) and returns the reply
    /// document.
    async fn command_with(
        &self,
        agent: &str,
        verb: &str,
        payload: Value,
        authorization: Option<&str>,
    ) -> Value;
    /// Sends a command with the agent's own token and returns the reply document.
    async fn command(&self, agent: &str, verb: &str, payload: Value) -> Value {
        let authorization = format!("Bearer {}", common::agent_token(agent));
        self.command_with(agent, verb, payload, Some(&authorization))
            .await
    }
    /// The next dead letter: its body and the reason header.
    async fn next_dead_letter(&mut self) -> (Vec<u8>, String);
    async fn cleanup(self);
    /// Reads the events again from where the broker keeps them, after the test left its reader
    /// unread for a long while.
    fn reopen_events(&mut self) {}
}

// ----- NATS JetStream ---------------------------------------------------------------------------

struct NatsBus {
    prefix: String,
    inbound_stream: String,
    publish_stream: String,
    client: async_nats::Client,
    jetstream: jetstream::Context,
    events: Option<pull::Ordered>,
    dead: Option<pull::Ordered>,
}

impl NatsBus {
    async fn new() -> NatsBus {
        let name = unique_name("t");
        let client = async_nats::connect(NATS)
            .await
            .expect("NATS on 127.0.0.1:4222");
        NatsBus {
            inbound_stream: format!("{name}_in").to_uppercase(),
            publish_stream: format!("{name}_out").to_uppercase(),
            prefix: name,
            jetstream: jetstream::new(client.clone()),
            client,
            events: None,
            dead: None,
        }
    }

    /// An ordered consumer over what the daemon published on `subject` (once its stream exists).
    async fn reader(&self, subject: String) -> pull::Ordered {
        let stream = eventually(20, "the daemon to create its publish stream", || async {
            self.jetstream.get_stream(&self.publish_stream).await.ok()
        })
        .await;
        stream
            .create_consumer(pull::OrderedConfig {
                filter_subject: subject,
                ..Default::default()
            })
            .await
            .unwrap()
            .messages()
            .await
            .unwrap()
    }
}

async fn next_nats(reader: &mut pull::Ordered) -> async_nats::Message {
    tokio::time::timeout(Duration::from_secs(20), reader.next())
        .await
        .expect("a message within 20 s")
        .expect("stream open")
        .expect("message ok")
        .into()
}

impl TestBus for NatsBus {
    const BROKER: &'static str = NATS;
    const NAME: &'static str = "nats";

    fn daemon_config(&self, address: &str) -> String {
        format!(
            "[bus]\nreconnect_initial_ms = 50\nreconnect_max_ms = 500\n\n[bus.nats]\nenabled = true\nurl = \"nats://{address}\"\nsubject_prefix = \"{}\"\ninbound_stream = \"{}\"\npublish_stream = \"{}\"\nconsumer = \"{}\"\ncommand_queue_group = \"{}\"\nack_wait_seconds = 2\n",
            self.prefix, self.inbound_stream, self.publish_stream, self.prefix, self.prefix
        )
    }

    async fn publish_inbound(&self, channel: &str, payload: &[u8]) {
        let subject = format!("{}.inbound.{channel}", self.prefix);
        let jetstream = &self.jetstream;
        // Until the daemon created the stream there is no responder: try again.
        eventually(20, "the inbound stream to take a message", || async {
            let ack = jetstream
                .publish(subject.clone(), payload.to_vec().into())
                .await
                .ok()?;
            ack.await.ok()
        })
        .await;
    }

    async fn next_event(&mut self) -> Value {
        if self.events.is_none() {
            self.events = Some(self.reader(format!("{}.events.>", self.prefix)).await);
        }
        let message = next_nats(self.events.as_mut().unwrap()).await;
        let document: Value = serde_json::from_slice(&message.payload).unwrap();
        // JetStream deduplicates by the event id.
        let headers = message.headers.expect("headers");
        assert_eq!(
            headers.get("Nats-Msg-Id").map(|id| id.as_str().to_owned()),
            document["id"].as_str().map(str::to_owned)
        );
        assert!(
            message.subject.ends_with(
                document["type"]
                    .as_str()
                    .unwrap()
                    .trim_start_matches("io.switchboard.")
            )
        );
        document
    }

    async fn command_with(
        &self,
        agent: &str,
        verb: &str,
        payload: Value,
        authorization: Option<&str>,
    ) -> Value {
        let subject = format!("{}.cmd.agent.{agent}.{verb}", self.prefix);
        let client = &self.client;
        let body = payload.to_string();
        let mut headers = async_nats::HeaderMap::new();
        if let Some(authorization) = authorization {
            headers.insert("Authorization", authorization);
        }
        // The daemon subscribes when it connects: retry "no responders" until it has.
        let reply = eventually(20, "the daemon to answer commands", || async {
            tokio::time::timeout(
                Duration::from_secs(5),
                client.request_with_headers(subject.clone(), headers.clone(), body.clone().into()),
            )
            .await
            .ok()?
            .ok()
        })
        .await;
        serde_json::from_slice(&reply.payload).unwrap()
    }

    async fn next_dead_letter(&mut self) -> (Vec<u8>, String) {
        if self.dead.is_none() {
            self.dead = Some(self.reader(format!("{}.dead.*", self.prefix)).await);
        }
        let message = next_nats(self.dead.as_mut().unwrap()).await;
        let reason = message
            .headers
            .as_ref()
            .and_then(|headers| headers.get("Switchboard-Error"))
            .map(|reason| reason.as_str().to_owned())
            .unwrap_or_default();
        (message.payload.to_vec(), reason)
    }

    /// An ordered consumer nobody pulled from for a minute is an inactive ephemeral consumer, which
    /// the server removes: start a new one over the whole stream (the test dedupes by event id).
    fn reopen_events(&mut self) {
        self.events = None;
    }

    async fn cleanup(self) {
        drop(self.events);
        drop(self.dead);
        let _ = self.jetstream.delete_stream(&self.inbound_stream).await;
        let _ = self.jetstream.delete_stream(&self.publish_stream).await;
    }
}

// ----- RabbitMQ ---------------------------------------------------------------------------------

struct AmqpBus {
    prefix: String,
    connection: Connection,
    channel: lapin::Channel,
    events: lapin::Consumer,
    dead: Option<lapin::Consumer>,
    replies: lapin::Consumer,
    reply_queue: String,
}

impl AmqpBus {
    fn name(&self, what: &str) -> String {
        format!("{}.{what}", self.prefix)
    }

    /// Waits until the daemon declared its queue `<prefix>.<what>` (a passive declare succeeds).
    async fn wait_for_queue(&self, what: &str) {
        let queue = self.name(what);
        eventually(20, "the daemon to declare its queues", || async {
            let probe = self.connection.create_channel().await.ok()?;
            let passive = QueueDeclareOptions {
                passive: true,
                ..Default::default()
            };
            let declared = probe
                .queue_declare(queue.as_str().into(), passive, FieldTable::default())
                .await
                .ok();
            let _ = probe.close(200, "probed".into()).await;
            declared
        })
        .await;
    }

    async fn new() -> AmqpBus {
        let prefix = unique_name("t");
        let connection = Connection::connect(
            &format!("amqp://guest:guest@{RABBITMQ}/%2f"),
            ConnectionProperties::default(),
        )
        .await
        .expect("RabbitMQ on 127.0.0.1:5672");
        let channel = connection.create_channel().await.unwrap();
        // Declared as the daemon declares it (idempotent), so the test's queue can bind at once.
        let events_exchange = format!("{prefix}.events");
        channel
            .exchange_declare(
                events_exchange.as_str().into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        let events_queue = format!("{prefix}.test-events");
        channel
            .queue_declare(
                events_queue.as_str().into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        channel
            .queue_bind(
                events_queue.as_str().into(),
                events_exchange.as_str().into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let events = consume(&channel, &events_queue).await;
        let reply_queue = format!("{prefix}.test-replies");
        channel
            .queue_declare(
                reply_queue.as_str().into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        let replies = consume(&channel, &reply_queue).await;
        AmqpBus {
            prefix,
            connection,
            channel,
            events,
            dead: None,
            replies,
            reply_queue,
        }
    }
}

async fn consume(channel: &lapin::Channel, queue: &str) -> lapin::Consumer {
    channel
        .basic_consume(
            queue.into(),
            format!("test-{}", ulid::Ulid::new()).into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap()
}

async fn next_amqp(consumer: &mut lapin::Consumer) -> lapin::message::Delivery {
    let delivery = tokio::time::timeout(Duration::from_secs(20), consumer.next())
        .await
        .expect("a delivery within 20 s")
        .expect("consumer open")
        .expect("delivery ok");
    delivery.ack(BasicAckOptions::default()).await.unwrap();
    delivery
}

impl TestBus for AmqpBus {
    const BROKER: &'static str = RABBITMQ;
    const NAME: &'static str = "amqp";

    fn daemon_config(&self, address: &str) -> String {
        format!(
            "[bus]\nreconnect_initial_ms = 50\nreconnect_max_ms = 500\n\n{}",
            common::amqp_config(address, &self.prefix)
        )
    }

    async fn publish_inbound(&self, channel: &str, payload: &[u8]) {
        let exchange = self.name("inbound");
        // The exchange exists once the daemon declared it; wait for its queue too, so the message
        // is routed somewhere.
        self.wait_for_queue("inbound").await;
        self.channel
            .basic_publish(
                exchange.as_str().into(),
                channel.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                payload,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .unwrap();
    }

    async fn next_event(&mut self) -> Value {
        let delivery = next_amqp(&mut self.events).await;
        let document: Value = serde_json::from_slice(&delivery.data).unwrap();
        assert_eq!(
            delivery
                .properties
                .message_id()
                .as_ref()
                .map(|id| id.to_string()),
            document["id"].as_str().map(str::to_owned)
        );
        assert_eq!(*delivery.properties.delivery_mode(), Some(2), "persistent");
        assert_eq!(
            format!("io.switchboard.{}", delivery.routing_key),
            document["type"].as_str().unwrap()
        );
        document
    }

    async fn command_with(
        &self,
        agent: &str,
        verb: &str,
        payload: Value,
        authorization: Option<&str>,
    ) -> Value {
        let correlation = ulid::Ulid::new().to_string();
        let mut headers = FieldTable::default();
        if let Some(authorization) = authorization {
            headers.insert(
                "authorization".into(),
                AMQPValue::LongString(authorization.into()),
            );
        }
        let exchange = self.name("commands");
        self.wait_for_queue("commands").await;
        self.channel
            .basic_publish(
                exchange.as_str().into(),
                format!("agent.{agent}.{verb}").as_str().into(),
                BasicPublishOptions::default(),
                payload.to_string().as_bytes(),
                BasicProperties::default()
                    .with_reply_to(self.reply_queue.as_str().into())
                    .with_correlation_id(correlation.as_str().into())
                    .with_headers(headers),
            )
            .await
            .unwrap();
        // Replies come on this test's own queue: ours is the one with our correlation id.
        let mut replies = self.replies.clone();
        loop {
            let reply = next_amqp(&mut replies).await;
            if reply
                .properties
                .correlation_id()
                .as_ref()
                .map(|id| id.to_string())
                == Some(correlation.clone())
            {
                return serde_json::from_slice(&reply.data).unwrap();
            }
        }
    }

    async fn next_dead_letter(&mut self) -> (Vec<u8>, String) {
        if self.dead.is_none() {
            // The daemon declares the dead-letter queue; consume from it once it exists.
            self.wait_for_queue("dead").await;
            let queue = self.name("dead");
            self.dead = Some(consume(&self.channel, &queue).await);
        }
        let delivery = next_amqp(self.dead.as_mut().unwrap()).await;
        let reason = delivery
            .properties
            .headers()
            .as_ref()
            .and_then(|headers| headers.inner().get("x-switchboard-error").cloned())
            .map(|value| match value {
                AMQPValue::LongString(text) => text.to_string(),
                other => format!("{other:?}"),
            })
            .unwrap_or_default();
        (delivery.data, reason)
    }

    async fn cleanup(self) {
        common::delete_amqp_topology(&self.connection, &self.prefix).await;
        let _ = self.connection.close(200, "done".into()).await;
    }
}

// ----- the behaviours, for either bus -----------------------------------------------------------

/// The events of one conversation, in arrival order, until `kind` arrives.
async fn events_until<B: TestBus>(bus: &mut B, conversation: &str, kind: &str) -> Vec<Value> {
    let mut events = Vec::new();
    loop {
        let event = bus.next_event().await;
        if event["subject"] != json!(conversation) {
            continue;
        }
        let done = event["type"] == json!(format!("io.switchboard.{kind}"));
        events.push(event);
        if done {
            return events;
        }
    }
}

fn assert_cloud_event(event: &Value) {
    assert_eq!(event["specversion"], "1.0");
    for field in ["id", "source", "type", "time", "subject", "sequence"] {
        assert!(event[field].is_string(), "{field} missing in {event}");
    }
    assert!(
        event["type"]
            .as_str()
            .unwrap()
            .starts_with("io.switchboard.")
    );
    assert!(event["data"].is_object());
}

/// Sequence numbers of each conversation's events, as they arrived, must count 1, 2, 3... once
/// events delivered again (at least once: after a lost confirmation) are dropped by id, as the
/// documented consumer does.
fn assert_in_order(events: &[Value]) {
    let mut seen: BTreeMap<String, u64> = BTreeMap::new();
    let mut ids = std::collections::HashSet::new();
    for event in events {
        if !ids.insert(event["id"].as_str().unwrap().to_owned()) {
            continue;
        }
        let Some(conversation) = event["subject"].as_str() else {
            continue;
        };
        let sequence: u64 = event["sequence"].as_str().unwrap().parse().unwrap();
        let last = seen.entry(conversation.to_owned()).or_insert(0);
        assert_eq!(sequence, *last + 1, "out of order or missing: {event}");
        *last = sequence;
    }
}

/// Starts the daemon on `config` and waits until it has connected to the broker and declared its
/// topology: a message published earlier would find no bound queue (AMQP drops it) or no consumer.
async fn start_connected<B: TestBus>(config: &str) -> Daemon {
    let daemon = Daemon::start(config);
    let connected = format!("switchboard_bus_connected{{bus=\"{}\"}}", B::NAME);
    eventually(20, "the bus to connect", || async {
        (daemon.metric(&connected).await == Some(1.0)).then_some(())
    })
    .await;
    daemon
}

async fn available(daemon: &Daemon, agent: &str) -> common::AgentSocket {
    let mut socket = daemon.agent_socket(agent).await;
    let answer = socket
        .command(json!({ "type": "presence", "presence": "available" }))
        .await;
    assert_eq!(answer["type"], "ack", "{answer}");
    socket
}

async fn routed_offered_and_commanded<B: TestBus>(mut bus: B) {
    let daemon = start_connected::<B>(&bus.daemon_config(B::BROKER)).await;
    let mut alice = available(&daemon, "alice").await;
    let message = api_message("bus-1", "customer-bus-1", "My order never came");
    bus.publish_inbound("api", message.to_string().as_bytes())
        .await;

    let offer = alice.next_of("offer").await;
    let conversation = offer["conversation_id"].as_str().unwrap().to_owned();

    // A command carries its agent's own token, checked as on the API.
    let accept = json!({ "conversation_id": conversation });
    for (agent, authorization, code) in [
        ("alice", None, "unauthorized"),
        (
            "alice",
            Some("Bearer not-a-token".to_owned()),
            "unauthorized",
        ),
        ("alice", Some("demo-alice-token".to_owned()), "unauthorized"),
        (
            "alice",
            Some(format!("Bearer {}", common::INGEST)),
            "forbidden",
        ),
        ("alice", Some(format!("Bearer {ADMIN}")), "forbidden"),
        (
            "alice",
            Some(format!("Bearer {}", common::agent_token("bob"))),
            "forbidden",
        ),
        // Bob's own token on Bob's address: Alice's offer is not his to take.
        (
            "bob",
            Some(format!("Bearer {}", common::agent_token("bob"))),
            "not_offered",
        ),
    ] {
        let refused = bus
            .command_with(agent, "accept", accept.clone(), authorization.as_deref())
            .await;
        assert_eq!(refused["ok"], false, "{agent} {authorization:?}: {refused}");
        assert_eq!(
            refused["error"]["code"], code,
            "{agent} {authorization:?}: {refused}"
        );
    }

    // Accept over the bus; the reply says it was done; a refused command says why.
    let reply = bus
        .command(
            "alice",
            "accept",
            json!({ "conversation_id": conversation }),
        )
        .await;
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(reply["result"]["conversation_id"], json!(conversation));
    let refused = bus
        .command(
            "alice",
            "accept",
            json!({ "conversation_id": conversation }),
        )
        .await;
    assert_eq!(refused["ok"], false, "{refused}");
    assert_eq!(refused["error"]["code"], "not_offered");
    let unknown = bus.command("alice", "dance", json!({})).await;
    assert_eq!(unknown["error"]["code"], "bad_command", "{unknown}");

    let events = events_until(&mut bus, &conversation, "conversation.assigned").await;
    let kinds: Vec<&str> = events
        .iter()
        .map(|event| event["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds.first().copied(),
        Some("io.switchboard.conversation.created")
    );
    assert!(
        kinds.contains(&"io.switchboard.message.received"),
        "{kinds:?}"
    );
    assert!(
        kinds.contains(&"io.switchboard.conversation.offered"),
        "{kinds:?}"
    );
    for event in &events {
        assert_cloud_event(event);
    }
    assert_in_order(&events);
    assert_eq!(
        events.last().unwrap()["data"]["agent_id"],
        "alice",
        "assigned to alice"
    );
    alice.close().await;
    drop(daemon);
    bus.cleanup().await;
}

async fn invalid_payloads_are_dead_lettered<B: TestBus>(mut bus: B) {
    let daemon = start_connected::<B>(&bus.daemon_config(B::BROKER)).await;
    bus.publish_inbound("api", b"{ not json").await;
    let (body, reason) = bus.next_dead_letter().await;
    assert_eq!(body, b"{ not json");
    assert!(reason.starts_with("invalid_json:"), "reason: {reason}");

    let no_text = json!({ "channel": "api", "provider": "crm", "provider_message_id": "x", "from": { "address": "c" }, "text": " " });
    bus.publish_inbound("api", no_text.to_string().as_bytes())
        .await;
    let (_, reason) = bus.next_dead_letter().await;
    assert!(
        reason.starts_with("invalid_message:") && reason.contains("text"),
        "reason: {reason}"
    );

    let elsewhere = api_message("bus-2", "customer-2", "hello");
    bus.publish_inbound("sms", elsewhere.to_string().as_bytes())
        .await;
    let (_, reason) = bus.next_dead_letter().await;
    assert!(reason.starts_with("channel_mismatch:"), "reason: {reason}");

    let sample = format!("switchboard_bus_dead_lettered_total{{bus=\"{}\"}}", B::NAME);
    eventually(20, "the dead-letter count", || async {
        (daemon.metric(&sample).await == Some(3.0)).then_some(())
    })
    .await;
    // Nothing was stored.
    let (_, listed) = daemon.get("/v1/admin/conversations", ADMIN).await;
    assert_eq!(listed["conversations"], json!([]));
    drop(daemon);
    bus.cleanup().await;
}

/// The daemon stores a message, but its ack never reaches the broker (the proxy holds it back), and
/// the daemon dies. Restarted, it gets the message again and stores nothing twice.
async fn redelivery_after_a_crash_creates_nothing_twice<B: TestBus>(bus: B) {
    let proxy = Proxy::start(B::BROKER).await;
    let mut daemon = start_connected::<B>(&bus.daemon_config(&proxy.address.to_string())).await;
    let mut alice = available(&daemon, "alice").await;
    // A first message proves the consumer is running (its pull request is out, for NATS).
    let first = api_message("crash-1", "customer-crash-1", "first");
    bus.publish_inbound("api", first.to_string().as_bytes())
        .await;
    alice.next_of("offer").await;

    proxy.freeze_upstream();
    let second = api_message("crash-2", "customer-crash-2", "second");
    bus.publish_inbound("api", second.to_string().as_bytes())
        .await;
    // Offered means stored and routed; its ack is stuck in the proxy.
    alice.next_of("offer").await;
    alice.close().await;
    daemon.kill();
    proxy.cut();
    proxy.restore();
    daemon.spawn();

    let duplicates = "switchboard_messages_duplicate_total{channel=\"api\"}";
    eventually(
        30,
        "the redelivered message to be found a duplicate",
        || async {
            daemon
                .metric(duplicates)
                .await
                .filter(|count| *count >= 1.0)
        },
    )
    .await;
    let (_, listed) = daemon
        .get("/v1/admin/conversations?channel=api", ADMIN)
        .await;
    assert_eq!(
        listed["conversations"].as_array().unwrap().len(),
        2,
        "one conversation per message: {listed}"
    );
    drop(daemon);
    bus.cleanup().await;
}

/// The store is locked by another process past its busy timeout: a message the daemon cannot store
/// is handed back to the broker (never acked, never dead-lettered), and once the lock is gone it
/// comes again and is stored once.
async fn a_locked_store_hands_the_message_back_and_loses_nothing<B: TestBus>(bus: B) {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("switchboard.sqlite");
    common::write_config_with_store(
        dir.path(),
        "",
        &format!("path = \"{}\"\nbusy_timeout_ms = 300", store.display()),
        &bus.daemon_config(B::BROKER),
    );
    let daemon = Daemon::start_in(dir);
    let connected = format!("switchboard_bus_connected{{bus=\"{}\"}}", B::NAME);
    eventually(20, "the bus to connect", || async {
        (daemon.metric(&connected).await == Some(1.0)).then_some(())
    })
    .await;
    let mut alice = available(&daemon, "alice").await;
    let first = api_message("locked-1", "customer-locked-1", "first");
    bus.publish_inbound("api", first.to_string().as_bytes())
        .await;
    alice.next_of("offer").await;

    // Another process (a backup, a stray sqlite3 shell) holds the write lock.
    let locker = rusqlite::Connection::open(&store).unwrap();
    locker.execute_batch("BEGIN IMMEDIATE").unwrap();
    let second = api_message("locked-2", "customer-locked-2", "second");
    bus.publish_inbound("api", second.to_string().as_bytes())
        .await;
    let redeliveries = format!("switchboard_bus_redeliveries_total{{bus=\"{}\"}}", B::NAME);
    eventually(20, "the message to be handed back", || async {
        daemon
            .metric(&redeliveries)
            .await
            .filter(|count| *count >= 1.0)
    })
    .await;
    locker.execute_batch("ROLLBACK").unwrap();
    drop(locker);

    let offer = alice.next_of("offer").await;
    let conversation = offer["conversation_id"].as_str().unwrap().to_owned();
    let history = daemon.history("alice", &conversation).await;
    assert_eq!(history.len(), 1, "{history:?}");
    assert_eq!(
        history[0]["body"]["provider_message_id"], "locked-2",
        "{history:?}"
    );
    let (_, listed) = daemon
        .get("/v1/admin/conversations?channel=api", ADMIN)
        .await;
    assert_eq!(
        listed["conversations"].as_array().unwrap().len(),
        2,
        "one conversation per message: {listed}"
    );
    let dead = format!("switchboard_bus_dead_lettered_total{{bus=\"{}\"}}", B::NAME);
    assert_eq!(daemon.metric(&dead).await, Some(0.0));
    alice.close().await;
    drop(daemon);
    bus.cleanup().await;
}

/// How long the outage tests cut the broker: a few seconds, or 60 s with `SWITCHBOARD_LONG_TESTS=1`.
fn outage_length() -> Duration {
    if std::env::var("SWITCHBOARD_LONG_TESTS").is_ok_and(|flag| flag == "1") {
        Duration::from_secs(60)
    } else {
        Duration::from_secs(3)
    }
}

/// The broker goes away for [`outage_length`] while messages keep arriving over HTTP: intake goes
/// on, events wait in the outbox, `/readyz` says degraded (still 200). It comes back and the daemon
/// reconnects by itself: every event arrives, each conversation's in order.
async fn an_outage_delays_events_and_loses_none<B: TestBus>(mut bus: B) {
    let outage = outage_length();
    let started = std::time::Instant::now();
    let proxy = Proxy::start(B::BROKER).await;
    let daemon = start_connected::<B>(&bus.daemon_config(&proxy.address.to_string())).await;
    let connected = format!("switchboard_bus_connected{{bus=\"{}\"}}", B::NAME);
    let mut alice = available(&daemon, "alice").await;
    // The events stream/queue is known to work before the outage.
    let (status, before) = daemon
        .ingest(api_message("out-0", "customer-out-0", "before"))
        .await;
    assert_eq!(status, 202);
    let first = before["conversation_id"].as_str().unwrap().to_owned();
    let mut received = events_until(&mut bus, &first, "conversation.offered").await;

    proxy.cut();
    eventually(20, "the bus to be seen down", || async {
        (daemon.metric(&connected).await == Some(0.0)).then_some(())
    })
    .await;
    let (status, ready) = daemon.get("/readyz", ADMIN).await;
    assert_eq!(status, 200, "degraded but serving: {ready}");
    assert_eq!(ready["status"], "degraded");
    assert_eq!(ready["buses"][B::NAME], "disconnected");

    let cut_at = tokio::time::Instant::now();
    // Load through the whole outage: one message every 20 ms, each from its own customer.
    let load = {
        let (http, url) = (daemon.http.clone(), daemon.url("/v1/messages"));
        tokio::spawn(async move {
            let mut pace = tokio::time::interval(Duration::from_millis(20));
            let mut taken = Vec::new();
            let mut number = 0;
            while cut_at.elapsed() < outage {
                pace.tick().await;
                let response = http
                    .post(&url)
                    .bearer_auth(common::INGEST)
                    .json(&api_message(
                        &format!("load-{number}"),
                        &format!("customer-load-{number}"),
                        "during the outage",
                    ))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(
                    response.status(),
                    202,
                    "HTTP intake works during the outage"
                );
                let receipt: Value = response.json().await.unwrap();
                taken.push(receipt["conversation_id"].as_str().unwrap().to_owned());
                number += 1;
            }
            taken
        })
    };
    let mut conversations = vec![first];
    for index in 1..=3 {
        let (status, answer) = daemon
            .ingest(api_message(
                &format!("out-{index}"),
                &format!("customer-out-{index}"),
                "during the outage",
            ))
            .await;
        assert_eq!(status, 202, "HTTP intake works during the outage: {answer}");
        conversations.push(answer["conversation_id"].as_str().unwrap().to_owned());
    }
    let accepted = alice
        .command(json!({ "type": "accept", "conversation_id": conversations[0] }))
        .await;
    assert_eq!(accepted["type"], "ack", "{accepted}");
    eventually(20, "events to queue in the outbox", || async {
        daemon
            .metric("switchboard_outbox_backlog")
            .await
            .filter(|backlog| *backlog >= 6.0)
    })
    .await;

    let under_load = load.await.unwrap();
    assert!(
        daemon.metric(&connected).await == Some(0.0),
        "still cut off after {outage:?}"
    );
    conversations.extend(under_load.iter().cloned());
    proxy.restore();
    let restored_at = std::time::Instant::now();
    eventually(30, "the bus to reconnect", || async {
        (daemon.metric(&connected).await == Some(1.0)).then_some(())
    })
    .await;
    bus.reopen_events();
    // Every conversation's creation and message, and the first one's assignment, arrive in order.
    let mut pending: Vec<(String, &str)> = conversations[1..]
        .iter()
        .map(|conversation| (conversation.clone(), "io.switchboard.message.received"))
        .collect();
    pending.push((
        conversations[0].clone(),
        "io.switchboard.conversation.assigned",
    ));
    while !pending.is_empty() {
        let event = bus.next_event().await;
        pending.retain(|(conversation, kind)| {
            !(event["subject"] == json!(conversation) && event["type"] == json!(kind))
        });
        received.push(event);
    }
    let ours: Vec<Value> = received
        .into_iter()
        .filter(|event| {
            conversations
                .iter()
                .any(|conversation| event["subject"] == json!(conversation))
        })
        .collect();
    assert_in_order(&ours);
    eventually(20, "the outbox to drain", || async {
        (daemon.metric("switchboard_outbox_backlog").await == Some(0.0)).then_some(())
    })
    .await;
    println!(
        "{} cut for {outage:?}: {} messages taken over HTTP meanwhile, every event published {:?} after \
         the broker returned; {:?} in all",
        B::NAME,
        under_load.len(),
        restored_at.elapsed(),
        started.elapsed()
    );
    alice.close().await;
    drop(daemon);
    bus.cleanup().await;
}

/// While the broker is down and more events wait for it than the relay reads in a round, a
/// customer still chats as usual: the chat hears of routing and replies from the store, not from
/// the relay that waits for the broker. The waiting events reach the broker once it is back.
async fn a_chat_goes_on_while_the_broker_is_down<B: TestBus>(bus: B) {
    // More than the relay reads per round (1 024), so a relay-fed chat would hear nothing new.
    const BACKLOG: usize = 1_100;
    let proxy = Proxy::start(B::BROKER).await;
    let daemon = start_connected::<B>(&bus.daemon_config(&proxy.address.to_string())).await;
    let connected = format!("switchboard_bus_connected{{bus=\"{}\"}}", B::NAME);
    // Bob takes one API conversation and steps away; its customer then writes on and on, each
    // message an event while nothing else waits in the queue.
    let mut bob = available(&daemon, "bob").await;
    let (status, _) = daemon
        .ingest(api_message("busy-0", "customer-busy", "Where is my refund"))
        .await;
    assert_eq!(status, 202);
    let busy = bob.accept_next_offer().await;
    let away = bob
        .command(json!({ "type": "presence", "presence": "away" }))
        .await;
    assert_eq!(away["type"], "ack", "{away}");

    proxy.cut();
    eventually(20, "the bus to be seen down", || async {
        (daemon.metric(&connected).await == Some(0.0)).then_some(())
    })
    .await;
    for number in 1..=BACKLOG {
        let (status, receipt) = daemon
            .ingest(api_message(
                &format!("busy-{number}"),
                "customer-busy",
                "Any news?",
            ))
            .await;
        assert_eq!(status, 202, "{receipt}");
        assert_eq!(receipt["conversation_id"], busy.as_str(), "{receipt}");
    }
    eventually(20, "the events to wait for the broker", || async {
        daemon
            .metric("switchboard_outbox_backlog")
            .await
            .filter(|backlog| *backlog > 1_024.0)
    })
    .await;

    let chat = common::chat_with_alice(&daemon, &daemon, "visitor-during-the-outage").await;
    assert_eq!(daemon.metric(&connected).await, Some(0.0), "still cut off");

    proxy.restore();
    eventually(
        60,
        "the outbox to drain once the broker is back",
        || async { (daemon.metric("switchboard_outbox_backlog").await == Some(0.0)).then_some(()) },
    )
    .await;
    let (_, conversation) = daemon
        .get(&format!("/v1/admin/conversations/{chat}"), ADMIN)
        .await;
    assert_eq!(
        conversation["conversation"]["status"], "resolved",
        "{conversation}"
    );
    bob.close().await;
    drop(daemon);
    bus.cleanup().await;
}

#[tokio::test]
async fn nats_down_leaves_customer_chats_untouched() {
    a_chat_goes_on_while_the_broker_is_down(NatsBus::new().await).await;
}

#[tokio::test]
async fn nats_inbound_is_routed_and_offered_and_commands_are_answered() {
    routed_offered_and_commanded(NatsBus::new().await).await;
}

#[tokio::test]
async fn amqp_inbound_is_routed_and_offered_and_commands_are_answered() {
    routed_offered_and_commanded(AmqpBus::new().await).await;
}

#[tokio::test]
async fn nats_invalid_payloads_are_terminated_and_dead_lettered_with_the_reason() {
    invalid_payloads_are_dead_lettered(NatsBus::new().await).await;
}

#[tokio::test]
async fn amqp_invalid_payloads_are_dead_lettered_with_the_reason() {
    invalid_payloads_are_dead_lettered(AmqpBus::new().await).await;
}

#[tokio::test]
async fn nats_redelivery_after_a_crash_creates_nothing_twice() {
    redelivery_after_a_crash_creates_nothing_twice(NatsBus::new().await).await;
}

#[tokio::test]
async fn amqp_redelivery_after_a_crash_creates_nothing_twice() {
    redelivery_after_a_crash_creates_nothing_twice(AmqpBus::new().await).await;
}

#[tokio::test]
async fn nats_outage_delays_events_and_loses_none() {
    an_outage_delays_events_and_loses_none(NatsBus::new().await).await;
}

#[tokio::test]
async fn amqp_outage_delays_events_and_loses_none() {
    an_outage_delays_events_and_loses_none(AmqpBus::new().await).await;
}

#[tokio::test]
async fn nats_hands_a_message_back_while_the_store_is_locked() {
    a_locked_store_hands_the_message_back_and_loses_nothing(NatsBus::new().await).await;
}

#[tokio::test]
async fn amqp_hands_a_message_back_while_the_store_is_locked() {
    a_locked_store_hands_the_message_back_and_loses_nothing(AmqpBus::new().await).await;
}
