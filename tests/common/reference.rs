//! Comparing a disturbed run with an undisturbed reference.
//!
//! Both consume the same records at the same time, each with its own consumer
//! group, database and output topics, so their outputs must agree exactly
//! (within float tolerance where batches of different sizes ran the models).

use std::path::Path;

use super::{
    assert_published_once, close, events, forecasts, outputs::assert_one_score_per_seq,
    pipeline_variant, published_events, published_forecasts, scores, set, Broker, Postgres,
};

/// A pipeline for group `group` writing to `<prefix>anomalies` and
/// `<prefix>forecasts`. A short session timeout lets a killed member's
/// partitions go to its successor in seconds rather than the default ten.
pub fn group_pipeline(
    dir: &Path,
    group: &str,
    prefix: &str,
    session_timeout_ms: u32,
) -> std::path::PathBuf {
    pipeline_variant(dir, &format!("{group}.toml"), |t| {
        set(t, "kafka", "group_id", group);
        set(t, "kafka", "anomalies_topic", format!("{prefix}anomalies"));
        set(t, "kafka", "forecasts_topic", format!("{prefix}forecasts"));
        set(t, "kafka", "dlq_topic", format!("{prefix}telemetry.dlq"));
        let mut client = toml::Table::new();
        client.insert(
            "session.timeout.ms".into(),
            session_timeout_ms.to_string().into(),
        );
        client.insert(
            "heartbeat.interval.ms".into(),
            (session_timeout_ms / 5).to_string().into(),
        );
        set(t, "kafka", "client", client);
        // These tests check what is published and committed, so the drain
        // must finish: a transaction caught by a broker's kill -9 can take
        // up to three of its calls' 30 s timeouts (offsets, commit, abort)
        // before it is retried, longer than the 30 s default, which cut it
        // off in one run of three (exit 2, no final commit: the restart
        // would redo it, but these tests do not restart).
        set(t, "engine", "shutdown_timeout_ms", 150_000i64);
    })
}

/// What [`assert_same_outputs_as_reference`] checked.
#[derive(Debug)]
pub struct Compared {
    pub scores: i64,
    pub forecasts: i64,
    pub event_rows: usize,
    pub event_records: usize,
    pub forecast_records: usize,
}

/// The `satwatch` database and the `anomalies` topic hold exactly what the
/// reference (database `reference`, topic `reference.anomalies`) holds for
/// rows `start..start + rows` of `channels`, with one score per sample past
/// warm-up and no gap.
pub fn assert_same_outputs_as_reference(
    pg: &Postgres,
    broker: &Broker,
    channels: &str,
    start: i64,
    rows: i64,
    window: i64,
) -> Compared {
    let n = channels.split(',').count() as i64;
    // Scores: one row per sample past warm-up, and the reference's values.
    assert_one_score_per_seq(pg, channels, start + window, start + rows - 1);
    let (got, want) = (scores(pg, "satwatch"), scores(pg, "reference"));
    assert_eq!(got.len(), want.len());
    for (key, w) in &want {
        let g = got.get(key).unwrap_or_else(|| panic!("{key:?} not scored"));
        assert!(
            g.2 == w.2 && close(g.3, w.3) && close(g.4, w.4) && g.5 == w.5 && g.6 == w.6,
            "{key:?}: {g:?} != reference {w:?}"
        );
    }

    // Forecasts likewise (the first window of each channel has one too).
    let (got, want) = (forecasts(pg, "satwatch"), forecasts(pg, "reference"));
    assert_eq!(got.len() as i64, n * (rows - window + 1));
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
    let (got, want) = (events(pg, "satwatch"), events(pg, "reference"));
    assert!(!want.is_empty(), "the replayed stretch has anomalies");
    assert_eq!(got, want, "anomaly_events");
    let event_rows = want.len();

    // The topics, read as a read_committed consumer does: each record
    // exactly once, the reference's payloads.
    let got = published_events(broker, "anomalies");
    let want = published_events(broker, "reference.anomalies");
    assert_published_once(&got, "anomalies");
    assert_eq!(got, want, "anomalies topic");
    let got_forecasts = published_forecasts(broker, "forecasts");
    let want_forecasts = published_forecasts(broker, "reference.forecasts");
    assert_published_once(&got_forecasts, "forecasts");
    assert_eq!(
        got_forecasts.len() as i64,
        n * (rows - window + 1),
        "one forecast record per window"
    );
    assert_eq!(
        got_forecasts.keys().collect::<Vec<_>>(),
        want_forecasts.keys().collect::<Vec<_>>(),
        "forecasts topic"
    );
    Compared {
        scores: n * (rows - window),
        forecasts: n * (rows - window + 1),
        event_rows,
        event_records: got.len(),
        forecast_records: got_forecasts.len(),
    }
}
