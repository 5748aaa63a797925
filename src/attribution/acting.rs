//! Owns the "where curvature acts" diagnostic: `curvature_share`, `query_energy_share`, `Acting`.
//! Layer: attribution — may import every floor from the ground up to curvature and, in this folder,
//! curvature.rs.
//!
//! Source differs from a preconditioned gradient sum only in the eigen-directions e of a
//! segment where its mass has acted, s σ_e p_e > 1 (p_e = 1 without Adam; Adam's p_e is
//! diag(Qᵀ P Q)): there F_r(σ) = (1 − e^{−sσp})/σ is far from s and F_S far from 1; elsewhere
//! both are within a factor e⁻¹ of the short-segment limits u = s P v, v ← v. Two shares say
//! how much of a run that is:
//!
//! * the curvature mass share Σ_{e : sσ_e p_e > 1} σ_e / Σ_e σ_e (σ clamped at 0), over every
//!   tracked layer of the segment;
//! * the queries' gradient energy share Σ_q ‖Π_S v_q‖² / Σ_q ‖v_q‖², Π_S the projector onto
//!   those directions (Q 1[sσp > 1] Qᵀ).
//!
//! A converged segment (s → ∞) acts everywhere: both shares are 1.

use candle_core::{DType, Tensor};

use crate::error::Result;
use crate::linalg::{eigenbasis_diagonal, LayerFactors};
use crate::train::LrMass;

use super::curvature::Curvature;

/// Whether direction (σ, p) is one where a segment of mass `s` acts: s σ p > 1.
fn acts(s: LrMass, sigma: f64, p: f64) -> bool {
    match s {
        LrMass::Converged => true,
        LrMass::Finite(s) => s * sigma.max(0.0) * p > 1.0,
    }
}

/// (Σ_{e : sσ_e p_e > 1} σ_e, Σ_e σ_e) over `factors` (σ = Λ clamped at 0); `p`: Adam's p̄ per
/// layer [d_out, d_in], or None (p = 1). Sums, so that layers loaded one at a time add up.
pub fn curvature_mass(
    factors: &[LayerFactors],
    s: LrMass,
    p: Option<&[Tensor]>,
) -> Result<(f64, f64)> {
    let (mut acting, mut total) = (0f64, 0f64);
    for (l, f) in factors.iter().enumerate() {
        let lam: Vec<f64> = f.lambda.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
        let pq: Option<Vec<f64>> = p
            .map(|p| -> Result<Vec<f64>> {
                Ok(eigenbasis_diagonal(&f.basis, &p[l])?
                    .to_dtype(DType::F64)?
                    .flatten_all()?
                    .to_vec1()?)
            })
            .transpose()?;
        for (e, &sig) in lam.iter().enumerate() {
            let sig = sig.max(0.0);
            total += sig;
            if acts(s, sig, pq.as_ref().map_or(1.0, |p| p[e])) {
                acting += sig;
            }
        }
    }
    Ok((acting, total))
}

/// The share a / b of a pair of sums (0 when b = 0).
pub fn share((a, b): (f64, f64)) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        0.0
    }
}

/// [`curvature_mass`] as a share.
pub fn curvature_share(factors: &[LayerFactors], s: LrMass, p: Option<&[Tensor]>) -> Result<f64> {
    Ok(share(curvature_mass(factors, s, p)?))
}

/// The sentence every report carries: where Source differs from a preconditioned gradient
/// sum, from the per-segment shares (`query_energy_share`, `curvature_share`) in the score
/// tables' segment list; None when no segment has them.
pub fn acting_sentence(segments: &serde_json::Value) -> Option<String> {
    let best = segments
        .as_array()?
        .iter()
        .filter_map(|s| Some((s, s.get("query_energy_share")?.as_f64()?)))
        .max_by(|a, b| a.1.total_cmp(&b.1))?;
    let (seg, q) = best;
    let c = seg.get("curvature_share").and_then(|c| c.as_f64());
    Some(format!(
        "in this run Source differs from a preconditioned gradient sum in {:.1}% of the query's \
         energy (segment {} `{}`, where s·σ·p > 1{})",
        100.0 * q,
        seg["index"],
        seg["stage"].as_str().unwrap_or(""),
        c.map(|c| format!(" on {:.1}% of its curvature mass", 100.0 * c))
            .unwrap_or_default()
    ))
}

