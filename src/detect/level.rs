//! Level novelty: how far the value lies outside the stream's baseline
//! range. It persists through a level shift, which a forecaster adapts to
//! within one window.

use super::InvalidSetting;
use serde::Deserialize;

/// `[detect.level]`.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LevelSettings {
    /// A value this far outside the baseline range, in units of the range's
    /// width, is anomalous whatever its forecast error.
    pub threshold: f32,
}

impl Default for LevelSettings {
    fn default() -> Self {
        Self { threshold: 0.5 }
    }
}

impl LevelSettings {
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        if !(self.threshold > 0.0 && self.threshold.is_finite()) {
            return Err(InvalidSetting::new(
                "level.threshold",
                format!("detect.level.threshold = {} must be > 0", self.threshold),
            ));
        }
        Ok(())
    }

    /// The novelty in units of the threshold (anomalous above 1).
    pub fn score(&self, novelty: f32) -> f32 {
        novelty / self.threshold
    }
}
