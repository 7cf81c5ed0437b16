//! Scenario tests for the routing semantics of DESIGN.md, one behaviour per test, in virtual time.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use switchboard::routing::config::{
    AgentConfig, EscalationAction, EscalationStep, KeywordBoost, QueueConfig, RoutingRule,
    RuleAction, RuleMatch,
};
use switchboard::routing::wording::{Lexicon, NegativeWording};
use switchboard::routing::{
    AgentId, Channel, Command, CommandError, ConversationId, ConversationState, Effect, MessageId,
    Millis, NewConversation, OfferEnd, Presence, PriorityReason, QueueName, Router, RoutingConfig,
    Strategy, TimerQueue, Timestamp, TransferTarget,
};

/// Drives a router like the daemon does: timers kept, fired as virtual time advances, effects recorded.
struct Harness {
    router: Router,
    timers: TimerQueue,
    now: Timestamp,
    effects: Vec<Effect>,
}

impl Harness {
    fn new(config: RoutingConfig) -> Harness {
        let mut effects = Vec::new();
        let router = Router::new(config, Timestamp(0), &mut effects).unwrap();
        let mut timers = TimerQueue::new();
        timers.apply(&effects);
        Harness {
            router,
            timers,
            now: Timestamp(0),
            effects,
        }
    }

    fn send(&mut self, command: Command) -> Result<Vec<Effect>, CommandError> {
        let mut effects = Vec::new();
        self.router.handle(self.now, command, &mut effects)?;
        self.timers.apply(&effects);
        self.router.audit().unwrap();
        self.effects.extend(effects.iter().cloned());
        Ok(effects)
    }

    /// Advances virtual time, firing timers as they come due; returns the effects produced.
    fn advance(&mut self, by: u64) -> Vec<Effect> {
        let until = Timestamp(self.now.0 + by * 1000);
        let mut produced = Vec::new();
        while let Some((at, key)) = self.timers.pop_due(until) {
            self.now = at;
            produced.extend(self.send(Command::TimerFired(key)).unwrap());
        }
        self.now = until;
        produced
    }

    fn online(&mut self, agent: &str) -> Vec<Effect> {
        self.send(Command::AgentPresence {
            agent: AgentId::new(agent),
            presence: Presence::Available,
        })
        .unwrap()
    }

    fn arrive(&mut self, id: u128, text: &str) -> Vec<Effect> {
        self.arrive_with(id, |new| new.text = text.to_owned())
    }

    fn arrive_with(&mut self, id: u128, edit: impl FnOnce(&mut NewConversation)) -> Vec<Effect> {
        let mut new = NewConversation {
            id: ConversationId(id),
            message: MessageId(id),
            channel: Channel::Chat,
            provider: "webchat".into(),
            to_address: "site".into(),
            customer_tier: None,
            language: None,
            subject: None,
            text: "hello".into(),
        };
        edit(&mut new);
        self.send(Command::Arrive(Box::new(new))).unwrap()
    }

    fn accept(&mut self, agent: &str, id: u128) -> Result<Vec<Effect>, CommandError> {
        self.send(Command::Accept {
            agent: AgentId::new(agent),
            conversation: ConversationId(id),
        })
    }

    fn reject(&mut self, agent: &str, id: u128) -> Vec<Effect> {
        self.send(Command::Reject {
            agent: AgentId::new(agent),
            conversation: ConversationId(id),
        })
        .unwrap()
    }

    fn resolve(&mut self, agent: &str, id: u128) -> Vec<Effect> {
        self.send(Command::Resolve {
            agent: AgentId::new(agent),
            conversation: ConversationId(id),
        })
        .unwrap()
    }

    fn state(&self, id: u128) -> ConversationState {
        self.router.conversation(ConversationId(id)).unwrap().state
    }
}

fn offers(effects: &[Effect]) -> Vec<(u128, String)> {
    effects
        .iter()
        .filter_map(|effect| match effect {
            Effect::Offered {
                conversation,
                agent,
                ..
            } => Some((conversation.0, agent.to_string())),
            _ => None,
        })
        .collect()
}

fn agent(id: &str, queues: &[&str], chat: u16) -> AgentConfig {
    AgentConfig {
        id: AgentId::new(id),
        name: id.to_uppercase(),
        queues: queues.iter().map(|q| QueueName::new(q)).collect(),
        skills: Vec::new(),
        languages: vec!["en".into()],
        capacity: vec![
            (Channel::Chat, chat),
            (Channel::Email, 5),
            (Channel::Sms, 3),
        ],
        max_total: 8,
    }
}

fn config(queues: Vec<QueueConfig>, agents: Vec<AgentConfig>) -> RoutingConfig {
    let mut config = RoutingConfig::single_queue(queues[0].clone());
    config.queues = queues;
    config.agents = agents;
    config
}

fn queue(name: &str) -> QueueConfig {
    let mut queue = QueueConfig::new(name);
    queue.sla_target = Millis::from_secs(60);
    queue.offer_timeout = Millis::from_secs(20);
    queue
}

#[test]
fn offer_accept_resolve_with_wrap_up() {
    let mut support = queue("support");
    support.wrap_up = Millis::from_secs(30);
    let mut h = Harness::new(config(vec![support], vec![agent("alice", &["support"], 1)]));
    h.online("alice");
    let effects = h.arrive(1, "hi");
    assert_eq!(offers(&effects), vec![(1, "alice".into())]);
    h.accept("alice", 1).unwrap();
    assert!(matches!(h.state(1), ConversationState::Assigned { .. }));
    // Stickiness: a later customer message goes to the owner.
    let effects = h
        .send(Command::CustomerMessage {
            conversation: ConversationId(1),
            message: MessageId(11),
            text: "more".into(),
        })
        .unwrap();
    assert!(effects.contains(&Effect::DeliverToAgent {
        conversation: ConversationId(1),
        agent: AgentId::new("alice"),
        message: MessageId(11)
    }));
    h.arrive(2, "second customer");
    h.advance(10);
    h.resolve("alice", 1);
    // Wrap-up holds alice's only chat slot for 30 s.
    assert_eq!(h.state(2), ConversationState::Waiting);
    assert!(h.router.agent(&AgentId::new("alice")).unwrap().wrapping_up);
    let effects = h.advance(30);
    assert_eq!(offers(&effects), vec![(2, "alice".into())]);
}

