//! Property tests for the router's invariants (DESIGN.md, "Routing semantics", Invariants).
//!
//! Each case generates a random configuration and a long random sequence of steps, drives a router
//! with them in virtual time (firing timers in deadline order, like the daemon), and checks after
//! every command:
//!
//! 1. `audit()` holds (capacity, single ownership, index consistency, work conservation);
//! 2. priority/age order: for every `Offered` (and auto-accepted `Assigned`) a command produced, no
//!    conversation still waiting after it, on the same channel and eligible for that agent, ranks
//!    strictly better. This is checked for agent-side selection (an agent freeing capacity) and
//!    conversation-side selection alike (arrival, re-routing): the latter only ever picks an agent
//!    that had room before the command, for whom work conservation left nothing eligible waiting,
//!    so it must hold there too. Only the `Assigned` of an `Accept` is exempt: it is no selection;
//! 3. nothing vanishes: every conversation that arrived is held by the router, in the state its
//!    effects announced (so a driver following the effects knows every state), until an
//!    `Abandoned` or `Closed` effect ends it, and the router holds no other;
//! 4. a refused command produces no effect and leaves `snapshot()` unchanged (checked for every
//!    deliberately implausible command and one command in 16);
//! 5. the same sequence gives the same commands, results and effects on a fresh router (separate
//!    property);
//! 6. at random points `restore(config, snapshot())` gives a router that passes `audit()`, has an
//!    equal snapshot and re-schedules every timer at the deadline the running router had; half the
//!    time the sequence goes on with the restored router.
//!
//! Configurations have 2–6 queues (channels, strategies, SLA, offer timeouts, wrap-up, auto-accept,
//! overflow times, next tiers, escalation steps with `OverflowTo`, required skills, business hours
//! on at most one), 3–40 agents (memberships, skills, languages, capacities 1–4 on chat/email/sms,
//! totals 1–8) and up to 4 rules (keywords, channels, VIP tier, language, skills, language
//! requirement). Steps are arrivals, customer messages and departures, presence changes and
//! disconnects, accept/reject/resolve/transfer/escalate, time passing (timers fire in deadline
//! order), configuration changes that keep capacities (strategies, timings, auto-accept, escalation
//! steps, rule priorities and queue order, offer policy, memberships, agents removed and re-added),
//! and restore checks.
//!
//! Steps are abstract (`Accept { pick: 7, valid: true }`): they are resolved against the state
//! at the time they run into concrete commands (`Accept { agent: a2, conv: 5 }`), so shrinking keeps
//! them plausible. A failure reports the step, the concrete command, and the commands before it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;

use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use switchboard::routing::config::{
    AgentConfig, EscalationAction, EscalationStep, KeywordBoost, QueueConfig, RoutingRule,
    RuleAction, RuleMatch,
};
use switchboard::routing::hours::BusinessHours;
use switchboard::routing::model::SkillRequirement;
use switchboard::routing::wording::NegativeWording;
use switchboard::routing::{
    AgentId, Channel, Command, CommandError, ConversationId, ConversationState, Effect, MessageId,
    Millis, NewConversation, OfferEnd, Presence, Priority, QueueName, Router, RouterSnapshot,
    RoutingConfig, Strategy as AgentStrategy, TimerKey, TimerQueue, Timestamp, TransferTarget,
};

// ----- vocabulary --------------------------------------------------------------------------------

const AGENTS: [&str; 40] = [
    "a0", "a1", "a2", "a3", "a4", "a5", "a6", "a7", "a8", "a9", "a10", "a11", "a12", "a13", "a14",
    "a15", "a16", "a17", "a18", "a19", "a20", "a21", "a22", "a23", "a24", "a25", "a26", "a27",
    "a28", "a29", "a30", "a31", "a32", "a33", "a34", "a35", "a36", "a37", "a38", "a39",
];
/// An agent id no configuration knows.
const GHOST: &str = "ghost";
const QUEUES: [&str; 6] = ["q0", "q1", "q2", "q3", "q4", "q5"];
/// A queue name no configuration knows.
const NOWHERE: &str = "nowhere";
const SKILLS: [&str; 2] = ["billing", "tech"];
const KEYWORDS: [&str; 5] = ["refund", "invoice", "broken", "hola", "urgent"];
const TEXTS: [&str; 10] = [
    "hello",
    "I want a refund",
    "my invoice is wrong",
    "the app is broken",
    "hola, necesito ayuda",
    "URGENT: this is absolutely unacceptable!!",
    "thanks a lot",
    "still waiting, nobody has answered",
    "refund my invoice now",
    "urgent question about tech",
];
/// A conversation id that never arrives.
const UNKNOWN_CONVERSATION: u128 = 999_999_999;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ch {
    Chat,
    Email,
    Sms,
    /// No agent has capacity on it: such conversations wait until the customer leaves.
    Whatsapp,
}

