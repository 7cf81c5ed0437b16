//! Switchboard: an omnichannel contact-centre router (library half; the binary is `src/main.rs`).
#![forbid(unsafe_code)]

pub mod bus;
pub mod channels;
pub mod config;
pub mod daemon;
pub mod message;
pub mod routing;
pub mod schemas;
pub mod sim;
pub mod store;
