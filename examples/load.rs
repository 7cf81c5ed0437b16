//! Load tool for the ingest benchmark (`scripts/bench-ingest`), run as a separate process.
//!
//! * `load bare [--listen ADDR]` — the baseline: a bare axum endpoint that parses and validates the
//!   same `switchboard.message.v1` JSON and answers 200, storing nothing.
//! * `load drive --url URL --token T --messages N [--concurrency C | --rate R] [--agents a,b,c]` —
//!   posts N distinct messages and prints one JSON line: messages/s and latency percentiles of the
//!   HTTP answer; with `--agents` (their WebSockets opened with `demo-<id>-token`) also the latency
//!   from sending a message to its offer or assignment reaching an agent (ingest → offer).
//!   `--resolve` makes the agents resolve each conversation as soon as it is assigned to them, so a
//!   long run (the soak in `scripts/bench`) keeps a steady number of open conversations.
//!   `--url` may list several instances (`URL1,URL2,...`): message i goes to URL i mod n
//!   (round-robin), agents connect to the first.
//!   `--kind twilio --secret S --public-url U` posts signed Twilio SMS webhooks to
//!   `/v1/webhooks/twilio/bench` instead, `--kind whatsapp --secret S` signed WhatsApp Cloud API
//!   deliveries to `/v1/webhooks/meta/bench`: the same message, through each adapter.
//! * `load fsync --dir D --rate R --count N [--chain K]` — the disk's own latency, the floor under
//!   every durable acknowledgement: N paced samples, each K appends of 4 KiB to a file in D, each
//!   followed by `fdatasync` (what one SQLite WAL commit costs the disk); prints the percentiles.
//!   `--chain 2` is the two commits between a message and its offer (the message, then the
//!   routing decision).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Json;
use axum::http::StatusCode;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use switchboard::message::InboundMessage;
use tokio_tungstenite::tungstenite::Message;

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("bare") => bare(arg(&args, "--listen").unwrap_or_else(|| "127.0.0.1:0".into())).await,
        Some("drive") => drive(&args).await,
        Some("fsync") => fsync(&args),
        _ => eprintln!(
            "usage: load bare [--listen ADDR] | load drive --url URL --token T --messages N [--concurrency C] [--rate R] [--agents a,b] [--resolve] | load fsync --dir D --rate R --count N [--chain K]"
        ),
    }
}

async fn bare(listen: String) {
    async fn ingest(body: axum::body::Bytes) -> (StatusCode, Json<Value>) {
        match serde_json::from_slice::<InboundMessage>(&body) {
            Ok(message) if message.validate().is_ok() => {
                (StatusCode::OK, Json(json!({ "ok": true })))
            }
            _ => (
                StatusCode::UNPROCESSABLE_ENTITY,
                Json(json!({ "ok": false })),
            ),
        }
    }
    let app = axum::Router::new().route("/v1/messages", axum::routing::post(ingest));
    let listener = tokio::net::TcpListener::bind(listen).await.unwrap();
    println!("listening on http://{}", listener.local_addr().unwrap());
    axum::serve(listener, app).await.unwrap();
}

