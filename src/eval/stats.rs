//! Owns Spearman's ρ, bootstrap intervals, recall@k and reciprocal rank.
//! Layer: eval — may import ground, model, data, hub, train, curvature, attribution; no sibling.
//!
//! The statistics of the evaluation: Spearman's rank correlation ρ (average ranks for
//! ties), percentile bootstrap intervals, and recall@k and reciprocal rank of known sources.

use crate::util::rng::SplitMix64;

/// 1-based ranks of `x` in ascending order, ties sharing their average rank (the ranks
/// Spearman's ρ correlates).
pub fn average_ranks(x: &[f64]) -> Vec<f64> {
    let mut idx: Vec<usize> = (0..x.len()).collect();
    idx.sort_by(|&a, &b| x[a].total_cmp(&x[b]));
    let mut ranks = vec![0.0; x.len()];
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && x[idx[j + 1]] == x[idx[i]] {
            j += 1;
        }
        // positions i..=j (0-based) share the mean of ranks i+1 ..= j+1
        let r = (i + j) as f64 / 2.0 + 1.0;
        for &k in &idx[i..=j] {
            ranks[k] = r;
        }
        i = j + 1;
    }
    ranks
}

/// Pearson's correlation r of `x` and `y`; `None` when either is constant or they have
/// fewer than 2 points (r is undefined).
pub fn pearson(x: &[f64], y: &[f64]) -> Option<f64> {
    assert_eq!(x.len(), y.len(), "pearson: lengths differ");
    let n = x.len();
    if n < 2 {
        return None;
    }
    let mx = x.iter().sum::<f64>() / n as f64;
    let my = y.iter().sum::<f64>() / n as f64;
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (a, b) in x.iter().zip(y) {
        let (dx, dy) = (a - mx, b - my);
        sxy += dx * dy;
        sxx += dx * dx;
        syy += dy * dy;
    }
    if sxx <= 0.0 || syy <= 0.0 {
        return None;
    }
    Some((sxy / (sxx.sqrt() * syy.sqrt())).clamp(-1.0, 1.0))
}

/// Spearman's ρ: Pearson's r of the average ranks. `None` when undefined (a constant input).
pub fn spearman(x: &[f64], y: &[f64]) -> Option<f64> {
    pearson(&average_ranks(x), &average_ranks(y))
}

/// The q-quantile (0 ≤ q ≤ 1) of `sorted` by linear interpolation between order statistics
/// (Hyndman & Fan type 7, numpy's default).
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    assert!(!sorted.is_empty(), "quantile of nothing");
    let h = (sorted.len() - 1) as f64 * q.clamp(0.0, 1.0);
    let (lo, hi) = (h.floor() as usize, h.ceil() as usize);
    sorted[lo] + (h - lo as f64) * (sorted[hi] - sorted[lo])
}

/// The mean over series of Spearman's ρ between `predicted[i]` and `measured[i]` restricted
/// to the points `pick` (indices, repeats allowed). Series where ρ is undefined are left out;
/// `None` when all are.
pub fn mean_spearman(predicted: &[Vec<f64>], measured: &[Vec<f64>], pick: &[usize]) -> Option<f64> {
    let mut sum = 0.0;
    let mut n = 0usize;
    for (p, m) in predicted.iter().zip(measured) {
        let ps: Vec<f64> = pick.iter().map(|&j| p[j]).collect();
        let ms: Vec<f64> = pick.iter().map(|&j| m[j]).collect();
        if let Some(r) = spearman(&ps, &ms) {
            sum += r;
            n += 1;
        }
    }
    (n > 0).then(|| sum / n as f64)
}

/// Percentile bootstrap 95% interval of [`mean_spearman`]: `resamples` times, draw as many
/// points as there are (with replacement, seeded), and take the 2.5% and 97.5% quantiles of
/// the statistic. `None` when the statistic is undefined on every resample.
pub fn bootstrap_ci95(
    predicted: &[Vec<f64>],
    measured: &[Vec<f64>],
    resamples: usize,
    seed: u64,
) -> Option<[f64; 2]> {
    let n = predicted.first().map_or(0, Vec::len);
    bootstrap_ci95_of(n, resamples, seed, |pick| {
        mean_spearman(predicted, measured, pick)
    })
}

/// Paired percentile bootstrap 95% interval of the difference of two predictors' LDS,
/// ρ̄(a) − ρ̄(b) with ρ̄ = [`mean_spearman`], over the same measurements: each resample
/// draws one set of points and scores both on it, so what they share (which points happen
/// to be drawn) cancels and the interval is that of the difference itself, narrower than
/// two separate intervals suggest. `None` when the difference is undefined on every
/// resample.
pub fn bootstrap_difference_ci95(
    predicted_a: &[Vec<f64>],
    predicted_b: &[Vec<f64>],
    measured: &[Vec<f64>],
    resamples: usize,
    seed: u64,
) -> Option<[f64; 2]> {
    let n = measured.first().map_or(0, Vec::len);
    bootstrap_ci95_of(n, resamples, seed, |pick| {
        Some(
            mean_spearman(predicted_a, measured, pick)?
                - mean_spearman(predicted_b, measured, pick)?,
        )
    })
}

