//! Leadership: which instance runs the router, and how the others hand it their work.
//!
//! A single node (SQLite) always leads, under epoch 0. Several instances on one PostgreSQL
//! database elect a leader through the store's lease:
//!
//! ```text
//!  follower ── try_acquire_lease ──► leader (epoch N): recover the router (the restart path),
//!     ▲                                route with epoch N on every write, renew every renew_every,
//!     │                                run the relay, pick up unrouted messages, run forwarded
//!     │                                commands
//!     └── renewal refused, a write fenced, or the lease ran out by our own monotonic clock
//!         (before the store's expiry): stop the router at once
//! ```
//!
//! Every instance takes intake. A message stored by a follower stays "not yet routed"; the leader
//! picks it up, woken by a store notification or, failing that, by its poll. A follower's agent
//! command becomes a durable row the leader runs and answers. The leader stores what it pushes to
//! agents with each routing write; every instance tails those rows for its own connections. The
//! store is the truth, notifications only wake readers.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use chrono::Utc;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::{Notify, broadcast, watch};
use tracing::{debug, error, info, warn};
use ulid::Ulid;

use super::actions::{Actions, AgentCommand, Refusal, RefusalKind};
use super::engine::{
    self, AgentAction, EngineContext, EngineError, EngineHandle, EngineTasks, Ingested,
    StoredRouter,
};
use super::metrics::Metrics;
use super::outbound::Outbound;
use super::relay::{self, EventBus};
use super::views::RouterRead;
use crate::config::ClusterSettings;
use crate::routing::{AgentId, Router, RoutingConfig};
use crate::store::{EventCursor, ForwardedCommand, Lease, OutboxEvent, Store, StoreError, Wakeup};

/// Where the router runs: this instance's engine while it leads, nothing while it follows.
#[derive(Debug, Clone)]
pub struct Leadership {
    inner: Arc<LeadershipInner>,
}

#[derive(Debug)]
struct LeadershipInner {
    engine: RwLock<Option<EngineHandle>>,
    /// The configuration the next term starts with (a reload on a follower lands here).
    routing: Mutex<RoutingConfig>,
    epoch: AtomicU64,
    /// Several instances (PostgreSQL): a follower forwards what it cannot run.
    clustered: bool,
    node: String,
    settings: ClusterSettings,
}

impl Leadership {
    pub fn new(routing: RoutingConfig, clustered: bool, settings: ClusterSettings) -> Leadership {
        Leadership {
            inner: Arc::new(LeadershipInner {
                engine: RwLock::new(None),
                routing: Mutex::new(routing),
                epoch: AtomicU64::new(0),
                clustered,
                node: settings.node_id.clone(),
                settings,
            }),
        }
    }

    pub fn node(&self) -> &str {
        &self.inner.node
    }

    pub fn settings(&self) -> &ClusterSettings {
        &self.inner.settings
    }

    pub fn clustered(&self) -> bool {
        self.inner.clustered
    }

    /// This instance's engine, while it leads.
    pub fn engine(&self) -> Option<EngineHandle> {
        self.inner
            .engine
            .read()
            .ok()
            .and_then(|engine| engine.clone())
    }

    pub fn is_leader(&self) -> bool {
        self.engine().is_some()
    }

    /// The epoch of this instance's current or last term.
    pub fn epoch(&self) -> u64 {
        self.inner.epoch.load(Ordering::SeqCst)
    }

    fn routing(&self) -> RoutingConfig {
        self.inner
            .routing
            .lock()
            .map(|routing| routing.clone())
            .unwrap_or_else(|poisoned| poisoned.into_inner().clone())
    }

    fn set(&self, engine: Option<EngineHandle>, epoch: u64) {
        if let Ok(mut current) = self.inner.engine.write() {
            *current = engine;
        }
        self.inner.epoch.store(epoch, Ordering::SeqCst);
    }

    fn clear(&self) {
        if let Ok(mut current) = self.inner.engine.write() {
            *current = None;
        }
    }

    /// Hands a stored message to the router. On a follower it stays stored as not yet routed and
    /// the leader picks it up (the store woke it with the commit).
    pub async fn ingested(&self, ingested: Ingested) -> Result<(), EngineError> {
        match self.engine() {
            Some(engine) => engine.ingested(ingested).await,
            None if self.inner.clustered => Ok(()),
            None => Err(EngineError::Stopped),
        }
    }

