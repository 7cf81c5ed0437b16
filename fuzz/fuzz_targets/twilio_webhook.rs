//! Twilio webhooks (form bodies signed with `X-Twilio-Signature`) through `Twilio::receive`.
//!
//! The first byte picks the mode: even signs the rest as Twilio does, so the parser behind the
//! signature check is reached; odd sends the first line as the signature header unchanged, so
//! the check itself sees hostile headers.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use switchboard::channels::twilio::{Twilio, signature};
use switchboard::config::Secret;
use switchboard::config::channels::TwilioAccount;
use switchboard_fuzz::{deliver, header_line_and_body};

const AUTH_TOKEN: &str = "12345";
const PUBLIC_URL: &str = "https://sb.example.com/v1/webhooks/twilio/main";

static TWILIO: LazyLock<Twilio> = LazyLock::new(|| {
    Twilio::new(TwilioAccount {
        name: "main".into(),
        account_sid: "ACXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX".into(),
        auth_token: Secret::new(AUTH_TOKEN),
        public_url: PUBLIC_URL.into(),
        numbers: vec!["+14155550100".into()],
        api_url: "http://127.0.0.1:9".into(),
        max_per_second: 10,
    })
});

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let (header, body) = if mode % 2 == 0 {
        // Sign what the adapter will parse; a body that is no form is refused before the check.
        let params: Vec<(String, String)> = serde_urlencoded::from_bytes(rest).unwrap_or_default();
        (
            signature(AUTH_TOKEN, PUBLIC_URL, &params).into_bytes(),
            rest,
        )
    } else {
        let (header, body) = header_line_and_body(rest);
        (header.to_vec(), body)
    };
    deliver(
        &*TWILIO,
        "x-twilio-signature",
        &header,
        body,
        chrono::Utc::now(),
    );
});
