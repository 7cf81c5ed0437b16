//! Message buses: NATS JetStream ([`nats`]) and RabbitMQ ([`amqp`]), both at once if configured.
//!
//! ```text
//!  inbound (switchboard.message.v1) ─► Intake: parse ─► lane by customer ─► Actions::ingest ─► ack
//!                                        └ invalid ─► dead-letter with the reason (never retried)
//!  commands (cmd.agent.<id>.<verb>) ─► Actions::agent_command ─► reply (reply subject / reply_to)
//!  outbox relay ─► EventBus::publish (CloudEvents, confirmed) ;  replies on bus channels ─► outbound
//! ```
//!
//! A message is acknowledged only after `Actions::ingest` committed it (or found it already stored),
//! so a redelivery after a crash creates nothing twice. Each broker has one supervisor task that
//! connects, declares its topology, consumes, and on any failure reconnects with backoff and declares
//! the topology again; its connection state is the `switchboard_bus_connected{bus}` gauge.

pub mod amqp;
pub mod commands;
pub mod nats;

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde_json::json;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::warn;

use crate::config::{AuthSection, BusSection};
use crate::daemon::actions::{Actions, Refusal, RefusalKind};
use crate::daemon::metrics::{BusStates, Metrics};
use crate::daemon::outbound::{ChannelSender, SendError};
use crate::daemon::relay::{BusError, EventBus};
use crate::message::InboundMessage;
use crate::store::StoredMessage;

/// One inbound message as a broker delivered it, and how to settle it with that broker.
#[async_trait]
pub trait Delivery: Send + 'static {
    fn payload(&self) -> &[u8];
    /// The channel the subject or routing key names, if any (it must agree with the message's).
    fn addressed_channel(&self) -> Option<&str>;
    /// Stored (or already stored): the broker may forget it.
    async fn ack(self: Box<Self>);
    /// Invalid: never retry; publish it to the dead letters with the reason, then drop it.
    async fn dead_letter(self: Box<Self>, refusal: &Refusal);
    /// switchboard cannot take it now (store down, shutting down): deliver it again later.
    async fn retry(self: Box<Self>, delay: Duration);
}

/// Publishes an agent's reply for a system that delivers it itself.
#[async_trait]
pub trait OutboundPublisher: Send + Sync + std::fmt::Debug {
    /// Returns once the broker confirmed it.
    async fn publish_outbound(
        &self,
        channel: &str,
        message_id: &str,
        document: &[u8],
    ) -> Result<(), BusError>;
}

/// Reconnect delays: doubling from the initial delay to the maximum, reset after a success.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(settings: &BusSection) -> Backoff {
        let initial = Duration::from_millis(settings.reconnect_initial_ms);
        Backoff {
            initial,
            max: Duration::from_millis(settings.reconnect_max_ms),
            next: initial,
        }
    }

    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        delay
    }

    pub fn reset(&mut self) {
        self.next = self.initial;
    }
}

/// Sleeps for `delay`; false if the daemon is stopping.
pub async fn pause(delay: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    if *stop.borrow() {
        return false;
    }
    tokio::select! {
        _ = tokio::time::sleep(delay) => true,
        _ = stop.changed() => false,
    }
}

/// How long a message switchboard could not take waits before it is delivered again.
const RETRY_DELAY: Duration = Duration::from_secs(1);

/// A parsed message waiting on its lane, with its delivery and when it was received.
type Job = (InboundMessage, Box<dyn Delivery>, Instant);

/// Inbound processing shared by both brokers: parse, then a fixed set of lanes (workers) each
/// ingesting one message at a time. A customer's messages always take the same lane, so they are
/// stored in the order the broker delivered them; the lanes together keep the store's group commit
/// busy.
#[derive(Debug, Clone)]
pub struct Intake {
    lanes: Vec<mpsc::Sender<Job>>,
    metrics: Metrics,
    bus: &'static str,
}

