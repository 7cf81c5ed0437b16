//! What goes into the router (commands) and what comes out (effects).

use super::config::RoutingConfig;
use super::model::{AgentId, Channel, ConversationId, MessageId, Presence, Priority, QueueName};
use super::time::{Millis, Timestamp};

/// A new conversation's routing facts, taken from its first normalised message.
#[derive(Debug, Clone)]
pub struct NewConversation {
    pub id: ConversationId,
    pub message: MessageId,
    pub channel: Channel,
    pub provider: String,
    /// The address the customer wrote to (number, mailbox, page), as normalised by its adapter.
    pub to_address: String,
    pub customer_tier: Option<String>,
    pub language: Option<String>,
    pub subject: Option<String>,
    pub text: String,
}

/// Where a transfer sends a conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransferTarget {
    Agent(AgentId),
    Queue(QueueName),
}

/// A router timer. Keys are semantic, so a driver keeps at most one deadline per key and a stale
/// timer firing late is harmless: the router checks the state it refers to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TimerKey {
    /// An offer's deadline.
    Offer(ConversationId),
    /// The next moment something changes for an unanswered conversation: an escalation step, the
    /// SLA target, an overflow, the end of a re-offer cooldown or of a reservation for one agent.
    WaitCheck(ConversationId),
    /// The end of an agent's wrap-up after resolving this conversation.
    WrapUp(AgentId, ConversationId),
    /// The end of a resolved conversation's reopen window.
    ReopenWindow(ConversationId),
    /// A queue opens or closes.
    BusinessHours(QueueName),
}

/// An input to the router. Each is handled completely, in order, at the `now` passed with it.
#[derive(Debug, Clone)]
pub enum Command {
    /// A conversation's first message.
    Arrive(Box<NewConversation>),
    /// The customer wrote again (also on another channel: the stream joined it to this conversation).
    CustomerMessage {
        conversation: ConversationId,
        message: MessageId,
        text: String,
    },
    /// The customer left before being answered (e.g. closed the chat and did not come back).
    CustomerLeft {
        conversation: ConversationId,
    },
    AgentPresence {
        agent: AgentId,
        presence: Presence,
    },
    /// The agent's desktop lost its connection: pending offers go to someone else.
    AgentDisconnected {
        agent: AgentId,
    },
    Accept {
        agent: AgentId,
        conversation: ConversationId,
    },
    Reject {
        agent: AgentId,
        conversation: ConversationId,
    },
    Resolve {
        agent: AgentId,
        conversation: ConversationId,
    },
    Transfer {
        agent: AgentId,
        conversation: ConversationId,
        to: TransferTarget,
    },
    /// Hand over to the queue's next support tier; the agent stays attached as follower.
    Escalate {
        agent: AgentId,
        conversation: ConversationId,
    },
    TimerFired(TimerKey),
    /// New queues, rules and agents; conversations and agents' state carry over.
    ReplaceConfig(Box<RoutingConfig>),
}

/// Why an offer was withdrawn from an agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OfferEnd {
    Rejected,
    TimedOut,
    /// The agent went away, offline or lost their connection.
    AgentLeft,
    /// The customer left.
    Abandoned,
    /// A configuration change removed the agent or made them ineligible.
    Reconfigured,
}

/// Why a conversation's priority changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PriorityReason {
    WaitStep {
        queue: QueueName,
        step: usize,
    },
    SlaBreached,
    /// The customer's tier (e.g. `vip`) carries a boost.
    VipTier,
    Keyword,
    NegativeWording,
    RepeatMessage,
    TierEscalation,
}

/// Why an agent was set away by the router.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AwayReason {
    MissedOffers(u32),
}

/// An output of the router: something the driver must do or tell.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Offer the conversation to the agent; it holds capacity until `deadline`.
    Offered {
        conversation: ConversationId,
        agent: AgentId,
        queue: QueueName,
        deadline: Timestamp,
    },
    /// The offer ended without an accept; the agent's desktop withdraws it.
    OfferWithdrawn {
        conversation: ConversationId,
        agent: AgentId,
        reason: OfferEnd,
    },
    /// The agent owns the conversation (accepted, or auto-accepted).
    Assigned {
        conversation: ConversationId,
        agent: AgentId,
        queue: QueueName,
        waited: Millis,
    },
    /// Deliver this customer message to the conversation's owner.
    DeliverToAgent {
        conversation: ConversationId,
        agent: AgentId,
        message: MessageId,
    },
    /// The conversation waits; tell the customer their place and estimated wait.
    Queued {
        conversation: ConversationId,
        queue: QueueName,
        position: u32,
        estimated_wait: Millis,
    },
    PriorityChanged {
        conversation: ConversationId,
        from: Priority,
        to: Priority,
        reason: PriorityReason,
    },
    SlaBreached {
        conversation: ConversationId,
        queue: QueueName,
    },
    Escalated {
        conversation: ConversationId,
        from_agent: AgentId,
        to_queue: QueueName,
    },
    Transferred {
        conversation: ConversationId,
        from_agent: AgentId,
        to: TransferTarget,
    },
    Resolved {
        conversation: ConversationId,
        agent: AgentId,
        /// The queue it was assigned from: its recent handle times (and so its estimated waits)
        /// now include `handle_time`.
        queue: QueueName,
        handle_time: Millis,
    },
    Reopened {
        conversation: ConversationId,
        preferred_agent: Option<AgentId>,
    },
    /// The customer left before being answered.
    Abandoned {
        conversation: ConversationId,
        waited: Millis,
    },
    /// The reopen window passed; a later message starts a new conversation. The router forgets it.
    Closed {
        conversation: ConversationId,
    },
    AgentSetAway {
        agent: AgentId,
        reason: AwayReason,
    },
    /// Tell a former owner (the follower of an escalation) that the conversation was resolved.
    FollowUp {
        conversation: ConversationId,
        agent: AgentId,
    },
    ScheduleTimer {
        key: TimerKey,
        at: Timestamp,
    },
    CancelTimer {
        key: TimerKey,
    },
}

/// Why a command was refused. A refused command changes nothing and produces no effect.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error("unknown agent `{0}`")]
    UnknownAgent(AgentId),
    #[error("unknown conversation {0:?}")]
    UnknownConversation(ConversationId),
    #[error("conversation {0:?} already exists")]
    DuplicateConversation(ConversationId),
    #[error("unknown queue `{0}`")]
    UnknownQueue(QueueName),
    #[error(
        "conversation {conversation:?} is not offered to agent `{agent}` (the offer expired or went elsewhere)"
    )]
    NotOffered {
        conversation: ConversationId,
        agent: AgentId,
    },
    #[error("conversation {conversation:?} is not assigned to agent `{agent}`")]
    NotOwner {
        conversation: ConversationId,
        agent: AgentId,
    },
    #[error("queue `{0}` has no next tier to escalate to")]
    NoNextTier(QueueName),
    #[error("cannot transfer a conversation to the agent who owns it")]
    TransferToSelf,
    #[error("queue `{queue}` does not accept {channel} conversations")]
    QueueRejectsChannel { queue: QueueName, channel: Channel },
    #[error("invalid configuration: {0}")]
    InvalidConfig(#[from] super::config::ConfigError),
}
