//! The pipeline file (`pipelines/*.toml`): one serde tree, unknown keys refused,
//! validated once at start into [`Pipeline`]. The environment overrides what a
//! deployment changes: `SATWATCH_BROKERS`, `DATABASE_URL`, `SATWATCH_HTTP_ADDR`,
//! and libpq's `PGSSLROOTCERT`, `PGSSLCERT`, `PGSSLKEY` for PostgreSQL TLS.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

use crate::{
    backend::{BackendKind, GpuFallback},
    detect::DetectSettings,
    file_error::FileError,
};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineFile {
    pub kafka: KafkaSettings,
    #[serde(default)]
    pub postgres: PostgresSettings,
    #[serde(default)]
    pub http: HttpSettings,
    #[serde(default)]
    pub health: HealthSettings,
    pub repository: RepositorySettings,
    pub channels: ChannelSettings,
    /// Subsystem by channel prefix (the text before the first '-'), e.g. `E = "eps"`.
    pub subsystems: BTreeMap<String, String>,
    #[serde(default)]
    pub detect: DetectSettings,
    #[serde(default)]
    pub engine: EngineSettings,
    #[serde(default)]
    pub sink: SinkSettings,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSettings {
    /// Bootstrap servers; `SATWATCH_BROKERS` overrides.
    pub brokers: String,
    #[serde(default = "default_group_id")]
    pub group_id: String,
    /// Telemetry topic of a subsystem: `{prefix}{subsystem}`.
    #[serde(default = "default_topic_prefix")]
    pub telemetry_topic_prefix: String,
    #[serde(default = "default_anomalies_topic")]
    pub anomalies_topic: String,
    #[serde(default = "default_forecasts_topic")]
    pub forecasts_topic: String,
    #[serde(default = "default_dlq_topic")]
    pub dlq_topic: String,
    /// Records larger than this are dead-lettered as `too_large`.
    #[serde(default = "default_max_record_bytes")]
    pub max_record_bytes: usize,
    /// Records of one partition consumed from its oldest unfinished record
    /// on (all waiting for that one before their offsets, and their
    /// outputs, can be committed), at which the partition is paused; it
    /// resumes at half. Bounds what a held model's channel keeps waiting on
    /// its partition; below `[engine] max_pending_windows`, so that the
    /// held channel's partition pauses before intake as a whole does.
    #[serde(default = "default_max_uncommitted_per_partition")]
    pub max_uncommitted_per_partition: usize,
    /// Extra librdkafka properties for every client (e.g. `security.protocol`).
    #[serde(default)]
    pub client: BTreeMap<String, String>,
    /// How the `anomalies` and `forecasts` records and the consumed offsets
    /// reach Kafka: in one transaction per commit (exactly once for a
    /// `read_committed` consumer), or, for brokers without transactions,
    /// published first and committed after (at least once).
    #[serde(default)]
    pub delivery: Delivery,
    /// This instance's `transactional.id`: stable across its restarts, so
    /// a restart fences the crashed process's open transaction at once,
    /// and unique in the group. `SATWATCH_TRANSACTIONAL_ID` overrides; the
    /// default is `<group_id>-<host name>-<HTTP port>`.
    #[serde(default)]
    pub transactional_id: Option<String>,
    /// A transaction left open by a crashed instance holds `read_committed`
    /// readers back until this passes (or the instance restarts).
    #[serde(default = "default_transaction_timeout_ms")]
    pub transaction_timeout_ms: u64,
}

/// See [`KafkaSettings::delivery`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Delivery {
    #[default]
    ExactlyOnce,
    AtLeastOnce,
}

impl KafkaSettings {
    pub fn transaction_timeout(&self) -> Duration {
        Duration::from_millis(self.transaction_timeout_ms)
    }
}

