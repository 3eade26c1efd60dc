//! The source: a consumer group over the telemetry topics.
//!
//! Records are decoded and validated; good samples go on to the processor,
//! bad ones to the dead-letter topic with their reason. Every record's offset
//! is held in the [`OffsetTracker`] until what it caused is durable; the sink
//! commits it then, with the records it caused (see `crate::sink`).

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use chrono::{DateTime, Utc};
use rdkafka::{
    consumer::{
        BaseConsumer, Consumer, ConsumerContext, Rebalance, RebalanceProtocol, StreamConsumer,
    },
    error::KafkaError,
    message::Message,
    types::RDKafkaRespErr,
    ClientContext, Offset, TopicPartitionList,
};
use tokio::sync::{mpsc, watch};

use super::{client::consumer_config, DeadLetters, OffsetTracker};
use crate::{
    config::KafkaSettings,
    engine::{Input, Outputs, Restore},
    health::Health,
    metrics::Metrics,
    postgres,
    retry::Backoff,
    telemetry::{Decoder, Origin, Refused},
};

/// Rebalance hooks: end the assignment of partitions that go (nothing of
/// theirs still in flight is published or committed from here), start
/// assigned partitions where their channels' checkpoints say, and keep
/// readiness up to date.
pub struct SourceContext {
    tracker: Arc<Mutex<OffsetTracker>>,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    checkpoints: CheckpointSource,
}

/// Where assigned partitions' checkpoints come from, and where the restores
/// wait for the consume loop to pass them on ahead of the partitions' records.
struct CheckpointSource {
    postgres: postgres::PgConnector,
    runtime: tokio::runtime::Handle,
    restores: Arc<Mutex<Vec<Restore>>>,
}

/// How long to wait for the group's committed offsets while assigning.
const COMMITTED_TIMEOUT: Duration = Duration::from_secs(10);

impl SourceContext {
    /// Sets each assigned partition's start offset: the earliest sample that
    /// any of its channels needs to refill its window, or the group's
    /// committed offset if that is earlier; and queues its channels' restore.
    fn resume_from_checkpoints(
        &self,
        consumer: &BaseConsumer<Self>,
        assigned: &mut TopicPartitionList,
    ) {
        // Without the committed offsets a partition cannot start: they say
        // which records' outputs were published already. A transaction a
        // crashed instance left open holds them (as unstable) until it is
        // aborted, by that instance's restart or its timeout: wait it out.
        let committed = loop {
            match consumer.committed_offsets(assigned.clone(), COMMITTED_TIMEOUT) {
                Ok(list) => break list,
                Err(err) => {
                    tracing::warn!(error = %err, "cannot read the committed offsets yet; retrying");
                    std::thread::sleep(Duration::from_millis(500));
                }
            }
        };
        let partitions: Vec<(String, i32, u32)> = {
            let mut tracker = self.tracker.lock().expect("tracker updates never panic");
            assigned
                .elements()
                .iter()
                .map(|e| {
                    let index = tracker.partition_index(e.topic(), e.partition());
                    (e.topic().to_owned(), e.partition(), index)
                })
                .collect()
        };
        let mut checkpoints = self.load_checkpoints(&partitions);
        let mut restores = Vec::with_capacity(partitions.len());
        for (topic, partition, index) in partitions {
            let committed =
                committed
                    .find_partition(&topic, partition)
                    .and_then(|e| match e.offset() {
                        Offset::Offset(o) => Some(o),
                        _ => None,
                    });
            self.tracker
                .lock()
                .expect("tracker updates never panic")
                .assigned(index, committed);
            let (mine, others) = checkpoints.into_iter().partition(|c| c.partition == index);
            checkpoints = others;
            let restore = Restore {
                partition: index,
                committed,
                checkpoints: mine,
            };
            let refill_from = restore.checkpoints.iter().map(|c| c.refill_from).min();
            // With no committed offset every record may be unprocessed: start
            // at the beginning (checkpointed channels skip what they covered).
            let start = match committed {
                Some(c) => Offset::Offset(refill_from.map_or(c, |r| r.min(c))),
                None => Offset::Beginning,
            };
            if let Err(err) = assigned.set_partition_offset(&topic, partition, start) {
                tracing::warn!(error = %err, %topic, partition, "cannot set the start offset");
            }
            tracing::debug!(%topic, partition, ?committed, ?start, channels = restore.checkpoints.len(), "partition resumes");
            restores.push(restore);
        }
        let restored: usize = restores.iter().map(|r| r.checkpoints.len()).sum();
        tracing::info!(
            partitions = restores.len(),
            channels = restored,
            "resuming from channel checkpoints"
        );
        self.checkpoints
            .restores
            .lock()
            .expect("restore queue updates never panic")
            .extend(restores);
    }

