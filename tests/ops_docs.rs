//! docs/OPERATIONS.md stays true: its configuration reference lists every key the configuration
//! accepts (from the typed `ConfigFile`, so a new key without a row fails here) with the shipped
//! default and the environment name, and its metrics catalogue is exactly what the running
//! daemon's `/metrics` exports, with the same types and labels.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use common::{Daemon, api_message, delete_nats_streams, nats_config, unique_name};
use serde_json::Value;
use switchboard::config::{ConfigFile, DEFAULT_CONFIG};

fn operations() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/OPERATIONS.md");
    std::fs::read_to_string(&path).unwrap_or_else(|error| panic!("{}: {error}", path.display()))
}

/// The rows of the first table after `heading`, as cells with surrounding backticks removed.
fn table_after(document: &str, heading: &str) -> Vec<Vec<String>> {
    let mut lines = document.lines().skip_while(|line| line.trim() != heading);
    assert!(
        lines.next().is_some(),
        "docs/OPERATIONS.md has no `{heading}`"
    );
    lines
        .skip_while(|line| !line.starts_with('|'))
        .take_while(|line| line.starts_with('|'))
        .skip(2) // header and separator
        .map(|line| {
            line.trim()
                .trim_matches('|')
                .split(" | ")
                .map(|cell| cell.trim().to_owned())
                .collect()
        })
        .collect()
}

fn unquote(cell: &str) -> &str {
    cell.trim_matches('`')
}

/// Maps whose keys the operator names (agents, tiers, skills, channels): documented as one key.
const FREE_MAPS: &[&str] = &[
    "auth.agent_tokens",
    "routing.priority.tiers",
    "queues[].skills",
    "rules[].skills",
    "agents[].skills",
    "agents[].capacity",
];

/// Every key path of a serialised configuration: `a.b`, `queues[].name`, `channels.twilio.<account>.numbers`.
fn key_paths(value: &Value, prefix: &str, paths: &mut BTreeMap<String, Value>) {
    match value {
        Value::Object(map) if !FREE_MAPS.contains(&prefix) => {
            // Provider accounts are named by the operator: one placeholder for all. The email
            // channel is one table, not accounts.
            let accounts = prefix.starts_with("channels.")
                && prefix.matches('.').count() == 1
                && prefix != "channels.email";
            for (key, child) in map {
                let key = if accounts { "<account>" } else { key.as_str() };
                let path = if prefix.is_empty() {
                    key.to_owned()
                } else {
                    format!("{prefix}.{key}")
                };
                key_paths(child, &path, paths);
            }
        }
        Value::Array(items) if items.iter().any(Value::is_object) => {
            for item in items {
                key_paths(item, &format!("{prefix}[]"), paths);
            }
        }
        _ => {
            paths.insert(prefix.to_owned(), value.clone());
        }
    }
}

/// The defaults with one of everything optional filled in: an account of each provider, business
/// hours and each kind of escalation step, so their keys are serialised too.
fn everything_configured() -> ConfigFile {
    let mut file: toml::Table = toml::from_str(DEFAULT_CONFIG).unwrap();
    let extra: toml::Table = toml::from_str(
        r#"
        [channels.twilio.main]
        account_sid = "AC0"
        [channels.vonage.main]
        api_key = "k"
        [channels.meta.main]
        [channels.telegram.main]
        [channels.email]
        mailboxes = ["support@example.com"]
        [channels.email.smtp]
        [channels.email.relay]
        host = "smtp.example.com"
        [channels.email.imap]
        host = "imap.example.com"
        username = "support@example.com"
        [[channels.email.dkim]]
        domain = "example.com"
        selector = "sb1"
        key_file = "/etc/switchboard/dkim.pem"
        "#,
    )
    .unwrap();
    file.insert("channels".into(), extra["channels"].clone());
    let queue = file["queues"].as_array_mut().unwrap()[0]
        .as_table_mut()
        .unwrap();
    queue.insert(
        "business_hours".into(),
        toml::Value::Table(toml::from_str("timezone = \"Europe/Paris\"").unwrap()),
    );
    file.insert(
        "outbound".into(),
        toml::Value::Table(
            toml::from_str("api_webhook_url = \"https://crm.example/hook\"").unwrap(),
        ),
    );
    toml::Value::Table(file).try_into().unwrap()
}