#[test]
fn first_free_queue_then_overflow_by_time() {
    let billing = queue("billing");
    // The overflow time belongs to the later candidate: how long a conversation waits before it may go there.
    let mut general = queue("general");
    general.overflow_after = Millis::from_secs(45);
    let mut routing = config(
        vec![general, billing],
        vec![
            agent("bob", &["billing"], 1),
            agent("gina", &["general"], 1),
        ],
    );
    routing.rules.push(RoutingRule {
        name: "billing words".into(),
        when: RuleMatch {
            keywords: vec!["invoice".into()],
            ..RuleMatch::default()
        },
        then: RuleAction {
            queues: vec![QueueName::new("billing"), QueueName::new("general")],
            ..RuleAction::default()
        },
    });
    let mut h = Harness::new(routing);
    h.online("gina");
    // Billing has no free agent, general does: first free queue wins at arrival.
    let effects = h.arrive(1, "my invoice is wrong");
    assert_eq!(offers(&effects), vec![(1, "gina".into())]);
    h.accept("gina", 1).unwrap();
    // Now nobody is free: conversation 2 waits in billing and becomes eligible in general after 45 s.
    h.arrive(2, "invoice again");
    h.resolve("gina", 1);
    assert_eq!(
        h.state(2),
        ConversationState::Waiting,
        "not eligible in general before its overflow time"
    );
    let effects = h.advance(44);
    assert!(offers(&effects).is_empty());
    let effects = h.advance(1);
    assert_eq!(offers(&effects), vec![(2, "gina".into())]);
}

#[test]
fn overflow_escalation_adds_a_queue_behind_the_candidates() {
    let mut tier1 = queue("tier1");
    tier1.escalation = vec![EscalationStep {
        after: Millis::from_secs(30),
        action: EscalationAction::OverflowTo(QueueName::new("experts")),
    }];
    let mut routing = config(
        vec![tier1, queue("spare"), queue("experts")],
        vec![agent("sam", &["experts"], 1)],
    );
    routing.rules.push(RoutingRule {
        name: "broken".into(),
        when: RuleMatch {
            keywords: vec!["broken".into()],
            ..RuleMatch::default()
        },
        then: RuleAction {
            queues: vec![QueueName::new("tier1"), QueueName::new("spare")],
            ..RuleAction::default()
        },
    });
    let mut h = Harness::new(routing);
    h.online("sam");
    // Two candidates, neither served by sam: the conversation waits.
    let effects = h.arrive(1, "it is broken");
    assert!(offers(&effects).is_empty());
    let effects = h.advance(29);
    assert!(offers(&effects).is_empty());
    // The escalation step makes it eligible in a third queue, where sam is free.
    let effects = h.advance(1);
    assert_eq!(offers(&effects), vec![(1, "sam".into())]);
    assert_eq!(
        h.state(1),
        ConversationState::Offered {
            agent: AgentId::new("sam"),
            queue: QueueName::new("experts"),
            deadline: Timestamp(50_000),
        }
    );
}

#[test]
fn order_of_service_is_priority_then_longest_wait_across_queues() {
    let mut routing = config(
        vec![queue("a"), queue("b")],
        vec![agent("ann", &["a", "b"], 1)],
    );
    routing.rules.push(RoutingRule {
        name: "to b".into(),
        when: RuleMatch {
            keywords: vec!["bee".into()],
            ..RuleMatch::default()
        },
        then: RuleAction {
            queues: vec![QueueName::new("b")],
            priority: 5,
            ..RuleAction::default()
        },
    });
    routing.rules.push(RoutingRule {
        name: "to b low".into(),
        when: RuleMatch {
            keywords: vec!["low".into()],
            ..RuleMatch::default()
        },
        then: RuleAction {
            queues: vec![QueueName::new("b")],
            priority: 0,
            ..RuleAction::default()
        },
    });
    let mut h = Harness::new(routing);
    h.arrive(1, "plain, queue a");
    h.advance(1);
    h.arrive(2, "low in b");
    h.advance(1);
    h.arrive(3, "bee: urgent in b");
    h.online("ann");
    // Highest priority first even though it waited least.
    assert_eq!(offers(&h.effects), vec![(3, "ann".into())]);
    h.accept("ann", 3).unwrap();
    let effects = h.resolve("ann", 3);
    // Equal priority: the longest waiting, across queues a and b.
    assert_eq!(offers(&effects), vec![(1, "ann".into())]);
}

#[test]
fn reject_keeps_place_skips_agent_and_misses_set_away() {
    let mut routing = config(
        vec![queue("support")],
        vec![agent("amy", &["support"], 1), agent("ben", &["support"], 1)],
    );
    routing.offers.max_missed = 2;
    routing.offers.reoffer_cooldown = Millis::from_secs(60);
    let mut h = Harness::new(routing);
    h.online("amy");
    let first = h.arrive(1, "one");
    assert_eq!(offers(&first), vec![(1, "amy".into())]);
    h.advance(5);
    h.arrive(2, "two");
    // amy rejects 1: it goes back in front of 2 (original place) but not to amy again right away.
    let effects = h.reject("amy", 1);
    assert!(effects.contains(&Effect::OfferWithdrawn {
        conversation: ConversationId(1),
        agent: AgentId::new("amy"),
        reason: OfferEnd::Rejected
    }));
    assert_eq!(
        offers(&effects),
        vec![(2, "amy".into())],
        "amy gets the next one, not the one she rejected"
    );
    // ben comes online: he gets conversation 1, which kept its place.
    let effects = h.online("ben");
    assert_eq!(offers(&effects), vec![(1, "ben".into())]);
    h.accept("ben", 1).unwrap();
    // amy lets 2 time out: second miss sets her away, and 2 is re-routed when ben frees up.
    let effects = h.advance(20);
    assert!(
        effects
            .iter()
            .any(|e| matches!(e, Effect::AgentSetAway { agent, .. } if agent.as_str() == "amy"))
    );
    assert_eq!(
        h.router.agent(&AgentId::new("amy")).unwrap().presence,
        Presence::Away
    );
    let effects = h.resolve("ben", 1);
    assert_eq!(offers(&effects), vec![(2, "ben".into())]);
}

