//! satwatch watches spacecraft telemetry for anomalies as it streams.
//!
//! # Layout
//!
//! A sample takes one path, and data flows one way along it:
//!
//! - [`kafka`]: everything said to Kafka. Its [`kafka::consumer`] is the
//!   consumer group over the telemetry topics; it decodes records with
//!   [`telemetry`] (bad ones go to the dead-letter topic) and tracks which
//!   offsets may be committed ([`kafka::offsets`]).
//! - [`window`]: each channel's sliding window of normalised samples.
//! - [`batch`]: per-model dynamic batching with Triton's semantics.
//! - [`backend`]: the inference backends (ONNX Runtime on CPU), run on their
//!   own threads.
//! - [`detect`]: forecast errors into scores, thresholds and anomaly events;
//!   one file per score part (surprise, burst, level over a baseline,
//!   excursion, stuck), each owning its `[detect.<part>]` settings and state,
//!   plus the threshold and the events.
//! - [`sink`]: gathers outputs into write batches for [`postgres`] (rows,
//!   checkpoints) and the `anomalies`/`forecasts` topics ([`kafka::publisher`]),
//!   and acknowledges records back to the consumer once their outputs are
//!   durable. Data flows one way: no module imports one downstream of it.
//!
//! [`engine`] is the pure core that holds windows, batchers and detectors;
//! [`processor`] drives it from async code. [`repository`] reads the
//! Triton-style model repository, [`config`] the pipeline file (a file either
//! refuses is a [`file_error::FileError`] naming the file and line). [`run`] wires
//! the service together; [`eval`], [`bench`], [`plan`] (what the pipeline
//! and its models amount to, for the scripts), [`kafka::replay`] and
//! [`kafka::topics`] are the tools around it, each holding its subcommand's
//! options and output, so `main.rs` only parses and dispatches ([`dataset`]
//! reads the SMAP files, [`offline`] feeds the engine from memory for `eval`
//! and `bench`, [`kafka::round_trip`] times the broker alone for `bench
//! broker`);
//! [`http`], [`metrics`] and [`health`] are what operators look at;
//! [`secrets`] masks secret settings in the messages that could quote them;
//! [`retry`] is the one backoff every retry loop waits with.

pub mod backend;
pub mod batch;
// Its latency figures use round_trip's quantiles, which need Kafka.
#[cfg(feature = "kafka")]
pub mod bench;
pub mod config;
pub mod dataset;
pub mod detect;
pub mod engine;
pub mod eval;
pub mod file_error;
pub mod health;
pub mod http;
#[cfg(feature = "kafka")]
pub mod kafka;
pub mod metrics;
pub mod offline;
pub mod plan;
#[cfg(feature = "kafka")]
pub mod postgres;
pub mod processor;
pub mod repository;
pub mod retry;
#[cfg(feature = "kafka")]
pub mod run;
pub mod secrets;
#[cfg(feature = "kafka")]
pub mod sink;
pub mod telemetry;
pub mod window;
