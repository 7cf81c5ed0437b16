//! Twilio SMS/MMS and Twilio WhatsApp: form-encoded webhooks signed with `X-Twilio-Signature`, replies
//! through the Messages REST API, status callbacks to the same URL.
//!
//! Signature (Twilio's webhook security): base64 of HMAC-SHA1, keyed with the auth token, over the
//! full public URL followed by every POST parameter name and value, sorted by name. The URL is the
//! one configured at Twilio (`public_url`), since the daemon sits behind a proxy.

use std::collections::BTreeMap;

use async_trait::async_trait;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha1::Sha1;

use super::{
    AccountSender, DeliveryState, Inbound, RateLimit, StatusUpdate, Webhook, WebhookAnswer,
    WebhookError, WebhookRequest, call, e164, http_client,
};
use crate::config::channels::TwilioAccount;
use crate::daemon::outbound::{ChannelSender, SendError};
use crate::message::{Address, Attachment, InboundMessage};
use crate::store::StoredMessage;

const WHATSAPP_PREFIX: &str = "whatsapp:";

/// One Twilio account.
#[derive(Debug)]
pub struct Twilio {
    account: TwilioAccount,
    client: reqwest::Client,
    limit: RateLimit,
}

impl Twilio {
    pub fn new(account: TwilioAccount) -> Twilio {
        Twilio {
            limit: RateLimit::per_second(account.max_per_second),
            client: http_client(),
            account,
        }
    }
}

/// HMAC-SHA1 over the URL and the sorted form parameters, keyed with the auth token.
fn signing_mac(auth_token: &str, url: &str, params: &[(String, String)]) -> Option<Hmac<Sha1>> {
    let mut sorted: Vec<&(String, String)> = params.iter().collect();
    sorted.sort();
    let mut mac = Hmac::<Sha1>::new_from_slice(auth_token.as_bytes()).ok()?;
    mac.update(url.as_bytes());
    for (name, value) in sorted {
        mac.update(name.as_bytes());
        mac.update(value.as_bytes());
    }
    Some(mac)
}

/// `X-Twilio-Signature` for `url` and the form `params` (what Twilio sends; tests sign with it).
pub fn signature(auth_token: &str, url: &str, params: &[(String, String)]) -> String {
    signing_mac(auth_token, url, params)
        .map(|mac| base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes()))
        .unwrap_or_default()
}

fn verify(
    auth_token: &crate::config::Secret,
    url: &str,
    params: &[(String, String)],
    given: &str,
) -> bool {
    let Ok(given) = base64::engine::general_purpose::STANDARD.decode(given.trim()) else {
        return false;
    };
    // Constant time: a signature cannot be guessed byte by byte.
    signing_mac(auth_token.expose(), url, params)
        .is_some_and(|mac| mac.verify_slice(&given).is_ok())
}

/// `whatsapp:+1415…` → (`whatsapp`, `+1415…`); `+1415…` → (`sms`, `+1415…`).
fn channel_and_number(raw: &str) -> Result<(&'static str, String), WebhookError> {
    match raw.strip_prefix(WHATSAPP_PREFIX) {
        Some(number) => Ok(("whatsapp", e164(number)?)),
        None => Ok(("sms", e164(raw)?)),
    }
}

fn required<'a>(form: &BTreeMap<&'a str, &'a str>, name: &str) -> Result<&'a str, WebhookError> {
    form.get(name)
        .copied()
        .filter(|value| !value.is_empty())
        .ok_or_else(|| WebhookError::Malformed(format!("{name} is missing")))
}

fn status_of(value: &str) -> Option<DeliveryState> {
    match value {
        // `queued`, `accepted`, `sending`, `scheduled`: still on the way; nothing to record.
        "sent" => Some(DeliveryState::Sent),
        "delivered" | "read" => Some(DeliveryState::Delivered),
        "undelivered" | "failed" | "canceled" => Some(DeliveryState::Failed),
        _ => None,
    }
}

