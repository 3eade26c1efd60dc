//! The forecast surprise: the smoothed one-step error in standard deviations
//! of the channel's one-step error on held-out train data (telemanom's
//! prediction error, in the model's own units). Its threshold is the
//! stream's own (`threshold.rs`).

use serde::Deserialize;

use super::{saturate, InvalidSetting, MAX_SCORE};
use crate::repository::ErrorCalibration;

/// `[detect.surprise]`.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SurpriseSettings {
    /// Whether the surprise is a score part; the dynamic threshold is
    /// fitted to it either way.
    pub enabled: bool,
    /// The train error spread is never taken below this (input units): a
    /// model calibrated on a flat slice of train has a spread near zero, and
    /// ordinary steps would score 10 to 20.
    pub min_error_std: f32,
}

impl Default for SurpriseSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            min_error_std: 0.01,
        }
    }
}

impl SurpriseSettings {
    /// The surprise with no floor on the train spread.
    pub const UNFLOORED: Self = Self {
        enabled: true,
        min_error_std: 0.0,
    };

    pub fn validate(&self) -> Result<(), InvalidSetting> {
        if !(self.min_error_std >= 0.0 && self.min_error_std.is_finite()) {
            return Err(InvalidSetting::new(
                "surprise.min_error_std",
                format!(
                    "detect.surprise.min_error_std = {} must be >= 0",
                    self.min_error_std
                ),
            ));
        }
        Ok(())
    }

    /// The surprise of a smoothed error, in train error spreads.
    pub fn score(&self, calibration: &ErrorCalibration, smoothed: f32) -> f32 {
        saturate(
            (smoothed - calibration.mean) / calibration.std.max(self.min_error_std),
            MAX_SCORE,
        )
    }
}
