//! Automatic email answers (RFC 3834): the acknowledgement a new email conversation gets — its
//! ticket, place in the queue and estimated wait — when `[channels.email.acknowledgement]` is on.
//!
//! It is driven by the committed `conversation.queued` events (so a customer never hears of a
//! queue place before its commit), on a cluster's leader only, and answers the customer's latest
//! email in the conversation, once per email. Before anything is sent, two checks (RFC 3834 §2):
//! the email's loop signals (`metadata.auto_reply`, set at intake by
//! `threading::auto_reply_block`: `Auto-Submitted`, `Precedence`, `List-Id`, an empty return path,
//! our own address), then the per-sender cap (`auto_reply_max_per_sender_per_hour`). Each outcome
//! is counted in `switchboard_email_auto_replies_total{result}`. The answer carries
//! `Auto-Submitted: auto-replied` (§5.1) so well-behaved responders do not answer it in turn,
//! threads like a reply, and is DKIM-signed like one. It is best effort: one attempt, a failure is
//! logged and counted, never retried (a late "we received your mail" is worse than none).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lettre::Message;
use lettre::message::SinglePart;
use lettre::message::header::{Header, HeaderName, HeaderValue};
use serde_json::Value;
use tokio::sync::broadcast;
use tracing::{debug, info, warn};
use ulid::Ulid;

use super::outbound::{EmailSender, customer_address, reply_envelope, thread_headers};
use super::threading;
use crate::config::email::AcknowledgementSettings;
use crate::daemon::metrics::Metrics;
use crate::message::InboundMessage;
use crate::store::{Direction, OutboxEvent, Store, StoredMessage};

/// The cap's window.
const HOUR: Duration = Duration::from_secs(3600);

/// Emails already acknowledged, remembered so a conversation queued again (a transfer, a
/// requeue) is not acknowledged twice; the oldest are forgotten past this many.
const REMEMBERED: usize = 100_000;

/// `Auto-Submitted: auto-replied` (RFC 3834 §5): marks our answer as automatic.
#[derive(Debug, Clone)]
struct AutoSubmitted;

impl Header for AutoSubmitted {
    fn name() -> HeaderName {
        HeaderName::new_from_ascii_str("Auto-Submitted")
    }

    fn parse(_: &str) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        Ok(AutoSubmitted)
    }

    fn display(&self) -> HeaderValue {
        HeaderValue::new(Self::name(), "auto-replied".into())
    }
}

/// How many automatic answers each sender got within the last window.
#[derive(Debug)]
pub struct SenderCap {
    limit: usize,
    window: Duration,
    sent: HashMap<String, VecDeque<Instant>>,
}

impl SenderCap {
    pub fn new(limit: u32, window: Duration) -> SenderCap {
        SenderCap {
            limit: limit as usize,
            window,
            sent: HashMap::new(),
        }
    }

    /// Takes one of `sender`'s answers at `now`; `false` when the window's are used up.
    pub fn take(&mut self, sender: &str, now: Instant) -> bool {
        let window = self.window;
        let recent = |at: &Instant| now.saturating_duration_since(*at) < window;
        if self.sent.len() > 10_000 {
            // Senders quiet for a window need no entry.
            self.sent
                .retain(|_, times| times.back().is_some_and(recent));
        }
        let times = self.sent.entry(sender.to_lowercase()).or_default();
        while times.front().is_some_and(|at| !recent(at)) {
            times.pop_front();
        }
        if times.len() >= self.limit {
            return false;
        }
        times.push_back(now);
        true
    }
}

/// What became of one queued email conversation (the `result` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Sent,
    Failed,
    SuppressedLoop,
    SuppressedCap,
}

impl Outcome {
    pub const ALL: [Outcome; 4] = [
        Outcome::Sent,
        Outcome::Failed,
        Outcome::SuppressedLoop,
        Outcome::SuppressedCap,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Outcome::Sent => "sent",
            Outcome::Failed => "failed",
            Outcome::SuppressedLoop => "suppressed_loop",
            Outcome::SuppressedCap => "suppressed_cap",
        }
    }
}

