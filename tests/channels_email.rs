//! The email channel through the real binary: the raw MIME webhook, the built-in SMTP listener
//! spoken to by lettre and by a raw socket (550, 552, 451, pipelining), threading by References and
//! by the subject tag, loop signals, attachments, and agents' replies sent over SMTP to a second
//! switchboard's listener (a real SMTP peer) with their threading headers, then bounced.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{ADMIN, Daemon, INGEST, Sink, agent_token, eventually, header};
use lettre::message::{Mailbox, MultiPart, SinglePart, header::ContentType};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const OURS: &str = "support@example.com";

/// `[channels.email]` for a daemon taking mail for `mailbox`, optionally relaying replies to a
/// local SMTP port.
fn email_config(mailbox: &str, relay_port: Option<u16>) -> String {
    let mut config = format!(
        "[channels.email]\nmailboxes = [\"{mailbox}\"]\nfrom_name = \"Example Support\"\n\
         max_message_bytes = 65536\nmax_attachment_bytes = 4096\n\n\
         [channels.email.smtp]\nenabled = true\nlisten = \"127.0.0.1:0\"\nhostname = \"mx.test\"\n"
    );
    if let Some(port) = relay_port {
        config.push_str(&format!(
            "\n[channels.email.relay]\nhost = \"127.0.0.1\"\nport = {port}\nsecurity = \"none\"\n"
        ));
    }
    config
}

fn start(mailbox: &str, relay_port: Option<u16>) -> Daemon {
    let dir = tempfile::tempdir().unwrap();
    common::write_config(dir.path(), "", &email_config(mailbox, relay_port));
    Daemon::start_in(dir)
}

fn smtp_address(daemon: &Daemon) -> String {
    daemon.listeners["smtp"].clone()
}

fn smtp_client(daemon: &Daemon) -> AsyncSmtpTransport<Tokio1Executor> {
    let address: std::net::SocketAddr = smtp_address(daemon).parse().unwrap();
    AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(address.ip().to_string())
        .port(address.port())
        .timeout(Some(Duration::from_secs(10)))
        .build()
}

