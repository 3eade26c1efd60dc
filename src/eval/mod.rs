//! `satwatch eval`: the streaming detection run offline over a labelled split.
//!
//! Samples from the `.npy` files go through the very code `satwatch run`
//! uses from the window on (engine, batcher, backend pool, detector); only
//! Kafka and PostgreSQL are replaced by in-process channels. Detected events
//! are then scored against `labeled_anomalies.csv`.

pub mod metrics;
pub mod report;

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::{
    backend::Runner,
    config::Pipeline,
    dataset::{self, Labels},
    detect::Cause,
    engine::EventState,
    offline,
    repository::{self, ModelSpec},
};
use metrics::{Counts, Scores};
pub use report::ChannelTrace;

/// Why a evaluation could not run, by kind.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// The pipeline file or a model's `config.pbtxt` was refused.
    #[error(transparent)]
    File(#[from] crate::file_error::FileError),
    /// The dataset could not be read.
    #[error(transparent)]
    Data(#[from] crate::dataset::DataError),
    #[error(transparent)]
    Backend(#[from] crate::backend::BackendError),
    #[error(transparent)]
    Engine(#[from] crate::engine::EngineError),
    #[error(transparent)]
    Process(#[from] crate::processor::ProcessError),
    /// The report (markdown and plots) could not be written.
    #[error("cannot write the report: {0}")]
    Report(String),
    /// What was asked cannot be done as asked (a bad option, too few rows).
    #[error("{0}")]
    Usage(String),
}

impl EvalError {
    /// The error's kind, for metric labels and log fields.
    pub fn error_type(&self) -> &'static str {
        match self {
            EvalError::File(e) => e.error_type(),
            EvalError::Data(_) => "data",
            EvalError::Backend(_) => "backend",
            EvalError::Engine(e) => e.error_type(),
            EvalError::Process(e) => e.error_type(),
            EvalError::Report(_) => "report",
            EvalError::Usage(_) => "usage",
        }
    }
}

/// One channel's figures.
#[derive(Debug, Clone, Serialize)]
pub struct ChannelFigures {
    pub channel: String,
    pub rows: u64,
    pub labelled_ranges: usize,
    pub detected_events: usize,
    pub events: Counts,
    pub event_scores: Scores,
    pub points: Counts,
    pub point_scores: Scores,
    pub points_adjusted: Counts,
    pub point_adjusted_scores: Scores,
    /// Samples from each detected labelled range's start to its first alarm.
    pub delays: Vec<u64>,
    /// Fc1: event recall with point precision (None without labelled ranges).
    pub fc1: Option<f64>,
    /// Samples inside detected events, and inside labelled ranges.
    pub flagged_samples: u64,
    pub labelled_samples: u64,
    /// Flagged samples per labelled sample (None without labelled samples).
    pub coverage: Option<f64>,
    /// The share of the stream inside detected events.
    pub flagged_fraction: f64,
}

/// One detected event, as an operator reads it.
#[derive(Debug, Clone, Serialize)]
pub struct EventRecord {
    pub channel: String,
    /// First and last anomalous sample (an event open at the end of the
    /// data ends at its last row).
    pub start: u64,
    pub end: u64,
    /// The score part that opened it.
    pub cause: Option<Cause>,
    /// The labelled range `[start, end)` it overlaps, if any.
    pub matched: Option<(u64, u64)>,
}

/// Totals over the channels: counts summed, then scores computed.
#[derive(Debug, Clone, Serialize)]
pub struct Totals {
    pub channels: usize,
    pub samples: u64,
    pub labelled_ranges: usize,
    pub detected_events: usize,
    pub events: Counts,
    pub event_scores: Scores,
    pub points: Counts,
    pub point_scores: Scores,
    pub points_adjusted: Counts,
    pub point_adjusted_scores: Scores,
    /// Fc1 over the pooled counts, and the mean of the channels' Fc1 (over
    /// channels with labelled ranges).
    pub fc1_pooled: Option<f64>,
    pub fc1_channel_mean: Option<f64>,
    pub flagged_samples: u64,
    pub labelled_samples: u64,
    /// Flagged samples per labelled sample, over all channels.
    pub coverage: Option<f64>,
    /// Channels whose events cover more than half their stream, and of
    /// those, the ones whose labels cover less than a tenth of it.
    pub channels_flagged_over_half: Vec<String>,
    pub channels_flagged_over_half_unlabelled: Vec<String>,
    /// Detected events by the part that opened them.
    pub events_by_cause: std::collections::BTreeMap<String, usize>,
    pub mean_delay: Option<f64>,
    pub median_delay: Option<u64>,
    pub p90_delay: Option<u64>,
    pub elapsed_s: f64,
    pub samples_per_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Evaluation {
    pub split: String,
    pub totals: Totals,
    pub channels: Vec<ChannelFigures>,
    pub events: Vec<EventRecord>,
}

/// What the offline run produced for one channel.
struct ChannelRun {
    values: Vec<f32>,
    forecast: Vec<Option<f32>>,
    score: Vec<Option<f32>>,
    threshold: Vec<Option<f32>>,
    /// Detected events `[start, end]` and their causes; an event still open
    /// at the end of the data ends at the last row.
    events: Vec<(u64, u64)>,
    causes: Vec<Option<Cause>>,
    open_since: Option<(u64, Option<Cause>)>,
}

/// `satwatch eval`'s options.
#[derive(clap::Args)]
pub struct EvalArgs {
    /// The pipeline file (e.g. pipelines/smap.toml): channels, topics, models, settings.
    #[arg(long)]
    pub pipeline: PathBuf,
    /// Directory holding <split>/<channel>.npy and labeled_anomalies.csv.
    #[arg(long)]
    pub data: PathBuf,
    /// Which split to evaluate (labeled_anomalies.csv labels the test split).
    #[arg(long, default_value = "test", value_parser = ["test", "train"])]
    pub split: String,
    /// Comma-separated channel ids, or `all`.
    #[arg(long, default_value = "all")]
    pub channels: String,
    /// Also write a markdown summary and one PNG per channel into this directory.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Print the figures as one JSON object on stdout instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Replace a `[detect]` setting of the pipeline file for this run
    /// (repeatable), with a dotted key, e.g. `--detect burst.threshold=6`: how
    /// training/folds.py tries settings.
    #[arg(long = "detect", value_name = "KEY=VALUE", value_parser = parse_setting)]
    pub detect: Vec<(String, String)>,
}

/// `KEY=VALUE` as a pair.
fn parse_setting(text: &str) -> Result<(String, String), EvalError> {
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| EvalError::Usage(format!("{text}: expected KEY=VALUE")))?;
    Ok((key.trim().to_owned(), value.trim().to_owned()))
}

/// `satwatch eval`: loads the pipeline with its `--detect` overrides, runs
/// [`evaluate`] on the backend the pipeline selects, prints the table (or the
/// JSON) and writes the report when asked.
pub async fn command(args: EvalArgs) -> Result<(), EvalError> {
    let mut pipeline = Pipeline::load_with_detect(&args.pipeline, &args.detect)?;
    pipeline.select_channels(&args.channels)?;
    let specs: Vec<Arc<ModelSpec>> =
        repository::load_models(&pipeline.repository, &pipeline.models())?
            .into_iter()
            .map(Arc::new)
            .collect();
    let runners = crate::backend::select(&specs, &pipeline.file.engine)?.runners;
    // A progress bar only where someone watches it, never in JSON runs.
    let show_progress = !args.json && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let (evaluation, traces) = evaluate(
        &pipeline,
        &specs,
        runners,
        &args.data,
        &args.split,
        show_progress,
    )
    .await?;
    let table = table(&evaluation);
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&evaluation).expect("figures serialise")
        );
    } else {
        print!("{table}");
    }
    if let Some(dir) = args.report {
        let summary = format!("# satwatch eval\n\n{table}");
        report::write_report(&dir, &summary, &traces)
            .map_err(|e| EvalError::Report(format!("{}: {e}", dir.display())))?;
        eprintln!("report written to {}", dir.join("README.md").display());
    }
    Ok(())
}

