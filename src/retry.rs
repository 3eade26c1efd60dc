//! Waiting between attempts at something that will work again once the
//! outside world recovers (a broker failing over, PostgreSQL restarting).
//!
//! Every retry loop in satwatch waits the same way: 0.1 s after the first
//! failure, doubling to at most 5 s, so an outage of any length costs at
//! most 5 s of extra delay once it ends, and a flapping dependency is not
//! hammered. The loops themselves differ in what they undo between attempts
//! (a rolled-back transaction, a dropped connection), so this is only the
//! clock, not a combinator.

use std::time::Duration;

/// The wait after the first failure.
pub const FIRST_DELAY: Duration = Duration::from_millis(100);
/// The longest wait between two attempts.
pub const MAX_DELAY: Duration = Duration::from_secs(5);

/// The delays of one run of failures.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

impl Backoff {
    pub fn new() -> Self {
        Self { next: FIRST_DELAY }
    }

    /// The wait after `failures` failures in a row (the first is 1).
    pub fn after(failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(16);
        (FIRST_DELAY * 2u32.pow(doublings)).min(MAX_DELAY)
    }

    /// Milliseconds of the next wait, as the log lines report it.
    pub fn next_ms(&self) -> u64 {
        self.next.as_millis() as u64
    }

    /// Sleeps the next delay on the async runtime and lengthens the one after.
    pub async fn wait(&mut self) {
        tokio::time::sleep(self.take()).await;
    }

    /// Sleeps the next delay on this thread (for librdkafka's callbacks,
    /// which run outside the async runtime).
    pub fn wait_blocking(&mut self) {
        std::thread::sleep(self.take());
    }

    fn take(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(MAX_DELAY);
        delay
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_from_a_tenth_of_a_second_to_five_seconds() {
        let mut backoff = Backoff::new();
        let delays: Vec<u64> = (0..8)
            .map(|_| {
                let ms = backoff.next_ms();
                backoff.take();
                ms
            })
            .collect();
        assert_eq!(delays, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        let counted: Vec<u64> = (1..=8)
            .map(|n| Backoff::after(n).as_millis() as u64)
            .collect();
        assert_eq!(counted, delays);
        assert_eq!(Backoff::after(u32::MAX), MAX_DELAY);
    }
}
