//! The durable end of the pipeline: gathers outputs into write batches,
//! commits them to PostgreSQL and the output topics, then acknowledges the
//! records they came from so their offsets can be committed.

pub mod kafka;
pub mod postgres;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use chrono::Utc;
use tokio::{
    sync::mpsc,
    time::{sleep, sleep_until, Instant},
};

use crate::{
    config::SinkSettings,
    engine::{Checkpoint, Outputs},
    health::Health,
    metrics::Metrics,
    source::OffsetTracker,
    telemetry::Origin,
};

pub use kafka::Publisher;
pub use postgres::PgWriter;

/// Retries start here and double up to [`MAX_RETRY_DELAY`].
const FIRST_RETRY_DELAY: Duration = Duration::from_millis(100);
const MAX_RETRY_DELAY: Duration = Duration::from_secs(5);

/// Batches committed to PostgreSQL whose records may still be waiting to be
/// published. Bounds the memory a slow broker holds; past it, writing waits.
const MAX_BATCHES_IN_FLIGHT: usize = 8;

/// What the sink needs besides the engine's outputs.
pub struct SinkParts {
    /// Writes score, forecast and event rows.
    pub pg: PgWriter,
    /// Writes checkpoints, after their batch's records are published.
    pub checkpoint_pg: PgWriter,
    pub publisher: Publisher,
    /// Where the source learns which records are durable.
    pub acks: mpsc::UnboundedSender<Vec<Origin>>,
    pub settings: SinkSettings,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    pub partitions: Arc<Mutex<OffsetTracker>>,
}

/// Writes until `outputs` closes and its last batch is durable.
///
/// Two stages, so that a sample's score row waits for its own batch's write
/// and not for the broker: this task gathers a batch, commits its rows to
/// PostgreSQL and moves on; [`publish_loop`] publishes the committed batches'
/// records in order, then writes their checkpoints and acknowledges their
/// source records.
pub async fn write_loop(mut outputs: mpsc::Receiver<Outputs>, parts: SinkParts) {
    let SinkParts {
        mut pg,
        checkpoint_pg,
        publisher,
        acks,
        settings,
        metrics,
        health,
        partitions,
    } = parts;
    let (committed_tx, committed_rx) = mpsc::channel(MAX_BATCHES_IN_FLIGHT);
    let publishing = tokio::spawn(publish_loop(
        committed_rx,
        checkpoint_pg,
        publisher,
        acks,
        metrics.clone(),
        health.clone(),
        partitions,
    ));
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
            tracing::error!(
                "the sink's publishing task stopped; outputs are no longer acknowledged"
            );
            break;
        }
    }
    drop(committed_tx);
    if let Err(err) = publishing.await {
        tracing::error!(error = %err, "the sink's publishing task failed");
    }
}

/// Publishes committed batches in order. Whatever has queued up while the
/// broker acknowledged the last lot goes out as one: under load, fewer and
/// larger produce requests. Once records are acknowledged, writes the
/// batches' checkpoints and acknowledges their source records, so offsets and
/// checkpoints only ever cover durable outputs.
async fn publish_loop(
    mut committed: mpsc::Receiver<Outputs>,
    mut pg: PgWriter,
    publisher: Publisher,
    acks: mpsc::UnboundedSender<Vec<Origin>>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    partitions: Arc<Mutex<OffsetTracker>>,
) {
    while let Some(mut batch) = committed.recv().await {
        while let Ok(mut more) = committed.try_recv() {
            batch.append(&mut more);
        }
        publish_records(&publisher, &batch, &metrics).await;
        write_checkpoints(&mut pg, &batch.checkpoints, &partitions, &metrics, &health).await;
        let now = Utc::now();
        for row in &batch.scores {
            let latency = (now - row.ts).to_std().unwrap_or_default();
            metrics.end_to_end_latency.observe(latency.as_secs_f64());
        }
        if !batch.done.is_empty() && acks.send(batch.done).is_err() {
            tracing::debug!("offset tracker is gone; acknowledgements dropped");
        }
    }
}

/// Commits one batch's rows, retrying until they are: records are only
/// acknowledged after this returns, so giving up would lose them.
async fn write_rows(pg: &mut PgWriter, batch: &Outputs, metrics: &Metrics, health: &Health) {
    let mut delay = FIRST_RETRY_DELAY;
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
                tracing::warn!(error = %err, retry_in_ms = delay.as_millis() as u64, "write to PostgreSQL failed");
                health.set_postgres(Some(err.to_string()));
                sleep(delay).await;
                delay = (delay * 2).min(MAX_RETRY_DELAY);
            }
        }
    }
}

/// Publishes one batch's records, retrying (the whole batch) until the
/// broker has acknowledged them all.
async fn publish_records(publisher: &Publisher, batch: &Outputs, metrics: &Metrics) {
    let mut delay = FIRST_RETRY_DELAY;
    while let Err(err) = publisher.publish(batch).await {
        metrics.kafka_publish_failures.inc();
        tracing::warn!(error = %err, retry_in_ms = delay.as_millis() as u64, "publishing outputs to Kafka failed");
        sleep(delay).await;
        delay = (delay * 2).min(MAX_RETRY_DELAY);
    }
}

/// Records each channel's latest checkpoint in the batch, once the batch's
/// rows and records are durable (a checkpoint ahead of them would skip
/// outputs that never landed), retrying until it is written.
async fn write_checkpoints(
    pg: &mut PgWriter,
    checkpoints: &[Checkpoint],
    partitions: &Mutex<OffsetTracker>,
    metrics: &Metrics,
    health: &Health,
) {
    if checkpoints.is_empty() {
        return;
    }
    let mut latest: HashMap<&str, &Checkpoint> = HashMap::new();
    for c in checkpoints {
        let slot = latest.entry(&c.channel).or_insert(c);
        if c.last_seq > slot.last_seq {
            *slot = c;
        }
    }
    let names: Vec<(String, i32)> = {
        let tracker = partitions.lock().expect("tracker updates never panic");
        latest
            .values()
            .map(|c| {
                tracker
                    .partition_name(c.partition)
                    .map(|(t, p)| (t.to_owned(), p))
                    .expect("checkpoints come from consumed partitions")
            })
            .collect()
    };
    let rows: Vec<postgres::StoredCheckpoint> = latest
        .values()
        .zip(&names)
        .map(
            |(checkpoint, (topic, partition))| postgres::StoredCheckpoint {
                topic,
                partition: *partition,
                checkpoint,
            },
        )
        .collect();
    let mut delay = FIRST_RETRY_DELAY;
    while let Err(err) = pg.write_checkpoints(&rows).await {
        metrics.postgres_write_failures.inc();
        tracing::warn!(error = %err, retry_in_ms = delay.as_millis() as u64, "writing checkpoints to PostgreSQL failed");
        health.set_postgres(Some(err.to_string()));
        sleep(delay).await;
        delay = (delay * 2).min(MAX_RETRY_DELAY);
    }
}
