//! The customer web chat: the `chat` channel's WebSocket (`/v1/chat/stream`) and its `ChannelSender`.
//!
//! A browser session is an anonymous visitor id (random, kept by the browser, and the bearer of
//! the session: whoever holds it may read its conversation), optionally with a customer id the
//! host site signed (`hex(HMAC-SHA256(chat.customer_secret, customer_id))`), which links the chat to
//! that customer's other channels. Every customer message goes through `Actions::ingest` and is
//! acknowledged only after the commit; its dedupe key is `<visitor>:<client_message_id>`, so a
//! client that resends what was not acknowledged after a reconnect never creates a duplicate.
//! Every message of a conversation has a sequence number (its place in the stored history), so a
//! client that resumes with the last number it saw gets exactly what it missed.
//! Agent replies and routing news (queue position and estimated wait, agent joined or left,
//! resolved) reach the socket from the committed events, followed from the store, so a customer
//! never hears of a decision before its commit.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use axum::extract::State;
use axum::extract::ws::{Message as WsMessage, WebSocket, WebSocketUpgrade};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use futures_util::{SinkExt, StreamExt};
use hmac::{Hmac, Mac};
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::Sha256;
use tokio::sync::{Notify, broadcast, mpsc};
use tracing::debug;
use ulid::Ulid;

use super::actions::{Actions, Refusal};
use super::events;
use super::http::{ApiError, AppState};
use super::outbound::{ChannelSender, SendError};
use super::views::{self, QueuePosition, RouterRead};
use crate::config::{ChatSection, Secret};
use crate::message::{Address, CustomerHints, IdentityLink, InboundMessage, MESSAGE_SCHEMA};
use crate::routing::AgentId;
use crate::store::{ConversationStatus, Direction, OutboxEvent, Rating, Store, StoredMessage};

/// The channel name and provider of web chat messages.
pub const CHANNEL: &str = "chat";
pub const PROVIDER: &str = "webchat";

/// Customers send short JSON frames; a frame larger than this is refused by the socket.
const MAX_FRAME_BYTES: usize = 64 * 1024;

/// One open customer socket: its id and where its pushes go.
type Connection = (u64, mpsc::UnboundedSender<Value>);

/// The longest comment a rating may carry, in characters.
pub const MAX_RATING_COMMENT_CHARS: usize = 1000;

/// How long a burst of routing news is gathered before waiting customers hear their new place.
const POSITION_COALESCE: Duration = Duration::from_millis(250);
/// Waits are estimated anew and priorities step up with time: waiting customers are re-checked
/// this often even when nothing else happens.
const POSITION_REFRESH: Duration = Duration::from_secs(15);

/// Open customer sockets by conversation: where replies and routing news for a conversation go.
#[derive(Debug, Default)]
pub struct ChatHub {
    connections: Mutex<HashMap<Ulid, Vec<Connection>>>,
    next_id: AtomicU64,
    /// Chat conversations waiting for an agent, with the place and wait their customer was last
    /// told: only these are re-checked when the queues move.
    waiting: Mutex<HashMap<Ulid, QueuePosition>>,
    /// Woken when routing news may have moved a waiting customer's place.
    positions_moved: Notify,
}

impl ChatHub {
    fn new_connection(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    fn attach(&self, conversation: Ulid, id: u64, sender: mpsc::UnboundedSender<Value>) {
        if let Ok(mut connections) = self.connections.lock() {
            let list = connections.entry(conversation).or_default();
            if !list.iter().any(|(known, _)| *known == id) {
                list.push((id, sender));
            }
        }
    }

    fn detach(&self, conversation: Ulid, id: u64) {
        if let Ok(mut connections) = self.connections.lock()
            && let Some(list) = connections.get_mut(&conversation)
        {
            list.retain(|(known, _)| *known != id);
            if list.is_empty() {
                connections.remove(&conversation);
            }
        }
    }

    /// Pushes to every socket of the conversation; returns how many took it.
    pub fn push(&self, conversation: Ulid, message: &Value) -> usize {
        let Ok(mut connections) = self.connections.lock() else {
            return 0;
        };
        let Some(list) = connections.get_mut(&conversation) else {
            return 0;
        };
        list.retain(|(_, sender)| sender.send(message.clone()).is_ok());
        list.len()
    }
}

impl ChatHub {
    /// Remembers what a waiting customer was told; false when it is what they were told last.
    fn tell_position(&self, conversation: Ulid, position: QueuePosition) -> bool {
        let Ok(mut waiting) = self.waiting.lock() else {
            return false;
        };
        let rounded = |p: &QueuePosition| (p.position, p.estimated_wait_seconds.round() as u64);
        let changed = waiting
            .get(&conversation)
            .is_none_or(|told| rounded(told) != rounded(&position));
        waiting.insert(conversation, position);
        changed
    }

