//! Meta: WhatsApp Cloud API, Messenger and Instagram, one app per account.
//!
//! Webhooks: the GET handshake (`hub.mode=subscribe`, `hub.verify_token`, answer `hub.challenge`),
//! then every POST signed with `X-Hub-Signature-256: sha256=<hex HMAC-SHA256 of the raw body with the
//! app secret>`. WhatsApp deliveries nest messages and statuses in `entry[].changes[].value`;
//! Messenger and Instagram in `entry[].messaging[]`, where echoes of our own sends are ignored.
//! Sends go through the Graph API and respect the 24-hour customer-service window: inside it free
//! text; outside it WhatsApp sends the configured template, Messenger and Instagram tag the message
//! `HUMAN_AGENT` (up to 7 days); otherwise the send fails with the reason.

use async_trait::async_trait;
use chrono::{DateTime, Duration, TimeZone, Utc};
use hmac::{Hmac, Mac};
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::Sha256;
use std::sync::Arc;

use super::{
    AccountSender, DeliveryState, Inbound, RateLimit, StatusUpdate, Webhook, WebhookError,
    WebhookRequest, call, e164, http_client, permanent,
};
use crate::config::channels::MetaAccount;
use crate::daemon::outbound::{ChannelSender, SendError, conversation_history};
use crate::message::{Address, Attachment, InboundMessage};
use crate::store::{Direction, Store, StoredMessage};

/// One Meta app.
#[derive(Debug)]
pub struct Meta {
    account: MetaAccount,
    store: Arc<dyn Store>,
    client: reqwest::Client,
    limit: RateLimit,
}

impl Meta {
    pub fn new(account: MetaAccount, store: Arc<dyn Store>) -> Meta {
        Meta {
            limit: RateLimit::per_second(account.max_per_second),
            client: http_client(),
            store,
            account,
        }
    }
}

// ----- wire types (Graph API webhooks) ---------------------------------------------------------

#[derive(Debug, Deserialize)]
struct Delivery {
    object: String,
    #[serde(default)]
    entry: Vec<Entry>,
}

#[derive(Debug, Deserialize)]
struct Entry {
    #[serde(default)]
    changes: Vec<Change>,
    #[serde(default)]
    messaging: Vec<Messaging>,
}

#[derive(Debug, Deserialize)]
struct Change {
    field: String,
    value: WhatsappValue,
}

#[derive(Debug, Deserialize)]
struct WhatsappValue {
    metadata: Option<WhatsappMetadata>,
    #[serde(default)]
    contacts: Vec<WhatsappContact>,
    #[serde(default)]
    messages: Vec<WhatsappMessage>,
    #[serde(default)]
    statuses: Vec<WhatsappStatus>,
}

#[derive(Debug, Deserialize)]
struct WhatsappMetadata {
    display_phone_number: String,
    phone_number_id: String,
}

#[derive(Debug, Deserialize)]
struct WhatsappContact {
    wa_id: String,
    profile: Option<Profile>,
}

#[derive(Debug, Deserialize)]
struct Profile {
    name: Option<String>,
}

#[derive(Debug, Deserialize)]
struct WhatsappMessage {
    from: String,
    id: String,
    timestamp: String,
    #[serde(rename = "type")]
    kind: String,
    text: Option<WhatsappText>,
    #[serde(flatten)]
    rest: serde_json::Map<String, Value>,
}

#[derive(Debug, Deserialize)]
struct WhatsappText {
    body: String,
}

#[derive(Debug, Deserialize)]
struct WhatsappStatus {
    id: String,
    status: String,
    #[serde(default)]
    errors: Vec<WhatsappError>,
}

