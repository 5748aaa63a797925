//! Owns `Shard`: one share `i/n` of a data-parallel job (`--shard i/n` on the command line).
//! Layer: ground (util) — may import error only.
//!
//! Work that splits into numbered independent units (an LDS retraining job, a batch of a
//! pass over data) is shared among n processes by unit index: unit k belongs to shard
//! i = (k mod n) + 1. Interleaving balances shards whose units grow along the index (a
//! length-sorted batch plan), and every shard's share is fixed by (k, n) alone, so the same
//! shards always do the same work, on any machine.

use crate::error::{Error, Result};

/// A shard `i/n` (1-based i) of the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Shard {
    /// This shard, 1 ..= n.
    pub index: usize,
    /// The number of shards.
    pub count: usize,
}

impl Shard {
    /// Parses `i/n` with 1 ≤ i ≤ n.
    pub fn parse(s: &str) -> Result<Shard> {
        let bad = || {
            Error::Pipeline(format!(
                "--shard `{s}`: expected i/n with 1 ≤ i ≤ n, e.g. --shard 2/4"
            ))
        };
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let (index, count) = (
            i.trim().parse::<usize>().map_err(|_| bad())?,
            n.trim().parse::<usize>().map_err(|_| bad())?,
        );
        if index == 0 || index > count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }

    /// Whether unit number `k` (0-based) belongs to this shard: k ≡ i − 1 (mod n).
    pub fn owns(&self, k: usize) -> bool {
        k % self.count == self.index - 1
    }

    /// Whether this is the last shard (the one that merges when everything is done).
    pub fn is_last(&self) -> bool {
        self.index == self.count
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_parse_and_share_every_unit_once() {
        assert_eq!(Shard::parse("2/4").unwrap(), Shard { index: 2, count: 4 });
        assert_eq!(Shard::parse(" 3 / 3 ").unwrap().to_string(), "3/3");
        for bad in ["0/4", "5/4", "2", "a/b", "1/0", "-1/2"] {
            let e = Shard::parse(bad).unwrap_err().to_string();
            assert!(e.contains("expected i/n"), "{bad}: {e}");
        }
        let shards: Vec<Shard> = (1..=3).map(|i| Shard { index: i, count: 3 }).collect();
        for k in 0..10 {
            assert_eq!(shards.iter().filter(|s| s.owns(k)).count(), 1, "unit {k}");
        }
        assert!(shards[2].is_last() && !shards[0].is_last());
    }
}
