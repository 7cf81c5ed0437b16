//! Looking into the router from outside: read-only views, snapshots for restore, and the invariant audit.
//!
//! A [`RouterSnapshot`] holds everything that is not configuration. [`Router::restore`] rebuilds a
//! router from a configuration and a snapshot; the daemon uses it for restart recovery (from its
//! store), and the router itself for `ReplaceConfig`, so both paths are one.

use std::cmp::Reverse;
use std::collections::{BTreeSet, HashMap};

use super::command::{CommandError, Effect, OfferEnd, PriorityReason, TimerKey};
use super::config::RoutingConfig;
use super::model::{
    AgentId, Channel, ConversationId, Presence, Priority, QueueName, SkillRequirement,
};
use super::router::{Candidates, Class, ConvState, Conversation, Detours, Router};
use super::time::{Millis, Timestamp};

/// Where a conversation stands, by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConversationState {
    Waiting,
    Offered {
        agent: AgentId,
        queue: QueueName,
        deadline: Timestamp,
    },
    Assigned {
        agent: AgentId,
        queue: QueueName,
        since: Timestamp,
    },
    Resolved {
        agent: AgentId,
        at: Timestamp,
    },
}

/// Everything about one conversation that survives a restart or a configuration change.
#[derive(Debug, Clone, PartialEq)]
pub struct ConversationSnapshot {
    pub id: ConversationId,
    pub seq: u64,
    pub channel: Channel,
    pub language: Option<String>,
    pub skills: Vec<SkillRequirement>,
    /// The language agents must speak, if the routing rule required it.
    pub required_language: Option<String>,
    pub priority: Priority,
    pub base_priority: Priority,
    pub since: Timestamp,
    pub candidates: Vec<QueueName>,
    pub eligible_mask: u32,
    pub state: ConversationState,
    pub next_step: u16,
    pub sla_breached: bool,
    pub repeats: u8,
    pub keyword_boosted: bool,
    pub wording_boosted: bool,
    pub excluded: Vec<(AgentId, Timestamp)>,
    pub reserved_for: Option<(AgentId, Timestamp)>,
    pub follower: Option<AgentId>,
    pub last_agent: Option<AgentId>,
    pub reasons: Vec<PriorityReason>,
    pub tags: Vec<String>,
}

/// An agent's run-time state (the configuration says who they are).
#[derive(Debug, Clone, PartialEq)]
pub struct AgentSnapshot {
    pub id: AgentId,
    pub presence: Presence,
    pub missed: u32,
    pub last_offer_at: Timestamp,
    /// Wrap-ups in progress: conversation, its channel, until when.
    pub wrap_ups: Vec<(ConversationId, Channel, Timestamp)>,
    /// Round-robin turns: per queue served, the router's offer counter at this agent's last offer
    /// from it (0: never). The lowest turn goes next on a round-robin queue.
    pub turns: Vec<(QueueName, u64)>,
}

/// A queue's run-time state: the recent handle times its estimated waits are computed from.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueSnapshot {
    pub name: QueueName,
    /// Oldest first; at most the window the router keeps.
    pub recent_handle_times: Vec<Millis>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct RouterSnapshot {
    pub conversations: Vec<ConversationSnapshot>,
    pub agents: Vec<AgentSnapshot>,
    pub queues: Vec<QueueSnapshot>,
}

/// A conversation as the API and supervisors see it.
#[derive(Debug, Clone, PartialEq)]
pub struct ConversationView {
    pub id: ConversationId,
    pub channel: Channel,
    pub state: ConversationState,
    pub priority: Priority,
    pub since: Timestamp,
    pub queue: QueueName,
    pub reasons: Vec<PriorityReason>,
    pub tags: Vec<String>,
    pub follower: Option<AgentId>,
}

/// An agent's live state.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentView {
    pub id: AgentId,
    pub name: String,
    pub presence: Presence,
    /// In wrap-up after a resolve (holding capacity).
    pub wrapping_up: bool,
    /// (channel, load, capacity) for each channel the agent has capacity on.
    pub load: Vec<(Channel, u16, u16)>,
    pub load_total: u16,
    pub max_total: u16,
    pub offers: Vec<ConversationId>,
    pub assigned: Vec<ConversationId>,
    pub missed: u32,
}

/// A queue's live state.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueView {
    pub name: QueueName,
    pub open: bool,
    /// Unanswered conversations waiting with this queue as home.
    pub waiting: u32,
    pub oldest_since: Option<Timestamp>,
    /// Available agents serving it.
    pub agents_available: u32,
    pub average_handle_time: Millis,
    pub sla_target: Millis,
}

