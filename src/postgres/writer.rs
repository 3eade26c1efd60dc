//! Batched, idempotent writes of the engine's outputs.
//!
//! A write batch is one statement (one transaction when it also moves
//! events): rows go in as one array per column with `ON CONFLICT DO
//! NOTHING`, so a batch written twice (after a crash or a rebalance) leaves
//! one row per sample. Event rows are upserted by `event_id` and never go from `closed`
//! back to `open`.

use std::time::Instant;

use tokio_postgres::{types::ToSql, Client, Statement};

use super::{checkpoints::UPSERT_CHECKPOINTS, PgConnector, PgError};
use crate::{detect::Cause, engine::Outputs};

/// Writes output batches over one connection, reconnecting after failures.
pub struct PgWriter {
    connector: PgConnector,
    /// Dropped after a failed write, so the next attempt starts clean.
    pub(super) connection: Option<(Client, Statements)>,
}

/// The writes' statements, prepared once per connection.
pub(super) struct Statements {
    rows: Statement,
    event: Statement,
    pub(super) checkpoints: Statement,
}

/// Inserts a batch's scores and forecasts in one statement, so a write costs
/// one round trip (in its own transaction, or inside one that also upserts
/// events). Rows come as one array per column; forecasts' horizons are
/// concatenated in `$11`, row i's being `$11[$12[i] : $12[i] + $13[i] - 1]`.
/// Rows already present (a replay after a restart) are left as they are:
/// they hold the same values.
const INSERT_ROWS: &str = "
WITH scored AS (
    INSERT INTO scores (channel, seq, ts, score, threshold, anomalous, model_version)
    SELECT * FROM unnest($1::text[], $2::int8[], $3::timestamptz[], $4::float4[], $5::float4[],
                         $6::bool[], $7::int4[])
    ON CONFLICT (channel, seq) DO NOTHING
), forecast AS (
    INSERT INTO forecasts (channel, seq, horizon, model_version)
    SELECT channel, seq, ($11::float4[])[first : first + len - 1], model_version
    FROM unnest($8::text[], $9::int8[], $10::int4[], $12::int4[], $13::int4[])
        AS f(channel, seq, model_version, first, len)
    ON CONFLICT (channel, seq) DO NOTHING
)
SELECT 1";

/// Opens or moves an event; a closed event is final.
const UPSERT_EVENT: &str = "
INSERT INTO anomaly_events (event_id, channel, subsystem, state, start_seq, end_seq, start_ts,
    end_ts, peak_score, threshold, model, model_version, cause, updated_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, now())
ON CONFLICT (event_id) DO UPDATE SET state = excluded.state, end_seq = excluded.end_seq,
    end_ts = excluded.end_ts, peak_score = excluded.peak_score, updated_at = now()
WHERE anomaly_events.state = 'open'";

impl PgWriter {
    pub fn new(connector: PgConnector) -> Self {
        Self {
            connector,
            connection: None,
        }
    }

    pub(super) async fn connection(&mut self) -> Result<&mut (Client, Statements), PgError> {
        if self
            .connection
            .as_ref()
            .is_none_or(|(client, _)| client.is_closed())
        {
            let client = self.connector.connect().await?;
            let statements = Statements {
                rows: client.prepare(INSERT_ROWS).await?,
                event: client.prepare(UPSERT_EVENT).await?,
                checkpoints: client.prepare(UPSERT_CHECKPOINTS).await?,
            };
            self.connection = Some((client, statements));
        }
        Ok(self.connection.as_mut().expect("connected above"))
    }

    /// Writes one batch atomically. On error the connection is dropped so the
    /// next attempt starts clean.
    pub async fn write(&mut self, outputs: &Outputs) -> Result<std::time::Duration, PgError> {
        let started = Instant::now();
        let result = self.write_once(outputs).await;
        if result.is_err() {
            self.connection = None;
        }
        result.map(|()| started.elapsed())
    }

    async fn write_once(&mut self, outputs: &Outputs) -> Result<(), PgError> {
        if outputs.scores.is_empty() && outputs.forecasts.is_empty() && outputs.events.is_empty() {
            return Ok(());
        }
        let (client, statements) = self.connection().await?;
        let rows = RowColumns::new(outputs);
        if outputs.events.is_empty() {
            // One statement is one transaction: one round trip.
            client.execute(&statements.rows, &rows.params()).await?;
            return Ok(());
        }
        let tx = client.transaction().await?;
        tx.execute(&statements.rows, &rows.params()).await?;
        for e in &outputs.events {
            let start_seq = e.start_seq as i64;
            let end_seq = e.end_seq.map(|s| s as i64);
            let version = e.model_version as i32;
            tx.execute(
                &statements.event,
                &[
                    &e.event_id,
                    &&*e.channel,
                    &&*e.subsystem,
                    &e.state.as_str(),
                    &start_seq,
                    &end_seq,
                    &e.start_ts,
                    &e.end_ts,
                    &e.peak_score,
                    &e.threshold,
                    &&*e.model,
                    &version,
                    &e.cause.map(Cause::as_str),
                ],
            )
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }
}

/// A batch's scores and forecasts as the column arrays of [`INSERT_ROWS`].
struct RowColumns<'a> {
    score_channel: Vec<&'a str>,
    score_seq: Vec<i64>,
    score_ts: Vec<chrono::DateTime<chrono::Utc>>,
    score: Vec<f32>,
    threshold: Vec<f32>,
    anomalous: Vec<bool>,
    score_version: Vec<i32>,
    forecast_channel: Vec<&'a str>,
    forecast_seq: Vec<i64>,
    forecast_version: Vec<i32>,
    horizons: Vec<f32>,
    horizon_first: Vec<i32>,
    horizon_len: Vec<i32>,
}

impl<'a> RowColumns<'a> {
    fn new(outputs: &'a Outputs) -> Self {
        let scores = &outputs.scores;
        let forecasts = &outputs.forecasts;
        let mut horizons = Vec::with_capacity(forecasts.iter().map(|f| f.horizon.len()).sum());
        let mut horizon_first = Vec::with_capacity(forecasts.len());
        for f in forecasts {
            // SQL arrays count from 1.
            horizon_first.push(horizons.len() as i32 + 1);
            horizons.extend_from_slice(&f.horizon);
        }
        Self {
            score_channel: scores.iter().map(|r| &*r.channel).collect(),
            score_seq: scores.iter().map(|r| r.seq as i64).collect(),
            score_ts: scores.iter().map(|r| r.ts).collect(),
            score: scores.iter().map(|r| r.score).collect(),
            threshold: scores.iter().map(|r| r.threshold).collect(),
            anomalous: scores.iter().map(|r| r.anomalous).collect(),
            score_version: scores.iter().map(|r| r.model_version as i32).collect(),
            forecast_channel: forecasts.iter().map(|f| &*f.channel).collect(),
            forecast_seq: forecasts.iter().map(|f| f.seq as i64).collect(),
            forecast_version: forecasts.iter().map(|f| f.model_version as i32).collect(),
            horizons,
            horizon_first,
            horizon_len: forecasts.iter().map(|f| f.horizon.len() as i32).collect(),
        }
    }

    fn params(&self) -> [&(dyn ToSql + Sync); 13] {
        [
            &self.score_channel,
            &self.score_seq,
            &self.score_ts,
            &self.score,
            &self.threshold,
            &self.anomalous,
            &self.score_version,
            &self.forecast_channel,
            &self.forecast_seq,
            &self.forecast_version,
            &self.horizons,
            &self.horizon_first,
            &self.horizon_len,
        ]
    }
}
