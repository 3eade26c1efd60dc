//! Publishing to Kafka: anomaly events and forecasts (in transactions with
//! the offsets they settle), and dead letters.

use std::time::Duration;

use rdkafka::{
    config::ClientConfig,
    consumer::{CommitMode, Consumer, ConsumerContext, ConsumerGroupMetadata},
    error::KafkaError,
    message::{Header, OwnedHeaders},
    producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer},
    types::RDKafkaErrorCode,
    TopicPartitionList,
};
use ustr::Ustr;

use super::client::client_config;
use crate::{
    config::{Delivery, KafkaSettings},
    telemetry::Rejection,
};

/// How long the output and dead-letter producers wait to fill a batch.
pub const LINGER_MS: u32 = 1;

/// The largest record satwatch produces (librdkafka's default is 1,000,000).
const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;
/// What is kept of a record the broker refuses to take whole as a dead letter.
const TRUNCATED_DEAD_LETTER_BYTES: usize = 64 * 1024;
/// How long to wait for room when the producer's queue is full.
const QUEUE_FULL_WAIT: Duration = Duration::from_millis(10);

/// One output record, serialised, waiting to be published.
#[derive(Debug, Clone)]
pub struct OutputRecord {
    pub topic: Topic,
    pub key: Ustr,
    pub payload: String,
}

/// Which output topic a record goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topic {
    Anomalies,
    Forecasts,
}

/// Why publishing a commit failed, by what it takes to go on.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The transaction was aborted (or the records never sent): publish the
    /// same commit again, as it stands after any rebalance.
    #[error("publishing failed and was rolled back: {0}")]
    Retry(KafkaError),
    /// The producer cannot go on (fenced by a newer instance with the same
    /// `transactional.id`, or a fatal broker error): stop, and let the
    /// restart resume from the committed offsets.
    #[error("the transactional producer cannot go on: {0}")]
    Fatal(KafkaError),
}

impl PublishError {
    /// The error's kind, for metric labels and log fields.
    pub fn error_type(&self) -> &'static str {
        match self {
            PublishError::Retry(_) => "publish_retry",
            PublishError::Fatal(_) => "producer_fenced",
        }
    }
}

/// Publishes the `anomalies` and `forecasts` records, and with them (under
/// [`Delivery::ExactlyOnce`]) the consumed offsets they settle, in one
/// Kafka transaction.
#[derive(Clone)]
pub struct Publisher {
    producer: FutureProducer,
    /// Kept to make a new producer after a fatal error.
    config: ClientConfig,
    delivery: Delivery,
    anomalies_topic: String,
    forecasts_topic: String,
    /// Bounds each blocking transaction call.
    timeout: Duration,
}

impl Publisher {
    /// Creates the producer, checking its settings; [`Publisher::register`]
    /// then registers it with the broker.
    pub fn new(settings: &KafkaSettings, transactional_id: &str) -> Result<Self, KafkaError> {
        let mut config = client_config(settings);
        config
            .set("linger.ms", LINGER_MS.to_string())
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .set("queue.buffering.max.messages", "1000000")
            .set("message.timeout.ms", "60000");
        if settings.delivery == Delivery::ExactlyOnce {
            // A record not delivered within the transaction's timeout fails
            // the transaction anyway (librdkafka refuses a longer one).
            let timeout_ms = settings.transaction_timeout_ms.to_string();
            config
                .set("transactional.id", transactional_id)
                .set("transaction.timeout.ms", &timeout_ms)
                .set("message.timeout.ms", &timeout_ms);
        }
        for (key, value) in &settings.client {
            config.set(key, value);
        }
        let producer: FutureProducer = config.create()?;
        let timeout = settings.transaction_timeout().max(Duration::from_secs(30));
        Ok(Self {
            producer,
            config,
            delivery: settings.delivery,
            anomalies_topic: settings.anomalies_topic.clone(),
            forecasts_topic: settings.forecasts_topic.clone(),
            timeout,
        })
    }

    /// Under [`Delivery::ExactlyOnce`], registers the `transactional.id`
    /// with the broker, which aborts any transaction a crashed predecessor
    /// with the same id left open. Blocks until the broker answers (or the
    /// timeout): call it off the async runtime's threads.
    pub fn register(&self) -> Result<(), KafkaError> {
        if self.delivery == Delivery::ExactlyOnce {
            self.producer.init_transactions(self.timeout)?;
        }
        Ok(())
    }

    /// A new producer with the same settings and `transactional.id`, in
    /// place of one that cannot go on (fenced: its transaction timed out
    /// while a broker failed over). Registering it bumps the id's epoch,
    /// which aborts what the old one left open. Blocks.
    pub fn renew(&mut self) -> Result<(), KafkaError> {
        let producer: FutureProducer = self.config.create()?;
        if self.delivery == Delivery::ExactlyOnce {
            producer.init_transactions(self.timeout)?;
        }
        self.producer = producer;
        Ok(())
    }

