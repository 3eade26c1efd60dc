//! A channel's recent normalised samples: its current window, and the rows of
//! the windows still queued for inference.
//!
//! Windows are not copied when they are queued. A queued window is just the
//! number of its newest row; the rows stay here until the batch holding the
//! window is cut, when they are copied once, compactly (a run of consecutive
//! windows shares its rows), into the batch. So a sample costs one row of
//! memory traffic on the engine's thread, not one window: a window is
//! `satwatch.window` rows (128 for the shipped models), and writing windows
//! into a long queue was most of the pipeline's own work (BENCHMARKS.md,
//! "What limits these figures").

use std::ops::RangeInclusive;

use crate::repository::Normalisation;

#[derive(Debug, Clone)]
pub struct Window {
    len: usize,
    features: usize,
    /// Live rows (`features` values each) from row number `first`, after a
    /// dead prefix of `dead` rows that the next compaction drops.
    rows: Vec<f32>,
    dead: usize,
    /// Row number of the first live row. Row numbers count every row pushed
    /// and never restart, so a stale reference can never alias a new row.
    first: u64,
    /// Rows pushed since the last clear, saturating at `len`.
    filled: usize,
    center: Vec<f32>,
    /// 1 / scale, so normalising is a multiply.
    inv_scale: Vec<f32>,
}

impl Window {
    pub fn new(len: usize, normalisation: &Normalisation) -> Self {
        let features = normalisation.center.len();
        assert!(
            len > 0 && features > 0,
            "a window has at least one row and one feature"
        );
        Self {
            len,
            features,
            rows: Vec::with_capacity(2 * len * features),
            dead: 0,
            first: 0,
            filled: 0,
            center: normalisation.center.clone(),
            inv_scale: normalisation.scale.iter().map(|s| 1.0 / s).collect(),
        }
    }

    /// Normalises `values` and appends them as the newest row; returns its
    /// row number.
    pub fn push(&mut self, values: &[f32]) -> u64 {
        debug_assert_eq!(values.len(), self.features, "the decoder checked the arity");
        self.compact();
        self.rows.extend(
            values
                .iter()
                .zip(&self.center)
                .zip(&self.inv_scale)
                .map(|((x, c), s)| (x - c) * s),
        );
        self.filled = (self.filled + 1).min(self.len);
        self.newest()
    }

    /// Number of the newest row (meaningless before the first push).
    fn newest(&self) -> u64 {
        self.first + self.live_rows() as u64 - 1
    }

    fn live_rows(&self) -> usize {
        self.rows.len() / self.features - self.dead
    }

    /// Rows before `row` are needed by no queued window. The rows of the
    /// windows to come (the newest `len - 1`) are always kept.
    pub fn release_before(&mut self, row: u64) {
        if self.live_rows() == 0 {
            return;
        }
        let keep_from = row.min((self.newest() + 2).saturating_sub(self.len as u64));
        if keep_from > self.first {
            let drop = (keep_from - self.first).min(self.live_rows() as u64) as usize;
            self.dead += drop;
            self.first += drop as u64;
        }
    }

    /// Drops the dead prefix when the buffer is full, rather than growing it:
    /// the buffer holds two windows to begin with, so with nothing queued
    /// this moves a window's worth of live rows every window's worth of
    /// pushes, about one row per push.
    fn compact(&mut self) {
        if self.dead > 0 && self.rows.len() + self.features > self.rows.capacity() {
            self.rows.drain(..self.dead * self.features);
            self.dead = 0;
        }
    }

    /// The values of rows `rows` (all live), oldest first.
    pub fn rows(&self, rows: RangeInclusive<u64>) -> &[f32] {
        let (from, to) = (*rows.start(), *rows.end());
        assert!(
            from >= self.first && to <= self.newest() && from <= to,
            "rows {from}..={to} are outside the live rows {}..={}",
            self.first,
            self.newest()
        );
        let start = (self.dead + (from - self.first) as usize) * self.features;
        let end = start + (to - from + 1) as usize * self.features;
        &self.rows[start..end]
    }

