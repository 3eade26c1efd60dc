//! `kill -9` at random moments during a replay, a restart after each: the
//! tables and the `anomalies` topic end up as those of a run that was never
//! interrupted, which consumes the same records at the same time (its own
//! consumer group, database and output topics).

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    time::{Duration, Instant},
};

use common::*;

/// Rows 0..5400 of these hold six anomalies that satwatch detects (P-4 x3,
/// T-3 x2, A-1), so kills land before, inside and after open events.
const CHANNELS: &str = "A-1,P-4,T-3";
const START: i64 = 0;
const ROWS: i64 = 5400;
const WINDOW: i64 = 64;
/// Slow enough that every kill lands mid-replay (about 30 s of it).
const RATE: u32 = 500;

/// A pipeline for group `group` writing to `<prefix>anomalies` and
/// `<prefix>forecasts`. A short session timeout lets a killed member's
/// partitions go to its successor in seconds rather than the default ten.
fn pipeline(dir: &Path, group: &str, prefix: &str) -> std::path::PathBuf {
    pipeline_variant(dir, &format!("{group}.toml"), |t| {
        set(t, "kafka", "group_id", group);
        set(t, "kafka", "anomalies_topic", format!("{prefix}anomalies"));
        set(t, "kafka", "forecasts_topic", format!("{prefix}forecasts"));
        set(t, "kafka", "dlq_topic", format!("{prefix}telemetry.dlq"));
        let mut client = toml::Table::new();
        client.insert("session.timeout.ms".into(), "1500".into());
        client.insert("heartbeat.interval.ms".into(), "300".into());
        set(t, "kafka", "client", client);
    })
}

/// A small deterministic generator for the kill moments (xorshift64).
struct Moments(u64);

impl Moments {
    fn next_ms(&mut self, low: u64, high: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        low + self.0 % (high - low)
    }
}

type ScoreRow = (String, i64, String, f32, f32, bool, i32);

