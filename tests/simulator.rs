//! Simulator tests: agreement with Erlang C and Erlang A, determinism, shipped scenarios, bad files.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Instant;

use switchboard::routing::Millis;
use switchboard::sim::erlang::{ErlangA, ErlangC};
use switchboard::sim::{self, Report, Scenario, ScenarioError};

const HANDLE_SECONDS: f64 = 300.0;
const SLA_SECONDS: f64 = 20.0;

/// An M/M/c (or M/M/c+M with `patience`) centre as a scenario file: one queue, Poisson arrivals,
/// exponential handle times, `agents` single-capacity agents on duty round the clock.
///
/// `arrivals` sets the length of the run; the first four hours are left out as warm-up.
/// `auto_accept` false goes through offers (accepted at once), true through auto-assignment.
fn mmc_scenario(
    occupancy: f64,
    agents: u32,
    patience: Option<f64>,
    arrivals: f64,
    seed: u64,
    auto_accept: bool,
) -> String {
    let per_hour = occupancy * f64::from(agents) * 3600.0 / HANDLE_SECONDS;
    let hours = (arrivals / per_hour).ceil() + 4.0;
    let patience = match patience {
        Some(mean) => format!("distribution = \"exponential\"\nmean_seconds = {mean}"),
        None => "distribution = \"none\"".to_owned(),
    };
    format!(
        r#"
name = "mmc"
seed = {seed}
duration = "{hours}h"
warm_up = "4h"

[[queues]]
name = "q"
channels = ["chat"]
sla_seconds = {SLA_SECONDS}
offer_timeout_seconds = 86400
wrap_up_seconds = 0
auto_accept = {auto_accept}

[[agent_groups]]
name = "a"
count = {agents}
queues = ["q"]
capacity = {{ chat = 1 }}

[[arrivals]]
channel = "chat"
rate_per_hour = {per_hour}

[handle_time.chat]
distribution = "exponential"
mean_seconds = {HANDLE_SECONDS}

[patience.chat]
{patience}
"#
    )
}

fn relative(simulated: f64, formula: f64) -> f64 {
    (simulated - formula).abs() / formula
}

struct ErlangCheck {
    p_wait: (f64, f64),
    asa: (f64, f64),
    service_level: (f64, f64),
    offered: u64,
    seconds: f64,
}

fn erlang_c_check(
    occupancy: f64,
    agents: u32,
    arrivals: f64,
    seed: u64,
    auto: bool,
) -> ErlangCheck {
    let scenario =
        Scenario::from_toml_str(&mmc_scenario(occupancy, agents, None, arrivals, seed, auto))
            .unwrap();
    let started = Instant::now();
    let report = sim::run(&scenario).unwrap();
    let seconds = started.elapsed().as_secs_f64();
    let lambda = occupancy * f64::from(agents) / HANDLE_SECONDS;
    let model = ErlangC::new(lambda, 1.0 / HANDLE_SECONDS, agents).unwrap();
    let queue = &report.queues[0];
    assert_eq!(queue.abandoned, 0);
    assert_eq!(queue.unanswered_at_end, 0);
    ErlangCheck {
        p_wait: (queue.prob_wait.unwrap(), model.prob_wait()),
        asa: (queue.asa_seconds.unwrap(), model.average_speed_of_answer()),
        service_level: (
            queue.service_level.unwrap(),
            model.service_level(SLA_SECONDS),
        ),
        offered: queue.offered,
        seconds,
    }
}

fn assert_erlang_c(occupancy: f64, agents: u32, arrivals: f64, seed: u64, auto: bool) {
    let check = erlang_c_check(occupancy, agents, arrivals, seed, auto);
    let mut failures = Vec::new();
    for (what, (simulated, formula)) in [
        ("P(wait)", check.p_wait),
        ("ASA", check.asa),
        ("service level", check.service_level),
    ] {
        let error = relative(simulated, formula);
        eprintln!(
            "c={agents} ρ={occupancy}: {what} simulated {simulated:.4} vs Erlang C {formula:.4} ({:.2} %)",
            error * 100.0
        );
        if error > 0.02 {
            failures.push(format!("{what}: {simulated} vs {formula}"));
        }
    }
    eprintln!(
        "c={agents} ρ={occupancy}: {} conversations counted, simulated in {:.2} s",
        check.offered, check.seconds
    );
    assert!(failures.is_empty(), "beyond 2 % of Erlang C: {failures:?}");
}

