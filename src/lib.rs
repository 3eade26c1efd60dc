//! satwatch watches spacecraft telemetry for anomalies as it streams.
//!
//! # Layout
//!
//! A sample takes one path, and data flows one way along it:
//!
//! - [`source`]: the Kafka consumer group over the telemetry topics; decodes
//!   records with [`telemetry`] (bad ones go to the dead-letter topic) and
//!   tracks which offsets may be committed.
//! - [`window`]: each channel's sliding window of normalised samples.
//! - [`batch`]: per-model dynamic batching with Triton's semantics.
//! - [`backend`]: the inference backends (ONNX Runtime on CPU), run on their
//!   own threads.
//! - [`detect`]: forecast errors into scores, thresholds and anomaly events;
//!   one file per score part (surprise, burst, level over a baseline,
//!   excursion, stuck), each owning its `[detect.<part>]` settings and state,
//!   plus the threshold and the events.
//! - [`sink`]: PostgreSQL and the `anomalies`/`forecasts` topics; acknowledges
//!   records back to the source once their outputs are durable.
//!
//! [`engine`] is the pure core that holds windows, batchers and detectors;
//! [`processor`] drives it from async code. [`repository`] reads the
//! Triton-style model repository, [`config`] the pipeline file. [`run`] wires
//! the service together; [`replay`], [`eval`], [`bench`], [`plan`] (what the
//! pipeline and its models amount to, for the scripts) and [`topics`] are the
//! tools around it, each holding its subcommand's options and output, so
//! `main.rs` only parses and dispatches ([`dataset`] reads the SMAP files,
//! [`offline`] feeds the engine from memory for `eval` and `bench`,
//! [`round_trip`] times the broker alone for `bench broker`);
//! [`http`], [`metrics`] and [`health`] are what operators look at;
//! [`secrets`] masks secret settings in the messages that could quote them.

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
pub mod health;
pub mod http;
pub mod metrics;
pub mod offline;
pub mod plan;
pub mod processor;
#[cfg(feature = "kafka")]
pub mod replay;
pub mod repository;
#[cfg(feature = "kafka")]
pub mod round_trip;
#[cfg(feature = "kafka")]
pub mod run;
pub mod secrets;
#[cfg(feature = "kafka")]
pub mod sink;
#[cfg(feature = "kafka")]
pub mod source;
pub mod telemetry;
#[cfg(feature = "kafka")]
pub mod topics;
pub mod window;
