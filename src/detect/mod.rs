//! From forecasts to anomaly scores, thresholds and events, one channel at a time.
//!
//! A sample's error is how far its value lands from the one-step forecast made
//! at the previous sample (telemanom's prediction error). Errors are smoothed
//! with an exponentially weighted moving average and expressed in units of the
//! channel's own error spread on held-out train data, so one threshold setting
//! carries to every channel:
//!
//! `score = (ewma(|value - forecast|) - error_mean) / error_std`
//!
//! A sample is anomalous when its score exceeds the threshold. An event opens
//! at the first anomalous sample and closes once `min_event_gap` normal samples
//! follow its last anomalous one.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::repository::ErrorCalibration;

/// Detection settings: one set for every channel (`[detect]` in the pipeline file).
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetectSettings {
    /// Weight of the newest error in the moving average (0 < alpha <= 1).
    #[serde(default = "default_ewma_alpha")]
    pub ewma_alpha: f32,
    /// Anomalous above this score (error standard deviations above the mean).
    #[serde(default = "default_threshold")]
    pub threshold: f32,
    /// Normal samples in a row that close an open event.
    #[serde(default = "default_min_event_gap")]
    pub min_event_gap: u64,
    /// Scored samples that establish a channel's baseline value range (0 turns
    /// the level score off).
    #[serde(default)]
    pub baseline_samples: u64,
    /// A value this far outside the baseline range, in units of the range's
    /// width, is anomalous whatever its forecast error.
    #[serde(default = "default_level_threshold")]
    pub level_threshold: f32,
}

fn default_ewma_alpha() -> f32 {
    0.1
}
fn default_threshold() -> f32 {
    10.0
}
fn default_min_event_gap() -> u64 {
    50
}
fn default_level_threshold() -> f32 {
    0.5
}

impl Default for DetectSettings {
    fn default() -> Self {
        Self {
            ewma_alpha: default_ewma_alpha(),
            threshold: default_threshold(),
            min_event_gap: default_min_event_gap(),
            baseline_samples: 0,
            level_threshold: default_level_threshold(),
        }
    }
}

impl DetectSettings {
    pub fn validate(&self) -> Result<(), String> {
        if !(self.ewma_alpha > 0.0 && self.ewma_alpha <= 1.0) {
            return Err(format!(
                "detect.ewma_alpha = {} must be in (0, 1]",
                self.ewma_alpha
            ));
        }
        if !self.threshold.is_finite() {
            return Err("detect.threshold must be finite".into());
        }
        if !(self.level_threshold > 0.0 && self.level_threshold.is_finite()) {
            return Err(format!(
                "detect.level_threshold = {} must be > 0",
                self.level_threshold
            ));
        }
        if self.min_event_gap == 0 {
            return Err("detect.min_event_gap must be >= 1".into());
        }
        Ok(())
    }
}

/// A scored sample.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scored {
    pub score: f32,
    pub threshold: f32,
    pub anomalous: bool,
}

/// An anomaly event as the detector knows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventSpan {
    pub start_seq: u64,
    pub start_ts: DateTime<Utc>,
    /// The last anomalous sample; set once the event has closed.
    pub end: Option<(u64, DateTime<Utc>)>,
    pub peak_score: f32,
    /// The threshold in force when the event opened.
    pub threshold: f32,
}

/// What one step changed about events.
#[derive(Debug, Clone, PartialEq)]
pub enum EventChange {
    Opened(EventSpan),
    Closed(EventSpan),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct OpenEvent {
    span: EventSpan,
    last_anomalous: (u64, DateTime<Utc>),
    /// Normal samples since the last anomalous one.
    normal_run: u64,
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
/// it stays small and serialisable.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DetectorState {
    /// The forecast made at the previous sample: the seq it was made at, and
    /// the horizon in the input's units.
    last_forecast: Option<(u64, Vec<f32>)>,
    smoothed_error: Option<f32>,
    open: Option<OpenEvent>,
    baseline: Baseline,
}

impl Default for DetectorState {
    fn default() -> Self {
        Self {
            last_forecast: None,
            smoothed_error: None,
            open: None,
            // Finite placeholders (JSON has no infinities): the first
            // baseline sample replaces both.
            baseline: Baseline {
                seen: 0,
                low: 0.0,
                high: 0.0,
            },
        }
    }
}

/// The range of values a channel showed over its first scored samples.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
struct Baseline {
    seen: u64,
    low: f32,
    high: f32,
}

/// A baseline range is at least this wide (the data is scaled to [-1, 1]),
/// so a channel that was constant during its baseline is not flagged for
/// moving a hair.
const MIN_BASELINE_WIDTH: f32 = 0.05;

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

    /// The state to checkpoint.
    pub fn state(&self) -> &DetectorState {
        &self.state
    }

    /// How far `value` lies outside the baseline range, in range widths;
    /// None while the baseline is still being established (or the level
    /// score is off).
    fn level_novelty(&mut self, value: f32) -> Option<f32> {
        let wanted = self.settings.baseline_samples;
        let b = &mut self.state.baseline;
        if b.seen < wanted {
            if b.seen == 0 {
                (b.low, b.high) = (value, value);
            }
            b.seen += 1;
            b.low = b.low.min(value);
            b.high = b.high.max(value);
            return None;
        }
        if wanted == 0 {
            return None;
        }
        let width = (b.high - b.low).max(MIN_BASELINE_WIDTH);
        Some((value - b.high).max(b.low - value).max(0.0) / width)
    }