/// The acknowledgement sender: one task reading the committed events.
#[derive(Debug)]
pub struct Acknowledgements {
    sender: Arc<EmailSender>,
    store: Arc<dyn Store>,
    settings: AcknowledgementSettings,
    cap: SenderCap,
    metrics: Metrics,
    acknowledged: HashSet<Ulid>,
    acknowledged_order: VecDeque<Ulid>,
}

/// The queue news of a `conversation.queued` event.
struct Queued {
    conversation: Ulid,
    position: u64,
    wait: Duration,
}

fn queued(event: &OutboxEvent) -> Option<Queued> {
    if event.kind != "conversation.queued" {
        return None;
    }
    let conversation = event.conversation_id?;
    let data = &event.data;
    Some(Queued {
        conversation,
        position: data["position"].as_u64().unwrap_or(1),
        wait: Duration::from_secs_f64(
            data["estimated_wait_seconds"]
                .as_f64()
                .unwrap_or(0.0)
                .max(0.0),
        ),
    })
}

impl Acknowledgements {
    pub fn new(
        sender: Arc<EmailSender>,
        store: Arc<dyn Store>,
        settings: AcknowledgementSettings,
        metrics: Metrics,
    ) -> Acknowledgements {
        let cap = SenderCap::new(sender.settings().auto_reply_max_per_sender_per_hour, HOUR);
        Acknowledgements {
            sender,
            store,
            settings,
            cap,
            metrics,
            acknowledged: HashSet::new(),
            acknowledged_order: VecDeque::new(),
        }
    }

    /// Acknowledges queued email conversations until the event stream closes, while `answering()`
    /// says this instance is the one to answer (a cluster's leader) when the event arrives.
    pub async fn run(
        mut self,
        mut events: broadcast::Receiver<Arc<OutboxEvent>>,
        answering: impl Fn() -> bool,
    ) {
        loop {
            let event = match events.recv().await {
                Ok(event) => event,
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    warn!(
                        missed,
                        "email acknowledgements fell behind the event stream"
                    );
                    continue;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            };
            if let Some(queued) = queued(&event)
                && answering()
                && let Some(outcome) = self.acknowledge(&queued).await
            {
                self.metrics
                    .email_auto_replies
                    .with_label_values(&[outcome.label()])
                    .inc();
            }
        }
    }

    /// The customer's latest email in the conversation, if it is an email conversation.
    async fn latest_email(&self, conversation: Ulid) -> Option<(StoredMessage, InboundMessage)> {
        let messages = match self.store.messages(conversation).await {
            Ok(messages) => messages,
            Err(error) => {
                warn!(%conversation, %error, "cannot read the conversation to acknowledge it");
                return None;
            }
        };
        messages
            .into_iter()
            .rev()
            .filter(|message| message.direction == Direction::Inbound && message.channel == "email")
            .find_map(|message| {
                let inbound =
                    serde_json::from_value::<InboundMessage>(message.body.clone()).ok()?;
                Some((message, inbound))
            })
    }

    /// Remembers that `id` was handled; `false` if it already was.
    fn first_time(&mut self, id: Ulid) -> bool {
        if !self.acknowledged.insert(id) {
            return false;
        }
        self.acknowledged_order.push_back(id);
        if self.acknowledged_order.len() > REMEMBERED
            && let Some(oldest) = self.acknowledged_order.pop_front()
        {
            self.acknowledged.remove(&oldest);
        }
        true
    }

