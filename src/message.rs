//! The normalised inbound message (`switchboard.message.v1`): the one schema every channel adapter fills.
//!
//! This is a wire type: it is what the HTTP ingest and the bus accept, what the store keeps, and what
//! events carry. [`InboundMessage::validate`] is the single check every intake path runs before a
//! message is stored, so a malformed message is refused with the field that is wrong.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::routing::{Channel, ConversationId, MessageId, NewConversation};

/// The schema name carried in `schema`.
pub const MESSAGE_SCHEMA: &str = "switchboard.message.v1";

/// Longest text or HTML body accepted (after the HTTP body limit, which is usually lower).
pub const MAX_BODY_CHARS: usize = 1 << 20;

/// A customer message as switchboard sees it, whatever channel it came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "switchboard.message.v1")]
pub struct InboundMessage {
    /// Always `switchboard.message.v1`; may be omitted on input.
    #[serde(default = "default_schema")]
    pub schema: String,
    /// Switchboard's own id (a ULID), assigned when the message is stored. Ignored on input.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<String>")]
    pub id: Option<ulid::Ulid>,
    /// `email`, `chat`, `sms`, `whatsapp`, `messenger`, `instagram`, `telegram`, `api`, or a custom name.
    pub channel: String,
    /// Who delivered it: `twilio`, `vonage`, `meta`, `telegram`, `smtp`, `webchat`, `api`...
    pub provider: String,
    /// The provider's id for this message. With `channel`, the deduplication key: a message sent
    /// again with the same pair is acknowledged and not stored twice.
    pub provider_message_id: String,
    /// How the provider threads: an email References root, an SMS number pair, a chat session, a
    /// social sender and page. Derived from channel and addresses when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thread_key: Option<String>,
    /// The customer's address on this channel (E.164 for phone channels, an email address...).
    pub from: Address,
    /// The address the customer wrote to (our number, mailbox or page).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<Address>,
    #[serde(default)]
    pub customer: CustomerHints,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    #[serde(default)]
    pub text: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub html: Option<String>,
    /// Metadata and a URL; never inline content.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attachments: Vec<Attachment>,
    /// When the provider received it; set to the time of intake when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub received_at: Option<DateTime<Utc>>,
    /// Provider extras, kept as they came.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, serde_json::Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Address {
    pub address: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// What the sender knows about the customer. All optional.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CustomerHints {
    /// The customer's id in the sender's system (CRM id): links every channel they use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// e.g. `vip`, `gold`: routing rules and priority use it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<String>,
    /// A BCP 47 tag such as `en` or `es-MX`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub language: Option<String>,
    /// Other identities of the same customer, e.g. `{ "kind": "email", "value": "ann@example.com" }`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub links: Vec<IdentityLink>,
}

/// One identity of a customer: `email`, `phone` (E.164), `customer` (an external id), or a social
/// channel name (`whatsapp`, `messenger`, `instagram`, `telegram`, `chat`) with that channel's id.
#[derive(
    Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
#[serde(deny_unknown_fields)]
pub struct IdentityLink {
    pub kind: String,
    pub value: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Attachment {
    /// Where the content can be fetched (http or https).
    pub url: String,
    pub content_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filename: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
}

/// Why a message was refused; names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct MessageError {
    pub field: &'static str,
    pub reason: String,
}

fn default_schema() -> String {
    MESSAGE_SCHEMA.to_owned()
}

fn invalid(field: &'static str, reason: impl Into<String>) -> MessageError {
    MessageError {
        field,
        reason: reason.into(),
    }
}

/// `+` then 7 to 15 digits, the first not 0 (ITU-T E.164).
pub fn is_e164(number: &str) -> bool {
    let Some(digits) = number.strip_prefix('+') else {
        return false;
    };
    (7..=15).contains(&digits.len())
        && digits.bytes().all(|b| b.is_ascii_digit())
        && !digits.starts_with('0')
}

/// Channels whose customer address is a phone number.
pub fn is_phone_channel(channel: &str) -> bool {
    matches!(channel, "sms" | "whatsapp" | "voice")
}

fn check_name(field: &'static str, value: &str) -> Result<(), MessageError> {
    let ok = (1..=32).contains(&value.len())
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(invalid(
            field,
            "must be 1–32 characters of a-z, 0-9, '_' or '-'",
        ))
    }
}

