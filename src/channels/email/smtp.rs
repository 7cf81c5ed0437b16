//! The built-in SMTP listener (RFC 5321 ESMTP): EHLO with SIZE, 8BITMIME, PIPELINING,
//! ENHANCEDSTATUSCODES and, with a certificate configured, STARTTLS (RFC 3207, rustls).
//!
//! The command grammar and DATA dot-unstuffing are smtp-proto's; this module is the session.
//! **Invariants:** mail is taken only for our mailboxes and domains (anything else is `550` at RCPT:
//! never an open relay); a message over the size limit is `552` (at MAIL by its SIZE parameter, or
//! after DATA) and nothing of it is stored; `250` answers DATA only after the message is committed
//! (`EmailIntake::accept`), and a storage failure answers `451` so the sender retries; an idle
//! client, or one trickling a command byte by byte, is cut after the command timeout, a slow DATA after the data timeout; at most
//! `max_connections` sessions run at once (the next gets `421`). After STARTTLS everything the
//! client pipelined before the handshake is discarded (RFC 3207 §4.2) and it must EHLO again.

use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use smtp_proto::request::receiver::{DataReceiver, RequestReceiver};
use smtp_proto::{
    EXT_8BIT_MIME, EXT_ENHANCED_STATUS_CODES, EXT_PIPELINING, EXT_SIZE, EXT_START_TLS,
    EhloResponse, Error as SmtpError, Request, Response,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use super::Envelope;
use super::intake::{Accepted, EmailIntake, IntakeError};
use crate::config::email::SmtpListenerSettings;

/// Why the listener could not start.
#[derive(Debug, thiserror::Error)]
pub enum ListenerError {
    #[error("cannot listen for SMTP on {address}: {source}")]
    Bind {
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot read the SMTP TLS {what} {path}: {reason}")]
    Tls {
        what: &'static str,
        path: String,
        reason: String,
    },
}

/// More recipients than this in one transaction get `452` (RFC 5321 §4.5.3.1.8 asks for ≥ 100).
const MAX_RECIPIENTS: usize = 100;
/// A client making this many errors is disconnected.
const MAX_ERRORS: usize = 10;

/// The bound listener, ready to serve.
pub struct SmtpListener {
    listener: TcpListener,
    settings: Arc<SmtpListenerSettings>,
    tls: Option<TlsAcceptor>,
}

impl std::fmt::Debug for SmtpListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmtpListener")
            .field("listener", &self.listener)
            .field("starttls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

impl SmtpListener {
    /// Binds and loads the certificate, so a bad configuration stops the daemon at start.
    pub async fn bind(settings: SmtpListenerSettings) -> Result<SmtpListener, ListenerError> {
        let tls = match &settings.tls {
            Some((cert, key)) => Some(tls_acceptor(cert, key)?),
            None => None,
        };
        let listener =
            TcpListener::bind(settings.listen)
                .await
                .map_err(|source| ListenerError::Bind {
                    address: settings.listen,
                    source,
                })?;
        Ok(SmtpListener {
            listener,
            settings: Arc::new(settings),
            tls,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accepts connections until `stop` turns true; sessions in flight finish on their own.
    pub async fn serve(self, intake: EmailIntake, mut stop: watch::Receiver<bool>) {
        let slots = Arc::new(Semaphore::new(self.settings.max_connections));
        loop {
            let accepted = tokio::select! {
                accepted = self.listener.accept() => accepted,
                _ = stop.changed() => break,
            };
            let (stream, peer) = match accepted {
                Ok(connection) => connection,
                Err(error) => {
                    warn!(%error, "SMTP accept failed");
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                let hostname = self.settings.hostname.clone();
                tokio::spawn(async move {
                    let mut stream = stream;
                    let line = format!("421 4.3.2 {hostname} too many connections, try later\r\n");
                    let _ = stream.write_all(line.as_bytes()).await;
                    let _ = stream.shutdown().await;
                });
                continue;
            };
            let session = Session {
                settings: self.settings.clone(),
                intake: intake.clone(),
                peer,
            };
            let tls = self.tls.clone();
            tokio::spawn(async move {
                if let Err(error) = session.run(stream, tls).await {
                    debug!(%peer, %error, "SMTP session ended with an error");
                }
                drop(slot);
            });
        }
        info!("SMTP listener stopped");
    }
}

fn tls_acceptor(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<TlsAcceptor, ListenerError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let failed = |what: &'static str, path: &std::path::Path, reason: String| ListenerError::Tls {
        what,
        path: path.display().to_string(),
        reason,
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|error| failed("certificate", cert, error.to_string()))?;
    if chain.is_empty() {
        return Err(failed(
            "certificate",
            cert,
            "no certificate in the file".into(),
        ));
    }
    let key_der =
        PrivateKeyDer::from_pem_file(key).map_err(|error| failed("key", key, error.to_string()))?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|builder| {
            builder
                .with_no_client_auth()
                .with_single_cert(chain, key_der)
        })
        .map_err(|error| failed("certificate", cert, error.to_string()))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// One client's connection.
struct Session {
    settings: Arc<SmtpListenerSettings>,
    intake: EmailIntake,
    peer: SocketAddr,
}

/// How a conversation over one stream ended.
enum Ended<S> {
    Closed,
    /// The client asked for STARTTLS and was told to go ahead: here is the stream to upgrade.
    StartTls(S),
}

/// What the client has said so far in this session.
#[derive(Default)]
struct Transaction {
    greeted: bool,
    mail_from: Option<String>,
    rcpt_to: Vec<String>,
}

impl Transaction {
    fn reset(&mut self) {
        self.mail_from = None;
        self.rcpt_to.clear();
    }
}

/// The command side of a session without its socket: the client's bytes in, one command (or one
/// grammar error) at a time out. What follows a `DATA` command is handed to a [`MessageReader`].
#[derive(Default)]
pub struct CommandReader {
    receiver: RequestReceiver,
    pending: Vec<u8>,
}

impl std::fmt::Debug for CommandReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CommandReader")
            .field("pending_bytes", &self.pending.len())
            .finish_non_exhaustive()
    }
}

impl CommandReader {
    /// Adds bytes as they arrive from the client.
    pub fn push(&mut self, bytes: &[u8]) {
        self.pending.extend_from_slice(bytes);
    }

    /// The next complete command; `Err(NeedsMoreData)` until one has arrived.
    pub fn next_command(&mut self) -> Result<Request<String>, SmtpError> {
        let mut bytes = self.pending.iter();
        let parsed = self.receiver.ingest(&mut bytes).map(Request::into_owned);
        let consumed = self.pending.len() - bytes.as_slice().len();
        self.pending.drain(..consumed);
        parsed
    }

    /// Everything received after the last command taken: the start of a message after `DATA`.
    pub fn take_pending(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.pending)
    }
}

/// The message after `354`, dot-unstuffed, until `<CRLF>.<CRLF>`. Over `limit` bytes the rest is
/// read and thrown away, so the session can go on with `552`.
pub struct MessageReader {
    receiver: DataReceiver,
    data: Vec<u8>,
    limit: usize,
    too_large: bool,
}

impl std::fmt::Debug for MessageReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MessageReader")
            .field("bytes", &self.data.len())
            .field("limit", &self.limit)
            .field("too_large", &self.too_large)
            .finish_non_exhaustive()
    }
}

/// The message was over the size limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("message size exceeds the limit")]
pub struct TooLarge;

impl MessageReader {
    pub fn new(limit: usize) -> MessageReader {
        MessageReader {
            receiver: DataReceiver::new(),
            data: Vec::with_capacity(limit.min(4096)),
            limit,
            too_large: false,
        }
    }

    /// Adds bytes; once the final dot has come, returns what followed it (the next pipelined
    /// commands), and the message is ready for [`MessageReader::finish`].
    pub fn push(&mut self, bytes: &[u8]) -> Option<Vec<u8>> {
        let mut input = bytes.iter();
        let done = self.receiver.ingest(&mut input, &mut self.data);
        if self.data.len() > self.limit {
            self.too_large = true;
            self.data.clear();
        }
        done.then(|| input.as_slice().to_vec())
    }

    /// The message, unless it was over the limit.
    pub fn finish(self) -> Result<Vec<u8>, TooLarge> {
        if self.too_large {
            Err(TooLarge)
        } else {
            Ok(self.data)
        }
    }
}

fn reply(out: &mut Vec<u8>, code: u16, esc: [u8; 3], message: &str) {
    let _ = Response::new(code, esc[0], esc[1], esc[2], message).write(&mut *out);
}

impl Session {
    async fn run(self, stream: TcpStream, tls: Option<TlsAcceptor>) -> std::io::Result<()> {
        match self.converse(stream, tls.is_some(), false).await? {
            Ended::Closed => Ok(()),
            Ended::StartTls(stream) => {
                let Some(acceptor) = tls else {
                    return Ok(());
                };
                let secured =
                    tokio::time::timeout(self.settings.command_timeout, acceptor.accept(stream))
                        .await
                        .map_err(|_| {
                            std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake")
                        })??;
                match self.converse(secured, false, true).await? {
                    Ended::Closed | Ended::StartTls(_) => Ok(()),
                }
            }
        }
    }

    /// Reads commands and answers them until QUIT, a timeout, or STARTTLS.
    async fn converse<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        mut stream: S,
        offer_tls: bool,
        secured: bool,
    ) -> std::io::Result<Ended<S>> {
        let hostname = &self.settings.hostname;
        if !secured {
            stream
                .write_all(format!("220 {hostname} ESMTP switchboard\r\n").as_bytes())
                .await?;
        }
        let mut commands = CommandReader::default();
        let mut transaction = Transaction::default();
        let mut errors = 0;
        let mut out = Vec::new();
        let mut chunk = vec![0u8; 8192];
        // The command timeout bounds a whole command, not each read: a client trickling one byte
        // at a time (slowloris) is cut as surely as a silent one.
        let mut command_deadline: Option<tokio::time::Instant> = None;
        loop {
            // Take every complete command already received, answering each in order; the
            // answers to a pipelined group go out together (RFC 2920).
            let parsed = commands.next_command();
            if !matches!(parsed, Err(SmtpError::NeedsMoreData { .. })) {
                command_deadline = None;
            }
            let request = match parsed {
                Ok(request) => request,
                Err(SmtpError::NeedsMoreData { .. }) => {
                    if !out.is_empty() {
                        stream.write_all(&out).await?;
                        out.clear();
                    }
                    let deadline = *command_deadline.get_or_insert_with(|| {
                        tokio::time::Instant::now() + self.settings.command_timeout
                    });
                    let read = tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await;
                    match read {
                        Ok(Ok(0)) => return Ok(Ended::Closed),
                        Ok(Ok(n)) => {
                            commands.push(&chunk[..n]);
                            continue;
                        }
                        Ok(Err(error)) => return Err(error),
                        Err(_) => {
                            let line = format!("421 4.4.2 {hostname} idle too long, closing\r\n");
                            let _ = stream.write_all(line.as_bytes()).await;
                            return Ok(Ended::Closed);
                        }
                    }
                }
                Err(error) => {
                    errors += 1;
                    let (code, esc, message) = match error {
                        SmtpError::UnknownCommand => {
                            (500, [5, 5, 1], "unrecognised command".into())
                        }
                        SmtpError::InvalidSenderAddress => {
                            (501, [5, 1, 7], "bad sender address".into())
                        }
                        SmtpError::InvalidRecipientAddress => {
                            (501, [5, 1, 3], "bad recipient address".into())
                        }
                        SmtpError::ResponseTooLong => (500, [5, 5, 6], "line too long".into()),
                        SmtpError::UnsupportedParameter { param } => {
                            (555, [5, 5, 4], format!("unsupported parameter {param}"))
                        }
                        SmtpError::InvalidParameter { param } => {
                            (501, [5, 5, 4], format!("invalid parameter {param}"))
                        }
                        SmtpError::SyntaxError { syntax } => {
                            (501, [5, 5, 2], format!("syntax: {syntax}"))
                        }
                        _ => (500, [5, 5, 2], "syntax error".into()),
                    };
                    reply(&mut out, code, esc, &message);
                    if errors >= MAX_ERRORS {
                        reply(&mut out, 421, [4, 7, 0], "too many errors, closing");
                        stream.write_all(&out).await?;
                        return Ok(Ended::Closed);
                    }
                    continue;
                }
            };
            match request {
                Request::Ehlo { host: _ } => {
                    transaction.reset();
                    transaction.greeted = true;
                    let mut ehlo = EhloResponse::new(hostname.as_str());
                    ehlo.capabilities =
                        EXT_SIZE | EXT_8BIT_MIME | EXT_PIPELINING | EXT_ENHANCED_STATUS_CODES;
                    if offer_tls {
                        ehlo.capabilities |= EXT_START_TLS;
                    }
                    ehlo.size = self.intake.settings.max_message_bytes;
                    let _ = ehlo.write(&mut out);
                }
                Request::Helo { host: _ } | Request::Lhlo { host: _ } => {
                    transaction.reset();
                    transaction.greeted = true;
                    let _ = write!(out, "250 {hostname}\r\n");
                }
                Request::StartTls => {
                    if offer_tls {
                        reply(&mut out, 220, [2, 0, 0], "ready to start TLS");
                        stream.write_all(&out).await?;
                        stream.flush().await?;
                        return Ok(Ended::StartTls(stream));
                    }
                    reply(&mut out, 502, [5, 5, 1], "STARTTLS not available");
                }
                Request::Mail { from } => {
                    if !transaction.greeted {
                        reply(&mut out, 503, [5, 5, 1], "say EHLO first");
                    } else if transaction.mail_from.is_some() {
                        reply(&mut out, 503, [5, 5, 1], "nested MAIL command");
                    } else if from.size > self.intake.settings.max_message_bytes {
                        reply(
                            &mut out,
                            552,
                            [5, 3, 4],
                            "message size exceeds fixed maximum",
                        );
                    } else if let Err(error) = self.intake.open() {
                        reply(&mut out, 421, [4, 3, 0], &error.to_string());
                        stream.write_all(&out).await?;
                        return Ok(Ended::Closed);
                    } else {
                        transaction.mail_from = Some(from.address.trim().to_owned());
                        reply(&mut out, 250, [2, 1, 0], "sender ok");
                    }
                }
                Request::Rcpt { to } => {
                    if transaction.mail_from.is_none() {
                        reply(&mut out, 503, [5, 5, 1], "need MAIL before RCPT");
                    } else if transaction.rcpt_to.len() >= MAX_RECIPIENTS {
                        reply(&mut out, 452, [4, 5, 3], "too many recipients");
                    } else if self.intake.settings.is_ours(&to.address) {
                        transaction.rcpt_to.push(to.address.to_lowercase());
                        reply(&mut out, 250, [2, 1, 5], "recipient ok");
                    } else {
                        reply(
                            &mut out,
                            550,
                            [5, 7, 1],
                            "relaying denied: not a mailbox of ours",
                        );
                    }
                }
                Request::Data => {
                    if transaction.mail_from.is_none() {
                        reply(&mut out, 503, [5, 5, 1], "need MAIL before DATA");
                        continue;
                    }
                    if transaction.rcpt_to.is_empty() {
                        reply(&mut out, 554, [5, 5, 1], "no valid recipients");
                        continue;
                    }
                    reply(&mut out, 354, [2, 0, 0], "end data with <CR><LF>.<CR><LF>");
                    stream.write_all(&out).await?;
                    out.clear();
                    let received = Instant::now();
                    let data = match self.read_data(&mut stream, &mut commands, &mut chunk).await {
                        Ok(data) => data,
                        Err(DataEnd::TooLarge) => {
                            reply(
                                &mut out,
                                552,
                                [5, 3, 4],
                                "message size exceeds fixed maximum",
                            );
                            transaction.reset();
                            continue;
                        }
                        Err(DataEnd::Closed) => return Ok(Ended::Closed),
                        Err(DataEnd::TimedOut) => {
                            let line = format!("421 4.4.2 {hostname} data timeout, closing\r\n");
                            let _ = stream.write_all(line.as_bytes()).await;
                            return Ok(Ended::Closed);
                        }
                        Err(DataEnd::Io(error)) => return Err(error),
                    };
                    let envelope = Envelope {
                        mail_from: transaction.mail_from.clone(),
                        rcpt_to: transaction.rcpt_to.clone(),
                    };
                    transaction.reset();
                    match self.intake.accept(&data, &envelope, "smtp", received).await {
                        Ok(Accepted::Stored { message_id, .. }) => {
                            reply(&mut out, 250, [2, 0, 0], &format!("stored as {message_id}"));
                        }
                        Ok(Accepted::Bounce { .. }) => {
                            reply(&mut out, 250, [2, 0, 0], "delivery report recorded");
                        }
                        Err(IntakeError::Rejected(reason)) => {
                            reply(&mut out, 554, [5, 6, 0], &reason);
                        }
                        Err(IntakeError::TooLarge(reason)) => {
                            reply(&mut out, 552, [5, 3, 4], &reason);
                        }
                        Err(IntakeError::Unavailable(reason)) => {
                            warn!(peer = %self.peer, %reason, "SMTP message not stored; told to retry");
                            reply(
                                &mut out,
                                451,
                                [4, 3, 0],
                                "cannot store the message now, try again later",
                            );
                        }
                    }
                }
                Request::Rset => {
                    transaction.reset();
                    reply(&mut out, 250, [2, 0, 0], "ok");
                }
                Request::Noop { .. } => reply(&mut out, 250, [2, 0, 0], "ok"),
                Request::Vrfy { .. } => {
                    reply(&mut out, 252, [2, 5, 0], "cannot verify, send some mail")
                }
                Request::Quit => {
                    reply(&mut out, 221, [2, 0, 0], "bye");
                    stream.write_all(&out).await?;
                    let _ = stream.shutdown().await;
                    return Ok(Ended::Closed);
                }
                other => {
                    errors += 1;
                    reply(
                        &mut out,
                        502,
                        [5, 5, 1],
                        &format!("{} not implemented", other.name()),
                    );
                }
            }
        }
    }

    /// Reads the message after `354` until `<CRLF>.<CRLF>`, within the data timeout.
    async fn read_data<S: AsyncRead + Unpin>(
        &self,
        stream: &mut S,
        commands: &mut CommandReader,
        chunk: &mut [u8],
    ) -> Result<Vec<u8>, DataEnd> {
        let deadline = tokio::time::Instant::now() + self.settings.data_timeout;
        let mut message = MessageReader::new(self.intake.settings.max_message_bytes);
        let mut input = commands.take_pending();
        loop {
            if let Some(rest) = message.push(&input) {
                // Whatever follows the final dot is the next pipelined command.
                commands.push(&rest);
                return message.finish().map_err(|TooLarge| DataEnd::TooLarge);
            }
            let read = tokio::time::timeout_at(deadline, stream.read(chunk)).await;
            input = match read {
                Ok(Ok(0)) => return Err(DataEnd::Closed),
                Ok(Ok(n)) => chunk[..n].to_vec(),
                Ok(Err(error)) => return Err(DataEnd::Io(error)),
                Err(_) => return Err(DataEnd::TimedOut),
            };
        }
    }
}

