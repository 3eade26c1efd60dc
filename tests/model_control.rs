//! Model repository control under load: a new version swaps in while a
//! replay runs (one row per sample, the version switching at one point per
//! channel), and broken versions are refused while the old one serves.

mod common;

use std::{path::Path, time::Duration};

use common::*;

const CHANNELS: &str = "A-1,E-2,T-1";
const ROWS: i64 = 3000;
const TOKEN: &str = "t0ken-for-tests";

/// A copy of the model repository and a pipeline that serves it.
fn repository_copy(dir: &Path, mode: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let repo = dir.join("model_repository");
    copy_dir(&repo_root().join("model_repository"), &repo);
    let pipeline = pipeline_variant(dir, "control.toml", |t| {
        set(t, "repository", "path", repo.display().to_string());
        set(t, "repository", "mode", mode);
        set(t, "repository", "poll_interval_ms", 200);
    });
    (repo, pipeline)
}

fn served_version(service: &Satwatch, model: &str) -> String {
    let (status, body) = service.get(&format!("/v2/models/{model}")).unwrap();
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["versions"][0].as_str().unwrap().to_owned()
}

fn load(service: &Satwatch, model: &str, token: Option<&str>) -> (u16, String) {
    http_post(
        &service.http,
        &format!("/v2/repository/models/{model}/load"),
        token,
    )
    .expect("satwatch answers")
}

#[test]
fn a_new_version_swaps_in_under_load_and_broken_ones_are_refused() {
    let broker = Broker::start();
    let pg = Postgres::start();
    let dir = tempfile::tempdir().unwrap();
    let (repo, pipeline) = repository_copy(dir.path(), "explicit");
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
    let service = Satwatch::start_with(
        &broker,
        &pg.url(),
        &pipeline,
        dir.path(),
        &[("SATWATCH_REPOSITORY_TOKEN", TOKEN)],
    );
    let addr = broker.addr();
    let replay = std::thread::spawn(move || replay_paced(&addr, CHANNELS, 0, ROWS, Some(1200)));
    wait_for(
        "a third of the replay to be scored",
        Duration::from_secs(60),
        || (pg.count("SELECT count(*) FROM scores") > ROWS).then_some(()),
    );

    // Version 2 of smap_A-1 (the policy serves the latest).
    let model = repo.join("smap_A-1");
    copy_dir(&model.join("1"), &model.join("2"));
    assert_eq!(load(&service, "smap_A-1", None).0, 401, "no token");
    assert_eq!(
        load(&service, "smap_A-1", Some("wrong")).0,
        401,
        "wrong token"
    );
    let (status, body) = load(&service, "smap_A-1", Some(TOKEN));
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"version\":\"2\""), "{body}");
    assert_eq!(served_version(&service, "smap_A-1"), "2");

    // Version 3 is not an ONNX file: refused, 2 keeps serving.
    std::fs::create_dir(model.join("3")).unwrap();
    std::fs::write(model.join("3/model.onnx"), b"not a model").unwrap();
    let (status, body) = load(&service, "smap_A-1", Some(TOKEN));
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("3/model.onnx"),
        "the reason names the file: {body}"
    );
    assert_eq!(served_version(&service, "smap_A-1"), "2");
    std::fs::remove_dir_all(model.join("3")).unwrap();

    // A config that disagrees with the ONNX file: refused likewise.
    let config = std::fs::read_to_string(model.join("config.pbtxt")).unwrap();
    let horizon = "dims: [ 10 ]";
    assert!(
        config.contains(horizon),
        "the shipped config declares the horizon as {horizon}"
    );
    std::fs::write(
        model.join("config.pbtxt"),
        config.replace(horizon, "dims: [ 12 ]"),
    )
    .unwrap();
    let (status, body) = load(&service, "smap_A-1", Some(TOKEN));
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("config.pbtxt") || body.contains("model.onnx"),
        "{body}"
    );
    std::fs::write(model.join("config.pbtxt"), config).unwrap();
    assert_eq!(served_version(&service, "smap_A-1"), "2");

    // Unloading a model that channels need is refused; the index lists it.
    let (status, body) = http_post(
        &service.http,
        "/v2/repository/models/smap_A-1/unload",
        Some(TOKEN),
    )
    .unwrap();
    assert_eq!(status, 409, "{body}");
    let (status, body) = http_post(&service.http, "/v2/repository/index", None).unwrap();
    assert_eq!(status, 200);
    let index: serde_json::Value = serde_json::from_str(&body).unwrap();
    let a1 = index
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "smap_A-1")
        .expect("smap_A-1 in the index");
    assert_eq!(
        (a1["state"].as_str(), a1["version"].as_str()),
        (Some("READY"), Some("2"))
    );

    assert!(
        !replay.is_finished(),
        "the swaps happened while records were still arriving"
    );
    replay.join().unwrap();
    wait_for_scores(
        &pg,
        3 * (ROWS - window()),
        "everything to be scored",
        Duration::from_secs(60),
    );
    assert_eq!(
        service.get("/v2/health/ready").map(|(s, _)| s),
        Some(200),
        "ready throughout"
    );
    let log = service.log_text();
    assert!(service.terminate(Duration::from_secs(30)).success());

    assert_one_score_per_sample(&pg, CHANNELS, ROWS, window());
    for table in ["scores", "forecasts"] {
        let row = &pg.query(&format!(
            "SELECT max(seq) FILTER (WHERE model_version = 1), min(seq) FILTER (WHERE model_version = 2),
                    count(*) FILTER (WHERE model_version = 2), count(*) FILTER (WHERE model_version NOT IN (1, 2))
             FROM {table} WHERE channel = 'A-1'"
        ))[0];
        let (last_v1, first_v2, v2_rows, others): (i64, i64, i64, i64) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        assert!(
            last_v1 < first_v2 && v2_rows > 0 && others == 0,
            "{table}: A-1 switches from version 1 to 2 at one point (last v1 {last_v1}, first v2 {first_v2}, {v2_rows} v2 rows)"
        );
        assert_eq!(
            pg.count(&format!(
                "SELECT count(*) FROM {table} WHERE channel <> 'A-1' AND model_version <> 1"
            )),
            0,
            "{table}: the other channels stay on version 1"
        );
        eprintln!("{table}: A-1 version 1 up to seq {last_v1}, version 2 from seq {first_v2} ({v2_rows} rows)");
    }
    assert!(log.contains("model load refused"), "refusals are logged");
    assert!(!log.contains(TOKEN), "the token never reaches the log");
}

