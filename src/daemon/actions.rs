//! What clients ask of switchboard, independent of the transport: ingest a message, run an agent's
//! command. HTTP, the agents' WebSocket, NATS and AMQP all call these functions; each maps a
//! [`Refusal`] to its own answer (HTTP 4xx/503, a command reply, a dead-letter or a retry on a bus).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use chrono::Utc;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use ulid::Ulid;

use super::cluster::{self, Forwarded, Leadership};
use super::engine::{AgentAction, EngineError, Ingested, wall_clock};
use super::metrics::Metrics;
use super::outbound::Outbound;
use super::persist::parse_presence;
use super::views::RouterRead;
use crate::message::InboundMessage;
use crate::routing::{
    AgentId, CommandError, ConversationId, ConversationState, QueueName, TransferTarget,
};
use crate::store::{AttachmentContent, IngestOutcome, NewReply, Store, StoreError};

/// What kind of problem a refusal is: decides the HTTP status, and on a bus whether a retry may help.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalKind {
    /// Not even well-formed (not JSON, not an id): never retry.
    Malformed,
    /// The request itself is wrong (bad JSON, an invalid message, a bad argument): never retry.
    Invalid,
    /// It names something that does not exist.
    NotFound,
    /// It conflicts with the current state (not offered to you, not the owner...).
    Conflict,
    /// No credentials, or credentials nobody issued (a bus command without a valid token).
    Unauthorized,
    /// Valid credentials that may not do this (another agent's token).
    Forbidden,
    /// switchboard cannot take it right now (store down, shutting down): retry later.
    Unavailable,
}

/// Why a request was refused: a kind, a stable code, and a message for people.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{code}: {message}")]
pub struct Refusal {
    pub kind: RefusalKind,
    pub code: &'static str,
    pub message: String,
}

impl Refusal {
    pub fn new(kind: RefusalKind, code: &'static str, message: impl Into<String>) -> Refusal {
        Refusal {
            kind,
            code,
            message: message.into(),
        }
    }

    /// May the same request succeed later? (A bus redelivers it; otherwise it is dead-lettered.)
    pub fn retryable(&self) -> bool {
        // Everything else is the request's own fault and fails the same way every time.
        self.kind == RefusalKind::Unavailable
    }
}

impl From<StoreError> for Refusal {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::NotFound(what) => Refusal::new(RefusalKind::NotFound, "not_found", what),
            other => Refusal::new(
                RefusalKind::Unavailable,
                "store_unavailable",
                other.to_string(),
            ),
        }
    }
}

impl From<EngineError> for Refusal {
    fn from(error: EngineError) -> Self {
        match error {
            EngineError::Command(command) => {
                let (kind, code) = match &command {
                    CommandError::UnknownAgent(_) => (RefusalKind::NotFound, "unknown_agent"),
                    CommandError::UnknownConversation(_) => {
                        (RefusalKind::NotFound, "unknown_conversation")
                    }
                    CommandError::UnknownQueue(_) => (RefusalKind::NotFound, "unknown_queue"),
                    CommandError::NotOffered { .. } => (RefusalKind::Conflict, "not_offered"),
                    CommandError::NotOwner { .. } => (RefusalKind::Conflict, "not_owner"),
                    CommandError::NoNextTier(_) => (RefusalKind::Conflict, "no_next_tier"),
                    CommandError::TransferToSelf => (RefusalKind::Invalid, "transfer_to_self"),
                    CommandError::QueueRejectsChannel { .. } => {
                        (RefusalKind::Invalid, "queue_rejects_channel")
                    }
                    CommandError::DuplicateConversation(_) => {
                        (RefusalKind::Conflict, "duplicate_conversation")
                    }
                    CommandError::InvalidConfig(_) => (RefusalKind::Invalid, "invalid_config"),
                };
                Refusal::new(kind, code, command.to_string())
            }
            EngineError::Store(store) => store.into(),
            EngineError::Stopped => Refusal::new(
                RefusalKind::Unavailable,
                "shutting_down",
                "switchboard is shutting down",
            ),
            EngineError::NotLeader => Refusal::new(
                RefusalKind::Unavailable,
                "not_leader",
                "this instance does not run the router now; retry (on the leader, or later)",
            ),
        }
    }
}