impl Router {
    /// Rebuilds a router from a configuration and a snapshot at `now`, re-emitting every timer with its
    /// original deadline, then offering whatever is routable.
    ///
    /// What no longer fits the configuration is repaired, never dropped: a conversation whose queues
    /// are gone goes to the default queues; an offer or assignment held by an unknown agent returns to
    /// waiting with its place kept; offers to agents who are not available are withdrawn.
    pub fn restore(
        config: RoutingConfig,
        snapshot: RouterSnapshot,
        now: Timestamp,
        effects: &mut Vec<Effect>,
    ) -> Result<Router, CommandError> {
        let mut router = Router::build(config, now)?;
        for queue in 0..router.queues.len() as u32 {
            router.refresh_business_hours(now, queue, effects);
        }
        for saved in &snapshot.queues {
            if let Some(&queue) = router.queue_index.get(&saved.name) {
                router.queues[queue as usize].restore_handle_times(&saved.recent_handle_times);
            }
        }
        for agent in &snapshot.agents {
            let Some(&slot) = router.agent_index.get(&agent.id) else {
                continue;
            };
            for (name, turn) in &agent.turns {
                let Some(&queue) = router.queue_index.get(name) else {
                    continue;
                };
                let state = &mut router.agents[slot as usize];
                if let Some(entry) = state.serves.iter_mut().find(|(served, _)| *served == queue) {
                    entry.1 = *turn;
                }
                router.next_turn = router.next_turn.max(*turn);
            }
            let state = &mut router.agents[slot as usize];
            state.presence = agent.presence;
            state.missed = agent.missed;
            state.last_offer_at = agent.last_offer_at;
            for (conversation, channel, until) in &agent.wrap_ups {
                let channel = router.intern_channel(channel);
                router.agents[slot as usize]
                    .wrap_ups
                    .push(super::router::WrapUp {
                        conversation: *conversation,
                        channel,
                        until: *until,
                    });
                add_load_raw(&mut router.agents[slot as usize], channel);
                effects.push(Effect::ScheduleTimer {
                    key: TimerKey::WrapUp(agent.id.clone(), *conversation),
                    at: *until,
                });
            }
        }
        for agent in 0..router.agents.len() as u32 {
            if router.agents[agent as usize].presence == Presence::Available {
                let state = &router.agents[agent as usize];
                let (serves, capacity) = (state.serves.clone(), state.capacity.clone());
                for (queue, _) in serves {
                    let staffed = &mut router.queues[queue as usize].staffed;
                    if staffed.len() < capacity.len() {
                        staffed.resize(capacity.len(), 0);
                    }
                    for (channel, slots) in capacity.iter().enumerate() {
                        staffed[channel] += u32::from(*slots);
                    }
                }
            }
        }
        let mut conversations = snapshot.conversations;
        conversations.sort_by_key(|conversation| conversation.seq);
        let mut requeued = BTreeSet::new();
        for saved in conversations {
            let id = saved.id;
            if router.slot_of.contains(id) {
                continue;
            }
            router.next_seq = router.next_seq.max(saved.seq + 1);
            let (slot, displaced) = router.restore_conversation(saved, effects);
            if displaced {
                requeued.insert(slot);
            }
        }
        for agent in 0..router.agents.len() as u32 {
            // A lane first needed by a restored conversation indexed the available agents it qualifies
            // for before their offers, assignments and wrap-ups were loaded: drop those entries.
            router.unindex_agent(agent);
            router.index_agent(agent);
        }
        for slot in 0..router.conversations.len() as u32 {
            let Some(conversation) = &router.conversations[slot as usize] else {
                continue;
            };
            if conversation.state == ConvState::Waiting {
                if requeued.contains(&slot) {
                    router.enqueue(slot, effects);
                } else {
                    router.index_conversation(slot);
                }
            }
            if router.conv(slot).is_unanswered() {
                // Deadlines that passed while the router was down come due at once.
                router.conv_mut(slot).wait_check_at = None;
                router.reschedule_wait_check(now, slot, effects);
            }
        }
        router.serve_everyone(now, effects);
        Ok(router)
    }

