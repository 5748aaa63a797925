//! Owns a fine-tuning run's plan: `total_steps`, `plan_segments`, `SegmentPlan`, `VisitOrder`.
//! Layer: train — may import the ground, linalg, backend, model, data and hub; no sibling.
//!
//! The shape of a fine-tuning run, decided before the first step: T (total steps), which
//! documents each step visits (a seeded shuffle per epoch), and where segments end and
//! checkpoints are saved. Everything here is a pure function of the config and N, which is
//! what makes a resumed run visit exactly the documents an uninterrupted one would.

use crate::util::rng::SplitMix64;

/// One planned segment: steps (start, end] and the steps its checkpoints are saved at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentPlan {
    /// Global step the segment starts after (exclusive).
    pub start: u64,
    /// Global step the segment ends at (inclusive); K = end − start.
    pub end: u64,
    /// Steps of its checkpoints, increasing, the last equal to `end`.
    pub checkpoints: Vec<u64>,
}

/// Steps per epoch: ⌈N / batch_size⌉ (the last step of an epoch may be smaller).
pub fn steps_per_epoch(n_docs: usize, batch_size: usize) -> u64 {
    n_docs.div_ceil(batch_size.max(1)) as u64
}

/// T: `max_steps`, else epochs × steps per epoch.
pub fn total_steps(n_docs: usize, batch_size: usize, epochs: u32, max_steps: Option<u64>) -> u64 {
    max_steps.unwrap_or(epochs as u64 * steps_per_epoch(n_docs, batch_size))
}

/// Cuts T steps into segments (evenly into `segments`, or at the explicit interior
/// `boundaries`) and places `per_segment` checkpoints evenly in each, the last at its end:
/// segment (a, b] with K = b − a gets checkpoints a + ⌈jK/C⌉, j = 1 … C.
pub fn plan_segments(
    total: u64,
    segments: usize,
    boundaries: Option<&[u64]>,
    per_segment: usize,
) -> std::result::Result<Vec<SegmentPlan>, String> {
    let ends: Vec<u64> = match boundaries {
        Some(b) => {
            if let Some(&last) = b.last() {
                if last >= total {
                    return Err(format!(
                        "`train.segment_boundaries` ends at step {last}, but training has only \
                         T = {total} steps; boundaries must lie inside (0, {total})"
                    ));
                }
            }
            b.iter().copied().chain(std::iter::once(total)).collect()
        }
        None => {
            if (segments as u64) > total {
                return Err(format!(
                    "training has T = {total} steps, fewer than `train.segments` = {segments}; \
                     lower `segments` or train longer (`epochs`, `max_steps`)"
                ));
            }
            (1..=segments as u64)
                .map(|l| ((l as u128 * total as u128) / segments as u128) as u64)
                .collect()
        }
    };
    let mut out = Vec::with_capacity(ends.len());
    let mut start = 0;
    for (i, &end) in ends.iter().enumerate() {
        let k = end - start;
        if (per_segment as u64) > k {
            return Err(format!(
                "segment {i} has K = {k} steps, fewer than `train.checkpoints_per_segment` = \
                 {per_segment}; lower checkpoints_per_segment, use fewer segments, or train longer"
            ));
        }
        let c = per_segment as u64;
        let checkpoints = (1..=c).map(|j| start + (j * k).div_ceil(c)).collect();
        out.push(SegmentPlan {
            start,
            end,
            checkpoints,
        });
        start = end;
    }
    Ok(out)
}

/// Which documents each step visits: epoch e is a permutation of 0..N drawn from stream e
/// of the seed, cut into consecutive groups of `batch_size`.
#[derive(Debug, Clone)]
pub struct VisitOrder {
    seed: u64,
    n_docs: usize,
    batch_size: usize,
    cache: Option<(u64, Vec<usize>)>,
}

impl VisitOrder {
    /// The order for N documents and `batch_size` documents per step.
    pub fn new(seed: u64, n_docs: usize, batch_size: usize) -> Self {
        Self {
            seed,
            n_docs,
            batch_size: batch_size.max(1),
            cache: None,
        }
    }

    /// The document indices of step `step` (0-based).
    pub fn step_docs(&mut self, step: u64) -> Vec<usize> {
        let spe = steps_per_epoch(self.n_docs, self.batch_size);
        let (epoch, within) = (step / spe, (step % spe) as usize);
        if self.cache.as_ref().map(|c| c.0) != Some(epoch) {
            let perm = SplitMix64::stream(self.seed, epoch).permutation(self.n_docs);
            self.cache = Some((epoch, perm));
        }
        let perm = &self.cache.as_ref().expect("filled above").1;
        let lo = within * self.batch_size;
        let hi = (lo + self.batch_size).min(self.n_docs);
        perm[lo..hi].to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn even_segments_and_checkpoints() {
        let p = plan_segments(10, 3, None, 2).unwrap();
        let ends: Vec<u64> = p.iter().map(|s| s.end).collect();
        assert_eq!(ends, vec![3, 6, 10]);
        assert_eq!(p[0].checkpoints, vec![2, 3]);
        assert_eq!(p[1].checkpoints, vec![5, 6]);
        assert_eq!(p[2].checkpoints, vec![8, 10]);
        let p = plan_segments(12, 1, None, 3).unwrap();
        assert_eq!(p[0].checkpoints, vec![4, 8, 12]);
        for t in 1..40u64 {
            for l in 1..=t.min(5) as usize {
                let p = plan_segments(t, l, None, 1).unwrap();
                assert_eq!(p.len(), l);
                assert_eq!(p.last().unwrap().end, t);
                assert!(p
                    .iter()
                    .all(|s| s.end > s.start && s.checkpoints == vec![s.end]));
                assert!(p.windows(2).all(|w| w[0].end == w[1].start));
            }
        }
    }

    #[test]
    fn explicit_boundaries_and_errors() {
        let p = plan_segments(10, 0, Some(&[2, 7]), 1).unwrap();
        assert_eq!(
            p.iter().map(|s| (s.start, s.end)).collect::<Vec<_>>(),
            vec![(0, 2), (2, 7), (7, 10)]
        );
        assert!(plan_segments(10, 0, Some(&[10]), 1)
            .unwrap_err()
            .contains("inside (0, 10)"));
        assert!(plan_segments(2, 3, None, 1)
            .unwrap_err()
            .contains("fewer than `train.segments`"));
        assert!(plan_segments(4, 2, None, 3)
            .unwrap_err()
            .contains("checkpoints_per_segment"));
    }

    #[test]
    fn visit_order_covers_each_epoch_once() {
        let mut v = VisitOrder::new(3, 10, 4);
        assert_eq!(steps_per_epoch(10, 4), 3);
        for epoch in 0..3u64 {
            let mut seen: Vec<usize> = (0..3).flat_map(|s| v.step_docs(epoch * 3 + s)).collect();
            assert_eq!(v.step_docs(epoch * 3 + 2).len(), 2, "last step is partial");
            seen.sort();
            assert_eq!(seen, (0..10).collect::<Vec<_>>());
        }
        let mut w = VisitOrder::new(3, 10, 4);
        assert_eq!(
            w.step_docs(4),
            v.step_docs(4),
            "random access gives the same docs"
        );
        assert_ne!(v.step_docs(0), v.step_docs(3), "epochs are reshuffled");
    }
}
