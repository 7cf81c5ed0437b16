//! Load tool for the bus benchmark (`scripts/bench-bus`), run as a separate process.
//!
//! * `bus_load raw --bus nats|amqp --messages N` — the broker's own ceiling: publish N messages (the
//!   same JSON switchboard gets) to a fresh stream or queue and consume + ack them in the same
//!   process; prints messages/s and publish → consume latency.
//! * `bus_load drive --bus nats|amqp --url URL --prefix P --messages N --agents a,b` — publishes N
//!   distinct messages to a running switchboard's inbound stream/exchange (names from prefix `P`,
//!   as `scripts/bench-bus` configures it) and waits for each to reach an agent's desktop; prints
//!   messages/s (first publish → last offer) and publish → offer latency. Which conversation a
//!   message became is read from its `message.received` event.
//! * `bus_load clean --bus nats|amqp --prefix P` — removes the streams, or exchanges and queues, that
//!   a switchboard configured by `scripts/bench-bus` with prefix `P` declared.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::pull, stream};
use futures_util::{SinkExt, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message;

const NATS: &str = "127.0.0.1:4222";
const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// Publishes awaiting their broker confirmation at most.
const IN_FLIGHT: usize = 1024;

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn summary(mut samples: Vec<f64>) -> Value {
    samples.sort_by(|a, b| a.total_cmp(b));
    json!({ "count": samples.len(), "p50_ms": percentile(&samples, 0.5), "p99_ms": percentile(&samples, 0.99), "max_ms": samples.last() })
}

fn message(run: &str, index: usize) -> Vec<u8> {
    json!({
        "channel": "api", "provider": "load", "provider_message_id": format!("{run}-{index}"),
        "from": { "address": format!("load-{run}-{index}") }, "text": "Hello, I need help with my order please."
    })
    .to_string()
    .into_bytes()
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let bus = arg(&args, "--bus").unwrap_or_else(|| "nats".into());
    let messages: usize = arg(&args, "--messages").map_or(10_000, |n| n.parse().unwrap());
    let run = ulid::Ulid::new().to_string();
    let report = match (args.get(1).map(String::as_str), bus.as_str()) {
        (Some("raw"), "nats") => raw_nats(&run, messages).await,
        (Some("raw"), "amqp") => raw_amqp(&run, messages).await,
        (Some("drive"), _) => drive(&args, &bus, &run, messages).await,
        (Some("clean"), _) => clean(&bus, &arg(&args, "--prefix").expect("--prefix")).await,
        _ => {
            eprintln!(
                "usage: bus_load raw --bus nats|amqp --messages N | bus_load drive --bus nats|amqp --url URL --prefix P --messages N --agents a,b | bus_load clean --bus nats|amqp --prefix P"
            );
            return;
        }
    };
    println!("{report}");
}

fn report(bus: &str, mode: &str, messages: usize, seconds: f64, latencies: Vec<f64>) -> Value {
    json!({
        "bus": bus, "mode": mode, "messages": messages, "seconds": seconds,
        "messages_per_second": latencies.len() as f64 / seconds,
        "latency": summary(latencies),
    })
}

/// Publishes `messages` payloads with at most IN_FLIGHT unconfirmed, each confirmation awaited in
/// its own task; `publish(index)` returns the confirmation future.
async fn publish_all<F, Fut>(
    messages: usize,
    sent: Arc<Mutex<HashMap<String, Instant>>>,
    run: &str,
    publish: F,
) where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = Option<tokio::task::JoinHandle<()>>>,
{
    let mut confirmations = Vec::with_capacity(messages);
    for index in 0..messages {
        sent.lock()
            .unwrap()
            .insert(format!("{run}-{index}"), Instant::now());
        if let Some(confirmation) = publish(index).await {
            confirmations.push(confirmation);
        }
    }
    for confirmation in confirmations {
        confirmation.await.unwrap();
    }
}

async fn raw_nats(run: &str, messages: usize) -> Value {
    let client = async_nats::connect(NATS).await.expect("NATS");
    let context = jetstream::new(client);
    let name = format!("BENCH_RAW_{run}");
    let subject = format!("bench-raw-{run}.inbound.api");
    let stream = context
        .create_stream(stream::Config {
            name: name.clone(),
            subjects: vec![subject.clone()],
            ..Default::default()
        })
        .await
        .unwrap();
    let consumer = stream
        .create_consumer(pull::Config {
            durable_name: Some("raw".into()),
            max_ack_pending: 1024,
            ..Default::default()
        })
        .await
        .unwrap();
    let sent: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let started = Instant::now();
    let consuming = {
        let sent = sent.clone();
        tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(messages);
            let mut stream = consumer
                .stream()
                .max_messages_per_batch(1024)
                .messages()
                .await
                .unwrap();
            while latencies.len() < messages {
                let message = stream.next().await.unwrap().unwrap();
                // Parse as switchboard would, so both sides pay for the JSON.
                let document: Value = serde_json::from_slice(&message.payload).unwrap();
                message.ack().await.unwrap();
                let key = document["provider_message_id"].as_str().unwrap();
                if let Some(at) = sent.lock().unwrap().remove(key) {
                    latencies.push(at.elapsed().as_secs_f64() * 1000.0);
                }
            }
            latencies
        })
    };
    let permits = Arc::new(Semaphore::new(IN_FLIGHT));
    publish_all(messages, sent, run, |index| {
        let (context, subject, permits) = (context.clone(), subject.clone(), permits.clone());
        let payload = message(run, index);
        async move {
            let permit = permits.acquire_owned().await.unwrap();
            let ack = context.publish(subject, payload.into()).await.unwrap();
            Some(tokio::spawn(async move {
                ack.await.unwrap();
                drop(permit);
            }))
        }
    })
    .await;
    let latencies = consuming.await.unwrap();
    let seconds = started.elapsed().as_secs_f64();
    let _ = context.delete_stream(&name).await;
    report("nats", "raw", messages, seconds, latencies)
}

