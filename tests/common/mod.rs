//! Real services for integration tests: Apache Kafka ([`kafka`]) and a
//! PostgreSQL server on free loopback ports, the satwatch binary as a child
//! process, and helpers that wait on conditions with deadlines.
//!
//! Each test gets its own broker and database, so tests run in parallel and
//! faults injected in one (stopping PostgreSQL, killing satwatch) stay there.

#![allow(dead_code)] // Each test binary uses a different part of the harness.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

mod kafka;
pub use kafka::*;

pub const SMAP_PIPELINE: &str = "pipelines/smap.toml";

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The shipped models' window (`satwatch.window`, the same for all of them): a
/// channel's first `window()` samples only fill it, and its first score is at
/// that seq.
pub fn window() -> i64 {
    let model = repo_root().join("model_repository/smap_A-1");
    let spec = satwatch::repository::load_model(&model).expect("the shipped A-1 model loads");
    spec.window as i64
}

pub fn satwatch_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_satwatch"))
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("loopback has free ports")
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `check` until it returns `Some`, failing the test with `what` at the deadline.
pub fn wait_for<T>(what: &str, deadline: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + deadline;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            Instant::now() < end,
            "timed out after {deadline:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn cache_dir() -> PathBuf {
    std::env::var("SATWATCH_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").expect("HOME is set")).join(".cache/satwatch")
        })
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n"))
        .unwrap_or(false)
}

/// A throwaway PostgreSQL 15 server with a `satwatch` database.
pub struct Postgres {
    pub port: u16,
    data: PathBuf,
    bin: PathBuf,
    _dir: tempfile::TempDir,
    running: bool,
    /// Server settings added to the command line (TLS), empty by default.
    extra_options: String,
}

