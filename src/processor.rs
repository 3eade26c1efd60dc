//! Drives the [`Engine`] from async land: takes samples from a bounded
//! channel, sends due batches to the backend pool, applies completions in
//! order, and hands outputs to the sink through another bounded channel.
//!
//! Backpressure: when too many windows wait in batchers, no more samples are
//! taken, which fills the sample channel and pauses the source. When the sink
//! is slow, `outputs.send` waits, which stalls completions the same way.

use std::sync::Arc;

use prometheus::IntCounter;
use ustr::{Ustr, UstrMap};

use tokio::{
    sync::mpsc,
    time::{sleep_until, Instant as TokioInstant},
};

use crate::{
    backend::{BackendError, BackendPool, Completion},
    engine::{Admission, Engine, Outputs, Restore},
    metrics::Metrics,
    repository::control::ModelUpdate,
    telemetry::Sample,
};

/// What the source hands the processor, in order.
#[derive(Debug)]
pub enum Input {
    Sample(Sample),
    /// Samples in order, handed over at once (the in-process feeder sends a
    /// row of every channel): one hand-off instead of one per sample.
    Samples(Vec<Sample>),
    /// A partition was assigned; its records follow.
    Restore(Restore),
}

/// Per-channel label values for metrics, indexed like the engine's channels.
pub struct ChannelLabels {
    pub subsystem: Vec<String>,
}

impl ChannelLabels {
    pub fn new(channels: &[crate::config::ChannelConfig]) -> Self {
        Self {
            subsystem: channels.iter().map(|c| c.subsystem.clone()).collect(),
        }
    }
}

/// Per-subsystem counters resolved once: a labelled lookup hashes the label
/// values under a lock, too slow to do per sample. Consumed samples are
/// tallied while a lot of inputs is taken in and added once per lot: an
/// atomic add per sample stalled the engine's thread (it waits for the
/// thread's pending stores), about 1 % of the pipeline's CPU.
struct SubsystemCounters {
    /// Each channel's subsystem, as an index into the vectors below.
    subsystem_of: Vec<usize>,
    consumed: Vec<IntCounter>,
    duplicate: Vec<IntCounter>,
    gap: Vec<IntCounter>,
    scored: UstrMap<IntCounter>,
    /// Consumed samples per subsystem not yet added to `consumed`.
    consumed_tally: Vec<u64>,
}

impl SubsystemCounters {
    fn new(metrics: &Metrics, labels: &ChannelLabels) -> Self {
        let mut subsystems: Vec<&str> = Vec::new();
        let subsystem_of = labels
            .subsystem
            .iter()
            .map(|s| match subsystems.iter().position(|known| known == s) {
                Some(index) => index,
                None => {
                    subsystems.push(s);
                    subsystems.len() - 1
                }
            })
            .collect();
        let per_subsystem = |vec: &prometheus::IntCounterVec| {
            subsystems
                .iter()
                .map(|s| vec.with_label_values(&[s]))
                .collect::<Vec<_>>()
        };
        Self {
            subsystem_of,
            consumed: per_subsystem(&metrics.samples_consumed),
            duplicate: per_subsystem(&metrics.samples_duplicate),
            gap: per_subsystem(&metrics.samples_gap),
            scored: subsystems
                .iter()
                .map(|s| {
                    (
                        Ustr::from(s),
                        metrics.samples_scored.with_label_values(&[s]),
                    )
                })
                .collect(),
            consumed_tally: vec![0; subsystems.len()],
        }
    }

    fn count_consumed(&mut self, channel: usize) {
        self.consumed_tally[self.subsystem_of[channel]] += 1;
    }

