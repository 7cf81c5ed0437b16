//! Routing-core benchmark (issue #3): routing decisions per second with 10 000 agents and 10³, 10⁵ and
//! 10⁶ waiting conversations, and resident bytes per waiting conversation.
//!
//! # What is measured
//!
//! A **routing decision** is the router matching one conversation to one agent: one `Offered` effect.
//!
//! The router is set up with 10 000 agents in 20 queues (each agent a member of 1–3 queues, chat capacity
//! 1–3, total cap 3; a fifth of them skilled for billing, a quarter speaking Spanish) and routing rules
//! that add requirement classes (Spanish speakers, billing experts), so a queue has up to three lanes.
//! Priorities come from the rules (premium lines, billing), the VIP tier and an `urgent` keyword boost (a
//! regex), so there are several priority levels. The negative-wording scorer is off unless asked for.
//!
//! The backlog is loaded while every agent is offline: first one conversation per unit of agent
//! capacity in a warm-up tier served before anything else, then the N that stay. All agents go
//! available and take their fill (warm-up conversations nobody took leave; an agent left with room gets
//! conversations of its own queue), and arrivals make up what the fill took from the backlog, so exactly
//! N wait, in the drawn mix of lanes and priorities, and every agent is full.
//!
//! The steady-state **cycle** keeps the backlog at N with every agent full:
//!
//! 1. an agent accepts and resolves the oldest pending offer; its capacity frees and the router picks the
//!    best waiting conversation across all the agent's lanes and offers it (the decision);
//! 2. a new conversation arrives; every agent being full, it is indexed into the backlog, not offered.
//!
//! Each arrival repeats the routing profile (queue, language, tier, text) of a conversation that left
//! the backlog one chunk of 16 cycles earlier, so every lane keeps its size and the work stays the same
//! however long the benchmark runs. One cycle is one decision, so decisions/s = cycles/s; the benchmark
//! counts the `Offered` effects to check it.
//!
//! Three measurements per N (criterion, one iteration = one command sequence below):
//!
//! * `cycle/N`: accept + resolve → offer + arrival (the decision rate);
//! * `resolve_offer/N`: accept + resolve → offer alone (the backlog dips by 16, refilled untimed);
//! * `arrival/N`: an arrival indexed into the backlog alone (the backlog grows by 16, drained untimed).
//!
//! Virtual time advances 1 ms per command. Timers are not fired except to close resolved conversations
//! once their reopen window (1 s here) has passed, untimed, so the router holds N waiting, about 20 000
//! offered and a few hundred resolved conversations throughout.
//!
//! # Modes
//!
//! * `cargo bench --bench routing`: the criterion benchmarks, then the memory measurement (skipped
//!   with `SWITCHBOARD_BENCH_SKIP_MEM=1`).
//! * `SWITCHBOARD_BENCH_MEM=N`: in a fresh process, loads N waiting conversations (agents offline) and
//!   prints the resident bytes per waiting conversation (`VmRSS` after minus before, over N).
//! * `SWITCHBOARD_BENCH_QUICK=1` (or `=N` waiting, default 100 000): a fixed number of commands without
//!   criterion, for `valgrind --tool=callgrind --collect-atstart=no --toggle-collect='*timed_*'`.
//!   With `SWITCHBOARD_BENCH_DIGEST=1` as well it prints a hash of every effect of the run (set-up
//!   included), so two builds of the router can be shown to behave identically.
//! * `SWITCHBOARD_BENCH_WORDING=1`: turns on the negative-wording scorer (built-in English lexicon) for
//!   any mode; it is off by default (see docs/BENCHMARKS.md).
#![allow(clippy::unwrap_used, clippy::expect_used)]
// Arrivals are boxed untimed, ahead of the chunk that hands them to `Command::Arrive`.
#![allow(clippy::vec_box)]

// The daemon's allocator (see src/main.rs), so the router is measured as it runs in production.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::collections::VecDeque;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};
use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64Mcg;
use regex::Regex;
use switchboard::routing::config::{
    AgentConfig, KeywordBoost, QueueConfig, RoutingRule, RuleAction, RuleMatch,
};
use switchboard::routing::model::SkillRequirement;
use switchboard::routing::wording::NegativeWording;
use switchboard::routing::{
    AgentId, Channel, Command, ConversationId, ConversationState, Effect, MessageId, Millis,
    NewConversation, Presence, QueueName, Router, RoutingConfig, Strategy, TimerKey, Timestamp,
};

