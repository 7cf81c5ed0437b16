//! Agent commands over a bus: `<prefix>.cmd.agent.<agent>.<verb>` on NATS (answered on the reply
//! subject), routing key `agent.<agent>.<verb>` on the AMQP command exchange (answered to `reply_to`
//! with the request's `correlation_id`). The payload is an `AgentCommand` object
//! (`schemas/agent-command.v1.json`) without `type`; the answer a `CommandReply`
//! (`schemas/command-reply.v1.json`). They run through the same `Actions::agent_command` as the REST
//! API and the agents' WebSocket.
//!
//! The bus is trusted like the broker's own access control: whoever may publish to the command
//! subjects acts for any agent, so restrict them with broker permissions.

use serde_json::Value;

use crate::daemon::actions::{
    Actions, AgentCommand, CommandReply, Refusal, RefusalKind, parse_json,
};
use crate::routing::AgentId;

/// Runs the command the address names (`agent.<agent>.<verb>`, the part after the prefix) and
/// returns the serialised reply.
pub async fn execute(actions: &Actions, address: &str, payload: &[u8]) -> Vec<u8> {
    let result = run(actions, address, payload).await;
    serde_json::to_vec(&CommandReply::from(result)).unwrap_or_default()
}

async fn run(actions: &Actions, address: &str, payload: &[u8]) -> Result<Value, Refusal> {
    let (agent, verb) = parse_address(address)?;
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