async fn post_raw(daemon: &Daemon, token: Option<&str>, raw: &str) -> (u16, Value) {
    let mut request = daemon
        .http
        .post(daemon.url("/v1/channels/email/raw"))
        .header("content-type", "message/rfc822")
        .body(raw.to_owned());
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn detail(daemon: &Daemon, conversation: &str) -> Value {
    let (status, detail) = daemon
        .get(&format!("/v1/admin/conversations/{conversation}"), ADMIN)
        .await;
    assert_eq!(status, 200, "{detail}");
    detail
}

fn mail(from: &str, id: &str, subject: &str, extra_headers: &str, body: &str) -> String {
    format!(
        "From: {from}\r\nTo: Example Support <{OURS}>\r\nSubject: {subject}\r\nMessage-ID: <{id}>\r\n\
         Date: Tue, 1 Dec 2026 09:00:00 +0000\r\nMIME-Version: 1.0\r\n{extra_headers}\
         Content-Type: text/plain; charset=utf-8\r\n\r\n{body}\r\n"
    )
}

#[tokio::test]
async fn raw_mime_webhook_threads_by_references_and_subject_tag_and_keeps_attachments() {
    let daemon = start(OURS, None);
    let first = "From: Ann Customer <ann@customer.example>\r\nTo: support@example.com\r\n\
Subject: Parcel damaged\r\nMessage-ID: <first@customer.example>\r\nMIME-Version: 1.0\r\n\
Content-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n--b1\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n\
The parcel arrived crushed, photo attached.\r\n\r\n-- \r\nAnn\r\n--b1\r\n\
Content-Type: image/png; name=\"crushed.png\"\r\nContent-Disposition: attachment; filename=\"crushed.png\"\r\n\
Content-Transfer-Encoding: base64\r\n\r\niVBORw0KGgo=\r\n--b1--\r\n";
    let (status, _) = post_raw(&daemon, None, first).await;
    assert_eq!(status, 401);
    let (status, stored) = post_raw(&daemon, Some(INGEST), first).await;
    assert_eq!(status, 202, "{stored}");
    assert_eq!(stored["outcome"], "stored");
    let conversation = stored["conversation_id"].as_str().unwrap().to_owned();
    let (status, again) = post_raw(&daemon, Some(INGEST), first).await;
    assert_eq!(
        (status, &again["duplicate"]),
        (200, &json!(true)),
        "{again}"
    );

    // The customer's reply with the chain threads into the same conversation.
    let reply = mail(
        "Ann Customer <ann@customer.example>",
        "second@customer.example",
        "Re: Parcel damaged",
        "In-Reply-To: <first@customer.example>\r\nReferences: <first@customer.example>\r\n",
        "Any news?\r\n\r\nOn Tue, 1 Dec 2026, Ann wrote:\r\n> The parcel arrived crushed",
    );
    let (status, threaded) = post_raw(&daemon, Some(INGEST), &reply).await;
    assert_eq!(status, 202, "{threaded}");
    assert_eq!(threaded["conversation_id"], conversation.as_str());

    // A colleague's mail without References but with the ticket tag joins it too.
    let tagged = mail(
        "Dan <dan@customer.example>",
        "third@customer.example",
        &format!("Following up [#SB-{conversation}]"),
        "",
        "Writing for Ann about the same parcel.",
    );
    let (status, by_tag) = post_raw(&daemon, Some(INGEST), &tagged).await;
    assert_eq!(status, 202, "{by_tag}");
    assert_eq!(by_tag["conversation_id"], conversation.as_str());

    let (status, refused) = post_raw(&daemon, Some(INGEST), "this is not mail").await;
    assert_eq!(status, 400, "{refused}");
    // Over max_message_bytes (64 KiB here): 413, nothing stored.
    let huge = mail(
        "ann@customer.example",
        "huge@customer.example",
        "huge",
        "",
        &"x".repeat(70_000),
    );
    let (status, refused) = post_raw(&daemon, Some(INGEST), &huge).await;
    assert_eq!(status, 413, "{refused}");

    let detail = detail(&daemon, &conversation).await;
    let messages = detail["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 3, "{detail}");
    let body = &messages[0]["body"];
    assert_eq!(body["channel"], "email");
    assert_eq!(body["provider"], "mime");
    assert_eq!(body["text"], "The parcel arrived crushed, photo attached.");
    assert_eq!(body["thread_key"], "first@customer.example");
    assert_eq!(body["metadata"]["auto_reply"], true);
    assert_eq!(messages[1]["body"]["text"], "Any news?");
    assert!(
        messages[1]["body"]["metadata"]["full_text"]
            .as_str()
            .unwrap()
            .contains("> The parcel arrived crushed")
    );
    let attachment = &body["attachments"][0];
    assert_eq!(attachment["filename"], "crushed.png");
    assert_eq!(attachment["content_type"], "image/png");
    assert_eq!(attachment["size"], 8);
    let url = attachment["url"].as_str().unwrap();
    let path = &url[url.find("/v1/").unwrap()..];
    let response = daemon
        .http
        .get(daemon.url(path))
        .bearer_auth(agent_token("alice"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(
        response.bytes().await.unwrap().as_ref(),
        b"\x89PNG\r\n\x1a\n"
    );
    let response = daemon.http.get(daemon.url(path)).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 401);
}

#[tokio::test]
async fn loop_signals_are_stored_but_marked_never_to_auto_reply() {
    let daemon = start(OURS, None);
    for (index, header) in [
        "Auto-Submitted: auto-replied\r\n",
        "Precedence: bulk\r\n",
        "Precedence: list\r\n",
        "Precedence: junk\r\n",
        "List-Id: News <news.shop.example>\r\n",
        "Return-Path: <>\r\n",
    ]
    .iter()
    .enumerate()
    {
        let raw = mail(
            &format!("sender{index}@lists.example"),
            &format!("loop{index}@lists.example"),
            "Automatic",
            header,
            "I am a robot.",
        );
        let (status, stored) = post_raw(&daemon, Some(INGEST), &raw).await;
        assert_eq!(status, 202, "{header}: {stored}");
        let detail = detail(&daemon, stored["conversation_id"].as_str().unwrap()).await;
        let metadata = &detail["messages"][0]["body"]["metadata"];
        assert_eq!(metadata["auto_reply"], false, "{header}: {metadata}");
        assert!(metadata["auto_reply_blocked"].is_string(), "{metadata}");
    }
    let raw = mail(OURS, "self@example.com", "Echo", "", "our own mail");
    let (status, stored) = post_raw(&daemon, Some(INGEST), &raw).await;
    assert_eq!(status, 202);
    let detail = detail(&daemon, stored["conversation_id"].as_str().unwrap()).await;
    let metadata = &detail["messages"][0]["body"]["metadata"];
    assert!(
        metadata["auto_reply_blocked"]
            .as_str()
            .unwrap()
            .contains("our own address")
    );
}

/// Reads one SMTP reply (all its lines) and returns its code and text.
async fn read_reply(reader: &mut BufReader<TcpStream>) -> (u16, String) {
    let mut text = String::new();
    loop {
        let mut line = String::new();
        let read = tokio::time::timeout(Duration::from_secs(10), reader.read_line(&mut line))
            .await
            .expect("reply in time")
            .unwrap();
        assert!(read > 0, "connection closed; got so far: {text}");
        text.push_str(&line);
        if line.as_bytes().get(3) == Some(&b' ') {
            return (line[..3].parse().unwrap(), text);
        }
    }
}

#[tokio::test]
async fn smtp_listener_takes_mail_for_our_mailboxes_only_with_size_limits_and_pipelining() {
    let daemon = start(OURS, None);

    // A real client: multipart/alternative from lettre.
    let email = Message::builder()
        .from(
            "Eve Example <eve@customer.example>"
                .parse::<Mailbox>()
                .unwrap(),
        )
        .to(OURS.parse::<Mailbox>().unwrap())
        .subject("Grüße: Rückerstattung")
        .message_id(Some("<lettre-1@customer.example>".into()))
        .multipart(MultiPart::alternative_plain_html(
            "Bitte erstatten Sie meine Bestellung.".to_owned(),
            "<p>Bitte erstatten Sie meine <b>Bestellung</b>.</p>".to_owned(),
        ))
        .unwrap();
    smtp_client(&daemon).send(email).await.unwrap();
    let conversations = daemon.conversations().await;
    assert_eq!(
        conversations.len(),
        1,
        "stored before 250: {conversations:?}"
    );
    let detail = detail(&daemon, conversations[0]["id"].as_str().unwrap()).await;
    let body = &detail["messages"][0]["body"];
    assert_eq!(body["provider"], "smtp");
    assert_eq!(body["subject"], "Grüße: Rückerstattung");
    assert_eq!(body["text"], "Bitte erstatten Sie meine Bestellung.");
    assert!(body["html"].as_str().unwrap().contains("<b>Bestellung</b>"));
    assert_eq!(body["to"]["address"], OURS);

    // Not an open relay: lettre's send is refused permanently.
    let stranger = Message::builder()
        .from("eve@customer.example".parse::<Mailbox>().unwrap())
        .to("someone@elsewhere.example".parse::<Mailbox>().unwrap())
        .subject("relay?")
        .singlepart(
            SinglePart::builder()
                .header(ContentType::TEXT_PLAIN)
                .body("x".to_owned()),
        )
        .unwrap();
    let error = smtp_client(&daemon).send(stranger).await.unwrap_err();
    assert!(error.is_permanent(), "{error}");

    // Raw socket: a pipelined group is answered in order.
    let stream = TcpStream::connect(smtp_address(&daemon)).await.unwrap();
    let mut reader = BufReader::new(stream);
    assert_eq!(read_reply(&mut reader).await.0, 220);
    reader
        .get_mut()
        .write_all(
            b"EHLO client.test\r\nMAIL FROM:<eve@customer.example>\r\nRCPT TO:<nobody@elsewhere.example>\r\nRCPT TO:<SUPPORT@example.com>\r\nDATA\r\n",
        )
        .await
        .unwrap();
    let (code, ehlo) = read_reply(&mut reader).await;
    assert_eq!(code, 250);
    for extension in [
        "PIPELINING",
        "8BITMIME",
        "SIZE 65536",
        "ENHANCEDSTATUSCODES",
    ] {
        assert!(ehlo.contains(extension), "{ehlo}");
    }
    assert!(
        !ehlo.contains("STARTTLS"),
        "no certificate, no STARTTLS: {ehlo}"
    );
    assert_eq!(read_reply(&mut reader).await.0, 250);
    assert_eq!(read_reply(&mut reader).await.0, 550);
    assert_eq!(read_reply(&mut reader).await.0, 250);
    assert_eq!(read_reply(&mut reader).await.0, 354);
    // Over max_message_bytes: 552 after the final dot, nothing stored, the session goes on.
    let mut big = b"From: eve@customer.example\r\nSubject: big\r\n\r\n".to_vec();
    for _ in 0..1200 {
        big.extend_from_slice(b"0123456789012345678901234567890123456789012345678901234567890\r\n");
    }
    big.extend_from_slice(b".\r\n");
    reader.get_mut().write_all(&big).await.unwrap();
    assert_eq!(read_reply(&mut reader).await.0, 552);
    // SIZE declared over the limit: 552 at MAIL.
    reader
        .get_mut()
        .write_all(b"MAIL FROM:<eve@customer.example> SIZE=10000000\r\n")
        .await
        .unwrap();
    assert_eq!(read_reply(&mut reader).await.0, 552);
    // A dot-stuffed message pipelined with QUIT.
    reader
        .get_mut()
        .write_all(b"MAIL FROM:<>\r\nRCPT TO:<support@example.com>\r\nDATA\r\n")
        .await
        .unwrap();
    assert_eq!(read_reply(&mut reader).await.0, 250);
    assert_eq!(read_reply(&mut reader).await.0, 250);
    assert_eq!(read_reply(&mut reader).await.0, 354);
    reader
        .get_mut()
        .write_all(
            b"From: Frank <frank@customer.example>\r\nSubject: dots\r\nMessage-ID: <dots@customer.example>\r\n\r\nLine one\r\n..leading dot\r\n.\r\nQUIT\r\n",
        )
        .await
        .unwrap();
    let (code, text) = read_reply(&mut reader).await;
    assert_eq!(code, 250, "{text}");
    assert_eq!(read_reply(&mut reader).await.0, 221);
    let conversations = daemon.conversations().await;
    assert_eq!(conversations.len(), 2);
    let frank = conversations
        .iter()
        .find(|c| c["id"] != detail["conversation"]["id"])
        .unwrap();
    let frank = self::detail(&daemon, frank["id"].as_str().unwrap()).await;
    let body = &frank["messages"][0]["body"];
    assert_eq!(body["text"], "Line one\n.leading dot");
    // The null reverse-path: a notification, never answered automatically.
    assert_eq!(body["metadata"]["auto_reply"], false);
}

#[tokio::test]
async fn replies_go_out_threaded_over_smtp_and_a_bounce_fails_them() {
    // The customer's side: another switchboard whose listener takes mail for the customer.
    let customer_side = start("ann@customer.example", None);
    let relay_port: u16 = smtp_address(&customer_side)
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let daemon = start(OURS, Some(relay_port));
    let mut alice = daemon.agent_socket("alice").await;
    alice
        .command(json!({ "type": "presence", "presence": "available" }))
        .await;

    let first = Message::builder()
        .from(
            "Ann Customer <ann@customer.example>"
                .parse::<Mailbox>()
                .unwrap(),
        )
        .to(OURS.parse::<Mailbox>().unwrap())
        .subject("Where is my order?")
        .message_id(Some("<ask-1@customer.example>".into()))
        .references("<older@customer.example>".into())
        .in_reply_to("<older@customer.example>".into())
        .singlepart(SinglePart::plain("Order 1234 has not arrived.".to_owned()))
        .unwrap();
    smtp_client(&daemon).send(first).await.unwrap();
    let conversation = alice.accept_next_offer().await;
    let (status, answer) = daemon
        .reply_as(
            "alice",
            &conversation,
            "It ships today.\nSorry for the wait.",
        )
        .await;
    assert_eq!(status, 202, "{answer}");

    // The reply arrives at the customer's side, threaded.
    let received = eventually(20, "the reply at the customer's side", || async {
        customer_side.conversations().await.into_iter().next()
    })
    .await;
    let received = detail(&customer_side, received["id"].as_str().unwrap()).await;
    let body = &received["messages"][0]["body"];
    assert_eq!(body["from"]["address"], OURS);
    assert_eq!(body["from"]["name"], "Example Support");
    assert_eq!(body["text"], "It ships today.\nSorry for the wait.");
    assert!(
        body["html"]
            .as_str()
            .unwrap()
            .contains("It ships today.<br>Sorry")
    );
    assert_eq!(
        body["subject"],
        format!("Re: Where is my order? [#SB-{conversation}]")
    );
    let metadata = &body["metadata"];
    assert_eq!(metadata["in_reply_to"], json!(["ask-1@customer.example"]));
    assert_eq!(
        metadata["references"],
        json!(["older@customer.example", "ask-1@customer.example"])
    );
    let reply_id = metadata["message_id"].as_str().unwrap().to_owned();
    assert!(reply_id.ends_with("@example.com"), "{reply_id}");
    // Same thread key on both sides: the customer's client threads it with their mail.
    assert_eq!(body["thread_key"], "older@customer.example");

    // The peer stores the mail before its 250 reaches our sender, which then marks the reply sent.
    eventually(20, "the reply marked sent", || async {
        let history = daemon.history("alice", &conversation).await;
        history
            .iter()
            .any(|m| m["direction"] == "outbound" && m["delivery_status"] == "sent")
            .then_some(())
    })
    .await;

    // The customer's server bounces it later: the reply is failed, no new conversation opens.
    let dsn = format!(
        "From: Mail Delivery System <MAILER-DAEMON@customer.example>\r\nTo: {OURS}\r\n\
Subject: Undelivered Mail Returned to Sender\r\nMessage-ID: <dsn-1@customer.example>\r\n\
Auto-Submitted: auto-replied\r\nMIME-Version: 1.0\r\n\
Content-Type: multipart/report; report-type=delivery-status; boundary=\"R\"\r\n\r\n\
--R\r\nContent-Type: text/plain\r\n\r\nMailbox full.\r\n\
--R\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.customer.example\r\n\r\n\
Final-Recipient: rfc822; ann@customer.example\r\nAction: failed\r\nStatus: 5.2.2\r\n\
Diagnostic-Code: smtp; 552 5.2.2 mailbox full\r\n\r\n\
--R\r\nContent-Type: text/rfc822-headers\r\n\r\nFrom: {OURS}\r\nTo: ann@customer.example\r\n\
Message-ID: <{reply_id}>\r\nSubject: Re: Where is my order?\r\n--R--\r\n"
    );
    let (status, bounce) = post_raw(&daemon, Some(INGEST), &dsn).await;
    assert_eq!(status, 200, "{bounce}");
    assert_eq!(bounce["outcome"], "bounce");
    loop {
        let status = alice.next_of("reply_status").await;
        if status["status"] == "failed" {
            assert!(
                status["reason"].as_str().unwrap().contains("5.2.2"),
                "{status}"
            );
            break;
        }
    }
    let history = daemon.history("alice", &conversation).await;
    let sent = history
        .iter()
        .find(|m| m["direction"] == "outbound")
        .unwrap();
    assert_eq!(sent["delivery_status"], "failed");
    assert_eq!(daemon.conversations().await.len(), 1);
}

#[tokio::test]
async fn starttls_is_offered_with_a_certificate_and_the_connection_cap_holds() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let made = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-days", "1", "-subj", "/CN=localhost"])
        .args(["-addext", "subjectAltName=DNS:localhost"])
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .unwrap();
    assert!(made.status.success(), "{made:?}");
    let config = format!(
        "{}max_connections = 1\ntls_cert_file = \"{}\"\ntls_key_file = \"{}\"\n",
        email_config(OURS, None),
        cert.display(),
        key.display()
    );
    common::write_config(dir.path(), "", &config);
    let daemon = Daemon::start_in(dir);

    // One session at a time: the second connection is told to come back later.
    let stream = TcpStream::connect(smtp_address(&daemon)).await.unwrap();
    let mut first = BufReader::new(stream);
    assert_eq!(read_reply(&mut first).await.0, 220);
    first
        .get_mut()
        .write_all(b"EHLO client.test\r\n")
        .await
        .unwrap();
    let (_, ehlo) = read_reply(&mut first).await;
    assert!(ehlo.contains("STARTTLS"), "{ehlo}");
    let stream = TcpStream::connect(smtp_address(&daemon)).await.unwrap();
    let mut second = BufReader::new(stream);
    assert_eq!(read_reply(&mut second).await.0, 421);
    first.get_mut().write_all(b"QUIT\r\n").await.unwrap();
    assert_eq!(read_reply(&mut first).await.0, 221);
    drop(first);

    // lettre requires TLS and checks our certificate.
    let certificate =
        lettre::transport::smtp::client::Certificate::from_pem(&std::fs::read(&cert).unwrap())
            .unwrap();
    let tls = lettre::transport::smtp::client::TlsParameters::builder("localhost".into())
        .add_root_certificate(certificate)
        .build_rustls()
        .unwrap();
    let port: u16 = smtp_address(&daemon)
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let client = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous("localhost")
        .port(port)
        .tls(lettre::transport::smtp::client::Tls::Required(tls))
        .timeout(Some(Duration::from_secs(10)))
        .build();
    let email = Message::builder()
        .from("ivy@customer.example".parse::<Mailbox>().unwrap())
        .to(OURS.parse::<Mailbox>().unwrap())
        .subject("over TLS")
        .singlepart(SinglePart::plain("sent over STARTTLS".to_owned()))
        .unwrap();
    // The first session may still be closing on the server: retry while the cap refuses us.
    let sent = eventually(10, "a free session slot", || {
        let (client, email) = (client.clone(), email.clone());
        async move { client.send(email).await.ok() }
    })
    .await;
    assert!(sent.is_positive());
    let conversations = daemon.conversations().await;
    let detail = detail(&daemon, conversations[0]["id"].as_str().unwrap()).await;
    assert_eq!(detail["messages"][0]["body"]["text"], "sent over STARTTLS");
}

#[tokio::test]
async fn python_smtplib_sends_latin1_and_html_only_mail() {
    let daemon = start(OURS, None);
    let (host, port) = smtp_address(&daemon)
        .rsplit_once(':')
        .map(|(h, p)| (h.to_owned(), p.to_owned()))
        .unwrap();
    // Python's standard library as a second real client: a Latin-1 body (8-bit, declared
    // charset) and an HTML-only message with a Windows-1252 subject in an encoded word.
    let script = r#"
import smtplib, sys
from email.mime.text import MIMEText
from email.header import Header
from email.utils import formataddr
host, port = sys.argv[1], int(sys.argv[2])
latin = MIMEText("Grüße aus Köln, die Lieferung fehlt.", "plain", "iso-8859-1")
latin["From"] = formataddr(("Jürgen", "juergen@kunde.example"), "iso-8859-1")
latin["To"] = "support@example.com"
latin["Subject"] = Header("Lieferung für Jürgen", "iso-8859-1")
latin["Message-ID"] = "<py-latin1@kunde.example>"
html = MIMEText("<p>Caf&eacute; order <b>late</b></p><p>-- <br>Zo&euml;</p>", "html", "windows-1252")
html["From"] = "zoe@kunde.example"
html["To"] = "support@example.com"
html["Subject"] = Header("Café – late", "windows-1252")
html["Message-ID"] = "<py-html@kunde.example>"
with smtplib.SMTP(host, port, timeout=10) as client:
    client.ehlo("python.test")
    assert client.has_extn("pipelining") and client.has_extn("8bitmime")
    client.send_message(latin)
    client.send_message(html)
print("sent")
"#;
    let output = tokio::process::Command::new("python3")
        .args(["-c", script, &host, &port])
        .output()
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let mut bodies = Vec::new();
    for conversation in daemon.conversations().await {
        let detail = detail(&daemon, conversation["id"].as_str().unwrap()).await;
        bodies.push(detail["messages"][0]["body"].clone());
    }
    let latin = bodies
        .iter()
        .find(|b| b["provider_message_id"] == "py-latin1@kunde.example")
        .unwrap();
    assert_eq!(latin["text"], "Grüße aus Köln, die Lieferung fehlt.");
    assert_eq!(latin["subject"], "Lieferung für Jürgen");
    assert_eq!(latin["from"]["name"], "Jürgen");
    let html = bodies
        .iter()
        .find(|b| b["provider_message_id"] == "py-html@kunde.example")
        .unwrap();
    assert_eq!(html["subject"], "Café – late");
    assert!(html["html"].as_str().unwrap().contains("<b>late</b>"));
    assert!(
        html["text"].as_str().unwrap().contains("Café order late"),
        "{html}"
    );
}

#[tokio::test]
async fn an_idle_client_is_disconnected_after_the_command_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let config = format!("{}command_timeout_seconds = 1\n", email_config(OURS, None));
    common::write_config(dir.path(), "", &config);
    let daemon = Daemon::start_in(dir);
    let stream = TcpStream::connect(smtp_address(&daemon)).await.unwrap();
    let mut reader = BufReader::new(stream);
    assert_eq!(read_reply(&mut reader).await.0, 220);
    // Say nothing: the server gives up first, with 421, and closes.
    let (code, text) = read_reply(&mut reader).await;
    assert_eq!(code, 421, "{text}");
    let mut rest = String::new();
    assert_eq!(reader.read_line(&mut rest).await.unwrap(), 0, "closed");
}

/// A daemon taking mail for `mailboxes` by the raw webhook, relaying to the sink, with the
/// acknowledgement on and `extra` email settings.
fn start_acknowledging(mailboxes: &str, sink: &Sink, extra: &str, dkim: &str) -> Daemon {
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "[channels.email]\nmailboxes = [{mailboxes}]\nfrom_name = \"Example Support\"\n\
         {extra}\n\
         [channels.email.acknowledgement]\nenabled = true\n\
         text = \"We have your mail: {{ticket}}, number {{position}}, about {{wait_minutes}} min.\"\n\n\
         [channels.email.relay]\nhost = \"127.0.0.1\"\nport = {}\nsecurity = \"none\"\n{dkim}",
        sink.port
    );
    common::write_config(dir.path(), "", &config);
    Daemon::start_in(dir)
}

