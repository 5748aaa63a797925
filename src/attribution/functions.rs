//! Scalar functions of a curvature eigenvalue σ that Source and the influence function apply
//! through the EK-FAC eigenbasis (docs/design.md §2). Evaluated in f64.

/// A function F(σ) applied to every eigenvalue of H̄.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SpectralFn {
    /// Propagation through a segment: F_S(σ) = exp(−s σ), σ clamped to ≥ 0.
    Propagate {
        /// Learning-rate mass s of the segment.
        s: f64,
    },
    /// Injection within a segment: F_r(σ) = (1 − exp(−s σ)) / σ, F_r(0) = s, σ clamped to ≥ 0.
    Inject {
        /// Learning-rate mass s of the segment.
        s: f64,
    },
    /// The damped inverse of the influence function: 1 / (σ + λ) (σ used as it is).
    Inverse {
        /// Damping λ.
        damping: f64,
    },
    /// F(σ) = 1: the gradient dot product.
    Identity,
}

impl SpectralFn {
    /// F(σ).
    pub fn eval(&self, sigma: f64) -> f64 {
        match *self {
            SpectralFn::Propagate { s } => (-s * sigma.max(0.0)).exp(),
            SpectralFn::Inject { s } => inject(s, sigma),
            SpectralFn::Inverse { damping } => 1.0 / (sigma + damping),
            SpectralFn::Identity => 1.0,
        }
    }
}

/// F_r(σ) = s · (−expm1(−x) / x) with x = s σ; σ < 0 is clamped to 0, where F_r = s.
pub fn inject(s: f64, sigma: f64) -> f64 {
    let x = s * sigma.max(0.0);
    if x < 1e-10 {
        // −expm1(−x)/x = 1 − x/2 + O(x²)
        s * (1.0 - 0.5 * x)
    } else {
        s * (-(-x).exp_m1() / x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn injection_limits() {
        // F_r(0) = s; small sσ: ≈ s; large sσ: → 1/σ; negative σ clamps to 0.
        assert_eq!(inject(2.0, 0.0), 2.0);
        assert!((inject(2.0, 1e-14) - 2.0).abs() < 1e-12);
        assert_eq!(inject(2.0, -1.0), 2.0);
        assert!((inject(1e6, 0.5) - 2.0).abs() < 1e-12);
        // The closed form at a moderate point.
        let (s, sig) = (0.7, 1.3);
        assert!((inject(s, sig) - (1.0 - (-s * sig).exp()) / sig).abs() < 1e-15);
        // Continuity across the series / closed-form switch.
        let a = inject(1.0, 0.999e-10);
        let b = inject(1.0, 1.001e-10);
        assert!((a - b).abs() < 2e-13, "{a} {b}"); // the true change over this interval is 1e-13
    }

    #[test]
    fn propagation_and_inverse() {
        assert_eq!(SpectralFn::Propagate { s: 3.0 }.eval(0.0), 1.0);
        assert!((SpectralFn::Propagate { s: 3.0 }.eval(0.5) - (-1.5f64).exp()).abs() < 1e-15);
        assert_eq!(SpectralFn::Propagate { s: 3.0 }.eval(-1.0), 1.0);
        assert_eq!(SpectralFn::Inverse { damping: 0.5 }.eval(1.5), 0.5);
        assert_eq!(SpectralFn::Identity.eval(7.0), 1.0);
        // F_r = (1 − F_S) / σ.
        let (s, sig) = (2.0, 0.3);
        let fs = SpectralFn::Propagate { s }.eval(sig);
        assert!((SpectralFn::Inject { s }.eval(sig) - (1.0 - fs) / sig).abs() < 1e-14);
    }
}
