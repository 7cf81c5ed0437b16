//! The daemon as its clients see it: the real binary on a free port, HTTP and WebSocket.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{ADMIN, Daemon, INGEST, agent_token, api_message};
use serde_json::json;

#[tokio::test]
async fn ingest_offer_accept_reply_resolve() {
    let daemon = Daemon::start("");
    let mut alice = daemon.agent_socket("alice").await;
    let ack = alice
        .command(json!({ "type": "presence", "presence": "available" }))
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");

    let (status, stored) = daemon
        .ingest(api_message(
            "crm-1",
            "customer-42",
            "Hello, my parcel is late",
        ))
        .await;
    assert_eq!(status, 202, "{stored}");
    assert_eq!(stored["new_conversation"], true);
    let conversation = stored["conversation_id"].as_str().unwrap().to_owned();

    let offer = alice.next_of("offer").await;
    assert_eq!(offer["conversation_id"], conversation.as_str());
    assert_eq!(offer["queue"], "support");
    assert!(offer["deadline"].as_str().is_some());

    let ack = alice
        .command(json!({ "type": "accept", "conversation_id": conversation }))
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");

    // A second customer message goes straight to the owner.
    let (status, _) = daemon
        .ingest(api_message("crm-2", "customer-42", "Any news?"))
        .await;
    assert_eq!(status, 202);
    let pushed = alice.next_of("message").await;
    assert_eq!(pushed["message"]["text"], "Any news?");

    let (status, reply) = daemon
        .post(
            &format!("/v1/agents/alice/conversations/{conversation}/reply"),
            &agent_token("alice"),
            json!({ "text": "It arrives tomorrow." }),
        )
        .await;
    assert_eq!(status, 202, "{reply}");
    let delivered = alice.next_of("reply_status").await;
    assert_eq!(delivered["status"], "sent");

    let (status, history) = daemon
        .get(
            &format!("/v1/agents/alice/conversations/{conversation}/messages"),
            &agent_token("alice"),
        )
        .await;
    assert_eq!(status, 200);
    let directions: Vec<&str> = history["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["direction"].as_str().unwrap())
        .collect();
    assert_eq!(directions, ["inbound", "inbound", "outbound"]);
    assert_eq!(history["reply_channel"], "api");

    let ack = alice
        .command(json!({ "type": "resolve", "conversation_id": conversation }))
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let (_, view) = daemon.get("/v1/agents/alice", &agent_token("alice")).await;
    assert_eq!(view["assigned"], json!([]));
    assert_eq!(
        view["wrap_up"], true,
        "the demo support queue has 15 s of wrap-up"
    );
}

#[tokio::test]
async fn a_repeated_message_is_stored_once() {
    let daemon = Daemon::start("");
    let (first, stored) = daemon.ingest(api_message("dup-1", "c-1", "hi")).await;
    let (second, again) = daemon.ingest(api_message("dup-1", "c-1", "hi")).await;
    assert_eq!((first, second), (202, 200));
    assert_eq!(again["duplicate"], true);
    assert_eq!(again["message_id"], stored["message_id"]);
    let (_, detail) = daemon
        .get(
            &format!(
                "/v1/admin/conversations/{}",
                stored["conversation_id"].as_str().unwrap()
            ),
            ADMIN,
        )
        .await;
    assert_eq!(detail["messages"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn a_second_channel_joins_the_open_conversation_and_replies_follow_it() {
    let daemon = Daemon::start("");
    let sms = json!({ "channel": "sms", "provider": "twilio", "provider_message_id": "SM1", "from": { "address": "+14155550123" }, "to": { "address": "+14155550100" }, "text": "Hi by SMS" });
    let whatsapp = json!({ "channel": "whatsapp", "provider": "meta", "provider_message_id": "wamid.1", "from": { "address": "+14155550123" }, "text": "and now on WhatsApp" });
    let (_, first) = daemon.ingest(sms).await;
    let (status, second) = daemon.ingest(whatsapp).await;
    assert_eq!(status, 202);
    assert_eq!(second["conversation_id"], first["conversation_id"]);
    assert_eq!(second["new_conversation"], false);
    let (_, detail) = daemon
        .get(
            &format!(
                "/v1/admin/conversations/{}",
                first["conversation_id"].as_str().unwrap()
            ),
            ADMIN,
        )
        .await;
    assert_eq!(detail["conversation"]["reply_channel"], "whatsapp");
}

#[tokio::test]
async fn transfer_to_another_agent() {
    let daemon = Daemon::start("");
    let mut alice = daemon.agent_socket("alice").await;
    alice
        .command(json!({ "type": "presence", "presence": "available" }))
        .await;
    let (_, stored) = daemon
        .ingest(api_message("t-1", "c-9", "please help"))
        .await;
    let conversation = stored["conversation_id"].as_str().unwrap().to_owned();
    alice.next_of("offer").await;
    alice
        .command(json!({ "type": "accept", "conversation_id": conversation }))
        .await;

    let mut bob = daemon.agent_socket("bob").await;
    bob.command(json!({ "type": "presence", "presence": "available" }))
        .await;
    let ack = alice
        .command(json!({ "type": "transfer", "conversation_id": conversation, "to_agent": "bob" }))
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let offer = bob.next_of("offer").await;
    assert_eq!(offer["conversation_id"], conversation.as_str());
    let refused = alice
        .command(json!({ "type": "resolve", "conversation_id": conversation }))
        .await;
    assert_eq!(refused["error"]["code"], "not_owner");
}

#[tokio::test]
async fn restart_keeps_offers_and_assignments() {
    let mut daemon = Daemon::start("");
    let mut alice = daemon.agent_socket("alice").await;
    alice
        .command(json!({ "type": "presence", "presence": "available" }))
        .await;
    let (_, first) = daemon.ingest(api_message("r-1", "c-1", "first")).await;
    let first = first["conversation_id"].as_str().unwrap().to_owned();
    alice.next_of("offer").await;
    alice
        .command(json!({ "type": "accept", "conversation_id": first }))
        .await;
    let (_, waiting) = daemon.ingest(api_message("r-2", "c-2", "second")).await;
    let waiting = waiting["conversation_id"].as_str().unwrap().to_owned();
    alice.next_of("offer").await;

    daemon.kill();
    daemon.spawn();

    // The assignment survived; alice is offline until her desktop reconnects.
    let (_, view) = daemon.get("/v1/agents/alice", &agent_token("alice")).await;
    assert_eq!(view["assigned"], json!([first]));
    assert_eq!(view["presence"], "offline");
    let (_, detail) = daemon
        .get(&format!("/v1/admin/conversations/{waiting}"), ADMIN)
        .await;
    assert_eq!(
        detail["routing"]["state"], "waiting",
        "the offer to an offline agent went back to waiting: {detail}"
    );
    // When she comes back she gets it again.
    let mut alice = daemon.agent_socket("alice").await;
    alice
        .command(json!({ "type": "presence", "presence": "available" }))
        .await;
    let offer = alice.next_of("offer").await;
    assert_eq!(offer["conversation_id"], waiting.as_str());
}

#[tokio::test]
async fn restart_keeps_queue_handle_times() {
    let mut daemon = Daemon::start("");
    let support_handle_seconds = |queues: serde_json::Value| {
        queues["queues"]
            .as_array()
            .unwrap()
            .iter()
            .find(|queue| queue["name"] == "support")
            .map(|queue| queue["average_handle_seconds"].as_f64().unwrap())
            .unwrap()
    };
    let (_, queues) = daemon.get("/v1/admin/queues", ADMIN).await;
    let configured = support_handle_seconds(queues);

    let mut alice = daemon.agent_socket("alice").await;
    alice
        .command(json!({ "type": "presence", "presence": "available" }))
        .await;
    let (_, stored) = daemon.ingest(api_message("h-1", "c-1", "hello")).await;
    let conversation = stored["conversation_id"].as_str().unwrap().to_owned();
    alice.next_of("offer").await;
    for command in ["accept", "resolve"] {
        let ack = alice
            .command(json!({ "type": command, "conversation_id": conversation }))
            .await;
        assert_eq!(ack["type"], "ack", "{ack}");
    }
    let (_, queues) = daemon.get("/v1/admin/queues", ADMIN).await;
    let measured = support_handle_seconds(queues);
    assert_ne!(
        measured, configured,
        "a resolved conversation's handle time replaces the configured estimate"
    );

    daemon.kill();
    daemon.spawn();
    let (_, queues) = daemon.get("/v1/admin/queues", ADMIN).await;
    assert_eq!(
        support_handle_seconds(queues),
        measured,
        "estimated waits continue from the stored handle times"
    );
}

#[tokio::test]
async fn bad_input_gets_a_clear_4xx_and_stores_nothing() {
    let daemon = Daemon::start_with("body_limit_bytes = 4096", "");
    let raw = |body: &'static str| {
        daemon
            .http
            .post(daemon.url("/v1/messages"))
            .bearer_auth(INGEST)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let response = raw("{not json").await.unwrap();
    assert_eq!(response.status(), 400);
    let error: serde_json::Value = response.json().await.unwrap();
    assert_eq!(error["error"]["code"], "invalid_json");

    let (status, error) = daemon.ingest(json!({ "channel": "api", "provider": "crm", "provider_message_id": "x", "from": { "address": "a" }, "text": "x", "colour": "red" })).await;
    assert_eq!(status, 422);
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("colour")
    );

    let (status, error) = daemon.ingest(json!({ "channel": "sms", "provider": "twilio", "provider_message_id": "x", "from": { "address": "0155" }, "text": "x" })).await;
    assert_eq!(status, 422);
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("from.address"),
        "{error}"
    );

    let (status, error) = daemon
        .ingest(api_message("big", "c", &"x".repeat(10_000)))
        .await;
    assert_eq!(status, 413, "{error}");

    let (status, error) = daemon
        .post(
            "/v1/agents/alice/conversations/not-a-ulid/accept",
            &agent_token("alice"),
            json!({}),
        )
        .await;
    assert_eq!(
        (status, error["error"]["code"].as_str()),
        (400, Some("bad_id"))
    );
    let (status, error) = daemon
        .post(
            &format!(
                "/v1/agents/alice/conversations/{}/accept",
                ulid::Ulid::new()
            ),
            &agent_token("alice"),
            json!({}),
        )
        .await;
    assert_eq!(
        (status, error["error"]["code"].as_str()),
        (404, Some("unknown_conversation")),
        "{error}"
    );

    let (_, conversations) = daemon.get("/v1/admin/conversations", ADMIN).await;
    assert_eq!(
        conversations["conversations"],
        json!([]),
        "nothing was stored"
    );
}

#[tokio::test]
async fn accepting_an_offer_that_is_not_yours_conflicts() {
    let daemon = Daemon::start("");
    let mut alice = daemon.agent_socket("alice").await;
    alice
        .command(json!({ "type": "presence", "presence": "available" }))
        .await;
    let (_, stored) = daemon.ingest(api_message("o-1", "c", "hello")).await;
    alice.next_of("offer").await;
    let conversation = stored["conversation_id"].as_str().unwrap();
    let (status, error) = daemon
        .post(
            &format!("/v1/agents/bob/conversations/{conversation}/accept"),
            &agent_token("bob"),
            json!({}),
        )
        .await;
    assert_eq!(
        (status, error["error"]["code"].as_str()),
        (409, Some("not_offered"))
    );
}

#[tokio::test]
async fn tokens_are_scoped() {
    let daemon = Daemon::start("");
    let no_token = daemon
        .http
        .get(daemon.url("/v1/admin/queues"))
        .send()
        .await
        .unwrap();
    assert_eq!(no_token.status(), 401);
    assert_eq!(daemon.get("/v1/admin/queues", "wrong").await.0, 401);
    assert_eq!(
        daemon.get("/v1/admin/queues", INGEST).await.0,
        403,
        "ingest token is not admin"
    );
    assert_eq!(
        daemon
            .get("/v1/admin/queues", &agent_token("alice"))
            .await
            .0,
        403
    );
    assert_eq!(
        daemon.get("/v1/agents/bob", &agent_token("alice")).await.0,
        403,
        "alice cannot act as bob"
    );
    assert_eq!(
        daemon
            .post("/v1/messages", ADMIN, api_message("a", "b", "c"))
            .await
            .0,
        403,
        "admin token cannot ingest"
    );
    let (status, queues) = daemon.get("/v1/admin/queues", ADMIN).await;
    assert_eq!(status, 200);
    let names: Vec<&str> = queues["queues"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["support", "billing", "tier2"]);
    // Someone else's conversation history is not visible.
    let (_, stored) = daemon.ingest(api_message("s-1", "c", "private")).await;
    let (status, _) = daemon
        .get(
            &format!(
                "/v1/agents/bob/conversations/{}/messages",
                stored["conversation_id"].as_str().unwrap()
            ),
            &agent_token("bob"),
        )
        .await;
    assert_eq!(status, 403);
}

#[tokio::test]
async fn metrics_health_and_openapi() {
    let daemon = Daemon::start("");
    daemon.ingest(api_message("m-1", "c", "hello")).await;
    daemon.ingest(api_message("m-1", "c", "hello")).await;
    let text = daemon.metrics_text().await;
    for expected in [
        "switchboard_messages_received_total{channel=\"api\"} 1",
        "switchboard_messages_duplicate_total{channel=\"api\"} 1",
        "# TYPE switchboard_routing_decision_seconds histogram",
        "# TYPE switchboard_store_commit_seconds histogram",
        "switchboard_ready 1",
    ] {
        assert!(text.contains(expected), "missing `{expected}` in:\n{text}");
    }
    assert_eq!(daemon.get("/healthz", "").await.0, 200);
    assert_eq!(daemon.get("/readyz", "").await.0, 200);
    let (status, openapi) = daemon.get("/v1/openapi.json", "").await;
    assert_eq!(status, 200);
    assert_eq!(openapi["openapi"], "3.1.0");
    assert!(openapi["paths"]["/v1/messages"]["post"].is_object());
}

#[tokio::test]
async fn sigterm_shuts_down_cleanly() {
    let mut daemon = Daemon::start("");
    daemon.ingest(api_message("g-1", "c", "hello")).await;
    let status = daemon.terminate();
    assert!(status.success(), "exit status {status:?}");
}
