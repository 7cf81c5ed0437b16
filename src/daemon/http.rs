//! The HTTP API (`/v1`, JSON): ingest, agents (REST and WebSocket), admin, health and metrics.
//!
//! Every error is a JSON body `{"error": {"code": "...", "message": "..."}}` with a 4xx/5xx status that
//! names the problem. An ingest is answered 2xx only after the message is committed to the store.

use std::sync::atomic::Ordering;
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
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::{Value, json};
use ulid::Ulid;

use super::actions::{self, Actions, AgentCommand, Refusal, RefusalKind, parse_id};
use super::engine::EngineError;
use super::hub::AgentHub;
use super::metrics::BusStates;
use super::views::{self, RouterRead};
use super::web;
use crate::channels::email::Envelope;
use crate::channels::email::intake::{EmailIntake, IntakeError};
use crate::channels::{Inbound, LiveChannels, WebhookAnswer, WebhookError, WebhookRequest};
use crate::config::{AuthSection, Denied, bearer_token};
use crate::routing::AgentId;
use crate::store::{AttachmentContent, ConversationFilter, ConversationStatus, StoreError};

/// Shared state of every handler.
#[derive(Debug, Clone)]
pub struct AppState {
    /// Intake and agent commands, shared with the buses.
    pub actions: Actions,
    pub hub: Arc<AgentHub>,
    pub auth: Arc<RwLock<AuthSection>>,
    /// Reloads the configuration from its sources (file + environment captured at start).
    pub reloader: super::Reloader,
    /// Each configured broker's connection state, for `/readyz`.
    pub buses: BusStates,
    /// The SMS and social provider accounts in force (their webhooks, by provider and account).
    pub channels: LiveChannels,
    /// The email channel's intake, when `[channels.email]` is configured.
    pub email: Option<EmailIntake>,
    /// Customers' open chat sockets, and the chat's limits.
    pub chat: Arc<super::chat::ChatHub>,
    /// Typing and read receipts reach connections on any instance.
    pub signals: super::signals::Signals,
    pub chat_settings: Arc<crate::config::ChatSection>,
    /// The email channel can send replies (a relay is configured): the chat's offline form then
    /// answers by email.
    pub email_replies: bool,
    /// The supervisor view's live snapshot.
    pub supervisor: Arc<super::supervisor::SupervisorFeed>,
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
            Json(views::ErrorBody {
                error: views::ErrorDetail {
                    code: self.code.to_owned(),
                    message: self.message,
                },
            }),
        )
            .into_response()
    }
}

impl From<Refusal> for ApiError {
    fn from(refusal: Refusal) -> Self {
        let status = match refusal.kind {
            RefusalKind::Malformed => StatusCode::BAD_REQUEST,
            RefusalKind::Invalid => StatusCode::UNPROCESSABLE_ENTITY,
            RefusalKind::NotFound => StatusCode::NOT_FOUND,
            RefusalKind::Conflict => StatusCode::CONFLICT,
            RefusalKind::Unauthorized => StatusCode::UNAUTHORIZED,
            RefusalKind::Forbidden => StatusCode::FORBIDDEN,
            RefusalKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        };
        ApiError::new(status, refusal.code, refusal.message)
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        Refusal::from(error).into()
    }
}

