//! PostgreSQL: schema migrations at start, and batched, idempotent writes.
//!
//! A write batch is one transaction: rows are COPYed (binary) into
//! transaction-local staging tables and moved with `ON CONFLICT DO NOTHING`,
//! so a batch written twice (after a crash or a rebalance) leaves one row per
//! sample. Event rows are upserted by `event_id` and never go from `closed`
//! back to `open`.
//!
//! Every connection (migrations, the writer, the readiness probe, checkpoint
//! loads) goes through one [`PgConnector`], so all of them use the same TLS
//! settings.

use std::{error::Error as _, path::Path, sync::Arc, time::Instant};

use openssl::{
    ssl::{SslConnector, SslFiletype, SslMethod, SslVerifyMode},
    x509::{store::X509StoreBuilder, X509},
};
use postgres_openssl::MakeTlsConnector;
use tokio_postgres::{config::SslMode, types::ToSql, Client, Statement};

use crate::{
    config::PostgresSettings,
    detect::Cause,
    engine::{Checkpoint, Outputs},
};

/// Ordered migrations; the index + 1 is the schema version.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE IF NOT EXISTS scores (
    channel text NOT NULL,
    seq bigint NOT NULL,
    ts timestamptz NOT NULL,
    score real NOT NULL,
    threshold real NOT NULL,
    anomalous boolean NOT NULL,
    model_version int NOT NULL,
    PRIMARY KEY (channel, seq)
);
CREATE TABLE IF NOT EXISTS forecasts (
    channel text NOT NULL,
    seq bigint NOT NULL,
    horizon real[] NOT NULL,
    model_version int NOT NULL,
    PRIMARY KEY (channel, seq)
);
CREATE TABLE IF NOT EXISTS anomaly_events (
    event_id text PRIMARY KEY,
    channel text NOT NULL,
    subsystem text NOT NULL,
    state text NOT NULL CHECK (state IN ('open', 'closed')),
    start_seq bigint NOT NULL,
    end_seq bigint,
    start_ts timestamptz NOT NULL,
    end_ts timestamptz,
    peak_score real NOT NULL,
    threshold real NOT NULL,
    model text NOT NULL,
    model_version int NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS anomaly_events_channel_start ON anomaly_events (channel, start_seq);
"#,
    r#"
CREATE TABLE IF NOT EXISTS channel_checkpoints (
    channel text PRIMARY KEY,
    topic text NOT NULL,
    partition int NOT NULL,
    last_seq bigint NOT NULL,
    refill_from bigint NOT NULL,
    detector jsonb NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS channel_checkpoints_partition ON channel_checkpoints (topic, partition);
"#,
    // The score part that opened an event (null for events opened before).
    r#"
ALTER TABLE anomaly_events ADD COLUMN IF NOT EXISTS cause text
    CHECK (cause IN ('surprise', 'level', 'excursion', 'stuck', 'burst'));
"#,
];

/// The ordered migrations (the index + 1 is the schema version), for what
/// reads the schema from them rather than from a database.
pub fn migrations() -> &'static [&'static str] {
    MIGRATIONS
}

/// Serialises concurrent migrations from instances starting together.
const MIGRATION_LOCK: i64 = 0x5a7_3a7c;

#[derive(Debug, thiserror::Error)]
#[error("PostgreSQL: {0}")]
pub struct PgError(String);

impl From<tokio_postgres::Error> for PgError {
    fn from(err: tokio_postgres::Error) -> Self {
        // tokio-postgres's Display hides the server's message behind "db
        // error", and every other cause (refused, TLS, ...) behind its kind.
        match err.as_db_error() {
            Some(db) => PgError(format!("{}: {}", db.code().code(), db.message())),
            None => PgError(with_causes(&err)),
        }
    }
}

impl From<openssl::error::ErrorStack> for PgError {
    fn from(err: openssl::error::ErrorStack) -> Self {
        PgError(format!("TLS setup: {err}"))
    }
}

/// An error and its causes on one line. None of tokio-postgres's causes
/// carries the connection string's values (a parse error names the option,
/// not its value), so the password cannot reach the message this way.
fn with_causes(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut cause = err.source();
    while let Some(c) = cause {
        let more = c.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        cause = c.source();
    }
    text
}

/// How satwatch reaches PostgreSQL: the connection settings parsed once at
/// start, and one TLS connector built from the `[postgres]` settings. Cheap
/// to clone (the OpenSSL context is reference-counted).
///
/// TLS uses OpenSSL through `postgres-openssl`, not rustls: librdkafka's
/// `ssl` feature already links OpenSSL, so this adds no second TLS stack, and
/// it reads the same PEM files libpq users already have.
#[derive(Clone)]
pub struct PgConnector {
    config: tokio_postgres::Config,
    tls: MakeTlsConnector,
    /// What the server's certificate is checked against, for error messages.
    trust: Arc<str>,
}

