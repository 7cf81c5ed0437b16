//! The router's configuration: queues, routing rules, agents and priority policy, as validated Rust types.
//!
//! These are not a file format: the daemon's config loader and the simulator's scenario parser build
//! them, and [`RoutingConfig::validate`] is the one place that decides whether a configuration is
//! usable. Regexes arrive compiled, so a bad pattern is rejected where the text is parsed.

use std::collections::HashSet;
use std::sync::Arc;

use regex::Regex;

use super::hours::BusinessHours;
use super::model::{AgentId, Channel, Priority, QueueName, SkillRequirement};
use super::time::Millis;
use super::wording::NegativeWording;

/// Everything the router needs to decide. Replaceable at run time without losing state.
#[derive(Debug, Clone)]
pub struct RoutingConfig {
    pub queues: Vec<QueueConfig>,
    /// Ordered; the first rule that matches a new conversation decides its queues and priority.
    pub rules: Vec<RoutingRule>,
    /// Candidate queues for a conversation no rule matches.
    pub default_queues: Vec<QueueName>,
    pub agents: Vec<AgentConfig>,
    pub priority: PriorityPolicy,
    pub offers: OfferPolicy,
    pub reopen: ReopenPolicy,
    /// How long a conversation transferred to a named agent waits for that agent before it falls
    /// back to its queue.
    pub transfer_agent_wait: Millis,
    /// Scores customer text for negative wording; `None` turns that escalation off.
    pub wording: Option<Arc<NegativeWording>>,
}

/// How an eligible agent is chosen among several free ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Strategy {
    /// The agent whose last offer (or sign-in) lies furthest back.
    #[default]
    LongestIdle,
    /// The agent with the lowest share of their total capacity in use, then longest idle.
    LeastOccupied,
    /// Agents take turns in the order they last got an offer from this queue.
    RoundRobin,
    /// The agent with the highest summed level in the skills the conversation needs, then longest idle.
    MostSkilled,
}

impl Strategy {
    pub fn parse(name: &str) -> Option<Strategy> {
        match name {
            "longest_idle" => Some(Strategy::LongestIdle),
            "least_occupied" => Some(Strategy::LeastOccupied),
            "round_robin" => Some(Strategy::RoundRobin),
            "most_skilled" => Some(Strategy::MostSkilled),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::LongestIdle => "longest_idle",
            Strategy::LeastOccupied => "least_occupied",
            Strategy::RoundRobin => "round_robin",
            Strategy::MostSkilled => "most_skilled",
        }
    }
}

/// A queue of waiting conversations and the agents who serve it.
#[derive(Debug, Clone)]
pub struct QueueConfig {
    pub name: QueueName,
    /// Channels this queue accepts; empty accepts every channel.
    pub channels: Vec<Channel>,
    /// Agents with all these skills serve the queue even when not listed as members.
    pub required_skills: Vec<SkillRequirement>,
    pub strategy: Strategy,
    /// Service-level target: answer within this long.
    pub sla_target: Millis,
    /// How long an offer waits for the agent's accept before it is withdrawn.
    pub offer_timeout: Millis,
    /// Offers are assigned at once, without an accept (for email-like work).
    pub auto_accept: bool,
    /// Capacity held after a resolve so the agent can finish notes.
    pub wrap_up: Millis,
    /// `None`: always open.
    pub business_hours: Option<BusinessHours>,
    /// Applied in order of `after` while a conversation waits unanswered in this queue.
    pub escalation: Vec<EscalationStep>,
    /// When this queue is a later candidate, a conversation becomes eligible here after waiting this long.
    pub overflow_after: Millis,
    /// Where an agent's explicit escalation sends a conversation (the next support tier).
    pub next_tier: Option<QueueName>,
    /// Handle time assumed for the estimated wait until real handle times have been seen.
    pub default_handle_time: Millis,
}