fn scores(pg: &Postgres, db: &str) -> BTreeMap<(String, i64), ScoreRow> {
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

fn forecasts(pg: &Postgres, db: &str) -> BTreeMap<(String, i64), Vec<f32>> {
    pg.query_in(db, "SELECT channel, seq, horizon FROM forecasts")
        .iter()
        .map(|r| ((r.get(0), r.get(1)), r.get(2)))
        .collect()
}

/// Event rows without `updated_at` (wall-clock time of the write).
fn events(pg: &Postgres, db: &str) -> Vec<String> {
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

/// (event_id, state) -> the distinct payloads published for it.
fn published_events(broker: &Broker, topic: &str) -> BTreeMap<(String, String), BTreeSet<String>> {
    let mut events: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for record in read_topic(broker, topic) {
        let payload = record.payload.expect("event records have payloads");
        let v: serde_json::Value = serde_json::from_slice(&payload).unwrap();
        let key = (
            v["event_id"].as_str().unwrap().to_owned(),
            v["state"].as_str().unwrap().to_owned(),
        );
        events
            .entry(key)
            .or_default()
            .insert(String::from_utf8(payload).unwrap());
    }
    events
}

fn close(a: f32, b: f32) -> bool {
    (a - b).abs() <= 1e-6 * a.abs().max(b.abs()).max(1.0)
}

#[test]
fn kill_9_at_random_moments_leaves_the_same_rows_and_events_as_an_uninterrupted_run() {
    let broker = Broker::start();
    let mut pg = Postgres::start();
    let logs = tempfile::tempdir().unwrap();
    let reference_url = pg.create_database("reference");
    let crashed = pipeline(logs.path(), "crashed", "");
    let reference = pipeline(logs.path(), "reference", "reference.");
    for p in [&crashed, &reference] {
        let p = p.to_str().unwrap();
        satwatch(&["topics", "--pipeline", p, "--partitions", "3"], &broker);
    }
    let reference_run = Satwatch::start_with(&broker, &reference_url, &reference, logs.path(), &[]);
    let mut service = Satwatch::start_with(&broker, &pg.url(), &crashed, logs.path(), &[]);

    let addr = broker.addr();
    let replay = std::thread::spawn(move || replay_paced(&addr, CHANNELS, START, ROWS, Some(RATE)));
    let started = Instant::now();
    let mut moments = Moments(0x5eed_2026_1122);
    let mut kills = Vec::new();
    for kill in 1..=6 {
        assert!(
            !replay.is_finished(),
            "kill {kill} would land after the replay"
        );
        let scored_before = pg.count("SELECT count(*) FROM scores");
        match kill {
            // Mid-write: PostgreSQL is down, so the sink is holding a batch
            // and retrying it when the process dies.
            3 => {
                std::thread::sleep(Duration::from_millis(moments.next_ms(200, 600)));
                pg.stop();
                std::thread::sleep(Duration::from_millis(800));
                service.kill();
                pg.resume();
            }
            // Right after the restart is ready: mid-restore, while windows
            // refill from Kafka.
            5 => service.kill(),
            // Anywhere, with batches in the batcher, the backend and the sink.
            _ => {
                std::thread::sleep(Duration::from_millis(moments.next_ms(300, 1500)));
                service.kill();
            }
        }
        kills.push((kill, started.elapsed(), scored_before));
        service = Satwatch::start_with(&broker, &pg.url(), &crashed, logs.path(), &[]);
    }
    replay.join().unwrap();
    eprintln!("kills (n, when, scores rows before): {kills:?}");

    let expected = 3 * (ROWS - WINDOW);
    wait_for_scores(
        &pg,
        expected,
        "the crashed run to score everything",
        Duration::from_secs(120),
    );
    wait_for(
        "the reference run to score everything",
        Duration::from_secs(120),
        || (pg.count_in("reference", "SELECT count(*) FROM scores") == expected).then_some(()),
    );
    assert!(service.terminate(Duration::from_secs(30)).success());
    assert!(reference_run.terminate(Duration::from_secs(30)).success());

    // Scores: one row per sample past warm-up, and the reference's values.
    for channel in CHANNELS.split(',') {
        let row = &pg.query(&format!(
            "SELECT count(*), count(DISTINCT seq), min(seq), max(seq) FROM scores WHERE channel = '{channel}'"
        ))[0];
        let got: (i64, i64, i64, i64) = (row.get(0), row.get(1), row.get(2), row.get(3));
        assert_eq!(
            got,
            (
                ROWS - WINDOW,
                ROWS - WINDOW,
                START + WINDOW,
                START + ROWS - 1
            ),
            "{channel}: one row per sample past warm-up, no gap"
        );
    }
    let (got, want) = (scores(&pg, "satwatch"), scores(&pg, "reference"));
    assert_eq!(got.len(), want.len());
    for (key, w) in &want {
        let g = got.get(key).unwrap_or_else(|| panic!("{key:?} not scored"));
        assert!(
            g.2 == w.2 && close(g.3, w.3) && close(g.4, w.4) && g.5 == w.5 && g.6 == w.6,
            "{key:?}: {g:?} != reference {w:?}"
        );
    }

    // Forecasts likewise (the first window of each channel has one too).
    let (got, want) = (forecasts(&pg, "satwatch"), forecasts(&pg, "reference"));
    assert_eq!(got.len() as i64, 3 * (ROWS - WINDOW + 1));
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    for (key, w) in &want {
        let g = &got[key];
        assert!(
            g.len() == w.len() && g.iter().zip(w).all(|(a, b)| close(*a, *b)),
            "{key:?}: forecast {g:?} != reference {w:?}"
        );
    }

    // Events: the same rows, closed where the reference's closed.
    let (got, want) = (events(&pg, "satwatch"), events(&pg, "reference"));
    assert!(!want.is_empty(), "the replayed stretch has anomalies");
    assert_eq!(got, want, "anomaly_events");
    let event_rows = want.len();

    // The topic: each (event_id, state) published, repeats identical.
    let got = published_events(&broker, "anomalies");
    let want = published_events(&broker, "reference.anomalies");
    for ((event, state), payloads) in &got {
        assert_eq!(
            payloads.len(),
            1,
            "{event} {state}: repeats differ: {payloads:?}"
        );
    }
    assert_eq!(got, want, "anomalies topic");
    eprintln!(
        "checked: {} scores, {} forecasts, {} event rows, {} (event, state) records on the topic, after {} kills",
        expected,
        3 * (ROWS - WINDOW + 1),
        event_rows,
        got.len(),
        kills.len()
    );
}
