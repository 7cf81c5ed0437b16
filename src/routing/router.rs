//! The router state machine: who gets which conversation, when.
//!
//! [`Router::handle`] takes one [`Command`] and the current time and appends [`Effect`]s. It does no
//! I/O and reads no clock, so the daemon, the tests and the simulator drive the very same code.
//!
//! # How a decision is made in O(log n)
//!
//! A *lane* is a (queue, requirement class) pair, where the class is the extra skills and language a
//! routing rule asked for. Each lane keeps, per channel:
//!
//! * `waiting`: the unanswered conversations eligible there, ordered by [`WaitKey`] (priority
//!   descending, then waiting since, then arrival order), in a [`WaitLine`]: one age-ordered deque
//!   per priority, so an arrival joins at the back and the best leaves from the front in O(1)
//!   (see `waitline.rs` for leaving from the middle and joining out of order), and
//! * `free`: the available agents qualified for the lane with free capacity on that channel, ordered by
//!   the queue's strategy ([`FreeKey`]), in a B-tree.
//!
//! A new conversation peeks at `free` of each candidate queue's lane in order (first free queue). An
//! agent with free capacity peeks at the front of `waiting` of each lane it qualifies for, on each
//! channel it has room on, and takes the best key. Both are a bounded number of O(1) or O(log n)
//! lookups, however many conversations wait; only lanes, queues and channels (all bounded by
//! configuration) multiply the cost.
//!
//! # Time
//!
//! Each unanswered conversation has at most one *wait check* timer, set to the next moment anything
//! changes for it (an escalation step, the SLA target, an overflow, the end of a re-offer cooldown or of a
//! reservation). Timers are semantic keys ([`TimerKey`]); a stale timer is ignored when it fires.

use std::cmp::Reverse;
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::sync::Arc;

use super::backlog::{OldestWaits, PriorityCounts};
use super::command::{
    AwayReason, Command, CommandError, Effect, NewConversation, OfferEnd, PriorityReason, TimerKey,
    TransferTarget,
};
use super::config::{AgentConfig, EscalationAction, QueueConfig, RoutingConfig, Strategy};
use super::model::{
    AgentId, Channel, ConversationId, MessageId, Presence, Priority, QueueName, SkillRequirement,
};
use super::rules::{self, CompiledRules, OutcomeId};
use super::time::{Millis, Timestamp};
use super::waitline::WaitLine;

/// How many recent handle times per queue feed the estimated wait.
const HANDLE_TIME_WINDOW: usize = 64;

/// How many recently seen language tags conversations share (see [`Router::shared_language`]).
const RECENT_LANGUAGES: usize = 16;

/// Order of service among waiting conversations: highest priority, then longest wait, then arrival.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct WaitKey {
    pub(super) priority: Reverse<Priority>,
    pub(super) since: Timestamp,
    pub(super) seq: u64,
    pub(super) slot: u32,
}

/// Order of choice among free agents, per the queue's strategy; lowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct FreeKey {
    primary: u64,
    secondary: u64,
    pub(super) agent: u32,
}

#[derive(Debug, Default)]
pub(super) struct LaneChannel {
    pub(super) waiting: WaitLine,
    pub(super) free: BTreeSet<FreeKey>,
}

/// A queue narrowed to one requirement class. See the module docs.
#[derive(Debug)]
pub(super) struct Lane {
    pub(super) queue: u32,
    /// Indexed by channel index; grown on demand.
    pub(super) channels: Vec<LaneChannel>,
}

/// Extra requirements a rule puts on the agent, beyond the queue's own.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct Class {
    pub(super) skills: Vec<SkillRequirement>,
    pub(super) language: Option<String>,
}

#[derive(Debug)]
pub(super) struct QueueState {
    pub(super) config: QueueConfig,
    pub(super) open: bool,
    pub(super) next_tier: Option<u32>,
    /// Per escalation step: the queue index of an `OverflowTo` target.
    pub(super) overflow_targets: Vec<Option<u32>>,
    pub(super) lanes: Vec<u32>,
    /// Unanswered conversations waiting with this queue as home, counted by priority (for positions).
    pub(super) by_priority: PriorityCounts,
    /// The same conversations by age (for the count and the oldest wait).
    pub(super) by_age: OldestWaits,
    handle_times: VecDeque<u64>,
    handle_time_sum: u64,
    /// Per channel: capacity of the available agents serving this queue.
    pub(super) staffed: Vec<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct WrapUp {
    pub(super) conversation: ConversationId,
    pub(super) channel: u32,
    pub(super) until: Timestamp,
}

#[derive(Debug)]
pub(super) struct AgentState {
    pub(super) id: AgentId,
    pub(super) config: AgentConfig,
    pub(super) presence: Presence,
    /// Queues served (member or skilled), each with its round-robin turn.
    pub(super) serves: Vec<(u32, u64)>,
    /// Lanes this agent qualifies for, with its summed skill level there.
    pub(super) lanes: Vec<(u32, u32)>,
    /// Per channel index.
    pub(super) capacity: Vec<u16>,
    pub(super) load: Vec<u16>,
    pub(super) load_total: u16,
    pub(super) offers: Vec<u32>,
    pub(super) assigned: Vec<u32>,
    pub(super) wrap_ups: Vec<WrapUp>,
    pub(super) missed: u32,
    pub(super) last_offer_at: Timestamp,
    /// Conversations waiting for this agent only (transferred to them, or reopened preferring them).
    pub(super) reserved: BTreeSet<WaitKey>,
    /// Where this agent sits in the lanes' `free` sets, so it can be taken out exactly.
    free_entries: Vec<(u32, u32, FreeKey)>,
}

impl AgentState {
    pub(super) fn capacity_for(&self, channel: u32) -> u16 {
        self.capacity.get(channel as usize).copied().unwrap_or(0)
    }

    pub(super) fn load_for(&self, channel: u32) -> u16 {
        self.load.get(channel as usize).copied().unwrap_or(0)
    }

