//! The docker-compose deployment and the Grafana files, checked without a Docker engine: the compose
//! file validates against the Compose Specification's JSON Schema (deploy/compose-spec.schema.json),
//! its switchboard configuration and environment pass the checks `switchboard run` does and agree
//! with the Kubernetes manifests, every file it mounts exists, and Grafana's provisioning points at
//! the dashboard, which has the panels operators expect.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_json::Value;

fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

fn read(relative: &str) -> String {
    let path = repo_path(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|error| panic!("{}: {error}", path.display()))
}

fn yaml(relative: &str) -> Value {
    serde_yaml_ng::from_str(&read(relative)).unwrap_or_else(|error| panic!("{relative}: {error}"))
}

fn compose() -> Value {
    yaml("deploy/docker-compose.yml")
}

#[test]
fn compose_file_validates_against_the_compose_specification() {
    let schema: Value = serde_json::from_str(&read("deploy/compose-spec.schema.json")).unwrap();
    let validator = jsonschema::validator_for(&schema).expect("the Compose schema compiles");
    let compose = compose();
    let errors: Vec<String> = validator
        .iter_errors(&compose)
        .map(|error| format!("{} at {}", error, error.instance_path()))
        .collect();
    assert!(errors.is_empty(), "{errors:#?}");

    // The schema is really applied: a misspelt key is refused.
    let mut broken = compose;
    broken["services"]["switchboard"]["enviroment"] = serde_json::json!({});
    assert!(
        !validator.is_valid(&broken),
        "the schema refuses unknown keys"
    );
}

#[test]
fn compose_runs_every_part_with_health_checks_and_no_secret_in_the_file() {
    let compose = compose();
    let services = compose["services"].as_object().unwrap();
    let names: BTreeSet<&str> = services.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        BTreeSet::from([
            "switchboard",
            "postgres",
            "nats",
            "rabbitmq",
            "prometheus",
            "grafana"
        ])
    );
    // switchboard starts once its store and brokers answer their health checks.
    let switchboard = &services["switchboard"];
    for dependency in ["postgres", "nats", "rabbitmq"] {
        assert_eq!(
            switchboard["depends_on"][dependency]["condition"], "service_healthy",
            "{dependency}"
        );
        assert!(
            services[dependency]["healthcheck"]["test"].is_array(),
            "{dependency} has a health check"
        );
    }
    // NATS runs with JetStream.
    let nats_command = services["nats"]["command"].as_array().unwrap();
    assert!(nats_command.iter().any(|argument| argument == "-js"));
    // The image is the repository's Dockerfile, listening on the port the k8s Service uses.
    assert_eq!(switchboard["build"]["dockerfile"], "Dockerfile");
    assert!(
        repo_path("deploy")
            .join(switchboard["build"]["context"].as_str().unwrap())
            .join("Dockerfile")
            .exists()
    );
    assert_eq!(switchboard["ports"][0], "8080:8080");
    // Every secret is required from the environment: `${NAME:?...}`, never a value in the file.
    for (service, definition) in services {
        for (key, value) in definition["environment"].as_object().into_iter().flatten() {
            let secret = key.contains("PASSWORD") || key.contains("TOKEN") || key.ends_with("_URL");
            if secret && let Some(value) = value.as_str() {
                assert!(
                    value.contains("${") && value.contains(":?"),
                    "{service}.{key} must come from the environment: {value}"
                );
            }
        }
    }
    // Every file mounted from the repository exists.
    for (service, definition) in services {
        for volume in definition["volumes"].as_array().into_iter().flatten() {
            let source = volume.as_str().unwrap().split(':').next().unwrap();
            if source.starts_with("./") {
                assert!(
                    repo_path("deploy").join(source).exists(),
                    "{service} mounts {source}, which is not in deploy/"
                );
            }
        }
    }
}

/// The `KEY: value` environment of the compose switchboard service with each `${VAR:?...}` given a
/// placeholder, as `docker compose` would after interpolation.
fn compose_environment() -> Vec<(String, String)> {
    let compose = compose();
    let pattern = regex::Regex::new(r"\$\{([A-Z_]+):\?[^}]*\}").unwrap();
    compose["services"]["switchboard"]["environment"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(key, value)| {
            let value = value.as_str().unwrap();
            let interpolated = pattern.replace_all(value, "placeholder-$1");
            (key.clone(), interpolated.into_owned())
        })
        .collect()
}

