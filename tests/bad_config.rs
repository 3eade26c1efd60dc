//! A pipeline file or `config.pbtxt` with an error is refused at start with
//! the file, the place and the reason, on one line, before anything connects.

mod common;

use std::{path::Path, process::Command};

use common::{repo_root, satwatch_bin};

/// Runs `satwatch run` on `pipeline` with nothing listening anywhere.
fn run(pipeline: &Path) -> (bool, String) {
    let output = Command::new(satwatch_bin())
        .args(["run", "--pipeline"])
        .arg(pipeline)
        .env("SATWATCH_BROKERS", "127.0.0.1:1")
        .env("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none")
        .env("SATWATCH_HTTP_ADDR", "127.0.0.1:0")
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn smap_pipeline_text() -> String {
    std::fs::read_to_string(repo_root().join("pipelines/smap.toml")).unwrap()
}

fn refusal_line(stderr: &str) -> &str {
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("satwatch: "))
        .collect();
    assert_eq!(lines.len(), 1, "one line says why: {stderr}");
    lines[0]
}

#[test]
fn a_pipeline_file_error_names_file_line_and_reason() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    let text = smap_pipeline_text().replace("[detect]\n", "[detect]\nmin_event_gapp = 3\n");
    std::fs::write(&path, &text).unwrap();
    let line = text
        .lines()
        .position(|l| l.starts_with("min_event_gapp"))
        .unwrap()
        + 1;
    let (ok, stderr) = run(&path);
    assert!(!ok);
    let refusal = refusal_line(&stderr);
    assert!(refusal.contains(&format!("bad.toml:{line}:")), "{refusal}");
    assert!(refusal.contains("min_event_gapp"), "{refusal}");
}

/// A `[detect]` key from before each part had its own table names where it
/// lives now.
#[test]
fn a_detect_key_that_moved_names_its_new_place() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.toml");
    let text = smap_pipeline_text().replace("[detect]\n", "[detect]\nburst_window = 10\n");
    std::fs::write(&path, &text).unwrap();
    let (ok, stderr) = run(&path);
    assert!(!ok);
    let refusal = refusal_line(&stderr);
    assert!(
        refusal.contains("detect.burst_window is now detect.burst.window"),
        "{refusal}"
    );
}

#[test]
fn a_model_config_error_names_file_line_and_reason() {
    let dir = tempfile::tempdir().unwrap();
    let repository = dir.path().join("model_repository");
    for entry in std::fs::read_dir(repo_root().join("model_repository")).unwrap() {
        let model = entry.unwrap().path();
        let target = repository.join(model.file_name().unwrap()).join("1");
        std::fs::create_dir_all(&target).unwrap();
        std::fs::copy(
            model.join("config.pbtxt"),
            target.parent().unwrap().join("config.pbtxt"),
        )
        .unwrap();
        std::fs::copy(model.join("1/model.onnx"), target.join("model.onnx")).unwrap();
    }
    let config = repository.join("smap_E-3/config.pbtxt");
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "max_batch_size: 512",
        "max_batch_size: 512\nmax_batch_sise: 7",
    );
    std::fs::write(&config, &text).unwrap();
    let line = text
        .lines()
        .position(|l| l.starts_with("max_batch_sise"))
        .unwrap()
        + 1;
    let pipeline = dir.path().join("pipeline.toml");
    std::fs::write(
        &pipeline,
        smap_pipeline_text().replace(
            "path = \"../model_repository\"",
            "path = \"model_repository\"",
        ),
    )
    .unwrap();

    let (ok, stderr) = run(&pipeline);
    assert!(!ok);
    let refusal = refusal_line(&stderr);
    assert!(
        refusal.contains(&format!("smap_E-3/config.pbtxt:{line}:")),
        "{refusal}"
    );
    assert!(refusal.contains("max_batch_sise"), "{refusal}");
}

#[test]
fn a_missing_onnx_runtime_library_is_one_line_saying_what_to_install() {
    let output = Command::new(satwatch_bin())
        .args(["run", "--pipeline", "pipelines/smap.toml"])
        .current_dir(repo_root())
        .env("ORT_DYLIB_PATH", "/nonexistent/libonnxruntime.so")
        .env("SATWATCH_BROKERS", "127.0.0.1:1")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    let refusal = refusal_line(&stderr);
    assert!(
        refusal.contains("pip install onnxruntime==1.31.1"),
        "{refusal}"
    );
}