// Agreement with Erlang C within 2 % relative, against an SLA target of 20 s.
//
// How long the runs must be: the sampling error of a simulated mean shrinks like 1/sqrt(n), but
// waits stay correlated for a long time, the longer the closer ρ is to 1, and ASA is the noisiest
// of the three figures. Measured spreads (standard deviation of ASA's relative error between
// seeds, here and with an independent textbook FCFS recursion): c=5 ρ=0.5 about 2.0 % per 400k
// arrivals, c=20 ρ=0.8 about 3.3 % per 400k, ρ=0.95 about 4–5 % per million for c from 1 to 50, and
// worse for larger c at the same number of arrivals (7.6 % at c=100, 14 % at c=400: at a fixed
// occupancy, more agents mean fewer independent handle-time periods per arrival and rarer waits).
// The run lengths below bring ASA's spread to about 0.65 % (ρ=0.5), 0.85 % (ρ=0.8) and 1.2 %
// (ρ=0.95).
//
// The committed seeds are the first ones written and were never changed. The first two cases were
// lengthened (from 2M and 4M arrivals) after the first run put c=5's ASA at 1.72 %: deterministic,
// but with little room should the order of random draws ever change. Each case was also run by hand
// with five other seeds; the results are in the comment after `erlang_a_abandonment`.

/// (occupancy ρ, agents c, arrivals, auto-accept, seed)
const ERLANG_C_CASES: [(f64, u32, f64, bool, u64); 3] = [
    (0.5, 5, 4_000_000.0, false, 11),
    (0.8, 20, 6_000_000.0, true, 12),
    (0.95, 10, 10_000_000.0, true, 13),
];

/// (occupancy λ/(cμ), agents c, mean patience in seconds, seed); 400k arrivals each.
const ERLANG_A_CASES: [(f64, u32, f64, u64); 2] = [(0.95, 20, 120.0, 21), (1.1, 50, 180.0, 22)];

#[test]
fn erlang_c_five_agents_half_busy() {
    let (occupancy, agents, arrivals, auto, seed) = ERLANG_C_CASES[0];
    assert_erlang_c(occupancy, agents, arrivals, seed, auto);
}

#[test]
fn erlang_c_twenty_agents_at_80_percent() {
    let (occupancy, agents, arrivals, auto, seed) = ERLANG_C_CASES[1];
    assert_erlang_c(occupancy, agents, arrivals, seed, auto);
}

#[test]
fn erlang_c_ten_agents_at_95_percent() {
    let (occupancy, agents, arrivals, auto, seed) = ERLANG_C_CASES[2];
    assert_erlang_c(occupancy, agents, arrivals, seed, auto);
}

/// Exponential patience: abandonment within 5 % of Erlang A.
fn erlang_a_check(
    occupancy: f64,
    agents: u32,
    patience: f64,
    arrivals: f64,
    seed: u64,
) -> (f64, f64, u64) {
    let scenario = Scenario::from_toml_str(&mmc_scenario(
        occupancy,
        agents,
        Some(patience),
        arrivals,
        seed,
        false,
    ))
    .unwrap();
    let report = sim::run(&scenario).unwrap();
    let lambda = occupancy * f64::from(agents) / HANDLE_SECONDS;
    let model = ErlangA::new(lambda, 1.0 / HANDLE_SECONDS, 1.0 / patience, agents).unwrap();
    let queue = &report.queues[0];
    (
        queue.abandon_rate.unwrap(),
        model.prob_abandon(),
        queue.offered,
    )
}

