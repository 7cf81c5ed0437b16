//! The simulator's scenario file (TOML): wire types, validation, and the `RoutingConfig` built from it.
//!
//! A scenario describes a contact centre and its traffic: queues, routing rules, agent groups with
//! shifts and capacities, Poisson arrival streams per channel with an hourly rate profile, and the
//! handle-time and patience distributions per channel. [`Scenario::from_toml_str`] parses and
//! checks it into [`Scenario`], whose `config` is an ordinary, validated [`RoutingConfig`]: the
//! scenario file is a second front end for the router's configuration, next to the daemon's.
//!
//! The format is documented in `docs/SIMULATOR.md` and by example in `config/scenarios/`.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use regex::Regex;
use serde::Deserialize;

use crate::routing::config::{
    AgentConfig, ConfigError, EscalationAction, EscalationStep, KeywordBoost, OfferPolicy,
    PriorityPolicy, QueueConfig, ReopenPolicy, RoutingConfig, RoutingRule, RuleAction, RuleMatch,
};
use crate::routing::model::SkillRequirement;
use crate::routing::{AgentId, Channel, Millis, Priority, QueueName, Strategy};

/// One day in milliseconds.
pub const DAY: Millis = Millis(24 * 3600 * 1000);

/// Why a scenario cannot be simulated. Each message is complete in itself (the underlying error is
/// part of it, not a separate cause), so it reads well printed alone.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error("cannot read scenario file {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    /// Bad TOML, a missing or unknown field, or a value of the wrong type. The message of the TOML
    /// parser names the line, column and key, and shows the line.
    #[error("scenario file is malformed: {0}")]
    Syntax(toml::de::Error),
    /// A value that parses but makes no sense (`place` is the field, e.g. `queues[2].sla_seconds`).
    #[error("{place}: {message}")]
    Invalid { place: String, message: String },
    /// The routing configuration built from the scenario fails the router's own validation.
    #[error("the scenario's routing configuration is invalid: {0}")]
    Config(ConfigError),
}

impl From<toml::de::Error> for ScenarioError {
    fn from(error: toml::de::Error) -> Self {
        ScenarioError::Syntax(error)
    }
}

impl From<ConfigError> for ScenarioError {
    fn from(error: ConfigError) -> Self {
        ScenarioError::Config(error)
    }
}

fn invalid(place: impl Into<String>, message: impl Into<String>) -> ScenarioError {
    ScenarioError::Invalid {
        place: place.into(),
        message: message.into(),
    }
}

// ----- validated types ------------------------------------------------------------------------------

/// A random duration in seconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Distribution {
    Exponential {
        mean: f64,
    },
    /// Log-normal with this mean and standard deviation (of the duration itself, not of its log).
    LogNormal {
        mean: f64,
        sd: f64,
    },
    Constant {
        value: f64,
    },
}

impl Distribution {
    /// The mean in seconds.
    pub fn mean(&self) -> f64 {
        match *self {
            Distribution::Exponential { mean } | Distribution::LogNormal { mean, .. } => mean,
            Distribution::Constant { value } => value,
        }
    }
}

/// Arrivals per hour for each hour of the day (local to the simulation: hour 0 starts at time 0).
#[derive(Debug, Clone, PartialEq)]
pub struct RateProfile(pub [f64; 24]);

impl RateProfile {
    pub fn constant(per_hour: f64) -> RateProfile {
        RateProfile([per_hour; 24])
    }

    /// Expected arrivals per day.
    pub fn daily_total(&self) -> f64 {
        self.0.iter().sum()
    }
}

/// A share of arrivals carrying some attribute (a tier, a language, a text).
#[derive(Debug, Clone, PartialEq)]
pub struct Share<T> {
    pub share: f64,
    pub value: T,
}

/// What a customer writes: drives keyword rules.
#[derive(Debug, Clone, PartialEq)]
pub struct Topic {
    pub subject: Option<String>,
    pub text: String,
}

