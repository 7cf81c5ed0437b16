//! Meta Graph API webhooks (WhatsApp, Messenger, Instagram; JSON bodies signed with
//! `X-Hub-Signature-256`) through `Meta::receive`, and the subscription handshake.
//!
//! The first byte picks the mode: 0 mod 3 signs the rest as Meta does, so the parser behind the
//! signature check is reached; 1 sends the first line as the signature header unchanged; 2 reads
//! the rest as the handshake's query string.
#![no_main]

use std::sync::{Arc, LazyLock};

use libfuzzer_sys::fuzz_target;
use switchboard::channels::Webhook;
use switchboard::channels::meta::{Meta, signature};
use switchboard::config::Secret;
use switchboard::config::channels::MetaAccount;
use switchboard::store::sqlite::{SqliteOptions, SqliteStore};
use switchboard_fuzz::{deliver, header_line_and_body};

const APP_SECRET: &str = "app-secret";

static META: LazyLock<Option<Meta>> = LazyLock::new(|| {
    // The adapter holds a store for its outbound window rule; receiving never touches it.
    let dir = std::env::temp_dir().join(format!("switchboard-fuzz-meta-{}", std::process::id()));
    std::fs::create_dir_all(&dir).ok()?;
    let store = SqliteStore::open(&dir.join("store.sqlite"), SqliteOptions::default()).ok()?;
    Some(Meta::new(
        MetaAccount {
            name: "main".into(),
            app_secret: Secret::new(APP_SECRET),
            verify_token: Secret::new("verify-me"),
            access_token: Secret::new("token"),
            graph_base: "https://graph.facebook.com/v21.0".into(),
            whatsapp_phone_number_ids: vec!["106540352242922".into()],
            messenger_page_ids: vec!["1234567890".into()],
            instagram_account_ids: vec!["17841400000000000".into()],
            whatsapp_template: None,
            max_per_second: 10,
        },
        Arc::new(store),
    ))
});

fuzz_target!(|data: &[u8]| {
    let Some(meta) = META.as_ref() else {
        return;
    };
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode % 3 == 2 {
        let _ = meta.handshake(std::str::from_utf8(rest).ok());
        return;
    }
    let (header, body) = if mode % 3 == 0 {
        (signature(APP_SECRET, rest).into_bytes(), rest)
    } else {
        let (header, body) = header_line_and_body(rest);
        (header.to_vec(), body)
    };
    deliver(
        meta,
        "x-hub-signature-256",
        &header,
        body,
        chrono::Utc::now(),
    );
});
