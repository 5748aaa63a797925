//! Owns `eval_section`: the report's evaluation section as HTML.
//! Layer: report — may import every floor from the ground up to pipeline and, in this folder,
//! eval.rs, svg.rs, text.rs.
//!
//! The report's evaluation section: one table of LDS and recall@k per method, and a
//! predicted-versus-measured scatter plot per method (centred per query).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;

use super::eval::{EvalResults, LdsPoint};
use super::svg::{scatter, Scatter};
use super::text::escape;

/// A plot colour per method.
pub fn method_colour(method: &str) -> &'static str {
    match method {
        "source" => "#2166ac",
        "influence" => "#d6604d",
        "gradient_dot" => "#4d9221",
        _ => "#6a51a3",
    }
}

/// Predicted and measured losses of one method, each centred on its query's mean (LDS is a
/// per-query rank correlation, so per-query offsets are not part of what it measures).
pub fn centred_points(points: &[LdsPoint], method: &str) -> Vec<(f64, f64, String)> {
    let mut by_q: BTreeMap<&str, Vec<&LdsPoint>> = BTreeMap::new();
    for p in points.iter().filter(|p| p.method == method) {
        by_q.entry(p.query_id.as_str()).or_default().push(p);
    }
    let mut out = Vec::new();
    for (q, ps) in by_q {
        let n = ps.len() as f64;
        let mp = ps.iter().map(|p| p.predicted).sum::<f64>() / n;
        let mm = ps.iter().map(|p| p.measured).sum::<f64>() / n;
        for p in ps {
            out.push((
                p.predicted - mp,
                p.measured - mm,
                format!("{q} · subset {} · seed {}", p.subset, p.seed),
            ));
        }
    }
    out
}

