//! The HTTP API (`/v1`, JSON): ingest, agents (REST and WebSocket), admin, health and metrics.
//!
//! Every error is a JSON body `{"error": {"code": "...", "message": "..."}}` with a 4xx/5xx status that
//! names the problem. An ingest is answered 2xx only after the message is committed to the store.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::ws::{Message as WsMessage, WebSocket, WebSocketUpgrade};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use chrono::Utc;
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::{Value, json};
use ulid::Ulid;

use super::engine::{AgentAction, EngineError, EngineHandle, Ingested};
use super::hub::AgentHub;
use super::metrics::Metrics;
use super::outbound::Outbound;
use super::persist::parse_presence;
use crate::config::AuthSection;
use crate::message::InboundMessage;
use crate::routing::{
    AgentId, CommandError, ConversationId, ConversationState, QueueName, TransferTarget,
};
use crate::store::{
    ConversationFilter, ConversationStatus, IngestOutcome, NewReply, Store, StoreError,
};

/// Shared state of every handler.
#[derive(Debug, Clone)]
pub struct AppState {
    pub engine: EngineHandle,
    pub store: Arc<dyn Store>,
    pub hub: Arc<AgentHub>,
    pub metrics: Metrics,
    pub auth: Arc<RwLock<AuthSection>>,
    pub outbound: Outbound,
    /// False once shutdown began: intake answers 503.
    pub accepting: Arc<AtomicBool>,
    /// Reloads the configuration from its sources (file + environment captured at start).
    pub reloader: super::Reloader,
}

/// An API error: status, a stable code, and a message for people.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(json!({ "error": { "code": self.code, "message": self.message } })),
        )
            .into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::NotFound(what) => ApiError::new(StatusCode::NOT_FOUND, "not_found", what),
            other => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                other.to_string(),
            ),
        }
    }
}

impl From<EngineError> for ApiError {
    fn from(error: EngineError) -> Self {
        match error {
            EngineError::Command(command) => {
                let (status, code) = match &command {
                    CommandError::UnknownAgent(_) => (StatusCode::NOT_FOUND, "unknown_agent"),
                    CommandError::UnknownConversation(_) => {
                        (StatusCode::NOT_FOUND, "unknown_conversation")
                    }
                    CommandError::UnknownQueue(_) => (StatusCode::NOT_FOUND, "unknown_queue"),
                    CommandError::NotOffered { .. } => (StatusCode::CONFLICT, "not_offered"),
                    CommandError::NotOwner { .. } => (StatusCode::CONFLICT, "not_owner"),
                    CommandError::NoNextTier(_) => (StatusCode::CONFLICT, "no_next_tier"),
                    CommandError::TransferToSelf => {
                        (StatusCode::UNPROCESSABLE_ENTITY, "transfer_to_self")
                    }
                    CommandError::QueueRejectsChannel { .. } => {
                        (StatusCode::UNPROCESSABLE_ENTITY, "queue_rejects_channel")
                    }
                    CommandError::DuplicateConversation(_) => {
                        (StatusCode::CONFLICT, "duplicate_conversation")
                    }
                    CommandError::InvalidConfig(_) => {
                        (StatusCode::UNPROCESSABLE_ENTITY, "invalid_config")
                    }
                };
                ApiError::new(status, code, command.to_string())
            }
            EngineError::Store(store) => store.into(),
            EngineError::Stopped => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting_down",
                "switchboard is shutting down",
            ),
        }
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// Builds the API router.
pub fn router(state: AppState, body_limit: usize) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/openapi.json", get(openapi))
        .route("/v1/messages", post(ingest))
        .route("/v1/agents/{agent}", get(agent_view))
        .route("/v1/agents/{agent}/presence", put(agent_presence))
        .route("/v1/agents/{agent}/conversations", get(agent_conversations))
        .route(
            "/v1/agents/{agent}/conversations/{conversation}/messages",
            get(agent_history),
        )
        .route(
            "/v1/agents/{agent}/conversations/{conversation}/{action}",
            post(agent_action),
        )
        .route("/v1/agents/{agent}/stream", get(agent_stream))
        .route("/v1/admin/queues", get(admin_queues))
        .route("/v1/admin/agents", get(admin_agents))
        .route("/v1/admin/conversations", get(admin_conversations))
        .route(
            "/v1/admin/conversations/{conversation}",
            get(admin_conversation),
        )
        .route("/v1/admin/reload", post(admin_reload))
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(state)
}

