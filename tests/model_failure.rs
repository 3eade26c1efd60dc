//! One model that fails does not stop the others. Version 1 of `smap_A-1`
//! is the shipped model with a tripwire: ONNX Runtime refuses to run any
//! batch holding a marked sample (its Gather reads out of bounds). Its
//! channel is held, nothing of it committed, and readiness, the model's
//! ready endpoint and the repository index say so; A-2 (on A-1's partition)
//! flows on until `[kafka] max_uncommitted_per_partition` records wait
//! behind A-1's held one, when the partition pauses, and P-4 (another
//! topic, three anomalies) keeps flowing to its end; once version 2 (the
//! shipped file) is loaded, A-1 resumes where it stopped and the partition
//! with it. Checked against a reference run on the shipped models that
//! consumes the same records: the same rows, and each `forecasts` and
//! `anomalies` record published once.

mod common;

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use common::*;
use prost::Message;
use satwatch::backend::graph::proto::{self, tensor_proto::DataType};

/// A-1's model fails on its marked sample; A-2 shares its partition (one per
/// topic), P-4 is on another topic. Rows 0..5400 hold anomalies of P-4 and
/// A-1 (see tests/crash_recovery.rs), so events are published on both sides.
const CHANNELS: &str = "A-1,A-2,P-4";
const HEALTHY: [&str; 2] = ["A-2", "P-4"];
const FAILING_CHANNEL: &str = "A-1";
const FAILING_MODEL: &str = "smap_A-1";
/// The marked sample's seq, and the rows replayed per channel.
const MARKED_SEQ: i64 = 1000;
const ROWS: i64 = 5400;
/// The marker: this value on a command column that otherwise holds 0 or 1
/// (A-1's column 10: center 0, scale 0.05, so 10 once normalised).
const MARKED_COLUMN: usize = 10;
const MARKED_VALUE: f32 = 0.5;
const TOKEN: &str = "t0ken-for-model-failure";
/// `[kafka] max_uncommitted_per_partition` of the faulty run: well below
/// the 8,800 records behind A-1's marked one on its partition.
const MAX_UNCOMMITTED: i64 = 2000;

/// Writes `original` with a tripwire added: the forecast plus a value
/// gathered from a one-element table at index 1 when the newest row of any
/// window in the batch holds the marker, else at index 0 (where it is 0).
/// So the outputs are exactly the original's, and a marked batch makes
/// ONNX Runtime fail with "indices element out of data bounds".
fn with_tripwire(original: &Path, to: &Path) {
    let bytes = std::fs::read(original).unwrap();
    let mut model = proto::ModelProto::decode(bytes.as_slice()).unwrap();
    let graph = model.graph.as_mut().unwrap();
    let output = graph.output[0].name.clone().unwrap();
    let input = graph.input[0].name.clone().unwrap();
    for node in &mut graph.node {
        for o in &mut node.output {
            if *o == output {
                *o = "untripped".into();
            }
        }
    }
    let scalar_f32 = |name: &str, dims: Vec<i64>, values: &[f32]| proto::TensorProto {
        dims,
        data_type: Some(DataType::Float as i32),
        name: Some(name.into()),
        raw_data: Some(values.iter().flat_map(|v| v.to_le_bytes()).collect()),
        ..Default::default()
    };
    let scalar_i64 = |name: &str, value: i64| proto::TensorProto {
        dims: vec![],
        data_type: Some(DataType::Int64 as i32),
        name: Some(name.into()),
        raw_data: Some(value.to_le_bytes().to_vec()),
        ..Default::default()
    };
    let newest_row = window() - 1;
    graph.initializer.extend([
        scalar_i64("trip_row", newest_row),
        scalar_i64("trip_column", MARKED_COLUMN as i64),
        scalar_f32("trip_mark", vec![], &[MARKED_VALUE / 0.05]),
        scalar_f32("trip_tolerance", vec![], &[1.0]),
        scalar_f32("trip_table", vec![1], &[0.0]),
    ]);
    let node = |op: &str, inputs: &[&str], output: &str, attribute: Vec<proto::AttributeProto>| {
        proto::NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.into()],
            name: Some(output.into()),
            op_type: Some(op.into()),
            attribute,
            domain: None,
        }
    };
    let int = |name: &str, value: i64| proto::AttributeProto {
        name: Some(name.into()),
        i: Some(value),
        r#type: Some(proto::attribute_proto::AttributeType::Int as i32),
        ..Default::default()
    };
    graph.node.extend([
        node(
            "Gather",
            &[&input, "trip_row"],
            "trip_newest",
            vec![int("axis", 1)],
        ),
        node(
            "Gather",
            &["trip_newest", "trip_column"],
            "trip_value",
            vec![int("axis", 1)],
        ),
        node("Sub", &["trip_value", "trip_mark"], "trip_offset", vec![]),
        node("Abs", &["trip_offset"], "trip_distance", vec![]),
        node(
            "Less",
            &["trip_distance", "trip_tolerance"],
            "trip_marked",
            vec![],
        ),
        node(
            "Cast",
            &["trip_marked"],
            "trip_index",
            vec![int("to", DataType::Int64 as i64)],
        ),
        node(
            "ReduceMax",
            &["trip_index"],
            "trip_any",
            vec![int("keepdims", 0)],
        ),
        node(
            "Gather",
            &["trip_table", "trip_any"],
            "trip_zero",
            vec![int("axis", 0)],
        ),
        node("Add", &["untripped", "trip_zero"], &output, vec![]),
    ]);
    std::fs::create_dir_all(to.parent().unwrap()).unwrap();
    std::fs::write(to, model.encode_to_vec()).unwrap();
}