    /// Takes the sample `seq` (its target `value`) and the forecast the model
    /// made from the window ending at it. Returns its score, unless no earlier
    /// forecast covers it (warm-up, or a gap longer than the horizon), and any
    /// event change it caused.
    pub fn step(
        &mut self,
        seq: u64,
        ts: DateTime<Utc>,
        value: f32,
        forecast: &[f32],
    ) -> (Option<Scored>, Option<EventChange>) {
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
            }
            None => self.state.last_forecast = Some((seq, forecast.to_vec())),
        }
        let Some(predicted) = predicted else {
            return (None, None);
        };

        let error = (value - predicted).abs();
        let alpha = self.settings.ewma_alpha;
        let smoothed = match self.state.smoothed_error {
            Some(previous) => alpha * error + (1.0 - alpha) * previous,
            None => error,
        };
        self.state.smoothed_error = Some(smoothed);
        let surprise = (smoothed - self.calibration.mean) / self.calibration.std;
        let threshold = self.settings.threshold;
        // One score: the level novelty is scaled so that reaching its own
        // threshold means reaching the score threshold.
        let level = self
            .level_novelty(value)
            .map(|l| l / self.settings.level_threshold * threshold);
        let score = level.map_or(surprise, |l| surprise.max(l));
        let anomalous = score > threshold;
        let scored = Scored {
            score,
            threshold,
            anomalous,
        };
        (Some(scored), self.track_event(seq, ts, scored))
    }

    fn track_event(&mut self, seq: u64, ts: DateTime<Utc>, scored: Scored) -> Option<EventChange> {
        match (&mut self.state.open, scored.anomalous) {
            (None, false) => None,
            (None, true) => {
                let span = EventSpan {
                    start_seq: seq,
                    start_ts: ts,
                    end: None,
                    peak_score: scored.score,
                    threshold: scored.threshold,
                };
                self.state.open = Some(OpenEvent {
                    span: span.clone(),
                    last_anomalous: (seq, ts),
                    normal_run: 0,
                });
                Some(EventChange::Opened(span))
            }
            (Some(open), true) => {
                open.span.peak_score = open.span.peak_score.max(scored.score);
                open.last_anomalous = (seq, ts);
                open.normal_run = 0;
                None
            }
            (Some(open), false) => {
                open.normal_run += 1;
                if open.normal_run < self.settings.min_event_gap {
                    return None;
                }
                let mut open = self.state.open.take().expect("matched Some above");
                open.span.end = Some(open.last_anomalous);
                Some(EventChange::Closed(open.span))
            }
        }
    }

    /// The event open on this channel, if any.
    pub fn open_event(&self) -> Option<&EventSpan> {
        self.state.open.as_ref().map(|o| &o.span)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn detector(gap: u64) -> ChannelDetector {
        ChannelDetector::new(
            DetectSettings {
                ewma_alpha: 1.0,
                threshold: 3.0,
                min_event_gap: gap,
                ..Default::default()
            },
            ErrorCalibration {
                mean: 0.0,
                std: 1.0,
            },
        )
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
            threshold: 10.0,
            min_event_gap: 1,
            baseline_samples: 3,
            level_threshold: 0.5,
        };
        let mut d = ChannelDetector::new(
            settings,
            ErrorCalibration {
                mean: 0.0,
                std: 1.0,
            },
        );
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

    #[test]
    fn ewma_smooths_errors() {
        let mut d = ChannelDetector::new(
            DetectSettings {
                ewma_alpha: 0.5,
                threshold: 3.0,
                min_event_gap: 1,
                ..Default::default()
            },
            ErrorCalibration {
                mean: 1.0,
                std: 2.0,
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
    fn a_restored_detector_goes_on_exactly_as_the_original() {
        let settings = DetectSettings {
            ewma_alpha: 0.3,
            threshold: 2.0,
            min_event_gap: 3,
            baseline_samples: 4,
            level_threshold: 0.5,
        };
        let calibration = ErrorCalibration {
            mean: 0.1,
            std: 0.5,
        };
        let values = [0.0, 0.1, 0.3, 2.0, 2.5, 0.2, 0.1, 0.0, 0.1, 0.0, 3.0];
        let mut original = ChannelDetector::new(settings, calibration);
        let mut resumed: Option<ChannelDetector> = None;
        for (seq, v) in values.iter().enumerate() {
            let step = original.step(seq as u64, ts(), *v, &[0.0, 0.0]);
            if let Some(r) = resumed.as_mut() {
                assert_eq!(step, r.step(seq as u64, ts(), *v, &[0.0, 0.0]));
            }
            if seq == 4 {
                // Mid-event, through JSON as the checkpoint stores it.
                let json = serde_json::to_string(original.state()).unwrap();
                let state = serde_json::from_str(&json).unwrap();
                resumed = Some(ChannelDetector::restore(settings, calibration, state));
                assert!(
                    original.open_event().is_some(),
                    "the checkpoint carries an open event"
                );
            }
        }
        assert_eq!(resumed.unwrap().state(), original.state());
    }
}