impl PgConnector {
    /// Parses the URL and builds the TLS connector; refuses unreadable or
    /// contradictory TLS files at start rather than at the first connection.
    pub fn new(settings: &PostgresSettings) -> Result<Self, PgError> {
        let url = settings.url.as_deref().ok_or_else(|| {
            PgError(
                "no connection URL: set DATABASE_URL or [postgres] url in the pipeline file".into(),
            )
        })?;
        let config: tokio_postgres::Config = url.parse().map_err(|e: tokio_postgres::Error| {
            PgError(format!(
                "the connection URL (DATABASE_URL or [postgres] url) is not valid: {}",
                with_causes(&e)
            ))
        })?;
        let (tls, trust) = tls_connector(settings)?;
        Ok(Self {
            config,
            tls,
            trust: trust.into(),
        })
    }

    /// Connects; the connection's driver runs on its own task.
    pub async fn connect(&self) -> Result<Client, PgError> {
        let (client, connection) = self
            .config
            .connect(self.tls.clone())
            .await
            .map_err(|e| self.explain(e))?;
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                tracing::debug!(error = %err, "PostgreSQL connection ended");
            }
        });
        Ok(client)
    }

    /// A connection error, with what to check when TLS was the trouble.
    fn explain(&self, err: tokio_postgres::Error) -> PgError {
        let tls_failed = err.as_db_error().is_none()
            && err
                .to_string()
                .starts_with("error performing TLS handshake");
        if !tls_failed {
            return err.into();
        }
        let cause = err.source().map(with_causes).unwrap_or_default();
        if cause.contains("server does not support TLS") {
            return PgError(
                "TLS required (sslmode=require) but the server does not support TLS".into(),
            );
        }
        // postgres-openssl puts OpenSSL's verification verdict last, after
        // the error stack's code and source position.
        if cause.contains("certificate verify failed") {
            let verdict = cause.rsplit(": ").next().unwrap_or(&cause);
            return PgError(format!(
                "TLS handshake failed: the server's certificate was not accepted ({verdict}); \
                 it is checked against {} and its name against the URL's host",
                self.trust
            ));
        }
        PgError(format!("TLS handshake failed: {cause}"))
    }

    /// The URL's `sslmode`, for the start-up log.
    pub fn ssl_mode(&self) -> &'static str {
        match self.config.get_ssl_mode() {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            _ => "other",
        }
    }

    /// What the server's certificate is checked against.
    pub fn trust(&self) -> &str {
        &self.trust
    }
}

/// The TLS connector for `settings`, and a description of what it trusts.
///
/// With a CA file, the server's certificate must chain to it (the system
/// store is not consulted, like libpq's `sslrootcert`); without one, to the
/// system's trust store. Either way its name must match the URL's host (DNS
/// name or IP address). Only `tls_skip_verify = true` turns both off.
fn tls_connector(settings: &PostgresSettings) -> Result<(MakeTlsConnector, String), PgError> {
    // Sets the system trust store, peer verification and modern defaults.
    let mut builder = SslConnector::builder(SslMethod::tls_client())?;
    let trust = match (&settings.ca_file, settings.tls_skip_verify) {
        (Some(_), true) => return Err(PgError(
            "[postgres] tls_skip_verify = true contradicts a CA file (ca_file or PGSSLROOTCERT): \
                 drop one"
                .into(),
        )),
        (None, true) => {
            builder.set_verify(SslVerifyMode::NONE);
            "nothing ([postgres] tls_skip_verify = true)".to_owned()
        }
        (Some(path), false) => {
            let certs = read_certificates(path)?;
            let mut store = X509StoreBuilder::new()?;
            for cert in certs {
                store.add_cert(cert)?;
            }
            builder.set_cert_store(store.build());
            format!("the CA file {}", path.display())
        }
        (None, false) => {
            "the system trust store (no CA file: set PGSSLROOTCERT or [postgres] ca_file)"
                .to_owned()
        }
    };
    match (&settings.client_cert_file, &settings.client_key_file) {
        (None, None) => {}
        (Some(cert), Some(key)) => {
            builder
                .set_certificate_chain_file(cert)
                .map_err(|e| file_error("client certificate", cert, &e))?;
            builder
                .set_private_key_file(key, SslFiletype::PEM)
                .map_err(|e| file_error("client key", key, &e))?;
            builder.check_private_key().map_err(|e| {
                PgError(format!(
                    "the client key {} does not belong to the client certificate {}: {e}",
                    key.display(),
                    cert.display()
                ))
            })?;
        }
        _ => {
            return Err(PgError(
                "a client certificate needs both a certificate and a key file \
                 ([postgres] client_cert_file and client_key_file, or PGSSLCERT and PGSSLKEY)"
                    .into(),
            ))
        }
    }
    let mut tls = MakeTlsConnector::new(builder.build());
    if settings.tls_skip_verify {
        tls.set_callback(|config, _host| {
            config.set_verify_hostname(false);
            Ok(())
        });
    }
    Ok((tls, trust))
}

