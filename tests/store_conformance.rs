//! Store conformance: the behaviours every `Store` backend must share, written once against
//! `dyn Store` and instantiated for each backend (each test gets its own fresh database).
//!
//! To add a backend, give [`Backend`] a constructor (and `second_instance`, `reopen`,
//! `block_writes`) for it and add one line to `for_each_backend!`. PostgreSQL tests each get a
//! schema of their own, dropped at the end.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::json;
use switchboard::message::{Address, IdentityLink, InboundMessage};
use switchboard::store::postgres::{PostgresOptions, PostgresStore};
use switchboard::store::sqlite::{SCHEMA_VERSION, SqliteOptions, SqliteStore};
use switchboard::store::{
    AgentPush, AttachmentContent, ConversationFilter, ConversationStatus, DeliveryOutcome,
    DeliveryUpdate, Direction, IngestOutcome, NewEvent, NewReply, ParkedStatus, Rating,
    RoutingWrite, Store, StoreError, Wakeup,
};
use tempfile::TempDir;
use ulid::Ulid;

// ---------------------------------------------------------------------------------------------
// Backends

/// One backend under test, with its own empty database.
struct Backend {
    store: Arc<dyn Store>,
    kind: Kind,
}

enum Kind {
    Sqlite {
        dir: TempDir,
        path: PathBuf,
        sqlite: SqliteStore,
    },
    Postgres {
        schema: TestSchema,
        postgres: PostgresStore,
    },
}

/// Something that makes every write fail until it is dropped.
type WriteBlock = Box<dyn std::any::Any + Send>;

fn sqlite_options() -> SqliteOptions {
    SqliteOptions {
        // Short, so that the write-blocking test fails fast; nothing else in these tests contends.
        busy_timeout: Duration::from_millis(200),
        ..SqliteOptions::default()
    }
}

/// The test database (the machine's PostgreSQL unless `SWITCHBOARD_TEST_POSTGRES_URL` says
/// otherwise).
fn postgres_url() -> String {
    std::env::var("SWITCHBOARD_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// A schema of its own for one test, dropped (with everything in it) when the test ends, so tests
/// run in parallel and leave nothing behind.
struct TestSchema {
    name: String,
}

impl TestSchema {
    fn new() -> TestSchema {
        TestSchema {
            name: format!("sb_test_{}", Ulid::new().to_string().to_lowercase()),
        }
    }

    fn options(&self) -> PostgresOptions {
        let mut options = PostgresOptions::new(postgres_url().parse().unwrap(), &self.name);
        // Short, so that the write-blocking test fails fast.
        options.lock_timeout = Duration::from_millis(200);
        options.pool_size = 4;
        // Its connections can be told apart (and cut) in pg_stat_activity.
        options.application_name = self.name.clone();
        options
    }
}

impl Drop for TestSchema {
    fn drop(&mut self) {
        // Drop runs inside the test's runtime, which cannot block on itself: a thread of its own.
        let name = self.name.clone();
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let client = admin_client().await;
                client
                    .batch_execute(&format!(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                         WHERE application_name = '{name}';
                         DROP SCHEMA IF EXISTS {name} CASCADE"
                    ))
                    .await
                    .unwrap();
            });
        })
        .join();
        if dropped.is_err() && !std::thread::panicking() {
            panic!("could not drop test schema {}", self.name);
        }
    }
}

/// A plain connection to the test database (not through a store).
async fn admin_client() -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(&postgres_url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
}

impl Backend {
    async fn sqlite() -> Backend {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("switchboard.sqlite");
        let sqlite = SqliteStore::open(&path, sqlite_options()).unwrap();
        Backend {
            store: Arc::new(sqlite.clone()),
            kind: Kind::Sqlite { dir, path, sqlite },
        }
    }

    async fn postgres() -> Backend {
        let schema = TestSchema::new();
        let postgres = PostgresStore::open(schema.options()).await.unwrap();
        Backend {
            store: Arc::new(postgres.clone()),
            kind: Kind::Postgres { schema, postgres },
        }
    }

    fn store(&self) -> &dyn Store {
        self.store.as_ref()
    }

    /// Another handle on the same database, as a second instance would have (its own writer and
    /// connections).
    async fn second_instance(&self) -> Arc<dyn Store> {
        match &self.kind {
            Kind::Sqlite { path, .. } => {
                Arc::new(SqliteStore::open(path, sqlite_options()).unwrap())
            }
            Kind::Postgres { schema, .. } => {
                Arc::new(PostgresStore::open(schema.options()).await.unwrap())
            }
        }
    }

    /// Closes the store and opens the same database again.
    async fn reopen(self) -> Backend {
        match self.kind {
            Kind::Sqlite { dir, path, sqlite } => {
                sqlite.close().await.unwrap();
                drop(sqlite);
                drop(self.store);
                let sqlite = SqliteStore::open(&path, sqlite_options()).unwrap();
                Backend {
                    store: Arc::new(sqlite.clone()),
                    kind: Kind::Sqlite { dir, path, sqlite },
                }
            }
            Kind::Postgres { schema, postgres } => {
                postgres.close().await.unwrap();
                drop(postgres);
                drop(self.store);
                let postgres = PostgresStore::open(schema.options()).await.unwrap();
                Backend {
                    store: Arc::new(postgres.clone()),
                    kind: Kind::Postgres { schema, postgres },
                }
            }
        }
    }

    /// How many transactions the backend committed, if it can tell.
    fn commit_count(&self) -> Option<u64> {
        match &self.kind {
            Kind::Sqlite { sqlite, .. } => Some(sqlite.commit_count()),
            Kind::Postgres { postgres, .. } => Some(postgres.stats().commits),
        }
    }

    /// Makes commits fail: another connection takes the write locks and holds them (the store's
    /// lock wait runs out, as it would behind a stuck backup or a second process).
    async fn block_writes(&self) -> WriteBlock {
        match &self.kind {
            Kind::Sqlite { path, .. } => {
                let conn = rusqlite::Connection::open(path).unwrap();
                conn.execute_batch("BEGIN EXCLUSIVE").unwrap();
                Box::new(conn)
            }
            Kind::Postgres { schema, .. } => {
                let client = admin_client().await;
                // EXCLUSIVE blocks every write and lets reads through.
                client
                    .batch_execute(&format!(
                        "BEGIN; SET LOCAL search_path = {};
                         LOCK TABLE contacts, identity_links, conversations, conversation_threads,
                                    messages, agent_state, outbox, leadership, write_probe
                         IN EXCLUSIVE MODE",
                        schema.name
                    ))
                    .await
                    .unwrap();
                Box::new(client)
            }
        }
    }
}

macro_rules! backend_tests {
    ($backend:ident: $($test:ident),* $(,)?) => {
        mod $backend {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $test() {
                    super::$test(super::Backend::$backend().await).await;
                }
            )*
        }
    };
}

macro_rules! for_each_backend {
    ($($test:ident),* $(,)?) => {
        backend_tests!(sqlite: $($test),*);
        backend_tests!(postgres: $($test),*);
    };
}

for_each_backend!(
    first_message_creates_contact_and_conversation,
    duplicate_is_acknowledged_and_writes_nothing,
    attachments_are_stored_with_their_message_once_per_content,
    same_thread_key_joins,
    phone_identity_joins_across_channels,
    customer_id_joins_across_channels,
    identities_of_several_contacts_pick_the_oldest,
    closed_conversation_starts_a_new_one,
    resolved_conversation_is_joined,
    routing_events_are_numbered_per_conversation,
    outbox_pending_mark_sent_and_backlog,
    without_a_broker_committed_events_are_skipped_unread,
    committed_events_are_followed_page_by_page,
    a_conversation_is_rated_once_with_its_event,
    stale_epoch_is_fenced,
    routing_writes_tell_a_read_ahead_whether_it_is_current,
    failed_request_leaves_nothing,
    recovery_returns_unrouted_and_states,
    replies_and_delivery_status,
    status_before_the_provider_id_is_applied_when_it_is_stored,
    conversation_filters,
    concurrent_ingest_is_stored_exactly_once,
    data_survives_reopen,
    failing_writes_are_unavailable_and_store_nothing,
    lease_acquire_renew_expire_and_takeover,
    takeover_fences_the_old_leader,
    two_instances_store_each_message_once,
    two_instances_agree_on_a_new_customer,
);

// ---------------------------------------------------------------------------------------------
// Helpers

const PHONE: &str = "+15555550123";
const OUR_NUMBER: &str = "+15555550100";

fn sms(provider_message_id: &str, from: &str, text: &str) -> InboundMessage {
    let mut message = InboundMessage::new("sms", "twilio", provider_message_id, from, text);
    message.to = Some(address(OUR_NUMBER));
    message
}

fn email(provider_message_id: &str, from: &str, thread: &str, text: &str) -> InboundMessage {
    let mut message = InboundMessage::new("email", "smtp", provider_message_id, from, text);
    message.to = Some(address("support@example.com"));
    message.thread_key = Some(thread.to_owned());
    message.subject = Some("Order 1234".into());
    message
}

fn address(text: &str) -> Address {
    Address {
        address: text.to_owned(),
        name: None,
    }
}

#[derive(Debug, Clone, Copy)]
struct Stored {
    message: Ulid,
    conversation: Ulid,
    contact: Ulid,
    new_conversation: bool,
}

fn stored(outcome: IngestOutcome) -> Stored {
    match outcome {
        IngestOutcome::Stored {
            message_id,
            conversation_id,
            contact_id,
            new_conversation,
        } => Stored {
            message: message_id,
            conversation: conversation_id,
            contact: contact_id,
            new_conversation,
        },
        other => panic!("expected a stored message, got {other:?}"),
    }
}

async fn ingest(store: &dyn Store, message: InboundMessage) -> Stored {
    message.validate().unwrap();
    stored(store.ingest(message, Vec::new(), Utc::now()).await.unwrap())
}

/// Commits `count` routing events in one routing write and returns them.
async fn write_events(store: &dyn Store, count: usize) -> Vec<NewEvent> {
    let events: Vec<NewEvent> = (0..count).map(|_| event("agent.presence", None)).collect();
    commit_events(store, &events).await;
    events
}

/// Commits `events` in one routing write.
async fn commit_events(store: &dyn Store, events: &[NewEvent]) {
    store
        .apply_routing(Arc::new(RoutingWrite {
            events: events.to_vec(),
            ..RoutingWrite::default()
        }))
        .await
        .unwrap();
}

fn event(kind: &str, conversation: Option<Ulid>) -> NewEvent {
    NewEvent {
        event_id: Ulid::new(),
        kind: kind.to_owned(),
        conversation_id: conversation,
        data: json!({ "kind": kind }),
        time: Utc::now(),
    }
}

fn delivery(
    message_id: Ulid,
    status: &str,
    provider_message_id: Option<&str>,
    events: Vec<NewEvent>,
) -> DeliveryUpdate {
    DeliveryUpdate {
        message_id,
        status: status.to_owned(),
        provider_message_id: provider_message_id.map(str::to_owned),
        events,
        parked_failure_event: None,
    }
}