    /// Blocks until the checkpoints are read, retrying through outages: a
    /// partition must not start without them.
    fn load_checkpoints(
        &self,
        partitions: &[(String, i32, u32)],
    ) -> Vec<crate::engine::Checkpoint> {
        let load = async {
            let mut backoff = Backoff::new();
            loop {
                match postgres::load_checkpoints(&self.checkpoints.postgres, partitions).await {
                    Ok(checkpoints) => break checkpoints,
                    Err(err) => {
                        tracing::warn!(error = %err, retry_in_ms = backoff.next_ms(), "cannot read channel checkpoints");
                        self.health.set_postgres(Some(err.to_string()));
                        backoff.wait().await;
                    }
                }
            }
        };
        let runtime = &self.checkpoints.runtime;
        // Rebalance callbacks run inside the consumer's poll, on a runtime
        // worker: let the runtime move its other tasks elsewhere meanwhile.
        match tokio::runtime::Handle::try_current() {
            Ok(current)
                if current.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread =>
            {
                tokio::task::block_in_place(|| runtime.block_on(load))
            }
            _ => runtime.block_on(load),
        }
    }
}

impl ClientContext for SourceContext {
    /// librdkafka's periodic statistics carry each assigned partition's end
    /// (the last stable offset, for a read_committed consumer), so no extra
    /// broker calls; the committed position is the tracker's, since the
    /// offsets are committed by the sink's producer, which this consumer
    /// does not hear of.
    fn stats(&self, statistics: rdkafka::Statistics) {
        let tracker = self.tracker.lock().expect("tracker updates never panic");
        for (topic, stats) in &statistics.topics {
            for (partition, p) in &stats.partitions {
                // Partition -1 is librdkafka's internal "unassigned" queue.
                if *partition < 0 || !p.desired {
                    continue;
                }
                let end = if p.ls_offset >= 0 {
                    p.ls_offset
                } else {
                    p.hi_offset
                };
                let Some(committed) = tracker.committed(topic, *partition) else {
                    continue;
                };
                if end < 0 {
                    continue;
                }
                self.metrics
                    .consumer_lag
                    .with_label_values(&[topic, &partition.to_string()])
                    .set((end - committed).max(0));
            }
        }
    }
}

