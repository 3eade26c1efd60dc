//! The offline runs: `satwatch eval --json` on two channels, checked against
//! the label file, and `satwatch bench pipeline --json`, checked against the data.

mod common;

use std::process::Command;

use common::{repo_root, satwatch_bin, SMAP_PIPELINE};
use satwatch::dataset;
use serde_json::Value;

#[test]
fn eval_json_agrees_with_the_labels_and_its_own_counts() {
    let figures = eval("T-3,P-4", &[]).unwrap();
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

/// `satwatch <command...> --pipeline <SMAP> --data data/smap --json` with
/// `args` added: its stdout as JSON, or its stderr.
fn satwatch_json(command: &[&str], args: &[&str]) -> Result<Value, String> {
    let output = Command::new(satwatch_bin())
        .args(command)
        .args(["--pipeline", SMAP_PIPELINE, "--data", "data/smap", "--json"])
        .args(args)
        .current_dir(repo_root())
        .output()
        .unwrap();
    if !output.status.success() {
        return Err(String::from_utf8_lossy(&output.stderr).into_owned());
    }
    Ok(serde_json::from_slice(&output.stdout).expect("--json prints one JSON object"))
}

/// `satwatch eval --json` on `channels` with `args` added.
fn eval(channels: &str, args: &[&str]) -> Result<Value, String> {
    let mut all = vec!["--channels", channels];
    all.extend_from_slice(args);
    satwatch_json(&["eval"], &all)
}

fn count(v: &Value) -> u64 {
    v.as_u64().unwrap()
}

#[test]
fn eval_lists_every_event_with_its_cause_and_the_figures_long_alarms_cannot_game() {
    // D-5 holds a false alarm, P-1 three ranges; A-5 a range far shorter
    // than its alarm.
    let figures = eval("D-5,P-1,A-5", &[]).unwrap();
    let events = figures["events"].as_array().unwrap();
    let mut flagged_total = 0;
    let mut labelled_total = 0;
    for channel in figures["channels"].as_array().unwrap() {
        let id = channel["channel"].as_str().unwrap();
        let own: Vec<&Value> = events.iter().filter(|e| e["channel"] == id).collect();
        assert_eq!(own.len() as u64, count(&channel["detected_events"]), "{id}");
        let false_alarms = own.iter().filter(|e| e["matched"].is_null()).count() as u64;
        assert_eq!(false_alarms, count(&channel["events"]["fp"]), "{id}");
        for e in &own {
            let cause = e["cause"].as_str().unwrap_or_default();
            assert!(
                ["surprise", "burst", "level", "excursion", "stuck"].contains(&cause),
                "{id}: every event names the part that opened it: {e}"
            );
            assert!(count(&e["start"]) <= count(&e["end"]), "{e}");
            if let Some(range) = e["matched"].as_array() {
                let (from, to) = (count(&range[0]), count(&range[1]));
                assert!(
                    count(&e["start"]) < to && from <= count(&e["end"]),
                    "the matched range overlaps the event: {e}"
                );
            }
        }
        // Flagged samples are the samples inside events; labelled ones the
        // samples inside ranges.
        let points = &channel["points"];
        let flagged = count(&points["tp"]) + count(&points["fp"]);
        let labelled = count(&points["tp"]) + count(&points["fn"]);
        assert_eq!(count(&channel["flagged_samples"]), flagged, "{id}");
        assert_eq!(count(&channel["labelled_samples"]), labelled, "{id}");
        let span: u64 = own
            .iter()
            .map(|e| count(&e["end"]) + 1 - count(&e["start"]))
            .sum();
        assert!(
            span >= flagged,
            "{id}: events may overlap, never undercount"
        );
        // Fc1: event recall with point precision.
        let recall = count(&channel["events"]["tp"]) as f64
            / (count(&channel["events"]["tp"]) + count(&channel["events"]["fn"])) as f64;
        let precision = count(&points["tp"]) as f64 / flagged.max(1) as f64;
        let fc1 = channel["fc1"].as_f64().unwrap();
        let expected = if precision + recall > 0.0 {
            2.0 * precision * recall / (precision + recall)
        } else {
            0.0
        };
        assert!(
            (fc1 - expected).abs() < 1e-9,
            "{id}: Fc1 {fc1} != {expected}"
        );
        flagged_total += flagged;
        labelled_total += labelled;
    }
    let totals = &figures["totals"];
    assert_eq!(count(&totals["flagged_samples"]), flagged_total);
    let coverage = totals["coverage"].as_f64().unwrap();
    assert!((coverage - flagged_total as f64 / labelled_total as f64).abs() < 1e-9);
    let by_cause: u64 = totals["events_by_cause"]
        .as_object()
        .unwrap()
        .values()
        .map(count)
        .sum();
    assert_eq!(by_cause, events.len() as u64);
    let delays = (
        totals["median_delay"].as_u64(),
        totals["p90_delay"].as_u64(),
    );
    assert!(matches!(delays, (Some(m), Some(p)) if m <= p), "{delays:?}");
}

#[test]
fn eval_takes_detect_settings_for_one_run_and_refuses_bad_ones_by_name() {
    let shipped = eval("P-4", &[]).unwrap();
    // A level threshold no value reaches: P-4's level events go.
    let changed = eval("P-4", &["--detect", "level.threshold=1000"]).unwrap();
    let causes = |v: &Value| -> Vec<String> {
        v["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["cause"].as_str().unwrap().to_owned())
            .collect()
    };
    assert!(
        causes(&shipped).iter().any(|c| c == "level"),
        "{:?}",
        causes(&shipped)
    );
    assert!(
        !causes(&changed).iter().any(|c| c == "level"),
        "{:?}",
        causes(&changed)
    );

    let refused = eval("P-4", &["--detect", "burst.threshold=-1"]).unwrap_err();
    assert!(
        refused.contains("detect.burst.threshold = -1 must be > 0"),
        "{refused}"
    );
    let refused = eval("P-4", &["--detect", "no_such_setting=1"]).unwrap_err();
    assert!(refused.contains("no_such_setting"), "{refused}");
    let refused = eval("P-4", &["--detect", "burst.window"]).unwrap_err();
    assert!(refused.contains("KEY=VALUE"), "{refused}");
}

/// training/folds.py on a grid of two candidates: every channel is held out
/// once, and the out-of-fold figures are the held-out channels' counts.
#[test]
fn folds_choose_on_other_channels_and_report_the_held_out_ones() {
    let dir = tempfile::tempdir().unwrap();
    let grid = dir.path().join("grid.toml");
    std::fs::write(&grid, "[events]\nmin_gap = [50, 128]\n").unwrap();
    let json = dir.path().join("folds.json");
    let output = Command::new("python3")
        .args(["training/folds.py", "--grid"])
        .arg(&grid)
        .arg("--json")
        .arg(&json)
        .args(["--satwatch"])
        .arg(satwatch_bin())
        .current_dir(repo_root())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let table = String::from_utf8_lossy(&output.stdout);
    assert!(table.contains("**out of fold** (3 folds)"), "{table}");
    let figures: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let folds: Vec<Vec<String>> = serde_json::from_value(figures["folds"].clone()).unwrap();
    let mut held_out: Vec<String> = folds.concat();
    held_out.sort();
    let all = eval("all", &[]).unwrap();
    let mut channels: Vec<String> = all["channels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["channel"].as_str().unwrap().to_owned())
        .collect();
    channels.sort();
    assert_eq!(held_out, channels, "every channel is held out exactly once");
    let oof = &figures["out_of_fold"]["events"];
    let held: u64 = figures["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| count(&c["held_out"]["events"]["tp"]))
        .sum();
    assert_eq!(count(&oof["tp"]), held);
}

/// `satwatch bench pipeline --json` with `args` added.
fn bench(args: &[&str]) -> Result<Value, String> {
    satwatch_json(&["bench", "pipeline"], args)
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
