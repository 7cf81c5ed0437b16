//! Test support: run the real `switchboard` binary on a free port in a temp directory, and talk to it
//! as clients do (HTTP with reqwest, WebSocket with tokio-tungstenite).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

pub const INGEST: &str = "demo-ingest-token";
pub const ADMIN: &str = "demo-admin-token";

pub fn agent_token(agent: &str) -> String {
    format!("demo-{agent}-token")
}

/// A running daemon process with its own data directory.
pub struct Daemon {
    pub dir: tempfile::TempDir,
    pub base: String,
    /// Other listeners' addresses by name (`smtp`), from their `<name> listening on` lines.
    pub listeners: std::collections::HashMap<String, String>,
    child: Option<Child>,
    pub http: reqwest::Client,
    /// Extra environment for the process (e.g. secrets given as `SWITCHBOARD__…`).
    pub env: Vec<(String, String)>,
    /// Everything the process wrote (stdout and stderr lines), when started by
    /// [`Daemon::start_capturing`]; otherwise stderr goes to the test's own.
    pub output: Option<std::sync::Arc<std::sync::Mutex<Vec<String>>>>,
}

pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_switchboard"))
}

/// The config used by tests: the demo centre, a temp store, port 0. `server` adds keys to `[server]`;
/// `extra` adds whole tables.
pub fn write_config(dir: &Path, server: &str, extra: &str) -> PathBuf {
    let store = format!("path = \"{}\"", dir.join("switchboard.sqlite").display());
    write_config_with_store(dir, server, &store, extra)
}

/// Like [`write_config`], with `store` as the `[store]` table's keys.
pub fn write_config_with_store(dir: &Path, server: &str, store: &str, extra: &str) -> PathBuf {
    let path = dir.join("switchboard.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace_seconds = 5\n{server}\n\n[store]\n{store}\n\n{extra}"
        ),
    )
    .unwrap();
    path
}

impl Daemon {
    pub fn start(extra_config: &str) -> Daemon {
        Daemon::start_with("", extra_config)
    }