/// (Σ_q ‖Π_S v_q‖², Σ_q ‖v_q‖²) for the queries `v` (per layer [Q, d_out, d_in]) through
/// `curv`, Π_S = Q 1[sσp > 1] Qᵀ; `p` as in [`curvature_share`]. Sums, so that layer groups
/// add up; the share is their ratio.
pub fn query_energy(
    curv: &dyn Curvature,
    v: &[Tensor],
    s: LrMass,
    p: Option<&[Tensor]>,
) -> Result<(f64, f64)> {
    let ones: Vec<Tensor>;
    let p = match p {
        Some(p) => p,
        None => {
            ones = v
                .iter()
                .map(|vl| {
                    let d = vl.dims();
                    Tensor::ones(&d[d.len() - 2..], DType::F32, vl.device())
                })
                .collect::<candle_core::Result<_>>()?;
            &ones
        }
    };
    let proj = curv.apply_preconditioned(v, p, &|sig, pe| {
        if acts(s, sig, pe) {
            1.0
        } else {
            0.0
        }
    })?;
    let (mut num, mut den) = (0f64, 0f64);
    for (vl, pl) in v.iter().zip(&proj) {
        let vl = vl.to_dtype(DType::F64)?;
        num += (&vl * pl.to_dtype(DType::F64)?)?
            .sum_all()?
            .to_scalar::<f64>()?;
        den += vl.sqr()?.sum_all()?.to_scalar::<f64>()?;
    }
    Ok((num, den))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linalg::test_support::random_factors;
    use candle_core::Device;

    #[test]
    fn shares_are_zero_for_a_short_segment_one_when_converged_and_split_in_between() {
        let f = vec![random_factors("l", (5, 4, 3, 2), None)];
        let v = vec![Tensor::randn(0f32, 1.0, (2, 2, 3), &Device::Cpu).unwrap()];
        assert_eq!(
            curvature_share(&f, LrMass::Finite(1e-12), None).unwrap(),
            0.0
        );
        assert_eq!(curvature_share(&f, LrMass::Converged, None).unwrap(), 1.0);
        let (n, d) = query_energy(&f, &v, LrMass::Finite(1e-12), None).unwrap();
        assert!(n.abs() < 1e-9 * d, "{n} {d}");
        let (n, d) = query_energy(&f, &v, LrMass::Converged, None).unwrap();
        assert!((n / d - 1.0).abs() < 1e-5, "{n} {d}");
        // In between: the mass share is the Λ above 1/s over all Λ, by brute force.
        let lam: Vec<f64> = f[0]
            .lambda
            .to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let mut sorted = lam.clone();
        sorted.sort_by(f64::total_cmp);
        let s = 2.0 / (sorted[3] + sorted[4]);
        let want: f64 = lam.iter().filter(|l| s * **l > 1.0).sum::<f64>()
            / lam.iter().map(|l| l.max(0.0)).sum::<f64>();
        let got = curvature_share(&f, LrMass::Finite(s), None).unwrap();
        assert!(
            (got - want).abs() < 1e-12 && got > 0.0 && got < 1.0,
            "{got} {want}"
        );
        // p scales the mass: p = 2 everywhere is s doubled.
        let two = vec![Tensor::full(2f32, (2, 3), &Device::Cpu).unwrap()];
        let a = curvature_share(&f, LrMass::Finite(s), Some(&two)).unwrap();
        let b = curvature_share(&f, LrMass::Finite(2.0 * s), None).unwrap();
        assert!((a - b).abs() < 1e-9, "{a} {b}");
        let (n, d) = query_energy(&f, &v, LrMass::Finite(s), None).unwrap();
        assert!(n > 0.0 && n < d, "{n} {d}");
    }

    #[test]
    fn the_sentence_names_the_segment_where_curvature_acts_most() {
        let segs = serde_json::json!([
            {"index": 0, "stage": "pretrain", "query_energy_share": 0.9},
            {"index": 1, "stage": "finetune", "query_energy_share": 0.031,
             "curvature_share": 0.25},
        ]);
        let line = acting_sentence(&segs).unwrap();
        assert!(
            line.starts_with("in this run Source differs from a preconditioned gradient sum in 90.0% of the query's energy")
                && line.contains("segment 0 `pretrain`"),
            "{line}"
        );
        let segs = serde_json::json!([{"index": 1, "stage": "finetune",
            "query_energy_share": 0.031, "curvature_share": 0.25}]);
        assert!(acting_sentence(&segs).unwrap().contains("3.1% of the query's energy (segment 1 `finetune`, where s·σ·p > 1 on 25.0% of its curvature mass)"));
        assert_eq!(acting_sentence(&serde_json::json!([{"index": 0}])), None);
    }
}
