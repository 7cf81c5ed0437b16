//! The `[channels.<provider>.<account>]` sections: one table per provider account (a Twilio account,
//! a Vonage application, a Meta app, a Telegram bot), parsed once into validated settings.
//!
//! Secrets (auth tokens, app secrets, bot tokens) come from the environment, e.g.
//! `SWITCHBOARD__CHANNELS__TWILIO__MAIN__AUTH_TOKEN`, and are [`Secret`]s: never printed. A missing
//! secret or address names the key to set, so an incomplete account is refused at start.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{ConfigLoadError, Secret, invalid};
use crate::message::is_e164;

/// Every provider's accounts, by account name (the `{account}` in `/v1/webhooks/{provider}/{account}`).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ChannelsSection {
    pub twilio: BTreeMap<String, TwilioSection>,
    pub vonage: BTreeMap<String, VonageSection>,
    pub meta: BTreeMap<String, MetaSection>,
    pub telegram: BTreeMap<String, TelegramSection>,
    /// The email channel (one set of mailboxes per deployment).
    pub email: Option<super::email::EmailSection>,
}

/// Twilio SMS/MMS and WhatsApp (through Twilio) on one Twilio account.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TwilioSection {
    pub account_sid: String,
    pub auth_token: Option<Secret>,
    /// The webhook URL exactly as configured at Twilio (Twilio signs it): the daemon sits behind a
    /// proxy, so it cannot know it. Also sent as the `StatusCallback` of replies.
    pub public_url: Option<String>,
    /// Our numbers (E.164) on this account, SMS and WhatsApp senders alike.
    #[serde(default)]
    pub numbers: Vec<String>,
    #[serde(default = "twilio_api")]
    pub api_url: String,
    #[serde(default = "default_rate")]
    pub max_per_second: u32,
}

/// Vonage Messages API (SMS, MMS, WhatsApp) on one Vonage application.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VonageSection {
    pub api_key: String,
    /// Sends authenticate with HTTP Basic `api_key:api_secret`.
    pub api_secret: Option<Secret>,
    /// Signs the inbound and status webhooks' JWT (HS256).
    pub signature_secret: Option<Secret>,
    #[serde(default)]
    pub numbers: Vec<String>,
    #[serde(default = "vonage_api")]
    pub api_url: String,
    /// A webhook JWT older than this (its `iat`) is refused.
    #[serde(default = "default_max_age")]
    pub max_age_seconds: u64,
    #[serde(default = "default_rate")]
    pub max_per_second: u32,
}

/// One Meta app: WhatsApp Cloud API numbers, Messenger pages and Instagram accounts.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MetaSection {
    /// Signs every POST (`X-Hub-Signature-256`).
    pub app_secret: Option<Secret>,
    /// Answers the `hub.challenge` handshake when it matches `hub.verify_token`.
    pub verify_token: Option<Secret>,
    /// The Graph API token used to send (a system user or page token).
    pub access_token: Option<Secret>,
    #[serde(default = "graph_api")]
    pub graph_url: String,
    #[serde(default = "graph_version")]
    pub api_version: String,
    /// WhatsApp Cloud API phone number ids (a message's `to`).
    #[serde(default)]
    pub whatsapp_phone_number_ids: Vec<String>,
    /// Messenger page ids.
    #[serde(default)]
    pub messenger_page_ids: Vec<String>,
    /// Instagram professional account ids.
    #[serde(default)]
    pub instagram_account_ids: Vec<String>,
    /// The approved template sent on WhatsApp outside the 24-hour window; without one such a reply
    /// fails with a reason the agent sees. The reply text fills its body's `{{1}}` when
    /// `whatsapp_template_text_parameter` is true.
    #[serde(default)]
    pub whatsapp_template: Option<String>,
    #[serde(default = "template_language")]
    pub whatsapp_template_language: String,
    #[serde(default)]
    pub whatsapp_template_text_parameter: bool,
    #[serde(default = "default_rate")]
    pub max_per_second: u32,
}

/// One Telegram bot.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TelegramSection {
    pub bot_token: Option<Secret>,
    /// The `secret_token` given to `setWebhook`; Telegram sends it in
    /// `X-Telegram-Bot-Api-Secret-Token`.
    pub secret_token: Option<Secret>,
    #[serde(default = "telegram_api")]
    pub api_url: String,
    #[serde(default = "default_rate")]
    pub max_per_second: u32,
}

