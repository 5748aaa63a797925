//! Owns the report's SVG plots: `scatter`, `Scatter` (points and lines), `nice_ticks` and
//! `tick_label`.
//! Layer: report — may import every floor from the ground up to pipeline and, in this folder,
//! text.rs.
//!
//! Inline SVG plots for the report: a scatter plot of predicted versus measured loss with
//! axes, "nice" ticks and labels. Coordinates are computed here; no script is needed to draw.

use std::fmt::Write;

use super::text::escape;

/// "Nice" tick values covering [lo, hi]: about `target` steps of 1, 2 or 5 × 10^k.
pub fn nice_ticks(lo: f64, hi: f64, target: usize) -> Vec<f64> {
    if !lo.is_finite() || !hi.is_finite() {
        return Vec::new();
    }
    let (lo, hi) = if hi > lo {
        (lo, hi)
    } else {
        (lo - 0.5, lo + 0.5)
    };
    let raw = (hi - lo) / target.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let first = (lo / step).ceil() as i64;
    let last = (hi / step).floor() as i64;
    (first..=last).map(|k| k as f64 * step).collect()
}

/// A short label for a tick value.
pub fn tick_label(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let a = v.abs();
    if !(1e-3..1e4).contains(&a) {
        format!("{v:.0e}")
    } else {
        let s = format!("{v:.3}");
        let s = s.trim_end_matches('0').trim_end_matches('.');
        s.to_string()
    }
}

/// One panel's data: points (x, y) with a hover label each.
pub struct Scatter<'a> {
    /// Panel title.
    pub title: &'a str,
    /// x-axis label.
    pub x_label: &'a str,
    /// y-axis label.
    pub y_label: &'a str,
    /// Points: x, y, hover text.
    pub points: Vec<(f64, f64, String)>,
    /// Fill colour of the points (CSS).
    pub colour: &'a str,
    /// Lines drawn under the points.
    pub lines: Vec<Line<'a>>,
}

/// A line of a plot: its (x, y) vertices, stroke colour (CSS) and width.
pub type Line<'a> = (Vec<(f64, f64)>, &'a str, f64);

/// Panel size in SVG units.
const W: f64 = 340.0;
const H: f64 = 280.0;
const LEFT: f64 = 56.0;
const RIGHT: f64 = 14.0;
const TOP: f64 = 30.0;
const BOTTOM: f64 = 44.0;

