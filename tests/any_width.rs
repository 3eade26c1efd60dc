//! Telemetry of any width: a channel with 1 telemetry value and 54 command
//! columns (width 55, as other missions have) is trained with
//! `training/train.py`, evaluated, replayed and served with no code change;
//! data or samples of another width than the channel's model are refused,
//! naming the channel and both widths.
//!
//! The data is synthetic, written here: a noisy sine with sparse 0/1 command
//! flags, and one labelled level shift in the test split.

mod common;

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use common::*;
use ndarray::Array2;
use serde_json::Value;

/// Values per row of the synthetic channel: 1 telemetry value + 54 commands.
const WIDTH: usize = 55;
const ROWS: usize = 1200;
/// The labelled anomaly in the test split, `[start, end)`.
const ANOMALY: (usize, usize) = (900, 940);
/// Small training settings: a model in a few seconds.
const TRAIN_ARGS: [&str; 8] = [
    "--window",
    "32",
    "--hidden",
    "8",
    "--epochs",
    "5",
    "--patience",
    "5",
];

/// training/train.py's interpreter: `SATWATCH_TRAIN_PYTHON`, else the venv
/// scripts/setup.sh makes (`TRAIN_VENV` in scripts/lib.sh).
fn train_python() -> PathBuf {
    let python = std::env::var("SATWATCH_TRAIN_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            let cache = std::env::var("SATWATCH_CACHE")
                .map(PathBuf::from)
                .unwrap_or_else(|_| {
                    PathBuf::from(std::env::var("HOME").expect("HOME is set"))
                        .join(".cache/satwatch")
                });
            cache.join("train-venv/bin/python")
        });
    assert!(
        python.is_file(),
        "no training interpreter at {}: run scripts/setup.sh (or set SATWATCH_TRAIN_PYTHON)",
        python.display()
    );
    python
}

fn train(data: &Path, out: &Path, extra: &[&str]) -> Output {
    Command::new(train_python())
        .arg("training/train.py")
        .arg("--data")
        .arg(data)
        .arg("--out")
        .arg(out)
        .args(TRAIN_ARGS)
        .args(extra)
        .current_dir(repo_root())
        .output()
        .expect("the training interpreter runs")
}

/// A deterministic stream of numbers in [0, 1) (xorshift64).
struct Noise(u64);

