//! Agent commands over a bus: `<prefix>.cmd.agent.<agent>.<verb>` on NATS (answered on the reply
//! subject), routing key `agent.<agent>.<verb>` on the AMQP command exchange (answered to `reply_to`
//! with the request's `correlation_id`). The payload is an `AgentCommand` object
//! (`schemas/agent-command.v1.json`) without `type`; the answer a `CommandReply`
//! (`schemas/command-reply.v1.json`). They run through the same `Actions::agent_command` as the REST
//! API and the agents' WebSocket.
//!
//! A command carries the agent's own bearer token (`Authorization: Bearer <token>`, a NATS header
//! or an AMQP header), checked like the API's: none or an unknown one is `unauthorized`, another
//! kind or another agent's is `forbidden`. With `bus.commands_need_agent_token = false` the broker's
//! permissions are the only guard: whoever may publish to the command subjects acts for any agent.

use std::sync::{Arc, RwLock};

use serde_json::Value;

use crate::config::{AuthSection, Denied, bearer_token};
use crate::daemon::actions::{
    Actions, AgentCommand, CommandReply, Refusal, RefusalKind, parse_json,
};
use crate::routing::AgentId;

/// Who may send agent commands over a bus.
#[derive(Debug, Clone)]
pub enum CommandAuth {
    /// The named agent's own token, checked against the tokens in force (a reload included).
    AgentToken(Arc<RwLock<AuthSection>>),
    /// Whoever the broker lets publish (`bus.commands_need_agent_token = false`).
    Broker,
}

/// A command as it came off a bus.
#[derive(Debug, Clone, Copy)]
pub struct BusCommand<'a> {
    /// `agent.<agent>.<verb>`: the part of the subject or routing key after the prefix.
    pub address: &'a str,
    /// The `Authorization` header, if the message had one.
    pub authorization: Option<&'a str>,
    pub payload: &'a [u8],
}

/// What answers agent commands on a bus: the actions they run and who may send them.
#[derive(Debug, Clone)]
pub struct Commands {
    pub actions: Actions,
    pub auth: CommandAuth,
}

impl Commands {
    /// Runs the command and returns the serialised reply.
    pub async fn execute(&self, command: BusCommand<'_>) -> Vec<u8> {
        let result = run(&self.actions, &self.auth, command).await;
        serde_json::to_vec(&CommandReply::from(result)).unwrap_or_default()
    }
}

async fn run(
    actions: &Actions,
    auth: &CommandAuth,
    BusCommand {
        address,
        authorization,
        payload,
    }: BusCommand<'_>,
) -> Result<Value, Refusal> {
    let (agent, verb) = parse_address(address)?;
    if let CommandAuth::AgentToken(tokens) = auth {
        let token = authorization.and_then(bearer_token);
        let access = match tokens.read() {
            Ok(tokens) => tokens.agent_access(agent, token),
            Err(_) => Err(Denied::Unauthorized),
        };
        access.map_err(|denied| match denied {
            Denied::Unauthorized => Refusal::new(
                RefusalKind::Unauthorized,
                "unauthorized",
                "a command needs the agent's bearer token in its Authorization header",
            ),
            Denied::Forbidden => Refusal::new(
                RefusalKind::Forbidden,
                "forbidden",
                format!("this token may not act for agent `{agent}`"),
            ),
        })?;
    }
    let document: Value = if payload.iter().all(u8::is_ascii_whitespace) {
        Value::Object(serde_json::Map::new())
    } else {
        parse_json(payload)?
    };
    let command = AgentCommand::parse(document, Some(verb))?;
    actions.agent_command(&AgentId::new(agent), command).await
}

/// `agent.<agent>.<verb>` → (agent, verb).
fn parse_address(address: &str) -> Result<(&str, &str), Refusal> {
    let mut tokens = address.split('.');
    match (tokens.next(), tokens.next(), tokens.next(), tokens.next()) {
        (Some("agent"), Some(agent), Some(verb), None) if !agent.is_empty() && !verb.is_empty() => {
            Ok((agent, verb))
        }
        _ => Err(Refusal::new(
            RefusalKind::Invalid,
            "bad_command_address",
            format!("`{address}` is not agent.<agent>.<verb>"),
        )),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn addresses_name_an_agent_and_a_verb() {
        assert_eq!(
            parse_address("agent.alice.accept").unwrap(),
            ("alice", "accept")
        );
        for bad in ["agent.alice", "agent..accept", "queue.a.b", "agent.a.b.c"] {
            assert_eq!(
                parse_address(bad).unwrap_err().code,
                "bad_command_address",
                "{bad}"
            );
        }
    }
}
