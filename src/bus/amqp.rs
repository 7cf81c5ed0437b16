//! RabbitMQ (AMQP 0-9-1): inbound messages from a durable queue bound to the topic exchange
//! `inbound_exchange` (manual ack, prefetch), invalid ones republished to the dead-letter exchange
//! with the reason in the `x-switchboard-error` header; events to the topic exchange
//! `events_exchange` (routing key = event kind, persistent, publisher confirms); agent commands from
//! the command queue, answered to `reply_to` with the request's `correlation_id`.
//!
//! One supervisor task owns the connection: connect, declare the topology, consume; when anything
//! fails it drops the connection, waits (backoff), and starts over, declaring the topology again.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use lapin::message::Delivery as AmqpMessage;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    BasicRejectOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use tokio::sync::{Mutex, Notify, watch};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::commands::{BusCommand, Commands};
use super::{Backoff, Delivery, Intake, OutboundPublisher, pause};
use crate::config::{AmqpSection, BusSection};
use crate::daemon::actions::Refusal;
use crate::daemon::metrics::BusStates;
use crate::daemon::relay::{BusError, EventBus, PartialPublish, Publication};

pub const NAME: &str = "amqp";

/// Header of a dead letter: why it was refused (`<code>: <message>`).
pub const ERROR_HEADER: &str = "x-switchboard-error";

/// Persistent delivery (survives a broker restart).
const PERSISTENT: u8 = 2;

fn error(reason: impl std::fmt::Display) -> BusError {
    BusError {
        bus: NAME,
        reason: reason.to_string(),
    }
}

/// The RabbitMQ side of switchboard; cheap to share.
#[derive(Debug)]
pub struct AmqpBus {
    settings: AmqpSection,
    /// The channel everything is published on (confirm mode), while connected. One channel keeps
    /// events in outbox order; the lock serialises publishers.
    publisher: Mutex<Option<Channel>>,
    /// The live connection, kept after intake stops so the relay can still flush events.
    connection: Mutex<Option<Connection>>,
    /// Signalled when a publish finds the connection broken, so the supervisor reconnects.
    broken: Notify,
    states: BusStates,
}

impl AmqpBus {
    /// Checks the URL; the connection is made by the supervisor ([`AmqpBus::start_intake`]).
    pub fn new(settings: &BusSection, states: BusStates) -> Result<Arc<AmqpBus>, BusError> {
        settings
            .amqp
            .url
            .expose()
            .parse::<lapin::uri::AMQPUri>()
            .map_err(|reason| error(format!("bus.amqp.url: {reason}")))?;
        Ok(Arc::new(AmqpBus {
            settings: settings.amqp.clone(),
            publisher: Mutex::new(None),
            connection: Mutex::new(None),
            broken: Notify::new(),
            states,
        }))
    }

    /// Starts the supervisor: connect, declare, consume inbound messages and commands, reconnect.
    pub fn start_intake(
        self: &Arc<Self>,
        settings: &BusSection,
        commands: &Commands,
        stop: watch::Receiver<bool>,
    ) -> Vec<JoinHandle<()>> {
        let (intake, mut tasks) = Intake::start(&commands.actions, settings.workers, NAME);
        tasks.push(tokio::spawn(supervise(
            self.clone(),
            intake,
            commands.clone(),
            Backoff::new(settings),
            stop,
        )));
        tasks
    }

