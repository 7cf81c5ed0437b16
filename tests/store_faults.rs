//! Store faults through the real binary: the SQLite file locked by another process for longer than
//! the busy timeout, and the disk full (a small tmpfs the test mounts). Intake must answer 503 (HTTP)
//! or 451 (SMTP) with a reason, never 2xx for something not stored, and recover by itself once the
//! fault clears, with everything that was acknowledged stored exactly once.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{ADMIN, Daemon, api_message};
use serde_json::Value;
use sha2::Digest as _;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const CUSTOMER: &str = "customer-under-faults";

/// Every inbound message's `provider_message_id` stored for `CUSTOMER`, with how often each is there.
async fn stored_ids(daemon: &Daemon) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for conversation in daemon.conversations().await {
        let id = conversation["id"].as_str().unwrap();
        let (status, detail) = daemon
            .get(&format!("/v1/admin/conversations/{id}"), ADMIN)
            .await;
        assert_eq!(status, 200, "{detail}");
        for message in detail["messages"].as_array().unwrap() {
            // Every inbound message of this test's own store: API ones by their id, emails by their
            // Message-ID (stored without the angle brackets).
            if message["direction"] == "inbound" {
                let key = message["body"]["provider_message_id"]
                    .as_str()
                    .unwrap()
                    .trim_start_matches('<')
                    .trim_end_matches('>')
                    .to_owned();
                *counts.entry(key).or_insert(0) += 1;
            }
        }
    }
    counts
}

/// Asserts each acknowledged id is stored exactly once and nothing unacknowledged slipped in twice.
async fn assert_stored_once(daemon: &Daemon, acknowledged: &[String]) {
    let stored = stored_ids(daemon).await;
    for id in acknowledged {
        assert_eq!(stored.get(id), Some(&1), "{id} acknowledged: stored once");
    }
    assert!(stored.values().all(|count| *count == 1), "{stored:?}");
}

fn error_message(answer: &Value) -> &str {
    answer["error"]["message"].as_str().unwrap_or_default()
}

/// Reads one SMTP reply (all its lines): code and text.
async fn smtp_reply(reader: &mut BufReader<TcpStream>) -> (u16, String) {
    let mut text = String::new();
    loop {
        let mut line = String::new();
        let read = tokio::time::timeout(Duration::from_secs(20), reader.read_line(&mut line))
            .await
            .expect("an SMTP reply in time")
            .unwrap();
        assert!(read > 0, "connection closed; got so far: {text}");
        text.push_str(&line);
        if line.as_bytes().get(3) == Some(&b' ') {
            return (line[..3].parse().unwrap(), text);
        }
    }
}

async fn smtp_command(reader: &mut BufReader<TcpStream>, command: &str) -> (u16, String) {
    reader
        .get_mut()
        .write_all(command.as_bytes())
        .await
        .unwrap();
    smtp_reply(reader).await
}

/// The attachment every test mail carries.
const ATTACHMENT: &[u8] = b"order 1234: crushed on arrival";

/// Sends one mail with [`ATTACHMENT`] in an open session (after EHLO); returns the answer to the
/// end of DATA.
async fn smtp_mail(reader: &mut BufReader<TcpStream>, message_id: &str) -> (u16, String) {
    assert_eq!(
        smtp_command(reader, &format!("MAIL FROM:<{CUSTOMER}@example.net>\r\n"))
            .await
            .0,
        250
    );
    assert_eq!(
        smtp_command(reader, "RCPT TO:<support@example.com>\r\n")
            .await
            .0,
        250
    );
    assert_eq!(smtp_command(reader, "DATA\r\n").await.0, 354);
    use base64::Engine as _;
    let attachment = base64::engine::general_purpose::STANDARD.encode(ATTACHMENT);
    let mail = format!(
        "From: <{CUSTOMER}@example.net>\r\nTo: <support@example.com>\r\nSubject: locked\r\n\
         Message-ID: <{message_id}>\r\nMIME-Version: 1.0\r\n\
         Content-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n\
         --b1\r\nContent-Type: text/plain\r\n\r\nIs anybody there?\r\n\
         --b1\r\nContent-Type: text/plain; name=\"note.txt\"\r\n\
         Content-Disposition: attachment; filename=\"note.txt\"\r\n\
         Content-Transfer-Encoding: base64\r\n\r\n{attachment}\r\n--b1--\r\n.\r\n"
    );
    smtp_command(reader, &mail).await
}