    /// Available, with room on `channel` and under the total cap.
    pub(super) fn has_room(&self, channel: u32) -> bool {
        self.presence == Presence::Available
            && self.load_for(channel) < self.capacity_for(channel)
            && self.load_total < self.config.max_total
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ConvState {
    /// Unanswered and not offered: in the lanes (or an agent's reserved set).
    Waiting,
    Offered {
        agent: u32,
        queue: u32,
        deadline: Timestamp,
    },
    Assigned {
        agent: u32,
        queue: u32,
        since: Timestamp,
    },
    /// Resolved and still within its reopen window.
    Resolved { agent: u32, at: Timestamp },
}

/// A conversation's candidate (queue, lane) pairs in order, at most 32. Nearly every conversation has
/// one or two, kept inline, so a conversation costs no allocation for them.
#[derive(Debug, Clone)]
pub(super) enum Candidates {
    Inline { len: u8, pairs: [(u32, u32); 2] },
    Spilled(Box<[(u32, u32)]>),
}

impl Default for Candidates {
    fn default() -> Candidates {
        Candidates::Inline {
            len: 0,
            pairs: [(0, 0); 2],
        }
    }
}

impl Candidates {
    pub(super) fn one(pair: (u32, u32)) -> Candidates {
        Candidates::Inline {
            len: 1,
            pairs: [pair, (0, 0)],
        }
    }

    pub(super) fn push(&mut self, pair: (u32, u32)) {
        match self {
            Candidates::Inline { len, pairs } if usize::from(*len) < pairs.len() => {
                pairs[usize::from(*len)] = pair;
                *len += 1;
            }
            _ => {
                let mut spilled = self.to_vec();
                spilled.push(pair);
                *self = Candidates::Spilled(spilled.into_boxed_slice());
            }
        }
    }
}

impl std::ops::Deref for Candidates {
    type Target = [(u32, u32)];

    fn deref(&self) -> &[(u32, u32)] {
        match self {
            Candidates::Inline { len, pairs } => &pairs[..usize::from(*len)],
            Candidates::Spilled(pairs) => pairs,
        }
    }
}

impl FromIterator<(u32, u32)> for Candidates {
    fn from_iter<I: IntoIterator<Item = (u32, u32)>>(pairs: I) -> Candidates {
        let mut candidates = Candidates::default();
        for pair in pairs {
            candidates.push(pair);
        }
        candidates
    }
}

/// What only a conversation that was missed, transferred, reopened or escalated carries. Boxed in
/// [`Conversation`] so the usual conversation does not pay for it, and dropped when empty again.
#[derive(Debug, Default)]
pub(super) struct Detours {
    /// Agents who missed this conversation recently, and until when they are skipped.
    pub(super) excluded: Vec<(u32, Timestamp)>,
    /// Waits for this agent only, until the deadline.
    pub(super) reserved_for: Option<(u32, Timestamp)>,
    /// The former owner to tell when it is resolved (after an escalation).
    pub(super) follower: Option<u32>,
}

impl Detours {
    fn is_empty(&self) -> bool {
        self.excluded.is_empty() && self.reserved_for.is_none() && self.follower.is_none()
    }

    /// `None` when there is nothing to keep.
    pub(super) fn boxed(self) -> Option<Box<Detours>> {
        (!self.is_empty()).then(|| Box::new(self))
    }
}

#[derive(Debug)]
pub(super) struct Conversation {
    pub(super) id: ConversationId,
    pub(super) seq: u64,
    pub(super) channel: u32,
    pub(super) class: u32,
    /// Shared with other conversations in the same language (see [`Router::shared_language`]).
    pub(super) language: Option<Arc<str>>,
    pub(super) priority: Priority,
    pub(super) base_priority: Priority,
    /// Waiting since: the order key. Kept across rejects, timeouts and transfers.
    pub(super) since: Timestamp,
    /// Candidate queues (queue, lane) in order; the first is home.
    pub(super) candidates: Candidates,
    /// Bit i: eligible in `candidates[i]` while waiting (home always; later ones after overflow).
    pub(super) eligible_mask: u32,
    pub(super) state: ConvState,
    /// Next escalation step of the home queue.
    pub(super) next_step: u16,
    pub(super) sla_breached: bool,
    pub(super) repeats: u8,
    pub(super) keyword_boosted: bool,
    pub(super) wording_boosted: bool,
    /// Exclusions, a reservation, a follower: `None` for most conversations.
    pub(super) detours: Option<Box<Detours>>,
    pub(super) last_agent: Option<u32>,
    pub(super) wait_check_at: Option<Timestamp>,
    /// In the lanes or a reserved set right now (must be taken out before its key fields change).
    pub(super) indexed: bool,
    pub(super) reasons: Vec<PriorityReason>,
    /// Shared with every conversation its rule routed.
    pub(super) tags: Arc<[Arc<str>]>,
}

impl Conversation {
    pub(super) fn key(&self, slot: u32) -> WaitKey {
        WaitKey {
            priority: Reverse(self.priority),
            since: self.since,
            seq: self.seq,
            slot,
        }
    }

    pub(super) fn home_queue(&self) -> u32 {
        self.candidates[0].0
    }

    pub(super) fn is_unanswered(&self) -> bool {
        matches!(self.state, ConvState::Waiting | ConvState::Offered { .. })
    }

    /// Skipped for this agent after a miss. The cooldown ends when the wait check due at its end
    /// runs, not merely when the clock passes it: otherwise, between two timers due at the same
    /// instant, a conversation would be eligible for an agent without having been routed to it.
    pub(super) fn is_excluded(&self, agent: u32) -> bool {
        self.excluded().iter().any(|&(who, _)| who == agent)
    }

    /// Agents who missed this conversation recently, and until when they are skipped.
    pub(super) fn excluded(&self) -> &[(u32, Timestamp)] {
        self.detours
            .as_ref()
            .map_or(&[], |detours| detours.excluded.as_slice())
    }

    /// The agent this conversation waits for, and until when.
    pub(super) fn reserved_for(&self) -> Option<(u32, Timestamp)> {
        self.detours
            .as_ref()
            .and_then(|detours| detours.reserved_for)
    }

    pub(super) fn follower(&self) -> Option<u32> {
        self.detours.as_ref().and_then(|detours| detours.follower)
    }

    fn detours_mut(&mut self) -> &mut Detours {
        self.detours.get_or_insert_with(Box::default)
    }

    fn tidy_detours(&mut self) {
        if self
            .detours
            .as_ref()
            .is_some_and(|detours| detours.is_empty())
        {
            self.detours = None;
        }
    }

    pub(super) fn exclude(&mut self, agent: u32, until: Timestamp) {
        self.detours_mut().excluded.push((agent, until));
    }

    pub(super) fn clear_exclusions(&mut self) {
        if let Some(detours) = &mut self.detours {
            detours.excluded.clear();
        }
        self.tidy_detours();
    }

    pub(super) fn set_reserved_for(&mut self, reserved: Option<(u32, Timestamp)>) {
        if reserved.is_none() && self.detours.is_none() {
            return;
        }
        self.detours_mut().reserved_for = reserved;
        self.tidy_detours();
    }

    pub(super) fn set_follower(&mut self, agent: u32) {
        self.detours_mut().follower = Some(agent);
    }

    pub(super) fn take_follower(&mut self) -> Option<u32> {
        let follower = self
            .detours
            .as_mut()
            .and_then(|detours| detours.follower.take());
        self.tidy_detours();
        follower
    }

    /// Drops the exclusions and the reservation whose time has passed.
    pub(super) fn expire_detours(&mut self, now: Timestamp) {
        if let Some(detours) = &mut self.detours {
            detours.excluded.retain(|&(_, until)| until > now);
            if detours.reserved_for.is_some_and(|(_, until)| until <= now) {
                detours.reserved_for = None;
            }
        }
        self.tidy_detours();
    }
}

/// Conversation ids are ULIDs whose low bits are random, so folding them is a good, fast hash.
#[derive(Debug, Default)]
pub(super) struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(byte)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u128(&mut self, value: u128) {
        self.0 = ((value as u64) ^ ((value >> 64) as u64)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// Conversation id → slot. A key is kept as two `u64`s: as a `u128` it would align every entry to 16
/// bytes, 32 per entry instead of 24. It hashes exactly as the `u128` does.
#[derive(Debug, Default)]
pub(super) struct SlotIndex(HashMap<IdKey, u32, BuildHasherDefault<IdHasher>>);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct IdKey {
    low: u64,
    high: u64,
}

impl From<ConversationId> for IdKey {
    fn from(id: ConversationId) -> IdKey {
        IdKey {
            low: id.0 as u64,
            high: (id.0 >> 64) as u64,
        }
    }
}

impl Hash for IdKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u128((u128::from(self.high) << 64) | u128::from(self.low));
    }
}

impl SlotIndex {
    pub(super) fn get(&self, id: ConversationId) -> Option<u32> {
        self.0.get(&IdKey::from(id)).copied()
    }

    pub(super) fn contains(&self, id: ConversationId) -> bool {
        self.0.contains_key(&IdKey::from(id))
    }

    fn insert(&mut self, id: ConversationId, slot: u32) {
        self.0.insert(IdKey::from(id), slot);
    }

    fn remove(&mut self, id: ConversationId) {
        self.0.remove(&IdKey::from(id));
    }

    pub(super) fn len(&self) -> usize {
        self.0.len()
    }
}

/// How many conversation slots one chunk of [`ConversationSlots`] holds (a power of two).
const SLOT_CHUNK: usize = 4096;

/// The conversations by slot, in chunks of [`SLOT_CHUNK`] that never move once allocated.
///
/// A single `Vec` doubled as the backlog grew: each doubling copied every conversation and freed
/// the old buffer, which mimalloc (the daemon's allocator) keeps resident until its delayed purge
/// runs, so right after growing to 10⁵ conversations the freed 2¹⁶-slot buffer (13 MiB) can
/// still be resident beside the new one (docs/BENCHMARKS.md). Chunks grow in bounded steps, copy
/// nothing and free nothing, and leave at most one chunk reserved ahead.
#[derive(Debug, Default)]
pub(super) struct ConversationSlots {
    chunks: Vec<Vec<Option<Conversation>>>,
    len: usize,
}

impl ConversationSlots {
    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// Appends a slot; its index is the old `len()`.
    pub(super) fn push(&mut self, conversation: Option<Conversation>) {
        if self.len.is_multiple_of(SLOT_CHUNK) {
            self.chunks.push(Vec::with_capacity(SLOT_CHUNK));
        }
        if let Some(chunk) = self.chunks.last_mut() {
            chunk.push(conversation);
        }
        self.len += 1;
    }

    /// Every slot in order, empty ones included.
    pub(super) fn iter(&self) -> impl Iterator<Item = &Option<Conversation>> {
        self.chunks.iter().flatten()
    }
}

impl std::ops::Index<usize> for ConversationSlots {
    type Output = Option<Conversation>;

    fn index(&self, slot: usize) -> &Option<Conversation> {
        &self.chunks[slot / SLOT_CHUNK][slot % SLOT_CHUNK]
    }
}

impl std::ops::IndexMut<usize> for ConversationSlots {
    fn index_mut(&mut self, slot: usize) -> &mut Option<Conversation> {
        &mut self.chunks[slot / SLOT_CHUNK][slot % SLOT_CHUNK]
    }
}

/// For keys the configuration decides (agent ids, queue names, channels, requirement classes, lanes):
/// there are few, they do not grow with traffic, and they are looked up on every command, so a fast
/// unkeyed hash (FxHash's word-at-a-time mix) serves them better than SipHash.
#[derive(Debug, Default)]
pub(super) struct KeyHasher(u64);

impl KeyHasher {
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x51_7C_C1_B7_27_22_0A_95);
    }
}

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        // The multiply leaves the low bits weakest; the table indexes by them.
        self.0.rotate_left(26)
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut words = bytes.chunks_exact(8);
        for word in &mut words {
            let mut buffer = [0u8; 8];
            buffer.copy_from_slice(word);
            self.add(u64::from_le_bytes(buffer));
        }
        let rest = words.remainder();
        if !rest.is_empty() {
            let mut buffer = [0u8; 8];
            buffer[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(buffer));
        }
    }

    fn write_u8(&mut self, value: u8) {
        self.add(u64::from(value));
    }

    fn write_u16(&mut self, value: u16) {
        self.add(u64::from(value));
    }

    fn write_u32(&mut self, value: u32) {
        self.add(u64::from(value));
    }

    fn write_u64(&mut self, value: u64) {
        self.add(value);
    }

    fn write_usize(&mut self, value: usize) {
        self.add(value as u64);
    }
}

pub(super) type KeyMap<K, V> = HashMap<K, V, BuildHasherDefault<KeyHasher>>;

/// The routing core. One task owns it; everything else talks to it through [`Command`]s.
#[derive(Debug)]
pub struct Router {
    pub(super) config: RoutingConfig,
    pub(super) rules: CompiledRules,
    pub(super) clock: Timestamp,
    pub(super) queues: Vec<QueueState>,
    pub(super) queue_index: KeyMap<QueueName, u32>,
    pub(super) channels: Vec<Channel>,
    pub(super) channel_index: KeyMap<Channel, u32>,
    pub(super) classes: Vec<Class>,
    pub(super) class_index: KeyMap<Class, u32>,
    pub(super) lanes: Vec<Lane>,
    pub(super) lane_index: KeyMap<(u32, u32), u32>,
    pub(super) agents: Vec<AgentState>,
    pub(super) agent_index: KeyMap<AgentId, u32>,
    pub(super) conversations: ConversationSlots,
    pub(super) free_slots: Vec<u32>,
    pub(super) slot_of: SlotIndex,
    pub(super) next_seq: u64,
    pub(super) next_turn: u64,
    /// Primary subtags (lowercased) of the languages some configured agent speaks; few.
    pub(super) spoken_languages: Vec<String>,
    /// Per rule outcome (see [`CompiledRules::outcomes`]): the class of its skills, any language.
    outcome_classes: Vec<u32>,
    /// Per class without a language: the classes adding each spoken language, as first needed.
    language_classes: KeyMap<u32, Vec<(u32, u32)>>,
    /// Language tags seen lately, most recent last, for conversations to share.
    recent_languages: Vec<Arc<str>>,
}

impl Router {
    /// A router with no conversations. Emits the business-hours timers.
    pub fn new(
        config: RoutingConfig,
        now: Timestamp,
        effects: &mut Vec<Effect>,
    ) -> Result<Router, CommandError> {
        Router::restore(
            config,
            super::inspect::RouterSnapshot::default(),
            now,
            effects,
        )
    }