const AGENTS: usize = 10_000;
const QUEUES: usize = 20;
/// Commands timed between two clock reads, and the lag of the profile mirroring.
const CHUNK: usize = 16;
const SIZES: [usize; 3] = [1_000, 100_000, 1_000_000];
/// 2026-01-01T00:00:00Z in Unix milliseconds.
const EPOCH: u64 = 1_767_225_600_000;
const REOPEN_WINDOW: Millis = Millis(1_000);

// ----- the workload ------------------------------------------------------------------------------

/// A conversation's routing profile, packed in 16 bits: queue (bits 0–4), kind (5–6: 0 plain,
/// 1 Spanish, 2 billing), VIP (7), urgent (8), upset (9), warm-up (10). The benchmark carries it in bits 64–79 of the
/// conversation id (the random part of a ULID), so a profile is known from an `Offered` effect alone.
type Profile = u16;

const SPANISH: u16 = 1 << 5;
const BILLING: u16 = 2 << 5;
const VIP: u16 = 1 << 7;
const URGENT: u16 = 1 << 8;
const UPSET: u16 = 1 << 9;
/// Set-up only: the agents' initial fill, in a tier served before everything else.
const WARM_UP: u16 = 1 << 10;

fn draw_profile(rng: &mut Pcg64Mcg) -> Profile {
    let queue = rng.random_range(0..QUEUES as u16);
    let kind = match rng.random_range(0..100) {
        0..10 => SPANISH,
        10..15 => BILLING,
        _ => 0,
    };
    let flag = |rng: &mut Pcg64Mcg, p: f64, bit: u16| if rng.random_bool(p) { bit } else { 0 };
    queue | kind | flag(rng, 0.05, VIP) | flag(rng, 0.10, URGENT) | flag(rng, 0.05, UPSET)
}

fn profile_of(id: ConversationId) -> Profile {
    (id.0 >> 64) as u16
}

/// A ULID-like id: 48 bits of milliseconds, then the profile, then 64 random bits.
fn conversation_id(rng: &mut Pcg64Mcg, now: u64, profile: Profile) -> ConversationId {
    ConversationId(
        (u128::from(now) << 80) | (u128::from(profile) << 64) | u128::from(rng.random::<u64>()),
    )
}

fn new_conversation(id: ConversationId, profile: Profile) -> Box<NewConversation> {
    let queue = profile & 0x1f;
    let spanish = profile & (3 << 5) == SPANISH;
    let mut text = String::from(if spanish {
        "Hola, tengo una pregunta sobre mi pedido 48213."
    } else {
        "Hi, I have a question about my order 48213, can you help?"
    });
    if profile & (3 << 5) == BILLING {
        text.push_str(" The invoice I got does not match it.");
    }
    if profile & URGENT != 0 {
        text.push_str(" This is urgent.");
    }
    if profile & UPSET != 0 {
        text.push_str(" This is terrible, I am really angry and disappointed.");
    }
    Box::new(NewConversation {
        id,
        message: MessageId(id.0),
        channel: Channel::Chat,
        provider: "webchat".into(),
        to_address: format!("+442070000{queue:03}"),
        customer_tier: if profile & WARM_UP != 0 {
            Some("warm-up".into())
        } else if profile & VIP != 0 {
            Some("vip".into())
        } else {
            None
        },
        language: Some(if spanish { "es-MX" } else { "en-GB" }.into()),
        subject: None,
        text,
    })
}

fn queue_name(queue: usize) -> QueueName {
    QueueName::new(&format!("q{queue:02}"))
}

fn agent_id(index: usize) -> AgentId {
    AgentId::new(&format!("agent-{index:05}"))
}

fn agent_config(index: usize) -> AgentConfig {
    let memberships = 1 + index % 3;
    AgentConfig {
        id: agent_id(index),
        name: format!("Agent {index}"),
        queues: (0..memberships)
            .map(|j| queue_name((index + 7 * j) % QUEUES))
            .collect(),
        skills: if index.is_multiple_of(5) {
            vec![(Arc::from("billing"), 2 + (index / 5 % 2) as u8)]
        } else {
            Vec::new()
        },
        languages: if index.is_multiple_of(4) {
            vec!["en".into(), "es".into()]
        } else {
            vec!["en".into()]
        },
        capacity: vec![(Channel::Chat, 1 + (index / 3 % 3) as u16)],
        max_total: 3,
    }
}

