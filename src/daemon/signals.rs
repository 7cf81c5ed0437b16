//! Live signals to agents and customers wherever their connection is: typing, read receipts, what
//! became of a reply.
//!
//! A signal is pushed at once to the connections on this instance. In a cluster it also goes to the
//! other instances through the store's notifications (not stored: what it reports is in the store
//! already, or, like typing, means nothing a moment later), and each pushes it to the connections
//! it holds. Routing news does not travel this way: it comes from committed events and stored
//! pushes, which are never lost.

use std::sync::Arc;

use serde_json::Value;
use tracing::debug;
use ulid::Ulid;

use super::chat::ChatHub;
use super::hub::AgentHub;
use crate::routing::AgentId;
use crate::store::{Signal, SignalTarget, Store, Wakeup};

/// Where signals go: this instance's connections, and (in a cluster) the other instances.
#[derive(Debug, Clone)]
pub struct Signals {
    store: Arc<dyn Store>,
    agents: Arc<AgentHub>,
    customers: Arc<ChatHub>,
    /// This instance's node id in a cluster; `None` on a single node.
    node: Option<Arc<str>>,
}

impl Signals {
    pub fn new(
        store: Arc<dyn Store>,
        agents: Arc<AgentHub>,
        customers: Arc<ChatHub>,
        node: Option<String>,
    ) -> Signals {
        Signals {
            store,
            agents,
            customers,
            node: node.map(Arc::from),
        }
    }

    /// Pushes to the agent's desktop connections on every instance.
    pub fn to_agent(&self, agent: &AgentId, document: &Value) {
        self.agents.push(agent, document);
        self.to_other_instances(SignalTarget::Agent(agent.to_string()), document);
    }

    /// Pushes to the customer chat sockets of the conversation on every instance.
    pub fn to_customer(&self, conversation: Ulid, document: &Value) {
        self.customers.push(conversation, document);
        self.to_other_instances(SignalTarget::Customer(conversation), document);
    }

    fn to_other_instances(&self, to: SignalTarget, document: &Value) {
        let Some(node) = &self.node else {
            return;
        };
        let signal = Signal {
            origin: node.to_string(),
            to,
            document: document.to_string(),
        };
        let store = self.store.clone();
        // The caller does not wait for the other instances: a signal is a hint, not a write.
        tokio::spawn(async move {
            if let Err(error) = store.signal(&signal).await {
                debug!(%error, "a live signal did not reach the other instances");
            }
        });
    }

    /// Pushes the other instances' signals to the connections held here (a cluster's instances
    /// run this; it ends when the store stops notifying).
    pub async fn deliver_others(self) {
        let Some(mut wakeups) = self.store.wakeups() else {
            return;
        };
        loop {
            let signal = match wakeups.recv().await {
                Ok(Wakeup::Signal(signal)) => signal,
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            };
            if self.node.as_deref() == Some(signal.origin.as_str()) {
                continue;
            }
            let Ok(document) = serde_json::from_str::<Value>(&signal.document) else {
                continue;
            };
            match signal.to {
                SignalTarget::Agent(agent) => {
                    self.agents.push(&AgentId::new(&agent), &document);
                }
                SignalTarget::Customer(conversation) => {
                    self.customers.push(conversation, &document);
                }
            }
        }
    }
}
