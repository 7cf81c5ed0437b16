//! The customer web chat on the real binary: a tokio-tungstenite client plays the customer's browser
//! on `/v1/chat/stream`, agents use their own WebSocket.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::Daemon;
use futures_util::{SinkExt, StreamExt};
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// A customer's chat window.
struct Customer {
    socket: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
}

impl Customer {
    async fn connect(daemon: &Daemon, origin: Option<&str>) -> Result<Customer, u16> {
        let url = format!("{}/v1/chat/stream", daemon.base.replace("http://", "ws://"));
        let mut request = url.into_client_request().unwrap();
        if let Some(origin) = origin {
            request
                .headers_mut()
                .insert("origin", origin.parse().unwrap());
        }
        match tokio_tungstenite::connect_async(request).await {
            Ok((socket, _)) => Ok(Customer { socket }),
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                Err(response.status().as_u16())
            }
            Err(error) => panic!("chat websocket: {error}"),
        }
    }

    /// Connects and starts (or resumes) a session; returns the `session` frame.
    async fn start(daemon: &Daemon, start: Value) -> (Customer, Value) {
        let mut customer = Customer::connect(daemon, None).await.unwrap();
        customer.send(json!({ "type": "start" }).merge(start)).await;
        let session = customer.next().await;
        (customer, session)
    }

    async fn send(&mut self, frame: Value) {
        self.socket
            .send(Message::Text(frame.to_string().into()))
            .await
            .unwrap();
    }

    async fn next(&mut self) -> Value {
        loop {
            let message = tokio::time::timeout(Duration::from_secs(10), self.socket.next())
                .await
                .expect("a frame within 10 s")
                .expect("socket open")
                .expect("socket ok");
            if let Message::Text(text) = message {
                return serde_json::from_str(&text).unwrap();
            }
        }
    }

    async fn next_of(&mut self, kind: &str) -> Value {
        loop {
            let frame = self.next().await;
            if frame["type"] == kind {
                return frame;
            }
        }
    }

    /// Sends a message and waits for its ack (or error), skipping other frames.
    async fn say(&mut self, client_message_id: &str, text: &str) -> Value {
        self.send(
            json!({ "type": "message", "client_message_id": client_message_id, "text": text }),
        )
        .await;
        loop {
            let frame = self.next().await;
            if (frame["type"] == "ack" || frame["type"] == "error")
                && frame["client_message_id"] == client_message_id
            {
                return frame;
            }
        }
    }

    async fn close(mut self) {
        let _ = self.socket.close(None).await;
    }
}

trait Merge {
    fn merge(self, other: Value) -> Value;
}

impl Merge for Value {
    fn merge(mut self, other: Value) -> Value {
        if let (Some(into), Value::Object(from)) = (self.as_object_mut(), other) {
            into.extend(from);
        }
        self
    }
}

const VISITOR: &str = "visitor_0123456789abcdef";

