//! Owns the process-wide wall time per named phase: `timer` and `take`.
//! Layer: ground — may import error; no sibling.
//!
//! Wall time per named phase of the hot loops (capture, covariance, eigendecomposition, …),
//! accumulated process-wide. Benchmarks print the breakdown ([`take`]); the cost is two
//! clock reads and a short lock per phase entry, negligible next to the work timed.

use std::sync::Mutex;
use std::time::{Duration, Instant};

static PHASES: Mutex<Vec<(&'static str, Duration, u64)>> = Mutex::new(Vec::new());

/// Times the enclosing scope as phase `name` (ends when dropped).
#[must_use = "the phase ends when this guard is dropped"]
pub struct Timer {
    name: &'static str,
    start: Instant,
}

/// Starts timing phase `name`.
pub fn timer(name: &'static str) -> Timer {
    Timer {
        name,
        start: Instant::now(),
    }
}

impl Drop for Timer {
    fn drop(&mut self) {
        let dt = self.start.elapsed();
        if let Ok(mut p) = PHASES.lock() {
            match p.iter_mut().find(|(n, _, _)| *n == self.name) {
                Some(e) => {
                    e.1 += dt;
                    e.2 += 1;
                }
                None => p.push((self.name, dt, 1)),
            }
        }
    }
}

/// The phases timed since the last call (name, seconds, entries), in first-seen order, and
/// resets them.
pub fn take() -> Vec<(&'static str, f64, u64)> {
    PHASES
        .lock()
        .map(|mut p| {
            p.drain(..)
                .map(|(n, d, c)| (n, d.as_secs_f64(), c))
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accumulates_per_name() {
        take();
        for _ in 0..3 {
            let _t = timer("test.a");
            std::thread::sleep(Duration::from_millis(2));
        }
        drop(timer("test.b"));
        let p = take();
        let a = p.iter().find(|e| e.0 == "test.a").unwrap();
        assert_eq!(a.2, 3);
        assert!(a.1 >= 0.006);
        assert!(p.iter().any(|e| e.0 == "test.b" && e.2 == 1));
        assert!(take().iter().all(|e| !e.0.starts_with("test.")));
    }
}
