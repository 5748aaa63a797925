//! Owns `Schedule`: learning-rate schedules η_k as the Hugging Face Trainer computes them.
//! Layer: train — may import the ground, linalg, backend, model, data and hub; no sibling.
//!
//! Learning-rate schedules: η_k for optimizer step k = 0 … T − 1, as the Hugging Face
//! Trainer's `lr_lambda`s compute them (linear warm-up over W steps from 0, then constant,
//! linear decay or cosine decay to 0 at step T), so trajectories trained here and imported
//! from the Trainer agree.
//!
//! Closed forms the tests check: constant Σ η = Tη; linear and cosine without warm-up both
//! Σ_k η_k = η (T + 1) / 2; warm-up contributes η (W − 1) / 2.

use crate::config::ScheduleKind;

/// A schedule over T steps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    /// After warm-up: constant, linear or cosine.
    pub kind: ScheduleKind,
    /// η: the peak learning rate.
    pub peak: f64,
    /// W: warm-up steps (η_k = η k / W for k < W; step 0 gets 0, as in the Trainer).
    pub warmup: u64,
    /// T: total steps (the decay reaches 0 at k = T).
    pub total: u64,
}

impl Schedule {
    /// The multiplier λ(k) ∈ [0, 1] of step k (0-based).
    pub fn factor(&self, k: u64) -> f64 {
        let (k, w, t) = (k as f64, self.warmup as f64, self.total as f64);
        if k < w {
            return k / w.max(1.0);
        }
        let progress = (k - w) / (t - w).max(1.0);
        match self.kind {
            ScheduleKind::Constant => 1.0,
            ScheduleKind::Linear => ((t - k) / (t - w).max(1.0)).max(0.0),
            ScheduleKind::Cosine => {
                (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
            }
        }
    }

    /// η_k = η λ(k).
    pub fn lr(&self, k: u64) -> f64 {
        self.peak * self.factor(k)
    }

    /// η_0 … η_{T−1}.
    pub fn rates(&self) -> Vec<f64> {
        (0..self.total).map(|k| self.lr(k)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(kind: ScheduleKind, warmup: u64, total: u64) -> Schedule {
        Schedule {
            kind,
            peak: 0.3,
            warmup,
            total,
        }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-12 * b.abs().max(1.0)
    }

    #[test]
    fn sums_match_closed_forms() {
        for t in [1u64, 2, 7, 10, 101] {
            let eta = 0.3;
            let tf = t as f64;
            let c: f64 = sched(ScheduleKind::Constant, 0, t).rates().iter().sum();
            assert!(close(c, eta * tf), "constant T={t}: {c}");
            let l: f64 = sched(ScheduleKind::Linear, 0, t).rates().iter().sum();
            assert!(close(l, eta * (tf + 1.0) / 2.0), "linear T={t}: {l}");
            let k: f64 = sched(ScheduleKind::Cosine, 0, t).rates().iter().sum();
            assert!(close(k, eta * (tf + 1.0) / 2.0), "cosine T={t}: {k}");
        }
        // Warm-up W then constant: η (W − 1)/2 + η (T − W).
        let s: f64 = sched(ScheduleKind::Constant, 4, 10).rates().iter().sum();
        assert!(close(s, 0.3 * (1.5 + 6.0)), "{s}");
        // Warm-up W then linear over T − W = D steps: η (W − 1)/2 + η (D + 1)/2.
        let s: f64 = sched(ScheduleKind::Linear, 4, 10).rates().iter().sum();
        assert!(close(s, 0.3 * (1.5 + 3.5)), "{s}");
    }

    #[test]
    fn values_follow_the_trainer_lambdas() {
        let s = sched(ScheduleKind::Linear, 2, 6);
        let want = [0.0, 0.5, 1.0, 0.75, 0.5, 0.25];
        for (k, w) in want.iter().enumerate() {
            assert!(close(s.factor(k as u64), *w), "k={k}");
        }
        let c = sched(ScheduleKind::Cosine, 0, 4);
        assert!(close(c.factor(2), 0.5));
        assert!(close(c.factor(4), 0.0));
        assert_eq!(sched(ScheduleKind::Constant, 0, 3).rates(), vec![0.3; 3]);
    }
}
