//! The security matrix against the real binary: every route of the OpenAPI document has a row
//! saying who may call it, and each is tried with no token, an unknown one and every wrong kind
//! (ingest, admin, another agent's); agent A acting on agent B's conversation; an expired offer;
//! provider webhooks without and with a wrong signature; secrets kept out of logs and
//! `check-config` output.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;

use common::{ADMIN, Daemon, INGEST, agent_token, api_message};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite;

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    /// Anyone: health, metrics, the document itself, the static pages.
    Public,
    /// Ingest tokens only.
    Ingest,
    /// Admin tokens only.
    Admin,
    /// Only the agent named in the path, with its own token.
    OwnAgent,
    /// Any agent or admin token (attachments).
    AgentOrAdmin,
    /// A provider's signature, not a token.
    Signed,
    /// The customer chat: no token, the Origin allow-list.
    Chat,
}

/// Every documented (method, path) and who may call it. A new route without a row fails
/// `every_documented_route_has_a_row`.
const MATRIX: &[(&str, &str, Access)] = &[
    ("get", "/healthz", Access::Public),
    ("get", "/readyz", Access::Public),
    ("get", "/metrics", Access::Public),
    ("get", "/v1/openapi.json", Access::Public),
    ("get", "/widget.js", Access::Public),
    ("get", "/demo", Access::Public),
    ("get", "/console", Access::Public),
    ("get", "/console/console.js", Access::Public),
    ("get", "/console/console.css", Access::Public),
    ("get", "/console/supervisor", Access::Public),
    ("get", "/console/supervisor.js", Access::Public),
    ("post", "/v1/messages", Access::Ingest),
    ("post", "/v1/channels/email/raw", Access::Ingest),
    (
        "get",
        "/v1/channels/email/attachments/{key}",
        Access::AgentOrAdmin,
    ),
    ("get", "/v1/webhooks/{provider}/{account}", Access::Signed),
    ("post", "/v1/webhooks/{provider}/{account}", Access::Signed),
    ("get", "/v1/chat/stream", Access::Chat),
    ("get", "/v1/agents/{agent}", Access::OwnAgent),
    ("put", "/v1/agents/{agent}/presence", Access::OwnAgent),
    ("get", "/v1/agents/{agent}/conversations", Access::OwnAgent),
    (
        "get",
        "/v1/agents/{agent}/conversations/{conversation}/messages",
        Access::OwnAgent,
    ),
    (
        "post",
        "/v1/agents/{agent}/conversations/{conversation}/accept",
        Access::OwnAgent,
    ),
    (
        "post",
        "/v1/agents/{agent}/conversations/{conversation}/reject",
        Access::OwnAgent,
    ),
    (
        "post",
        "/v1/agents/{agent}/conversations/{conversation}/resolve",
        Access::OwnAgent,
    ),
    (
        "post",
        "/v1/agents/{agent}/conversations/{conversation}/escalate",
        Access::OwnAgent,
    ),
    (
        "post",
        "/v1/agents/{agent}/conversations/{conversation}/transfer",
        Access::OwnAgent,
    ),
    (
        "post",
        "/v1/agents/{agent}/conversations/{conversation}/reply",
        Access::OwnAgent,
    ),
    ("get", "/v1/agents/{agent}/stream", Access::OwnAgent),
    ("get", "/v1/admin/queues", Access::Admin),
    ("get", "/v1/admin/agents", Access::Admin),
    ("get", "/v1/admin/conversations", Access::Admin),
    (
        "get",
        "/v1/admin/conversations/{conversation}",
        Access::Admin,
    ),
    ("post", "/v1/admin/reload", Access::Admin),
    ("get", "/v1/admin/cluster", Access::Admin),
    ("get", "/v1/admin/stream", Access::Admin),
];

const TELEGRAM_SECRET: &str = "tg-secret-5f0c2a";
const META_SECRET: &str = "meta-app-secret-9d1e";
const TWILIO_TOKEN: &str = "twilio-auth-token-77ab";
const VONAGE_SIGNATURE: &str = "vonage-signature-secret-c3";

