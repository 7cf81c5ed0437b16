//! The routing engine: the one task that owns the router, and the dispatcher that makes each decision
//! durable before anyone hears of it.
//!
//! ```text
//!  requests ─► engine task ─► Router::handle ─► effects ─► (write, effects) ─► dispatcher task
//!  (ingested, agent commands,   timers kept in a TimerQueue            merges what queued into one
//!   reloads, inspections)                                              store commit, then pushes to
//!                                                                      agents and answers callers
//! ```
//!
//! The engine never waits for the disk, so routing keeps its pace; the dispatcher commits in order and
//! retries a failing commit until the store is back, so nothing the router decided is lost and no
//! agent sees an offer the store does not know.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use tokio::sync::{Notify, mpsc, oneshot};
use tracing::{error, info, warn};
use ulid::Ulid;

use super::events;
use super::hub::AgentHub;
use super::metrics::Metrics;
use super::persist::{StoredAgent, StoredConversation, StoredQueue, status_of};
use crate::message::InboundMessage;
use crate::routing::inspect::{AgentSnapshot, ConversationSnapshot, QueueSnapshot, RouterSnapshot};
use crate::routing::{
    AgentId, Command, CommandError, ConversationId, Effect, MessageId, OfferEnd, Presence,
    QueueName, Router, RoutingConfig, TimerQueue, Timestamp, TransferTarget,
};
use crate::store::{
    AgentPush, ConversationStatus, NewEvent, Recovery, RoutingWrite, Store, StoreError,
    UnroutedMessage,
};

/// The wall clock, read only here at the edge: milliseconds since the Unix epoch.
pub fn wall_clock() -> Timestamp {
    Timestamp(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|elapsed| elapsed.as_millis() as u64)
            .unwrap_or(0),
    )
}

fn utc(at: Timestamp) -> DateTime<Utc> {
    DateTime::<Utc>::from_timestamp_millis(at.0 as i64).unwrap_or_default()
}

/// Why an engine request failed.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Command(#[from] CommandError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the routing engine has stopped")]
    Stopped,
    /// Several instances: another instance runs the router now.
    #[error("this instance does not run the router now")]
    NotLeader,
}

/// What an agent (or a system acting for one) asks of the router.
#[derive(Debug, Clone)]
pub enum AgentAction {
    Presence(Presence),
    Disconnected,
    Accept(ConversationId),
    Reject(ConversationId),
    Resolve(ConversationId),
    Transfer(ConversationId, TransferTarget),
    Escalate(ConversationId),
}

/// A stored inbound message, handed to the router.
#[derive(Debug)]
pub struct Ingested {
    pub message_id: Ulid,
    pub conversation_id: Ulid,
    pub contact_id: Option<Ulid>,
    pub new_conversation: bool,
    pub message: InboundMessage,
    /// When intake received it, for the ingest-to-offer latency.
    pub received: Instant,
}

type Inspection = Box<dyn FnOnce(&Router) + Send>;

enum Request {
    Ingested(Box<Ingested>),
    Agent {
        agent: AgentId,
        action: AgentAction,
        reply: oneshot::Sender<Result<(), EngineError>>,
    },
    Reload {
        routing: Box<RoutingConfig>,
        reply: oneshot::Sender<Result<(), EngineError>>,
    },
    /// The customer left before being answered (a chat closed and not resumed in time).
    CustomerLeft {
        conversation: ConversationId,
        reply: oneshot::Sender<Result<(), EngineError>>,
    },
    Inspect(Inspection),
    /// Stored messages not yet routed (several instances: another instance took them in), read
    /// from the store at `read_started`.
    PickUp {
        messages: Vec<UnroutedMessage>,
        read_started: Instant,
    },
    Stop,
}

/// A cheap handle to the engine task.
#[derive(Debug, Clone)]
pub struct EngineHandle {
    requests: mpsc::Sender<Request>,
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Request::Ingested(_) => "Ingested",
            Request::Agent { .. } => "Agent",
            Request::Reload { .. } => "Reload",
            Request::CustomerLeft { .. } => "CustomerLeft",
            Request::Inspect(_) => "Inspect",
            Request::PickUp { .. } => "PickUp",
            Request::Stop => "Stop",
        })
    }
}

impl EngineHandle {
    /// Hands a stored message to the router. Returns once queued (the message is already durable).
    pub async fn ingested(&self, ingested: Ingested) -> Result<(), EngineError> {
        self.requests
            .send(Request::Ingested(Box::new(ingested)))
            .await
            .map_err(|_| EngineError::Stopped)
    }

