//! The input precision of the CUDA kernels and the tolerance each is held to.
//! Layer: backend — may import only the ground floor.

use crate::error::{Error, Result};

/// Input precision of a kernel; accumulation is always f32 (and the eigendecomposition f64).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// f32 inputs, exact f32 products: the reference mode (parity ≤ 1e-5 relative).
    F32,
    /// f32 inputs rounded to TF32 (10-bit mantissa) before every product, the numerics of a
    /// TF32 tensor-core GEMM (parity ≤ 1e-2 relative: k-term sums of products with
    /// relative error ≤ 2⁻¹⁰ each).
    Tf32,
    /// bf16 inputs (a, δ; 7-bit mantissa) with f32 accumulation (parity ≤ 3e-2 relative,
    /// against the f32 reference on the unrounded inputs).
    Bf16,
}

impl Precision {
    /// Parses `"f32"`, `"tf32"` or `"bf16"`; `what` names the config key or flag in errors.
    pub fn parse(s: &str, what: &str) -> Result<Precision> {
        match s {
            "f32" => Ok(Precision::F32),
            "tf32" => Ok(Precision::Tf32),
            "bf16" => Ok(Precision::Bf16),
            other => Err(Error::Cuda(format!(
                "{what} = {other:?}: the precision must be \"f32\", \"tf32\" or \"bf16\""
            ))),
        }
    }

    /// The relative-error tolerance the parity tests hold this precision to, against the
    /// f64 CPU reference on the original f32 inputs.
    pub fn tolerance(self) -> f64 {
        match self {
            Precision::F32 => 1e-5,
            Precision::Tf32 => 1e-2,
            Precision::Bf16 => 3e-2,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precision_parses_and_names_the_key() {
        assert_eq!(Precision::parse("tf32", "k").unwrap(), Precision::Tf32);
        let e = Precision::parse("fp16", "[run] precision")
            .unwrap_err()
            .to_string();
        assert!(e.contains("[run] precision") && e.contains("\"fp16\"") && e.contains("bf16"));
    }
}
