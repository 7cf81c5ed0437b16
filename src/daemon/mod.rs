//! The daemon: `switchboard run` wires the store, the routing engine, delivery, the outbox relay and
//! the HTTP API together, and takes them down in order on shutdown.
//!
//! Start: open the store (migrations) → recover the router (replaying unrouted messages) → re-queue
//! pending replies → serve. Ready (`/readyz`) only after recovery. On PostgreSQL the instance serves
//! intake at once as a follower, and recovers the router only when it takes the lease
//! (`cluster.rs`); a leader that stops releases the lease. Stop: intake answers 503, in-flight
//! requests finish, the engine routes what it had queued and the dispatcher commits it, the relay
//! publishes what it can, the store drains its writer.

pub mod actions;
pub mod chat;
pub mod cluster;
pub mod engine;
pub mod events;
pub mod http;
pub mod http_server;
pub mod hub;
pub mod metrics;
pub mod openapi;
pub mod outbound;
pub mod persist;
pub mod relay;
pub mod signals;
pub mod supervisor;
pub mod views;
pub mod web;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use tokio::sync::{Notify, watch};
use tracing::{info, warn};

use crate::bus::Buses;
use crate::config::{self, Settings, StoreSettings};
use crate::store::postgres::PostgresStore;
use crate::store::sqlite::{SqliteOptions, SqliteStore};
use crate::store::{Store, StoreError};

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("routing engine: {0}")]
    Engine(#[from] engine::EngineError),
    #[error("cannot listen on {address}: {source}")]
    Listen {
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("message bus: {0}")]
    Bus(#[from] relay::BusError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("email: {0}")]
    EmailListener(#[from] crate::channels::email::smtp::ListenerError),
    #[error("email: {0}")]
    EmailRelay(#[from] crate::channels::email::outbound::RelayError),
}

/// Where the configuration came from, so a reload reads the same sources again.
#[derive(Debug, Clone)]
pub struct ConfigSource {
    pub file: Option<PathBuf>,
    /// The environment captured at start (`SWITCHBOARD__*` overrides apply on reload too).
    pub environment: Vec<(String, String)>,
}

/// A running daemon: its address, and how to reload or stop it.
#[derive(Debug)]
pub struct Daemon {
    pub local_addr: SocketAddr,
    /// The built-in SMTP listener's address, when it is enabled.
    pub smtp_addr: Option<SocketAddr>,
    reload: Reloader,
    stop: Arc<Notify>,
    finished: tokio::task::JoinHandle<()>,
}

type ReloadFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;

/// Reloads the configuration from its sources (SIGHUP and `POST /v1/admin/reload`).
#[derive(Clone)]
pub struct Reloader(Arc<dyn Fn() -> ReloadFuture + Send + Sync>);

impl Reloader {
    /// An invalid configuration is refused with the reason, and the old one kept.
    pub async fn reload(&self) -> Result<(), String> {
        (self.0)().await
    }
}

impl std::fmt::Debug for Reloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Reloader")
    }
}

impl Daemon {
    /// Reloads the configuration from its sources; an invalid one is refused and the old one kept.
    pub async fn reload(&self) -> Result<(), String> {
        self.reload.reload().await
    }

    /// Begins a graceful shutdown and waits for it to finish.
    pub async fn shutdown(self) {
        self.stop.notify_one();
        let _ = self.finished.await;
    }
}

/// Opens the configured backend (running its migrations).
async fn open_store(settings: &Settings) -> Result<Arc<dyn Store>, DaemonError> {
    match &settings.store {
        StoreSettings::Sqlite {
            path,
            max_batch,
            busy_timeout,
        } => {
            if let Some(parent) = path.parent()
                && !parent.as_os_str().is_empty()
            {
                std::fs::create_dir_all(parent)?;
            }
            let store = SqliteStore::open(
                path,
                SqliteOptions {
                    max_batch: *max_batch,
                    busy_timeout: *busy_timeout,
                    ..SqliteOptions::default()
                },
            )?;
            Ok(Arc::new(store))
        }
        StoreSettings::Postgres(options) => {
            Ok(Arc::new(PostgresStore::open((**options).clone()).await?))
        }
    }
}

/// Starts everything and returns once the daemon is serving and ready.
pub async fn start(settings: Settings, source: ConfigSource) -> Result<Daemon, DaemonError> {
    assemble(settings, source).await?.serve().await
}

/// The daemon assembled and recovered but not yet listening. Its `app` is the whole HTTP API, so
/// handler tests drive it in-process (`tower::ServiceExt::oneshot`); [`Assembled::serve`] binds the
/// socket and serves it.
pub struct Assembled {
    pub app: axum::Router,
    settings: Settings,
    clustered: bool,
    metrics: metrics::Metrics,
    store: Arc<dyn Store>,
    leadership: cluster::Leadership,
    term_context: cluster::TermContext,
    single_term: Option<cluster::Term>,
    buses: Buses,
    reload: Reloader,
    accepting: Arc<AtomicBool>,
    outbound_task: tokio::task::JoinHandle<()>,
    /// The email channel's intake, for the SMTP listener and the IMAP reader `serve` starts.
    email: Option<crate::channels::email::intake::EmailIntake>,
}

impl std::fmt::Debug for Assembled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Assembled")
            .field("listen", &self.settings.listen)
            .field("clustered", &self.clustered)
            .finish_non_exhaustive()
    }
}

