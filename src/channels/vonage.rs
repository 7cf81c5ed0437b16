//! Vonage Messages API: inbound and status webhooks signed with a JWT (`Authorization: Bearer`,
//! HS256 with the account's signature secret, its `payload_hash` the SHA-256 of the body), replies
//! through `POST /v1/messages` with HTTP Basic auth.

use async_trait::async_trait;
use base64::Engine;
use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::{
    AccountSender, DeliveryState, Inbound, RateLimit, StatusUpdate, Webhook, WebhookError,
    WebhookRequest, call, e164, http_client,
};
use crate::config::channels::VonageAccount;
use crate::daemon::outbound::{ChannelSender, SendError};
use crate::message::{Address, Attachment, InboundMessage};
use crate::store::StoredMessage;

/// One Vonage application.
#[derive(Debug)]
pub struct Vonage {
    account: VonageAccount,
    client: reqwest::Client,
    limit: RateLimit,
}

impl Vonage {
    pub fn new(account: VonageAccount) -> Vonage {
        Vonage {
            limit: RateLimit::per_second(account.max_per_second),
            client: http_client(),
            account,
        }
    }
}

#[derive(Debug, Deserialize)]
struct JwtHeader {
    alg: String,
}

#[derive(Debug, Deserialize)]
struct Claims {
    iat: i64,
    payload_hash: Option<String>,
    api_key: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Webhooked {
    channel: String,
    message_uuid: String,
    to: String,
    from: String,
    timestamp: Option<DateTime<Utc>>,
    status: Option<String>,
    message_type: Option<String>,
    text: Option<String>,
    error: Option<VonageError>,
    profile: Option<VonageProfile>,
    #[serde(flatten)]
    rest: serde_json::Map<String, Value>,
}

#[derive(Debug, Deserialize)]
struct VonageError {
    title: Option<Value>,
    detail: Option<String>,
}

#[derive(Debug, Deserialize)]
struct VonageProfile {
    name: Option<String>,
}

fn unauthorized(reason: &str) -> WebhookError {
    WebhookError::Forbidden(format!("webhook JWT refused: {reason}"))
}

/// Checks the signed JWT: HS256 over `header.payload`, the body's hash, its age and api key.
fn verify_jwt(
    account: &VonageAccount,
    token: &str,
    body: &[u8],
    now: DateTime<Utc>,
) -> Result<(), WebhookError> {
    let url = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(unauthorized("not a JWT"));
    };
    let header: JwtHeader = url
        .decode(header)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .ok_or_else(|| unauthorized("bad header"))?;
    if header.alg != "HS256" {
        return Err(unauthorized("alg must be HS256"));
    }
    let signature = url
        .decode(signature)
        .map_err(|_| unauthorized("bad signature encoding"))?;
    let mut mac = Hmac::<Sha256>::new_from_slice(account.signature_secret.expose().as_bytes())
        .map_err(|_| unauthorized("unusable secret"))?;
    mac.update(&token.as_bytes()[..header_and_payload_len(token)]);
    mac.verify_slice(&signature)
        .map_err(|_| unauthorized("signature does not match the signature secret"))?;
    let claims: Claims = url
        .decode(payload)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .ok_or_else(|| unauthorized("bad claims"))?;
    let body_hash = hex::encode(Sha256::digest(body));
    if claims.payload_hash.as_deref() != Some(body_hash.as_str()) {
        return Err(unauthorized("payload_hash does not match the body"));
    }
    // `iat` is whatever the token says: saturate, as a subtraction from `i64::MIN` overflows.
    let age = now.timestamp().saturating_sub(claims.iat);
    if age > i64::try_from(account.max_age_seconds).unwrap_or(i64::MAX) || age < -60 {
        return Err(unauthorized("iat is too old (a replay?)"));
    }
    if claims
        .api_key
        .as_ref()
        .is_some_and(|key| key != &account.api_key)
    {
        return Err(unauthorized("api_key is not this account's"));
    }
    Ok(())
}

fn header_and_payload_len(token: &str) -> usize {
    token.rfind('.').unwrap_or(0)
}

/// A webhook JWT as Vonage signs it (tests sign with it).
pub fn sign(secret: &str, api_key: &str, iat: i64, body: &[u8]) -> String {
    let url = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let header = url.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let claims = json!({
        "iat": iat,
        "jti": format!("jti-{iat}"),
        "iss": "Vonage",
        "payload_hash": hex::encode(Sha256::digest(body)),
        "api_key": api_key,
        "application_id": "aaaaaaaa-bbbb-cccc-dddd-0123456789ab",
    });
    let payload = url.encode(claims.to_string());
    let signing_input = format!("{header}.{payload}");
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else {
        return String::new();
    };
    mac.update(signing_input.as_bytes());
    format!(
        "{signing_input}.{}",
        url.encode(mac.finalize().into_bytes())
    )
}

