//! Email threading and loop protection.
//!
//! Threading: a message's thread key is the root of its `References` chain (RFC 5322 §3.6.4: the
//! first id is the thread's first message), else its `In-Reply-To`, else its own `Message-ID`. Our
//! replies carry the chain on (`References` = the customer's chain + their message), so every later
//! message of the thread has the same root. For clients that drop those headers, our subjects carry
//! a ticket tag `[#SB-<conversation id>]` ([`subject_tag`]), which finds the conversation directly.
//!
//! Loop protection (RFC 3834 §2 and §5, plus common practice): [`auto_reply_block`] says why a
//! message must never be answered automatically — it was itself automatic, bulk or list mail, a
//! bounce, or from one of our own addresses.

use ulid::Ulid;

use super::mime::ParsedEmail;

/// The thread key of a parsed message (`None` only without any message id).
pub fn thread_root(email: &ParsedEmail) -> Option<&str> {
    email
        .references
        .first()
        .or(email.in_reply_to.first())
        .map(String::as_str)
        .or(email.message_id.as_deref())
}

/// The ticket tag we put in subjects: `[#SB-01JDX...]`.
pub fn tag(prefix: &str, conversation: Ulid) -> String {
    format!("[#{prefix}-{conversation}]")
}

/// The conversation named by a ticket tag in `subject`, if any: the first `[#<prefix>-<ULID>]`,
/// letters in either case (clients and customers change case). The prefix is ASCII letters and
/// digits (checked with the configuration), so a byte scan finds it; it runs for every email, where
/// building a regex each time cost more than parsing the message's headers.
pub fn subject_tag(prefix: &str, subject: &str) -> Option<Ulid> {
    /// A ULID's alphabet (Crockford's base 32: no I, L, O or U).
    fn crockford(byte: &u8) -> bool {
        byte.is_ascii_digit() || (byte.is_ascii_alphabetic() && !b"ILOUilou".contains(byte))
    }
    subject.match_indices("[#").find_map(|(at, _)| {
        let tag = subject.as_bytes().get(at + 2..at + 2 + prefix.len() + 28)?;
        let (named, rest) = tag.split_at(prefix.len());
        let id = rest.get(1..27)?;
        let well_formed = named.eq_ignore_ascii_case(prefix.as_bytes())
            && rest.first() == Some(&b'-')
            && rest.last() == Some(&b']')
            && id.iter().all(crockford);
        if !well_formed {
            return None;
        }
        Ulid::from_string(&String::from_utf8_lossy(id).to_ascii_uppercase()).ok()
    })
}

/// Our reply's subject: `Re: <the customer's subject without its Re:/Fwd: prefixes>` with the
/// conversation's tag once.
pub fn reply_subject(prefix: &str, conversation: Ulid, customer_subject: Option<&str>) -> String {
    let tag = tag(prefix, conversation);
    let mut subject = customer_subject.unwrap_or_default().trim();
    loop {
        let lower = subject.to_ascii_lowercase();
        let stripped = ["re:", "aw:", "sv:", "fw:", "fwd:", "wg:", "tr:"]
            .iter()
            .find(|prefix| lower.starts_with(*prefix))
            .map(|prefix| subject[prefix.len()..].trim_start());
        match stripped {
            Some(rest) => subject = rest,
            None => break,
        }
    }
    let subject = subject.replace(&tag, "");
    let subject = subject.trim();
    if subject.is_empty() {
        format!("Re: {tag}")
    } else {
        format!("Re: {subject} {tag}")
    }
}

/// Local parts that are never a person (RFC 3834 §3.1.1 names `MAILER-DAEMON`, `owner-` and
/// `-request`; the rest are common bounce and no-reply senders).
fn is_robot_local_part(local: &str) -> bool {
    let local = local.to_ascii_lowercase();
    matches!(
        local.as_str(),
        "mailer-daemon"
            | "postmaster"
            | "listserv"
            | "majordomo"
            | "noreply"
            | "no-reply"
            | "do-not-reply"
            | "donotreply"
    ) || local.starts_with("owner-")
        || local.ends_with("-request")
        || local.starts_with("bounce")
}