fn environment_name(path: &str) -> String {
    format!(
        "SWITCHBOARD__{}",
        path.replace('.', "__")
            .replace("<account>", "<ACCOUNT>")
            .to_uppercase()
    )
}

/// How a default is written in the reference: `512`, `true`, `"text"` shown as `text`, `["support"]`.
fn default_cell(value: &Value) -> Option<String> {
    match value {
        Value::String(text) if text == "********" => None,
        Value::String(text) => Some(text.clone()),
        Value::Number(_) | Value::Bool(_) => Some(value.to_string()),
        Value::Array(items) if items.iter().all(Value::is_string) => Some(value.to_string()),
        _ => None,
    }
}

#[test]
fn configuration_reference_lists_every_key_with_its_default_and_environment_name() {
    let document = operations();
    let rows = table_after(&document, "## Configuration reference");
    let documented: BTreeMap<String, Vec<String>> = rows
        .into_iter()
        .map(|cells| (unquote(&cells[0]).to_owned(), cells))
        .collect();

    let mut keys = BTreeMap::new();
    key_paths(
        &serde_json::to_value(everything_configured()).unwrap(),
        "",
        &mut keys,
    );
    // A table that is absent in one array entry and present in another: keep its keys only.
    let containers: Vec<String> = keys
        .keys()
        .filter(|key| {
            keys.keys().any(|other| {
                other.starts_with(&format!("{key}.")) || other.starts_with(&format!("{key}[]"))
            })
        })
        .cloned()
        .collect();
    for container in containers {
        keys.remove(&container);
    }
    assert!(keys.len() > 100, "{keys:?}");
    let missing: Vec<&String> = keys
        .keys()
        .filter(|key| !documented.contains_key(*key))
        .collect();
    assert!(
        missing.is_empty(),
        "keys missing from docs/OPERATIONS.md: {missing:#?}"
    );
    let unknown: Vec<&String> = documented
        .keys()
        .filter(|key| !keys.contains_key(*key))
        .collect();
    assert!(
        unknown.is_empty(),
        "documented keys that do not exist: {unknown:#?}"
    );

    for (key, cells) in &documented {
        assert_eq!(
            cells.len(),
            4,
            "{key}: key | default | environment | meaning"
        );
        let environment = &cells[2];
        if key.contains("[]") {
            assert_eq!(
                environment, "—",
                "{key}: tables in arrays are set in the file only"
            );
        } else {
            assert!(
                environment.contains(&environment_name(key)),
                "{key}: environment name {} not in `{environment}`",
                environment_name(key)
            );
        }
        assert!(!cells[3].is_empty(), "{key} has no meaning");
    }

    // Defaults: what the embedded configuration and the types give when nothing is set.
    let defaults = switchboard::config::load(None, Vec::new()).unwrap().file;
    let mut default_values = BTreeMap::new();
    key_paths(
        &serde_json::to_value(defaults).unwrap(),
        "",
        &mut default_values,
    );
    for (key, value) in default_values {
        if key.contains("[]") {
            continue; // the demo centre's queues, rules and agents are examples, not defaults
        }
        if let Some(expected) = default_cell(&value) {
            let cell = &documented[&key][1];
            assert_eq!(
                unquote(cell),
                expected,
                "{key}: documented default `{cell}`, shipped `{expected}`"
            );
        }
    }
}