    pub fn delivery(&self) -> Delivery {
        self.delivery
    }

    /// Publishes `records` and commits `offsets` (the next offsets to read)
    /// for the consumer group as `group` describes it (its generation when
    /// the records were released: a transaction from a generation that has
    /// ended is fenced): both or neither under
    /// [`Delivery::ExactlyOnce`]; records first, acknowledged by the broker,
    /// then the offsets, otherwise. Blocks: call it off the async runtime's
    /// threads.
    pub fn commit<X: ConsumerContext>(
        &self,
        records: &[OutputRecord],
        offsets: &TopicPartitionList,
        group: Option<&ConsumerGroupMetadata>,
        consumer: &impl Consumer<X>,
    ) -> Result<(), PublishError> {
        match self.delivery {
            Delivery::ExactlyOnce => self.commit_transaction(records, offsets, group),
            Delivery::AtLeastOnce => {
                self.send_and_wait(records).map_err(PublishError::Retry)?;
                if offsets.count() > 0 {
                    consumer
                        .commit(offsets, CommitMode::Sync)
                        .map_err(PublishError::Retry)?;
                }
                Ok(())
            }
        }
    }

    fn commit_transaction(
        &self,
        records: &[OutputRecord],
        offsets: &TopicPartitionList,
        group: Option<&ConsumerGroupMetadata>,
    ) -> Result<(), PublishError> {
        let attempt = || -> Result<(), KafkaError> {
            self.producer.begin_transaction()?;
            for record in records {
                self.enqueue(record)?;
            }
            if offsets.count() > 0 {
                let group = group.ok_or(KafkaError::Canceled)?;
                self.producer
                    .send_offsets_to_transaction(offsets, group, self.timeout)?;
            }
            self.producer.commit_transaction(self.timeout)
        };
        let Err(err) = attempt() else {
            return Ok(());
        };
        if is_fatal(&err) {
            return Err(PublishError::Fatal(err));
        }
        // Whatever state the transaction is in (begun, records in flight,
        // commit timed out), aborting it makes a clean slate.
        match self.producer.abort_transaction(self.timeout) {
            Ok(()) => Err(PublishError::Retry(err)),
            Err(abort) if is_fatal(&abort) => Err(PublishError::Fatal(abort)),
            Err(abort) => {
                tracing::warn!(error = %abort, "aborting the failed transaction failed too");
                Err(PublishError::Retry(err))
            }
        }
    }

    /// Hands a record to the producer, waiting for room when its queue is
    /// full; records keep their order per partition.
    fn enqueue(&self, record: &OutputRecord) -> Result<DeliveryFuture, KafkaError> {
        let topic = match record.topic {
            Topic::Anomalies => &self.anomalies_topic,
            Topic::Forecasts => &self.forecasts_topic,
        };
        let mut future = FutureRecord::to(topic)
            .key(record.key.as_str())
            .payload(record.payload.as_str());
        loop {
            match self.producer.send_result(future) {
                Ok(delivery) => return Ok(delivery),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    future = back;
                    self.producer.poll(QUEUE_FULL_WAIT);
                }
                Err((err, _)) => return Err(err),
            }
        }
    }

    /// Publishes `records` outside any transaction and waits until the
    /// broker has acknowledged every one.
    fn send_and_wait(&self, records: &[OutputRecord]) -> Result<(), KafkaError> {
        let pending = records
            .iter()
            .map(|r| self.enqueue(r))
            .collect::<Result<Vec<_>, _>>()?;
        for delivery in pending {
            match futures::executor::block_on(delivery) {
                Ok(Ok(_)) => {}
                Ok(Err((err, _))) => return Err(err),
                // The producer dropped the record without a verdict.
                Err(_canceled) => return Err(KafkaError::Canceled),
            }
        }
        Ok(())
    }
}

fn is_fatal(err: &KafkaError) -> bool {
    match err {
        KafkaError::Transaction(e) => e.is_fatal(),
        _ => false,
    }
}

/// Sends bad records, unchanged, to the dead-letter topic: its own
/// idempotent producer outside the outputs' transactions, so a flood of bad
/// records never waits on them.
#[derive(Clone)]
pub struct DeadLetters {
    producer: FutureProducer,
    dlq_topic: String,
}

impl DeadLetters {
    pub fn new(settings: &KafkaSettings) -> Result<Self, KafkaError> {
        let mut config = client_config(settings);
        config
            .set("linger.ms", LINGER_MS.to_string())
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .set("message.timeout.ms", "60000")
            // Dead letters carry the original record, which may be as large as
            // the telemetry topic allows.
            .set("message.max.bytes", MAX_MESSAGE_BYTES.to_string());
        for (key, value) in &settings.client {
            config.set(key, value);
        }
        Ok(Self {
            producer: config.create()?,
            dlq_topic: settings.dlq_topic.clone(),
        })
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
