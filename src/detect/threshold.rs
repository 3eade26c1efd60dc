//! A threshold that each stream fits from its own score history: peaks over
//! threshold (SPOT, Siffer et al., "Anomaly Detection in Streams with Extreme
//! Value Theory", KDD 2017), in O(1) memory and work per sample.
//!
//! - **Calibration.** The first `calibration_samples` scores set the initial
//!   threshold `t` at their `initial_quantile`. SPOT sorts its calibration
//!   batch; here the P² algorithm (Jain & Chlamtac, CACM 1985) estimates the
//!   quantile with five markers, so the checkpointed state stays a few numbers.
//! - **Peaks.** Every later normal score above `t` is a peak; its excess over
//!   `t` is kept only as count, sum and sum of squares. Scores at or above the
//!   threshold in force are anomalies and, as in SPOT, are not learnt from.
//! - **Threshold.** Once `min_peaks` peaks are in, the excesses get a
//!   generalised Pareto fit (method of moments: Hosking & Wallis 1987, which
//!   needs only those three sums, where SPOT uses Grimshaw's maximum
//!   likelihood over every stored peak), and the threshold is the score
//!   exceeded with probability `risk`:
//!   `z = t + σ/γ · ((risk · n / peaks)^(−γ) − 1)` (`t − σ · ln(risk · n / peaks)`
//!   for γ = 0), never below `min_threshold`. Until then the fixed threshold
//!   is in force.
//!
//! Everything is f64 arithmetic in a fixed order, and the checkpoint stores
//! each f64 as its shortest round-trip decimal string (`exact_f64`), since
//! serde_json's default number parser may miss the last bit: a restored state
//! goes on bit for bit. Every stored number is finite (JSON has no infinity).

use super::InvalidSetting;
use serde::{Deserialize, Serialize};

/// No threshold goes above this (in score units: train error standard
/// deviations). A generalised Pareto quantile can overflow when the fit is
/// extremely heavy-tailed; JSON cannot hold the infinity that would follow.
pub const MAX_THRESHOLD: f32 = 1.0e6;

/// `[detect.threshold]`: the surprise's threshold, fixed until the stream
/// has a history, then fitted to the stream's own score tail. The other
/// score parts are scaled to the threshold in force.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ThresholdSettings {
    /// Anomalous above this score (train error standard deviations above
    /// the mean) until the dynamic threshold is fitted; the only threshold
    /// when `calibration_samples` is 0.
    pub fixed: f32,
    /// Scores that set the dynamic threshold's initial level (0 turns the
    /// dynamic threshold off: `fixed` alone is used).
    pub calibration_samples: u64,
    /// The initial level is this quantile of the calibration scores.
    pub initial_quantile: f64,
    /// The dynamic threshold is the score exceeded with this probability
    /// under the fitted tail (false alarms per normal sample).
    pub risk: f64,
    /// Peaks above the initial level needed before the tail is fitted.
    pub min_peaks: u64,
    /// The dynamic threshold never goes below this score.
    pub min: f32,
}

impl Default for ThresholdSettings {
    fn default() -> Self {
        Self {
            fixed: 10.0,
            calibration_samples: 640,
            initial_quantile: 0.98,
            risk: 1e-3,
            min_peaks: 10,
            min: 2.5,
        }
    }
}

impl ThresholdSettings {
    /// The fixed threshold of 10 alone.
    pub const FIXED: Self = Self {
        fixed: 10.0,
        calibration_samples: 0,
        initial_quantile: 0.98,
        risk: 1e-3,
        min_peaks: 10,
        min: 2.5,
    };

