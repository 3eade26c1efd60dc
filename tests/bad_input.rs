//! A corpus of bad records mixed into a replay: each one reaches the
//! dead-letter topic with its reason (a repeated and a stale `seq` too, as
//! `duplicate_seq`, besides being counted), and every good record around
//! them is scored exactly as in a run without them.

mod common;

use std::{collections::BTreeMap, time::Duration};

use common::*;

const ROWS: i64 = 600;

/// Score rows by (channel, seq): (score, threshold, anomalous).
type Scores = BTreeMap<(String, i64), (f32, f32, bool)>;

/// Replays two channels (with or without bad records among them); returns
/// the score rows, the dead-letter records and the metrics text.
fn run_replay(with_bad_records: bool) -> (Scores, Vec<Record>, String) {
    let Stack {
        broker,
        pg,
        service,
        logs: _logs,
    } = Stack::start(1);
    replay(&broker, "A-1,T-1", 0, ROWS / 2);
    if with_bad_records {
        let big = format!(
            r#"{{"channel":"A-1","seq":9999,"values":[{}]}}"#,
            "0.5,".repeat(131_072)
        );
        let corpus: Vec<(&str, Vec<u8>)> = vec![
            (
                "telemetry.acs",
                br#"{"channel": "A-1", "seq": 300, "val"#.to_vec(),
            ),
            ("telemetry.acs", b"\xff\xfe{\"channel\":\"A-1\"}".to_vec()),
            (
                "telemetry.acs",
                br#"{"channel":"A-1","values":[1]}"#.to_vec(),
            ),
            (
                "telemetry.acs",
                br#"{"channel":"A-1","seq":"300","values":[1]}"#.to_vec(),
            ),
            (
                "telemetry.acs",
                br#"{"channel":"A-1","seq":300,"values":[1,2,3]}"#.to_vec(),
            ),
            (
                "telemetry.acs",
                format!(
                    r#"{{"channel":"A-1","seq":300,"values":[NaN{}]}}"#,
                    ",0".repeat(24)
                )
                .into_bytes(),
            ),
            (
                "telemetry.acs",
                format!(
                    r#"{{"channel":"A-1","seq":300,"values":[1e39{}]}}"#,
                    ",0".repeat(24)
                )
                .into_bytes(),
            ),
            (
                "telemetry.acs",
                format!(
                    r#"{{"channel":"Q-7","seq":300,"values":[0{}]}}"#,
                    ",0".repeat(24)
                )
                .into_bytes(),
            ),
            ("telemetry.acs", big.into_bytes()),
            ("telemetry.acs", Vec::new()),
            // A repeated and a stale seq of a real sample: counted, and
            // dead-lettered once the engine has refused them.
            (
                "telemetry.acs",
                format!(
                    r#"{{"channel":"A-1","seq":299,"values":[0{}]}}"#,
                    ",0".repeat(24)
                )
                .into_bytes(),
            ),
            (
                "telemetry.acs",
                format!(
                    r#"{{"channel":"A-1","seq":17,"values":[0{}]}}"#,
                    ",0".repeat(24)
                )
                .into_bytes(),
            ),
        ];
        for (topic, payload) in &corpus {
            produce(&broker, topic, b"A-1", payload);
        }
        // A good sample keyed by another channel: its ordering would rest on
        // another partition's.
        let misfiled = format!(
            r#"{{"channel":"A-1","seq":301,"values":[0{}]}}"#,
            ",0".repeat(24)
        );
        produce(&broker, "telemetry.acs", b"T-1", misfiled.as_bytes());
    }
    replay(&broker, "A-1,T-1", ROWS / 2, ROWS / 2);
    let expected = 2 * (ROWS - window());
    wait_for_scores(
        &pg,
        expected,
        "the good samples to be scored",
        Duration::from_secs(120),
    );
    wait_for(
        "the dead letters to be counted",
        Duration::from_secs(30),
        || {
            let metrics = service.get("/metrics")?.1;
            let dead: f64 = metrics
                .lines()
                .filter(|l| l.starts_with("satwatch_dead_letters_total"))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum();
            (!with_bad_records || dead >= 13.0).then_some(())
        },
    );
    let metrics = service.get("/metrics").unwrap().1;
    assert!(service.terminate(Duration::from_secs(30)).success());
    let scores = pg
        .query("SELECT channel, seq, score, threshold, anomalous FROM scores")
        .into_iter()
        .map(|r| ((r.get(0), r.get(1)), (r.get(2), r.get(3), r.get(4))))
        .collect();
    (scores, read_topic(&broker, "telemetry.dlq"), metrics)
}

