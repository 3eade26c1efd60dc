//! The sustained excursion: how many of the stream's last `baseline.samples`
//! scored samples lay even a little outside its baseline range. A level a
//! little off, but for long: a cycle whose peaks run a little high is
//! forecast as well as before, one window later, while the stream behaves
//! as it never did.

use super::InvalidSetting;
use serde::{Deserialize, Serialize};

/// `[detect.excursion]`.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ExcursionSettings {
    /// The stream is anomalous while more than this many of its last
    /// `baseline.samples` scored samples lay outside the baseline range by
    /// more than `margin` (0 turns the excursion score off).
    pub samples: u64,
    /// How far outside the baseline range, in units of its width, a value
    /// counts as an excursion.
    pub margin: f32,
}

impl Default for ExcursionSettings {
    fn default() -> Self {
        Self {
            samples: 128,
            margin: 0.01,
        }
    }
}

impl ExcursionSettings {
    pub const OFF: Self = Self {
        samples: 0,
        margin: 0.01,
    };

    pub fn validate(&self, baseline_samples: u64) -> Result<(), InvalidSetting> {
        if !(self.margin >= 0.0 && self.margin.is_finite()) {
            return Err(InvalidSetting::new(
                "excursion.margin",
                format!("detect.excursion.margin = {} must be >= 0", self.margin),
            ));
        }
        if self.samples >= baseline_samples && self.samples > 0 {
            return Err(InvalidSetting::new("excursion.samples", format!(
                "detect.excursion.samples = {} must be below detect.baseline.samples = {baseline_samples}: \
                 excursions are counted over the last baseline samples",
                self.samples
            )));
        }
        Ok(())
    }
}

/// Which of the stream's recent scored samples lay outside its baseline
/// range: one bit per sample, the newest `baseline.samples` of them, in a
/// ring (80 bytes for 640 samples). Words are u32 so that a checkpoint's
/// JSON numbers stay exact in any reader.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Excursions {
    /// Samples the ring covers: `baseline.samples` when it was made.
    span: u64,
    pub(super) bits: Vec<u32>,
    /// Samples recorded since the baseline; the ring's next slot is this
    /// modulo `span`.
    recorded: u64,
}

impl Excursions {
    /// Words of a ring covering `span` samples.
    pub fn words(span: u64) -> usize {
        span.div_ceil(32) as usize
    }

    /// Records whether the sample `novelty` widths outside the baseline was
    /// an excursion, forgetting the sample `span` samples before it; returns
    /// how many of the last `span` were, in units of `settings.samples`
    /// (anomalous above 1); None while the excursion score is off.
    pub fn score(&mut self, settings: &ExcursionSettings, span: u64, novelty: f32) -> Option<f32> {
        if settings.samples == 0 {
            return None;
        }
        let count = self.record(span, novelty > settings.margin);
        Some(count as f32 / settings.samples as f32)
    }

    fn record(&mut self, span: u64, excursion: bool) -> u64 {
        if self.span != span {
            // New, or checkpointed under another baseline length.
            *self = Self {
                span,
                bits: vec![0; Self::words(span)],
                recorded: 0,
            };
        }
        let slot = self.recorded % span;
        let (word, bit) = ((slot / 32) as usize, slot % 32);
        self.bits[word] = (self.bits[word] & !(1 << bit)) | (u32::from(excursion) << bit);
        self.recorded += 1;
        self.count()
    }

    /// Excursions among the last `span` samples: the ring's set bits,
    /// counted rather than kept, so no checkpoint can disagree with its bits.
    pub(super) fn count(&self) -> u64 {
        self.bits.iter().map(|w| u64::from(w.count_ones())).sum()
    }
}