impl QueueConfig {
    /// A queue with the given name and product defaults; the config loader overrides what is set.
    pub fn new(name: &str) -> QueueConfig {
        QueueConfig {
            name: QueueName::new(name),
            channels: Vec::new(),
            required_skills: Vec::new(),
            strategy: Strategy::LongestIdle,
            sla_target: Millis::from_secs(60),
            offer_timeout: Millis::from_secs(30),
            auto_accept: false,
            wrap_up: Millis::ZERO,
            business_hours: None,
            escalation: Vec::new(),
            overflow_after: Millis::from_secs(60),
            next_tier: None,
            default_handle_time: Millis::from_secs(300),
        }
    }

    pub fn accepts(&self, channel: &Channel) -> bool {
        self.channels.is_empty() || self.channels.contains(channel)
    }
}

/// One step of a queue's wait-time escalation.
#[derive(Debug, Clone, PartialEq)]
pub struct EscalationStep {
    /// Waiting time (since the conversation started waiting) at which the step applies.
    pub after: Millis,
    pub action: EscalationAction,
}

#[derive(Debug, Clone, PartialEq)]
pub enum EscalationAction {
    RaiseBy(Priority),
    /// Sets the priority to at least this value (never lowers it).
    SetTo(Priority),
    /// Makes the conversation eligible in another queue as well.
    OverflowTo(QueueName),
}

/// What a routing rule looks at. Every criterion given must match; an empty list matches anything.
#[derive(Debug, Clone, Default)]
pub struct RuleMatch {
    pub channels: Vec<Channel>,
    pub providers: Vec<String>,
    /// Destination addresses (the number, mailbox or page the customer wrote to), compared exactly
    /// after the adapter normalised them.
    pub to_addresses: Vec<String>,
    pub tiers: Vec<String>,
    /// Language tags; `"es"` matches `"es"` and `"es-MX"`.
    pub languages: Vec<String>,
    /// Words or phrases, case-insensitive, any of which must appear in subject or text.
    pub keywords: Vec<String>,
    /// A regex over subject and text.
    pub pattern: Option<Regex>,
}

/// What a matching rule decides.
#[derive(Debug, Clone, Default)]
pub struct RuleAction {
    /// Candidate queues in order: first free queue wins, later ones by overflow.
    pub queues: Vec<QueueName>,
    pub priority: Priority,
    /// Skills the agent needs on top of the queue's.
    pub skills: Vec<SkillRequirement>,
    /// Only agents who speak the customer's language (when any configured agent speaks it).
    pub require_language: bool,
    pub tags: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct RoutingRule {
    pub name: String,
    pub when: RuleMatch,
    pub then: RuleAction,
}

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub id: AgentId,
    pub name: String,
    pub queues: Vec<QueueName>,
    pub skills: Vec<(Arc<str>, u8)>,
    pub languages: Vec<String>,
    /// Concurrent conversations per channel; a channel not listed gets none.
    pub capacity: Vec<(Channel, u16)>,
    /// Cap on all channels together.
    pub max_total: u16,
}

impl AgentConfig {
    /// Does this agent serve `queue`: listed as a member, or holding every skill the queue requires?
    pub fn serves(&self, queue: &QueueConfig) -> bool {
        if self.queues.contains(&queue.name) {
            return true;
        }
        !queue.required_skills.is_empty()
            && queue.required_skills.iter().all(|requirement| {
                self.skills.iter().any(|(skill, level)| {
                    **skill == *requirement.skill && *level >= requirement.min_level
                })
            })
    }
}

/// Rules that raise priority.
#[derive(Debug, Clone)]
pub struct PriorityPolicy {
    /// Added at arrival for these customer tiers (e.g. `vip`).
    pub tiers: Vec<(String, Priority)>,
    /// Added at arrival (and once per later message) when the pattern matches subject or text.
    pub keywords: Vec<KeywordBoost>,
    /// Added once when a customer message reads negative.
    pub negative_wording: Priority,
    /// Added each time the customer writes again while still unanswered, at most `repeat_max` times.
    pub repeat_message: Priority,
    pub repeat_max: u8,
    /// Added when the queue's SLA target passes unanswered.
    pub sla_breach: Priority,
    /// Added when an agent escalates the conversation to the next tier.
    pub tier_escalation: Priority,
}

