//! The simulator's discrete-event loop: the real [`Router`] driven in virtual time by synthetic traffic.
//!
//! # Events
//!
//! One binary heap holds the simulator's own events, ordered by (time, insertion order); the
//! router's timers live in a [`TimerQueue`] beside it. At each step the earlier of the two goes
//! first (a router timer wins a tie). Events:
//!
//! * **Arrival** of a stream's next conversation (Poisson, piecewise-constant hourly rate: the next
//!   gap is drawn at the current hour's rate, and if it crosses the hour boundary the draw restarts
//!   at the boundary with the next hour's rate, which is exact because the exponential is
//!   memoryless). The customer's tier, language, text, handle time and patience are drawn at
//!   arrival.
//! * **Shift** change of an agent group: its agents go `Available` or `Offline`.
//! * **Accept** of an offer by the simulated agent, after the group's accept delay.
//! * **Finish** of a handle time: the agent resolves (or, with the queue's `escalate_share`,
//!   escalates to the next tier, which handles the conversation again).
//! * **Patience** expiry: `CustomerLeft` if the conversation has not been answered yet.
//! * **Return** of an agent the router set away after missed offers (accept delays longer than the
//!   offer timeout): available again after [`AWAY_RETURN`], if still on shift.
//! * **Router timers** (offer deadlines, wait checks, wrap-ups...), fed back as `TimerFired`.
//!
//! Events that refer to a conversation carry its id and a generation (which offer, which
//! assignment), so one that has become stale (the offer timed out, the conversation left) is
//! dropped instead of reaching the router.
//!
//! # Time and determinism
//!
//! Virtual time is the router's: whole milliseconds since the start of the run. Arrival times are
//! drawn in continuous seconds and rounded, so they do not drift; handle times, patience and delays
//! are rounded to the millisecond, a relative error below 10⁻⁵ for durations of minutes, far below
//! the sampling noise of any run.
//!
//! Every random source has its own generator (`Pcg64Mcg`) seeded from the scenario seed and the
//! source's name: each arrival stream has one for its timing and one for its customers, each agent
//! group one for accept delays, each queue one for escalation decisions. Adding an agent group or
//! a queue therefore changes no arrival time, handle time or patience, and the same scenario and
//! seed replay bit for bit.
//!
//! # After `duration`
//!
//! No conversation arrives at or after `duration`. The run goes on (shifts included) until every
//! conversation has been answered or has abandoned, or for at most [`DRAIN_LIMIT`] more; whatever
//! is still unanswered then is reported as such.

use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};

use rand::Rng;
use rand_distr::{Exp1, StandardNormal};
use rand_pcg::Pcg64Mcg;

use super::report::{AgentTally, Collector, Report, ReportHeader, RunInfo};
use super::scenario::{ArrivalStream, DAY, DEFAULT_TEXT, Distribution, Scenario, Share};
use crate::routing::{
    AgentId, Command, CommandError, ConversationId, Effect, MessageId, Millis, NewConversation,
    Presence, Priority, QueueName, Router, TimerKey, TimerQueue, Timestamp,
};

/// How long the run may go on after `duration` to finish the conversations in progress.
pub const DRAIN_LIMIT: Millis = DAY;

/// A conversation is escalated at most this many times in a row (guards against tier cycles).
const MAX_ESCALATIONS: u8 = 4;

/// An agent the router set away for missed offers makes themselves available again after this long
/// (if still on shift).
pub const AWAY_RETURN: Millis = Millis(60_000);

/// How many events pass between two progress reports.
const PROGRESS_EVERY: u64 = 1 << 14;

const NO_AGENT: u32 = u32::MAX;
const FREE: ConversationId = ConversationId(u128::MAX);

/// Where a run is, for a progress bar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Virtual time reached.
    pub now: Millis,
    /// When arrivals stop (the run may go a little beyond to finish what is in progress).
    pub duration: Millis,
    pub arrivals: u64,
}

/// Why a run failed. With a validated scenario this is a bug in the simulator or the router.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("the router refused the scenario's configuration: {0}")]
    Config(CommandError),
    #[error(
        "the router refused a simulated {command} at {at_ms} ms: {error} (a bug in the simulator or the router)"
    )]
    Refused {
        command: &'static str,
        at_ms: u64,
        error: CommandError,
    },
    /// Only from [`run_audited`]: the router broke one of its invariants.
    #[error("router invariant broken after a simulated {command} at {at_ms} ms: {problem}")]
    Invariant {
        command: &'static str,
        at_ms: u64,
        problem: String,
    },
}

