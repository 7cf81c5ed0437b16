//! Configuration: parsed once, validated, and passed down as typed [`Settings`].
//!
//! Layers, later wins: the embedded `config/default.toml`, an optional file (`--config`), then
//! environment variables `SWITCHBOARD__SECTION__KEY` (e.g. `SWITCHBOARD__SERVER__LISTEN`,
//! `SWITCHBOARD__AUTH__ADMIN_TOKENS`). Secrets are [`Secret`]s: they never print, in logs or in
//! `check-config`.

pub mod channels;
pub mod email;
pub mod routing_file;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize, Serializer};

use crate::routing::RoutingConfig;
use crate::store::postgres::{PostgresOptions, valid_schema_name};
use routing_file::{AgentSection, QueueSection, RoutingFileError, RoutingSection, RuleSection};

/// The configuration shipped with switchboard: a demo centre that runs with nothing else installed.
pub const DEFAULT_CONFIG: &str = include_str!("../../config/default.toml");

/// A secret value (token, password). Compared in constant time; never displayed.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: &str) -> Secret {
        Secret(value.to_owned())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Constant-time comparison (`subtle`, whose barriers keep the optimiser from adding an early
    /// exit), so a token cannot be guessed byte by byte from response times. Only the length may
    /// show, and tokens are long random strings.
    pub fn matches(&self, candidate: &str) -> bool {
        use subtle::ConstantTimeEq;
        self.0.as_bytes().ct_eq(candidate.as_bytes()).into()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(********)")
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str("********")
    }
}

/// The whole file, as written. Unknown keys are errors, so a typo is caught at start.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub server: ServerSection,
    pub store: StoreSection,
    #[serde(default)]
    pub auth: AuthSection,
    #[serde(default)]
    pub outbound: OutboundSection,
    #[serde(default)]
    pub chat: ChatSection,
    #[serde(default)]
    pub log: LogSection,
    #[serde(default)]
    pub bus: BusSection,
    #[serde(default)]
    pub channels: channels::ChannelsSection,
    pub cluster: ClusterSection,
    pub routing: RoutingSection,
    #[serde(default)]
    pub queues: Vec<QueueSection>,
    #[serde(default)]
    pub rules: Vec<RuleSection>,
    #[serde(default)]
    pub agents: Vec<AgentSection>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    /// Address to listen on; port 0 picks a free port (logged and written to `port_file`).
    pub listen: String,
    /// The URL clients reach this server at (behind a proxy it differs from `listen`).
    #[serde(default)]
    pub public_url: Option<String>,
    pub body_limit_bytes: usize,
    pub request_timeout_seconds: u64,
    /// A client must send a request's whole header block within this (slowloris defence).
    pub header_read_timeout_seconds: u64,
    pub shutdown_grace_seconds: u64,
    /// If set, the bound address is written here once listening (for scripts and tests using port 0).
    #[serde(default)]
    pub port_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSection {
    /// `sqlite` (embedded, the default) or `postgres` (shared by several instances).
    pub backend: String,
    /// SQLite database file; relative paths are relative to the working directory.
    pub path: PathBuf,
    /// Writes grouped into one commit at most.
    pub max_batch: usize,
    /// SQLite: how long a write waits for a lock another process holds (a backup, a stray
    /// `sqlite3` shell) before the request fails as unavailable (HTTP 503, SMTP 451, bus retry).
    pub busy_timeout_ms: u64,
    /// PostgreSQL: `postgres://user@host:port/database` (a password in it works, but prefer
    /// `password` from the environment or `password_file`).
    #[serde(default)]
    pub url: Option<Secret>,
    /// PostgreSQL password; from the environment: `SWITCHBOARD__STORE__PASSWORD`.
    #[serde(default)]
    pub password: Option<Secret>,
    /// PostgreSQL password read from this file (e.g. a mounted Kubernetes secret); one trailing
    /// newline is ignored.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// PostgreSQL connections per instance.
    #[serde(default = "default_pool_size")]
    pub pool_size: usize,
    /// PostgreSQL schema holding switchboard's tables (created on first start).
    #[serde(default = "default_schema")]
    pub schema: String,
}

fn default_pool_size() -> usize {
    8
}

fn default_schema() -> String {
    "public".into()
}

/// The store to open, validated.
#[derive(Debug, Clone)]
pub enum StoreSettings {
    Sqlite {
        path: PathBuf,
        max_batch: usize,
        busy_timeout: Duration,
    },
    Postgres(Box<PostgresOptions>),
}