/// The 2.5% and 97.5% quantiles of `stat` over `resamples` seeded draws (with replacement)
/// of `n` point indices; draws where `stat` is undefined are left out.
fn bootstrap_ci95_of(
    n: usize,
    resamples: usize,
    seed: u64,
    stat: impl Fn(&[usize]) -> Option<f64>,
) -> Option<[f64; 2]> {
    if n == 0 {
        return None;
    }
    let mut rng = SplitMix64::stream(seed, 0xB007);
    let mut stats = Vec::with_capacity(resamples);
    for _ in 0..resamples {
        let pick: Vec<usize> = (0..n).map(|_| rng.below(n as u64) as usize).collect();
        if let Some(s) = stat(&pick) {
            stats.push(s);
        }
    }
    if stats.is_empty() {
        return None;
    }
    stats.sort_by(f64::total_cmp);
    Some([quantile(&stats, 0.025), quantile(&stats, 0.975)])
}

/// The rank (1 = top) of each document in `sources` among all documents ordered by `tau`
/// descending: 1 + the number of documents scored strictly higher + the number of other,
/// non-source documents scored exactly the same (a tie with a non-source counts against
/// the source, so a method that scores everything alike finds nothing).
pub fn source_ranks(tau: &[f64], sources: &[usize]) -> Vec<u32> {
    sources
        .iter()
        .map(|&s| {
            let t = tau[s];
            let above = tau
                .iter()
                .enumerate()
                .filter(|&(i, &x)| i != s && (x > t || (x == t && !sources.contains(&i))))
                .count();
            above as u32 + 1
        })
        .collect()
}

/// recall@k = |known sources in the top k| / min(k, |known sources|): 1 when the top k is
/// as full of sources as it can be. Sources tied exactly with each other share a rank
/// ([`source_ranks`]), so more than k of them can have rank ≤ k; the top k holds k at most.
pub fn recall_at(ranks: &[u32], k: usize) -> f64 {
    if ranks.is_empty() {
        return 0.0;
    }
    let hits = ranks.iter().filter(|&&r| r as usize <= k).count().min(k);
    hits as f64 / k.min(ranks.len()) as f64
}

