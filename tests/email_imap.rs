//! IMAP intake against a real Dovecot (started by the test on a loopback port, with a throwaway
//! config, mail directory and user): mail appended to the mailbox becomes conversations, is
//! flagged `\Seen` (or moved to a folder), and a restart reads only what is new; over plain IMAP,
//! implicit TLS and STARTTLS (a throwaway self-signed certificate made by the test).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use common::{Daemon, eventually};

/// A Dovecot serving one user, `ann` / `imap-secret`, killed on drop.
struct Dovecot {
    dir: tempfile::TempDir,
    port: u16,
    /// Implicit TLS (imaps), when started with TLS; `port` then also offers STARTTLS.
    tls_port: Option<u16>,
    child: Child,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Dovecot {
    fn start() -> Dovecot {
        Dovecot::start_with(false)
    }

    /// With `tls`, a self-signed certificate for 127.0.0.1 (`cert.pem` in the directory) is made
    /// and both STARTTLS and implicit TLS are served.
    fn start_with(tls: bool) -> Dovecot {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        // Mail processes run as `nobody`: they must reach and write the mail directories.
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755)).unwrap();
        for sub in ["run", "state", "mail", "home"] {
            std::fs::create_dir(root.join(sub)).unwrap();
        }
        for sub in ["mail", "home"] {
            std::fs::set_permissions(root.join(sub), std::fs::Permissions::from_mode(0o777))
                .unwrap();
        }
        std::fs::write(root.join("passwd"), "ann:{PLAIN}imap-secret::::::\n").unwrap();
        let port = free_port();
        let r = root.display();
        let (ssl, tls_port) = if tls {
            let made = Command::new("openssl")
                .args([
                    "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                ])
                .args([
                    "-subj",
                    "/CN=127.0.0.1",
                    "-addext",
                    "subjectAltName=IP:127.0.0.1",
                    // A server certificate, not a CA: rustls refuses a CA as the end entity.
                    "-addext",
                    "basicConstraints=critical,CA:FALSE",
                    "-addext",
                    "keyUsage=digitalSignature,keyEncipherment",
                    "-addext",
                    "extendedKeyUsage=serverAuth",
                ])
                .arg("-keyout")
                .arg(root.join("key.pem"))
                .arg("-out")
                .arg(root.join("cert.pem"))
                .output()
                .unwrap();
            assert!(made.status.success(), "{made:?}");
            let tls_port = free_port();
            (
                format!("ssl = yes\nssl_cert = <{r}/cert.pem\nssl_key = <{r}/key.pem\n"),
                Some(tls_port),
            )
        } else {
            ("ssl = no\n".to_owned(), None)
        };
        let imaps = match tls_port {
            Some(tls_port) => format!("address = 127.0.0.1\n    port = {tls_port}"),
            None => "port = 0".to_owned(),
        };
        std::fs::write(
            root.join("dovecot.conf"),
            format!(
                "base_dir = {r}/run\nstate_dir = {r}/state\nlog_path = /dev/stderr\nprotocols = imap\n\
                 listen = 127.0.0.1\n{ssl}disable_plaintext_auth = no\nauth_mechanisms = plain login\n\
                 mail_location = maildir:{r}/mail/%u\n\
                 passdb {{\n  driver = passwd-file\n  args = {r}/passwd\n}}\n\
                 userdb {{\n  driver = static\n  args = uid=nobody gid=nogroup home={r}/home/%u\n}}\n\
                 service imap-login {{\n  inet_listener imap {{\n    address = 127.0.0.1\n    port = {port}\n  }}\n  \
                 inet_listener imaps {{\n    {imaps}\n  }}\n}}\n\
                 service pop3-login {{\n  inet_listener pop3 {{\n    port = 0\n  }}\n}}\n"
            ),
        )
        .unwrap();
        let child = Command::new("dovecot")
            .arg("-F")
            .arg("-c")
            .arg(root.join("dovecot.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("dovecot installed (apt-get install dovecot-imapd)");
        Dovecot {
            dir,
            port,
            tls_port,
            child,
        }
    }

    /// Runs a Python imaplib script logged in as ann (`m`); returns its stdout.
    fn imap(&self, script: &str) -> String {
        let program = format!(
            "import imaplib\nm = imaplib.IMAP4('127.0.0.1', {})\nm.login('ann', 'imap-secret')\n{script}\n",
            self.port
        );
        let output = Command::new("python3")
            .arg("-c")
            .arg(program)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    }

    fn append(&self, id: &str, subject: &str, text: &str) {
        self.imap(&format!(
            "m.append('INBOX', None, None, b'From: Ann <ann@customer.example>\\r\\nTo: support@example.com\\r\\n\
             Subject: {subject}\\r\\nMessage-ID: <{id}>\\r\\n\\r\\n{text}\\r\\n')"
        ));
    }
}

impl Drop for Dovecot {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn config(dovecot: &Dovecot, state: &Path) -> String {
    format!(
        "[channels.email]\nmailboxes = [\"support@example.com\"]\n\n\
         [channels.email.imap]\nhost = \"127.0.0.1\"\nport = {}\nsecurity = \"none\"\nusername = \"ann\"\n\
         password = \"imap-secret\"\npoll_seconds = 30\nstate_file = \"{}\"\n",
        dovecot.port,
        state.display()
    )
}

async fn stored_texts(daemon: &Daemon) -> Vec<String> {
    let mut texts = Vec::new();
    for conversation in daemon.conversations().await {
        let (_, detail) = daemon
            .get(
                &format!(
                    "/v1/admin/conversations/{}",
                    conversation["id"].as_str().unwrap()
                ),
                common::ADMIN,
            )
            .await;
        for message in detail["messages"].as_array().unwrap() {
            texts.push(message["body"]["text"].as_str().unwrap().to_owned());
        }
    }
    texts.sort();
    texts
}

#[tokio::test]
async fn imap_mail_is_taken_once_flagged_seen_and_a_restart_reads_only_new_mail() {
    let dovecot = Dovecot::start();
    eventually(10, "dovecot listening", || async {
        tokio::net::TcpStream::connect(("127.0.0.1", dovecot.port))
            .await
            .ok()
    })
    .await;
    dovecot.append("one@customer.example", "First", "first message");
    dovecot.append("two@customer.example", "Second", "second message");

    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("imap-state.json");
    common::write_config(dir.path(), "", &config(&dovecot, &state));
    let mut daemon = Daemon::start_in(dir);
    eventually(20, "both messages stored", || async {
        (stored_texts(&daemon).await.len() == 2).then_some(())
    })
    .await;
    // Marked processed only after the commit: both flagged \Seen, the position recorded.
    let seen = eventually(20, "both flagged \\Seen", || async {
        let seen =
            dovecot.imap("m.select('INBOX')\nprint(m.uid('search', None, 'SEEN')[1][0].decode())");
        (seen.split_whitespace().count() == 2).then_some(seen)
    })
    .await;
    assert_eq!(seen.trim(), "1 2");
    let position: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
    assert_eq!(position["last_uid"], 2);

    // While the daemon is down a third message arrives; after the restart only it is read.
    assert!(daemon.terminate().success());
    dovecot.append("three@customer.example", "Third", "third message");
    daemon.spawn();
    eventually(20, "the third message", || async {
        (stored_texts(&daemon).await.len() == 3).then_some(())
    })
    .await;
    assert_eq!(
        stored_texts(&daemon).await,
        vec!["first message", "second message", "third message"]
    );
    // Nothing was read twice: no duplicate ever reached the store.
    let duplicates = daemon
        .metric("switchboard_messages_duplicate_total{channel=\"email\"}")
        .await;
    assert_eq!(duplicates.unwrap_or(0.0), 0.0);
    // New mail while connected arrives through IDLE, well before the 30 s poll.
    dovecot.append("four@customer.example", "Fourth", "fourth message");
    eventually(10, "the fourth message, woken by IDLE", || async {
        (stored_texts(&daemon).await.len() == 4).then_some(())
    })
    .await;
}

/// `[channels.email]` reading Dovecot's INBOX with `security` on `port`, trusting the test's
/// certificate, with extra `[channels.email.imap]` lines.
fn tls_config(dovecot: &Dovecot, state: &Path, security: &str, port: u16, extra: &str) -> String {
    format!(
        "[channels.email]\nmailboxes = [\"support@example.com\"]\n\n\
         [channels.email.imap]\nhost = \"127.0.0.1\"\nport = {port}\nsecurity = \"{security}\"\n\
         ca_file = \"{}\"\nusername = \"ann\"\npassword = \"imap-secret\"\npoll_seconds = 30\n\
         state_file = \"{}\"\n{extra}",
        dovecot.dir.path().join("cert.pem").display(),
        state.display()
    )
}

#[tokio::test]
async fn imap_over_implicit_tls_moves_processed_mail_and_starttls_flags_it() {
    let dovecot = Dovecot::start_with(true);
    let tls_port = dovecot.tls_port.unwrap();
    eventually(10, "dovecot listening", || async {
        tokio::net::TcpStream::connect(("127.0.0.1", tls_port))
            .await
            .ok()
    })
    .await;
    dovecot.imap("m.create('Processed')");
    dovecot.append("tls-1@customer.example", "Over TLS", "first over tls");
    dovecot.append("tls-2@customer.example", "Over TLS", "second over tls");

    // Implicit TLS, processed mail moved to `Processed`.
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("imap-state.json");
    common::write_config(
        dir.path(),
        "",
        &tls_config(
            &dovecot,
            &state,
            "tls",
            tls_port,
            "processed_mailbox = \"Processed\"\n",
        ),
    );
    let mut daemon = Daemon::start_in(dir);
    eventually(20, "both messages stored over TLS", || async {
        (stored_texts(&daemon).await.len() == 2).then_some(())
    })
    .await;
    let counts = "m.select('INBOX')\nprint(len(m.uid('search', None, 'ALL')[1][0].split()))\n\
                  m.select('Processed')\nprint(len(m.uid('search', None, 'ALL')[1][0].split()))";
    let moved = eventually(20, "both moved to Processed", || async {
        let counts = dovecot.imap(counts);
        (counts.split_whitespace().collect::<Vec<_>>() == ["0", "2"]).then_some(counts)
    })
    .await;
    assert_eq!(moved.split_whitespace().collect::<Vec<_>>(), ["0", "2"]);
    assert!(daemon.terminate().success());

    // STARTTLS on the plain port, processed mail flagged: only the new message is in INBOX.
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("imap-state.json");
    common::write_config(
        dir.path(),
        "",
        &tls_config(&dovecot, &state, "starttls", dovecot.port, ""),
    );
    let daemon = Daemon::start_in(dir);
    dovecot.append("tls-3@customer.example", "STARTTLS", "third over starttls");
    eventually(20, "the message read after STARTTLS", || async {
        (stored_texts(&daemon).await == ["third over starttls"]).then_some(())
    })
    .await;
    let seen = eventually(20, "flagged \\Seen", || async {
        let seen =
            dovecot.imap("m.select('INBOX')\nprint(m.uid('search', None, 'SEEN')[1][0].decode())");
        (seen.split_whitespace().count() == 1).then_some(seen)
    })
    .await;
    assert_eq!(seen.split_whitespace().count(), 1);
}
