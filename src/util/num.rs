//! Owns how numbers read in logs and terminal output: significant digits, counts, durations.
//! Layer: ground — may import error only; no sibling.
//!
//! Log lines are read by people: `τ = 3.112`, not `3.1120745997728876`; `1,204 docs`, not
//! `1204`; `12 min 05 s`, not `725.3`.

/// `x` with `digits` significant digits (at least 1): fixed notation for 1e-3 ≤ |x| < 1e6,
/// scientific (`1.23e-5`) outside; `0`, `NaN`, `inf`, `-inf` as they are.
pub fn sig(x: f64, digits: usize) -> String {
    let digits = digits.max(1);
    if x == 0.0 {
        return "0".into();
    }
    if !x.is_finite() {
        return format!("{x}");
    }
    let mag = x.abs().log10().floor() as i32;
    if !(-3..6).contains(&mag) {
        return format!("{:.*e}", digits - 1, x);
    }
    let decimals = (digits as i32 - 1 - mag).max(0) as usize;
    let s = format!("{x:.decimals$}");
    // Rounding may carry into a new digit (9.9995 → 10.000): drop the extra decimal.
    let carried = s
        .parse::<f64>()
        .is_ok_and(|r| r.abs() >= 10f64.powi(mag + 1));
    if carried && decimals > 0 {
        format!("{x:.*}", decimals - 1)
    } else {
        s
    }
}

/// A count with thousands separators: `1,204,000`.
pub fn count(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A duration in seconds as people say it: `0.4 s`, `42 s`, `12 min 05 s`, `3 h 07 min`.
pub fn duration(secs: f64) -> String {
    if !secs.is_finite() || secs < 0.0 {
        return "unknown".into();
    }
    if secs < 10.0 {
        return format!("{secs:.1} s");
    }
    let s = secs.round() as u64;
    match s {
        0..=59 => format!("{s} s"),
        60..=3599 => format!("{} min {:02} s", s / 60, s % 60),
        _ => format!("{} h {:02} min", s / 3600, (s % 3600) / 60),
    }
}

/// A rate per second with 3 significant digits: `41.3/s`, `0.0125/s`.
pub fn rate(per_s: f64) -> String {
    format!("{}/s", sig(per_s, 3))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn significant_digits_fixed_and_scientific() {
        assert_eq!(sig(3.1120745997728876, 4), "3.112");
        assert_eq!(sig(0.4229183, 3), "0.423");
        assert_eq!(sig(-421.7349, 4), "-421.7");
        assert_eq!(sig(41.2, 4), "41.20");
        assert_eq!(sig(123456.7, 4), "123457");
        assert_eq!(sig(9.99951, 4), "10.00");
        assert_eq!(sig(1.5e-5, 3), "1.50e-5");
        assert_eq!(sig(2.5e7, 2), "2.5e7");
        assert_eq!(sig(0.0, 4), "0");
        assert_eq!(sig(f64::NAN, 4), "NaN");
        assert_eq!(sig(f64::NEG_INFINITY, 4), "-inf");
        // Every fixed-notation result parses back within half a unit of its last digit.
        for &x in &[0.0012345, 0.98765, 7.0, 99.99, 5555.5] {
            let s = sig(x, 4);
            let back: f64 = s.parse().unwrap();
            assert!((back - x).abs() / x.abs() < 1e-3, "{x} → {s}");
        }
    }

    #[test]
    fn counts_durations_and_rates() {
        assert_eq!(count(0), "0");
        assert_eq!(count(999), "999");
        assert_eq!(count(1000), "1,000");
        assert_eq!(count(1204000), "1,204,000");
        assert_eq!(duration(0.42), "0.4 s");
        assert_eq!(duration(42.4), "42 s");
        assert_eq!(duration(725.3), "12 min 05 s");
        assert_eq!(duration(11220.0), "3 h 07 min");
        assert_eq!(duration(f64::INFINITY), "unknown");
        assert_eq!(rate(41.27), "41.3/s");
    }
}
