//! Twilio SMS through the real binary: signed webhooks in, replies out to a mock of Twilio's
//! Messages API, status callbacks, retries.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::Daemon;
use serde_json::json;
use switchboard::channels::twilio::signature;
use wiremock::matchers::{body_string_contains, header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

const WEBHOOK: &str = "/v1/webhooks/twilio/main";
const PUBLIC_URL: &str = "https://sb.example.com/v1/webhooks/twilio/main";
const TOKEN: &str = "twilio-auth-token";
const SID: &str = "ACaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const MESSAGES_PATH: &str = "/2010-04-01/Accounts/ACaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa/Messages.json";

pub fn twilio_config(api: &str) -> String {
    account_config(TOKEN, "+14155550100", api)
}

/// The `main` account with its auth token, number and API base.
fn account_config(token: &str, number: &str, api: &str) -> String {
    format!(
        r#"
[outbound]
initial_backoff_ms = 20
max_backoff_ms = 100

[channels.twilio.main]
account_sid = "{SID}"
auth_token = "{token}"
public_url = "{PUBLIC_URL}"
numbers = ["{number}"]
api_url = "{api}"
"#
    )
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// Posts a form signed as Twilio signs it.
async fn post_signed(daemon: &Daemon, form: &[(&str, &str)]) -> (u16, String) {
    post_signed_with(daemon, TOKEN, form).await
}

/// Posts a form signed with `token`.
async fn post_signed_with(daemon: &Daemon, token: &str, form: &[(&str, &str)]) -> (u16, String) {
    let form = pairs(form);
    let body = serde_urlencoded::to_string(&form).unwrap();
    let signed = signature(token, PUBLIC_URL, &form);
    daemon
        .webhook(
            WEBHOOK,
            "application/x-www-form-urlencoded",
            &[("x-twilio-signature", signed)],
            &body,
        )
        .await
}

fn inbound<'a>(sid: &'a str, body: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("MessageSid", sid),
        ("SmsSid", sid),
        ("AccountSid", SID),
        ("From", "+14155550123"),
        ("To", "+14155550100"),
        ("Body", body),
        ("NumMedia", "0"),
        ("SmsStatus", "received"),
        ("ApiVersion", "2010-04-01"),
    ]
}

#[tokio::test]
async fn sms_in_reply_out_status_back() {
    let twilio = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(MESSAGES_PATH))
        .and(header(
            "authorization",
            "Basic QUNhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYTp0d2lsaW8tYXV0aC10b2tlbg==",
        ))
        .respond_with(
            ResponseTemplate::new(201)
                .set_body_json(json!({ "sid": "SMreply1", "status": "queued" })),
        )
        .mount(&twilio)
        .await;
    let daemon = Daemon::start(&twilio_config(&twilio.uri()));
    let mut alice = daemon.agent_socket("alice").await;
    alice
        .command(json!({ "type": "presence", "presence": "available" }))
        .await;

    let (status, answer) = post_signed(&daemon, &inbound("SM100", "Where is my parcel?")).await;
    assert_eq!(status, 200, "{answer}");
    assert!(answer.contains("<Response></Response>"), "{answer}");
    let offer = alice.next_of("offer").await;
    let conversation = offer["conversation_id"].as_str().unwrap().to_owned();

    // Twilio retries a delivery it thinks failed: nothing is stored twice.
    let (status, _) = post_signed(&daemon, &inbound("SM100", "Where is my parcel?")).await;
    assert_eq!(status, 200);
    // Wrong or missing signatures are refused and store nothing.
    let body = serde_urlencoded::to_string(pairs(&inbound("SM101", "forged"))).unwrap();
    let (status, reason) = daemon
        .webhook(
            WEBHOOK,
            "application/x-www-form-urlencoded",
            &[("x-twilio-signature", "0/KCTR6DLpKmkAf8muzZqo1nDgQ=".into())],
            &body,
        )
        .await;
    assert_eq!(status, 403, "{reason}");
    assert!(reason.contains("X-Twilio-Signature"), "{reason}");
    let (status, _) = daemon
        .webhook(WEBHOOK, "application/x-www-form-urlencoded", &[], &body)
        .await;
    assert_eq!(status, 401);
    let (status, _) = post_signed(&daemon, &[("MessageSid", "SM102")]).await;
    assert_eq!(status, 400, "a delivery without From is malformed");
    assert_eq!(daemon.conversations().await.len(), 1);

    alice
        .command(json!({ "type": "accept", "conversation_id": conversation }))
        .await;
    let history = daemon.history("alice", &conversation).await;
    assert_eq!(history.len(), 1, "{history:?}");
    assert_eq!(history[0]["channel"], "sms");

    let (status, reply) = daemon
        .reply_as("alice", &conversation, "It arrives tomorrow.")
        .await;
    assert_eq!(status, 202, "{reply}");
    let sent = alice.next_of("reply_status").await;
    assert_eq!(sent["status"], "sent", "{sent}");
    let requests = twilio.received_requests().await.unwrap();
    assert_eq!(requests.len(), 1);
    let form: Vec<(String, String)> = serde_urlencoded::from_bytes(&requests[0].body).unwrap();
    let field = |name: &str| {
        form.iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    };
    assert_eq!(field("To"), Some("+14155550123"));
    assert_eq!(field("From"), Some("+14155550100"));
    assert_eq!(field("Body"), Some("It arrives tomorrow."));
    assert_eq!(field("StatusCallback"), Some(PUBLIC_URL));

    // Twilio's status callback: the carrier could not deliver it.
    let (status, _) = post_signed(
        &daemon,
        &[
            ("MessageSid", "SMreply1"),
            ("MessageStatus", "undelivered"),
            ("ErrorCode", "30003"),
            ("AccountSid", SID),
            ("From", "+14155550100"),
            ("To", "+14155550123"),
        ],
    )
    .await;
    assert_eq!(status, 200);
    let failed = alice.next_of("reply_status").await;
    assert_eq!(failed["status"], "failed", "{failed}");
    assert!(
        failed["reason"].as_str().unwrap().contains("30003"),
        "{failed}"
    );
    let history = daemon.history("alice", &conversation).await;
    assert_eq!(history[1]["delivery_status"], "failed");
}

