//! The OpenAPI 3.1 document served at `/v1/openapi.json`.

use serde_json::{Value, json};

fn error_responses() -> Value {
    json!({
        "400": { "$ref": "#/components/responses/Error" },
        "401": { "$ref": "#/components/responses/Error" },
        "403": { "$ref": "#/components/responses/Error" },
        "404": { "$ref": "#/components/responses/Error" },
        "409": { "$ref": "#/components/responses/Error" },
        "413": { "$ref": "#/components/responses/Error" },
        "422": { "$ref": "#/components/responses/Error" },
        "503": { "$ref": "#/components/responses/Error" }
    })
}

fn operation(summary: &str, security: &str, ok: &str) -> Value {
    let mut responses = error_responses();
    responses[ok] = json!({ "description": "Success", "content": { "application/json": { "schema": { "type": "object" } } } });
    json!({ "summary": summary, "security": [{ security: [] }], "responses": responses })
}

fn agent_action(summary: &str) -> Value {
    let mut op = operation(summary, "agentToken", "200");
    op["parameters"] = json!([{ "$ref": "#/components/parameters/agent" }, { "$ref": "#/components/parameters/conversation" }]);
    op
}

/// The message schema with its `$defs` hoisted into `components/schemas`, refs rewritten to match.
fn message_schemas() -> (Value, serde_json::Map<String, Value>) {
    fn rewrite(value: &mut Value) {
        match value {
            Value::Object(map) => {
                for (key, inner) in map.iter_mut() {
                    if key == "$ref"
                        && let Value::String(target) = inner
                    {
                        *target = target.replace("#/$defs/", "#/components/schemas/");
                    }
                    rewrite(inner);
                }
            }
            Value::Array(items) => items.iter_mut().for_each(rewrite),
            _ => {}
        }
    }
    let mut schema = crate::message::json_schema();
    rewrite(&mut schema);
    let definitions = match schema.as_object_mut().and_then(|map| map.remove("$defs")) {
        Some(Value::Object(definitions)) => definitions,
        _ => serde_json::Map::new(),
    };
    if let Some(map) = schema.as_object_mut() {
        map.remove("$schema");
    }
    (schema, definitions)
}

