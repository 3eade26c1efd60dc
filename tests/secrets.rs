//! Secrets given to satwatch (the password in DATABASE_URL, SASL credentials
//! in the pipeline file) never appear in its logs or error messages.

mod common;

use std::process::Command;

use common::{free_port, repo_root, satwatch_bin};

const PASSWORD: &str = "s3cr3t-hunter2";

fn stderr_of(pipeline: &std::path::Path, database_url: &str) -> (bool, String) {
    stderr_with(pipeline, database_url, &[])
}

fn stderr_with(
    pipeline: &std::path::Path,
    database_url: &str,
    env: &[(&str, &str)],
) -> (bool, String) {
    let output = Command::new(satwatch_bin())
        .args(["run", "--pipeline"])
        .arg(pipeline)
        .current_dir(repo_root())
        .env("SATWATCH_BROKERS", format!("127.0.0.1:{}", free_port()))
        .env("DATABASE_URL", database_url)
        .env("SATWATCH_HTTP_ADDR", "127.0.0.1:0")
        .env("RUST_LOG", "debug")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn database_password_is_not_printed_when_postgres_is_unreachable_or_the_url_is_bad() {
    let pipeline = repo_root().join("pipelines/smap.toml");
    let port = free_port();
    for url in [
        format!("postgres://satwatch:{PASSWORD}@127.0.0.1:{port}/satwatch"),
        format!("postgres://satwatch:{PASSWORD}@127.0.0.1:{port}/satwatch?sslmode=bogus"),
        format!("host=127.0.0.1 port={port} user=satwatch password={PASSWORD} dbname=satwatch"),
    ] {
        let (ok, stderr) = stderr_of(&pipeline, &url);
        assert!(!ok, "satwatch cannot start without PostgreSQL");
        assert!(
            stderr.contains("PostgreSQL"),
            "the error says what failed: {stderr}"
        );
        assert!(!stderr.contains(PASSWORD), "the password leaked: {stderr}");
    }
}

/// TLS settings are checked at start, with the URL in hand: a bad CA or
/// client certificate file is reported by its path, never with the URL.
/// (Refusals by a real TLS server are checked in tests/postgres_tls.rs.)
#[test]
fn database_password_is_not_printed_when_the_tls_settings_are_wrong() {
    let pipeline = repo_root().join("pipelines/smap.toml");
    let dir = tempfile::tempdir().unwrap();
    let not_pem = dir.path().join("not-a-certificate.pem");
    std::fs::write(&not_pem, "hello").unwrap();
    let missing = dir.path().join("missing.pem");
    let url = format!(
        "postgres://satwatch:{PASSWORD}@127.0.0.1:{}/satwatch?sslmode=require",
        free_port()
    );
    let (not_pem, missing) = (not_pem.to_str().unwrap(), missing.to_str().unwrap());
    for (env, says) in [
        (vec![("PGSSLROOTCERT", missing)], "cannot read the CA file"),
        (vec![("PGSSLROOTCERT", not_pem)], "CA file"),
        (vec![("PGSSLCERT", not_pem)], "needs both"),
        (
            vec![("PGSSLCERT", not_pem), ("PGSSLKEY", not_pem)],
            "client certificate",
        ),
        // Valid settings, nothing listening: the connection error.
        (vec![], "PostgreSQL"),
    ] {
        let (ok, stderr) = stderr_with(&pipeline, &url, &env);
        assert!(!ok, "satwatch cannot start with {env:?}");
        assert!(
            stderr.contains(says),
            "{env:?}: the error says {says:?}: {stderr}"
        );
        assert!(!stderr.contains(PASSWORD), "the password leaked: {stderr}");
    }
}

#[test]
fn sasl_password_from_the_pipeline_file_is_not_printed() {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(repo_root().join("pipelines/smap.toml")).unwrap().replace(
        "max_record_bytes = 65536",
        &format!(
            "max_record_bytes = 65536\n[kafka.client]\n\"security.protocol\" = \"sasl_plaintext\"\n\
             \"sasl.mechanism\" = \"PLAIN\"\n\"sasl.username\" = \"satwatch\"\n\"sasl.password\" = \"{PASSWORD}\""
        ),
    );
    let pipeline = dir.path().join("sasl.toml");
    std::fs::write(
        &pipeline,
        text.replace(
            "path = \"../model_repository\"",
            &format!(
                "path = \"{}\"",
                repo_root().join("model_repository").display()
            ),
        ),
    )
    .unwrap();
    // PostgreSQL is unreachable too, so the run stops early; Kafka clients
    // are created first and may log about the broker before that.
    let (_, stderr) = stderr_of(
        &pipeline,
        &format!("postgres://u:{PASSWORD}@127.0.0.1:{}/x", free_port()),
    );
    assert!(!stderr.contains(PASSWORD), "the password leaked: {stderr}");
}