impl Webhook for Vonage {
    fn receive(&self, request: &WebhookRequest<'_>) -> Result<Vec<Inbound>, WebhookError> {
        let token = request
            .headers
            .get("authorization")
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .ok_or_else(|| {
                WebhookError::Unauthenticated("Authorization: Bearer <JWT> is missing".into())
            })?;
        verify_jwt(&self.account, token.trim(), request.body, request.now)?;
        let hook: Webhooked = serde_json::from_slice(request.body).map_err(|error| {
            WebhookError::Malformed(format!("not a Messages API webhook: {error}"))
        })?;
        let channel = match hook.channel.as_str() {
            "sms" | "mms" => "sms",
            "whatsapp" => "whatsapp",
            other => {
                return Err(WebhookError::Malformed(format!(
                    "channel `{other}` is not taken (sms, mms, whatsapp)"
                )));
            }
        };
        if let Some(status) = &hook.status {
            let state = match status.as_str() {
                "delivered" | "read" => DeliveryState::Delivered,
                "rejected" | "undeliverable" => DeliveryState::Failed,
                // `submitted`: still on the way.
                _ => return Ok(Vec::new()),
            };
            let error = hook.error.as_ref().map(|error| {
                let code = match &error.title {
                    Some(Value::String(text)) => text.clone(),
                    Some(other) => other.to_string(),
                    None => status.clone(),
                };
                format!(
                    "vonage error {code}: {}",
                    error.detail.as_deref().unwrap_or(status)
                )
            });
            return Ok(vec![Inbound::Status(StatusUpdate {
                channel: channel.into(),
                provider_message_id: hook.message_uuid,
                state,
                error: error.or_else(|| {
                    (state == DeliveryState::Failed).then(|| format!("vonage: {status}"))
                }),
            })]);
        }
        let mut message = InboundMessage::new(
            channel,
            "vonage",
            &hook.message_uuid,
            &e164(&hook.from)?,
            hook.text.as_deref().unwrap_or_default(),
        );
        message.to = Some(Address {
            address: e164(&hook.to)?,
            name: None,
        });
        message.received_at = hook.timestamp;
        message.from.name = hook.profile.and_then(|profile| profile.name);
        let kind = hook.message_type.unwrap_or_else(|| "text".into());
        if let Some(url) = hook.rest.get(&kind).and_then(|media| media["url"].as_str()) {
            message.attachments.push(Attachment {
                url: url.to_owned(),
                content_type: format!("{kind}/*"),
                filename: hook.rest[&kind]["name"].as_str().map(str::to_owned),
                size: None,
            });
            if message.text.is_empty()
                && let Some(caption) = hook.rest[&kind]["caption"].as_str()
            {
                message.text = caption.to_owned();
            }
        }
        message.metadata.insert("message_type".into(), json!(kind));
        Ok(vec![Inbound::Message(Box::new(message))])
    }
}

#[async_trait]
impl ChannelSender for Vonage {
    async fn send(&self, reply: &StoredMessage) -> Result<Option<String>, SendError> {
        let text = reply.body["text"].as_str().unwrap_or_default();
        let body = json!({
            "message_type": "text",
            "text": text,
            "to": reply.to_address.trim_start_matches('+'),
            "from": reply.from_address.trim_start_matches('+'),
            "channel": reply.channel,
            "client_ref": reply.id.to_string(),
        });
        self.limit.acquire().await;
        let request = self
            .client
            .post(format!("{}/v1/messages", self.account.api_url))
            .basic_auth(
                &self.account.api_key,
                Some(self.account.api_secret.expose()),
            )
            .json(&body);
        let answer = call("vonage", request)
            .await
            .map_err(|failure| failure.error)?;
        Ok(answer["message_uuid"].as_str().map(str::to_owned))
    }
}