/// A Poisson stream of new conversations on one channel.
#[derive(Debug, Clone, PartialEq)]
pub struct ArrivalStream {
    /// Names the stream's random source; unique within the scenario.
    pub label: String,
    pub channel: Channel,
    pub rate: RateProfile,
    pub provider: String,
    pub to_address: String,
    /// Shares of arrivals with a customer tier; the rest have none.
    pub tiers: Vec<Share<String>>,
    pub languages: Vec<Share<String>>,
    /// Shares of arrivals with these texts; the rest write [`DEFAULT_TEXT`].
    pub topics: Vec<Share<Topic>>,
}

/// The text of an arrival that matches no topic.
pub const DEFAULT_TEXT: &str = "hello, I have a question";

/// A working interval within a day, `[start, end)`, as offsets from midnight; `end` may pass
/// midnight (up to 48 h), so a night shift is one interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shift {
    pub start: Millis,
    pub end: Millis,
}

/// Agents with the same configuration and schedule.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentGroup {
    pub name: String,
    /// The group's agents, as configured in [`Scenario::config`].
    pub agents: Vec<AgentId>,
    /// Conversations one agent can hold at once: `min(max_total, Σ channel capacities)`.
    pub slots: u16,
    /// Every day; the union of the intervals is the time the agents are available.
    pub shifts: Vec<Shift>,
    /// How long an agent takes to accept an offer (not used on auto-accept queues).
    pub accept_delay: Distribution,
}

/// What simulated agents do in a queue, beyond what the router decides.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueBehaviour {
    pub queue: QueueName,
    /// Share of the conversations handled here that the agent escalates to the queue's next tier
    /// at the end of its handle time (instead of resolving). The next tier handles them again, with
    /// a fresh handle time.
    pub escalate_share: f64,
}

/// A validated scenario, ready to simulate.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub name: String,
    pub description: Option<String>,
    pub seed: u64,
    /// Arrivals happen in `[0, duration)`; afterwards the run only finishes the conversations in
    /// progress.
    pub duration: Millis,
    /// Conversations arriving before this are simulated but left out of the statistics.
    pub warm_up: Millis,
    /// The router's configuration, including one agent per simulated agent.
    pub config: RoutingConfig,
    pub groups: Vec<AgentGroup>,
    pub arrivals: Vec<ArrivalStream>,
    /// Per channel with arrivals.
    pub handle_time: Vec<(Channel, Distribution)>,
    /// Per channel with arrivals; `None` is a customer who never leaves unanswered.
    pub patience: Vec<(Channel, Option<Distribution>)>,
    /// One per queue, in the order of `config.queues`.
    pub behaviour: Vec<QueueBehaviour>,
}

impl Scenario {
    pub fn load(path: &Path) -> Result<Scenario, ScenarioError> {
        let text = std::fs::read_to_string(path).map_err(|error| ScenarioError::Read {
            path: path.to_owned(),
            error,
        })?;
        Scenario::from_toml_str(&text)
    }

    pub fn from_toml_str(text: &str) -> Result<Scenario, ScenarioError> {
        let wire: ScenarioFile = toml::from_str(text)?;
        wire.validate()
    }

    /// Expected number of arrivals in `[0, duration)`.
    pub fn expected_arrivals(&self) -> f64 {
        let hour = 3_600_000u64;
        let full_hours = self.duration.0 / hour;
        let partial = (self.duration.0 % hour) as f64 / hour as f64;
        self.arrivals
            .iter()
            .map(|stream| {
                let full: f64 = (0..full_hours)
                    .map(|h| stream.rate.0[(h % 24) as usize])
                    .sum();
                full + partial * stream.rate.0[(full_hours % 24) as usize]
            })
            .sum()
    }

    pub fn handle_time_for(&self, channel: &Channel) -> Option<Distribution> {
        self.handle_time
            .iter()
            .find(|(c, _)| c == channel)
            .map(|(_, d)| *d)
    }

    pub fn patience_for(&self, channel: &Channel) -> Option<Distribution> {
        self.patience
            .iter()
            .find(|(c, _)| c == channel)
            .and_then(|(_, d)| *d)
    }
}