    /// Runs an agent command; resolves after its consequences are committed (or it was refused).
    pub async fn agent(&self, agent: AgentId, action: AgentAction) -> Result<(), EngineError> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .send(Request::Agent {
                agent,
                action,
                reply,
            })
            .await
            .map_err(|_| EngineError::Stopped)?;
        answer.await.map_err(|_| EngineError::Stopped)?
    }

    /// The customer left before being answered: counted abandoned; resolves after the commit.
    pub async fn customer_left(&self, conversation: ConversationId) -> Result<(), EngineError> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .send(Request::CustomerLeft {
                conversation,
                reply,
            })
            .await
            .map_err(|_| EngineError::Stopped)?;
        answer.await.map_err(|_| EngineError::Stopped)?
    }

    /// Replaces queues, rules and agents, keeping every conversation and agent state.
    pub async fn reload(&self, routing: RoutingConfig) -> Result<(), EngineError> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .send(Request::Reload {
                routing: Box::new(routing),
                reply,
            })
            .await
            .map_err(|_| EngineError::Stopped)?;
        answer.await.map_err(|_| EngineError::Stopped)?
    }

    /// Reads the router's state (runs on the engine task, between two commands).
    pub async fn inspect<T: Send + 'static>(
        &self,
        look: impl FnOnce(&Router) -> T + Send + 'static,
    ) -> Result<T, EngineError> {
        let (reply, answer) = oneshot::channel();
        let inspection: Inspection = Box::new(move |router| {
            let _ = reply.send(look(router));
        });
        self.requests
            .send(Request::Inspect(inspection))
            .await
            .map_err(|_| EngineError::Stopped)?;
        answer.await.map_err(|_| EngineError::Stopped)
    }

    /// Hands stored, unrouted messages to the router (those it is routing already are skipped).
    pub async fn pick_up(
        &self,
        messages: Vec<UnroutedMessage>,
        read_started: Instant,
    ) -> Result<(), EngineError> {
        self.requests
            .send(Request::PickUp {
                messages,
                read_started,
            })
            .await
            .map_err(|_| EngineError::Stopped)
    }

    /// Stops the engine after everything queued before was handled and committed.
    pub async fn stop(&self) {
        let _ = self.requests.send(Request::Stop).await;
    }
}

/// One routing step's consequences, on their way to the store and then to the agents.
struct Step {
    write: RoutingWrite,
    effects: Vec<Effect>,
    reply: Option<oneshot::Sender<Result<(), EngineError>>>,
    /// Arrival time of the inbound message this step routed, for the ingest-to-offer latency.
    received: Option<(ConversationId, Instant)>,
    /// Conversations this step answered: (queue, seconds waited, within the queue's SLA target).
    /// Filled by `send_step`, which can read the queues' targets; counted after the commit.
    answers: Vec<(QueueName, f64, bool)>,
}

/// Everything the engine and dispatcher share with the rest of the daemon.
#[derive(Debug, Clone)]
pub struct EngineContext {
    pub store: Arc<dyn Store>,
    pub hub: Arc<AgentHub>,
    pub metrics: Metrics,
    /// Woken after each commit that wrote events, so the outbox relay publishes promptly.
    pub outbox_written: Arc<Notify>,
    /// The leadership epoch every routing write carries (0 on a single node).
    pub epoch: u64,
    /// Several instances: this node's id. Pushes for agents are then stored with each routing
    /// write (for the instances holding their connections), agents keep their stored presence on
    /// recovery (their desktops may be connected to other instances), and messages handed to the
    /// router are remembered until their routed mark is committed, so a message is routed once
    /// however often it is picked up.
    pub cluster_node: Option<String>,
    /// Woken when the store refused a routing write as fenced (a newer leader exists).
    pub fenced: Arc<Notify>,
}

/// Messages handed to the router in this term: `None` until their routed mark is committed, then
/// when that commit was seen. Pruned once a store read that began after the commit was picked up
/// (that read already saw them routed).
type Handed = Arc<std::sync::Mutex<HashMap<Ulid, Option<Instant>>>>;

/// The engine's tasks: the router's task and the dispatcher.
#[derive(Debug)]
pub struct EngineTasks {
    engine: tokio::task::JoinHandle<()>,
    dispatcher: tokio::task::AbortHandle,
}

impl EngineTasks {
    /// Waits for a stopped engine to finish (its dispatcher commits what was decided).
    pub async fn join(self) {
        let _ = self.engine.await;
    }

    /// Stops routing at once: nothing more is decided or committed by this instance.
    pub fn abort(&self) {
        self.engine.abort();
        self.dispatcher.abort();
    }
}

/// The router's state as stored, read and parsed: what a term restores its router from.
///
/// Reading it is most of a recovery (every open conversation's document). An instance about to
/// take over reads it while the leader's lease runs out, and uses it if no routing write was
/// committed since ([`StoredRouter::is_current`]), so a takeover does not wait for that read.
#[derive(Debug)]
pub struct StoredRouter {
    snapshot: RouterSnapshot,
    unrouted: Vec<UnroutedMessage>,
    /// The store's count of routing writes when this was read (`None`: it keeps none).
    routing_writes: Option<u64>,
}

impl StoredRouter {
    pub async fn read(store: &dyn Store) -> Result<StoredRouter, EngineError> {
        let recovery = store.recovery().await?;
        // Parsing every open conversation's document is CPU work: off the async workers.
        let parsed = tokio::task::spawn_blocking(move || StoredRouter::parse(recovery))
            .await
            .map_err(|error| {
                StoreError::Unavailable(format!("reading the router's state failed: {error}"))
            })?;
        Ok(parsed?)
    }

    fn parse(recovery: Recovery) -> Result<StoredRouter, StoreError> {
        let mut snapshot = RouterSnapshot {
            conversations: Vec::with_capacity(recovery.conversations.len()),
            ..RouterSnapshot::default()
        };
        for (id, document) in &recovery.conversations {
            let stored: StoredConversation = parse_document(document, "conversation", id)?;
            snapshot
                .conversations
                .push(stored.into_snapshot(ConversationId(id.0)));
        }
        drop(recovery.conversations);
        for (id, document) in &recovery.agents {
            let stored: StoredAgent = parse_document(document, "agent", id)?;
            snapshot.agents.push(stored.into_snapshot(id));
        }
        for (name, document) in &recovery.queues {
            let stored: StoredQueue = parse_document(document, "queue", name)?;
            snapshot.queues.push(stored.into_snapshot(name));
        }
        Ok(StoredRouter {
            snapshot,
            unrouted: recovery.unrouted,
            routing_writes: recovery.routing_writes,
        })
    }