#[test]
fn accepting_an_expired_offer_is_refused() {
    let mut h = Harness::new(config(
        vec![queue("support")],
        vec![agent("amy", &["support"], 1)],
    ));
    h.online("amy");
    h.arrive(1, "hi");
    h.advance(21);
    let refused = h.accept("amy", 1);
    assert!(matches!(refused, Err(CommandError::NotOffered { .. })));
}

#[test]
fn disconnect_reroutes_pending_offers() {
    let mut h = Harness::new(config(
        vec![queue("support")],
        vec![agent("amy", &["support"], 1), agent("ben", &["support"], 1)],
    ));
    h.online("amy");
    h.arrive(1, "hi");
    h.online("ben");
    let effects = h
        .send(Command::AgentDisconnected {
            agent: AgentId::new("amy"),
        })
        .unwrap();
    assert_eq!(offers(&effects), vec![(1, "ben".into())]);
}

#[test]
fn capacity_per_channel_and_total_cap() {
    let mut amy = agent("amy", &["support"], 2);
    amy.max_total = 3;
    let mut h = Harness::new(config(vec![queue("support")], vec![amy]));
    h.online("amy");
    h.arrive(1, "chat 1");
    h.arrive(2, "chat 2");
    h.arrive(3, "chat 3");
    assert_eq!(offers(&h.effects).len(), 2, "chat capacity is 2");
    h.arrive_with(4, |new| new.channel = Channel::Email);
    h.arrive_with(5, |new| new.channel = Channel::Email);
    assert_eq!(
        offers(&h.effects).len(),
        3,
        "total cap 3 stops the second email"
    );
}

#[test]
fn escalation_steps_sla_breach_and_keywords_raise_priority() {
    let mut support = queue("support");
    support.escalation = vec![
        EscalationStep {
            after: Millis::from_secs(30),
            action: EscalationAction::RaiseBy(3),
        },
        EscalationStep {
            after: Millis::from_secs(90),
            action: EscalationAction::SetTo(50),
        },
    ];
    let mut routing = config(vec![support], vec![agent("amy", &["support"], 1)]);
    routing.priority.keywords.push(KeywordBoost {
        pattern: regex::Regex::new("(?i)refund").unwrap(),
        boost: 7,
    });
    routing.priority.sla_breach = 10;
    let mut h = Harness::new(routing);
    h.arrive_with(1, |new| {
        new.text = "I need a refund".into();
        new.customer_tier = Some("VIP".into());
    });
    let view = h.router.conversation(ConversationId(1)).unwrap();
    assert_eq!(view.priority, 27, "vip 20 + keyword 7");
    assert!(
        view.reasons.contains(&PriorityReason::VipTier)
            && view.reasons.contains(&PriorityReason::Keyword)
    );
    h.advance(30);
    assert_eq!(
        h.router.conversation(ConversationId(1)).unwrap().priority,
        30
    );
    let effects = h.advance(30);
    assert!(effects.contains(&Effect::SlaBreached {
        conversation: ConversationId(1),
        queue: QueueName::new("support")
    }));
    assert_eq!(
        h.router.conversation(ConversationId(1)).unwrap().priority,
        40
    );
    h.advance(30);
    assert_eq!(
        h.router.conversation(ConversationId(1)).unwrap().priority,
        50,
        "set to 50"
    );
}

#[test]
fn repeat_messages_and_negative_wording_raise_priority_once_each() {
    let mut routing = config(vec![queue("support")], vec![]);
    routing.wording = Some(Arc::new(
        NegativeWording::new(vec![Lexicon::english().unwrap()], "en").unwrap(),
    ));
    routing.priority.repeat_message = 5;
    routing.priority.repeat_max = 2;
    routing.priority.negative_wording = 10;
    let mut h = Harness::new(routing);
    h.arrive(1, "Hi, where is my parcel?");
    assert_eq!(
        h.router.conversation(ConversationId(1)).unwrap().priority,
        0
    );
    let message = |text: &str| Command::CustomerMessage {
        conversation: ConversationId(1),
        message: MessageId(2),
        text: text.into(),
    };
    h.send(message("hello?")).unwrap();
    assert_eq!(
        h.router.conversation(ConversationId(1)).unwrap().priority,
        5
    );
    h.send(message("This is absolutely unacceptable, nobody answers!!"))
        .unwrap();
    assert_eq!(
        h.router.conversation(ConversationId(1)).unwrap().priority,
        20,
        "repeat 5 + negative 10"
    );
    h.send(message("still unacceptable")).unwrap();
    assert_eq!(
        h.router.conversation(ConversationId(1)).unwrap().priority,
        20,
        "both boosts are capped"
    );
}

#[test]
fn tier_escalation_keeps_follower_and_tells_them_on_resolve() {
    let mut tier1 = queue("tier1");
    tier1.next_tier = Some(QueueName::new("tier2"));
    let mut h = Harness::new(config(
        vec![tier1, queue("tier2")],
        vec![
            agent("first", &["tier1"], 1),
            agent("expert", &["tier2"], 1),
        ],
    ));
    h.online("first");
    h.online("expert");
    h.arrive(1, "complicated");
    h.accept("first", 1).unwrap();
    let effects = h
        .send(Command::Escalate {
            agent: AgentId::new("first"),
            conversation: ConversationId(1),
        })
        .unwrap();
    assert!(effects.contains(&Effect::Escalated {
        conversation: ConversationId(1),
        from_agent: AgentId::new("first"),
        to_queue: QueueName::new("tier2")
    }));
    assert_eq!(offers(&effects), vec![(1, "expert".into())]);
    assert_eq!(
        h.router.conversation(ConversationId(1)).unwrap().follower,
        Some(AgentId::new("first"))
    );
    h.accept("expert", 1).unwrap();
    let effects = h.resolve("expert", 1);
    assert!(effects.contains(&Effect::FollowUp {
        conversation: ConversationId(1),
        agent: AgentId::new("first")
    }));
}

