//! The OpenAPI 3.1 document served at `/v1/openapi.json`.

use schemars::JsonSchema;
use schemars::generate::{SchemaGenerator, SchemaSettings};
use serde_json::{Map, Value, json};

use super::views;
use crate::message::InboundMessage;

/// Generates `components/schemas` from the Rust types: responses as they serialize, requests as
/// they deserialize, each named type once, referred to by `$ref`.
struct Components {
    responses: SchemaGenerator,
    requests: SchemaGenerator,
}

impl Components {
    fn new() -> Components {
        let settings = SchemaSettings::draft2020_12()
            .with(|settings| settings.definitions_path = "#/components/schemas/".into());
        Components {
            responses: settings.clone().for_serialize().into_generator(),
            requests: settings.for_deserialize().into_generator(),
        }
    }

    fn response<T: JsonSchema>(&mut self) -> Value {
        self.responses.subschema_for::<T>().to_value()
    }

    fn request<T: JsonSchema>(&mut self) -> Value {
        self.requests.subschema_for::<T>().to_value()
    }

    fn into_schemas(mut self) -> Map<String, Value> {
        let mut schemas = self.responses.take_definitions(true);
        schemas.extend(self.requests.take_definitions(true));
        schemas
    }
}

fn error_responses() -> Value {
    let error = json!({ "$ref": "#/components/responses/Error" });
    json!({
        "400": error, "401": error, "403": error, "404": error,
        "409": error, "413": error, "422": error, "503": error
    })
}

/// An operation answering `status` with a JSON body of `schema` (or the common errors).
fn operation(summary: &str, security: &str, status: &str, schema: Value) -> Value {
    let mut responses = error_responses();
    responses[status] = json!({ "description": "Success", "content": { "application/json": {} } });
    responses[status]["content"]["application/json"]["schema"] = schema;
    json!({ "summary": summary, "security": [{ security: [] }], "responses": responses })
}

fn agent_action(summary: &str, status: &str, schema: Value) -> Value {
    let mut op = operation(summary, "agentToken", status, schema);
    op["parameters"] = json!([{ "$ref": "#/components/parameters/agent" }, { "$ref": "#/components/parameters/conversation" }]);
    op
}

