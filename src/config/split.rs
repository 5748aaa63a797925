//! Owns `[data.X] split` values with a slice: `SplitSpec` (`train`, `train[:2000]`,
//! `train[10%:]`, `test[5:10]`) and the rows a slice keeps.
//! Layer: ground — may import error and util; no sibling.
//!
//! The slice syntax and arithmetic are those of the `datasets` library: `NAME[FROM:TO]`, each
//! bound optional, an integer (`_` allowed as a digit separator) that may be negative
//! (counted from the end), with `%` making both bounds percentages of the split's rows.
//! A percentage bound b of n rows becomes round(b·n/100) with ties to even (Python's
//! `round`, datasets' default `closest` rounding); `(pct1_dropremainder)` after the slice
//! uses b·⌊n/100⌋ instead. Negative bounds count from the end, then both are clamped to
//! [0, n]; FROM ≥ TO keeps nothing.

/// The forms `split` accepts, for error messages.
pub const SPLIT_FORMS: &str = "`train`, `train[:2000]`, `train[100:]`, `train[5:10]`, \
     `train[-500:]`, `train[10%:]`, `train[:25%]`, `train[:50%](pct1_dropremainder)`";

/// A bound's unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SliceUnit {
    /// Rows.
    Rows,
    /// Percent of the split's rows, rounded to the closest row (ties to even).
    Percent,
    /// Percent, as whole 1% blocks of ⌊n/100⌋ rows (`pct1_dropremainder`).
    PercentBlocks,
}

/// `[FROM:TO]` of a split.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SplitSlice {
    /// Start bound (inclusive); `None`: the first row.
    pub from: Option<i64>,
    /// End bound (exclusive); `None`: past the last row.
    pub to: Option<i64>,
    /// Unit of both bounds.
    pub unit: SliceUnit,
}

/// A split name with an optional slice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitSpec {
    /// The split (`train`).
    pub name: String,
    /// Which of its rows to keep; `None`: all.
    pub slice: Option<SplitSlice>,
}

fn bad(spec: &str, why: &str) -> String {
    format!("`{spec}` {why}; accepted forms: {SPLIT_FORMS}")
}

fn bound(spec: &str, s: &str) -> Result<(Option<i64>, bool), String> {
    let s = s.trim();
    if s.is_empty() {
        return Ok((None, false));
    }
    let (num, pct) = match s.strip_suffix('%') {
        Some(n) => (n, true),
        None => (s, false),
    };
    let digits = num.strip_prefix('-').unwrap_or(num);
    if digits.is_empty()
        || !digits.chars().all(|c| c.is_ascii_digit() || c == '_')
        || digits.starts_with('_')
        || digits.ends_with('_')
    {
        return Err(bad(spec, &format!("has the bound `{s}`, not an integer")));
    }
    let v: i64 = num
        .replace('_', "")
        .parse()
        .map_err(|_| bad(spec, &format!("has the bound `{s}`, out of range")))?;
    Ok((Some(v), pct))
}

