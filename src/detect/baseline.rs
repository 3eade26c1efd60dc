//! The stream's baseline: the range of values it showed over its first
//! scored samples, which the level, excursion and stuck parts measure
//! against. Its own, not the train split's: SMAP scales each split to
//! [-1, 1] separately, so train values say nothing about test values.

use serde::{Deserialize, Serialize};

use super::{saturate, InvalidSetting, MAX_SCORE};

/// `[detect.baseline]`.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BaselineSettings {
    /// Scored samples that establish the range (0 turns the level,
    /// excursion and stuck parts off).
    pub samples: u64,
    /// The range is at least this wide (input units; SMAP's are scaled to
    /// [-1, 1]), so a channel nearly constant during its baseline is not
    /// flagged for moving a hair.
    pub min_width: f32,
    /// A channel whose train split drifted out of its first rows' range
    /// more than this share of the time (`satwatch.train_drift` from
    /// training/train.py: a counter, a ramp, a slow trend) gets no level or
    /// excursion score: for it, leaving the baseline range is normal, and
    /// those alarms would run to the end of its stream (1: never muted).
    pub max_train_drift: f32,
}

impl Default for BaselineSettings {
    fn default() -> Self {
        Self {
            samples: 640,
            min_width: 0.2,
            max_train_drift: 0.5,
        }
    }
}

impl BaselineSettings {
    pub const OFF: Self = Self {
        samples: 0,
        min_width: 0.05,
        max_train_drift: 1.0,
    };

    pub fn validate(&self) -> Result<(), InvalidSetting> {
        if !(self.min_width > 0.0 && self.min_width.is_finite()) {
            return Err(InvalidSetting::new(
                "baseline.min_width",
                format!("detect.baseline.min_width = {} must be > 0", self.min_width),
            ));
        }
        if !(0.0..=1.0).contains(&self.max_train_drift) {
            return Err(InvalidSetting::new(
                "baseline.max_train_drift",
                format!(
                    "detect.baseline.max_train_drift = {} must be a share, in [0, 1]",
                    self.max_train_drift
                ),
            ));
        }
        Ok(())
    }
}

/// The range of values a channel showed over its first scored samples.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Baseline {
    pub(super) seen: u64,
    low: f32,
    high: f32,
}

impl Default for Baseline {
    fn default() -> Self {
        // Finite placeholders (JSON has no infinities): the first baseline
        // sample replaces both.
        Self {
            seen: 0,
            low: 0.0,
            high: 0.0,
        }
    }
}

impl Baseline {
    /// Whether the range is still being established.
    pub fn in_progress(&self, settings: &BaselineSettings) -> bool {
        self.seen < settings.samples
    }

    /// Takes `value`: how far it lies outside the range, in range widths;
    /// None while the range is still being established (or it is off).
    pub fn novelty(&mut self, settings: &BaselineSettings, value: f32) -> Option<f32> {
        if self.seen < settings.samples {
            if self.seen == 0 {
                (self.low, self.high) = (value, value);
            }
            self.seen += 1;
            self.low = self.low.min(value);
            self.high = self.high.max(value);
            return None;
        }
        if settings.samples == 0 {
            return None;
        }
        let width = (self.high - self.low).max(settings.min_width);
        let novelty = (value - self.high).max(self.low - value).max(0.0) / width;
        Some(saturate(novelty, MAX_SCORE))
    }

    /// Sets the range again from the samples to come.
    pub fn restart(&mut self) {
        self.seen = 0;
    }
}
