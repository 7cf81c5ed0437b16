//! Simulator scenario files (`switchboard simulate --scenario`): TOML through
//! `Scenario::from_toml_str`, which parses and validates.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard::sim::scenario::Scenario;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = Scenario::from_toml_str(text);
});
