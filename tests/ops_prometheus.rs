//! The monitoring kit checked with the real Prometheus tools (Debian's `prometheus` package, which
//! `scripts/test` installs): the rules pass `promtool check rules` and their unit tests, the
//! daemon's `/metrics` passes `promtool check metrics`, and a real Prometheus scraping the running
//! daemon sees the expected series after known traffic and accepts every query of the dashboard
//! and of the rules, each naming only metrics the daemon exports.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use common::{
    AgentSocket, Daemon, api_message, delete_nats_streams, eventually, nats_config, unique_name,
};
use serde_json::{Value, json};

const NATS: &str = "127.0.0.1:4222";

fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

/// Runs a Prometheus tool; a missing tool fails the test with what to install.
fn run(command: &mut Command) -> Output {
    let program = command.get_program().to_string_lossy().into_owned();
    command.output().unwrap_or_else(|error| {
        panic!("cannot run {program} ({error}): install Debian's prometheus package (scripts/test does)")
    })
}

fn assert_success(output: &Output, what: &str) {
    assert!(
        output.status.success(),
        "{what} failed ({}):\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The rules file parsed (YAML), for the names and expressions it holds.
fn alert_rules() -> Value {
    let text = std::fs::read_to_string(repo_path("deploy/prometheus/alerts.yml")).unwrap();
    serde_yaml_ng::from_str(&text).unwrap()
}

fn rules_of(rules: &Value) -> Vec<Value> {
    rules["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|group| group["rules"].as_array().unwrap().clone())
        .collect()
}

#[test]
fn alert_rules_pass_promtool_and_their_unit_tests() {
    let check = run(Command::new("promtool")
        .args(["check", "rules"])
        .arg(repo_path("deploy/prometheus/alerts.yml")));
    assert_success(&check, "promtool check rules");
    // `test rules` resolves alerts.yml relative to the test file.
    let unit = run(Command::new("promtool")
        .args(["test", "rules"])
        .arg(repo_path("deploy/prometheus/alerts_test.yml")));
    assert_success(&unit, "promtool test rules");
    assert!(
        String::from_utf8_lossy(&unit.stdout).contains("SUCCESS"),
        "{unit:?}"
    );
}

#[test]
fn every_alert_is_the_issue_s_list_with_a_unit_test_and_a_runbook() {
    let rules = rules_of(&alert_rules());
    let alerts: Vec<&Value> = rules
        .iter()
        .filter(|rule| rule["alert"].is_string())
        .collect();
    let names: BTreeSet<&str> = alerts
        .iter()
        .map(|rule| rule["alert"].as_str().unwrap())
        .collect();
    let expected = BTreeSet::from([
        "SwitchboardSlaBreachRateHigh",
        "SwitchboardOldestWaitOverSla",
        "SwitchboardWaitingWithoutAgents",
        "SwitchboardOutboxBacklogGrowing",
        "SwitchboardBrokerDisconnected",
        "SwitchboardStoreCommitSlow",
        "SwitchboardDeliveryFailures",
        "SwitchboardInstanceDown",
    ]);
    assert_eq!(names, expected);
    let recorded: BTreeSet<&str> = rules
        .iter()
        .filter_map(|rule| rule["record"].as_str())
        .collect();
    for record in [
        "queue:switchboard_service_level:ratio_rate5m",
        "queue:switchboard_answer_wait_seconds:avg_rate5m",
    ] {
        assert!(recorded.contains(record), "recording rule {record}");
    }

    let unit_tests: Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(repo_path("deploy/prometheus/alerts_test.yml")).unwrap(),
    )
    .unwrap();
    // (alert, whether the case expects it to fire) for every alert test case.
    let cases: Vec<(String, bool)> = unit_tests["tests"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|test| {
            test["alert_rule_test"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .map(|case| {
            let fires = case["exp_alerts"]
                .as_array()
                .is_some_and(|alerts| !alerts.is_empty());
            (case["alertname"].as_str().unwrap().to_owned(), fires)
        })
        .collect();
    let operations = std::fs::read_to_string(repo_path("docs/OPERATIONS.md")).unwrap();
    let headings: BTreeSet<String> = operations
        .lines()
        .filter(|line| line.starts_with('#'))
        .map(|line| line.trim_start_matches('#').trim().to_lowercase())
        .collect();
    for alert in alerts {
        let name = alert["alert"].as_str().unwrap();
        for fires in [true, false] {
            assert!(
                cases.contains(&(name.to_owned(), fires)),
                "alerts_test.yml has no case where {name} {}",
                if fires { "fires" } else { "stays silent" }
            );
        }
        let runbook = alert["annotations"]["runbook"].as_str().unwrap_or_default();
        assert_eq!(
            runbook,
            format!("docs/OPERATIONS.md#{}", name.to_lowercase()),
            "{name}'s runbook annotation"
        );
        assert!(
            headings.contains(&name.to_lowercase()),
            "docs/OPERATIONS.md has no `### {name}` section (the runbook)"
        );
        for annotation in ["summary", "description"] {
            assert!(
                alert["annotations"][annotation].is_string(),
                "{name} has no {annotation}"
            );
        }
        assert!(alert["labels"]["severity"].is_string(), "{name} severity");
    }
}

#[test]
fn compose_prometheus_configuration_passes_promtool() {
    let check = run(Command::new("promtool")
        .args(["check", "config"])
        .arg(repo_path("deploy/prometheus/prometheus.yml")));
    assert_success(&check, "promtool check config");
}

/// Known traffic: alice goes available and accepts two customers' conversations; one message is
/// sent twice (a provider retry). Alice's desktop is returned: she stays connected (available).
async fn known_traffic(daemon: &Daemon) -> AgentSocket {
    let mut alice = daemon.agent_socket("alice").await;
    let ack = alice
        .command(json!({ "type": "presence", "presence": "available" }))
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    for (id, customer) in [("ops-1", "+14155550101"), ("ops-2", "+14155550102")] {
        let (status, receipt) = daemon.ingest(api_message(id, customer, "hello")).await;
        assert_eq!(status, 202, "{receipt}");
        alice.accept_next_offer().await;
    }
    let (status, receipt) = daemon
        .ingest(api_message("ops-1", "+14155550101", "hello"))
        .await;
    assert!(status < 300, "{status} {receipt}");
    assert_eq!(receipt["duplicate"], true, "{receipt}");
    alice
}

/// Sample names in an exposition (`name` of `name{labels} value`).
fn sample_names(exposition: &str) -> BTreeSet<String> {
    exposition
        .lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .map(|line| line.split(['{', ' ']).next().unwrap_or_default().to_owned())
        .collect()
}

#[tokio::test]
async fn daemon_metrics_pass_promtool_check_metrics() {
    // With a broker, so that its metrics are exported and checked too.
    let name = unique_name("ops_lint");
    let daemon = Daemon::start(&nats_config(NATS, &name));
    let _alice = known_traffic(&daemon).await;
    let exposition = daemon.metrics_text().await;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool: install Debian's prometheus package (scripts/test does)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(exposition.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert_success(&output, "promtool check metrics");
    // Lint findings are printed even when promtool exits 0 on some versions: there must be none.
    let findings = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        findings.trim().is_empty(),
        "promtool check metrics:\n{findings}"
    );
    // The histograms were observed, so promtool saw their buckets, not only their names.
    for sample in [
        "switchboard_queue_answer_wait_seconds_count{queue=\"support\"} 2",
        "switchboard_queue_answered_total{queue=\"support\",within_sla=\"true\"} 2",
    ] {
        assert!(exposition.contains(sample), "{sample} in\n{exposition}");
    }
    drop(daemon);
    delete_nats_streams(NATS, &name).await;
}

/// A real Prometheus on a free loopback port with a throwaway configuration and data directory;
/// killed on drop.
struct Prometheus {
    child: Child,
    base: String,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Scrapes `target` (host:port) every second as job `switchboard`, with the shipped rules.
    async fn start(target: &str) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: switchboard\n    static_configs:\n      - targets: [\"{target}\"]\n",
                repo_path("deploy/prometheus/alerts.yml").display()
            ),
        )
        .unwrap();
        let http = reqwest::Client::new();
        // A port that was free a moment ago; if another process takes it first, Prometheus exits
        // and the next port is tried.
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let mut child = Command::new("prometheus")
                .arg(format!("--config.file={}", config.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path().join("data").display()
                ))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .arg("--log.level=warn")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("prometheus: install Debian's prometheus package (scripts/test does)");
            let base = format!("http://127.0.0.1:{port}");
            let ready = eventually(60, "prometheus to be ready or to exit", || {
                let exited = child.try_wait().unwrap().is_some();
                let http = http.clone();
                let url = format!("{base}/-/ready");
                async move {
                    if exited {
                        return Some(false);
                    }
                    let response = http.get(url).send().await.ok()?;
                    response.status().is_success().then_some(true)
                }
            })
            .await;
            if ready {
                return Prometheus {
                    child,
                    base,
                    http,
                    _dir: dir,
                };
            }
        }
        panic!("prometheus did not start on a free loopback port");
    }

    /// `/api/v1/query` at the current time: the whole answer (status, data or error).
    async fn query(&self, expression: &str) -> Value {
        self.http
            .get(format!("{}/api/v1/query", self.base))
            .query(&[("query", expression)])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// The single value an instant query returns, once it returns exactly one series.
    async fn value(&self, expression: &str) -> Option<f64> {
        let answer = self.query(expression).await;
        let result = answer["data"]["result"].as_array()?;
        if result.len() != 1 {
            return None;
        }
        result[0]["value"][1].as_str()?.parse().ok()
    }

    /// Polls until `expression` has the value `expected` (fails the test after 30 s).
    async fn expect_value(&self, expression: &str, expected: f64) {
        eventually(30, &format!("{expression} == {expected}"), || async {
            (self.value(expression).await == Some(expected)).then_some(())
        })
        .await;
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every PromQL expression of the dashboard's panels, with Grafana's variables given values.
fn dashboard_expressions() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(repo_path("deploy/grafana/switchboard.json")).unwrap();
    let dashboard: Value = serde_json::from_str(&text).unwrap();
    let mut expressions = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expression = target["expr"].as_str().unwrap();
            expressions.push((
                format!("dashboard panel `{}`", panel["title"].as_str().unwrap()),
                expression
                    .replace("$__rate_interval", "1m")
                    .replace("$queue", ".*"),
            ));
        }
    }
    expressions
}

/// The metric names an expression reads (`switchboard_*`, not recording rules' `queue:...`).
fn metric_names(expression: &str) -> BTreeSet<String> {
    let pattern = regex::Regex::new(r"(?:^|[^a-zA-Z0-9_:])(switchboard_[a-zA-Z0-9_]+)").unwrap();
    pattern
        .captures_iter(expression)
        .map(|capture| capture[1].to_owned())
        .collect()
}

#[tokio::test]
async fn prometheus_scrapes_the_daemon_and_every_shipped_query_works() {
    // NATS is configured so that the broker metrics exist; its names are this test's own.
    let name = unique_name("ops");
    let daemon = Daemon::start(&nats_config(NATS, &name));
    let target = daemon.base.trim_start_matches("http://").to_owned();
    let prometheus = Prometheus::start(&target).await;
    prometheus
        .expect_value("up{job=\"switchboard\"}", 1.0)
        .await;

    let alice = known_traffic(&daemon).await;

    // The series and values after the known traffic, as Prometheus scraped them.
    for (expression, expected) in [
        ("switchboard_messages_received_total{channel=\"api\"}", 2.0),
        ("switchboard_messages_duplicate_total{channel=\"api\"}", 1.0),
        ("switchboard_offers_total{result=\"offered\"}", 2.0),
        ("switchboard_offers_total{result=\"accepted\"}", 2.0),
        (
            "switchboard_queue_answered_total{queue=\"support\",within_sla=\"true\"}",
            2.0,
        ),
        (
            "switchboard_queue_answered_total{queue=\"support\",within_sla=\"false\"}",
            0.0,
        ),
        (
            "switchboard_queue_answer_wait_seconds_count{queue=\"support\"}",
            2.0,
        ),
        ("switchboard_conversations{state=\"assigned\"}", 2.0),
        ("switchboard_conversations{state=\"waiting\"}", 0.0),
        ("switchboard_agents{presence=\"available\"}", 1.0),
        ("switchboard_agent_load_conversations", 2.0),
        ("switchboard_agent_capacity_conversations", 6.0),
        ("switchboard_queue_waiting{queue=\"support\"}", 0.0),
        (
            "switchboard_queue_sla_target_seconds{queue=\"support\"}",
            60.0,
        ),
        ("switchboard_queue_agents_available{queue=\"support\"}", 1.0),
        ("switchboard_bus_connected{bus=\"nats\"}", 1.0),
        ("switchboard_ready", 1.0),
        ("switchboard_cluster_leader", 1.0),
        // The recording rules, evaluated by this Prometheus: both answers within the SLA.
        (
            "queue:switchboard_service_level:ratio_rate5m{queue=\"support\"}",
            1.0,
        ),
        ("switchboard_ingest_to_offer_seconds_count", 2.0),
    ] {
        prometheus.expect_value(expression, expected).await;
    }
    let average_wait = eventually(30, "the average speed of answer", || async {
        prometheus
            .value("queue:switchboard_answer_wait_seconds:avg_rate5m{queue=\"support\"}")
            .await
            .filter(|value| value.is_finite())
    })
    .await;
    assert!(
        (0.0..10.0).contains(&average_wait),
        "alice answered at once: {average_wait}"
    );

    // Every expression shipped: valid PromQL for this Prometheus, reading only exported metrics.
    let exported = sample_names(&daemon.metrics_text().await);
    let mut expressions = dashboard_expressions();
    assert!(expressions.len() >= 15, "{expressions:?}");
    for rule in rules_of(&alert_rules()) {
        let name = rule["alert"]
            .as_str()
            .or_else(|| rule["record"].as_str())
            .unwrap();
        expressions.push((
            format!("rule {name}"),
            rule["expr"].as_str().unwrap().to_owned(),
        ));
    }
    for (place, expression) in &expressions {
        let names = metric_names(expression);
        assert!(
            !names.is_empty() || expression.contains("up{"),
            "{place} reads no switchboard metric: {expression}"
        );
        for name in &names {
            assert!(
                exported.contains(name),
                "{place} reads {name}, which /metrics does not export"
            );
        }
        let answer = prometheus.query(expression).await;
        assert_eq!(
            answer["status"], "success",
            "{place}: {expression}\n{answer}"
        );
    }
    // Every dashboard panel has data to show after the traffic (at least one series).
    for (place, expression) in dashboard_expressions() {
        eventually(30, &format!("{place} to have data"), || async {
            let answer = prometheus.query(&expression).await;
            answer["data"]["result"]
                .as_array()
                .is_some_and(|result| !result.is_empty())
                .then_some(())
        })
        .await;
    }

    alice.close().await;
    drop(prometheus);
    drop(daemon);
    delete_nats_streams(NATS, &name).await;
}