    pub fn start_with(server: &str, extra_config: &str) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        write_config(dir.path(), server, extra_config);
        Daemon::start_in(dir)
    }

    /// Starts on the store described by `store` (the `[store]` table's keys).
    pub fn start_on_store(store: &str) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        write_config_with_store(dir.path(), "", store, "");
        Daemon::start_in(dir)
    }

    /// Starts on `store` with `extra` tables (e.g. `[cluster]`).
    pub fn start_on_store_with(store: &str, extra: &str) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        write_config_with_store(dir.path(), "", store, extra);
        Daemon::start_in(dir)
    }

    /// Sends a signal (`STOP`, `CONT`...) to the running process.
    pub fn signal(&self, signal: &str) {
        let child = self.child.as_ref().expect("running");
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal}");
    }

    pub fn start_in(dir: tempfile::TempDir) -> Daemon {
        Daemon::start_with_env(dir, Vec::new(), None)
    }

    /// Starts in `dir` with `env` added, keeping every line the process writes (for checks that
    /// something never appears in its logs).
    pub fn start_capturing(dir: tempfile::TempDir, env: &[(&str, &str)]) -> Daemon {
        let env = env
            .iter()
            .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
            .collect();
        Daemon::start_with_env(dir, env, Some(Default::default()))
    }

    fn start_with_env(
        dir: tempfile::TempDir,
        env: Vec<(String, String)>,
        output: Option<std::sync::Arc<std::sync::Mutex<Vec<String>>>>,
    ) -> Daemon {
        let mut daemon = Daemon {
            dir,
            base: String::new(),
            listeners: Default::default(),
            child: None,
            http: reqwest::Client::new(),
            env,
            output,
        };
        daemon.spawn();
        daemon
    }

    /// What the process wrote so far (empty unless started by [`Daemon::start_capturing`]).
    pub fn captured(&self) -> String {
        self.output
            .as_ref()
            .map(|output| output.lock().unwrap().join("\n"))
            .unwrap_or_default()
    }

    /// Starts the binary and waits for its `listening on` line (no polling, no sleeps).
    pub fn spawn(&mut self) {
        let mut child = Command::new(binary())
            .arg("run")
            .arg("--config")
            .arg(self.dir.path().join("switchboard.toml"))
            .env("RUST_LOG", "warn")
            .envs(self.env.iter().map(|(name, value)| (name, value)))
            .stdout(Stdio::piped())
            .stderr(if self.output.is_some() {
                Stdio::piped()
            } else {
                Stdio::inherit()
            })
            .spawn()
            .expect("start switchboard");
        if let (Some(stderr), Some(output)) = (child.stderr.take(), self.output.clone()) {
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    output.lock().unwrap().push(line);
                }
            });
        }
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let address = loop {
            let line = lines
                .next()
                .expect("switchboard exited before listening")
                .unwrap();
            if let Some(output) = &self.output {
                output.lock().unwrap().push(line.clone());
            }
            if let Some(address) = line.strip_prefix("listening on ") {
                break address.trim().to_owned();
            }
            if let Some((name, address)) = line.split_once(" listening on ") {
                self.listeners
                    .insert(name.to_owned(), address.trim().to_owned());
            }
        };
        // Keep draining stdout so the child never blocks on a full pipe.
        let output = self.output.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                if let Some(output) = &output {
                    output.lock().unwrap().push(line);
                }
            }
        });
        self.base = address;
        self.child = Some(child);
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, and the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status()
            .unwrap();
        child.wait().unwrap()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Sends `body` as JSON with the bearer token; returns the status and the JSON answer.
    pub async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        token: &str,
        body: Value,
    ) -> (u16, Value) {
        let response = self
            .http
            .request(method, self.url(path))
            .bearer_auth(token)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    pub async fn post(&self, path: &str, token: &str, body: Value) -> (u16, Value) {
        self.send(reqwest::Method::POST, path, token, body).await
    }

    pub async fn put(&self, path: &str, token: &str, body: Value) -> (u16, Value) {
        self.send(reqwest::Method::PUT, path, token, body).await
    }

    pub async fn get(&self, path: &str, token: &str) -> (u16, Value) {
        let response = self
            .http
            .get(self.url(path))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// Posts a provider's webhook delivery as the provider would: raw body, its own headers.
    pub async fn webhook(
        &self,
        path: &str,
        content_type: &str,
        headers: &[(&str, String)],
        body: &str,
    ) -> (u16, String) {
        let mut request = self
            .http
            .post(self.url(path))
            .header("content-type", content_type)
            .body(body.to_owned());
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.text().await.unwrap_or_default())
    }

    /// The conversations the admin API lists (newest first).
    pub async fn conversations(&self) -> Vec<Value> {
        let (status, listed) = self.get("/v1/admin/conversations", ADMIN).await;
        assert_eq!(status, 200, "{listed}");
        listed["conversations"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// A conversation's messages as its agent sees them.
    pub async fn history(&self, agent: &str, conversation: &str) -> Vec<Value> {
        let (status, history) = self
            .get(
                &format!("/v1/agents/{agent}/conversations/{conversation}/messages"),
                &agent_token(agent),
            )
            .await;
        assert_eq!(status, 200, "{history}");
        history["messages"].as_array().cloned().unwrap_or_default()
    }

    /// An agent's reply to a conversation over the REST API: the status and the answer.
    pub async fn reply_as(&self, agent: &str, conversation: &str, text: &str) -> (u16, Value) {
        self.post(
            &format!("/v1/agents/{agent}/conversations/{conversation}/reply"),
            &agent_token(agent),
            json!({ "text": text }),
        )
        .await
    }

    pub async fn ingest(&self, message: Value) -> (u16, Value) {
        self.post("/v1/messages", INGEST, message).await
    }

    pub async fn agent_socket(&self, agent: &str) -> AgentSocket {
        let url = format!(
            "{}/v1/agents/{agent}/stream?access_token={}",
            self.base.replace("http://", "ws://"),
            agent_token(agent)
        );
        let (socket, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("agent websocket");
        let mut socket = AgentSocket {
            socket,
            next_request: 0,
            kept: std::collections::VecDeque::new(),
        };
        let hello = socket.next().await;
        assert_eq!(hello["type"], "hello");
        socket
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// An agent desktop's WebSocket.
pub struct AgentSocket {
    socket: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    next_request: u64,
    /// Pushes that arrived while [`AgentSocket::command_keeping`] waited for its answer.
    kept: std::collections::VecDeque<Value>,
}

impl AgentSocket {
    /// The next JSON message from the server (fails the test after 10 s of silence).
    pub async fn next(&mut self) -> Value {
        loop {
            let message = tokio::time::timeout(Duration::from_secs(10), self.socket.next())
                .await
                .expect("a push within 10 s")
                .expect("socket open")
                .expect("socket ok");
            if let Message::Text(text) = message {
                return serde_json::from_str(&text).unwrap();
            }
        }
    }

    /// The next push, if one arrives within `within` (kept pushes first).
    pub async fn try_next(&mut self, within: Duration) -> Option<Value> {
        if let Some(kept) = self.kept.pop_front() {
            return Some(kept);
        }
        loop {
            let message = tokio::time::timeout(within, self.socket.next())
                .await
                .ok()?
                .expect("socket open")
                .expect("socket ok");
            if let Message::Text(text) = message {
                return Some(serde_json::from_str(&text).unwrap());
            }
        }
    }

    /// Like [`AgentSocket::command`], keeping the pushes that arrive meanwhile for `try_next`.
    pub async fn command_keeping(&mut self, command: Value) -> Value {
        self.send_command(command, true).await
    }

    /// Waits for the next offer, accepts it, and returns its conversation id.
    pub async fn accept_next_offer(&mut self) -> String {
        let conversation = self.next_of("offer").await["conversation_id"]
            .as_str()
            .unwrap()
            .to_owned();
        let ack = self
            .command(json!({ "type": "accept", "conversation_id": conversation }))
            .await;
        assert_eq!(ack["type"], "ack", "{ack}");
        conversation
    }

    /// The next message of a given type, skipping others.
    pub async fn next_of(&mut self, kind: &str) -> Value {
        loop {
            let message = self.next().await;
            if message["type"] == kind {
                return message;
            }
        }
    }

    /// Sends a command and returns its `ack` or `error` answer (pushes in between are skipped).
    pub async fn command(&mut self, command: Value) -> Value {
        self.send_command(command, false).await
    }

    /// Sends a command with a fresh `request_id` and waits for its answer; pushes that arrive
    /// meanwhile are kept for `try_next` when `keep`, else skipped.
    async fn send_command(&mut self, mut command: Value, keep: bool) -> Value {
        self.next_request += 1;
        let request_id = self.next_request.to_string();
        command["request_id"] = json!(request_id);
        self.socket
            .send(Message::Text(command.to_string().into()))
            .await
            .unwrap();
        loop {
            let message = self.next().await;
            if (message["type"] == "ack" || message["type"] == "error")
                && message["request_id"] == json!(request_id)
            {
                return message;
            }
            if keep {
                self.kept.push_back(message);
            }
        }
    }

    pub async fn close(mut self) {
        let _ = self.socket.close(None).await;
    }
}

/// A customer's chat window on `/v1/chat/stream` (the browser's side of the web chat).
pub struct Customer {
    pub socket: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
}

impl Customer {
    pub async fn connect(daemon: &Daemon, origin: Option<&str>) -> Result<Customer, u16> {
        let url = format!("{}/v1/chat/stream", daemon.base.replace("http://", "ws://"));
        let mut request = url.into_client_request().unwrap();
        if let Some(origin) = origin {
            request
                .headers_mut()
                .insert("origin", origin.parse().unwrap());
        }
        match tokio_tungstenite::connect_async(request).await {
            Ok((socket, _)) => Ok(Customer { socket }),
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                Err(response.status().as_u16())
            }
            Err(error) => panic!("chat websocket: {error}"),
        }
    }

    /// Connects and starts (or resumes) a session; returns the `session` frame.
    pub async fn start(daemon: &Daemon, start: Value) -> (Customer, Value) {
        let mut customer = Customer::connect(daemon, None).await.unwrap();
        customer.send(json!({ "type": "start" }).merge(start)).await;
        let session = customer.next().await;
        (customer, session)
    }

    pub async fn send(&mut self, frame: Value) {
        self.socket
            .send(Message::Text(frame.to_string().into()))
            .await
            .unwrap();
    }

    pub async fn next(&mut self) -> Value {
        loop {
            let message = tokio::time::timeout(Duration::from_secs(10), self.socket.next())
                .await
                .expect("a frame within 10 s")
                .expect("socket open")
                .expect("socket ok");
            if let Message::Text(text) = message {
                return serde_json::from_str(&text).unwrap();
            }
        }
    }

    pub async fn next_of(&mut self, kind: &str) -> Value {
        loop {
            let frame = self.next().await;
            if frame["type"] == kind {
                return frame;
            }
        }
    }

    /// Sends a message and waits for its ack (or error), skipping other frames.
    pub async fn say(&mut self, client_message_id: &str, text: &str) -> Value {
        self.send(
            json!({ "type": "message", "client_message_id": client_message_id, "text": text }),
        )
        .await;
        loop {
            let frame = self.next().await;
            if (frame["type"] == "ack" || frame["type"] == "error")
                && frame["client_message_id"] == client_message_id
            {
                return frame;
            }
        }
    }

    pub async fn close(mut self) {
        let _ = self.socket.close(None).await;
    }
}

/// Adds the fields of another JSON object (for frames built from a base).
pub trait Merge {
    fn merge(self, other: Value) -> Value;
}

impl Merge for Value {
    fn merge(mut self, other: Value) -> Value {
        if let (Some(into), Value::Object(from)) = (self.as_object_mut(), other) {
            into.extend(from);
        }
        self
    }
}

/// One customer chat, step by step as the customer and the agent see it: the customer (visitor
/// `visitor`) chats on `customer_side`; alice, available on `agent_side`, accepts, they type to
/// each other, she replies and resolves. On a single node both sides are the same daemon; across a
/// cluster's instances every step must look the same. Returns the conversation id.
pub async fn chat_with_alice(customer_side: &Daemon, agent_side: &Daemon, visitor: &str) -> String {
    let mut alice = agent_side.agent_socket("alice").await;
    let answer = alice
        .command(json!({ "type": "presence", "presence": "available" }))
        .await;
    assert_eq!(answer["type"], "ack", "{answer}");
    let (mut customer, session) = Customer::start(
        customer_side,
        json!({ "visitor_id": visitor, "name": "Ann" }),
    )
    .await;
    assert_eq!(session["type"], "session", "{session}");
    assert_eq!(session["conversation_id"], Value::Null);

    let ack = customer.say("c1", "Hello, my parcel is late").await;
    assert_eq!(ack["type"], "ack", "{ack}");
    assert_eq!(ack["seq"], 1);
    assert_eq!(ack["duplicate"], false);
    let conversation = ack["conversation_id"].as_str().unwrap().to_owned();

    assert_eq!(alice.accept_next_offer().await, conversation);
    let joined = customer.next_of("agent_joined").await;
    assert_eq!(joined["agent_id"], "alice", "{joined}");

    // Typing goes both ways while the agent holds the conversation.
    customer
        .send(json!({ "type": "typing", "active": true }))
        .await;
    let typing = alice.next_of("customer_typing").await;
    assert_eq!(typing["conversation_id"], conversation.as_str());
    let ack = alice
        .command(json!({ "type": "typing", "conversation_id": conversation, "active": true }))
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let typing = customer.next_of("typing").await;
    assert_eq!(typing["from"], "agent", "{typing}");

    // The reply reaches the customer numbered as in the history.
    let (status, _) = agent_side
        .reply_as("alice", &conversation, "Let me look at it")
        .await;
    assert_eq!(status, 202);
    let reply = customer.next_of("message").await;
    assert_eq!(reply["from"], "agent", "{reply}");
    assert_eq!(reply["text"], "Let me look at it", "{reply}");
    assert_eq!(reply["seq"], 2, "{reply}");
    let history = agent_side.history("alice", &conversation).await;
    assert_eq!(history.len(), 2);
    assert_eq!(history[0]["channel"], "chat");

    let resolved = alice
        .command(json!({ "type": "resolve", "conversation_id": conversation }))
        .await;
    assert_eq!(resolved["type"], "ack", "{resolved}");
    assert_eq!(customer.next_of("agent_left").await["agent_id"], "alice");
    customer.next_of("resolved").await;
    customer.close().await;
    alice.close().await;
    conversation
}

/// A normalised message on the `api` channel.
pub fn api_message(id: &str, from: &str, text: &str) -> Value {
    json!({ "channel": "api", "provider": "crm", "provider_message_id": id, "from": { "address": from }, "text": text })
}

/// A TCP proxy between the daemon and a broker that the test controls: `cut` closes every
/// connection and refuses new ones (a broker outage), `restore` lets them through again, and
/// `freeze_upstream` stops passing the daemon's bytes on (its acks never reach the broker) while the
/// broker's still arrive.
pub struct Proxy {
    pub address: std::net::SocketAddr,
    state: tokio::sync::watch::Sender<ProxyState>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ProxyState {
    /// Connections refused (and existing ones closed).
    down: bool,
    /// The daemon's bytes are held back.
    frozen: bool,
    /// How many cuts so far: a connection opened before a cut ends even if the proxy is restored
    /// before the connection's task looked.
    cuts: u64,
}

impl Proxy {
    pub async fn start(upstream: &str) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (state, _) = tokio::sync::watch::channel(ProxyState {
            down: false,
            frozen: false,
            cuts: 0,
        });
        let upstream = upstream.to_owned();
        let watch = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let opened = *watch.borrow();
                if opened.down {
                    drop(client);
                    continue;
                }
                let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                    continue;
                };
                tokio::spawn(Proxy::pipe(client, server, watch.subscribe(), opened.cuts));
            }
        });
        Proxy {
            address,
            state,
            task,
        }
    }

    async fn pipe(
        client: tokio::net::TcpStream,
        server: tokio::net::TcpStream,
        mut state: tokio::sync::watch::Receiver<ProxyState>,
        cuts: u64,
    ) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut client_read, mut client_write) = client.into_split();
        let (mut server_read, mut server_write) = server.into_split();
        let mut up_state = state.clone();
        let up = async move {
            let mut buffer = vec![0_u8; 64 * 1024];
            loop {
                // While frozen, leave the daemon's bytes unread: they never reach the broker.
                while up_state.borrow().frozen {
                    if up_state.changed().await.is_err() {
                        return;
                    }
                }
                tokio::select! {
                    read = client_read.read(&mut buffer) => match read {
                        Ok(0) | Err(_) => return,
                        // Bytes held back before a cut stay held back: the broker never sees them.
                        Ok(_) if up_state.borrow().cuts != cuts => return,
                        Ok(n) => if server_write.write_all(&buffer[..n]).await.is_err() { return },
                    },
                    _ = up_state.changed() => {}
                }
            }
        };
        let down = async move {
            let mut buffer = vec![0_u8; 64 * 1024];
            loop {
                match server_read.read(&mut buffer).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if client_write.write_all(&buffer[..n]).await.is_err() {
                            return;
                        }
                    }
                }
            }
        };
        let cut = async move {
            while state.borrow().cuts == cuts {
                if state.changed().await.is_err() {
                    return;
                }
            }
        };
        // Whichever ends first ends the connection: both halves are dropped (closed).
        tokio::select! {
            _ = async { tokio::join!(up, down) } => {}
            _ = cut => {}
        }
    }

    /// Closes every connection and refuses new ones.
    pub fn cut(&self) {
        self.state.send_modify(|state| {
            state.down = true;
            state.cuts += 1;
        });
    }

    /// Lets connections through again, nothing held back.
    pub fn restore(&self) {
        self.state.send_modify(|state| {
            state.down = false;
            state.frozen = false;
        });
    }

    /// Stops passing the daemon's bytes to the broker (the broker's still reach the daemon).
    pub fn freeze_upstream(&self) {
        self.state.send_modify(|state| state.frozen = true);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.task.abort();
    }
}