    /// Re-expresses the stored rows (queued windows' included) under `new`
    /// normalisation parameters (they were normalised with `old`), and
    /// normalises later rows with `new`.
    pub fn renormalise(&mut self, old: &Normalisation, new: &Normalisation) {
        let f = self.features;
        for (i, x) in self.rows.iter_mut().enumerate() {
            let j = i % f;
            *x = (*x * old.scale[j] + old.center[j] - new.center[j]) / new.scale[j];
        }
        self.center = new.center.clone();
        self.inv_scale = new.scale.iter().map(|s| 1.0 / s).collect();
    }

    /// Forgets every sample (a restored channel refills from Kafka); row
    /// numbers go on from where they were.
    pub fn clear(&mut self) {
        if !self.rows.is_empty() {
            self.first = self.newest() + 1;
        }
        self.rows.clear();
        self.dead = 0;
        self.filled = 0;
    }

    pub fn is_full(&self) -> bool {
        self.filled == self.len
    }

    /// Bytes of memory this window holds, for per-channel accounting.
    pub fn heap_bytes(&self) -> usize {
        (self.rows.capacity() + self.center.capacity() + self.inv_scale.capacity())
            * std::mem::size_of::<f32>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(features: usize) -> Normalisation {
        Normalisation {
            center: vec![1.0; features],
            scale: vec![2.0; features],
        }
    }

    #[test]
    fn rows_are_normalised_and_numbered_in_order() {
        let mut w = Window::new(3, &norm(2));
        assert_eq!(w.push(&[1.0, 3.0]), 0);
        assert_eq!(w.push(&[5.0, 7.0]), 1);
        assert!(!w.is_full());
        assert_eq!(w.push(&[9.0, 11.0]), 2);
        assert!(w.is_full());
        assert_eq!(w.rows(0..=2), &[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
        assert_eq!(w.rows(1..=1), &[2.0, 3.0]);
    }

    #[test]
    fn queued_rows_stay_until_released_then_only_the_next_window_is_kept() {
        let mut w = Window::new(3, &norm(1));
        for x in 0..10 {
            w.push(&[1.0 + 2.0 * x as f32]);
        }
        // Nothing released yet: a window queued at row 2 can still be read.
        assert_eq!(w.rows(0..=2), &[0.0, 1.0, 2.0]);
        w.release_before(5);
        assert_eq!(w.rows(5..=9), &[5.0, 6.0, 7.0, 8.0, 9.0]);
        // Releasing everything keeps the 2 rows the next window needs, and
        // the dead prefix is dropped by later pushes without losing them.
        w.release_before(u64::MAX);
        let capacity = w.rows.capacity();
        for x in 10..40 {
            w.push(&[1.0 + 2.0 * x as f32]);
            w.release_before(u64::MAX);
        }
        assert_eq!(w.rows(38..=39), &[38.0, 39.0]);
        assert_eq!(w.rows.capacity(), capacity, "compaction, not growth");
    }

    #[test]
    #[should_panic(expected = "outside the live rows")]
    fn released_rows_cannot_be_read() {
        let mut w = Window::new(2, &norm(1));
        for x in 0..6 {
            w.push(&[x as f32]);
        }
        w.release_before(4);
        let _ = w.rows(3..=4);
    }

    #[test]
    fn clear_restarts_the_fill_but_not_the_numbering() {
        let mut w = Window::new(2, &norm(1));
        w.push(&[1.0]);
        w.push(&[3.0]);
        w.clear();
        assert!(!w.is_full());
        assert_eq!(w.push(&[5.0]), 2);
        assert_eq!(w.push(&[7.0]), 3);
        assert!(w.is_full());
        assert_eq!(w.rows(2..=3), &[2.0, 3.0]);
    }

    #[test]
    fn renormalise_rewrites_queued_rows() {
        let mut w = Window::new(2, &norm(1));
        w.push(&[3.0]);
        w.push(&[5.0]);
        let new = Normalisation {
            center: vec![0.0],
            scale: vec![1.0],
        };
        w.renormalise(&norm(1), &new);
        assert_eq!(w.rows(0..=1), &[3.0, 5.0]);
        w.push(&[7.0]);
        assert_eq!(w.rows(2..=2), &[7.0]);
    }
}
