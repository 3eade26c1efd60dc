//! The `satwatch` command line: parses the arguments, sets up logging and
//! the async runtime, and hands each subcommand to the library module that
//! owns it (its options, its work and what it prints live there).

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand, ValueEnum};

use satwatch::{
    bench,
    config::Pipeline,
    eval,
    kafka::{replay, topics},
    plan, run,
};

#[derive(Parser)]
#[command(
    name = "satwatch",
    version,
    about = "Watches spacecraft telemetry for anomalies as it streams."
)]
struct Cli {
    /// Log format: human-readable text or one JSON object per line.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "SATWATCH_LOG_FORMAT"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the streaming pipeline: Kafka in, inference, anomaly events and
    /// forecasts out to Kafka and PostgreSQL. Stops cleanly on SIGINT/SIGTERM.
    #[command(after_help = "\
The environment overrides the pipeline file where a deployment differs:
  SATWATCH_BROKERS           Kafka bootstrap servers
  DATABASE_URL               PostgreSQL URL (sslmode=disable|prefer|require)
  PGSSLROOTCERT, PGSSLCERT, PGSSLKEY
                             CA to verify PostgreSQL against; client certificate and key
  SATWATCH_HTTP_ADDR         metrics, health, model metadata and repository control
  SATWATCH_REPOSITORY_TOKEN  bearer token that enables POST /v2/repository/models/{m}/load|unload
  ORT_DYLIB_PATH             ONNX Runtime's libonnxruntime.so (scripts/setup.sh installs one)
  RUST_LOG                   log filter (default info)

Several instances with the same [kafka] group_id share the partitions; each channel resumes
from its checkpoint in PostgreSQL after a crash, restart or rebalance.")]
    Run {
        /// The pipeline file (e.g. pipelines/smap.toml).
        #[arg(long)]
        pipeline: PathBuf,
    },
    /// Publish historical samples to the telemetry topics (also a load generator).
    Replay(replay::ReplayArgs),
    /// Run the streaming detection offline over a labelled split (no Kafka, no
    /// PostgreSQL) and score it against labeled_anomalies.csv: event-level
    /// (telemanom's rules) and point-wise precision, recall and F1, and
    /// detection delays, per channel and in total.
    Eval(eval::EvalArgs),
    /// Measure satwatch: the pipeline in process, one backend by batch size,
    /// or the broker alone. scripts/bench.sh runs them all, with the
    /// end-to-end figures over a real broker and PostgreSQL, and writes
    /// BENCHMARKS.md.
    #[command(subcommand)]
    Bench(bench::cli::BenchCommand),
    /// Show what the pipeline file and its model repository amount to: each
    /// channel's subsystem, topic, model, window, horizon and width, the
    /// models' batching and the topics; with --data, each channel's rows and
    /// the score rows a replay of them gives. What the scripts read (--json)
    /// instead of parsing the files themselves.
    Plan(plan::PlanArgs),
    /// Create satwatch's topics (idempotent): the telemetry topics, anomalies,
    /// forecasts and the dead-letter topic.
    Topics(topics::TopicsArgs),
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rdkafka=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Runs the subcommand. Each module's error is typed; here, at the edge,
/// only its message is left to print, so anyhow carries it.
async fn execute(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run { pipeline } => {
            run::run(Pipeline::load(&pipeline)?).await?;
        }
        Command::Replay(args) => replay::command(args).await?,
        Command::Eval(args) => eval::command(args).await?,
        Command::Bench(command) => bench::cli::command(command).await?,
        Command::Plan(args) => plan::command(args)?,
        Command::Topics(args) => topics::command(args).await?,
    }
    Ok(())
}

/// Async worker threads: `TOKIO_WORKER_THREADS` when set, else one fewer
/// than the cores (at least one). The heavy work runs on the inference
/// threads, outside the runtime; the async side (source, engine, sink, HTTP)
/// needs little, and on two cores a second worker only moved the engine and
/// the tasks feeding it onto different threads, waking each other across
/// cores: `satwatch bench` ran 3 % faster with one.
fn async_workers() -> usize {
    std::env::var("TOKIO_WORKER_THREADS")
        .ok()
        .and_then(|n| n.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, |n| n.get().saturating_sub(1).max(1))
        })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(async_workers())
        .enable_all()
        .build()
        .expect("a Tokio runtime starts");
    match runtime.block_on(execute(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("satwatch: {err}");
            ExitCode::FAILURE
        }
    }
}
