//! The Kafka source: a consumer group over the telemetry topics.
//!
//! Records are decoded and validated; good samples go on to the processor,
//! bad ones to the dead-letter topic with their reason. Every record's offset
//! is held in the [`OffsetTracker`] until what it caused is durable, and only
//! then committed (periodically, at revocation, and at shutdown).

pub mod offsets;

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use chrono::{DateTime, Utc};
use rdkafka::{
    consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer},
    error::KafkaError,
    message::Message,
    ClientContext, Offset, TopicPartitionList,
};
use tokio::sync::{mpsc, watch};

use crate::{
    config::KafkaSettings,
    health::Health,
    metrics::Metrics,
    sink::{kafka::client_config, Publisher},
    telemetry::{Decoder, Origin, Sample},
};
pub use offsets::OffsetTracker;

/// Rebalance hooks: commit what is durable before partitions go, and keep
/// readiness up to date.
pub struct SourceContext {
    tracker: Arc<Mutex<OffsetTracker>>,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
}

impl ClientContext for SourceContext {
    /// librdkafka's periodic statistics carry each assigned partition's lag
    /// (high watermark minus committed offset), so no extra broker calls.
    fn stats(&self, statistics: rdkafka::Statistics) {
        for (topic, stats) in &statistics.topics {
            for (partition, p) in &stats.partitions {
                // Partition -1 is librdkafka's internal "unassigned" queue; -1 lag is unknown.
                if *partition < 0 || !p.desired || p.consumer_lag < 0 {
                    continue;
                }
                self.metrics
                    .consumer_lag
                    .with_label_values(&[topic, &partition.to_string()])
                    .set(p.consumer_lag);
            }
        }
    }
}

impl ConsumerContext for SourceContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(revoked) = rebalance {
            let mut tracker = self.tracker.lock().expect("tracker updates never panic");
            if let Err(err) = commit(consumer, &mut tracker, CommitMode::Sync) {
                tracing::warn!(error = %err, "commit before revocation failed; the next owner reprocesses");
            }
            for elem in revoked.elements() {
                tracker.revoke(elem.topic(), elem.partition());
            }
            tracing::info!(partitions = %describe(revoked), "partitions revoked");
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(assigned) => {
                tracing::info!(partitions = %describe(assigned), "partitions assigned")
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(err) => tracing::warn!(error = %err, "rebalance failed"),
        }
        let assigned = consumer.assignment().map(|a| a.count()).unwrap_or(0);
        self.health.set_partitions_assigned(assigned);
    }
}

fn describe(list: &TopicPartitionList) -> String {
    let parts: Vec<String> = list
        .elements()
        .iter()
        .map(|e| format!("{}[{}]", e.topic(), e.partition()))
        .collect();
    if parts.is_empty() {
        "none".into()
    } else {
        parts.join(",")
    }
}

/// Commits every position that moved.
fn commit<C: Consumer<X>, X: ConsumerContext>(
    consumer: &C,
    tracker: &mut OffsetTracker,
    mode: CommitMode,
) -> Result<usize, KafkaError> {
    let commits = tracker.take_commits();
    if commits.is_empty() {
        return Ok(0);
    }
    let mut list = TopicPartitionList::new();
    for (topic, partition, offset) in &commits {
        list.add_partition_offset(topic, *partition, Offset::Offset(*offset))?;
    }
    consumer.commit(&list, mode)?;
    Ok(commits.len())
}

pub type TelemetryConsumer = StreamConsumer<SourceContext>;

/// Creates the group consumer and subscribes it to `topics`.
pub fn subscribe(
    settings: &KafkaSettings,
    topics: &[String],
    health: Arc<Health>,
    metrics: Arc<Metrics>,
) -> Result<(TelemetryConsumer, Arc<Mutex<OffsetTracker>>), KafkaError> {
    let tracker = Arc::new(Mutex::new(OffsetTracker::default()));
    let consumer: TelemetryConsumer = client_config(settings)
        .set("group.id", &settings.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000")
        // Latency: librdkafka backs a partition off for fetch.error.backoff.ms
        // (500 ms) after a fetch answered with an error code, which tansu does
        // for fetches that find nothing new; at low rates that backoff sat in
        // every sample's latency (p50 0.7 s at 1,000 samples/s, 49 ms after).
        .set("fetch.wait.max.ms", "5")
        .set("fetch.error.backoff.ms", "5")
        .set("statistics.interval.ms", "5000")
        .create_with_context(SourceContext {
            tracker: tracker.clone(),
            health,
            metrics,
        })?;
    let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics)?;
    Ok((consumer, tracker))
}