/// Renders a scatter panel as an `<svg>` element. Non-finite points are left out.
pub fn scatter(s: &Scatter) -> String {
    let pts: Vec<&(f64, f64, String)> = s
        .points
        .iter()
        .filter(|(x, y, _)| x.is_finite() && y.is_finite())
        .collect();
    let vertices: Vec<(f64, f64, String)> = s
        .lines
        .iter()
        .flat_map(|(v, _, _)| v.iter())
        .filter(|(x, y)| x.is_finite() && y.is_finite())
        .map(|&(x, y)| (x, y, String::new()))
        .collect();
    let all: Vec<&(f64, f64, String)> = pts.iter().copied().chain(&vertices).collect();
    let range = |f: &dyn Fn(&(f64, f64, String)) -> f64| {
        let lo = all.iter().map(|p| f(p)).fold(f64::INFINITY, f64::min);
        let hi = all.iter().map(|p| f(p)).fold(f64::NEG_INFINITY, f64::max);
        if all.is_empty() {
            (0.0, 1.0)
        } else if hi > lo {
            let pad = 0.05 * (hi - lo);
            (lo - pad, hi + pad)
        } else {
            (lo - 0.5, lo + 0.5)
        }
    };
    let (x0, x1) = range(&|p| p.0);
    let (y0, y1) = range(&|p| p.1);
    let sx = |x: f64| LEFT + (x - x0) / (x1 - x0) * (W - LEFT - RIGHT);
    let sy = |y: f64| H - BOTTOM - (y - y0) / (y1 - y0) * (H - TOP - BOTTOM);
    let mut o = String::new();
    let _ = write!(
        o,
        r#"<svg class="scatter" viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img" aria-label="{}">"#,
        escape(s.title)
    );
    let _ = write!(
        o,
        r##"<text x="{}" y="18" class="ptitle">{}</text>"##,
        LEFT,
        escape(s.title)
    );
    let _ = write!(
        o,
        r##"<rect x="{LEFT}" y="{TOP}" width="{}" height="{}" class="frame"/>"##,
        W - LEFT - RIGHT,
        H - TOP - BOTTOM
    );
    for t in nice_ticks(x0, x1, 5) {
        let x = sx(t);
        let _ = write!(
            o,
            r#"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{:.1}" class="grid"/><text x="{x:.1}" y="{:.1}" class="tick" text-anchor="middle">{}</text>"#,
            H - BOTTOM,
            H - BOTTOM + 14.0,
            tick_label(t)
        );
    }
    for t in nice_ticks(y0, y1, 5) {
        let y = sy(t);
        let _ = write!(
            o,
            r#"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" class="grid"/><text x="{:.1}" y="{:.1}" class="tick" text-anchor="end">{}</text>"#,
            W - RIGHT,
            LEFT - 5.0,
            y + 3.5,
            tick_label(t)
        );
    }
    let _ = write!(
        o,
        r#"<text x="{:.1}" y="{:.1}" class="axis" text-anchor="middle">{}</text>"#,
        (LEFT + W - RIGHT) / 2.0,
        H - 8.0,
        escape(s.x_label)
    );
    let _ = write!(
        o,
        r#"<text transform="translate(14 {:.1}) rotate(-90)" class="axis" text-anchor="middle">{}</text>"#,
        (TOP + H - BOTTOM) / 2.0,
        escape(s.y_label)
    );
    for (v, colour, width) in &s.lines {
        let path: Vec<String> = v
            .iter()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y)))
            .collect();
        let _ = write!(
            o,
            r#"<polyline points="{}" fill="none" stroke="{}" stroke-width="{width}"/>"#,
            path.join(" "),
            escape(colour)
        );
    }
    for (x, y, label) in &pts {
        let _ = write!(
            o,
            r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{}" class="pt"><title>{}</title></circle>"#,
            sx(*x),
            sy(*y),
            escape(s.colour),
            escape(label)
        );
    }
    if all.is_empty() {
        let _ = write!(
            o,
            r#"<text x="{:.1}" y="{:.1}" class="axis" text-anchor="middle">no points</text>"#,
            (LEFT + W - RIGHT) / 2.0,
            (TOP + H - BOTTOM) / 2.0
        );
    }
    o.push_str("</svg>");
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_inside_the_range_and_about_the_target_count() {
        assert_eq!(nice_ticks(0.0, 10.0, 5), [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]);
        let t = nice_ticks(-0.013, 0.047, 5);
        assert!(t.iter().all(|v| (-0.013..=0.047).contains(v)), "{t:?}");
        assert!((3..=8).contains(&t.len()), "{t:?}");
        let t = nice_ticks(3.0, 3.0, 5);
        assert!(
            !t.is_empty() && t.iter().all(|v| (2.5..=3.5).contains(v)),
            "{t:?}"
        );
        assert!(nice_ticks(f64::NAN, 1.0, 5).is_empty());
        assert_eq!(tick_label(0.5), "0.5");
        assert_eq!(tick_label(-2.0), "-2");
        assert_eq!(tick_label(0.0), "0");
        assert_eq!(tick_label(2e-5), "2e-5");
    }

    #[test]
    fn points_land_inside_the_frame_in_order_and_labels_are_escaped() {
        let s = Scatter {
            title: "a<b",
            x_label: "predicted",
            y_label: "measured",
            points: vec![
                (0.0, 0.0, "lo".into()),
                (1.0, 2.0, "hi & <x>".into()),
                (f64::NAN, 1.0, "gone".into()),
            ],
            colour: "#123456",
            lines: vec![(vec![(-1.0, 5.0), (2.0, 5.0)], "#abcdef", 2.0)],
        };
        let svg = scatter(&s);
        assert!(svg.contains("a&lt;b") && svg.contains("hi &amp; &lt;x&gt;"));
        assert!(!svg.contains("gone"));
        let circles: Vec<(f64, f64)> = svg
            .split("<circle ")
            .skip(1)
            .map(|c| {
                let num = |k: &str| {
                    let s = c.split(&format!("{k}=\"")).nth(1).unwrap();
                    s[..s.find('"').unwrap()].parse::<f64>().unwrap()
                };
                (num("cx"), num("cy"))
            })
            .collect();
        assert_eq!(circles.len(), 2);
        for (x, y) in &circles {
            assert!((LEFT..=W - RIGHT).contains(x) && (TOP..=H - BOTTOM).contains(y));
        }
        // Larger x is further right; larger y is higher up (smaller SVG y).
        assert!(circles[1].0 > circles[0].0 && circles[1].1 < circles[0].1);
        // The line's vertices widen the range and land on the frame's corners' sides.
        let line = svg.split("<polyline points=\"").nth(1).unwrap();
        let first: Vec<f64> = line
            .split(' ')
            .next()
            .unwrap()
            .split(',')
            .map(|v| v.parse().unwrap())
            .collect();
        assert!(first[0] < circles[0].0 && first[1] < circles[1].1, "{line}");
    }
}