/// Runs detection over `split` for the pipeline's channels and scores it.
pub async fn evaluate(
    pipeline: &Pipeline,
    specs: &[Arc<ModelSpec>],
    runners: Vec<Runner>,
    data: &Path,
    split: &str,
    show_progress: bool,
) -> Result<(Evaluation, Vec<ChannelTrace>), EvalError> {
    let labels = dataset::load_labels(&data.join("labeled_anomalies.csv"))?;
    let labels: HashMap<&str, &Labels> = labels.iter().map(|l| (l.channel.as_str(), l)).collect();
    let mut inputs = Vec::with_capacity(pipeline.channels.len());
    for channel in &pipeline.channels {
        let features = crate::repository::model_features(specs, &channel.model);
        let loaded = dataset::load_channel(data, split, &channel.id, features)?;
        if split == "test" && !labels.contains_key(channel.id.as_str()) {
            return Err(EvalError::Usage(format!(
                "channel {} has no row in labeled_anomalies.csv",
                channel.id
            )));
        }
        inputs.push(loaded.values);
    }
    let total: u64 = inputs.iter().map(|v| v.nrows() as u64).sum();

    let started = Instant::now();
    let runs = detect(pipeline, specs, runners, &inputs, total, show_progress).await?;
    let elapsed = started.elapsed();

    let mut figures = Vec::with_capacity(runs.len());
    let mut traces = Vec::with_capacity(runs.len());
    let mut events = Vec::new();
    for (channel, run) in pipeline.channels.iter().zip(runs) {
        let rows = run.values.len() as u64;
        let ranges = match (split, labels.get(channel.id.as_str())) {
            ("test", Some(l)) => l.ranges.clone(),
            _ => Vec::new(), // The train split holds no labelled anomalies.
        };
        figures.push(channel_figures(&channel.id, rows, &ranges, &run.events));
        events.extend(
            run.events
                .iter()
                .zip(&run.causes)
                .map(|(&(start, end), &cause)| EventRecord {
                    channel: channel.id.clone(),
                    start,
                    end,
                    cause,
                    matched: metrics::matched_range(&ranges, (start, end)),
                }),
        );
        traces.push(ChannelTrace {
            channel: channel.id.clone(),
            values: run.values,
            forecast: run.forecast,
            score: run.score,
            threshold: run.threshold,
            labels: ranges,
            events: run.events,
        });
    }
    let totals = totals(&figures, &events, total, elapsed);
    Ok((
        Evaluation {
            split: split.to_owned(),
            totals,
            channels: figures,
            events,
        },
        traces,
    ))
}

