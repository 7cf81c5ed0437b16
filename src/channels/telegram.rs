//! Telegram Bot API: `Update`s posted to the webhook set with `setWebhook(secret_token)`, which
//! Telegram sends back in `X-Telegram-Bot-Api-Secret-Token`; replies with `sendMessage`. A 429
//! answer carries `parameters.retry_after`, which the retry honours.
//!
//! Deduplication is by `update_id` (unique per bot, so the provider message id is
//! `<bot id>:<update id>`). The customer's address is the chat id, which is where replies go.

use async_trait::async_trait;
use chrono::{TimeZone, Utc};
use serde::Deserialize;
use serde_json::{Value, json};
use std::time::Duration;

use super::{
    AccountSender, Inbound, RateLimit, Webhook, WebhookError, WebhookRequest, call, e164,
    http_client,
};
use crate::config::channels::TelegramAccount;
use crate::daemon::outbound::{ChannelSender, SendError};
use crate::message::{Address, Attachment, IdentityLink, InboundMessage};
use crate::store::StoredMessage;

/// One bot.
#[derive(Debug)]
pub struct Telegram {
    account: TelegramAccount,
    client: reqwest::Client,
    limit: RateLimit,
}

impl Telegram {
    pub fn new(account: TelegramAccount) -> Telegram {
        Telegram {
            limit: RateLimit::per_second(account.max_per_second),
            client: http_client(),
            account,
        }
    }
}

#[derive(Debug, Deserialize)]
struct Update {
    update_id: i64,
    message: Option<TelegramMessage>,
    edited_message: Option<TelegramMessage>,
}

#[derive(Debug, Deserialize)]
struct TelegramMessage {
    message_id: i64,
    date: i64,
    chat: Chat,
    from: Option<User>,
    text: Option<String>,
    caption: Option<String>,
    #[serde(default)]
    photo: Vec<PhotoSize>,
    document: Option<Document>,
    contact: Option<Contact>,
}

#[derive(Debug, Deserialize)]
struct Chat {
    id: i64,
}

#[derive(Debug, Deserialize)]
struct User {
    id: i64,
    first_name: String,
    last_name: Option<String>,
    username: Option<String>,
    language_code: Option<String>,
}

