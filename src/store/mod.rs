//! Durable state behind one trait: messages, contacts, conversations, routing state and the event outbox.
//!
//! Every backend (SQLite embedded, PostgreSQL for scale-out) implements [`Store`] with the same
//! semantics, proven by the shared conformance suite in `tests/store_conformance.rs`. Writes are
//! group-committed: many callers' writes share one transaction and one fsync, and each caller's
//! future resolves only after that commit, so "acknowledged" always means "durable".

pub mod postgres;
pub mod sqlite;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use ulid::Ulid;

use crate::message::InboundMessage;

/// Why a store operation failed. Callers map `Unavailable` to "retry later" (HTTP 503, SMTP 451,
/// bus nack) and never acknowledge the input.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot commit right now (disk full, read-only, busy, connection lost).
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The request contradicts stored data (e.g. an unknown conversation).
    #[error("not found: {0}")]
    NotFound(String),
    /// A write from a router whose leadership epoch is no longer current (scale-out fencing).
    #[error("fenced: epoch {epoch} is stale")]
    Fenced { epoch: u64 },
    /// Stored data could not be read back (a bug or a damaged database).
    #[error("corrupt data: {0}")]
    Corrupt(String),
}

/// Where a conversation stands, as far as matching new messages is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConversationStatus {
    /// Unanswered or assigned: new messages from the customer join it.
    Open,
    /// Resolved but within its reopen window: a new message joins it and the router reopens it.
    Resolved,
    /// Finished for good (reopen window passed, or abandoned): a new message starts a new conversation.
    Closed,
}

impl ConversationStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ConversationStatus::Open => "open",
            ConversationStatus::Resolved => "resolved",
            ConversationStatus::Closed => "closed",
        }
    }

    pub fn parse(text: &str) -> Option<ConversationStatus> {
        match text {
            "open" => Some(ConversationStatus::Open),
            "resolved" => Some(ConversationStatus::Resolved),
            "closed" => Some(ConversationStatus::Closed),
            _ => None,
        }
    }
}

/// What became of an inbound message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IngestOutcome {
    /// Stored for the first time, in this conversation.
    Stored {
        message_id: Ulid,
        conversation_id: Ulid,
        contact_id: Ulid,
        new_conversation: bool,
    },
    /// Seen before (same channel and provider_message_id): nothing was written.
    Duplicate {
        message_id: Ulid,
        conversation_id: Ulid,
    },
}

/// A stored message, either direction.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredMessage {
    pub id: Ulid,
    pub conversation_id: Ulid,
    pub direction: Direction,
    pub channel: String,
    pub provider: String,
    pub provider_message_id: Option<String>,
    pub from_address: String,
    pub to_address: String,
    /// Inbound: the full `switchboard.message.v1`. Outbound: the reply as sent.
    pub body: serde_json::Value,
    pub created_at: DateTime<Utc>,
    /// Outbound only: `pending`, `sent`, `delivered`, `failed`.
    pub delivery_status: Option<String>,
    /// Outbound only: the agent who wrote it.
    pub agent_id: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Inbound,
    Outbound,
}

/// A conversation's stored summary.
#[derive(Debug, Clone, PartialEq)]
pub struct ConversationRecord {
    pub id: Ulid,
    pub contact_id: Ulid,
    pub status: ConversationStatus,
    /// The channel of the first message.
    pub channel: String,
    /// Where replies go: the channel, provider and addresses of the customer's latest message.
    pub reply_route: ReplyRoute,
    pub subject: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// The router's state for this conversation (an opaque JSON document the daemon writes).
    pub routing_state: Option<serde_json::Value>,
    /// How many events this conversation has produced (the last event's sequence number).
    pub event_seq: u64,
}

/// How to reach the customer: the channel they last wrote on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyRoute {
    pub channel: String,
    pub provider: String,
    /// The customer's address there.
    pub customer_address: String,
    /// Our address there (the number, mailbox or page they wrote to).
    pub our_address: String,
    /// The thread key there (email threading, chat session...).
    pub thread_key: String,
}

