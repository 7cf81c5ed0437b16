//! Closed-form queueing results (Erlang C and Erlang A) that the simulator's measurements are validated against.
//!
//! A contact centre with `c` interchangeable agents, Poisson arrivals and exponential handling
//! times is the textbook M/M/c queue. For that model the long-run behaviour is known exactly, so
//! a simulation of the real router under those assumptions must reproduce these numbers (up to
//! sampling noise). This module provides them.
//!
//! # Notation
//!
//! All rates are per second, all times are in seconds.
//!
//! | symbol | meaning |
//! |--------|---------|
//! | `λ` (`arrival_rate`) | mean number of new contacts per second (Poisson arrivals) |
//! | `μ` (`service_rate`) | handling rate of one agent, `1 / mean handle time` (exponential handling) |
//! | `θ` (`abandonment_rate`) | rate at which a waiting caller gives up, `1 / mean patience` (exponential patience) |
//! | `c` (`agents`) | number of agents |
//! | `a = λ/μ` | *offered load* in Erlangs: the average number of agents the traffic would keep busy if nobody ever waited or left |
//! | `ρ = a/c` | *occupancy*: the fraction of time each agent is busy (Erlang C) |
//!
//! * [`ErlangC`]: M/M/c, callers wait forever. Only meaningful when `a < c`, otherwise the queue
//!   grows without bound.
//! * [`ErlangA`]: M/M/c+M, each waiting caller abandons after an exponential patience time. The
//!   abandonments keep the queue finite at any load, so there is no stability condition.
//!
//! # Numerical approach
//!
//! The textbook formulas are written with `a^c / c!`. Taken literally they fail for realistic
//! centres: `500!` is about `10^1134` and `a^500` overflows an `f64` long before that, so a
//! naive implementation returns `NaN` or `inf` for a few hundred agents. Both models are
//! therefore computed from *ratios* of neighbouring terms, which stay in a comfortable range:
//!
//! * Erlang B (the blocking probability of the loss system) obeys the recurrence
//!   `B(0) = 1`, `B(k) = a·B(k-1) / (k + a·B(k-1))`. Every iterate is a probability in `[0, 1]`,
//!   so nothing can overflow, and the recurrence is forward-stable.
//! * Erlang C follows from Erlang B without further sums: `C = c·B / (c - a·(1 - B))`.
//! * Erlang A reuses Erlang B for the states where some agent is free and sums the queue states
//!   as running products of birth/death ratios, rescaled by exact powers of two whenever they
//!   grow large (see [`ErlangA`]).

use thiserror::Error;

/// Why a queue model could not be built from the given parameters.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum ErlangError {
    /// A rate was zero, negative, infinite or `NaN`.
    #[error("{name} must be a finite rate above zero (events per second), got {value}")]
    InvalidRate {
        /// Which parameter was wrong (`"arrival rate"`, `"service rate"`, `"abandonment rate"`).
        name: &'static str,
        /// The rejected value.
        value: f64,
    },
    /// A centre with zero agents answers nobody.
    #[error("at least one agent is required")]
    NoAgents,
    /// `λ/μ` overflowed: the arrival rate is astronomically larger than the service rate.
    #[error(
        "the offered load λ/μ is not a finite number \
         (arrival rate {arrival_rate}/s, service rate {service_rate}/s)"
    )]
    LoadNotFinite {
        /// The arrival rate that was passed in.
        arrival_rate: f64,
        /// The service rate that was passed in.
        service_rate: f64,
    },
    /// Erlang C only: the offered load is not below the number of agents, so without
    /// abandonment the queue (and every wait) grows without bound.
    #[error(
        "unstable without abandonment: the offered load of {offered_load} Erlangs is not below \
         the {agents} agents, so the queue would grow without bound (Erlang C needs λ/μ < c; \
         use Erlang A to model callers who hang up)"
    )]
    Unstable {
        /// `λ/μ` in Erlangs.
        offered_load: f64,
        /// The number of agents `c`.
        agents: u32,
    },
    /// Erlang A only: patience is so long compared with the overload that the stationary queue
    /// holds millions of callers, and summing its states would take too long to be useful.
    #[error(
        "the abandonment rate {abandonment_rate}/s is too small for this load: about \
         {estimated_states:.0} queue states would have to be summed (the limit is {limit:.0})"
    )]
    QueueTooLong {
        /// The abandonment rate `θ` that was passed in.
        abandonment_rate: f64,
        /// Rough number of queue states the computation would need.
        estimated_states: f64,
        /// The largest number of states that is accepted.
        limit: f64,
    },
}

/// Returns `value` if it is a usable rate (finite and strictly positive).
fn check_rate(name: &'static str, value: f64) -> Result<f64, ErlangError> {
    if value.is_finite() && value > 0.0 {
        Ok(value)
    } else {
        Err(ErlangError::InvalidRate { name, value })
    }
}

/// Validates the parameters shared by both models and returns the offered load `λ/μ`.
fn check_common(arrival_rate: f64, service_rate: f64, agents: u32) -> Result<f64, ErlangError> {
    check_rate("arrival rate", arrival_rate)?;
    check_rate("service rate", service_rate)?;
    if agents == 0 {
        return Err(ErlangError::NoAgents);
    }
    let offered_load = arrival_rate / service_rate;
    if !offered_load.is_finite() {
        return Err(ErlangError::LoadNotFinite {
            arrival_rate,
            service_rate,
        });
    }
    Ok(offered_load)
}

/// Erlang B: the probability that all `agents` are busy in the *loss* system M/M/c/c (callers
/// who find every agent busy are turned away), with `offered_load` Erlangs offered.
///
/// Definition: `B(c, a) = (a^c / c!) / Σ_{k=0..c} a^k / k!`.
///
/// Computed with the recurrence `B(0) = 1`, `B(k) = a·B(k-1) / (k + a·B(k-1))`, which follows
/// from dividing the definition for `k` by the one for `k - 1`. Each step maps `[0, 1]` into
/// `[0, 1]`, so there are no factorials, no powers and nothing to overflow; the relative
/// rounding error grows only linearly with `c`. Cost: `O(c)`.
fn erlang_b(agents: u32, offered_load: f64) -> f64 {
    let mut blocking = 1.0;
    for k in 1..=agents {
        let carried = offered_load * blocking;
        blocking = carried / (f64::from(k) + carried);
        if blocking < f64::MIN_POSITIVE {
            // Below the smallest normal f64 the probability is zero for every practical
            // purpose, and every further step only makes it smaller: stop early, which keeps
            // very large `c` with a small load cheap.
            return 0.0;
        }
    }
    blocking
}

