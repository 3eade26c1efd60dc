//! PostgreSQL for the integration tests: a throwaway server on a free
//! loopback port, stopped and resumed as a test needs, and synchronous
//! queries against it.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use super::free_port;

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