/// Opens the store, recovers the router (a single node) and builds every part and the HTTP app.
///
/// A single node (SQLite) recovers its router before serving. Several instances (PostgreSQL)
/// serve intake at once, as followers, and one of them leads (see `cluster.rs`).
pub async fn assemble(settings: Settings, source: ConfigSource) -> Result<Assembled, DaemonError> {
    let metrics = metrics::Metrics::new()?;
    {
        let routing = &settings.routing;
        let queues: Vec<&str> = routing.queues.iter().map(|q| q.name.as_str()).collect();
        // The built-in channels, plus any custom channel a queue names.
        let mut channels: Vec<&str> = vec![
            "email",
            "chat",
            "sms",
            "whatsapp",
            "messenger",
            "instagram",
            "telegram",
            "api",
        ];
        for channel in routing.queues.iter().flat_map(|q| &q.channels) {
            if !channels.contains(&channel.as_str()) {
                channels.push(channel.as_str());
            }
        }
        metrics.initialise_series(&queues, &channels);
    }
    let store = open_store(&settings).await?;
    let clustered = matches!(settings.store, StoreSettings::Postgres(_));
    let hub = Arc::new(hub::AgentHub::default());
    let outbox_written = Arc::new(Notify::new());
    let leadership = cluster::Leadership::new(
        settings.routing.clone(),
        clustered,
        settings.cluster.clone(),
    );
    let engine_context = engine::EngineContext {
        store: store.clone(),
        hub: hub.clone(),
        metrics: metrics.clone(),
        outbox_written: outbox_written.clone(),
        epoch: 0,
        cluster_node: clustered.then(|| settings.cluster.node_id.clone()),
        fenced: Arc::new(Notify::new()),
    };

    let mut buses = Buses::connect(&settings.bus, &metrics).await?;
    let chat = Arc::new(chat::ChatHub::default());
    let mut senders: HashMap<String, Arc<dyn outbound::ChannelSender>> = HashMap::new();
    senders.insert(chat::CHANNEL.into(), Arc::new(chat::ChatSender));
    senders.insert(
        "api".into(),
        Arc::new(outbound::ApiChannel::new(&settings.outbound)),
    );
    let channels = crate::channels::LiveChannels::new(&settings.channels, store.clone());
    senders.extend(channels.senders());
    let email = settings.channels.email.clone().map(Arc::new);
    let mut email_sender = None;
    if let Some(email) = &email
        && let Some(relay) = &email.relay
    {
        let sender = Arc::new(crate::channels::email::outbound::EmailSender::new(
            email.clone(),
            relay,
            store.clone(),
        )?);
        senders.insert("email".into(), sender.clone());
        email_sender = Some(sender);
    }
    let email_replies = email_sender.is_some();
    // A channel handed to the buses is delivered by another system, in place of an adapter.
    senders.extend(buses.channels.iter().cloned());
    let signals = signals::Signals::new(
        store.clone(),
        hub.clone(),
        chat.clone(),
        clustered.then(|| settings.cluster.node_id.clone()),
    );
    if clustered {
        tokio::spawn(signals.clone().deliver_others());
    }
    let (outbound, outbound_task) = outbound::start(outbound::OutboundContext {
        store: store.clone(),
        signals: signals.clone(),
        metrics: metrics.clone(),
        senders: Arc::new(senders),
        settings: settings.outbound.clone(),
        outbox_written: outbox_written.clone(),
    });

    let event_source = format!("switchboard://{}", settings.listen);
    // Customer chats and the supervisor feed hear of committed events from the store, whichever
    // instance wrote them, from the moment this instance starts.
    let committed = cluster::InProcessBus::new();
    tokio::spawn(cluster::follow_events(
        store.clone(),
        cluster::EventsFollowed::from_now(store.as_ref()).await?,
        committed.clone(),
        settings.cluster.poll_every,
    ));
    tokio::spawn(chat::relay_events(
        chat.clone(),
        store.clone(),
        committed.subscribe(),
    ));
    if let Some(sender) = &email_sender
        && let Some(acknowledgement) = &sender.settings().acknowledgement
    {
        let acknowledgements = crate::channels::email::autoreply::Acknowledgements::new(
            sender.clone(),
            store.clone(),
            acknowledgement.clone(),
            metrics.clone(),
        );
        // Every instance follows the committed events; only the leader answers, so a cluster
        // acknowledges each email once.
        let leader = leadership.clone();
        tokio::spawn(acknowledgements.run(committed.subscribe(), move || leader.is_leader()));
    }
    let supervisor_feed = supervisor::SupervisorFeed::new();
    let supervisor_events = committed.subscribe();
    let term_context = cluster::TermContext {
        leadership: leadership.clone(),
        engine: engine_context,
        outbound: outbound.clone(),
        buses: buses.event_buses.clone(),
        source: event_source,
        actions: Arc::new(std::sync::OnceLock::new()),
    };
    // A single node leads from the start, under epoch 0; its recovery comes before serving.
    let single_term = if clustered {
        None
    } else {
        metrics.cluster_leader.set(1);
        let stored = engine::StoredRouter::read(store.as_ref()).await?;
        Some(cluster::Term::begin(&term_context, 0, stored).await?)
    };

    let auth = Arc::new(RwLock::new(settings.auth.clone()));
    let reload = {
        let (leadership, auth, channels) = (leadership.clone(), auth.clone(), channels.clone());
        Reloader(Arc::new(move || -> ReloadFuture {
            let (leadership, auth, channels, source) = (
                leadership.clone(),
                auth.clone(),
                channels.clone(),
                source.clone(),
            );
            Box::pin(async move {
                let fresh = config::load(source.file.as_deref(), source.environment.clone())
                    .map_err(|error| error.to_string())?;
                leadership
                    .reload(fresh.routing)
                    .await
                    .map_err(|error| error.to_string())?;
                // Validated with the rest: from here nothing can refuse the new configuration.
                channels.replace(&fresh.channels);
                if let Ok(mut current) = auth.write() {
                    *current = fresh.auth;
                }
                info!("configuration reloaded");
                Ok(())
            })
        }))
    };
    let accepting = Arc::new(AtomicBool::new(true));
    let actions = actions::Actions {
        engine: leadership.clone(),
        store: store.clone(),
        metrics: metrics.clone(),
        outbound,
        accepting: accepting.clone(),
    };
    let _ = term_context.actions.set(actions.clone());
    buses.start_intake(&actions, &auth);
    let email_intake = email.map(|email| {
        crate::channels::email::intake::EmailIntake::new(
            email,
            &settings.public_url,
            actions.clone(),
        )
    });
    let state = http::AppState {
        actions,
        hub,
        auth,
        reloader: reload.clone(),
        buses: buses.states.clone(),
        channels,
        email: email_intake.clone(),
        chat,
        chat_settings: Arc::new(settings.chat.clone()),
        email_replies,
        supervisor: supervisor_feed.clone(),
        signals,
    };
    tokio::spawn(chat::push_positions(
        state.chat.clone(),
        state.actions.clone(),
    ));
    tokio::spawn(supervisor::run(
        supervisor_feed,
        state.actions.clone(),
        supervisor_events,
    ));
    let app = http::router(state, settings.body_limit_bytes).layer(
        tower_http::timeout::TimeoutLayer::with_status_code(
            axum::http::StatusCode::REQUEST_TIMEOUT,
            settings.request_timeout,
        ),
    );
    // Recovered (a single node), or able to take intake as a follower (a cluster). Nothing can ask
    // /readyz before `serve` binds the socket.
    metrics.ready.set(1);
    Ok(Assembled {
        app,
        settings,
        clustered,
        metrics,
        store,
        leadership,
        term_context,
        single_term,
        buses,
        reload,
        accepting,
        outbound_task,
        email: email_intake,
    })
}

