//! Owns `Ranked` (the order of a query's rows: τ descending, then document index) and
//! `TopBottom`, which keeps the first and last rows of that order in bounded heaps.
//! Layer: ground — may import error, util and config; no sibling.

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;

/// One document of a query's ranking: its τ and its index `j` among the scored documents.
/// Ordered as the ranking reads: `a < b` when `a` ranks before `b` (higher τ, or equal τ and
/// a smaller index; τ compared by `total_cmp`, so the order is total).
#[derive(Debug, Clone, Copy)]
pub struct Ranked {
    /// τ = score / n_train.
    pub tau: f64,
    /// The document's index.
    pub j: usize,
}

impl Ord for Ranked {
    fn cmp(&self, other: &Self) -> Ordering {
        other.tau.total_cmp(&self.tau).then(self.j.cmp(&other.j))
    }
}

impl PartialOrd for Ranked {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Ranked {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Ranked {}

/// The `top` first and `bottom` last rows of one query's ranking, seen one at a time:
/// memory O(top + bottom) whatever the number of documents.
pub struct TopBottom {
    top_n: usize,
    bottom_n: usize,
    /// The best `top_n` so far; its maximum is the worst of them.
    top: BinaryHeap<Ranked>,
    /// The worst `bottom_n` so far; its minimum (by `Reverse`) is the best of them.
    bottom: BinaryHeap<Reverse<Ranked>>,
    seen: usize,
}

impl TopBottom {
    /// Keeps the first `top` and the last `bottom` rows.
    pub fn new(top: usize, bottom: usize) -> TopBottom {
        TopBottom {
            top_n: top,
            bottom_n: bottom,
            top: BinaryHeap::with_capacity(top + 1),
            bottom: BinaryHeap::with_capacity(bottom + 1),
            seen: 0,
        }
    }

    /// Sees one row.
    pub fn push(&mut self, r: Ranked) {
        self.seen += 1;
        if self.top_n > 0 {
            if self.top.len() < self.top_n {
                self.top.push(r);
            } else if r < *self.top.peek().expect("full") {
                self.top.pop();
                self.top.push(r);
            }
        }
        if self.bottom_n > 0 {
            if self.bottom.len() < self.bottom_n {
                self.bottom.push(Reverse(r));
            } else if r > self.bottom.peek().expect("full").0 {
                self.bottom.pop();
                self.bottom.push(Reverse(r));
            }
        }
    }

    /// The rows seen.
    pub fn seen(&self) -> usize {
        self.seen
    }

    /// The first rows in ranking order (ranks 1, 2, …) and the last rows in ranking order
    /// (ranks seen − len + 1, …, seen). They overlap when fewer than top + bottom rows were seen.
    pub fn finish(self) -> (Vec<Ranked>, Vec<Ranked>) {
        let top = self.top.into_sorted_vec();
        let mut bottom: Vec<Ranked> = self.bottom.into_iter().map(|r| r.0).collect();
        bottom.sort();
        (top, bottom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against a full sort, with ties and NaN-free τ drawn from a few values.
    #[test]
    fn keeps_the_ends_of_the_full_sort() {
        let mut state = 7u64;
        for n in [0usize, 1, 5, 40] {
            let rows: Vec<Ranked> = (0..n)
                .map(|j| {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    Ranked {
                        tau: ((state >> 33) % 5) as f64 - 2.0,
                        j,
                    }
                })
                .collect();
            let mut sorted = rows.clone();
            sorted.sort();
            for (t, b) in [(0, 0), (3, 2), (1, 0), (0, 4), (50, 50)] {
                let mut k = TopBottom::new(t, b);
                for r in &rows {
                    k.push(*r);
                }
                assert_eq!(k.seen(), n);
                let (top, bottom) = k.finish();
                let idx = |v: &[Ranked]| v.iter().map(|r| r.j).collect::<Vec<_>>();
                assert_eq!(idx(&top), idx(&sorted[..t.min(n)]), "top {t} of {n}");
                assert_eq!(
                    idx(&bottom),
                    idx(&sorted[n - b.min(n)..]),
                    "bottom {b} of {n}"
                );
            }
        }
    }
}
