//! The simulator: drives the real router through synthetic days in virtual time.
//!
//! [`Scenario`] reads a scenario file (see `docs/SIMULATOR.md`), [`run`] plays it through the
//! router and returns a [`Report`]; [`erlang`] holds the closed-form results the simulator is
//! validated against.

pub mod engine;
pub mod erlang;
pub mod report;
pub mod scenario;

pub use engine::{Progress, SimError, run, run_audited, run_with_progress};
pub use report::Report;
pub use scenario::{Scenario, ScenarioError};
