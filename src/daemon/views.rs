//! The HTTP API's response bodies: typed renderings of the router's views and stored records (wire
//! shapes at the edge). Each derives its JSON Schema, which the OpenAPI document publishes.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use ulid::Ulid;

use super::actions::IngestReceipt;
use super::events::millis_to_rfc3339;
use super::persist::reason_name;
use crate::routing::inspect::{AgentView, ConversationView, QueueView};
use crate::routing::{
    AgentId, Channel, ConversationId, ConversationState, Presence, Router, Timestamp,
};
use crate::store::{ConversationRecord, Direction, StoredMessage};

/// A read of the router's live state. Only the instance running the router can answer it, so on a
/// follower it travels to the leader with forwarded commands (`cluster.rs`) and the answer comes back
/// as the same JSON: an agent or supervisor sees the same on every instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "read", rename_all = "snake_case")]
pub enum RouterRead {
    /// [`Agent`], or null for an agent not in the configuration.
    Agent { agent: String },
    /// [`AgentConversations`], or null for an unknown agent.
    AgentConversations { agent: String },
    /// Whether the agent holds or follows the conversation (a boolean).
    AgentMaySee { agent: String, conversation: Ulid },
    /// [`QueueList`].
    Queues,
    /// [`AgentList`].
    Agents,
    /// [`Routing`], or null once the router forgot the conversation (closed).
    Conversation { conversation: Ulid },
    /// [`QueuePosition`] of each of these conversations that waits (the others are left out), by ULID.
    QueuePositions { conversations: Vec<Ulid> },
    /// [`Routing`] of the first `limit` unanswered conversations (waiting or offered), first
    /// served first, and how many there are.
    Unanswered { limit: usize },
    /// Whether a new conversation on the channel would be answered now: some queue is inside its
    /// business hours and some available agent takes the channel.
    Answering { channel: String },
}

impl RouterRead {
    /// The agent the read is about (forwarded commands are filed under an agent).
    pub fn agent(&self) -> &str {
        match self {
            RouterRead::Agent { agent }
            | RouterRead::AgentConversations { agent }
            | RouterRead::AgentMaySee { agent, .. } => agent,
            RouterRead::Queues
            | RouterRead::Agents
            | RouterRead::Conversation { .. }
            | RouterRead::QueuePositions { .. }
            | RouterRead::Unanswered { .. }
            | RouterRead::Answering { .. } => "",
        }
    }

    /// Answers the read on the router; `now` (the wall clock) ages the queues' oldest waits.
    pub fn answer(&self, router: &Router, now: Timestamp) -> Value {
        match self {
            RouterRead::Agent { agent } => router
                .agent(&AgentId::new(agent))
                .map_or(Value::Null, |view| json(&Agent::from(&view))),
            RouterRead::AgentConversations { agent } => {
                let Some(view) = router.agent(&AgentId::new(agent)) else {
                    return Value::Null;
                };
                let list = |ids: &[ConversationId]| {
                    ids.iter()
                        .filter_map(|id| router.conversation(*id))
                        .map(|conversation| Routing::from(&conversation))
                        .collect()
                };
                json(&AgentConversations {
                    offers: list(&view.offers),
                    assigned: list(&view.assigned),
                })
            }
            RouterRead::AgentMaySee {
                agent,
                conversation,
            } => {
                let agent = AgentId::new(agent);
                let allowed = router
                    .conversation(ConversationId(conversation.0))
                    .is_some_and(|view| {
                        let holder = match &view.state {
                            ConversationState::Offered { agent, .. }
                            | ConversationState::Assigned { agent, .. }
                            | ConversationState::Resolved { agent, .. } => Some(agent),
                            ConversationState::Waiting => None,
                        };
                        holder == Some(&agent) || view.follower.as_ref() == Some(&agent)
                    });
                Value::Bool(allowed)
            }
            RouterRead::Queues => json(&QueueList {
                queues: router
                    .queues()
                    .iter()
                    .map(|queue| Queue::new(queue, now))
                    .collect(),
            }),
            RouterRead::Agents => json(&AgentList {
                agents: router.agents().map(|view| Agent::from(&view)).collect(),
            }),
            RouterRead::Conversation { conversation } => router
                .conversation(ConversationId(conversation.0))
                .map_or(Value::Null, |view| json(&Routing::from(&view))),
            RouterRead::QueuePositions { conversations } => {
                let ids: Vec<ConversationId> = conversations
                    .iter()
                    .map(|id| ConversationId(id.0))
                    .collect();
                let positions: std::collections::BTreeMap<String, QueuePosition> = conversations
                    .iter()
                    .zip(router.queue_positions(&ids))
                    .filter_map(|(id, found)| {
                        let (position, wait) = found?;
                        Some((
                            id.to_string(),
                            QueuePosition {
                                position,
                                estimated_wait_seconds: wait.as_secs_f64(),
                            },
                        ))
                    })
                    .collect();
                json(&positions)
            }
            RouterRead::Answering { channel } => {
                let channel = Channel::parse(channel);
                let answering = router.queues().iter().any(|queue| queue.open)
                    && router.agents().any(|agent| {
                        agent.presence == Presence::Available
                            && agent
                                .load
                                .iter()
                                .any(|(served, _, capacity)| *served == channel && *capacity > 0)
                    });
                Value::Bool(answering)
            }
            RouterRead::Unanswered { limit } => {
                // Ranks only, then views for the first `limit`: a long backlog is read in one
                // pass and nothing is built for conversations the supervisor does not see.
                let mut ranked: Vec<_> = router
                    .conversation_ids()
                    .filter(|id| {
                        router.conversation(*id).is_some_and(|view| {
                            matches!(
                                view.state,
                                ConversationState::Waiting | ConversationState::Offered { .. }
                            )
                        })
                    })
                    .filter_map(|id| Some((router.wait_rank(id)?, id)))
                    .collect();
                let total = ranked.len();
                if ranked.len() > *limit {
                    ranked.select_nth_unstable(*limit);
                    ranked.truncate(*limit);
                }
                ranked.sort_unstable();
                let first: Vec<Routing> = ranked
                    .iter()
                    .filter_map(|(_, id)| router.conversation(*id))
                    .map(|view| Routing::from(&view))
                    .collect();
                json(&Unanswered { total, first })
            }
        }
    }
}

