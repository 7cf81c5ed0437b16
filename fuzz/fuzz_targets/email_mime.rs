//! Raw email (SMTP DATA, IMAP fetches, the MIME webhook): MIME through `mime::parse`, then the
//! normalisation every email intake applies (`Normalise::message`, the subject tag, the schema
//! check), without a store.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use switchboard::channels::email::mime::parse;
use switchboard::channels::email::threading::subject_tag;
use switchboard::channels::email::{Envelope, Normalise};
use switchboard::config::email::EmailSettings;

static SETTINGS: LazyLock<EmailSettings> = LazyLock::new(|| EmailSettings {
    mailboxes: vec!["support@example.com".into()],
    domains: vec!["help.example.com".into()],
    from_name: Some("Example Support".into()),
    subject_tag_prefix: "SB".into(),
    message_id_domain: "help.example.com".into(),
    max_attachment_bytes: 10 << 20,
    max_message_bytes: 25 << 20,
    smtp: None,
    relay: None,
    imap: None,
    auto_reply_max_per_sender_per_hour: 3,
    acknowledgement: None,
    dkim: Vec::new(),
});

fuzz_target!(|data: &[u8]| {
    let envelope = Envelope {
        mail_from: Some("customer@example.net".into()),
        rcpt_to: vec!["support@example.com".into()],
    };
    let Ok(email) = parse(data, envelope.mail_from.as_deref()) else {
        return;
    };
    let tagged = email
        .subject
        .as_deref()
        .and_then(|subject| subject_tag(&SETTINGS.subject_tag_prefix, subject));
    let message = Normalise {
        raw: data,
        email: &email,
        envelope: &envelope,
        settings: &SETTINGS,
        provider: "smtp",
        thread_key: tagged.map(|conversation| format!("email:{conversation}")),
        attachments: Vec::new(),
        dropped: Vec::new(),
    }
    .message();
    let _ = message.validate();
});
