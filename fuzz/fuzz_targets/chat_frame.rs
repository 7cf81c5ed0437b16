//! Customer WebSocket frames (`/v1/chat/stream`): JSON text through `chat::parse_frame`, then the
//! checks a `start` frame meets before any store is asked (visitor id, signed customer id).
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard::config::Secret;
use switchboard::daemon::chat::{ClientFrame, parse_frame, valid_visitor, verify_customer};

fuzz_target!(|data: &[u8]| {
    // Axum hands the session only frames that are valid UTF-8 text.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(frame) = parse_frame(text) else {
        return;
    };
    if let ClientFrame::Start {
        visitor_id,
        customer,
        ..
    } = frame
    {
        let _ = valid_visitor(&visitor_id);
        if let Some(customer) = customer {
            let _ = verify_customer(&Secret::new("customer-secret"), &customer);
        }
    }
});
