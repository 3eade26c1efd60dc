//! The pure core of the pipeline: per-channel windows and detectors, per-model
//! batchers. No I/O and no clock of its own: the driver feeds samples and
//! inference results in and takes batches and outputs out, so `run`, `eval`
//! and `bench` share every line of it.

use std::{collections::VecDeque, sync::Arc, time::Instant};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use ustr::Ustr;

pub use crate::backend::Runner;
use crate::{
    batch::{BatchInputs, Batcher},
    config::ChannelConfig,
    detect::{Cause, ChannelDetector, DetectSettings, DetectorState, EventChange, EventSpan},
    repository::ModelSpec,
    telemetry::{Origin, Sample},
    window::Window,
};

/// Why the engine cannot serve a pipeline's channels or a new model version.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EngineError {
    #[error("channel {channel} names model {model}, which is not loaded")]
    UnknownModel { channel: String, model: String },
    #[error("model {0} serves no channel of this pipeline")]
    NotServed(String),
    /// (window, features, horizon, target feature) of the served version and
    /// of the new one.
    #[error(
        "version {version} of {model} changes the window, features, horizon or target feature \
         (from {from:?} to {to:?}); a live swap needs the same shapes"
    )]
    ShapeChange {
        model: String,
        version: u64,
        from: (usize, usize, usize, usize),
        to: (usize, usize, usize, usize),
    },
}

impl EngineError {
    /// The error's kind, for metric labels and log fields.
    pub fn error_type(&self) -> &'static str {
        match self {
            EngineError::UnknownModel { .. } => "unknown_model",
            EngineError::NotServed(_) => "not_served",
            EngineError::ShapeChange { .. } => "shape_change",
        }
    }
}

/// One queued window's bookkeeping.
#[derive(Debug, Clone)]
pub struct Entry {
    pub channel: u32,
    pub seq: u64,
    /// The number of the window's newest row in its channel's [`Window`].
    pub row: u64,
    pub ts: DateTime<Utc>,
    /// The sample's target value in the input's units.
    pub value: f32,
    pub origin: Option<Origin>,
    /// Kafka offset of the oldest sample in this window: where a restored
    /// channel starts refilling it; and where the channel's numbering stood
    /// before that sample.
    pub window_start: Option<(i64, SeqOrder)>,
    /// The channel's restore generation when the window was queued; a
    /// restore in between makes the entry stale.
    pub epoch: u32,
    pub received: Option<Instant>,
}

/// A batch of windows for one model, ready for a backend.
#[derive(Debug)]
pub struct ModelBatch {
    /// The engine's index of the model, where the batch's results go back.
    pub model: usize,
    /// The version the batch was cut for: its outputs carry this version,
    /// even if a newer one is swapped in while it runs.
    pub spec: Arc<ModelSpec>,
    /// Where that version runs.
    pub runner: Runner,
    /// The windows, one per entry, in the entries' order.
    pub inputs: BatchInputs,
    pub entries: Vec<Entry>,
    pub oldest_enqueued: Instant,
}

/// A `scores` row.
///
/// Output rows name channels, subsystems and models with interned strings
/// ([`Ustr`]): making a row copies a pointer, where cloning and dropping an
/// `Arc<str>` were atomic operations on the engine's and the sink's threads.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoreRow {
    pub channel: Ustr,
    /// Not a column: carried for per-subsystem metrics.
    pub subsystem: Ustr,
    pub seq: u64,
    pub ts: DateTime<Utc>,
    pub score: f32,
    pub threshold: f32,
    pub anomalous: bool,
    pub model_version: u64,
    /// Not a column: when the sample was taken from Kafka, for the latency
    /// of satwatch's own share.
    pub received: Option<Instant>,
}

/// A forecast's values, inline up to 16 steps (the shipped models forecast
/// 10): one forecast per sample is made, so it allocates nothing.
pub type Horizon = smallvec::SmallVec<[f32; 16]>;

/// A forecast (CONTRACT "Forecast"), also a `forecasts` row.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Forecast {
    pub channel: Ustr,
    /// Not a field of the record: the sample's Kafka record, which the
    /// forecast is published with (in the transaction that commits it).
    #[serde(skip)]
    pub origin: Option<Origin>,
    pub seq: u64,
    /// `horizon[i]` forecasts the value at `seq + 1 + i`, in the input's units.
    pub horizon: Horizon,
    pub model: Ustr,
    pub model_version: u64,
}

/// An anomaly event record (CONTRACT "Anomaly event").
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AnomalyEvent {
    /// Not a field of the record: the Kafka record of the sample that
    /// opened or closed the event, which it is published with.
    #[serde(skip)]
    pub origin: Option<Origin>,
    pub event_id: String,
    pub channel: Ustr,
    pub subsystem: Ustr,
    pub state: EventState,
    pub start_seq: u64,
    pub end_seq: Option<u64>,
    pub start_ts: DateTime<Utc>,
    pub end_ts: Option<DateTime<Utc>>,
    pub peak_score: f32,
    pub threshold: f32,
    /// The score part that opened the event; null only for an event opened
    /// before causes were recorded.
    pub cause: Option<Cause>,
    pub model: Ustr,
    pub model_version: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EventState {
    Open,
    Closed,
}

impl EventState {
    pub fn as_str(self) -> &'static str {
        match self {
            EventState::Open => "open",
            EventState::Closed => "closed",
        }
    }
}

/// Where a channel resumes after a crash, restart or rebalance: its detector
/// state after its sample `last_seq`, and the Kafka offset its window refills
/// from. Written once the outputs up to `last_seq` are durable, so samples up
/// to `last_seq` are never scored twice, and later ones are scored exactly as
/// if nothing had happened (same window, same detector state).
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    pub channel: Ustr,
    /// The partition the channel's samples come from ([`Origin::partition`]).
    pub partition: u32,
    pub last_seq: u64,
    /// Offset of the oldest sample in the window that ends at `last_seq`.
    pub refill_from: i64,
    pub state: SavedState,
    /// The record of `last_seq` (None for a checkpoint read back from
    /// PostgreSQL): the sink writes the checkpoint only once that record's
    /// offset is committed, so a checkpoint never covers a sample whose
    /// outputs could still be lost.
    pub last_origin: Option<Origin>,
}

/// What a checkpoint stores as JSON (`channel_checkpoints.detector`): the
/// channel's detector state, and where its numbering stood before the
/// sample at `refill_from`, so that a restore decides which refilled
/// samples were duplicates exactly as the first run did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SavedState {
    #[serde(flatten)]
    pub detector: DetectorState,
    /// Absent from checkpoints written before it was kept: the numbering
    /// starts at the first refilled sample.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order: Option<SeqOrder>,
}

/// What the processor is fed, in order: by the Kafka consumer in `satwatch
/// run`, from memory in `eval` and `bench`.
#[derive(Debug)]
pub enum Input {
    Sample(Sample),
    /// Samples in order, handed over at once (the in-process feeder sends a
    /// row of every channel): one hand-off instead of one per sample.
    Samples(Vec<Sample>),
    /// A partition was assigned; its records follow.
    Restore(Restore),
}

/// A partition was assigned: the channels it carries start over from their
/// checkpoints. Sent ahead of the partition's first record.
#[derive(Debug, Clone)]
pub struct Restore {
    pub partition: u32,
    /// The group's committed offset: records below it had durable effects
    /// before, so a channel with no checkpoint only refills from them.
    pub committed: Option<i64>,
    pub checkpoints: Vec<Checkpoint>,
}

/// What processing some records produced, and which records are then fully
/// accounted for once these outputs are durable.
#[derive(Debug, Default)]
pub struct Outputs {
    pub scores: Vec<ScoreRow>,
    pub forecasts: Vec<Forecast>,
    pub events: Vec<AnomalyEvent>,
    /// To be written after everything above (and before the acks).
    pub checkpoints: Vec<Checkpoint>,
    pub done: Vec<Origin>,
}

impl Outputs {
    pub fn is_empty(&self) -> bool {
        self.scores.is_empty()
            && self.forecasts.is_empty()
            && self.events.is_empty()
            && self.checkpoints.is_empty()
            && self.done.is_empty()
    }

