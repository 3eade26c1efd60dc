//! Creating satwatch's topics through the Kafka admin API, idempotently.

use std::time::Duration;

use rdkafka::{
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    client::DefaultClientContext,
    types::RDKafkaErrorCode,
};

use super::client::client_config;
use crate::config::KafkaSettings;

/// Creates each topic that does not exist yet; returns (created, existing).
pub async fn create_topics(
    settings: &KafkaSettings,
    topics: &[String],
    partitions: i32,
    replication: i32,
) -> Result<(Vec<String>, Vec<String>), String> {
    let admin: AdminClient<DefaultClientContext> =
        client_config(settings).create().map_err(|e| {
            format!(
                "cannot create Kafka admin client: {}",
                crate::secrets::mask_client_error(&e, &settings.client)
            )
        })?;
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(replication)))
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = admin
        .create_topics(&new, &options)
        .await
        .map_err(|e| format!("cannot reach Kafka at {}: {e}", settings.brokers))?;
    let (mut created, mut existing) = (Vec::new(), Vec::new());
    for result in results {
        match result {
            Ok(topic) => created.push(topic),
            Err((topic, RDKafkaErrorCode::TopicAlreadyExists)) => existing.push(topic),
            Err((topic, code)) => return Err(format!("cannot create topic {topic}: {code}")),
        }
    }
    Ok((created, existing))
}
