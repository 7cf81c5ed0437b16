//! Agents' replies by email: submitted over SMTP (lettre) to the configured relay, threaded so they
//! land in the customer's thread.
//!
//! The reply answers the customer's latest email in the conversation: `In-Reply-To` is its
//! `Message-ID`, `References` its chain plus that id (RFC 5322 §3.6.4), the subject is theirs with
//! `Re:` and our ticket tag. Our `Message-ID` is `<reply id@domain>`, the same on every retry, so a
//! retried send cannot become two different messages in the customer's client; it is also the
//! provider id a bounce is matched by. A 5xx from the relay is a permanent failure, anything else is
//! retried by the delivery worker.
//!
//! With a DKIM key for the sending address's domain (`[[channels.email.dkim]]`), every message
//! that leaves (replies and automatic acknowledgements) is signed by lettre (RFC 6376,
//! relaxed/relaxed, `rsa-sha256` or `ed25519-sha256`) just before submission.

use std::sync::Arc;

use async_trait::async_trait;
use lettre::message::dkim::{
    DkimCanonicalization, DkimCanonicalizationType, DkimConfig, DkimSigningAlgorithm,
    DkimSigningKey,
};
use lettre::message::header::HeaderName;
use lettre::message::{Mailbox, MessageBuilder, MultiPart};
use lettre::transport::smtp::authentication::Credentials;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

use super::threading;
use crate::channels::permanent;
use crate::config::email::{
    DkimAlgorithm, DkimSettings, EmailSettings, RelaySecurity, RelaySettings,
};
use crate::daemon::outbound::{ChannelSender, SendError, conversation_history};
use crate::message::InboundMessage;
use crate::store::{Direction, Store, StoredMessage};
use ulid::Ulid;

/// The email channel's way out.
pub struct EmailSender {
    settings: Arc<EmailSettings>,
    transport: AsyncSmtpTransport<Tokio1Executor>,
    store: Arc<dyn Store>,
    /// (signing domain, its key), read once at start.
    dkim: Vec<(String, DkimConfig)>,
}

/// The headers a signature covers (RFC 6376 §5.4.1: those that carry meaning to the reader, and
/// the threading ones). One absent from a message is signed as absent, so it cannot be added later.
/// Not `Content-Type`: lettre writes it with the body part, after the headers it signs, so it
/// would be hashed as absent while the verifier sees it (and the signature would never verify).
const DKIM_SIGNED_HEADERS: &[&str] = &[
    "From",
    "Reply-To",
    "To",
    "Subject",
    "Date",
    "Message-ID",
    "In-Reply-To",
    "References",
    "MIME-Version",
    "Auto-Submitted",
];

/// Reads a configured DKIM key and makes its lettre signing configuration.
fn dkim_config(key: &DkimSettings) -> Result<DkimConfig, RelayError> {
    let text = std::fs::read_to_string(&key.key_file).map_err(|error| {
        RelayError(format!(
            "dkim key for {}: {}: {error}",
            key.domain,
            key.key_file.display()
        ))
    })?;
    let algorithm = match key.algorithm {
        DkimAlgorithm::RsaSha256 => DkimSigningAlgorithm::Rsa,
        DkimAlgorithm::Ed25519Sha256 => DkimSigningAlgorithm::Ed25519,
    };
    let signing_key = DkimSigningKey::new(text.trim(), algorithm).map_err(|error| {
        RelayError(format!(
            "dkim key for {} ({}): {error} (rsa-sha256 wants a PKCS#1 PEM key, \
             `-----BEGIN RSA PRIVATE KEY-----`; ed25519-sha256 the base64 32-byte seed)",
            key.domain,
            key.key_file.display()
        ))
    })?;
    Ok(DkimConfig::new(
        key.selector.clone(),
        key.domain.clone(),
        signing_key,
        DKIM_SIGNED_HEADERS
            .iter()
            .map(|name| HeaderName::new_from_ascii_str(name))
            .collect(),
        DkimCanonicalization {
            header: DkimCanonicalizationType::Relaxed,
            body: DkimCanonicalizationType::Relaxed,
        },
    ))
}