fn routing_config() -> RoutingConfig {
    let queues: Vec<QueueConfig> = (0..QUEUES)
        .map(|index| {
            let mut queue = QueueConfig::new(queue_name(index).as_str());
            queue.channels = vec![Channel::Chat];
            queue.strategy = match index % 4 {
                0 => Strategy::LeastOccupied,
                1 => Strategy::RoundRobin,
                _ => Strategy::LongestIdle,
            };
            // The second candidates of the Spanish and billing rules take them at once.
            if index == 1 || index == 3 {
                queue.overflow_after = Millis::ZERO;
            }
            queue
        })
        .collect();
    let mut config = RoutingConfig::single_queue(queues[QUEUES - 1].clone());
    config.queues = queues;
    config.rules.push(RoutingRule {
        name: "spanish".into(),
        when: RuleMatch {
            languages: vec!["es".into()],
            ..RuleMatch::default()
        },
        then: RuleAction {
            queues: vec![queue_name(0), queue_name(1)],
            require_language: true,
            tags: vec!["es".into()],
            ..RuleAction::default()
        },
    });
    config.rules.push(RoutingRule {
        name: "billing".into(),
        when: RuleMatch {
            keywords: vec!["invoice".into()],
            ..RuleMatch::default()
        },
        then: RuleAction {
            queues: vec![queue_name(2), queue_name(3)],
            priority: 5,
            skills: vec![SkillRequirement {
                skill: Arc::from("billing"),
                min_level: 2,
            }],
            tags: vec!["billing".into()],
            ..RuleAction::default()
        },
    });
    for queue in 0..QUEUES {
        config.rules.push(RoutingRule {
            name: format!("line {queue}"),
            when: RuleMatch {
                to_addresses: vec![format!("+442070000{queue:03}")],
                ..RuleMatch::default()
            },
            then: RuleAction {
                queues: vec![queue_name(queue)],
                // Premium lines.
                priority: if queue < 4 { 10 } else { 0 },
                ..RuleAction::default()
            },
        });
    }
    config.priority.tiers.push(("warm-up".into(), 1_000));
    config.priority.keywords.push(KeywordBoost {
        pattern: Regex::new(r"(?i)\burgent\b").unwrap(),
        boost: 5,
    });
    if std::env::var_os("SWITCHBOARD_BENCH_WORDING").is_some() {
        config.wording = Some(Arc::new(NegativeWording::english().unwrap()));
    }
    config.reopen.window = REOPEN_WINDOW;
    config.agents = (0..AGENTS).map(agent_config).collect();
    config
}

// ----- the driver --------------------------------------------------------------------------------

/// Timed totals of one measurement, for the summary line printed after it.
#[derive(Debug, Default, Clone)]
struct Tally {
    commands: u64,
    timed: Duration,
    decisions: u64,
    /// Nanoseconds per iteration of each criterion sample (warm-up included) of 1 000 iterations or more.
    samples: Vec<f64>,
}

impl Tally {
    fn mean(&self) -> f64 {
        self.timed.as_nanos() as f64 / self.commands as f64
    }

    /// The fastest sample: on a shared machine noise only ever adds time, so this is the closest
    /// to the cost on an idle core.
    fn fastest(&self) -> f64 {
        self.samples.iter().copied().fold(f64::INFINITY, f64::min)
    }

    fn median(&self) -> f64 {
        let mut sorted = self.samples.clone();
        sorted.sort_by(f64::total_cmp);
        sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN)
    }
}

/// A router with N waiting and every agent full, and the driver state that keeps it so.
struct Fixture {
    router: Router,
    waiting: usize,
    now: u64,
    rng: Pcg64Mcg,
    effects: Vec<Effect>,
    /// Offers not yet accepted, oldest first: agents accept them in this order.
    pending: VecDeque<(AgentId, ConversationId)>,
    /// Profiles of conversations that left the backlog, to come back as arrivals.
    owed: VecDeque<Profile>,
    /// Resolved conversations and when, closed once their reopen window has passed.
    resolved: VecDeque<(ConversationId, u64)>,
    decisions: u64,
    decisions_at_arrival: u64,
    /// With `SWITCHBOARD_BENCH_DIGEST` set: a hash of every effect, to check that two builds of the
    /// router behave identically on the same workload.
    digest: Option<DefaultHasher>,
}