fn twilio_api() -> String {
    "https://api.twilio.com".into()
}
fn vonage_api() -> String {
    "https://api.nexmo.com".into()
}
fn graph_api() -> String {
    "https://graph.facebook.com".into()
}
fn graph_version() -> String {
    "v21.0".into()
}
fn template_language() -> String {
    "en_US".into()
}
fn telegram_api() -> String {
    "https://api.telegram.org".into()
}
fn default_rate() -> u32 {
    10
}
fn default_max_age() -> u64 {
    300
}

/// A validated Twilio account.
#[derive(Debug, Clone)]
pub struct TwilioAccount {
    pub name: String,
    pub account_sid: String,
    pub auth_token: Secret,
    pub public_url: String,
    pub numbers: Vec<String>,
    pub api_url: String,
    pub max_per_second: u32,
}

#[derive(Debug, Clone)]
pub struct VonageAccount {
    pub name: String,
    pub api_key: String,
    pub api_secret: Secret,
    pub signature_secret: Secret,
    pub numbers: Vec<String>,
    pub api_url: String,
    pub max_age_seconds: u64,
    pub max_per_second: u32,
}

#[derive(Debug, Clone)]
pub struct WhatsappTemplate {
    pub name: String,
    pub language: String,
    pub text_parameter: bool,
}

#[derive(Debug, Clone)]
pub struct MetaAccount {
    pub name: String,
    pub app_secret: Secret,
    pub verify_token: Secret,
    pub access_token: Secret,
    /// `graph_url/api_version`, no trailing slash.
    pub graph_base: String,
    pub whatsapp_phone_number_ids: Vec<String>,
    pub messenger_page_ids: Vec<String>,
    pub instagram_account_ids: Vec<String>,
    pub whatsapp_template: Option<WhatsappTemplate>,
    pub max_per_second: u32,
}

#[derive(Debug, Clone)]
pub struct TelegramAccount {
    pub name: String,
    pub bot_token: Secret,
    /// The bot's own id: the part of its token before `:` (our address on Telegram).
    pub bot_id: String,
    pub secret_token: Secret,
    pub api_url: String,
    pub max_per_second: u32,
}

/// Every configured account, validated.
#[derive(Debug, Clone, Default)]
pub struct ChannelSettings {
    pub twilio: Vec<TwilioAccount>,
    pub vonage: Vec<VonageAccount>,
    pub meta: Vec<MetaAccount>,
    pub telegram: Vec<TelegramAccount>,
    pub email: Option<super::email::EmailSettings>,
}

fn required(
    place: &str,
    key: &str,
    value: Option<&Secret>,
    env: &str,
) -> Result<Secret, ConfigLoadError> {
    match value {
        Some(secret) if !secret.expose().is_empty() => Ok(secret.clone()),
        _ => Err(invalid(
            &format!("{place}.{key}"),
            format!(
                "required (set it from the environment: {env}__{})",
                key.to_uppercase()
            ),
        )),
    }
}

fn check_url(place: &str, url: &str) -> Result<String, ConfigLoadError> {
    if url.starts_with("https://") || url.starts_with("http://") {
        Ok(url.trim_end_matches('/').to_owned())
    } else {
        Err(invalid(place, format!("`{url}` must be an http(s) URL")))
    }
}

fn check_numbers(place: &str, numbers: &[String]) -> Result<(), ConfigLoadError> {
    if let Some(bad) = numbers.iter().find(|number| !is_e164(number)) {
        return Err(invalid(
            &format!("{place}.numbers"),
            format!("`{bad}` must be E.164, like +14155550123"),
        ));
    }
    Ok(())
}

fn check_account_name(place: &str, name: &str) -> Result<(), ConfigLoadError> {
    let fine = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if fine {
        Ok(())
    } else {
        Err(invalid(
            place,
            "account names are lower-case letters, digits, - or _ (they appear in the webhook URL)",
        ))
    }
}

fn check_rate(place: &str, rate: u32) -> Result<(), ConfigLoadError> {
    if rate == 0 {
        return Err(invalid(
            &format!("{place}.max_per_second"),
            "must be at least 1",
        ));
    }
    Ok(())
}

