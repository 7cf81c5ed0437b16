//! How router state is written to the store: serde mirrors of the router's snapshots (the router's own
//! types are not a wire format), and their conversion both ways.

use serde::{Deserialize, Serialize};

use crate::routing::command::PriorityReason;
use crate::routing::inspect::{
    AgentSnapshot, ConversationSnapshot, ConversationState, QueueSnapshot,
};
use crate::routing::model::SkillRequirement;
use crate::routing::{AgentId, Channel, ConversationId, Millis, Presence, QueueName, Timestamp};
use crate::store::ConversationStatus;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredConversation {
    pub seq: u64,
    pub channel: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub language: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skills: Vec<(String, u8)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub required_language: Option<String>,
    pub priority: i32,
    pub base_priority: i32,
    /// Waiting since, ms since the Unix epoch.
    pub since: u64,
    pub candidates: Vec<String>,
    pub eligible_mask: u32,
    pub state: StoredState,
    pub next_step: u16,
    pub sla_breached: bool,
    pub repeats: u8,
    pub keyword_boosted: bool,
    pub wording_boosted: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub excluded: Vec<(String, u64)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reserved_for: Option<(String, u64)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub follower: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_agent: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reasons: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum StoredState {
    Waiting,
    Offered {
        agent: String,
        queue: String,
        deadline: u64,
    },
    Assigned {
        agent: String,
        queue: String,
        since: u64,
    },
    Resolved {
        agent: String,
        at: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredAgent {
    pub presence: String,
    pub missed: u32,
    pub last_offer_at: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub wrap_ups: Vec<(String, String, u64)>,
    /// Round-robin turns: (queue, turn).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub turns: Vec<(String, u64)>,
}

/// A priority reason as a short stable word, for storage and for the supervisor view.
pub fn reason_name(reason: &PriorityReason) -> String {
    match reason {
        PriorityReason::WaitStep { queue, step } => format!("wait_step:{queue}:{step}"),
        PriorityReason::SlaBreached => "sla_breached".into(),
        PriorityReason::VipTier => "vip_tier".into(),
        PriorityReason::Keyword => "keyword".into(),
        PriorityReason::NegativeWording => "negative_wording".into(),
        PriorityReason::RepeatMessage => "repeat_message".into(),
        PriorityReason::TierEscalation => "tier_escalation".into(),
    }
}

fn parse_reason(name: &str) -> Option<PriorityReason> {
    Some(match name {
        "sla_breached" => PriorityReason::SlaBreached,
        "vip_tier" => PriorityReason::VipTier,
        "keyword" => PriorityReason::Keyword,
        "negative_wording" => PriorityReason::NegativeWording,
        "repeat_message" => PriorityReason::RepeatMessage,
        "tier_escalation" => PriorityReason::TierEscalation,
        other => {
            let rest = other.strip_prefix("wait_step:")?;
            let (queue, step) = rest.rsplit_once(':')?;
            PriorityReason::WaitStep {
                queue: QueueName::new(queue),
                step: step.parse().ok()?,
            }
        }
    })
}

/// The store status that goes with a router state.
pub fn status_of(state: &ConversationState) -> ConversationStatus {
    match state {
        ConversationState::Resolved { .. } => ConversationStatus::Resolved,
        _ => ConversationStatus::Open,
    }
}

impl From<&ConversationSnapshot> for StoredConversation {
    fn from(snapshot: &ConversationSnapshot) -> Self {
        StoredConversation {
            seq: snapshot.seq,
            channel: snapshot.channel.to_string(),
            language: snapshot.language.clone(),
            skills: snapshot
                .skills
                .iter()
                .map(|skill| (skill.skill.to_string(), skill.min_level))
                .collect(),
            required_language: snapshot.required_language.clone(),
            priority: snapshot.priority,
            base_priority: snapshot.base_priority,
            since: snapshot.since.0,
            candidates: snapshot
                .candidates
                .iter()
                .map(ToString::to_string)
                .collect(),
            eligible_mask: snapshot.eligible_mask,
            state: match &snapshot.state {
                ConversationState::Waiting => StoredState::Waiting,
                ConversationState::Offered {
                    agent,
                    queue,
                    deadline,
                } => StoredState::Offered {
                    agent: agent.to_string(),
                    queue: queue.to_string(),
                    deadline: deadline.0,
                },
                ConversationState::Assigned {
                    agent,
                    queue,
                    since,
                } => StoredState::Assigned {
                    agent: agent.to_string(),
                    queue: queue.to_string(),
                    since: since.0,
                },
                ConversationState::Resolved { agent, at } => StoredState::Resolved {
                    agent: agent.to_string(),
                    at: at.0,
                },
            },
            next_step: snapshot.next_step,
            sla_breached: snapshot.sla_breached,
            repeats: snapshot.repeats,
            keyword_boosted: snapshot.keyword_boosted,
            wording_boosted: snapshot.wording_boosted,
            excluded: snapshot
                .excluded
                .iter()
                .map(|(agent, until)| (agent.to_string(), until.0))
                .collect(),
            reserved_for: snapshot
                .reserved_for
                .as_ref()
                .map(|(agent, until)| (agent.to_string(), until.0)),
            follower: snapshot.follower.as_ref().map(ToString::to_string),
            last_agent: snapshot.last_agent.as_ref().map(ToString::to_string),
            reasons: snapshot.reasons.iter().map(reason_name).collect(),
            tags: snapshot.tags.clone(),
        }
    }
}

impl StoredConversation {
    pub fn into_snapshot(self, id: ConversationId) -> ConversationSnapshot {
        let agent = |name: &str| AgentId::new(name);
        ConversationSnapshot {
            id,
            seq: self.seq,
            channel: Channel::parse(&self.channel),
            language: self.language,
            skills: self
                .skills
                .iter()
                .map(|(skill, level)| SkillRequirement {
                    skill: skill.as_str().into(),
                    min_level: *level,
                })
                .collect(),
            required_language: self.required_language,
            priority: self.priority,
            base_priority: self.base_priority,
            since: Timestamp(self.since),
            candidates: self
                .candidates
                .iter()
                .map(|queue| QueueName::new(queue))
                .collect(),
            eligible_mask: self.eligible_mask,
            state: match self.state {
                StoredState::Waiting => ConversationState::Waiting,
                StoredState::Offered {
                    agent: who,
                    queue,
                    deadline,
                } => ConversationState::Offered {
                    agent: agent(&who),
                    queue: QueueName::new(&queue),
                    deadline: Timestamp(deadline),
                },
                StoredState::Assigned {
                    agent: who,
                    queue,
                    since,
                } => ConversationState::Assigned {
                    agent: agent(&who),
                    queue: QueueName::new(&queue),
                    since: Timestamp(since),
                },
                StoredState::Resolved { agent: who, at } => ConversationState::Resolved {
                    agent: agent(&who),
                    at: Timestamp(at),
                },
            },
            next_step: self.next_step,
            sla_breached: self.sla_breached,
            repeats: self.repeats,
            keyword_boosted: self.keyword_boosted,
            wording_boosted: self.wording_boosted,
            excluded: self
                .excluded
                .iter()
                .map(|(who, until)| (agent(who), Timestamp(*until)))
                .collect(),
            reserved_for: self
                .reserved_for
                .as_ref()
                .map(|(who, until)| (agent(who), Timestamp(*until))),
            follower: self.follower.as_deref().map(agent),
            last_agent: self.last_agent.as_deref().map(agent),
            reasons: self
                .reasons
                .iter()
                .filter_map(|name| parse_reason(name))
                .collect(),
            tags: self.tags,
        }
    }
}

impl From<&AgentSnapshot> for StoredAgent {
    fn from(snapshot: &AgentSnapshot) -> Self {
        StoredAgent {
            presence: snapshot.presence.as_str().to_owned(),
            missed: snapshot.missed,
            last_offer_at: snapshot.last_offer_at.0,
            wrap_ups: snapshot
                .wrap_ups
                .iter()
                .map(|(conversation, channel, until)| {
                    (
                        ulid::Ulid(conversation.0).to_string(),
                        channel.to_string(),
                        until.0,
                    )
                })
                .collect(),
            turns: snapshot
                .turns
                .iter()
                .map(|(queue, turn)| (queue.to_string(), *turn))
                .collect(),
        }
    }
}

impl StoredAgent {
    pub fn into_snapshot(self, id: &str) -> AgentSnapshot {
        AgentSnapshot {
            id: AgentId::new(id),
            presence: parse_presence(&self.presence).unwrap_or(Presence::Offline),
            missed: self.missed,
            last_offer_at: Timestamp(self.last_offer_at),
            wrap_ups: self
                .wrap_ups
                .iter()
                .filter_map(|(conversation, channel, until)| {
                    let conversation = conversation.parse::<ulid::Ulid>().ok()?;
                    Some((
                        ConversationId(conversation.0),
                        Channel::parse(channel),
                        Timestamp(*until),
                    ))
                })
                .collect(),
            turns: self
                .turns
                .iter()
                .map(|(queue, turn)| (QueueName::new(queue), *turn))
                .collect(),
        }
    }
}

/// A queue's stored state: what its estimated waits are computed from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredQueue {
    /// Recent handle times in milliseconds, oldest first.
    pub recent_handle_times: Vec<u64>,
}

impl From<&QueueSnapshot> for StoredQueue {
    fn from(snapshot: &QueueSnapshot) -> Self {
        StoredQueue {
            recent_handle_times: snapshot.recent_handle_times.iter().map(|t| t.0).collect(),
        }
    }
}

impl StoredQueue {
    pub fn into_snapshot(self, name: &str) -> QueueSnapshot {
        QueueSnapshot {
            name: QueueName::new(name),
            recent_handle_times: self.recent_handle_times.into_iter().map(Millis).collect(),
        }
    }
}

pub fn parse_presence(text: &str) -> Option<Presence> {
    match text {
        "available" => Some(Presence::Available),
        "away" => Some(Presence::Away),
        "offline" => Some(Presence::Offline),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn agent_documents_keep_round_robin_turns_and_older_documents_still_load() {
        let snapshot = AgentSnapshot {
            id: AgentId::new("amy"),
            presence: Presence::Available,
            missed: 1,
            last_offer_at: Timestamp(42),
            wrap_ups: Vec::new(),
            turns: vec![(QueueName::new("support"), 7), (QueueName::new("sales"), 3)],
        };
        let document = serde_json::to_value(StoredAgent::from(&snapshot)).unwrap();
        assert_eq!(
            document["turns"],
            serde_json::json!([["support", 7], ["sales", 3]])
        );
        let stored: StoredAgent = serde_json::from_value(document).unwrap();
        assert_eq!(stored.into_snapshot("amy"), snapshot);
        // Written before turns were stored: no turns, everything else as it was.
        let older = serde_json::json!({"presence": "away", "missed": 0, "last_offer_at": 5});
        let stored: StoredAgent = serde_json::from_value(older).unwrap();
        let restored = stored.into_snapshot("amy");
        assert!(restored.turns.is_empty());
        assert_eq!(restored.presence, Presence::Away);
    }
}
