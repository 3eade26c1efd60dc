//! The `satwatch` command line.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand, ValueEnum};
use std::sync::Arc;

use satwatch::{
    backend::{self, BackendKind, GpuFallback},
    config::Pipeline,
    eval,
    kafka::{replay, topics},
    run,
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
    Replay {
        /// The pipeline file (e.g. pipelines/smap.toml): channels, topics, models, settings.
        #[arg(long)]
        pipeline: PathBuf,
        /// Directory holding <split>/<channel>.npy (e.g. data/smap).
        #[arg(long)]
        data: PathBuf,
        #[arg(long, default_value = "test", value_parser = ["test", "train"])]
        split: String,
        /// Comma-separated channel ids, or `all`.
        #[arg(long, default_value = "all")]
        channels: String,
        /// Samples per second across all channels.
        #[arg(long, conflicts_with = "max_rate")]
        rate: Option<f64>,
        /// As fast as the broker takes them (the default when --rate is absent).
        #[arg(long)]
        max_rate: bool,
        /// At most this many samples per channel.
        #[arg(long)]
        limit: Option<usize>,
        /// First row of each channel to publish.
        #[arg(long, default_value_t = 0)]
        start: usize,
        /// Also publish this many malformed records after each sample, keyed by
        /// its channel on its topic (a flood of bad records: satwatch
        /// dead-letters each as malformed_json). --rate paces samples only.
        #[arg(long, default_value_t = 0)]
        bad_records_per_sample: usize,
    },
    /// Run the streaming detection offline over a labelled split (no Kafka, no
    /// PostgreSQL) and score it against labeled_anomalies.csv: event-level
    /// (telemanom's rules) and point-wise precision, recall and F1, and
    /// detection delays, per channel and in total.
    Eval {
        /// The pipeline file (e.g. pipelines/smap.toml): channels, topics, models, settings.
        #[arg(long)]
        pipeline: PathBuf,
        /// Directory holding <split>/<channel>.npy and labeled_anomalies.csv.
        #[arg(long)]
        data: PathBuf,
        #[arg(long, default_value = "test", value_parser = ["test", "train"])]
        split: String,
        /// Comma-separated channel ids, or `all`.
        #[arg(long, default_value = "all")]
        channels: String,
        /// Also write a markdown summary and one PNG per channel into this directory.
        #[arg(long)]
        report: Option<PathBuf>,
        /// Print the figures as one JSON object on stdout instead of a table.
        #[arg(long)]
        json: bool,
        /// Replace a `[detect]` setting of the pipeline file for this run
        /// (repeatable), with a dotted key, e.g. `--detect burst.threshold=6`: how
        /// training/folds.py tries settings.
        #[arg(long = "detect", value_name = "KEY=VALUE", value_parser = parse_setting)]
        detect: Vec<(String, String)>,
    },
    /// Measure the pipeline in-process: core throughput through window, batcher,
    /// backend and detection; the inference ceiling (the same batches called
    /// directly); and scaling with replicated channels. End-to-end figures over
    /// the broker and PostgreSQL come from scripts/bench.sh. With
    /// --batch-sizes, instead a backend micro-benchmark: one model called
    /// directly at each batch size (throughput and latency). With
    /// --round-trip, instead the broker's own latency, with no pipeline.
    Bench {
        /// The pipeline file (e.g. pipelines/smap.toml): channels, topics, models, settings.
        #[arg(long)]
        pipeline: PathBuf,
        /// Directory holding <split>/<channel>.npy (e.g. data/smap).
        #[arg(long, required_unless_present = "round_trip")]
        data: Option<PathBuf>,
        #[arg(long, default_value = "test", value_parser = ["test", "train"])]
        split: String,
        /// Replica counts to run: each channel repeated under new ids, sharing models.
        #[arg(long, value_delimiter = ',', default_value = "1,10,100")]
        replicas: Vec<usize>,
        /// At most this many rows per channel (keeps large replica runs short).
        #[arg(long)]
        limit: Option<usize>,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
        /// Run every model on this backend instead of the pipeline's
        /// [engine] backend; a GPU backend with no usable GPU is refused,
        /// never replaced.
        #[arg(long, value_enum)]
        backend: Option<BackendKind>,
        /// Inference threads for the pipeline runs (and so for their
        /// ceiling) instead of the pipeline's [engine] backend_threads: on
        /// few cores, whether the engine's own thread shares them.
        #[arg(long)]
        backend_threads: Option<usize>,
        /// Serve every model file as it is on ONNX Runtime, on windows laid
        /// out one by one, instead of the shipped family's row form
        /// ([engine] row_form = false): to measure what the row form gains.
        #[arg(long)]
        model_files: bool,
        /// Backend micro-benchmark at these batch sizes (e.g.
        /// 1,4,16,64,256,1024,4096) instead of the pipeline runs.
        #[arg(long, value_delimiter = ',')]
        batch_sizes: Option<Vec<usize>>,
        /// Channel whose model and test windows the micro-benchmark uses.
        #[arg(long, default_value = "T-1")]
        channel: String,
        /// Micro-benchmark: measure each batch size for at least this long.
        #[arg(long, default_value_t = 1000)]
        min_time_ms: u64,
        /// Instead of the pipeline runs, the broker's own latency: publish
        /// timestamped records at --rate for --seconds, keyed and spread like
        /// `satwatch replay` (to <telemetry topic>.round-trip topics with the
        /// telemetry topics' partitions and replicas), consume them with the
        /// consumer settings `satwatch run` uses, and print publish-to-consume
        /// and publish-to-acknowledge quantiles: the floor under satwatch's
        /// end-to-end latency on this broker.
        #[arg(long)]
        round_trip: bool,
        /// After each pipeline run, satwatch's own latency in process at
        /// these offered loads in samples/s (e.g. 1000,10000,100000): a
        /// sample handed to the engine to its score row reaching the sink,
        /// with no broker and no database.
        #[arg(long, value_delimiter = ',')]
        latency_rates: Vec<f64>,
        /// Latency runs: about this long at each offered load.
        #[arg(long, default_value_t = 5.0)]
        latency_seconds: f64,
        /// Round trip: records per second.
        #[arg(long, default_value_t = 1000.0)]
        rate: f64,
        /// Round trip: how long to publish.
        #[arg(long, default_value_t = 20.0)]
        seconds: f64,
    },
    /// Create satwatch's topics (idempotent): the telemetry topics, anomalies,
    /// forecasts and the dead-letter topic.
    Topics {
        /// The pipeline file (e.g. pipelines/smap.toml): channels, topics, models, settings.
        #[arg(long)]
        pipeline: PathBuf,
        #[arg(long, default_value_t = 3, env = "SATWATCH_PARTITIONS")]
        partitions: i32,
        #[arg(long, default_value_t = 1)]
        replication_factor: i32,
    },
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

/// `KEY=VALUE` as a pair.
fn parse_setting(text: &str) -> Result<(String, String), String> {
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| format!("{text}: expected KEY=VALUE"))?;
    Ok((key.trim().to_owned(), value.trim().to_owned()))
}