fn set_status(conversation: Ulid, status: ConversationStatus) -> RoutingWrite {
    RoutingWrite {
        conversations: vec![(conversation, status, json!({ "status": status.as_str() }))],
        ..RoutingWrite::default()
    }
}

/// Every stored message, by id.
async fn all_messages(store: &dyn Store) -> BTreeMap<Ulid, switchboard::store::StoredMessage> {
    let mut all = BTreeMap::new();
    for conversation in store
        .conversations(ConversationFilter::default())
        .await
        .unwrap()
    {
        for message in store.messages(conversation.id).await.unwrap() {
            assert!(all.insert(message.id, message).is_none());
        }
    }
    all
}

fn reply(conversation: Ulid, text: &str, at: DateTime<Utc>) -> NewReply {
    NewReply {
        id: Ulid::new(),
        conversation_id: conversation,
        agent_id: "agent-7".into(),
        route: switchboard::store::ReplyRoute {
            channel: "sms".into(),
            provider: "twilio".into(),
            customer_address: PHONE.into(),
            our_address: OUR_NUMBER.into(),
            thread_key: format!("sms:{PHONE}:{OUR_NUMBER}"),
        },
        text: text.to_owned(),
        html: None,
        created_at: at,
    }
}

// ---------------------------------------------------------------------------------------------
// Behaviours

async fn first_message_creates_contact_and_conversation(backend: Backend) {
    let store = backend.store();
    let received = Utc::now();
    let outcome = stored(
        store
            .ingest(sms("SM1", PHONE, "my parcel is late"), Vec::new(), received)
            .await
            .unwrap(),
    );
    assert!(outcome.new_conversation);

    let conversation = store
        .conversation(outcome.conversation)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(conversation.id, outcome.conversation);
    assert_eq!(conversation.contact_id, outcome.contact);
    assert_eq!(conversation.status, ConversationStatus::Open);
    assert_eq!(conversation.channel, "sms");
    assert_eq!(conversation.reply_route.channel, "sms");
    assert_eq!(conversation.reply_route.provider, "twilio");
    assert_eq!(conversation.reply_route.customer_address, PHONE);
    assert_eq!(conversation.reply_route.our_address, OUR_NUMBER);
    assert_eq!(
        conversation.reply_route.thread_key,
        format!("sms:{PHONE}:{OUR_NUMBER}")
    );
    assert_eq!(conversation.routing_state, None);
    assert_eq!(conversation.event_seq, 0);

    let messages = store.messages(outcome.conversation).await.unwrap();
    assert_eq!(messages.len(), 1);
    let message = &messages[0];
    assert_eq!(message.id, outcome.message);
    assert_eq!(message.direction, Direction::Inbound);
    assert_eq!(message.channel, "sms");
    assert_eq!(message.provider_message_id.as_deref(), Some("SM1"));
    assert_eq!(message.from_address, PHONE);
    assert_eq!(message.to_address, OUR_NUMBER);
    assert_eq!(message.created_at, received);
    assert_eq!(message.delivery_status, None);
    // The body is the full normalised message with switchboard's id and the intake time.
    let body: InboundMessage = serde_json::from_value(message.body.clone()).unwrap();
    assert_eq!(body.id, Some(outcome.message));
    assert_eq!(body.received_at, Some(received));
    assert_eq!(body.text, "my parcel is late");

    assert_eq!(
        store.message(outcome.message).await.unwrap().as_ref(),
        Some(message)
    );
    assert_eq!(store.message(Ulid::new()).await.unwrap(), None);
    assert_eq!(store.conversation(Ulid::new()).await.unwrap(), None);

    // A provider timestamp wins over the intake time.
    let mut later = sms("SM2", PHONE, "hello?");
    let provider_time = received - chrono::Duration::seconds(30);
    later.received_at = Some(provider_time);
    let second = stored(store.ingest(later, Vec::new(), Utc::now()).await.unwrap());
    assert_eq!(
        store
            .message(second.message)
            .await
            .unwrap()
            .unwrap()
            .created_at,
        provider_time
    );
}

async fn attachments_are_stored_with_their_message_once_per_content(backend: Backend) {
    let store = backend.store();
    let mail = |id: &str, from: &str| email(id, from, id, "see the attachment");
    let invoice = AttachmentContent::new(b"%PDF-1.7 invoice 1234".to_vec());
    let photo = AttachmentContent::new(vec![0x89, b'P', b'N', b'G', 0, 255, 13, 10]);
    let both = vec![invoice.clone(), photo.clone()];
    let first = store.ingest(mail("<m1@c.example>", "ann@c.example"), both, Utc::now());
    stored(first.await.unwrap());
    for attachment in [&invoice, &photo] {
        let content = store.attachment(attachment.sha256()).await.unwrap();
        assert_eq!(content.as_deref(), Some(attachment.content()));
    }
    // Another message bringing the same content: stored, and the content is what it was.
    let second = store.ingest(
        mail("<m2@c.example>", "bob@c.example"),
        vec![invoice.clone()],
        Utc::now(),
    );
    stored(second.await.unwrap());
    let content = store.attachment(invoice.sha256()).await.unwrap();
    assert_eq!(content.as_deref(), Some(invoice.content()));
    // A duplicate stores nothing, attachments included.
    let other = AttachmentContent::new(b"something else".to_vec());
    let again = store.ingest(
        mail("<m1@c.example>", "ann@c.example"),
        vec![other.clone()],
        Utc::now(),
    );
    let again = again.await.unwrap();
    assert!(
        matches!(again, IngestOutcome::Duplicate { .. }),
        "{again:?}"
    );
    assert_eq!(store.attachment(other.sha256()).await.unwrap(), None);
    assert_eq!(store.attachment(&"0".repeat(64)).await.unwrap(), None);
}

async fn duplicate_is_acknowledged_and_writes_nothing(backend: Backend) {
    let store = backend.store();
    let first = ingest(store, sms("SM1", PHONE, "first")).await;
    let before = store
        .conversation(first.conversation)
        .await
        .unwrap()
        .unwrap();

    let again = store
        .ingest(sms("SM1", PHONE, "sent again"), Vec::new(), Utc::now())
        .await
        .unwrap();
    assert_eq!(
        again,
        IngestOutcome::Duplicate {
            message_id: first.message,
            conversation_id: first.conversation,
        }
    );
    let messages = all_messages(store).await;
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[&first.message].body["text"], "first");
    assert_eq!(
        store
            .conversation(first.conversation)
            .await
            .unwrap()
            .unwrap(),
        before
    );
    assert_eq!(store.recovery().await.unwrap().unrouted.len(), 1);

    // The key is the pair: the same provider id on another channel is another message.
    let mut other = InboundMessage::new("whatsapp", "meta", "SM1", PHONE, "hi");
    other.to = Some(address(OUR_NUMBER));
    let other = ingest(store, other).await;
    assert_ne!(other.message, first.message);
    assert_eq!(all_messages(store).await.len(), 2);
}

async fn same_thread_key_joins(backend: Backend) {
    let store = backend.store();
    let first = ingest(
        store,
        email(
            "<a1@example.com>",
            "ann@example.com",
            "<root@example.com>",
            "hi",
        ),
    )
    .await;
    // A colleague of Ann's replies on the same email thread: the thread decides.
    let second = ingest(
        store,
        email(
            "<b1@example.com>",
            "bob@example.org",
            "<root@example.com>",
            "me too",
        ),
    )
    .await;
    assert!(first.new_conversation);
    assert!(!second.new_conversation);
    assert_eq!(second.conversation, first.conversation);
    assert_ne!(second.contact, first.contact);

    // Without a thread key, the derived one (channel, from, to) threads an SMS exchange.
    let a = ingest(store, sms("SM1", PHONE, "one")).await;
    let b = ingest(store, sms("SM2", PHONE, "two")).await;
    assert_eq!(a.conversation, b.conversation);
    assert_ne!(a.conversation, first.conversation);
    assert_eq!(store.messages(a.conversation).await.unwrap().len(), 2);
}

async fn phone_identity_joins_across_channels(backend: Backend) {
    let store = backend.store();
    let first = ingest(store, sms("SM1", PHONE, "my order is late")).await;

    let mut whatsapp = InboundMessage::new("whatsapp", "meta", "wamid.1", PHONE, "any news?");
    whatsapp.to = Some(address("+15555550199"));
    let second = ingest(store, whatsapp).await;
    assert!(!second.new_conversation);
    assert_eq!(second.conversation, first.conversation);
    assert_eq!(second.contact, first.contact);

    let conversation = store
        .conversation(first.conversation)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        conversation.channel, "sms",
        "the first message's channel stays"
    );
    let route = conversation.reply_route;
    assert_eq!(route.channel, "whatsapp");
    assert_eq!(route.provider, "meta");
    assert_eq!(route.customer_address, PHONE);
    assert_eq!(route.our_address, "+15555550199");
    assert_eq!(route.thread_key, format!("whatsapp:{PHONE}:+15555550199"));

    // Back on SMS: the route follows the customer again.
    ingest(store, sms("SM2", PHONE, "hello?")).await;
    let route = store
        .conversation(first.conversation)
        .await
        .unwrap()
        .unwrap()
        .reply_route;
    assert_eq!(route.channel, "sms");
    assert_eq!(store.messages(first.conversation).await.unwrap().len(), 3);
}

async fn customer_id_joins_across_channels(backend: Backend) {
    let store = backend.store();
    let mut first = email(
        "<m1@example.com>",
        "ann@example.com",
        "<m1@example.com>",
        "help",
    );
    first.customer.id = Some("crm-42".into());
    first.customer.tier = Some("vip".into());
    let first = ingest(store, first).await;

    let mut chat = InboundMessage::new("chat", "webchat", "c-1", "visitor-9", "still waiting");
    chat.thread_key = Some("session-9".into());
    chat.customer.id = Some("crm-42".into());
    let second = ingest(store, chat).await;
    assert_eq!(second.conversation, first.conversation);
    assert_eq!(second.contact, first.contact);
    let route = store
        .conversation(first.conversation)
        .await
        .unwrap()
        .unwrap()
        .reply_route;
    assert_eq!(route.channel, "chat");
    assert_eq!(route.provider, "webchat");
    assert_eq!(route.customer_address, "visitor-9");
    assert_eq!(route.our_address, "");
    assert_eq!(route.thread_key, "session-9");

    // The chat identity is now linked: the visitor is known without the customer id.
    let mut anonymous = InboundMessage::new("chat", "webchat", "c-2", "visitor-9", "hello?");
    anonymous.thread_key = Some("session-10".into());
    assert_eq!(ingest(store, anonymous).await.contact, first.contact);

    // An API-provided link joins too.
    let mut linked = sms("SM1", PHONE, "text me instead");
    linked.customer.links.push(IdentityLink {
        kind: "email".into(),
        value: "Ann@Example.com".into(),
    });
    let linked = ingest(store, linked).await;
    assert_eq!(linked.conversation, first.conversation);
}

