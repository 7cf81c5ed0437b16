//! The one path every email intake takes (SMTP listener, IMAP, raw webhook): parse, name the
//! attachments, find the thread, then `Actions::ingest_with_attachments` (the attachments are
//! stored in the message's commit) — or, for a bounce of one of our replies, record that reply's
//! failure (`message.delivery_failed`) instead of opening a conversation.
//!
//! It returns only after the commit, so the caller may then acknowledge the message to its source
//! (SMTP 250, HTTP 2xx, IMAP flag/move).

use std::sync::Arc;
use std::time::Instant;

use schemars::JsonSchema;
use serde::Serialize;

use super::attachments::AttachmentLinks;
use super::mime::{self, ParsedEmail, RawAttachment};
use super::{Envelope, Normalise, threading};
use crate::channels::{DeliveryState, StatusUpdate};
use crate::config::email::EmailSettings;
use crate::daemon::actions::{Actions, IngestReceipt, Refusal, RefusalKind};
use crate::message::Attachment;
use crate::store::{AttachmentContent, ConversationStatus};

/// Why a message was not taken.
#[derive(Debug, Clone, thiserror::Error)]
pub enum IntakeError {
    /// Not a readable message, or one switchboard refuses: sending it again will not help.
    #[error("{0}")]
    Rejected(String),
    /// switchboard cannot store it now (store down, disk full, shutting down): try again later.
    #[error("{0}")]
    Unavailable(String),
    /// Over `max_message_bytes` (SMTP 552, HTTP 413).
    #[error("{0}")]
    TooLarge(String),
}

impl From<Refusal> for IntakeError {
    fn from(refusal: Refusal) -> Self {
        if refusal.retryable() {
            IntakeError::Unavailable(refusal.message)
        } else {
            IntakeError::Rejected(format!("{}: {}", refusal.code, refusal.message))
        }
    }
}

/// What became of a message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Accepted {
    /// Stored (or found already stored) in a conversation.
    Stored {
        message_id: String,
        conversation_id: String,
        duplicate: bool,
    },
    /// A delivery report on one of our replies: recorded on that reply.
    Bounce { original_message_id: Option<String> },
}

impl From<&IngestReceipt> for Accepted {
    fn from(receipt: &IngestReceipt) -> Self {
        Accepted::Stored {
            message_id: receipt.message_id.to_string(),
            conversation_id: receipt.conversation_id.to_string(),
            duplicate: receipt.duplicate,
        }
    }
}

/// The email channel's intake; cheap to clone.
#[derive(Debug, Clone)]
pub struct EmailIntake {
    pub settings: Arc<EmailSettings>,
    attachment_links: AttachmentLinks,
    actions: Actions,
}

impl EmailIntake {
    pub fn new(settings: Arc<EmailSettings>, public_url: &str, actions: Actions) -> EmailIntake {
        EmailIntake {
            attachment_links: AttachmentLinks::new(public_url),
            settings,
            actions,
        }
    }

    /// Is intake open (not shutting down)?
    pub fn open(&self) -> Result<(), IntakeError> {
        Ok(self.actions.intake_open()?)
    }