/// Runs the scenario and returns its report.
pub fn run(scenario: &Scenario) -> Result<Report, SimError> {
    run_with_progress(scenario, &mut |_| {})
}

/// Runs the scenario, calling `progress` every few thousand events.
pub fn run_with_progress(
    scenario: &Scenario,
    progress: &mut dyn FnMut(Progress),
) -> Result<Report, SimError> {
    Engine::new(scenario, false)?.run(progress)
}

/// Runs the scenario and checks every router invariant (`Router::audit`) after every command.
/// For tests: the audit is a brute-force scan, so keep such runs short.
pub fn run_audited(scenario: &Scenario) -> Result<Report, SimError> {
    Engine::new(scenario, true)?.run(&mut |_| {})
}

/// A fast hasher for the engine's small name maps (agent and queue names it looks up per effect).
/// FxHash's scheme: not DoS-resistant, which does not matter for names from a scenario file.
#[derive(Debug, Default)]
struct NameHasher(u64);

impl Hasher for NameHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
        for &byte in chunks.remainder() {
            self.add(u64::from(byte));
        }
    }

    fn write_u8(&mut self, value: u8) {
        self.add(u64::from(value));
    }
}

impl NameHasher {
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

type NameMap<K> = HashMap<K, u32, BuildHasherDefault<NameHasher>>;

// ----- random sources -------------------------------------------------------------------------------

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// An independent generator for the random source `label` (FNV-1a of the label, mixed with the seed).
fn rng_for(seed: u64, label: &str) -> Pcg64Mcg {
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    for byte in label.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let high = splitmix(seed ^ splitmix(hash));
    let low = splitmix(high ^ hash.rotate_left(32));
    Pcg64Mcg::new((u128::from(high) << 64) | u128::from(low))
}

/// A [`Distribution`] ready to sample.
#[derive(Debug, Clone, Copy)]
enum Sampler {
    Exponential { mean: f64 },
    LogNormal { mu: f64, sigma: f64 },
    Constant { value: f64 },
}

impl Sampler {
    fn new(distribution: Distribution) -> Sampler {
        match distribution {
            Distribution::Exponential { mean } => Sampler::Exponential { mean },
            Distribution::LogNormal { mean, sd } => {
                // For X = e^N(μ, σ²): E[X] = e^(μ + σ²/2) and Var[X] = (e^σ² − 1)·E[X]².
                let sigma2 = (1.0 + (sd / mean).powi(2)).ln();
                Sampler::LogNormal {
                    mu: mean.ln() - sigma2 / 2.0,
                    sigma: sigma2.sqrt(),
                }
            }
            Distribution::Constant { value } => Sampler::Constant { value },
        }
    }

    fn sample(&self, rng: &mut Pcg64Mcg) -> Millis {
        let seconds = match *self {
            Sampler::Exponential { mean } => mean * rng.sample::<f64, _>(Exp1),
            Sampler::LogNormal { mu, sigma } => {
                (mu + sigma * rng.sample::<f64, _>(StandardNormal)).exp()
            }
            Sampler::Constant { value } => value,
        };
        // Capped at ~30 years so a freak draw cannot overflow virtual time.
        Millis((seconds * 1000.0).round().clamp(0.0, 1e12) as u64)
    }
}

fn pick<'a, T>(shares: &'a [Share<T>], rng: &mut Pcg64Mcg) -> Option<&'a T> {
    if shares.is_empty() {
        return None;
    }
    let mut u: f64 = rng.random();
    for share in shares {
        if u < share.share {
            return Some(&share.value);
        }
        u -= share.share;
    }
    None
}

// ----- state ----------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
enum Event {
    Arrival {
        stream: u32,
    },
    Shift {
        group: u32,
    },
    Accept {
        slot: u32,
        id: ConversationId,
        offer: u32,
    },
    Finish {
        slot: u32,
        id: ConversationId,
        assignment: u32,
    },
    Patience {
        slot: u32,
        id: ConversationId,
    },
    /// An agent set away for missed offers comes back.
    Return {
        agent: u32,
    },
}