    pub async fn agent(&self, agent: AgentId, action: AgentAction) -> Result<(), EngineError> {
        self.engine()
            .ok_or(EngineError::NotLeader)?
            .agent(agent, action)
            .await
    }

    /// The customer left before being answered; only the leader routes.
    pub async fn customer_left(
        &self,
        conversation: crate::routing::ConversationId,
    ) -> Result<(), EngineError> {
        self.engine()
            .ok_or(EngineError::NotLeader)?
            .customer_left(conversation)
            .await
    }

    /// Reads the router's state; only the leader has it.
    pub async fn inspect<T: Send + 'static>(
        &self,
        look: impl FnOnce(&Router) -> T + Send + 'static,
    ) -> Result<T, EngineError> {
        self.engine()
            .ok_or(EngineError::NotLeader)?
            .inspect(look)
            .await
    }

    /// Replaces queues, rules and agents: in the running router, and for every later term.
    pub async fn reload(&self, routing: RoutingConfig) -> Result<(), EngineError> {
        if let Some(engine) = self.engine() {
            engine.reload(routing.clone()).await?;
        }
        if let Ok(mut current) = self.inner.routing.lock() {
            *current = routing;
        }
        Ok(())
    }
}

/// A forwarded agent command as stored (`agent_commands.command`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Forwarded {
    Command(AgentCommand),
    /// The agent's last desktop connection (on the follower) closed.
    Disconnected,
    /// A read of the router's live state (views for agents and supervisors).
    Read(RouterRead),
    /// A chat's customer left before being answered (their socket was on the follower).
    CustomerLeft {
        conversation: Ulid,
    },
}

/// The leader's answer to a forwarded command (`agent_commands.answer`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ForwardedAnswer {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refusal: Option<ForwardedRefusal>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ForwardedRefusal {
    pub kind: String,
    pub code: String,
    pub message: String,
}

impl From<Result<Value, Refusal>> for ForwardedAnswer {
    fn from(result: Result<Value, Refusal>) -> Self {
        match result {
            Ok(value) => ForwardedAnswer {
                ok: true,
                result: Some(value),
                refusal: None,
            },
            Err(refusal) => ForwardedAnswer {
                ok: false,
                result: None,
                refusal: Some(ForwardedRefusal {
                    kind: kind_name(refusal.kind).to_owned(),
                    code: refusal.code.to_owned(),
                    message: refusal.message,
                }),
            },
        }
    }
}

impl ForwardedAnswer {
    fn into_result(self) -> Result<Value, Refusal> {
        match (self.ok, self.refusal) {
            (true, _) => Ok(self.result.unwrap_or(Value::Null)),
            (false, Some(refusal)) => Err(Refusal::new(
                kind_from(&refusal.kind),
                known_code(&refusal.code),
                refusal.message,
            )),
            (false, None) => Err(Refusal::new(
                RefusalKind::Unavailable,
                "leader_refused",
                "the leader refused the command without a reason",
            )),
        }
    }
}

fn kind_name(kind: RefusalKind) -> &'static str {
    match kind {
        RefusalKind::Malformed => "malformed",
        RefusalKind::Invalid => "invalid",
        RefusalKind::NotFound => "not_found",
        RefusalKind::Conflict => "conflict",
        RefusalKind::Unauthorized => "unauthorized",
        RefusalKind::Forbidden => "forbidden",
        RefusalKind::Unavailable => "unavailable",
    }
}

fn kind_from(name: &str) -> RefusalKind {
    match name {
        "malformed" => RefusalKind::Malformed,
        "invalid" => RefusalKind::Invalid,
        "not_found" => RefusalKind::NotFound,
        "conflict" => RefusalKind::Conflict,
        "unauthorized" => RefusalKind::Unauthorized,
        "forbidden" => RefusalKind::Forbidden,
        _ => RefusalKind::Unavailable,
    }
}

/// The codes an agent command can be refused with (a refusal's code is a fixed word).
/// How long past a live lease's reported end a follower asks again: the expiry is judged by the
/// store's clock when the next attempt arrives, so arriving a moment late is enough.
const LEASE_EXPIRY_SLACK: Duration = Duration::from_millis(20);