impl Webhook for Twilio {
    fn receive(&self, request: &WebhookRequest<'_>) -> Result<Vec<Inbound>, WebhookError> {
        let given = request
            .headers
            .get("x-twilio-signature")
            .and_then(|value| value.to_str().ok())
            .ok_or_else(|| WebhookError::Unauthenticated("X-Twilio-Signature is missing".into()))?;
        let params: Vec<(String, String)> = serde_urlencoded::from_bytes(request.body)
            .map_err(|error| WebhookError::Malformed(format!("not a form body: {error}")))?;
        if !verify(
            &self.account.auth_token,
            &self.account.public_url,
            &params,
            given,
        ) {
            return Err(WebhookError::Forbidden(
                "X-Twilio-Signature does not match (check channels.twilio public_url and auth_token)"
                    .into(),
            ));
        }
        let form: BTreeMap<&str, &str> = params
            .iter()
            .map(|(name, value)| (name.as_str(), value.as_str()))
            .collect();
        let field = |name: &str| required(&form, name);
        if form
            .get("AccountSid")
            .is_some_and(|sid| *sid != self.account.account_sid)
        {
            return Err(WebhookError::Forbidden(
                "AccountSid is not this account's".into(),
            ));
        }
        let sid = field("MessageSid").or_else(|_| field("SmsSid"))?;
        let (channel, from) = channel_and_number(field("From")?)?;
        if let Some(status) = form.get("MessageStatus") {
            let Some(state) = status_of(status) else {
                return Ok(Vec::new());
            };
            let error = form
                .get("ErrorCode")
                .filter(|code| !code.is_empty())
                .map(|code| {
                    let message = form.get("ErrorMessage").copied().unwrap_or_default();
                    format!("twilio error {code} ({status}) {message}")
                        .trim()
                        .to_owned()
                });
            return Ok(vec![Inbound::Status(StatusUpdate {
                channel: channel.into(),
                provider_message_id: sid.to_owned(),
                state,
                error: error.or_else(|| {
                    (state == DeliveryState::Failed).then(|| format!("twilio: {status}"))
                }),
            })]);
        }
        let (_, to) = channel_and_number(field("To")?)?;
        let mut message = InboundMessage::new(
            channel,
            "twilio",
            sid,
            &from,
            form.get("Body").copied().unwrap_or_default(),
        );
        message.to = Some(Address {
            address: to,
            name: None,
        });
        message.from.name = form.get("ProfileName").map(|name| (*name).to_owned());
        let media: usize = form
            .get("NumMedia")
            .and_then(|count| count.parse().ok())
            .unwrap_or(0);
        for index in 0..media.min(10) {
            if let Some(url) = form.get(format!("MediaUrl{index}").as_str()) {
                message.attachments.push(Attachment {
                    url: (*url).to_owned(),
                    content_type: form
                        .get(format!("MediaContentType{index}").as_str())
                        .copied()
                        .unwrap_or("application/octet-stream")
                        .to_owned(),
                    filename: None,
                    size: None,
                });
            }
        }
        for extra in [
            "FromCity",
            "FromState",
            "FromCountry",
            "MessagingServiceSid",
            "WaId",
        ] {
            if let Some(value) = form.get(extra) {
                message
                    .metadata
                    .insert(extra.to_owned(), Value::String((*value).to_owned()));
            }
        }
        Ok(vec![Inbound::Message(Box::new(message))])
    }

    fn answer(&self) -> WebhookAnswer {
        WebhookAnswer::EmptyTwiml
    }
}

#[async_trait]
impl ChannelSender for Twilio {
    async fn send(&self, reply: &StoredMessage) -> Result<Option<String>, SendError> {
        let text = reply.body["text"].as_str().unwrap_or_default();
        let prefix = if reply.channel == "whatsapp" {
            WHATSAPP_PREFIX
        } else {
            ""
        };
        let form = [
            ("To", format!("{prefix}{}", reply.to_address)),
            ("From", format!("{prefix}{}", reply.from_address)),
            ("Body", text.to_owned()),
            ("StatusCallback", self.account.public_url.clone()),
        ];
        self.limit.acquire().await;
        let url = format!(
            "{}/2010-04-01/Accounts/{}/Messages.json",
            self.account.api_url, self.account.account_sid
        );
        let request = self
            .client
            .post(url)
            .basic_auth(
                &self.account.account_sid,
                Some(self.account.auth_token.expose()),
            )
            .form(&form);
        let answer = call("twilio", request)
            .await
            .map_err(|failure| failure.error)?;
        Ok(answer["sid"].as_str().map(str::to_owned))
    }
}

