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