impl ConsumerContext for SourceContext {
    /// librdkafka's rebalance, with the assigned partitions' start offsets set
    /// from the checkpoints before they are assigned (so nothing is fetched
    /// from anywhere else first).
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        partitions: &mut TopicPartitionList,
    ) {
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                self.resume_from_checkpoints(consumer, partitions);
                let result = if cooperative {
                    consumer.incremental_assign(partitions)
                } else {
                    consumer.assign(partitions)
                };
                if let Err(err) = result {
                    tracing::error!(error = %err, "assigning partitions failed");
                }
                self.post_rebalance(consumer, &Rebalance::Assign(partitions));
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                self.pre_rebalance(consumer, &Rebalance::Revoke(partitions));
                let result = if cooperative {
                    consumer.incremental_unassign(partitions)
                } else {
                    consumer.unassign()
                };
                if let Err(err) = result {
                    tracing::error!(error = %err, "unassigning partitions failed");
                }
                self.post_rebalance(consumer, &Rebalance::Revoke(partitions));
            }
            other => {
                let err = KafkaError::Rebalance(other.into());
                if let Err(err) = consumer.unassign() {
                    tracing::error!(error = %err, "unassigning partitions failed");
                }
                self.post_rebalance(consumer, &Rebalance::Error(err));
            }
        }
    }

    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(revoked) = rebalance {
            let mut tracker = self.tracker.lock().expect("tracker updates never panic");
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

pub type TelemetryConsumer = StreamConsumer<SourceContext>;

/// The consumer and what the consume loop shares with its rebalance hooks.
pub struct Subscription {
    /// Shared with the sink, which commits the offsets.
    pub consumer: Arc<TelemetryConsumer>,
    pub tracker: Arc<Mutex<OffsetTracker>>,
    pub restores: Arc<Mutex<Vec<Restore>>>,
}

/// Creates the group consumer and subscribes it to `topics`. Partitions start
/// from the channel checkpoints in the database `postgres` reaches.
pub fn subscribe(
    settings: &KafkaSettings,
    topics: &[String],
    postgres: &postgres::PgConnector,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
) -> Result<Subscription, KafkaError> {
    let tracker = Arc::new(Mutex::new(OffsetTracker::default()));
    let restores = Arc::new(Mutex::new(Vec::new()));
    let mut config = consumer_config(settings, &settings.group_id);
    if !settings.client.contains_key("statistics.interval.ms") {
        config.set("statistics.interval.ms", "5000");
    }
    let consumer: TelemetryConsumer = config.create_with_context(SourceContext {
        tracker: tracker.clone(),
        health,
        metrics,
        checkpoints: CheckpointSource {
            postgres: postgres.clone(),
            runtime: tokio::runtime::Handle::current(),
            restores: restores.clone(),
        },
    })?;
    let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics)?;
    Ok(Subscription {
        consumer: Arc::new(consumer),
        tracker,
        restores,
    })
}

/// How often consumer lag is read from the brokers. The statistics
/// callback above only runs while the consume loop polls, which stops
/// while intake waits on a stalled stage: this keeps the lag current then.
const LAG_INTERVAL: Duration = Duration::from_secs(2);
/// How long one partition's end offset may take to read.
const END_OFFSET_TIMEOUT: Duration = Duration::from_secs(2);

/// Reads every assigned partition's lag on [`LAG_INTERVAL`], publishes it
/// and reports the group's position to readiness (records waiting while
/// no committed offset moves is a stall), until `shutdown` flips.
pub fn spawn_lag_watch(
    consumer: Arc<TelemetryConsumer>,
    tracker: Arc<Mutex<OffsetTracker>>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    mut shutdown: watch::Receiver<bool>,
) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(LAG_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = tick.tick() => {}
            }
            let (consumer, tracker, metrics) = (consumer.clone(), tracker.clone(), metrics.clone());
            // librdkafka's calls block: off the runtime's workers.
            let read = tokio::task::spawn_blocking(move || read_lag(&consumer, &tracker, &metrics));
            if let Ok(Some((waiting, committed))) = read.await {
                health.set_consumer_position(waiting, committed, std::time::Instant::now());
            }
        }
    });
}

