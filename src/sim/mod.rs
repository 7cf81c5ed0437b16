//! The simulator: drives the real router through a synthetic day in virtual time.

pub mod erlang;