#[derive(Debug)]
struct Scheduled {
    at: Timestamp,
    seq: u64,
    event: Event,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}

impl Eq for Scheduled {}

impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Scheduled {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

struct StreamState {
    /// Continuous time of the last arrival, in seconds.
    clock: f64,
    timing: Pcg64Mcg,
    customers: Pcg64Mcg,
    /// Handle times of next-tier pickups after an escalation.
    rework: Pcg64Mcg,
    handle: Sampler,
    patience: Option<Sampler>,
}

impl StreamState {
    /// The next arrival strictly before `end` (seconds), if any.
    fn next_arrival(&mut self, stream: &ArrivalStream, end: f64) -> Option<f64> {
        let mut t = self.clock;
        while t < end {
            let hour = (t / 3600.0).floor();
            let hour_end = (hour + 1.0) * 3600.0;
            let per_second = stream.rate.0[(hour as u64 % 24) as usize] / 3600.0;
            if per_second > 0.0 {
                let gap = self.timing.sample::<f64, _>(Exp1) / per_second;
                if t + gap < hour_end {
                    t += gap;
                    self.clock = t;
                    return (t < end).then_some(t);
                }
            }
            t = hour_end;
        }
        self.clock = t;
        None
    }
}

struct GroupState {
    /// Availability changes, in order: (time, on shift afterwards).
    transitions: Vec<(Timestamp, bool)>,
    next: usize,
    accept_delay: Sampler,
    rng: Pcg64Mcg,
    agents: Vec<u32>,
}

struct QueueSim {
    name: QueueName,
    wrap_up: Millis,
    escalate_share: f64,
    rng: Pcg64Mcg,
}

struct AgentSim {
    id: AgentId,
    group: u32,
    on_shift: bool,
    busy: u16,
    last: Timestamp,
    tally: AgentTally,
}

#[derive(Debug, Clone, Copy)]
struct Record {
    id: ConversationId,
    handle: Millis,
    stream: u32,
    priority: Priority,
    /// The queue the conversation counts in (see the report module).
    queue: u32,
    offered_to: u32,
    offer: u32,
    owner: u32,
    owner_queue: u32,
    assignment: u32,
    escalations: u8,
    counted: bool,
    queued_at_arrival: bool,
    answered: bool,
}

struct Engine<'a> {
    scenario: &'a Scenario,
    router: Router,
    timers: TimerQueue,
    effects: Vec<Effect>,
    heap: BinaryHeap<Reverse<Scheduled>>,
    seq: u64,
    now: Timestamp,
    /// Statistics window `[warm_up, duration)`.
    window: (Timestamp, Timestamp),
    streams: Vec<StreamState>,
    groups: Vec<GroupState>,
    agents: Vec<AgentSim>,
    agent_index: NameMap<AgentId>,
    queues: Vec<QueueSim>,
    queue_index: NameMap<QueueName>,
    records: Vec<Record>,
    free_slots: Vec<u32>,
    next_conversation: u64,
    /// Conversations not answered yet (counted or not).
    unanswered: u64,
    collector: Collector,
    arrivals: u64,
    events: u64,
    audit: bool,
}

/// The merged on-shift intervals of a group over `[0, horizon)`, as availability changes.
fn shift_transitions(
    shifts: &[super::scenario::Shift],
    horizon: Timestamp,
) -> Vec<(Timestamp, bool)> {
    let days = horizon.0 / DAY.0 + 1;
    let mut intervals: Vec<(i128, i128)> = Vec::new();
    // Day -1 too: a night shift that started the evening before covers the first hours.
    for day in -1..=days as i128 {
        for shift in shifts {
            let base = day * i128::from(DAY.0);
            intervals.push((
                base + i128::from(shift.start.0),
                base + i128::from(shift.end.0),
            ));
        }
    }
    intervals.sort_unstable();
    let mut merged: Vec<(i128, i128)> = Vec::new();
    for (start, end) in intervals {
        match merged.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => merged.push((start, end)),
        }
    }
    let horizon = i128::from(horizon.0);
    let mut transitions = Vec::new();
    for (start, end) in merged {
        if end <= 0 || start >= horizon {
            continue;
        }
        transitions.push((Timestamp(start.max(0) as u64), true));
        if end < horizon {
            transitions.push((Timestamp(end as u64), false));
        }
    }
    transitions
}

