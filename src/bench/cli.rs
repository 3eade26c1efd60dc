//! The `satwatch bench` subcommands, one per thing measured: `pipeline` (the
//! engine in process), `backend` (one model by batch size) and `broker` (the
//! broker's own round trip). Each reads its options, runs the measurement of
//! [`super`] or [`crate::kafka::round_trip`] and prints the figures, as a table on
//! the terminal or as one JSON object with `--json` (what `scripts/bench.sh`
//! and `scripts/gpu_check.sh` read).

use std::{path::PathBuf, sync::Arc, time::Duration};

use clap::{Args, Subcommand};

use super::BenchError;
use crate::{
    backend::{self, BackendKind, GpuFallback},
    config::Pipeline,
    dataset,
    kafka::round_trip::{self, Quantiles, RoundTrip},
    repository, run,
};

#[derive(Subcommand)]
pub enum BenchCommand {
    /// The pipeline in process, with no broker and no database: core
    /// throughput through window, batcher, backend and detection; the
    /// inference ceiling (the very batches the batcher formed, called
    /// directly on the backend); the pipeline with models that cost nothing;
    /// and scaling with every channel replicated. With --latency-rates, also
    /// satwatch's own latency at those offered loads. End-to-end figures over
    /// the broker and PostgreSQL come from scripts/bench.sh.
    Pipeline(PipelineArgs),
    /// One model called directly at each batch size, on one thread, back to
    /// back, on real windows of its channel: throughput and latency per call.
    Backend(BackendArgs),
    /// The broker's own latency, with no pipeline: publish timestamped
    /// records at --rate for --seconds, keyed and spread like `satwatch
    /// replay` (to <telemetry topic>.round-trip topics with the telemetry
    /// topics' partitions and replicas), consume them with the consumer
    /// settings `satwatch run` uses, and print publish-to-consume and
    /// publish-to-acknowledge quantiles: the floor under satwatch's
    /// end-to-end latency on this broker. Needs `satwatch topics` first.
    Broker(BrokerArgs),
}

/// Where the data comes from, for the measurements that read it.
#[derive(Args)]
pub struct DataArgs {
    /// The pipeline file (e.g. pipelines/smap.toml): channels, models, settings.
    #[arg(long)]
    pub pipeline: PathBuf,
    /// Directory holding <split>/<channel>.npy (e.g. data/smap).
    #[arg(long)]
    pub data: PathBuf,
    /// Which split of the data to stream.
    #[arg(long, default_value = "test", value_parser = ["test", "train"])]
    pub split: String,
}

/// What to serve the models on, instead of the pipeline file's `[engine]`.
#[derive(Args)]
pub struct EngineArgs {
    /// Run every model on this backend instead of the pipeline's [engine]
    /// backend; a GPU backend with no usable GPU is refused, never replaced.
    #[arg(long, value_enum)]
    pub backend: Option<BackendKind>,
    /// Serve every model file as it is on ONNX Runtime, on windows laid
    /// out one by one, instead of the shipped family's row form
    /// ([engine] row_form = false): to measure what the row form gains.
    #[arg(long)]
    pub model_files: bool,
}

impl EngineArgs {
    fn apply(&self, pipeline: &mut Pipeline) {
        if let Some(choice) = self.backend {
            pipeline.file.engine.backend = choice;
            // A benchmark of a GPU backend must not quietly measure the CPU.
            pipeline.file.engine.gpu_fallback = GpuFallback::Refuse;
        }
        if self.model_files {
            pipeline.file.engine.row_form = false;
        }
    }
}

#[derive(Args)]
pub struct PipelineArgs {
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Replica counts to run: each channel repeated under new ids, sharing models.
    #[arg(long, value_delimiter = ',', default_value = "1,10,100")]
    pub replicas: Vec<usize>,
    /// At most this many rows per channel (keeps large replica runs short).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Inference threads for the runs (and so for their ceiling) instead of
    /// the pipeline's [engine] backend_threads: on few cores, whether the
    /// engine's own thread shares them.
    #[arg(long)]
    pub backend_threads: Option<usize>,
    /// After each run, satwatch's own latency in process at these offered
    /// loads in samples/s (e.g. 1000,10000,100000): a sample handed to the
    /// engine to its score row reaching the sink, with no broker and no
    /// database.
    #[arg(long, value_delimiter = ',')]
    pub latency_rates: Vec<f64>,
    /// Latency runs: about this long at each offered load.
    #[arg(long, default_value_t = 5.0)]
    pub latency_seconds: f64,
    /// Print one JSON object ({"runs": [...], "latency": [...]}) instead of
    /// a line per run on stderr.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct BackendArgs {
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
    /// The batch sizes to measure (e.g. 1,4,16,64,256,1024,4096).
    #[arg(long, value_delimiter = ',', required = true)]
    pub batch_sizes: Vec<usize>,
    /// Channel whose model and test windows are used.
    #[arg(long, default_value = "T-1")]
    pub channel: String,
    /// Measure each batch size for at least this long.
    #[arg(long, default_value_t = 1000)]
    pub min_time_ms: u64,
    /// Print one JSON object ({"model", "backend", "batches": [...]})
    /// instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct BrokerArgs {
    /// The pipeline file (e.g. pipelines/smap.toml): the broker, the
    /// telemetry topics and the channels whose keys are used.
    #[arg(long)]
    pub pipeline: PathBuf,
    /// Records per second.
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    /// How long to publish.
    #[arg(long, default_value_t = 20.0)]
    pub seconds: f64,
    /// Print one JSON object instead of the quantiles as text.
    #[arg(long)]
    pub json: bool,
}