impl SplitSpec {
    /// Parses `NAME` or `NAME[FROM:TO]` (optionally followed by `(closest)` or
    /// `(pct1_dropremainder)` for percentages); the error shows the accepted forms.
    pub fn parse(spec: &str) -> Result<SplitSpec, String> {
        let s = spec.trim();
        if s.contains('+') {
            return Err(bad(
                spec,
                "joins splits with `+`, which is not supported; declare another data set for \
                 the other split",
            ));
        }
        let (name, rest) = match s.find('[') {
            Some(i) => (&s[..i], Some(&s[i + 1..])),
            None => (s, None),
        };
        let valid_name = !name.is_empty()
            && name
                .split('.')
                .all(|w| !w.is_empty() && w.chars().all(|c| c.is_alphanumeric() || c == '_'));
        if !valid_name {
            return Err(bad(
                spec,
                "is not a split name (letters, digits, `_`, words joined by `.`)",
            ));
        }
        let Some(rest) = rest else {
            return Ok(SplitSpec {
                name: name.to_string(),
                slice: None,
            });
        };
        let (inner, after) = rest
            .split_once(']')
            .ok_or_else(|| bad(spec, "has no closing `]`"))?;
        let (from, to) = inner
            .split_once(':')
            .ok_or_else(|| bad(spec, "has no `:` in its slice (a single row is `[5:6]`)"))?;
        let (from, from_pct) = bound(spec, from)?;
        let (to, to_pct) = bound(spec, to)?;
        let percent = from_pct || to_pct;
        let unit = match after.trim() {
            "" | "(closest)" if percent => SliceUnit::Percent,
            "(pct1_dropremainder)" if percent => SliceUnit::PercentBlocks,
            "" => SliceUnit::Rows,
            a if a.starts_with('(') && !percent => {
                return Err(bad(
                    spec,
                    "gives a rounding, which applies to percentages only",
                ))
            }
            a => {
                return Err(bad(
                    spec,
                    &format!(
                        "ends in `{a}`; after the slice only `(closest)` or \
                         `(pct1_dropremainder)` may follow"
                    ),
                ))
            }
        };
        if percent && [from, to].iter().flatten().any(|b| b.abs() > 100) {
            return Err(bad(spec, "has a percentage beyond ±100%"));
        }
        Ok(SplitSpec {
            name: name.to_string(),
            slice: Some(SplitSlice { from, to, unit }),
        })
    }
}

impl SplitSlice {
    /// The rows `[start, end)` of a split of `n` rows that the slice keeps (`start == end`:
    /// none). Errors only for `pct1_dropremainder` on fewer than 100 rows (always empty).
    pub fn rows(&self, n: usize) -> Result<std::ops::Range<usize>, String> {
        let n_i = n as i64;
        let abs = |b: i64| -> Result<i64, String> {
            Ok(match self.unit {
                SliceUnit::Rows => b,
                SliceUnit::Percent => (b as f64 * n as f64 / 100.0).round_ties_even() as i64,
                SliceUnit::PercentBlocks => {
                    if n < 100 {
                        return Err(format!(
                            "`pct1_dropremainder` needs a split of 100 rows or more (it has {n}); \
                             use the default rounding"
                        ));
                    }
                    b * (n_i / 100)
                }
            })
        };
        let mut from = match self.from {
            Some(b) => abs(b)?,
            None => 0,
        };
        let mut to = match self.to {
            Some(b) => abs(b)?,
            None => n_i,
        };
        if from < 0 {
            from = (n_i + from).max(0);
        }
        if to < 0 {
            to = (n_i + to).max(0);
        }
        let (from, to) = (from.min(n_i) as usize, to.min(n_i) as usize);
        Ok(from..to.max(from))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(spec: &str, n: usize) -> std::ops::Range<usize> {
        SplitSpec::parse(spec)
            .unwrap()
            .slice
            .unwrap()
            .rows(n)
            .unwrap()
    }

    #[test]
    fn slices_as_datasets_computes_them() {
        assert_eq!(rows("train[:2000]", 10), 0..10);
        assert_eq!(rows("train[5:10]", 100), 5..10);
        assert_eq!(rows("train[-3:]", 10), 7..10);
        assert_eq!(rows("train[:-3]", 10), 0..7);
        assert_eq!(rows("train[8:2]", 10), 8..8);
        // 10% of 25 = 2.5 → 2 (ties to even); 30% of 25 = 7.5 → 8.
        assert_eq!(rows("train[10%:30%]", 25), 2..8);
        assert_eq!(rows("train[10%:]", 1001), 100..1001);
        assert_eq!(rows("train[:50%](pct1_dropremainder)", 250), 0..100);
        assert_eq!(rows("train[1_000:]", 2000), 1000..2000);
    }

    #[test]
    fn bad_forms_show_accepted_ones() {
        for bad in [
            "train[:",
            "train[5]",
            "train[a:]",
            "train[:10](closest)",
            "train[:200%]",
            "train+test",
            "[:5]",
        ] {
            let e = SplitSpec::parse(bad).unwrap_err();
            assert!(e.contains("accepted forms"), "{bad}: {e}");
        }
        assert_eq!(SplitSpec::parse("train").unwrap().slice, None);
    }
}