    /// No routing write was committed since this was read, so it is still what the store holds.
    /// Asked by the lease holder, after a takeover fenced the previous leader's writes.
    pub async fn is_current(&self, store: &dyn Store) -> Result<bool, StoreError> {
        Ok(match self.routing_writes {
            Some(read) => store.routing_writes().await? == Some(read),
            None => false,
        })
    }
}

/// Restores the router from `stored` and starts the engine. Returns once recovery is committed;
/// messages stored but never routed (a crash between the two) are routed again first.
pub async fn start(
    routing: RoutingConfig,
    context: EngineContext,
    stored: StoredRouter,
) -> Result<(EngineHandle, EngineTasks), EngineError> {
    let StoredRouter {
        mut snapshot,
        unrouted,
        ..
    } = stored;
    let restored_conversations = snapshot.conversations.len();
    let now = wall_clock();
    let mut effects = Vec::new();
    // What is stored, to rewrite only what the restore changes.
    let saved = snapshot.clone();
    if context.cluster_node.is_none() {
        // Agents come back offline until their desktop reconnects; their conversations stay
        // theirs. (A takeover in a cluster keeps presence: the desktops on the other instances
        // are still connected.)
        for agent in &mut snapshot.agents {
            agent.presence = Presence::Offline;
        }
    }
    let router = Router::restore(routing, snapshot, now, &mut effects)?;
    let changed = Changed::since(&router, &saved);
    drop(saved);
    let rewritten = changed.conversations.len();
    let (requests, receiver) = mpsc::channel(4096);
    let (steps, step_receiver) = mpsc::unbounded_channel();
    let handed: Option<Handed> = context.cluster_node.as_ref().map(|_| Handed::default());
    let mut engine = Engine {
        router,
        timers: TimerQueue::new(),
        context: context.clone(),
        steps,
        handed: handed.clone(),
    };
    engine.timers.apply(&effects);
    engine.record(now, effects, Vec::new(), changed, None);
    let replayed = unrouted.len();
    for stored in unrouted {
        match replay(stored) {
            Ok(ingested) => engine.route_ingested(&ingested),
            Err(reason) => error!(%reason, "skipping an unreadable stored message during recovery"),
        }
    }
    info!(
        conversations = restored_conversations,
        rewritten, replayed, "router state recovered"
    );
    let dispatcher = tokio::spawn(dispatch(step_receiver, context, handed));
    let dispatcher_abort = dispatcher.abort_handle();
    let engine_task = tokio::spawn(async move {
        engine.run(receiver).await;
        // Dropping the engine drops its step sender: the dispatcher commits what is left, then ends.
        drop(engine);
        let _ = dispatcher.await;
    });
    Ok((
        EngineHandle { requests },
        EngineTasks {
            engine: engine_task,
            dispatcher: dispatcher_abort,
        },
    ))
}

/// A stored state document, parsed straight into its type.
fn parse_document<'a, T: serde::Deserialize<'a>>(
    document: &'a str,
    what: &str,
    key: &dyn std::fmt::Display,
) -> Result<T, StoreError> {
    serde_json::from_str(document)
        .map_err(|error| StoreError::Corrupt(format!("{what} {key}: {error}")))
}

/// A stored message that was never routed, handed to the router again.
fn replay(unrouted: UnroutedMessage) -> Result<Ingested, String> {
    let stored = unrouted.message;
    let message: InboundMessage = serde_json::from_value(stored.body)
        .map_err(|error| format!("message {}: {error}", stored.id))?;
    Ok(Ingested {
        message_id: stored.id,
        conversation_id: stored.conversation_id,
        contact_id: Some(unrouted.contact_id),
        new_conversation: unrouted.new_conversation,
        message,
        received: Instant::now(),
    })
}

struct Engine {
    router: Router,
    timers: TimerQueue,
    context: EngineContext,
    steps: mpsc::UnboundedSender<Step>,
    /// Several instances: messages handed to the router this term (see [`Handed`]).
    handed: Option<Handed>,
}

impl Engine {
    async fn run(&mut self, mut requests: mpsc::Receiver<Request>) {
        let mut gauges = tokio::time::interval(Duration::from_secs(1));
        loop {
            let sleep = self
                .timers
                .next_deadline()
                .map(|at| Duration::from_millis(at.0.saturating_sub(wall_clock().0)));
            tokio::select! {
                biased;
                request = requests.recv() => match request {
                    Some(Request::Stop) | None => break,
                    Some(request) => self.handle(request),
                },
                _ = tokio::time::sleep(sleep.unwrap_or(Duration::from_secs(3600))), if sleep.is_some() => self.fire_due_timers(),
                _ = gauges.tick() => self.update_gauges(),
            }
        }
        // Finish what was queued before the stop, so nothing acknowledged is left unrouted.
        requests.close();
        while let Ok(request) = requests.try_recv() {
            if !matches!(request, Request::Stop) {
                self.handle(request);
            }
        }
    }