/// The Erlang C model (M/M/c with infinitely patient callers).
///
/// Callers arrive as a Poisson process of rate `arrival_rate` (`λ`), each of `agents` (`c`)
/// agents handles one caller at a time for an exponential time of rate `service_rate` (`μ`),
/// and callers who find everyone busy wait in a first-come-first-served queue for as long as
/// it takes. Build it with [`ErlangC::new`], which rejects unstable parameters (`λ/μ >= c`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ErlangC {
    /// `λ`: arrivals per second.
    pub arrival_rate: f64,
    /// `μ`: calls one agent completes per second while busy (`1 / mean handle time`).
    pub service_rate: f64,
    /// `c`: number of agents.
    pub agents: u32,
}

impl ErlangC {
    /// Builds the model, checking that both rates are finite and positive, that there is at
    /// least one agent, and that the queue is stable (offered load `λ/μ` strictly below `c`).
    pub fn new(arrival_rate: f64, service_rate: f64, agents: u32) -> Result<Self, ErlangError> {
        let offered_load = check_common(arrival_rate, service_rate, agents)?;
        if offered_load >= f64::from(agents) {
            return Err(ErlangError::Unstable {
                offered_load,
                agents,
            });
        }
        Ok(Self {
            arrival_rate,
            service_rate,
            agents,
        })
    }

    /// Offered load `a = λ/μ` in Erlangs: the mean number of busy agents.
    pub fn offered_load(&self) -> f64 {
        self.arrival_rate / self.service_rate
    }

    /// Occupancy `ρ = a/c`: the long-run fraction of time each agent spends handling calls.
    pub fn occupancy(&self) -> f64 {
        self.offered_load() / f64::from(self.agents)
    }

    /// `C(c, a)`: the probability that an arriving caller finds all agents busy and has to
    /// wait. By PASTA (Poisson arrivals see time averages) this is also the long-run fraction of
    /// time during which all agents are busy.
    ///
    /// Definition: `C = (a^c/c! · c/(c-a)) / (Σ_{k<c} a^k/k! + a^c/c! · c/(c-a))`.
    ///
    /// Computed as `C = c·B / (c - a·(1 - B))` from the Erlang B value `B(c, a)` (see the module
    /// documentation), so it is accurate for hundreds or thousands of agents. The denominator
    /// is evaluated as `(c - a) + a·B`, two non-negative parts, so no cancellation occurs.
    pub fn prob_wait(&self) -> f64 {
        let c = f64::from(self.agents);
        let a = self.offered_load();
        let b = erlang_b(self.agents, a);
        c * b / ((c - a) + a * b)
    }

    /// Average speed of answer: the mean time in queue over *all* callers (those answered
    /// immediately count as zero), in seconds.
    ///
    /// `E[W] = C / (cμ - λ)`: a caller who has to wait is served once the queue ahead drains,
    /// and while all agents are busy they finish calls at combined rate `cμ`; the wait of a
    /// queued caller is exponential with rate `cμ - λ`, and it happens with probability `C`.
    pub fn average_speed_of_answer(&self) -> f64 {
        self.prob_wait() / self.excess_capacity()
    }

    /// Service level: the probability that a caller is answered within `answer_within_secs`
    /// seconds, `P(W <= t) = 1 - C·e^{-(cμ - λ)·t}`.
    ///
    /// `t = 0` gives `1 - C` (the callers answered immediately) and the value rises to `1` as
    /// `t → ∞`. A negative `t` gives `0`; `NaN` gives `NaN`. The expression is evaluated as
    /// `(1 - C) - C·expm1(-(cμ-λ)t)` so that short targets keep full relative precision.
    pub fn service_level(&self, answer_within_secs: f64) -> f64 {
        if answer_within_secs < 0.0 {
            return 0.0;
        }
        let wait_prob = self.prob_wait();
        (1.0 - wait_prob) - wait_prob * (-self.excess_capacity() * answer_within_secs).exp_m1()
    }

    /// `cμ - λ`: spare answering capacity, positive for a stable model.
    fn excess_capacity(&self) -> f64 {
        f64::from(self.agents) * self.service_rate - self.arrival_rate
    }
}

