//! Telegram Bot API updates (JSON bodies with the secret-token header) through
//! `Telegram::receive`.
//!
//! The first byte picks the mode: even sends the right secret token, so the update parser is
//! reached; odd sends the first line as the token unchanged.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use switchboard::channels::telegram::Telegram;
use switchboard::config::Secret;
use switchboard::config::channels::TelegramAccount;
use switchboard_fuzz::{deliver, header_line_and_body};

const SECRET_TOKEN: &str = "s3cret-token";

static TELEGRAM: LazyLock<Telegram> = LazyLock::new(|| {
    Telegram::new(TelegramAccount {
        name: "main".into(),
        bot_token: Secret::new("123456:ABC-DEF"),
        bot_id: "123456".into(),
        secret_token: Secret::new(SECRET_TOKEN),
        api_url: "http://127.0.0.1:9".into(),
        max_per_second: 10,
    })
});

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let (token, body) = if mode % 2 == 0 {
        (SECRET_TOKEN.as_bytes(), rest)
    } else {
        header_line_and_body(rest)
    };
    deliver(
        &*TELEGRAM,
        "x-telegram-bot-api-secret-token",
        token,
        body,
        chrono::Utc::now(),
    );
});
