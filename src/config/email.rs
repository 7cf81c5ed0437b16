//! The `[channels.email]` section: our mailboxes, attachment limits, the built-in SMTP listener
//! (`[channels.email.smtp]`) and the relay agents' replies leave through (`[channels.email.relay]`),
//! parsed once into validated [`EmailSettings`].
//!
//! The relay password is a [`Secret`] from the environment
//! (`SWITCHBOARD__CHANNELS__EMAIL__RELAY__PASSWORD`), never printed.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ConfigLoadError, Secret, invalid};

/// The email channel as written in the file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EmailSection {
    /// Our addresses (`support@example.com`): mail to them is taken in, replies leave from them.
    #[serde(default)]
    pub mailboxes: Vec<String>,
    /// Whole domains taken in (any local part); replies still leave from the address written to.
    #[serde(default)]
    pub domains: Vec<String>,
    /// The display name on our replies' `From` (e.g. `Example Support`).
    #[serde(default)]
    pub from_name: Option<String>,
    /// The ticket tag in our replies' subjects: `[#<prefix>-<conversation>]`.
    #[serde(default = "default_tag_prefix")]
    pub subject_tag_prefix: String,
    /// Right-hand side of our `Message-ID`s; the first mailbox's domain when absent.
    #[serde(default)]
    pub message_id_domain: Option<String>,
    /// An attachment larger than this is not stored; the message notes it was dropped. The others
    /// are stored with their message, once per content (named by its SHA-256).
    #[serde(default = "default_max_attachment")]
    pub max_attachment_bytes: usize,
    /// The largest message taken in (SMTP answers 552 above it; the raw webhook 413).
    #[serde(default = "default_max_message")]
    pub max_message_bytes: usize,
    #[serde(default)]
    pub smtp: SmtpListenerSection,
    #[serde(default)]
    pub relay: Option<RelaySection>,
    #[serde(default)]
    pub imap: Option<ImapSection>,
    /// Automatic answers (the acknowledgement) to one sender are capped to this many per hour
    /// (RFC 3834 §2: a responder must not answer the same sender too often).
    #[serde(default = "default_auto_reply_cap")]
    pub auto_reply_max_per_sender_per_hour: u32,
    /// The acknowledgement a new email conversation gets (place in the queue, estimated wait).
    #[serde(default)]
    pub acknowledgement: AcknowledgementSection,
    /// DKIM keys, one per signing domain: replies from a mailbox in that domain are signed.
    #[serde(default)]
    pub dkim: Vec<DkimSection>,
}

/// The automatic acknowledgement of a new email conversation.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AcknowledgementSection {
    pub enabled: bool,
    /// Only mail to these of our mailboxes is acknowledged; empty: all of them.
    pub mailboxes: Vec<String>,
    /// The text; `{ticket}`, `{position}` and `{wait_minutes}` are filled in.
    pub text: String,
}

impl Default for AcknowledgementSection {
    fn default() -> Self {
        AcknowledgementSection {
            enabled: false,
            mailboxes: Vec::new(),
            text: "Thank you for your email: it is ticket {ticket}. You are number {position} in line \
                   and we expect to answer within about {wait_minutes} minutes; reply to this email \
                   to add to your request."
                .into(),
        }
    }
}

/// A DKIM signing key (RFC 6376): the public key is published at `<selector>._domainkey.<domain>`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DkimSection {
    /// The signing domain (`d=`): mail from our addresses in this domain is signed with this key.
    pub domain: String,
    /// The selector (`s=`).
    pub selector: String,
    #[serde(default = "default_dkim_algorithm")]
    pub algorithm: DkimAlgorithm,
    /// `rsa-sha256`: a PKCS#1 PEM RSA private key; `ed25519-sha256`: the base64 32-byte seed.
    pub key_file: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum DkimAlgorithm {
    #[serde(rename = "rsa-sha256")]
    RsaSha256,
    #[serde(rename = "ed25519-sha256")]
    Ed25519Sha256,
}

fn default_dkim_algorithm() -> DkimAlgorithm {
    DkimAlgorithm::RsaSha256
}
fn default_auto_reply_cap() -> u32 {
    3
}