async fn identities_of_several_contacts_pick_the_oldest(backend: Backend) {
    let store = backend.store();
    let older = ingest(
        store,
        email(
            "<m1@example.com>",
            "ann@example.com",
            "<m1@example.com>",
            "hi",
        ),
    )
    .await;
    let newer = ingest(store, sms("SM1", PHONE, "hi")).await;
    assert_ne!(older.contact, newer.contact);

    // A message claiming both identities (and a new one) belongs to the older contact.
    let mut both = InboundMessage::new("chat", "webchat", "c-1", "visitor-1", "it's me");
    both.customer.links = vec![
        IdentityLink {
            kind: "email".into(),
            value: "ann@example.com".into(),
        },
        IdentityLink {
            kind: "phone".into(),
            value: PHONE.into(),
        },
    ];
    let joined = ingest(store, both).await;
    assert_eq!(joined.contact, older.contact);
    assert_eq!(joined.conversation, older.conversation);

    // The new identity was attached to the older contact; the phone stays with its own contact.
    let mut chat = InboundMessage::new("chat", "webchat", "c-2", "visitor-1", "again");
    chat.thread_key = Some("new-session".into());
    assert_eq!(ingest(store, chat).await.contact, older.contact);
    assert_eq!(
        ingest(store, sms("SM2", PHONE, "me")).await.contact,
        newer.contact
    );
}

async fn closed_conversation_starts_a_new_one(backend: Backend) {
    let store = backend.store();
    let first = ingest(store, sms("SM1", PHONE, "hi")).await;
    store
        .apply_routing(Arc::new(set_status(
            first.conversation,
            ConversationStatus::Closed,
        )))
        .await
        .unwrap();

    let second = ingest(store, sms("SM2", PHONE, "hi again")).await;
    assert!(second.new_conversation);
    assert_ne!(second.conversation, first.conversation);
    assert_eq!(second.contact, first.contact);

    // The closed conversation keeps its history.
    let closed = store
        .conversation(first.conversation)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(closed.status, ConversationStatus::Closed);
    assert_eq!(store.messages(first.conversation).await.unwrap().len(), 1);
    // And the next message on the thread joins the new one.
    let third = ingest(store, sms("SM3", PHONE, "?")).await;
    assert_eq!(third.conversation, second.conversation);
    assert!(
        store
            .recovery()
            .await
            .unwrap()
            .conversations
            .iter()
            .all(|(id, _)| *id != first.conversation),
        "closed conversations are not recovered"
    );
}

async fn resolved_conversation_is_joined(backend: Backend) {
    let store = backend.store();
    let first = ingest(store, sms("SM1", PHONE, "hi")).await;
    store
        .apply_routing(Arc::new(set_status(
            first.conversation,
            ConversationStatus::Resolved,
        )))
        .await
        .unwrap();
    let second = ingest(store, sms("SM2", PHONE, "one more thing")).await;
    assert!(!second.new_conversation);
    assert_eq!(second.conversation, first.conversation);
    // The store does not reopen it: that is the router's decision.
    let conversation = store
        .conversation(first.conversation)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(conversation.status, ConversationStatus::Resolved);

    // Another channel of the same customer joins the resolved conversation too.
    let whatsapp = InboundMessage::new("whatsapp", "meta", "wamid.1", PHONE, "and another");
    assert_eq!(
        ingest(store, whatsapp).await.conversation,
        first.conversation
    );
}

async fn routing_events_are_numbered_per_conversation(backend: Backend) {
    let store = backend.store();
    let a = ingest(store, sms("SM1", PHONE, "a")).await.conversation;
    let b = ingest(store, sms("SM2", "+15555550124", "b"))
        .await
        .conversation;
    let events = vec![
        event("conversation.created", Some(a)),
        event("conversation.queued", Some(a)),
        event("agent.presence", None),
        event("conversation.created", Some(b)),
        event("conversation.assigned", Some(a)),
    ];
    commit_events(store, &events).await;
    let pending = store.outbox_pending(100).await.unwrap();
    assert_eq!(
        pending.iter().map(|e| e.event_id).collect::<Vec<_>>(),
        events.iter().map(|e| e.event_id).collect::<Vec<_>>(),
        "outbox order is commit order"
    );
    assert_eq!(
        pending.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![1, 2, 0, 1, 3]
    );
    assert!(pending.windows(2).all(|w| w[0].position < w[1].position));
    for (stored, sent) in pending.iter().zip(&events) {
        assert_eq!(stored.kind, sent.kind);
        assert_eq!(stored.conversation_id, sent.conversation_id);
        assert_eq!(stored.data, sent.data);
        assert_eq!(stored.time, sent.time);
    }
    assert_eq!(store.conversation(a).await.unwrap().unwrap().event_seq, 3);
    assert_eq!(store.conversation(b).await.unwrap().unwrap().event_seq, 1);

    // Later writes (routing, replies, delivery) continue each conversation's sequence.
    store
        .apply_routing(Arc::new(RoutingWrite {
            events: vec![event("conversation.resolved", Some(a))],
            ..RoutingWrite::default()
        }))
        .await
        .unwrap();
    let answer = reply(a, "on its way", Utc::now());
    store
        .store_reply(answer.clone(), vec![event("message.sent", Some(a))])
        .await
        .unwrap();
    let pending = store.outbox_pending(100).await.unwrap();
    assert_eq!(
        pending
            .iter()
            .filter(|e| e.conversation_id == Some(a))
            .map(|e| e.seq)
            .collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5]
    );
    assert_eq!(store.conversation(a).await.unwrap().unwrap().event_seq, 5);
}

async fn outbox_pending_mark_sent_and_backlog(backend: Backend) {
    let store = backend.store();
    assert_eq!(store.outbox_backlog().await.unwrap(), 0);
    assert!(store.outbox_pending(10).await.unwrap().is_empty());
    let events = write_events(store, 5).await;
    assert_eq!(store.outbox_backlog().await.unwrap(), 5);

    let first = store.outbox_pending(2).await.unwrap();
    assert_eq!(first.len(), 2);
    assert_eq!(first[0].event_id, events[0].event_id);
    assert_eq!(first[1].event_id, events[1].event_id);
    // Reading does not consume.
    assert_eq!(store.outbox_pending(2).await.unwrap(), first);

    let positions: Vec<i64> = first.iter().map(|e| e.position).collect();
    store.outbox_mark_sent(&positions).await.unwrap();
    assert_eq!(store.outbox_backlog().await.unwrap(), 3);
    let rest = store.outbox_pending(10).await.unwrap();
    assert_eq!(
        rest.iter().map(|e| e.event_id).collect::<Vec<_>>(),
        events[2..].iter().map(|e| e.event_id).collect::<Vec<_>>()
    );

    // Marking again, or unknown positions, changes nothing.
    store.outbox_mark_sent(&positions).await.unwrap();
    store.outbox_mark_sent(&[999_999]).await.unwrap();
    store.outbox_mark_sent(&[]).await.unwrap();
    assert_eq!(store.outbox_backlog().await.unwrap(), 3);

    let all: Vec<i64> = rest.iter().map(|e| e.position).collect();
    store.outbox_mark_sent(&all).await.unwrap();
    assert_eq!(store.outbox_backlog().await.unwrap(), 0);
    assert!(store.outbox_pending(10).await.unwrap().is_empty());
}

/// The relay's work when no broker is configured: what is committed is marked published, what is
/// committed later is still pending (for a broker configured later, only what comes after).
async fn without_a_broker_committed_events_are_skipped_unread(backend: Backend) {
    let store = backend.store();
    store.outbox_skip_pending().await.unwrap();
    write_events(store, 5).await;
    assert_eq!(store.outbox_backlog().await.unwrap(), 5);
    store.outbox_skip_pending().await.unwrap();
    assert_eq!(store.outbox_backlog().await.unwrap(), 0);
    assert!(store.outbox_pending(10).await.unwrap().is_empty());

    let later = write_events(store, 2).await;
    let pending = store.outbox_pending(10).await.unwrap();
    assert_eq!(
        pending.iter().map(|e| e.event_id).collect::<Vec<_>>(),
        later.iter().map(|e| e.event_id).collect::<Vec<_>>()
    );
    store.outbox_skip_pending().await.unwrap();
    store.outbox_skip_pending().await.unwrap();
    assert_eq!(store.outbox_backlog().await.unwrap(), 0);
}