/// The Erlang A model (M/M/c+M): Erlang C plus callers who hang up.
///
/// As in [`ErlangC`], callers arrive at rate `λ`, `c` agents serve at rate `μ` each, and the
/// queue is first-come-first-served. In addition every waiting caller has an exponential
/// patience of rate `abandonment_rate` (`θ`, i.e. mean patience `1/θ`): if they have not
/// been answered by then, they abandon. Callers already talking to an agent never abandon.
///
/// # The birth–death chain
///
/// Let `n` be the number of callers in the system (talking or waiting). It is a birth–death
/// process with birth rate `λ` in every state and death rate
/// `d(n) = min(n, c)·μ + max(n - c, 0)·θ` (busy agents finishing, plus waiting callers giving
/// up). Its stationary distribution satisfies `π(n) = π(n-1)·λ/d(n)`. Because `d(n)` grows
/// without bound once `n > c`, the terms eventually fall faster than any geometric series, so
/// the chain is stable at any load, however large, as long as `θ > 0`.
///
/// # How it is computed
///
/// * States `0..=c` have exactly the Erlang B shape (`π(n) ∝ a^n/n!`), so their total mass
///   relative to `π(c)` is `1/B(c, a)`; `B` comes from the overflow-free recurrence.
/// * Queue states `c + j` are summed as `u(j) = π(c+j)/π(c)` with `u(0) = 1` and
///   `u(j+1) = u(j)·λ/(cμ + (j+1)θ)`, a running product of ratios. When the load is far
///   above `c` these products first grow (up to `e^{thousands}` for 500 agents at twice the
///   load with patient callers) before decaying, so whenever the running term exceeds `2^500`
///   every partial sum is multiplied by `2^-500` and the number of such rescalings is counted.
///   Multiplying by a power of two is exact in floating point, so this costs no precision.
/// * The series is cut off once the ratio `λ/(cμ + (j+1)θ)` has dropped below 1 and the
///   geometric bound on everything that follows (valid because later ratios are smaller
///   still) is below `1e-17` of the running sum, both for the probability mass and for the
///   mean queue length. This truncation is invisible at `f64` precision.
/// * Normalising, with `S = Σ u(j)`: `π(c) = B / (1 - B + B·S)`.
///
/// The work is proportional to the number of queue states with non-negligible probability:
/// about `(λ - cμ)/θ + 10·sqrt(λ/θ)` in overload, a few hundred or thousand otherwise.
/// [`ErlangA::new`] refuses parameters for which that would exceed twenty million states
/// (callers who are practically never going to hang up, facing a permanent overload).
///
/// # Waiting-time metrics
///
/// Follow a caller who arrives to find `j` others already waiting. Agents finish calls at rate
/// `cμ`, each of the `k` callers still ahead leaves at rate `θ` and the caller themselves hangs
/// up at rate `θ`, so with `k` ahead the caller's situation changes at rate `r(k) = cμ + (k+1)θ`,
/// moving up (with probability `(cμ + kθ)/r(k)`) or abandoning. Multiplying these
/// probabilities telescopes: they are answered with probability `cμ / (cμ + (j+1)θ)`, and
/// given that, their expected wait is `H(j) = Σ_{k=0..j} 1/r(k)` (each stage lasts an
/// exponential time of rate `r(k)` whatever its outcome). These, weighted by the chance of
/// finding `j` waiting (PASTA: `π(c+j)`), give [`ErlangA::average_speed_of_answer`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ErlangA {
    /// `λ`: arrivals per second.
    pub arrival_rate: f64,
    /// `μ`: calls one agent completes per second while busy (`1 / mean handle time`).
    pub service_rate: f64,
    /// `θ`: rate at which each waiting caller abandons (`1 / mean patience`).
    pub abandonment_rate: f64,
    /// `c`: number of agents.
    pub agents: u32,
}

/// Largest number of queue states [`ErlangA::new`] accepts (about a tenth of a second of work).
const MAX_QUEUE_STATES: f64 = 2.0e7;

/// Safety net for the summation loop. [`ErlangA::new`] keeps the expected length far below it.
const QUEUE_STATE_HARD_CAP: u64 = 4 * MAX_QUEUE_STATES as u64;

/// Stop summing once the neglected tail is below this fraction of what has been summed.
const TAIL_TOLERANCE: f64 = 1.0e-17;

/// The running product is rescaled by `2^-RESCALE_BITS` whenever it exceeds `2^RESCALE_BITS`.
const RESCALE_BITS: i32 = 500;

/// Stationary quantities of the Erlang A chain, from which every public metric follows.
#[derive(Debug, Clone, Copy)]
struct ErlangAStationary {
    /// `P(N >= c)`: an arrival finds all agents busy (PASTA).
    prob_wait: f64,
    /// `E[Q] = Σ_{j>=0} j·π(c+j)`: mean number of callers waiting.
    mean_queue: f64,
    /// `E[W · 1{answered}]`: the queue time of answered callers, averaged over all arrivals.
    answered_wait: f64,
}

impl ErlangA {
    /// Builds the model. Requires finite, positive `λ`, `μ` and `θ` and at least one agent.
    /// Any load is accepted, including `λ/μ >= c`: abandonment keeps the queue finite.
    ///
    /// Fails with [`ErlangError::QueueTooLong`] only when patience is so long relative to an
    /// overload that the stationary queue would hold tens of millions of callers.
    pub fn new(
        arrival_rate: f64,
        service_rate: f64,
        abandonment_rate: f64,
        agents: u32,
    ) -> Result<Self, ErlangError> {
        check_common(arrival_rate, service_rate, agents)?;
        check_rate("abandonment rate", abandonment_rate)?;
        let estimated_states = estimated_queue_states(
            arrival_rate,
            f64::from(agents) * service_rate,
            abandonment_rate,
        );
        // A NaN estimate cannot arise from finite positive rates, but would be rejected too.
        if estimated_states.is_nan() || estimated_states > MAX_QUEUE_STATES {
            return Err(ErlangError::QueueTooLong {
                abandonment_rate,
                estimated_states,
                limit: MAX_QUEUE_STATES,
            });
        }
        Ok(Self {
            arrival_rate,
            service_rate,
            abandonment_rate,
            agents,
        })
    }

    /// Offered load `a = λ/μ` in Erlangs. Unlike Erlang C it may exceed the number of agents.
    pub fn offered_load(&self) -> f64 {
        self.arrival_rate / self.service_rate
    }

    /// The probability that an arriving caller finds all agents busy and has to queue,
    /// `P(N >= c)` (by PASTA, arrivals see the time-stationary distribution).
    pub fn prob_wait(&self) -> f64 {
        self.stationary().prob_wait
    }

    /// `P(Ab)`: the fraction of all arrivals who hang up before being answered.
    ///
    /// Waiting callers abandon at total rate `θ·E[Q]`, while callers arrive at rate `λ`, so
    /// `P(Ab) = θ·E[Q] / λ`, where `E[Q]` is the mean queue length. Equivalently
    /// `P(Ab) = θ·E[W]` (see [`ErlangA::average_wait`]).
    pub fn prob_abandon(&self) -> f64 {
        self.abandonment_rate * self.stationary().mean_queue / self.arrival_rate
    }

    /// `E[W]`: mean time spent in the queue over *all* arrivals, in seconds, whether the wait
    /// ends with an answer or with the caller hanging up (callers answered at once count as 0).
    ///
    /// By Little's law applied to the queue, `E[Q] = λ·E[W]`, so `E[W] = E[Q] / λ`.
    pub fn average_wait(&self) -> f64 {
        self.stationary().mean_queue / self.arrival_rate
    }