impl From<EngineError> for ApiError {
    fn from(error: EngineError) -> Self {
        Refusal::from(error).into()
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// Builds the API router.
pub fn router(state: AppState, body_limit: usize) -> Router {
    // Raw mail may be larger than API bodies, up to the email channel's own limit.
    let email_limit = state.email.as_ref().map_or(body_limit, |email| {
        email.settings.max_message_bytes.max(body_limit)
    });
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/openapi.json", get(openapi))
        .route("/v1/messages", post(ingest))
        .route(
            "/v1/webhooks/{provider}/{account}",
            get(webhook_handshake).post(webhook),
        )
        .route(
            "/v1/channels/email/raw",
            post(email_raw).layer(DefaultBodyLimit::max(email_limit)),
        )
        .route(
            "/v1/channels/email/attachments/{key}",
            get(email_attachment),
        )
        .route("/v1/chat/stream", get(super::chat::stream))
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
        .route("/v1/admin/stream", get(admin_stream))
        .route("/v1/admin/reload", post(admin_reload))
        .route("/v1/admin/cluster", get(admin_cluster))
        .route("/widget.js", get(web::widget_js))
        .route("/demo", get(web::demo))
        .route("/console", get(web::console))
        .route("/console/console.js", get(web::console_js))
        .route("/console/console.css", get(web::console_css))
        .route("/console/supervisor", get(web::supervisor))
        .route("/console/supervisor.js", get(web::supervisor_js))
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(state)
}

// ----- auth -------------------------------------------------------------------------------------

fn bearer(headers: &HeaderMap) -> Option<&str> {
    bearer_token(headers.get(header::AUTHORIZATION)?.to_str().ok()?)
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
    require_admin_or_query(state, headers, None)
}

/// An admin token in the header, or (for a browser's WebSocket, which cannot set headers) the query.
fn require_admin_or_query(
    state: &AppState,
    headers: &HeaderMap,
    query_token: Option<&str>,
) -> ApiResult<()> {
    let token = bearer(headers).or(query_token).ok_or_else(unauthorized)?;
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
    let token = bearer(headers).or(query_token);
    let auth = state.auth.read().map_err(|_| unauthorized())?;
    auth.agent_access(agent, token).map_err(denied)?;
    Ok(AgentId::new(agent))
}

/// A valid token of another kind (or another agent's) is forbidden; an unknown one is unauthorized.
fn forbidden_or_unknown(auth: &AuthSection, token: &str) -> ApiError {
    denied(auth.denied(token))
}

fn denied(denied: Denied) -> ApiError {
    match denied {
        Denied::Forbidden => ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "this token may not do that",
        ),
        Denied::Unauthorized => unauthorized(),
    }
}

fn body_rejection(rejection: &BytesRejection) -> ApiError {
    let status = rejection.status();
    let code = if status == StatusCode::PAYLOAD_TOO_LARGE {
        "too_large"
    } else {
        "bad_body"
    };
    ApiError::new(status, code, rejection.body_text())
}

fn parse_json<T: serde::de::DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> ApiResult<T> {
    let bytes = body.map_err(|rejection| body_rejection(&rejection))?;
    Ok(actions::parse_json(&bytes)?)
}

fn conversation_id(text: &str) -> ApiResult<Ulid> {
    Ok(parse_id(text)?)
}

// ----- health and metrics -----------------------------------------------------------------------

async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

async fn readyz(State(state): State<AppState>) -> Response {
    if !state.actions.accepting.load(Ordering::SeqCst) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "shutting_down" })),
        )
            .into_response();
    }
    match state.actions.store.check_writable().await {
        Ok(()) if state.actions.metrics.ready.get() == 1 => {
            // A broker down delays events (they wait in the outbox) and stops bus intake, but HTTP
            // intake works: still 200, so load balancers keep sending, reported as degraded.
            let buses = state.buses.states();
            let degraded = buses.iter().any(|(_, connected)| !connected);
            let buses: serde_json::Map<String, Value> = buses
                .into_iter()
                .map(|(name, connected)| {
                    let state = if connected {
                        "connected"
                    } else {
                        "disconnected"
                    };
                    (name.to_owned(), json!(state))
                })
                .collect();
            let status = if degraded { "degraded" } else { "ready" };
            Json(json!({ "status": status, "store": "writable", "buses": buses })).into_response()
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
    if let Ok(backlog) = state.actions.store.outbox_backlog().await {
        state
            .actions
            .metrics
            .outbox_backlog
            .set(i64::try_from(backlog).unwrap_or(i64::MAX));
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.actions.metrics.render(),
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
    state.actions.intake_open()?;
    let bytes = body.map_err(|rejection| body_rejection(&rejection))?;
    let message = Actions::parse_message(&bytes)?;
    let receipt = state.actions.ingest(message, received).await?;
    let status = if receipt.duplicate {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    Ok((status, Json(views::Receipt::from(&receipt))).into_response())
}

// ----- provider webhooks -----------------------------------------------------------------------

impl From<WebhookError> for ApiError {
    fn from(error: WebhookError) -> Self {
        match error {
            WebhookError::Unauthenticated(reason) => {
                ApiError::new(StatusCode::UNAUTHORIZED, "unauthenticated", reason)
            }
            WebhookError::Forbidden(reason) => {
                ApiError::new(StatusCode::FORBIDDEN, "bad_signature", reason)
            }
            WebhookError::Malformed(reason) => {
                ApiError::new(StatusCode::BAD_REQUEST, "malformed_webhook", reason)
            }
        }
    }
}

fn no_such_webhook(provider: &str, account: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "unknown_webhook",
        format!("no [channels.{provider}.{account}] is configured"),
    )
}

/// Logs a refused delivery without its body (it may hold a customer's words; a forged one is noise).
fn refused(provider: &str, account: &str, error: WebhookError) -> ApiError {
    tracing::warn!(provider, account, reason = %error, "webhook refused");
    error.into()
}

/// `GET /v1/webhooks/{provider}/{account}`: Meta's subscription handshake.
async fn webhook_handshake(
    State(state): State<AppState>,
    Path((provider, account)): Path<(String, String)>,
    uri: axum::http::Uri,
) -> ApiResult<Response> {
    let hook = state
        .channels
        .webhook(&provider, &account)
        .ok_or_else(|| no_such_webhook(&provider, &account))?;
    let challenge = hook
        .handshake(uri.query())
        .map_err(|error| refused(&provider, &account, error))?;
    Ok(challenge.into_response())
}

/// `POST /v1/webhooks/{provider}/{account}`: a provider's delivery. Signature first; then every
/// message takes the one intake path and every status is recorded; 2xx only once all are stored
/// (a failure answers 503 and the provider retries; what was stored is deduplicated then).
async fn webhook(
    State(state): State<AppState>,
    Path((provider, account)): Path<(String, String)>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let received = Instant::now();
    let hook = state
        .channels
        .webhook(&provider, &account)
        .ok_or_else(|| no_such_webhook(&provider, &account))?;
    state.actions.intake_open()?;
    let bytes = body.map_err(|rejection| body_rejection(&rejection))?;
    let items = hook
        .receive(&WebhookRequest {
            query: uri.query(),
            headers: &headers,
            body: &bytes,
            now: chrono::Utc::now(),
        })
        .map_err(|error| refused(&provider, &account, error))?;
    // Check every message before storing any, so a bad one leaves nothing half-stored.
    for item in &items {
        if let Inbound::Message(message) = item {
            message.validate().map_err(|error| {
                refused(
                    &provider,
                    &account,
                    WebhookError::Malformed(error.to_string()),
                )
            })?;
        }
    }
    for item in items {
        match item {
            Inbound::Message(message) => {
                state.actions.ingest(*message, received).await?;
            }
            Inbound::Status(update) => state.actions.outbound.provider_status(&update).await?,
        }
    }
    Ok(match hook.answer() {
        WebhookAnswer::EmptyTwiml => (
            [(header::CONTENT_TYPE, "text/xml")],
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response></Response>",
        )
            .into_response(),
        WebhookAnswer::Empty => StatusCode::OK.into_response(),
    })
}

// ----- email ------------------------------------------------------------------------------------

fn email_intake(state: &AppState) -> ApiResult<&EmailIntake> {
    state.email.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "email_not_configured",
            "no [channels.email] is configured",
        )
    })
}