fn read_certificates(path: &Path) -> Result<Vec<X509>, PgError> {
    let pem = std::fs::read(path)
        .map_err(|e| PgError(format!("cannot read the CA file {}: {e}", path.display())))?;
    let certs = X509::stack_from_pem(&pem).map_err(|e| file_error("CA file", path, &e))?;
    if certs.is_empty() {
        return Err(PgError(format!(
            "the CA file {} holds no PEM certificate",
            path.display()
        )));
    }
    Ok(certs)
}

fn file_error(what: &str, path: &Path, err: &openssl::error::ErrorStack) -> PgError {
    PgError(format!(
        "cannot use the {what} {} (PEM expected): {err}",
        path.display()
    ))
}

/// Creates or migrates the schema to the current version.
pub async fn migrate(client: &mut Client) -> Result<u32, PgError> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS satwatch_migrations (version int PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())",
    )
    .await?;
    let current: i32 = tx
        .query_one(
            "SELECT coalesce(max(version), 0) FROM satwatch_migrations",
            &[],
        )
        .await?
        .get(0);
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        tx.batch_execute(sql).await?;
        tx.execute(
            "INSERT INTO satwatch_migrations (version) VALUES ($1)",
            &[&(i as i32 + 1)],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(MIGRATIONS.len() as u32)
}

/// Answers whether PostgreSQL is reachable, over a connection of its own so
/// that readiness reflects an outage even while nothing is being written.
pub struct Probe {
    connector: PgConnector,
    client: Option<Client>,
}

impl Probe {
    pub fn new(connector: PgConnector) -> Self {
        Self {
            connector,
            client: None,
        }
    }

    pub async fn check(&mut self) -> Result<(), PgError> {
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            self.client = Some(self.connector.connect().await?);
        }
        let client = self.client.as_ref().expect("connected above");
        if let Err(err) = client.simple_query("SELECT 1").await {
            self.client = None;
            return Err(err.into());
        }
        Ok(())
    }
}

/// Writes output batches over one connection, reconnecting after failures.
pub struct PgWriter {
    connector: PgConnector,
    connection: Option<(Client, Statements)>,
}

/// The writes' statements, prepared once per connection.
struct Statements {
    rows: Statement,
    event: Statement,
    checkpoints: Statement,
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

/// Upserts channel checkpoints given as one array per column; a checkpoint
/// never replaces a later one: later means a larger seq, or on the same
/// partition a window that starts further on (a channel's numbering may go
/// back after a glitch, see [`crate::engine::SeqOrder`]; its offsets do not).
const UPSERT_CHECKPOINTS: &str = "
INSERT INTO channel_checkpoints (channel, topic, partition, last_seq, refill_from, detector, updated_at)
SELECT c, t, p, s, r, d::jsonb, now()
FROM unnest($1::text[], $2::text[], $3::int4[], $4::int8[], $5::int8[], $6::text[]) AS u(c, t, p, s, r, d)
ON CONFLICT (channel) DO UPDATE SET topic = excluded.topic, partition = excluded.partition,
    last_seq = excluded.last_seq, refill_from = excluded.refill_from,
    detector = excluded.detector, updated_at = now()
WHERE channel_checkpoints.last_seq < excluded.last_seq
    OR ((channel_checkpoints.topic, channel_checkpoints.partition) = (excluded.topic, excluded.partition)
        AND channel_checkpoints.refill_from < excluded.refill_from)";

impl PgWriter {
    pub fn new(connector: PgConnector) -> Self {
        Self {
            connector,
            connection: None,
        }
    }

    async fn connection(&mut self) -> Result<&mut (Client, Statements), PgError> {
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
            states.push(
                serde_json::to_string(&c.checkpoint.state)
                    .map_err(|e| PgError(format!("detector state to JSON: {e}")))?,
            );
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
            let detector = serde_json::from_str(&detector).map_err(|e| {
                PgError(format!(
                    "channel_checkpoints row for {channel} does not hold a detector state this version reads: {e}"
                ))
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
