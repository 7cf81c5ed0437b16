//! The OpenAPI document against the real binary: every route the daemon serves is documented, every
//! documented route is served, and every answer's body validates against its documented schema.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{ADMIN, Daemon, INGEST, agent_token, api_message};
use serde_json::{Value, json};

/// `(path, methods)` of every `.route(...)` in the HTTP module's source.
fn served_routes() -> Vec<(String, Vec<String>)> {
    let source = include_str!("../src/daemon/http.rs");
    let mut routes = Vec::new();
    for part in source.split(".route(").skip(1) {
        let Some(path) = part.split('"').nth(1) else {
            continue;
        };
        // The route's handlers end at the closing parenthesis of `.route(`.
        let mut depth = 1;
        let mut end = part.len();
        for (index, character) in part.char_indices() {
            match character {
                '(' => depth += 1,
                ')' => {
                    depth -= 1;
                    if depth == 0 {
                        end = index;
                        break;
                    }
                }
                _ => {}
            }
        }
        let handlers = &part[..end];
        let methods = ["get", "post", "put", "delete", "patch"]
            .into_iter()
            .filter(|method| {
                handlers.contains(&format!(" {method}("))
                    || handlers.contains(&format!(".{method}("))
            })
            .map(str::to_owned)
            .collect();
        routes.push((path.to_owned(), methods));
    }
    routes
}

/// Does the documented path fall under the served pattern? A `{param}` in the pattern matches any
/// one segment (the daemon's `{action}` route serves the documented `/accept`, `/reject`...).
fn covered_by(documented: &str, pattern: &str) -> bool {
    let documented: Vec<&str> = documented.split('/').collect();
    let pattern: Vec<&str> = pattern.split('/').collect();
    documented.len() == pattern.len()
        && documented
            .iter()
            .zip(&pattern)
            .all(|(doc, pat)| doc == pat || pat.starts_with('{'))
}

/// Checks `body` against the documented schema of `path` / `method` / `status`.
fn assert_documented(document: &Value, path: &str, method: &str, status: u16, body: &Value) {
    let responses = &document["paths"][path][method]["responses"];
    let mut response = &responses[status.to_string()];
    assert!(
        !response.is_null(),
        "{method} {path} answered {status}, which is not documented"
    );
    if let Some(reference) = response["$ref"].as_str() {
        let name = reference.trim_start_matches("#/components/responses/");
        response = &document["components"]["responses"][name];
    }
    let schema = &response["content"]["application/json"]["schema"];
    assert!(
        schema.is_object(),
        "{method} {path} {status} has no JSON schema"
    );
    // The whole document is the root resource, so `#/components/schemas/...` references resolve.
    let mut root = document.clone();
    for (key, value) in schema.as_object().unwrap() {
        root[key] = value.clone();
    }
    let validator = jsonschema::validator_for(&root)
        .unwrap_or_else(|error| panic!("{method} {path} {status}: bad schema: {error}"));
    let problems: Vec<String> = validator
        .iter_errors(body)
        .map(|error| format!("{error} at {}", error.instance_path()))
        .collect();
    assert!(
        problems.is_empty(),
        "{method} {path} {status}: {body} does not match its schema: {problems:?}"
    );
}

#[tokio::test]
async fn every_route_is_documented_and_every_documented_route_is_served() {
    let daemon = Daemon::start("");
    let (status, document) = daemon.get("/v1/openapi.json", "").await;
    assert_eq!(status, 200);
    assert_eq!(document["openapi"], "3.1.0");
    let paths = document["paths"].as_object().unwrap();

    let served = served_routes();
    assert!(served.len() >= 15, "found only {served:?}");
    for (pattern, methods) in &served {
        assert!(!methods.is_empty(), "no method found for {pattern}");
        for method in methods {
            assert!(
                paths
                    .iter()
                    .any(|(path, item)| covered_by(path, pattern) && item[method].is_object()),
                "{method} {pattern} is served but not documented"
            );
        }
    }
    for (path, item) in paths {
        for method in item.as_object().unwrap().keys() {
            assert!(
                served
                    .iter()
                    .any(|(pattern, methods)| covered_by(path, pattern)
                        && methods.contains(method)),
                "{method} {path} is documented but not served"
            );
        }
    }
}