    pub fn append(&mut self, other: &mut Outputs) {
        self.scores.append(&mut other.scores);
        self.forecasts.append(&mut other.forecasts);
        self.events.append(&mut other.events);
        self.checkpoints.append(&mut other.checkpoints);
        self.done.append(&mut other.done);
    }
}

/// How a sample was taken in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// `seq` names a sample already taken in, or one the channel's numbering
    /// has passed (see [`SeqOrder`]): not taken in. `last` is the channel's
    /// last seq, for the dead letter's detail.
    Duplicate { last: u64 },
    /// Still filling the channel's window: nothing to infer yet.
    WarmUp,
    /// Its window was queued for inference.
    Queued,
    /// Already scored before a restore: it only refills the window.
    Refill,
}

/// Running totals, for metrics and summaries.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    pub admitted: u64,
    pub duplicates: u64,
    /// Samples that arrived after a jump in `seq`.
    pub gaps: u64,
    /// Samples that took a channel back into the seqs its last jump skipped
    /// (see [`SeqOrder`]).
    pub returns: u64,
    pub warm_up: u64,
    /// Samples that only refilled a restored channel's window.
    pub refilled: u64,
    pub scored: u64,
    pub events_opened: u64,
    pub events_closed: u64,
    /// Forecast steps a model returned that were not finite, or lay beyond
    /// ±[`crate::telemetry::MAX_ABS_VALUE`] once denormalised, replaced
    /// before publishing (see [`crate::detect::finite_forecast`]).
    pub replaced_forecast_steps: u64,
}

struct ChannelState {
    id: Ustr,
    subsystem: Ustr,
    model: usize,
    window: Window,
    /// Kafka offsets of the samples in `window`, oldest first (empty
    /// offline), each with where the channel's numbering stood before it.
    offsets: VecDeque<(i64, SeqOrder)>,
    /// The partition the channel's samples last came from.
    partition: Option<u32>,
    /// The record of the last sample taken in.
    last_origin: Option<Origin>,
    /// Where the channel is in its producer's numbering.
    order: SeqOrder,
    /// Duplicates and returns so far, for logging each at 1, 2, 4, 8, ...
    /// per channel: a producer that restarted its numbering is reported,
    /// not once per sample.
    duplicates: u64,
    returns: u64,
    detector: ChannelDetector,
    /// Which samples only refill the window after a restore.
    resume: Resume,
    /// Restores so far; entries queued before the latest are stale.
    epoch: u32,
    /// Windows of this epoch queued and not yet cut: while there are none,
    /// `window` keeps only the rows the next window needs.
    queued: u32,
    /// While a batch is cut: the index of this channel's run (valid when the
    /// run there is this channel's).
    run: usize,
    /// While a batch completes: the index of this channel's checkpoint in
    /// the batch's (valid when the one there is this channel's).
    progressed: usize,
}

impl ChannelState {
    /// Forgets the channel's stream position, window and detector state, and
    /// takes `checkpoint`'s if there is one.
    fn restore(
        &mut self,
        settings: DetectSettings,
        spec: &ModelSpec,
        checkpoint: Option<Checkpoint>,
    ) {
        self.window.clear();
        self.queued = 0;
        self.offsets.clear();
        self.epoch = self.epoch.wrapping_add(1);
        let SavedState {
            detector: state,
            order,
        } = checkpoint
            .as_ref()
            .map(|c| c.state.clone())
            .unwrap_or_default();
        self.order = order.unwrap_or_default();
        self.detector = ChannelDetector::restore(settings, spec.calibration, state);
        self.resume = match checkpoint {
            Some(c) => Resume::RefillTo {
                last_seq: c.last_seq,
                from: c.refill_from,
            },
            None => Resume::RefillBelowCommitted,
        };
    }
}

/// Where a channel's scoring resumes after a restore.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resume {
    /// From its checkpoint: the samples up to the checkpoint's, `last_seq`,
    /// only refill the window, every later one is scored (also below the
    /// committed offset, whose outputs were published before: the detector
    /// state must step through them to stay the same as if nothing had
    /// happened). Records before `from` (the offset of the window's oldest
    /// sample) are older than the window: passed over, so that the
    /// channel's numbering is rebuilt from the same record as the window.
    ///
    /// "Up to the checkpoint's sample" is by position, not by seq: a
    /// sample before it may have a larger seq (a glitch its producer
    /// returned from, see [`SeqOrder`]), and one after it a smaller seq (the
    /// return). The checkpoint's record lies below the committed offset (a
    /// checkpoint is written once its record's offset is committed): so
    /// until the checkpoint's seq comes, a sample below the committed
    /// offset is a refill, and one at or above it is not (with no
    /// committed offset known, one whose seq is below the checkpoint's is).
    RefillTo { last_seq: u64, from: i64 },
    /// Past its checkpoint: every sample is scored.
    Scoring,
    /// With no checkpoint, its state below the committed offset is unknown:
    /// those samples only refill the window (and their rows were written
    /// before); scoring starts at the committed offset.
    RefillBelowCommitted,
}

/// Where a channel is in its producer's numbering, and which seqs it takes
/// in next (docs/contract.md, "Order within a channel").
///
/// A `seq` names one sample: its score row, its forecast row and the id of
/// an event it opens. So no seq is taken in twice, and the numbering only
/// moves on, by any step, but for one exception that keeps a glitch from
/// silencing a channel: the seqs a jump ahead skipped were never taken in,
/// so a sample among them is taken as the producer returning to its
/// numbering (a glitch of one record with seq 2^63-1, or 10,000 ahead, is
/// followed by the producer's next seq). Everything else at or below the
/// last seq is a duplicate, also a producer that restarted its numbering
/// from zero, until it passes its old last seq: its seqs name samples that
/// were scored already.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeqOrder {
    /// The seq of the last sample taken in.
    last: Option<u64>,
    /// The seqs strictly between these two were skipped by the latest jump
    /// ahead and none has been taken in since.
    skipped: Option<(u64, u64)>,
    /// After a return: the seqs from the first to the last of these, all
    /// above `last`, were taken in before the latest return (the glitch's),
    /// and stay duplicates.
    taken_ahead: Option<(u64, u64)>,
}

/// How a seq moved its channel's numbering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The first sample, or the one after the last.
    Next,
    /// Ahead of the last by more than one: the seqs in between are skipped.
    Gap,
    /// Among the seqs the latest jump skipped: the numbering goes back from
    /// `from` to it.
    Returned { from: u64 },
    /// Taken in already, or passed over: not taken in (`last` is the
    /// channel's last seq).
    Duplicate { last: u64 },
}

impl SeqOrder {
    /// The seq of the last sample taken in.
    pub fn last(&self) -> Option<u64> {
        self.last
    }

    /// Takes `seq` in, unless it is a duplicate.
    pub fn take(&mut self, seq: u64) -> Step {
        let Some(last) = self.last else {
            self.last = Some(seq);
            return Step::Next;
        };
        if let Some((first, end)) = self.taken_ahead {
            if (first..=end).contains(&seq) {
                return Step::Duplicate { last };
            }
        }
        if seq > last {
            // Past the glitch's seqs, the numbering goes on from the last of
            // them; before them, from `last`.
            let after = match self.taken_ahead {
                Some((_, end)) if seq > end => {
                    self.taken_ahead = None;
                    end
                }
                _ => last,
            };
            self.last = Some(seq);
            if seq - after > 1 {
                self.skipped = Some((after, seq));
                return Step::Gap;
            }
            return Step::Next;
        }
        match self.skipped {
            Some((before, after)) if before < seq && seq < after => {
                // Any seqs taken ahead before lie above `last`, so above
                // these: they are forgotten (should the numbering reach a
                // glitch's seq from before the latest, its sample is taken).
                self.taken_ahead = Some((after, last));
                self.skipped = (seq - before > 1).then_some((before, seq));
                self.last = Some(seq);
                Step::Returned { from: last }
            }
            _ => Step::Duplicate { last },
        }
    }
}

