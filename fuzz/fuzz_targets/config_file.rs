//! Daemon configuration files: TOML over the defaults through `config::load_str`, which parses
//! and validates every section (channels, email, routing, store...).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // No environment: the file alone decides.
    let _ = switchboard::config::load_str(text, std::iter::empty());
});