/// A name no other test (or run) uses, for broker streams, queues and subject prefixes.
pub fn unique_name(prefix: &str) -> String {
    format!("{prefix}_{}", ulid::Ulid::new()).to_lowercase()
}

/// Polls `check` every 20 ms until it returns Some, failing the test after `seconds`.
pub async fn eventually<T, F, Fut>(seconds: u64, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(seconds);
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {seconds} s waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

impl Daemon {
    /// The value of a metric sample (the whole line's name and labels, e.g.
    /// `switchboard_bus_connected{bus="nats"}`), if exported.
    /// The whole `/metrics` exposition.
    pub async fn metrics_text(&self) -> String {
        self.http
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    pub async fn metric(&self, sample: &str) -> Option<f64> {
        let text = self
            .http
            .get(self.url("/metrics"))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        text.lines().find_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            (name == sample).then(|| value.parse().ok()).flatten()
        })
    }
}

/// The JetStream stream names [`nats_config`] gives a daemon: (inbound, publish).
pub fn nats_streams(name: &str) -> (String, String) {
    (
        format!("{name}_in").to_uppercase(),
        format!("{name}_out").to_uppercase(),
    )
}

/// `[bus.nats]` for a daemon on the NATS server at `address`, with subjects, streams, consumer and
/// queue group all named after `name` (from [`unique_name`]), so tests sharing one server never meet.
pub fn nats_config(address: &str, name: &str) -> String {
    let (inbound, publish) = nats_streams(name);
    format!(
        "[bus.nats]\nenabled = true\nurl = \"nats://{address}\"\nsubject_prefix = \"{name}\"\ninbound_stream = \"{inbound}\"\npublish_stream = \"{publish}\"\nconsumer = \"{name}\"\ncommand_queue_group = \"{name}\"\n"
    )
}