/// How to reach PostgreSQL. TLS follows the URL's `sslmode` (`disable`,
/// `prefer`, the default, or `require`); the files below say what the server's
/// certificate is checked against and what satwatch presents. Each file
/// setting has libpq's environment variable as its override, so a deployment
/// sets them the way it would for `psql`.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct PostgresSettings {
    /// `DATABASE_URL` overrides.
    pub url: Option<String>,
    /// PEM file of the CA certificate(s) the server's certificate must chain
    /// to, instead of the system's trust store; `PGSSLROOTCERT` overrides.
    /// The server's name is checked against the URL's host either way.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// PEM certificate (chain) to present to a server that asks for one;
    /// `PGSSLCERT` overrides. Needs `client_key_file`.
    #[serde(default)]
    pub client_cert_file: Option<PathBuf>,
    /// The private key of `client_cert_file` (PEM, unencrypted); `PGSSLKEY`
    /// overrides.
    #[serde(default)]
    pub client_key_file: Option<PathBuf>,
    /// Encrypt without checking the server's certificate or name (libpq's
    /// `sslmode=require` without a root certificate). Off by default: an
    /// explicit opt-in for test setups with throwaway certificates, since
    /// anyone on the path can then impersonate the server.
    #[serde(default)]
    pub tls_skip_verify: bool,
}

impl PostgresSettings {
    /// The environment's overrides: `DATABASE_URL`, and libpq's
    /// `PGSSLROOTCERT`, `PGSSLCERT` and `PGSSLKEY`.
    fn apply_env(&mut self) {
        if let Ok(url) = std::env::var("DATABASE_URL") {
            self.url = Some(url);
        }
        for (name, slot) in [
            ("PGSSLROOTCERT", &mut self.ca_file),
            ("PGSSLCERT", &mut self.client_cert_file),
            ("PGSSLKEY", &mut self.client_key_file),
        ] {
            if let Some(path) = std::env::var_os(name).filter(|p| !p.is_empty()) {
                *slot = Some(PathBuf::from(path));
            }
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    /// `SATWATCH_HTTP_ADDR` overrides.
    #[serde(default = "default_http_addr")]
    pub addr: String,
    /// Connections open at once; at the limit the oldest is closed (once
    /// its request in flight, if any, is answered) to make room. Lowered to
    /// half the process's file limit, so clients cannot take the files
    /// PostgreSQL and Kafka connections need.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// A client must send a request's headers within this long of
    /// connecting, or of its previous response: it bounds both slow
    /// clients and idle kept-alive connections.
    #[serde(default = "default_header_read_timeout_ms")]
    pub header_read_timeout_ms: u64,
    /// Request bodies larger than this are refused with 413 (no endpoint
    /// reads a body today).
    #[serde(default = "default_max_request_body_bytes")]
    pub max_request_body_bytes: usize,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            addr: default_http_addr(),
            max_connections: default_max_connections(),
            header_read_timeout_ms: default_header_read_timeout_ms(),
            max_request_body_bytes: default_max_request_body_bytes(),
        }
    }
}

impl HttpSettings {
    pub fn header_read_timeout(&self) -> Duration {
        Duration::from_millis(self.header_read_timeout_ms)
    }
}

/// When readiness reports a stage as stalled.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthSettings {
    /// A stage is stalled when its oldest unfinished work (a PostgreSQL
    /// write, an output transaction, or consumer lag with no committed
    /// progress) is older than this; readiness is then 503.
    #[serde(default = "default_max_stall_ms")]
    pub max_stall_ms: u64,
}

impl Default for HealthSettings {
    fn default() -> Self {
        Self {
            max_stall_ms: default_max_stall_ms(),
        }
    }
}

