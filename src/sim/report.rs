//! The simulator's statistics: what the run counted, the [`Report`] built from it, and its text table.
//!
//! # Definitions
//!
//! * A conversation is *counted* when it arrived in `[warm_up, duration)`. Each counted conversation
//!   ends up exactly once as answered, abandoned, or unanswered at the end of the run.
//! * It counts in the queue that answered it; if it was never answered, in the queue it was waiting
//!   (or offered) in when it left. So a conversation answered by an overflow queue counts there,
//!   against that queue's SLA, and the queues add up to the overall figures.
//! * **Wait**: from arrival to the first assignment (accept, or auto-accept), as the router reports
//!   it in `Effect::Assigned`. A later pickup by a next tier is not a new wait.
//! * **Probability of waiting**: the share of offered conversations for which no agent was free
//!   when they arrived (the router queued them instead of offering them at once). Erlang C's `C`.
//! * **ASA** (average speed of answer): the mean wait of the answered conversations, counting those
//!   answered at once as zero.
//! * **Service level**: answered within the queue's SLA target ÷ (answered + abandoned after the
//!   target). Customers who abandon before the target count neither for nor against it; with no
//!   abandonment this is `P(wait ≤ target)`, Erlang C's service level.
//! * **Abandon rate**: abandoned ÷ offered.
//! * **Waits by priority**: exact nearest-rank percentiles over the answered conversations' waits,
//!   grouped by the priority the conversation had on arrival (rule priority plus tier and keyword
//!   boosts; later wait-time escalation is not counted, or the groups would sort by wait).
//! * **Occupancy**: per agent, the time spent handling (accept to resolve) plus wrap-up, summed
//!   over the conversations held at once, while on shift within `[warm_up, duration)`, divided by
//!   the agent's slots (`min(max_total, Σ channel capacities)`) times their time on shift in that
//!   window. Offers waiting for an accept are not busy time. Per group and overall, the sums are
//!   divided, not the ratios averaged.
//! * **Fairness** of agent share, per group (agents of a group share a schedule): over the agents'
//!   counts of handled conversations, the coefficient of variation (standard deviation ÷ mean, 0 is
//!   perfectly even) and Jain's index `(Σx)² / (n·Σx²)` (1 is perfectly even, `1/n` is one agent
//!   doing everything).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::routing::{Millis, Priority};

/// How the report defines its service level, stated in the report itself.
pub const SERVICE_LEVEL_DEFINITION: &str = "answered within the queue's SLA target / (answered + abandoned after the target); abandons before the target are excluded";

/// Counts for one queue (or all of them).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Tally {
    pub(crate) offered: u64,
    pub(crate) answered: u64,
    pub(crate) abandoned: u64,
    pub(crate) unanswered_at_end: u64,
    pub(crate) queued_at_arrival: u64,
    pub(crate) answered_within_sla: u64,
    pub(crate) abandoned_after_sla: u64,
    pub(crate) answered_wait_ms: u64,
    pub(crate) abandoned_wait_ms: u64,
}

impl Tally {
    fn add(&mut self, other: &Tally) {
        self.offered += other.offered;
        self.answered += other.answered;
        self.abandoned += other.abandoned;
        self.unanswered_at_end += other.unanswered_at_end;
        self.queued_at_arrival += other.queued_at_arrival;
        self.answered_within_sla += other.answered_within_sla;
        self.abandoned_after_sla += other.abandoned_after_sla;
        self.answered_wait_ms += other.answered_wait_ms;
        self.abandoned_wait_ms += other.abandoned_wait_ms;
    }
}

/// What the engine measured about one agent.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct AgentTally {
    pub(crate) group: u32,
    pub(crate) slots: u16,
    pub(crate) handled: u64,
    /// Busy slots × milliseconds, on shift, in the statistics window.
    pub(crate) busy_slot_ms: u64,
    /// Milliseconds on shift in the statistics window.
    pub(crate) staffed_ms: u64,
}