#[tokio::test]
async fn metrics_catalogue_is_what_the_daemon_exports() {
    // With a broker, so that its metrics are exported too.
    let name = unique_name("ops_doc");
    let daemon = Daemon::start(&nats_config("127.0.0.1:4222", &name));
    daemon.ingest(api_message("doc-1", "c", "hello")).await;
    let exposition = daemon.metrics_text().await;
    // name -> (type, labels) as exported.
    let mut exported: BTreeMap<String, (String, BTreeSet<String>)> = BTreeMap::new();
    for line in exposition.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            exported.insert(name.to_owned(), (kind.to_owned(), BTreeSet::new()));
        }
    }
    for line in exposition.lines().filter(|line| !line.starts_with('#')) {
        let Some((series, _)) = line.split_once('{') else {
            continue;
        };
        let family = exported
            .keys()
            .find(|name| {
                series == name.as_str()
                    || ["_bucket", "_sum", "_count"]
                        .iter()
                        .any(|suffix| series.strip_suffix(suffix) == Some(name.as_str()))
            })
            .cloned()
            .unwrap();
        let labels = line.split_once('{').unwrap().1.split_once('}').unwrap().0;
        for pair in labels.split("\",") {
            let label = pair.split_once('=').unwrap().0.to_owned();
            if label != "le" {
                exported.get_mut(&family).unwrap().1.insert(label);
            }
        }
    }

    let document = operations();
    let rows = table_after(&document, "## Metrics");
    let mut documented: BTreeMap<String, (String, BTreeSet<String>)> = BTreeMap::new();
    for cells in rows {
        assert_eq!(
            cells.len(),
            4,
            "metric | type | labels | meaning: {cells:?}"
        );
        let labels = cells[2]
            .split(',')
            .map(|label| unquote(label.trim()).to_owned())
            .filter(|label| !label.is_empty() && label != "—")
            .collect();
        documented.insert(unquote(&cells[0]).to_owned(), (cells[1].clone(), labels));
    }
    assert_eq!(
        documented.keys().collect::<Vec<_>>(),
        exported.keys().collect::<Vec<_>>(),
        "the metrics catalogue must list exactly the exported families"
    );
    for (name, (kind, labels)) in &exported {
        assert_eq!(&documented[name].0, kind, "{name}'s type");
        assert_eq!(&documented[name].1, labels, "{name}'s labels");
    }
    drop(daemon);
    delete_nats_streams("127.0.0.1:4222", &name).await;
}

#[tokio::test]
async fn sqlite_online_backup_as_documented_restores_a_running_daemon_s_store() {
    let document = operations();
    let documented = "sqlite3 /var/lib/switchboard/switchboard.sqlite \".backup '/backup/switchboard-$(date +%F).sqlite'\"";
    assert!(
        document.contains(documented),
        "the backup command in docs/OPERATIONS.md changed: update this test"
    );

    let daemon = Daemon::start("");
    let (status, receipt) = daemon
        .ingest(api_message("backup-1", "c", "before the backup"))
        .await;
    assert_eq!(status, 202, "{receipt}");
    let database = daemon.dir.path().join("switchboard.sqlite");
    let backups = tempfile::tempdir().unwrap();
    let backup = backups.path().join("switchboard-backup.sqlite");
    // The documented command, against the running daemon's database.
    let output = std::process::Command::new("sqlite3")
        .arg(&database)
        .arg(format!(".backup '{}'", backup.display()))
        .output()
        .expect("sqlite3: install Debian's sqlite3 package (scripts/test does)");
    assert!(output.status.success(), "{output:?}");
    // The daemon keeps running and writing meanwhile.
    let (status, receipt) = daemon
        .ingest(api_message("backup-2", "d", "after the backup"))
        .await;
    assert_eq!(status, 202, "{receipt}");
    drop(daemon);

    // Restore: a daemon on the backup has what was stored before it, and not what came after.
    let restored = Daemon::start_on_store(&format!("path = \"{}\"", backup.display()));
    let conversations = restored.conversations().await;
    assert_eq!(conversations.len(), 1, "{conversations:?}");
    let (status, again) = restored
        .ingest(api_message("backup-1", "c", "before the backup"))
        .await;
    assert!(status < 300, "{status} {again}");
    assert_eq!(
        again["duplicate"], true,
        "a redelivery of a backed-up message is deduplicated: {again}"
    );
}