impl Fixture {
    /// A router with 10 000 offline agents and no conversation.
    fn empty(seed: u64) -> Fixture {
        let mut effects = Vec::new();
        let router = Router::new(routing_config(), Timestamp(EPOCH), &mut effects).unwrap();
        effects.clear();
        Fixture {
            router,
            waiting: 0,
            now: EPOCH,
            rng: Pcg64Mcg::seed_from_u64(seed),
            effects,
            pending: VecDeque::new(),
            owed: VecDeque::new(),
            resolved: VecDeque::new(),
            decisions: 0,
            decisions_at_arrival: 0,
            digest: std::env::var_os("SWITCHBOARD_BENCH_DIGEST").map(|_| DefaultHasher::new()),
        }
    }

    /// One conversation with a drawn profile arrives; returns its id.
    fn load_one(&mut self) -> ConversationId {
        let profile = draw_profile(&mut self.rng);
        let id = conversation_id(&mut self.rng, self.now, profile);
        self.arrive(new_conversation(id, profile));
        id
    }

    /// The steady state: `waiting` conversations wait and every agent is full.
    fn new(waiting: usize) -> Fixture {
        let started = Instant::now();
        let mut fixture = Fixture::empty(0x5eed_0000 + waiting as u64);
        // While everyone is offline: first the agents' fill (warm-up tier, served first), then the
        // backlog that stays, so the backlog keeps the drawn mix of lanes and priorities.
        let mut fill = Vec::new();
        for agent in 0..AGENTS {
            let config = &fixture.router.config().agents[agent];
            let slots = config.capacity[0].1.min(config.max_total);
            for _ in 0..slots {
                let profile = (agent % QUEUES) as Profile | WARM_UP;
                let id = conversation_id(&mut fixture.rng, fixture.now, profile);
                fixture.arrive(new_conversation(id, profile));
                fill.push(id);
            }
        }
        for _ in 0..waiting + CHUNK {
            fixture.load_one();
        }
        for agent in 0..AGENTS {
            fixture.command(Command::AgentPresence {
                agent: agent_id(agent),
                presence: Presence::Available,
            });
        }
        // Fill conversations nobody took (their agents took others' fill) leave.
        for id in fill {
            let state = fixture.router.conversation(id).unwrap().state;
            if state == ConversationState::Waiting {
                fixture.command(Command::CustomerLeft { conversation: id });
            }
        }
        // An agent left with room gets conversations of its own queue, offered at once.
        for agent in 0..AGENTS {
            loop {
                let view = fixture.router.agent(&agent_id(agent)).unwrap();
                if view.load.iter().all(|&(_, load, cap)| load >= cap) {
                    break;
                }
                let profile = (agent % QUEUES) as Profile;
                let id = conversation_id(&mut fixture.rng, fixture.now, profile);
                fixture.arrive(new_conversation(id, profile));
            }
        }
        // Every agent is full: what the fill took from the backlog is made up by new arrivals.
        while fixture.router.waiting_count() < waiting + CHUNK {
            fixture.load_one();
        }
        assert_eq!(fixture.router.waiting_count(), waiting + CHUNK);
        fixture.owed.clear();
        // Prime the profile mirroring: CHUNK decisions whose profiles come back in the first chunk.
        for _ in 0..CHUNK {
            fixture.resolve_one();
        }
        fixture.waiting = waiting;
        fixture.decisions = 0;
        fixture.decisions_at_arrival = 0;
        fixture.check();
        eprintln!(
            "setup: {waiting} waiting, {} offers pending to {AGENTS} agents; built in {:.1} s",
            fixture.pending.len(),
            started.elapsed().as_secs_f64()
        );
        fixture
    }

    fn check(&self) {
        assert_eq!(self.router.waiting_count(), self.waiting, "backlog drifted");
        assert_eq!(self.owed.len(), CHUNK);
    }

    fn tick(&mut self) -> Timestamp {
        self.now += 1;
        Timestamp(self.now)
    }

    /// A command whose effects only matter for offers.
    fn command(&mut self, command: Command) {
        let now = self.tick();
        self.router.handle(now, command, &mut self.effects).unwrap();
        self.take_offers(false);
    }

    fn take_offers(&mut self, at_arrival: bool) -> bool {
        if let Some(digest) = &mut self.digest {
            for effect in &self.effects {
                format!("{effect:?}").hash(digest);
            }
        }
        let mut offered = false;
        for effect in self.effects.drain(..) {
            if let Effect::Offered {
                conversation,
                agent,
                ..
            } = effect
            {
                self.pending.push_back((agent, conversation));
                self.owed.push_back(profile_of(conversation));
                self.decisions += 1;
                self.decisions_at_arrival += u64::from(at_arrival);
                offered = true;
            }
        }
        offered
    }