    /// Connects and declares every exchange and queue (idempotent), returning the connection, the
    /// publishing channel and the consuming channel.
    async fn connect(&self) -> Result<(Connection, Channel, Channel), lapin::Error> {
        let connection = Connection::connect(
            self.settings.url.expose(),
            ConnectionProperties::default().with_connection_name("switchboard".into()),
        )
        .await?;
        let declare = connection.create_channel().await?;
        let s = &self.settings;
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        for exchange in [
            &s.inbound_exchange,
            &s.dead_letter_exchange,
            &s.events_exchange,
            &s.command_exchange,
            &s.outbound_exchange,
        ] {
            declare
                .exchange_declare(
                    exchange.as_str().into(),
                    ExchangeKind::Topic,
                    durable,
                    FieldTable::default(),
                )
                .await?;
        }
        declare
            .queue_declare(
                s.dead_letter_queue.as_str().into(),
                QueueDeclareOptions::durable(),
                FieldTable::default(),
            )
            .await?;
        declare
            .queue_bind(
                s.dead_letter_queue.as_str().into(),
                s.dead_letter_exchange.as_str().into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        // A message rejected without requeue (should publishing its dead letter fail) still lands
        // in the dead-letter exchange, by the broker's own dead-lettering.
        let mut inbound_arguments = FieldTable::default();
        inbound_arguments.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(s.dead_letter_exchange.as_str().into()),
        );
        declare
            .queue_declare(
                s.inbound_queue.as_str().into(),
                QueueDeclareOptions::durable(),
                inbound_arguments,
            )
            .await?;
        declare
            .queue_bind(
                s.inbound_queue.as_str().into(),
                s.inbound_exchange.as_str().into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        // Commands are live requests: a stale one (nobody answered within a minute) expires.
        let mut command_arguments = FieldTable::default();
        command_arguments.insert("x-message-ttl".into(), AMQPValue::LongUInt(60_000));
        declare
            .queue_declare(
                s.command_queue.as_str().into(),
                QueueDeclareOptions::durable(),
                command_arguments,
            )
            .await?;
        declare
            .queue_bind(
                s.command_queue.as_str().into(),
                s.command_exchange.as_str().into(),
                "agent.*.*".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let _ = declare.close(200, "declared".into()).await;
        let publisher = connection.create_channel().await?;
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let consumer = connection.create_channel().await?;
        consumer
            .basic_qos(s.prefetch, BasicQosOptions::default())
            .await?;
        Ok((connection, publisher, consumer))
    }

    /// Publishes on the confirm channel and waits for the broker's confirmation.
    async fn publish_confirmed(
        &self,
        exchange: &str,
        routing_key: &str,
        payload: &[u8],
        properties: BasicProperties,
    ) -> Result<(), BusError> {
        let guard = self.publisher.lock().await;
        let channel = guard.as_ref().ok_or_else(|| error("not connected"))?;
        let confirm = channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                payload,
                properties,
            )
            .await;
        let result = match confirm {
            Ok(confirm) => confirm.await.map_err(error).and_then(|confirmation| {
                if confirmation.is_ack() {
                    Ok(())
                } else {
                    Err(error("the broker refused the message (nack)"))
                }
            }),
            Err(failure) => Err(error(failure)),
        };
        drop(guard);
        if result.is_err() {
            self.broken.notify_one();
        }
        result
    }

    /// Closes the connection (after the relay's last flush).
    pub async fn close(&self) {
        self.publisher.lock().await.take();
        if let Some(connection) = self.connection.lock().await.take() {
            let _ = connection.close(200, "switchboard stopping".into()).await;
        }
        self.states.set(NAME, false);
    }
}

/// Connect, consume until stopped or broken, reconnect with backoff: forever.
async fn supervise(
    bus: Arc<AmqpBus>,
    intake: Intake,
    commands: Commands,
    mut backoff: Backoff,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        match bus.connect().await {
            Ok((connection, publisher, consumer)) => {
                *bus.publisher.lock().await = Some(publisher);
                *bus.connection.lock().await = Some(connection);
                bus.states.set(NAME, true);
                info!(bus = NAME, "connected; topology declared");
                backoff.reset();
                let stopped = consume(&bus, &intake, &commands, &consumer, &mut stop).await;
                if stopped {
                    // Stop taking messages; keep the connection for the relay's last events.
                    let _ = consumer.close(200, "stopping".into()).await;
                    return;
                }
                bus.publisher.lock().await.take();
                if let Some(connection) = bus.connection.lock().await.take() {
                    let _ = connection.close(200, "reconnecting".into()).await;
                }
                bus.states.set(NAME, false);
                warn!(bus = NAME, "connection lost; reconnecting");
            }
            Err(failure) => {
                bus.states.set(NAME, false);
                warn!(bus = NAME, error = %failure, "cannot connect or declare the topology");
            }
        }
        if !pause(backoff.next_delay(), &mut stop).await {
            return;
        }
    }
}

