//! The durable end of the pipeline: gathers outputs into write batches,
//! commits them to PostgreSQL and the output topics, then acknowledges the
//! records they came from so their offsets can be committed.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
    time::Duration,
};

use chrono::{DateTime, Utc};
use rdkafka::{
    consumer::{Consumer, ConsumerGroupMetadata},
    Offset, TopicPartitionList,
};
use tokio::{
    sync::{mpsc, watch},
    time::{sleep_until, Instant},
};

use crate::{
    config::SinkSettings,
    engine::{Checkpoint, Outputs},
    health::{Health, Stage},
    kafka::{
        consumer::TelemetryConsumer, offsets::Commit, OffsetTracker, OutputRecord, PublishError,
        Publisher, Topic,
    },
    metrics::Metrics,
    postgres::{self, PgWriter},
    retry::Backoff,
    telemetry::Origin,
};

/// Batches committed to PostgreSQL and not yet taken by the commit stage.
/// Bounds the memory a slow broker holds; past it, writing waits.
const MAX_BATCHES_IN_FLIGHT: usize = 8;
/// Score rows the commit stage takes in while a transaction is in flight,
/// beyond which the writer waits for it.
const MAX_ROWS_ARRIVING: usize = 200_000;

/// What the sink needs besides the engine's outputs.
pub struct SinkParts {
    /// Writes score, forecast and event rows.
    pub pg: PgWriter,
    /// Writes checkpoints, after their records' offsets are committed.
    pub checkpoint_pg: PgWriter,
    pub publisher: Publisher,
    /// The group consumer the offsets are committed for (its group
    /// metadata fences a transaction from an assignment that has ended).
    pub consumer: Arc<TelemetryConsumer>,
    pub settings: SinkSettings,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    pub partitions: Arc<Mutex<OffsetTracker>>,
    /// Turns true when shutdown begins: the source stops polling the
    /// consumer then, so the group must not be rejoined.
    pub shutdown: watch::Receiver<bool>,
}

/// Why the sink stopped before its input closed.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error(transparent)]
    Publish(#[from] PublishError),
    #[error("the sink's commit task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

impl SinkError {
    /// The error's kind, for metric labels and log fields.
    pub fn error_type(&self) -> &'static str {
        match self {
            SinkError::Publish(e) => e.error_type(),
            SinkError::Task(_) => "task_failed",
        }
    }
}

/// Writes until `outputs` closes and its last batch is committed.
///
/// Two stages, so that a sample's score row waits for its own batch's write
/// and not for the broker: this task gathers a batch, commits its rows to
/// PostgreSQL and moves on; [`commit_loop`] publishes the batches' records
/// with the offsets they settle, then writes their checkpoints.
pub async fn write_loop(
    mut outputs: mpsc::Receiver<Outputs>,
    parts: SinkParts,
) -> Result<(), SinkError> {
    let SinkParts {
        mut pg,
        checkpoint_pg,
        publisher,
        consumer,
        settings,
        metrics,
        health,
        partitions,
        shutdown,
    } = parts;
    let (committed_tx, committed_rx) = mpsc::channel(MAX_BATCHES_IN_FLIGHT);
    let stage = CommitStage {
        publisher,
        consumer,
        pg: checkpoint_pg,
        tracker: partitions,
        metrics: metrics.clone(),
        health: health.clone(),
        held: VecDeque::new(),
        held_checkpoints: HashMap::new(),
        draining: false,
        shutdown,
        settled_ts: Vec::new(),
    };
    let committing = tokio::spawn(commit_loop(committed_rx, stage, settings.commit_interval()));
    let mut open = true;
    while open {
        let Some(first) = outputs.recv().await else {
            break;
        };
        let mut batch = first;
        let deadline = Instant::now() + settings.max_batch_delay();
        while batch.scores.len() < settings.max_batch_rows {
            tokio::select! {
                next = outputs.recv() => match next {
                    Some(mut more) => batch.append(&mut more),
                    None => { open = false; break; }
                },
                _ = sleep_until(deadline) => break,
            }
        }
        write_rows(&mut pg, &batch, &metrics, &health).await;
        let committed = std::time::Instant::now();
        for received in batch.scores.iter().filter_map(|row| row.received) {
            let own = committed.saturating_duration_since(received);
            metrics.processing_latency.observe(own.as_secs_f64());
        }
        if committed_tx.send(batch).await.is_err() {
            break; // The commit stage stopped; its error says why.
        }
    }
    drop(committed_tx);
    committing.await?
}