    /// Builds the structures for a validated configuration, without any conversation or timer.
    pub(super) fn build(config: RoutingConfig, now: Timestamp) -> Result<Router, CommandError> {
        config.validate()?;
        let mut router = Router {
            rules: CompiledRules::new(&config)?,
            clock: now,
            queues: Vec::new(),
            queue_index: KeyMap::default(),
            channels: Vec::new(),
            channel_index: KeyMap::default(),
            classes: Vec::new(),
            class_index: KeyMap::default(),
            lanes: Vec::new(),
            lane_index: KeyMap::default(),
            agents: Vec::new(),
            agent_index: KeyMap::default(),
            conversations: ConversationSlots::default(),
            free_slots: Vec::new(),
            slot_of: SlotIndex::default(),
            next_seq: 0,
            next_turn: 0,
            spoken_languages: Vec::new(),
            outcome_classes: Vec::new(),
            language_classes: KeyMap::default(),
            recent_languages: Vec::new(),
            config,
        };
        for (index, queue) in router.config.queues.iter().enumerate() {
            router.queue_index.insert(queue.name.clone(), index as u32);
        }
        let queue_configs = router.config.queues.clone();
        for queue in queue_configs {
            let next_tier = queue
                .next_tier
                .as_ref()
                .and_then(|name| router.queue_index.get(name).copied());
            let overflow_targets = queue
                .escalation
                .iter()
                .map(|step| match &step.action {
                    EscalationAction::OverflowTo(name) => router.queue_index.get(name).copied(),
                    _ => None,
                })
                .collect();
            for channel in &queue.channels {
                router.intern_channel(channel);
            }
            router.queues.push(QueueState {
                open: queue
                    .business_hours
                    .as_ref()
                    .is_none_or(|hours| hours.is_open(now)),
                config: queue,
                next_tier,
                overflow_targets,
                lanes: Vec::new(),
                by_priority: PriorityCounts::default(),
                by_age: OldestWaits::default(),
                handle_times: VecDeque::new(),
                handle_time_sum: 0,
                staffed: Vec::new(),
            });
        }
        let agent_configs = router.config.agents.clone();
        for agent in agent_configs {
            for language in &agent.languages {
                let primary = rules::primary_language(language);
                if !router.spoken_languages.contains(&primary) {
                    router.spoken_languages.push(primary);
                }
            }
            let mut capacity = Vec::new();
            for (channel, slots) in &agent.capacity {
                let index = router.intern_channel(channel) as usize;
                if capacity.len() <= index {
                    capacity.resize(index + 1, 0);
                }
                capacity[index] = *slots;
            }
            let serves = (0..router.queues.len() as u32)
                .filter(|&queue| agent.serves(&router.queues[queue as usize].config))
                .map(|queue| (queue, 0))
                .collect();
            let index = router.agents.len() as u32;
            router.agent_index.insert(agent.id.clone(), index);
            router.agents.push(AgentState {
                id: agent.id.clone(),
                config: agent,
                presence: Presence::Offline,
                serves,
                lanes: Vec::new(),
                capacity,
                load: Vec::new(),
                load_total: 0,
                offers: Vec::new(),
                assigned: Vec::new(),
                wrap_ups: Vec::new(),
                missed: 0,
                last_offer_at: Timestamp(0),
                reserved: BTreeSet::new(),
                free_entries: Vec::new(),
            });
        }
        // The lane every rule-less conversation uses exists from the start, so agents' lanes are known.
        let plain = router.intern_class(Class {
            skills: Vec::new(),
            language: None,
        });
        for queue in 0..router.queues.len() as u32 {
            router.lane_for(queue, plain);
        }
        let outcome_skills: Vec<Vec<SkillRequirement>> = router
            .rules
            .outcomes()
            .map(|(_, outcome)| outcome.skills.clone())
            .collect();
        for skills in outcome_skills {
            let class = router.intern_class(Class {
                skills,
                language: None,
            });
            router.outcome_classes.push(class);
        }
        Ok(router)
    }

    /// The time of the last command handled.
    pub fn now(&self) -> Timestamp {
        self.clock
    }

    pub fn config(&self) -> &RoutingConfig {
        &self.config
    }

    /// Handles one command at `now`, appending its effects. A refused command changes nothing.
    ///
    /// Time never goes backwards: a `now` earlier than the last one seen is taken as the last one.
    pub fn handle(
        &mut self,
        now: Timestamp,
        command: Command,
        effects: &mut Vec<Effect>,
    ) -> Result<(), CommandError> {
        let now = now.max(self.clock);
        self.clock = now;
        match command {
            Command::Arrive(new) => self.arrive(now, &new, effects),
            Command::CustomerMessage {
                conversation,
                message,
                text,
            } => self.customer_message(now, conversation, message, &text, effects),
            Command::CustomerLeft { conversation } => {
                self.customer_left(now, conversation, effects)
            }
            Command::AgentPresence { agent, presence } => {
                let agent = self.agent_slot(&agent)?;
                self.set_presence(now, agent, presence, effects);
                Ok(())
            }
            Command::AgentDisconnected { agent } => {
                let agent = self.agent_slot(&agent)?;
                self.set_presence(now, agent, Presence::Offline, effects);
                Ok(())
            }
            Command::Accept {
                agent,
                conversation,
            } => self.accept(now, &agent, conversation, effects),
            Command::Reject {
                agent,
                conversation,
            } => {
                let (slot, _) = self.offered_to(&agent, conversation)?;
                self.end_offer(now, slot, OfferEnd::Rejected, effects);
                Ok(())
            }
            Command::Resolve {
                agent,
                conversation,
            } => self.resolve(now, &agent, conversation, effects),
            Command::Transfer {
                agent,
                conversation,
                to,
            } => self.transfer(now, &agent, conversation, to, effects),
            Command::Escalate {
                agent,
                conversation,
            } => self.escalate(now, &agent, conversation, effects),
            Command::TimerFired(key) => {
                self.timer_fired(now, key, effects);
                Ok(())
            }
            Command::ReplaceConfig(config) => {
                let snapshot = self.snapshot();
                *self = Router::restore(*config, snapshot, now, effects)?;
                Ok(())
            }
        }
    }

    // ----- commands -------------------------------------------------------------------------------

    fn arrive(
        &mut self,
        now: Timestamp,
        new: &NewConversation,
        effects: &mut Vec<Effect>,
    ) -> Result<(), CommandError> {
        if self.slot_of.contains(new.id) {
            return Err(CommandError::DuplicateConversation(new.id));
        }
        let (outcome, boosts) = self.rules.decide(&self.config, new);
        let channel = self.intern_channel(&new.channel);
        let class = self.class_for(outcome, new.language.as_deref());
        let candidates = self.candidates_for(outcome, &new.channel, class);
        let rule = self.rules.outcome(outcome);
        let priority = rule.priority.saturating_add(boosts.total());
        let tags = Arc::clone(&rule.tags);
        let conversation = Conversation {
            id: new.id,
            seq: self.next_seq,
            channel,
            class,
            language: new.language.as_deref().map(|tag| self.shared_language(tag)),
            priority,
            base_priority: priority,
            since: now,
            eligible_mask: self.initial_mask(&candidates),
            candidates,
            state: ConvState::Waiting,
            next_step: 0,
            sla_breached: false,
            repeats: 0,
            keyword_boosted: boosts.keyword.is_some(),
            wording_boosted: boosts.wording.is_some(),
            detours: None,
            last_agent: None,
            wait_check_at: None,
            indexed: false,
            reasons: boosts.reasons().map(|(reason, _)| reason).collect(),
            tags,
        };
        self.next_seq += 1;
        let slot = self.insert_conversation(conversation);
        // First free queue: every candidate is tried at arrival, in order, before the conversation waits.
        let candidate_count = self.conv(slot).candidates.len();
        for index in 0..candidate_count {
            let (queue, lane) = self.conv(slot).candidates[index];
            if let Some(agent) = self.free_agent_in(slot, queue, lane) {
                self.offer(now, slot, agent, queue, effects);
                // Auto-accepted, it is answered and waits for nothing: a wait check recorded now
                // would outlive the assignment and hide the one a later transfer needs.
                if self.conv(slot).is_unanswered() {
                    self.reschedule_wait_check(now, slot, effects);
                }
                return Ok(());
            }
        }
        self.enqueue(slot, effects);
        self.reschedule_wait_check(now, slot, effects);
        Ok(())
    }

    fn customer_message(
        &mut self,
        now: Timestamp,
        id: ConversationId,
        message: MessageId,
        text: &str,
        effects: &mut Vec<Effect>,
    ) -> Result<(), CommandError> {
        let slot = self.slot(id)?;
        match self.conv(slot).state {
            ConvState::Assigned { agent, .. } => {
                effects.push(Effect::DeliverToAgent {
                    conversation: id,
                    agent: self.agents[agent as usize].id.clone(),
                    message,
                });
            }
            ConvState::Waiting | ConvState::Offered { .. } => {
                let conversation = self.conv(slot);
                let mut boosts = Vec::new();
                if conversation.repeats < self.config.priority.repeat_max
                    && self.config.priority.repeat_message != 0
                {
                    boosts.push((
                        PriorityReason::RepeatMessage,
                        self.config.priority.repeat_message,
                    ));
                }
                for (reason, boost) in self
                    .rules
                    .text_boosts(&self.config, conversation.language.as_deref(), text)
                    .reasons()
                {
                    let already = match reason {
                        PriorityReason::Keyword => conversation.keyword_boosted,
                        PriorityReason::NegativeWording => conversation.wording_boosted,
                        _ => false,
                    };
                    if !already {
                        boosts.push((reason, boost));
                    }
                }
                for (reason, boost) in boosts {
                    let conversation = self.conv_mut(slot);
                    match reason {
                        PriorityReason::RepeatMessage => conversation.repeats += 1,
                        PriorityReason::Keyword => conversation.keyword_boosted = true,
                        PriorityReason::NegativeWording => conversation.wording_boosted = true,
                        _ => {}
                    }
                    let to = conversation.priority.saturating_add(boost);
                    self.set_priority(slot, to, reason, effects);
                }
            }
            ConvState::Resolved { agent, .. } => self.reopen(now, slot, agent, effects),
        }
        Ok(())
    }