/// A view as JSON. These views are plain structs with string keys, which always serialise.
fn json(view: &impl Serialize) -> Value {
    serde_json::to_value(view).unwrap_or(Value::Null)
}

fn ulids(ids: &[ConversationId]) -> Vec<String> {
    ids.iter().map(|id| Ulid(id.0).to_string()).collect()
}

/// The unanswered conversations (waiting or offered) a supervisor sees: the first served first,
/// and how many there are in all.
#[derive(Debug, Serialize, Deserialize)]
pub struct Unanswered {
    pub total: usize,
    pub first: Vec<Routing>,
}

/// A waiting conversation's place in its queue (1 = next) and its estimated wait.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct QueuePosition {
    pub position: u32,
    pub estimated_wait_seconds: f64,
}

/// An agent's live state.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct Agent {
    pub id: String,
    pub name: String,
    /// `available`, `away`, `offline` or `disconnected`.
    pub presence: String,
    /// In wrap-up after a resolve (still holding capacity).
    pub wrap_up: bool,
    /// Load and capacity on each channel the agent serves.
    pub load: Vec<ChannelLoad>,
    pub load_total: u16,
    pub max_total: u16,
    /// Conversations offered to the agent and not yet answered (ULIDs).
    pub offers: Vec<String>,
    /// Conversations the agent owns (ULIDs).
    pub assigned: Vec<String>,
    /// Offers missed in a row (counts towards being set away).
    pub missed_offers: u32,
}

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct ChannelLoad {
    pub channel: String,
    pub load: u16,
    pub capacity: u16,
}

impl From<&AgentView> for Agent {
    fn from(view: &AgentView) -> Agent {
        Agent {
            id: view.id.as_str().to_owned(),
            name: view.name.clone(),
            presence: view.presence.as_str().to_owned(),
            wrap_up: view.wrapping_up,
            load: view
                .load
                .iter()
                .map(|(channel, load, capacity)| ChannelLoad {
                    channel: channel.as_str().to_owned(),
                    load: *load,
                    capacity: *capacity,
                })
                .collect(),
            load_total: view.load_total,
            max_total: view.max_total,
            offers: ulids(&view.offers),
            assigned: ulids(&view.assigned),
            missed_offers: view.missed,
        }
    }
}

/// `GET /v1/admin/agents`.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct AgentList {
    pub agents: Vec<Agent>,
}

/// A conversation's live routing state.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct Routing {
    pub id: String,
    pub channel: String,
    /// `waiting`, `offered`, `assigned` or `resolved`.
    pub state: String,
    /// The agent it is offered to, assigned to or was resolved by.
    pub agent_id: Option<String>,
    /// Offered: `deadline`; assigned: `since`; resolved: `at` (RFC 3339).
    pub detail: Option<RoutingDetail>,
    /// The queue it waits in or was assigned from.
    pub queue: String,
    /// Effective priority (higher is served first).
    pub priority: i32,
    pub waiting_since: String,
    /// Why the priority is what it is (`vip_tier`, `sla_breached`, `wait_step:<queue>:<n>`...).
    pub priority_reasons: Vec<String>,
    pub tags: Vec<String>,
    /// A former owner following the conversation after an escalation.
    pub follower_id: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct RoutingDetail {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deadline: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub at: Option<String>,
}