#[tokio::test]
async fn every_answer_matches_its_documented_schema() {
    let daemon = Daemon::start("");
    let (_, document) = daemon.get("/v1/openapi.json", "").await;
    let check = |path: &str, method: &str, status: u16, body: &Value| {
        assert_documented(&document, path, method, status, body);
    };
    let alice = agent_token("alice");

    let (status, body) = daemon
        .put(
            "/v1/agents/alice/presence",
            &alice,
            json!({ "presence": "available" }),
        )
        .await;
    check("/v1/agents/{agent}/presence", "put", status, &body);

    let (status, receipt) = daemon
        .ingest(api_message("oa-1", "customer-7", "Where is my order?"))
        .await;
    assert_eq!(status, 202, "{receipt}");
    check("/v1/messages", "post", status, &receipt);
    let (status, duplicate) = daemon
        .ingest(api_message("oa-1", "customer-7", "Where is my order?"))
        .await;
    assert_eq!(status, 200, "{duplicate}");
    check("/v1/messages", "post", status, &duplicate);
    let conversation = receipt["conversation_id"].as_str().unwrap().to_owned();

    let (status, body) = daemon.get("/v1/agents/alice", &alice).await;
    assert_eq!(status, 200, "{body}");
    check("/v1/agents/{agent}", "get", status, &body);
    let (status, body) = daemon.get("/v1/agents/alice/conversations", &alice).await;
    assert_eq!(body["offers"][0]["state"], "offered", "{body}");
    check("/v1/agents/{agent}/conversations", "get", status, &body);

    let agent_path =
        |action: &str| format!("/v1/agents/alice/conversations/{conversation}/{action}");
    let documented =
        |action: &str| format!("/v1/agents/{{agent}}/conversations/{{conversation}}/{action}");
    let (status, body) = daemon.post(&agent_path("accept"), &alice, json!({})).await;
    assert_eq!(status, 200, "{body}");
    check(&documented("accept"), "post", status, &body);
    let (status, body) = daemon
        .post(&agent_path("reply"), &alice, json!({ "text": "Tomorrow." }))
        .await;
    assert_eq!(status, 202, "{body}");
    check(&documented("reply"), "post", status, &body);
    let (status, body) = daemon.get(&agent_path("messages"), &alice).await;
    assert_eq!(status, 200, "{body}");
    check(&documented("messages"), "get", status, &body);

    for path in [
        "/v1/admin/queues",
        "/v1/admin/agents",
        "/v1/admin/conversations",
    ] {
        let (status, body) = daemon.get(path, ADMIN).await;
        assert_eq!(status, 200, "{path}: {body}");
        check(path, "get", status, &body);
    }
    let (status, body) = daemon
        .get(&format!("/v1/admin/conversations/{conversation}"), ADMIN)
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["routing"]["state"], "assigned", "{body}");
    check(
        "/v1/admin/conversations/{conversation}",
        "get",
        status,
        &body,
    );

    let (status, body) = daemon.post(&agent_path("resolve"), &alice, json!({})).await;
    assert_eq!(status, 200, "{body}");
    check(&documented("resolve"), "post", status, &body);
    let (status, body) = daemon.post("/v1/admin/reload", ADMIN, json!({})).await;
    assert_eq!(status, 200, "{body}");
    check("/v1/admin/reload", "post", status, &body);
    for path in ["/healthz", "/readyz"] {
        let (status, body) = daemon.get(path, "").await;
        check(path, "get", status, &body);
    }

    // Errors share one documented shape.
    let (status, body) = daemon.get("/v1/admin/queues", "wrong").await;
    assert_eq!(status, 401, "{body}");
    check("/v1/admin/queues", "get", status, &body);
    let (status, body) = daemon.post(&agent_path("accept"), &alice, json!({})).await;
    assert_eq!(status, 409, "{body}");
    check(&documented("accept"), "post", status, &body);
    let (status, body) = daemon
        .post("/v1/messages", INGEST, json!({ "channel": "api" }))
        .await;
    assert_eq!(status, 422, "{body}");
    check("/v1/messages", "post", status, &body);
}