/// What every instance's chats and supervisor feed rely on: a commit wakes the followers, and the
/// events after a cursor come once each, in order, a page at a time.
async fn committed_events_are_followed_page_by_page(backend: Backend) {
    let store = backend.store();
    let mut wakeups = store.wakeups().expect("followers are told of commits");
    let start = store.events_end().await.unwrap();
    let events = write_events(store, 5).await;
    // Resync: PostgreSQL's listening connection (re)connected, so a notification may be lost and
    // followers read anyway, as they do after any wakeup.
    tokio::time::timeout(Duration::from_secs(20), async {
        while !matches!(
            wakeups.recv().await.unwrap(),
            Wakeup::Events | Wakeup::Resync
        ) {}
    })
    .await
    .expect("the commit wakes followers");

    let mut cursor = start;
    let mut followed = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while followed.len() < events.len() {
        assert!(tokio::time::Instant::now() < deadline, "{followed:?}");
        let page = store.events_after(cursor, 2).await.unwrap();
        assert!(page.events.len() <= 2, "{page:?}");
        followed.extend(page.events.iter().map(|event| event.event_id));
        cursor = page.next;
        if page.events.is_empty() {
            // PostgreSQL: another test's transaction on this server may hold the horizon back.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let written: Vec<Ulid> = events.iter().map(|event| event.event_id).collect();
    assert_eq!(followed, written);
    assert_eq!(store.events_after(cursor, 10).await.unwrap().events, []);
    // Following is not publishing: the relay still has them all to send.
    assert_eq!(store.outbox_backlog().await.unwrap(), 5);
}

async fn a_conversation_is_rated_once_with_its_event(backend: Backend) {
    let store = backend.store();
    let first = ingest(store, sms("r1", PHONE, "hello")).await;
    let second = ingest(store, sms("r2", "+15555550999", "hi")).await;
    let empty = store.ratings(10).await.unwrap();
    assert_eq!((empty.count, empty.average), (0, None));
    assert!(empty.recent.is_empty());
    let backlog = store.outbox_backlog().await.unwrap();

    let rating = |conversation: Ulid, score: u8, comment: &str, seconds: i64| Rating {
        conversation_id: conversation,
        score,
        comment: comment.to_owned(),
        agent_id: Some("alice".into()),
        rated_at: DateTime::from_timestamp(1_767_225_600 + seconds, 0).unwrap(),
    };
    let four = rating(first.conversation, 4, "Quick and kind", 0);
    let rated = event("conversation.rated", Some(first.conversation));
    assert!(store.rate(four.clone(), vec![rated.clone()]).await.unwrap());
    assert_eq!(store.outbox_backlog().await.unwrap(), backlog + 1);
    // A second rating of the same conversation writes nothing, its event neither.
    let again = rating(first.conversation, 1, "changed my mind", 5);
    let ignored = event("conversation.rated", Some(first.conversation));
    assert!(!store.rate(again, vec![ignored]).await.unwrap());
    assert_eq!(store.outbox_backlog().await.unwrap(), backlog + 1);
    let pending = store.outbox_pending(1000).await.unwrap();
    assert_eq!(
        pending
            .iter()
            .filter(|event| event.kind == "conversation.rated")
            .map(|event| event.event_id)
            .collect::<Vec<_>>(),
        vec![rated.event_id]
    );

    let five = Rating {
        agent_id: None,
        comment: String::new(),
        ..rating(second.conversation, 5, "", 10)
    };
    assert!(store.rate(five.clone(), Vec::new()).await.unwrap());
    let summary = store.ratings(10).await.unwrap();
    assert_eq!(summary.count, 2);
    assert_eq!(summary.average, Some(4.5));
    assert_eq!(summary.recent, vec![five.clone(), four]);
    assert_eq!(store.ratings(1).await.unwrap().recent, vec![five]);
}

/// An instance that read the router's state ahead of a takeover uses it only if no routing write
/// was committed since: the store counts them, fenced ones excepted.
async fn routing_writes_tell_a_read_ahead_whether_it_is_current(backend: Backend) {
    let store = backend.store();
    let Some(before) = store.routing_writes().await.unwrap() else {
        // One instance (SQLite): nobody reads ahead to take over from it.
        assert_eq!(store.recovery().await.unwrap().routing_writes, None);
        return;
    };
    assert_eq!(store.recovery().await.unwrap().routing_writes, Some(before));
    let write = |epoch| {
        Arc::new(RoutingWrite {
            events: vec![event("agent.presence", None)],
            epoch,
            ..RoutingWrite::default()
        })
    };
    store.apply_routing(write(2)).await.unwrap();
    store.apply_routing(write(2)).await.unwrap();
    assert_eq!(store.routing_writes().await.unwrap(), Some(before + 2));
    let stale = store.apply_routing(write(1)).await;
    assert!(
        matches!(stale, Err(StoreError::Fenced { epoch: 1 })),
        "{stale:?}"
    );
    assert_eq!(store.routing_writes().await.unwrap(), Some(before + 2));
    assert_eq!(
        store.recovery().await.unwrap().routing_writes,
        Some(before + 2)
    );
    // Ingesting is not routing: a message stored meanwhile is picked up as unrouted.
    ingest(store, sms("SM-ahead", PHONE, "hi")).await;
    assert_eq!(store.routing_writes().await.unwrap(), Some(before + 2));
}

async fn stale_epoch_is_fenced(backend: Backend) {
    let store = backend.store();
    let message = ingest(store, sms("SM1", PHONE, "hi")).await;
    let conversation = message.conversation;

    store
        .apply_routing(Arc::new(RoutingWrite {
            conversations: vec![(conversation, ConversationStatus::Open, json!({"leader": 2}))],
            events: vec![event("conversation.queued", Some(conversation))],
            epoch: 2,
            ..RoutingWrite::default()
        }))
        .await
        .unwrap();

    let stale = store
        .apply_routing(Arc::new(RoutingWrite {
            conversations: vec![(
                conversation,
                ConversationStatus::Closed,
                json!({"leader": 1}),
            )],
            agents: vec![("agent-1".into(), json!({"leader": 1}))],
            queues: vec![("support".into(), json!({"leader": 1}))],
            routed_messages: vec![message.message],
            events: vec![event("conversation.assigned", Some(conversation))],
            epoch: 1,
            pushes: vec![AgentPush {
                agent_id: "agent-1".into(),
                document: json!({"type": "offer"}),
            }],
            node: "old-leader".into(),
        }))
        .await;
    assert!(
        matches!(stale, Err(StoreError::Fenced { epoch: 1 })),
        "{stale:?}"
    );

    // Nothing of the fenced write is visible.
    let record = store.conversation(conversation).await.unwrap().unwrap();
    assert_eq!(record.status, ConversationStatus::Open);
    assert_eq!(record.routing_state, Some(json!({"leader": 2})));
    assert_eq!(record.event_seq, 1);
    assert_eq!(store.outbox_backlog().await.unwrap(), 1);
    let recovery = store.recovery().await.unwrap();
    assert!(recovery.agents.is_empty());
    assert!(recovery.queues.is_empty());
    assert_eq!(recovery.unrouted.len(), 1);
    assert!(store.pushes_after(0, 10).await.unwrap().is_empty());
    // The thread still matches (the fenced close did not happen).
    assert_eq!(
        ingest(store, sms("SM2", PHONE, "?")).await.conversation,
        conversation
    );

    // The current epoch may keep writing; a newer one takes over and fences the old.
    store
        .apply_routing(Arc::new(RoutingWrite {
            epoch: 2,
            ..RoutingWrite::default()
        }))
        .await
        .unwrap();
    store
        .apply_routing(Arc::new(RoutingWrite {
            agents: vec![("agent-1".into(), json!({"leader": 3}))],
            epoch: 3,
            ..RoutingWrite::default()
        }))
        .await
        .unwrap();
    let old = store
        .apply_routing(Arc::new(RoutingWrite {
            epoch: 2,
            ..RoutingWrite::default()
        }))
        .await;
    assert!(
        matches!(old, Err(StoreError::Fenced { epoch: 2 })),
        "{old:?}"
    );
}

async fn failed_request_leaves_nothing(backend: Backend) {
    let store = backend.store();
    let message = ingest(store, sms("SM1", PHONE, "hi")).await;
    let unknown = Ulid::new();
    let result = store
        .apply_routing(Arc::new(RoutingWrite {
            conversations: vec![
                (message.conversation, ConversationStatus::Closed, json!({})),
                (unknown, ConversationStatus::Open, json!({})),
            ],
            agents: vec![("agent-1".into(), json!({}))],
            events: vec![event("conversation.closed", Some(message.conversation))],
            ..RoutingWrite::default()
        }))
        .await;
    assert!(matches!(result, Err(StoreError::NotFound(_))), "{result:?}");
    let result = store
        .apply_routing(Arc::new(RoutingWrite {
            routed_messages: vec![message.message, Ulid::new()],
            ..RoutingWrite::default()
        }))
        .await;
    assert!(matches!(result, Err(StoreError::NotFound(_))), "{result:?}");
    let result = store
        .apply_routing(Arc::new(RoutingWrite {
            agents: vec![("agent-2".into(), json!({}))],
            events: vec![event("conversation.created", Some(unknown))],
            ..RoutingWrite::default()
        }))
        .await;
    assert!(matches!(result, Err(StoreError::NotFound(_))), "{result:?}");

    let record = store
        .conversation(message.conversation)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(record.status, ConversationStatus::Open);
    assert_eq!(record.routing_state, None);
    assert_eq!(record.event_seq, 0);
    assert_eq!(store.outbox_backlog().await.unwrap(), 0);
    let recovery = store.recovery().await.unwrap();
    assert!(recovery.agents.is_empty());
    assert_eq!(recovery.unrouted.len(), 1);

    // Failures interleaved with good writes (likely sharing a batch) spoil only themselves.
    let mut tasks = Vec::new();
    for i in 0..20 {
        let store = Arc::clone(&backend.store);
        tasks.push(tokio::spawn(async move {
            if i % 2 == 0 {
                store
                    .ingest(sms(&format!("B{i}"), PHONE, "more"), Vec::new(), Utc::now())
                    .await
                    .map(|_| ())
            } else {
                store
                    .apply_routing(Arc::new(RoutingWrite {
                        events: vec![event("conversation.created", Some(Ulid::new()))],
                        ..RoutingWrite::default()
                    }))
                    .await
            }
        }));
    }
    for (i, task) in tasks.into_iter().enumerate() {
        let result = task.await.unwrap();
        if i % 2 == 0 {
            assert!(result.is_ok(), "{result:?}");
        } else {
            assert!(matches!(result, Err(StoreError::NotFound(_))), "{result:?}");
        }
    }
    assert_eq!(all_messages(store).await.len(), 11);
    assert_eq!(store.outbox_backlog().await.unwrap(), 0);
}

async fn recovery_returns_unrouted_and_states(backend: Backend) {
    let store = backend.store();
    let empty = store.recovery().await.unwrap();
    assert!(
        empty.conversations.is_empty()
            && empty.agents.is_empty()
            && empty.queues.is_empty()
            && empty.unrouted.is_empty()
    );

    let m1 = ingest(store, sms("SM1", PHONE, "one")).await;
    let m2 = ingest(store, sms("SM2", "+15555550124", "two")).await;
    let m3 = ingest(store, sms("SM3", PHONE, "three")).await;
    let recovery = store.recovery().await.unwrap();
    assert_eq!(
        recovery
            .unrouted
            .iter()
            .map(|m| m.message.id)
            .collect::<Vec<_>>(),
        vec![m1.message, m2.message, m3.message],
        "oldest first"
    );
    assert!(
        recovery.unrouted.iter().all(|m| m.new_conversation),
        "no conversation routed yet"
    );
    assert_eq!(
        recovery.unrouted[0].contact_id,
        recovery.unrouted[2].contact_id
    );
    assert_ne!(
        recovery.unrouted[0].contact_id,
        recovery.unrouted[1].contact_id
    );
    assert!(
        recovery.conversations.is_empty(),
        "no router state saved yet"
    );

    store
        .apply_routing(Arc::new(RoutingWrite {
            conversations: vec![
                (
                    m1.conversation,
                    ConversationStatus::Open,
                    json!({"queue": "sales"}),
                ),
                (
                    m2.conversation,
                    ConversationStatus::Resolved,
                    json!({"queue": "support"}),
                ),
            ],
            agents: vec![
                ("agent-1".into(), json!({"presence": "available"})),
                ("agent-2".into(), json!({"presence": "away"})),
            ],
            queues: vec![("sales".into(), json!({"recent_handle_times": [1000]}))],
            routed_messages: vec![m1.message, m2.message],
            ..RoutingWrite::default()
        }))
        .await
        .unwrap();
    let recovery = store.recovery().await.unwrap();
    assert_eq!(
        recovery
            .unrouted
            .iter()
            .map(|m| m.message.id)
            .collect::<Vec<_>>(),
        vec![m3.message]
    );
    assert!(
        !recovery.unrouted[0].new_conversation,
        "its conversation was routed with m1"
    );
    let conversations = documents(recovery.conversations);
    assert_eq!(conversations.len(), 2);
    assert_eq!(conversations[&m1.conversation], json!({"queue": "sales"}));
    assert_eq!(conversations[&m2.conversation], json!({"queue": "support"}));
    let agents = documents(recovery.agents);
    assert_eq!(agents.len(), 2);
    assert_eq!(agents["agent-1"], json!({"presence": "available"}));
    assert_eq!(
        documents(recovery.queues),
        BTreeMap::from([("sales".into(), json!({"recent_handle_times": [1000]}))])
    );

    // Agent and queue states are replaced, not duplicated; closed conversations drop out.
    store
        .apply_routing(Arc::new(RoutingWrite {
            conversations: vec![(m2.conversation, ConversationStatus::Closed, json!({}))],
            agents: vec![("agent-1".into(), json!({"presence": "offline"}))],
            queues: vec![
                ("sales".into(), json!({"recent_handle_times": [1000, 2000]})),
                ("support".into(), json!({"recent_handle_times": []})),
            ],
            routed_messages: vec![m3.message],
            ..RoutingWrite::default()
        }))
        .await
        .unwrap();
    let recovery = store.recovery().await.unwrap();
    assert!(recovery.unrouted.is_empty());
    assert_eq!(
        documents(recovery.conversations),
        BTreeMap::from([(m1.conversation, json!({"queue": "sales"}))])
    );
    let agents = documents(recovery.agents);
    assert_eq!(agents.len(), 2);
    assert_eq!(agents["agent-1"], json!({"presence": "offline"}));
    let queues = documents(recovery.queues);
    assert_eq!(queues.len(), 2);
    assert_eq!(
        queues["sales"],
        json!({"recent_handle_times": [1000, 2000]})
    );
}

/// Recovered state documents (JSON text) by key, parsed.
fn documents<K: Ord>(stored: Vec<(K, String)>) -> BTreeMap<K, serde_json::Value> {
    stored
        .into_iter()
        .map(|(key, text)| (key, serde_json::from_str(&text).unwrap()))
        .collect()
}

async fn replies_and_delivery_status(backend: Backend) {
    let store = backend.store();
    let inbound = ingest(store, sms("SM1", PHONE, "where is it?")).await;
    let at = Utc::now() + chrono::Duration::seconds(1);
    let mut answer = reply(inbound.conversation, "it ships today", at);
    answer.html = Some("<p>it ships today</p>".into());
    store
        .store_reply(
            answer.clone(),
            vec![event("message.sent", Some(inbound.conversation))],
        )
        .await
        .unwrap();

    let messages = store.messages(inbound.conversation).await.unwrap();
    assert_eq!(
        messages.iter().map(|m| m.id).collect::<Vec<_>>(),
        vec![inbound.message, answer.id]
    );
    let outbound = &messages[1];
    assert_eq!(outbound.direction, Direction::Outbound);
    assert_eq!(outbound.delivery_status.as_deref(), Some("pending"));
    assert_eq!(outbound.agent_id.as_deref(), Some("agent-7"));
    assert_eq!(outbound.channel, "sms");
    assert_eq!(outbound.provider, "twilio");
    assert_eq!(outbound.from_address, OUR_NUMBER);
    assert_eq!(outbound.to_address, PHONE);
    assert_eq!(outbound.provider_message_id, None);
    assert_eq!(outbound.created_at, at);
    assert_eq!(outbound.body["text"], "it ships today");
    assert_eq!(outbound.body["html"], "<p>it ships today</p>");
    // Replies are never replayed to the router.
    let recovery = store.recovery().await.unwrap();
    assert_eq!(
        recovery
            .unrouted
            .iter()
            .map(|m| m.message.id)
            .collect::<Vec<_>>(),
        vec![inbound.message]
    );
    // A pending reply is re-queued after a restart; once sent it is not.
    assert_eq!(store.pending_replies().await.unwrap(), vec![answer.id]);

    let sent = store
        .set_delivery_status(delivery(
            answer.id,
            "sent",
            Some("SM-out-1"),
            vec![event("message.sent", Some(inbound.conversation))],
        ))
        .await
        .unwrap();
    assert_eq!(sent.outcome, DeliveryOutcome::Applied);
    assert_eq!(sent.parked, None);
    store
        .set_delivery_status(delivery(answer.id, "delivered", None, Vec::new()))
        .await
        .unwrap();
    let outbound = store.message(answer.id).await.unwrap().unwrap();
    assert_eq!(outbound.delivery_status.as_deref(), Some("delivered"));
    assert!(store.pending_replies().await.unwrap().is_empty());
    assert_eq!(outbound.provider_message_id.as_deref(), Some("SM-out-1"));
    assert_eq!(
        store
            .outbox_pending(10)
            .await
            .unwrap()
            .iter()
            .map(|e| e.seq)
            .collect::<Vec<_>>(),
        vec![1, 2]
    );
    // Statuses only move forward: a late `sent` (the provider's callback won the race) changes
    // nothing and writes no event; a failure after delivery is still recorded.
    let late = store
        .set_delivery_status(delivery(
            answer.id,
            "sent",
            None,
            vec![event("message.sent", Some(inbound.conversation))],
        ))
        .await
        .unwrap();
    assert_eq!(late.outcome, DeliveryOutcome::Superseded);
    let outbound = store.message(answer.id).await.unwrap().unwrap();
    assert_eq!(outbound.delivery_status.as_deref(), Some("delivered"));
    assert_eq!(store.outbox_pending(10).await.unwrap().len(), 2);
    store
        .set_delivery_status(delivery(answer.id, "failed", None, Vec::new()))
        .await
        .unwrap();
    let again = store
        .set_delivery_status(delivery(answer.id, "failed", None, Vec::new()))
        .await
        .unwrap();
    assert_eq!(again.outcome, DeliveryOutcome::Superseded);

    let unknown = store
        .set_delivery_status(delivery(Ulid::new(), "failed", None, Vec::new()))
        .await;
    assert!(
        matches!(unknown, Err(StoreError::NotFound(_))),
        "{unknown:?}"
    );
    // An inbound message has no delivery status.
    let inbound_status = store
        .set_delivery_status(delivery(inbound.message, "sent", None, Vec::new()))
        .await;
    assert!(
        matches!(inbound_status, Err(StoreError::NotFound(_))),
        "{inbound_status:?}"
    );
    let orphan = store
        .store_reply(reply(Ulid::new(), "lost", Utc::now()), Vec::new())
        .await;
    assert!(matches!(orphan, Err(StoreError::NotFound(_))), "{orphan:?}");
    assert_eq!(store.outbox_backlog().await.unwrap(), 2);
}

async fn conversation_filters(backend: Backend) {
    let store = backend.store();
    let a = ingest(store, sms("SM1", PHONE, "a")).await;
    tokio::time::sleep(Duration::from_millis(2)).await;
    let b = ingest(
        store,
        email(
            "<m1@example.com>",
            "ann@example.com",
            "<m1@example.com>",
            "b",
        ),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(2)).await;
    let c = ingest(store, sms("SM2", "+15555550124", "c")).await;
    store
        .apply_routing(Arc::new(set_status(
            c.conversation,
            ConversationStatus::Resolved,
        )))
        .await
        .unwrap();

    let ids = |list: Vec<switchboard::store::ConversationRecord>| {
        list.into_iter().map(|c| c.id).collect::<Vec<_>>()
    };
    let all = store
        .conversations(ConversationFilter::default())
        .await
        .unwrap();
    assert_eq!(
        ids(all.clone()),
        vec![c.conversation, b.conversation, a.conversation],
        "newest first"
    );
    let sms_only = ConversationFilter {
        channel: Some("sms".into()),
        ..ConversationFilter::default()
    };
    assert_eq!(
        ids(store.conversations(sms_only).await.unwrap()),
        vec![c.conversation, a.conversation]
    );
    let resolved = ConversationFilter {
        status: Some(ConversationStatus::Resolved),
        ..ConversationFilter::default()
    };
    assert_eq!(
        ids(store.conversations(resolved).await.unwrap()),
        vec![c.conversation]
    );
    let by_contact = ConversationFilter {
        contact_id: Some(b.contact),
        ..ConversationFilter::default()
    };
    assert_eq!(
        ids(store.conversations(by_contact).await.unwrap()),
        vec![b.conversation]
    );
    let first_page = ConversationFilter {
        limit: 2,
        ..ConversationFilter::default()
    };
    let page = store.conversations(first_page).await.unwrap();
    assert_eq!(ids(page.clone()), vec![c.conversation, b.conversation]);
    let next_page = ConversationFilter {
        limit: 2,
        updated_before: Some(page[1].updated_at),
        ..ConversationFilter::default()
    };
    assert_eq!(
        ids(store.conversations(next_page).await.unwrap()),
        vec![a.conversation]
    );
}

async fn concurrent_ingest_is_stored_exactly_once(backend: Backend) {
    const TASKS: usize = 20;
    const PER_TASK: usize = 10;
    let commits_before = backend.commit_count();
    let ingest_all = |duplicates: bool| {
        let mut tasks = Vec::new();
        for task in 0..TASKS {
            let store = Arc::clone(&backend.store);
            tasks.push(tokio::spawn(async move {
                let mut outcomes = Vec::new();
                for i in 0..PER_TASK {
                    // Each task is one customer on their own number.
                    let from = format!("+1555600{task:04}");
                    let message = sms(&format!("SM-{task}-{i}"), &from, "hello");
                    let outcome = store.ingest(message, Vec::new(), Utc::now()).await.unwrap();
                    assert_eq!(
                        matches!(outcome, IngestOutcome::Duplicate { .. }),
                        duplicates,
                        "{outcome:?}"
                    );
                    outcomes.push(outcome);
                }
                outcomes
            }));
        }
        tasks
    };

    let mut stored_ids = BTreeSet::new();
    let mut conversations = BTreeSet::new();
    for task in ingest_all(false) {
        for outcome in task.await.unwrap() {
            let outcome = stored(outcome);
            assert!(stored_ids.insert(outcome.message));
            conversations.insert(outcome.conversation);
        }
    }
    assert_eq!(stored_ids.len(), TASKS * PER_TASK);
    assert_eq!(conversations.len(), TASKS);
    if let (Some(before), Some(after)) = (commits_before, backend.commit_count()) {
        let commits = after - before;
        assert!(
            commits < (TASKS * PER_TASK) as u64,
            "group commit should share commits: {commits} commits for {} messages",
            TASKS * PER_TASK
        );
    }

    // Everything again, concurrently: all acknowledged as duplicates, nothing new stored.
    let mut duplicate_ids = BTreeSet::new();
    for task in ingest_all(true) {
        for outcome in task.await.unwrap() {
            match outcome {
                IngestOutcome::Duplicate { message_id, .. } => {
                    duplicate_ids.insert(message_id);
                }
                other => panic!("{other:?}"),
            }
        }
    }
    assert_eq!(duplicate_ids, stored_ids);
    let all = all_messages(backend.store()).await;
    assert_eq!(all.keys().copied().collect::<BTreeSet<_>>(), stored_ids);
    for conversation in conversations {
        assert_eq!(
            backend.store().messages(conversation).await.unwrap().len(),
            PER_TASK
        );
    }
}

async fn data_survives_reopen(backend: Backend) {
    let store = backend.store();
    let inbound = ingest(store, sms("SM1", PHONE, "hi")).await;
    let unrouted = ingest(store, sms("SM2", PHONE, "still there?")).await;
    store
        .apply_routing(Arc::new(RoutingWrite {
            conversations: vec![(
                inbound.conversation,
                ConversationStatus::Open,
                json!({"queue": "support"}),
            )],
            agents: vec![("agent-1".into(), json!({"presence": "available"}))],
            queues: vec![("support".into(), json!({"recent_handle_times": [60000]}))],
            routed_messages: vec![inbound.message],
            events: vec![event("conversation.queued", Some(inbound.conversation))],
            epoch: 4,
            ..RoutingWrite::default()
        }))
        .await
        .unwrap();
    let answer = reply(inbound.conversation, "yes", Utc::now());
    store.store_reply(answer.clone(), Vec::new()).await.unwrap();

    let conversation = store.conversation(inbound.conversation).await.unwrap();
    let messages = store.messages(inbound.conversation).await.unwrap();
    let outbox = store.outbox_pending(10).await.unwrap();

    let backend = backend.reopen().await;
    let store = backend.store();
    assert_eq!(
        store.conversation(inbound.conversation).await.unwrap(),
        conversation
    );
    assert_eq!(
        store.messages(inbound.conversation).await.unwrap(),
        messages
    );
    assert_eq!(store.outbox_pending(10).await.unwrap(), outbox);
    let recovery = store.recovery().await.unwrap();
    assert_eq!(
        recovery
            .unrouted
            .iter()
            .map(|m| m.message.id)
            .collect::<Vec<_>>(),
        vec![unrouted.message]
    );
    assert_eq!(recovery.agents.len(), 1);
    assert_eq!(recovery.conversations.len(), 1);
    assert_eq!(recovery.queues.len(), 1);
    // Deduplication, threads and fencing survive too.
    assert!(matches!(
        store
            .ingest(sms("SM1", PHONE, "hi"), Vec::new(), Utc::now())
            .await
            .unwrap(),
        IngestOutcome::Duplicate { .. }
    ));
    assert_eq!(
        ingest(store, sms("SM3", PHONE, "more")).await.conversation,
        inbound.conversation
    );
    let stale = store
        .apply_routing(Arc::new(RoutingWrite {
            epoch: 3,
            ..RoutingWrite::default()
        }))
        .await;
    assert!(
        matches!(stale, Err(StoreError::Fenced { epoch: 3 })),
        "{stale:?}"
    );
    store.check_writable().await.unwrap();
}

async fn failing_writes_are_unavailable_and_store_nothing(backend: Backend) {
    let store = backend.store();
    store.check_writable().await.unwrap();

    let block = backend.block_writes().await;
    let photo = AttachmentContent::new(b"a photo of the parcel".to_vec());
    let result = store
        .ingest(sms("SM1", PHONE, "hi"), vec![photo.clone()], Utc::now())
        .await;
    assert!(
        matches!(result, Err(StoreError::Unavailable(_))),
        "{result:?}"
    );
    assert_eq!(store.attachment(photo.sha256()).await.unwrap(), None);
    let result = store.check_writable().await;
    assert!(
        matches!(result, Err(StoreError::Unavailable(_))),
        "{result:?}"
    );
    // Several callers at once (one batch or several): none is acknowledged.
    let mut tasks = Vec::new();
    for i in 0..10 {
        let store = Arc::clone(&backend.store);
        tasks.push(tokio::spawn(async move {
            store
                .ingest(sms(&format!("SM-{i}"), PHONE, "hi"), Vec::new(), Utc::now())
                .await
        }));
    }
    for task in tasks {
        let result = task.await.unwrap();
        assert!(
            matches!(result, Err(StoreError::Unavailable(_))),
            "{result:?}"
        );
    }
    let result = store
        .apply_routing(Arc::new(RoutingWrite {
            agents: vec![("agent-1".into(), json!({}))],
            events: vec![event("agent.presence", None)],
            ..RoutingWrite::default()
        }))
        .await;
    assert!(
        matches!(result, Err(StoreError::Unavailable(_))),
        "{result:?}"
    );
    // Reads still work while writes fail.
    assert!(
        store
            .conversations(ConversationFilter::default())
            .await
            .unwrap()
            .is_empty()
    );
    drop(block);

    // Nothing was half-stored: no contact, conversation, message or event survived.
    assert!(all_messages(store).await.is_empty());
    assert_eq!(store.outbox_backlog().await.unwrap(), 0);
    assert!(store.recovery().await.unwrap().agents.is_empty());
    // The retry is a first delivery, on a fresh contact and conversation.
    store.check_writable().await.unwrap();
    let retried = stored(
        store
            .ingest(sms("SM1", PHONE, "hi"), Vec::new(), Utc::now())
            .await
            .unwrap(),
    );
    assert!(retried.new_conversation);
    let conversations = store
        .conversations(ConversationFilter::default())
        .await
        .unwrap();
    assert_eq!(conversations.len(), 1);
}

// ---------------------------------------------------------------------------------------------
// SQLite only

mod sqlite_only {
    use super::*;

    fn schema_versions(path: &std::path::Path) -> Vec<i64> {
        let conn = rusqlite::Connection::open(path).unwrap();
        let mut stmt = conn
            .prepare("SELECT version FROM schema_migrations ORDER BY version")
            .unwrap();
        stmt.query_map([], |row| row.get(0))
            .unwrap()
            .collect::<Result<Vec<i64>, _>>()
            .unwrap()
    }

    #[tokio::test]
    async fn opens_in_wal_mode_with_full_sync() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        let store = SqliteStore::open(&path, SqliteOptions::default()).unwrap();
        store.check_writable().await.unwrap();
        let conn = rusqlite::Connection::open(&path).unwrap();
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |row| row.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        assert!(format!("{store:?}").contains("SqliteStore"));
    }

    #[tokio::test]
    async fn migrations_are_idempotent_and_newer_schemas_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        let store = SqliteStore::open(&path, sqlite_options()).unwrap();
        let first = ingest(&store, sms("SM1", PHONE, "hi")).await;
        store.close().await.unwrap();
        drop(store);
        let expected: Vec<i64> = (1..=SCHEMA_VERSION).collect();
        assert_eq!(schema_versions(&path), expected);

        for _ in 0..2 {
            let store = SqliteStore::open(&path, sqlite_options()).unwrap();
            assert!(store.message(first.message).await.unwrap().is_some());
            drop(store);
            assert_eq!(schema_versions(&path), expected);
        }

        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute(
            "INSERT INTO schema_migrations (version, applied_at) VALUES (?1, 'later')",
            [SCHEMA_VERSION + 1],
        )
        .unwrap();
        drop(conn);
        match SqliteStore::open(&path, sqlite_options()) {
            Err(StoreError::Unavailable(message)) => {
                assert!(message.contains("newer"), "{message}");
                assert!(
                    message.contains(&format!("version {}", SCHEMA_VERSION + 1)),
                    "{message}"
                );
            }
            other => panic!("a newer schema must be refused, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_file_that_is_not_a_database_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        std::fs::write(&path, vec![b'x'; 8192]).unwrap();
        let result = SqliteStore::open(&path, sqlite_options());
        assert!(result.is_err(), "{result:?}");
    }

    /// Closing (or dropping) flushes: every write acknowledged before is on disk, every write after
    /// is refused, and no caller is left hanging.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn close_commits_queued_writes_and_refuses_later_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        let store = SqliteStore::open(&path, sqlite_options()).unwrap();
        let mut tasks = Vec::new();
        for i in 0..200 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                let message = sms(&format!("SM-{i}"), PHONE, "hi");
                store
                    .ingest(message, Vec::new(), Utc::now())
                    .await
                    .map(stored)
            }));
        }
        tokio::task::yield_now().await;
        store.close().await.unwrap();
        let mut acknowledged = BTreeSet::new();
        for task in tasks {
            match task.await.unwrap() {
                Ok(outcome) => {
                    acknowledged.insert(outcome.message);
                }
                Err(StoreError::Unavailable(_)) => {}
                Err(other) => panic!("{other:?}"),
            }
        }
        let after = store
            .ingest(sms("late", PHONE, "hi"), Vec::new(), Utc::now())
            .await;
        assert!(
            matches!(after, Err(StoreError::Unavailable(_))),
            "{after:?}"
        );
        store.close().await.unwrap();
        drop(store);

        let store = SqliteStore::open(&path, sqlite_options()).unwrap();
        let stored: BTreeSet<Ulid> = all_messages(&store).await.into_keys().collect();
        assert_eq!(stored, acknowledged);

        // Dropping the last handle flushes too: requests already queued by callers that stopped
        // waiting are still committed before the writer exits.
        let before = stored.len();
        for i in 0..20 {
            let mut request = Box::pin(store.ingest(
                sms(&format!("SM-drop-{i}"), PHONE, "bye"),
                Vec::new(),
                Utc::now(),
            ));
            // Polled once: the request is queued; then the caller gives up.
            tokio::select! {
                biased;
                _ = &mut request => {}
                () = std::future::ready(()) => {}
            }
        }
        drop(store);
        let store = SqliteStore::open(&path, sqlite_options()).unwrap();
        assert_eq!(all_messages(&store).await.len(), before + 20);
    }

    /// A batch first runs without savepoints; a request that fails sends it round again with one
    /// savepoint per request, so only the failing request is undone.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_failing_request_undoes_only_itself_in_a_shared_batch() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("db.sqlite"), sqlite_options()).unwrap();
        let mut ingests = Vec::new();
        let mut failing = Vec::new();
        for i in 0..300 {
            let store = store.clone();
            if i % 50 == 25 {
                failing.push(tokio::spawn(async move {
                    store
                        .apply_routing(Arc::new(set_status(Ulid::new(), ConversationStatus::Open)))
                        .await
                }));
            } else {
                ingests.push(tokio::spawn(async move {
                    let from = format!("+1555800{:04}", i % 40);
                    store
                        .ingest(
                            sms(&format!("SM-shared-{i}"), &from, "hi"),
                            Vec::new(),
                            Utc::now(),
                        )
                        .await
                        .map(stored)
                }));
            }
        }
        let mut acknowledged = BTreeSet::new();
        for task in ingests {
            acknowledged.insert(task.await.unwrap().unwrap().message);
        }
        for task in failing {
            let outcome = task.await.unwrap();
            assert!(
                matches!(outcome, Err(StoreError::NotFound(_))),
                "{outcome:?}"
            );
        }
        let stats = store.stats();
        assert!(stats.average_batch() > 1.0, "{stats:?}");
        let stored: BTreeSet<Ulid> = all_messages(&store).await.into_keys().collect();
        assert_eq!(stored, acknowledged);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn batches_share_commits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        let store = SqliteStore::open(&path, sqlite_options()).unwrap();
        let mut tasks = Vec::new();
        for i in 0..500 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                let from = format!("+1555700{:04}", i % 50);
                store
                    .ingest(sms(&format!("SM-{i}"), &from, "hi"), Vec::new(), Utc::now())
                    .await
                    .map(stored)
            }));
        }
        for task in tasks {
            task.await.unwrap().unwrap();
        }
        let stats = store.stats();
        assert_eq!(stats.requests, 500);
        assert!(stats.commits < 500, "{stats:?}");
        assert!(stats.average_batch() > 1.0, "{stats:?}");
        assert_eq!(stats.failed_batches, 0);
    }
}