    fn reopen(&mut self, now: Timestamp, slot: u32, last_agent: u32, effects: &mut Vec<Effect>) {
        let prefer_for = self.config.reopen.prefer_last_agent_for;
        let conversation = self.conv_mut(slot);
        let id = conversation.id;
        conversation.state = ConvState::Waiting;
        conversation.since = now;
        conversation.priority = conversation.base_priority;
        conversation.next_step = 0;
        conversation.sla_breached = false;
        conversation.repeats = 0;
        conversation.clear_exclusions();
        conversation.set_reserved_for(
            (prefer_for > Millis::ZERO).then_some((last_agent, now + prefer_for)),
        );
        conversation.eligible_mask = 1;
        effects.push(Effect::CancelTimer {
            key: TimerKey::ReopenWindow(id),
        });
        let preferred =
            (prefer_for > Millis::ZERO).then(|| self.agents[last_agent as usize].id.clone());
        effects.push(Effect::Reopened {
            conversation: id,
            preferred_agent: preferred,
        });
        self.requeue_and_route(now, slot, effects);
    }

    fn customer_left(
        &mut self,
        now: Timestamp,
        id: ConversationId,
        effects: &mut Vec<Effect>,
    ) -> Result<(), CommandError> {
        let slot = self.slot(id)?;
        let (state, since) = {
            let conversation = self.conv(slot);
            (conversation.state, conversation.since)
        };
        match state {
            ConvState::Waiting => self.unindex_conversation(slot),
            ConvState::Offered { agent, .. } => {
                self.take_back_offer(slot, OfferEnd::Abandoned, effects);
                self.conv_mut(slot).state = ConvState::Waiting;
                self.free_slot(agent, slot);
                self.serve_agent(now, agent, effects);
            }
            // Answered already: leaving is not abandonment, and the conversation goes on.
            ConvState::Assigned { .. } | ConvState::Resolved { .. } => return Ok(()),
        }
        effects.push(Effect::Abandoned {
            conversation: id,
            waited: now.since(since),
        });
        if self.conv(slot).wait_check_at.is_some() {
            effects.push(Effect::CancelTimer {
                key: TimerKey::WaitCheck(id),
            });
        }
        self.remove_conversation(slot);
        Ok(())
    }

    fn set_presence(
        &mut self,
        now: Timestamp,
        agent: u32,
        presence: Presence,
        effects: &mut Vec<Effect>,
    ) {
        let requeued = self.change_presence(now, agent, presence, effects);
        self.route_best_first(now, requeued, effects);
    }

    /// Sets the presence. An agent who becomes available is served; one who stops being available
    /// loses its offers, whose conversations are returned waiting (indexed, not yet routed: the
    /// caller routes them with [`Router::route_best_first`]).
    fn change_presence(
        &mut self,
        now: Timestamp,
        agent: u32,
        presence: Presence,
        effects: &mut Vec<Effect>,
    ) -> Vec<u32> {
        let previous = self.agents[agent as usize].presence;
        if previous == presence {
            return Vec::new();
        }
        self.unindex_agent(agent);
        self.adjust_staffing(agent, previous, presence);
        let state = &mut self.agents[agent as usize];
        state.presence = presence;
        if presence == Presence::Available {
            state.missed = 0;
            state.last_offer_at = state.last_offer_at.max(now);
            self.index_agent(agent);
            self.serve_agent(now, agent, effects);
            Vec::new()
        } else {
            self.withdraw_all_offers(agent, OfferEnd::AgentLeft, effects)
        }
    }

    fn accept(
        &mut self,
        now: Timestamp,
        agent: &AgentId,
        id: ConversationId,
        effects: &mut Vec<Effect>,
    ) -> Result<(), CommandError> {
        let (slot, agent_slot) = self.offered_to(agent, id)?;
        let ConvState::Offered { queue, .. } = self.conv(slot).state else {
            return Err(CommandError::NotOffered {
                conversation: id,
                agent: agent.clone(),
            });
        };
        let state = &mut self.agents[agent_slot as usize];
        state.offers.retain(|&offered| offered != slot);
        state.assigned.push(slot);
        state.missed = 0;
        effects.push(Effect::CancelTimer {
            key: TimerKey::Offer(id),
        });
        self.assign(now, slot, agent_slot, queue, effects);
        Ok(())
    }

    /// Makes the agent the owner; the conversation is answered. Load was taken when it was offered.
    fn assign(
        &mut self,
        now: Timestamp,
        slot: u32,
        agent: u32,
        queue: u32,
        effects: &mut Vec<Effect>,
    ) {
        let conversation = self.conv_mut(slot);
        conversation.state = ConvState::Assigned {
            agent,
            queue,
            since: now,
        };
        conversation.last_agent = Some(agent);
        conversation.clear_exclusions();
        conversation.set_reserved_for(None);
        let id = conversation.id;
        let waited = now.since(conversation.since);
        if conversation.wait_check_at.take().is_some() {
            effects.push(Effect::CancelTimer {
                key: TimerKey::WaitCheck(id),
            });
        }
        effects.push(Effect::Assigned {
            conversation: id,
            agent: self.agents[agent as usize].id.clone(),
            queue: self.queues[queue as usize].config.name.clone(),
            waited,
        });
    }

    fn resolve(
        &mut self,
        now: Timestamp,
        agent: &AgentId,
        id: ConversationId,
        effects: &mut Vec<Effect>,
    ) -> Result<(), CommandError> {
        let (slot, agent_slot, queue, assigned_since) = self.owned_by(agent, id)?;
        let handle_time = now.since(assigned_since);
        self.queues[queue as usize].record_handle_time(handle_time);
        let wrap_up = self.queues[queue as usize].config.wrap_up;
        let channel = self.conv(slot).channel;
        self.agents[agent_slot as usize]
            .assigned
            .retain(|&owned| owned != slot);
        if wrap_up > Millis::ZERO {
            // Wrap-up timers are keyed by (agent, conversation), so there is at most one wrap-up per
            // pair: one still running from an earlier resolve of this (reopened) conversation ends now
            // instead of losing its timer to the new one and holding its slot for good.
            let wrap_ups = &mut self.agents[agent_slot as usize].wrap_ups;
            if let Some(position) = wrap_ups.iter().position(|w| w.conversation == id) {
                let earlier = wrap_ups.swap_remove(position);
                self.change_load(agent_slot, earlier.channel, -1);
            }
            let until = now + wrap_up;
            self.agents[agent_slot as usize].wrap_ups.push(WrapUp {
                conversation: id,
                channel,
                until,
            });
            effects.push(Effect::ScheduleTimer {
                key: TimerKey::WrapUp(agent.clone(), id),
                at: until,
            });
        } else {
            // Out of the free sets until `serve_and_index` has offered the freed capacity.
            self.unindex_agent(agent_slot);
            add_load(&mut self.agents[agent_slot as usize], channel, -1);
        }
        let conversation = self.conv_mut(slot);
        conversation.state = ConvState::Resolved {
            agent: agent_slot,
            at: now,
        };
        let follower = conversation.take_follower();
        effects.push(Effect::Resolved {
            conversation: id,
            agent: agent.clone(),
            queue: self.queues[queue as usize].config.name.clone(),
            handle_time,
        });
        if let Some(follower) = follower {
            effects.push(Effect::FollowUp {
                conversation: id,
                agent: self.agents[follower as usize].id.clone(),
            });
        }
        effects.push(Effect::ScheduleTimer {
            key: TimerKey::ReopenWindow(id),
            at: now + self.config.reopen.window,
        });
        self.serve_and_index(now, agent_slot, effects);
        Ok(())
    }

    fn transfer(
        &mut self,
        now: Timestamp,
        agent: &AgentId,
        id: ConversationId,
        to: TransferTarget,
        effects: &mut Vec<Effect>,
    ) -> Result<(), CommandError> {
        let (slot, agent_slot, _, _) = self.owned_by(agent, id)?;
        enum Target {
            Queue(u32),
            Agent(u32),
        }
        let target = match &to {
            TransferTarget::Queue(name) => {
                let queue = self.queue_slot(name)?;
                let channel = &self.channels[self.conv(slot).channel as usize];
                if !self.queues[queue as usize].config.accepts(channel) {
                    return Err(CommandError::QueueRejectsChannel {
                        queue: name.clone(),
                        channel: channel.clone(),
                    });
                }
                Target::Queue(queue)
            }
            TransferTarget::Agent(target) => {
                let target_slot = self.agent_slot(target)?;
                if target_slot == agent_slot {
                    return Err(CommandError::TransferToSelf);
                }
                Target::Agent(target_slot)
            }
        };
        self.release_owner(slot, agent_slot);
        effects.push(Effect::Transferred {
            conversation: id,
            from_agent: agent.clone(),
            to,
        });
        match target {
            Target::Queue(queue) => self.move_to_queue(now, slot, queue),
            Target::Agent(target) => {
                let until = now + self.config.transfer_agent_wait;
                self.conv_mut(slot).set_reserved_for(Some((target, until)));
            }
        }
        self.requeue_and_route(now, slot, effects);
        self.free_slot(agent_slot, slot);
        self.serve_agent(now, agent_slot, effects);
        Ok(())
    }

    fn escalate(
        &mut self,
        now: Timestamp,
        agent: &AgentId,
        id: ConversationId,
        effects: &mut Vec<Effect>,
    ) -> Result<(), CommandError> {
        let (slot, agent_slot, queue, _) = self.owned_by(agent, id)?;
        let Some(next_tier) = self.queues[queue as usize].next_tier else {
            return Err(CommandError::NoNextTier(
                self.queues[queue as usize].config.name.clone(),
            ));
        };
        self.release_owner(slot, agent_slot);
        self.conv_mut(slot).set_follower(agent_slot);
        self.move_to_queue(now, slot, next_tier);
        effects.push(Effect::Escalated {
            conversation: id,
            from_agent: agent.clone(),
            to_queue: self.queues[next_tier as usize].config.name.clone(),
        });
        let to = self
            .conv(slot)
            .priority
            .saturating_add(self.config.priority.tier_escalation);
        self.set_priority(slot, to, PriorityReason::TierEscalation, effects);
        self.requeue_and_route(now, slot, effects);
        self.free_slot(agent_slot, slot);
        self.serve_agent(now, agent_slot, effects);
        Ok(())
    }