impl HealthSettings {
    pub fn max_stall(&self) -> Duration {
        Duration::from_millis(self.max_stall_ms)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepositorySettings {
    /// Relative paths are taken from the pipeline file's directory.
    pub path: PathBuf,
    /// How models change while running, after Triton's model control modes:
    /// `explicit` (the load/unload endpoints, which need `control_token`),
    /// `poll` (the directory is watched every `poll_interval_ms`), or `none`.
    #[serde(default)]
    pub mode: ControlMode,
    #[serde(default = "default_poll_interval_ms")]
    pub poll_interval_ms: u64,
    /// Bearer token for the load and unload endpoints; without one they are
    /// disabled. `SATWATCH_REPOSITORY_TOKEN` overrides it (prefer that: it
    /// keeps the secret out of the file).
    #[serde(default)]
    pub control_token: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ControlMode {
    None,
    #[default]
    Explicit,
    Poll,
}

fn default_poll_interval_ms() -> u64 {
    2000
}

impl RepositorySettings {
    pub fn poll_interval(&self) -> Duration {
        Duration::from_millis(self.poll_interval_ms.max(100))
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelSettings {
    pub ids: Vec<String>,
    /// Model serving a channel; `{channel}` is replaced by the channel id.
    #[serde(default = "default_model_template")]
    pub model: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineSettings {
    /// Threads running inference calls.
    #[serde(default = "default_backend_threads")]
    pub backend_threads: usize,
    /// Windows waiting in batchers before the consumer is paused. A queued
    /// window holds about 200 bytes (its row and its entry), not a copy.
    #[serde(default = "default_max_pending_windows")]
    pub max_pending_windows: usize,
    /// After SIGINT/SIGTERM, the longest the drain may take before satwatch
    /// exits without its final commit (exit status 2).
    #[serde(default = "default_shutdown_timeout_ms")]
    pub shutdown_timeout_ms: u64,
    /// Which backend runs the models: `"auto"` (default: each model where its
    /// config.pbtxt's `instance_group` puts it, KIND_CPU on ONNX Runtime and
    /// KIND_GPU on the GPU backend built in), or `"onnx"`, `"native"`,
    /// `"cuda"`, `"onnx-tensorrt"` for every model.
    #[serde(default)]
    pub backend: BackendKind,
    /// A model that asks for a GPU when none is usable: `"cpu"` (default) runs
    /// it on ONNX Runtime's CPU backend after one warning; `"refuse"` stops
    /// satwatch with the reason.
    #[serde(default)]
    pub gpu_fallback: GpuFallback,
    /// CUDA device ordinal the GPU backends use.
    #[serde(default)]
    pub gpu_device: usize,
    /// Where the TensorRT execution provider keeps built engines and timing
    /// caches (backend `"onnx-tensorrt"`); default `~/.cache/satwatch/tensorrt`
    /// (`$SATWATCH_CACHE/tensorrt` when set).
    #[serde(default)]
    pub tensorrt_cache_dir: Option<PathBuf>,
    /// TensorRT may build FP16 kernels (default true).
    #[serde(default = "default_tensorrt_fp16")]
    pub tensorrt_fp16: bool,
    /// ONNX Runtime on the CPU serves a model of the shipped dense family in
    /// its row form, reading the rows that a batch's consecutive windows share
    /// instead of a copy of every window (default true; see
    /// `src/backend/rows.rs`). False serves every model file as it is.
    #[serde(default = "default_row_form")]
    pub row_form: bool,
}

fn default_row_form() -> bool {
    true
}

impl Default for EngineSettings {
    fn default() -> Self {
        Self {
            backend_threads: default_backend_threads(),
            max_pending_windows: default_max_pending_windows(),
            shutdown_timeout_ms: default_shutdown_timeout_ms(),
            backend: BackendKind::default(),
            gpu_fallback: GpuFallback::default(),
            gpu_device: 0,
            tensorrt_cache_dir: None,
            tensorrt_fp16: default_tensorrt_fp16(),
            row_form: default_row_form(),
        }
    }
}

impl EngineSettings {
    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_millis(self.shutdown_timeout_ms)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkSettings {
    /// A write batch is flushed when it holds this many scored samples...
    #[serde(default = "default_max_batch_rows")]
    pub max_batch_rows: usize,
    /// ...or when its oldest row has waited this long.
    #[serde(default = "default_max_batch_delay_ms")]
    pub max_batch_delay_ms: u64,
    /// How often consumed offsets whose effects are durable are committed.
    #[serde(default = "default_commit_interval_ms")]
    pub commit_interval_ms: u64,
}

impl Default for SinkSettings {
    fn default() -> Self {
        Self {
            max_batch_rows: default_max_batch_rows(),
            max_batch_delay_ms: default_max_batch_delay_ms(),
            commit_interval_ms: default_commit_interval_ms(),
        }
    }
}

impl SinkSettings {
    pub fn max_batch_delay(&self) -> Duration {
        Duration::from_millis(self.max_batch_delay_ms)
    }
    pub fn commit_interval(&self) -> Duration {
        Duration::from_millis(self.commit_interval_ms)
    }
}

fn default_group_id() -> String {
    "satwatch".into()
}
fn default_topic_prefix() -> String {
    "telemetry.".into()
}
fn default_anomalies_topic() -> String {
    "anomalies".into()
}
fn default_forecasts_topic() -> String {
    "forecasts".into()
}
fn default_dlq_topic() -> String {
    "telemetry.dlq".into()
}
fn default_transaction_timeout_ms() -> u64 {
    10_000
}

fn default_max_record_bytes() -> usize {
    64 * 1024
}
fn default_max_uncommitted_per_partition() -> usize {
    20_000
}
fn default_http_addr() -> String {
    "127.0.0.1:8000".into()
}
fn default_max_connections() -> usize {
    1024
}
fn default_header_read_timeout_ms() -> u64 {
    10_000
}
fn default_max_request_body_bytes() -> usize {
    64 * 1024
}
fn default_max_stall_ms() -> u64 {
    30_000
}
fn default_model_template() -> String {
    "smap_{channel}".into()
}
fn default_backend_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}
fn default_max_pending_windows() -> usize {
    32768
}
fn default_shutdown_timeout_ms() -> u64 {
    30_000
}
fn default_tensorrt_fp16() -> bool {
    true
}
fn default_max_batch_rows() -> usize {
    4096
}
fn default_max_batch_delay_ms() -> u64 {
    5
}
fn default_commit_interval_ms() -> u64 {
    500
}

/// A configured channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelConfig {
    pub id: String,
    pub subsystem: String,
    pub topic: String,
    pub model: String,
}

/// The validated pipeline: the file plus the environment's overrides.
#[derive(Debug, Clone)]
pub struct Pipeline {
    pub file: PipelineFile,
    pub path: PathBuf,
    pub repository: PathBuf,
    pub channels: Vec<ChannelConfig>,
}

impl Pipeline {
    /// Reads, parses and validates a pipeline file, applying environment overrides.
    pub fn load(path: &Path) -> Result<Self, FileError> {
        let text = std::fs::read_to_string(path).map_err(|err| FileError {
            path: path.to_owned(),
            line: None,
            reason: format!("cannot read pipeline file: {err}"),
        })?;
        Self::parse(&text, path)
    }

    /// [`Pipeline::load`] with `[detect]` settings replaced, each
    /// `(key, value)` a TOML value under a dotted key such as `burst.window`
    /// (`satwatch eval --detect KEY=VALUE`, for studies that try settings
    /// without editing the file).
    pub fn load_with_detect(
        path: &Path,
        overrides: &[(String, String)],
    ) -> Result<Self, FileError> {
        if overrides.is_empty() {
            return Self::load(path);
        }
        let refuse = |reason: String| FileError {
            path: path.to_owned(),
            line: None,
            reason,
        };
        let text = std::fs::read_to_string(path)
            .map_err(|err| refuse(format!("cannot read pipeline file: {err}")))?;
        let mut file: toml::Table = text
            .parse()
            .map_err(|err| refuse(format!("not TOML: {err}")))?;
        let detect = file
            .entry("detect")
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .ok_or_else(|| refuse("[detect] is not a table".into()))?;
        for (key, value) in overrides {
            let parsed: toml::Table = format!("v = {value}").parse().map_err(|err| {
                refuse(format!("detect.{key} = {value} is not a TOML value: {err}"))
            })?;
            // `burst.window` is `window` in the `[detect.burst]` table.
            let mut table = &mut *detect;
            let mut path: Vec<&str> = key.split('.').collect();
            let last = path.pop().unwrap_or_default();
            for part in path {
                table = table
                    .entry(part)
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                    .as_table_mut()
                    .ok_or_else(|| refuse(format!("detect.{key}: {part} is not a table")))?;
            }
            table.insert(last.to_owned(), parsed["v"].clone());
        }
        Self::parse(&file.to_string(), path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Self, FileError> {
        // The parser quotes a value it refuses (`invalid type: integer
        // `123456``), which may belong to a secret setting.
        let secrets = crate::secrets::secrets_in_toml(text);
        let refuse = |line: Option<usize>, reason: String| FileError {
            path: path.to_owned(),
            line,
            reason: crate::secrets::mask(
                &reason,
                secrets.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            ),
        };
        let mut file: PipelineFile = toml::from_str(text).map_err(|err| {
            let line = err
                .span()
                .map(|span| crate::repository::pbtxt::line_of(text, span.start));
            let mut reason = err.message().to_owned();
            if let Some((old, new)) = crate::detect::MOVED_KEYS.iter().find(|(old, _)| {
                reason.contains(&format!("unknown field `{old}`"))
                        // `threshold` is now a table: a number there is the old key.
                        || (*old == "threshold" && reason.contains("struct ThresholdSettings"))
            }) {
                reason = format!(
                    "detect.{old} is now detect.{new}: each part of the score has its own \
                     [detect.<part>] table (docs/detection.md)"
                );
            }
            refuse(line, reason)
        })?;
        if let Ok(brokers) = std::env::var("SATWATCH_BROKERS") {
            file.kafka.brokers = brokers;
        }
        if let Ok(id) = std::env::var("SATWATCH_TRANSACTIONAL_ID") {
            file.kafka.transactional_id = Some(id).filter(|id| !id.is_empty());
        }
        file.postgres.apply_env();
        if let Ok(addr) = std::env::var("SATWATCH_HTTP_ADDR") {
            file.http.addr = addr;
        }
        if let Ok(token) = std::env::var("SATWATCH_REPOSITORY_TOKEN") {
            file.repository.control_token = Some(token).filter(|t| !t.is_empty());
        }
        let at = |needle: &str| text.lines().position(|l| l.contains(needle)).map(|i| i + 1);

        let mut channels = Vec::with_capacity(file.channels.ids.len());
        let mut seen = std::collections::HashSet::new();
        for id in &file.channels.ids {
            if id.is_empty() || !seen.insert(id.as_str()) {
                return Err(refuse(
                    at(&format!("\"{id}\"")),
                    format!("channel id \"{id}\" is empty or repeated"),
                ));
            }
            let prefix = id.split('-').next().unwrap_or(id);
            let Some(subsystem) = file.subsystems.get(prefix) else {
                return Err(refuse(
                    at("[subsystems]"),
                    format!(
                        "channel \"{id}\": no subsystem for prefix \"{prefix}\" in [subsystems]"
                    ),
                ));
            };
            channels.push(ChannelConfig {
                id: id.clone(),
                subsystem: subsystem.clone(),
                topic: format!("{}{}", file.kafka.telemetry_topic_prefix, subsystem),
                model: file.channels.model.replace("{channel}", id),
            });
        }
        if channels.is_empty() {
            return Err(refuse(at("ids"), "no channels configured".into()));
        }
        if file.engine.backend_threads == 0 {
            return Err(refuse(
                at("backend_threads"),
                "backend_threads must be >= 1".into(),
            ));
        }
        if file.http.max_connections == 0 || file.http.header_read_timeout_ms == 0 {
            return Err(refuse(
                at("[http]"),
                "[http] max_connections and header_read_timeout_ms must be >= 1".into(),
            ));
        }
        if file.health.max_stall_ms == 0 {
            return Err(refuse(
                at("max_stall_ms"),
                "[health] max_stall_ms must be >= 1".into(),
            ));
        }
        if file.kafka.max_uncommitted_per_partition < 2 {
            return Err(refuse(
                at("max_uncommitted_per_partition"),
                "[kafka] max_uncommitted_per_partition must be >= 2 (a paused partition resumes at half)".into(),
            ));
        }
        if file.sink.max_batch_rows == 0 {
            return Err(refuse(
                at("max_batch_rows"),
                "max_batch_rows must be >= 1".into(),
            ));
        }
        file.detect
            .validate()
            .map_err(|reason| refuse(at("[detect]"), reason.to_string()))?;

        let base = path.parent().unwrap_or(Path::new("."));
        let repository = if file.repository.path.is_absolute() {
            file.repository.path.clone()
        } else {
            base.join(&file.repository.path)
        };
        Ok(Self {
            file,
            path: path.to_owned(),
            repository,
            channels,
        })
    }

    /// Telemetry topics, one per subsystem in use, sorted.
    pub fn telemetry_topics(&self) -> Vec<String> {
        let mut topics: Vec<String> = self.channels.iter().map(|c| c.topic.clone()).collect();
        topics.sort();
        topics.dedup();
        topics
    }

    /// Every topic satwatch reads or writes.
    pub fn all_topics(&self) -> Vec<String> {
        let k = &self.file.kafka;
        let mut topics = self.telemetry_topics();
        topics.extend([
            k.anomalies_topic.clone(),
            k.forecasts_topic.clone(),
            k.dlq_topic.clone(),
        ]);
        topics
    }

    /// Model names in use, sorted, each once.
    pub fn models(&self) -> Vec<String> {
        let mut models: Vec<String> = self.channels.iter().map(|c| c.model.clone()).collect();
        models.sort();
        models.dedup();
        models
    }

    /// Restricts the pipeline to the given channels (`all` keeps every one).
    pub fn select_channels(&mut self, wanted: &str) -> Result<(), FileError> {
        if wanted == "all" {
            return Ok(());
        }
        let wanted: Vec<&str> = wanted
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        for id in &wanted {
            if !self.channels.iter().any(|c| c.id == *id) {
                return Err(FileError::new(
                    &self.path,
                    None,
                    format!("unknown channel \"{id}\" (not in this pipeline file)"),
                ));
            }
        }
        self.channels.retain(|c| wanted.contains(&c.id.as_str()));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[kafka]
brokers = "127.0.0.1:9092"
[repository]
path = "../model_repository"
[channels]
ids = ["A-1", "E-2"]
[subsystems]
A = "acs"
E = "eps"
"#;

    #[test]
    fn channels_get_subsystem_topic_and_model() {
        let p = Pipeline::parse(GOOD, Path::new("pipelines/x.toml")).unwrap();
        assert_eq!(p.channels[1].topic, "telemetry.eps");
        assert_eq!(p.channels[0].model, "smap_A-1");
        assert_eq!(p.repository, Path::new("pipelines/../model_repository"));
        assert_eq!(p.all_topics().len(), 5);
    }

    #[test]
    fn unknown_key_is_refused_with_line() {
        let bad = GOOD.replace("[channels]", "[channels]\ncolour = 1");
        let err = Pipeline::parse(&bad, Path::new("x.toml")).unwrap_err();
        assert_eq!(err.line, Some(7));
        assert!(err.reason.contains("colour"), "{err}");
    }

    #[test]
    fn secret_values_never_appear_in_config_errors() {
        let with_client = |client: &str| {
            GOOD.replace(
                "brokers = \"127.0.0.1:9092\"",
                &format!("brokers = \"127.0.0.1:9092\"\n[kafka.client]\n{client}"),
            )
        };
        let cases = [
            // A numeric password where librdkafka wants a string.
            (with_client("\"ssl.key.password\" = 20261202"), "20261202"),
            (with_client("\"sasl.pasword\" = 4242.5"), "4242.5"),
            (
                with_client("\"sasl.password\" = \"hunter2\"\nbogus = 1"),
                "hunter2",
            ),
            (
                GOOD.replace(
                    "path = \"../model_repository\"",
                    "path = \"../model_repository\"\ncontrol_token = 98765432",
                ),
                "98765432",
            ),
            (
                GOOD.replace("[kafka]", "[kafka]\nsasl_pasword = \"hunter2\""),
                "hunter2",
            ),
            (with_client("\"sasl.password\" = \"hunter2"), "hunter2"),
        ];
        for (text, secret) in cases {
            let err = Pipeline::parse(&text, Path::new("x.toml")).unwrap_err();
            assert!(!err.to_string().contains(secret), "{secret}: {err}");
        }
    }

    #[test]
    fn channel_without_subsystem_is_refused() {
        let bad = GOOD.replace("\"E-2\"", "\"Q-2\"");
        let err = Pipeline::parse(&bad, Path::new("x.toml")).unwrap_err();
        assert!(err.reason.contains("prefix \"Q\""), "{err}");
    }
}
