//! Drives the [`Engine`] from async land: takes samples from a bounded
//! channel, sends due batches to the backend pool, applies completions in
//! order, and hands outputs to the sink through another bounded channel.
//!
//! Backpressure: when too many windows wait in batchers, no more samples are
//! taken, which fills the sample channel and pauses the source. When the sink
//! is slow, `outputs.send` waits, which stalls completions the same way.
//!
//! Model failures, in a live run: a batch whose inference call fails (or
//! panics) stays its model's batch in flight and is retried with backoff;
//! after [`UNAVAILABLE_AFTER`] failures in a row the model is reported
//! unavailable (readiness, its model-ready endpoint, metrics). Its channels
//! are held meanwhile: their windows wait, their records are not marked
//! done, so nothing of theirs is committed, while every other model goes on
//! (its windows have their own budget, see [`process`]). A retry that
//! succeeds, or a new version loaded (the next retry runs on it at once),
//! resumes them where they stopped. Offline, a failed call is an error.

use std::sync::Arc;

use prometheus::{IntCounter, IntCounterVec, IntGaugeVec};
use ustr::{Ustr, UstrMap};

use tokio::{
    sync::mpsc,
    time::{sleep_until, Instant as TokioInstant},
};

use crate::{
    backend::{BackendError, BackendPool, Completion},
    engine::{Admission, Engine, Input, ModelBatch, Outputs},
    health::Health,
    metrics::Metrics,
    repository::control::ModelUpdate,
    retry::Backoff,
    telemetry::{Reason, Refused, Rejection, Sample},
};

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
    #[error(transparent)]
    Engine(#[from] crate::engine::EngineError),
    #[error("the output sink stopped")]
    SinkGone,
    /// The processor's task or the in-process feeder's ended abnormally.
    #[error("{part}: {message}")]
    Task { part: &'static str, message: String },
}

impl ProcessError {
    /// The error's kind, for metric labels and log fields.
    pub fn error_type(&self) -> &'static str {
        match self {
            ProcessError::Backend(_) => "backend",
            ProcessError::Engine(_) => "engine",
            ProcessError::SinkGone => "sink_gone",
            ProcessError::Task { .. } => "task_failed",
        }
    }
}

/// What a live run (`satwatch run`) gives the processor besides its queues.
pub struct Live {
    /// Model control's new versions.
    pub updates: mpsc::Receiver<ModelUpdate>,
    /// Where models that keep failing are reported.
    pub health: Arc<Health>,
    /// Where refused records go to be dead-lettered.
    pub refused: mpsc::Sender<Refused>,
}