/// What every transport needs to act: the engine, the store, metrics, reply delivery, and whether
/// intake is still open.
#[derive(Debug, Clone)]
pub struct Actions {
    /// The router, while this instance leads.
    pub engine: Leadership,
    pub store: Arc<dyn Store>,
    pub metrics: Metrics,
    pub outbound: Outbound,
    /// False once shutdown began: intake is refused (retry elsewhere or later).
    pub accepting: Arc<AtomicBool>,
}

/// The answer to an ingest: where the message went, and whether it was new.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngestReceipt {
    pub message_id: Ulid,
    pub conversation_id: Ulid,
    /// None for a duplicate (nothing was written).
    pub contact_id: Option<Ulid>,
    pub new_conversation: bool,
    pub duplicate: bool,
}

impl Actions {
    pub fn intake_open(&self) -> Result<(), Refusal> {
        if self.accepting.load(Ordering::SeqCst) {
            Ok(())
        } else {
            Err(Refusal::new(
                RefusalKind::Unavailable,
                "shutting_down",
                "switchboard is shutting down; retry on another instance",
            ))
        }
    }

    /// Parses and validates a `switchboard.message.v1` document (the bytes a transport received).
    pub fn parse_message(bytes: &[u8]) -> Result<InboundMessage, Refusal> {
        let message: InboundMessage = parse_json(bytes)?;
        message.validate().map_err(|error| {
            Refusal::new(RefusalKind::Invalid, "invalid_message", error.to_string())
        })?;
        Ok(message)
    }

    /// The one intake path after parsing: store durably (deduplicated by channel and
    /// provider_message_id), then hand to the router. Returns only after the commit, so the caller
    /// may acknowledge its source.
    pub async fn ingest(
        &self,
        message: InboundMessage,
        received: Instant,
    ) -> Result<IngestReceipt, Refusal> {
        self.ingest_with_attachments(message, Vec::new(), received)
            .await
    }

    /// [`Actions::ingest`] for a channel that brings its attachments' contents in (email): they
    /// are stored in the message's commit.
    pub async fn ingest_with_attachments(
        &self,
        message: InboundMessage,
        attachments: Vec<AttachmentContent>,
        received: Instant,
    ) -> Result<IngestReceipt, Refusal> {
        self.intake_open()?;
        let channel = message.channel.clone();
        let started = Instant::now();
        let outcome = self
            .store
            .ingest(message.clone(), attachments, Utc::now())
            .await?;
        self.metrics
            .store_commit_seconds
            .with_label_values(&["ingest"])
            .observe(started.elapsed().as_secs_f64());
        match outcome {
            IngestOutcome::Duplicate {
                message_id,
                conversation_id,
            } => {
                self.metrics
                    .messages_duplicate
                    .with_label_values(&[&channel])
                    .inc();
                Ok(IngestReceipt {
                    message_id,
                    conversation_id,
                    contact_id: None,
                    new_conversation: false,
                    duplicate: true,
                })
            }
            IngestOutcome::Stored {
                message_id,
                conversation_id,
                contact_id,
                new_conversation,
            } => {
                self.metrics
                    .messages_received
                    .with_label_values(&[&channel])
                    .inc();
                let mut message = message;
                message.id = Some(message_id);
                self.engine
                    .ingested(Ingested {
                        message_id,
                        conversation_id,
                        contact_id: Some(contact_id),
                        new_conversation,
                        message,
                        received,
                    })
                    .await?;
                Ok(IngestReceipt {
                    message_id,
                    conversation_id,
                    contact_id: Some(contact_id),
                    new_conversation,
                    duplicate: false,
                })
            }
        }
    }

