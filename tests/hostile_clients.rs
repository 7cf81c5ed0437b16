//! Slow and hostile clients against the real binary: slowloris on HTTP (headers trickled) and on
//! SMTP (a command trickled), a thousand idle customer WebSockets, oversize headers, and oversize
//! bodies on every ingest route (the API, each provider's webhook, raw email).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{Daemon, INGEST, api_message};
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

/// Sends `first`, then one byte of `trickle` every 200 ms, until the server closes the
/// connection; returns what the server said and how long it held on. Fails after `limit`.
async fn trickle_until_closed(
    address: &str,
    first: &[u8],
    trickle: &[u8],
    limit: Duration,
) -> (String, Duration) {
    let started = tokio::time::Instant::now();
    let mut stream = TcpStream::connect(address).await.unwrap();
    stream.write_all(first).await.unwrap();
    let mut ticks = tokio::time::interval(Duration::from_millis(200));
    let mut said = Vec::new();
    let mut buffer = [0_u8; 4096];
    let mut next = trickle.iter().cycle();
    loop {
        tokio::select! {
            _ = ticks.tick() => {
                assert!(started.elapsed() < limit, "still open after {limit:?}; said {:?}", String::from_utf8_lossy(&said));
                let byte = *next.next().unwrap();
                if stream.write_all(&[byte]).await.is_err() {
                    break;
                }
            }
            read = stream.read(&mut buffer) => match read {
                Ok(0) | Err(_) => break,
                Ok(n) => said.extend_from_slice(&buffer[..n]),
            },
        }
    }
    (
        String::from_utf8_lossy(&said).into_owned(),
        started.elapsed(),
    )
}

fn host_port(base: &str) -> String {
    base.trim_start_matches("http://").to_owned()
}

#[tokio::test]
async fn http_slowloris_is_closed_after_the_header_read_timeout() {
    let daemon = Daemon::start_with("header_read_timeout_seconds = 1", "");
    let address = host_port(&daemon.base);
    let slow = tokio::spawn({
        let address = address.clone();
        async move {
            trickle_until_closed(
                &address,
                b"GET /healthz HTTP/1.1\r\nHost: switchboard\r\n",
                b"X-Slow: a\r\n",
                Duration::from_secs(10),
            )
            .await
        }
    });
    // Meanwhile everyone else is served.
    let (status, _) = daemon.get("/healthz", "").await;
    assert_eq!(status, 200);
    let (said, held) = slow.await.unwrap();
    assert!(
        held >= Duration::from_millis(900),
        "not closed before the timeout: {held:?}"
    );
    assert!(
        said.is_empty() || said.starts_with("HTTP/1.1 408"),
        "closed without serving the request: {said:?}"
    );
    // A request whose headers arrive in time is still served on a fresh connection. Not the
    // shared client's pooled one: the server closes a keep-alive connection left idle past the
    // header timeout, and a request sent as it closes fails (a race, not a refusal).
    let fresh = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let response = fresh.get(daemon.url("/healthz")).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 200);
}

#[tokio::test]
async fn smtp_slowloris_is_closed_after_the_command_timeout() {
    let dir = tempfile::tempdir().unwrap();
    common::write_config(
        dir.path(),
        "",
        "[channels.email]\nmailboxes = [\"support@example.com\"]\n\n\
         [channels.email.smtp]\nenabled = true\nlisten = \"127.0.0.1:0\"\nhostname = \"mx.test\"\n\
         command_timeout_seconds = 1\n",
    );
    let daemon = Daemon::start_in(dir);
    // Before the fix each byte restarted the timeout, so this session never ended.
    let (said, held) = trickle_until_closed(
        &daemon.listeners["smtp"],
        b"",
        b"EHLO a-very-slow-client.example",
        Duration::from_secs(10),
    )
    .await;
    assert!(said.starts_with("220 "), "{said}");
    assert!(said.contains("421 4.4.2"), "told why: {said}");
    assert!(held >= Duration::from_millis(900), "{held:?}");
}

#[tokio::test]
async fn a_thousand_idle_customer_sockets_do_not_stop_service_and_are_closed_when_idle() {
    let daemon = Daemon::start("[chat]\nidle_timeout_seconds = 3\n");
    let url = format!("{}/v1/chat/stream", daemon.base.replace("http://", "ws://"));
    let mut idle = Vec::new();
    for _ in 0..1000 {
        let (socket, _) = tokio_tungstenite::connect_async(url.as_str())
            .await
            .expect("customer websocket");
        idle.push(socket);
    }
    // Agents and intake are served while they sit there.
    let mut alice = daemon.agent_socket("alice").await;
    let presence = alice
        .command(serde_json::json!({ "type": "presence", "presence": "available" }))
        .await;
    assert_eq!(presence["type"], "ack", "{presence}");
    let (status, answer) = daemon
        .ingest(api_message("idle-1", "customer-1", "served?"))
        .await;
    assert_eq!(status, 202, "{answer}");
    let offer = alice.next_of("offer").await;
    assert_eq!(offer["conversation_id"], answer["conversation_id"]);

    // Every idle one is closed by the server after the idle timeout, with the reason.
    for mut socket in idle {
        let closed = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                match socket.next().await {
                    Some(Ok(Message::Close(frame))) => return frame,
                    Some(Ok(_)) => {}
                    None | Some(Err(_)) => return None,
                }
            }
        })
        .await
        .expect("an idle customer socket is closed");
        if let Some(frame) = closed {
            assert_eq!(frame.reason.as_str(), "idle");
        }
    }
}