/// Sets the lag of every assigned partition whose commit position is
/// known; returns the records waiting and the sum of the commit positions,
/// or `None` when a partition's end could not be read.
fn read_lag(
    consumer: &TelemetryConsumer,
    tracker: &Mutex<OffsetTracker>,
    metrics: &Metrics,
) -> Option<(i64, i64)> {
    let assignment = consumer.assignment().ok()?;
    let (mut waiting, mut committed_sum) = (0, 0);
    for e in assignment.elements() {
        // The last stable offset, for a read_committed consumer, like the
        // statistics' `ls_offset`.
        let (_, end) = consumer
            .fetch_watermarks(e.topic(), e.partition(), END_OFFSET_TIMEOUT)
            .ok()?;
        let committed = tracker
            .lock()
            .expect("tracker updates never panic")
            .committed(e.topic(), e.partition());
        let Some(committed) = committed else {
            continue;
        };
        let lag = (end - committed).max(0);
        metrics
            .consumer_lag
            .with_label_values(&[e.topic(), &e.partition().to_string()])
            .set(lag);
        waiting += lag;
        committed_sum += committed;
    }
    Some((waiting, committed_sum))
}

/// What the source needs besides the consumer.
pub struct SourceParts {
    pub decoder: Decoder,
    pub dead_letters: DeadLetters,
    pub samples: mpsc::Sender<Input>,
    /// Records the processor refused (duplicate seqs), to dead-letter.
    pub refused: mpsc::Receiver<Refused>,
    /// The sink's input, never sent on: held by the dead-letter task so
    /// that the sink's final commit waits until the last dead letter is
    /// durable (the processor refuses records until it has drained).
    pub sink: mpsc::Sender<Outputs>,
    pub shutdown: watch::Receiver<bool>,
    pub metrics: Arc<Metrics>,
    /// `[kafka] max_uncommitted_per_partition`: records waiting on one
    /// partition at which it is paused (see [`offsets`]).
    pub max_uncommitted_per_partition: usize,
}

/// How often paused partitions are checked for having drained.
const RESUME_CHECK_INTERVAL: Duration = Duration::from_millis(100);

/// Pauses (or resumes) fetching `partition` of `topic`.
fn set_paused(consumer: &TelemetryConsumer, topic: &str, partition: i32, pause: bool) {
    let mut list = TopicPartitionList::new();
    list.add_partition(topic, partition);
    let result = if pause {
        consumer.pause(&list)
    } else {
        consumer.resume(&list)
    };
    if let Err(err) = result {
        tracing::warn!(error = %err, %topic, partition, pause, "cannot pause or resume the partition");
    }
}