#[test]
fn transfer_to_agent_and_queue_keep_priority_and_wait() {
    let mut h = Harness::new(config(
        vec![queue("support"), queue("sales")],
        vec![
            agent("amy", &["support"], 1),
            agent("ben", &["support"], 1),
            agent("sal", &["sales"], 1),
        ],
    ));
    h.online("amy");
    h.arrive(1, "hi");
    h.accept("amy", 1).unwrap();
    h.online("ben");
    let since = h.router.conversation(ConversationId(1)).unwrap().since;
    h.advance(5);
    let effects = h
        .send(Command::Transfer {
            agent: AgentId::new("amy"),
            conversation: ConversationId(1),
            to: TransferTarget::Agent(AgentId::new("ben")),
        })
        .unwrap();
    assert_eq!(offers(&effects), vec![(1, "ben".into())]);
    h.accept("ben", 1).unwrap();
    h.online("sal");
    let effects = h
        .send(Command::Transfer {
            agent: AgentId::new("ben"),
            conversation: ConversationId(1),
            to: TransferTarget::Queue(QueueName::new("sales")),
        })
        .unwrap();
    assert_eq!(offers(&effects), vec![(1, "sal".into())]);
    assert_eq!(
        h.router.conversation(ConversationId(1)).unwrap().since,
        since,
        "wait is kept"
    );
    let refused = h.send(Command::Transfer {
        agent: AgentId::new("ben"),
        conversation: ConversationId(1),
        to: TransferTarget::Queue(QueueName::new("sales")),
    });
    assert!(matches!(refused, Err(CommandError::NotOwner { .. })));
}

#[test]
fn transfer_to_a_queue_that_does_not_take_the_channel_is_refused() {
    let mut sms_only = queue("callbacks");
    sms_only.channels = vec![Channel::Sms];
    let mut h = Harness::new(config(
        vec![queue("support"), sms_only],
        vec![
            agent("amy", &["support"], 1),
            agent("cal", &["callbacks"], 1),
        ],
    ));
    h.online("amy");
    h.online("cal");
    h.arrive(1, "hi");
    h.accept("amy", 1).unwrap();
    let before = h.router.snapshot();
    let refused = h.send(Command::Transfer {
        agent: AgentId::new("amy"),
        conversation: ConversationId(1),
        to: TransferTarget::Queue(QueueName::new("callbacks")),
    });
    assert_eq!(
        refused,
        Err(CommandError::QueueRejectsChannel {
            queue: QueueName::new("callbacks"),
            channel: Channel::Chat,
        })
    );
    assert_eq!(
        refused.unwrap_err().to_string(),
        "queue `callbacks` does not accept chat conversations"
    );
    // Refused, it changed nothing: amy still owns it.
    assert_eq!(h.router.snapshot(), before);
    assert!(matches!(
        h.state(1),
        ConversationState::Assigned { ref agent, .. } if agent.as_str() == "amy"
    ));
}

#[test]
fn reopen_within_window_prefers_last_agent_then_routes_normally() {
    let mut routing = config(
        vec![queue("support")],
        vec![agent("amy", &["support"], 1), agent("ben", &["support"], 1)],
    );
    routing.reopen.window = Millis::from_secs(3600);
    routing.reopen.prefer_last_agent_for = Millis::from_secs(60);
    let mut h = Harness::new(routing);
    h.online("amy");
    h.arrive(1, "hi");
    h.accept("amy", 1).unwrap();
    h.resolve("amy", 1);
    h.arrive(2, "other customer");
    h.accept("amy", 2).unwrap();
    h.online("ben");
    // Customer 1 writes again: reopened, waits for amy (busy) although ben is free...
    let effects = h
        .send(Command::CustomerMessage {
            conversation: ConversationId(1),
            message: MessageId(3),
            text: "one more thing".into(),
        })
        .unwrap();
    assert!(effects.contains(&Effect::Reopened {
        conversation: ConversationId(1),
        preferred_agent: Some(AgentId::new("amy"))
    }));
    assert!(offers(&effects).is_empty());
    // ...then after the preference ends it routes to ben.
    let effects = h.advance(60);
    assert_eq!(offers(&effects), vec![(1, "ben".into())]);
    // After the reopen window the router forgets a resolved conversation.
    h.accept("ben", 1).unwrap();
    h.resolve("ben", 1);
    let effects = h.advance(3600);
    assert!(effects.contains(&Effect::Closed {
        conversation: ConversationId(1)
    }));
    assert!(h.router.conversation(ConversationId(1)).is_none());
}

#[test]
fn abandonment_before_answer_only() {
    let mut h = Harness::new(config(
        vec![queue("support")],
        vec![agent("amy", &["support"], 1)],
    ));
    h.arrive(1, "hi");
    h.advance(12);
    let effects = h
        .send(Command::CustomerLeft {
            conversation: ConversationId(1),
        })
        .unwrap();
    assert!(effects.contains(&Effect::Abandoned {
        conversation: ConversationId(1),
        waited: Millis::from_secs(12)
    }));
    assert!(h.router.conversation(ConversationId(1)).is_none());
    h.online("amy");
    h.arrive(2, "hi");
    h.accept("amy", 2).unwrap();
    let effects = h
        .send(Command::CustomerLeft {
            conversation: ConversationId(2),
        })
        .unwrap();
    assert!(
        effects.is_empty(),
        "an answered customer leaving is not abandonment"
    );
}