impl Postgres {
    pub fn start() -> Self {
        let bin = std::env::var("SATWATCH_PG_BINDIR")
            .map(PathBuf::from)
            .unwrap_or_else(|_| PathBuf::from("/usr/lib/postgresql/15/bin"));
        assert!(
            bin.join("initdb").is_file(),
            "PostgreSQL not found in {}: run scripts/setup.sh",
            bin.display()
        );
        let dir = tempfile::tempdir().expect("temp dir");
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        if is_root() {
            // initdb refuses root; the server runs as postgres and must own its files.
            for path in [dir.path(), data.as_path()] {
                let ok = Command::new("chown")
                    .args(["postgres:postgres"])
                    .arg(path)
                    .status()
                    .unwrap()
                    .success();
                assert!(ok, "chown {} to postgres", path.display());
            }
        }
        let mut pg = Self {
            port: free_port(),
            data,
            bin,
            _dir: dir,
            running: false,
            extra_options: String::new(),
        };
        let status = pg
            .as_postgres(&pg.bin.join("initdb"))
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "-D"])
            .arg(&pg.data)
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "initdb failed");
        pg.resume();
        let status = Command::new(pg.bin.join("createdb"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &pg.port.to_string(),
                "-U",
                "postgres",
                "satwatch",
            ])
            .status()
            .unwrap();
        assert!(status.success(), "createdb failed");
        pg
    }

    fn as_postgres(&self, program: &Path) -> Command {
        if is_root() {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(program);
            command
        } else {
            Command::new(program)
        }
    }

    pub fn url(&self) -> String {
        self.url_of("satwatch")
    }

    pub fn url_of(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// Creates another database on this server; returns its URL.
    pub fn create_database(&self, name: &str) -> String {
        self.query(&format!("CREATE DATABASE \"{name}\""));
        self.url_of(name)
    }

    pub fn resume(&mut self) {
        let options = format!(
            "-c listen_addresses=127.0.0.1 -p {} -k {} -c fsync=off{}",
            self.port,
            self.data.display(),
            self.extra_options
        );
        let status = self
            .as_postgres(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(&self.data)
            .args(["-l"])
            .arg(self.data.join("server.log"))
            .args(["-w", "-o", &options, "start"])
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "pg_ctl start failed");
        self.running = true;
    }

    pub fn stop(&mut self) {
        if self.running {
            let _ = self
                .as_postgres(&self.bin.join("pg_ctl"))
                .arg("-D")
                .arg(&self.data)
                .args(["-m", "fast", "-w", "stop"])
                .stdout(Stdio::null())
                .status();
            self.running = false;
        }
    }

    /// [`Postgres::start`], then [`Postgres::use_tls`] with this certificate.
    pub fn start_with_tls(cert: &Path, key: &Path) -> Self {
        let mut pg = Self::start();
        pg.use_tls(cert, key);
        pg
    }

    /// Restarts the server with `ssl = on`, presenting `cert` (PEM, the
    /// chain) with `key`. Copies both into the data directory, owned by the
    /// server's user with mode 0600 as PostgreSQL demands of the key.
    /// Plain connections are still accepted unless pg_hba.conf says otherwise.
    pub fn use_tls(&mut self, cert: &Path, key: &Path) {
        use std::os::unix::fs::PermissionsExt;
        self.stop();
        for (from, name) in [(cert, "server.crt"), (key, "server.key")] {
            let to = self.data.join(name);
            std::fs::copy(from, &to).unwrap();
            std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o600)).unwrap();
            if is_root() {
                let ok = Command::new("chown")
                    .args(["postgres:postgres"])
                    .arg(&to)
                    .status()
                    .unwrap()
                    .success();
                assert!(ok, "chown {} to postgres", to.display());
            }
        }
        self.extra_options = format!(
            " -c ssl=on -c ssl_cert_file={} -c ssl_key_file={}",
            self.data.join("server.crt").display(),
            self.data.join("server.key").display()
        );
        self.resume();
    }

    /// Puts `lines` ahead of pg_hba.conf's rules (the first matching rule
    /// wins) and reloads the server's configuration.
    pub fn prepend_hba(&self, lines: &str) {
        let path = self.data.join("pg_hba.conf");
        let old = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, format!("{lines}\n{old}")).unwrap();
        if self.running {
            let status = self
                .as_postgres(&self.bin.join("pg_ctl"))
                .arg("-D")
                .arg(&self.data)
                .arg("reload")
                .stdout(Stdio::null())
                .status()
                .unwrap();
            assert!(status.success(), "pg_ctl reload failed");
        }
    }

    /// A synchronous query helper: runs `sql` through tokio-postgres on a
    /// throwaway runtime and returns the rows.
    pub fn query(&self, sql: &str) -> Vec<tokio_postgres::Row> {
        self.query_in("satwatch", sql)
    }

    /// [`Postgres::query`] in another database of this server.
    pub fn query_in(&self, database: &str, sql: &str) -> Vec<tokio_postgres::Row> {
        let url = self.url_of(database);
        let sql = sql.to_owned();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let (client, connection) =
                    tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
                tokio::spawn(connection);
                client.query(&sql, &[]).await
            })
        })
        .join()
        .unwrap()
        .unwrap_or_else(|err| panic!("query failed: {err:?}"))
    }

    pub fn count(&self, sql: &str) -> i64 {
        self.query(sql)[0].get(0)
    }

    pub fn count_in(&self, database: &str, sql: &str) -> i64 {
        self.query_in(database, sql)[0].get(0)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A `satwatch run` child process.
pub struct Satwatch {
    child: Child,
    pub http: String,
    pub log: PathBuf,
}

impl Satwatch {
    /// Starts `satwatch run` on the SMAP pipeline pointed at `broker` and `pg`,
    /// and waits until it reports ready.
    pub fn start(
        broker: &Broker,
        pg: &Postgres,
        log_dir: &Path,
        extra_env: &[(&str, &str)],
    ) -> Self {
        Self::start_with(
            broker,
            &pg.url(),
            Path::new(SMAP_PIPELINE),
            log_dir,
            extra_env,
        )
    }

    /// [`Satwatch::start`] with another pipeline file and database.
    pub fn start_with(
        broker: &Broker,
        database_url: &str,
        pipeline: &Path,
        log_dir: &Path,
        extra_env: &[(&str, &str)],
    ) -> Self {
        let http = format!("127.0.0.1:{}", free_port());
        let log = log_dir.join(format!("satwatch-{}.log", free_port()));
        let file = std::fs::File::create(&log).unwrap();
        let mut command = Command::new(satwatch_bin());
        command
            .arg("run")
            .arg("--pipeline")
            .arg(pipeline)
            .current_dir(repo_root())
            .env("SATWATCH_BROKERS", broker.addr())
            .env("DATABASE_URL", database_url)
            .env("SATWATCH_HTTP_ADDR", &http)
            .stdout(file.try_clone().unwrap())
            .stderr(file);
        for (key, value) in extra_env {
            command.env(key, value);
        }
        let child = command.spawn().expect("satwatch starts");
        let mut satwatch = Self { child, http, log };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = satwatch.child.try_wait() {
                panic!(
                    "satwatch exited early with {status}: {}",
                    satwatch.log_text()
                );
            }
            let ready = satwatch.get("/v2/health/ready");
            if ready.as_ref().is_some_and(|(status, _)| *status == 200) {
                break;
            }
            if Instant::now() > deadline {
                let log = satwatch.log_text();
                let tail: Vec<&str> = log.lines().rev().take(30).collect();
                panic!(
                    "satwatch not ready after 60 s: {ready:?}; the end of its log:\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        satwatch
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A plain HTTP/1.1 GET; `None` if nothing answers.
    pub fn get(&self, path: &str) -> Option<(u16, String)> {
        http_get(&self.http, path)
    }

    /// SIGTERM, then wait for the exit status.
    pub fn terminate(mut self, deadline: Duration) -> ExitStatus {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        let status = wait_for("satwatch to exit after SIGTERM", deadline, || {
            self.child.try_wait().unwrap()
        });
        if !status.success() {
            let log = self.log_text();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!(
                "satwatch exited with {status}; the end of its log:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        std::mem::forget(self); // Already exited; nothing to kill on drop.
        status
    }

    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::mem::forget(self);
    }
}

impl Drop for Satwatch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    http_request(addr, "GET", path, "", Duration::from_secs(5))
}

/// A plain HTTP/1.1 POST with an empty body and, when given, a bearer token.
pub fn http_post(addr: &str, path: &str, token: Option<&str>) -> Option<(u16, String)> {
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\nContent-Length: 0\r\n"))
        .unwrap_or_else(|| "Content-Length: 0\r\n".into());
    http_request(addr, "POST", path, &auth, Duration::from_secs(30))
}

/// One request with no body (`headers` are whole `Name: value\r\n` lines);
/// the status and body, or `None` if nothing answers in `timeout`.
fn http_request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &str,
    timeout: Duration,
) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(timeout)).ok()?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{headers}Connection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Some((status, body))
}

/// Copies a directory tree (a model repository, for tests that change it).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// Runs a satwatch subcommand to completion, asserting success; returns stdout.
pub fn satwatch(args: &[&str], broker: &Broker) -> String {
    satwatch_with_brokers(args, &broker.addr())
}

/// Runs a satwatch subcommand against the brokers at `brokers`, asserting success; returns stdout.
pub fn satwatch_with_brokers(args: &[&str], brokers: &str) -> String {
    let output = Command::new(satwatch_bin())
        .args(args)
        .current_dir(repo_root())
        .env("SATWATCH_BROKERS", brokers)
        .output()
        .expect("satwatch runs");
    assert!(
        output.status.success(),
        "satwatch {args:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Writes a copy of the SMAP pipeline into `dir` as `name`, changed by
/// `edit` (the model repository path made absolute so the copy works from
/// anywhere); returns its path.
pub fn pipeline_variant(dir: &Path, name: &str, edit: impl FnOnce(&mut toml::Table)) -> PathBuf {
    let text = std::fs::read_to_string(repo_root().join(SMAP_PIPELINE)).unwrap();
    let mut table: toml::Table = text.parse().unwrap();
    table["repository"]["path"] =
        toml::Value::String(repo_root().join("model_repository").display().to_string());
    edit(&mut table);
    let path = dir.join(name);
    std::fs::write(&path, toml::to_string(&table).unwrap()).unwrap();
    path
}

/// Sets `[section] key = value` in a pipeline table.
pub fn set(table: &mut toml::Table, section: &str, key: &str, value: impl Into<toml::Value>) {
    table
        .entry(section)
        .or_insert_with(|| toml::Value::Table(Default::default()))
        .as_table_mut()
        .unwrap()
        .insert(key.to_owned(), value.into());
}

/// What most integration tests start with: a broker with satwatch's topics
/// (`partitions` each), a database, and `satwatch run` on them, ready.
pub struct Stack {
    pub broker: Broker,
    pub pg: Postgres,
    pub service: Satwatch,
    /// Holds satwatch's log file for the test's lifetime.
    pub logs: tempfile::TempDir,
}

impl Stack {
    pub fn start(partitions: u32) -> Self {
        let broker = Broker::start();
        let pg = Postgres::start();
        let logs = tempfile::tempdir().expect("temp dir");
        let partitions = partitions.to_string();
        satwatch(
            &[
                "topics",
                "--pipeline",
                SMAP_PIPELINE,
                "--partitions",
                &partitions,
            ],
            &broker,
        );
        let service = Satwatch::start(&broker, &pg, logs.path(), &[]);
        Self {
            broker,
            pg,
            service,
            logs,
        }
    }
}

/// Each of `channels` (comma-separated) holds exactly one `scores` row for
/// every seq from `window` to `rows - 1`, and no other.
pub fn assert_one_score_per_sample(pg: &Postgres, channels: &str, rows: i64, window: i64) {
    assert_one_score_per_seq(pg, channels, window, rows - 1);
}

/// Each of `channels` holds exactly one `scores` row for every seq from
/// `first` to `last`, and no other.
fn assert_one_score_per_seq(pg: &Postgres, channels: &str, first: i64, last: i64) {
    for channel in channels.split(',') {
        let row = &pg.query(&format!(
            "SELECT count(*), count(DISTINCT seq), min(seq), max(seq) FROM scores WHERE channel = '{channel}'"
        ))[0];
        let got: (i64, i64, i64, i64) = (row.get(0), row.get(1), row.get(2), row.get(3));
        let n = last - first + 1;
        assert_eq!(
            got,
            (n, n, first, last),
            "{channel}: one row per sample past warm-up, no gap"
        );
    }
}

/// Replays rows `start..start + limit` of each of `channels` (comma-separated)
/// from the SMAP test split, as fast as the broker takes them.
pub fn replay(broker: &Broker, channels: &str, start: i64, limit: i64) -> String {
    replay_paced(&broker.addr(), channels, start, limit, None)
}

/// The same against the brokers at `brokers`, at `rate` samples/s when given.
pub fn replay_paced(
    brokers: &str,
    channels: &str,
    start: i64,
    limit: i64,
    rate: Option<u32>,
) -> String {
    let (start, limit) = (start.to_string(), limit.to_string());
    let rate = rate.map(|r| r.to_string());
    let mut args = vec![
        "replay",
        "--pipeline",
        SMAP_PIPELINE,
        "--data",
        "data/smap",
        "--channels",
        channels,
        "--start",
        &start,
        "--limit",
        &limit,
    ];
    match &rate {
        Some(rate) => args.extend(["--rate", rate.as_str()]),
        None => args.push("--max-rate"),
    }
    satwatch_with_brokers(&args, brokers)
}

/// Waits until `scores` holds exactly `expected` rows.
pub fn wait_for_scores(pg: &Postgres, expected: i64, what: &str, deadline: Duration) {
    let started = Instant::now();
    while pg.count("SELECT count(*) FROM scores") != expected {
        if started.elapsed() > deadline {
            panic!(
                "timed out after {deadline:?} waiting for {what}: {} of {expected} scores rows\n{}",
                pg.count("SELECT count(*) FROM scores"),
                describe_scores(pg, "satwatch")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

// ---- Comparing a disturbed run with an undisturbed reference ----
//
// Both consume the same records at the same time, each with its own consumer
// group, database and output topics, so their outputs must agree exactly
// (within float tolerance where batches of different sizes ran the models).

/// A pipeline for group `group` writing to `<prefix>anomalies` and
/// `<prefix>forecasts`. A short session timeout lets a killed member's
/// partitions go to its successor in seconds rather than the default ten.
pub fn group_pipeline(
    dir: &Path,
    group: &str,
    prefix: &str,
    session_timeout_ms: u32,
) -> std::path::PathBuf {
    pipeline_variant(dir, &format!("{group}.toml"), |t| {
        set(t, "kafka", "group_id", group);
        set(t, "kafka", "anomalies_topic", format!("{prefix}anomalies"));
        set(t, "kafka", "forecasts_topic", format!("{prefix}forecasts"));
        set(t, "kafka", "dlq_topic", format!("{prefix}telemetry.dlq"));
        let mut client = toml::Table::new();
        client.insert(
            "session.timeout.ms".into(),
            session_timeout_ms.to_string().into(),
        );
        client.insert(
            "heartbeat.interval.ms".into(),
            (session_timeout_ms / 5).to_string().into(),
        );
        set(t, "kafka", "client", client);
    })
}

pub type ScoreRow = (String, i64, String, f32, f32, bool, i32);

pub fn scores(pg: &Postgres, db: &str) -> BTreeMap<(String, i64), ScoreRow> {
    pg.query_in(
        db,
        "SELECT channel, seq, ts::text, score, threshold, anomalous, model_version FROM scores",
    )
    .iter()
    .map(|r| {
        let row: ScoreRow = (
            r.get(0),
            r.get(1),
            r.get(2),
            r.get(3),
            r.get(4),
            r.get(5),
            r.get(6),
        );
        ((row.0.clone(), row.1), row)
    })
    .collect()
}

pub fn forecasts(pg: &Postgres, db: &str) -> BTreeMap<(String, i64), Vec<f32>> {
    pg.query_in(db, "SELECT channel, seq, horizon FROM forecasts")
        .iter()
        .map(|r| ((r.get(0), r.get(1)), r.get(2)))
        .collect()
}

/// Event rows without `updated_at` (wall-clock time of the write).
pub fn events(pg: &Postgres, db: &str) -> Vec<String> {
    pg.query_in(
        db,
        "SELECT concat_ws('|', event_id, channel, subsystem, state, start_seq, end_seq, start_ts,
                end_ts, peak_score, threshold, model, model_version)
         FROM anomaly_events ORDER BY event_id",
    )
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// Every payload published on `topic`, in topic order, by the key `key`
/// draws from each record's JSON.
fn published_by<K: Ord>(
    broker: &Broker,
    topic: &str,
    key: impl Fn(&serde_json::Value) -> K,
) -> BTreeMap<K, Vec<String>> {
    let mut published: BTreeMap<K, Vec<String>> = BTreeMap::new();
    for record in read_topic(broker, topic) {
        let payload = record.payload.expect("output records have payloads");
        let v: serde_json::Value = serde_json::from_slice(&payload).unwrap();
        published
            .entry(key(&v))
            .or_default()
            .push(String::from_utf8(payload).unwrap());
    }
    published
}

/// (event_id, state) -> every payload published for it, in topic order.
pub fn published_events(broker: &Broker, topic: &str) -> BTreeMap<(String, String), Vec<String>> {
    published_by(broker, topic, |v| {
        (
            v["event_id"].as_str().unwrap().to_owned(),
            v["state"].as_str().unwrap().to_owned(),
        )
    })
}

/// (channel, seq) -> every forecast payload published for it.
pub fn published_forecasts(broker: &Broker, topic: &str) -> BTreeMap<(String, i64), Vec<String>> {
    published_by(broker, topic, |v| {
        (
            v["channel"].as_str().unwrap().to_owned(),
            v["seq"].as_i64().unwrap(),
        )
    })
}

/// Exactly once: no key of `published` came more than once.
pub fn assert_published_once<K: std::fmt::Debug>(
    published: &BTreeMap<K, Vec<String>>,
    topic: &str,
) {
    let repeated: Vec<_> = published.iter().filter(|(_, p)| p.len() > 1).collect();
    assert!(
        repeated.is_empty(),
        "{topic}: {} of {} records were published more than once, e.g. {:?}",
        repeated.len(),
        published.len(),
        repeated.iter().take(3).collect::<Vec<_>>()
    );
}

pub fn close(a: f32, b: f32) -> bool {
    (a - b).abs() <= 1e-6 * a.abs().max(b.abs()).max(1.0)
}

/// Each channel's scored seq ranges and the gaps between them, for failure
/// messages.
pub fn describe_scores(pg: &Postgres, database: &str) -> String {
    pg.query_in(
        database,
        "SELECT channel, count(*), min(seq), max(seq),
                (SELECT string_agg(g::text, ',') FROM (
                    SELECT seq + 1 AS g FROM scores s2 WHERE s2.channel = s.channel
                    AND NOT EXISTS (SELECT 1 FROM scores s3 WHERE s3.channel = s2.channel AND s3.seq = s2.seq + 1)
                    ORDER BY seq LIMIT 5) gaps)
         FROM scores s GROUP BY channel ORDER BY channel",
    )
    .iter()
    .map(|r| {
        let (c, n, lo, hi, gaps): (String, i64, i64, i64, Option<String>) =
            (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4));
        format!("{c}: {n} rows, seq {lo}..={hi}, first missing after runs: {}", gaps.unwrap_or_default())
    })
    .collect::<Vec<_>>()
    .join("\n")
}

/// What [`assert_same_outputs_as_reference`] checked.
#[derive(Debug)]
pub struct Compared {
    pub scores: i64,
    pub forecasts: i64,
    pub event_rows: usize,
    pub event_records: usize,
    pub forecast_records: usize,
}

/// The `satwatch` database and the `anomalies` topic hold exactly what the
/// reference (database `reference`, topic `reference.anomalies`) holds for
/// rows `start..start + rows` of `channels`, with one score per sample past
/// warm-up and no gap.
pub fn assert_same_outputs_as_reference(
    pg: &Postgres,
    broker: &Broker,
    channels: &str,
    start: i64,
    rows: i64,
    window: i64,
) -> Compared {
    let n = channels.split(',').count() as i64;
    // Scores: one row per sample past warm-up, and the reference's values.
    assert_one_score_per_seq(pg, channels, start + window, start + rows - 1);
    let (got, want) = (scores(pg, "satwatch"), scores(pg, "reference"));
    assert_eq!(got.len(), want.len());
    for (key, w) in &want {
        let g = got.get(key).unwrap_or_else(|| panic!("{key:?} not scored"));
        assert!(
            g.2 == w.2 && close(g.3, w.3) && close(g.4, w.4) && g.5 == w.5 && g.6 == w.6,
            "{key:?}: {g:?} != reference {w:?}"
        );
    }

    // Forecasts likewise (the first window of each channel has one too).
    let (got, want) = (forecasts(pg, "satwatch"), forecasts(pg, "reference"));
    assert_eq!(got.len() as i64, n * (rows - window + 1));
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    for (key, w) in &want {
        let g = &got[key];
        assert!(
            g.len() == w.len() && g.iter().zip(w).all(|(a, b)| close(*a, *b)),
            "{key:?}: forecast {g:?} != reference {w:?}"
        );
    }

    // Events: the same rows, closed where the reference's closed.
    let (got, want) = (events(pg, "satwatch"), events(pg, "reference"));
    assert!(!want.is_empty(), "the replayed stretch has anomalies");
    assert_eq!(got, want, "anomaly_events");
    let event_rows = want.len();

    // The topics, read as a read_committed consumer does: each record
    // exactly once, the reference's payloads.
    let got = published_events(broker, "anomalies");
    let want = published_events(broker, "reference.anomalies");
    assert_published_once(&got, "anomalies");
    assert_eq!(got, want, "anomalies topic");
    let got_forecasts = published_forecasts(broker, "forecasts");
    let want_forecasts = published_forecasts(broker, "reference.forecasts");
    assert_published_once(&got_forecasts, "forecasts");
    assert_eq!(
        got_forecasts.len() as i64,
        n * (rows - window + 1),
        "one forecast record per window"
    );
    assert_eq!(
        got_forecasts.keys().collect::<Vec<_>>(),
        want_forecasts.keys().collect::<Vec<_>>(),
        "forecasts topic"
    );
    Compared {
        scores: n * (rows - window),
        forecasts: n * (rows - window + 1),
        event_rows,
        event_records: got.len(),
        forecast_records: got_forecasts.len(),
    }
}