/// Consumes until shutdown is announced, then stops feeding the processor,
/// which drains into the sink; the sink makes the final commit.
pub async fn consume(subscription: Subscription, parts: SourceParts) {
    let Subscription {
        consumer,
        tracker,
        restores,
    } = subscription;
    // Per partition index: the committed offset at its assignment. Records
    // below it were dealt with before, dead letters included.
    let mut replay_below: Vec<Option<i64>> = Vec::new();
    let SourceParts {
        decoder,
        dead_letters,
        samples,
        refused,
        sink,
        mut shutdown,
        metrics,
        max_uncommitted_per_partition: max_uncommitted,
    } = parts;
    let mut resume_check = tokio::time::interval(RESUME_CHECK_INTERVAL);
    resume_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let lock = || tracker.lock().expect("tracker updates never panic");
    let (letters, queued) = mpsc::channel(MAX_DEAD_LETTERS_QUEUED);
    let dead_lettering = tokio::spawn(dead_letter_loop(
        Letters { queued, refused },
        dead_letters,
        tracker.clone(),
        metrics.clone(),
        sink,
    ));
    loop {
        tokio::select! {
            biased;
            _ = shutdown.changed() => break,
            // Ahead of the records, which never let it run otherwise under
            // load; ready ten times a second.
            _ = resume_check.tick() => {
                let resumable = lock().take_resumable(max_uncommitted);
                for (topic, partition) in resumable {
                    set_paused(&consumer, &topic, partition, false);
                    tracing::info!(%topic, partition, "partition resumed: its waiting records drained");
                }
                metrics.partitions_paused.set(lock().paused() as i64);
            }
            message = consumer.recv() => {
                let received = std::time::Instant::now();
                let message = match message {
                    Ok(message) => message,
                    Err(err) => {
                        tracing::warn!(error = %err, "Kafka consumer error");
                        continue;
                    }
                };
                // Restores queued by this poll's rebalance go ahead of the
                // assigned partitions' first records.
                let queued = std::mem::take(&mut *restores.lock().expect("restore queue updates never panic"));
                for restore in queued {
                    let p = restore.partition as usize;
                    if replay_below.len() <= p {
                        replay_below.resize(p + 1, None);
                    }
                    replay_below[p] = restore.committed;
                    if samples.send(Input::Restore(restore)).await.is_err() {
                        break;
                    }
                }
                let origin = {
                    let mut tracker = lock();
                    let partition = tracker.partition_index(message.topic(), message.partition());
                    let origin = Origin {
                        partition,
                        generation: tracker.generation(partition),
                        offset: message.offset(),
                    };
                    tracker.consumed(origin);
                    if let Some(waiting) = tracker.pause_if_full(partition, max_uncommitted) {
                        set_paused(&consumer, message.topic(), message.partition(), true);
                        metrics.partitions_paused.set(tracker.paused() as i64);
                        tracing::warn!(
                            topic = message.topic(), partition = message.partition(), waiting,
                            committed = tracker.committed(message.topic(), message.partition()),
                            "partition paused: [kafka] max_uncommitted_per_partition records wait \
                             behind its oldest unfinished one (a held model's channel?); it resumes \
                             once they drain to half that"
                        );
                    }
                    origin
                };
                let fallback_ts = message
                    .timestamp()
                    .to_millis()
                    .and_then(DateTime::from_timestamp_millis)
                    .unwrap_or_else(Utc::now);
                let decoded = decoder
                    .decode(message.payload(), Some(message.topic()), fallback_ts)
                    .and_then(|s| decoder.check_key(&s, message.key()).map(|()| s));
                match decoded {
                    Ok(mut sample) => {
                        sample.origin = Some(origin);
                        sample.received = Some(received);
                        sample.payload = message.payload().map(Box::from);
                        if samples.send(Input::Sample(sample)).await.is_err() {
                            break; // The processor stopped; shut down.
                        }
                    }
                    Err(_) if replay_below
                        .get(origin.partition as usize)
                        .copied()
                        .flatten()
                        .is_some_and(|committed| origin.offset < committed) =>
                    {
                        // Dead-lettered before the restart.
                        lock().done(origin);
                    }
                    Err(rejection) => {
                        let source = format!("{}/{}/{}", message.topic(), message.partition(), message.offset());
                        metrics.dead_letters.with_label_values(&[rejection.reason.code()]).inc();
                        tracing::debug!(reason = rejection.reason.code(), %source, "record dead-lettered");
                        let letter = DeadLetter {
                            key: message.key().map(<[u8]>::to_vec),
                            payload: message.payload().map(<[u8]>::to_vec),
                            rejection,
                            source,
                            origin,
                        };
                        // Waits only when MAX_DEAD_LETTERS_QUEUED are queued.
                        if letters.send(letter).await.is_err() {
                            break;
                        }
                    }
                }
            }
        }
    }
    // Stop feeding the processor; it drains into the sink, refusing what
    // it refuses to the dead-letter task, which ends once the processor has
    // and its dead letters are durable; only then does the sink make its
    // final commit (the task holds the sink's input open), so that commit
    // covers every dead letter.
    drop(samples);
    drop(letters);
    if let Err(err) = dead_lettering.await {
        tracing::error!(error = %err, "the dead-letter task failed");
    }
}

/// Dead letters queued by the consume loop, beyond which it waits: a flood
/// of bad records is bounded in memory, and good records never wait on the
/// broker's acknowledgement of a bad one.
const MAX_DEAD_LETTERS_QUEUED: usize = 10_000;
/// Dead letters handed to the producer and not yet acknowledged.
const MAX_DEAD_LETTERS_IN_FLIGHT: usize = 1_000;

