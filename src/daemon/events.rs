//! Events for other systems: which router effects become which event, and the CloudEvents envelope.
//!
//! Event names follow DESIGN.md (`conversation.assigned`, `message.received`, `agent.presence`...). An
//! event is written to the outbox in the same commit as the state change that caused it; the relay
//! wraps it as a CloudEvents 1.0 structured-mode JSON document when publishing.

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Value, json};
use ulid::Ulid;

use crate::routing::{ConversationId, Effect, Presence, TransferTarget};
use crate::store::{NewEvent, OutboxEvent};

/// The CloudEvents `type` prefix: `io.switchboard.conversation.assigned`.
pub const TYPE_PREFIX: &str = "io.switchboard.";

pub fn conversation_ulid(id: ConversationId) -> Ulid {
    Ulid(id.0)
}

fn event(
    kind: &str,
    conversation: Option<ConversationId>,
    data: Value,
    time: DateTime<Utc>,
) -> NewEvent {
    NewEvent {
        event_id: Ulid::new(),
        kind: kind.to_owned(),
        conversation_id: conversation.map(conversation_ulid),
        data,
        time,
    }
}

/// The event an effect produces for other systems, if any. Timers, withdrawals and deliveries to
/// agents are internal and produce none.
pub fn for_effect(effect: &Effect, time: DateTime<Utc>) -> Option<NewEvent> {
    let id = |conversation: &ConversationId| conversation_ulid(*conversation).to_string();
    let (kind, conversation, data) = match effect {
        Effect::Queued {
            conversation,
            queue,
            position,
            estimated_wait,
        } => (
            "conversation.queued",
            conversation,
            json!({ "conversation_id": id(conversation), "queue": queue.as_str(), "position": position, "estimated_wait_seconds": estimated_wait.as_secs_f64() }),
        ),
        Effect::Offered {
            conversation,
            agent,
            queue,
            deadline,
        } => (
            "conversation.offered",
            conversation,
            json!({ "conversation_id": id(conversation), "agent_id": agent.as_str(), "queue": queue.as_str(), "deadline": millis_to_rfc3339(deadline.0) }),
        ),
        Effect::Assigned {
            conversation,
            agent,
            queue,
            waited,
        } => (
            "conversation.assigned",
            conversation,
            json!({ "conversation_id": id(conversation), "agent_id": agent.as_str(), "queue": queue.as_str(), "waited_seconds": waited.as_secs_f64() }),
        ),
        Effect::Escalated {
            conversation,
            from_agent,
            to_queue,
        } => (
            "conversation.escalated",
            conversation,
            json!({ "conversation_id": id(conversation), "from_agent_id": from_agent.as_str(), "to_queue": to_queue.as_str() }),
        ),
        Effect::Transferred {
            conversation,
            from_agent,
            to,
        } => {
            let (to_agent, to_queue) = match to {
                TransferTarget::Agent(agent) => (Some(agent.as_str()), None),
                TransferTarget::Queue(queue) => (None, Some(queue.as_str())),
            };
            (
                "conversation.transferred",
                conversation,
                json!({ "conversation_id": id(conversation), "from_agent_id": from_agent.as_str(), "to_agent_id": to_agent, "to_queue": to_queue }),
            )
        }
        Effect::Resolved {
            conversation,
            agent,
            handle_time,
        } => (
            "conversation.resolved",
            conversation,
            json!({ "conversation_id": id(conversation), "agent_id": agent.as_str(), "handle_seconds": handle_time.as_secs_f64() }),
        ),
        Effect::Reopened {
            conversation,
            preferred_agent,
        } => (
            "conversation.reopened",
            conversation,
            json!({ "conversation_id": id(conversation), "preferred_agent_id": preferred_agent.as_ref().map(|agent| agent.as_str()) }),
        ),
        Effect::Abandoned {
            conversation,
            waited,
        } => (
            "conversation.abandoned",
            conversation,
            json!({ "conversation_id": id(conversation), "waited_seconds": waited.as_secs_f64() }),
        ),
        Effect::SlaBreached {
            conversation,
            queue,
        } => (
            "conversation.sla_breached",
            conversation,
            json!({ "conversation_id": id(conversation), "queue": queue.as_str() }),
        ),
        _ => return None,
    };
    Some(event(kind, Some(*conversation), data, time))
}

