//! The offline runs: `satwatch eval --json` on two channels, checked against
//! the label file, and `satwatch bench --json`, checked against the data.

mod common;

use std::process::Command;

use common::{repo_root, satwatch_bin, SMAP_PIPELINE};
use satwatch::dataset;
use serde_json::Value;

#[test]
fn eval_json_agrees_with_the_labels_and_its_own_counts() {
    let output = Command::new(satwatch_bin())
        .args([
            "eval",
            "--pipeline",
            SMAP_PIPELINE,
            "--data",
            "data/smap",
            "--channels",
            "T-3,P-4",
            "--json",
        ])
        .current_dir(repo_root())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let figures: Value =
        serde_json::from_slice(&output.stdout).expect("--json prints one JSON object");
    let labels =
        dataset::load_labels(&repo_root().join("data/smap/labeled_anomalies.csv")).unwrap();

    let channels = figures["channels"].as_array().unwrap();
    assert_eq!(channels.len(), 2);
    let mut total_ranges = 0;
    let mut total_tp = 0;
    for channel in channels {
        let id = channel["channel"].as_str().unwrap();
        let truth = labels.iter().find(|l| l.channel == id).unwrap();
        assert_eq!(
            channel["rows"].as_u64(),
            Some(truth.rows),
            "{id}: every test row was evaluated"
        );
        assert_eq!(
            channel["labelled_ranges"].as_u64(),
            Some(truth.ranges.len() as u64),
            "{id}"
        );
        let (tp, fp, fn_) = (
            channel["events"]["tp"].as_u64().unwrap(),
            channel["events"]["fp"].as_u64().unwrap(),
            channel["events"]["fn"].as_u64().unwrap(),
        );
        assert_eq!(
            tp + fn_,
            truth.ranges.len() as u64,
            "{id}: each labelled range is a TP or a FN"
        );
        assert!(fp <= channel["detected_events"].as_u64().unwrap(), "{id}");
        // Point-wise: true positives plus false negatives are the labelled points.
        let labelled_points: u64 = truth.ranges.iter().map(|(s, e)| e - s).sum();
        let points = &channel["points"];
        assert_eq!(
            points["tp"].as_u64().unwrap() + points["fn"].as_u64().unwrap(),
            labelled_points,
            "{id}"
        );
        // Point adjustment never loses a true positive.
        assert!(
            channel["points_adjusted"]["tp"].as_u64() >= points["tp"].as_u64(),
            "{id}"
        );
        assert_eq!(
            channel["delays"].as_array().unwrap().len() as u64,
            tp,
            "{id}: one delay per detected range"
        );
        total_ranges += truth.ranges.len() as u64;
        total_tp += tp;
    }
    let totals = &figures["totals"];
    assert_eq!(totals["labelled_ranges"].as_u64(), Some(total_ranges));
    assert_eq!(totals["events"]["tp"].as_u64(), Some(total_tp));
    let samples: u64 = labels
        .iter()
        .filter(|l| l.channel == "T-3" || l.channel == "P-4")
        .map(|l| l.rows)
        .sum();
    assert_eq!(totals["samples"].as_u64(), Some(samples));
}

/// `satwatch bench` with `args` added; its stdout as JSON, or its stderr.
fn bench(args: &[&str]) -> Result<Value, String> {
    let output = Command::new(satwatch_bin())
        .args([
            "bench",
            "--pipeline",
            SMAP_PIPELINE,
            "--data",
            "data/smap",
            "--json",
        ])
        .args(args)
        .current_dir(repo_root())
        .output()
        .unwrap();
    if !output.status.success() {
        return Err(String::from_utf8_lossy(&output.stderr).into_owned());
    }
    Ok(serde_json::from_slice(&output.stdout).expect("--json prints one JSON object"))
}

#[test]
fn bench_forecasts_every_window_on_the_threads_it_is_given() {
    let rows = 200;
    let figures = bench(&[
        "--replicas",
        "1,2",
        "--limit",
        "200",
        "--backend-threads",
        "1",
    ])
    .unwrap();
    let window = common::window();
    for (run, replicas) in figures["runs"].as_array().unwrap().iter().zip([1, 2]) {
        let channels = 27 * replicas;
        assert_eq!(run["channels"], channels, "{run}");
        assert_eq!(run["backend_threads"], 1, "{run}");
        assert_eq!(run["samples"], channels * rows, "{run}");
        assert_eq!(
            run["windows"],
            channels * (rows - window + 1),
            "one forecast per full window: {run}"
        );
        let ratio = run["ratio_to_ceiling"].as_f64().unwrap();
        assert!(ratio > 0.0 && ratio.is_finite(), "{run}");
    }
    let refused = bench(&["--replicas", "1", "--backend-threads", "0"]).unwrap_err();
    assert!(
        refused.contains("--backend-threads must be at least 1"),
        "{refused}"
    );
}

/// The shipped models are served in their row form: a batch of one channel's
/// consecutive windows reaches ONNX Runtime as the rows they share, with no
/// windows laid out; `--model-files` serves the files on laid-out windows,
/// and forecasts exactly as many windows.
#[test]
fn bench_serves_the_row_form_and_the_model_files_on_request() {
    let args = [
        "--replicas",
        "1",
        "--limit",
        "200",
        "--backend-threads",
        "1",
    ];
    let rows = bench(&args).unwrap();
    let files = bench(&[&args[..], &["--model-files"]].concat()).unwrap();
    let (rows, files) = (&rows["runs"][0], &files["runs"][0]);
    assert_eq!(rows["windows"], files["windows"]);
    assert_eq!(
        rows["layout_share"].as_f64(),
        Some(0.0),
        "one run per batch is read in place: {rows}"
    );
    assert!(
        files["layout_share"].as_f64().unwrap() > 0.0,
        "the model files take laid-out windows: {files}"
    );
}

/// `--latency-rates`: samples handed to the engine at the offered load, each
/// scored, and the time to its score row measured from its hand-over, so it
/// includes the batcher's wait for more windows (`max_queue_delay`, 2 ms in
/// the shipped configs: at this load a batch never fills before it).
#[test]
fn bench_measures_its_own_latency_at_an_offered_load() {
    let figures = bench(&[
        "--replicas",
        "1",
        "--limit",
        "200",
        "--latency-rates",
        "2000",
        "--latency-seconds",
        "0.5",
    ])
    .unwrap();
    let latency = figures["latency"].as_array().unwrap();
    assert_eq!(latency.len(), 1, "{figures}");
    let at = &latency[0];
    // 2,000/s for 0.5 s over 27 channels: 38 rows each past the warm-up.
    assert_eq!(at["samples"], 27 * 38, "{at}");
    assert_eq!(at["scored"], 27 * 38, "every paced sample is scored: {at}");
    let achieved = at["achieved_samples_per_s"].as_f64().unwrap();
    assert!(
        achieved > 0.0 && achieved < 2000.0 * 1.1,
        "the feeder never runs ahead of the offered load: {at}"
    );
    let ms = |key: &str| at[key].as_f64().unwrap();
    assert!(
        ms("p50_ms") >= 1.5,
        "the batcher's wait is part of it: {at}"
    );
    assert!(
        ms("p50_ms") <= ms("p99_ms")
            && ms("p99_ms") <= ms("p999_ms")
            && ms("p999_ms") <= ms("max_ms"),
        "{at}"
    );
    let refused = bench(&["--replicas", "1", "--latency-rates", "0"]).unwrap_err();
    assert!(refused.contains("not a positive rate"), "{refused}");
}