    /// Takes one raw message. Returns after it is durably stored (or its bounce recorded).
    pub async fn accept(
        &self,
        raw: &[u8],
        envelope: &Envelope,
        provider: &str,
        received: Instant,
    ) -> Result<Accepted, IntakeError> {
        self.actions.intake_open()?;
        if raw.len() > self.settings.max_message_bytes {
            return Err(IntakeError::TooLarge(format!(
                "message of {} bytes is over the limit of {}",
                raw.len(),
                self.settings.max_message_bytes
            )));
        }
        let mut email = mime::parse(raw, envelope.mail_from.as_deref())
            .map_err(|error| IntakeError::Rejected(error.to_string()))?;
        if let Some(bounce) = &email.bounce
            && let Some(original) = &bounce.original_message_id
            && bounce.is_failure()
        {
            let error = [bounce.status.as_deref(), bounce.diagnostic.as_deref()]
                .into_iter()
                .flatten()
                .collect::<Vec<_>>()
                .join(" ");
            self.actions
                .outbound
                .provider_status(&StatusUpdate {
                    channel: "email".into(),
                    provider_message_id: original.clone(),
                    state: DeliveryState::Failed,
                    error: Some(if error.is_empty() {
                        "bounced".into()
                    } else {
                        error
                    }),
                })
                .await
                .map_err(|error| IntakeError::from(Refusal::from(error)))?;
            return Ok(Accepted::Bounce {
                original_message_id: Some(original.clone()),
            });
        }
        let named = self
            .name_attachments(std::mem::take(&mut email.attachments))
            .await?;
        let thread_key = self.tagged_thread(&email).await?;
        let message = Normalise {
            raw,
            email: &email,
            envelope,
            settings: &self.settings,
            provider,
            thread_key,
            attachments: named.listed,
            dropped: named.dropped,
        }
        .message();
        message
            .validate()
            .map_err(|error| IntakeError::Rejected(format!("invalid message: {error}")))?;
        let receipt = self
            .actions
            .ingest_with_attachments(message, named.contents, received)
            .await?;
        Ok(Accepted::from(&receipt))
    }

    /// The thread of the conversation a subject tag names, when that conversation is still open on
    /// email: for clients that drop `References`.
    async fn tagged_thread(&self, email: &ParsedEmail) -> Result<Option<String>, IntakeError> {
        let Some(conversation) = email
            .subject
            .as_deref()
            .and_then(|subject| threading::subject_tag(&self.settings.subject_tag_prefix, subject))
        else {
            return Ok(None);
        };
        let record = self
            .actions
            .store
            .conversation(conversation)
            .await
            .map_err(|error| IntakeError::from(Refusal::from(error)))?;
        Ok(record
            .filter(|record| {
                record.status != ConversationStatus::Closed && record.reply_route.channel == "email"
            })
            .map(|record| record.reply_route.thread_key))
    }

    /// Names every attachment under the size cap by its hash (off the async threads: a part may
    /// be megabytes) and lists the ones dropped for their size. The contents go to the store
    /// with the message.
    async fn name_attachments(
        &self,
        parts: Vec<RawAttachment>,
    ) -> Result<NamedAttachments, IntakeError> {
        let links = self.attachment_links.clone();
        let cap = self.settings.max_attachment_bytes;
        if parts.is_empty() {
            return Ok(NamedAttachments::default());
        }
        tokio::task::spawn_blocking(move || {
            let mut named = NamedAttachments::default();
            for part in parts {
                let size = part.content.len();
                if size > cap {
                    let name = part.filename.as_deref().unwrap_or(&part.content_type);
                    named
                        .dropped
                        .push(format!("{name} ({size} bytes, over {cap})"));
                    continue;
                }
                let content = AttachmentContent::new(part.content);
                named.listed.push(Attachment {
                    url: links.url(&content),
                    content_type: part.content_type,
                    filename: part.filename,
                    size: Some(size as u64),
                });
                named.contents.push(content);
            }
            named
        })
        .await
        .map_err(|error| IntakeError::Unavailable(format!("attachment hashing failed: {error}")))
    }
}

/// An email's attachments, named: the contents for the store, the message's list of them, and
/// the ones dropped for their size.
#[derive(Debug, Default)]
struct NamedAttachments {
    contents: Vec<AttachmentContent>,
    listed: Vec<Attachment>,
    dropped: Vec<String>,
}

/// A refusal for transports that map kinds (the webhook): rejected mail is invalid, the rest is
/// unavailable.
impl From<IntakeError> for Refusal {
    fn from(error: IntakeError) -> Self {
        match error {
            IntakeError::Rejected(reason) => {
                Refusal::new(RefusalKind::Invalid, "rejected_email", reason)
            }
            IntakeError::Unavailable(reason) => {
                Refusal::new(RefusalKind::Unavailable, "unavailable", reason)
            }
            IntakeError::TooLarge(reason) => {
                Refusal::new(RefusalKind::Invalid, "too_large", reason)
            }
        }
    }
}
