//! PostgreSQL over TLS: satwatch verifies the server's certificate against
//! the CA it is given (`PGSSLROOTCERT`) and the URL's host, writes every score
//! over TLS with password authentication, and refuses at start, in one line
//! that names TLS and the certificate and never the password, a server whose
//! certificate it cannot verify or that offers no TLS at all.
//!
//! Certificates are made per test with the `openssl` command.

mod common;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use common::*;

const CHANNELS: &str = "A-1,E-2,T-1";
const ROWS: i64 = 400;
const PASSWORD: &str = "tls-pa55-w0rd";

/// A CA, a server certificate it signed for 127.0.0.1 and localhost, a
/// second server certificate it signed for another name only, and an
/// unrelated CA.
struct Certs {
    dir: tempfile::TempDir,
}

impl Certs {
    fn generate() -> Self {
        let certs = Self {
            dir: tempfile::tempdir().expect("temp dir"),
        };
        certs.ca("ca");
        certs.ca("other-ca");
        certs.server("server", "ca", "IP:127.0.0.1,DNS:localhost");
        certs.server("wrong-name", "ca", "DNS:db.elsewhere.example");
        certs
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn openssl(&self, args: &[&str]) {
        let output = Command::new("openssl")
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .expect("the openssl command runs");
        assert!(
            output.status.success(),
            "openssl {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    fn ca(&self, name: &str) {
        let (key, crt) = (format!("{name}.key"), format!("{name}.crt"));
        let subject = format!("/CN=satwatch test {name}");
        self.openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &crt,
            "-days",
            "2",
            "-subj",
            &subject,
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
    }

    fn server(&self, name: &str, ca: &str, names: &str) {
        let (key, csr, crt, ext) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.crt"),
            format!("{name}.ext"),
        );
        std::fs::write(
            self.path(&ext),
            format!(
                "subjectAltName={names}\nbasicConstraints=CA:FALSE\n\
                 keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
            ),
        )
        .unwrap();
        self.openssl(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            "/CN=satwatch test server",
        ]);
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &format!("{ca}.crt"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-out",
            &crt,
            "-days",
            "2",
            "-extfile",
            &ext,
        ]);
    }
}

/// A server presenting `server` (a name in `certs`), where the role
/// `satwatch` owns the database and may only log in over TLS, with its
/// password. The harness's own queries (user postgres) stay plain.
fn tls_postgres(certs: &Certs, server: &str) -> Postgres {
    let mut pg = Postgres::start();
    pg.query(&format!("CREATE ROLE satwatch LOGIN PASSWORD '{PASSWORD}'"));
    pg.query("ALTER DATABASE satwatch OWNER TO satwatch");
    pg.prepend_hba(
        "hostssl all satwatch 127.0.0.1/32 scram-sha-256\n\
         host all satwatch 127.0.0.1/32 reject",
    );
    pg.use_tls(
        &certs.path(&format!("{server}.crt")),
        &certs.path(&format!("{server}.key")),
    );
    pg
}

fn tls_url(pg: &Postgres, sslmode: &str) -> String {
    format!(
        "postgres://satwatch:{PASSWORD}@127.0.0.1:{}/satwatch?sslmode={sslmode}",
        pg.port
    )
}

/// Runs `satwatch run` where it must stop at start; returns its stderr's last
/// line after checking that it failed and that the password is nowhere.
fn refused(database_url: &str, env: &[(&str, &Path)]) -> String {
    let mut command = Command::new(satwatch_bin());
    command
        .args(["run", "--pipeline", SMAP_PIPELINE])
        .current_dir(repo_root())
        .env("SATWATCH_BROKERS", format!("127.0.0.1:{}", free_port()))
        .env("DATABASE_URL", database_url)
        .env("SATWATCH_HTTP_ADDR", "127.0.0.1:0")
        .env("RUST_LOG", "debug");
    for (key, value) in env {
        command.env(key, value);
    }
    let output = command.output().expect("satwatch runs");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(!output.status.success(), "satwatch must refuse: {stderr}");
    assert!(!stderr.contains(PASSWORD), "the password leaked: {stderr}");
    let last = stderr.lines().rev().find(|l| !l.trim().is_empty());
    let last = last.expect("an error line").to_owned();
    println!("refused: {last}");
    last
}