#[tokio::test]
async fn a_customer_chats_with_an_agent_who_accepts_and_replies() {
    let daemon = Daemon::start("");
    let mut alice = daemon.agent_socket("alice").await;
    alice
        .command(json!({ "type": "presence", "presence": "available" }))
        .await;
    let (mut customer, session) =
        Customer::start(&daemon, json!({ "visitor_id": VISITOR, "name": "Ann" })).await;
    assert_eq!(session["type"], "session", "{session}");
    assert_eq!(session["conversation_id"], Value::Null);

    let ack = customer.say("c1", "Hello, my parcel is late").await;
    assert_eq!(ack["type"], "ack", "{ack}");
    assert_eq!(ack["seq"], 1);
    assert_eq!(ack["duplicate"], false);
    let conversation = ack["conversation_id"].as_str().unwrap().to_owned();

    let offered = alice.accept_next_offer().await;
    assert_eq!(offered, conversation);
    let joined = customer.next_of("agent_joined").await;
    assert_eq!(joined["agent_id"], "alice");

    // Typing goes both ways while the agent holds the conversation.
    customer
        .send(json!({ "type": "typing", "active": true }))
        .await;
    let typing = alice.next_of("customer_typing").await;
    assert_eq!(typing["conversation_id"], conversation);
    let ack = alice
        .command(json!({ "type": "typing", "conversation_id": conversation, "active": true }))
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let typing = customer.next_of("typing").await;
    assert_eq!(typing["from"], "agent");

    let (status, _) = daemon
        .reply_as("alice", &conversation, "Let me look at it")
        .await;
    assert_eq!(status, 202);
    let reply = customer.next_of("message").await;
    assert_eq!(reply["from"], "agent");
    assert_eq!(reply["text"], "Let me look at it");
    assert_eq!(reply["seq"], 2);

    let history = daemon.history("alice", &conversation).await;
    assert_eq!(history.len(), 2);
    assert_eq!(history[0]["channel"], "chat");

    let resolved = alice
        .command(json!({ "type": "resolve", "conversation_id": conversation }))
        .await;
    assert_eq!(resolved["type"], "ack", "{resolved}");
    assert_eq!(customer.next_of("agent_left").await["agent_id"], "alice");
    customer.next_of("resolved").await;
    customer.close().await;
}

#[tokio::test]
async fn a_waiting_customer_is_told_the_queue_position_and_estimated_wait() {
    let daemon = Daemon::start("");
    let (mut customer, _) = Customer::start(&daemon, json!({ "visitor_id": VISITOR })).await;
    let ack = customer.say("c1", "anyone there?").await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let queued = customer.next_of("queued").await;
    assert_eq!(queued["position"], 1);
    assert!(
        queued["estimated_wait_seconds"].as_f64().is_some(),
        "{queued}"
    );
}

#[tokio::test]
async fn a_reconnecting_customer_gets_what_it_missed_and_a_resent_message_is_not_stored_twice() {
    let daemon = Daemon::start("");
    let mut alice = daemon.agent_socket("alice").await;
    alice
        .command(json!({ "type": "presence", "presence": "available" }))
        .await;
    let (mut customer, _) = Customer::start(&daemon, json!({ "visitor_id": VISITOR })).await;
    let first = customer.say("c1", "first").await;
    let conversation = first["conversation_id"].as_str().unwrap().to_owned();
    alice.accept_next_offer().await;
    customer.close().await;

    // While the customer is away the agent answers twice.
    for text in ["one", "two"] {
        let (status, _) = daemon.reply_as("alice", &conversation, text).await;
        assert_eq!(status, 202);
    }
    // The replies are stored before they are sent; wait until both are in the history.
    common::eventually(10, "both replies stored", || async {
        (daemon.history("alice", &conversation).await.len() == 3).then_some(())
    })
    .await;

    // The page comes back having seen seq 1, and resends a message it never got an ack for
    // (here: `c1` again, which was in fact stored).
    let (mut customer, session) = Customer::start(
        &daemon,
        json!({ "visitor_id": VISITOR, "conversation_id": conversation, "after_seq": 1 }),
    )
    .await;
    assert_eq!(session["conversation_id"], conversation.as_str());
    let missed = [
        customer.next_of("message").await,
        customer.next_of("message").await,
    ];
    assert_eq!(missed[0]["seq"], 2);
    assert_eq!(missed[0]["text"], "one");
    assert_eq!(missed[1]["seq"], 3);
    assert_eq!(missed[1]["text"], "two");
    let again = customer.say("c1", "first").await;
    assert_eq!(again["type"], "ack", "{again}");
    assert_eq!(again["duplicate"], true);
    assert_eq!(again["message_id"], first["message_id"]);
    assert_eq!(again["seq"], 1);
    assert_eq!(daemon.history("alice", &conversation).await.len(), 3);

    // Another visitor cannot resume this conversation.
    let (_, refused) = Customer::start(
        &daemon,
        json!({ "visitor_id": "someone_else_0123456789", "conversation_id": conversation }),
    )
    .await;
    assert_eq!(
        refused["error"]["code"], "unknown_conversation",
        "{refused}"
    );
}