const COMMAND_CODES: &[&str] = &[
    "unknown_agent",
    "unknown_conversation",
    "unknown_queue",
    "not_offered",
    "not_owner",
    "no_next_tier",
    "transfer_to_self",
    "queue_rejects_channel",
    "duplicate_conversation",
    "invalid_config",
    "bad_presence",
    "bad_transfer",
    "bad_command",
    "bad_id",
    "empty_reply",
    "not_found",
    "superseded",
    "store_unavailable",
    "shutting_down",
    "not_leader",
    "leader_unavailable",
];

fn known_code(code: &str) -> &'static str {
    COMMAND_CODES
        .iter()
        .find(|known| **known == code)
        .copied()
        .unwrap_or("leader_refused")
}

/// Sends a follower's command to the leader through the store and waits for its answer.
pub async fn forward(
    store: &dyn Store,
    leadership: &Leadership,
    agent: &AgentId,
    command: Forwarded,
) -> Result<Value, Refusal> {
    let unavailable =
        |why: String| Refusal::new(RefusalKind::Unavailable, "leader_unavailable", why);
    let settings = leadership.settings();
    let id = Ulid::new();
    // Listen before storing the command, so its answer's notification cannot be missed.
    let mut wakeups = store.wakeups();
    let document = serde_json::to_value(&command)
        .map_err(|error| unavailable(format!("cannot encode the command: {error}")))?;
    store
        .forward_command(ForwardedCommand {
            id,
            node: leadership.node().to_owned(),
            agent_id: agent.to_string(),
            command: document,
            created_at: Utc::now(),
        })
        .await?;
    let deadline = Instant::now() + settings.command_timeout;
    loop {
        if let Some(answer) = store.command_answer(id).await? {
            let answer: ForwardedAnswer = serde_json::from_value(answer)
                .map_err(|error| unavailable(format!("unreadable answer: {error}")))?;
            return answer.into_result();
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(unavailable(format!(
                "the router's leader did not answer within {} ms; retry",
                settings.command_timeout.as_millis()
            )));
        }
        woken(
            &mut wakeups,
            |wakeup| *wakeup == Wakeup::Answer(id),
            settings.poll_every.min(left),
        )
        .await;
    }
}

/// Waits until a wanted notification (or a resync) arrives, or `limit` passed.
async fn woken(
    wakeups: &mut Option<broadcast::Receiver<Wakeup>>,
    wanted: impl Fn(&Wakeup) -> bool,
    limit: Duration,
) {
    let Some(receiver) = wakeups else {
        tokio::time::sleep(limit).await;
        return;
    };
    let _ = tokio::time::timeout(limit, async {
        loop {
            match receiver.recv().await {
                Ok(wakeup) if wanted(&wakeup) || wakeup == Wakeup::Resync => return,
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(_)) => return,
                Err(broadcast::error::RecvError::Closed) => std::future::pending::<()>().await,
            }
        }
    })
    .await;
    // What else queued is covered by the read that follows.
    while receiver.try_recv().is_ok() {}
}

/// Everything a term of leadership starts: the engine, the relay, and (several instances) the
/// readers of forwarded work.
#[derive(Clone)]
pub struct TermContext {
    pub leadership: Leadership,
    pub engine: EngineContext,
    pub outbound: Outbound,
    pub buses: Vec<Arc<dyn EventBus>>,
    pub source: String,
    /// Runs forwarded commands (set once the actions exist).
    pub actions: Arc<std::sync::OnceLock<Actions>>,
}

impl std::fmt::Debug for TermContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TermContext")
            .field("node", &self.leadership.node())
            .finish()
    }
}

/// One term of leadership: what runs while this instance leads.
#[derive(Debug)]
pub struct Term {
    engine: EngineHandle,
    tasks: EngineTasks,
    relay: tokio::task::JoinHandle<()>,
    stop_relay: watch::Sender<bool>,
    readers: Vec<tokio::task::JoinHandle<()>>,
    fenced: Arc<Notify>,
}