    pub fn validate(&self, max_score: f32) -> Result<(), InvalidSetting> {
        if !(self.fixed.is_finite() && self.fixed < max_score) {
            return Err(InvalidSetting::new("threshold.fixed", format!(
                "detect.threshold.fixed = {} must be finite and below {max_score:e}, the largest score",
                self.fixed
            )));
        }
        if (1..5).contains(&self.calibration_samples) {
            return Err(InvalidSetting::new("threshold.calibration_samples", format!(
                "detect.threshold.calibration_samples = {} must be 0 (dynamic threshold off) or >= 5",
                self.calibration_samples
            )));
        }
        if !(self.initial_quantile > 0.0 && self.initial_quantile < 1.0) {
            return Err(InvalidSetting::new(
                "threshold.initial_quantile",
                format!(
                    "detect.threshold.initial_quantile = {} must be in (0, 1)",
                    self.initial_quantile
                ),
            ));
        }
        // As f32 for the message: 0.02, not 0.020000000000000018.
        let above = (1.0 - self.initial_quantile) as f32;
        if !(self.risk > 0.0 && self.risk < 1.0 - self.initial_quantile) {
            return Err(InvalidSetting::new("threshold.risk", format!(
                "detect.threshold.risk = {} must be in (0, {above}): below 1 - \
                 detect.threshold.initial_quantile, so that the alarm level lies above the initial level",
                self.risk
            )));
        }
        if self.min_peaks < 3 {
            return Err(InvalidSetting::new("threshold.min_peaks", format!(
                "detect.threshold.min_peaks = {} must be >= 3 (the tail fit needs a spread of peaks)",
                self.min_peaks
            )));
        }
        if !(self.min.is_finite() && self.min < MAX_THRESHOLD) {
            return Err(InvalidSetting::new(
                "threshold.min",
                format!(
                    "detect.threshold.min = {} must be finite and below {MAX_THRESHOLD}",
                    self.min
                ),
            ));
        }
        Ok(())
    }

    pub fn spot(&self) -> SpotSettings {
        SpotSettings {
            calibration_samples: self.calibration_samples,
            initial_quantile: self.initial_quantile,
            risk: self.risk,
            min_peaks: self.min_peaks,
            min_threshold: self.min,
        }
    }
}

/// The settings the fit works with (the dynamic part of [`ThresholdSettings`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SpotSettings {
    pub calibration_samples: u64,
    pub initial_quantile: f64,
    pub risk: f64,
    pub min_peaks: u64,
    pub min_threshold: f32,
}

/// Streaming estimate of one quantile with the P² algorithm: five markers
/// whose heights follow the minimum, the p/2, p and (1+p)/2 quantiles and the
/// maximum, moved by piecewise-parabolic interpolation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct P2Quantile {
    /// Observations so far.
    count: u64,
    /// Marker heights; the first `min(count, 5)` are set.
    #[serde(with = "exact_f64::array")]
    heights: [f64; 5],
    /// Actual marker positions (0-based ranks).
    #[serde(with = "exact_f64::array")]
    positions: [f64; 5],
    /// Desired marker positions.
    #[serde(with = "exact_f64::array")]
    desired: [f64; 5],
}

impl P2Quantile {
    pub fn new(p: f64) -> Self {
        Self {
            count: 0,
            heights: [0.0; 5],
            positions: [0.0, 1.0, 2.0, 3.0, 4.0],
            desired: [0.0, 2.0 * p, 4.0 * p, 2.0 + 2.0 * p, 4.0],
        }
    }

    /// Takes observation `x`; a NaN, which has no rank, is ignored.
    pub fn add(&mut self, x: f64, p: f64) {
        if x.is_nan() {
            return;
        }
        if self.count < 5 {
            let n = self.count as usize;
            self.heights[n] = x;
            self.count += 1;
            self.heights[..=n].sort_by(f64::total_cmp);
            return;
        }
        self.count += 1;
        let q = &mut self.heights;
        let k = if x < q[0] {
            q[0] = x;
            0
        } else if x >= q[4] {
            q[4] = x;
            3
        } else {
            (0..4)
                .rev()
                .find(|&i| q[i] <= x)
                .expect("x is not NaN and not below q[0] here")
        };
        for n in &mut self.positions[k + 1..] {
            *n += 1.0;
        }
        let increments = [0.0, p / 2.0, p, (1.0 + p) / 2.0, 1.0];
        for (d, inc) in self.desired.iter_mut().zip(increments) {
            *d += inc;
        }
        let n = &mut self.positions;
        for i in 1..4 {
            let off = self.desired[i] - n[i];
            if (off >= 1.0 && n[i + 1] - n[i] > 1.0) || (off <= -1.0 && n[i - 1] - n[i] < -1.0) {
                let d = off.signum();
                let parabolic = q[i]
                    + d / (n[i + 1] - n[i - 1])
                        * ((n[i] - n[i - 1] + d) * (q[i + 1] - q[i]) / (n[i + 1] - n[i])
                            + (n[i + 1] - n[i] - d) * (q[i] - q[i - 1]) / (n[i] - n[i - 1]));
                q[i] = if q[i - 1] < parabolic && parabolic < q[i + 1] {
                    parabolic
                } else {
                    // Linear instead, when the parabola would leave the neighbours.
                    let j = if d > 0.0 { i + 1 } else { i - 1 };
                    q[i] + d * (q[j] - q[i]) / (n[j] - n[i])
                };
                n[i] += d;
            }
        }
    }