impl Default for PriorityPolicy {
    fn default() -> Self {
        PriorityPolicy {
            tiers: vec![("vip".to_owned(), 20)],
            keywords: Vec::new(),
            negative_wording: 10,
            repeat_message: 5,
            repeat_max: 3,
            sla_breach: 10,
            tier_escalation: 10,
        }
    }
}

#[derive(Debug, Clone)]
pub struct KeywordBoost {
    pub pattern: Regex,
    pub boost: Priority,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OfferPolicy {
    /// Consecutive missed offers (rejected or timed out) after which the agent is set away.
    pub max_missed: u32,
    /// After a miss, the conversation is not offered to the same agent again for this long.
    pub reoffer_cooldown: Millis,
}

impl Default for OfferPolicy {
    fn default() -> Self {
        OfferPolicy {
            max_missed: 3,
            reoffer_cooldown: Millis::from_secs(60),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReopenPolicy {
    /// A resolved conversation the customer writes to within this window reopens.
    pub window: Millis,
    /// A reopened conversation waits this long for its last agent before routing normally.
    pub prefer_last_agent_for: Millis,
}

impl Default for ReopenPolicy {
    fn default() -> Self {
        ReopenPolicy {
            window: Millis::from_secs(24 * 3600),
            prefer_last_agent_for: Millis::from_secs(120),
        }
    }
}

/// Why a configuration cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("queue `{0}` is defined twice")]
    DuplicateQueue(String),
    #[error("agent `{0}` is defined twice")]
    DuplicateAgent(String),
    #[error("{place} names unknown queue `{queue}`")]
    UnknownQueue { place: String, queue: String },
    #[error("{0} lists no queues")]
    NoQueues(String),
    #[error("agent `{agent}` has capacity 0 for {what}")]
    ZeroCapacity { agent: String, what: String },
    #[error("queue `{queue}` has a zero {what}")]
    ZeroDuration { queue: String, what: String },
    #[error("queue `{queue}`: escalation steps must be in increasing order of `after`")]
    UnorderedEscalation { queue: String },
    #[error("queue `{queue}` accepts none of the channels of {place}")]
    ChannelNeverAccepted { queue: String, place: String },
    #[error("offers.max_missed must be at least 1")]
    ZeroMaxMissed,
    #[error("the routing rules' keywords cannot be compiled: {0}")]
    Keywords(String),
}

impl RoutingConfig {
    /// A configuration with one queue and no agents; a starting point for tests and the simulator.
    pub fn single_queue(queue: QueueConfig) -> RoutingConfig {
        RoutingConfig {
            default_queues: vec![queue.name.clone()],
            queues: vec![queue],
            rules: Vec::new(),
            agents: Vec::new(),
            priority: PriorityPolicy::default(),
            offers: OfferPolicy::default(),
            reopen: ReopenPolicy::default(),
            transfer_agent_wait: Millis::from_secs(60),
            wording: None,
        }
    }

    pub fn queue(&self, name: &str) -> Option<&QueueConfig> {
        self.queues.iter().find(|queue| queue.name.as_str() == name)
    }

    /// What is valid but probably a mistake: agents who serve no queue (they can never be offered
    /// anything), queues no agent serves (what lands there waits forever), and channels an agent has
    /// capacity for that none of their queues accepts. `check-config` prints these; `run` logs them.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        for agent in &self.agents {
            let served: Vec<&QueueConfig> = self
                .queues
                .iter()
                .filter(|queue| agent.serves(queue))
                .collect();
            if served.is_empty() {
                warnings.push(format!(
                    "agent `{}` serves no queue: nothing can be offered to them",
                    agent.id
                ));
                continue;
            }
            for (channel, slots) in &agent.capacity {
                let accepted = served
                    .iter()
                    .any(|queue| queue.channels.is_empty() || queue.channels.contains(channel));
                if *slots > 0 && !accepted {
                    warnings.push(format!(
                        "agent `{}` has capacity for channel `{channel}` but none of their queues accepts it",
                        agent.id
                    ));
                }
            }
        }
        for queue in &self.queues {
            if !self.agents.iter().any(|agent| agent.serves(queue)) {
                warnings.push(format!(
                    "queue `{}` has no agent: conversations routed there wait until one is added",
                    queue.name
                ));
            }
        }
        warnings
    }

