//! Publishing to Kafka: anomaly events and forecasts, and dead letters.

use std::time::Duration;

use rdkafka::{
    config::ClientConfig,
    error::KafkaError,
    message::{Header, OwnedHeaders},
    producer::{DeliveryFuture, FutureProducer, FutureRecord},
    types::RDKafkaErrorCode,
};

use crate::{config::KafkaSettings, engine::Outputs, telemetry::Rejection};

/// librdkafka settings shared by every client satwatch makes.
pub fn client_config(settings: &KafkaSettings) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", &settings.brokers);
    for (key, value) in &settings.client {
        config.set(key, value);
    }
    config
}

/// The largest record satwatch produces (librdkafka's default is 1,000,000).
const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;
/// What is kept of a record the broker refuses to take whole as a dead letter.
const TRUNCATED_DEAD_LETTER_BYTES: usize = 64 * 1024;
/// How long to wait for room when the producer's queue is full.
const QUEUE_FULL_WAIT: Duration = Duration::from_millis(10);

#[derive(Clone)]
pub struct Publisher {
    producer: FutureProducer,
    anomalies_topic: String,
    forecasts_topic: String,
    dlq_topic: String,
}

impl Publisher {
    pub fn new(settings: &KafkaSettings) -> Result<Self, KafkaError> {
        let producer: FutureProducer = client_config(settings)
            .set("linger.ms", "1")
            .set("acks", "all")
            .set("queue.buffering.max.messages", "1000000")
            .set("message.timeout.ms", "60000")
            // Dead letters carry the original record, which may be as large as
            // the telemetry topic allows.
            .set("message.max.bytes", MAX_MESSAGE_BYTES.to_string())
            .create()?;
        Ok(Self {
            producer,
            anomalies_topic: settings.anomalies_topic.clone(),
            forecasts_topic: settings.forecasts_topic.clone(),
            dlq_topic: settings.dlq_topic.clone(),
        })
    }

    /// Publishes a batch's events and forecasts and waits until the broker has
    /// acknowledged every one of them. Records are handed to the producer one
    /// by one, in order: it keeps each partition's records in that order.
    pub async fn publish(&self, outputs: &Outputs) -> Result<(), KafkaError> {
        let mut pending = Vec::with_capacity(outputs.events.len() + outputs.forecasts.len());
        for event in &outputs.events {
            let json = serde_json::to_string(event).expect("events serialise");
            pending.push(
                self.enqueue_one(&self.anomalies_topic, &event.channel, &json)
                    .await?,
            );
        }
        for forecast in &outputs.forecasts {
            let json = serde_json::to_string(forecast).expect("forecasts serialise");
            pending.push(
                self.enqueue_one(&self.forecasts_topic, &forecast.channel, &json)
                    .await?,
            );
        }
        for delivery in pending {
            match delivery.await {
                Ok(Ok(_)) => {}
                Ok(Err((err, _))) => return Err(err),
                // The producer dropped the record without a verdict.
                Err(_canceled) => return Err(KafkaError::Canceled),
            }
        }
        Ok(())
    }

    async fn enqueue_one(
        &self,
        topic: &str,
        key: &str,
        payload: &str,
    ) -> Result<DeliveryFuture, KafkaError> {
        let mut record = FutureRecord::to(topic).key(key).payload(payload);
        loop {
            match self.producer.send_result(record) {
                Ok(delivery) => return Ok(delivery),
                // The producer's queue is full: wait for room, keeping the order.
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    tokio::time::sleep(QUEUE_FULL_WAIT).await;
                }
                Err((err, _)) => return Err(err),
            }
        }
    }

    /// Sends a bad record, unchanged, to the dead-letter topic with its reason.
    /// A record the broker refuses as too large is dead-lettered truncated,
    /// with a `satwatch-truncated` header giving its original size, so the
    /// partition keeps flowing.
    pub async fn dead_letter(
        &self,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        rejection: &Rejection,
        source: &str,
    ) -> Result<(), KafkaError> {
        match self
            .send_dead_letter(key, payload, rejection, source, None)
            .await
        {
            Err(KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge)) => {
                let payload = payload.unwrap_or_default();
                let kept = &payload[..payload.len().min(TRUNCATED_DEAD_LETTER_BYTES)];
                tracing::warn!(%source, bytes = payload.len(), "dead letter too large for the broker; sending it truncated");
                self.send_dead_letter(key, Some(kept), rejection, source, Some(payload.len()))
                    .await
            }
            other => other,
        }
    }

    async fn send_dead_letter(
        &self,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        rejection: &Rejection,
        source: &str,
        truncated_from: Option<usize>,
    ) -> Result<(), KafkaError> {
        let original_size = truncated_from.map(|n| n.to_string());
        let mut headers = OwnedHeaders::new()
            .insert(Header {
                key: "satwatch-error",
                value: Some(rejection.reason.code()),
            })
            .insert(Header {
                key: "satwatch-detail",
                value: Some(rejection.detail.as_str()),
            })
            .insert(Header {
                key: "satwatch-source",
                value: Some(source),
            });
        if let Some(size) = &original_size {
            headers = headers.insert(Header {
                key: "satwatch-truncated",
                value: Some(size.as_str()),
            });
        }
        let mut record: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(&self.dlq_topic).headers(headers);
        if let Some(key) = key {
            record = record.key(key);
        }
        if let Some(payload) = payload {
            record = record.payload(payload);
        }
        self.producer
            .send(record, Duration::from_secs(60))
            .await
            .map(|_| ())
            .map_err(|(err, _)| err)
    }
}
