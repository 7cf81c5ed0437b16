//! Events for other systems: which router effects become which event, and the CloudEvents envelope.
//!
//! Event names follow DESIGN.md (`conversation.assigned`, `message.received`, `agent.presence`...). An
//! event is written to the outbox in the same commit as the state change that caused it; the relay
//! wraps it as a CloudEvents 1.0 structured-mode JSON document when publishing.

use chrono::{DateTime, SecondsFormat, Utc};
use schemars::JsonSchema;
use serde::Serialize;
use serde_json::{Value, json};
use ulid::Ulid;

use crate::message::InboundMessage;

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

/// Serialises an event's data. The data types derive `Serialize` from plain strings and numbers,
/// which cannot fail; `Null` would only mark a bug.
fn data<T: Serialize>(data: T) -> Value {
    serde_json::to_value(data).unwrap_or(Value::Null)
}

/// `conversation.created`: a customer's first message opened a conversation.
#[derive(Debug, Serialize, JsonSchema)]
pub struct ConversationCreated {
    pub conversation_id: String,
    pub channel: String,
    pub contact_id: String,
}

/// `conversation.queued`: waiting for an agent, with the customer's place and estimated wait.
#[derive(Debug, Serialize, JsonSchema)]
pub struct ConversationQueued {
    pub conversation_id: String,
    pub queue: String,
    pub position: u32,
    pub estimated_wait_seconds: f64,
}

/// `conversation.offered`: offered to one agent until `deadline` (RFC 3339).
#[derive(Debug, Serialize, JsonSchema)]
pub struct ConversationOffered {
    pub conversation_id: String,
    pub agent_id: String,
    pub queue: String,
    pub deadline: String,
}

/// `conversation.assigned`: an agent accepted it.
#[derive(Debug, Serialize, JsonSchema)]
pub struct ConversationAssigned {
    pub conversation_id: String,
    pub agent_id: String,
    pub queue: String,
    pub waited_seconds: f64,
}

/// `conversation.escalated`: moved to the next support tier; the first agent follows it.
#[derive(Debug, Serialize, JsonSchema)]
pub struct ConversationEscalated {
    pub conversation_id: String,
    pub from_agent_id: String,
    pub to_queue: String,
}

/// `conversation.transferred`: to another agent or queue (exactly one of the two is set).
#[derive(Debug, Serialize, JsonSchema)]
pub struct ConversationTransferred {
    pub conversation_id: String,
    pub from_agent_id: String,
    pub to_agent_id: Option<String>,
    pub to_queue: Option<String>,
}

/// `conversation.resolved`.
#[derive(Debug, Serialize, JsonSchema)]
pub struct ConversationResolved {
    pub conversation_id: String,
    pub agent_id: String,
    /// The queue it was assigned from.
    pub queue: String,
    pub handle_seconds: f64,
}

/// `conversation.reopened`: the customer wrote again within the reopen window.
#[derive(Debug, Serialize, JsonSchema)]
pub struct ConversationReopened {
    pub conversation_id: String,
    pub preferred_agent_id: Option<String>,
}

/// `conversation.abandoned`: the customer left before being answered.
#[derive(Debug, Serialize, JsonSchema)]
pub struct ConversationAbandoned {
    pub conversation_id: String,
    pub waited_seconds: f64,
}

/// `conversation.sla_breached`: not answered within the queue's SLA target.
#[derive(Debug, Serialize, JsonSchema)]
pub struct ConversationSlaBreached {
    pub conversation_id: String,
    pub queue: String,
}

/// `conversation.rated`: the customer rated the resolved conversation (once per conversation).
#[derive(Debug, Serialize, JsonSchema)]
pub struct ConversationRated<'a> {
    pub conversation_id: String,
    /// 1 (poor) to 5 (excellent).
    #[schemars(range(min = 1, max = 5))]
    pub score: u8,
    /// The customer's words; may be empty.
    pub comment: &'a str,
    /// The agent who resolved it, when known.
    pub agent_id: Option<&'a str>,
}

/// `message.received`: the whole stored `switchboard.message.v1`.
#[derive(Debug, Serialize, JsonSchema)]
pub struct MessageReceived<'a> {
    pub conversation_id: String,
    #[schemars(with = "InboundMessage")]
    pub message: &'a Value,
}

/// `message.sent` / `message.delivery_failed`: what became of an agent's reply (`reason` on failure).
#[derive(Debug, Serialize, JsonSchema)]
pub struct MessageDelivery<'a> {
    pub conversation_id: String,
    pub message_id: String,
    pub channel: &'a str,
    pub reason: Option<&'a str>,
}

/// `agent.presence`, including presence set by the router (`reason`: `agent`, `missed_offers`...).
#[derive(Debug, Serialize, JsonSchema)]
pub struct AgentPresence<'a> {
    pub agent_id: &'a str,
    pub presence: &'a str,
    pub reason: &'a str,
}