/// Why this message must not get an automatic answer (position, wait time, survey), or `None`
/// when it may. `envelope_from` is the SMTP `MAIL FROM` (empty for the null path) when known;
/// `is_ours` says whether an address is one of our mailboxes.
pub fn auto_reply_block(
    email: &ParsedEmail,
    envelope_from: Option<&str>,
    is_ours: impl Fn(&str) -> bool,
) -> Option<String> {
    if let Some(value) = &email.auto_submitted {
        let keyword = value.split(';').next().unwrap_or_default().trim();
        if !keyword.eq_ignore_ascii_case("no") {
            return Some(format!("Auto-Submitted: {keyword}"));
        }
    }
    if let Some(value) = &email.precedence {
        let value = value.trim().to_ascii_lowercase();
        if matches!(value.as_str(), "bulk" | "list" | "junk") {
            return Some(format!("Precedence: {value}"));
        }
    }
    if email.list_id.is_some() {
        return Some("List-Id present (mailing list)".into());
    }
    if let Some(value) = &email.auto_response_suppress {
        let value = value.to_ascii_lowercase();
        if ["all", "autoreply", "oof"]
            .iter()
            .any(|word| value.split(',').any(|part| part.trim() == *word))
        {
            return Some(format!("X-Auto-Response-Suppress: {value}"));
        }
    }
    if email.return_path.as_deref() == Some("") || envelope_from == Some("") {
        return Some("empty return path (a bounce or notification)".into());
    }
    if email.bounce.is_some() {
        return Some("delivery status notification".into());
    }
    let from = &email.from.address;
    if from
        .split_once('@')
        .is_some_and(|(local, _)| is_robot_local_part(local))
    {
        return Some(format!("automated sender {from}"));
    }
    if is_ours(from) {
        return Some(format!("sent from our own address {from}"));
    }
    None
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::super::mime::parse;
    use super::*;

    fn email(headers: &str) -> ParsedEmail {
        let raw = format!(
            "From: Ann <ann@example.com>\r\nTo: support@example.com\r\nSubject: hi\r\n{headers}\r\nHello\r\n"
        );
        parse(raw.as_bytes(), None).unwrap()
    }

    fn block(headers: &str) -> Option<String> {
        auto_reply_block(&email(headers), None, |address| {
            address == "support@example.com"
        })
    }

    #[test]
    fn the_root_of_references_is_the_thread_key() {
        let reply = email("Message-ID: <c@x>\r\nIn-Reply-To: <b@x>\r\nReferences: <a@x> <b@x>\r\n");
        assert_eq!(thread_root(&reply), Some("a@x"));
        let only_in_reply_to = email("Message-ID: <c@x>\r\nIn-Reply-To: <b@x>\r\n");
        assert_eq!(thread_root(&only_in_reply_to), Some("b@x"));
        let first = email("Message-ID: <a@x>\r\n");
        assert_eq!(thread_root(&first), Some("a@x"));
    }

    #[test]
    fn subject_tags_round_trip_and_reply_subjects_do_not_pile_up() {
        let conversation = Ulid::new();
        let subject = reply_subject("SB", conversation, Some("RE: Fwd: Order late"));
        assert_eq!(subject, format!("Re: Order late [#SB-{conversation}]"));
        assert_eq!(subject_tag("SB", &subject), Some(conversation));
        // The customer's client adds Re: again: still one tag.
        let again = reply_subject("SB", conversation, Some(&format!("Re: {subject}")));
        assert_eq!(again, subject);
        let lower = subject.to_lowercase();
        assert_eq!(subject_tag("SB", &lower), Some(conversation));
        assert_eq!(subject_tag("SB", "Re: [#XY-123] no"), None);
        // The first well-formed tag counts, after other brackets; the prefix in either case.
        assert_eq!(
            subject_tag(
                "SB",
                &format!("[#SB-short] [# [#sb-{conversation}] [#SB-x]")
            ),
            Some(conversation)
        );
        let id = conversation.to_string();
        assert_eq!(subject_tag("SB", &format!("[#SB-{id}")), None, "unclosed");
        assert_eq!(subject_tag("SB", &format!("[#SBB-{id}]")), None);
        assert_eq!(subject_tag("SB", &format!("[#SB-{}]", &id[..25])), None);
        let with_i = format!("[#SB-{}I]", &id[..25]);
        assert_eq!(subject_tag("SB", &with_i), None, "I is not in a ULID");
        // Multi-byte text around (and right after) the marker is no trouble.
        assert_eq!(subject_tag("SB", "Ärger [#é"), None);
        assert_eq!(
            subject_tag("SB", &format!("Ärger über [#SB-{id}] 📦")),
            Some(conversation)
        );
        assert_eq!(
            reply_subject("SB", conversation, None),
            format!("Re: [#SB-{conversation}]")
        );
    }

    #[test]
    fn each_loop_signal_blocks_auto_replies() {
        assert_eq!(block("Message-ID: <a@x>\r\n"), None);
        assert_eq!(block("Auto-Submitted: no\r\n"), None);
        for (headers, expected) in [
            (
                "Auto-Submitted: auto-replied\r\n",
                "Auto-Submitted: auto-replied",
            ),
            (
                "Auto-Submitted: auto-generated; owner-email=x@y\r\n",
                "Auto-Submitted: auto-generated",
            ),
            ("Precedence: bulk\r\n", "Precedence: bulk"),
            ("Precedence: list\r\n", "Precedence: list"),
            ("Precedence: junk\r\n", "Precedence: junk"),
            ("List-Id: Customers <customers.example.com>\r\n", "List-Id"),
            ("Return-Path: <>\r\n", "empty return path"),
            (
                "X-Auto-Response-Suppress: DR, OOF, AutoReply\r\n",
                "X-Auto-Response-Suppress",
            ),
        ] {
            let reason = block(headers).unwrap_or_default();
            assert!(reason.starts_with(expected), "{headers}: {reason}");
        }
        let from_daemon = parse(
            b"From: MAILER-DAEMON@mx.example.net\r\nSubject: x\r\n\r\nbody\r\n",
            None,
        )
        .unwrap();
        assert!(auto_reply_block(&from_daemon, None, |_| false).is_some());
        let from_us = parse(
            b"From: support@example.com\r\nSubject: x\r\n\r\nbody\r\n",
            None,
        )
        .unwrap();
        assert!(
            auto_reply_block(&from_us, None, |a| a == "support@example.com")
                .unwrap()
                .contains("our own address")
        );
        assert!(
            auto_reply_block(&email(""), Some(""), |_| false)
                .unwrap()
                .contains("empty return path")
        );
    }
}
