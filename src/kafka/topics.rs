//! Creating satwatch's topics through the Kafka admin API, idempotently.

use super::KafkaToolError;
use std::{path::PathBuf, time::Duration};

use rdkafka::{
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    client::DefaultClientContext,
    types::RDKafkaErrorCode,
};

use super::client::client_config;
use crate::config::{KafkaSettings, Pipeline};

/// `satwatch topics`'s options.
#[derive(clap::Args)]
pub struct TopicsArgs {
    /// The pipeline file (e.g. pipelines/smap.toml): channels, topics, models, settings.
    #[arg(long)]
    pub pipeline: PathBuf,
    /// Partitions per topic: how many instances can share the telemetry.
    #[arg(long, default_value_t = 3, env = "SATWATCH_PARTITIONS")]
    pub partitions: i32,
    /// Copies of each partition across brokers (at most the brokers there are).
    #[arg(long, default_value_t = 1)]
    pub replication_factor: i32,
}

/// `satwatch topics`: creates the pipeline's topics and says which were new.
pub async fn command(args: TopicsArgs) -> Result<(), KafkaToolError> {
    let pipeline = Pipeline::load(&args.pipeline)?;
    if args.partitions < 1 {
        return Err(KafkaToolError::Usage("--partitions must be >= 1".into()));
    }
    let (created, existing) = create_topics(
        &pipeline.file.kafka,
        &pipeline.all_topics(),
        args.partitions,
        args.replication_factor,
    )
    .await?;
    let list = |topics: &[String]| {
        if topics.is_empty() {
            "none".to_owned()
        } else {
            topics.join(", ")
        }
    };
    println!(
        "topics created: {}; already present: {}",
        list(&created),
        list(&existing)
    );
    Ok(())
}

/// Creates each topic that does not exist yet; returns (created, existing).
pub async fn create_topics(
    settings: &KafkaSettings,
    topics: &[String],
    partitions: i32,
    replication: i32,
) -> Result<(Vec<String>, Vec<String>), KafkaToolError> {
    let admin: AdminClient<DefaultClientContext> =
        client_config(settings).create().map_err(|e| {
            KafkaToolError::Broker(format!(
                "cannot create Kafka admin client: {}",
                crate::secrets::mask_client_error(&e, &settings.client)
            ))
        })?;
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(replication)))
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = admin.create_topics(&new, &options).await.map_err(|e| {
        KafkaToolError::Broker(format!("cannot reach Kafka at {}: {e}", settings.brokers))
    })?;
    let (mut created, mut existing) = (Vec::new(), Vec::new());
    for result in results {
        match result {
            Ok(topic) => created.push(topic),
            Err((topic, RDKafkaErrorCode::TopicAlreadyExists)) => existing.push(topic),
            Err((topic, code)) => {
                return Err(KafkaToolError::Broker(format!(
                    "cannot create topic {topic}: {code}"
                )))
            }
        }
    }
    Ok((created, existing))
}