/// An IMAP mailbox read for new mail (an existing Microsoft 365, Google Workspace or Dovecot box).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ImapSection {
    pub host: String,
    #[serde(default = "default_imap_port")]
    pub port: u16,
    /// `tls` (implicit, port 993), `starttls` (port 143, upgraded before login) or `none` (a
    /// server on the same host only).
    #[serde(default = "default_imap_security")]
    pub security: ImapSecurity,
    /// PEM certificates trusted for the server, instead of the public web roots (a private CA).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    pub username: String,
    /// From the environment: `SWITCHBOARD__CHANNELS__EMAIL__IMAP__PASSWORD`.
    #[serde(default)]
    pub password: Option<Secret>,
    #[serde(default = "default_imap_mailbox")]
    pub mailbox: String,
    /// Processed mail is moved here; without it, processed mail is flagged `\Seen` and left.
    #[serde(default)]
    pub processed_mailbox: Option<String>,
    /// How long to IDLE (or, without IDLE, to wait) before looking again.
    #[serde(default = "default_imap_poll")]
    pub poll_seconds: u64,
    /// Where the mailbox's UIDVALIDITY and last UID taken are kept across restarts.
    #[serde(default = "default_imap_state")]
    pub state_file: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ImapSecurity {
    Tls,
    Starttls,
    None,
}

fn default_imap_port() -> u16 {
    993
}
fn default_imap_security() -> ImapSecurity {
    ImapSecurity::Tls
}
fn default_imap_mailbox() -> String {
    "INBOX".into()
}
fn default_imap_poll() -> u64 {
    60
}
fn default_imap_state() -> PathBuf {
    PathBuf::from("data/imap-state.json")
}

/// The validated IMAP intake.
#[derive(Debug, Clone)]
pub struct ImapSettings {
    pub host: String,
    pub port: u16,
    pub security: ImapSecurity,
    /// Trusted roots: this file's certificates, else the public web roots.
    pub ca_file: Option<PathBuf>,
    pub username: String,
    pub password: Secret,
    pub mailbox: String,
    pub processed_mailbox: Option<String>,
    pub poll: Duration,
    pub state_file: PathBuf,
}

/// The built-in SMTP listener (for an MX record, or a relay forwarding the support mailbox).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SmtpListenerSection {
    pub enabled: bool,
    /// Port 0 picks a free port (printed as `smtp listening on ...`).
    pub listen: String,
    /// The name in our greeting and EHLO answer.
    pub hostname: String,
    pub max_connections: usize,
    /// An idle client is disconnected after this long between commands (RFC 5321 §4.5.3.2: ≥ 5 min
    /// is recommended to senders; a server may choose less).
    pub command_timeout_seconds: u64,
    /// The whole DATA transfer must finish within this.
    pub data_timeout_seconds: u64,
    /// With both set, STARTTLS is offered (PEM files).
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
}

impl Default for SmtpListenerSection {
    fn default() -> Self {
        SmtpListenerSection {
            enabled: false,
            listen: "127.0.0.1:2525".into(),
            hostname: "localhost".into(),
            max_connections: 256,
            command_timeout_seconds: 300,
            data_timeout_seconds: 600,
            tls_cert_file: None,
            tls_key_file: None,
        }
    }
}

/// How a connection to the relay is secured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RelaySecurity {
    /// Plain connection upgraded with STARTTLS (required), usually port 587.
    Starttls,
    /// TLS from the first byte, usually port 465.
    Tls,
    /// No TLS: only for a relay on the same host or a test sink.
    None,
}

/// The SMTP relay replies are submitted to.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RelaySection {
    pub host: String,
    #[serde(default = "default_relay_port")]
    pub port: u16,
    #[serde(default = "default_security")]
    pub security: RelaySecurity,
    #[serde(default)]
    pub username: Option<String>,
    /// From the environment: `SWITCHBOARD__CHANNELS__EMAIL__RELAY__PASSWORD`.
    #[serde(default)]
    pub password: Option<Secret>,
    #[serde(default = "default_relay_timeout")]
    pub timeout_seconds: u64,
}

fn default_tag_prefix() -> String {
    "SB".into()
}
fn default_max_attachment() -> usize {
    10 << 20
}
fn default_max_message() -> usize {
    25 << 20
}
fn default_relay_port() -> u16 {
    587
}
fn default_security() -> RelaySecurity {
    RelaySecurity::Starttls
}
fn default_relay_timeout() -> u64 {
    30
}