    fn stop_waiting(&self, conversation: Ulid) {
        if let Ok(mut waiting) = self.waiting.lock() {
            waiting.remove(&conversation);
        }
    }

    /// Conversations whose customers wait and are still in their chat window.
    fn waiting_with_sockets(&self) -> Vec<Ulid> {
        let Ok(waiting) = self.waiting.lock() else {
            return Vec::new();
        };
        waiting
            .keys()
            .copied()
            .filter(|id| self.is_open(*id))
            .collect()
    }

    fn positions_may_have_moved(&self) {
        if self.waiting.lock().is_ok_and(|waiting| !waiting.is_empty()) {
            self.positions_moved.notify_one();
        }
    }
}

fn queued_frame(position: &QueuePosition) -> Value {
    json!({
        "type": "queued",
        "position": position.position,
        "estimated_wait_seconds": position.estimated_wait_seconds,
    })
}

/// Keeps waiting customers told their place and estimated wait as the queues move: woken by
/// routing news (a burst is gathered for [`POSITION_COALESCE`] into one router read for every
/// waiting chat), and every [`POSITION_REFRESH`]. Only a changed place or wait is pushed.
pub async fn push_positions(hub: Arc<ChatHub>, actions: Actions) {
    loop {
        tokio::select! {
            () = hub.positions_moved.notified() => tokio::time::sleep(POSITION_COALESCE).await,
            () = tokio::time::sleep(POSITION_REFRESH) => {}
        }
        let conversations = hub.waiting_with_sockets();
        if conversations.is_empty() {
            continue;
        }
        let positions: HashMap<String, QueuePosition> = match actions
            .read_router(RouterRead::QueuePositions {
                conversations: conversations.clone(),
            })
            .await
        {
            Ok(positions) => positions,
            Err(refusal) => {
                debug!(reason = %refusal.message, "could not read waiting chats' positions");
                continue;
            }
        };
        for conversation in conversations {
            if let Some(position) = positions.get(&conversation.to_string())
                && hub.tell_position(conversation, *position)
            {
                hub.push(conversation, &queued_frame(position));
            }
        }
    }
}

/// The `chat` channel's way out. The reply is stored before it gets here and there is no provider
/// to hand it to: a customer who is not connected now receives it when the session resumes, so the
/// send always succeeds. The customer's sockets may be on any instance: each pushes the reply when
/// its `message.sent` event arrives ([`relay_events`]), which every instance follows from the store.
#[derive(Debug)]
pub struct ChatSender;

#[async_trait]
impl ChannelSender for ChatSender {
    async fn send(&self, _reply: &StoredMessage) -> Result<Option<String>, SendError> {
        // No provider in between: there is no provider message id to remember.
        Ok(None)
    }
}

/// The conversation's messages with their sequence numbers (1-based, in stored order).
fn numbered(history: &[StoredMessage]) -> impl Iterator<Item = (u64, &StoredMessage)> {
    (1_u64..).zip(history.iter())
}

/// A message as the customer sees it: who wrote it and its text (never HTML).
fn message_frame(seq: u64, message: &StoredMessage) -> Value {
    let from = match message.direction {
        Direction::Inbound => "customer",
        Direction::Outbound => "agent",
    };
    let text = message
        .body
        .get("text")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let mut frame = json!({
        "type": "message",
        "seq": seq,
        "message_id": message.id.to_string(),
        "conversation_id": message.conversation_id.to_string(),
        "from": from,
        "channel": message.channel,
        "text": text,
        "at": message.created_at.to_rfc3339(),
    });
    if message.direction == Direction::Inbound
        && message.channel == CHANNEL
        && let Some(id) = message
            .provider_message_id
            .as_deref()
            .and_then(|id| id.split_once(':'))
            .map(|(_, client)| client)
    {
        frame["client_message_id"] = Value::String(id.to_owned());
    }
    frame
}

/// Translates committed events into what the customer is told: place in the queue and estimated
/// wait, an agent joining or leaving, the conversation resolved, and an agent's reply (see
/// [`ChatSender`]).
pub async fn relay_events(
    hub: Arc<ChatHub>,
    store: Arc<dyn Store>,
    mut events: broadcast::Receiver<Arc<OutboxEvent>>,
) {
    loop {
        let event = match events.recv().await {
            Ok(event) => event,
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                debug!(missed, "chat fell behind the event stream");
                continue;
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        let kind = event.kind.as_str();
        let Some(conversation) = event.conversation_id else {
            continue;
        };
        let data = &event.data;
        if kind.starts_with("conversation.") || kind == "agent.presence" {
            hub.positions_may_have_moved();
        }
        let frames = match kind {
            "conversation.queued" => {
                let position = QueuePosition {
                    position: data["position"]
                        .as_u64()
                        .and_then(|p| u32::try_from(p).ok())
                        .unwrap_or(1),
                    estimated_wait_seconds: data["estimated_wait_seconds"]
                        .as_f64()
                        .unwrap_or_default(),
                };
                hub.tell_position(conversation, position);
                vec![queued_frame(&position)]
            }
            "conversation.assigned" => {
                hub.stop_waiting(conversation);
                vec![json!({ "type": "agent_joined", "agent_id": data["agent_id"] })]
            }
            "conversation.transferred" | "conversation.escalated" => {
                vec![json!({ "type": "agent_left", "agent_id": data["from_agent_id"] })]
            }
            "conversation.resolved" => {
                hub.stop_waiting(conversation);
                vec![
                    json!({ "type": "agent_left", "agent_id": data["agent_id"] }),
                    json!({ "type": "resolved", "rating": true }),
                ]
            }
            "conversation.abandoned" => {
                hub.stop_waiting(conversation);
                continue;
            }
            "message.sent" if data["channel"] == CHANNEL && hub.is_open(conversation) => {
                let Some(message) = data["message_id"]
                    .as_str()
                    .and_then(|id| Ulid::from_string(id).ok())
                else {
                    continue;
                };
                match reply_frame(store.as_ref(), conversation, message).await {
                    Some(frame) => vec![frame],
                    None => continue,
                }
            }
            _ => continue,
        };
        for frame in frames {
            hub.push(conversation, &frame);
        }
    }
}

/// An agent's reply as its customer sees it, numbered by its place in the stored history.
async fn reply_frame(store: &dyn Store, conversation: Ulid, message: Ulid) -> Option<Value> {
    let history = match store.messages(conversation).await {
        Ok(history) => history,
        Err(error) => {
            // Not lost: the customer's next resume reads the history.
            debug!(%error, %conversation, "cannot read a chat's history for a reply");
            return None;
        }
    };
    numbered(&history)
        .find(|(_, stored)| stored.id == message)
        .map(|(seq, stored)| message_frame(seq, stored))
}

/// Pushes an agent's typing indicator to the customer of a conversation the agent may see.
pub async fn agent_typing(
    state: &AppState,
    agent: &AgentId,
    conversation: Ulid,
    active: bool,
) -> Result<(), Refusal> {
    let may_see: bool = state
        .actions
        .read_router(RouterRead::AgentMaySee {
            agent: agent.to_string(),
            conversation,
        })
        .await?;
    if may_see {
        state.signals.to_customer(
            conversation,
            &json!({ "type": "typing", "from": "agent", "active": active }),
        );
    }
    Ok(())
}

/// `GET /v1/chat/stream`: the customer's WebSocket. The page's `Origin` must be allowed.
pub async fn stream(
    State(state): State<AppState>,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let origin = headers
        .get(header::ORIGIN)
        .and_then(|value| value.to_str().ok());
    if !origin_allowed(&state.chat_settings, origin) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "origin_not_allowed",
            "this page's origin may not open a chat (chat.allowed_origins)",
        ));
    }
    Ok(upgrade
        .max_message_size(MAX_FRAME_BYTES)
        .on_upgrade(move |socket| session(state, socket)))
}