// ---------------------------------------------------------------------------------------------
// Leadership: the router's lease and the fencing epoch

const LONG: Duration = Duration::from_secs(30);

/// Polls until `node` gets the lease (once the holder's has run out), failing the test after a
/// generous deadline. A busy store (another instance writing) only delays it.
async fn acquire_when_free(store: &dyn Store, node: &str) -> u64 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match store.try_acquire_lease(node, LONG).await {
            Ok(Some(epoch)) => return epoch,
            Ok(None) | Err(StoreError::Unavailable(_)) => {}
            Err(other) => panic!("{other:?}"),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{node} never got the lease"
        );
        tokio::task::yield_now().await;
    }
}

async fn lease_acquire_renew_expire_and_takeover(backend: Backend) {
    let store = backend.store();
    let lease = store.lease().await.unwrap();
    assert_eq!(lease.holder, None);
    assert!(!lease.live);
    assert_eq!(lease.remaining, None);

    let first = store
        .try_acquire_lease("node-a", LONG)
        .await
        .unwrap()
        .unwrap();
    assert!(first > lease.epoch);
    assert_eq!(store.try_acquire_lease("node-b", LONG).await.unwrap(), None);
    assert!(store.renew_lease("node-a", first, LONG).await.unwrap());
    let lease = store.lease().await.unwrap();
    assert_eq!(lease.holder.as_deref(), Some("node-a"));
    assert_eq!(lease.epoch, first);
    assert!(lease.live);
    assert!(lease.expires_at.unwrap() > Utc::now());
    // What is left, by the store's clock: at most the lifetime just granted.
    let left = lease.remaining.unwrap();
    assert!(left <= LONG && left > LONG / 2, "{left:?}");

    // node-a stops renewing: once its lease runs out (the store's clock), node-b takes over with
    // a newer epoch and node-a can no longer renew.
    assert!(
        store
            .renew_lease("node-a", first, Duration::from_millis(50))
            .await
            .unwrap()
    );
    let second = acquire_when_free(store, "node-b").await;
    assert!(second > first);
    assert!(!store.renew_lease("node-a", first, LONG).await.unwrap());
    assert!(!store.release_lease("node-a", first).await.unwrap());
    let lease = store.lease().await.unwrap();
    assert_eq!(
        (lease.holder.as_deref(), lease.epoch),
        (Some("node-b"), second)
    );

    // A node that restarts takes its own lease back at once, under a new epoch that fences its
    // earlier run.
    let third = store
        .try_acquire_lease("node-b", LONG)
        .await
        .unwrap()
        .unwrap();
    assert!(third > second);
    assert!(!store.renew_lease("node-b", second, LONG).await.unwrap());

    // Stepping down frees the lease at once.
    assert!(store.release_lease("node-b", third).await.unwrap());
    let lease = store.lease().await.unwrap();
    assert!(!lease.live);
    assert_eq!(lease.remaining, None);
    assert_eq!(lease.holder, None);
    let fourth = store
        .try_acquire_lease("node-a", LONG)
        .await
        .unwrap()
        .unwrap();
    assert!(fourth > third);

    // Nonsense lifetimes are refused.
    assert!(
        store
            .try_acquire_lease("node-a", Duration::ZERO)
            .await
            .is_err()
    );
    assert_eq!(store.lease().await.unwrap().epoch, fourth);

    // The lease survives a restart of the store.
    let backend = backend.reopen().await;
    let lease = backend.store().lease().await.unwrap();
    assert_eq!(
        (lease.holder.as_deref(), lease.epoch),
        (Some("node-a"), fourth)
    );
}