async fn detect(
    pipeline: &Pipeline,
    specs: &[Arc<ModelSpec>],
    runners: Vec<Runner>,
    inputs: &[ndarray::Array2<f32>],
    total: u64,
    show_progress: bool,
) -> Result<Vec<ChannelRun>, EvalError> {
    let index: HashMap<&str, usize> = pipeline
        .channels
        .iter()
        .enumerate()
        .map(|(i, c)| (c.id.as_str(), i))
        .collect();
    let mut runs: Vec<ChannelRun> = inputs
        .iter()
        .map(|v| {
            let rows = v.nrows();
            ChannelRun {
                values: v.column(0).to_vec(),
                forecast: vec![None; rows],
                score: vec![None; rows],
                threshold: vec![None; rows],
                events: Vec::new(),
                causes: Vec::new(),
                open_since: None,
            }
        })
        .collect();
    let progress = if show_progress {
        ProgressBar::new(total)
    } else {
        ProgressBar::hidden()
    };
    progress.set_style(
        ProgressStyle::with_template(
            "{spinner} eval {bar:40} {pos}/{len} samples {per_sec} eta {eta}",
        )
        .expect("the template is valid"),
    );
    let feed = inputs.iter().map(|v| Arc::new(v.clone())).collect();
    offline::stream(
        pipeline,
        specs,
        runners,
        feed,
        Arc::new(crate::metrics::Metrics::new()),
        None,
        |out| {
            progress.inc(out.forecasts.len() as u64);
            for row in &out.scores {
                let run = &mut runs[index[&*row.channel]];
                run.score[row.seq as usize] = Some(row.score);
                run.threshold[row.seq as usize] = Some(row.threshold);
            }
            for forecast in &out.forecasts {
                let run = &mut runs[index[&*forecast.channel]];
                if let Some(slot) = run.forecast.get_mut(forecast.seq as usize + 1) {
                    *slot = forecast.horizon.first().copied();
                }
            }
            for event in &out.events {
                let run = &mut runs[index[&*event.channel]];
                match event.state {
                    EventState::Open => run.open_since = Some((event.start_seq, event.cause)),
                    EventState::Closed => {
                        run.open_since = None;
                        run.events.push((
                            event.start_seq,
                            event.end_seq.expect("a closed event has an end"),
                        ));
                        run.causes.push(event.cause);
                    }
                }
            }
        },
    )
    .await?;
    progress.finish_and_clear();
    for run in &mut runs {
        if let Some((start, cause)) = run.open_since.take() {
            run.events.push((start, run.values.len() as u64 - 1));
            run.causes.push(cause);
        }
    }
    Ok(runs)
}