    /// Inserts one saved conversation; returns its slot and whether it was displaced back to waiting.
    fn restore_conversation(
        &mut self,
        saved: ConversationSnapshot,
        effects: &mut Vec<Effect>,
    ) -> (u32, bool) {
        let channel = self.intern_channel(&saved.channel);
        let mut skills = saved.skills.clone();
        skills.sort();
        let class = self.intern_class(Class {
            skills,
            language: saved.required_language.clone(),
        });
        let mut queues: Vec<u32> = saved
            .candidates
            .iter()
            .filter_map(|name| self.queue_index.get(name).copied())
            .take(32)
            .collect();
        let mut mask = saved.eligible_mask;
        if queues.len() != saved.candidates.len() || queues.is_empty() {
            // Some candidate queue is gone: keep the ones left, else the default queues.
            if queues.is_empty() {
                queues = self
                    .config
                    .default_queues
                    .iter()
                    .filter_map(|name| self.queue_index.get(name).copied())
                    .take(1)
                    .collect();
            }
            mask = 1;
        }
        let candidates: Candidates = queues
            .into_iter()
            .map(|queue| (queue, self.lane_for(queue, class)))
            .collect();
        let agent = |router: &Router, id: &AgentId| router.agent_index.get(id).copied();
        let mut displaced = false;
        let state = match &saved.state {
            ConversationState::Waiting => ConvState::Waiting,
            ConversationState::Offered {
                agent: who,
                queue,
                deadline,
            } => match (agent(self, who), self.queue_index.get(queue).copied()) {
                (Some(holder), Some(queue))
                    if self.agents[holder as usize].presence == Presence::Available =>
                {
                    effects.push(Effect::ScheduleTimer {
                        key: TimerKey::Offer(saved.id),
                        at: *deadline,
                    });
                    ConvState::Offered {
                        agent: holder,
                        queue,
                        deadline: *deadline,
                    }
                }
                _ => {
                    effects.push(Effect::CancelTimer {
                        key: TimerKey::Offer(saved.id),
                    });
                    effects.push(Effect::OfferWithdrawn {
                        conversation: saved.id,
                        agent: who.clone(),
                        reason: OfferEnd::Reconfigured,
                    });
                    displaced = true;
                    ConvState::Waiting
                }
            },
            ConversationState::Assigned {
                agent: who,
                queue,
                since,
            } => match agent(self, who) {
                Some(owner) => ConvState::Assigned {
                    agent: owner,
                    queue: self
                        .queue_index
                        .get(queue)
                        .copied()
                        .unwrap_or(candidates[0].0),
                    since: *since,
                },
                None => {
                    displaced = true;
                    ConvState::Waiting
                }
            },
            ConversationState::Resolved { agent: who, at } => match agent(self, who) {
                Some(owner) => {
                    effects.push(Effect::ScheduleTimer {
                        key: TimerKey::ReopenWindow(saved.id),
                        at: *at + self.config.reopen.window,
                    });
                    ConvState::Resolved {
                        agent: owner,
                        at: *at,
                    }
                }
                None => {
                    effects.push(Effect::Closed {
                        conversation: saved.id,
                    });
                    effects.push(Effect::CancelTimer {
                        key: TimerKey::ReopenWindow(saved.id),
                    });
                    return (u32::MAX, false);
                }
            },
        };
        let agents_of = |router: &Router, list: &[(AgentId, Timestamp)]| -> Vec<(u32, Timestamp)> {
            list.iter()
                .filter_map(|(id, until)| agent(router, id).map(|slot| (slot, *until)))
                .collect()
        };
        let conversation = Conversation {
            id: saved.id,
            seq: saved.seq,
            channel,
            class,
            language: saved
                .language
                .as_deref()
                .map(|tag| self.shared_language(tag)),
            priority: saved.priority,
            base_priority: saved.base_priority,
            since: saved.since,
            eligible_mask: mask | 1,
            candidates,
            state,
            next_step: saved.next_step,
            sla_breached: saved.sla_breached,
            repeats: saved.repeats,
            keyword_boosted: saved.keyword_boosted,
            wording_boosted: saved.wording_boosted,
            detours: Detours {
                excluded: agents_of(self, &saved.excluded),
                reserved_for: saved
                    .reserved_for
                    .as_ref()
                    .and_then(|(id, until)| agent(self, id).map(|slot| (slot, *until))),
                follower: saved.follower.as_ref().and_then(|id| agent(self, id)),
            }
            .boxed(),
            last_agent: saved.last_agent.as_ref().and_then(|id| agent(self, id)),
            wait_check_at: None,
            indexed: false,
            reasons: saved.reasons,
            tags: saved
                .tags
                .iter()
                .map(|tag| std::sync::Arc::from(tag.as_str()))
                .collect(),
        };
        let slot = self.insert_conversation(conversation);
        match self.conv(slot).state {
            ConvState::Offered { agent, .. } => {
                self.agents[agent as usize].offers.push(slot);
                add_load_raw(&mut self.agents[agent as usize], channel);
            }
            ConvState::Assigned { agent, .. } => {
                self.agents[agent as usize].assigned.push(slot);
                add_load_raw(&mut self.agents[agent as usize], channel);
            }
            ConvState::Waiting | ConvState::Resolved { .. } => {}
        }
        (slot, displaced)
    }

