//! `satwatch plan`: what a pipeline file and its model repository amount to,
//! as the service reads them: each channel with its subsystem, topic, model,
//! window, horizon and width, the models' batching, the topics, and, given a
//! data split, the rows a replay publishes and the score rows it should
//! produce.
//!
//! The scripts (`scripts/bench.sh`, `scripts/demo.sh`) ask this command
//! instead of reading the pipeline file and `config.pbtxt` themselves: the
//! answer comes from [`Pipeline::load`] and [`repository::load_models`], so
//! it cannot disagree with what `satwatch run` does.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::{
    backend::BackendKind,
    config::Pipeline,
    dataset,
    repository::{self, ModelSpec},
};

/// Why a plan could not be made.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error(transparent)]
    File(#[from] crate::file_error::FileError),
    #[error(transparent)]
    Data(#[from] crate::dataset::DataError),
    /// What was asked cannot be done as asked (e.g. an unknown channel).
    #[error("{0}")]
    Usage(String),
}

impl PlanError {
    /// The error's kind, for metric labels and log fields.
    pub fn error_type(&self) -> &'static str {
        match self {
            PlanError::File(e) => e.error_type(),
            PlanError::Data(_) => "data",
            PlanError::Usage(_) => "usage",
        }
    }
}

/// `satwatch plan`'s options.
#[derive(clap::Args)]
pub struct PlanArgs {
    /// The pipeline file (e.g. pipelines/smap.toml).
    #[arg(long)]
    pub pipeline: PathBuf,
    /// Directory holding <split>/<channel>.npy (e.g. data/smap): adds each
    /// channel's rows, and the samples and score rows a replay of them
    /// gives.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Which split of the data to count: its <split>/<channel>.npy files.
    #[arg(long, default_value = "test", value_parser = ["test", "train"], requires = "data")]
    pub split: String,
    /// Comma-separated channel ids, or `all`.
    #[arg(long, default_value = "all")]
    pub channels: String,
    /// As `satwatch replay --start`: the first row of each channel replayed.
    /// The rows before it count as already seen (replayed earlier onto the
    /// same running pipeline), so they fill windows but are not replayed.
    #[arg(long, default_value_t = 0, requires = "data")]
    pub start: usize,
    /// As `satwatch replay --limit`: at most this many rows per channel.
    #[arg(long, requires = "data")]
    pub limit: Option<usize>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub pipeline: PathBuf,
    /// The model repository, resolved against the pipeline file's directory.
    pub repository: PathBuf,
    pub topics: Topics,
    pub engine: EnginePlan,
    pub sink: SinkPlan,
    // The producers live in the Kafka room, which a build without Kafka
    // (the fuzz targets') leaves out.
    #[cfg(feature = "kafka")]
    pub producers: ProducerPlan,
    /// Every model the channels use, each once.
    pub models: Vec<ModelPlan>,
    pub channels: Vec<ChannelPlan>,
    /// The longest window among the models: rows per channel before the
    /// first score.
    pub window: usize,
    /// With `--data`: the replay these figures are for, and its totals.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replay: Option<ReplayPlan>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Topics {
    pub telemetry: Vec<String>,
    pub anomalies: String,
    pub forecasts: String,
    pub dead_letters: String,
}

/// The `[engine]` settings that shape a run's figures.
#[derive(Debug, Clone, Serialize)]
pub struct EnginePlan {
    pub backend: BackendKind,
    pub backend_threads: usize,
    pub row_form: bool,
    pub max_pending_windows: usize,
}

/// The `[sink]` settings: how long outputs wait before they are written.
#[derive(Debug, Clone, Serialize)]
pub struct SinkPlan {
    pub max_batch_rows: usize,
    pub max_batch_delay_ms: u64,
    pub commit_interval_ms: u64,
}