struct ModelState {
    spec: Arc<ModelSpec>,
    runner: Runner,
    /// A version waiting for the batch in flight to complete.
    next: Option<(Arc<ModelSpec>, Runner)>,
    name: Ustr,
    batcher: Batcher<Entry>,
    /// One batch per model is in flight at a time, so a channel's windows are
    /// scored in `seq` order (its detector state depends on that order).
    in_flight: bool,
}

/// The rows of one channel's windows in a batch being cut.
struct Run {
    channel: u32,
    /// Newest rows of the run's first and last windows.
    first: u64,
    last: u64,
    /// Where the run's rows start in the batch's inputs (in floats).
    offset: usize,
}

/// Batch inputs kept for reuse: the batches in flight and slack.
const SPARE_INPUTS: usize = 32;

pub struct Engine {
    channels: Vec<ChannelState>,
    models: Vec<ModelState>,
    /// Windows queued across all batchers (for backpressure).
    pending: usize,
    /// Where the next batch search starts, so no model starves.
    next_model: usize,
    counters: Counters,
    /// Reused for denormalising one forecast.
    scratch: Vec<f32>,
    /// Inputs of completed batches, reused so that cutting a batch does not
    /// allocate; and the runs of the batch being cut.
    spare_inputs: Vec<BatchInputs>,
    runs: Vec<Run>,
    detect: DetectSettings,
    /// Per partition: the committed offset at its last restore (see [`Restore`]).
    replay_below: Vec<Option<i64>>,
}

impl Engine {
    /// `models` must hold a spec for every model a channel names.
    pub fn new(
        channels: &[ChannelConfig],
        models: &[Arc<ModelSpec>],
        runners: Vec<Runner>,
        detect: DetectSettings,
    ) -> Result<Self, EngineError> {
        assert_eq!(models.len(), runners.len(), "one runner per model");
        let model_states: Vec<ModelState> = models
            .iter()
            .zip(runners)
            .map(|(spec, runner)| ModelState {
                batcher: Batcher::new(spec.batching.clone()),
                name: Ustr::from(&spec.name),
                spec: spec.clone(),
                runner,
                next: None,
                in_flight: false,
            })
            .collect();
        let mut channel_states = Vec::with_capacity(channels.len());
        for channel in channels {
            let model = models
                .iter()
                .position(|m| m.name == channel.model)
                .ok_or_else(|| EngineError::UnknownModel {
                    channel: channel.id.clone(),
                    model: channel.model.clone(),
                })?;
            let spec = &models[model];
            channel_states.push(ChannelState {
                id: Ustr::from(&channel.id),
                subsystem: Ustr::from(&channel.subsystem),
                model,
                window: Window::new(spec.window, &spec.normalisation),
                offsets: VecDeque::with_capacity(spec.window),
                partition: None,
                last_origin: None,
                order: SeqOrder::default(),
                duplicates: 0,
                returns: 0,
                detector: ChannelDetector::new(detect, spec.calibration),
                resume: Resume::RefillBelowCommitted,
                epoch: 0,
                queued: 0,
                run: 0,
                progressed: 0,
            });
        }
        Ok(Self {
            channels: channel_states,
            models: model_states,
            pending: 0,
            next_model: 0,
            counters: Counters::default(),
            scratch: Vec::new(),
            spare_inputs: Vec::new(),
            runs: Vec::new(),
            detect,
            replay_below: Vec::new(),
        })
    }

    /// Restarts the channels that `restore.partition` carries from their
    /// checkpoints (or from nothing). Their windows queued before now are
    /// dropped when they complete: the partition's records come again.
    pub fn restore(&mut self, restore: Restore) {
        let p = restore.partition as usize;
        if self.replay_below.len() <= p {
            self.replay_below.resize(p + 1, None);
        }
        self.replay_below[p] = restore.committed;
        let mut checkpoints = restore.checkpoints;
        for channel in &mut self.channels {
            let checkpoint = checkpoints
                .iter()
                .position(|c| c.channel == channel.id)
                .map(|i| checkpoints.swap_remove(i));
            if checkpoint.is_none() && channel.partition != Some(restore.partition) {
                continue;
            }
            channel.partition = Some(restore.partition);
            tracing::debug!(channel = %channel.id, partition = restore.partition, resume_after = ?checkpoint.as_ref().map(|c| c.last_seq), refill_from = ?checkpoint.as_ref().map(|c| c.refill_from), "channel restored");
            let spec = &self.models[channel.model].spec;
            channel.restore(self.detect, spec, checkpoint);
        }
        for unknown in checkpoints {
            tracing::warn!(channel = %unknown.channel, "checkpoint for a channel this pipeline does not have; ignored");
        }
    }

    /// The checkpoint for a channel still filling its window, whose detector
    /// has not moved yet (None offline, where samples have no offsets).
    pub fn warm_up_checkpoint(&self, channel: u32) -> Option<Checkpoint> {
        let c = &self.channels[channel as usize];
        Some(Checkpoint {
            channel: c.id,
            partition: c.partition?,
            last_seq: c.order.last?,
            refill_from: c.offsets.front()?.0,
            state: SavedState {
                detector: c.detector.state().clone(),
                order: Some(c.offsets.front()?.1),
            },
            last_origin: c.last_origin,
        })
    }

    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// Windows waiting in batchers.
    pub fn pending(&self) -> usize {
        self.pending
    }

    /// Whether no window is queued or being inferred.
    pub fn is_idle(&self) -> bool {
        self.pending == 0 && self.models.iter().all(|m| !m.in_flight)
    }

    /// Whether nothing is queued or being inferred for any model `held`
    /// leaves out (models whose failed batch waits for a retry).
    pub fn is_idle_except(&self, held: impl Fn(usize) -> bool) -> bool {
        self.models
            .iter()
            .enumerate()
            .all(|(i, m)| held(i) || (m.batcher.is_empty() && !m.in_flight))
    }

    /// Windows waiting in model `model`'s batcher.
    pub fn queued_for(&self, model: usize) -> usize {
        self.models[model].batcher.len()
    }

    /// Readies a batch whose inference call failed to run again. It is
    /// still its model's batch in flight, so nothing else of the model runs
    /// meanwhile; a version loaded since (waiting for this batch, see
    /// [`Engine::swap_model`]) is swapped in now and the batch re-normalised
    /// for it, so the retry runs on that version.
    pub fn prepare_retry(&mut self, batch: &mut ModelBatch) {
        let index = batch.model;
        let Some((spec, runner)) = self.models[index].next.take() else {
            return;
        };
        batch.inputs.renormalise(
            spec.features,
            &batch.spec.normalisation,
            &spec.normalisation,
        );
        batch.spec = spec.clone();
        batch.runner = runner.clone();
        self.swap_now(index, spec, runner);
    }

    pub fn model_spec(&self, model: usize) -> &Arc<ModelSpec> {
        &self.models[model].spec
    }

    pub fn channel_id(&self, channel: u32) -> Ustr {
        self.channels[channel as usize].id
    }

    /// Events open right now.
    pub fn open_events(&self) -> usize {
        self.channels
            .iter()
            .filter(|c| c.detector.open_event().is_some())
            .count()
    }

    /// Approximate bytes of per-channel state: the channel's fields, its
    /// window's rows, the Kafka offsets of those rows (none offline) and the
    /// detector's heap.
    pub fn channel_state_bytes(&self) -> usize {
        self.channels
            .iter()
            .map(|c| {
                std::mem::size_of::<ChannelState>()
                    + c.window.heap_bytes()
                    + c.offsets.capacity() * std::mem::size_of::<(i64, SeqOrder)>()
                    + c.detector.heap_bytes(self.models[c.model].spec.horizon)
            })
            .sum()
    }

