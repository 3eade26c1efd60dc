//! The streaming pipeline end to end, on real parts: Apache Kafka,
//! PostgreSQL, the shipped ONNX models and SMAP test data.

mod common;

use std::{collections::BTreeMap, time::Duration};

use common::*;
use serde_json::Value;

// P-4 has two labelled anomalies in these rows (from 950 and 2150), so events are raised.
const CHANNELS: [&str; 3] = ["A-1", "P-4", "T-1"];
const ROWS: i64 = 3000;

#[test]
fn replayed_samples_are_scored_once_with_forecasts_events_dead_letters_and_commits() {
    let Stack {
        broker,
        pg,
        service,
        logs: _logs,
    } = Stack::start(3);
    replay_and_check(&broker, &pg, service);
}

/// The path for brokers without transactions: records published and
/// acknowledged, then the offsets committed by the consumer.
#[test]
fn the_at_least_once_delivery_publishes_every_output_and_commits() {
    let broker = Broker::start();
    let pg = Postgres::start();
    let logs = tempfile::tempdir().unwrap();
    let pipeline = pipeline_variant(logs.path(), "at-least-once.toml", |t| {
        set(t, "kafka", "delivery", "at-least-once")
    });
    satwatch(
        &[
            "topics",
            "--pipeline",
            pipeline.to_str().unwrap(),
            "--partitions",
            "3",
        ],
        &broker,
    );
    let service = Satwatch::start_with(&broker, &pg.url(), &pipeline, logs.path(), &[]);
    replay_and_check(&broker, &pg, service);
}

