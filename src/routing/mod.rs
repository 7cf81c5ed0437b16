//! The routing core: a pure, deterministic state machine (commands in, effects out).
//!
//! Nothing here does I/O, reads a clock or spawns a task. The daemon, the tests and the simulator all
//! drive [`Router`] the same way: pass a [`Command`] with the current [`Timestamp`], carry out the
//! returned [`Effect`]s, and feed back `TimerFired` when a scheduled [`TimerKey`] comes due
//! ([`TimerQueue`] keeps them for drivers).

mod backlog;
pub mod command;
pub mod config;
pub mod hours;
pub mod inspect;
pub mod model;
mod router;
pub mod rules;
pub mod time;
pub mod timers;
mod waitline;
pub mod wording;

pub use command::{
    AwayReason, Command, CommandError, Effect, NewConversation, OfferEnd, PriorityReason, TimerKey,
    TransferTarget,
};
pub use config::{RoutingConfig, Strategy};
pub use inspect::{
    AgentView, ConversationState, ConversationView, QueueSnapshot, QueueView, RouterSnapshot,
};
pub use model::{AgentId, Channel, ConversationId, MessageId, Presence, Priority, QueueName};
pub use router::Router;
pub use time::{Millis, Timestamp};
pub use timers::TimerQueue;