#[test]
fn queued_effect_gives_position_and_estimated_wait() {
    let mut support = queue("support");
    support.default_handle_time = Millis::from_secs(120);
    let mut h = Harness::new(config(vec![support], vec![agent("amy", &["support"], 1)]));
    h.online("amy");
    h.arrive(1, "first");
    h.accept("amy", 1).unwrap();
    h.arrive(2, "second");
    let effects = h.arrive(3, "third");
    let queued = effects.iter().find_map(|effect| match effect {
        Effect::Queued {
            position,
            estimated_wait,
            ..
        } => Some((*position, *estimated_wait)),
        _ => None,
    });
    // One chat slot staffed, two ahead-or-level including itself: 2 × 120 s.
    assert_eq!(queued, Some((2, Millis::from_secs(240))));
    assert_eq!(
        h.router.queue_position(ConversationId(3)),
        Some((2, Millis::from_secs(240)))
    );
    // Many at once, in the order asked: the assigned one and an unknown one have no place.
    assert_eq!(
        h.router.queue_positions(&[
            ConversationId(3),
            ConversationId(1),
            ConversationId(2),
            ConversationId(99),
        ]),
        vec![
            Some((2, Millis::from_secs(240))),
            None,
            Some((1, Millis::from_secs(120))),
            None,
        ]
    );
}

#[test]
fn longest_idle_and_least_occupied_differ_as_documented() {
    for (strategy, expected) in [(Strategy::LongestIdle, "a"), (Strategy::LeastOccupied, "b")] {
        let mut support = queue("support");
        support.strategy = strategy;
        support.auto_accept = true;
        let mut h = Harness::new(config(
            vec![support],
            vec![
                agent("a", &["support"], 3),
                agent("b", &["support"], 3),
                agent("c", &["support"], 3),
            ],
        ));
        for (second, name) in [(1, "a"), (2, "c"), (3, "b")] {
            h.now = Timestamp(second * 1000);
            h.online(name);
        }
        // Each gets one, in the order they have been idle: a, c, b.
        let mut chosen = Vec::new();
        for id in 1..=3 {
            h.now = Timestamp(3000 + id as u64 * 1000);
            chosen.extend(h.arrive(id, "x").iter().filter_map(|e| match e {
                Effect::Assigned { agent, .. } => Some(agent.to_string()),
                _ => None,
            }));
        }
        assert_eq!(chosen, ["a", "c", "b"], "{strategy:?}");
        // b finishes: b is now the least occupied, a still the one idle (un-offered) longest.
        h.resolve("b", 3);
        let effects = h.arrive(4, "y");
        let next = effects.iter().find_map(|e| match e {
            Effect::Assigned { agent, .. } => Some(agent.to_string()),
            _ => None,
        });
        assert_eq!(next.as_deref(), Some(expected), "{strategy:?}");
    }
}

#[test]
fn round_robin_takes_turns() {
    let mut support = queue("support");
    support.strategy = Strategy::RoundRobin;
    support.auto_accept = true;
    let mut h = Harness::new(config(
        vec![support],
        vec![
            agent("a", &["support"], 9),
            agent("b", &["support"], 9),
            agent("c", &["support"], 9),
        ],
    ));
    for name in ["a", "b", "c"] {
        h.online(name);
    }
    let mut chosen = Vec::new();
    for id in 1..=6 {
        let effects = h.arrive(id, "x");
        chosen.extend(effects.iter().filter_map(|e| match e {
            Effect::Assigned { agent, .. } => Some(agent.to_string()),
            _ => None,
        }));
    }
    assert_eq!(chosen, ["a", "b", "c", "a", "b", "c"]);
}

/// The agents chosen, in order, for arrivals `ids` on an auto-accept queue.
fn assigned_to(h: &mut Harness, ids: std::ops::RangeInclusive<u128>) -> Vec<String> {
    let mut chosen = Vec::new();
    for id in ids {
        chosen.extend(h.arrive(id, "x").iter().filter_map(|e| match e {
            Effect::Assigned { agent, .. } => Some(agent.to_string()),
            _ => None,
        }));
    }
    chosen
}

#[test]
fn round_robin_turns_survive_replace_config_and_restore() {
    let mut support = queue("support");
    support.strategy = Strategy::RoundRobin;
    support.auto_accept = true;
    let routing = config(
        vec![support],
        vec![
            agent("a", &["support"], 9),
            agent("b", &["support"], 9),
            agent("c", &["support"], 9),
        ],
    );
    let mut h = Harness::new(routing.clone());
    for name in ["a", "b", "c"] {
        h.online(name);
    }
    assert_eq!(assigned_to(&mut h, 1..=2), ["a", "b"]);
    // A configuration change does not restart the rotation at a: c's turn is next.
    h.send(Command::ReplaceConfig(Box::new(routing.clone())))
        .unwrap();
    assert_eq!(assigned_to(&mut h, 3..=4), ["c", "a"]);
    // Nor does a restore from a snapshot (a restart): b's turn is next.
    let snapshot = h.router.snapshot();
    assert_eq!(
        snapshot
            .agents
            .iter()
            .map(|agent| agent.turns.len())
            .collect::<Vec<_>>(),
        [1, 1, 1]
    );
    let mut effects = Vec::new();
    h.router = Router::restore(routing, snapshot, h.now, &mut effects).unwrap();
    h.router.audit().unwrap();
    assert_eq!(assigned_to(&mut h, 5..=7), ["b", "c", "a"]);
}