#[test]
fn poll_mode_picks_up_a_new_version_directory() {
    let broker = Broker::start();
    let pg = Postgres::start();
    let dir = tempfile::tempdir().unwrap();
    let (repo, pipeline) = repository_copy(dir.path(), "poll");
    satwatch(
        &[
            "topics",
            "--pipeline",
            pipeline.to_str().unwrap(),
            "--partitions",
            "1",
        ],
        &broker,
    );
    let service = Satwatch::start_with(&broker, &pg.url(), &pipeline, dir.path(), &[]);
    assert_eq!(served_version(&service, "smap_T-1"), "1");
    assert_eq!(
        load(&service, "smap_T-1", Some(TOKEN)).0,
        400,
        "explicit loads are refused in poll mode"
    );
    let model = repo.join("smap_T-1");
    copy_dir(&model.join("1"), &model.join("7"));
    wait_for(
        "poll mode to serve version 7",
        Duration::from_secs(30),
        || (served_version(&service, "smap_T-1") == "7").then_some(()),
    );
    // A broken newer version is refused by the poller too; 7 keeps serving.
    std::fs::create_dir(model.join("8")).unwrap();
    std::fs::write(model.join("8/model.onnx"), b"").unwrap();
    wait_for(
        "the poller to refuse version 8",
        Duration::from_secs(30),
        || {
            service
                .log_text()
                .contains("model load refused")
                .then_some(())
        },
    );
    assert_eq!(served_version(&service, "smap_T-1"), "7");
    assert!(service.terminate(Duration::from_secs(30)).success());
}

#[test]
fn a_model_name_that_is_a_path_is_answered_as_any_unknown_model() {
    let broker = Broker::start();
    let pg = Postgres::start();
    let dir = tempfile::tempdir().unwrap();
    let (repo, pipeline) = repository_copy(dir.path(), "explicit");
    // A model directory beside the repository, and one inside it that no
    // channel uses: unload answers 200 for the second, as Triton does.
    copy_dir(&repo.join("smap_A-1"), &dir.path().join("outside"));
    copy_dir(&repo.join("smap_A-1"), &repo.join("spare"));
    satwatch(
        &["topics", "--pipeline", pipeline.to_str().unwrap()],
        &broker,
    );
    let service = Satwatch::start_with(
        &broker,
        &pg.url(),
        &pipeline,
        dir.path(),
        &[("SATWATCH_REPOSITORY_TOKEN", TOKEN)],
    );
    let post = |path: String| {
        let (status, body) =
            http_post(&service.http, &path, Some(TOKEN)).expect("satwatch answers");
        // 200 has no body; every refusal a JSON one.
        let body: serde_json::Value = if body.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_str(&body)
                .unwrap_or_else(|e| panic!("{path}: a JSON body ({e}): {body}"))
        };
        (status, body)
    };
    assert_eq!(
        post("/v2/repository/models/spare/unload".into()).0,
        200,
        "a model in the repository that is not served"
    );
    let outside = dir.path().join("outside");
    let outside = outside.to_str().unwrap();
    let names = [
        ("no_such_model".to_owned(), "no_such_model".to_owned()),
        ("..%2Foutside".to_owned(), "../outside".to_owned()),
        ("%2E%2E%2Foutside".to_owned(), "../outside".to_owned()),
        (
            "spare%2F..%2F..%2Foutside".to_owned(),
            "spare/../../outside".to_owned(),
        ),
        (outside.replace('/', "%2F"), outside.to_owned()),
    ];
    let unknown_load = post("/v2/repository/models/no_such_model/load".into());
    for (encoded, name) in &names {
        let (status, body) = post(format!("/v2/repository/models/{encoded}/unload"));
        assert_eq!(
            (status, body),
            (
                404,
                serde_json::json!({ "error": format!("unknown model '{name}'") })
            ),
            "unload {name}"
        );
        let (status, body) = post(format!("/v2/repository/models/{encoded}/load"));
        let expected = unknown_load.1["error"]
            .as_str()
            .unwrap()
            .replace("no_such_model", name);
        assert_eq!(
            (status, body),
            (unknown_load.0, serde_json::json!({ "error": expected })),
            "load {name}"
        );
    }
    assert_eq!(unknown_load.0, 404);
    assert!(service.terminate(Duration::from_secs(30)).success());
}