    fn handle(&mut self, request: Request) {
        match request {
            Request::Ingested(ingested) => self.route_ingested(&ingested),
            Request::Agent {
                agent,
                action,
                reply,
            } => {
                let now = wall_clock();
                let (command, presence) = match action {
                    AgentAction::Presence(presence) => (
                        Command::AgentPresence {
                            agent: agent.clone(),
                            presence,
                        },
                        Some((presence, "agent")),
                    ),
                    AgentAction::Disconnected => (
                        Command::AgentDisconnected {
                            agent: agent.clone(),
                        },
                        Some((Presence::Offline, "disconnected")),
                    ),
                    AgentAction::Accept(conversation) => (
                        Command::Accept {
                            agent: agent.clone(),
                            conversation,
                        },
                        None,
                    ),
                    AgentAction::Reject(conversation) => (
                        Command::Reject {
                            agent: agent.clone(),
                            conversation,
                        },
                        None,
                    ),
                    AgentAction::Resolve(conversation) => (
                        Command::Resolve {
                            agent: agent.clone(),
                            conversation,
                        },
                        None,
                    ),
                    AgentAction::Transfer(conversation, to) => (
                        Command::Transfer {
                            agent: agent.clone(),
                            conversation,
                            to,
                        },
                        None,
                    ),
                    AgentAction::Escalate(conversation) => (
                        Command::Escalate {
                            agent: agent.clone(),
                            conversation,
                        },
                        None,
                    ),
                };
                let was = self.router.agent(&agent).map(|view| view.presence);
                match self.run_command(now, command) {
                    Ok(effects) => {
                        let mut extra = Vec::new();
                        if let Some((presence, reason)) = presence
                            && was != Some(presence)
                        {
                            extra.push(events::agent_presence(
                                agent.as_str(),
                                presence,
                                reason,
                                utc(now),
                            ));
                        }
                        let touched = Changed {
                            agents: vec![agent],
                            ..Changed::default()
                        };
                        self.record(now, effects, extra, touched, Some(reply));
                    }
                    Err(error) => {
                        let _ = reply.send(Err(error.into()));
                    }
                }
            }
            Request::CustomerLeft {
                conversation,
                reply,
            } => {
                let now = wall_clock();
                match self.run_command(now, Command::CustomerLeft { conversation }) {
                    Ok(effects) => {
                        self.record(now, effects, Vec::new(), Changed::default(), Some(reply));
                    }
                    Err(error) => {
                        let _ = reply.send(Err(error.into()));
                    }
                }
            }
            Request::Reload { routing, reply } => {
                let now = wall_clock();
                let before = self.router.snapshot();
                match self.run_command(now, Command::ReplaceConfig(routing)) {
                    Ok(effects) => {
                        let changed = Changed::since(&self.router, &before);
                        self.record(now, effects, Vec::new(), changed, Some(reply));
                    }
                    Err(error) => {
                        let _ = reply.send(Err(error.into()));
                    }
                }
            }
            Request::Inspect(look) => look(&self.router),
            Request::PickUp {
                messages,
                read_started,
            } => {
                for stored in messages {
                    match replay(stored) {
                        Ok(ingested) => self.route_ingested(&ingested),
                        Err(reason) => error!(%reason, "skipping an unreadable stored message"),
                    }
                }
                if let Some(handed) = &self.handed
                    && let Ok(mut handed) = handed.lock()
                {
                    handed.retain(|_, committed| committed.is_none_or(|at| at >= read_started));
                }
            }
            Request::Stop => {}
        }
    }

    /// Runs one command through the router, timing it and keeping its timers.
    fn run_command(
        &mut self,
        now: Timestamp,
        command: Command,
    ) -> Result<Vec<Effect>, CommandError> {
        let started = Instant::now();
        let mut effects = Vec::new();
        let result = self.router.handle(now, command, &mut effects);
        self.context
            .metrics
            .routing_decision_seconds
            .observe(started.elapsed().as_secs_f64());
        result?;
        self.timers.apply(&effects);
        Ok(effects)
    }

    /// A stored message reaches the router: a conversation the router holds gets a customer message,
    /// any other is a new arrival (also a conversation the store reopened after the router forgot it).
    fn route_ingested(&mut self, ingested: &Ingested) {
        if let Some(handed) = &self.handed
            && let Ok(mut handed) = handed.lock()
        {
            if handed.contains_key(&ingested.message_id) {
                // Already routed (taken in here, or picked up before): once is enough.
                return;
            }
            handed.insert(ingested.message_id, None);
        }
        let now = wall_clock();
        let conversation = ConversationId(ingested.conversation_id.0);
        let message = MessageId(ingested.message_id.0);
        let mut extra = Vec::new();
        // Replayed messages of a never-routed conversation all say new: the first one announces it.
        if ingested.new_conversation
            && let Some(contact) = ingested.contact_id
            && self.router.conversation(conversation).is_none()
        {
            extra.push(events::conversation_created(
                conversation,
                &ingested.message.channel,
                contact,
                utc(now),
            ));
        }
        let body = serde_json::to_value(&ingested.message).unwrap_or(Value::Null);
        extra.push(events::message_received(conversation, &body, utc(now)));
        let command = if self.router.conversation(conversation).is_some() {
            Command::CustomerMessage {
                conversation,
                message,
                text: ingested.message.text.clone(),
            }
        } else {
            Command::Arrive(Box::new(
                ingested.message.routing_facts(conversation, message),
            ))
        };
        match self.run_command(now, command) {
            Ok(effects) => {
                let received = Some((conversation, ingested.received));
                let mut write = self.routing_write(now, &effects, extra, Changed::default());
                write.routed_messages.push(ingested.message_id);
                self.send_step(Step {
                    write,
                    effects,
                    reply: None,
                    received,
                    answers: Vec::new(),
                });
            }
            Err(error) => {
                error!(%error, conversation = %ingested.conversation_id, "router refused a stored message")
            }
        }
    }