#[test]
fn recent_handle_times_survive_replace_config_and_restore() {
    let mut support = queue("support");
    support.default_handle_time = Millis::from_secs(100);
    let routing = config(vec![support], vec![agent("amy", &["support"], 1)]);
    let mut h = Harness::new(routing.clone());
    h.online("amy");
    h.arrive(1, "first");
    h.accept("amy", 1).unwrap();
    h.advance(30);
    h.resolve("amy", 1);
    h.arrive(2, "second");
    h.accept("amy", 2).unwrap();
    h.advance(50);
    h.resolve("amy", 2);
    h.arrive(3, "third");
    h.accept("amy", 3).unwrap();
    // Recent handle times 30 s and 50 s: 40 s per conversation ahead, not the 100 s default.
    let queued = |effects: &[Effect]| {
        effects.iter().find_map(|effect| match effect {
            Effect::Queued { estimated_wait, .. } => Some(*estimated_wait),
            _ => None,
        })
    };
    assert_eq!(queued(&h.arrive(4, "fourth")), Some(Millis::from_secs(40)));
    h.send(Command::ReplaceConfig(Box::new(routing.clone())))
        .unwrap();
    assert_eq!(queued(&h.arrive(5, "fifth")), Some(Millis::from_secs(80)));
    let snapshot = h.router.snapshot();
    assert_eq!(
        snapshot.queues[0].recent_handle_times,
        [Millis::from_secs(30), Millis::from_secs(50)]
    );
    let mut effects = Vec::new();
    h.router = Router::restore(routing, snapshot, h.now, &mut effects).unwrap();
    assert_eq!(
        h.router.queue_position(ConversationId(5)),
        Some((2, Millis::from_secs(80)))
    );
    assert_eq!(queued(&h.arrive(6, "sixth")), Some(Millis::from_secs(120)));
}

#[test]
fn most_skilled_prefers_higher_levels_and_skills_filter_agents() {
    let mut support = queue("support");
    support.strategy = Strategy::MostSkilled;
    let mut agents = vec![
        agent("low", &["support"], 1),
        agent("high", &["support"], 1),
        agent("none", &["support"], 1),
    ];
    agents[0].skills = vec![(Arc::from("billing"), 3)];
    agents[1].skills = vec![(Arc::from("billing"), 8)];
    let mut routing = config(vec![support], agents);
    routing.rules.push(RoutingRule {
        name: "billing".into(),
        when: RuleMatch {
            keywords: vec!["invoice".into()],
            ..RuleMatch::default()
        },
        then: RuleAction {
            queues: vec![QueueName::new("support")],
            skills: vec![switchboard::routing::model::SkillRequirement {
                skill: Arc::from("billing"),
                min_level: 2,
            }],
            ..RuleAction::default()
        },
    });
    let mut h = Harness::new(routing);
    h.online("none");
    h.online("low");
    h.online("high");
    assert_eq!(offers(&h.arrive(1, "invoice")), vec![(1, "high".into())]);
    assert_eq!(offers(&h.arrive(2, "invoice")), vec![(2, "low".into())]);
    assert!(
        offers(&h.arrive(3, "invoice")).is_empty(),
        "the agent without the skill is not eligible"
    );
    assert_eq!(offers(&h.arrive(4, "plain")), vec![(4, "none".into())]);
}

#[test]
fn language_requirement_routes_to_speakers() {
    let mut agents = vec![agent("en", &["support"], 1), agent("es", &["support"], 1)];
    agents[1].languages = vec!["es".into()];
    let mut routing = config(vec![queue("support")], agents);
    routing.rules.push(RoutingRule {
        name: "language".into(),
        when: RuleMatch::default(),
        then: RuleAction {
            queues: vec![QueueName::new("support")],
            require_language: true,
            ..RuleAction::default()
        },
    });
    let mut h = Harness::new(routing);
    h.online("en");
    h.online("es");
    assert_eq!(
        offers(&h.arrive_with(1, |n| n.language = Some("es-MX".into()))),
        vec![(1, "es".into())]
    );
    assert_eq!(
        offers(&h.arrive_with(2, |n| n.language = Some("en".into()))),
        vec![(2, "en".into())]
    );
}

#[test]
fn business_hours_hold_work_until_open() {
    use chrono_tz::Tz;
    use switchboard::routing::hours::BusinessHours;
    let mut support = queue("support");
    // Open 09:00–17:00 UTC on weekdays; virtual time 0 is Thursday 1970-01-01 00:00 UTC.
    support.business_hours = Some(BusinessHours::weekdays(Tz::UTC, 9 * 60, 17 * 60));
    let mut h = Harness::new(config(vec![support], vec![agent("amy", &["support"], 1)]));
    h.online("amy");
    assert!(offers(&h.arrive(1, "night")).is_empty());
    let effects = h.advance(9 * 3600);
    assert_eq!(offers(&effects), vec![(1, "amy".into())]);
}

#[test]
fn replace_config_keeps_state() {
    let routing = config(
        vec![queue("support")],
        vec![agent("amy", &["support"], 1), agent("ben", &["support"], 1)],
    );
    let mut h = Harness::new(routing.clone());
    h.online("amy");
    h.online("ben");
    h.arrive(1, "hi");
    h.accept("amy", 1).unwrap();
    h.arrive(2, "offered to ben");
    h.arrive(3, "waiting");
    // Remove ben: his offer goes back to waiting; amy keeps her conversation.
    let mut next = routing;
    next.agents.retain(|a| a.id.as_str() != "ben");
    next.queues[0].strategy = Strategy::RoundRobin;
    h.send(Command::ReplaceConfig(Box::new(next))).unwrap();
    assert!(
        matches!(h.state(1), ConversationState::Assigned { ref agent, .. } if agent.as_str() == "amy")
    );
    assert_eq!(h.state(2), ConversationState::Waiting);
    assert_eq!(h.state(3), ConversationState::Waiting);
    let effects = h.resolve("amy", 1);
    assert_eq!(
        offers(&effects),
        vec![(2, "amy".into())],
        "2 kept its place ahead of 3"
    );
}

#[test]
fn snapshot_restore_round_trip_keeps_deadlines() {
    let routing = config(vec![queue("support")], vec![agent("amy", &["support"], 1)]);
    let mut h = Harness::new(routing.clone());
    h.online("amy");
    h.arrive(1, "hi");
    h.advance(5);
    h.arrive(2, "waiting");
    let snapshot = h.router.snapshot();
    let mut effects = Vec::new();
    let restored = Router::restore(routing, snapshot.clone(), h.now, &mut effects).unwrap();
    restored.audit().unwrap();
    assert_eq!(restored.snapshot(), snapshot);
    assert!(effects.contains(&Effect::ScheduleTimer {
        key: switchboard::routing::TimerKey::Offer(ConversationId(1)),
        at: Timestamp(20_000)
    }));
}