/// The reciprocal rank 1 / (rank of the best-ranked known source); 0 without sources.
pub fn reciprocal_rank(ranks: &[u32]) -> f64 {
    ranks.iter().min().map_or(0.0, |&r| 1.0 / r as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recall_never_counts_more_than_k_sources_when_sources_tie_each_other() {
        // Three sources tied at the top, one other document below them.
        let tau = [5.0, 5.0, 5.0, 1.0];
        let ranks = source_ranks(&tau, &[0, 1, 2]);
        assert_eq!(ranks, vec![1, 1, 1]);
        assert_eq!(recall_at(&ranks, 1), 1.0);
        assert_eq!(recall_at(&ranks, 2), 1.0);
        assert_eq!(recall_at(&ranks, 3), 1.0);
        // A tie with a non-source still counts against the sources.
        let ranks = source_ranks(&[5.0, 5.0, 5.0], &[0]);
        assert_eq!(recall_at(&ranks, 1), 0.0);
    }

    #[test]
    fn average_ranks_share_ties() {
        assert_eq!(
            average_ranks(&[10.0, 30.0, 20.0, 20.0]),
            vec![1.0, 4.0, 2.5, 2.5]
        );
        assert_eq!(average_ranks(&[5.0, 5.0, 5.0]), vec![2.0, 2.0, 2.0]);
    }

    #[test]
    fn spearman_matches_hand_computed_values() {
        // Monotone but non-linear: ρ = 1 while Pearson's r < 1.
        let x = [1.0, 2.0, 3.0, 4.0, 5.0];
        let y = [1.0, 4.0, 9.0, 16.0, 100.0];
        assert!((spearman(&x, &y).unwrap() - 1.0).abs() < 1e-15);
        assert!(pearson(&x, &y).unwrap() < 0.95);
        // Reversed: −1.
        let rev: Vec<f64> = y.iter().rev().copied().collect();
        assert!((spearman(&x, &rev).unwrap() + 1.0).abs() < 1e-15);
        // One swap among 5 distinct values: ρ = 1 − 6 Σd² / (n(n² − 1)) = 1 − 6·2/120 = 0.9.
        let y = [2.0, 1.0, 3.0, 4.0, 5.0];
        assert!((spearman(&x, &y).unwrap() - 0.9).abs() < 1e-12);
        // With ties: x ranks [1, 2.5, 2.5, 4], y ranks [1, 2, 3, 4]:
        // Pearson of those = 4.5 / sqrt(4.5 · 5) = 0.948683298…
        let r = spearman(&[1.0, 2.0, 2.0, 3.0], &[1.0, 2.0, 3.0, 4.0]).unwrap();
        assert!((r - 4.5 / (4.5f64 * 5.0).sqrt()).abs() < 1e-12, "{r}");
        // Undefined for a constant series.
        assert_eq!(spearman(&[1.0, 1.0, 1.0], &[1.0, 2.0, 3.0]), None);
    }

    #[test]
    fn quantile_interpolates_like_numpy() {
        let s = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(quantile(&s, 0.0), 1.0);
        assert_eq!(quantile(&s, 1.0), 4.0);
        assert!((quantile(&s, 0.5) - 2.5).abs() < 1e-15);
        // numpy.quantile([1, 2, 3, 4], 0.025) = 1.075
        assert!((quantile(&s, 0.025) - 1.075).abs() < 1e-12);
    }

    #[test]
    fn bootstrap_interval_brackets_the_statistic_and_collapses_when_exact() {
        // Predictions equal to the measurements: every resample gives ρ = 1 (or is
        // undefined when it drew one point only), so the interval is [1, 1].
        let m: Vec<Vec<f64>> = vec![(0..20).map(|i| (i * i) as f64).collect()];
        let ci = bootstrap_ci95(&m, &m, 200, 1).unwrap();
        assert!(ci.iter().all(|c| (c - 1.0).abs() < 1e-12), "{ci:?}");
        // A noisy relation: the interval contains the point estimate and is seeded.
        let p: Vec<Vec<f64>> = vec![(0..30).map(|i| i as f64).collect()];
        let y: Vec<Vec<f64>> = vec![(0..30)
            .map(|i| i as f64 + 8.0 * ((i * 7919 % 13) as f64 - 6.0))
            .collect()];
        let all: Vec<usize> = (0..30).collect();
        let rho = mean_spearman(&p, &y, &all).unwrap();
        let ci = bootstrap_ci95(&p, &y, 500, 3).unwrap();
        assert!(ci[0] < rho && rho < ci[1], "{ci:?} vs {rho}");
        assert!(ci[1] - ci[0] > 0.05, "{ci:?}");
        assert_eq!(ci, bootstrap_ci95(&p, &y, 500, 3).unwrap());
    }

    #[test]
    fn paired_difference_interval_cancels_what_the_predictors_share() {
        // Measured: a noisy trend. Predictor a is the trend itself, b the trend plus more
        // noise; their difference is positive on the full set.
        let x: Vec<f64> = (0..60).map(|i| i as f64).collect();
        let noise = |i: usize, k: usize| ((i * k) % 17) as f64 - 8.0;
        let y: Vec<Vec<f64>> = vec![(0..60).map(|i| x[i] + 3.0 * noise(i, 7919)).collect()];
        let a: Vec<Vec<f64>> = vec![x.clone()];
        let b: Vec<Vec<f64>> = vec![(0..60).map(|i| x[i] + 20.0 * noise(i, 104_729)).collect()];
        let all: Vec<usize> = (0..60).collect();
        let d = mean_spearman(&a, &y, &all).unwrap() - mean_spearman(&b, &y, &all).unwrap();
        assert!(d > 0.0, "{d}");
        let ci = bootstrap_difference_ci95(&a, &b, &y, 500, 5).unwrap();
        assert!(ci[0] < d && d < ci[1], "{ci:?} vs {d}");
        // The same predictor twice: every resample's difference is exactly 0.
        assert_eq!(
            bootstrap_difference_ci95(&a, &a, &y, 200, 5),
            Some([0.0, 0.0])
        );
        // Paired is narrower than the spread of the two separate intervals: the draw's
        // luck moves both LDS together.
        let (ca, cb) = (
            bootstrap_ci95(&a, &y, 500, 5).unwrap(),
            bootstrap_ci95(&b, &y, 500, 5).unwrap(),
        );
        assert!(
            ci[1] - ci[0] < (ca[1] - ca[0]) + (cb[1] - cb[0]),
            "{ci:?} {ca:?} {cb:?}"
        );
        assert_eq!(bootstrap_difference_ci95(&a, &b, &[], 10, 5), None);
    }

    #[test]
    fn recall_and_reciprocal_rank_by_hand() {
        // Scores of 6 documents; sources are documents 1 and 4.
        let tau = [0.5, 0.9, 0.1, 0.7, 0.3, -1.0];
        // Order: 1 (0.9), 3 (0.7), 0 (0.5), 4 (0.3), 2, 5 → ranks 1 and 4.
        let ranks = source_ranks(&tau, &[1, 4]);
        assert_eq!(ranks, vec![1, 4]);
        assert_eq!(recall_at(&ranks, 1), 1.0);
        assert_eq!(recall_at(&ranks, 2), 0.5);
        assert_eq!(recall_at(&ranks, 4), 1.0);
        assert_eq!(recall_at(&ranks, 10), 1.0);
        assert_eq!(reciprocal_rank(&ranks), 1.0);
        assert_eq!(reciprocal_rank(&source_ranks(&tau, &[4])), 0.25);
        // Ties with non-sources count against the source; ties among sources do not.
        let flat = [0.0; 5];
        assert_eq!(source_ranks(&flat, &[2]), vec![5]);
        assert_eq!(source_ranks(&flat, &[0, 2]), vec![4, 4]);
        assert_eq!(recall_at(&[], 1), 0.0);
    }
}
