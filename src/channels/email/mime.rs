//! Parsing one RFC 5322 / MIME message (mail-parser) into what switchboard keeps of it.
//!
//! The body an agent reads is text/plain when the sender gave one, else the HTML converted to
//! text (the HTML is kept as well). Charsets and encoded words are decoded by mail-parser. Quoted
//! replies and signatures are cut from the text the agent sees ([`strip_reply`]); the full text is
//! kept beside it. Attachments come out as bytes with their metadata, for the store (with their message).
//! A delivery status notification (RFC 3464 `multipart/report`) is recognised as a [`Bounce`].

use chrono::{DateTime, TimeZone, Utc};
use mail_parser::{Address, HeaderValue, Message, MessageParser, MimeHeaders, PartType};

/// Why a message could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MimeError {
    #[error("not an RFC 5322 message")]
    NotAMessage,
    #[error("the message has no sender address (From, Sender or envelope MAIL FROM)")]
    NoSender,
}

/// One mailbox: address (as written) and display name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mailbox {
    pub address: String,
    pub name: Option<String>,
}

/// An attachment's content and metadata, before it is saved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawAttachment {
    pub filename: Option<String>,
    pub content_type: String,
    pub content: Vec<u8>,
    /// Shown inside the HTML (`cid:`) rather than attached.
    pub inline: bool,
}

/// A delivery status notification for a message we sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bounce {
    /// The `Message-ID` of the message that failed (from the returned message or its headers).
    pub original_message_id: Option<String>,
    /// `Action:` of the first failed recipient (`failed`, `delayed`...).
    pub action: String,
    /// `Status:` (e.g. `5.1.1`).
    pub status: Option<String>,
    pub diagnostic: Option<String>,
    pub recipient: Option<String>,
}

impl Bounce {
    /// Only a final failure ends a delivery; `delayed` and `relayed` reports do not.
    pub fn is_failure(&self) -> bool {
        self.action.eq_ignore_ascii_case("failed")
            || self.status.as_deref().is_some_and(|s| s.starts_with('5'))
    }
}

/// The parts of a message switchboard uses. Ids are without angle brackets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedEmail {
    pub message_id: Option<String>,
    pub in_reply_to: Vec<String>,
    pub references: Vec<String>,
    pub subject: Option<String>,
    pub from: Mailbox,
    pub reply_to: Option<Mailbox>,
    pub to: Vec<Mailbox>,
    pub cc: Vec<Mailbox>,
    pub date: Option<DateTime<Utc>>,
    /// What the agent reads: the body without quoted replies and signature.
    pub text: String,
    /// The whole body as text.
    pub full_text: String,
    pub html: Option<String>,
    pub attachments: Vec<RawAttachment>,
    /// Headers that matter for loop protection, raw values trimmed.
    pub auto_submitted: Option<String>,
    pub precedence: Option<String>,
    pub list_id: Option<String>,
    pub auto_response_suppress: Option<String>,
    /// `Return-Path` as written; `Some("")` for the null path `<>`.
    pub return_path: Option<String>,
    pub bounce: Option<Bounce>,
}

fn first_mailbox(address: Option<&Address<'_>>) -> Option<Mailbox> {
    address?.first().and_then(|addr| {
        Some(Mailbox {
            address: addr.address.as_deref()?.trim().to_owned(),
            name: addr
                .name
                .as_deref()
                .map(str::trim)
                .filter(|name| !name.is_empty())
                .map(str::to_owned),
        })
    })
}

fn mailboxes(address: Option<&Address<'_>>) -> Vec<Mailbox> {
    address
        .map(|address| {
            address
                .iter()
                .filter_map(|addr| {
                    Some(Mailbox {
                        address: addr.address.as_deref()?.trim().to_owned(),
                        name: addr.name.as_deref().map(str::to_owned),
                    })
                })
                .collect()
        })
        .unwrap_or_default()
}