impl Assembled {
    /// Binds the listening socket, joins the cluster (PostgreSQL) and serves until shut down.
    pub async fn serve(self) -> Result<Daemon, DaemonError> {
        let Assembled {
            app,
            settings,
            clustered,
            metrics,
            store,
            leadership,
            term_context,
            single_term,
            mut buses,
            reload,
            accepting,
            outbound_task,
            email,
        } = self;
        let listener = tokio::net::TcpListener::bind(settings.listen)
            .await
            .map_err(|source| DaemonError::Listen {
                address: settings.listen,
                source,
            })?;
        let local_addr = listener.local_addr()?;
        if let Some(path) = &settings.port_file {
            std::fs::write(path, local_addr.to_string())?;
        }
        let grace = settings.shutdown_grace;
        // The email intakes that hold sockets of their own: the SMTP listener and the IMAP reader.
        let (stop_email, email_stopped) = watch::channel(false);
        let mut smtp_addr = None;
        if let Some(intake) = &email {
            if let Some(smtp) = &intake.settings.smtp {
                let listener =
                    crate::channels::email::smtp::SmtpListener::bind(smtp.clone()).await?;
                smtp_addr = Some(listener.local_addr()?);
                tokio::spawn(listener.serve(intake.clone(), email_stopped.clone()));
            }
            if let Some(imap) = &intake.settings.imap {
                tokio::spawn(crate::channels::email::imap::run(
                    imap.clone(),
                    intake.clone(),
                    email_stopped,
                ));
            }
        }
        let (stop_cluster, cluster_stopped) = watch::channel(false);
        let member = clustered.then(|| {
            tokio::spawn(cluster::run(
                term_context,
                local_addr.to_string(),
                grace,
                cluster_stopped,
            ))
        });
        info!(address = %local_addr, store = %settings.store.describe(), node = leadership.node(), "switchboard is ready");

        let stop = Arc::new(Notify::new());
        let finished = tokio::spawn({
            let stop = stop.clone();
            async move {
                let (drain_tx, drain_rx) = watch::channel(false);
                let server = tokio::spawn(http_server::serve(
                    listener,
                    app,
                    settings.header_read_timeout,
                    drain_rx,
                ));
                stop.notified().await;
                info!("shutting down: intake closed, finishing in-flight requests");
                accepting.store(false, Ordering::SeqCst);
                let _ = stop_email.send(true);
                metrics.ready.set(0);
                let _ = drain_tx.send(true);
                let (_, served) = tokio::join!(
                    buses.stop_intake(grace),
                    tokio::time::timeout(grace, server)
                );
                if served.is_err() {
                    warn!("in-flight requests did not finish within the grace period");
                }
                // The router finishes what was queued and commits it; the relay flushes; a cluster
                // leader then releases its lease so another instance takes over at once.
                if let Some(term) = single_term {
                    term.finish(&leadership, grace).await;
                }
                if let Some(member) = member {
                    let _ = stop_cluster.send(true);
                    let _ = member.await;
                }
                buses.close().await;
                outbound_task.abort();
                drop(store);
                info!("switchboard stopped");
            }
        });
        Ok(Daemon {
            local_addr,
            smtp_addr,
            reload,
            stop,
            finished,
        })
    }
}