/// Filters for listing conversations (admin API). All optional; newest first.
#[derive(Debug, Clone, Default)]
pub struct ConversationFilter {
    pub status: Option<ConversationStatus>,
    pub channel: Option<String>,
    pub contact_id: Option<Ulid>,
    /// Only conversations updated before this instant (for paging).
    pub updated_before: Option<DateTime<Utc>>,
    pub limit: usize,
}

/// A customer's rating of a resolved conversation (one per conversation).
#[derive(Debug, Clone, PartialEq)]
pub struct Rating {
    pub conversation_id: Ulid,
    /// 1 (poor) to 5 (excellent).
    pub score: u8,
    /// The customer's words; may be empty.
    pub comment: String,
    /// The agent who resolved the conversation, when the router still knew it.
    pub agent_id: Option<String>,
    pub rated_at: DateTime<Utc>,
}

/// The latest ratings and the average of all of them (customer satisfaction, CSAT).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RatingSummary {
    /// Newest first.
    pub recent: Vec<Rating>,
    pub count: u64,
    pub average: Option<f64>,
}

/// An event for other systems, written in the same commit as the state change that caused it.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    pub event_id: Ulid,
    /// `conversation.assigned`, `message.received`, `agent.presence`...
    pub kind: String,
    /// The conversation it belongs to; its sequence number is assigned by the store at commit.
    pub conversation_id: Option<Ulid>,
    pub data: serde_json::Value,
    pub time: DateTime<Utc>,
}

/// A delivery status to record for an outbound message.
#[derive(Debug, Clone)]
pub struct DeliveryUpdate {
    pub message_id: Ulid,
    /// `sent`, `delivered` or `failed`.
    pub status: String,
    /// The provider's id of the message (what its send API returned).
    pub provider_message_id: Option<String>,
    pub events: Vec<NewEvent>,
    /// Appended when storing the provider id applies a parked `failed`; its `data.reason` is set to
    /// the provider's error.
    pub parked_failure_event: Option<NewEvent>,
}

/// How a [`Store::set_delivery_status`] went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryRecorded {
    pub outcome: DeliveryOutcome,
    /// A status the provider had reported before its id was stored, applied by this write.
    pub parked: Option<ParkedStatus>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryOutcome {
    /// Stored, with its events.
    Applied,
    /// A later status was stored already (callbacks race each other and the sender): it stays, and
    /// this one's events are not written.
    Superseded,
}

/// A provider's status for the message it knows by `provider_message_id` on `channel`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParkedStatus {
    pub channel: String,
    pub provider_message_id: String,
    /// `delivered` or `failed`.
    pub status: String,
    /// For failures: the provider's error code and description.
    pub error: Option<String>,
}

/// The order delivery statuses move in (pending → sent → delivered; failed last), as SQL over the
/// expression given, shared by both backends.
pub(crate) fn status_rank_sql(expression: &str) -> String {
    format!(
        "(CASE {expression} WHEN 'pending' THEN 0 WHEN 'sent' THEN 1 WHEN 'delivered' THEN 2 \
         ELSE 3 END)"
    )
}

/// How long (nanoseconds) a parked status waits for its id before it is dropped as not ours.
pub(crate) const PARKED_STATUS_TTL_NANOS: i64 = 24 * 3600 * 1_000_000_000;

/// Sets `data.reason` of a parked failure's event to the provider's error.
pub(crate) fn parked_failure_event(mut event: NewEvent, error: Option<&str>) -> NewEvent {
    if let Some(data) = event.data.as_object_mut() {
        data.insert("reason".into(), serde_json::json!(error));
    }
    event
}

/// An event waiting in (or read from) the outbox.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxEvent {
    /// Position in the outbox: publish in this order.
    pub position: i64,
    pub event_id: Ulid,
    pub kind: String,
    pub conversation_id: Option<Ulid>,
    /// Per-conversation sequence number, 1, 2, 3...; 0 for events without a conversation.
    pub seq: u64,
    pub data: serde_json::Value,
    pub time: DateTime<Utc>,
}

