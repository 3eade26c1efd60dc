//! Numbers cannot poison state: records whose values are finite but extreme,
//! on the target column or a command column, inside a channel's baseline and
//! threshold calibration, are either scored with finite scores and forecasts
//! or dead-lettered as `out_of_range`; the service keeps running, the other
//! channel is untouched, and a restart resumes every channel from its
//! checkpoint.

mod common;

use std::time::Duration;

use common::*;

const ROWS: i64 = 600;
const MORE_ROWS: i64 = 100;

/// An A-1 record whose values are all 0 but `values[column] = value`.
fn record(seq: i64, column: usize, value: &str) -> Vec<u8> {
    let mut values = vec!["0"; 25];
    values[column] = value;
    format!(
        r#"{{"channel":"A-1","seq":{seq},"values":[{}]}}"#,
        values.join(",")
    )
    .into_bytes()
}

#[test]
fn extreme_values_are_scored_finite_or_dead_lettered_and_a_restart_resumes_from_the_checkpoints() {
    let Stack {
        broker,
        pg,
        service,
        logs,
    } = Stack::start(1);
    replay(&broker, "A-1,T-1", 0, 300);
    // A-1's scored samples 172 to 178: inside its baseline and the dynamic
    // threshold's calibration (the first 640 of each). Column 0 is the
    // forecast value, column 5 a command.
    let refused = [record(300, 0, "3e38"), record(300, 0, "1e37")];
    let accepted = [
        record(300, 0, "1e15"),
        record(301, 0, "-1e15"),
        record(302, 5, "1e15"),
        record(303, 5, "-1e15"),
        record(304, 0, "1.17549435e-38"),
        record(305, 0, "1e-45"),
        record(306, 3, "-1e-45"),
    ];
    for payload in refused.iter().chain(&accepted) {
        produce(&broker, "telemetry.acs", b"A-1", payload);
    }
    replay(&broker, "T-1", 300, ROWS - 300);
    replay(&broker, "A-1", 307, ROWS - 307);
    wait_for_scores(
        &pg,
        2 * (ROWS - window()),
        "every sample of both channels to be scored",
        Duration::from_secs(120),
    );
    assert_one_score_per_sample(&pg, "A-1,T-1", ROWS, window());

    let non_finite_scores = pg.count(
        "SELECT count(*) FROM scores
         WHERE NOT (score BETWEEN -1e12 AND 1e12) OR NOT (threshold BETWEEN -1e12 AND 1e12)",
    );
    assert_eq!(non_finite_scores, 0, "{}", describe_scores(&pg, "satwatch"));
    let first: bool =
        pg.query("SELECT anomalous FROM scores WHERE channel = 'A-1' AND seq = 300")[0].get(0);
    assert!(
        first,
        "a value of 1e15 where about 0 was forecast is anomalous"
    );
    let wild_steps = pg.count(
        "SELECT count(*) FROM forecasts, unnest(horizon) AS step
         WHERE NOT (step BETWEEN -1e15 AND 1e15)",
    );
    assert_eq!(wild_steps, 0, "forecast steps are finite, within ±1e15");
    let published = read_topic(&broker, "forecasts");
    assert!(published.len() as i64 >= 2 * (ROWS - window()));
    for record in &published {
        let payload = String::from_utf8_lossy(record.payload.as_deref().unwrap_or_default());
        assert!(!payload.contains("null"), "a horizon holds null: {payload}");
    }
    let dead = read_topic(&broker, "telemetry.dlq");
    let reasons: Vec<(&str, &[u8])> = dead
        .iter()
        .map(|r| {
            let reason = r
                .headers
                .iter()
                .find(|(k, _)| k == "satwatch-error")
                .map_or("", |(_, v)| v.as_str());
            (reason, r.payload.as_deref().unwrap_or_default())
        })
        .collect();
    assert_eq!(
        reasons,
        refused
            .iter()
            .map(|p| ("out_of_range", p.as_slice()))
            .collect::<Vec<_>>(),
        "the two values beyond ±1e15, unchanged, with their reason"
    );

    // The checkpoints written after the extremes read back: a restart
    // resumes both channels where they were, nothing scored twice or lost.
    assert!(service.terminate(Duration::from_secs(30)).success());
    let service = Satwatch::start(&broker, &pg, logs.path(), &[]);
    replay(&broker, "A-1,T-1", ROWS, MORE_ROWS);
    wait_for_scores(
        &pg,
        2 * (ROWS + MORE_ROWS - window()),
        "both channels to go on after the restart",
        Duration::from_secs(120),
    );
    assert_one_score_per_sample(&pg, "A-1,T-1", ROWS + MORE_ROWS, window());
    let log = service.log_text();
    assert!(
        !log.contains("does not hold a detector state"),
        "every checkpoint was read: {log}"
    );
    assert!(service.terminate(Duration::from_secs(30)).success());
}
