//! The streaming engine fed from memory instead of Kafka: what `eval` and
//! `bench` run. Everything from the window on is the code `run` uses (engine,
//! batcher, backend pool, detector); only the source and sink differ.

use std::{sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use ndarray::Array2;
use tokio::sync::mpsc;

use crate::{
    backend::Backend,
    config::Pipeline,
    engine::{Counters, Outputs},
    metrics::Metrics,
    processor::{self, Input},
    repository::ModelSpec,
    telemetry::{Sample, Values},
};

/// Streams `inputs[i]` (rows of channel `i` of the pipeline) through the
/// engine, channels interleaved row by row as live streams arrive, and hands
/// every output batch to `on_outputs`. Returns the engine's counters; the
/// inference metrics land in `metrics`, as they do in `run`.
pub async fn stream(
    pipeline: &Pipeline,
    specs: &[Arc<ModelSpec>],
    backend: Arc<dyn Backend>,
    inputs: Vec<Arc<Array2<f32>>>,
    metrics: Arc<Metrics>,
    mut on_outputs: impl FnMut(Outputs),
) -> Result<Counters, String> {
    assert_eq!(
        inputs.len(),
        pipeline.channels.len(),
        "one input per channel"
    );
    // About 4,096 samples in flight, as a row of every channel per message.
    let (samples_tx, samples_rx) = mpsc::channel((4096 / inputs.len().max(1)).max(2));
    let (outputs_tx, mut outputs_rx) = mpsc::channel::<Outputs>(64);
    let processor = processor::spawn(
        pipeline, specs, backend, samples_rx, outputs_tx, metrics, None,
    )?;
    let feeder = tokio::spawn(async move {
        let longest = inputs.iter().map(|v| v.nrows()).max().unwrap_or(0);
        for row in 0..longest {
            // A row of every channel at once, as a Kafka fetch hands over
            // many records.
            // Sized up front: a filtered collect would grow by doubling,
            // copying every sample again on each growth.
            let mut samples = Vec::with_capacity(inputs.len());
            let ts = DateTime::<Utc>::UNIX_EPOCH + Duration::from_secs(row as u64);
            for (channel, values) in inputs.iter().enumerate() {
                if row < values.nrows() {
                    samples.push(Sample {
                        channel: channel as u32,
                        seq: row as u64,
                        ts,
                        values: Values::from_slice(
                            values.row(row).as_slice().expect("standard layout"),
                        ),
                        origin: None,
                        received: None,
                    });
                }
            }
            if samples_tx.send(Input::Samples(samples)).await.is_err() {
                return;
            }
        }
    });
    while let Some(outputs) = outputs_rx.recv().await {
        on_outputs(outputs);
    }
    feeder.await.map_err(|e| format!("feeder task: {e}"))?;
    let engine = processor
        .await
        .map_err(|e| format!("processor task: {e}"))?
        .map_err(|e| e.to_string())?;
    Ok(engine.counters())
}