/// One routing step's durable consequences, committed atomically.
#[derive(Debug, Clone, Default)]
pub struct RoutingWrite {
    /// Conversations whose router state changed: (id, new status, state document).
    pub conversations: Vec<(Ulid, ConversationStatus, serde_json::Value)>,
    /// Agents whose router state changed: (agent id, state document).
    pub agents: Vec<(String, serde_json::Value)>,
    /// Queues whose router state changed (recent handle times): (queue name, state document).
    pub queues: Vec<(String, serde_json::Value)>,
    /// Inbound messages now handed to the router (recovery replays the others).
    pub routed_messages: Vec<Ulid>,
    pub events: Vec<NewEvent>,
    /// The writer's leadership epoch (0 on a single node); the write is refused with `Fenced` if a
    /// newer epoch exists.
    pub epoch: u64,
    /// Pushes for agents' desktops, stored for the instances that hold their connections
    /// (several instances only; a single node pushes directly).
    pub pushes: Vec<AgentPush>,
    /// The instance writing (`origin` of its pushes).
    pub node: String,
}

/// A push for an agent's desktop, stored by the leader for whichever instance holds the agent's
/// WebSocket (a `message` push carries the message id; the pushing instance adds the body).
#[derive(Debug, Clone, PartialEq)]
pub struct AgentPush {
    pub agent_id: String,
    pub document: serde_json::Value,
}

/// A stored push, as a tailing instance reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredPush {
    pub position: i64,
    /// The instance that wrote it (and already pushed it to its own connections).
    pub origin: String,
    pub agent_id: String,
    pub document: serde_json::Value,
}

/// Where an instance stands in the stream of committed events.
///
/// With one writer (SQLite) the position alone is a cursor (`transaction` stays 0). On
/// PostgreSQL positions come from a sequence, and concurrent transactions (the leader's routing
/// writes, a follower's stored reply) may commit in another order than they took their
/// positions, so a reader that only remembered the last position could step over an event
/// committed late. The cursor is therefore the writing transaction's id with the position: a
/// reader takes only events of transactions older than every transaction still running, in
/// (transaction, position) order, and so sees each committed event exactly once.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct EventCursor {
    pub transaction: u64,
    pub position: i64,
}

/// What [`Store::events_after`] read.
#[derive(Debug, Clone, PartialEq)]
pub struct EventsPage {
    pub events: Vec<OutboxEvent>,
    /// The cursor to pass next.
    pub next: EventCursor,
    /// Events already committed wait behind a transaction still running: ask again soon rather
    /// than waiting for the next notification.
    pub held_back: bool,
}

/// An agent command taken by a follower, for the leader to run.
#[derive(Debug, Clone, PartialEq)]
pub struct ForwardedCommand {
    pub id: Ulid,
    /// The instance waiting for the answer.
    pub node: String,
    pub agent_id: String,
    /// The command as the wire document (`daemon::cluster::Forwarded`).
    pub command: serde_json::Value,
    pub created_at: DateTime<Utc>,
}

/// A live signal for a connection that may be on another instance of a cluster: typing, a read
/// receipt, what became of a reply. It is not stored: what it reports is in the store already, or
/// (typing) means nothing a moment later, so one lost on the way costs nothing.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Signal {
    /// The instance that sent it (it pushed to its own connections itself).
    pub origin: String,
    pub to: SignalTarget,
    /// The push, as JSON text.
    pub document: String,
}

/// Whose connections a [`Signal`] is for.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SignalTarget {
    /// An agent's desktop connections.
    Agent(String),
    /// The customer chat sockets of a conversation.
    Customer(Ulid),
}

/// One instance of a cluster, as its heartbeat row says.
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    pub node: String,
    /// Where its HTTP API listens.
    pub address: String,
    pub started_at: DateTime<Utc>,
    pub heartbeat_at: DateTime<Utc>,
}

/// What a store notification says changed; the reader then reads the store (the truth).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wakeup {
    /// An inbound message was stored (not yet routed).
    Inbound,
    /// A follower forwarded an agent command.
    Commands,
    /// The leader stored pushes for agents.
    Pushes,
    /// Events were committed to the outbox.
    Events,
    /// Another instance signalled one of the connections it does not hold.
    Signal(Signal),
    /// The leader answered this forwarded command.
    Answer(Ulid),
    /// The listening connection was re-established: anything may have been missed.
    Resync,
}

/// An agent's reply, stored before it is sent.
#[derive(Debug, Clone, PartialEq)]
pub struct NewReply {
    pub id: Ulid,
    pub conversation_id: Ulid,
    pub agent_id: String,
    pub route: ReplyRoute,
    pub text: String,
    pub html: Option<String>,
    pub created_at: DateTime<Utc>,
}

