//! Prometheus metrics: names follow Prometheus conventions (prefix `switchboard_`, base units, `_total`).

use std::sync::Arc;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Every metric switchboard exports, registered in its own registry: a cheap handle (every request
/// and task holds one), the metrics themselves are shared.
#[derive(Debug, Clone)]
pub struct Metrics(Arc<MetricSet>);

impl std::ops::Deref for Metrics {
    type Target = MetricSet;

    fn deref(&self) -> &MetricSet {
        &self.0
    }
}

/// The metrics behind a [`Metrics`] handle.
#[derive(Debug)]
pub struct MetricSet {
    pub registry: Registry,
    pub messages_received: IntCounterVec,
    pub messages_duplicate: IntCounterVec,
    pub messages_sent: IntCounterVec,
    pub messages_failed: IntCounterVec,
    pub conversations: IntGaugeVec,
    pub queue_waiting: IntGaugeVec,
    pub queue_oldest_wait: prometheus::GaugeVec,
    /// Each queue's service-level target (answer within), so rules compare waits against it.
    pub queue_sla_target: prometheus::GaugeVec,
    /// Available agents serving each queue.
    pub queue_agents_available: IntGaugeVec,
    /// How long answered conversations waited, by the queue they were answered from.
    pub queue_answer_wait_seconds: HistogramVec,
    /// Answered conversations by queue and whether within the queue's SLA target (`true`/`false`).
    pub queue_answered: IntCounterVec,
    pub offers: IntCounterVec,
    pub sla_breaches: IntCounterVec,
    pub escalations: IntCounter,
    pub transfers: IntCounter,
    pub abandoned: IntCounter,
    pub agents: IntGaugeVec,
    /// Conversations offered to or held by signed-in agents (wrap-ups included): occupied slots.
    pub agent_load: IntGauge,
    /// The total capacity (`max_total`) of signed-in agents: the slots they could hold.
    pub agent_capacity: IntGauge,
    pub routing_decision_seconds: Histogram,
    pub ingest_to_offer_seconds: Histogram,
    pub store_commit_seconds: HistogramVec,
    pub outbox_backlog: IntGauge,
    pub ready: IntGauge,
    /// 1 while connected to a broker, by bus (`nats`, `amqp`).
    pub bus_connected: IntGaugeVec,
    /// Inbound bus messages refused as invalid and dead-lettered, by bus.
    pub bus_dead_lettered: IntCounterVec,
    /// Inbound bus messages handed back to the broker for redelivery because they could not be
    /// stored now (the store unavailable, shutting down), by bus.
    pub bus_redeliveries: IntCounterVec,
    /// Automatic email answers by result: sent, failed, or suppressed (loop signal, sender cap).
    pub email_auto_replies: IntCounterVec,
    /// 1 while this instance holds the router's lease (a single node: always).
    pub cluster_leader: IntGauge,
    /// The fencing epoch this instance last led under.
    pub cluster_epoch: IntGauge,
    /// How often this instance took the router's lease over.
    pub cluster_failovers: IntCounter,
    /// Takeovers that used the router's state read while the old lease ran out.
    pub cluster_takeovers_read_ahead: IntCounter,
    /// Inbound messages not yet routed plus agent commands not yet run by the leader.
    pub cluster_forwarding_backlog: IntGauge,
}

/// The configured brokers' connection states: what `/readyz` reports, kept in the
/// `switchboard_bus_connected{bus}` gauge so the metric and the health check never disagree.
#[derive(Debug, Clone)]
pub struct BusStates {
    names: Vec<&'static str>,
    gauge: IntGaugeVec,
}

impl BusStates {
    /// The given buses, all disconnected until they say otherwise.
    pub fn new(metrics: &Metrics, names: Vec<&'static str>) -> BusStates {
        for name in &names {
            metrics.bus_connected.with_label_values(&[name]).set(0);
            // Exported at 0 from the start, like the series of `Metrics::initialise_series`.
            metrics.bus_dead_lettered.with_label_values(&[name]);
            metrics.bus_redeliveries.with_label_values(&[name]);
        }
        BusStates {
            names,
            gauge: metrics.bus_connected.clone(),
        }
    }

    pub fn set(&self, bus: &str, connected: bool) {
        self.gauge
            .with_label_values(&[bus])
            .set(i64::from(connected));
    }

    /// (bus, connected) for every configured broker.
    pub fn states(&self) -> Vec<(&'static str, bool)> {
        self.names
            .iter()
            .map(|name| (*name, self.gauge.with_label_values(&[name]).get() == 1))
            .collect()
    }
}

fn counter_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> Result<IntCounterVec, prometheus::Error> {
    let metric = IntCounterVec::new(Opts::new(name, help), labels)?;
    registry.register(Box::new(metric.clone()))?;
    Ok(metric)
}

fn gauge_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> Result<IntGaugeVec, prometheus::Error> {
    let metric = IntGaugeVec::new(Opts::new(name, help), labels)?;
    registry.register(Box::new(metric.clone()))?;
    Ok(metric)
}

fn histogram(
    registry: &Registry,
    name: &str,
    help: &str,
    buckets: Vec<f64>,
) -> Result<Histogram, prometheus::Error> {
    let metric = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))?;
    registry.register(Box::new(metric.clone()))?;
    Ok(metric)
}

