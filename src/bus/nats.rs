//! NATS JetStream: inbound messages from a stream through a durable pull consumer (explicit ack),
//! events published to a stream with their event id as `Nats-Msg-Id` (JetStream drops duplicates),
//! dead letters on `<prefix>.dead.<channel>`, agent commands as request/reply on core NATS.
//!
//! The client reconnects by itself (with the configured backoff); the consumer loop declares the
//! streams and the consumer again whenever it restarts, so a broker that lost its state is set up anew.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, pull};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::{self, AckKind, stream};
use async_nats::{Client, ConnectOptions, Event, HeaderMap};
use async_trait::async_trait;
use futures_util::StreamExt;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::commands::{BusCommand, Commands};
use super::{Backoff, Delivery, Intake, OutboundPublisher, pause};
use crate::config::{BusSection, NatsSection};
use crate::daemon::actions::Refusal;
use crate::daemon::metrics::BusStates;
use crate::daemon::relay::{BusError, EventBus, PartialPublish, Publication};

pub const NAME: &str = "nats";

/// Header of a dead letter: why it was refused (`<code>: <message>`).
pub const ERROR_HEADER: &str = "Switchboard-Error";

/// The NATS side of switchboard; cheap to share.
#[derive(Debug)]
pub struct NatsBus {
    client: Client,
    jetstream: jetstream::Context,
    settings: NatsSection,
}

fn error(reason: impl std::fmt::Display) -> BusError {
    BusError {
        bus: NAME,
        reason: reason.to_string(),
    }
}

impl NatsBus {
    /// Creates the client, which connects (and reconnects) in the background.
    pub async fn connect(
        settings: &BusSection,
        states: BusStates,
    ) -> Result<Arc<NatsBus>, BusError> {
        let nats = settings.nats.clone();
        let (initial, max) = (
            Duration::from_millis(settings.reconnect_initial_ms),
            Duration::from_millis(settings.reconnect_max_ms),
        );
        let options = ConnectOptions::new()
            .name("switchboard")
            .retry_on_initial_connect()
            .max_reconnects(None)
            .reconnect_delay_callback(move |attempts| {
                let doublings = u32::try_from(attempts.min(16)).unwrap_or(16);
                (initial * 2_u32.pow(doublings)).min(max)
            })
            .event_callback(move |event| {
                let states = states.clone();
                async move {
                    match event {
                        Event::Connected => {
                            info!(bus = NAME, "connected");
                            states.set(NAME, true);
                        }
                        Event::Disconnected | Event::Closed => {
                            warn!(bus = NAME, "disconnected; reconnecting");
                            states.set(NAME, false);
                        }
                        other => warn!(bus = NAME, event = %other, "broker event"),
                    }
                }
            });
        // With retry_on_initial_connect this returns at once and connects in the background; an
        // error here is an unusable URL.
        let client = options.connect(nats.url.expose()).await.map_err(error)?;
        let bus = Arc::new(NatsBus {
            jetstream: jetstream::new(client.clone()),
            client,
            settings: nats,
        });
        Ok(bus)
    }

    /// Starts the inbound consumer and the command responder.
    pub fn start_intake(
        self: &Arc<Self>,
        settings: &BusSection,
        commands: &Commands,
        stop: watch::Receiver<bool>,
    ) -> Vec<JoinHandle<()>> {
        let bus = self;
        let mut tasks = Vec::new();
        let (intake, mut lanes) = Intake::start(&commands.actions, settings.workers, NAME);
        tasks.append(&mut lanes);
        tasks.push(tokio::spawn(consume(
            bus.clone(),
            intake,
            Backoff::new(settings),
            stop.clone(),
        )));
        tasks.push(tokio::spawn(answer_commands(
            bus.clone(),
            commands.clone(),
            Backoff::new(settings),
            stop,
        )));
        tasks
    }

    /// Sends what is buffered (the relay's last events, answers) before the client is dropped.
    pub async fn close(&self) {
        if let Err(failure) = self.client.flush().await {
            warn!(bus = NAME, error = %failure, "cannot flush before closing");
        }
    }

    fn subject(&self, middle: &str, last: &str) -> String {
        format!("{}.{middle}.{last}", self.settings.subject_prefix)
    }