    fn timer_fired(&mut self, now: Timestamp, key: TimerKey, effects: &mut Vec<Effect>) {
        match key {
            TimerKey::Offer(id) => {
                let Some(slot) = self.slot_of.get(id) else {
                    return;
                };
                if let ConvState::Offered { deadline, .. } = self.conv(slot).state
                    && deadline <= now
                {
                    self.end_offer(now, slot, OfferEnd::TimedOut, effects);
                }
            }
            TimerKey::WaitCheck(id) => {
                let Some(slot) = self.slot_of.get(id) else {
                    return;
                };
                let conversation = self.conv(slot);
                if conversation.is_unanswered()
                    && conversation.wait_check_at.is_some_and(|at| at <= now)
                {
                    self.conv_mut(slot).wait_check_at = None;
                    self.wait_check(now, slot, effects);
                }
            }
            TimerKey::WrapUp(agent, id) => {
                let Some(&agent) = self.agent_index.get(&agent) else {
                    return;
                };
                let wrap_ups = &mut self.agents[agent as usize].wrap_ups;
                let Some(position) = wrap_ups
                    .iter()
                    .position(|w| w.conversation == id && w.until <= now)
                else {
                    return;
                };
                let ended = wrap_ups.swap_remove(position);
                self.unindex_agent(agent);
                add_load(&mut self.agents[agent as usize], ended.channel, -1);
                self.serve_and_index(now, agent, effects);
            }
            TimerKey::ReopenWindow(id) => {
                let Some(slot) = self.slot_of.get(id) else {
                    return;
                };
                if let ConvState::Resolved { at, .. } = self.conv(slot).state
                    && at + self.config.reopen.window <= now
                {
                    self.remove_conversation(slot);
                    effects.push(Effect::Closed { conversation: id });
                }
            }
            TimerKey::BusinessHours(name) => {
                let Some(&queue) = self.queue_index.get(&name) else {
                    return;
                };
                self.refresh_business_hours(now, queue, effects);
            }
        }
    }

    // ----- the moving parts -----------------------------------------------------------------------

    /// Ends an offer without an accept and puts the conversation back in its original place.
    ///
    /// The conversation is routed on while the agent still holds its slot; only then does the slot
    /// free and the agent take the best conversation waiting for it (which may be this one again when
    /// there is no re-offer cooldown). Freeing the slot first would let the conversation-side choice
    /// hand the agent this conversation ahead of better-ranked ones waiting for it.
    fn end_offer(
        &mut self,
        now: Timestamp,
        slot: u32,
        reason: OfferEnd,
        effects: &mut Vec<Effect>,
    ) {
        let agent = self.take_back_offer(slot, reason, effects);
        self.conv_mut(slot).state = ConvState::Waiting;
        let mut set_away = false;
        if matches!(reason, OfferEnd::Rejected | OfferEnd::TimedOut) {
            let cooldown = self.config.offers.reoffer_cooldown;
            if cooldown > Millis::ZERO {
                self.conv_mut(slot).exclude(agent, now + cooldown);
            }
            let state = &mut self.agents[agent as usize];
            state.missed += 1;
            set_away = state.missed >= self.config.offers.max_missed
                && state.presence == Presence::Available;
        }
        if set_away {
            // The agent's other offers come back too: route them all together, best first, so this
            // one does not take a free agent that a better-ranked one needs.
            self.enqueue(slot, effects);
            self.free_slot(agent, slot);
            let missed = self.agents[agent as usize].missed;
            effects.push(Effect::AgentSetAway {
                agent: self.agents[agent as usize].id.clone(),
                reason: AwayReason::MissedOffers(missed),
            });
            let mut requeued = self.change_presence(now, agent, Presence::Away, effects);
            requeued.push(slot);
            self.route_best_first(now, requeued, effects);
        } else {
            self.requeue_and_route(now, slot, effects);
            self.free_slot(agent, slot);
            self.serve_agent(now, agent, effects);
        }
    }

    /// Withdraws an offer and tells the agent; the caller decides what becomes of the conversation and
    /// when the agent's slot frees ([`Router::free_slot`]). Returns the agent.
    fn take_back_offer(&mut self, slot: u32, reason: OfferEnd, effects: &mut Vec<Effect>) -> u32 {
        let ConvState::Offered { agent, .. } = self.conv(slot).state else {
            unreachable_state()
        };
        let id = self.conv(slot).id;
        self.agents[agent as usize]
            .offers
            .retain(|&offered| offered != slot);
        if reason != OfferEnd::TimedOut {
            effects.push(Effect::CancelTimer {
                key: TimerKey::Offer(id),
            });
        }
        effects.push(Effect::OfferWithdrawn {
            conversation: id,
            agent: self.agents[agent as usize].id.clone(),
            reason,
        });
        agent
    }

    /// Takes back every offer of the agent and returns the conversations waiting and indexed, for
    /// the caller to route with [`Router::route_best_first`].
    fn withdraw_all_offers(
        &mut self,
        agent: u32,
        reason: OfferEnd,
        effects: &mut Vec<Effect>,
    ) -> Vec<u32> {
        let offers = std::mem::take(&mut self.agents[agent as usize].offers);
        for &slot in &offers {
            // take_back_offer expects the slot in the list; it is gone already, which is fine.
            self.take_back_offer(slot, reason, effects);
            self.free_slot(agent, slot);
            self.conv_mut(slot).state = ConvState::Waiting;
            self.enqueue(slot, effects);
        }
        offers
    }

    /// Routes conversations put back waiting together, in the order of service: routed one by one in
    /// offer order, a worse-ranked one could take the only free agent a better-ranked one needs.
    fn route_best_first(&mut self, now: Timestamp, mut slots: Vec<u32>, effects: &mut Vec<Effect>) {
        slots.sort_unstable_by_key(|&slot| self.conv(slot).key(slot));
        for slot in slots {
            self.route_waiting(now, slot, effects);
            if self.conv(slot).is_unanswered() {
                self.reschedule_wait_check(now, slot, effects);
            }
        }
    }

    /// The agent gives up ownership (transfer, escalation). The slot frees without wrap-up, once the
    /// caller has routed the conversation on ([`Router::free_slot`]).
    fn release_owner(&mut self, slot: u32, agent: u32) {
        self.agents[agent as usize]
            .assigned
            .retain(|&owned| owned != slot);
        let conversation = self.conv_mut(slot);
        conversation.state = ConvState::Waiting;
        conversation.clear_exclusions();
    }

    /// Frees the slot an agent held for this conversation (an offer taken back, or ownership given up).
    fn free_slot(&mut self, agent: u32, slot: u32) {
        let channel = self.conv(slot).channel;
        self.change_load(agent, channel, -1);
    }

    /// Makes `queue` the conversation's only candidate, keeping its priority and waiting time. The
    /// new queue's escalation steps that lie in the past are not replayed.
    fn move_to_queue(&mut self, now: Timestamp, slot: u32, queue: u32) {
        let class = self.conv(slot).class;
        let lane = self.lane_for(queue, class);
        let steps_passed = {
            let waited = now.since(self.conv(slot).since);
            self.queues[queue as usize]
                .config
                .escalation
                .iter()
                .take_while(|step| step.after <= waited)
                .count() as u16
        };
        let conversation = self.conv_mut(slot);
        conversation.candidates = Candidates::one((queue, lane));
        conversation.eligible_mask = 1;
        conversation.next_step = steps_passed;
        conversation.set_reserved_for(None);
    }

    /// Puts a waiting conversation in the lanes, tells the customer their place, and offers it if an
    /// eligible agent is free.
    fn requeue_and_route(&mut self, now: Timestamp, slot: u32, effects: &mut Vec<Effect>) {
        self.enqueue(slot, effects);
        self.route_waiting(now, slot, effects);
        if self.conv(slot).is_unanswered() {
            self.reschedule_wait_check(now, slot, effects);
        }
    }

    /// Indexes a waiting conversation and emits `Queued` with its position and estimated wait.
    pub(super) fn enqueue(&mut self, slot: u32, effects: &mut Vec<Effect>) {
        let (home, priority, channel, id) = {
            let conversation = self.conv(slot);
            (
                conversation.home_queue(),
                conversation.priority,
                conversation.channel,
                conversation.id,
            )
        };
        let queue = &self.queues[home as usize];
        let ahead = queue.by_priority.at_or_above(priority);
        let position = ahead + 1;
        let estimated_wait = queue.estimated_wait(position, channel);
        effects.push(Effect::Queued {
            conversation: id,
            queue: queue.config.name.clone(),
            position,
            estimated_wait,
        });
        self.index_conversation(slot);
    }

    /// Offers a waiting conversation to a free eligible agent, if there is one.
    fn route_waiting(&mut self, now: Timestamp, slot: u32, effects: &mut Vec<Effect>) {
        let conversation = self.conv(slot);
        if conversation.state != ConvState::Waiting {
            return;
        }
        if let Some((agent, _)) = conversation.reserved_for() {
            if self.agents[agent as usize].has_room(conversation.channel)
                && !conversation.is_excluded(agent)
            {
                let home = conversation.home_queue();
                self.offer(now, slot, agent, home, effects);
            }
            return;
        }
        let mask = conversation.eligible_mask;
        let candidates = conversation.candidates.clone();
        for (index, &(queue, lane)) in candidates.iter().enumerate() {
            if mask & (1 << index) == 0 {
                continue;
            }
            if let Some(agent) = self.free_agent_in(slot, queue, lane) {
                self.offer(now, slot, agent, queue, effects);
                return;
            }
        }
    }

    /// The best free agent of a lane for this conversation, if the queue is open.
    fn free_agent_in(&self, slot: u32, queue: u32, lane: u32) -> Option<u32> {
        if !self.queues[queue as usize].open {
            return None;
        }
        let conversation = self.conv(slot);
        let lane_channel = self.lanes[lane as usize]
            .channels
            .get(conversation.channel as usize)?;
        lane_channel
            .free
            .iter()
            .map(|key| key.agent)
            .find(|&agent| !conversation.is_excluded(agent))
    }

