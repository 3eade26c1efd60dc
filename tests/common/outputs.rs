//! What satwatch wrote: rows of `scores`, `forecasts` and `anomaly_events`,
//! records on the output topics, and checks on them.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use super::{read_topic, Broker, Postgres};

/// Each of `channels` (comma-separated) holds exactly one `scores` row for
/// every seq from `window` to `rows - 1`, and no other.
pub fn assert_one_score_per_sample(pg: &Postgres, channels: &str, rows: i64, window: i64) {
    assert_one_score_per_seq(pg, channels, window, rows - 1);
}

/// Each of `channels` holds exactly one `scores` row for every seq from
/// `first` to `last`, and no other.
pub(super) fn assert_one_score_per_seq(pg: &Postgres, channels: &str, first: i64, last: i64) {
    for channel in channels.split(',') {
        let row = &pg.query(&format!(
            "SELECT count(*), count(DISTINCT seq), min(seq), max(seq) FROM scores WHERE channel = '{channel}'"
        ))[0];
        let got: (i64, i64, i64, i64) = (row.get(0), row.get(1), row.get(2), row.get(3));
        let n = last - first + 1;
        assert_eq!(
            got,
            (n, n, first, last),
            "{channel}: one row per sample past warm-up, no gap"
        );
    }
}

/// Waits until `scores` holds exactly `expected` rows.
pub fn wait_for_scores(pg: &Postgres, expected: i64, what: &str, deadline: Duration) {
    let started = Instant::now();
    while pg.count("SELECT count(*) FROM scores") != expected {
        if started.elapsed() > deadline {
            panic!(
                "timed out after {deadline:?} waiting for {what}: {} of {expected} scores rows\n{}",
                pg.count("SELECT count(*) FROM scores"),
                describe_scores(pg, "satwatch")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub type ScoreRow = (String, i64, String, f32, f32, bool, i32);

pub fn scores(pg: &Postgres, db: &str) -> BTreeMap<(String, i64), ScoreRow> {
    pg.query_in(
        db,
        "SELECT channel, seq, ts::text, score, threshold, anomalous, model_version FROM scores",
    )
    .iter()
    .map(|r| {
        let row: ScoreRow = (
            r.get(0),
            r.get(1),
            r.get(2),
            r.get(3),
            r.get(4),
            r.get(5),
            r.get(6),
        );
        ((row.0.clone(), row.1), row)
    })
    .collect()
}

pub fn forecasts(pg: &Postgres, db: &str) -> BTreeMap<(String, i64), Vec<f32>> {
    pg.query_in(db, "SELECT channel, seq, horizon FROM forecasts")
        .iter()
        .map(|r| ((r.get(0), r.get(1)), r.get(2)))
        .collect()
}

/// Event rows without `updated_at` (wall-clock time of the write).
pub fn events(pg: &Postgres, db: &str) -> Vec<String> {
    pg.query_in(
        db,
        "SELECT concat_ws('|', event_id, channel, subsystem, state, start_seq, end_seq, start_ts,
                end_ts, peak_score, threshold, model, model_version)
         FROM anomaly_events ORDER BY event_id",
    )
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// Every payload published on `topic`, in topic order, by the key `key`
/// draws from each record's JSON.
fn published_by<K: Ord>(
    broker: &Broker,
    topic: &str,
    key: impl Fn(&serde_json::Value) -> K,
) -> BTreeMap<K, Vec<String>> {
    let mut published: BTreeMap<K, Vec<String>> = BTreeMap::new();
    for record in read_topic(broker, topic) {
        let payload = record.payload.expect("output records have payloads");
        let v: serde_json::Value = serde_json::from_slice(&payload).unwrap();
        published
            .entry(key(&v))
            .or_default()
            .push(String::from_utf8(payload).unwrap());
    }
    published
}

/// (event_id, state) -> every payload published for it, in topic order.
pub fn published_events(broker: &Broker, topic: &str) -> BTreeMap<(String, String), Vec<String>> {
    published_by(broker, topic, |v| {
        (
            v["event_id"].as_str().unwrap().to_owned(),
            v["state"].as_str().unwrap().to_owned(),
        )
    })
}

/// (channel, seq) -> every forecast payload published for it.
pub fn published_forecasts(broker: &Broker, topic: &str) -> BTreeMap<(String, i64), Vec<String>> {
    published_by(broker, topic, |v| {
        (
            v["channel"].as_str().unwrap().to_owned(),
            v["seq"].as_i64().unwrap(),
        )
    })
}

/// Exactly once: no key of `published` came more than once.
pub fn assert_published_once<K: std::fmt::Debug>(
    published: &BTreeMap<K, Vec<String>>,
    topic: &str,
) {
    let repeated: Vec<_> = published.iter().filter(|(_, p)| p.len() > 1).collect();
    assert!(
        repeated.is_empty(),
        "{topic}: {} of {} records were published more than once, e.g. {:?}",
        repeated.len(),
        published.len(),
        repeated.iter().take(3).collect::<Vec<_>>()
    );
}

pub fn close(a: f32, b: f32) -> bool {
    (a - b).abs() <= 1e-6 * a.abs().max(b.abs()).max(1.0)
}

/// Each channel's scored seq ranges and the gaps between them, for failure
/// messages.
pub fn describe_scores(pg: &Postgres, database: &str) -> String {
    pg.query_in(
        database,
        "SELECT channel, count(*), min(seq), max(seq),
                (SELECT string_agg(g::text, ',') FROM (
                    SELECT seq + 1 AS g FROM scores s2 WHERE s2.channel = s.channel
                    AND NOT EXISTS (SELECT 1 FROM scores s3 WHERE s3.channel = s2.channel AND s3.seq = s2.seq + 1)
                    ORDER BY seq LIMIT 5) gaps)
         FROM scores s GROUP BY channel ORDER BY channel",
    )
    .iter()
    .map(|r| {
        let (c, n, lo, hi, gaps): (String, i64, i64, i64, Option<String>) =
            (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4));
        format!("{c}: {n} rows, seq {lo}..={hi}, first missing after runs: {}", gaps.unwrap_or_default())
    })
    .collect::<Vec<_>>()
    .join("\n")
}
