//! A channel's sliding window of normalised samples.
//!
//! Each row is stored twice, `len` rows apart, so the current window is always
//! one contiguous slice: building a batch is a single copy per window, with no
//! wrap-around split.

use crate::repository::Normalisation;

#[derive(Debug, Clone)]
pub struct Window {
    len: usize,
    features: usize,
    /// `2 * len` rows of `features` normalised values.
    rows: Vec<f32>,
    /// Row slot the next sample is written to (0..len).
    next: usize,
    /// Samples pushed, saturating at `len`.
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
            rows: vec![0.0; 2 * len * features],
            next: 0,
            filled: 0,
            center: normalisation.center.clone(),
            inv_scale: normalisation.scale.iter().map(|s| 1.0 / s).collect(),
        }
    }

    /// Normalises `values` and appends them as the newest row.
    pub fn push(&mut self, values: &[f32]) {
        debug_assert_eq!(values.len(), self.features, "the decoder checked the arity");
        let f = self.features;
        let lower = self.next * f;
        let upper = (self.next + self.len) * f;
        for i in 0..f {
            let x = (values[i] - self.center[i]) * self.inv_scale[i];
            self.rows[lower + i] = x;
            self.rows[upper + i] = x;
        }
        self.next = (self.next + 1) % self.len;
        self.filled = (self.filled + 1).min(self.len);
    }

    /// Re-expresses the stored rows under `new` normalisation parameters
    /// (they were normalised with `old`), and normalises later rows with `new`.
    pub fn renormalise(&mut self, old: &Normalisation, new: &Normalisation) {
        let f = self.features;
        for (i, x) in self.rows.iter_mut().enumerate() {
            let j = i % f;
            *x = (*x * old.scale[j] + old.center[j] - new.center[j]) / new.scale[j];
        }
        self.center = new.center.clone();
        self.inv_scale = new.scale.iter().map(|s| 1.0 / s).collect();
    }

    /// Forgets every sample (a restored channel refills from Kafka).
    pub fn clear(&mut self) {
        self.next = 0;
        self.filled = 0;
    }

    pub fn is_full(&self) -> bool {
        self.filled == self.len
    }

    /// The last `len` rows, oldest first, `len * features` values.
    pub fn as_slice(&self) -> &[f32] {
        let start = self.next * self.features;
        &self.rows[start..start + self.len * self.features]
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
    fn fills_then_slides_oldest_first() {
        let mut w = Window::new(3, &norm(2));
        w.push(&[1.0, 3.0]);
        w.push(&[5.0, 7.0]);
        assert!(!w.is_full());
        w.push(&[9.0, 11.0]);
        assert!(w.is_full());
        assert_eq!(w.as_slice(), &[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
        w.push(&[13.0, 15.0]);
        assert_eq!(w.as_slice(), &[2.0, 3.0, 4.0, 5.0, 6.0, 7.0]);
        for x in [17.0, 21.0, 25.0] {
            w.push(&[x, x]);
        }
        assert_eq!(w.as_slice(), &[8.0, 8.0, 10.0, 10.0, 12.0, 12.0]);
    }

    #[test]
    fn window_of_one_is_the_newest_row() {
        let mut w = Window::new(1, &norm(1));
        w.push(&[3.0]);
        w.push(&[5.0]);
        assert_eq!(w.as_slice(), &[2.0]);
    }
}
