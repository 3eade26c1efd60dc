//! The stuck run: how long the value has repeated exactly, against the
//! longest run of repeats the stream has shown. A frozen value is the
//! anomaly a forecaster scores as good news (its error falls), so it needs a
//! part of its own.

use super::InvalidSetting;
use serde::{Deserialize, Serialize};

/// `[detect.stuck]`.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StuckSettings {
    /// A value repeated exactly for more than this many times the longest
    /// run of repeats the stream has shown is anomalous (0 turns the stuck
    /// score off). Runs in progress during the baseline are normal.
    pub factor: f32,
    /// ... and only once it has repeated for more than this many samples (a
    /// stream whose values have hardly repeated yet is not stuck after a few
    /// repeats).
    pub min_run: u64,
}

impl Default for StuckSettings {
    fn default() -> Self {
        Self {
            factor: 2.0,
            min_run: 50,
        }
    }
}

impl StuckSettings {
    pub const OFF: Self = Self {
        factor: 0.0,
        min_run: 50,
    };

    pub fn validate(&self, baseline_samples: u64) -> Result<(), InvalidSetting> {
        if !(self.factor == 0.0 || (self.factor >= 1.0 && self.factor.is_finite())) {
            return Err(InvalidSetting::new(
                "stuck.factor",
                format!(
                    "detect.stuck.factor = {} must be 0 (stuck score off) or a finite factor >= 1 \
                 (below 1 the stream's normal runs would be anomalous)",
                    self.factor
                ),
            ));
        }
        if self.factor > 0.0 && self.min_run == 0 {
            return Err(InvalidSetting::new(
                "stuck.min_run",
                "detect.stuck.min_run must be >= 1 when the stuck score is on",
            ));
        }
        if self.factor > 0.0 && baseline_samples == 0 {
            return Err(InvalidSetting::new(
                "baseline.samples",
                "detect.stuck.factor needs detect.baseline.samples >= 1: the runs in \
                 progress during the baseline are what tells a constant channel from a stuck one",
            ));
        }
        Ok(())
    }
}

/// The stream's runs of exactly repeated values.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StuckRun {
    /// The previous scored sample's value.
    previous: Option<f32>,
    /// Scored samples in a row that repeat `previous` exactly.
    pub(super) run: u64,
    /// The run began during the baseline: it is the stream's normal
    /// behaviour (a constant channel), however long it lasts.
    pub(super) from_baseline: bool,
    /// The longest run that ended without being anomalous.
    pub(super) longest: u64,
}

impl Default for StuckRun {
    fn default() -> Self {
        Self {
            previous: None,
            run: 0,
            // A run in progress when the state was created is normal; the
            // first value replaces this.
            from_baseline: true,
            longest: 0,
        }
    }
}

impl StuckRun {
    /// How long `value` has repeated exactly, in units of the longest run
    /// the stream may show before it counts as stuck (anomalous above 1);
    /// None while the stuck score is off or the run began in the baseline.
    pub fn score(
        &mut self,
        settings: &StuckSettings,
        value: f32,
        in_baseline: bool,
    ) -> Option<f32> {
        let factor = f64::from(settings.factor);
        if factor == 0.0 {
            return None;
        }
        let min = settings.min_run as f64;
        let limit = |longest: u64| (factor * longest as f64).max(min);
        if self.previous == Some(value) {
            self.run += 1;
        } else {
            // A stuck run teaches nothing: the next one is measured against
            // the stream's normal runs.
            if self.from_baseline || self.run as f64 <= limit(self.longest) {
                self.longest = self.longest.max(self.run);
            }
            self.run = 0;
            self.from_baseline = in_baseline;
            self.previous = Some(value);
        }
        if self.from_baseline {
            return None;
        }
        Some((self.run as f64 / limit(self.longest)) as f32)
    }
}