impl InboundMessage {
    /// A minimal valid message, for adapters to fill in.
    pub fn new(
        channel: &str,
        provider: &str,
        provider_message_id: &str,
        from: &str,
        text: &str,
    ) -> InboundMessage {
        InboundMessage {
            schema: default_schema(),
            id: None,
            channel: channel.to_owned(),
            provider: provider.to_owned(),
            provider_message_id: provider_message_id.to_owned(),
            thread_key: None,
            from: Address {
                address: from.to_owned(),
                name: None,
            },
            to: None,
            customer: CustomerHints::default(),
            subject: None,
            text: text.to_owned(),
            html: None,
            attachments: Vec::new(),
            received_at: None,
            metadata: BTreeMap::new(),
        }
    }

    /// Checks everything a stored message must satisfy.
    pub fn validate(&self) -> Result<(), MessageError> {
        if self.schema != MESSAGE_SCHEMA {
            return Err(invalid("schema", format!("must be {MESSAGE_SCHEMA}")));
        }
        check_name("channel", &self.channel)?;
        check_name("provider", &self.provider)?;
        if self.provider_message_id.is_empty() || self.provider_message_id.len() > 256 {
            return Err(invalid("provider_message_id", "must be 1–256 bytes"));
        }
        let from = self.from.address.trim();
        if from.is_empty() || from.len() > 320 {
            return Err(invalid("from.address", "must be 1–320 bytes"));
        }
        if is_phone_channel(&self.channel) && !is_e164(from) {
            return Err(invalid(
                "from.address",
                format!(
                    "must be an E.164 number like +14155550123 on channel {}",
                    self.channel
                ),
            ));
        }
        if self.channel == "email" && !from.contains('@') {
            return Err(invalid(
                "from.address",
                "must be an email address on channel email",
            ));
        }
        if self.text.trim().is_empty()
            && self
                .html
                .as_deref()
                .is_none_or(|html| html.trim().is_empty())
            && self.attachments.is_empty()
        {
            return Err(invalid(
                "text",
                "a message needs text, html or an attachment",
            ));
        }
        if self.text.len() > MAX_BODY_CHARS
            || self
                .html
                .as_ref()
                .is_some_and(|html| html.len() > MAX_BODY_CHARS)
        {
            return Err(invalid("text", "longer than 1 MiB"));
        }
        if self
            .thread_key
            .as_ref()
            .is_some_and(|key| key.is_empty() || key.len() > 512)
        {
            return Err(invalid("thread_key", "must be 1–512 bytes"));
        }
        for attachment in &self.attachments {
            if !(attachment.url.starts_with("https://") || attachment.url.starts_with("http://")) {
                return Err(invalid(
                    "attachments.url",
                    "must be an http(s) URL; content is never sent inline",
                ));
            }
        }
        for link in &self.customer.links {
            if link.kind.is_empty() || link.value.trim().is_empty() {
                return Err(invalid(
                    "customer.links",
                    "kind and value must not be empty",
                ));
            }
            if link.kind == "phone" && !is_e164(&link.value) {
                return Err(invalid("customer.links", "a phone link must be E.164"));
            }
        }
        Ok(())
    }

    /// The thread key given, or one derived from the channel and addresses.
    pub fn effective_thread_key(&self) -> String {
        if let Some(key) = &self.thread_key {
            return key.clone();
        }
        let to = self.to.as_ref().map_or("", |to| to.address.as_str());
        format!(
            "{}:{}:{}",
            self.channel,
            self.from.address.trim().to_lowercase(),
            to.trim().to_lowercase()
        )
    }

    /// Identities this message proves or claims for its sender, normalised for matching: the sender's
    /// address on its channel, the external customer id, and the links given.
    pub fn identities(&self) -> Vec<IdentityLink> {
        let from = self.from.address.trim();
        let own = match self.channel.as_str() {
            "email" => IdentityLink {
                kind: "email".into(),
                value: from.to_lowercase(),
            },
            channel if is_phone_channel(channel) => IdentityLink {
                kind: "phone".into(),
                value: from.to_owned(),
            },
            channel => IdentityLink {
                kind: channel.to_owned(),
                value: from.to_owned(),
            },
        };
        let mut identities = vec![own];
        if let Some(id) = &self.customer.id {
            identities.push(IdentityLink {
                kind: "customer".into(),
                value: id.trim().to_owned(),
            });
        }
        for link in &self.customer.links {
            let value = if link.kind == "email" {
                link.value.trim().to_lowercase()
            } else {
                link.value.trim().to_owned()
            };
            identities.push(IdentityLink {
                kind: link.kind.clone(),
                value,
            });
        }
        identities.sort();
        identities.dedup();
        identities
    }

    /// The routing facts of a conversation's first message.
    pub fn routing_facts(
        &self,
        conversation: ConversationId,
        message: MessageId,
    ) -> NewConversation {
        NewConversation {
            id: conversation,
            message,
            channel: Channel::parse(&self.channel),
            provider: self.provider.clone(),
            to_address: self
                .to
                .as_ref()
                .map(|to| to.address.clone())
                .unwrap_or_default(),
            customer_tier: self.customer.tier.clone(),
            language: self.customer.language.clone(),
            subject: self.subject.clone(),
            text: self.text.clone(),
        }
    }
}

