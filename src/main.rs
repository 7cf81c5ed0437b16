//! The `switchboard` command line: `simulate` today; the daemon's `run` and `check-config` join it later.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use switchboard::sim::{self, Scenario};

/// Omnichannel contact-centre router.
#[derive(Debug, Parser)]
#[command(name = "switchboard", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the real router over a scenario in virtual time and report ASA, service level,
    /// abandonment, occupancy and waits by priority.
    Simulate(SimulateArgs),
}

#[derive(Debug, Args)]
struct SimulateArgs {
    /// The scenario file (TOML; see docs/SIMULATOR.md and config/scenarios/).
    #[arg(long, value_name = "FILE")]
    scenario: PathBuf,
    /// Print the report as one JSON object instead of tables.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Simulate(args) => simulate(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // `{:#}` prints the context chain on one line, without a backtrace.
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn simulate(args: &SimulateArgs) -> anyhow::Result<()> {
    let scenario = Scenario::load(&args.scenario)
        .with_context(|| format!("cannot use scenario {}", args.scenario.display()))?;
    let show_progress = !args.json && std::io::stderr().is_terminal();
    let bar = if show_progress {
        let total_hours = scenario.duration.0.div_ceil(3_600_000);
        let bar = ProgressBar::with_draw_target(Some(total_hours), ProgressDrawTarget::stderr());
        let style = ProgressStyle::with_template(
            "{spinner} simulating [{bar:40}] {pos}/{len} h virtual time, {msg} ({elapsed}, eta {eta})",
        )
        .map(|style| style.progress_chars("=> "))
        .unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style);
        Some(bar)
    } else {
        None
    };
    let started = Instant::now();
    let report = sim::run_with_progress(&scenario, &mut |progress| {
        if let Some(bar) = &bar {
            bar.set_position(
                (progress.now.0 / 3_600_000).min(progress.duration.0.div_ceil(3_600_000)),
            );
            bar.set_message(format!("{} arrivals", progress.arrivals));
        }
    })
    .with_context(|| format!("simulating {}", args.scenario.display()))?;
    let elapsed = started.elapsed();
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.to_text());
        if std::io::stderr().is_terminal() {
            eprintln!("\n(simulated in {:.2} s)", elapsed.as_secs_f64());
        }
    }
    Ok(())
}