/// What the source needs besides the consumer.
pub struct SourceParts {
    pub decoder: Decoder,
    pub publisher: Publisher,
    pub samples: mpsc::Sender<Sample>,
    pub acks: mpsc::UnboundedReceiver<Vec<Origin>>,
    pub shutdown: watch::Receiver<bool>,
    pub commit_interval: Duration,
    pub metrics: Arc<Metrics>,
}

/// Consumes until shutdown is announced, then waits for every outstanding
/// record to become durable (the sink closes the ack channel when it is done)
/// and commits once more.
pub async fn consume(
    consumer: TelemetryConsumer,
    tracker: Arc<Mutex<OffsetTracker>>,
    parts: SourceParts,
) {
    let SourceParts {
        decoder,
        publisher,
        samples,
        mut acks,
        mut shutdown,
        commit_interval,
        metrics,
    } = parts;
    let mut commit_tick = tokio::time::interval(commit_interval);
    commit_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let lock = || tracker.lock().expect("tracker updates never panic");
    loop {
        tokio::select! {
            biased;
            _ = shutdown.changed() => break,
            Some(done) = acks.recv() => {
                let mut tracker = lock();
                for origin in done {
                    tracker.done(origin);
                }
            }
            _ = commit_tick.tick() => {
                if let Err(err) = commit(&consumer, &mut lock(), CommitMode::Async) {
                    tracing::warn!(error = %err, "offset commit failed; retrying at the next interval");
                }
            }
            message = consumer.recv() => {
                let message = match message {
                    Ok(message) => message,
                    Err(err) => {
                        tracing::warn!(error = %err, "Kafka consumer error");
                        continue;
                    }
                };
                let origin = {
                    let mut tracker = lock();
                    let partition = tracker.partition_index(message.topic(), message.partition());
                    let origin = Origin { partition, offset: message.offset() };
                    tracker.consumed(origin);
                    origin
                };
                let fallback_ts = message
                    .timestamp()
                    .to_millis()
                    .and_then(DateTime::from_timestamp_millis)
                    .unwrap_or_else(Utc::now);
                match decoder.decode(message.payload(), Some(message.topic()), fallback_ts) {
                    Ok(mut sample) => {
                        sample.origin = Some(origin);
                        if samples.send(sample).await.is_err() {
                            break; // The processor stopped; shut down.
                        }
                    }
                    Err(rejection) => {
                        let source = format!("{}/{}/{}", message.topic(), message.partition(), message.offset());
                        metrics.dead_letters.with_label_values(&[rejection.reason.code()]).inc();
                        tracing::debug!(reason = rejection.reason.code(), %source, "record dead-lettered");
                        let mut delay = Duration::from_millis(100);
                        while let Err(err) =
                            publisher.dead_letter(message.key(), message.payload(), &rejection, &source).await
                        {
                            tracing::warn!(error = %err, "dead-lettering failed; retrying");
                            tokio::time::sleep(delay).await;
                            delay = (delay * 2).min(Duration::from_secs(5));
                        }
                        lock().done(origin);
                    }
                }
            }
        }
    }
    // Stop feeding the processor; it drains and closes the sink, which
    // closes the ack channel once the last batch is durable.
    drop(samples);
    while let Some(done) = acks.recv().await {
        let mut tracker = lock();
        for origin in done {
            tracker.done(origin);
        }
    }
    match commit(&consumer, &mut lock(), CommitMode::Sync) {
        Ok(n) => tracing::info!(partitions = n, "final offsets committed"),
        Err(err) => {
            tracing::warn!(error = %err, "final offset commit failed; records since the last commit will be reprocessed")
        }
    }
}