/// Accumulates the counted conversations' outcomes as the run goes.
#[derive(Debug)]
pub(crate) struct Collector {
    /// Per queue: its SLA target and counts.
    queues: Vec<(Millis, Tally)>,
    waits: BTreeMap<Priority, Vec<u64>>,
}

impl Collector {
    pub(crate) fn new(sla_targets: impl IntoIterator<Item = Millis>) -> Collector {
        Collector {
            queues: sla_targets
                .into_iter()
                .map(|sla| (sla, Tally::default()))
                .collect(),
            waits: BTreeMap::new(),
        }
    }

    pub(crate) fn answered(
        &mut self,
        queue: u32,
        waited: Millis,
        priority: Priority,
        queued: bool,
    ) {
        let (sla, tally) = &mut self.queues[queue as usize];
        tally.offered += 1;
        tally.answered += 1;
        tally.queued_at_arrival += u64::from(queued);
        tally.answered_wait_ms += waited.0;
        tally.answered_within_sla += u64::from(waited <= *sla);
        self.waits.entry(priority).or_default().push(waited.0);
    }

    pub(crate) fn abandoned(&mut self, queue: u32, waited: Millis, queued: bool) {
        let (sla, tally) = &mut self.queues[queue as usize];
        tally.offered += 1;
        tally.abandoned += 1;
        tally.queued_at_arrival += u64::from(queued);
        tally.abandoned_wait_ms += waited.0;
        tally.abandoned_after_sla += u64::from(waited > *sla);
    }

    pub(crate) fn unanswered_at_end(&mut self, queue: u32, queued: bool) {
        let (_, tally) = &mut self.queues[queue as usize];
        tally.offered += 1;
        tally.unanswered_at_end += 1;
        tally.queued_at_arrival += u64::from(queued);
    }
}

/// Facts about the run that are not statistics.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunInfo {
    /// All arrivals, including the warm-up.
    pub arrivals: u64,
    /// Events handled: arrivals, shift changes, accepts, resolves, patience expiries, router timers.
    pub events: u64,
    /// Virtual time at which the run stopped (after finishing the conversations in progress).
    pub end_seconds: f64,
}

/// Outcomes of the conversations counted in one queue, or overall.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QueueReport {
    /// The queue, or `"overall"`.
    pub name: String,
    /// The queue's SLA target; `None` overall (each conversation is held to its own queue's target).
    pub sla_seconds: Option<f64>,
    pub offered: u64,
    pub answered: u64,
    pub abandoned: u64,
    /// Abandoned ÷ offered.
    pub abandon_rate: Option<f64>,
    /// Still unanswered when the run stopped (arrivals end at `duration`, then the run finishes
    /// what is in progress for at most a day).
    pub unanswered_at_end: u64,
    /// Share of offered conversations that found no free agent on arrival.
    pub prob_wait: Option<f64>,
    /// Mean wait of the answered conversations.
    pub asa_seconds: Option<f64>,
    /// Mean wait of the abandoned conversations before they left.
    pub abandon_wait_seconds: Option<f64>,
    pub answered_within_sla: u64,
    pub abandoned_after_sla: u64,
    /// See [`SERVICE_LEVEL_DEFINITION`].
    pub service_level: Option<f64>,
}

impl QueueReport {
    fn new(name: &str, sla: Option<Millis>, tally: &Tally) -> QueueReport {
        let ratio = |num: u64, den: u64| (den > 0).then(|| num as f64 / den as f64);
        QueueReport {
            name: name.to_owned(),
            sla_seconds: sla.map(Millis::as_secs_f64),
            offered: tally.offered,
            answered: tally.answered,
            abandoned: tally.abandoned,
            abandon_rate: ratio(tally.abandoned, tally.offered),
            unanswered_at_end: tally.unanswered_at_end,
            prob_wait: ratio(tally.queued_at_arrival, tally.offered),
            asa_seconds: ratio(tally.answered_wait_ms, tally.answered).map(|ms| ms / 1000.0),
            abandon_wait_seconds: ratio(tally.abandoned_wait_ms, tally.abandoned)
                .map(|ms| ms / 1000.0),
            answered_within_sla: tally.answered_within_sla,
            abandoned_after_sla: tally.abandoned_after_sla,
            service_level: ratio(
                tally.answered_within_sla,
                tally.answered + tally.abandoned_after_sla,
            ),
        }
    }
}