fn id_list(value: &HeaderValue<'_>) -> Vec<String> {
    match value {
        HeaderValue::Text(id) => vec![id.trim().to_owned()],
        HeaderValue::TextList(ids) => ids.iter().map(|id| id.trim().to_owned()).collect(),
        _ => Vec::new(),
    }
    .into_iter()
    .filter(|id| !id.is_empty())
    .collect()
}

fn raw_header(message: &Message<'_>, name: &str) -> Option<String> {
    message
        .header_raw(name)
        .map(|value| value.trim().to_owned())
}

/// Parses `raw`. `envelope_from` (SMTP `MAIL FROM`) stands in for a missing `From`.
pub fn parse(raw: &[u8], envelope_from: Option<&str>) -> Result<ParsedEmail, MimeError> {
    let message = MessageParser::default()
        .parse(raw)
        .filter(|message| !message.headers().is_empty())
        .ok_or(MimeError::NotAMessage)?;
    let from = first_mailbox(message.from())
        .or_else(|| first_mailbox(message.sender()))
        .or_else(|| {
            envelope_from
                .filter(|address| address.contains('@'))
                .map(|address| Mailbox {
                    address: address.to_owned(),
                    name: None,
                })
        })
        .ok_or(MimeError::NoSender)?;
    let full_text = message
        .body_text(0)
        .map(|text| text.replace("\r\n", "\n"))
        .unwrap_or_default();
    let html = message
        .html_part(0)
        .filter(|part| matches!(part.body, PartType::Html(_)))
        .and_then(|part| part.text_contents())
        .map(str::to_owned);
    let bounce = delivery_report(&message);
    let attachments = if bounce.is_some() {
        // A report's parts are its machine-readable status and our own returned message.
        Vec::new()
    } else {
        message
            .attachments()
            .map(|part| RawAttachment {
                filename: part.attachment_name().map(str::to_owned),
                content_type: part
                    .content_type()
                    .map(|ct| match ct.subtype() {
                        Some(sub) => format!("{}/{sub}", ct.ctype()),
                        None => ct.ctype().to_owned(),
                    })
                    .unwrap_or_else(|| "application/octet-stream".into())
                    .to_lowercase(),
                content: part.contents().to_vec(),
                inline: part
                    .content_disposition()
                    .is_some_and(|disposition| disposition.is_inline())
                    || matches!(part.body, PartType::InlineBinary(_)),
            })
            .collect()
    };
    Ok(ParsedEmail {
        message_id: message.message_id().map(str::to_owned),
        in_reply_to: id_list(message.in_reply_to()),
        references: id_list(message.references()),
        subject: message
            .subject()
            .map(|subject| subject.trim().to_owned())
            .filter(|subject| !subject.is_empty()),
        from,
        reply_to: first_mailbox(message.reply_to()),
        to: mailboxes(message.to()),
        cc: mailboxes(message.cc()),
        date: message
            .date()
            .and_then(|date| Utc.timestamp_opt(date.to_timestamp(), 0).single()),
        text: strip_reply(&full_text),
        full_text,
        html,
        attachments,
        auto_submitted: raw_header(&message, "Auto-Submitted"),
        precedence: raw_header(&message, "Precedence"),
        list_id: raw_header(&message, "List-Id"),
        auto_response_suppress: raw_header(&message, "X-Auto-Response-Suppress"),
        return_path: raw_header(&message, "Return-Path").map(|path| {
            path.trim_start_matches('<')
                .trim_end_matches('>')
                .trim()
                .to_owned()
        }),
        bounce,
    })
}

