//! Channel checkpoints: each channel's detector state and where its window
//! refills from, written once its records' offsets are committed (one ahead
//! of the commit would let a restart skip outputs that were never
//! published), and read when its partition is assigned.

use super::{PgConnector, PgError, PgWriter};
use crate::engine::Checkpoint;

/// Upserts channel checkpoints given as one array per column; a checkpoint
/// never replaces a later one: later means a larger seq, or on the same
/// partition a window that starts further on (a channel's numbering may go
/// back after a glitch, see [`crate::engine::SeqOrder`]; its offsets do not).
pub(super) const UPSERT_CHECKPOINTS: &str = "
INSERT INTO channel_checkpoints (channel, topic, partition, last_seq, refill_from, detector, updated_at)
SELECT c, t, p, s, r, d::jsonb, now()
FROM unnest($1::text[], $2::text[], $3::int4[], $4::int8[], $5::int8[], $6::text[]) AS u(c, t, p, s, r, d)
ON CONFLICT (channel) DO UPDATE SET topic = excluded.topic, partition = excluded.partition,
    last_seq = excluded.last_seq, refill_from = excluded.refill_from,
    detector = excluded.detector, updated_at = now()
WHERE channel_checkpoints.last_seq < excluded.last_seq
    OR ((channel_checkpoints.topic, channel_checkpoints.partition) = (excluded.topic, excluded.partition)
        AND channel_checkpoints.refill_from < excluded.refill_from)";

/// A checkpoint with its partition named, as stored.
pub struct StoredCheckpoint<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub checkpoint: &'a Checkpoint,
}

impl PgWriter {
    /// Upserts channel checkpoints. A checkpoint never replaces a later one:
    /// an instance that lost a partition may still be finishing its older
    /// work while the new owner has moved on.
    pub async fn write_checkpoints(
        &mut self,
        checkpoints: &[StoredCheckpoint<'_>],
    ) -> Result<(), PgError> {
        if checkpoints.is_empty() {
            return Ok(());
        }
        let result = self.write_checkpoints_once(checkpoints).await;
        if result.is_err() {
            self.connection = None;
        }
        result
    }

    async fn write_checkpoints_once(
        &mut self,
        checkpoints: &[StoredCheckpoint<'_>],
    ) -> Result<(), PgError> {
        let mut channels = Vec::with_capacity(checkpoints.len());
        let mut topics = Vec::with_capacity(checkpoints.len());
        let mut partitions = Vec::with_capacity(checkpoints.len());
        let mut seqs = Vec::with_capacity(checkpoints.len());
        let mut refills = Vec::with_capacity(checkpoints.len());
        let mut states = Vec::with_capacity(checkpoints.len());
        for c in checkpoints {
            channels.push(&*c.checkpoint.channel);
            topics.push(c.topic);
            partitions.push(c.partition);
            seqs.push(c.checkpoint.last_seq as i64);
            refills.push(c.checkpoint.refill_from);
            states.push(serde_json::to_string(&c.checkpoint.state)?);
        }
        let (client, statements) = self.connection().await?;
        client
            .execute(
                &statements.checkpoints,
                &[&channels, &topics, &partitions, &seqs, &refills, &states],
            )
            .await?;
        Ok(())
    }
}

/// The checkpoints of the channels that the `partitions` (topic, partition,
/// [`Origin::partition`] index) carry, over a connection of its own (this
/// runs while partitions are being assigned).
///
/// [`Origin::partition`]: crate::telemetry::Origin
pub async fn load_checkpoints(
    connector: &PgConnector,
    partitions: &[(String, i32, u32)],
) -> Result<Vec<Checkpoint>, PgError> {
    let client = connector.connect().await?;
    let topics: Vec<&str> = partitions.iter().map(|(t, ..)| t.as_str()).collect();
    let numbers: Vec<i32> = partitions.iter().map(|(_, p, _)| *p).collect();
    let rows = client
        .query(
            "SELECT channel, topic, partition, last_seq, refill_from, detector::text FROM channel_checkpoints
             WHERE (topic, partition) IN (SELECT * FROM unnest($1::text[], $2::int4[]))",
            &[&topics, &numbers],
        )
        .await?;
    rows.iter()
        .map(|row| {
            let channel: String = row.get(0);
            let (topic, partition): (String, i32) = (row.get(1), row.get(2));
            let index = partitions
                .iter()
                .find(|(t, p, _)| *t == topic && *p == partition)
                .map(|(.., i)| *i)
                .expect("the query selects assigned partitions only");
            let detector: String = row.get(5);
            let detector = serde_json::from_str(&detector).map_err(|e| PgError::Checkpoint {
                channel: channel.clone(),
                reason: e.to_string(),
            })?;
            Ok(Checkpoint {
                channel: channel.as_str().into(),
                partition: index,
                last_seq: row.get::<_, i64>(3) as u64,
                refill_from: row.get(4),
                state: detector,
                last_origin: None,
            })
        })
        .collect()
}