impl Noise {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// `rows` rows of `width` values: column 0 a sine of period 50 plus noise
/// (shifted up by 3 over `anomaly`), the others command flags, 2 % of them on.
fn channel_rows(
    rows: usize,
    width: usize,
    seed: u64,
    anomaly: Option<(usize, usize)>,
) -> Array2<f32> {
    let mut noise = Noise(seed);
    Array2::from_shape_fn((rows, width), |(r, c)| {
        if c == 0 {
            let shift = match anomaly {
                Some((start, end)) if (start..end).contains(&r) => 3.0,
                _ => 0.0,
            };
            (r as f32 * std::f32::consts::TAU / 50.0).sin() + 0.1 * (noise.next() - 0.5) + shift
        } else {
            f32::from(noise.next() < 0.02)
        }
    })
}

/// Writes `<data>/{train,test}/<channel>.npy` (test width `test_width`) and
/// a labels file with the test split's one anomaly.
fn write_channel(data: &Path, channel: &str, width: usize, test_width: usize) {
    for split in ["train", "test"] {
        std::fs::create_dir_all(data.join(split)).unwrap();
    }
    let train = channel_rows(ROWS, width, 1, None);
    let test = channel_rows(ROWS, test_width, 2, Some(ANOMALY));
    ndarray_npy::write_npy(data.join(format!("train/{channel}.npy")), &train).unwrap();
    ndarray_npy::write_npy(data.join(format!("test/{channel}.npy")), &test).unwrap();
    std::fs::write(
        data.join("labeled_anomalies.csv"),
        format!(
            "chan_id,spacecraft,anomaly_sequences,class,num_values\n\
             {channel},SYNTH,\"[[{}, {}]]\",[contextual],{ROWS}\n",
            ANOMALY.0, ANOMALY.1
        ),
    )
    .unwrap();
}

/// The SMAP pipeline serving only `channel` from `repository`, its
/// subsystem `eps`.
fn pipeline_for(dir: &Path, channel: &str, repository: &Path) -> PathBuf {
    let prefix = channel.split('-').next().unwrap().to_owned();
    pipeline_variant(dir, &format!("{channel}.toml"), |t| {
        set(t, "repository", "path", repository.display().to_string());
        set(t, "channels", "ids", vec![channel.to_owned()]);
        set(t, "subsystems", &prefix, "eps");
    })
}

/// Runs satwatch with `args` from the repository root; the brokers set to a
/// port nothing listens on, for commands that must fail before publishing.
fn satwatch_offline(args: &[&str]) -> Output {
    Command::new(satwatch_bin())
        .args(args)
        .current_dir(repo_root())
        .env("SATWATCH_BROKERS", format!("127.0.0.1:{}", free_port()))
        .output()
        .expect("satwatch runs")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn a_width_55_channel_trains_evaluates_replays_and_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let (data, repository) = (dir.path().join("data"), dir.path().join("repository"));
    write_channel(&data, "M-1", WIDTH, WIDTH);

    let trained = train(&data, &repository, &[]);
    assert!(
        trained.status.success(),
        "train.py on width-55 data: {}{}",
        String::from_utf8_lossy(&trained.stdout),
        stderr(&trained)
    );
    let spec = satwatch::repository::load_model(&repository.join("smap_M-1")).unwrap();
    assert_eq!(
        (spec.window, spec.features),
        (32, WIDTH),
        "the model's config.pbtxt takes windows of the data's width"
    );

    let pipeline = pipeline_for(dir.path(), "M-1", &repository);
    let pipeline = pipeline.to_str().unwrap();
    let data_arg = data.to_str().unwrap();
    let eval = satwatch_offline(&["eval", "--pipeline", pipeline, "--data", data_arg, "--json"]);
    assert!(eval.status.success(), "eval: {}", stderr(&eval));
    let figures: Value = serde_json::from_slice(&eval.stdout).expect("--json prints JSON");
    let channel = &figures["channels"][0];
    assert_eq!(channel["channel"], "M-1");
    assert_eq!(
        channel["rows"].as_u64(),
        Some(ROWS as u64),
        "every test row was evaluated: {channel}"
    );

    // Served: replayed through Kafka, scored by `satwatch run`; a sample of
    // the SMAP width is dead-lettered as wrong_arity.
    let broker = Broker::start();
    let pg = Postgres::start();
    satwatch(
        &["topics", "--pipeline", pipeline, "--partitions", "1"],
        &broker,
    );
    let service = Satwatch::start_with(&broker, &pg.url(), Path::new(pipeline), dir.path(), &[]);
    let replayed = 300;
    satwatch(
        &[
            "replay",
            "--pipeline",
            pipeline,
            "--data",
            data_arg,
            "--max-rate",
            "--limit",
            "300",
        ],
        &broker,
    );
    let narrow = format!(
        r#"{{"channel":"M-1","seq":{replayed},"values":[{}]}}"#,
        vec!["0.5"; 25].join(",")
    );
    produce(&broker, "telemetry.eps", b"M-1", narrow.as_bytes());

    let telemetry = read_topic(&broker, "telemetry.eps");
    let widths: Vec<usize> = telemetry
        .iter()
        .take(replayed)
        .map(|r| {
            let sample: Value = serde_json::from_slice(r.payload.as_deref().unwrap()).unwrap();
            sample["values"].as_array().unwrap().len()
        })
        .collect();
    assert_eq!(widths, vec![WIDTH; replayed], "replay publishes whole rows");

    let last = replayed as i64 - 1;
    wait_for(
        "the last replayed sample to be scored",
        Duration::from_secs(60),
        || {
            (pg.count(&format!(
                "SELECT count(*) FROM scores WHERE channel = 'M-1' AND seq = {last}"
            )) == 1)
                .then_some(())
        },
    );
    let window = spec.window as i64;
    assert_eq!(
        pg.count("SELECT count(*) FROM scores WHERE channel = 'M-1'"),
        replayed as i64 - window,
        "one score for every sample after the first full window"
    );
    let dead = wait_for(
        "the narrow sample's dead letter",
        Duration::from_secs(30),
        || Some(read_topic(&broker, "telemetry.dlq")).filter(|d| !d.is_empty()),
    );
    let header = |name: &str| {
        dead[0]
            .headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    assert_eq!(header("satwatch-error"), "wrong_arity");
    assert_eq!(
        header("satwatch-detail"),
        "channel \"M-1\" takes 55 values, the record has 25"
    );
    drop(service);
}

#[test]
fn a_width_25_model_refuses_width_55_data_in_eval_and_replay() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write_channel(&data, "A-1", WIDTH, WIDTH);
    let pipeline = pipeline_for(dir.path(), "A-1", &repo_root().join("model_repository"));
    let pipeline = pipeline.to_str().unwrap();
    let data_arg = data.to_str().unwrap();
    let expected = "channel A-1 has 55 values per row, but its model takes 25";
    for args in [
        vec!["eval", "--pipeline", pipeline, "--data", data_arg],
        vec![
            "replay",
            "--pipeline",
            pipeline,
            "--data",
            data_arg,
            "--max-rate",
        ],
    ] {
        let output = satwatch_offline(&args);
        assert!(!output.status.success(), "{} must refuse the data", args[0]);
        let message = stderr(&output);
        assert!(
            message.contains(expected) && message.contains("test/A-1.npy"),
            "{}: {message}",
            args[0]
        );
    }
}

#[test]
fn train_py_refuses_a_test_split_of_another_width_and_an_unexpected_width() {
    let dir = tempfile::tempdir().unwrap();
    let (data, repository) = (dir.path().join("data"), dir.path().join("repository"));
    write_channel(&data, "M-1", WIDTH, 25);

    let split_mismatch = train(&data, &repository, &[]);
    assert!(!split_mismatch.status.success());
    assert!(
        stderr(&split_mismatch)
            .contains("M-1: the test split has 25 values per row, the train split 55"),
        "{}",
        stderr(&split_mismatch)
    );

    std::fs::remove_file(data.join("test/M-1.npy")).unwrap();
    let declared = train(&data, &repository, &["--features", "25"]);
    assert!(!declared.status.success());
    assert!(
        stderr(&declared)
            .contains("M-1: the train split has 55 values per row; --features asks for 25"),
        "{}",
        stderr(&declared)
    );
    assert!(
        !repository.join("smap_M-1").exists(),
        "nothing is written for a refused channel"
    );
}
