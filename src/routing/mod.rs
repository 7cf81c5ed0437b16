//! The routing core: a pure, deterministic state machine (commands in, effects out).