fn origin_allowed(settings: &ChatSection, origin: Option<&str>) -> bool {
    settings.allowed_origins.is_empty()
        || origin.is_some_and(|origin| settings.allowed_origins.iter().any(|a| a == origin))
}

/// What a customer's browser sends.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientFrame {
    /// Opens or resumes the session; must come first.
    Start {
        visitor_id: String,
        /// The conversation to resume (from an earlier ack).
        #[serde(default)]
        conversation_id: Option<String>,
        /// The last sequence number the client has; everything after it is sent again.
        #[serde(default)]
        after_seq: u64,
        #[serde(default)]
        customer: Option<SignedCustomer>,
        #[serde(default)]
        name: Option<String>,
    },
    Message {
        client_message_id: String,
        text: String,
    },
    Typing {
        active: bool,
    },
    /// The customer has seen everything up to `seq`.
    Read {
        seq: u64,
    },
    /// Rates the resolved conversation: 1–5 and an optional comment.
    Rate {
        score: i64,
        #[serde(default)]
        comment: String,
    },
    /// The offline form: a message answered later, by email when an address is given.
    Offline {
        client_message_id: String,
        #[serde(default)]
        name: Option<String>,
        #[serde(default)]
        email: Option<String>,
        text: String,
    },
}

/// A customer id the host site vouches for: `signature` is hex HMAC-SHA256 of `id` with
/// `chat.customer_secret`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedCustomer {
    pub id: String,
    pub signature: String,
}