/// Consumes inbound messages and commands; true when stopped, false when the connection broke.
async fn consume(
    bus: &Arc<AmqpBus>,
    intake: &Intake,
    commands: &Commands,
    channel: &Channel,
    stop: &mut watch::Receiver<bool>,
) -> bool {
    let s = &bus.settings;
    let consumer = |queue: &str, tag: &'static str| {
        channel.basic_consume(
            queue.into(),
            tag.into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
    };
    let (mut inbound, mut requests) = match (
        consumer(&s.inbound_queue, "switchboard-inbound").await,
        consumer(&s.command_queue, "switchboard-commands").await,
    ) {
        (Ok(inbound), Ok(requests)) => (inbound, requests),
        (Err(failure), _) | (_, Err(failure)) => {
            warn!(bus = NAME, error = %failure, "cannot consume");
            return false;
        }
    };
    loop {
        tokio::select! {
            _ = stop.changed() => return true,
            _ = bus.broken.notified() => return false,
            delivery = inbound.next() => match delivery {
                Some(Ok(message)) => {
                    let channel_key = message.routing_key.as_str().to_owned();
                    let delivery = AmqpDelivery { bus: bus.clone(), message, channel: channel_key };
                    intake.submit(Box::new(delivery)).await;
                }
                Some(Err(failure)) => {
                    warn!(bus = NAME, error = %failure, "inbound consumer failed");
                    return false;
                }
                None => return false,
            },
            request = requests.next() => match request {
                Some(Ok(request)) => {
                    let (bus, commands) = (bus.clone(), commands.clone());
                    tokio::spawn(async move { answer(&bus, &commands, request).await });
                }
                Some(Err(failure)) => {
                    warn!(bus = NAME, error = %failure, "command consumer failed");
                    return false;
                }
                None => return false,
            },
        }
    }
}

/// Runs one command and answers to its `reply_to`, then acknowledges it.
async fn answer(bus: &AmqpBus, commands: &Commands, request: AmqpMessage) {
    let authorization = request
        .properties
        .headers()
        .as_ref()
        .and_then(|headers| headers.inner().get("authorization"))
        .and_then(|value| match value {
            AMQPValue::LongString(text) => Some(text.to_string()),
            AMQPValue::ShortString(text) => Some(text.to_string()),
            _ => None,
        });
    let reply = commands
        .execute(BusCommand {
            address: request.routing_key.as_str(),
            authorization: authorization.as_deref(),
            payload: &request.data,
        })
        .await;
    if let Some(reply_to) = request.properties.reply_to() {
        let mut properties =
            BasicProperties::default().with_content_type("application/json".into());
        if let Some(correlation) = request.properties.correlation_id() {
            properties = properties.with_correlation_id(correlation.clone());
        }
        if let Err(failure) = bus
            .publish_confirmed("", reply_to.as_str(), &reply, properties)
            .await
        {
            warn!(bus = NAME, error = %failure, "cannot answer a command");
        }
    }
    if let Err(failure) = request.ack(BasicAckOptions::default()).await {
        warn!(bus = NAME, error = %failure, "cannot acknowledge a command");
    }
}

struct AmqpDelivery {
    bus: Arc<AmqpBus>,
    message: AmqpMessage,
    /// The routing key: the channel the publisher addressed.
    channel: String,
}

#[async_trait]
impl Delivery for AmqpDelivery {
    fn payload(&self) -> &[u8] {
        &self.message.data
    }

    fn addressed_channel(&self) -> Option<&str> {
        Some(self.channel.as_str()).filter(|channel| !channel.is_empty())
    }

    async fn ack(self: Box<Self>) {
        if let Err(failure) = self.message.ack(BasicAckOptions::default()).await {
            // Not acknowledged: RabbitMQ redelivers it and the store finds it a duplicate.
            warn!(bus = NAME, error = %failure, "cannot acknowledge a stored message");
        }
    }