/// `POST /v1/channels/email/raw`: one raw RFC 5322 message (`message/rfc822`) from a provider that
/// forwards inbound mail as MIME. Same path as SMTP intake; 2xx only after the commit.
async fn email_raw(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let received = Instant::now();
    require_ingest(&state, &headers)?;
    let intake = email_intake(&state)?;
    state.actions.intake_open()?;
    let bytes = body.map_err(|rejection| body_rejection(&rejection))?;
    let accepted = intake
        .accept(&bytes, &Envelope::default(), "mime", received)
        .await
        .map_err(|error| match error {
            IntakeError::Rejected(reason) => {
                ApiError::new(StatusCode::BAD_REQUEST, "rejected_email", reason)
            }
            IntakeError::Unavailable(reason) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", reason)
            }
            IntakeError::TooLarge(reason) => {
                ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", reason)
            }
        })?;
    let status = match &accepted {
        crate::channels::email::intake::Accepted::Stored {
            duplicate: false, ..
        } => StatusCode::ACCEPTED,
        _ => StatusCode::OK,
    };
    Ok((status, Json(accepted)).into_response())
}

/// `GET /v1/channels/email/attachments/{key}`: an attachment's bytes, for agents and admins.
async fn email_attachment(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(key): Path<String>,
) -> ApiResult<Response> {
    let token = bearer(&headers).ok_or_else(unauthorized)?;
    {
        let auth = state.auth.read().map_err(|_| unauthorized())?;
        let allowed = auth
            .admin_tokens
            .iter()
            .chain(auth.agent_tokens.values())
            .any(|known| known.matches(token));
        if !allowed {
            return Err(forbidden_or_unknown(&auth, token));
        }
    }
    let not_found = || {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_attachment",
            "no such attachment",
        )
    };
    if !AttachmentContent::is_name(&key) {
        return Err(not_found());
    }
    let content = state
        .actions
        .store
        .attachment(&key)
        .await?
        .ok_or_else(not_found)?;
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        content,
    )
        .into_response())
}