    /// Offers (or, on auto-accept queues, assigns) a conversation. It must not be indexed afterwards.
    fn offer(
        &mut self,
        now: Timestamp,
        slot: u32,
        agent: u32,
        queue: u32,
        effects: &mut Vec<Effect>,
    ) {
        self.unindex_conversation(slot);
        let channel = self.conv(slot).channel;
        self.unindex_agent(agent);
        self.next_turn += 1;
        let turn = self.next_turn;
        let state = &mut self.agents[agent as usize];
        add_load(state, channel, 1);
        state.last_offer_at = now;
        if let Some(entry) = state.serves.iter_mut().find(|(served, _)| *served == queue) {
            entry.1 = turn;
        }
        self.index_agent(agent);
        let queue_config = &self.queues[queue as usize].config;
        if queue_config.auto_accept {
            self.agents[agent as usize].assigned.push(slot);
            self.assign(now, slot, agent, queue, effects);
            return;
        }
        let deadline = now + queue_config.offer_timeout;
        let queue_name = queue_config.name.clone();
        self.agents[agent as usize].offers.push(slot);
        let conversation = self.conv_mut(slot);
        conversation.state = ConvState::Offered {
            agent,
            queue,
            deadline,
        };
        let id = conversation.id;
        effects.push(Effect::Offered {
            conversation: id,
            agent: self.agents[agent as usize].id.clone(),
            queue: queue_name,
            deadline,
        });
        effects.push(Effect::ScheduleTimer {
            key: TimerKey::Offer(id),
            at: deadline,
        });
    }

    /// Gives an agent with free capacity the best eligible waiting conversations, one at a time, until
    /// it is full or none is left. This is the "order of service" rule: highest priority, then longest
    /// wait, across every lane the agent serves and its reserved conversations.
    pub(super) fn serve_agent(&mut self, now: Timestamp, agent: u32, effects: &mut Vec<Effect>) {
        while let Some((key, queue)) = self.best_waiting_for(agent) {
            self.offer(now, key.slot, agent, queue, effects);
            let conversation = self.conv(key.slot);
            if conversation.is_unanswered() {
                self.reschedule_wait_check(now, key.slot, effects);
            }
        }
    }

    /// [`Router::serve_agent`] for an agent whose capacity just freed while it was kept out of the free
    /// sets, then indexes it with whatever room is left. Nothing in between looks at the free sets, so
    /// this ends exactly as indexing first would, without putting the agent into every lane only for
    /// the offer to take it out again.
    fn serve_and_index(&mut self, now: Timestamp, agent: u32, effects: &mut Vec<Effect>) {
        self.serve_agent(now, agent, effects);
        // An offer re-indexes the agent; with no offer (or none left indexed) it is indexed here.
        if self.agents[agent as usize].free_entries.is_empty() {
            self.index_agent(agent);
        }
    }

    fn best_waiting_for(&self, agent: u32) -> Option<(WaitKey, u32)> {
        let state = &self.agents[agent as usize];
        if state.presence != Presence::Available || state.load_total >= state.config.max_total {
            return None;
        }
        let mut best: Option<(WaitKey, u32)> = None;
        for key in &state.reserved {
            let conversation = self.conv(key.slot);
            if state.has_room(conversation.channel) && !conversation.is_excluded(agent) {
                best = Some((*key, conversation.home_queue()));
                break;
            }
        }
        for &(lane, _) in &state.lanes {
            let lane_state = &self.lanes[lane as usize];
            let queue = &self.queues[lane_state.queue as usize];
            if !queue.open {
                continue;
            }
            for (channel, lane_channel) in lane_state.channels.iter().enumerate() {
                // A queue serves only the channels it accepts, as the free sets do (a conversation can
                // wait in another queue's lane by overflow, transfer or the no-queue fallback).
                if lane_channel.waiting.is_empty()
                    || !state.has_room(channel as u32)
                    || !queue.config.accepts(&self.channels[channel])
                {
                    continue;
                }
                // The first key is nearly always the one; only an exclusion makes the walk go on.
                let first = match lane_channel.waiting.first() {
                    Some(key) if !self.conv(key.slot).is_excluded(agent) => Some(key),
                    _ => lane_channel
                        .waiting
                        .iter()
                        .find(|key| !self.conv(key.slot).is_excluded(agent)),
                };
                if let Some(key) = first
                    && best.is_none_or(|(best_key, _)| key < best_key)
                {
                    best = Some((key, lane_state.queue));
                }
            }
        }
        best
    }

    /// Applies everything that has come due for an unanswered conversation, then re-routes it.
    fn wait_check(&mut self, now: Timestamp, slot: u32, effects: &mut Vec<Effect>) {
        let was_indexed = self.conv(slot).indexed;
        self.unindex_conversation(slot);
        let home = self.conv(slot).home_queue();
        // Wait-time escalation steps of the home queue.
        loop {
            let conversation = self.conv(slot);
            let step_index = conversation.next_step as usize;
            let Some(step) = self.queues[home as usize].config.escalation.get(step_index) else {
                break;
            };
            if conversation.since + step.after > now {
                break;
            }
            let action = step.action.clone();
            self.conv_mut(slot).next_step += 1;
            let reason = PriorityReason::WaitStep {
                queue: self.queues[home as usize].config.name.clone(),
                step: step_index,
            };
            let current = self.conv(slot).priority;
            match action {
                EscalationAction::RaiseBy(by) => {
                    self.set_priority(slot, current.saturating_add(by), reason, effects)
                }
                EscalationAction::SetTo(to) if to > current => {
                    self.set_priority(slot, to, reason, effects)
                }
                EscalationAction::SetTo(_) => {}
                EscalationAction::OverflowTo(_) => {
                    if let Some(target) = self.queues[home as usize].overflow_targets[step_index] {
                        let class = self.conv(slot).class;
                        let lane = self.lane_for(target, class);
                        let conversation = self.conv_mut(slot);
                        let position = match conversation
                            .candidates
                            .iter()
                            .position(|&(queue, _)| queue == target)
                        {
                            Some(position) => position,
                            None if conversation.candidates.len() < 32 => {
                                conversation.candidates.push((target, lane));
                                conversation.candidates.len() - 1
                            }
                            None => continue,
                        };
                        conversation.eligible_mask |= 1 << position;
                    }
                }
            }
        }
        // The SLA target.
        let sla = self.queues[home as usize].config.sla_target;
        if !self.conv(slot).sla_breached && self.conv(slot).since + sla <= now {
            self.conv_mut(slot).sla_breached = true;
            effects.push(Effect::SlaBreached {
                conversation: self.conv(slot).id,
                queue: self.queues[home as usize].config.name.clone(),
            });
            let to = self
                .conv(slot)
                .priority
                .saturating_add(self.config.priority.sla_breach);
            if self.config.priority.sla_breach != 0 {
                self.set_priority(slot, to, PriorityReason::SlaBreached, effects);
            }
        }
        // Overflow into later candidate queues, cooldowns and reservations that ended.
        let overflow_due: u32 = {
            let conversation = self.conv(slot);
            conversation
                .candidates
                .iter()
                .enumerate()
                .skip(1)
                .filter(|(_, (queue, _))| {
                    conversation.since + self.queues[*queue as usize].config.overflow_after <= now
                })
                .fold(0, |mask, (index, _)| mask | (1 << index))
        };
        let conversation = self.conv_mut(slot);
        conversation.eligible_mask |= overflow_due;
        conversation.expire_detours(now);
        if was_indexed {
            self.index_conversation(slot);
            self.route_waiting(now, slot, effects);
        }
        if self.conv(slot).is_unanswered() {
            self.reschedule_wait_check(now, slot, effects);
        }
    }

    /// Sets the wait-check timer to the next moment something changes for this conversation.
    pub(super) fn reschedule_wait_check(
        &mut self,
        now: Timestamp,
        slot: u32,
        effects: &mut Vec<Effect>,
    ) {
        let conversation = self.conv(slot);
        let home = &self.queues[conversation.home_queue() as usize];
        let mut next: Option<Timestamp> = None;
        // After a wait check nothing is past due; after a restore something may be, and comes due now.
        let mut consider = |at: Timestamp| {
            let at = at.max(now);
            next = Some(next.map_or(at, |current| current.min(at)));
        };
        if let Some(step) = home.config.escalation.get(conversation.next_step as usize) {
            consider(conversation.since + step.after);
        }
        if !conversation.sla_breached {
            consider(conversation.since + home.config.sla_target);
        }
        for (index, (queue, _)) in conversation.candidates.iter().enumerate().skip(1) {
            if conversation.eligible_mask & (1 << index) == 0 {
                consider(conversation.since + self.queues[*queue as usize].config.overflow_after);
            }
        }
        for &(_, until) in conversation.excluded() {
            consider(until);
        }
        if let Some((_, until)) = conversation.reserved_for() {
            consider(until);
        }
        if next == conversation.wait_check_at {
            return;
        }
        let id = conversation.id;
        match next {
            Some(at) => effects.push(Effect::ScheduleTimer {
                key: TimerKey::WaitCheck(id),
                at,
            }),
            None => effects.push(Effect::CancelTimer {
                key: TimerKey::WaitCheck(id),
            }),
        }
        self.conv_mut(slot).wait_check_at = next;
    }

    fn set_priority(
        &mut self,
        slot: u32,
        to: Priority,
        reason: PriorityReason,
        effects: &mut Vec<Effect>,
    ) {
        let from = self.conv(slot).priority;
        if from == to {
            return;
        }
        let was_indexed = self.conv(slot).indexed;
        self.unindex_conversation(slot);
        let conversation = self.conv_mut(slot);
        conversation.priority = to;
        if !conversation.reasons.contains(&reason) {
            conversation.reasons.push(reason.clone());
        }
        let id = conversation.id;
        if was_indexed {
            self.index_conversation(slot);
        }
        effects.push(Effect::PriorityChanged {
            conversation: id,
            from,
            to,
            reason,
        });
    }

    pub(super) fn refresh_business_hours(
        &mut self,
        now: Timestamp,
        queue: u32,
        effects: &mut Vec<Effect>,
    ) {
        let Some(hours) = self.queues[queue as usize].config.business_hours.clone() else {
            return;
        };
        let was_open = self.queues[queue as usize].open;
        let open = hours.is_open(now);
        self.queues[queue as usize].open = open;
        if let Some(at) = hours.next_change(now) {
            effects.push(Effect::ScheduleTimer {
                key: TimerKey::BusinessHours(self.queues[queue as usize].config.name.clone()),
                at,
            });
        }
        if open && !was_open {
            self.serve_queue(now, queue, effects);
        }
    }