/// Every event kind and the JSON Schema of its data, as published in `schemas/events/`.
pub fn data_schemas() -> Vec<(&'static str, Value)> {
    fn schema<T: JsonSchema>() -> Value {
        serde_json::to_value(schemars::schema_for!(T)).unwrap_or_default()
    }
    vec![
        ("conversation.created", schema::<ConversationCreated>()),
        ("conversation.queued", schema::<ConversationQueued>()),
        ("conversation.offered", schema::<ConversationOffered>()),
        ("conversation.assigned", schema::<ConversationAssigned>()),
        ("conversation.escalated", schema::<ConversationEscalated>()),
        (
            "conversation.transferred",
            schema::<ConversationTransferred>(),
        ),
        ("conversation.resolved", schema::<ConversationResolved>()),
        ("conversation.reopened", schema::<ConversationReopened>()),
        ("conversation.abandoned", schema::<ConversationAbandoned>()),
        (
            "conversation.sla_breached",
            schema::<ConversationSlaBreached>(),
        ),
        ("conversation.rated", schema::<ConversationRated<'static>>()),
        ("message.received", schema::<MessageReceived<'static>>()),
        ("message.sent", schema::<MessageDelivery<'static>>()),
        (
            "message.delivery_failed",
            schema::<MessageDelivery<'static>>(),
        ),
        ("agent.presence", schema::<AgentPresence<'static>>()),
    ]
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
            data(ConversationQueued {
                conversation_id: id(conversation),
                queue: queue.as_str().to_owned(),
                position: *position,
                estimated_wait_seconds: estimated_wait.as_secs_f64(),
            }),
        ),
        Effect::Offered {
            conversation,
            agent,
            queue,
            deadline,
        } => (
            "conversation.offered",
            conversation,
            data(ConversationOffered {
                conversation_id: id(conversation),
                agent_id: agent.as_str().to_owned(),
                queue: queue.as_str().to_owned(),
                deadline: millis_to_rfc3339(deadline.0),
            }),
        ),
        Effect::Assigned {
            conversation,
            agent,
            queue,
            waited,
        } => (
            "conversation.assigned",
            conversation,
            data(ConversationAssigned {
                conversation_id: id(conversation),
                agent_id: agent.as_str().to_owned(),
                queue: queue.as_str().to_owned(),
                waited_seconds: waited.as_secs_f64(),
            }),
        ),
        Effect::Escalated {
            conversation,
            from_agent,
            to_queue,
        } => (
            "conversation.escalated",
            conversation,
            data(ConversationEscalated {
                conversation_id: id(conversation),
                from_agent_id: from_agent.as_str().to_owned(),
                to_queue: to_queue.as_str().to_owned(),
            }),
        ),
        Effect::Transferred {
            conversation,
            from_agent,
            to,
        } => {
            let (to_agent_id, to_queue) = match to {
                TransferTarget::Agent(agent) => (Some(agent.as_str().to_owned()), None),
                TransferTarget::Queue(queue) => (None, Some(queue.as_str().to_owned())),
            };
            (
                "conversation.transferred",
                conversation,
                data(ConversationTransferred {
                    conversation_id: id(conversation),
                    from_agent_id: from_agent.as_str().to_owned(),
                    to_agent_id,
                    to_queue,
                }),
            )
        }
        Effect::Resolved {
            conversation,
            agent,
            queue,
            handle_time,
        } => (
            "conversation.resolved",
            conversation,
            data(ConversationResolved {
                conversation_id: id(conversation),
                agent_id: agent.as_str().to_owned(),
                queue: queue.as_str().to_owned(),
                handle_seconds: handle_time.as_secs_f64(),
            }),
        ),
        Effect::Reopened {
            conversation,
            preferred_agent,
        } => (
            "conversation.reopened",
            conversation,
            data(ConversationReopened {
                conversation_id: id(conversation),
                preferred_agent_id: preferred_agent
                    .as_ref()
                    .map(|agent| agent.as_str().to_owned()),
            }),
        ),
        Effect::Abandoned {
            conversation,
            waited,
        } => (
            "conversation.abandoned",
            conversation,
            data(ConversationAbandoned {
                conversation_id: id(conversation),
                waited_seconds: waited.as_secs_f64(),
            }),
        ),
        Effect::SlaBreached {
            conversation,
            queue,
        } => (
            "conversation.sla_breached",
            conversation,
            data(ConversationSlaBreached {
                conversation_id: id(conversation),
                queue: queue.as_str().to_owned(),
            }),
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
        data(ConversationCreated {
            conversation_id: conversation_ulid(conversation).to_string(),
            channel: channel.to_owned(),
            contact_id: contact_id.to_string(),
        }),
        time,
    )
}

/// `conversation.rated`, from a stored rating.
pub fn conversation_rated(rating: &crate::store::Rating) -> NewEvent {
    NewEvent {
        event_id: Ulid::new(),
        kind: "conversation.rated".into(),
        conversation_id: Some(rating.conversation_id),
        data: data(ConversationRated {
            conversation_id: rating.conversation_id.to_string(),
            score: rating.score,
            comment: &rating.comment,
            agent_id: rating.agent_id.as_deref(),
        }),
        time: rating.rated_at,
    }
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
        data(MessageReceived {
            conversation_id: conversation_ulid(conversation).to_string(),
            message,
        }),
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
        data: data(MessageDelivery {
            conversation_id: conversation.to_string(),
            message_id: message_id.to_string(),
            channel,
            reason: detail,
        }),
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
        data(AgentPresence {
            agent_id: agent,
            presence: presence.as_str(),
            reason,
        }),
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