impl From<&ConversationView> for Routing {
    fn from(view: &ConversationView) -> Routing {
        let time = |at: &Timestamp| Some(millis_to_rfc3339(at.0));
        let none = RoutingDetail {
            deadline: None,
            since: None,
            at: None,
        };
        let (state, agent, detail) = match &view.state {
            ConversationState::Waiting => ("waiting", None, None),
            ConversationState::Offered {
                agent, deadline, ..
            } => (
                "offered",
                Some(agent),
                Some(RoutingDetail {
                    deadline: time(deadline),
                    ..none
                }),
            ),
            ConversationState::Assigned { agent, since, .. } => (
                "assigned",
                Some(agent),
                Some(RoutingDetail {
                    since: time(since),
                    ..none
                }),
            ),
            ConversationState::Resolved { agent, at } => (
                "resolved",
                Some(agent),
                Some(RoutingDetail {
                    at: time(at),
                    ..none
                }),
            ),
        };
        Routing {
            id: Ulid(view.id.0).to_string(),
            channel: view.channel.as_str().to_owned(),
            state: state.to_owned(),
            agent_id: agent.map(|agent| agent.as_str().to_owned()),
            detail,
            queue: view.queue.as_str().to_owned(),
            priority: view.priority,
            waiting_since: millis_to_rfc3339(view.since.0),
            priority_reasons: view.reasons.iter().map(reason_name).collect(),
            tags: view.tags.clone(),
            follower_id: view
                .follower
                .as_ref()
                .map(|agent| agent.as_str().to_owned()),
        }
    }
}

/// `GET /v1/agents/{agent}/conversations`.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct AgentConversations {
    pub offers: Vec<Routing>,
    pub assigned: Vec<Routing>,
}

/// A queue's live state.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct Queue {
    pub name: String,
    /// Inside its business hours.
    pub open: bool,
    /// Unanswered conversations waiting with this queue as home.
    pub waiting: u32,
    pub oldest_wait_seconds: f64,
    pub agents_available: u32,
    pub average_handle_seconds: f64,
    pub sla_seconds: f64,
}

impl Queue {
    pub fn new(view: &QueueView, now: Timestamp) -> Queue {
        Queue {
            name: view.name.as_str().to_owned(),
            open: view.open,
            waiting: view.waiting,
            oldest_wait_seconds: view
                .oldest_since
                .map_or(0.0, |since| now.since(since).as_secs_f64()),
            agents_available: view.agents_available,
            average_handle_seconds: view.average_handle_time.as_secs_f64(),
            sla_seconds: view.sla_target.as_secs_f64(),
        }
    }
}

/// `GET /v1/admin/queues`.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct QueueList {
    pub queues: Vec<Queue>,
}

/// A conversation as stored.
#[derive(Debug, Serialize, JsonSchema)]
pub struct Conversation {
    pub id: String,
    pub contact_id: String,
    /// `open`, `resolved` or `closed`.
    pub status: String,
    /// The channel of the first message.
    pub channel: String,
    /// Where replies go: the channel of the customer's latest message.
    pub reply_channel: String,
    pub subject: Option<String>,
    pub created_at: String,
    pub updated_at: String,
    /// How many events it has produced (the last event's sequence number).
    pub events: u64,
}

impl From<&ConversationRecord> for Conversation {
    fn from(record: &ConversationRecord) -> Conversation {
        Conversation {
            id: record.id.to_string(),
            contact_id: record.contact_id.to_string(),
            status: record.status.as_str().to_owned(),
            channel: record.channel.clone(),
            reply_channel: record.reply_route.channel.clone(),
            subject: record.subject.clone(),
            created_at: record.created_at.to_rfc3339(),
            updated_at: record.updated_at.to_rfc3339(),
            events: record.event_seq,
        }
    }
}

/// `GET /v1/admin/conversations`.
#[derive(Debug, Serialize, JsonSchema)]
pub struct ConversationList {
    pub conversations: Vec<Conversation>,
}

/// A stored message, inbound or outbound.
#[derive(Debug, Serialize, JsonSchema)]
pub struct StoredMessageBody {
    pub id: String,
    /// `inbound` or `outbound`.
    pub direction: String,
    pub channel: String,
    pub provider: String,
    pub from: String,
    pub to: String,
    /// Outbound: the agent who wrote it.
    pub agent_id: Option<String>,
    /// Outbound: `pending`, `sent`, `delivered` or `failed`.
    pub delivery_status: Option<String>,
    pub created_at: String,
    /// Inbound: the full `switchboard.message.v1`; outbound: the reply as sent.
    pub body: Value,
}