impl Term {
    /// Recovers the router (the restart path: timers keep their deadlines), starts routing with
    /// `epoch` on every write, the relay, and (several instances) the readers of forwarded work.
    pub async fn begin(
        context: &TermContext,
        epoch: u64,
        stored: StoredRouter,
    ) -> Result<Term, EngineError> {
        let fenced = Arc::new(Notify::new());
        let engine_context = EngineContext {
            epoch,
            fenced: fenced.clone(),
            ..context.engine.clone()
        };
        let store = engine_context.store.clone();
        let (engine, tasks) =
            engine::start(context.leadership.routing(), engine_context.clone(), stored).await?;
        context.leadership.set(Some(engine.clone()), epoch);
        // Replies stored but not sent (a crash, or a previous leader's) are sent again.
        match store.pending_replies().await {
            Ok(replies) => {
                for reply in replies {
                    context.outbound.deliver(reply);
                }
            }
            Err(error) => warn!(%error, "cannot read pending replies; they are sent next term"),
        }
        let (stop_relay, relay_stopped) = watch::channel(false);
        let relay = tokio::spawn(relay::run(
            store.clone(),
            context.buses.clone(),
            engine_context.outbox_written.clone(),
            context.source.clone(),
            engine_context.metrics.clone(),
            relay_stopped,
        ));
        let mut readers = Vec::new();
        if context.leadership.clustered() {
            let poll = context.leadership.settings().poll_every;
            readers.push(tokio::spawn(pick_up_unrouted(
                store.clone(),
                engine.clone(),
                poll,
            )));
            readers.push(tokio::spawn(run_forwarded_commands(
                store.clone(),
                context.actions.clone(),
                context.leadership.settings().clone(),
            )));
        }
        Ok(Term {
            engine,
            tasks,
            relay,
            stop_relay,
            readers,
            fenced,
        })
    }

    /// Graceful end (shutdown): the router finishes what it was asked and commits it, the relay
    /// publishes what it can within `grace`.
    pub async fn finish(self, leadership: &Leadership, grace: Duration) {
        for reader in &self.readers {
            reader.abort();
        }
        self.engine.stop().await;
        self.tasks.join().await;
        leadership.clear();
        let _ = self.stop_relay.send(true);
        let _ = tokio::time::timeout(grace, self.relay).await;
    }

    /// Ends the term at once (leadership lost): nothing more is decided, committed or published
    /// by this instance.
    pub fn abort(self, leadership: &Leadership) {
        leadership.clear();
        self.tasks.abort();
        self.relay.abort();
        for reader in &self.readers {
            reader.abort();
        }
    }
}

/// The leader: routes messages other instances stored, oldest first, woken by their commits.
async fn pick_up_unrouted(store: Arc<dyn Store>, engine: EngineHandle, poll: Duration) {
    const BATCH: usize = 4096;
    let mut wakeups = store.wakeups();
    loop {
        let read_started = Instant::now();
        match store.unrouted(BATCH).await {
            Ok(messages) if !messages.is_empty() => {
                if engine.pick_up(messages, read_started).await.is_err() {
                    return;
                }
            }
            Ok(_) => {}
            Err(error) => warn!(%error, "cannot read unrouted messages; retrying"),
        }
        woken(&mut wakeups, |wakeup| *wakeup == Wakeup::Inbound, poll).await;
    }
}

/// The leader: runs the commands followers forwarded, in the order they were stored, and answers.
async fn run_forwarded_commands(
    store: Arc<dyn Store>,
    actions: Arc<std::sync::OnceLock<Actions>>,
    settings: ClusterSettings,
) {
    let mut wakeups = store.wakeups();
    loop {
        match store.open_commands(256).await {
            Ok(commands) => {
                // One agent's commands run in the order they were stored; different agents' run
                // side by side, so a burst from one desk does not hold up every other agent.
                let mut by_agent: Vec<Vec<ForwardedCommand>> = Vec::new();
                let mut group_of: HashMap<String, usize> = HashMap::new();
                for command in commands {
                    let next = by_agent.len();
                    let group = *group_of.entry(command.agent_id.clone()).or_insert(next);
                    if group == next {
                        by_agent.push(Vec::new());
                    }
                    by_agent[group].push(command);
                }
                let runs = by_agent.into_iter().map(|commands| {
                    let (store, actions, settings) = (&store, &actions, &settings);
                    async move {
                        for command in commands {
                            let answer = match actions.get() {
                                Some(actions) => run_forwarded(actions, &command, settings).await,
                                None => Err(Refusal::new(
                                    RefusalKind::Unavailable,
                                    "leader_unavailable",
                                    "the leader is starting",
                                )),
                            };
                            let answer = serde_json::to_value(ForwardedAnswer::from(answer))
                                .unwrap_or(Value::Null);
                            if let Err(error) = store.answer_command(command.id, answer).await {
                                // The agent's later commands wait for it: their order holds.
                                warn!(%error, "cannot store a command's answer; it runs again");
                                break;
                            }
                        }
                    }
                });
                futures_util::future::join_all(runs).await;
            }
            Err(error) => warn!(%error, "cannot read forwarded commands; retrying"),
        }
        woken(
            &mut wakeups,
            |wakeup| *wakeup == Wakeup::Commands,
            settings.poll_every,
        )
        .await;
    }
}

