//! The shipped deployment files stay loadable: the Kubernetes ConfigMap and Secret keys, and the
//! container image's environment, pass the same configuration checks `switchboard run` does.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

fn repo_file(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|error| panic!("{}: {error}", path.display()))
}

/// The `switchboard.toml: |` block of a ConfigMap, unindented.
fn configmap_toml_of(file: &str) -> String {
    let yaml = repo_file(file);
    let mut lines = yaml
        .lines()
        .skip_while(|line| line.trim() != "switchboard.toml: |");
    assert!(
        lines.next().is_some(),
        "configmap.yaml has no switchboard.toml"
    );
    lines
        .take_while(|line| line.is_empty() || line.starts_with("    "))
        .map(|line| line.get(4..).unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

fn configmap_toml() -> String {
    configmap_toml_of("deploy/k8s/configmap.yaml")
}

/// The `SWITCHBOARD__*` keys of the Secret's stringData, with their placeholder values.
fn secret_environment() -> Vec<(String, String)> {
    secret_environment_of("deploy/k8s/secret.yaml")
}

fn secret_environment_of(file: &str) -> Vec<(String, String)> {
    repo_file(file)
        .lines()
        .filter_map(|line| {
            let (key, value) = line.trim().split_once(": ")?;
            key.starts_with("SWITCHBOARD__")
                .then(|| (key.to_owned(), value.trim_matches('"').to_owned()))
        })
        .collect()
}

#[test]
fn kubernetes_configmap_and_secret_load() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("switchboard.toml");
    std::fs::write(&file, configmap_toml()).unwrap();
    let environment = secret_environment();
    assert_eq!(environment.len(), 3, "{environment:?}");

    let settings = switchboard::config::load(Some(&file), environment).unwrap();
    assert!(!settings.listen.ip().is_loopback());
    assert_eq!(
        settings.listen.port(),
        8080,
        "the Service and probes use 8080"
    );
    assert!(!settings.file.auth.demo_tokens);
    assert!(
        matches!(
            &settings.store,
            switchboard::config::StoreSettings::Sqlite { path, .. }
                if path == Path::new("/var/lib/switchboard/switchboard.sqlite")
        ),
        "the store must be on the PersistentVolumeClaim: {:?}",
        settings.store
    );
    assert_eq!(settings.auth.ingest_tokens.len(), 2);
    assert!(settings.auth.agent_tokens.contains_key("alice"));
    assert!(
        !settings
            .auth
            .admin_tokens
            .iter()
            .any(|t| t.matches("demo-admin-token")),
        "no demo token off loopback"
    );
}

#[test]
fn highly_available_deployment_runs_three_instances_on_postgres() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("switchboard.toml");
    std::fs::write(&file, configmap_toml_of("deploy/k8s-ha/configmap.yaml")).unwrap();
    let mut environment = secret_environment_of("deploy/k8s-ha/secret.yaml");
    // The Deployment sets the node id from the pod's name.
    environment.push((
        "SWITCHBOARD__CLUSTER__NODE_ID".into(),
        "switchboard-7d9f-abcde".into(),
    ));
    let settings = switchboard::config::load(Some(&file), environment).unwrap();
    assert!(
        matches!(
            &settings.store,
            switchboard::config::StoreSettings::Postgres(options)
                if options.schema == "switchboard"
        ),
        "{:?}",
        settings.store
    );
    assert_eq!(settings.cluster.node_id, "switchboard-7d9f-abcde");
    assert!(settings.cluster.lease_ttl >= 2 * settings.cluster.renew_every);
    assert!(
        !settings.store.describe().contains("REPLACE-ME"),
        "the password is never shown"
    );

    let deployment = repo_file("deploy/k8s-ha/deployment.yaml");
    assert!(deployment.contains("replicas: 3"), "{deployment}");
    assert!(deployment.contains("SWITCHBOARD__CLUSTER__NODE_ID"));
    assert!(
        !deployment.contains("persistentVolumeClaim"),
        "the instances share the database, not a volume"
    );
    let budget = repo_file("deploy/k8s-ha/pdb.yaml");
    assert!(budget.contains("kind: PodDisruptionBudget"));
    assert!(budget.contains("minAvailable: 2"));
    let kustomization = repo_file("deploy/k8s-ha/kustomization.yaml");
    for resource in [
        "deployment.yaml",
        "pdb.yaml",
        "postgres-service.yaml",
        "configmap.yaml",
        "service.yaml",
    ] {
        assert!(kustomization.contains(resource), "{resource}");
    }
}

#[test]
fn container_image_environment_loads() {
    let dockerfile = repo_file("Dockerfile");
    let environment: Vec<(String, String)> = dockerfile
        .lines()
        .filter_map(|line| {
            let assignment = line
                .trim()
                .trim_start_matches("ENV ")
                .trim_end_matches(" \\");
            let (key, value) = assignment.split_once('=')?;
            key.starts_with("SWITCHBOARD__")
                .then(|| (key.to_owned(), value.to_owned()))
        })
        .collect();
    assert_eq!(environment.len(), 3, "{environment:?}");

    let settings = switchboard::config::load(None, environment).unwrap();
    assert_eq!(settings.listen.to_string(), "0.0.0.0:8080");
    assert!(!settings.file.auth.demo_tokens);
    assert!(settings.auth.ingest_tokens.is_empty());
}