#[derive(Debug, Deserialize)]
struct WhatsappError {
    code: i64,
    title: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Messaging {
    sender: Party,
    recipient: Party,
    timestamp: Option<i64>,
    message: Option<SocialMessage>,
    delivery: Option<SocialDelivery>,
}

#[derive(Debug, Deserialize)]
struct Party {
    id: String,
}

#[derive(Debug, Deserialize)]
struct SocialMessage {
    mid: String,
    text: Option<String>,
    #[serde(default)]
    is_echo: bool,
    #[serde(default)]
    attachments: Vec<SocialAttachment>,
}

#[derive(Debug, Deserialize)]
struct SocialAttachment {
    #[serde(rename = "type")]
    kind: String,
    payload: Option<SocialPayload>,
}

#[derive(Debug, Deserialize)]
struct SocialPayload {
    url: Option<String>,
}

#[derive(Debug, Deserialize)]
struct SocialDelivery {
    #[serde(default)]
    mids: Vec<String>,
}

// ----- inbound ----------------------------------------------------------------------------------

/// `sha256=<hex>` of the body with the app secret, compared in constant time.
fn signature_matches(app_secret: &str, body: &[u8], header: &str) -> bool {
    let Some(given) = header
        .strip_prefix("sha256=")
        .and_then(|hex_text| hex::decode(hex_text).ok())
    else {
        return false;
    };
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(app_secret.as_bytes()) else {
        return false;
    };
    mac.update(body);
    mac.verify_slice(&given).is_ok()
}

/// `X-Hub-Signature-256` for a body (what Meta sends; tests sign with it).
pub fn signature(app_secret: &str, body: &[u8]) -> String {
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(app_secret.as_bytes()) else {
        return String::new();
    };
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

fn seconds(timestamp: i64) -> Option<DateTime<Utc>> {
    Utc.timestamp_opt(timestamp, 0).single()
}

impl Meta {
    fn whatsapp(&self, value: WhatsappValue, items: &mut Vec<Inbound>) -> Result<(), WebhookError> {
        let metadata = value.metadata.ok_or_else(|| {
            WebhookError::Malformed("entry.changes.value.metadata is missing".into())
        })?;
        for status in value.statuses {
            let state = match status.status.as_str() {
                "sent" => DeliveryState::Sent,
                "delivered" | "read" => DeliveryState::Delivered,
                "failed" => DeliveryState::Failed,
                _ => continue,
            };
            let error = status.errors.first().map(|error| {
                format!(
                    "whatsapp error {}: {}",
                    error.code,
                    error.title.as_deref().unwrap_or("failed")
                )
            });
            items.push(Inbound::Status(StatusUpdate {
                channel: "whatsapp".into(),
                provider_message_id: status.id,
                state,
                error,
            }));
        }
        for wa in value.messages {
            let from = e164(&wa.from)?;
            let mut message = InboundMessage::new(
                "whatsapp",
                "meta",
                &wa.id,
                &from,
                wa.text.as_ref().map_or("", |text| text.body.as_str()),
            );
            message.to = Some(Address {
                address: metadata.phone_number_id.clone(),
                name: Some(metadata.display_phone_number.clone()),
            });
            message.from.name = value
                .contacts
                .iter()
                .find(|contact| contact.wa_id == wa.from)
                .and_then(|contact| contact.profile.as_ref()?.name.clone());
            message.received_at = wa.timestamp.parse().ok().and_then(seconds);
            // Media arrive as ids: the Graph API's media URL is where the content is fetched.
            if let Some(media) = wa.rest.get(&wa.kind).filter(|_| wa.kind != "text")
                && let Some(id) = media["id"].as_str()
            {
                message.attachments.push(Attachment {
                    url: format!("{}/{id}", self.account.graph_base),
                    content_type: media["mime_type"]
                        .as_str()
                        .unwrap_or("application/octet-stream")
                        .to_owned(),
                    filename: media["filename"].as_str().map(str::to_owned),
                    size: None,
                });
                if message.text.is_empty()
                    && let Some(caption) = media["caption"].as_str()
                {
                    message.text = caption.to_owned();
                }
            }
            message
                .metadata
                .insert("type".into(), Value::String(wa.kind.clone()));
            items.push(Inbound::Message(Box::new(message)));
        }
        Ok(())
    }

    fn social(
        channel: &str,
        messaging: Messaging,
        items: &mut Vec<Inbound>,
    ) -> Result<(), WebhookError> {
        if let Some(delivery) = messaging.delivery {
            for mid in delivery.mids {
                items.push(Inbound::Status(StatusUpdate {
                    channel: channel.into(),
                    provider_message_id: mid,
                    state: DeliveryState::Delivered,
                    error: None,
                }));
            }
        }
        let Some(social) = messaging.message else {
            return Ok(());
        };
        // Echoes are our own sends coming back: not customer messages.
        if social.is_echo {
            return Ok(());
        }
        let mut message = InboundMessage::new(
            channel,
            "meta",
            &social.mid,
            &messaging.sender.id,
            social.text.as_deref().unwrap_or_default(),
        );
        message.to = Some(Address {
            address: messaging.recipient.id.clone(),
            name: None,
        });
        message.thread_key = Some(format!(
            "{channel}:{}:{}",
            messaging.sender.id, messaging.recipient.id
        ));
        message.received_at = messaging.timestamp.and_then(|ms| {
            seconds(ms.div_euclid(1000)).map(|at| at + Duration::milliseconds(ms.rem_euclid(1000)))
        });
        for attachment in social.attachments {
            if let Some(url) = attachment.payload.and_then(|payload| payload.url) {
                message.attachments.push(Attachment {
                    url,
                    content_type: match attachment.kind.as_str() {
                        "image" => "image/*",
                        "video" => "video/*",
                        "audio" => "audio/*",
                        _ => "application/octet-stream",
                    }
                    .to_owned(),
                    filename: None,
                    size: None,
                });
            }
        }
        items.push(Inbound::Message(Box::new(message)));
        Ok(())
    }
}

impl Webhook for Meta {
    fn handshake(&self, query: Option<&str>) -> Result<String, WebhookError> {
        let params: Vec<(String, String)> =
            serde_urlencoded::from_str(query.unwrap_or_default())
                .map_err(|error| WebhookError::Malformed(format!("bad query: {error}")))?;
        let get = |name: &str| {
            params
                .iter()
                .find(|(key, _)| key == name)
                .map(|(_, value)| value.as_str())
        };
        if get("hub.mode") != Some("subscribe") {
            return Err(WebhookError::Malformed("hub.mode must be subscribe".into()));
        }
        let token = get("hub.verify_token")
            .ok_or_else(|| WebhookError::Unauthenticated("hub.verify_token is missing".into()))?;
        if !self.account.verify_token.matches(token) {
            return Err(WebhookError::Forbidden(
                "hub.verify_token does not match".into(),
            ));
        }
        get("hub.challenge")
            .map(str::to_owned)
            .ok_or_else(|| WebhookError::Malformed("hub.challenge is missing".into()))
    }

    fn receive(&self, request: &WebhookRequest<'_>) -> Result<Vec<Inbound>, WebhookError> {
        let header = request
            .headers
            .get("x-hub-signature-256")
            .and_then(|value| value.to_str().ok())
            .ok_or_else(|| {
                WebhookError::Unauthenticated("X-Hub-Signature-256 is missing".into())
            })?;
        if !signature_matches(self.account.app_secret.expose(), request.body, header) {
            return Err(WebhookError::Forbidden(
                "X-Hub-Signature-256 does not match the app secret".into(),
            ));
        }
        let delivery: Delivery = serde_json::from_slice(request.body).map_err(|error| {
            WebhookError::Malformed(format!("not a Graph API webhook: {error}"))
        })?;
        let mut items = Vec::new();
        for entry in delivery.entry {
            match delivery.object.as_str() {
                "whatsapp_business_account" => {
                    for change in entry.changes {
                        if change.field == "messages" {
                            self.whatsapp(change.value, &mut items)?;
                        }
                    }
                }
                "page" | "instagram" => {
                    let channel = if delivery.object == "page" {
                        "messenger"
                    } else {
                        "instagram"
                    };
                    for messaging in entry.messaging {
                        Meta::social(channel, messaging, &mut items)?;
                    }
                }
                other => {
                    return Err(WebhookError::Malformed(format!(
                        "object `{other}` is not whatsapp_business_account, page or instagram"
                    )));
                }
            }
        }
        Ok(items)
    }
}

// ----- outbound ---------------------------------------------------------------------------------

/// How a reply may go out, given how long ago the customer last wrote on this channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WindowRule {
    /// Inside the 24-hour customer-service window.
    FreeText,
    /// WhatsApp outside the window: the approved template.
    Template,
    /// Messenger/Instagram between 24 hours and 7 days: `MESSAGE_TAG` / `HUMAN_AGENT`.
    HumanAgentTag,
}

/// Meta's messaging windows. `last_inbound` is the customer's latest message on this channel.
pub fn window_rule(
    channel: &str,
    last_inbound: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
    has_template: bool,
) -> Result<WindowRule, String> {
    let age = last_inbound.map(|at| now - at);
    if age.is_some_and(|age| age < Duration::hours(24)) {
        return Ok(WindowRule::FreeText);
    }
    match channel {
        "whatsapp" if has_template => Ok(WindowRule::Template),
        "whatsapp" => Err(
            "outside WhatsApp's 24-hour customer-service window and no template is configured \
             (channels.meta.<account>.whatsapp_template): the customer must write first"
                .into(),
        ),
        _ if age.is_some_and(|age| age < Duration::days(7)) => Ok(WindowRule::HumanAgentTag),
        _ => Err(format!(
            "outside {channel}'s 7-day human-agent window: the customer must write first"
        )),
    }
}

impl Meta {
    async fn last_inbound(
        &self,
        reply: &StoredMessage,
    ) -> Result<Option<DateTime<Utc>>, SendError> {
        let messages = conversation_history(self.store.as_ref(), reply).await?;
        Ok(messages
            .iter()
            .filter(|message| {
                message.direction == Direction::Inbound
                    && message.channel == reply.channel
                    && message.from_address == reply.to_address
            })
            .map(|message| message.created_at)
            .max())
    }
}

#[async_trait]
impl ChannelSender for Meta {
    async fn send(&self, reply: &StoredMessage) -> Result<Option<String>, SendError> {
        let text = reply.body["text"].as_str().unwrap_or_default();
        let last_inbound = self.last_inbound(reply).await?;
        let template = self.account.whatsapp_template.as_ref();
        let rule = window_rule(&reply.channel, last_inbound, Utc::now(), template.is_some())
            .map_err(permanent)?;
        let body = match (reply.channel.as_str(), rule) {
            ("whatsapp", WindowRule::FreeText) => json!({
                "messaging_product": "whatsapp",
                "recipient_type": "individual",
                "to": reply.to_address.trim_start_matches('+'),
                "type": "text",
                "text": { "preview_url": false, "body": text },
            }),
            ("whatsapp", _) => {
                let Some(template) = template else {
                    return Err(permanent("no WhatsApp template is configured"));
                };
                let mut document = json!({
                    "messaging_product": "whatsapp",
                    "recipient_type": "individual",
                    "to": reply.to_address.trim_start_matches('+'),
                    "type": "template",
                    "template": { "name": template.name, "language": { "code": template.language } },
                });
                if template.text_parameter {
                    document["template"]["components"] = json!([
                        { "type": "body", "parameters": [{ "type": "text", "text": text }] }
                    ]);
                }
                document
            }
            (_, WindowRule::HumanAgentTag) => json!({
                "recipient": { "id": reply.to_address },
                "messaging_type": "MESSAGE_TAG",
                "tag": "HUMAN_AGENT",
                "message": { "text": text },
            }),
            _ => json!({
                "recipient": { "id": reply.to_address },
                "messaging_type": "RESPONSE",
                "message": { "text": text },
            }),
        };
        self.limit.acquire().await;
        let url = format!(
            "{}/{}/messages",
            self.account.graph_base, reply.from_address
        );
        let request = self
            .client
            .post(url)
            .bearer_auth(self.account.access_token.expose())
            .json(&body);
        let answer = call("meta", request)
            .await
            .map_err(|failure| failure.error)?;
        Ok(answer["messages"][0]["id"]
            .as_str()
            .or_else(|| answer["message_id"].as_str())
            .map(str::to_owned))
    }
}

impl AccountSender for Meta {
    fn provider(&self) -> &'static str {
        "meta"
    }