#[tokio::test]
async fn a_locked_store_answers_503_and_451_then_recovers_with_nothing_lost() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("switchboard.sqlite");
    common::write_config_with_store(
        dir.path(),
        "",
        &format!("path = \"{}\"\nbusy_timeout_ms = 300", store.display()),
        "[channels.email]\nmailboxes = [\"support@example.com\"]\n\n\
         [channels.email.smtp]\nenabled = true\nlisten = \"127.0.0.1:0\"\nhostname = \"mx.test\"\n",
    );
    let daemon = Daemon::start_in(dir);
    let mut acknowledged = Vec::new();
    let (status, answer) = daemon
        .ingest(api_message("before-lock", CUSTOMER, "first"))
        .await;
    assert_eq!(status, 202, "{answer}");
    acknowledged.push("before-lock".to_owned());

    let stream = TcpStream::connect(&daemon.listeners["smtp"]).await.unwrap();
    let mut smtp = BufReader::new(stream);
    assert_eq!(smtp_reply(&mut smtp).await.0, 220);
    assert_eq!(smtp_command(&mut smtp, "EHLO client.test\r\n").await.0, 250);

    // Another process (a backup, a stray sqlite3 shell) holds the write lock.
    let locker = rusqlite::Connection::open(&store).unwrap();
    locker.execute_batch("BEGIN IMMEDIATE").unwrap();

    let (status, answer) = daemon
        .ingest(api_message("during-lock", CUSTOMER, "second"))
        .await;
    assert_eq!(status, 503, "{answer}");
    assert_eq!(answer["error"]["code"], "store_unavailable", "{answer}");
    assert!(
        error_message(&answer).contains("locked") || error_message(&answer).contains("busy"),
        "the reason names the lock: {answer}"
    );
    let (code, text) = smtp_mail(&mut smtp, "during-lock@example.net").await;
    assert_eq!(code, 451, "SMTP asks the sender to retry: {text}");
    // Nothing of the refused mail was kept, its attachment included.
    let attachment_path = format!(
        "/v1/channels/email/attachments/{}",
        hex::encode(sha2::Sha256::digest(ATTACHMENT))
    );
    assert_eq!(daemon.get(&attachment_path, ADMIN).await.0, 404);

    locker.execute_batch("ROLLBACK").unwrap();
    drop(locker);

    // Recovered by itself: the senders' retries are taken, once.
    let (status, answer) = daemon
        .ingest(api_message("during-lock", CUSTOMER, "second"))
        .await;
    assert_eq!(status, 202, "{answer}");
    acknowledged.push("during-lock".to_owned());
    let (status, answer) = daemon
        .ingest(api_message("after-lock", CUSTOMER, "third"))
        .await;
    assert_eq!(status, 202, "{answer}");
    acknowledged.push("after-lock".to_owned());
    assert_eq!(smtp_command(&mut smtp, "RSET\r\n").await.0, 250);
    let (code, text) = smtp_mail(&mut smtp, "during-lock@example.net").await;
    assert_eq!(code, 250, "{text}");
    acknowledged.push("during-lock@example.net".to_owned());
    // The retried mail's attachment came in its commit.
    let response = daemon
        .http
        .get(daemon.url(&attachment_path))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(response.bytes().await.unwrap().as_ref(), ATTACHMENT);

    let stored = stored_ids(&daemon).await;
    assert_stored_once(&daemon, &acknowledged).await;
    assert_eq!(stored.len(), acknowledged.len(), "{stored:?}");
}

/// A tmpfs of `megabytes` mounted at `path` for the test's lifetime (the test runs as root, as CI
/// does on this machine).
struct Tmpfs<'a> {
    path: &'a Path,
}

impl<'a> Tmpfs<'a> {
    fn mount(path: &'a Path, megabytes: u32) -> Tmpfs<'a> {
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={megabytes}m"), "tmpfs"])
            .arg(path)
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "mounting a tmpfs needs root (CI runs the tests as root)"
        );
        Tmpfs { path }
    }
}

impl Drop for Tmpfs<'_> {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.path).status();
    }
}

/// Writes a file until the filesystem is full.
fn fill(path: &Path) {
    use std::io::Write;
    let mut file = std::fs::File::create(path).unwrap();
    let block = vec![0xA5_u8; 64 * 1024];
    loop {
        match file.write_all(&block) {
            Ok(()) => {}
            Err(error) if error.raw_os_error() == Some(28) => break, // ENOSPC
            Err(error) => panic!("filling the disk: {error}"),
        }
    }
    // Smaller writes take the last partial block too.
    while file.write_all(&[0xA5]).is_ok() {}
}

#[tokio::test]
async fn a_full_disk_answers_503_then_recovers_with_nothing_lost() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk");
    std::fs::create_dir(&disk).unwrap();
    let tmpfs = Tmpfs::mount(&disk, 16);
    let store = disk.join("switchboard.sqlite");
    common::write_config_with_store(
        dir.path(),
        "",
        &format!("path = \"{}\"", store.display()),
        "",
    );
    let mut daemon = Daemon::start_in(dir);
    let mut acknowledged = Vec::new();
    for index in 0..3 {
        let id = format!("before-full-{index}");
        let (status, answer) = daemon.ingest(api_message(&id, CUSTOMER, "hello")).await;
        assert_eq!(status, 202, "{answer}");
        acknowledged.push(id);
    }

    let filler = disk.join("filler");
    fill(&filler);
    // Messages of 64 KiB each: soon one needs a page the disk does not have.
    let text = "x".repeat(64 * 1024);
    let mut refused = None;
    for index in 0..200 {
        let id = format!("while-full-{index}");
        let (status, answer) = daemon.ingest(api_message(&id, CUSTOMER, &text)).await;
        match status {
            202 => acknowledged.push(id),
            503 => {
                assert_eq!(answer["error"]["code"], "store_unavailable", "{answer}");
                assert!(
                    error_message(&answer).contains("full"),
                    "the reason says the disk is full: {answer}"
                );
                refused = Some(id);
                break;
            }
            other => panic!("{other}: {answer}"),
        }
    }
    let refused = refused.expect("a full disk refuses a write with 503");
    // Still full: still refused, never a 2xx.
    let (status, answer) = daemon.ingest(api_message(&refused, CUSTOMER, &text)).await;
    assert_eq!(status, 503, "{answer}");

    std::fs::remove_file(&filler).unwrap();
    // Space is back: the retry is taken without a restart.
    let (status, answer) = daemon.ingest(api_message(&refused, CUSTOMER, &text)).await;
    assert_eq!(status, 202, "{answer}");
    acknowledged.push(refused);
    let (status, answer) = daemon
        .ingest(api_message("after-full", CUSTOMER, "back"))
        .await;
    assert_eq!(status, 202, "{answer}");
    acknowledged.push("after-full".to_owned());
    assert_stored_once(&daemon, &acknowledged).await;

    // And it survives a restart: what was acknowledged is on disk.
    daemon.kill();
    daemon.spawn();
    assert_stored_once(&daemon, &acknowledged).await;
    daemon.kill();
    drop(tmpfs);
}
