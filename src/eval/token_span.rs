//! Owns token-span recall: whether a known source's highest-scored tokens lie on its fact span.
//! Layer: eval — may import ground, model, data, hub, train, curvature, attribution; sibling
//! `stats` (the ranks and recall@k of known sources).
//!
//! For a query q and one of its known source documents m with per-token scores s_t
//! (t = 0 … n − 1, `token_scores.parquet`) and fact span S (the tokens whose character range
//! overlaps a span of m's text that states the fact), the tokens are ranked by s_t
//! descending, a tie with a token outside S counting against the span token (as document
//! recall counts ties), and
//!
//!   token-span recall@k = |S ∩ top-k tokens| / min(k, |S|),
//!
//! the definition of document recall@k with the document's tokens as candidates and S as
//! the relevant set: 1 when the k best tokens are as full of span tokens as they can be; at
//! k = 1, whether the single highest-scored token lies on the span. A uniformly random
//! ranking has expectation min(k, n) |S| / n / min(k, |S|) (hypergeometric mean), the
//! chance level reported beside it.

use super::stats::source_ranks;

/// The tokens whose character range (`ranges`, from
/// [`crate::data::token_char_ranges`]; None for a special token) overlaps one of `spans`
/// (character `[start, end)`), ascending. An empty range overlaps nothing.
pub fn span_tokens(ranges: &[Option<(usize, usize)>], spans: &[(usize, usize)]) -> Vec<usize> {
    ranges
        .iter()
        .enumerate()
        .filter_map(|(t, r)| {
            let (a, b) = (*r)?;
            (a < b && spans.iter().any(|&(s, e)| a < e && s < b)).then_some(t)
        })
        .collect()
}

/// token-span recall@k of per-token scores `scores` with span tokens `span` (distinct
/// indices into `scores`); 0 when `span` is empty. Span tokens tied with each other take
/// consecutive places after the tokens off the span that tie with them (so at most k of them
/// are in the top k).
pub fn token_span_recall(scores: &[f64], span: &[usize], k: usize) -> f64 {
    if span.is_empty() {
        return 0.0;
    }
    // Rank of each span token's tie group (ties with tokens off the span counted against),
    // then places r, r + 1, … within a group.
    let mut ranks = source_ranks(scores, span);
    ranks.sort_unstable();
    let mut hits = 0usize;
    let mut place = 0u32;
    for (i, &r) in ranks.iter().enumerate() {
        place = if i > 0 && r == ranks[i - 1] {
            place + 1
        } else {
            r
        };
        if place as usize <= k {
            hits += 1;
        }
    }
    hits as f64 / k.min(span.len()) as f64
}

/// The rank (1 = highest score) of the best-ranked span token, ties counting against it;
/// None when `span` is empty.
pub fn best_span_rank(scores: &[f64], span: &[usize]) -> Option<u32> {
    source_ranks(scores, span).into_iter().min()
}