#[test]
fn erlang_a_abandonment() {
    for (occupancy, agents, patience, seed) in ERLANG_A_CASES {
        let started = Instant::now();
        let (simulated, formula, offered) =
            erlang_a_check(occupancy, agents, patience, 400_000.0, seed);
        let error = relative(simulated, formula);
        eprintln!(
            "c={agents} load={occupancy} patience {patience}s: abandoned {simulated:.4} vs Erlang A {formula:.4} ({:.2} %), {offered} counted, {:.2} s",
            error * 100.0,
            started.elapsed().as_secs_f64()
        );
        assert!(
            error <= 0.05,
            "abandonment {simulated} vs Erlang A {formula}"
        );
    }
}

// How robust the committed seeds are: every validation case was also run with seeds 100 to 104
// (by calling `erlang_c_check` / `erlang_a_check` with those seeds).
//
// Result when the tests were written (seeds 100 to 104; range of the relative errors):
//
// | case | P(wait) | ASA | service level |
// |---|---|---|---|
// | c=5, ρ=0.5, 4M arrivals | −0.47 … +0.39 % | −0.48 … +0.73 % | −0.05 … +0.08 % |
// | c=20, ρ=0.8, 6M | −0.90 … +0.47 % | −1.91 … +1.50 % | −0.20 … +0.27 % |
// | c=10, ρ=0.95, 10M | −0.47 … +0.15 % | −1.92 … **+4.13 %** | −0.76 … **+2.19 %** |
// | Erlang A abandonment, both cases | −1.79 … +0.85 % (5 % allowed) | | |
//
// So every case but ρ=0.95 holds for all five seeds; at ρ=0.95 three of five hold on all three
// figures (ASA and service level each fail once). At that load the error of a simulated mean is
// skewed to the right (a rare long congestion episode lifts the mean wait), and ASA's spread at 10M
// arrivals is about 1.2 % (12 seeds of 1M arrivals: 3.6 % simulated, 3.9 % for a textbook FCFS
// recursion), so roughly nine seeds in ten pass; holding every seed would take ~40M arrivals.

#[test]
fn same_seed_same_report() {
    let text = mmc_scenario(0.9, 10, Some(120.0), 20_000.0, 5, false);
    let scenario = Scenario::from_toml_str(&text).unwrap();
    let first = sim::run(&scenario).unwrap();
    let second = sim::run(&scenario).unwrap();
    assert_eq!(first, second);
    assert_eq!(
        serde_json::to_string(&first).unwrap(),
        serde_json::to_string(&second).unwrap()
    );
    let other =
        Scenario::from_toml_str(&mmc_scenario(0.9, 10, Some(120.0), 20_000.0, 6, false)).unwrap();
    assert_ne!(
        sim::run(&other).unwrap(),
        first,
        "another seed, another run"
    );
}

#[test]
fn adding_an_agent_group_keeps_the_arrivals() {
    let base = mmc_scenario(0.9, 10, Some(120.0), 5_000.0, 9, false);
    let extra = format!(
        "{base}\n[[agent_groups]]\nname = \"extra\"\ncount = 2\nqueues = [\"q\"]\ncapacity = {{ chat = 1 }}\n"
    );
    let first = sim::run(&Scenario::from_toml_str(&base).unwrap()).unwrap();
    let second = sim::run(&Scenario::from_toml_str(&extra).unwrap()).unwrap();
    assert_eq!(first.run.arrivals, second.run.arrivals);
    assert_eq!(first.overall.offered, second.overall.offered);
    assert!(second.overall.asa_seconds < first.overall.asa_seconds);
}

fn shipped(name: &str) -> Scenario {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("config/scenarios")
        .join(name);
    Scenario::load(&path).unwrap_or_else(|error| panic!("{name}: {error}"))
}

fn run_short(mut scenario: Scenario, duration: Millis) -> Report {
    scenario.duration = duration;
    scenario.warm_up = Millis::ZERO;
    sim::run(&scenario).unwrap()
}