/// What restart recovery needs: every conversation with router state, every agent's and queue's
/// state, and the inbound messages stored but not yet handed to the router. State documents come as
/// the JSON text that was stored, so the caller parses each once, straight into its own type.
#[derive(Debug, Clone, Default)]
pub struct Recovery {
    pub conversations: Vec<(Ulid, String)>,
    pub agents: Vec<(String, String)>,
    pub queues: Vec<(String, String)>,
    pub unrouted: Vec<UnroutedMessage>,
    /// [`Store::routing_writes`] as of the same read.
    pub routing_writes: Option<u64>,
}

/// An inbound message stored but not yet handed to the router (after a crash, or taken in by another
/// instance), with what the router's first look at its conversation needs.
#[derive(Debug, Clone)]
pub struct UnroutedMessage {
    pub message: StoredMessage,
    pub contact_id: Ulid,
    /// The conversation was never routed, so its `conversation.created` is still to be published.
    pub new_conversation: bool,
}

/// The router's lease as stored: who leads, under which fencing epoch, until when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The node that acquired it last (`None` before anyone did).
    pub holder: Option<String>,
    /// The current fencing epoch: routing writes from older epochs are refused.
    pub epoch: u64,
    /// When the holder's lease ends unless renewed (by the store's clock).
    pub expires_at: Option<DateTime<Utc>>,
    /// Whether the holder's lease is still running now (by the store's clock, so every node agrees).
    pub live: bool,
    /// How long a live lease has left, by the store's clock (`None` when it is not live): a
    /// follower retries once it has run out rather than a whole retry interval later.
    pub remaining: Option<std::time::Duration>,
}

/// An attachment's bytes, named by their SHA-256. Stored in the same transaction as the message
/// that brought them (once per content, however many messages bring it), so an acknowledged
/// message's attachments are durable with it and every instance of a cluster can serve them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachmentContent {
    sha256: String,
    content: Vec<u8>,
}

impl AttachmentContent {
    /// Names the content by its hash (hashing 10 MiB takes tens of milliseconds: call it off the
    /// async threads for large parts).
    pub fn new(content: Vec<u8>) -> AttachmentContent {
        use sha2::{Digest, Sha256};
        AttachmentContent {
            sha256: hex::encode(Sha256::digest(&content)),
            content,
        }
    }

    /// The SHA-256 of the content in lower-case hex: the attachment's name.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    pub fn content(&self) -> &[u8] {
        &self.content
    }

    /// Whether `name` can name an attachment (a SHA-256 in lower-case hex); nothing else is ever
    /// looked up.
    pub fn is_name(name: &str) -> bool {
        name.len() == 64
            && name
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    }
}

/// An inbound message with everything that does not need the database worked out on the caller's
/// task, so a backend's writer only runs SQL. Every backend stores the same fields.
#[derive(Debug)]
pub(crate) struct IngestRequest {
    pub message_id: Ulid,
    pub channel: String,
    pub provider: String,
    pub provider_message_id: String,
    pub thread_key: String,
    pub from_address: String,
    pub to_address: String,
    pub identities: Vec<crate::message::IdentityLink>,
    pub name: Option<String>,
    pub tier: Option<String>,
    pub language: Option<String>,
    pub subject: Option<String>,
    pub body: String,
    pub message_time: DateTime<Utc>,
    pub intake_time: DateTime<Utc>,
    /// Stored only with a new message (a duplicate's came with the first copy).
    pub attachments: Vec<AttachmentContent>,
}