#[tokio::test]
async fn sends_retry_on_5xx_and_not_on_4xx() {
    let twilio = MockServer::start().await;
    Mock::given(method("POST"))
        .and(body_string_contains("first"))
        .respond_with(ResponseTemplate::new(503))
        .up_to_n_times(1)
        .mount(&twilio)
        .await;
    Mock::given(method("POST"))
        .and(body_string_contains("first"))
        .respond_with(ResponseTemplate::new(201).set_body_json(json!({ "sid": "SMfirst" })))
        .mount(&twilio)
        .await;
    Mock::given(method("POST"))
        .and(body_string_contains("second"))
        .respond_with(
            ResponseTemplate::new(400)
                .set_body_json(json!({ "code": 21211, "message": "Invalid 'To' Phone Number" })),
        )
        .mount(&twilio)
        .await;
    let daemon = Daemon::start(&twilio_config(&twilio.uri()));
    let mut alice = daemon.agent_socket("alice").await;
    alice
        .command(json!({ "type": "presence", "presence": "available" }))
        .await;
    post_signed(&daemon, &inbound("SM200", "hello")).await;
    let conversation = alice.accept_next_offer().await;
    let reply = |text: &'static str| {
        let (daemon, conversation) = (&daemon, conversation.clone());
        async move { daemon.reply_as("alice", &conversation, text).await }
    };
    reply("first").await;
    assert_eq!(alice.next_of("reply_status").await["status"], "sent");
    reply("second").await;
    let failed = alice.next_of("reply_status").await;
    assert_eq!(failed["status"], "failed");
    assert!(
        failed["reason"].as_str().unwrap().contains("21211"),
        "{failed}"
    );
    let requests = twilio.received_requests().await.unwrap();
    let count = |needle: &str| {
        requests
            .iter()
            .filter(|request| String::from_utf8_lossy(&request.body).contains(needle))
            .count()
    };
    assert_eq!(count("first"), 2, "one 503, then the retry");
    assert_eq!(count("second"), 1, "a 4xx is never retried");
}

/// Rewrites the daemon's config file with the `main` account given.
fn rewrite_account(daemon: &Daemon, token: &str, number: &str, api: &str) {
    common::write_config(daemon.dir.path(), "", &account_config(token, number, api));
}