    /// Offers waiting work to every available agent (after a restore), in agent order.
    fn serve_everyone(&mut self, now: Timestamp, effects: &mut Vec<Effect>) {
        for agent in 0..self.agents.len() as u32 {
            self.serve_agent(now, agent, effects);
        }
    }

    /// Everything the router holds besides its configuration. Conversations are listed in arrival
    /// order, so equal states give equal snapshots whatever slots they happen to occupy.
    pub fn snapshot(&self) -> RouterSnapshot {
        let mut conversations: Vec<ConversationSnapshot> = self
            .conversations
            .iter()
            .flatten()
            .map(|conversation| self.snapshot_of(conversation))
            .collect();
        conversations.sort_unstable_by_key(|conversation| conversation.seq);
        RouterSnapshot {
            conversations,
            agents: self
                .agents
                .iter()
                .filter_map(|agent| self.agent_snapshot(&agent.id))
                .collect(),
            queues: self
                .queues
                .iter()
                .map(|queue| QueueSnapshot {
                    name: queue.config.name.clone(),
                    recent_handle_times: queue.recent_handle_times(),
                })
                .collect(),
        }
    }

    /// One queue's part of [`Router::snapshot`]; `None` for a queue not in the configuration.
    pub fn queue_snapshot(&self, name: &QueueName) -> Option<QueueSnapshot> {
        let queue = &self.queues[*self.queue_index.get(name)? as usize];
        Some(QueueSnapshot {
            name: queue.config.name.clone(),
            recent_handle_times: queue.recent_handle_times(),
        })
    }

    /// One conversation's part of [`Router::snapshot`]; `None` once the router forgot it.
    pub fn conversation_snapshot(&self, id: ConversationId) -> Option<ConversationSnapshot> {
        Some(self.snapshot_of(self.conv(self.slot_of.get(id)?)))
    }

    /// One agent's part of [`Router::snapshot`].
    pub fn agent_snapshot(&self, id: &AgentId) -> Option<AgentSnapshot> {
        let agent = &self.agents[*self.agent_index.get(id)? as usize];
        Some(AgentSnapshot {
            id: agent.id.clone(),
            presence: agent.presence,
            missed: agent.missed,
            last_offer_at: agent.last_offer_at,
            wrap_ups: agent
                .wrap_ups
                .iter()
                .map(|wrap_up| {
                    (
                        wrap_up.conversation,
                        self.channels[wrap_up.channel as usize].clone(),
                        wrap_up.until,
                    )
                })
                .collect(),
            turns: agent
                .serves
                .iter()
                .filter(|(_, turn)| *turn != 0)
                .map(|(queue, turn)| (self.queues[*queue as usize].config.name.clone(), *turn))
                .collect(),
        })
    }

    fn snapshot_of(&self, conversation: &Conversation) -> ConversationSnapshot {
        let agent_id = |slot: u32| self.agents[slot as usize].id.clone();
        let class = &self.classes[conversation.class as usize];
        ConversationSnapshot {
            id: conversation.id,
            seq: conversation.seq,
            channel: self.channels[conversation.channel as usize].clone(),
            language: conversation.language.as_deref().map(str::to_owned),
            skills: class.skills.clone(),
            required_language: class.language.clone(),
            priority: conversation.priority,
            base_priority: conversation.base_priority,
            since: conversation.since,
            candidates: conversation
                .candidates
                .iter()
                .map(|(queue, _)| self.queues[*queue as usize].config.name.clone())
                .collect(),
            eligible_mask: conversation.eligible_mask,
            state: self.state_of(conversation),
            next_step: conversation.next_step,
            sla_breached: conversation.sla_breached,
            repeats: conversation.repeats,
            keyword_boosted: conversation.keyword_boosted,
            wording_boosted: conversation.wording_boosted,
            excluded: conversation
                .excluded()
                .iter()
                .map(|(agent, until)| (agent_id(*agent), *until))
                .collect(),
            reserved_for: conversation
                .reserved_for()
                .map(|(agent, until)| (agent_id(agent), until)),
            follower: conversation.follower().map(agent_id),
            last_agent: conversation.last_agent.map(agent_id),
            reasons: conversation.reasons.clone(),
            tags: conversation
                .tags
                .iter()
                .map(|tag| tag.to_string())
                .collect(),
        }
    }