// ----- auth -------------------------------------------------------------------------------------

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
}

fn unauthorized() -> ApiError {
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "missing or invalid bearer token",
    )
}

fn require_ingest(state: &AppState, headers: &HeaderMap) -> ApiResult<()> {
    let token = bearer(headers).ok_or_else(unauthorized)?;
    let auth = state.auth.read().map_err(|_| unauthorized())?;
    if auth.ingest_tokens.iter().any(|known| known.matches(token)) {
        Ok(())
    } else {
        Err(forbidden_or_unknown(&auth, token))
    }
}

fn require_admin(state: &AppState, headers: &HeaderMap) -> ApiResult<()> {
    let token = bearer(headers).ok_or_else(unauthorized)?;
    let auth = state.auth.read().map_err(|_| unauthorized())?;
    if auth.admin_tokens.iter().any(|known| known.matches(token)) {
        Ok(())
    } else {
        Err(forbidden_or_unknown(&auth, token))
    }
}

/// The agent path segment must be the token's own agent: agent A cannot act as agent B.
fn require_agent(
    state: &AppState,
    headers: &HeaderMap,
    query_token: Option<&str>,
    agent: &str,
) -> ApiResult<AgentId> {
    let token = bearer(headers).or(query_token).ok_or_else(unauthorized)?;
    let auth = state.auth.read().map_err(|_| unauthorized())?;
    match auth.agent_tokens.get(agent) {
        Some(known) if known.matches(token) => Ok(AgentId::new(agent)),
        _ => Err(forbidden_or_unknown(&auth, token)),
    }
}

/// A valid token of another kind (or another agent's) is forbidden; an unknown one is unauthorized.
fn forbidden_or_unknown(auth: &AuthSection, token: &str) -> ApiError {
    let known = auth
        .ingest_tokens
        .iter()
        .chain(&auth.admin_tokens)
        .chain(auth.agent_tokens.values())
        .any(|secret| secret.matches(token));
    if known {
        ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "this token may not do that",
        )
    } else {
        unauthorized()
    }
}

fn parse_json<T: serde::de::DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> ApiResult<T> {
    let bytes = body.map_err(|rejection| {
        let status = rejection.status();
        let code = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "too_large"
        } else {
            "bad_body"
        };
        ApiError::new(status, code, rejection.body_text())
    })?;
    serde_json::from_slice(&bytes).map_err(|error| {
        let status = if error.is_data() {
            StatusCode::UNPROCESSABLE_ENTITY
        } else {
            StatusCode::BAD_REQUEST
        };
        ApiError::new(status, "invalid_json", error.to_string())
    })
}

fn conversation_id(text: &str) -> ApiResult<Ulid> {
    text.parse::<Ulid>().map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_id",
            format!("`{text}` is not a conversation id (ULID)"),
        )
    })
}

fn intake_open(state: &AppState) -> ApiResult<()> {
    if state.accepting.load(Ordering::SeqCst) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "switchboard is shutting down; retry on another instance",
        ))
    }
}

// ----- health and metrics -----------------------------------------------------------------------

async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

async fn readyz(State(state): State<AppState>) -> Response {
    if !state.accepting.load(Ordering::SeqCst) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "shutting_down" })),
        )
            .into_response();
    }
    match state.store.check_writable().await {
        Ok(()) if state.metrics.ready.get() == 1 => {
            Json(json!({ "status": "ready", "store": "writable" })).into_response()
        }
        Ok(()) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "recovering" })),
        )
            .into_response(),
        Err(error) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "store_unavailable", "error": error.to_string() })),
        )
            .into_response(),
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    if let Ok(backlog) = state.store.outbox_backlog().await {
        state
            .metrics
            .outbox_backlog
            .set(i64::try_from(backlog).unwrap_or(i64::MAX));
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

async fn openapi() -> Json<Value> {
    Json(super::openapi::document())
}

// ----- ingest -----------------------------------------------------------------------------------

/// `POST /v1/messages`: the generic `api` channel (bots, IVR, CRM), and any system that already has a
/// normalised message. Idempotent by (channel, provider_message_id).
async fn ingest(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let received = Instant::now();
    require_ingest(&state, &headers)?;
    intake_open(&state)?;
    let message: InboundMessage = parse_json(body)?;
    message.validate().map_err(|error| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_message",
            error.to_string(),
        )
    })?;
    let (status, document) = ingest_message(&state, message, received).await?;
    Ok((status, Json(document)).into_response())
}

