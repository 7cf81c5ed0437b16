//! The `switchboard` command line: `run` the daemon, `check-config`, and `simulate` a day of routing.
//! `anyhow` lives only here, at the binary's edge.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use switchboard::config;
use switchboard::daemon::{self, ConfigSource};
use switchboard::sim::{self, Scenario};
use switchboard::store::postgres::PostgresStore;

// The daemon allocates many small short-lived buffers per message (JSON documents, SQL
// parameters, HTTP frames); mimalloc spends about a third fewer instructions on them than the
// system allocator (docs/BENCHMARKS.md, "Daemon HTTP ingest"). Built with `no_thp`: asked for
// transparent huge pages, mimalloc's freed and reused memory came back as fresh 2 MiB pages the
// kernel zeroed, a quarter of the daemon's CPU under SMTP load (docs/BENCHMARKS.md, "SMTP intake").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Omnichannel contact-centre router.
#[derive(Debug, Parser)]
#[command(name = "switchboard", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon (embedded defaults: SQLite file, in-process bus, HTTP on 127.0.0.1:8080).
    Run(RunArgs),
    /// Validate the configuration and print the effective one, secrets masked.
    CheckConfig(ConfigArgs),
    /// Run the real router over a scenario in virtual time and report ASA, service level,
    /// abandonment, occupancy and waits by priority.
    Simulate(SimulateArgs),
}

#[derive(Debug, Args)]
struct ConfigArgs {
    /// A configuration file layered over the embedded defaults (environment SWITCHBOARD__* wins).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Args)]
struct RunArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Log format (overrides log.format).
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
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
        Command::Run(args) => run(&args),
        Command::CheckConfig(args) => check_config(&args),
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

/// The process environment, read once here and passed down.
fn environment() -> Vec<(String, String)> {
    std::env::vars().collect()
}

fn check_config(args: &ConfigArgs) -> anyhow::Result<()> {
    let settings =
        config::load(args.config.as_deref(), environment()).context("invalid configuration")?;
    if let config::StoreSettings::Postgres(options) = &settings.store {
        // A wrong URL, password or database fails here, not at the first start.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the async runtime")?;
        runtime
            .block_on(PostgresStore::check_connection(options))
            .context("store.url")?;
    }
    print!("{}", settings.effective_toml());
    for warning in settings.routing.warnings() {
        eprintln!("warning: {warning}");
    }
    eprintln!(
        "configuration ok: {} queues, {} rules, {} agents",
        settings.routing.queues.len(),
        settings.routing.rules.len(),
        settings.routing.agents.len()
    );
    Ok(())
}

fn init_logging(settings: &config::Settings, format: Option<LogFormat>) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&settings.log.level));
    let json = match format {
        Some(LogFormat::Json) => true,
        Some(LogFormat::Text) => false,
        None => settings.log.format == "json",
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn run(args: &RunArgs) -> anyhow::Result<()> {
    let environment = environment();
    let settings = config::load(args.config.config.as_deref(), environment.clone())
        .context("invalid configuration")?;
    init_logging(&settings, args.log_format);
    for warning in settings.routing.warnings() {
        tracing::warn!("configuration: {warning}");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let mut terminate = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
        let mut interrupt = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
        let mut hangup = signal(SignalKind::hangup()).context("cannot listen for SIGHUP")?;
        let source = ConfigSource { file: args.config.config.clone(), environment };
        let running = daemon::start(settings, source).await.context("cannot start switchboard")?;
        // Scripts and tests wait for this line instead of polling (other listeners come first).
        if let Some(smtp) = running.smtp_addr {
            println!("smtp listening on {smtp}");
        }
        println!("listening on http://{}", running.local_addr);
        loop {
            tokio::select! {
                _ = terminate.recv() => break,
                _ = interrupt.recv() => break,
                _ = hangup.recv() => match running.reload().await {
                    Ok(()) => tracing::info!("SIGHUP: configuration reloaded"),
                    Err(error) => tracing::error!(%error, "SIGHUP: configuration refused; the old one stays"),
                },
            }
        }
        running.shutdown().await;
        Ok(())
    })
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