fn load_pipeline(path: &std::path::Path) -> Result<Pipeline, String> {
    Pipeline::load(path).map_err(|e| e.to_string())
}

async fn execute(command: Command) -> Result<(), String> {
    match command {
        Command::Run { pipeline } => {
            let pipeline = load_pipeline(&pipeline)?;
            run::run(pipeline)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
        Command::Replay {
            pipeline,
            data,
            split,
            channels,
            rate,
            max_rate: _,
            limit,
            start,
            bad_records_per_sample,
        } => {
            let mut pipeline = load_pipeline(&pipeline)?;
            pipeline.select_channels(&channels)?;
            if rate.is_some_and(|r| !(r > 0.0 && r.is_finite())) {
                return Err("--rate must be a positive number of samples per second".into());
            }
            let options = replay::ReplayOptions {
                split,
                rate,
                limit,
                start,
                bad_records_per_sample,
            };
            let report = replay::replay(&pipeline, &data, &options).await?;
            let secs = report.elapsed.as_secs_f64();
            let samples = report.published.saturating_sub(report.bad);
            println!(
                "replayed {} samples{} from {} channels in {:.1} s ({:.0} samples/s), {} failed",
                samples,
                if report.bad > 0 {
                    format!(" and {} malformed records", report.bad)
                } else {
                    String::new()
                },
                pipeline.channels.len(),
                secs,
                samples as f64 / secs.max(1e-9),
                report.failed
            );
            if report.failed > 0 {
                return Err(format!("{} samples could not be published", report.failed));
            }
            Ok(())
        }
        Command::Eval {
            pipeline,
            data,
            split,
            channels,
            report,
            json,
            detect,
        } => {
            let mut pipeline =
                Pipeline::load_with_detect(&pipeline, &detect).map_err(|e| e.to_string())?;
            pipeline.select_channels(&channels)?;
            let specs = run::load_models(&pipeline).map_err(|e| e.to_string())?;
            let runners = backend::select(&specs, &pipeline.file.engine)
                .map_err(|e| e.to_string())?
                .runners;
            let show_progress = !json && std::io::IsTerminal::is_terminal(&std::io::stderr());
            let (evaluation, traces) =
                eval::evaluate(&pipeline, &specs, runners, &data, &split, show_progress).await?;
            let table = eval::table(&evaluation);
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&evaluation).expect("figures serialise")
                );
            } else {
                print!("{table}");
            }
            if let Some(dir) = report {
                let summary = format!("# satwatch eval\n\n{table}");
                eval::report::write_report(&dir, &summary, &traces)
                    .map_err(|e| format!("cannot write the report to {}: {e}", dir.display()))?;
                eprintln!("report written to {}", dir.join("README.md").display());
            }
            Ok(())
        }
        Command::Bench {
            pipeline,
            data,
            split,
            replicas,
            limit,
            json,
            backend: choice,
            backend_threads,
            model_files,
            batch_sizes,
            channel,
            min_time_ms,
            round_trip,
            latency_rates,
            latency_seconds,
            rate,
            seconds,
        } => {
            let mut pipeline = load_pipeline(&pipeline)?;
            if round_trip {
                let figures =
                    satwatch::kafka::round_trip::measure(&pipeline, rate, seconds).await?;
                print_round_trip(&figures, json);
                return Ok(());
            }
            let data = data.expect("clap requires --data without --round-trip");
            if let Some(choice) = choice {
                pipeline.file.engine.backend = choice;
                // A benchmark of a GPU backend must not quietly measure the CPU.
                pipeline.file.engine.gpu_fallback = GpuFallback::Refuse;
            }
            if let Some(threads) = backend_threads {
                if threads == 0 {
                    return Err("--backend-threads must be at least 1".into());
                }
                pipeline.file.engine.backend_threads = threads;
            }
            if model_files {
                pipeline.file.engine.row_form = false;
            }
            if let Some(sizes) = batch_sizes {
                pipeline.select_channels(&channel)?;
                return micro_bench(&pipeline, &data, &split, &sizes, min_time_ms, json);
            }
            let specs = run::load_models(&pipeline).map_err(|e| e.to_string())?;
            let runners = backend::select(&specs, &pipeline.file.engine)
                .map_err(|e| e.to_string())?
                .runners;
            let window = specs.iter().map(|s| s.window).max().unwrap_or(0);
            if limit.is_some_and(|rows| rows <= window) {
                return Err(format!(
                    "--limit must be above the models' window ({window} rows): with fewer rows per \
                     channel no window fills and nothing is inferred"
                ));
            }
            let mut base = Vec::with_capacity(pipeline.channels.len());
            for channel in &pipeline.channels {
                let features = satwatch::repository::model_features(&specs, &channel.model);
                let loaded = satwatch::dataset::load_channel(&data, &split, &channel.id, features)
                    .map_err(|e| e.to_string())?;
                let rows = limit.unwrap_or(usize::MAX).min(loaded.values.nrows());
                base.push(Arc::new(
                    loaded.values.slice(ndarray::s![..rows, ..]).to_owned(),
                ));
            }
            if let Some(rate) = latency_rates.iter().find(|r| !(r.is_finite() && **r > 0.0)) {
                return Err(format!("--latency-rates: {rate} is not a positive rate"));
            }
            let mut runs = Vec::new();
            let mut latencies = Vec::new();
            for &n in &replicas {
                let replicated = satwatch::bench::replicate(&pipeline, n);
                let inputs: Vec<_> = (0..n.max(1)).flat_map(|_| base.iter().cloned()).collect();
                let result = satwatch::bench::measure(
                    &replicated,
                    &specs,
                    runners.clone(),
                    inputs.clone(),
                    n,
                )
                .await?;
                if !json {
                    eprintln!(
                        "{:>5} channels: {:>9.0} samples/s, {:>9.0} windows/s ({:.0}% of the {:.0} windows/s ceiling), {:.0}% in inference, {:.0}% laying out windows, mean batch {:.1}, {:.0} B/channel, {:.0} samples/s with free models",
                        result.channels, result.samples_per_s, result.windows_per_s, 100.0 * result.ratio_to_ceiling,
                        result.ceiling_windows_per_s, 100.0 * result.inference_share, 100.0 * result.layout_share, result.mean_batch_size, result.bytes_per_channel,
                        result.free_model_samples_per_s
                    );
                }
                runs.push(result);
                for &rate in &latency_rates {
                    let figures = satwatch::bench::measure_latency(
                        &replicated,
                        &specs,
                        runners.clone(),
                        &inputs,
                        rate,
                        latency_seconds,
                    )
                    .await?;
                    if !json {
                        eprintln!(
                            "{:>5} channels at {:>7.0} samples/s offered ({:.0} achieved): own latency p50 {:.2} / p99 {:.2} / p99.9 {:.2} / max {:.2} ms over {} scores",
                            figures.channels, figures.samples_per_s, figures.achieved_samples_per_s,
                            figures.latency.p50_ms, figures.latency.p99_ms, figures.latency.p999_ms, figures.latency.max_ms, figures.scored
                        );
                    }
                    latencies.push(figures);
                }
            }
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "runs": runs, "latency": latencies })
                );
            }
            Ok(())
        }
        Command::Topics {
            pipeline,
            partitions,
            replication_factor,
        } => {
            let pipeline = load_pipeline(&pipeline)?;
            if partitions < 1 {
                return Err("--partitions must be >= 1".into());
            }
            let (created, existing) = topics::create_topics(
                &pipeline.file.kafka,
                &pipeline.all_topics(),
                partitions,
                replication_factor,
            )
            .await?;
            println!(
                "topics created: {}; already present: {}",
                list(&created),
                list(&existing)
            );
            Ok(())
        }
    }
}