/// The document, with the message schema generated from the Rust type.
pub fn document() -> Value {
    let mut ingest = operation(
        "Ingest a normalised message (the `api` channel). Idempotent by (channel, provider_message_id). Answered only after the message is durably stored.",
        "ingestToken",
        "202",
    );
    ingest["requestBody"] = json!({ "required": true, "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Message" } } } });
    ingest["responses"]["200"] =
        json!({ "description": "Already stored (duplicate); nothing written" });
    let mut presence = operation("Set presence", "agentToken", "200");
    presence["parameters"] = json!([{ "$ref": "#/components/parameters/agent" }]);
    presence["requestBody"] = json!({ "required": true, "content": { "application/json": { "schema": {
        "type": "object", "additionalProperties": false, "required": ["presence"],
        "properties": { "presence": { "enum": ["available", "away", "offline"] } } } } } });
    let mut transfer =
        agent_action("Transfer to an agent or a queue (keeps priority and waiting time)");
    transfer["requestBody"] = json!({ "required": true, "content": { "application/json": { "schema": {
        "type": "object", "additionalProperties": false,
        "properties": { "to_agent": { "type": "string" }, "to_queue": { "type": "string" } } } } } });
    let mut reply = agent_action("Reply; goes out on the channel the customer last used");
    reply["responses"]["202"] = json!({ "description": "Stored; delivery status follows on the agent stream and as events" });
    reply["requestBody"] = json!({ "required": true, "content": { "application/json": { "schema": {
        "type": "object", "additionalProperties": false, "required": ["text"],
        "properties": { "text": { "type": "string" }, "html": { "type": "string" } } } } } });
    let mut agent_get = operation(
        "The agent's presence, load, offers and conversations",
        "agentToken",
        "200",
    );
    agent_get["parameters"] = json!([{ "$ref": "#/components/parameters/agent" }]);
    let mut stream = operation(
        "WebSocket: pushes offers (with deadline), assignments, customer messages, withdrawals, follow-ups and reply statuses; takes `{\"type\": \"accept\" | \"reject\" | \"resolve\" | \"escalate\" | \"transfer\" | \"reply\" | \"presence\", ...}` commands, each answered by `ack` or `error` with its `request_id`. The token may also be given as `?access_token=`.",
        "agentToken",
        "101",
    );
    stream["parameters"] = json!([{ "$ref": "#/components/parameters/agent" }]);
    let mut conversations = operation("List conversations (newest first)", "adminToken", "200");
    conversations["parameters"] = json!([
        { "name": "status", "in": "query", "schema": { "enum": ["open", "resolved", "closed"] } },
        { "name": "channel", "in": "query", "schema": { "type": "string" } },
        { "name": "contact_id", "in": "query", "schema": { "type": "string" } },
        { "name": "limit", "in": "query", "schema": { "type": "integer", "maximum": 1000 } }
    ]);
    let mut conversation = operation(
        "One conversation: record, live routing state, messages",
        "adminToken",
        "200",
    );
    conversation["parameters"] = json!([{ "$ref": "#/components/parameters/conversation" }]);
    let mut history = agent_action(
        "Conversation history across channels (owner, offered agent or follower only)",
    );
    history["responses"]["200"] = json!({ "description": "Messages, oldest first" });
    let (message, definitions) = message_schemas();
    let mut document = json!({
        "openapi": "3.1.0",
        "info": { "title": "switchboard", "version": env!("CARGO_PKG_VERSION"), "description": "Omnichannel contact-centre router." },
        "paths": {
            "/v1/messages": { "post": ingest },
            "/v1/agents/{agent}": { "get": agent_get },
            "/v1/agents/{agent}/presence": { "put": presence },
            "/v1/agents/{agent}/conversations": { "get": { "summary": "My offers and assigned conversations", "security": [{ "agentToken": [] }], "parameters": [{ "$ref": "#/components/parameters/agent" }], "responses": error_responses() } },
            "/v1/agents/{agent}/conversations/{conversation}/messages": { "get": history },
            "/v1/agents/{agent}/conversations/{conversation}/accept": { "post": agent_action("Accept an offer (409 if it expired or went elsewhere)") },
            "/v1/agents/{agent}/conversations/{conversation}/reject": { "post": agent_action("Reject an offer") },
            "/v1/agents/{agent}/conversations/{conversation}/resolve": { "post": agent_action("Resolve (wrap-up follows)") },
            "/v1/agents/{agent}/conversations/{conversation}/escalate": { "post": agent_action("Escalate to the queue's next tier; you stay attached as follower") },
            "/v1/agents/{agent}/conversations/{conversation}/transfer": { "post": transfer },
            "/v1/agents/{agent}/conversations/{conversation}/reply": { "post": reply },
            "/v1/agents/{agent}/stream": { "get": stream },
            "/v1/admin/queues": { "get": operation("Queues: waiting, oldest wait, SLA, agents available", "adminToken", "200") },
            "/v1/admin/agents": { "get": operation("Agents: presence and load", "adminToken", "200") },
            "/v1/admin/conversations": { "get": conversations },
            "/v1/admin/conversations/{conversation}": { "get": conversation },
            "/v1/admin/reload": { "post": operation("Reload the configuration (as SIGHUP); an invalid one is refused and the old one kept", "adminToken", "200") },
            "/v1/admin/cluster": { "get": operation("Cluster: members and their last heartbeat, the leader, its epoch, the forwarding backlog", "adminToken", "200") },
            "/healthz": { "get": { "summary": "Liveness", "responses": { "200": { "description": "alive" } } } },
            "/readyz": { "get": { "summary": "Readiness: able to take intake (store writable; a single node after recovery)", "responses": { "200": { "description": "ready" }, "503": { "description": "not ready" } } } },
            "/metrics": { "get": { "summary": "Prometheus metrics (text format)", "responses": { "200": { "description": "metrics" } } } }
        },
        "components": {
            "securitySchemes": {
                "ingestToken": { "type": "http", "scheme": "bearer" },
                "agentToken": { "type": "http", "scheme": "bearer" },
                "adminToken": { "type": "http", "scheme": "bearer" }
            },
            "parameters": {
                "agent": { "name": "agent", "in": "path", "required": true, "schema": { "type": "string" } },
                "conversation": { "name": "conversation", "in": "path", "required": true, "schema": { "type": "string", "description": "ULID" } }
            },
            "responses": {
                "Error": { "description": "An error naming the problem", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } } }
            },
            "schemas": {
                "Message": message,
                "Error": { "type": "object", "required": ["error"], "properties": { "error": { "type": "object", "required": ["code", "message"], "properties": { "code": { "type": "string" }, "message": { "type": "string" } } } } }
            }
        }
    });
    if let Some(schemas) = document["components"]["schemas"].as_object_mut() {
        schemas.extend(definitions);
    }
    document
}