#[test]
fn refused_commands_change_nothing() {
    let mut h = Harness::new(config(
        vec![queue("support")],
        vec![agent("amy", &["support"], 1)],
    ));
    h.arrive(1, "hi");
    let before = h.router.snapshot();
    for command in [
        Command::Accept {
            agent: AgentId::new("amy"),
            conversation: ConversationId(1),
        },
        Command::Resolve {
            agent: AgentId::new("amy"),
            conversation: ConversationId(1),
        },
        Command::Accept {
            agent: AgentId::new("nobody"),
            conversation: ConversationId(1),
        },
        Command::Escalate {
            agent: AgentId::new("amy"),
            conversation: ConversationId(9),
        },
    ] {
        let mut effects = Vec::new();
        assert!(h.router.handle(h.now, command, &mut effects).is_err());
        assert!(effects.is_empty());
    }
    assert_eq!(h.router.snapshot(), before);
    let duplicate = h.send(Command::Arrive(Box::new(NewConversation {
        id: ConversationId(1),
        message: MessageId(1),
        channel: Channel::Chat,
        provider: "webchat".into(),
        to_address: String::new(),
        customer_tier: None,
        language: None,
        subject: None,
        text: String::new(),
    })));
    assert_eq!(
        duplicate,
        Err(CommandError::DuplicateConversation(ConversationId(1)))
    );
}

#[test]
fn replace_config_keeps_the_free_agent_index_exact_for_skill_lanes() {
    // A rule sends "invoice" conversations to a skill lane of `support`. After a configuration change
    // that lane is rebuilt while amy's assignment is restored; amy's only chat slot is taken, so she
    // must not be left among the lane's free agents.
    let mut amy = agent("amy", &["support"], 1);
    amy.skills = vec![(Arc::from("billing"), 5)];
    let mut routing = config(vec![queue("support")], vec![amy]);
    routing.rules.push(RoutingRule {
        name: "billing".into(),
        when: RuleMatch {
            keywords: vec!["invoice".into()],
            ..RuleMatch::default()
        },
        then: RuleAction {
            queues: vec![QueueName::new("support")],
            skills: vec![switchboard::routing::model::SkillRequirement {
                skill: Arc::from("billing"),
                min_level: 2,
            }],
            ..RuleAction::default()
        },
    });
    let mut h = Harness::new(routing.clone());
    h.online("amy");
    assert_eq!(offers(&h.arrive(1, "invoice")), vec![(1, "amy".into())]);
    h.accept("amy", 1).unwrap();
    h.send(Command::ReplaceConfig(Box::new(routing))).unwrap();
    assert!(
        offers(&h.arrive(2, "another invoice")).is_empty(),
        "amy is at capacity"
    );
    assert_eq!(h.state(2), ConversationState::Waiting);
}

#[test]
fn snapshot_lists_conversations_in_arrival_order_whatever_the_slots() {
    let routing = config(vec![queue("support")], vec![]);
    let mut h = Harness::new(routing.clone());
    for id in 1..=3 {
        h.arrive(id, "hi");
    }
    // 1 leaves: its slot is reused by 4, which now sits before 2 and 3 internally.
    h.send(Command::CustomerLeft {
        conversation: ConversationId(1),
    })
    .unwrap();
    h.arrive(4, "hi");
    let snapshot = h.router.snapshot();
    let ids: Vec<u128> = snapshot.conversations.iter().map(|c| c.id.0).collect();
    assert_eq!(ids, [2, 3, 4]);
    let mut effects = Vec::new();
    let restored = Router::restore(routing, snapshot.clone(), h.now, &mut effects).unwrap();
    assert_eq!(restored.snapshot(), snapshot);
}

#[test]
fn capacity_freed_by_transfer_escalate_or_reject_goes_to_the_best_waiting_conversation() {
    // amy (one chat slot) holds conversation 1 (priority 0) while VIP conversation 2 (priority 20)
    // waits for her. Whatever way she hands 1 back, her freed slot must go to 2, not to 1 again.
    for hand_back in ["transfer", "escalate", "reject"] {
        let mut tier1 = queue("tier1");
        tier1.next_tier = Some(QueueName::new("tier2"));
        let mut routing = config(
            vec![tier1, queue("tier2")],
            vec![agent("amy", &["tier1", "tier2"], 1)],
        );
        routing.offers.reoffer_cooldown = Millis::ZERO;
        let mut h = Harness::new(routing);
        h.online("amy");
        assert_eq!(offers(&h.arrive(1, "hi")), vec![(1, "amy".into())]);
        if hand_back != "reject" {
            h.accept("amy", 1).unwrap();
        }
        h.arrive_with(2, |new| new.customer_tier = Some("vip".into()));
        assert_eq!(h.state(2), ConversationState::Waiting);
        let amy = AgentId::new("amy");
        let conversation = ConversationId(1);
        let command = match hand_back {
            "transfer" => Command::Transfer {
                agent: amy,
                conversation,
                to: TransferTarget::Queue(QueueName::new("tier1")),
            },
            "escalate" => Command::Escalate {
                agent: amy,
                conversation,
            },
            _ => Command::Reject {
                agent: amy,
                conversation,
            },
        };
        let effects = h.send(command).unwrap();
        assert_eq!(offers(&effects), vec![(2, "amy".into())], "{hand_back}");
        assert_eq!(h.state(1), ConversationState::Waiting, "{hand_back}");
    }
}

#[test]
fn cooldowns_ending_at_the_same_instant_keep_the_router_consistent_between_their_timers() {
    // amy rejects two conversations at the same moment, so both cooldowns end at the same instant and
    // two wait checks fire one after the other. Between them the router must still be consistent: the
    // second conversation is not eligible for amy until its own wait check lifts the cooldown.
    let mut routing = config(vec![queue("support")], vec![agent("amy", &["support"], 2)]);
    routing.offers.reoffer_cooldown = Millis::from_secs(60);
    let mut h = Harness::new(routing);
    h.online("amy");
    h.arrive(1, "one");
    h.arrive(2, "two");
    h.advance(1);
    assert!(offers(&h.reject("amy", 1)).is_empty());
    assert!(offers(&h.reject("amy", 2)).is_empty());
    // The harness audits after each timer it fires.
    let effects = h.advance(60);
    assert_eq!(offers(&effects), vec![(1, "amy".into()), (2, "amy".into())]);
}