    pub fn admit(&mut self, sample: &Sample, now: Instant) -> Admission {
        let channel = &mut self.channels[sample.channel as usize];
        self.counters.admitted += 1;
        if let (Resume::RefillTo { from, .. }, Some(origin)) = (channel.resume, sample.origin) {
            if origin.offset < from {
                // Older than the restored window: its row would only be
                // pushed out again.
                self.counters.refilled += 1;
                return Admission::Refill;
            }
        }
        let order_before = channel.order;
        match channel.order.take(sample.seq) {
            Step::Next => {}
            Step::Gap => self.counters.gaps += 1,
            Step::Returned { from } => {
                self.counters.returns += 1;
                channel.returns += 1;
                if channel.returns.is_power_of_two() {
                    tracing::warn!(
                        channel = %channel.id,
                        seq = sample.seq,
                        from,
                        returns = channel.returns,
                        "the channel's numbering returned into the seqs its last jump skipped: \
                         taken as its producer resuming after a glitch, and scored on; the seqs \
                         the glitch took stay taken (logged at 1, 2, 4, ... returns per channel)"
                    );
                }
            }
            Step::Duplicate { last } => {
                self.counters.duplicates += 1;
                channel.duplicates += 1;
                if channel.duplicates.is_power_of_two() {
                    tracing::warn!(
                        channel = %channel.id,
                        seq = sample.seq,
                        last,
                        duplicates = channel.duplicates,
                        "sample dropped as a duplicate: a seq names one sample (its score row, \
                         forecast and event id) and this one was taken in already or passed; a \
                         producer that restarted its numbering is scored again once it passes \
                         the last seq (logged at 1, 2, 4, ... duplicates per channel)"
                    );
                }
                return Admission::Duplicate { last };
            }
        }
        let row = channel.window.push(&sample.values);
        if let Some(origin) = sample.origin {
            if channel.offsets.len() == self.models[channel.model].spec.window {
                channel.offsets.pop_front();
            }
            channel.offsets.push_back((origin.offset, order_before));
            channel.partition = Some(origin.partition);
        }
        channel.last_origin = sample.origin;
        let committed = sample.origin.and_then(|o| {
            let committed = self
                .replay_below
                .get(o.partition as usize)
                .copied()
                .flatten()?;
            Some(o.offset < committed)
        });
        let below_committed = committed == Some(true);
        let refill = match channel.resume {
            Resume::RefillTo { last_seq, .. } if sample.seq == last_seq => {
                channel.resume = Resume::Scoring;
                true
            }
            // Before the checkpoint's sample; with no committed offset
            // known, by its seq.
            Resume::RefillTo { last_seq, .. }
                if below_committed || (committed.is_none() && sample.seq < last_seq) =>
            {
                true
            }
            Resume::RefillTo { .. } => {
                channel.resume = Resume::Scoring;
                false
            }
            Resume::Scoring => false,
            Resume::RefillBelowCommitted => below_committed,
        };
        if refill || !channel.window.is_full() {
            if channel.queued == 0 {
                channel.window.release_before(u64::MAX);
            }
            if refill {
                self.counters.refilled += 1;
                return Admission::Refill;
            }
            self.counters.warm_up += 1;
            return Admission::WarmUp;
        }
        let model = &mut self.models[channel.model];
        let entry = Entry {
            channel: sample.channel,
            seq: sample.seq,
            row,
            ts: sample.ts,
            value: sample.values[model.spec.target_feature],
            origin: sample.origin,
            window_start: channel.offsets.front().copied(),
            epoch: channel.epoch,
            received: sample.received,
        };
        model.batcher.push(entry, now);
        channel.queued += 1;
        self.pending += 1;
        Admission::Queued
    }

    /// The next batch that is due under its model's batching policy.
    pub fn next_batch(&mut self, now: Instant) -> Option<ModelBatch> {
        self.next_batch_where(|batcher| batcher.cut(now))
    }

    /// The next batch regardless of deadlines, for draining.
    pub fn flush_batch(&mut self) -> Option<ModelBatch> {
        self.next_batch_where(|batcher| batcher.flush())
    }

    fn next_batch_where(
        &mut self,
        mut cut: impl FnMut(&mut Batcher<Entry>) -> Option<crate::batch::Batch<Entry>>,
    ) -> Option<ModelBatch> {
        let n = self.models.len();
        for i in 0..n {
            let index = (self.next_model + i) % n;
            if self.models[index].in_flight {
                continue;
            }
            while let Some(mut batch) = cut(&mut self.models[index].batcher) {
                self.pending -= batch.entries.len();
                // Queued before its partition was restored: the record comes
                // again from Kafka and is scored then.
                batch
                    .entries
                    .retain(|e| e.epoch == self.channels[e.channel as usize].epoch);
                if batch.entries.is_empty() {
                    continue;
                }
                let inputs = self.gather_windows(index, &batch.entries);
                let model = &mut self.models[index];
                model.in_flight = true;
                self.next_model = (index + 1) % n;
                return Some(ModelBatch {
                    model: index,
                    spec: model.spec.clone(),
                    runner: model.runner.clone(),
                    inputs,
                    entries: batch.entries,
                    oldest_enqueued: batch.oldest_enqueued,
                });
            }
        }
        None
    }

    /// Copies the windows of `entries` (queued for model `model`, all of the
    /// current epoch) out of their channels: one run of rows per channel, from
    /// its first window's oldest row to its last window's newest. Then lets
    /// the channels drop the rows no queued window needs any more.
    fn gather_windows(&mut self, model: usize, entries: &[Entry]) -> BatchInputs {
        let spec = &self.models[model].spec;
        let (len, features) = (spec.window as u64, spec.features);
        let mut inputs = self
            .spare_inputs
            .pop()
            .unwrap_or_else(|| BatchInputs::new(spec.window * features));
        self.runs.clear();
        for entry in entries {
            let channel = &mut self.channels[entry.channel as usize];
            channel.queued -= 1;
            match self.runs.get_mut(channel.run) {
                Some(run) if run.channel == entry.channel => run.last = entry.row,
                _ => {
                    channel.run = self.runs.len();
                    self.runs.push(Run {
                        channel: entry.channel,
                        first: entry.row,
                        last: entry.row,
                        offset: 0,
                    });
                }
            }
        }
        // Longest runs first: runs of equal length then lie side by side, so
        // a backend that calls them together (the row form) reads them in
        // place.
        self.runs
            .sort_by_key(|run| std::cmp::Reverse(run.last - run.first));
        for (index, run) in self.runs.iter_mut().enumerate() {
            let channel = &mut self.channels[run.channel as usize];
            channel.run = index;
            run.offset = inputs.push_run(channel.window.rows(run.first + 1 - len..=run.last));
            if channel.queued == 0 {
                channel.window.release_before(u64::MAX);
            } else {
                channel.window.release_before(run.last + 2 - len);
            }
        }
        for entry in entries {
            let run = &self.runs[self.channels[entry.channel as usize].run];
            inputs.push_window(run.offset + (entry.row - run.first) as usize * features);
        }
        inputs
    }

