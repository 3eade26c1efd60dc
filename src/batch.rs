//! A model's dynamic batcher, with Triton's semantics.
//!
//! Windows queue per model. A batch is cut when the queue can fill the largest
//! preferred batch size that fits (or `max_batch_size` when none is
//! preferred), or when its oldest window has waited `max_queue_delay`; then it
//! takes as many windows as are queued, up to `max_batch_size`. Pure state: the
//! caller supplies the clock.

use std::{collections::VecDeque, time::Instant};

use crate::repository::BatchPolicy;

#[derive(Debug)]
pub struct Batcher<T> {
    policy: BatchPolicy,
    /// Floats per window.
    window_len: usize,
    /// Queued windows, back to back, oldest first.
    inputs: Vec<f32>,
    /// One entry per queued window, with its enqueue time for the deadline.
    entries: VecDeque<(T, Instant)>,
    /// Input buffers of completed batches, reused so that cutting a batch
    /// does not allocate (and page-fault) a fresh buffer every time.
    spare: Vec<Vec<f32>>,
}

/// A cut batch: `entries.len()` windows of `window_len` floats in `inputs`.
#[derive(Debug)]
pub struct Batch<T> {
    pub inputs: Vec<f32>,
    pub entries: Vec<T>,
    /// When the oldest window was queued (queue time = dispatch - this).
    pub oldest_enqueued: Instant,
}

impl<T> Batcher<T> {
    pub fn new(policy: BatchPolicy, window_len: usize) -> Self {
        assert!(
            policy.max_batch_size > 0,
            "the repository validated max_batch_size > 0"
        );
        Self {
            inputs: Vec::new(),
            policy,
            window_len,
            entries: VecDeque::new(),
            spare: Vec::new(),
        }
    }

    /// Returns a batch's input buffer once the backend is done with it.
    pub fn recycle(&mut self, mut inputs: Vec<f32>) {
        // Two spares cover one batch in flight plus one being cut.
        if self.spare.len() < 2 {
            inputs.clear();
            self.spare.push(inputs);
        }
    }

    pub fn push(&mut self, window: &[f32], entry: T, now: Instant) {
        debug_assert_eq!(window.len(), self.window_len);
        self.inputs.extend_from_slice(window);
        self.entries.push_back((entry, now));
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Rewrites every queued input value as `f(position within its window,
    /// value)`: for re-normalising queued windows when a model version with
    /// other normalisation parameters is swapped in.
    pub fn map_queued(&mut self, mut f: impl FnMut(usize, f32) -> f32) {
        let len = self.window_len;
        for (i, x) in self.inputs.iter_mut().enumerate() {
            *x = f(i % len, *x);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// When the oldest queued window's delay runs out.
    pub fn deadline(&self) -> Option<Instant> {
        self.entries
            .front()
            .map(|(_, t)| *t + self.policy.max_queue_delay)
    }

    /// The size of the batch to cut now, if one is due.
    pub fn ready_size(&self, now: Instant) -> Option<usize> {
        let queued = self.entries.len();
        if queued == 0 {
            return None;
        }
        let max = self.policy.max_batch_size;
        let full_size = self
            .policy
            .preferred_batch_sizes
            .last()
            .copied()
            .unwrap_or(max);
        if queued >= full_size || queued >= max {
            // Take the largest preferred size the queue can fill.
            let fitting = self
                .policy
                .preferred_batch_sizes
                .iter()
                .rev()
                .find(|&&p| p <= queued);
            return Some(fitting.copied().unwrap_or(max).min(max));
        }
        if self.deadline().is_some_and(|d| now >= d) {
            return Some(queued.min(max));
        }
        None
    }

    /// Cuts the batch that is due, if any.
    pub fn cut(&mut self, now: Instant) -> Option<Batch<T>> {
        let size = self.ready_size(now)?;
        Some(self.take(size))
    }

    /// Cuts whatever is queued (up to `max_batch_size`) regardless of the
    /// deadline: for draining at shutdown or the end of an offline run.
    pub fn flush(&mut self) -> Option<Batch<T>> {
        if self.entries.is_empty() {
            return None;
        }
        Some(self.take(self.entries.len().min(self.policy.max_batch_size)))
    }

    fn take(&mut self, size: usize) -> Batch<T> {
        let oldest_enqueued = self
            .entries
            .front()
            .expect("take is called on a non-empty queue")
            .1;
        let entries: Vec<T> = self.entries.drain(..size).map(|(e, _)| e).collect();
        let floats = size * self.window_len;
        let mut inputs = self.spare.pop().unwrap_or_default();
        if floats == self.inputs.len() {
            // The common case: the whole queue goes; keep the spare for the queue.
            std::mem::swap(&mut inputs, &mut self.inputs);
        } else {
            inputs.extend_from_slice(&self.inputs[..floats]);
            self.inputs.drain(..floats);
        }
        Batch {
            inputs,
            entries,
            oldest_enqueued,
        }
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
}
