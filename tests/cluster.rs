//! Several instances on one PostgreSQL schema, through the real binary: every instance takes
//! intake, one leads the router under a fenced lease, followers forward agent commands and push
//! what the leader decided to the agents connected to them, and a killed or paused leader is
//! replaced without losing or double-routing anything.
//!
//! `SWITCHBOARD_CLUSTER_KILLS` sets how many leaders the failover test kills (default 2; 10 with
//! `SWITCHBOARD_LONG_TESTS=1`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::{ADMIN, AgentDesk, Customer, Daemon, Sink, api_message, eventually};
use serde_json::{Value, json};
use ulid::Ulid;

fn postgres_url() -> String {
    std::env::var("SWITCHBOARD_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// A fresh schema for one test, dropped when the test ends.
struct Schema {
    name: String,
    client: tokio_postgres::Client,
}

impl Schema {
    async fn new() -> Schema {
        let (client, connection) = tokio_postgres::connect(&postgres_url(), tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        Schema {
            name: format!("sb_cluster_{}", Ulid::new().to_string().to_lowercase()),
            client,
        }
    }

    /// Starts an instance named `node` on this schema (short lease, so failovers are quick).
    fn instance(&self, node: &str) -> Daemon {
        self.instance_with(node, "")
    }

    /// [`Schema::instance`] with more configuration.
    fn instance_with(&self, node: &str, extra: &str) -> Daemon {
        let store = format!(
            "backend = \"postgres\"\nurl = \"{}\"\nschema = \"{}\"\npool_size = 4",
            postgres_url(),
            self.name
        );
        let cluster = format!(
            "{extra}\n[cluster]\nnode_id = \"{node}\"\nlease_ttl_ms = 1500\nrenew_every_ms = 300\npoll_every_ms = 200\ncommand_timeout_ms = 5000"
        );
        Daemon::start_on_store_with(&store, &cluster)
    }

    async fn count(&self, sql: &str) -> i64 {
        let sql = sql.replace("{schema}", &self.name);
        self.client.query_one(&sql, &[]).await.unwrap().get(0)
    }

    async fn drop_schema(self) {
        self.client
            .batch_execute(&format!("DROP SCHEMA {} CASCADE", self.name))
            .await
            .unwrap();
    }
}

/// What `GET /v1/admin/cluster` says on `daemon`.
async fn cluster_view(daemon: &Daemon) -> Option<Value> {
    let (status, view) = daemon.get("/v1/admin/cluster", ADMIN).await;
    (status == 200).then_some(view)
}

/// Waits until `daemon` sees a live leader among `instances` with an epoch above `after`; returns
/// the leader's index and epoch.
async fn leader_among(instances: &[Option<Daemon>], after: u64) -> (usize, u64) {
    eventually(20, "a leader", || async {
        for (index, daemon) in instances.iter().enumerate() {
            let Some(daemon) = daemon else { continue };
            let Some(view) = cluster_view(daemon).await else {
                continue;
            };
            if view["this"]["leader"] == true {
                let epoch = view["this"]["epoch"].as_u64()?;
                if epoch > after {
                    return Some((index, epoch));
                }
            }
        }
        None
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_instances_take_intake_and_agents_on_followers_work_as_on_one_node() {
    let schema = Schema::new().await;
    let instances: Vec<Option<Daemon>> = (0..3)
        .map(|index| Some(schema.instance(&format!("node-{index}"))))
        .collect();
    let (leader, epoch) = leader_among(&instances, 0).await;
    let view = eventually(10, "three members", || async {
        let view = cluster_view(instances[0].as_ref().unwrap()).await?;
        (view["members"].as_array()?.len() == 3).then_some(view)
    })
    .await;
    assert_eq!(view["leader"], json!(format!("node-{leader}")), "{view}");
    assert_eq!(view["epoch"], json!(epoch), "{view}");
    let mut leaders = 0.0;
    for daemon in instances.iter().flatten() {
        leaders += daemon.metric("switchboard_cluster_leader").await.unwrap();
        // Ready as soon as it can take intake, leader or not.
        let (status, ready) = daemon.get("/readyz", "").await;
        assert_eq!(status, 200, "{ready}");
    }
    assert_eq!(leaders, 1.0);

    // Agents on the two followers: their commands are forwarded, their pushes come from the store.
    let followers: Vec<usize> = (0..3).filter(|index| *index != leader).collect();
    let mut desks = Vec::new();
    for (agent, index) in [("alice", followers[0]), ("bob", followers[1])] {
        let daemon = instances[index].as_ref().unwrap();
        let mut socket = daemon.agent_socket(agent).await;
        let answer = socket
            .command(json!({ "type": "presence", "presence": "available" }))
            .await;
        assert_eq!(answer["type"], "ack", "{answer}");
        desks.push((agent, socket));
    }

    // Messages posted round-robin across the instances, each from its own customer.
    const CONVERSATIONS: usize = 12;
    let mut expected = Vec::new();
    for number in 0..CONVERSATIONS {
        let daemon = instances[number % 3].as_ref().unwrap();
        let (status, receipt) = daemon
            .ingest(api_message(
                &format!("rr-{number}"),
                &format!("customer-{number}"),
                "hello, my order has not arrived",
            ))
            .await;
        assert_eq!(status, 202, "{receipt}");
        expected.push(receipt["conversation_id"].as_str().unwrap().to_owned());
    }

    // Each agent accepts what it is offered, answers, resolves, until every one was handled.
    let mut handled: HashMap<String, &str> = HashMap::new();
    while handled.len() < CONVERSATIONS {
        for (agent, socket) in &mut desks {
            let Some(push) = socket.try_next(Duration::from_millis(100)).await else {
                continue;
            };
            if push["type"] != "offer" {
                continue;
            }
            let conversation = push["conversation_id"].as_str().unwrap().to_owned();
            for command in [
                json!({ "type": "accept", "conversation_id": conversation }),
                json!({ "type": "reply", "conversation_id": conversation, "text": "on its way" }),
                json!({ "type": "resolve", "conversation_id": conversation }),
            ] {
                let answer = socket.command_keeping(command.clone()).await;
                assert_eq!(answer["type"], "ack", "{agent} {command}: {answer}");
            }
            assert!(
                handled.insert(conversation.clone(), agent).is_none(),
                "{conversation} offered twice"
            );
        }
    }
    for conversation in &expected {
        assert!(
            handled.contains_key(conversation),
            "{conversation} never offered"
        );
    }

    // The router's views answer the same on every instance: followers ask the leader. (Loads and
    // wrap-ups move as wrap-up timers fire, so the comparison takes what stays put.)
    let stable = |agents: &Value| -> Vec<(Value, Value, Value)> {
        agents["agents"]
            .as_array()
            .unwrap()
            .iter()
            .map(|agent| {
                (
                    agent["id"].clone(),
                    agent["presence"].clone(),
                    agent["max_total"].clone(),
                )
            })
            .collect()
    };
    let (_, on_leader) = instances[leader]
        .as_ref()
        .unwrap()
        .get("/v1/admin/agents", ADMIN)
        .await;
    for daemon in instances.iter().flatten() {
        let (status, agents) = daemon.get("/v1/admin/agents", ADMIN).await;
        assert_eq!(status, 200, "{agents}");
        assert_eq!(stable(&agents), stable(&on_leader), "{agents}");
        let (status, queues) = daemon.get("/v1/admin/queues", ADMIN).await;
        assert_eq!(status, 200, "{queues}");
        assert_eq!(queues["queues"].as_array().unwrap().len(), 3, "{queues}");
        let (status, detail) = daemon
            .get(&format!("/v1/admin/conversations/{}", expected[0]), ADMIN)
            .await;
        assert_eq!(status, 200, "{detail}");
        assert_eq!(detail["routing"]["state"], "resolved", "{detail}");
    }
    let alice_desk = instances[followers[0]].as_ref().unwrap();
    let (status, alice) = alice_desk
        .get("/v1/agents/alice", &common::agent_token("alice"))
        .await;
    assert_eq!(status, 200, "{alice}");
    assert_eq!(alice["presence"], "available", "{alice}");
    let (status, lists) = alice_desk
        .get(
            "/v1/agents/alice/conversations",
            &common::agent_token("alice"),
        )
        .await;
    assert_eq!(status, 200, "{lists}");
    assert_eq!(lists["offers"], json!([]), "{lists}");
    assert_eq!(
        schema
            .count("SELECT count(*) FROM {schema}.messages WHERE direction = 'outbound'")
            .await,
        CONVERSATIONS as i64
    );
    assert_eq!(
        schema
            .count("SELECT count(*) FROM {schema}.conversations WHERE status = 'resolved'")
            .await,
        CONVERSATIONS as i64
    );
    // Every conversation is announced once, whichever instance took its first message in.
    assert_eq!(
        schema
            .count(
                "SELECT count(DISTINCT conversation_id) FROM {schema}.outbox \
                 WHERE kind = 'conversation.created'"
            )
            .await,
        CONVERSATIONS as i64
    );
    assert_eq!(
        schema
            .count("SELECT count(*) FROM {schema}.outbox WHERE kind = 'conversation.created'")
            .await,
        CONVERSATIONS as i64
    );
    drop(desks);
    drop(instances);
    schema.drop_schema().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_chat_customer_on_a_follower_sees_what_one_node_would_show() {
    let schema = Schema::new().await;
    let instances: Vec<Option<Daemon>> = (0..2)
        .map(|index| {
            Some(schema.instance_with(
                &format!("chat-{index}"),
                "[chat]\nabandon_after_seconds = 1",
            ))
        })
        .collect();
    let (leader, _) = leader_among(&instances, 0).await;
    let on_leader = instances[leader].as_ref().unwrap();
    let on_follower = instances[1 - leader].as_ref().unwrap();

    // The agent works on the leader, the customer chats on the follower: routing news comes from
    // the committed events followed from the store, typing crosses instances as live signals.
    common::chat_with_alice(on_follower, on_leader, "visitor_on_a_follower_0001").await;
    let mut alice = on_leader.agent_socket("alice").await;

    // With nobody available, a customer who leaves from the follower is counted abandoned by the
    // leader's router.
    let answer = alice
        .command(json!({ "type": "presence", "presence": "away" }))
        .await;
    assert_eq!(answer["type"], "ack", "{answer}");
    let (mut leaving, _) = Customer::start(
        on_follower,
        json!({ "visitor_id": "visitor_on_a_follower_0002" }),
    )
    .await;
    let ack = leaving.say("c1", "anybody there?").await;
    let left = ack["conversation_id"].as_str().unwrap().to_owned();
    let queued = leaving.next_of("queued").await;
    assert_eq!(queued["position"], 1, "{queued}");
    leaving.close().await;
    eventually(15, "the abandoned chat", || async {
        let (_, detail) = on_follower
            .get(&format!("/v1/admin/conversations/{left}"), ADMIN)
            .await;
        (detail["routing"]["state"] != "waiting").then_some(())
    })
    .await;
    assert_eq!(
        on_leader
            .metric("switchboard_conversations_abandoned_total")
            .await,
        Some(1.0)
    );
    assert_eq!(
        schema
            .count("SELECT count(*) FROM {schema}.outbox WHERE kind = 'conversation.abandoned'")
            .await,
        1
    );
    drop(alice);
    drop(instances);
    schema.drop_schema().await;
}

/// Every instance follows the committed events, but only the leader answers an email with its
/// acknowledgement: each customer gets one, whichever instance took the mail.
#[tokio::test]
async fn an_email_is_acknowledged_once_by_the_leader() {
    let schema = Schema::new().await;
    let mut sink = Sink::start().await;
    let email = format!(
        "[channels.email]\nmailboxes = [\"support@example.com\"]\n\n\
         [channels.email.acknowledgement]\nenabled = true\ntext = \"We have it: {{ticket}}\"\n\n\
         [channels.email.relay]\nhost = \"127.0.0.1\"\nport = {}\nsecurity = \"none\"\n",
        sink.port
    );
    let instances: Vec<Option<Daemon>> = (0..3)
        .map(|index| Some(schema.instance_with(&format!("mail-{index}"), &email)))
        .collect();
    let (leader, _) = leader_among(&instances, 0).await;
    for (index, customer) in ["ann@customer.example", "bob@customer.example"]
        .into_iter()
        .enumerate()
    {
        // Taken by a follower, then by the leader.
        let daemon = instances[(leader + 1 - index) % 3].as_ref().unwrap();
        let raw = format!(
            "From: {customer}\r\nTo: Example Support <support@example.com>\r\n\
             Subject: Order {index}\r\nMessage-ID: <order{index}@customer.example>\r\n\
             Date: Tue, 1 Dec 2026 09:00:00 +0000\r\nMIME-Version: 1.0\r\n\
             Content-Type: text/plain; charset=utf-8\r\n\r\nWhere is it?\r\n"
        );
        let response = daemon
            .http
            .post(daemon.url("/v1/channels/email/raw"))
            .header("content-type", "message/rfc822")
            .bearer_auth(common::INGEST)
            .body(raw)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 202);
        // The three instances see the event within milliseconds of each other: had a follower
        // answered Ann too, its answer would come before Bob's, whose mail is sent only now.
        let ack = sink.next(20).await;
        assert_eq!(common::header(&ack, "To").unwrap(), customer, "{ack}");
    }
    let sent = "switchboard_email_auto_replies_total{result=\"sent\"}";
    let on_leader = instances[leader].as_ref().unwrap();
    // Counted just after the relay took the mail.
    eventually(10, "both answers counted", || async {
        (on_leader.metric(sent).await == Some(2.0)).then_some(())
    })
    .await;
    for (index, daemon) in instances.iter().enumerate() {
        if index != leader {
            let counted = daemon.as_ref().unwrap().metric(sent).await;
            assert_eq!(counted.unwrap_or_default(), 0.0, "follower {index}");
        }
    }
    drop(instances);
    schema.drop_schema().await;
}

/// Takeovers that restored the router from the state read while the old lease ran out.
const READ_AHEAD: &str = "switchboard_cluster_takeovers_read_ahead_total";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_leader_is_replaced_and_every_acknowledged_message_is_routed_once() {
    let kills: usize = std::env::var("SWITCHBOARD_CLUSTER_KILLS")
        .ok()
        .and_then(|kills| kills.parse().ok())
        .unwrap_or(
            if std::env::var("SWITCHBOARD_LONG_TESTS").is_ok_and(|flag| flag == "1") {
                10
            } else {
                2
            },
        );
    let schema = Schema::new().await;
    let names: Vec<String> = (0..3).map(|index| format!("node-{index}")).collect();
    let mut instances: Vec<Option<Daemon>> = names
        .iter()
        .map(|name| Some(schema.instance(name)))
        .collect();
    let (mut leader, mut epoch) = leader_among(&instances, 0).await;
    // Agents accepting and resolving throughout, connected to whichever instances are up.
    let live = |instances: &[Option<Daemon>]| -> Vec<String> {
        instances
            .iter()
            .flatten()
            .map(|daemon| daemon.base.clone())
            .collect()
    };
    let (bases_tx, bases) = tokio::sync::watch::channel(live(&instances));
    let agents = ["alice", "bob"];
    let desks: Vec<AgentDesk> = agents
        .iter()
        .map(|agent| AgentDesk::start(agent, bases.clone()))
        .collect();
    let mut acknowledged = Vec::new();
    let mut failovers = Vec::new();
    let mut number = 0;
    for kill in 0..kills {
        // Load on every instance, then the leader dies without a chance to flush anything.
        for _ in 0..30 {
            let daemon = instances[number % 3].as_ref().unwrap();
            let id = format!("kill-{number}");
            let (status, receipt) = daemon
                .ingest(api_message(&id, &format!("customer-{number}"), "hello"))
                .await;
            assert_eq!(status, 202, "{receipt}");
            acknowledged.push(id);
            number += 1;
        }
        let mut read_ahead_before = Vec::new();
        for instance in &instances {
            read_ahead_before.push(match instance {
                Some(daemon) => daemon.metric(READ_AHEAD).await.unwrap_or_default(),
                None => 0.0,
            });
        }
        instances[leader].as_mut().unwrap().kill();
        let killed_at = Instant::now();
        instances[leader] = None;
        bases_tx.send_replace(live(&instances));
        // Intake goes on at the survivors while nobody leads yet.
        let survivor = (0..3).find(|index| instances[*index].is_some()).unwrap();
        let id = format!("during-{kill}");
        let (status, receipt) = instances[survivor]
            .as_ref()
            .unwrap()
            .ingest(api_message(&id, &format!("late-{kill}"), "hello"))
            .await;
        assert_eq!(status, 202, "{receipt}");
        acknowledged.push(id.clone());
        let (next, next_epoch) = leader_among(&instances, epoch).await;
        // Routing resumed: the message taken while nobody led is routed by the new leader.
        let routed = format!(
            "SELECT count(*) FROM {{schema}}.messages WHERE provider_message_id = '{id}' AND routed"
        );
        eventually(20, "routing after the failover", || async {
            (schema.count(&routed).await == 1).then_some(())
        })
        .await;
        failovers.push(killed_at.elapsed());
        assert!(next_epoch > epoch);
        // Nothing was written after the old leader died: the new one restored the state it had
        // read while the lease ran out.
        let read_ahead = instances[next].as_ref().unwrap().metric(READ_AHEAD).await;
        assert_eq!(
            read_ahead,
            Some(read_ahead_before[next] + 1.0),
            "takeover {kill} by instance {next}"
        );
        let killed = leader;
        (leader, epoch) = (next, next_epoch);
        // The killed instance comes back (as a follower) under its name.
        instances[killed] = Some(schema.instance(&names[killed]));
        bases_tx.send_replace(live(&instances));
    }
    let mut sorted = failovers.clone();
    sorted.sort();
    println!(
        "failover (kill -9 to the next routed message), {} kills: p50 {:?}, max {:?}",
        sorted.len(),
        sorted[sorted.len() / 2],
        sorted[sorted.len() - 1]
    );
    // Every acknowledged message is stored exactly once and was routed.
    for id in &acknowledged {
        let stored = schema
            .count(&format!(
                "SELECT count(*) FROM {{schema}}.messages WHERE provider_message_id = '{id}'"
            ))
            .await;
        assert_eq!(stored, 1, "{id}");
    }
    eventually(20, "every message routed", || async {
        (schema
            .count(
                "SELECT count(*) FROM {schema}.messages WHERE direction = 'inbound' AND NOT routed",
            )
            .await
            == 0)
            .then_some(())
    })
    .await;
    // One conversation per customer, each routed once: exactly one message.received event per
    // message (no message was handed to the router twice).
    let received = schema
        .count("SELECT count(DISTINCT data::text) - count(*) FROM {schema}.outbox WHERE kind = 'message.received'")
        .await;
    assert_eq!(received, 0, "a message was routed twice");
    assert_eq!(
        schema
            .count("SELECT count(*) FROM {schema}.outbox WHERE kind = 'message.received'")
            .await,
        acknowledged.len() as i64
    );

    // Owners and capacity, as the agents were told and as the store keeps them.
    let capacities = common::capacities(instances[leader].as_ref().unwrap()).await;
    let mut logs = Vec::new();
    for (agent, desk) in agents.into_iter().zip(desks) {
        logs.push((agent, desk.stop().await));
    }
    let accepted_by = common::accepted_by(&logs);
    assert!(!accepted_by.is_empty(), "the agents accepted nothing");
    let conversations: Vec<(String, String, String)> = schema
        .client
        .query(
            &format!(
                "SELECT id, channel, routing_state::text FROM {}.conversations WHERE routing_state IS NOT NULL",
                schema.name
            ),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect();
    let agent_documents: Vec<(String, String)> = schema
        .client
        .query(
            &format!(
                "SELECT agent_id, state::text FROM {}.agent_state",
                schema.name
            ),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    let holders = common::check_routing_documents(&conversations, &agent_documents, &capacities);
    for (conversation, agent) in &accepted_by {
        let (holder, state) = &holders[conversation];
        assert_eq!(holder, agent, "{conversation} is {state} with {holder}");
    }
    // No duplicate assignment once events are deduped by id: each conversation's assigned events
    // (one id each) are one, to the agent that accepted.
    let assigned = schema
        .client
        .query(
            &format!(
                "SELECT conversation_id, count(DISTINCT event_id), min(data::json->>'agent_id') \
                 FROM {}.outbox WHERE kind = 'conversation.assigned' GROUP BY conversation_id",
                schema.name
            ),
            &[],
        )
        .await
        .unwrap();
    for row in &assigned {
        let (conversation, events, agent): (String, i64, String) =
            (row.get(0), row.get(1), row.get(2));
        assert_eq!(events, 1, "{conversation} assigned {events} times");
        // (An accept whose answer was lost with a killed instance is not in the desks' logs.)
        if let Some(acceptor) = accepted_by.get(&conversation) {
            assert_eq!(acceptor, &agent, "{conversation}");
        }
    }
    println!(
        "{} conversations accepted and resolved across {kills} leader kills, {} assignment events",
        accepted_by.len(),
        assigned.len()
    );
    drop(instances);
    schema.drop_schema().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paused_leader_is_fenced_and_steps_down() {
    let schema = Schema::new().await;
    let mut instances: Vec<Option<Daemon>> = vec![
        Some(schema.instance("node-a")),
        Some(schema.instance("node-b")),
    ];
    let (old, old_epoch) = leader_among(&instances, 0).await;
    let other = 1 - old;
    let paused = instances[old].take().unwrap();
    paused.signal("STOP");
    // A message sent to the paused leader waits in its socket until it runs again.
    let stuck = tokio::spawn({
        let http = paused.http.clone();
        let url = paused.url("/v1/messages");
        async move {
            http.post(url)
                .bearer_auth(common::INGEST)
                .json(&api_message("to-the-paused", "customer-paused", "hello"))
                .send()
                .await
                .map(|response| response.status().as_u16())
        }
    });
    let (next, new_epoch) = leader_among(&instances, old_epoch).await;
    assert_eq!(next, other);
    let other_daemon = instances[other].as_ref().unwrap();
    let (status, _) = other_daemon
        .ingest(api_message("to-the-new", "customer-new", "hello"))
        .await;
    assert_eq!(status, 202);
    eventually(20, "the new leader routes", || async {
        (schema
            .count("SELECT count(*) FROM {schema}.messages WHERE provider_message_id = 'to-the-new' AND routed")
            .await
            == 1)
            .then_some(())
    })
    .await;
    let stale_before = schema
        .count(&format!(
            "SELECT count(*) FROM {{schema}}.conversations WHERE epoch < {new_epoch}"
        ))
        .await;

    paused.signal("CONT");
    // The old leader takes the message in (intake needs no lease) and hands it on.
    assert_eq!(stuck.await.unwrap().unwrap(), 202);
    eventually(20, "the old leader steps down", || async {
        let view = cluster_view(&paused).await?;
        let leader = paused.metric("switchboard_cluster_leader").await?;
        (view["this"]["leader"] == false && leader == 0.0).then_some(())
    })
    .await;
    eventually(20, "the paused leader's message routed by the new leader", || async {
        (schema
            .count(&format!(
                "SELECT count(*) FROM {{schema}}.messages m JOIN {{schema}}.conversations c
                 ON c.id = m.conversation_id
                 WHERE m.provider_message_id = 'to-the-paused' AND m.routed AND c.epoch = {new_epoch}"
            ))
            .await
            == 1)
            .then_some(())
    })
    .await;
    // Nothing the old leader decided after the takeover landed: no conversation gained a write
    // under an older epoch.
    let stale_after = schema
        .count(&format!(
            "SELECT count(*) FROM {{schema}}.conversations WHERE epoch < {new_epoch}"
        ))
        .await;
    assert!(
        stale_after <= stale_before,
        "{stale_before} -> {stale_after}"
    );
    let view = cluster_view(other_daemon).await.unwrap();
    assert_eq!(
        view["leader"],
        json!(format!("node-{}", if other == 0 { "a" } else { "b" }))
    );
    assert_eq!(view["epoch"], json!(new_epoch));
    drop(paused);
    drop(instances);
    schema.drop_schema().await;
}