    fn fire_due_timers(&mut self) {
        let now = wall_clock();
        while let Some((_, key)) = self.timers.pop_due(now) {
            match self.run_command(now, Command::TimerFired(key)) {
                Ok(effects) => self.record(now, effects, Vec::new(), Changed::default(), None),
                Err(error) => warn!(%error, "timer refused"),
            }
        }
    }

    /// Sends a step's durable consequences to the dispatcher.
    fn record(
        &mut self,
        now: Timestamp,
        effects: Vec<Effect>,
        extra: Vec<NewEvent>,
        touched: Changed,
        reply: Option<oneshot::Sender<Result<(), EngineError>>>,
    ) {
        let write = self.routing_write(now, &effects, extra, touched);
        self.send_step(Step {
            write,
            effects,
            reply,
            received: None,
            answers: Vec::new(),
        });
    }

    fn send_step(&self, mut step: Step) {
        for effect in &step.effects {
            if let Effect::Assigned { queue, waited, .. } = effect {
                let within_sla = self
                    .router
                    .config()
                    .queue(queue.as_str())
                    .is_none_or(|config| *waited <= config.sla_target);
                step.answers
                    .push((queue.clone(), waited.0 as f64 / 1000.0, within_sla));
            }
        }
        if self.steps.send(step).is_err() {
            error!("dispatcher stopped; a routing step cannot be committed");
        }
    }

    /// The state documents of everything a step touched (its effects' conversations and agents,
    /// and `touched`), and its events.
    fn routing_write(
        &self,
        now: Timestamp,
        effects: &[Effect],
        mut events: Vec<NewEvent>,
        touched: Changed,
    ) -> RoutingWrite {
        let mut conversations: BTreeSet<ConversationId> =
            touched.conversations.into_iter().collect();
        let mut touched_agents: BTreeSet<AgentId> = touched.agents.into_iter().collect();
        let mut queues: BTreeSet<QueueName> = touched.queues.into_iter().collect();
        for effect in effects {
            if let Some(conversation) = effect_conversation(effect) {
                conversations.insert(conversation);
            }
            if let Effect::Resolved { queue, .. } = effect {
                // A new handle time: the queue's estimated waits changed.
                queues.insert(queue.clone());
            }
            if let Some(agent) = effect_agent(effect) {
                touched_agents.insert(agent.clone());
            }
            if let Effect::AgentSetAway { agent, .. } = effect {
                events.push(events::agent_presence(
                    agent.as_str(),
                    Presence::Away,
                    "missed_offers",
                    utc(now),
                ));
            }
            events.extend(events::for_effect(effect, utc(now)));
        }
        let mut write = RoutingWrite {
            events,
            epoch: self.context.epoch,
            ..RoutingWrite::default()
        };
        for conversation in conversations {
            let id = events::conversation_ulid(conversation);
            match self.router.conversation_snapshot(conversation) {
                Some(snapshot) => {
                    let document = serde_json::to_value(StoredConversation::from(&snapshot))
                        .unwrap_or(Value::Null);
                    write
                        .conversations
                        .push((id, status_of(&snapshot.state), document));
                }
                None => write
                    .conversations
                    .push((id, ConversationStatus::Closed, Value::Null)),
            }
        }
        for agent in touched_agents {
            if let Some(snapshot) = self.router.agent_snapshot(&agent) {
                write.agents.push((
                    agent.to_string(),
                    serde_json::to_value(StoredAgent::from(&snapshot)).unwrap_or(Value::Null),
                ));
            }
        }
        for queue in queues {
            if let Some(snapshot) = self.router.queue_snapshot(&queue) {
                write.queues.push((
                    queue.to_string(),
                    serde_json::to_value(StoredQueue::from(&snapshot)).unwrap_or(Value::Null),
                ));
            }
        }
        write
    }

    fn update_gauges(&self) {
        let metrics = &self.context.metrics;
        let mut waiting = 0;
        for queue in self.router.queues() {
            waiting += i64::from(queue.waiting);
            metrics
                .queue_waiting
                .with_label_values(&[queue.name.as_str()])
                .set(i64::from(queue.waiting));
            let oldest = queue
                .oldest_since
                .map_or(0.0, |since| wall_clock().since(since).as_secs_f64());
            metrics
                .queue_oldest_wait
                .with_label_values(&[queue.name.as_str()])
                .set(oldest);
            metrics
                .queue_sla_target
                .with_label_values(&[queue.name.as_str()])
                .set(queue.sla_target.0 as f64 / 1000.0);
            metrics
                .queue_agents_available
                .with_label_values(&[queue.name.as_str()])
                .set(i64::from(queue.agents_available));
        }
        let (mut offered, mut assigned) = (0, 0);
        let (mut load, mut capacity) = (0, 0);
        let mut presence: HashMap<&'static str, i64> = HashMap::from([
            ("available", 0),
            ("away", 0),
            ("offline", 0),
            ("wrap_up", 0),
        ]);
        for agent in self.router.agents() {
            offered += agent.offers.len() as i64;
            assigned += agent.assigned.len() as i64;
            *presence.entry(agent.presence.as_str()).or_default() += 1;
            if agent.wrapping_up {
                *presence.entry("wrap_up").or_default() += 1;
            }
            if agent.presence != Presence::Offline {
                load += i64::from(agent.load_total);
                capacity += i64::from(agent.max_total);
            }
        }
        let total = self.router.conversation_count() as i64;
        metrics
            .conversations
            .with_label_values(&["waiting"])
            .set(waiting);
        metrics
            .conversations
            .with_label_values(&["offered"])
            .set(offered);
        metrics
            .conversations
            .with_label_values(&["assigned"])
            .set(assigned);
        metrics
            .conversations
            .with_label_values(&["resolved"])
            .set((total - waiting - offered - assigned).max(0));
        for (state, count) in presence {
            metrics.agents.with_label_values(&[state]).set(count);
        }
        metrics.agent_load.set(load);
        metrics.agent_capacity.set(capacity);
    }
}