impl Intake {
    /// Starts `workers` lanes; they end when every `Intake` clone is dropped and their queues drained.
    pub fn start(
        actions: &Actions,
        workers: usize,
        bus: &'static str,
    ) -> (Intake, Vec<JoinHandle<()>>) {
        let mut lanes = Vec::with_capacity(workers);
        let mut tasks = Vec::with_capacity(workers);
        for _ in 0..workers {
            let (sender, mut receiver) = mpsc::channel::<Job>(16);
            let actions = actions.clone();
            tasks.push(tokio::spawn(async move {
                while let Some((message, delivery, received)) = receiver.recv().await {
                    match actions.ingest(message, received).await {
                        Ok(_) => delivery.ack().await,
                        Err(refusal) if refusal.retryable() => {
                            warn!(bus, %refusal, "inbound message not stored; it will be delivered again");
                            actions
                                .metrics
                                .bus_redeliveries
                                .with_label_values(&[bus])
                                .inc();
                            delivery.retry(RETRY_DELAY).await;
                        }
                        Err(refusal) => {
                            actions
                                .metrics
                                .bus_dead_lettered
                                .with_label_values(&[bus])
                                .inc();
                            delivery.dead_letter(&refusal).await;
                        }
                    }
                }
            }));
            lanes.push(sender);
        }
        let intake = Intake {
            lanes,
            metrics: actions.metrics.clone(),
            bus,
        };
        (intake, tasks)
    }

    /// Takes one delivery: invalid ones are dead-lettered at once, valid ones queued on their lane
    /// (waiting while the lane is full, which holds back the broker through its prefetch window).
    pub async fn submit(&self, delivery: Box<dyn Delivery>) {
        let received = Instant::now();
        let message = match Actions::parse_message(delivery.payload()) {
            Ok(message) => message,
            Err(refusal) => {
                self.refuse(delivery, &refusal).await;
                return;
            }
        };
        if let Some(addressed) = delivery.addressed_channel()
            && addressed != message.channel
        {
            let refusal = Refusal::new(
                RefusalKind::Invalid,
                "channel_mismatch",
                format!(
                    "published for channel `{addressed}` but the message is on channel `{}`",
                    message.channel
                ),
            );
            self.refuse(delivery, &refusal).await;
            return;
        }
        let mut hasher = DefaultHasher::new();
        (&message.channel, &message.from.address).hash(&mut hasher);
        let lane = (hasher.finish() % self.lanes.len() as u64) as usize;
        if let Err(mpsc::error::SendError((_, delivery, _))) =
            self.lanes[lane].send((message, delivery, received)).await
        {
            // The lanes are gone (shutting down): let the broker deliver it again.
            delivery.retry(RETRY_DELAY).await;
        }
    }

    async fn refuse(&self, delivery: Box<dyn Delivery>, refusal: &Refusal) {
        warn!(bus = self.bus, %refusal, "invalid inbound message dead-lettered");
        self.metrics
            .bus_dead_lettered
            .with_label_values(&[self.bus])
            .inc();
        delivery.dead_letter(refusal).await;
    }
}

/// The document published for an agent's reply on a bus channel (`<prefix>.outbound.<channel>`).
pub fn outbound_document(reply: &StoredMessage) -> Vec<u8> {
    json!({
        "message_id": reply.id.to_string(),
        "conversation_id": reply.conversation_id.to_string(),
        "channel": reply.channel,
        "provider": reply.provider,
        "from": reply.from_address,
        "to": reply.to_address,
        "agent_id": reply.agent_id,
        "reply": reply.body,
        "created_at": reply.created_at.to_rfc3339(),
    })
    .to_string()
    .into_bytes()
}

/// A channel delivered by another system: the reply is handed to every configured bus, and counts as
/// sent once each confirmed it.
#[derive(Debug)]
pub struct BusChannel {
    publishers: Vec<Arc<dyn OutboundPublisher>>,
}

