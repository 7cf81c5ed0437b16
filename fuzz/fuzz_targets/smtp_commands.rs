//! The SMTP listener's reader: a client's bytes through `CommandReader` (the command grammar)
//! and, after each `DATA`, `MessageReader` (dot-unstuffing, the size cap), then the message
//! through `mime::parse`, as a session does it, without a socket.
//!
//! The first byte sets how the rest is cut into reads (1 to 256 bytes each), so commands and
//! messages that arrive split across reads are covered too.
#![no_main]

use libfuzzer_sys::fuzz_target;
use smtp_proto::{Error as SmtpError, Request};
use switchboard::channels::email::mime::parse;
use switchboard::channels::email::smtp::{CommandReader, MessageReader};

/// A session disconnects a client after this many errors; so does the target.
const MAX_ERRORS: usize = 10;
/// Small, so the over-the-limit path is reached.
const MAX_MESSAGE_BYTES: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let Some((&cut, rest)) = data.split_first() else {
        return;
    };
    let read_size = usize::from(cut) + 1;
    let mut reads = rest.chunks(read_size);
    let mut commands = CommandReader::default();
    let mut message: Option<MessageReader> = None;
    let mut errors = 0;
    loop {
        if let Some(reader) = message.as_mut() {
            let input = commands.take_pending();
            if let Some(after) = reader.push(&input) {
                commands.push(&after);
                if let Some(reader) = message.take()
                    && let Ok(raw) = reader.finish()
                {
                    let _ = parse(&raw, None);
                }
                continue;
            }
            match reads.next() {
                Some(read) => commands.push(read),
                None => return,
            }
            continue;
        }
        match commands.next_command() {
            Ok(Request::Data) => message = Some(MessageReader::new(MAX_MESSAGE_BYTES)),
            Ok(Request::Quit) => return,
            Ok(_) => {}
            Err(SmtpError::NeedsMoreData { .. }) => match reads.next() {
                Some(read) => commands.push(read),
                None => return,
            },
            Err(_) => {
                errors += 1;
                if errors >= MAX_ERRORS {
                    return;
                }
            }
        }
    }
});