    /// The earliest deadline among models that could send a batch.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.models
            .iter()
            .filter(|m| !m.in_flight)
            .filter_map(|m| m.batcher.deadline())
            .min()
    }

    /// Applies a batch's forecasts (`[entries, horizon]`, normalised units) in
    /// order, appending what they produce to `out`.
    pub fn complete(&mut self, batch: ModelBatch, forecasts: &[f32], out: &mut Outputs) {
        let model_index = batch.model;
        self.complete_batch(batch, forecasts, out);
        if let Some((spec, runner)) = self.models[model_index].next.take() {
            self.swap_now(model_index, spec, runner);
        }
    }

    /// Serves `spec` (a new version of a loaded model, run by `runner`) from
    /// the next batch on: windows already queued are re-normalised for it, and
    /// a batch in flight completes under its own version first. So each
    /// channel switches version at one sample, and no sample is dropped or
    /// scored twice. Refused if the input or output shape changed.
    pub fn swap_model(&mut self, spec: Arc<ModelSpec>, runner: Runner) -> Result<(), EngineError> {
        let index = self
            .models
            .iter()
            .position(|m| m.spec.name == spec.name)
            .ok_or_else(|| EngineError::NotServed(spec.name.clone()))?;
        let old = &self.models[index].spec;
        let shape = |s: &ModelSpec| (s.window, s.features, s.horizon, s.target_feature);
        if shape(old) != shape(&spec) {
            return Err(EngineError::ShapeChange {
                model: spec.name.clone(),
                version: spec.version,
                from: shape(old),
                to: shape(&spec),
            });
        }
        if self.models[index].in_flight {
            self.models[index].next = Some((spec, runner));
        } else {
            self.swap_now(index, spec, runner);
        }
        Ok(())
    }

    fn swap_now(&mut self, index: usize, spec: Arc<ModelSpec>, runner: Runner) {
        let model = &mut self.models[index];
        let (old, new) = (&model.spec.normalisation, &spec.normalisation);
        if old != new {
            // Queued windows are rows in their channels' windows.
            for channel in self.channels.iter_mut().filter(|c| c.model == index) {
                channel.window.renormalise(old, new);
            }
        }
        for channel in self.channels.iter_mut().filter(|c| c.model == index) {
            channel.detector.set_calibration(spec.calibration);
        }
        tracing::info!(model = %spec.name, from = model.spec.version, to = spec.version, "model version swapped in");
        model.spec = spec;
        model.runner = runner;
    }

    fn complete_batch(&mut self, batch: ModelBatch, forecasts: &[f32], out: &mut Outputs) {
        let model = &mut self.models[batch.model];
        model.in_flight = false;
        let mut inputs = batch.inputs;
        if self.spare_inputs.len() < SPARE_INPUTS {
            inputs.clear();
            self.spare_inputs.push(inputs);
        }
        let spec = &batch.spec;
        let horizon = spec.horizon;
        assert_eq!(
            forecasts.len(),
            batch.entries.len() * horizon,
            "the backend returns [batch, horizon]"
        );
        // One row of each per window: grow once, not by doubling.
        out.scores.reserve(batch.entries.len());
        out.forecasts.reserve(batch.entries.len());
        out.done.reserve(batch.entries.len());
        let scale = spec.normalisation.scale[spec.target_feature];
        let center = spec.normalisation.center[spec.target_feature];
        // (channel, seq, window start, record) of each channel's last entry.
        type Progress = (u32, u64, (i64, SeqOrder), Option<Origin>);
        let mut progressed: Vec<Progress> = Vec::new();
        let replaced_before = self.counters.replaced_forecast_steps;
        for (entry, normalised) in batch
            .entries
            .into_iter()
            .zip(forecasts.chunks_exact(horizon))
        {
            if entry.epoch != self.channels[entry.channel as usize].epoch {
                // Queued before its partition was restored: the record comes
                // again from Kafka and is scored then.
                continue;
            }
            if let Some(start) = entry.window_start {
                let channel = &mut self.channels[entry.channel as usize];
                match progressed.get_mut(channel.progressed) {
                    Some(last) if last.0 == entry.channel => {
                        *last = (entry.channel, entry.seq, start, entry.origin)
                    }
                    _ => {
                        channel.progressed = progressed.len();
                        progressed.push((entry.channel, entry.seq, start, entry.origin));
                    }
                }
            }
            self.scratch.clear();
            self.scratch
                .extend(normalised.iter().map(|f| f * scale + center));
            // A forecast is published as JSON (no NaN or infinity there) and
            // becomes detector state: it must be finite before either.
            self.counters.replaced_forecast_steps +=
                crate::detect::finite_forecast(&mut self.scratch, entry.value) as u64;
            let channel = &mut self.channels[entry.channel as usize];
            let (scored, change) =
                channel
                    .detector
                    .step(entry.seq, entry.ts, entry.value, &self.scratch);
            if let Some(scored) = scored {
                self.counters.scored += 1;
                out.scores.push(ScoreRow {
                    channel: channel.id,
                    subsystem: channel.subsystem,
                    seq: entry.seq,
                    ts: entry.ts,
                    score: scored.score,
                    threshold: scored.threshold,
                    anomalous: scored.anomalous,
                    model_version: spec.version,
                    received: entry.received,
                });
            }
            out.forecasts.push(Forecast {
                channel: channel.id,
                origin: entry.origin,
                seq: entry.seq,
                horizon: Horizon::from_slice(&self.scratch),
                model: model.name,
                model_version: spec.version,
            });
            if let Some(change) = change {
                let (state, span) = match change {
                    EventChange::Opened(span) => {
                        self.counters.events_opened += 1;
                        (EventState::Open, span)
                    }
                    EventChange::Closed(span) => {
                        self.counters.events_closed += 1;
                        (EventState::Closed, span)
                    }
                };
                let mut event = event_record(channel, model.name, spec.version, state, span);
                event.origin = entry.origin;
                out.events.push(event);
            }
            out.done.extend(entry.origin);
        }
        let replaced = self.counters.replaced_forecast_steps;
        // Logged when the total reaches a new power of two: a model that
        // keeps returning NaN is reported, not once per batch.
        if replaced > replaced_before
            && (replaced_before == 0 || replaced.ilog2() > replaced_before.ilog2())
        {
            tracing::warn!(
                model = %model.name,
                version = spec.version,
                in_this_batch = replaced - replaced_before,
                total = replaced,
                "the model returned forecast steps that are NaN, infinite or beyond the \
                 largest value accepted; published and scored with NaN replaced by the \
                 sample's value and the others by the bound"
            );
        }
        for (channel, last_seq, (refill_from, order), last_origin) in progressed {
            let c = &self.channels[channel as usize];
            if let Some(partition) = c.partition {
                out.checkpoints.push(Checkpoint {
                    channel: c.id,
                    partition,
                    last_seq,
                    refill_from,
                    state: SavedState {
                        detector: c.detector.state().clone(),
                        order: Some(order),
                    },
                    last_origin,
                });
            }
        }
    }
}