/// A pipeline for group `group` on the model repository at `repository`,
/// writing to `<prefix>anomalies` and `<prefix>forecasts`. Both runs serve
/// the model files as they are (`row_form = false`), so the tripwire model
/// and the shipped one compute the same sums.
fn pipeline(
    dir: &Path,
    group: &str,
    prefix: &str,
    repository: &Path,
    max_uncommitted: Option<i64>,
) -> PathBuf {
    pipeline_variant(dir, &format!("{group}.toml"), |t| {
        if let Some(max) = max_uncommitted {
            set(t, "kafka", "max_uncommitted_per_partition", max);
        }
        set(t, "kafka", "group_id", group);
        set(t, "kafka", "anomalies_topic", format!("{prefix}anomalies"));
        set(t, "kafka", "forecasts_topic", format!("{prefix}forecasts"));
        set(t, "kafka", "dlq_topic", format!("{prefix}telemetry.dlq"));
        set(t, "repository", "path", repository.display().to_string());
        set(t, "repository", "mode", "explicit");
        set(t, "engine", "row_form", false);
    })
}

/// The value of the series `name{labels}` in a Prometheus text page.
fn metric(page: &str, series: &str) -> Option<f64> {
    page.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

fn answer(service: &Satwatch, path: &str) -> (u16, String) {
    service.get(path).unwrap_or_else(|| {
        let log = service.log_text();
        let tail: Vec<&str> = log.lines().rev().take(20).collect();
        panic!(
            "satwatch no longer answers {path} (it exited); the end of its log:\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        )
    })
}

/// `POST /v2/repository/index`: each model's (state, reason).
fn index_states(service: &Satwatch) -> std::collections::BTreeMap<String, (String, String)> {
    let (status, body) =
        http_post(&service.http, "/v2/repository/index", Some(TOKEN)).expect("satwatch answers");
    assert_eq!(status, 200, "{body}");
    let entries: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
    entries
        .iter()
        .map(|e| {
            let field = |k: &str| e[k].as_str().unwrap_or_default().to_owned();
            (field("name"), (field("state"), field("reason")))
        })
        .collect()
}

fn scores_of(pg: &Postgres, channel: &str) -> (i64, i64) {
    let row = &pg.query(&format!(
        "SELECT count(*), coalesce(max(seq), -1) FROM scores WHERE channel = '{channel}'"
    ))[0];
    (row.get(0), row.get(1))
}

/// An event payload without `model_version` (A-1's differs from the
/// reference's after the new version is loaded).
fn without_version(payloads: &[String]) -> Vec<serde_json::Value> {
    payloads
        .iter()
        .map(|p| {
            let mut v: serde_json::Value = serde_json::from_str(p).unwrap();
            v.as_object_mut().unwrap().remove("model_version");
            v
        })
        .collect()
}

#[test]
fn a_failing_model_holds_its_channels_while_the_others_flow_and_resumes_with_nothing_lost() {
    let broker = Broker::start();
    let pg = Postgres::start();
    let dir = tempfile::tempdir().unwrap();
    let reference_url = pg.create_database("reference");
    let window = window();

    // The marker occurs nowhere in A-1's data: the marked sample is the only one.
    let features = 25;
    let data = satwatch::dataset::load_channel(
        &repo_root().join("data/smap"),
        "test",
        FAILING_CHANNEL,
        features,
    )
    .unwrap();
    assert!(
        (0..ROWS as usize).all(|r| (data.values[[r, MARKED_COLUMN]] - MARKED_VALUE).abs() > 0.1),
        "A-1's column {MARKED_COLUMN} never holds the marker"
    );

    let repo = dir.path().join("model_repository");
    copy_dir(&repo_root().join("model_repository"), &repo);
    let shipped = repo_root().join("model_repository/smap_A-1/1/model.onnx");
    with_tripwire(&shipped, &repo.join("smap_A-1/1/model.onnx"));
    let faulty = pipeline(dir.path(), "faulty", "", &repo, Some(MAX_UNCOMMITTED));
    let reference = pipeline(
        dir.path(),
        "reference",
        "reference.",
        &repo_root().join("model_repository"),
        None,
    );
    for p in [&faulty, &reference] {
        let p = p.to_str().unwrap();
        satwatch(&["topics", "--pipeline", p, "--partitions", "1"], &broker);
    }
    let reference_run = Satwatch::start_with(&broker, &reference_url, &reference, dir.path(), &[]);
    let service = Satwatch::start_with(
        &broker,
        &pg.url(),
        &faulty,
        dir.path(),
        &[("SATWATCH_REPOSITORY_TOKEN", TOKEN)],
    );

    // Rows 0..5400 of each channel, A-1's row 1000 marked.
    replay(&broker, CHANNELS, 0, MARKED_SEQ);
    let mut marked: Vec<f32> = data.values.row(MARKED_SEQ as usize).to_vec();
    marked[MARKED_COLUMN] = MARKED_VALUE;
    let payload = satwatch::telemetry::encode(
        FAILING_CHANNEL,
        MARKED_SEQ as u64,
        &chrono::Utc::now(),
        &marked,
    );
    produce(
        &broker,
        "telemetry.acs",
        FAILING_CHANNEL.as_bytes(),
        payload.as_bytes(),
    );
    replay(&broker, "A-2,P-4", MARKED_SEQ, ROWS - MARKED_SEQ);
    replay(
        &broker,
        FAILING_CHANNEL,
        MARKED_SEQ + 1,
        ROWS - MARKED_SEQ - 1,
    );

    // A-1's model is unavailable, and says so.
    let reasons = wait_for(
        "readiness to name the failing model",
        Duration::from_secs(60),
        || {
            let (status, body) = answer(&service, "/v2/health/ready");
            (status == 503 && body.contains(FAILING_MODEL)).then_some(body)
        },
    );
    eprintln!("readiness: {}", reasons.trim());
    let (status, body) = answer(&service, &format!("/v2/models/{FAILING_MODEL}/ready"));
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("inference failed"),
        "the reason is given: {body}"
    );
    let (status, body) = answer(&service, "/v2/models/smap_P-4/ready");
    assert_eq!(status, 200, "the other models stay ready: {body}");
    let index = index_states(&service);
    let (state, reason) = &index[FAILING_MODEL];
    assert_eq!(state, "UNAVAILABLE", "the index says so too: {index:?}");
    assert!(
        reason.contains("inference failed"),
        "with the reason: {reason}"
    );
    assert_eq!(index["smap_P-4"].0, "READY", "{index:?}");

    // P-4 flows to its end; A-2 flows past A-1's held record until
    // MAX_UNCOMMITTED records wait behind it, when their partition pauses.
    wait_for(
        "P-4 to be scored to its last sample, and A-1's partition paused",
        Duration::from_secs(60),
        || {
            let page = answer(&service, "/metrics").1;
            (scores_of(&pg, "P-4") == (ROWS - window, ROWS - 1)
                && metric(&page, "satwatch_partitions_paused") == Some(1.0))
            .then_some(())
        },
    );
    let a2_bounded = |what: &str| {
        let (_, a2_last) = scores_of(&pg, HEALTHY[0]);
        assert!(
            a2_last > MARKED_SEQ && a2_last <= MARKED_SEQ + MAX_UNCOMMITTED,
            "{what}: A-2 flows past A-1's held record, for at most {MAX_UNCOMMITTED} \
             records (its last scored seq is {a2_last})"
        );
        a2_last
    };
    let a2_last = a2_bounded("paused");
    wait_for(
        "P-4's forecasts to be published",
        Duration::from_secs(60),
        || {
            let published = published_forecasts(&broker, "forecasts");
            let p4 = published.keys().filter(|(c, _)| c == "P-4").count() as i64;
            (p4 == ROWS - window + 1).then_some(())
        },
    );
    let (a1_rows, a1_last) = scores_of(&pg, FAILING_CHANNEL);
    assert!(
        a1_last < MARKED_SEQ,
        "A-1 is held before its marked sample (scored {a1_rows} rows up to seq {a1_last})"
    );
    let committed = committed_vs_end(&broker, "faulty", &["telemetry.acs", "telemetry.ps"]);
    eprintln!(
        "while held: A-1 scored up to seq {a1_last}, A-2 up to {a2_last}; committed vs end {committed:?}"
    );
    for (topic, _, committed, end) in &committed {
        match topic.as_str() {
            "telemetry.acs" => assert!(committed < end, "A-1's records are not committed"),
            _ => assert_eq!(committed, end, "{topic} is committed to its end"),
        }
    }
    let page = answer(&service, "/metrics").1;
    let available = metric(
        &page,
        &format!("satwatch_model_available{{model=\"{FAILING_MODEL}\"}}"),
    );
    let failures = metric(
        &page,
        &format!("satwatch_model_failures_total{{model=\"{FAILING_MODEL}\"}}"),
    );
    let p4_available = metric(&page, "satwatch_model_available{model=\"smap_P-4\"}");
    eprintln!(
        "metrics: available {available:?}, failures {failures:?}, P-4 available {p4_available:?}"
    );
    assert_eq!(available, Some(0.0));
    assert!(
        failures.is_some_and(|f| f >= 3.0),
        "failures counted: {failures:?}"
    );
    assert_eq!(p4_available, Some(1.0));
    assert_eq!(a2_bounded("still paused"), a2_last, "A-2 stays paused");

    // Version 2, the shipped file: A-1 resumes where it stopped.
    copy_dir(
        &repo_root().join("model_repository/smap_A-1/1"),
        &repo.join("smap_A-1/2"),
    );
    let (status, body) = http_post(
        &service.http,
        &format!("/v2/repository/models/{FAILING_MODEL}/load"),
        Some(TOKEN),
    )
    .expect("satwatch answers");
    assert_eq!(status, 200, "{body}");
    let expected = 3 * (ROWS - window);
    wait_for_scores(
        &pg,
        expected,
        "A-1 to resume and finish",
        Duration::from_secs(60),
    );
    wait_for("readiness to be 200 again", Duration::from_secs(30), || {
        (answer(&service, "/v2/health/ready").0 == 200).then_some(())
    });
    assert_eq!(
        answer(&service, &format!("/v2/models/{FAILING_MODEL}/ready")).0,
        200
    );
    let index = index_states(&service);
    assert_eq!(index[FAILING_MODEL].0, "READY", "{index:?}");
    let page = answer(&service, "/metrics").1;
    assert_eq!(
        metric(
            &page,
            &format!("satwatch_model_available{{model=\"{FAILING_MODEL}\"}}")
        ),
        Some(1.0)
    );
    wait_for("A-1's partition to resume", Duration::from_secs(10), || {
        let page = answer(&service, "/metrics").1;
        (metric(&page, "satwatch_partitions_paused") == Some(0.0)).then_some(())
    });
    wait_for_commits(&broker, "faulty", Duration::from_secs(60));
    wait_for(
        "the reference run to score everything",
        Duration::from_secs(60),
        || (pg.count_in("reference", "SELECT count(*) FROM scores") == expected).then_some(()),
    );
    wait_for_commits(&broker, "reference", Duration::from_secs(60));
    let log = service.log_text();
    assert!(service.terminate(Duration::from_secs(30)).success());
    assert!(reference_run.terminate(Duration::from_secs(30)).success());
    assert!(log.contains("model unavailable"), "the failure is logged");

    // One row per sample, the reference's values; A-1 from its marked
    // sample on under version 2.
    assert_one_score_per_sample(&pg, CHANNELS, ROWS, window);
    let (got, want) = (scores(&pg, "satwatch"), scores(&pg, "reference"));
    assert_eq!(got.len(), want.len());
    for (key, w) in &want {
        let g = &got[key];
        assert!(
            g.2 == w.2 && close(g.3, w.3) && close(g.4, w.4) && g.5 == w.5,
            "{key:?}: {g:?} != reference {w:?}"
        );
        let version = match key.0.as_str() {
            FAILING_CHANNEL if key.1 >= MARKED_SEQ => 2,
            FAILING_CHANNEL => g.6,
            _ => 1,
        };
        assert_eq!(g.6, version, "{key:?}: model version");
    }
    let v1_rows = got
        .values()
        .filter(|r| r.0 == FAILING_CHANNEL && r.6 == 1)
        .count();
    assert!(v1_rows > 0, "A-1 ran version 1 before its marked sample");
    let (got, want) = (forecasts(&pg, "satwatch"), forecasts(&pg, "reference"));
    assert_eq!(got.len() as i64, 3 * (ROWS - window + 1));
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    for (key, w) in &want {
        let g = &got[key];
        assert!(
            g.iter().zip(w).all(|(a, b)| close(*a, *b)),
            "{key:?}: forecast {g:?} != reference {w:?}"
        );
    }

    // Event rows likewise, but for their last column, model_version.
    let without_last = |rows: Vec<String>| -> Vec<String> {
        rows.into_iter()
            .map(|r| {
                r.rsplit_once('|')
                    .map_or(r.clone(), |(head, _)| head.to_owned())
            })
            .collect()
    };
    assert_eq!(
        without_last(events(&pg, "satwatch")),
        without_last(events(&pg, "reference")),
        "anomaly_events"
    );

    // The topics, read_committed: each record once, the reference's.
    let got = published_forecasts(&broker, "forecasts");
    let want = published_forecasts(&broker, "reference.forecasts");
    assert_published_once(&got, "forecasts");
    assert_eq!(got.len() as i64, 3 * (ROWS - window + 1));
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    let got = published_events(&broker, "anomalies");
    let want = published_events(&broker, "reference.anomalies");
    assert_published_once(&got, "anomalies");
    assert!(
        !want.is_empty(),
        "the replayed stretch has anomalies: {}",
        events(&pg, "reference").len()
    );
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    for (key, w) in &want {
        assert_eq!(without_version(&got[key]), without_version(w), "{key:?}");
    }
    eprintln!(
        "checked: {} scores rows, A-1 on version 1 for {v1_rows} of them, {} event records",
        3 * (ROWS - window),
        got.len()
    );
}
