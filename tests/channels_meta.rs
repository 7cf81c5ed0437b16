//! WhatsApp Cloud API, Messenger and Instagram through the real binary: the handshake, signed
//! deliveries with several messages, the 24-hour window on replies, and a customer who moves from
//! SMS (Twilio) to WhatsApp staying in one conversation.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::Daemon;
use serde_json::{Value, json};
use switchboard::channels::meta::signature;
use switchboard::channels::twilio;
use wiremock::matchers::{body_partial_json, header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

const WEBHOOK: &str = "/v1/webhooks/meta/main";
const APP_SECRET: &str = "meta-app-secret";
const PHONE_ID: &str = "106540352242922";
const PAGE_ID: &str = "1234567890";

fn meta_config(graph: &str, template: bool) -> String {
    let template = if template {
        "whatsapp_template = \"follow_up\"\nwhatsapp_template_text_parameter = true\n"
    } else {
        ""
    };
    format!(
        r#"
[channels.meta.main]
app_secret = "{APP_SECRET}"
verify_token = "verify-me"
access_token = "graph-token"
graph_url = "{graph}"
api_version = "v21.0"
whatsapp_phone_number_ids = ["{PHONE_ID}"]
messenger_page_ids = ["{PAGE_ID}"]
{template}"#
    )
}

async fn post_signed(daemon: &Daemon, body: &Value) -> (u16, String) {
    let body = body.to_string();
    daemon
        .webhook(
            WEBHOOK,
            "application/json",
            &[(
                "x-hub-signature-256",
                signature(APP_SECRET, body.as_bytes()),
            )],
            &body,
        )
        .await
}

fn whatsapp(messages: &Value) -> Value {
    json!({
        "object": "whatsapp_business_account",
        "entry": [{ "id": "102290129340398", "changes": [{ "field": "messages", "value": {
            "messaging_product": "whatsapp",
            "metadata": { "display_phone_number": "15550783881", "phone_number_id": PHONE_ID },
            "contacts": [{ "profile": { "name": "Sheena Nelson" }, "wa_id": "16505551234" }],
            "messages": messages,
        }}]}]
    })
}

fn wa_text(from: &str, id: &str, timestamp: i64, text: &str) -> Value {
    json!({ "from": from, "id": id, "timestamp": timestamp.to_string(), "type": "text", "text": { "body": text } })
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

async fn available(daemon: &Daemon) -> common::AgentSocket {
    let mut alice = daemon.agent_socket("alice").await;
    alice
        .command(json!({ "type": "presence", "presence": "available" }))
        .await;
    alice
}

async fn reply(daemon: &Daemon, conversation: &str, text: &str) {
    let (status, answer) = daemon.reply_as("alice", conversation, text).await;
    assert_eq!(status, 202, "{answer}");
}

#[tokio::test]
async fn handshake_signatures_and_several_messages_per_delivery() {
    let graph = MockServer::start().await;
    let daemon = Daemon::start(&meta_config(&graph.uri(), false));
    let response = daemon
        .http
        .get(daemon.url(&format!(
            "{WEBHOOK}?hub.mode=subscribe&hub.challenge=1158201444&hub.verify_token=verify-me"
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), "1158201444");
    let response = daemon
        .http
        .get(daemon.url(&format!(
            "{WEBHOOK}?hub.mode=subscribe&hub.challenge=1&hub.verify_token=wrong"
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);

    let mut alice = available(&daemon).await;
    let delivery = whatsapp(&json!([
        wa_text("16505551234", "wamid.A1", now(), "first customer"),
        wa_text("16505550000", "wamid.B1", now(), "second customer"),
    ]));
    let unsigned = delivery.to_string();
    let (status, _) = daemon
        .webhook(WEBHOOK, "application/json", &[], &unsigned)
        .await;
    assert_eq!(status, 401);
    let (status, _) = daemon
        .webhook(
            WEBHOOK,
            "application/json",
            &[(
                "x-hub-signature-256",
                signature("wrong", unsigned.as_bytes()),
            )],
            &unsigned,
        )
        .await;
    assert_eq!(status, 403);
    assert!(daemon.conversations().await.is_empty());

    let (status, answer) = post_signed(&daemon, &delivery).await;
    assert_eq!(status, 200, "{answer}");
    // Both messages were stored before the 200.
    assert_eq!(daemon.conversations().await.len(), 2);
    let (status, _) = post_signed(&daemon, &delivery).await;
    assert_eq!(status, 200);
    assert_eq!(
        daemon.conversations().await.len(),
        2,
        "a retried delivery adds nothing"
    );
    alice.next_of("offer").await;
    alice.next_of("offer").await;

    let (status, reason) = post_signed(
        &daemon,
        &json!({ "object": "page", "entry": [{ "messaging": [{ "sender": {} }] }] }),
    )
    .await;
    assert_eq!(status, 400, "{reason}");
}

#[tokio::test]
async fn the_24_hour_window_decides_how_a_reply_goes() {
    let graph = MockServer::start().await;
    Mock::given(method("POST"))
        .and(header("authorization", "Bearer graph-token"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({ "recipient_id": "7654321", "message_id": "m_reply" })),
        )
        .mount(&graph)
        .await;
    let daemon = Daemon::start(&meta_config(&graph.uri(), false));
    let mut alice = available(&daemon).await;

    // A Messenger customer who last wrote three days ago: the HUMAN_AGENT tag.
    let three_days_ago_ms = (now() - 3 * 86_400) * 1000;
    let messenger = json!({ "object": "page", "entry": [{ "id": PAGE_ID, "time": three_days_ago_ms, "messaging": [{
        "sender": { "id": "7654321" }, "recipient": { "id": PAGE_ID }, "timestamp": three_days_ago_ms,
        "message": { "mid": "m_old", "text": "still waiting" } }] }] });
    assert_eq!(post_signed(&daemon, &messenger).await.0, 200);
    let conversation = alice.accept_next_offer().await;
    reply(&daemon, &conversation, "Sorry for the wait").await;
    assert_eq!(alice.next_of("reply_status").await["status"], "sent");
    let requests = graph.received_requests().await.unwrap();
    assert_eq!(requests[0].url.path(), format!("/v21.0/{PAGE_ID}/messages"));
    let sent: Value = serde_json::from_slice(&requests[0].body).unwrap();
    assert_eq!(
        sent,
        json!({ "recipient": { "id": "7654321" }, "messaging_type": "MESSAGE_TAG", "tag": "HUMAN_AGENT",
                "message": { "text": "Sorry for the wait" } })
    );

    // A WhatsApp customer from two days ago, no template configured: the agent is told why.
    let old = whatsapp(&json!([wa_text(
        "16505551234",
        "wamid.OLD",
        now() - 2 * 86_400,
        "hello?"
    )]));
    assert_eq!(post_signed(&daemon, &old).await.0, 200);
    let conversation = alice.accept_next_offer().await;
    reply(&daemon, &conversation, "Hello!").await;
    let failed = alice.next_of("reply_status").await;
    assert_eq!(failed["status"], "failed");
    assert!(
        failed["reason"].as_str().unwrap().contains("24-hour"),
        "{failed}"
    );
    assert_eq!(
        graph.received_requests().await.unwrap().len(),
        1,
        "nothing was sent"
    );
}

#[tokio::test]
async fn whatsapp_outside_the_window_uses_the_template() {
    let graph = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(format!("/v21.0/{PHONE_ID}/messages")))
        .and(body_partial_json(
            json!({ "type": "template", "template": { "name": "follow_up" } }),
        ))
        .respond_with(ResponseTemplate::new(200).set_body_json(
            json!({ "messaging_product": "whatsapp", "messages": [{ "id": "wamid.TEMPLATE" }] }),
        ))
        .mount(&graph)
        .await;
    let daemon = Daemon::start(&meta_config(&graph.uri(), true));
    let mut alice = available(&daemon).await;
    let old = whatsapp(&json!([wa_text(
        "16505551234",
        "wamid.OLD2",
        now() - 2 * 86_400,
        "hi"
    )]));
    post_signed(&daemon, &old).await;
    let conversation = alice.accept_next_offer().await;
    reply(&daemon, &conversation, "Your order shipped").await;
    assert_eq!(alice.next_of("reply_status").await["status"], "sent");
    let sent: Value =
        serde_json::from_slice(&graph.received_requests().await.unwrap()[0].body).unwrap();
    assert_eq!(
        sent["template"]["components"][0]["parameters"][0]["text"],
        "Your order shipped"
    );
    assert_eq!(sent["to"], "16505551234");
}

#[tokio::test]
async fn sms_then_whatsapp_is_one_conversation_and_the_reply_goes_to_whatsapp() {
    let graph = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(format!("/v21.0/{PHONE_ID}/messages")))
        .respond_with(ResponseTemplate::new(200).set_body_json(
            json!({ "messaging_product": "whatsapp", "messages": [{ "id": "wamid.REPLY" }] }),
        ))
        .mount(&graph)
        .await;
    let twilio_api = MockServer::start().await;
    let public_url = "https://sb.example.com/v1/webhooks/twilio/main";
    let config = format!(
        "{}\n[channels.twilio.main]\naccount_sid = \"ACbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb\"\nauth_token = \"tw\"\npublic_url = \"{public_url}\"\nnumbers = [\"+14155550100\"]\napi_url = \"{}\"\n",
        meta_config(&graph.uri(), false),
        twilio_api.uri()
    );
    let daemon = Daemon::start(&config);
    let mut alice = available(&daemon).await;

    let form: Vec<(String, String)> = [
        ("MessageSid", "SMcross"),
        ("From", "+16505551234"),
        ("To", "+14155550100"),
        ("Body", "my router is broken"),
    ]
    .iter()
    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
    .collect();
    let (status, _) = daemon
        .webhook(
            "/v1/webhooks/twilio/main",
            "application/x-www-form-urlencoded",
            &[(
                "x-twilio-signature",
                twilio::signature("tw", public_url, &form),
            )],
            &serde_urlencoded::to_string(&form).unwrap(),
        )
        .await;
    assert_eq!(status, 200);
    let conversation = alice.accept_next_offer().await;

    let delivery = whatsapp(&json!([wa_text(
        "16505551234",
        "wamid.CROSS",
        now(),
        "sending a photo here instead"
    )]));
    assert_eq!(post_signed(&daemon, &delivery).await.0, 200);
    let pushed = alice.next_of("message").await;
    assert_eq!(pushed["conversation_id"], conversation.as_str(), "{pushed}");
    assert_eq!(daemon.conversations().await.len(), 1);

    reply(&daemon, &conversation, "Got it, thanks").await;
    assert_eq!(alice.next_of("reply_status").await["status"], "sent");
    assert!(twilio_api.received_requests().await.unwrap().is_empty());
    let sent: Value =
        serde_json::from_slice(&graph.received_requests().await.unwrap()[0].body).unwrap();
    assert_eq!(sent["to"], "16505551234");
    assert_eq!(sent["text"]["body"], "Got it, thanks");
}
