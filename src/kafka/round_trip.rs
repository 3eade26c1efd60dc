//! `satwatch bench broker`: the broker's own share of the latency.
//!
//! Records are published at a fixed rate, keyed and spread over topics the
//! way `satwatch replay` spreads telemetry (one key per channel, one topic per
//! subsystem, as many partitions as the telemetry topics have), and consumed
//! by a group consumer with the settings `satwatch run` uses. No pipeline sits
//! in between, so the time from publishing a record to consuming it is the
//! floor under satwatch's end-to-end latency on this broker.
//!
//! The records go to their own topics (`<telemetry topic>.round-trip`), never
//! to the telemetry topics a running satwatch reads.

use super::KafkaToolError;
use std::{
    collections::HashMap,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use futures::{stream::FuturesUnordered, StreamExt};
use indicatif::{ProgressBar, ProgressStyle};
use rdkafka::{
    consumer::{Consumer, StreamConsumer},
    producer::{FutureRecord, Producer},
    Message,
};
use serde::Serialize;

use super::{client::consumer_config, replay, topics};
use crate::config::Pipeline;

/// How long consuming may go on after the last record was published.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the consumer may take to be assigned its partitions.
const ASSIGN_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Serialize)]
pub struct RoundTrip {
    pub topics: usize,
    pub partitions: usize,
    pub offered_per_s: f64,
    pub published: u64,
    /// Records published per second, as the broker acknowledged them.
    pub achieved_per_s: f64,
    pub consumed: u64,
    /// Publish (the moment the record is handed to the producer) to consume.
    pub consume: Quantiles,
    /// Publish to the broker's acknowledgement (acks=all).
    pub acknowledge: Quantiles,
}

/// Exact quantiles in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Quantiles {
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl Quantiles {
    /// Of these milliseconds; None if there are none.
    pub fn of(mut ms: Vec<f64>) -> Option<Self> {
        if ms.is_empty() {
            return None;
        }
        ms.sort_by(f64::total_cmp);
        let at = |q: f64| ms[((ms.len() - 1) as f64 * q).round() as usize];
        Some(Self {
            p50_ms: at(0.5),
            p99_ms: at(0.99),
            p999_ms: at(0.999),
            max_ms: at(1.0),
        })
    }
}

fn unix_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_nanos()
}

