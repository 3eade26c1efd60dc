//! From forecasts to anomaly scores, thresholds and events, one channel at a time.
//!
//! A sample's error is how far its value lands from the one-step forecast made
//! at the previous sample (telemanom's prediction error), smoothed with an
//! exponentially weighted moving average. Each sample gets one score, the
//! largest of five label-free parts, each in a room of its own and each
//! scaled so that reaching its own limit means reaching the threshold in
//! force:
//!
//! - [`surprise`]: the smoothed error in the model's train error spreads;
//! - [`burst`]: the smoothed error in the stream's own recent error spreads;
//! - [`level`]: how far the value lies outside the stream's [`baseline`] range;
//! - [`excursion`]: how long the value has lain a little outside that range;
//! - [`stuck`]: how long the value has repeated exactly.
//!
//! A sample is anomalous when its score exceeds the threshold in force
//! ([`threshold`]: fixed until the stream has a history, then fitted to the
//! surprise's own tail); [`events`] open and close from that verdict, naming
//! the part that opened them.
//!
//! Each part owns its settings (a `[detect.<part>]` table of the pipeline
//! file, whose defaults are the shipped settings, so a pipeline file only
//! overrides), its state, its validation and its score. Adding a part: a
//! file here, a field in [`DetectSettings`] and [`DetectorState`], a line in
//! [`ChannelDetector::step`]'s fold and a [`Cause`].
//!
//! No number poisons the state: every part saturates where f32 would
//! overflow, so any finite value and forecast give a score within
//! ±[`MAX_SCORE`] and leave a state that a checkpoint (JSON) holds exactly;
//! forecast steps are kept as [`finite_forecast`] makes them; and a score no
//! threshold can reach teaches the dynamic threshold nothing.

pub mod baseline;
pub mod burst;
pub mod events;
pub mod excursion;
pub mod level;
pub mod stuck;
pub mod surprise;
pub mod threshold;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::{repository::ErrorCalibration, telemetry::MAX_ABS_VALUE};
use baseline::{Baseline, BaselineSettings};
use burst::{BurstSettings, ErrorSpread};
pub use events::{Cause, EventChange, EventSpan};
use events::{EventSettings, OpenEvent};
use excursion::{ExcursionSettings, Excursions};
use level::LevelSettings;
use stuck::{StuckRun, StuckSettings};
use surprise::SurpriseSettings;
use threshold::{DynamicThreshold, ThresholdSettings};

/// A `[detect]` setting its part does not accept: the dotted key under
/// `[detect]` (what `--detect` and the pipeline file name) and why.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct InvalidSetting {
    pub key: &'static str,
    pub message: String,
}

impl InvalidSetting {
    pub fn new(key: &'static str, message: impl Into<String>) -> Self {
        Self {
            key,
            message: message.into(),
        }
    }
}

/// Detection settings: one set for every channel (`[detect]` in the
/// pipeline file, one nested table per part). The defaults are the shipped
/// settings, chosen out of fold (docs/detection.md).
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DetectSettings {
    /// Weight of the newest error in the moving average (0 < alpha <= 1),
    /// for the surprise and the burst.
    pub ewma_alpha: f32,
    pub threshold: ThresholdSettings,
    pub events: EventSettings,
    pub surprise: SurpriseSettings,
    pub burst: BurstSettings,
    pub baseline: BaselineSettings,
    pub level: LevelSettings,
    pub excursion: ExcursionSettings,
    pub stuck: StuckSettings,
}

impl Default for DetectSettings {
    fn default() -> Self {
        Self {
            ewma_alpha: 0.1,
            threshold: ThresholdSettings::default(),
            events: EventSettings::default(),
            surprise: SurpriseSettings::default(),
            burst: BurstSettings::default(),
            baseline: BaselineSettings::default(),
            level: LevelSettings::default(),
            excursion: ExcursionSettings::default(),
            stuck: StuckSettings::default(),
        }
    }
}

/// Keys `[detect]` held before each part had its own table, and where they
/// live now: a pipeline file that still uses one is refused with the way
/// to the new key.
pub const MOVED_KEYS: &[(&str, &str)] = &[
    ("threshold", "threshold.fixed"),
    ("min_event_gap", "events.min_gap"),
    ("max_event_samples", "events.max_samples"),
    ("baseline_samples", "baseline.samples"),
    ("min_baseline_width", "baseline.min_width"),
    ("max_train_drift", "baseline.max_train_drift"),
    ("level_threshold", "level.threshold"),
    ("excursion_samples", "excursion.samples"),
    ("excursion_margin", "excursion.margin"),
    ("calibration_samples", "threshold.calibration_samples"),
    ("initial_quantile", "threshold.initial_quantile"),
    ("risk", "threshold.risk"),
    ("min_peaks", "threshold.min_peaks"),
    ("min_threshold", "threshold.min"),
    ("stuck_run_factor", "stuck.factor"),
    ("min_stuck_run", "stuck.min_run"),
    ("forecast_surprise", "surprise.enabled"),
    ("min_error_std", "surprise.min_error_std"),
    ("burst_window", "burst.window"),
    ("burst_threshold", "burst.threshold"),
    ("min_burst_std", "burst.min_std"),
];

impl DetectSettings {
    /// The forecast surprise alone against the fixed threshold of 10, every
    /// other part off: what tests build a part's case on.
    pub fn bare() -> Self {
        Self {
            ewma_alpha: 0.1,
            threshold: ThresholdSettings::FIXED,
            events: EventSettings {
                min_gap: 50,
                max_samples: 0,
            },
            surprise: SurpriseSettings::UNFLOORED,
            burst: BurstSettings::OFF,
            baseline: BaselineSettings::OFF,
            level: LevelSettings::default(),
            excursion: ExcursionSettings::OFF,
            stuck: StuckSettings::OFF,
        }
    }

    pub fn validate(&self) -> Result<(), InvalidSetting> {
        if !(self.ewma_alpha > 0.0 && self.ewma_alpha <= 1.0) {
            return Err(InvalidSetting::new(
                "ewma_alpha",
                format!("detect.ewma_alpha = {} must be in (0, 1]", self.ewma_alpha),
            ));
        }
        self.threshold.validate(MAX_SCORE)?;
        self.events.validate()?;
        self.surprise.validate()?;
        self.burst.validate()?;
        self.baseline.validate()?;
        self.level.validate()?;
        self.excursion.validate(self.baseline.samples)?;
        self.stuck.validate(self.baseline.samples)?;
        Ok(())
    }
}

/// A scored sample.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scored {
    pub score: f32,
    pub threshold: f32,
    pub anomalous: bool,
    /// The part that gave the score (the highest).
    pub cause: Cause,
}

/// One channel's detector: its settings and its state.
#[derive(Debug, Clone)]
pub struct ChannelDetector {
    settings: DetectSettings,
    calibration: ErrorCalibration,
    state: DetectorState,
}

