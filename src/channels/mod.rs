//! SMS and social channel adapters: one module per provider, all of one shape.
//!
//! Inbound, an adapter's [`Webhook`] checks the provider's signature and turns the delivery into
//! [`Inbound`] items: normalised `switchboard.message.v1` messages (which then take the one intake
//! path, `Actions::ingest`) and delivery statuses of our replies. Outbound, each account is a
//! [`ChannelSender`]; a [`ChannelDispatch`] per channel picks the account by provider and our address
//! (the number, page or bot the customer wrote to). Provider wire types and quirks stay inside each
//! module; everything after them sees one schema.

pub mod email;
pub mod meta;
pub mod telegram;
pub mod twilio;
pub mod vonage;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use axum::http::HeaderMap;
use chrono::{DateTime, Utc};
use serde_json::Value;

use crate::config::channels::ChannelSettings;
use crate::daemon::outbound::{ChannelSender, SendError, classify};
use crate::message::InboundMessage;
use crate::store::{Store, StoredMessage};

/// One item of a provider's webhook delivery.
#[derive(Debug, Clone, PartialEq)]
pub enum Inbound {
    /// A customer's message, normalised.
    Message(Box<InboundMessage>),
    /// What became of one of our replies.
    Status(StatusUpdate),
}

/// A provider's report on a reply it was given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusUpdate {
    pub channel: String,
    /// The provider's id of our reply (what its send API returned).
    pub provider_message_id: String,
    pub state: DeliveryState,
    /// For failures: the provider's error code and description.
    pub error: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryState {
    /// Accepted and handed on by the provider.
    Sent,
    /// Reached the customer's device.
    Delivered,
    /// Will not reach the customer.
    Failed,
}

/// A webhook request as the adapter needs it.
#[derive(Debug, Clone, Copy)]
pub struct WebhookRequest<'a> {
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
    pub body: &'a [u8],
    pub now: DateTime<Utc>,
}

/// Why a webhook delivery was refused. Nothing of it is stored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WebhookError {
    /// No signature or token (HTTP 401).
    #[error("{0}")]
    Unauthenticated(String),
    /// A signature or token that does not match (HTTP 403).
    #[error("{0}")]
    Forbidden(String),
    /// Not the provider's documented shape (HTTP 400).
    #[error("{0}")]
    Malformed(String),
}

/// What the provider expects as the body of a 200.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WebhookAnswer {
    /// An empty TwiML document (Twilio: "reply with nothing").
    EmptyTwiml,
    /// An empty body.
    Empty,
}

/// The inbound side of one provider account.
pub trait Webhook: Send + Sync + std::fmt::Debug {
    /// A GET to the webhook URL: Meta's subscription handshake. Others have none.
    fn handshake(&self, _query: Option<&str>) -> Result<String, WebhookError> {
        Err(WebhookError::Malformed(
            "this provider's webhooks are POST only".into(),
        ))
    }

    /// Checks the signature, then parses the delivery.
    fn receive(&self, request: &WebhookRequest<'_>) -> Result<Vec<Inbound>, WebhookError>;

    fn answer(&self) -> WebhookAnswer {
        WebhookAnswer::Empty
    }
}

/// The outbound side of one provider account.
pub trait AccountSender: ChannelSender {
    fn provider(&self) -> &'static str;
    /// Does this account send from `our_address` on `channel`?
    fn serves(&self, channel: &str, our_address: &str) -> bool;
}

/// Every configured account: webhooks by (provider, account name), senders by channel.
#[derive(Debug, Default)]
pub struct Channels {
    webhooks: HashMap<(String, String), Arc<dyn Webhook>>,
    dispatch: HashMap<String, ChannelDispatch>,
}

impl Channels {
    /// Builds every account's adapter. `store` answers Meta's 24-hour-window question.
    pub fn build(settings: &ChannelSettings, store: &Arc<dyn Store>) -> Channels {
        let mut channels = Channels::default();
        for account in &settings.twilio {
            let adapter = Arc::new(twilio::Twilio::new(account.clone()));
            channels.add(
                "twilio",
                &account.name,
                adapter.clone(),
                &(adapter as Arc<dyn AccountSender>),
                &["sms", "whatsapp"],
            );
        }
        for account in &settings.vonage {
            let adapter = Arc::new(vonage::Vonage::new(account.clone()));
            channels.add(
                "vonage",
                &account.name,
                adapter.clone(),
                &(adapter as Arc<dyn AccountSender>),
                &["sms", "whatsapp"],
            );
        }
        for account in &settings.meta {
            let adapter = Arc::new(meta::Meta::new(account.clone(), store.clone()));
            channels.add(
                "meta",
                &account.name,
                adapter.clone(),
                &(adapter as Arc<dyn AccountSender>),
                &["whatsapp", "messenger", "instagram"],
            );
        }
        for account in &settings.telegram {
            let adapter = Arc::new(telegram::Telegram::new(account.clone()));
            channels.add(
                "telegram",
                &account.name,
                adapter.clone(),
                &(adapter as Arc<dyn AccountSender>),
                &["telegram"],
            );
        }
        channels
    }

