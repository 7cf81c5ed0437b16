//! What the webhook targets share: reading the input after the mode byte as a hostile header
//! line and a body, and handing one delivery to an adapter the way the HTTP handler does.
#![forbid(unsafe_code)]

use http::{HeaderMap, HeaderValue};
use switchboard::channels::{Webhook, WebhookRequest};

/// The "hostile header" mode: the first line is the header's value exactly as sent, the rest of
/// the input the body.
pub fn header_line_and_body(input: &[u8]) -> (&[u8], &[u8]) {
    let split = input
        .iter()
        .position(|&byte| byte == b'\n')
        .unwrap_or(input.len());
    (&input[..split], input.get(split + 1..).unwrap_or_default())
}

/// Hands `body` to `webhook` with `header` set to `value` (left out when the bytes are no valid
/// header value, as an HTTP server would never pass them on). What it answers is not checked:
/// a finding is a panic, an overflow or a hang.
pub fn deliver<W: Webhook + ?Sized>(
    webhook: &W,
    header: &'static str,
    value: &[u8],
    body: &[u8],
    now: chrono::DateTime<chrono::Utc>,
) {
    let mut headers = HeaderMap::new();
    if let Ok(value) = HeaderValue::from_bytes(value) {
        headers.insert(header, value);
    }
    let _ = webhook.receive(&WebhookRequest {
        query: None,
        headers: &headers,
        body,
        now,
    });
}
