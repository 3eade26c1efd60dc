//! The streaming engine fed from memory instead of Kafka: what `eval` and
//! `bench` run. Everything from the window on is the code `run` uses (engine,
//! batcher, backend pool, detector); only the source and sink differ.

use std::{sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use ndarray::Array2;
use tokio::sync::mpsc;

use crate::{
    backend::Runner,
    config::Pipeline,
    engine::{Counters, Input, Outputs},
    metrics::Metrics,
    processor::{self, ProcessError},
    repository::ModelSpec,
    telemetry::{Sample, Values},
};

/// An offered load for [`stream`]: rows from `from_row` on are handed over at
/// `samples_per_s` (the rows before it, which only fill the windows, at full
/// speed), each sample stamped with the moment it is handed over, as `run`
/// stamps a record taken from Kafka; its score row carries the stamp to
/// `on_outputs`.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    pub samples_per_s: f64,
    pub from_row: usize,
}

/// Streams `inputs[i]` (rows of channel `i` of the pipeline) through the
/// engine, channels interleaved row by row as live streams arrive, and hands
/// every output batch to `on_outputs`: as fast as the engine takes them, or
/// at the offered load `pace`. Returns the engine's counters; the inference
/// metrics land in `metrics`, as they do in `run`.
pub async fn stream(
    pipeline: &Pipeline,
    specs: &[Arc<ModelSpec>],
    runners: Vec<Runner>,
    inputs: Vec<Arc<Array2<f32>>>,
    metrics: Arc<Metrics>,
    pace: Option<Pace>,
    mut on_outputs: impl FnMut(Outputs),
) -> Result<Counters, ProcessError> {
    assert_eq!(
        inputs.len(),
        pipeline.channels.len(),
        "one input per channel"
    );
    // About 4,096 samples in flight, as a row of every channel per message.
    let (samples_tx, samples_rx) = mpsc::channel((4096 / inputs.len().max(1)).max(2));
    let (outputs_tx, mut outputs_rx) = mpsc::channel::<Outputs>(64);
    let processor = processor::spawn(
        pipeline, specs, runners, samples_rx, outputs_tx, metrics, None,
    )?;
    let feeder = tokio::spawn(async move {
        let longest = inputs.iter().map(|v| v.nrows()).max().unwrap_or(0);
        let mut paced = pace.map(Paced::new);
        for row in 0..longest {
            // A row of every channel at once, as a Kafka fetch hands over
            // many records. Sized up front: a filtered collect would grow by
            // doubling, copying every sample again on each growth.
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
                        payload: None,
                    });
                }
            }
            let handed_over = match paced.as_mut().filter(|p| row >= p.pace.from_row) {
                Some(paced) => paced.hand_over(samples, &samples_tx).await,
                None => samples_tx.send(Input::Samples(samples)).await.is_ok(),
            };
            if !handed_over {
                return;
            }
        }
    });
    while let Some(outputs) = outputs_rx.recv().await {
        on_outputs(outputs);
    }
    let task_failed = |part| {
        move |e: tokio::task::JoinError| ProcessError::Task {
            part,
            message: e.to_string(),
        }
    };
    feeder.await.map_err(task_failed("feeder task"))?;
    let engine = processor.await.map_err(task_failed("processor task"))??;
    Ok(engine.counters())
}

/// The feeder's clock at an offered load: samples go out in lots of about a
/// millisecond's worth (tokio's timer granularity), each lot when it is due,
/// so a row of thousands of channels arrives spread out, not as one burst.
struct Paced {
    pace: Pace,
    /// When the first paced sample went, and how many went since.
    start: Option<tokio::time::Instant>,
    sent: u64,
    lot: usize,
}

impl Paced {
    fn new(pace: Pace) -> Self {
        Self {
            pace,
            start: None,
            sent: 0,
            lot: (pace.samples_per_s / 1000.0).ceil().max(1.0) as usize,
        }
    }

    /// Hands `samples` over lot by lot, each stamped as it goes; false once
    /// the engine is gone.
    async fn hand_over(&mut self, mut samples: Vec<Sample>, to: &mpsc::Sender<Input>) -> bool {
        let start = *self.start.get_or_insert_with(tokio::time::Instant::now);
        while !samples.is_empty() {
            let rest = samples.split_off(self.lot.min(samples.len()));
            let due = start + Duration::from_secs_f64(self.sent as f64 / self.pace.samples_per_s);
            tokio::time::sleep_until(due).await;
            let now = std::time::Instant::now();
            for sample in &mut samples {
                sample.received = Some(now);
            }
            self.sent += samples.len() as u64;
            if to.send(Input::Samples(samples)).await.is_err() {
                return false;
            }
            samples = rest;
        }
        true
    }
}