    fn add(
        &mut self,
        provider: &str,
        account: &str,
        webhook: Arc<dyn Webhook>,
        sender: &Arc<dyn AccountSender>,
        channels: &[&str],
    ) {
        self.webhooks
            .insert((provider.to_owned(), account.to_owned()), webhook);
        for channel in channels {
            self.dispatch
                .entry((*channel).to_owned())
                .or_insert_with(|| ChannelDispatch {
                    channel: (*channel).to_owned(),
                    accounts: Vec::new(),
                })
                .accounts
                .push(sender.clone());
        }
    }

    pub fn webhook(&self, provider: &str, account: &str) -> Option<Arc<dyn Webhook>> {
        self.webhooks
            .get(&(provider.to_owned(), account.to_owned()))
            .cloned()
    }
}

/// The channels a provider account can send on.
pub const SOCIAL_CHANNELS: [&str; 5] = ["sms", "whatsapp", "messenger", "instagram", "telegram"];

/// The accounts in force, replaced whole by a configuration reload; cheap to clone. A webhook or a
/// send takes the current set once and finishes with it, so a reload drops no in-flight send and
/// the next request after it uses the new accounts.
#[derive(Debug, Clone)]
pub struct LiveChannels {
    current: Arc<RwLock<Arc<Channels>>>,
    store: Arc<dyn Store>,
}

impl LiveChannels {
    pub fn new(settings: &ChannelSettings, store: Arc<dyn Store>) -> LiveChannels {
        LiveChannels {
            current: Arc::new(RwLock::new(Arc::new(Channels::build(settings, &store)))),
            store,
        }
    }

    /// Puts the accounts of a reloaded (already validated) configuration in force.
    pub fn replace(&self, settings: &ChannelSettings) {
        let fresh = Arc::new(Channels::build(settings, &self.store));
        // A poisoned lock only means a panic elsewhere while swapping an Arc: the value is whole.
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = fresh;
    }