/// Deletes the streams a daemon configured by [`nats_config`] created.
pub async fn delete_nats_streams(address: &str, name: &str) {
    let client = async_nats::connect(address).await.unwrap();
    let jetstream = async_nats::jetstream::new(client);
    let (inbound, publish) = nats_streams(name);
    let _ = jetstream.delete_stream(&inbound).await;
    let _ = jetstream.delete_stream(&publish).await;
}

/// `[bus.amqp]` for a daemon on the RabbitMQ server at `address` (host:port), with exchanges and
/// queues all named after `prefix` (from [`unique_name`]).
pub fn amqp_config(address: &str, prefix: &str) -> String {
    let p = prefix;
    format!(
        "[bus.amqp]\nenabled = true\nurl = \"amqp://guest:guest@{address}/%2f\"\ninbound_exchange = \"{p}.inbound\"\ninbound_queue = \"{p}.inbound\"\nevents_exchange = \"{p}.events\"\ndead_letter_exchange = \"{p}.dead\"\ndead_letter_queue = \"{p}.dead\"\ncommand_exchange = \"{p}.commands\"\ncommand_queue = \"{p}.commands\"\noutbound_exchange = \"{p}.outbound\"\n"
    )
}

/// Deletes the queues and exchanges a daemon configured by [`amqp_config`] declared.
pub async fn delete_amqp_topology(connection: &lapin::Connection, prefix: &str) {
    let channel = connection.create_channel().await.unwrap();
    for queue in ["inbound", "dead", "commands"] {
        let _ = channel
            .queue_delete(
                format!("{prefix}.{queue}").as_str().into(),
                Default::default(),
            )
            .await;
    }
    for exchange in ["inbound", "dead", "events", "commands", "outbound"] {
        let _ = channel
            .exchange_delete(
                format!("{prefix}.{exchange}").as_str().into(),
                Default::default(),
            )
            .await;
    }
}