#[tokio::test]
async fn acknowledgements_skip_loop_signals_and_are_capped_per_sender_per_hour() {
    let mut sink = Sink::start().await;
    let daemon = start_acknowledging(
        &format!("\"{OURS}\""),
        &sink,
        "auto_reply_max_per_sender_per_hour = 2\n",
        "",
    );
    // Every loop signal: stored, never answered.
    let loops = [
        "Auto-Submitted: auto-replied\r\n",
        "Auto-Submitted: auto-generated\r\n",
        "Precedence: bulk\r\n",
        "Precedence: list\r\n",
        "Precedence: junk\r\n",
        "List-Id: News <news.shop.example>\r\n",
        "Return-Path: <>\r\n",
    ];
    for (index, header) in loops.iter().enumerate() {
        let raw = mail(
            &format!("robot{index}@lists.example"),
            &format!("loop{index}@lists.example"),
            "Automatic",
            header,
            "I am a robot.",
        );
        let (status, stored) = post_raw(&daemon, Some(INGEST), &raw).await;
        assert_eq!(status, 202, "{header}: {stored}");
    }
    let raw = mail(OURS, "self@example.com", "Echo", "", "our own mail");
    assert_eq!(post_raw(&daemon, Some(INGEST), &raw).await.0, 202);

    // A customer's mail is answered, threaded and marked automatic. Events are handled in order,
    // so every loop mail above was looked at before this answer left.
    let raw = mail(
        "Ann <ann@customer.example>",
        "ask@customer.example",
        "Where is my order?",
        "",
        "Order 1234?",
    );
    let (status, stored) = post_raw(&daemon, Some(INGEST), &raw).await;
    assert_eq!(status, 202, "{stored}");
    let conversation = stored["conversation_id"].as_str().unwrap().to_owned();
    let ack = sink.next(20).await;
    assert_eq!(header(&ack, "To").unwrap(), "ann@customer.example");
    let from = header(&ack, "From").unwrap();
    assert!(
        from.contains("Example Support") && from.contains(OURS),
        "{from}"
    );
    assert_eq!(header(&ack, "Auto-Submitted").unwrap(), "auto-replied");
    assert_eq!(
        header(&ack, "In-Reply-To").unwrap(),
        "<ask@customer.example>"
    );
    assert_eq!(
        header(&ack, "Subject").unwrap(),
        format!("Re: Where is my order? [#SB-{conversation}]")
    );
    // Nine conversations wait in the queue (the eight robots' and Ann's): she is the ninth.
    assert!(
        ack.contains(&format!(
            "We have your mail: [#SB-{conversation}], number 9, about"
        )),
        "{ack}"
    );
    let suppressed_loop = "switchboard_email_auto_replies_total{result=\"suppressed_loop\"}";
    assert_eq!(
        daemon.metric(suppressed_loop).await,
        Some((loops.len() + 1) as f64)
    );

    // Three people of one desk asking for answers at one address: two answers in the hour.
    for index in 0..3 {
        let raw = mail(
            &format!("clerk{index}@desk.example"),
            &format!("desk{index}@desk.example"),
            "Invoice",
            "Reply-To: Desk <desk@desk.example>\r\n",
            "Please resend the invoice.",
        );
        assert_eq!(post_raw(&daemon, Some(INGEST), &raw).await.0, 202);
    }
    let raw = mail("bob@other.example", "bob@other.example", "Hi", "", "Hello");
    assert_eq!(post_raw(&daemon, Some(INGEST), &raw).await.0, 202);
    let mut recipients = Vec::new();
    for _ in 0..3 {
        recipients.push(header(&sink.next(20).await, "To").unwrap());
    }
    assert_eq!(
        recipients,
        [
            "desk@desk.example",
            "desk@desk.example",
            "bob@other.example"
        ]
    );
    let sent = "switchboard_email_auto_replies_total{result=\"sent\"}";
    let capped = "switchboard_email_auto_replies_total{result=\"suppressed_cap\"}";
    eventually(10, "four sent", || async {
        (daemon.metric(sent).await == Some(4.0)).then_some(())
    })
    .await;
    assert_eq!(daemon.metric(capped).await, Some(1.0));
    assert_eq!(daemon.conversations().await.len(), 13);
}