    /// Average speed of answer: the mean time in queue of the callers who are *answered*, in
    /// seconds, i.e. total queue time of answered calls divided by the number of answered
    /// calls. Callers answered immediately count with a wait of zero; callers who abandon are
    /// excluded (their time is part of [`ErlangA::average_wait`] only). This is the usual
    /// contact-centre ASA, and it tends to Erlang C's ASA as `θ → 0` below full load.
    ///
    /// `ASA = E[W · 1{answered}] / (1 - P(Ab))`, where a caller finding `j` others waiting
    /// contributes `cμ / (cμ + (j+1)θ) · Σ_{k=0..j} 1/(cμ + (k+1)θ)` (see the type-level
    /// documentation for the derivation).
    pub fn average_speed_of_answer(&self) -> f64 {
        let stationary = self.stationary();
        let prob_abandon = self.abandonment_rate * stationary.mean_queue / self.arrival_rate;
        stationary.answered_wait / (1.0 - prob_abandon)
    }

    /// Solves the birth–death chain (see the type-level documentation).
    fn stationary(&self) -> ErlangAStationary {
        let lambda = self.arrival_rate;
        let theta = self.abandonment_rate;
        let c_mu = f64::from(self.agents) * self.service_rate;
        let blocking = erlang_b(self.agents, self.offered_load());
        if blocking <= 0.0 {
            // The load is so far below `c` that all agents are never busy at f64 precision.
            return ErlangAStationary {
                prob_wait: 0.0,
                mean_queue: 0.0,
                answered_wait: 0.0,
            };
        }

        let rescale_up = 2f64.powi(RESCALE_BITS);
        let rescale_down = 2f64.powi(-RESCALE_BITS);
        // All of `term`, `mass`, `queue` and `answered` are the true values times
        // `2^(-RESCALE_BITS · rescalings)`.
        let mut rescalings: i32 = 0;
        let mut term = 1.0_f64; // u(j) = π(c+j)/π(c)
        let mut mass = 0.0_f64; // Σ u(j)
        let mut queue = 0.0_f64; // Σ j·u(j)
        let mut answered = 0.0_f64; // Σ u(j)·P(answered | j)·E[W | answered, j]
        let mut stage_times = 0.0_f64; // H(j) = Σ_{k<=j} 1/r(k)
        let mut waiting = 0.0_f64; // j, as f64 (exact far beyond the hard cap)
        let mut steps: u64 = 0;
        loop {
            // r(j) = cμ + (j+1)θ is both the death rate of state c+j+1 and the rate at which
            // a caller with j others ahead leaves their current place in the queue.
            let exit_rate = c_mu + (waiting + 1.0) * theta;
            stage_times += 1.0 / exit_rate;
            mass += term;
            queue += waiting * term;
            answered += term * (c_mu / exit_rate) * stage_times;

            let ratio = lambda / exit_rate; // u(j+1)/u(j)
            let next = term * ratio;
            if ratio < 1.0 {
                // Later ratios are smaller (death rates only grow), so the rest of the series
                // is dominated by a geometric one with this ratio.
                let spare = 1.0 - ratio;
                let tail_mass = next / spare;
                let tail_queue = next * ((waiting + 1.0) / spare + ratio / (spare * spare));
                if tail_mass <= TAIL_TOLERANCE * mass && tail_queue <= TAIL_TOLERANCE * queue {
                    break;
                }
            }
            steps += 1;
            if steps >= QUEUE_STATE_HARD_CAP {
                break;
            }
            term = next;
            waiting += 1.0;
            if term > rescale_up {
                term *= rescale_down;
                mass *= rescale_down;
                queue *= rescale_down;
                answered *= rescale_down;
                rescalings = rescalings.saturating_add(1);
            }
        }

        // π(c)·2^(RESCALE_BITS·rescalings) = B / ((1 - B)·2^(-RESCALE_BITS·rescalings) + B·mass).
        // The first term may underflow to zero, which is then the correct limit.
        let unscale = 2f64.powi(rescalings.saturating_mul(-RESCALE_BITS));
        let norm = blocking / ((1.0 - blocking) * unscale + blocking * mass);
        ErlangAStationary {
            // Mathematically at most 1; rounding can overshoot by an ulp when nearly every
            // caller waits.
            prob_wait: (norm * mass).min(1.0),
            mean_queue: norm * queue,
            answered_wait: norm * answered,
        }
    }
}

