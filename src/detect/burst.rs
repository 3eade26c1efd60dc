//! The error burst: the smoothed one-step error in standard deviations of
//! the stream's own recent errors (Garg et al.'s dynamic Gaussian scoring,
//! IEEE TNNLS 2021). It needs no calibration from the train split, so it
//! cannot collapse on a flat validation slice, and it sees a pulse inside a
//! quiet channel's range that the train-calibrated surprise does not.

use serde::{Deserialize, Serialize};

use super::{saturate, threshold::exact_f64, InvalidSetting, MAX_SCORE};

/// `[detect.burst]`.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BurstSettings {
    /// The errors' mean and spread are exponentially weighted over about
    /// this many samples (0 turns the burst off).
    pub window: u64,
    /// Anomalous beyond this many standard deviations.
    pub threshold: f32,
    /// The spread is never taken below this (input units): a constant
    /// stream's spread is zero.
    pub min_std: f32,
}

impl Default for BurstSettings {
    fn default() -> Self {
        Self {
            window: 1000,
            threshold: 2.5,
            min_std: 0.001,
        }
    }
}

impl BurstSettings {
    pub const OFF: Self = Self {
        window: 0,
        threshold: 6.0,
        min_std: 0.01,
    };

    pub fn validate(&self) -> Result<(), InvalidSetting> {
        if !(self.threshold > 0.0 && self.threshold.is_finite()) {
            return Err(InvalidSetting::new(
                "burst.threshold",
                format!("detect.burst.threshold = {} must be > 0", self.threshold),
            ));
        }
        if !(self.min_std > 0.0 && self.min_std.is_finite()) {
            return Err(InvalidSetting::new(
                "burst.min_std",
                format!(
                    "detect.burst.min_std = {} must be > 0 (a constant stream's error spread is 0)",
                    self.min_std
                ),
            ));
        }
        if (1..8).contains(&self.window) {
            return Err(InvalidSetting::new(
                "burst.window",
                format!(
                    "detect.burst.window = {} must be 0 (burst score off) or >= 8",
                    self.window
                ),
            ));
        }
        Ok(())
    }
}

/// The mean and variance of the stream's recent one-step errors,
/// exponentially weighted over about `window` samples (plain running
/// figures until that many are in): three numbers, O(1) per sample.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct ErrorSpread {
    seen: u64,
    /// As exact decimal strings, as the dynamic threshold keeps its f64s:
    /// a restored detector scores bit for bit as the one checkpointed.
    #[serde(with = "exact_f64")]
    mean: f64,
    #[serde(with = "exact_f64")]
    variance: f64,
}

impl ErrorSpread {
    fn learn(&mut self, window: u64, error: f32) {
        self.seen += 1;
        let weight = (1.0 / self.seen as f64).max(2.0 / (window as f64 + 1.0));
        let delta = f64::from(error) - self.mean;
        self.mean += weight * delta;
        self.variance = (1.0 - weight) * (self.variance + weight * delta * delta);
    }

    /// The smoothed error in standard deviations of the recent errors, in
    /// units of the burst threshold (anomalous above 1), measured before
    /// this sample's error joins them; None while the burst is off or fewer
    /// than a quarter window of errors are in.
    pub fn score(&mut self, settings: &BurstSettings, smoothed: f32, error: f32) -> Option<f32> {
        if settings.window == 0 {
            return None;
        }
        let z = (self.seen >= settings.window / 4).then(|| {
            let std = self.variance.sqrt().max(f64::from(settings.min_std));
            saturate(((f64::from(smoothed) - self.mean) / std) as f32, MAX_SCORE)
        });
        self.learn(settings.window, error);
        z.map(|z| z / settings.threshold)
    }
}