/// Validates every account; the first problem is named with its key.
pub fn validate(section: &ChannelsSection) -> Result<ChannelSettings, ConfigLoadError> {
    let mut settings = ChannelSettings::default();
    for (name, twilio) in &section.twilio {
        let place = format!("channels.twilio.{name}");
        let env = format!("SWITCHBOARD__CHANNELS__TWILIO__{}", name.to_uppercase());
        check_account_name(&place, name)?;
        if !twilio.account_sid.starts_with("AC") {
            return Err(invalid(
                &format!("{place}.account_sid"),
                "must be a Twilio account SID (AC…)",
            ));
        }
        let public_url = twilio.public_url.as_deref().ok_or_else(|| {
            invalid(
                &format!("{place}.public_url"),
                "required: the webhook URL exactly as configured at Twilio (Twilio signs it)",
            )
        })?;
        check_numbers(&place, &twilio.numbers)?;
        check_rate(&place, twilio.max_per_second)?;
        settings.twilio.push(TwilioAccount {
            name: name.clone(),
            account_sid: twilio.account_sid.clone(),
            auth_token: required(&place, "auth_token", twilio.auth_token.as_ref(), &env)?,
            public_url: check_url(&format!("{place}.public_url"), public_url)?,
            numbers: twilio.numbers.clone(),
            api_url: check_url(&format!("{place}.api_url"), &twilio.api_url)?,
            max_per_second: twilio.max_per_second,
        });
    }
    for (name, vonage) in &section.vonage {
        let place = format!("channels.vonage.{name}");
        let env = format!("SWITCHBOARD__CHANNELS__VONAGE__{}", name.to_uppercase());
        check_account_name(&place, name)?;
        if vonage.api_key.is_empty() {
            return Err(invalid(&format!("{place}.api_key"), "required"));
        }
        check_numbers(&place, &vonage.numbers)?;
        check_rate(&place, vonage.max_per_second)?;
        settings.vonage.push(VonageAccount {
            name: name.clone(),
            api_key: vonage.api_key.clone(),
            api_secret: required(&place, "api_secret", vonage.api_secret.as_ref(), &env)?,
            signature_secret: required(
                &place,
                "signature_secret",
                vonage.signature_secret.as_ref(),
                &env,
            )?,
            numbers: vonage.numbers.clone(),
            api_url: check_url(&format!("{place}.api_url"), &vonage.api_url)?,
            max_age_seconds: vonage.max_age_seconds.max(1),
            max_per_second: vonage.max_per_second,
        });
    }
    for (name, meta) in &section.meta {
        let place = format!("channels.meta.{name}");
        let env = format!("SWITCHBOARD__CHANNELS__META__{}", name.to_uppercase());
        check_account_name(&place, name)?;
        if meta.whatsapp_phone_number_ids.is_empty()
            && meta.messenger_page_ids.is_empty()
            && meta.instagram_account_ids.is_empty()
        {
            return Err(invalid(
                &place,
                "name at least one of whatsapp_phone_number_ids, messenger_page_ids, instagram_account_ids",
            ));
        }
        check_rate(&place, meta.max_per_second)?;
        let graph = check_url(&format!("{place}.graph_url"), &meta.graph_url)?;
        settings.meta.push(MetaAccount {
            name: name.clone(),
            app_secret: required(&place, "app_secret", meta.app_secret.as_ref(), &env)?,
            verify_token: required(&place, "verify_token", meta.verify_token.as_ref(), &env)?,
            access_token: required(&place, "access_token", meta.access_token.as_ref(), &env)?,
            graph_base: format!("{graph}/{}", meta.api_version.trim_matches('/')),
            whatsapp_phone_number_ids: meta.whatsapp_phone_number_ids.clone(),
            messenger_page_ids: meta.messenger_page_ids.clone(),
            instagram_account_ids: meta.instagram_account_ids.clone(),
            whatsapp_template: meta.whatsapp_template.clone().map(|name| WhatsappTemplate {
                name,
                language: meta.whatsapp_template_language.clone(),
                text_parameter: meta.whatsapp_template_text_parameter,
            }),
            max_per_second: meta.max_per_second,
        });
    }
    for (name, telegram) in &section.telegram {
        let place = format!("channels.telegram.{name}");
        let env = format!("SWITCHBOARD__CHANNELS__TELEGRAM__{}", name.to_uppercase());
        check_account_name(&place, name)?;
        check_rate(&place, telegram.max_per_second)?;
        let bot_token = required(&place, "bot_token", telegram.bot_token.as_ref(), &env)?;
        let bot_id = bot_token
            .expose()
            .split_once(':')
            .map(|(id, _)| id.to_owned())
            .filter(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()))
            .ok_or_else(|| {
                invalid(
                    &format!("{place}.bot_token"),
                    "is not a bot token (<bot id>:<secret>, as BotFather gives it)",
                )
            })?;
        settings.telegram.push(TelegramAccount {
            name: name.clone(),
            bot_token,
            bot_id,
            secret_token: required(&place, "secret_token", telegram.secret_token.as_ref(), &env)?,
            api_url: check_url(&format!("{place}.api_url"), &telegram.api_url)?,
            max_per_second: telegram.max_per_second,
        });
    }
    settings.email = section
        .email
        .as_ref()
        .map(super::email::validate)
        .transpose()?;
    Ok(settings)
}
