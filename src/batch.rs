//! A model's dynamic batcher, with Triton's semantics, and the compact form
//! a batch's windows travel in.
//!
//! Windows queue per model. A batch is cut when the queue can fill the largest
//! preferred batch size (or `max_batch_size` when none is preferred), or when
//! its oldest window has waited `max_queue_delay`; then it takes as many
//! windows as are queued, up to that size. Pure state: the caller supplies the
//! clock.
//!
//! The queue holds only bookkeeping: a window's values stay in its channel's
//! [`Window`](crate::window::Window) until the batch is cut, and then go to
//! the backend as [`BatchInputs`], where consecutive windows of one channel
//! share their rows. They are laid out window by window only on the inference
//! thread, right before the call, into a buffer that stays in that core's
//! cache.

use std::{collections::VecDeque, time::Instant};

use crate::repository::{BatchPolicy, Normalisation};

#[derive(Debug)]
pub struct Batcher<T> {
    policy: BatchPolicy,
    /// Windows in a full batch: the largest preferred size, or the maximum.
    full_size: usize,
    /// Queued windows, oldest first, in segments of at most `full_size`; only
    /// the last segment is ever partly filled.
    segments: VecDeque<Batch<T>>,
    queued: usize,
}

/// A cut batch (or a queued segment of one).
#[derive(Debug)]
pub struct Batch<T> {
    pub entries: Vec<T>,
    /// When the oldest window was queued (queue time = dispatch - this).
    pub oldest_enqueued: Instant,
}

impl<T> Batcher<T> {
    pub fn new(policy: BatchPolicy) -> Self {
        assert!(
            policy.max_batch_size > 0,
            "the repository validated max_batch_size > 0"
        );
        // The repository keeps preferred sizes within 1..=max_batch_size.
        let full_size = policy
            .preferred_batch_sizes
            .last()
            .copied()
            .unwrap_or(policy.max_batch_size);
        Self {
            policy,
            full_size,
            segments: VecDeque::new(),
            queued: 0,
        }
    }

    pub fn push(&mut self, entry: T, now: Instant) {
        if self
            .segments
            .back()
            .is_none_or(|s| s.entries.len() == self.full_size)
        {
            self.segments.push_back(Batch {
                entries: Vec::with_capacity(self.full_size),
                oldest_enqueued: now,
            });
        }
        let segment = self.segments.back_mut().expect("pushed above");
        segment.entries.push(entry);
        self.queued += 1;
    }

    pub fn len(&self) -> usize {
        self.queued
    }

    pub fn is_empty(&self) -> bool {
        self.queued == 0
    }

    /// When the oldest queued window's delay runs out.
    pub fn deadline(&self) -> Option<Instant> {
        self.segments
            .front()
            .map(|s| s.oldest_enqueued + self.policy.max_queue_delay)
    }

    /// The size of the batch to cut now, if one is due: a full batch as soon
    /// as one is queued, otherwise what is queued once the deadline passed.
    pub fn ready_size(&self, now: Instant) -> Option<usize> {
        let front = self.segments.front()?;
        let due =
            front.entries.len() == self.full_size || self.deadline().is_some_and(|d| now >= d);
        due.then_some(front.entries.len())
    }

    /// Cuts the batch that is due, if any.
    pub fn cut(&mut self, now: Instant) -> Option<Batch<T>> {
        self.ready_size(now)?;
        self.flush()
    }

    /// Cuts the oldest queued windows (up to a full batch) regardless of the
    /// deadline: for draining at shutdown or the end of an offline run.
    pub fn flush(&mut self) -> Option<Batch<T>> {
        let segment = self.segments.pop_front()?;
        self.queued -= segment.entries.len();
        Some(segment)
    }
}

/// A batch's windows, compactly: runs of consecutive windows of one channel,
/// each stored as its rows (a run of `n` windows of `len` rows is `n + len -
/// 1` rows), and where each window of the batch starts among them.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct BatchInputs {
    /// Every run's rows, run after run.
    pub rows: Vec<f32>,
    /// Where each run starts in `rows` (in floats), in push order; a run ends
    /// where the next starts.
    pub run_starts: Vec<usize>,
    /// Where each window starts in `rows` (in floats), in the batch's order.
    pub starts: Vec<usize>,
    /// Floats per window.
    pub window_floats: usize,
}