    /// Runs one agent command (from REST, the WebSocket or a bus) and returns its result document.
    /// A follower hands it to the leader through the store and waits for the answer.
    pub async fn agent_command(
        &self,
        agent: &AgentId,
        command: AgentCommand,
    ) -> Result<Value, Refusal> {
        if self.engine.clustered() && !self.engine.is_leader() {
            return cluster::forward(
                self.store.as_ref(),
                &self.engine,
                agent,
                Forwarded::Command(command),
            )
            .await;
        }
        self.agent_command_here(agent, command).await
    }

    /// The agent's last desktop connection closed: its pending offers go to someone else.
    pub async fn agent_disconnected(&self, agent: &AgentId) -> Result<(), Refusal> {
        if self.engine.clustered() && !self.engine.is_leader() {
            cluster::forward(
                self.store.as_ref(),
                &self.engine,
                agent,
                Forwarded::Disconnected,
            )
            .await?;
            return Ok(());
        }
        self.engine
            .agent(agent.clone(), AgentAction::Disconnected)
            .await?;
        Ok(())
    }

    /// A chat's customer left before being answered: counted abandoned. A follower hands it to the
    /// leader through the store (filed under no agent).
    pub async fn customer_left(&self, conversation: Ulid) -> Result<(), Refusal> {
        if self.engine.clustered() && !self.engine.is_leader() {
            cluster::forward(
                self.store.as_ref(),
                &self.engine,
                &AgentId::new(""),
                Forwarded::CustomerLeft { conversation },
            )
            .await?;
            return Ok(());
        }
        self.customer_left_here(conversation).await
    }

    /// [`Actions::customer_left`] with this instance's router (the leader's, or a single node's).
    pub async fn customer_left_here(&self, conversation: Ulid) -> Result<(), Refusal> {
        self.engine
            .customer_left(ConversationId(conversation.0))
            .await?;
        Ok(())
    }

    /// Reads the router's live state, typed as the read's answer (`Option<_>` where it may be
    /// null). A follower asks the leader through the store, so every instance answers the same.
    pub async fn read_router<T: serde::de::DeserializeOwned>(
        &self,
        read: RouterRead,
    ) -> Result<T, Refusal> {
        let answer = if self.engine.clustered() && !self.engine.is_leader() {
            let agent = AgentId::new(read.agent());
            cluster::forward(
                self.store.as_ref(),
                &self.engine,
                &agent,
                Forwarded::Read(read),
            )
            .await?
        } else {
            self.engine
                .inspect(move |router| read.answer(router, wall_clock()))
                .await?
        };
        serde_json::from_value(answer).map_err(|error| {
            Refusal::new(
                RefusalKind::Unavailable,
                "leader_refused",
                format!("the router's answer does not read as expected: {error}"),
            )
        })
    }

    /// Runs an agent command with this instance's router (the leader's, or a single node's).
    pub async fn agent_command_here(
        &self,
        agent: &AgentId,
        command: AgentCommand,
    ) -> Result<Value, Refusal> {
        let action = match command {
            AgentCommand::Presence { presence } => {
                let presence = parse_presence(&presence).ok_or_else(|| {
                    Refusal::new(
                        RefusalKind::Invalid,
                        "bad_presence",
                        "presence must be available, away or offline",
                    )
                })?;
                self.engine
                    .agent(agent.clone(), AgentAction::Presence(presence))
                    .await?;
                return Ok(json!({ "presence": presence.as_str() }));
            }
            AgentCommand::Accept { conversation_id } => {
                AgentAction::Accept(routing_id(&conversation_id)?)
            }
            AgentCommand::Reject { conversation_id } => {
                AgentAction::Reject(routing_id(&conversation_id)?)
            }
            AgentCommand::Resolve { conversation_id } => {
                AgentAction::Resolve(routing_id(&conversation_id)?)
            }
            AgentCommand::Escalate { conversation_id } => {
                AgentAction::Escalate(routing_id(&conversation_id)?)
            }
            AgentCommand::Transfer {
                conversation_id,
                to_agent,
                to_queue,
            } => AgentAction::Transfer(
                routing_id(&conversation_id)?,
                transfer_target(to_agent, to_queue)?,
            ),
            AgentCommand::Reply {
                conversation_id,
                text,
                html,
            } => {
                let conversation = parse_id(&conversation_id)?;
                let message_id = self.reply(agent, conversation, text, html).await?;
                return Ok(json!({ "message_id": message_id.to_string(), "status": "pending" }));
            }
        };
        let conversation = match &action {
            AgentAction::Accept(id)
            | AgentAction::Reject(id)
            | AgentAction::Resolve(id)
            | AgentAction::Escalate(id)
            | AgentAction::Transfer(id, _) => Ulid(id.0),
            AgentAction::Presence(_) | AgentAction::Disconnected => Ulid::nil(),
        };
        self.engine.agent(agent.clone(), action).await?;
        Ok(json!({ "conversation_id": conversation.to_string() }))
    }