/// Waits of the answered conversations that arrived with one priority.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PriorityWaits {
    pub priority: Priority,
    pub answered: u64,
    pub mean_seconds: f64,
    pub p50_seconds: f64,
    pub p90_seconds: f64,
    pub p99_seconds: f64,
    pub max_seconds: f64,
}

/// One agent group's occupancy and share of the work.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GroupReport {
    pub name: String,
    pub agents: u32,
    /// Conversations one agent holds at once.
    pub slots_per_agent: u16,
    /// Agent-hours on shift in the statistics window.
    pub staffed_hours: f64,
    pub occupancy: Option<f64>,
    /// Assignments of counted conversations (a next tier's pickup counts too).
    pub handled: u64,
    pub handled_per_agent: f64,
    /// Coefficient of variation of handled per agent (0 = even).
    pub handled_cv: Option<f64>,
    /// Jain's fairness index of handled per agent (1 = even).
    pub jain_index: Option<f64>,
}

/// Everything a run measured. `--json` prints it as is; [`Report::to_text`] renders it as tables.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub scenario: String,
    pub seed: u64,
    pub duration_seconds: f64,
    pub warm_up_seconds: f64,
    pub service_level_definition: &'static str,
    pub run: RunInfo,
    pub overall: QueueReport,
    pub queues: Vec<QueueReport>,
    pub waits_by_priority: Vec<PriorityWaits>,
    /// Busy slot-time ÷ (slots × staffed time), over all agents.
    pub occupancy: Option<f64>,
    pub agent_groups: Vec<GroupReport>,
}

/// Nearest-rank percentile of sorted values: the smallest value with at least `p` of them at or below.
fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn secs(ms: u64) -> f64 {
    ms as f64 / 1000.0
}

/// The scenario facts the report repeats.
pub(crate) struct ReportHeader<'a> {
    pub(crate) scenario: &'a str,
    pub(crate) seed: u64,
    pub(crate) duration: Millis,
    pub(crate) warm_up: Millis,
    pub(crate) queue_names: Vec<String>,
    pub(crate) group_names: Vec<(String, u32, u16)>,
}