/// The document. Every request and response body's schema is generated from its Rust type.
pub fn document() -> Value {
    let mut components = Components::new();
    let done = components.response::<views::Done>();
    let mut ingest = operation(
        "Ingest a normalised message (the `api` channel). Idempotent by (channel, provider_message_id). Answered only after the message is durably stored.",
        "ingestToken",
        "202",
        components.response::<views::Receipt>(),
    );
    ingest["requestBody"] = json!({ "required": true, "content": { "application/json": { "schema": components.request::<InboundMessage>() } } });
    ingest["responses"]["200"] = json!({ "description": "Already stored (duplicate); nothing written", "content": { "application/json": { "schema": components.response::<views::Receipt>() } } });
    let mut presence = operation(
        "Set presence",
        "agentToken",
        "200",
        components.response::<views::PresenceSet>(),
    );
    presence["parameters"] = json!([{ "$ref": "#/components/parameters/agent" }]);
    presence["requestBody"] = json!({ "required": true, "content": { "application/json": { "schema": {
        "type": "object", "additionalProperties": false, "required": ["presence"],
        "properties": { "presence": { "enum": ["available", "away", "offline"] } } } } } });
    let mut transfer = agent_action(
        "Transfer to an agent or a queue (keeps priority and waiting time)",
        "200",
        done.clone(),
    );
    transfer["requestBody"] = json!({ "required": true, "content": { "application/json": { "schema": {
        "type": "object", "additionalProperties": false,
        "properties": { "to_agent": { "type": "string" }, "to_queue": { "type": "string" } } } } } });
    let mut reply = agent_action(
        "Reply; goes out on the channel the customer last used. Answered once stored; the delivery status follows on the agent stream and as events.",
        "202",
        components.response::<views::ReplyAccepted>(),
    );
    reply["requestBody"] = json!({ "required": true, "content": { "application/json": { "schema": {
        "type": "object", "additionalProperties": false, "required": ["text"],
        "properties": { "text": { "type": "string" }, "html": { "type": "string" } } } } } });
    let mut agent_get = operation(
        "The agent's presence, load, offers and conversations",
        "agentToken",
        "200",
        components.response::<views::Agent>(),
    );
    agent_get["parameters"] = json!([{ "$ref": "#/components/parameters/agent" }]);
    let mut agent_conversations = operation(
        "My offers and assigned conversations",
        "agentToken",
        "200",
        components.response::<views::AgentConversations>(),
    );
    agent_conversations["parameters"] = json!([{ "$ref": "#/components/parameters/agent" }]);
    let mut stream = operation(
        "WebSocket: pushes offers (with deadline), assignments, customer messages, withdrawals, follow-ups and reply statuses; takes the agent commands of `schemas/agent-command.v1.json` (`{\"type\": \"accept\" | \"reject\" | \"resolve\" | \"escalate\" | \"transfer\" | \"reply\" | \"presence\", ...}`), each answered by `ack` or `error` with its `request_id`. The token may also be given as `?access_token=`.",
        "agentToken",
        "101",
        json!({}),
    );
    stream["responses"]["101"] = json!({ "description": "Switching to the WebSocket protocol" });
    stream["parameters"] = json!([{ "$ref": "#/components/parameters/agent" }]);
    let mut supervisor_stream = operation(
        "WebSocket of the supervisor view: pushes a JSON snapshot (`at`, `queues` with `answered` and `service_level` (share answered within the SLA target, counted by this instance since it started), `agents` with `in_state_seconds`, `unanswered`: the first 100 unanswered conversations in order of service with priority and reasons, `unanswered_total`, `csat` with `count`, `average` and the `recent` ratings) when routing changes (bursts gathered for 300 ms) and every 2 s. Takes no commands. The token may also be given as `?access_token=`.",
        "adminToken",
        "101",
        json!({}),
    );
    supervisor_stream["responses"]["101"] =
        json!({ "description": "Switching to the WebSocket protocol" });
    let mut conversations = operation(
        "List conversations (newest first)",
        "adminToken",
        "200",
        components.response::<views::ConversationList>(),
    );
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
        components.response::<views::ConversationDetail>(),
    );
    conversation["parameters"] = json!([{ "$ref": "#/components/parameters/conversation" }]);
    let history = agent_action(
        "Conversation history across channels, oldest first (owner, offered agent or follower only)",
        "200",
        components.response::<views::History>(),
    );
    let queues = operation(
        "Queues: waiting, oldest wait, SLA, agents available",
        "adminToken",
        "200",
        components.response::<views::QueueList>(),
    );
    let agents = operation(
        "Agents: presence and load",
        "adminToken",
        "200",
        components.response::<views::AgentList>(),
    );
    let reload = operation(
        "Reload the configuration (as SIGHUP); an invalid one is refused (422) and the old one kept",
        "adminToken",
        "200",
        components.response::<views::Reloaded>(),
    );
    let cluster = operation(
        "Cluster: members and their last heartbeat, the leader, its epoch, the forwarding backlog",
        "adminToken",
        "200",
        components.response::<views::Cluster>(),
    );
    let mut email_raw = operation(
        "Ingest one raw email (`message/rfc822`), as forwarded by mail providers: the same path as SMTP intake (threading, attachments, loop protection; a delivery report marks our failed reply instead). 202 once stored; 200 for a duplicate or a bounce; 400 for mail that is not a readable message; 413 over `channels.email.max_message_bytes` (this route's body limit).",
        "ingestToken",
        "202",
        components.response::<crate::channels::email::intake::Accepted>(),
    );
    email_raw["requestBody"] = json!({ "required": true, "content": { "message/rfc822": { "schema": { "type": "string", "contentMediaType": "message/rfc822" } } } });
    email_raw["responses"]["200"] = json!({ "description": "Already stored (duplicate), or a delivery report recorded on our reply", "content": { "application/json": { "schema": components.response::<crate::channels::email::intake::Accepted>() } } });
    let mut email_attachment = operation(
        "An email attachment's content (agent or admin token); the URL is the one in the message's `attachments`",
        "agentToken",
        "200",
        json!({}),
    );
    email_attachment["security"] = json!([{ "agentToken": [] }, { "adminToken": [] }]);
    email_attachment["responses"]["200"] = json!({ "description": "the attachment's bytes", "content": { "application/octet-stream": { "schema": { "type": "string", "contentMediaType": "application/octet-stream" } } } });
    email_attachment["parameters"] = json!([{ "name": "key", "in": "path", "required": true, "schema": { "type": "string", "pattern": "^[0-9a-f]{64}$", "description": "SHA-256 of the content" } }]);
    let error = components.response::<views::ErrorBody>();
    let text = |description: &str| json!({ "200": { "description": description, "content": { "text/plain": { "schema": { "type": "string" } } } } });
    let mut schemas = components.into_schemas();
    schemas.insert(
        "StatusBody".into(),
        json!({ "type": "object", "required": ["status"], "properties": { "status": { "type": "string" } } }),
    );
    let status = json!({ "$ref": "#/components/schemas/StatusBody" });
    // The browser side (embedded pages and scripts), apart: one json! for everything is too deep.
    let served = |description: &str, media: &str| {
        let mut content = Map::new();
        content.insert(media.to_owned(), json!({ "schema": { "type": "string" } }));
        json!({ "200": { "description": description, "content": content } })
    };
    let browser = json!({
    "/widget.js": { "get": { "summary": "The web chat widget: `<script src=\".../widget.js\" data-title data-name data-customer-id data-customer-signature data-open async>` opens a launcher and a chat window (docs/CHAT.md)", "responses": served("JavaScript", "text/javascript") } },
    "/demo": { "get": { "summary": "A demo shop page carrying the widget", "responses": served("HTML", "text/html") } },
    "/console": { "get": { "summary": "The agent console (sign in with an agent token)", "responses": served("HTML", "text/html") } },
    "/console/console.js": { "get": { "summary": "The agent console's script", "responses": served("JavaScript", "text/javascript") } },
    "/console/console.css": { "get": { "summary": "The consoles' style sheet", "responses": served("CSS", "text/css") } },
    "/console/supervisor": { "get": { "summary": "The supervisor view (sign in with an admin token)", "responses": served("HTML", "text/html") } },
    "/console/supervisor.js": { "get": { "summary": "The supervisor view's script", "responses": served("JavaScript", "text/javascript") } }
    });
    let mut document = json!({
        "openapi": "3.1.0",
        "info": { "title": "switchboard", "version": env!("CARGO_PKG_VERSION"), "description": "Omnichannel contact-centre router." },
        "paths": {
            "/v1/openapi.json": { "get": { "summary": "This document", "responses": { "200": { "description": "OpenAPI 3.1", "content": { "application/json": {} } } } } },
            "/v1/messages": { "post": ingest },
            "/v1/webhooks/{provider}/{account}": {
                "get": { "summary": "Meta's subscription handshake: answers hub.challenge when hub.verify_token matches", "responses": { "200": { "description": "the challenge" }, "403": { "$ref": "#/components/responses/Error" }, "404": { "$ref": "#/components/responses/Error" } } },
                "post": { "summary": "A provider's signed delivery (twilio, vonage, meta, telegram): answered 200 only after every message in it is stored", "responses": { "200": { "description": "stored (Twilio: empty TwiML)" }, "400": { "$ref": "#/components/responses/Error" }, "401": { "$ref": "#/components/responses/Error" }, "403": { "$ref": "#/components/responses/Error" }, "404": { "$ref": "#/components/responses/Error" }, "503": { "$ref": "#/components/responses/Error" } } }
            },
            "/v1/channels/email/raw": { "post": email_raw },
            "/v1/channels/email/attachments/{key}": { "get": email_attachment },
            "/v1/agents/{agent}": { "get": agent_get },
            "/v1/agents/{agent}/presence": { "put": presence },
            "/v1/agents/{agent}/conversations": { "get": agent_conversations },
            "/v1/agents/{agent}/conversations/{conversation}/messages": { "get": history },
            "/v1/agents/{agent}/conversations/{conversation}/accept": { "post": agent_action("Accept an offer (409 if it expired or went elsewhere)", "200", done.clone()) },
            "/v1/agents/{agent}/conversations/{conversation}/reject": { "post": agent_action("Reject an offer", "200", done.clone()) },
            "/v1/agents/{agent}/conversations/{conversation}/resolve": { "post": agent_action("Resolve (wrap-up follows)", "200", done.clone()) },
            "/v1/agents/{agent}/conversations/{conversation}/escalate": { "post": agent_action("Escalate to the queue's next tier; you stay attached as follower", "200", done) },
            "/v1/agents/{agent}/conversations/{conversation}/transfer": { "post": transfer },
            "/v1/agents/{agent}/conversations/{conversation}/reply": { "post": reply },
            "/v1/agents/{agent}/stream": { "get": stream },
            "/v1/chat/stream": { "get": { "summary": "WebSocket of the customer web chat (protocol in docs/CHAT.md): `start` (visitor id, optional signed customer id, resume after a sequence number), `message` (acknowledged after the commit, deduplicated by client_message_id), `typing`, `read`; pushes messages with sequence numbers, queue position and estimated wait, agent joined/left, typing. No token: the page's Origin must be in chat.allowed_origins when that is set.", "responses": { "101": { "description": "Switching to the WebSocket protocol" }, "403": { "$ref": "#/components/responses/Error" } } } },
            "/v1/admin/queues": { "get": queues },
            "/v1/admin/agents": { "get": agents },
            "/v1/admin/conversations": { "get": conversations },
            "/v1/admin/conversations/{conversation}": { "get": conversation },
            "/v1/admin/reload": { "post": reload },
            "/v1/admin/cluster": { "get": cluster },
            "/v1/admin/stream": { "get": supervisor_stream },
            "/healthz": { "get": { "summary": "Liveness", "responses": { "200": { "description": "alive", "content": { "application/json": { "schema": status } } } } } },
            "/readyz": { "get": { "summary": "Readiness: recovery done and the store writable (`degraded` while a broker is down)", "responses": {
                "200": { "description": "ready", "content": { "application/json": { "schema": status } } },
                "503": { "description": "not ready", "content": { "application/json": { "schema": status } } } } } },
            "/metrics": { "get": { "summary": "Prometheus metrics (text format 0.0.4)", "responses": text("metrics") } }
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
                "Error": { "description": "An error naming the problem", "content": { "application/json": { "schema": error } } }
            },
            "schemas": schemas
        }
    });
    if let (Some(paths), Value::Object(browser)) = (document["paths"].as_object_mut(), browser) {
        paths.extend(browser);
    }
    document
}