    /// The estimate; with fewer than five observations, the nearest order
    /// statistic. None before the first observation.
    pub fn value(&self, p: f64) -> Option<f64> {
        match self.count {
            0 => None,
            1..=4 => {
                let n = self.count as usize;
                let rank = ((p * n as f64) as usize).min(n - 1);
                Some(self.heights[rank])
            }
            _ => Some(self.heights[2]),
        }
    }
}

/// Excesses over the initial threshold, as the moments a generalised Pareto
/// fit by the method of moments needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Peaks {
    /// The initial threshold `t`.
    #[serde(with = "exact_f64")]
    initial: f64,
    /// Normal scores seen since calibration (SPOT's n).
    normal: u64,
    /// Peaks: normal scores above `t` (SPOT's N_t).
    count: u64,
    #[serde(with = "exact_f64")]
    sum: f64,
    #[serde(with = "exact_f64")]
    sum_sq: f64,
}

impl Peaks {
    /// The score exceeded with probability `risk` under the fitted tail;
    /// None until there are enough peaks to fit.
    pub fn quantile(&self, risk: f64, min_peaks: u64) -> Option<f64> {
        if self.count < min_peaks.max(1) {
            return None;
        }
        let count = self.count as f64;
        let mean = self.sum / count;
        let var = self.sum_sq / count - mean * mean;
        let ratio = risk * self.normal as f64 / count;
        let (shape, scale) = gpd_moments(mean, var);
        let z = if shape.abs() < 1e-9 {
            self.initial - scale * ratio.ln()
        } else {
            self.initial + scale / shape * (ratio.powf(-shape) - 1.0)
        };
        Some(z)
    }
}

/// Generalised Pareto shape γ and scale σ from the mean and variance of the
/// excesses (method of moments): γ = (1 − mean²/var)/2, σ = mean·(1 + mean²/var)/2.
/// With no spread (all excesses equal, or rounding below zero) the exponential
/// tail (γ = 0, σ = mean).
pub fn gpd_moments(mean: f64, var: f64) -> (f64, f64) {
    if var.is_nan() || var <= 0.0 {
        return (0.0, mean);
    }
    let r = mean * mean / var;
    (0.5 * (1.0 - r), 0.5 * mean * (1.0 + r))
}

/// One stream's dynamic threshold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DynamicThreshold {
    /// The initial-threshold estimate, while calibrating.
    calibration: P2Quantile,
    /// Calibration scores seen.
    calibrated: u64,
    /// Set once calibration is done.
    peaks: Option<Peaks>,
    /// The fitted threshold; None until `min_peaks` peaks are in.
    fitted: Option<f32>,
}

impl DynamicThreshold {
    pub fn new(settings: &SpotSettings) -> Self {
        Self {
            calibration: P2Quantile::new(settings.initial_quantile),
            calibrated: 0,
            peaks: None,
            fitted: None,
        }
    }

    /// The threshold in force: the fitted one, or `fixed` until there is one.
    pub fn current(&self, fixed: f32) -> f32 {
        self.fitted.unwrap_or(fixed)
    }