enum DataEnd {
    TooLarge,
    Closed,
    TimedOut,
    Io(std::io::Error),
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Feeds `bytes` in reads of `size`, taking commands as a session does, and entering DATA on
    /// `DATA`: returns the command names and the messages read.
    fn session(
        bytes: &[u8],
        size: usize,
        limit: usize,
    ) -> (Vec<String>, Vec<Result<Vec<u8>, TooLarge>>) {
        let mut reads = bytes.chunks(size);
        let mut commands = CommandReader::default();
        let mut names = Vec::new();
        let mut messages = Vec::new();
        loop {
            match commands.next_command() {
                Ok(Request::Data) => {
                    names.push("DATA".to_owned());
                    let mut message = MessageReader::new(limit);
                    let mut input = commands.take_pending();
                    loop {
                        if let Some(rest) = message.push(&input) {
                            commands.push(&rest);
                            break;
                        }
                        match reads.next() {
                            Some(read) => input = read.to_vec(),
                            None => return (names, messages),
                        }
                    }
                    messages.push(message.finish());
                }
                Ok(request) => names.push(request.name().to_owned()),
                Err(SmtpError::NeedsMoreData { .. }) => match reads.next() {
                    Some(read) => commands.push(read),
                    None => return (names, messages),
                },
                Err(_) => names.push("error".to_owned()),
            }
        }
    }

    const SESSION: &[u8] = b"EHLO client.example\r\nMAIL FROM:<ann@customer.example>\r\n\
RCPT TO:<support@example.com>\r\nDATA\r\nSubject: dots\r\n\r\nLine one\r\n..leading dot\r\n\
.\r\nNOOP\r\nBOGUS\r\nQUIT\r\n";

    #[test]
    fn commands_and_messages_read_alike_however_the_reads_are_cut() {
        for size in [1, 2, 7, 64, SESSION.len()] {
            let (names, messages) = session(SESSION, size, 1024);
            assert_eq!(
                names,
                ["EHLO", "MAIL", "RCPT", "DATA", "NOOP", "error", "QUIT"],
                "reads of {size}"
            );
            assert_eq!(
                messages,
                vec![Ok(
                    b"Subject: dots\r\n\r\nLine one\r\n.leading dot\r\n".to_vec()
                )],
                "reads of {size}"
            );
        }
    }

    #[test]
    fn a_message_over_the_limit_is_read_to_its_end_and_refused() {
        let (names, messages) = session(SESSION, 5, 16);
        assert_eq!(messages, vec![Err(TooLarge)]);
        assert_eq!(names.last().map(String::as_str), Some("QUIT"));
    }
}