impl BatchInputs {
    pub fn new(window_floats: usize) -> Self {
        Self {
            window_floats,
            ..Self::default()
        }
    }

    /// Empties it for reuse, keeping its buffers.
    pub fn clear(&mut self) {
        self.rows.clear();
        self.run_starts.clear();
        self.starts.clear();
    }

    /// Windows in the batch.
    pub fn len(&self) -> usize {
        self.starts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.starts.is_empty()
    }

    /// Each run's rows, in push order.
    pub fn runs(&self) -> impl Iterator<Item = &[f32]> + '_ {
        let ends = self
            .run_starts
            .iter()
            .skip(1)
            .copied()
            .chain(std::iter::once(self.rows.len()));
        self.run_starts
            .iter()
            .zip(ends)
            .map(|(&from, to)| &self.rows[from..to])
    }

    /// The run holding the window that starts at `start` (in floats), and
    /// where in that run it starts.
    pub fn locate(&self, start: usize) -> (usize, usize) {
        let run = self.run_starts.partition_point(|&s| s <= start) - 1;
        (run, start - self.run_starts[run])
    }

    /// Appends a run's rows; returns where they start (in floats).
    pub fn push_run(&mut self, rows: &[f32]) -> usize {
        let start = self.rows.len();
        self.run_starts.push(start);
        self.rows.extend_from_slice(rows);
        start
    }

    /// Appends a window of the batch, starting at `start` (in floats).
    pub fn push_window(&mut self, start: usize) {
        debug_assert!(start + self.window_floats <= self.rows.len());
        self.starts.push(start);
    }

    /// Rewrites every row (`features` values each), normalised by `old`, as
    /// normalised by `new`: a batch whose call failed runs again on a
    /// version loaded meanwhile, which may normalise otherwise.
    pub fn renormalise(&mut self, features: usize, old: &Normalisation, new: &Normalisation) {
        if old == new {
            return;
        }
        for (i, x) in self.rows.iter_mut().enumerate() {
            let j = i % features;
            *x = (*x * old.scale[j] + old.center[j] - new.center[j]) / new.scale[j];
        }
    }

    /// The windows laid out `[len, window, features]`: `rows` itself when no
    /// two windows share rows, else copied out into `scratch`.
    pub fn windows<'a>(&'a self, scratch: &'a mut Vec<f32>) -> &'a [f32] {
        let w = self.window_floats;
        if self.starts.iter().enumerate().all(|(i, &s)| s == i * w) {
            return &self.rows[..self.starts.len() * w];
        }
        scratch.clear();
        scratch.reserve(self.starts.len() * w);
        for &start in &self.starts {
            scratch.extend_from_slice(&self.rows[start..start + w]);
        }
        scratch
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn renormalise_rewrites_every_row_feature_by_feature() {
        let old = Normalisation {
            center: vec![1.0, 0.0],
            scale: vec![2.0, 1.0],
        };
        let new = Normalisation {
            center: vec![0.0, 10.0],
            scale: vec![1.0, 0.5],
        };
        let mut inputs = BatchInputs::new(4);
        // Two rows of two features: raw values (3, 4) and (5, 6).
        inputs.push_run(&[1.0, 4.0, 2.0, 6.0]);
        inputs.push_window(0);
        inputs.renormalise(2, &old, &new);
        assert_eq!(inputs.rows, [3.0, -12.0, 5.0, -8.0]);
    }

    fn batcher(preferred: &[usize], max: usize, delay_us: u64) -> Batcher<u32> {
        Batcher::new(BatchPolicy {
            max_batch_size: max,
            preferred_batch_sizes: preferred.to_vec(),
            max_queue_delay: Duration::from_micros(delay_us),
        })
    }

    fn fill(b: &mut Batcher<u32>, n: u32, now: Instant) {
        for i in 0..n {
            b.push(i, now);
        }
    }

    #[test]
    fn waits_below_preferred_size_until_the_deadline() {
        let t0 = Instant::now();
        let mut b = batcher(&[4], 8, 1000);
        fill(&mut b, 3, t0);
        assert_eq!(
            b.cut(t0 + Duration::from_micros(999))
                .map(|x| x.entries.len()),
            None
        );
        assert_eq!(b.deadline(), Some(t0 + Duration::from_micros(1000)));
        let batch = b.cut(t0 + Duration::from_micros(1000)).unwrap();
        assert_eq!(batch.entries, vec![0, 1, 2]);
        assert!(b.is_empty());
    }

    #[test]
    fn preferred_size_is_sent_at_once() {
        let t0 = Instant::now();
        let mut b = batcher(&[2, 4], 8, 1_000_000);
        fill(&mut b, 4, t0);
        assert_eq!(b.ready_size(t0), Some(4));
        fill(&mut b, 2, t0);
        // Six queued: the largest preferred size that fits is 4, the rest waits.
        let batch = b.cut(t0).unwrap();
        assert_eq!(batch.entries, vec![0, 1, 2, 3]);
        assert_eq!(b.len(), 2);
        assert_eq!(
            b.cut(t0).map(|x| x.entries.len()),
            None,
            "2 is preferred but the queue is below the largest"
        );
    }

    #[test]
    fn max_batch_size_without_preferred_sizes() {
        let t0 = Instant::now();
        let mut b = batcher(&[], 3, 1_000_000);
        fill(&mut b, 7, t0);
        assert_eq!(b.cut(t0).unwrap().entries, vec![0, 1, 2]);
        assert_eq!(b.cut(t0).unwrap().entries, vec![3, 4, 5]);
        assert_eq!(b.cut(t0).map(|x| x.entries.len()), None);
        assert_eq!(b.flush().unwrap().entries, vec![6]);
        assert!(b.flush().is_none());
    }

    #[test]
    fn deadline_follows_the_oldest_remaining_window() {
        let t0 = Instant::now();
        let mut b = batcher(&[2], 4, 100);
        b.push(0, t0);
        b.push(1, t0);
        b.push(2, t0 + Duration::from_micros(50));
        assert_eq!(b.cut(t0).unwrap().entries, vec![0, 1]);
        assert_eq!(b.deadline(), Some(t0 + Duration::from_micros(150)));
    }

    #[test]
    fn zero_delay_sends_every_window_immediately() {
        let t0 = Instant::now();
        let mut b = batcher(&[], 8, 0);
        fill(&mut b, 1, t0);
        assert_eq!(b.cut(t0).unwrap().entries, vec![0]);
    }

    #[test]
    fn windows_of_one_run_share_rows_and_are_laid_out_in_batch_order() {
        // Windows of 2 rows of 1 feature. Run A: rows 1, 2, 3 (two windows);
        // run B: rows 10, 11 (one window).
        let mut inputs = BatchInputs::new(2);
        let a = inputs.push_run(&[1.0, 2.0, 3.0]);
        let b = inputs.push_run(&[10.0, 11.0]);
        inputs.push_window(a);
        inputs.push_window(b);
        inputs.push_window(a + 1);
        assert_eq!(inputs.starts.len(), 3);
        let mut scratch = Vec::new();
        assert_eq!(
            inputs.windows(&mut scratch),
            &[1.0, 2.0, 10.0, 11.0, 2.0, 3.0]
        );
    }

    #[test]
    fn windows_with_rows_of_their_own_are_passed_without_a_copy() {
        let mut inputs = BatchInputs::new(2);
        let a = inputs.push_run(&[1.0, 2.0]);
        let b = inputs.push_run(&[3.0, 4.0]);
        inputs.push_window(a);
        inputs.push_window(b);
        let mut scratch = Vec::new();
        let windows = inputs.windows(&mut scratch);
        assert_eq!(windows.as_ptr(), inputs.rows.as_ptr());
        assert_eq!(windows, &[1.0, 2.0, 3.0, 4.0]);
    }

    #[test]
    fn runs_and_the_run_each_window_starts_in() {
        let mut inputs = BatchInputs::new(2);
        let a = inputs.push_run(&[1.0, 2.0, 3.0]);
        let b = inputs.push_run(&[10.0, 11.0]);
        inputs.push_window(a + 1);
        inputs.push_window(b);
        let runs: Vec<&[f32]> = inputs.runs().collect();
        assert_eq!(runs, [&[1.0, 2.0, 3.0][..], &[10.0, 11.0][..]]);
        assert_eq!(inputs.len(), 2);
        assert_eq!(inputs.locate(a + 1), (0, 1));
        assert_eq!(inputs.locate(b), (1, 0));
        inputs.clear();
        assert_eq!(inputs.runs().count(), 0);
        assert!(inputs.is_empty());
    }
}