// ----- agents -----------------------------------------------------------------------------------

#[derive(Debug, Deserialize, Default)]
struct TokenQuery {
    access_token: Option<String>,
}

async fn agent_view(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(agent): Path<String>,
) -> ApiResult<Json<views::Agent>> {
    let agent = require_agent(&state, &headers, None, &agent)?;
    let view: Option<views::Agent> = state
        .actions
        .read_router(RouterRead::Agent {
            agent: agent.to_string(),
        })
        .await?;
    view.map(Json).ok_or_else(unknown_agent)
}

fn unknown_agent() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "unknown_agent",
        "no such agent in the configuration",
    )
}

async fn agent_presence(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(agent): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<Value>> {
    let agent = require_agent(&state, &headers, None, &agent)?;
    let document: Value = parse_json(body)?;
    let command = AgentCommand::parse(document, Some("presence"))?;
    Ok(Json(state.actions.agent_command(&agent, command).await?))
}

async fn agent_conversations(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(agent): Path<String>,
) -> ApiResult<Json<views::AgentConversations>> {
    let agent = require_agent(&state, &headers, None, &agent)?;
    let lists: Option<views::AgentConversations> = state
        .actions
        .read_router(RouterRead::AgentConversations {
            agent: agent.to_string(),
        })
        .await?;
    lists.map(Json).ok_or_else(unknown_agent)
}

/// May this agent see the conversation? Its owner, the agent it is offered to, or its follower.
async fn agent_may_see(state: &AppState, agent: &AgentId, conversation: Ulid) -> ApiResult<()> {
    let allowed: bool = state
        .actions
        .read_router(RouterRead::AgentMaySee {
            agent: agent.to_string(),
            conversation,
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
) -> ApiResult<Json<views::History>> {
    let agent = require_agent(&state, &headers, None, &agent)?;
    let conversation = conversation_id(&conversation)?;
    agent_may_see(&state, &agent, conversation).await?;
    let messages = state.actions.store.messages(conversation).await?;
    let record = state.actions.store.conversation(conversation).await?;
    Ok(Json(views::History::new(
        conversation,
        record.as_ref(),
        &messages,
    )))
}

async fn agent_action(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path((agent, conversation, action)): Path<(String, String, String)>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let agent = require_agent(&state, &headers, None, &agent)?;
    let conversation = conversation_id(&conversation)?;
    let mut document = match action.as_str() {
        "transfer" | "reply" => parse_json::<Value>(body)?,
        "accept" | "reject" | "resolve" | "escalate" => json!({}),
        other => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "unknown_action",
                format!("no action `{other}`"),
            ));
        }
    };
    if let Some(object) = document.as_object_mut() {
        object.insert("conversation_id".into(), json!(conversation.to_string()));
    }
    let command = AgentCommand::parse(document, Some(&action))?;
    let result = state.actions.agent_command(&agent, command).await?;
    if action == "reply" {
        return Ok((StatusCode::ACCEPTED, Json(result)).into_response());
    }
    Ok(Json(views::Done {
        conversation_id: conversation.to_string(),
        done: action,
    })
    .into_response())
}