    /// Stores an agent's reply and queues it for delivery on the customer's last channel.
    async fn reply(
        &self,
        agent: &AgentId,
        conversation: Ulid,
        text: String,
        html: Option<String>,
    ) -> Result<Ulid, Refusal> {
        if text.trim().is_empty() {
            return Err(Refusal::new(
                RefusalKind::Invalid,
                "empty_reply",
                "a reply needs text",
            ));
        }
        let owner = agent.clone();
        let owns = self
            .engine
            .inspect(move |router| {
                matches!(router.conversation(ConversationId(conversation.0)).map(|view| view.state),
                    Some(ConversationState::Assigned { agent, .. }) if agent == owner)
            })
            .await?;
        if !owns {
            return Err(Refusal::new(
                RefusalKind::Conflict,
                "not_owner",
                "only the agent who owns a conversation can reply",
            ));
        }
        let record = self
            .store
            .conversation(conversation)
            .await?
            .ok_or_else(|| {
                Refusal::new(
                    RefusalKind::NotFound,
                    "unknown_conversation",
                    "no such conversation",
                )
            })?;
        let id = Ulid::new();
        let reply = NewReply {
            id,
            conversation_id: conversation,
            agent_id: agent.to_string(),
            route: record.reply_route,
            text,
            html,
            created_at: Utc::now(),
        };
        self.store.store_reply(reply, Vec::new()).await?;
        self.outbound.deliver(id);
        Ok(id)
    }
}

/// An agent's command, as the WebSocket and the buses take it (`schemas/agent-command.v1.json`).
/// On the WebSocket the object may also carry a `request_id`, echoed in the answer; on a bus the
/// verb comes from the subject or routing key (`…cmd.agent.<agent>.<verb>`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
#[schemars(title = "switchboard agent command v1")]
pub enum AgentCommand {
    /// Set presence: `available`, `away` or `offline`.
    Presence {
        presence: String,
    },
    Accept {
        conversation_id: String,
    },
    Reject {
        conversation_id: String,
    },
    Resolve {
        conversation_id: String,
    },
    /// Move the conversation to the next support tier.
    Escalate {
        conversation_id: String,
    },
    /// To another agent or queue: exactly one of `to_agent`, `to_queue`.
    Transfer {
        conversation_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        to_agent: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        to_queue: Option<String>,
    },
    /// Reply to the customer, on the channel they last used.
    Reply {
        conversation_id: String,
        text: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        html: Option<String>,
    },
}