async fn takeover_fences_the_old_leader(backend: Backend) {
    let store = backend.store();
    let message = ingest(store, sms("SM1", PHONE, "hi")).await;
    let conversation = message.conversation;
    let old = store
        .try_acquire_lease("node-a", Duration::from_millis(100))
        .await
        .unwrap()
        .unwrap();
    let write = move |leader: &str, n: u64, epoch: u64| {
        Arc::new(RoutingWrite {
            conversations: vec![(
                conversation,
                ConversationStatus::Open,
                json!({ "leader": leader, "n": n }),
            )],
            agents: vec![("agent-1".into(), json!({ "leader": leader }))],
            events: vec![event("conversation.queued", Some(conversation))],
            epoch,
            ..RoutingWrite::default()
        })
    };
    store.apply_routing(write("a", 0, old)).await.unwrap();

    // The old leader keeps writing (through its own instance) while another takes over.
    let old_instance = backend.second_instance().await;
    let old_leader = tokio::spawn({
        async move {
            for n in 1.. {
                match old_instance.apply_routing(write("a", n, old)).await {
                    Ok(()) | Err(StoreError::Unavailable(_)) => {}
                    Err(StoreError::Fenced { epoch }) => return (n, epoch),
                    Err(other) => panic!("{other:?}"),
                }
            }
            unreachable!()
        }
    });
    let new = acquire_when_free(store, "node-b").await;
    // (SQLite: the old leader's instance may hold the write lock for a moment; retry.)
    loop {
        match store.apply_routing(write("b", 0, new)).await {
            Ok(()) => break,
            Err(StoreError::Unavailable(_)) => tokio::task::yield_now().await,
            Err(other) => panic!("{other:?}"),
        }
    }
    let (attempts, fenced_epoch) = old_leader.await.unwrap();
    assert_eq!(fenced_epoch, old);
    assert!(attempts >= 1);

    // Nothing the old leader wrote landed after the new leader's write.
    let record = store.conversation(conversation).await.unwrap().unwrap();
    assert_eq!(record.routing_state, Some(json!({ "leader": "b", "n": 0 })));
    let recovery = store.recovery().await.unwrap();
    assert_eq!(
        documents(recovery.agents),
        BTreeMap::from([("agent-1".into(), json!({ "leader": "b" }))])
    );
    let events = store.outbox_pending(100_000).await.unwrap();
    assert_eq!(events.last().unwrap().seq, record.event_seq);
    assert_eq!(events.len() as u64, record.event_seq);
    // And it stays fenced.
    let late = store.apply_routing(write("a", 999, old)).await;
    assert!(matches!(late, Err(StoreError::Fenced { .. })), "{late:?}");
}