impl Metrics {
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let latency = vec![
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
        ];
        let fast = vec![
            0.000_001, 0.000_005, 0.000_01, 0.000_05, 0.000_1, 0.000_5, 0.001, 0.005, 0.01,
        ];
        let queue_oldest_wait = prometheus::GaugeVec::new(
            Opts::new(
                "switchboard_queue_oldest_wait_seconds",
                "How long the oldest unanswered conversation of a queue has waited.",
            ),
            &["queue"],
        )?;
        registry.register(Box::new(queue_oldest_wait.clone()))?;
        let store_commit_seconds = HistogramVec::new(
            HistogramOpts::new(
                "switchboard_store_commit_seconds",
                "Time to commit a group of writes to the store.",
            )
            .buckets(latency.clone()),
            &["kind"],
        )?;
        registry.register(Box::new(store_commit_seconds.clone()))?;
        let queue_sla_target = prometheus::GaugeVec::new(
            Opts::new(
                "switchboard_queue_sla_target_seconds",
                "A queue's service-level target: conversations should be answered within it.",
            ),
            &["queue"],
        )?;
        registry.register(Box::new(queue_sla_target.clone()))?;
        // Waits to answer are seconds to minutes, not the sub-second latencies above.
        let queue_answer_wait_seconds = HistogramVec::new(
            HistogramOpts::new(
                "switchboard_queue_answer_wait_seconds",
                "How long answered conversations waited before an agent took them, by queue.",
            )
            .buckets(vec![
                1.0, 5.0, 10.0, 20.0, 30.0, 60.0, 90.0, 120.0, 180.0, 300.0, 600.0, 1800.0,
            ]),
            &["queue"],
        )?;
        registry.register(Box::new(queue_answer_wait_seconds.clone()))?;
        let agent_load = IntGauge::new(
            "switchboard_agent_load_conversations",
            "Conversations offered to or held by signed-in agents, wrap-ups included.",
        )?;
        registry.register(Box::new(agent_load.clone()))?;
        let agent_capacity = IntGauge::new(
            "switchboard_agent_capacity_conversations",
            "Conversations signed-in agents can hold at once (the sum of their max_total).",
        )?;
        registry.register(Box::new(agent_capacity.clone()))?;
        let escalations = IntCounter::new(
            "switchboard_escalations_total",
            "Conversations escalated to the next tier by an agent.",
        )?;
        registry.register(Box::new(escalations.clone()))?;
        let transfers = IntCounter::new(
            "switchboard_transfers_total",
            "Conversations transferred by an agent.",
        )?;
        registry.register(Box::new(transfers.clone()))?;
        let abandoned = IntCounter::new(
            "switchboard_conversations_abandoned_total",
            "Customers who left before being answered.",
        )?;
        registry.register(Box::new(abandoned.clone()))?;
        let outbox_backlog = IntGauge::new(
            "switchboard_outbox_backlog",
            "Events written but not yet published.",
        )?;
        registry.register(Box::new(outbox_backlog.clone()))?;
        let cluster_leader = IntGauge::new(
            "switchboard_cluster_leader",
            "1 while this instance runs the router (holds the lease), else 0.",
        )?;
        registry.register(Box::new(cluster_leader.clone()))?;
        let cluster_epoch = IntGauge::new(
            "switchboard_cluster_epoch",
            "The fencing epoch this instance last led under.",
        )?;
        registry.register(Box::new(cluster_epoch.clone()))?;
        let cluster_failovers = IntCounter::new(
            "switchboard_cluster_failovers_total",
            "Times this instance took the router's lease over.",
        )?;
        registry.register(Box::new(cluster_failovers.clone()))?;
        let cluster_takeovers_read_ahead = IntCounter::new(
            "switchboard_cluster_takeovers_read_ahead_total",
            "Takeovers that used the router's state read while the old leader's lease ran out.",
        )?;
        registry.register(Box::new(cluster_takeovers_read_ahead.clone()))?;
        let cluster_forwarding_backlog = IntGauge::new(
            "switchboard_cluster_forwarding_backlog",
            "Inbound messages not yet routed plus agent commands not yet run by the leader.",
        )?;
        registry.register(Box::new(cluster_forwarding_backlog.clone()))?;
        let ready = IntGauge::new(
            "switchboard_ready",
            "1 when recovery is done and the store is writable.",
        )?;
        registry.register(Box::new(ready.clone()))?;
        Ok(Metrics(Arc::new(MetricSet {
            messages_received: counter_vec(
                &registry,
                "switchboard_messages_received_total",
                "Inbound messages stored, by channel.",
                &["channel"],
            )?,
            messages_duplicate: counter_vec(
                &registry,
                "switchboard_messages_duplicate_total",
                "Inbound messages already stored (provider retries), by channel.",
                &["channel"],
            )?,
            messages_sent: counter_vec(
                &registry,
                "switchboard_messages_sent_total",
                "Agent replies delivered to their channel, by channel.",
                &["channel"],
            )?,
            messages_failed: counter_vec(
                &registry,
                "switchboard_messages_failed_total",
                "Agent replies that could not be delivered, by channel.",
                &["channel"],
            )?,
            conversations: gauge_vec(
                &registry,
                "switchboard_conversations",
                "Conversations held by the router, by state.",
                &["state"],
            )?,
            queue_waiting: gauge_vec(
                &registry,
                "switchboard_queue_waiting",
                "Unanswered conversations waiting, by home queue.",
                &["queue"],
            )?,
            queue_oldest_wait,
            queue_sla_target,
            queue_agents_available: gauge_vec(
                &registry,
                "switchboard_queue_agents_available",
                "Available agents serving a queue.",
                &["queue"],
            )?,
            queue_answer_wait_seconds,
            queue_answered: counter_vec(
                &registry,
                "switchboard_queue_answered_total",
                "Conversations answered, by queue and whether within its SLA target.",
                &["queue", "within_sla"],
            )?,
            offers: counter_vec(
                &registry,
                "switchboard_offers_total",
                "Offers made and how they ended.",
                &["result"],
            )?,
            sla_breaches: counter_vec(
                &registry,
                "switchboard_sla_breaches_total",
                "Conversations not answered within their queue's SLA target.",
                &["queue"],
            )?,
            escalations,
            transfers,
            abandoned,
            agents: gauge_vec(
                &registry,
                "switchboard_agents",
                "Agents by presence.",
                &["presence"],
            )?,
            agent_load,
            agent_capacity,
            routing_decision_seconds: histogram(
                &registry,
                "switchboard_routing_decision_seconds",
                "Time the router takes to handle one command.",
                fast,
            )?,
            ingest_to_offer_seconds: histogram(
                &registry,
                "switchboard_ingest_to_offer_seconds",
                "From an inbound message's arrival to its offer reaching the agent.",
                latency,
            )?,
            store_commit_seconds,
            outbox_backlog,
            ready,
            cluster_leader,
            cluster_epoch,
            cluster_failovers,
            cluster_takeovers_read_ahead,
            cluster_forwarding_backlog,
            bus_connected: gauge_vec(
                &registry,
                "switchboard_bus_connected",
                "1 while connected to the broker, by bus.",
                &["bus"],
            )?,
            bus_dead_lettered: counter_vec(
                &registry,
                "switchboard_bus_dead_lettered_total",
                "Invalid inbound bus messages dead-lettered, by bus.",
                &["bus"],
            )?,
            bus_redeliveries: counter_vec(
                &registry,
                "switchboard_bus_redeliveries_total",
                "Inbound bus messages handed back to the broker because they could not be stored now, by bus.",
                &["bus"],
            )?,
            email_auto_replies: counter_vec(
                &registry,
                "switchboard_email_auto_replies_total",
                "Automatic email answers (acknowledgements) by result: sent, failed, suppressed_loop, suppressed_cap.",
                &["result"],
            )?,
            registry,
        })))
    }

    /// Creates every series whose labels are known from the configuration at 0, so each one is
    /// scraped from the start: `rate()` and `increase()` then see the first event, and alert rules
    /// and dashboards find their series before anything happened.
    pub fn initialise_series(&self, queues: &[&str], channels: &[&str]) {
        for queue in queues {
            self.queue_waiting.with_label_values(&[queue]);
            self.queue_oldest_wait.with_label_values(&[queue]);
            self.queue_sla_target.with_label_values(&[queue]);
            self.queue_agents_available.with_label_values(&[queue]);
            self.queue_answer_wait_seconds.with_label_values(&[queue]);
            self.sla_breaches.with_label_values(&[queue]);
            for within in ["true", "false"] {
                self.queue_answered.with_label_values(&[queue, within]);
            }
        }
        for channel in channels {
            self.messages_received.with_label_values(&[channel]);
            self.messages_duplicate.with_label_values(&[channel]);
            self.messages_sent.with_label_values(&[channel]);
            self.messages_failed.with_label_values(&[channel]);
        }
        for state in ["waiting", "offered", "assigned", "resolved"] {
            self.conversations.with_label_values(&[state]);
        }
        for presence in ["available", "away", "offline", "wrap_up"] {
            self.agents.with_label_values(&[presence]);
        }
        for result in ["offered", "accepted", "rejected", "timed_out", "withdrawn"] {
            self.offers.with_label_values(&[result]);
        }
        for kind in ["ingest", "routing"] {
            self.store_commit_seconds.with_label_values(&[kind]);
        }
        for outcome in crate::channels::email::autoreply::Outcome::ALL {
            self.email_auto_replies
                .with_label_values(&[outcome.label()]);
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        if TextEncoder::new()
            .encode(&self.registry.gather(), &mut buffer)
            .is_err()
        {
            return String::new();
        }
        String::from_utf8(buffer).unwrap_or_default()
    }
}