const AGENT_SOCKET_READ_BUFFER: usize = 8 * 1024;

/// `GET /v1/admin/stream`: the supervisor view's live snapshots over a WebSocket (admin token in
/// the `Authorization` header or `access_token`).
async fn admin_stream(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(query): Query<TokenQuery>,
    upgrade: WebSocketUpgrade,
) -> ApiResult<Response> {
    require_admin_or_query(&state, &headers, query.access_token.as_deref())?;
    let feed = state.supervisor;
    Ok(upgrade.on_upgrade(move |socket| super::supervisor::socket(feed, socket)))
}

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

async fn agent_socket(state: AppState, agent: AgentId, socket: WebSocket) {
    let (connection, mut pushes) = state.hub.connect(&agent);
    let (mut sender, mut receiver) = socket.split();
    let view: Result<Option<views::Agent>, _> = state
        .actions
        .read_router(RouterRead::Agent {
            agent: agent.to_string(),
        })
        .await;
    let hello = match view {
        Ok(Some(view)) => json!({ "type": "hello", "agent": view }),
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
        let _ = state.actions.agent_disconnected(&agent).await;
    }
}

/// A WebSocket command: an [`AgentCommand`] object, optionally with a `request_id` echoed back.
async fn socket_command(state: &AppState, agent: &AgentId, text: &str) -> Value {
    let mut document: Value = match serde_json::from_str(text) {
        Ok(document) => document,
        Err(error) => {
            return json!({ "type": "error", "error": { "code": "bad_command", "message": error.to_string() } });
        }
    };
    let request_id = document
        .as_object_mut()
        .and_then(|object| object.remove("request_id"))
        .unwrap_or(Value::Null);
    // Typing is news for the customer's chat window, not a routing command.
    if document["type"] == "typing" {
        let result = match (
            document["conversation_id"].as_str().map(parse_id),
            document["active"].as_bool(),
        ) {
            (Some(Ok(conversation)), Some(active)) => {
                super::chat::agent_typing(state, agent, conversation, active).await
            }
            (Some(Err(refusal)), _) => Err(refusal),
            _ => Err(Refusal::new(
                RefusalKind::Malformed,
                "bad_command",
                "typing needs conversation_id and active",
            )),
        };
        return match result {
            Ok(()) => json!({ "type": "ack", "request_id": request_id, "result": {} }),
            Err(refusal) => {
                json!({ "type": "error", "request_id": request_id, "error": { "code": refusal.code, "message": refusal.message } })
            }
        };
    }
    let result = match AgentCommand::parse(document, None) {
        Ok(command) => state.actions.agent_command(agent, command).await,
        Err(refusal) => Err(refusal),
    };
    match result {
        Ok(detail) => json!({ "type": "ack", "request_id": request_id, "result": detail }),
        Err(refusal) => {
            json!({ "type": "error", "request_id": request_id, "error": { "code": refusal.code, "message": refusal.message } })
        }
    }
}