    fn state_of(&self, conversation: &Conversation) -> ConversationState {
        let agent_id = |slot: u32| self.agents[slot as usize].id.clone();
        let queue_name = |slot: u32| self.queues[slot as usize].config.name.clone();
        match conversation.state {
            ConvState::Waiting => ConversationState::Waiting,
            ConvState::Offered {
                agent,
                queue,
                deadline,
            } => ConversationState::Offered {
                agent: agent_id(agent),
                queue: queue_name(queue),
                deadline,
            },
            ConvState::Assigned {
                agent,
                queue,
                since,
            } => ConversationState::Assigned {
                agent: agent_id(agent),
                queue: queue_name(queue),
                since,
            },
            ConvState::Resolved { agent, at } => ConversationState::Resolved {
                agent: agent_id(agent),
                at,
            },
        }
    }

    pub fn conversation(&self, id: ConversationId) -> Option<ConversationView> {
        let conversation = self.conv(self.slot_of.get(id)?);
        let queue = match conversation.state {
            ConvState::Offered { queue, .. } | ConvState::Assigned { queue, .. } => queue,
            _ => conversation.home_queue(),
        };
        Some(ConversationView {
            id,
            channel: self.channels[conversation.channel as usize].clone(),
            state: self.state_of(conversation),
            priority: conversation.priority,
            since: conversation.since,
            queue: self.queues[queue as usize].config.name.clone(),
            reasons: conversation.reasons.clone(),
            tags: conversation
                .tags
                .iter()
                .map(|tag| tag.to_string())
                .collect(),
            follower: conversation
                .follower()
                .map(|agent| self.agents[agent as usize].id.clone()),
        })
    }