/// Everything a channel's detector carries from one sample to the next, and
/// nothing else: crash recovery checkpoints it (as JSON) and restores it, so
/// it stays small and serialisable. A part added later is `#[serde(default)]`,
/// so an older checkpoint still loads and the part starts afresh.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DetectorState {
    /// The forecast made at the previous sample: the seq it was made at, and
    /// the horizon in the input's units.
    last_forecast: Option<(u64, Vec<f32>)>,
    smoothed_error: Option<f32>,
    open: Option<OpenEvent>,
    baseline: Baseline,
    /// Absent from checkpoints written before the dynamic threshold existed.
    #[serde(default)]
    threshold: Option<DynamicThreshold>,
    /// Absent from checkpoints written before the stuck score existed: the
    /// run in progress then counts as normal.
    #[serde(default)]
    stuck: StuckRun,
    /// Absent from checkpoints written before the excursion score existed:
    /// the count starts afresh.
    #[serde(default)]
    excursions: Excursions,
    /// Absent from checkpoints written before the burst score existed: the
    /// spread is learnt afresh.
    #[serde(default)]
    errors: ErrorSpread,
}

/// No score goes beyond ±this (in score units: train error standard
/// deviations). Far above any threshold in force ([`threshold::MAX_THRESHOLD`],
/// and `detect.threshold.fixed` is validated below it), so a score held here
/// is still anomalous; far inside f32's range, so a score, its square and the
/// sums a consumer makes of scores stay finite. Every score part is held
/// within it: an extreme value, a model's wild forecast or a tiny train
/// error spread overflowed f32 to infinity before.
pub const MAX_SCORE: f32 = 1e12;

/// `x` held within ±`max`. NaN, which the finite operands here do not
/// produce (the arithmetic saturates first), reads as `max`: the cautious
/// reading.
fn saturate(x: f32, max: f32) -> f32 {
    if x.is_nan() {
        max
    } else {
        x.clamp(-max, max)
    }
}

/// Makes a forecast (in the input's units) fit to publish and to learn
/// from, in place: a step that is NaN becomes `value`, the sample's own
/// value (persistence: the forecast that assumes nothing); a step beyond
/// ±[`MAX_ABS_VALUE`] (infinities included) becomes that bound, since no
/// value beyond it is accepted. A model fed values near the bound, or
/// running in FP16, can return either. Returns how many steps it replaced.
pub fn finite_forecast(horizon: &mut [f32], value: f32) -> usize {
    let persistence = saturate(value, MAX_ABS_VALUE);
    let mut replaced = 0;
    for step in horizon {
        let finite = if step.is_nan() {
            persistence
        } else {
            step.clamp(-MAX_ABS_VALUE, MAX_ABS_VALUE)
        };
        if finite.to_bits() != step.to_bits() {
            *step = finite;
            replaced += 1;
        }
    }
    replaced
}

impl ChannelDetector {
    pub fn new(settings: DetectSettings, calibration: ErrorCalibration) -> Self {
        Self::restore(settings, calibration, DetectorState::default())
    }

    /// A detector that goes on from a checkpointed `state`.
    pub fn restore(
        settings: DetectSettings,
        calibration: ErrorCalibration,
        state: DetectorState,
    ) -> Self {
        Self {
            settings,
            calibration,
            state,
        }
    }

    /// Takes a new model version's error calibration for the samples to come.
    pub fn set_calibration(&mut self, calibration: ErrorCalibration) {
        self.calibration = calibration;
    }

    /// The state to checkpoint.
    pub fn state(&self) -> &DetectorState {
        &self.state
    }

    /// Heap bytes the state holds once the stream runs, for per-channel
    /// accounting: the last forecast (`horizon` values) and the excursion
    /// ring, counted from the start although both are allocated later.
    pub fn heap_bytes(&self, horizon: usize) -> usize {
        let forecast = self
            .state
            .last_forecast
            .as_ref()
            .map_or(0, |(_, h)| h.capacity())
            .max(horizon);
        let ring = if self.settings.excursion.samples > 0 {
            Excursions::words(self.settings.baseline.samples)
        } else {
            0
        };
        forecast * std::mem::size_of::<f32>() + ring * std::mem::size_of::<u32>()
    }

    /// Takes the sample `seq` (its target `value`) and the forecast the model
    /// made from the window ending at it. Returns its score, unless no earlier
    /// forecast covers it (warm-up, or a gap longer than the horizon), and any
    /// event change it caused.
    ///
    /// Any finite `value` and any `forecast` give a finite score and leave a
    /// finite state (the forecast is kept as [`finite_forecast`] makes it).
    /// A value that is not finite, which the decoder refuses, is not scored
    /// and changes nothing.
    pub fn step(
        &mut self,
        seq: u64,
        ts: DateTime<Utc>,
        value: f32,
        forecast: &[f32],
    ) -> (Option<Scored>, Option<EventChange>) {
        if !value.is_finite() {
            return (None, None);
        }
        let predicted = self
            .state
            .last_forecast
            .as_ref()
            .and_then(|(made_at, horizon)| {
                let step = seq.checked_sub(*made_at)?.checked_sub(1)?;
                horizon.get(usize::try_from(step).ok()?).copied()
            });
        match &mut self.state.last_forecast {
            Some((made_at, horizon)) => {
                *made_at = seq;
                horizon.clear();
                horizon.extend_from_slice(forecast);
                finite_forecast(horizon, value);
            }
            None => {
                let mut horizon = forecast.to_vec();
                finite_forecast(&mut horizon, value);
                self.state.last_forecast = Some((seq, horizon));
            }
        }
        let Some(predicted) = predicted else {
            return (None, None);
        };

        // Each step saturates rather than overflow: a value and a forecast
        // far apart, or a train error spread near zero, reach infinity in
        // f32, which no checkpoint can hold and no threshold can learn from.
        // In range the saturation changes nothing, bit for bit.
        let s = &self.settings;
        let error = saturate((value - predicted).abs(), f32::MAX);
        let alpha = s.ewma_alpha;
        let smoothed = match self.state.smoothed_error {
            Some(previous) => saturate(alpha * error + (1.0 - alpha) * previous, f32::MAX),
            None => error,
        };
        self.state.smoothed_error = Some(smoothed);
        let surprise = s.surprise.score(&self.calibration, smoothed);
        let burst = self.state.errors.score(&s.burst, smoothed, error);
        let spot = s.threshold.spot();
        let dynamic = self
            .state
            .threshold
            .get_or_insert_with(|| DynamicThreshold::new(&spot));
        let threshold = dynamic.current(s.threshold.fixed);
        // The threshold learns from the surprise alone, before this sample's
        // verdict is known to anyone, and only from surprises below it.
        dynamic.update(&spot, surprise, surprise > threshold);
        // The other parts come in units of their own limits: scaled to the
        // threshold in force, reaching a limit means reaching the threshold.
        let in_baseline = self.state.baseline.in_progress(&s.baseline);
        let drifts = self.calibration.train_drift > s.baseline.max_train_drift;
        let novelty = self
            .state
            .baseline
            .novelty(&s.baseline, value)
            .filter(|_| !drifts);
        let scaled = |part: f32| saturate(part * threshold, MAX_SCORE);
        let level = novelty.map(|n| scaled(s.level.score(n)));
        let excursion = novelty
            .and_then(|n| {
                self.state
                    .excursions
                    .score(&s.excursion, s.baseline.samples, n)
            })
            .map(scaled);
        let stuck = self
            .state
            .stuck
            .score(&s.stuck, value, in_baseline)
            .map(scaled);
        let burst = burst.map(scaled);
        let surprise = if s.surprise.enabled {
            surprise
        } else {
            f32::MIN
        };
        // The first of equal parts wins, so a tie names the forecast.
        let (score, cause) = [
            (burst, Cause::Burst),
            (level, Cause::Level),
            (excursion, Cause::Excursion),
            (stuck, Cause::Stuck),
        ]
        .into_iter()
        .filter_map(|(part, cause)| Some((part?, cause)))
        .fold((surprise, Cause::Surprise), |best, part| {
            if part.0 > best.0 {
                part
            } else {
                best
            }
        });
        let anomalous = score > threshold;
        let scored = Scored {
            score,
            threshold,
            anomalous,
            cause,
        };
        let change = events::track(&mut self.state.open, &s.events, seq, ts, scored);
        self.rebaseline_after_long_event(seq);
        (Some(scored), change)
    }