/// Reads an RFC 3464 delivery status notification: `multipart/report; report-type=delivery-status`
/// with a `message/delivery-status` part and the returned message (or its headers).
fn delivery_report(message: &Message<'_>) -> Option<Bounce> {
    let root = message.root_part().content_type()?;
    let is_report = root.ctype().eq_ignore_ascii_case("multipart")
        && root
            .subtype()
            .is_some_and(|sub| sub.eq_ignore_ascii_case("report"))
        && root
            .attribute("report-type")
            .is_some_and(|kind| kind.to_ascii_lowercase().contains("delivery-status"));
    if !is_report {
        return None;
    }
    let mut bounce = Bounce {
        original_message_id: None,
        action: String::new(),
        status: None,
        diagnostic: None,
        recipient: None,
    };
    for part in &message.parts {
        let Some(ct) = part.content_type() else {
            continue;
        };
        let (kind, sub) = (
            ct.ctype().to_ascii_lowercase(),
            ct.subtype().unwrap_or_default().to_ascii_lowercase(),
        );
        match (kind.as_str(), sub.as_str()) {
            ("message", "delivery-status" | "global-delivery-status") => {
                read_status_fields(&String::from_utf8_lossy(part.contents()), &mut bounce);
            }
            ("message", "rfc822" | "global") => {
                if let Some(returned) = part.message() {
                    bounce.original_message_id = returned.message_id().map(str::to_owned);
                }
            }
            ("text", "rfc822-headers") | ("message", "global-headers") => {
                let mut headers = part.contents().to_vec();
                headers.extend_from_slice(b"\r\n\r\n");
                if let Some(returned) = MessageParser::default().parse_headers(&headers) {
                    bounce.original_message_id = returned.message_id().map(str::to_owned);
                }
            }
            _ => {}
        }
    }
    Some(bounce)
}

/// The per-recipient fields of a `message/delivery-status` body (RFC 3464 §2.3): the first
/// recipient whose action is `failed` wins, else the first recipient.
fn read_status_fields(body: &str, bounce: &mut Bounce) {
    // Unfold continuation lines, then split into blocks separated by blank lines.
    let unfolded = body
        .replace("\r\n", "\n")
        .replace("\n ", " ")
        .replace("\n\t", " ");
    let blocks: Vec<&str> = unfolded.split("\n\n").collect();
    let recipient_blocks = blocks
        .iter()
        .skip(1)
        .filter(|block| !block.trim().is_empty());
    let mut chosen: Option<Bounce> = None;
    for block in recipient_blocks {
        let mut candidate = bounce.clone();
        for line in block.lines() {
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim().to_owned();
            match name.trim().to_ascii_lowercase().as_str() {
                "action" => candidate.action = value,
                "status" => candidate.status = Some(value),
                "diagnostic-code" => candidate.diagnostic = Some(value),
                "final-recipient" => {
                    candidate.recipient = Some(
                        value
                            .split_once(';')
                            .map_or(value.as_str(), |(_, address)| address)
                            .trim()
                            .to_owned(),
                    );
                }
                _ => {}
            }
        }
        let failed = candidate.action.eq_ignore_ascii_case("failed");
        if chosen.is_none() || failed {
            chosen = Some(candidate);
            if failed {
                break;
            }
        }
    }
    if let Some(chosen) = chosen {
        *bounce = chosen;
    }
}

/// The lines that begin the quoted original in common clients' replies.
fn starts_quote(line: &str, next: Option<&str>) -> bool {
    let trimmed = line.trim();
    // Gmail / Apple Mail / Thunderbird: "On <date>, <name> wrote:" (sometimes wrapped onto 2 lines).
    if trimmed.starts_with("On ")
        && (trimmed.ends_with("wrote:")
            || next.is_some_and(|next| next.trim_end().ends_with("wrote:")))
    {
        return true;
    }
    // Outlook: a separator line, or "-----Original Message-----".
    if trimmed.starts_with("-----Original Message-----")
        || trimmed.starts_with("-------- Original message --------")
        || trimmed.starts_with("-------- Forwarded")
        || (trimmed.len() >= 20 && trimmed.bytes().all(|b| b == b'_'))
    {
        return true;
    }
    // Outlook's header block of the original: "From: ..." followed by "Sent:"/"Date:".
    if trimmed.starts_with("From:")
        && next.is_some_and(|next| {
            let next = next.trim_start();
            next.starts_with("Sent:") || next.starts_with("Date:")
        })
    {
        return true;
    }
    false
}