    /// Checks every cross-reference and bound. The router only ever runs a validated configuration.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut queue_names = HashSet::new();
        for queue in &self.queues {
            if !queue_names.insert(queue.name.as_str()) {
                return Err(ConfigError::DuplicateQueue(queue.name.to_string()));
            }
        }
        let known = |place: &str, queue: &QueueName| {
            if queue_names.contains(queue.as_str()) {
                Ok(())
            } else {
                Err(ConfigError::UnknownQueue {
                    place: place.to_owned(),
                    queue: queue.to_string(),
                })
            }
        };
        for queue in &self.queues {
            let place = format!("queue `{}`", queue.name);
            if queue.offer_timeout == Millis::ZERO {
                return Err(ConfigError::ZeroDuration {
                    queue: queue.name.to_string(),
                    what: "offer_timeout".into(),
                });
            }
            if queue.sla_target == Millis::ZERO {
                return Err(ConfigError::ZeroDuration {
                    queue: queue.name.to_string(),
                    what: "sla_target".into(),
                });
            }
            if let Some(next) = &queue.next_tier {
                known(&format!("{place} next_tier"), next)?;
            }
            if queue
                .escalation
                .windows(2)
                .any(|pair| pair[0].after > pair[1].after)
            {
                return Err(ConfigError::UnorderedEscalation {
                    queue: queue.name.to_string(),
                });
            }
            for step in &queue.escalation {
                if let EscalationAction::OverflowTo(target) = &step.action {
                    known(&format!("{place} escalation"), target)?;
                }
            }
        }
        if self.default_queues.is_empty() {
            return Err(ConfigError::NoQueues("default_queues".into()));
        }
        for queue in &self.default_queues {
            known("default_queues", queue)?;
        }
        for rule in &self.rules {
            let place = format!("rule `{}`", rule.name);
            if rule.then.queues.is_empty() {
                return Err(ConfigError::NoQueues(place));
            }
            for queue in &rule.then.queues {
                known(&place, queue)?;
                let accepts_some = rule.when.channels.is_empty()
                    || rule.when.channels.iter().any(|channel| {
                        self.queue(queue.as_str())
                            .is_some_and(|q| q.accepts(channel))
                    });
                if !accepts_some {
                    return Err(ConfigError::ChannelNeverAccepted {
                        queue: queue.to_string(),
                        place,
                    });
                }
            }
        }
        let mut agent_ids = HashSet::new();
        for agent in &self.agents {
            if !agent_ids.insert(agent.id.as_str()) {
                return Err(ConfigError::DuplicateAgent(agent.id.to_string()));
            }
            for queue in &agent.queues {
                known(&format!("agent `{}`", agent.id), queue)?;
            }
            if agent.max_total == 0 {
                return Err(ConfigError::ZeroCapacity {
                    agent: agent.id.to_string(),
                    what: "max_total".into(),
                });
            }
            if let Some((channel, _)) = agent.capacity.iter().find(|(_, slots)| *slots == 0) {
                return Err(ConfigError::ZeroCapacity {
                    agent: agent.id.to_string(),
                    what: format!("channel {channel}"),
                });
            }
        }
        if self.offers.max_missed == 0 {
            return Err(ConfigError::ZeroMaxMissed);
        }
        Ok(())
    }
}