/// The `<section>`; empty when there are no results.
pub fn eval_section(e: &EvalResults) -> String {
    if e.is_empty() {
        return String::new();
    }
    let mut methods: Vec<String> = Vec::new();
    let mut seen = BTreeSet::new();
    let listed = e
        .lds
        .iter()
        .flat_map(|l| l.methods.iter().map(|m| m.method.clone()))
        .chain(
            e.recall
                .iter()
                .flat_map(|r| r.methods.iter().map(|m| m.method.clone())),
        );
    for m in listed {
        if seen.insert(m.clone()) {
            methods.push(m);
        }
    }
    let ks: Vec<u32> = e.recall.as_ref().map(|r| r.k.clone()).unwrap_or_default();
    let mut o = String::from(
        "<section id=\"eval\"><h2>Attribution quality</h2><div class=\"panel\"><table><thead><tr>\
         <th>Method</th>",
    );
    if e.lds.is_some() {
        o.push_str("<th class=\"num\">LDS</th><th class=\"num\">95% CI</th>");
    }
    // After the first method: its LDS minus the first's, paired on the same subsets.
    let base = (e.lds.iter())
        .flat_map(|l| &l.methods)
        .find_map(|m| m.vs.as_ref().map(|v| v.method.clone()));
    if let Some(b) = &base {
        let _ = write!(
            o,
            "<th class=\"num\">LDS − {}</th><th class=\"num\">paired 95% CI</th>",
            escape(b)
        );
    }
    for k in &ks {
        let _ = write!(o, "<th class=\"num\">recall@{k}</th>");
    }
    if e.recall.is_some() {
        o.push_str("<th class=\"num\">MRR</th><th class=\"num\">queries</th>");
    }
    o.push_str("</tr></thead><tbody>");
    for m in &methods {
        let _ = write!(
            o,
            "<tr><td><span class=\"badge\" style=\"background:{};color:#fff\">{}</span></td>",
            method_colour(m),
            escape(m)
        );
        if let Some(l) = &e.lds {
            match l.methods.iter().find(|x| &x.method == m) {
                Some(x) => {
                    let _ = write!(
                        o,
                        "<td class=\"num\">{:.3}</td><td class=\"num\">[{:.3}, {:.3}]</td>",
                        x.lds, x.ci95[0], x.ci95[1]
                    );
                }
                None => o.push_str("<td class=\"num\">—</td><td class=\"num\">—</td>"),
            }
            let vs = l
                .methods
                .iter()
                .find(|x| &x.method == m)
                .and_then(|x| x.vs.as_ref());
            match (vs, &base) {
                (Some(v), _) => {
                    let _ = write!(
                        o,
                        "<td class=\"num\">{:+.3}</td><td class=\"num\">[{:+.3}, {:+.3}]</td>",
                        v.difference, v.ci95[0], v.ci95[1]
                    );
                }
                (None, Some(_)) => o.push_str("<td class=\"num\">—</td><td class=\"num\">—</td>"),
                (None, None) => {}
            }
        }
        if let Some(r) = &e.recall {
            let x = r.methods.iter().find(|x| &x.method == m);
            for k in &ks {
                let v = x.and_then(|x| x.recall.get(&k.to_string()));
                let _ = write!(
                    o,
                    "<td class=\"num\">{}</td>",
                    v.map(|v| format!("{v:.3}")).unwrap_or_else(|| "—".into())
                );
            }
            match x {
                Some(x) => {
                    let _ = write!(
                        o,
                        "<td class=\"num\">{:.3}</td><td class=\"num\">{}</td>",
                        x.mrr, x.n_queries
                    );
                }
                None => o.push_str("<td class=\"num\">—</td><td class=\"num\">—</td>"),
            }
        }
        o.push_str("</tr>");
    }
    o.push_str("</tbody></table>");
    let mut notes = Vec::new();
    if let Some(l) = &e.lds {
        notes.push(format!(
            "LDS: Spearman correlation between predicted and measured query loss over {} \
             random subsets of {:.0}% of the fine-tuning set ({} seed{} each), averaged over \
             queries; 95% bootstrap interval.",
            l.subsets,
            100.0 * l.alpha,
            l.seeds,
            if l.seeds == 1 { "" } else { "s" }
        ));
    }
    if e.recall.is_some() {
        notes.push(
            "recall@k: share of queries with a known source document among the top k \
             proponents; MRR: mean reciprocal rank of the first known source."
                .to_string(),
        );
    }
    let _ = write!(o, "<p class=\"note\">{}</p>", escape(&notes.join(" ")));
    if !e.points.is_empty() {
        o.push_str("<div class=\"plots\">");
        for m in &methods {
            let pts = centred_points(&e.points, m);
            if pts.is_empty() {
                continue;
            }
            let lds = e
                .lds
                .as_ref()
                .and_then(|l| l.methods.iter().find(|x| &x.method == m))
                .map(|x| format!(" (LDS {:.3})", x.lds))
                .unwrap_or_default();
            let title = format!("{m}{lds}");
            o.push_str(&scatter(&Scatter {
                title: &title,
                x_label: "predicted loss (centred per query)",
                y_label: "measured loss (centred per query)",
                points: pts,
                colour: method_colour(m),
                lines: Vec::new(),
            }));
        }
        o.push_str(
            "</div><p class=\"note\">Each point is one query on one model retrained on a random \
             subset; hover a point for its query and subset.</p>",
        );
    }
    o.push_str("</div></section>");
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pt(m: &str, q: &str, s: u32, p: f64, y: f64) -> LdsPoint {
        LdsPoint {
            method: m.into(),
            query_id: q.into(),
            subset: s,
            seed: 0,
            predicted: p,
            measured: y,
        }
    }

    #[test]
    fn centring_removes_each_query_mean_and_keeps_only_the_method() {
        let pts = [
            pt("source", "a", 0, 1.0, 10.0),
            pt("source", "a", 1, 3.0, 14.0),
            pt("source", "b", 0, -5.0, 0.0),
            pt("source", "b", 1, -7.0, 2.0),
            pt("influence", "a", 0, 100.0, 100.0),
        ];
        let c = centred_points(&pts, "source");
        assert_eq!(c.len(), 4);
        let xy: Vec<(f64, f64)> = c.iter().map(|(x, y, _)| (*x, *y)).collect();
        assert_eq!(xy, [(-1.0, -2.0), (1.0, 2.0), (1.0, -1.0), (-1.0, 1.0)]);
        assert_eq!(c[0].2, "a · subset 0 · seed 0");
    }

    #[test]
    fn empty_results_render_nothing() {
        assert_eq!(eval_section(&EvalResults::default()), "");
    }
}
