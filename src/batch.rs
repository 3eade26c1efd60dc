//! A model's dynamic batcher, with Triton's semantics.
//!
//! Windows queue per model. A batch is cut when the queue can fill the largest
//! preferred batch size (or `max_batch_size` when none is preferred), or when
//! its oldest window has waited `max_queue_delay`; then it takes as many
//! windows as are queued, up to that size. Pure state: the caller supplies the
//! clock.
//!
//! Windows are copied once, into the buffer that goes to the backend: the
//! queue is a list of segments of one full batch each, so cutting a batch
//! hands over a segment whole, and a long queue is never shifted or regrown.

use std::{collections::VecDeque, time::Instant};

use crate::repository::BatchPolicy;

#[derive(Debug)]
pub struct Batcher<T> {
    policy: BatchPolicy,
    /// Floats per window.
    window_len: usize,
    /// Windows in a full batch: the largest preferred size, or the maximum.
    full_size: usize,
    /// Queued windows, oldest first, in segments of at most `full_size`; only
    /// the last segment is ever partly filled.
    segments: VecDeque<Segment<T>>,
    queued: usize,
    /// Input buffers of completed batches, reused so that queueing does not
    /// allocate (and page-fault) a fresh buffer for every batch.
    spare: Vec<Vec<f32>>,
}

#[derive(Debug)]
struct Segment<T> {
    inputs: Vec<f32>,
    entries: Vec<T>,
    /// When its first window was queued.
    oldest_enqueued: Instant,
}

/// A cut batch: `entries.len()` windows of `window_len` floats in `inputs`.
#[derive(Debug)]
pub struct Batch<T> {
    pub inputs: Vec<f32>,
    pub entries: Vec<T>,
    /// When the oldest window was queued (queue time = dispatch - this).
    pub oldest_enqueued: Instant,
}

/// Buffers kept for reuse: one batch in flight, one being filled, and slack
/// for a backlog.
const SPARE_BUFFERS: usize = 4;

impl<T> Batcher<T> {
    pub fn new(policy: BatchPolicy, window_len: usize) -> Self {
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
            window_len,
            full_size,
            segments: VecDeque::new(),
            queued: 0,
            spare: Vec::new(),
        }
    }

    /// Returns a batch's input buffer once the backend is done with it.
    pub fn recycle(&mut self, mut inputs: Vec<f32>) {
        if self.spare.len() < SPARE_BUFFERS {
            inputs.clear();
            self.spare.push(inputs);
        }
    }

    pub fn push(&mut self, window: &[f32], entry: T, now: Instant) {
        debug_assert_eq!(window.len(), self.window_len);
        if self
            .segments
            .back()
            .is_none_or(|s| s.entries.len() == self.full_size)
        {
            let floats = self.full_size * self.window_len;
            let mut inputs = self.spare.pop().unwrap_or_default();
            inputs.reserve_exact(floats);
            self.segments.push_back(Segment {
                inputs,
                entries: Vec::with_capacity(self.full_size),
                oldest_enqueued: now,
            });
        }
        let segment = self.segments.back_mut().expect("pushed above");
        segment.inputs.extend_from_slice(window);
        segment.entries.push(entry);
        self.queued += 1;
    }

    pub fn len(&self) -> usize {
        self.queued
    }

    /// Rewrites every queued input value as `f(position within its window,
    /// value)`: for re-normalising queued windows when a model version with
    /// other normalisation parameters is swapped in.
    pub fn map_queued(&mut self, mut f: impl FnMut(usize, f32) -> f32) {
        let len = self.window_len;
        for segment in &mut self.segments {
            for (i, x) in segment.inputs.iter_mut().enumerate() {
                *x = f(i % len, *x);
            }
        }
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
        Some(Batch {
            inputs: segment.inputs,
            entries: segment.entries,
            oldest_enqueued: segment.oldest_enqueued,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn batcher(preferred: &[usize], max: usize, delay_us: u64) -> Batcher<u32> {
        Batcher::new(
            BatchPolicy {
                max_batch_size: max,
                preferred_batch_sizes: preferred.to_vec(),
                max_queue_delay: Duration::from_micros(delay_us),
            },
            2,
        )
    }

    fn fill(b: &mut Batcher<u32>, n: u32, now: Instant) {
        for i in 0..n {
            b.push(&[i as f32, -(i as f32)], i, now);
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
        assert_eq!(batch.inputs, vec![0.0, -0.0, 1.0, -1.0, 2.0, -2.0]);
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
        assert_eq!(batch.inputs.len(), 8);
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
        b.push(&[0.0, 0.0], 0, t0);
        b.push(&[0.0, 0.0], 1, t0);
        b.push(&[0.0, 0.0], 2, t0 + Duration::from_micros(50));
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
    fn a_recycled_buffer_carries_the_next_batch() {
        let t0 = Instant::now();
        let mut b = batcher(&[2], 4, 100);
        fill(&mut b, 2, t0);
        let first = b.cut(t0).unwrap();
        let buffer = first.inputs.as_ptr();
        b.recycle(first.inputs);
        fill(&mut b, 2, t0);
        let second = b.cut(t0).unwrap();
        assert_eq!(
            second.inputs.as_ptr(),
            buffer,
            "no new allocation, no copy at the cut"
        );
        assert_eq!(second.inputs, vec![0.0, -0.0, 1.0, -1.0]);
    }
}