/// The envelope of every mail we send in a conversation (agent replies and acknowledgements):
/// from our mailbox `ours` (also `Reply-To`), to `customer`, the subject answering the customer's
/// with the conversation's tag, and our `Message-ID` (without brackets).
pub fn reply_envelope(
    settings: &EmailSettings,
    ours: &str,
    customer: &str,
    conversation: Ulid,
    customer_subject: Option<&str>,
    message_id: &str,
) -> Result<MessageBuilder, String> {
    let from = Mailbox::new(
        settings.from_name.clone(),
        ours.parse()
            .map_err(|error| format!("our address `{ours}`: {error}"))?,
    );
    let to = Mailbox::new(
        None,
        customer
            .parse()
            .map_err(|error| format!("customer address `{customer}`: {error}"))?,
    );
    Ok(Message::builder()
        .from(from.clone())
        .reply_to(from)
        .to(to)
        .subject(threading::reply_subject(
            &settings.subject_tag_prefix,
            conversation,
            customer_subject,
        ))
        .message_id(Some(format!("<{message_id}>"))))
}

/// `In-Reply-To` and `References` answering `answered` (RFC 5322 §3.6.4): its id after its chain.
pub fn thread_headers(
    builder: MessageBuilder,
    answered: Option<&InboundMessage>,
) -> MessageBuilder {
    let Some(parent) = answered
        .and_then(|message| message.metadata.get("message_id"))
        .and_then(|id| id.as_str())
    else {
        return builder;
    };
    let mut chain: Vec<String> = answered
        .and_then(|message| message.metadata.get("references"))
        .and_then(|references| serde_json::from_value(references.clone()).ok())
        .unwrap_or_default();
    chain.push(parent.to_owned());
    let references: Vec<String> = chain.iter().map(|id| format!("<{id}>")).collect();
    builder
        .in_reply_to(format!("<{parent}>"))
        .references(references.join(" "))
}

/// Where an answer to `answered` goes: its `Reply-To` when it asked for one, else its sender.
pub fn customer_address(answered: &InboundMessage) -> &str {
    answered
        .metadata
        .get("reply_to")
        .and_then(|reply_to| reply_to["address"].as_str())
        .unwrap_or(&answered.from.address)
}

impl std::fmt::Debug for EmailSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmailSender")
            .field(
                "relay",
                &self.settings.relay.as_ref().map(|relay| &relay.host),
            )
            .finish_non_exhaustive()
    }
}

/// Why the relay cannot be used as configured.
#[derive(Debug, thiserror::Error)]
#[error("channels.email.relay: {0}")]
pub struct RelayError(String);

impl EmailSender {
    pub fn new(
        settings: Arc<EmailSettings>,
        relay: &RelaySettings,
        store: Arc<dyn Store>,
    ) -> Result<EmailSender, RelayError> {
        type Transport = AsyncSmtpTransport<Tokio1Executor>;
        let builder = match relay.security {
            RelaySecurity::Starttls => Transport::starttls_relay(&relay.host),
            RelaySecurity::Tls => Transport::relay(&relay.host),
            RelaySecurity::None => Ok(Transport::builder_dangerous(&relay.host)),
        }
        .map_err(|error| RelayError(error.to_string()))?;
        let mut builder = builder.port(relay.port).timeout(Some(relay.timeout));
        if let Some((user, password)) = &relay.credentials {
            builder =
                builder.credentials(Credentials::new(user.clone(), password.expose().to_owned()));
        }
        let dkim = settings
            .dkim
            .iter()
            .map(|key| Ok((key.domain.clone(), dkim_config(key)?)))
            .collect::<Result<Vec<_>, RelayError>>()?;
        Ok(EmailSender {
            transport: builder.build(),
            settings,
            store,
            dkim,
        })
    }