impl Ch {
    fn channel(self) -> Channel {
        match self {
            Ch::Chat => Channel::Chat,
            Ch::Email => Channel::Email,
            Ch::Sms => Channel::Sms,
            Ch::Whatsapp => Channel::Whatsapp,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pres {
    Available,
    Away,
    Offline,
}

impl Pres {
    fn presence(self) -> Presence {
        match self {
            Pres::Available => Presence::Available,
            Pres::Away => Presence::Away,
            Pres::Offline => Presence::Offline,
        }
    }
}

/// An agent id that prints as itself (`a3`), so failures read well.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Agent(&'static str);

impl fmt::Debug for Agent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl Agent {
    fn id(self) -> AgentId {
        AgentId::new(self.0)
    }
}

// ----- configuration specs -----------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq)]
enum StepAction {
    RaiseBy(Priority),
    SetTo(Priority),
    /// Queue index, modulo the number of queues.
    OverflowTo(u8),
}

#[derive(Debug, Clone)]
struct QueueSpec {
    channels: Vec<Ch>,
    strategy: AgentStrategy,
    sla_s: u64,
    offer_timeout_s: u64,
    wrap_up_s: u64,
    overflow_after_s: u64,
    auto_accept: bool,
    next_tier: Option<u8>,
    escalation: Vec<(u64, StepAction)>,
    required_skill: Option<(&'static str, u8)>,
}

#[derive(Debug, Clone)]
struct AgentSpec {
    queues: Vec<u8>,
    skills: Vec<(&'static str, u8)>,
    languages: Vec<&'static str>,
    chat: Option<u16>,
    email: Option<u16>,
    sms: Option<u16>,
    max_total: u16,
}

#[derive(Debug, Clone)]
struct RuleSpec {
    keywords: Vec<&'static str>,
    channels: Vec<Ch>,
    vip_only: bool,
    languages: Vec<&'static str>,
    queues: Vec<u8>,
    priority: Priority,
    skills: Vec<(&'static str, u8)>,
    require_language: bool,
}

#[derive(Debug, Clone)]
struct PolicySpec {
    reoffer_cooldown_s: u64,
    max_missed: u32,
    reopen_window_s: u64,
    prefer_last_s: u64,
    transfer_wait_s: u64,
    wording: bool,
    urgent_boost: Priority,
    repeat_message: Priority,
    repeat_max: u8,
    sla_breach: Priority,
}

/// Business hours on one queue: open the first `open` minutes of every `period` minutes, every day.
#[derive(Debug, Clone)]
struct HoursSpec {
    queue: u8,
    period: u16,
    open: u16,
}

#[derive(Debug, Clone)]
struct ConfigSpec {
    queues: Vec<QueueSpec>,
    hours: Option<HoursSpec>,
    agents: Vec<AgentSpec>,
    rules: Vec<RuleSpec>,
    default_queues: Vec<u8>,
    policy: PolicySpec,
}

fn queue_name(index: u8, count: usize) -> QueueName {
    QueueName::new(QUEUES[index as usize % count])
}

fn skill_req(skill: &str, level: u8) -> SkillRequirement {
    SkillRequirement {
        skill: Arc::from(skill),
        min_level: level,
    }
}

fn escalation(steps: &[(u64, StepAction)], queues: usize) -> Vec<EscalationStep> {
    let mut steps: Vec<EscalationStep> = steps
        .iter()
        .map(|(after, action)| EscalationStep {
            after: Millis::from_secs(*after),
            action: match action {
                StepAction::RaiseBy(by) => EscalationAction::RaiseBy(*by),
                StepAction::SetTo(to) => EscalationAction::SetTo(*to),
                StepAction::OverflowTo(queue) => {
                    EscalationAction::OverflowTo(queue_name(*queue, queues))
                }
            },
        })
        .collect();
    steps.sort_by_key(|step| step.after);
    steps
}

fn hours(spec: &HoursSpec) -> BusinessHours {
    let open = 1 + spec.open % (spec.period - 1);
    let day: Vec<(u16, u16)> = (0..24 * 60 / spec.period)
        .map(|k| (k * spec.period, k * spec.period + open))
        .collect();
    BusinessHours {
        timezone: chrono_tz::Tz::UTC,
        weekly: std::array::from_fn(|_| day.clone()),
        closed_dates: Vec::new(),
    }
}

fn agent_config(index: usize, spec: &AgentSpec, queues: usize) -> AgentConfig {
    let mut memberships: Vec<QueueName> = spec
        .queues
        .iter()
        .map(|&queue| queue_name(queue, queues))
        .collect();
    memberships.sort();
    memberships.dedup();
    let mut skills: Vec<(Arc<str>, u8)> = Vec::new();
    for &(skill, level) in &spec.skills {
        if !skills.iter().any(|(name, _)| &**name == skill) {
            skills.push((Arc::from(skill), level));
        }
    }
    let capacity = [
        (Channel::Chat, spec.chat),
        (Channel::Email, spec.email),
        (Channel::Sms, spec.sms),
    ]
    .into_iter()
    .filter_map(|(channel, slots)| slots.map(|slots| (channel, slots)))
    .collect();
    AgentConfig {
        id: AgentId::new(AGENTS[index]),
        name: AGENTS[index].to_uppercase(),
        queues: memberships,
        skills,
        languages: spec.languages.iter().map(|l| (*l).to_owned()).collect(),
        capacity,
        max_total: spec.max_total,
    }
}

fn build_config(spec: &ConfigSpec) -> RoutingConfig {
    let count = spec.queues.len();
    let queues: Vec<QueueConfig> = spec
        .queues
        .iter()
        .enumerate()
        .map(|(index, q)| {
            let mut queue = QueueConfig::new(QUEUES[index]);
            queue.channels = q.channels.iter().map(|c| c.channel()).collect();
            queue.channels.dedup();
            queue.strategy = q.strategy;
            queue.sla_target = Millis::from_secs(q.sla_s);
            queue.offer_timeout = Millis::from_secs(q.offer_timeout_s);
            queue.wrap_up = Millis::from_secs(q.wrap_up_s);
            queue.overflow_after = Millis::from_secs(q.overflow_after_s);
            queue.auto_accept = q.auto_accept;
            queue.next_tier = q.next_tier.map(|next| queue_name(next, count));
            queue.escalation = escalation(&q.escalation, count);
            queue.required_skills = q
                .required_skill
                .iter()
                .map(|(skill, level)| skill_req(skill, *level))
                .collect();
            queue.default_handle_time = Millis::from_secs(120);
            if let Some(h) = &spec.hours
                && h.queue as usize % count == index
            {
                queue.business_hours = Some(hours(h));
            }
            queue
        })
        .collect();
    let accepts_some = |queue: &QueueName, channels: &[Channel]| {
        channels.is_empty()
            || queues
                .iter()
                .find(|q| &q.name == queue)
                .is_some_and(|q| channels.iter().any(|c| q.accepts(c)))
    };
    let rules = spec
        .rules
        .iter()
        .enumerate()
        .map(|(index, r)| {
            let mut channels: Vec<Channel> = r.channels.iter().map(|c| c.channel()).collect();
            channels.dedup();
            let mut names: Vec<QueueName> = Vec::new();
            for &queue in &r.queues {
                let name = queue_name(queue, count);
                if !names.contains(&name) {
                    names.push(name);
                }
            }
            let accepting: Vec<QueueName> = names
                .iter()
                .filter(|name| accepts_some(name, &channels))
                .cloned()
                .collect();
            if accepting.is_empty() {
                channels.clear();
            } else {
                names = accepting;
            }
            RoutingRule {
                name: format!("rule{index}"),
                when: RuleMatch {
                    channels,
                    tiers: if r.vip_only {
                        vec!["vip".into()]
                    } else {
                        vec![]
                    },
                    languages: r.languages.iter().map(|l| (*l).to_owned()).collect(),
                    keywords: r.keywords.iter().map(|k| (*k).to_owned()).collect(),
                    ..RuleMatch::default()
                },
                then: RuleAction {
                    queues: names,
                    priority: r.priority,
                    skills: r
                        .skills
                        .iter()
                        .map(|(skill, level)| skill_req(skill, *level))
                        .collect(),
                    require_language: r.require_language,
                    tags: vec![format!("rule{index}")],
                },
            }
        })
        .collect();
    let mut default_queues: Vec<QueueName> = Vec::new();
    for &queue in &spec.default_queues {
        let name = queue_name(queue, count);
        if !default_queues.contains(&name) {
            default_queues.push(name);
        }
    }
    let p = &spec.policy;
    let mut config = RoutingConfig::single_queue(queues[0].clone());
    config.queues = queues;
    config.rules = rules;
    config.default_queues = default_queues;
    config.agents = spec
        .agents
        .iter()
        .enumerate()
        .map(|(index, agent)| agent_config(index, agent, count))
        .collect();
    config.offers.reoffer_cooldown = Millis::from_secs(p.reoffer_cooldown_s);
    config.offers.max_missed = p.max_missed;
    config.reopen.window = Millis::from_secs(p.reopen_window_s);
    config.reopen.prefer_last_agent_for = Millis::from_secs(p.prefer_last_s);
    config.transfer_agent_wait = Millis::from_secs(p.transfer_wait_s);
    config.priority.repeat_message = p.repeat_message;
    config.priority.repeat_max = p.repeat_max;
    config.priority.sla_breach = p.sla_breach;
    if p.urgent_boost != 0 {
        config.priority.keywords.push(KeywordBoost {
            pattern: regex::Regex::new("(?i)urgent").unwrap(),
            boost: p.urgent_boost,
        });
    }
    if p.wording {
        config.wording = Some(Arc::new(NegativeWording::english().unwrap()));
    }
    config.validate().unwrap();
    config
}

// ----- configuration changes ---------------------------------------------------------------------

/// A change to the running configuration that keeps every agent's capacities.
#[derive(Debug, Clone, PartialEq)]
enum Tweak {
    Same,
    Strategy {
        queue: u8,
        strategy: AgentStrategy,
    },
    Timing {
        queue: u8,
        offer_timeout_s: u64,
        sla_s: u64,
        wrap_up_s: u64,
        overflow_after_s: u64,
    },
    AutoAccept {
        queue: u8,
        on: bool,
    },
    Escalation {
        queue: u8,
        steps: Vec<(u64, StepAction)>,
    },
    RulePriority {
        rule: u8,
        priority: Priority,
    },
    /// Rotates a rule's candidate queues.
    RotateRuleQueues {
        rule: u8,
        by: u8,
    },
    /// Rotates the order of the rules.
    RotateRules {
        by: u8,
    },
    Offers {
        reoffer_cooldown_s: u64,
        max_missed: u32,
        prefer_last_s: u64,
    },
    RemoveAgent {
        agent: u8,
    },
    Memberships {
        agent: u8,
        queues: Vec<u8>,
    },
    /// Every agent of the original configuration again (removed ones come back signed out).
    AllAgentsBack,
}

impl Tweak {
    fn apply(&self, config: &mut RoutingConfig, base: &RoutingConfig) {
        let count = config.queues.len();
        let queue = |index: u8| index as usize % count;
        match self {
            Tweak::Same => {}
            Tweak::Strategy { queue: q, strategy } => config.queues[queue(*q)].strategy = *strategy,
            Tweak::Timing {
                queue: q,
                offer_timeout_s,
                sla_s,
                wrap_up_s,
                overflow_after_s,
            } => {
                let target = &mut config.queues[queue(*q)];
                target.offer_timeout = Millis::from_secs(*offer_timeout_s);
                target.sla_target = Millis::from_secs(*sla_s);
                target.wrap_up = Millis::from_secs(*wrap_up_s);
                target.overflow_after = Millis::from_secs(*overflow_after_s);
            }
            Tweak::AutoAccept { queue: q, on } => config.queues[queue(*q)].auto_accept = *on,
            Tweak::Escalation { queue: q, steps } => {
                config.queues[queue(*q)].escalation = escalation(steps, count);
            }
            Tweak::RulePriority { rule, priority } => {
                if !config.rules.is_empty() {
                    let index = *rule as usize % config.rules.len();
                    config.rules[index].then.priority = *priority;
                }
            }
            Tweak::RotateRuleQueues { rule, by } => {
                if !config.rules.is_empty() {
                    let index = *rule as usize % config.rules.len();
                    let queues = &mut config.rules[index].then.queues;
                    let by = *by as usize % queues.len();
                    queues.rotate_left(by);
                }
            }
            Tweak::RotateRules { by } => {
                if !config.rules.is_empty() {
                    let by = *by as usize % config.rules.len();
                    config.rules.rotate_left(by);
                }
            }
            Tweak::Offers {
                reoffer_cooldown_s,
                max_missed,
                prefer_last_s,
            } => {
                config.offers.reoffer_cooldown = Millis::from_secs(*reoffer_cooldown_s);
                config.offers.max_missed = *max_missed;
                config.reopen.prefer_last_agent_for = Millis::from_secs(*prefer_last_s);
            }
            Tweak::RemoveAgent { agent } => {
                let id = &base.agents[*agent as usize % base.agents.len()].id;
                config.agents.retain(|a| &a.id != id);
            }
            Tweak::Memberships { agent, queues } => {
                let id = &base.agents[*agent as usize % base.agents.len()].id;
                if let Some(a) = config.agents.iter_mut().find(|a| &a.id == id) {
                    let mut names: Vec<QueueName> =
                        queues.iter().map(|&q| queue_name(q, count)).collect();
                    names.sort();
                    names.dedup();
                    a.queues = names;
                }
            }
            Tweak::AllAgentsBack => {
                for agent in &base.agents {
                    if !config.agents.iter().any(|a| a.id == agent.id) {
                        config.agents.push(agent.clone());
                    }
                }
            }
        }
    }
}

// ----- steps -------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq)]
enum TransferTo {
    /// Agent index (may be the owner, or an agent no longer configured).
    Agent(u8),
    /// Queue index; 200 and above is an unknown queue.
    Queue(u8),
}

/// One generated step. `pick` chooses among the plausible targets at the time the step runs; with
/// `valid: false` the target is chosen at random and is usually refused.
#[derive(Debug, Clone)]
enum Step {
    Arrive {
        channel: Ch,
        tier: Option<&'static str>,
        language: Option<&'static str>,
        text: &'static str,
        /// Reuses the id of a known conversation (refused).
        duplicate: bool,
    },
    Message {
        pick: u16,
        text: &'static str,
        valid: bool,
    },
    Leave {
        pick: u16,
        valid: bool,
    },
    /// Agent index; 250 and above is an unknown agent.
    Presence {
        agent: u8,
        presence: Pres,
    },
    Disconnect {
        agent: u8,
    },
    Accept {
        pick: u16,
        valid: bool,
    },
    Reject {
        pick: u16,
        valid: bool,
    },
    Resolve {
        pick: u16,
        valid: bool,
    },
    Transfer {
        pick: u16,
        to: TransferTo,
        valid: bool,
    },
    Escalate {
        pick: u16,
        valid: bool,
    },
    /// Virtual time passes; due timers fire in order.
    Advance {
        ms: u64,
    },
    /// Time jumps to the next timer deadline, which fires.
    FireNext,
    Reconfigure(Tweak),
    /// Snapshot, restore into a second router and compare; `swap` continues with the restored one.
    RestoreCheck {
        swap: bool,
    },
}

/// A concrete command as sent to the router.
#[derive(Debug, Clone, PartialEq)]
enum Op {
    Arrive {
        id: u128,
        channel: Ch,
        tier: Option<&'static str>,
        language: Option<&'static str>,
        text: &'static str,
    },
    Message {
        conv: u128,
        text: &'static str,
    },
    Leave {
        conv: u128,
    },
    Presence {
        agent: Agent,
        presence: Pres,
    },
    Disconnect {
        agent: Agent,
    },
    Accept {
        agent: Agent,
        conv: u128,
    },
    Reject {
        agent: Agent,
        conv: u128,
    },
    Resolve {
        agent: Agent,
        conv: u128,
    },
    TransferToAgent {
        agent: Agent,
        conv: u128,
        to: Agent,
    },
    TransferToQueue {
        agent: Agent,
        conv: u128,
        to: &'static str,
    },
    Escalate {
        agent: Agent,
        conv: u128,
    },
    Timer {
        at: u64,
        key: TimerKey,
    },
    Reconfigure(Tweak),
    /// Not a command: the restore check (recorded so traces show it).
    Restore {
        swap: bool,
    },
}

// ----- strategies --------------------------------------------------------------------------------

fn channel() -> impl Strategy<Value = Ch> {
    prop_oneof![
        5 => Just(Ch::Chat),
        3 => Just(Ch::Email),
        2 => Just(Ch::Sms),
        1 => Just(Ch::Whatsapp),
    ]
}

fn agent_strategy() -> impl Strategy<Value = AgentStrategy> {
    prop_oneof![
        Just(AgentStrategy::LongestIdle),
        Just(AgentStrategy::LeastOccupied),
        Just(AgentStrategy::RoundRobin),
        Just(AgentStrategy::MostSkilled),
    ]
}

fn skill() -> impl Strategy<Value = &'static str> {
    prop::sample::select(&SKILLS[..])
}

fn step_action() -> impl Strategy<Value = StepAction> {
    prop_oneof![
        2 => (1i32..10).prop_map(StepAction::RaiseBy),
        1 => (0i32..60).prop_map(StepAction::SetTo),
        2 => any::<u8>().prop_map(StepAction::OverflowTo),
    ]
}

fn escalation_steps() -> impl Strategy<Value = Vec<(u64, StepAction)>> {
    prop::collection::vec((1u64..240, step_action()), 0..4)
}

fn queue_spec() -> impl Strategy<Value = QueueSpec> {
    (
        prop_oneof![3 => Just(Vec::new()), 2 => prop::collection::vec(channel(), 1..3)],
        agent_strategy(),
        prop::sample::select(&[10u64, 30, 60, 180][..]),
        prop::sample::select(&[5u64, 15, 30, 60][..]),
        prop_oneof![3 => Just(0u64), 1 => Just(5), 1 => Just(30)],
        prop_oneof![1 => Just(0u64), 2 => Just(10), 2 => Just(45), 1 => Just(300)],
        prop::bool::weighted(0.25),
        prop::option::weighted(0.4, any::<u8>()),
        escalation_steps(),
        prop::option::weighted(0.2, (skill(), 1u8..4)),
    )
        .prop_map(
            |(
                channels,
                strategy,
                sla_s,
                offer_timeout_s,
                wrap_up_s,
                overflow_after_s,
                auto_accept,
                next_tier,
                escalation,
                required_skill,
            )| QueueSpec {
                channels,
                strategy,
                sla_s,
                offer_timeout_s,
                wrap_up_s,
                overflow_after_s,
                auto_accept,
                next_tier,
                escalation,
                required_skill,
            },
        )
}

fn agent_spec() -> impl Strategy<Value = AgentSpec> {
    (
        prop_oneof![1 => Just(Vec::new()), 6 => prop::collection::vec(any::<u8>(), 1..4)],
        prop::collection::vec((skill(), 1u8..10), 0..3),
        prop::collection::vec(prop::sample::select(&["en", "es", "fr"][..]), 0..3),
        prop::option::weighted(0.85, 1u16..=4),
        prop::option::weighted(0.6, 1u16..=4),
        prop::option::weighted(0.5, 1u16..=4),
        1u16..=8,
    )
        .prop_map(
            |(queues, skills, languages, chat, email, sms, max_total)| AgentSpec {
                queues,
                skills,
                languages,
                chat,
                email,
                sms,
                max_total,
            },
        )
}

fn rule_spec() -> impl Strategy<Value = RuleSpec> {
    (
        prop::collection::vec(prop::sample::select(&KEYWORDS[..]), 0..3),
        prop_oneof![3 => Just(Vec::new()), 1 => prop::collection::vec(channel(), 1..3)],
        prop::bool::weighted(0.15),
        prop_oneof![4 => Just(Vec::new()), 1 => Just(vec!["es"])],
        prop::collection::vec(any::<u8>(), 1..4),
        -5i32..15,
        prop::collection::vec((skill(), 1u8..6), 0..2),
        prop::bool::weighted(0.3),
    )
        .prop_map(
            |(
                keywords,
                channels,
                vip_only,
                languages,
                queues,
                priority,
                skills,
                require_language,
            )| {
                RuleSpec {
                    keywords,
                    channels,
                    vip_only,
                    languages,
                    queues,
                    priority,
                    skills,
                    require_language,
                }
            },
        )
}

fn policy_spec() -> impl Strategy<Value = PolicySpec> {
    (
        prop_oneof![1 => Just(0u64), 3 => Just(20), 1 => Just(120)],
        1u32..5,
        prop::sample::select(&[120u64, 900, 3600][..]),
        prop_oneof![1 => Just(0u64), 2 => Just(30), 1 => Just(300)],
        prop::sample::select(&[10u64, 60][..]),
        any::<bool>(),
        0i32..10,
        0i32..6,
        1u8..4,
        0i32..15,
    )
        .prop_map(
            |(
                reoffer_cooldown_s,
                max_missed,
                reopen_window_s,
                prefer_last_s,
                transfer_wait_s,
                wording,
                urgent_boost,
                repeat_message,
                repeat_max,
                sla_breach,
            )| PolicySpec {
                reoffer_cooldown_s,
                max_missed,
                reopen_window_s,
                prefer_last_s,
                transfer_wait_s,
                wording,
                urgent_boost,
                repeat_message,
                repeat_max,
                sla_breach,
            },
        )
}

fn config_spec() -> impl Strategy<Value = ConfigSpec> {
    (
        prop::collection::vec(queue_spec(), 2..=6),
        prop::option::weighted(
            0.3,
            (
                any::<u8>(),
                prop::sample::select(&[10u16, 20, 30, 60][..]),
                any::<u16>(),
            )
                .prop_map(|(queue, period, open)| HoursSpec {
                    queue,
                    period,
                    open,
                }),
        ),
        prop::collection::vec(agent_spec(), 3..=40),
        prop::collection::vec(rule_spec(), 0..5),
        prop::collection::vec(any::<u8>(), 1..3),
        policy_spec(),
    )
        .prop_map(
            |(queues, hours, agents, rules, default_queues, policy)| ConfigSpec {
                queues,
                hours,
                agents,
                rules,
                default_queues,
                policy,
            },
        )
}

fn tweak() -> impl Strategy<Value = Tweak> {
    prop_oneof![
        1 => Just(Tweak::Same),
        2 => (any::<u8>(), agent_strategy())
            .prop_map(|(queue, strategy)| Tweak::Strategy { queue, strategy }),
        2 => (
            any::<u8>(),
            prop::sample::select(&[5u64, 15, 30, 60][..]),
            prop::sample::select(&[10u64, 30, 60, 180][..]),
            prop::sample::select(&[0u64, 5, 30][..]),
            prop::sample::select(&[0u64, 10, 45, 300][..]),
        )
            .prop_map(|(queue, offer_timeout_s, sla_s, wrap_up_s, overflow_after_s)| {
                Tweak::Timing {
                    queue,
                    offer_timeout_s,
                    sla_s,
                    wrap_up_s,
                    overflow_after_s,
                }
            }),
        1 => (any::<u8>(), any::<bool>()).prop_map(|(queue, on)| Tweak::AutoAccept { queue, on }),
        1 => (any::<u8>(), escalation_steps())
            .prop_map(|(queue, steps)| Tweak::Escalation { queue, steps }),
        1 => (any::<u8>(), -5i32..15).prop_map(|(rule, priority)| Tweak::RulePriority { rule, priority }),
        2 => (any::<u8>(), 1u8..3).prop_map(|(rule, by)| Tweak::RotateRuleQueues { rule, by }),
        1 => (1u8..4).prop_map(|by| Tweak::RotateRules { by }),
        1 => (
            prop::sample::select(&[0u64, 20, 120][..]),
            1u32..5,
            prop::sample::select(&[0u64, 30, 300][..]),
        )
            .prop_map(|(reoffer_cooldown_s, max_missed, prefer_last_s)| Tweak::Offers {
                reoffer_cooldown_s,
                max_missed,
                prefer_last_s,
            }),
        3 => any::<u8>().prop_map(|agent| Tweak::RemoveAgent { agent }),
        2 => (any::<u8>(), prop::collection::vec(any::<u8>(), 0..3))
            .prop_map(|(agent, queues)| Tweak::Memberships { agent, queues }),
        1 => Just(Tweak::AllAgentsBack),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    let tier = prop_oneof![6 => Just(None), 1 => Just(Some("vip")), 1 => Just(Some("gold"))];
    let language = prop::sample::select(
        &[
            None,
            None,
            Some("en"),
            Some("es"),
            Some("es-MX"),
            Some("fr"),
            Some("de"),
        ][..],
    );
    let text = || prop::sample::select(&TEXTS[..]);
    let valid = || prop::bool::weighted(0.9);
    prop_oneof![
        12 => (channel(), tier, language, text(), prop::bool::weighted(0.02)).prop_map(
            |(channel, tier, language, text, duplicate)| Step::Arrive {
                channel,
                tier,
                language,
                text,
                duplicate,
            }
        ),
        5 => (any::<u16>(), text(), valid())
            .prop_map(|(pick, text, valid)| Step::Message { pick, text, valid }),
        3 => (any::<u16>(), valid()).prop_map(|(pick, valid)| Step::Leave { pick, valid }),
        8 => (
            any::<u8>(),
            prop_oneof![6 => Just(Pres::Available), 2 => Just(Pres::Away), 1 => Just(Pres::Offline)],
        )
            .prop_map(|(agent, presence)| Step::Presence { agent, presence }),
        1 => any::<u8>().prop_map(|agent| Step::Disconnect { agent }),
        18 => (any::<u16>(), valid()).prop_map(|(pick, valid)| Step::Accept { pick, valid }),
        3 => (any::<u16>(), valid()).prop_map(|(pick, valid)| Step::Reject { pick, valid }),
        14 => (any::<u16>(), valid()).prop_map(|(pick, valid)| Step::Resolve { pick, valid }),
        3 => (
            any::<u16>(),
            prop_oneof![
                any::<u8>().prop_map(TransferTo::Agent),
                any::<u8>().prop_map(TransferTo::Queue),
            ],
            valid(),
        )
            .prop_map(|(pick, to, valid)| Step::Transfer { pick, to, valid }),
        2 => (any::<u16>(), valid()).prop_map(|(pick, valid)| Step::Escalate { pick, valid }),
        16 => prop_oneof![
            4 => 0u64..3_000,
            2 => 0u64..90_000,
            1 => 0u64..1_800_000,
        ]
        .prop_map(|ms| Step::Advance { ms }),
        4 => Just(Step::FireNext),
        1 => tweak().prop_map(Step::Reconfigure),
        1 => any::<bool>().prop_map(|swap| Step::RestoreCheck { swap }),
    ]
}

fn scenario(steps: std::ops::Range<usize>) -> impl Strategy<Value = (ConfigSpec, Vec<Step>)> {
    (config_spec(), prop::collection::vec(step(), steps))
}

// ----- the driver --------------------------------------------------------------------------------

/// A conversation's state as announced by the effects so far.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Announced {
    Waiting,
    Offered(AgentId),
    Assigned(AgentId),
    Resolved(AgentId),
}

#[derive(Debug, Clone)]
struct Known {
    channel: Ch,
    state: Announced,
}

type Rank = (Reverse<Priority>, Timestamp, u64);

/// One command's outcome, for the determinism property.
type TraceEntry = (Op, Result<(), CommandError>, Vec<Effect>);

/// Drives one router through a scenario, like the daemon: timers kept and fired in virtual time.
struct Sim {
    base: RoutingConfig,
    config: RoutingConfig,
    router: Router,
    timers: TimerQueue,
    /// The timers pending in `timers`, by key (the queue does not expose deadlines).
    pending: BTreeMap<TimerKey, Timestamp>,
    now: Timestamp,
    /// Every conversation that arrived and has not ended, as its effects announced it.
    known: BTreeMap<u128, Known>,
    ended: BTreeSet<u128>,
    next_id: u128,
    /// Run the per-command checks (off for the determinism property, which compares traces).
    checks: bool,
    /// (step index, command) for failure reports.
    ops: Vec<(usize, Op)>,
    trace: Vec<TraceEntry>,
    step_index: usize,
    commands: usize,
}

impl Sim {
    fn new(spec: &ConfigSpec, checks: bool) -> Sim {
        let config = build_config(spec);
        let mut effects = Vec::new();
        let router = Router::new(config.clone(), Timestamp(0), &mut effects).unwrap();
        let mut sim = Sim {
            base: config.clone(),
            config,
            router,
            timers: TimerQueue::new(),
            pending: BTreeMap::new(),
            now: Timestamp(0),
            known: BTreeMap::new(),
            ended: BTreeSet::new(),
            next_id: 1,
            checks,
            ops: Vec::new(),
            trace: Vec::new(),
            step_index: 0,
            commands: 0,
        };
        sim.apply_timers(&effects);
        sim
    }

    fn run(&mut self, steps: &[Step]) -> Result<(), String> {
        for (index, step) in steps.iter().enumerate() {
            self.step_index = index;
            self.step(step)
                .map_err(|what| self.report(index, step, &what))?;
        }
        Ok(())
    }

    fn report(&self, index: usize, step: &Step, what: &str) -> String {
        let mut out = format!(
            "step {index} {step:?} at t={}ms: {what}\ncommands so far (step: command), last 60:\n",
            self.now.0
        );
        let skip = self.ops.len().saturating_sub(60);
        for (step, op) in &self.ops[skip..] {
            out.push_str(&format!("  {step}: {op:?}\n"));
        }
        out
    }

    fn agent(&self, index: u8) -> Agent {
        if index >= 250 {
            Agent(GHOST)
        } else {
            Agent(AGENTS[index as usize % self.base.agents.len()])
        }
    }

    fn agent_named(id: &AgentId) -> Agent {
        Agent(
            AGENTS
                .iter()
                .find(|name| **name == id.as_str())
                .copied()
                .unwrap_or(GHOST),
        )
    }

    /// The `pick`-th known conversation matching `filter`, with its announced state.
    fn nth(&self, pick: u16, filter: impl Fn(&Announced) -> bool) -> Option<(u128, Announced)> {
        let matching: Vec<(u128, &Known)> = self
            .known
            .iter()
            .filter(|(_, known)| filter(&known.state))
            .map(|(id, known)| (*id, known))
            .collect();
        if matching.is_empty() {
            return None;
        }
        let (id, known) = matching[pick as usize % matching.len()];
        Some((id, known.state.clone()))
    }

    /// A random, usually wrong, (agent, conversation) pair.
    fn wild_pair(&self, pick: u16) -> (Agent, u128) {
        let agent = self.agent((pick % 251) as u8);
        let conv = if pick.is_multiple_of(3) {
            UNKNOWN_CONVERSATION
        } else {
            self.nth(pick / 3, |_| true)
                .map_or(UNKNOWN_CONVERSATION, |(id, _)| id)
        };
        (agent, conv)
    }

    /// An (agent, conversation) pair in the given announced state, or a wild one.
    fn pair(&self, pick: u16, valid: bool, offered: bool) -> (Agent, u128, bool) {
        if valid {
            let found = self.nth(pick, |state| match state {
                Announced::Offered(_) => offered,
                Announced::Assigned(_) => !offered,
                _ => false,
            });
            if let Some((id, Announced::Offered(agent) | Announced::Assigned(agent))) = found {
                return (Sim::agent_named(&agent), id, true);
            }
        }
        let (agent, conv) = self.wild_pair(pick);
        (agent, conv, false)
    }

    fn step(&mut self, step: &Step) -> Result<(), String> {
        match step {
            Step::Arrive {
                channel,
                tier,
                language,
                text,
                duplicate,
            } => {
                let existing = self.known.keys().next().copied();
                let (id, plausible) = match existing {
                    Some(id) if *duplicate => (id, false),
                    _ => {
                        self.next_id += 1;
                        (self.next_id - 1, true)
                    }
                };
                self.send(
                    Op::Arrive {
                        id,
                        channel: *channel,
                        tier: *tier,
                        language: *language,
                        text,
                    },
                    plausible,
                )
            }
            Step::Message { pick, text, valid } => {
                let found = if *valid {
                    self.nth(*pick, |_| true)
                } else {
                    None
                };
                let conv = found.as_ref().map_or(UNKNOWN_CONVERSATION, |(id, _)| *id);
                self.send(Op::Message { conv, text }, found.is_some())
            }
            Step::Leave { pick, valid } => {
                let found = if *valid {
                    self.nth(*pick, |state| {
                        matches!(state, Announced::Waiting | Announced::Offered(_))
                    })
                } else {
                    None
                };
                let conv = match found {
                    Some((id, _)) => id,
                    None => self.wild_pair(*pick).1,
                };
                self.send(Op::Leave { conv }, found.is_some())
            }
            Step::Presence { agent, presence } => {
                let agent = self.agent(*agent);
                self.send(
                    Op::Presence {
                        agent,
                        presence: *presence,
                    },
                    agent.0 != GHOST,
                )
            }
            Step::Disconnect { agent } => {
                let agent = self.agent(*agent);
                self.send(Op::Disconnect { agent }, agent.0 != GHOST)
            }
            Step::Accept { pick, valid } => {
                let (agent, conv, plausible) = self.pair(*pick, *valid, true);
                self.send(Op::Accept { agent, conv }, plausible)
            }
            Step::Reject { pick, valid } => {
                let (agent, conv, plausible) = self.pair(*pick, *valid, true);
                self.send(Op::Reject { agent, conv }, plausible)
            }
            Step::Resolve { pick, valid } => {
                let (agent, conv, plausible) = self.pair(*pick, *valid, false);
                self.send(Op::Resolve { agent, conv }, plausible)
            }
            Step::Escalate { pick, valid } => {
                let (agent, conv, plausible) = self.pair(*pick, *valid, false);
                self.send(Op::Escalate { agent, conv }, plausible)
            }
            Step::Transfer { pick, to, valid } => {
                let (agent, conv, plausible) = self.pair(*pick, *valid, false);
                let op = match to {
                    TransferTo::Agent(to) => Op::TransferToAgent {
                        agent,
                        conv,
                        to: self.agent(*to),
                    },
                    TransferTo::Queue(to) => Op::TransferToQueue {
                        agent,
                        conv,
                        to: if *to >= 200 {
                            NOWHERE
                        } else {
                            QUEUES[*to as usize % self.base.queues.len()]
                        },
                    },
                };
                self.send(op, plausible)
            }
            Step::Advance { ms } => self.advance_to(Timestamp(self.now.0 + ms)),
            Step::FireNext => match self.timers.next_deadline() {
                Some(at) => self.advance_to(at.max(self.now)),
                None => Ok(()),
            },
            Step::Reconfigure(tweak) => self.send(Op::Reconfigure(tweak.clone()), true),
            Step::RestoreCheck { swap } => self.restore_check(*swap),
        }
    }

    fn advance_to(&mut self, until: Timestamp) -> Result<(), String> {
        while let Some((at, key)) = self.timers.pop_due(until) {
            self.pending.remove(&key);
            self.now = at.max(self.now);
            self.send(Op::Timer { at: at.0, key }, true)?;
        }
        self.now = until;
        Ok(())
    }

    fn apply_timers(&mut self, effects: &[Effect]) {
        self.timers.apply(effects);
        for effect in effects {
            match effect {
                Effect::ScheduleTimer { key, at } => {
                    self.pending.insert(key.clone(), *at);
                }
                Effect::CancelTimer { key } => {
                    self.pending.remove(key);
                }
                _ => {}
            }
        }
    }

    fn command(&self, op: &Op) -> Command {
        let conversation = |conv: u128| ConversationId(conv);
        match op {
            Op::Arrive {
                id,
                channel,
                tier,
                language,
                text,
            } => Command::Arrive(Box::new(NewConversation {
                id: ConversationId(*id),
                message: MessageId(*id << 16),
                channel: channel.channel(),
                provider: "test".into(),
                to_address: "support@example.com".into(),
                customer_tier: tier.map(str::to_owned),
                language: language.map(str::to_owned),
                subject: None,
                text: (*text).to_owned(),
            })),
            Op::Message { conv, text } => Command::CustomerMessage {
                conversation: conversation(*conv),
                message: MessageId((*conv << 16) + self.commands as u128 % 65_536),
                text: (*text).to_owned(),
            },
            Op::Leave { conv } => Command::CustomerLeft {
                conversation: conversation(*conv),
            },
            Op::Presence { agent, presence } => Command::AgentPresence {
                agent: agent.id(),
                presence: presence.presence(),
            },
            Op::Disconnect { agent } => Command::AgentDisconnected { agent: agent.id() },
            Op::Accept { agent, conv } => Command::Accept {
                agent: agent.id(),
                conversation: conversation(*conv),
            },
            Op::Reject { agent, conv } => Command::Reject {
                agent: agent.id(),
                conversation: conversation(*conv),
            },
            Op::Resolve { agent, conv } => Command::Resolve {
                agent: agent.id(),
                conversation: conversation(*conv),
            },
            Op::TransferToAgent { agent, conv, to } => Command::Transfer {
                agent: agent.id(),
                conversation: conversation(*conv),
                to: TransferTarget::Agent(to.id()),
            },
            Op::TransferToQueue { agent, conv, to } => Command::Transfer {
                agent: agent.id(),
                conversation: conversation(*conv),
                to: TransferTarget::Queue(QueueName::new(to)),
            },
            Op::Escalate { agent, conv } => Command::Escalate {
                agent: agent.id(),
                conversation: conversation(*conv),
            },
            Op::Timer { key, .. } => Command::TimerFired(key.clone()),
            Op::Reconfigure(tweak) => {
                let mut config = self.config.clone();
                tweak.apply(&mut config, &self.base);
                Command::ReplaceConfig(Box::new(config))
            }
            Op::Restore { .. } => unreachable!("not a command"),
        }
    }

    /// Sends one command and checks every property that must hold after it.
    fn send(&mut self, op: Op, plausible: bool) -> Result<(), String> {
        self.ops.push((self.step_index, op.clone()));
        let command = self.command(&op);
        let new_config = match &command {
            Command::ReplaceConfig(config) => Some((**config).clone()),
            _ => None,
        };
        // Refused commands must leave the state as it was: compare snapshots for every implausible
        // command and a sample of the others (a snapshot is O(n)).
        let probe = self.checks && (!plausible || self.commands.is_multiple_of(16));
        let before = probe.then(|| self.router.snapshot());
        self.commands += 1;
        let mut effects = Vec::new();
        let result = self.router.handle(self.now, command, &mut effects);
        let outcome = self.after(&op, &result, &effects, before, new_config);
        self.trace.push((op, result, effects));
        outcome
    }

    /// Checks a command's outcome and learns from its effects.
    fn after(
        &mut self,
        op: &Op,
        result: &Result<(), CommandError>,
        effects: &[Effect],
        before: Option<RouterSnapshot>,
        new_config: Option<RoutingConfig>,
    ) -> Result<(), String> {
        if let Err(error) = result {
            if !effects.is_empty() {
                return Err(format!(
                    "{op:?} was refused ({error}) but produced effects {effects:?}"
                ));
            }
            if let Some(before) = before {
                let after = self.router.snapshot();
                if after != before {
                    return Err(format!(
                        "{op:?} was refused ({error}) but changed the state: {}",
                        snapshot_diff(&before, &after)
                    ));
                }
            }
        } else {
            if let Some(config) = new_config {
                self.config = config;
            }
            if let Op::Arrive { id, channel, .. } = op {
                self.known.insert(
                    *id,
                    Known {
                        channel: *channel,
                        state: Announced::Waiting,
                    },
                );
            }
            self.apply_timers(effects);
            self.learn(effects)?;
        }
        if self.checks {
            self.check(op, effects).map_err(|what| {
                format!("after {op:?} -> {result:?}: {what}\neffects: {effects:?}")
            })?;
        }
        Ok(())
    }

    /// Updates the announced states from a command's effects.
    fn learn(&mut self, effects: &[Effect]) -> Result<(), String> {
        for effect in effects {
            let (id, state) = match effect {
                Effect::Offered {
                    conversation,
                    agent,
                    ..
                } => (conversation, Some(Announced::Offered(agent.clone()))),
                Effect::Assigned {
                    conversation,
                    agent,
                    ..
                } => (conversation, Some(Announced::Assigned(agent.clone()))),
                Effect::Resolved {
                    conversation,
                    agent,
                    ..
                } => (conversation, Some(Announced::Resolved(agent.clone()))),
                Effect::OfferWithdrawn { conversation, .. }
                | Effect::Queued { conversation, .. }
                | Effect::Reopened { conversation, .. }
                | Effect::Transferred { conversation, .. }
                | Effect::Escalated { conversation, .. } => {
                    (conversation, Some(Announced::Waiting))
                }
                Effect::Abandoned { conversation, .. } | Effect::Closed { conversation } => {
                    (conversation, None)
                }
                _ => continue,
            };
            match state {
                Some(state) => match self.known.get_mut(&id.0) {
                    Some(known) => known.state = state,
                    None => return Err(format!("effect {effect:?} names an unknown conversation")),
                },
                None => {
                    if self.known.remove(&id.0).is_none() {
                        return Err(format!("effect {effect:?} ends an unknown conversation"));
                    }
                    self.ended.insert(id.0);
                }
            }
        }
        Ok(())
    }

    fn check(&self, op: &Op, effects: &[Effect]) -> Result<(), String> {
        // 1. The router's own invariants.
        self.router.audit().map_err(|e| format!("audit: {e}"))?;
        // 3. Nothing vanishes, and each conversation is where its effects said.
        if self.router.conversation_count() != self.known.len() {
            let held: BTreeSet<u128> = self.router.conversation_ids().map(|id| id.0).collect();
            let known: BTreeSet<u128> = self.known.keys().copied().collect();
            return Err(format!(
                "router holds {} conversations, {} are known: only held {:?}, only known {:?}, of them ended {:?}",
                held.len(),
                known.len(),
                held.difference(&known).collect::<Vec<_>>(),
                known.difference(&held).collect::<Vec<_>>(),
                held.intersection(&self.ended).collect::<Vec<_>>()
            ));
        }
        for (&id, known) in &self.known {
            let Some(view) = self.router.conversation(ConversationId(id)) else {
                return Err(format!(
                    "conversation {id} vanished (last announced {:?})",
                    known.state
                ));
            };
            let agrees = match (&known.state, &view.state) {
                (Announced::Waiting, ConversationState::Waiting) => true,
                (Announced::Offered(a), ConversationState::Offered { agent, .. })
                | (Announced::Assigned(a), ConversationState::Assigned { agent, .. })
                | (Announced::Resolved(a), ConversationState::Resolved { agent, .. }) => a == agent,
                _ => false,
            };
            if !agrees {
                return Err(format!(
                    "conversation {id} is {:?} but its effects announced {:?}",
                    view.state, known.state
                ));
            }
        }
        // 2. Priority/age order for every offer (and auto-accepted assignment) this command made.
        for effect in effects {
            let (conversation, agent) = match effect {
                Effect::Offered {
                    conversation,
                    agent,
                    ..
                } => (*conversation, agent),
                // An accept turns an earlier offer into an assignment: no selection happens.
                Effect::Assigned {
                    conversation,
                    agent,
                    ..
                } if !matches!(op, Op::Accept { .. }) => (*conversation, agent),
                _ => continue,
            };
            let (Some(rank), Some(offered)) = (
                self.router.wait_rank(conversation),
                self.known.get(&conversation.0),
            ) else {
                continue;
            };
            if let Some((other, other_rank)) = self.better_waiting(agent, offered.channel, rank) {
                return Err(format!(
                    "order: {effect:?} with rank {rank:?}, but conversation {other} (rank {other_rank:?}, {:?}) waits on the same channel and is eligible for {agent}",
                    self.router.conversation(ConversationId(other))
                ));
            }
        }
        Ok(())
    }

    /// A waiting conversation on `channel`, eligible for `agent`, ranked strictly better than `rank`.
    fn better_waiting(&self, agent: &AgentId, channel: Ch, rank: Rank) -> Option<(u128, Rank)> {
        self.known
            .iter()
            .filter(|(_, known)| known.state == Announced::Waiting && known.channel == channel)
            .filter(|(id, _)| self.router.is_eligible(ConversationId(**id), agent))
            .filter_map(|(id, _)| {
                let other = self.router.wait_rank(ConversationId(*id))?;
                (other < rank).then_some((*id, other))
            })
            .min_by_key(|(_, rank)| *rank)
    }

    /// 6. Restoring a snapshot under the same configuration gives the same router.
    fn restore_check(&mut self, swap: bool) -> Result<(), String> {
        self.ops.push((self.step_index, Op::Restore { swap }));
        let snapshot = self.router.snapshot();
        let mut effects = Vec::new();
        let restored = Router::restore(
            self.config.clone(),
            snapshot.clone(),
            self.now,
            &mut effects,
        )
        .map_err(|e| format!("restore refused: {e}"))?;
        restored
            .audit()
            .map_err(|e| format!("audit of the restored router: {e}"))?;
        let displaced = effects.iter().any(|effect| {
            matches!(
                effect,
                Effect::OfferWithdrawn {
                    reason: OfferEnd::Reconfigured,
                    ..
                } | Effect::Closed { .. }
            )
        });
        if !displaced {
            let again = restored.snapshot();
            if again != snapshot {
                return Err(format!(
                    "restored snapshot differs: {}",
                    snapshot_diff(&snapshot, &again)
                ));
            }
            // Every timer is re-emitted with the deadline the running router gave it.
            for effect in &effects {
                if let Effect::ScheduleTimer { key, at } = effect
                    && self.pending.get(key) != Some(at)
                {
                    return Err(format!(
                        "restore schedules {key:?} at {at:?}, the running router had {:?}",
                        self.pending.get(key)
                    ));
                }
            }
        }
        if swap {
            self.router = restored;
            self.trace
                .push((Op::Restore { swap }, Ok(()), effects.clone()));
            self.apply_timers(&effects);
            self.learn(&effects)?;
            if self.checks {
                self.check(&Op::Restore { swap }, &effects)?;
            }
        }
        Ok(())
    }
}

/// The first difference between two snapshots, readably.
fn snapshot_diff(a: &RouterSnapshot, b: &RouterSnapshot) -> String {
    if a.conversations.len() != b.conversations.len() {
        return format!(
            "{} conversations before, {} after",
            a.conversations.len(),
            b.conversations.len()
        );
    }
    let mut left = a.conversations.clone();
    let mut right = b.conversations.clone();
    left.sort_by_key(|c| c.id);
    right.sort_by_key(|c| c.id);
    for (x, y) in left.iter().zip(&right) {
        if x != y {
            return format!("conversation before: {x:?}\nafter: {y:?}");
        }
    }
    for (x, y) in a.agents.iter().zip(&b.agents) {
        if x != y {
            return format!("agent before: {x:?}\nafter: {y:?}");
        }
    }
    if a != b {
        return "conversations listed in another order".into();
    }
    "no difference".into()
}

// ----- the properties ----------------------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 64,
        // Each shrink step replays a sequence; bound the time a failure takes to report.
        max_shrink_iters: 4096,
        max_shrink_time: 120_000,
        ..ProptestConfig::default()
    })]

    /// Invariants 1–4 and 6 after every command of long random sequences.
    #[test]
    fn invariants_hold_after_every_command((spec, steps) in scenario(500..3000)) {
        let mut sim = Sim::new(&spec, true);
        if let Err(failure) = sim.run(&steps) {
            return Err(TestCaseError::fail(failure));
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 16,
        max_shrink_iters: 1024,
        max_shrink_time: 60_000,
        ..ProptestConfig::default()
    })]

    /// 5. The same sequence on fresh routers gives identical effect streams.
    #[test]
    fn same_sequence_same_effects((spec, steps) in scenario(500..3000)) {
        let mut first = Sim::new(&spec, false);
        let mut second = Sim::new(&spec, false);
        let one = first.run(&steps);
        let two = second.run(&steps);
        prop_assert_eq!(&one, &two);
        prop_assert_eq!(first.trace.len(), second.trace.len());
        for (index, (a, b)) in first.trace.iter().zip(&second.trace).enumerate() {
            prop_assert_eq!(a, b, "command {} differs", index);
        }
        prop_assert_eq!(first.router.snapshot(), second.router.snapshot());
    }
}
