//! IMAP intake: reads new mail from an existing mailbox (async-imap), IDLE when the server has it,
//! else polling. The connection is TLS from the first byte (`tls`, port 993), upgraded with
//! STARTTLS before login (`starttls`, RFC 3501 §6.2.1; a server that refuses ends the round: we
//! never log in in clear text when TLS was asked for), or plain (`none`, same host only). The
//! server's certificate is checked against the public web roots, or the configured `ca_file`.
//!
//! **Invariants:** a message is marked processed (moved to `processed_mailbox`, or flagged
//! `\Seen`) and its UID recorded only after `EmailIntake::accept` committed it; the recorded
//! (UIDVALIDITY, last UID) survive restarts in `state_file` (written to a temporary file, synced,
//! renamed), so nothing is read twice or skipped; when the server's UIDVALIDITY changes, every UID
//! is new again and the Message-ID dedupe keeps what was already stored from being stored twice.
//! A message switchboard cannot store now stops the round (it is read again next round); one it
//! can never take is logged, marked processed and passed.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_imap::Session;
use async_imap::extensions::idle::IdleResponse;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::Envelope;
use super::intake::{EmailIntake, IntakeError};
use crate::config::email::{ImapSecurity, ImapSettings};

/// Why a round with the server ended early.
#[derive(Debug, thiserror::Error)]
pub enum ImapError {
    #[error("IMAP: {0}")]
    Protocol(#[from] async_imap::error::Error),
    #[error("IMAP connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("IMAP TLS: {0}")]
    Tls(String),
    #[error("IMAP state file: {0}")]
    State(String),
    #[error("stopping")]
    Stopped,
}

/// Where reading left off in one mailbox.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    pub uid_validity: u32,
    pub last_uid: u32,
}

impl Position {
    pub fn load(path: &Path) -> Result<Option<Position>, ImapError> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|error| ImapError::State(format!("{}: {error}", path.display()))),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(ImapError::State(format!("{}: {error}", path.display()))),
        }
    }

    pub fn save(&self, path: &Path) -> Result<(), ImapError> {
        use std::io::Write;
        let failed =
            |error: std::io::Error| ImapError::State(format!("{}: {error}", path.display()));
        if let Some(parent) = path
            .parent()
            .filter(|parent| !parent.as_os_str().is_empty())
        {
            std::fs::create_dir_all(parent).map_err(failed)?;
        }
        let temporary = path.with_extension("tmp");
        let mut file = std::fs::File::create(&temporary).map_err(failed)?;
        let json = serde_json::to_vec(self).map_err(|error| ImapError::State(error.to_string()))?;
        file.write_all(&json).map_err(failed)?;
        file.sync_all().map_err(failed)?;
        std::fs::rename(&temporary, path).map_err(failed)
    }
}

/// Reads the mailbox until `stop` turns true, reconnecting with backoff after failures.
pub async fn run(settings: ImapSettings, intake: EmailIntake, mut stop: watch::Receiver<bool>) {
    let settings = Arc::new(settings);
    let mut backoff = Duration::from_millis(500);
    loop {
        let round = connect_and_read(&settings, &intake, stop.clone()).await;
        match round {
            Err(ImapError::Stopped) => break,
            Err(error) => {
                warn!(%error, host = %settings.host, "IMAP intake interrupted; reconnecting")
            }
            Ok(()) => {}
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.changed() => break,
        }
        backoff = (backoff * 2).min(Duration::from_secs(60));
    }
    info!("IMAP intake stopped");
}

/// The TLS client: the configured CA file's certificates as roots, else the public web roots.
fn tls_connector(settings: &ImapSettings) -> Result<tokio_rustls::TlsConnector, ImapError> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    match &settings.ca_file {
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        Some(path) => {
            let failed = |error: String| ImapError::Tls(format!("{}: {error}", path.display()));
            for certificate in
                CertificateDer::pem_file_iter(path).map_err(|error| failed(error.to_string()))?
            {
                let certificate = certificate.map_err(|error| failed(error.to_string()))?;
                roots
                    .add(certificate)
                    .map_err(|error| failed(error.to_string()))?;
            }
            if roots.is_empty() {
                return Err(failed("no certificate in the file".into()));
            }
        }
    }
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = tokio_rustls::rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|error| ImapError::Tls(error.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

async fn connect_and_read(
    settings: &Arc<ImapSettings>,
    intake: &EmailIntake,
    stop: watch::Receiver<bool>,
) -> Result<(), ImapError> {
    let tcp = TcpStream::connect((settings.host.as_str(), settings.port)).await?;
    let server_name = || {
        rustls_pki_types::ServerName::try_from(settings.host.clone())
            .map_err(|error| ImapError::Tls(format!("`{}`: {error}", settings.host)))
    };
    match settings.security {
        ImapSecurity::None => {
            let mut client = async_imap::Client::new(tcp);
            greeting(&mut client).await?;
            session(client, settings, intake, stop).await
        }
        ImapSecurity::Tls => {
            let tls = tls_connector(settings)?
                .connect(server_name()?, tcp)
                .await?;
            let mut client = async_imap::Client::new(tls);
            greeting(&mut client).await?;
            session(client, settings, intake, stop).await
        }
        ImapSecurity::Starttls => {
            let mut plain = async_imap::Client::new(tcp);
            greeting(&mut plain).await?;
            plain.run_command_and_check_ok("STARTTLS", None).await?;
            // Nothing the server sent before the handshake may be trusted (RFC 3501 §6.2.1):
            // the session starts again on the TLS stream, capabilities included.
            let tls = tls_connector(settings)?
                .connect(server_name()?, plain.into_inner())
                .await?;
            session(async_imap::Client::new(tls), settings, intake, stop).await
        }
    }
}

/// Reads the server's greeting, which comes before anything is said.
async fn greeting<T>(client: &mut async_imap::Client<T>) -> Result<(), ImapError>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + std::fmt::Debug,
{
    match client.read_response().await? {
        Some(_) => Ok(()),
        None => Err(ImapError::Io(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "closed before its greeting",
        ))),
    }
}

