//! The outbox relay: publishes committed events in outbox order, marking them sent only after every
//! configured bus accepted them. A bus outage delays events and loses none.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;
use tokio::sync::{Notify, broadcast, watch};
use tracing::warn;

use super::events::cloud_event;
use super::metrics::Metrics;
use crate::store::{OutboxEvent, Store};

/// Why a publish failed; the relay retries later.
#[derive(Debug, thiserror::Error)]
#[error("{bus}: {reason}")]
pub struct BusError {
    pub bus: &'static str,
    pub reason: String,
}

/// Somewhere events go. Brokers (NATS, RabbitMQ) implement it alongside the in-process bus.
#[async_trait]
pub trait EventBus: Send + Sync + std::fmt::Debug {
    fn name(&self) -> &'static str;
    /// Publishes one CloudEvent; returns only once the bus confirmed it.
    async fn publish(&self, event: &OutboxEvent, document: &Value) -> Result<(), BusError>;
}

/// The embedded bus: subscribers in this process (tests, the supervisor stream) receive every event.
#[derive(Debug, Clone)]
pub struct InProcessBus {
    sender: broadcast::Sender<Value>,
}

impl InProcessBus {
    pub fn new() -> InProcessBus {
        InProcessBus {
            sender: broadcast::channel(4096).0,
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Value> {
        self.sender.subscribe()
    }
}

impl Default for InProcessBus {
    fn default() -> Self {
        InProcessBus::new()
    }
}

#[async_trait]
impl EventBus for InProcessBus {
    fn name(&self) -> &'static str {
        "in-process"
    }

    async fn publish(&self, _event: &OutboxEvent, document: &Value) -> Result<(), BusError> {
        // No subscriber is not an error: the embedded bus has no durable consumers to wait for.
        let _ = self.sender.send(document.clone());
        Ok(())
    }
}

/// Runs until `stop` turns true and the outbox is drained (or the store is unreachable).
pub async fn run(
    store: Arc<dyn Store>,
    buses: Vec<Arc<dyn EventBus>>,
    written: Arc<Notify>,
    source: String,
    metrics: Metrics,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let batch = match store.outbox_pending(256).await {
            Ok(batch) => batch,
            Err(error) => {
                warn!(%error, "outbox unreadable; retrying");
                if *stop.borrow() {
                    return;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        if batch.is_empty() {
            if *stop.borrow() {
                return;
            }
            tokio::select! {
                _ = written.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = stop.changed() => {}
            }
            continue;
        }
        let mut published = Vec::with_capacity(batch.len());
        let mut failed = false;
        for event in &batch {
            let document = cloud_event(event, &source);
            for bus in &buses {
                if let Err(error) = bus.publish(event, &document).await {
                    warn!(%error, event = %event.event_id, "event not published; will retry");
                    failed = true;
                    break;
                }
            }
            if failed {
                break;
            }
            published.push(event.position);
        }
        if !published.is_empty() {
            if let Err(error) = store.outbox_mark_sent(&published).await {
                warn!(%error, "cannot mark events published; they will be published again (consumers dedupe by id)");
            }
            if let Ok(backlog) = store.outbox_backlog().await {
                metrics
                    .outbox_backlog
                    .set(i64::try_from(backlog).unwrap_or(i64::MAX));
            }
        }
        if failed {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        } else {
            backoff = Duration::from_millis(100);
        }
    }
}