/// Publishes `rate` records/s for `seconds` and measures each one's way
/// through the broker (see the module docs).
pub async fn measure(
    pipeline: &Pipeline,
    rate: f64,
    seconds: f64,
) -> Result<RoundTrip, KafkaToolError> {
    if !(rate > 0.0 && seconds > 0.0) {
        return Err(KafkaToolError::Broker(format!(
            "--rate ({rate}) and --seconds ({seconds}) must be positive"
        )));
    }
    let settings = &pipeline.file.kafka;
    let probe_topic = |telemetry: &str| format!("{telemetry}.round-trip");

    let producer = replay::producer(settings, true)?;
    // The probe topics mirror the telemetry topics' partitions and replicas.
    let mut by_layout: HashMap<(i32, i32), Vec<String>> = HashMap::new();
    for topic in pipeline.telemetry_topics() {
        let metadata = producer
            .client()
            .fetch_metadata(Some(&topic), Duration::from_secs(10))
            .map_err(|e| {
                KafkaToolError::Broker(format!("cannot reach Kafka at {}: {e}", settings.brokers))
            })?;
        let Some(found) = metadata
            .topics()
            .first()
            .filter(|t| t.error().is_none() && !t.partitions().is_empty())
        else {
            return Err(KafkaToolError::Broker(format!(
                "topic {topic} does not exist: create the topics first (`satwatch topics`)"
            )));
        };
        let partitions = found.partitions().len() as i32;
        let replicas = found.partitions()[0].replicas().len().max(1) as i32;
        by_layout
            .entry((partitions, replicas))
            .or_default()
            .push(probe_topic(&topic));
    }
    for ((partitions, replicas), names) in &by_layout {
        topics::create_topics(settings, names, *partitions, *replicas).await?;
    }
    let probe_topics: Vec<String> = by_layout.values().flatten().cloned().collect();
    let partitions: usize = by_layout
        .iter()
        .map(|((p, _), names)| *p as usize * names.len())
        .sum();

    // A group of its own; records of earlier runs are told apart by `run`.
    let run = unix_ns();
    let consumer: StreamConsumer = consumer_config(settings, &format!("satwatch-round-trip-{run}"))
        .create()
        .map_err(|e| {
            KafkaToolError::Broker(format!(
                "cannot create Kafka consumer: {}",
                crate::secrets::mask_client_error(&e, &settings.client)
            ))
        })?;
    let names: Vec<&str> = probe_topics.iter().map(String::as_str).collect();
    consumer
        .subscribe(&names)
        .map_err(|e| KafkaToolError::Broker(format!("cannot subscribe to {names:?}: {e}")))?;
    let assigned_by = Instant::now() + ASSIGN_TIMEOUT;
    loop {
        // Polling drives the group join; nothing is published yet.
        let _ = tokio::time::timeout(Duration::from_millis(100), consumer.recv()).await;
        let assigned = consumer.assignment().map_or(0, |a| a.count());
        if assigned == partitions {
            break;
        }
        if Instant::now() > assigned_by {
            return Err(KafkaToolError::Broker(format!(
                "the consumer was assigned {assigned} of {partitions} partitions in {}s",
                ASSIGN_TIMEOUT.as_secs()
            )));
        }
    }

    let total = (rate * seconds).ceil() as u64;
    // Sent once every record is acknowledged: the consumer then drains for
    // at most DRAIN_TIMEOUT.
    let (published_tx, mut published) = tokio::sync::oneshot::channel::<()>();
    let consuming = tokio::spawn(async move {
        let mut latencies = Vec::with_capacity(total as usize);
        let mut deadline = None::<Instant>;
        while (latencies.len() as u64) < total {
            let wait = deadline.map_or(Duration::from_millis(200), |d: Instant| {
                d.saturating_duration_since(Instant::now())
            });
            match tokio::time::timeout(wait, consumer.recv()).await {
                Ok(Ok(message)) => {
                    let now = unix_ns();
                    let Some((record_run, sent)) = message
                        .payload()
                        .and_then(|p| std::str::from_utf8(p).ok())
                        .and_then(|p| p.split_once(' '))
                        .and_then(|(r, s)| {
                            Some((r.parse::<u128>().ok()?, s.parse::<u128>().ok()?))
                        })
                    else {
                        continue;
                    };
                    if record_run == run {
                        latencies.push(now.saturating_sub(sent) as f64 / 1e6);
                    }
                }
                Ok(Err(err)) => tracing::warn!(error = %err, "round-trip consumer"),
                Err(_) if deadline.is_some_and(|d| Instant::now() >= d) => break,
                Err(_) => {}
            }
            if deadline.is_none() && published.try_recv().is_ok() {
                deadline = Some(Instant::now() + DRAIN_TIMEOUT);
            }
        }
        latencies
    });

    let progress = ProgressBar::new(total).with_style(
        ProgressStyle::with_template(
            "{spinner} round trip {bar:40} {pos}/{len} records acknowledged, eta {eta}",
        )
        .expect("the template is valid"),
    );
    let mut acknowledged = Vec::with_capacity(total as usize);
    let mut deliveries = FuturesUnordered::new();
    let started = Instant::now();
    for i in 0..total {
        let due = started + Duration::from_secs_f64(i as f64 / rate);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            tokio::time::sleep(wait).await;
        }
        let channel = &pipeline.channels[i as usize % pipeline.channels.len()];
        let sent = unix_ns();
        let payload = format!("{run} {sent}");
        let topic = probe_topic(&channel.topic);
        let record = FutureRecord::to(&topic)
            .key(channel.id.as_str())
            .payload(payload.as_str());
        let delivery = producer
            .send_result(record)
            .map_err(|(e, _)| KafkaToolError::Broker(format!("cannot publish to {topic}: {e}")))?;
        deliveries.push(async move { (delivery.await, sent) });
        while let Some(Some((result, sent))) = futures::FutureExt::now_or_never(deliveries.next()) {
            settle(result, sent, &mut acknowledged)?;
            progress.inc(1);
        }
    }
    while let Some((result, sent)) = deliveries.next().await {
        settle(result, sent, &mut acknowledged)?;
        progress.inc(1);
    }
    progress.finish_and_clear();
    let publishing = started.elapsed();
    let _ = published_tx.send(());
    let consumed = consuming
        .await
        .map_err(|e| KafkaToolError::Broker(format!("round-trip consumer task: {e}")))?;
    let consumed_count = consumed.len() as u64;
    Ok(RoundTrip {
        topics: probe_topics.len(),
        partitions,
        offered_per_s: rate,
        published: total,
        achieved_per_s: total as f64 / publishing.as_secs_f64(),
        consumed: consumed_count,
        consume: Quantiles::of(consumed)
            .ok_or_else(|| KafkaToolError::Broker("no record came back from the broker".into()))?,
        acknowledge: Quantiles::of(acknowledged)
            .ok_or_else(|| KafkaToolError::Broker("no record was acknowledged".into()))?,
    })
}

fn settle(
    result: Result<
        rdkafka::producer::future_producer::OwnedDeliveryResult,
        futures::channel::oneshot::Canceled,
    >,
    sent: u128,
    acknowledged: &mut Vec<f64>,
) -> Result<(), KafkaToolError> {
    match result {
        Ok(Ok(_)) => {
            acknowledged.push(unix_ns().saturating_sub(sent) as f64 / 1e6);
            Ok(())
        }
        Ok(Err((err, _))) => Err(KafkaToolError::Broker(format!(
            "the broker refused a record: {err}"
        ))),
        Err(_) => Err(KafkaToolError::Broker(
            "the producer dropped a record".into(),
        )),
    }
}