/// Reads one text frame from a customer's browser.
pub fn parse_frame(text: &str) -> Result<ClientFrame, serde_json::Error> {
    serde_json::from_str(text)
}

/// A session after `start`.
struct Session {
    visitor: String,
    customer_id: Option<String>,
    name: Option<String>,
    conversation: Option<Ulid>,
    connection: u64,
    pushes: mpsc::UnboundedSender<Value>,
    bucket: RateBucket,
}

/// Messages per minute as a token bucket: a burst of `capacity`, refilled evenly.
struct RateBucket {
    capacity: f64,
    tokens: f64,
    per_second: f64,
    last: Instant,
}

impl RateBucket {
    fn new(per_minute: u32) -> RateBucket {
        let capacity = f64::from(per_minute);
        RateBucket {
            capacity,
            tokens: capacity,
            per_second: capacity / 60.0,
            last: Instant::now(),
        }
    }

    fn take(&mut self, now: Instant) -> Result<(), Duration> {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.capacity);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                (1.0 - self.tokens) / self.per_second,
            ))
        }
    }
}

fn error_frame(code: &str, message: impl Into<String>) -> Value {
    json!({ "type": "error", "error": { "code": code, "message": message.into() } })
}

/// An error about one customer message, naming it so the widget can mark that message.
fn client_error(code: &str, message: impl Into<String>, client_message_id: &str) -> Value {
    let mut frame = error_frame(code, message);
    frame["client_message_id"] = Value::String(client_message_id.to_owned());
    frame
}

/// Refuses a customer message the chat does not take (a bad client id, too long, empty, over the
/// session's rate), with the frame that says why. A message that passes takes one from the
/// session's rate bucket.
fn admit_customer_text(
    state: &AppState,
    session: &mut Session,
    client_message_id: &str,
    text: &str,
) -> Result<(), Value> {
    let refuse = |code: &str, message: String| Err(client_error(code, message, client_message_id));
    if client_message_id.is_empty()
        || client_message_id.len() > 64
        || client_message_id.contains(':')
    {
        return refuse(
            "bad_client_message_id",
            "client_message_id must be 1–64 characters without `:`".into(),
        );
    }
    let limit = state.chat_settings.max_message_chars;
    if text.chars().count() > limit {
        return refuse(
            "message_too_long",
            format!("a message has at most {limit} characters"),
        );
    }
    if text.trim().is_empty() {
        return refuse("empty_message", "a message needs text".into());
    }
    if let Err(wait) = session.bucket.take(Instant::now()) {
        return refuse(
            "rate_limited",
            format!("too many messages; try again in {} s", wait.as_secs() + 1),
        );
    }
    Ok(())
}