async fn session<T>(
    client: async_imap::Client<T>,
    settings: &Arc<ImapSettings>,
    intake: &EmailIntake,
    mut stop: watch::Receiver<bool>,
) -> Result<(), ImapError>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + std::fmt::Debug,
{
    let mut session = client
        .login(&settings.username, settings.password.expose())
        .await
        .map_err(|(error, _)| error)?;
    let can_idle = session.capabilities().await?.has_str("IDLE");
    loop {
        read_new(&mut session, settings, intake).await?;
        if *stop.borrow() {
            return Err(ImapError::Stopped);
        }
        if can_idle {
            let mut idle = session.idle();
            idle.init().await?;
            let (wait, interrupt) = idle.wait_with_timeout(settings.poll);
            let woke = tokio::select! {
                woke = wait => Some(woke?),
                _ = stop.changed() => None,
            };
            drop(interrupt);
            session = idle.done().await?;
            match woke {
                None => return Err(ImapError::Stopped),
                Some(IdleResponse::NewData(_)) => debug!("IMAP IDLE: new data"),
                Some(_) => {}
            }
        } else {
            tokio::select! {
                _ = tokio::time::sleep(settings.poll) => {}
                _ = stop.changed() => return Err(ImapError::Stopped),
            }
            session.noop().await?;
        }
    }
}

/// Takes every message above the recorded UID, in UID order.
async fn read_new<T>(
    session: &mut Session<T>,
    settings: &Arc<ImapSettings>,
    intake: &EmailIntake,
) -> Result<(), ImapError>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + std::fmt::Debug,
{
    let mailbox = session.select(&settings.mailbox).await?;
    let validity = mailbox.uid_validity.unwrap_or_default();
    let mut position = match Position::load(&settings.state_file)? {
        Some(position) if position.uid_validity == validity => position,
        _ => Position {
            uid_validity: validity,
            last_uid: 0,
        },
    };
    if mailbox.exists == 0 {
        return Ok(());
    }
    // `n:*` always includes the highest UID, even below n: filter on our side.
    let fetched: Vec<(u32, Vec<u8>)> = {
        let mut stream = session
            .uid_fetch(format!("{}:*", position.last_uid + 1), "(UID BODY.PEEK[])")
            .await?;
        let mut fetched = Vec::new();
        while let Some(item) = stream.next().await {
            let item = item?;
            if let (Some(uid), Some(body)) = (item.uid, item.body())
                && uid > position.last_uid
            {
                fetched.push((uid, body.to_vec()));
            }
        }
        fetched
    };
    let mut fetched = fetched;
    fetched.sort_by_key(|(uid, _)| *uid);
    for (uid, raw) in fetched {
        match intake
            .accept(&raw, &Envelope::default(), "imap", Instant::now())
            .await
        {
            Ok(_) => {}
            Err(IntakeError::Rejected(reason) | IntakeError::TooLarge(reason)) => {
                warn!(uid, %reason, "IMAP message refused; marked processed and passed");
            }
            Err(IntakeError::Unavailable(reason)) => {
                warn!(uid, %reason, "IMAP message not stored now; read again next round");
                return Ok(());
            }
        }
        let set = uid.to_string();
        match &settings.processed_mailbox {
            Some(target) => session.uid_mv(&set, target).await?,
            None => {
                let flagged = session.uid_store(&set, "+FLAGS.SILENT (\\Seen)").await?;
                flagged.collect::<Vec<_>>().await;
            }
        }
        position.last_uid = uid;
        position.save(&settings.state_file)?;
    }
    Ok(())
}