    async fn dead_letter(self: Box<Self>, refusal: &Refusal) {
        let mut headers = self
            .message
            .properties
            .headers()
            .clone()
            .unwrap_or_default();
        headers.insert(
            ERROR_HEADER.into(),
            AMQPValue::LongString(refusal.to_string().into()),
        );
        headers.insert(
            "x-switchboard-error-code".into(),
            AMQPValue::LongString(refusal.code.into()),
        );
        headers.insert(
            "x-original-exchange".into(),
            AMQPValue::LongString(self.message.exchange.as_str().into()),
        );
        let properties = self
            .message
            .properties
            .clone()
            .with_headers(headers)
            .with_delivery_mode(PERSISTENT);
        let published = self
            .bus
            .publish_confirmed(
                &self.bus.settings.dead_letter_exchange,
                &self.channel,
                &self.message.data,
                properties,
            )
            .await;
        let settled = match published {
            Ok(()) => self.message.ack(BasicAckOptions::default()).await,
            Err(failure) => {
                // The broker's own dead-lettering still keeps it (without our reason header).
                warn!(bus = NAME, error = %failure, "cannot publish a dead letter; rejecting it");
                self.message
                    .reject(BasicRejectOptions { requeue: false })
                    .await
            }
        };
        if let Err(failure) = settled {
            warn!(bus = NAME, error = %failure, "cannot settle a dead-lettered message");
        }
    }

    async fn retry(self: Box<Self>, delay: Duration) {
        // Hold it a moment so a store outage does not become a hot redelivery loop.
        tokio::time::sleep(delay).await;
        let requeue = BasicNackOptions {
            requeue: true,
            ..Default::default()
        };
        if let Err(failure) = self.message.nack(requeue).await {
            warn!(bus = NAME, error = %failure, "cannot requeue; it comes back when the connection closes");
        }
    }
}

#[async_trait]
impl EventBus for AmqpBus {
    fn name(&self) -> &'static str {
        NAME
    }

    async fn publish(&self, batch: &[Publication<'_>]) -> Result<(), PartialPublish> {
        let partial = |confirmed, error| PartialPublish { confirmed, error };
        let guard = self.publisher.lock().await;
        let Some(channel) = guard.as_ref() else {
            return Err(partial(0, error("not connected")));
        };
        // Publish them all, then wait for the confirms in order: one round trip for the batch.
        let mut confirms = Vec::with_capacity(batch.len());
        let mut failure = None;
        for publication in batch {
            let event = publication.event;
            let properties = BasicProperties::default()
                .with_content_type("application/cloudevents+json".into())
                .with_delivery_mode(PERSISTENT)
                .with_message_id(ShortString::from(event.event_id.to_string()))
                .with_type(ShortString::from(format!(
                    "{}{}",
                    crate::daemon::events::TYPE_PREFIX,
                    event.kind
                )))
                .with_timestamp(u64::try_from(event.time.timestamp()).unwrap_or(0));
            match channel
                .basic_publish(
                    self.settings.events_exchange.as_str().into(),
                    event.kind.as_str().into(),
                    BasicPublishOptions::default(),
                    publication.bytes(),
                    properties,
                )
                .await
            {
                Ok(confirm) => confirms.push(confirm),
                Err(cause) => {
                    failure = Some(error(cause));
                    break;
                }
            }
        }
        let sent = confirms.len();
        for (index, confirm) in confirms.into_iter().enumerate() {
            let outcome = match confirm.await {
                Ok(confirmation) if confirmation.is_ack() => continue,
                Ok(_) => error("the broker refused an event (nack)"),
                Err(cause) => error(cause),
            };
            drop(guard);
            self.broken.notify_one();
            return Err(partial(index, outcome));
        }
        drop(guard);
        match failure {
            Some(failure) => {
                self.broken.notify_one();
                Err(partial(sent, failure))
            }
            None => Ok(()),
        }
    }
}

#[async_trait]
impl OutboundPublisher for AmqpBus {
    async fn publish_outbound(
        &self,
        channel: &str,
        message_id: &str,
        document: &[u8],
    ) -> Result<(), BusError> {
        let properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(PERSISTENT)
            .with_message_id(message_id.into());
        self.publish_confirmed(
            &self.settings.outbound_exchange,
            channel,
            document,
            properties,
        )
        .await
    }
}