async fn session(state: AppState, socket: WebSocket) {
    let (mut sender, mut receiver) = socket.split();
    let (pushes, mut pushed) = mpsc::unbounded_channel::<Value>();
    let mut session: Option<Session> = None;
    // Only frames from the customer count as activity: pushes to an abandoned tab do not keep it.
    let idle_timeout = Duration::from_secs(state.chat_settings.idle_timeout_seconds.max(1));
    let idle = tokio::time::sleep(idle_timeout);
    tokio::pin!(idle);
    loop {
        tokio::select! {
            () = idle.as_mut() => {
                let close = axum::extract::ws::CloseFrame {
                    code: axum::extract::ws::close_code::AWAY,
                    reason: "idle".into(),
                };
                let _ = sender.send(WsMessage::Close(Some(close))).await;
                break;
            }
            push = pushed.recv() => match push {
                Some(push) => if sender.send(WsMessage::Text(push.to_string().into())).await.is_err() { break },
                None => break,
            },
            incoming = receiver.next() => match incoming {
                Some(Ok(WsMessage::Text(text))) => {
                    idle.as_mut().reset(tokio::time::Instant::now() + idle_timeout);
                    let answers = match parse_frame(&text) {
                        Ok(frame) => handle(&state, &mut session, &pushes, frame).await,
                        Err(error) => vec![error_frame("bad_frame", error.to_string())],
                    };
                    for answer in answers {
                        if sender.send(WsMessage::Text(answer.to_string().into())).await.is_err() { break }
                    }
                }
                Some(Ok(WsMessage::Binary(_))) => {
                    let refusal = error_frame("text_only", "frames are JSON text");
                    if sender.send(WsMessage::Text(refusal.to_string().into())).await.is_err() { break }
                }
                Some(Ok(WsMessage::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => idle.as_mut().reset(tokio::time::Instant::now() + idle_timeout),
            },
        }
    }
    if let Some(Session {
        conversation: Some(conversation),
        connection,
        ..
    }) = session
    {
        state.chat.detach(conversation, connection);
        tokio::spawn(abandon_unless_back(state, conversation));
    }
}

impl ChatHub {
    fn is_open(&self, conversation: Ulid) -> bool {
        self.connections
            .lock()
            .map(|connections| connections.contains_key(&conversation))
            .unwrap_or(false)
    }
}

/// A chat closed: if no socket of the conversation is back after the grace period and no agent
/// has answered it yet (it still waits or is only offered), the customer left: abandoned.
async fn abandon_unless_back(state: AppState, conversation: Ulid) {
    tokio::time::sleep(Duration::from_secs(
        state.chat_settings.abandon_after_seconds,
    ))
    .await;
    if state.chat.is_open(conversation) {
        return;
    }
    let routing: Result<Option<views::Routing>, _> = state
        .actions
        .read_router(RouterRead::Conversation { conversation })
        .await;
    let Ok(Some(routing)) = routing else {
        return;
    };
    if !matches!(routing.state.as_str(), "waiting" | "offered") {
        return;
    }
    if let Err(refusal) = state.actions.customer_left(conversation).await {
        debug!(reason = %refusal.message, %conversation, "could not count an abandoned chat");
    }
}

/// Is `visitor` a usable visitor id: 16–64 characters of `A-Z a-z 0-9 - _`?
pub fn valid_visitor(visitor: &str) -> bool {
    (16..=64).contains(&visitor.len())
        && visitor
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Checks the host site's signature of a customer id (constant-time).
pub fn verify_customer(secret: &Secret, customer: &SignedCustomer) -> bool {
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.expose().as_bytes()) else {
        return false;
    };
    mac.update(customer.id.as_bytes());
    let Ok(signature) = hex::decode(customer.signature.trim()) else {
        return false;
    };
    mac.verify_slice(&signature).is_ok()
}

/// Answers one frame; pushes of the session go through `pushes` once it knows its conversation.
async fn handle(
    state: &AppState,
    session: &mut Option<Session>,
    pushes: &mpsc::UnboundedSender<Value>,
    frame: ClientFrame,
) -> Vec<Value> {
    match frame {
        ClientFrame::Start {
            visitor_id,
            conversation_id,
            after_seq,
            customer,
            name,
        } => {
            if session.is_some() {
                return vec![error_frame("already_started", "the session has started")];
            }
            start(
                state,
                session,
                pushes,
                visitor_id,
                conversation_id,
                after_seq,
                customer,
                name,
            )
            .await
        }
        frame => {
            let Some(current) = session.as_mut() else {
                return vec![error_frame("not_started", "send `start` first")];
            };
            match frame {
                ClientFrame::Message {
                    client_message_id,
                    text,
                } => send_message(state, current, client_message_id, text).await,
                ClientFrame::Typing { active } => {
                    notify_agent(
                        state,
                        current,
                        json!({ "type": "customer_typing", "active": active }),
                    )
                    .await;
                    Vec::new()
                }
                ClientFrame::Read { seq } => {
                    notify_agent(
                        state,
                        current,
                        json!({ "type": "customer_read", "seq": seq }),
                    )
                    .await;
                    Vec::new()
                }
                ClientFrame::Rate { score, comment } => rate(state, current, score, comment).await,
                ClientFrame::Offline {
                    client_message_id,
                    name,
                    email,
                    text,
                } => offline_message(state, current, client_message_id, name, email, text).await,
                ClientFrame::Start { .. } => Vec::new(),
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn start(
    state: &AppState,
    session: &mut Option<Session>,
    pushes: &mpsc::UnboundedSender<Value>,
    visitor: String,
    conversation: Option<String>,
    after_seq: u64,
    customer: Option<SignedCustomer>,
    name: Option<String>,
) -> Vec<Value> {
    if !valid_visitor(&visitor) {
        return vec![error_frame(
            "bad_visitor_id",
            "visitor_id must be 16–64 characters of A-Z, a-z, 0-9, - and _",
        )];
    }
    let customer_id = match customer {
        None => None,
        Some(customer) => match &state.chat_settings.customer_secret {
            Some(secret) if verify_customer(secret, &customer) => Some(customer.id),
            Some(_) => {
                return vec![error_frame(
                    "bad_signature",
                    "the customer id's signature does not verify",
                )];
            }
            None => {
                return vec![error_frame(
                    "unverifiable_customer",
                    "this server has no chat.customer_secret to verify customer ids with",
                )];
            }
        },
    };
    let mut answers = Vec::new();
    let mut resumed = None;
    if let Some(text) = conversation {
        let Ok(id) = Ulid::from_string(&text) else {
            return vec![error_frame(
                "unknown_conversation",
                "conversation_id is not a ULID",
            )];
        };
        let history = match state.actions.store.messages(id).await {
            Ok(history) => history,
            Err(error) => return vec![error_frame("unavailable", error.to_string())],
        };
        // The visitor id is the session's bearer: only its own conversation can be resumed.
        let owned = history.iter().any(|message| {
            message.direction == Direction::Inbound
                && message.channel == CHANNEL
                && message.from_address == visitor
        });
        if !owned {
            return vec![error_frame(
                "unknown_conversation",
                "no conversation of this visitor has that id",
            )];
        }
        answers.extend(
            numbered(&history)
                .filter(|(seq, _)| *seq > after_seq)
                .map(|(seq, message)| message_frame(seq, message)),
        );
        resumed = Some(id);
    }
    let connection = state.chat.new_connection();
    if let Some(id) = resumed {
        state.chat.attach(id, connection, pushes.clone());
        if let Ok(Some(routing)) = state
            .actions
            .read_router::<Option<views::Routing>>(RouterRead::Conversation { conversation: id })
            .await
        {
            if routing.state == "assigned"
                && let Some(agent) = routing.agent_id
            {
                answers.push(json!({ "type": "agent_joined", "agent_id": agent }));
            } else if routing.state == "waiting"
                && let Ok(positions) = state
                    .actions
                    .read_router::<HashMap<String, QueuePosition>>(RouterRead::QueuePositions {
                        conversations: vec![id],
                    })
                    .await
                && let Some(position) = positions.get(&id.to_string())
            {
                state.chat.tell_position(id, *position);
                answers.push(queued_frame(position));
            }
        }
    }
    answers.insert(
        0,
        json!({
            "type": "session",
            "visitor_id": visitor,
            "conversation_id": resumed.map(|id| id.to_string()),
            "customer_id": customer_id,
            "max_message_chars": state.chat_settings.max_message_chars,
            "online": agents_online(state).await,
            "offline_reply_by_email": state.email_replies,
        }),
    );
    *session = Some(Session {
        visitor,
        customer_id,
        name: name.filter(|name| !name.trim().is_empty() && name.len() <= 200),
        conversation: resumed,
        connection,
        pushes: pushes.clone(),
        bucket: RateBucket::new(state.chat_settings.messages_per_minute),
    });
    answers
}

async fn send_message(
    state: &AppState,
    session: &mut Session,
    client_message_id: String,
    text: String,
) -> Vec<Value> {
    send_message_with(state, session, client_message_id, text, Vec::new()).await
}

/// A customer message, with other identities of the customer to link (an offline form's email).
async fn send_message_with(
    state: &AppState,
    session: &mut Session,
    client_message_id: String,
    text: String,
    links: Vec<IdentityLink>,
) -> Vec<Value> {
    if let Err(refusal) = admit_customer_text(state, session, &client_message_id, &text) {
        return vec![refusal];
    }
    let message = InboundMessage {
        schema: MESSAGE_SCHEMA.into(),
        id: None,
        channel: CHANNEL.into(),
        provider: PROVIDER.into(),
        provider_message_id: format!("{}:{client_message_id}", session.visitor),
        thread_key: Some(format!("webchat:{}", session.visitor)),
        from: Address {
            address: session.visitor.clone(),
            name: session.name.clone(),
        },
        to: None,
        customer: CustomerHints {
            id: session.customer_id.clone(),
            name: session.name.clone(),
            links,
            ..CustomerHints::default()
        },
        subject: None,
        text,
        html: None,
        attachments: Vec::new(),
        received_at: None,
        metadata: Default::default(),
    };
    let receipt = match state.actions.ingest(message, Instant::now()).await {
        Ok(receipt) => receipt,
        Err(refusal) => {
            return vec![client_error(
                refusal.code,
                refusal.message,
                &client_message_id,
            )];
        }
    };
    if session.conversation != Some(receipt.conversation_id) {
        if let Some(previous) = session.conversation {
            state.chat.detach(previous, session.connection);
        }
        session.conversation = Some(receipt.conversation_id);
        state.chat.attach(
            receipt.conversation_id,
            session.connection,
            session.pushes.clone(),
        );
    }
    let seq = match state.actions.store.messages(receipt.conversation_id).await {
        Ok(history) => numbered(&history)
            .find(|(_, message)| message.id == receipt.message_id)
            .map(|(seq, _)| seq),
        Err(_) => None,
    };
    vec![json!({
        "type": "ack",
        "client_message_id": client_message_id,
        "message_id": receipt.message_id.to_string(),
        "conversation_id": receipt.conversation_id.to_string(),
        "seq": seq,
        "duplicate": receipt.duplicate,
    })]
}

/// Whether a chat would be answered now (otherwise the widget shows the offline form).
async fn agents_online(state: &AppState) -> bool {
    state
        .actions
        .read_router(RouterRead::Answering {
            channel: CHANNEL.into(),
        })
        .await
        .unwrap_or(false)
}

/// Stores the customer's rating of the session's resolved conversation, with `conversation.rated`.
/// One rating per conversation: a second is refused (`already_rated`).
async fn rate(state: &AppState, session: &Session, score: i64, comment: String) -> Vec<Value> {
    let Some(conversation) = session.conversation else {
        return vec![error_frame(
            "not_resolved",
            "this session has no conversation to rate",
        )];
    };
    let Some(score) = u8::try_from(score)
        .ok()
        .filter(|score| (1..=5).contains(score))
    else {
        return vec![error_frame("bad_score", "score must be 1, 2, 3, 4 or 5")];
    };
    if comment.chars().count() > MAX_RATING_COMMENT_CHARS {
        return vec![error_frame(
            "comment_too_long",
            format!("a comment has at most {MAX_RATING_COMMENT_CHARS} characters"),
        )];
    }
    match state.actions.store.conversation(conversation).await {
        Ok(Some(record)) if record.status != ConversationStatus::Open => {}
        Ok(_) => {
            return vec![error_frame(
                "not_resolved",
                "a conversation can be rated once it is resolved",
            )];
        }
        Err(error) => return vec![error_frame("unavailable", error.to_string())],
    }
    let agent_id = state
        .actions
        .read_router::<Option<views::Routing>>(RouterRead::Conversation { conversation })
        .await
        .ok()
        .flatten()
        .filter(|routing| routing.state == "resolved")
        .and_then(|routing| routing.agent_id);
    let rating = Rating {
        conversation_id: conversation,
        score,
        comment: comment.trim().to_owned(),
        agent_id,
        rated_at: chrono::Utc::now(),
    };
    let event = events::conversation_rated(&rating);
    match state.actions.store.rate(rating, vec![event]).await {
        Ok(true) => {
            state.actions.outbound.events_written();
            vec![
                json!({ "type": "rated", "conversation_id": conversation.to_string(), "score": score }),
            ]
        }
        Ok(false) => vec![error_frame(
            "already_rated",
            "this conversation has been rated already",
        )],
        Err(error) => vec![error_frame("unavailable", error.to_string())],
    }
}

/// The offline form: stored like any message and routed, so it waits for the next agent. With an
/// email address (and the email channel able to send), it is stored as an email from that address
/// (provider `webchat`), so the conversation's reply route is email and the answer goes out by mail;
/// the browser's visitor id is linked to the same contact. Without one it is a chat message,
/// answered in the chat when the customer comes back; an address given then is linked to the contact.
async fn offline_message(
    state: &AppState,
    session: &mut Session,
    client_message_id: String,
    name: Option<String>,
    email: Option<String>,
    text: String,
) -> Vec<Value> {
    let email = email
        .map(|email| email.trim().to_owned())
        .filter(|email| !email.is_empty());
    if let Some(email) = &email
        && (email.len() > 254 || email.parse::<lettre::Address>().is_err())
    {
        return vec![client_error(
            "bad_email",
            "the email address is not valid",
            &client_message_id,
        )];
    }
    let name = name
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty() && name.chars().count() <= 200);
    if name.is_some() {
        session.name = name;
    }
    let email = match email {
        Some(email) if state.email_replies => email,
        other => {
            let links = other
                .map(|email| IdentityLink {
                    kind: "email".into(),
                    value: email,
                })
                .into_iter()
                .collect();
            let mut answers =
                send_message_with(state, session, client_message_id, text, links).await;
            if let Some(ack) = answers.first_mut()
                && ack["type"] == "ack"
            {
                ack["type"] = Value::String("offline_received".into());
                ack["reply_by"] = Value::String("chat".into());
            }
            return answers;
        }
    };
    if let Err(refusal) = admit_customer_text(state, session, &client_message_id, &text) {
        return vec![refusal];
    }
    let mut metadata = serde_json::Map::new();
    // Loop protection reads this on every email: a person wrote it.
    metadata.insert("auto_reply".into(), Value::Bool(false));
    metadata.insert("source".into(), Value::String("chat_offline_form".into()));
    let message = InboundMessage {
        schema: MESSAGE_SCHEMA.into(),
        id: None,
        channel: "email".into(),
        provider: PROVIDER.into(),
        provider_message_id: format!("{}:{client_message_id}", session.visitor),
        thread_key: Some(format!(
            "webchat-offline:{}:{client_message_id}",
            session.visitor
        )),
        from: Address {
            address: email,
            name: session.name.clone(),
        },
        to: None,
        customer: CustomerHints {
            id: session.customer_id.clone(),
            name: session.name.clone(),
            links: vec![IdentityLink {
                kind: CHANNEL.into(),
                value: session.visitor.clone(),
            }],
            ..CustomerHints::default()
        },
        subject: Some("Your message from our web chat".into()),
        text,
        html: None,
        attachments: Vec::new(),
        received_at: None,
        metadata: metadata.into_iter().collect(),
    };
    match state.actions.ingest(message, Instant::now()).await {
        Ok(receipt) => vec![json!({
            "type": "offline_received",
            "client_message_id": client_message_id,
            "message_id": receipt.message_id.to_string(),
            "conversation_id": receipt.conversation_id.to_string(),
            "duplicate": receipt.duplicate,
            "reply_by": "email",
        })],
        Err(refusal) => vec![client_error(
            refusal.code,
            refusal.message,
            &client_message_id,
        )],
    }
}

/// Tells the agent who holds the session's conversation (typing, read receipts).
async fn notify_agent(state: &AppState, session: &Session, mut push: Value) {
    let Some(conversation) = session.conversation else {
        return;
    };
    let Ok(Some(routing)) = state
        .actions
        .read_router::<Option<views::Routing>>(RouterRead::Conversation { conversation })
        .await
    else {
        return;
    };
    if routing.state != "assigned" {
        return;
    }
    if let Some(agent) = routing.agent_id {
        push["conversation_id"] = Value::String(conversation.to_string());
        state.signals.to_agent(&AgentId::new(&agent), &push);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn frames_are_read_strictly() {
        let frame = parse_frame(
            r#"{"type":"start","visitor_id":"visitor_0123456789abcdef","customer":{"id":"c","signature":"00"}}"#,
        )
        .unwrap();
        let ClientFrame::Start {
            visitor_id,
            after_seq,
            customer: Some(customer),
            ..
        } = frame
        else {
            panic!("{frame:?}");
        };
        assert_eq!(
            (visitor_id.as_str(), after_seq, customer.id.as_str()),
            ("visitor_0123456789abcdef", 0, "c")
        );
        for refused in [
            r#"{"type":"typing","active":true,"extra":1}"#,
            r#"{"type":"shout","text":"hi"}"#,
            r#"{"type":"read","seq":-1}"#,
            r#"{"type":"message","text":"no id"}"#,
            "not json",
        ] {
            assert!(parse_frame(refused).is_err(), "{refused}");
        }
    }

    #[test]
    fn a_customer_id_verifies_only_with_its_own_signature() {
        let secret = Secret::new("s3cret");
        let signature = "00".repeat(32);
        let mut mac = Hmac::<Sha256>::new_from_slice(b"s3cret").unwrap();
        mac.update(b"cust-42");
        let good = hex::encode(mac.finalize().into_bytes());
        assert!(verify_customer(
            &secret,
            &SignedCustomer {
                id: "cust-42".into(),
                signature: good.clone()
            }
        ));
        assert!(!verify_customer(
            &secret,
            &SignedCustomer {
                id: "cust-43".into(),
                signature: good
            }
        ));
        assert!(!verify_customer(
            &secret,
            &SignedCustomer {
                id: "cust-42".into(),
                signature
            }
        ));
    }

    #[test]
    fn the_rate_bucket_allows_a_burst_then_refills_evenly() {
        let mut bucket = RateBucket::new(60);
        let start = bucket.last;
        for _ in 0..60 {
            assert!(bucket.take(start).is_ok());
        }
        assert!(bucket.take(start).is_err());
        assert!(bucket.take(start + Duration::from_millis(1100)).is_ok());
        assert!(bucket.take(start + Duration::from_millis(1100)).is_err());
    }

    #[test]
    fn origins_are_checked_only_when_a_list_is_configured() {
        let mut settings = ChatSection::default();
        assert!(origin_allowed(&settings, None));
        settings.allowed_origins = vec!["https://shop.example".into()];
        assert!(origin_allowed(&settings, Some("https://shop.example")));
        assert!(!origin_allowed(&settings, Some("https://evil.example")));
        assert!(!origin_allowed(&settings, None));
    }

    #[test]
    fn visitor_ids_are_long_random_tokens() {
        assert!(valid_visitor("v_0123456789abcdef"));
        assert!(!valid_visitor("short"));
        assert!(!valid_visitor("has space 0123456789"));
    }
}