impl<'a> Engine<'a> {
    fn new(scenario: &'a Scenario, audit: bool) -> Result<Engine<'a>, SimError> {
        let mut effects = Vec::new();
        let router = Router::new(scenario.config.clone(), Timestamp(0), &mut effects)
            .map_err(SimError::Config)?;
        let mut timers = TimerQueue::new();
        timers.apply(&effects);
        effects.clear();

        let seed = scenario.seed;
        let streams = scenario
            .arrivals
            .iter()
            .map(|stream| {
                let handle = scenario
                    .handle_time_for(&stream.channel)
                    .unwrap_or(Distribution::Constant { value: 0.0 });
                StreamState {
                    clock: 0.0,
                    timing: rng_for(seed, &format!("arrivals:{}", stream.label)),
                    customers: rng_for(seed, &format!("customers:{}", stream.label)),
                    rework: rng_for(seed, &format!("rework:{}", stream.label)),
                    handle: Sampler::new(handle),
                    patience: scenario.patience_for(&stream.channel).map(Sampler::new),
                }
            })
            .collect();

        let mut agent_index = NameMap::default();
        for (index, agent) in scenario.config.agents.iter().enumerate() {
            agent_index.insert(agent.id.clone(), index as u32);
        }
        let mut agents: Vec<AgentSim> = scenario
            .config
            .agents
            .iter()
            .map(|agent| AgentSim {
                id: agent.id.clone(),
                group: 0,
                on_shift: false,
                busy: 0,
                last: Timestamp(0),
                tally: AgentTally::default(),
            })
            .collect();
        let horizon = Timestamp(scenario.duration.0 + DRAIN_LIMIT.0);
        let mut groups = Vec::with_capacity(scenario.groups.len());
        for (index, group) in scenario.groups.iter().enumerate() {
            let mut members = Vec::with_capacity(group.agents.len());
            for id in &group.agents {
                if let Some(&agent) = agent_index.get(id) {
                    members.push(agent);
                    let sim = &mut agents[agent as usize];
                    sim.group = index as u32;
                    sim.tally.group = index as u32;
                    sim.tally.slots = group.slots;
                }
            }
            groups.push(GroupState {
                transitions: shift_transitions(&group.shifts, horizon),
                next: 0,
                accept_delay: Sampler::new(group.accept_delay),
                rng: rng_for(seed, &format!("accept:{}", group.name)),
                agents: members,
            });
        }

        let mut queue_index = NameMap::default();
        let queues = scenario
            .config
            .queues
            .iter()
            .enumerate()
            .map(|(index, queue)| {
                queue_index.insert(queue.name.clone(), index as u32);
                QueueSim {
                    name: queue.name.clone(),
                    wrap_up: queue.wrap_up,
                    escalate_share: scenario
                        .behaviour
                        .iter()
                        .find(|b| b.queue == queue.name)
                        .map_or(0.0, |b| b.escalate_share),
                    rng: rng_for(seed, &format!("escalate:{}", queue.name)),
                }
            })
            .collect();

        let collector = Collector::new(scenario.config.queues.iter().map(|q| q.sla_target));
        let mut engine = Engine {
            scenario,
            router,
            timers,
            effects,
            heap: BinaryHeap::new(),
            seq: 0,
            now: Timestamp(0),
            window: (
                Timestamp(scenario.warm_up.0),
                Timestamp(scenario.duration.0),
            ),
            streams,
            groups,
            agents,
            agent_index,
            queues,
            queue_index,
            records: Vec::new(),
            free_slots: Vec::new(),
            next_conversation: 0,
            unanswered: 0,
            collector,
            arrivals: 0,
            events: 0,
            audit,
        };
        // Shifts first, so agents who start at time 0 are there for anything else at time 0.
        for group in 0..engine.groups.len() {
            if let Some(&(at, _)) = engine.groups[group].transitions.first() {
                engine.push(
                    at,
                    Event::Shift {
                        group: group as u32,
                    },
                );
            }
        }
        for stream in 0..engine.streams.len() {
            engine.schedule_arrival(stream as u32);
        }
        Ok(engine)
    }

    fn push(&mut self, at: Timestamp, event: Event) {
        self.seq += 1;
        self.heap.push(Reverse(Scheduled {
            at,
            seq: self.seq,
            event,
        }));
    }

    fn schedule_arrival(&mut self, stream: u32) {
        let scenario = self.scenario;
        let end = scenario.duration.as_secs_f64();
        let spec = &scenario.arrivals[stream as usize];
        if let Some(t) = self.streams[stream as usize].next_arrival(spec, end) {
            let at =
                Timestamp(((t * 1000.0).round() as u64).min(self.window.1.0.saturating_sub(1)));
            self.push(at, Event::Arrival { stream });
        }
    }

    fn run(mut self, progress: &mut dyn FnMut(Progress)) -> Result<Report, SimError> {
        let end = self.window.1;
        let hard_stop = end + DRAIN_LIMIT;
        loop {
            let next_event = self.heap.peek().map(|Reverse(s)| s.at);
            let next_timer = self.timers.next_deadline();
            let (at, from_timer) = match (next_timer, next_event) {
                (None, None) => break,
                (Some(timer), Some(event)) if timer <= event => (timer, true),
                (Some(timer), None) => (timer, true),
                (_, Some(event)) => (event, false),
            };
            if at > hard_stop || (at >= end && self.unanswered == 0) {
                break;
            }
            self.now = at;
            self.events += 1;
            if from_timer {
                if let Some((_, key)) = self.timers.pop_due(at) {
                    self.fire_timer(key)?;
                }
            } else if let Some(Reverse(scheduled)) = self.heap.pop() {
                self.dispatch(scheduled.event)?;
            }
            if self.events.is_multiple_of(PROGRESS_EVERY) {
                progress(Progress {
                    now: Millis(self.now.0),
                    duration: self.scenario.duration,
                    arrivals: self.arrivals,
                });
            }
        }
        progress(Progress {
            now: Millis(self.now.0.max(end.0)),
            duration: self.scenario.duration,
            arrivals: self.arrivals,
        });
        Ok(self.finish())
    }

    fn finish(mut self) -> Report {
        let end = self.now.max(self.window.1);
        for agent in 0..self.agents.len() {
            self.touch(agent as u32, end);
        }
        for record in &self.records {
            if record.id != FREE && record.counted && !record.answered {
                self.collector
                    .unanswered_at_end(record.queue, record.queued_at_arrival);
            }
        }
        let scenario = self.scenario;
        let header = ReportHeader {
            scenario: &scenario.name,
            seed: scenario.seed,
            duration: scenario.duration,
            warm_up: scenario.warm_up,
            queue_names: self.queues.iter().map(|q| q.name.to_string()).collect(),
            group_names: scenario
                .groups
                .iter()
                .map(|g| (g.name.clone(), g.agents.len() as u32, g.slots))
                .collect(),
        };
        let run = RunInfo {
            arrivals: self.arrivals,
            events: self.events,
            end_seconds: self.now.0 as f64 / 1000.0,
        };
        let tallies: Vec<AgentTally> = self.agents.iter().map(|a| a.tally).collect();
        self.collector.finish(&header, run, &tallies)
    }

    // ----- router calls -------------------------------------------------------------------------

    fn send(&mut self, command: Command, name: &'static str) -> Result<(), SimError> {
        let mut effects = std::mem::take(&mut self.effects);
        let result = self.router.handle(self.now, command, &mut effects);
        if let Err(error) = result {
            self.effects = effects;
            return Err(SimError::Refused {
                command: name,
                at_ms: self.now.0,
                error,
            });
        }
        for effect in effects.drain(..) {
            self.apply(effect);
        }
        self.effects = effects;
        self.check(name)
    }

    fn check(&self, command: &'static str) -> Result<(), SimError> {
        if !self.audit {
            return Ok(());
        }
        self.router.audit().map_err(|problem| SimError::Invariant {
            command,
            at_ms: self.now.0,
            problem,
        })
    }

    fn fire_timer(&mut self, key: TimerKey) -> Result<(), SimError> {
        if let TimerKey::WrapUp(agent, _) = &key
            && let Some(&agent) = self.agent_index.get(agent)
        {
            self.change_busy(agent, -1);
        }
        self.send(Command::TimerFired(key), "timer")
    }

    fn dispatch(&mut self, event: Event) -> Result<(), SimError> {
        match event {
            Event::Arrival { stream } => self.arrive(stream),
            Event::Shift { group } => self.shift(group),
            Event::Accept { slot, id, offer } => {
                let record = self.records[slot as usize];
                if record.id != id || record.offer != offer || record.offered_to == NO_AGENT {
                    return Ok(());
                }
                let agent = self.agents[record.offered_to as usize].id.clone();
                self.send(
                    Command::Accept {
                        agent,
                        conversation: id,
                    },
                    "accept",
                )
            }
            Event::Finish {
                slot,
                id,
                assignment,
            } => {
                let record = self.records[slot as usize];
                if record.id != id || record.assignment != assignment || record.owner == NO_AGENT {
                    return Ok(());
                }
                let agent = self.agents[record.owner as usize].id.clone();
                let queue = &mut self.queues[record.owner_queue as usize];
                let escalate = queue.escalate_share > 0.0
                    && record.escalations < MAX_ESCALATIONS
                    && queue.rng.random::<f64>() < queue.escalate_share;
                if escalate {
                    self.records[slot as usize].escalations += 1;
                    self.send(
                        Command::Escalate {
                            agent,
                            conversation: id,
                        },
                        "escalate",
                    )
                } else {
                    self.send(
                        Command::Resolve {
                            agent,
                            conversation: id,
                        },
                        "resolve",
                    )
                }
            }
            Event::Patience { slot, id } => {
                let record = self.records[slot as usize];
                if record.id != id || record.answered {
                    return Ok(());
                }
                self.send(Command::CustomerLeft { conversation: id }, "customer left")
            }
            Event::Return { agent } => {
                let sim = &self.agents[agent as usize];
                if !sim.on_shift {
                    return Ok(());
                }
                let id = sim.id.clone();
                self.send(
                    Command::AgentPresence {
                        agent: id,
                        presence: Presence::Available,
                    },
                    "presence change",
                )
            }
        }
    }

    fn arrive(&mut self, stream: u32) -> Result<(), SimError> {
        let scenario = self.scenario;
        let spec = &scenario.arrivals[stream as usize];
        let state = &mut self.streams[stream as usize];
        let rng = &mut state.customers;
        let tier = pick(&spec.tiers, rng).cloned();
        let language = pick(&spec.languages, rng).cloned();
        let topic = pick(&spec.topics, rng);
        let handle = state.handle.sample(rng);
        let patience = state.patience.map(|sampler| sampler.sample(rng));
        let (subject, text) = match topic {
            Some(topic) => (topic.subject.clone(), topic.text.clone()),
            None => (None, DEFAULT_TEXT.to_owned()),
        };

        let slot = self.free_slots.pop().unwrap_or(self.records.len() as u32);
        // The slot in the low bits lets effects find the record without a map.
        let id = ConversationId((u128::from(self.next_conversation) << 32) | u128::from(slot));
        self.next_conversation += 1;
        self.arrivals += 1;
        self.unanswered += 1;
        let record = Record {
            id,
            handle,
            stream,
            priority: 0,
            queue: 0,
            offered_to: NO_AGENT,
            offer: 0,
            owner: NO_AGENT,
            owner_queue: 0,
            assignment: 0,
            escalations: 0,
            counted: self.now >= self.window.0,
            queued_at_arrival: false,
            answered: false,
        };
        match self.records.get_mut(slot as usize) {
            Some(free) => *free = record,
            None => self.records.push(record),
        }
        let new = NewConversation {
            id,
            message: MessageId(id.0),
            channel: spec.channel.clone(),
            provider: spec.provider.clone(),
            to_address: spec.to_address.clone(),
            customer_tier: tier,
            language,
            subject,
            text,
        };

        let mut effects = std::mem::take(&mut self.effects);
        if let Err(error) =
            self.router
                .handle(self.now, Command::Arrive(Box::new(new)), &mut effects)
        {
            self.effects = effects;
            return Err(SimError::Refused {
                command: "arrival",
                at_ms: self.now.0,
                error,
            });
        }
        // The priority on arrival, before anything applies the effects (an auto-accept answers at once).
        let record = &mut self.records[slot as usize];
        record.priority = self
            .router
            .wait_rank(id)
            .map_or(0, |(Reverse(priority), _, _)| priority);
        record.queued_at_arrival = effects.iter().any(
            |effect| matches!(effect, Effect::Queued { conversation, .. } if *conversation == id),
        );
        for effect in effects.drain(..) {
            self.apply(effect);
        }
        self.effects = effects;
        self.check("arrival")?;

        if let Some(patience) = patience {
            self.push(self.now + patience, Event::Patience { slot, id });
        }
        self.schedule_arrival(stream);
        Ok(())
    }

    fn shift(&mut self, group: u32) -> Result<(), SimError> {
        let state = &mut self.groups[group as usize];
        let Some(&(_, on)) = state.transitions.get(state.next) else {
            return Ok(());
        };
        state.next += 1;
        if let Some(&(at, _)) = state.transitions.get(state.next) {
            self.push(at, Event::Shift { group });
        }
        let presence = if on {
            Presence::Available
        } else {
            Presence::Offline
        };
        for index in 0..self.groups[group as usize].agents.len() {
            let agent = self.groups[group as usize].agents[index];
            self.touch(agent, self.now);
            self.agents[agent as usize].on_shift = on;
            let id = self.agents[agent as usize].id.clone();
            self.send(
                Command::AgentPresence {
                    agent: id,
                    presence,
                },
                "presence change",
            )?;
        }
        Ok(())
    }

    // ----- effects ------------------------------------------------------------------------------

    fn record_of(&mut self, id: ConversationId) -> Option<(u32, &mut Record)> {
        let slot = id.0 as u32;
        let record = self.records.get_mut(slot as usize)?;
        (record.id == id).then_some((slot, record))
    }

    fn apply(&mut self, effect: Effect) {
        match effect {
            Effect::ScheduleTimer { key, at } => self.timers.schedule(key, at),
            Effect::CancelTimer { key } => self.timers.cancel(&key),
            Effect::Offered {
                conversation,
                agent,
                queue,
                ..
            } => {
                let agent = self.agent_index.get(&agent).copied().unwrap_or(NO_AGENT);
                let queue = self.queue_index.get(&queue).copied().unwrap_or(0);
                let Some((slot, record)) = self.record_of(conversation) else {
                    return;
                };
                record.offered_to = agent;
                record.offer += 1;
                if !record.answered {
                    record.queue = queue;
                }
                let offer = record.offer;
                let delay = match self.agents.get(agent as usize) {
                    Some(sim) => {
                        let group = &mut self.groups[sim.group as usize];
                        group.accept_delay.sample(&mut group.rng)
                    }
                    None => Millis::ZERO,
                };
                self.push(
                    self.now + delay,
                    Event::Accept {
                        slot,
                        id: conversation,
                        offer,
                    },
                );
            }
            Effect::OfferWithdrawn { conversation, .. } => {
                if let Some((_, record)) = self.record_of(conversation) {
                    record.offered_to = NO_AGENT;
                }
            }
            Effect::Queued {
                conversation,
                queue,
                ..
            } => {
                let queue = self.queue_index.get(&queue).copied().unwrap_or(0);
                if let Some((_, record)) = self.record_of(conversation)
                    && !record.answered
                {
                    record.queue = queue;
                }
            }
            Effect::Assigned {
                conversation,
                agent,
                queue,
                waited,
            } => self.assigned(conversation, &agent, &queue, waited),
            Effect::Abandoned {
                conversation,
                waited,
            } => {
                let Some((slot, record)) = self.record_of(conversation) else {
                    return;
                };
                let record = *record;
                if !record.answered {
                    self.unanswered -= 1;
                }
                if record.counted {
                    self.collector
                        .abandoned(record.queue, waited, record.queued_at_arrival);
                }
                self.release(slot);
            }
            Effect::Resolved {
                conversation,
                agent,
                ..
            } => {
                let Some((slot, record)) = self.record_of(conversation) else {
                    return;
                };
                let owner_queue = record.owner_queue;
                if self.queues[owner_queue as usize].wrap_up == Millis::ZERO
                    && let Some(&agent) = self.agent_index.get(&agent)
                {
                    self.change_busy(agent, -1);
                }
                self.release(slot);
            }
            Effect::AgentSetAway { agent, .. } => {
                if let Some(&agent) = self.agent_index.get(&agent) {
                    self.push(self.now + AWAY_RETURN, Event::Return { agent });
                }
            }
            Effect::Escalated {
                conversation,
                from_agent,
                ..
            } => {
                if let Some(&agent) = self.agent_index.get(&from_agent) {
                    self.change_busy(agent, -1);
                }
                if let Some((_, record)) = self.record_of(conversation) {
                    record.owner = NO_AGENT;
                }
            }
            _ => {}
        }
    }

    fn assigned(&mut self, id: ConversationId, agent: &AgentId, queue: &QueueName, waited: Millis) {
        let Some(&agent) = self.agent_index.get(agent) else {
            return;
        };
        let queue = self.queue_index.get(queue).copied().unwrap_or(0);
        let Some((slot, record)) = self.record_of(id) else {
            return;
        };
        record.offered_to = NO_AGENT;
        record.owner = agent;
        record.owner_queue = queue;
        record.assignment += 1;
        let record = *record;
        let handle = if record.answered {
            // A next tier picks up an escalated conversation: new work, not a new wait.
            let stream = &mut self.streams[record.stream as usize];
            stream.handle.sample(&mut stream.rework)
        } else {
            self.records[slot as usize].answered = true;
            self.records[slot as usize].queue = queue;
            self.unanswered -= 1;
            if record.counted {
                self.collector
                    .answered(queue, waited, record.priority, record.queued_at_arrival);
            }
            record.handle
        };
        if record.counted {
            self.agents[agent as usize].tally.handled += 1;
        }
        self.change_busy(agent, 1);
        self.push(
            self.now + handle,
            Event::Finish {
                slot,
                id,
                assignment: record.assignment,
            },
        );
    }

    fn release(&mut self, slot: u32) {
        self.records[slot as usize].id = FREE;
        self.free_slots.push(slot);
    }

    // ----- occupancy ----------------------------------------------------------------------------

    /// Accrues the agent's busy and staffed time up to `now` (within the statistics window).
    fn touch(&mut self, agent: u32, now: Timestamp) {
        let (start, end) = self.window;
        let sim = &mut self.agents[agent as usize];
        let from = sim.last.max(start);
        let to = now.min(end);
        if sim.on_shift && to > from {
            let span = to.0 - from.0;
            sim.tally.staffed_ms += span;
            sim.tally.busy_slot_ms += span * u64::from(sim.busy.min(sim.tally.slots));
        }
        sim.last = sim.last.max(now);
    }

    fn change_busy(&mut self, agent: u32, delta: i32) {
        self.touch(agent, self.now);
        let sim = &mut self.agents[agent as usize];
        sim.busy = (i32::from(sim.busy) + delta).max(0) as u16;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::scenario::Shift;

    fn hours(h: u64) -> Millis {
        Millis(h * 3_600_000)
    }

    #[test]
    fn shifts_merge_and_wrap_midnight() {
        let night = [Shift {
            start: hours(22),
            end: hours(30),
        }];
        let transitions = shift_transitions(&night, Timestamp(2 * DAY.0));
        assert_eq!(
            transitions,
            vec![
                (Timestamp(0), true),
                (Timestamp(hours(6).0), false),
                (Timestamp(hours(22).0), true),
                (Timestamp(hours(30).0), false),
                (Timestamp(hours(46).0), true),
            ]
        );
        let all_day = [Shift {
            start: Millis::ZERO,
            end: DAY,
        }];
        assert_eq!(
            shift_transitions(&all_day, Timestamp(3 * DAY.0)),
            vec![(Timestamp(0), true)]
        );
    }

    #[test]
    fn separate_sources_do_not_share_draws() {
        let mut a = rng_for(7, "arrivals:chat");
        let mut b = rng_for(7, "arrivals:email");
        let mut a2 = rng_for(7, "arrivals:chat");
        let x: u64 = a.random();
        assert_ne!(x, b.random::<u64>());
        assert_eq!(x, a2.random::<u64>());
    }

    #[test]
    fn lognormal_has_the_requested_mean() {
        let sampler = Sampler::new(Distribution::LogNormal {
            mean: 300.0,
            sd: 200.0,
        });
        let mut rng = rng_for(1, "test");
        let n = 200_000;
        let mean = (0..n)
            .map(|_| sampler.sample(&mut rng).0 as f64)
            .sum::<f64>()
            / n as f64;
        assert!((mean / 300_000.0 - 1.0).abs() < 0.01, "mean {mean}");
    }
}