    /// Lets every free agent of a queue pull work (after it opened).
    fn serve_queue(&mut self, now: Timestamp, queue: u32, effects: &mut Vec<Effect>) {
        let mut agents: Vec<u32> = self.queues[queue as usize]
            .lanes
            .iter()
            .flat_map(|&lane| {
                self.lanes[lane as usize]
                    .channels
                    .iter()
                    .flat_map(|channel| channel.free.iter().map(|key| key.agent))
            })
            .collect();
        agents.sort_unstable();
        agents.dedup();
        for agent in agents {
            self.serve_agent(now, agent, effects);
        }
    }

    // ----- indexes --------------------------------------------------------------------------------

    /// Puts a waiting conversation into its lanes (or its reserved agent's set) and the queue counts.
    pub(super) fn index_conversation(&mut self, slot: u32) {
        let conversation = self.conv(slot);
        debug_assert!(conversation.state == ConvState::Waiting && !conversation.indexed);
        let key = conversation.key(slot);
        let (channel, home, mask, reserved) = (
            conversation.channel,
            conversation.home_queue(),
            conversation.eligible_mask,
            conversation.reserved_for(),
        );
        match reserved {
            Some((agent, _)) => {
                self.agents[agent as usize].reserved.insert(key);
            }
            None => {
                for index in 0..self.conv(slot).candidates.len() {
                    if mask & (1 << index) != 0 {
                        let lane = self.conv(slot).candidates[index].1;
                        lane_channel(&mut self.lanes[lane as usize], channel)
                            .waiting
                            .insert(key);
                    }
                }
            }
        }
        let queue = &mut self.queues[home as usize];
        queue.by_priority.add(key.priority.0);
        queue.by_age.insert((key.since, key.seq));
        self.conv_mut(slot).indexed = true;
    }

    pub(super) fn unindex_conversation(&mut self, slot: u32) {
        let conversation = self.conv(slot);
        if !conversation.indexed {
            return;
        }
        let key = conversation.key(slot);
        let (channel, home, mask, reserved) = (
            conversation.channel,
            conversation.home_queue(),
            conversation.eligible_mask,
            conversation.reserved_for(),
        );
        match reserved {
            Some((agent, _)) => {
                self.agents[agent as usize].reserved.remove(&key);
            }
            None => {
                for index in 0..self.conv(slot).candidates.len() {
                    if mask & (1 << index) != 0 {
                        let lane = self.conv(slot).candidates[index].1;
                        lane_channel(&mut self.lanes[lane as usize], channel)
                            .waiting
                            .remove(&key);
                    }
                }
            }
        }
        let queue = &mut self.queues[home as usize];
        queue.by_priority.remove(key.priority.0);
        queue.by_age.remove((key.since, key.seq));
        self.conv_mut(slot).indexed = false;
    }

    /// Puts an agent into the `free` set of every lane and channel where it has room.
    pub(super) fn index_agent(&mut self, agent: u32) {
        let state = &self.agents[agent as usize];
        debug_assert!(state.free_entries.is_empty());
        if state.presence != Presence::Available || state.load_total >= state.config.max_total {
            return;
        }
        // Reuses the list's allocation from the last time the agent was taken out.
        let mut entries = std::mem::take(&mut self.agents[agent as usize].free_entries);
        let state = &self.agents[agent as usize];
        for &(lane, skill_score) in &state.lanes {
            let queue = self.lanes[lane as usize].queue;
            let queue_state = &self.queues[queue as usize];
            for channel in 0..state.capacity.len() as u32 {
                if !state.has_room(channel)
                    || !queue_state.config.accepts(&self.channels[channel as usize])
                {
                    continue;
                }
                let idle = state.last_offer_at.0;
                let (primary, secondary) = match queue_state.config.strategy {
                    Strategy::LongestIdle => (idle, 0),
                    Strategy::LeastOccupied => (
                        (u64::from(state.load_total) << 16) / u64::from(state.config.max_total),
                        idle,
                    ),
                    Strategy::RoundRobin => (
                        state
                            .serves
                            .iter()
                            .find(|(q, _)| *q == queue)
                            .map_or(0, |(_, turn)| *turn),
                        0,
                    ),
                    Strategy::MostSkilled => (u64::from(u32::MAX - skill_score), idle),
                };
                entries.push((
                    lane,
                    channel,
                    FreeKey {
                        primary,
                        secondary,
                        agent,
                    },
                ));
            }
        }
        for &(lane, channel, key) in &entries {
            lane_channel(&mut self.lanes[lane as usize], channel)
                .free
                .insert(key);
        }
        self.agents[agent as usize].free_entries = entries;
    }

    pub(super) fn unindex_agent(&mut self, agent: u32) {
        let mut entries = std::mem::take(&mut self.agents[agent as usize].free_entries);
        for &(lane, channel, key) in &entries {
            lane_channel(&mut self.lanes[lane as usize], channel)
                .free
                .remove(&key);
        }
        // Empty, keeping its allocation for the next `index_agent`.
        entries.clear();
        self.agents[agent as usize].free_entries = entries;
    }

    /// Adds `delta` to an agent's load on a channel, keeping the free-agent index right.
    pub(super) fn change_load(&mut self, agent: u32, channel: u32, delta: i32) {
        self.unindex_agent(agent);
        add_load(&mut self.agents[agent as usize], channel, delta);
        self.index_agent(agent);
    }

    fn adjust_staffing(&mut self, agent: u32, from: Presence, to: Presence) {
        let sign: i64 = match (from == Presence::Available, to == Presence::Available) {
            (false, true) => 1,
            (true, false) => -1,
            _ => return,
        };
        let state = &self.agents[agent as usize];
        for &(queue, _) in &state.serves {
            let staffed = &mut self.queues[queue as usize].staffed;
            if staffed.len() < state.capacity.len() {
                staffed.resize(state.capacity.len(), 0);
            }
            for (channel, &slots) in state.capacity.iter().enumerate() {
                staffed[channel] =
                    (i64::from(staffed[channel]) + sign * i64::from(slots)).max(0) as u32;
            }
        }
    }

    // ----- interning and lookups ------------------------------------------------------------------

    pub(super) fn intern_channel(&mut self, channel: &Channel) -> u32 {
        if let Some(&index) = self.channel_index.get(channel) {
            return index;
        }
        let index = self.channels.len() as u32;
        self.channels.push(channel.clone());
        self.channel_index.insert(channel.clone(), index);
        index
    }

    /// A conversation's language tag as an `Arc` shared with the other conversations in that language.
    /// Tags are few, so a short list of the ones seen lately spares most conversations an allocation;
    /// the list is bounded, so unusual tags cost nothing beyond their own conversations.
    pub(super) fn shared_language(&mut self, tag: &str) -> Arc<str> {
        if let Some(known) = self.recent_languages.iter().find(|known| ***known == *tag) {
            return Arc::clone(known);
        }
        if self.recent_languages.len() == RECENT_LANGUAGES {
            self.recent_languages.remove(0);
        }
        let tag: Arc<str> = Arc::from(tag);
        self.recent_languages.push(Arc::clone(&tag));
        tag
    }

    pub(super) fn intern_class(&mut self, class: Class) -> u32 {
        if let Some(&index) = self.class_index.get(&class) {
            return index;
        }
        let index = self.classes.len() as u32;
        self.classes.push(class.clone());
        self.class_index.insert(class, index);
        index
    }

    /// The lane for (queue, class), created with its qualified agents on first use.
    pub(super) fn lane_for(&mut self, queue: u32, class: u32) -> u32 {
        if let Some(&lane) = self.lane_index.get(&(queue, class)) {
            return lane;
        }
        let lane = self.lanes.len() as u32;
        self.lanes.push(Lane {
            queue,
            channels: Vec::new(),
        });
        self.lane_index.insert((queue, class), lane);
        self.queues[queue as usize].lanes.push(lane);
        for agent in 0..self.agents.len() as u32 {
            let Some(score) = self.qualification(agent, queue, class) else {
                continue;
            };
            self.unindex_agent(agent);
            self.agents[agent as usize].lanes.push((lane, score));
            self.index_agent(agent);
        }
        lane
    }

    /// `Some(summed skill level)` if the agent serves the queue and meets the class's requirements.
    fn qualification(&self, agent: u32, queue: u32, class: u32) -> Option<u32> {
        let state = &self.agents[agent as usize];
        if !state.serves.iter().any(|(served, _)| *served == queue) {
            return None;
        }
        let class = &self.classes[class as usize];
        if let Some(language) = &class.language
            && !state
                .config
                .languages
                .iter()
                .any(|spoken| rules::primary_language(spoken) == *language)
        {
            return None;
        }
        let level = |skill: &str| {
            state
                .config
                .skills
                .iter()
                .find(|(name, _)| &**name == skill)
                .map(|(_, level)| *level)
        };
        let mut score = 0u32;
        for requirement in class
            .skills
            .iter()
            .chain(&self.queues[queue as usize].config.required_skills)
        {
            match level(&requirement.skill) {
                Some(level) if level >= requirement.min_level => score += u32::from(level),
                _ => return None,
            }
        }
        Some(score)
    }

    /// The outcome's queues that accept the channel (at most 32), each with its lane for `class`;
    /// else the default queues that do; else the first queue named.
    fn candidates_for(&mut self, outcome: OutcomeId, channel: &Channel, class: u32) -> Candidates {
        let mut candidates = Candidates::default();
        for list in [outcome, self.rules.default_outcome()] {
            for index in 0..self.rules.outcome(list).queues.len() {
                let queue = self.rules.outcome(list).queues[index];
                if candidates.len() < 32 && self.queues[queue as usize].config.accepts(channel) {
                    let lane = self.lane_for(queue, class);
                    candidates.push((queue, lane));
                }
            }
            if !candidates.is_empty() {
                return candidates;
            }
        }
        let queue = [outcome, self.rules.default_outcome()]
            .into_iter()
            .find_map(|list| self.rules.outcome(list).queues.first().copied())
            .unwrap_or(0);
        let lane = self.lane_for(queue, class);
        Candidates::one((queue, lane))
    }