// ---------------------------------------------------------------------------------------------
// Two instances on one database

/// Ingests as a client of a busy store would: `Unavailable` (SQLite: the other instance held the
/// write lock past the busy timeout) means "retry".
async fn ingest_retrying(store: &dyn Store, message: InboundMessage) -> IngestOutcome {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match store.ingest(message.clone(), Vec::new(), Utc::now()).await {
            Ok(outcome) => return outcome,
            Err(StoreError::Unavailable(reason)) => {
                assert!(tokio::time::Instant::now() < deadline, "{reason}");
            }
            Err(other) => panic!("{other:?}"),
        }
    }
}

async fn two_instances_store_each_message_once(backend: Backend) {
    let other = backend.second_instance().await;
    let mut tasks = Vec::new();
    for (instance, store) in [Arc::clone(&backend.store), other].into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let mut outcomes = Vec::new();
            for i in 0..60 {
                // Both instances receive every message (a provider retrying on another node).
                let message = sms(&format!("SM-{i}"), &format!("+1555800{:04}", i % 7), "hi");
                let outcome = ingest_retrying(store.as_ref(), message).await;
                outcomes.push((instance, i, outcome));
            }
            outcomes
        }));
    }
    let mut by_message: BTreeMap<usize, Vec<IngestOutcome>> = BTreeMap::new();
    for task in tasks {
        for (_, i, outcome) in task.await.unwrap() {
            by_message.entry(i).or_default().push(outcome);
        }
    }
    for (i, outcomes) in &by_message {
        let stored: Vec<_> = outcomes
            .iter()
            .filter_map(|outcome| match outcome {
                IngestOutcome::Stored {
                    message_id,
                    conversation_id,
                    ..
                } => Some((*message_id, *conversation_id)),
                IngestOutcome::Duplicate { .. } => None,
            })
            .collect();
        assert_eq!(stored.len(), 1, "message {i}: {outcomes:?}");
        for outcome in outcomes {
            if let IngestOutcome::Duplicate {
                message_id,
                conversation_id,
            } = outcome
            {
                assert_eq!((*message_id, *conversation_id), stored[0], "message {i}");
            }
        }
    }
    assert_eq!(all_messages(backend.store()).await.len(), 60);
    // Seven customers, one conversation each.
    assert_eq!(
        backend
            .store()
            .conversations(ConversationFilter::default())
            .await
            .unwrap()
            .len(),
        7
    );
}