/// `conversation.created` for a conversation's first message.
pub fn conversation_created(
    conversation: ConversationId,
    channel: &str,
    contact_id: Ulid,
    time: DateTime<Utc>,
) -> NewEvent {
    event(
        "conversation.created",
        Some(conversation),
        json!({ "conversation_id": conversation_ulid(conversation).to_string(), "channel": channel, "contact_id": contact_id.to_string() }),
        time,
    )
}

/// `message.received`, carrying the whole normalised message.
pub fn message_received(
    conversation: ConversationId,
    message: &Value,
    time: DateTime<Utc>,
) -> NewEvent {
    event(
        "message.received",
        Some(conversation),
        json!({ "conversation_id": conversation_ulid(conversation).to_string(), "message": message }),
        time,
    )
}

/// `message.sent` / `message.delivery_failed` for an agent's reply.
pub fn message_delivery(
    kind: &str,
    conversation: Ulid,
    message_id: Ulid,
    channel: &str,
    detail: Option<&str>,
    time: DateTime<Utc>,
) -> NewEvent {
    NewEvent {
        event_id: Ulid::new(),
        kind: kind.to_owned(),
        conversation_id: Some(conversation),
        data: json!({ "conversation_id": conversation.to_string(), "message_id": message_id.to_string(), "channel": channel, "reason": detail }),
        time,
    }
}

/// `agent.presence`, including presence set by the router (missed offers).
pub fn agent_presence(
    agent: &str,
    presence: Presence,
    reason: &str,
    time: DateTime<Utc>,
) -> NewEvent {
    event(
        "agent.presence",
        None,
        json!({ "agent_id": agent, "presence": presence.as_str(), "reason": reason }),
        time,
    )
}

pub fn millis_to_rfc3339(millis: u64) -> String {
    DateTime::<Utc>::from_timestamp_millis(i64::try_from(millis).unwrap_or(i64::MAX))
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// The CloudEvents 1.0 structured-mode document for an outbox event. `sequence` (the conversation's
/// event number) lets consumers order events per conversation; `id` lets them deduplicate.
pub fn cloud_event(event: &OutboxEvent, source: &str) -> Value {
    let mut document = json!({
        "specversion": "1.0",
        "id": event.event_id.to_string(),
        "source": source,
        "type": format!("{TYPE_PREFIX}{}", event.kind),
        "time": event.time.to_rfc3339_opts(SecondsFormat::Millis, true),
        "datacontenttype": "application/json",
        "data": event.data,
    });
    if let Some(conversation) = event.conversation_id {
        document["subject"] = Value::String(conversation.to_string());
        document["sequence"] = Value::String(event.seq.to_string());
    }
    document
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::routing::{AgentId, Millis, QueueName};

    #[test]
    fn assigned_becomes_a_cloud_event_with_subject_and_sequence() {
        let conversation = ConversationId(Ulid::new().0);
        let effect = Effect::Assigned {
            conversation,
            agent: AgentId::new("alice"),
            queue: QueueName::new("support"),
            waited: Millis(1500),
        };
        let new = for_effect(&effect, Utc::now()).unwrap();
        assert_eq!(new.kind, "conversation.assigned");
        let outbox = OutboxEvent {
            position: 1,
            event_id: new.event_id,
            kind: new.kind,
            conversation_id: new.conversation_id,
            seq: 3,
            data: new.data,
            time: new.time,
        };
        let document = cloud_event(&outbox, "switchboard://node-1");
        assert_eq!(document["specversion"], "1.0");
        assert_eq!(document["type"], "io.switchboard.conversation.assigned");
        assert_eq!(
            document["subject"],
            conversation_ulid(conversation).to_string()
        );
        assert_eq!(document["sequence"], "3");
        assert_eq!(document["data"]["agent_id"], "alice");
        assert_eq!(document["data"]["waited_seconds"], 1.5);
    }

    #[test]
    fn internal_effects_produce_no_event() {
        let conversation = ConversationId(1);
        let effect = Effect::CancelTimer {
            key: crate::routing::TimerKey::Offer(conversation),
        };
        assert!(for_effect(&effect, Utc::now()).is_none());
    }
}
