//! The supervisor view's live feed: one snapshot of the queues, the agents, the unanswered
//! conversations and recent customer ratings (CSAT), pushed to every supervisor WebSocket
//! (`/v1/admin/stream`, admin token).
//!
//! One task builds the snapshot for all supervisors: when committed events say something changed
//! (a burst is gathered for [`COALESCE`] into one rebuild), and every [`REFRESH`] so waits and
//! times in state keep counting. It builds nothing while no supervisor watches.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{Message as WsMessage, WebSocket};
use chrono::{DateTime, SecondsFormat, Utc};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::{Notify, broadcast, watch};
use tracing::debug;

use super::actions::Actions;
use super::views::{AgentList, QueueList, RouterRead, Unanswered};
use crate::store::OutboxEvent;

/// How long a burst of events is gathered before the snapshot is rebuilt.
const COALESCE: Duration = Duration::from_millis(300);
/// Oldest waits and times in state move without events: rebuilt at least this often when watched.
const REFRESH: Duration = Duration::from_secs(2);
/// How many unanswered conversations the view lists (first served first); it counts them all.
const UNANSWERED_SHOWN: usize = 100;
/// How many of the newest ratings the view lists.
const RECENT_RATINGS: usize = 10;

/// The latest snapshot, shared by every supervisor socket.
#[derive(Debug)]
pub struct SupervisorFeed {
    snapshot: watch::Sender<Value>,
    /// A supervisor connected: build a snapshot now.
    wanted: Notify,
}

impl SupervisorFeed {
    pub fn new() -> Arc<SupervisorFeed> {
        Arc::new(SupervisorFeed {
            snapshot: watch::Sender::new(Value::Null),
            wanted: Notify::new(),
        })
    }
}

/// Builds snapshots while someone watches. `events` are the committed events (followed from the
/// store).
pub async fn run(
    feed: Arc<SupervisorFeed>,
    actions: Actions,
    mut events: broadcast::Receiver<Arc<OutboxEvent>>,
) {
    // Each agent's presence and since when, from `agent.presence` events and from snapshots.
    let mut since: HashMap<String, (String, DateTime<Utc>)> = HashMap::new();
    loop {
        tokio::select! {
            event = events.recv() => match event {
                Ok(event) => {
                    note_presence(&mut since, &event);
                    tokio::time::sleep(COALESCE).await;
                    // Everything that came meanwhile is in the one rebuild.
                    loop {
                        match events.try_recv() {
                            Ok(event) => note_presence(&mut since, &event),
                            Err(broadcast::error::TryRecvError::Lagged(_)) => {}
                            Err(_) => break,
                        }
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return,
            },
            () = feed.wanted.notified() => {}
            () = tokio::time::sleep(REFRESH) => {}
        }
        if feed.snapshot.receiver_count() == 0 {
            continue;
        }
        match snapshot(&actions, &mut since).await {
            Ok(snapshot) => {
                feed.snapshot.send_replace(snapshot);
            }
            Err(error) => debug!(%error, "could not build the supervisor snapshot"),
        }
    }
}

fn note_presence(since: &mut HashMap<String, (String, DateTime<Utc>)>, event: &OutboxEvent) {
    if event.kind != "agent.presence" {
        return;
    }
    let (Some(agent), Some(presence)) = (
        event.data["agent_id"].as_str(),
        event.data["presence"].as_str(),
    ) else {
        return;
    };
    since.insert(agent.to_owned(), (presence.to_owned(), event.time));
}

async fn snapshot(
    actions: &Actions,
    since: &mut HashMap<String, (String, DateTime<Utc>)>,
) -> Result<Value, String> {
    let queues: QueueList = actions
        .read_router(RouterRead::Queues)
        .await
        .map_err(|refusal| refusal.message)?;
    let agents: AgentList = actions
        .read_router(RouterRead::Agents)
        .await
        .map_err(|refusal| refusal.message)?;
    let unanswered: Unanswered = actions
        .read_router(RouterRead::Unanswered {
            limit: UNANSWERED_SHOWN,
        })
        .await
        .map_err(|refusal| refusal.message)?;
    let ratings = actions
        .store
        .ratings(RECENT_RATINGS)
        .await
        .map_err(|error| error.to_string())?;
    let now = Utc::now();
    // Service level: the share of answered conversations answered within the queue's SLA target,
    // counted by this instance since it started (the metrics' `switchboard_queue_answered_total`).
    let queues: Vec<Value> = queues
        .queues
        .iter()
        .map(|queue| {
            let answered = |within: &str| {
                actions
                    .metrics
                    .queue_answered
                    .with_label_values(&[queue.name.as_str(), within])
                    .get()
            };
            let (within, late) = (answered("true"), answered("false"));
            let mut value = serde_json::to_value(queue).unwrap_or(Value::Null);
            value["answered"] = json!(within + late);
            value["service_level"] = if within + late == 0 {
                Value::Null
            } else {
                json!(within as f64 / (within + late) as f64)
            };
            value
        })
        .collect();
    let agents: Vec<Value> = agents
        .agents
        .iter()
        .map(|agent| {
            let entry = since
                .entry(agent.id.clone())
                .or_insert_with(|| (agent.presence.clone(), now));
            // A change the events did not tell (a restart, a lagged stream) starts counting now.
            if entry.0 != agent.presence {
                *entry = (agent.presence.clone(), now);
            }
            let mut value = serde_json::to_value(agent).unwrap_or(Value::Null);
            value["in_state_seconds"] = json!((now - entry.1).num_seconds().max(0));
            value
        })
        .collect();
    Ok(json!({
        "type": "snapshot",
        "at": now.to_rfc3339_opts(SecondsFormat::Millis, true),
        "queues": queues,
        "agents": agents,
        "unanswered": unanswered.first,
        "unanswered_total": unanswered.total,
        "csat": {
            "count": ratings.count,
            "average": ratings.average,
            "recent": ratings.recent.iter().map(|rating| json!({
                "conversation_id": rating.conversation_id.to_string(),
                "score": rating.score,
                "comment": rating.comment,
                "agent_id": rating.agent_id,
                "rated_at": rating.rated_at.to_rfc3339_opts(SecondsFormat::Millis, true),
            })).collect::<Vec<_>>(),
        },
    }))
}

/// One supervisor's socket: the current snapshot, then each new one. Nothing is read from it but
/// its closing.
pub async fn socket(feed: Arc<SupervisorFeed>, socket: WebSocket) {
    let mut snapshots = feed.snapshot.subscribe();
    feed.wanted.notify_one();
    let (mut sender, mut receiver) = socket.split();
    loop {
        tokio::select! {
            changed = snapshots.changed() => {
                if changed.is_err() {
                    break;
                }
                let snapshot = snapshots.borrow_and_update().to_string();
                if sender.send(WsMessage::Text(snapshot.into())).await.is_err() {
                    break;
                }
            }
            incoming = receiver.next() => match incoming {
                Some(Ok(WsMessage::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => {}
            },
        }
    }
}