fn event_record(
    channel: &ChannelState,
    model: Ustr,
    version: u64,
    state: EventState,
    span: EventSpan,
) -> AnomalyEvent {
    AnomalyEvent {
        origin: None,
        event_id: format!("{}:{}", channel.id, span.start_seq),
        channel: channel.id,
        subsystem: channel.subsystem,
        state,
        start_seq: span.start_seq,
        end_seq: span.end.map(|(seq, _)| seq),
        start_ts: span.start_ts,
        end_ts: span.end.map(|(_, ts)| ts),
        peak_score: span.peak_score,
        threshold: span.threshold,
        cause: span.cause,
        model,
        model_version: version,
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, path::PathBuf, time::Duration};

    use super::*;
    use crate::detect::{
        baseline::BaselineSettings, events::EventSettings, excursion::ExcursionSettings,
        threshold::ThresholdSettings,
    };
    use crate::repository::{BatchPolicy, DeviceKind, ErrorCalibration, Normalisation};

    fn spec() -> Arc<ModelSpec> {
        Arc::new(ModelSpec {
            name: "m".into(),
            version: 3,
            config_path: PathBuf::from("m/config.pbtxt"),
            model_path: PathBuf::from("m/3/model.onnx"),
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

    fn channel() -> ChannelConfig {
        ChannelConfig {
            id: "X-1".into(),
            subsystem: "xs".into(),
            topic: "telemetry.xs".into(),
            model: "m".into(),
        }
    }

    fn engine() -> Engine {
        let detect = DetectSettings {
            ewma_alpha: 1.0,
            threshold: ThresholdSettings {
                fixed: 5.0,
                ..DetectSettings::bare().threshold
            },
            events: EventSettings {
                min_gap: 1,
                ..DetectSettings::bare().events
            },
            ..DetectSettings::bare()
        };
        Engine::new(&[channel()], &[spec()], one_runner(), detect).unwrap()
    }

    #[test]
    fn channel_state_counts_the_offsets_and_the_detectors_heap() {
        let without = Engine::new(
            &[channel()],
            &[spec()],
            one_runner(),
            DetectSettings::bare(),
        )
        .unwrap()
        .channel_state_bytes();
        let detect = DetectSettings {
            baseline: BaselineSettings {
                samples: 640,
                ..DetectSettings::bare().baseline
            },
            excursion: ExcursionSettings {
                samples: 128,
                ..DetectSettings::bare().excursion
            },
            ..DetectSettings::bare()
        };
        let with = Engine::new(&[channel()], &[spec()], one_runner(), detect)
            .unwrap()
            .channel_state_bytes();
        assert_eq!(with - without, 640 / 8, "one bit per baseline sample");
        let fields = std::mem::size_of::<ChannelState>();
        let window = engine().channels[0].window.heap_bytes();
        assert!(
            without >= fields + window + 2 * 8 + 4,
            "two offsets and a one-step forecast: {without} bytes"
        );
    }

    fn sample(seq: u64, value: f32) -> Sample {
        Sample {
            channel: 0,
            seq,
            ts: DateTime::UNIX_EPOCH,
            values: crate::telemetry::Values::from_slice(&[value]),
            origin: Some(Origin {
                partition: 0,
                generation: 0,
                offset: seq as i64,
            }),
            received: None,
            payload: None,
        }
    }

    #[test]
    fn samples_flow_from_window_to_scores_forecasts_events_and_acks() {
        let mut engine = engine();
        let now = Instant::now();
        assert_eq!(engine.admit(&sample(0, 1.0), now), Admission::WarmUp);
        assert_eq!(engine.admit(&sample(1, 1.0), now), Admission::Queued);
        assert_eq!(
            engine.admit(&sample(1, 1.0), now),
            Admission::Duplicate { last: 1 }
        );
        assert_eq!(engine.admit(&sample(2, 9.0), now), Admission::Queued);

        let batch = engine.next_batch(now).expect("preferred size 2 is reached");
        assert_eq!(
            batch.inputs.windows(&mut Vec::new()),
            vec![1.0, 1.0, 1.0, 9.0],
            "two windows of two samples"
        );
        assert!(
            engine.next_batch(now).is_none(),
            "one batch per model in flight"
        );
        engine.admit(&sample(3, 1.0), now);
        assert!(engine.next_batch(now).is_none(), "still in flight");

        // The model forecasts "the last value" for both windows.
        let mut out = Outputs::default();
        engine.complete(batch, &[1.0, 9.0], &mut out);
        assert_eq!(out.forecasts.len(), 2);
        assert_eq!(
            out.scores.len(),
            1,
            "the first full window has no earlier forecast"
        );
        assert_eq!(
            (
                out.scores[0].seq,
                out.scores[0].score,
                out.scores[0].anomalous
            ),
            (2, 8.0, true)
        );
        assert_eq!(out.scores[0].model_version, 3);
        assert_eq!(out.events.len(), 1);
        assert_eq!(out.events[0].event_id, "X-1:2");
        assert_eq!(out.done.len(), 2);

        // Seq 3 waits for its deadline (zero) once the model is free again.
        let batch = engine.next_batch(now).expect("deadline passed");
        let mut out = Outputs::default();
        engine.complete(batch, &[1.0], &mut out);
        assert_eq!(
            (out.scores[0].seq, out.scores[0].anomalous),
            (3, true),
            "|1 - 9| is still anomalous"
        );
        assert!(engine.is_idle());
        assert_eq!(engine.counters().duplicates, 1);
        assert_eq!(engine.open_events(), 1);
    }

    /// Answers every row with its window's last value.
    struct LastValue;

    /// The runner of an engine's one model.
    fn one_runner() -> Vec<Runner> {
        Runner::all_on(Arc::new(LastValue), 1)
    }

    impl crate::backend::Backend for LastValue {
        fn infer(
            &self,
            _: usize,
            inputs: &[f32],
            rows: usize,
        ) -> Result<Vec<f32>, crate::backend::BackendError> {
            let per_row = inputs.len() / rows;
            Ok(inputs.chunks(per_row).map(|w| w[per_row - 1]).collect())
        }
    }

    #[test]
    fn a_swap_waits_for_the_batch_in_flight_and_renormalises_what_is_queued() {
        let mut engine = engine();
        let now = Instant::now();
        for seq in 0..3 {
            engine.admit(&sample(seq, 1.0 + seq as f32), now);
        }
        let in_flight = engine.next_batch(now).expect("preferred size 2");
        assert_eq!(in_flight.spec.version, 3);
        engine.admit(&sample(3, 4.0), now);

        let mut v4 = (*spec()).clone();
        v4.version = 4;
        v4.normalisation.center = vec![1.0];
        v4.normalisation.scale = vec![2.0];
        let runner = Runner {
            backend: Arc::new(LastValue),
            index: 0,
        };
        let v4_backend = runner.backend.clone();
        engine.swap_model(Arc::new(v4), runner).unwrap();
        assert_eq!(engine.model_spec(0).version, 3, "deferred while in flight");

        let mut out = Outputs::default();
        engine.complete(in_flight, &[2.0, 3.0], &mut out);
        assert!(
            out.forecasts.iter().all(|f| f.model_version == 3),
            "the batch in flight keeps its version"
        );
        assert_eq!(engine.model_spec(0).version, 4, "swapped once it completed");

        let batch = engine.next_batch(now).expect("seq 3's deadline passed");
        assert_eq!(batch.spec.version, 4);
        assert!(
            Arc::ptr_eq(&batch.runner.backend, &v4_backend),
            "runs on the new version's backend"
        );
        assert_eq!(
            batch.inputs.windows(&mut Vec::new()),
            vec![1.0, 1.5],
            "values 3 and 4 re-normalised as (x - 1) / 2"
        );
        let mut out = Outputs::default();
        engine.complete(batch, &[1.5], &mut out);
        assert_eq!(
            out.forecasts[0].horizon,
            Horizon::from_slice(&[4.0]),
            "denormalised with version 4"
        );
        assert_eq!(out.scores[0].model_version, 4);
    }

    #[test]
    fn a_failed_batch_retried_after_a_swap_runs_on_the_new_version() {
        let mut engine = engine();
        let now = Instant::now();
        for seq in 0..3 {
            engine.admit(&sample(seq, 1.0 + seq as f32), now);
        }
        let mut failed = engine.next_batch(now).expect("preferred size 2");
        let mut v4 = (*spec()).clone();
        v4.version = 4;
        v4.normalisation.center = vec![1.0];
        v4.normalisation.scale = vec![2.0];
        let runner = Runner {
            backend: Arc::new(LastValue),
            index: 0,
        };
        let v4_backend = runner.backend.clone();
        engine.swap_model(Arc::new(v4), runner).unwrap();
        assert!(
            engine.next_batch(now).is_none(),
            "the failed batch is still in flight"
        );
        assert!(!Arc::ptr_eq(&failed.runner.backend, &v4_backend));
        engine.prepare_retry(&mut failed);
        assert_eq!(failed.spec.version, 4);
        assert!(Arc::ptr_eq(&failed.runner.backend, &v4_backend));
        assert_eq!(
            failed.inputs.windows(&mut Vec::new()),
            vec![0.0, 0.5, 0.5, 1.0],
            "values 1, 2 and 3 re-normalised as (x - 1) / 2"
        );
        let mut out = Outputs::default();
        engine.complete(failed, &[0.5, 1.0], &mut out);
        assert_eq!(
            out.forecasts
                .iter()
                .map(|f| (f.seq, f.model_version))
                .collect::<Vec<_>>(),
            [(1, 4), (2, 4)]
        );
        assert!(engine.is_idle());
    }

    #[test]
    fn a_run_of_windows_travels_as_its_rows_and_is_laid_out_window_by_window() {
        let mut spec = (*spec()).clone();
        spec.batching.preferred_batch_sizes = vec![4];
        let mut engine = Engine::new(
            &[channel()],
            &[Arc::new(spec)],
            one_runner(),
            DetectSettings::bare(),
        )
        .unwrap();
        let now = Instant::now();
        for seq in 0..5 {
            engine.admit(&sample(seq, seq as f32), now);
        }
        let batch = engine.next_batch(now).expect("preferred size 4");
        assert_eq!(
            batch.inputs.rows,
            vec![0.0, 1.0, 2.0, 3.0, 4.0],
            "four windows of two rows share five rows"
        );
        assert_eq!(
            batch.inputs.windows(&mut Vec::new()),
            &[0.0, 1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 4.0]
        );
        assert_eq!(
            engine.channels[0].window.rows(4..=4),
            &[4.0],
            "the next window's row is kept"
        );
    }

    #[test]
    fn after_its_checkpoint_a_channel_scores_every_sample_also_below_the_committed_offset() {
        let mut engine = engine();
        let now = Instant::now();
        let checkpoint = Checkpoint {
            channel: "X-1".into(),
            partition: 0,
            last_seq: 3,
            refill_from: 2,
            state: SavedState::default(),
            last_origin: None,
        };
        engine.restore(Restore {
            partition: 0,
            committed: Some(8),
            checkpoints: vec![checkpoint],
        });
        let admitted: Vec<Admission> = (2..10)
            .map(|seq| engine.admit(&sample(seq, 1.0), now))
            .collect();
        assert_eq!(
            admitted[..2],
            [Admission::Refill, Admission::Refill],
            "up to the checkpoint's seq: refill"
        );
        assert!(
            admitted[2..].iter().all(|a| *a == Admission::Queued),
            "from the checkpoint on, every sample is scored (the detector steps through them \
             as it did before the restart; publishing is the sink's concern): {admitted:?}"
        );
    }

    #[test]
    fn windows_queued_before_a_restore_are_dropped_when_the_batch_is_cut() {
        let mut engine = engine();
        let now = Instant::now();
        engine.admit(&sample(0, 1.0), now);
        assert_eq!(engine.admit(&sample(1, 2.0), now), Admission::Queued);
        engine.restore(Restore {
            partition: 0,
            committed: None,
            checkpoints: Vec::new(),
        });
        // The partition's records come again; the window refills.
        assert_eq!(engine.admit(&sample(0, 5.0), now), Admission::WarmUp);
        assert_eq!(engine.admit(&sample(1, 7.0), now), Admission::Queued);
        let batch = engine.next_batch(now).expect("deadline passed");
        assert_eq!(
            batch.entries.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![1],
            "only the window queued after the restore"
        );
        assert_eq!(batch.inputs.windows(&mut Vec::new()), &[5.0, 7.0]);
        assert_eq!(engine.pending(), 0);
    }

    #[test]
    fn a_batch_checkpoints_each_channel_once_at_its_last_window() {
        let channels: Vec<ChannelConfig> = ["X-1", "X-2"]
            .iter()
            .map(|id| ChannelConfig {
                id: (*id).into(),
                subsystem: "xs".into(),
                topic: "telemetry.xs".into(),
                model: "m".into(),
            })
            .collect();
        let mut four = (*spec()).clone();
        four.batching.preferred_batch_sizes = vec![4];
        let mut engine = Engine::new(
            &channels,
            &[Arc::new(four)],
            one_runner(),
            DetectSettings::bare(),
        )
        .unwrap();
        let now = Instant::now();
        // Interleaved as two partitions arrive; channel c's offsets are 10c + seq.
        for seq in 0..3 {
            for channel in 0..2u32 {
                let mut s = sample(seq, 1.0);
                s.channel = channel;
                s.origin = Some(Origin {
                    partition: channel,
                    generation: 0,
                    offset: 10 * channel as i64 + seq as i64,
                });
                engine.admit(&s, now);
            }
        }
        let batch = engine.flush_batch().expect("four windows are queued");
        let entries: Vec<(u32, u64)> = batch.entries.iter().map(|e| (e.channel, e.seq)).collect();
        assert_eq!(entries, [(0, 1), (1, 1), (0, 2), (1, 2)]);
        let mut out = Outputs::default();
        let rows = batch.entries.len();
        engine.complete(batch, &vec![1.0; rows], &mut out);
        let checkpoints: Vec<(&str, u32, u64, i64)> = out
            .checkpoints
            .iter()
            .map(|c| (&*c.channel, c.partition, c.last_seq, c.refill_from))
            .collect();
        // Each window is two samples: seq 2's starts at seq 1.
        assert_eq!(checkpoints, [("X-1", 0, 2, 1), ("X-2", 1, 2, 11)]);
    }

    #[test]
    fn forecasts_a_model_returns_out_of_range_are_published_finite_and_scored_finite() {
        let mut wide = (*spec()).clone();
        wide.horizon = 2;
        // A large train spread: a normalised forecast of 1e10 overflows f32
        // once denormalised.
        wide.normalisation.scale = vec![1e30];
        let detect = DetectSettings {
            ewma_alpha: 1.0,
            threshold: ThresholdSettings {
                fixed: 5.0,
                calibration_samples: 5,
                min_peaks: 3,
                risk: 0.01,
                initial_quantile: 0.8,
                ..DetectSettings::bare().threshold
            },
            events: EventSettings {
                min_gap: 1,
                ..DetectSettings::bare().events
            },
            ..DetectSettings::bare()
        };
        let mut engine =
            Engine::new(&[channel()], &[Arc::new(wide)], one_runner(), detect).unwrap();
        let now = Instant::now();
        let returned = [
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            1e10,
            -3e38,
            f32::MAX,
            0.0,
            f32::from_bits(1),
        ];
        let mut forecasts = Vec::new();
        let mut scores = Vec::new();
        let mut checkpoints = Vec::new();
        for (seq, bad) in (0..40u64).zip(returned.iter().cycle()) {
            engine.admit(&sample(seq, (seq % 3) as f32), now);
            let Some(batch) = engine.flush_batch() else {
                continue;
            };
            let rows = batch.entries.len();
            let mut out = Outputs::default();
            engine.complete(batch, &vec![*bad; rows * 2], &mut out);
            forecasts.extend(out.forecasts);
            scores.extend(out.scores);
            checkpoints.extend(out.checkpoints);
        }
        assert!(forecasts.len() > 30 && scores.len() > 30);
        let bound = crate::telemetry::MAX_ABS_VALUE;
        for f in &forecasts {
            assert!(
                f.horizon.iter().all(|x| x.is_finite() && x.abs() <= bound),
                "seq {}: {:?}",
                f.seq,
                f.horizon
            );
            let json = serde_json::to_string(f).unwrap();
            assert!(!json.contains("null"), "{json}");
        }
        for s in &scores {
            assert!(s.score.is_finite() && s.threshold.is_finite(), "{s:?}");
        }
        for c in &checkpoints {
            let json = serde_json::to_string(&c.state).unwrap();
            let back: SavedState = serde_json::from_str(&json).unwrap();
            assert_eq!(back, c.state, "{json}");
        }
        assert!(engine.counters().replaced_forecast_steps > 0);
    }

    #[test]
    fn a_channel_takes_each_seq_once_and_returns_from_a_jump_into_what_it_skipped() {
        let mut order = SeqOrder::default();
        let steps: Vec<Step> = [0, 1, 1, 0, 3, 4].map(|s| order.take(s)).to_vec();
        assert_eq!(
            steps,
            [
                Step::Next,
                Step::Next,
                Step::Duplicate { last: 1 },
                Step::Duplicate { last: 1 },
                Step::Gap,
                Step::Next
            ]
        );
        // A glitch of one record, then the producer's own numbering again.
        let top = i64::MAX as u64;
        assert_eq!(order.take(top), Step::Gap);
        assert_eq!(order.take(5), Step::Returned { from: top });
        assert_eq!(order.take(6), Step::Next);
        assert_eq!(order.take(4), Step::Duplicate { last: 6 }, "taken before");
        assert_eq!(
            order.take(top),
            Step::Duplicate { last: 6 },
            "the glitch's seq stays taken"
        );
        assert_eq!(order.last(), Some(6));
        // A glitch of two records 10,000 ahead: the first seqs after the
        // return are taken in, the glitch's seqs are duplicates when the
        // numbering reaches them, and it goes on past them.
        let mut order = SeqOrder::default();
        for seq in 0..=10 {
            order.take(seq);
        }
        assert_eq!(order.take(10_010), Step::Gap);
        assert_eq!(order.take(10_011), Step::Next);
        assert_eq!(order.take(11), Step::Returned { from: 10_011 });
        for seq in 12..10_010 {
            assert_eq!(order.take(seq), Step::Next, "seq {seq}");
        }
        assert_eq!(order.take(10_010), Step::Duplicate { last: 10_009 });
        assert_eq!(order.take(10_011), Step::Duplicate { last: 10_009 });
        assert_eq!(
            order.take(10_012),
            Step::Next,
            "just past the glitch's seqs"
        );
        // A return that itself skips: what it skipped can still come.
        let mut order = SeqOrder::default();
        order.take(0);
        order.take(100);
        assert_eq!(order.take(50), Step::Returned { from: 100 });
        assert_eq!(order.take(20), Step::Returned { from: 50 });
        assert_eq!(order.take(21), Step::Next);
        // The largest seqs do not overflow.
        let mut order = SeqOrder::default();
        assert_eq!(order.take(u64::MAX), Step::Next);
        assert_eq!(order.take(u64::MAX), Step::Duplicate { last: u64::MAX });
        assert_eq!(order.take(0), Step::Duplicate { last: u64::MAX });
    }

    #[test]
    fn a_producer_restarted_from_zero_is_scored_again_once_it_passes_its_last_seq() {
        let mut order = SeqOrder::default();
        for seq in 0..100 {
            assert_eq!(order.take(seq), Step::Next);
        }
        for seq in 0..100 {
            assert_eq!(order.take(seq), Step::Duplicate { last: 99 }, "seq {seq}");
        }
        assert_eq!(order.take(100), Step::Next);
    }

    /// Admits `seqs` (value 1.0 each) and completes every batch with the
    /// forecast 1.0; returns the seqs that got a score row.
    fn scored_seqs(engine: &mut Engine, seqs: &[u64]) -> Vec<u64> {
        let now = Instant::now();
        let mut scored = Vec::new();
        for &seq in seqs {
            engine.admit(&sample(seq, 1.0), now);
            while let Some(batch) = engine.flush_batch() {
                let rows = batch.entries.len();
                let mut out = Outputs::default();
                engine.complete(batch, &vec![1.0; rows], &mut out);
                scored.extend(out.scores.iter().map(|s| s.seq));
            }
        }
        scored
    }

    #[test]
    fn a_glitch_far_ahead_then_the_producers_numbering_keeps_the_channel_scored() {
        let mut engine = engine();
        let top = i64::MAX as u64;
        let scored = scored_seqs(&mut engine, &[0, 1, 2, 3, top, 4, 5, 6]);
        assert_eq!(
            scored,
            [2, 3, 5, 6],
            "the glitch and the first after the return have no forecast covering them"
        );
        assert_eq!(
            (engine.counters().duplicates, engine.counters().returns),
            (0, 1)
        );
    }

    #[test]
    fn the_first_sample_after_a_gap_longer_than_the_horizon_has_no_score() {
        let mut engine = engine();
        // Horizon 1: a forecast made at seq 3 covers seq 4 only.
        let scored = scored_seqs(&mut engine, &[0, 1, 2, 3, 5, 6, 7]);
        assert_eq!(scored, [2, 3, 6, 7]);
        let mut wide = (*spec()).clone();
        wide.horizon = 3;
        let mut engine = Engine::new(
            &[channel()],
            &[Arc::new(wide)],
            one_runner(),
            DetectSettings {
                ewma_alpha: 1.0,
                ..Default::default()
            },
        )
        .unwrap();
        let now = Instant::now();
        let mut scored = Vec::new();
        for seq in [0, 1, 2, 5, 9, 10] {
            engine.admit(&sample(seq, 1.0), now);
            while let Some(batch) = engine.flush_batch() {
                let rows = batch.entries.len();
                let mut out = Outputs::default();
                engine.complete(batch, &vec![1.0; rows * 3], &mut out);
                scored.extend(out.scores.iter().map(|s| s.seq));
            }
        }
        assert_eq!(
            scored,
            [2, 5, 10],
            "seq 5 is 3 after 2 (covered), 9 is 4 after 5 (not)"
        );
    }

    /// What one run of records did: each record's admission, the scores
    /// (seq, score) and the checkpoints with their record's offset.
    type Replayed = (Vec<Admission>, Vec<(u64, f32)>, Vec<(i64, Checkpoint)>);

    /// Runs `records` (seq, offset) of channel X-1 through `engine` as the
    /// processor does, completing each batch with the forecast 1.0.
    fn run_records(engine: &mut Engine, records: &[(u64, i64)]) -> Replayed {
        let now = Instant::now();
        let (mut admissions, mut scores, mut checkpoints) = (Vec::new(), Vec::new(), Vec::new());
        for &(seq, offset) in records {
            let mut s = sample(seq, seq as f32);
            s.origin = Some(Origin {
                partition: 0,
                generation: 1,
                offset,
            });
            let admission = engine.admit(&s, now);
            if admission == Admission::WarmUp {
                checkpoints.extend(engine.warm_up_checkpoint(0).map(|c| (offset, c)));
            }
            admissions.push(admission);
            while let Some(batch) = engine.flush_batch() {
                let rows = batch.entries.len();
                let mut out = Outputs::default();
                engine.complete(batch, &vec![1.0; rows], &mut out);
                scores.extend(out.scores.iter().map(|r| (r.seq, r.score)));
                checkpoints.extend(out.checkpoints.into_iter().map(|c| {
                    let offset = c.last_origin.expect("online samples have origins").offset;
                    (offset, c)
                }));
            }
        }
        (admissions, scores, checkpoints)
    }

    #[test]
    fn a_restart_from_any_checkpoint_after_glitches_and_returns_scores_on_the_same() {
        let top = i64::MAX as u64;
        // A glitch and a return, a duplicate, a jump ahead and a return into
        // what it skipped.
        let seqs = [0, 1, 2, 3, top, 4, 5, 5, 6, 20, 21, 7, 8, 9, 20, 22];
        let records: Vec<(u64, i64)> = seqs.iter().copied().zip(0..).collect();
        let (first, scores, checkpoints) = run_records(&mut engine(), &records);
        assert_eq!(
            first
                .iter()
                .filter(|a| matches!(a, Admission::Duplicate { .. }))
                .count(),
            2,
            "the repeated 5, and 20 which the jump took: {first:?}"
        );
        assert!(scores.iter().any(|(seq, _)| *seq == 9), "{scores:?}");
        assert!(checkpoints.len() > 8);
        for (at, checkpoint) in checkpoints {
            let json = serde_json::to_string(&checkpoint.state).unwrap();
            let mut checkpoint = checkpoint;
            checkpoint.state = serde_json::from_str(&json).unwrap();
            checkpoint.last_origin = None;
            let refill_from = checkpoint.refill_from;
            let mut engine = engine();
            engine.restore(Restore {
                partition: 0,
                committed: Some(at + 1),
                checkpoints: vec![checkpoint],
            });
            let (again, rescored, _) = run_records(&mut engine, &records);
            for (offset, (first, again)) in (0..).zip(first.iter().zip(&again)) {
                // Older than the window, or refilled up to the checkpoint's
                // record; duplicates stay duplicates.
                let expected = if offset < refill_from
                    || (offset <= at && !matches!(first, Admission::Duplicate { .. }))
                {
                    Admission::Refill
                } else {
                    *first
                };
                assert_eq!(
                    *again, expected,
                    "restored at offset {at} (refill from {refill_from}): record {offset} \
                     (seq {})",
                    seqs[offset as usize]
                );
            }
            let after: Vec<(u64, f32)> = scores
                .iter()
                .copied()
                .filter(|(seq, _)| rescored.iter().any(|(s, _)| s == seq))
                .collect();
            assert_eq!(rescored, after, "restored at offset {at}: the same scores");
            assert_eq!(
                rescored.len(),
                scores
                    .iter()
                    .filter(|(seq, _)| {
                        let offset = seqs.iter().position(|s| s == seq).unwrap() as i64;
                        offset > at
                    })
                    .count(),
                "restored at offset {at}: every sample after the checkpoint's is scored"
            );
        }
    }

    #[test]
    fn a_swap_that_changes_shapes_is_refused() {
        let mut engine = engine();
        let mut wider = (*spec()).clone();
        wider.window = 3;
        let runner = Runner {
            backend: Arc::new(LastValue),
            index: 0,
        };
        let err = engine.swap_model(Arc::new(wider), runner).unwrap_err();
        assert!(
            matches!(&err, EngineError::ShapeChange { from, to, .. } if from.0 == 2 && to.0 == 3),
            "{err:?}"
        );
        assert_eq!(engine.model_spec(0).window, 2);
    }
}