/// A bad record on its way to the dead-letter topic.
struct DeadLetter {
    key: Option<Vec<u8>>,
    payload: Option<Vec<u8>>,
    rejection: crate::telemetry::Rejection,
    /// topic/partition/offset, for the `satwatch-source` header.
    source: String,
    origin: Origin,
}

/// What the dead-letter task takes in: the source's rejections, and the
/// records the processor refused.
struct Letters {
    queued: mpsc::Receiver<DeadLetter>,
    refused: mpsc::Receiver<Refused>,
}

/// Publishes dead letters in the order they come, many in flight at once,
/// each retried until the broker has it; then marks its record done. Ends
/// once both inputs have closed and the last dead letter is durable.
async fn dead_letter_loop(
    letters: Letters,
    dead_letters: DeadLetters,
    tracker: Arc<Mutex<OffsetTracker>>,
    metrics: Arc<Metrics>,
    _sink: mpsc::Sender<Outputs>,
) {
    use futures::stream::{FuturesOrdered, StreamExt};
    let Letters {
        mut queued,
        mut refused,
    } = letters;
    let mut in_flight = FuturesOrdered::new();
    let (mut open, mut refused_open) = (true, true);
    while open || refused_open || !in_flight.is_empty() {
        let room = in_flight.len() < MAX_DEAD_LETTERS_IN_FLIGHT;
        let letter = tokio::select! {
            letter = queued.recv(), if open && room => match letter {
                Some(letter) => letter,
                None => {
                    open = false;
                    continue;
                }
            },
            refusal = refused.recv(), if refused_open && room => match refusal {
                Some(refusal) => match refused_letter(refusal, &tracker, &metrics) {
                    Some(letter) => letter,
                    None => continue,
                },
                None => {
                    refused_open = false;
                    continue;
                }
            },
            Some(origin) = in_flight.next(), if !in_flight.is_empty() => {
                tracker.lock().expect("tracker updates never panic").done(origin);
                continue;
            }
        };
        let dead_letters = dead_letters.clone();
        in_flight.push_back(async move {
            let DeadLetter {
                key,
                payload,
                rejection,
                source,
                origin,
            } = letter;
            let mut backoff = Backoff::new();
            while let Err(err) = dead_letters
                .dead_letter(key.as_deref(), payload.as_deref(), &rejection, &source)
                .await
            {
                tracing::warn!(error = %err, %source, retry_in_ms = backoff.next_ms(), "dead-lettering failed; retrying");
                backoff.wait().await;
            }
            origin
        });
    }
}

/// The dead letter of a record the processor refused; None, with the record
/// marked done, when it is not this assignment's to dead-letter: below the
/// offset committed at its partition's assignment (dead-lettered before,
/// and refused again only while its channel's window refills), or consumed
/// under an assignment that has ended (its next owner deals with it).
fn refused_letter(
    refusal: Refused,
    tracker: &Mutex<OffsetTracker>,
    metrics: &Metrics,
) -> Option<DeadLetter> {
    let Refused {
        origin,
        key,
        payload,
        rejection,
    } = refusal;
    let source = {
        let mut tracker = tracker.lock().expect("tracker updates never panic");
        match tracker.partition_name(origin.partition) {
            Some((topic, partition)) if tracker.is_ours_to_publish(origin) => {
                format!("{topic}/{partition}/{}", origin.offset)
            }
            _ => {
                tracker.done(origin);
                return None;
            }
        }
    };
    metrics
        .dead_letters
        .with_label_values(&[rejection.reason.code()])
        .inc();
    tracing::debug!(reason = rejection.reason.code(), %source, "record dead-lettered");
    Some(DeadLetter {
        key: Some(key.as_bytes().to_vec()),
        payload: Some(payload.into_vec()),
        rejection,
        source,
        origin,
    })
}
