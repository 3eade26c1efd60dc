//! `satwatch replay`: publishes historical samples to the telemetry topics,
//! keyed by channel, with `seq` = the row index, so labels line up. Channels
//! are interleaved row by row, as live streams would be.
//!
//! Each channel's data must have its model's width (the input dims of the
//! model's `config.pbtxt`): a replay of data the pipeline would dead-letter
//! as `wrong_arity` is refused before anything is published.

use super::KafkaToolError;
use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use chrono::Utc;
use futures::channel::oneshot::Canceled;
use futures::{stream::FuturesUnordered, FutureExt, StreamExt};
use indicatif::{ProgressBar, ProgressStyle};
use rdkafka::{
    error::KafkaError,
    producer::{
        future_producer::{DeliveryFuture, OwnedDeliveryResult},
        FutureProducer, FutureRecord,
    },
    types::RDKafkaErrorCode,
};

use crate::{
    config::{KafkaSettings, Pipeline},
    dataset,
    kafka::client::client_config,
    repository, telemetry,
};

/// `satwatch replay`'s options.
#[derive(clap::Args)]
pub struct ReplayArgs {
    /// The pipeline file (e.g. pipelines/smap.toml): channels, topics, models, settings.
    #[arg(long)]
    pub pipeline: PathBuf,
    /// Directory holding <split>/<channel>.npy (e.g. data/smap).
    #[arg(long)]
    pub data: PathBuf,
    /// Which split of the data to publish.
    #[arg(long, default_value = "test", value_parser = ["test", "train"])]
    pub split: String,
    /// Comma-separated channel ids, or `all`.
    #[arg(long, default_value = "all")]
    pub channels: String,
    /// Samples per second across all channels.
    #[arg(long, conflicts_with = "max_rate")]
    pub rate: Option<f64>,
    /// As fast as the broker takes them (the default when --rate is absent).
    #[arg(long)]
    pub max_rate: bool,
    /// At most this many samples per channel.
    #[arg(long)]
    pub limit: Option<usize>,
    /// First row of each channel to publish.
    #[arg(long, default_value_t = 0)]
    pub start: usize,
    /// Also publish this many malformed records after each sample, keyed by
    /// its channel on its topic (a flood of bad records: satwatch
    /// dead-letters each as malformed_json). --rate paces samples only.
    #[arg(long, default_value_t = 0)]
    pub bad_records_per_sample: usize,
}

/// `satwatch replay`: publishes, then prints one summary line (which
/// `scripts/bench.sh` reads: keep its shape); fails if any sample could not
/// be published.
pub async fn command(args: ReplayArgs) -> Result<(), KafkaToolError> {
    let mut pipeline = Pipeline::load(&args.pipeline)?;
    pipeline.select_channels(&args.channels)?;
    if args.rate.is_some_and(|r| !(r > 0.0 && r.is_finite())) {
        return Err(KafkaToolError::Usage(
            "--rate must be a positive number of samples per second".into(),
        ));
    }
    let options = ReplayOptions {
        split: args.split,
        rate: args.rate,
        limit: args.limit,
        start: args.start,
        bad_records_per_sample: args.bad_records_per_sample,
    };
    let report = replay(&pipeline, &args.data, &options).await?;
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
        return Err(KafkaToolError::Broker(format!(
            "{} samples could not be published",
            report.failed
        )));
    }
    Ok(())
}

pub struct ReplayOptions {
    pub split: String,
    /// Samples per second across all channels; None is as fast as possible.
    pub rate: Option<f64>,
    /// Rows per channel, from the start of the split.
    pub limit: Option<usize>,
    /// First row per channel.
    pub start: usize,
    /// Malformed records published after each sample, keyed by its channel
    /// on its topic: a flood of bad records for measuring dead-lettering
    /// (satwatch dead-letters each as `malformed_json`).
    pub bad_records_per_sample: usize,
}

#[derive(Debug, Default)]
pub struct ReplayReport {
    /// Records delivered, bad ones included.
    pub published: u64,
    /// Of them, bad records (`--bad-records-per-sample`).
    pub bad: u64,
    pub failed: u64,
    pub elapsed: Duration,
}

/// Records in flight before waiting for deliveries.
const MAX_IN_FLIGHT: usize = 20_000;

/// The replay producer's linger when paced: latency runs send each record
/// at once.
pub const PACED_LINGER_MS: u32 = 0;
/// Its linger flat out: a short wait fills larger batches.
pub const BACKLOG_LINGER_MS: u32 = 10;

/// The replay's producer (`satwatch bench broker` publishes with it
/// too).
pub fn producer(settings: &KafkaSettings, paced: bool) -> Result<FutureProducer, KafkaToolError> {
    client_config(settings)
        .set(
            "linger.ms",
            if paced {
                PACED_LINGER_MS
            } else {
                BACKLOG_LINGER_MS
            }
            .to_string(),
        )
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "1000000")
        .set("acks", "all")
        // Retries through a broker failover keep each channel's order (a
        // sample overtaken by a later seq would be dropped as a duplicate).
        .set("enable.idempotence", "true")
        .create()
        .map_err(|e| {
            KafkaToolError::Broker(format!(
                "cannot create Kafka producer: {}",
                crate::secrets::mask_client_error(&e, &settings.client)
            ))
        })
}

