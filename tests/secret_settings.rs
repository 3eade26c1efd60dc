//! Settings whose names suggest a secret keep their values out of every
//! message, also when the name is misspelt or the value is refused: by the
//! pipeline file's parser, or by librdkafka when the clients are made.

mod common;

use std::{path::Path, process::Command};

use common::{free_port, pipeline_variant, repo_root, satwatch_bin};

/// `satwatch run` on `pipeline` with nothing reachable: whether it
/// succeeded, and its stderr.
fn run(pipeline: &Path) -> (bool, String) {
    let output = Command::new(satwatch_bin())
        .args(["run", "--pipeline"])
        .arg(pipeline)
        .current_dir(repo_root())
        .env("SATWATCH_BROKERS", format!("127.0.0.1:{}", free_port()))
        .env(
            "DATABASE_URL",
            format!("postgres://u@127.0.0.1:{}/x", free_port()),
        )
        .env("SATWATCH_HTTP_ADDR", "127.0.0.1:0")
        .env("RUST_LOG", "debug")
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The SMAP pipeline with `[kafka.client]` holding `client` (TOML lines).
fn with_client(dir: &Path, name: &str, client: &str) -> std::path::PathBuf {
    let path = pipeline_variant(dir, name, |_| {});
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, format!("{text}\n[kafka.client]\n{client}\n")).unwrap();
    path
}

#[test]
fn a_secret_the_pipeline_file_refuses_is_not_printed() {
    let dir = tempfile::tempdir().unwrap();
    for (client, secret) in [
        // Numbers where librdkafka takes strings: the parser quotes them.
        ("\"ssl.key.password\" = 20261202", "20261202"),
        ("\"sasl.pasword\" = 987654321", "987654321"),
        (
            "\"sasl.password\" = \"hunter2-unterminated",
            "hunter2-unterminated",
        ),
    ] {
        let pipeline = with_client(dir.path(), "refused.toml", client);
        let (ok, stderr) = run(&pipeline);
        assert!(!ok, "{client}: refused");
        assert!(
            stderr.contains("refused.toml"),
            "{client}: says where: {stderr}"
        );
        assert!(!stderr.contains(secret), "{client}: leaked: {stderr}");
    }
}

#[test]
fn a_misspelt_or_invalid_secret_kafka_property_is_not_printed() {
    let dir = tempfile::tempdir().unwrap();
    for (client, secret, named) in [
        ("\"sasl.pasword\" = \"hunter2\"", "hunter2", "sasl.pasword"),
        (
            "\"ssl.key.pasword\" = \"hunter2\"",
            "hunter2",
            "ssl.key.pasword",
        ),
        (
            "\"security.protocol\" = \"sasl_plaintext\"\n\"sasl.mechanism\" = \"HUNTER2\"",
            "HUNTER2",
            "SASL mechanism",
        ),
    ] {
        let pipeline = with_client(dir.path(), "misspelt.toml", client);
        let (ok, stderr) = run(&pipeline);
        assert!(!ok, "{client}: refused");
        assert!(stderr.contains(named), "{client}: names it: {stderr}");
        assert!(!stderr.contains(secret), "{client}: leaked: {stderr}");
    }
}