#[test]
fn scores_are_written_over_verified_tls_with_password_authentication() {
    let certs = Certs::generate();
    let broker = Broker::start();
    let pg = tls_postgres(&certs, "server");
    satwatch(
        &["topics", "--pipeline", SMAP_PIPELINE, "--partitions", "3"],
        &broker,
    );
    let logs = tempfile::tempdir().expect("temp dir");
    let service = Satwatch::start_with(
        &broker,
        &tls_url(&pg, "require"),
        Path::new(SMAP_PIPELINE),
        logs.path(),
        &[("PGSSLROOTCERT", certs.path("ca.crt").to_str().unwrap())],
    );

    replay(&broker, CHANNELS, 0, ROWS);
    wait_for_scores(
        &pg,
        3 * (ROWS - window()),
        "every sample past warm-up to be scored over TLS",
        Duration::from_secs(120),
    );
    // The writer and the readiness probe are connected now: over TLS only
    // (pg_hba.conf rejects the role's plain connections anyway).
    let row = &pg.query(
        "SELECT count(*) FILTER (WHERE s.ssl), count(*) FILTER (WHERE NOT s.ssl)
         FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) WHERE a.usename = 'satwatch'",
    )[0];
    let (tls, plain): (i64, i64) = (row.get(0), row.get(1));
    assert!(
        tls >= 2 && plain == 0,
        "satwatch's connections: {tls} over TLS, {plain} plain"
    );
    let log = service.log_text();
    assert!(!log.contains(PASSWORD), "the password leaked: {log}");
    assert!(service.terminate(Duration::from_secs(30)).success());
    assert_one_score_per_sample(&pg, CHANNELS, ROWS, window());

    // The explicit opt-in: no CA at all, encryption without verification.
    let pipeline = pipeline_variant(logs.path(), "skip-verify.toml", |t| {
        let mut postgres = toml::Table::new();
        postgres.insert("tls_skip_verify".into(), true.into());
        t.insert("postgres".into(), postgres.into());
    });
    let service = Satwatch::start_with(
        &broker,
        &tls_url(&pg, "require"),
        &pipeline,
        logs.path(),
        &[],
    );
    assert!(service.terminate(Duration::from_secs(30)).success());
}

#[test]
fn a_server_certificate_that_cannot_be_verified_is_refused_at_start_in_one_line() {
    let certs = Certs::generate();
    let mut pg = tls_postgres(&certs, "server");
    let url = tls_url(&pg, "require");

    // A CA that did not sign the server's certificate.
    let line = refused(&url, &[("PGSSLROOTCERT", &certs.path("other-ca.crt"))]);
    for needle in ["PostgreSQL", "TLS", "certificate", "other-ca.crt"] {
        assert!(line.contains(needle), "{needle:?} missing from: {line}");
    }

    // No CA: the system trust store, which does not hold the test CA.
    let line = refused(&url, &[]);
    for needle in ["TLS", "certificate", "system trust store"] {
        assert!(line.contains(needle), "{needle:?} missing from: {line}");
    }

    // The default sslmode (prefer) uses TLS when offered, verified the same way.
    let prefer = url.replace("?sslmode=require", "");
    let line = refused(&prefer, &[("PGSSLROOTCERT", &certs.path("other-ca.crt"))]);
    assert!(line.contains("TLS"), "{line}");

    // The right CA, but a certificate issued for another host name.
    pg.use_tls(&certs.path("wrong-name.crt"), &certs.path("wrong-name.key"));
    let line = refused(&url, &[("PGSSLROOTCERT", &certs.path("ca.crt"))]);
    for needle in ["TLS", "certificate", "mismatch"] {
        assert!(line.contains(needle), "{needle:?} missing from: {line}");
    }

    // A server without TLS, when TLS is required.
    let plain = Postgres::start();
    let line = refused(
        &format!(
            "postgres://postgres:{PASSWORD}@127.0.0.1:{}/satwatch?sslmode=require",
            plain.port
        ),
        &[("PGSSLROOTCERT", &certs.path("ca.crt"))],
    );
    assert!(line.contains("does not support TLS"), "{line}");
}