/// The demo routing with offers that expire after a second (so "expired offer" takes a second).
const ROUTING: &str = r#"
[[queues]]
name = "support"
channels = ["chat", "email", "sms", "whatsapp", "messenger", "instagram", "telegram", "api"]
strategy = "longest_idle"
sla_seconds = 60
offer_timeout_seconds = 1
wrap_up_seconds = 15
next_tier = "tier2"

[[queues]]
name = "billing"
channels = ["chat", "email", "sms", "whatsapp", "api"]
strategy = "most_skilled"
skills = { billing = 1 }
sla_seconds = 120
offer_timeout_seconds = 1
overflow_after_seconds = 90
next_tier = "tier2"

[[queues]]
name = "tier2"
strategy = "least_occupied"
sla_seconds = 300
offer_timeout_seconds = 1
"#;

const CHANNELS: &str = "[channels.telegram.main]\nbot_token = \"123456:ABC-DEF\"\n\n\
         [channels.meta.main]\nverify_token = \"verify-me\"\naccess_token = \"graph-token\"\nwhatsapp_phone_number_ids = [\"106540352242922\"]\n\n\
         [channels.twilio.main]\naccount_sid = \"ACbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb\"\npublic_url = \"https://sb.example.com/v1/webhooks/twilio/main\"\nnumbers = [\"+14155550100\"]\n\n\
         [channels.vonage.main]\napi_key = \"abcd1234\"\napi_secret = \"vonage-api-secret\"\nnumbers = [\"+447700900000\"]\n\n\
         [channels.email]\nmailboxes = [\"support@example.com\"]\n";

/// The secrets given through the environment, as an operator would.
fn secret_env() -> Vec<(&'static str, &'static str)> {
    vec![
        (
            "SWITCHBOARD__CHANNELS__TELEGRAM__MAIN__SECRET_TOKEN",
            TELEGRAM_SECRET,
        ),
        ("SWITCHBOARD__CHANNELS__META__MAIN__APP_SECRET", META_SECRET),
        (
            "SWITCHBOARD__CHANNELS__TWILIO__MAIN__AUTH_TOKEN",
            TWILIO_TOKEN,
        ),
        (
            "SWITCHBOARD__CHANNELS__VONAGE__MAIN__SIGNATURE_SECRET",
            VONAGE_SIGNATURE,
        ),
    ]
}

fn start() -> Daemon {
    let dir = tempfile::tempdir().unwrap();
    common::write_config(dir.path(), "", &format!("{ROUTING}\n{CHANNELS}"));
    Daemon::start_capturing(dir, &secret_env())
}

/// The route with its parameters filled in: alice, her offered conversation, the Telegram webhook
/// (Meta's for the GET handshake, with a wrong verify token), an attachment key.
fn concrete(method: &str, path: &str, conversation: &str) -> String {
    if method == "get" && path == "/v1/webhooks/{provider}/{account}" {
        return "/v1/webhooks/meta/main?hub.mode=subscribe&hub.verify_token=wrong&hub.challenge=42"
            .to_owned();
    }
    path.replace("{agent}", "alice")
        .replace("{conversation}", conversation)
        .replace("{provider}", "telegram")
        .replace("{account}", "main")
        .replace("{key}", &"0".repeat(64))
}

/// One HTTP call with an optional bearer token; the status.
async fn call(daemon: &Daemon, method: &str, path: &str, token: Option<&str>) -> u16 {
    let method = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
    let mut request = daemon
        .http
        .request(method, daemon.url(path))
        .header("content-type", "application/json")
        .body("{}");
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request.send().await.unwrap().status().as_u16()
}

/// A WebSocket upgrade with an optional token: the HTTP status it is refused with, or 101.
async fn upgrade(daemon: &Daemon, path: &str, token: Option<&str>) -> u16 {
    let mut url = format!("{}{path}", daemon.base.replace("http://", "ws://"));
    if let Some(token) = token {
        url.push_str(&format!("?access_token={token}"));
    }
    match tokio_tungstenite::connect_async(url).await {
        Ok(_) => 101,
        Err(tungstenite::Error::Http(response)) => response.status().as_u16(),
        Err(error) => panic!("{path}: {error}"),
    }
}