    /// Ids of every conversation the router holds (unanswered, assigned, or resolved within the window).
    pub fn conversation_ids(&self) -> impl Iterator<Item = ConversationId> + '_ {
        self.conversations
            .iter()
            .flatten()
            .map(|conversation| conversation.id)
    }

    pub fn conversation_count(&self) -> usize {
        self.slot_of.len()
    }

    /// Unanswered conversations not currently offered.
    pub fn waiting_count(&self) -> usize {
        self.queues.iter().map(|queue| queue.by_age.len()).sum()
    }

    pub fn agent(&self, id: &AgentId) -> Option<AgentView> {
        let agent = &self.agents[*self.agent_index.get(id)? as usize];
        let ids = |slots: &[u32]| slots.iter().map(|slot| self.conv(*slot).id).collect();
        Some(AgentView {
            id: agent.id.clone(),
            name: agent.config.name.clone(),
            presence: agent.presence,
            wrapping_up: !agent.wrap_ups.is_empty(),
            load: (0..agent.capacity.len() as u32)
                .filter(|&channel| agent.capacity_for(channel) > 0)
                .map(|channel| {
                    (
                        self.channels[channel as usize].clone(),
                        agent.load_for(channel),
                        agent.capacity_for(channel),
                    )
                })
                .collect(),
            load_total: agent.load_total,
            max_total: agent.config.max_total,
            offers: ids(&agent.offers),
            assigned: ids(&agent.assigned),
            missed: agent.missed,
        })
    }

    pub fn agents(&self) -> impl Iterator<Item = AgentView> + '_ {
        self.agents.iter().filter_map(|agent| self.agent(&agent.id))
    }

    pub fn queues(&self) -> Vec<QueueView> {
        self.queues
            .iter()
            .map(|queue| QueueView {
                name: queue.config.name.clone(),
                open: queue.open,
                waiting: queue.by_age.len() as u32,
                oldest_since: queue.by_age.first().map(|(since, _)| since),
                agents_available: self
                    .agents
                    .iter()
                    .filter(|agent| {
                        agent.presence == Presence::Available
                            && agent.serves.iter().any(|(served, _)| {
                                self.queues[*served as usize].config.name == queue.config.name
                            })
                    })
                    .count() as u32,
                average_handle_time: queue.average_handle_time(),
                sla_target: queue.config.sla_target,
            })
            .collect()
    }

    /// Where the conversation stands in its home queue right now (1 = next), and its estimated wait.
    pub fn queue_position(&self, id: ConversationId) -> Option<(u32, Millis)> {
        self.queue_positions(&[id]).pop().flatten()
    }

    /// [`Router::queue_position`] of many conversations at once, in one pass over the
    /// conversations (the daemon tells every waiting chat its place after each routing change).
    pub fn queue_positions(&self, ids: &[ConversationId]) -> Vec<Option<(u32, Millis)>> {
        /// A waiting conversation asked about: home queue, priority, order key, channel.
        type Asked = (u32, Priority, (Timestamp, u64), u32);
        let asked: Vec<Option<Asked>> = ids
            .iter()
            .map(|id| {
                let conversation = self.conv(self.slot_of.get(*id)?);
                (conversation.state == ConvState::Waiting).then(|| {
                    (
                        conversation.home_queue(),
                        conversation.priority,
                        (conversation.since, conversation.seq),
                        conversation.channel,
                    )
                })
            })
            .collect();
        // Per (home queue, priority) level asked about: the order keys of everyone waiting there.
        let mut levels: HashMap<(u32, Priority), Vec<(Timestamp, u64)>> = asked
            .iter()
            .flatten()
            .map(|(queue, priority, _, _)| ((*queue, *priority), Vec::new()))
            .collect();
        if !levels.is_empty() {
            for other in self.conversations.iter().flatten() {
                if other.state == ConvState::Waiting
                    && let Some(level) = levels.get_mut(&(other.home_queue(), other.priority))
                {
                    level.push((other.since, other.seq));
                }
            }
            for level in levels.values_mut() {
                level.sort_unstable();
            }
        }
        asked
            .iter()
            .map(|asked| {
                let (queue_index, priority, key, channel) = (*asked)?;
                let queue = &self.queues[queue_index as usize];
                // Everyone at a higher priority, then those level with it who wait longer.
                let higher = queue.by_priority.at_or_above(priority.saturating_add(1));
                let level_ahead = levels
                    .get(&(queue_index, priority))
                    .map_or(0, |level| level.partition_point(|other| *other < key));
                let position = higher + level_ahead as u32 + 1;
                Some((position, queue.estimated_wait(position, channel)))
            })
            .collect()
    }

    /// The conversation's place in the order of service: lower is served first.
    pub fn wait_rank(&self, id: ConversationId) -> Option<(Reverse<Priority>, Timestamp, u64)> {
        let conversation = self.conv(self.slot_of.get(id)?);
        Some((
            Reverse(conversation.priority),
            conversation.since,
            conversation.seq,
        ))
    }

    /// Could `agent` be offered this waiting conversation if it had room on its channel?
    pub fn is_eligible(&self, id: ConversationId, agent: &AgentId) -> bool {
        let (Some(slot), Some(&agent)) = (self.slot_of.get(id), self.agent_index.get(agent)) else {
            return false;
        };
        self.eligible(slot, agent)
    }

    fn eligible(&self, slot: u32, agent: u32) -> bool {
        let conversation = self.conv(slot);
        if conversation.state != ConvState::Waiting
            || self.agents[agent as usize].presence != Presence::Available
            || conversation.is_excluded(agent)
        {
            return false;
        }
        if let Some((reserved, _)) = conversation.reserved_for() {
            return reserved == agent;
        }
        conversation
            .candidates
            .iter()
            .enumerate()
            .any(|(index, &(queue, lane))| {
                let queue = &self.queues[queue as usize];
                conversation.eligible_mask & (1 << index) != 0
                    && queue.open
                    && queue
                        .config
                        .accepts(&self.channels[conversation.channel as usize])
                    && self.agents[agent as usize]
                        .lanes
                        .iter()
                        .any(|&(agent_lane, _)| agent_lane == lane)
            })
    }

    /// Checks every invariant the router promises, by brute force. For tests; O(conversations × agents).
    ///
    /// * no agent above capacity, per channel or in total, nor with two wrap-ups for one conversation
    ///   (they would share one timer);
    /// * every conversation is in exactly one state, and each offered/assigned one is held by exactly
    ///   that agent (no two owners, no two live offers);
    /// * indexes agree with the states (waiting ones indexed exactly where eligible, nothing else);
    /// * work-conserving: no waiting conversation is eligible for an agent with room on its channel.
    pub fn audit(&self) -> Result<(), String> {
        let mut holders = HashMap::new();
        for (slot, agent) in self.agents.iter().enumerate() {
            let mut load = vec![0u16; agent.capacity.len().max(agent.load.len())];
            for &conversation in agent.offers.iter().chain(&agent.assigned) {
                if let Some(previous) = holders.insert(conversation, slot) {
                    return Err(format!(
                        "conversation slot {conversation} held by agents {previous} and {slot}"
                    ));
                }
                let state = self.conv(conversation).state;
                let held = match state {
                    ConvState::Offered { agent, .. } | ConvState::Assigned { agent, .. } => {
                        agent as usize == slot
                    }
                    _ => false,
                };
                if !held {
                    return Err(format!(
                        "agent {} lists conversation {:?} in state {state:?}",
                        agent.id,
                        self.conv(conversation).id
                    ));
                }
                load[self.conv(conversation).channel as usize] += 1;
            }
            for (index, wrap_up) in agent.wrap_ups.iter().enumerate() {
                load[wrap_up.channel as usize] += 1;
                // Its timer key is (agent, conversation): a second one would share the first's timer.
                if agent.wrap_ups[..index]
                    .iter()
                    .any(|earlier| earlier.conversation == wrap_up.conversation)
                {
                    return Err(format!(
                        "agent {} has two wrap-ups for conversation {:?}",
                        agent.id, wrap_up.conversation
                    ));
                }
            }
            for (channel, &count) in load.iter().enumerate() {
                if count != agent.load_for(channel as u32) {
                    return Err(format!(
                        "agent {} load on channel {channel} is {} but holds {count}",
                        agent.id,
                        agent.load_for(channel as u32)
                    ));
                }
                if count > agent.capacity_for(channel as u32) {
                    return Err(format!(
                        "agent {} above capacity on {}: {count}",
                        agent.id, self.channels[channel]
                    ));
                }
            }
            let total: u16 = load.iter().sum();
            if total != agent.load_total || total > agent.config.max_total {
                return Err(format!(
                    "agent {} total load {} (counted {total}, cap {})",
                    agent.id, agent.load_total, agent.config.max_total
                ));
            }
            let free_entries: usize = self
                .lanes
                .iter()
                .flat_map(|lane| lane.channels.iter())
                .map(|channel| {
                    channel
                        .free
                        .iter()
                        .filter(|key| key.agent as usize == slot)
                        .count()
                })
                .sum();
            let expected = if agent.presence == Presence::Available {
                agent
                    .lanes
                    .iter()
                    .map(|&(lane, _)| {
                        let queue = &self.queues[self.lanes[lane as usize].queue as usize];
                        (0..agent.capacity.len() as u32)
                            .filter(|&channel| {
                                agent.has_room(channel)
                                    && queue.config.accepts(&self.channels[channel as usize])
                            })
                            .count()
                    })
                    .sum()
            } else {
                0
            };
            if free_entries != expected {
                return Err(format!(
                    "agent {} is in {free_entries} free sets, expected {expected}",
                    agent.id
                ));
            }
        }
        let mut waiting_indexed = 0usize;
        for (slot, conversation) in self.conversations.iter().enumerate() {
            let Some(conversation) = conversation else {
                continue;
            };
            let slot = slot as u32;
            if self.slot_of.get(conversation.id) != Some(slot) {
                return Err(format!(
                    "conversation {:?} not found by id",
                    conversation.id
                ));
            }
            match conversation.state {
                ConvState::Offered { .. } | ConvState::Assigned { .. }
                    if !holders.contains_key(&slot) =>
                {
                    return Err(format!(
                        "conversation {:?} is {:?} but no agent holds it",
                        conversation.id, conversation.state
                    ));
                }
                ConvState::Waiting if !conversation.indexed => {
                    return Err(format!(
                        "waiting conversation {:?} is not indexed",
                        conversation.id
                    ));
                }
                ConvState::Waiting => waiting_indexed += 1,
                _ if conversation.indexed => {
                    return Err(format!(
                        "conversation {:?} indexed in state {:?}",
                        conversation.id, conversation.state
                    ));
                }
                _ => {}
            }
            if conversation.is_unanswered()
                && conversation.wait_check_at.is_some_and(|at| at < self.clock)
            {
                return Err(format!(
                    "conversation {:?} has a wait check in the past",
                    conversation.id
                ));
            }
            if conversation.state != ConvState::Waiting {
                continue;
            }
            let key = conversation.key(slot);
            let lanes_holding: BTreeSet<u32> = self
                .lanes
                .iter()
                .enumerate()
                .filter(|(_, lane)| {
                    lane.channels
                        .get(conversation.channel as usize)
                        .is_some_and(|channel| channel.waiting.contains(&key))
                })
                .map(|(index, _)| index as u32)
                .collect();
            let expected: BTreeSet<u32> = match conversation.reserved_for() {
                Some(_) => BTreeSet::new(),
                None => conversation
                    .candidates
                    .iter()
                    .enumerate()
                    .filter(|(index, _)| conversation.eligible_mask & (1 << index) != 0)
                    .map(|(_, (_, lane))| *lane)
                    .collect(),
            };
            if lanes_holding != expected {
                return Err(format!(
                    "conversation {:?} in lanes {lanes_holding:?}, expected {expected:?}",
                    conversation.id
                ));
            }
            for (agent_slot, agent) in self.agents.iter().enumerate() {
                if agent.has_room(conversation.channel) && self.eligible(slot, agent_slot as u32) {
                    return Err(format!(
                        "not work-conserving: conversation {:?} waits while agent {} has room and is eligible",
                        conversation.id, agent.id
                    ));
                }
            }
        }
        let lane_total: usize = self.queues.iter().map(|queue| queue.by_age.len()).sum();
        if lane_total != waiting_indexed {
            return Err(format!(
                "queues count {lane_total} waiting, {waiting_indexed} are waiting"
            ));
        }
        for (index, queue) in self.queues.iter().enumerate() {
            let home_waiting = self.conversations.iter().flatten().filter(|conversation| {
                conversation.state == ConvState::Waiting
                    && conversation.home_queue() == index as u32
            });
            let (count, oldest) = home_waiting.fold((0usize, None), |(count, oldest), c| {
                let age = (c.since, c.seq);
                (
                    count + 1,
                    Some(oldest.map_or(age, |known: (Timestamp, u64)| known.min(age))),
                )
            });
            let mut levels: Vec<(Priority, u32)> = Vec::new();
            for conversation in self.conversations.iter().flatten().filter(|conversation| {
                conversation.state == ConvState::Waiting
                    && conversation.home_queue() == index as u32
            }) {
                match levels.binary_search_by_key(&conversation.priority, |&(level, _)| level) {
                    Ok(at) => levels[at].1 += 1,
                    Err(at) => levels.insert(at, (conversation.priority, 1)),
                }
            }
            if queue.by_priority.levels() != levels.as_slice() {
                return Err(format!(
                    "queue {} counts {:?} waiting by priority; {levels:?} wait at home",
                    queue.config.name,
                    queue.by_priority.levels()
                ));
            }
            if queue.by_age.len() != count || queue.by_age.first() != oldest {
                return Err(format!(
                    "queue {} counts {} waiting, oldest {:?}; {count} wait at home, oldest {oldest:?}",
                    queue.config.name,
                    queue.by_age.len(),
                    queue.by_age.first()
                ));
            }
        }
        // Each waiting conversation was found above in exactly its lanes; equal totals then mean the
        // lanes hold nothing else (no key of a conversation that left).
        let mut in_lanes = 0usize;
        for (index, lane) in self.lanes.iter().enumerate() {
            for channel in &lane.channels {
                channel
                    .waiting
                    .audit()
                    .map_err(|problem| format!("lane {index}: {problem}"))?;
                in_lanes += channel.waiting.len();
            }
        }
        let expected_in_lanes: usize = self
            .conversations
            .iter()
            .flatten()
            .filter(|c| c.state == ConvState::Waiting && c.reserved_for().is_none())
            .map(|c| {
                let mut lanes: Vec<u32> = c
                    .candidates
                    .iter()
                    .enumerate()
                    .filter(|(index, _)| c.eligible_mask & (1 << index) != 0)
                    .map(|(_, (_, lane))| *lane)
                    .collect();
                lanes.sort_unstable();
                lanes.dedup();
                lanes.len()
            })
            .sum();
        if in_lanes != expected_in_lanes {
            return Err(format!(
                "lanes hold {in_lanes} waiting entries, {expected_in_lanes} expected"
            ));
        }
        let reserved: usize = self.agents.iter().map(|agent| agent.reserved.len()).sum();
        let expected_reserved = self
            .conversations
            .iter()
            .flatten()
            .filter(|c| c.state == ConvState::Waiting && c.reserved_for().is_some())
            .count();
        if reserved != expected_reserved {
            return Err(format!(
                "{reserved} reserved entries for {expected_reserved} reserved conversations"
            ));
        }
        Ok(())
    }
}

fn add_load_raw(agent: &mut super::router::AgentState, channel: u32) {
    let index = channel as usize;
    if agent.load.len() <= index {
        agent.load.resize(index + 1, 0);
    }
    agent.load[index] += 1;
    agent.load_total += 1;
}
