//! The command line as an operator uses it: `--version`, and `check-config` on good, doubtful and
//! broken files (exit status, the effective config with secrets masked, errors and warnings on stderr).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Command, Output};

fn switchboard(args: &[&str], environment: &[(&str, &str)]) -> Output {
    let mut command = Command::new(common::binary());
    command.args(args);
    for (key, _) in std::env::vars() {
        if key.starts_with("SWITCHBOARD__") {
            command.env_remove(key);
        }
    }
    command.envs(environment.iter().copied());
    command.output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn check(config: &str, environment: &[(&str, &str)]) -> (bool, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("switchboard.toml");
    std::fs::write(&path, config).unwrap();
    let output = switchboard(
        &["check-config", "--config", path.to_str().unwrap()],
        environment,
    );
    (
        output.status.success(),
        text(&output.stdout),
        text(&output.stderr),
    )
}

#[test]
fn version_names_the_release() {
    let output = switchboard(&["--version"], &[]);
    assert!(output.status.success());
    assert_eq!(
        text(&output.stdout).trim(),
        format!("switchboard {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn the_embedded_defaults_check_clean_and_secrets_print_masked() {
    let (ok, stdout, stderr) = check(
        "",
        &[(
            "SWITCHBOARD__AUTH__INGEST_TOKENS",
            "very-secret-ingest-token",
        )],
    );
    assert!(ok, "{stderr}");
    assert!(stderr.contains("configuration ok: 3 queues"), "{stderr}");
    assert!(!stderr.contains("warning:"), "{stderr}");
    assert!(stdout.contains("[[queues]]"), "{stdout}");
    assert!(!stdout.contains("very-secret-ingest-token"), "{stdout}");
}

#[test]
fn a_rule_naming_an_unknown_queue_fails_with_the_reason() {
    let (ok, _, stderr) = check("[[rules]]\nname = \"vip\"\nqueues = [\"platinum\"]\n", &[]);
    assert!(!ok);
    assert!(stderr.contains("platinum"), "{stderr}");
}

#[test]
fn a_zero_capacity_and_a_duplicate_agent_fail() {
    let (ok, _, stderr) = check(
        "[[agents]]\nid = \"zed\"\nqueues = [\"support\"]\ncapacity = { chat = 1 }\nmax_total = 0\n",
        &[],
    );
    assert!(!ok);
    assert!(stderr.contains("zed"), "{stderr}");
    let twice = "[[agents]]\nid = \"alice\"\nqueues = [\"support\"]\ncapacity = { chat = 1 }\nmax_total = 1\n";
    let (ok, _, stderr) = check(&format!("{twice}\n{twice}"), &[]);
    assert!(!ok);
    assert!(stderr.contains("alice"), "{stderr}");
}

#[test]
fn doubtful_but_valid_staffing_passes_with_warnings() {
    let (ok, _, stderr) = check(
        "[[agents]]\nid = \"dave\"\nqueues = []\ncapacity = { chat = 1 }\nmax_total = 1\n\n\
         [[agents]]\nid = \"erin\"\nqueues = [\"billing\"]\ncapacity = { telegram = 2 }\nmax_total = 2\n",
        &[],
    );
    assert!(ok, "{stderr}");
    assert!(
        stderr.contains("warning: agent `dave` serves no queue"),
        "{stderr}"
    );
    assert!(
        stderr.contains("warning: agent `erin` has capacity for channel `telegram`"),
        "{stderr}"
    );
}

#[test]
fn account_lists_come_from_the_environment_and_secrets_keep_their_commas() {
    let config = "[channels.twilio.main]\naccount_sid = \"AC123\"\n\
                  public_url = \"https://hooks.example/v1/webhooks/twilio/main\"\n";
    let (ok, stdout, stderr) = check(
        config,
        &[
            (
                "SWITCHBOARD__CHANNELS__TWILIO__MAIN__NUMBERS",
                "+15550001111,+15550002222",
            ),
            (
                "SWITCHBOARD__CHANNELS__TWILIO__MAIN__AUTH_TOKEN",
                "comma,in,the,token",
            ),
        ],
    );
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains(r#""+15550001111""#) && stdout.contains(r#""+15550002222""#),
        "{stdout}"
    );
    assert!(!stdout.contains("comma,in"), "a secret leaked: {stdout}");

    // A list of one keeps its `+`; a wrong number is named with its key.
    let (ok, stdout, stderr) = check(
        config,
        &[
            (
                "SWITCHBOARD__CHANNELS__TWILIO__MAIN__NUMBERS",
                "+15550001111",
            ),
            ("SWITCHBOARD__CHANNELS__TWILIO__MAIN__AUTH_TOKEN", "token"),
        ],
    );
    assert!(ok, "{stderr}");
    assert!(stdout.contains(r#""+15550001111""#), "{stdout}");
    let (ok, _, stderr) = check(
        config,
        &[
            (
                "SWITCHBOARD__CHANNELS__TWILIO__MAIN__NUMBERS",
                "+15550001111,5550",
            ),
            ("SWITCHBOARD__CHANNELS__TWILIO__MAIN__AUTH_TOKEN", "token"),
        ],
    );
    assert!(!ok);
    assert!(stderr.contains("channels.twilio.main.numbers"), "{stderr}");
}
