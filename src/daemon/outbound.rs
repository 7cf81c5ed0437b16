//! Delivering agents' replies: a channel adapter per channel, retries with backoff, status events.
//!
//! A reply is stored (`pending`) before it is queued here, so a restart re-queues what was not sent.
//! Retryable failures (5xx, 429, network) back off exponentially with jitter; permanent ones (4xx, no
//! adapter) fail at once. Either outcome is stored with its event and pushed to the agent.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use hmac::{Hmac, Mac};
use serde_json::json;
use sha2::Sha256;
use tokio::sync::{Notify, mpsc};
use tracing::{debug, warn};
use ulid::Ulid;

use super::events;
use super::metrics::Metrics;
use super::signals::Signals;
use crate::channels::{DeliveryState, StatusUpdate};
use crate::config::{OutboundSection, Secret};
use crate::routing::AgentId;
use crate::store::{
    DeliveryOutcome, DeliveryUpdate, Direction, ParkedStatus, Store, StoreError, StoredMessage,
};

/// Why a send failed, and whether trying again may help.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendError {
    pub retryable: bool,
    pub reason: String,
    /// A provider's `Retry-After`, if it gave one.
    pub retry_after: Option<Duration>,
}

/// The reply's conversation, every message in order, for senders that answer from its history
/// (threading headers, the customer-service window, the chat's sequence numbers). A store that
/// cannot be read now is a retryable failure.
pub async fn conversation_history(
    store: &dyn Store,
    reply: &StoredMessage,
) -> Result<Vec<StoredMessage>, SendError> {
    store
        .messages(reply.conversation_id)
        .await
        .map_err(|error| SendError {
            retryable: true,
            reason: format!("cannot read the conversation: {error}"),
            retry_after: None,
        })
}

/// One channel's way out. Every adapter has this shape; provider quirks stay inside it.
#[async_trait]
pub trait ChannelSender: Send + Sync + std::fmt::Debug {
    /// Sends the reply; returns the provider's message id, if any.
    async fn send(&self, reply: &StoredMessage) -> Result<Option<String>, SendError>;
}

/// The `api` channel: the reply is published as the `message.sent` event (and on the bus for systems
/// that deliver it themselves); with a webhook configured it is also POSTed there, signed with
/// HMAC-SHA256 over `timestamp.body` in `X-Switchboard-Signature: t=<unix>,v1=<hex>`.
#[derive(Debug)]
pub struct ApiChannel {
    client: reqwest::Client,
    webhook: Option<(String, Secret)>,
}

impl ApiChannel {
    pub fn new(settings: &OutboundSection) -> ApiChannel {
        let webhook = settings
            .api_webhook_url
            .clone()
            .zip(settings.api_webhook_secret.clone());
        ApiChannel {
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(15))
                .build()
                .unwrap_or_default(),
            webhook,
        }
    }
}

/// `t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`, the signature a webhook receiver checks.
pub fn webhook_signature(secret: &Secret, timestamp: i64, body: &[u8]) -> String {
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret.expose().as_bytes()) {
        Ok(mac) => mac,
        Err(_) => return String::new(),
    };
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!(
        "t={timestamp},v1={}",
        hex::encode(mac.finalize().into_bytes())
    )
}

#[async_trait]
impl ChannelSender for ApiChannel {
    async fn send(&self, reply: &StoredMessage) -> Result<Option<String>, SendError> {
        let Some((url, secret)) = &self.webhook else {
            return Ok(None);
        };
        let body = json!({
            "message_id": reply.id.to_string(),
            "conversation_id": reply.conversation_id.to_string(),
            "to": reply.to_address,
            "agent_id": reply.agent_id,
            "reply": reply.body,
        })
        .to_string();
        let timestamp = Utc::now().timestamp();
        let response = self
            .client
            .post(url)
            .header("content-type", "application/json")
            .header(
                "x-switchboard-signature",
                webhook_signature(secret, timestamp, body.as_bytes()),
            )
            .body(body)
            .send()
            .await
            .map_err(|error| SendError {
                retryable: true,
                reason: format!("webhook unreachable: {error}"),
                retry_after: None,
            })?;
        classify(response.status(), response.headers()).map(|()| None)
    }
}

/// 2xx ok; 429 and 5xx retryable (honouring `Retry-After` seconds); any other status permanent.
pub fn classify(
    status: reqwest::StatusCode,
    headers: &reqwest::header::HeaderMap,
) -> Result<(), SendError> {
    if status.is_success() {
        return Ok(());
    }
    let retry_after = headers
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let retryable = status == reqwest::StatusCode::TOO_MANY_REQUESTS || status.is_server_error();
    Err(SendError {
        retryable,
        reason: format!("provider answered {status}"),
        retry_after,
    })
}