/// Runs one `satwatch bench` subcommand and prints its figures.
pub async fn command(command: BenchCommand) -> Result<(), BenchError> {
    match command {
        BenchCommand::Pipeline(args) => pipeline(args).await,
        BenchCommand::Backend(args) => backend(args),
        BenchCommand::Broker(args) => broker(args).await,
    }
}

fn load_pipeline(path: &std::path::Path) -> Result<Pipeline, BenchError> {
    Ok(Pipeline::load(path)?)
}

/// `satwatch bench pipeline`: every replica count, then its latency runs.
async fn pipeline(args: PipelineArgs) -> Result<(), BenchError> {
    let mut pipeline = load_pipeline(&args.data.pipeline)?;
    args.engine.apply(&mut pipeline);
    if let Some(threads) = args.backend_threads {
        if threads == 0 {
            return Err(BenchError::Usage(
                "--backend-threads must be at least 1".into(),
            ));
        }
        pipeline.file.engine.backend_threads = threads;
    }
    let specs = run::load_models(&pipeline)?;
    let runners = backend::select(&specs, &pipeline.file.engine)?.runners;
    let window = specs.iter().map(|s| s.window).max().unwrap_or(0);
    if args.limit.is_some_and(|rows| rows <= window) {
        return Err(BenchError::Usage(format!(
            "--limit must be above the models' window ({window} rows): with fewer rows per \
             channel no window fills and nothing is inferred"
        )));
    }
    let mut base = Vec::with_capacity(pipeline.channels.len());
    for channel in &pipeline.channels {
        let features = repository::model_features(&specs, &channel.model);
        let loaded =
            dataset::load_channel(&args.data.data, &args.data.split, &channel.id, features)?;
        let rows = args.limit.unwrap_or(usize::MAX).min(loaded.values.nrows());
        base.push(Arc::new(
            loaded.values.slice(ndarray::s![..rows, ..]).to_owned(),
        ));
    }
    if let Some(rate) = args
        .latency_rates
        .iter()
        .find(|r| !(r.is_finite() && **r > 0.0))
    {
        return Err(BenchError::Usage(format!(
            "--latency-rates: {rate} is not a positive rate"
        )));
    }
    let mut runs = Vec::new();
    let mut latencies = Vec::new();
    for &n in &args.replicas {
        let replicated = super::replicate(&pipeline, n);
        let inputs: Vec<_> = (0..n.max(1)).flat_map(|_| base.iter().cloned()).collect();
        let result =
            super::measure(&replicated, &specs, runners.clone(), inputs.clone(), n).await?;
        if !args.json {
            eprintln!(
                "{:>5} channels: {:>9.0} samples/s, {:>9.0} windows/s ({:.0}% of the {:.0} windows/s ceiling), {:.0}% in inference, {:.0}% laying out windows, mean batch {:.1}, {:.0} B/channel, {:.0} samples/s with free models",
                result.channels, result.samples_per_s, result.windows_per_s, 100.0 * result.ratio_to_ceiling,
                result.ceiling_windows_per_s, 100.0 * result.inference_share, 100.0 * result.layout_share, result.mean_batch_size, result.bytes_per_channel,
                result.free_model_samples_per_s
            );
        }
        runs.push(result);
        for &rate in &args.latency_rates {
            let figures = super::measure_latency(
                &replicated,
                &specs,
                runners.clone(),
                &inputs,
                rate,
                args.latency_seconds,
            )
            .await?;
            if !args.json {
                eprintln!(
                    "{:>5} channels at {:>7.0} samples/s offered ({:.0} achieved): own latency p50 {:.2} / p99 {:.2} / p99.9 {:.2} / max {:.2} ms over {} scores",
                    figures.channels, figures.samples_per_s, figures.achieved_samples_per_s,
                    figures.latency.p50_ms, figures.latency.p99_ms, figures.latency.p999_ms, figures.latency.max_ms, figures.scored
                );
            }
            latencies.push(figures);
        }
    }
    if args.json {
        println!(
            "{}",
            serde_json::json!({ "runs": runs, "latency": latencies })
        );
    }
    Ok(())
}

/// `satwatch bench backend`: one model on its selected backend.
fn backend(args: BackendArgs) -> Result<(), BenchError> {
    let mut pipeline = load_pipeline(&args.data.pipeline)?;
    args.engine.apply(&mut pipeline);
    pipeline.select_channels(&args.channel)?;
    let specs = run::load_models(&pipeline)?;
    let selection = backend::select(&specs, &pipeline.file.engine)?;
    let spec = &specs[0];
    let placement = &selection.placements[0];
    let split = &args.data.split;
    let loaded = dataset::load_channel(
        &args.data.data,
        split,
        &pipeline.channels[0].id,
        spec.features,
    )?;
    let rows = super::real_rows(&loaded.values, spec)?;
    let runner = &selection.runners[0];
    let figures = super::sweep(
        runner.backend.as_ref(),
        runner.index,
        &rows,
        spec.window,
        spec.features,
        &args.batch_sizes,
        Duration::from_millis(args.min_time_ms),
    )?;
    if args.json {
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

/// `satwatch bench broker`.
async fn broker(args: BrokerArgs) -> Result<(), BenchError> {
    let pipeline = load_pipeline(&args.pipeline)?;
    let figures = round_trip::measure(&pipeline, args.rate, args.seconds).await?;
    if args.json {
        println!("{}", serde_json::json!(figures));
    } else {
        print_round_trip(&figures);
    }
    Ok(())
}

fn print_round_trip(figures: &RoundTrip) {
    let q = |q: &Quantiles| {
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