/// The one intake path after parsing: store (durably), then hand to the router. Channel adapters and
/// the bus call this too.
pub async fn ingest_message(
    state: &AppState,
    message: InboundMessage,
    received: Instant,
) -> ApiResult<(StatusCode, Value)> {
    let channel = message.channel.clone();
    let started = Instant::now();
    let outcome = state.store.ingest(message.clone(), Utc::now()).await?;
    state
        .metrics
        .store_commit_seconds
        .with_label_values(&["ingest"])
        .observe(started.elapsed().as_secs_f64());
    match outcome {
        IngestOutcome::Duplicate {
            message_id,
            conversation_id,
        } => {
            state
                .metrics
                .messages_duplicate
                .with_label_values(&[&channel])
                .inc();
            Ok((
                StatusCode::OK,
                json!({ "message_id": message_id.to_string(), "conversation_id": conversation_id.to_string(), "duplicate": true }),
            ))
        }
        IngestOutcome::Stored {
            message_id,
            conversation_id,
            contact_id,
            new_conversation,
        } => {
            state
                .metrics
                .messages_received
                .with_label_values(&[&channel])
                .inc();
            let mut message = message;
            message.id = Some(message_id);
            state
                .engine
                .ingested(Ingested {
                    message_id,
                    conversation_id,
                    contact_id: Some(contact_id),
                    new_conversation,
                    message,
                    received,
                })
                .await?;
            Ok((
                StatusCode::ACCEPTED,
                json!({
                    "message_id": message_id.to_string(),
                    "conversation_id": conversation_id.to_string(),
                    "contact_id": contact_id.to_string(),
                    "new_conversation": new_conversation,
                    "duplicate": false
                }),
            ))
        }
    }
}

// ----- agents -----------------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PresenceBody {
    presence: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TransferBody {
    #[serde(default)]
    to_agent: Option<String>,
    #[serde(default)]
    to_queue: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplyBody {
    text: String,
    #[serde(default)]
    html: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
struct TokenQuery {
    access_token: Option<String>,
}

async fn agent_view(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(agent): Path<String>,
) -> ApiResult<Json<Value>> {
    let agent = require_agent(&state, &headers, None, &agent)?;
    let view = state
        .engine
        .inspect(move |router| router.agent(&agent))
        .await?;
    let view = view.ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_agent",
            "no such agent in the configuration",
        )
    })?;
    Ok(Json(super::views::agent(&view)))
}

async fn agent_presence(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(agent): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<Value>> {
    let agent = require_agent(&state, &headers, None, &agent)?;
    let body: PresenceBody = parse_json(body)?;
    let presence = parse_presence(&body.presence).ok_or_else(|| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "bad_presence",
            "presence must be available, away or offline",
        )
    })?;
    state
        .engine
        .agent(agent, AgentAction::Presence(presence))
        .await?;
    Ok(Json(json!({ "presence": presence.as_str() })))
}

async fn agent_conversations(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(agent): Path<String>,
) -> ApiResult<Json<Value>> {
    let agent = require_agent(&state, &headers, None, &agent)?;
    let views = state
        .engine
        .inspect(move |router| {
            let view = router.agent(&agent)?;
            let list = |ids: &[ConversationId]| {
                ids.iter()
                    .filter_map(|id| router.conversation(*id))
                    .map(|c| super::views::conversation(&c))
                    .collect::<Vec<_>>()
            };
            Some(json!({ "offers": list(&view.offers), "assigned": list(&view.assigned) }))
        })
        .await?;
    views.map(Json).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_agent",
            "no such agent in the configuration",
        )
    })
}