    /// Learns from `score`. `anomalous` scores (above the threshold in
    /// force) teach nothing once the tail is fitted.
    ///
    /// Nor does a score at or beyond ±[`MAX_THRESHOLD`] (NaN and infinities
    /// included, which the detector never passes): no threshold is ever
    /// drawn out there, and one such score in the calibration markers or
    /// the peaks' sums would hold the fitted threshold at its ceiling, the
    /// stream deaf, for as long as it runs. So every number kept here stays
    /// finite and a checkpoint of it can always be read back.
    pub fn update(&mut self, settings: &SpotSettings, score: f32, anomalous: bool) {
        if settings.calibration_samples == 0 || score.is_nan() || score.abs() >= MAX_THRESHOLD {
            return;
        }
        let score = f64::from(score);
        if self.calibrated < settings.calibration_samples {
            self.calibration.add(score, settings.initial_quantile);
            self.calibrated += 1;
            if self.calibrated == settings.calibration_samples {
                let initial = self
                    .calibration
                    .value(settings.initial_quantile)
                    .expect("at least one calibration score was added");
                self.peaks = Some(Peaks {
                    initial,
                    normal: 0,
                    count: 0,
                    sum: 0.0,
                    sum_sq: 0.0,
                });
            }
            return;
        }
        // Until the tail is fitted every score teaches, as SPOT's calibration
        // batch does: a stream whose normal scores all lie above the fixed
        // threshold must still get a threshold of its own.
        if anomalous && self.fitted.is_some() {
            return;
        }
        let peaks = self
            .peaks
            .as_mut()
            .expect("peaks are set when calibration ends");
        peaks.normal += 1;
        if score > peaks.initial {
            let excess = score - peaks.initial;
            peaks.count += 1;
            peaks.sum += excess;
            peaks.sum_sq += excess * excess;
        }
        if let Some(z) = peaks.quantile(settings.risk, settings.min_peaks) {
            // NaN (0 · inf in a degenerate fit) compares false: no alarm
            // level at all is the cautious reading.
            let z = if z.is_nan() {
                f64::from(MAX_THRESHOLD)
            } else {
                z
            };
            self.fitted =
                Some((z.clamp(f64::from(settings.min_threshold), f64::from(MAX_THRESHOLD))) as f32);
        }
    }
}

/// f64 as a decimal string that parses back to the same bits (Rust's
/// `Display` prints the shortest such string; `str::parse` rounds correctly).
pub(super) mod exact_f64 {
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(x: &f64, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(x)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        parse(&String::deserialize(d)?)
    }

    fn parse<E: Error>(text: &str) -> Result<f64, E> {
        match text.parse::<f64>() {
            Ok(x) if x.is_finite() => Ok(x),
            _ => Err(E::custom(format!("{text:?} is not a finite number"))),
        }
    }

    pub mod array {
        use serde::{ser::SerializeTuple, Deserialize, Deserializer, Serializer};