#[tokio::test]
async fn every_documented_route_has_a_row_and_refuses_the_wrong_caller() {
    let daemon = start();
    let (status, document) = daemon.get("/v1/openapi.json", "").await;
    assert_eq!(status, 200);
    let documented: BTreeSet<(String, String)> = document["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, item)| {
            item.as_object()
                .unwrap()
                .keys()
                .filter(|method| {
                    ["get", "put", "post", "delete", "patch"].contains(&method.as_str())
                })
                .map(|method| (method.clone(), path.clone()))
                .collect::<Vec<_>>()
        })
        .collect();
    let rows: BTreeSet<(String, String)> = MATRIX
        .iter()
        .map(|(method, path, _)| ((*method).to_owned(), (*path).to_owned()))
        .collect();
    assert_eq!(
        documented, rows,
        "every documented route needs exactly one row in MATRIX (and no row for a route that is gone)"
    );

    // A conversation offered to alice.
    let mut alice = daemon.agent_socket("alice").await;
    let ack = alice
        .command(json!({ "type": "presence", "presence": "available" }))
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let (status, stored) = daemon
        .ingest(api_message("sec-1", "customer-sec", "hello"))
        .await;
    assert_eq!(status, 202, "{stored}");
    let conversation = stored["conversation_id"].as_str().unwrap().to_owned();

    let alice_token = agent_token("alice");
    let bob_token = agent_token("bob");
    for (method, template, access) in MATRIX {
        let path = concrete(method, template, &conversation);
        let websocket = template.ends_with("/stream");
        let try_token = async |token: Option<&str>| {
            if websocket {
                upgrade(&daemon, &path, token).await
            } else {
                call(&daemon, method, &path, token).await
            }
        };
        match access {
            Access::Public => {
                assert_eq!(try_token(None).await, 200, "{method} {path} is public");
            }
            Access::Chat => {
                assert_eq!(
                    try_token(None).await,
                    101,
                    "{method} {path}: no token needed"
                );
            }
            Access::Signed => {
                // Tokens are not signatures: none of them opens a webhook.
                for token in [None, Some(INGEST), Some(ADMIN), Some(alice_token.as_str())] {
                    let status = try_token(token).await;
                    assert!(
                        [401, 403].contains(&status),
                        "{method} {path} with {token:?}: {status}"
                    );
                }
            }
            Access::Ingest | Access::Admin | Access::OwnAgent | Access::AgentOrAdmin => {
                assert_eq!(
                    try_token(None).await,
                    401,
                    "{method} {path} without a token"
                );
                assert_eq!(
                    try_token(Some("not-a-token")).await,
                    401,
                    "{method} {path} with an unknown token"
                );
                let wrong: Vec<&str> = match access {
                    Access::Ingest => vec![ADMIN, &alice_token],
                    Access::Admin => vec![INGEST, &alice_token],
                    Access::OwnAgent => vec![INGEST, ADMIN, &bob_token],
                    _ => vec![INGEST],
                };
                for token in wrong {
                    assert_eq!(
                        try_token(Some(token)).await,
                        403,
                        "{method} {path} with the wrong kind of token ({token})"
                    );
                }
            }
        }
    }

    // Agent B acting on agent A's conversation, through B's own paths: refused, nothing changes.
    for action in [
        "accept", "reject", "resolve", "escalate", "transfer", "reply",
    ] {
        let body = match action {
            "transfer" => json!({ "to_agent": "carol" }),
            "reply" => json!({ "text": "not mine" }),
            _ => json!({}),
        };
        let (status, answer) = daemon
            .post(
                &format!("/v1/agents/bob/conversations/{conversation}/{action}"),
                &bob_token,
                body,
            )
            .await;
        assert!(
            [403, 409].contains(&status),
            "bob {action} on alice's offer: {status} {answer}"
        );
    }
    let (status, _) = daemon
        .get(
            &format!("/v1/agents/bob/conversations/{conversation}/messages"),
            &bob_token,
        )
        .await;
    assert_eq!(status, 403, "bob cannot read alice's conversation");

    // The offer expires (one second): accepting it afterwards is a conflict.
    let offer = alice.next_of("offer").await;
    assert_eq!(offer["conversation_id"], conversation.as_str());
    let withdrawn = alice.next_of("offer_withdrawn").await;
    assert_eq!(withdrawn["conversation_id"], conversation.as_str());
    let (status, answer) = daemon
        .post(
            &format!("/v1/agents/alice/conversations/{conversation}/accept"),
            &alice_token,
            json!({}),
        )
        .await;
    assert_eq!(status, 409, "an expired offer cannot be accepted: {answer}");

    assert_secrets_absent(&daemon.captured());
}