    /// The requirement class of an arrival: the outcome's skills, plus the customer's language when
    /// the rule requires it and some configured agent speaks it.
    fn class_for(&mut self, outcome: OutcomeId, language: Option<&str>) -> u32 {
        let base = self.outcome_classes[outcome.index()];
        let Some(tag) = language.filter(|_| self.rules.outcome(outcome).require_language) else {
            return base;
        };
        let primary = rules::primary_subtag(tag);
        let Some(spoken) = self
            .spoken_languages
            .iter()
            .position(|spoken| spoken.eq_ignore_ascii_case(primary))
        else {
            return base;
        };
        let spoken = spoken as u32;
        if let Some(&(_, class)) = self
            .language_classes
            .get(&base)
            .and_then(|known| known.iter().find(|(language, _)| *language == spoken))
        {
            return class;
        }
        let class = self.intern_class(Class {
            skills: self.classes[base as usize].skills.clone(),
            language: Some(self.spoken_languages[spoken as usize].clone()),
        });
        self.language_classes
            .entry(base)
            .or_default()
            .push((spoken, class));
        class
    }

    /// Home is always eligible; later candidates whose overflow time is zero are eligible at once.
    fn initial_mask(&self, candidates: &[(u32, u32)]) -> u32 {
        candidates
            .iter()
            .enumerate()
            .filter(|(index, (queue, _))| {
                *index == 0 || self.queues[*queue as usize].config.overflow_after == Millis::ZERO
            })
            .fold(0, |mask, (index, _)| mask | (1 << index))
    }

    pub(super) fn insert_conversation(&mut self, conversation: Conversation) -> u32 {
        let id = conversation.id;
        let slot = match self.free_slots.pop() {
            Some(slot) => {
                self.conversations[slot as usize] = Some(conversation);
                slot
            }
            None => {
                self.conversations.push(Some(conversation));
                (self.conversations.len() - 1) as u32
            }
        };
        self.slot_of.insert(id, slot);
        slot
    }

    fn remove_conversation(&mut self, slot: u32) {
        if let Some(conversation) = self.conversations[slot as usize].take() {
            self.slot_of.remove(conversation.id);
            self.free_slots.push(slot);
        }
    }

    pub(super) fn conv(&self, slot: u32) -> &Conversation {
        match &self.conversations[slot as usize] {
            Some(conversation) => conversation,
            None => unreachable_state(),
        }
    }

    pub(super) fn conv_mut(&mut self, slot: u32) -> &mut Conversation {
        match &mut self.conversations[slot as usize] {
            Some(conversation) => conversation,
            None => unreachable_state(),
        }
    }

    fn slot(&self, id: ConversationId) -> Result<u32, CommandError> {
        self.slot_of
            .get(id)
            .ok_or(CommandError::UnknownConversation(id))
    }

    fn agent_slot(&self, agent: &AgentId) -> Result<u32, CommandError> {
        self.agent_index
            .get(agent)
            .copied()
            .ok_or_else(|| CommandError::UnknownAgent(agent.clone()))
    }

    fn queue_slot(&self, queue: &QueueName) -> Result<u32, CommandError> {
        self.queue_index
            .get(queue)
            .copied()
            .ok_or_else(|| CommandError::UnknownQueue(queue.clone()))
    }

    /// The conversation, if it is offered to this agent right now.
    fn offered_to(&self, agent: &AgentId, id: ConversationId) -> Result<(u32, u32), CommandError> {
        let agent_slot = self.agent_slot(agent)?;
        let slot = self.slot(id)?;
        match self.conv(slot).state {
            ConvState::Offered { agent: offered, .. } if offered == agent_slot => {
                Ok((slot, agent_slot))
            }
            _ => Err(CommandError::NotOffered {
                conversation: id,
                agent: agent.clone(),
            }),
        }
    }

    /// The conversation, if this agent owns it: (slot, agent slot, serving queue, assigned since).
    fn owned_by(
        &self,
        agent: &AgentId,
        id: ConversationId,
    ) -> Result<(u32, u32, u32, Timestamp), CommandError> {
        let agent_slot = self.agent_slot(agent)?;
        let slot = self.slot(id)?;
        match self.conv(slot).state {
            ConvState::Assigned {
                agent: owner,
                queue,
                since,
            } if owner == agent_slot => Ok((slot, agent_slot, queue, since)),
            _ => Err(CommandError::NotOwner {
                conversation: id,
                agent: agent.clone(),
            }),
        }
    }
}

impl QueueState {
    fn record_handle_time(&mut self, handle_time: Millis) {
        if self.handle_times.len() == HANDLE_TIME_WINDOW
            && let Some(oldest) = self.handle_times.pop_front()
        {
            self.handle_time_sum -= oldest;
        }
        self.handle_times.push_back(handle_time.0);
        self.handle_time_sum += handle_time.0;
    }

    /// The recent handle times, oldest first (for snapshots).
    pub(super) fn recent_handle_times(&self) -> Vec<Millis> {
        self.handle_times.iter().copied().map(Millis).collect()
    }

    /// Replaces the recent handle times with saved ones (the newest window of them), oldest first.
    pub(super) fn restore_handle_times(&mut self, times: &[Millis]) {
        let newest = &times[times.len().saturating_sub(HANDLE_TIME_WINDOW)..];
        self.handle_times = newest.iter().map(|time| time.0).collect();
        self.handle_time_sum = self.handle_times.iter().sum();
    }

    /// Mean of the recent handle times, or the configured default before any was seen.
    pub(super) fn average_handle_time(&self) -> Millis {
        match self.handle_times.len() as u64 {
            0 => self.config.default_handle_time,
            count => Millis(self.handle_time_sum / count),
        }
    }

    /// Estimated wait at `position`: the conversations ahead are served by the staffed slots of this
    /// channel in parallel, each taking the recent average handle time.
    pub(super) fn estimated_wait(&self, position: u32, channel: u32) -> Millis {
        let slots = u64::from(
            self.staffed
                .get(channel as usize)
                .copied()
                .unwrap_or(0)
                .max(1),
        );
        Millis(u64::from(position) * self.average_handle_time().0 / slots)
    }
}

fn add_load(state: &mut AgentState, channel: u32, delta: i32) {
    let index = channel as usize;
    if state.load.len() <= index {
        state.load.resize(index + 1, 0);
    }
    state.load[index] = (i32::from(state.load[index]) + delta).max(0) as u16;
    state.load_total = (i32::from(state.load_total) + delta).max(0) as u16;
}

fn lane_channel(lane: &mut Lane, channel: u32) -> &mut LaneChannel {
    let index = channel as usize;
    if lane.channels.len() <= index {
        lane.channels.resize_with(index + 1, LaneChannel::default);
    }
    &mut lane.channels[index]
}

/// The router's own bookkeeping disagrees with itself: a bug, never caused by input.
#[cold]
fn unreachable_state() -> ! {
    panic!("router state inconsistent: a slot referenced by an index is empty or in another state")
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_keep_two_inline_then_spill_in_order() {
        let mut candidates = Candidates::one((3, 30));
        assert_eq!(&*candidates, &[(3, 30)]);
        candidates.push((5, 50));
        assert!(matches!(candidates, Candidates::Inline { len: 2, .. }));
        candidates.push((7, 70));
        candidates.push((9, 90));
        assert!(matches!(candidates, Candidates::Spilled(_)));
        assert_eq!(&*candidates, &[(3, 30), (5, 50), (7, 70), (9, 90)]);
        let collected: Candidates = [(1, 10), (2, 20), (4, 40)].into_iter().collect();
        assert_eq!(&*collected, &[(1, 10), (2, 20), (4, 40)]);
        // The common conversation pays nothing beyond the pairs' own size.
        assert_eq!(size_of::<Candidates>(), size_of::<Vec<(u32, u32)>>());
    }

    #[test]
    fn conversation_slots_span_chunks_without_moving() {
        let mut slots = ConversationSlots::default();
        for _ in 0..SLOT_CHUNK + 2 {
            slots.push(None);
        }
        assert_eq!(slots.len(), SLOT_CHUNK + 2);
        assert_eq!(slots.chunks.len(), 2);
        let first_chunk = slots.chunks[0].as_ptr();
        slots[SLOT_CHUNK + 1] = Some(test_conversation());
        assert!(slots[SLOT_CHUNK + 1].is_some() && slots[SLOT_CHUNK].is_none());
        for _ in 0..SLOT_CHUNK {
            slots.push(None);
        }
        assert_eq!(
            slots.chunks[0].as_ptr(),
            first_chunk,
            "a full chunk never moves"
        );
        assert_eq!(slots.iter().count(), slots.len());
        assert_eq!(slots.iter().flatten().count(), 1);
    }

    fn test_conversation() -> Conversation {
        Conversation {
            id: ConversationId(1),
            seq: 0,
            channel: 0,
            class: 0,
            language: None,
            priority: 0,
            base_priority: 0,
            since: Timestamp(0),
            candidates: Candidates::one((0, 0)),
            eligible_mask: 1,
            state: ConvState::Waiting,
            next_step: 0,
            sla_breached: false,
            repeats: 0,
            keyword_boosted: false,
            wording_boosted: false,
            detours: None,
            last_agent: None,
            wait_check_at: None,
            indexed: false,
            reasons: Vec::new(),
            tags: Arc::from([]),
        }
    }

    #[test]
    fn detours_are_boxed_only_while_something_is_in_them() {
        let mut detours = Detours::default().boxed();
        assert!(detours.is_none());
        detours = Detours {
            follower: Some(4),
            ..Detours::default()
        }
        .boxed();
        assert!(detours.is_some());
        let mut conversation = test_conversation();
        conversation.set_reserved_for(None);
        assert!(conversation.detours.is_none());
        conversation.exclude(2, Timestamp(100));
        conversation.set_reserved_for(Some((3, Timestamp(50))));
        // An exclusion lasts until the wait check at its end expires it, not merely until the clock passes.
        assert!(conversation.is_excluded(2));
        conversation.expire_detours(Timestamp(50));
        assert_eq!(conversation.reserved_for(), None);
        assert_eq!(conversation.excluded(), &[(2, Timestamp(100))]);
        assert!(conversation.is_excluded(2));
        conversation.set_follower(4);
        conversation.clear_exclusions();
        assert_eq!(conversation.take_follower(), Some(4));
        assert!(conversation.detours.is_none(), "dropped once empty");
    }
}