/// What an [`AgentDesk`] was told, for the checks after a run.
#[derive(Debug, Default, Clone)]
pub struct DeskLog {
    /// Conversations whose `accept` was acknowledged to this agent.
    pub accepted: Vec<String>,
    /// Conversations whose `resolve` was acknowledged.
    pub resolved: Vec<String>,
    /// How many times the desk (re)connected.
    pub connections: u64,
}

/// An agent's desktop that outlives daemon restarts and failovers: it connects to one of the bases
/// `bases` holds (the daemons that are up, any of which serves agents), says it is available,
/// accepts every offer, resolves every assignment, and when the connection drops connects again.
/// What the daemon acknowledged is kept in the log.
pub struct AgentDesk {
    pub log: std::sync::Arc<std::sync::Mutex<DeskLog>>,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl AgentDesk {
    pub fn start(agent: &str, bases: tokio::sync::watch::Receiver<Vec<String>>) -> AgentDesk {
        let log = std::sync::Arc::new(std::sync::Mutex::new(DeskLog::default()));
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(AgentDesk::run(
            agent.to_owned(),
            bases,
            stopped,
            log.clone(),
        ));
        AgentDesk { log, stop, task }
    }

    /// Stops the desk and returns its log.
    pub async fn stop(self) -> DeskLog {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        self.log.lock().unwrap().clone()
    }

    async fn run(
        agent: String,
        mut bases: tokio::sync::watch::Receiver<Vec<String>>,
        mut stop: tokio::sync::watch::Receiver<bool>,
        log: std::sync::Arc<std::sync::Mutex<DeskLog>>,
    ) {
        let mut attempt = 0_usize;
        while !*stop.borrow() {
            let candidates = bases.borrow_and_update().clone();
            attempt += 1;
            let connected = match candidates.get(attempt % candidates.len().max(1)) {
                Some(base) => {
                    let url = format!(
                        "{}/v1/agents/{agent}/stream?access_token={}",
                        base.replace("http://", "ws://"),
                        agent_token(&agent)
                    );
                    tokio::time::timeout(
                        Duration::from_secs(5),
                        tokio_tungstenite::connect_async(url),
                    )
                    .await
                    .ok()
                    .and_then(Result::ok)
                }
                None => None,
            };
            let Some((socket, _)) = connected else {
                // Nobody to connect to yet: try again when the bases change, or shortly (a daemon
                // may be up before the test has published its address).
                tokio::select! {
                    _ = bases.changed() => {}
                    _ = stop.changed() => {}
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
                continue;
            };
            log.lock().unwrap().connections += 1;
            AgentDesk::serve(socket, &mut stop, &log).await;
        }
    }

    /// Works one connection until it drops or the desk is stopped.
    async fn serve(
        socket: tokio_tungstenite::WebSocketStream<
            tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
        >,
        stop: &mut tokio::sync::watch::Receiver<bool>,
        log: &std::sync::Arc<std::sync::Mutex<DeskLog>>,
    ) {
        let (mut sink, mut stream) = socket.split();
        let command = |kind: &str, conversation: &str| {
            let request_id = format!("{kind}:{conversation}");
            Message::Text(
                json!({ "type": kind, "conversation_id": conversation, "request_id": request_id })
                    .to_string()
                    .into(),
            )
        };
        let presence =
            json!({ "type": "presence", "presence": "available", "request_id": "presence" });
        if sink
            .send(Message::Text(presence.to_string().into()))
            .await
            .is_err()
        {
            return;
        }
        loop {
            let frame = tokio::select! {
                frame = stream.next() => frame,
                _ = stop.changed() => {
                    let _ = sink.close().await;
                    return;
                }
            };
            let Some(Ok(frame)) = frame else { return };
            let Message::Text(text) = frame else { continue };
            let Ok(push) = serde_json::from_str::<Value>(&text) else {
                continue;
            };
            let mut next = Vec::new();
            match push["type"].as_str().unwrap_or_default() {
                // What the daemon says this agent holds when it (re)connects: offers made before
                // a restart are still open, assignments still to be resolved.
                "hello" => {
                    for offer in push["agent"]["offers"].as_array().into_iter().flatten() {
                        next.push(command("accept", offer.as_str().unwrap_or_default()));
                    }
                    for held in push["agent"]["assigned"].as_array().into_iter().flatten() {
                        next.push(command("resolve", held.as_str().unwrap_or_default()));
                    }
                }
                "offer" => next.push(command(
                    "accept",
                    push["conversation_id"].as_str().unwrap_or_default(),
                )),
                "ack" => {
                    let request = push["request_id"].as_str().unwrap_or_default();
                    if let Some(conversation) = request.strip_prefix("accept:") {
                        log.lock().unwrap().accepted.push(conversation.to_owned());
                        next.push(command("resolve", conversation));
                    } else if let Some(conversation) = request.strip_prefix("resolve:") {
                        log.lock().unwrap().resolved.push(conversation.to_owned());
                    }
                }
                _ => {}
            }
            for message in next {
                if sink.send(message).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Capacities from the configuration: (agent, channel) → capacity, and agent → max total.
pub type Capacities = (
    std::collections::HashMap<(String, String), u64>,
    std::collections::HashMap<String, u64>,
);

/// What `/v1/admin/agents` says each agent may hold.
pub async fn capacities(daemon: &Daemon) -> Capacities {
    let (status, agents) = daemon.get("/v1/admin/agents", ADMIN).await;
    assert_eq!(status, 200, "{agents}");
    let mut per_channel = std::collections::HashMap::new();
    let mut total = std::collections::HashMap::new();
    for agent in agents["agents"].as_array().unwrap() {
        let id = agent["id"].as_str().unwrap().to_owned();
        for load in agent["load"].as_array().unwrap() {
            per_channel.insert(
                (id.clone(), load["channel"].as_str().unwrap().to_owned()),
                load["capacity"].as_u64().unwrap(),
            );
        }
        total.insert(id, agent["max_total"].as_u64().unwrap());
    }
    (per_channel, total)
}

/// Checks the router's stored documents — `conversations` as (id, channel, routing document),
/// `agents` as (id, agent document) — as a restart would load them: no agent holds more than its
/// capacity (offers, assignments and wrap-ups count, per channel and in total), and each
/// conversation names one agent at most (waiting, offered to one, assigned to one, resolved by
/// one). Returns each held conversation's agent and state.
pub fn check_routing_documents(
    conversations: &[(String, String, String)],
    agents: &[(String, String)],
    (per_channel, total): &Capacities,
) -> std::collections::BTreeMap<String, (String, String)> {
    use std::collections::HashMap;
    let mut holders = std::collections::BTreeMap::new();
    let mut load: HashMap<(String, String), u64> = HashMap::new();
    for (id, channel, document) in conversations {
        let document: Value = serde_json::from_str(document).unwrap();
        let kind = document["state"]["kind"].as_str().unwrap().to_owned();
        if let Some(agent) = document["state"]["agent"].as_str() {
            if kind == "offered" || kind == "assigned" {
                *load.entry((agent.to_owned(), channel.clone())).or_default() += 1;
            }
            holders.insert(id.clone(), (agent.to_owned(), kind));
        }
    }
    for (agent, document) in agents {
        let document: Value = serde_json::from_str(document).unwrap();
        for wrap_up in document["wrap_ups"].as_array().into_iter().flatten() {
            let channel = wrap_up[1].as_str().unwrap().to_owned();
            *load.entry((agent.clone(), channel)).or_default() += 1;
        }
    }
    let mut totals: HashMap<String, u64> = HashMap::new();
    for ((agent, channel), count) in &load {
        let capacity = per_channel
            .get(&(agent.clone(), channel.clone()))
            .copied()
            .unwrap_or(0);
        assert!(
            *count <= capacity,
            "{agent} holds {count} on {channel}, capacity {capacity}"
        );
        *totals.entry(agent.clone()).or_default() += count;
    }
    for (agent, count) in totals {
        assert!(
            count <= total[&agent],
            "{agent} holds {count} in total, max {}",
            total[&agent]
        );
    }
    holders
}

/// Which agent each conversation was accepted by, from the desks' logs; fails if two agents were
/// both told they had accepted the same conversation (two owners).
pub fn accepted_by(logs: &[(&str, DeskLog)]) -> std::collections::HashMap<String, String> {
    let mut accepted = std::collections::HashMap::new();
    for (agent, log) in logs {
        for conversation in &log.accepted {
            if let Some(other) = accepted.insert(conversation.clone(), (*agent).to_owned()) {
                assert_eq!(
                    &other, agent,
                    "{conversation} accepted by {other} and {agent}"
                );
            }
        }
    }
    accepted
}

/// A local SMTP sink started by the test: takes every message and hands over its raw bytes (dot
/// unstuffed), so what switchboard sent can be checked byte for byte (headers, DKIM signature).
pub struct Sink {
    pub port: u16,
    received: tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>,
}

impl Sink {
    pub async fn start() -> Sink {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (sender, received) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let sender = sender.clone();
                tokio::spawn(async move {
                    let _ = sink_session(stream, sender).await;
                });
            }
        });
        Sink { port, received }
    }

    /// The next message, waiting at most `seconds`.
    pub async fn next(&mut self, seconds: u64) -> String {
        let raw = tokio::time::timeout(Duration::from_secs(seconds), self.received.recv())
            .await
            .expect("a message at the sink in time")
            .unwrap();
        String::from_utf8(raw).unwrap()
    }
}

async fn sink_session(
    stream: tokio::net::TcpStream,
    sender: tokio::sync::mpsc::UnboundedSender<Vec<u8>>,
) -> std::io::Result<()> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let (reader, mut writer) = stream.into_split();
    let mut reader = tokio::io::BufReader::new(reader);
    writer.write_all(b"220 sink ESMTP\r\n").await?;
    let mut line = Vec::new();
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line).await? == 0 {
            return Ok(());
        }
        let verb = String::from_utf8_lossy(&line[..line.len().min(4)]).to_ascii_uppercase();
        let answer: &[u8] = match verb.as_str() {
            "EHLO" => b"250-sink\r\n250 8BITMIME\r\n",
            "QUIT" => {
                writer.write_all(b"221 bye\r\n").await?;
                return Ok(());
            }
            "DATA" => {
                writer.write_all(b"354 go on\r\n").await?;
                let mut message = Vec::new();
                loop {
                    line.clear();
                    if reader.read_until(b'\n', &mut line).await? == 0 {
                        return Ok(());
                    }
                    if line == b".\r\n" {
                        break;
                    }
                    let unstuffed = if line.starts_with(b"..") {
                        &line[1..]
                    } else {
                        &line[..]
                    };
                    message.extend_from_slice(unstuffed);
                }
                let _ = sender.send(message);
                b"250 kept\r\n"
            }
            _ => b"250 ok\r\n",
        };
        writer.write_all(answer).await?;
    }
}

/// A header's value (unfolded) in a raw message's header section.
pub fn header(raw: &str, name: &str) -> Option<String> {
    let head = raw.split("\r\n\r\n").next().unwrap();
    let mut value: Option<String> = None;
    for line in head.split("\r\n") {
        if line.starts_with([' ', '\t']) {
            if let Some(value) = value.as_mut() {
                value.push(' ');
                value.push_str(line.trim());
            }
            continue;
        }
        if value.is_some() {
            break;
        }
        if let Some((key, rest)) = line.split_once(':')
            && key.eq_ignore_ascii_case(name)
        {
            value = Some(rest.trim().to_owned());
        }
    }
    value
}