    /// Creates or updates both streams and the durable consumer (idempotent).
    async fn declare(&self) -> Result<jetstream::consumer::Consumer<pull::Config>, BusError> {
        let prefix = &self.settings.subject_prefix;
        self.jetstream
            .create_or_update_stream(stream::Config {
                name: self.settings.inbound_stream.clone(),
                subjects: vec![format!("{prefix}.inbound.*")],
                storage: stream::StorageType::File,
                duplicate_window: Duration::from_secs(120),
                ..Default::default()
            })
            .await
            .map_err(error)?;
        self.jetstream
            .create_or_update_stream(stream::Config {
                name: self.settings.publish_stream.clone(),
                subjects: vec![
                    format!("{prefix}.events.>"),
                    format!("{prefix}.dead.*"),
                    format!("{prefix}.outbound.*"),
                ],
                storage: stream::StorageType::File,
                duplicate_window: Duration::from_secs(120),
                ..Default::default()
            })
            .await
            .map_err(error)?;
        let max_ack_pending = i64::try_from(self.settings.max_ack_pending).unwrap_or(i64::MAX);
        self.jetstream
            .create_consumer_on_stream(
                pull::Config {
                    durable_name: Some(self.settings.consumer.clone()),
                    ack_policy: AckPolicy::Explicit,
                    ack_wait: Duration::from_secs(self.settings.ack_wait_seconds),
                    max_ack_pending,
                    ..Default::default()
                },
                &self.settings.inbound_stream,
            )
            .await
            .map_err(error)
    }

    /// Publishes to a JetStream subject with a message id and waits for the stream's ack.
    async fn publish_confirmed(
        &self,
        subject: String,
        id: &str,
        headers: HeaderMap,
        payload: Vec<u8>,
    ) -> Result<(), BusError> {
        let ack = self
            .jetstream
            .send_publish(
                subject,
                PublishMessage::build()
                    .payload(payload.into())
                    .headers(headers)
                    .message_id(id),
            )
            .await
            .map_err(error)?;
        ack.await.map(|_| ()).map_err(error)
    }
}

/// Pulls inbound messages until stopped; on any failure waits, declares the topology again and
/// resumes (unacknowledged messages are redelivered by JetStream after `ack_wait`).
async fn consume(
    bus: Arc<NatsBus>,
    intake: Intake,
    mut backoff: Backoff,
    mut stop: watch::Receiver<bool>,
) {
    let inbound_prefix = format!("{}.inbound.", bus.settings.subject_prefix);
    loop {
        match bus.declare().await {
            Ok(consumer) => {
                let batch = bus.settings.max_ack_pending;
                match consumer
                    .stream()
                    .max_messages_per_batch(batch)
                    .heartbeat(Duration::from_secs(5))
                    .expires(Duration::from_secs(30))
                    .messages()
                    .await
                {
                    Ok(mut messages) => {
                        backoff.reset();
                        loop {
                            tokio::select! {
                                _ = stop.changed() => return,
                                next = messages.next() => match next {
                                    Some(Ok(message)) => {
                                        let channel = message
                                            .subject
                                            .strip_prefix(inbound_prefix.as_str())
                                            .map(str::to_owned);
                                        let delivery = NatsDelivery { bus: bus.clone(), message, channel };
                                        intake.submit(Box::new(delivery)).await;
                                    }
                                    Some(Err(failure)) => {
                                        warn!(bus = NAME, error = %failure, "inbound consumer failed; resuming");
                                        break;
                                    }
                                    None => break,
                                },
                            }
                        }
                    }
                    Err(failure) => {
                        warn!(bus = NAME, error = %failure, "cannot pull inbound messages")
                    }
                }
            }
            Err(failure) => warn!(bus = NAME, error = %failure, "cannot declare streams"),
        }
        if !pause(backoff.next_delay(), &mut stop).await {
            return;
        }
    }
}

/// Answers `<prefix>.cmd.agent.<agent>.<verb>` requests (one instance per command: a queue group).
async fn answer_commands(
    bus: Arc<NatsBus>,
    commands: Commands,
    mut backoff: Backoff,
    mut stop: watch::Receiver<bool>,
) {
    let prefix = format!("{}.cmd.", bus.settings.subject_prefix);
    loop {
        let subscribed = bus
            .client
            .queue_subscribe(
                format!("{prefix}agent.*.*"),
                bus.settings.command_queue_group.clone(),
            )
            .await;
        match subscribed {
            Ok(mut requests) => {
                backoff.reset();
                loop {
                    tokio::select! {
                        _ = stop.changed() => return,
                        request = requests.next() => {
                            let Some(request) = request else { break };
                            let (commands, client, prefix) = (commands.clone(), bus.client.clone(), prefix.clone());
                            tokio::spawn(async move {
                                let authorization = request
                                    .headers
                                    .as_ref()
                                    .and_then(|headers| headers.get("Authorization"))
                                    .map(|value| value.as_str());
                                let reply = commands
                                    .execute(BusCommand {
                                        address: request.subject.strip_prefix(prefix.as_str()).unwrap_or_default(),
                                        authorization,
                                        payload: &request.payload,
                                    })
                                    .await;
                                if let Some(reply_to) = request.reply
                                    && let Err(failure) = client.publish(reply_to, reply.into()).await
                                {
                                    warn!(bus = NAME, error = %failure, "cannot answer a command");
                                }
                            });
                        }
                    }
                }
            }
            Err(failure) => warn!(bus = NAME, error = %failure, "cannot subscribe to commands"),
        }
        if !pause(backoff.next_delay(), &mut stop).await {
            return;
        }
    }
}