/// Builds the engine and the backend pool for `pipeline` and spawns
/// [`process`] on them: what `run`, `eval` and `bench` share. `live` is
/// None offline, where a failed inference call ends the run.
pub fn spawn(
    pipeline: &crate::config::Pipeline,
    specs: &[Arc<crate::repository::ModelSpec>],
    runners: Vec<crate::backend::Runner>,
    samples: mpsc::Receiver<Input>,
    outputs: mpsc::Sender<Outputs>,
    metrics: Arc<Metrics>,
    live: Option<Live>,
) -> Result<tokio::task::JoinHandle<Result<Engine, ProcessError>>, crate::engine::EngineError> {
    let engine = Engine::new(&pipeline.channels, specs, runners, pipeline.file.detect)?;
    let (completions_tx, completions_rx) = mpsc::unbounded_channel();
    let pool = BackendPool::start(pipeline.file.engine.backend_threads, completions_tx);
    let (updates, health, refused) = match live {
        Some(Live {
            updates,
            health,
            refused,
        }) => (Some(updates), Some(health), Some(refused)),
        None => (None, None, None),
    };
    let faults = ModelFaults::new(specs, &metrics, health);
    let links = Links {
        samples,
        completions: completions_rx,
        outputs,
        updates,
        refused,
    };
    Ok(tokio::spawn(process(
        engine,
        pool,
        faults,
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
    /// Where refused records are dead-lettered; None offline, where a
    /// refused sample is only counted (it has no record).
    refused: Option<mpsc::Sender<Refused>>,
}

/// Processes samples until the sample channel closes and every queued window
/// has been scored (or, in a live run, belongs to a model whose failed batch
/// waits for a retry: those records are not committed, and are processed
/// again after the restart); returns the engine for its counters.
///
/// Windows of models that are failing have a budget of their own, as large
/// as the others': while one model's channels are held, the others' windows
/// keep being taken in up to `max_pending_windows`, and intake pauses only
/// once the held windows reach that many too.
async fn process(
    mut engine: Engine,
    pool: BackendPool,
    mut faults: ModelFaults,
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
        refused,
    } = links;
    // Offline runs have no model control: a closed channel stands in.
    let mut updates = updates.unwrap_or_else(|| mpsc::channel(1).1);
    let mut updates_open = true;
    let mut counters = SubsystemCounters::new(&metrics, &labels);
    let mut input_open = true;
    let mut received = Vec::with_capacity(1024);
    let mut refusals = Vec::new();
    let result = loop {
        let now = std::time::Instant::now();
        while let Some(batch) = engine.next_batch(now) {
            pool.submit(batch);
        }
        while let Some(mut batch) = faults.due_retry(TokioInstant::from_std(now)) {
            engine.prepare_retry(&mut batch);
            pool.submit(batch);
        }
        if !input_open {
            while let Some(batch) = engine.flush_batch() {
                pool.submit(batch);
            }
            if engine.is_idle() {
                break Ok(());
            }
            if engine.is_idle_except(|model| faults.is_waiting(model)) {
                faults.give_up(&engine);
                break Ok(());
            }
        }
        let deadline = [
            engine.next_deadline().map(TokioInstant::from_std),
            faults.next_retry(),
        ]
        .into_iter()
        .flatten()
        .min();
        let held = faults
            .failing()
            .map(|m| engine.queued_for(m))
            .sum::<usize>();
        let flowing = engine.pending() - held;
        let can_take = input_open && flowing < max_pending_windows && held < max_pending_windows;
        tokio::select! {
            biased;
            Some(completion) = completions.recv() => {
                let completion = match faults.check(completion) {
                    Ok(completion) => completion,
                    Err(Some(err)) => break Err(err.into()),
                    Err(None) => continue,
                };
                let mut out = Outputs::default();
                complete(&mut engine, completion, &mut out, &metrics, &counters);
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
                let mut admitted = Admitted { counters: &mut counters, settled: &mut settled, refusals: &mut refusals, live: refused.is_some() };
                for input in received.drain(..) {
                    match input {
                        Input::Sample(mut sample) => admit(&mut engine, &mut sample, now, &mut admitted),
                        Input::Samples(mut samples) => {
                            for sample in &mut samples {
                                admit(&mut engine, sample, now, &mut admitted);
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
                if let Some(refused) = &refused {
                    for refusal in refusals.drain(..) {
                        // Gone only once the source has stopped: the record
                        // stays undone, so it is not committed and is
                        // refused (and dead-lettered) again after a restart.
                        if refused.send(refusal).await.is_err() {
                            tracing::debug!("the source stopped; a refused record is left uncommitted");
                        }
                    }
                }
            }
            update = updates.recv(), if updates_open => match update {
                Some(ModelUpdate { spec, runner, reply }) => {
                    let name = spec.name.clone();
                    let swapped = engine.swap_model(spec, runner);
                    if swapped.is_ok() {
                        // A held batch runs on the new version at once.
                        faults.retry_now(&name);
                    }
                    let _ = reply.send(swapped);
                }
                None => updates_open = false,
            },
            _ = sleep_until(deadline.unwrap_or_else(TokioInstant::now)), if deadline.is_some() => {}
        }
    };
    pool.shutdown();
    result.map(|()| engine)
}

/// Failed calls in a row after which a model is reported unavailable.
pub const UNAVAILABLE_AFTER: u32 = 3;

/// Each model's failed inference calls, as Triton keeps per-model state: the
/// batch waiting for its retry, how many calls in a row failed, and whether
/// the model is reported unavailable.
struct ModelFaults {
    /// Model names, by the engine's model index.
    names: Vec<String>,
    /// Failed calls in a row, per model; 0 while it works.
    failed_in_a_row: Vec<u32>,
    /// The batch whose call failed and when it runs again, per model.
    retries: Vec<Option<(TokioInstant, ModelBatch)>>,
    /// Where unavailable models are reported; None offline, where the
    /// first failure ends the run instead.
    health: Option<Arc<Health>>,
    failures: IntCounterVec,
    /// Windows of failed calls, per model and version (Triton's failed
    /// requests): a batch retried three times counts three times.
    failed_windows: IntCounterVec,
    available: IntGaugeVec,
}

impl ModelFaults {
    fn new(
        specs: &[Arc<crate::repository::ModelSpec>],
        metrics: &Metrics,
        health: Option<Arc<Health>>,
    ) -> Self {
        let names: Vec<String> = specs.iter().map(|s| s.name.clone()).collect();
        for name in &names {
            // Every model's series exist from the start, for alerts.
            metrics.model_failures.with_label_values(&[name]);
            metrics.model_available.with_label_values(&[name]).set(1);
        }
        Self {
            failed_in_a_row: vec![0; names.len()],
            retries: names.iter().map(|_| None).collect(),
            names,
            health,
            failures: metrics.model_failures.clone(),
            failed_windows: metrics.inference_failure.clone(),
            available: metrics.model_available.clone(),
        }
    }

    /// A completion whose call succeeded, to apply; or, for one that failed,
    /// its batch kept for a retry (`Err(None)`), or the error that ends an
    /// offline run (`Err(Some)`).
    fn check(&mut self, completion: Completion) -> Result<Completion, Option<BackendError>> {
        let model = completion.batch.model;
        let err = match completion.result {
            Ok(forecasts) => {
                self.succeeded(model);
                return Ok(Completion {
                    result: Ok(forecasts),
                    ..completion
                });
            }
            Err(err) => err,
        };
        let name = &self.names[model];
        let version = completion.batch.spec.version;
        let windows = completion.batch.entries.len();
        self.failures.with_label_values(&[name]).inc();
        self.failed_windows
            .with_label_values(&[name, &version.to_string()])
            .inc_by(windows as u64);
        let Some(health) = &self.health else {
            return Err(Some(err));
        };
        let failed = &mut self.failed_in_a_row[model];
        *failed += 1;
        let delay = Backoff::after(*failed);
        match (*failed).cmp(&UNAVAILABLE_AFTER) {
            std::cmp::Ordering::Less => tracing::warn!(
                model = %name, version, windows, failed_in_a_row = *failed,
                retry_in_ms = delay.as_millis() as u64, error = %err,
                "inference failed; retrying the batch"
            ),
            std::cmp::Ordering::Equal => {
                tracing::error!(
                    model = %name, version, failed_in_a_row = *failed, error = %err,
                    "model unavailable: its channels are held (nothing of theirs is committed) \
                     until a retry succeeds or a new version is loaded; the other models go on"
                );
                self.available.with_label_values(&[name]).set(0);
                health.set_model_unavailable(
                    name,
                    Some(format!(
                        "inference failed {} times in a row (last: {err}); its channels are held \
                         until a retry succeeds or a new version is loaded",
                        *failed
                    )),
                );
            }
            std::cmp::Ordering::Greater => tracing::debug!(
                model = %name, version, failed_in_a_row = *failed, error = %err,
                "inference failed again"
            ),
        }
        self.retries[model] = Some((TokioInstant::now() + delay, completion.batch));
        Err(None)
    }

    fn succeeded(&mut self, model: usize) {
        let failed = std::mem::take(&mut self.failed_in_a_row[model]);
        if failed == 0 {
            return;
        }
        let name = &self.names[model];
        if failed >= UNAVAILABLE_AFTER {
            tracing::info!(model = %name, failed_calls = failed, "model available again: its held channels resume");
            self.available.with_label_values(&[name]).set(1);
            if let Some(health) = &self.health {
                health.set_model_unavailable(name, None);
            }
        } else {
            tracing::info!(model = %name, failed_calls = failed, "inference succeeded on retry");
        }
    }

    /// A failed batch whose retry is due, if any.
    fn due_retry(&mut self, now: TokioInstant) -> Option<ModelBatch> {
        let slot = self
            .retries
            .iter_mut()
            .find(|r| r.as_ref().is_some_and(|(at, _)| *at <= now))?;
        slot.take().map(|(_, batch)| batch)
    }

    /// When the next retry is due.
    fn next_retry(&self) -> Option<TokioInstant> {
        self.retries.iter().flatten().map(|(at, _)| *at).min()
    }

    /// Makes model `name`'s retry due now (a new version was loaded).
    fn retry_now(&mut self, name: &str) {
        if let Some(model) = self.names.iter().position(|n| n == name) {
            if let Some((at, _)) = &mut self.retries[model] {
                *at = TokioInstant::now();
            }
        }
    }

    /// Whether model `model`'s failed batch waits for its retry.
    fn is_waiting(&self, model: usize) -> bool {
        self.retries[model].is_some()
    }

    /// Models whose last call failed: their windows are held.
    fn failing(&self) -> impl Iterator<Item = usize> + '_ {
        self.failed_in_a_row
            .iter()
            .enumerate()
            .filter(|(_, &n)| n > 0)
            .map(|(model, _)| model)
    }

    /// Stops retrying, at shutdown: the held records were never marked done,
    /// so they are not committed and are processed again after the restart.
    fn give_up(&mut self, engine: &Engine) {
        for (model, retry) in self.retries.iter_mut().enumerate() {
            if let Some((_, batch)) = retry.take() {
                tracing::warn!(
                    model = %self.names[model],
                    windows = batch.entries.len() + engine.queued_for(model),
                    "stopping with the model's windows held: their records are not committed \
                     and are processed again after the restart"
                );
            }
        }
    }
}

/// Where [`admit`] puts what is settled at once.
struct Admitted<'a> {
    counters: &'a mut SubsystemCounters,
    /// Records done at once (warm-up and refill samples, offline duplicates).
    settled: &'a mut Outputs,
    /// Duplicates to dead-letter, in a live run.
    refusals: &'a mut Vec<Refused>,
    live: bool,
}

/// Takes one sample into the engine; what is settled at once (a warm-up or
/// refill sample, a duplicate) goes to `admitted`.
fn admit(
    engine: &mut Engine,
    sample: &mut Sample,
    now: std::time::Instant,
    admitted: &mut Admitted,
) {
    let counters = &mut *admitted.counters;
    let channel = sample.channel as usize;
    counters.count_consumed(channel);
    let before = engine.counters().gaps;
    let admission = engine.admit(sample, now);
    if engine.counters().gaps != before {
        counters.gap[counters.subsystem_of[channel]].inc();
    }
    match admission {
        Admission::Queued => return,
        Admission::Duplicate { last } => {
            counters.duplicate[counters.subsystem_of[channel]].inc();
            // Never lost without a dead letter: a live run's record goes
            // back to the source, and is done once its dead letter is.
            if let (true, Some(origin), Some(payload)) =
                (admitted.live, sample.origin, sample.payload.take())
            {
                let key = engine.channel_id(sample.channel);
                admitted.refusals.push(Refused {
                    origin,
                    key,
                    payload,
                    rejection: Rejection {
                        reason: Reason::DuplicateSeq,
                        detail: format!(
                            "seq {} of channel \"{key}\" is not above the channel's last seq {last}: \
                             a seq names one sample, taken in already (a record sent again) or \
                             passed (a producer that restarted its numbering); see \
                             docs/contract.md, Order within a channel",
                            sample.seq
                        ),
                    },
                });
                return;
            }
        }
        Admission::WarmUp => admitted
            .settled
            .checkpoints
            .extend(engine.warm_up_checkpoint(sample.channel)),
        Admission::Refill => {}
    }
    // Nothing more will come of it: it is done now.
    admitted.settled.done.extend(sample.origin);
}

/// Applies a completion whose call succeeded ([`ModelFaults::check`] took
/// the failed ones): counts it and hands what it produced to `out`.
fn complete(
    engine: &mut Engine,
    completion: Completion,
    out: &mut Outputs,
    metrics: &Metrics,
    counters: &SubsystemCounters,
) {
    // The version the batch ran, which a swap may have superseded since.
    let spec = completion.batch.spec.clone();
    let version = spec.version.to_string();
    let model_labels = [spec.name.as_str(), version.as_str()];
    let rows = completion.batch.entries.len() as u64;
    let forecasts = completion
        .result
        .expect("ModelFaults::check passes on successful calls only");
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
}

#[cfg(test)]
mod tests {
    //! A backend that fails for a while and then recovers: a fault no real
    //! backend can be made to show on demand (a model file fails on an input
    //! every time; `tests/model_failure.rs` runs that one end to end).

    use std::{
        collections::BTreeMap,
        path::PathBuf,
        sync::atomic::{AtomicU32, Ordering},
        time::Duration,
    };

    use super::*;
    use crate::{
        backend::Backend,
        config::ChannelConfig,
        detect::DetectSettings,
        repository::{BatchPolicy, DeviceKind, ErrorCalibration, ModelSpec, Normalisation},
        telemetry::{Origin, Values},
    };

    fn spec(name: &str) -> Arc<ModelSpec> {
        Arc::new(ModelSpec {
            name: name.into(),
            version: 1,
            config_path: PathBuf::from("m/config.pbtxt"),
            model_path: PathBuf::from("m/1/model.onnx"),
            device: DeviceKind::Cpu,
            instance_count: 1,
            batching: BatchPolicy {
                max_batch_size: 4,
                preferred_batch_sizes: vec![2],
                max_queue_delay: Duration::ZERO,
            },
            input_name: "window".into(),
            output_name: "forecast".into(),
            window: 2,
            features: 1,
            horizon: 1,
            target_feature: 0,
            normalisation: Normalisation {
                center: vec![0.0],
                scale: vec![1.0],
            },
            calibration: ErrorCalibration {
                mean: 0.0,
                std: 1.0,
                train_drift: 0.0,
            },
            input_dims_line: None,
            parameters: BTreeMap::new(),
        })
    }

    fn channel(id: &str, model: &str) -> ChannelConfig {
        ChannelConfig {
            id: id.into(),
            subsystem: "xs".into(),
            topic: "telemetry.xs".into(),
            model: model.into(),
        }
    }

    /// Model 0 fails (or panics) on its first `failures` calls, then
    /// answers each window with its last value; model 1 always answers.
    struct Flaky {
        failures: AtomicU32,
        panics: bool,
    }

    impl Backend for Flaky {
        fn infer(
            &self,
            model: usize,
            inputs: &[f32],
            rows: usize,
        ) -> Result<Vec<f32>, BackendError> {
            let failing = model == 0
                && self
                    .failures
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok();
            if failing && self.panics {
                panic!("a bug in the backend");
            }
            if failing {
                return Err(BackendError::Inference {
                    model: "bad".into(),
                    reason: "injected".into(),
                });
            }
            let per_row = inputs.len() / rows;
            Ok(inputs.chunks(per_row).map(|w| w[per_row - 1]).collect())
        }
    }

    /// Channel 0 ("X-1", model "bad") and channel 1 ("Y-1", model "good"),
    /// `n` samples each, offsets = seq on partitions 0 and 1. The input
    /// closes (as at shutdown) once `finished` holds for the outputs so far.
    async fn run(
        backend: Flaky,
        n: u64,
        health: Option<Arc<Health>>,
        during: impl FnOnce(&Metrics) + Send + 'static,
        finished: impl Fn(&[Outputs]) -> bool,
    ) -> (Result<Engine, ProcessError>, Vec<Outputs>, Arc<Metrics>) {
        let specs = [spec("bad"), spec("good")];
        let channels = [channel("X-1", "bad"), channel("Y-1", "good")];
        let runners = crate::backend::Runner::all_on(Arc::new(backend), specs.len());
        let engine = Engine::new(&channels, &specs, runners, DetectSettings::default()).unwrap();
        let metrics = Arc::new(Metrics::new());
        let (completions_tx, completions_rx) = mpsc::unbounded_channel();
        let pool = BackendPool::start(1, completions_tx);
        let faults = ModelFaults::new(&specs, &metrics, health);
        let (samples_tx, samples_rx) = mpsc::channel(16);
        let (outputs_tx, mut outputs_rx) = mpsc::channel(16);
        let links = Links {
            samples: samples_rx,
            completions: completions_rx,
            outputs: outputs_tx,
            updates: None,
            refused: None,
        };
        let labels = ChannelLabels::new(&channels);
        let task = tokio::spawn(process(
            engine,
            pool,
            faults,
            links,
            1024,
            metrics.clone(),
            labels,
        ));
        let (close_tx, close_rx) = tokio::sync::oneshot::channel::<()>();
        let feeder = tokio::spawn(async move {
            for seq in 0..n {
                for channel in 0..2 {
                    let sample = Sample {
                        channel,
                        seq,
                        ts: chrono::Utc::now(),
                        values: Values::from_slice(&[seq as f32]),
                        origin: Some(Origin {
                            partition: channel,
                            generation: 1,
                            offset: seq as i64,
                        }),
                        received: None,
                        payload: None,
                    };
                    if samples_tx.send(Input::Sample(sample)).await.is_err() {
                        return;
                    }
                }
            }
            let _ = tokio::time::timeout(Duration::from_secs(20), close_rx).await;
        });
        let watcher = {
            let metrics = metrics.clone();
            tokio::task::spawn_blocking(move || during(&metrics))
        };
        let mut outputs = Vec::new();
        let mut close = Some(close_tx);
        while let Some(out) = outputs_rx.recv().await {
            outputs.push(out);
            if let Some(close) = close.take_if(|_| finished(&outputs)) {
                let _ = close.send(());
            }
        }
        drop(close);
        feeder.await.unwrap();
        watcher.await.unwrap();
        (task.await.unwrap(), outputs, metrics)
    }

    /// Every offset marked done for `partition`, in order of marking.
    fn done(outputs: &[Outputs], partition: u32) -> Vec<i64> {
        outputs
            .iter()
            .flat_map(|o| &o.done)
            .filter(|o| o.partition == partition)
            .map(|o| o.offset)
            .collect()
    }

    /// The seqs of `channel`'s forecasts, in order of output.
    fn forecast_seqs(outputs: &[Outputs], channel: &str) -> Vec<u64> {
        outputs
            .iter()
            .flat_map(|o| &o.forecasts)
            .filter(|f| f.channel == channel)
            .map(|f| f.seq)
            .collect()
    }

    fn available(metrics: &Metrics, model: &str) -> i64 {
        metrics.model_available.with_label_values(&[model]).get()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_model_that_fails_for_a_while_is_held_then_resumes_with_nothing_lost_or_doubled() {
        let health = Arc::new(Health::default());
        let seen_unavailable = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (watch_health, seen) = (health.clone(), seen_unavailable.clone());
        let (result, outputs, metrics) = run(
            Flaky {
                failures: AtomicU32::new(UNAVAILABLE_AFTER + 1),
                panics: false,
            },
            40,
            Some(health.clone()),
            move |metrics| {
                let deadline = std::time::Instant::now() + Duration::from_secs(10);
                while std::time::Instant::now() < deadline {
                    if watch_health.model_unavailable("bad").is_some() {
                        assert_eq!(metrics.model_available.with_label_values(&["bad"]).get(), 0);
                        assert_eq!(
                            metrics.model_available.with_label_values(&["good"]).get(),
                            1
                        );
                        let reasons = watch_health.readiness().unwrap_err();
                        assert!(
                            reasons
                                .iter()
                                .any(|r| r.contains("model bad is unavailable")),
                            "{reasons:?}"
                        );
                        seen.store(true, Ordering::SeqCst);
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
            },
            |outputs| forecast_seqs(outputs, "X-1").len() == 39,
        )
        .await;
        result.expect("a failing model does not end the run");
        assert!(
            seen_unavailable.load(Ordering::SeqCst),
            "reported unavailable while failing"
        );
        assert_eq!(health.model_unavailable("bad"), None, "available again");
        assert_eq!(available(&metrics, "bad"), 1);
        assert_eq!(
            metrics.model_failures.with_label_values(&["bad"]).get(),
            u64::from(UNAVAILABLE_AFTER + 1)
        );
        assert_eq!(metrics.model_failures.with_label_values(&["good"]).get(), 0);
        // Every record once, each channel's forecasts once per window in seq order.
        for partition in 0..2 {
            let mut offsets = done(&outputs, partition);
            offsets.sort();
            assert_eq!(
                offsets,
                (0..40).collect::<Vec<_>>(),
                "partition {partition}"
            );
        }
        for channel in ["X-1", "Y-1"] {
            let seqs = forecast_seqs(&outputs, channel);
            assert_eq!(seqs, (1..40).collect::<Vec<_>>(), "{channel}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panic_in_the_backend_is_that_models_failed_call() {
        let (result, outputs, metrics) = run(
            Flaky {
                failures: AtomicU32::new(1),
                panics: true,
            },
            10,
            Some(Arc::new(Health::default())),
            |_| {},
            |outputs| forecast_seqs(outputs, "X-1").len() == 9,
        )
        .await;
        result.expect("a panicking backend does not end the run");
        assert_eq!(metrics.model_failures.with_label_values(&["bad"]).get(), 1);
        let forecasts = outputs.iter().map(|o| o.forecasts.len()).sum::<usize>();
        assert_eq!(forecasts, 2 * 9, "both channels complete");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn offline_a_failed_call_ends_the_run() {
        let (result, _, _) = run(
            Flaky {
                failures: AtomicU32::new(1),
                panics: false,
            },
            10,
            None,
            |_| {},
            |_| false,
        )
        .await;
        assert!(
            matches!(result, Err(ProcessError::Backend(_))),
            "{:?}",
            result.err()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn at_shutdown_a_held_models_records_are_left_undone_and_the_others_finish() {
        let (result, outputs, metrics) = run(
            Flaky {
                failures: AtomicU32::new(u32::MAX),
                panics: false,
            },
            20,
            Some(Arc::new(Health::default())),
            |_| {},
            |outputs| forecast_seqs(outputs, "Y-1").len() == 19,
        )
        .await;
        result.expect("a shutdown with a held model is a clean one");
        assert!(metrics.model_failures.with_label_values(&["bad"]).get() >= 1);
        assert_eq!(forecast_seqs(&outputs, "X-1"), Vec::<u64>::new());
        assert_eq!(
            done(&outputs, 0),
            [0],
            "only X-1's warm-up sample is done: the rest is processed again after a restart"
        );
        assert_eq!(done(&outputs, 1).len(), 20, "Y-1 is done to its end");
    }
}
