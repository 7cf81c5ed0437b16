//! The email channel: MIME in (three intakes: the built-in SMTP listener, an IMAP mailbox, the raw
//! MIME webhook), threading and loop protection, SMTP out.
//!
//! - `mime.rs` — one message parsed (mail-parser): text, HTML, reply stripping, attachments, DSNs.
//! - `threading.rs` — References root as thread key, the subject tag, RFC 3834 loop signals.
//! - `attachments.rs` — attachment URLs; the contents are stored with their message, by SHA-256.
//! - `intake.rs` — every intake's one path: parse, name the attachments, resolve the thread, then
//!   `Actions::ingest_with_attachments` (or, for a bounce, the failed reply's status).
//! - `smtp.rs` — the ESMTP listener (smtp-proto grammar, STARTTLS with rustls).
//! - `imap.rs` — an existing mailbox read over IMAP (IDLE or polling, UIDVALIDITY + UID kept).
//! - `outbound.rs` — agents' replies over SMTP to the configured relay (lettre), DKIM-signed when
//!   a key is configured.
//! - `autoreply.rs` — the acknowledgement of a new email conversation (queue place, estimated
//!   wait), behind the RFC 3834 loop checks and the per-sender hourly cap.
//!
//! Every intake uses provider `smtp`, `imap` or `mime` (the webhook); the dedupe key is the
//! `Message-ID`, so one message reaching switchboard by two paths is stored once.

pub mod attachments;
pub mod autoreply;
pub mod imap;
pub mod intake;
pub mod mime;
pub mod outbound;
pub mod smtp;
pub mod threading;

use serde_json::{Value, json};

use crate::config::email::EmailSettings;
use crate::message::{Address, Attachment, InboundMessage};
use mime::{Mailbox, ParsedEmail};

/// What the SMTP conversation said about a message (the envelope), when it came by SMTP.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Envelope {
    /// `MAIL FROM`; `Some("")` for the null reverse-path `<>` (bounces).
    pub mail_from: Option<String>,
    /// `RCPT TO` addresses we accepted.
    pub rcpt_to: Vec<String>,
}

/// The dedupe key of a message without a `Message-ID`: its content's hash, so a redelivery of the
/// same bytes is still recognised.
pub fn fallback_message_id(raw: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    format!("sha256-{}@switchboard", hex::encode(Sha256::digest(raw)))
}

fn mailbox_json(mailbox: &Mailbox) -> Value {
    json!({ "address": mailbox.address, "name": mailbox.name })
}

/// Which of our addresses the message was for: the envelope recipient, else a To/Cc that is ours,
/// else the first To.
fn our_address(
    email: &ParsedEmail,
    envelope: &Envelope,
    settings: &EmailSettings,
) -> Option<String> {
    envelope
        .rcpt_to
        .iter()
        .find(|address| settings.is_ours(address))
        .cloned()
        .or_else(|| {
            email
                .to
                .iter()
                .chain(&email.cc)
                .find(|mailbox| settings.is_ours(&mailbox.address))
                .map(|mailbox| mailbox.address.clone())
        })
        .or_else(|| email.to.first().map(|mailbox| mailbox.address.clone()))
        .map(|address| address.to_lowercase())
}

/// The normalised message. `thread_key` is the conversation's key found by a subject tag, else the
/// References root is used; `attachments` are named (their contents go to the store with the
/// message); `dropped` names attachments over the size cap.
pub struct Normalise<'a> {
    pub raw: &'a [u8],
    pub email: &'a ParsedEmail,
    pub envelope: &'a Envelope,
    pub settings: &'a EmailSettings,
    pub provider: &'a str,
    pub thread_key: Option<String>,
    pub attachments: Vec<Attachment>,
    pub dropped: Vec<String>,
}

impl std::fmt::Debug for Normalise<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Normalise")
            .field("provider", &self.provider)
            .field("message_id", &self.email.message_id)
            .finish_non_exhaustive()
    }
}

impl Normalise<'_> {
    pub fn message(self) -> InboundMessage {
        let email = self.email;
        let message_id = email
            .message_id
            .clone()
            .unwrap_or_else(|| fallback_message_id(self.raw));
        let mut message = InboundMessage::new(
            "email",
            self.provider,
            &message_id,
            &email.from.address.to_lowercase(),
            &email.text,
        );
        message.from.name = email.from.name.clone();
        message.to = our_address(email, self.envelope, self.settings).map(|address| Address {
            address,
            name: None,
        });
        message.thread_key = Some(
            self.thread_key
                .or_else(|| threading::thread_root(email).map(str::to_owned))
                .unwrap_or_else(|| message_id.clone()),
        );
        message.subject = email.subject.clone();
        message.html = email.html.clone();
        message.attachments = self.attachments;
        let metadata = &mut message.metadata;
        metadata.insert("message_id".into(), json!(message_id));
        if !email.in_reply_to.is_empty() {
            metadata.insert("in_reply_to".into(), json!(email.in_reply_to));
        }
        if !email.references.is_empty() {
            metadata.insert("references".into(), json!(email.references));
        }
        if email.full_text.trim() != email.text.trim() {
            metadata.insert("full_text".into(), json!(email.full_text));
        }
        if let Some(date) = email.date {
            metadata.insert("date".into(), json!(date.to_rfc3339()));
        }
        if let Some(reply_to) = &email.reply_to {
            metadata.insert("reply_to".into(), mailbox_json(reply_to));
        }
        if !email.cc.is_empty() {
            let cc: Vec<Value> = email.cc.iter().map(mailbox_json).collect();
            metadata.insert("cc".into(), Value::Array(cc));
        }
        if !self.dropped.is_empty() {
            metadata.insert("attachments_dropped".into(), json!(self.dropped));
        }
        let settings = self.settings;
        let block =
            threading::auto_reply_block(email, self.envelope.mail_from.as_deref(), |address| {
                settings.is_ours(address)
            });
        // Consumers that answer automatically (position and wait, surveys) must check this.
        metadata.insert("auto_reply".into(), json!(block.is_none()));
        if let Some(reason) = block {
            metadata.insert("auto_reply_blocked".into(), json!(reason));
        }
        if message.text.trim().is_empty()
            && message.html.is_none()
            && message.attachments.is_empty()
        {
            // An empty mail still reaches an agent: say so rather than refuse it.
            message.text = match &email.subject {
                Some(subject) => format!("(no text) {subject}"),
                None => "(empty message)".into(),
            };
        }
        message
    }
}
