//! The TOML shape of queues, rules, agents and priority policy, and its conversion to [`RoutingConfig`].
//!
//! One format serves the daemon's config file and the simulator's scenarios, so a routing change
//! tried in the simulator is pasted into production unchanged.

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::NaiveDate;
use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::routing::config::{
    AgentConfig, EscalationAction, EscalationStep, KeywordBoost, OfferPolicy, PriorityPolicy,
    QueueConfig, ReopenPolicy, RoutingRule, RuleAction, RuleMatch,
};
use crate::routing::hours::BusinessHours;
use crate::routing::model::SkillRequirement;
use crate::routing::wording::{Lexicon, NegativeWording};
use crate::routing::{AgentId, Channel, Millis, QueueName, RoutingConfig, Strategy};

/// Why a routing section cannot be used; names the place.
#[derive(Debug, thiserror::Error)]
pub enum RoutingFileError {
    #[error("{place}: {reason}")]
    Invalid { place: String, reason: String },
    #[error(transparent)]
    Config(#[from] crate::routing::config::ConfigError),
}

fn invalid(place: impl Into<String>, reason: impl Into<String>) -> RoutingFileError {
    RoutingFileError::Invalid {
        place: place.into(),
        reason: reason.into(),
    }
}

/// Routing-wide settings (`[routing]`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingSection {
    /// Candidate queues for conversations no rule matches.
    pub default_queues: Vec<String>,
    #[serde(default = "default_transfer_wait")]
    pub transfer_agent_wait_seconds: u64,
    #[serde(default)]
    pub offers: OffersSection,
    #[serde(default)]
    pub reopen: ReopenSection,
    #[serde(default)]
    pub priority: PrioritySection,
    #[serde(default)]
    pub wording: WordingSection,
}

