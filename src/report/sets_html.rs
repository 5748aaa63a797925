//! Owns the report's sections of named query sets (`source-tda ask`).
//! Layer: report — may import pipeline and every layer below it; sibling `data`, `text`.
//!
//! One section per named query set after the default queries: its queries rendered as the
//! default ones are (the caller's `render_query`), their ids prefixed with the set's name so
//! that anchors stay unique; a set whose scores are stale says so instead.

use std::fmt::Write;

use super::data::{QueryReport, QuerySetReport};
use super::text::escape;

/// The sections of `sets`, each query rendered by `render_query`.
pub fn sections(sets: &[QuerySetReport], render_query: &dyn Fn(&QueryReport) -> String) -> String {
    let mut o = String::new();
    for set in sets {
        let _ = write!(
            o,
            "<section class=\"query-set\" id=\"query-set-{}\"><h2>Query set {}</h2>",
            escape(&set.name),
            escape(&set.name)
        );
        if !set.current {
            let _ = write!(
                o,
                "<p>Stale: the run's fine-tune or curvature changed after this set was scored. \
                 Run <code>source-tda ask --name {}</code> with its prompts file again to \
                 rescore it.</p>",
                escape(&set.name)
            );
        } else {
            let _ = write!(o, "<p>{} queries.</p>", set.queries.len());
        }
        for q in &set.queries {
            let mut named = q.clone();
            named.query_id = format!("{}/{}", set.name, q.query_id);
            o.push_str(&render_query(&named));
        }
        o.push_str("</section>");
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_set_lists_its_queries_under_its_name_or_says_it_is_stale() {
        let q = QueryReport {
            query_id: "q0".into(),
            prompt: "P".into(),
            completion: "C".into(),
            measurement: 1.0,
            known_sources: Vec::new(),
            best_known_rank: None,
            known_ranks: Vec::new(),
            n_scored: 3,
            proponents: Vec::new(),
            opponents: Vec::new(),
            generation: None,
            improbable: None,
        };
        let sets = [
            QuerySetReport {
                name: "new<".into(),
                current: true,
                queries: vec![q],
            },
            QuerySetReport {
                name: "old".into(),
                current: false,
                queries: Vec::new(),
            },
        ];
        let html = sections(&sets, &|q| format!("[{}]", q.query_id));
        assert!(
            html.contains("Query set new&lt;</h2><p>1 queries.</p>[new</q0]"),
            "{html}"
        );
        assert!(html.contains("Query set old</h2><p>Stale"), "{html}");
    }
}
