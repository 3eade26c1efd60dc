//! `satwatch bench broker` against a real broker: every record it
//! publishes comes back through the group consumer, over the telemetry
//! topics' partition layout, and it refuses to guess a layout that is not
//! there.

mod common;

use std::process::Command;

use common::{satwatch, satwatch_bin, Broker, SMAP_PIPELINE};

#[test]
fn every_record_published_is_consumed_and_timed() {
    let broker = Broker::start();
    satwatch(
        &["topics", "--pipeline", SMAP_PIPELINE, "--partitions", "2"],
        &broker,
    );
    let out = satwatch(
        &[
            "bench",
            "broker",
            "--pipeline",
            SMAP_PIPELINE,
            "--rate",
            "200",
            "--seconds",
            "1",
            "--json",
        ],
        &broker,
    );
    let figures: serde_json::Value = serde_json::from_str(&out).unwrap();
    // The SMAP pipeline's seven subsystems, two partitions each.
    assert_eq!(figures["topics"], 7, "{figures}");
    assert_eq!(figures["partitions"], 14, "{figures}");
    assert_eq!(figures["published"], 200, "{figures}");
    assert_eq!(figures["consumed"], 200, "nothing is lost: {figures}");
    for leg in ["consume", "acknowledge"] {
        let q = |k: &str| figures[leg][k].as_f64().unwrap();
        assert!(q("p50_ms") > 0.0, "{leg}: {figures}");
        assert!(
            q("p50_ms") <= q("p99_ms")
                && q("p99_ms") <= q("p999_ms")
                && q("p999_ms") <= q("max_ms"),
            "{leg} quantiles are ordered: {figures}"
        );
    }
}

#[test]
fn without_the_telemetry_topics_it_says_to_create_them() {
    let broker = Broker::start();
    let output = Command::new(satwatch_bin())
        .args([
            "bench",
            "broker",
            "--pipeline",
            SMAP_PIPELINE,
            "--seconds",
            "1",
        ])
        .current_dir(common::repo_root())
        .env("SATWATCH_BROKERS", broker.addr())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("does not exist") && stderr.contains("satwatch topics"),
        "{stderr}"
    );
}