#[test]
fn shipped_scenarios_parse_and_run() {
    let day = Millis(24 * 3_600_000);
    let example = run_short(shipped("example.toml"), day);
    assert!(example.overall.offered > 1_000, "{}", example.to_text());
    assert!(example.overall.answered > 0);
    assert!(example.queues.len() >= 3);
    assert!(
        example.waits_by_priority.len() >= 2,
        "VIPs have their own priority"
    );
    assert!(example.agent_groups.iter().all(|g| g.occupancy.is_some()));
    let text = example.to_text();
    assert!(text.contains("service level") && text.contains("overall"));
    let json: serde_json::Value = serde_json::to_value(&example).unwrap();
    assert!(json["overall"]["asa_seconds"].is_number());

    let erlang = shipped("erlang-c.toml");
    assert_eq!(erlang.config.agents.len(), 20);
    let short = run_short(erlang, Millis(6 * 3_600_000));
    assert!(short.overall.answered > 500);

    let million = shipped("million.toml");
    assert!(
        million.expected_arrivals() >= 1_000_000.0,
        "million.toml expects {} arrivals",
        million.expected_arrivals()
    );
    let short = run_short(million, Millis(2 * 3_600_000));
    assert!(short.overall.answered > 0);
}

fn error_of(text: &str) -> String {
    match Scenario::from_toml_str(text) {
        Ok(_) => panic!("accepted:\n{text}"),
        Err(error) => error.to_string(),
    }
}

const MINIMAL: &str = r#"
seed = 1
duration = "1h"

[[queues]]
name = "q"

[[agent_groups]]
name = "a"
count = 1
queues = ["q"]
capacity = { chat = 1 }

[[arrivals]]
channel = "chat"
rate_per_hour = 10

[handle_time.chat]
distribution = "constant"
seconds = 60
"#;

#[test]
fn minimal_scenario_is_accepted() {
    let scenario = Scenario::from_toml_str(MINIMAL).unwrap();
    assert_eq!(scenario.duration, Millis(3_600_000));
    assert_eq!(
        scenario.patience_for(&switchboard::routing::Channel::Chat),
        None
    );
    sim::run(&scenario).unwrap();
}

#[test]
fn bad_scenarios_say_what_is_wrong() {
    // Unknown field, with its line.
    let typo = MINIMAL.replace("count = 1", "count = 1\ncapacty = { chat = 2 }");
    let message = error_of(&typo);
    assert!(
        message.contains("capacty") && message.contains("line"),
        "{message}"
    );

    // Wrong type.
    let message = error_of(&MINIMAL.replace("count = 1", "count = \"one\""));
    assert!(
        message.contains("count") || message.contains("line"),
        "{message}"
    );

    // Unknown distribution.
    let message = error_of(&MINIMAL.replace("\"constant\"", "\"gamma\""));
    assert!(message.contains("gamma"), "{message}");

    // Bad duration.
    let message = error_of(&MINIMAL.replace("\"1h\"", "\"an hour\""));
    assert!(message.starts_with("duration:"), "{message}");

    // Profile of the wrong length.
    let message = error_of(&MINIMAL.replace("rate_per_hour = 10", "rate_per_hour = [1, 2, 3]"));
    assert!(
        message.contains("arrivals[0].rate_per_hour") && message.contains("24"),
        "{message}"
    );

    // Unknown queue in an agent group: the router's own validation.
    let message = error_of(&MINIMAL.replace("queues = [\"q\"]", "queues = [\"nope\"]"));
    assert!(message.contains("unknown queue `nope`"), "{message}");
    assert!(matches!(
        Scenario::from_toml_str(&MINIMAL.replace("queues = [\"q\"]", "queues = [\"nope\"]")),
        Err(ScenarioError::Config(_))
    ));

    // A channel with arrivals but no handle time.
    let message = error_of(&MINIMAL.replace("channel = \"chat\"", "channel = \"sms\""));
    assert!(message.contains("handle_time"), "{message}");

    // `none` is for patience only.
    let message = error_of(&MINIMAL.replace(
        "distribution = \"constant\"\nseconds = 60",
        "distribution = \"none\"",
    ));
    assert!(message.contains("only allowed for patience"), "{message}");

    // Shares above 1.
    let message = error_of(&MINIMAL.replace(
        "rate_per_hour = 10",
        "rate_per_hour = 10\ntiers = { vip = 0.7, gold = 0.6 }",
    ));
    assert!(message.contains("arrivals[0].tiers"), "{message}");

    // A shift that ends before it starts.
    let message = error_of(&MINIMAL.replace("count = 1", "count = 1\nshifts = [[17, 9]]"));
    assert!(message.contains("agent_groups[0].shifts[0]"), "{message}");

    // An unknown strategy.
    let message = error_of(&MINIMAL.replace("name = \"q\"", "name = \"q\"\nstrategy = \"random\""));
    assert!(message.contains("unknown strategy `random`"), "{message}");

    // An escalation step with two actions.
    let message = error_of(&MINIMAL.replace(
        "name = \"q\"",
        "name = \"q\"\nescalation = [{ after_seconds = 30, raise_by = 5, set_to = 9 }]",
    ));
    assert!(message.contains("exactly one of"), "{message}");

    // A file that does not exist.
    let error = Scenario::load(Path::new("/nonexistent/scenario.toml")).unwrap_err();
    assert!(matches!(error, ScenarioError::Read { .. }), "{error}");
}

