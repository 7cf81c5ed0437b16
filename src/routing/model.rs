//! The router's vocabulary: identifiers, channels, presence and priorities (not a wire format).

use std::fmt;
use std::sync::Arc;

/// A conversation's identity: the 128 bits of its ULID, assigned by the conversation stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConversationId(pub u128);

/// A customer message's identity (the 128 bits of its ULID), so effects can say which message to deliver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MessageId(pub u128);

/// An agent's configured id, e.g. `"alice"`. Cheap to clone.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AgentId(Arc<str>);

impl AgentId {
    pub fn new(id: &str) -> AgentId {
        AgentId(Arc::from(id))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for AgentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A queue's configured name, e.g. `"billing"`. Cheap to clone.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct QueueName(Arc<str>);

impl QueueName {
    pub fn new(name: &str) -> QueueName {
        QueueName(Arc::from(name))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for QueueName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The channel a customer writes on. Capacity is counted per channel.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Channel {
    Email,
    Chat,
    Sms,
    Whatsapp,
    Messenger,
    Instagram,
    Telegram,
    /// The generic channel of systems posting through the API (bots, IVR, CRM).
    Api,
    /// Any other channel a deployment names in its configuration.
    Custom(Arc<str>),
}

impl Channel {
    /// Parses a channel name as written in configuration and on the bus (`"sms"`, `"whatsapp"`...).
    pub fn parse(name: &str) -> Channel {
        match name {
            "email" => Channel::Email,
            "chat" => Channel::Chat,
            "sms" => Channel::Sms,
            "whatsapp" => Channel::Whatsapp,
            "messenger" => Channel::Messenger,
            "instagram" => Channel::Instagram,
            "telegram" => Channel::Telegram,
            "api" => Channel::Api,
            other => Channel::Custom(Arc::from(other)),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            Channel::Email => "email",
            Channel::Chat => "chat",
            Channel::Sms => "sms",
            Channel::Whatsapp => "whatsapp",
            Channel::Messenger => "messenger",
            Channel::Instagram => "instagram",
            Channel::Telegram => "telegram",
            Channel::Api => "api",
            Channel::Custom(name) => name,
        }
    }
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What an agent's desktop says about them. Wrap-up is not a presence: it is capacity held after a
/// resolve, visible in the agent's view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Presence {
    /// Signed out. Assigned conversations stay theirs; no new offers.
    Offline,
    /// Ready for offers up to their capacity.
    Available,
    /// Signed in but not taking new work (break, or set away after missed offers).
    Away,
}

impl Presence {
    pub fn as_str(self) -> &'static str {
        match self {
            Presence::Offline => "offline",
            Presence::Available => "available",
            Presence::Away => "away",
        }
    }
}

/// Routing priority: an integer, higher is served first.
pub type Priority = i32;

/// A skill requirement: the agent must have `skill` at `min_level` or above.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SkillRequirement {
    pub skill: Arc<str>,
    pub min_level: u8,
}