/// Verifies a captured message's DKIM signature with dkimpy, the public key served by a stub in
/// place of DNS (`<selector>._domainkey.<domain>` → `record`).
fn dkim_verifies(raw: &str, name: &str, record: &str, dir: &std::path::Path) -> String {
    let path = dir.join("signed.eml");
    std::fs::write(&path, raw).unwrap();
    let script = format!(
        "import dkim, sys\n\
         message = open({path:?}, 'rb').read()\n\
         def dns(name, timeout=5):\n    return {record:?}.encode() if name == b{name:?} else None\n\
         print(dkim.verify(message, dnsfunc=dns))\n",
        path = path.display().to_string(),
    );
    let output = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "dkimpy (pip install dkimpy pynacl): {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

#[tokio::test]
async fn outbound_mail_is_dkim_signed_with_rsa_and_ed25519_and_verifies() {
    let keys = tempfile::tempdir().unwrap();
    let rsa = keys.path().join("rsa.pem");
    let made = std::process::Command::new("openssl")
        .args(["genrsa", "-traditional", "-out"])
        .arg(&rsa)
        .arg("2048")
        .output()
        .unwrap();
    assert!(made.status.success(), "{made:?}");
    let public = std::process::Command::new("openssl")
        .args(["rsa", "-pubout", "-outform", "DER", "-in"])
        .arg(&rsa)
        .output()
        .unwrap();
    assert!(public.status.success());
    use base64::Engine;
    let rsa_record = format!(
        "v=DKIM1; k=rsa; p={}",
        base64::engine::general_purpose::STANDARD.encode(&public.stdout)
    );
    // An Ed25519 key (RFC 8463): the seed for switchboard, the raw public key for the record.
    let ed = std::process::Command::new("python3")
        .arg("-c")
        .arg(
            "import nacl.signing, base64\nk = nacl.signing.SigningKey.generate()\n\
             print(base64.b64encode(bytes(k)).decode())\n\
             print(base64.b64encode(bytes(k.verify_key)).decode())",
        )
        .output()
        .unwrap();
    assert!(ed.status.success(), "pynacl: {ed:?}");
    let ed = String::from_utf8(ed.stdout).unwrap();
    let (seed, ed_public) = ed.trim().split_once('\n').unwrap();
    let ed_key = keys.path().join("ed25519.key");
    std::fs::write(&ed_key, seed).unwrap();
    let ed_record = format!("v=DKIM1; k=ed25519; p={ed_public}");

    let mut sink = Sink::start().await;
    let dkim = format!(
        "\n[[channels.email.dkim]]\ndomain = \"example.com\"\nselector = \"sb1\"\nkey_file = \"{}\"\n\n\
         [[channels.email.dkim]]\ndomain = \"example.org\"\nselector = \"sb2\"\n\
         algorithm = \"ed25519-sha256\"\nkey_file = \"{}\"\n",
        rsa.display(),
        ed_key.display()
    );
    let daemon = start_acknowledging(
        &format!("\"{OURS}\", \"help@example.org\""),
        &sink,
        "",
        &dkim,
    );
    let raw = mail(
        "ann@customer.example",
        "rsa@customer.example",
        "Héllo",
        "",
        "Hi there.",
    );
    assert_eq!(post_raw(&daemon, Some(INGEST), &raw).await.0, 202);
    let signed = sink.next(20).await;
    let signature = header(&signed, "DKIM-Signature").expect("signed");
    assert!(
        signature.contains("a=rsa-sha256; d=example.com; s=sb1"),
        "{signature}"
    );
    assert_eq!(
        dkim_verifies(
            &signed,
            "sb1._domainkey.example.com.",
            &rsa_record,
            keys.path()
        ),
        "True",
        "{signed}"
    );
    // Changing a signed header breaks it: the verifier is really checking.
    let forged = signed.replacen("Subject: ", "Subject: Fwd: ", 1);
    assert_eq!(
        dkim_verifies(
            &forged,
            "sb1._domainkey.example.com.",
            &rsa_record,
            keys.path()
        ),
        "False"
    );

    let raw = "From: bob@customer.example\r\nTo: help@example.org\r\nSubject: Ed\r\n\
               Message-ID: <ed@customer.example>\r\n\r\nHello.\r\n";
    assert_eq!(post_raw(&daemon, Some(INGEST), raw).await.0, 202);
    let signed = sink.next(20).await;
    let signature = header(&signed, "DKIM-Signature").expect("signed");
    assert!(
        signature.contains("a=ed25519-sha256; d=example.org; s=sb2"),
        "{signature}"
    );
    assert_eq!(
        dkim_verifies(
            &signed,
            "sb2._domainkey.example.org.",
            &ed_record,
            keys.path()
        ),
        "True",
        "{signed}"
    );
}