pub async fn replay(
    pipeline: &Pipeline,
    data: &Path,
    options: &ReplayOptions,
) -> Result<ReplayReport, KafkaToolError> {
    // Only the configs are read (not the ONNX files): the width is all replay needs.
    let specs = repository::load_models(&pipeline.repository, &pipeline.models())?;
    let mut streams = Vec::new();
    for channel in &pipeline.channels {
        let spec = specs
            .iter()
            .find(|s| s.name == channel.model)
            .expect("load_models loads every model of the pipeline's channels");
        let loaded = dataset::load_channel(data, &options.split, &channel.id, spec.features)?;
        let end = options.limit.map_or(loaded.values.nrows(), |l| {
            (options.start + l).min(loaded.values.nrows())
        });
        streams.push((channel, loaded.values, options.start.min(end)..end));
    }
    let total: u64 = streams
        .iter()
        .map(|(_, _, rows)| rows.len() as u64)
        .sum::<u64>()
        * (1 + options.bad_records_per_sample as u64);
    let producer = producer(&pipeline.file.kafka, options.rate.is_some())?;

    let progress = ProgressBar::new(total).with_style(
        ProgressStyle::with_template(
            "{spinner} replay {bar:40} {pos}/{len} samples {per_sec} eta {eta}",
        )
        .expect("the template is valid"),
    );
    let started = Instant::now();
    let mut report = ReplayReport::default();
    let mut deliveries = FuturesUnordered::new();
    let mut sent: u64 = 0;
    let longest = streams
        .iter()
        .map(|(_, _, rows)| rows.end)
        .max()
        .unwrap_or(0);
    let first = streams
        .iter()
        .map(|(_, _, rows)| rows.start)
        .min()
        .unwrap_or(0);
    for row in first..longest {
        for (channel, values, rows) in &streams {
            if !rows.contains(&row) {
                continue;
            }
            if let Some(rate) = options.rate {
                let due = started + Duration::from_secs_f64(sent as f64 / rate);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    tokio::time::sleep(wait).await;
                }
            }
            let payload = telemetry::encode(
                &channel.id,
                row as u64,
                &Utc::now(),
                values.row(row).as_slice().expect("standard layout"),
            );
            let topic = channel.topic.as_str();
            let key = channel.id.as_str();
            send(
                &producer,
                topic,
                key,
                payload.as_bytes(),
                &mut deliveries,
                &mut report,
                &progress,
            )
            .await?;
            // Cut off inside the seq: not JSON, yet long enough to be parsed.
            let bad = format!("{{\"channel\": \"{key}\", \"seq\": {row}");
            for _ in 0..options.bad_records_per_sample {
                send(
                    &producer,
                    topic,
                    key,
                    bad.as_bytes(),
                    &mut deliveries,
                    &mut report,
                    &progress,
                )
                .await?;
                report.bad += 1;
            }
            sent += 1;
            // Settle what has been delivered already, without waiting.
            while let Some(Some(result)) = deliveries.next().now_or_never() {
                settle(result, &mut report, &progress);
            }
            while deliveries.len() >= MAX_IN_FLIGHT {
                if let Some(result) = deliveries.next().await {
                    settle(result, &mut report, &progress);
                }
            }
        }
    }
    while let Some(result) = deliveries.next().await {
        settle(result, &mut report, &progress);
    }
    progress.finish_and_clear();
    report.elapsed = started.elapsed();
    Ok(report)
}

/// Enqueues one record (send_result enqueues now: a FutureProducer::send
/// future would only enqueue when first polled, holding paced records back),
/// waiting for a delivery to make room while the local queue is full.
async fn send(
    producer: &FutureProducer,
    topic: &str,
    key: &str,
    payload: &[u8],
    deliveries: &mut FuturesUnordered<DeliveryFuture>,
    report: &mut ReplayReport,
    progress: &ProgressBar,
) -> Result<(), KafkaToolError> {
    let mut record = FutureRecord::to(topic).key(key).payload(payload);
    loop {
        match producer.send_result(record) {
            Ok(delivery) => {
                deliveries.push(delivery);
                return Ok(());
            }
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                record = returned;
                match deliveries.next().await {
                    Some(result) => settle(result, report, progress),
                    None => tokio::time::sleep(Duration::from_millis(1)).await,
                }
            }
            Err((err, _)) => {
                return Err(KafkaToolError::Broker(format!(
                    "cannot publish to {topic}: {err}"
                )))
            }
        }
    }
}

fn settle(
    result: Result<OwnedDeliveryResult, Canceled>,
    report: &mut ReplayReport,
    progress: &ProgressBar,
) {
    match result {
        Ok(Ok(_)) => report.published += 1,
        Ok(Err((err, _))) => {
            if report.failed == 0 {
                tracing::warn!(error = %err, "a record could not be published");
            }
            report.failed += 1;
        }
        Err(Canceled) => report.failed += 1,
    }
    progress.inc(1);
}