async fn raw_amqp(run: &str, messages: usize) -> Value {
    let connection = Connection::connect(AMQP, ConnectionProperties::default())
        .await
        .expect("RabbitMQ");
    let queue = format!("bench-raw-{run}");
    let publisher = connection.create_channel().await.unwrap();
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    publisher
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions::durable(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let consumer_channel = connection.create_channel().await.unwrap();
    consumer_channel
        .basic_qos(256, BasicQosOptions::default())
        .await
        .unwrap();
    let mut consumer = consumer_channel
        .basic_consume(
            queue.as_str().into(),
            "raw".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let sent: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let started = Instant::now();
    let consuming = {
        let sent = sent.clone();
        tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(messages);
            while latencies.len() < messages {
                let delivery = consumer.next().await.unwrap().unwrap();
                let document: Value = serde_json::from_slice(&delivery.data).unwrap();
                delivery.ack(BasicAckOptions::default()).await.unwrap();
                let key = document["provider_message_id"].as_str().unwrap();
                if let Some(at) = sent.lock().unwrap().remove(key) {
                    latencies.push(at.elapsed().as_secs_f64() * 1000.0);
                }
            }
            latencies
        })
    };
    let permits = Arc::new(Semaphore::new(IN_FLIGHT));
    publish_all(messages, sent, run, |index| {
        let (publisher, queue, permits) = (publisher.clone(), queue.clone(), permits.clone());
        let payload = message(run, index);
        async move {
            let permit = permits.acquire_owned().await.unwrap();
            let confirm = publisher
                .basic_publish(
                    "".into(),
                    queue.as_str().into(),
                    BasicPublishOptions::default(),
                    &payload,
                    BasicProperties::default().with_delivery_mode(2),
                )
                .await
                .unwrap();
            Some(tokio::spawn(async move {
                assert!(confirm.await.unwrap().is_ack());
                drop(permit);
            }))
        }
    })
    .await;
    let latencies = consuming.await.unwrap();
    let seconds = started.elapsed().as_secs_f64();
    let _ = publisher
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    report("amqp", "raw", messages, seconds, latencies)
}