impl Collector {
    pub(crate) fn finish(
        mut self,
        header: &ReportHeader<'_>,
        run: RunInfo,
        agents: &[AgentTally],
    ) -> Report {
        let mut total = Tally::default();
        let mut queues = Vec::with_capacity(self.queues.len());
        for ((sla, tally), name) in self.queues.iter().zip(&header.queue_names) {
            total.add(tally);
            queues.push(QueueReport::new(name, Some(*sla), tally));
        }
        let waits_by_priority = self
            .waits
            .iter_mut()
            .rev()
            .map(|(priority, waits)| {
                waits.sort_unstable();
                let sum: u64 = waits.iter().sum();
                PriorityWaits {
                    priority: *priority,
                    answered: waits.len() as u64,
                    mean_seconds: secs(sum) / waits.len().max(1) as f64,
                    p50_seconds: secs(percentile(waits, 0.50)),
                    p90_seconds: secs(percentile(waits, 0.90)),
                    p99_seconds: secs(percentile(waits, 0.99)),
                    max_seconds: secs(waits.last().copied().unwrap_or(0)),
                }
            })
            .collect();
        let occupancy_of = |members: &mut dyn Iterator<Item = &AgentTally>| {
            let (busy, capacity) = members.fold((0u128, 0u128), |(busy, capacity), agent| {
                (
                    busy + u128::from(agent.busy_slot_ms),
                    capacity + u128::from(agent.staffed_ms) * u128::from(agent.slots),
                )
            });
            (capacity > 0).then(|| busy as f64 / capacity as f64)
        };
        let agent_groups = header
            .group_names
            .iter()
            .enumerate()
            .map(|(index, (name, count, slots))| {
                let members: Vec<&AgentTally> = agents
                    .iter()
                    .filter(|agent| agent.group == index as u32)
                    .collect();
                let handled: Vec<f64> = members.iter().map(|a| a.handled as f64).collect();
                let n = handled.len().max(1) as f64;
                let sum: f64 = handled.iter().sum();
                let sum_sq: f64 = handled.iter().map(|x| x * x).sum();
                let mean = sum / n;
                let variance = (sum_sq / n - mean * mean).max(0.0);
                GroupReport {
                    name: name.clone(),
                    agents: *count,
                    slots_per_agent: *slots,
                    staffed_hours: members.iter().map(|a| a.staffed_ms as f64).sum::<f64>()
                        / 3_600_000.0,
                    occupancy: occupancy_of(&mut members.iter().copied()),
                    handled: sum as u64,
                    handled_per_agent: mean,
                    handled_cv: (mean > 0.0).then(|| variance.sqrt() / mean),
                    jain_index: (sum_sq > 0.0).then(|| sum * sum / (n * sum_sq)),
                }
            })
            .collect();
        Report {
            scenario: header.scenario.to_owned(),
            seed: header.seed,
            duration_seconds: header.duration.as_secs_f64(),
            warm_up_seconds: header.warm_up.as_secs_f64(),
            service_level_definition: SERVICE_LEVEL_DEFINITION,
            run,
            overall: QueueReport::new("overall", None, &total),
            queues,
            waits_by_priority,
            occupancy: occupancy_of(&mut agents.iter()),
            agent_groups,
        }
    }
}

// ----- text -----------------------------------------------------------------------------------------

fn pct(value: Option<f64>) -> String {
    value.map_or_else(|| "-".to_owned(), |v| format!("{:.1}%", v * 100.0))
}

fn fixed(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "-".to_owned(), |v| format!("{v:.decimals$}"))
}

fn seconds_text(value: Option<f64>) -> String {
    value.map_or_else(|| "-".to_owned(), |v| format!("{v:.1}s"))
}