/// `satwatch bench --batch-sizes ...`: one model on its selected backend.
fn micro_bench(
    pipeline: &Pipeline,
    data: &std::path::Path,
    split: &str,
    sizes: &[usize],
    min_time_ms: u64,
    json: bool,
) -> Result<(), String> {
    let specs = run::load_models(pipeline).map_err(|e| e.to_string())?;
    let selection = backend::select(&specs, &pipeline.file.engine).map_err(|e| e.to_string())?;
    let spec = &specs[0];
    let placement = &selection.placements[0];
    let loaded =
        satwatch::dataset::load_channel(data, split, &pipeline.channels[0].id, spec.features)
            .map_err(|e| e.to_string())?;
    let rows = satwatch::bench::real_rows(&loaded.values, spec)?;
    let runner = &selection.runners[0];
    let figures = satwatch::bench::sweep(
        runner.backend.as_ref(),
        runner.index,
        &rows,
        spec.window,
        spec.features,
        sizes,
        std::time::Duration::from_millis(min_time_ms),
    )?;
    if json {
        println!(
            "{}",
            serde_json::json!({ "model": spec.name, "backend": placement.backend, "batches": figures })
        );
        return Ok(());
    }
    println!(
        "backend {} · model {} · one thread, back-to-back calls, real {split} windows",
        placement.backend, spec.name
    );
    println!(
        "{:>6} {:>8} {:>12} {:>14} {:>10} {:>10} {:>10} {:>10}",
        "batch", "calls", "windows/s", "at p50 (w/s)", "mean ms", "p50 ms", "p99 ms", "max ms"
    );
    for f in &figures {
        println!(
            "{:>6} {:>8} {:>12.0} {:>14.0} {:>10.4} {:>10.4} {:>10.4} {:>10.4}",
            f.batch_size,
            f.calls,
            f.windows_per_s,
            f.p50_windows_per_s,
            f.mean_ms,
            f.p50_ms,
            f.p99_ms,
            f.max_ms
        );
    }
    Ok(())
}

/// `satwatch bench --round-trip`.
fn print_round_trip(figures: &satwatch::kafka::round_trip::RoundTrip, json: bool) {
    if json {
        println!("{}", serde_json::json!(figures));
        return;
    }
    let q = |q: &satwatch::kafka::round_trip::Quantiles| {
        format!(
            "p50 {:.1} / p99 {:.1} / p99.9 {:.1} / max {:.1} ms",
            q.p50_ms, q.p99_ms, q.p999_ms, q.max_ms
        )
    };
    println!(
        "broker round trip, no pipeline: {} records offered at {:.0}/s ({:.0}/s achieved) over {} topics, {} partitions",
        figures.published, figures.offered_per_s, figures.achieved_per_s, figures.topics, figures.partitions
    );
    println!("  publish -> acknowledged: {}", q(&figures.acknowledge));
    println!(
        "  publish -> consumed:     {} ({} of {} consumed)",
        q(&figures.consume),
        figures.consumed,
        figures.published
    );
}

fn list(topics: &[String]) -> String {
    if topics.is_empty() {
        "none".into()
    } else {
        topics.join(", ")
    }
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
