//! Owns `Diverging` and `legend_gradient`: the report's colour scale for token scores.
//! Layer: report — may import every floor from the ground up to pipeline; no sibling.
//!
//! The report's diverging colour scale for token scores: white at 0, blue for positive
//! (the token pushed τ up: it helped produce the completion), red for negative, saturating at
//! ±`max`. Piecewise linear in sRGB through five stops (ColorBrewer's RdBu).

/// An sRGB colour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rgb(pub u8, pub u8, pub u8);

impl Rgb {
    /// `#rrggbb`.
    pub fn hex(self) -> String {
        format!("#{:02x}{:02x}{:02x}", self.0, self.1, self.2)
    }

    /// Relative luminance in [0, 1] (Rec. 709 weights on the sRGB values; enough to pick a
    /// readable text colour).
    pub fn luminance(self) -> f64 {
        (0.2126 * self.0 as f64 + 0.7152 * self.1 as f64 + 0.0722 * self.2 as f64) / 255.0
    }
}

/// The stops at t = −1, −½, 0, ½, 1.
const STOPS: [Rgb; 5] = [
    Rgb(178, 24, 43),
    Rgb(239, 138, 98),
    Rgb(247, 247, 247),
    Rgb(103, 169, 207),
    Rgb(33, 102, 172),
];

/// A symmetric diverging scale on [−max, max].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Diverging {
    /// The magnitude that gets the end colours; larger values are clamped.
    pub max: f64,
}

impl Diverging {
    /// A scale that spans the largest |value| (1 when there is none or all are 0).
    pub fn spanning(values: impl IntoIterator<Item = f64>) -> Diverging {
        let max = values
            .into_iter()
            .filter(|v| v.is_finite())
            .fold(0.0f64, |m, v| m.max(v.abs()));
        Diverging {
            max: if max > 0.0 { max } else { 1.0 },
        }
    }

    /// The position of `value` on the scale, in [−1, 1] (NaN → 0).
    pub fn position(&self, value: f64) -> f64 {
        if value.is_nan() {
            return 0.0;
        }
        (value / self.max).clamp(-1.0, 1.0)
    }

    /// The colour of `value`.
    pub fn colour(&self, value: f64) -> Rgb {
        at(self.position(value))
    }

    /// A readable text colour on the background of `value`.
    pub fn text_colour(&self, value: f64) -> &'static str {
        if self.colour(value).luminance() < 0.45 {
            "#ffffff"
        } else {
            "#1a1a1a"
        }
    }
}

/// The colour at position `t` ∈ [−1, 1].
pub fn at(t: f64) -> Rgb {
    let t = t.clamp(-1.0, 1.0);
    let x = (t + 1.0) * 2.0; // 0..4 over the stops
    let i = (x.floor() as usize).min(3);
    let f = x - i as f64;
    let (a, b) = (STOPS[i], STOPS[i + 1]);
    let mix = |p: u8, q: u8| (p as f64 + (q as f64 - p as f64) * f).round() as u8;
    Rgb(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}

/// CSS `linear-gradient` stops for a legend bar from −max (left) to +max (right).
pub fn legend_gradient() -> String {
    let stops: Vec<String> = (0..=20)
        .map(|k| {
            let t = -1.0 + k as f64 / 10.0;
            format!("{} {}%", at(t).hex(), k * 5)
        })
        .collect();
    format!("linear-gradient(to right, {})", stops.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_is_neutral_ends_saturate_and_sign_picks_the_hue() {
        let s = Diverging { max: 2.0 };
        assert_eq!(s.colour(0.0), STOPS[2]);
        assert_eq!(s.colour(f64::NAN), STOPS[2]);
        assert_eq!(s.colour(2.0), STOPS[4]);
        assert_eq!(s.colour(-2.0), STOPS[0]);
        assert_eq!(s.colour(50.0), STOPS[4], "clamped beyond max");
        assert_eq!(s.colour(-1.0), STOPS[1]);
        // Positive values are bluer than red, negative ones redder than blue.
        let p = s.colour(0.3);
        let n = s.colour(-0.3);
        assert!(p.2 > p.0 && n.0 > n.2, "{p:?} {n:?}");
    }

    #[test]
    fn intensity_grows_monotonically_with_magnitude() {
        // Distance from white never decreases as |value| grows, on either side.
        let white = STOPS[2];
        let dist = |c: Rgb| {
            (c.0 as f64 - white.0 as f64).abs()
                + (c.1 as f64 - white.1 as f64).abs()
                + (c.2 as f64 - white.2 as f64).abs()
        };
        for sign in [-1.0, 1.0] {
            let mut last = 0.0;
            for k in 0..=100 {
                let d = dist(at(sign * k as f64 / 100.0));
                assert!(d + 1e-9 >= last, "{sign} {k}: {d} < {last}");
                last = d;
            }
        }
    }

    #[test]
    fn spanning_takes_the_largest_magnitude_and_survives_all_zero() {
        assert_eq!(Diverging::spanning([0.5, -3.0, 1.0]).max, 3.0);
        assert_eq!(Diverging::spanning([0.0, f64::NAN]).max, 1.0);
        assert_eq!(Diverging::spanning([]).max, 1.0);
    }

    #[test]
    fn text_stays_readable_on_dark_ends() {
        let s = Diverging { max: 1.0 };
        assert_eq!(s.text_colour(1.0), "#ffffff");
        assert_eq!(s.text_colour(-1.0), "#ffffff");
        assert_eq!(s.text_colour(0.0), "#1a1a1a");
        assert_eq!(at(1.0).hex(), "#2166ac");
        assert!(legend_gradient().starts_with("linear-gradient(to right, #b2182b 0%"));
    }
}
