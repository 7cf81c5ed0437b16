//! The customer web chat on the real binary: a tokio-tungstenite client plays the customer's browser
//! on `/v1/chat/stream`, agents use their own WebSocket.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{Customer, Daemon};
use futures_util::StreamExt;
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;
use tokio_tungstenite::tungstenite::Message;

const VISITOR: &str = "visitor_0123456789abcdef";

#[tokio::test]
async fn a_customer_chats_with_an_agent_who_accepts_and_replies() {
    let daemon = Daemon::start("");
    common::chat_with_alice(&daemon, &daemon, VISITOR).await;
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

/// The supervisor's live feed: the first snapshot that satisfies `check`.
async fn supervisor_snapshot(daemon: &Daemon, check: impl Fn(&Value) -> bool) -> Value {
    let url = format!(
        "{}/v1/admin/stream?access_token={}",
        daemon.base.replace("http://", "ws://"),
        common::ADMIN
    );
    let (mut socket, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    loop {
        let message = tokio::time::timeout(Duration::from_secs(10), socket.next())
            .await
            .expect("a snapshot within 10 s")
            .expect("socket open")
            .expect("socket ok");
        if let Message::Text(text) = message {
            let snapshot: Value = serde_json::from_str(&text).unwrap();
            if check(&snapshot) {
                return snapshot;
            }
        }
    }
}

#[tokio::test]
async fn a_resolved_conversation_is_rated_once_and_the_supervisor_sees_it() {
    let daemon = Daemon::start("");
    let mut alice = daemon.agent_socket("alice").await;
    alice
        .command(json!({ "type": "presence", "presence": "available" }))
        .await;
    let (mut customer, _) = Customer::start(&daemon, json!({ "visitor_id": VISITOR })).await;
    let ack = customer.say("c1", "my order is wrong").await;
    let conversation = ack["conversation_id"].as_str().unwrap().to_owned();

    // Not before it is resolved.
    customer.send(json!({ "type": "rate", "score": 5 })).await;
    assert_eq!(
        customer.next_of("error").await["error"]["code"],
        "not_resolved"
    );

    alice.accept_next_offer().await;
    let resolved = alice
        .command(json!({ "type": "resolve", "conversation_id": conversation }))
        .await;
    assert_eq!(resolved["type"], "ack", "{resolved}");
    let offer = customer.next_of("resolved").await;
    assert_eq!(offer["rating"], true, "{offer}");

    for (frame, code) in [
        (json!({ "type": "rate", "score": 0 }), "bad_score"),
        (json!({ "type": "rate", "score": 6 }), "bad_score"),
        (
            json!({ "type": "rate", "score": 4, "comment": "x".repeat(1001) }),
            "comment_too_long",
        ),
    ] {
        customer.send(frame).await;
        assert_eq!(customer.next_of("error").await["error"]["code"], code);
    }
    customer
        .send(json!({ "type": "rate", "score": 4, "comment": " Quick and kind " }))
        .await;
    let rated = customer.next_of("rated").await;
    assert_eq!(rated["score"], 4);
    assert_eq!(rated["conversation_id"], conversation.as_str());
    customer
        .send(json!({ "type": "rate", "score": 1, "comment": "changed my mind" }))
        .await;
    assert_eq!(
        customer.next_of("error").await["error"]["code"],
        "already_rated"
    );

    let snapshot = supervisor_snapshot(&daemon, |s| s["csat"]["count"] == 1).await;
    assert_eq!(snapshot["csat"]["average"], 4.0, "{snapshot}");
    let rating = &snapshot["csat"]["recent"][0];
    assert_eq!(rating["score"], 4);
    assert_eq!(rating["comment"], "Quick and kind");
    assert_eq!(rating["agent_id"], "alice");
    assert_eq!(rating["conversation_id"], conversation.as_str());
    // Its queue's service level: the one answered conversation was answered within the SLA.
    let support = snapshot["queues"]
        .as_array()
        .unwrap()
        .iter()
        .find(|queue| queue["name"] == "support")
        .unwrap();
    assert_eq!(support["answered"], 1, "{support}");
    assert_eq!(support["service_level"], 1.0, "{support}");
    // The supervisor view's agents carry their time in state.
    assert!(
        snapshot["agents"][0]["in_state_seconds"].is_number(),
        "{snapshot}"
    );
}

#[tokio::test]
async fn with_no_agent_online_the_offline_form_becomes_a_waiting_conversation() {
    let daemon = Daemon::start("");
    let (mut customer, session) = Customer::start(&daemon, json!({ "visitor_id": VISITOR })).await;
    assert_eq!(session["online"], false, "{session}");
    // No email relay here: the answer comes in the chat.
    assert_eq!(session["offline_reply_by_email"], false, "{session}");

    customer
        .send(json!({ "type": "offline", "client_message_id": "o1", "email": "not an address", "text": "hi" }))
        .await;
    assert_eq!(
        customer.next_of("error").await["error"]["code"],
        "bad_email"
    );
    customer
        .send(json!({ "type": "offline", "client_message_id": "o1", "name": "Ann", "email": "ann@example.com", "text": "Please call me back about my order" }))
        .await;
    let received = customer.next_of("offline_received").await;
    assert_eq!(received["reply_by"], "chat", "{received}");
    let conversation = received["conversation_id"].as_str().unwrap().to_owned();

    // It waits for the next agent, who sees the message.
    let mut alice = daemon.agent_socket("alice").await;
    alice
        .command(json!({ "type": "presence", "presence": "available" }))
        .await;
    assert_eq!(alice.accept_next_offer().await, conversation);
    let history = daemon.history("alice", &conversation).await;
    assert_eq!(history.len(), 1);
    // The email the customer left is linked to their contact: a mail from it joins this conversation.
    let (status, ingested) = daemon
        .ingest(json!({
            "channel": "email", "provider": "smtp", "provider_message_id": "<m1@example.com>",
            "from": { "address": "Ann@Example.com" }, "text": "Also, my order number is 42"
        }))
        .await;
    assert_eq!(status, 202, "{ingested}");
    assert_eq!(
        ingested["conversation_id"],
        conversation.as_str(),
        "{ingested}"
    );

    // With an agent online the widget is told so.
    let (_, session) =
        Customer::start(&daemon, json!({ "visitor_id": "second_visitor_0123456" })).await;
    assert_eq!(session["online"], true, "{session}");
}

#[tokio::test]
async fn waiting_customers_are_told_their_new_place_as_the_queue_moves() {
    // One agent with room for one chat, so the second customer keeps waiting while the first is
    // offered.
    let daemon = Daemon::start(
        "[[agents]]\nid = \"alice\"\nqueues = [\"support\"]\ncapacity = { chat = 1 }\nmax_total = 1\n",
    );
    let (mut first, _) =
        Customer::start(&daemon, json!({ "visitor_id": "first_visitor_0123456" })).await;
    let first_conversation = first.say("c1", "first in line").await["conversation_id"].clone();
    assert_eq!(first.next_of("queued").await["position"], 1);
    let (mut second, _) =
        Customer::start(&daemon, json!({ "visitor_id": "second_visitor_0123456" })).await;
    second.say("c1", "second in line").await;
    assert_eq!(second.next_of("queued").await["position"], 2);

    // The agent comes online and is offered the first: the second customer moves up without
    // writing anything.
    let mut alice = daemon.agent_socket("alice").await;
    alice
        .command(json!({ "type": "presence", "presence": "available" }))
        .await;
    let offer = alice.next_of("offer").await;
    assert_eq!(offer["conversation_id"], first_conversation, "{offer}");
    let moved = second.next_of("queued").await;
    assert_eq!(moved["position"], 1, "{moved}");
    assert!(
        moved["estimated_wait_seconds"].as_f64().is_some(),
        "{moved}"
    );

    // A customer who resumes while waiting is told the current place at once.
    let conversation = {
        let ack = second.say("c2", "still there?").await;
        ack["conversation_id"].as_str().unwrap().to_owned()
    };
    second.close().await;
    let (mut back, _) = Customer::start(
        &daemon,
        json!({ "visitor_id": "second_visitor_0123456", "conversation_id": conversation, "after_seq": 2 }),
    )
    .await;
    assert_eq!(back.next_of("queued").await["position"], 1);
}

#[tokio::test]
async fn an_offline_message_with_an_email_address_is_answered_by_mail() {
    let mut sink = common::Sink::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "[channels.email]\nmailboxes = [\"support@example.com\"]\nfrom_name = \"Example Support\"\n\n\
         [channels.email.relay]\nhost = \"127.0.0.1\"\nport = {}\nsecurity = \"none\"\n",
        sink.port
    );
    common::write_config(dir.path(), "", &config);
    let daemon = Daemon::start_in(dir);
    let (mut customer, session) = Customer::start(&daemon, json!({ "visitor_id": VISITOR })).await;
    assert_eq!(session["online"], false, "{session}");
    assert_eq!(session["offline_reply_by_email"], true, "{session}");

    customer
        .send(json!({ "type": "offline", "client_message_id": "o1", "name": "Ann", "email": "ann@customer.example", "text": "Where is my parcel?" }))
        .await;
    let received = customer.next_of("offline_received").await;
    assert_eq!(received["reply_by"], "email", "{received}");
    let conversation = received["conversation_id"].as_str().unwrap().to_owned();
    // The same form sent again (a reconnect re-sends it) is the same message.
    customer
        .send(json!({ "type": "offline", "client_message_id": "o1", "name": "Ann", "email": "ann@customer.example", "text": "Where is my parcel?" }))
        .await;
    let again = customer.next_of("offline_received").await;
    assert_eq!(again["duplicate"], true, "{again}");
    assert_eq!(again["message_id"], received["message_id"], "{again}");

    let mut alice = daemon.agent_socket("alice").await;
    alice
        .command(json!({ "type": "presence", "presence": "available" }))
        .await;
    assert_eq!(alice.accept_next_offer().await, conversation);
    let history = daemon.history("alice", &conversation).await;
    assert_eq!(history.len(), 1, "{history:?}");
    assert_eq!(history[0]["channel"], "email", "{history:?}");
    let (status, reply) = daemon
        .reply_as("alice", &conversation, "It arrives tomorrow.")
        .await;
    assert_eq!(status, 202, "{reply}");
    let mail = sink.next(20).await;
    assert_eq!(
        common::header(&mail, "To").unwrap(),
        "ann@customer.example",
        "{mail}"
    );
    assert!(mail.contains("It arrives tomorrow."), "{mail}");
}
