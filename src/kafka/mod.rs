//! Everything satwatch says to Kafka, in one room.
//!
//! - [`client`]: the librdkafka settings every client starts from.
//! - [`consumer`]: the consumer group over the telemetry topics, its
//!   rebalance hooks (partitions start from the channel checkpoints) and
//!   the consume loop, which decodes records and dead-letters bad ones.
//! - [`offsets`]: which offsets may be committed, per partition.
//! - [`publisher`]: the transactional producer of `anomalies`/`forecasts`
//!   (with the offsets they settle) and the dead-letter producer.
//! - [`topics`]: creating the topics a pipeline names.
//! - [`replay`] and [`round_trip`]: the tools that produce telemetry (a
//!   dataset replayed at a rate) and time the broker alone.

pub mod client;
pub mod consumer;
pub mod offsets;
pub mod publisher;
pub mod replay;
pub mod round_trip;
pub mod topics;

pub use offsets::OffsetTracker;
pub use publisher::{DeadLetters, OutputRecord, PublishError, Publisher, Topic};

/// Why a Kafka tool (`replay`, `topics`, the broker round trip) could not
/// run, by kind.
#[derive(Debug, thiserror::Error)]
pub enum KafkaToolError {
    /// The pipeline file was refused.
    #[error(transparent)]
    File(#[from] crate::file_error::FileError),
    /// The dataset could not be read.
    #[error(transparent)]
    Data(#[from] crate::dataset::DataError),
    /// A client could not be made, the broker not reached, or it refused a
    /// step; the values of secret settings are masked.
    #[error("{0}")]
    Broker(String),
    /// What was asked cannot be done as asked (a bad option).
    #[error("{0}")]
    Usage(String),
}

impl KafkaToolError {
    /// The error's kind, for metric labels and log fields.
    pub fn error_type(&self) -> &'static str {
        match self {
            KafkaToolError::File(e) => e.error_type(),
            KafkaToolError::Data(_) => "data",
            KafkaToolError::Broker(_) => "broker",
            KafkaToolError::Usage(_) => "usage",
        }
    }
}