/// Replays CHANNELS with one malformed record in the middle, then checks
/// every output: scores, forecasts (table and topic), events, the dead
/// letter, and the committed offsets.
fn replay_and_check(broker: &Broker, pg: &Postgres, service: Satwatch) {
    // First half of each channel, one malformed record, then the second half:
    // the records around the bad one must be scored as if it were not there.
    let channels = CHANNELS.join(",");
    replay(broker, &channels, 0, ROWS / 2);
    let malformed = br#"{"channel": "A-1", "seq": 1500, "values": [0.5,"#;
    produce(broker, "telemetry.acs", b"A-1", malformed);
    replay(broker, &channels, ROWS / 2, ROWS / 2);

    let expected_per_channel = ROWS - window();
    let expected = expected_per_channel * CHANNELS.len() as i64;
    wait_for_scores(
        pg,
        expected,
        "every sample past warm-up to be scored",
        Duration::from_secs(120),
    );
    let status = service.terminate(Duration::from_secs(30));
    assert!(
        status.success(),
        "satwatch exits 0 after SIGTERM, got {status}"
    );

    // Exactly one score per sample past warm-up, in every channel.
    for channel in CHANNELS {
        let row = &pg.query(&format!(
            "SELECT count(*), count(DISTINCT seq), min(seq), max(seq) FROM scores WHERE channel = '{channel}'"
        ))[0];
        let (n, distinct, min, max): (i64, i64, i64, i64) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        assert_eq!(
            (n, distinct, min, max),
            (
                expected_per_channel,
                expected_per_channel,
                window(),
                ROWS - 1
            ),
            "{channel}"
        );
    }

    // Forecasts: one per full window (from seq window() - 1), in the table and on the topic, agreeing.
    let forecast_rows = pg.count("SELECT count(*) FROM forecasts");
    assert_eq!(
        forecast_rows,
        (expected_per_channel + 1) * CHANNELS.len() as i64
    );
    let records = read_topic(broker, "forecasts");
    assert_eq!(
        records.len() as i64,
        forecast_rows,
        "every forecast row was published once"
    );
    let sample = pg
        .query("SELECT channel, seq, horizon FROM forecasts WHERE channel = 'T-1' AND seq = 2000");
    let horizon: Vec<f32> = sample[0].get(2);
    let published: Vec<Value> = records
        .iter()
        .map(|r| serde_json::from_slice(r.payload.as_deref().unwrap()).unwrap())
        .filter(|v: &Value| v["channel"] == "T-1" && v["seq"] == 2000)
        .collect();
    assert_eq!(published.len(), 1);
    let published_horizon: Vec<f32> = published[0]["horizon"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    assert_eq!(published_horizon, horizon);
    assert_eq!(horizon.len(), 10);
    assert_eq!(published[0]["model"], "smap_T-1");
    for r in &records {
        let v: Value = serde_json::from_slice(r.payload.as_deref().unwrap()).unwrap();
        assert_eq!(
            r.key.as_deref(),
            Some(v["channel"].as_str().unwrap().as_bytes()),
            "keyed by channel"
        );
    }

    // Events: the topic's open/closed records and the table agree, and each
    // event starts at an anomalous score.
    let mut published_events: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for r in read_topic(broker, "anomalies") {
        let v: Value = serde_json::from_slice(r.payload.as_deref().unwrap()).unwrap();
        published_events
            .entry(v["event_id"].as_str().unwrap().to_owned())
            .or_default()
            .push(v);
    }
    let rows = pg.query(
        "SELECT event_id, state, start_seq, end_seq, channel, subsystem FROM anomaly_events",
    );
    assert!(
        !rows.is_empty(),
        "the replayed data holds at least one detected event"
    );
    assert_eq!(rows.len(), published_events.len());
    for row in rows {
        let (id, state, start, end): (String, String, i64, Option<i64>) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        let channel: String = row.get(4);
        let records = &published_events[&id];
        assert_eq!(records[0]["state"], "open", "{id} opens first");
        assert_eq!(records[0]["end_seq"], Value::Null);
        assert_eq!(id, format!("{channel}:{start}"));
        let last = records.last().unwrap();
        assert_eq!(
            last["state"].as_str().unwrap(),
            state,
            "{id}: table and topic agree on the state"
        );
        assert_eq!(last["end_seq"].as_i64(), end);
        let anomalous: bool = pg.query(&format!(
            "SELECT anomalous FROM scores WHERE channel = '{channel}' AND seq = {start}"
        ))[0]
            .get(0);
        assert!(anomalous, "{id} starts at an anomalous sample");
        if let Some(end) = end {
            assert!(end >= start);
            let flagged =
                pg.count(&format!("SELECT count(*) FROM scores WHERE channel = '{channel}' AND seq = {end} AND anomalous"));
            assert_eq!(flagged, 1, "{id} ends at an anomalous sample");
        }
    }

    // The malformed record reached the dead-letter topic unchanged, with its reason.
    let dead = read_topic(broker, "telemetry.dlq");
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].payload.as_deref(), Some(&malformed[..]));
    assert_eq!(dead[0].key.as_deref(), Some(&b"A-1"[..]));
    let header = |name: &str| {
        dead[0]
            .headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(header("satwatch-error").as_deref(), Some("malformed_json"));
    assert!(header("satwatch-detail").is_some_and(|d| !d.is_empty()));
    assert!(header("satwatch-source").is_some_and(|s| s.starts_with("telemetry.acs/")));

    // The group's committed offsets cover everything that was consumed.
    let topics = ["telemetry.acs", "telemetry.ps", "telemetry.tcs"];
    for (topic, partition, committed, end) in committed_vs_end(broker, "satwatch", &topics) {
        if end > 0 {
            assert_eq!(
                committed, end,
                "{topic}[{partition}] committed up to its end"
            );
        }
    }

    assert_events_as_eval_finds_them(pg);
}

/// `run` and `eval` share the detector: every event that ended well inside
/// the replayed rows (so that later rows could not have changed it) is the
/// same in `anomaly_events` as in `satwatch eval`, with the same cause.
fn assert_events_as_eval_finds_them(pg: &Postgres) {
    let output = std::process::Command::new(satwatch_bin())
        .args([
            "eval",
            "--pipeline",
            SMAP_PIPELINE,
            "--data",
            "data/smap",
            "--json",
        ])
        .args(["--channels", &CHANNELS.join(",")])
        .current_dir(repo_root())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let figures: Value = serde_json::from_slice(&output.stdout).unwrap();
    // An event closes after min_event_gap normal samples: one ending this
    // far before the last replayed row has closed in both runs.
    let settled = ROWS - 2 * 128;
    let from_eval: Vec<(String, i64, i64, String)> = figures["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["end"].as_i64().unwrap() < settled)
        .map(|e| {
            (
                e["channel"].as_str().unwrap().to_owned(),
                e["start"].as_i64().unwrap(),
                e["end"].as_i64().unwrap(),
                e["cause"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let from_run: Vec<(String, i64, i64, String)> = pg
        .query(&format!(
            "SELECT channel, start_seq, end_seq, cause FROM anomaly_events
             WHERE state = 'closed' AND end_seq < {settled} ORDER BY channel, start_seq"
        ))
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    assert!(!from_run.is_empty(), "the replayed rows raise events");
    assert_eq!(from_run, from_eval);
}