#[tokio::test]
async fn reload_puts_new_accounts_in_force_and_refuses_an_invalid_file() {
    let (old_api, new_api) = (MockServer::start().await, MockServer::start().await);
    for (api, token, sid) in [
        (&old_api, TOKEN, "SMold"),
        (&new_api, "rotated-token", "SMnew"),
    ] {
        let basic = base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            format!("{SID}:{token}"),
        );
        Mock::given(method("POST"))
            .and(path(MESSAGES_PATH))
            .and(header("authorization", format!("Basic {basic}")))
            .respond_with(ResponseTemplate::new(201).set_body_json(json!({ "sid": sid })))
            .mount(api)
            .await;
    }
    let daemon = Daemon::start(&twilio_config(&old_api.uri()));
    let mut alice = daemon.agent_socket("alice").await;
    alice
        .command(json!({ "type": "presence", "presence": "available" }))
        .await;
    let (status, _) = post_signed(&daemon, &inbound("SM300", "before the rotation")).await;
    assert_eq!(status, 200);
    let conversation = alice.accept_next_offer().await;

    // The auth token is rotated, the number moves and the API base changes: SIGHUP reloads them.
    rewrite_account(&daemon, "rotated-token", "+14155550199", &new_api.uri());
    daemon.signal("HUP");
    let mut to_new = inbound("SM301", "after the rotation");
    to_new[4] = ("To", "+14155550199");
    common::eventually(10, "the rotated token to be accepted", || async {
        let (status, _) = post_signed_with(&daemon, "rotated-token", &to_new).await;
        (status == 200).then_some(())
    })
    .await;
    let (status, reason) = post_signed(&daemon, &inbound("SM302", "old token")).await;
    assert_eq!(
        status, 403,
        "the old token is refused after the reload: {reason}"
    );

    // A reply now goes out through the new account: its number, its token, its API.
    let (status, reply) = daemon.reply_as("alice", &conversation, "Noted.").await;
    assert_eq!(status, 202, "{reply}");
    let sent = alice.next_of("reply_status").await;
    assert_eq!(sent["status"], "sent", "{sent}");
    assert!(old_api.received_requests().await.unwrap().is_empty());
    let requests = new_api.received_requests().await.unwrap();
    assert_eq!(requests.len(), 1);
    let form: Vec<(String, String)> = serde_urlencoded::from_bytes(&requests[0].body).unwrap();
    assert!(
        form.contains(&("From".into(), "+14155550199".into())),
        "{form:?}"
    );

    // An invalid file is refused with the reason (422) and the accounts in force stay.
    rewrite_account(&daemon, "third-token", "not-a-number", &new_api.uri());
    let (status, body) = daemon
        .post("/v1/admin/reload", common::ADMIN, json!({}))
        .await;
    assert_eq!(status, 422, "{body}");
    assert!(body.to_string().contains("numbers"), "{body}");
    let (status, _) = post_signed_with(&daemon, "rotated-token", &inbound("SM303", "kept")).await;
    assert_eq!(
        status, 200,
        "the accounts in force stay after a refused reload"
    );
    let (status, _) = post_signed_with(&daemon, "third-token", &inbound("SM304", "no")).await;
    assert_eq!(status, 403);

    // The admin endpoint's reload is in force when it answers.
    rewrite_account(&daemon, "third-token", "+14155550199", &new_api.uri());
    let (status, body) = daemon
        .post("/v1/admin/reload", common::ADMIN, json!({}))
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = post_signed_with(&daemon, "third-token", &inbound("SM305", "yes")).await;
    assert_eq!(status, 200);
    let (status, _) = post_signed_with(&daemon, "rotated-token", &inbound("SM306", "no")).await;
    assert_eq!(status, 403);
}

#[tokio::test]
async fn a_status_callback_before_the_send_returns_is_applied_when_it_does() {
    let twilio = MockServer::start().await;
    // Twilio answers the send slowly; its status callback for the message comes in meanwhile.
    Mock::given(method("POST"))
        .and(path(MESSAGES_PATH))
        .respond_with(
            ResponseTemplate::new(201)
                .set_body_json(json!({ "sid": "SMearly", "status": "queued" }))
                .set_delay(std::time::Duration::from_secs(2)),
        )
        .mount(&twilio)
        .await;
    let daemon = Daemon::start(&twilio_config(&twilio.uri()));
    let mut alice = daemon.agent_socket("alice").await;
    alice
        .command(json!({ "type": "presence", "presence": "available" }))
        .await;
    post_signed(&daemon, &inbound("SM400", "hello")).await;
    let conversation = alice.accept_next_offer().await;
    let (status, reply) = daemon.reply_as("alice", &conversation, "Hi!").await;
    assert_eq!(status, 202, "{reply}");
    common::eventually(10, "the send to reach Twilio", || async {
        (!twilio.received_requests().await.unwrap().is_empty()).then_some(())
    })
    .await;
    let (status, _) = post_signed(
        &daemon,
        &[
            ("MessageSid", "SMearly"),
            ("MessageStatus", "undelivered"),
            ("ErrorCode", "30005"),
            ("AccountSid", SID),
            ("From", "+14155550100"),
            ("To", "+14155550123"),
        ],
    )
    .await;
    assert_eq!(status, 200, "the early callback is taken, not lost");
    let sent = alice.next_of("reply_status").await;
    assert_eq!(sent["status"], "sent", "{sent}");
    let failed = alice.next_of("reply_status").await;
    assert_eq!(failed["status"], "failed", "{failed}");
    assert!(
        failed["reason"].as_str().unwrap().contains("30005"),
        "{failed}"
    );
    let history = daemon.history("alice", &conversation).await;
    assert_eq!(history[1]["delivery_status"], "failed");
}