fn channel_figures(
    channel: &str,
    rows: u64,
    labels: &[(u64, u64)],
    events: &[(u64, u64)],
) -> ChannelFigures {
    let events_counts = metrics::event_counts(labels, events);
    let points = metrics::point_counts(labels, events, rows, false);
    let points_adjusted = metrics::point_counts(labels, events, rows, true);
    let flagged_samples = points.tp + points.fp;
    let labelled_samples = points.tp + points.fn_;
    ChannelFigures {
        fc1: metrics::fc1(events_counts, points),
        flagged_samples,
        labelled_samples,
        coverage: (labelled_samples > 0).then(|| flagged_samples as f64 / labelled_samples as f64),
        flagged_fraction: flagged_samples as f64 / rows.max(1) as f64,
        channel: channel.to_owned(),
        rows,
        labelled_ranges: labels.len(),
        detected_events: events.len(),
        events: events_counts,
        event_scores: events_counts.scores(),
        points,
        point_scores: points.scores(),
        points_adjusted,
        point_adjusted_scores: points_adjusted.scores(),
        delays: metrics::detection_delays(labels, events),
    }
}

fn totals(
    figures: &[ChannelFigures],
    events_detected: &[EventRecord],
    samples: u64,
    elapsed: Duration,
) -> Totals {
    let (mut events, mut points, mut adjusted) =
        (Counts::default(), Counts::default(), Counts::default());
    let mut delays: Vec<u64> = Vec::new();
    for f in figures {
        events.add(f.events);
        points.add(f.points);
        adjusted.add(f.points_adjusted);
        delays.extend(&f.delays);
    }
    delays.sort_unstable();
    let elapsed_s = elapsed.as_secs_f64();
    let channel_fc1: Vec<f64> = figures.iter().filter_map(|f| f.fc1).collect();
    let flagged_samples = points.tp + points.fp;
    let labelled_samples = points.tp + points.fn_;
    let over_half = |f: &&ChannelFigures| f.flagged_fraction > 0.5;
    let mut events_by_cause = std::collections::BTreeMap::new();
    for e in events_detected {
        let cause = e.cause.map_or("unknown", Cause::as_str);
        *events_by_cause.entry(cause.to_owned()).or_default() += 1;
    }
    Totals {
        channels: figures.len(),
        samples,
        labelled_ranges: figures.iter().map(|f| f.labelled_ranges).sum(),
        detected_events: figures.iter().map(|f| f.detected_events).sum(),
        events,
        event_scores: events.scores(),
        points,
        point_scores: points.scores(),
        points_adjusted: adjusted,
        point_adjusted_scores: adjusted.scores(),
        fc1_pooled: metrics::fc1(events, points),
        fc1_channel_mean: (!channel_fc1.is_empty())
            .then(|| channel_fc1.iter().sum::<f64>() / channel_fc1.len() as f64),
        flagged_samples,
        labelled_samples,
        coverage: (labelled_samples > 0).then(|| flagged_samples as f64 / labelled_samples as f64),
        channels_flagged_over_half: figures
            .iter()
            .filter(over_half)
            .map(|f| f.channel.clone())
            .collect(),
        channels_flagged_over_half_unlabelled: figures
            .iter()
            .filter(over_half)
            .filter(|f| (f.labelled_samples as f64) < f.rows as f64 / 10.0)
            .map(|f| f.channel.clone())
            .collect(),
        events_by_cause,
        mean_delay: (!delays.is_empty())
            .then(|| delays.iter().sum::<u64>() as f64 / delays.len() as f64),
        median_delay: metrics::quantile(&delays, 0.5),
        p90_delay: metrics::quantile(&delays, 0.9),
        elapsed_s,
        samples_per_s: samples as f64 / elapsed_s.max(1e-9),
    }
}