    /// After an event open for `events.max_samples`: the level the stream
    /// has kept that long is its new normal. The baseline range is set again
    /// from the samples to come, the excursion ring empties, and a run of
    /// repeats in progress counts as the stream's normal behaviour.
    fn rebaseline_after_long_event(&mut self, seq: u64) {
        let max = self.settings.events.max_samples;
        let Some(open) = &self.state.open else {
            return;
        };
        if max == 0 || seq.saturating_sub(open.span.start_seq) + 1 < max {
            return;
        }
        if self.state.baseline.in_progress(&self.settings.baseline) {
            return; // Already being set again.
        }
        self.state.baseline.restart();
        self.state.excursions = Excursions::default();
        self.state.stuck.from_baseline = true;
    }

    /// The event open on this channel, if any.
    pub fn open_event(&self) -> Option<&EventSpan> {
        self.state.open.as_ref().map(|o| &o.span)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::{
        baseline::BaselineSettings, burst::BurstSettings, events::EventSettings,
        excursion::ExcursionSettings, level::LevelSettings, stuck::StuckSettings,
        surprise::SurpriseSettings, threshold::ThresholdSettings,
    };

    fn detector(gap: u64) -> ChannelDetector {
        ChannelDetector::new(
            DetectSettings {
                ewma_alpha: 1.0,
                threshold: ThresholdSettings {
                    fixed: 3.0,
                    ..DetectSettings::bare().threshold
                },
                events: EventSettings {
                    min_gap: gap,
                    ..DetectSettings::bare().events
                },
                ..DetectSettings::bare()
            },
            unit_errors(),
        )
    }

    /// Errors in their own units: the surprise is the smoothed error.
    fn unit_errors() -> ErrorCalibration {
        ErrorCalibration {
            mean: 0.0,
            std: 1.0,
            train_drift: 0.0,
        }
    }

    fn ts() -> DateTime<Utc> {
        DateTime::UNIX_EPOCH
    }

    #[test]
    fn first_sample_is_warm_up_then_uses_the_previous_one_step_forecast() {
        let mut d = detector(1);
        assert_eq!(d.step(10, ts(), 0.0, &[1.0, 2.0]).0, None);
        let (scored, _) = d.step(11, ts(), 3.0, &[0.0, 0.0]);
        assert_eq!(scored.unwrap().score, 2.0, "|3 - 1|");
    }

    #[test]
    fn a_gap_uses_the_matching_horizon_step_and_a_longer_gap_scores_nothing() {
        let mut d = detector(1);
        d.step(10, ts(), 0.0, &[1.0, 2.0]);
        assert_eq!(
            d.step(12, ts(), 2.5, &[0.0, 0.0]).0.unwrap().score,
            0.5,
            "seq 12 is step 2 of the forecast"
        );
        assert_eq!(d.step(15, ts(), 0.0, &[0.0, 0.0]).0, None);
    }

    #[test]
    fn level_novelty_scores_values_outside_the_baseline_range() {
        let settings = DetectSettings {
            ewma_alpha: 1.0,
            threshold: ThresholdSettings {
                fixed: 10.0,
                ..DetectSettings::bare().threshold
            },
            events: EventSettings {
                min_gap: 1,
                ..DetectSettings::bare().events
            },
            baseline: BaselineSettings {
                samples: 3,
                ..DetectSettings::bare().baseline
            },
            level: LevelSettings { threshold: 0.5 },
            ..DetectSettings::bare()
        };
        let mut d = ChannelDetector::new(settings, unit_errors());
        d.step(0, ts(), 0.0, &[0.0]);
        // Baseline: values 0.0, 0.2, 0.4 (range width 0.4), forecast exact.
        for (seq, v) in [(1, 0.0), (2, 0.2), (3, 0.4)] {
            let (scored, _) = d.step(seq, ts(), v, &[if seq < 3 { v + 0.2 } else { 0.4 }]);
            assert_eq!(
                scored.unwrap().score,
                0.0,
                "no level score during the baseline"
            );
        }
        // Inside the range: no level score. 0.2 above it: 0.5 widths = the threshold.
        assert_eq!(d.step(4, ts(), 0.4, &[0.6]).0.unwrap().score, 0.0);
        let scored = d.step(5, ts(), 0.6, &[0.6]).0.unwrap();
        assert!((scored.score - 10.0).abs() < 1e-4, "{scored:?}");
        let scored = d.step(6, ts(), 1.0, &[1.0]).0.unwrap();
        assert!(
            scored.anomalous && scored.score > 10.0,
            "persists while the level stays out: {scored:?}"
        );
    }

    /// A detector that scores only stuck runs (the threshold is out of reach
    /// of the forecast error), with a baseline of `baseline` samples.
    fn stuck_detector(baseline: u64) -> ChannelDetector {
        ChannelDetector::new(
            DetectSettings {
                ewma_alpha: 1.0,
                threshold: ThresholdSettings {
                    fixed: 100.0,
                    ..DetectSettings::bare().threshold
                },
                events: EventSettings {
                    min_gap: 1,
                    ..DetectSettings::bare().events
                },
                baseline: BaselineSettings {
                    samples: baseline,
                    ..DetectSettings::bare().baseline
                },
                level: LevelSettings { threshold: 1e6 },
                stuck: StuckSettings {
                    factor: 2.0,
                    min_run: 3,
                },
                ..DetectSettings::bare()
            },
            unit_errors(),
        )
    }

    /// Steps `values` through `d` from `seq`, the forecast always exact;
    /// returns the scores.
    fn exact_forecast_scores(d: &mut ChannelDetector, seq: &mut u64, values: &[f32]) -> Vec<f32> {
        values
            .iter()
            .map(|&v| {
                *seq += 1;
                d.step(*seq, ts(), v, &[v]).0.unwrap().score
            })
            .collect()
    }

    #[test]
    fn a_value_repeated_far_longer_than_the_streams_runs_is_stuck() {
        let mut d = stuck_detector(2);
        d.step(0, ts(), 0.0, &[0.0]);
        let mut seq = 0;
        // Baseline 1, 2; then runs of 3 repeats (four equal values).
        exact_forecast_scores(&mut d, &mut seq, &[1.0, 2.0, 3.0, 3.0, 3.0, 3.0, 4.0]);
        assert_eq!(d.state().stuck.longest, 3);
        // The limit is max(2 · 3, 3) = 6 repeats: the 6th is at it, the 7th beyond.
        let scores = exact_forecast_scores(&mut d, &mut seq, &[4.0; 7]);
        assert!((scores[5] - 100.0).abs() < 1e-3, "at the limit: {scores:?}");
        assert!(scores[6] > 100.0, "stuck beyond it: {scores:?}");
        let (scored, _) = d.step(seq + 1, ts(), 4.0, &[4.0]);
        assert!(scored.unwrap().anomalous, "still stuck: {scored:?}");
        // It moves again: no longer stuck, and the stuck run taught nothing.
        seq += 1;
        let scores = exact_forecast_scores(&mut d, &mut seq, &[5.0]);
        assert_eq!(scores, [1.0], "the forecast error |5 - 4| alone");
        assert_eq!(
            d.state().stuck.longest,
            3,
            "a stuck run is not a normal one"
        );
    }

    #[test]
    fn a_channel_constant_since_its_baseline_is_not_stuck() {
        let mut d = stuck_detector(5);
        d.step(0, ts(), 7.0, &[7.0]);
        let mut seq = 0;
        let scores = exact_forecast_scores(&mut d, &mut seq, &[7.0; 100]);
        assert!(scores.iter().all(|&s| s == 0.0), "{scores:?}");
        // Its first change ends a normal run of 99 repeats (100 scored values).
        exact_forecast_scores(&mut d, &mut seq, &[8.0]);
        assert_eq!(d.state().stuck.longest, 99);
    }

    #[test]
    fn ewma_smooths_errors() {
        let mut d = ChannelDetector::new(
            DetectSettings {
                ewma_alpha: 0.5,
                threshold: ThresholdSettings {
                    fixed: 3.0,
                    ..DetectSettings::bare().threshold
                },
                events: EventSettings {
                    min_gap: 1,
                    ..DetectSettings::bare().events
                },
                ..DetectSettings::bare()
            },
            ErrorCalibration {
                mean: 1.0,
                std: 2.0,
                train_drift: 0.0,
            },
        );
        d.step(0, ts(), 0.0, &[0.0]);
        assert_eq!(
            d.step(1, ts(), 4.0, &[0.0]).0.unwrap().score,
            1.5,
            "(4 - 1) / 2"
        );
        assert_eq!(
            d.step(2, ts(), 0.0, &[0.0]).0.unwrap().score,
            0.5,
            "(0.5*0 + 0.5*4 - 1) / 2"
        );
    }

    #[test]
    fn event_opens_once_and_closes_after_the_gap_at_the_last_anomalous_sample() {
        let mut d = detector(2);
        let values = [0.0, 0.0, 9.0, 0.0, 9.0, 0.0, 0.0, 0.0];
        let mut changes = Vec::new();
        for (seq, v) in values.iter().enumerate() {
            let (_, change) = d.step(seq as u64, ts(), *v, &[0.0]);
            changes.extend(change.map(|c| (seq, c)));
        }
        assert_eq!(changes.len(), 2, "{changes:?}");
        let (opened_at, EventChange::Opened(open)) = &changes[0] else {
            panic!("first change opens")
        };
        assert_eq!((*opened_at, open.start_seq, open.end), (2, 2, None));
        let (closed_at, EventChange::Closed(closed)) = &changes[1] else {
            panic!("second change closes")
        };
        assert_eq!(*closed_at, 6, "two normal samples after seq 4");
        assert_eq!(closed.start_seq, 2);
        assert_eq!(closed.end.map(|(s, _)| s), Some(4));
        assert_eq!(closed.peak_score, 9.0);
        assert!(d.open_event().is_none());
    }

    #[test]
    fn the_dynamic_threshold_takes_over_from_the_fixed_one_and_adapts_to_the_stream() {
        let settings = DetectSettings {
            ewma_alpha: 1.0,
            threshold: ThresholdSettings {
                fixed: 100.0,
                calibration_samples: 20,
                initial_quantile: 0.8,
                risk: 0.001,
                min_peaks: 10,
                min: 0.5,
            },
            events: EventSettings {
                min_gap: 1,
                ..DetectSettings::bare().events
            },
            ..DetectSettings::bare()
        };
        let mut d = ChannelDetector::new(settings, unit_errors());
        d.step(0, ts(), 0.0, &[0.0]);
        // A stream whose normal errors have an exponential tail (the 50
        // quantiles -ln((k + 1/2) / 50), scrambled; at most ln 100 = 4.6),
        // all far below the fixed 100.
        let error = |i: u64| -((((i * 37) % 50) as f32 + 0.5) / 50.0).ln();
        let mut thresholds = Vec::new();
        let mut seq = 1;
        while seq <= 200 {
            let (scored, _) = d.step(seq, ts(), error(seq), &[0.0]);
            let scored = scored.unwrap();
            assert!(!scored.anomalous, "normal error at seq {seq}: {scored:?}");
            thresholds.push(scored.threshold);
            seq += 1;
        }
        assert_eq!(
            thresholds[0], 100.0,
            "the fixed threshold while calibrating"
        );
        let fitted = *thresholds.last().unwrap();
        assert!(
            (4.7..20.0).contains(&fitted),
            "fitted above the normal errors, far below the fixed threshold: {fitted}"
        );
        // An error the fixed threshold would have missed is now an anomaly.
        let (scored, change) = d.step(seq, ts(), 30.0, &[0.0]);
        assert!(scored.unwrap().anomalous, "{scored:?}");
        assert!(matches!(change, Some(EventChange::Opened(_))));
    }

    #[test]
    fn settings_outside_their_ranges_are_refused_with_the_key() {
        let bad = [
            DetectSettings {
                threshold: ThresholdSettings {
                    calibration_samples: 3,
                    ..DetectSettings::bare().threshold
                },
                ..DetectSettings::bare()
            },
            DetectSettings {
                threshold: ThresholdSettings {
                    initial_quantile: 1.0,
                    ..DetectSettings::bare().threshold
                },
                ..DetectSettings::bare()
            },
            DetectSettings {
                threshold: ThresholdSettings {
                    risk: 0.05,
                    ..DetectSettings::bare().threshold
                },
                ..DetectSettings::bare()
            },
            DetectSettings {
                threshold: ThresholdSettings {
                    min_peaks: 1,
                    ..DetectSettings::bare().threshold
                },
                ..DetectSettings::bare()
            },
            DetectSettings {
                threshold: ThresholdSettings {
                    min: f32::INFINITY,
                    ..DetectSettings::bare().threshold
                },
                ..DetectSettings::bare()
            },
            DetectSettings {
                stuck: StuckSettings {
                    factor: 0.5,
                    ..DetectSettings::bare().stuck
                },
                baseline: BaselineSettings {
                    samples: 10,
                    ..DetectSettings::bare().baseline
                },
                ..DetectSettings::bare()
            },
            DetectSettings {
                stuck: StuckSettings {
                    factor: 2.0,
                    min_run: 0,
                },
                baseline: BaselineSettings {
                    samples: 10,
                    ..DetectSettings::bare().baseline
                },
                ..DetectSettings::bare()
            },
            DetectSettings {
                stuck: StuckSettings {
                    factor: 2.0,
                    ..DetectSettings::bare().stuck
                },
                baseline: BaselineSettings {
                    samples: 0,
                    ..DetectSettings::bare().baseline
                },
                ..DetectSettings::bare()
            },
            DetectSettings {
                excursion: ExcursionSettings {
                    margin: -0.1,
                    ..DetectSettings::bare().excursion
                },
                ..DetectSettings::bare()
            },
            DetectSettings {
                baseline: BaselineSettings {
                    samples: 10,
                    ..DetectSettings::bare().baseline
                },
                excursion: ExcursionSettings {
                    samples: 10,
                    ..DetectSettings::bare().excursion
                },
                ..DetectSettings::bare()
            },
        ];
        let keys = [
            "threshold.calibration_samples",
            "threshold.initial_quantile",
            "threshold.risk",
            "threshold.min_peaks",
            "threshold.min",
            "stuck.factor",
            "stuck.min_run",
            "baseline.samples",
            "excursion.margin",
            "excursion.samples",
        ];
        for (settings, key) in bad.iter().zip(keys) {
            let err = settings.validate().unwrap_err();
            assert_eq!(err.key, key, "{err}");
            assert!(
                err.to_string().contains(&format!("detect.{key}")),
                "{key}: {err}"
            );
        }
        assert_eq!(DetectSettings::default().validate(), Ok(()));
    }

    #[test]
    fn a_restored_detector_goes_on_exactly_as_the_original() {
        let settings = DetectSettings {
            ewma_alpha: 0.3,
            threshold: ThresholdSettings {
                fixed: 2.0,
                calibration_samples: 20,
                initial_quantile: 0.5,
                risk: 0.1,
                min_peaks: 3,
                min: 0.2,
            },
            events: EventSettings {
                min_gap: 3,
                max_samples: 10,
            },
            baseline: BaselineSettings {
                samples: 4,
                ..DetectSettings::bare().baseline
            },
            level: LevelSettings { threshold: 0.5 },
            stuck: StuckSettings {
                factor: 2.0,
                min_run: 4,
            },
            excursion: ExcursionSettings {
                samples: 2,
                margin: 0.1,
            },
            burst: BurstSettings {
                window: 8,
                threshold: 2.0,
                ..DetectSettings::bare().burst
            },
            ..DetectSettings::bare()
        };
        let calibration = ErrorCalibration {
            mean: 0.1,
            std: 0.5,
            train_drift: 0.0,
        };
        // Small errors with two bursts (seqs 3-4 and 40-41), a stuck value
        // (seqs 20-30) and an excursion beyond the baseline (seqs 42-43).
        let values: Vec<f32> = (0..60u64)
            .map(|i| match i {
                3 | 4 | 40 | 41 => 2.5,
                42 | 43 => 3.0,
                20..=30 => 0.2,
                _ => 0.1 * ((i * 7) % 5) as f32,
            })
            .collect();
        for checkpoint_at in [4, 9, 27, 45] {
            let mut original = ChannelDetector::new(settings, calibration);
            let mut resumed: Option<ChannelDetector> = None;
            for (seq, v) in values.iter().enumerate() {
                let forecast = [0.1 * (seq % 3) as f32, 0.0];
                let step = original.step(seq as u64, ts(), *v, &forecast);
                if let Some(r) = resumed.as_mut() {
                    assert_eq!(
                        step,
                        r.step(seq as u64, ts(), *v, &forecast),
                        "seq {seq}, resumed after {checkpoint_at}"
                    );
                }
                if seq == checkpoint_at {
                    // Through JSON as the checkpoint stores it.
                    let json = serde_json::to_string(original.state()).unwrap();
                    assert!(json.len() < 4096, "{} bytes", json.len());
                    let state = serde_json::from_str(&json).unwrap();
                    resumed = Some(ChannelDetector::restore(settings, calibration, state));
                }
            }
            let resumed = resumed.unwrap();
            assert_eq!(resumed.state(), original.state());
            assert_eq!(
                serde_json::to_string(resumed.state()).unwrap(),
                serde_json::to_string(original.state()).unwrap(),
                "bitwise the same state, resumed after {checkpoint_at}"
            );
        }
        // The checkpoints covered an open event, calibration and a fitted threshold.
        let mut d = ChannelDetector::new(settings, calibration);
        let mut opened_by_4 = false;
        let mut stuck_by_27 = StuckRun::default();
        for (seq, v) in values.iter().enumerate().take(46) {
            d.step(seq as u64, ts(), *v, &[0.1 * (seq % 3) as f32, 0.0]);
            if seq == 4 {
                opened_by_4 = d.open_event().is_some();
            }
            if seq == 27 {
                stuck_by_27 = d.state().stuck;
            }
        }
        assert!(opened_by_4, "the seq-4 checkpoint carries an open event");
        assert_eq!(
            (stuck_by_27.run, stuck_by_27.from_baseline),
            (7, false),
            "the seq-27 checkpoint carries a stuck run"
        );
        let json = serde_json::to_value(d.state()).unwrap();
        assert!(
            json["threshold"]["fitted"].is_number(),
            "the seq-45 checkpoint carries a fitted threshold: {json}"
        );
        assert!(
            d.state().excursions.count() > 0,
            "the seq-45 checkpoint carries excursions: {json}"
        );
    }

    /// Finite values a producer could send or a model return, at the edges
    /// of f32 and of what the decoder accepts.
    fn extreme_values() -> Vec<f32> {
        let subnormal = f32::from_bits(1);
        let bound = crate::telemetry::MAX_ABS_VALUE;
        vec![
            f32::MAX,
            -f32::MAX,
            3e38,
            1e37,
            bound,
            -bound,
            f32::MIN_POSITIVE,
            -f32::MIN_POSITIVE,
            subnormal,
            -subnormal,
            0.0,
            -0.0,
        ]
    }

    /// Settings that turn each score part on alone, then all of them.
    fn every_score_part() -> Vec<(&'static str, DetectSettings)> {
        let base = DetectSettings {
            ewma_alpha: 0.5,
            threshold: ThresholdSettings {
                fixed: 3.0,
                ..DetectSettings::bare().threshold
            },
            events: EventSettings {
                min_gap: 2,
                ..DetectSettings::bare().events
            },
            ..DetectSettings::bare()
        };
        let level = DetectSettings {
            baseline: BaselineSettings {
                samples: 8,
                ..base.baseline
            },
            level: LevelSettings { threshold: 0.5 },
            ..base
        };
        let excursion = DetectSettings {
            baseline: BaselineSettings {
                samples: 8,
                ..base.baseline
            },
            level: LevelSettings { threshold: 1e6 },
            excursion: ExcursionSettings {
                samples: 3,
                margin: 0.1,
            },
            ..base
        };
        let stuck = DetectSettings {
            baseline: BaselineSettings {
                samples: 8,
                ..base.baseline
            },
            level: LevelSettings { threshold: 1e6 },
            stuck: StuckSettings {
                factor: 2.0,
                min_run: 3,
            },
            ..base
        };
        let dynamic = DetectSettings {
            threshold: ThresholdSettings {
                calibration_samples: 10,
                initial_quantile: 0.8,
                risk: 0.01,
                min_peaks: 3,
                min: 0.5,
                ..base.threshold
            },
            ..base
        };
        let all = DetectSettings {
            level: LevelSettings { threshold: 0.5 },
            excursion: ExcursionSettings {
                samples: 3,
                margin: 0.1,
            },
            stuck: StuckSettings {
                factor: 2.0,
                min_run: 3,
            },
            ..dynamic
        };
        let all = DetectSettings {
            baseline: BaselineSettings {
                samples: 8,
                ..all.baseline
            },
            ..all
        };
        let burst = DetectSettings {
            surprise: SurpriseSettings {
                enabled: false,
                ..base.surprise
            },
            burst: BurstSettings {
                window: 8,
                threshold: 3.0,
                min_std: 0.001,
            },
            ..base
        };
        let all = DetectSettings {
            burst: BurstSettings {
                window: 8,
                ..all.burst
            },
            events: EventSettings {
                max_samples: 5,
                ..all.events
            },
            ..all
        };
        let parts = vec![
            ("surprise", base),
            ("burst", burst),
            ("level", level),
            ("excursion", excursion),
            ("stuck", stuck),
            ("dynamic threshold", dynamic),
            ("every part", all),
        ];
        for (name, settings) in &parts {
            assert_eq!(settings.validate(), Ok(()), "{name}");
        }
        parts
    }

    /// Train error statistics as a repository may hold them: ordinary, and
    /// spreads so small (or means so large) that a surprise overflows f32.
    fn extreme_calibrations() -> Vec<ErrorCalibration> {
        vec![
            unit_errors(),
            ErrorCalibration {
                mean: 0.1,
                std: f32::MIN_POSITIVE,
                train_drift: 0.0,
            },
            ErrorCalibration {
                mean: 0.0,
                std: f32::from_bits(1),
                train_drift: 0.0,
            },
            ErrorCalibration {
                mean: 3e38,
                std: 1e-30,
                train_drift: 0.0,
            },
        ]
    }

    /// The state is finite if JSON (as the checkpoint stores it) takes it
    /// and gives the same state back: serde_json writes an infinite or NaN
    /// f32 as null and an infinite f64 string as "inf", neither of which
    /// reads back as the same state.
    fn assert_checkpoint_reads_back(d: &ChannelDetector, context: &str) {
        let json = serde_json::to_string(d.state()).unwrap();
        let back: Result<DetectorState, _> = serde_json::from_str(&json);
        assert_eq!(back.as_ref().ok(), Some(d.state()), "{context}: {json}");
    }

    fn assert_finite_step(step: &(Option<Scored>, Option<EventChange>), context: &str) {
        if let Some(scored) = step.0 {
            assert!(
                scored.score.is_finite() && scored.threshold.is_finite(),
                "{context}: {scored:?}"
            );
        }
        if let Some(EventChange::Opened(span) | EventChange::Closed(span)) = &step.1 {
            assert!(
                span.peak_score.is_finite() && span.threshold.is_finite(),
                "{context}: {span:?}"
            );
        }
    }

    #[test]
    fn extreme_values_at_any_moment_leave_every_score_part_finite_and_the_state_readable() {
        // Moments, in scored samples: the first, inside the baseline (8)
        // and the calibration (10), just after them, and long after the fit.
        let moments = [0, 3, 7, 9, 12, 30];
        let normal = |i: usize| ((i * 37) % 11) as f32 / 10.0;
        for (part, settings) in every_score_part() {
            for calibration in extreme_calibrations() {
                for x in extreme_values() {
                    for at in moments {
                        // x as the value once, as the forecast once, as both,
                        // for a long constant run, and in huge steps.
                        for how in ["value", "forecast", "both", "run", "steps"] {
                            let context = format!(
                                "{part}, {calibration:?}: {x} as {how} at scored sample {at}"
                            );
                            let mut d = ChannelDetector::new(settings, calibration);
                            d.step(0, ts(), normal(0), &[normal(0), normal(0)]);
                            for i in 1..=60usize {
                                let k = i - 1; // scored samples before this one
                                let hit = match how {
                                    "run" => (at..at + 30).contains(&k),
                                    "steps" => (at..at + 10).contains(&k),
                                    _ => k == at,
                                };
                                let sign = if how == "steps" && k % 2 == 1 {
                                    -1.0
                                } else {
                                    1.0
                                };
                                let (mut value, mut forecast) = (normal(i), normal(i));
                                if hit {
                                    if how != "forecast" {
                                        value = sign * x;
                                    }
                                    if how == "forecast" || how == "both" {
                                        forecast = sign * x;
                                    }
                                }
                                let step = d.step(i as u64, ts(), value, &[forecast, forecast]);
                                assert!(step.0.is_some(), "{context}: sample {i} is scored");
                                assert_finite_step(&step, &format!("{context}, sample {i}"));
                                if hit || k == at + 1 {
                                    assert_checkpoint_reads_back(
                                        &d,
                                        &format!("{context}, sample {i}"),
                                    );
                                }
                            }
                            assert_checkpoint_reads_back(&d, &context);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn a_forecast_step_that_is_not_finite_is_never_kept() {
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1e30, -3e38] {
            let mut d = detector(1);
            d.step(0, ts(), 0.5, &[bad, 0.25]);
            assert_checkpoint_reads_back(&d, &format!("forecast {bad}"));
            let (scored, _) = d.step(1, ts(), 0.5, &[0.5, bad]);
            let scored = scored.unwrap();
            assert!(scored.score.is_finite(), "{bad}: {scored:?}");
            assert_checkpoint_reads_back(&d, &format!("forecast {bad}, then"));
        }
    }

    #[test]
    fn an_error_far_beyond_the_channels_own_is_anomalous_for_every_part() {
        let bound = crate::telemetry::MAX_ABS_VALUE;
        for (part, settings) in every_score_part() {
            for calibration in extreme_calibrations().into_iter().take(3) {
                for (value, forecast) in [
                    (bound, 0.0),
                    (-bound, bound),
                    (f32::MAX, -f32::MAX),
                    (0.0, f32::MAX),
                ] {
                    let mut d = ChannelDetector::new(settings, calibration);
                    for i in 0..40u64 {
                        let v = (i % 3) as f32 / 10.0;
                        d.step(i, ts(), v, &[v]);
                    }
                    d.step(40, ts(), 0.1, &[forecast]);
                    let (scored, _) = d.step(41, ts(), value, &[0.0]);
                    let scored = scored.unwrap();
                    assert!(
                        scored.anomalous && scored.score.is_finite(),
                        "{part}, {calibration:?}: {value} after a forecast of {forecast}: \
                         {scored:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_checkpoint_from_before_the_excursion_score_starts_its_count_afresh() {
        let settings = DetectSettings {
            ewma_alpha: 1.0,
            threshold: ThresholdSettings {
                fixed: 100.0,
                ..DetectSettings::bare().threshold
            },
            events: EventSettings {
                min_gap: 1,
                ..DetectSettings::bare().events
            },
            baseline: BaselineSettings {
                samples: 2,
                ..DetectSettings::bare().baseline
            },
            level: LevelSettings { threshold: 1e6 },
            excursion: ExcursionSettings {
                samples: 1,
                ..DetectSettings::bare().excursion
            },
            ..DetectSettings::bare()
        };
        let mut d = ChannelDetector::new(settings, unit_errors());
        let mut seq = 0;
        d.step(0, ts(), 0.0, &[0.0]);
        exact_forecast_scores(&mut d, &mut seq, &[0.0, 1.0, 2.0]);
        let mut json = serde_json::to_value(d.state()).unwrap();
        json.as_object_mut().unwrap().remove("excursions");
        let state = serde_json::from_value(json).unwrap();
        let mut d = ChannelDetector::restore(settings, unit_errors(), state);
        let scores = exact_forecast_scores(&mut d, &mut seq, &[2.0, 2.0]);
        assert_eq!(scores, [100.0, 200.0], "1 then 2 excursions in the last 2");
    }

    /// A detector that scores only sustained excursions (its forecast errors
    /// are a millionth of the train error's spread): a baseline of 4 samples,
    /// anomalous while more than 2 of the last 4 lay more than 0.1 widths
    /// outside it.
    fn excursion_detector() -> ChannelDetector {
        ChannelDetector::new(
            DetectSettings {
                ewma_alpha: 1.0,
                threshold: ThresholdSettings {
                    fixed: 100.0,
                    ..DetectSettings::bare().threshold
                },
                events: EventSettings {
                    min_gap: 1,
                    ..DetectSettings::bare().events
                },
                baseline: BaselineSettings {
                    samples: 4,
                    ..DetectSettings::bare().baseline
                },
                level: LevelSettings { threshold: 1e6 },
                excursion: ExcursionSettings {
                    samples: 2,
                    margin: 0.1,
                },
                ..DetectSettings::bare()
            },
            ErrorCalibration {
                mean: 0.0,
                std: 1e6,
                train_drift: 0.0,
            },
        )
    }

    #[test]
    fn a_level_a_little_off_for_long_enough_is_a_sustained_excursion() {
        let mut d = excursion_detector();
        d.step(0, ts(), 0.0, &[0.0]);
        let mut seq = 0;
        // Baseline range [0, 1]: no excursion score yet.
        let rounded = |scores: Vec<f32>| scores.iter().map(|s| s.round()).collect::<Vec<_>>();
        let scores = exact_forecast_scores(&mut d, &mut seq, &[0.0, 1.0, 0.5, 0.5]);
        assert_eq!(rounded(scores), [0.0; 4]);
        // 1.05 is within the margin; each 1.2 is an excursion (0.2 widths
        // out), scored as its share of the limit of 2: the third is beyond it.
        let scores = exact_forecast_scores(&mut d, &mut seq, &[1.05, 1.2, 1.2, 1.2]);
        assert_eq!(rounded(scores), [0.0, 50.0, 100.0, 150.0]);
        // Below the range counts too; back inside, the count decays as the
        // excursions leave the last 4 samples, and the stream is anomalous
        // until it falls to the limit.
        let anomalous: Vec<bool> = [-0.2, 0.5, 0.5, 0.5, 0.5]
            .into_iter()
            .map(|v| {
                seq += 1;
                d.step(seq, ts(), v, &[v]).0.unwrap().anomalous
            })
            .collect();
        assert_eq!(anomalous, [true, true, false, false, false]);
        assert_eq!(d.state().excursions.count(), 0);
    }

    #[test]
    fn excursions_are_counted_over_the_last_baseline_samples_only() {
        let mut d = excursion_detector();
        d.step(0, ts(), 0.0, &[0.0]);
        let mut seq = 0;
        exact_forecast_scores(&mut d, &mut seq, &[0.0, 1.0, 0.5, 0.5]);
        // One excursion every other sample never puts 3 in any 4 in a row.
        let values: Vec<f32> = (0..40)
            .map(|i| if i % 2 == 0 { 1.5 } else { 0.5 })
            .collect();
        let scores = exact_forecast_scores(&mut d, &mut seq, &values);
        assert!(scores.iter().all(|&s| s <= 100.0), "{scores:?}");
        assert_eq!(d.state().excursions.bits.len(), 1, "4 bits fit one word");
    }

    /// A quiet stream (errors about 0.01) with pulses inside its range at
    /// `pulses`, each 3 samples long.
    fn quiet_stream(
        d: &mut ChannelDetector,
        pulses: &[u64],
    ) -> Vec<(u64, Scored, Option<EventChange>)> {
        let mut out = Vec::new();
        for seq in 0..400u64 {
            let wobble = 0.01 * ((seq * 7) % 3) as f32;
            let pulse = pulses.iter().any(|p| (*p..p + 3).contains(&seq));
            let value = if pulse { 0.5 } else { wobble };
            let (scored, change) = d.step(seq, ts(), value, &[0.0]);
            if let Some(scored) = scored {
                out.push((seq, scored, change));
            }
        }
        out
    }

    fn burst_settings(window: u64) -> DetectSettings {
        DetectSettings {
            ewma_alpha: 0.5,
            threshold: ThresholdSettings {
                fixed: 3.0,
                ..DetectSettings::bare().threshold
            },
            events: EventSettings {
                min_gap: 5,
                ..DetectSettings::bare().events
            },
            surprise: SurpriseSettings {
                enabled: false,
                ..DetectSettings::bare().surprise
            },
            burst: BurstSettings {
                window,
                threshold: 4.0,
                min_std: 0.001,
            },
            ..DetectSettings::bare()
        }
    }

    fn anomalous_seqs(scored: &[(u64, Scored, Option<EventChange>)]) -> Vec<u64> {
        scored
            .iter()
            .filter(|(_, s, _)| s.anomalous)
            .map(|(seq, _, _)| *seq)
            .collect()
    }

    #[test]
    fn a_pulse_far_above_the_streams_own_errors_is_a_burst_without_any_calibration() {
        // A calibration that would call every error enormous: the burst
        // does not use it, and the surprise is off.
        let calibration = ErrorCalibration {
            mean: 0.0,
            std: 1e-9,
            train_drift: 0.0,
        };
        let mut d = ChannelDetector::new(burst_settings(100), calibration);
        let scored = quiet_stream(&mut d, &[300]);
        let anomalous = anomalous_seqs(&scored);
        assert_eq!(anomalous.first(), Some(&300), "{anomalous:?}");
        assert!(
            anomalous.iter().all(|seq| (300..320).contains(seq)),
            "{anomalous:?}"
        );
        let opened = scored.iter().find_map(|(_, _, c)| match c {
            Some(EventChange::Opened(span)) => Some(span.clone()),
            _ => None,
        });
        assert_eq!(
            opened.map(|s| (s.start_seq, s.cause)),
            Some((300, Some(Cause::Burst)))
        );
    }

    #[test]
    fn the_burst_waits_for_a_quarter_window_of_errors() {
        // Window 400: the spread is known after 100 errors (seq 101 on), so
        // the pulse at 50 is not scored by it and the one at 300 is.
        let mut d = ChannelDetector::new(burst_settings(400), unit_errors());
        let anomalous = anomalous_seqs(&quiet_stream(&mut d, &[50, 300]));
        assert_eq!(anomalous.first(), Some(&300), "{anomalous:?}");
    }

    /// A stream that settles at 0, then shifts to 5 for good.
    fn level_shift(
        settings: DetectSettings,
        drift: f32,
    ) -> Vec<(u64, Scored, Option<EventChange>)> {
        let calibration = ErrorCalibration {
            mean: 0.0,
            std: 1.0,
            train_drift: drift,
        };
        let mut d = ChannelDetector::new(settings, calibration);
        (0..200u64)
            .filter_map(|seq| {
                let value = if seq < 50 {
                    0.1 * (seq % 2) as f32
                } else {
                    5.0
                };
                let (scored, change) = d.step(seq, ts(), value, &[value]);
                scored.map(|s| (seq, s, change))
            })
            .collect()
    }

    fn level_settings() -> DetectSettings {
        DetectSettings {
            ewma_alpha: 1.0,
            threshold: ThresholdSettings {
                fixed: 3.0,
                ..DetectSettings::bare().threshold
            },
            events: EventSettings {
                min_gap: 5,
                ..DetectSettings::bare().events
            },
            baseline: BaselineSettings {
                samples: 20,
                max_train_drift: 0.5,
                ..DetectSettings::bare().baseline
            },
            level: LevelSettings { threshold: 0.5 },
            surprise: SurpriseSettings {
                enabled: false,
                ..DetectSettings::bare().surprise
            },
            ..DetectSettings::bare()
        }
    }

    #[test]
    fn a_level_shift_opens_a_level_event_that_runs_while_the_shift_lasts() {
        let scored = level_shift(level_settings(), 0.0);
        let opened: Vec<_> = scored
            .iter()
            .filter_map(|(_, _, c)| match c {
                Some(EventChange::Opened(span)) => Some((span.start_seq, span.cause)),
                _ => None,
            })
            .collect();
        assert_eq!(opened, vec![(50, Some(Cause::Level))]);
        assert!(scored.last().unwrap().1.anomalous, "still open at the end");
    }

    #[test]
    fn a_channel_that_drifted_through_its_train_split_gets_no_level_score() {
        let scored = level_shift(level_settings(), 0.9);
        assert!(scored.iter().all(|(_, s, _)| !s.anomalous));
        // At or below the limit the level score stays on.
        let scored = level_shift(level_settings(), 0.5);
        assert!(scored.iter().any(|(_, s, _)| s.anomalous));
    }

    #[test]
    fn a_long_event_makes_the_new_level_the_baseline_and_ends() {
        let settings = DetectSettings {
            events: EventSettings {
                max_samples: 40,
                ..level_settings().events
            },
            ..level_settings()
        };
        let scored = level_shift(settings, 0.0);
        let closed: Vec<_> = scored
            .iter()
            .filter_map(|(_, _, c)| match c {
                Some(EventChange::Closed(span)) => Some((span.start_seq, span.end.unwrap().0)),
                _ => None,
            })
            .collect();
        // Open at 50; at 89 it has lasted 40 samples: the baseline is set
        // again from 90 on (level 5), so 90 is normal and the event closes
        // after 5 normal samples, ending at 89.
        assert_eq!(closed, vec![(50, 89)]);
        assert!(scored
            .iter()
            .filter(|(seq, _, _)| *seq >= 90)
            .all(|(_, s, _)| !s.anomalous));
    }

    #[test]
    fn a_checkpoint_from_before_the_burst_and_causes_learns_the_spread_afresh() {
        let mut d = ChannelDetector::new(burst_settings(100), unit_errors());
        let scored = quiet_stream(&mut d, &[397]);
        assert!(d.open_event().is_some(), "the pulse's event is open");
        assert!(scored.iter().any(|(_, s, _)| s.anomalous));
        let mut json = serde_json::to_value(d.state()).unwrap();
        let state = json.as_object_mut().unwrap();
        state.remove("errors");
        state["open"]["span"]
            .as_object_mut()
            .unwrap()
            .remove("cause");
        let state: DetectorState = serde_json::from_value(json).unwrap();
        let mut d = ChannelDetector::restore(burst_settings(100), unit_errors(), state);
        assert_eq!(
            d.open_event().map(|e| e.cause),
            Some(None),
            "no cause known"
        );
        // The spread starts again: nothing is scored by the burst until a
        // quarter window of errors is in, then a pulse fires as before.
        let (first, _) = d.step(400, ts(), 0.5, &[0.0]);
        assert!(!first.unwrap().anomalous);
    }
}