// ----- admin and supervisors --------------------------------------------------------------------

async fn admin_queues(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> ApiResult<Json<views::QueueList>> {
    require_admin(&state, &headers)?;
    Ok(Json(state.actions.read_router(RouterRead::Queues).await?))
}

async fn admin_agents(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> ApiResult<Json<views::AgentList>> {
    require_admin(&state, &headers)?;
    Ok(Json(state.actions.read_router(RouterRead::Agents).await?))
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
) -> ApiResult<Json<views::ConversationList>> {
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
    let records = state.actions.store.conversations(filter).await?;
    Ok(Json(views::ConversationList {
        conversations: records.iter().map(views::Conversation::from).collect(),
    }))
}

async fn admin_conversation(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(conversation): Path<String>,
) -> ApiResult<Json<views::ConversationDetail>> {
    require_admin(&state, &headers)?;
    let id = conversation_id(&conversation)?;
    let record = state.actions.store.conversation(id).await?.ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_conversation",
            "no such conversation",
        )
    })?;
    let routing: Option<views::Routing> = state
        .actions
        .read_router(RouterRead::Conversation { conversation: id })
        .await?;
    let messages = state.actions.store.messages(id).await?;
    Ok(Json(views::ConversationDetail::new(
        &record, routing, &messages,
    )))
}

