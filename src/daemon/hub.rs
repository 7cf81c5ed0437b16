//! Live connections of agents' desktops: where pushes for an agent go (every open WebSocket of theirs).

use std::collections::HashMap;
use std::sync::Mutex;

use serde_json::Value;
use tokio::sync::mpsc;

use crate::routing::AgentId;

/// One open connection: its id and where its pushes go.
type Connection = (u64, mpsc::UnboundedSender<Value>);

#[derive(Debug, Default)]
pub struct AgentHub {
    connections: Mutex<HashMap<AgentId, Vec<Connection>>>,
    next_id: std::sync::atomic::AtomicU64,
}

impl AgentHub {
    /// Registers a connection; returns its id and the receiver of pushes.
    pub fn connect(&self, agent: &AgentId) -> (u64, mpsc::UnboundedReceiver<Value>) {
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (sender, receiver) = mpsc::unbounded_channel();
        if let Ok(mut connections) = self.connections.lock() {
            connections
                .entry(agent.clone())
                .or_default()
                .push((id, sender));
        }
        (id, receiver)
    }

    /// Removes a connection; returns true if it was the agent's last one.
    pub fn disconnect(&self, agent: &AgentId, id: u64) -> bool {
        let Ok(mut connections) = self.connections.lock() else {
            return false;
        };
        let Some(list) = connections.get_mut(agent) else {
            return false;
        };
        list.retain(|(connection, _)| *connection != id);
        if list.is_empty() {
            connections.remove(agent);
            return true;
        }
        false
    }

    /// Pushes a message to every connection of the agent; dead connections are dropped.
    pub fn push(&self, agent: &AgentId, message: &Value) {
        let Ok(mut connections) = self.connections.lock() else {
            return;
        };
        if let Some(list) = connections.get_mut(agent) {
            list.retain(|(_, sender)| sender.send(message.clone()).is_ok());
        }
    }

    pub fn is_connected(&self, agent: &AgentId) -> bool {
        self.connections
            .lock()
            .map(|connections| connections.contains_key(agent))
            .unwrap_or(false)
    }
}