/// Opens each agent's desktop, goes available, and records when each conversation reached one.
async fn agents(url: &str, names: &str, offered: Arc<Mutex<HashMap<String, Instant>>>) {
    for agent in names.split(',') {
        let ws = format!(
            "{}/v1/agents/{agent}/stream?access_token=demo-{agent}-token",
            url.replace("http://", "ws://")
        );
        let (mut socket, _) = tokio_tungstenite::connect_async(ws)
            .await
            .expect("agent websocket");
        socket
            .send(Message::Text(
                json!({ "type": "presence", "presence": "available" })
                    .to_string()
                    .into(),
            ))
            .await
            .unwrap();
        while let Some(Ok(message)) = socket.next().await {
            if let Message::Text(text) = message {
                let answer: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                if answer["type"] == "ack" {
                    break;
                }
            }
        }
        let offered = offered.clone();
        tokio::spawn(async move {
            while let Some(Ok(Message::Text(text))) = socket.next().await {
                let push: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                if push["type"] == "offer" || push["type"] == "assigned" {
                    let conversation = push["conversation_id"].as_str().unwrap_or_default();
                    offered
                        .lock()
                        .unwrap()
                        .entry(conversation.to_owned())
                        .or_insert_with(Instant::now);
                }
            }
        });
    }
}