/// May this agent see the conversation? Its owner, the agent it is offered to, or its follower.
async fn agent_may_see(state: &AppState, agent: &AgentId, conversation: Ulid) -> ApiResult<()> {
    let agent = agent.clone();
    let allowed = state
        .engine
        .inspect(move |router| {
            router
                .conversation(ConversationId(conversation.0))
                .is_some_and(|view| {
                    let holder = match &view.state {
                        ConversationState::Offered { agent, .. }
                        | ConversationState::Assigned { agent, .. }
                        | ConversationState::Resolved { agent, .. } => Some(agent),
                        ConversationState::Waiting => None,
                    };
                    holder == Some(&agent) || view.follower.as_ref() == Some(&agent)
                })
        })
        .await?;
    if allowed {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "not_yours",
            "this conversation is not offered to, owned or followed by you",
        ))
    }
}

async fn agent_history(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path((agent, conversation)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let agent = require_agent(&state, &headers, None, &agent)?;
    let conversation = conversation_id(&conversation)?;
    agent_may_see(&state, &agent, conversation).await?;
    let messages = state.store.messages(conversation).await?;
    let record = state.store.conversation(conversation).await?;
    Ok(Json(json!({
        "conversation_id": conversation.to_string(),
        "reply_channel": record.as_ref().map(|r| r.reply_route.channel.clone()),
        "messages": messages.iter().map(super::views::message).collect::<Vec<_>>(),
    })))
}

async fn agent_action(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path((agent, conversation, action)): Path<(String, String, String)>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let agent = require_agent(&state, &headers, None, &agent)?;
    let conversation = conversation_id(&conversation)?;
    let id = ConversationId(conversation.0);
    let command = match action.as_str() {
        "accept" => AgentAction::Accept(id),
        "reject" => AgentAction::Reject(id),
        "resolve" => AgentAction::Resolve(id),
        "escalate" => AgentAction::Escalate(id),
        "transfer" => {
            let body: TransferBody = parse_json(body)?;
            AgentAction::Transfer(id, transfer_target(body)?)
        }
        "reply" => {
            let body: ReplyBody = parse_json(body)?;
            let message_id = reply(&state, &agent, conversation, body.text, body.html).await?;
            return Ok((
                StatusCode::ACCEPTED,
                Json(json!({ "message_id": message_id.to_string(), "status": "pending" })),
            )
                .into_response());
        }
        other => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "unknown_action",
                format!("no action `{other}`"),
            ));
        }
    };
    state.engine.agent(agent, command).await?;
    Ok(
        Json(json!({ "conversation_id": conversation.to_string(), "done": action }))
            .into_response(),
    )
}

fn transfer_target(body: TransferBody) -> ApiResult<TransferTarget> {
    match (body.to_agent, body.to_queue) {
        (Some(agent), None) => Ok(TransferTarget::Agent(AgentId::new(&agent))),
        (None, Some(queue)) => Ok(TransferTarget::Queue(QueueName::new(&queue))),
        _ => Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "bad_transfer",
            "give exactly one of to_agent or to_queue",
        )),
    }
}

/// Stores an agent's reply and queues it for delivery on the customer's last channel.
async fn reply(
    state: &AppState,
    agent: &AgentId,
    conversation: Ulid,
    text: String,
    html: Option<String>,
) -> ApiResult<Ulid> {
    if text.trim().is_empty() {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "empty_reply",
            "a reply needs text",
        ));
    }
    let owner = agent.clone();
    let owns = state
        .engine
        .inspect(move |router| {
            matches!(router.conversation(ConversationId(conversation.0)).map(|view| view.state),
                Some(ConversationState::Assigned { agent, .. }) if agent == owner)
        })
        .await?;
    if !owns {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "not_owner",
            "only the agent who owns a conversation can reply",
        ));
    }
    let record = state
        .store
        .conversation(conversation)
        .await?
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
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
    state.store.store_reply(reply, Vec::new()).await?;
    state.outbound.deliver(id);
    Ok(id)
}

const AGENT_SOCKET_READ_BUFFER: usize = 8 * 1024;