/// The validated email channel.
#[derive(Debug, Clone)]
pub struct EmailSettings {
    /// Lower-cased.
    pub mailboxes: Vec<String>,
    /// Lower-cased, without `@`.
    pub domains: Vec<String>,
    pub from_name: Option<String>,
    pub subject_tag_prefix: String,
    pub message_id_domain: String,
    pub max_attachment_bytes: usize,
    pub max_message_bytes: usize,
    pub smtp: Option<SmtpListenerSettings>,
    pub relay: Option<RelaySettings>,
    pub imap: Option<ImapSettings>,
    pub auto_reply_max_per_sender_per_hour: u32,
    /// `None` when off.
    pub acknowledgement: Option<AcknowledgementSettings>,
    pub dkim: Vec<DkimSettings>,
}

/// The acknowledgement, on.
#[derive(Debug, Clone)]
pub struct AcknowledgementSettings {
    /// Lower-cased; empty: every mailbox.
    pub mailboxes: Vec<String>,
    pub text: String,
}

impl AcknowledgementSettings {
    /// Is mail to `address` (one of ours) acknowledged?
    pub fn covers(&self, address: &str) -> bool {
        self.mailboxes.is_empty() || self.mailboxes.iter().any(|mailbox| mailbox == address)
    }
}

/// A DKIM key as configured; the key file is read (and checked) when the sender is built.
#[derive(Debug, Clone)]
pub struct DkimSettings {
    /// Lower-cased.
    pub domain: String,
    pub selector: String,
    pub algorithm: DkimAlgorithm,
    pub key_file: PathBuf,
}

impl EmailSettings {
    /// Is `address` one of ours (a mailbox, or any address in one of our domains)?
    pub fn is_ours(&self, address: &str) -> bool {
        let address = address.trim().to_lowercase();
        if self.mailboxes.contains(&address) {
            return true;
        }
        address
            .rsplit_once('@')
            .is_some_and(|(_, domain)| self.domains.iter().any(|ours| ours == domain))
    }
}

#[derive(Debug, Clone)]
pub struct SmtpListenerSettings {
    pub listen: SocketAddr,
    pub hostname: String,
    pub max_connections: usize,
    pub command_timeout: Duration,
    pub data_timeout: Duration,
    /// (certificate chain, private key) PEM files.
    pub tls: Option<(PathBuf, PathBuf)>,
}

#[derive(Debug, Clone)]
pub struct RelaySettings {
    pub host: String,
    pub port: u16,
    pub security: RelaySecurity,
    /// (user, password) when the relay wants AUTH.
    pub credentials: Option<(String, Secret)>,
    pub timeout: Duration,
}

fn check_address(place: &str, address: &str) -> Result<String, ConfigLoadError> {
    let address = address.trim().to_lowercase();
    match address.split_once('@') {
        Some((local, domain))
            if !local.is_empty() && (domain.contains('.') || domain == "localhost") =>
        {
            Ok(address)
        }
        _ => Err(invalid(
            place,
            format!("`{address}` is not an email address"),
        )),
    }
}