#[tokio::test]
async fn oversize_headers_are_refused() {
    let daemon = Daemon::start("");
    let mut stream = TcpStream::connect(host_port(&daemon.base)).await.unwrap();
    let huge = "a".repeat(1024 * 1024);
    let request = format!(
        "POST /v1/messages HTTP/1.1\r\nHost: switchboard\r\nX-Huge: {huge}\r\nContent-Length: 2\r\n\r\n{{}}"
    );
    // The server may stop reading (and close) before all of it is written.
    let _ = stream.write_all(request.as_bytes()).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
        .await
        .expect("answered or closed in time");
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 431"),
        "431 or closed: {answer:?}"
    );
    // Nothing was stored.
    assert!(daemon.conversations().await.is_empty());
}

const TELEGRAM: &str =
    "[channels.telegram.main]\nbot_token = \"123456:ABC-DEF\"\nsecret_token = \"tg-secret\"\n";
const VONAGE: &str = "[channels.vonage.main]\napi_key = \"abcd1234\"\napi_secret = \"vonage-api-secret\"\nsignature_secret = \"vonage-signature\"\nnumbers = [\"+447700900000\"]\n";
const META: &str = "[channels.meta.main]\napp_secret = \"meta-app-secret\"\nverify_token = \"verify-me\"\naccess_token = \"graph-token\"\nwhatsapp_phone_number_ids = [\"106540352242922\"]\n";
const TWILIO: &str = "[channels.twilio.main]\naccount_sid = \"ACbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb\"\nauth_token = \"tw\"\npublic_url = \"https://sb.example.com/v1/webhooks/twilio/main\"\nnumbers = [\"+14155550100\"]\n";

#[tokio::test]
async fn oversize_bodies_get_413_on_every_ingest_route() {
    let dir = tempfile::tempdir().unwrap();
    common::write_config(
        dir.path(),
        "body_limit_bytes = 65536",
        &format!(
            "{TELEGRAM}\n{VONAGE}\n{META}\n{TWILIO}\n[channels.email]\nmailboxes = [\"support@example.com\"]\n\
             max_message_bytes = 131072\n"
        ),
    );
    let daemon = Daemon::start_in(dir);
    // Bigger than both the API limit and the raw email limit.
    let body = "x".repeat(256 * 1024);
    let routes = [
        ("/v1/messages", "application/json"),
        ("/v1/webhooks/telegram/main", "application/json"),
        ("/v1/webhooks/vonage/main", "application/json"),
        ("/v1/webhooks/meta/main", "application/json"),
        (
            "/v1/webhooks/twilio/main",
            "application/x-www-form-urlencoded",
        ),
        ("/v1/channels/email/raw", "message/rfc822"),
    ];
    for (route, content_type) in routes {
        // Telegram's secret is a header, checked before the body is read: give the right one, so
        // the body's size is what refuses the request.
        let sent = daemon
            .http
            .post(daemon.url(route))
            .bearer_auth(INGEST)
            .header("content-type", content_type)
            .header("x-telegram-bot-api-secret-token", "tg-secret")
            .body(body.clone())
            .send()
            .await;
        match sent {
            Ok(response) => {
                let status = response.status().as_u16();
                let text = response.text().await.unwrap_or_default();
                assert_eq!(status, 413, "{route}: {text}");
                assert!(text.contains("too_large"), "{route} says why: {text}");
            }
            // A server that refuses from the Content-Length alone answers 413 and closes without
            // reading the rest; the client, still writing the body, may see the connection reset
            // before it reads the answer. Refused either way: what matters is that nothing is
            // stored (checked below).
            Err(error) => assert!(
                error.is_request() || error.is_body(),
                "{route}: refused by a reset, not another failure: {error}"
            ),
        }
    }
    assert!(
        daemon.conversations().await.is_empty(),
        "an oversize request stored something"
    );
    // Within the limits the same routes still take input (a raw email between the two limits).
    let mail = format!(
        "From: <a@example.net>\r\nTo: <support@example.com>\r\nSubject: big\r\nMessage-ID: <big@example.net>\r\n\r\n{}\r\n",
        "y".repeat(100 * 1024)
    );
    let response = daemon
        .http
        .post(daemon.url("/v1/channels/email/raw"))
        .bearer_auth(INGEST)
        .header("content-type", "message/rfc822")
        .body(mail)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 202);
    assert_eq!(daemon.conversations().await.len(), 1);
}