impl AgentCommand {
    /// Parses a command object; the verb, when given apart (a bus subject), wins over no `type`.
    pub fn parse(mut document: Value, verb: Option<&str>) -> Result<AgentCommand, Refusal> {
        if let Some(verb) = verb {
            let Some(object) = document.as_object_mut() else {
                return Err(Refusal::new(
                    RefusalKind::Invalid,
                    "bad_command",
                    "a command is a JSON object",
                ));
            };
            match object.get("type").and_then(Value::as_str) {
                Some(given) if given != verb => {
                    return Err(Refusal::new(
                        RefusalKind::Invalid,
                        "bad_command",
                        format!("`type` {given} contradicts the verb {verb}"),
                    ));
                }
                _ => {
                    object.insert("type".into(), Value::String(verb.to_owned()));
                }
            }
        }
        serde_json::from_value(document)
            .map_err(|error| Refusal::new(RefusalKind::Invalid, "bad_command", error.to_string()))
    }
}

/// The answer to a bus command (`schemas/command-reply.v1.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[schemars(title = "switchboard command reply v1")]
pub struct CommandReply {
    pub ok: bool,
    /// The command's result when `ok`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    /// Why it was refused when not `ok`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ReplyError>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ReplyError {
    /// A stable code: `unknown_agent`, `not_offered`, `bad_command`...
    pub code: String,
    pub message: String,
}

impl From<Result<Value, Refusal>> for CommandReply {
    fn from(result: Result<Value, Refusal>) -> Self {
        match result {
            Ok(value) => CommandReply {
                ok: true,
                result: Some(value),
                error: None,
            },
            Err(refusal) => CommandReply {
                ok: false,
                result: None,
                error: Some(ReplyError {
                    code: refusal.code.to_owned(),
                    message: refusal.message,
                }),
            },
        }
    }
}

/// Parses a JSON body: malformed JSON and JSON of the wrong shape are told apart.
pub fn parse_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, Refusal> {
    serde_json::from_slice(bytes).map_err(|error| {
        let kind = if error.is_data() {
            RefusalKind::Invalid
        } else {
            RefusalKind::Malformed
        };
        Refusal::new(kind, "invalid_json", error.to_string())
    })
}

/// A conversation id (ULID) given by a client.
pub fn parse_id(text: &str) -> Result<Ulid, Refusal> {
    text.parse::<Ulid>().map_err(|_| {
        Refusal::new(
            RefusalKind::Malformed,
            "bad_id",
            format!("`{text}` is not a conversation id (ULID)"),
        )
    })
}

fn routing_id(text: &str) -> Result<ConversationId, Refusal> {
    parse_id(text).map(|ulid| ConversationId(ulid.0))
}

fn transfer_target(
    to_agent: Option<String>,
    to_queue: Option<String>,
) -> Result<TransferTarget, Refusal> {
    match (to_agent, to_queue) {
        (Some(agent), None) => Ok(TransferTarget::Agent(AgentId::new(&agent))),
        (None, Some(queue)) => Ok(TransferTarget::Queue(QueueName::new(&queue))),
        _ => Err(Refusal::new(
            RefusalKind::Invalid,
            "bad_transfer",
            "give exactly one of to_agent or to_queue",
        )),
    }
}

/// The JSON Schema of [`AgentCommand`] (`schemas/agent-command.v1.json`).
pub fn command_schema() -> Value {
    serde_json::to_value(schemars::schema_for!(AgentCommand)).unwrap_or_default()
}

/// The JSON Schema of [`CommandReply`] (`schemas/command-reply.v1.json`).
pub fn reply_schema() -> Value {
    serde_json::to_value(schemars::schema_for!(CommandReply)).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_bus_verb_fills_in_the_type_and_a_contradiction_is_refused() {
        let command = AgentCommand::parse(json!({ "conversation_id": "x" }), Some("accept"));
        assert_eq!(
            command.unwrap(),
            AgentCommand::Accept {
                conversation_id: "x".into()
            }
        );
        let refused = AgentCommand::parse(
            json!({ "type": "reject", "conversation_id": "x" }),
            Some("accept"),
        );
        assert_eq!(refused.unwrap_err().code, "bad_command");
        let unknown = AgentCommand::parse(json!({}), Some("dance")).unwrap_err();
        assert!(unknown.message.contains("dance"), "{}", unknown.message);
    }
}