/// `GET /v1/agents/{agent}/stream`: a WebSocket pushing offers, assignments, customer messages and
/// follow-ups, and taking the same commands as the REST endpoints (`{"type": "accept", ...}`).
async fn agent_stream(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(agent): Path<String>,
    Query(query): Query<TokenQuery>,
    upgrade: WebSocketUpgrade,
) -> ApiResult<Response> {
    let agent = require_agent(&state, &headers, query.access_token.as_deref(), &agent)?;
    // Agents send small commands: the 128 KiB default read buffer is zero-filled on every read,
    // which cost more CPU than the rest of the socket's work together under load.
    Ok(upgrade
        .read_buffer_size(AGENT_SOCKET_READ_BUFFER)
        .on_upgrade(move |socket| agent_socket(state, agent, socket)))
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
enum SocketCommand {
    Presence {
        presence: String,
        #[serde(default)]
        request_id: Option<String>,
    },
    Accept {
        conversation_id: String,
        #[serde(default)]
        request_id: Option<String>,
    },
    Reject {
        conversation_id: String,
        #[serde(default)]
        request_id: Option<String>,
    },
    Resolve {
        conversation_id: String,
        #[serde(default)]
        request_id: Option<String>,
    },
    Escalate {
        conversation_id: String,
        #[serde(default)]
        request_id: Option<String>,
    },
    Transfer {
        conversation_id: String,
        #[serde(default)]
        to_agent: Option<String>,
        #[serde(default)]
        to_queue: Option<String>,
        #[serde(default)]
        request_id: Option<String>,
    },
    Reply {
        conversation_id: String,
        text: String,
        #[serde(default)]
        html: Option<String>,
        #[serde(default)]
        request_id: Option<String>,
    },
}

async fn agent_socket(state: AppState, agent: AgentId, socket: WebSocket) {
    let (connection, mut pushes) = state.hub.connect(&agent);
    let (mut sender, mut receiver) = socket.split();
    let hello = match state
        .engine
        .inspect({
            let agent = agent.clone();
            move |router| router.agent(&agent)
        })
        .await
    {
        Ok(Some(view)) => json!({ "type": "hello", "agent": super::views::agent(&view) }),
        _ => json!({ "type": "hello" }),
    };
    if sender
        .send(WsMessage::Text(hello.to_string().into()))
        .await
        .is_err()
    {
        state.hub.disconnect(&agent, connection);
        return;
    }
    loop {
        tokio::select! {
            push = pushes.recv() => match push {
                Some(push) => if sender.send(WsMessage::Text(push.to_string().into())).await.is_err() { break },
                None => break,
            },
            incoming = receiver.next() => match incoming {
                Some(Ok(WsMessage::Text(text))) => {
                    let answer = socket_command(&state, &agent, &text).await;
                    if sender.send(WsMessage::Text(answer.to_string().into())).await.is_err() { break }
                }
                Some(Ok(WsMessage::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => {}
            },
        }
    }
    if state.hub.disconnect(&agent, connection) {
        // The desktop's last connection is gone: its pending offers go to someone else.
        let _ = state.engine.agent(agent, AgentAction::Disconnected).await;
    }
}

async fn socket_command(state: &AppState, agent: &AgentId, text: &str) -> Value {
    let command: SocketCommand = match serde_json::from_str(text) {
        Ok(command) => command,
        Err(error) => {
            return json!({ "type": "error", "error": { "code": "bad_command", "message": error.to_string() } });
        }
    };
    let parse = |id: &str| conversation_id(id).map(|ulid| (ulid, ConversationId(ulid.0)));
    let (request_id, result): (Option<String>, ApiResult<Value>) = match command {
        SocketCommand::Presence {
            presence,
            request_id,
        } => (
            request_id,
            match parse_presence(&presence) {
                Some(presence) => state
                    .engine
                    .agent(agent.clone(), AgentAction::Presence(presence))
                    .await
                    .map(|()| json!({}))
                    .map_err(Into::into),
                None => Err(ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "bad_presence",
                    "presence must be available, away or offline",
                )),
            },
        ),
        SocketCommand::Accept {
            conversation_id,
            request_id,
        } => (
            request_id,
            simple(state, agent, &conversation_id, AgentAction::Accept).await,
        ),
        SocketCommand::Reject {
            conversation_id,
            request_id,
        } => (
            request_id,
            simple(state, agent, &conversation_id, AgentAction::Reject).await,
        ),
        SocketCommand::Resolve {
            conversation_id,
            request_id,
        } => (
            request_id,
            simple(state, agent, &conversation_id, AgentAction::Resolve).await,
        ),
        SocketCommand::Escalate {
            conversation_id,
            request_id,
        } => (
            request_id,
            simple(state, agent, &conversation_id, AgentAction::Escalate).await,
        ),
        SocketCommand::Transfer {
            conversation_id,
            to_agent,
            to_queue,
            request_id,
        } => {
            let result = async {
                let (_, id) = parse(&conversation_id)?;
                let target = transfer_target(TransferBody { to_agent, to_queue })?;
                state
                    .engine
                    .agent(agent.clone(), AgentAction::Transfer(id, target))
                    .await?;
                Ok(json!({}))
            }
            .await;
            (request_id, result)
        }
        SocketCommand::Reply {
            conversation_id,
            text,
            html,
            request_id,
        } => {
            let result = async {
                let (ulid, _) = parse(&conversation_id)?;
                let message_id = reply(state, agent, ulid, text, html).await?;
                Ok(json!({ "message_id": message_id.to_string() }))
            }
            .await;
            (request_id, result)
        }
    };
    match result {
        Ok(detail) => json!({ "type": "ack", "request_id": request_id, "result": detail }),
        Err(error) => {
            json!({ "type": "error", "request_id": request_id, "error": { "code": error.code, "message": error.message } })
        }
    }
}

async fn simple(
    state: &AppState,
    agent: &AgentId,
    conversation: &str,
    action: fn(ConversationId) -> AgentAction,
) -> ApiResult<Value> {
    let ulid = conversation_id(conversation)?;
    state
        .engine
        .agent(agent.clone(), action(ConversationId(ulid.0)))
        .await?;
    Ok(json!({ "conversation_id": ulid.to_string() }))
}

// ----- admin and supervisors --------------------------------------------------------------------

async fn admin_queues(State(state): State<AppState>, headers: HeaderMap) -> ApiResult<Json<Value>> {
    require_admin(&state, &headers)?;
    let queues = state.engine.inspect(|router| router.queues()).await?;
    let now = super::engine::wall_clock();
    Ok(Json(
        json!({ "queues": queues.iter().map(|queue| super::views::queue(queue, now)).collect::<Vec<_>>() }),
    ))
}

async fn admin_agents(State(state): State<AppState>, headers: HeaderMap) -> ApiResult<Json<Value>> {
    require_admin(&state, &headers)?;
    let agents: Vec<Value> = state
        .engine
        .inspect(|router| {
            router
                .agents()
                .map(|view| super::views::agent(&view))
                .collect()
        })
        .await?;
    Ok(Json(json!({ "agents": agents })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConversationQuery {
    status: Option<String>,
    channel: Option<String>,
    contact_id: Option<String>,
    limit: Option<usize>,
}

async fn admin_conversations(
    State(state): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<ConversationQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<Value>> {
    require_admin(&state, &headers)?;
    let Query(query) = query.map_err(|rejection| {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_query", rejection.body_text())
    })?;
    let status = query
        .status
        .as_deref()
        .map(|status| {
            ConversationStatus::parse(status).ok_or_else(|| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "bad_status",
                    "status is open, resolved or closed",
                )
            })
        })
        .transpose()?;
    let contact_id = query
        .contact_id
        .as_deref()
        .map(conversation_id)
        .transpose()?;
    let filter = ConversationFilter {
        status,
        channel: query.channel,
        contact_id,
        updated_before: None,
        limit: query.limit.unwrap_or(100).min(1000),
    };
    let records = state.store.conversations(filter).await?;
    Ok(Json(
        json!({ "conversations": records.iter().map(super::views::record).collect::<Vec<_>>() }),
    ))
}

async fn admin_conversation(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(conversation): Path<String>,
) -> ApiResult<Json<Value>> {
    require_admin(&state, &headers)?;
    let id = conversation_id(&conversation)?;
    let record = state.store.conversation(id).await?.ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_conversation",
            "no such conversation",
        )
    })?;
    let live = state
        .engine
        .inspect(move |router| router.conversation(ConversationId(id.0)))
        .await?;
    let messages = state.store.messages(id).await?;
    Ok(Json(json!({
        "conversation": super::views::record(&record),
        "routing": live.as_ref().map(super::views::conversation),
        "messages": messages.iter().map(super::views::message).collect::<Vec<_>>(),
    })))
}

async fn admin_reload(State(state): State<AppState>, headers: HeaderMap) -> ApiResult<Json<Value>> {
    require_admin(&state, &headers)?;
    state.reloader.reload().await.map_err(|error| {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_config", error)
    })?;
    Ok(Json(json!({ "reloaded": true })))
}
