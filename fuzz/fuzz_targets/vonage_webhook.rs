//! Vonage Messages API webhooks (JSON bodies with a signed JWT) through `Vonage::receive`.
//!
//! The first byte picks the mode: even signs the rest as Vonage does, so the parser behind the
//! JWT check is reached (with bit 1 set, the next 8 bytes are the token's `iat`, so the age check
//! sees any clock); odd sends the first line as the bearer token unchanged, so the JWT reader
//! itself sees hostile tokens.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use switchboard::channels::vonage::{Vonage, sign};
use switchboard::config::Secret;
use switchboard::config::channels::VonageAccount;
use switchboard_fuzz::{deliver, header_line_and_body};

const SIGNATURE_SECRET: &str = "signature-secret";
const API_KEY: &str = "abcd1234";

static VONAGE: LazyLock<Vonage> = LazyLock::new(|| {
    Vonage::new(VonageAccount {
        name: "main".into(),
        api_key: API_KEY.into(),
        api_secret: Secret::new("api-secret"),
        signature_secret: Secret::new(SIGNATURE_SECRET),
        numbers: vec!["+447700900000".into()],
        api_url: "http://127.0.0.1:9".into(),
        max_age_seconds: 300,
        max_per_second: 10,
    })
});

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let now = chrono::Utc::now();
    let (token, body) = if mode % 2 == 0 {
        let (iat, body) = match rest.split_first_chunk::<8>() {
            Some((iat, body)) if mode & 2 != 0 => (i64::from_le_bytes(*iat), body),
            _ => (now.timestamp(), rest),
        };
        let token = sign(SIGNATURE_SECRET, API_KEY, iat, body);
        (token.into_bytes(), body)
    } else {
        let (token, body) = header_line_and_body(rest);
        (token.to_vec(), body)
    };
    let mut bearer = b"Bearer ".to_vec();
    bearer.extend_from_slice(&token);
    deliver(&*VONAGE, "authorization", &bearer, body, now);
});