    fn current(&self) -> Arc<Channels> {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    pub fn webhook(&self, provider: &str, account: &str) -> Option<Arc<dyn Webhook>> {
        self.current().webhook(provider, account)
    }

    /// One sender per social channel for the delivery worker, each sending through the accounts in
    /// force when the send starts.
    pub fn senders(&self) -> Senders {
        SOCIAL_CHANNELS
            .iter()
            .map(|channel| {
                let sender = LiveDispatch {
                    channel: (*channel).to_owned(),
                    channels: self.clone(),
                };
                (
                    (*channel).to_owned(),
                    Arc::new(sender) as Arc<dyn ChannelSender>,
                )
            })
            .collect()
    }
}

/// Each channel's sender, for the delivery worker.
pub type Senders = Vec<(String, Arc<dyn ChannelSender>)>;

/// A social channel's sender: the current accounts' [`ChannelDispatch`] for it.
#[derive(Debug)]
struct LiveDispatch {
    channel: String,
    channels: LiveChannels,
}

#[async_trait]
impl ChannelSender for LiveDispatch {
    async fn send(&self, reply: &StoredMessage) -> Result<Option<String>, SendError> {
        let accounts = self.channels.current();
        match accounts.dispatch.get(&self.channel) {
            Some(dispatch) => dispatch.send(reply).await,
            None => Err(permanent(format!(
                "no adapter is configured for channel `{}`",
                self.channel
            ))),
        }
    }
}

/// A channel's way out: the reply goes through the provider the customer last used, from the
/// account that owns the address they wrote to.
#[derive(Debug)]
pub struct ChannelDispatch {
    channel: String,
    accounts: Vec<Arc<dyn AccountSender>>,
}

#[async_trait]
impl ChannelSender for ChannelDispatch {
    async fn send(&self, reply: &StoredMessage) -> Result<Option<String>, SendError> {
        let of_provider: Vec<&Arc<dyn AccountSender>> = self
            .accounts
            .iter()
            .filter(|account| account.provider() == reply.provider)
            .collect();
        let account = of_provider
            .iter()
            .find(|account| account.serves(&self.channel, &reply.from_address))
            .or(match of_provider.as_slice() {
                [only] => Some(only),
                _ => None,
            });
        match account {
            Some(account) => account.send(reply).await,
            None => Err(permanent(format!(
                "no {} account sends on {} from `{}`",
                reply.provider, self.channel, reply.from_address
            ))),
        }
    }
}

/// A failure trying again cannot fix.
pub fn permanent(reason: impl Into<String>) -> SendError {
    SendError {
        retryable: false,
        reason: reason.into(),
        retry_after: None,
    }
}

/// A phone number as the provider wrote it (`+14155550123`, `14155550123`, `whatsapp:+1…`) in E.164.
pub fn e164(raw: &str) -> Result<String, WebhookError> {
    let digits = raw.trim().trim_start_matches('+');
    let parsed = phonenumber::parse(None, format!("+{digits}")).map_err(|error| {
        WebhookError::Malformed(format!("`{raw}` is not a phone number: {error}"))
    })?;
    Ok(parsed.format().mode(phonenumber::Mode::E164).to_string())
}

/// Spaces sends so an account stays under its provider's rate limit: each send takes the next free
/// slot, `1 / max_per_second` after the previous one.
#[derive(Debug)]
pub struct RateLimit {
    interval: Duration,
    next: tokio::sync::Mutex<tokio::time::Instant>,
}

impl RateLimit {
    pub fn per_second(max: u32) -> RateLimit {
        RateLimit {
            interval: Duration::from_secs(1) / max.max(1),
            next: tokio::sync::Mutex::new(tokio::time::Instant::now()),
        }
    }

    /// Waits for this send's slot.
    pub async fn acquire(&self) {
        let slot = {
            let mut next = self.next.lock().await;
            let slot = (*next).max(tokio::time::Instant::now());
            *next = slot + self.interval;
            slot
        };
        tokio::time::sleep_until(slot).await;
    }
}

/// The HTTP client adapters send with: providers answer within seconds or are retried.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .build()
        .unwrap_or_default()
}

/// A provider's answer that was not a success: the classified error and the body it sent.
#[derive(Debug)]
pub struct ProviderFailure {
    pub error: SendError,
    pub body: Value,
}

/// Sends a provider API request: 2xx gives the JSON body; 429/5xx are retryable (with
/// `Retry-After`), other statuses permanent, each with the provider's own explanation in the reason.
pub async fn call(
    provider: &str,
    request: reqwest::RequestBuilder,
) -> Result<Value, ProviderFailure> {
    let response = request.send().await.map_err(|error| ProviderFailure {
        error: SendError {
            retryable: true,
            reason: format!("{provider} unreachable: {error}"),
            retry_after: None,
        },
        body: Value::Null,
    })?;
    let (status, headers) = (response.status(), response.headers().clone());
    let text = response.text().await.unwrap_or_default();
    let body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    match classify(status, &headers) {
        Ok(()) => Ok(body),
        Err(mut error) => {
            let excerpt: String = text.chars().take(300).collect();
            error.reason = format!("{provider} answered {status}: {excerpt}");
            Err(ProviderFailure { error, body })
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn numbers_become_e164() {
        assert_eq!(e164("+14155550123").unwrap(), "+14155550123");
        assert_eq!(e164("447700900123").unwrap(), "+447700900123");
        assert_eq!(e164(" 16505551234").unwrap(), "+16505551234");
        assert!(matches!(e164("hello"), Err(WebhookError::Malformed(_))));
    }

    #[tokio::test(start_paused = true)]
    async fn rate_limit_spaces_sends() {
        let limit = RateLimit::per_second(4);
        let start = tokio::time::Instant::now();
        for _ in 0..5 {
            limit.acquire().await;
        }
        // Paused time: the fifth send waits four intervals of 250 ms, exactly.
        assert_eq!(start.elapsed(), Duration::from_secs(1));
    }
}