/// Rough number of queue states the Erlang A summation visits: the queue length at which the
/// terms peak (where `λ = cμ + jθ`) plus how far past the peak they stay non-negligible.
/// Beyond the peak the log-terms fall like `-d²θ/(2λ)` (a Gaussian of width `sqrt(λ/θ)`);
/// below full load they also fall at least geometrically with ratio `λ/(cμ)`.
fn estimated_queue_states(lambda: f64, c_mu: f64, theta: f64) -> f64 {
    let peak = ((lambda - c_mu) / theta).max(0.0);
    let gaussian = (100.0 * lambda / theta).sqrt();
    let spread = if lambda < c_mu {
        let geometric = (45.0 + (c_mu / (c_mu - lambda)).ln()) / (c_mu / lambda).ln();
        gaussian.min(geometric)
    } else {
        gaussian
    };
    peak + spread
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_pcg::Pcg64;

    fn assert_rel(actual: f64, expected: f64, tol: f64, what: &str) {
        let err = (actual - expected).abs() / expected.abs().max(f64::MIN_POSITIVE);
        assert!(
            err <= tol,
            "{what}: got {actual:.17e}, expected {expected:.17e} (relative error {err:.3e} > {tol:.0e})"
        );
    }

    /// Stationary results of the birth–death chain, computed independently of the module:
    /// log-space products from state 0 (no Erlang B, no rescaling) and, for the waiting-time
    /// metrics, a first-step recursion for a tagged caller instead of the closed forms.
    #[derive(Debug)]
    struct Reference {
        prob_wait: f64,
        /// `E[Q] / λ` (Little's law).
        mean_wait_little: f64,
        /// `θ E[Q] / λ`.
        prob_abandon_little: f64,
        /// `Σ π(c+j) E[W | j]`, with `E[W | j]` from the tagged-caller recursion.
        mean_wait_tagged: f64,
        /// `Σ π(c+j) P(abandon | j)`, from the recursion.
        prob_abandon_tagged: f64,
        /// Mean wait of answered callers, from the recursion.
        asa_tagged: f64,
    }

    /// `theta = 0` gives the plain M/M/c chain (then `lambda < c·mu` is required).
    fn reference_chain(lambda: f64, mu: f64, theta: f64, agents: u32) -> Reference {
        let c = f64::from(agents);
        let mut log_weights = vec![0.0_f64];
        let mut max_log = 0.0_f64;
        let mut n = 0.0_f64;
        loop {
            n += 1.0;
            let death = n.min(c) * mu + (n - c).max(0.0) * theta;
            let log_w = log_weights.last().unwrap() + lambda.ln() - death.ln();
            log_weights.push(log_w);
            max_log = max_log.max(log_w);
            // Past the peak, decreasing, and e^-50 below the largest term: stop.
            if n > c && lambda < death && log_w < max_log - 50.0 {
                break;
            }
            assert!(log_weights.len() < 50_000_000, "reference chain too long");
        }
        let weights: Vec<f64> = log_weights.iter().map(|l| (l - max_log).exp()).collect();
        let total: f64 = weights.iter().sum();
        let queue_probs = &weights[agents as usize..];

        let c_mu = c * mu;
        let mut prob_wait = 0.0;
        let mut mean_queue = 0.0;
        let (mut wait_tagged, mut abandon_tagged, mut answered_wait) = (0.0, 0.0, 0.0);
        // Tagged caller with k others ahead: state (P(answered), E[W], E[W·1{answered}]).
        let (mut answered_prob, mut wait, mut answered_part) = (1.0_f64, 0.0_f64, 0.0_f64);
        for (j, w) in queue_probs.iter().enumerate() {
            let p = w / total;
            let k = j as f64;
            let rate = c_mu + (k + 1.0) * theta;
            let advance = (c_mu + k * theta) / rate;
            // First step: one stage of mean 1/rate, then (with prob. `advance`) the k-1 case.
            answered_part = advance * (answered_prob / rate + answered_part);
            wait = 1.0 / rate + advance * wait;
            answered_prob *= advance;

            prob_wait += p;
            mean_queue += k * p;
            wait_tagged += p * wait;
            abandon_tagged += p * (1.0 - answered_prob);
            answered_wait += p * answered_part;
        }
        Reference {
            prob_wait,
            mean_wait_little: mean_queue / lambda,
            prob_abandon_little: theta * mean_queue / lambda,
            mean_wait_tagged: wait_tagged,
            prob_abandon_tagged: abandon_tagged,
            asa_tagged: answered_wait / (1.0 - abandon_tagged),
        }
    }

    // ----- Erlang C -----

    #[test]
    fn erlang_c_textbook_values() {
        // a = 2 Erlangs, c = 3: B(3,2) = 4/19 by the recurrence (1, 2/3, 2/5, 4/19), so
        // C = 3·(4/19) / (3 - 2·15/19) = 12/27 = 4/9 exactly (hand calculation).
        let model = ErlangC::new(2.0, 1.0, 3).unwrap();
        assert_rel(model.prob_wait(), 4.0 / 9.0, 1e-14, "C(3, 2)");
        assert_rel(
            model.average_speed_of_answer(),
            4.0 / 9.0,
            1e-14,
            "E[W] (3, 2)",
        );

        // a = 10 Erlangs, c = 11: the 0.6821 of the worked example in Call Centre Helper,
        // "Erlang C Formula – Made Simple With an Easy Worked Example"; the exact rational
        // value from the definition is 15625000/22906587.
        let model = ErlangC::new(10.0, 1.0, 11).unwrap();
        assert_rel(
            model.prob_wait(),
            15_625_000.0 / 22_906_587.0,
            1e-13,
            "C(11, 10)",
        );
        assert!((model.prob_wait() - 0.6821).abs() < 5e-5);
    }

    #[test]
    fn erlang_c_call_centre_helper_example() {
        // Call Centre Helper, "Erlang C Formula – Made Simple": 100 calls per half hour,
        // 180 s average handling time, 11 agents, 20 s answer target (10 Erlangs). Expected
        // figures computed by hand in exact rational arithmetic (service level via
        // 40-digit decimal exp); the article's rounded figures are 68.21 % waiting,
        // 39 % service level and an ASA of about 123 s.
        let model = ErlangC::new(100.0 / 1800.0, 1.0 / 180.0, 11).unwrap();
        assert_rel(model.offered_load(), 10.0, 1e-14, "a");
        assert_rel(model.occupancy(), 10.0 / 11.0, 1e-14, "ρ");
        assert_rel(model.prob_wait(), 0.682_118_204_689_332_4, 1e-12, "C");
        assert_rel(
            model.average_speed_of_answer(),
            122.781_276_844_079_83,
            1e-12,
            "ASA",
        );
        assert_rel(
            model.service_level(20.0),
            0.389_613_811_729_153_4,
            1e-12,
            "SL(20 s)",
        );
    }

    #[test]
    fn erlang_c_westbay_example() {
        // The step-by-step example of Westbay Engineers' "The Erlang-C Formula" page:
        // 360 calls per half hour, 4-minute calls, 55 agents, 15 s target, i.e.
        // λ = 0.2/s, μ = 1/240 /s, a = 48 Erlangs. Expected values computed by hand in exact
        // rational arithmetic from the definition of C (not copied from the page).
        let model = ErlangC::new(360.0 / 1800.0, 1.0 / 240.0, 55).unwrap();
        assert_rel(model.offered_load(), 48.0, 1e-14, "a");
        assert_rel(model.prob_wait(), 0.238_700_936_378_009_2, 1e-12, "C");
        assert_rel(
            model.average_speed_of_answer(),
            8.184_032_104_388_887,
            1e-12,
            "ASA",
        );
        assert_rel(
            model.service_level(15.0),
            0.845_883_092_170_580_3,
            1e-12,
            "SL(15 s)",
        );
    }

    #[test]
    fn erlang_c_360_calls_per_hour() {
        // λ = 360 calls/hour = 0.1/s with a 4-minute handle time (a = 24 Erlangs) on 27
        // agents, 20 s target. Hand calculation in exact rational arithmetic:
        // C = 0.449763297677895..., ASA = C·240/3 = 35.98106381423... s,
        // SL(20) = 1 - C·e^{-0.25} = 0.649723991571677...
        let model = ErlangC::new(360.0 / 3600.0, 1.0 / 240.0, 27).unwrap();
        assert_rel(model.prob_wait(), 0.449_763_297_677_895_36, 1e-12, "C");
        assert_rel(
            model.average_speed_of_answer(),
            35.981_063_814_231_625,
            1e-12,
            "ASA",
        );
        assert_rel(
            model.service_level(20.0),
            0.649_723_991_571_677_7,
            1e-12,
            "SL(20 s)",
        );
    }

    #[test]
    fn erlang_c_is_stable_for_500_agents_and_monotone_in_load() {
        let c475 = ErlangC::new(475.0, 1.0, 500).unwrap().prob_wait();
        let c490 = ErlangC::new(490.0, 1.0, 500).unwrap().prob_wait();
        for value in [c475, c490] {
            assert!(value.is_finite() && value > 0.0 && value < 1.0, "{value}");
        }
        assert!(c475 < c490, "{c475} should be below {c490}");

        let mut previous = 0.0;
        for step in 0..=200 {
            let load = 300.0 + f64::from(step) * 0.995;
            let value = ErlangC::new(load, 1.0, 500).unwrap().prob_wait();
            assert!(
                value.is_finite() && value > previous && value < 1.0,
                "a={load}: {value}"
            );
            previous = value;
        }

        // Far beyond 500 agents the recurrence still works.
        let big = ErlangC::new(9_900.0, 1.0, 10_000).unwrap().prob_wait();
        assert!(big.is_finite() && big > 0.0 && big < 1.0, "{big}");
        // And a tiny load on many agents gives a probability that underflows cleanly to 0.
        let tiny = ErlangC::new(1.0, 1.0, 500).unwrap();
        assert_eq!(tiny.prob_wait(), 0.0);
        assert_eq!(tiny.service_level(0.0), 1.0);
    }

    #[test]
    fn erlang_c_matches_the_truncated_birth_death_chain() {
        // (λ, μ, c) with occupancy from 0.5 to 0.95.
        let cases = [
            (0.5, 1.0, 1),          // ρ = 0.5
            (3.0, 0.1, 60),         // ρ = 0.5
            (2.4, 0.5, 6),          // ρ = 0.8
            (7.0, 1.0, 10),         // ρ = 0.7
            (0.2, 1.0 / 240.0, 55), // ρ ≈ 0.873
            (0.1, 1.0 / 240.0, 27), // ρ ≈ 0.889
            (9.0, 0.5, 20),         // ρ = 0.9
            (1.9, 1.0, 2),          // ρ = 0.95
            (47.5, 0.1, 500),       // ρ = 0.95
        ];
        for (lambda, mu, agents) in cases {
            let model = ErlangC::new(lambda, mu, agents).unwrap();
            let chain = reference_chain(lambda, mu, 0.0, agents);
            let label = format!("λ={lambda} μ={mu} c={agents}");
            assert_rel(
                model.prob_wait(),
                chain.prob_wait,
                1e-9,
                &format!("P(wait) {label}"),
            );
            assert_rel(
                model.average_speed_of_answer(),
                chain.mean_wait_little,
                1e-9,
                &format!("E[W] {label}"),
            );
            // The tagged-caller view of the same chain agrees with Little's law.
            assert_rel(
                chain.mean_wait_tagged,
                chain.mean_wait_little,
                1e-9,
                &format!("reference E[W] {label}"),
            );
        }
    }

    #[test]
    fn erlang_c_service_level_limits() {
        let model = ErlangC::new(9.0, 0.5, 20).unwrap();
        assert_eq!(model.service_level(0.0), 1.0 - model.prob_wait());
        assert!((model.service_level(f64::INFINITY) - 1.0).abs() <= 1e-15);
        assert!((model.service_level(1e6) - 1.0).abs() <= 1e-15);
        assert_eq!(model.service_level(-1.0), 0.0);
        assert!(model.service_level(f64::NAN).is_nan());
        let mut previous = model.service_level(0.0);
        for tenths in 1..100 {
            let value = model.service_level(f64::from(tenths) / 10.0);
            assert!(value > previous && value < 1.0);
            previous = value;
        }
    }

    #[test]
    fn erlang_c_rejects_bad_parameters() {
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert!(matches!(
                ErlangC::new(bad, 1.0, 3),
                Err(ErlangError::InvalidRate {
                    name: "arrival rate",
                    ..
                })
            ));
            assert!(matches!(
                ErlangC::new(1.0, bad, 3),
                Err(ErlangError::InvalidRate {
                    name: "service rate",
                    ..
                })
            ));
        }
        assert_eq!(ErlangC::new(1.0, 1.0, 0), Err(ErlangError::NoAgents));
        assert_eq!(
            ErlangC::new(3.0, 1.0, 3),
            Err(ErlangError::Unstable {
                offered_load: 3.0,
                agents: 3
            })
        );
        assert!(matches!(
            ErlangC::new(5.0, 1.0, 3),
            Err(ErlangError::Unstable { .. })
        ));
        assert!(matches!(
            ErlangC::new(1e300, 1e-300, 3),
            Err(ErlangError::LoadNotFinite { .. })
        ));
        let message = ErlangC::new(3.0, 1.0, 3).unwrap_err().to_string();
        assert!(
            message.contains("3 Erlangs") && message.contains("3 agents"),
            "{message}"
        );
        let message = ErlangC::new(-2.0, 1.0, 3).unwrap_err().to_string();
        assert!(
            message.contains("arrival rate") && message.contains("-2"),
            "{message}"
        );
    }

    // ----- Erlang A -----

    #[test]
    fn erlang_a_tends_to_erlang_c_as_patience_grows() {
        for (lambda, mu, agents) in [(2.0, 1.0, 3), (9.0, 0.5, 20), (0.1, 1.0 / 240.0, 27)] {
            let c = ErlangC::new(lambda, mu, agents).unwrap();
            let mut previous_gap = f64::INFINITY;
            for theta in [1e-2, 1e-4, 1e-6, 1e-8, 1e-10] {
                let a = ErlangA::new(lambda, mu, theta, agents).unwrap();
                let gap = (a.prob_wait() - c.prob_wait()).abs() / c.prob_wait();
                assert!(gap < previous_gap, "θ={theta}: gap {gap} did not shrink");
                previous_gap = gap;
            }
            let a = ErlangA::new(lambda, mu, 1e-10, agents).unwrap();
            let label = format!("λ={lambda} μ={mu} c={agents}");
            assert_rel(
                a.prob_wait(),
                c.prob_wait(),
                1e-6,
                &format!("P(wait) {label}"),
            );
            assert_rel(
                a.average_wait(),
                c.average_speed_of_answer(),
                1e-6,
                &format!("E[W] {label}"),
            );
            assert_rel(
                a.average_speed_of_answer(),
                c.average_speed_of_answer(),
                1e-6,
                &format!("ASA {label}"),
            );
            assert!(
                a.prob_abandon() < 1e-6,
                "P(Ab) {label}: {}",
                a.prob_abandon()
            );
        }
    }

    #[test]
    fn erlang_a_matches_an_independent_chain_computation() {
        // (λ, μ, θ, c): under, at and over full load, small and large centres.
        let cases = [
            (1.0, 1.0, 1.0, 1),
            (0.5, 1.0, 0.2, 1),
            (3.0, 1.0, 0.5, 1),
            (2.0, 1.0, 0.1, 3),
            (10.0, 1.0, 2.0, 11),
            (9.0, 0.5, 0.01, 20),
            (40.0, 0.5, 0.05, 20),
            (0.1, 1.0 / 240.0, 1.0 / 90.0, 27),
            (0.25, 1.0 / 240.0, 1.0 / 60.0, 40),
            (450.0, 1.0, 0.2, 500),
            (500.0, 1.0, 0.05, 500),
            (1000.0, 1.0, 0.1, 500),
            (1000.0, 1.0, 0.01, 500),
            (3.0, 0.1, 0.3, 60),
        ];
        for (lambda, mu, theta, agents) in cases {
            let model = ErlangA::new(lambda, mu, theta, agents).unwrap();
            let chain = reference_chain(lambda, mu, theta, agents);
            let label = format!("λ={lambda} μ={mu} θ={theta} c={agents}");
            assert_rel(
                model.prob_wait(),
                chain.prob_wait,
                1e-9,
                &format!("P(wait) {label}"),
            );
            assert_rel(
                model.prob_abandon(),
                chain.prob_abandon_little,
                1e-9,
                &format!("P(Ab) {label}"),
            );
            assert_rel(
                model.average_wait(),
                chain.mean_wait_little,
                1e-9,
                &format!("E[W] {label}"),
            );
            assert_rel(
                model.average_speed_of_answer(),
                chain.asa_tagged,
                1e-9,
                &format!("ASA {label}"),
            );
            // Two views of the same chain: Little's law versus following one caller.
            assert_rel(
                chain.prob_abandon_tagged,
                chain.prob_abandon_little,
                1e-9,
                &format!("reference P(Ab) {label}"),
            );
            assert_rel(
                chain.mean_wait_tagged,
                chain.mean_wait_little,
                1e-9,
                &format!("reference E[W] {label}"),
            );
        }
    }

    #[test]
    fn erlang_a_single_agent_hand_case() {
        // c = 1, λ = μ = θ = 1: the death rate in state n is 1 + (n-1) = n, exactly that of
        // an infinite-server queue, so N ~ Poisson(1) and π(n) = e^-1 / n!. Then
        // P(wait) = P(N >= 1) = 1 - 1/e, E[Q] = E[N] - P(N >= 1) = 1/e,
        // P(Ab) = θ·E[Q]/λ = 1/e and E[W] = E[Q]/λ = 1/e.
        let model = ErlangA::new(1.0, 1.0, 1.0, 1).unwrap();
        let e_inv = (-1.0_f64).exp();
        assert_rel(model.prob_wait(), 1.0 - e_inv, 1e-13, "P(wait)");
        assert_rel(model.prob_abandon(), e_inv, 1e-13, "P(Ab)");
        assert_rel(model.average_wait(), e_inv, 1e-13, "E[W]");
        // Answered rate λ(1 - P(Ab)) must equal the agent's completion rate μ·P(busy).
        assert_rel(
            1.0 - model.prob_abandon(),
            model.prob_wait(),
            1e-13,
            "flow balance",
        );
    }

    #[test]
    fn erlang_a_patience_equal_to_handle_time_is_poisson() {
        // With θ = μ every caller in the system leaves at rate μ whether talking or waiting,
        // so N ~ Poisson(a) for any c.
        // c = 2, a = 1: P(wait) = P(N >= 2) = 1 - 2/e; E[Q] = E[(N-2)+] = 1 - 2 + 2·P(0) + P(1)
        // = 3/e - 1, so P(Ab) = E[W] = 3/e - 1 (λ = θ = 1).
        let model = ErlangA::new(1.0, 1.0, 1.0, 2).unwrap();
        let e_inv = (-1.0_f64).exp();
        assert_rel(model.prob_wait(), 1.0 - 2.0 * e_inv, 1e-13, "P(wait)");
        assert_rel(model.prob_abandon(), 3.0 * e_inv - 1.0, 1e-12, "P(Ab)");
        assert_rel(model.average_wait(), 3.0 * e_inv - 1.0, 1e-12, "E[W]");

        // c = 500, a = 1000 (twice the load the agents can carry): P(N < 500) is about e^-130,
        // so E[(N-500)+] = E[N] - 500 = 500 and P(Ab) = 500/1000, E[W] = 0.5 s; everybody waits.
        let model = ErlangA::new(1000.0, 1.0, 1.0, 500).unwrap();
        assert_rel(model.prob_wait(), 1.0, 1e-13, "P(wait) c=500");
        assert_rel(model.prob_abandon(), 0.5, 1e-12, "P(Ab) c=500");
        assert_rel(model.average_wait(), 0.5, 1e-12, "E[W] c=500");
    }

    #[test]
    fn erlang_a_abandonment_grows_with_impatience() {
        for (lambda, mu, agents) in [
            (2.0, 1.0, 3),
            (5.0, 1.0, 3),
            (480.0, 1.0, 500),
            (900.0, 1.0, 500),
        ] {
            let thetas: Vec<f64> = (0..=24)
                .map(|step| 1e-3 * 10f64.powf(f64::from(step) / 6.0)) // 1e-3 .. 10
                .collect();
            let probs: Vec<f64> = thetas
                .iter()
                .map(|&theta| {
                    ErlangA::new(lambda, mu, theta, agents)
                        .unwrap()
                        .prob_abandon()
                })
                .collect();
            for (pair, theta) in probs.windows(2).zip(&thetas[1..]) {
                let label = format!("λ={lambda} c={agents} θ={theta}");
                if lambda < mu * f64::from(agents) {
                    assert!(pair[1] > pair[0], "{label}: {pair:?}");
                } else {
                    // In overload the agents are practically never idle, so they answer
                    // cμ callers per second whatever θ is and P(Ab) = 1 - cμ/λ up to terms
                    // below rounding until θ gets large: it must never drop, though.
                    assert!(pair[1] >= pair[0] - 1e-14, "{label}: {pair:?}");
                }
            }
            let (first, last) = (probs[0], probs[probs.len() - 1]);
            assert!(
                last > first && last < 1.0,
                "λ={lambda} c={agents}: {first} .. {last}"
            );
            for (&theta, &p) in thetas.iter().zip(&probs) {
                let wait = ErlangA::new(lambda, mu, theta, agents).unwrap().prob_wait();
                assert!(p <= wait, "only waiting callers abandon (θ={theta})");
            }
        }
    }

    #[test]
    fn erlang_a_large_centre_up_to_twice_the_load() {
        for load in [250.0, 475.0, 500.0, 750.0, 1000.0] {
            for theta in [0.001, 0.01, 0.1, 1.0, 10.0] {
                let model = ErlangA::new(load, 1.0, theta, 500).unwrap();
                let (pw, pab) = (model.prob_wait(), model.prob_abandon());
                let (wait, asa) = (model.average_wait(), model.average_speed_of_answer());
                let label = format!("a={load} θ={theta}");
                assert!(
                    pw.is_finite() && (0.0..=1.0).contains(&pw),
                    "{label}: P(wait) {pw}"
                );
                assert!(
                    pab.is_finite() && (0.0..=pw).contains(&pab),
                    "{label}: P(Ab) {pab}"
                );
                assert!(wait.is_finite() && wait >= 0.0, "{label}: E[W] {wait}");
                assert!(asa.is_finite() && asa >= 0.0, "{label}: ASA {asa}");
                if load > 500.0 {
                    // Overloaded: agents answer at most cμ = 500/s, so at least
                    // 1 - 500/load of the callers must abandon, and not many more.
                    let floor = 1.0 - 500.0 / load;
                    assert!(
                        pab >= floor - 1e-12 && pab < floor + 0.05,
                        "{label}: P(Ab) {pab}"
                    );
                }
            }
        }
    }

    /// Discrete-event simulation of M/M/c+M with FCFS: each arrival takes the agent that
    /// frees up first, unless its patience runs out before then. Returns
    /// (P(wait), P(Ab), E[W], ASA) after a 10 % warm-up.
    fn simulate(lambda: f64, mu: f64, theta: f64, agents: usize, arrivals: u32) -> [f64; 4] {
        let mut rng = Pcg64::seed_from_u64(0x5717_c4b0);
        let mut exponential = |rate: f64| -(1.0 - rng.random::<f64>()).ln() / rate;
        let mut free_at = vec![0.0_f64; agents];
        let mut now = 0.0;
        let (mut counted, mut waited, mut abandoned) = (0u32, 0u32, 0u32);
        let (mut total_wait, mut answered_wait) = (0.0, 0.0);
        for i in 0..arrivals {
            now += exponential(lambda);
            let patience = exponential(theta);
            let handle = exponential(mu);
            let (agent, earliest) = free_at
                .iter()
                .copied()
                .enumerate()
                .min_by(|x, y| x.1.total_cmp(&y.1))
                .unwrap();
            let wait = (earliest - now).max(0.0);
            let answered = wait <= patience;
            if answered {
                free_at[agent] = now + wait + handle;
            }
            if i >= arrivals / 10 {
                counted += 1;
                waited += u32::from(wait > 0.0);
                if answered {
                    total_wait += wait;
                    answered_wait += wait;
                } else {
                    abandoned += 1;
                    total_wait += patience;
                }
            }
        }
        let n = f64::from(counted);
        [
            f64::from(waited) / n,
            f64::from(abandoned) / n,
            total_wait / n,
            answered_wait / (n - f64::from(abandoned)),
        ]
    }

    #[test]
    fn erlang_a_agrees_with_a_simulation() {
        // Moderately overloaded three-agent team (a = 3.3 on c = 3, mean patience 2.5 s),
        // one million arrivals from a fixed seed; the sampling error is a few tenths of a percent.
        let (lambda, mu, theta, agents) = (3.3, 1.0, 0.4, 3);
        let model = ErlangA::new(lambda, mu, theta, agents).unwrap();
        let [pw, pab, wait, asa] = simulate(lambda, mu, theta, agents as usize, 1_000_000);
        assert_rel(pw, model.prob_wait(), 0.01, "simulated P(wait)");
        assert_rel(pab, model.prob_abandon(), 0.01, "simulated P(Ab)");
        assert_rel(wait, model.average_wait(), 0.01, "simulated E[W]");
        assert_rel(asa, model.average_speed_of_answer(), 0.01, "simulated ASA");
    }

    #[test]
    fn erlang_a_rejects_bad_parameters() {
        for bad in [0.0, -0.5, f64::NAN, f64::INFINITY] {
            assert!(matches!(
                ErlangA::new(1.0, 1.0, bad, 2),
                Err(ErlangError::InvalidRate {
                    name: "abandonment rate",
                    ..
                })
            ));
            assert!(matches!(
                ErlangA::new(bad, 1.0, 1.0, 2),
                Err(ErlangError::InvalidRate {
                    name: "arrival rate",
                    ..
                })
            ));
        }
        assert_eq!(ErlangA::new(1.0, 1.0, 1.0, 0), Err(ErlangError::NoAgents));
        // Any load is fine with abandonment...
        assert!(ErlangA::new(50.0, 1.0, 0.5, 2).is_ok());
        // ...unless patience is so long that the queue settles around a billion callers.
        let err = ErlangA::new(2.0, 1.0, 1e-9, 1).unwrap_err();
        assert!(matches!(err, ErlangError::QueueTooLong { .. }), "{err:?}");
        assert!(err.to_string().contains("abandonment rate"), "{err}");
    }
}