/// Queues replies for delivery and records what providers report of them; cheap to clone.
#[derive(Debug, Clone)]
pub struct Outbound {
    queue: mpsc::UnboundedSender<Ulid>,
    context: OutboundContext,
}

impl Outbound {
    /// Wakes the event relay after a commit that wrote events outside routing (a rating).
    pub fn events_written(&self) {
        self.context.outbox_written.notify_one();
    }

    pub fn deliver(&self, message: Ulid) {
        let _ = self.queue.send(message);
    }

    /// A provider's status callback for one of our replies: `delivered` is recorded (no event: the
    /// brief has no `message.delivered`), a failure becomes `message.delivery_failed` with the
    /// provider's error. Statuses only move forward. A callback can beat the sender's write of the
    /// provider's id: its status is then parked and applied when the id is stored (ids that never
    /// become one of our replies are dropped after a day).
    pub async fn provider_status(&self, update: &StatusUpdate) -> Result<(), StoreError> {
        let status = match update.state {
            DeliveryState::Delivered => "delivered",
            DeliveryState::Failed => "failed",
            // The sender records `sent` itself, when the provider's API accepts the message.
            DeliveryState::Sent => return Ok(()),
        };
        let store = &self.context.store;
        // Twice at most: parking is refused only when the reply got its id in between.
        for _ in 0..2 {
            if let Some(reply) = store
                .outbound_by_provider_id(&update.channel, &update.provider_message_id)
                .await?
            {
                let kind = (status == "failed").then_some("message.delivery_failed");
                return record(
                    &self.context,
                    &reply,
                    status,
                    None,
                    kind,
                    update.error.as_deref(),
                )
                .await;
            }
            let parked = ParkedStatus {
                channel: update.channel.clone(),
                provider_message_id: update.provider_message_id.clone(),
                status: status.to_owned(),
                error: update.error.clone(),
            };
            if store.park_delivery_status(parked, Utc::now()).await? {
                debug!(id = %update.provider_message_id, "status of a reply whose provider id is not stored yet: parked");
                return Ok(());
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
pub struct OutboundContext {
    pub store: Arc<dyn Store>,
    /// The agent who wrote a reply hears what became of it, on whichever instance.
    pub signals: Signals,
    pub metrics: Metrics,
    pub senders: Arc<HashMap<String, Arc<dyn ChannelSender>>>,
    pub settings: OutboundSection,
    pub outbox_written: Arc<Notify>,
}

/// Starts the delivery worker; each reply is delivered in its own task so a slow provider does not
/// hold up the others.
pub fn start(context: OutboundContext) -> (Outbound, tokio::task::JoinHandle<()>) {
    let (queue, mut receiver) = mpsc::unbounded_channel::<Ulid>();
    let outbound = Outbound {
        queue,
        context: context.clone(),
    };
    let worker = tokio::spawn(async move {
        let mut deliveries = tokio::task::JoinSet::new();
        while let Some(message) = receiver.recv().await {
            deliveries.spawn(deliver(context.clone(), message));
            while deliveries.try_join_next().is_some() {}
        }
        while deliveries.join_next().await.is_some() {}
    });
    (outbound, worker)
}

async fn deliver(context: OutboundContext, id: Ulid) {
    let reply = match context.store.message(id).await {
        Ok(Some(reply)) if reply.direction == Direction::Outbound => reply,
        Ok(_) => return,
        Err(error) => {
            warn!(%error, message = %id, "cannot read a reply to deliver");
            return;
        }
    };
    let channel = reply.channel.clone();
    let outcome = match context.senders.get(&channel) {
        None => Err(SendError {
            retryable: false,
            reason: format!("no adapter is configured for channel `{channel}`"),
            retry_after: None,
        }),
        Some(sender) => send_with_retries(sender.as_ref(), &reply, &context.settings).await,
    };
    let (status, kind, detail, provider_id) = match outcome {
        Ok(provider_id) => ("sent", "message.sent", None, provider_id),
        Err(error) => (
            "failed",
            "message.delivery_failed",
            Some(error.reason),
            None,
        ),
    };
    if let Err(error) = record(
        &context,
        &reply,
        status,
        provider_id,
        Some(kind),
        detail.as_deref(),
    )
    .await
    {
        warn!(%error, message = %id, "cannot record a delivery status");
    }
}

/// Stores a reply's delivery status with its event (if any), then tells the relay, the metrics and
/// the agent who wrote it.
async fn record(
    context: &OutboundContext,
    reply: &StoredMessage,
    status: &str,
    provider_id: Option<String>,
    kind: Option<&str>,
    detail: Option<&str>,
) -> Result<(), StoreError> {
    let events = kind
        .map(|kind| {
            events::message_delivery(
                kind,
                reply.conversation_id,
                reply.id,
                &reply.channel,
                detail,
                Utc::now(),
            )
        })
        .into_iter()
        .collect();
    // A failure the provider reported before we stored its id is applied by this write; its event
    // is written with it.
    let parked_failure_event = provider_id.is_some().then(|| {
        events::message_delivery(
            "message.delivery_failed",
            reply.conversation_id,
            reply.id,
            &reply.channel,
            None,
            Utc::now(),
        )
    });
    let recorded = context
        .store
        .set_delivery_status(DeliveryUpdate {
            message_id: reply.id,
            status: status.to_owned(),
            provider_message_id: provider_id,
            events,
            parked_failure_event,
        })
        .await?;
    // A later status may be stored already (callbacks race each other and the sender): it stays,
    // and nothing is announced for this one. The provider took the message even when its
    // `delivered` came in first: it still counts as sent.
    let applied = recorded.outcome == DeliveryOutcome::Applied;
    let counter = match status {
        "sent" => Some(&context.metrics.messages_sent),
        "failed" if applied => Some(&context.metrics.messages_failed),
        _ => None,
    };
    if let Some(counter) = counter {
        counter.with_label_values(&[&reply.channel]).inc();
    }
    if applied {
        announce(context, reply, status, detail);
    }
    if let Some(parked) = &recorded.parked {
        if parked.status == "failed" {
            context
                .metrics
                .messages_failed
                .with_label_values(&[&reply.channel])
                .inc();
        }
        announce(context, reply, &parked.status, parked.error.as_deref());
    }
    Ok(())
}

/// Tells the relay there are events and the agent who wrote the reply what became of it.
fn announce(context: &OutboundContext, reply: &StoredMessage, status: &str, detail: Option<&str>) {
    context.outbox_written.notify_one();
    if let Some(agent) = &reply.agent_id {
        context.signals.to_agent(
            &AgentId::new(agent),
            &json!({ "type": "reply_status", "conversation_id": reply.conversation_id.to_string(), "message_id": reply.id.to_string(), "status": status, "reason": detail }),
        );
    }
}

async fn send_with_retries(
    sender: &dyn ChannelSender,
    reply: &StoredMessage,
    settings: &OutboundSection,
) -> Result<Option<String>, SendError> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        match sender.send(reply).await {
            Ok(provider_id) => return Ok(provider_id),
            Err(error) if !error.retryable || attempt >= settings.max_attempts => {
                return Err(error);
            }
            Err(error) => {
                let delay = error
                    .retry_after
                    .unwrap_or_else(|| backoff(attempt, settings));
                warn!(reason = %error.reason, attempt, delay_ms = delay.as_millis() as u64, "reply delivery failed; retrying");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// Exponential backoff with full jitter: a random delay up to `initial × 2^(attempt-1)`, capped.
pub fn backoff(attempt: u32, settings: &OutboundSection) -> Duration {
    let ceiling = settings
        .initial_backoff_ms
        .saturating_mul(1 << attempt.saturating_sub(1).min(20))
        .min(settings.max_backoff_ms);
    Duration::from_millis(rand::random_range(ceiling / 2..=ceiling.max(1)))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn signature_is_hmac_sha256_of_timestamp_and_body() {
        // Reference value computed with: printf '1700000000.{"a":1}' | openssl dgst -sha256 -hmac s3cret
        let signature = webhook_signature(&Secret::new("s3cret"), 1_700_000_000, br#"{"a":1}"#);
        assert_eq!(
            signature,
            "t=1700000000,v1=1698a50bc74d1ff1db85c4e0a5297c2ad9fdba245d5737cdb789e4cc6e098940"
        );
    }

    #[test]
    fn statuses_are_classified() {
        let headers = reqwest::header::HeaderMap::new();
        assert!(classify(reqwest::StatusCode::OK, &headers).is_ok());
        assert!(classify(reqwest::StatusCode::BAD_GATEWAY, &headers).is_err_and(|e| e.retryable));
        assert!(classify(reqwest::StatusCode::BAD_REQUEST, &headers).is_err_and(|e| !e.retryable));
        let mut limited = reqwest::header::HeaderMap::new();
        limited.insert(
            reqwest::header::RETRY_AFTER,
            reqwest::header::HeaderValue::from_static("7"),
        );
        let error = classify(reqwest::StatusCode::TOO_MANY_REQUESTS, &limited).unwrap_err();
        assert!(error.retryable);
        assert_eq!(error.retry_after, Some(Duration::from_secs(7)));
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let settings = OutboundSection {
            initial_backoff_ms: 100,
            max_backoff_ms: 1000,
            ..OutboundSection::default()
        };
        assert!(backoff(1, &settings) <= Duration::from_millis(100));
        assert!(backoff(3, &settings) >= Duration::from_millis(200));
        assert!(backoff(30, &settings) <= Duration::from_millis(1000));
    }
}