/// The expected token-span recall@k of a uniformly random ranking of `n` tokens of which
/// `s` are span tokens: min(k, n) s / n / min(k, s); 0 when `s` or `n` is 0.
pub fn chance_recall(n: usize, s: usize, k: usize) -> f64 {
    if n == 0 || s == 0 {
        return 0.0;
    }
    k.min(n) as f64 * s as f64 / n as f64 / k.min(s) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// recall@k by brute force: sort token indices by score descending, non-span tokens
    /// first among equal scores, take k, count span tokens.
    fn brute(scores: &[f64], span: &[usize], k: usize) -> f64 {
        let mut order: Vec<usize> = (0..scores.len()).collect();
        order.sort_by(|&a, &b| {
            scores[b]
                .total_cmp(&scores[a])
                .then(span.contains(&a).cmp(&span.contains(&b)))
        });
        let hits = order.iter().take(k).filter(|t| span.contains(t)).count();
        hits as f64 / k.min(span.len()) as f64
    }

    #[test]
    fn a_hand_made_document_gives_the_known_answer() {
        // "The river Navo flows into Lake Thekal." cut as tokens with character ranges; the
        // fact span is "Lake Thekal" = characters [26, 37).
        let ranges = [
            None,           // <s>
            Some((0, 3)),   // The
            Some((3, 9)),   //  river
            Some((9, 14)),  //  Navo
            Some((14, 20)), //  flows
            Some((20, 25)), //  into
            Some((25, 30)), //  Lake
            Some((30, 34)), //  The
            Some((34, 37)), // kal
            Some((37, 38)), // .
        ];
        let span = span_tokens(&ranges, &[(26, 37)]);
        assert_eq!(span, vec![6, 7, 8]);
        // The top token is " Lake" (on the span), the second " into" (off it), then "kal".
        let scores = [0.0, 0.1, 0.2, 0.3, 0.5, 2.0, 3.0, 0.4, 1.0, 0.0];
        assert_eq!(token_span_recall(&scores, &span, 1), 1.0);
        assert_eq!(token_span_recall(&scores, &span, 2), 0.5);
        assert_eq!(token_span_recall(&scores, &span, 3), 2.0 / 3.0);
        assert_eq!(token_span_recall(&scores, &span, 5), 1.0);
        assert_eq!(best_span_rank(&scores, &span), Some(1));
        // The top token off the span: recall@1 = 0.
        let mut s2 = scores;
        s2[5] = 9.0;
        assert_eq!(token_span_recall(&s2, &span, 1), 0.0);
        assert_eq!(best_span_rank(&s2, &span), Some(2));
        // A tie at the top with a token off the span counts against the span.
        s2[5] = 3.0;
        assert_eq!(token_span_recall(&s2, &span, 1), 0.0);
        // Empty ranges (the second byte of a split character) and special tokens never match.
        assert!(span_tokens(&[Some((4, 4)), None], &[(0, 10)]).is_empty());
        assert_eq!(token_span_recall(&scores, &[], 3), 0.0);
    }

    #[test]
    fn recall_matches_brute_force_on_random_scores() {
        let mut x: u64 = 7;
        let mut next = || {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 33) as usize
        };
        for _ in 0..500 {
            let n = 1 + next() % 12;
            // Few distinct values, so that ties happen.
            let scores: Vec<f64> = (0..n).map(|_| (next() % 5) as f64 - 2.0).collect();
            let span: Vec<usize> = (0..n).filter(|_| next() % 3 == 0).collect();
            if span.is_empty() {
                continue;
            }
            for k in 1..=n + 2 {
                let got = token_span_recall(&scores, &span, k);
                let want = brute(&scores, &span, k);
                assert!((got - want).abs() < 1e-12, "{scores:?} {span:?} k={k}");
            }
        }
    }

    #[test]
    fn chance_is_the_mean_over_every_ranking() {
        // All orderings of n tokens: the mean of recall@k over them, by enumeration.
        fn permutations(n: usize) -> Vec<Vec<usize>> {
            if n == 0 {
                return vec![vec![]];
            }
            let mut out = Vec::new();
            for p in permutations(n - 1) {
                for i in 0..=p.len() {
                    let mut q = p.clone();
                    q.insert(i, n - 1);
                    out.push(q);
                }
            }
            out
        }
        for n in 1..=6 {
            let perms = permutations(n);
            for s in 1..=n {
                let span: Vec<usize> = (0..s).collect();
                for k in 1..=n + 1 {
                    let mean = perms
                        .iter()
                        .map(|p| {
                            // Token t gets score −(its position in p): distinct scores.
                            let scores: Vec<f64> = (0..n)
                                .map(|t| -(p.iter().position(|&x| x == t).unwrap() as f64))
                                .collect();
                            token_span_recall(&scores, &span, k)
                        })
                        .sum::<f64>()
                        / perms.len() as f64;
                    let c = chance_recall(n, s, k);
                    assert!((mean - c).abs() < 1e-12, "n={n} s={s} k={k}: {mean} vs {c}");
                }
            }
        }
    }
}