/// Conversations and agents whose stored state must be rewritten beyond what a step's effects name.
#[derive(Debug, Default)]
struct Changed {
    conversations: Vec<ConversationId>,
    agents: Vec<AgentId>,
    queues: Vec<QueueName>,
}

impl Changed {
    /// What differs between the router and `before`: after a restore (restart, new configuration)
    /// only these are rewritten, not every open conversation.
    fn since(router: &Router, before: &RouterSnapshot) -> Changed {
        let saved: HashMap<ConversationId, &ConversationSnapshot> = before
            .conversations
            .iter()
            .map(|conversation| (conversation.id, conversation))
            .collect();
        let conversations = router
            .conversation_ids()
            .filter(|id| router.conversation_snapshot(*id).as_ref() != saved.get(id).copied())
            .collect();
        let saved_agents: HashMap<&AgentId, &AgentSnapshot> = before
            .agents
            .iter()
            .map(|agent| (&agent.id, agent))
            .collect();
        let agents = router
            .agents()
            .map(|view| view.id)
            .filter(|id| router.agent_snapshot(id).as_ref() != saved_agents.get(id).copied())
            .collect();
        let saved_queues: HashMap<&QueueName, &QueueSnapshot> = before
            .queues
            .iter()
            .map(|queue| (&queue.name, queue))
            .collect();
        let queues = router
            .queues()
            .into_iter()
            .map(|view| view.name)
            .filter(|name| router.queue_snapshot(name).as_ref() != saved_queues.get(name).copied())
            .collect();
        Changed {
            conversations,
            agents,
            queues,
        }
    }
}

fn effect_conversation(effect: &Effect) -> Option<ConversationId> {
    match effect {
        Effect::Offered { conversation, .. }
        | Effect::OfferWithdrawn { conversation, .. }
        | Effect::Assigned { conversation, .. }
        | Effect::DeliverToAgent { conversation, .. }
        | Effect::Queued { conversation, .. }
        | Effect::PriorityChanged { conversation, .. }
        | Effect::SlaBreached { conversation, .. }
        | Effect::Escalated { conversation, .. }
        | Effect::Transferred { conversation, .. }
        | Effect::Resolved { conversation, .. }
        | Effect::Reopened { conversation, .. }
        | Effect::Abandoned { conversation, .. }
        | Effect::Closed { conversation }
        | Effect::FollowUp { conversation, .. } => Some(*conversation),
        Effect::AgentSetAway { .. } | Effect::ScheduleTimer { .. } | Effect::CancelTimer { .. } => {
            None
        }
    }
}

fn effect_agent(effect: &Effect) -> Option<&AgentId> {
    match effect {
        Effect::Offered { agent, .. }
        | Effect::OfferWithdrawn { agent, .. }
        | Effect::Assigned { agent, .. }
        | Effect::Resolved { agent, .. }
        | Effect::AgentSetAway { agent, .. }
        | Effect::FollowUp { agent, .. } => Some(agent),
        Effect::Escalated { from_agent, .. } | Effect::Transferred { from_agent, .. } => {
            Some(from_agent)
        }
        _ => None,
    }
}

/// Merges queued steps into one write, taking their writes out of them: the last state of each
/// conversation, agent and queue wins, events and routed marks keep their order.
fn merge(steps: &mut [Step]) -> RoutingWrite {
    let mut merged = RoutingWrite::default();
    let mut conversation_index = HashMap::new();
    let mut agent_index = HashMap::new();
    let mut queue_index = HashMap::new();
    for step in steps {
        let write = std::mem::take(&mut step.write);
        keep_last(
            &mut merged.conversations,
            &mut conversation_index,
            write.conversations,
            |(id, _, _)| *id,
        );
        keep_last(
            &mut merged.agents,
            &mut agent_index,
            write.agents,
            |(id, _)| id.clone(),
        );
        keep_last(
            &mut merged.queues,
            &mut queue_index,
            write.queues,
            |(name, _)| name.clone(),
        );
        merged.routed_messages.extend(write.routed_messages);
        merged.events.extend(write.events);
        merged.epoch = merged.epoch.max(write.epoch);
    }
    merged
}

/// Appends `items` to `merged`, an item whose key is already there replacing it in place.
fn keep_last<T, K: std::hash::Hash + Eq>(
    merged: &mut Vec<T>,
    index: &mut HashMap<K, usize>,
    items: Vec<T>,
    key: impl Fn(&T) -> K,
) {
    for item in items {
        match index.get(&key(&item)) {
            Some(&at) => merged[at] = item,
            None => {
                index.insert(key(&item), merged.len());
                merged.push(item);
            }
        }
    }
}