fn fmt(value: Option<f64>) -> String {
    value.map_or_else(|| "-".to_string(), |v| format!("{v:.3}"))
}

/// The tables `eval` prints (markdown, so the docs can quote them
/// verbatim): one row per channel and the totals, a summary of the figures
/// long alarms cannot game, and one row per detected event.
pub fn table(evaluation: &Evaluation) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(out, "| channel | rows | labelled | detected | TP | FP | FN | event P | event R | event F1 | point P | point R | point F1 | Fc1 | flagged / labelled | delays |");
    let _ = writeln!(
        out,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    );
    for f in &evaluation.channels {
        let delays: Vec<String> = f.delays.iter().map(u64::to_string).collect();
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            f.channel,
            f.rows,
            f.labelled_ranges,
            f.detected_events,
            f.events.tp,
            f.events.fp,
            f.events.fn_,
            fmt(f.event_scores.precision),
            fmt(f.event_scores.recall),
            fmt(f.event_scores.f1),
            fmt(f.point_scores.precision),
            fmt(f.point_scores.recall),
            fmt(f.point_scores.f1),
            fmt(f.fc1),
            coverage(f.flagged_samples, f.labelled_samples),
            if delays.is_empty() {
                "-".into()
            } else {
                delays.join(", ")
            }
        );
    }
    let t = &evaluation.totals;
    let _ = writeln!(
        out,
        "| **total** | {} | {} | {} | {} | {} | {} | **{}** | **{}** | **{}** | {} | {} | **{}** | **{}** | **{}** | median {} / p90 {} |",
        t.samples,
        t.labelled_ranges,
        t.detected_events,
        t.events.tp,
        t.events.fp,
        t.events.fn_,
        fmt(t.event_scores.precision),
        fmt(t.event_scores.recall),
        fmt(t.event_scores.f1),
        fmt(t.point_scores.precision),
        fmt(t.point_scores.recall),
        fmt(t.point_scores.f1),
        fmt(t.fc1_pooled),
        coverage(t.flagged_samples, t.labelled_samples),
        t.median_delay.map_or("-".into(), |d| d.to_string()),
        t.p90_delay.map_or("-".into(), |d| d.to_string()),
    );
    let list = |channels: &[String]| {
        if channels.is_empty() {
            "none".to_owned()
        } else {
            channels.join(", ")
        }
    };
    let causes: Vec<String> = t
        .events_by_cause
        .iter()
        .map(|(cause, n)| format!("{cause} {n}"))
        .collect();
    let _ = writeln!(
        out,
        "\nFc1 {} pooled, {} channel mean. Flagged {} samples against {} labelled ({}); \
         channels flagged over half their stream: {} (of them labelled under a tenth: {}). \
         Events by cause: {}.",
        fmt(t.fc1_pooled),
        fmt(t.fc1_channel_mean),
        t.flagged_samples,
        t.labelled_samples,
        coverage(t.flagged_samples, t.labelled_samples),
        list(&t.channels_flagged_over_half),
        list(&t.channels_flagged_over_half_unlabelled),
        if causes.is_empty() {
            "none".into()
        } else {
            causes.join(", ")
        },
    );
    let _ = writeln!(
        out,
        "\n{} samples from {} channels ({} split) in {:.2} s: {:.0} samples/s through the streaming engine.",
        t.samples, t.channels, evaluation.split, t.elapsed_s, t.samples_per_s
    );
    let _ = writeln!(
        out,
        "\n| channel | event start | end | samples | cause | labelled range |\n|---|---:|---:|---:|---|---|"
    );
    for e in &evaluation.events {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} |",
            e.channel,
            e.start,
            e.end,
            e.end + 1 - e.start,
            e.cause.map_or("unknown", Cause::as_str),
            e.matched
                .map_or("none (false alarm)".into(), |(s, end)| format!(
                    "[{s}, {end})"
                )),
        );
    }
    out
}

/// Flagged samples per labelled sample, as `1.41x`.
fn coverage(flagged: u64, labelled: u64) -> String {
    if labelled == 0 {
        format!("{flagged} flagged, none labelled")
    } else {
        format!("{:.2}x", flagged as f64 / labelled as f64)
    }
}