/// `1234567` → `1,234,567`.
fn thousands(value: u64) -> String {
    let digits = value.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (index, ch) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

fn duration_text(seconds: f64) -> String {
    let total = seconds.round() as u64;
    let (days, rest) = (total / 86_400, total % 86_400);
    let (hours, rest) = (rest / 3_600, rest % 3_600);
    let (minutes, secs) = (rest / 60, rest % 60);
    let mut out = String::new();
    for (value, unit) in [(days, "d"), (hours, "h"), (minutes, "m"), (secs, "s")] {
        if value > 0 {
            let _ = write!(out, "{value}{unit}");
        }
    }
    if out.is_empty() {
        out.push_str("0s");
    }
    out
}

/// A plain-text table: first column left-aligned, the others right-aligned.
struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(header: &[&str]) -> Table {
        Table {
            rows: vec![header.iter().map(|h| (*h).to_owned()).collect()],
        }
    }

    fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    fn render(&self, out: &mut String) {
        let columns = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let widths: Vec<usize> = (0..columns)
            .map(|c| {
                self.rows
                    .iter()
                    .filter_map(|row| row.get(c))
                    .map(|cell| cell.chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        for row in &self.rows {
            let mut line = String::new();
            for (c, cell) in row.iter().enumerate() {
                let pad = widths[c].saturating_sub(cell.chars().count());
                if c == 0 {
                    line.push_str(cell);
                    line.push_str(&" ".repeat(pad));
                } else {
                    line.push_str("  ");
                    line.push_str(&" ".repeat(pad));
                    line.push_str(cell);
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
    }
}

impl Report {
    /// The report as readable tables.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "Scenario `{}` (seed {}): {} simulated, first {} as warm-up; {} arrivals, {} events, stopped at {}",
            self.scenario,
            self.seed,
            duration_text(self.duration_seconds),
            duration_text(self.warm_up_seconds),
            thousands(self.run.arrivals),
            thousands(self.run.events),
            duration_text(self.run.end_seconds),
        );
        let _ = writeln!(out, "Service level = {}.", self.service_level_definition);
        out.push('\n');

        let mut queues = Table::new(&[
            "queue",
            "SLA",
            "offered",
            "answered",
            "abandoned",
            "aband %",
            "P(wait)",
            "ASA",
            "service level",
            "unanswered",
        ]);
        for queue in self.queues.iter().chain(std::iter::once(&self.overall)) {
            queues.row(vec![
                queue.name.clone(),
                queue
                    .sla_seconds
                    .map_or_else(|| "own".to_owned(), |s| format!("{s:.0}s")),
                thousands(queue.offered),
                thousands(queue.answered),
                thousands(queue.abandoned),
                pct(queue.abandon_rate),
                pct(queue.prob_wait),
                seconds_text(queue.asa_seconds),
                pct(queue.service_level),
                thousands(queue.unanswered_at_end),
            ]);
        }
        queues.render(&mut out);
        out.push('\n');

        out.push_str("Waits of answered conversations by priority on arrival\n");
        let mut waits = Table::new(&["priority", "answered", "mean", "p50", "p90", "p99", "max"]);
        for row in &self.waits_by_priority {
            waits.row(vec![
                row.priority.to_string(),
                thousands(row.answered),
                format!("{:.1}s", row.mean_seconds),
                format!("{:.1}s", row.p50_seconds),
                format!("{:.1}s", row.p90_seconds),
                format!("{:.1}s", row.p99_seconds),
                format!("{:.1}s", row.max_seconds),
            ]);
        }
        waits.render(&mut out);
        out.push('\n');

        let mut groups = Table::new(&[
            "agent group",
            "agents",
            "slots",
            "staffed h",
            "occupancy",
            "handled",
            "per agent",
            "CV",
            "Jain",
        ]);
        for group in &self.agent_groups {
            groups.row(vec![
                group.name.clone(),
                group.agents.to_string(),
                group.slots_per_agent.to_string(),
                format!("{:.0}", group.staffed_hours),
                pct(group.occupancy),
                thousands(group.handled),
                format!("{:.1}", group.handled_per_agent),
                fixed(group.handled_cv, 3),
                fixed(group.jain_index, 4),
            ]);
        }
        groups.row(vec![
            "overall".to_owned(),
            self.agent_groups
                .iter()
                .map(|g| g.agents)
                .sum::<u32>()
                .to_string(),
            String::new(),
            format!(
                "{:.0}",
                self.agent_groups
                    .iter()
                    .map(|g| g.staffed_hours)
                    .sum::<f64>()
            ),
            pct(self.occupancy),
            thousands(self.agent_groups.iter().map(|g| g.handled).sum()),
            String::new(),
            String::new(),
            String::new(),
        ]);
        groups.render(&mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let values: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&values, 0.5), 50);
        assert_eq!(percentile(&values, 0.9), 90);
        assert_eq!(percentile(&values, 0.99), 99);
        assert_eq!(percentile(&[7], 0.99), 7);
        assert_eq!(percentile(&[], 0.5), 0);
    }

    #[test]
    fn number_formatting() {
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(thousands(999), "999");
        assert_eq!(duration_text(86_400.0 * 7.0), "7d");
        assert_eq!(duration_text(5_430.0), "1h30m30s");
    }
}