impl IngestRequest {
    pub(crate) fn new(
        mut message: InboundMessage,
        attachments: Vec<AttachmentContent>,
        received_at: DateTime<Utc>,
    ) -> Result<IngestRequest, StoreError> {
        let message_id = Ulid::new();
        let message_time = message.received_at.unwrap_or(received_at);
        message.id = Some(message_id);
        message.received_at = Some(message_time);
        let body = serde_json::to_string(&message)
            .map_err(|error| StoreError::Corrupt(format!("cannot encode the message: {error}")))?;
        let identities = message.identities();
        let thread_key = message.effective_thread_key();
        let to_address = message
            .to
            .as_ref()
            .map(|to| to.address.trim().to_owned())
            .unwrap_or_default();
        let name = message
            .customer
            .name
            .clone()
            .or_else(|| message.from.name.clone());
        Ok(IngestRequest {
            message_id,
            from_address: message.from.address.trim().to_owned(),
            channel: message.channel,
            provider: message.provider,
            provider_message_id: message.provider_message_id,
            thread_key,
            to_address,
            identities,
            name,
            tier: message.customer.tier,
            language: message.customer.language,
            subject: message.subject,
            body,
            message_time,
            intake_time: received_at,
            attachments,
        })
    }
}

/// The durable store. Implementations are cheap to clone handles (`Arc` inside).
#[async_trait]
pub trait Store: Send + Sync + std::fmt::Debug {
    /// Stores a validated inbound message: deduplicates by (channel, provider_message_id), finds or
    /// creates the contact from the message's identities (linking new identities to it), and finds the
    /// conversation: the thread key's conversation if not closed, else the contact's conversation that
    /// is not closed (any channel), else a new one. Updates the conversation's reply route. Returns
    /// only after the commit. `received_at` is used when the message has none. The contents of the
    /// message's attachments (if the channel brought them in, as email does) are stored in the same
    /// transaction, unless the message is a duplicate.
    async fn ingest(
        &self,
        message: InboundMessage,
        attachments: Vec<AttachmentContent>,
        received_at: DateTime<Utc>,
    ) -> Result<IngestOutcome, StoreError>;

    /// An attachment's content by its name ([`AttachmentContent::sha256`]), if a stored message
    /// brought it.
    async fn attachment(&self, sha256: &str) -> Result<Option<Vec<u8>>, StoreError>;

    /// Commits a routing step: conversation and agent states, routed marks and events, atomically.
    /// Conversations set to `Closed` keep their history; their thread keys no longer match.
    /// Shared (`Arc`) so a caller that must retry a failed commit resubmits it without copying it.
    async fn apply_routing(&self, write: std::sync::Arc<RoutingWrite>) -> Result<(), StoreError>;

    /// Stores an agent's reply as an outbound message (`pending`) together with its events.
    async fn store_reply(&self, reply: NewReply, events: Vec<NewEvent>) -> Result<(), StoreError>;

    /// Stores a conversation's rating together with its events. A conversation is rated once:
    /// `Ok(false)` (nothing written) when it already has a rating.
    async fn rate(&self, rating: Rating, events: Vec<NewEvent>) -> Result<bool, StoreError>;

    /// The `recent` newest ratings, and the count and average of all.
    async fn ratings(&self, recent: usize) -> Result<RatingSummary, StoreError>;

    /// Records a delivery status for an outbound message (`sent`, `delivered`, `failed`), with its
    /// events. A status that is not past the stored one is [`DeliveryOutcome::Superseded`]: it and
    /// its events are not written, but a provider id it brings is. Storing a provider id applies,
    /// in the same transaction, a status the provider reported for it before (see
    /// [`Store::park_delivery_status`]).
    async fn set_delivery_status(
        &self,
        update: DeliveryUpdate,
    ) -> Result<DeliveryRecorded, StoreError>;

    /// A provider's status (`delivered` or `failed`) for an id no reply has yet: its callback beat
    /// the sender's write of that id. Kept (the furthest-forward per id) until the id is stored,
    /// then applied with it. Returns false, keeping nothing, when a reply has the id by now (the
    /// caller applies the status to it as usual). Statuses kept longer than a day are dropped.
    async fn park_delivery_status(
        &self,
        status: ParkedStatus,
        received_at: DateTime<Utc>,
    ) -> Result<bool, StoreError>;

    async fn recovery(&self) -> Result<Recovery, StoreError>;

    /// Outbound replies still `pending` (not yet sent or failed), oldest first: re-queued on start.
    async fn pending_replies(&self) -> Result<Vec<Ulid>, StoreError>;

    async fn conversation(&self, id: Ulid) -> Result<Option<ConversationRecord>, StoreError>;

    async fn conversations(
        &self,
        filter: ConversationFilter,
    ) -> Result<Vec<ConversationRecord>, StoreError>;

