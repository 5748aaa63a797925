//! Owns token-budget batching: `plan_batches`, `Batch`, `BatchOrder` and `plan_stats`.
//! Layer: data — may import the ground, linalg, backend and model; no sibling.
//!
//! Token-budget batching: documents grouped so that batch size × padded length stays under a
//! budget, deterministically.
//!
//! Greedy over a fixed order: a document joins the open batch unless the batch would then
//! exceed `max_batch_size` documents or `(size + 1) × max(padded length, its length)` tokens;
//! otherwise it opens the next batch. With [`BatchOrder::LengthSorted`] (longest first, ties
//! by position) similar lengths share batches and padding is small; with
//! [`BatchOrder::AsGiven`] the caller's order (e.g. a seeded shuffle for training) is kept.

/// The order documents are considered in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchOrder {
    /// Longest first; equal lengths keep their original order.
    LengthSorted,
    /// The order given.
    AsGiven,
}

/// One batch: document indices and the padded length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// Indices into the document list.
    pub docs: Vec<usize>,
    /// Longest document in the batch (what every row is padded to).
    pub padded_len: usize,
}

impl Batch {
    /// Padded tokens: documents × padded length.
    pub fn padded_tokens(&self) -> usize {
        self.docs.len() * self.padded_len
    }
}

/// Summary of a plan.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BatchPlanStats {
    /// Number of batches.
    pub batches: usize,
    /// Real tokens / padded tokens (1 = no padding).
    pub padding_efficiency: f64,
    /// Largest batch (documents).
    pub max_batch_docs: usize,
}

/// Plans batches over documents of lengths `lengths`. A document longer than `token_budget`
/// gets a batch of its own.
pub fn plan_batches(
    lengths: &[usize],
    token_budget: usize,
    max_batch_size: usize,
    order: BatchOrder,
) -> Vec<Batch> {
    let mut idx: Vec<usize> = (0..lengths.len()).collect();
    if order == BatchOrder::LengthSorted {
        // Stable sort: ties keep their original order, so the plan is deterministic.
        idx.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
    }
    let max_batch_size = max_batch_size.max(1);
    let mut batches: Vec<Batch> = Vec::new();
    let mut cur = Batch {
        docs: Vec::new(),
        padded_len: 0,
    };
    for i in idx {
        let len = lengths[i];
        let padded = cur.padded_len.max(len);
        let fits = cur.docs.len() < max_batch_size && (cur.docs.len() + 1) * padded <= token_budget;
        if !cur.docs.is_empty() && !fits {
            batches.push(std::mem::replace(
                &mut cur,
                Batch {
                    docs: Vec::new(),
                    padded_len: 0,
                },
            ));
        }
        cur.padded_len = cur.padded_len.max(len);
        cur.docs.push(i);
    }
    if !cur.docs.is_empty() {
        batches.push(cur);
    }
    batches
}

/// Statistics of a plan over `lengths`.
pub fn plan_stats(batches: &[Batch], lengths: &[usize]) -> BatchPlanStats {
    let real: usize = lengths.iter().sum();
    let padded: usize = batches.iter().map(Batch::padded_tokens).sum();
    BatchPlanStats {
        batches: batches.len(),
        padding_efficiency: if padded == 0 {
            1.0
        } else {
            real as f64 / padded as f64
        },
        max_batch_docs: batches.iter().map(|b| b.docs.len()).max().unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Brute-force properties every plan must have.
    fn check_plan(lengths: &[usize], budget: usize, max_bs: usize, order: BatchOrder) {
        let plan = plan_batches(lengths, budget, max_bs, order);
        let mut seen: Vec<usize> = plan.iter().flat_map(|b| b.docs.clone()).collect();
        seen.sort();
        assert_eq!(
            seen,
            (0..lengths.len()).collect::<Vec<_>>(),
            "every doc exactly once"
        );
        for b in &plan {
            assert!(!b.docs.is_empty());
            assert!(b.docs.len() <= max_bs);
            assert_eq!(
                b.padded_len,
                b.docs.iter().map(|&i| lengths[i]).max().unwrap()
            );
            assert!(
                b.padded_tokens() <= budget || b.docs.len() == 1,
                "budget kept"
            );
        }
        // Deterministic.
        assert_eq!(plan, plan_batches(lengths, budget, max_bs, order));
        if order == BatchOrder::AsGiven {
            assert_eq!(
                plan.iter().flat_map(|b| b.docs.clone()).collect::<Vec<_>>(),
                (0..lengths.len()).collect::<Vec<_>>(),
                "order kept"
            );
        }
    }

    #[test]
    fn plans_respect_budget_and_cover_all_docs() {
        // A fixed pseudo-random sequence (LCG) of lengths.
        let mut x: u64 = 12345;
        let lengths: Vec<usize> = (0..500)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                1 + (x >> 33) as usize % 300
            })
            .collect();
        for budget in [300, 512, 1000, 4096] {
            for max_bs in [1, 3, 64] {
                check_plan(&lengths, budget, max_bs, BatchOrder::LengthSorted);
                check_plan(&lengths, budget, max_bs, BatchOrder::AsGiven);
            }
        }
    }

    #[test]
    fn sorted_plan_is_exact_on_a_small_case() {
        let lengths = [5, 10, 3, 10, 7];
        let plan = plan_batches(&lengths, 20, 8, BatchOrder::LengthSorted);
        // Sorted: 1(10), 3(10), 4(7), 0(5), 2(3). Budget 20 → [1,3] (2×10), [4,0,2] (3×7=21 > 20?)
        assert_eq!(plan[0].docs, vec![1, 3]);
        assert_eq!(plan[1].docs, vec![4, 0]);
        assert_eq!(plan[2].docs, vec![2]);
        let s = plan_stats(&plan, &lengths);
        assert_eq!(s.batches, 3);
        assert!((s.padding_efficiency - 35.0 / (20.0 + 14.0 + 3.0)).abs() < 1e-12);
    }

    #[test]
    fn oversize_doc_gets_its_own_batch() {
        let plan = plan_batches(&[50, 4, 4], 16, 8, BatchOrder::AsGiven);
        assert_eq!(plan[0].docs, vec![0]);
        assert_eq!(plan[1].docs, vec![1, 2]);
    }
}