#[derive(Debug, Deserialize)]
struct PhotoSize {
    file_id: String,
    file_size: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct Document {
    file_id: String,
    file_name: Option<String>,
    mime_type: Option<String>,
    file_size: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct Contact {
    phone_number: String,
    user_id: Option<i64>,
}

impl Telegram {
    /// Files are fetched with `getFile`; the URL names the file id for whoever downloads it.
    fn file_url(&self, file_id: &str) -> String {
        format!(
            "{}/bot<token>/getFile?file_id={file_id}",
            self.account.api_url
        )
    }
}

impl Webhook for Telegram {
    fn receive(&self, request: &WebhookRequest<'_>) -> Result<Vec<Inbound>, WebhookError> {
        let token = request
            .headers
            .get("x-telegram-bot-api-secret-token")
            .and_then(|value| value.to_str().ok())
            .ok_or_else(|| {
                WebhookError::Unauthenticated("X-Telegram-Bot-Api-Secret-Token is missing".into())
            })?;
        if !self.account.secret_token.matches(token) {
            return Err(WebhookError::Forbidden(
                "X-Telegram-Bot-Api-Secret-Token does not match".into(),
            ));
        }
        let update: Update = serde_json::from_slice(request.body)
            .map_err(|error| WebhookError::Malformed(format!("not a Telegram Update: {error}")))?;
        // Updates without a message (callback queries, polls...) are acknowledged and skipped.
        let Some(telegram) = update.message.or(update.edited_message) else {
            return Ok(Vec::new());
        };
        let chat = telegram.chat.id.to_string();
        let mut message = InboundMessage::new(
            "telegram",
            "telegram",
            &format!("{}:{}", self.account.bot_id, update.update_id),
            &chat,
            telegram
                .text
                .as_deref()
                .or(telegram.caption.as_deref())
                .unwrap_or_default(),
        );
        message.to = Some(Address {
            address: self.account.bot_id.clone(),
            name: None,
        });
        message.received_at = Utc.timestamp_opt(telegram.date, 0).single();
        message
            .metadata
            .insert("message_id".into(), json!(telegram.message_id));
        if let Some(user) = &telegram.from {
            let name = match &user.last_name {
                Some(last) => format!("{} {last}", user.first_name),
                None => user.first_name.clone(),
            };
            message.from.name = Some(name);
            message.customer.language = user.language_code.clone();
            if let Some(username) = &user.username {
                message
                    .metadata
                    .insert("username".into(), Value::String(username.clone()));
            }
            // A contact the customer shares about themself links their phone number.
            if let Some(contact) = &telegram.contact
                && contact.user_id == Some(user.id)
            {
                message.customer.links.push(IdentityLink {
                    kind: "phone".into(),
                    value: e164(&contact.phone_number)?,
                });
                if message.text.is_empty() {
                    message.text = format!("shared contact {}", contact.phone_number);
                }
            }
        }
        if let Some(largest) = telegram.photo.last() {
            message.attachments.push(Attachment {
                url: self.file_url(&largest.file_id),
                content_type: "image/jpeg".into(),
                filename: None,
                size: largest.file_size,
            });
        }
        if let Some(document) = &telegram.document {
            message.attachments.push(Attachment {
                url: self.file_url(&document.file_id),
                content_type: document
                    .mime_type
                    .clone()
                    .unwrap_or_else(|| "application/octet-stream".into()),
                filename: document.file_name.clone(),
                size: document.file_size,
            });
        }
        if message.text.trim().is_empty() && message.attachments.is_empty() {
            // Stickers, locations...: nothing an agent can read; acknowledged and skipped.
            return Ok(Vec::new());
        }
        Ok(vec![Inbound::Message(Box::new(message))])
    }
}

#[async_trait]
impl ChannelSender for Telegram {
    async fn send(&self, reply: &StoredMessage) -> Result<Option<String>, SendError> {
        let text = reply.body["text"].as_str().unwrap_or_default();
        let chat_id: Value = reply
            .to_address
            .parse::<i64>()
            .map(Value::from)
            .unwrap_or_else(|_| Value::String(reply.to_address.clone()));
        self.limit.acquire().await;
        let url = format!(
            "{}/bot{}/sendMessage",
            self.account.api_url,
            self.account.bot_token.expose()
        );
        let request = self
            .client
            .post(url)
            .json(&json!({ "chat_id": chat_id, "text": text }));
        match call("telegram", request).await {
            Ok(answer) => Ok(answer["result"]["message_id"]
                .as_i64()
                .map(|id| id.to_string())),
            Err(mut failure) => {
                // Telegram gives its wait in the body rather than a Retry-After header.
                if let Some(seconds) = failure.body["parameters"]["retry_after"].as_u64() {
                    failure.error.retry_after = Some(Duration::from_secs(seconds));
                }
                // The reason must never carry the URL, which holds the bot token.
                failure.error.reason = failure
                    .error
                    .reason
                    .replace(self.account.bot_token.expose(), "<token>");
                Err(failure.error)
            }
        }
    }
}

impl AccountSender for Telegram {
    fn provider(&self) -> &'static str {
        "telegram"
    }

    fn serves(&self, _channel: &str, our_address: &str) -> bool {
        our_address == self.account.bot_id
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::config::Secret;
    use axum::http::HeaderMap;

    fn bot() -> Telegram {
        Telegram::new(TelegramAccount {
            name: "main".into(),
            bot_token: Secret::new("123456:ABC-DEF"),
            bot_id: "123456".into(),
            secret_token: Secret::new("s3cret-token"),
            api_url: "http://127.0.0.1:9".into(),
            max_per_second: 10,
        })
    }

    /// Shaped like the Bot API's `Update` with a private-chat text message.
    const UPDATE: &str = r#"{"update_id":10000,"message":{"date":1441645532,"chat":{"last_name":"Test Lastname","id":1111111,"type":"private","first_name":"Test Firstname","username":"Testusername"},"message_id":1365,"from":{"last_name":"Test Lastname","id":1111111,"is_bot":false,"first_name":"Test Firstname","username":"Testusername","language_code":"en"},"text":"/start"}}"#;

    fn receive(token: Option<&str>, body: &str) -> Result<Vec<Inbound>, WebhookError> {
        let mut headers = HeaderMap::new();
        if let Some(token) = token {
            headers.insert("x-telegram-bot-api-secret-token", token.parse().unwrap());
        }
        bot().receive(&WebhookRequest {
            query: None,
            headers: &headers,
            body: body.as_bytes(),
            now: Utc::now(),
        })
    }

    #[test]
    fn updates_are_normalised_and_deduplicated_by_update_id() {
        let items = receive(Some("s3cret-token"), UPDATE).unwrap();
        let [Inbound::Message(message)] = items.as_slice() else {
            panic!("{items:?}")
        };
        assert_eq!(message.provider_message_id, "123456:10000");
        assert_eq!(message.from.address, "1111111");
        assert_eq!(
            message.from.name.as_deref(),
            Some("Test Firstname Test Lastname")
        );
        assert_eq!(message.customer.language.as_deref(), Some("en"));
        assert_eq!(message.validate(), Ok(()));
    }

    #[test]
    fn the_secret_token_is_checked() {
        assert!(matches!(
            receive(None, UPDATE),
            Err(WebhookError::Unauthenticated(_))
        ));
        assert!(matches!(
            receive(Some("wrong"), UPDATE),
            Err(WebhookError::Forbidden(_))
        ));
        assert!(matches!(
            receive(Some("s3cret-token"), "{"),
            Err(WebhookError::Malformed(_))
        ));
    }
}