#[tokio::test]
async fn limits_size_rate_origin_and_signed_customer_ids_are_enforced() {
    let daemon = Daemon::start(
        "[chat]\nallowed_origins = [\"https://shop.example\"]\nmax_message_chars = 10\nmessages_per_minute = 2\ncustomer_secret = \"s3cret\"\n",
    );
    assert_eq!(
        Customer::connect(&daemon, Some("https://evil.example"))
            .await
            .err(),
        Some(403)
    );
    assert_eq!(Customer::connect(&daemon, None).await.err(), Some(403));

    let mut customer = Customer::connect(&daemon, Some("https://shop.example"))
        .await
        .unwrap();
    customer
        .send(json!({ "type": "start", "visitor_id": VISITOR, "customer": { "id": "cust-42", "signature": "00" } }))
        .await;
    assert_eq!(customer.next().await["error"]["code"], "bad_signature");
    let mut mac = Hmac::<Sha256>::new_from_slice(b"s3cret").unwrap();
    mac.update(b"cust-42");
    let signature = hex::encode(mac.finalize().into_bytes());
    customer
        .send(json!({ "type": "start", "visitor_id": VISITOR, "customer": { "id": "cust-42", "signature": signature } }))
        .await;
    let session = customer.next().await;
    assert_eq!(session["customer_id"], "cust-42", "{session}");

    let long = customer.say("c0", "this is far too long").await;
    assert_eq!(long["error"]["code"], "message_too_long");
    assert_eq!(customer.say("c1", "hi").await["type"], "ack");
    assert_eq!(customer.say("c2", "hello").await["type"], "ack");
    let limited = customer.say("c3", "again").await;
    assert_eq!(limited["error"]["code"], "rate_limited", "{limited}");

    // The verified id is the contact's customer id, linking its other channels.
    let conversations = daemon.conversations().await;
    assert_eq!(conversations.len(), 1, "{conversations:?}");
}

#[tokio::test]
async fn a_customer_who_closes_the_chat_unanswered_and_does_not_return_is_counted_abandoned() {
    let daemon = Daemon::start("[chat]\nabandon_after_seconds = 1\n");
    // A customer who comes back within the grace period is not abandoned.
    let (mut returning, _) =
        Customer::start(&daemon, json!({ "visitor_id": "returning_0123456789" })).await;
    let ack = returning.say("c1", "hello?").await;
    let kept = ack["conversation_id"].as_str().unwrap().to_owned();
    returning.close().await;
    let (_returned, session) = Customer::start(
        &daemon,
        json!({ "visitor_id": "returning_0123456789", "conversation_id": kept }),
    )
    .await;
    assert_eq!(session["conversation_id"], kept.as_str());

    let (mut leaving, _) = Customer::start(&daemon, json!({ "visitor_id": VISITOR })).await;
    let ack = leaving.say("c1", "nobody here?").await;
    let left = ack["conversation_id"].as_str().unwrap().to_owned();
    leaving.close().await;
    common::eventually(10, "the abandoned count", || async {
        (daemon
            .metric("switchboard_conversations_abandoned_total")
            .await
            == Some(1.0))
        .then_some(())
    })
    .await;
    let (_, left_detail) = daemon
        .get(&format!("/v1/admin/conversations/{left}"), common::ADMIN)
        .await;
    let (_, kept_detail) = daemon
        .get(&format!("/v1/admin/conversations/{kept}"), common::ADMIN)
        .await;
    assert_eq!(kept_detail["routing"]["state"], "waiting", "{kept_detail}");
    assert_ne!(left_detail["routing"]["state"], "waiting", "{left_detail}");
}
