//! JSON renderings of the router's views and stored records for the API (wire shapes at the edge).

use serde_json::{Value, json};
use ulid::Ulid;

use super::events::millis_to_rfc3339;
use super::persist::reason_name;
use crate::routing::inspect::{AgentView, ConversationView, QueueView};
use crate::routing::{ConversationState, Timestamp};
use crate::store::{ConversationRecord, Direction, StoredMessage};

pub fn agent(view: &AgentView) -> Value {
    let ids = |ids: &[crate::routing::ConversationId]| {
        ids.iter()
            .map(|id| Ulid(id.0).to_string())
            .collect::<Vec<_>>()
    };
    json!({
        "id": view.id.as_str(),
        "name": view.name,
        "presence": view.presence.as_str(),
        "wrap_up": view.wrapping_up,
        "load": view.load.iter().map(|(channel, load, capacity)| json!({ "channel": channel.as_str(), "load": load, "capacity": capacity })).collect::<Vec<_>>(),
        "load_total": view.load_total,
        "max_total": view.max_total,
        "offers": ids(&view.offers),
        "assigned": ids(&view.assigned),
        "missed_offers": view.missed,
    })
}

pub fn conversation(view: &ConversationView) -> Value {
    let (state, agent, detail) = match &view.state {
        ConversationState::Waiting => ("waiting", None, Value::Null),
        ConversationState::Offered {
            agent, deadline, ..
        } => (
            "offered",
            Some(agent),
            json!({ "deadline": millis_to_rfc3339(deadline.0) }),
        ),
        ConversationState::Assigned { agent, since, .. } => (
            "assigned",
            Some(agent),
            json!({ "since": millis_to_rfc3339(since.0) }),
        ),
        ConversationState::Resolved { agent, at } => (
            "resolved",
            Some(agent),
            json!({ "at": millis_to_rfc3339(at.0) }),
        ),
    };
    json!({
        "id": Ulid(view.id.0).to_string(),
        "channel": view.channel.as_str(),
        "state": state,
        "agent_id": agent.map(|agent| agent.as_str()),
        "detail": detail,
        "queue": view.queue.as_str(),
        "priority": view.priority,
        "waiting_since": millis_to_rfc3339(view.since.0),
        "priority_reasons": view.reasons.iter().map(reason_name).collect::<Vec<_>>(),
        "tags": view.tags,
        "follower_id": view.follower.as_ref().map(|agent| agent.as_str()),
    })
}

pub fn queue(view: &QueueView, now: Timestamp) -> Value {
    json!({
        "name": view.name.as_str(),
        "open": view.open,
        "waiting": view.waiting,
        "oldest_wait_seconds": view.oldest_since.map_or(0.0, |since| now.since(since).as_secs_f64()),
        "agents_available": view.agents_available,
        "average_handle_seconds": view.average_handle_time.as_secs_f64(),
        "sla_seconds": view.sla_target.as_secs_f64(),
    })
}

pub fn record(record: &ConversationRecord) -> Value {
    json!({
        "id": record.id.to_string(),
        "contact_id": record.contact_id.to_string(),
        "status": record.status.as_str(),
        "channel": record.channel,
        "reply_channel": record.reply_route.channel,
        "subject": record.subject,
        "created_at": record.created_at.to_rfc3339(),
        "updated_at": record.updated_at.to_rfc3339(),
        "events": record.event_seq,
    })
}

pub fn message(message: &StoredMessage) -> Value {
    json!({
        "id": message.id.to_string(),
        "direction": match message.direction { Direction::Inbound => "inbound", Direction::Outbound => "outbound" },
        "channel": message.channel,
        "provider": message.provider,
        "from": message.from_address,
        "to": message.to_address,
        "agent_id": message.agent_id,
        "delivery_status": message.delivery_status,
        "created_at": message.created_at.to_rfc3339(),
        "body": message.body,
    })
}
