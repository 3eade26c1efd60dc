//! The satwatch binary: `satwatch run` as a child process that a test can
//! query, signal or kill, and subcommands run to completion.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus},
    time::{Duration, Instant},
};

use super::{free_port, http_get, repo_root, wait_for, Broker, Postgres, SMAP_PIPELINE};

pub fn satwatch_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_satwatch"))
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
