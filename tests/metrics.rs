//! `/metrics` scraped during and after a replay agrees with what was replayed
//! and what was written.

mod common;

use std::{collections::BTreeMap, time::Duration};

use common::*;

const CHANNELS: &str = "A-1,E-2,T-1";
const ROWS: i64 = 1000;

/// Sums every series of `name` whose labels contain all of `with`.
fn sum(metrics: &str, name: &str, with: &[&str]) -> f64 {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split(['{', ' ']).next() == Some(name))
        .filter(|l| with.iter().all(|w| l.contains(w)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn metrics_agree_with_the_replay_and_the_tables() {
    let Stack {
        broker,
        pg,
        service,
        logs: _logs,
    } = Stack::start(3);
    produce(&broker, "telemetry.eps", b"E-2", b"{\"channel\": \"E-2\"");
    replay_paced(&broker.addr(), CHANNELS, 0, ROWS, Some(3000));
    // One scrape while samples are still flowing: a valid exposition whose counters only grow.
    let during = service.get("/metrics").expect("metrics answer").1;
    assert!(during.contains("# TYPE satwatch_samples_consumed_total counter"));

    let scored = 3 * (ROWS - window());
    wait_for_scores(
        &pg,
        scored,
        "every sample past warm-up to be scored",
        Duration::from_secs(60),
    );
    let after = wait_for("the counters to settle", Duration::from_secs(20), || {
        let m = service.get("/metrics")?.1;
        // Rows are counted inside the flush, latencies just after it.
        let settled = sum(&m, "satwatch_rows_written_total", &["table=\"scores\""])
            == scored as f64
            && sum(&m, "satwatch_end_to_end_latency_seconds_count", &[]) == scored as f64;
        settled.then_some(m)
    });
    assert!(
        sum(&after, "satwatch_samples_consumed_total", &[])
            >= sum(&during, "satwatch_samples_consumed_total", &[])
    );

    assert_eq!(
        sum(&after, "satwatch_samples_consumed_total", &[]),
        (3 * ROWS) as f64,
        "every valid record replayed"
    );
    assert_eq!(
        sum(
            &after,
            "satwatch_samples_consumed_total",
            &["subsystem=\"eps\""]
        ),
        ROWS as f64
    );
    assert_eq!(
        sum(&after, "satwatch_samples_scored_total", &[]),
        scored as f64,
        "scored = rows in scores"
    );
    assert_eq!(
        sum(
            &after,
            "satwatch_dead_letters_total",
            &["reason=\"malformed_json\""]
        ),
        1.0
    );
    let forecasts = pg.count("SELECT count(*) FROM forecasts");
    assert_eq!(
        sum(&after, "satwatch_inference_count_total", &[]),
        forecasts as f64,
        "one inference per forecast"
    );
    assert_eq!(
        sum(&after, "satwatch_inference_request_success_total", &[]),
        forecasts as f64
    );
    assert_eq!(
        sum(
            &after,
            "satwatch_rows_written_total",
            &["table=\"forecasts\""]
        ),
        forecasts as f64
    );
    let executions = sum(
        &after,
        "satwatch_inference_exec_count_total",
        &["model=\"smap_T-1\""],
    );
    assert!(
        executions >= 1.0 && executions <= (ROWS - window() + 1) as f64,
        "batches of at least one window"
    );
    assert!(
        after.lines().any(
            |l| l.starts_with("satwatch_inference_compute_input_duration_us_total{")
                && l.contains("model=\"smap_T-1\"")
        ),
        "the time laying out windows is counted per model"
    );
    let events: BTreeMap<String, i64> = pg
        .query("SELECT state, count(*) FROM anomaly_events GROUP BY state")
        .into_iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let total_events: i64 = events.values().sum();
    assert_eq!(
        sum(&after, "satwatch_anomaly_events_total", &["state=\"open\""]),
        total_events as f64
    );
    assert_eq!(
        sum(
            &after,
            "satwatch_anomaly_events_total",
            &["state=\"closed\""]
        ),
        *events.get("closed").unwrap_or(&0) as f64
    );
    assert_eq!(
        sum(&after, "satwatch_end_to_end_latency_seconds_count", &[]),
        scored as f64,
        "one latency observation per scored sample"
    );
    // satwatch's own share (taken from Kafka -> committed) is part of the
    // whole (ts -> durable), sample by sample, so it is no larger in total.
    assert_eq!(
        sum(&after, "satwatch_processing_latency_seconds_count", &[]),
        scored as f64,
        "one processing-latency observation per scored sample"
    );
    assert!(
        sum(&after, "satwatch_processing_latency_seconds_sum", &[])
            <= sum(&after, "satwatch_end_to_end_latency_seconds_sum", &[]),
        "satwatch's own share is part of the end-to-end latency"
    );
    // Lag comes from librdkafka's statistics (every 5 s): it reaches zero.
    wait_for(
        "consumer lag to reach zero on every partition",
        Duration::from_secs(20),
        || {
            let m = service.get("/metrics")?.1;
            let series = m
                .lines()
                .filter(|l| l.starts_with("satwatch_consumer_lag{"))
                .count();
            (series >= 3 && sum(&m, "satwatch_consumer_lag", &[]) == 0.0).then_some(())
        },
    );
    assert!(service.terminate(Duration::from_secs(30)).success());
}