impl AccountSender for Twilio {
    fn provider(&self) -> &'static str {
        "twilio"
    }

    fn serves(&self, _channel: &str, our_address: &str) -> bool {
        self.account
            .numbers
            .iter()
            .any(|number| number == our_address)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::config::Secret;
    use axum::http::HeaderMap;

    fn account() -> TwilioAccount {
        TwilioAccount {
            name: "main".into(),
            account_sid: "ACXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX".into(),
            auth_token: Secret::new("12345"),
            public_url: "https://sb.example.com/v1/webhooks/twilio/main".into(),
            numbers: vec!["+14155550100".into()],
            api_url: "http://127.0.0.1:9".into(),
            max_per_second: 10,
        }
    }

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn request<'a>(headers: &'a HeaderMap, body: &'a [u8]) -> WebhookRequest<'a> {
        WebhookRequest {
            query: None,
            headers,
            body,
            now: chrono::Utc::now(),
        }
    }

    fn signed(signature: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("x-twilio-signature", signature.parse().unwrap());
        headers
    }

    /// Twilio's documented example (webhook security page), checked against Twilio's own Python
    /// library: `RequestValidator("12345").compute_signature(url, params)` gives this value.
    #[test]
    fn twilios_documented_example_verifies() {
        let url = "https://mycompany.com/myapp.php?foo=1&bar=2";
        let params = pairs(&[
            ("CallSid", "CA1234567890ABCDE"),
            ("Caller", "+12349013030"),
            ("Digits", "1234"),
            ("From", "+12349013030"),
            ("To", "+18005551212"),
        ]);
        assert_eq!(
            signature("12345", url, &params),
            "0/KCTR6DLpKmkAf8muzZqo1nDgQ="
        );
        assert!(verify(
            &Secret::new("12345"),
            url,
            &params,
            "0/KCTR6DLpKmkAf8muzZqo1nDgQ="
        ));
        assert!(!verify(
            &Secret::new("54321"),
            url,
            &params,
            "0/KCTR6DLpKmkAf8muzZqo1nDgQ="
        ));
    }

    /// An inbound MMS shaped like Twilio's documented webhook; the signature was made by
    /// `twilio.request_validator.RequestValidator("12345")` (twilio 9.x) for this URL and body.
    const INBOUND: &str = "ToCountry=US&ToState=CA&SmsMessageSid=SM1f0e8ae6ade43cb3c0ce4525424e404f&NumMedia=1&ToCity=SAN+FRANCISCO&FromZip=94105&SmsSid=SM1f0e8ae6ade43cb3c0ce4525424e404f&FromState=CA&SmsStatus=received&FromCity=SAN+FRANCISCO&Body=Hello%2C+my+order+has+not+arrived&FromCountry=US&To=%2B14155550100&MessagingServiceSid=&ToZip=94105&NumSegments=1&MessageSid=SM1f0e8ae6ade43cb3c0ce4525424e404f&AccountSid=ACXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX&From=%2B14155550123&ApiVersion=2010-04-01&MediaUrl0=https%3A%2F%2Fapi.twilio.com%2F2010-04-01%2FAccounts%2FACXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX%2FMessages%2FMM1%2FMedia%2FME1&MediaContentType0=image%2Fjpeg";
    const INBOUND_SIGNATURE: &str = "0JFoPoz6j9jXiih7Iuhtqykqto4=";

    #[test]
    fn inbound_mms_is_normalised() {
        let twilio = Twilio::new(account());
        let headers = signed(INBOUND_SIGNATURE);
        let items = twilio
            .receive(&request(&headers, INBOUND.as_bytes()))
            .unwrap();
        let [Inbound::Message(message)] = items.as_slice() else {
            panic!("{items:?}");
        };
        assert_eq!(message.channel, "sms");
        assert_eq!(
            message.provider_message_id,
            "SM1f0e8ae6ade43cb3c0ce4525424e404f"
        );
        assert_eq!(message.from.address, "+14155550123");
        assert_eq!(message.to.as_ref().unwrap().address, "+14155550100");
        assert_eq!(message.text, "Hello, my order has not arrived");
        assert_eq!(message.attachments[0].content_type, "image/jpeg");
        assert_eq!(message.validate(), Ok(()));
    }

    #[test]
    fn bad_or_missing_signatures_are_refused() {
        let twilio = Twilio::new(account());
        let none = HeaderMap::new();
        assert!(matches!(
            twilio.receive(&request(&none, INBOUND.as_bytes())),
            Err(WebhookError::Unauthenticated(_))
        ));
        let wrong = signed("0/KCTR6DLpKmkAf8muzZqo1nDgQ=");
        assert!(matches!(
            twilio.receive(&request(&wrong, INBOUND.as_bytes())),
            Err(WebhookError::Forbidden(_))
        ));
        let tampered = INBOUND.replace("arrived", "arrived!");
        let headers = signed(INBOUND_SIGNATURE);
        assert!(matches!(
            twilio.receive(&request(&headers, tampered.as_bytes())),
            Err(WebhookError::Forbidden(_))
        ));
    }

    #[test]
    fn whatsapp_and_status_callbacks() {
        let twilio = Twilio::new(account());
        let url = &account().public_url;
        let whatsapp = pairs(&[
            ("MessageSid", "SMwa1"),
            ("AccountSid", "ACXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX"),
            ("From", "whatsapp:+14155550123"),
            ("To", "whatsapp:+14155550100"),
            ("Body", "hi"),
            ("ProfileName", "Ann"),
            ("NumMedia", "0"),
        ]);
        let body = serde_urlencoded::to_string(&whatsapp).unwrap();
        let headers = signed(&signature("12345", url, &whatsapp));
        let items = twilio.receive(&request(&headers, body.as_bytes())).unwrap();
        let [Inbound::Message(message)] = items.as_slice() else {
            panic!("{items:?}");
        };
        assert_eq!(
            (message.channel.as_str(), message.from.address.as_str()),
            ("whatsapp", "+14155550123")
        );
        assert_eq!(message.from.name.as_deref(), Some("Ann"));

        let failed = pairs(&[
            ("MessageSid", "SMout1"),
            ("MessageStatus", "undelivered"),
            ("ErrorCode", "30003"),
            ("From", "+14155550100"),
            ("To", "+14155550123"),
        ]);
        let body = serde_urlencoded::to_string(&failed).unwrap();
        let headers = signed(&signature("12345", url, &failed));
        let items = twilio.receive(&request(&headers, body.as_bytes())).unwrap();
        assert_eq!(
            items,
            vec![Inbound::Status(StatusUpdate {
                channel: "sms".into(),
                provider_message_id: "SMout1".into(),
                state: DeliveryState::Failed,
                error: Some("twilio error 30003 (undelivered)".into()),
            })]
        );
    }
}
