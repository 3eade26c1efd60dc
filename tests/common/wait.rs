//! Waiting on a condition with a deadline, never sleeping and hoping.

use std::time::{Duration, Instant};

/// Polls `check` until it returns `Some`, failing the test with `what` at the deadline.
pub fn wait_for<T>(what: &str, deadline: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + deadline;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            Instant::now() < end,
            "timed out after {deadline:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