    fn serves(&self, channel: &str, our_address: &str) -> bool {
        let ids = match channel {
            "whatsapp" => &self.account.whatsapp_phone_number_ids,
            "messenger" => &self.account.messenger_page_ids,
            "instagram" => &self.account.instagram_account_ids,
            _ => return false,
        };
        ids.iter().any(|id| id == our_address)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::config::Secret;
    use crate::store::sqlite::{SqliteOptions, SqliteStore};
    use axum::http::HeaderMap;

    fn meta() -> Meta {
        let dir = tempfile::tempdir().unwrap();
        let store =
            SqliteStore::open(&dir.path().join("s.sqlite"), SqliteOptions::default()).unwrap();
        Meta::new(
            MetaAccount {
                name: "main".into(),
                app_secret: Secret::new("app-secret"),
                verify_token: Secret::new("verify-me"),
                access_token: Secret::new("token"),
                graph_base: "https://graph.facebook.com/v21.0".into(),
                whatsapp_phone_number_ids: vec!["106540352242922".into()],
                messenger_page_ids: vec!["1234567890".into()],
                instagram_account_ids: vec![],
                whatsapp_template: None,
                max_per_second: 10,
            },
            Arc::new(store),
        )
    }

    fn receive(
        meta: &Meta,
        body: &str,
        signature_header: Option<&str>,
    ) -> Result<Vec<Inbound>, WebhookError> {
        let mut headers = HeaderMap::new();
        if let Some(signature) = signature_header {
            headers.insert("x-hub-signature-256", signature.parse().unwrap());
        }
        meta.receive(&WebhookRequest {
            query: None,
            headers: &headers,
            body: body.as_bytes(),
            now: Utc::now(),
        })
    }

    /// Shaped like the WhatsApp Cloud API's documented text-message and status webhooks.
    pub const WHATSAPP: &str = r#"{"object":"whatsapp_business_account","entry":[{"id":"102290129340398","changes":[{"value":{"messaging_product":"whatsapp","metadata":{"display_phone_number":"15550783881","phone_number_id":"106540352242922"},"contacts":[{"profile":{"name":"Sheena Nelson"},"wa_id":"16505551234"}],"messages":[{"from":"16505551234","id":"wamid.HBgLMTY1MDM4Nzk0MzkVAgASGBQzQTRBNjU5OUFFRTAzODEwMTQ0RgA=","timestamp":"1749416383","type":"text","text":{"body":"Does it come in another color?"}},{"from":"16505551234","id":"wamid.IMAGE1","timestamp":"1749416390","type":"image","image":{"caption":"this one","mime_type":"image/jpeg","sha256":"abc","id":"1003383421387256"}}],"statuses":[{"id":"wamid.OUT1","status":"failed","timestamp":"1749416400","recipient_id":"16505551234","errors":[{"code":131047,"title":"Re-engagement message"}]}]},"field":"messages"}]}]}"#;

    #[test]
    fn whatsapp_delivery_is_normalised() {
        let meta = meta();
        let items = receive(
            &meta,
            WHATSAPP,
            Some(&signature("app-secret", WHATSAPP.as_bytes())),
        )
        .unwrap();
        assert_eq!(items.len(), 3, "{items:?}");
        let Inbound::Status(status) = &items[0] else {
            panic!()
        };
        assert_eq!(status.state, DeliveryState::Failed);
        assert_eq!(
            status.error.as_deref(),
            Some("whatsapp error 131047: Re-engagement message")
        );
        let Inbound::Message(text) = &items[1] else {
            panic!()
        };
        assert_eq!(text.from.address, "+16505551234");
        assert_eq!(text.from.name.as_deref(), Some("Sheena Nelson"));
        assert_eq!(text.to.as_ref().unwrap().address, "106540352242922");
        assert_eq!(text.validate(), Ok(()));
        let Inbound::Message(image) = &items[2] else {
            panic!()
        };
        assert_eq!(
            image.attachments[0].url,
            "https://graph.facebook.com/v21.0/1003383421387256"
        );
        assert_eq!(image.text, "this one");
    }

    /// Shaped like the Messenger Platform's documented `messages` webhook, with an echo to ignore.
    pub const MESSENGER: &str = r#"{"object":"page","entry":[{"id":"1234567890","time":1458692752478,"messaging":[{"sender":{"id":"7654321"},"recipient":{"id":"1234567890"},"timestamp":1458692752478,"message":{"mid":"m_1457764197618:41d102a3e1ae206a38","text":"hello, world!"}},{"sender":{"id":"1234567890"},"recipient":{"id":"7654321"},"timestamp":1458692752479,"message":{"mid":"m_echo","is_echo":true,"text":"our reply"}}]}]}"#;

    #[test]
    fn messenger_messages_are_normalised_and_echoes_ignored() {
        let meta = meta();
        let items = receive(
            &meta,
            MESSENGER,
            Some(&signature("app-secret", MESSENGER.as_bytes())),
        )
        .unwrap();
        let [Inbound::Message(message)] = items.as_slice() else {
            panic!("{items:?}")
        };
        assert_eq!(
            (message.channel.as_str(), message.from.address.as_str()),
            ("messenger", "7654321")
        );
        assert_eq!(message.validate(), Ok(()));
    }

    #[test]
    fn signatures_and_handshake() {
        let meta = meta();
        assert!(matches!(
            receive(&meta, MESSENGER, None),
            Err(WebhookError::Unauthenticated(_))
        ));
        assert!(matches!(
            receive(
                &meta,
                MESSENGER,
                Some(&signature("other", MESSENGER.as_bytes()))
            ),
            Err(WebhookError::Forbidden(_))
        ));
        let body = r#"{"object":"page","entry":[{"messaging":[{"sender":{}}]}]}"#;
        assert!(matches!(
            receive(&meta, body, Some(&signature("app-secret", body.as_bytes()))),
            Err(WebhookError::Malformed(_))
        ));
        assert_eq!(
            meta.handshake(Some(
                "hub.mode=subscribe&hub.challenge=1158201444&hub.verify_token=verify-me"
            )),
            Ok("1158201444".into())
        );
        assert!(matches!(
            meta.handshake(Some(
                "hub.mode=subscribe&hub.challenge=1&hub.verify_token=nope"
            )),
            Err(WebhookError::Forbidden(_))
        ));
    }

    #[test]
    fn the_window_rules() {
        let now = Utc::now();
        let hours = |h| Some(now - Duration::hours(h));
        assert_eq!(
            window_rule("whatsapp", hours(2), now, false),
            Ok(WindowRule::FreeText)
        );
        assert_eq!(
            window_rule("whatsapp", hours(30), now, true),
            Ok(WindowRule::Template)
        );
        assert!(
            window_rule("whatsapp", hours(30), now, false)
                .unwrap_err()
                .contains("24-hour")
        );
        assert_eq!(
            window_rule("messenger", hours(23), now, false),
            Ok(WindowRule::FreeText)
        );
        assert_eq!(
            window_rule("instagram", hours(100), now, false),
            Ok(WindowRule::HumanAgentTag)
        );
        assert!(
            window_rule("messenger", hours(24 * 8), now, false)
                .unwrap_err()
                .contains("7-day")
        );
        assert!(window_rule("messenger", None, now, false).is_err());
    }
}