fn assert_secrets_absent(text: &str) {
    for (_, secret) in secret_env() {
        assert!(
            !text.contains(secret),
            "a secret leaked: {secret} in\n{text}"
        );
    }
    for token in [INGEST, ADMIN] {
        assert!(!text.contains(token), "a token leaked: {token}");
    }
}

#[tokio::test]
async fn webhook_signatures_have_no_fallback_and_secrets_stay_out_of_logs() {
    let daemon = start();
    let update = json!({ "update_id": 1, "message": { "message_id": 1, "date": 1_700_000_000, "chat": { "id": 42, "type": "private" }, "from": { "id": 42, "is_bot": false, "first_name": "Ann" }, "text": "hi" } }).to_string();
    // For each provider: the header missing is 401, a wrong value 403, and nothing is stored.
    let cases: [(&str, &str, &str, String); 4] = [
        (
            "/v1/webhooks/telegram/main",
            "application/json",
            "x-telegram-bot-api-secret-token",
            "wrong-secret".to_owned(),
        ),
        (
            "/v1/webhooks/meta/main",
            "application/json",
            "x-hub-signature-256",
            format!("sha256={}", "0".repeat(64)),
        ),
        (
            "/v1/webhooks/twilio/main",
            "application/x-www-form-urlencoded",
            "x-twilio-signature",
            "AAAAAAAAAAAAAAAAAAAAAAAAAAA=".to_owned(),
        ),
        (
            "/v1/webhooks/vonage/main",
            "application/json",
            "authorization",
            // A well-formed HS256 JWT signed with another secret.
            "Bearer eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJpYXQiOjE3MDAwMDAwMDB9.c2lnbmVkLXdpdGgtYW5vdGhlci1zZWNyZXQtMDAwMDAwMA".to_owned(),
        ),
    ];
    for (path, content_type, header, wrong) in cases {
        let body = if content_type.contains("form") {
            "From=%2B15551234567&To=%2B14155550100&Body=hi&MessageSid=SM1".to_owned()
        } else {
            update.clone()
        };
        let (status, text) = daemon.webhook(path, content_type, &[], &body).await;
        assert_eq!(status, 401, "{path} without a signature: {text}");
        let (status, text) = daemon
            .webhook(path, content_type, &[(header, wrong)], &body)
            .await;
        assert!(
            [401, 403].contains(&status),
            "{path} with a wrong signature: {status} {text}"
        );
    }
    assert!(daemon.conversations().await.is_empty(), "nothing stored");

    // Auth failures and a reload are logged without the secrets.
    assert_eq!(
        call(&daemon, "get", "/v1/admin/queues", Some("guess")).await,
        401
    );
    let (status, answer) = daemon.post("/v1/admin/reload", ADMIN, Value::Null).await;
    assert_eq!(status, 200, "{answer}");
    assert!(!answer.to_string().contains(META_SECRET));
    // Let the reload's log lines be written: the process answers after logging.
    assert_eq!(daemon.get("/healthz", "").await.0, 200);
    assert_secrets_absent(&daemon.captured());

    // check-config prints the effective configuration with every secret masked.
    let output = std::process::Command::new(common::binary())
        .arg("check-config")
        .arg("--config")
        .arg(daemon.dir.path().join("switchboard.toml"))
        .envs(secret_env())
        .env(
            "SWITCHBOARD__AUTH__ADMIN_TOKENS",
            "[\"admin-secret-token-81\"]",
        )
        .output()
        .unwrap();
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{printed}");
    assert_secrets_absent(&printed);
    assert!(!printed.contains("admin-secret-token-81"), "{printed}");
}