/// The JSON Schema of [`InboundMessage`], as published in `schemas/message.v1.json`.
pub fn json_schema() -> serde_json::Value {
    serde_json::to_value(schemars::schema_for!(InboundMessage)).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn sms() -> InboundMessage {
        InboundMessage::new("sms", "twilio", "SM1", "+14155550123", "hello")
    }

    #[test]
    fn valid_messages_pass_and_each_bad_field_is_named() {
        assert_eq!(sms().validate(), Ok(()));
        type Breaker = Box<dyn Fn(&mut InboundMessage)>;
        let cases: Vec<(&str, Breaker)> = vec![
            ("schema", Box::new(|m| m.schema = "v0".into())),
            ("channel", Box::new(|m| m.channel = "SMS!".into())),
            (
                "provider_message_id",
                Box::new(|m| m.provider_message_id.clear()),
            ),
            ("from.address", Box::new(|m| m.from.address = "0155".into())),
            ("text", Box::new(|m| m.text = "  ".into())),
            (
                "attachments.url",
                Box::new(|m| {
                    m.attachments.push(Attachment {
                        url: "data:image/png;base64,AA".into(),
                        content_type: "image/png".into(),
                        filename: None,
                        size: None,
                    })
                }),
            ),
            (
                "customer.links",
                Box::new(|m| {
                    m.customer.links.push(IdentityLink {
                        kind: "phone".into(),
                        value: "555".into(),
                    })
                }),
            ),
        ];
        for (field, breaks) in cases {
            let mut message = sms();
            breaks(&mut message);
            assert_eq!(message.validate().map_err(|e| e.field), Err(field));
        }
    }

    #[test]
    fn unknown_fields_are_refused() {
        let json = r#"{"channel":"sms","provider":"twilio","provider_message_id":"1","from":{"address":"+14155550123"},"text":"x","colour":"red"}"#;
        let error = serde_json::from_str::<InboundMessage>(json)
            .unwrap_err()
            .to_string();
        assert!(error.contains("unknown field `colour`"), "{error}");
    }

    #[test]
    fn identities_are_normalised_and_deduplicated() {
        let mut message = InboundMessage::new("email", "smtp", "<a@b>", " Ann@Example.COM ", "hi");
        message.customer.id = Some("crm-7".into());
        message.customer.links.push(IdentityLink {
            kind: "email".into(),
            value: "ann@example.com".into(),
        });
        message.customer.links.push(IdentityLink {
            kind: "phone".into(),
            value: "+14155550123".into(),
        });
        let kinds: Vec<(String, String)> = message
            .identities()
            .into_iter()
            .map(|l| (l.kind, l.value))
            .collect();
        assert_eq!(
            kinds,
            vec![
                ("customer".into(), "crm-7".into()),
                ("email".into(), "ann@example.com".into()),
                ("phone".into(), "+14155550123".into())
            ]
        );
        assert_eq!(
            sms().identities()[0],
            IdentityLink {
                kind: "phone".into(),
                value: "+14155550123".into()
            }
        );
    }

    #[test]
    fn e164() {
        assert!(is_e164("+14155550123"));
        assert!(!is_e164("14155550123"));
        assert!(!is_e164("+0123456789"));
        assert!(!is_e164("+1415555012345678"));
    }

    /// Round trips of the wire schema: any valid message, serialised and read back, is the same
    /// message, still valid, and what it serialises to passes the published JSON Schema.
    mod round_trip {
        use super::*;
        use proptest::collection::{btree_map, vec};
        use proptest::option;
        use proptest::prelude::*;

        fn name() -> impl Strategy<Value = String> {
            "[a-z0-9_-]{1,32}"
        }

        fn e164() -> impl Strategy<Value = String> {
            "\\+[1-9][0-9]{6,14}"
        }

        /// Any text: control characters, quotes, backslashes, astral planes.
        fn text() -> impl Strategy<Value = String> {
            any::<String>()
        }

        fn address(phone: bool) -> impl Strategy<Value = Address> {
            let address = if phone {
                e164().boxed()
            } else {
                "[^\\s]{1,40}@[a-z0-9.-]{1,20}".boxed()
            };
            (address, option::of(text())).prop_map(|(address, name)| Address { address, name })
        }

        /// Any instant chrono can hold, to the nanosecond: providers' clocks and timestamps are
        /// theirs (a Telegram `date` is any i64 of seconds).
        fn instant() -> impl Strategy<Value = DateTime<Utc>> {
            let seconds =
                DateTime::<Utc>::MIN_UTC.timestamp()..=DateTime::<Utc>::MAX_UTC.timestamp();
            (seconds, 0..1_000_000_000u32)
                .prop_filter_map("within chrono's range", |(seconds, nanos)| {
                    DateTime::from_timestamp(seconds, nanos)
                })
        }

        /// Provider metadata: nested JSON of every kind, numbers at their extremes included.
        fn json() -> impl Strategy<Value = serde_json::Value> {
            let leaf = prop_oneof![
                Just(serde_json::Value::Null),
                any::<bool>().prop_map(serde_json::Value::from),
                any::<i64>().prop_map(serde_json::Value::from),
                any::<u64>().prop_map(serde_json::Value::from),
                any::<f64>()
                    .prop_filter("JSON has no NaN or infinities", |x| x.is_finite())
                    .prop_map(serde_json::Value::from),
                text().prop_map(serde_json::Value::from),
            ];
            leaf.prop_recursive(3, 24, 4, |inner| {
                prop_oneof![
                    vec(inner.clone(), 0..4).prop_map(serde_json::Value::Array),
                    btree_map(text(), inner, 0..4)
                        .prop_map(|map| serde_json::Value::Object(map.into_iter().collect())),
                ]
            })
        }

        fn attachment() -> impl Strategy<Value = Attachment> {
            (
                "https?://[a-z0-9.-]{1,20}/[^\\s]{0,40}",
                "[a-z]{1,10}/[a-z0-9.+-]{1,20}",
                option::of(text()),
                option::of(any::<u64>()),
            )
                .prop_map(|(url, content_type, filename, size)| Attachment {
                    url,
                    content_type,
                    filename,
                    size,
                })
        }

        fn link() -> impl Strategy<Value = IdentityLink> {
            prop_oneof![
                e164().prop_map(|value| IdentityLink {
                    kind: "phone".into(),
                    value,
                }),
                (
                    name().prop_filter("phone links are E.164", |kind| kind != "phone"),
                    "[^\\s]{1,40}"
                )
                    .prop_map(|(kind, value)| IdentityLink { kind, value }),
            ]
        }

        fn customer() -> impl Strategy<Value = CustomerHints> {
            (
                option::of(text()),
                option::of(text()),
                option::of(text()),
                option::of("[a-z]{2}(-[A-Z]{2})?"),
                vec(link(), 0..3),
            )
                .prop_map(|(id, name, tier, language, links)| CustomerHints {
                    id,
                    name,
                    tier,
                    language,
                    links,
                })
        }

        prop_compose! {
            fn valid_message()(
                phone in any::<bool>(),
                channel in name().prop_filter("phone channels take E.164", |c| !is_phone_channel(c)),
            )(
                channel in Just(if phone { "sms".to_owned() } else { channel }),
                provider in name(),
                provider_message_id in "[^\\x00]{1,64}",
                thread_key in option::of("[^\\x00]{1,64}"),
                from in address(phone),
                to in option::of(address(false)),
                customer in customer(),
                subject in option::of(text()),
                text in "[^\\s]\\PC{0,80}",
                html in option::of(text()),
                attachments in vec(attachment(), 0..3),
                received_at in option::of(instant()),
                metadata in btree_map(text(), json(), 0..4),
                id in option::of(any::<u128>().prop_map(ulid::Ulid)),
            ) -> InboundMessage {
                InboundMessage {
                    schema: MESSAGE_SCHEMA.into(),
                    id,
                    channel,
                    provider,
                    provider_message_id,
                    thread_key,
                    from,
                    to,
                    customer,
                    subject,
                    text,
                    html,
                    attachments,
                    received_at,
                    metadata,
                }
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            #[test]
            fn any_valid_message_reads_back_as_itself(message in valid_message()) {
                prop_assert_eq!(message.validate(), Ok(()));

                let text = serde_json::to_string(&message).unwrap();
                let read: InboundMessage = serde_json::from_str(&text).unwrap();
                prop_assert_eq!(&read, &message);
                prop_assert_eq!(read.validate(), Ok(()));

                // The store and the bus carry it as a JSON value; events pretty-print it.
                let value = serde_json::to_value(&message).unwrap();
                let from_value: InboundMessage = serde_json::from_value(value.clone()).unwrap();
                prop_assert_eq!(&from_value, &message);
                let pretty = serde_json::to_string_pretty(&message).unwrap();
                prop_assert_eq!(serde_json::from_str::<InboundMessage>(&pretty).unwrap(), message);

                let schema = json_schema();
                let validator = jsonschema::validator_for(&schema).unwrap();
                prop_assert!(validator.is_valid(&value), "{}", value);
            }
        }
    }
}