        pub fn serialize<S: Serializer>(xs: &[f64; 5], s: S) -> Result<S::Ok, S::Error> {
            let mut t = s.serialize_tuple(xs.len())?;
            for x in xs {
                t.serialize_element(&x.to_string())?;
            }
            t.end()
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[f64; 5], D::Error> {
            let texts = <[String; 5]>::deserialize(d)?;
            let mut xs = [0.0; 5];
            for (x, text) in xs.iter_mut().zip(&texts) {
                *x = super::parse(text)?;
            }
            Ok(xs)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> SpotSettings {
        SpotSettings {
            calibration_samples: 100,
            initial_quantile: 0.9,
            risk: 1e-3,
            min_peaks: 5,
            min_threshold: 0.0,
        }
    }

    /// A deterministic, well-spread sequence: 0, 1, ..., n-1 in a scrambled
    /// order (multiplication by a unit modulo n).
    fn scrambled(n: u64) -> impl Iterator<Item = f64> {
        (0..n).map(move |i| ((i * 37) % n) as f64)
    }

    #[test]
    fn p2_tracks_the_quantile_of_a_uniform_sequence() {
        let p = 0.9;
        let mut q = P2Quantile::new(p);
        assert_eq!(q.value(p), None);
        for x in scrambled(1000) {
            q.add(x, p);
        }
        let v = q.value(p).unwrap();
        assert!((v - 900.0).abs() < 15.0, "P² 0.9-quantile of 0..1000: {v}");
    }

    #[test]
    fn p2_with_few_observations_is_an_order_statistic() {
        let p = 0.5;
        let mut q = P2Quantile::new(p);
        for x in [3.0, 1.0, 2.0] {
            q.add(x, p);
        }
        assert_eq!(q.value(p), Some(2.0), "the middle of 1, 2, 3");
    }

    #[test]
    fn method_of_moments_recovers_the_exponential_and_bounded_tails() {
        // Exponential with scale 2: mean 2, variance 4 -> shape 0, scale 2.
        assert_eq!(gpd_moments(2.0, 4.0), (0.0, 2.0));
        // Uniform on [0, 1] is the GPD with shape -1, scale 1: mean 1/2, variance 1/12.
        let (shape, scale) = gpd_moments(0.5, 1.0 / 12.0);
        assert!((shape + 1.0).abs() < 1e-12 && (scale - 1.0).abs() < 1e-12);
        assert_eq!(gpd_moments(1.5, 0.0), (0.0, 1.5), "no spread: exponential");
    }

    #[test]
    fn quantile_of_an_exponential_tail_matches_the_closed_form() {
        // Peaks over t = 1 with exponential excesses of scale 2; 10 peaks
        // out of 1000 normal scores, risk 1e-4: z = 1 + 2 · ln(10 / 0.1).
        let peaks = Peaks {
            initial: 1.0,
            normal: 1000,
            count: 10,
            sum: 20.0,
            sum_sq: 80.0, // mean 2, E[x²] 8 -> variance 4
        };
        let z = peaks.quantile(1e-4, 5).unwrap();
        assert!((z - (1.0 + 2.0 * 100f64.ln())).abs() < 1e-9, "{z}");
        assert_eq!(peaks.quantile(1e-4, 11), None, "fewer peaks than wanted");
        // A bounded tail (uniform excesses on [0, 1]) never alarms beyond its end.
        let uniform = Peaks {
            initial: 1.0,
            normal: 1000,
            count: 12,
            sum: 6.0,
            sum_sq: 4.0, // mean 1/2, E[x²] 1/3 -> variance 1/12
        };
        let z = uniform.quantile(1e-4, 5).unwrap();
        assert!(z > 1.99 && z <= 2.0 + 1e-9, "just below t + 1: {z}");
    }

    #[test]
    fn calibration_sets_the_initial_threshold_then_peaks_fit_the_alarm_level() {
        let s = settings();
        let mut d = DynamicThreshold::new(&s);
        for x in scrambled(100) {
            assert_eq!(
                d.current(50.0),
                50.0,
                "the fixed threshold while calibrating"
            );
            d.update(&s, x as f32, false);
        }
        let initial = d.peaks.as_ref().unwrap().initial;
        assert!(
            (initial - 90.0).abs() < 3.0,
            "0.9-quantile of 0..100: {initial}"
        );
        // Normal scores 0..100 again: about ten exceed t, enough for a fit.
        for x in scrambled(100) {
            d.update(&s, x as f32, false);
        }
        // Uniform excesses are a bounded tail: the alarm level sits near its
        // end (the largest score, 99), not at the fixed 50.
        let fitted = d.current(50.0);
        assert!((95.0..110.0).contains(&fitted), "{fitted}");
    }

    #[test]
    fn anomalies_teach_nothing_and_the_floor_holds() {
        let s = SpotSettings {
            min_threshold: 500.0,
            ..settings()
        };
        let mut d = DynamicThreshold::new(&s);
        for x in scrambled(100).chain(scrambled(100)) {
            d.update(&s, x as f32, false);
        }
        assert_eq!(d.current(50.0), 500.0, "never below min_threshold");
        let before = d.clone();
        d.update(&s, 1e9, true);
        assert_eq!(d, before, "an anomalous score is not a peak");
    }

    #[test]
    fn the_state_goes_through_json_bit_for_bit() {
        let s = settings();
        let mut d = DynamicThreshold::new(&s);
        for x in scrambled(100).chain(scrambled(60)) {
            d.update(&s, (x / 7.0) as f32, false);
        }
        let json = serde_json::to_string(&d).unwrap();
        let back: DynamicThreshold = serde_json::from_str(&json).unwrap();
        assert_eq!(back, d, "{json}");
        let bad = json.replacen(
            &format!("\"{}\"", d.peaks.as_ref().unwrap().sum),
            "\"inf\"",
            1,
        );
        assert!(
            serde_json::from_str::<DynamicThreshold>(&bad).is_err(),
            "{bad}"
        );
    }

    #[test]
    fn scores_above_the_fixed_threshold_still_teach_until_the_tail_is_fitted() {
        let s = settings();
        let mut d = DynamicThreshold::new(&s);
        // A stream whose every score is "anomalous" against a fixed 5.
        for x in scrambled(100).chain(scrambled(100)) {
            let score = (x + 10.0) as f32;
            d.update(&s, score, score > d.current(5.0));
        }
        let fitted = d.current(5.0);
        assert!(
            fitted > 100.0,
            "its own threshold, above its scores: {fitted}"
        );
    }

    /// Scores at the edges of f32 and beyond (the detector never passes
    /// NaN or infinities, but the threshold must not depend on that).
    fn extreme_scores() -> Vec<f32> {
        let subnormal = f32::from_bits(1);
        vec![
            f32::MAX,
            -f32::MAX,
            f32::MIN_POSITIVE,
            -f32::MIN_POSITIVE,
            subnormal,
            -subnormal,
            0.0,
            -0.0,
            1e12,
            3e38,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
        ]
    }

    /// The state is finite if JSON takes it and gives the same state back
    /// (a NaN compares unequal, an infinity is written "inf" and refused).
    fn assert_readable(d: &DynamicThreshold, context: &str) {
        let json = serde_json::to_string(d).unwrap();
        let back: Result<DynamicThreshold, _> = serde_json::from_str(&json);
        assert_eq!(back.as_ref().ok(), Some(d), "{context}: {json}");
    }

    #[test]
    fn extreme_scores_at_any_moment_leave_a_finite_threshold_and_state() {
        let s = SpotSettings {
            calibration_samples: 20,
            initial_quantile: 0.8,
            risk: 0.01,
            min_peaks: 3,
            min_threshold: 0.5,
        };
        // Moments: the first calibration score, the fifth (P² starts moving
        // markers), the last, the first peak, and after the fit.
        for at in [0, 4, 5, 19, 20, 25, 60] {
            for x in extreme_scores() {
                for run in [1, 3, 200] {
                    let mut d = DynamicThreshold::new(&s);
                    let context = format!("{run} × {x} at {at}");
                    let normal: Vec<f32> = scrambled(50).map(|v| v as f32 / 10.0).collect();
                    for (i, &v) in normal.iter().cycle().take(at + run + 100).enumerate() {
                        let score = if (at..at + run).contains(&i) { x } else { v };
                        let fixed = 2.0;
                        d.update(&s, score, score > d.current(fixed));
                        let t = d.current(fixed);
                        assert!(t.is_finite() && t <= MAX_THRESHOLD, "{context}: {t}");
                    }
                    assert_readable(&d, &context);
                }
            }
        }
    }

    #[test]
    fn long_constant_runs_and_huge_steps_keep_the_state_finite() {
        let s = settings();
        let subnormal = f32::from_bits(1);
        let sequences: Vec<(&str, Vec<f32>)> = vec![
            ("f32::MAX forever", vec![f32::MAX; 5000]),
            ("-f32::MAX forever", vec![-f32::MAX; 5000]),
            ("subnormal forever", vec![subnormal; 5000]),
            ("zero forever", vec![0.0; 5000]),
            (
                "alternating ±f32::MAX",
                (0..5000)
                    .map(|i| if i % 2 == 0 { f32::MAX } else { -f32::MAX })
                    .collect(),
            ),
            (
                "MIN_POSITIVE then MAX steps",
                (0..5000)
                    .map(|i| {
                        if i % 7 == 0 {
                            f32::MAX
                        } else {
                            f32::MIN_POSITIVE
                        }
                    })
                    .collect(),
            ),
        ];
        for (name, scores) in sequences {
            let mut d = DynamicThreshold::new(&s);
            for (i, x) in scores.into_iter().enumerate() {
                d.update(&s, x, x > d.current(10.0));
                if i % 500 == 0 {
                    assert_readable(&d, &format!("{name}, score {i}"));
                }
            }
            assert!(d.current(10.0).is_finite(), "{name}");
            assert_readable(&d, name);
        }
    }

    #[test]
    fn a_score_no_threshold_can_reach_teaches_nothing() {
        // One absurd score among normal ones, before the tail is fitted,
        // must not lift the fitted threshold to its ceiling (which would
        // leave the stream deaf for as long as the peak stayed in its sums):
        // the threshold comes out as if the score had never come.
        let s = settings();
        let fitted_with = |extreme: Option<f32>| {
            let mut d = DynamicThreshold::new(&s);
            for (i, x) in scrambled(100).chain(scrambled(100)).enumerate() {
                match extreme {
                    Some(e) if i == 101 => d.update(&s, e, false),
                    None if i == 101 => {}
                    _ => d.update(&s, x as f32, false),
                }
            }
            d.current(50.0)
        };
        let clean = fitted_with(None);
        for extreme in [1e7, 1e12, f32::MAX] {
            assert_eq!(fitted_with(Some(extreme)), clean, "{extreme}");
        }
    }

    #[test]
    fn off_when_there_is_no_calibration() {
        let s = SpotSettings {
            calibration_samples: 0,
            ..settings()
        };
        let mut d = DynamicThreshold::new(&s);
        for x in scrambled(1000) {
            d.update(&s, x as f32, false);
        }
        assert_eq!(d.current(7.0), 7.0);
    }
}