/// Parses `"7d"`, `"36h"`, `"90m"`, `"45s"` or combinations such as `"1d12h"` (decimals allowed).
pub fn parse_duration(text: &str) -> Option<Millis> {
    let text = text.trim();
    if text.is_empty() {
        return None;
    }
    let mut total = 0.0_f64;
    let mut rest = text;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if number_len == 0 {
            return None;
        }
        let value: f64 = rest[..number_len].parse().ok()?;
        rest = &rest[number_len..];
        let unit_len = rest
            .find(|c: char| !c.is_ascii_alphabetic())
            .unwrap_or(rest.len());
        let seconds = match &rest[..unit_len] {
            "d" => 86_400.0,
            "h" => 3_600.0,
            "m" => 60.0,
            "s" => 1.0,
            _ => return None,
        };
        rest = rest[unit_len..].trim_start();
        total += value * seconds;
    }
    (total.is_finite() && total >= 0.0).then(|| Millis((total * 1000.0).round() as u64))
}

// ----- wire types -----------------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScenarioFile {
    name: Option<String>,
    description: Option<String>,
    seed: u64,
    duration: String,
    warm_up: Option<String>,
    default_queues: Option<Vec<String>>,
    queues: Vec<QueueWire>,
    #[serde(default)]
    rules: Vec<RuleWire>,
    agent_groups: Vec<AgentGroupWire>,
    arrivals: Vec<ArrivalWire>,
    handle_time: BTreeMap<String, DistributionWire>,
    #[serde(default)]
    patience: BTreeMap<String, DistributionWire>,
    priority: Option<PriorityWire>,
    offers: Option<OffersWire>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(tag = "distribution", rename_all = "snake_case", deny_unknown_fields)]
