//! Detection metrics against labelled ranges.
//!
//! Labelled ranges are `[start, end)` (SMAP's convention); detected events are
//! `[start, end]` (their first and last anomalous `seq`). Event-level counts
//! follow telemanom (Hundman et al., KDD 2018): a labelled range overlapped by
//! any detected event is one true positive however many events overlap it; a
//! detected event overlapping no labelled range is a false positive; a
//! labelled range no event overlaps is a false negative.

use serde::Serialize;

/// Labelled range `[start, end)`.
pub type Range = (u64, u64);
/// Detected event `[start, end]`.
pub type Event = (u64, u64);

fn overlaps(label: Range, event: Event) -> bool {
    event.0 < label.1 && label.0 <= event.1
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub tp: u64,
    pub fp: u64,
    #[serde(rename = "fn")]
    pub fn_: u64,
}

impl Counts {
    pub fn add(&mut self, other: Counts) {
        self.tp += other.tp;
        self.fp += other.fp;
        self.fn_ += other.fn_;
    }

    /// Precision, recall and F1; None where undefined (a zero denominator).
    pub fn scores(&self) -> Scores {
        let ratio = |num: u64, den: u64| (den > 0).then(|| num as f64 / den as f64);
        let precision = ratio(self.tp, self.tp + self.fp);
        let recall = ratio(self.tp, self.tp + self.fn_);
        let f1 = match (precision, recall) {
            (Some(p), Some(r)) if p + r > 0.0 => Some(2.0 * p * r / (p + r)),
            (Some(_), Some(_)) => Some(0.0),
            _ => None,
        };
        Scores {
            precision,
            recall,
            f1,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Scores {
    pub precision: Option<f64>,
    pub recall: Option<f64>,
    pub f1: Option<f64>,
}

/// telemanom's event-level counts.
pub fn event_counts(labels: &[Range], events: &[Event]) -> Counts {
    let tp = labels
        .iter()
        .filter(|l| events.iter().any(|e| overlaps(**l, *e)))
        .count() as u64;
    let fp = events
        .iter()
        .filter(|e| !labels.iter().any(|l| overlaps(*l, **e)))
        .count() as u64;
    Counts {
        tp,
        fp,
        fn_: labels.len() as u64 - tp,
    }
}

/// Point-wise counts over `rows` samples, a sample being predicted anomalous
/// when it lies inside a detected event. With `adjust`, every point of a
/// labelled range counts as detected once any point in it is (the "point
/// adjustment" of many papers, reported only for comparison with them).
pub fn point_counts(labels: &[Range], events: &[Event], rows: u64, adjust: bool) -> Counts {
    let mut predicted = vec![false; rows as usize];
    for &(start, end) in events {
        for seq in start..=end.min(rows.saturating_sub(1)) {
            predicted[seq as usize] = true;
        }
    }
    let mut actual = vec![false; rows as usize];
    for &(start, end) in labels {
        let end = end.min(rows);
        for seq in start..end {
            actual[seq as usize] = true;
        }
        if adjust && (start..end).any(|seq| predicted[seq as usize]) {
            for seq in start..end {
                predicted[seq as usize] = true;
            }
        }
    }
    let mut counts = Counts::default();
    for (p, a) in predicted.iter().zip(&actual) {
        match (p, a) {
            (true, true) => counts.tp += 1,
            (true, false) => counts.fp += 1,
            (false, true) => counts.fn_ += 1,
            (false, false) => {}
        }
    }
    counts
}

/// Fc1 (Garg et al., IEEE TNNLS 2021): the harmonic mean of event-wise
/// recall and point-wise precision, so that an alarm is charged for its
/// length (point precision) while a range counts once however it is found
/// (event recall). None where either is undefined.
pub fn fc1(events: Counts, points: Counts) -> Option<f64> {
    let recall = events.scores().recall?;
    let precision = points.scores().precision.unwrap_or(0.0);
    Some(if precision + recall > 0.0 {
        2.0 * precision * recall / (precision + recall)
    } else {
        0.0
    })
}

/// The first labelled range `event` overlaps, if any.
pub fn matched_range(labels: &[Range], event: Event) -> Option<Range> {
    labels.iter().copied().find(|l| overlaps(*l, event))
}

/// The `q` quantile (nearest rank) of sorted `values`.
pub fn quantile(sorted: &[u64], q: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// For each detected labelled range: samples from its start to its first
/// alarm (0 when an overlapping event was already open at its start).
pub fn detection_delays(labels: &[Range], events: &[Event]) -> Vec<u64> {
    labels
        .iter()
        .filter_map(|&label| {
            events
                .iter()
                .filter(|e| overlaps(label, **e))
                .map(|e| e.0.saturating_sub(label.0))
                .min()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fc1_charges_a_long_alarm_for_its_length() {
        // One range of 100 samples; a tight alarm and one 10 times as long
        // both find it (event recall 1), but only one is precise.
        let labels = [(100, 200)];
        let tight = [(100, 199)];
        let long = [(0, 999)];
        let score = |events: &[Event]| {
            fc1(
                event_counts(&labels, events),
                point_counts(&labels, events, 1000, false),
            )
            .unwrap()
        };
        assert!((score(&tight) - 1.0).abs() < 1e-12);
        // Point precision 0.1, event recall 1: 2 * 0.1 / 1.1.
        assert!((score(&long) - 0.2 / 1.1).abs() < 1e-12);
        assert_eq!(score(&[]), 0.0, "nothing found");
        assert_eq!(
            fc1(event_counts(&[], &[]), point_counts(&[], &[], 10, false)),
            None,
            "no range to find"
        );
    }

    #[test]
    fn quantiles_take_the_nearest_rank() {
        let delays = [0, 5, 10, 20, 40, 80, 160, 320, 640, 1280];
        assert_eq!(quantile(&delays, 0.5), Some(40));
        assert_eq!(quantile(&delays, 0.9), Some(640));
        assert_eq!(quantile(&delays, 1.0), Some(1280));
        assert_eq!(quantile(&[7], 0.9), Some(7));
        assert_eq!(quantile(&[], 0.5), None);
    }

    #[test]
    fn telemanom_overlap_rules() {
        let labels = [(100, 200), (500, 600), (900, 950)];
        // Two events on the first range (one TP), one early-starting event on
        // the second, one false alarm; the third range is missed.
        let events = [(150, 160), (190, 210), (450, 500), (700, 720)];
        assert_eq!(
            event_counts(&labels, &events),
            Counts {
                tp: 2,
                fp: 1,
                fn_: 1
            }
        );
    }

    #[test]
    fn label_end_is_exclusive_and_event_end_inclusive() {
        assert_eq!(
            event_counts(&[(100, 200)], &[(200, 250)]).tp,
            0,
            "row 200 is after the range"
        );
        assert_eq!(
            event_counts(&[(100, 200)], &[(50, 100)]).tp,
            1,
            "event ending at row 100 touches it"
        );
        assert_eq!(
            event_counts(&[(100, 200)], &[(50, 99)]),
            Counts {
                tp: 0,
                fp: 1,
                fn_: 1
            }
        );
    }

    #[test]
    fn precision_recall_f1_and_undefined_cases() {
        let s = Counts {
            tp: 3,
            fp: 1,
            fn_: 2,
        }
        .scores();
        assert_eq!(s.precision, Some(0.75));
        assert_eq!(s.recall, Some(0.6));
        assert!((s.f1.unwrap() - 2.0 * 0.75 * 0.6 / 1.35).abs() < 1e-12);
        assert_eq!(
            Counts {
                tp: 0,
                fp: 0,
                fn_: 2
            }
            .scores()
            .precision,
            None
        );
        assert_eq!(
            Counts {
                tp: 0,
                fp: 1,
                fn_: 2
            }
            .scores()
            .f1,
            Some(0.0)
        );
    }

    #[test]
    fn point_counts_with_and_without_adjustment() {
        let labels = [(10, 20)];
        let events = [(15, 16), (30, 31)];
        // Predicted: 15, 16, 30, 31. Actual: 10..20.
        assert_eq!(
            point_counts(&labels, &events, 40, false),
            Counts {
                tp: 2,
                fp: 2,
                fn_: 8
            }
        );
        // Adjusted: the whole range counts as found.
        assert_eq!(
            point_counts(&labels, &events, 40, true),
            Counts {
                tp: 10,
                fp: 2,
                fn_: 0
            }
        );
        // A range no event touches is not adjusted.
        assert_eq!(
            point_counts(&[(0, 5)], &[(30, 31)], 40, true),
            Counts {
                tp: 0,
                fp: 2,
                fn_: 5
            }
        );
    }

    #[test]
    fn delays_count_from_range_start_to_first_alarm() {
        let labels = [(100, 200), (300, 400), (500, 600)];
        let events = [(130, 140), (120, 125), (290, 310)];
        assert_eq!(detection_delays(&labels, &events), vec![20, 0]);
    }
}