#[test]
fn overflow_into_a_queue_that_does_not_take_the_channel_offers_nothing_there() {
    // Email overflows into the chat-only queue: cat serves that queue (and has email capacity for
    // her other work), but the queue does not take email, so the conversation stays waiting for the
    // email queue, whichever side looks for a match.
    let mut email = queue("email");
    email.channels = vec![Channel::Email];
    email.escalation = vec![EscalationStep {
        after: Millis::from_secs(10),
        action: EscalationAction::OverflowTo(QueueName::new("chat")),
    }];
    let mut chat = queue("chat");
    chat.channels = vec![Channel::Chat];
    let mut h = Harness::new(config(vec![email, chat], vec![agent("cat", &["chat"], 1)]));
    h.online("cat");
    h.arrive_with(1, |new| new.channel = Channel::Email);
    assert!(offers(&h.advance(10)).is_empty());
    assert!(
        !h.router
            .is_eligible(ConversationId(1), &AgentId::new("cat"))
    );
    h.send(Command::AgentPresence {
        agent: AgentId::new("cat"),
        presence: Presence::Away,
    })
    .unwrap();
    assert!(offers(&h.online("cat")).is_empty());
    assert_eq!(h.state(1), ConversationState::Waiting);
}

#[test]
fn auto_accepted_arrival_schedules_no_wait_check_so_a_later_transfer_gets_its_own() {
    let mut support = queue("support");
    support.auto_accept = true;
    let mut h = Harness::new(config(
        vec![support],
        vec![agent("amy", &["support"], 1), agent("ben", &["support"], 1)],
    ));
    h.online("amy");
    let effects = h.arrive(1, "hi");
    assert!(matches!(h.state(1), ConversationState::Assigned { .. }));
    assert!(
        !effects.iter().any(|e| matches!(
            e,
            Effect::ScheduleTimer {
                key: switchboard::routing::TimerKey::WaitCheck(_),
                ..
            }
        )),
        "an answered conversation has nothing to wait for: {effects:?}"
    );
    h.advance(60);
    // ben is signed out: the transfer waits for him 60 s (SLA already due), then falls back to the
    // queue, where amy is free again.
    h.send(Command::Transfer {
        agent: AgentId::new("amy"),
        conversation: ConversationId(1),
        to: TransferTarget::Agent(AgentId::new("ben")),
    })
    .unwrap();
    let effects = h.advance(1);
    assert!(effects.contains(&Effect::SlaBreached {
        conversation: ConversationId(1),
        queue: QueueName::new("support")
    }));
    let effects = h.advance(60);
    assert!(
        effects.iter().any(|e| matches!(
            e,
            Effect::Assigned { conversation: ConversationId(1), agent, .. } if agent.as_str() == "amy"
        )),
        "{effects:?}"
    );
}

#[test]
fn offers_taken_back_together_are_rerouted_best_first() {
    // amy holds two offers: 1 (priority 0, offered first) and VIP 2 (priority 20). ben has one free
    // slot. Whether amy is set away by a missed offer or goes away herself, ben must get 2.
    for how in ["missed offer", "away"] {
        let mut routing = config(
            vec![queue("support")],
            vec![agent("amy", &["support"], 2), agent("ben", &["support"], 1)],
        );
        routing.offers.max_missed = 1;
        let mut h = Harness::new(routing);
        h.online("amy");
        assert_eq!(offers(&h.arrive(1, "hi")), vec![(1, "amy".into())]);
        let vip = h.arrive_with(2, |new| new.customer_tier = Some("vip".into()));
        assert_eq!(offers(&vip), vec![(2, "amy".into())]);
        h.online("ben");
        let effects = if how == "away" {
            h.send(Command::AgentPresence {
                agent: AgentId::new("amy"),
                presence: Presence::Away,
            })
            .unwrap()
        } else {
            // 1's offer times out first: amy's miss sets her away, which takes back 2 as well.
            h.advance(20)
        };
        assert_eq!(offers(&effects), vec![(2, "ben".into())], "{how}");
        assert_eq!(h.state(1), ConversationState::Waiting, "{how}");
    }
}

#[test]
fn resolving_a_reopened_conversation_again_during_its_wrap_up_frees_every_slot() {
    // Wrap-up timers are keyed by (agent, conversation): amy resolves 1, the customer writes again
    // during the wrap-up, amy takes it and resolves it again. Both wrap-ups must end, so that amy's
    // two chat slots are free afterwards.
    let mut support = queue("support");
    support.wrap_up = Millis::from_secs(30);
    let mut routing = config(vec![support], vec![agent("amy", &["support"], 2)]);
    routing.reopen.prefer_last_agent_for = Millis::from_secs(60);
    let mut h = Harness::new(routing);
    h.online("amy");
    h.arrive(1, "hi");
    h.accept("amy", 1).unwrap();
    h.resolve("amy", 1);
    h.advance(5);
    let effects = h
        .send(Command::CustomerMessage {
            conversation: ConversationId(1),
            message: MessageId(2),
            text: "one more thing".into(),
        })
        .unwrap();
    assert_eq!(offers(&effects), vec![(1, "amy".into())]);
    h.accept("amy", 1).unwrap();
    h.advance(5);
    h.resolve("amy", 1);
    h.advance(3600);
    let amy = h.router.agent(&AgentId::new("amy")).unwrap();
    assert!(!amy.wrapping_up);
    assert_eq!(amy.load_total, 0);
    let mut offered = offers(&h.arrive(2, "a"));
    offered.extend(offers(&h.arrive(3, "b")));
    assert_eq!(offered, vec![(2, "amy".into()), (3, "amy".into())]);
}