async fn run_forwarded(
    actions: &Actions,
    command: &ForwardedCommand,
    settings: &ClusterSettings,
) -> Result<Value, Refusal> {
    let age = Utc::now().signed_duration_since(command.created_at);
    if age.to_std().unwrap_or_default() > settings.command_timeout {
        // Its instance answered 503 already: running it now would act on a command the agent
        // was told failed.
        return Err(Refusal::new(
            RefusalKind::Unavailable,
            "leader_unavailable",
            "the command expired before the leader could run it",
        ));
    }
    let agent = AgentId::new(&command.agent_id);
    let forwarded: Forwarded = serde_json::from_value(command.command.clone())
        .map_err(|error| Refusal::new(RefusalKind::Invalid, "bad_command", error.to_string()))?;
    match forwarded {
        Forwarded::Command(command) => actions.agent_command_here(&agent, command).await,
        Forwarded::Disconnected => {
            actions
                .engine
                .agent(agent, AgentAction::Disconnected)
                .await?;
            Ok(Value::Null)
        }
        Forwarded::Read(read) => Ok(actions
            .engine
            .inspect(move |router| read.answer(router, engine::wall_clock()))
            .await?),
        Forwarded::CustomerLeft { conversation } => {
            actions.customer_left_here(conversation).await?;
            Ok(Value::Null)
        }
    }
}

/// Where a tail of `what` starts, read from the store, retrying every `poll` until it answers.
async fn starting_point<T, F, Fut>(what: &str, poll: Duration, read: F) -> T
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<T, StoreError>>,
{
    loop {
        match read().await {
            Ok(start) => return start,
            Err(error) => {
                warn!(%error, "cannot read where {what} stand; retrying");
                tokio::time::sleep(poll).await;
            }
        }
    }
}

/// Every instance of a cluster: pushes the leader stored for agents connected here.
async fn tail_pushes(store: Arc<dyn Store>, context: EngineContext, poll: Duration) {
    const BATCH: usize = 1024;
    let node = context.cluster_node.clone().unwrap_or_default();
    let mut cursor = starting_point("pushes", poll, || store.latest_push()).await;
    let mut wakeups = store.wakeups();
    loop {
        match store.pushes_after(cursor, BATCH).await {
            Ok(pushes) => {
                let full = pushes.len() == BATCH;
                for push in pushes {
                    cursor = push.position;
                    let agent = AgentId::new(&push.agent_id);
                    // The leader pushed to its own connections itself, before storing nothing
                    // else: only another instance's pushes are for us.
                    if push.origin != node && context.hub.is_connected(&agent) {
                        let document = engine::complete_push(store.as_ref(), push.document).await;
                        context.hub.push(&agent, &document);
                    }
                }
                if full {
                    continue;
                }
            }
            Err(error) => warn!(%error, "cannot read pushes; retrying"),
        }
        woken(&mut wakeups, |wakeup| *wakeup == Wakeup::Pushes, poll).await;
    }
}

/// The in-process event bus: committed events, as [`follow_events`] reads them from the store,
/// handed to the subscribers in this process (customer chats, the supervisor feed, the email
/// acknowledgements), each the same shared event. They are the store's typed events, not
/// CloudEvents documents: that wire format is the relay's, for brokers, and building one per
/// event for subscribers that read three fields cost the daemon about 5 % of its CPU.
#[derive(Debug, Clone)]
pub struct InProcessBus {
    sender: broadcast::Sender<Arc<OutboxEvent>>,
}