    pub fn settings(&self) -> &EmailSettings {
        &self.settings
    }

    /// Signs `message` when a DKIM key covers `from`'s domain, then submits it to the relay.
    pub async fn submit(
        &self,
        mut message: Message,
        from: &str,
    ) -> Result<(), lettre::transport::smtp::Error> {
        let domain = from
            .rsplit_once('@')
            .map(|(_, domain)| domain.to_lowercase())
            .unwrap_or_default();
        if let Some((_, config)) = self.dkim.iter().find(|(ours, _)| *ours == domain) {
            message.sign(config);
        }
        self.transport.send(message).await.map(|_| ())
    }

    /// The customer's latest email in the conversation: what the reply answers.
    async fn answered(&self, reply: &StoredMessage) -> Result<Option<InboundMessage>, SendError> {
        let messages = conversation_history(self.store.as_ref(), reply).await?;
        Ok(messages
            .iter()
            .rev()
            .filter(|message| message.direction == Direction::Inbound && message.channel == "email")
            .find_map(|message| {
                serde_json::from_value::<InboundMessage>(message.body.clone()).ok()
            }))
    }

    /// The reply as an RFC 5322 message, our `Message-ID` (without brackets) and the address it
    /// leaves from.
    pub fn compose(
        &self,
        reply: &StoredMessage,
        answered: Option<&InboundMessage>,
    ) -> Result<(Message, String, String), SendError> {
        let settings = &self.settings;
        let text = reply.body["text"].as_str().unwrap_or_default().to_owned();
        let html = reply.body["html"]
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| text_to_html(&text));
        let ours = if settings.is_ours(&reply.from_address) {
            reply.from_address.clone()
        } else {
            settings
                .mailboxes
                .first()
                .cloned()
                .unwrap_or_else(|| reply.from_address.clone())
        };
        // The customer may have asked for replies elsewhere (Reply-To).
        let customer = answered.map(customer_address).unwrap_or(&reply.to_address);
        let message_id = format!("{}@{}", reply.id, settings.message_id_domain);
        let builder = reply_envelope(
            settings,
            &ours,
            customer,
            reply.conversation_id,
            answered.and_then(|message| message.subject.as_deref()),
            &message_id,
        )
        .map_err(permanent)?;
        let message = thread_headers(builder, answered)
            .multipart(MultiPart::alternative_plain_html(text, html))
            .map_err(|error| permanent(format!("cannot build the email: {error}")))?;
        Ok((message, message_id, ours))
    }
}

/// The HTML part of a plain reply: escaped, paragraphs and line breaks kept.
fn text_to_html(text: &str) -> String {
    let escaped = text
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;");
    let paragraphs: Vec<String> = escaped
        .split("\n\n")
        .map(|paragraph| format!("<p>{}</p>", paragraph.replace('\n', "<br>")))
        .collect();
    format!("<html><body>{}</body></html>", paragraphs.join(""))
}

#[async_trait]
impl ChannelSender for EmailSender {
    async fn send(&self, reply: &StoredMessage) -> Result<Option<String>, SendError> {
        let answered = self.answered(reply).await?;
        let (message, message_id, from) = self.compose(reply, answered.as_ref())?;
        match self.submit(message, &from).await {
            Ok(_) => Ok(Some(message_id)),
            Err(error) => Err(SendError {
                retryable: !error.is_permanent(),
                reason: format!("SMTP relay: {error}"),
                retry_after: None,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_replies_get_an_escaped_html_part() {
        assert_eq!(
            text_to_html("Hi <Ann>,\nthanks.\n\nBob & co"),
            "<html><body><p>Hi &lt;Ann&gt;,<br>thanks.</p><p>Bob &amp; co</p></body></html>"
        );
    }
}