/// Publishes and commits whatever batches have come in, one transaction at
/// a time: whatever queued up while the last one was in flight goes out as
/// one, so under load there are fewer, larger transactions. Also commits on
/// `commit_interval` when only offsets moved (dead letters, duplicates).
async fn commit_loop(
    mut committed: mpsc::Receiver<Outputs>,
    mut stage: CommitStage,
    commit_interval: Duration,
) -> Result<(), SinkError> {
    let mut tick = tokio::time::interval(commit_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut open = true;
    // Batches taken in while a transaction is in flight: the writer keeps
    // committing rows to PostgreSQL meanwhile instead of waiting on the
    // broker (a transaction takes tens to hundreds of milliseconds here).
    let mut arrived: Option<Outputs> = None;
    while open {
        if arrived.is_none() {
            tokio::select! {
                batch = committed.recv() => match batch {
                    Some(batch) => arrived = Some(batch),
                    None => open = false,
                },
                _ = tick.tick() => {}
            }
        }
        if let Some(mut batch) = arrived.take() {
            while let Ok(mut more) = committed.try_recv() {
                batch.append(&mut more);
            }
            stage.hold(batch);
        }
        let commit = stage.commit();
        tokio::pin!(commit);
        loop {
            let room = arrived
                .as_ref()
                .is_none_or(|b| b.scores.len() < MAX_ROWS_ARRIVING);
            tokio::select! {
                result = &mut commit => {
                    result?;
                    break;
                }
                batch = committed.recv(), if open && room => match batch {
                    Some(mut batch) => match &mut arrived {
                        Some(all) => all.append(&mut batch),
                        None => arrived = Some(batch),
                    },
                    None => open = false,
                },
            }
        }
    }
    // The last batches: everything done by now is committed.
    if let Some(batch) = arrived.take() {
        stage.hold(batch);
    }
    stage.draining = true;
    stage.commit().await?;
    Ok(())
}

/// Holds each output record until the offset of the sample that caused it
/// can be committed, then publishes it in the same transaction as that
/// offset. So a record is published exactly when its offset is committed:
/// after a crash or a rebalance, whoever resumes from the committed offsets
/// publishes exactly what was not published yet (records below them are
/// scored again for the tables, but not published again).
struct CommitStage {
    publisher: Publisher,
    consumer: Arc<TelemetryConsumer>,
    pg: PgWriter,
    /// Which records are done, which partitions are still ours.
    tracker: Arc<Mutex<OffsetTracker>>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    /// Records waiting for their offsets, in the order they were made (a
    /// channel's records in its seq order).
    held: VecDeque<(Origin, OutputRecord)>,
    /// Each channel's latest checkpoint waiting for its last record's offset.
    held_checkpoints: HashMap<ustr::Ustr, Checkpoint>,
    /// Set for the final commit at shutdown, when the source no longer
    /// polls the consumer: a fenced producer is then not followed by a
    /// rejoin of the group.
    draining: bool,
    /// True once shutdown has begun, possibly while a transaction is still
    /// in flight before the final commit: no rejoin either (with no one
    /// polling, librdkafka aborts when the consumer is destroyed; a CI run
    /// of tests/cluster.rs saw it).
    shutdown: watch::Receiver<bool>,
    /// Sample times of the rows settled since the last commit, for the
    /// end-to-end latency.
    settled_ts: Vec<DateTime<Utc>>,
}

impl CommitStage {
    /// Takes a batch whose rows are in PostgreSQL: its records wait for
    /// their offsets, which are now done.
    fn hold(&mut self, batch: Outputs) {
        let events = batch.events.iter().map(|e| {
            let json = serde_json::to_string(e).expect("events serialise");
            (e.origin, Topic::Anomalies, e.channel, json)
        });
        let forecasts = batch.forecasts.iter().map(|f| {
            let json = serde_json::to_string(f).expect("forecasts serialise");
            (f.origin, Topic::Forecasts, f.channel, json)
        });
        for (origin, topic, key, payload) in events.chain(forecasts) {
            if let Some(origin) = origin {
                let record = OutputRecord {
                    topic,
                    key,
                    payload,
                };
                self.held.push_back((origin, record));
            }
        }
        for checkpoint in batch.checkpoints {
            let slot = self
                .held_checkpoints
                .entry(checkpoint.channel)
                .or_insert_with(|| checkpoint.clone());
            // Later: a larger seq, or on the same partition a window that
            // starts further on (the numbering may go back after a glitch;
            // the offsets do not).
            if checkpoint.last_seq >= slot.last_seq
                || (checkpoint.partition == slot.partition
                    && checkpoint.refill_from >= slot.refill_from)
            {
                *slot = checkpoint;
            }
        }
        self.settled_ts
            .extend(batch.scores.iter().map(|row| row.ts));
        let mut tracker = self.tracker.lock().expect("tracker updates never panic");
        for origin in batch.done {
            tracker.done(origin);
        }
    }

    /// Publishes the records whose offsets can now be committed, with those
    /// offsets, retrying (after a rollback) until it is done; then writes
    /// the checkpoints they cover.
    async fn commit(&mut self) -> Result<(), PublishError> {
        let mut backoff = Backoff::new();
        // From the first attempt that has offsets to commit to the one that
        // succeeds.
        let mut publishing = None;
        loop {
            let (records, checkpoints, commits, group) = self.release();
            if commits.is_empty() {
                return Ok(());
            }
            publishing.get_or_insert_with(|| self.health.begin(Stage::Kafka));
            let mut offsets = TopicPartitionList::new();
            for c in &commits {
                offsets
                    .add_partition_offset(&c.topic, c.partition, Offset::Offset(c.offset))
                    .expect("a valid offset");
            }
            let publisher = self.publisher.clone();
            let consumer = self.consumer.clone();
            let payloads: Vec<OutputRecord> = records.iter().map(|(_, r)| r.clone()).collect();
            let result = tokio::task::spawn_blocking(move || {
                publisher.commit(&payloads, &offsets, group.as_ref(), consumer.as_ref())
            })
            .await
            .expect("the commit call does not panic");
            match result {
                Ok(()) => {
                    drop(publishing);
                    self.health.set_kafka_publish(None);
                    let now = Utc::now();
                    for ts in self.settled_ts.drain(..) {
                        let latency = (now - ts).to_std().unwrap_or_default();
                        self.metrics
                            .end_to_end_latency
                            .observe(latency.as_secs_f64());
                    }
                    write_checkpoints(
                        &mut self.pg,
                        &checkpoints,
                        &self.tracker,
                        &self.metrics,
                        &self.health,
                    )
                    .await;
                    return Ok(());
                }
                Err(PublishError::Retry(err)) => {
                    self.metrics.kafka_publish_failures.inc();
                    tracing::warn!(error = %err, retry_in_ms = backoff.next_ms(), "publishing outputs to Kafka failed; rolled back, retrying");
                    self.health.set_kafka_publish(Some(err.to_string()));
                    // Put everything back as it was; the next round filters
                    // out what a rebalance has taken away meanwhile.
                    self.tracker
                        .lock()
                        .expect("tracker updates never panic")
                        .rewind(&commits);
                    for held in records.into_iter().rev() {
                        self.held.push_front(held);
                    }
                    for c in checkpoints {
                        self.held_checkpoints.entry(c.channel).or_insert(c);
                    }
                    backoff.wait().await;
                }
                Err(PublishError::Fatal(err)) => {
                    self.metrics.kafka_publish_failures.inc();
                    self.health.set_kafka_publish(Some(err.to_string()));
                    tracing::warn!(error = %err, "the transactional producer was fenced; resuming from the committed offsets with a new one");
                    self.resume_from_committed(&commits).await;
                    drop((records, checkpoints));
                }
            }
        }
    }

    /// After a fatal producer error (a transaction that timed out while a
    /// broker failed over is fenced by the coordinator): a new producer
    /// under the same `transactional.id`, and the partitions assigned
    /// afresh by leaving and rejoining the group, so that they start again
    /// from the committed offsets and checkpoints, and everything held here
    /// belongs to an assignment that has ended. Nothing that was not
    /// committed is lost: it is processed again.
    async fn resume_from_committed(&mut self, commits: &[Commit]) {
        {
            let mut tracker = self.tracker.lock().expect("tracker updates never panic");
            tracker.rewind(commits);
            // At once, before the group hears of it: nothing consumed so far
            // may be published or committed by the new producer.
            tracker.revoke_all();
        }
        self.held.clear();
        self.held_checkpoints.clear();
        if self.draining || *self.shutdown.borrow() {
            // Shutting down, with the source no longer polling: no new
            // producer and no rejoin. The open transaction is aborted by the
            // coordinator (or at once by this instance's restart), and the
            // partitions' next owner processes again what was not committed.
            tracing::warn!("shutting down with a fenced producer: what was not committed is processed again after the restart");
            return;
        }
        let mut backoff = Backoff::new();
        loop {
            let mut publisher = self.publisher.clone();
            let renewed =
                tokio::task::spawn_blocking(move || publisher.renew().map(|()| publisher))
                    .await
                    .expect("renewing the producer does not panic");
            match renewed {
                Ok(publisher) => {
                    self.publisher = publisher;
                    break;
                }
                Err(err) => {
                    tracing::warn!(error = %err, retry_in_ms = backoff.next_ms(), "cannot make a new transactional producer yet");
                    backoff.wait().await;
                }
            }
        }
        let rejoined = self.consumer.subscription().and_then(|topics| {
            let names: Vec<String> = topics
                .elements()
                .iter()
                .map(|e| e.topic().to_owned())
                .collect();
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            self.consumer.unsubscribe();
            self.consumer.subscribe(&names)
        });
        match rejoined {
            Ok(()) => tracing::info!(
                "rejoined the consumer group: partitions resume from the committed offsets"
            ),
            Err(err) => tracing::error!(error = %err, "cannot rejoin the consumer group"),
        }
    }

    /// Under the tracker's lock: drops what is no longer ours to publish,
    /// takes the partitions' new commit positions, and the records and
    /// checkpoints below them; and the group's metadata as of then. The
    /// rebalance callbacks take the same lock, so the generation the
    /// transaction will be fenced by is the one the records were checked
    /// against.
    #[allow(clippy::type_complexity)]
    fn release(
        &mut self,
    ) -> (
        Vec<(Origin, OutputRecord)>,
        Vec<Checkpoint>,
        Vec<Commit>,
        Option<ConsumerGroupMetadata>,
    ) {
        let mut tracker = self.tracker.lock().expect("tracker updates never panic");
        let group = self.consumer.group_metadata();
        self.held
            .retain(|(origin, _)| tracker.is_ours_to_publish(*origin));
        self.held_checkpoints.retain(|_, c| {
            c.last_origin
                .is_some_and(|o| tracker.generation(o.partition) == o.generation)
        });
        let commits = tracker.take_commits();
        drop(tracker);
        let position = |origin: &Origin| {
            commits
                .iter()
                .find(|c| c.index == origin.partition && c.generation == origin.generation)
                .map(|c| c.offset)
        };
        let mut records = Vec::new();
        let mut kept = VecDeque::with_capacity(self.held.len());
        for (origin, record) in self.held.drain(..) {
            if position(&origin).is_some_and(|to| origin.offset < to) {
                records.push((origin, record));
            } else {
                kept.push_back((origin, record));
            }
        }
        self.held = kept;
        let mut checkpoints = Vec::new();
        self.held_checkpoints.retain(|_, c| {
            let origin = c.last_origin.expect("kept only with an origin");
            if position(&origin).is_some_and(|to| origin.offset < to) {
                checkpoints.push(c.clone());
                false
            } else {
                true
            }
        });
        (records, checkpoints, commits, group)
    }
}

/// Commits one batch's rows, retrying until they are: records are only
/// published after this returns, so giving up would lose them.
async fn write_rows(pg: &mut PgWriter, batch: &Outputs, metrics: &Metrics, health: &Arc<Health>) {
    let _writing = health.begin(Stage::Postgres);
    let mut backoff = Backoff::new();
    loop {
        match pg.write(batch).await {
            Ok(elapsed) => {
                metrics
                    .postgres_write_seconds
                    .observe(elapsed.as_secs_f64());
                metrics
                    .rows_written
                    .with_label_values(&["scores"])
                    .inc_by(batch.scores.len() as u64);
                metrics
                    .rows_written
                    .with_label_values(&["forecasts"])
                    .inc_by(batch.forecasts.len() as u64);
                health.set_postgres(None);
                return;
            }
            Err(err) => {
                metrics.postgres_write_failures.inc();
                tracing::warn!(error = %err, retry_in_ms = backoff.next_ms(), "write to PostgreSQL failed");
                health.set_postgres(Some(err.to_string()));
                backoff.wait().await;
            }
        }
    }
}

/// Records each channel's checkpoint once the offset of its last record is
/// committed (a checkpoint ahead of the commit would let a restart skip
/// outputs that were never published), retrying until it is written.
async fn write_checkpoints(
    pg: &mut PgWriter,
    checkpoints: &[Checkpoint],
    partitions: &Mutex<OffsetTracker>,
    metrics: &Metrics,
    health: &Arc<Health>,
) {
    if checkpoints.is_empty() {
        return;
    }
    let _writing = health.begin(Stage::Postgres);
    let names: Vec<(String, i32)> = {
        let tracker = partitions.lock().expect("tracker updates never panic");
        checkpoints
            .iter()
            .map(|c| {
                tracker
                    .partition_name(c.partition)
                    .map(|(t, p)| (t.to_owned(), p))
                    .expect("checkpoints come from consumed partitions")
            })
            .collect()
    };
    let rows: Vec<postgres::StoredCheckpoint> = checkpoints
        .iter()
        .zip(&names)
        .map(
            |(checkpoint, (topic, partition))| postgres::StoredCheckpoint {
                topic,
                partition: *partition,
                checkpoint,
            },
        )
        .collect();
    let mut backoff = Backoff::new();
    while let Err(err) = pg.write_checkpoints(&rows).await {
        metrics.postgres_write_failures.inc();
        tracing::warn!(error = %err, retry_in_ms = backoff.next_ms(), "writing checkpoints to PostgreSQL failed");
        health.set_postgres(Some(err.to_string()));
        backoff.wait().await;
    }
}