fn fsync(args: &[String]) {
    use std::io::Write;
    use std::os::unix::fs::FileExt;
    let dir = std::path::PathBuf::from(arg(args, "--dir").expect("--dir"));
    let rate: f64 = arg(args, "--rate").map_or(500.0, |r| r.parse().unwrap());
    let count: usize = arg(args, "--count").map_or(5_000, |n| n.parse().unwrap());
    let chain: usize = arg(args, "--chain").map_or(1, |n| n.parse().unwrap());
    let path = dir.join(format!("fsync-probe-{}", std::process::id()));
    // A ring of pages written over and over, as a WAL is once it wraps: an append would also make
    // every fdatasync write the file's new size.
    const RING: u64 = 1024;
    let page = [0x5a_u8; 4096];
    let mut file = std::fs::File::create(&path).unwrap();
    for _ in 0..RING {
        file.write_all(&page).unwrap();
    }
    file.sync_all().unwrap();
    let mut next_page = 0_u64;
    let interval = Duration::from_secs_f64(1.0 / rate);
    let started = Instant::now();
    let mut latencies = Vec::with_capacity(count);
    for sample in 0..count {
        // Paced from the start time, as the load driver paces messages.
        let due = started + interval.mul_f64(sample as f64);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let began = Instant::now();
        for _ in 0..chain {
            file.write_all_at(&page, (next_page % RING) * 4096).unwrap();
            file.sync_data().unwrap();
            next_page += 1;
        }
        latencies.push(began.elapsed().as_secs_f64() * 1000.0);
    }
    drop(file);
    let _ = std::fs::remove_file(&path);
    let mut line = summary(latencies);
    line["rate"] = json!(rate);
    line["chain"] = json!(chain);
    println!("{line}");
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn summary(mut samples: Vec<f64>) -> Value {
    samples.sort_by(|a, b| a.total_cmp(b));
    json!({ "count": samples.len(), "p50_ms": percentile(&samples, 0.5), "p99_ms": percentile(&samples, 0.99), "p999_ms": percentile(&samples, 0.999), "max_ms": samples.last() })
}

async fn drive(args: &[String]) {
    let urls: Arc<Vec<String>> = Arc::new(
        arg(args, "--url")
            .expect("--url")
            .split(',')
            .map(str::to_owned)
            .collect(),
    );
    let url = urls[0].clone();
    let token = arg(args, "--token").unwrap_or_default();
    let messages: usize = arg(args, "--messages").map_or(10_000, |n| n.parse().unwrap());
    let concurrency: usize = arg(args, "--concurrency").map_or(32, |n| n.parse().unwrap());
    let rate: Option<f64> = arg(args, "--rate").map(|r| r.parse().unwrap());
    let run = arg(args, "--run").unwrap_or_else(|| ulid::Ulid::new().to_string());
    let kind = Arc::new(Kind::from_args(args));
    let resolve = args.iter().any(|a| a == "--resolve");
    // Phone numbers must be new in every run (a known number joins its open conversation).
    let area = 200 + rand::random_range(0..700u32);
    // The offer push can arrive before the HTTP answer naming its conversation: whichever of the two
    // comes second records the latency (send time → push time).
    let sent_at: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let pushed_at: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let offer_latencies: Arc<Mutex<Vec<f64>>> = Arc::default();
    let mut listeners = Vec::new();
    if let Some(agents) = arg(args, "--agents") {
        for agent in agents.split(',') {
            let ws = format!(
                "{}/v1/agents/{agent}/stream?access_token=demo-{agent}-token",
                url.replace("http://", "ws://")
            );
            // A small read buffer: the default 128 KiB is zero-filled on every read, and this
            // process shares the machine with the daemon it measures.
            let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
                .read_buffer_size(8 * 1024);
            let (mut socket, _) =
                tokio_tungstenite::connect_async_with_config(ws, Some(config), false)
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
            // Wait until the agent is available before any message is sent.
            while let Some(Ok(message)) = socket.next().await {
                if let Message::Text(text) = message {
                    let answer: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                    if answer["type"] == "ack" {
                        break;
                    }
                    assert_ne!(answer["type"], "error", "presence refused: {answer}");
                }
            }
            let (sent_at, pushed_at, latencies) =
                (sent_at.clone(), pushed_at.clone(), offer_latencies.clone());
            listeners.push(tokio::spawn(async move {
                while let Some(Ok(Message::Text(text))) = socket.next().await {
                    let push: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                    if push["type"] == "offer" || push["type"] == "assigned" {
                        let conversation = push["conversation_id"]
                            .as_str()
                            .unwrap_or_default()
                            .to_owned();
                        let now = Instant::now();
                        if resolve && push["type"] == "assigned" {
                            let command =
                                json!({ "type": "resolve", "conversation_id": conversation });
                            if socket
                                .send(Message::Text(command.to_string().into()))
                                .await
                                .is_err()
                            {
                                break;
                            }
                        }
                        let started = sent_at.lock().unwrap().remove(&conversation);
                        match started {
                            Some(started) => latencies
                                .lock()
                                .unwrap()
                                .push((now - started).as_secs_f64() * 1000.0),
                            None => {
                                pushed_at.lock().unwrap().insert(conversation, now);
                            }
                        }
                    }
                }
            }));
        }
    }
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .build()
        .unwrap();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let http_latencies: Arc<Mutex<Vec<f64>>> = Arc::default();
    let errors = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let workers = if rate.is_some() {
        concurrency.max(64)
    } else {
        concurrency
    };
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (
            client,
            urls,
            token,
            run,
            next,
            http_latencies,
            errors,
            sent_at,
            pushed_at,
            offer_latencies,
            kind,
        ) = (
            client.clone(),
            urls.clone(),
            token.clone(),
            run.clone(),
            next.clone(),
            http_latencies.clone(),
            errors.clone(),
            sent_at.clone(),
            pushed_at.clone(),
            offer_latencies.clone(),
            kind.clone(),
        );
        tasks.push(tokio::spawn(async move {
            loop {
                let index = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if index >= messages {
                    break;
                }
                if let Some(rate) = rate {
                    // Open loop: message i leaves at i / rate, whatever the answers do.
                    let due = started + Duration::from_secs_f64(index as f64 / rate);
                    tokio::time::sleep_until(due.into()).await;
                }
                let url = &urls[index % urls.len()];
                let request = kind.request(&client, url, &token, &run, area, index);
                let begun = Instant::now();
                let response = request.send().await;
                match response {
                    Ok(response) if response.status().is_success() => {
                        let elapsed = begun.elapsed().as_secs_f64() * 1000.0;
                        http_latencies.lock().unwrap().push(elapsed);
                        if let Ok(answer) = response.json::<Value>().await
                            && let Some(conversation) = answer["conversation_id"].as_str()
                        {
                            let pushed = pushed_at.lock().unwrap().remove(conversation);
                            match pushed {
                                Some(at) => offer_latencies
                                    .lock()
                                    .unwrap()
                                    .push((at - begun).as_secs_f64() * 1000.0),
                                None => {
                                    sent_at
                                        .lock()
                                        .unwrap()
                                        .insert(conversation.to_owned(), begun);
                                }
                            }
                        }
                    }
                    _ => {
                        errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    // Offers for the last messages may still be in flight: wait for them briefly.
    let wait_until = Instant::now() + Duration::from_secs(5);
    while !listeners.is_empty()
        && !sent_at.lock().unwrap().is_empty()
        && Instant::now() < wait_until
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let http = http_latencies.lock().unwrap().clone();
    let offers = offer_latencies.lock().unwrap().clone();
    println!(
        "{}",
        json!({
            "messages": messages,
            "errors": errors.load(std::sync::atomic::Ordering::Relaxed),
            "seconds": elapsed,
            "messages_per_second": http.len() as f64 / elapsed,
            "http": summary(http),
            "ingest_to_offer": if listeners.is_empty() { Value::Null } else { summary(offers) },
        })
    );
    for listener in listeners {
        listener.abort();
    }
}

const TEXT: &str = "Hello, I need help with my order please.";

/// What the load posts: the generic API message, or the same message as a signed provider webhook.
#[derive(Debug)]
enum Kind {
    Api,
    Twilio { secret: String, public_url: String },
    Whatsapp { secret: String },
}

impl Kind {
    fn from_args(args: &[String]) -> Kind {
        let secret = || arg(args, "--secret").expect("--secret");
        match arg(args, "--kind").as_deref() {
            None | Some("api") => Kind::Api,
            Some("twilio") => Kind::Twilio {
                secret: secret(),
                public_url: arg(args, "--public-url").expect("--public-url"),
            },
            Some("whatsapp") => Kind::Whatsapp { secret: secret() },
            Some(other) => panic!("unknown --kind {other}"),
        }
    }

    fn request(
        &self,
        client: &reqwest::Client,
        url: &str,
        token: &str,
        run: &str,
        area: u32,
        index: usize,
    ) -> reqwest::RequestBuilder {
        let phone = format!("1{area}{index:07}");
        match self {
            Kind::Api => {
                let body = json!({
                    "channel": "api", "provider": "load", "provider_message_id": format!("{run}-{index}"),
                    "from": { "address": format!("load-{run}-{index}") }, "text": TEXT
                });
                client
                    .post(format!("{url}/v1/messages"))
                    .bearer_auth(token)
                    .json(&body)
            }
            Kind::Twilio { secret, public_url } => {
                let form: Vec<(String, String)> = [
                    ("MessageSid", format!("SM{run}{index}")),
                    ("AccountSid", "ACbench".to_owned()),
                    ("From", format!("+{phone}")),
                    ("To", "+14155550100".to_owned()),
                    ("Body", TEXT.to_owned()),
                    ("NumMedia", "0".to_owned()),
                    ("SmsStatus", "received".to_owned()),
                    ("ApiVersion", "2010-04-01".to_owned()),
                ]
                .into_iter()
                .map(|(name, value)| (name.to_owned(), value))
                .collect();
                let signature = switchboard::channels::twilio::signature(secret, public_url, &form);
                client
                    .post(format!("{url}/v1/webhooks/twilio/bench"))
                    .header("x-twilio-signature", signature)
                    .form(&form)
            }
            Kind::Whatsapp { secret } => {
                let body = json!({
                    "object": "whatsapp_business_account",
                    "entry": [{ "id": "102290129340398", "changes": [{ "field": "messages", "value": {
                        "messaging_product": "whatsapp",
                        "metadata": { "display_phone_number": "15550783881", "phone_number_id": "106540352242922" },
                        "contacts": [{ "profile": { "name": "Load" }, "wa_id": phone }],
                        "messages": [{ "from": phone, "id": format!("wamid.{run}{index}"),
                            "timestamp": "1749416383", "type": "text", "text": { "body": TEXT } }],
                    }}]}]
                })
                .to_string();
                let signature = switchboard::channels::meta::signature(secret, body.as_bytes());
                client
                    .post(format!("{url}/v1/webhooks/meta/bench"))
                    .header("x-hub-signature-256", signature)
                    .header("content-type", "application/json")
                    .body(body)
            }
        }
    }
}