struct NatsDelivery {
    bus: Arc<NatsBus>,
    message: jetstream::Message,
    channel: Option<String>,
}

#[async_trait]
impl Delivery for NatsDelivery {
    fn payload(&self) -> &[u8] {
        &self.message.payload
    }

    fn addressed_channel(&self) -> Option<&str> {
        self.channel.as_deref()
    }

    async fn ack(self: Box<Self>) {
        if let Err(failure) = self.message.ack().await {
            // Not acknowledged: JetStream redelivers it and the store finds it a duplicate.
            warn!(bus = NAME, error = %failure, "cannot acknowledge a stored message");
        }
    }

    async fn dead_letter(self: Box<Self>, refusal: &Refusal) {
        let channel = self.channel.as_deref().unwrap_or("unknown");
        let mut headers = HeaderMap::new();
        headers.insert(ERROR_HEADER, refusal.to_string().as_str());
        headers.insert(
            "Switchboard-Original-Subject",
            self.message.subject.as_str(),
        );
        let id = match self.message.info() {
            Ok(info) => format!("{}-{}", info.stream, info.stream_sequence),
            Err(_) => ulid::Ulid::new().to_string(),
        };
        let subject = self.bus.subject("dead", channel);
        match self
            .bus
            .publish_confirmed(subject, &id, headers, self.message.payload.to_vec())
            .await
        {
            Ok(()) => {
                if let Err(failure) = self.message.ack_with(AckKind::Term).await {
                    warn!(bus = NAME, error = %failure, "cannot terminate a dead-lettered message");
                }
            }
            Err(failure) => {
                // Keep it: the dead letter is not safely stored yet. Redelivered, it is tried again.
                warn!(bus = NAME, error = %failure, "cannot publish a dead letter; retrying later");
                let _ = self
                    .message
                    .ack_with(AckKind::Nak(Some(super::RETRY_DELAY)))
                    .await;
            }
        }
    }

    async fn retry(self: Box<Self>, delay: Duration) {
        if let Err(failure) = self.message.ack_with(AckKind::Nak(Some(delay))).await {
            warn!(bus = NAME, error = %failure, "cannot ask for redelivery; it comes back after ack_wait");
        }
    }
}

#[async_trait]
impl EventBus for NatsBus {
    fn name(&self) -> &'static str {
        NAME
    }

    async fn publish(&self, batch: &[Publication<'_>]) -> Result<(), PartialPublish> {
        let partial = |confirmed, error| PartialPublish { confirmed, error };
        // Send them all, then wait for the acks in order: one round trip for the batch.
        let mut acks = Vec::with_capacity(batch.len());
        for (index, publication) in batch.iter().enumerate() {
            let subject = self.subject("events", &publication.event.kind);
            let mut headers = HeaderMap::new();
            headers.insert("Content-Type", "application/cloudevents+json");
            let sent = self
                .jetstream
                .send_publish(
                    subject,
                    PublishMessage::build()
                        .payload(publication.bytes().to_vec().into())
                        .headers(headers)
                        .message_id(publication.event.event_id.to_string()),
                )
                .await;
            match sent {
                Ok(ack) => acks.push(ack),
                Err(failure) => {
                    acks.truncate(index);
                    return settle(acks, Some(error(failure)))
                        .await
                        .map_err(|(n, e)| partial(n, e));
                }
            }
        }
        settle(acks, None).await.map_err(|(n, e)| partial(n, e))
    }
}

/// Waits for the acks in order; the count confirmed before the first failure, with the failure.
async fn settle(
    acks: Vec<jetstream::context::PublishAckFuture>,
    then: Option<BusError>,
) -> Result<(), (usize, BusError)> {
    let count = acks.len();
    for (index, ack) in acks.into_iter().enumerate() {
        if let Err(failure) = ack.await {
            return Err((index, error(failure)));
        }
    }
    match then {
        Some(failure) => Err((count, failure)),
        None => Ok(()),
    }
}

#[async_trait]
impl OutboundPublisher for NatsBus {
    async fn publish_outbound(
        &self,
        channel: &str,
        message_id: &str,
        document: &[u8],
    ) -> Result<(), BusError> {
        let mut headers = HeaderMap::new();
        headers.insert("Content-Type", "application/json");
        self.publish_confirmed(
            self.subject("outbound", channel),
            message_id,
            headers,
            document.to_vec(),
        )
        .await
    }
}