/// Commits steps in order (merging whatever queued meanwhile) and only then tells anyone about them.
///
/// Telling (pushes to desktops, which may read a message from the store, and the callers'
/// answers) runs beside the commits, in commit order: the next batch's commit does not wait for
/// the last batch's pushes. Both run in this one task, so aborting the dispatcher stops both.
async fn dispatch(
    steps: mpsc::UnboundedReceiver<Step>,
    context: EngineContext,
    handed: Option<Handed>,
) {
    let (committed, to_announce) = mpsc::unbounded_channel();
    tokio::join!(
        commit_steps(steps, &context, handed, committed),
        announce_steps(to_announce, &context),
    );
}

/// Announces committed batches in order, then answers their callers.
async fn announce_steps(
    mut committed: mpsc::UnboundedReceiver<Vec<Step>>,
    context: &EngineContext,
) {
    while let Some(batch) = committed.recv().await {
        for step in batch {
            announce(context, &step).await;
            if let Some(reply) = step.reply {
                let _ = reply.send(Ok(()));
            }
        }
    }
}

/// The commit half of [`dispatch`]: hands each committed batch to `committed`.
async fn commit_steps(
    mut steps: mpsc::UnboundedReceiver<Step>,
    context: &EngineContext,
    handed: Option<Handed>,
    committed: mpsc::UnboundedSender<Vec<Step>>,
) {
    const MAX_MERGED: usize = 1024;
    let mut backoff = Duration::from_millis(50);
    while let Some(first) = steps.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_MERGED {
            match steps.try_recv() {
                Ok(step) => batch.push(step),
                Err(_) => break,
            }
        }
        let mut write = merge(&mut batch);
        if let Some(node) = &context.cluster_node {
            // Agents connected to other instances get these from the store, in commit order.
            write.node = node.clone();
            write.pushes = batch
                .iter()
                .flat_map(|step| step.effects.iter().filter_map(push_for))
                .map(|(agent, document)| AgentPush {
                    agent_id: agent.to_string(),
                    document,
                })
                .collect();
        }
        let write = Arc::new(write);
        let has_events = !write.events.is_empty();
        // The router already decided: the commit must happen. Retry until the store is back.
        loop {
            let started = Instant::now();
            match context.store.apply_routing(Arc::clone(&write)).await {
                Ok(()) => {
                    context
                        .metrics
                        .store_commit_seconds
                        .with_label_values(&["routing"])
                        .observe(started.elapsed().as_secs_f64());
                    backoff = Duration::from_millis(50);
                    break;
                }
                Err(StoreError::Fenced { epoch }) => {
                    error!(
                        epoch,
                        "a newer router leader exists; this instance's routing writes are refused"
                    );
                    context.fenced.notify_one();
                    for step in batch {
                        if let Some(reply) = step.reply {
                            let _ =
                                reply.send(Err(EngineError::Store(StoreError::Fenced { epoch })));
                        }
                    }
                    return;
                }
                Err(error) => {
                    warn!(%error, retry_in_ms = backoff.as_millis() as u64, "routing commit failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        if let Some(handed) = &handed
            && !write.routed_messages.is_empty()
            && let Ok(mut handed) = handed.lock()
        {
            let committed = Some(Instant::now());
            for id in &write.routed_messages {
                handed.insert(*id, committed);
            }
        }
        if has_events {
            context.outbox_written.notify_one();
        }
        if committed.send(batch).is_err() {
            error!("the announcer stopped; committed routing steps are not pushed");
        }
    }
}

/// What an effect pushes to an agent's desktop, if anything. A `message` push names the message;
/// [`complete_push`] adds its body just before it is pushed.
pub fn push_for(effect: &Effect) -> Option<(&AgentId, Value)> {
    let id = |conversation: &ConversationId| events::conversation_ulid(*conversation).to_string();
    match effect {
        Effect::Offered {
            conversation,
            agent,
            queue,
            deadline,
        } => Some((
            agent,
            json!({ "type": "offer", "conversation_id": id(conversation), "queue": queue.as_str(), "deadline": events::millis_to_rfc3339(deadline.0) }),
        )),
        Effect::OfferWithdrawn {
            conversation,
            agent,
            reason,
        } => Some((
            agent,
            json!({ "type": "offer_withdrawn", "conversation_id": id(conversation), "reason": offer_end(reason) }),
        )),
        Effect::Assigned {
            conversation,
            agent,
            queue,
            ..
        } => Some((
            agent,
            json!({ "type": "assigned", "conversation_id": id(conversation), "queue": queue.as_str() }),
        )),
        Effect::DeliverToAgent {
            conversation,
            agent,
            message,
        } => Some((
            agent,
            json!({ "type": "message", "conversation_id": id(conversation), "message_id": Ulid(message.0).to_string() }),
        )),
        Effect::FollowUp {
            conversation,
            agent,
        } => Some((
            agent,
            json!({ "type": "follow_up", "conversation_id": id(conversation), "status": "resolved" }),
        )),
        Effect::AgentSetAway { agent, .. } => Some((
            agent,
            json!({ "type": "presence", "presence": "away", "reason": "missed_offers" }),
        )),
        _ => None,
    }
}

fn offer_end(reason: &OfferEnd) -> &'static str {
    match reason {
        OfferEnd::Rejected => "rejected",
        OfferEnd::TimedOut => "timed_out",
        _ => "withdrawn",
    }
}

/// A push as the desktop gets it: a `message` push carries the stored message (read here, so the
/// stored push and the router's step stay small).
pub async fn complete_push(store: &dyn Store, mut push: Value) -> Value {
    if push["type"] == "message"
        && let Some(id) = push["message_id"]
            .as_str()
            .and_then(|id| id.parse::<Ulid>().ok())
    {
        push["message"] = match store.message(id).await {
            Ok(Some(stored)) => stored.body,
            _ => Value::Null,
        };
    }
    push
}

/// Pushes a committed step's effects to agents' desktops and counts them.
async fn announce(context: &EngineContext, step: &Step) {
    let metrics = &context.metrics;
    let mut offered_now: HashSet<ConversationId> = HashSet::new();
    for effect in &step.effects {
        if let Some((agent, push)) = push_for(effect) {
            let push = complete_push(context.store.as_ref(), push).await;
            context.hub.push(agent, &push);
        }
        match effect {
            Effect::Offered { conversation, .. } => {
                metrics.offers.with_label_values(&["offered"]).inc();
                offered_now.insert(*conversation);
            }
            Effect::OfferWithdrawn { reason, .. } => {
                metrics.offers.with_label_values(&[offer_end(reason)]).inc();
            }
            Effect::Assigned { conversation, .. } => {
                metrics.offers.with_label_values(&["accepted"]).inc();
                offered_now.insert(*conversation);
            }
            Effect::Escalated { .. } => metrics.escalations.inc(),
            Effect::Transferred { .. } => metrics.transfers.inc(),
            Effect::Abandoned { .. } => metrics.abandoned.inc(),
            Effect::SlaBreached { queue, .. } => metrics
                .sla_breaches
                .with_label_values(&[queue.as_str()])
                .inc(),
            _ => {}
        }
    }
    for (queue, waited, within_sla) in &step.answers {
        metrics
            .queue_answer_wait_seconds
            .with_label_values(&[queue.as_str()])
            .observe(*waited);
        metrics
            .queue_answered
            .with_label_values(&[queue.as_str(), if *within_sla { "true" } else { "false" }])
            .inc();
    }
    if let Some((conversation, received)) = step.received
        && offered_now.contains(&conversation)
    {
        metrics
            .ingest_to_offer_seconds
            .observe(received.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::config::{AgentConfig, QueueConfig};
    use crate::routing::{Channel, QueueName};

    fn centre() -> RoutingConfig {
        let mut routing = RoutingConfig::single_queue(QueueConfig::new("support"));
        routing.agents = ["amy", "bo"]
            .into_iter()
            .map(|id| AgentConfig {
                id: AgentId::new(id),
                name: id.into(),
                queues: vec![QueueName::new("support")],
                skills: Vec::new(),
                languages: Vec::new(),
                capacity: vec![(Channel::Chat, 1)],
                max_total: 1,
            })
            .collect();
        routing
    }

    #[allow(clippy::unwrap_used)]
    fn arrive(router: &mut Router, now: Timestamp, id: u128) {
        let message = InboundMessage::new("chat", "webchat", &format!("m{id}"), "c", "hi");
        let facts = message.routing_facts(ConversationId(id), MessageId(id));
        router
            .handle(now, Command::Arrive(Box::new(facts)), &mut Vec::new())
            .unwrap();
    }

    #[test]
    #[allow(clippy::unwrap_used)]
    fn a_restore_that_changes_nothing_rewrites_nothing() {
        let now = Timestamp(1_000);
        let mut router = Router::new(centre(), now, &mut Vec::new()).unwrap();
        arrive(&mut router, now, 1);
        arrive(&mut router, now, 2);
        let saved = router.snapshot();
        let restored = Router::restore(centre(), saved.clone(), now, &mut Vec::new()).unwrap();
        let changed = Changed::since(&restored, &saved);
        assert!(changed.conversations.is_empty(), "{changed:?}");
        assert!(changed.agents.is_empty(), "{changed:?}");
    }

    #[test]
    #[allow(clippy::unwrap_used)]
    fn agents_coming_back_offline_and_their_withdrawn_offers_are_rewritten() {
        let now = Timestamp(1_000);
        let mut router = Router::new(centre(), now, &mut Vec::new()).unwrap();
        router
            .handle(
                now,
                Command::AgentPresence {
                    agent: AgentId::new("amy"),
                    presence: Presence::Available,
                },
                &mut Vec::new(),
            )
            .unwrap();
        arrive(&mut router, now, 1);
        arrive(&mut router, now, 2);
        let saved = router.snapshot();
        let mut offline = saved.clone();
        for agent in &mut offline.agents {
            agent.presence = Presence::Offline;
        }
        let restored = Router::restore(centre(), offline, now, &mut Vec::new()).unwrap();
        let changed = Changed::since(&restored, &saved);
        assert_eq!(changed.agents, vec![AgentId::new("amy")]);
        assert_eq!(changed.conversations, vec![ConversationId(1)]);
    }

    /// A store that does not count routing writes gives no way to know that a state read ahead is
    /// still current, so it is never reused.
    #[tokio::test]
    #[allow(clippy::unwrap_used)]
    async fn a_read_ahead_is_reused_only_where_routing_writes_are_counted() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::sqlite::SqliteStore::open(
            &dir.path().join("store.sqlite"),
            crate::store::sqlite::SqliteOptions::default(),
        )
        .unwrap();
        let stored = StoredRouter::read(&store).await.unwrap();
        assert_eq!(stored.routing_writes, None);
        assert!(!stored.is_current(&store).await.unwrap());
    }
}