fn default_transfer_wait() -> u64 {
    60
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OffersSection {
    pub max_missed: u32,
    pub reoffer_cooldown_seconds: u64,
}

impl Default for OffersSection {
    fn default() -> Self {
        let policy = OfferPolicy::default();
        OffersSection {
            max_missed: policy.max_missed,
            reoffer_cooldown_seconds: policy.reoffer_cooldown.0 / 1000,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ReopenSection {
    pub window_seconds: u64,
    pub prefer_last_agent_seconds: u64,
}

impl Default for ReopenSection {
    fn default() -> Self {
        let policy = ReopenPolicy::default();
        ReopenSection {
            window_seconds: policy.window.0 / 1000,
            prefer_last_agent_seconds: policy.prefer_last_agent_for.0 / 1000,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrioritySection {
    /// Boost per customer tier, e.g. `{ vip = 20, gold = 10 }`.
    pub tiers: BTreeMap<String, i32>,
    pub keywords: Vec<KeywordSection>,
    pub negative_wording: i32,
    pub repeat_message: i32,
    pub repeat_max: u8,
    pub sla_breach: i32,
    pub tier_escalation: i32,
}

impl Default for PrioritySection {
    fn default() -> Self {
        let policy = PriorityPolicy::default();
        PrioritySection {
            tiers: policy.tiers.into_iter().collect(),
            keywords: Vec::new(),
            negative_wording: policy.negative_wording,
            repeat_message: policy.repeat_message,
            repeat_max: policy.repeat_max,
            sla_breach: policy.sla_breach,
            tier_escalation: policy.tier_escalation,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KeywordSection {
    /// A regex; use `(?i)` for case-insensitive.
    pub pattern: String,
    pub boost: i32,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct WordingSection {
    pub enabled: bool,
    /// Extra lexicon files (TOML, see `config/lexicons/en.toml`); English is built in.
    pub lexicons: Vec<String>,
    pub fallback_language: String,
}

impl Default for WordingSection {
    fn default() -> Self {
        WordingSection {
            enabled: true,
            lexicons: Vec::new(),
            fallback_language: "en".into(),
        }
    }
}

/// One `[[queues]]` entry.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct QueueSection {
    pub name: String,
    #[serde(default)]
    pub channels: Vec<String>,
    /// Agents with these skills (at these levels) serve the queue without being members.
    #[serde(default)]
    pub skills: BTreeMap<String, u8>,
    #[serde(default = "default_strategy")]
    pub strategy: String,
    #[serde(default = "default_sla")]
    pub sla_seconds: u64,
    #[serde(default = "default_offer_timeout")]
    pub offer_timeout_seconds: u64,
    #[serde(default)]
    pub auto_accept: bool,
    #[serde(default)]
    pub wrap_up_seconds: u64,
    #[serde(default = "default_overflow")]
    pub overflow_after_seconds: u64,
    #[serde(default)]
    pub next_tier: Option<String>,
    #[serde(default = "default_handle_time")]
    pub default_handle_time_seconds: u64,
    #[serde(default)]
    pub escalation: Vec<EscalationSection>,
    #[serde(default)]
    pub business_hours: Option<BusinessHoursSection>,
}

fn default_strategy() -> String {
    "longest_idle".into()
}
fn default_sla() -> u64 {
    60
}
fn default_offer_timeout() -> u64 {
    30
}
fn default_overflow() -> u64 {
    60
}
fn default_handle_time() -> u64 {
    300
}

/// `{ after_seconds = 120, raise_by = 5 }`, `{ after_seconds = 300, set_to = 50 }` or
/// `{ after_seconds = 600, overflow_to = "general" }`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EscalationSection {
    pub after_seconds: u64,
    #[serde(default)]
    pub raise_by: Option<i32>,
    #[serde(default)]
    pub set_to: Option<i32>,
    #[serde(default)]
    pub overflow_to: Option<String>,
}

/// Weekly hours as `"HH:MM-HH:MM"` intervals per day, in an IANA time zone.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BusinessHoursSection {
    pub timezone: String,
    #[serde(default)]
    pub monday: Vec<String>,
    #[serde(default)]
    pub tuesday: Vec<String>,
    #[serde(default)]
    pub wednesday: Vec<String>,
    #[serde(default)]
    pub thursday: Vec<String>,
    #[serde(default)]
    pub friday: Vec<String>,
    #[serde(default)]
    pub saturday: Vec<String>,
    #[serde(default)]
    pub sunday: Vec<String>,
    /// `YYYY-MM-DD` dates closed all day.
    #[serde(default)]
    pub closed_dates: Vec<String>,
}

/// One `[[rules]]` entry: `match` criteria and what they set.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSection {
    pub name: String,
    #[serde(default, rename = "match")]
    pub when: RuleMatchSection,
    pub queues: Vec<String>,
    #[serde(default)]
    pub priority: i32,
    #[serde(default)]
    pub skills: BTreeMap<String, u8>,
    #[serde(default)]
    pub require_language: bool,
    #[serde(default)]
    pub tags: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RuleMatchSection {
    #[serde(default)]
    pub channels: Vec<String>,
    #[serde(default)]
    pub providers: Vec<String>,
    /// Destination addresses: the number, mailbox or page written to.
    #[serde(default)]
    pub to: Vec<String>,
    #[serde(default)]
    pub tiers: Vec<String>,
    #[serde(default)]
    pub languages: Vec<String>,
    #[serde(default)]
    pub keywords: Vec<String>,
    #[serde(default)]
    pub pattern: Option<String>,
}

/// One `[[agents]]` entry.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AgentSection {
    pub id: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub queues: Vec<String>,
    #[serde(default)]
    pub skills: BTreeMap<String, u8>,
    #[serde(default)]
    pub languages: Vec<String>,
    /// Concurrent conversations per channel, e.g. `{ chat = 3, email = 5 }`.
    pub capacity: BTreeMap<String, u16>,
    /// Cap over all channels; defaults to the sum of the per-channel capacities.
    #[serde(default)]
    pub max_total: Option<u16>,
}

/// Builds the router's configuration. `read_lexicon` loads an extra lexicon file's text.
pub fn build_routing(
    section: &RoutingSection,
    queues: &[QueueSection],
    rules: &[RuleSection],
    agents: &[AgentSection],
    read_lexicon: &dyn Fn(&str) -> Result<String, String>,
) -> Result<RoutingConfig, RoutingFileError> {
    let queues = queues
        .iter()
        .map(build_queue)
        .collect::<Result<Vec<_>, _>>()?;
    let rules = rules
        .iter()
        .map(build_rule)
        .collect::<Result<Vec<_>, _>>()?;
    let agents = agents
        .iter()
        .map(build_agent)
        .collect::<Result<Vec<_>, _>>()?;
    let keywords = section
        .priority
        .keywords
        .iter()
        .map(|keyword| {
            Regex::new(&keyword.pattern)
                .map(|pattern| KeywordBoost {
                    pattern,
                    boost: keyword.boost,
                })
                .map_err(|error| {
                    invalid(
                        "routing.priority.keywords",
                        format!("bad regex `{}`: {error}", keyword.pattern),
                    )
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let wording = if section.wording.enabled {
        let mut lexicons = vec![
            Lexicon::english().map_err(|error| invalid("routing.wording", error.to_string()))?,
        ];
        for path in &section.wording.lexicons {
            let text = read_lexicon(path)
                .map_err(|error| invalid("routing.wording.lexicons", format!("{path}: {error}")))?;
            lexicons.push(Lexicon::from_toml(&text).map_err(|error| {
                invalid("routing.wording.lexicons", format!("{path}: {error}"))
            })?);
        }
        let scorer = NegativeWording::new(lexicons, &section.wording.fallback_language)
            .map_err(|error| invalid("routing.wording", error.to_string()))?;
        Some(Arc::new(scorer))
    } else {
        None
    };
    let config = RoutingConfig {
        queues,
        rules,
        default_queues: section
            .default_queues
            .iter()
            .map(|name| QueueName::new(name))
            .collect(),
        agents,
        priority: PriorityPolicy {
            tiers: section
                .priority
                .tiers
                .iter()
                .map(|(tier, boost)| (tier.clone(), *boost))
                .collect(),
            keywords,
            negative_wording: section.priority.negative_wording,
            repeat_message: section.priority.repeat_message,
            repeat_max: section.priority.repeat_max,
            sla_breach: section.priority.sla_breach,
            tier_escalation: section.priority.tier_escalation,
        },
        offers: OfferPolicy {
            max_missed: section.offers.max_missed,
            reoffer_cooldown: Millis::from_secs(section.offers.reoffer_cooldown_seconds),
        },
        reopen: ReopenPolicy {
            window: Millis::from_secs(section.reopen.window_seconds),
            prefer_last_agent_for: Millis::from_secs(section.reopen.prefer_last_agent_seconds),
        },
        transfer_agent_wait: Millis::from_secs(section.transfer_agent_wait_seconds),
        wording,
    };
    config.validate()?;
    Ok(config)
}

fn skills(
    place: &str,
    skills: &BTreeMap<String, u8>,
) -> Result<Vec<SkillRequirement>, RoutingFileError> {
    skills
        .iter()
        .map(|(skill, level)| {
            if skill.is_empty() {
                return Err(invalid(place, "empty skill name"));
            }
            Ok(SkillRequirement {
                skill: Arc::from(skill.as_str()),
                min_level: *level,
            })
        })
        .collect()
}

fn build_queue(section: &QueueSection) -> Result<QueueConfig, RoutingFileError> {
    let place = format!("queue `{}`", section.name);
    if section.name.is_empty() {
        return Err(invalid("queues", "a queue needs a name"));
    }
    let mut queue = QueueConfig::new(&section.name);
    queue.channels = section
        .channels
        .iter()
        .map(|channel| Channel::parse(channel))
        .collect();
    queue.required_skills = skills(&place, &section.skills)?;
    queue.strategy = Strategy::parse(&section.strategy).ok_or_else(|| {
        invalid(
            &place,
            format!(
                "unknown strategy `{}` (longest_idle, least_occupied, round_robin, most_skilled)",
                section.strategy
            ),
        )
    })?;
    queue.sla_target = Millis::from_secs(section.sla_seconds);
    queue.offer_timeout = Millis::from_secs(section.offer_timeout_seconds);
    queue.auto_accept = section.auto_accept;
    queue.wrap_up = Millis::from_secs(section.wrap_up_seconds);
    queue.overflow_after = Millis::from_secs(section.overflow_after_seconds);
    queue.next_tier = section.next_tier.as_deref().map(QueueName::new);
    queue.default_handle_time = Millis::from_secs(section.default_handle_time_seconds);
    queue.escalation = section
        .escalation
        .iter()
        .map(|step| {
            let action = match (step.raise_by, step.set_to, &step.overflow_to) {
                (Some(by), None, None) => EscalationAction::RaiseBy(by),
                (None, Some(to), None) => EscalationAction::SetTo(to),
                (None, None, Some(queue)) => EscalationAction::OverflowTo(QueueName::new(queue)),
                _ => {
                    return Err(invalid(
                        &place,
                        "each escalation step needs exactly one of raise_by, set_to, overflow_to",
                    ));
                }
            };
            Ok(EscalationStep {
                after: Millis::from_secs(step.after_seconds),
                action,
            })
        })
        .collect::<Result<_, _>>()?;
    queue.business_hours = section
        .business_hours
        .as_ref()
        .map(|hours| build_hours(&place, hours))
        .transpose()?;
    Ok(queue)
}

fn build_hours(
    place: &str,
    section: &BusinessHoursSection,
) -> Result<BusinessHours, RoutingFileError> {
    let timezone = section
        .timezone
        .parse::<chrono_tz::Tz>()
        .map_err(|_| invalid(place, format!("unknown time zone `{}`", section.timezone)))?;
    let days = [
        &section.monday,
        &section.tuesday,
        &section.wednesday,
        &section.thursday,
        &section.friday,
        &section.saturday,
        &section.sunday,
    ];
    let mut weekly: [Vec<(u16, u16)>; 7] = Default::default();
    for (day, intervals) in days.iter().enumerate() {
        for interval in intervals.iter() {
            weekly[day].push(parse_interval(interval).ok_or_else(|| {
                invalid(place, format!("bad hours `{interval}`: use HH:MM-HH:MM"))
            })?);
        }
    }
    let closed_dates = section
        .closed_dates
        .iter()
        .map(|date| {
            NaiveDate::parse_from_str(date, "%Y-%m-%d")
                .map_err(|_| invalid(place, format!("bad date `{date}`: use YYYY-MM-DD")))
        })
        .collect::<Result<_, _>>()?;
    Ok(BusinessHours {
        timezone,
        weekly,
        closed_dates,
    })
}

/// `"09:00-17:30"` → minutes since midnight, end exclusive; `24:00` allowed as an end.
fn parse_interval(text: &str) -> Option<(u16, u16)> {
    let (start, end) = text.split_once('-')?;
    let minutes = |hhmm: &str| -> Option<u16> {
        let (hours, minutes) = hhmm.trim().split_once(':')?;
        let (hours, minutes): (u16, u16) = (hours.parse().ok()?, minutes.parse().ok()?);
        (minutes < 60 && hours * 60 + minutes <= 24 * 60).then_some(hours * 60 + minutes)
    };
    let (start, end) = (minutes(start)?, minutes(end)?);
    (start < end).then_some((start, end))
}

fn build_rule(section: &RuleSection) -> Result<RoutingRule, RoutingFileError> {
    let place = format!("rule `{}`", section.name);
    let pattern = section
        .when
        .pattern
        .as_deref()
        .map(|pattern| {
            Regex::new(pattern)
                .map_err(|error| invalid(&place, format!("bad regex `{pattern}`: {error}")))
        })
        .transpose()?;
    Ok(RoutingRule {
        name: section.name.clone(),
        when: RuleMatch {
            channels: section
                .when
                .channels
                .iter()
                .map(|channel| Channel::parse(channel))
                .collect(),
            providers: section.when.providers.clone(),
            to_addresses: section.when.to.clone(),
            tiers: section.when.tiers.clone(),
            languages: section.when.languages.clone(),
            keywords: section.when.keywords.clone(),
            pattern,
        },
        then: RuleAction {
            queues: section
                .queues
                .iter()
                .map(|queue| QueueName::new(queue))
                .collect(),
            priority: section.priority,
            skills: skills(&place, &section.skills)?,
            require_language: section.require_language,
            tags: section.tags.clone(),
        },
    })
}

fn build_agent(section: &AgentSection) -> Result<AgentConfig, RoutingFileError> {
    let place = format!("agent `{}`", section.id);
    if section.id.is_empty() {
        return Err(invalid("agents", "an agent needs an id"));
    }
    if section.capacity.is_empty() {
        return Err(invalid(
            &place,
            "capacity must name at least one channel, e.g. { chat = 3 }",
        ));
    }
    let capacity: Vec<(Channel, u16)> = section
        .capacity
        .iter()
        .map(|(channel, slots)| (Channel::parse(channel), *slots))
        .collect();
    let sum: u32 = capacity.iter().map(|(_, slots)| u32::from(*slots)).sum();
    Ok(AgentConfig {
        id: AgentId::new(&section.id),
        name: section.name.clone().unwrap_or_else(|| section.id.clone()),
        queues: section
            .queues
            .iter()
            .map(|queue| QueueName::new(queue))
            .collect(),
        skills: section
            .skills
            .iter()
            .map(|(skill, level)| (Arc::from(skill.as_str()), *level))
            .collect(),
        languages: section.languages.clone(),
        capacity,
        max_total: section
            .max_total
            .unwrap_or(u16::try_from(sum).unwrap_or(u16::MAX)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals() {
        assert_eq!(parse_interval("09:00-17:30"), Some((540, 1050)));
        assert_eq!(parse_interval("00:00-24:00"), Some((0, 1440)));
        assert_eq!(parse_interval("17:00-09:00"), None);
        assert_eq!(parse_interval("9-17"), None);
    }
}
