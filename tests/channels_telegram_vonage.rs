//! Telegram and Vonage through the real binary: checked webhooks in, replies out to mocks of their
//! APIs (Telegram's 429 `retry_after` honoured), Vonage status webhooks.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::Daemon;
use serde_json::{Value, json};
use switchboard::channels::vonage::sign;
use wiremock::matchers::{header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

async fn available(daemon: &Daemon) -> common::AgentSocket {
    let mut alice = daemon.agent_socket("alice").await;
    alice
        .command(json!({ "type": "presence", "presence": "available" }))
        .await;
    alice
}

async fn accept_and_reply(daemon: &Daemon, alice: &mut common::AgentSocket, text: &str) -> String {
    let conversation = alice.accept_next_offer().await;
    let (status, answer) = daemon.reply_as("alice", &conversation, text).await;
    assert_eq!(status, 202, "{answer}");
    conversation
}

fn update(update_id: i64, text: &str) -> String {
    json!({ "update_id": update_id, "message": {
        "message_id": 1365, "date": chrono::Utc::now().timestamp(),
        "chat": { "id": 1111111, "type": "private", "first_name": "Test" },
        "from": { "id": 1111111, "is_bot": false, "first_name": "Test", "language_code": "en" },
        "text": text } })
    .to_string()
}

#[tokio::test]
async fn telegram_updates_in_and_send_message_out_honouring_retry_after() {
    let api = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/bot123456:ABC-DEF/sendMessage"))
        .respond_with(ResponseTemplate::new(429).set_body_json(json!({
            "ok": false, "error_code": 429, "description": "Too Many Requests: retry after 1",
            "parameters": { "retry_after": 1 } })))
        .up_to_n_times(1)
        .mount(&api)
        .await;
    Mock::given(method("POST"))
        .and(path("/bot123456:ABC-DEF/sendMessage"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "ok": true, "result": { "message_id": 77, "date": 0, "chat": { "id": 1111111, "type": "private" } } })))
        .mount(&api)
        .await;
    let daemon = Daemon::start(&format!(
        "[channels.telegram.main]\nbot_token = \"123456:ABC-DEF\"\nsecret_token = \"tg-secret\"\napi_url = \"{}\"\n",
        api.uri()
    ));
    let mut alice = available(&daemon).await;
    let hook = "/v1/webhooks/telegram/main";
    let secret = [("x-telegram-bot-api-secret-token", "tg-secret".to_owned())];
    let (status, _) = daemon
        .webhook(
            hook,
            "application/json",
            &[("x-telegram-bot-api-secret-token", "nope".into())],
            &update(500, "hi"),
        )
        .await;
    assert_eq!(status, 403);
    let (status, _) = daemon
        .webhook(hook, "application/json", &[], &update(500, "hi"))
        .await;
    assert_eq!(status, 401);
    let (status, _) = daemon
        .webhook(hook, "application/json", &secret, &update(500, "hello bot"))
        .await;
    assert_eq!(status, 200);
    let (status, _) = daemon
        .webhook(hook, "application/json", &secret, &update(500, "hello bot"))
        .await;
    assert_eq!(status, 200, "the same update_id again");
    let (status, _) = daemon
        .webhook(hook, "application/json", &secret, "{\"update_id\": \"x\"}")
        .await;
    assert_eq!(status, 400);

    let conversation = accept_and_reply(&daemon, &mut alice, "Hello from support").await;
    assert_eq!(daemon.history("alice", &conversation).await.len(), 2);
    assert_eq!(alice.next_of("reply_status").await["status"], "sent");
    let requests = api.received_requests().await.unwrap();
    assert_eq!(
        requests.len(),
        2,
        "the 429, then the retry after retry_after"
    );
    let sent: Value = serde_json::from_slice(&requests[1].body).unwrap();
    assert_eq!(
        sent,
        json!({ "chat_id": 1111111, "text": "Hello from support" })
    );
}

#[tokio::test]
async fn vonage_signed_webhooks_and_messages_api_send() {
    let api = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/messages"))
        // Basic base64("abcd1234:vonage-api-secret")
        .and(header(
            "authorization",
            "Basic YWJjZDEyMzQ6dm9uYWdlLWFwaS1zZWNyZXQ=",
        ))
        .respond_with(
            ResponseTemplate::new(202)
                .set_body_json(json!({ "message_uuid": "aaaaaaaa-0000-0000-0000-000000000001" })),
        )
        .mount(&api)
        .await;
    let daemon = Daemon::start(&format!(
        "[channels.vonage.main]\napi_key = \"abcd1234\"\napi_secret = \"vonage-api-secret\"\nsignature_secret = \"vonage-signature\"\nnumbers = [\"+447700900000\"]\napi_url = \"{}\"\n",
        api.uri()
    ));
    let mut alice = available(&daemon).await;
    let hook = "/v1/webhooks/vonage/main";
    let post = |body: String, secret: &'static str| {
        let daemon = &daemon;
        async move {
            let token = sign(
                secret,
                "abcd1234",
                chrono::Utc::now().timestamp(),
                body.as_bytes(),
            );
            daemon
                .webhook(
                    hook,
                    "application/json",
                    &[("authorization", format!("Bearer {token}"))],
                    &body,
                )
                .await
        }
    };
    let inbound = json!({ "channel": "sms", "message_uuid": "11111111-2222-3333-4444-555555555555",
        "to": "447700900000", "from": "447700900001", "timestamp": "2025-02-03T12:14:25Z",
        "text": "Hello From Vonage!", "message_type": "text" })
    .to_string();
    assert_eq!(post(inbound.clone(), "wrong-secret").await.0, 403);
    assert_eq!(post(inbound.clone(), "vonage-signature").await.0, 200);
    assert_eq!(post(inbound, "vonage-signature").await.0, 200);
    assert_eq!(daemon.conversations().await.len(), 1);

    accept_and_reply(&daemon, &mut alice, "Hi from support").await;
    assert_eq!(alice.next_of("reply_status").await["status"], "sent");
    let sent: Value =
        serde_json::from_slice(&api.received_requests().await.unwrap()[0].body).unwrap();
    assert_eq!(sent["to"], "447700900001");
    assert_eq!(sent["from"], "447700900000");
    assert_eq!(sent["channel"], "sms");
    assert_eq!(sent["message_type"], "text");
    assert_eq!(sent["text"], "Hi from support");

    let status = json!({ "message_uuid": "aaaaaaaa-0000-0000-0000-000000000001", "to": "447700900001",
        "from": "447700900000", "timestamp": "2025-02-03T12:14:25Z", "status": "rejected", "channel": "sms",
        "error": { "type": "https://developer.vonage.com/api-errors/messages#1330", "title": 1330,
                   "detail": "The message was rejected by the carrier" } })
    .to_string();
    assert_eq!(post(status, "vonage-signature").await.0, 200);
    let failed = alice.next_of("reply_status").await;
    assert_eq!(failed["status"], "failed");
    assert!(
        failed["reason"].as_str().unwrap().contains("1330"),
        "{failed}"
    );
}