    /// Adds the tallied consumed samples to their counters.
    fn flush(&mut self) {
        for (counter, tally) in self.consumed.iter().zip(&mut self.consumed_tally) {
            if *tally > 0 {
                counter.inc_by(std::mem::take(tally));
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("the output sink stopped")]
    SinkGone,
}

/// Builds the engine and the backend pool for `pipeline` and spawns
/// [`process`] on them: what `run`, `eval` and `bench` share.
pub fn spawn(
    pipeline: &crate::config::Pipeline,
    specs: &[Arc<crate::repository::ModelSpec>],
    backend: Arc<dyn crate::backend::Backend>,
    samples: mpsc::Receiver<Input>,
    outputs: mpsc::Sender<Outputs>,
    metrics: Arc<Metrics>,
    updates: Option<mpsc::Receiver<ModelUpdate>>,
) -> Result<tokio::task::JoinHandle<Result<Engine, ProcessError>>, String> {
    let engine = Engine::new(&pipeline.channels, specs, pipeline.file.detect)?;
    let (completions_tx, completions_rx) = mpsc::unbounded_channel();
    let pool = BackendPool::start(
        backend,
        pipeline.file.engine.backend_threads,
        completions_tx,
    );
    let links = Links {
        samples,
        completions: completions_rx,
        outputs,
        updates,
    };
    Ok(tokio::spawn(process(
        engine,
        pool,
        links,
        pipeline.file.engine.max_pending_windows,
        metrics,
        ChannelLabels::new(&pipeline.channels),
    )))
}

/// The engine's task's queues: what comes in and what goes out.
struct Links {
    samples: mpsc::Receiver<Input>,
    /// Finished backend calls, from the pool's threads.
    completions: mpsc::UnboundedReceiver<Completion>,
    outputs: mpsc::Sender<Outputs>,
    /// Model control's updates; None offline.
    updates: Option<mpsc::Receiver<ModelUpdate>>,
}

/// Processes samples until the sample channel closes and every queued window
/// has been scored; returns the engine for its counters.
async fn process(
    mut engine: Engine,
    pool: BackendPool,
    links: Links,
    max_pending_windows: usize,
    metrics: Arc<Metrics>,
    labels: ChannelLabels,
) -> Result<Engine, ProcessError> {
    let Links {
        mut samples,
        mut completions,
        outputs,
        updates,
    } = links;
    // Offline runs have no model control: a closed channel stands in.
    let mut updates = updates.unwrap_or_else(|| mpsc::channel(1).1);
    let mut updates_open = true;
    let mut counters = SubsystemCounters::new(&metrics, &labels);
    let mut input_open = true;
    let mut received = Vec::with_capacity(1024);
    let result = loop {
        let now = std::time::Instant::now();
        while let Some(batch) = engine.next_batch(now) {
            pool.submit(batch);
        }
        if !input_open {
            while let Some(batch) = engine.flush_batch() {
                pool.submit(batch);
            }
            if engine.is_idle() {
                break Ok(());
            }
        }
        let deadline = engine.next_deadline().map(TokioInstant::from_std);
        let can_take = input_open && engine.pending() < max_pending_windows;
        tokio::select! {
            biased;
            Some(completion) = completions.recv() => {
                let mut out = Outputs::default();
                if let Err(err) = complete(&mut engine, completion, &mut out, &metrics, &counters) {
                    break Err(err);
                }
                metrics.anomalies_open.set(engine.open_events() as i64);
                if outputs.send(out).await.is_err() {
                    break Err(ProcessError::SinkGone);
                }
            }
            n = samples.recv_many(&mut received, 1024), if can_take => {
                if n == 0 {
                    input_open = false;
                    continue;
                }
                let now = std::time::Instant::now();
                let mut settled = Outputs::default();
                for input in received.drain(..) {
                    match input {
                        Input::Sample(sample) => admit(&mut engine, &sample, now, &mut counters, &mut settled),
                        Input::Samples(samples) => {
                            for sample in &samples {
                                admit(&mut engine, sample, now, &mut counters, &mut settled);
                            }
                        }
                        Input::Restore(restore) => {
                            tracing::debug!(partition = restore.partition, checkpoints = restore.checkpoints.len(), "channels restored");
                            engine.restore(restore);
                        }
                    }
                }
                counters.flush();
                if !settled.done.is_empty() && outputs.send(settled).await.is_err() {
                    break Err(ProcessError::SinkGone);
                }
            }
            update = updates.recv(), if updates_open => match update {
                Some(ModelUpdate { spec, runner, reply }) => {
                    let _ = reply.send(engine.swap_model(spec, runner));
                }
                None => updates_open = false,
            },
            _ = sleep_until(deadline.unwrap_or_else(TokioInstant::now)), if deadline.is_some() => {}
        }
    };
    pool.shutdown();
    result.map(|()| engine)
}

/// Takes one sample into the engine; what is settled at once (a duplicate, a
/// warm-up or refill sample) goes to `settled`.
fn admit(
    engine: &mut Engine,
    sample: &Sample,
    now: std::time::Instant,
    counters: &mut SubsystemCounters,
    settled: &mut Outputs,
) {
    let channel = sample.channel as usize;
    counters.count_consumed(channel);
    let before = engine.counters().gaps;
    let admission = engine.admit(sample, now);
    if engine.counters().gaps != before {
        counters.gap[counters.subsystem_of[channel]].inc();
    }
    match admission {
        Admission::Queued => {}
        Admission::Duplicate | Admission::WarmUp | Admission::Refill => {
            match admission {
                Admission::Duplicate => counters.duplicate[counters.subsystem_of[channel]].inc(),
                Admission::WarmUp => settled
                    .checkpoints
                    .extend(engine.warm_up_checkpoint(sample.channel)),
                _ => {}
            }
            // Nothing more will come of it: it is done now.
            settled.done.extend(sample.origin);
        }
    }
}

fn complete(
    engine: &mut Engine,
    completion: Completion,
    out: &mut Outputs,
    metrics: &Metrics,
    counters: &SubsystemCounters,
) -> Result<(), ProcessError> {
    // The version the batch ran, which a swap may have superseded since.
    let spec = completion.batch.spec.clone();
    let version = spec.version.to_string();
    let model_labels = [spec.name.as_str(), version.as_str()];
    let rows = completion.batch.entries.len() as u64;
    let forecasts = match completion.result {
        Ok(forecasts) => forecasts,
        Err(err) => {
            metrics
                .inference_failure
                .with_label_values(&model_labels)
                .inc_by(rows);
            return Err(err.into());
        }
    };
    metrics
        .inference_success
        .with_label_values(&model_labels)
        .inc_by(rows);
    metrics
        .inference_count
        .with_label_values(&model_labels)
        .inc_by(rows);
    metrics
        .execution_count
        .with_label_values(&model_labels)
        .inc();
    metrics
        .batch_size
        .with_label_values(&model_labels)
        .observe(rows as f64);
    metrics
        .queue_duration_us
        .with_label_values(&model_labels)
        .inc_by(completion.queue_time.as_micros() as u64);
    metrics
        .input_duration_us
        .with_label_values(&model_labels)
        .inc_by(completion.input_time.as_micros() as u64);
    metrics
        .compute_duration_us
        .with_label_values(&model_labels)
        .inc_by(completion.compute_time.as_micros() as u64);
    let first_score = out.scores.len();
    let first_event = out.events.len();
    engine.complete(completion.batch, &forecasts, out);
    // Rows of one batch mostly share a subsystem: count runs, not rows.
    let mut rows = out.scores[first_score..].iter().peekable();
    while let Some(row) = rows.next() {
        let mut run = 1;
        while rows
            .next_if(|next| next.subsystem == row.subsystem)
            .is_some()
        {
            run += 1;
        }
        if let Some(counter) = counters.scored.get(&row.subsystem) {
            counter.inc_by(run);
        }
    }
    for event in &out.events[first_event..] {
        metrics
            .events
            .with_label_values(&[&event.subsystem, event.state.as_str()])
            .inc();
    }
    Ok(())
}