impl AccountSender for Vonage {
    fn provider(&self) -> &'static str {
        "vonage"
    }

    fn serves(&self, _channel: &str, our_address: &str) -> bool {
        self.account
            .numbers
            .iter()
            .any(|number| number == our_address)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::config::Secret;
    use axum::http::HeaderMap;

    fn vonage() -> Vonage {
        Vonage::new(VonageAccount {
            name: "main".into(),
            api_key: "abcd1234".into(),
            api_secret: Secret::new("api-secret"),
            signature_secret: Secret::new("signature-secret"),
            numbers: vec!["+447700900000".into()],
            api_url: "http://127.0.0.1:9".into(),
            max_age_seconds: 300,
            max_per_second: 10,
        })
    }

    /// Shaped like the Messages API's documented inbound SMS webhook.
    const INBOUND: &str = r#"{"channel":"sms","message_uuid":"aaaaaaaa-bbbb-cccc-dddd-0123456789ab","to":"447700900000","from":"447700900001","timestamp":"2025-02-03T12:14:25Z","text":"Hello From Vonage!","sms":{"num_messages":"1","keyword":"HELLO"},"message_type":"text"}"#;
    /// And its status webhook for a rejected message.
    const STATUS: &str = r#"{"message_uuid":"bbbbbbbb-cccc-dddd-eeee-0123456789ab","to":"447700900001","from":"447700900000","timestamp":"2025-02-03T12:14:25Z","status":"rejected","error":{"type":"https://developer.vonage.com/api-errors/messages#1330","title":1330,"detail":"The message was rejected by the carrier","instance":"bf0ca0bf927b3b52e3cb03217e1a1ddf"},"channel":"sms"}"#;

    fn receive(token: Option<&str>, body: &str) -> Result<Vec<Inbound>, WebhookError> {
        let mut headers = HeaderMap::new();
        if let Some(token) = token {
            headers.insert("authorization", format!("Bearer {token}").parse().unwrap());
        }
        vonage().receive(&WebhookRequest {
            query: None,
            headers: &headers,
            body: body.as_bytes(),
            now: Utc::now(),
        })
    }

    #[test]
    fn signed_inbound_and_status_webhooks_are_read() {
        let now = Utc::now().timestamp();
        let token = sign("signature-secret", "abcd1234", now, INBOUND.as_bytes());
        let items = receive(Some(&token), INBOUND).unwrap();
        let [Inbound::Message(message)] = items.as_slice() else {
            panic!("{items:?}")
        };
        assert_eq!(message.from.address, "+447700900001");
        assert_eq!(message.to.as_ref().unwrap().address, "+447700900000");
        assert_eq!(message.validate(), Ok(()));

        let token = sign("signature-secret", "abcd1234", now, STATUS.as_bytes());
        let items = receive(Some(&token), STATUS).unwrap();
        let [Inbound::Status(status)] = items.as_slice() else {
            panic!("{items:?}")
        };
        assert_eq!(status.state, DeliveryState::Failed);
        assert_eq!(
            status.error.as_deref(),
            Some("vonage error 1330: The message was rejected by the carrier")
        );
    }

    /// Found by `fuzz/fuzz_targets/vonage_webhook.rs`: a correctly signed token whose `iat` is
    /// near `i64::MIN` overflowed the age subtraction (a panic with overflow checks on, a wrapped
    /// age without). The file holds the target's input: a mode byte, `iat` (8 bytes, little
    /// endian), then the body.
    #[test]
    fn an_iat_at_the_end_of_the_clock_is_refused_without_overflow() {
        let input = include_bytes!("../../fuzz/regressions/vonage_webhook/iat-overflow");
        let (iat, body) = input[1..].split_first_chunk::<8>().unwrap();
        for iat in [i64::from_le_bytes(*iat), i64::MIN, i64::MAX] {
            let token = sign("signature-secret", "abcd1234", iat, body);
            let mut headers = HeaderMap::new();
            headers.insert("authorization", format!("Bearer {token}").parse().unwrap());
            let error = vonage()
                .receive(&WebhookRequest {
                    query: None,
                    headers: &headers,
                    body,
                    now: Utc::now(),
                })
                .unwrap_err();
            assert!(error.to_string().contains("iat"), "{iat}: {error}");
        }
    }

    #[test]
    fn bad_tokens_are_refused() {
        let now = Utc::now().timestamp();
        assert!(matches!(
            receive(None, INBOUND),
            Err(WebhookError::Unauthenticated(_))
        ));
        let wrong_secret = sign("other", "abcd1234", now, INBOUND.as_bytes());
        assert!(matches!(
            receive(Some(&wrong_secret), INBOUND),
            Err(WebhookError::Forbidden(_))
        ));
        let other_body = sign("signature-secret", "abcd1234", now, STATUS.as_bytes());
        let error = receive(Some(&other_body), INBOUND).unwrap_err();
        assert!(error.to_string().contains("payload_hash"), "{error}");
        let stale = sign(
            "signature-secret",
            "abcd1234",
            now - 3600,
            INBOUND.as_bytes(),
        );
        assert!(
            receive(Some(&stale), INBOUND)
                .unwrap_err()
                .to_string()
                .contains("iat")
        );
    }
}