/// Validates the section; the first problem is named with its key.
pub fn validate(section: &EmailSection) -> Result<EmailSettings, ConfigLoadError> {
    let place = "channels.email";
    let mailboxes = section
        .mailboxes
        .iter()
        .map(|mailbox| check_address(&format!("{place}.mailboxes"), mailbox))
        .collect::<Result<Vec<_>, _>>()?;
    let domains: Vec<String> = section
        .domains
        .iter()
        .map(|domain| domain.trim().trim_start_matches('@').to_lowercase())
        .collect();
    if let Some(bad) = domains
        .iter()
        .find(|domain| domain.is_empty() || domain.contains('@'))
    {
        return Err(invalid(
            &format!("{place}.domains"),
            format!("`{bad}` is not a domain"),
        ));
    }
    if mailboxes.is_empty() && domains.is_empty() {
        return Err(invalid(
            place,
            "name at least one of mailboxes or domains (mail to anything else is refused)",
        ));
    }
    let tag = &section.subject_tag_prefix;
    if tag.is_empty() || tag.len() > 16 || !tag.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(invalid(
            &format!("{place}.subject_tag_prefix"),
            "must be 1–16 ASCII letters or digits",
        ));
    }
    let message_id_domain = match &section.message_id_domain {
        Some(domain) if !domain.trim().is_empty() => domain.trim().to_lowercase(),
        Some(_) => {
            return Err(invalid(
                &format!("{place}.message_id_domain"),
                "must not be empty",
            ));
        }
        None => mailboxes
            .first()
            .and_then(|mailbox| mailbox.split_once('@'))
            .map(|(_, domain)| domain.to_owned())
            .or_else(|| domains.first().cloned())
            .unwrap_or_else(|| "localhost".into()),
    };
    if section.max_message_bytes < 1024 {
        return Err(invalid(
            &format!("{place}.max_message_bytes"),
            "must be at least 1024",
        ));
    }
    let smtp = if section.smtp.enabled {
        let smtp = &section.smtp;
        let listen = smtp.listen.parse().map_err(|error| {
            invalid(
                &format!("{place}.smtp.listen"),
                format!("`{}`: {error}", smtp.listen),
            )
        })?;
        let tls = match (&smtp.tls_cert_file, &smtp.tls_key_file) {
            (Some(cert), Some(key)) => Some((cert.clone(), key.clone())),
            (None, None) => None,
            _ => {
                return Err(invalid(
                    &format!("{place}.smtp"),
                    "set both tls_cert_file and tls_key_file, or neither",
                ));
            }
        };
        if smtp.max_connections == 0 {
            return Err(invalid(
                &format!("{place}.smtp.max_connections"),
                "must be at least 1",
            ));
        }
        Some(SmtpListenerSettings {
            listen,
            hostname: smtp.hostname.clone(),
            max_connections: smtp.max_connections,
            command_timeout: Duration::from_secs(smtp.command_timeout_seconds.max(1)),
            data_timeout: Duration::from_secs(smtp.data_timeout_seconds.max(1)),
            tls,
        })
    } else {
        None
    };
    let relay = match &section.relay {
        None => None,
        Some(relay) => {
            if relay.host.trim().is_empty() {
                return Err(invalid(&format!("{place}.relay.host"), "required"));
            }
            let credentials = match (&relay.username, &relay.password) {
                (Some(user), Some(password)) if !password.expose().is_empty() => {
                    Some((user.clone(), password.clone()))
                }
                (Some(_), _) => {
                    return Err(invalid(
                        &format!("{place}.relay.password"),
                        "required with a username (set it from the environment: SWITCHBOARD__CHANNELS__EMAIL__RELAY__PASSWORD)",
                    ));
                }
                (None, _) => None,
            };
            Some(RelaySettings {
                host: relay.host.trim().to_owned(),
                port: relay.port,
                security: relay.security,
                credentials,
                timeout: Duration::from_secs(relay.timeout_seconds.max(1)),
            })
        }
    };
    let imap = match &section.imap {
        None => None,
        Some(imap) => {
            let password = match &imap.password {
                Some(password) if !password.expose().is_empty() => password.clone(),
                _ => {
                    return Err(invalid(
                        &format!("{place}.imap.password"),
                        "required (set it from the environment: SWITCHBOARD__CHANNELS__EMAIL__IMAP__PASSWORD)",
                    ));
                }
            };
            if imap.host.trim().is_empty() || imap.username.is_empty() {
                return Err(invalid(
                    &format!("{place}.imap"),
                    "host and username are required",
                ));
            }
            Some(ImapSettings {
                host: imap.host.trim().to_owned(),
                port: imap.port,
                security: imap.security,
                ca_file: imap.ca_file.clone(),
                username: imap.username.clone(),
                password,
                mailbox: imap.mailbox.clone(),
                processed_mailbox: imap.processed_mailbox.clone(),
                poll: Duration::from_secs(imap.poll_seconds.max(1)),
                state_file: imap.state_file.clone(),
            })
        }
    };
    if section.auto_reply_max_per_sender_per_hour == 0 {
        return Err(invalid(
            &format!("{place}.auto_reply_max_per_sender_per_hour"),
            "must be at least 1 (turn the acknowledgement off with acknowledgement.enabled = false)",
        ));
    }
    let acknowledgement = if section.acknowledgement.enabled {
        let ack = &section.acknowledgement;
        let ack_mailboxes = ack
            .mailboxes
            .iter()
            .map(|mailbox| check_address(&format!("{place}.acknowledgement.mailboxes"), mailbox))
            .collect::<Result<Vec<_>, _>>()?;
        if ack.text.trim().is_empty() {
            return Err(invalid(
                &format!("{place}.acknowledgement.text"),
                "must not be empty",
            ));
        }
        Some(AcknowledgementSettings {
            mailboxes: ack_mailboxes,
            text: ack.text.clone(),
        })
    } else {
        None
    };
    let mut dkim: Vec<DkimSettings> = Vec::new();
    for key in &section.dkim {
        let domain = key.domain.trim().to_lowercase();
        let selector = key.selector.trim().to_owned();
        if domain.is_empty() || selector.is_empty() {
            return Err(invalid(
                &format!("{place}.dkim"),
                "every key needs a domain and a selector",
            ));
        }
        if dkim.iter().any(|other| other.domain == domain) {
            return Err(invalid(
                &format!("{place}.dkim"),
                format!("two keys for `{domain}`"),
            ));
        }
        dkim.push(DkimSettings {
            domain,
            selector,
            algorithm: key.algorithm,
            key_file: key.key_file.clone(),
        });
    }
    Ok(EmailSettings {
        mailboxes,
        imap,
        auto_reply_max_per_sender_per_hour: section.auto_reply_max_per_sender_per_hour,
        acknowledgement,
        dkim,
        domains,
        from_name: section.from_name.clone(),
        subject_tag_prefix: section.subject_tag_prefix.clone(),
        message_id_domain,
        max_attachment_bytes: section.max_attachment_bytes,
        max_message_bytes: section.max_message_bytes,
        smtp,
        relay,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn load(extra: &str, environment: &[(&str, &str)]) -> Result<EmailSettings, String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("email.toml");
        std::fs::write(&path, extra).unwrap();
        let environment = environment
            .iter()
            .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()));
        super::super::load(Some(&path), environment)
            .map(|settings| settings.channels.email.unwrap())
            .map_err(|error| error.to_string())
    }

    #[test]
    fn the_relay_password_comes_from_the_environment_and_is_never_printed() {
        let toml = "[channels.email]\nmailboxes = [\"Support@Example.com\"]\ndomains = [\"@help.example.com\"]\n\n\
                    [channels.email.relay]\nhost = \"smtp.example.com\"\nusername = \"switchboard\"\n";
        let email = load(
            toml,
            &[(
                "SWITCHBOARD__CHANNELS__EMAIL__RELAY__PASSWORD",
                "relay-s3cret",
            )],
        )
        .unwrap();
        assert_eq!(email.mailboxes, vec!["support@example.com"]);
        assert_eq!(email.message_id_domain, "example.com");
        assert!(email.is_ours("SUPPORT@example.com"));
        assert!(email.is_ours("anyone@help.example.com"));
        assert!(!email.is_ours("someone@elsewhere.example"));
        let relay = email.relay.as_ref().unwrap();
        assert_eq!((relay.port, relay.security), (587, RelaySecurity::Starttls));
        assert!(
            relay
                .credentials
                .as_ref()
                .unwrap()
                .1
                .matches("relay-s3cret")
        );
        assert!(!format!("{email:?}").contains("relay-s3cret"));
        let error = load(toml, &[]).unwrap_err();
        assert!(
            error.contains("SWITCHBOARD__CHANNELS__EMAIL__RELAY__PASSWORD"),
            "{error}"
        );
    }

    #[test]
    fn incomplete_email_sections_are_refused_with_the_key() {
        for (toml, expected) in [
            (
                "[channels.email]\n",
                "name at least one of mailboxes or domains",
            ),
            (
                "[channels.email]\nmailboxes = [\"nobody\"]\n",
                "not an email address",
            ),
            (
                "[channels.email]\nmailboxes = [\"a@b.example\"]\nsubject_tag_prefix = \"S B\"\n",
                "subject_tag_prefix",
            ),
            (
                "[channels.email]\nmailboxes = [\"a@b.example\"]\n[channels.email.smtp]\nenabled = true\ntls_cert_file = \"c.pem\"\n",
                "tls_cert_file and tls_key_file",
            ),
            (
                "[channels.email]\nmailboxes = [\"a@b.example\"]\n[channels.email.smtp]\nenabled = true\nlisten = \"nowhere\"\n",
                "channels.email.smtp.listen",
            ),
        ] {
            let error = load(toml, &[]).unwrap_err();
            assert!(
                error.contains(expected),
                "{toml:?}: `{expected}` in `{error}`"
            );
        }
    }
}