#[test]
fn bad_records_are_dead_lettered_with_their_reason_and_good_ones_scored_as_without_them() {
    let (clean, clean_dead, _) = run_replay(false);
    assert!(clean_dead.is_empty());
    let (mixed, mut dead, metrics) = run_replay(true);
    // In the order they were consumed: the engine's refusals (duplicate_seq)
    // reach the dead-letter task after the source's own rejections.
    let offset = |r: &Record| -> i64 {
        let source = &r
            .headers
            .iter()
            .find(|(k, _)| k == "satwatch-source")
            .unwrap()
            .1;
        source.rsplit('/').next().unwrap().parse().unwrap()
    };
    dead.sort_by_key(offset);

    assert_eq!(mixed.len(), clean.len(), "the same samples were scored");
    for (key, value) in &clean {
        assert_eq!(
            mixed.get(key),
            Some(value),
            "{key:?} scored the same with bad records around it"
        );
    }

    let reasons: Vec<String> = dead
        .iter()
        .map(|r| {
            r.headers
                .iter()
                .find(|(k, _)| k == "satwatch-error")
                .map(|(_, v)| v.clone())
                .unwrap_or_default()
        })
        .collect();
    let expected = [
        "malformed_json",
        "invalid_utf8",
        "missing_field",
        "wrong_type",
        "wrong_arity",
        "non_finite",
        "non_finite",
        "unknown_channel",
        "too_large",
        "empty_record",
        "duplicate_seq",
        "duplicate_seq",
        "wrong_key",
    ];
    assert_eq!(
        reasons, expected,
        "each bad record, in order, with its reason"
    );
    let big_len = format!(
        r#"{{"channel":"A-1","seq":9999,"values":[{}]}}"#,
        "0.5,".repeat(131_072)
    )
    .len();
    assert_eq!(
        dead[8].payload.as_ref().map(Vec::len),
        Some(big_len),
        "the 512 KiB record (within Kafka's 1 MiB default limit) is dead-lettered whole"
    );
    assert!(!dead[8]
        .headers
        .iter()
        .any(|(k, _)| k == "satwatch-truncated"));
    for (i, record) in dead.iter().enumerate() {
        let key: &[u8] = if i == expected.len() - 1 {
            b"T-1"
        } else {
            b"A-1"
        };
        assert_eq!(record.key.as_deref(), Some(key), "the original key is kept");
        assert!(record
            .headers
            .iter()
            .any(|(k, v)| k == "satwatch-source" && v.starts_with("telemetry.acs/0/")));
    }
    for (i, seq) in [(10, 299), (11, 17)] {
        let detail = &dead[i]
            .headers
            .iter()
            .find(|(k, _)| k == "satwatch-detail")
            .unwrap()
            .1;
        assert!(
            detail.contains(&format!("seq {seq} of channel \"A-1\""))
                && detail.contains("last seq 299"),
            "the detail names the channel, the seq and the channel's last seq: {detail}"
        );
    }
    let duplicates = metrics
        .lines()
        .find(|l| l.starts_with("satwatch_samples_duplicate_total{subsystem=\"acs\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok());
    assert_eq!(
        duplicates,
        Some(2.0),
        "the repeated and the stale seq were counted"
    );
}