impl StoreSettings {
    /// Where the store is, for logs (never a password).
    pub fn describe(&self) -> String {
        match self {
            StoreSettings::Sqlite { path, .. } => format!("sqlite {}", path.display()),
            StoreSettings::Postgres(options) => options.describe(),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSection {
    /// Adds well-known tokens for trying switchboard locally: ingest `demo-ingest-token`, admin
    /// `demo-admin-token`, each agent `demo-<id>-token`. Refused unless listening on loopback.
    pub demo_tokens: bool,
    /// Bearer tokens accepted by `POST /v1/messages`.
    pub ingest_tokens: Vec<Secret>,
    /// Bearer tokens for `/v1/admin/*` and the supervisor view.
    pub admin_tokens: Vec<Secret>,
    /// Agent id → that agent's bearer token. From env: `SWITCHBOARD__AUTH__AGENT_TOKENS__ALICE`.
    pub agent_tokens: BTreeMap<String, Secret>,
}

/// Why a bearer token does not open a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// No token, or one nobody issued.
    Unauthorized,
    /// A valid token of another kind, or another agent's.
    Forbidden,
}

/// The token of an `Authorization: Bearer <token>` value (HTTP, or a bus message's header).
pub fn bearer_token(authorization: &str) -> Option<&str> {
    authorization.strip_prefix("Bearer ")
}

impl AuthSection {
    /// May `token` act for `agent`? Only that agent's own token may: agent A cannot act as agent B.
    pub fn agent_access(&self, agent: &str, token: Option<&str>) -> Result<(), Denied> {
        let token = token.ok_or(Denied::Unauthorized)?;
        match self.agent_tokens.get(agent) {
            Some(known) if known.matches(token) => Ok(()),
            _ => Err(self.denied(token)),
        }
    }

    /// Why `token` is refused where it does not fit: a token of another kind (or another agent's)
    /// is forbidden, an unknown one unauthorized.
    pub fn denied(&self, token: &str) -> Denied {
        let known = self
            .ingest_tokens
            .iter()
            .chain(&self.admin_tokens)
            .chain(self.agent_tokens.values())
            .any(|secret| secret.matches(token));
        if known {
            Denied::Forbidden
        } else {
            Denied::Unauthorized
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutboundSection {
    /// Replies on the `api` channel are also POSTed here, signed (`X-Switchboard-Signature`).
    pub api_webhook_url: Option<String>,
    pub api_webhook_secret: Option<Secret>,
    /// Delivery attempts before a reply is marked failed.
    pub max_attempts: u32,
    pub initial_backoff_ms: u64,
    pub max_backoff_ms: u64,
}

impl Default for OutboundSection {
    fn default() -> Self {
        OutboundSection {
            api_webhook_url: None,
            api_webhook_secret: None,
            max_attempts: 6,
            initial_backoff_ms: 500,
            max_backoff_ms: 60_000,
        }
    }
}

/// The customer web chat (`/v1/chat/stream`, `/widget.js`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ChatSection {
    /// Signs verified customer ids: the host site sends `hex(HMAC-SHA256(secret, customer_id))`.
    /// Without it a customer id from the browser is refused.
    pub customer_secret: Option<Secret>,
    /// Origins (`https://shop.example`) whose pages may open a chat; empty accepts every origin.
    pub allowed_origins: Vec<String>,
    /// Longest customer message, in characters.
    pub max_message_chars: usize,
    /// Messages a session may send per minute (a burst of this many, refilled evenly).
    pub messages_per_minute: u32,
    /// A customer whose chat closed before an agent answered and who does not come back within
    /// this many seconds is counted abandoned.
    pub abandon_after_seconds: u64,
    /// A customer socket that sends nothing (no frame of any kind) for this long is closed; the
    /// widget reconnects and resumes, so only abandoned tabs and idle hostile clients lose it.
    pub idle_timeout_seconds: u64,
}

impl Default for ChatSection {
    fn default() -> Self {
        ChatSection {
            customer_secret: None,
            allowed_origins: Vec::new(),
            max_message_chars: 2000,
            messages_per_minute: 30,
            abandon_after_seconds: 60,
            idle_timeout_seconds: 600,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSection {
    /// `text` or `json`; `--log-format` overrides it.
    pub format: String,
    /// A `tracing` filter such as `info` or `switchboard=debug,info`; `RUST_LOG` overrides it.
    pub level: String,
}

impl Default for LogSection {
    fn default() -> Self {
        LogSection {
            format: "text".into(),
            level: "info".into(),
        }
    }
}

/// Message buses: NATS JetStream and RabbitMQ, each off unless enabled (then the in-process bus only).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct BusSection {
    /// Agent commands over the buses must carry the agent's own bearer token
    /// (`Authorization: Bearer <token>`: a NATS header, an AMQP header), as on the API. Off, whoever
    /// may publish to the command subjects acts for any agent, and the broker's permissions are
    /// the only guard.
    pub commands_need_agent_token: bool,
    /// Channels whose replies are handed to the buses (`<prefix>.outbound.<channel>`, AMQP exchange
    /// `outbound_exchange` with routing key `<channel>`) for systems that deliver them themselves.
    pub outbound_channels: Vec<String>,
    /// Inbound messages processed at once per broker; messages of one customer stay in order.
    pub workers: usize,
    /// Reconnect backoff: first delay, doubling up to the maximum.
    pub reconnect_initial_ms: u64,
    pub reconnect_max_ms: u64,
    pub nats: NatsSection,
    pub amqp: AmqpSection,
}

impl Default for BusSection {
    fn default() -> Self {
        BusSection {
            commands_need_agent_token: true,
            outbound_channels: Vec::new(),
            workers: 1024,
            reconnect_initial_ms: 200,
            reconnect_max_ms: 5_000,
            nats: NatsSection::default(),
            amqp: AmqpSection::default(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsSection {
    pub enabled: bool,
    /// `nats://[user:password@]host:port`; a secret because it may carry credentials.
    pub url: Secret,
    /// Subjects: `<prefix>.inbound.<channel>`, `<prefix>.events.<kind>`, `<prefix>.dead.<channel>`,
    /// `<prefix>.outbound.<channel>`, `<prefix>.cmd.agent.<agent>.<verb>`.
    pub subject_prefix: String,
    /// The JetStream stream holding `<prefix>.inbound.>` (created or updated on start).
    pub inbound_stream: String,
    /// The durable pull consumer on it.
    pub consumer: String,
    /// The JetStream stream holding what switchboard publishes: events, dead letters, outbound.
    pub publish_stream: String,
    /// Unacknowledged inbound messages at most (the pull batch).
    pub max_ack_pending: usize,
    /// A delivered message not acknowledged within this is redelivered.
    pub ack_wait_seconds: u64,
    /// Queue group of the command subscription, so one instance answers each command.
    pub command_queue_group: String,
}

impl Default for NatsSection {
    fn default() -> Self {
        NatsSection {
            enabled: false,
            url: Secret::new("nats://127.0.0.1:4222"),
            subject_prefix: "switchboard".into(),
            inbound_stream: "SWITCHBOARD_INBOUND".into(),
            consumer: "switchboard".into(),
            publish_stream: "SWITCHBOARD_EVENTS".into(),
            max_ack_pending: 1024,
            ack_wait_seconds: 30,
            command_queue_group: "switchboard".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AmqpSection {
    pub enabled: bool,
    /// `amqp://user:password@host:port/vhost` (vhost `/` is `%2f`); a secret: it carries credentials.
    pub url: Secret,
    /// Topic exchange inbound messages are published to (routing key `<channel>`).
    pub inbound_exchange: String,
    /// Durable queue bound to it (`#`), consumed with manual ack.
    pub inbound_queue: String,
    /// Topic exchange of events (routing keys `conversation.assigned`...).
    pub events_exchange: String,
    /// Where invalid inbound messages go, with the reason in the `x-switchboard-error` header.
    pub dead_letter_exchange: String,
    pub dead_letter_queue: String,
    /// Topic exchange of commands (routing key `agent.<agent>.<verb>`), answered to `reply_to`.
    pub command_exchange: String,
    pub command_queue: String,
    /// Topic exchange of outbound customer messages (routing key `<channel>`).
    pub outbound_exchange: String,
    /// Unacknowledged deliveries at most (basic.qos).
    pub prefetch: u16,
}

impl Default for AmqpSection {
    fn default() -> Self {
        AmqpSection {
            enabled: false,
            url: Secret::new("amqp://guest:guest@127.0.0.1:5672/%2f"),
            inbound_exchange: "switchboard.inbound".into(),
            inbound_queue: "switchboard.inbound".into(),
            events_exchange: "switchboard.events".into(),
            dead_letter_exchange: "switchboard.dead".into(),
            dead_letter_queue: "switchboard.dead".into(),
            command_exchange: "switchboard.commands".into(),
            command_queue: "switchboard.commands".into(),
            outbound_exchange: "switchboard.outbound".into(),
            prefetch: 1024,
        }
    }
}

/// Several instances on one PostgreSQL database (ignored on SQLite: a single node always leads).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    /// This instance's name in the cluster; default: the host name and the process id.
    #[serde(default)]
    pub node_id: Option<String>,
    /// How long the router's lease lasts unless renewed; a dead leader is replaced after this.
    pub lease_ttl_ms: u64,
    /// How often the leader renews its lease (and every instance sends its heartbeat); a follower
    /// asks for the lease this often, or just after the holder's lease ends if that is sooner.
    pub renew_every_ms: u64,
    /// How often unrouted messages, forwarded commands and pushes are read even without a
    /// notification (a missed notification delays by at most this).
    pub poll_every_ms: u64,
    /// How long a follower waits for the leader to answer a forwarded agent command (then 503).
    pub command_timeout_ms: u64,
}

impl Default for ClusterSection {
    fn default() -> Self {
        ClusterSection {
            node_id: None,
            lease_ttl_ms: 3000,
            renew_every_ms: 1000,
            poll_every_ms: 500,
            command_timeout_ms: 5000,
        }
    }
}

/// The cluster section, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterSettings {
    pub node_id: String,
    pub lease_ttl: Duration,
    pub renew_every: Duration,
    pub poll_every: Duration,
    pub command_timeout: Duration,
}

fn cluster_settings(section: &ClusterSection) -> Result<ClusterSettings, ConfigLoadError> {
    let node_id = match &section.node_id {
        Some(node) => {
            let node = node.trim();
            if node.is_empty() || node.len() > 200 {
                return Err(invalid("cluster.node_id", "must be 1 to 200 characters"));
            }
            node.to_owned()
        }
        None => {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|name| name.trim().to_owned())
                .filter(|name| !name.is_empty())
                .unwrap_or_else(|| "switchboard".into());
            format!("{host}-{}", std::process::id())
        }
    };
    if section.renew_every_ms == 0 || section.poll_every_ms == 0 || section.command_timeout_ms == 0
    {
        return Err(invalid(
            "cluster",
            "renew_every_ms, poll_every_ms and command_timeout_ms must be above 0",
        ));
    }
    // The leader must renew a few times per lease, or one slow renewal loses leadership.
    if section.lease_ttl_ms < 2 * section.renew_every_ms {
        return Err(invalid(
            "cluster.lease_ttl_ms",
            "must be at least twice renew_every_ms",
        ));
    }
    Ok(ClusterSettings {
        node_id,
        lease_ttl: Duration::from_millis(section.lease_ttl_ms),
        renew_every: Duration::from_millis(section.renew_every_ms),
        poll_every: Duration::from_millis(section.poll_every_ms),
        command_timeout: Duration::from_millis(section.command_timeout_ms),
    })
}

/// Validated settings, ready to run.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    pub public_url: String,
    pub body_limit_bytes: usize,
    pub request_timeout: Duration,
    /// How long a connection may take to send a request's headers before it is closed.
    pub header_read_timeout: Duration,
    pub shutdown_grace: Duration,
    pub port_file: Option<PathBuf>,
    pub store: StoreSettings,
    pub auth: AuthSection,
    pub outbound: OutboundSection,
    pub chat: ChatSection,
    pub log: LogSection,
    pub bus: BusSection,
    /// Provider accounts of the SMS and social channels.
    pub channels: channels::ChannelSettings,
    pub cluster: ClusterSettings,
    pub routing: RoutingConfig,
    /// The effective file, for `check-config` (secrets serialise masked).
    pub file: ConfigFile,
}

/// Why the configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigLoadError {
    #[error("cannot read configuration: {0}")]
    Source(#[from] config::ConfigError),
    #[error("{place}: {reason}")]
    Invalid { place: String, reason: String },
    #[error(transparent)]
    Routing(#[from] RoutingFileError),
}

fn invalid(place: &str, reason: impl Into<String>) -> ConfigLoadError {
    ConfigLoadError::Invalid {
        place: place.to_owned(),
        reason: reason.into(),
    }
}

/// Loads defaults, the optional file and the environment given (pass `std::env::vars()`).
pub fn load(
    file: Option<&Path>,
    environment: impl IntoIterator<Item = (String, String)>,
) -> Result<Settings, ConfigLoadError> {
    let mut builder = defaults();
    if let Some(path) = file {
        if !path.exists() {
            return Err(invalid(
                "--config",
                format!("{} does not exist", path.display()),
            ));
        }
        builder = builder.add_source(config::File::from(path).format(config::FileFormat::Toml));
    }
    with_environment(builder, environment)
}

/// Loads defaults, a config file's text and the environment given: [`load`] for text not read
/// from a path.
pub fn load_str(
    text: &str,
    environment: impl IntoIterator<Item = (String, String)>,
) -> Result<Settings, ConfigLoadError> {
    let builder = defaults().add_source(config::File::from_str(text, config::FileFormat::Toml));
    with_environment(builder, environment)
}

type Builder = config::ConfigBuilder<config::builder::DefaultState>;

fn defaults() -> Builder {
    config::Config::builder().add_source(config::File::from_str(
        DEFAULT_CONFIG,
        config::FileFormat::Toml,
    ))
}

/// Layers the `SWITCHBOARD__*` variables over `builder`, then validates the result.
fn with_environment(
    mut builder: Builder,
    environment: impl IntoIterator<Item = (String, String)>,
) -> Result<Settings, ConfigLoadError> {
    let mut overrides: config::Map<String, String> = environment
        .into_iter()
        .filter(|(key, _)| key.starts_with(ENV_PREFIX))
        .collect();
    // List keys are split on `,` by the config crate; only these, so other values (a secret, a URL)
    // keep their commas. A list of one is set here instead: the crate tries numbers before lists
    // and would read a lone `+15550001111` or page id as an integer.
    let list_keys: Vec<String> = overrides
        .keys()
        .filter_map(|variable| env_key(variable))
        .filter(|key| is_list_key(key))
        .collect();
    let mut environment_source = config::Environment::with_prefix("SWITCHBOARD")
        .prefix_separator("__")
        .separator("__")
        .list_separator(LIST_SEPARATOR)
        // Naming keys at all is what stops the crate from splitting every value; the fixed ones
        // are named even when unset.
        .with_list_parse_key("auth.ingest_tokens")
        .with_list_parse_key("auth.admin_tokens")
        .with_list_parse_key("routing.default_queues")
        .with_list_parse_key("chat.allowed_origins")
        .try_parsing(true);
    for key in &list_keys {
        environment_source = environment_source.with_list_parse_key(key);
    }
    let mut singles = Vec::new();
    overrides.retain(|variable, value| {
        match env_key(variable).filter(|key| list_keys.contains(key)) {
            Some(key) if !value.contains(LIST_SEPARATOR) => {
                singles.push((key, value.clone()));
                false
            }
            _ => true,
        }
    });
    builder = builder.add_source(environment_source.source(Some(overrides)));
    for (key, value) in singles {
        builder = builder.set_override(key, vec![value])?;
    }
    let file: ConfigFile = builder.build()?.try_deserialize()?;
    settings_from(file)
}

const ENV_PREFIX: &str = "SWITCHBOARD__";
const LIST_SEPARATOR: &str = ",";

/// `SWITCHBOARD__CHANNELS__TWILIO__MAIN__NUMBERS` → `channels.twilio.main.numbers`, the key the
/// config crate makes of it.
fn env_key(variable: &str) -> Option<String> {
    variable
        .strip_prefix(ENV_PREFIX)
        .map(|rest| rest.to_lowercase().replace("__", "."))
}

/// Keys that hold lists and are named per account (`channels.<provider>.<account>.<list>`), or
/// per section; the fixed ones are named to the environment source directly.
fn is_list_key(key: &str) -> bool {
    let parts: Vec<&str> = key.split('.').collect();
    matches!(
        parts.as_slice(),
        ["channels", "twilio" | "vonage", _, "numbers"]
            | [
                "channels",
                "meta",
                _,
                "whatsapp_phone_number_ids" | "messenger_page_ids" | "instagram_account_ids",
            ]
            | ["channels", "email", "mailboxes" | "domains"]
            | ["bus", "outbound_channels"]
            | ["auth", "ingest_tokens" | "admin_tokens"]
            | ["routing", "default_queues"]
            | ["chat", "allowed_origins"]
    )
}

/// Validates a parsed file into [`Settings`].
pub fn settings_from(file: ConfigFile) -> Result<Settings, ConfigLoadError> {
    let listen: SocketAddr = file.server.listen.parse().map_err(|_| {
        invalid(
            "server.listen",
            format!("`{}` is not host:port", file.server.listen),
        )
    })?;
    if file.server.body_limit_bytes < 1024 {
        return Err(invalid("server.body_limit_bytes", "must be at least 1024"));
    }
    let store = store_settings(&file.store)?;
    if file.outbound.api_webhook_url.is_some() && file.outbound.api_webhook_secret.is_none() {
        return Err(invalid(
            "outbound.api_webhook_secret",
            "required when api_webhook_url is set (replies are signed)",
        ));
    }
    if file.chat.max_message_chars == 0
        || file.chat.max_message_chars > crate::message::MAX_BODY_CHARS
    {
        return Err(invalid(
            "chat.max_message_chars",
            format!("must be 1–{}", crate::message::MAX_BODY_CHARS),
        ));
    }
    if file.chat.abandon_after_seconds == 0 {
        return Err(invalid(
            "chat.abandon_after_seconds",
            "must be at least 1 (a page reload must not abandon the chat)",
        ));
    }
    if file.chat.messages_per_minute == 0 {
        return Err(invalid("chat.messages_per_minute", "must be at least 1"));
    }
    if let Some(origin) = file.chat.allowed_origins.iter().find(|origin| {
        !(origin.starts_with("http://") || origin.starts_with("https://")) || origin.ends_with('/')
    }) {
        return Err(invalid(
            "chat.allowed_origins",
            format!(
                "`{origin}` is not an origin like https://shop.example (scheme and host, no path)"
            ),
        ));
    }
    if !matches!(file.log.format.as_str(), "text" | "json") {
        return Err(invalid("log.format", "must be text or json"));
    }
    validate_bus(&file.bus)?;
    let channels = channels::validate(&file.channels)?;
    let cluster = cluster_settings(&file.cluster)?;
    let routing = routing_file::build_routing(
        &file.routing,
        &file.queues,
        &file.rules,
        &file.agents,
        &|path| std::fs::read_to_string(path).map_err(|error| error.to_string()),
    )?;
    for agent in file.auth.agent_tokens.keys() {
        if !file.agents.iter().any(|known| &known.id == agent) {
            return Err(invalid(
                "auth.agent_tokens",
                format!("token for unknown agent `{agent}`"),
            ));
        }
    }
    let mut auth = file.auth.clone();
    if auth.demo_tokens {
        if !listen.ip().is_loopback() {
            return Err(invalid(
                "auth.demo_tokens",
                "demo tokens are well known: only allowed when listening on loopback",
            ));
        }
        auth.ingest_tokens.push(Secret::new("demo-ingest-token"));
        auth.admin_tokens.push(Secret::new("demo-admin-token"));
        for agent in &file.agents {
            auth.agent_tokens
                .entry(agent.id.clone())
                .or_insert_with(|| Secret::new(&format!("demo-{}-token", agent.id)));
        }
    }
    Ok(Settings {
        listen,
        public_url: file
            .server
            .public_url
            .clone()
            .unwrap_or_else(|| format!("http://{listen}")),
        body_limit_bytes: file.server.body_limit_bytes,
        request_timeout: Duration::from_secs(file.server.request_timeout_seconds.max(1)),
        header_read_timeout: Duration::from_secs(file.server.header_read_timeout_seconds.max(1)),
        shutdown_grace: Duration::from_secs(file.server.shutdown_grace_seconds),
        port_file: file.server.port_file.clone(),
        store,
        auth,
        outbound: file.outbound.clone(),
        chat: file.chat.clone(),
        log: file.log.clone(),
        bus: file.bus.clone(),
        channels,
        cluster,
        routing,
        file,
    })
}

fn store_settings(section: &StoreSection) -> Result<StoreSettings, ConfigLoadError> {
    if section.max_batch == 0 {
        return Err(invalid("store.max_batch", "must be at least 1"));
    }
    match section.backend.as_str() {
        "sqlite" => Ok(StoreSettings::Sqlite {
            path: section.path.clone(),
            max_batch: section.max_batch,
            busy_timeout: Duration::from_millis(section.busy_timeout_ms.max(1)),
        }),
        "postgres" => {
            let url = section.url.as_ref().ok_or_else(|| {
                invalid(
                    "store.url",
                    "required for the postgres backend (postgres://user@host:port/database)",
                )
            })?;
            // The parser's messages name the problem, never the password.
            let mut connection: tokio_postgres::Config =
                url.expose()
                    .parse()
                    .map_err(|error: tokio_postgres::Error| {
                        invalid(
                            "store.url",
                            format!("not a PostgreSQL connection URL: {error}"),
                        )
                    })?;
            let password = match (&section.password, &section.password_file) {
                (Some(_), Some(_)) => {
                    return Err(invalid(
                        "store.password_file",
                        "set either store.password or store.password_file, not both",
                    ));
                }
                (Some(password), None) => Some(password.clone()),
                (None, Some(path)) => {
                    let text = std::fs::read_to_string(path).map_err(|error| {
                        invalid(
                            "store.password_file",
                            format!("cannot read {}: {error}", path.display()),
                        )
                    })?;
                    let text = text.strip_suffix('\n').unwrap_or(&text);
                    Some(Secret::new(text.strip_suffix('\r').unwrap_or(text)))
                }
                (None, None) => None,
            };
            if let Some(password) = password {
                connection.password(password.expose());
            }
            if section.pool_size < 2 {
                return Err(invalid(
                    "store.pool_size",
                    "must be at least 2 (one connection writes while others read)",
                ));
            }
            if !valid_schema_name(&section.schema) {
                return Err(invalid(
                    "store.schema",
                    format!(
                        "`{}` must be lower-case letters, digits and `_`, starting with a letter or `_`",
                        section.schema
                    ),
                ));
            }
            let mut options = PostgresOptions::new(connection, &section.schema);
            options.pool_size = section.pool_size;
            options.max_batch = section.max_batch;
            Ok(StoreSettings::Postgres(Box::new(options)))
        }
        other => Err(invalid(
            "store.backend",
            format!("unknown backend `{other}` (sqlite or postgres)"),
        )),
    }
}

/// A subject token or name: letters, digits, `-`, `_` (and `.` where several tokens are allowed).
fn check_name(place: &str, value: &str, dots: bool) -> Result<(), ConfigLoadError> {
    let fine = !value.is_empty()
        && !value.starts_with('.')
        && !value.ends_with('.')
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || (dots && c == '.'));
    if fine {
        Ok(())
    } else {
        Err(invalid(
            place,
            format!(
                "`{value}` must be letters, digits, - or _{}",
                if dots { " (and . between tokens)" } else { "" }
            ),
        ))
    }
}

fn validate_bus(bus: &BusSection) -> Result<(), ConfigLoadError> {
    if bus.workers == 0 {
        return Err(invalid("bus.workers", "must be at least 1"));
    }
    if bus.reconnect_initial_ms == 0 || bus.reconnect_max_ms < bus.reconnect_initial_ms {
        return Err(invalid(
            "bus.reconnect_initial_ms",
            "must be at least 1 and at most bus.reconnect_max_ms",
        ));
    }
    for channel in &bus.outbound_channels {
        check_name("bus.outbound_channels", channel, false)?;
    }
    if !bus.outbound_channels.is_empty() && !bus.nats.enabled && !bus.amqp.enabled {
        return Err(invalid(
            "bus.outbound_channels",
            "needs bus.nats or bus.amqp enabled",
        ));
    }
    let nats = &bus.nats;
    if nats.enabled {
        check_name("bus.nats.subject_prefix", &nats.subject_prefix, true)?;
        check_name("bus.nats.inbound_stream", &nats.inbound_stream, false)?;
        check_name("bus.nats.publish_stream", &nats.publish_stream, false)?;
        check_name("bus.nats.consumer", &nats.consumer, false)?;
        check_name(
            "bus.nats.command_queue_group",
            &nats.command_queue_group,
            false,
        )?;
        if nats.inbound_stream == nats.publish_stream {
            return Err(invalid(
                "bus.nats.publish_stream",
                "must differ from inbound_stream",
            ));
        }
        if nats.max_ack_pending == 0 || nats.ack_wait_seconds == 0 {
            return Err(invalid(
                "bus.nats.max_ack_pending",
                "max_ack_pending and ack_wait_seconds must be at least 1",
            ));
        }
    }
    let amqp = &bus.amqp;
    if amqp.enabled {
        for (place, name) in [
            ("bus.amqp.inbound_exchange", &amqp.inbound_exchange),
            ("bus.amqp.inbound_queue", &amqp.inbound_queue),
            ("bus.amqp.events_exchange", &amqp.events_exchange),
            ("bus.amqp.dead_letter_exchange", &amqp.dead_letter_exchange),
            ("bus.amqp.dead_letter_queue", &amqp.dead_letter_queue),
            ("bus.amqp.command_exchange", &amqp.command_exchange),
            ("bus.amqp.command_queue", &amqp.command_queue),
            ("bus.amqp.outbound_exchange", &amqp.outbound_exchange),
        ] {
            check_name(place, name, true)?;
        }
        if amqp.prefetch == 0 {
            return Err(invalid("bus.amqp.prefetch", "must be at least 1"));
        }
    }
    Ok(())
}

impl Settings {
    /// The effective configuration as TOML, secrets masked.
    pub fn effective_toml(&self) -> String {
        toml::to_string_pretty(&self.file)
            .unwrap_or_else(|error| format!("# cannot render: {error}\n"))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    /// Loads a file holding `extra` (no environment) and returns its error, or "" if it loaded.
    fn load_error(extra: &str) -> String {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("extra.toml");
        std::fs::write(&path, extra).unwrap();
        load(Some(&path), env(&[]))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    }

    #[test]
    fn text_loads_as_the_same_file_would() {
        let text = "[server]\nlisten = \"127.0.0.1:9999\"\n[chat]\nmax_message_chars = 500\n";
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("extra.toml");
        std::fs::write(&path, text).unwrap();
        let from_file = load(Some(&path), env(&[])).unwrap();
        let from_text = load_str(text, env(&[])).unwrap();
        assert_eq!(from_text.effective_toml(), from_file.effective_toml());
        assert!(from_text.effective_toml().contains("127.0.0.1:9999"));
        let error = load_str("[server]\nlisten = \"nowhere\"\n", env(&[]))
            .unwrap_err()
            .to_string();
        assert!(error.contains("server.listen"), "{error}");
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn defaults_load_and_validate() {
        let settings = load(None, env(&[])).unwrap();
        assert_eq!(settings.listen.ip().to_string(), "127.0.0.1");
        assert!(
            !settings.routing.agents.is_empty(),
            "the demo config has agents"
        );
        assert!(settings.routing.wording.is_some());
    }

    #[test]
    fn environment_sets_account_lists_and_leaves_commas_in_other_values() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("channels.toml");
        std::fs::write(
            &path,
            "[channels.twilio.main]\naccount_sid = \"AC123\"\npublic_url = \"https://hooks.example/t\"\n\
             [channels.meta.app]\nmessenger_page_ids = [\"1\"]\n",
        )
        .unwrap();
        let settings = load(
            Some(&path),
            env(&[
                (
                    "SWITCHBOARD__CHANNELS__TWILIO__MAIN__NUMBERS",
                    "+15550001111,+15550002222",
                ),
                // Commas inside a secret are the secret's own.
                ("SWITCHBOARD__CHANNELS__TWILIO__MAIN__AUTH_TOKEN", "tok,en"),
                // A list of one that looks like a number stays a list of one string.
                (
                    "SWITCHBOARD__CHANNELS__META__APP__WHATSAPP_PHONE_NUMBER_IDS",
                    "106540352242922",
                ),
                ("SWITCHBOARD__CHANNELS__META__APP__APP_SECRET", "a,b,c"),
                ("SWITCHBOARD__CHANNELS__META__APP__VERIFY_TOKEN", "verify"),
                ("SWITCHBOARD__CHANNELS__META__APP__ACCESS_TOKEN", "EAAB,x"),
            ]),
        )
        .unwrap();
        let twilio = &settings.channels.twilio[0];
        assert_eq!(twilio.numbers, ["+15550001111", "+15550002222"]);
        assert!(twilio.auth_token.matches("tok,en"));
        let meta = &settings.channels.meta[0];
        assert_eq!(meta.whatsapp_phone_number_ids, ["106540352242922"]);
        assert_eq!(meta.messenger_page_ids, ["1"]);
        assert!(meta.app_secret.matches("a,b,c"));
        assert!(meta.access_token.matches("EAAB,x"));
        // One number alone is a list of one, with its `+`.
        let single = load(
            Some(&path),
            env(&[
                (
                    "SWITCHBOARD__CHANNELS__TWILIO__MAIN__NUMBERS",
                    "+15550001111",
                ),
                ("SWITCHBOARD__CHANNELS__TWILIO__MAIN__AUTH_TOKEN", "token"),
                ("SWITCHBOARD__CHANNELS__META__APP__APP_SECRET", "s"),
                ("SWITCHBOARD__CHANNELS__META__APP__VERIFY_TOKEN", "v"),
                ("SWITCHBOARD__CHANNELS__META__APP__ACCESS_TOKEN", "a"),
            ]),
        )
        .unwrap();
        assert_eq!(single.channels.twilio[0].numbers, ["+15550001111"]);
    }

    #[test]
    fn environment_overrides_and_secrets_never_print() {
        let settings = load(
            None,
            env(&[
                ("SWITCHBOARD__SERVER__LISTEN", "127.0.0.1:0"),
                ("SWITCHBOARD__AUTH__ADMIN_TOKENS", "s3cret-admin,other"),
                ("SWITCHBOARD__AUTH__AGENT_TOKENS__ALICE", "alice-s3cret"),
                (
                    "SWITCHBOARD__BUS__AMQP__URL",
                    "amqp://app:s3cret@mq:5672/%2f",
                ),
                ("UNRELATED", "x"),
            ]),
        )
        .unwrap();
        assert_eq!(settings.listen.port(), 0);
        assert!(
            settings
                .auth
                .ingest_tokens
                .iter()
                .any(|token| token.matches("demo-ingest-token"))
        );
        assert!(settings.auth.admin_tokens[0].matches("s3cret-admin"));
        assert!(settings.auth.agent_tokens["alice"].matches("alice-s3cret"));
        let printed = format!("{}{:?}", settings.effective_toml(), settings);
        assert!(!printed.contains("s3cret"), "a secret leaked: {printed}");
    }

    #[test]
    fn errors_name_the_problem() {
        let cases = [
            (
                "[[rules]]\nname = \"r\"\nqueues = [\"nope\"]\n",
                "unknown queue `nope`",
            ),
            (
                "[[rules]]\nname = \"r\"\nqueues = [\"support\"]\n[rules.match]\npattern = \"(\"\n",
                "bad regex",
            ),
            (
                "[[agents]]\nid = \"alice\"\ncapacity = { chat = 1 }\n[[agents]]\nid = \"alice\"\ncapacity = { chat = 1 }\n",
                "agent `alice` is defined twice",
            ),
            (
                "[[agents]]\nid = \"zed\"\ncapacity = { chat = 0 }\n",
                "capacity 0",
            ),
            ("[server]\nlisten = \"nowhere\"\n", "server.listen"),
            ("[routing]\ncolour = 1\n", "unknown field `colour`"),
            (
                "[server]\nlisten = \"0.0.0.0:8080\"\n",
                "only allowed when listening on loopback",
            ),
            (
                "[bus.nats]\nenabled = true\nsubject_prefix = \"a b\"\n",
                "bus.nats.subject_prefix",
            ),
            (
                "[bus]\noutbound_channels = [\"whatsapp\"]\n",
                "needs bus.nats or bus.amqp enabled",
            ),
            (
                "[bus.amqp]\nenabled = true\nprefetch = 0\n",
                "bus.amqp.prefetch",
            ),
        ];
        for (extra, expected) in cases {
            let error = load_error(extra);
            assert!(
                error.contains(expected),
                "{extra:?}: expected `{expected}` in `{error}`"
            );
        }
    }

    #[test]
    fn postgres_store_takes_its_password_from_env_or_file_and_never_prints_it() {
        let url = (
            "SWITCHBOARD__STORE__URL",
            "postgres://sb@db.internal:6543/contact",
        );
        let settings = load(
            None,
            env(&[
                ("SWITCHBOARD__STORE__BACKEND", "postgres"),
                url,
                ("SWITCHBOARD__STORE__PASSWORD", "pg-s3cret"),
                ("SWITCHBOARD__STORE__SCHEMA", "centre_a"),
                ("SWITCHBOARD__STORE__POOL_SIZE", "4"),
            ]),
        )
        .unwrap();
        let StoreSettings::Postgres(options) = &settings.store else {
            panic!("{:?}", settings.store);
        };
        assert_eq!(options.connection.get_password(), Some(&b"pg-s3cret"[..]));
        assert_eq!(options.connection.get_dbname(), Some("contact"));
        assert_eq!(
            (options.schema.as_str(), options.pool_size),
            ("centre_a", 4)
        );
        assert_eq!(
            settings.store.describe(),
            "postgres://db.internal:6543/contact as sb, schema centre_a"
        );
        let printed = format!("{}{:?}", settings.effective_toml(), settings);
        assert!(!printed.contains("s3cret"), "a secret leaked: {printed}");

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("password");
        std::fs::write(&file, "from-a-file\n").unwrap();
        let settings = load(
            None,
            env(&[
                ("SWITCHBOARD__STORE__BACKEND", "postgres"),
                url,
                ("SWITCHBOARD__STORE__PASSWORD_FILE", file.to_str().unwrap()),
            ]),
        )
        .unwrap();
        let StoreSettings::Postgres(options) = &settings.store else {
            panic!("{:?}", settings.store);
        };
        assert_eq!(options.connection.get_password(), Some(&b"from-a-file"[..]));
        assert_eq!(options.schema, "public");
    }

    #[test]
    fn postgres_store_errors_name_the_key() {
        let cases: [(&[(&str, &str)], &str); 6] = [
            (&[], "store.url: required"),
            (&[("SWITCHBOARD__STORE__URL", "mysql://x")], "store.url"),
            (
                &[
                    ("SWITCHBOARD__STORE__URL", "postgres://h/db"),
                    ("SWITCHBOARD__STORE__SCHEMA", "Bad-Name"),
                ],
                "store.schema",
            ),
            (
                &[
                    ("SWITCHBOARD__STORE__URL", "postgres://h/db"),
                    ("SWITCHBOARD__STORE__POOL_SIZE", "1"),
                ],
                "store.pool_size",
            ),
            (
                &[
                    ("SWITCHBOARD__STORE__URL", "postgres://h/db"),
                    ("SWITCHBOARD__STORE__PASSWORD_FILE", "/nonexistent/pw"),
                ],
                "store.password_file: cannot read /nonexistent/pw",
            ),
            (
                &[
                    ("SWITCHBOARD__STORE__URL", "postgres://h/db"),
                    ("SWITCHBOARD__STORE__PASSWORD", "x"),
                    ("SWITCHBOARD__STORE__PASSWORD_FILE", "/nonexistent/pw"),
                ],
                "not both",
            ),
        ];
        for (pairs, expected) in cases {
            let mut pairs = pairs.to_vec();
            pairs.push(("SWITCHBOARD__STORE__BACKEND", "postgres"));
            let error = load(None, env(&pairs))
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(
                error.contains(expected),
                "{pairs:?}: `{expected}` in `{error}`"
            );
        }
        let error = load(None, env(&[("SWITCHBOARD__STORE__BACKEND", "mongo")]))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(error.contains("sqlite or postgres"), "{error}");
    }

    #[test]
    fn channel_accounts_take_secrets_from_env_and_incomplete_ones_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("channels.toml");
        std::fs::write(
            &path,
            "[channels.twilio.main]\naccount_sid = \"AC123\"\npublic_url = \"https://sb.example.com/v1/webhooks/twilio/main\"\nnumbers = [\"+14155550100\"]\n",
        )
        .unwrap();
        let settings = load(
            Some(&path),
            env(&[(
                "SWITCHBOARD__CHANNELS__TWILIO__MAIN__AUTH_TOKEN",
                "tw-s3cret",
            )]),
        )
        .unwrap();
        let twilio = &settings.channels.twilio[0];
        assert_eq!(twilio.name, "main");
        assert!(twilio.auth_token.matches("tw-s3cret"));
        assert_eq!(twilio.api_url, "https://api.twilio.com");
        let printed = format!("{}{:?}", settings.effective_toml(), settings);
        assert!(!printed.contains("tw-s3cret"), "a secret leaked: {printed}");

        let error = load(Some(&path), env(&[])).unwrap_err().to_string();
        assert!(
            error.contains("channels.twilio.main.auth_token")
                && error.contains("SWITCHBOARD__CHANNELS__TWILIO__MAIN__AUTH_TOKEN"),
            "{error}"
        );
        let cases = [
            (
                "[channels.twilio.main]\naccount_sid = \"AC1\"\nauth_token = \"x\"\n",
                "public_url",
            ),
            (
                "[channels.twilio.main]\naccount_sid = \"AC1\"\nauth_token = \"x\"\npublic_url = \"https://a/b\"\nnumbers = [\"0155\"]\n",
                "must be E.164",
            ),
            (
                "[channels.meta.main]\napp_secret = \"a\"\n",
                "whatsapp_phone_number_ids",
            ),
            (
                "[channels.telegram.main]\nbot_token = \"nocolon\"\nsecret_token = \"s\"\n",
                "is not a bot token",
            ),
            (
                "[channels.vonage.main]\napi_key = \"k\"\napi_secret = \"s\"\n",
                "signature_secret",
            ),
        ];
        for (extra, expected) in cases {
            let error = load_error(extra);
            assert!(
                error.contains(expected),
                "{extra:?}: `{expected}` in `{error}`"
            );
        }
    }

    #[test]
    fn constant_time_secret_comparison_is_exact() {
        let secret = Secret::new("abc");
        assert!(secret.matches("abc"));
        assert!(!secret.matches("abd"));
        assert!(!secret.matches("abcd"));
        assert!(!secret.matches(""));
    }
}