#[async_trait]
impl ChannelSender for BusChannel {
    async fn send(&self, reply: &StoredMessage) -> Result<Option<String>, SendError> {
        let document = outbound_document(reply);
        let id = reply.id.to_string();
        for publisher in &self.publishers {
            publisher
                .publish_outbound(&reply.channel, &id, &document)
                .await
                .map_err(|error| SendError {
                    retryable: true,
                    reason: error.to_string(),
                    retry_after: None,
                })?;
        }
        Ok(None)
    }
}

/// The running buses: what the relay publishes to, the channel senders they provide, and how to stop.
#[derive(Debug)]
pub struct Buses {
    pub event_buses: Vec<Arc<dyn EventBus>>,
    amqp: Option<Arc<amqp::AmqpBus>>,
    nats: Option<Arc<nats::NatsBus>>,
    pub channels: Vec<(String, Arc<dyn ChannelSender>)>,
    pub states: BusStates,
    settings: BusSection,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Buses {
    /// Sets up every enabled broker; they connect in the background. Fails only on an unusable
    /// broker URL: a broker that is down is retried.
    pub async fn connect(settings: &BusSection, metrics: &Metrics) -> Result<Buses, BusError> {
        let (stop, _) = watch::channel(false);
        let mut names = Vec::new();
        if settings.nats.enabled {
            names.push(nats::NAME);
        }
        if settings.amqp.enabled {
            names.push(amqp::NAME);
        }
        let states = BusStates::new(metrics, names);
        let mut event_buses: Vec<Arc<dyn EventBus>> = Vec::new();
        let mut publishers: Vec<Arc<dyn OutboundPublisher>> = Vec::new();
        let (mut nats_bus, mut amqp_bus) = (None, None);
        if settings.nats.enabled {
            let bus = nats::NatsBus::connect(settings, states.clone()).await?;
            event_buses.push(bus.clone());
            publishers.push(bus.clone());
            nats_bus = Some(bus);
        }
        if settings.amqp.enabled {
            let bus = amqp::AmqpBus::new(settings, states.clone())?;
            event_buses.push(bus.clone());
            publishers.push(bus.clone());
            amqp_bus = Some(bus);
        }
        let channels = if publishers.is_empty() {
            Vec::new()
        } else {
            let sender: Arc<dyn ChannelSender> = Arc::new(BusChannel { publishers });
            settings
                .outbound_channels
                .iter()
                .map(|channel| (channel.clone(), sender.clone()))
                .collect()
        };
        Ok(Buses {
            event_buses,
            amqp: amqp_bus,
            nats: nats_bus,
            channels,
            states,
            settings: settings.clone(),
            stop,
            tasks: Vec::new(),
        })
    }

    /// Starts consuming inbound messages and commands from every broker.
    pub fn start_intake(&mut self, actions: &Actions, auth: &Arc<RwLock<AuthSection>>) {
        let commands = commands::Commands {
            actions: actions.clone(),
            auth: if self.settings.commands_need_agent_token {
                commands::CommandAuth::AgentToken(auth.clone())
            } else {
                commands::CommandAuth::Broker
            },
        };
        if let Some(bus) = &self.nats {
            let mut tasks = bus.start_intake(&self.settings, &commands, self.stop.subscribe());
            self.tasks.append(&mut tasks);
        }
        if let Some(bus) = &self.amqp {
            let mut tasks = bus.start_intake(&self.settings, &commands, self.stop.subscribe());
            self.tasks.append(&mut tasks);
        }
    }

    /// Stops taking messages and commands; messages being stored finish and are acknowledged, the
    /// rest go back to the brokers. The connections stay up for the relay's last events.
    pub async fn stop_intake(&mut self, grace: Duration) {
        let _ = self.stop.send(true);
        for task in self.tasks.drain(..) {
            if tokio::time::timeout(grace, task).await.is_err() {
                warn!("a bus task did not stop within the grace period");
            }
        }
    }

    /// Closes the connections (after the relay's last flush).
    pub async fn close(self) {
        if let Some(bus) = self.amqp {
            bus.close().await;
        }
        if let Some(bus) = self.nats {
            bus.close().await;
        }
    }
}