async fn admin_reload(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> ApiResult<Json<views::Reloaded>> {
    require_admin(&state, &headers)?;
    state.reloader.reload().await.map_err(|error| {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_config", error)
    })?;
    Ok(Json(views::Reloaded { reloaded: true }))
}

/// `GET /v1/admin/cluster`: the instances, who leads under which epoch, and what waits for the
/// leader. A single node lists itself as the leader.
async fn admin_cluster(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> ApiResult<Json<views::Cluster>> {
    require_admin(&state, &headers)?;
    let leadership = &state.actions.engine;
    let store = &state.actions.store;
    let this = views::ClusterNode {
        node_id: leadership.node().to_owned(),
        leader: leadership.is_leader(),
        epoch: leadership.epoch(),
    };
    if !leadership.clustered() {
        return Ok(Json(views::Cluster {
            clustered: false,
            leader: Some(this.node_id.clone()),
            epoch: 0,
            lease_expires_at: None,
            forwarding_backlog: 0,
            members: vec![views::ClusterMember {
                node_id: this.node_id.clone(),
                role: "leader".into(),
                address: None,
                started_at: None,
                last_heartbeat: None,
                heartbeat_age_ms: None,
            }],
            this,
        }));
    }
    let lease = store.lease().await?;
    let members = store.members().await?;
    let backlog = store.forwarding_backlog().await?;
    let now = chrono::Utc::now();
    let leader = lease.holder.clone().filter(|_| lease.live);
    let members = members
        .iter()
        .map(|member| views::ClusterMember {
            node_id: member.node.clone(),
            role: if leader.as_deref() == Some(member.node.as_str()) {
                "leader"
            } else {
                "follower"
            }
            .into(),
            address: Some(member.address.clone()),
            started_at: Some(member.started_at.to_rfc3339()),
            last_heartbeat: Some(member.heartbeat_at.to_rfc3339()),
            heartbeat_age_ms: Some(
                now.signed_duration_since(member.heartbeat_at)
                    .num_milliseconds(),
            ),
        })
        .collect();
    Ok(Json(views::Cluster {
        clustered: true,
        this,
        leader,
        epoch: lease.epoch,
        lease_expires_at: lease.expires_at.map(|at| at.to_rfc3339()),
        forwarding_backlog: backlog,
        members,
    }))
}

/// The handlers driven in-process through the assembled app (`oneshot`), with a real store and
/// router behind them; `tests/` covers the same API over a socket against the real binary.
#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use axum::body::Body;
    use axum::http::{Method, Request};
    use tower::ServiceExt;

    use super::*;
    use crate::daemon::{Assembled, ConfigSource, assemble};

    const INGEST: &str = "demo-ingest-token";
    const ADMIN: &str = "demo-admin-token";

    /// The demo centre from the shipped defaults, on a store in a temporary directory.
    struct Api {
        daemon: Assembled,
        _dir: tempfile::TempDir,
    }

    impl Api {
        async fn start() -> Api {
            let dir = tempfile::tempdir().unwrap();
            let store = dir.path().join("switchboard.sqlite").display().to_string();
            let environment = vec![("SWITCHBOARD__STORE__PATH".to_owned(), store)];
            let settings = crate::config::load(None, environment.clone()).unwrap();
            let source = ConfigSource {
                file: None,
                environment,
            };
            Api {
                daemon: assemble(settings, source).await.unwrap(),
                _dir: dir,
            }
        }

        async fn call(
            &self,
            method: Method,
            path: &str,
            token: Option<&str>,
            body: impl Into<Body>,
        ) -> (StatusCode, Value) {
            let mut request = Request::builder().method(method).uri(path);
            if let Some(token) = token {
                request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
            }
            let request = request
                .header(header::CONTENT_TYPE, "application/json")
                .body(body.into())
                .unwrap();
            let response = self.daemon.app.clone().oneshot(request).await.unwrap();
            let status = response.status();
            let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
                .await
                .unwrap();
            let document = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            (status, document)
        }

        async fn ingest(&self, message: &Value) -> (StatusCode, Value) {
            self.call(
                Method::POST,
                "/v1/messages",
                Some(INGEST),
                message.to_string(),
            )
            .await
        }
    }

    fn message(id: &str, text: &str) -> Value {
        json!({
            "channel": "api", "provider": "crm", "provider_message_id": id,
            "from": { "address": "customer@example.com" }, "text": text,
        })
    }

    fn error_code(document: &Value) -> &str {
        document["error"]["code"].as_str().unwrap_or_default()
    }

    #[tokio::test]
    async fn an_ingested_message_is_stored_once_and_a_redelivery_is_flagged_as_duplicate() {
        let api = Api::start().await;
        let (status, first) = api.ingest(&message("m-1", "Where is my parcel?")).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{first}");
        assert_eq!(first["duplicate"], false);
        assert_eq!(first["new_conversation"], true);

        let (status, again) = api.ingest(&message("m-1", "Where is my parcel?")).await;
        assert_eq!(status, StatusCode::OK, "{again}");
        assert_eq!(again["duplicate"], true);
        assert_eq!(again["message_id"], first["message_id"]);
        assert_eq!(again["conversation_id"], first["conversation_id"]);

        let conversation = first["conversation_id"].as_str().unwrap();
        let (status, detail) = api
            .call(
                Method::GET,
                &format!("/v1/admin/conversations/{conversation}"),
                Some(ADMIN),
                Body::empty(),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{detail}");
        let messages = detail["messages"].as_array().unwrap();
        assert_eq!(messages.len(), 1, "{detail}");
        assert_eq!(messages[0]["direction"], "inbound");
        assert_eq!(messages[0]["body"]["text"], "Where is my parcel?");
    }

    #[tokio::test]
    async fn ingest_needs_an_ingest_token() {
        let api = Api::start().await;
        let body = message("m-1", "hello").to_string();
        let (status, answer) = api
            .call(Method::POST, "/v1/messages", None, body.clone())
            .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(error_code(&answer), "unauthorized");
        let (status, answer) = api
            .call(Method::POST, "/v1/messages", Some("nobody"), body.clone())
            .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(error_code(&answer), "unauthorized");
        // A real token of another kind is recognised, and refused.
        let (status, answer) = api
            .call(Method::POST, "/v1/messages", Some("demo-alice-token"), body)
            .await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert_eq!(error_code(&answer), "forbidden");
    }

    #[tokio::test]
    async fn bad_messages_are_refused_with_a_reason_and_nothing_is_stored() {
        let api = Api::start().await;
        let (status, answer) = api
            .call(Method::POST, "/v1/messages", Some(INGEST), "{not json")
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(error_code(&answer), "invalid_json");

        let (status, answer) = api
            .ingest(&json!({ "channel": "api", "text": "no sender" }))
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        assert!(
            !answer["error"]["message"].as_str().unwrap().is_empty(),
            "{answer}"
        );

        let oversized = message("m-big", &"x".repeat(2 * 1024 * 1024)).to_string();
        let (status, answer) = api
            .call(Method::POST, "/v1/messages", Some(INGEST), oversized)
            .await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(error_code(&answer), "too_large");

        let (status, list) = api
            .call(
                Method::GET,
                "/v1/admin/conversations",
                Some(ADMIN),
                Body::empty(),
            )
            .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(list["conversations"], json!([]), "{list}");
    }

    #[tokio::test]
    async fn a_conversation_id_must_be_a_ulid_and_exist() {
        let api = Api::start().await;
        let (status, answer) = api
            .call(
                Method::GET,
                "/v1/admin/conversations/not-an-id",
                Some(ADMIN),
                Body::empty(),
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(error_code(&answer), "bad_id");
        let unknown = Ulid::new();
        let (status, answer) = api
            .call(
                Method::GET,
                &format!("/v1/admin/conversations/{unknown}"),
                Some(ADMIN),
                Body::empty(),
            )
            .await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(error_code(&answer), "unknown_conversation");
    }

    #[tokio::test]
    async fn an_agent_sets_only_its_own_presence_and_then_gets_the_waiting_conversation() {
        let api = Api::start().await;
        let (status, _) = api.ingest(&message("m-1", "Hello, anyone there?")).await;
        assert_eq!(status, StatusCode::ACCEPTED);

        let available = json!({ "presence": "available" }).to_string();
        let (status, answer) = api
            .call(
                Method::PUT,
                "/v1/agents/bob/presence",
                Some("demo-alice-token"),
                available.clone(),
            )
            .await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{answer}");

        let (status, answer) = api
            .call(
                Method::PUT,
                "/v1/agents/alice/presence",
                Some("demo-alice-token"),
                available,
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        let (status, view) = api
            .call(
                Method::GET,
                "/v1/agents/alice",
                Some("demo-alice-token"),
                Body::empty(),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{view}");
        assert_eq!(view["presence"], "available");
        let (status, lists) = api
            .call(
                Method::GET,
                "/v1/agents/alice/conversations",
                Some("demo-alice-token"),
                Body::empty(),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{lists}");
        assert_eq!(lists["offers"].as_array().map(Vec::len), Some(1), "{lists}");
    }

    #[tokio::test]
    async fn health_readiness_and_metrics_answer_without_a_token() {
        let api = Api::start().await;
        let (status, health) = api.call(Method::GET, "/healthz", None, Body::empty()).await;
        assert_eq!(
            (status, health),
            (StatusCode::OK, json!({ "status": "ok" }))
        );
        let (status, ready) = api.call(Method::GET, "/readyz", None, Body::empty()).await;
        assert_eq!(status, StatusCode::OK, "{ready}");
        let request = Request::get("/metrics").body(Body::empty()).unwrap();
        let response = api.daemon.app.clone().oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let text = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&text);
        assert!(text.contains("switchboard_ready 1"), "{text}");
    }

    #[tokio::test]
    async fn an_unknown_webhook_account_is_404() {
        let api = Api::start().await;
        let (status, answer) = api
            .call(Method::POST, "/v1/webhooks/twilio/nowhere", None, "Body=hi")
            .await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{answer}");
        assert_eq!(error_code(&answer), "unknown_webhook");
    }
}