enum DistributionWire {
    Exponential {
        mean_seconds: f64,
    },
    Lognormal {
        mean_seconds: f64,
        sd_seconds: f64,
    },
    Constant {
        seconds: f64,
    },
    /// Patience only: the customer never leaves.
    None,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct QueueWire {
    name: String,
    #[serde(default)]
    channels: Vec<String>,
    /// Required skills with minimum levels.
    #[serde(default)]
    skills: BTreeMap<String, u8>,
    strategy: Option<String>,
    sla_seconds: Option<f64>,
    offer_timeout_seconds: Option<f64>,
    #[serde(default)]
    auto_accept: bool,
    wrap_up_seconds: Option<f64>,
    overflow_after_seconds: Option<f64>,
    #[serde(default)]
    escalation: Vec<EscalationWire>,
    next_tier: Option<String>,
    escalate_share: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EscalationWire {
    after_seconds: f64,
    raise_by: Option<Priority>,
    set_to: Option<Priority>,
    overflow_to: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleWire {
    name: String,
    #[serde(default)]
    channels: Vec<String>,
    #[serde(default)]
    tiers: Vec<String>,
    #[serde(default)]
    languages: Vec<String>,
    #[serde(default)]
    keywords: Vec<String>,
    queues: Vec<String>,
    #[serde(default)]
    priority: Priority,
    #[serde(default)]
    skills: BTreeMap<String, u8>,
    #[serde(default)]
    require_language: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentGroupWire {
    name: String,
    count: u32,
    #[serde(default)]
    queues: Vec<String>,
    #[serde(default)]
    skills: BTreeMap<String, u8>,
    #[serde(default)]
    languages: Vec<String>,
    capacity: BTreeMap<String, u16>,
    max_total: Option<u16>,
    shifts: Option<Vec<[f64; 2]>>,
    accept_delay: Option<DistributionWire>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RateWire {
    Constant(f64),
    Profile(Vec<f64>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ArrivalWire {
    name: Option<String>,
    channel: String,
    rate_per_hour: RateWire,
    provider: Option<String>,
    to_address: Option<String>,
    #[serde(default)]
    tiers: BTreeMap<String, f64>,
    #[serde(default)]
    languages: BTreeMap<String, f64>,
    #[serde(default)]
    topics: Vec<TopicWire>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TopicWire {
    share: f64,
    subject: Option<String>,
    text: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PriorityWire {
    tiers: Option<BTreeMap<String, Priority>>,
    sla_breach: Option<Priority>,
    tier_escalation: Option<Priority>,
    #[serde(default)]
    keywords: Vec<KeywordWire>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeywordWire {
    pattern: String,
    boost: Priority,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OffersWire {
    max_missed: Option<u32>,
    reoffer_cooldown_seconds: Option<f64>,
}

// ----- validation -----------------------------------------------------------------------------------

fn seconds(place: &str, value: f64) -> Result<Millis, ScenarioError> {
    if value.is_finite() && value >= 0.0 {
        Ok(Millis((value * 1000.0).round() as u64))
    } else {
        Err(invalid(
            place,
            format!("must be a number of seconds ≥ 0, got {value}"),
        ))
    }
}

fn duration_field(place: &str, text: &str) -> Result<Millis, ScenarioError> {
    parse_duration(text).ok_or_else(|| {
        invalid(
            place,
            format!("`{text}` is not a duration (write e.g. \"7d\", \"36h\", \"90m\", \"1d12h\")"),
        )
    })
}

fn share(place: &str, value: f64) -> Result<f64, ScenarioError> {
    if (0.0..=1.0).contains(&value) {
        Ok(value)
    } else {
        Err(invalid(
            place,
            format!("a share must be between 0 and 1, got {value}"),
        ))
    }
}

fn shares<T>(place: &str, items: Vec<(f64, T)>) -> Result<Vec<Share<T>>, ScenarioError> {
    let mut total = 0.0;
    let mut out = Vec::with_capacity(items.len());
    for (value, item) in items {
        total += share(place, value)?;
        out.push(Share {
            share: value,
            value: item,
        });
    }
    if total > 1.0 + 1e-9 {
        return Err(invalid(
            place,
            format!("shares add up to {total}, more than 1"),
        ));
    }
    Ok(out)
}

fn skills(map: &BTreeMap<String, u8>) -> Vec<SkillRequirement> {
    map.iter()
        .map(|(skill, level)| SkillRequirement {
            skill: skill.as_str().into(),
            min_level: *level,
        })
        .collect()
}

fn queue_names(names: &[String]) -> Vec<QueueName> {
    names.iter().map(|name| QueueName::new(name)).collect()
}

fn channels(place: &str, names: &[String]) -> Result<Vec<Channel>, ScenarioError> {
    names
        .iter()
        .map(|name| {
            if name.trim().is_empty() {
                Err(invalid(place, "a channel name is empty"))
            } else {
                Ok(Channel::parse(name))
            }
        })
        .collect()
}

impl DistributionWire {
    /// A finite distribution; `none` is refused unless `allow_none` (then it is `Ok(None)`).
    fn validate(
        self,
        place: &str,
        allow_none: bool,
    ) -> Result<Option<Distribution>, ScenarioError> {
        let positive = |what: &str, value: f64| {
            if value.is_finite() && value > 0.0 {
                Ok(value)
            } else {
                Err(invalid(
                    place,
                    format!("{what} must be a number of seconds > 0, got {value}"),
                ))
            }
        };
        let distribution = match self {
            DistributionWire::Exponential { mean_seconds } => Distribution::Exponential {
                mean: positive("mean_seconds", mean_seconds)?,
            },
            DistributionWire::Lognormal {
                mean_seconds,
                sd_seconds,
            } => {
                if !(sd_seconds.is_finite() && sd_seconds >= 0.0) {
                    return Err(invalid(
                        place,
                        format!("sd_seconds must be a number of seconds ≥ 0, got {sd_seconds}"),
                    ));
                }
                Distribution::LogNormal {
                    mean: positive("mean_seconds", mean_seconds)?,
                    sd: sd_seconds,
                }
            }
            DistributionWire::Constant { seconds } => {
                if !(seconds.is_finite() && seconds >= 0.0) {
                    return Err(invalid(
                        place,
                        format!("seconds must be ≥ 0, got {seconds}"),
                    ));
                }
                Distribution::Constant { value: seconds }
            }
            DistributionWire::None if allow_none => return Ok(None),
            DistributionWire::None => {
                return Err(invalid(
                    place,
                    "`none` is only allowed for patience (a customer who never leaves)",
                ));
            }
        };
        Ok(Some(distribution))
    }
}

fn rate_profile(place: &str, rate: RateWire) -> Result<RateProfile, ScenarioError> {
    let check = |value: f64| {
        if value.is_finite() && value >= 0.0 {
            Ok(value)
        } else {
            Err(invalid(
                place,
                format!("rates must be arrivals per hour ≥ 0, got {value}"),
            ))
        }
    };
    match rate {
        RateWire::Constant(value) => Ok(RateProfile::constant(check(value)?)),
        RateWire::Profile(values) => {
            let values: [f64; 24] = values.try_into().map_err(|values: Vec<f64>| {
                invalid(
                    place,
                    format!(
                        "an hourly profile needs 24 values (hours 0 to 23), got {}",
                        values.len()
                    ),
                )
            })?;
            for value in values {
                check(value)?;
            }
            Ok(RateProfile(values))
        }
    }
}

fn shift(place: &str, [start, end]: [f64; 2]) -> Result<Shift, ScenarioError> {
    if !(start.is_finite()
        && end.is_finite()
        && (0.0..24.0).contains(&start)
        && start < end
        && end <= start + 24.0)
    {
        return Err(invalid(
            place,
            format!(
                "a shift is [start_hour, end_hour) with 0 ≤ start < 24 and start < end ≤ start + 24 \
                 (end may pass midnight, e.g. [22, 30]), got [{start}, {end}]"
            ),
        ));
    }
    let hour = 3_600_000.0;
    Ok(Shift {
        start: Millis((start * hour).round() as u64),
        end: Millis((end * hour).round() as u64),
    })
}

impl ScenarioFile {
    fn validate(self) -> Result<Scenario, ScenarioError> {
        let duration = duration_field("duration", &self.duration)?;
        if duration == Millis::ZERO {
            return Err(invalid("duration", "must be longer than zero"));
        }
        let warm_up = match &self.warm_up {
            Some(text) => duration_field("warm_up", text)?,
            None => Millis::ZERO,
        };
        if warm_up >= duration {
            return Err(invalid("warm_up", "must be shorter than `duration`"));
        }
        if self.queues.is_empty() {
            return Err(invalid("queues", "at least one queue is required"));
        }

        let mut queues = Vec::with_capacity(self.queues.len());
        let mut behaviour = Vec::with_capacity(self.queues.len());
        for (index, wire) in self.queues.into_iter().enumerate() {
            let (queue, behave) = wire.validate(&format!("queues[{index}]"))?;
            queues.push(queue);
            behaviour.push(behave);
        }

        let rules = self
            .rules
            .into_iter()
            .enumerate()
            .map(|(index, rule)| rule.validate(&format!("rules[{index}]")))
            .collect::<Result<Vec<_>, _>>()?;

        let mut agents = Vec::new();
        let mut groups = Vec::with_capacity(self.agent_groups.len());
        let mut group_names = HashSet::new();
        for (index, wire) in self.agent_groups.into_iter().enumerate() {
            let place = format!("agent_groups[{index}]");
            if !group_names.insert(wire.name.clone()) {
                return Err(invalid(
                    format!("{place}.name"),
                    format!("agent group `{}` is defined twice", wire.name),
                ));
            }
            let (group, members) = wire.validate(&place)?;
            agents.extend(members);
            groups.push(group);
        }

        let mut arrivals = Vec::with_capacity(self.arrivals.len());
        let mut labels = HashSet::new();
        let mut per_channel: BTreeMap<String, usize> = BTreeMap::new();
        for (index, wire) in self.arrivals.into_iter().enumerate() {
            let place = format!("arrivals[{index}]");
            let occurrence = per_channel.entry(wire.channel.clone()).or_default();
            *occurrence += 1;
            let label = match &wire.name {
                Some(name) => name.clone(),
                None if *occurrence == 1 => wire.channel.clone(),
                None => format!("{}#{}", wire.channel, occurrence),
            };
            if !labels.insert(label.clone()) {
                return Err(invalid(
                    format!("{place}.name"),
                    format!(
                        "arrival stream `{label}` is defined twice (give streams distinct names)"
                    ),
                ));
            }
            arrivals.push(wire.validate(&place, label)?);
        }
        if arrivals.is_empty() {
            return Err(invalid(
                "arrivals",
                "at least one arrival stream is required",
            ));
        }
        let arriving: Vec<Channel> = {
            let mut seen = Vec::new();
            for stream in &arrivals {
                if !seen.contains(&stream.channel) {
                    seen.push(stream.channel.clone());
                }
            }
            seen
        };

        let mut handle_time = Vec::new();
        for (name, wire) in self.handle_time {
            let place = format!("handle_time.{name}");
            let channel = Channel::parse(&name);
            if !arriving.contains(&channel) {
                return Err(invalid(
                    place,
                    format!("no arrival stream is on channel `{name}`"),
                ));
            }
            if let Some(distribution) = wire.validate(&place, false)? {
                handle_time.push((channel, distribution));
            }
        }
        let mut patience = Vec::new();
        for (name, wire) in self.patience {
            let place = format!("patience.{name}");
            let channel = Channel::parse(&name);
            if !arriving.contains(&channel) {
                return Err(invalid(
                    place,
                    format!("no arrival stream is on channel `{name}`"),
                ));
            }
            patience.push((channel, wire.validate(&place, true)?));
        }
        for channel in &arriving {
            if !handle_time.iter().any(|(c, _)| c == channel) {
                return Err(invalid(
                    format!("handle_time.{channel}"),
                    format!("channel `{channel}` has arrivals but no handle-time distribution"),
                ));
            }
            if !patience.iter().any(|(c, _)| c == channel) {
                patience.push((channel.clone(), None));
            }
        }

        let mut priority = PriorityPolicy::default();
        if let Some(wire) = self.priority {
            if let Some(tiers) = wire.tiers {
                priority.tiers = tiers.into_iter().collect();
            }
            if let Some(value) = wire.sla_breach {
                priority.sla_breach = value;
            }
            if let Some(value) = wire.tier_escalation {
                priority.tier_escalation = value;
            }
            for (index, keyword) in wire.keywords.into_iter().enumerate() {
                let pattern = Regex::new(&keyword.pattern).map_err(|error| {
                    invalid(
                        format!("priority.keywords[{index}].pattern"),
                        error.to_string(),
                    )
                })?;
                priority.keywords.push(KeywordBoost {
                    pattern,
                    boost: keyword.boost,
                });
            }
        }
        let mut offers = OfferPolicy::default();
        if let Some(wire) = self.offers {
            if let Some(max_missed) = wire.max_missed {
                offers.max_missed = max_missed;
            }
            if let Some(cooldown) = wire.reoffer_cooldown_seconds {
                offers.reoffer_cooldown = seconds("offers.reoffer_cooldown_seconds", cooldown)?;
            }
        }

        let default_queues = match self.default_queues {
            Some(names) => queue_names(&names),
            None => vec![queues[0].name.clone()],
        };
        let config = RoutingConfig {
            queues,
            rules,
            default_queues,
            agents,
            priority,
            offers,
            // Simulated customers never write again after a resolve, so nothing would reopen:
            // closing at once keeps the router's memory flat over long runs.
            reopen: ReopenPolicy {
                window: Millis::ZERO,
                prefer_last_agent_for: Millis::ZERO,
            },
            transfer_agent_wait: Millis::from_secs(60),
            wording: None,
        };
        config.validate()?;
        for (index, queue) in config.queues.iter().enumerate() {
            if behaviour[index].escalate_share > 0.0 && queue.next_tier.is_none() {
                return Err(invalid(
                    format!("queues[{index}].escalate_share"),
                    format!("queue `{}` has no next_tier to escalate to", queue.name),
                ));
            }
        }

        Ok(Scenario {
            name: self.name.unwrap_or_else(|| "scenario".to_owned()),
            description: self.description,
            seed: self.seed,
            duration,
            warm_up,
            config,
            groups,
            arrivals,
            handle_time,
            patience,
            behaviour,
        })
    }
}

impl QueueWire {
    fn validate(self, place: &str) -> Result<(QueueConfig, QueueBehaviour), ScenarioError> {
        if self.name.trim().is_empty() {
            return Err(invalid(format!("{place}.name"), "a queue needs a name"));
        }
        let mut queue = QueueConfig::new(&self.name);
        queue.channels = channels(&format!("{place}.channels"), &self.channels)?;
        queue.required_skills = skills(&self.skills);
        if let Some(name) = &self.strategy {
            queue.strategy = Strategy::parse(name).ok_or_else(|| {
                invalid(
                    format!("{place}.strategy"),
                    format!(
                        "unknown strategy `{name}` (longest_idle, least_occupied, round_robin, most_skilled)"
                    ),
                )
            })?;
        }
        if let Some(value) = self.sla_seconds {
            queue.sla_target = seconds(&format!("{place}.sla_seconds"), value)?;
        }
        if let Some(value) = self.offer_timeout_seconds {
            queue.offer_timeout = seconds(&format!("{place}.offer_timeout_seconds"), value)?;
        }
        queue.auto_accept = self.auto_accept;
        if let Some(value) = self.wrap_up_seconds {
            queue.wrap_up = seconds(&format!("{place}.wrap_up_seconds"), value)?;
        }
        if let Some(value) = self.overflow_after_seconds {
            queue.overflow_after = seconds(&format!("{place}.overflow_after_seconds"), value)?;
        }
        for (index, step) in self.escalation.into_iter().enumerate() {
            let step_place = format!("{place}.escalation[{index}]");
            let after = seconds(&format!("{step_place}.after_seconds"), step.after_seconds)?;
            let action = match (step.raise_by, step.set_to, step.overflow_to) {
                (Some(by), None, None) => EscalationAction::RaiseBy(by),
                (None, Some(to), None) => EscalationAction::SetTo(to),
                (None, None, Some(queue)) => EscalationAction::OverflowTo(QueueName::new(&queue)),
                _ => {
                    return Err(invalid(
                        step_place,
                        "an escalation step needs exactly one of raise_by, set_to, overflow_to",
                    ));
                }
            };
            queue.escalation.push(EscalationStep { after, action });
        }
        queue.next_tier = self.next_tier.as_deref().map(QueueName::new);
        let escalate_share = match self.escalate_share {
            Some(value) => share(&format!("{place}.escalate_share"), value)?,
            None => 0.0,
        };
        let behaviour = QueueBehaviour {
            queue: queue.name.clone(),
            escalate_share,
        };
        Ok((queue, behaviour))
    }
}

impl RuleWire {
    fn validate(self, place: &str) -> Result<RoutingRule, ScenarioError> {
        Ok(RoutingRule {
            name: self.name,
            when: RuleMatch {
                channels: channels(&format!("{place}.channels"), &self.channels)?,
                tiers: self.tiers,
                languages: self.languages,
                keywords: self.keywords,
                ..RuleMatch::default()
            },
            then: RuleAction {
                queues: queue_names(&self.queues),
                priority: self.priority,
                skills: skills(&self.skills),
                require_language: self.require_language,
                tags: Vec::new(),
            },
        })
    }
}

impl AgentGroupWire {
    fn validate(self, place: &str) -> Result<(AgentGroup, Vec<AgentConfig>), ScenarioError> {
        if self.name.trim().is_empty() {
            return Err(invalid(
                format!("{place}.name"),
                "an agent group needs a name",
            ));
        }
        if self.count == 0 {
            return Err(invalid(format!("{place}.count"), "must be at least 1"));
        }
        if self.capacity.is_empty() {
            return Err(invalid(
                format!("{place}.capacity"),
                "give at least one channel's capacity, e.g. { chat = 3 }",
            ));
        }
        if self.queues.is_empty() && self.skills.is_empty() {
            return Err(invalid(
                place,
                "agents need queues to be members of, or skills that queues require",
            ));
        }
        let capacity: Vec<(Channel, u16)> = self
            .capacity
            .iter()
            .map(|(name, slots)| (Channel::parse(name), *slots))
            .collect();
        let channel_sum: u32 = capacity.iter().map(|(_, slots)| u32::from(*slots)).sum();
        let max_total = self
            .max_total
            .unwrap_or_else(|| u16::try_from(channel_sum).unwrap_or(u16::MAX));
        let slots = u16::try_from(channel_sum.min(u32::from(max_total))).unwrap_or(u16::MAX);
        let shifts = match self.shifts {
            None => vec![Shift {
                start: Millis::ZERO,
                end: DAY,
            }],
            Some(list) if list.is_empty() => {
                return Err(invalid(
                    format!("{place}.shifts"),
                    "an empty list means the agents never work; leave `shifts` out for round the clock",
                ));
            }
            Some(list) => list
                .into_iter()
                .enumerate()
                .map(|(index, pair)| shift(&format!("{place}.shifts[{index}]"), pair))
                .collect::<Result<_, _>>()?,
        };
        let accept_delay = match self.accept_delay {
            Some(wire) => wire
                .validate(&format!("{place}.accept_delay"), false)?
                .unwrap_or(Distribution::Constant { value: 0.0 }),
            None => Distribution::Constant { value: 0.0 },
        };
        let width = self.count.to_string().len();
        let skills: Vec<_> = self
            .skills
            .iter()
            .map(|(skill, level)| (skill.as_str().into(), *level))
            .collect();
        let members: Vec<AgentConfig> = (1..=self.count)
            .map(|n| {
                let id = format!("{}-{n:0width$}", self.name);
                AgentConfig {
                    id: AgentId::new(&id),
                    name: id,
                    queues: queue_names(&self.queues),
                    skills: skills.clone(),
                    languages: self.languages.clone(),
                    capacity: capacity.clone(),
                    max_total,
                }
            })
            .collect();
        let group = AgentGroup {
            name: self.name,
            agents: members.iter().map(|agent| agent.id.clone()).collect(),
            slots,
            shifts,
            accept_delay,
        };
        Ok((group, members))
    }
}

impl ArrivalWire {
    fn validate(self, place: &str, label: String) -> Result<ArrivalStream, ScenarioError> {
        if self.channel.trim().is_empty() {
            return Err(invalid(
                format!("{place}.channel"),
                "a channel name is empty",
            ));
        }
        let rate = rate_profile(&format!("{place}.rate_per_hour"), self.rate_per_hour)?;
        let tiers = shares(
            &format!("{place}.tiers"),
            self.tiers.into_iter().map(|(k, v)| (v, k)).collect(),
        )?;
        let languages = shares(
            &format!("{place}.languages"),
            self.languages.into_iter().map(|(k, v)| (v, k)).collect(),
        )?;
        let topics = shares(
            &format!("{place}.topics"),
            self.topics
                .into_iter()
                .map(|topic| {
                    (
                        topic.share,
                        Topic {
                            subject: topic.subject,
                            text: topic.text,
                        },
                    )
                })
                .collect(),
        )?;
        Ok(ArrivalStream {
            label,
            channel: Channel::parse(&self.channel),
            rate,
            provider: self.provider.unwrap_or_else(|| "simulator".to_owned()),
            to_address: self.to_address.unwrap_or_default(),
            tiers,
            languages,
            topics,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("7d"), Some(Millis(7 * 86_400_000)));
        assert_eq!(parse_duration("1d12h"), Some(Millis(36 * 3_600_000)));
        assert_eq!(parse_duration("1.5h"), Some(Millis(5_400_000)));
        assert_eq!(parse_duration("90m 30s"), Some(Millis(5_430_000)));
        assert_eq!(parse_duration("10"), None);
        assert_eq!(parse_duration("3w"), None);
        assert_eq!(parse_duration(""), None);
    }
}
