//! Owns the LDS: subset draws, predicted losses, Spearman per query with a bootstrap CI.
//! Layer: eval — may import ground, model, data, hub, train, curvature, attribution;
//! sibling `stats`.
//!
//! The linear datamodeling score (LDS; Park et al. 2023, as Bae et al. 2024 use it): draw
//! M random subsets S_j of fraction α of the fine-tuning set, retrain on each, and correlate
//! (Spearman's ρ, per query, across subsets) the losses a method predicts with the losses
//! measured. With docs/design.md §2's orientation (τ(q, m) ≈ f(without m) − f(with m)) the
//! predicted loss of the model trained on S is, up to a constant that ρ ignores,
//! g_S(q) = −Σ_{m ∈ S} τ(q, m).

use crate::util::rng::SplitMix64;

use super::stats::{bootstrap_ci95, mean_spearman, spearman};

/// |S|: round(α N), kept within 1 ..= N − 1 so that every subset leaves something out.
pub fn subset_size(n: usize, alpha: f64) -> usize {
    ((alpha * n as f64).round() as usize).clamp(1, n.saturating_sub(1).max(1))
}

/// Subset S_j (sorted document indices) of N documents: the first |S| entries of a seeded
/// random permutation, one independent stream per j. Depends only on (N, α, seed, j), so
/// raising M keeps the subsets already drawn.
pub fn draw_subset(n: usize, alpha: f64, seed: u64, j: usize) -> Vec<usize> {
    let mut rng = SplitMix64::stream(seed ^ 0x4C44_535F_5355_4253, j as u64);
    let mut s: Vec<usize> = rng.permutation(n)[..subset_size(n, alpha)].to_vec();
    s.sort_unstable();
    s
}

/// Predicted losses g_{S_j}(q) = −Σ_{m ∈ S_j} τ(q, m) for every query (rows of `tau`,
/// `[Q][N]`) and subset: `[Q][M]`.
pub fn predicted_losses(tau: &[Vec<f64>], subsets: &[Vec<usize>]) -> Vec<Vec<f64>> {
    tau.iter()
        .map(|row| {
            subsets
                .iter()
                .map(|s| -s.iter().map(|&m| row[m]).sum::<f64>())
                .collect()
        })
        .collect()
}

/// The LDS of one method.
#[derive(Debug, Clone, PartialEq)]
pub struct Lds {
    /// Mean over queries of ρ (queries where ρ is undefined left out); `None` if all are.
    pub lds: Option<f64>,
    /// Percentile-bootstrap 95% interval over resampled subsets.
    pub ci95: Option<[f64; 2]>,
    /// ρ per query (`None`: undefined, e.g. a constant measured loss).
    pub per_query: Vec<Option<f64>>,
}

/// The LDS from predicted and measured (seed-averaged) losses, both `[Q][M]`.
pub fn lds(predicted: &[Vec<f64>], measured: &[Vec<f64>], bootstrap: usize, seed: u64) -> Lds {
    let m = predicted.first().map_or(0, Vec::len);
    let all: Vec<usize> = (0..m).collect();
    Lds {
        lds: mean_spearman(predicted, measured, &all),
        ci95: bootstrap_ci95(predicted, measured, bootstrap, seed),
        per_query: predicted
            .iter()
            .zip(measured)
            .map(|(p, y)| spearman(p, y))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subsets_have_the_right_size_are_seeded_and_differ() {
        assert_eq!(subset_size(304, 0.5), 152);
        assert_eq!(subset_size(3, 0.01), 1);
        assert_eq!(subset_size(3, 0.99), 2);
        let a = draw_subset(100, 0.3, 7, 0);
        assert_eq!(a.len(), 30);
        assert!(a.windows(2).all(|w| w[0] < w[1]) && *a.last().unwrap() < 100);
        assert_eq!(a, draw_subset(100, 0.3, 7, 0));
        assert_ne!(a, draw_subset(100, 0.3, 7, 1));
        assert_ne!(a, draw_subset(100, 0.3, 8, 0));
    }

    /// A problem where the linear datamodel is exact: the measured loss of a subset is
    /// c_q − Σ_{m ∈ S} w(q, m). With τ = w the LDS is 1; with τ = −w it is −1; with τ
    /// unrelated to w it is near 0.
    #[test]
    fn an_exact_linear_datamodel_gives_lds_one() {
        let (q, n, m) = (3, 40, 48);
        let mut rng = SplitMix64::new(5);
        let w: Vec<Vec<f64>> = (0..q)
            .map(|_| (0..n).map(|_| rng.next_f64() - 0.3).collect())
            .collect();
        let subsets: Vec<Vec<usize>> = (0..m).map(|j| draw_subset(n, 0.5, 11, j)).collect();
        let measured: Vec<Vec<f64>> = predicted_losses(&w, &subsets)
            .into_iter()
            .enumerate()
            .map(|(qi, row)| row.into_iter().map(|g| 2.0 + qi as f64 + g).collect())
            .collect();
        let exact = lds(&predicted_losses(&w, &subsets), &measured, 200, 1);
        assert!((exact.lds.unwrap() - 1.0).abs() < 1e-12, "{exact:?}");
        let ci = exact.ci95.unwrap();
        assert!((ci[0] - 1.0).abs() < 1e-12 && (ci[1] - 1.0).abs() < 1e-12);
        assert!(exact
            .per_query
            .iter()
            .all(|r| (r.unwrap() - 1.0).abs() < 1e-12));

        let neg: Vec<Vec<f64>> = w.iter().map(|r| r.iter().map(|x| -x).collect()).collect();
        let flipped = lds(&predicted_losses(&neg, &subsets), &measured, 200, 1);
        assert!((flipped.lds.unwrap() + 1.0).abs() < 1e-12);

        let noise: Vec<Vec<f64>> = (0..q)
            .map(|_| (0..n).map(|_| rng.next_f64()).collect())
            .collect();
        let unrelated = lds(&predicted_losses(&noise, &subsets), &measured, 200, 1);
        assert!(unrelated.lds.unwrap().abs() < 0.35, "{unrelated:?}");
        let ci = unrelated.ci95.unwrap();
        assert!(ci[0] < unrelated.lds.unwrap() && unrelated.lds.unwrap() < ci[1]);
    }

    #[test]
    fn undefined_queries_are_left_out_of_the_mean() {
        let predicted = vec![vec![1.0, 2.0, 3.0], vec![1.0, 2.0, 3.0]];
        let measured = vec![vec![1.0, 2.0, 3.0], vec![5.0, 5.0, 5.0]];
        let r = lds(&predicted, &measured, 50, 0);
        assert_eq!(r.per_query[1], None);
        assert!((r.lds.unwrap() - 1.0).abs() < 1e-12);
    }
}