#[test]
fn slow_accepts_time_out_and_are_offered_again() {
    // Accept delays often exceed the offer timeout: offers time out, go to someone else, stale
    // accepts are dropped, agents who miss three in a row are set away and come back a minute later.
    let text = MINIMAL
        .replace(
            "count = 1",
            "count = 4\naccept_delay = { distribution = \"exponential\", mean_seconds = 20 }",
        )
        .replace("name = \"q\"", "name = \"q\"\noffer_timeout_seconds = 15")
        .replace("rate_per_hour = 10", "rate_per_hour = 120")
        .replace("duration = \"1h\"", "duration = \"2d\"")
        + "\n[patience.chat]\ndistribution = \"exponential\"\nmean_seconds = 300\n";
    let report = sim::run_audited(&Scenario::from_toml_str(&text).unwrap()).unwrap();
    let overall = &report.overall;
    assert!(overall.answered > 1_000, "{}", report.to_text());
    assert_eq!(
        overall.offered,
        overall.answered + overall.abandoned + overall.unanswered_at_end
    );
    // Half the offers time out after 15 s, so answers take a while even with 4 agents for 2 Erlangs.
    assert!(overall.asa_seconds.unwrap() > 10.0, "{}", report.to_text());
}

#[test]
fn router_invariants_hold_through_a_simulated_day() {
    // The example centre for a day, with the router's brute-force audit after every command: no
    // agent above capacity, no conversation with two owners, indexes consistent, work-conserving.
    let mut scenario = shipped("example.toml");
    scenario.duration = Millis(24 * 3_600_000);
    scenario.warm_up = Millis::ZERO;
    let started = Instant::now();
    let report = sim::run_audited(&scenario).unwrap_or_else(|error| panic!("{error}"));
    eprintln!(
        "audited {} events in {:.2} s",
        report.run.events,
        started.elapsed().as_secs_f64()
    );
    assert_eq!(
        report,
        sim::run(&scenario).unwrap(),
        "auditing changes nothing"
    );
}

#[test]
fn documented_scenario_runs() {
    let docs =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/SIMULATOR.md"))
            .unwrap();
    let section = &docs[docs.find("### A complete small scenario").unwrap()..];
    let start = section.find("```toml").unwrap() + "```toml".len();
    let end = start + section[start..].find("```").unwrap();
    let report = sim::run(&Scenario::from_toml_str(&section[start..end]).unwrap()).unwrap();
    assert_eq!(report.queues.len(), 2);
    assert!(report.overall.answered > 0);
}
