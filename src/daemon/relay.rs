//! The outbox relay: publishes committed events in outbox order, marking them sent only after every
//! configured bus accepted them. A bus outage delays events and loses none.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::{Notify, watch};
use tracing::warn;

use super::events::cloud_event;
use super::metrics::Metrics;
use crate::store::{OutboxEvent, Store};

/// Events read from the outbox and published per round (their confirmations awaited together).
const RELAY_BATCH: usize = 1024;
/// How often, at most, the backlog gauge is refreshed while events keep coming.
const BACKLOG_COUNT_INTERVAL: Duration = Duration::from_secs(1);

/// Why a publish failed; the relay retries later.
#[derive(Debug, thiserror::Error)]
#[error("{bus}: {reason}")]
pub struct BusError {
    pub bus: &'static str,
    pub reason: String,
}

/// A publish that stopped part-way: the first `confirmed` events were confirmed, the rest were not.
#[derive(Debug, thiserror::Error)]
#[error("{error} (after {confirmed} confirmed)")]
pub struct PartialPublish {
    pub confirmed: usize,
    pub error: BusError,
}

/// One outbox event on its way out: its CloudEvents document, serialised once (when a broker first
/// needs it) for every broker.
#[derive(Debug)]
pub struct Publication<'a> {
    pub event: &'a OutboxEvent,
    source: &'a str,
    bytes: OnceLock<Vec<u8>>,
}

impl<'a> Publication<'a> {
    pub fn new(event: &'a OutboxEvent, source: &'a str) -> Publication<'a> {
        Publication {
            event,
            source,
            bytes: OnceLock::new(),
        }
    }

    /// The CloudEvents document as brokers send it.
    pub fn bytes(&self) -> &[u8] {
        self.bytes.get_or_init(|| {
            cloud_event(self.event, self.source)
                .to_string()
                .into_bytes()
        })
    }
}

/// A broker events are published to: NATS JetStream, RabbitMQ.
#[async_trait]
pub trait EventBus: Send + Sync + std::fmt::Debug {
    fn name(&self) -> &'static str;
    /// Publishes the events in order and returns once the bus confirmed them all; on a failure,
    /// says how many of the first ones were confirmed (the rest are published again later).
    async fn publish(&self, batch: &[Publication<'_>]) -> Result<(), PartialPublish>;
}

/// Runs until `stop` turns true and the outbox is drained (or the store is unreachable).
///
/// An event is marked sent once every bus confirmed it. While one bus is down the others go on
/// without republishing what they already confirmed (each bus's progress is remembered here; after
/// a restart consumers deduplicate by event id, and NATS by message id).
pub async fn run(
    store: Arc<dyn Store>,
    buses: Vec<Arc<dyn EventBus>>,
    written: Arc<Notify>,
    source: String,
    metrics: Metrics,
    mut stop: watch::Receiver<bool>,
) {
    if buses.is_empty() {
        return skip_pending(store, written, metrics, stop).await;
    }
    let mut backoff = Duration::from_millis(100);
    // The highest outbox position each bus confirmed.
    let mut confirmed = vec![0_i64; buses.len()];
    // Counting the backlog is a scan of the outbox: under load, once a second is enough for the gauge.
    let mut backlog_counted: Option<Instant> = None;
    loop {
        let batch = match store.outbox_pending(RELAY_BATCH).await {
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
            metrics.outbox_backlog.set(0);
            if *stop.borrow() {
                return;
            }
            events_written(&written, &mut stop).await;
            continue;
        }
        let publications: Vec<Publication> = batch
            .iter()
            .map(|event| Publication::new(event, &source))
            .collect();
        let mut everywhere = publications.len();
        let mut failed = false;
        for (bus, done_up_to) in buses.iter().zip(confirmed.iter_mut()) {
            let start = publications.partition_point(|p| p.event.position <= *done_up_to);
            let done = match bus.publish(&publications[start..]).await {
                Ok(()) => publications.len(),
                Err(partial) => {
                    warn!(error = %partial, "events not published; will retry");
                    failed = true;
                    start + partial.confirmed
                }
            };
            if let Some(last) = done
                .checked_sub(1)
                .and_then(|index| publications.get(index))
            {
                *done_up_to = (*done_up_to).max(last.event.position);
            }
            everywhere = everywhere.min(done);
        }
        if everywhere > 0 {
            let positions: Vec<i64> = batch[..everywhere].iter().map(|e| e.position).collect();
            if let Err(error) = store.outbox_mark_sent(&positions).await {
                warn!(%error, "cannot mark events published; they will be published again (consumers dedupe by id)");
            }
        }
        if backlog_counted.is_none_or(|at| at.elapsed() >= BACKLOG_COUNT_INTERVAL)
            && let Ok(backlog) = store.outbox_backlog().await
        {
            backlog_counted = Some(Instant::now());
            metrics
                .outbox_backlog
                .set(i64::try_from(backlog).unwrap_or(i64::MAX));
        }
        if failed {
            if *stop.borrow() {
                // Shutting down with a bus unreachable: the events stay in the outbox for next time.
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stop.changed() => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        } else {
            backoff = Duration::from_millis(100);
        }
    }
}

/// [`run`] without a broker: nothing to publish, so committed events are only marked published
/// (without being read), each time the engine wrote some.
async fn skip_pending(
    store: Arc<dyn Store>,
    written: Arc<Notify>,
    metrics: Metrics,
    mut stop: watch::Receiver<bool>,
) {
    metrics.outbox_backlog.set(0);
    loop {
        if let Err(error) = store.outbox_skip_pending().await {
            warn!(%error, "cannot mark events published; retrying");
        }
        if *stop.borrow() {
            return;
        }
        events_written(&written, &mut stop).await;
    }
}

/// Waits until the engine committed events, `stop` changed, or a second passed (events written by
/// another instance or path wake no one here).
async fn events_written(written: &Notify, stop: &mut watch::Receiver<bool>) {
    tokio::select! {
        _ = written.notified() => {}
        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        _ = stop.changed() => {}
    }
}