impl From<&StoredMessage> for StoredMessageBody {
    fn from(message: &StoredMessage) -> StoredMessageBody {
        StoredMessageBody {
            id: message.id.to_string(),
            direction: match message.direction {
                Direction::Inbound => "inbound",
                Direction::Outbound => "outbound",
            }
            .to_owned(),
            channel: message.channel.clone(),
            provider: message.provider.clone(),
            from: message.from_address.clone(),
            to: message.to_address.clone(),
            agent_id: message.agent_id.clone(),
            delivery_status: message.delivery_status.clone(),
            created_at: message.created_at.to_rfc3339(),
            body: message.body.clone(),
        }
    }
}

fn messages(messages: &[StoredMessage]) -> Vec<StoredMessageBody> {
    messages.iter().map(StoredMessageBody::from).collect()
}

/// `GET /v1/agents/{agent}/conversations/{conversation}/messages`: oldest first.
#[derive(Debug, Serialize, JsonSchema)]
pub struct History {
    pub conversation_id: String,
    /// The channel a reply goes out on.
    pub reply_channel: Option<String>,
    pub messages: Vec<StoredMessageBody>,
}

impl History {
    pub fn new(
        conversation: Ulid,
        record: Option<&ConversationRecord>,
        stored: &[StoredMessage],
    ) -> History {
        History {
            conversation_id: conversation.to_string(),
            reply_channel: record.map(|record| record.reply_route.channel.clone()),
            messages: messages(stored),
        }
    }
}

/// `GET /v1/admin/conversations/{conversation}`.
#[derive(Debug, Serialize, JsonSchema)]
pub struct ConversationDetail {
    pub conversation: Conversation,
    /// The router's live state; absent once the router forgot it (closed).
    pub routing: Option<Routing>,
    pub messages: Vec<StoredMessageBody>,
}

impl ConversationDetail {
    pub fn new(
        record: &ConversationRecord,
        routing: Option<Routing>,
        stored: &[StoredMessage],
    ) -> ConversationDetail {
        ConversationDetail {
            conversation: record.into(),
            routing,
            messages: messages(stored),
        }
    }
}

/// `POST /v1/messages`: where the message went.
#[derive(Debug, Serialize, JsonSchema)]
pub struct Receipt {
    pub message_id: String,
    pub conversation_id: String,
    /// Already stored: nothing was written.
    pub duplicate: bool,
    /// New messages only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub contact_id: Option<String>,
    /// New messages only: whether it opened a conversation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub new_conversation: Option<bool>,
}

impl From<&IngestReceipt> for Receipt {
    fn from(receipt: &IngestReceipt) -> Receipt {
        Receipt {
            message_id: receipt.message_id.to_string(),
            conversation_id: receipt.conversation_id.to_string(),
            duplicate: receipt.duplicate,
            contact_id: receipt.contact_id.map(|contact| contact.to_string()),
            new_conversation: receipt.contact_id.map(|_| receipt.new_conversation),
        }
    }
}

/// An agent action on a conversation (accept, reject, resolve, escalate, transfer) was done.
#[derive(Debug, Serialize, JsonSchema)]
pub struct Done {
    pub conversation_id: String,
    /// The action's name.
    pub done: String,
}

/// `PUT /v1/agents/{agent}/presence`.
#[derive(Debug, Serialize, JsonSchema)]
pub struct PresenceSet {
    pub presence: String,
}

/// `POST .../reply`: stored, delivery follows.
#[derive(Debug, Serialize, JsonSchema)]
pub struct ReplyAccepted {
    pub message_id: String,
    /// `pending` until the channel confirms.
    pub status: String,
}

/// `POST /v1/admin/reload`.
#[derive(Debug, Serialize, JsonSchema)]
pub struct Reloaded {
    pub reloaded: bool,
}

/// `GET /v1/admin/cluster`: who leads, under which epoch, and every instance's heartbeat.
#[derive(Debug, Serialize, JsonSchema)]
pub struct Cluster {
    /// Several instances share one PostgreSQL database (false: a single node, always leader).
    pub clustered: bool,
    /// The instance that answered.
    pub this: ClusterNode,
    /// The node holding a live lease, if any.
    pub leader: Option<String>,
    /// The fencing epoch of the current lease (grows at every takeover).
    pub epoch: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease_expires_at: Option<String>,
    /// Inbound messages and agent commands stored by followers and not yet handled by the leader.
    pub forwarding_backlog: u64,
    pub members: Vec<ClusterMember>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct ClusterNode {
    pub node_id: String,
    pub leader: bool,
    pub epoch: u64,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct ClusterMember {
    pub node_id: String,
    /// `leader` or `follower`.
    pub role: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_heartbeat: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heartbeat_age_ms: Option<i64>,
}

/// Every error answer: `{"error": {"code", "message"}}`.
#[derive(Debug, Serialize, JsonSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct ErrorDetail {
    /// A stable code (`unknown_agent`, `not_offered`, `bad_json`...).
    pub code: String,
    /// What is wrong, for a person.
    pub message: String,
}
