//! The daemon on the PostgreSQL store, through the real binary: it runs and stores on PostgreSQL,
//! and a wrong URL, database or unreachable server fails `check-config` and `run` with a clear
//! message and a non-zero exit, never printing the password.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Command, Output};

use common::{Daemon, api_message, binary, write_config_with_store};
use ulid::Ulid;

/// The test database (the machine's PostgreSQL unless `SWITCHBOARD_TEST_POSTGRES_URL` says
/// otherwise).
fn postgres_url() -> String {
    std::env::var("SWITCHBOARD_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

const PASSWORD: &str = "s3cret-db-password";

/// Runs `switchboard COMMAND --config FILE` with `store` as the `[store]` keys and the password
/// in the environment.
fn run_with_store(command: &str, store: &str) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config_with_store(dir.path(), "", store, "");
    Command::new(binary())
        .arg(command)
        .arg("--config")
        .arg(config)
        .env("SWITCHBOARD__STORE__PASSWORD", PASSWORD)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

fn postgres_store(url: &str, schema: &str) -> String {
    format!("backend = \"postgres\"\nurl = \"{url}\"\nschema = \"{schema}\"\npool_size = 3")
}

async fn admin_client() -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(&postgres_url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
}

#[tokio::test]
async fn the_daemon_stores_on_postgres() {
    let schema = format!("sb_test_{}", Ulid::new().to_string().to_lowercase());
    let mut daemon = Daemon::start_on_store(&postgres_store(&postgres_url(), &schema));
    let (status, stored) = daemon
        .ingest(api_message("pg-1", "customer-1", "hello from postgres"))
        .await;
    assert_eq!(status, 202, "{stored}");
    let (again, duplicate) = daemon
        .ingest(api_message("pg-1", "customer-1", "hello from postgres"))
        .await;
    assert_eq!(again, 200, "{duplicate}");
    assert_eq!(duplicate["message_id"], stored["message_id"]);
    assert!(daemon.terminate().success());

    let client = admin_client().await;
    let rows = client
        .query(
            &format!("SELECT id FROM {schema}.messages WHERE provider_message_id = 'pg-1'"),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(
        rows[0].get::<_, String>(0),
        stored["message_id"].as_str().unwrap()
    );
    client
        .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
        .await
        .unwrap();
}

#[test]
fn check_config_connects_and_masks_secrets() {
    let schema = "sb_test_check_config_never_created";
    let url = postgres_url().replace("postgres://postgres@", "postgres://postgres:url-pw@");
    let output = run_with_store("check-config", &postgres_store(&url, schema));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("backend = \"postgres\""), "{stdout}");
    for secret in [PASSWORD, "url-pw"] {
        assert!(
            !stdout.contains(secret) && !stderr.contains(secret),
            "{stdout}\n{stderr}"
        );
    }
}

#[test]
fn a_wrong_database_or_server_fails_check_config_and_run() {
    let wrong_database = postgres_url().replace("/test", "/no_such_database");
    let unreachable = "postgres://postgres@127.0.0.1:1/test";
    let cases = [
        (wrong_database.as_str(), "no_such_database"),
        (unreachable, "127.0.0.1:1"),
        (
            "postgres://postgres@127.0.0.1:5432/test?port=abc",
            "store.url",
        ),
    ];
    for (url, expected) in cases {
        for command in ["check-config", "run"] {
            let output = run_with_store(command, &postgres_store(url, "sb_test_never_created"));
            let stderr = String::from_utf8_lossy(&output.stderr);
            let stdout = String::from_utf8_lossy(&output.stdout);
            assert!(
                !output.status.success(),
                "{command} {url}: {stdout}\n{stderr}"
            );
            assert!(stderr.contains(expected), "{command} {url}: {stderr}");
            assert!(
                !stderr.contains(PASSWORD) && !stdout.contains(PASSWORD),
                "{stderr}"
            );
        }
    }
}
