//! `satwatch plan --json` on the shipped pipeline: what the scripts read
//! instead of parsing `pipelines/smap.toml` and `config.pbtxt` themselves,
//! checked against the model repository, the contract's SMAP subsystems and
//! the row counts in `labeled_anomalies.csv`.

mod common;

use std::process::Command;

use common::{repo_root, satwatch_bin, SMAP_PIPELINE};
use satwatch::{dataset, repository};
use serde_json::Value;

/// `satwatch plan --pipeline <SMAP> --json` with `args` added.
fn plan(args: &[&str]) -> Value {
    let output = Command::new(satwatch_bin())
        .args(["plan", "--pipeline", SMAP_PIPELINE, "--json"])
        .args(args)
        .current_dir(repo_root())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("--json prints one JSON object")
}

fn count(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"))
}

#[test]
fn plan_lists_the_27_channels_as_the_repository_and_the_contract_have_them() {
    let plan = plan(&[]);
    let channels = plan["channels"].as_array().unwrap();
    assert_eq!(channels.len(), 27, "{plan}");
    let mut longest = 0;
    for c in channels {
        let id = c["id"].as_str().unwrap();
        // The contract: the subsystem (and so the topic) by the channel's letter.
        let subsystem = match &id[..1] {
            "E" => "eps",
            "A" => "acs",
            "F" => "fsw",
            "T" => "tcs",
            "D" => "data",
            "S" => "ss",
            "P" => "ps",
            other => panic!("{id}: no SMAP letter {other}"),
        };
        assert_eq!(c["subsystem"], subsystem, "{c}");
        assert_eq!(c["topic"], format!("telemetry.{subsystem}"), "{c}");
        assert_eq!(c["model"], format!("smap_{id}"), "{c}");
        let spec = repository::load_model(
            &repo_root()
                .join("model_repository")
                .join(format!("smap_{id}")),
        )
        .unwrap();
        assert_eq!(count(&c["window"]), spec.window as u64, "{c}");
        assert_eq!(count(&c["horizon"]), spec.horizon as u64, "{c}");
        assert_eq!(count(&c["width"]), 25, "SMAP samples carry 25 values: {c}");
        assert!(c.get("rows").is_none(), "no rows without --data: {c}");
        longest = longest.max(spec.window as u64);
    }
    assert_eq!(count(&plan["window"]), longest);
    assert_eq!(plan["models"].as_array().unwrap().len(), 27);
    let topics = plan["topics"]["telemetry"].as_array().unwrap();
    assert_eq!(topics.len(), 7, "{plan}");
    assert_eq!(plan["topics"]["dead_letters"], "telemetry.dlq");
    assert!(plan.get("replay").is_none(), "{plan}");
}

/// The split's rows per channel come from the label file here, not from the
/// `.npy` files the command reads: every row past the window is scored.
#[test]
fn plan_with_data_expects_a_score_row_for_every_sample_past_the_window() {
    let plan = plan(&["--data", "data/smap"]);
    let labels =
        dataset::load_labels(&repo_root().join("data/smap/labeled_anomalies.csv")).unwrap();
    let mut expected = 0;
    let mut samples = 0;
    for c in plan["channels"].as_array().unwrap() {
        let id = c["id"].as_str().unwrap();
        let rows = labels.iter().find(|l| l.channel == id).unwrap().rows;
        let window = count(&c["window"]);
        assert_eq!(count(&c["rows"]), rows, "{c}");
        assert_eq!(count(&c["samples"]), rows, "{c}");
        assert_eq!(count(&c["warm_up"]), window, "{c}");
        assert_eq!(count(&c["expected_scores"]), rows - window, "{c}");
        expected += rows - window;
        samples += rows;
    }
    let replay = &plan["replay"];
    assert_eq!(count(&replay["expected_scores"]), expected, "{replay}");
    assert_eq!(count(&replay["samples"]), samples, "{replay}");
    assert_eq!(replay["split"], "test");
}

/// bench.sh's latency runs: the window's rows first, then a measured part
/// from --start window, every sample of which is scored.
#[test]
fn plan_of_a_replay_past_the_warm_up_expects_every_sample_scored() {
    let window = common::window().to_string();
    let warm = plan(&["--data", "data/smap", "--limit", &window]);
    assert_eq!(
        count(&warm["replay"]["expected_scores"]),
        0,
        "{}",
        warm["replay"]
    );
    assert_eq!(
        count(&warm["replay"]["samples"]),
        27 * common::window() as u64
    );
    let measured = plan(&["--data", "data/smap", "--start", &window, "--limit", "40"]);
    let replay = &measured["replay"];
    assert_eq!(count(&replay["samples"]), 27 * 40, "{replay}");
    assert_eq!(count(&replay["expected_scores"]), 27 * 40, "{replay}");
    assert_eq!(count(&replay["warm_up"]), 0, "{replay}");
}
