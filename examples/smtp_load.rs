//! Load tool for the SMTP intake benchmark (`scripts/bench-smtp`), run as a separate process.
//!
//! * `smtp_load sink [--listen ADDR]` — the baseline: a minimal SMTP server that reads each
//!   command and the DATA and answers (220 greeting, 354 for DATA, 250 for everything else), storing
//!   nothing. Prints `listening on ADDR`.
//! * `smtp_load drive --address ADDR --messages N --connections C` — sends N distinct 20 KB
//!   multipart messages (text, HTML and a base64 attachment) over C connections, one transaction
//!   at a time per connection (MAIL, RCPT, DATA, then the message, waiting for each answer), and
//!   prints one JSON line: messages/s and latency percentiles from MAIL to the final 250.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("sink") => sink(arg(&args, "--listen").unwrap_or_else(|| "127.0.0.1:0".into())).await,
        Some("drive") => drive(&args).await,
        _ => eprintln!(
            "usage: smtp_load sink [--listen ADDR] | smtp_load drive --address ADDR --messages N --connections C"
        ),
    }
}

async fn sink(listen: String) {
    let listener = TcpListener::bind(&listen).await.unwrap();
    println!("listening on {}", listener.local_addr().unwrap());
    loop {
        let (stream, _) = listener.accept().await.unwrap();
        tokio::spawn(async move {
            let _ = sink_session(stream).await;
        });
    }
}

async fn sink_session(stream: TcpStream) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let (reader, mut writer) = stream.into_split();
    let mut reader = BufReader::new(reader);
    writer.write_all(b"220 sink ESMTP\r\n").await?;
    let mut line = Vec::new();
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line).await? == 0 {
            return Ok(());
        }
        let verb = line.get(..4).unwrap_or_default().to_ascii_uppercase();
        match &verb[..] {
            b"DATA" => {
                writer.write_all(b"354 go on\r\n").await?;
                loop {
                    line.clear();
                    if reader.read_until(b'\n', &mut line).await? == 0 {
                        return Ok(());
                    }
                    if line == b".\r\n" {
                        break;
                    }
                }
                writer.write_all(b"250 ok\r\n").await?;
            }
            b"QUIT" => {
                writer.write_all(b"221 bye\r\n").await?;
                return Ok(());
            }
            _ => writer.write_all(b"250 ok\r\n").await?,
        }
    }
}

/// A 20 KB multipart/mixed message: a text and an HTML alternative and a base64 attachment
/// (distinct content per message).
fn message(id: usize) -> String {
    let text = "Hello, my order has not arrived and I would like to know where it is. ".repeat(40);
    let html = format!("<html><body><p>{}</p></body></html>", text.trim());
    // Distinct per message, as customers' files are: a store keeping one copy per content must
    // write every one.
    let mut attachment = format!("receipt {id} of run {}\n", std::process::id()).into_bytes();
    attachment.extend((0..10_300u32).map(|i| (i * 7 % 251) as u8));
    let encoded = base64::engine::general_purpose::STANDARD.encode(&attachment);
    let lines: Vec<&str> = encoded
        .as_bytes()
        .chunks(76)
        .map(|chunk| std::str::from_utf8(chunk).unwrap())
        .collect();
    format!(
        "From: Customer {id} <customer{id}@bench.example>\r\nTo: support@example.com\r\n\
         Subject: Order {id}\r\nMessage-ID: <bench-{id}-{nonce}@bench.example>\r\n\
         Date: Tue, 1 Dec 2026 09:00:00 +0000\r\nMIME-Version: 1.0\r\n\
         Content-Type: multipart/mixed; boundary=\"outer\"\r\n\r\n\
         --outer\r\nContent-Type: multipart/alternative; boundary=\"inner\"\r\n\r\n\
         --inner\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{text}\r\n\
         --inner\r\nContent-Type: text/html; charset=utf-8\r\n\r\n{html}\r\n--inner--\r\n\
         --outer\r\nContent-Type: application/octet-stream\r\n\
         Content-Disposition: attachment; filename=\"receipt-{id}.bin\"\r\n\
         Content-Transfer-Encoding: base64\r\n\r\n{}\r\n--outer--\r\n",
        lines.join("\r\n"),
        nonce = std::process::id(),
    )
}

/// Reads one reply (all its lines); returns its code.
async fn reply(reader: &mut BufReader<tokio::net::tcp::OwnedReadHalf>) -> u16 {
    let mut line = String::new();
    loop {
        line.clear();
        let read = reader.read_line(&mut line).await.unwrap();
        assert!(read > 0, "connection closed");
        if line.as_bytes().get(3) != Some(&b'-') {
            return line
                .get(..3)
                .and_then(|code| code.parse().ok())
                .unwrap_or(0);
        }
    }
}

async fn drive(args: &[String]) {
    let address = arg(args, "--address").expect("--address");
    let messages: usize = arg(args, "--messages").map_or(2000, |n| n.parse().unwrap());
    let connections: usize = arg(args, "--connections").map_or(8, |n| n.parse().unwrap());
    let bodies: Arc<Vec<String>> = Arc::new((0..messages).map(message).collect());
    let bytes = bodies[0].len();
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let (address, bodies, next) = (address.clone(), bodies.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let stream = TcpStream::connect(&address).await.unwrap();
            stream.set_nodelay(true).unwrap();
            let (reader, mut writer) = stream.into_split();
            let mut reader = BufReader::new(reader);
            assert_eq!(reply(&mut reader).await, 220);
            writer.write_all(b"EHLO bench.example\r\n").await.unwrap();
            assert_eq!(reply(&mut reader).await, 250);
            let mut latencies = Vec::new();
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                let Some(body) = bodies.get(index) else { break };
                let sent = Instant::now();
                writer
                    .write_all(
                        format!(
                            "MAIL FROM:<customer{index}@bench.example> SIZE={}\r\n",
                            body.len()
                        )
                        .as_bytes(),
                    )
                    .await
                    .unwrap();
                assert_eq!(reply(&mut reader).await, 250);
                writer
                    .write_all(b"RCPT TO:<support@example.com>\r\n")
                    .await
                    .unwrap();
                assert_eq!(reply(&mut reader).await, 250);
                writer.write_all(b"DATA\r\n").await.unwrap();
                assert_eq!(reply(&mut reader).await, 354);
                writer.write_all(body.as_bytes()).await.unwrap();
                writer.write_all(b".\r\n").await.unwrap();
                let code = reply(&mut reader).await;
                assert_eq!(code, 250, "message {index} refused");
                latencies.push(sent.elapsed());
            }
            writer.write_all(b"QUIT\r\n").await.unwrap();
            latencies
        }));
    }
    let mut latencies: Vec<Duration> = Vec::new();
    for task in tasks {
        latencies.extend(task.await.unwrap());
    }
    let elapsed = started.elapsed();
    latencies.sort();
    let percentile = |p: f64| {
        let index = ((latencies.len() as f64 * p) as usize).min(latencies.len() - 1);
        latencies[index].as_secs_f64() * 1000.0
    };
    println!(
        "{}",
        json!({
            "messages": messages,
            "connections": connections,
            "message_bytes": bytes,
            "seconds": elapsed.as_secs_f64(),
            "messages_per_second": messages as f64 / elapsed.as_secs_f64(),
            "p50_ms": percentile(0.5),
            "p99_ms": percentile(0.99),
        })
    );
}