async fn two_instances_agree_on_a_new_customer(backend: Backend) {
    const CUSTOMERS: usize = 30;
    let other = backend.second_instance().await;
    let barrier = Arc::new(tokio::sync::Barrier::new(2));
    let mut tasks = Vec::new();
    for (instance, store) in [Arc::clone(&backend.store), other].into_iter().enumerate() {
        let barrier = Arc::clone(&barrier);
        tasks.push(tokio::spawn(async move {
            let mut outcomes = Vec::new();
            for customer in 0..CUSTOMERS {
                // Each new customer writes twice at once, and each instance takes one message.
                barrier.wait().await;
                let mut message = sms(
                    &format!("SM-{customer}-{instance}"),
                    &format!("+1555900{customer:04}"),
                    "hello?",
                );
                message.customer.id = Some(format!("crm-{customer}"));
                outcomes.push((
                    customer,
                    stored(ingest_retrying(store.as_ref(), message).await),
                ));
            }
            outcomes
        }));
    }
    let mut by_customer: BTreeMap<usize, Vec<Stored>> = BTreeMap::new();
    for task in tasks {
        for (customer, outcome) in task.await.unwrap() {
            by_customer.entry(customer).or_default().push(outcome);
        }
    }
    for (customer, outcomes) in &by_customer {
        assert_eq!(outcomes.len(), 2);
        assert_eq!(
            outcomes[0].contact, outcomes[1].contact,
            "customer {customer}"
        );
        assert_eq!(
            outcomes[0].conversation, outcomes[1].conversation,
            "customer {customer}"
        );
        assert_eq!(
            outcomes.iter().filter(|o| o.new_conversation).count(),
            1,
            "customer {customer}: {outcomes:?}"
        );
    }
    let conversations = backend
        .store()
        .conversations(ConversationFilter::default())
        .await
        .unwrap();
    assert_eq!(conversations.len(), CUSTOMERS);
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL only

mod postgres_only {
    use super::*;
    use switchboard::store::postgres::SCHEMA_VERSION as PG_SCHEMA_VERSION;

    async fn schema_versions(schema: &str) -> Vec<i64> {
        admin_client()
            .await
            .query(
                &format!("SELECT version FROM {schema}.schema_migrations ORDER BY version"),
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|row| row.get(0))
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn instances_starting_together_migrate_once() {
        let schema = TestSchema::new();
        let opens: Vec<_> = (0..4)
            .map(|_| tokio::spawn(PostgresStore::open(schema.options())))
            .collect();
        let mut stores = Vec::new();
        for open in opens {
            stores.push(open.await.unwrap().unwrap());
        }
        let expected: Vec<i64> = (1..=PG_SCHEMA_VERSION).collect();
        assert_eq!(schema_versions(&schema.name).await, expected);
        let first = ingest(&stores[0], sms("SM1", PHONE, "hi")).await;
        assert!(stores[3].message(first.message).await.unwrap().is_some());
        for store in &stores {
            store.close().await.unwrap();
        }
        // Opening again changes nothing; a schema from a newer release is refused.
        let again = PostgresStore::open(schema.options()).await.unwrap();
        again.close().await.unwrap();
        assert_eq!(schema_versions(&schema.name).await, expected);
        admin_client()
            .await
            .execute(
                &format!(
                    "INSERT INTO {}.schema_migrations (version) VALUES ($1)",
                    schema.name
                ),
                &[&(PG_SCHEMA_VERSION + 1)],
            )
            .await
            .unwrap();
        match PostgresStore::open(schema.options()).await {
            Err(StoreError::Unavailable(message)) => {
                assert!(message.contains("newer"), "{message}");
            }
            other => panic!("a newer schema must be refused, got {other:?}"),
        }
    }

    /// Every instance follows the committed events. An event whose transaction still runs holds
    /// back the events of later transactions (which took later positions but may commit first);
    /// once it commits, each is read exactly once, in (transaction, position) order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn committed_events_are_followed_once_even_when_a_commit_overtakes() {
        let schema = TestSchema::new();
        let store = PostgresStore::open(schema.options()).await.unwrap();
        let start = store.events_end().await.unwrap();
        let insert = format!(
            "INSERT INTO {}.outbox (event_id, kind, seq, data, time)
             VALUES ($1, 'agent.presence', 0, '{{}}', 0) RETURNING position",
            schema.name
        );
        let slow = admin_client().await;
        slow.batch_execute("BEGIN").await.unwrap();
        let first: i64 = slow
            .query_one(&insert, &[&Ulid::new().to_string()])
            .await
            .unwrap()
            .get(0);
        let second: i64 = admin_client()
            .await
            .query_one(&insert, &[&Ulid::new().to_string()])
            .await
            .unwrap()
            .get(0);
        assert!(first < second);

        let page = store.events_after(start, 100).await.unwrap();
        assert_eq!(page.events, Vec::new(), "read past a running transaction");
        assert!(
            page.held_back,
            "the committed event waits behind the running one"
        );
        assert_eq!(page.next, start);

        slow.batch_execute("COMMIT").await.unwrap();
        // Other tests' transactions on this server may hold the horizon back a moment longer.
        let mut cursor = start;
        let mut followed = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while followed.len() < 2 {
            assert!(tokio::time::Instant::now() < deadline, "{followed:?}");
            let page = store.events_after(cursor, 100).await.unwrap();
            followed.extend(page.events.iter().map(|event| event.position));
            cursor = page.next;
            if page.events.is_empty() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        assert_eq!(followed, vec![first, second]);
        let again = store.events_after(cursor, 100).await.unwrap();
        assert_eq!(again.events, Vec::new());
        store.close().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn reconnects_after_the_server_cuts_every_connection() {
        let schema = TestSchema::new();
        let store = PostgresStore::open(schema.options()).await.unwrap();
        ingest(&store, sms("SM-0", PHONE, "hi")).await;
        let cut = || async {
            admin_client()
                .await
                .execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                     WHERE application_name = $1",
                    &[&schema.name],
                )
                .await
                .unwrap()
        };

        // Cut while idle: the next operations succeed on fresh connections.
        assert!(cut().await >= 1);
        store.check_writable().await.unwrap();
        ingest(&store, sms("SM-1", PHONE, "still there?")).await;
        assert_eq!(all_messages(&store).await.len(), 2);

        // Cut under load: writes in flight may fail (Unavailable, never acknowledged), and every
        // acknowledged one is stored.
        let mut tasks = Vec::new();
        for i in 0..200 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                let message = sms(&format!("SM-load-{i}"), &format!("+1555{i:07}"), "hi");
                (i, store.ingest(message, Vec::new(), Utc::now()).await)
            }));
        }
        cut().await;
        let mut acknowledged = BTreeSet::new();
        for task in tasks {
            match task.await.unwrap() {
                (_, Ok(outcome)) => {
                    acknowledged.insert(stored(outcome).message);
                }
                (_, Err(StoreError::Unavailable(_))) => {}
                (i, Err(other)) => panic!("message {i}: {other:?}"),
            }
        }
        store.check_writable().await.unwrap();
        let all: BTreeSet<Ulid> = all_messages(&store).await.into_keys().collect();
        assert!(acknowledged.is_subset(&all));
        // Whatever was not acknowledged can be retried: stored once, or reported as a duplicate
        // of what the lost commit stored after all.
        for i in 0..200 {
            let message = sms(&format!("SM-load-{i}"), &format!("+1555{i:07}"), "hi");
            store.ingest(message, Vec::new(), Utc::now()).await.unwrap();
        }
        assert_eq!(all_messages(&store).await.len(), 202);
        assert!(store.stats().commits > 0);
    }

    #[tokio::test]
    async fn a_wrong_database_or_server_is_a_clear_error() {
        let mut options = TestSchema::new().options();
        options.connection.dbname("no_such_database");
        options.connection.password("s3cret-pw");
        let message = match PostgresStore::open(options.clone()).await {
            Err(StoreError::Unavailable(message)) => message,
            other => panic!("{other:?}"),
        };
        assert!(message.contains("no_such_database"), "{message}");
        assert!(!message.contains("s3cret"), "{message}");
        assert!(PostgresStore::check_connection(&options).await.is_err());

        options.connection = "postgres://postgres@127.0.0.1:1/test".parse().unwrap();
        let message = match PostgresStore::check_connection(&options).await {
            Err(StoreError::Unavailable(message)) => message,
            other => panic!("{other:?}"),
        };
        assert!(message.contains("127.0.0.1:1"), "{message}");
        assert!(!format!("{options:?}").contains("s3cret"));
    }
}

/// A provider's callback can beat the sender's write of the provider's id: the status is parked and
/// applied (with its event) in the write that stores the id; a superseded `sent` still stores its
/// id; a parked status never moves a reply backwards.
async fn status_before_the_provider_id_is_applied_when_it_is_stored(backend: Backend) {
    let store = backend.store();
    let inbound = stored(
        store
            .ingest(sms("SM-in-9", PHONE, "hello"), Vec::new(), Utc::now())
            .await
            .unwrap(),
    );
    let parked = |id: &str, status: &str, error: Option<&str>| ParkedStatus {
        channel: "sms".into(),
        provider_message_id: id.to_owned(),
        status: status.to_owned(),
        error: error.map(str::to_owned),
    };

    // `delivered`, then `failed` 30003, arrive for SM-early before the sender stored that id.
    let early = reply(inbound.conversation, "on its way", Utc::now());
    store.store_reply(early.clone(), Vec::new()).await.unwrap();
    assert!(
        store
            .park_delivery_status(parked("SM-early", "delivered", None), Utc::now())
            .await
            .unwrap()
    );
    assert!(
        store
            .park_delivery_status(parked("SM-early", "failed", Some("30003")), Utc::now())
            .await
            .unwrap()
    );
    // A later `delivered` does not undo the parked failure.
    store
        .park_delivery_status(parked("SM-early", "delivered", None), Utc::now())
        .await
        .unwrap();
    let backlog = store.outbox_backlog().await.unwrap();
    let mut sent = delivery(
        early.id,
        "sent",
        Some("SM-early"),
        vec![event("message.sent", Some(inbound.conversation))],
    );
    sent.parked_failure_event = Some(event("message.delivery_failed", Some(inbound.conversation)));
    let recorded = store.set_delivery_status(sent).await.unwrap();
    assert_eq!(recorded.outcome, DeliveryOutcome::Applied);
    assert_eq!(
        recorded.parked,
        Some(parked("SM-early", "failed", Some("30003")))
    );
    let early_stored = store.message(early.id).await.unwrap().unwrap();
    assert_eq!(early_stored.delivery_status.as_deref(), Some("failed"));
    assert_eq!(
        early_stored.provider_message_id.as_deref(),
        Some("SM-early")
    );
    // Both events are committed with it, the failure carrying the provider's error.
    let events = store.outbox_pending(100).await.unwrap();
    assert_eq!(store.outbox_backlog().await.unwrap(), backlog + 2);
    let failed = events
        .iter()
        .find(|e| e.kind == "message.delivery_failed")
        .unwrap();
    assert_eq!(failed.data["reason"], "30003");
    // Parked once, applied once: the id is ours now, so its statuses are no longer parked.
    assert!(
        !store
            .park_delivery_status(parked("SM-early", "delivered", None), Utc::now())
            .await
            .unwrap()
    );

    // A superseded `sent` (an email bounce, matched by our own id, came first) still stores the
    // provider's id, so later callbacks find the reply; a parked `delivered` cannot undo `failed`.
    let bounced = reply(inbound.conversation, "try this", Utc::now());
    store
        .store_reply(bounced.clone(), Vec::new())
        .await
        .unwrap();
    store
        .set_delivery_status(delivery(bounced.id, "failed", None, Vec::new()))
        .await
        .unwrap();
    store
        .park_delivery_status(parked("SM-late", "delivered", None), Utc::now())
        .await
        .unwrap();
    let recorded = store
        .set_delivery_status(delivery(bounced.id, "sent", Some("SM-late"), Vec::new()))
        .await
        .unwrap();
    assert_eq!(recorded.outcome, DeliveryOutcome::Superseded);
    assert_eq!(recorded.parked, None);
    let found = store
        .outbound_by_provider_id("sms", "SM-late")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(found.id, bounced.id);
    assert_eq!(found.delivery_status.as_deref(), Some("failed"));

    // A status parked over a day ago for an id that never became ours is dropped.
    store
        .park_delivery_status(
            parked("SM-stranger", "failed", None),
            Utc::now() - chrono::Duration::days(2),
        )
        .await
        .unwrap();
    store
        .park_delivery_status(parked("SM-other", "delivered", None), Utc::now())
        .await
        .unwrap();
    let stranger = reply(inbound.conversation, "hello?", Utc::now());
    store
        .store_reply(stranger.clone(), Vec::new())
        .await
        .unwrap();
    let recorded = store
        .set_delivery_status(delivery(
            stranger.id,
            "sent",
            Some("SM-stranger"),
            Vec::new(),
        ))
        .await
        .unwrap();
    assert_eq!(
        recorded.parked, None,
        "a status older than a day is dropped"
    );
}
