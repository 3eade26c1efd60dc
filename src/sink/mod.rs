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

/// Writes until `outputs` closes and its last batch is durable.
pub async fn write_loop(
    mut outputs: mpsc::Receiver<Outputs>,
    mut pg: PgWriter,
    publisher: Publisher,
    acks: mpsc::UnboundedSender<Vec<Origin>>,
    settings: SinkSettings,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    partitions: Arc<Mutex<OffsetTracker>>,
) {
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
        flush(&mut pg, &publisher, &batch, &metrics, &health).await;
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

/// Makes one batch durable, retrying until it is: records are only
/// acknowledged after this returns, so giving up would lose them. PostgreSQL
/// and Kafka are written concurrently; each retries on its own.
async fn flush(
    pg: &mut PgWriter,
    publisher: &Publisher,
    batch: &Outputs,
    metrics: &Metrics,
    health: &Health,
) {
    let rows = async {
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
                    break;
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
    };
    let records = async {
        let mut delay = FIRST_RETRY_DELAY;
        while let Err(err) = publisher.publish(batch).await {
            metrics.kafka_publish_failures.inc();
            tracing::warn!(error = %err, retry_in_ms = delay.as_millis() as u64, "publishing outputs to Kafka failed");
            sleep(delay).await;
            delay = (delay * 2).min(MAX_RETRY_DELAY);
        }
    };
    tokio::join!(rows, records);
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