    fn arrive(&mut self, new: Box<NewConversation>) {
        let now = self.tick();
        self.router
            .handle(now, Command::Arrive(new), &mut self.effects)
            .unwrap();
        // An arrival offered at once leaves the backlog as it came: nothing is owed for it.
        if self.take_offers(true) {
            self.owed.pop_back();
        }
    }

    /// The oldest pending offer is accepted and resolved; the agent's freed capacity is offered on.
    fn resolve_one(&mut self) {
        let (agent, conversation) = self.pending.pop_front().expect("an offer is pending");
        let now = self.tick();
        self.router
            .handle(
                now,
                Command::Accept {
                    agent: agent.clone(),
                    conversation,
                },
                &mut self.effects,
            )
            .unwrap();
        self.take_offers(false);
        self.router
            .handle(
                now,
                Command::Resolve {
                    agent,
                    conversation,
                },
                &mut self.effects,
            )
            .unwrap();
        if !self.take_offers(false) {
            // Nothing waited for this agent: an arrival like the resolved one will be offered to it.
            self.owed.push_back(profile_of(conversation));
        }
        self.resolved.push_back((conversation, self.now));
    }

    /// Untimed: the arrivals that give the backlog back what the last `count` decisions took from it.
    fn prebuild(&mut self, count: usize) -> Vec<Box<NewConversation>> {
        (0..count)
            .map(|_| {
                let profile = self.owed.pop_front().expect("profiles owed");
                let id = conversation_id(&mut self.rng, self.now, profile);
                new_conversation(id, profile)
            })
            .collect()
    }

    /// Untimed: closes the resolved conversations whose reopen window has passed.
    fn close_due(&mut self) {
        while let Some(&(id, at)) = self.resolved.front() {
            if at + REOPEN_WINDOW.0 > self.now {
                break;
            }
            self.resolved.pop_front();
            let now = Timestamp(self.now);
            self.router
                .handle(
                    now,
                    Command::TimerFired(TimerKey::ReopenWindow(id)),
                    &mut self.effects,
                )
                .unwrap();
            self.take_offers(false);
        }
    }

    #[inline(never)]
    fn timed_cycles(&mut self, arrivals: Vec<Box<NewConversation>>) {
        for new in arrivals {
            self.resolve_one();
            self.arrive(new);
        }
    }

    #[inline(never)]
    fn timed_resolves(&mut self, count: usize) {
        for _ in 0..count {
            self.resolve_one();
        }
    }

    #[inline(never)]
    fn timed_arrivals(&mut self, arrivals: Vec<Box<NewConversation>>) {
        for new in arrivals {
            self.arrive(new);
        }
    }

    /// Runs `iterations` commands of `kind` in chunks, timing only the measured part of each chunk.
    fn run(&mut self, kind: Kind, iterations: u64, tally: &mut Tally) -> Duration {
        let decisions_before = self.decisions;
        let mut timed = Duration::ZERO;
        let mut left = iterations;
        while left > 0 {
            let count = left.min(CHUNK as u64) as usize;
            let arrivals = self.prebuild(count);
            match kind {
                Kind::Cycle => {
                    let start = Instant::now();
                    self.timed_cycles(arrivals);
                    timed += start.elapsed();
                }
                Kind::ResolveOffer => {
                    let start = Instant::now();
                    self.timed_resolves(count);
                    timed += start.elapsed();
                    for new in arrivals {
                        self.arrive(new);
                    }
                }
                Kind::Arrival => {
                    let start = Instant::now();
                    self.timed_arrivals(arrivals);
                    timed += start.elapsed();
                    for _ in 0..count {
                        self.resolve_one();
                    }
                }
            }
            self.close_due();
            left -= count as u64;
        }
        tally.commands += iterations;
        tally.timed += timed;
        if iterations >= 1_000 {
            tally
                .samples
                .push(timed.as_nanos() as f64 / iterations as f64);
        }
        tally.decisions += self.decisions - decisions_before;
        timed
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Cycle,
    ResolveOffer,
    Arrival,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Cycle => "cycle",
            Kind::ResolveOffer => "resolve_offer",
            Kind::Arrival => "arrival",
        }
    }
}

// ----- modes -------------------------------------------------------------------------------------