/// The producers' `linger.ms`: how long a record may wait to be sent.
#[derive(Debug, Clone, Serialize)]
pub struct ProducerPlan {
    /// `satwatch replay` at a rate (latency runs), and flat out (backlogs).
    pub replay_paced_linger_ms: u32,
    pub replay_backlog_linger_ms: u32,
    /// The `anomalies`/`forecasts` and dead-letter producers.
    pub publisher_linger_ms: u32,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelPlan {
    pub name: String,
    pub version: u64,
    pub window: usize,
    /// Values per sample.
    pub width: usize,
    pub horizon: usize,
    pub max_batch_size: usize,
    pub preferred_batch_sizes: Vec<usize>,
    pub max_queue_delay_us: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChannelPlan {
    pub id: String,
    pub subsystem: String,
    pub topic: String,
    pub model: String,
    pub window: usize,
    pub horizon: usize,
    /// Values per sample: what its telemetry must carry.
    pub width: usize,
    /// With `--data`: the rows of the channel's split, and what a replay of
    /// `[start, start + limit)` of them gives.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub replay: Option<ChannelReplay>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ChannelReplay {
    pub rows: usize,
    /// Samples replayed.
    pub samples: usize,
    /// Of them, the ones that only fill the window (no score row).
    pub warm_up: usize,
    /// Score rows they give: one per replayed sample at or past the window.
    pub expected_scores: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct ReplayPlan {
    pub data: PathBuf,
    pub split: String,
    pub start: usize,
    pub limit: Option<usize>,
    pub samples: usize,
    pub warm_up: usize,
    pub expected_scores: usize,
}

impl ChannelReplay {
    /// Rows `[start, start + limit)` of a channel with `rows` rows, replayed
    /// onto a pipeline that has seen the rows before `start`. A sample is
    /// scored against the forecast of the `window` rows before it, so the
    /// first score row is at seq = `window` (`satwatch eval` and `bench`
    /// forecast `rows - window + 1` windows, the last of which looks past the
    /// data).
    pub fn of(rows: usize, start: usize, limit: Option<usize>, window: usize) -> Self {
        let end = limit.map_or(rows, |l| rows.min(start.saturating_add(l)));
        let from = start.min(end);
        Self {
            rows,
            samples: end - from,
            warm_up: end.min(window).saturating_sub(from),
            expected_scores: end.saturating_sub(from.max(window)),
        }
    }
}

/// Where the rows come from, for [`plan`].
pub struct DataSplit<'a> {
    pub data: &'a Path,
    pub split: &'a str,
    pub start: usize,
    pub limit: Option<usize>,
}

/// The plan of `pipeline`, with the rows of `data` when given.
pub fn plan(pipeline: &Pipeline, data: Option<DataSplit<'_>>) -> Result<Plan, PlanError> {
    // The configs only, not the model files: as `satwatch replay` reads them.
    let specs = repository::load_models(&pipeline.repository, &pipeline.models())?;
    let spec_of = |model: &str| -> &ModelSpec {
        specs
            .iter()
            .find(|s| s.name == model)
            .expect("load_models loads every model of the pipeline's channels")
    };
    let mut channels = Vec::with_capacity(pipeline.channels.len());
    for channel in &pipeline.channels {
        let spec = spec_of(&channel.model);
        let replay = match &data {
            Some(d) => {
                let loaded = dataset::load_channel(d.data, d.split, &channel.id, spec.features)?;
                Some(ChannelReplay::of(
                    loaded.values.nrows(),
                    d.start,
                    d.limit,
                    spec.window,
                ))
            }
            None => None,
        };
        channels.push(ChannelPlan {
            id: channel.id.clone(),
            subsystem: channel.subsystem.clone(),
            topic: channel.topic.clone(),
            model: channel.model.clone(),
            window: spec.window,
            horizon: spec.horizon,
            width: spec.features,
            replay,
        });
    }
    let replay = data.map(|d| {
        let sum = |f: fn(&ChannelReplay) -> usize| {
            channels
                .iter()
                .filter_map(|c| c.replay.as_ref())
                .map(f)
                .sum()
        };
        ReplayPlan {
            data: d.data.to_owned(),
            split: d.split.to_owned(),
            start: d.start,
            limit: d.limit,
            samples: sum(|r| r.samples),
            warm_up: sum(|r| r.warm_up),
            expected_scores: sum(|r| r.expected_scores),
        }
    });
    let kafka = &pipeline.file.kafka;
    let engine = &pipeline.file.engine;
    let sink = &pipeline.file.sink;
    Ok(Plan {
        pipeline: pipeline.path.clone(),
        repository: pipeline.repository.clone(),
        topics: Topics {
            telemetry: pipeline.telemetry_topics(),
            anomalies: kafka.anomalies_topic.clone(),
            forecasts: kafka.forecasts_topic.clone(),
            dead_letters: kafka.dlq_topic.clone(),
        },
        engine: EnginePlan {
            backend: engine.backend,
            backend_threads: engine.backend_threads,
            row_form: engine.row_form,
            max_pending_windows: engine.max_pending_windows,
        },
        sink: SinkPlan {
            max_batch_rows: sink.max_batch_rows,
            max_batch_delay_ms: sink.max_batch_delay_ms,
            commit_interval_ms: sink.commit_interval_ms,
        },
        #[cfg(feature = "kafka")]
        producers: ProducerPlan {
            replay_paced_linger_ms: crate::kafka::replay::PACED_LINGER_MS,
            replay_backlog_linger_ms: crate::kafka::replay::BACKLOG_LINGER_MS,
            publisher_linger_ms: crate::kafka::publisher::LINGER_MS,
        },
        models: specs
            .iter()
            .map(|s| ModelPlan {
                name: s.name.clone(),
                version: s.version,
                window: s.window,
                width: s.features,
                horizon: s.horizon,
                max_batch_size: s.batching.max_batch_size,
                preferred_batch_sizes: s.batching.preferred_batch_sizes.clone(),
                max_queue_delay_us: s.batching.max_queue_delay.as_micros() as u64,
            })
            .collect(),
        window: specs.iter().map(|s| s.window).max().unwrap_or(0),
        channels,
        replay,
    })
}

/// `satwatch plan`: prints the plan as JSON or as a table.
pub fn command(args: PlanArgs) -> Result<(), PlanError> {
    let mut pipeline = Pipeline::load(&args.pipeline)?;
    pipeline.select_channels(&args.channels)?;
    let data = args.data.as_deref().map(|data| DataSplit {
        data,
        split: &args.split,
        start: args.start,
        limit: args.limit,
    });
    let plan = plan(&pipeline, data)?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&plan).expect("a plan serialises")
        );
    } else {
        print!("{}", table(&plan));
    }
    Ok(())
}