async fn drive(args: &[String], bus: &str, run: &str, messages: usize) -> Value {
    let url = arg(args, "--url").expect("--url");
    let prefix = arg(args, "--prefix").expect("--prefix");
    let offered: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    agents(
        &url,
        &arg(args, "--agents").expect("--agents"),
        offered.clone(),
    )
    .await;
    // provider_message_id → conversation, from the message.received events.
    let conversations: Arc<Mutex<HashMap<String, String>>> = Arc::default();
    let sent: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let started = Instant::now();
    match bus {
        "nats" => {
            let client = async_nats::connect(NATS).await.expect("NATS");
            let mut received = client
                .subscribe(format!("{prefix}.events.message.received"))
                .await
                .unwrap();
            client.flush().await.unwrap();
            let conversations = conversations.clone();
            tokio::spawn(async move {
                while let Some(event) = received.next().await {
                    record_conversation(&conversations, &event.payload);
                }
            });
            let context = jetstream::new(client);
            let permits = Arc::new(Semaphore::new(IN_FLIGHT));
            let subject = format!("{prefix}.inbound.api");
            publish_all(messages, sent.clone(), run, |index| {
                let (context, subject, permits) =
                    (context.clone(), subject.clone(), permits.clone());
                let payload = message(run, index);
                async move {
                    let permit = permits.acquire_owned().await.unwrap();
                    let ack = context.publish(subject, payload.into()).await.unwrap();
                    Some(tokio::spawn(async move {
                        ack.await.unwrap();
                        drop(permit);
                    }))
                }
            })
            .await;
        }
        _ => {
            let connection = Connection::connect(AMQP, ConnectionProperties::default())
                .await
                .expect("RabbitMQ");
            let channel = connection.create_channel().await.unwrap();
            let events = format!("{prefix}.bench-received");
            channel
                .queue_declare(
                    events.as_str().into(),
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
                    events.as_str().into(),
                    format!("{prefix}.events").as_str().into(),
                    "message.received".into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .unwrap();
            let mut consumer = channel
                .basic_consume(
                    events.as_str().into(),
                    "bench".into(),
                    BasicConsumeOptions {
                        no_ack: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await
                .unwrap();
            let conversations = conversations.clone();
            tokio::spawn(async move {
                while let Some(Ok(event)) = consumer.next().await {
                    record_conversation(&conversations, &event.data);
                }
            });
            let publisher = connection.create_channel().await.unwrap();
            publisher
                .confirm_select(ConfirmSelectOptions::default())
                .await
                .unwrap();
            let permits = Arc::new(Semaphore::new(IN_FLIGHT));
            let exchange = format!("{prefix}.inbound");
            publish_all(messages, sent.clone(), run, |index| {
                let (publisher, exchange, permits) =
                    (publisher.clone(), exchange.clone(), permits.clone());
                let payload = message(run, index);
                async move {
                    let permit = permits.acquire_owned().await.unwrap();
                    let confirm = publisher
                        .basic_publish(
                            exchange.as_str().into(),
                            "api".into(),
                            BasicPublishOptions::default(),
                            &payload,
                            BasicProperties::default().with_delivery_mode(2),
                        )
                        .await
                        .unwrap();
                    Some(tokio::spawn(async move {
                        assert!(confirm.await.unwrap().is_ack());
                        drop(permit);
                    }))
                }
            })
            .await;
        }
    }
    // Wait for every message to reach an agent (or give up after a minute without progress).
    let mut last_progress = (0, Instant::now());
    let finished = loop {
        let done = offered.lock().unwrap().len();
        if done >= messages {
            break Instant::now();
        }
        if done > last_progress.0 {
            last_progress = (done, Instant::now());
        } else if last_progress.1.elapsed() > Duration::from_secs(60) {
            eprintln!("only {done} of {messages} messages reached an agent");
            break Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    // The last message.received events may trail the offers a little.
    let mapped_by = Instant::now() + Duration::from_secs(10);
    while conversations.lock().unwrap().len() < messages && Instant::now() < mapped_by {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let seconds = (finished - started).as_secs_f64();
    let sent = sent.lock().unwrap();
    let offered = offered.lock().unwrap();
    let latencies: Vec<f64> = conversations
        .lock()
        .unwrap()
        .iter()
        .filter_map(|(key, conversation)| {
            let at = offered.get(conversation)?;
            let from = sent.get(key)?;
            Some((*at - *from).as_secs_f64() * 1000.0)
        })
        .collect();
    let mut result = report(bus, "switchboard", messages, seconds, latencies);
    result["messages_per_second"] = json!(offered.len().min(messages) as f64 / seconds);
    result
}

fn record_conversation(conversations: &Mutex<HashMap<String, String>>, payload: &[u8]) {
    let Ok(event) = serde_json::from_slice::<Value>(payload) else {
        return;
    };
    let (Some(key), Some(conversation)) = (
        event["data"]["message"]["provider_message_id"].as_str(),
        event["subject"].as_str(),
    ) else {
        return;
    };
    conversations
        .lock()
        .unwrap()
        .insert(key.to_owned(), conversation.to_owned());
}

/// Removes what a bench daemon declared (names as `scripts/bench-bus` configures them).
async fn clean(bus: &str, prefix: &str) -> Value {
    if bus == "nats" {
        let context = jetstream::new(async_nats::connect(NATS).await.expect("NATS"));
        for suffix in ["_IN", "_OUT"] {
            let _ = context
                .delete_stream(format!("{}{suffix}", prefix.to_uppercase()))
                .await;
        }
    } else {
        let connection = Connection::connect(AMQP, ConnectionProperties::default())
            .await
            .expect("RabbitMQ");
        let channel = connection.create_channel().await.unwrap();
        for queue in ["inbound", "dead-letter", "command"] {
            let _ = channel
                .queue_delete(
                    format!("{prefix}.{queue}").as_str().into(),
                    QueueDeleteOptions::default(),
                )
                .await;
        }
        for exchange in ["inbound", "events", "dead-letter", "command", "outbound"] {
            let _ = channel
                .exchange_delete(
                    format!("{prefix}.{exchange}").as_str().into(),
                    lapin::options::ExchangeDeleteOptions::default(),
                )
                .await;
        }
    }
    json!({ "cleaned": prefix })
}