fn benchmarks(criterion: &mut Criterion) {
    let mut group = criterion.benchmark_group("routing");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
        .throughput(Throughput::Elements(1));
    for waiting in SIZES {
        // Built on first use, so a filter that skips this size skips its setup too.
        let mut fixture: Option<Fixture> = None;
        for kind in [Kind::Cycle, Kind::ResolveOffer, Kind::Arrival] {
            let mut tally = Tally::default();
            group.bench_function(BenchmarkId::new(kind.name(), waiting), |bencher| {
                let fixture = fixture.get_or_insert_with(|| Fixture::new(waiting));
                bencher.iter_custom(|iterations| fixture.run(kind, iterations, &mut tally));
            });
            if let Some(fixture) = &fixture
                && tally.commands > 0
            {
                fixture.check();
                eprintln!(
                    "summary: {}/{waiting}: {:.1} ns per iteration (mean over {} iterations; sample median {:.1}, fastest {:.1}), {:.3} decisions per iteration, {} of {} decisions made at arrival",
                    kind.name(),
                    tally.mean(),
                    tally.commands,
                    tally.median(),
                    tally.fastest(),
                    tally.decisions as f64 / tally.commands as f64,
                    fixture.decisions_at_arrival,
                    fixture.decisions,
                );
            }
        }
    }
    group.finish();
}

/// Resident set size of this process, from `/proc/self/status`.
fn resident_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status
        .lines()
        .find(|line| line.starts_with("VmRSS:"))
        .unwrap();
    let kib: u64 = line
        .trim_start_matches("VmRSS:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap();
    kib * 1024
}

/// Resident bytes per waiting conversation: `waiting` conversations loaded into a router whose agents are
/// all offline, so every one waits.
fn memory(waiting: usize) {
    let mut fixture = Fixture::empty(0xbeef);
    let before = resident_bytes();
    for _ in 0..waiting {
        fixture.load_one();
    }
    let after = resident_bytes();
    assert_eq!(fixture.router.waiting_count(), waiting);
    println!(
        "memory: {waiting} waiting → {:.1} B per waiting conversation ({:.1} MiB resident for the backlog)",
        (after - before) as f64 / waiting as f64,
        (after - before) as f64 / (1024.0 * 1024.0)
    );
}

/// Fixed command counts without criterion, for instruction counts under callgrind: each `timed_*`
/// function runs exactly the commands the criterion measurement of the same name times.
fn quick(waiting: usize) {
    const COMMANDS: u64 = 32_000;
    let mut fixture = Fixture::new(waiting);
    for kind in [Kind::Cycle, Kind::ResolveOffer, Kind::Arrival] {
        let mut tally = Tally::default();
        fixture.run(kind, COMMANDS, &mut tally);
        fixture.check();
        println!(
            "quick: {}/{waiting}: {} iterations, {} decisions, {:.1} ns per iteration",
            kind.name(),
            tally.commands,
            tally.decisions,
            tally.mean()
        );
    }
    if let Some(digest) = &fixture.digest {
        println!("quick: digest of every effect {:016x}", digest.finish());
    }
}

fn main() {
    if let Ok(waiting) = std::env::var("SWITCHBOARD_BENCH_MEM") {
        memory(
            waiting
                .parse()
                .expect("SWITCHBOARD_BENCH_MEM=<waiting conversations>"),
        );
        return;
    }
    if let Ok(quick_mode) = std::env::var("SWITCHBOARD_BENCH_QUICK") {
        let waiting = match quick_mode.as_str() {
            "" | "1" => 100_000,
            other => other
                .parse()
                .expect("SWITCHBOARD_BENCH_QUICK=1 or =<waiting>"),
        };
        quick(waiting);
        return;
    }
    let mut criterion = Criterion::default().configure_from_args();
    benchmarks(&mut criterion);
    criterion.final_summary();
    // Memory is measured only when benchmarking (`cargo bench` passes `--bench`), not when a test
    // runner lists or runs the bench target in test mode.
    let benchmarking = std::env::args().any(|arg| arg == "--bench");
    if !benchmarking || std::env::var_os("SWITCHBOARD_BENCH_SKIP_MEM").is_some() {
        return;
    }
    // Memory in fresh processes, so nothing freed by the timing runs is reused.
    let exe = std::env::current_exe().unwrap();
    for waiting in SIZES {
        let status = std::process::Command::new(&exe)
            .env("SWITCHBOARD_BENCH_MEM", waiting.to_string())
            .status()
            .unwrap();
        assert!(status.success(), "memory measurement failed");
    }
}