#[test]
fn compose_switchboard_configuration_loads_and_matches_kubernetes() {
    let environment = compose_environment();
    let settings = switchboard::config::load(
        Some(&repo_path("deploy/compose/switchboard.toml")),
        environment.clone(),
    )
    .unwrap();
    assert_eq!(settings.listen.to_string(), "0.0.0.0:8080");
    assert!(!settings.file.auth.demo_tokens);
    assert!(settings.bus.nats.enabled && settings.bus.amqp.enabled);
    assert!(
        matches!(&settings.store, switchboard::config::StoreSettings::Postgres(options) if options.schema == "switchboard"),
        "{:?}",
        settings.store
    );
    assert_eq!(settings.cluster.node_id, "switchboard-0");
    assert!(settings.auth.agent_tokens.contains_key("alice"));

    // The same secrets as the highly available Kubernetes deployment, by the same names.
    let secret = read("deploy/k8s-ha/secret.yaml");
    for line in secret.lines() {
        if let Some((key, _)) = line.trim().split_once(": ")
            && key.starts_with("SWITCHBOARD__")
        {
            assert!(
                environment.iter().any(|(name, _)| name == key),
                "compose does not set {key}, which k8s-ha/secret.yaml does"
            );
        }
    }
    // Same store schema, log format and grace as k8s-ha/configmap.yaml.
    let configmap = read("deploy/k8s-ha/configmap.yaml");
    let compose_toml = read("deploy/compose/switchboard.toml");
    for setting in [
        "schema = \"switchboard\"",
        "format = \"json\"",
        "listen = \"0.0.0.0:8080\"",
        "shutdown_grace_seconds = 10",
    ] {
        assert!(configmap.contains(setting), "k8s-ha: {setting}");
        assert!(compose_toml.contains(setting), "compose: {setting}");
    }
    // Prometheus scrapes switchboard as the job the alerts expect, like the pod annotations say.
    let prometheus = yaml("deploy/prometheus/prometheus.yml");
    let job = &prometheus["scrape_configs"][0];
    assert_eq!(job["job_name"], "switchboard");
    assert_eq!(job["static_configs"][0]["targets"][0], "switchboard:8080");
    assert!(read("deploy/k8s/deployment.yaml").contains("prometheus.io/port: \"8080\""));
}

#[test]
fn kubernetes_prometheus_rule_carries_the_same_rules() {
    let rule = yaml("deploy/k8s/prometheusrule.yaml");
    assert_eq!(rule["kind"], "PrometheusRule");
    let alerts = yaml("deploy/prometheus/alerts.yml");
    assert_eq!(
        rule["spec"]["groups"], alerts["groups"],
        "deploy/k8s/prometheusrule.yaml's groups must equal deploy/prometheus/alerts.yml's"
    );
    assert!(read("deploy/k8s/kustomization.yaml").contains("prometheusrule.yaml"));
}

#[test]
fn grafana_is_provisioned_with_the_dashboard() {
    let datasources = yaml("deploy/grafana/provisioning/datasources/prometheus.yml");
    assert_eq!(datasources["datasources"][0]["type"], "prometheus");
    assert_eq!(
        datasources["datasources"][0]["url"],
        "http://prometheus:9090"
    );
    let providers = yaml("deploy/grafana/provisioning/dashboards/switchboard.yml");
    let path = providers["providers"][0]["options"]["path"]
        .as_str()
        .unwrap();
    let compose = compose();
    let mounts: Vec<&str> = compose["services"]["grafana"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|volume| volume.as_str().unwrap())
        .collect();
    assert!(
        mounts.contains(&format!("./grafana/switchboard.json:{path}/switchboard.json:ro").as_str()),
        "the dashboard is mounted where the provider reads: {mounts:?}"
    );
    assert!(mounts.contains(&"./grafana/provisioning:/etc/grafana/provisioning:ro"));
}

#[test]
fn dashboard_has_the_operators_panels() {
    let dashboard: Value = serde_json::from_str(&read("deploy/grafana/switchboard.json")).unwrap();
    assert_eq!(dashboard["uid"], "switchboard");
    let panels = dashboard["panels"].as_array().unwrap();
    let titles: BTreeSet<&str> = panels
        .iter()
        .map(|panel| panel["title"].as_str().unwrap())
        .collect();
    for title in [
        // rows
        "Queues",
        "Agents",
        "Channels",
        "Internals",
        // queues
        "Waiting conversations",
        "Oldest wait",
        "Service level",
        "Average speed of answer",
        // agents
        "Agents by presence",
        "Occupancy",
        // channels
        "Inbound messages",
        "Outbound replies delivered",
        "Failed deliveries",
        // internals
        "Routing decision latency",
        "Ingest to offer latency",
        "Outbox backlog",
        "Store commit latency",
    ] {
        assert!(titles.contains(title), "no panel `{title}`: {titles:?}");
    }
    let mut ids = BTreeSet::new();
    for panel in panels {
        assert!(
            ids.insert(panel["id"].as_u64().unwrap()),
            "duplicate panel id"
        );
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(
            panel["datasource"]["uid"], "${datasource}",
            "{}: panels use the datasource variable",
            panel["title"]
        );
        assert!(
            !panel["targets"].as_array().unwrap().is_empty(),
            "{} has a query",
            panel["title"]
        );
    }
}