    /// Every message of a conversation, oldest first.
    async fn messages(&self, conversation_id: Ulid) -> Result<Vec<StoredMessage>, StoreError>;

    async fn message(&self, id: Ulid) -> Result<Option<StoredMessage>, StoreError>;

    /// The outbound message a provider knows by this id on this channel (for its status callbacks).
    async fn outbound_by_provider_id(
        &self,
        channel: &str,
        provider_message_id: &str,
    ) -> Result<Option<StoredMessage>, StoreError>;

    /// The oldest unpublished events, in outbox order.
    async fn outbox_pending(&self, limit: usize) -> Result<Vec<OutboxEvent>, StoreError>;

    /// Marks events published (after the broker confirmed them). `positions` are the first events
    /// [`Store::outbox_pending`] returned, in order: a store whose positions commit in order (SQLite)
    /// may keep a cursor instead of a mark per event.
    async fn outbox_mark_sent(&self, positions: &[i64]) -> Result<(), StoreError>;

    /// Marks every event committed so far published without reading them: the relay's whole work
    /// when no broker is configured (nobody to publish to, but a broker configured later must not
    /// be sent the whole history).
    async fn outbox_skip_pending(&self) -> Result<(), StoreError>;

    /// How many events wait to be published.
    async fn outbox_backlog(&self) -> Result<u64, StoreError>;

    /// Can the store commit right now? (For `/readyz`.)
    async fn check_writable(&self) -> Result<(), StoreError>;

    /// Takes the router's lease for `node` if it is free, expired, or already `node`'s, and returns
    /// the new fencing epoch: greater than every epoch before, so the previous holder (even an
    /// earlier run of the same node) is fenced from now on. `None` while another node holds a live
    /// lease. Expiry is judged by the store's clock.
    async fn try_acquire_lease(
        &self,
        node: &str,
        ttl: std::time::Duration,
    ) -> Result<Option<u64>, StoreError>;

    /// Extends `node`'s lease by `ttl` from now. `false` once another node has taken over (the epoch
    /// moved on): the caller is no longer leader and must stop routing.
    async fn renew_lease(
        &self,
        node: &str,
        epoch: u64,
        ttl: std::time::Duration,
    ) -> Result<bool, StoreError>;

    /// Ends `node`'s lease now (graceful step-down) so another node can take over without waiting
    /// for it to expire. `false` if it was no longer `node`'s.
    async fn release_lease(&self, node: &str, epoch: u64) -> Result<bool, StoreError>;

    /// The lease as stored now.
    async fn lease(&self) -> Result<Lease, StoreError>;

    /// Where the committed events end now (where a follower of them begins).
    async fn events_end(&self) -> Result<EventCursor, StoreError>;

    /// Committed events after `cursor`, at most `limit`, each once, in the order of
    /// [`EventCursor`]. Every instance's chats and supervisor feed follow these.
    async fn events_after(
        &self,
        cursor: EventCursor,
        limit: usize,
    ) -> Result<EventsPage, StoreError>;

    // Several instances. A single node (SQLite) routes everything itself: these default to what one
    // instance alone sees.

    /// How many routing writes were committed, ever (`None`: this store does not count them).
    /// An instance that read the router's state early knows by it whether that state is still
    /// current once it holds the lease (the takeover fenced every later write).
    async fn routing_writes(&self) -> Result<Option<u64>, StoreError> {
        Ok(None)
    }

    /// Inbound messages stored but not yet routed, oldest first (the leader picks them up).
    async fn unrouted(&self, limit: usize) -> Result<Vec<UnroutedMessage>, StoreError> {
        let mut unrouted = self.recovery().await?.unrouted;
        unrouted.truncate(limit);
        Ok(unrouted)
    }

    /// Notifications of what changed in the store: from every instance writing to it (PostgreSQL)
    /// or from this process's writer (SQLite: [`Wakeup::Events`] only). `None`: there are none,
    /// and readers poll.
    fn wakeups(&self) -> Option<tokio::sync::broadcast::Receiver<Wakeup>> {
        None
    }

    /// Records that `node` is alive and where it listens.
    async fn heartbeat(
        &self,
        _node: &str,
        _address: &str,
        _started_at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        Ok(())
    }