    /// Answers the conversation's latest email, or says why not; `None` when it is not ours to
    /// answer (another channel, a mailbox without acknowledgements, already acknowledged).
    async fn acknowledge(&mut self, queued: &Queued) -> Option<Outcome> {
        let (stored, email) = self.latest_email(queued.conversation).await?;
        let ours = email.to.as_ref()?.address.clone();
        if !self.settings.covers(&ours) || !self.first_time(stored.id) {
            return None;
        }
        if email.metadata.get("auto_reply") != Some(&Value::Bool(true)) {
            let reason = email
                .metadata
                .get("auto_reply_blocked")
                .and_then(Value::as_str)
                .unwrap_or("no auto_reply mark");
            debug!(conversation = %queued.conversation, reason, "no acknowledgement: loop signal");
            return Some(Outcome::SuppressedLoop);
        }
        let customer = customer_address(&email).to_owned();
        if !self.cap.take(&customer, Instant::now()) {
            info!(
                conversation = %queued.conversation,
                "no acknowledgement: the sender's automatic answers for this hour are used up"
            );
            return Some(Outcome::SuppressedCap);
        }
        let message = match self.compose(queued, &stored, &email, &ours, &customer) {
            Ok(message) => message,
            Err(reason) => {
                warn!(conversation = %queued.conversation, %reason, "cannot write the acknowledgement");
                return Some(Outcome::Failed);
            }
        };
        match self.sender.submit(message, &ours).await {
            Ok(()) => Some(Outcome::Sent),
            Err(error) => {
                warn!(conversation = %queued.conversation, %error, "acknowledgement not sent");
                Some(Outcome::Failed)
            }
        }
    }

    fn compose(
        &self,
        queued: &Queued,
        stored: &StoredMessage,
        email: &InboundMessage,
        ours: &str,
        customer: &str,
    ) -> Result<Message, String> {
        let settings = self.sender.settings();
        let ticket = threading::tag(&settings.subject_tag_prefix, queued.conversation);
        let wait_minutes = queued.wait.as_secs().div_ceil(60).max(1);
        let text = self
            .settings
            .text
            .replace("{ticket}", &ticket)
            .replace("{position}", &queued.position.to_string())
            .replace("{wait_minutes}", &wait_minutes.to_string());
        let message_id = format!("ack-{}@{}", stored.id, settings.message_id_domain);
        let builder = reply_envelope(
            settings,
            ours,
            customer,
            queued.conversation,
            email.subject.as_deref(),
            &message_id,
        )?
        .header(AutoSubmitted);
        thread_headers(builder, Some(email))
            .singlepart(SinglePart::plain(text))
            .map_err(|error| format!("cannot build the email: {error}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_counts_each_sender_over_a_sliding_hour() {
        let mut cap = SenderCap::new(2, HOUR);
        let start = Instant::now();
        let at = |seconds: u64| start + Duration::from_secs(seconds);
        assert!(cap.take("ann@example.com", at(0)));
        assert!(cap.take("ANN@example.com", at(10)));
        assert!(
            !cap.take("ann@example.com", at(20)),
            "third within the hour"
        );
        assert!(
            cap.take("bob@example.com", at(20)),
            "senders are counted apart"
        );
        assert!(!cap.take("ann@example.com", at(3599)));
        assert!(
            cap.take("ann@example.com", at(3600)),
            "the first left the window"
        );
        assert!(!cap.take("ann@example.com", at(3605)));
    }

    #[test]
    fn only_queued_events_are_read() {
        let id = Ulid::new();
        let event = |kind: &str| OutboxEvent {
            position: 1,
            event_id: Ulid::new(),
            kind: kind.into(),
            conversation_id: Some(id),
            seq: 1,
            data: serde_json::json!({ "position": 4, "estimated_wait_seconds": 90.0 }),
            time: chrono::Utc::now(),
        };
        let news =
            queued(&event("conversation.queued")).unwrap_or_else(|| panic!("a queued event"));
        assert_eq!(
            (news.conversation, news.position, news.wait),
            (id, 4, Duration::from_secs(90))
        );
        assert!(queued(&event("conversation.assigned")).is_none());
    }
}