impl InProcessBus {
    pub fn new() -> InProcessBus {
        InProcessBus {
            sender: broadcast::channel(4096).0,
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<OutboxEvent>> {
        self.sender.subscribe()
    }

    /// Hands an event to every subscriber; having none is not an error.
    pub fn deliver(&self, event: Arc<OutboxEvent>) {
        let _ = self.sender.send(event);
    }
}

impl Default for InProcessBus {
    fn default() -> Self {
        InProcessBus::new()
    }
}

/// Where [`follow_events`] starts: the end of the committed events now, and the store's
/// notifications from before it was read (so none after it is missed).
#[derive(Debug)]
pub struct EventsFollowed {
    wakeups: Option<broadcast::Receiver<Wakeup>>,
    cursor: EventCursor,
}

impl EventsFollowed {
    pub async fn from_now(store: &dyn Store) -> Result<EventsFollowed, StoreError> {
        let wakeups = store.wakeups();
        let cursor = store.events_end().await?;
        Ok(EventsFollowed { wakeups, cursor })
    }
}

/// Every instance, a single node too: the committed events, followed from the store and handed
/// to this instance's subscribers (customer chats, the supervisor feed) whichever instance wrote
/// them. Following the store rather than the outbox relay, they hear of events at once even while
/// a broker is down and the relay waits to publish.
pub async fn follow_events(
    store: Arc<dyn Store>,
    start: EventsFollowed,
    committed: InProcessBus,
    poll: Duration,
) {
    const BATCH: usize = 1024;
    /// How soon to look again when committed events wait behind a transaction still running.
    const HELD_BACK_RETRY: Duration = Duration::from_millis(10);
    /// The shortest time between two reads. Under load the store commits every fraction of a
    /// millisecond; reading after each commit would cost the writer and the router CPU for nothing
    /// a customer could notice, so commits meanwhile are read together.
    const COALESCE: Duration = Duration::from_millis(5);
    let EventsFollowed {
        mut wakeups,
        mut cursor,
    } = start;
    loop {
        let mut wait = poll;
        let read_at = Instant::now();
        match store.events_after(cursor, BATCH).await {
            Ok(page) => {
                let full = page.events.len() == BATCH;
                cursor = page.next;
                for event in page.events {
                    committed.deliver(Arc::new(event));
                }
                if full {
                    continue;
                }
                if page.held_back {
                    wait = HELD_BACK_RETRY;
                }
            }
            Err(error) => warn!(%error, "cannot read committed events; retrying"),
        }
        woken(&mut wakeups, |wakeup| *wakeup == Wakeup::Events, wait).await;
        tokio::time::sleep_until((read_at + COALESCE).into()).await;
        // The next read sees every commit announced so far.
        if let Some(receiver) = &mut wakeups {
            while receiver.try_recv().is_ok() {}
        }
    }
}

/// Every instance of a cluster: its heartbeat, the forwarding backlog gauge, and (the leader) old
/// rows pruned.
async fn heartbeat(
    store: Arc<dyn Store>,
    leadership: Leadership,
    metrics: Metrics,
    address: String,
) {
    const KEEP: Duration = Duration::from_secs(600);
    let started_at = Utc::now();
    let mut ticks = tokio::time::interval(leadership.settings().renew_every);
    let mut pruned = Instant::now();
    loop {
        ticks.tick().await;
        if let Err(error) = store
            .heartbeat(leadership.node(), &address, started_at)
            .await
        {
            warn!(%error, "cannot record this instance's heartbeat");
        }
        if let Ok(backlog) = store.forwarding_backlog().await {
            metrics
                .cluster_forwarding_backlog
                .set(i64::try_from(backlog).unwrap_or(i64::MAX));
        }
        if leadership.is_leader() && pruned.elapsed() > Duration::from_secs(60) {
            pruned = Instant::now();
            if let Err(error) = store.prune_cluster(KEEP).await {
                warn!(%error, "cannot prune old cluster rows");
            }
        }
    }
}

/// Runs a cluster member until `stop`: follows, takes the lease when it is free, leads until the
/// lease is lost, follows again. On stop a leader ends its term gracefully and releases the lease
/// so another instance takes over without waiting for it to expire.
pub async fn run(
    context: TermContext,
    address: String,
    grace: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let leadership = context.leadership.clone();
    let store = context.engine.store.clone();
    let metrics = context.engine.metrics.clone();
    let settings = leadership.settings().clone();
    let background = [
        tokio::spawn(heartbeat(
            store.clone(),
            leadership.clone(),
            metrics.clone(),
            address,
        )),
        tokio::spawn(tail_pushes(
            store.clone(),
            context.engine.clone(),
            settings.poll_every,
        )),
    ];
    metrics.cluster_leader.set(0);
    // A lease renewed on time has at least this much left; less means the holder missed a renewal.
    let renewed_on_time = settings
        .lease_ttl
        .saturating_sub(settings.renew_every + settings.renew_every / 2);
    let mut prepared: Option<Prepared> = None;
    while !*stop.borrow() {
        // Measured before asking: the store's expiry is later than what we count from here.
        let asked = Instant::now();
        match store
            .try_acquire_lease(leadership.node(), settings.lease_ttl)
            .await
        {
            Ok(Some(epoch)) => {
                lead(&context, epoch, asked, grace, prepared.take(), &mut stop).await;
                continue;
            }
            Ok(None) => {}
            Err(error) => warn!(%error, "cannot read the router's lease"),
        }
        // Retry as soon as the holder's lease runs out (a dead leader's ends at its expiry), at
        // the latest after renew_every: waiting a whole interval past the expiry would add up to
        // renew_every to every failover. Look again when the lease would show a missed renewal.
        let retry_in = match store.lease().await {
            Ok(Lease {
                remaining: Some(left),
                ..
            }) => {
                if left < renewed_on_time {
                    // The holder may be gone: read the router's state while its lease runs out.
                    prepared.get_or_insert_with(|| Prepared::start(store.clone()));
                } else if prepared.take().is_some() {
                    debug!("the lease was renewed after all: the state read ahead is dropped");
                }
                let stale_in = left.saturating_sub(renewed_on_time);
                let mut retry_in = (left + LEASE_EXPIRY_SLACK).min(settings.renew_every);
                if !stale_in.is_zero() {
                    retry_in = retry_in.min(stale_in + LEASE_EXPIRY_SLACK);
                }
                retry_in
            }
            Ok(_) | Err(_) => settings.renew_every,
        };
        tokio::select! {
            _ = tokio::time::sleep(retry_in) => {}
            _ = stop.changed() => {}
        }
    }
    for task in background {
        task.abort();
    }
}

/// The router's state, being read ahead of a takeover while the holder's lease runs out (see
/// [`StoredRouter`]). Dropping it stops the read.
struct Prepared {
    reading: tokio::task::JoinHandle<Result<StoredRouter, EngineError>>,
}

impl Prepared {
    fn start(store: Arc<dyn Store>) -> Prepared {
        debug!("the router's lease was not renewed on time: reading the router's state ahead");
        Prepared {
            reading: tokio::spawn(async move { StoredRouter::read(store.as_ref()).await }),
        }
    }

    /// What was read ahead if it is still what the store holds (asked once this instance holds the
    /// lease), else the state read now; `true` with what was read ahead.
    async fn or_read_now(
        prepared: Option<Prepared>,
        store: &dyn Store,
        metrics: &Metrics,
    ) -> Result<(StoredRouter, bool), EngineError> {
        if let Some(mut prepared) = prepared {
            match (&mut prepared.reading).await {
                Ok(Ok(stored)) => match stored.is_current(store).await {
                    Ok(true) => {
                        metrics.cluster_takeovers_read_ahead.inc();
                        return Ok((stored, true));
                    }
                    Ok(false) => info!("the old leader wrote after the read ahead: reading again"),
                    Err(error) => warn!(%error, "cannot tell if the read ahead is current"),
                },
                Ok(Err(error)) => warn!(%error, "reading ahead failed"),
                Err(error) => warn!(%error, "reading ahead stopped"),
            }
        }
        Ok((StoredRouter::read(store).await?, false))
    }
}

impl Drop for Prepared {
    fn drop(&mut self) {
        self.reading.abort();
    }
}

/// One term as leader, until the lease is lost or the instance stops.
async fn lead(
    context: &TermContext,
    epoch: u64,
    asked: Instant,
    grace: Duration,
    prepared: Option<Prepared>,
    stop: &mut watch::Receiver<bool>,
) {
    let leadership = &context.leadership;
    let store = context.engine.store.clone();
    let metrics = &context.engine.metrics;
    let settings = leadership.settings().clone();
    // Step down a margin before the store's expiry, so we stop routing before anyone may take
    // over (clocks may run at slightly different rates; stopping takes a moment).
    let margin = settings.lease_ttl / 4;
    let (valid_tx, mut valid_until) = watch::channel(asked + settings.lease_ttl - margin);
    let lost = Arc::new(AtomicBool::new(false));
    let renewer = tokio::spawn(renew(
        store.clone(),
        leadership.node().to_owned(),
        epoch,
        settings.clone(),
        margin,
        valid_tx,
        lost.clone(),
    ));
    info!(
        epoch,
        node = leadership.node(),
        "took the router's lease: recovering the router"
    );
    let started = Instant::now();
    // Recovery runs to its end (the renewer keeps the lease meanwhile): a term half started would
    // leave tasks behind. Its writes carry the epoch, so a term that lost the lease meanwhile
    // commits nothing, and ends just below.
    let begun = match Prepared::or_read_now(prepared, store.as_ref(), metrics).await {
        Ok((stored, read_ahead)) => Term::begin(context, epoch, stored)
            .await
            .map(|term| (term, read_ahead)),
        Err(error) => Err(error),
    };
    let (term, read_ahead) = match begun {
        Ok(begun) => begun,
        Err(error) => {
            renewer.abort();
            error!(%error, epoch, "cannot recover the router; releasing the lease");
            let _ = store.release_lease(leadership.node(), epoch).await;
            return;
        }
    };
    metrics.cluster_leader.set(1);
    metrics
        .cluster_epoch
        .set(i64::try_from(epoch).unwrap_or(i64::MAX));
    metrics.cluster_failovers.inc();
    info!(
        epoch,
        recovered_ms = started.elapsed().as_millis() as u64,
        read_ahead,
        "routing as the leader"
    );
    let fenced = term.fenced.clone();
    let reason = tokio::select! {
        _ = expiry(&mut valid_until) => {
            if lost.load(Ordering::SeqCst) { "another instance took the lease" } else { "the lease ran out before it was renewed" }
        }
        _ = fenced.notified() => "a routing write was fenced: a newer leader exists",
        _ = stop.changed() => {
            renewer.abort();
            term.finish(leadership, grace).await;
            metrics.cluster_leader.set(0);
            let _ = store.release_lease(leadership.node(), epoch).await;
            info!(epoch, "stopped leading: released the lease");
            return;
        }
    };
    renewer.abort();
    term.abort(leadership);
    metrics.cluster_leader.set(0);
    warn!(epoch, reason, "stepped down: following");
}

/// Resolves once the lease's validity by our own clock has passed.
async fn expiry(valid_until: &mut watch::Receiver<Instant>) {
    loop {
        let until = *valid_until.borrow_and_update();
        tokio::select! {
            _ = tokio::time::sleep_until(until.into()) => {
                if *valid_until.borrow() <= Instant::now() {
                    return;
                }
            }
            changed = valid_until.changed() => if changed.is_err() {
                // The renewer stopped (the lease was taken): wait out what is left.
                tokio::time::sleep_until(until.into()).await;
                return;
            },
        }
    }
}

/// Renews the lease every `renew_every`; each success extends its validity by our own clock,
/// counted from just before the renewal was sent. Ends (validity no longer extended) when another
/// instance took the lease.
async fn renew(
    store: Arc<dyn Store>,
    node: String,
    epoch: u64,
    settings: ClusterSettings,
    margin: Duration,
    valid_until: watch::Sender<Instant>,
    lost: Arc<AtomicBool>,
) {
    let mut ticks = tokio::time::interval(settings.renew_every);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        let asked = Instant::now();
        match store.renew_lease(&node, epoch, settings.lease_ttl).await {
            Ok(true) => {
                let _ = valid_until.send(asked + settings.lease_ttl - margin);
            }
            Ok(false) => {
                lost.store(true, Ordering::SeqCst);
                // Validity ends now: step down at once.
                let _ = valid_until.send(Instant::now());
                return;
            }
            Err(error) => warn!(%error, epoch, "cannot renew the lease; retrying"),
        }
    }
}