    /// Every instance that sent a heartbeat, by node id.
    async fn members(&self) -> Result<Vec<Member>, StoreError> {
        Ok(Vec::new())
    }

    /// Stores a command for the leader to run (and wakes it).
    async fn forward_command(&self, _command: ForwardedCommand) -> Result<(), StoreError> {
        Err(StoreError::Unavailable(
            "a single node runs its own router: nothing to forward to".into(),
        ))
    }

    /// Forwarded commands not answered yet, oldest first.
    async fn open_commands(&self, _limit: usize) -> Result<Vec<ForwardedCommand>, StoreError> {
        Ok(Vec::new())
    }

    /// Stores the answer to a forwarded command (and wakes the instance waiting for it). `false`
    /// if it was answered already.
    async fn answer_command(
        &self,
        _id: Ulid,
        _answer: serde_json::Value,
    ) -> Result<bool, StoreError> {
        Ok(false)
    }

    /// The answer to a forwarded command, once there is one.
    async fn command_answer(&self, _id: Ulid) -> Result<Option<serde_json::Value>, StoreError> {
        Ok(None)
    }

    /// Stored pushes after `position`, in order.
    async fn pushes_after(
        &self,
        _position: i64,
        _limit: usize,
    ) -> Result<Vec<StoredPush>, StoreError> {
        Ok(Vec::new())
    }

    /// The position of the latest stored push (where a starting instance begins to tail).
    async fn latest_push(&self) -> Result<i64, StoreError> {
        Ok(0)
    }

    /// Sends a live signal to the other instances (a single node has none: nothing to do).
    async fn signal(&self, _signal: &Signal) -> Result<(), StoreError> {
        Ok(())
    }

    /// Inbound messages waiting to be routed plus commands waiting for the leader.
    async fn forwarding_backlog(&self) -> Result<u64, StoreError> {
        Ok(0)
    }

    /// Deletes answered commands and pushes older than `age`, and members silent that long.
    async fn prune_cluster(&self, _age: std::time::Duration) -> Result<(), StoreError> {
        Ok(())
    }
}

/// A lease's time to live as a calendar duration (refuses absurd ones rather than overflowing).
pub(crate) fn lease_duration(ttl: std::time::Duration) -> Result<chrono::Duration, StoreError> {
    chrono::Duration::from_std(ttl)
        .ok()
        .filter(|ttl| *ttl > chrono::Duration::zero() && *ttl < chrono::Duration::days(365))
        .ok_or_else(|| StoreError::NotFound(format!("lease time to live {ttl:?} is out of range")))
}

// Helpers shared by the backends.

pub(crate) fn prefix_error(error: StoreError, context: &str) -> StoreError {
    match error {
        StoreError::Unavailable(message) => {
            StoreError::Unavailable(format!("{context}: {message}"))
        }
        StoreError::NotFound(message) => StoreError::NotFound(format!("{context}: {message}")),
        StoreError::Corrupt(message) => StoreError::Corrupt(format!("{context}: {message}")),
        fenced @ StoreError::Fenced { .. } => fenced,
    }
}

pub(crate) fn parse_ulid(text: &str) -> Result<Ulid, StoreError> {
    Ulid::from_string(text)
        .map_err(|error| StoreError::Corrupt(format!("bad id {text:?}: {error}")))
}

pub(crate) fn json_text(value: &serde_json::Value) -> Result<String, StoreError> {
    serde_json::to_string(value)
        .map_err(|error| StoreError::Corrupt(format!("cannot encode JSON: {error}")))
}

pub(crate) fn parse_status(text: &str) -> Result<ConversationStatus, StoreError> {
    ConversationStatus::parse(text)
        .ok_or_else(|| StoreError::Corrupt(format!("bad conversation status {text:?}")))
}

pub(crate) fn to_i64(value: u64, what: &str) -> Result<i64, StoreError> {
    i64::try_from(value)
        .map_err(|_| StoreError::NotFound(format!("{what} {value} is out of range")))
}

pub(crate) fn to_u64(value: i64, what: &str) -> Result<u64, StoreError> {
    u64::try_from(value).map_err(|_| StoreError::Corrupt(format!("negative {what} {value}")))
}