/// The plan for a reader: one line per channel, then the totals.
pub fn table(plan: &Plan) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} channels, {} models from {}",
        plan.channels.len(),
        plan.models.len(),
        plan.repository.display()
    );
    let _ = writeln!(
        out,
        "{:<8} {:<10} {:<16} {:<14} {:>6} {:>7} {:>5} {:>8} {:>8}",
        "channel", "subsystem", "topic", "model", "window", "horizon", "width", "rows", "scores"
    );
    for c in &plan.channels {
        let (rows, scores) = c.replay.map_or((String::new(), String::new()), |r| {
            (r.rows.to_string(), r.expected_scores.to_string())
        });
        let _ = writeln!(
            out,
            "{:<8} {:<10} {:<16} {:<14} {:>6} {:>7} {:>5} {:>8} {:>8}",
            c.id, c.subsystem, c.topic, c.model, c.window, c.horizon, c.width, rows, scores
        );
    }
    if let Some(r) = &plan.replay {
        let _ = writeln!(
            out,
            "a replay of {} rows {}..{} gives {} samples, {} of them warm-up, and {} score rows",
            r.split,
            r.start,
            r.limit
                .map_or("the end".to_owned(), |l| (r.start + l).to_string()),
            r.samples,
            r.warm_up,
            r.expected_scores
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::ChannelReplay;

    #[test]
    fn a_whole_split_scores_every_row_past_the_window() {
        let r = ChannelReplay::of(1000, 0, None, 128);
        assert_eq!((r.samples, r.warm_up, r.expected_scores), (1000, 128, 872));
    }

    #[test]
    fn rows_before_start_count_as_seen_so_a_replay_past_the_window_scores_them_all() {
        // bench.sh's latency runs: the window first, then the measured part.
        let warm = ChannelReplay::of(1000, 0, Some(128), 128);
        assert_eq!((warm.samples, warm.expected_scores), (128, 0));
        let measured = ChannelReplay::of(1000, 128, Some(40), 128);
        assert_eq!(
            (measured.samples, measured.warm_up, measured.expected_scores),
            (40, 0, 40)
        );
    }

    #[test]
    fn a_limit_or_start_past_the_data_is_cut_at_its_end() {
        let r = ChannelReplay::of(100, 90, Some(50), 64);
        assert_eq!((r.samples, r.warm_up, r.expected_scores), (10, 0, 10));
        let r = ChannelReplay::of(100, 200, None, 64);
        assert_eq!((r.samples, r.warm_up, r.expected_scores), (0, 0, 0));
        let r = ChannelReplay::of(50, 0, None, 64);
        assert_eq!((r.samples, r.warm_up, r.expected_scores), (50, 50, 0));
    }
}
