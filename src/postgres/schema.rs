//! The schema, as ordered migrations applied at start.

use tokio_postgres::Client;

use super::PgError;

/// Ordered migrations; the index + 1 is the schema version.
pub const MIGRATIONS: &[&str] = &[
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

/// Serialises concurrent migrations from instances starting together.
const MIGRATION_LOCK: i64 = 0x5a7_3a7c;

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
