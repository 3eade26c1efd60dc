//! The librdkafka settings every client satwatch makes starts from: the
//! brokers and the pipeline's `[kafka.client]` table, plus the consumer
//! group's own.

use rdkafka::ClientConfig;

use crate::config::KafkaSettings;

/// librdkafka settings shared by every client satwatch makes.
pub fn client_config(settings: &KafkaSettings) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", &settings.brokers);
    for (key, value) in &settings.client {
        config.set(key, value);
    }
    config
}

/// The consumer settings `satwatch run` reads telemetry with, in `group`
/// (the round-trip benchmark measures the broker with the same ones).
pub fn consumer_config(settings: &KafkaSettings, group: &str) -> ClientConfig {
    let mut config = client_config(settings);
    config
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000")
        // Latency: librdkafka backs a partition off for fetch.error.backoff.ms
        // (500 ms) after a fetch answered with an error code, which tansu,
        // the broker satwatch first ran on, did for fetches that found
        // nothing new; at low rates that backoff sat in every sample's
        // latency (p50 0.7 s at 1,000 samples/s, 49 ms after). Kept short
        // for brokers that do the same.
        .set("fetch.wait.max.ms", "5")
        .set("fetch.error.backoff.ms", "5");
    // The pipeline's `[kafka.client]` settings win over the defaults above.
    for (key, value) in &settings.client {
        config.set(key, value);
    }
    config
}