/// Lines that begin a signature: the RFC 3676 delimiter `-- ` and mobile clients' footers.
fn starts_signature(line: &str) -> bool {
    let trimmed = line.trim_end();
    trimmed == "--"
        || trimmed == "-- "
        || line == "-- "
        || trimmed.starts_with("Sent from my ")
        || trimmed.starts_with("Get Outlook for ")
        || trimmed.starts_with("Sent from Mail for Windows")
}

/// The new part of a reply: everything before the quoted original or the signature, without a
/// trailing block of `>` lines. Falls back to the whole text when nothing would be left.
pub fn strip_reply(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let mut end = lines.len();
    for (index, line) in lines.iter().enumerate() {
        if starts_quote(line, lines.get(index + 1).copied()) || starts_signature(line) {
            end = index;
            break;
        }
    }
    let mut kept = &lines[..end];
    while let Some((last, rest)) = kept.split_last() {
        if last.trim().is_empty() || last.trim_start().starts_with('>') {
            kept = rest;
        } else {
            break;
        }
    }
    let stripped = kept.join("\n").trim().to_owned();
    if stripped.is_empty() {
        text.trim().to_owned()
    } else {
        stripped
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const GMAIL_REPLY: &str = "From: Ann Customer <ann@example.com>\r\n\
To: Example Support <support@example.com>\r\n\
Subject: Re: Order 1234 missing\r\n\
Message-ID: <CAB+x1@mail.gmail.com>\r\n\
In-Reply-To: <01JDX@example.com>\r\n\
References: <root1@mail.gmail.com> <01JDX@example.com>\r\n\
Date: Mon, 30 Nov 2026 10:00:00 +0000\r\n\
MIME-Version: 1.0\r\n\
Content-Type: multipart/alternative; boundary=\"000000000000abc\"\r\n\
\r\n\
--000000000000abc\r\n\
Content-Type: text/plain; charset=\"UTF-8\"\r\n\
\r\n\
Still nothing arrived, can you check?\r\n\
\r\n\
On Sun, 29 Nov 2026 at 09:00, Example Support <support@example.com>\r\n\
wrote:\r\n\
\r\n\
> Your order ships tomorrow.\r\n\
>\r\n\
--000000000000abc\r\n\
Content-Type: text/html; charset=\"UTF-8\"\r\n\
\r\n\
<div dir=\"ltr\">Still nothing arrived, can you check?</div><br><div class=\"gmail_quote\">On Sun wrote:<blockquote>Your order ships tomorrow.</blockquote></div>\r\n\
--000000000000abc--\r\n";

    #[test]
    fn gmail_multipart_alternative_prefers_text_and_keeps_html_and_the_chain() {
        let parsed = parse(GMAIL_REPLY.as_bytes(), None).unwrap();
        assert_eq!(parsed.text, "Still nothing arrived, can you check?");
        assert!(parsed.full_text.contains("Your order ships tomorrow."));
        assert!(parsed.html.as_deref().unwrap().contains("gmail_quote"));
        assert_eq!(parsed.message_id.as_deref(), Some("CAB+x1@mail.gmail.com"));
        assert_eq!(parsed.in_reply_to, vec!["01JDX@example.com"]);
        assert_eq!(
            parsed.references,
            vec!["root1@mail.gmail.com", "01JDX@example.com"]
        );
        assert_eq!(parsed.from.address, "ann@example.com");
        assert_eq!(parsed.from.name.as_deref(), Some("Ann Customer"));
        assert_eq!(parsed.to[0].address, "support@example.com");
        assert_eq!(
            parsed.date.unwrap().to_rfc3339(),
            "2026-11-30T10:00:00+00:00"
        );
        assert!(parsed.bounce.is_none());
    }

    #[test]
    fn outlook_reply_loses_the_original_message_block_and_signature() {
        let raw = "From: \"Bob Buyer\" <bob@contoso.com>\r\n\
To: support@example.com\r\n\
Subject: RE: Invoice\r\n\
Message-ID: <DB7PR@eurprd.prod.outlook.com>\r\n\
Content-Type: text/plain; charset=\"us-ascii\"\r\n\
Content-Transfer-Encoding: quoted-printable\r\n\
\r\n\
Please send the invoice as PDF.=0D=0A\r\n\
Thanks,\r\n\
Bob\r\n\
\r\n\
________________________________\r\n\
From: Example Support <support@example.com>\r\n\
Sent: Tuesday, December 1, 2026 9:14 AM\r\n\
To: Bob Buyer <bob@contoso.com>\r\n\
Subject: Invoice\r\n\
\r\n\
Here is your invoice.\r\n";
        let parsed = parse(raw.as_bytes(), None).unwrap();
        assert_eq!(
            parsed.text,
            "Please send the invoice as PDF.\n\nThanks,\nBob"
        );
        assert!(parsed.full_text.contains("Here is your invoice."));
        assert_eq!(parsed.from.name.as_deref(), Some("Bob Buyer"));
    }

    #[test]
    fn apple_mail_html_only_falls_back_to_text_and_drops_the_mobile_footer() {
        let raw = "From: Chloe <chloe@icloud.com>\r\n\
To: support@example.com\r\n\
Subject: Broken zip\r\n\
Message-Id: <5E1F-AB@icloud.com>\r\n\
Mime-Version: 1.0 (Mac OS X Mail 16.0)\r\n\
Content-Type: text/html; charset=utf-8\r\n\
Content-Transfer-Encoding: quoted-printable\r\n\
\r\n\
<html><body><div>The zip on my jacket broke after one week.</div><div><br></div><div>Sent from my iPhone</div></body></html>\r\n";
        let parsed = parse(raw.as_bytes(), None).unwrap();
        assert!(parsed.html.as_deref().unwrap().contains("<div>The zip"));
        assert!(
            parsed
                .full_text
                .contains("The zip on my jacket broke after one week."),
            "{}",
            parsed.full_text
        );
        assert_eq!(parsed.text, "The zip on my jacket broke after one week.");
    }

    #[test]
    fn latin1_body_and_encoded_word_subject_are_decoded() {
        let mut raw = b"From: =?ISO-8859-1?Q?Andr=E9_M=FCller?= <andre@example.de>\r\n\
To: support@example.com\r\n\
Subject: =?UTF-8?B?UsO8Y2tlcnN0YXR0dW5nIGbDvHIgQmVzdGVsbHVuZw==?=\r\n\
Message-ID: <latin1@example.de>\r\n\
Content-Type: text/plain; charset=ISO-8859-1\r\n\
Content-Transfer-Encoding: 8bit\r\n\
\r\n"
            .to_vec();
        // "Grüße aus Köln" in ISO-8859-1 bytes.
        raw.extend_from_slice(b"Gr\xfc\xdfe aus K\xf6ln\r\n");
        let parsed = parse(&raw, None).unwrap();
        assert_eq!(
            parsed.subject.as_deref(),
            Some("Rückerstattung für Bestellung")
        );
        assert_eq!(parsed.from.name.as_deref(), Some("André Müller"));
        assert_eq!(parsed.text, "Grüße aus Köln");
    }

    #[test]
    fn attachments_come_out_with_their_metadata() {
        let raw = "From: ann@example.com\r\n\
To: support@example.com\r\n\
Subject: Photo of the damage\r\n\
Message-ID: <att@example.com>\r\n\
MIME-Version: 1.0\r\n\
Content-Type: multipart/mixed; boundary=\"b1\"\r\n\
\r\n\
--b1\r\n\
Content-Type: text/plain; charset=utf-8\r\n\
\r\n\
See the attached photo.\r\n\
--b1\r\n\
Content-Type: image/png; name=\"damage.png\"\r\n\
Content-Disposition: attachment; filename=\"damage.png\"\r\n\
Content-Transfer-Encoding: base64\r\n\
\r\n\
iVBORw0KGgo=\r\n\
--b1--\r\n";
        let parsed = parse(raw.as_bytes(), None).unwrap();
        assert_eq!(parsed.text, "See the attached photo.");
        assert_eq!(parsed.attachments.len(), 1);
        let attachment = &parsed.attachments[0];
        assert_eq!(attachment.filename.as_deref(), Some("damage.png"));
        assert_eq!(attachment.content_type, "image/png");
        assert_eq!(attachment.content, b"\x89PNG\r\n\x1a\n");
        assert!(!attachment.inline);
    }

    #[test]
    fn a_delivery_status_notification_names_the_failed_message() {
        let raw = "From: Mail Delivery System <MAILER-DAEMON@mx.example.net>\r\n\
To: support@example.com\r\n\
Subject: Undelivered Mail Returned to Sender\r\n\
Auto-Submitted: auto-replied\r\n\
Message-ID: <dsn1@mx.example.net>\r\n\
MIME-Version: 1.0\r\n\
Content-Type: multipart/report; report-type=delivery-status; boundary=\"R\"\r\n\
\r\n\
--R\r\n\
Content-Type: text/plain\r\n\
\r\n\
Your message could not be delivered.\r\n\
--R\r\n\
Content-Type: message/delivery-status\r\n\
\r\n\
Reporting-MTA: dns; mx.example.net\r\n\
\r\n\
Final-Recipient: rfc822; gone@example.org\r\n\
Action: failed\r\n\
Status: 5.1.1\r\n\
Diagnostic-Code: smtp; 550 5.1.1 <gone@example.org>: Recipient address\r\n\
\x20rejected: User unknown\r\n\
\r\n\
--R\r\n\
Content-Type: text/rfc822-headers\r\n\
\r\n\
From: support@example.com\r\n\
To: gone@example.org\r\n\
Message-ID: <01JREPLY@example.com>\r\n\
Subject: Re: help\r\n\
--R--\r\n";
        let parsed = parse(raw.as_bytes(), None).unwrap();
        let bounce = parsed.bounce.unwrap();
        assert!(bounce.is_failure());
        assert_eq!(
            bounce.original_message_id.as_deref(),
            Some("01JREPLY@example.com")
        );
        assert_eq!(bounce.status.as_deref(), Some("5.1.1"));
        assert_eq!(bounce.recipient.as_deref(), Some("gone@example.org"));
        let diagnostic = bounce.diagnostic.unwrap();
        assert!(diagnostic.contains("User unknown"), "{diagnostic}");
        assert!(parsed.attachments.is_empty());
    }

    #[test]
    fn a_missing_from_takes_the_envelope_sender_and_garbage_is_refused() {
        let raw = "To: support@example.com\r\nSubject: hi\r\n\r\nbody\r\n";
        assert_eq!(parse(raw.as_bytes(), None), Err(MimeError::NoSender));
        let parsed = parse(raw.as_bytes(), Some("env@example.com")).unwrap();
        assert_eq!(parsed.from.address, "env@example.com");
        assert_eq!(parse(b"", None), Err(MimeError::NotAMessage));
    }

    #[test]
    fn signature_delimiter_and_trailing_quotes_are_cut() {
        assert_eq!(strip_reply("Thanks!\n\n-- \nAnn\nACME Ltd\n"), "Thanks!");
        assert_eq!(
            strip_reply("Yes please.\n\n> earlier\n> text\n"),
            "Yes please."
        );
        // Only a quote: the agent still sees something.
        assert_eq!(strip_reply("> only quoted"), "> only quoted");
    }
}
